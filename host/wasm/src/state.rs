//! What a guest's store holds: the WASI context (nothing granted), the memory limiter, the
//! captured log, the per-invocation budgets, and the host imports (`log`, `publish`, `config`).
//!
//! Every budget is per invocation and starts afresh in [`HostState::begin`], also for an
//! instance kept warm under the `reuse` policy. Bytes a guest hands the host through `log`,
//! `publish` and its output streams are charged to its fuel (one unit per byte), so host work
//! done on a guest's behalf ends with the guest's own budget.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, Trap};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::http::grant::HttpGrant;
use crate::http::outbound::OutboundHttp;
use crate::keyvalue::grant::KeyValueGrant;
use crate::keyvalue::{KeyValueBinding, KvAccess};

use super::bindings::resolvespec::eventbroker::host::Host;
use super::bindings::types::{EventDraft, LogLevel};
use super::draft::{draft_size, to_event};
use super::log::{CapturedOutput, LogLine, LogSink};
use eventbroker::broker::HandlerContext;
use eventbroker::config::BrokerConfig;
use eventbroker::event::Event;

/// Where derived events published by a guest go.
#[derive(Clone)]
pub enum Publisher {
    /// Through the broker, tagged with the causing event (the service).
    Broker(HandlerContext),
    /// Recorded only (`eventbroker run`), after the checks the broker would make with its
    /// default settings.
    Record,
}

impl Publisher {
    /// The largest payload a derived event may carry: the broker's `max_payload`, or its
    /// default for the local runner (and for a broker that has gone away).
    pub fn max_payload(&self) -> usize {
        let configured = match self {
            Publisher::Broker(ctx) => ctx.broker().ok().map(|b| b.config().max_payload),
            Publisher::Record => None,
        };
        configured
            .unwrap_or_else(|| BrokerConfig::default().max_payload)
            .as_u64() as usize
    }
}

/// Settings of a handler that its stores share.
#[derive(Debug)]
pub struct StoreSettings {
    /// Handler name.
    pub handler: String,
    /// Version id.
    pub version: String,
    /// Memory limit in bytes.
    pub memory: u64,
    /// Fuel per invocation.
    pub fuel: u64,
    /// Log lines per invocation.
    pub max_log_lines: usize,
    /// Log bytes per invocation.
    pub max_log_bytes: usize,
    /// Publish calls per invocation (refused ones included).
    pub max_publishes: u32,
    /// `config(key)` values.
    pub config: BTreeMap<String, String>,
    /// Deadline of one invocation (outbound HTTP is bounded by what is left of it).
    pub timeout: std::time::Duration,
    /// Outbound HTTP granted by the manifest.
    pub http: Option<Arc<HttpGrant>>,
    /// Key-value buckets granted by the manifest.
    pub keyvalue: Option<Arc<KeyValueGrant>>,
    /// The host's key-value store, when it has one.
    pub keyvalue_store: Option<KeyValueBinding>,
    /// The host's metrics (outbound HTTP requests, key-value operations), when running in a
    /// host.
    pub metrics: Option<Arc<eventbroker::metrics::Metrics>>,
}

/// The data of one guest store.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    http_ctx: WasiHttpCtx,
    http: OutboundHttp,
    kv: KvAccess,
    settings: Arc<StoreSettings>,
    log: Arc<Mutex<LogSink>>,
    /// Set when the guest tried to grow memory past its limit.
    pub(crate) memory_exceeded: bool,
    call: CallState,
}

/// What one invocation has used so far; replaced as a whole by [`HostState::begin`].
#[derive(Default)]
struct CallState {
    event_id: String,
    publisher: Option<Publisher>,
    published: Vec<Event>,
    /// Publish calls, accepted or refused.
    publish_calls: u32,
    /// Bytes handed to the host and charged to fuel, in all.
    charged: u64,
    /// Charged bytes not yet taken off the store's fuel.
    fuel_debt: u64,
}

impl HostState {
    /// A store state that grants the guest nothing but clocks, random and captured output.
    pub fn new(settings: Arc<StoreSettings>) -> Self {
        let log = Arc::new(Mutex::new(LogSink::new(
            settings.max_log_lines,
            settings.max_log_bytes,
        )));
        let wasi = WasiCtxBuilder::new()
            .stdout(CapturedOutput {
                sink: log.clone(),
                stream: 0,
            })
            .stderr(CapturedOutput {
                sink: log.clone(),
                stream: 1,
            })
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        HostState {
            wasi,
            table: ResourceTable::new(),
            http_ctx: WasiHttpCtx::new(),
            http: OutboundHttp::new(
                settings.http.clone(),
                settings.handler.clone(),
                log.clone(),
                settings.metrics.clone(),
            ),
            kv: KvAccess::new(
                settings.keyvalue.clone(),
                settings.keyvalue_store.clone(),
                settings.handler.clone(),
                log.clone(),
                settings.metrics.clone(),
            ),
            settings,
            log,
            memory_exceeded: false,
            call: CallState::default(),
        }
    }

    fn sink(&self) -> std::sync::MutexGuard<'_, LogSink> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Prepares for an invocation on `event`: every per-invocation budget (log lines and
    /// bytes, unfinished output lines, publishes, charged bytes) starts afresh.
    pub(crate) fn begin(&mut self, event_id: &str, publisher: Publisher) {
        *self.sink() = LogSink::new(self.settings.max_log_lines, self.settings.max_log_bytes);
        self.call = CallState {
            event_id: event_id.to_owned(),
            publisher: Some(publisher),
            ..CallState::default()
        };
        self.memory_exceeded = false;
        let deadline = std::time::Instant::now() + self.settings.timeout;
        self.http.begin(deadline);
        self.kv.begin(deadline);
    }

    /// Ends an invocation: its log lines, how many were dropped, and the events it published.
    pub(crate) fn finish(&mut self) -> (Vec<LogLine>, usize, Vec<Event>) {
        let (lines, dropped) = self.sink().finish();
        let published = std::mem::take(&mut self.call.published);
        self.call.publisher = None;
        (lines, dropped, published)
    }

    /// Fuel owed for bytes handed to the host since the last call (output streams included),
    /// to be taken off the store's fuel.
    pub(crate) fn take_fuel_debt(&mut self) -> u64 {
        let written = self.sink().take_written() as u64;
        self.call.charged = self.call.charged.saturating_add(written);
        std::mem::take(&mut self.call.fuel_debt).saturating_add(written)
    }

    /// Charges `bytes` handed to the host to the guest's fuel. Traps with out-of-fuel at once
    /// when the bytes alone exceed the invocation's fuel.
    pub(crate) fn charge(&mut self, bytes: usize) -> wasmtime::Result<()> {
        let bytes = bytes as u64;
        self.call.charged = self.call.charged.saturating_add(bytes);
        self.call.fuel_debt = self.call.fuel_debt.saturating_add(bytes);
        if self.call.charged > self.settings.fuel {
            return Err(Trap::OutOfFuel.into());
        }
        Ok(())
    }

    /// The resource table and the key-value access of this store (`wasi:keyvalue` calls).
    pub(crate) fn kv_parts(&mut self) -> (&mut ResourceTable, &mut KvAccess) {
        (&mut self.table, &mut self.kv)
    }

    fn log_line(&mut self, level: &'static str, message: String) {
        {
            let mut sink = self.sink();
            if !sink.fits(message.len()) {
                sink.count_dropped();
                return;
            }
        }
        let handler = &self.settings.handler;
        let version = &self.settings.version;
        let event_id = &self.call.event_id;
        match level {
            "error" => tracing::error!(target: "guest", handler, version, event_id, "{message}"),
            "warn" => tracing::warn!(target: "guest", handler, version, event_id, "{message}"),
            "info" => tracing::info!(target: "guest", handler, version, event_id, "{message}"),
            "debug" => tracing::debug!(target: "guest", handler, version, event_id, "{message}"),
            _ => tracing::trace!(target: "guest", handler, version, event_id, "{message}"),
        }
        self.sink().push(level, message);
    }
}

impl WasiHttpView for HostState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http_ctx,
            table: &mut self.table,
            hooks: &mut self.http,
        }
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl ResourceLimiter for HostState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired as u64 > self.settings.memory {
            self.memory_exceeded = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        _desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(true)
    }
}

fn level_name(level: LogLevel) -> &'static str {
    match level {
        LogLevel::Trace => "trace",
        LogLevel::Debug => "debug",
        LogLevel::Info => "info",
        LogLevel::Warn => "warn",
        LogLevel::Error => "error",
    }
}

impl Host for HostState {
    fn log(&mut self, level: LogLevel, message: String) -> wasmtime::Result<()> {
        self.charge(message.len())?;
        self.log_line(level_name(level), message);
        Ok(())
    }

    async fn publish(&mut self, draft: EventDraft) -> wasmtime::Result<Result<String, String>> {
        self.charge(draft_size(&draft))?;
        // Every call counts, refused ones included: a guest looping on refused drafts ends
        // its budget like one that publishes.
        self.call.publish_calls = self.call.publish_calls.saturating_add(1);
        if self.call.publish_calls > self.settings.max_publishes {
            return Ok(Err(format!(
                "publish budget of this invocation used up ({} calls, refused ones included); \
                 every further publish is refused",
                self.settings.max_publishes
            )));
        }
        let Some(publisher) = self.call.publisher.clone() else {
            return Ok(Err(
                "publish is only available while handling an event".to_owned()
            ));
        };
        let max_payload = publisher.max_payload();
        let result = match publisher {
            Publisher::Broker(ctx) => {
                let instance_id = ctx
                    .broker()
                    .map(|b| b.instance_id().to_owned())
                    .unwrap_or_default();
                match to_event(draft, &instance_id, max_payload) {
                    Err(reason) => Err(reason),
                    Ok(event) => {
                        let mut recorded = event.clone();
                        match ctx.publish(event).await {
                            Ok(id) => {
                                recorded.id = id.clone();
                                self.call.published.push(recorded);
                                Ok(id)
                            }
                            Err(error) => Err(error.to_string()),
                        }
                    }
                }
            }
            Publisher::Record => to_event(draft, "local", max_payload).map(|event| {
                let id = event.id.clone();
                self.call.published.push(event);
                id
            }),
        };
        Ok(result)
    }

    fn config(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        self.charge(key.len())?;
        Ok(self.settings.config.get(&key).cloned())
    }
}

impl super::bindings::types::Host for HostState {}
