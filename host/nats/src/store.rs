//! The state store: a JetStream key-value bucket holding each event's [`Record`] (the event as
//! published, and per consumer group its state, its current run and the delivery that owns it)
//! as JSON, keyed by the (encoded) event id.
//!
//! - `create` is atomic: it fails if a live entry with that id exists (duplicates).
//! - Every change is a compare-and-set on the entry's revision ([`StateStore::modify`]):
//!   a concurrent writer makes the loser re-read and re-apply, so no update is lost and
//!   checks such as "requeue only finished events" hold atomically.
//! - `scan` reads the latest value of every key through one ephemeral pull consumer
//!   (`last_per_subject`, no acknowledgements), in batches, without one round trip per key.
//!   Its cost is proportional to the number of stored events, bounded by `max_age`.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use async_nats::jetstream::stream::StorageType;
use bytes::Bytes;

use super::NAME;
use super::record::Record;
use super::scan::Scan;
use super::subjects::encode_name;
use eventbroker::event::Event;
use eventbroker::provider::ProviderError;

/// How often a compare-and-set is retried under contention before giving up.
const MAX_CAS_ATTEMPTS: usize = 32;
/// The key-value bucket of event states.
#[derive(Clone)]
pub(crate) struct StateStore {
    kv: kv::Store,
}

/// See [`StateStore::lookup`].
pub(crate) enum Lookup {
    /// The event's current record.
    Live(Box<Versioned>),
    /// A delete marker at `revision`: written by earlier versions when a publish failed and
    /// its state was taken back.
    TakenBack { revision: u64 },
    /// Deleted by a user (a purge marker).
    Deleted,
    /// No entry at all: never stored, or expired.
    Missing,
}

/// A record read together with its revision.
#[derive(Clone)]
pub(crate) struct Versioned {
    pub record: Record,
    pub revision: u64,
}

fn backend(error: impl std::fmt::Display) -> ProviderError {
    ProviderError::backend(NAME, error)
}

/// The JSON of an event as published (the payload of its messages).
pub(crate) fn encode(event: &Event) -> Result<Bytes, ProviderError> {
    serde_json::to_vec(event)
        .map(Bytes::from)
        .map_err(|e| backend(format!("cannot encode event {}: {e}", event.id)))
}

impl StateStore {
    /// Creates the bucket, or updates its settings if it exists ([`crate::buckets::open_kv`]).
    pub(crate) async fn open(
        context: &jetstream::Context,
        bucket: &str,
        storage: StorageType,
        max_age: Duration,
    ) -> Result<Self, ProviderError> {
        let kv = crate::buckets::open_kv(
            context,
            bucket,
            "eventbroker: current state of each event, keyed by event id",
            storage,
            max_age,
        )
        .await
        .map_err(backend)?;
        Ok(StateStore { kv })
    }

    /// Stores a new record; returns its revision.
    ///
    /// # Errors
    /// [`ProviderError::Duplicate`] when a live entry with this id exists.
    pub(crate) async fn create(&self, record: &Record) -> Result<u64, ProviderError> {
        let id = &record.event.id;
        match self.kv.create(encode_name(id), record.encode()?).await {
            Ok(revision) => Ok(revision),
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {
                Err(ProviderError::Duplicate(id.clone()))
            }
            Err(e) => Err(backend(format!("cannot store event {id}: {e}"))),
        }
    }

    /// The current record of an event, if it exists.
    pub(crate) async fn get(&self, id: &str) -> Result<Option<Versioned>, ProviderError> {
        match self.lookup(id).await? {
            Lookup::Live(current) => Ok(Some(*current)),
            _ => Ok(None),
        }
    }

    /// What the bucket holds for an id: a record, a delete marker (a publish of an earlier
    /// version that was taken back), a purge marker (deleted), or nothing.
    pub(crate) async fn lookup(&self, id: &str) -> Result<Lookup, ProviderError> {
        let entry = self
            .kv
            .entry(encode_name(id))
            .await
            .map_err(|e| backend(format!("cannot read event {id}: {e}")))?;
        Ok(match entry {
            Some(entry) if entry.operation == Operation::Put => Lookup::Live(Box::new(Versioned {
                record: Record::decode(&entry.value)?,
                revision: entry.revision,
            })),
            Some(entry) if entry.operation == Operation::Delete => Lookup::TakenBack {
                revision: entry.revision,
            },
            Some(_) => Lookup::Deleted,
            None => Lookup::Missing,
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
            match self.kv.update(&key, record.encode()?, revision).await {
                Ok(revision) => return Ok(Versioned { record, revision }),
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(backend(format!("cannot update event {id}: {e}"))),
            }
        }
        Err(backend(format!(
            "event {id} changed {MAX_CAS_ATTEMPTS} times while being updated; giving up"
        )))
    }

    /// [`Self::modify`], starting from `known` (a record read or written earlier, with its
    /// revision) instead of reading it: one round trip when nothing changed the record since,
    /// and [`Self::modify`]'s read-and-retry when something did. `change` may run twice; what
    /// it says about the known copy (an error included) counts only if the write from that
    /// copy succeeds, otherwise the record is read and `change` decides on it.
    ///
    /// # Errors
    /// As [`Self::modify`].
    pub(crate) async fn modify_from<F>(
        &self,
        id: &str,
        known: Option<Versioned>,
        mut change: F,
    ) -> Result<Versioned, ProviderError>
    where
        F: FnMut(&mut Record) -> Result<(), ProviderError>,
    {
        if let Some(Versioned {
            mut record,
            revision,
        }) = known
            && change(&mut record).is_ok()
        {
            match self
                .kv
                .update(encode_name(id), record.encode()?, revision)
                .await
            {
                Ok(revision) => return Ok(Versioned { record, revision }),
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => {}
                Err(e) => return Err(backend(format!("cannot update event {id}: {e}"))),
            }
        }
        self.modify(id, change).await
    }

    /// Writes `record` if the entry is still at `revision` (which may be a delete marker);
    /// returns the new revision.
    ///
    /// # Errors
    /// [`ProviderError::Backend`] when the entry changed since (or the server failed).
    pub(crate) async fn replace(
        &self,
        record: &Record,
        revision: u64,
    ) -> Result<u64, ProviderError> {
        let id = &record.event.id;
        self.kv
            .update(encode_name(id), record.encode()?, revision)
            .await
            .map_err(|e| backend(format!("cannot write event {id}: {e}")))
    }

    /// Removes an event and its history; returns whether it existed.
    pub(crate) async fn delete(&self, id: &str) -> Result<bool, ProviderError> {
        let Some(current) = self.get(id).await? else {
            return Ok(false);
        };
        self.remove(id, Some(current.revision)).await?;
        Ok(true)
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

    /// Every stored record, in the order of their last change, handed to `visit` one at a time
    /// (the scan itself holds one batch of messages, never every record).
    pub(crate) async fn scan(&self, mut visit: impl FnMut(Record)) -> Result<(), ProviderError> {
        let every_state = Scan {
            what: "event states",
            filter: format!("{}>", self.kv.prefix),
            headers_only: false,
        };
        crate::scan::scan(&self.kv, every_state, |_, message| {
            if message.payload.is_empty() {
                return Ok(());
            }
            match Record::decode(&message.payload) {
                Ok(record) => visit(record),
                Err(error) => {
                    tracing::warn!(subject = %message.subject, %error, "skipping an unreadable event state")
                }
            }
            Ok(())
        })
        .await
        .map_err(backend)
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
