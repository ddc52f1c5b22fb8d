//! The database provider beyond the shared conformance suite: a broker surviving a host
//! restart, consumer groups created while publishers run, configuration errors, schema reuse.
//! PostgreSQL cases skip loudly when the server is unreachable (a failure under
//! `EVENTBROKER_REQUIRE_SERVICES=1`).

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Setup, SqlBackend};
use eventbroker::provider::{ConsumerOptions, EventFilter, ProviderError, StatusUpdate};
use eventbroker::{Broker, Event, EventSource, EventStatus, handler_fn};
use eventbroker_testkit::proxy::Proxy;
use eventbroker_testkit::{PATIENCE, unique_suffix, wait_for};

/// A broker whose handler never finishes is stopped (its deliveries are given back); a new
/// provider and broker on the same database ("the host restarted") process every event once.
async fn broker_survives_a_restart(backend: SqlBackend) {
    let mut config = backend.config.clone();
    config.shutdown_timeout = Duration::from_millis(300);
    config.lease = Duration::from_secs(120); // redelivery must not wait for the lease
    config.worker_count = 4;

    let first = Broker::new(config.broker.clone(), backend.connect().await);
    let started = Arc::new(tokio::sync::Semaphore::new(0));
    let signal = started.clone();
    first
        .subscribe(
            "restart.>",
            handler_fn(move |_, _| {
                let signal = signal.clone();
                async move {
                    signal.add_permits(1);
                    futures::future::pending::<()>().await;
                    Ok(())
                }
            }),
        )
        .expect("subscribe");
    first.start().await.expect("start");
    let mut ids = Vec::new();
    for n in 0..20 {
        let event = Event::new(EventSource::System, format!("restart.n{}", n % 3), "host-1");
        ids.push(first.publish_async(event).await.expect("publish"));
    }
    let _ = tokio::time::timeout(PATIENCE, started.acquire())
        .await
        .expect("a handler started");
    first.stop().await.expect("stop");

    let observer = backend.connect().await;
    for id in &ids {
        let event = observer.get(id).await.expect("get").expect("durable");
        assert!(
            !event.status.is_finished(),
            "{id} cannot have finished: {:?}",
            event.status
        );
    }

    let second = Broker::new(config.broker, backend.connect().await);
    let handled = Arc::new(Mutex::new(BTreeMap::<String, u32>::new()));
    let seen = handled.clone();
    second
        .subscribe(
            "restart.>",
            handler_fn(move |_, event: Event| {
                let seen = seen.clone();
                async move {
                    *seen.lock().expect("lock").entry(event.id).or_default() += 1;
                    Ok(())
                }
            }),
        )
        .expect("subscribe");
    second.start().await.expect("start");
    for id in &ids {
        wait_for(&format!("event {id} to complete after the restart"), || {
            let observer = observer.clone();
            let id = id.clone();
            async move {
                let event = observer.get(&id).await.expect("get")?;
                (event.status == EventStatus::Completed).then_some(())
            }
        })
        .await;
    }
    second.stop().await.expect("stop");
    let handled = handled.lock().expect("lock").clone();
    assert_eq!(
        handled.len(),
        ids.len(),
        "every event handled after the restart"
    );
    assert!(
        handled.values().all(|&n| n == 1),
        "each handled once: {handled:?}"
    );
    observer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_on_sqlite_survives_a_host_restart() {
    if let Some(backend) = common::sqlite().await {
        broker_survives_a_restart(backend).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_on_postgres_survives_a_host_restart() {
    if let Some(backend) = common::postgres().await {
        broker_survives_a_restart(backend).await;
    }
}

/// A consumer group that first consumes while publishers run receives every unfinished event:
/// those published before it existed (backfilled) and those published meanwhile (each publish
/// writes a delivery per group), with none lost in between.
async fn a_group_created_while_publishing_misses_nothing(backend: SqlBackend) {
    const PUBLISHERS: usize = 4;
    const PER_PUBLISHER: usize = 100;
    let provider = backend.connect().await;
    let options = |group: &str| ConsumerOptions {
        group: group.to_owned(),
        name: format!("{group}-{}", unique_suffix()),
        lease: Duration::from_secs(120),
    };
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let provider = provider.clone();
        publishers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for n in 0..PER_PUBLISHER {
                let event = Event::new(EventSource::System, format!("late.p{p}.n{n}"), "h");
                provider.publish(&event).await.expect("publish");
                ids.push(event.id);
            }
            ids
        }));
    }
    // Join while the publishers are running.
    wait_for("some events to be published", || {
        let provider = provider.clone();
        async move {
            let stats = provider.stats().await.expect("stats");
            (stats.published >= 20).then_some(())
        }
    })
    .await;
    let late = provider.consume(options("late")).await.expect("consume");
    let mut published = std::collections::BTreeSet::new();
    for publisher in publishers {
        published.extend(publisher.await.expect("publisher"));
    }
    let mut received = std::collections::BTreeSet::new();
    tokio::time::timeout(PATIENCE, async {
        while received.len() < published.len() {
            for delivery in late.fetch(64).await.expect("fetch") {
                assert!(
                    received.insert(delivery.event.id.clone()),
                    "delivered twice"
                );
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the late group received {} of {} events",
            received.len(),
            published.len()
        )
    });
    assert_eq!(received, published);
    late.close().await;
    provider.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_group_created_while_publishing_misses_nothing() {
    if let Some(backend) = common::sqlite().await {
        a_group_created_while_publishing_misses_nothing(backend).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_group_created_while_publishing_misses_nothing() {
    if let Some(backend) = common::postgres().await {
        a_group_created_while_publishing_misses_nothing(backend).await;
    }
}

#[tokio::test]
async fn bad_urls_and_table_names_are_configuration_errors() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = Setup {
        broker: eventbroker_testkit::backends::base_config(),
        database: eventbroker_sql::SqlConfig::default(),
    };
    config.database.url = format!("sqlite://{}", dir.path().join("x.db").display());
    for bad in ["events; DROP TABLE x", "1events", "", "ev\"ents"] {
        config.database.table_name = bad.to_owned();
        match common::open(&config).await {
            Err(ProviderError::Config { reason, .. }) => {
                assert!(reason.contains("table_name"), "{reason}")
            }
            Err(other) => panic!("{bad:?}: {other}"),
            Ok(_) => panic!("{bad:?} was accepted"),
        }
    }
    config.database.table_name = "events".into();
    for bad in ["mysql://localhost/x", "sqlite::memory:", "sqlite://"] {
        config.database.url = bad.to_owned();
        assert!(
            matches!(
                common::open(&config).await,
                Err(ProviderError::Config { .. })
            ),
            "{bad} was accepted"
        );
    }
}

/// The SQLite file and its missing directories are created; reopening runs no migration
/// twice and keeps the data; a second table in the same file is independent.
#[tokio::test]
async fn sqlite_files_are_created_and_reopened() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("nested/deeper/events.db");
    let mut config = Setup {
        broker: eventbroker_testkit::backends::base_config(),
        database: eventbroker_sql::SqlConfig::default(),
    };
    config.database.url = format!("sqlite://{}", path.display());
    let first = common::open(&config).await.expect("open");
    assert!(path.exists(), "the database file was created");
    let event = Event::new(EventSource::System, "reopen.test", "h");
    first.publish(&event).await.expect("publish");
    first.close().await;
    let second = common::open(&config).await.expect("reopen");
    assert!(second.get(&event.id).await.expect("get").is_some());
    config.database.table_name = "other_events".into();
    let other = common::open(&config).await.expect("other table");
    assert!(other.get(&event.id).await.expect("get").is_none());
    let update = StatusUpdate::processing(&event);
    assert!(matches!(
        other.update_status(&event.id, &update).await,
        Err(ProviderError::NotFound(_))
    ));
    other.close().await;
    second.close().await;
}

/// Concurrent publishes are committed in batches; a duplicate id among them fails alone.
async fn a_duplicate_in_a_batch_fails_alone(backend: SqlBackend) {
    let provider = backend.connect().await;
    let original = Event::new(EventSource::System, "batch.original", "h");
    let mut tasks = Vec::new();
    for n in 0..64 {
        let provider = provider.clone();
        let event = if n % 16 == 5 {
            let mut copy = Event::new(EventSource::System, "batch.copy", "h");
            copy.id = original.id.clone();
            copy
        } else {
            Event::new(EventSource::System, "batch.unique", "h")
        };
        tasks.push(tokio::spawn(async move {
            let result = provider.publish(&event).await;
            (event, result)
        }));
    }
    let mut duplicates = match provider.publish(&original).await {
        Ok(()) => 0,
        Err(ProviderError::Duplicate(_)) => 1,
        Err(other) => panic!("unexpected error: {other}"),
    };
    for task in tasks {
        let (event, result) = task.await.expect("task");
        match result {
            Ok(()) => {
                let stored = provider.get(&event.id).await.expect("get").expect("stored");
                assert_eq!(stored.event_type, event.event_type);
            }
            Err(ProviderError::Duplicate(id)) => {
                assert_eq!(id, original.id);
                duplicates += 1;
            }
            Err(other) => panic!("unexpected error: {other}"),
        }
    }
    // Five publishes share one id: exactly one of them won.
    assert_eq!(
        duplicates, 4,
        "all but one of the clashing publishes failed"
    );
    provider.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_duplicate_in_a_batch_fails_alone() {
    if let Some(backend) = common::sqlite().await {
        a_duplicate_in_a_batch_fails_alone(backend).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_duplicate_in_a_batch_fails_alone() {
    if let Some(backend) = common::postgres().await {
        a_duplicate_in_a_batch_fails_alone(backend).await;
    }
}

/// A consumer that dies holding a lease (no close, no drop): the rescuer puts the event back
/// to `pending` once the lease expired, and another consumer gets it.
async fn expired_leases_are_rescued(backend: SqlBackend) {
    let provider = backend.connect().await;
    let event = Event::new(EventSource::System, "rescue.test", "h");
    provider.publish(&event).await.expect("publish");
    let options = |lease| ConsumerOptions {
        group: "g".into(),
        name: format!("c-{}", unique_suffix()),
        lease,
    };
    let dying = provider
        .consume(options(Duration::from_millis(300)))
        .await
        .expect("consume");
    let delivery = dying.fetch(1).await.expect("fetch").remove(0);
    provider
        .update_status(&event.id, &StatusUpdate::processing(&delivery.event))
        .await
        .expect("processing");
    // The process "dies": nothing runs the consumer's close or drop.
    std::mem::forget(dying);
    wait_for("the rescuer to return the event to pending", || {
        let provider = provider.clone();
        let id = event.id.clone();
        async move {
            let status = provider.get(&id).await.expect("get")?.status;
            (status == EventStatus::Pending).then_some(())
        }
    })
    .await;
    let survivor = provider
        .consume(options(Duration::from_secs(60)))
        .await
        .expect("consume");
    let again = tokio::time::timeout(PATIENCE, survivor.fetch(1))
        .await
        .expect("redelivered")
        .expect("fetch")
        .remove(0);
    assert_eq!(again.event.id, event.id);
    assert_eq!(again.delivery_count, 2);
    survivor.close().await;
    provider.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_expired_leases_are_rescued() {
    if let Some(backend) = common::sqlite().await {
        expired_leases_are_rescued(backend).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_expired_leases_are_rescued() {
    if let Some(backend) = common::postgres().await {
        expired_leases_are_rescued(backend).await;
    }
}

/// Type patterns become SQL exactly: `_` is not a wildcard, `*` does not cross a dot, case
/// matters (SQLite's LIKE would ignore it).
async fn type_patterns_are_exact_in_sql(backend: SqlBackend) {
    let provider = backend.connect().await;
    let instance = format!("patterns-{}", unique_suffix());
    let types = [
        "my_app.users.create",
        "myXapp.users.create",
        "my_app.users.profile.create",
        "My_app.users.create",
        "my_app.users",
    ];
    for event_type in types {
        provider
            .publish(&Event::new(
                EventSource::System,
                event_type,
                instance.clone(),
            ))
            .await
            .expect("publish");
    }
    let listed = |pattern: &str| {
        let provider = provider.clone();
        let filter = eventbroker::EventFilter {
            instance_id: Some(instance.clone()),
            type_pattern: Some(pattern.parse().expect("pattern")),
            order: eventbroker::provider::SortOrder::Asc,
            ..Default::default()
        };
        async move {
            let mut types: Vec<String> = provider
                .list(&filter)
                .await
                .expect("list")
                .into_iter()
                .map(|e| e.event_type)
                .collect();
            types.sort();
            types
        }
    };
    assert_eq!(listed("my_app.*.create").await, ["my_app.users.create"]);
    // Pagination happens in SQL: newest first, one per page. Had SQL matched more than the
    // pattern (`_` as a wildcard, case-insensitively), the first page would hold a later,
    // non-matching event and come back empty after the final check.
    let newest_first = eventbroker::EventFilter {
        instance_id: Some(instance.clone()),
        type_pattern: Some("my_app.*.create".parse().expect("pattern")),
        limit: Some(1),
        ..Default::default()
    };
    let page = provider.list(&newest_first).await.expect("list");
    assert_eq!(page.len(), 1, "the first page holds the one match");
    assert_eq!(page[0].event_type, "my_app.users.create");
    assert_eq!(
        listed("my_app.>").await,
        [
            "my_app.users",
            "my_app.users.create",
            "my_app.users.profile.create"
        ]
    );
    assert_eq!(listed("*.users.create").await.len(), 3);
    assert_eq!(listed("my_app.users").await, ["my_app.users"]);
    assert_eq!(listed("*").await.len(), types.len());
    provider.close().await;
}

#[tokio::test]
async fn sqlite_type_patterns_are_exact_in_sql() {
    if let Some(backend) = common::sqlite().await {
        type_patterns_are_exact_in_sql(backend).await;
    }
}

#[tokio::test]
async fn postgres_type_patterns_are_exact_in_sql() {
    if let Some(backend) = common::postgres().await {
        type_patterns_are_exact_in_sql(backend).await;
    }
}

/// `url` rewritten to reach its server through a local proxy port, without TLS (so the proxy
/// can see the protocol), and the server's `host:port` (the proxy's target).
fn through_proxy(url: &str, port: u16) -> (String, String) {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (user, server) = match authority.rsplit_once('@') {
        Some((user, server)) => (format!("{user}@"), server),
        None => (String::new(), authority),
    };
    let target = if server.contains(':') {
        server.to_owned()
    } else {
        format!("{server}:5432")
    };
    let separator = if path.contains('?') { '&' } else { '?' };
    (
        format!("{scheme}://{user}127.0.0.1:{port}/{path}{separator}sslmode=disable"),
        target,
    )
}

/// A PostgreSQL backend whose provider connects through a [`Proxy`].
async fn postgres_behind_a_proxy() -> Option<(SqlBackend, Setup, Proxy)> {
    let backend = common::postgres().await?;
    let (_, target) = through_proxy(&backend.config.database.url, 0);
    let proxy = Proxy::start(target).await;
    let mut config = backend.config.clone();
    config.database.url = through_proxy(&backend.config.database.url, proxy.port).0;
    Some((backend, config, proxy))
}

/// PostgreSQL commits a batch of publishes but its answer to `COMMIT` is lost with the
/// connection, so the provider cannot know whether they were applied. The replay finds the
/// very same events stored and reports each publish as done (not as a duplicate, not as a
/// failure), and each event is stored once. A different event under a taken id is still a
/// duplicate, as is publishing the same event again when no commit answer was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_publish_whose_commit_answer_was_lost_is_not_a_duplicate() {
    let Some((backend, config, proxy)) = postgres_behind_a_proxy().await else {
        return;
    };
    let provider = common::open(&config).await.expect("provider");
    let events: Vec<Event> = (0..8)
        .map(|n| {
            Event::new(EventSource::System, "lost.commit", "h")
                .with_payload(serde_json::json!({"n": n}))
        })
        .collect();
    // PostgreSQL's completion of COMMIT (CommandComplete, tag `COMMIT`).
    proxy.lose_reply_containing(b"COMMIT\0");
    let results = futures::future::join_all(events.iter().map(|e| provider.publish(e))).await;
    assert!(!proxy.armed(), "an answer to COMMIT was lost");
    for (event, result) in events.iter().zip(results) {
        result.unwrap_or_else(|error| {
            panic!(
                "publish of {} (applied before its commit answer was lost) failed: {error}",
                event.id
            )
        });
    }
    let observer = backend.connect().await;
    let listed = observer
        .list(&EventFilter {
            type_pattern: Some(eventbroker::pattern::Pattern::new("lost.commit").expect("pattern")),
            ..EventFilter::default()
        })
        .await
        .expect("list");
    let mut stored: Vec<&str> = listed.iter().map(|e| e.id.as_str()).collect();
    let mut published: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
    stored.sort_unstable();
    published.sort_unstable();
    assert_eq!(stored, published, "each stored once");

    let event = &events[0];
    let mut impostor = event.clone();
    impostor.payload = serde_json::json!({"n": 2});
    for (what, again) in [("a different event", &impostor), ("the same event", event)] {
        match provider.publish(again).await {
            Err(ProviderError::Duplicate(id)) => assert_eq!(id, event.id),
            other => panic!("{what} under a taken id must be a duplicate, got {other:?}"),
        }
    }
    provider.close().await;
    observer.close().await;
}

/// Latencies of one phase of the outage test.
#[derive(Default)]
struct Phase {
    accepted: Vec<Duration>,
    refused: Vec<(Duration, String)>,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

impl Phase {
    fn report(&self, name: &str) {
        let mut all: Vec<Duration> = self
            .accepted
            .iter()
            .copied()
            .chain(self.refused.iter().map(|(d, _)| *d))
            .collect();
        all.sort();
        eprintln!(
            "{name:>8}: {:>5} accepted, {:>5} refused; latency p50 {:>9.1?} p99 {:>9.1?} max {:>9.1?}",
            self.accepted.len(),
            self.refused.len(),
            percentile(&all, 0.5),
            percentile(&all, 0.99),
            all.last().copied().unwrap_or_default(),
        );
    }
}

/// PostgreSQL becomes unreachable for 30 s (its port closed, as when the server is stopped)
/// while four publishers and a broker run. Publishes during the outage fail with an error
/// that says the database is unreachable (most at once, through the open circuit) instead of
/// waiting for connection timeouts; after it, publishing works again; every accepted event
/// is completed and nothing is left pending or processing. Prints the publish latencies of
/// each phase and how many events ran more than once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_outage_fails_writes_fast_and_loses_nothing() {
    const OUTAGE: Duration = Duration::from_secs(30);
    const PUBLISHERS: usize = 4;
    let Some((backend, mut config, proxy)) = postgres_behind_a_proxy().await else {
        return;
    };
    config.lease = Duration::from_secs(5);
    config.worker_count = 8;
    let broker = Broker::new(
        config.broker.clone(),
        common::open(&config).await.expect("provider"),
    );
    let runs = Arc::new(Mutex::new(BTreeMap::<String, u32>::new()));
    let counter = runs.clone();
    broker
        .subscribe(
            "outage.>",
            handler_fn(move |_, event: Event| {
                let counter = counter.clone();
                async move {
                    *counter.lock().expect("lock").entry(event.id).or_default() += 1;
                    Ok(())
                }
            }),
        )
        .expect("subscribe");
    broker.start().await.expect("start");

    // 0: before, 1: during the outage, 2: after, 3: stop.
    let phase = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let (broker, phase) = (broker.clone(), phase.clone());
        publishers.push(tokio::spawn(async move {
            let mut phases: [Phase; 3] = Default::default();
            let mut accepted = Vec::new();
            let mut n = 0;
            loop {
                let now = phase.load(std::sync::atomic::Ordering::Acquire);
                if now > 2 {
                    break;
                }
                n += 1;
                let event = Event::new(EventSource::System, format!("outage.p{p}.n{n}"), "h");
                let started = tokio::time::Instant::now();
                let result = tokio::time::timeout(PATIENCE, broker.publish_async(event)).await;
                let took = started.elapsed();
                // Attributed to the phase it started in (an outage publish may end after it).
                match result {
                    Ok(Ok(id)) => {
                        phases[now].accepted.push(took);
                        accepted.push(id);
                    }
                    Ok(Err(error)) => phases[now].refused.push((took, error.to_string())),
                    Err(_) => panic!("a publish hung for {PATIENCE:?} (phase {now})"),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (phases, accepted)
        }));
    }
    let advance = |to: usize| phase.store(to, std::sync::atomic::Ordering::Release);
    wait_for("events to be accepted before the outage", || {
        let broker = broker.clone();
        async move { (broker.stats().await.ok()?.published >= 100).then_some(()) }
    })
    .await;
    proxy.stop().await;
    advance(1);
    tokio::time::sleep(OUTAGE).await;
    proxy.restore().await;
    advance(2);
    let resumed = broker.stats().await.expect("stats").published;
    wait_for("publishing to work again after the outage", || {
        let broker = broker.clone();
        async move { (broker.stats().await.ok()?.published >= resumed + 200).then_some(()) }
    })
    .await;
    advance(3);

    let mut phases: [Phase; 3] = Default::default();
    let mut accepted = Vec::new();
    for publisher in publishers {
        let (done, ids) = publisher.await.expect("publisher");
        for (total, part) in phases.iter_mut().zip(done) {
            total.accepted.extend(part.accepted);
            total.refused.extend(part.refused);
        }
        accepted.extend(ids);
    }
    eprintln!("publish latency around a {OUTAGE:?} PostgreSQL outage ({PUBLISHERS} publishers):");
    for (phase, name) in phases.iter().zip(["before", "during", "after"]) {
        phase.report(name);
    }

    // During the outage every publish was refused with a clear error, most of them through the
    // open circuit (without waiting on the database).
    let during = &phases[1];
    assert!(
        !during.refused.is_empty(),
        "publishes were attempted during the outage"
    );
    for (_, error) in &during.refused {
        assert!(
            error.contains("unreachable") || error.contains("write_timeout"),
            "an outage error says what is wrong: {error}"
        );
    }
    let fast = during
        .refused
        .iter()
        .filter(|(_, e)| e.contains("fail at once"))
        .count();
    eprintln!(
        "  during the outage {fast} of {} refusals came from the open circuit",
        during.refused.len()
    );
    assert!(fast > 0, "the circuit opened during the outage");

    // Nothing accepted is lost; nothing stored is left unfinished.
    let observer = backend.connect().await;
    for id in &accepted {
        wait_for(&format!("accepted event {id} to complete"), || {
            let (observer, id) = (observer.clone(), id.clone());
            async move {
                let event = observer.get(&id).await.ok()??;
                (event.status == EventStatus::Completed).then_some(())
            }
        })
        .await;
    }
    wait_for("no stored event to be left pending or processing", || {
        let observer = observer.clone();
        async move {
            let stats = observer.stats().await.ok()?;
            let open = stats.by_status.get("pending").copied().unwrap_or(0)
                + stats.by_status.get("processing").copied().unwrap_or(0);
            (open == 0).then_some(())
        }
    })
    .await;
    broker.stop().await.expect("stop");
    let runs = runs.lock().expect("lock").clone();
    for id in &accepted {
        assert!(runs.get(id).is_some_and(|&n| n >= 1), "{id} was handled");
    }
    let repeated = runs.values().filter(|&&n| n > 1).count();
    eprintln!(
        "  {} events accepted, all completed; {repeated} ran more than once (their outcome \
         could not be recorded during the outage)",
        accepted.len()
    );
    observer.close().await;
}

/// A write that cannot get the SQLite write lock (another process holds it) fails with an
/// error naming `write_timeout` once that deadline passes, instead of waiting for the lock
/// (up to the busy timeout, for every write of the batch in turn); once the lock is free,
/// writes succeed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_blocked_past_write_timeout_fails_with_a_clear_error() {
    use sqlx::Connection;
    let Some(backend) = common::sqlite().await else {
        return;
    };
    let mut config = backend.config.clone();
    config.database.write_timeout = Duration::from_millis(300);
    let provider = common::open(&config).await.expect("provider");
    let mut holder = sqlx::SqliteConnection::connect(&config.database.url)
        .await
        .expect("second connection");
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut holder)
        .await
        .expect("take the write lock");
    let publishes = (0..4).map(|n| {
        let provider = provider.clone();
        async move {
            let event = Event::new(EventSource::System, format!("blocked.n{n}"), "h");
            tokio::time::timeout(PATIENCE, provider.publish(&event)).await
        }
    });
    for result in futures::future::join_all(publishes).await {
        let error = result
            .expect("a blocked write ends at its deadline")
            .expect_err("the write lock is held elsewhere");
        assert!(error.to_string().contains("write_timeout"), "{error}");
    }
    sqlx::query("ROLLBACK")
        .execute(&mut holder)
        .await
        .expect("release the lock");
    let event = Event::new(EventSource::System, "blocked.after", "h");
    wait_for("writes to succeed once the lock is free", || {
        let (provider, event) = (provider.clone(), event.clone());
        async move {
            match provider.publish(&event).await {
                Ok(()) | Err(ProviderError::Duplicate(_)) => Some(()),
                Err(_) => None,
            }
        }
    })
    .await;
    provider.close().await;
}
