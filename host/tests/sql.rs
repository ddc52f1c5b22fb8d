//! The database provider beyond the shared conformance suite: a broker surviving a host
//! restart, consumer groups created while publishers run, configuration errors, schema reuse.
//! PostgreSQL cases skip loudly when the server is unreachable (a failure under
//! `EVENTBROKER_REQUIRE_SERVICES=1`).

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventbroker::config::ProviderKind;
use eventbroker::provider::{self, ConsumerOptions, ProviderError, StatusUpdate};
use eventbroker::{Broker, Event, EventSource, EventStatus, handler_fn};
use support::backends::{self, Backend};
use support::{PATIENCE, unique_suffix, wait_for};

/// A broker whose handler never finishes is stopped (its deliveries are given back); a new
/// provider and broker on the same database ("the host restarted") process every event once.
async fn broker_survives_a_restart(backend: Backend) {
    let mut config = backend.config.clone();
    config.shutdown_timeout = Duration::from_millis(300);
    config.lease = Duration::from_secs(120); // redelivery must not wait for the lease
    config.worker_count = 4;

    let first = Broker::new(config.clone(), backend.connect().await);
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

    let second = Broker::new(config, backend.connect().await);
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
    if let Some(backend) = backends::sqlite().await {
        broker_survives_a_restart(backend).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_on_postgres_survives_a_host_restart() {
    if let Some(backend) = backends::postgres().await {
        broker_survives_a_restart(backend).await;
    }
}

/// A consumer group that first consumes while publishers run receives every unfinished event:
/// those published before it existed (backfilled) and those published meanwhile (each publish
/// writes a delivery per group), with none lost in between.
async fn a_group_created_while_publishing_misses_nothing(backend: Backend) {
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
    if let Some(backend) = backends::sqlite().await {
        a_group_created_while_publishing_misses_nothing(backend).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_group_created_while_publishing_misses_nothing() {
    if let Some(backend) = backends::postgres().await {
        a_group_created_while_publishing_misses_nothing(backend).await;
    }
}

#[tokio::test]
async fn bad_urls_and_table_names_are_configuration_errors() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = backends::base_config(ProviderKind::Database);
    config.database.url = format!("sqlite://{}", dir.path().join("x.db").display());
    for bad in ["events; DROP TABLE x", "1events", "", "ev\"ents"] {
        config.database.table_name = bad.to_owned();
        match provider::from_config(&config).await {
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
                provider::from_config(&config).await,
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
    let mut config = backends::base_config(ProviderKind::Database);
    config.database.url = format!("sqlite://{}", path.display());
    let first = provider::from_config(&config).await.expect("open");
    assert!(path.exists(), "the database file was created");
    let event = Event::new(EventSource::System, "reopen.test", "h");
    first.publish(&event).await.expect("publish");
    first.close().await;
    let second = provider::from_config(&config).await.expect("reopen");
    assert!(second.get(&event.id).await.expect("get").is_some());
    config.database.table_name = "other_events".into();
    let other = provider::from_config(&config).await.expect("other table");
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
async fn a_duplicate_in_a_batch_fails_alone(backend: Backend) {
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
    if let Some(backend) = backends::sqlite().await {
        a_duplicate_in_a_batch_fails_alone(backend).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_duplicate_in_a_batch_fails_alone() {
    if let Some(backend) = backends::postgres().await {
        a_duplicate_in_a_batch_fails_alone(backend).await;
    }
}

#[test]
fn the_example_configs_name_the_database_provider() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    for (file, scheme) in [
        ("config-sqlite.yaml", "sqlite://"),
        ("config-postgres.yaml", "postgres://"),
    ] {
        let text = std::fs::read_to_string(root.join(file)).expect("example");
        let config = eventbroker::Config::from_text(eventbroker::config::FileFormat::Yaml, &text)
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(
            config.event_broker.provider,
            ProviderKind::Database,
            "{file}"
        );
        assert!(
            config.event_broker.database.url.starts_with(scheme),
            "{file}: {}",
            config.event_broker.database.url
        );
    }
}

/// A consumer that dies holding a lease (no close, no drop): the rescuer puts the event back
/// to `pending` once the lease expired, and another consumer gets it.
async fn expired_leases_are_rescued(backend: Backend) {
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
    if let Some(backend) = backends::sqlite().await {
        expired_leases_are_rescued(backend).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_expired_leases_are_rescued() {
    if let Some(backend) = backends::postgres().await {
        expired_leases_are_rescued(backend).await;
    }
}

/// Type patterns become SQL exactly: `_` is not a wildcard, `*` does not cross a dot, case
/// matters (SQLite's LIKE would ignore it).
async fn type_patterns_are_exact_in_sql(backend: Backend) {
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
    if let Some(backend) = backends::sqlite().await {
        type_patterns_are_exact_in_sql(backend).await;
    }
}

#[tokio::test]
async fn postgres_type_patterns_are_exact_in_sql() {
    if let Some(backend) = backends::postgres().await {
        type_patterns_are_exact_in_sql(backend).await;
    }
}
