//! Tracing setup: `RUST_LOG` (or the config's `log.level`) filters, `log.format` picks text or
//! JSON lines on stderr, and `log.otlp_endpoint` exports spans over OTLP/HTTP (protobuf) to a
//! collector.
//!
//! With an exporter, each processed event is a trace of spans — `event` (one delivery of an
//! event, with its id and type) and under it one `invoke` per handler — and an event that
//! carries a W3C trace context (`traceparent` from a CloudEvent, or the `traceparent` header of
//! the publishing request; see [`eventbroker::trace_context`]) continues its publisher's trace.

use std::io::IsTerminal;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use serde::{Deserialize, Serialize};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `eventbroker=debug`; `RUST_LOG` wins when set.
    pub level: String,
    /// An OTLP/HTTP collector to export spans to, e.g. `http://127.0.0.1:4318` (spans are
    /// POSTed to `/v1/traces` under it unless the URL already ends there). Unset: no export.
    pub otlp_endpoint: Option<String>,
    /// The `service.name` of exported spans.
    pub service_name: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
            otlp_endpoint: None,
            service_name: "eventbroker".into(),
        }
    }
}

/// Why the trace exporter could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("log.otlp_endpoint {endpoint:?}: {reason}")]
pub struct TelemetryError {
    endpoint: String,
    reason: String,
}

/// Keeps the trace exporter running; dropping it flushes the spans not yet sent (within the
/// exporter's timeout) and stops it.
#[must_use = "dropping the guard stops the trace exporter"]
#[derive(Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(Err(error)) = self.provider.take().map(|p| p.shutdown()) {
            eprintln!("eventbroker: the trace exporter did not flush: {error}");
        }
    }
}

/// The URL spans are POSTed to: `endpoint` with `/v1/traces` appended unless it ends with it.
fn traces_url(endpoint: &str) -> String {
    let trimmed = endpoint.trim_end_matches('/');
    if trimmed.ends_with("/v1/traces") {
        trimmed.to_owned()
    } else {
        format!("{trimmed}/v1/traces")
    }
}

fn exporter(config: &LogConfig, endpoint: &str) -> Result<SdkTracerProvider, TelemetryError> {
    let url = traces_url(endpoint);
    let invalid = |reason: String| TelemetryError {
        endpoint: endpoint.to_owned(),
        reason,
    };
    let parsed: axum::http::Uri = url
        .parse()
        .map_err(|e| invalid(format!("not a URL: {e}")))?;
    if !matches!(parsed.scheme_str(), Some("http" | "https")) || parsed.host().is_none() {
        return Err(invalid(
            "expected an http:// or https:// URL with a host".into(),
        ));
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(url)
        .build()
        .map_err(|e| invalid(e.to_string()))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(config.service_name.clone())
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// Makes `span` a child of the remote span a W3C trace context names (installed into
/// [`eventbroker::trace_context`] when spans are exported).
fn set_remote_parent(span: &tracing::Span, traceparent: &str, tracestate: Option<&str>) {
    use opentelemetry::propagation::TextMapPropagator;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let mut carrier = std::collections::HashMap::with_capacity(2);
    carrier.insert("traceparent".to_owned(), traceparent.to_owned());
    if let Some(state) = tracestate {
        carrier.insert("tracestate".to_owned(), state.to_owned());
    }
    let context = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(context);
}

/// Installs the global tracing subscriber: stderr logs as `config` says and, with
/// `log.otlp_endpoint`, the OTLP span exporter. Keep the returned guard for the life of the
/// process (dropping it flushes and stops the exporter). Calling it again (tests) changes
/// nothing and exports nothing.
///
/// # Errors
/// [`TelemetryError`] when `log.otlp_endpoint` is not an http(s) URL.
pub fn init(config: &LogConfig) -> Result<Telemetry, TelemetryError> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::stderr().is_terminal();
    let logs: Box<dyn Layer<Registry> + Send + Sync> = match config.format {
        LogFormat::Text => Box::new(
            tracing_subscriber::fmt::layer()
                .with_ansi(ansi)
                .with_writer(std::io::stderr),
        ),
        LogFormat::Json => Box::new(
            tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_writer(std::io::stderr),
        ),
    };
    let provider = match &config.otlp_endpoint {
        Some(endpoint) => Some(exporter(config, endpoint)?),
        None => None,
    };
    let spans = provider
        .as_ref()
        .map(|provider| tracing_opentelemetry::layer().with_tracer(provider.tracer("eventbroker")));
    let installed = tracing_subscriber::registry()
        .with(logs)
        .with(spans)
        .with(filter)
        .try_init()
        .is_ok();
    if !installed {
        // A subscriber was already installed: this one's exporter would receive nothing.
        if let Some(provider) = provider {
            let _ = provider.shutdown();
        }
        return Ok(Telemetry::default());
    }
    if provider.is_some() {
        eventbroker::trace_context::install(set_remote_parent);
    }
    Ok(Telemetry { provider })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_go_to_v1_traces_under_the_endpoint() {
        assert_eq!(traces_url("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(
            traces_url("http://c:4318/v1/traces"),
            "http://c:4318/v1/traces"
        );
        assert_eq!(traces_url("https://c/otlp"), "https://c/otlp/v1/traces");
    }

    #[test]
    fn an_endpoint_that_is_not_an_http_url_is_refused_by_name() {
        for bad in ["127.0.0.1:4318", "ftp://c/x", "http://", "not a url"] {
            let config = LogConfig {
                otlp_endpoint: Some(bad.into()),
                ..LogConfig::default()
            };
            let Err(error) = exporter(&config, bad) else {
                panic!("{bad:?} was accepted")
            };
            assert!(error.to_string().contains("log.otlp_endpoint"), "{error}");
        }
    }
}
