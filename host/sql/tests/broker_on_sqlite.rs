//! The broker on the database provider: what only a durable backend can show.

use eventbroker_testkit::gates::{gated, wait_for_status, wait_started};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use eventbroker::{
    Broker, BrokerConfig, Event, EventSource, EventStatus, OutcomeState, handler_fn,
};
use eventbroker_sql::{SqlConfig, SqlProvider};
use eventbroker_testkit::PATIENCE;
use tokio::sync::Semaphore;

fn event(event_type: &str) -> Event {
    Event::new(EventSource::System, event_type, "")
}

/// Issue 13 A1: a host that dies while a sync event's handler runs leaves the event to the
/// lease/rescue machinery: the next host on the same SQLite file finishes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_event_of_a_crashed_host_is_finished_by_the_next_host_on_sqlite() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = BrokerConfig {
        instance_id: "test-host".into(),
        worker_count: 4,
        lease: Duration::from_secs(1),
        ..BrokerConfig::default()
    };
    let database = SqlConfig {
        url: format!("sqlite://{}", dir.path().join("events.db").display()),
        poll_interval: Duration::from_millis(50),
        rescue_interval: Duration::from_millis(100),
        ..SqlConfig::default()
    };
    let first_database = database.clone();
    let first = config.clone();
    // The first host runs on a runtime of its own, dropped mid-handler: every task of the
    // host is dropped where it stands, nothing is given back (as when the process dies).
    tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let provider = SqlProvider::connect(&first_database, &first)
                .await
                .expect("first host");
            let broker = Broker::new(first, Arc::new(provider));
            let started = Arc::new(Semaphore::new(0));
            broker
                .subscribe(
                    "slow.op",
                    gated(
                        started.clone(),
                        Arc::new(Semaphore::new(0)),
                        Arc::new(AtomicUsize::new(0)),
                    ),
                )
                .unwrap();
            broker.start().await.expect("start");
            let mut sync_event = event("slow.op");
            sync_event.id = "sync-crashed".into();
            tokio::spawn(async move { broker.publish_sync(sync_event).await });
            wait_started(&started).await;
        });
        drop(runtime);
    })
    .await
    .expect("first host ran");

    let provider = SqlProvider::connect(&database, &config)
        .await
        .expect("second host");
    let second = Broker::new(config, Arc::new(provider));
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    second
        .subscribe(
            "slow.op",
            handler_fn(move |_, _| {
                let counter = counter.clone();
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            }),
        )
        .unwrap();
    second.start().await.unwrap();
    let done = wait_for_status(&second, "sync-crashed", EventStatus::Completed).await;
    assert_eq!(done.handlers[0].state, OutcomeState::Succeeded);
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the next host ran it once");
    second.stop_within(PATIENCE).await.unwrap();
}
