//! One loaded version of a handler: the compiled component, pre-instantiated against the host's
//! linker, with its limits; and the invocation of it on one event.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use wasmtime::component::{Instance, InstancePre};
use wasmtime::{Store, Trap, UpdateDeadline};

use super::WasmError;
use super::bindings::types::{self as wit, HandlerError};
use super::bindings::{HandlerIndices, SubscriptionIndices};
use super::engine::{CompileSource, WasmEngine, version_id};
use super::manifest::HandlerSpec;
use super::state::{HostState, LogLine, Publisher, StoreSettings};
use crate::config::InstancePolicy;
use crate::event::{Event, EventSource, EventStatus, Failure, FailureKind};
use crate::metrics::Metrics;
use crate::pattern::Pattern;

/// Fuel granted to a component's `patterns()` export when it is loaded.
const PATTERNS_FUEL: u64 = 10_000_000;
/// Deadline of a component's `patterns()` export when it is loaded.
const PATTERNS_TIMEOUT: Duration = Duration::from_secs(5);
/// How long past its deadline a guest blocked in a host call (where epoch interruption cannot
/// reach it) is given before its invocation is abandoned.
const HOST_CALL_GRACE: Duration = Duration::from_millis(100);
/// How long an invocation waits for one of the handler's concurrency slots before the event
/// is deferred (retried later for this handler, without counting an attempt). Keeps a
/// saturated or misbehaving handler from tying up the broker's workers.
const QUEUE_WAIT: Duration = Duration::from_millis(100);
/// Log lines kept in a failure record.
const FAILURE_LOG_TAIL: usize = 10;

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
    warm: Mutex<Vec<Warm>>,
    permits: Arc<Semaphore>,
    counters: Arc<HandlerCounters>,
    engine: WasmEngine,
}

/// A warm instance kept for the `reuse` policy.
struct Warm {
    store: Store<HostState>,
    instance: Instance,
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
    /// Compiles (or loads from cache), links and checks a component, and reads its default
    /// patterns. CPU-heavy: call it off the event path (e.g. in `spawn_blocking`).
    ///
    /// # Errors
    /// [`WasmError`] saying what is wrong: not a component, compile failure, an import the host
    /// does not provide, a missing or mismatched export, no patterns.
    pub async fn load(
        engine: &WasmEngine,
        bytes: &[u8],
        spec: HandlerSpec,
        counters: Arc<HandlerCounters>,
    ) -> Result<Self, WasmError> {
        let started = std::time::Instant::now();
        let (component, compile_source) = engine.compile(bytes)?;
        let compile_time = started.elapsed();
        let pre = engine
            .linker()
            .instantiate_pre(&component)
            .map_err(|e| WasmError::Link(super::check::explain_link_error(&format!("{e:#}"))))?;
        let indices = HandlerIndices::new(&pre).map_err(|e| {
            WasmError::Exports(format!(
                "{e:#}; a handler must export resolvespec:eventbroker/handler@0.1.0 with handle(event, context)"
            ))
        })?;
        let version = version_id(bytes);
        let settings = Arc::new(StoreSettings {
            handler: spec.name.clone(),
            version: version.clone(),
            memory: spec.memory,
            max_log_lines: spec.max_log_lines,
            max_log_bytes: spec.max_log_bytes,
            max_publishes: spec.max_publishes,
            config: spec.config.clone(),
        });
        let default_patterns = match SubscriptionIndices::new(&pre) {
            Ok(subscriptions) => {
                Some(read_patterns(&pre, &subscriptions, &settings, engine).await?)
            }
            Err(_) => None,
        };
        // No patterns at all is allowed here (the local runner runs any event); the handler
        // set refuses to serve such a handler.
        let patterns = match (&spec.patterns, &default_patterns) {
            (Some(patterns), _) => patterns.clone(),
            (None, Some(defaults)) => defaults.clone(),
            (None, None) => Vec::new(),
        };
        for pattern in &patterns {
            Pattern::new(pattern)
                .map_err(|e| WasmError::Manifest(format!("component default {e}")))?;
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
            size: bytes.len(),
            pre,
            indices,
            settings,
            warm: Mutex::new(Vec::new()),
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

    /// Waits until no invocation of this version is running, and stops new ones from starting.
    pub async fn quiesce(&self) {
        if let Ok(permits) = self
            .permits
            .acquire_many(self.spec.concurrency as u32)
            .await
        {
            permits.forget();
        }
        self.permits.close();
    }

    /// Runs the handler on `event` under its limits. Waits for a concurrency slot first.
    /// The result is always one of: ok, guest retry/fail, out of fuel, memory limit, timeout,
    /// trap (with the trap message and backtrace), or host (the slot was closed).
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
                            "all {} instances busy for {}; deferred",
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
        let (mut store, instance) = match self.take_instance(deadline).await {
            Ok(pair) => pair,
            Err((store, error)) => {
                let failure = self.classify(
                    store.as_ref().map(|s| s.data().memory_exceeded),
                    error,
                    0,
                    Vec::new(),
                );
                return self.record(Invocation {
                    result: Err(failure),
                    logs: Vec::new(),
                    logs_dropped: 0,
                    published: Vec::new(),
                    fuel_used: 0,
                    duration: started.elapsed(),
                });
            }
        };
        arm(&mut store, self.spec.fuel, deadline);
        store.data_mut().begin(&event.id, publisher);
        let call = async {
            let guest = self.indices.load(&mut store, &instance)?;
            guest.call_handle(&mut store, &wit_event, &context).await
        };
        // The epoch deadline stops guest code; this also stops a guest blocked in a host call.
        let outcome = match tokio::time::timeout_at(deadline + HOST_CALL_GRACE, call).await {
            Ok(outcome) => outcome,
            Err(_) => Err(wasmtime::Error::from(Trap::Interrupt)),
        };
        let fuel_used = self.spec.fuel.saturating_sub(store.get_fuel().unwrap_or(0));
        let memory_exceeded = store.data().memory_exceeded;
        let (logs, logs_dropped, published) = store.data_mut().finish();
        let result = match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(HandlerError::Retry(message))) => Err(with_details(
                Failure::new(FailureKind::Retry, message),
                fuel_used,
                &logs,
            )),
            Ok(Err(HandlerError::Fail(message))) => Err(with_details(
                Failure::new(FailureKind::Fail, message),
                fuel_used,
                &logs,
            )),
            Err(error) => Err(self.classify(Some(memory_exceeded), error, fuel_used, logs.clone())),
        };
        let trapped =
            matches!(&result, Err(f) if !matches!(f.kind, FailureKind::Retry | FailureKind::Fail));
        if self.spec.instances == InstancePolicy::Reuse && !trapped {
            self.warm
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Warm { store, instance });
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
        counters
            .micros
            .fetch_add(invocation.duration.as_micros() as u64, Ordering::Relaxed);
        invocation
    }

    /// A warm instance (reuse) or a fresh one.
    async fn take_instance(
        &self,
        deadline: Instant,
    ) -> Result<(Store<HostState>, Instance), (Option<Store<HostState>>, wasmtime::Error)> {
        if self.spec.instances == InstancePolicy::Reuse {
            let warm = self.warm.lock().unwrap_or_else(|p| p.into_inner()).pop();
            if let Some(Warm { store, instance }) = warm {
                return Ok((store, instance));
            }
        }
        let mut store = Store::new(self.engine.engine(), HostState::new(self.settings.clone()));
        store.limiter(|state| state);
        arm(&mut store, self.spec.fuel, deadline);
        let instantiate = self.pre.instantiate_async(&mut store);
        match tokio::time::timeout_at(deadline + HOST_CALL_GRACE, instantiate).await {
            Ok(Ok(instance)) => Ok((store, instance)),
            Ok(Err(error)) => Err((Some(store), error)),
            Err(_) => Err((Some(store), wasmtime::Error::from(Trap::Interrupt))),
        }
    }

    fn classify(
        &self,
        memory_exceeded: Option<bool>,
        error: wasmtime::Error,
        fuel_used: u64,
        logs: Vec<LogLine>,
    ) -> Failure {
        let trap = error.downcast_ref::<Trap>().copied();
        let failure = if memory_exceeded == Some(true) {
            Failure::new(
                FailureKind::MemoryLimit,
                format!(
                    "memory limit of {} reached: {error:#}",
                    bytesize::ByteSize::b(self.spec.memory)
                ),
            )
        } else {
            match trap {
                Some(Trap::OutOfFuel) => Failure::new(
                    FailureKind::OutOfFuel,
                    format!("ran out of fuel ({} units)", self.spec.fuel),
                ),
                Some(Trap::Interrupt) => Failure::new(
                    FailureKind::Timeout,
                    format!(
                        "did not finish within {}",
                        humantime::format_duration(self.spec.timeout)
                    ),
                ),
                Some(_) => Failure::new(FailureKind::Trap, format!("{error:?}")),
                None => {
                    let text = format!("{error:?}");
                    if text.contains("memory") && text.contains("limit") {
                        Failure::new(FailureKind::MemoryLimit, text)
                    } else {
                        Failure::new(FailureKind::Trap, text)
                    }
                }
            }
        };
        with_details(failure, fuel_used, &logs)
    }
}

fn with_details(mut failure: Failure, fuel_used: u64, logs: &[LogLine]) -> Failure {
    failure.fuel_used = Some(fuel_used);
    let skip = logs.len().saturating_sub(FAILURE_LOG_TAIL);
    failure.log_tail = logs[skip..]
        .iter()
        .map(|line| format!("{}: {}", line.level, line.message))
        .collect();
    failure
}

/// Sets the fuel budget and the wall-clock deadline of a store. Past the deadline the guest
/// is interrupted; before it, it yields to the async runtime at every epoch tick so that a
/// busy guest never starves other tasks.
fn arm(store: &mut Store<HostState>, fuel: u64, deadline: Instant) {
    // Fuel is enabled in the engine config, so setting it cannot fail.
    let _ = store.set_fuel(fuel);
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(move |_| {
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

async fn read_patterns(
    pre: &InstancePre<HostState>,
    indices: &SubscriptionIndices,
    settings: &Arc<StoreSettings>,
    engine: &WasmEngine,
) -> Result<Vec<String>, WasmError> {
    let mut store = Store::new(engine.engine(), HostState::new(settings.clone()));
    store.limiter(|state| state);
    arm(&mut store, PATTERNS_FUEL, Instant::now() + PATTERNS_TIMEOUT);
    let run = async {
        let instance = pre.instantiate_async(&mut store).await?;
        let guest = indices.load(&mut store, &instance)?;
        guest.call_patterns(&mut store).await
    };
    run.await
        .map_err(|e| WasmError::Exports(format!("calling the component's patterns(): {e:#}")))
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
