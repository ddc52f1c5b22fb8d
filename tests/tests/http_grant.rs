//! Outbound HTTP granted by a handler's manifest, against a loopback server this test runs:
//! what the grant allows goes through; every other request (another path or host, a redirect
//! out of the list, a name that resolves to a loopback address, over the request budget) is
//! refused with an error the guest sees, before anything leaves the host; an oversized
//! response and a server slower than the invocation's deadline end as errors the guest sees;
//! a component that imports wasi:http without a grant is refused at deploy.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use eventbroker_tests::guests;
use eventbroker_tests::host::TestHost;
use serde_json::{Value, json};

/// The loopback server: what it received, and its port.
struct Server {
    port: u16,
    hits: Arc<AtomicUsize>,
    bodies: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
}

async fn server() -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let hits = Arc::new(AtomicUsize::new(0));
    let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (h, b) = (hits.clone(), bodies.clone());
    let app = Router::new()
        .route(
            "/hooks/ok",
            post(move |body: Bytes| async move {
                h.fetch_add(1, Ordering::SeqCst);
                b.lock().expect("bodies").push(body.to_vec());
                "ok"
            }),
        )
        .route(
            "/hooks/redirect",
            get(move || async move {
                // Out of the list: another loopback address.
                (
                    StatusCode::FOUND,
                    [(
                        header::LOCATION,
                        format!("http://127.0.0.2:{port}/hooks/ok"),
                    )],
                )
            }),
        )
        .route("/hooks/big", get(|| async { vec![b'x'; 2 * 1024 * 1024] }))
        .route(
            "/hooks/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "late".into_response()
            }),
        );
    tokio::spawn(async move { axum::serve(listener, app).await });
    Server { port, hits, bodies }
}

/// The handler's last failure message and log tail, as one text.
fn failure(event: &Value) -> String {
    let outcome = &event["handlers"][0];
    format!(
        "{} | {}",
        outcome["last_error"]["message"], outcome["last_error"]["log_tail"]
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_granted_handler_reaches_what_its_manifest_allows_and_nothing_else() {
    let built = guests::build();
    let caller = std::fs::read(built.fixtures.join("http_caller.wasm")).expect("http_caller");
    let server = server().await;
    let port = server.port;
    let host = TestHost::start(|_, _| {}).await;

    // Without a grant, a component that imports wasi:http is refused at deploy.
    let (status, body) = host
        .deploy(
            "caller",
            caller.clone(),
            Some("patterns = [\"http.>\"]\n"),
            None,
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(body.to_string().contains("[http]"), "{body}");

    let manifest = format!(
        r#"patterns = ["http.>"]
timeout = "2s"
[retry]
max_retries = 0
[http]
allow = ["http://127.0.0.1:{port}/hooks/*", "http://localhost:{port}/hooks/*"]
max_requests = 3
max_response_body = "1MiB"
"#
    );
    let (status, body) = host.deploy("caller", caller, Some(&manifest), None).await;
    assert_eq!(status, 200, "{body}");

    let run = |payload: Value| {
        let host = &host;
        async move {
            let (status, reply) = host
                .publish(json!({"type": "http.call", "payload": payload}), "")
                .await;
            assert_eq!(status, 202, "{reply}");
            host.finished(reply["id"].as_str().expect("id")).await
        }
    };
    let ok = format!("http://127.0.0.1:{port}/hooks/ok");

    // Allowed: the request reaches the server with the event's payload.
    let event = run(json!({"url": ok, "note": "hello"})).await;
    assert_eq!(event["status"], "completed", "{event:#}");
    assert_eq!(server.hits.load(Ordering::SeqCst), 1);
    let sent: Value =
        serde_json::from_slice(&server.bodies.lock().expect("bodies")[0]).expect("json");
    assert_eq!(sent["note"], "hello");

    // Refused before anything leaves the host: the guest sees an error, not a trap.
    for (payload, reason) in [
        (
            json!({"url": format!("http://127.0.0.1:{port}/other")}),
            "is not in http.allow",
        ),
        (
            json!({"url": format!("http://127.0.0.2:{port}/hooks/ok")}),
            "is not in http.allow",
        ),
        (
            json!({"url": format!("http://localhost:{port}/hooks/ok")}),
            "a loopback address",
        ),
        (
            json!({"url": format!("http://127.0.0.1:{port}/hooks/redirect"), "method": "GET", "follow": true, "requests": 2}),
            "127.0.0.2",
        ),
        (json!({"url": ok, "requests": 4}), "http.max_requests"),
    ] {
        let event = run(payload.clone()).await;
        assert_eq!(event["status"], "failed", "{payload}: {event:#}");
        assert_eq!(
            event["handlers"][0]["last_error"]["kind"], "fail",
            "the guest saw an error: {event:#}"
        );
        let text = failure(&event);
        assert!(text.contains(reason), "{payload}: {text}");
    }
    assert_eq!(
        server.hits.load(Ordering::SeqCst),
        4,
        "only the 3 allowed requests of the budget run went out"
    );

    // An answer over http.max_response_body, and a server slower than the deadline: errors
    // the guest sees, within the invocation's deadline.
    let event =
        run(json!({"url": format!("http://127.0.0.1:{port}/hooks/big"), "method": "GET"})).await;
    assert_eq!(event["status"], "failed", "{event:#}");
    assert!(
        failure(&event).contains("http.max_response_body"),
        "{}",
        failure(&event)
    );
    let started = std::time::Instant::now();
    let event =
        run(json!({"url": format!("http://127.0.0.1:{port}/hooks/slow"), "method": "GET"})).await;
    assert_eq!(event["status"], "failed", "{event:#}");
    assert_eq!(
        event["handlers"][0]["last_error"]["kind"], "fail",
        "{event:#}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "bounded by the 2 s deadline"
    );

    // Metrics by status, refusals included.
    let metrics = host.metrics().await;
    for needle in [
        "eventbroker_handler_http_requests_total{handler=\"caller\",status=\"200\"}",
        "eventbroker_handler_http_requests_total{handler=\"caller\",status=\"refused\"}",
        "eventbroker_handler_http_bytes_total{handler=\"caller\",direction=\"sent\"}",
    ] {
        assert!(metrics.contains(needle), "{needle} in\n{metrics}");
    }
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_example_posts_each_order_event() {
    let built = guests::build();
    let server = server().await;
    let manifest = std::fs::read_to_string(
        built
            .guest_dir("rust-webhook-notifier")
            .join("manifest.toml"),
    )
    .expect("manifest")
    .replace("127.0.0.1:9000", &format!("127.0.0.1:{}", server.port))
    .replace("/hooks/orders", "/hooks/ok");
    let host = TestHost::start(|_, _| {}).await;
    let wasm = std::fs::read(built.guest("rust_webhook_notifier")).expect("webhook notifier");
    let (status, body) = host
        .deploy("webhook-notifier", wasm, Some(&manifest), None)
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, reply) = host
        .publish(
            json!({"type": "public.orders.create", "payload": {"order": 42}}),
            "",
        )
        .await;
    assert_eq!(status, 202, "{reply}");
    let event = host.finished(reply["id"].as_str().expect("id")).await;
    assert_eq!(event["status"], "completed", "{event:#}");
    let bodies = server.bodies.lock().expect("bodies").clone();
    let posted: Value = serde_json::from_slice(&bodies[0]).expect("json");
    assert_eq!(posted["payload"]["order"], 42, "{posted}");
    assert_eq!(posted["type"], "public.orders.create");
    host.stop().await;
}
