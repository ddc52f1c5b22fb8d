//! Traces over OTLP: `eventbroker serve` with `log.otlp_endpoint` pointing at an OTLP/HTTP
//! collector run by this test (axum, decoding the protobuf requests with the OpenTelemetry
//! protocol's own message types). A publisher's W3C trace context — the `traceparent` header of
//! `POST /v1/events`, and a binary-mode CloudEvent's `ce-traceparent` — must reach the collector
//! as the parent of the host's `event` span, whose child is the handler's `invoke` span.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::routing::post;
use common::serve::{serve_with, sigterm, wait_exit};
use eventbroker_testkit::{PATIENCE, guests};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::{Value, json};

/// Every span the collector received, with its service name.
#[derive(Default, Clone)]
struct Received(Arc<Mutex<Vec<(String, Span)>>>);

impl Received {
    fn spans(&self) -> Vec<(String, Span)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// An OTLP/HTTP collector on a free port; returns its base URL. Runs until the runtime drops.
fn collector(runtime: &tokio::runtime::Runtime, received: Received) -> String {
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind the collector");
    let addr = listener.local_addr().expect("collector address");
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let received = received.clone();
            async move {
                let request = ExportTraceServiceRequest::decode(body)
                    .expect("the exporter sends ExportTraceServiceRequest protobuf");
                let mut spans = received.0.lock().unwrap_or_else(|p| p.into_inner());
                for resource in request.resource_spans {
                    let service = resource
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|a| a.key == "service.name")
                        .and_then(|a| a.value.as_ref())
                        .map(|v| format!("{:?}", v.value))
                        .unwrap_or_default();
                    for scope in resource.scope_spans {
                        for span in scope.spans {
                            spans.push((service.clone(), span));
                        }
                    }
                }
                // An empty ExportTraceServiceResponse.
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }),
    );
    runtime.spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Waits until the collector holds an `invoke` span of trace `trace_id` and returns the
/// spans of that trace.
fn trace(received: &Received, trace_id: &str) -> Vec<Span> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let spans: Vec<Span> = received
            .spans()
            .into_iter()
            .map(|(_, span)| span)
            .filter(|span| hex(&span.trace_id) == trace_id)
            .collect();
        if spans.iter().any(|s| s.name == "invoke") {
            return spans;
        }
        assert!(
            Instant::now() < deadline,
            "no invoke span of trace {trace_id} reached the collector; spans of it: {:?}",
            spans.iter().map(|s| &s.name).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The trace's `event` span is a child of the publisher's span, and an `invoke` span of the
/// handler is the event span's child.
fn assert_continues(spans: &[Span], parent_span: &str, handler: &str) {
    let event = spans
        .iter()
        .find(|s| s.name == "event")
        .unwrap_or_else(|| panic!("no event span: {spans:?}"));
    assert_eq!(
        hex(&event.parent_span_id),
        parent_span,
        "the event span continues the publisher's span"
    );
    let invoke = spans
        .iter()
        .find(|s| s.name == "invoke")
        .unwrap_or_else(|| panic!("no invoke span: {spans:?}"));
    assert_eq!(
        invoke.parent_span_id, event.span_id,
        "the invoke span is the event span's child"
    );
    let attribute = |name: &str| {
        invoke
            .attributes
            .iter()
            .find(|a| a.key == name)
            .and_then(|a| a.value.as_ref())
            .map(|v| format!("{:?}", v.value))
            .unwrap_or_default()
    };
    assert!(
        attribute("handler").contains(handler),
        "invoke span attributes: {:?}",
        invoke.attributes
    );
}

#[test]
fn a_publishers_trace_continues_through_the_event_and_its_handler_invocation() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let received = Received::default();
    let endpoint = collector(&runtime, received.clone());
    let built = guests::build();
    let dir = tempfile::tempdir().expect("temp dir");
    let handlers = dir.path().join("handlers");
    std::fs::create_dir_all(&handlers).expect("handlers dir");
    std::fs::copy(
        built.guest("rust_audit_logger"),
        handlers.join("audit-logger.wasm"),
    )
    .expect("install the handler");
    std::fs::copy(
        built.guest_dir("rust-audit-logger").join("manifest.toml"),
        handlers.join("audit-logger.toml"),
    )
    .expect("install the manifest");
    let mut served = serve_with(
        dir.path(),
        &["--handlers", handlers.to_str().expect("utf-8 path")],
        &[
            ("EVENTBROKER_LOG__OTLP_ENDPOINT", endpoint.as_str()),
            ("EVENTBROKER_LOG__SERVICE_NAME", "eventbroker-trace-test"),
        ],
    );
    let http = reqwest::blocking::Client::new();
    // The audit logger's default pattern is `*`: any one-segment type.
    let event_type = "traced";
    // Plain JSON with a traceparent header.
    let (trace_a, span_a) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let response = http
        .post(format!("{}/v1/events?mode=sync", served.url))
        .header("traceparent", format!("00-{trace_a}-{span_a}-01"))
        .json(&json!({"type": event_type, "payload": {"n": 1}}))
        .send()
        .expect("publish");
    assert_eq!(response.status(), 200);
    let event: Value = response.json().expect("the final event");
    assert_eq!(event["handlers"][0]["handler"], "audit-logger", "{event:#}");
    assert_eq!(
        event["metadata"]["traceparent"],
        format!("00-{trace_a}-{span_a}-01"),
        "the context is stored with the event"
    );

    // A binary-mode CloudEvent carrying its own context (the distributed-tracing extension).
    let (trace_b, span_b) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let response = http
        .post(format!("{}/v1/events", served.url))
        .header("content-type", "application/json")
        .header("ce-specversion", "1.0")
        .header("ce-id", "traced-1")
        .header("ce-source", "/tests/traces")
        .header("ce-type", event_type)
        .header("ce-traceparent", format!("00-{trace_b}-{span_b}-01"))
        .body(r#"{"n": 2}"#)
        .send()
        .expect("publish a CloudEvent");
    assert_eq!(response.status(), 202);

    assert_continues(&trace(&received, trace_a), span_a, "audit-logger");
    assert_continues(&trace(&received, trace_b), span_b, "audit-logger");
    let services: Vec<String> = received.spans().into_iter().map(|(s, _)| s).collect();
    assert!(
        services
            .iter()
            .all(|s| s.contains("eventbroker-trace-test")),
        "service.name comes from log.service_name: {services:?}"
    );

    sigterm(&served.child);
    assert!(wait_exit(&mut served.child).success());
    drop(runtime);
}
