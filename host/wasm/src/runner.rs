//! The local guest runner behind `eventbroker run`: one component, one or more sample events,
//! the same sandbox and limits as the service with its default settings (sample events and
//! derived events are checked as `serve` checks published events, the component's patterns as
//! `serve` checks them), derived events recorded instead of published.

use std::time::Duration;

use serde::Serialize;

use super::WasmError;
use super::component::{CompiledHandler, Invocation, VersionInfo};
use super::engine::ComponentBytes;
use super::engine::WasmEngine;
use super::manifest::Manifest;
use super::state::Publisher;
use crate::config::{HandlerDefaults, PoolConfig};
use eventbroker::config::{BrokerConfig, RetryPolicy};
use eventbroker::event::{Event, EventDraft};

/// Limits given on the command line; they win over the manifest.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// Fuel per invocation.
    pub fuel: Option<u64>,
    /// Memory limit in bytes.
    pub memory: Option<bytesize::ByteSize>,
    /// Deadline per invocation.
    pub timeout: Option<Duration>,
    /// Refuse every outbound HTTP request, even those the manifest grants.
    pub deny_net: bool,
    /// The key-value file of the run (`--kv`): its buckets are loaded for the handler before
    /// the first event. The engine must have its [`crate::keyvalue::file::KvFile::binding`].
    pub keyvalue: Option<crate::keyvalue::file::KvFile>,
}

/// One event and what the handler did with it.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    /// The event as the handler saw it.
    pub event: Event,
    /// The invocation.
    #[serde(flatten)]
    pub invocation: Invocation,
}

/// Everything `eventbroker run` reports.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// The loaded version (compile time, cache use, patterns, limits).
    pub handler: VersionInfo,
    /// Whether each event's type matches the handler's patterns (the service would only
    /// deliver matching events; the runner runs every event given). Always true when the
    /// handler has no patterns.
    pub matched: Vec<bool>,
    /// Time from reading the component to the end of the first invocation: what a cold
    /// start costs.
    #[serde(with = "humantime_serde")]
    pub first_invocation_latency: Duration,
    /// One result per event, in order.
    pub results: Vec<RunResult>,
}

impl RunReport {
    /// True if every invocation succeeded.
    pub fn all_ok(&self) -> bool {
        self.results.iter().all(|r| r.invocation.result.is_ok())
    }
}

/// Parses sample events: one JSON object, or several (JSON lines or concatenated), each in
/// the form of `POST /v1/events` and checked as it would be (with the default
/// `event_broker.max_payload`).
///
/// # Errors
/// [`WasmError::Io`] naming the event number and what is wrong with it.
pub fn parse_events(text: &str) -> Result<Vec<Event>, WasmError> {
    let max_payload = BrokerConfig::default().max_payload.as_u64() as usize;
    let mut events = Vec::new();
    for (index, draft) in serde_json::Deserializer::from_str(text)
        .into_iter::<EventDraft>()
        .enumerate()
    {
        let draft = draft
            .map_err(|e| WasmError::Io(format!("sample event {} is invalid: {e}", index + 1)))?;
        let event = draft.into_event("local");
        event
            .validate(max_payload)
            .map_err(|e| WasmError::Io(format!("sample event {} is invalid: {e}", index + 1)))?;
        events.push(event);
    }
    if events.is_empty() {
        return Err(WasmError::Io("no sample events given".into()));
    }
    Ok(events)
}

/// Loads `bytes` with `manifest` (and `overrides`) and runs each event in order.
///
/// # Errors
/// [`WasmError`] if the component cannot be loaded; failing invocations are results, not errors.
pub async fn run(
    engine: &WasmEngine,
    bytes: &[u8],
    manifest: Option<&str>,
    overrides: &Overrides,
    events: Vec<Event>,
) -> Result<RunReport, WasmError> {
    let started = std::time::Instant::now();
    let manifest = match manifest {
        Some(text) => Manifest::parse(text)?,
        None => Manifest::default(),
    };
    let mut manifest = manifest;
    if overrides.fuel.is_some() {
        manifest.fuel = overrides.fuel;
    }
    if overrides.memory.is_some() {
        manifest.memory = overrides.memory;
    }
    if overrides.timeout.is_some() {
        manifest.timeout = overrides.timeout;
    }
    let pool = PoolConfig::default();
    let mut spec = manifest.resolve(
        "local",
        &HandlerDefaults::default(),
        &RetryPolicy::default(),
        &pool,
    )?;
    if overrides.deny_net
        && let Some(grant) = spec.http.as_mut()
    {
        grant.refuse_all =
            Some("outbound HTTP is off for this run (eventbroker run --deny-net)".into());
    }
    if let Some(file) = &overrides.keyvalue {
        file.load(&spec.name);
    }
    let compiled = engine.compile_checked(&ComponentBytes::new(bytes.to_vec())?)?;
    let handler = CompiledHandler::load(engine, compiled, spec, Default::default()).await?;
    let patterns: Vec<eventbroker::pattern::Pattern> = handler
        .patterns()
        .iter()
        .filter_map(|p| p.parse().ok())
        .collect();
    let mut results = Vec::with_capacity(events.len());
    let mut matched = Vec::with_capacity(events.len());
    let mut first_invocation_latency = None;
    for event in events {
        matched.push(patterns.is_empty() || patterns.iter().any(|p| p.matches(&event.event_type)));
        let invocation = handler.invoke(&event, 1, Publisher::Record).await;
        first_invocation_latency.get_or_insert_with(|| started.elapsed());
        results.push(RunResult { event, invocation });
    }
    Ok(RunReport {
        handler: handler.info(),
        matched,
        first_invocation_latency: first_invocation_latency.unwrap_or_default(),
        results,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_one_event_json_lines_and_pretty_json() {
        let one = parse_events(r#"{"type": "a.b", "payload": {"x": 1}}"#).expect("one");
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].payload["x"], 1);
        let lines = parse_events("{\"type\":\"a.b\"}\n{\"type\":\"c.d\"}\n").expect("lines");
        assert_eq!(lines.len(), 2);
        let pretty =
            parse_events("{\n  \"type\": \"a.b\"\n}\n\n{\n \"type\": \"x\"\n}").expect("pretty");
        assert_eq!(pretty.len(), 2);
        let err = parse_events("{\"type\":\"a.b\"}\n{\"typo\":1}")
            .unwrap_err()
            .to_string();
        assert!(err.contains("sample event 2"), "{err}");
        let err = parse_events("{\"type\":\"a..b\"}").unwrap_err().to_string();
        assert!(err.contains("invalid type"), "{err}");
        assert!(parse_events("  ").is_err());
    }
}
