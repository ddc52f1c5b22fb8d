//! Prometheus metrics, with the plan's names.
//!
//! Label cardinality is bounded: the `type` label takes at most [`MAX_TYPE_LABELS`] distinct
//! event types per host; later new types are counted under `type="other"`. Types that embed
//! ids (`orders.42.update`) should therefore be avoided as event types, or they end up as
//! `other` once the budget is spent. Handler labels are bounded by the number of deployed
//! handlers.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;

use crate::event::EventStatus;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Most distinct `type` label values per host.
pub const MAX_TYPE_LABELS: usize = 200;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    source: String,
    r#type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProcessedLabels {
    source: String,
    r#type: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandlerLabels {
    handler: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    handler: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KvLabels {
    handler: String,
    op: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpBytesLabels {
    handler: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    handler: String,
    decision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InvocationLabels {
    handler: String,
    outcome: String,
}

/// The metric series of one (source, type) pair, looked up once and kept: the dispatch path
/// then counts with atomic adds, without building labels or hashing them per event.
struct EventSeries {
    published: Counter,
    duration: Histogram,
    completed: Counter,
    failed: Counter,
    retried: Counter,
    dead_lettered: Counter,
}

/// Series by event type, then source; bounded like the `type` label (types past the budget
/// share the `other` series through the slow path).
type SeriesCache = HashMap<String, HashMap<&'static str, EventSeries>>;

/// The host's metrics and their registry.
pub struct Metrics {
    registry: Registry,
    types: Mutex<HashSet<String>>,
    series: RwLock<SeriesCache>,
    published: Family<EventLabels, Counter>,
    processed: Family<ProcessedLabels, Counter>,
    processing_duration: Family<EventLabels, Histogram>,
    retried: Family<EventLabels, Counter>,
    dead_lettered: Family<EventLabels, Counter>,
    queue_size: Gauge,
    workers_active: Gauge,
    invocations: Family<InvocationLabels, Counter>,
    invocation_duration: Family<HandlerLabels, Histogram>,
    fuel: Family<HandlerLabels, Counter>,
    fuel_per_invocation: Family<HandlerLabels, Histogram>,
    reloads: Family<HandlerLabels, Counter>,
    rejections: Family<HandlerLabels, Counter>,
    canary_decisions: Family<DecisionLabels, Counter>,
    http_requests: Family<HttpLabels, Counter>,
    http_bytes: Family<HttpBytesLabels, Counter>,
    http_duration: Family<HandlerLabels, Histogram>,
    kv_operations: Family<KvLabels, Counter>,
    kv_duration: Family<HandlerLabels, Histogram>,
    source_failures: Family<SourceLabels, Counter>,
    websocket_closes: Family<ReasonLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.5, 14))
}

/// Fuel per invocation: 1 000 to about 4 billion, ×4 per bucket.
fn fuel_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1000.0, 4.0, 12))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let published = Family::<EventLabels, Counter>::default();
        let processed = Family::<ProcessedLabels, Counter>::default();
        let processing_duration = Family::<EventLabels, Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        let queue_size = Gauge::default();
        let workers_active = Gauge::default();
        let invocations = Family::<InvocationLabels, Counter>::default();
        let invocation_duration = Family::<HandlerLabels, Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        let fuel = Family::<HandlerLabels, Counter>::default();
        let fuel_per_invocation = Family::<HandlerLabels, Histogram>::new_with_constructor(
            fuel_histogram as fn() -> Histogram,
        );
        let retried = Family::<EventLabels, Counter>::default();
        let dead_lettered = Family::<EventLabels, Counter>::default();
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_owned(),
            })
            .set(1);
        registry.register(
            "eventbroker_build_info",
            "The host's version (the value is always 1)",
            build_info,
        );
        #[cfg(target_os = "linux")]
        registry.register_collector(Box::new(crate::process_metrics::ProcessCollector));
        registry.register(
            "eventbroker_events_retried",
            "Attempts that ended with a retry scheduled",
            retried.clone(),
        );
        registry.register(
            "eventbroker_events_dead_lettered",
            "Events that failed for good (dead letters)",
            dead_lettered.clone(),
        );
        registry.register(
            "eventbroker_handler_fuel",
            "Fuel consumed per WebAssembly handler invocation",
            fuel_per_invocation.clone(),
        );
        let reloads = Family::<HandlerLabels, Counter>::default();
        let rejections = Family::<HandlerLabels, Counter>::default();
        let canary_decisions = Family::<DecisionLabels, Counter>::default();
        let http_requests = Family::<HttpLabels, Counter>::default();
        let http_bytes = Family::<HttpBytesLabels, Counter>::default();
        let http_duration = Family::<HandlerLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 4.0, 9))
        });
        let kv_operations = Family::<KvLabels, Counter>::default();
        let kv_duration = Family::<HandlerLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 4.0, 9))
        });
        let source_failures = Family::<SourceLabels, Counter>::default();
        let websocket_closes = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "eventbroker_events_published",
            "Events accepted by publish",
            published.clone(),
        );
        registry.register(
            "eventbroker_events_processed",
            "Events that finished processing, by final status",
            processed.clone(),
        );
        registry.register(
            "eventbroker_event_processing_duration_seconds",
            "Time to process one attempt of an event (all its handlers)",
            processing_duration.clone(),
        );
        registry.register(
            "eventbroker_queue_size",
            "Deliveries waiting for a worker on this host",
            queue_size.clone(),
        );
        registry.register(
            "eventbroker_workers_active",
            "Workers processing an event",
            workers_active.clone(),
        );
        registry.register(
            "eventbroker_handler_invocations",
            "WebAssembly handler invocations by outcome",
            invocations.clone(),
        );
        registry.register(
            "eventbroker_handler_duration_seconds",
            "WebAssembly handler invocation time",
            invocation_duration.clone(),
        );
        registry.register(
            "eventbroker_handler_fuel_consumed",
            "Fuel consumed by WebAssembly handler invocations",
            fuel.clone(),
        );
        registry.register(
            "eventbroker_handler_reloads",
            "Handler versions loaded (first load included)",
            reloads.clone(),
        );
        registry.register(
            "eventbroker_handler_rejections",
            "Handler versions rejected (compile, check or manifest errors)",
            rejections.clone(),
        );
        registry.register(
            "eventbroker_handler_canary_decisions",
            "Canary trials ended, by decision (promoted, rolled_back, promoted_manually, aborted)",
            canary_decisions.clone(),
        );
        registry.register(
            "eventbroker_handler_http_requests",
            "Outbound HTTP requests of handlers, by response status (or refused, error)",
            http_requests.clone(),
        );
        registry.register(
            "eventbroker_handler_http_bytes",
            "Outbound HTTP body bytes of handlers, by direction (sent, received)",
            http_bytes.clone(),
        );
        registry.register(
            "eventbroker_handler_http_request_duration_seconds",
            "Time from an outbound HTTP request of a handler to its response headers",
            http_duration.clone(),
        );
        registry.register(
            "eventbroker_handler_kv_operations",
            "Key-value operations of handlers, by operation and result (ok, refused, quota, error)",
            kv_operations.clone(),
        );
        registry.register(
            "eventbroker_handler_kv_operation_duration_seconds",
            "Time of one key-value operation of a handler (refused ones excluded)",
            kv_duration.clone(),
        );
        registry.register(
            "eventbroker_source_publish_failures",
            "Events an event source (CRUD hooks, change capture, WebSocket) could not publish",
            source_failures.clone(),
        );
        registry.register(
            "eventbroker_websocket_disconnects",
            "WebSocket connections closed by the host, by reason",
            websocket_closes.clone(),
        );
        Metrics {
            registry,
            types: Mutex::new(HashSet::new()),
            series: RwLock::new(HashMap::new()),
            published,
            processed,
            processing_duration,
            retried,
            dead_lettered,
            queue_size,
            workers_active,
            invocations,
            invocation_duration,
            fuel,
            fuel_per_invocation,
            reloads,
            rejections,
            canary_decisions,
            http_requests,
            http_bytes,
            http_duration,
            kv_operations,
            kv_duration,
            source_failures,
            websocket_closes,
        }
    }

    /// The bounded `type` label for an event type.
    fn type_label(&self, event_type: &str) -> String {
        let mut types = self.types.lock().unwrap_or_else(|p| p.into_inner());
        if types.contains(event_type) {
            return event_type.to_owned();
        }
        if types.len() < MAX_TYPE_LABELS {
            types.insert(event_type.to_owned());
            return event_type.to_owned();
        }
        "other".to_owned()
    }

    /// Runs `f` on the series of (`source`, `event_type`), creating them on first use.
    fn with_series(&self, source: &'static str, event_type: &str, f: impl FnOnce(&EventSeries)) {
        {
            let cache = self.series.read().unwrap_or_else(|p| p.into_inner());
            if let Some(series) = cache.get(event_type).and_then(|by| by.get(source)) {
                f(series);
                return;
            }
        }
        let r#type = self.type_label(event_type);
        let labels = EventLabels {
            source: source.to_owned(),
            r#type: r#type.clone(),
        };
        let processed = |status: EventStatus| {
            self.processed
                .get_or_create(&ProcessedLabels {
                    source: source.to_owned(),
                    r#type: r#type.clone(),
                    status: status.as_str().to_owned(),
                })
                .clone()
        };
        let series = EventSeries {
            published: self.published.get_or_create(&labels).clone(),
            duration: self.processing_duration.get_or_create(&labels).clone(),
            completed: processed(EventStatus::Completed),
            failed: processed(EventStatus::Failed),
            retried: self.retried.get_or_create(&labels).clone(),
            dead_lettered: self.dead_lettered.get_or_create(&labels).clone(),
        };
        f(&series);
        if r#type == "other" && event_type != "other" {
            // Past the label budget: not cached, so the cache stays bounded.
            return;
        }
        let mut cache = self.series.write().unwrap_or_else(|p| p.into_inner());
        cache
            .entry(event_type.to_owned())
            .or_default()
            .entry(source)
            .or_insert(series);
    }

    /// Counts a published event.
    pub fn event_published(&self, source: &'static str, event_type: &str) {
        self.with_series(source, event_type, |series| {
            series.published.inc();
        });
    }

    /// Counts an attempt's end: its duration and, when the attempt finished the event, its
    /// final status (`completed`, or `failed`, which is also a dead letter); `None` means a
    /// retry was scheduled. Any other status counts the duration only.
    pub fn event_attempt(
        &self,
        source: &'static str,
        event_type: &str,
        finished: Option<EventStatus>,
        elapsed: Duration,
    ) {
        self.with_series(source, event_type, |series| {
            series.duration.observe(elapsed.as_secs_f64());
            let counter = match finished {
                Some(EventStatus::Completed) => &series.completed,
                Some(EventStatus::Failed) => {
                    series.dead_lettered.inc();
                    &series.failed
                }
                None => &series.retried,
                _ => return,
            };
            counter.inc();
        });
    }

    /// Sets the queue and worker gauges.
    pub fn set_pool(&self, queued: usize, active: usize) {
        self.queue_size.set(queued as i64);
        self.workers_active.set(active as i64);
    }

    /// Counts a handler invocation.
    pub fn invocation(&self, handler: &str, outcome: &str, fuel: u64, elapsed: Duration) {
        let labels = HandlerLabels {
            handler: handler.to_owned(),
        };
        self.invocations
            .get_or_create(&InvocationLabels {
                handler: handler.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
        self.invocation_duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
        self.fuel.get_or_create(&labels).inc_by(fuel);
        self.fuel_per_invocation
            .get_or_create(&labels)
            .observe(fuel as f64);
    }

    /// Counts a loaded handler version.
    pub fn handler_loaded(&self, handler: &str) {
        self.reloads
            .get_or_create(&HandlerLabels {
                handler: handler.to_owned(),
            })
            .inc();
    }

    /// Counts a rejected handler version.
    pub fn handler_rejected(&self, handler: &str) {
        self.rejections
            .get_or_create(&HandlerLabels {
                handler: handler.to_owned(),
            })
            .inc();
    }

    /// Records one outbound HTTP request of `handler`: its `status` (a code, `refused` or
    /// `error`), how long it took and the body bytes sent and received.
    pub fn handler_http_request(
        &self,
        handler: &str,
        status: &str,
        duration: std::time::Duration,
        sent: u64,
        received: u64,
    ) {
        self.http_requests
            .get_or_create(&HttpLabels {
                handler: handler.to_owned(),
                status: status.to_owned(),
            })
            .inc();
        self.handler_http_bytes(handler, "sent", sent);
        self.handler_http_bytes(handler, "received", received);
        if status != "refused" {
            self.http_duration
                .get_or_create(&HandlerLabels {
                    handler: handler.to_owned(),
                })
                .observe(duration.as_secs_f64());
        }
    }

    /// Counts outbound HTTP body bytes of `handler` in `direction` (`sent`, `received`).
    pub fn handler_http_bytes(&self, handler: &str, direction: &'static str, bytes: u64) {
        if bytes > 0 {
            self.http_bytes
                .get_or_create(&HttpBytesLabels {
                    handler: handler.to_owned(),
                    direction,
                })
                .inc_by(bytes);
        }
    }

    /// Records one key-value operation `op` (`get`, `set`, `delete`, `exists`, `list_keys`,
    /// `increment`, `open`) of `handler` with its `result` (`ok`, `refused`, `quota`, `error`)
    /// and, unless refused, its duration.
    pub fn handler_kv_operation(
        &self,
        handler: &str,
        op: &'static str,
        result: &'static str,
        duration: std::time::Duration,
    ) {
        self.kv_operations
            .get_or_create(&KvLabels {
                handler: handler.to_owned(),
                op,
                result,
            })
            .inc();
        if result != "refused" {
            self.kv_duration
                .get_or_create(&HandlerLabels {
                    handler: handler.to_owned(),
                })
                .observe(duration.as_secs_f64());
        }
    }

    /// Counts the end of a canary trial of `handler` by `decision`.
    pub fn canary_decision(&self, handler: &str, decision: &str) {
        self.canary_decisions
            .get_or_create(&DecisionLabels {
                handler: handler.to_owned(),
                decision: decision.to_owned(),
            })
            .inc();
    }

    /// Counts an event that an event source (`crud_hooks`, `capture`, `websocket`) failed to
    /// publish.
    pub fn source_publish_failed(&self, source: &str) {
        self.source_failures
            .get_or_create(&SourceLabels {
                source: source.to_owned(),
            })
            .inc();
    }

    /// Counts a WebSocket connection the host closed (`slow_client`, `message_too_big`, …).
    pub fn websocket_closed(&self, reason: &str) {
        self.websocket_closes
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_names_appear_and_type_labels_are_bounded() {
        let metrics = Metrics::new();
        metrics.event_published("database", "public.users.create");
        metrics.event_attempt(
            "database",
            "public.users.create",
            Some(EventStatus::Completed),
            Duration::from_millis(3),
        );
        metrics.event_attempt(
            "frontend",
            "shop.orders.create",
            None,
            Duration::from_millis(1),
        );
        metrics.event_attempt(
            "frontend",
            "shop.orders.create",
            Some(EventStatus::Failed),
            Duration::from_millis(1),
        );
        metrics.set_pool(2, 1);
        metrics.invocation("audit", "ok", 1234, Duration::from_millis(1));
        metrics.handler_loaded("audit");
        metrics.handler_rejected("audit");
        metrics.source_publish_failed("crud_hooks");
        for i in 0..(MAX_TYPE_LABELS + 10) {
            metrics.event_published("system", &format!("orders.{i}.update"));
        }
        let text = metrics.encode();
        for name in [
            "eventbroker_events_published_total{source=\"database\",type=\"public.users.create\"} 1",
            "eventbroker_events_processed_total{source=\"database\",type=\"public.users.create\",status=\"completed\"} 1",
            "eventbroker_event_processing_duration_seconds_bucket",
            "eventbroker_queue_size 2",
            "eventbroker_events_retried_total{source=\"frontend\",type=\"shop.orders.create\"} 1",
            "eventbroker_events_dead_lettered_total{source=\"frontend\",type=\"shop.orders.create\"} 1",
            "eventbroker_events_processed_total{source=\"frontend\",type=\"shop.orders.create\",status=\"failed\"} 1",
            "eventbroker_handler_fuel_bucket{le=\"4000.0\",handler=\"audit\"} 1",
            "eventbroker_handler_fuel_count{handler=\"audit\"} 1",
            concat!(
                "eventbroker_build_info{version=\"",
                env!("CARGO_PKG_VERSION"),
                "\"} 1"
            ),
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_virtual_memory_bytes ",
            "process_open_fds ",
            "process_max_fds ",
            "process_threads ",
            "process_start_time_seconds ",
            "eventbroker_workers_active 1",
            "eventbroker_handler_invocations_total{handler=\"audit\",outcome=\"ok\"} 1",
            "eventbroker_handler_fuel_consumed_total{handler=\"audit\"} 1234",
            "eventbroker_handler_reloads_total{handler=\"audit\"} 1",
            "eventbroker_handler_rejections_total{handler=\"audit\"} 1",
            "type=\"other\"",
            "eventbroker_source_publish_failures_total{source=\"crud_hooks\"} 1",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
