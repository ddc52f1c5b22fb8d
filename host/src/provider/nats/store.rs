//! The state store: a JetStream key-value bucket holding each event's current state as its
//! JSON, keyed by the (encoded) event id.
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
use async_nats::jetstream::consumer::{self, AckPolicy, DeliverPolicy};
use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use async_nats::jetstream::stream::{self, StorageType};
use bytes::Bytes;
use futures::StreamExt;

use super::NAME;
use super::subjects::encode_name;
use crate::event::Event;
use crate::provider::ProviderError;

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

/// An event state read together with its revision.
pub(crate) struct Versioned {
    pub event: Event,
    pub revision: u64,
}

fn backend(error: impl std::fmt::Display) -> ProviderError {
    ProviderError::backend(NAME, error)
}

fn decode(value: &[u8]) -> Result<Event, ProviderError> {
    serde_json::from_slice(value)
        .map_err(|e| backend(format!("stored event state is not valid JSON: {e}")))
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
        match self.kv.create(&key, encode(event)?).await {
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
                event: decode(&entry.value)?,
                revision: entry.revision,
            })),
            _ => Ok(None),
        }
    }

    /// Reads the event, lets `change` edit it and writes it back if the revision is still the
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
        F: FnMut(&mut Event) -> Result<(), ProviderError>,
    {
        let key = encode_name(id);
        for _ in 0..MAX_CAS_ATTEMPTS {
            let Some(Versioned {
                mut event,
                revision,
            }) = self.get(id).await?
            else {
                return Err(ProviderError::NotFound(id.to_owned()));
            };
            change(&mut event)?;
            match self.kv.update(&key, encode(&event)?, revision).await {
                Ok(revision) => return Ok(Versioned { event, revision }),
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(backend(format!("cannot update event {id}: {e}"))),
            }
        }
        Err(backend(format!(
            "event {id} changed {MAX_CAS_ATTEMPTS} times while being updated; giving up"
        )))
    }

    /// Writes `event` if the entry is still at `revision`; returns the new revision.
    pub(crate) async fn restore(&self, event: &Event, revision: u64) -> Result<u64, ProviderError> {
        self.kv
            .update(encode_name(&event.id), encode(event)?, revision)
            .await
            .map_err(|e| backend(format!("cannot restore event {}: {e}", event.id)))
    }

    /// Removes the state a failed publish created, if it is still at `revision`. When the
    /// server cannot be reached, keeps trying in the background for a while; a later publish
    /// of the same event that takes the state over changes its revision and so stops that.
    pub(crate) async fn undo_create(&self, id: &str, revision: u64) {
        if self.remove(id, Some(revision)).await.is_ok() {
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
                        if store.remove(&id, Some(revision)).await.is_ok() {
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

    /// Every stored event (latest state), in the order of their last change.
    pub(crate) async fn scan(&self) -> Result<Vec<Event>, ProviderError> {
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

    async fn drain(&self, consumer: &consumer::PullConsumer) -> Result<Vec<Event>, ProviderError> {
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
                match decode(&message.payload) {
                    Ok(event) => events.push(event),
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
