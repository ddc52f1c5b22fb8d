//! Key-value state granted by a handler's manifest (`wasi:keyvalue`), on a host with the
//! memory provider: a component importing it without a grant is refused at deploy; a granted
//! handler keeps state in its own buckets only (another bucket is `access-denied`, another
//! handler's bucket of the same name is another namespace); concurrent increments are exact;
//! quotas, value size and the per-invocation operation budget are refused with errors the
//! guest sees; every operation is counted in the metrics. The same handler on SQL, Redis and
//! NATS, with two hosts, is in `host/cli/tests/cluster.rs`.

use eventbroker::keyvalue::Namespace;
use eventbroker_tests::guests;
use eventbroker_tests::host::TestHost;
use serde_json::{Value, json};

/// The handler's last failure message and log tail, as one text.
fn failure(event: &Value) -> String {
    let outcome = &event["handlers"][0];
    format!(
        "{} | {}",
        outcome["last_error"]["message"], outcome["last_error"]["log_tail"]
    )
}

async fn run(host: &TestHost, handler: &str, payload: Value) -> Value {
    let (status, reply) = host
        .publish(
            json!({"type": format!("kv.{handler}"), "payload": payload}),
            "",
        )
        .await;
    assert_eq!(status, 202, "{reply}");
    host.finished(reply["id"].as_str().expect("id")).await
}

fn manifest(name: &str, extra: &str) -> String {
    format!(
        "name = \"{name}\"\npatterns = [\"kv.{name}\"]\nconcurrency = 8\n[retry]\nmax_retries = 0\n{extra}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_granted_handler_keeps_state_in_its_buckets_within_its_quota() {
    let built = guests::build();
    let client = std::fs::read(built.fixtures.join("kv_client.wasm")).expect("kv_client");
    let host = TestHost::start(|_, _| {}).await;

    // Without a grant, a component that imports wasi:keyvalue is refused at deploy.
    let (status, body) = host
        .deploy("kv", client.clone(), Some(&manifest("kv", "")), None)
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(body.to_string().contains("[keyvalue]"), "{body}");
    let (status, body) = host
        .deploy(
            "kv",
            client.clone(),
            Some(&manifest("kv", "[keyvalue]\nbuckets = [\"b/c\"]\n")),
            None,
        )
        .await;
    assert_eq!(status, 422, "an invalid bucket name: {body}");
    assert!(body.to_string().contains("not a bucket name"), "{body}");

    let grant = "[keyvalue]\nbuckets = [\"b\", \"small\"]\nmax_keys = 50\nmax_bytes = \"4KiB\"\nmax_operations = 20\n";
    for name in ["kv", "other"] {
        let (status, body) = host
            .deploy(name, client.clone(), Some(&manifest(name, grant)), None)
            .await;
        assert_eq!(status, 200, "{body}");
    }

    // Concurrent increments of one key: exact.
    let runs: Vec<_> = (0..40)
        .map(|_| run(&host, "kv", json!({"ops": [["increment", "n", 1]]})))
        .collect();
    for event in futures::future::join_all(runs).await {
        assert_eq!(event["status"], "completed", "{event:#}");
    }
    let store = host
        .service
        .broker()
        .provider()
        .keyvalue()
        .expect("memory store");
    let group = &host.service.broker().config().consumer_group;
    let ns = Namespace::new(group, "kv", "b");
    assert_eq!(
        store.get(&ns, "n").await.expect("get"),
        Some(b"40".to_vec())
    );

    // Set, get, list, delete round trip; the other handler's bucket "b" is its own.
    let event = run(
        &host,
        "kv",
        json!({"ops": [["set", "greeting", "hello"], ["get", "greeting"], ["exists", "nope"], ["list"], ["delete", "greeting"], ["get", "greeting"], ["fail"]]}),
    )
    .await;
    let text = failure(&event);
    for line in [
        "kv get ok hello",
        "kv exists ok false",
        "kv list ok greeting,n",
        "kv get ok absent",
    ] {
        assert!(text.contains(line), "{line}: {text}");
    }
    let event = run(&host, "other", json!({"ops": [["get", "n"], ["fail"]]})).await;
    assert!(
        failure(&event).contains("kv get ok absent"),
        "{}",
        failure(&event)
    );

    // Refused, as errors the guest sees (never traps), with the reason in the log.
    for (payload, seen, logged) in [
        (
            json!({"bucket": "secrets", "ops": []}),
            "kv open: access-denied",
            "bucket \\\"secrets\\\" is not granted",
        ),
        (
            json!({"bucket": "small", "ops": [["set_bytes", "big", 5000]]}),
            "quota exceeded",
            "max_bytes",
        ),
        (
            json!({"bucket": "small", "ops": [["set_bytes", "huge", 600_000]]}),
            "value too large",
            "at most 524288 bytes",
        ),
        (
            json!({"bucket": "small", "ops": [["set_many", 60]]}),
            "budget",
            "keyvalue.max_operations",
        ),
        (
            json!({"bucket": "small", "ops": [["repeat_get", 1000]]}),
            "budget",
            "keyvalue.max_operations",
        ),
        (
            json!({"ops": [["set", "n", "not a number"], ["increment", "n", 1]]}),
            "cannot increment",
            "not a decimal number",
        ),
        (
            json!({"ops": [["set", "", "x"]]}),
            "invalid key",
            "may not be empty",
        ),
    ] {
        let event = run(&host, "kv", payload.clone()).await;
        assert_eq!(event["status"], "failed", "{payload}: {event:#}");
        assert_eq!(
            event["handlers"][0]["last_error"]["kind"], "fail",
            "the guest saw an error and failed on its own: {event:#}"
        );
        let text = failure(&event);
        assert!(text.contains(seen), "{payload}: {text}");
        assert!(text.contains(logged), "{payload}: {text}");
    }
    // The key quota: 50 keys in "small", then the 51st is refused.
    let event = run(
        &host,
        "kv",
        json!({"bucket": "small", "ops": [["set_many", 20]]}),
    )
    .await;
    assert_eq!(event["status"], "completed", "{event:#}");
    let small = Namespace::new(group, "kv", "small");
    assert_eq!(store.usage(&small).await.expect("usage").keys, 20);

    // Every operation is counted, refusals included.
    let metrics = host
        .http
        .get(format!("{}/metrics", host.url))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for line in [
        "eventbroker_handler_kv_operations_total{handler=\"kv\",op=\"increment\",result=\"ok\"} 40",
        "eventbroker_handler_kv_operations_total{handler=\"kv\",op=\"open\",result=\"refused\"} 1",
        "eventbroker_handler_kv_operations_total{handler=\"kv\",op=\"set\",result=\"quota\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    host.stop().await;
}
