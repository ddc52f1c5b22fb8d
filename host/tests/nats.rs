//! NATS-specific provider behaviour (the shared conformance suite covers the common contract):
//! subjects, duplicates through the server's window, watchers across provider instances,
//! dead letters through `max_deliver`, and a server restart mid-load.
//!
//! Each test uses its own stream, subject prefix and key-value bucket and deletes them at the
//! end. Tests needing the shared server skip (or fail under `EVENTBROKER_REQUIRE_SERVICES=1`)
//! when it is unreachable.

#[path = "../../tests/src/services.rs"]
mod services;

use std::collections::HashSet;
use std::time::Duration;

use eventbroker::config::{BrokerConfig, NatsStorage, ProviderKind};
use eventbroker::provider::{
    ConsumerOptions, EventFilter, NatsProvider, Provider, ProviderError, StatusUpdate,
};
use eventbroker::{Event, EventSource, EventStatus};
use futures::StreamExt;

const PATIENCE: Duration = Duration::from_secs(60);
const NATS: &str = "127.0.0.1:4222";

fn config(url: &str) -> BrokerConfig {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let mut config = BrokerConfig {
        provider: ProviderKind::Nats,
        instance_id: "nats-test".into(),
        // The group the tests consume in: `get`, `list` and stats show its state.
        consumer_group: "workers".into(),
        ..BrokerConfig::default()
    };
    config.nats.url = url.into();
    config.nats.stream_name = format!("T{id}");
    config.nats.subjects = vec![format!("t{id}.>")];
    config.nats.storage = NatsStorage::File;
    config
}

async fn provider(config: &BrokerConfig) -> NatsProvider {
    NatsProvider::connect(config)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to NATS: {e}"))
}

fn event(event_type: &str) -> Event {
    Event::new(EventSource::Database, event_type, "nats-test")
}

fn options(group: &str, lease: Duration) -> ConsumerOptions {
    ConsumerOptions {
        group: group.into(),
        name: format!("member-{}", uuid::Uuid::new_v4().simple()),
        lease,
    }
}

fn finished(status: EventStatus) -> StatusUpdate {
    StatusUpdate {
        status,
        error: (status == EventStatus::Failed).then(|| "boom".into()),
        retry_count: 0,
        handlers: Vec::new(),
        processed_at: Some(chrono::Utc::now()),
        completed_at: Some(chrono::Utc::now()),
    }
}

#[tokio::test]
async fn publish_awaits_the_server_and_reports_duplicates() {
    if !services::available("NATS", NATS) {
        return;
    }
    let config = config("nats://127.0.0.1:4222");
    let provider = provider(&config).await;
    let first = event("public.users.create");
    provider.publish(&first).await.unwrap();
    let again = provider.publish(&first).await.unwrap_err();
    assert!(
        matches!(again, ProviderError::Duplicate(ref id) if *id == first.id),
        "{again}"
    );
    let stored = provider.get(&first.id).await.unwrap().unwrap();
    assert_eq!(stored, first);

    // Types that would not make a literal subject are refused before anything is written.
    for bad in ["a b", "a.*", "a.>", "a..b"] {
        let mut odd = event("x");
        odd.event_type = bad.into();
        let error = provider.publish(&odd).await.unwrap_err();
        assert!(
            error.to_string().contains("cannot be a NATS subject"),
            "{bad:?}: {error}"
        );
        assert!(provider.get(&odd.id).await.unwrap().is_none());
    }
    provider.destroy().await.unwrap();
}

#[tokio::test]
async fn deliveries_carry_the_current_state_and_outcomes_are_recorded() {
    if !services::available("NATS", NATS) {
        return;
    }
    let config = config("nats://127.0.0.1:4222");
    let provider = provider(&config).await;
    let consumer = provider
        .consume(options("workers", Duration::from_secs(30)))
        .await
        .unwrap();
    let mut published = Vec::new();
    for n in 0..20 {
        let mut e = event("public.orders.create");
        e.payload = serde_json::json!({ "n": n });
        provider.publish(&e).await.unwrap();
        published.push(e);
    }
    let mut seen = Vec::new();
    while seen.len() < published.len() {
        let batch = tokio::time::timeout(PATIENCE, consumer.fetch(8))
            .await
            .expect("deliveries within the patience")
            .unwrap();
        seen.extend(batch);
    }
    // One consumer sees publish order.
    let ids: Vec<_> = seen.iter().map(|d| d.event.id.clone()).collect();
    let expected: Vec<_> = published.iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids, expected);
    for (delivery, original) in seen.iter().zip(&published) {
        assert_eq!(&delivery.event, original);
        assert_eq!(delivery.delivery_count, 1);
    }
    // Retry: redelivered with the recorded state.
    let retried = &seen[0];
    let mut update = StatusUpdate::processing(&retried.event);
    update.status = EventStatus::Pending;
    update.retry_count = 1;
    update.error = Some("try again".into());
    consumer
        .retry(retried, &update, Duration::from_millis(10))
        .await
        .unwrap();
    for delivery in &seen[1..] {
        consumer
            .complete(delivery, &finished(EventStatus::Completed))
            .await
            .unwrap();
    }
    let again = tokio::time::timeout(PATIENCE, consumer.fetch(8))
        .await
        .expect("the retried event comes back")
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].event.id, retried.event.id);
    assert_eq!(again[0].event.retry_count, 1);
    assert_eq!(again[0].event.error.as_deref(), Some("try again"));
    assert_eq!(again[0].delivery_count, 2);
    consumer
        .complete(&again[0], &finished(EventStatus::Failed))
        .await
        .unwrap();

    let failed = provider
        .list(&EventFilter::status(EventStatus::Failed))
        .await
        .unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].id, retried.event.id);
    let completed = provider
        .list(&EventFilter::status(EventStatus::Completed))
        .await
        .unwrap();
    assert_eq!(completed.len(), 19);

    // Re-run of the dead letter: delivered again although its first message was terminated.
    let mut rerun = finished(EventStatus::Pending);
    rerun.completed_at = None;
    rerun.error = None;
    provider.requeue(&retried.event.id, &rerun).await.unwrap();
    let second_rerun = provider
        .requeue(&retried.event.id, &rerun)
        .await
        .unwrap_err();
    assert!(
        matches!(second_rerun, ProviderError::InvalidState { .. }),
        "{second_rerun}"
    );
    let rerun_delivery = tokio::time::timeout(PATIENCE, consumer.fetch(8))
        .await
        .expect("the re-run arrives")
        .unwrap();
    assert_eq!(rerun_delivery.len(), 1);
    assert_eq!(rerun_delivery[0].event.id, retried.event.id);
    assert_eq!(rerun_delivery[0].event.status, EventStatus::Pending);
    consumer
        .complete(&rerun_delivery[0], &finished(EventStatus::Completed))
        .await
        .unwrap();
    let stats = provider.stats().await.unwrap();
    assert_eq!(stats.by_status["completed"], 20);
    consumer.close().await;
    provider.destroy().await.unwrap();
}

#[tokio::test]
async fn an_unacknowledged_delivery_goes_to_another_member_after_ack_wait() {
    if !services::available("NATS", NATS) {
        return;
    }
    let config = config("nats://127.0.0.1:4222");
    let host_a = provider(&config).await;
    let host_b = provider(&config).await;
    let lease = Duration::from_secs(1);
    let crashed = host_a.consume(options("workers", lease)).await.unwrap();
    let e = event("public.users.update");
    host_a.publish(&e).await.unwrap();
    let taken = tokio::time::timeout(PATIENCE, crashed.fetch(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(taken[0].event.id, e.id);
    // Host A "crashes": its connection goes away without acknowledging.
    std::mem::forget(crashed);
    drop(host_a);
    let survivor = host_b.consume(options("workers", lease)).await.unwrap();
    let redelivered = tokio::time::timeout(PATIENCE, survivor.fetch(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(redelivered[0].event.id, e.id);
    assert_eq!(redelivered[0].delivery_count, 2);
    survivor
        .complete(&redelivered[0], &finished(EventStatus::Completed))
        .await
        .unwrap();
    survivor.close().await;
    host_b.destroy().await.unwrap();
}

#[tokio::test]
async fn watchers_on_any_host_see_publishes_and_status_changes() {
    if !services::available("NATS", NATS) {
        return;
    }
    let config = config("nats://127.0.0.1:4222");
    let publisher = provider(&config).await;
    let watcher_host = provider(&config).await;
    let mut watcher = watcher_host
        .stream(&"public.*.create".parse().unwrap())
        .await
        .unwrap();
    let other = event("public.users.delete");
    let matching = event("public.users.create");
    publisher.publish(&other).await.unwrap();
    publisher.publish(&matching).await.unwrap();
    publisher
        .update_status(&other.id, &finished(EventStatus::Completed))
        .await
        .unwrap();
    publisher
        .update_status(&matching.id, &finished(EventStatus::Completed))
        .await
        .unwrap();
    let first = tokio::time::timeout(PATIENCE, watcher.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first, matching);
    let second = tokio::time::timeout(PATIENCE, watcher.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(second.id, matching.id);
    assert_eq!(second.status, EventStatus::Completed);
    watcher_host.close().await;
    assert!(
        tokio::time::timeout(PATIENCE, watcher.next())
            .await
            .unwrap()
            .is_none(),
        "close ends watchers"
    );
    publisher.destroy().await.unwrap();
}

#[tokio::test]
async fn events_exceeding_max_deliver_become_dead_letters() {
    if !services::available("NATS", NATS) {
        return;
    }
    let mut config = config("nats://127.0.0.1:4222");
    config.nats.max_deliver = Some(2);
    let provider = provider(&config).await;
    let consumer = provider
        .consume(options("workers", Duration::from_secs(30)))
        .await
        .unwrap();
    let e = event("public.poison.create");
    provider.publish(&e).await.unwrap();
    for _ in 0..2 {
        let delivery = tokio::time::timeout(PATIENCE, consumer.fetch(1))
            .await
            .unwrap()
            .unwrap();
        consumer.release(&delivery[0]).await.unwrap();
    }
    // The server notices the exhausted budget when it next has a pull request to serve.
    let waiting = {
        let consumer = consumer.clone();
        tokio::spawn(async move { consumer.fetch(1).await })
    };
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let failed = provider
            .list(&EventFilter::status(EventStatus::Failed))
            .await
            .unwrap();
        if let Some(dead) = failed.first() {
            assert_eq!(dead.id, e.id);
            assert!(dead.error.as_deref().unwrap_or("").contains("max_deliver"));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    consumer.close().await;
    let after_close = tokio::time::timeout(PATIENCE, waiting)
        .await
        .unwrap()
        .unwrap();
    assert!(
        after_close.unwrap().is_empty(),
        "nothing delivered after the limit"
    );
    provider.destroy().await.unwrap();
}

#[tokio::test]
async fn list_filters_and_paginates_over_every_stored_event() {
    if !services::available("NATS", NATS) {
        return;
    }
    let config = config("nats://127.0.0.1:4222");
    let provider = provider(&config).await;
    let mut ids = HashSet::new();
    for n in 0..1500 {
        let mut e = event(if n % 3 == 0 { "a.b.c" } else { "x.y" });
        e.user_id = Some(n % 7);
        e.created_at = chrono::Utc::now() + chrono::Duration::milliseconds(n);
        provider.store(&e).await.unwrap();
        ids.insert(e.id);
    }
    let all = provider
        .list(&EventFilter {
            limit: Some(1000),
            ..EventFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 1000);
    let rest = provider
        .list(&EventFilter {
            limit: Some(1000),
            offset: 1000,
            ..EventFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(rest.len(), 500);
    let listed: HashSet<_> = all.iter().chain(&rest).map(|e| e.id.clone()).collect();
    assert_eq!(listed, ids);
    let typed = provider
        .list(&EventFilter {
            type_pattern: Some("a.>".parse().unwrap()),
            user_id: Some(3),
            limit: Some(1000),
            ..EventFilter::default()
        })
        .await
        .unwrap();
    let expected = (0..1500).filter(|n| n % 3 == 0 && n % 7 == 3).count();
    assert_eq!(typed.len(), expected);
    assert!(provider.delete(&typed[0].id).await.unwrap());
    assert!(!provider.delete(&typed[0].id).await.unwrap());
    assert!(provider.get(&typed[0].id).await.unwrap().is_none());
    provider.destroy().await.unwrap();
}

/// A `nats-server` of this test's own (JetStream, file store in a temp dir, a free port), so
/// that it can be killed and restarted without disturbing anyone else.
struct OwnServer {
    child: Option<std::process::Child>,
    port: u16,
    dir: tempfile::TempDir,
}

const NATS_SERVER: &str = "/usr/sbin/nats-server";

impl OwnServer {
    fn start() -> Option<OwnServer> {
        if !std::path::Path::new(NATS_SERVER).exists() {
            assert!(
                !services::services_required(),
                "{NATS_SERVER} is missing (EVENTBROKER_REQUIRE_SERVICES is set)"
            );
            eprintln!("SKIPPED: {NATS_SERVER} is missing; the restart test needs it");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut server = OwnServer {
            child: None,
            port,
            dir: tempfile::tempdir().expect("temp dir"),
        };
        server.spawn();
        Some(server)
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let child = std::process::Command::new(NATS_SERVER)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let address = format!("127.0.0.1:{}", self.port);
        let deadline = std::time::Instant::now() + PATIENCE;
        while std::net::TcpStream::connect(&address).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "own nats-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no chance to flush or say goodbye.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The server is killed with SIGKILL mid-load and restarted on the same store: every event
/// whose publish succeeded (publishers retry failed ones, as clients do) is completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_restart_mid_load_loses_nothing() {
    let Some(mut server) = OwnServer::start() else {
        return;
    };
    let mut config = config(&server.url());
    config.lease = Duration::from_secs(2);
    let provider = std::sync::Arc::new(provider(&config).await);
    let consumer = provider
        .consume(options("workers", Duration::from_secs(2)))
        .await
        .unwrap();
    let completed = std::sync::Arc::new(std::sync::Mutex::new(HashSet::<String>::new()));
    let worker = {
        let consumer = consumer.clone();
        let completed = completed.clone();
        tokio::spawn(async move {
            loop {
                let batch = match consumer.fetch(16).await {
                    Ok(batch) if batch.is_empty() => return,
                    Ok(batch) => batch,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                for delivery in batch {
                    if consumer
                        .complete(&delivery, &finished(EventStatus::Completed))
                        .await
                        .is_ok()
                    {
                        completed.lock().unwrap().insert(delivery.event.id.clone());
                    }
                }
            }
        })
    };
    const EVENTS: usize = 600;
    let killed = std::sync::Arc::new(tokio::sync::Notify::new());
    let failures = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let published = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let publisher = {
        let provider = provider.clone();
        let killed = killed.clone();
        let failures = failures.clone();
        let published = published.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for n in 0..EVENTS {
                if n == EVENTS / 2 {
                    // The second half is published while the server is down and restarting.
                    killed.notified().await;
                }
                let e = event(&format!("restart.n{}", n % 5));
                // Retry until the server took it, as a client would.
                loop {
                    match provider.publish(&e).await {
                        Ok(()) | Err(ProviderError::Duplicate(_)) => break,
                        Err(_) => {
                            failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
                published.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                ids.push(e.id);
            }
            ids
        })
    };
    // Mid-load: half published, some of it completed, some still queued.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while completed.lock().unwrap().len() < 50
        || published.load(std::sync::atomic::Ordering::Relaxed) < EVENTS / 2
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no progress before the restart"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.kill();
    killed.notify_one();
    // Restart once publishing has run into the outage.
    while failures.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "publishing never noticed the outage"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.spawn();
    let ids = tokio::time::timeout(PATIENCE, publisher)
        .await
        .expect("publishing resumes after the restart")
        .unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE * 2;
    for id in &ids {
        loop {
            let status = provider.get(id).await.ok().flatten().map(|e| e.status);
            if status == Some(EventStatus::Completed) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "event {id} not completed after the restart: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    consumer.close().await;
    worker.await.unwrap();
    provider.close().await;
}

/// The example config parses and names the NATS provider.
#[test]
fn example_config_loads() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/config-nats.yaml");
    let config = eventbroker::Config::load(Some(&path)).expect("example config loads");
    assert_eq!(config.event_broker.provider, ProviderKind::Nats);
    assert_eq!(config.event_broker.nats.stream_name, "RESOLVESPEC_EVENTS");
    assert_eq!(
        config.event_broker.nats.subjects,
        vec!["events.>".to_string()]
    );
}

/// A publish whose acknowledgement was lost takes its state back (a delete marker) although
/// the server stored the message; the consumer restores the state and the event is processed.
#[tokio::test]
async fn a_message_stored_despite_a_failed_publish_is_still_processed() {
    if !services::available("NATS", NATS) {
        return;
    }
    let config = config("nats://127.0.0.1:4222");
    let provider = provider(&config).await;
    let e = event("public.users.create");
    provider.publish(&e).await.unwrap();
    // What a publish does when it gives up: mark the state taken back.
    let client = async_nats::connect(NATS).await.unwrap();
    let kv = async_nats::jetstream::new(client)
        .get_key_value(config.nats.kv_bucket())
        .await
        .unwrap();
    kv.delete(&e.id).await.unwrap();
    assert!(provider.get(&e.id).await.unwrap().is_none());

    let consumer = provider
        .consume(options("workers", Duration::from_secs(30)))
        .await
        .unwrap();
    let delivery = tokio::time::timeout(PATIENCE, consumer.fetch(1))
        .await
        .expect("the stored message is delivered")
        .unwrap();
    assert_eq!(delivery[0].event, e);
    assert_eq!(provider.get(&e.id).await.unwrap().as_ref(), Some(&e));
    consumer
        .complete(&delivery[0], &finished(EventStatus::Completed))
        .await
        .unwrap();
    // A deleted event, by contrast, is skipped.
    let gone = event("public.users.create");
    provider.publish(&gone).await.unwrap();
    assert!(provider.delete(&gone.id).await.unwrap());
    let after = event("public.users.create");
    provider.publish(&after).await.unwrap();
    let next = tokio::time::timeout(PATIENCE, consumer.fetch(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next[0].event.id, after.id, "the deleted event was skipped");
    consumer
        .complete(&next[0], &finished(EventStatus::Completed))
        .await
        .unwrap();
    consumer.close().await;
    provider.destroy().await.unwrap();
}

/// Every NATS key parses, durations included; bad settings are refused at connect with a
/// message naming the key (before any connection attempt).
#[tokio::test]
async fn nats_settings_parse_and_are_checked() {
    use eventbroker::config::{Config, FileFormat};
    let text = r#"
event_broker:
  provider: nats
  nats:
    url: "nats://a:4222,nats://b:4222"
    stream_name: EV
    subjects: ["ev.>", "other.>"]
    storage: memory
    max_age: 1h
    duplicate_window: 30s
    kv_bucket: EV_KV
    user: u
    password: p
    tls: { required: true, ca_file: /etc/ca.pem }
    ack_wait: 45s
    max_deliver: 10
    backoff: [1s, 5s, 1m]
"#;
    let parsed = Config::from_text(FileFormat::Yaml, text).expect("parses");
    let nats = &parsed.event_broker.nats;
    assert_eq!(nats.storage, NatsStorage::Memory);
    assert_eq!(nats.duplicate_window, Duration::from_secs(30));
    assert_eq!(nats.kv_bucket(), "EV_KV");
    assert_eq!(nats.ack_wait, Some(Duration::from_secs(45)));
    assert_eq!(nats.max_deliver, Some(10));
    assert_eq!(nats.backoff, [1, 5, 60].map(Duration::from_secs).to_vec());
    assert!(nats.tls.required);
    assert_eq!(
        BrokerConfig::default().nats.kv_bucket(),
        "RESOLVESPEC_EVENTS_STATE"
    );

    let refused = |change: fn(&mut BrokerConfig)| async move {
        let mut settings = config("nats://127.0.0.1:1");
        change(&mut settings);
        match NatsProvider::connect(&settings).await {
            Err(ProviderError::Config { reason, .. }) => reason,
            Err(other) => panic!("expected a config error, got {other}"),
            Ok(_) => panic!("expected a config error"),
        }
    };
    assert!(
        refused(|c| c.nats.subjects = vec!["events".into()])
            .await
            .contains("prefix.>")
    );
    assert!(
        refused(|c| c.nats.stream_name = "a.b".into())
            .await
            .contains("stream_name")
    );
    assert!(
        refused(|c| c.nats.kv_bucket = Some("a b".into()))
            .await
            .contains("kv_bucket")
    );
    assert!(
        refused(|c| c.nats.user = Some("u".into()))
            .await
            .contains("password")
    );
    assert!(
        refused(|c| c.nats.max_age = Duration::from_secs(60))
            .await
            .contains("duplicate_window")
    );
    assert!(
        refused(|c| {
            c.nats.max_deliver = Some(2);
            c.nats.backoff = vec![Duration::from_secs(1); 2];
        })
        .await
        .contains("backoff")
    );
}
