//! The HTTP API of a running host: every endpoint with good and bad input, tokens, CloudEvents,
//! batches, the live stream, deploys, hot reload under load, and metrics.

use std::collections::HashSet;
use std::time::Duration;

use eventbroker_tests::guests;
use eventbroker_tests::host::{TestHost, install};
use eventbroker_tests::{variant, wait_for};
use futures::StreamExt;
use serde_json::{Value, json};

async fn raw(
    host: &TestHost,
    method: reqwest::Method,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (u16, Value) {
    let mut request = host
        .authed(host.http.request(method, format!("{}{path}", host.url)))
        .body(body);
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn code(body: &Value) -> &str {
    body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("not an API error: {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_json_errors() {
    let host = TestHost::start(|config, _| {
        config.server.body_limit = bytesize::ByteSize::kib(16);
        config.server.max_batch = 3;
    })
    .await;
    use reqwest::Method;
    let json = Some("application/json");
    type Case<'a> = (Method, &'a str, Option<&'a str>, Vec<u8>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            Method::POST,
            "/v1/events",
            json,
            b"{\"type\": ".to_vec(),
            400,
            "invalid_json",
        ),
        (
            Method::POST,
            "/v1/events",
            json,
            b"[1,2]".to_vec(),
            422,
            "invalid_event",
        ),
        (
            Method::POST,
            "/v1/events",
            json,
            br#"{"type":"a.b","colour":"red"}"#.to_vec(),
            422,
            "invalid_event",
        ),
        (
            Method::POST,
            "/v1/events",
            json,
            br#"{"type":"a.b","source":"queue"}"#.to_vec(),
            422,
            "invalid_event",
        ),
        (
            Method::POST,
            "/v1/events",
            json,
            br#"{"type":"a..b"}"#.to_vec(),
            422,
            "invalid_event",
        ),
        (
            Method::POST,
            "/v1/events",
            json,
            br#"{"type":"a.b","metadata":[1]}"#.to_vec(),
            422,
            "invalid_event",
        ),
        (
            Method::POST,
            "/v1/events",
            Some("text/plain"),
            b"hello".to_vec(),
            415,
            "unsupported_media_type",
        ),
        (
            Method::POST,
            "/v1/events",
            None,
            b"{}".to_vec(),
            415,
            "unsupported_media_type",
        ),
        (
            Method::POST,
            "/v1/events?mode=later",
            json,
            br#"{"type":"a.b"}"#.to_vec(),
            400,
            "invalid_query",
        ),
        (
            Method::POST,
            "/v1/events",
            json,
            format!(
                "{{\"type\":\"a.b\",\"payload\":\"{}\"}}",
                "x".repeat(20_000)
            )
            .into_bytes(),
            413,
            "body_too_large",
        ),
        (
            Method::POST,
            "/v1/events/batch",
            json,
            br#"{"type":"a.b"}"#.to_vec(),
            422,
            "invalid_event",
        ),
        (
            Method::POST,
            "/v1/events/batch",
            json,
            br#"[{},{},{},{}]"#.to_vec(),
            413,
            "batch_too_large",
        ),
        (
            Method::POST,
            "/v1/events",
            Some("application/cloudevents+json"),
            br#"{"specversion":"1.0","type":"a.b","source":"x"}"#.to_vec(),
            422,
            "invalid_cloudevent",
        ),
        (
            Method::GET,
            "/v1/events?type=a..b",
            None,
            vec![],
            400,
            "invalid_query",
        ),
        (
            Method::GET,
            "/v1/events?status=done",
            None,
            vec![],
            400,
            "invalid_query",
        ),
        (
            Method::GET,
            "/v1/events?limit=-1",
            None,
            vec![],
            400,
            "invalid_query",
        ),
        (
            Method::GET,
            "/v1/events?colour=red",
            None,
            vec![],
            400,
            "invalid_query",
        ),
        (
            Method::GET,
            "/v1/stream?pattern=a.>.b",
            None,
            vec![],
            400,
            "invalid_query",
        ),
        (
            Method::GET,
            "/v1/events/nope",
            None,
            vec![],
            404,
            "not_found",
        ),
        (
            Method::POST,
            "/v1/events/nope/retry",
            None,
            vec![],
            404,
            "not_found",
        ),
        (
            Method::GET,
            "/v1/handlers/nope",
            None,
            vec![],
            404,
            "not_found",
        ),
        (
            Method::DELETE,
            "/v1/handlers/nope",
            None,
            vec![],
            404,
            "not_found",
        ),
        (
            Method::PUT,
            "/v1/handlers/bad",
            Some("application/wasm"),
            b"not wasm".to_vec(),
            422,
            "handler_rejected",
        ),
        (
            Method::PUT,
            "/v1/handlers/bad",
            Some("application/wasm"),
            b"\0asm\x01\0\0\0".to_vec(),
            422,
            "handler_rejected",
        ),
        (
            Method::PUT,
            "/v1/handlers/bad%20name",
            Some("application/wasm"),
            b"\0asm".to_vec(),
            422,
            "handler_rejected",
        ),
        (
            Method::PUT,
            "/v1/handlers/bad",
            Some("text/plain"),
            b"x".to_vec(),
            415,
            "unsupported_media_type",
        ),
        (
            Method::GET,
            "/v1/events/%FF",
            None,
            vec![],
            400,
            "invalid_path",
        ),
        (
            Method::PUT,
            "/v1/handlers/bad",
            Some("multipart/form-data"),
            b"x".to_vec(),
            415,
            "unsupported_media_type",
        ),
        (
            Method::PUT,
            "/v1/handlers/bad",
            Some("multipart/form-data; boundary=XYZ"),
            b"--XYZ\r\nContent-Disposition: form-data; name=\"component\"\r\n\r\nunterminated"
                .to_vec(),
            400,
            "invalid_body",
        ),
        (Method::GET, "/v2/nothing", None, vec![], 404, "not_found"),
        (
            Method::DELETE,
            "/v1/events",
            None,
            vec![],
            405,
            "method_not_allowed",
        ),
    ];
    for (method, path, content_type, body, status, expected) in cases {
        let (got, reply) = raw(&host, method.clone(), path, content_type, body).await;
        assert_eq!(got, status, "{method} {path}: {reply}");
        assert_eq!(code(&reply), expected, "{method} {path}: {reply}");
        assert!(!reply["error"]["message"].as_str().unwrap().is_empty());
    }
    // A finished event may be re-run.
    let mut gate = host.publish(json!({"type": "x.y"}), "").await.1;
    let id = gate["id"].take();
    let event = host.finished(id.as_str().unwrap()).await;
    assert_eq!(event["status"], "completed");
    let (status, _) = raw(
        &host,
        reqwest::Method::POST,
        &format!("/v1/events/{}/retry", id.as_str().unwrap()),
        None,
        vec![],
    )
    .await;
    assert_eq!(status, 202, "a completed event may be re-run");
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_query_batch_cloudevents_retry_and_stats() {
    let built = guests::build();
    let host = TestHost::start(|config, dir| {
        // Events below carry user ids, which only a publisher with a token may set.
        config.server.token = Some("test-token".into());
        install(
            dir,
            "probe",
            &built.misbehave(),
            Some("patterns = [\"probe.>\"]\n[retry]\nmax_retries = 0"),
        );
    })
    .await;
    // Sync and async publishing.
    let (status, done) = host.publish(json!({"type": "probe.ok", "payload": {"action": "ok"}, "user_id": 5, "session_id": "s"}), "?mode=sync").await;
    assert_eq!(status, 200);
    assert_eq!(done["status"], "completed");
    let (status, queued) = host
        .publish(
            json!({"type": "probe.fail", "id": "chosen-id", "payload": {"action": "fail"}}),
            "",
        )
        .await;
    assert_eq!((status, queued["id"].as_str()), (202, Some("chosen-id")));
    let failed = host.finished("chosen-id").await;
    assert_eq!(failed["status"], "failed");
    let (status, duplicate) = host
        .publish(json!({"type": "probe.ok", "id": "chosen-id"}), "")
        .await;
    assert_eq!((status, code(&duplicate)), (409, "duplicate_id"));
    // Ids the API could not address afterwards (`/v1/events/batch` is another endpoint).
    for reserved in ["batch", "retry"] {
        let (status, refused) = host
            .publish(json!({"type": "probe.ok", "id": reserved}), "")
            .await;
        assert_eq!(
            (status, code(&refused)),
            (422, "invalid_event"),
            "{refused}"
        );
    }

    // Every filter field.
    for query in [
        "status=failed",
        "type=probe.fail",
        "user_id=5",
        "session_id=s",
        "source=system",
        "instance_id=test-host",
        "order=asc&limit=1",
        "created_after=2000-01-01T00:00:00Z",
    ] {
        let (status, page) = host.get(&format!("/v1/events?{query}")).await;
        assert_eq!(status, 200, "{query}");
        assert!(page["count"].as_u64().unwrap() >= 1, "{query}: {page}");
    }
    let (_, page) = host.get("/v1/events?offset=1000").await;
    assert_eq!(page["count"], 0);

    // Dead letter re-run.
    let (status, _) = raw(
        &host,
        reqwest::Method::POST,
        "/v1/events/chosen-id/retry",
        None,
        vec![],
    )
    .await;
    assert_eq!(status, 202);
    wait_for("re-run", || async {
        let (_, event) = host.get("/v1/events/chosen-id").await;
        (event["status"] == "failed"
            && event["handlers"][0]["attempts"] == 1
            && event["retry_count"] == 0)
            .then_some(())
    })
    .await;

    // Batch with a bad item: per-item results.
    let (status, reply) = raw(
        &host,
        reqwest::Method::POST,
        "/v1/events/batch",
        Some("application/json"),
        serde_json::to_vec(&json!([{"type": "probe.ok", "payload": {"action": "ok"}}, {"type": "bad..type"}, {"type": "b.c"}])).unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        (reply["accepted"].as_u64(), reply["rejected"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(reply["results"][1]["error"]["code"], "invalid_event");
    host.finished(reply["results"][0]["id"].as_str().unwrap())
        .await;

    // CloudEvents: structured in, binary in, structured out.
    let (status, reply) = raw(
        &host,
        reqwest::Method::POST,
        "/v1/events",
        Some("application/cloudevents+json"),
        serde_json::to_vec(&json!({"specversion": "1.0", "id": "ce-1", "type": "probe.ce", "source": "https://app.example", "data": {"action": "ok"}, "userid": 9})).unwrap(),
    )
    .await;
    assert_eq!((status, reply["id"].as_str()), (202, Some("ce-1")));
    let event = host.finished("ce-1").await;
    assert_eq!(event["user_id"], 9);
    assert_eq!(event["metadata"]["ce_source"], "https://app.example");
    let response = host
        .authed(host.http.post(format!("{}/v1/events", host.url)))
        .header("ce-specversion", "1.0")
        .header("ce-id", "ce-2")
        .header("ce-type", "probe.ce")
        .header("ce-source", "frontend")
        .header("content-type", "application/json")
        .body(r#"{"action":"ok"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let event = host.finished("ce-2").await;
    assert_eq!(event["source"], "frontend");
    let cloudevent: Value = host
        .authed(host.http.get(format!("{}/v1/events/ce-1", host.url)))
        .header("accept", "application/cloudevents+json")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cloudevent["specversion"], "1.0");
    assert_eq!(cloudevent["source"], "https://app.example");
    assert_eq!(cloudevent["data"]["action"], "ok");
    assert_eq!(cloudevent["status"], "completed");

    // CloudEvents by the spec: a batch on the same endpoint; percent-encoded headers; binary
    // data and absent data given back as they came; an id the spec allows that is not an
    // event id here.
    let batch = json!([
        {"specversion": "1.0", "id": "ceb-1", "type": "probe.ce", "source": "/b", "data": {"action": "ok"}},
        {"specversion": "1.0", "id": "ceb-2", "type": "probe.ce", "source": "/b", "datacontenttype": "application/octet-stream", "data_base64": "AJ+Slg=="},
        {"specversion": "1.0", "id": "ceb 3/ü", "type": "probe.ce", "source": "/b"},
        {"specversion": "1.0", "id": "ceb-4", "type": "probe.ce"},
        {"specversion": "1.0", "id": "retry", "type": "probe.ce", "source": "/b"}
    ]);
    let (status, reply) = raw(
        &host,
        reqwest::Method::POST,
        "/v1/events",
        Some("application/cloudevents-batch+json"),
        serde_json::to_vec(&batch).unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        (reply["accepted"].as_u64(), reply["rejected"].as_u64()),
        (Some(4), Some(1)),
        "{reply}"
    );
    assert_eq!(reply["results"][3]["error"]["code"], "invalid_cloudevent");
    let as_cloudevent = |id: String| {
        let host = &host;
        async move {
            host.finished(&id).await;
            host.authed(host.http.get(format!("{}/v1/events/{id}", host.url)))
                .header("accept", "application/cloudevents+json")
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let reserved = reply["results"][4]["id"].as_str().unwrap().to_owned();
    assert_ne!(
        reserved, "retry",
        "a reserved CloudEvents id maps to a derived one"
    );
    assert_eq!(as_cloudevent(reserved).await["id"], "retry");
    let binary = as_cloudevent("ceb-2".into()).await;
    assert_eq!(binary["data_base64"], "AJ+Slg==");
    assert_eq!(binary["datacontenttype"], "application/octet-stream");
    assert!(binary.get("data").is_none(), "{binary}");
    let derived = reply["results"][2]["id"].as_str().unwrap().to_owned();
    assert_ne!(derived, "ceb 3/ü");
    let odd_id = as_cloudevent(derived).await;
    assert_eq!(odd_id["id"], "ceb 3/ü");
    assert!(
        odd_id.get("data").is_none(),
        "absent data stays absent: {odd_id}"
    );
    let response = host
        .authed(host.http.post(format!("{}/v1/events", host.url)))
        .header("ce-specversion", "1.0")
        .header("ce-id", "ce-3")
        .header("ce-type", "probe.ce")
        .header("ce-source", "/caf%C3%A9")
        .header("ce-subject", "50%25%20off")
        .header("content-type", "text/plain")
        .body("plain text")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let text = as_cloudevent("ce-3".into()).await;
    assert_eq!(text["source"], "/café");
    assert_eq!(text["subject"], "50% off");
    assert_eq!(text["data"], "plain text");
    assert_eq!(text["datacontenttype"], "text/plain");

    // Stats, health, readiness, metrics.
    let (status, stats) = host.get("/v1/stats").await;
    assert_eq!(status, 200);
    assert!(stats["published"].as_u64().unwrap() >= 5);
    assert_eq!(stats["subscriptions"][0]["name"], "probe");
    assert_eq!(host.get("/readyz").await.0, 200);
    let metrics = host.metrics().await;
    for name in [
        "eventbroker_events_published_total{source=\"system\",type=\"probe.ok\"}",
        "eventbroker_events_processed_total{source=\"system\",type=\"probe.fail\",status=\"failed\"}",
        "eventbroker_event_processing_duration_seconds",
        "eventbroker_queue_size",
        "eventbroker_workers_active",
        "eventbroker_handler_invocations_total{handler=\"probe\",outcome=\"fail\"}",
        "eventbroker_handler_fuel_consumed_total{handler=\"probe\"}",
        "eventbroker_handler_reloads_total{handler=\"probe\"} 1",
    ] {
        assert!(metrics.contains(name), "{name} missing from\n{metrics}");
    }
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_guard_deploys_publishing_and_reads() {
    let built = guests::build();
    let host = TestHost::start(|config, _| {
        config.server.admin_token = Some("admin-secret".into());
        config.server.publish_token = Some("publish-secret".into());
    })
    .await;
    let component = std::fs::read(built.misbehave()).unwrap();
    let manifest = Some("patterns = [\"t.*\"]");
    // The server answers 401 before reading the body; send a small one for these checks.
    let put = |token: Option<&'static str>| {
        let mut request = host
            .http
            .put(format!("{}/v1/handlers/t", host.url))
            .header("content-type", "application/wasm")
            .body("x");
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    let (status, body) = put(None).await;
    assert_eq!((status, code(&body)), (401, "unauthorized"));
    assert_eq!(put(Some("publish-secret")).await.0, 401);
    assert_eq!(
        host.deploy("t", component.clone(), manifest, Some("admin-secret"))
            .await
            .0,
        200
    );
    let publish = |token: Option<&'static str>| {
        let mut request = host
            .http
            .post(format!("{}/v1/events", host.url))
            .json(&json!({"type": "t.x"}));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(publish(None).await, 401);
    assert_eq!(publish(Some("wrong")).await, 401);
    assert_eq!(publish(Some("publish-secret")).await, 202);
    assert_eq!(publish(Some("admin-secret")).await, 202);
    let (status, body) = host.get("/v1/events").await;
    assert_eq!((status, code(&body)), (401, "unauthorized"));
    let status = host
        .http
        .get(format!("{}/v1/events", host.url))
        .bearer_auth("publish-secret")
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);
    assert_eq!(host.get("/healthz").await.0, 200, "health needs no token");
    host.stop().await;
}

/// Sends `request`; returns the status and the JSON body (`Null` if none).
async fn send(request: reqwest::RequestBuilder) -> (u16, Value) {
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Every write endpoint, as (method, path, content type, body).
fn writes(id: &str) -> Vec<(reqwest::Method, String, &'static str, Vec<u8>)> {
    use reqwest::Method;
    vec![
        (
            Method::POST,
            "/v1/events".into(),
            "application/json",
            br#"{"type":"w.x"}"#.to_vec(),
        ),
        (
            Method::POST,
            "/v1/events?mode=sync".into(),
            "application/json",
            br#"{"type":"w.x"}"#.to_vec(),
        ),
        (
            Method::POST,
            "/v1/events/batch".into(),
            "application/json",
            br#"[{"type":"w.x"}]"#.to_vec(),
        ),
        (
            Method::POST,
            format!("/v1/events/{id}/retry"),
            "application/json",
            vec![],
        ),
        (
            Method::POST,
            "/v1/events/retry".into(),
            "application/json",
            vec![],
        ),
        (
            Method::PUT,
            "/v1/handlers/w".into(),
            "application/wasm",
            b"x".to_vec(),
        ),
        (
            Method::DELETE,
            "/v1/handlers/w".into(),
            "application/json",
            vec![],
        ),
    ]
}

/// Asserts that no write endpoint answers without `good` (and none with a wrong token).
async fn assert_writes_need_a_token(host: &TestHost, id: &str) {
    for (method, path, content_type, body) in writes(id) {
        for token in [None, Some("wrong")] {
            let mut request = host
                .http
                .request(method.clone(), format!("{}{path}", host.url))
                .header("content-type", content_type)
                .body(body.clone());
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let (status, reply) = send(request).await;
            assert_eq!(
                (status, code(&reply)),
                (401, "unauthorized"),
                "{method} {path} with {token:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_token_alone_closes_publishing_and_every_other_write() {
    let host = TestHost::start(|config, _| {
        config.server.admin_token = Some("admin-secret".into());
    })
    .await;
    let accepted = host
        .http
        .post(format!("{}/v1/events", host.url))
        .bearer_auth("admin-secret")
        .json(&json!({"type": "w.first"}));
    let (status, reply) = send(accepted).await;
    assert_eq!(status, 202, "{reply}");
    let id = reply["id"].as_str().unwrap().to_owned();
    assert_writes_need_a_token(&host, &id).await;
    // The scheme is case-insensitive.
    for scheme in ["bearer", "BEARER"] {
        let request = host
            .http
            .post(format!("{}/v1/events", host.url))
            .header("authorization", format!("{scheme} admin-secret"))
            .json(&json!({"type": "w.x"}));
        assert_eq!(send(request).await.0, 202, "{scheme}");
    }
    // Only the three authenticated publishes were stored.
    let request = host
        .http
        .get(format!("{}/v1/events", host.url))
        .bearer_auth("admin-secret");
    let (status, page) = send(request).await;
    assert_eq!((status, page["count"].as_u64()), (200, Some(3)), "{page}");
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_token_guards_every_write_and_read() {
    let built = guests::build();
    let component = std::fs::read(built.misbehave()).unwrap();
    let host = TestHost::start(|config, _| {
        config.server.token = Some("one-secret".into());
    })
    .await;
    let (status, reply) = host.publish(json!({"type": "w.first"}), "").await;
    assert_eq!(status, 202, "{reply}");
    let id = reply["id"].as_str().unwrap().to_owned();
    host.finished(&id).await;
    assert_writes_need_a_token(&host, &id).await;
    let (status, reply) = send(host.http.get(format!("{}/v1/events", host.url))).await;
    assert_eq!((status, code(&reply)), (401, "unauthorized"));
    // With the token, every write goes through.
    let (status, info) = host
        .deploy("w", component, Some("patterns = [\"w.*\"]"), None)
        .await;
    assert_eq!(status, 200, "{info}");
    let retry = host.authed(host.http.post(format!("{}/v1/events/{id}/retry", host.url)));
    assert_eq!(send(retry).await.0, 202);
    let remove = host.authed(host.http.delete(format!("{}/v1/handlers/w", host.url)));
    assert_eq!(send(remove).await.0, 204);
    // Health and metrics stay open.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let status = host
            .http
            .get(format!("{}{path}", host.url))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200, "{path}");
    }
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_token_alone_turns_admin_endpoints_off() {
    let host = TestHost::start(|config, _| {
        config.server.publish_token = Some("publish-secret".into());
    })
    .await;
    let publish = host
        .http
        .post(format!("{}/v1/events", host.url))
        .bearer_auth("publish-secret")
        .json(&json!({"type": "w.x", "source": "database", "user_id": 3}));
    assert_eq!(
        send(publish).await.0,
        202,
        "publish scope may claim a source and user"
    );
    for token in [None, Some("publish-secret")] {
        let mut request = host
            .http
            .put(format!("{}/v1/handlers/w", host.url))
            .header("content-type", "application/wasm")
            .body("x");
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let (status, reply) = send(request).await;
        assert_eq!((status, code(&reply)), (403, "forbidden"), "{token:?}");
        assert!(
            reply["error"]["message"]
                .as_str()
                .unwrap()
                .contains("server.admin_token"),
            "{reply}"
        );
    }
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_token_guards_metrics_only() {
    let host = TestHost::start(|config, _| {
        config.server.metrics_token = Some("metrics-secret".into());
    })
    .await;
    let metrics = || host.http.get(format!("{}/metrics", host.url));
    let (status, reply) = send(metrics()).await;
    assert_eq!((status, code(&reply)), (401, "unauthorized"));
    let (status, _) = send(metrics().bearer_auth("wrong")).await;
    assert_eq!(status, 401);
    let response = metrics()
        .header("authorization", "bearer metrics-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response
            .text()
            .await
            .unwrap()
            .contains("eventbroker_queue_size")
    );
    assert_eq!(host.publish(json!({"type": "w.x"}), "").await.0, 202);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_address_needs_a_token_for_every_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = eventbroker_tests::host::test_config(dir.path());
    config.server.listen = "0.0.0.0:0".into();
    let error = eventbroker_server::Service::start(config.clone())
        .await
        .err()
        .expect("refused")
        .to_string();
    for setting in [
        "server.token",
        "server.admin_token",
        "server.publish_token",
        "server.allow_unauthenticated",
        "127.0.0.1",
    ] {
        assert!(error.contains(setting), "{setting} not named: {error}");
    }
    let http = reqwest::Client::new();
    // Each token setting makes it safe; an unauthenticated publish is refused on each.
    let settings: [fn(&mut eventbroker_server::Config); 3] = [
        |config| config.server.token = Some("t".into()),
        |config| config.server.admin_token = Some("t".into()),
        |config| config.server.publish_token = Some("t".into()),
    ];
    for set in settings {
        let mut config = config.clone();
        set(&mut config);
        let service = eventbroker_server::Service::start(config)
            .await
            .expect("a token makes a public address safe");
        let url = format!("http://127.0.0.1:{}/v1/events", service.local_addr().port());
        let (status, _) = send(http.post(&url).json(&json!({"type": "w.x"}))).await;
        assert_eq!(status, 401);
        service.stop().await.unwrap();
    }
    config.server.allow_unauthenticated = true;
    let service = eventbroker_server::Service::start(config)
        .await
        .expect("explicitly allowed");
    service.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_without_a_token_may_not_claim_users_or_privileged_sources() {
    let host = TestHost::start(|_, _| {}).await;
    let post = |content_type: &str, body: Value| {
        host.http
            .post(format!("{}/v1/events", host.url))
            .header("content-type", content_type)
            .body(body.to_string())
    };
    let json_type = "application/json";
    let refused = [
        post(json_type, json!({"type": "w.x", "source": "database"})),
        post(json_type, json!({"type": "w.x", "source": "internal"})),
        post(json_type, json!({"type": "w.x", "user_id": 5})),
        post(
            json_type,
            json!({"type": "w.x", "source": "frontend", "user_id": 5}),
        ),
        post(
            "application/cloudevents+json",
            json!({"specversion": "1.0", "id": "c1", "type": "w.x", "source": "database"}),
        ),
        post(
            "application/cloudevents+json",
            json!({"specversion": "1.0", "id": "c2", "type": "w.x", "source": "/app", "userid": 9}),
        ),
        host.http
            .post(format!("{}/v1/events", host.url))
            .header("ce-specversion", "1.0")
            .header("ce-id", "c3")
            .header("ce-type", "w.x")
            .header("ce-source", "internal")
            .header("content-type", json_type)
            .body("{}"),
    ];
    for request in refused {
        let (status, reply) = send(request).await;
        assert_eq!((status, code(&reply)), (403, "forbidden"), "{reply}");
    }
    for source in [None, Some("system"), Some("frontend"), Some("websocket")] {
        let mut event = json!({"type": "w.ok"});
        if let Some(source) = source {
            event["source"] = json!(source);
        }
        assert_eq!(host.publish(event, "").await.0, 202, "{source:?}");
    }
    let batch = host
        .http
        .post(format!("{}/v1/events/batch", host.url))
        .json(&json!([{"type": "w.x", "user_id": 1}, {"type": "w.ok"}, {"type": "w.x", "source": "database"}]));
    let (status, reply) = send(batch).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["results"][0]["error"]["code"], "forbidden", "{reply}");
    assert!(reply["results"][1]["id"].is_string(), "{reply}");
    assert_eq!(reply["results"][2]["error"]["code"], "forbidden", "{reply}");
    // Nothing refused was stored: only the five w.ok events exist.
    let (_, page) = host.get("/v1/events?limit=1000").await;
    let types: Vec<&str> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|event| event["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["w.ok"; 5], "{page}");
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_pages_cannot_drive_the_host() {
    let host = TestHost::start(|_, _| {}).await;
    let port = host.service.local_addr().port();
    let own = format!("http://127.0.0.1:{port}");
    let (_, reply) = host.publish(json!({"type": "b.first"}), "").await;
    let id = reply["id"].as_str().unwrap().to_owned();
    host.finished(&id).await;
    let publish = || {
        host.http
            .post(format!("{}/v1/events", host.url))
            .json(&json!({"type": "b.x"}))
    };
    // A page on another origin may not write, whatever the method.
    let evil = "http://evil.example";
    let hostile = [
        publish().header("origin", evil),
        publish().header("origin", "null"),
        publish().header("origin", format!("http://localhost:{}", port + 1)),
        host.http
            .post(format!("{}/v1/events/{id}/retry", host.url))
            .header("origin", evil),
        host.http
            .put(format!("{}/v1/handlers/w", host.url))
            .header("origin", evil)
            .header("content-type", "application/wasm")
            .body("x"),
        host.http
            .delete(format!("{}/v1/handlers/w", host.url))
            .header("origin", evil),
        host.http
            .delete(format!("{}/v1/handlers/w", host.url))
            .header("sec-fetch-site", "cross-site"),
    ];
    for request in hostile {
        let (status, reply) = send(request).await;
        assert_eq!((status, code(&reply)), (403, "forbidden_origin"), "{reply}");
    }
    // A form post carries no Origin in old browsers: no endpoint takes its content type.
    let form = host
        .http
        .post(format!("{}/v1/events/{id}/retry", host.url))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("a=b");
    let (status, reply) = send(form).await;
    assert_eq!(
        (status, code(&reply)),
        (415, "unsupported_media_type"),
        "{reply}"
    );
    // DNS rebinding: a foreign Host is refused on every route.
    for request in [
        publish().header("host", "attacker.example"),
        publish().header("host", format!("attacker.example:{port}")),
        host.http
            .put(format!("{}/v1/handlers/w", host.url))
            .header("host", "attacker.example")
            .header("content-type", "application/wasm")
            .body("x"),
        host.http
            .get(format!("{}/v1/events", host.url))
            .header("host", "attacker.example"),
        host.http
            .get(format!("{}/", host.url))
            .header("host", "attacker.example"),
    ] {
        let (status, reply) = send(request).await;
        assert_eq!((status, code(&reply)), (421, "invalid_host"), "{reply}");
    }
    // The host's own page, other names of the host and clients without Origin are served.
    for request in [
        publish().header("origin", own.as_str()),
        publish().header("host", format!("localhost:{port}")),
        publish().header("sec-fetch-site", "same-origin"),
        publish(),
    ] {
        let (status, reply) = send(request).await;
        assert_eq!(status, 202, "{reply}");
    }
    let retry = host
        .http
        .post(format!("{}/v1/events/{id}/retry", host.url))
        .header("origin", own.as_str());
    assert_eq!(send(retry).await.0, 202);
    let page = host
        .http
        .get(format!("{}/", host.url))
        .header("origin", evil);
    assert_eq!(send(page).await.0, 200, "reads are not origin-checked");
    // Only the accepted publishes were stored.
    let (_, page) = host.get("/v1/events?type=b.x").await;
    assert_eq!(page["count"], 4, "{page}");
    host.stop().await;

    // Both lists are configurable.
    let host = TestHost::start(|config, _| {
        config.server.allowed_hosts = vec!["events.example.com".into()];
        config.server.allowed_origins = vec!["https://app.example".into()];
    })
    .await;
    let request = host
        .http
        .post(format!("{}/v1/events", host.url))
        .header("host", "events.example.com")
        .header("origin", "https://app.example")
        .json(&json!({"type": "b.x"}));
    assert_eq!(send(request).await.0, 202);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_lines_hyper_cannot_parse_get_the_json_envelope() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = TestHost::start(|_, _| {}).await;
    let addr = host.service.local_addr();
    let exchange = |request: Vec<u8>| async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(&request).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(eventbroker_tests::PATIENCE, stream.read_to_end(&mut answer))
            .await
            .expect("the server answers and closes")
            .unwrap();
        String::from_utf8(answer).unwrap()
    };
    let head = |target: &str| format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    let cases = [
        (
            head("/v1/events?type=a>b"),
            "400 Bad Request",
            "invalid_query",
        ),
        (
            head("/v1/events?type=\"a\""),
            "400 Bad Request",
            "invalid_query",
        ),
        (head("/v1/<events>"), "400 Bad Request", "invalid_path"),
        (
            head("/v1/events?type=a b"),
            "400 Bad Request",
            "invalid_request",
        ),
        (
            format!(
                "GET / HTTP/1.1\r\nHost: {addr}\r\n{}\r\n",
                (0..101)
                    .map(|n| format!("x-{n}: y\r\n"))
                    .collect::<String>()
            ),
            "431 Request Header Fields Too Large",
            "headers_too_large",
        ),
    ];
    for (request, status, expected) in cases {
        let answer = exchange(request.clone().into_bytes()).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}\r\n")),
            "{request:?}: {answer}"
        );
        assert!(
            answer.contains("content-type: application/json"),
            "{answer}"
        );
        let body: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap())
            .unwrap_or_else(|e| panic!("{request:?}: not JSON ({e}): {answer}"));
        assert_eq!(code(&body), expected, "{request:?}");
        assert!(!body["error"]["message"].as_str().unwrap().is_empty());
    }
    // On a kept-alive connection, the good requests before the bad one are answered first.
    let event = r#"{"type":"w.x"}"#;
    let pipelined = format!(
        "POST /v1/events HTTP/1.1\r\nHost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{event}{}",
        event.len(),
        head("/v1/events?type=a>b"),
    );
    let answer = exchange(pipelined.into_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 202 Accepted\r\n"), "{answer}");
    let second = answer
        .match_indices("HTTP/1.1 ")
        .nth(1)
        .map(|(at, _)| &answer[at..])
        .unwrap_or_else(|| panic!("one answer per request: {answer}"));
    assert!(
        second.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer}"
    );
    assert!(second.contains("\"invalid_query\""), "{answer}");
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_stream_delivers_published_events_and_status_changes() {
    let host = TestHost::start(|_, _| {}).await;
    let response = host
        .http
        .get(format!("{}/v1/stream?pattern=live.>", host.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut body = response.bytes_stream();
    host.publish(json!({"type": "other.thing"}), "").await;
    let (_, reply) = host
        .publish(json!({"type": "live.one", "payload": {"n": 1}}), "")
        .await;
    let id = reply["id"].as_str().unwrap().to_owned();
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + eventbroker_tests::PATIENCE;
    while !(seen.contains("event: pending") && seen.contains("event: completed")) {
        let chunk = tokio::time::timeout_at(deadline, body.next())
            .await
            .expect("stream delivers within the deadline")
            .expect("stream open")
            .expect("chunk");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(seen.contains(&format!("id: {id}")), "{seen}");
    assert!(!seen.contains("other.thing"), "pattern filters: {seen}");
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_replace_and_remove_over_http_and_by_copying_files() {
    let built = guests::build();
    let fixture = std::fs::read(built.misbehave()).unwrap();
    let host = TestHost::start(|config, _| {
        config.handlers.debounce = Duration::from_millis(100);
    })
    .await;
    // Deploy over HTTP; it is persisted in the handlers directory.
    let (status, info) = host
        .deploy("web", fixture.clone(), Some("patterns = [\"web.*\"]"), None)
        .await;
    assert_eq!(status, 200, "{info}");
    let first = info["current"]["version"].as_str().unwrap().to_owned();
    assert!(
        host.handlers_dir.join("web.wasm").exists() && host.handlers_dir.join("web.toml").exists()
    );
    // A broken upload is rejected; the old version keeps serving.
    let (status, reply) = host.deploy("web", b"garbage".to_vec(), None, None).await;
    assert_eq!((status, code(&reply)), (422, "handler_rejected"));
    let (_, listed) = host.get("/v1/handlers/web").await;
    assert_eq!(listed["current"]["version"], first.as_str());
    assert!(
        listed["last_rejection"]["reason"]
            .as_str()
            .unwrap()
            .contains("not a WebAssembly file")
    );
    assert_eq!(
        std::fs::read(host.handlers_dir.join("web.wasm")).unwrap(),
        fixture,
        "rejected upload not written"
    );
    let (_, reply) = host
        .publish(
            json!({"type": "web.x", "payload": {"action": "ok"}}),
            "?mode=sync",
        )
        .await;
    assert_eq!(reply["handlers"][0]["version"], first.as_str());

    // Copying files into the watched directory deploys too (atomic rename).
    let tmp = host.handlers_dir.join(".copied.wasm.tmp");
    std::fs::write(&tmp, variant(&fixture, 1)).unwrap();
    std::fs::write(
        host.handlers_dir.join("copied.toml"),
        "patterns = [\"copied.*\"]",
    )
    .unwrap();
    std::fs::rename(&tmp, host.handlers_dir.join("copied.wasm")).unwrap();
    wait_for("copied handler to load", || async {
        let (status, info) = host.get("/v1/handlers/copied").await;
        (status == 200 && info["state"] == "active").then_some(())
    })
    .await;
    let (_, reply) = host
        .publish(
            json!({"type": "copied.x", "payload": {"action": "ok"}}),
            "?mode=sync",
        )
        .await;
    assert_eq!(reply["handlers"][0]["handler"], "copied");
    // Deleting the file removes the handler.
    std::fs::remove_file(host.handlers_dir.join("copied.wasm")).unwrap();
    wait_for("copied handler to go", || async {
        (host.get("/v1/handlers/copied").await.0 == 404).then_some(())
    })
    .await;
    // Removal over HTTP deletes the files.
    let status = host
        .http
        .delete(format!("{}/v1/handlers/web", host.url))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 204);
    assert!(!host.handlers_dir.join("web.wasm").exists());
    let (_, reply) = host.publish(json!({"type": "web.x"}), "?mode=sync").await;
    assert_eq!(
        reply["handlers"],
        Value::Null,
        "no handler runs after removal: {reply}"
    );
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_under_load_handles_every_event_exactly_once() {
    const REPLACEMENTS: u32 = 50;
    let built = guests::build();
    let fixture = std::fs::read(built.misbehave()).unwrap();
    let host = TestHost::start(|_, _| {}).await;
    let manifest = "patterns = [\"load.*\"]\n[retry]\nmax_retries = 0";
    let (status, _) = host
        .deploy("swap", variant(&fixture, 0), Some(manifest), None)
        .await;
    assert_eq!(status, 200);
    let mut versions = HashSet::new();
    versions.insert(eventbroker_wasm::version_id(&variant(&fixture, 0)));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let (url, http, stop) = (host.url.clone(), host.http.clone(), stop.clone());
        tokio::spawn(async move {
            let mut ids = Vec::new();
            // At least 200 events, at most 5,000 (well under the memory provider's bound, so
            // that no finished event is evicted before the test reads it back).
            while (!stop.load(std::sync::atomic::Ordering::Acquire) || ids.len() < 200)
                && ids.len() < 5_000
            {
                let reply: Value = http
                    .post(format!("{url}/v1/events"))
                    .json(&json!({"type": "load.tick", "payload": {"action": "ok"}}))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                ids.push(reply["id"].as_str().expect("accepted").to_owned());
            }
            ids
        })
    };
    for n in 1..=REPLACEMENTS {
        let component = variant(&fixture, n);
        versions.insert(eventbroker_wasm::version_id(&component));
        let (status, info) = host.deploy("swap", component, Some(manifest), None).await;
        assert_eq!(status, 200, "{info}");
    }
    stop.store(true, std::sync::atomic::Ordering::Release);
    let ids = publisher.await.unwrap();
    let mut used = HashSet::new();
    for id in &ids {
        let event = host.finished(id).await;
        assert_eq!(event["status"], "completed", "{event:#}");
        let outcomes = event["handlers"].as_array().unwrap();
        assert_eq!(outcomes.len(), 1, "exactly one handler version: {event:#}");
        assert_eq!(
            outcomes[0]["attempts"], 1,
            "handled exactly once: {event:#}"
        );
        let version = outcomes[0]["version"].as_str().unwrap();
        assert!(versions.contains(version), "a deployed version");
        used.insert(version.to_owned());
    }
    let info = host.service.handlers().get("swap").unwrap();
    assert_eq!(info.loads, u64::from(REPLACEMENTS) + 1);
    assert!(
        used.len() > 1,
        "events were handled by several versions during the reloads"
    );
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_handler_names_leave_no_entry_and_no_metric_label() {
    let built = guests::build();
    let fixture = std::fs::read(built.misbehave()).unwrap();
    let host = TestHost::start(|_, dir| {
        install(
            dir,
            "bad name",
            &built.misbehave(),
            Some("patterns = [\"x.*\"]"),
        );
    })
    .await;
    for path in ["..%2F..%2Fevil", "has%20space", "%C3%A9vil"] {
        let (status, reply) = raw(
            &host,
            reqwest::Method::PUT,
            &format!("/v1/handlers/{path}"),
            Some("application/wasm"),
            fixture.clone(),
        )
        .await;
        assert_eq!(
            (status, code(&reply)),
            (422, "handler_rejected"),
            "{path}: {reply}"
        );
        assert!(
            reply["error"]["message"]
                .as_str()
                .unwrap()
                .contains("handler name"),
            "{reply}"
        );
    }
    let (_, listed) = host.get("/v1/handlers").await;
    assert_eq!(listed["handlers"], json!([]), "{listed:#}");
    let metrics = host.metrics().await;
    for label in ["evil", "bad name", "has space"] {
        assert!(!metrics.contains(label), "{label} in\n{metrics}");
    }
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_metadata_and_text_fields_are_bounded() {
    let host = TestHost::start(|_, _| {}).await;
    // 80 KB of zeros in metadata: within the body limit, ~16 times that once parsed.
    let zeros = vec![0; 40_000];
    let long = "s".repeat(300);
    for (body, field) in [
        (
            json!({"type": "a.b", "metadata": {"zeros": zeros}}),
            "metadata",
        ),
        (json!({"type": "a.b", "session_id": long}), "session_id"),
        (json!({"type": "a.b", "schema": long}), "schema"),
        (json!({"type": "a.b", "entity": long}), "entity"),
        (json!({"type": "a.b", "operation": long}), "operation"),
    ] {
        let (status, reply) = host.publish(body, "").await;
        assert_eq!(
            (status, code(&reply)),
            (422, "invalid_event"),
            "{field}: {reply}"
        );
        assert!(
            reply["error"]["message"].as_str().unwrap().contains(field),
            "{field}: {reply}"
        );
    }
    let (status, _) = host
        .publish(
            json!({"type": "a.b", "metadata": {"zeros": vec![0; 1000]}}),
            "",
        )
        .await;
    assert_eq!(status, 202);
    host.stop().await;
}
