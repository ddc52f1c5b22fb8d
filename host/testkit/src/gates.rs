//! Native handlers that hold an event until the test lets it go, and waiting on an event's
//! status: what tests of "the work outlives its caller" (a client gone, a host killed) need.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use eventbroker::{Broker, Event, EventHandler, EventStatus, handler_fn};
use tokio::sync::Semaphore;

use crate::PATIENCE;

/// A handler that counts its runs in `calls`, adds a permit to `started`, then waits for a
/// permit of `gate` before it succeeds.
pub fn gated(
    started: Arc<Semaphore>,
    gate: Arc<Semaphore>,
    calls: Arc<AtomicUsize>,
) -> impl EventHandler {
    handler_fn(move |_, _| {
        let (started, gate, calls) = (started.clone(), gate.clone(), calls.clone());
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            started.add_permits(1);
            gate.acquire().await.expect("gate").forget();
            Ok(())
        }
    })
}

/// Waits (at most [`PATIENCE`]) until a [`gated`] handler started.
pub async fn wait_started(started: &Semaphore) {
    tokio::time::timeout(PATIENCE, started.acquire())
        .await
        .expect("the handler started")
        .expect("semaphore open")
        .forget();
}

/// The event `id` once its stored status is `status` (polled; panics after [`PATIENCE`]).
pub async fn wait_for_status(broker: &Broker, id: &str, status: EventStatus) -> Event {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let event = broker.provider().get(id).await.expect("get");
        if let Some(event) = event.filter(|e| e.status == status) {
            return event;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for event {id} to be {status}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
