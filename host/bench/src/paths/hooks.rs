//! CRUD hooks: `HookRegistry::run` (the CRUD layer's call) through `register_crud_hooks` to the
//! trivial handler, against `publish_async` of the same events from one task.

use std::time::{Duration, Instant};

use eventbroker::hooks::{
    CrudHookOptions, HookContext, HookRegistry, UserContext, register_crud_hooks,
};
use eventbroker::{Event, EventSource};
use serde_json::json;

use crate::Row;
use crate::harness::rate;
use crate::paths::memory;

fn user() -> UserContext {
    UserContext {
        user_id: Some(1),
        session_id: "bench".into(),
        name: "Bench".into(),
        email: "bench@example.com".into(),
        roles: vec!["admin".into()],
    }
}

/// `publish_async` of CRUD events from one task, until every one is final.
async fn direct(events: u64) -> Duration {
    let broker = memory::broker(0).await;
    crate::harness::subscribe_trivial(&broker, "trivial");
    let started = Instant::now();
    for i in 0..events {
        let event = Event::crud(EventSource::Database, "bench", "users", "create", "bench")
            .with_payload(json!({"id": i, "name": "Ada"}));
        broker.publish_async(event).await.expect("publish");
    }
    broker.wait_idle().await;
    let elapsed = started.elapsed();
    broker.stop().await.expect("stop");
    elapsed
}

/// The same events raised by `HookRegistry::run`; returns the time until every one is final
/// and the time spent in the `run` calls themselves.
async fn through_hooks(events: u64) -> (Duration, Duration) {
    let broker = memory::broker(0).await;
    crate::harness::subscribe_trivial(&broker, "trivial");
    let registry = HookRegistry::new();
    // Every operation is queued at once: the queue must hold them all.
    let capacity =
        std::num::NonZeroUsize::new(events as usize).unwrap_or(std::num::NonZeroUsize::MIN);
    let handle = register_crud_hooks(
        &broker,
        &registry,
        CrudHookOptions::default().with_queue_capacity(capacity),
    );
    let user = user();
    let started = Instant::now();
    for i in 0..events {
        registry.run(&HookContext::created(
            "bench",
            "users",
            json!({"id": i, "name": "Ada"}),
            user.clone(),
        ));
    }
    let calls = started.elapsed();
    handle.flush().await;
    broker.wait_idle().await;
    let elapsed = started.elapsed();
    assert_eq!(handle.failed(), 0, "no publish may fail in the benchmark");
    broker.stop().await.expect("stop");
    (elapsed, calls)
}

/// The `crud hooks` row, and the cost of one `HookRegistry::run` call.
pub async fn run(events: u64) -> (Row, Duration) {
    direct(events / 10).await;
    through_hooks(events / 10).await;
    let bare = crate::harness::median_rate(events, || direct(events)).await;
    let (elapsed, calls) = through_hooks(events).await;
    let row = Row {
        path: "crud hooks, memory".into(),
        baseline: "publish_async, one task".into(),
        bare,
        broker: rate(events, elapsed),
        latency: None,
        cpu: None,
    };
    (row, calls / events.max(1) as u32)
}
