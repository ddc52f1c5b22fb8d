//! NATS-specific provider behaviour (the shared conformance suite covers the common contract):
//! subjects, duplicates through the server's window, watchers across provider instances,
//! dead letters through `max_deliver`, and a server restart mid-load.
//!
//! Each test uses its own stream, subject prefix and key-value bucket and deletes them at the
//! end. Tests needing the shared server skip (or fail under `EVENTBROKER_REQUIRE_SERVICES=1`)
//! when it is unreachable.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::Setup;
use eventbroker::config::BrokerConfig;
use eventbroker::provider::{
    Consumer, ConsumerOptions, Delivery, EventFilter, Provider, ProviderError, StatusUpdate,
};
use eventbroker::{Event, EventSource, EventStatus};
use eventbroker_nats::{NatsConfig, NatsProvider, NatsStorage};
use eventbroker_testkit::services;
use futures::StreamExt;

const PATIENCE: Duration = Duration::from_secs(60);
const NATS: &str = "127.0.0.1:4222";

fn config(url: &str) -> Setup {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let broker = BrokerConfig {
        instance_id: "nats-test".into(),
        // The group the tests consume in: `get`, `list` and stats show its state.
        consumer_group: "workers".into(),
        ..BrokerConfig::default()
    };
    let mut config = Setup {
        broker,
        nats: NatsConfig::default(),
    };
    config.nats.url = url.into();
    config.nats.stream_name = format!("T{id}");
    config.nats.subjects = vec![format!("t{id}.>")];
    config.nats.storage = NatsStorage::File;
    config
}

async fn provider(config: &Setup) -> NatsProvider {
    NatsProvider::connect(&config.nats, &config.broker)
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
        assert_eq!(delivery.event, claimed(original, delivery));
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
    // A second re-run before the first was delivered (nothing holds the event) replaces it:
    // the event runs once, the first re-run's message is skipped.
    let mut rerun = finished(EventStatus::Pending);
    rerun.completed_at = None;
    rerun.error = None;
    provider.requeue(&retried.event.id, &rerun).await.unwrap();
    provider.requeue(&retried.event.id, &rerun).await.unwrap();
    let marker = event("public.orders.create");
    provider.publish(&marker).await.unwrap();
    let mut reruns = Vec::new();
    let mut marker_seen = false;
    while !marker_seen {
        let batch = tokio::time::timeout(PATIENCE, consumer.fetch(8))
            .await
            .expect("the re-run and the marker arrive")
            .unwrap();
        for delivery in batch {
            if delivery.event.id == marker.id {
                marker_seen = true;
            } else {
                reruns.push(delivery.clone());
            }
            consumer
                .complete(&delivery, &finished(EventStatus::Completed))
                .await
                .unwrap();
        }
    }
    assert_eq!(reruns.len(), 1, "{reruns:?}");
    assert_eq!(reruns[0].event.id, retried.event.id);
    assert_eq!(
        reruns[0].event.status,
        EventStatus::Processing,
        "re-run from pending, and claimed"
    );
    assert!(reruns[0].processing_recorded);
    let stats = provider.stats().await.unwrap();
    assert_eq!(stats.by_status["completed"], 21);
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
    // At most one retry, so that two deliveries are a legal budget.
    config.retry_policy.max_retries = 1;
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
        provider.publish(&e).await.unwrap();
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
            services::skip(&format!("{NATS_SERVER} is missing"));
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
    let expected = claimed(&e, &delivery[0]);
    assert_eq!(delivery[0].event, expected);
    assert_eq!(
        provider.get(&e.id).await.unwrap().as_ref(),
        Some(&expected),
        "the claim's mark is what the store shows"
    );
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

/// Bad settings are refused at connect with a message naming the key (before any connection
/// attempt). (That every key parses is a test of the service's config file.)
#[tokio::test]
async fn bad_nats_settings_are_refused_at_connect() {
    assert_eq!(
        NatsConfig::default().kv_bucket(),
        "RESOLVESPEC_EVENTS_STATE"
    );

    let refused = |change: fn(&mut Setup)| async move {
        let mut settings = config("nats://127.0.0.1:1");
        change(&mut settings);
        match NatsProvider::connect(&settings.nats, &settings.broker).await {
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
        refused(|c| c.nats.kv_bucket = Some(c.nats.handler_records_bucket()))
            .await
            .contains("handler store")
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
            c.retry_policy.max_retries = 1;
            c.nats.backoff = vec![Duration::from_secs(60); 2];
        })
        .await
        .contains("backoff")
    );
    // The server refuses backoff without max_deliver when the group is created: said at start.
    let reason = refused(|c| c.nats.backoff = vec![Duration::from_secs(60)]).await;
    assert!(
        reason.contains("nats.backoff") && reason.contains("nats.max_deliver"),
        "{reason}"
    );
}

// --- Faults: stale deliveries, cut-short writes, lost advisories (issue 13, A4 and A10) ---

/// The next delivery of `consumer`, which must come within the patience.
/// `original` as a claim hands it out: `processing` since the claim, which recorded the mark
/// (the delivered event's processing time is the claim's).
fn claimed(original: &Event, delivery: &Delivery) -> Event {
    assert!(
        delivery.processing_recorded,
        "the claim records `processing`"
    );
    assert!(delivery.event.processed_at.is_some());
    let mut expected = original.clone();
    expected.status = EventStatus::Processing;
    expected.processed_at = delivery.event.processed_at;
    expected.completed_at = None;
    expected
}

async fn fetch_one(consumer: &std::sync::Arc<dyn Consumer>) -> Delivery {
    let mut batch = tokio::time::timeout(PATIENCE, consumer.fetch(1))
        .await
        .expect("a delivery within the patience")
        .expect("fetch works");
    assert_eq!(batch.len(), 1);
    batch.remove(0)
}

/// A plain JetStream context on the shared server, for looking behind the provider's back.
async fn jetstream() -> async_nats::jetstream::Context {
    async_nats::jetstream::new(async_nats::connect(NATS).await.expect("connect"))
}

/// Messages in the test's event stream.
async fn stream_messages(js: &async_nats::jetstream::Context, config: &Setup) -> u64 {
    js.get_stream(&config.nats.stream_name)
        .await
        .expect("stream")
        .get_info()
        .await
        .expect("stream info")
        .state
        .messages
}

/// The durable consumer of `group` (a plain name: used as it is).
async fn group_consumer(
    js: &async_nats::jetstream::Context,
    config: &Setup,
    group: &str,
) -> async_nats::jetstream::consumer::PullConsumer {
    js.get_stream(&config.nats.stream_name)
        .await
        .expect("stream")
        .get_consumer(group)
        .await
        .expect("group consumer")
}

/// The update `requeue` gets from the broker for a plain re-run.
fn rerun() -> StatusUpdate {
    let mut update = finished(EventStatus::Pending);
    update.completed_at = None;
    update.error = None;
    update
}

/// Waits until event `id` has `status`, and returns it.
async fn wait_for_status(provider: &NatsProvider, id: &str, status: EventStatus) -> Event {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let current = provider.get(id).await.expect("get works");
        if let Some(event) = current.as_ref().filter(|e| e.status == status) {
            return event.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "event {id} never became {status}: {current:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `future` until `reached` says the point of interest was passed, then drops it, as
/// hyper drops the request future of a client that went away. Returns whether the future
/// finished first (then nothing was cut short).
async fn cut_short<F: Future>(future: F, mut reached: impl AsyncFnMut() -> bool) -> bool {
    let mut future = std::pin::pin!(future);
    loop {
        if reached().await {
            return false;
        }
        if futures::poll!(future.as_mut()).is_ready() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Completes every delivery of `consumer` until each of `ids` has been completed once.
async fn complete_all(consumer: &std::sync::Arc<dyn Consumer>, ids: &HashSet<String>) {
    let mut done = HashSet::new();
    while !ids.is_subset(&done) {
        let delivery = fetch_one(consumer).await;
        assert!(ids.contains(&delivery.event.id), "unexpected {delivery:?}");
        consumer
            .complete(&delivery, &finished(EventStatus::Completed))
            .await
            .unwrap();
        done.insert(delivery.event.id);
    }
}

/// Acknowledgement deadlines shorter than two lease renewal periods are refused at connect,
/// naming both keys: the server would redeliver an event while its handler still runs (a
/// `backoff` entry is the deadline of one delivery; the first replaces `ack_wait`).
#[tokio::test]
async fn ack_deadlines_shorter_than_two_lease_renewals_are_refused() {
    let mut settings = config("nats://127.0.0.1:1");
    settings.nats.backoff = vec![Duration::from_secs(1), Duration::from_secs(5)];
    match NatsProvider::connect(&settings.nats, &settings.broker).await {
        Err(ProviderError::Config { reason, .. }) => assert!(
            reason.contains("event_broker.nats.backoff") && reason.contains("event_broker.lease"),
            "{reason}"
        ),
        Err(other) => panic!("expected a config error, got {other}"),
        Ok(_) => panic!("expected a config error"),
    }
}

/// A delivery whose deadline passed and that the server handed to another member cannot
/// record an outcome: its complete, retry and release are refused, before and after the newer
/// delivery finishes, and neither the state nor the newer delivery changes.
#[tokio::test]
async fn a_stale_delivery_cannot_overwrite_or_settle_the_newer_one() {
    if !services::available("NATS", NATS) {
        return;
    }
    let config = config("nats://127.0.0.1:4222");
    let provider = provider(&config).await;
    let lease = Duration::from_secs(1);
    let stale_member = provider.consume(options("workers", lease)).await.unwrap();
    let new_member = provider.consume(options("workers", lease)).await.unwrap();
    let e = event("public.users.update");
    provider.publish(&e).await.unwrap();
    let stale = fetch_one(&stale_member).await;
    // No keep-alive: the deadline passes and the server hands the event to the other member.
    let newer = fetch_one(&new_member).await;
    assert_eq!(newer.event.id, e.id);
    assert_eq!(newer.delivery_count, 2);
    provider
        .update_status(&e.id, &StatusUpdate::processing(&newer.event))
        .await
        .unwrap();
    let running = provider.get(&e.id).await.unwrap().unwrap();

    let mut stale_outcome = finished(EventStatus::Failed);
    stale_outcome.error = Some("written by the stale delivery".into());
    let attempts = [
        stale_member.complete(&stale, &stale_outcome).await,
        stale_member
            .retry(&stale, &stale_outcome, Duration::ZERO)
            .await,
        stale_member.release(&stale).await,
    ];
    for refused in attempts {
        let error = refused.expect_err("a stale delivery is refused");
        assert!(error.to_string().contains("no longer leased"), "{error}");
    }
    assert_eq!(provider.get(&e.id).await.unwrap().unwrap(), running);
    let js = jetstream().await;
    let mut group = group_consumer(&js, &config, "workers").await;
    assert_eq!(
        group.info().await.unwrap().num_ack_pending,
        1,
        "the newer delivery is still out"
    );

    new_member
        .complete(&newer, &finished(EventStatus::Completed))
        .await
        .unwrap();
    let error = stale_member
        .complete(&stale, &stale_outcome)
        .await
        .expect_err("still refused once the newer delivery finished");
    assert!(error.to_string().contains("no longer leased"), "{error}");
    let stored = provider.get(&e.id).await.unwrap().unwrap();
    assert_eq!(stored.status, EventStatus::Completed);
    assert_eq!(stored.error, None);
    let info = group.info().await.unwrap();
    assert_eq!(info.num_ack_pending, 0);
    assert_eq!(info.num_pending, 0);
    stale_member.close().await;
    new_member.close().await;
    provider.destroy().await.unwrap();
}

/// Queues a pull request on `group` that no message fits in (`max_bytes` 1) and waits until
/// the server holds it: the next delivery the server makes finds no request able to take it.
/// nats-server before nats-io/nats-server#5305 (2.9.x among them) then rewinds the consumer
/// instead of queueing a redelivery again, and later hands the message out as if it were new
/// (delivered count 1, the next consumer sequence). Members meet this when the only queued
/// request expires (or its requester goes away) just as a redelivery falls due; this request
/// makes it happen every time. Returns the subscription its refusal arrives on.
async fn queue_a_request_nothing_fits_in(
    config: &Setup,
    group: &mut async_nats::jetstream::consumer::PullConsumer,
) -> async_nats::Subscriber {
    let client = async_nats::connect(NATS).await.expect("connect");
    let inbox = client.new_inbox();
    let replies = client.subscribe(inbox.clone()).await.unwrap();
    let request = serde_json::json!({
        "batch": 1,
        "max_bytes": 1,
        "expires": u64::try_from(PATIENCE.as_nanos()).unwrap(),
    });
    let durable = group.cached_info().name.clone();
    client
        .publish_with_reply(
            format!(
                "$JS.API.CONSUMER.MSG.NEXT.{}.{durable}",
                config.nats.stream_name
            ),
            inbox,
            request.to_string().into(),
        )
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while group.info().await.unwrap().num_waiting == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pull request was never queued"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    replies
}

/// Waits until the server refused the request of [`queue_a_request_nothing_fits_in`] a
/// delivery.
async fn refused(replies: &mut async_nats::Subscriber) {
    let refusal = tokio::time::timeout(PATIENCE, replies.next())
        .await
        .expect("the server answers the pull request")
        .expect("a reply");
    assert_eq!(
        refusal.status,
        Some(async_nats::StatusCode::REQUEST_TERMINATED),
        "{refusal:?}"
    );
}

/// A redelivery is numbered as one even when the server counts it as a first delivery (see
/// [`queue_a_request_nothing_fits_in`]).
#[tokio::test]
async fn a_redelivery_is_numbered_even_when_the_server_counts_it_as_a_first_delivery() {
    if !services::available("NATS", NATS) {
        return;
    }
    let config = config("nats://127.0.0.1:4222");
    let provider = provider(&config).await;
    let lease = Duration::from_secs(60);
    let first_member = provider.consume(options("workers", lease)).await.unwrap();
    let second_member = provider.consume(options("workers", lease)).await.unwrap();
    let e = event("public.users.update");
    provider.publish(&e).await.unwrap();
    let first = fetch_one(&first_member).await;
    assert_eq!(first.delivery_count, 1);

    let js = jetstream().await;
    let mut group = group_consumer(&js, &config, "workers").await;
    let mut replies = queue_a_request_nothing_fits_in(&config, &mut group).await;
    first_member.release(&first).await.unwrap();
    refused(&mut replies).await;

    let second = fetch_one(&second_member).await;
    assert_eq!(second.event.id, e.id);
    assert_eq!(
        second.delivery_count, 2,
        "the second delivery (acknowledgement subject {})",
        second.token
    );
    second_member
        .complete(&second, &finished(EventStatus::Completed))
        .await
        .unwrap();
    let info = group.info().await.unwrap();
    assert_eq!((info.num_ack_pending, info.num_pending), (0, 0));
    first_member.close().await;
    second_member.close().await;
    provider.destroy().await.unwrap();
}

/// A copy of a delivery that is still running is not run a second time. nats-server before
/// nats-io/nats-server#5305 (see [`queue_a_request_nothing_fits_in`]) rewinds the consumer when
/// a redelivery finds no request able to take it, and then hands the newest message out again
/// as a first delivery while its first delivery is still out (checked: the second member got
/// `…workers.1.2.3…`, delivered count 1, stream sequence 2, while the first one ran it). The
/// copy finds the event claimed by a live delivery and is given back for when that claim would
/// expire; the running delivery keeps the event, records its outcome and acknowledges, and the
/// copy, offered again later, finds the event finished.
#[tokio::test]
async fn a_copy_of_a_running_delivery_waits_for_its_claim() {
    if !services::available("NATS", NATS) {
        return;
    }
    let config = config("nats://127.0.0.1:4222");
    let provider = provider(&config).await;
    let lease = Duration::from_secs(6);
    let first_member = provider.consume(options("workers", lease)).await.unwrap();
    let second_member = provider.consume(options("workers", lease)).await.unwrap();
    let (given_back, running) = (event("public.users.update"), event("public.users.create"));
    provider.publish(&given_back).await.unwrap();
    let first = fetch_one(&first_member).await;
    assert_eq!(first.event.id, given_back.id);
    provider.publish(&running).await.unwrap();
    let newest = fetch_one(&first_member).await;
    assert_eq!(newest.event.id, running.id);

    let js = jetstream().await;
    let mut group = group_consumer(&js, &config, "workers").await;
    let mut replies = queue_a_request_nothing_fits_in(&config, &mut group).await;
    first_member.release(&first).await.unwrap();
    refused(&mut replies).await;

    // While the running delivery lives (renewed), the second member gets no copy of it.
    let mut pending_ids: HashSet<String> = [given_back.id.clone()].into();
    let until = tokio::time::Instant::now() + lease;
    while tokio::time::Instant::now() < until {
        first_member.keep_alive(&newest).await.unwrap();
        if let Ok(batch) =
            tokio::time::timeout(Duration::from_millis(500), second_member.fetch(1)).await
        {
            for delivery in batch.unwrap() {
                assert_eq!(
                    delivery.event.id, given_back.id,
                    "a copy of the running delivery was handed out ({}) while {} ran",
                    delivery.token, newest.token
                );
                second_member
                    .complete(&delivery, &finished(EventStatus::Completed))
                    .await
                    .unwrap();
                pending_ids.remove(&delivery.event.id);
            }
        }
    }
    first_member
        .complete(&newest, &finished(EventStatus::Completed))
        .await
        .expect("the running delivery still owns its event");

    // Whatever is still due (the given-back event, the copy) is settled without running the
    // finished event as anything but finished.
    while !pending_ids.is_empty() {
        let delivery = fetch_one(&second_member).await;
        if delivery.event.id == running.id {
            assert_eq!(delivery.event.status, EventStatus::Completed);
        }
        second_member
            .complete(&delivery, &finished(EventStatus::Completed))
            .await
            .unwrap();
        pending_ids.remove(&delivery.event.id);
    }
    for id in [&given_back.id, &running.id] {
        assert_eq!(
            provider.get(id).await.unwrap().unwrap().status,
            EventStatus::Completed
        );
    }
    first_member.close().await;
    second_member.close().await;
    provider.destroy().await.unwrap();
}

/// A host that wrote an event's final outcome and stopped before acknowledging it leaves the
/// event to be run again by the redelivery (at-least-once), also when the server counts that
/// redelivery as a first delivery: only a first delivery of an event the group finished is
/// skipped.
#[tokio::test]
async fn an_outcome_written_but_not_acknowledged_is_run_again_whatever_the_server_counts() {
    if !services::available("NATS", NATS) {
        return;
    }
    let config = config("nats://127.0.0.1:4222");
    let provider = provider(&config).await;
    let lease = Duration::from_secs(60);
    let first_member = provider.consume(options("workers", lease)).await.unwrap();
    let second_member = provider.consume(options("workers", lease)).await.unwrap();
    let e = event("public.users.update");
    provider.publish(&e).await.unwrap();
    let first = fetch_one(&first_member).await;
    provider
        .update_status(&e.id, &finished(EventStatus::Completed))
        .await
        .unwrap();

    let js = jetstream().await;
    let mut group = group_consumer(&js, &config, "workers").await;
    let mut replies = queue_a_request_nothing_fits_in(&config, &mut group).await;
    // The host goes away: its delivery is given back unacknowledged.
    first_member.close().await;
    refused(&mut replies).await;

    let again = fetch_one(&second_member).await;
    assert_eq!(again.event.id, e.id);
    assert_eq!(again.event.status, EventStatus::Completed);
    assert_eq!(
        again.delivery_count, 2,
        "{} then {}",
        first.token, again.token
    );
    second_member
        .complete(&again, &finished(EventStatus::Completed))
        .await
        .unwrap();
    let info = group.info().await.unwrap();
    assert_eq!((info.num_ack_pending, info.num_pending), (0, 0));
    second_member.close().await;
    provider.destroy().await.unwrap();
}

/// A member that closes while holding a delivery the server has handed to another member
/// gives back only what it still owns: a `-NAK` of the newer delivery would make the server
/// deliver the event a third time while it runs.
#[tokio::test]
async fn closing_gives_back_only_deliveries_still_owned() {
    if !services::available("NATS", NATS) {
        return;
    }
    let config = config("nats://127.0.0.1:4222");
    let provider = provider(&config).await;
    let lease = Duration::from_secs(5);
    let stale_member = provider.consume(options("workers", lease)).await.unwrap();
    let new_member = provider.consume(options("workers", lease)).await.unwrap();
    let e = event("public.users.update");
    provider.publish(&e).await.unwrap();
    let stale = fetch_one(&stale_member).await;
    let newer = fetch_one(&new_member).await;
    assert_eq!(
        newer.delivery_count, 2,
        "the newer delivery (the stale one's acknowledgement subject {}, the newer's {})",
        stale.token, newer.token
    );
    new_member.keep_alive(&newer).await.unwrap();
    stale_member.close().await;
    // Nothing is up for delivery: the newer delivery is in progress.
    let js = jetstream().await;
    let group = group_consumer(&js, &config, "workers").await;
    let available: Vec<_> = group
        .fetch()
        .max_messages(1)
        .messages()
        .await
        .unwrap()
        .collect()
        .await;
    assert!(
        available.iter().all(Result::is_err),
        "the newer delivery was given back: {available:?}"
    );
    new_member
        .complete(&newer, &finished(EventStatus::Completed))
        .await
        .unwrap();
    new_member.close().await;
    provider.destroy().await.unwrap();
}

/// A publish cut short between its two writes (a client that went away, a host that died)
/// leaves no state without a message: the event it stored is delivered and processed, also
/// when only its message was stored.
#[tokio::test]
async fn a_publish_cut_short_leaves_nothing_stuck() {
    if !services::available("NATS", NATS) {
        return;
    }
    let config = config("nats://127.0.0.1:4222");
    let provider = provider(&config).await;
    let js = jetstream().await;
    let kv = js.get_key_value(config.nats.kv_bucket()).await.unwrap();
    let cut = event("public.users.create");
    let finished_first = cut_short(provider.publish(&cut), async || {
        kv.entry(cut.id.as_str()).await.unwrap().is_some()
            || stream_messages(&js, &config).await > 0
    })
    .await;
    assert!(
        !finished_first,
        "the publish was cut short after its first write"
    );

    // A host that died after storing a message, before writing its state.
    let orphan = event("public.users.create");
    let prefix = config.nats.subjects[0].trim_end_matches(".>");
    let subject = format!("{prefix}.database.{}", orphan.event_type);
    let message = async_nats::jetstream::message::PublishMessage::build()
        .payload(serde_json::to_vec(&orphan).unwrap().into())
        .message_id(&orphan.id);
    js.send_publish(subject, message)
        .await
        .unwrap()
        .await
        .unwrap();

    let consumer = provider
        .consume(options("workers", Duration::from_secs(30)))
        .await
        .unwrap();
    let ids: HashSet<String> = [cut.id.clone(), orphan.id.clone()].into();
    complete_all(&consumer, &ids).await;
    let all = provider.list(&EventFilter::default()).await.unwrap();
    assert_eq!(all.len(), 2, "{all:?}");
    for stored in all {
        assert!(ids.contains(&stored.id));
        assert_eq!(stored.status, EventStatus::Completed, "{stored:?}");
    }
    consumer.close().await;
    provider.destroy().await.unwrap();
}

/// A re-run cut short between its two writes still happens: the event is delivered again and
/// processed, not left `pending` without a message.
#[tokio::test]
async fn a_rerun_cut_short_still_runs() {
    if !services::available("NATS", NATS) {
        return;
    }
    let config = config("nats://127.0.0.1:4222");
    let provider = provider(&config).await;
    let consumer = provider
        .consume(options("workers", Duration::from_secs(30)))
        .await
        .unwrap();
    let e = event("public.users.create");
    provider.publish(&e).await.unwrap();
    let first = fetch_one(&consumer).await;
    consumer
        .complete(&first, &finished(EventStatus::Failed))
        .await
        .unwrap();
    let js = jetstream().await;
    let before = stream_messages(&js, &config).await;
    let finished_first = cut_short(provider.requeue(&e.id, &rerun()), async || {
        let status = provider.get(&e.id).await.unwrap().map(|e| e.status);
        status != Some(EventStatus::Failed) || stream_messages(&js, &config).await > before
    })
    .await;
    assert!(
        !finished_first,
        "the re-run was cut short after its first write"
    );
    let again = fetch_one(&consumer).await;
    assert_eq!(again.event.id, e.id);
    assert_eq!(
        again.event.status,
        EventStatus::Processing,
        "re-run from pending, and claimed"
    );
    consumer
        .complete(&again, &finished(EventStatus::Completed))
        .await
        .unwrap();
    wait_for_status(&provider, &e.id, EventStatus::Completed).await;
    consumer.close().await;
    provider.destroy().await.unwrap();
}

/// A re-run in one group cut short between its two writes is switched over by that group's
/// consumer only: the other group skips the re-run's message, and its state (completed) and its
/// run stay as they were.
#[tokio::test]
async fn a_rerun_cut_short_in_one_group_leaves_the_other_alone() {
    if !services::available("NATS", NATS) {
        return;
    }
    let config = config("nats://127.0.0.1:4222");
    let provider = provider(&config).await;
    let mut other_config = config.clone();
    other_config.consumer_group = "others".into();
    let other_host = self::provider(&other_config).await;
    let lease = Duration::from_secs(30);
    let workers = provider.consume(options("workers", lease)).await.unwrap();
    let others = other_host.consume(options("others", lease)).await.unwrap();
    let e = event("public.users.create");
    provider.publish(&e).await.unwrap();
    let in_workers = fetch_one(&workers).await;
    workers
        .complete(&in_workers, &finished(EventStatus::Failed))
        .await
        .unwrap();
    let in_others = fetch_one(&others).await;
    others
        .complete(&in_others, &finished(EventStatus::Completed))
        .await
        .unwrap();

    let others_before = other_host.get(&e.id).await.unwrap().unwrap();
    let js = jetstream().await;
    let before = stream_messages(&js, &config).await;
    let finished_first = cut_short(provider.requeue(&e.id, &rerun()), async || {
        let status = provider.get(&e.id).await.unwrap().map(|e| e.status);
        status != Some(EventStatus::Failed) || stream_messages(&js, &config).await > before
    })
    .await;
    assert!(
        !finished_first,
        "the re-run was cut short after its first write"
    );
    // A marker published after the re-run: the other group reaches it without a copy of the
    // event.
    let marker = event("public.users.create");
    provider.publish(&marker).await.unwrap();
    let next_in_others = fetch_one(&others).await;
    assert_eq!(next_in_others.event.id, marker.id, "{next_in_others:?}");
    others
        .complete(&next_in_others, &finished(EventStatus::Completed))
        .await
        .unwrap();
    let again = fetch_one(&workers).await;
    assert_eq!(again.event.id, e.id);
    assert_eq!(
        again.event.status,
        EventStatus::Processing,
        "re-run from pending, and claimed"
    );
    assert_eq!(again.event.error, None, "the workers' re-run state");
    workers
        .complete(&again, &finished(EventStatus::Completed))
        .await
        .unwrap();
    wait_for_status(&provider, &e.id, EventStatus::Completed).await;
    assert_eq!(
        other_host.get(&e.id).await.unwrap().unwrap(),
        others_before,
        "the other group's state is left alone"
    );
    // The other group's run is still the publish: requeueing there re-runs it there only.
    other_host.requeue(&e.id, &rerun()).await.unwrap();
    let rerun_in_others = fetch_one(&others).await;
    assert_eq!(rerun_in_others.event.id, e.id);
    assert_eq!(
        provider.get(&e.id).await.unwrap().unwrap().status,
        EventStatus::Completed,
        "the workers' state is left alone"
    );
    others
        .complete(&rerun_in_others, &finished(EventStatus::Completed))
        .await
        .unwrap();
    workers.close().await;
    others.close().await;
    other_host.close().await;
    provider.destroy().await.unwrap();
}

/// A delivery whose holder keeps renewing it (`keep_alive`, as a running worker does) is not
/// taken by `requeue`, however long it runs; once the renewals stop for a whole lease, the
/// re-run is accepted, the old holder can no longer renew or record an outcome, and the event
/// is delivered once more.
#[tokio::test]
async fn a_delivery_kept_alive_is_not_taken_by_requeue() {
    if !services::available("NATS", NATS) {
        return;
    }
    let config = config("nats://127.0.0.1:4222");
    let provider = provider(&config).await;
    let lease = Duration::from_secs(3);
    let holder = provider.consume(options("workers", lease)).await.unwrap();
    let e = event("public.users.create");
    provider.publish(&e).await.unwrap();
    let held = fetch_one(&holder).await;
    provider
        .update_status(&e.id, &StatusUpdate::processing(&held.event))
        .await
        .unwrap();
    // Renew for more than two leases, the way a worker renews (every lease/3 and more often).
    let until = tokio::time::Instant::now() + lease * 2 + Duration::from_secs(1);
    while tokio::time::Instant::now() < until {
        holder.keep_alive(&held).await.unwrap();
        let refused = provider.requeue(&e.id, &rerun()).await.unwrap_err();
        assert!(
            matches!(refused, ProviderError::InvalidState { .. }),
            "{refused}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The holder goes silent: once its claim expires, the re-run is accepted.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while let Err(error) = provider.requeue(&e.id, &rerun()).await {
        assert!(
            matches!(error, ProviderError::InvalidState { .. }),
            "{error}"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "never re-runnable: {error}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for refused in [
        holder.keep_alive(&held).await,
        holder.complete(&held, &finished(EventStatus::Failed)).await,
    ] {
        let error = refused.expect_err("the old holder lost the event");
        assert!(error.to_string().contains("no longer leased"), "{error}");
    }
    let survivor = provider
        .consume(options("workers", Duration::from_secs(30)))
        .await
        .unwrap();
    let marker = event("public.users.create");
    provider.publish(&marker).await.unwrap();
    let mut copies = 0;
    loop {
        let delivery = fetch_one(&survivor).await;
        survivor
            .complete(&delivery, &finished(EventStatus::Completed))
            .await
            .unwrap();
        if delivery.event.id == marker.id {
            break;
        }
        assert_eq!(delivery.event.id, e.id);
        copies += 1;
    }
    assert_eq!(
        copies, 1,
        "the re-run runs once; the old message is skipped"
    );
    assert_eq!(
        provider.get(&e.id).await.unwrap().unwrap().status,
        EventStatus::Completed
    );
    drop(holder);
    survivor.close().await;
    provider.destroy().await.unwrap();
}

/// The server gives up on an event (`max_deliver`) while no host is connected: its advisory
/// waits on the server, and the next host to connect records the event as failed, after which
/// it can be re-run.
#[tokio::test]
async fn a_max_deliver_advisory_sent_while_no_host_listens_is_recorded_later() {
    if !services::available("NATS", NATS) {
        return;
    }
    let mut config = config("nats://127.0.0.1:4222");
    config.nats.max_deliver = Some(2);
    // At most one retry, so that two deliveries are a legal budget.
    config.retry_policy.max_retries = 1;
    let first_host = provider(&config).await;
    let member = first_host
        .consume(options("workers", Duration::from_secs(30)))
        .await
        .unwrap();
    let e = event("public.poison.create");
    first_host.publish(&e).await.unwrap();
    for _ in 0..2 {
        let delivery = fetch_one(&member).await;
        member.release(&delivery).await.unwrap();
    }
    member.close().await;
    first_host.close().await;
    drop(member);
    drop(first_host);

    // With no host connected, a bare client pulls: the server notices the exhausted budget,
    // delivers nothing and publishes the advisory, which the client sees go by.
    let client = async_nats::connect(NATS).await.unwrap();
    let mut advisories = client
        .subscribe(format!(
            "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.*",
            config.nats.stream_name
        ))
        .await
        .unwrap();
    client.flush().await.unwrap();
    let js = async_nats::jetstream::new(client);
    let group = group_consumer(&js, &config, "workers").await;
    let pulled: Vec<_> = group
        .fetch()
        .max_messages(1)
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .unwrap()
        .collect()
        .await;
    assert!(pulled.iter().all(Result::is_err), "{pulled:?}");
    tokio::time::timeout(PATIENCE, advisories.next())
        .await
        .expect("the server gave up on the event")
        .expect("an advisory");

    let second_host = provider(&config).await;
    let dead = wait_for_status(&second_host, &e.id, EventStatus::Failed).await;
    assert!(
        dead.error.as_deref().unwrap_or("").contains("max_deliver"),
        "{dead:?}"
    );
    second_host.requeue(&e.id, &rerun()).await.unwrap();
    let member = second_host
        .consume(options("workers", Duration::from_secs(30)))
        .await
        .unwrap();
    let again = fetch_one(&member).await;
    assert_eq!(again.event.id, e.id);
    member
        .complete(&again, &finished(EventStatus::Completed))
        .await
        .unwrap();
    wait_for_status(&second_host, &e.id, EventStatus::Completed).await;
    member.close().await;
    second_host.destroy().await.unwrap();
}

/// An event whose message every group has settled while its state never reached a final
/// status (the outcome was lost) is provably abandoned: `requeue` accepts it and it runs again.
/// One whose delivery is still in flight is refused.
#[tokio::test]
async fn requeue_accepts_an_event_whose_delivery_is_provably_abandoned() {
    if !services::available("NATS", NATS) {
        return;
    }
    let config = config("nats://127.0.0.1:4222");
    let provider = provider(&config).await;
    let member = provider
        .consume(options("workers", Duration::from_secs(30)))
        .await
        .unwrap();
    let e = event("public.users.create");
    provider.publish(&e).await.unwrap();
    let delivery = fetch_one(&member).await;
    provider
        .update_status(&e.id, &StatusUpdate::processing(&delivery.event))
        .await
        .unwrap();
    let in_flight = provider.requeue(&e.id, &rerun()).await.unwrap_err();
    assert!(
        matches!(in_flight, ProviderError::InvalidState { .. }),
        "{in_flight}"
    );

    // The message is acknowledged, but the outcome never written.
    let acker = async_nats::jetstream::message::Acker::new(
        jetstream().await,
        Some(async_nats::Subject::from(delivery.token.clone())),
    );
    acker.double_ack().await.unwrap();
    provider.requeue(&e.id, &rerun()).await.unwrap();
    let again = fetch_one(&member).await;
    assert_eq!(again.event.id, e.id);
    assert_eq!(
        again.event.status,
        EventStatus::Processing,
        "re-run from pending, and claimed"
    );
    member
        .complete(&again, &finished(EventStatus::Completed))
        .await
        .unwrap();
    wait_for_status(&provider, &e.id, EventStatus::Completed).await;
    member.close().await;
    provider.destroy().await.unwrap();
}

/// A `processing` mark arriving after the event's delivery recorded its final outcome (a
/// worker that lost its delivery) cannot reopen the event.
#[tokio::test]
async fn a_late_processing_mark_cannot_reopen_a_finished_event() {
    if !services::available("NATS", NATS) {
        return;
    }
    let config = config("nats://127.0.0.1:4222");
    let provider = provider(&config).await;
    let member = provider
        .consume(options("workers", Duration::from_secs(30)))
        .await
        .unwrap();
    let e = event("public.users.create");
    provider.publish(&e).await.unwrap();
    let delivery = fetch_one(&member).await;
    member
        .complete(&delivery, &finished(EventStatus::Completed))
        .await
        .unwrap();
    let late = provider
        .update_status(&e.id, &StatusUpdate::processing(&delivery.event))
        .await
        .unwrap_err();
    assert!(matches!(late, ProviderError::InvalidState { .. }), "{late}");
    assert_eq!(
        provider.get(&e.id).await.unwrap().unwrap().status,
        EventStatus::Completed
    );

    member.close().await;
    provider.destroy().await.unwrap();
}

/// The sweep finds events whose delivery is provably abandoned and records them as failed
/// with an error saying so, leaving events in flight and finished events alone; the failed
/// event can be re-run.
#[tokio::test]
async fn the_sweep_records_abandoned_events_as_failed() {
    if !services::available("NATS", NATS) {
        return;
    }
    let config = config("nats://127.0.0.1:4222");
    let provider = provider(&config).await;
    let member = provider
        .consume(options("workers", Duration::from_secs(30)))
        .await
        .unwrap();
    let (lost, done, in_flight) = (
        event("public.a.create"),
        event("public.b.create"),
        event("public.c.create"),
    );
    for e in [&lost, &done, &in_flight] {
        provider.publish(e).await.unwrap();
    }
    let lost_delivery = fetch_one(&member).await;
    let done_delivery = fetch_one(&member).await;
    let held = fetch_one(&member).await;
    assert_eq!(
        [&lost_delivery, &done_delivery, &held].map(|d| d.event.id.clone()),
        [&lost, &done, &in_flight].map(|e| e.id.clone())
    );
    provider
        .update_status(&lost.id, &StatusUpdate::processing(&lost_delivery.event))
        .await
        .unwrap();
    member
        .complete(&done_delivery, &finished(EventStatus::Completed))
        .await
        .unwrap();
    // Nothing is provably abandoned while a message is in flight in the group.
    assert_eq!(provider.sweep_abandoned().await.unwrap(), 0);
    async_nats::jetstream::message::Acker::new(
        jetstream().await,
        Some(async_nats::Subject::from(lost_delivery.token.clone())),
    )
    .double_ack()
    .await
    .unwrap();
    member
        .complete(&held, &finished(EventStatus::Completed))
        .await
        .unwrap();

    // (Each host also sweeps once a minute: this one may have been first.)
    assert!(provider.sweep_abandoned().await.unwrap() <= 1);
    let swept = provider.get(&lost.id).await.unwrap().unwrap();
    assert_eq!(swept.status, EventStatus::Failed);
    assert!(
        swept.error.as_deref().unwrap_or("").contains("abandoned"),
        "{swept:?}"
    );
    for (id, status) in [
        (&done.id, EventStatus::Completed),
        (&in_flight.id, EventStatus::Completed),
    ] {
        assert_eq!(provider.get(id).await.unwrap().unwrap().status, status);
    }
    assert_eq!(provider.sweep_abandoned().await.unwrap(), 0, "once");
    provider.requeue(&lost.id, &rerun()).await.unwrap();
    let again = fetch_one(&member).await;
    assert_eq!(again.event.id, lost.id);
    member
        .complete(&again, &finished(EventStatus::Completed))
        .await
        .unwrap();
    member.close().await;
    provider.destroy().await.unwrap();
}

/// With deadlines that fit the lease (`backoff: [1s, 5s]`, `lease: 1500ms`: renewals every
/// 500 ms), a handler running three times longer than the first deadline runs once: its
/// in-progress acknowledgements keep the server from redelivering it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_outliving_the_first_backoff_runs_once() {
    if !services::available("NATS", NATS) {
        return;
    }
    let mut config = config("nats://127.0.0.1:4222");
    config.lease = Duration::from_millis(1500);
    config.nats.backoff = vec![Duration::from_secs(1), Duration::from_secs(5)];
    config.nats.max_deliver = Some(5);
    config.handler_timeout = Duration::from_secs(30);
    let provider = std::sync::Arc::new(provider(&config).await);
    let broker = eventbroker::Broker::new(config.broker.clone(), provider.clone());
    let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = runs.clone();
    broker
        .subscribe(
            "slow.*",
            eventbroker::handler_fn(move |_, _| {
                let counter = counter.clone();
                async move {
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    Ok(())
                }
            }),
        )
        .unwrap();
    broker.start().await.unwrap();
    let id = broker.publish_async(event("slow.job")).await.unwrap();
    let done = wait_for_status(&provider, &id, EventStatus::Completed).await;
    assert_eq!(done.handlers.len(), 1);
    broker.stop().await.unwrap();
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
    let info = group_consumer(&jetstream().await, &config, &config.consumer_group)
        .await
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(info.num_redelivered, 0, "{info:?}");
    provider.destroy().await.unwrap();
}
