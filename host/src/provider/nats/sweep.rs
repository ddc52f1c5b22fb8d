//! Events whose delivery is provably abandoned: not finished, yet no consumer group will ever
//! deliver the message of their current run again. The write order and the dead-letter
//! stream keep this from happening in normal operation; what is left (a message that expired
//! with `max_age` while its state lived on, a message settled behind the provider's back, an
//! advisory lost before the dead-letter stream existed) is found here.
//!
//! The proof comes from the server: the message has left the stream, or every durable
//! consumer (group) on the stream has settled it — its sequence is at or under the group's
//! acknowledgement floor, or the group delivered it and holds no unacknowledged message at all.
//! Anything that cannot be proven (no group yet, a group with messages in flight, an event
//! stored without a message) is not abandoned.
//!
//! `requeue` accepts abandoned events; every host also sweeps the bucket every
//! [`SWEEP_INTERVAL`] and records the abandoned ones as `failed` with an error saying so (a
//! compare-and-set on the revision it read, so an event that moves meanwhile is left alone),
//! from where they can be re-run.

use std::sync::{Arc, Weak};
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;

use super::record::Record;
use super::{NAME, Shared};
use crate::event::EventStatus;
use crate::provider::ProviderError;

/// How often each host sweeps the bucket for abandoned events.
pub(crate) const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// The error recorded on an event found abandoned.
const ABANDONED: &str = "abandoned: the message of this run was settled by every consumer group \
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
    groups: Vec<GroupProgress>,
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
        let mut groups = Vec::new();
        let mut consumers = shared.stream.consumers();
        while let Some(consumer) = consumers.next().await {
            let consumer =
                consumer.map_err(|e| backend(format!("cannot read consumer groups: {e}")))?;
            if consumer.config.durable_name.is_some() {
                groups.push(GroupProgress {
                    ack_floor: consumer.ack_floor.stream_sequence,
                    delivered: consumer.delivered.stream_sequence,
                    unacknowledged: consumer.num_ack_pending,
                });
            }
        }
        Ok(Evidence { first, groups })
    }

    /// Whether no group will deliver the current run of `record` again (see the module
    /// documentation); `false` for finished events.
    pub(crate) fn abandoned(&self, record: &Record) -> bool {
        let Some(seq) = record.seq else {
            return false;
        };
        if record.event.status.is_finished() {
            return false;
        }
        if self.first.is_none_or(|first| seq < first) {
            return true;
        }
        !self.groups.is_empty()
            && self.groups.iter().all(|group| {
                seq <= group.ack_floor || (seq <= group.delivered && group.unacknowledged == 0)
            })
    }
}

/// Records every abandoned event as failed; returns how many.
///
/// # Errors
/// Backend failures reading the bucket or the server's state.
pub(crate) async fn sweep(shared: &Shared) -> Result<usize, ProviderError> {
    let candidates: Vec<Record> = shared
        .store
        .scan_records()
        .await?
        .into_iter()
        .filter(|record| record.seq.is_some() && !record.event.status.is_finished())
        .collect();
    if candidates.is_empty() {
        return Ok(0);
    }
    // The compare-and-set re-checks each record as it is by then: an outcome recorded
    // meanwhile (always written before its message is settled) makes it finished, and a
    // re-run changes its sequence.
    let evidence = Evidence::gather(shared).await?;
    let mut failed = 0;
    for candidate in candidates
        .iter()
        .filter(|record| evidence.abandoned(record))
    {
        let id = &candidate.event.id;
        let result = shared
            .store
            .modify(id, |record| {
                if record.seq != candidate.seq || !evidence.abandoned(record) {
                    return Err(ProviderError::InvalidState {
                        id: id.clone(),
                        status: record.event.status,
                        reason: "it moved on while being swept",
                    });
                }
                record.claims.clear();
                record.event.status = EventStatus::Failed;
                record.event.error = Some(ABANDONED.into());
                record.event.completed_at = Some(Utc::now());
                Ok(())
            })
            .await;
        match result {
            Ok(_) => {
                tracing::warn!(event_id = %id, "recorded an abandoned event as failed");
                failed += 1;
            }
            Err(ProviderError::InvalidState { .. } | ProviderError::NotFound(_)) => {}
            Err(error) => return Err(error),
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
    use crate::event::{Event, EventSource};

    fn record(status: EventStatus, seq: Option<u64>) -> Record {
        let mut event = Event::new(EventSource::System, "a.b", "test");
        event.status = status;
        Record::new(event, seq)
    }

    fn group(ack_floor: u64, delivered: u64, unacknowledged: usize) -> GroupProgress {
        GroupProgress {
            ack_floor,
            delivered,
            unacknowledged,
        }
    }

    #[test]
    fn only_what_the_server_proves_settled_is_abandoned() {
        let evidence = |first, groups| Evidence { first, groups };
        let processing = record(EventStatus::Processing, Some(5));
        // Every group acknowledged up to it, or delivered it and holds nothing.
        assert!(evidence(Some(1), vec![group(5, 9, 3), group(0, 7, 0)]).abandoned(&processing));
        // One group still may deliver it, or holds messages in flight.
        assert!(!evidence(Some(1), vec![group(5, 9, 0), group(4, 4, 0)]).abandoned(&processing));
        assert!(!evidence(Some(1), vec![group(4, 9, 1)]).abandoned(&processing));
        // No group yet: one joining later delivers it.
        assert!(!evidence(Some(1), Vec::new()).abandoned(&processing));
        // Gone from the stream.
        assert!(evidence(Some(6), vec![group(0, 0, 1)]).abandoned(&processing));
        assert!(evidence(None, Vec::new()).abandoned(&processing));
        // Finished, or stored without a message: never.
        let all_settled = evidence(Some(1), vec![group(9, 9, 0)]);
        assert!(!all_settled.abandoned(&record(EventStatus::Failed, Some(5))));
        assert!(!all_settled.abandoned(&record(EventStatus::Pending, None)));
    }
}
