//! The registry's cluster logic in one process: two hosts (each its own broker and handler
//! set) sharing one cluster handler store in memory. The same story runs against real
//! PostgreSQL, Redis and NATS with `serve` processes in `host/cli/tests/cluster.rs`; here it is
//! quick, and it reaches what a real backend makes hard to stage (a record whose component is
//! missing, then arrives: the hosts heal by themselves).

use std::sync::Arc;
use std::time::Duration;

use eventbroker::handler_store::{HandlerStore, Written};
use eventbroker::{Broker, BrokerConfig, Event, EventSource, EventStatus, MemoryProvider};
use eventbroker_testkit::memory_store::MemoryHandlerStore;
use eventbroker_tests::{guests, wait_for};
use eventbroker_wasm::config::{HandlerSource, HandlersConfig};
use eventbroker_wasm::{ClusterSync, DeployOptions, HandlerSet, WasmEngine};
use serde_json::json;

const PATTERNS: &str = "patterns = [\"t.>\"]\n";

struct Host {
    broker: Broker,
    handlers: HandlerSet,
    _sync: ClusterSync,
}

async fn host(name: &str, store: &MemoryHandlerStore, cache: &std::path::Path) -> Host {
    let config = BrokerConfig {
        instance_id: name.into(),
        worker_count: 2,
        retry_policy: eventbroker::RetryPolicy {
            initial_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(50),
            ..Default::default()
        },
        ..BrokerConfig::default()
    };
    let broker = Broker::new(config.clone(), Arc::new(MemoryProvider::new(&config)));
    let mut handlers_config = HandlersConfig {
        cache_dir: Some(cache.to_path_buf()),
        ..HandlersConfig::default()
    };
    handlers_config.store.report_interval = Duration::from_millis(100);
    handlers_config.store.poll_interval = Duration::from_millis(500);
    handlers_config.canary.min_sample = 5;
    handlers_config.canary.window = Duration::from_secs(3600);
    let engine =
        WasmEngine::new(&handlers_config.pool, handlers_config.cache_dir()).expect("engine");
    let handlers = HandlerSet::clustered(
        engine,
        broker.clone(),
        handlers_config,
        Arc::new(store.clone()),
        HandlerSource::Store,
    );
    handlers.start_cluster().await;
    broker.start().await.expect("start");
    let sync = handlers.follow_cluster().expect("follows the store");
    Host {
        broker,
        handlers,
        _sync: sync,
    }
}

/// Whether `host` runs release `release` (and `canary`) of `name`, converged.
fn runs(host: &Host, name: &str, release: u64, canary: Option<u64>) -> bool {
    host.handlers.get(name).is_some_and(|info| {
        info.cluster.as_ref().is_some_and(|c| {
            c.state == eventbroker_wasm::SyncState::Converged
                && c.desired.as_ref().map(|d| d.number) == Some(release)
                && c.canary.as_ref().map(|c| c.release) == canary
        })
    })
}

async fn wait_runs(host: &Host, name: &str, release: u64, canary: Option<u64>) {
    wait_for(
        &format!("{name} #{release} (canary {canary:?})"),
        || async { runs(host, name, release, canary).then_some(()) },
    )
    .await;
}

fn event(n: u64) -> Event {
    let mut event = Event::new(EventSource::System, "t.work", "test");
    event.payload = json!({"action": "ok", "n": n});
    event
}

async fn finished(host: &Host, id: &str) -> Event {
    wait_for(&format!("event {id} to finish"), || async {
        host.broker
            .provider()
            .get(id)
            .await
            .ok()
            .flatten()
            .filter(|e| matches!(e.status, EventStatus::Completed | EventStatus::Failed))
    })
    .await
}

fn version_of(event: &Event) -> Option<String> {
    event
        .handlers
        .iter()
        .find(|o| o.handler == "h")
        .and_then(|o| o.version.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_follow_deploys_defer_what_they_cannot_run_and_roll_back_a_bad_canary() {
    let built = guests::build();
    let misbehave = std::fs::read(built.misbehave()).expect("misbehave");
    let counter = std::fs::read(built.fixtures.join("counter.wasm")).expect("counter");
    let store = MemoryHandlerStore::default();
    let cache = tempfile::tempdir().expect("cache");
    let (a, b) = (
        host("a", &store, cache.path()).await,
        host("b", &store, cache.path()).await,
    );

    // Deployed once on A, B runs it; both run the same version.
    let info = a
        .handlers
        .deploy("h", misbehave.clone(), Some(PATTERNS))
        .await
        .expect("deploy");
    let first = info.current.expect("serving").version;
    wait_runs(&b, "h", 1, None).await;
    let done = finished(&b, b.broker.publish(event(1)).await.expect("publish").id()).await;
    assert_eq!(done.status, EventStatus::Completed, "{done:?}");
    assert_eq!(version_of(&done).as_deref(), Some(first.as_str()));
    // The same content again changes nothing.
    a.handlers
        .deploy("h", misbehave.clone(), Some(PATTERNS))
        .await
        .expect("redeploy");
    assert!(runs(&a, "h", 1, None));

    // A canary is refused where patterns differ, and outside 1-99 %.
    let refused = a
        .handlers
        .deploy_with(
            "h",
            counter.clone(),
            Some("patterns = [\"u.>\"]\n"),
            DeployOptions { canary: Some(10) },
        )
        .await;
    assert!(format!("{:?}", refused.err()).contains("patterns"));

    // A canary that traps on every event, on half of them: every event completes on the
    // stable release, and the hosts roll the canary back by themselves.
    let bad = format!("{PATTERNS}[config]\ntrap_every = \"1\"\n");
    a.handlers
        .deploy_with(
            "h",
            counter.clone(),
            Some(&bad),
            DeployOptions { canary: Some(50) },
        )
        .await
        .expect("canary");
    wait_runs(&b, "h", 1, Some(2)).await;
    let mut ids = Vec::new();
    for n in 0..40 {
        let host = if n % 2 == 0 { &a } else { &b };
        ids.push((
            n % 2,
            host.broker
                .publish(event(n))
                .await
                .expect("publish")
                .id()
                .to_owned(),
        ));
    }
    for (side, id) in &ids {
        let host = if *side == 0 { &a } else { &b };
        let done = finished(host, id).await;
        assert_eq!(done.status, EventStatus::Completed, "{done:?}");
        assert_eq!(
            version_of(&done).as_deref(),
            Some(first.as_str()),
            "{done:?}"
        );
        assert_eq!(
            done.retry_count, 0,
            "the canary's failure is not an attempt: {done:?}"
        );
    }
    wait_runs(&a, "h", 1, None).await;
    wait_runs(&b, "h", 1, None).await;
    let decision = a
        .handlers
        .get("h")
        .and_then(|i| i.cluster)
        .expect("cluster")
        .decisions;
    let decision = decision.last().expect("a decision");
    assert_eq!(
        (decision.outcome.as_str(), decision.release, decision.stable),
        ("rolled_back", 2, 1)
    );
    assert!(
        decision.canary.failures.get("trap").copied().unwrap_or(0) >= 5,
        "{decision:?}"
    );

    // A good release, then a rollback to the first.
    a.handlers
        .deploy("h", counter.clone(), Some(PATTERNS))
        .await
        .expect("deploy #3");
    wait_runs(&b, "h", 3, None).await;
    b.handlers.rollback("h", None).await.expect("rollback");
    wait_runs(&a, "h", 2, None).await;
    // Release #2 was the trapping canary: rolling back to it by name is allowed (an operator's
    // choice); go to #1 instead.
    b.handlers
        .rollback("h", Some("#1"))
        .await
        .expect("rollback to #1");
    wait_runs(&a, "h", 1, None).await;
    assert!(b.handlers.rollback("h", Some("#9")).await.is_err());

    // A record whose component the store does not hold (yet): neither host can load it, so
    // both defer the handler's events instead of completing them on the previous release.
    // Records are kept per consumer group (the default group here).
    let record = store
        .record("eventbroker.h")
        .await
        .expect("read")
        .expect("record");
    let mut doc: serde_json::Value = serde_json::from_str(&record.doc).expect("json");
    let releases = doc["releases"].as_array_mut().expect("releases");
    let mut missing = releases[0].clone();
    missing["number"] = json!(99);
    let audit = std::fs::read(built.guest("rust_audit_logger")).expect("audit logger");
    let audit_version = eventbroker_wasm::version_id(&audit);
    missing["component"] = json!(audit_version);
    releases.push(missing);
    doc["stable"] = json!(99);
    assert!(matches!(
        store
            .write_record("eventbroker.h", &doc.to_string(), Some(record.revision))
            .await
            .expect("write"),
        Written::Done(_)
    ));
    wait_for("b to report that it cannot load #99", || async {
        b.handlers
            .get("h")
            .and_then(|i| i.cluster)
            .filter(|c| c.state == eventbroker_wasm::SyncState::Failed)
            .map(|_| ())
    })
    .await;
    let id = b
        .broker
        .publish(event(100))
        .await
        .expect("publish")
        .id()
        .to_owned();
    wait_for("the event to be deferred", || async {
        b.broker
            .provider()
            .get(&id)
            .await
            .ok()
            .flatten()
            .filter(|e| {
                e.handlers.iter().any(|o| {
                    o.last_error
                        .as_ref()
                        .is_some_and(|f| f.message.contains("loading release #99"))
                })
            })
    })
    .await;
    let deferred = b
        .broker
        .provider()
        .get(&id)
        .await
        .expect("get")
        .expect("event");
    assert_ne!(deferred.status, EventStatus::Completed, "{deferred:?}");
    assert_eq!(
        deferred.retry_count, 0,
        "deferrals are not attempts: {deferred:?}"
    );

    // The component arrives (say the store was out of reach): the hosts try again by
    // themselves, without a change of the record, and the deferred event runs on #99.
    store
        .put_component(&audit_version, &audit)
        .await
        .expect("put");
    wait_runs(&b, "h", 99, None).await;
    let done = finished(&b, &id).await;
    assert_eq!(done.status, EventStatus::Completed, "{done:?}");
    assert_eq!(version_of(&done).as_deref(), Some(audit_version.as_str()));

    // Rolling back makes the first release run again.
    a.handlers
        .rollback("h", Some("#1"))
        .await
        .expect("rollback");
    wait_runs(&b, "h", 1, None).await;
    let done = finished(
        &b,
        b.broker.publish(event(101)).await.expect("publish").id(),
    )
    .await;
    assert_eq!(version_of(&done).as_deref(), Some(first.as_str()));

    // Removal reaches every host; the components go with it.
    a.handlers.undeploy("h").await.expect("remove");
    wait_for("b to forget h", || async {
        b.handlers.get("h").is_none().then_some(())
    })
    .await;
    assert_eq!(
        store.component_count(),
        0,
        "components of a removed handler are deleted"
    );
    a.broker.stop().await.expect("stop");
    b.broker.stop().await.expect("stop");
}
