//! The broker: publish (sync or async), the subscription registry, the worker pool, retries,
//! dead letters, statuses, stats, and start/stop with drain.
//!
//! Data flow of an event: [`Broker::publish_async`] validates it and hands it to the
//! provider; the pool's reader pulls it from the provider's consumer group; a worker runs every
//! matching handler concurrently (`dispatch::run_handlers`); `dispatch::decide` — the one place
//! that decides — turns the outcomes into `completed`, `failed` (a dead letter) or a retry with
//! backoff; the consumer records that and acknowledges (or schedules the redelivery).
//!
//! # Sync mode
//!
//! There is one attempt loop, the worker pool's. [`Broker::publish_sync`] publishes exactly as
//! [`Broker::publish_async`] does and then only waits for the event's final state, so:
//!
//! - once `publish_sync` got past validation and queueing (it did not return
//!   [`BrokerError::Invalid`], [`BrokerError::NotRunning`], [`BrokerError::QueueFull`] or a
//!   provider error), the event is an ordinary accepted event: leases, keep-alive, retries with
//!   backoff, dead-lettering, rescue of a dead host's deliveries and redelivery after a restart
//!   apply to it as to any other, on every provider;
//! - the caller merely awaits: dropping the future (an HTTP client that gives up) changes
//!   nothing about the event's processing;
//! - it returns the event in its final state, `completed` or `failed`, after every retry its
//!   handlers' policies allow. The wait has no deadline of its own (handler timeouts and retry
//!   policies bound it); callers that want one wrap the call in a timeout;
//! - the final state is noticed at once when this broker records it, and by polling
//!   [`Provider::get`] with backoff (50 ms doubling up to 1 s) when another host of a cluster
//!   processed the event;
//! - if the broker stops before the event finishes, the call fails with
//!   [`BrokerError::StoppedBeforeFinished`]: the event keeps its stored state and is finished
//!   by whichever host consumes it next (on a durable provider; on the memory provider `stop`
//!   first drains until the deadline).

mod dispatch;
mod handler;
mod outstanding;
mod registry;
mod stats;
mod waiters;
mod worker;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::RwLock;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use handler::{
    CAUSATION_DEPTH_KEY, CAUSED_BY_HANDLER_KEY, CAUSED_BY_KEY, EventHandler, FnHandler,
    HandlerContext, HandlerResult, MAX_CAUSATION_DEPTH, derived_event_id, handler_fn,
};
pub use registry::{SubscribeOptions, SubscriptionId, SubscriptionStats};
pub use stats::{Activity, BrokerStats};

use crate::config::{BrokerConfig, InvalidValue, ProcessingMode};
use crate::event::{Event, EventStatus, ValidationError};
use crate::metrics::Metrics;
use crate::pattern::{Pattern, PatternError};
use crate::provider::{Provider, ProviderError, StatusUpdate};
use dispatch::Decision;
use outstanding::Outstanding;
use registry::{Registry, Subscription, SubscriptionCounters};
use stats::Counters;
use waiters::{Waiter, Waiters};
use worker::Pool;

/// First pause of a sync publish polling for a final state recorded by another host.
const SYNC_POLL_FIRST: Duration = Duration::from_millis(50);
/// Longest pause between those polls.
const SYNC_POLL_MAX: Duration = Duration::from_secs(1);

/// An event broker over one provider. Cheap to clone; clones share the broker.
///
/// Call [`Broker::start`] before publishing and [`Broker::stop`] when done: background tasks
/// run until `stop`.
///
/// # Examples
/// ```
/// use eventbroker::{handler_fn, Broker, BrokerConfig, Event, EventSource, MemoryProvider};
/// use std::sync::Arc;
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config = BrokerConfig::default();
/// let provider = Arc::new(MemoryProvider::default());
/// let broker = Broker::new(config, provider);
/// broker.subscribe("public.users.*", handler_fn(|_ctx, event| async move {
///     println!("user event {}", event.id);
///     Ok(())
/// }))?;
/// broker.start().await?;
/// let done = broker
///     .publish_sync(Event::new(EventSource::Database, "public.users.create", "host-1"))
///     .await?;
/// assert_eq!(done.status, eventbroker::EventStatus::Completed);
/// broker.stop().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

/// A handle that does not keep the broker alive (held by handler contexts).
#[derive(Clone)]
pub struct WeakBroker(Weak<Inner>);

impl WeakBroker {
    /// The broker, if it still exists.
    pub fn upgrade(&self) -> Option<Broker> {
        self.0.upgrade().map(|inner| Broker { inner })
    }
}

pub(crate) struct Inner {
    config: BrokerConfig,
    provider: Arc<dyn Provider>,
    registry: Registry,
    /// Publishes hold a read lock while they hand an event to the provider; start and stop
    /// take the write lock, so no publish straddles a state change.
    lifecycle: RwLock<Lifecycle>,
    counters: Counters,
    metrics: Arc<Metrics>,
    /// Events accepted by this broker and not finished (drain bookkeeping).
    outstanding: Outstanding,
    /// Sync publishes waiting for their events' final states.
    waiters: Waiters,
    /// Cancelled when `stop` has drained: sync publishes still waiting give up.
    stopped: CancellationToken,
}

enum Lifecycle {
    Created,
    Running(Pool),
    Stopping,
    Stopped,
}

impl Lifecycle {
    fn name(&self) -> &'static str {
        match self {
            Lifecycle::Created => "created",
            Lifecycle::Running(_) => "running",
            Lifecycle::Stopping => "stopping",
            Lifecycle::Stopped => "stopped",
        }
    }
}

/// What [`Broker::publish`] or [`Broker::publish_with_mode`] did, depending on the mode.
#[derive(Debug, Clone, PartialEq)]
pub enum Published {
    /// Async mode: the event was queued; this is its id.
    Queued(String),
    /// Sync mode: the event was processed; this is the event in its final state
    /// (`completed` or `failed`).
    Processed(Box<Event>),
}

impl Published {
    /// The event id.
    pub fn id(&self) -> &str {
        match self {
            Published::Queued(id) => id,
            Published::Processed(event) => &event.id,
        }
    }
}

/// How [`Broker::stop`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopReport {
    /// Whether everything finished before the deadline.
    pub drained: bool,
    /// Deliveries given back unfinished (redelivered later on durable providers).
    pub released: usize,
    /// Events accepted by this broker and not finished (lost on a non-durable provider).
    pub unfinished: i64,
}

impl Broker {
    /// A broker over `provider`, not yet started.
    pub fn new(config: BrokerConfig, provider: Arc<dyn Provider>) -> Self {
        Broker {
            inner: Arc::new(Inner {
                config,
                provider,
                registry: Registry::default(),
                lifecycle: RwLock::new(Lifecycle::Created),
                counters: Counters::default(),
                metrics: Arc::new(Metrics::new()),
                outstanding: Outstanding::default(),
                waiters: Waiters::default(),
                stopped: CancellationToken::new(),
            }),
        }
    }

    /// A handle that does not keep the broker alive.
    pub fn downgrade(&self) -> WeakBroker {
        WeakBroker(Arc::downgrade(&self.inner))
    }

    /// This host's instance id.
    pub fn instance_id(&self) -> &str {
        &self.inner.config.instance_id
    }

    /// The broker's configuration.
    pub fn config(&self) -> &BrokerConfig {
        &self.inner.config
    }

    /// The provider.
    pub fn provider(&self) -> &Arc<dyn Provider> {
        &self.inner.provider
    }

    /// The broker's Prometheus metrics (shared with the WebAssembly handlers of a host).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// Starts the worker pool.
    ///
    /// # Errors
    /// [`BrokerError::AlreadyRunning`], [`BrokerError::Stopped`] (a stopped broker cannot be
    /// restarted: its provider is closed), or the provider's error joining its consumer group.
    pub async fn start(&self) -> Result<(), BrokerError> {
        let mut lifecycle = self.inner.lifecycle.write().await;
        match &*lifecycle {
            Lifecycle::Created => {}
            Lifecycle::Running(_) => return Err(BrokerError::AlreadyRunning),
            Lifecycle::Stopping | Lifecycle::Stopped => return Err(BrokerError::Stopped),
        }
        let pool = Pool::start(self.inner.clone(), self.downgrade()).await?;
        *lifecycle = Lifecycle::Running(pool);
        tracing::info!(
            instance_id = %self.inner.config.instance_id,
            provider = self.inner.provider.name(),
            workers = self.inner.config.worker_count,
            "broker started"
        );
        Ok(())
    }

    /// Stops with the configured `shutdown_timeout`. See [`Broker::stop_within`].
    ///
    /// # Errors
    /// As [`Broker::stop_within`].
    pub async fn stop(&self) -> Result<StopReport, BrokerError> {
        self.stop_within(self.inner.config.shutdown_timeout).await
    }

    /// Stops intake at once (publishes fail with [`BrokerError::NotRunning`]), then drains
    /// queued and in-flight work for up to `timeout`: on a provider that is not shared
    /// (memory) until every event this broker accepted is finished, otherwise until what this
    /// host holds is finished. At the deadline, running handlers are abandoned and their
    /// deliveries given back for redelivery. Sync publishes still waiting then fail with
    /// [`BrokerError::StoppedBeforeFinished`]. Finally the provider is closed.
    ///
    /// # Errors
    /// [`BrokerError::NotRunning`] if the broker was never started or is already stopped.
    pub async fn stop_within(&self, timeout: Duration) -> Result<StopReport, BrokerError> {
        let deadline = Instant::now() + timeout;
        let pool = {
            let mut lifecycle = self.inner.lifecycle.write().await;
            match std::mem::replace(&mut *lifecycle, Lifecycle::Stopping) {
                Lifecycle::Running(pool) => pool,
                other => {
                    *lifecycle = other;
                    return Err(BrokerError::NotRunning);
                }
            }
        };
        let until_idle = !self.inner.provider.features().shared;
        let report = pool.drain(&self.inner, deadline, until_idle).await;
        self.inner.stopped.cancel();
        self.inner.provider.close().await;
        *self.inner.lifecycle.write().await = Lifecycle::Stopped;
        let unfinished = i64::try_from(self.inner.outstanding.len()).unwrap_or(i64::MAX);
        let report = StopReport {
            drained: report.released == 0 && (unfinished == 0 || !until_idle),
            released: report.released,
            unfinished: if until_idle { unfinished } else { 0 },
        };
        if report.drained {
            tracing::info!("broker stopped; all work drained");
        } else {
            tracing::warn!(
                released = report.released,
                unfinished = report.unfinished,
                durable = self.inner.provider.features().durable,
                "broker stopped before all work finished; released deliveries are redelivered by durable providers"
            );
        }
        Ok(report)
    }

    /// Subscribes `handler` to events whose type matches `pattern`.
    ///
    /// # Errors
    /// [`BrokerError::Pattern`] for a malformed pattern.
    pub fn subscribe(
        &self,
        pattern: &str,
        handler: impl EventHandler,
    ) -> Result<SubscriptionId, BrokerError> {
        self.subscribe_with(&[pattern], Arc::new(handler), SubscribeOptions::default())
    }

    /// Subscribes `handler` under several patterns with explicit options.
    ///
    /// # Errors
    /// [`BrokerError::Pattern`] for a malformed pattern, [`BrokerError::DuplicateName`] if the
    /// name is taken.
    pub fn subscribe_with(
        &self,
        patterns: &[&str],
        handler: Arc<dyn EventHandler>,
        options: SubscribeOptions,
    ) -> Result<SubscriptionId, BrokerError> {
        let subscription = self.build_subscription(patterns, handler, options)?;
        let id = subscription.id;
        self.inner
            .registry
            .insert(subscription)
            .map_err(BrokerError::DuplicateName)?;
        Ok(id)
    }

    /// Atomically replaces the subscription with the same name (or adds it): each event is
    /// dispatched to either the old or the new one, never both, never neither. Invocations
    /// already running on the old one finish normally.
    ///
    /// # Errors
    /// [`BrokerError::Pattern`] for a malformed pattern.
    pub fn replace_subscription(
        &self,
        patterns: &[&str],
        handler: Arc<dyn EventHandler>,
        options: SubscribeOptions,
    ) -> Result<SubscriptionId, BrokerError> {
        let subscription = self.build_subscription(patterns, handler, options)?;
        let id = subscription.id;
        self.inner.registry.replace(subscription);
        Ok(id)
    }

    fn build_subscription(
        &self,
        patterns: &[&str],
        handler: Arc<dyn EventHandler>,
        options: SubscribeOptions,
    ) -> Result<Subscription, BrokerError> {
        if patterns.is_empty() {
            return Err(BrokerError::Pattern(PatternError {
                pattern: String::new(),
                position: 0,
                reason: "a subscription needs at least one pattern".into(),
            }));
        }
        let patterns = patterns
            .iter()
            .map(|p| Pattern::new(p))
            .collect::<Result<Vec<_>, _>>()?;
        let id = self.inner.registry.next_id();
        Ok(Subscription {
            id,
            name: options.name.unwrap_or_else(|| id.to_string()),
            patterns,
            handler,
            timeout: options.timeout.unwrap_or(self.inner.config.handler_timeout),
            retry: options
                .retry
                .unwrap_or_else(|| self.inner.config.retry_policy.clone()),
            counters: SubscriptionCounters::default(),
        })
    }

    /// Removes a subscription. Invocations already running finish normally.
    ///
    /// # Errors
    /// [`BrokerError::UnknownSubscription`].
    pub fn unsubscribe(&self, id: SubscriptionId) -> Result<(), BrokerError> {
        self.inner
            .registry
            .remove(id)
            .map(|_| ())
            .ok_or(BrokerError::UnknownSubscription(id))
    }

    /// Removes the subscription with this name, returning its id.
    ///
    /// # Errors
    /// [`BrokerError::UnknownSubscriptionName`].
    pub fn unsubscribe_name(&self, name: &str) -> Result<SubscriptionId, BrokerError> {
        let subscription = self
            .inner
            .registry
            .by_name(name)
            .ok_or_else(|| BrokerError::UnknownSubscriptionName(name.to_owned()))?;
        self.unsubscribe(subscription.id)?;
        Ok(subscription.id)
    }

    /// Publishes as the configured mode says; see [`Broker::publish_with_mode`].
    ///
    /// # Errors
    /// As [`Broker::publish_async`] or [`Broker::publish_sync`].
    pub async fn publish(&self, event: Event) -> Result<Published, BrokerError> {
        self.publish_with_mode(self.inner.config.mode, event).await
    }

    /// Publishes in `mode`: [`Broker::publish_async`] for async (returns
    /// [`Published::Queued`]), [`Broker::publish_sync`] for sync (returns
    /// [`Published::Processed`]).
    ///
    /// # Errors
    /// As [`Broker::publish_async`] or [`Broker::publish_sync`].
    pub async fn publish_with_mode(
        &self,
        mode: ProcessingMode,
        event: Event,
    ) -> Result<Published, BrokerError> {
        match mode {
            ProcessingMode::Async => self.publish_async(event).await.map(Published::Queued),
            ProcessingMode::Sync => self
                .publish_sync(event)
                .await
                .map(|event| Published::Processed(Box::new(event))),
        }
    }

    /// Validates the event and queues it for the worker pool; returns its id. When the queue is
    /// full the call waits up to `publish_timeout` for room, then fails: an event is either
    /// accepted for processing or refused, never stored and forgotten. A call dropped while it
    /// waits for room leaves no event behind.
    ///
    /// # Errors
    /// [`BrokerError::Invalid`], [`BrokerError::NotRunning`], [`BrokerError::QueueFull`],
    /// [`BrokerError::Provider`] (e.g. a duplicate id or an unreachable backend).
    pub async fn publish_async(&self, event: Event) -> Result<String, BrokerError> {
        let event = self.prepare(event)?;
        self.hand_off(&event).await?;
        Ok(event.id)
    }

    /// Publishes the event exactly as [`Broker::publish_async`] does, then waits until it is
    /// finished and returns it in its final state: `completed`, or `failed` with the error
    /// and per-handler outcomes. Handlers run in the worker pool, retried with backoff as
    /// their policies say; see the module documentation for what sync mode guarantees.
    /// Dropping the returned future stops the wait, never the event's processing.
    ///
    /// # Errors
    /// As [`Broker::publish_async`] (the event was not accepted), or
    /// [`BrokerError::StoppedBeforeFinished`] (it was accepted, and is not finished yet).
    /// A failing handler is not an error: see the returned event's status.
    pub async fn publish_sync(&self, event: Event) -> Result<Event, BrokerError> {
        let event = self.prepare(event)?;
        // Registered before the hand-off: the final state cannot be recorded unheard.
        let waiter = self.inner.waiters.register(&event.id);
        self.hand_off(&event).await?;
        self.inner.await_final(&event.id, waiter).await
    }

    /// Hands a prepared event to the provider, counting it as outstanding until it finishes.
    async fn hand_off(&self, event: &Event) -> Result<(), BrokerError> {
        let lifecycle = self.inner.lifecycle.read().await;
        if !matches!(*lifecycle, Lifecycle::Running(_)) {
            return Err(BrokerError::NotRunning);
        }
        // Counted before the hand-off so a fast worker cannot finish it first; forgotten
        // again if the publish fails or is dropped.
        let accepting = self.inner.outstanding.accepting(&event.id);
        self.inner
            .provider
            .publish(event)
            .await
            .map_err(|error| match error {
                ProviderError::Full(reason) => BrokerError::QueueFull(reason),
                other => BrokerError::Provider(other),
            })?;
        accepting.handed_off();
        drop(lifecycle);
        self.inner.count_published(event);
        Ok(())
    }

    /// Re-runs a finished (normally failed) event: handlers that already succeeded are not run
    /// again. Returns once the event is queued.
    ///
    /// # Errors
    /// [`BrokerError::NotRunning`], [`BrokerError::Provider`] (not found, not finished).
    pub async fn retry_event(&self, id: &str) -> Result<(), BrokerError> {
        let lifecycle = self.inner.lifecycle.read().await;
        if !matches!(*lifecycle, Lifecycle::Running(_)) {
            return Err(BrokerError::NotRunning);
        }
        let event = self
            .inner
            .provider
            .get(id)
            .await?
            .ok_or_else(|| ProviderError::NotFound(id.to_owned()))?;
        let update = dispatch::rerun_update(&event);
        let accepting = self.inner.outstanding.accepting(id);
        self.inner.provider.requeue(id, &update).await?;
        accepting.handed_off();
        Ok(())
    }

    /// Fills what the publisher may leave out and checks the event.
    fn prepare(&self, mut event: Event) -> Result<Event, BrokerError> {
        if event.instance_id.is_empty() {
            event.instance_id = self.inner.config.instance_id.clone();
        }
        event.status = EventStatus::Pending;
        event.processed_at = None;
        event.completed_at = None;
        event.error = None;
        event.retry_count = 0;
        event.handlers.clear();
        event.validate(self.inner.config.max_payload.as_u64() as usize)?;
        Ok(event)
    }

    /// This host's counters and gauges, without the provider's view (no round trip).
    pub fn activity(&self) -> Activity {
        let counters = &self.inner.counters;
        Activity {
            published: Counters::load(&counters.published),
            completed: Counters::load(&counters.completed),
            failed: Counters::load(&counters.failed),
            retried: Counters::load(&counters.retried),
            queue_depth: counters.queue_depth.load(Ordering::Relaxed),
            active_workers: counters.active_workers.load(Ordering::Relaxed),
        }
    }

    /// A snapshot of counters, gauges and the provider's stats.
    ///
    /// # Errors
    /// [`BrokerError::Provider`] if the provider cannot report.
    pub async fn stats(&self) -> Result<BrokerStats, BrokerError> {
        let provider = self.inner.provider.stats().await?;
        let state = self.inner.lifecycle.read().await.name();
        let counters = &self.inner.counters;
        let activity = self.activity();
        Ok(BrokerStats {
            instance_id: self.inner.config.instance_id.clone(),
            state,
            mode: match self.inner.config.mode {
                ProcessingMode::Sync => "sync",
                ProcessingMode::Async => "async",
            },
            published: activity.published,
            processed: Counters::load(&counters.processed),
            completed: activity.completed,
            failed: activity.failed,
            retried: activity.retried,
            dead_lettered: Counters::load(&counters.dead_lettered),
            queue_depth: activity.queue_depth,
            active_workers: activity.active_workers,
            worker_count: self.inner.config.worker_count,
            subscriptions: self
                .inner
                .registry
                .all()
                .iter()
                .map(|s| s.stats())
                .collect(),
            provider,
        })
    }

    /// Waits until every event this broker accepted (`publish_async`, `publish_sync`) has
    /// reached a final state here (`completed` or `failed`); returns at once when none is
    /// outstanding. Events scheduled for a retry are still outstanding. Costs no round trip.
    pub async fn wait_idle(&self) {
        let outstanding = &self.inner.outstanding;
        loop {
            let notified = outstanding.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if outstanding.len() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// True between a successful `start` and `stop`.
    pub async fn is_running(&self) -> bool {
        matches!(*self.inner.lifecycle.read().await, Lifecycle::Running(_))
    }
}

impl Inner {
    fn count_published(&self, event: &Event) {
        self.counters.published.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .event_published(event.source.as_str(), &event.event_type);
    }

    fn update_pool_gauges(&self) {
        self.metrics.set_pool(
            self.counters.queue_depth.load(Ordering::Relaxed),
            self.counters.active_workers.load(Ordering::Relaxed),
        );
    }

    /// Waits for event `id` to reach its final state: told by `waiter` when this broker
    /// records it, found by polling the provider (with backoff) when another host does.
    async fn await_final(&self, id: &str, mut waiter: Waiter<'_>) -> Result<Event, BrokerError> {
        let receiver = &mut waiter.receiver;
        let mut listening = true;
        let mut pause = SYNC_POLL_FIRST;
        loop {
            tokio::select! {
                biased;
                received = &mut *receiver, if listening => match received {
                    Ok(event) => return Ok(event),
                    // Not expected (a waiter is only removed by its own drop); polling goes on.
                    Err(_) => listening = false,
                },
                _ = self.stopped.cancelled() => {
                    return Err(BrokerError::StoppedBeforeFinished(id.to_owned()));
                }
                _ = tokio::time::sleep(pause) => {
                    match self.provider.get(id).await {
                        Ok(Some(event)) if event.status.is_finished() => return Ok(event),
                        Ok(Some(_)) => {}
                        Ok(None) => return Err(ProviderError::NotFound(id.to_owned()).into()),
                        Err(error) => {
                            tracing::debug!(event_id = %id, %error, "sync publish could not poll its event; waiting on");
                        }
                    }
                    pause = (pause * 2).min(SYNC_POLL_MAX);
                }
            }
        }
    }

    /// Records a decision: the one place broker counters change after an attempt, drain
    /// bookkeeping ends and waiting sync publishes learn the final state. `event` is the
    /// event as the attempt saw it, `update` what was recorded; the final event is built
    /// from both only when a sync publish waits.
    fn record_decision(
        &self,
        event: &Event,
        update: &StatusUpdate,
        decision: &Decision,
        elapsed: Duration,
    ) {
        let counters = &self.counters;
        let status = match decision {
            Decision::Retry { .. } => None,
            Decision::Complete => Some(EventStatus::Completed),
            Decision::Fail { .. } => Some(EventStatus::Failed),
        };
        self.metrics
            .event_attempt(event.source.as_str(), &event.event_type, status, elapsed);
        match decision {
            Decision::Retry { delay, .. } => {
                counters.retried.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(event_id = %event.id, retry_in = ?delay, "event scheduled for retry");
                return;
            }
            Decision::Complete => {
                counters.completed.fetch_add(1, Ordering::Relaxed);
            }
            Decision::Fail { error } => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                counters.dead_lettered.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(event_id = %event.id, event_type = %event.event_type, "event failed: {error}");
            }
        }
        counters.processed.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(event_id = %event.id, ?elapsed, "event finished");
        self.outstanding.finish(&event.id);
        if self.waiters.any() {
            let mut finished = event.clone();
            update.apply(&mut finished);
            self.waiters.finish(&finished);
        }
    }
}

/// Errors of the broker boundary.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The event breaks a rule.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// A subscription pattern is malformed.
    #[error(transparent)]
    Pattern(#[from] PatternError),
    /// The broker is not running (not started, stopping or stopped).
    #[error("broker is not running")]
    NotRunning,
    /// A sync publish's event was accepted, but the broker stopped before it finished. The
    /// event keeps its stored state; whichever host consumes it next finishes it (after a
    /// restart, on a durable provider).
    #[error(
        "the broker stopped before event {0:?} finished; it was accepted and keeps its stored state (a durable provider redelivers it)"
    )]
    StoppedBeforeFinished(String),
    /// `start` on a running broker.
    #[error("broker is already running")]
    AlreadyRunning,
    /// `start` on a stopped broker.
    #[error("broker was stopped and cannot be restarted; create a new one")]
    Stopped,
    /// The queue stayed full for `publish_timeout`.
    #[error("queue is full: {0}")]
    QueueFull(String),
    /// No subscription with this id.
    #[error("no subscription {0}")]
    UnknownSubscription(SubscriptionId),
    /// No subscription with this name.
    #[error("no subscription named {0:?}")]
    UnknownSubscriptionName(String),
    /// A subscription with this name exists.
    #[error("a subscription named {0:?} already exists")]
    DuplicateName(String),
    /// Derived events nested too deep.
    #[error("derived events may nest at most {0} levels deep (feedback loop?)")]
    CausationTooDeep(u32),
    /// The process-wide default broker was used before one was installed.
    #[error("no default broker: call eventbroker::initialize or set_default_broker first")]
    NoDefaultBroker,
    /// The provider failed.
    #[error(transparent)]
    Provider(#[from] ProviderError),
    /// The configuration breaks a rule.
    #[error(transparent)]
    Config(#[from] InvalidValue),
}

#[cfg(test)]
mod tests;
