//! One loaded version of a handler: the compiled component, pre-instantiated against the host's
//! linker, with its limits; and the invocation of it on one event.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use wasmtime::component::InstancePre;
use wasmtime::{Store, Trap, UpdateDeadline};

use super::WasmError;
use super::bindings::types::{self as wit, HandlerError};
use super::bindings::{HandlerIndices, SubscriptionIndices};
use super::engine::{CompileSource, Compiled, WasmEngine};
use super::limits;
use super::log::LogLine;
use super::manifest::HandlerSpec;
use super::outcome::{Classifier, with_details};
use super::percentiles::Distribution;
use super::slots::{Live, WarmPool};
use super::state::{HostState, Publisher, StoreSettings};
use crate::config::InstancePolicy;
use eventbroker::event::{Event, EventSource, EventStatus, Failure, FailureKind};
use eventbroker::metrics::Metrics;

/// Fuel granted to a component's `patterns()` export when it is loaded.
const PATTERNS_FUEL: u64 = 10_000_000;
/// Wall-clock bound of a component's `patterns()` export (instantiation included) when it is
/// loaded, also when it waits in a host call such as a WASI clock.
pub const PATTERNS_TIMEOUT: Duration = Duration::from_secs(5);
/// How long past its deadline a guest blocked in a host call (where epoch interruption cannot
/// reach it) is given before its invocation is abandoned.
const HOST_CALL_GRACE: Duration = Duration::from_millis(100);
/// How long an invocation waits for one of the handler's concurrency slots, and then for a
/// slot of the instance pool, before the event is deferred (retried later for this handler,
/// without counting an attempt). Keeps a saturated or misbehaving handler, or a full pool,
/// from tying up the broker's workers.
pub const QUEUE_WAIT: Duration = Duration::from_millis(100);

/// A handler version ready to run.
pub struct CompiledHandler {
    spec: HandlerSpec,
    version: String,
    patterns: Vec<String>,
    default_patterns: Option<Vec<String>>,
    loaded_at: DateTime<Utc>,
    compile_source: CompileSource,
    compile_time: Duration,
    size: usize,
    pre: InstancePre<HostState>,
    indices: HandlerIndices,
    settings: Arc<StoreSettings>,
    warm: Arc<WarmPool>,
    permits: Arc<Semaphore>,
    counters: Arc<HandlerCounters>,
    engine: WasmEngine,
}

/// Counters of one handler name, kept across its versions.
#[derive(Debug, Default)]
pub struct HandlerCounters {
    /// Invocations by outcome (index: [`outcome_index`]).
    pub outcomes: [AtomicU64; OUTCOMES.len()],
    /// Total fuel consumed.
    pub fuel: AtomicU64,
    /// Total invocation time in microseconds.
    pub micros: AtomicU64,
    /// Invocation durations in microseconds.
    pub durations: Distribution,
    /// Fuel consumed per invocation.
    pub fuel_per_invocation: Distribution,
    /// The host's Prometheus metrics, when running in a host.
    pub metrics: Option<Arc<Metrics>>,
}

impl HandlerCounters {
    /// Counters that also feed `metrics`.
    pub fn with_metrics(metrics: Arc<Metrics>) -> Self {
        HandlerCounters {
            metrics: Some(metrics),
            ..HandlerCounters::default()
        }
    }
}

/// Outcome names, in counter order: `ok` then the failure kinds a guest can produce.
pub const OUTCOMES: [&str; 9] = [
    "ok",
    "retry",
    "fail",
    "timeout",
    "out_of_fuel",
    "memory_limit",
    "trap",
    "busy",
    "host",
];

/// The counter slot of an invocation result.
pub fn outcome_index(result: &Result<(), Failure>) -> usize {
    let name = match result {
        Ok(()) => "ok",
        Err(failure) => failure.kind.as_str(),
    };
    OUTCOMES
        .iter()
        .position(|o| *o == name)
        .unwrap_or(OUTCOMES.len() - 1)
}

/// What one invocation did.
#[derive(Debug, Clone, Serialize)]
pub struct Invocation {
    /// Ok, or the failure with its kind, message, fuel and log tail.
    #[serde(serialize_with = "serialize_result")]
    pub result: Result<(), Failure>,
    /// Log lines (host `log` and captured stdout/stderr), capped.
    pub logs: Vec<LogLine>,
    /// Log lines dropped over the cap.
    pub logs_dropped: usize,
    /// Derived events published.
    pub published: Vec<Event>,
    /// Fuel consumed by the call.
    pub fuel_used: u64,
    /// Wall-clock time of instantiation plus the call.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
}

impl Invocation {
    fn refused(failure: Failure, started: Instant) -> Self {
        Invocation {
            result: Err(failure),
            logs: Vec::new(),
            logs_dropped: 0,
            published: Vec::new(),
            fuel_used: 0,
            duration: started.elapsed(),
        }
    }
}

fn serialize_result<S: serde::Serializer>(
    result: &Result<(), Failure>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match result {
        Ok(()) => serializer.serialize_none(),
        Err(failure) => serializer.serialize_some(failure),
    }
}

/// A summary of a loaded version, for listings.
#[derive(Debug, Clone, Serialize)]
pub struct VersionInfo {
    /// Content hash.
    pub version: String,
    /// Effective patterns.
    pub patterns: Vec<String>,
    /// Patterns the component exports, if any.
    pub default_patterns: Option<Vec<String>>,
    /// When it was loaded.
    pub loaded_at: DateTime<Utc>,
    /// Whether it was compiled or read from the cache.
    pub compiled_from_cache: bool,
    /// Compile (or cache load) time.
    #[serde(with = "humantime_serde")]
    pub compile_time: Duration,
    /// Component size in bytes.
    pub size: usize,
    /// Limits and settings.
    pub spec: HandlerSpec,
}

impl CompiledHandler {
    /// Links and checks a compiled component ([`WasmEngine::compile_checked`]), and reads and
    /// checks its default patterns (within [`PATTERNS_TIMEOUT`], at most [`limits::MAX_PATTERNS`] of at
    /// most [`limits::MAX_PATTERN_LEN`] bytes, each valid — whether or not the manifest
    /// overrides them). CPU-heavy: call it off the event path (e.g. in `spawn_blocking`).
    ///
    /// # Errors
    /// [`WasmError`] saying what is wrong: an import the host does not provide, a missing or mismatched export, patterns that are invalid, too many
    /// or too long, or a `patterns()` that does not return in time.
    pub async fn load(
        engine: &WasmEngine,
        compiled: Compiled,
        spec: HandlerSpec,
        counters: Arc<HandlerCounters>,
    ) -> Result<Self, WasmError> {
        let Compiled {
            component,
            version,
            source: compile_source,
            time: compile_time,
            size,
        } = compiled;
        {
            let ty = component.component_type();
            let imports: Vec<String> = ty
                .imports(engine.engine())
                .map(|(name, _)| name.to_owned())
                .collect();
            crate::http::check_imports(imports.iter().map(String::as_str), spec.http.is_some())?;
            crate::keyvalue::check_imports(
                imports.iter().map(String::as_str),
                spec.keyvalue.is_some(),
                engine.keyvalue(),
            )?;
        }
        let pre = engine
            .linker()
            .instantiate_pre(&component)
            .map_err(|e| WasmError::Link(super::imports::explain_link_error(&format!("{e:#}"))))?;
        let indices = HandlerIndices::new(&pre).map_err(|e| {
            WasmError::Exports(format!(
                "{e:#}; a handler must export resolvespec:eventbroker/handler@0.1.0 with handle(event, context)"
            ))
        })?;
        let settings = Arc::new(StoreSettings {
            handler: spec.name.clone(),
            version: version.clone(),
            memory: spec.memory,
            fuel: spec.fuel,
            max_log_lines: spec.max_log_lines,
            max_log_bytes: spec.max_log_bytes,
            max_publishes: spec.max_publishes,
            config: spec.config.clone(),
            timeout: spec.timeout,
            http: spec.http.clone().map(Arc::new),
            keyvalue: spec.keyvalue.clone().map(Arc::new),
            keyvalue_store: engine.keyvalue().cloned(),
            metrics: counters.metrics.clone(),
        });
        let default_patterns = match SubscriptionIndices::new(&pre) {
            Ok(subscriptions) => {
                Some(read_patterns(&pre, &subscriptions, &settings, engine).await?)
            }
            Err(_) => None,
        };
        if let Some(defaults) = &default_patterns {
            limits::check_patterns(defaults, "component default").map_err(WasmError::Exports)?;
        }
        // No patterns at all is allowed here (the local runner runs any event); the handler
        // set refuses to serve such a handler.
        let patterns = match (&spec.patterns, &default_patterns) {
            (Some(patterns), _) => patterns.clone(),
            (None, Some(defaults)) => defaults.clone(),
            (None, None) => Vec::new(),
        };
        let warm = Arc::new(WarmPool::default());
        if spec.instances == InstancePolicy::Reuse {
            engine.slots().register(&warm);
        }
        Ok(CompiledHandler {
            permits: Arc::new(Semaphore::new(spec.concurrency)),
            spec,
            version,
            patterns,
            default_patterns,
            loaded_at: Utc::now(),
            compile_source,
            compile_time,
            size,
            pre,
            indices,
            settings,
            warm,
            counters,
            engine: engine.clone(),
        })
    }

    /// The handler's settings after defaults.
    pub fn spec(&self) -> &HandlerSpec {
        &self.spec
    }

    /// The version id (content hash).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The effective patterns.
    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    /// The counters shared by all versions of this handler name.
    pub fn counters(&self) -> &Arc<HandlerCounters> {
        &self.counters
    }

    /// A summary for listings.
    pub fn info(&self) -> VersionInfo {
        VersionInfo {
            version: self.version.clone(),
            patterns: self.patterns.clone(),
            default_patterns: self.default_patterns.clone(),
            loaded_at: self.loaded_at,
            compiled_from_cache: self.compile_source == CompileSource::Cache,
            compile_time: self.compile_time,
            size: self.size,
            spec: self.spec.clone(),
        }
    }

    /// Waits until no invocation of this version is running, stops new ones from starting,
    /// and gives its warm instances' slots back to the pool.
    pub async fn quiesce(&self) {
        if let Ok(permits) = self
            .permits
            .acquire_many(self.spec.concurrency as u32)
            .await
        {
            permits.forget();
        }
        self.permits.close();
        self.warm.clear();
    }

    /// Runs the handler on `event` under its limits. Waits for a concurrency slot and a slot
    /// of the instance pool first. The result is always one of: ok, guest retry/fail (its
    /// message cut to [`limits::MAX_MESSAGE_BYTES`]), out of fuel, memory limit, timeout, trap
    /// (with the trap message and backtrace, cut likewise), busy (no concurrency or pool slot
    /// within [`QUEUE_WAIT`]: deferred without counting an attempt), or host (the version was
    /// removed).
    pub async fn invoke(&self, event: &Event, attempt: u32, publisher: Publisher) -> Invocation {
        let started = Instant::now();
        let permit = tokio::time::timeout(QUEUE_WAIT, self.permits.clone().acquire_owned()).await;
        let _permit = match permit {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) => {
                return self.record(Invocation::refused(
                    Failure::new(
                        FailureKind::Host,
                        "handler version was removed before it could run",
                    ),
                    started,
                ));
            }
            Err(_) => {
                return self.record(Invocation::refused(
                    Failure::new(
                        FailureKind::Busy,
                        format!(
                            "all {} concurrent invocations of this handler (its `concurrency`) \
                             busy for {}; deferred without counting an attempt",
                            self.spec.concurrency,
                            humantime::format_duration(QUEUE_WAIT)
                        ),
                    ),
                    started,
                ));
            }
        };
        let deadline = Instant::now() + self.spec.timeout;
        let deadline_ms = (Utc::now()
            + chrono::Duration::from_std(self.spec.timeout).unwrap_or(chrono::Duration::MAX))
        .timestamp_millis()
        .max(0) as u64;
        let context = wit::Context {
            attempt,
            handler: self.spec.name.clone(),
            version: self.version.clone(),
            deadline_ms,
        };
        let wit_event = to_wit_event(event);
        let transfer = limits::transfer_limit(publisher.max_payload(), self.spec.max_log_bytes);
        let classifier = self.classifier(transfer);
        let mut live = match self.take_instance(deadline, &classifier).await {
            Ok(live) => live,
            Err(failure) => return self.record(Invocation::refused(failure, started)),
        };
        let Live {
            store, instance, ..
        } = &mut live;
        arm(store, self.spec.fuel, deadline);
        store.set_hostcall_fuel(transfer);
        store.data_mut().begin(&event.id, publisher);
        let call = async {
            let guest = self.indices.load(&mut *store, instance)?;
            guest.call_handle(&mut *store, &wit_event, &context).await
        };
        // The epoch deadline stops guest code; this also stops a guest blocked in a host call.
        let outcome = match tokio::time::timeout_at(deadline + HOST_CALL_GRACE, call).await {
            Ok(outcome) => outcome,
            Err(_) => Err(wasmtime::Error::from(Trap::Interrupt)),
        };
        let fuel_used = self.spec.fuel.saturating_sub(settle_fuel(store));
        let memory_exceeded = store.data().memory_exceeded;
        let (logs, logs_dropped, published) = store.data_mut().finish();
        let result = match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(HandlerError::Retry(message))) => Err(with_details(
                Failure::new(FailureKind::Retry, limits::truncate_message(message)),
                fuel_used,
                &logs,
            )),
            Ok(Err(HandlerError::Fail(message))) => Err(with_details(
                Failure::new(FailureKind::Fail, limits::truncate_message(message)),
                fuel_used,
                &logs,
            )),
            Err(error) => Err(with_details(
                classifier.classify(memory_exceeded, &error),
                fuel_used,
                &logs,
            )),
        };
        let trapped =
            matches!(&result, Err(f) if !matches!(f.kind, FailureKind::Retry | FailureKind::Fail));
        if self.spec.instances == InstancePolicy::Reuse && !trapped {
            self.warm.put(live, self.engine.slots());
        }
        self.record(Invocation {
            result,
            logs,
            logs_dropped,
            published,
            fuel_used,
            duration: started.elapsed(),
        })
    }

    fn record(&self, invocation: Invocation) -> Invocation {
        let counters = &self.counters;
        let outcome = outcome_index(&invocation.result);
        counters.outcomes[outcome].fetch_add(1, Ordering::Relaxed);
        if let Some(metrics) = &counters.metrics {
            metrics.invocation(
                &self.spec.name,
                OUTCOMES[outcome],
                invocation.fuel_used,
                invocation.duration,
            );
        }
        counters
            .fuel
            .fetch_add(invocation.fuel_used, Ordering::Relaxed);
        let micros = u64::try_from(invocation.duration.as_micros()).unwrap_or(u64::MAX);
        counters.micros.fetch_add(micros, Ordering::Relaxed);
        counters.durations.record(micros);
        counters.fuel_per_invocation.record(invocation.fuel_used);
        invocation
    }

    /// A warm instance (reuse) or a fresh one in a slot of the instance pool.
    async fn take_instance(
        &self,
        deadline: Instant,
        classifier: &Classifier,
    ) -> Result<Live, Failure> {
        if self.spec.instances == InstancePolicy::Reuse
            && let Some(live) = self.warm.take()
        {
            return Ok(live);
        }
        let slot = self
            .engine
            .slots()
            .acquire(QUEUE_WAIT)
            .await
            .map_err(|full| {
                Failure::new(
                    FailureKind::Busy,
                    format!(
                        "{full} for {}; deferred without counting an attempt (the host's \
                         capacity, not the handler's fault)",
                        humantime::format_duration(QUEUE_WAIT)
                    ),
                )
            })?;
        let mut store = Store::new(self.engine.engine(), HostState::new(self.settings.clone()));
        store.limiter(|state| state);
        arm(&mut store, self.spec.fuel, deadline);
        let instantiate = self.pre.instantiate_async(&mut store);
        let error = match tokio::time::timeout_at(deadline + HOST_CALL_GRACE, instantiate).await {
            Ok(Ok(instance)) => return Ok(Live::new(store, instance, slot)),
            Ok(Err(error)) => error,
            Err(_) => wasmtime::Error::from(Trap::Interrupt),
        };
        let memory_exceeded = store.data().memory_exceeded;
        Err(with_details(
            classifier.classify(memory_exceeded, &error),
            0,
            &[],
        ))
    }

    fn classifier(&self, transfer: usize) -> Classifier {
        Classifier {
            fuel: self.spec.fuel,
            memory: self.spec.memory,
            timeout: self.spec.timeout,
            transfer,
        }
    }
}

/// Takes the fuel owed for bytes the guest handed the host off the store's fuel, and returns
/// what is left.
fn settle_fuel(store: &mut Store<HostState>) -> u64 {
    let debt = store.data_mut().take_fuel_debt();
    let left = store.get_fuel().unwrap_or(0).saturating_sub(debt);
    // Fuel is enabled in the engine config, so setting it cannot fail.
    let _ = store.set_fuel(left);
    left
}

/// Sets the fuel budget and the wall-clock deadline of a store. Past the deadline the guest
/// is interrupted; before it, it yields to the async runtime at every epoch tick so that a
/// busy guest never starves other tasks. At every tick, the fuel owed for bytes the guest
/// handed the host is taken off its fuel, so a guest whose host calls use up its fuel runs out.
fn arm(store: &mut Store<HostState>, fuel: u64, deadline: Instant) {
    // Fuel is enabled in the engine config, so setting it cannot fail.
    let _ = store.set_fuel(fuel);
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(move |mut store| {
        let debt = store.data_mut().take_fuel_debt();
        if debt > 0 {
            let left = store.get_fuel()?.saturating_sub(debt);
            store.set_fuel(left)?;
        }
        if Instant::now() >= deadline {
            Ok(UpdateDeadline::Interrupt)
        } else {
            // tokio's own yield puts the task at the back of the run queue; a plain wake would
            // re-poll it at once and starve everything else on this worker thread.
            Ok(UpdateDeadline::YieldCustom(
                1,
                Box::pin(tokio::task::yield_now()),
            ))
        }
    });
}

/// Calls a component's `patterns()` export in a fresh instance, within [`PATTERNS_FUEL`] and
/// [`PATTERNS_TIMEOUT`] (also when it waits in a host call), receiving at most
/// [`limits::PATTERNS_TRANSFER`] bytes.
async fn read_patterns(
    pre: &InstancePre<HostState>,
    indices: &SubscriptionIndices,
    settings: &Arc<StoreSettings>,
    engine: &WasmEngine,
) -> Result<Vec<String>, WasmError> {
    let deadline = Instant::now() + PATTERNS_TIMEOUT;
    let run = async {
        let _slot = engine
            .slots()
            .acquire(PATTERNS_TIMEOUT)
            .await
            .map_err(|full| {
                WasmError::Engine(format!("cannot read the component's patterns(): {full}"))
            })?;
        let mut store = Store::new(engine.engine(), HostState::new(settings.clone()));
        store.limiter(|state| state);
        arm(&mut store, PATTERNS_FUEL, deadline);
        store.set_hostcall_fuel(limits::PATTERNS_TRANSFER);
        let call = async {
            let instance = pre.instantiate_async(&mut store).await?;
            let guest = indices.load(&mut store, &instance)?;
            guest.call_patterns(&mut store).await
        };
        call.await.map_err(|error| {
            let reason = if limits::is_transfer_exceeded(&error) {
                format!(
                    "it returned more than {} bytes; at most {} patterns of at most {} bytes are allowed",
                    limits::PATTERNS_TRANSFER,
                    limits::MAX_PATTERNS,
                    limits::MAX_PATTERN_LEN
                )
            } else if matches!(error.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
                format!(
                    "it did not return within {}",
                    humantime::format_duration(PATTERNS_TIMEOUT)
                )
            } else {
                format!("{error:#}")
            };
            WasmError::Exports(format!(
                "calling the component's patterns(): {}",
                limits::truncate_message(reason)
            ))
        })
    };
    match tokio::time::timeout_at(deadline + HOST_CALL_GRACE, run).await {
        Ok(result) => result,
        Err(_) => Err(WasmError::Exports(format!(
            "calling the component's patterns(): it did not return within {} (it waited in a \
             host call, e.g. on a clock); patterns() must return its list at once",
            humantime::format_duration(PATTERNS_TIMEOUT)
        ))),
    }
}

fn wit_source(source: EventSource) -> wit::Source {
    match source {
        EventSource::Database => wit::Source::Database,
        EventSource::Websocket => wit::Source::Websocket,
        EventSource::Frontend => wit::Source::Frontend,
        EventSource::System => wit::Source::System,
        EventSource::Internal => wit::Source::Internal,
    }
}

fn wit_status(status: EventStatus) -> wit::Status {
    match status {
        EventStatus::Pending => wit::Status::Pending,
        EventStatus::Processing => wit::Status::Processing,
        EventStatus::Completed => wit::Status::Completed,
        EventStatus::Failed => wit::Status::Failed,
    }
}

/// The WIT form of an event: payload and metadata as JSON text, times as RFC 3339.
pub fn to_wit_event(event: &Event) -> wit::Event {
    wit::Event {
        id: event.id.clone(),
        source: wit_source(event.source),
        event_type: event.event_type.clone(),
        status: wit_status(event.status),
        payload: event.payload.to_string(),
        user_id: event.user_id,
        session_id: event.session_id.clone(),
        instance_id: event.instance_id.clone(),
        schema: event.schema.clone(),
        entity: event.entity.clone(),
        operation: event.operation.clone(),
        created_at: event.created_at.to_rfc3339(),
        processed_at: event.processed_at.map(|t| t.to_rfc3339()),
        completed_at: event.completed_at.map(|t| t.to_rfc3339()),
        error: event.error.clone(),
        metadata: serde_json::Value::Object(event.metadata.clone()).to_string(),
        retry_count: event.retry_count,
    }
}
