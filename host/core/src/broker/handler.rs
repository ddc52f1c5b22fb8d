//! What a handler is: an async trait, a closure adapter, and the context of one invocation.

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::time::Instant;

use super::{Broker, BrokerError, WeakBroker};
use crate::event::{Event, Failure, FailureKind};
use crate::provider::ProviderError;

/// The result of one handler invocation: `Ok` or a [`Failure`] saying whether to retry.
pub type HandlerResult = Result<(), Failure>;

/// An event handler. Implementations must be cheap to call concurrently: the broker runs
/// every handler matching an event at the same time, and one handler for many events at once.
#[async_trait]
pub trait EventHandler: Send + Sync + 'static {
    /// Handles one event. Return [`Failure::retry`] for a transient problem (the broker retries
    /// with backoff) or [`Failure::fail`] when the event can never succeed.
    async fn handle(&self, ctx: &HandlerContext, event: &Event) -> HandlerResult;
}

/// Adapts an async closure into an [`EventHandler`].
///
/// # Examples
/// ```
/// use eventbroker::{handler_fn, Event, Failure, HandlerContext};
/// let handler = handler_fn(|_ctx: HandlerContext, event: Event| async move {
///     if event.payload.is_null() {
///         return Err(Failure::fail("payload required"));
///     }
///     Ok(())
/// });
/// # let _ = handler;
/// ```
pub fn handler_fn<F, Fut>(f: F) -> FnHandler<F>
where
    F: Fn(HandlerContext, Event) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    FnHandler(f)
}

/// An [`EventHandler`] made from a closure by [`handler_fn`].
pub struct FnHandler<F>(F);

#[async_trait]
impl<F, Fut> EventHandler for FnHandler<F>
where
    F: Fn(HandlerContext, Event) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    async fn handle(&self, ctx: &HandlerContext, event: &Event) -> HandlerResult {
        (self.0)(ctx.clone(), event.clone()).await
    }
}

impl Failure {
    /// A transient failure: retry later, within the retry budget.
    pub fn retry(message: impl Into<String>) -> Self {
        Failure::new(FailureKind::Retry, message)
    }

    /// A permanent failure: the event is a dead letter for this handler.
    pub fn fail(message: impl Into<String>) -> Self {
        Failure::new(FailureKind::Fail, message)
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for Failure {
    /// Any error returned with `?` is treated as transient (retried).
    fn from(error: E) -> Self {
        Failure::retry(error.to_string())
    }
}

/// What a handler knows about its invocation, and its way to publish derived events.
#[derive(Clone)]
pub struct HandlerContext {
    inner: Arc<ContextInner>,
}

struct ContextInner {
    handler: String,
    event_id: String,
    attempt: u32,
    deadline: Instant,
    deadline_utc: DateTime<Utc>,
    causation_depth: u32,
    broker: WeakBroker,
    version: OnceLock<String>,
    /// Derived events published so far by this invocation (their sequence numbers).
    published: AtomicU32,
}

/// How deep a chain of derived events may go (an event published by a handler of an event
/// published by a handler of …) before publishing is refused, to stop feedback loops.
pub const MAX_CAUSATION_DEPTH: u32 = 16;

/// The metadata key recording which event caused a derived event.
pub const CAUSED_BY_KEY: &str = "caused_by";
/// The metadata key recording which handler published a derived event.
pub const CAUSED_BY_HANDLER_KEY: &str = "caused_by_handler";
/// The metadata key recording how many derivation steps led to an event.
pub const CAUSATION_DEPTH_KEY: &str = "causation_depth";

impl HandlerContext {
    pub(crate) fn new(
        handler: &str,
        event: &Event,
        attempt: u32,
        timeout: Duration,
        broker: WeakBroker,
    ) -> Self {
        let causation_depth = event
            .metadata
            .get(CAUSATION_DEPTH_KEY)
            .and_then(|v| v.as_u64())
            .map_or(0, |d| d.min(u64::from(u32::MAX)) as u32);
        HandlerContext {
            inner: Arc::new(ContextInner {
                handler: handler.to_owned(),
                event_id: event.id.clone(),
                attempt,
                deadline: Instant::now() + timeout,
                deadline_utc: Utc::now()
                    + chrono::Duration::from_std(timeout).unwrap_or(chrono::Duration::MAX),
                causation_depth,
                broker,
                version: OnceLock::new(),
                published: AtomicU32::new(0),
            }),
        }
    }

    /// The subscription (handler) name.
    pub fn handler(&self) -> &str {
        &self.inner.handler
    }

    /// The id of the event being handled.
    pub fn event_id(&self) -> &str {
        &self.inner.event_id
    }

    /// 1 for the first attempt, 2 for the first retry, …
    pub fn attempt(&self) -> u32 {
        self.inner.attempt
    }

    /// When the broker gives up on this invocation.
    pub fn deadline(&self) -> Instant {
        self.inner.deadline
    }

    /// The deadline as wall-clock time.
    pub fn deadline_utc(&self) -> DateTime<Utc> {
        self.inner.deadline_utc
    }

    /// Records which version of the handler ran (WebAssembly handlers); kept in the event's
    /// handler outcome. Only the first call counts.
    pub fn record_version(&self, version: &str) {
        let _ = self.inner.version.set(version.to_owned());
    }

    pub(crate) fn version(&self) -> Option<String> {
        self.inner.version.get().cloned()
    }

    /// Publishes a derived event through the broker (always queued, never awaited), tagged
    /// with this event's id and this handler's name in its metadata, and returns its id.
    ///
    /// The id is not the draft's: it is derived from (this event's id, this handler's name,
    /// the number of publishes this invocation made before), see [`derived_event_id`]. So an
    /// invocation that is retried — or re-run — and publishes the same sequence again names the
    /// same events, and a derived event the provider already holds is not published twice:
    /// the call returns its id as if it had published it. (A derived event the provider no
    /// longer holds, e.g. evicted or expired from the memory provider, is published again.)
    ///
    /// # Errors
    /// Validation and publish errors of [`Broker::publish_async`], or
    /// [`BrokerError::CausationTooDeep`] when derived events nest deeper than
    /// [`MAX_CAUSATION_DEPTH`].
    pub async fn publish(&self, mut event: Event) -> Result<String, BrokerError> {
        let depth = self.inner.causation_depth + 1;
        if depth > MAX_CAUSATION_DEPTH {
            return Err(BrokerError::CausationTooDeep(MAX_CAUSATION_DEPTH));
        }
        let sequence = self.inner.published.fetch_add(1, Ordering::Relaxed);
        event.id = derived_event_id(&self.inner.event_id, &self.inner.handler, sequence);
        event
            .metadata
            .insert(CAUSED_BY_KEY.into(), self.inner.event_id.clone().into());
        event.metadata.insert(
            CAUSED_BY_HANDLER_KEY.into(),
            self.inner.handler.clone().into(),
        );
        event
            .metadata
            .insert(CAUSATION_DEPTH_KEY.into(), depth.into());
        let broker = self.broker()?;
        let id = event.id.clone();
        match broker.publish_async(event).await {
            Err(BrokerError::Provider(ProviderError::Duplicate(_))) => {
                tracing::debug!(
                    event_id = %id,
                    caused_by = %self.inner.event_id,
                    handler = %self.inner.handler,
                    "derived event already published by an earlier attempt"
                );
                Ok(id)
            }
            other => other,
        }
    }

    /// The broker running this handler.
    ///
    /// # Errors
    /// [`BrokerError::NotRunning`] if it has been dropped.
    pub fn broker(&self) -> Result<Broker, BrokerError> {
        self.inner.broker.upgrade().ok_or(BrokerError::NotRunning)
    }
}

/// The id of the derived event that handler `handler`, handling event `caused_by`, publishes
/// as its `sequence`-th publish (0-based) of an invocation: a name-based UUID (version 5), the
/// same on every attempt and every host.
pub fn derived_event_id(caused_by: &str, handler: &str, sequence: u32) -> String {
    /// The namespace of derived event ids (a fixed, random UUID).
    const NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x5d0c_7a4e_2b1f_4c8e_9a63_0e7f_d2b4_1c95);
    // Lengths first, so that no two (cause, handler) pairs share a name.
    let name = format!(
        "{}:{caused_by}/{}:{handler}/{sequence}",
        caused_by.len(),
        handler.len()
    );
    uuid::Uuid::new_v5(&NAMESPACE, name.as_bytes()).to_string()
}

#[cfg(test)]
mod tests {
    use super::derived_event_id;

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        let id = derived_event_id("e1", "audit", 0);
        assert_eq!(id, derived_event_id("e1", "audit", 0));
        assert_eq!(
            uuid::Uuid::parse_str(&id)
                .expect("a uuid")
                .get_version_num(),
            5
        );
        for other in [
            derived_event_id("e1", "audit", 1),
            derived_event_id("e2", "audit", 0),
            derived_event_id("e1", "audit2", 0),
            derived_event_id("e1a", "udit", 0),
        ] {
            assert_ne!(id, other);
        }
    }
}
