//! What a guest's store holds: the WASI context (nothing granted), the memory limiter, the
//! captured log, and the host imports (`log`, `publish`, `config`).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};

use serde_json::{Map, Value};
use tokio::io::AsyncWrite;
use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use super::bindings::resolvespec::eventbroker::host::Host;
use super::bindings::types::{EventDraft, LogLevel, Source};
use crate::broker::HandlerContext;
use crate::event::{Event, EventDraft as HostDraft, EventSource};

/// One captured log line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LogLine {
    /// `trace`, `debug`, `info`, `warn`, `error`, or `stdout`/`stderr` for captured output.
    pub level: &'static str,
    /// The text.
    pub message: String,
}

/// The log of one invocation, capped in lines and bytes; the rest is counted, not kept.
#[derive(Debug, Default)]
pub struct LogSink {
    lines: Vec<LogLine>,
    bytes: usize,
    dropped: usize,
    max_lines: usize,
    max_bytes: usize,
    partial: [Vec<u8>; 2],
}

impl LogSink {
    fn new(max_lines: usize, max_bytes: usize) -> Self {
        LogSink {
            max_lines,
            max_bytes,
            ..LogSink::default()
        }
    }

    /// Records a line; returns false if it was over budget and dropped.
    fn push(&mut self, level: &'static str, message: String) -> bool {
        if self.lines.len() >= self.max_lines || self.bytes + message.len() > self.max_bytes {
            self.dropped += 1;
            return false;
        }
        self.bytes += message.len();
        self.lines.push(LogLine { level, message });
        true
    }

    fn write_stream(&mut self, stream: usize, bytes: &[u8]) {
        let level = if stream == 0 { "stdout" } else { "stderr" };
        let mut buffer = std::mem::take(&mut self.partial[stream]);
        buffer.extend_from_slice(bytes);
        while let Some(end) = buffer.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            self.push(level, text);
        }
        // Guard against a guest writing an endless line without newlines.
        if buffer.len() > self.max_bytes {
            self.dropped += 1;
            buffer.clear();
        }
        self.partial[stream] = buffer;
    }

    fn finish(&mut self) -> (Vec<LogLine>, usize) {
        for stream in 0..2 {
            let rest = std::mem::take(&mut self.partial[stream]);
            if !rest.is_empty() {
                let level = if stream == 0 { "stdout" } else { "stderr" };
                self.push(level, String::from_utf8_lossy(&rest).into_owned());
            }
        }
        (
            std::mem::take(&mut self.lines),
            std::mem::replace(&mut self.dropped, 0),
        )
    }
}

/// A guest's stdout or stderr, written into the invocation's [`LogSink`].
#[derive(Clone)]
struct CapturedOutput {
    sink: Arc<Mutex<LogSink>>,
    stream: usize,
}

impl IsTerminal for CapturedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CapturedOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl AsyncWrite for CapturedOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.sink
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write_stream(self.stream, buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Where derived events published by a guest go.
#[derive(Clone)]
pub enum Publisher {
    /// Through the broker, tagged with the causing event (the service).
    Broker(HandlerContext),
    /// Recorded only (`eventbroker run`).
    Record,
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
    /// Log lines per invocation.
    pub max_log_lines: usize,
    /// Log bytes per invocation.
    pub max_log_bytes: usize,
    /// Derived events per invocation.
    pub max_publishes: u32,
    /// `config(key)` values.
    pub config: BTreeMap<String, String>,
}

/// The data of one guest store.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    settings: Arc<StoreSettings>,
    log: Arc<Mutex<LogSink>>,
    /// Set when the guest tried to grow memory past its limit.
    pub(crate) memory_exceeded: bool,
    call: CallState,
}

#[derive(Default)]
struct CallState {
    event_id: String,
    publisher: Option<Publisher>,
    published: Vec<Event>,
    publishes_refused: u32,
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
            settings,
            log,
            memory_exceeded: false,
            call: CallState::default(),
        }
    }

    /// Prepares for an invocation on `event`.
    pub(crate) fn begin(&mut self, event_id: &str, publisher: Publisher) {
        self.call = CallState {
            event_id: event_id.to_owned(),
            publisher: Some(publisher),
            published: Vec::new(),
            publishes_refused: 0,
        };
        self.memory_exceeded = false;
    }

    /// Ends an invocation: its log lines, how many were dropped, and the events it published.
    pub(crate) fn finish(&mut self) -> (Vec<LogLine>, usize, Vec<Event>) {
        let (lines, dropped) = self.log.lock().unwrap_or_else(|p| p.into_inner()).finish();
        let published = std::mem::take(&mut self.call.published);
        self.call.publisher = None;
        (lines, dropped, published)
    }

    fn log_line(&mut self, level: &'static str, message: String) {
        let kept = self
            .log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(level, message.clone());
        if !kept {
            return;
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

fn source_of(source: Source) -> EventSource {
    match source {
        Source::Database => EventSource::Database,
        Source::Websocket => EventSource::Websocket,
        Source::Frontend => EventSource::Frontend,
        Source::System => EventSource::System,
        Source::Internal => EventSource::Internal,
    }
}

/// Turns a guest's draft into an event, or says why it cannot be one.
fn draft_to_event(draft: EventDraft, instance_id: &str) -> Result<Event, String> {
    let payload = match draft.payload {
        Some(text) => Some(
            serde_json::from_str::<Value>(&text)
                .map_err(|e| format!("payload is not JSON: {e}"))?,
        ),
        None => None,
    };
    let metadata = match draft.metadata {
        Some(text) => Some(
            serde_json::from_str::<Map<String, Value>>(&text)
                .map_err(|e| format!("metadata is not a JSON object: {e}"))?,
        ),
        None => None,
    };
    let host_draft = HostDraft {
        id: None,
        source: Some(draft.source.map_or(EventSource::Internal, source_of)),
        event_type: draft.event_type,
        payload,
        user_id: draft.user_id,
        session_id: draft.session_id,
        schema: draft.schema,
        entity: draft.entity,
        operation: draft.operation,
        metadata,
        created_at: None,
    };
    Ok(host_draft.into_event(instance_id))
}

impl Host for HostState {
    fn log(&mut self, level: LogLevel, message: String) -> wasmtime::Result<()> {
        self.log_line(level_name(level), message);
        Ok(())
    }

    async fn publish(&mut self, draft: EventDraft) -> wasmtime::Result<Result<String, String>> {
        if self.call.published.len() as u32 >= self.settings.max_publishes {
            self.call.publishes_refused += 1;
            return Ok(Err(format!(
                "publish budget of this invocation used up ({} events)",
                self.settings.max_publishes
            )));
        }
        let publisher = self.call.publisher.clone();
        let result = match publisher {
            Some(Publisher::Broker(ctx)) => {
                let instance_id = ctx
                    .broker()
                    .map(|b| b.instance_id().to_owned())
                    .unwrap_or_default();
                match draft_to_event(draft, &instance_id) {
                    Err(reason) => Err(reason),
                    Ok(event) => {
                        let recorded = event.clone();
                        match ctx.publish(event).await {
                            Ok(id) => {
                                let mut recorded = recorded;
                                recorded.id = id.clone();
                                self.call.published.push(recorded);
                                Ok(id)
                            }
                            Err(error) => Err(error.to_string()),
                        }
                    }
                }
            }
            Some(Publisher::Record) => match draft_to_event(draft, "local") {
                Err(reason) => Err(reason),
                Ok(event) => match event.validate(usize::MAX) {
                    Err(error) => Err(error.to_string()),
                    Ok(()) => {
                        let id = event.id.clone();
                        self.call.published.push(event);
                        Ok(id)
                    }
                },
            },
            None => Err("publish is only available while handling an event".to_owned()),
        };
        Ok(result)
    }

    fn config(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        Ok(self.settings.config.get(&key).cloned())
    }
}

impl super::bindings::types::Host for HostState {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_sink_caps_lines_and_bytes_and_splits_streams() {
        let mut sink = LogSink::new(3, 1000);
        sink.write_stream(0, b"hello\nwor");
        sink.write_stream(0, b"ld\n");
        sink.push("info", "direct".into());
        sink.push("info", "over".into());
        sink.write_stream(1, b"tail without newline");
        let (lines, dropped) = sink.finish();
        let texts: Vec<_> = lines
            .iter()
            .map(|l| (l.level, l.message.as_str()))
            .collect();
        assert_eq!(
            texts,
            [("stdout", "hello"), ("stdout", "world"), ("info", "direct")]
        );
        assert_eq!(dropped, 2);
        let mut small = LogSink::new(100, 10);
        small.push("info", "0123456789".into());
        assert!(!small.push("info", "x".into()));
        let mut endless = LogSink::new(100, 8);
        endless.write_stream(0, &[b'x'; 64]);
        let (lines, dropped) = endless.finish();
        assert!(lines.is_empty());
        assert_eq!(dropped, 1);
    }
}
