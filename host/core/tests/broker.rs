//! Broker behaviour through the public API, over the memory provider (and SQLite and the HTTP
//! server where a case needs a durable provider or a real client).

use eventbroker_testkit::gates::{gated, wait_for_status, wait_started};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventbroker::{
    Broker, BrokerConfig, BrokerError, Event, EventSource, EventStatus, Failure, FailureKind,
    MemoryProvider, OutcomeState, ProcessingMode, RetryPolicy, SubscribeOptions, handler_fn,
};
use serde_json::json;
use tokio::sync::Semaphore;

/// Generous bound for conditions that should hold within milliseconds.
const PATIENCE: Duration = Duration::from_secs(30);

fn config() -> BrokerConfig {
    BrokerConfig {
        instance_id: "test-host".into(),
        worker_count: 4,
        retry_policy: RetryPolicy {
            max_retries: 3,
            initial_delay: Duration::from_millis(5),
            max_delay: Duration::from_millis(20),
            backoff_factor: 2.0,
            jitter: true,
        },
        ..BrokerConfig::default()
    }
}

fn broker_with(config: BrokerConfig) -> Broker {
    let provider = Arc::new(MemoryProvider::new(&config));
    Broker::new(config, provider)
}

fn event(event_type: &str) -> Event {
    Event::new(EventSource::System, event_type, "")
}

/// Polls `check` until it returns true; panics after [`PATIENCE`].
async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn sync_publish_runs_handlers_and_returns_the_outcome() {
    let broker = broker_with(config());
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    broker
        .subscribe(
            "public.users.create",
            handler_fn(move |ctx, event| {
                let counter = counter.clone();
                async move {
                    assert_eq!(ctx.attempt(), 1);
                    assert_eq!(event.payload["name"], "ada");
                    counter.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            }),
        )
        .expect("subscribe");
    broker.start().await.expect("start");
    let done = broker
        .publish_sync(event("public.users.create").with_payload(json!({"name": "ada"})))
        .await
        .expect("publish");
    assert_eq!(
        seen.load(Ordering::SeqCst),
        1,
        "handler ran before publish_sync returned"
    );
    assert_eq!(done.status, EventStatus::Completed);
    assert!(done.processed_at.is_some() && done.completed_at.is_some());
    assert_eq!(done.instance_id, "test-host");
    let stored = broker.provider().get(&done.id).await.unwrap().unwrap();
    assert_eq!(stored.status, EventStatus::Completed);
    broker.stop().await.expect("stop");
}

#[tokio::test]
async fn async_publish_queues_and_workers_complete() {
    let broker = broker_with(config());
    broker
        .subscribe("orders.*", handler_fn(|_, _| async { Ok(()) }))
        .unwrap();
    broker.start().await.unwrap();
    let id = broker.publish_async(event("orders.placed")).await.unwrap();
    let done = wait_for_status(&broker, &id, EventStatus::Completed).await;
    assert!(done.processed_at.is_some() && done.completed_at.is_some());
    assert_eq!(done.handlers.len(), 1);
    assert_eq!(done.handlers[0].state, OutcomeState::Succeeded);
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn publish_follows_the_configured_mode() {
    for mode in [ProcessingMode::Sync, ProcessingMode::Async] {
        let broker = broker_with(BrokerConfig { mode, ..config() });
        broker.start().await.unwrap();
        let published = broker.publish(event("a.b")).await.unwrap();
        match (mode, &published) {
            (ProcessingMode::Sync, eventbroker::Published::Processed(event)) => {
                assert_eq!(event.status, EventStatus::Completed)
            }
            (ProcessingMode::Async, eventbroker::Published::Queued(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
        wait_for_status(&broker, published.id(), EventStatus::Completed).await;
        broker.stop().await.unwrap();
    }
}

#[tokio::test]
async fn all_matching_handlers_run_concurrently() {
    let broker = broker_with(config());
    // Each handler waits for the other: they only finish if they run at the same time.
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    for name in ["first", "second"] {
        let barrier = barrier.clone();
        broker
            .subscribe_with(
                &["a.>"],
                Arc::new(handler_fn(move |_, _| {
                    let barrier = barrier.clone();
                    async move {
                        barrier.wait().await;
                        Ok(())
                    }
                })),
                SubscribeOptions {
                    name: Some(name.into()),
                    ..Default::default()
                },
            )
            .unwrap();
    }
    broker
        .subscribe(
            "other.*",
            handler_fn(|_, _| async { Err(Failure::fail("wrong route")) }),
        )
        .unwrap();
    broker.start().await.unwrap();
    let done = broker.publish_sync(event("a.b.c")).await.unwrap();
    assert_eq!(done.status, EventStatus::Completed);
    let names: Vec<_> = done.handlers.iter().map(|o| o.handler.as_str()).collect();
    assert_eq!(names, ["first", "second"]);
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn unsubscribe_stops_delivery() {
    let broker = broker_with(config());
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let id = broker
        .subscribe(
            "a.b",
            handler_fn(move |_, _| {
                let counter = counter.clone();
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            }),
        )
        .unwrap();
    broker.start().await.unwrap();
    broker.publish_sync(event("a.b")).await.unwrap();
    broker.unsubscribe(id).unwrap();
    let done = broker.publish_sync(event("a.b")).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(done.handlers.is_empty());
    assert!(matches!(
        broker.unsubscribe(id),
        Err(BrokerError::UnknownSubscription(_))
    ));
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn transient_failures_are_retried_and_counted() {
    let broker = broker_with(config());
    let attempts = Arc::new(AtomicU32::new(0));
    let counter = attempts.clone();
    broker
        .subscribe(
            "flaky.op",
            handler_fn(move |ctx, _| {
                let counter = counter.clone();
                async move {
                    let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                    assert_eq!(ctx.attempt(), n, "context reports the attempt");
                    if n < 3 {
                        Err(Failure::retry(format!("try {n} failed")))
                    } else {
                        Ok(())
                    }
                }
            }),
        )
        .unwrap();
    broker.start().await.unwrap();
    let id = broker.publish_async(event("flaky.op")).await.unwrap();
    let done = wait_for_status(&broker, &id, EventStatus::Completed).await;
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    assert_eq!(done.retry_count, 2);
    assert_eq!(done.handlers[0].attempts, 3);
    let stats = broker.stats().await.unwrap();
    assert_eq!(stats.retried, 2);
    assert_eq!(stats.completed, 1);
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn retries_stop_at_max_retries_and_dead_letter() {
    let broker = broker_with(config());
    let attempts = Arc::new(AtomicU32::new(0));
    let counter = attempts.clone();
    broker
        .subscribe(
            "always.down",
            handler_fn(move |_, _| {
                let counter = counter.clone();
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    Err(Failure::retry("backend down"))
                }
            }),
        )
        .unwrap();
    broker.start().await.unwrap();
    let id = broker.publish_async(event("always.down")).await.unwrap();
    let failed = wait_for_status(&broker, &id, EventStatus::Failed).await;
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        4,
        "1 attempt + max_retries 3"
    );
    assert_eq!(failed.retry_count, 3);
    assert!(failed.error.as_deref().unwrap().contains("backend down"));
    let dead = broker
        .provider()
        .list(&eventbroker::EventFilter::status(EventStatus::Failed))
        .await
        .unwrap();
    assert_eq!(dead.len(), 1, "dead letters are listable");
    let stats = broker.stats().await.unwrap();
    assert_eq!(stats.dead_lettered, 1);
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn zero_max_retries_means_no_retry() {
    let mut config = config();
    config.retry_policy.max_retries = 0;
    let broker = broker_with(config);
    let attempts = Arc::new(AtomicU32::new(0));
    let counter = attempts.clone();
    broker
        .subscribe(
            "x.y",
            handler_fn(move |_, _| {
                let counter = counter.clone();
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    Err(Failure::retry("nope"))
                }
            }),
        )
        .unwrap();
    broker.start().await.unwrap();
    let done = broker.publish_sync(event("x.y")).await.unwrap();
    assert_eq!(done.status, EventStatus::Failed);
    assert_eq!(attempts.load(Ordering::SeqCst), 1);
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn permanent_failure_is_not_retried_and_retries_rerun_only_failed_handlers() {
    let broker = broker_with(config());
    let good_calls = Arc::new(AtomicU32::new(0));
    let bad_calls = Arc::new(AtomicU32::new(0));
    let flaky_calls = Arc::new(AtomicU32::new(0));
    let (g, b, f) = (good_calls.clone(), bad_calls.clone(), flaky_calls.clone());
    let named = |name: &str| SubscribeOptions {
        name: Some(name.into()),
        ..Default::default()
    };
    broker
        .subscribe_with(
            &["mixed.op"],
            Arc::new(handler_fn(move |_, _| {
                let g = g.clone();
                async move {
                    g.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            })),
            named("good"),
        )
        .unwrap();
    broker
        .subscribe_with(
            &["mixed.op"],
            Arc::new(handler_fn(move |_, _| {
                let b = b.clone();
                async move {
                    b.fetch_add(1, Ordering::SeqCst);
                    Err(Failure::fail("invalid payload"))
                }
            })),
            named("bad"),
        )
        .unwrap();
    broker
        .subscribe_with(
            &["mixed.op"],
            Arc::new(handler_fn(move |_, _| {
                let f = f.clone();
                async move {
                    if f.fetch_add(1, Ordering::SeqCst) == 0 {
                        Err(Failure::retry("blip"))
                    } else {
                        Ok(())
                    }
                }
            })),
            named("flaky"),
        )
        .unwrap();
    broker.start().await.unwrap();
    let id = broker.publish_async(event("mixed.op")).await.unwrap();
    let failed = wait_for_status(&broker, &id, EventStatus::Failed).await;
    assert_eq!(
        good_calls.load(Ordering::SeqCst),
        1,
        "succeeded handler not re-run"
    );
    assert_eq!(
        bad_calls.load(Ordering::SeqCst),
        1,
        "permanent failure not retried"
    );
    assert_eq!(
        flaky_calls.load(Ordering::SeqCst),
        2,
        "transient failure retried"
    );
    let by_name: HashMap<_, _> = failed
        .handlers
        .iter()
        .map(|o| (o.handler.as_str(), o))
        .collect();
    assert_eq!(by_name["good"].state, OutcomeState::Succeeded);
    assert_eq!(by_name["bad"].state, OutcomeState::Failed);
    assert_eq!(
        by_name["bad"].last_error.as_ref().unwrap().kind,
        FailureKind::Fail
    );
    assert_eq!(by_name["flaky"].state, OutcomeState::Succeeded);
    assert_eq!(by_name["flaky"].attempts, 2);
    assert!(failed.error.unwrap().contains("bad: fail: invalid payload"));

    // Re-running the dead letter runs only the handler that failed for good.
    broker.retry_event(&id).await.unwrap();
    wait_until("re-run to finish", || {
        let bad_calls = bad_calls.clone();
        async move { bad_calls.load(Ordering::SeqCst) == 2 }
    })
    .await;
    wait_for_status(&broker, &id, EventStatus::Failed).await;
    assert_eq!(good_calls.load(Ordering::SeqCst), 1);
    assert_eq!(flaky_calls.load(Ordering::SeqCst), 2);
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn a_panicking_handler_is_a_failure_not_a_crash() {
    let broker = broker_with(config());
    broker
        .subscribe(
            "boom.now",
            handler_fn(|_, _| async { panic!("handler exploded") }),
        )
        .unwrap();
    broker
        .subscribe("boom.now", handler_fn(|_, _| async { Ok(()) }))
        .unwrap();
    broker.start().await.unwrap();
    let done = broker.publish_sync(event("boom.now")).await.unwrap();
    assert_eq!(done.status, EventStatus::Failed);
    let panicked = done
        .handlers
        .iter()
        .find(|o| o.state == OutcomeState::Failed)
        .unwrap();
    let failure = panicked.last_error.as_ref().unwrap();
    assert_eq!(failure.kind, FailureKind::Panic);
    assert!(failure.message.contains("handler exploded"));
    // The broker still works.
    let id = broker.publish_async(event("other.thing")).await.unwrap();
    wait_for_status(&broker, &id, EventStatus::Completed).await;
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn every_invocation_has_a_timeout() {
    let mut config = config();
    config.retry_policy.max_retries = 1;
    let broker = broker_with(config);
    broker
        .subscribe_with(
            &["slow.op"],
            Arc::new(handler_fn(|_, _| async {
                std::future::pending::<()>().await;
                Ok(())
            })),
            SubscribeOptions {
                timeout: Some(Duration::from_millis(50)),
                ..Default::default()
            },
        )
        .unwrap();
    broker.start().await.unwrap();
    let done = broker.publish_sync(event("slow.op")).await.unwrap();
    assert_eq!(done.status, EventStatus::Failed);
    let outcome = &done.handlers[0];
    assert_eq!(outcome.attempts, 2, "timeouts are retried");
    assert_eq!(
        outcome.last_error.as_ref().unwrap().kind,
        FailureKind::Timeout
    );
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn events_no_handler_matches_complete_at_once() {
    let broker = broker_with(config());
    broker.start().await.unwrap();
    let id = broker.publish_async(event("nobody.listens")).await.unwrap();
    let done = wait_for_status(&broker, &id, EventStatus::Completed).await;
    assert!(done.handlers.is_empty());
    assert!(done.completed_at.is_some());
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn full_queue_backpressures_then_refuses_and_loses_nothing() {
    let broker = broker_with(BrokerConfig {
        worker_count: 1,
        buffer_size: 3,
        publish_timeout: Duration::from_millis(100),
        ..config()
    });
    let gate = Arc::new(Semaphore::new(0));
    let handled = Arc::new(AtomicUsize::new(0));
    let (g, h) = (gate.clone(), handled.clone());
    broker
        .subscribe(
            "work.item",
            handler_fn(move |_, _| {
                let (g, h) = (g.clone(), h.clone());
                async move {
                    g.acquire().await.expect("gate").forget();
                    h.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            }),
        )
        .unwrap();
    broker.start().await.unwrap();
    let mut accepted = Vec::new();
    for _ in 0..3 {
        accepted.push(broker.publish_async(event("work.item")).await.unwrap());
    }
    let started = tokio::time::Instant::now();
    let refused = broker.publish_async(event("work.item")).await.unwrap_err();
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "waited for room first"
    );
    assert!(matches!(refused, BrokerError::QueueFull(_)), "{refused}");
    assert!(refused.to_string().contains("buffer_size"), "{refused}");
    // The refused event was not stored.
    let stored = broker
        .provider()
        .list(&eventbroker::EventFilter::default())
        .await
        .unwrap();
    assert_eq!(stored.len(), 3);
    // A publish that waits while room appears succeeds.
    let waiting = {
        let broker = broker.clone();
        tokio::spawn(async move {
            let broker = Broker::clone(&broker);
            let mut config_wait = event("work.item");
            config_wait.id = "late".into();
            broker.publish_async(config_wait).await
        })
    };
    gate.add_permits(1);
    waiting
        .await
        .unwrap()
        .expect("room appeared within the timeout");
    accepted.push("late".into());
    gate.add_permits(100);
    for id in &accepted {
        wait_for_status(&broker, id, EventStatus::Completed).await;
    }
    assert_eq!(handled.load(Ordering::SeqCst), 4);
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn stop_drains_queued_work() {
    let broker = broker_with(BrokerConfig {
        worker_count: 2,
        ..config()
    });
    let handled = Arc::new(AtomicUsize::new(0));
    let h = handled.clone();
    broker
        .subscribe(
            "drain.me",
            handler_fn(move |_, _| {
                let h = h.clone();
                async move {
                    tokio::task::yield_now().await;
                    h.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            }),
        )
        .unwrap();
    broker.start().await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..200 {
        ids.push(broker.publish_async(event("drain.me")).await.unwrap());
    }
    let report = broker.stop_within(PATIENCE).await.unwrap();
    assert!(report.drained, "{report:?}");
    assert_eq!(handled.load(Ordering::SeqCst), 200);
    for id in ids {
        let event = broker.provider().get(&id).await.unwrap().unwrap();
        assert_eq!(event.status, EventStatus::Completed);
    }
}

#[tokio::test]
async fn stop_deadline_gives_unfinished_work_back_without_failing_it() {
    let broker = broker_with(BrokerConfig {
        worker_count: 1,
        ..config()
    });
    broker
        .subscribe(
            "stuck.op",
            handler_fn(|_, _| async {
                std::future::pending::<()>().await;
                Ok(())
            }),
        )
        .unwrap();
    broker.start().await.unwrap();
    let first = broker.publish_async(event("stuck.op")).await.unwrap();
    let second = broker.publish_async(event("stuck.op")).await.unwrap();
    wait_for_status(&broker, &first, EventStatus::Processing).await;
    let report = broker
        .stop_within(Duration::from_millis(200))
        .await
        .unwrap();
    assert!(!report.drained);
    assert_eq!(report.unfinished, 2);
    for id in [first, second] {
        let event = broker.provider().get(&id).await.unwrap().unwrap();
        assert_eq!(event.status, EventStatus::Pending, "not failed, not lost");
    }
}

#[tokio::test]
async fn publish_before_start_after_stop_and_during_stop_errors_cleanly() {
    let broker = broker_with(config());
    assert!(matches!(
        broker.publish_async(event("a.b")).await,
        Err(BrokerError::NotRunning)
    ));
    assert!(matches!(
        broker.publish_sync(event("a.b")).await,
        Err(BrokerError::NotRunning)
    ));
    broker
        .subscribe("a.b", handler_fn(|_, _| async { Ok(()) }))
        .unwrap();
    broker.start().await.unwrap();
    assert!(matches!(
        broker.start().await,
        Err(BrokerError::AlreadyRunning)
    ));
    // Race publishers against stop: every publish either errors or is processed.
    let mut publishers = Vec::new();
    for _ in 0..8 {
        let broker = broker.clone();
        publishers.push(tokio::spawn(async move {
            let mut accepted = Vec::new();
            for _ in 0..200 {
                match broker.publish_async(event("a.b")).await {
                    Ok(id) => accepted.push(id),
                    Err(BrokerError::NotRunning) => break,
                    Err(other) => panic!("unexpected error {other}"),
                }
            }
            accepted
        }));
    }
    tokio::task::yield_now().await;
    let report = broker.stop_within(PATIENCE).await.unwrap();
    assert!(report.drained, "{report:?}");
    let mut accepted = Vec::new();
    for publisher in publishers {
        accepted.extend(publisher.await.expect("publisher did not panic"));
    }
    for id in &accepted {
        let event = broker.provider().get(id).await.unwrap().unwrap();
        assert_eq!(
            event.status,
            EventStatus::Completed,
            "accepted event {id} processed"
        );
    }
    assert!(matches!(
        broker.publish_async(event("a.b")).await,
        Err(BrokerError::NotRunning)
    ));
    assert!(matches!(broker.stop().await, Err(BrokerError::NotRunning)));
    assert!(matches!(broker.start().await, Err(BrokerError::Stopped)));
}

#[tokio::test]
async fn invalid_events_and_patterns_are_rejected_with_clear_errors() {
    let broker = broker_with(BrokerConfig {
        max_payload: bytesize::ByteSize::b(64),
        ..config()
    });
    broker.start().await.unwrap();
    let err = broker.publish_async(event("bad..type")).await.unwrap_err();
    assert!(err.to_string().contains("invalid type"), "{err}");
    let err = broker
        .publish_async(event("a.b").with_payload(json!({"text": "x".repeat(100)})))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("payload"), "{err}");
    let err = broker
        .subscribe("a.>.b", handler_fn(|_, _| async { Ok(()) }))
        .unwrap_err();
    assert!(matches!(err, BrokerError::Pattern(_)), "{err}");
    let mut duplicate = event("a.b");
    duplicate.id = "same".into();
    broker.publish_async(duplicate.clone()).await.unwrap();
    let err = broker.publish_async(duplicate).await.unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn stats_are_right_in_both_modes() {
    for mode in [ProcessingMode::Sync, ProcessingMode::Async] {
        let mut config = config();
        config.mode = mode;
        config.retry_policy.max_retries = 1;
        let broker = broker_with(config);
        broker
            .subscribe_with(
                &["ok.*"],
                Arc::new(handler_fn(|_, _| async { Ok(()) })),
                SubscribeOptions {
                    name: Some("ok-handler".into()),
                    ..Default::default()
                },
            )
            .unwrap();
        broker
            .subscribe_with(
                &["bad.*"],
                Arc::new(handler_fn(|_, _| async { Err(Failure::retry("down")) })),
                SubscribeOptions {
                    name: Some("bad-handler".into()),
                    ..Default::default()
                },
            )
            .unwrap();
        broker.start().await.unwrap();
        let mut ids = Vec::new();
        for t in ["ok.a", "ok.b", "bad.a", "none.a"] {
            ids.push(broker.publish(event(t)).await.unwrap().id().to_owned());
        }
        for id in &ids {
            wait_until("event finished", || {
                let provider = broker.provider().clone();
                let id = id.clone();
                async move {
                    provider
                        .get(&id)
                        .await
                        .unwrap()
                        .is_some_and(|e| e.status.is_finished())
                }
            })
            .await;
        }
        wait_until("counters settle", || {
            let broker = broker.clone();
            async move { broker.stats().await.unwrap().processed == 4 }
        })
        .await;
        let stats = broker.stats().await.unwrap();
        assert_eq!(stats.published, 4, "{mode:?}");
        assert_eq!(stats.processed, 4, "{mode:?}");
        assert_eq!(stats.completed, 3, "{mode:?}");
        assert_eq!(stats.failed, 1, "{mode:?}");
        assert_eq!(stats.dead_lettered, 1, "{mode:?}");
        assert_eq!(stats.retried, 1, "{mode:?}");
        assert_eq!(stats.queue_depth, 0);
        assert_eq!(stats.active_workers, 0);
        let by_name: HashMap<_, _> = stats
            .subscriptions
            .iter()
            .map(|s| (s.name.as_str(), s))
            .collect();
        assert_eq!(by_name["ok-handler"].invocations, 2);
        assert_eq!(by_name["ok-handler"].succeeded, 2);
        assert_eq!(by_name["bad-handler"].invocations, 2);
        assert_eq!(by_name["bad-handler"].failed, 2);
        assert_eq!(stats.provider.by_status["completed"], 3);
        assert_eq!(stats.provider.by_status["failed"], 1);
        broker.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_concurrent_publishes_are_each_processed_exactly_once() {
    const EVENTS: usize = 10_000;
    let broker = broker_with(BrokerConfig {
        worker_count: 16,
        buffer_size: EVENTS,
        memory: eventbroker::config::MemoryConfig {
            max_events: EVENTS,
            ..Default::default()
        },
        ..config()
    });
    let seen = Arc::new(Mutex::new(HashMap::<String, u32>::new()));
    let s = seen.clone();
    broker
        .subscribe(
            "load.*",
            handler_fn(move |_, event| {
                let s = s.clone();
                async move {
                    *s.lock().unwrap().entry(event.id).or_default() += 1;
                    Ok(())
                }
            }),
        )
        .unwrap();
    broker.start().await.unwrap();
    let mut publishers = Vec::new();
    for p in 0..50 {
        let broker = broker.clone();
        publishers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for _ in 0..EVENTS / 50 {
                ids.push(
                    broker
                        .publish_async(event(&format!("load.p{p}")))
                        .await
                        .unwrap(),
                );
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for publisher in publishers {
        ids.extend(publisher.await.unwrap());
    }
    let report = broker.stop_within(PATIENCE).await.unwrap();
    assert!(report.drained, "{report:?}");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), EVENTS);
    assert!(seen.values().all(|&n| n == 1), "each handled exactly once");
    for id in &ids {
        assert_eq!(seen.get(id), Some(&1));
    }
    let stats = broker.stats().await.unwrap();
    assert_eq!(stats.published as usize, EVENTS);
    assert_eq!(stats.completed as usize, EVENTS);
}

#[tokio::test]
async fn handlers_publish_derived_events_tagged_with_their_cause() {
    let broker = broker_with(config());
    broker
        .subscribe(
            "public.users.create",
            handler_fn(|ctx, event| async move {
                let derived = Event::new(EventSource::Internal, "notify.welcome", "")
                    .with_payload(json!({"user": event.payload["name"]}));
                ctx.publish(derived)
                    .await
                    .map_err(|e| Failure::retry(e.to_string()))?;
                Ok(())
            }),
        )
        .unwrap();
    let derived = Arc::new(Mutex::new(Vec::new()));
    let d = derived.clone();
    broker
        .subscribe(
            "notify.*",
            handler_fn(move |_, event| {
                let d = d.clone();
                async move {
                    d.lock().unwrap().push(event);
                    Ok(())
                }
            }),
        )
        .unwrap();
    broker.start().await.unwrap();
    let cause = broker
        .publish_sync(event("public.users.create").with_payload(json!({"name": "ada"})))
        .await
        .unwrap();
    wait_until("derived event handled", || {
        let d = derived.clone();
        async move { !d.lock().unwrap().is_empty() }
    })
    .await;
    let derived = derived.lock().unwrap()[0].clone();
    assert_eq!(derived.metadata["caused_by"], json!(cause.id));
    assert_eq!(derived.metadata["causation_depth"], json!(1));
    assert_eq!(derived.payload["user"], "ada");
    broker.stop().await.unwrap();
}

#[tokio::test]
async fn feedback_loops_are_cut_off() {
    let broker = broker_with(config());
    let depth_errors = Arc::new(AtomicUsize::new(0));
    let e = depth_errors.clone();
    broker
        .subscribe(
            "loop.tick",
            handler_fn(move |ctx, _| {
                let e = e.clone();
                async move {
                    match ctx
                        .publish(Event::new(EventSource::Internal, "loop.tick", ""))
                        .await
                    {
                        Ok(_) => Ok(()),
                        Err(BrokerError::CausationTooDeep(_)) => {
                            e.fetch_add(1, Ordering::SeqCst);
                            Ok(())
                        }
                        Err(other) => Err(Failure::fail(other.to_string())),
                    }
                }
            }),
        )
        .unwrap();
    broker.start().await.unwrap();
    broker.publish_async(event("loop.tick")).await.unwrap();
    wait_until("loop cut off", || {
        let e = depth_errors.clone();
        async move { e.load(Ordering::SeqCst) == 1 }
    })
    .await;
    let report = broker.stop_within(PATIENCE).await.unwrap();
    assert!(report.drained);
    let stats = broker.stats().await.unwrap();
    assert_eq!(
        stats.published as u32,
        eventbroker::broker::MAX_CAUSATION_DEPTH + 1
    );
}

/// Issue 13 A1: the caller of a sync publish going away mid-handler (an HTTP client giving up)
/// does not strand the event: its work runs in the worker pool and the event completes.
#[tokio::test]
async fn a_dropped_sync_publish_still_completes_its_event() {
    let broker = broker_with(config());
    let (started, gate) = (Arc::new(Semaphore::new(0)), Arc::new(Semaphore::new(0)));
    let calls = Arc::new(AtomicUsize::new(0));
    broker
        .subscribe(
            "slow.op",
            gated(started.clone(), gate.clone(), calls.clone()),
        )
        .unwrap();
    broker.start().await.unwrap();
    let mut sync_event = event("slow.op");
    sync_event.id = "sync-dropped".into();
    let caller = {
        let broker = broker.clone();
        tokio::spawn(async move { broker.publish_sync(sync_event).await })
    };
    wait_started(&started).await;
    caller.abort();
    assert!(
        caller.await.unwrap_err().is_cancelled(),
        "the caller went away"
    );
    gate.add_permits(1);
    let done = wait_for_status(&broker, "sync-dropped", EventStatus::Completed).await;
    assert_eq!(done.handlers.len(), 1);
    assert_eq!(done.handlers[0].state, OutcomeState::Succeeded);
    let report = broker.stop_within(PATIENCE).await.unwrap();
    assert!(report.drained, "{report:?}");
    assert_eq!(report.unfinished, 0, "{report:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the handler ran once");
}

/// Issue 13 A8: a publish abandoned by its caller while it waits for room in a full queue
/// leaves no trace in the drain bookkeeping: `stop` drains at once.
#[tokio::test]
async fn a_publish_cancelled_while_waiting_for_room_does_not_hold_up_stop() {
    let broker = broker_with(BrokerConfig {
        worker_count: 1,
        buffer_size: 1,
        publish_timeout: PATIENCE,
        shutdown_timeout: Duration::from_secs(2),
        ..config()
    });
    let (started, gate) = (Arc::new(Semaphore::new(0)), Arc::new(Semaphore::new(0)));
    let calls = Arc::new(AtomicUsize::new(0));
    broker
        .subscribe(
            "work.item",
            gated(started.clone(), gate.clone(), calls.clone()),
        )
        .unwrap();
    broker.start().await.unwrap();
    let first = broker.publish_async(event("work.item")).await.unwrap();
    {
        let waiting = broker.publish_async(event("work.item"));
        tokio::pin!(waiting);
        assert!(
            futures::poll!(waiting.as_mut()).is_pending(),
            "the second publish waits for room"
        );
    } // dropped here: the caller gave up
    gate.add_permits(1);
    wait_for_status(&broker, &first, EventStatus::Completed).await;
    let report = broker.stop().await.unwrap();
    assert_eq!(
        report,
        eventbroker::StopReport {
            drained: true,
            released: 0,
            unfinished: 0
        }
    );
    let stored = broker
        .provider()
        .list(&eventbroker::EventFilter::default())
        .await
        .unwrap();
    assert_eq!(stored.len(), 1, "the abandoned event was never stored");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// Issue 13 A15: a handler that publishes a derived event and then fails with `retry` does not
/// publish the derived event again on the retry: derived ids are stable per (cause, handler,
/// publish sequence).
#[tokio::test]
async fn a_retried_handler_publishes_its_derived_event_once() {
    let broker = broker_with(config());
    let ids = Arc::new(Mutex::new(Vec::new()));
    let seen = ids.clone();
    broker
        .subscribe_with(
            &["order.placed"],
            Arc::new(handler_fn(move |ctx, _| {
                let seen = seen.clone();
                async move {
                    let id = ctx
                        .publish(Event::new(EventSource::Internal, "order.derived", ""))
                        .await
                        .map_err(|e| Failure::fail(e.to_string()))?;
                    seen.lock().unwrap().push(id);
                    if ctx.attempt() == 1 {
                        return Err(Failure::retry("failed after publishing"));
                    }
                    Ok(())
                }
            })),
            SubscribeOptions {
                name: Some("deriver".into()),
                ..Default::default()
            },
        )
        .unwrap();
    broker.start().await.unwrap();
    let cause = broker.publish_async(event("order.placed")).await.unwrap();
    let done = wait_for_status(&broker, &cause, EventStatus::Completed).await;
    assert_eq!(done.handlers[0].attempts, 2);
    let report = broker.stop_within(PATIENCE).await.unwrap();
    assert!(report.drained, "{report:?}");
    let ids = ids.lock().unwrap().clone();
    assert_eq!(ids.len(), 2, "one publish per attempt");
    assert_eq!(ids[0], ids[1], "both attempts name the same derived event");
    let derived: Vec<Event> = broker
        .provider()
        .list(&eventbroker::EventFilter::default())
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.event_type == "order.derived")
        .collect();
    assert_eq!(derived.len(), 1, "exactly one derived event: {derived:?}");
    assert_eq!(derived[0].id, ids[0]);
    assert_eq!(derived[0].metadata["caused_by"], json!(cause));
    assert_eq!(broker.stats().await.unwrap().published, 2);
}

/// A sync publish whose broker stops before the event finishes fails with a clear error naming
/// the event, which keeps its stored state (given back, `pending`).
#[tokio::test]
async fn a_sync_publish_cut_short_by_stop_says_so_and_the_event_stays_pending() {
    let broker = broker_with(config());
    let (started, gate) = (Arc::new(Semaphore::new(0)), Arc::new(Semaphore::new(0)));
    broker
        .subscribe(
            "stuck.op",
            gated(started.clone(), gate, Arc::new(AtomicUsize::new(0))),
        )
        .unwrap();
    broker.start().await.unwrap();
    let mut sync_event = event("stuck.op");
    sync_event.id = "cut-short".into();
    let caller = {
        let broker = broker.clone();
        tokio::spawn(async move { broker.publish_sync(sync_event).await })
    };
    wait_started(&started).await;
    let report = broker
        .stop_within(Duration::from_millis(100))
        .await
        .unwrap();
    assert!(!report.drained && report.released == 1, "{report:?}");
    let error = caller.await.unwrap().unwrap_err();
    assert!(
        matches!(&error, BrokerError::StoppedBeforeFinished(id) if id == "cut-short"),
        "{error}"
    );
    assert!(error.to_string().contains("cut-short"), "{error}");
    let event = broker.provider().get("cut-short").await.unwrap().unwrap();
    assert_eq!(event.status, EventStatus::Pending, "given back, not failed");
}

/// A sync publish learns a final state recorded by another host (here written straight into
/// the provider while this host's handler still runs) by polling the provider.
#[tokio::test]
async fn a_sync_publish_notices_a_final_state_recorded_elsewhere() {
    let broker = broker_with(config());
    let (started, gate) = (Arc::new(Semaphore::new(0)), Arc::new(Semaphore::new(0)));
    broker
        .subscribe(
            "shared.op",
            gated(started.clone(), gate.clone(), Arc::new(AtomicUsize::new(0))),
        )
        .unwrap();
    broker.start().await.unwrap();
    let mut sync_event = event("shared.op");
    sync_event.id = "finished-elsewhere".into();
    let caller = {
        let broker = broker.clone();
        tokio::spawn(async move { broker.publish_sync(sync_event).await })
    };
    wait_started(&started).await;
    let stored = broker
        .provider()
        .get("finished-elsewhere")
        .await
        .unwrap()
        .unwrap();
    let elsewhere = eventbroker::provider::StatusUpdate {
        status: EventStatus::Completed,
        error: None,
        retry_count: 0,
        handlers: Vec::new(),
        processed_at: stored.processed_at,
        completed_at: Some(chrono::Utc::now()),
    };
    broker
        .provider()
        .update_status("finished-elsewhere", &elsewhere)
        .await
        .unwrap();
    let done = tokio::time::timeout(PATIENCE, caller)
        .await
        .expect("the sync publish noticed")
        .unwrap()
        .unwrap();
    assert_eq!(done.status, EventStatus::Completed);
    gate.add_permits(1);
    let report = broker.stop_within(PATIENCE).await.unwrap();
    assert!(report.drained, "{report:?}");
}

/// A memory provider whose lease renewals each take `renewal` (a slow backend round trip).
struct SlowRenewals {
    inner: Arc<MemoryProvider>,
    renewal: Duration,
}

struct SlowRenewingConsumer {
    inner: Arc<dyn eventbroker::Consumer>,
    renewal: Duration,
}

#[async_trait::async_trait]
impl eventbroker::Consumer for SlowRenewingConsumer {
    async fn fetch(
        &self,
        max: usize,
    ) -> Result<Vec<eventbroker::Delivery>, eventbroker::ProviderError> {
        self.inner.fetch(max).await
    }
    async fn complete(
        &self,
        delivery: &eventbroker::Delivery,
        update: &eventbroker::provider::StatusUpdate,
    ) -> Result<(), eventbroker::ProviderError> {
        self.inner.complete(delivery, update).await
    }
    async fn retry(
        &self,
        delivery: &eventbroker::Delivery,
        update: &eventbroker::provider::StatusUpdate,
        delay: Duration,
    ) -> Result<(), eventbroker::ProviderError> {
        self.inner.retry(delivery, update, delay).await
    }
    async fn release(
        &self,
        delivery: &eventbroker::Delivery,
    ) -> Result<(), eventbroker::ProviderError> {
        self.inner.release(delivery).await
    }
    async fn keep_alive(
        &self,
        delivery: &eventbroker::Delivery,
    ) -> Result<(), eventbroker::ProviderError> {
        tokio::time::sleep(self.renewal).await;
        self.inner.keep_alive(delivery).await
    }
    async fn close(&self) {
        self.inner.close().await
    }
}

#[async_trait::async_trait]
impl eventbroker::Provider for SlowRenewals {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn group(&self) -> &str {
        self.inner.group()
    }
    fn features(&self) -> eventbroker::provider::ProviderFeatures {
        self.inner.features()
    }
    async fn publish(&self, event: &Event) -> Result<(), eventbroker::ProviderError> {
        self.inner.publish(event).await
    }
    async fn get(&self, id: &str) -> Result<Option<Event>, eventbroker::ProviderError> {
        self.inner.get(id).await
    }
    async fn list(
        &self,
        filter: &eventbroker::EventFilter,
    ) -> Result<Vec<Event>, eventbroker::ProviderError> {
        self.inner.list(filter).await
    }
    async fn update_status(
        &self,
        id: &str,
        update: &eventbroker::provider::StatusUpdate,
    ) -> Result<(), eventbroker::ProviderError> {
        self.inner.update_status(id, update).await
    }
    async fn delete(&self, id: &str) -> Result<bool, eventbroker::ProviderError> {
        self.inner.delete(id).await
    }
    async fn requeue(
        &self,
        id: &str,
        update: &eventbroker::provider::StatusUpdate,
    ) -> Result<(), eventbroker::ProviderError> {
        self.inner.requeue(id, update).await
    }
    async fn consume(
        &self,
        options: eventbroker::provider::ConsumerOptions,
    ) -> Result<Arc<dyn eventbroker::Consumer>, eventbroker::ProviderError> {
        Ok(Arc::new(SlowRenewingConsumer {
            inner: self.inner.consume(options).await?,
            renewal: self.renewal,
        }))
    }
    async fn stream(
        &self,
        pattern: &eventbroker::Pattern,
    ) -> Result<eventbroker::provider::EventStream, eventbroker::ProviderError> {
        self.inner.stream(pattern).await
    }
    async fn stats(&self) -> Result<eventbroker::ProviderStats, eventbroker::ProviderError> {
        self.inner.stats().await
    }
    async fn ping(&self) -> Result<(), eventbroker::ProviderError> {
        self.inner.ping().await
    }
    async fn close(&self) {
        self.inner.close().await
    }
}

/// Every delivery a host holds (running or waiting in its local queue) keeps its lease while
/// renewals are slow round trips: none expires and runs a second time without a crash. (Renewed
/// one at a time, 24 held deliveries × 300 ms outlast a 1.5 s lease.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_deliveries_keep_their_leases_when_renewals_are_slow() {
    let config = BrokerConfig {
        worker_count: 12,
        lease: Duration::from_millis(1500),
        ..config()
    };
    let provider = Arc::new(SlowRenewals {
        inner: Arc::new(MemoryProvider::new(&config)),
        renewal: Duration::from_millis(300),
    });
    let broker = Broker::new(config, provider);
    let runs: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let seen = runs.clone();
    broker
        .subscribe(
            "work.*",
            handler_fn(move |_ctx, event| {
                let seen = seen.clone();
                async move {
                    *seen.lock().unwrap().entry(event.id.clone()).or_default() += 1;
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    Ok(())
                }
            }),
        )
        .unwrap();
    broker.start().await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..36 {
        ids.push(broker.publish_async(event("work.item")).await.unwrap());
    }
    for id in &ids {
        wait_for_status(&broker, id, EventStatus::Completed).await;
    }
    let runs = runs.lock().unwrap().clone();
    let repeated: Vec<_> = runs.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        repeated.is_empty(),
        "events run more than once: {repeated:?}"
    );
    assert_eq!(runs.len(), ids.len());
    broker.stop().await.unwrap();
}
