//! Events whose delivery is provably abandoned in a consumer group: not finished in the group,
//! yet the group will never deliver the message of its current run (the publish, or the group's
//! latest re-run) again. The write order and the dead-letter stream keep this from happening in
//! normal operation; what is left (a message that expired with `max_age` while its state lived
//! on, a message settled behind the provider's back, an advisory lost before the dead-letter
//! stream existed) is found here.
//!
//! The proof comes from the server: the message has left the stream, or the group's durable
//! consumer has settled it — its sequence is at or under the group's acknowledgement floor, or
//! the group delivered it and holds no unacknowledged message at all. Anything that cannot be
//! proven (a group without a durable consumer yet, a group with messages in flight, an event
//! stored without a message) is not abandoned.
//!
//! `requeue` accepts abandoned events; every host also sweeps the bucket every
//! [`SWEEP_INTERVAL`] and records the abandoned ones as `failed` in each group that abandoned
//! them (among the groups with a durable consumer on the stream), with an error saying so (a
//! compare-and-set that re-checks the proof on the record as it is by then, so an event that
//! moves meanwhile is left alone), from where they can be re-run.

use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;

use super::record::Record;
use super::subjects::{decode_name, encode_name};
use super::{NAME, Shared};
use eventbroker::event::EventStatus;
use eventbroker::provider::ProviderError;

/// How often each host sweeps the bucket for abandoned events.
pub(crate) const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// The error recorded on an event found abandoned.
const ABANDONED: &str = "abandoned: the message of this run was settled by the consumer group \
                         (or left the stream) without a final outcome being recorded; re-run it \
                         with retry";

fn backend(error: impl std::fmt::Display) -> ProviderError {
    ProviderError::backend(NAME, error)
}

/// What one group's durable consumer has settled.
struct GroupProgress {
    ack_floor: u64,
    delivered: u64,
    unacknowledged: usize,
}

/// The server's delivery state, read once and applied to any number of records.
pub(crate) struct Evidence {
    /// The lowest sequence still in the stream; `None` when the stream is empty.
    first: Option<u64>,
    /// Each group's progress, by durable consumer name.
    groups: BTreeMap<String, GroupProgress>,
}

impl Evidence {
    /// Reads the stream's state and every durable consumer's progress.
    ///
    /// # Errors
    /// Backend failures.
    pub(crate) async fn gather(shared: &Shared) -> Result<Self, ProviderError> {
        let info = shared
            .stream
            .get_info()
            .await
            .map_err(|e| backend(format!("cannot read stream info: {e}")))?;
        let first = (info.state.messages > 0).then_some(info.state.first_sequence);
        let mut groups = BTreeMap::new();
        let mut consumers = shared.stream.consumers();
        while let Some(consumer) = consumers.next().await {
            let consumer =
                consumer.map_err(|e| backend(format!("cannot read consumer groups: {e}")))?;
            if let Some(durable) = consumer.config.durable_name {
                groups.insert(
                    durable,
                    GroupProgress {
                        ack_floor: consumer.ack_floor.stream_sequence,
                        delivered: consumer.delivered.stream_sequence,
                        unacknowledged: consumer.num_ack_pending,
                    },
                );
            }
        }
        Ok(Evidence { first, groups })
    }

    /// Whether `group` will not deliver its current run of `record` again (see the module
    /// documentation); `false` for events the group finished.
    pub(crate) fn abandoned(&self, record: &Record, group: &str) -> bool {
        let Some(seq) = record.run(group) else {
            return false;
        };
        if record.state(group).is_finished() {
            return false;
        }
        if self.first.is_none_or(|first| seq < first) {
            return true;
        }
        self.groups
            .get(&encode_name(group))
            .is_some_and(|progress| {
                seq <= progress.ack_floor
                    || (seq <= progress.delivered && progress.unacknowledged == 0)
            })
    }

    /// The groups with a durable consumer on the stream.
    fn group_names(&self) -> impl Iterator<Item = String> + '_ {
        self.groups.keys().map(|durable| decode_name(durable))
    }
}

/// Records every event abandoned in a group as failed in that group; returns how many
/// (event, group) pairs.
///
/// # Errors
/// Backend failures reading the bucket or the server's state.
pub(crate) async fn sweep(shared: &Shared) -> Result<usize, ProviderError> {
    // Only what the abandonment rules read is kept of each record: not its payload.
    let mut records = Vec::new();
    shared
        .store
        .scan(|mut record| {
            record.event.payload = serde_json::Value::Null;
            record.event.metadata.clear();
            records.push(record);
        })
        .await?;
    if records.is_empty() {
        return Ok(0);
    }
    // The compare-and-set re-checks each record as it is by then: an outcome recorded
    // meanwhile (always written before its message is settled) makes it finished, and a
    // re-run changes the group's run.
    let evidence = Evidence::gather(shared).await?;
    let groups: Vec<String> = evidence.group_names().collect();
    let mut failed = 0;
    for candidate in &records {
        for group in groups
            .iter()
            .filter(|group| evidence.abandoned(candidate, group))
        {
            let id = &candidate.event.id;
            let result = shared
                .store
                .modify(id, |record| {
                    if record.run(group) != candidate.run(group)
                        || !evidence.abandoned(record, group)
                    {
                        return Err(ProviderError::InvalidState {
                            id: id.clone(),
                            status: record.state(group).status,
                            reason: "it moved on while being swept",
                        });
                    }
                    record.revoke(group);
                    record.change(group, |state| {
                        state.status = EventStatus::Failed;
                        state.error = Some(ABANDONED.into());
                        state.completed_at = Some(Utc::now());
                    });
                    Ok(())
                })
                .await;
            match result {
                Ok(_) => {
                    tracing::warn!(event_id = %id, %group, "recorded an abandoned event as failed");
                    failed += 1;
                }
                Err(ProviderError::InvalidState { .. } | ProviderError::NotFound(_)) => {}
                Err(error) => return Err(error),
            }
        }
    }
    Ok(failed)
}

/// Sweeps every [`SWEEP_INTERVAL`] until the provider shuts down or goes away.
pub(crate) fn start(shared: &Arc<Shared>) {
    let weak: Weak<Shared> = Arc::downgrade(shared);
    let shutdown = shared.shutdown.clone();
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(SWEEP_INTERVAL);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            let Some(shared) = weak.upgrade() else {
                return;
            };
            if let Err(error) = sweep(&shared).await {
                tracing::debug!(%error, "sweeping for abandoned events failed; trying again later");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventbroker::event::{Event, EventSource};

    fn record(status: EventStatus, seq: Option<u64>) -> Record {
        let mut record = Record::new(Event::new(EventSource::System, "a.b", "test"), seq);
        record.change("g", |state| state.status = status);
        record
    }

    fn group(ack_floor: u64, delivered: u64, unacknowledged: usize) -> GroupProgress {
        GroupProgress {
            ack_floor,
            delivered,
            unacknowledged,
        }
    }

    #[test]
    fn only_what_the_server_proves_settled_in_the_group_is_abandoned() {
        let evidence = |first, groups: Vec<(&str, GroupProgress)>| Evidence {
            first,
            groups: groups
                .into_iter()
                .map(|(name, progress)| (encode_name(name), progress))
                .collect(),
        };
        let processing = record(EventStatus::Processing, Some(5));
        // The group acknowledged up to it, or delivered it and holds nothing.
        assert!(evidence(Some(1), vec![("g", group(5, 9, 3))]).abandoned(&processing, "g"));
        assert!(evidence(Some(1), vec![("g", group(0, 7, 0))]).abandoned(&processing, "g"));
        // Another group's progress proves nothing for this one.
        assert!(!evidence(Some(1), vec![("h", group(9, 9, 0))]).abandoned(&processing, "g"));
        // The group still may deliver it, or holds messages in flight.
        assert!(!evidence(Some(1), vec![("g", group(4, 4, 0))]).abandoned(&processing, "g"));
        assert!(!evidence(Some(1), vec![("g", group(4, 9, 1))]).abandoned(&processing, "g"));
        // No durable consumer for the group yet: one joining later delivers it.
        assert!(!evidence(Some(1), Vec::new()).abandoned(&processing, "g"));
        // Gone from the stream.
        assert!(evidence(Some(6), vec![("g", group(0, 0, 1))]).abandoned(&processing, "g"));
        assert!(evidence(None, Vec::new()).abandoned(&processing, "g"));
        // Finished in the group, or stored without a message: never.
        let all_settled = evidence(Some(1), vec![("g", group(9, 9, 0))]);
        assert!(!all_settled.abandoned(&record(EventStatus::Failed, Some(5)), "g"));
        assert!(!all_settled.abandoned(&record(EventStatus::Pending, None), "g"));
        // A group's re-run is its own run: the publish being settled proves nothing about it.
        let mut rerun = record(EventStatus::Failed, Some(5));
        rerun.rerun("g", eventbroker::provider::GroupState::default(), 12);
        assert!(!all_settled.abandoned(&rerun, "g"));
        assert!(evidence(Some(1), vec![("g", group(12, 12, 0))]).abandoned(&rerun, "g"));
    }
}
