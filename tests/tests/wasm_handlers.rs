//! WebAssembly handlers end to end: loaded from the handlers directory of an in-process host,
//! fed over HTTP, checked through the event API.

use std::collections::HashMap;

use eventbroker_tests::guests::{self, Built};
use eventbroker_tests::host::{TestHost, install};
use eventbroker_tests::wait_for;
use serde_json::{Value, json};

fn built() -> &'static Built {
    guests::build()
}

/// The outcome record of `handler` in an event's JSON.
fn outcome<'a>(event: &'a Value, handler: &str) -> &'a Value {
    event["handlers"]
        .as_array()
        .and_then(|all| all.iter().find(|o| o["handler"] == handler))
        .unwrap_or_else(|| panic!("no outcome for {handler} in {event:#}"))
}

async fn publish(host: &TestHost, body: Value) -> String {
    let (status, reply) = host.publish(body, "").await;
    assert_eq!(status, 202, "{reply}");
    reply["id"].as_str().expect("id").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_guests_route_by_pattern_and_publish_derived_events() {
    let built = built();
    let host = TestHost::start(|config, dir| {
        // The first event claims source `database` and a user id: that needs a token.
        config.server.token = Some("test-token".into());
        for (name, crate_name, folder) in [
            ("audit-logger", "rust_audit_logger", "rust-audit-logger"),
            ("user-notifier", "rust_user_notifier", "rust-user-notifier"),
            (
                "payload-validator",
                "rust_payload_validator",
                "rust-payload-validator",
            ),
        ] {
            let manifest = std::fs::read_to_string(built.guest_dir(folder).join("manifest.toml"))
                .expect("manifest");
            install(dir, name, &built.guest(crate_name), Some(&manifest));
        }
    })
    .await;
    let loaded: Vec<String> = host
        .service
        .handlers()
        .list()
        .into_iter()
        .filter(|h| h.state == "active")
        .map(|h| h.name)
        .collect();
    assert_eq!(
        loaded,
        ["audit-logger", "payload-validator", "user-notifier"]
    );

    let id = publish(
        &host,
        json!({"type": "public.users.create", "source": "database", "user_id": 7,
               "payload": {"name": "Ada", "email": "ada@example.com"}}),
    )
    .await;
    let event = host.finished(&id).await;
    assert_eq!(event["status"], "completed", "{event:#}");
    let handlers: Vec<&str> = event["handlers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["handler"].as_str().unwrap())
        .collect();
    assert_eq!(
        handlers,
        ["audit-logger", "user-notifier"],
        "routing by pattern"
    );
    assert_eq!(
        outcome(&event, "user-notifier")["version"]
            .as_str()
            .map(str::len),
        Some(16),
        "events record the handler version"
    );

    // The derived notification was published, tagged with its cause, and handled by the
    // audit logger (pattern `*`).
    let derived = wait_for("derived event", || async {
        let (_, page) = host.get("/v1/events?type=notify.users.welcome").await;
        page["events"].as_array().and_then(|e| e.first().cloned())
    })
    .await;
    assert_eq!(derived["metadata"]["caused_by"], json!(id));
    assert_eq!(derived["source"], "internal");
    assert_eq!(derived["payload"]["to"], "ada@example.com");
    assert_eq!(derived["user_id"], 7);
    let derived = host.finished(derived["id"].as_str().unwrap()).await;
    assert_eq!(outcome(&derived, "audit-logger")["state"], "succeeded");

    // The validator: ok, fail for good, retry then dead letter (manifest: max_retries 2).
    let ok = publish(
        &host,
        json!({"type": "shop.orders.create", "payload": {"sku": "A", "quantity": 2}}),
    )
    .await;
    let bad = publish(
        &host,
        json!({"type": "shop.orders.create", "payload": {"sku": "", "quantity": 2}}),
    )
    .await;
    let flaky = publish(
        &host,
        json!({"type": "shop.orders.create", "payload": {"sku": "A", "quantity": 2, "simulate": "transient"}}),
    )
    .await;
    assert_eq!(host.finished(&ok).await["status"], "completed");
    let bad = host.finished(&bad).await;
    assert_eq!(bad["status"], "failed");
    let failure = &outcome(&bad, "payload-validator")["last_error"];
    assert_eq!(failure["kind"], "fail");
    assert_eq!(
        outcome(&bad, "payload-validator")["attempts"],
        1,
        "fail is not retried"
    );
    let flaky = host.finished(&flaky).await;
    assert_eq!(flaky["status"], "failed");
    assert_eq!(
        outcome(&flaky, "payload-validator")["attempts"],
        3,
        "1 + max_retries 2"
    );
    assert_eq!(flaky["retry_count"], 2);
    assert_eq!(
        outcome(&flaky, "payload-validator")["last_error"]["kind"],
        "retry"
    );
    host.stop().await;
}

/// A manifest for the misbehaving fixture.
fn manifest(patterns: &str, extra: &str) -> String {
    format!(
        "patterns = [{patterns}]\n{extra}\n[retry]\nmax_retries = 1\ninitial_delay = \"10ms\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_kind_is_recorded_with_its_details() {
    let built = built();
    let fixture = built.misbehave();
    let host = TestHost::start(|_, dir| {
        install(
            dir,
            "cheap",
            &fixture,
            Some(&manifest(
                "\"cheap.>\"",
                "fuel = 2_000_000\ntimeout = \"5s\"",
            )),
        );
        install(
            dir,
            "tight",
            &fixture,
            Some(&manifest(
                "\"tight.>\"",
                "fuel = 1_000_000_000_000\nmemory = \"4MiB\"\ntimeout = \"10s\"",
            )),
        );
        install(
            dir,
            "slow",
            &fixture,
            Some(&manifest(
                "\"slow.>\"",
                "fuel = 1_000_000_000_000\ntimeout = \"300ms\"",
            )),
        );
    })
    .await;
    let cases = [
        ("cheap.ok", "ok", None, 1),
        ("cheap.retry", "retry", Some("retry"), 2),
        ("cheap.fail", "fail", Some("fail"), 1),
        ("cheap.trap", "trap", Some("trap"), 1),
        ("cheap.loop", "loop", Some("out_of_fuel"), 1),
        ("tight.grow", "grow", Some("memory_limit"), 1),
        ("slow.loop", "loop", Some("timeout"), 2),
    ];
    let mut ids = Vec::new();
    for (event_type, action, _, _) in cases {
        ids.push(
            publish(
                &host,
                json!({"type": event_type, "payload": {"action": action}}),
            )
            .await,
        );
    }
    for ((event_type, _, kind, attempts), id) in cases.iter().zip(&ids) {
        let event = host.finished(id).await;
        let handler = event_type.split('.').next().unwrap();
        let record = outcome(&event, handler);
        assert_eq!(record["attempts"], *attempts, "{event_type}: {event:#}");
        match kind {
            None => assert_eq!(event["status"], "completed", "{event_type}: {event:#}"),
            Some(kind) => {
                assert_eq!(event["status"], "failed", "{event_type}");
                let failure = &record["last_error"];
                assert_eq!(failure["kind"], *kind, "{event_type}: {failure:#}");
                assert!(
                    failure["fuel_used"].as_u64().is_some(),
                    "{event_type}: fuel recorded"
                );
            }
        }
    }
    let trap = host.finished(&ids[3]).await;
    let failure = &outcome(&trap, "cheap")["last_error"];
    assert!(
        failure["message"]
            .as_str()
            .unwrap()
            .contains("wasm backtrace")
            || failure["message"].as_str().unwrap().contains("unreachable"),
        "trap message with backtrace: {failure:#}"
    );
    assert!(
        failure["log_tail"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l.as_str().unwrap().contains("about to trap")),
        "log tail kept: {failure:#}"
    );
    let fuel = host.finished(&ids[4]).await;
    assert_eq!(
        outcome(&fuel, "cheap")["last_error"]["fuel_used"],
        2_000_000,
        "the whole budget"
    );
    // Counters by outcome kind.
    let cheap = host.service.handlers().get("cheap").unwrap();
    assert_eq!(cheap.invocations["ok"], 1);
    assert_eq!(cheap.invocations["out_of_fuel"], 1);
    assert_eq!(
        host.service.handlers().get("tight").unwrap().invocations["memory_limit"],
        1
    );
    assert_eq!(cheap.invocations["trap"], 1);
    assert_eq!(cheap.invocations["retry"], 2);
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_per_handler() {
    let built = built();
    let fixture = built.misbehave();
    let host = TestHost::start(|_, dir| {
        install(
            dir,
            "small",
            &fixture,
            Some(&manifest("\"spin.*\"", "fuel = 1_000_000")),
        );
        install(
            dir,
            "large",
            &fixture,
            Some(&manifest("\"spin.*\"", "fuel = 3_000_000")),
        );
    })
    .await;
    let id = publish(
        &host,
        json!({"type": "spin.now", "payload": {"action": "loop"}}),
    )
    .await;
    let event = host.finished(&id).await;
    assert_eq!(
        outcome(&event, "small")["last_error"]["fuel_used"],
        1_000_000
    );
    assert_eq!(
        outcome(&event, "large")["last_error"]["fuel_used"],
        3_000_000
    );
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misbehaving_handler_does_not_disturb_a_well_behaved_one() {
    let built = built();
    let fixture = built.misbehave();
    let host = TestHost::start(|config, dir| {
        config.event_broker.worker_count = 6;
        // The hog events are still spinning at the end: stop gives them back instead of
        // waiting for them.
        config.event_broker.shutdown_timeout = std::time::Duration::from_secs(1);
        install(
            dir,
            "hog",
            &fixture,
            Some(&manifest(
                "\"hog.*\"",
                "fuel = 1_000_000_000_000\ntimeout = \"20s\"\nconcurrency = 2",
            )),
        );
        install(dir, "good", &fixture, Some(&manifest("\"good.*\"", "")));
        install(
            dir,
            "flooder",
            &fixture,
            Some(&manifest("\"flood.*\"", "max_publishes = 5")),
        );
    })
    .await;
    // Two hog invocations spin at full speed for up to 30s, more hog events queue behind
    // them, and other guests flood logs and publishes.
    let mut hogs = Vec::new();
    for _ in 0..4 {
        hogs.push(
            publish(
                &host,
                json!({"type": "hog.spin", "payload": {"action": "loop"}}),
            )
            .await,
        );
    }
    let flood_log = publish(
        &host,
        json!({"type": "flood.log", "payload": {"action": "log-flood"}}),
    )
    .await;
    let flood_publish = publish(
        &host,
        json!({"type": "flood.publish", "payload": {"action": "publish", "count": 1000}}),
    )
    .await;
    let mut good = Vec::new();
    for _ in 0..40 {
        good.push(
            publish(
                &host,
                json!({"type": "good.work", "payload": {"action": "ok"}}),
            )
            .await,
        );
    }
    for id in &good {
        let event = host.finished(id).await;
        assert_eq!(event["status"], "completed", "{event:#}");
    }
    // The well-behaved events all finished while the hog was still spinning.
    let (_, hog) = host.get(&format!("/v1/events/{}", hogs[0])).await;
    assert!(
        matches!(hog["status"].as_str(), Some("processing" | "pending")),
        "hog still running while the good handler finished: {hog:#}"
    );
    // Floods cost only the flooder's budgets.
    let flood_log = host.finished(&flood_log).await;
    assert_eq!(flood_log["status"], "completed");
    let flood_publish = host.finished(&flood_publish).await;
    assert_eq!(flood_publish["status"], "completed");
    let (_, derived) = host.get("/v1/events?type=fixture.derived&limit=1000").await;
    assert_eq!(derived["count"], 5, "publish budget of 5 enforced");
    let (_, health) = host.get("/healthz").await;
    assert_eq!(health["status"], "ok");
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_get_no_ambient_capabilities_and_their_output_is_captured() {
    let built = built();
    let fixture = built.misbehave();
    let host = TestHost::start(|_, dir| {
        install(
            dir,
            "probe",
            &fixture,
            Some(&manifest(
                "\"probe.*\"",
                "[config]\ncolour = \"blue\"\nlimit = 3",
            )),
        );
    })
    .await;
    let handlers = host.service.handlers().get("probe").unwrap();
    assert_eq!(handlers.state, "active");
    // Run through the local runner to see the logs.
    let engine = host.service.handlers().engine().clone();
    let bytes = std::fs::read(&fixture).unwrap();
    let events = eventbroker_wasm::runner::parse_events(
        r#"{"type":"probe.a","payload":{"action":"escape"}}
           {"type":"probe.b","payload":{"action":"stdout"}}
           {"type":"probe.c","payload":{"action":"config","key":"colour"}}
           {"type":"probe.d","payload":{"action":"bad-publish"}}"#,
    )
    .unwrap();
    let manifest_text = manifest("\"probe.*\"", "[config]\ncolour = \"blue\"");
    let report = eventbroker_wasm::runner::run(
        &engine,
        &bytes,
        Some(&manifest_text),
        &Default::default(),
        events,
    )
    .await
    .unwrap();
    let logs: Vec<Vec<(String, String)>> = report
        .results
        .iter()
        .map(|r| {
            r.invocation
                .logs
                .iter()
                .map(|l| (l.level.to_owned(), l.message.clone()))
                .collect()
        })
        .collect();
    assert_eq!(
        logs[0],
        [(
            "info".to_owned(),
            "file=false env=0 args=0 net=false".to_owned()
        )]
    );
    assert_eq!(
        logs[1],
        [
            ("stdout".to_owned(), "hello from stdout".to_owned()),
            ("stderr".to_owned(), "hello from stderr".to_owned())
        ]
    );
    assert_eq!(
        logs[2],
        [(
            "info".to_owned(),
            "config colour = Some(\"blue\")".to_owned()
        )]
    );
    assert!(logs[3][0].1.contains("invalid type"), "{:?}", logs[3]);
    assert!(report.all_ok());
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_instances_share_no_state_and_reuse_keeps_warm_instances() {
    let built = built();
    let fixture = built.misbehave();
    let engine = {
        let host = TestHost::start(|_, _| {}).await;
        let engine = host.service.handlers().engine().clone();
        host.stop().await;
        engine
    };
    let bytes = std::fs::read(fixture).unwrap();
    let events = || {
        eventbroker_wasm::runner::parse_events(
            &"{\"type\":\"x.y\",\"payload\":{\"action\":\"ok\"}}\n".repeat(3),
        )
        .unwrap()
    };
    let calls = |report: &eventbroker_wasm::runner::RunReport| -> Vec<String> {
        report
            .results
            .iter()
            .map(|r| {
                let line = &r.invocation.logs[0].message;
                line.split("calls ")
                    .nth(1)
                    .unwrap()
                    .split(' ')
                    .next()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    };
    let fresh = eventbroker_wasm::runner::run(
        &engine,
        &bytes,
        Some("patterns = [\"*\"]\ninstances = \"fresh\""),
        &Default::default(),
        events(),
    )
    .await
    .unwrap();
    assert_eq!(
        calls(&fresh),
        ["1", "1", "1"],
        "no state leaks between events"
    );
    let reuse = eventbroker_wasm::runner::run(
        &engine,
        &bytes,
        Some("patterns = [\"*\"]\ninstances = \"reuse\""),
        &Default::default(),
        events(),
    )
    .await
    .unwrap();
    assert_eq!(calls(&reuse), ["1", "2", "3"], "a warm instance is reused");
    // A trapped instance is discarded under `reuse`.
    let mixed = eventbroker_wasm::runner::parse_events(
        "{\"type\":\"x.y\",\"payload\":{\"action\":\"ok\"}}\n{\"type\":\"x.y\",\"payload\":{\"action\":\"trap\"}}\n{\"type\":\"x.y\",\"payload\":{\"action\":\"ok\"}}",
    )
    .unwrap();
    let report = eventbroker_wasm::runner::run(
        &engine,
        &bytes,
        Some("patterns = [\"*\"]\ninstances = \"reuse\""),
        &Default::default(),
        mixed,
    )
    .await
    .unwrap();
    let last = &report.results[2].invocation.logs[0].message;
    assert!(
        last.contains("calls 1 "),
        "fresh instance after the trap: {last}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_module_is_reported_and_does_not_stop_the_others() {
    let built = built();
    let host = TestHost::start(|_, dir| {
        std::fs::write(dir.join("broken.wasm"), b"not wasm at all").unwrap();
        install(dir, "no-patterns", &built.misbehave(), None);
        install(
            dir,
            "fine",
            &built.misbehave(),
            Some("patterns = [\"fine.*\"]"),
        );
    })
    .await;
    let handlers: HashMap<String, _> = host
        .service
        .handlers()
        .list()
        .into_iter()
        .map(|h| (h.name.clone(), h))
        .collect();
    assert_eq!(handlers["fine"].state, "active");
    assert_eq!(handlers["broken"].state, "rejected");
    assert!(
        handlers["broken"]
            .last_rejection
            .as_ref()
            .unwrap()
            .reason
            .contains("not a WebAssembly file")
    );
    assert!(
        handlers["no-patterns"]
            .last_rejection
            .as_ref()
            .unwrap()
            .reason
            .contains("no subscription patterns")
    );
    let id = publish(
        &host,
        json!({"type": "fine.one", "payload": {"action": "ok"}}),
    )
    .await;
    assert_eq!(host.finished(&id).await["status"], "completed");
    host.stop().await;
}

/// An engine like the one the CLI uses, with the tests' shared compile cache.
fn test_engine() -> eventbroker_wasm::WasmEngine {
    let pool = eventbroker_wasm::config::PoolConfig {
        instances: 16,
        ..Default::default()
    };
    eventbroker_wasm::WasmEngine::new(
        &pool,
        Some(guests::repo_root().join("target/test-component-cache")),
    )
    .expect("engine")
}

/// Events of `handler` by outcome kind.
fn invocations(host: &TestHost, handler: &str) -> std::collections::BTreeMap<&'static str, u64> {
    host.service
        .handlers()
        .get(handler)
        .unwrap_or_else(|| panic!("no handler {handler}"))
        .invocations
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_instance_pool_defers_events_instead_of_failing_them() {
    let built = built();
    let host = TestHost::start(|config, dir| {
        config.handlers.pool.instances = 2;
        config.event_broker.worker_count = 4;
        // No retries: an attempt spent on the pool being full would fail the event for good.
        install(
            dir,
            "slow",
            &built.misbehave(),
            Some("patterns = [\"slow.*\"]\n[retry]\nmax_retries = 0\n"),
        );
    })
    .await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(
            publish(
                &host,
                json!({"type": "slow.work", "payload": {"action": "sleep", "ms": 1500}}),
            )
            .await,
        );
    }
    // Two run; the other two find the pool full and say so while they wait.
    let deferred = wait_for("an event deferred for the full pool", || async {
        for id in &ids {
            let (_, event) = host.get(&format!("/v1/events/{id}")).await;
            if let Some(error) = event["error"].as_str()
                && error.contains("instance pool is full")
            {
                return Some(error.to_owned());
            }
        }
        None
    })
    .await;
    assert!(deferred.contains("busy"), "{deferred}");
    assert!(
        deferred.contains("without counting an attempt"),
        "{deferred}"
    );
    for id in &ids {
        let event = host.finished(id).await;
        assert_eq!(event["status"], "completed", "{event:#}");
        assert_eq!(outcome(&event, "slow")["attempts"], 1, "{event:#}");
    }
    let counts = invocations(&host, "slow");
    assert_eq!(counts["ok"], 4, "{counts:?}");
    assert!(counts["busy"] >= 1, "{counts:?}");
    for kind in ["trap", "fail", "timeout", "host"] {
        assert_eq!(counts[kind], 0, "{kind}: {counts:?}");
    }
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_instances_give_their_slots_to_other_handlers() {
    let built = built();
    let host = TestHost::start(|config, dir| {
        // One slot: a warm instance of one handler is all the pool holds.
        config.handlers.pool.instances = 1;
        for name in ["first", "second"] {
            install(
                dir,
                name,
                &built.misbehave(),
                Some(&format!(
                    "patterns = [\"{name}.*\"]\ninstances = \"reuse\"\n[retry]\nmax_retries = 0\n"
                )),
            );
        }
    })
    .await;
    for event_type in ["first.a", "second.a", "first.b", "second.b"] {
        let id = publish(
            &host,
            json!({"type": event_type, "payload": {"action": "ok"}}),
        )
        .await;
        let event = host.finished(&id).await;
        assert_eq!(event["status"], "completed", "{event_type}: {event:#}");
    }
    for name in ["first", "second"] {
        let counts = invocations(&host, name);
        assert_eq!(counts["ok"], 2, "{name}: {counts:?}");
        assert_eq!(counts["trap"], 0, "{name}: {counts:?}");
    }
    let slots = host.service.handlers().engine().slots();
    assert_eq!(slots.capacity(), 1);
    assert_eq!(
        slots.warm() + slots.free(),
        1,
        "the one slot is warm or free"
    );
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_reuse_handlers_on_every_event_all_run_with_the_default_pool() {
    const HANDLERS: usize = 30;
    let built = built();
    let host = TestHost::start(|config, dir| {
        config.handlers.pool = eventbroker_wasm::config::PoolConfig::default();
        config.event_broker.worker_count = 16;
        for n in 0..HANDLERS {
            install(
                dir,
                &format!("fan{n:02}"),
                &built.misbehave(),
                Some("patterns = [\"fan.*\"]\ninstances = \"reuse\"\n[retry]\nmax_retries = 0\n"),
            );
        }
    })
    .await;
    // 16 events at once, each running 30 handlers that wait 200 ms: 480 instances wanted,
    // 256 slots.
    let mut ids = Vec::new();
    for _ in 0..32 {
        ids.push(
            publish(
                &host,
                json!({"type": "fan.out", "payload": {"action": "sleep", "ms": 200}}),
            )
            .await,
        );
    }
    for id in &ids {
        let event = host.finished(id).await;
        assert_eq!(event["status"], "completed", "{event:#}");
        let outcomes = event["handlers"].as_array().unwrap();
        assert_eq!(outcomes.len(), HANDLERS, "{event:#}");
        for record in outcomes {
            assert_eq!(record["state"], "succeeded", "{record:#}");
            assert_eq!(record["attempts"], 1, "{record:#}");
        }
    }
    let slots = host.service.handlers().engine().slots();
    assert!(slots.warm() <= slots.capacity());
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_instance_gets_a_fresh_log_budget_for_every_event() {
    let bytes = std::fs::read(built().misbehave()).unwrap();
    let events = eventbroker_wasm::runner::parse_events(
        &"{\"type\":\"x.y\",\"payload\":{\"action\":\"ok\"}}\n".repeat(12),
    )
    .unwrap();
    let report = eventbroker_wasm::runner::run(
        &test_engine(),
        &bytes,
        Some("patterns = [\"*\"]\ninstances = \"reuse\"\nmax_log_bytes = \"200B\"\nmax_log_lines = 2"),
        &Default::default(),
        events,
    )
    .await
    .unwrap();
    for (index, result) in report.results.iter().enumerate() {
        let invocation = &result.invocation;
        assert!(invocation.result.is_ok(), "event {index}: {invocation:?}");
        assert_eq!(invocation.logs.len(), 1, "event {index}: {invocation:?}");
        assert_eq!(invocation.logs_dropped, 0, "event {index}: {invocation:?}");
        assert!(
            invocation.logs[0]
                .message
                .contains(&format!("calls {} ", index + 1)),
            "one warm instance throughout: {:?}",
            invocation.logs
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_publishes_spend_the_publish_budget() {
    let built = built();
    let host = TestHost::start(|_, dir| {
        install(
            dir,
            "refused",
            &built.misbehave(),
            Some(&manifest(
                "\"refused.*\"",
                "max_publishes = 5\nfuel = 1_000_000_000_000\ntimeout = \"20s\"",
            )),
        );
    })
    .await;
    // A payload just over event_broker.max_payload (1 MiB): every draft is refused.
    let id = publish(
        &host,
        json!({"type": "refused.x", "payload": {"action": "publish-loop", "bytes": 1_060_000, "stop_on_budget": true}}),
    )
    .await;
    let event = host.finished(&id).await;
    let failure = &outcome(&event, "refused")["last_error"];
    assert_eq!(failure["kind"], "fail", "{failure:#}");
    let message = failure["message"].as_str().unwrap();
    assert!(message.starts_with("after 6 calls"), "{message}");
    assert!(message.contains("publish budget"), "{message}");
    let (_, derived) = host.get("/v1/events?type=fixture.big").await;
    assert_eq!(derived["count"], 0, "nothing published");
    host.stop().await;
}

/// Polls `/healthz` until `done` says stop; returns every latency seen.
async fn health_latencies(host: &TestHost, done: impl Fn() -> bool) -> Vec<std::time::Duration> {
    let mut latencies = Vec::new();
    while !done() {
        let started = std::time::Instant::now();
        let response = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            host.http.get(format!("{}/healthz", host.url)).send(),
        )
        .await
        .expect("/healthz answers within 10 s while a guest floods the host")
        .expect("request");
        assert_eq!(response.status(), 200);
        latencies.push(started.elapsed());
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    latencies
}

fn summary(latencies: &mut [std::time::Duration]) -> String {
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    format!(
        "{} probes, median {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        at(0.5),
        at(0.99),
        at(1.0)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_flooding_the_host_with_huge_drafts_end_within_their_budgets() {
    let built = built();
    let host = TestHost::start(|_, dir| {
        install(
            dir,
            "flood",
            &built.misbehave(),
            Some(&manifest("\"flood.*\"", "timeout = \"20s\"")),
        );
    })
    .await;
    let mut baseline = {
        let stop = std::time::Instant::now() + std::time::Duration::from_millis(500);
        health_latencies(&host, || std::time::Instant::now() > stop).await
    };
    println!("/healthz with an idle host: {}", summary(&mut baseline));
    for (bytes, kind, needle) in [
        // 30 MB drafts: more than one host call may carry; the first one traps.
        (30_000_000, "trap", "handed the host more than"),
        // Drafts just over max_payload: refused, then the budget is spent, and every call
        // costs fuel for the bytes handed over.
        (1_060_000, "out_of_fuel", "ran out of fuel"),
    ] {
        let id = publish(
            &host,
            json!({"type": "flood.x", "payload": {"action": "publish-loop", "bytes": bytes}}),
        )
        .await;
        let finished = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = {
            let (url, http, finished) = (host.url.clone(), host.http.clone(), finished.clone());
            let id = id.clone();
            tokio::spawn(async move {
                loop {
                    let event: Value = http
                        .get(format!("{url}/v1/events/{id}"))
                        .send()
                        .await
                        .unwrap()
                        .json()
                        .await
                        .unwrap();
                    if matches!(event["status"].as_str(), Some("completed" | "failed")) {
                        finished.store(true, std::sync::atomic::Ordering::Release);
                        return event;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            })
        };
        let mut latencies = health_latencies(&host, || {
            finished.load(std::sync::atomic::Ordering::Acquire)
        })
        .await;
        let event = watcher.await.unwrap();
        if !latencies.is_empty() {
            println!(
                "/healthz while a guest loops on {bytes}-byte drafts: {}",
                summary(&mut latencies)
            );
        }
        let failure = &outcome(&event, "flood")["last_error"];
        assert_eq!(failure["kind"], kind, "{bytes}: {failure:#}");
        assert!(
            failure["message"].as_str().unwrap().contains(needle),
            "{bytes}: {failure:#}"
        );
    }
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_guest_hands_the_host_is_bounded() {
    let built = built();
    let host = TestHost::start(|_, dir| {
        install(
            dir,
            "bounded",
            &built.misbehave(),
            Some(&manifest("\"bounded.*\"", "")),
        );
    })
    .await;
    // A long fail message is cut, in the outcome and in the event's error summary.
    let id = publish(
        &host,
        json!({"type": "bounded.fail", "payload": {"action": "fail-big", "bytes": 500_000}}),
    )
    .await;
    let event = host.finished(&id).await;
    let failure = &outcome(&event, "bounded")["last_error"];
    assert_eq!(failure["kind"], "fail");
    let message = failure["message"].as_str().unwrap();
    assert!(message.len() <= eventbroker_wasm::limits::MAX_MESSAGE_BYTES + 64);
    assert!(
        message.ends_with("more bytes cut]"),
        "{}",
        &message[message.len() - 40..]
    );
    assert!(
        event["error"].as_str().unwrap().len() <= eventbroker_wasm::limits::MAX_MESSAGE_BYTES + 128
    );
    // More than one call may carry: the guest traps before the host copies it.
    let id = publish(
        &host,
        json!({"type": "bounded.huge", "payload": {"action": "fail-big", "bytes": 5_000_000}}),
    )
    .await;
    let event = host.finished(&id).await;
    let failure = &outcome(&event, "bounded")["last_error"];
    assert_eq!(failure["kind"], "trap", "{failure:#}");
    assert!(
        failure["message"]
            .as_str()
            .unwrap()
            .contains("handed the host more than")
    );
    assert!(serde_json::to_string(&event).unwrap().len() < 64 * 1024);
    // Every field of a derived-event draft is bounded.
    for (field, bytes) in [
        ("session_id", 300),
        ("schema", 300),
        ("entity", 300),
        ("operation", 300),
        ("metadata", 100_000),
        ("payload", 1_060_000),
    ] {
        let id = publish(
            &host,
            json!({"type": "bounded.draft", "payload": {"action": "hostile-draft", "field": field, "bytes": bytes}}),
        )
        .await;
        let event = host.finished(&id).await;
        let failure = &outcome(&event, "bounded")["last_error"];
        let message = failure["message"].as_str().unwrap_or("");
        assert!(
            message.starts_with(&format!("refused {field}: {field} is")),
            "{field}: {event:#}"
        );
        assert!(
            message.contains("larger than the limit"),
            "{field}: {message}"
        );
    }
    // Within the limits, drafts are accepted.
    let id = publish(
        &host,
        json!({"type": "bounded.draft", "payload": {"action": "hostile-draft", "field": "metadata", "bytes": 1000}}),
    )
    .await;
    assert_eq!(host.finished(&id).await["status"], "completed");
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_refuses_what_serve_refuses() {
    let bytes = std::fs::read(built().misbehave()).unwrap();
    let events = eventbroker_wasm::runner::parse_events(
        r#"{"type":"x.a","payload":{"action":"hostile-draft","field":"payload","bytes":1060000}}
           {"type":"x.b","payload":{"action":"hostile-draft","field":"session_id","bytes":300}}
           {"type":"x.c","payload":{"action":"hostile-draft","field":"metadata","bytes":1000}}"#,
    )
    .unwrap();
    let report = eventbroker_wasm::runner::run(
        &test_engine(),
        &bytes,
        Some("patterns = [\"*\"]"),
        &Default::default(),
        events,
    )
    .await
    .unwrap();
    for (index, field) in ["payload", "session_id"].iter().enumerate() {
        let failure = report.results[index]
            .invocation
            .result
            .as_ref()
            .expect_err(field);
        assert!(
            failure.message.starts_with(&format!("refused {field}")),
            "{failure:?}"
        );
    }
    assert!(report.results[2].invocation.result.is_ok());
    assert_eq!(report.results[2].invocation.published.len(), 1);
    // Sample events are checked as POST /v1/events checks them.
    let err = eventbroker_wasm::runner::parse_events(&format!(
        "{{\"type\":\"x.y\",\"session_id\":\"{}\"}}",
        "s".repeat(300)
    ))
    .unwrap_err();
    assert!(err.to_string().contains("session_id"), "{err}");
}

/// A manifest for the hostile-patterns fixture choosing how its `patterns()` misbehaves.
fn patterns_mode(mode: &str) -> String {
    format!("[config]\npatterns = \"{mode}\"\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_and_run_bound_patterns_like_serve() {
    let bytes = std::fs::read(built().hostile_patterns()).unwrap();
    let engine = test_engine();
    let bounded = |what: &'static str| {
        let engine = engine.clone();
        let bytes = bytes.clone();
        async move {
            tokio::time::timeout(
                eventbroker_tests::PATIENCE,
                eventbroker_wasm::check::check(&engine, &bytes, Some(&patterns_mode(what))),
            )
            .await
            .unwrap_or_else(|_| panic!("check of {what} patterns did not finish"))
            .expect("a component")
        }
    };
    let ok = bounded("ok").await;
    assert!(ok.compatible, "{:?}", ok.problems);
    assert_eq!(ok.default_patterns, Some(vec!["hostile.>".to_owned()]));
    for (mode, needle) in [
        ("sleep", "did not return within"),
        ("many", "at most 100 patterns"),
        ("long", "at most 255"),
        ("invalid", "invalid pattern"),
    ] {
        let report = bounded(mode).await;
        assert!(!report.compatible, "{mode}");
        assert!(
            report.problems.iter().any(|p| p.contains(needle)),
            "{mode}: {:?}",
            report.problems
        );
    }
    // Without a manifest the component waits on a clock: check and run end all the same.
    let report = tokio::time::timeout(
        eventbroker_tests::PATIENCE,
        eventbroker_wasm::check::check(&engine, &bytes, None),
    )
    .await
    .expect("check finishes")
    .expect("a component");
    assert!(!report.compatible);
    let events = eventbroker_wasm::runner::parse_events("{\"type\":\"hostile.x\"}").unwrap();
    let error = tokio::time::timeout(
        eventbroker_tests::PATIENCE,
        eventbroker_wasm::runner::run(&engine, &bytes, None, &Default::default(), events),
    )
    .await
    .expect("run finishes")
    .expect_err("refused");
    assert!(
        error.to_string().contains("did not return within"),
        "{error}"
    );
    // Invalid default patterns are refused even when a manifest overrides them.
    let events = eventbroker_wasm::runner::parse_events("{\"type\":\"hostile.x\"}").unwrap();
    let manifest = format!("patterns = [\"hostile.>\"]\n{}", patterns_mode("invalid"));
    let error = eventbroker_wasm::runner::run(
        &engine,
        &bytes,
        Some(&manifest),
        &Default::default(),
        events,
    )
    .await
    .expect_err("refused");
    assert!(error.to_string().contains("invalid pattern"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_stuck_in_patterns_neither_blocks_start_nor_later_changes() {
    let built = built();
    let host = tokio::time::timeout(
        eventbroker_tests::PATIENCE,
        TestHost::start(|config, dir| {
            config.handlers.debounce = std::time::Duration::from_millis(50);
            install(dir, "stuck", &built.hostile_patterns(), None);
            install(
                dir,
                "fine",
                &built.misbehave(),
                Some("patterns = [\"fine.*\"]"),
            );
        }),
    )
    .await
    .expect("the host starts although a component's patterns() never returns");
    assert_eq!(host.get("/readyz").await.0, 200);
    let stuck = host.service.handlers().get("stuck").unwrap();
    assert_eq!(stuck.state, "rejected");
    let reason = stuck.last_rejection.unwrap().reason;
    assert!(reason.contains("did not return within"), "{reason}");
    // Dropped in while serving, it holds the change lock for its bounded time only.
    install(
        &host.handlers_dir,
        "stuck-too",
        &built.hostile_patterns(),
        None,
    );
    let component = std::fs::read(built.misbehave()).unwrap();
    let (status, info) = tokio::time::timeout(
        eventbroker_tests::PATIENCE,
        host.deploy("later", component, Some("patterns = [\"later.*\"]"), None),
    )
    .await
    .expect("a deploy is not blocked for good");
    assert_eq!(status, 200, "{info}");
    let status = tokio::time::timeout(
        eventbroker_tests::PATIENCE,
        host.http
            .delete(format!("{}/v1/handlers/later", host.url))
            .send(),
    )
    .await
    .expect("a removal is not blocked for good")
    .unwrap()
    .status();
    assert_eq!(status, 204);
    wait_for("the dropped-in component to be rejected", || async {
        let info = host.service.handlers().get("stuck-too")?;
        info.last_rejection
            .filter(|r| r.reason.contains("did not return within"))
    })
    .await;
    let id = publish(
        &host,
        json!({"type": "fine.x", "payload": {"action": "ok"}}),
    )
    .await;
    assert_eq!(host.finished(&id).await["status"], "completed");
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_touch_or_a_deploy_reloads_nothing_and_nothing_reloads_by_itself() {
    let built = built();
    let fixture = std::fs::read(built.misbehave()).unwrap();
    let host = TestHost::start(|config, _| {
        config.handlers.debounce = std::time::Duration::from_millis(50);
    })
    .await;
    let (status, info) = host
        .deploy("web", fixture.clone(), Some("patterns = [\"web.*\"]"), None)
        .await;
    assert_eq!(status, 200, "{info}");
    // `touch`: new times, same content.
    std::fs::File::options()
        .append(true)
        .open(host.handlers_dir.join("web.wasm"))
        .unwrap()
        .set_modified(std::time::SystemTime::now())
        .unwrap();
    // Markers: each is one new file (no manifest, so it is read once and rejected for having
    // no patterns), seen by the watcher after every change made before it.
    let mut markers = 0;
    let mut marker = || {
        markers += 1;
        let name = format!("marker{markers}");
        let tmp = host.handlers_dir.join(format!(".{name}.wasm.tmp"));
        std::fs::write(&tmp, eventbroker_tests::variant(&fixture, markers)).unwrap();
        std::fs::rename(&tmp, host.handlers_dir.join(format!("{name}.wasm"))).unwrap();
        name
    };
    let seen = |name: String| {
        let host = &host;
        async move {
            wait_for(&format!("{name} to be read"), || async {
                let info = host.service.handlers().get(&name)?;
                (info.rejections > 0).then_some(())
            })
            .await
        }
    };
    for _ in 0..3 {
        seen(marker()).await;
    }
    let settled = host.service.handlers().list();
    let web = host.service.handlers().get("web").unwrap();
    assert_eq!(web.loads, 1, "the touch did not load a new version");
    assert!(web.unchanged >= 1, "the touch was seen: {web:?}");
    // Three more markers, each at least one debounce period later: nothing else is re-read.
    for _ in 0..3 {
        seen(marker()).await;
    }
    for before in settled {
        let after = host.service.handlers().get(&before.name).unwrap();
        assert_eq!(
            (after.loads, after.unchanged, after.rejections),
            (before.loads, before.unchanged, before.rejections),
            "{} was read again without a change",
            before.name
        );
    }
    host.stop().await;
}

/// The files a deploy writes are recognised by the watcher as the host's own (by size and
/// modification time) and not even read again: the deployed version is loaded once and never
/// counted as re-applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_does_not_reread_the_files_a_deploy_wrote() {
    let built = built();
    let fixture = std::fs::read(built.misbehave()).unwrap();
    let host = TestHost::start(|config, _| {
        config.handlers.debounce = std::time::Duration::from_millis(50);
    })
    .await;
    for round in 0..2u32 {
        let (status, info) = host
            .deploy(
                "own",
                eventbroker_tests::variant(&fixture, 100 + round),
                Some("patterns = [\"own.*\"]"),
                None,
            )
            .await;
        assert_eq!(status, 200, "{info}");
    }
    // A marker file copied in after the deploys: once the watcher has read it, it has seen
    // every change made before it.
    let tmp = host.handlers_dir.join(".marker.wasm.tmp");
    std::fs::write(&tmp, eventbroker_tests::variant(&fixture, 7)).unwrap();
    std::fs::rename(&tmp, host.handlers_dir.join("marker.wasm")).unwrap();
    wait_for("the marker to be read", || async {
        let info = host.service.handlers().get("marker")?;
        (info.rejections > 0).then_some(())
    })
    .await;
    let own = host.service.handlers().get("own").unwrap();
    assert_eq!(
        (own.loads, own.unchanged, own.rejections),
        (2, 0, 0),
        "each deploy loaded once, and the watcher re-read none of its files: {own:?}"
    );
    host.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_component_cache_is_private_to_the_host_user() {
    use std::os::unix::fs::PermissionsExt;
    let bytes = std::fs::read(built().misbehave()).unwrap();
    let pool = eventbroker_wasm::config::PoolConfig {
        instances: 4,
        ..Default::default()
    };
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("cache");
    let engine = eventbroker_wasm::WasmEngine::new(&pool, Some(dir.clone())).unwrap();
    assert_eq!(engine.cache_dir(), Some(dir.as_path()));
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    let (_, source) = engine.compile(&bytes).unwrap();
    assert_eq!(source, eventbroker_wasm::CompileSource::Compiled);
    let entry = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .expect("an entry");
    assert_eq!(mode(&entry), 0o600);
    assert_eq!(
        engine.compile(&bytes).unwrap().1,
        eventbroker_wasm::CompileSource::Cache
    );
    // An entry others could have written is compiled afresh, not loaded.
    std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o666)).unwrap();
    assert_eq!(
        engine.compile(&bytes).unwrap().1,
        eventbroker_wasm::CompileSource::Compiled
    );
    assert_eq!(mode(&entry), 0o600, "replaced by a private one");
    // A directory others can write is not used at all.
    let shared = root.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let engine = eventbroker_wasm::WasmEngine::new(&pool, Some(shared.clone())).unwrap();
    assert_eq!(engine.cache_dir(), None);
    engine.compile(&bytes).unwrap();
    assert_eq!(std::fs::read_dir(&shared).unwrap().count(), 0);
    // The default is never the working directory.
    if let Some(default) = eventbroker_wasm::config::default_cache_dir() {
        assert!(default.is_absolute(), "{}", default.display());
    }
}
