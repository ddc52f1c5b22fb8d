//! The state store: a JetStream key-value bucket holding one [`Record`] per event as JSON,
//! keyed by the (encoded) event id: the event as published (its state fields are the state
//! every consumer group starts from) and the state of each group that changed it. Values
//! written before group states existed are a bare event, read as a record without groups.
//!
//! - `create` is atomic: it fails if a live entry with that id exists (duplicates).
//! - Every change is a compare-and-set on the entry's revision ([`StateStore::modify`]):
//!   a concurrent writer makes the loser re-read and re-apply, so no update is lost and
//!   checks such as "requeue only finished events" hold atomically.
//! - `scan` reads the latest value of every key through one ephemeral pull consumer
//!   (`last_per_subject`, no acknowledgements), in batches, without one round trip per key.
//!   Its cost is proportional to the number of stored events, bounded by `max_age`.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::consumer::{self, AckPolicy, DeliverPolicy};
use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use async_nats::jetstream::stream::{self, StorageType};
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::NAME;
use super::subjects::encode_name;
use crate::event::Event;
use crate::provider::{GroupState, ProviderError};

/// How often a compare-and-set is retried under contention before giving up.
const MAX_CAS_ATTEMPTS: usize = 32;
/// How long the clean-up of a failed publish keeps trying.
const UNDO_PATIENCE: Duration = Duration::from_secs(120);
/// Values fetched per request while scanning.
const SCAN_BATCH: usize = 1000;

/// The key-value bucket of event states.
#[derive(Clone)]
pub(crate) struct StateStore {
    kv: kv::Store,
}

/// See [`StateStore::lookup`].
pub(crate) enum Lookup {
    /// The event's current state.
    Live(Box<Versioned>),
    /// A publish failed and its state was taken back (a delete marker at `revision`).
    TakenBack { revision: u64 },
    /// Deleted, expired or never stored.
    Absent,
}

/// What the bucket holds for one event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Record {
    /// The event as published or stored; its state is every group's starting state.
    pub event: Event,
    /// The states of the groups that changed it, by group name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub groups: BTreeMap<String, GroupState>,
    /// The group whose state the last write changed (`None`: the event as stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed: Option<String>,
}

impl Record {
    /// The record of a newly stored event.
    pub(crate) fn new(event: Event) -> Self {
        Record {
            event,
            groups: BTreeMap::new(),
            changed: None,
        }
    }

    /// `group`'s state of the event.
    pub(crate) fn state(&self, group: &str) -> GroupState {
        self.groups
            .get(group)
            .cloned()
            .unwrap_or_else(|| GroupState::of(&self.event))
    }

    /// The event as `group` sees it.
    pub(crate) fn view(&self, group: &str) -> Event {
        match self.groups.get(group) {
            Some(state) => state.view(&self.event),
            None => self.event.clone(),
        }
    }

    /// Changes `group`'s state and records that it changed.
    pub(crate) fn change(&mut self, group: &str, change: impl FnOnce(&mut GroupState)) {
        let mut state = self.state(group);
        change(&mut state);
        self.groups.insert(group.to_owned(), state);
        self.changed = Some(group.to_owned());
    }
}

/// A record read together with its revision.
pub(crate) struct Versioned {
    pub record: Record,
    pub revision: u64,
}

fn backend(error: impl std::fmt::Display) -> ProviderError {
    ProviderError::backend(NAME, error)
}

/// Reads a stored value: a record, or a bare event written before group states existed.
pub(crate) fn decode_record(value: &[u8]) -> Result<Record, ProviderError> {
    match serde_json::from_slice::<Record>(value) {
        Ok(record) => Ok(record),
        Err(_) => serde_json::from_slice::<Event>(value)
            .map(Record::new)
            .map_err(|e| backend(format!("stored event state is not valid JSON: {e}"))),
    }
}

fn encode_record(record: &Record) -> Result<Bytes, ProviderError> {
    serde_json::to_vec(record)
        .map(Bytes::from)
        .map_err(|e| backend(format!("cannot encode event {}: {e}", record.event.id)))
}

pub(crate) fn encode(event: &Event) -> Result<Bytes, ProviderError> {
    serde_json::to_vec(event)
        .map(Bytes::from)
        .map_err(|e| backend(format!("cannot encode event {}: {e}", event.id)))
}

impl StateStore {
    /// Creates the bucket, or updates its settings if it exists.
    ///
    /// The bucket's stream (`KV_{bucket}`) is written with the settings the client library
    /// uses for buckets (one value per key, roll-ups allowed, direct gets), directly rather
    /// than through the library's bucket creation, which needs an account query that servers
    /// before 2.10 answer in a form the library cannot read.
    pub(crate) async fn open(
        context: &jetstream::Context,
        bucket: &str,
        storage: StorageType,
        max_age: Duration,
    ) -> Result<Self, ProviderError> {
        context
            .create_or_update_stream(stream::Config {
                name: format!("KV_{bucket}"),
                description: Some(
                    "eventbroker: current state of each event, keyed by event id".into(),
                ),
                subjects: vec![format!("$KV.{bucket}.>")],
                max_messages_per_subject: 1,
                max_age,
                storage,
                allow_rollup: true,
                deny_delete: true,
                deny_purge: false,
                allow_direct: true,
                num_replicas: 1,
                discard: stream::DiscardPolicy::New,
                ..stream::Config::default()
            })
            .await
            .map_err(|e| {
                backend(format!(
                    "cannot create or update key-value bucket {bucket:?}: {e}"
                ))
            })?;
        let kv = context
            .get_key_value(bucket)
            .await
            .map_err(|e| backend(format!("cannot open key-value bucket {bucket:?}: {e}")))?;
        Ok(StateStore { kv })
    }

    /// Stores a new event.
    ///
    /// # Errors
    /// [`ProviderError::Duplicate`] when a live entry with this id exists.
    pub(crate) async fn create(&self, event: &Event) -> Result<u64, ProviderError> {
        let key = encode_name(&event.id);
        match self
            .kv
            .create(&key, encode_record(&Record::new(event.clone()))?)
            .await
        {
            Ok(revision) => Ok(revision),
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {
                Err(ProviderError::Duplicate(event.id.clone()))
            }
            Err(e) => Err(backend(format!("cannot store event {}: {e}", event.id))),
        }
    }

    /// The current state of an event, if it exists.
    pub(crate) async fn get(&self, id: &str) -> Result<Option<Versioned>, ProviderError> {
        let entry = self
            .kv
            .entry(encode_name(id))
            .await
            .map_err(|e| backend(format!("cannot read event {id}: {e}")))?;
        match entry {
            Some(entry) if entry.operation == Operation::Put => Ok(Some(Versioned {
                record: decode_record(&entry.value)?,
                revision: entry.revision,
            })),
            _ => Ok(None),
        }
    }

    /// What the bucket holds for an id, telling a publish that was taken back (a delete
    /// marker, written only by [`StateStore::undo_create`]) from a deleted or unknown event
    /// (a purge marker, or nothing).
    pub(crate) async fn lookup(&self, id: &str) -> Result<Lookup, ProviderError> {
        let entry = self
            .kv
            .entry(encode_name(id))
            .await
            .map_err(|e| backend(format!("cannot read event {id}: {e}")))?;
        Ok(match entry {
            Some(entry) if entry.operation == Operation::Put => Lookup::Live(Box::new(Versioned {
                record: decode_record(&entry.value)?,
                revision: entry.revision,
            })),
            Some(entry) if entry.operation == Operation::Delete => Lookup::TakenBack {
                revision: entry.revision,
            },
            _ => Lookup::Absent,
        })
    }

    /// Reads the record, lets `change` edit it and writes it back if the revision is still the
    /// one read; repeats on conflict. `change` may refuse with an error, which is returned.
    ///
    /// # Errors
    /// [`ProviderError::NotFound`] if the event does not exist; `change`'s error; backend
    /// failures, including persistent contention.
    pub(crate) async fn modify<F>(
        &self,
        id: &str,
        mut change: F,
    ) -> Result<Versioned, ProviderError>
    where
        F: FnMut(&mut Record) -> Result<(), ProviderError>,
    {
        let key = encode_name(id);
        for _ in 0..MAX_CAS_ATTEMPTS {
            let Some(Versioned {
                mut record,
                revision,
            }) = self.get(id).await?
            else {
                return Err(ProviderError::NotFound(id.to_owned()));
            };
            change(&mut record)?;
            match self
                .kv
                .update(&key, encode_record(&record)?, revision)
                .await
            {
                Ok(revision) => return Ok(Versioned { record, revision }),
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(backend(format!("cannot update event {id}: {e}"))),
            }
        }
        Err(backend(format!(
            "event {id} changed {MAX_CAS_ATTEMPTS} times while being updated; giving up"
        )))
    }

    /// Writes `record` if the entry is still at `revision`; returns the new revision.
    pub(crate) async fn restore(
        &self,
        record: &Record,
        revision: u64,
    ) -> Result<u64, ProviderError> {
        let id = &record.event.id;
        self.kv
            .update(encode_name(id), encode_record(record)?, revision)
            .await
            .map_err(|e| backend(format!("cannot restore event {id}: {e}")))
    }

    /// Removes the state a failed publish created, if it is still at `revision`. When the
    /// server cannot be reached, keeps trying in the background for a while; a later publish
    /// of the same event that takes the state over changes its revision and so stops that.
    pub(crate) async fn undo_create(&self, id: &str, revision: u64) {
        if self.take_back(id, revision).await.is_ok() {
            return;
        }
        let store = self.clone();
        let id = id.to_owned();
        let retry = async move {
            let deadline = tokio::time::Instant::now() + UNDO_PATIENCE;
            let mut pause = Duration::from_millis(100);
            while tokio::time::Instant::now() < deadline {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
                match store.get(&id).await {
                    Ok(Some(current)) if current.revision == revision => {
                        if store.take_back(&id, revision).await.is_ok() {
                            return;
                        }
                    }
                    Ok(_) => return,
                    Err(_) => {}
                }
            }
            tracing::warn!(event_id = %id, "could not remove the state of an event whose publish failed; it stays pending until published again or deleted");
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(retry);
        }
    }

    /// Removes an event and its history; returns whether it existed.
    pub(crate) async fn delete(&self, id: &str) -> Result<bool, ProviderError> {
        let Some(current) = self.get(id).await? else {
            return Ok(false);
        };
        self.remove(id, Some(current.revision)).await?;
        Ok(true)
    }

    /// Marks the state a failed publish created as taken back (a delete marker, unlike the
    /// purge of [`StateStore::delete`]), if it is still at `revision`.
    async fn take_back(&self, id: &str, revision: u64) -> Result<(), ProviderError> {
        self.kv
            .delete_expect_revision(encode_name(id), Some(revision))
            .await
            .map_err(|e| backend(format!("cannot take back event {id}: {e}")))
    }

    /// Removes the entry of `id`, only if still at `revision` when given.
    pub(crate) async fn remove(
        &self,
        id: &str,
        revision: Option<u64>,
    ) -> Result<(), ProviderError> {
        self.kv
            .purge_expect_revision(encode_name(id), revision)
            .await
            .map_err(|e| backend(format!("cannot delete event {id}: {e}")))
    }

    /// Every stored record (latest value), in the order of their last change.
    pub(crate) async fn scan(&self) -> Result<Vec<Record>, ProviderError> {
        let stream = &self.kv.stream;
        let consumer: consumer::PullConsumer = stream
            .create_consumer(consumer::pull::Config {
                description: Some("eventbroker list scan".into()),
                deliver_policy: DeliverPolicy::LastPerSubject,
                ack_policy: AckPolicy::None,
                filter_subject: format!("{}>", self.kv.prefix),
                inactive_threshold: Duration::from_secs(60),
                memory_storage: true,
                ..consumer::pull::Config::default()
            })
            .await
            .map_err(|e| backend(format!("cannot scan event states: {e}")))?;
        let result = self.drain(&consumer).await;
        let name = consumer.cached_info().name.clone();
        if let Err(error) = stream.delete_consumer(&name).await {
            tracing::debug!(%error, "could not delete a scan consumer; the server removes it when idle");
        }
        result
    }

    async fn drain(&self, consumer: &consumer::PullConsumer) -> Result<Vec<Record>, ProviderError> {
        let mut events = Vec::new();
        loop {
            let mut batch = consumer
                .fetch()
                .max_messages(SCAN_BATCH)
                .expires(Duration::from_secs(5))
                .messages()
                .await
                .map_err(|e| backend(format!("cannot scan event states: {e}")))?;
            let mut received = 0;
            while let Some(message) = batch.next().await {
                let message = message.map_err(|e| backend(format!("scan failed: {e}")))?;
                received += 1;
                let deleted = message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("KV-Operation"))
                    .is_some_and(|op| op.as_str() != "PUT");
                if deleted || message.payload.is_empty() {
                    continue;
                }
                match decode_record(&message.payload) {
                    Ok(record) => events.push(record),
                    Err(error) => {
                        tracing::warn!(subject = %message.subject, %error, "skipping an unreadable event state")
                    }
                }
            }
            if received < SCAN_BATCH {
                return Ok(events);
            }
        }
    }

    /// A live stream of changes (new ones only), for watchers.
    pub(crate) async fn watch(&self) -> Result<kv::Watch, ProviderError> {
        self.kv
            .watch_all()
            .await
            .map_err(|e| backend(format!("cannot watch event states: {e}")))
    }

    /// Deletes the bucket (tests and tear-down).
    pub(crate) async fn destroy(
        context: &jetstream::Context,
        bucket: &str,
    ) -> Result<(), ProviderError> {
        context
            .delete_key_value(bucket)
            .await
            .map(|_| ())
            .map_err(|e| backend(format!("cannot delete key-value bucket {bucket:?}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventSource, EventStatus};

    #[test]
    fn records_round_trip_and_a_bare_event_of_an_earlier_version_reads_as_one() {
        let mut event = Event::new(EventSource::System, "a.b", "h");
        let mut record = Record::new(event.clone());
        record.change("g", |state| state.status = EventStatus::Failed);
        let stored = encode_record(&record).expect("encode");
        assert_eq!(decode_record(&stored).expect("decode"), record);
        assert_eq!(record.view("g").status, EventStatus::Failed);
        assert_eq!(record.view("other").status, EventStatus::Pending);
        assert_eq!(record.changed.as_deref(), Some("g"));

        event.status = EventStatus::Completed;
        let legacy = encode(&event).expect("encode");
        let read = decode_record(&legacy).expect("a bare event");
        assert_eq!(read, Record::new(event));
        assert_eq!(read.state("any").status, EventStatus::Completed);
    }
}
