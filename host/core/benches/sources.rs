//! CRUD hooks: events/s from `HookRegistry::run` (the CRUD layer's call) through
//! `register_crud_hooks` to a trivial handler, against `Broker::publish_async` of the same
//! events straight from one task, measured in the same run; and what the CRUD call itself
//! costs (the hook returns before the event is published).
//!
//!     cargo bench -p eventbroker --bench sources [-- EVENTS]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use eventbroker::hooks::{
    CrudHookOptions, HookContext, HookRegistry, UserContext, register_crud_hooks,
};
use eventbroker::{Broker, BrokerConfig, Event, EventSource, MemoryProvider, handler_fn};
use serde_json::json;
use tokio::sync::Notify;

struct Setup {
    broker: Broker,
    seen: Arc<AtomicU64>,
    done: Arc<Notify>,
}

async fn setup(events: u64) -> Setup {
    let config = BrokerConfig {
        instance_id: "bench".into(),
        buffer_size: events as usize + 1,
        memory: eventbroker::config::MemoryConfig {
            max_events: events as usize + 1,
            ..Default::default()
        },
        ..BrokerConfig::default()
    };
    let provider = Arc::new(MemoryProvider::new(&config));
    let broker = Broker::new(config, provider);
    let seen = Arc::new(AtomicU64::new(0));
    let done = Arc::new(Notify::new());
    let (counter, signal) = (seen.clone(), done.clone());
    broker
        .subscribe(
            "public.users.*",
            handler_fn(move |_, event| {
                let (counter, signal) = (counter.clone(), signal.clone());
                async move {
                    std::hint::black_box(&event.payload);
                    if counter.fetch_add(1, Ordering::AcqRel) + 1 == events {
                        signal.notify_one();
                    }
                    Ok(())
                }
            }),
        )
        .expect("subscribe");
    broker.start().await.expect("start");
    Setup { broker, seen, done }
}

fn user() -> UserContext {
    UserContext {
        user_id: Some(1),
        session_id: "bench".into(),
        name: "Bench".into(),
        email: "bench@example.com".into(),
        roles: vec!["admin".into()],
    }
}

async fn baseline(events: u64) -> Duration {
    let setup = setup(events).await;
    let done = setup.done.notified();
    tokio::pin!(done);
    done.as_mut().enable();
    let started = Instant::now();
    for i in 0..events {
        let event = Event::crud(EventSource::Database, "public", "users", "create", "bench")
            .with_payload(json!({"id": i, "name": "Ada"}));
        setup.broker.publish_async(event).await.expect("publish");
    }
    done.await;
    let elapsed = started.elapsed();
    assert_eq!(setup.seen.load(Ordering::Acquire), events);
    setup.broker.stop().await.expect("stop");
    elapsed
}

/// Returns the total time until every event was handled, and the time spent in `run`.
async fn hooks(events: u64) -> (Duration, Duration) {
    let setup = setup(events).await;
    let registry = HookRegistry::new();
    // Every operation is queued at once: the queue must hold them all.
    let capacity =
        std::num::NonZeroUsize::new(events as usize).unwrap_or(std::num::NonZeroUsize::MIN);
    let handle = register_crud_hooks(
        &setup.broker,
        &registry,
        CrudHookOptions::default().with_queue_capacity(capacity),
    );
    let user = user();
    let done = setup.done.notified();
    tokio::pin!(done);
    done.as_mut().enable();
    let started = Instant::now();
    for i in 0..events {
        registry.run(&HookContext::created(
            "public",
            "users",
            json!({"id": i, "name": "Ada"}),
            user.clone(),
        ));
    }
    let calls = started.elapsed();
    handle.flush().await;
    done.await;
    let elapsed = started.elapsed();
    assert_eq!(handle.failed(), 0, "no publish may fail in the benchmark");
    setup.broker.stop().await.expect("stop");
    (elapsed, calls)
}

fn rate(events: u64, elapsed: Duration) -> f64 {
    events as f64 / elapsed.as_secs_f64()
}

fn main() {
    let events: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(50_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        baseline(events / 10).await;
        hooks(events / 10).await;
        let base = rate(events, baseline(events).await);
        let (elapsed, calls) = hooks(events).await;
        let full = rate(events, elapsed);
        println!("events: {events}");
        println!("baseline: publish_async -> memory provider -> worker pool -> trivial handler: {base:>12.0} events/s");
        println!("hooks:    HookRegistry::run -> register_crud_hooks (publisher task) -> same path: {full:>12.0} events/s");
        println!("ratio hooks/baseline: {:.3}", full / base);
        println!(
            "cost of the CRUD layer's HookRegistry::run call: {:.2} µs per operation",
            calls.as_secs_f64() * 1e6 / events as f64
        );
    });
}
