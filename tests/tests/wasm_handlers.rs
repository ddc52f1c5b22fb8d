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
    let events = eventbroker::wasm::runner::parse_events(
        r#"{"type":"probe.a","payload":{"action":"escape"}}
           {"type":"probe.b","payload":{"action":"stdout"}}
           {"type":"probe.c","payload":{"action":"config","key":"colour"}}
           {"type":"probe.d","payload":{"action":"bad-publish"}}"#,
    )
    .unwrap();
    let manifest_text = manifest("\"probe.*\"", "[config]\ncolour = \"blue\"");
    let report = eventbroker::wasm::runner::run(
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
        eventbroker::wasm::runner::parse_events(
            &"{\"type\":\"x.y\",\"payload\":{\"action\":\"ok\"}}\n".repeat(3),
        )
        .unwrap()
    };
    let calls = |report: &eventbroker::wasm::runner::RunReport| -> Vec<String> {
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
    let fresh = eventbroker::wasm::runner::run(
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
    let reuse = eventbroker::wasm::runner::run(
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
    let mixed = eventbroker::wasm::runner::parse_events(
        "{\"type\":\"x.y\",\"payload\":{\"action\":\"ok\"}}\n{\"type\":\"x.y\",\"payload\":{\"action\":\"trap\"}}\n{\"type\":\"x.y\",\"payload\":{\"action\":\"ok\"}}",
    )
    .unwrap();
    let report = eventbroker::wasm::runner::run(
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
