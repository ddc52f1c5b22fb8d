//! `register_crud_hooks`: the broker as a CRUD hook. Each enabled operation publishes a
//! `schema.entity.operation` event with source `database` through a bounded queue and a
//! publisher task, in the order the operations ran, so the CRUD operation is never blocked or
//! failed by the broker. A publish that fails, and an event refused because the queue is full,
//! is counted (here and in `eventbroker_source_publish_failures_total{source="crud_hooks"}`)
//! and logged (refusals at most once per [`REFUSAL_LOG_PERIOD`], with the number refused).

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde_json::{Map, Value, json};
use tokio::sync::{Notify, mpsc};

use super::registry::{CrudOperation, HookContext, HookRegistry};
use crate::broker::Broker;
use crate::event::{Event, EventSource};

/// The `source` label of this event source in metrics.
const METRIC_SOURCE: &str = "crud_hooks";

/// Events the hooks queue for the publisher by default ([`CrudHookOptions::queue_capacity`]).
pub const DEFAULT_QUEUE_CAPACITY: NonZeroUsize = NonZeroUsize::new(10_000).unwrap();

/// Refusals of a full queue are logged at most once per this period.
pub const REFUSAL_LOG_PERIOD: Duration = Duration::from_secs(10);

/// Which operations publish events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OperationSwitches {
    /// Publish `…create` events.
    pub create: bool,
    /// Publish `…update` events.
    pub update: bool,
    /// Publish `…delete` events.
    pub delete: bool,
    /// Publish `…read` events (off by default: reads are frequent and rarely interesting).
    pub read: bool,
}

impl Default for OperationSwitches {
    /// Create, update and delete on; read off.
    fn default() -> Self {
        OperationSwitches {
            create: true,
            update: true,
            delete: true,
            read: false,
        }
    }
}

impl OperationSwitches {
    /// Every operation off (e.g. to silence one entity).
    pub const NONE: OperationSwitches = OperationSwitches {
        create: false,
        update: false,
        delete: false,
        read: false,
    };

    /// Every operation on, reads included.
    pub const ALL: OperationSwitches = OperationSwitches {
        create: true,
        update: true,
        delete: true,
        read: true,
    };

    /// Whether `operation` is on.
    pub fn enabled(&self, operation: CrudOperation) -> bool {
        match operation {
            CrudOperation::Create => self.create,
            CrudOperation::Update => self.update,
            CrudOperation::Delete => self.delete,
            CrudOperation::Read => self.read,
        }
    }
}

/// What [`register_crud_hooks`] publishes, and how many events it queues.
#[derive(Debug, Clone, PartialEq)]
pub struct CrudHookOptions {
    /// The switches of entities without their own entry.
    pub operations: OperationSwitches,
    /// Per-entity switches, keyed by `schema.entity` or (for every schema) `entity`; the
    /// `schema.entity` entry wins.
    pub entities: HashMap<String, OperationSwitches>,
    /// Most events waiting for the publisher at once (default
    /// [`DEFAULT_QUEUE_CAPACITY`]). When the queue is full — the broker does not keep up —
    /// further events are refused, never waited for: the CRUD operation goes on, and the
    /// refusal is counted and logged.
    pub queue_capacity: NonZeroUsize,
}

impl Default for CrudHookOptions {
    /// Create, update and delete on, read off, for every entity; a queue of
    /// [`DEFAULT_QUEUE_CAPACITY`] events.
    fn default() -> Self {
        CrudHookOptions {
            operations: OperationSwitches::default(),
            entities: HashMap::new(),
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
        }
    }
}

impl CrudHookOptions {
    /// Sets the queue capacity (builder style).
    pub fn with_queue_capacity(mut self, capacity: NonZeroUsize) -> Self {
        self.queue_capacity = capacity;
        self
    }

    /// Turns read events on or off for entities without their own entry (builder style).
    pub fn with_reads(mut self, read: bool) -> Self {
        self.operations.read = read;
        self
    }

    /// Sets the switches of one entity, `schema.entity` or `entity` (builder style).
    pub fn entity(mut self, key: impl Into<String>, switches: OperationSwitches) -> Self {
        self.entities.insert(key.into(), switches);
        self
    }

    /// Whether `operation` on `schema.entity` publishes an event.
    pub fn publishes(&self, schema: &str, entity: &str, operation: CrudOperation) -> bool {
        self.entities
            .get(&format!("{schema}.{entity}"))
            .or_else(|| self.entities.get(entity))
            .unwrap_or(&self.operations)
            .enabled(operation)
    }
}

#[derive(Debug, Default)]
struct Counters {
    published: AtomicU64,
    failed: AtomicU64,
    refused: AtomicU64,
    in_flight: AtomicUsize,
    idle: Notify,
}

/// The handle [`register_crud_hooks`] returns: counts of what the hooks published and failed
/// to publish, and a way to wait for publishes still in flight. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct CrudHooks {
    counters: Arc<Counters>,
}

impl CrudHooks {
    /// Events accepted by the broker.
    pub fn published(&self) -> u64 {
        self.counters.published.load(Ordering::Acquire)
    }

    /// Events that were not published: the broker refused them, they could not be handed to
    /// it, or the queue was full ([`CrudHooks::refused`] of them). Each was logged.
    pub fn failed(&self) -> u64 {
        self.counters.failed.load(Ordering::Acquire)
    }

    /// Events refused because the queue was full (counted in [`CrudHooks::failed`] too).
    pub fn refused(&self) -> u64 {
        self.counters.refused.load(Ordering::Acquire)
    }

    /// Publishes started and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.counters.in_flight.load(Ordering::Acquire)
    }

    /// Waits until no publish is in flight (e.g. before stopping the broker).
    pub async fn flush(&self) {
        loop {
            let idle = self.counters.idle.notified();
            if self.in_flight() == 0 {
                return;
            }
            idle.await;
        }
    }

    fn finish(&self, ok: bool) {
        let counter = if ok {
            &self.counters.published
        } else {
            &self.counters.failed
        };
        counter.fetch_add(1, Ordering::AcqRel);
        if self.counters.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.counters.idle.notify_waiters();
        }
    }
}

/// The event a CRUD operation publishes: type `schema.entity.operation`, source `database`,
/// the user's id and session, a payload by operation (create: the record; update:
/// `{id, data}`; delete: `{id}`; read: the result) and metadata `user_name`, `user_email`,
/// `user_roles` (when known) and `table_name`.
pub fn crud_event(context: &HookContext, instance_id: &str) -> Event {
    let operation = context.operation;
    let mut event = Event::crud(
        EventSource::Database,
        &context.schema,
        &context.entity,
        operation.as_str(),
        instance_id,
    );
    event.user_id = context.user.user_id;
    event.session_id = context.user.session_id.clone();
    let id = context.id.clone().unwrap_or(Value::Null);
    let record = || {
        context
            .record
            .clone()
            .unwrap_or_else(|| Value::Object(Map::new()))
    };
    event.payload = match operation {
        CrudOperation::Create | CrudOperation::Read => record(),
        CrudOperation::Update => json!({ "id": id, "data": record() }),
        CrudOperation::Delete => json!({ "id": id }),
    };
    let user = &context.user;
    if !user.name.is_empty() {
        event
            .metadata
            .insert("user_name".into(), Value::String(user.name.clone()));
    }
    if !user.email.is_empty() {
        event
            .metadata
            .insert("user_email".into(), Value::String(user.email.clone()));
    }
    if !user.roles.is_empty() {
        event
            .metadata
            .insert("user_roles".into(), json!(user.roles));
    }
    event
        .metadata
        .insert("table_name".into(), Value::String(context.table()));
    event
}

/// Registers the broker's hooks in `registry`: after each operation that `options` enables,
/// a `schema.entity.operation` event (see [`crud_event`]) is queued for a publisher task that
/// hands the events to [`Broker::publish_async`] one after the other, in the order the
/// operations ran. The hook returns at once: the CRUD layer never waits for the broker. The
/// queue holds at most `options.queue_capacity` events; when it is full the event is refused
/// (counted, and logged at most once per [`REFUSAL_LOG_PERIOD`] with the number refused).
/// A failed publish (broker stopped, broker queue full for `publish_timeout`, invalid names,
/// no tokio runtime) is logged with `tracing` and counted, never raised to the CRUD layer.
///
/// # Examples
/// ```
/// use eventbroker::hooks::{register_crud_hooks, CrudHookOptions, HookContext, HookRegistry, UserContext};
/// use eventbroker::{Broker, BrokerConfig, MemoryProvider};
/// use std::sync::Arc;
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let broker = Broker::new(BrokerConfig::default(), Arc::new(MemoryProvider::default()));
/// broker.start().await?;
/// let registry = HookRegistry::new();
/// let hooks = register_crud_hooks(&broker, &registry, CrudHookOptions::default());
/// registry.run(&HookContext::created("public", "users", serde_json::json!({"id": 1}), UserContext::default()));
/// hooks.flush().await;
/// assert_eq!(hooks.published(), 1);
/// broker.stop().await?;
/// # Ok(())
/// # }
/// ```
pub fn register_crud_hooks(
    broker: &Broker,
    registry: &HookRegistry,
    options: CrudHookOptions,
) -> CrudHooks {
    let handle = CrudHooks::default();
    let publisher = Arc::new(Publisher::new(
        broker.clone(),
        handle.clone(),
        options.queue_capacity,
    ));
    let options = Arc::new(options);
    for operation in CrudOperation::ALL {
        let publisher = publisher.clone();
        let options = options.clone();
        registry.register(operation, move |context| {
            if !options.publishes(&context.schema, &context.entity, operation) {
                return;
            }
            publisher.enqueue(crud_event(context, publisher.broker.instance_id()));
        });
    }
    handle
}

/// The queue between the hooks and the publisher task, which starts on first use (inside
/// the application's tokio runtime) and ends when the hooks are dropped.
struct Publisher {
    broker: Broker,
    handle: CrudHooks,
    capacity: NonZeroUsize,
    tx: mpsc::Sender<Event>,
    rx: Mutex<Option<mpsc::Receiver<Event>>>,
    /// Paces the log lines about refusals.
    refusal_log: DefaultDirectRateLimiter,
    /// Refusals not yet reported in a log line.
    unreported: AtomicU64,
}

impl Publisher {
    fn new(broker: Broker, handle: CrudHooks, capacity: NonZeroUsize) -> Self {
        let (tx, rx) = mpsc::channel(capacity.get());
        let period = Quota::with_period(REFUSAL_LOG_PERIOD)
            .unwrap_or(Quota::per_minute(std::num::NonZeroU32::MIN));
        Publisher {
            broker,
            handle,
            capacity,
            tx,
            rx: Mutex::new(Some(rx)),
            refusal_log: RateLimiter::direct(period),
            unreported: AtomicU64::new(0),
        }
    }

    /// Counts an event refused by the full queue, and logs the refusals not reported yet
    /// when the pace allows.
    fn refuse(&self, event: &Event) {
        self.handle.counters.refused.fetch_add(1, Ordering::AcqRel);
        self.broker.metrics().source_publish_failed(METRIC_SOURCE);
        self.unreported.fetch_add(1, Ordering::AcqRel);
        if self.refusal_log.check().is_ok() {
            let refused = self.unreported.swap(0, Ordering::AcqRel);
            tracing::warn!(
                refused,
                capacity = self.capacity.get(),
                event_type = %event.event_type,
                "CRUD hook queue is full (the broker does not keep up): {refused} events refused since the last report; the operations themselves succeeded"
            );
        }
        self.handle.finish(false);
    }

    fn enqueue(&self, event: Event) {
        self.handle
            .counters
            .in_flight
            .fetch_add(1, Ordering::AcqRel);
        if !self.ensure_task() {
            tracing::error!(
                event_type = %event.event_type,
                event_id = %event.id,
                "CRUD hook ran outside a tokio runtime; event not published"
            );
            self.broker.metrics().source_publish_failed(METRIC_SOURCE);
            self.handle.finish(false);
            return;
        }
        match self.tx.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(event)) => self.refuse(&event),
            Err(mpsc::error::TrySendError::Closed(event)) => {
                tracing::error!(event_id = %event.id, "CRUD hook publisher is gone; event not published");
                self.broker.metrics().source_publish_failed(METRIC_SOURCE);
                self.handle.finish(false);
            }
        }
    }

    /// Starts the publisher task if it is not running; false without a tokio runtime.
    fn ensure_task(&self) -> bool {
        let mut rx = self.rx.lock().unwrap_or_else(|p| p.into_inner());
        if rx.is_none() {
            return true;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        if let Some(rx) = rx.take() {
            runtime.spawn(publish_loop(self.broker.clone(), self.handle.clone(), rx));
        }
        true
    }
}

/// Publishes queued events in order, counting and logging each outcome.
async fn publish_loop(broker: Broker, handle: CrudHooks, mut rx: mpsc::Receiver<Event>) {
    while let Some(event) = rx.recv().await {
        let event_type = event.event_type.clone();
        let event_id = event.id.clone();
        match broker.publish_async(event).await {
            Ok(_) => {
                tracing::debug!(%event_type, %event_id, "CRUD hook published event");
                handle.finish(true);
            }
            Err(error) => {
                tracing::warn!(
                    %event_type,
                    %event_id,
                    %error,
                    "CRUD hook could not publish event; the operation itself succeeded"
                );
                broker.metrics().source_publish_failed(METRIC_SOURCE);
                handle.finish(false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::handler_fn;
    use crate::config::BrokerConfig;
    use crate::hooks::UserContext;
    use crate::provider::MemoryProvider;

    fn user() -> UserContext {
        UserContext {
            user_id: Some(7),
            session_id: "sess-1".into(),
            name: "Ada".into(),
            email: "ada@example.com".into(),
            roles: vec!["admin".into()],
        }
    }

    async fn broker() -> (Broker, Arc<Mutex<Vec<Event>>>) {
        let broker = Broker::new(BrokerConfig::default(), Arc::new(MemoryProvider::default()));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        broker
            .subscribe(
                "*",
                handler_fn(move |_, event| {
                    let sink = sink.clone();
                    async move {
                        sink.lock().unwrap().push(event);
                        Ok(())
                    }
                }),
            )
            .expect("subscribe");
        broker.start().await.expect("start");
        (broker, seen)
    }

    #[test]
    fn events_carry_payload_user_and_metadata() {
        let created = crud_event(
            &HookContext::created("public", "users", json!({"id": 1, "name": "Ada"}), user()),
            "h",
        );
        assert_eq!(created.event_type, "public.users.create");
        assert_eq!(created.source, EventSource::Database);
        assert_eq!(created.payload, json!({"id": 1, "name": "Ada"}));
        assert_eq!(created.user_id, Some(7));
        assert_eq!(created.session_id, "sess-1");
        assert_eq!(created.metadata["user_name"], "Ada");
        assert_eq!(created.metadata["user_email"], "ada@example.com");
        assert_eq!(created.metadata["user_roles"], json!(["admin"]));
        assert_eq!(created.metadata["table_name"], "public.users");
        assert_eq!(
            (
                created.schema.as_str(),
                created.entity.as_str(),
                created.operation.as_str()
            ),
            ("public", "users", "create")
        );

        let updated = crud_event(
            &HookContext::updated("public", "users", json!(1), json!({"name": "Bo"}), user())
                .with_table_name("app_users"),
            "h",
        );
        assert_eq!(updated.payload, json!({"id": 1, "data": {"name": "Bo"}}));
        assert_eq!(updated.metadata["table_name"], "app_users");

        let deleted = crud_event(
            &HookContext::deleted("public", "users", json!(1), UserContext::default()),
            "h",
        );
        assert_eq!(deleted.payload, json!({"id": 1}));
        assert_eq!(deleted.user_id, None);
        assert!(!deleted.metadata.contains_key("user_name"));

        let read = crud_event(
            &HookContext::read("public", "users", json!([{"id": 1}]), user()),
            "h",
        );
        assert_eq!(read.event_type, "public.users.read");
        assert_eq!(read.payload, json!([{"id": 1}]));
    }

    #[test]
    fn switches_per_operation_and_entity() {
        let options = CrudHookOptions::default()
            .entity("audit_log", OperationSwitches::NONE)
            .entity(
                "public.sessions",
                OperationSwitches {
                    read: true,
                    ..OperationSwitches::NONE
                },
            )
            .entity(
                "public.audit_log",
                OperationSwitches {
                    delete: true,
                    ..OperationSwitches::NONE
                },
            );
        assert!(options.publishes("public", "users", CrudOperation::Create));
        assert!(
            !options.publishes("public", "users", CrudOperation::Read),
            "reads off by default"
        );
        assert!(!options.publishes("other", "audit_log", CrudOperation::Create));
        assert!(
            options.publishes("public", "audit_log", CrudOperation::Delete),
            "schema.entity wins"
        );
        assert!(!options.publishes("public", "audit_log", CrudOperation::Create));
        assert!(options.publishes("public", "sessions", CrudOperation::Read));
        assert!(!options.publishes("public", "sessions", CrudOperation::Update));
        assert!(CrudHookOptions::default().with_reads(true).publishes(
            "a",
            "b",
            CrudOperation::Read
        ));
    }

    #[tokio::test]
    async fn hooks_publish_enabled_operations_to_handlers() {
        let (broker, seen) = broker().await;
        let registry = HookRegistry::new();
        let hooks = register_crud_hooks(
            &broker,
            &registry,
            CrudHookOptions::default().entity("public.secrets", OperationSwitches::NONE),
        );
        registry.run(&HookContext::created(
            "public",
            "users",
            json!({"id": 1}),
            user(),
        ));
        registry.run(&HookContext::updated(
            "public",
            "users",
            json!(1),
            json!({"a": 2}),
            user(),
        ));
        registry.run(&HookContext::deleted("public", "users", json!(1), user()));
        registry.run(&HookContext::read("public", "users", json!([]), user()));
        registry.run(&HookContext::created(
            "public",
            "secrets",
            json!({}),
            user(),
        ));
        hooks.flush().await;
        assert_eq!((hooks.published(), hooks.failed()), (3, 0));
        broker.stop().await.expect("stop");
        let mut types: Vec<String> = seen
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.event_type.clone())
            .collect();
        types.sort();
        assert_eq!(
            types,
            [
                "public.users.create",
                "public.users.delete",
                "public.users.update"
            ]
        );
    }

    #[tokio::test]
    async fn failures_are_counted_and_never_reach_the_operation() {
        let (broker, _) = broker().await;
        let registry = HookRegistry::new();
        let hooks = register_crud_hooks(&broker, &registry, CrudHookOptions::default());
        // An invalid event type (empty schema) is refused by the broker.
        registry.run(&HookContext::created("", "users", json!({}), user()));
        hooks.flush().await;
        assert_eq!((hooks.published(), hooks.failed()), (0, 1));
        broker.stop().await.expect("stop");
        // A stopped broker refuses everything; the hook still returns normally.
        registry.run(&HookContext::created("public", "users", json!({}), user()));
        hooks.flush().await;
        assert_eq!(hooks.failed(), 2);
        let metrics = broker.metrics().encode();
        assert!(
            metrics.contains("eventbroker_source_publish_failures_total{source=\"crud_hooks\"} 2"),
            "{metrics}"
        );
    }

    /// Issue 13 A15: the queue is bounded; what does not fit is refused at once (the CRUD
    /// operation is not blocked), counted on the handle and in the metric.
    #[tokio::test]
    async fn a_full_queue_refuses_without_blocking_and_counts() {
        // A broker that holds one unfinished event; its handler waits for the gate, so the
        // publisher task gets stuck on the second event, waiting for room.
        let config = BrokerConfig {
            buffer_size: 1,
            publish_timeout: std::time::Duration::from_secs(120),
            ..BrokerConfig::default()
        };
        let broker = Broker::new(config.clone(), Arc::new(MemoryProvider::new(&config)));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let g = gate.clone();
        broker
            .subscribe(
                "*",
                handler_fn(move |_, _| {
                    let g = g.clone();
                    async move {
                        g.acquire().await.expect("gate").forget();
                        Ok(())
                    }
                }),
            )
            .expect("subscribe");
        broker.start().await.expect("start");
        let registry = HookRegistry::new();
        let hooks = register_crud_hooks(
            &broker,
            &registry,
            CrudHookOptions::default().with_queue_capacity(NonZeroUsize::new(2).unwrap()),
        );
        let create = |n: i64| HookContext::created("public", "users", json!({"id": n}), user());
        registry.run(&create(0));
        hooks.flush().await;
        assert_eq!(
            hooks.published(),
            1,
            "the first event holds the broker's only slot"
        );
        // Eleven operations with no await in between (a current-thread runtime: the publisher
        // cannot run meanwhile): two fit in the queue, nine are refused, none blocks.
        for n in 1..=11 {
            registry.run(&create(n));
        }
        assert_eq!(hooks.refused(), 9);
        assert_eq!((hooks.failed(), hooks.in_flight()), (9, 2));
        gate.add_permits(100);
        hooks.flush().await;
        assert_eq!(
            (hooks.published(), hooks.failed(), hooks.refused()),
            (3, 9, 9)
        );
        let report = broker.stop().await.expect("stop");
        assert!(report.drained, "{report:?}");
        let metrics = broker.metrics().encode();
        assert!(
            metrics.contains("eventbroker_source_publish_failures_total{source=\"crud_hooks\"} 9"),
            "{metrics}"
        );
    }

    #[test]
    fn outside_a_runtime_the_failure_is_counted() {
        let broker = Broker::new(BrokerConfig::default(), Arc::new(MemoryProvider::default()));
        let registry = HookRegistry::new();
        let hooks = register_crud_hooks(&broker, &registry, CrudHookOptions::default());
        registry.run(&HookContext::deleted("public", "users", json!(1), user()));
        assert_eq!((hooks.failed(), hooks.in_flight()), (1, 0));
    }

    #[test]
    fn a_panicking_hook_does_not_stop_the_others() {
        let registry = HookRegistry::new();
        let ran = Arc::new(AtomicU64::new(0));
        registry.after_delete(|_| panic!("boom"));
        let counter = ran.clone();
        registry.after_delete(move |_| {
            counter.fetch_add(1, Ordering::Relaxed);
        });
        registry.run(&HookContext::deleted(
            "s",
            "e",
            json!(1),
            UserContext::default(),
        ));
        assert_eq!(ran.load(Ordering::Relaxed), 1);
        assert_eq!(registry.len(CrudOperation::Delete), 2);
        assert!(!registry.is_empty());
    }
}
