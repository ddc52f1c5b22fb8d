//! Storage and delivery backends.
//!
//! A [`Provider`] stores events, answers queries about them and delivers them to work-sharing
//! [`Consumer`]s (at least once, acknowledged only after the broker finished with an event) and
//! to fan-out watchers ([`Provider::stream`]). This crate has the in-process backend
//! ([`MemoryProvider`]); the durable ones are crates of their own (`eventbroker-sql`,
//! `eventbroker-redis`, `eventbroker-nats`), and the service maps the configured provider name
//! to one of them.
//!
//! Every consumer group receives every event and keeps its own processing state of it
//! ([`GroupState`]: status, error, retry count, handler outcomes, times). A consumer reads and
//! writes its own group's state; the provider's queries (`get`, `list`, `stats`, watchers) and
//! writes outside a delivery (`update_status`, `requeue`) concern the provider's own group
//! ([`Provider::group`]: the configured `event_broker.consumer_group`, for Redis
//! `redis.consumer_group`), the group this host's workers join.
//!
//! # Examples
//! Implementing a provider: one that counts what it stores and delegates the rest to the
//! memory provider. A backend of its own implements the same methods on its storage (and its
//! [`Consumer`]), keeping state per consumer group with [`GroupState`] and counting activity
//! with [`Counters`]; the conformance cases of `eventbroker-testkit` then check it.
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use eventbroker::provider::{
//!     async_trait, Consumer, ConsumerOptions, EventFilter, EventStream, MemoryProvider,
//!     Provider, ProviderError, ProviderFeatures, ProviderStats, StatusUpdate,
//! };
//! use eventbroker::{Broker, BrokerConfig, Event, EventSource, Pattern};
//!
//! struct Counting {
//!     inner: MemoryProvider,
//!     stored: AtomicU64,
//! }
//!
//! #[async_trait]
//! impl Provider for Counting {
//!     fn name(&self) -> &'static str { "counting" }
//!     fn group(&self) -> &str { self.inner.group() }
//!     fn features(&self) -> ProviderFeatures { self.inner.features() }
//!     async fn publish(&self, event: &Event) -> Result<(), ProviderError> {
//!         self.inner.publish(event).await?;
//!         self.stored.fetch_add(1, Ordering::Relaxed);
//!         Ok(())
//!     }
//!     async fn get(&self, id: &str) -> Result<Option<Event>, ProviderError> { self.inner.get(id).await }
//!     async fn list(&self, filter: &EventFilter) -> Result<Vec<Event>, ProviderError> { self.inner.list(filter).await }
//!     async fn update_status(&self, id: &str, update: &StatusUpdate) -> Result<(), ProviderError> {
//!         self.inner.update_status(id, update).await
//!     }
//!     async fn delete(&self, id: &str) -> Result<bool, ProviderError> { self.inner.delete(id).await }
//!     async fn requeue(&self, id: &str, update: &StatusUpdate) -> Result<(), ProviderError> {
//!         self.inner.requeue(id, update).await
//!     }
//!     async fn consume(&self, options: ConsumerOptions) -> Result<Arc<dyn Consumer>, ProviderError> {
//!         self.inner.consume(options).await
//!     }
//!     async fn stream(&self, pattern: &Pattern) -> Result<EventStream, ProviderError> { self.inner.stream(pattern).await }
//!     async fn stats(&self) -> Result<ProviderStats, ProviderError> { self.inner.stats().await }
//!     async fn ping(&self) -> Result<(), ProviderError> { self.inner.ping().await }
//!     async fn close(&self) { self.inner.close().await }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let provider = Arc::new(Counting { inner: MemoryProvider::default(), stored: AtomicU64::new(0) });
//! let broker = Broker::new(BrokerConfig::default(), provider.clone());
//! broker.start().await?;
//! broker.publish_sync(Event::new(EventSource::System, "demo.created", "host-1")).await?;
//! assert_eq!(provider.stored.load(Ordering::Relaxed), 1);
//! broker.stop().await?;
//! # Ok(())
//! # }
//! ```

mod counters;
mod filter;
pub mod memory;
mod state;
pub mod watch_buffer;

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::Stream;
use serde::{Deserialize, Serialize};

use crate::event::{Event, EventStatus, HandlerOutcome};
use crate::pattern::Pattern;

pub use async_trait::async_trait;
pub use counters::{Counters, WatcherGuard};
pub use filter::{EventFilter, SortOrder};
pub use memory::MemoryProvider;
pub use state::{GroupState, release_keeps, statuses_kept_by_release};

/// What a backend guarantees; the conformance suite tests exactly what is claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ProviderFeatures {
    /// Accepted events survive a restart of the host process.
    pub durable: bool,
    /// Several hosts sharing the backend share work and see each other's events.
    pub shared: bool,
    /// Several consumer groups each receive every event and keep their own processing state
    /// of it.
    pub consumer_groups: bool,
    /// A single consumer receives events in publish order (before any redelivery).
    pub ordered: bool,
}

/// A change of an event's processing state, written by the broker.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusUpdate {
    /// The new status.
    pub status: EventStatus,
    /// The error to record (`None` clears it).
    pub error: Option<String>,
    /// Retries so far.
    pub retry_count: u32,
    /// Per-handler outcomes so far.
    pub handlers: Vec<HandlerOutcome>,
    /// When processing last started.
    pub processed_at: Option<DateTime<Utc>>,
    /// When the event finished, for `completed` and `failed`.
    pub completed_at: Option<DateTime<Utc>>,
}

impl StatusUpdate {
    /// The update that marks `event` as being processed now, keeping its other fields.
    pub fn processing(event: &Event) -> Self {
        StatusUpdate {
            status: EventStatus::Processing,
            error: event.error.clone(),
            retry_count: event.retry_count,
            handlers: event.handlers.clone(),
            processed_at: Some(Utc::now()),
            completed_at: None,
        }
    }

    /// Writes this update into `event`.
    pub fn apply(&self, event: &mut Event) {
        event.status = self.status;
        event.error = self.error.clone();
        event.retry_count = self.retry_count;
        event.handlers = self.handlers.clone();
        event.processed_at = self.processed_at.or(event.processed_at);
        event.completed_at = self.completed_at;
    }
}

/// Counters and gauges a backend reports.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProviderStats {
    /// Backend name (`memory`, `database`, `redis`, `nats`).
    pub provider: String,
    /// Stored events by status (every status present, zero when none).
    pub by_status: BTreeMap<String, u64>,
    /// Events published through this provider instance.
    pub published: u64,
    /// Deliveries handed to consumers of this provider instance.
    pub consumed: u64,
    /// Deliveries acknowledged as finished.
    pub acknowledged: u64,
    /// Deliveries given back for redelivery.
    pub redelivered: u64,
    /// Open watchers ([`Provider::stream`]) still subscribed to the backend: a watcher cut
    /// for falling behind stops counting at once, before its reader drains it.
    pub subscribers: u64,
    /// Open consumers.
    pub consumers: u64,
    /// Backend-specific values.
    pub backend: BTreeMap<String, serde_json::Value>,
}

impl ProviderStats {
    /// Stats of backend `provider` with every status present at zero and no counters yet.
    pub fn empty(provider: &str) -> Self {
        ProviderStats {
            provider: provider.to_owned(),
            by_status: EventStatus::ALL
                .iter()
                .map(|status| (status.as_str().to_owned(), 0))
                .collect(),
            ..ProviderStats::default()
        }
    }
}

/// How a consumer joins its group.
#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    /// Consumer group: consumers of one group share the work; each group receives every event
    /// and keeps its own processing state of it.
    pub group: String,
    /// This consumer's name, unique within the group (host instance id plus a suffix).
    pub name: String,
    /// Deliveries not acknowledged within this time are redelivered (the consumer is presumed
    /// dead). [`Consumer::keep_alive`] extends it.
    pub lease: Duration,
}

/// One event handed to one consumer, to be acknowledged exactly once.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The event in its group's state, with the per-handler outcomes of the group's earlier
    /// attempts.
    pub event: Event,
    /// Backend-specific handle for acknowledgement.
    pub token: String,
    /// How many times this event has been delivered to this group, this one included.
    pub delivery_count: u32,
    /// The provider recorded `processing` (and the processing time) in the group's state when
    /// it handed out this delivery, in the same step as the claim, and `event` shows that
    /// state: the broker does not write the mark again. When `false` the broker records it
    /// with [`Provider::update_status`] before running handlers.
    pub processing_recorded: bool,
}

/// A work-sharing consumer: each event is delivered to one consumer of the group at a time
/// and redelivered until acknowledged with [`Consumer::complete`].
#[async_trait]
pub trait Consumer: Send + Sync {
    /// Waits until at least one delivery is available and returns up to `max` of them.
    /// Returns an empty batch once the consumer or its provider is closed.
    ///
    /// # Errors
    /// A backend failure; the caller may call `fetch` again after a pause.
    async fn fetch(&self, max: usize) -> Result<Vec<Delivery>, ProviderError>;

    /// Records the final state (`completed` or `failed`) of the consumer's group and
    /// acknowledges the delivery, atomically where the backend allows.
    ///
    /// # Errors
    /// A backend failure; the delivery will then be redelivered after its lease.
    async fn complete(
        &self,
        delivery: &Delivery,
        update: &StatusUpdate,
    ) -> Result<(), ProviderError>;

    /// Records the final states of several deliveries and acknowledges them, each exactly as
    /// [`Consumer::complete`] would, in as few round trips (or lock acquisitions) as the
    /// backend allows. Returns one result per item, in the order given: an item that fails
    /// does not fail the others. The default runs `complete` for every item concurrently.
    async fn complete_batch(
        &self,
        items: &[(&Delivery, &StatusUpdate)],
    ) -> Vec<Result<(), ProviderError>> {
        futures::future::join_all(
            items
                .iter()
                .map(|(delivery, update)| self.complete(delivery, update)),
        )
        .await
    }

    /// Records the update of the consumer's group (normally `pending` with the retry count and
    /// outcomes) and makes the event deliverable to the group again after `delay`.
    ///
    /// # Errors
    /// A backend failure; the delivery will then be redelivered after its lease.
    async fn retry(
        &self,
        delivery: &Delivery,
        update: &StatusUpdate,
        delay: Duration,
    ) -> Result<(), ProviderError>;

    /// Gives the delivery back unprocessed (shutdown): it is redelivered as soon as possible
    /// and its status in the consumer's group returns to `pending`.
    ///
    /// # Errors
    /// A backend failure; the delivery will then be redelivered after its lease.
    async fn release(&self, delivery: &Delivery) -> Result<(), ProviderError>;

    /// Extends the lease of a delivery whose processing is still running.
    ///
    /// # Errors
    /// A backend failure.
    async fn keep_alive(&self, delivery: &Delivery) -> Result<(), ProviderError>;

    /// Stops this consumer: a pending `fetch` returns an empty batch. Unacknowledged
    /// deliveries are redelivered to other consumers. Idempotent.
    async fn close(&self);
}

/// One item of a watcher stream.
pub type WatchItem = Result<Event, ProviderError>;
/// A fan-out stream of events (as published, and again at each status change).
pub type EventStream = Pin<Box<dyn Stream<Item = WatchItem> + Send>>;

/// A storage and delivery backend.
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// Backend name as used in config.
    fn name(&self) -> &'static str;

    /// The provider's own consumer group: the group whose processing state `get`, `list`,
    /// `stats`, `update_status`, `requeue` and watchers show or change (the configured
    /// `event_broker.consumer_group`; Redis: `redis.consumer_group`).
    fn group(&self) -> &str;

    /// What the backend guarantees.
    fn features(&self) -> ProviderFeatures;

    /// Stores an event and makes it deliverable to every consumer group and watcher.
    ///
    /// # Errors
    /// [`ProviderError::Duplicate`] if the id exists; [`ProviderError::Full`] when the backend
    /// cannot take more work; backend failures.
    async fn publish(&self, event: &Event) -> Result<(), ProviderError>;

    /// One event by id, in the state of the provider's own group ([`Provider::group`]).
    ///
    /// # Errors
    /// Backend failures; a missing event is `Ok(None)`.
    async fn get(&self, id: &str) -> Result<Option<Event>, ProviderError>;

    /// Events matching the filter (its `status` is the own group's status), in the own group's
    /// state, ordered and paginated as the filter says.
    ///
    /// # Errors
    /// Backend failures.
    async fn list(&self, filter: &EventFilter) -> Result<Vec<Event>, ProviderError>;

    /// Writes a status change of the own group (outside of a delivery, e.g. sync mode). Other
    /// groups' states are left alone.
    ///
    /// # Errors
    /// [`ProviderError::NotFound`] if no such event; backend failures.
    async fn update_status(&self, id: &str, update: &StatusUpdate) -> Result<(), ProviderError>;

    /// Deletes an event; returns whether it existed.
    ///
    /// # Errors
    /// Backend failures.
    async fn delete(&self, id: &str) -> Result<bool, ProviderError>;

    /// Makes an event deliverable again to the own group at once, after applying `update` to
    /// that group's state (status `pending`, per-handler outcomes prepared by the broker so
    /// that handlers that succeeded are not re-run). Other groups are not affected.
    ///
    /// Accepted when the own group finished the event, and also when its processing is provably
    /// abandoned: `pending` or `processing` with no live lease (the lease expired and the
    /// delivery was not taken again, or there is no delivery at all). The check and the requeue
    /// are atomic, and an expired lease is revoked, so a requeue never makes a second delivery
    /// run next to a live one. (NATS: a delivery's lease is its claim, renewed by
    /// `keep_alive`; events stored without a message, in sync mode, are accepted once
    /// finished only.)
    ///
    /// # Errors
    /// [`ProviderError::NotFound`]; [`ProviderError::InvalidState`] if a consumer of the own
    /// group holds a live lease on it.
    async fn requeue(&self, id: &str, update: &StatusUpdate) -> Result<(), ProviderError>;

    /// Joins a consumer group.
    ///
    /// # Errors
    /// Backend failures, or [`ProviderError::Closed`].
    async fn consume(&self, options: ConsumerOptions) -> Result<Arc<dyn Consumer>, ProviderError>;

    /// A live fan-out stream of events matching `pattern`: each as published and again at each
    /// change of the own group's state (in that state). A watcher holds at most the backend's
    /// `watcher_buffer` undelivered events: one that falls further behind is cut at once (its
    /// backend subscription is released), receives what was buffered, then
    /// [`ProviderError::Lagged`], and its stream ends. Events are never dropped silently.
    ///
    /// # Errors
    /// Backend failures, or [`ProviderError::Closed`].
    async fn stream(&self, pattern: &Pattern) -> Result<EventStream, ProviderError>;

    /// Counters and gauges; `by_status` counts the own group's states. May cost a scan of
    /// stored events on some backends; use
    /// [`Provider::ping`] to check reachability.
    ///
    /// # Errors
    /// Backend failures.
    async fn stats(&self) -> Result<ProviderStats, ProviderError>;

    /// Checks that the backend answers, at the cost of at most one cheap round trip (used by
    /// `/readyz`).
    ///
    /// # Errors
    /// [`ProviderError::Closed`] after [`Provider::close`]; the backend's failure when it
    /// cannot be reached.
    async fn ping(&self) -> Result<(), ProviderError>;

    /// Closes the provider: open consumers and streams end. Idempotent.
    async fn close(&self);

    /// The store where a cluster sharing this backend keeps its handlers, on the backend's
    /// existing connections; `None` (the default) for backends a cluster cannot share
    /// (memory, SQLite), whose hosts keep handlers in their own directory.
    fn handler_store(&self) -> Option<std::sync::Arc<dyn crate::handler_store::HandlerStore>> {
        None
    }

    /// The key-value store that handlers granted `[keyvalue]` keep their state in, on the
    /// backend's existing connections, shared by every host using the backend; `None` (the
    /// default) when the backend offers none, in which case such handlers are refused at load.
    fn keyvalue(&self) -> Option<std::sync::Arc<dyn crate::keyvalue::KeyValueStore>> {
        None
    }
}

/// Errors of the provider boundary.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    /// An event with this id is already stored.
    #[error("an event with id {0:?} already exists")]
    Duplicate(String),
    /// No event with this id.
    #[error("no event with id {0:?}")]
    NotFound(String),
    /// The operation does not apply to the event's current state.
    #[error("event {id:?} is {status}: {reason}")]
    InvalidState {
        /// The event id.
        id: String,
        /// Its current status.
        status: EventStatus,
        /// Why the operation does not apply.
        reason: &'static str,
    },
    /// The backend cannot take more work right now.
    #[error("{0}")]
    Full(String),
    /// The provider (or consumer) was closed.
    #[error("provider is closed")]
    Closed,
    /// A watcher fell too far behind and missed events.
    #[error("watcher fell behind and missed {0} events; reconnect to continue")]
    Lagged(u64),
    /// The backend's configuration is invalid.
    #[error("invalid {provider} configuration: {reason}")]
    Config {
        /// Backend name.
        provider: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The backend failed or could not be reached.
    #[error("{provider} backend error: {message}")]
    Backend {
        /// Backend name.
        provider: &'static str,
        /// What failed.
        message: String,
    },
}

impl ProviderError {
    /// A configuration error of `provider`: the key out of range and why.
    pub fn invalid(provider: &'static str, error: crate::config::InvalidValue) -> Self {
        ProviderError::Config {
            provider,
            reason: format!("{} {}", error.key, error.reason),
        }
    }

    /// A backend failure of `provider`, from any displayable error.
    pub fn backend(provider: &'static str, error: impl std::fmt::Display) -> Self {
        ProviderError::Backend {
            provider,
            message: error.to_string(),
        }
    }
}
