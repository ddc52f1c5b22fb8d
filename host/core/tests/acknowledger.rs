//! The worker pool's acknowledger under a provider that answers a batch of outcomes with too
//! few results: the unanswered outcome is not counted as recorded, and the event is delivered
//! again after its lease and completes: nothing is lost, nothing is counted twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use eventbroker::provider::{
    Consumer, ConsumerOptions, Delivery, EventFilter, EventStream, MemoryProvider, Provider,
    ProviderError, ProviderFeatures, ProviderStats, StatusUpdate, async_trait,
};
use eventbroker::{Broker, BrokerConfig, Event, EventSource, EventStatus, Pattern, handler_fn};

/// The memory provider, whose consumers answer their first `complete_batch` with no results.
struct ShortAnswer {
    inner: MemoryProvider,
    answered_short: Arc<AtomicBool>,
}

struct ShortConsumer {
    inner: Arc<dyn Consumer>,
    answered_short: Arc<AtomicBool>,
}

#[async_trait]
impl Consumer for ShortConsumer {
    async fn fetch(&self, max: usize) -> Result<Vec<Delivery>, ProviderError> {
        self.inner.fetch(max).await
    }
    async fn complete(&self, d: &Delivery, u: &StatusUpdate) -> Result<(), ProviderError> {
        self.inner.complete(d, u).await
    }
    async fn complete_batch(
        &self,
        items: &[(&Delivery, &StatusUpdate)],
    ) -> Vec<Result<(), ProviderError>> {
        if !self.answered_short.swap(true, Ordering::SeqCst) {
            return Vec::new();
        }
        self.inner.complete_batch(items).await
    }
    async fn retry(
        &self,
        d: &Delivery,
        u: &StatusUpdate,
        delay: Duration,
    ) -> Result<(), ProviderError> {
        self.inner.retry(d, u, delay).await
    }
    async fn release(&self, d: &Delivery) -> Result<(), ProviderError> {
        self.inner.release(d).await
    }
    async fn keep_alive(&self, d: &Delivery) -> Result<(), ProviderError> {
        self.inner.keep_alive(d).await
    }
    async fn close(&self) {
        self.inner.close().await
    }
}

#[async_trait]
impl Provider for ShortAnswer {
    fn name(&self) -> &'static str {
        "short-answer"
    }
    fn group(&self) -> &str {
        self.inner.group()
    }
    fn features(&self) -> ProviderFeatures {
        self.inner.features()
    }
    async fn publish(&self, event: &Event) -> Result<(), ProviderError> {
        self.inner.publish(event).await
    }
    async fn get(&self, id: &str) -> Result<Option<Event>, ProviderError> {
        self.inner.get(id).await
    }
    async fn list(&self, filter: &EventFilter) -> Result<Vec<Event>, ProviderError> {
        self.inner.list(filter).await
    }
    async fn update_status(&self, id: &str, update: &StatusUpdate) -> Result<(), ProviderError> {
        self.inner.update_status(id, update).await
    }
    async fn delete(&self, id: &str) -> Result<bool, ProviderError> {
        self.inner.delete(id).await
    }
    async fn requeue(&self, id: &str, update: &StatusUpdate) -> Result<(), ProviderError> {
        self.inner.requeue(id, update).await
    }
    async fn consume(&self, options: ConsumerOptions) -> Result<Arc<dyn Consumer>, ProviderError> {
        Ok(Arc::new(ShortConsumer {
            inner: self.inner.consume(options).await?,
            answered_short: self.answered_short.clone(),
        }))
    }
    async fn stream(&self, pattern: &Pattern) -> Result<EventStream, ProviderError> {
        self.inner.stream(pattern).await
    }
    async fn stats(&self) -> Result<ProviderStats, ProviderError> {
        self.inner.stats().await
    }
    async fn ping(&self) -> Result<(), ProviderError> {
        self.inner.ping().await
    }
    async fn close(&self) {
        self.inner.close().await
    }
}

#[tokio::test]
async fn an_outcome_the_provider_did_not_answer_for_is_run_again_and_counted_once() {
    let config = BrokerConfig {
        instance_id: "ack-test".into(),
        lease: Duration::from_millis(300),
        ..BrokerConfig::default()
    };
    let answered_short = Arc::new(AtomicBool::new(false));
    let provider = Arc::new(ShortAnswer {
        inner: MemoryProvider::new(&config),
        answered_short: answered_short.clone(),
    });
    let broker = Broker::new(config, provider);
    let runs = Arc::new(AtomicU32::new(0));
    let counted = runs.clone();
    broker
        .subscribe(
            "ack.>",
            handler_fn(move |_, _| {
                let counted = counted.clone();
                async move {
                    counted.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            }),
        )
        .expect("subscribe");
    broker.start().await.expect("start");
    let done = tokio::time::timeout(
        Duration::from_secs(30),
        broker.publish_sync(Event::new(EventSource::System, "ack.test", "h")),
    )
    .await
    .expect("the event completes after its redelivery")
    .expect("publish");
    assert_eq!(done.status, EventStatus::Completed);
    assert!(
        answered_short.load(Ordering::SeqCst),
        "the short answer happened"
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "run again after the unanswered outcome"
    );
    let stats = broker.stats().await.expect("stats");
    assert_eq!(stats.completed, 1, "the unanswered outcome was not counted");
    broker.stop().await.expect("stop");
}
