//! The worker pool: a reader pulls deliveries from the provider's consumer into a bounded local
//! queue, workers run them through the dispatch path, a lease keeper renews the leases of
//! everything held locally, and `drain` takes it all down without losing a delivery.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{Mutex as AsyncMutex, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::dispatch::{Decision, decide, run_handlers, status_update};
use super::{Inner, WeakBroker};
use crate::provider::{Consumer, ConsumerOptions, Delivery, ProviderError, StatusUpdate};

/// Lease renewals in flight at once.
const RENEWALS_AT_ONCE: usize = 32;

/// Largest batch fetched from the provider at once.
const MAX_FETCH: usize = 64;

/// A running pool.
pub(crate) struct Pool {
    consumer: Arc<dyn Consumer>,
    /// Stops the reader from fetching more.
    stop_reading: CancellationToken,
    /// Aborts in-flight work (deadline reached): deliveries are given back.
    abort: CancellationToken,
    tasks: JoinSet<()>,
    held: Arc<Held>,
    workers_done: Arc<tokio::sync::Notify>,
}

/// Deliveries held locally (queued or running), for lease renewal and accounting.
#[derive(Default)]
struct Held {
    deliveries: Mutex<HashMap<String, Arc<Delivery>>>,
}

impl Held {
    fn insert(&self, delivery: &Arc<Delivery>) {
        self.lock().insert(delivery.token.clone(), delivery.clone());
    }

    fn remove(&self, delivery: &Delivery) {
        self.lock().remove(&delivery.token);
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    fn snapshot(&self) -> Vec<Arc<Delivery>> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Delivery>>> {
        self.deliveries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DrainReport {
    /// Deliveries given back unfinished for redelivery.
    pub released: usize,
}

impl Pool {
    pub(crate) async fn start(inner: Arc<Inner>, weak: WeakBroker) -> Result<Self, ProviderError> {
        let config = &inner.config;
        let consumer = inner
            .provider
            .consume(ConsumerOptions {
                group: config.consumer_group.clone(),
                name: format!("{}-{}", config.instance_id, uuid::Uuid::new_v4().simple()),
                lease: config.lease,
            })
            .await?;
        let capacity = config.buffer_size.min(config.worker_count * 2).max(1);
        let (sender, receiver) = mpsc::channel::<Arc<Delivery>>(capacity);
        let receiver = Arc::new(AsyncMutex::new(receiver));
        let stop_reading = CancellationToken::new();
        let abort = CancellationToken::new();
        let held = Arc::new(Held::default());
        let workers_done = Arc::new(tokio::sync::Notify::new());
        let mut tasks = JoinSet::new();
        tasks.spawn(read_loop(
            inner.clone(),
            consumer.clone(),
            sender,
            stop_reading.clone(),
            held.clone(),
        ));
        for _ in 0..config.worker_count {
            tasks.spawn(work_loop(
                inner.clone(),
                weak.clone(),
                consumer.clone(),
                receiver.clone(),
                abort.clone(),
                held.clone(),
                workers_done.clone(),
            ));
        }
        tasks.spawn(keep_leases(
            consumer.clone(),
            held.clone(),
            config.lease_renewal_period(),
            abort.clone(),
        ));
        Ok(Pool {
            consumer,
            stop_reading,
            abort,
            tasks,
            held,
            workers_done,
        })
    }

    /// Stops the pool. Until `deadline`: keeps processing what is held locally and, when
    /// `until_idle` is set (providers that are not shared), keeps fetching until this broker's
    /// accepted events are all finished. At the deadline, aborts what is still running and gives
    /// every unfinished delivery back to the provider.
    pub(crate) async fn drain(
        mut self,
        inner: &Inner,
        deadline: Instant,
        until_idle: bool,
    ) -> DrainReport {
        if until_idle {
            loop {
                let notified = inner.outstanding.idle.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if inner.outstanding.len() == 0 {
                    break;
                }
                if tokio::time::timeout_at(deadline, notified).await.is_err() {
                    break;
                }
            }
        }
        self.stop_reading.cancel();
        // Wait for the workers to empty the local queue and finish what is running.
        loop {
            let notified = self.workers_done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.held.len() == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break;
            }
        }
        self.abort.cancel();
        while self.tasks.join_next().await.is_some() {}
        // Whatever is still held was queued or interrupted: give it back.
        let leftovers = self.held.snapshot();
        for delivery in &leftovers {
            if let Err(error) = self.consumer.release(delivery).await {
                tracing::warn!(event_id = %delivery.event.id, %error, "could not give back an unfinished delivery; it will be redelivered when its lease expires");
            }
        }
        self.consumer.close().await;
        DrainReport {
            released: leftovers.len(),
        }
    }
}

async fn read_loop(
    inner: Arc<Inner>,
    consumer: Arc<dyn Consumer>,
    sender: mpsc::Sender<Arc<Delivery>>,
    stop: CancellationToken,
    held: Arc<Held>,
) {
    let mut failures = 0u32;
    loop {
        let wanted = sender.capacity().clamp(1, MAX_FETCH);
        let permits = tokio::select! {
            permits = sender.reserve_many(wanted) => match permits {
                Ok(permits) => permits,
                Err(_) => return,
            },
            _ = stop.cancelled() => return,
        };
        let batch = tokio::select! {
            batch = consumer.fetch(wanted) => batch,
            _ = stop.cancelled() => return,
        };
        match batch {
            Ok(batch) if batch.is_empty() => return, // consumer closed
            Ok(batch) => {
                failures = 0;
                let mut permits = permits;
                for delivery in batch {
                    let Some(permit) = permits.next() else {
                        // More than asked for: never drop one, hand it back.
                        if let Err(error) = consumer.release(&delivery).await {
                            tracing::warn!(event_id = %delivery.event.id, %error, "could not give back an extra delivery");
                        }
                        continue;
                    };
                    let delivery = Arc::new(delivery);
                    held.insert(&delivery);
                    inner.counters.queue_depth.fetch_add(1, Ordering::Relaxed);
                    inner.update_pool_gauges();
                    permit.send(delivery);
                }
            }
            Err(error) => {
                failures += 1;
                let pause = Duration::from_millis(100 * 2u64.pow(failures.min(6)))
                    .min(Duration::from_secs(5));
                tracing::warn!(%error, retry_in = ?pause, "fetching events failed");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.cancelled() => return,
                }
            }
        }
    }
}

async fn work_loop(
    inner: Arc<Inner>,
    weak: WeakBroker,
    consumer: Arc<dyn Consumer>,
    receiver: Arc<AsyncMutex<mpsc::Receiver<Arc<Delivery>>>>,
    abort: CancellationToken,
    held: Arc<Held>,
    done: Arc<tokio::sync::Notify>,
) {
    loop {
        let delivery = tokio::select! {
            delivery = async { receiver.lock().await.recv().await } => delivery,
            _ = abort.cancelled() => return,
        };
        let Some(delivery) = delivery else { return };
        inner.counters.queue_depth.fetch_sub(1, Ordering::Relaxed);
        inner
            .counters
            .active_workers
            .fetch_add(1, Ordering::Relaxed);
        inner.update_pool_gauges();
        let finished = tokio::select! {
            result = process(&inner, &weak, consumer.as_ref(), &delivery) => Some(result),
            _ = abort.cancelled() => None,
        };
        inner
            .counters
            .active_workers
            .fetch_sub(1, Ordering::Relaxed);
        inner.update_pool_gauges();
        match finished {
            Some(Ok(())) => held.remove(&delivery),
            Some(Err(error)) => {
                // The outcome could not be recorded: the delivery stays unacknowledged and is
                // redelivered after its lease.
                held.remove(&delivery);
                tracing::error!(event_id = %delivery.event.id, %error, "could not record the outcome of an event; it will be redelivered");
            }
            // Aborted: stays held, `drain` gives it back.
            None => {}
        }
        done.notify_waiters();
        if abort.is_cancelled() {
            return;
        }
    }
}

/// Runs one delivery through the dispatch path and records the outcome.
async fn process(
    inner: &Inner,
    weak: &WeakBroker,
    consumer: &dyn Consumer,
    delivery: &Delivery,
) -> Result<(), ProviderError> {
    let subscriptions = inner.registry.matching(&delivery.event.event_type);
    // The event as handlers see it: `processing`. Providers that record the mark with the
    // claim hand it out that way; for the others it is written here, one round trip.
    let marked;
    let event = if delivery.processing_recorded || subscriptions.is_empty() {
        &delivery.event
    } else {
        let mut event = delivery.event.clone();
        let processing = StatusUpdate::processing(&event);
        processing.apply(&mut event);
        if let Err(error) = inner.provider.update_status(&event.id, &processing).await {
            tracing::warn!(event_id = %event.id, %error, "could not mark event as processing");
        }
        marked = event;
        &marked
    };
    let started = Instant::now();
    let span = tracing::info_span!(
        "event",
        id = %event.id,
        r#type = %event.event_type,
        delivery = delivery.delivery_count
    );
    crate::trace_context::adopt(&span, &event.metadata);
    let outcomes =
        tracing::Instrument::instrument(run_handlers(event, &subscriptions, weak), span).await;
    let decision = decide(&outcomes, &subscriptions);
    let update = status_update(event, outcomes, &decision);
    match &decision {
        Decision::Retry { delay, .. } => consumer.retry(delivery, &update, *delay).await?,
        Decision::Complete | Decision::Fail { .. } => consumer.complete(delivery, &update).await?,
    }
    inner.record_decision(event, &update, &decision, started.elapsed());
    Ok(())
}

/// Renews the leases of every delivery held locally, every `period`
/// ([`crate::config::BrokerConfig::lease_renewal_period`]).
async fn keep_leases(
    consumer: Arc<dyn Consumer>,
    held: Arc<Held>,
    period: Duration,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(period);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => return,
        }
        // Concurrently: renewing one delivery per round trip let leases of deliveries waiting
        // in the local queue expire under load (and their events run twice, with no crash).
        futures::stream::iter(held.snapshot())
            .for_each_concurrent(RENEWALS_AT_ONCE, |delivery| {
                let consumer = consumer.clone();
                async move {
                    if let Err(error) = consumer.keep_alive(&delivery).await {
                        tracing::debug!(event_id = %delivery.event.id, %error, "lease renewal failed");
                    }
                }
            })
            .await;
    }
}
