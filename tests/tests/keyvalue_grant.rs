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
    let metrics = host.metrics().await;
    for line in [
        "eventbroker_handler_kv_operations_total{handler=\"kv\",op=\"increment\",result=\"ok\"} 40",
        "eventbroker_handler_kv_operations_total{handler=\"kv\",op=\"open\",result=\"refused\"} 1",
        "eventbroker_handler_kv_operations_total{handler=\"kv\",op=\"set\",result=\"quota\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    host.stop().await;
}

/// The backend of a handler's key-value state cut mid-run (Redis behind a proxy that drops
/// every connection): the guest's operation fails with an error it sees, within the
/// invocation's deadline (no hang, no trap), and works again once the backend is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_key_value_backend_is_an_error_the_guest_sees_within_its_deadline() {
    use eventbroker::{Event, EventSource};
    use eventbroker_testkit::{proxy::Proxy, services, wait_for};
    use eventbroker_wasm::WasmEngine;
    use eventbroker_wasm::config::PoolConfig;
    use eventbroker_wasm::keyvalue::KeyValueBinding;
    use eventbroker_wasm::runner::{Overrides, run};

    let addr = std::env::var("REDIS_ADDR").unwrap_or_else(|_| "127.0.0.1:6379".into());
    if !services::available("Redis", &addr) {
        return;
    }
    let built = guests::build();
    let client = std::fs::read(built.fixtures.join("kv_client.wasm")).expect("kv_client");
    let proxy = Proxy::start(addr.clone()).await;
    let mut config = eventbroker_server::Config::default();
    config.backend.provider = eventbroker_server::ProviderKind::Redis;
    config.backend.redis.url = Some(format!("redis://127.0.0.1:{}/0", proxy.port));
    let prefix = format!("eb-test:{}", eventbroker_testkit::unique_suffix());
    config.backend.redis.stream_name = prefix.clone();
    let provider = eventbroker_server::connect(&config.backend, &config.event_broker)
        .await
        .expect("connect through the proxy");
    let engine = WasmEngine::new(&PoolConfig::default(), None).expect("engine");
    engine
        .set_keyvalue(KeyValueBinding {
            store: provider.keyvalue().expect("redis store"),
            scope: "cut".into(),
        })
        .expect("binding");
    let manifest = "timeout = \"2s\"\n[keyvalue]\nbuckets = [\"b\"]\n";
    // One invocation incrementing `n` once.
    let increment = || async {
        let event = Event::new(EventSource::System, "kv.cut", "test")
            .with_payload(json!({"ops": [["increment", "n", 1]]}));
        let report = run(
            &engine,
            &client,
            Some(manifest),
            &Overrides::default(),
            vec![event],
        )
        .await
        .expect("loads");
        report.results[0].invocation.clone()
    };
    let before = increment().await;
    assert!(before.result.is_ok(), "before the cut: {:?}", before.result);

    proxy.cut().await;
    let invocation = increment().await;
    let failure = invocation.result.as_ref().expect_err("the backend is cut");
    assert_eq!(
        failure.kind.as_str(),
        "fail",
        "the guest saw an error and failed on its own: {failure:?}"
    );
    assert!(
        failure.message.contains("kv increment: other:"),
        "{failure:?}"
    );
    assert!(
        invocation.duration < std::time::Duration::from_secs(10),
        "bounded by the 2 s deadline: {:?}",
        invocation.duration
    );

    proxy.restore().await;
    wait_for("an increment after the backend is back", || async {
        increment().await.result.is_ok().then_some(())
    })
    .await;
    // Exactly the two increments that succeeded: none of the refused ones was applied.
    let ns = Namespace::new("cut", "local", "b");
    assert_eq!(
        provider
            .keyvalue()
            .expect("store")
            .get(&ns, "n")
            .await
            .expect("read"),
        Some(b"2".to_vec())
    );
    provider.close().await;
    if let Ok(mut conn) =
        redis::Client::open(format!("redis://{addr}/0")).and_then(|c| c.get_connection())
    {
        let keys: Vec<String> =
            redis::Commands::keys(&mut conn, format!("{prefix}*")).unwrap_or_default();
        for key in keys {
            let _: Result<i64, _> = redis::Commands::del(&mut conn, key);
        }
    }
}
