//! Broker internals the public API cannot observe: the sync waiters' bookkeeping.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use super::*;
use crate::event::EventSource;
use crate::provider::MemoryProvider;

const PATIENCE: Duration = Duration::from_secs(30);

/// A sync publish whose caller goes away mid-handler leaves no waiter behind, and neither
/// does one that got its answer.
#[tokio::test]
async fn sync_waiters_are_removed_when_answered_or_dropped() {
    let broker = Broker::new(BrokerConfig::default(), Arc::new(MemoryProvider::default()));
    let (started, gate) = (Arc::new(Semaphore::new(0)), Arc::new(Semaphore::new(0)));
    let (s, g) = (started.clone(), gate.clone());
    broker
        .subscribe(
            "slow.op",
            handler_fn(move |_, _| {
                let (s, g) = (s.clone(), g.clone());
                async move {
                    s.add_permits(1);
                    g.acquire().await.expect("gate").forget();
                    Ok(())
                }
            }),
        )
        .expect("subscribe");
    broker.start().await.expect("start");
    let caller = {
        let broker = broker.clone();
        tokio::spawn(async move {
            broker
                .publish_sync(Event::new(EventSource::System, "slow.op", ""))
                .await
        })
    };
    tokio::time::timeout(PATIENCE, started.acquire())
        .await
        .expect("handler started")
        .expect("open")
        .forget();
    assert_eq!(broker.inner.waiters.len(), 1);
    caller.abort();
    let _ = caller.await;
    assert_eq!(broker.inner.waiters.len(), 0, "the dropped wait is gone");
    gate.add_permits(1);
    let done = broker
        .publish_sync(Event::new(EventSource::System, "other.op", ""))
        .await
        .expect("publish");
    assert_eq!(done.status, EventStatus::Completed);
    assert_eq!(broker.inner.waiters.len(), 0, "the answered wait is gone");
    let report = broker.stop_within(PATIENCE).await.expect("stop");
    assert!(report.drained, "{report:?}");
    assert_eq!(broker.inner.outstanding.len(), 0);
}
