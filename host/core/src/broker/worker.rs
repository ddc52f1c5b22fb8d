//! The worker pool: a reader pulls deliveries from the provider's consumer into a bounded local
//! queue, workers run them through the dispatch path, an acknowledger records the final states
//! of finished deliveries in batches ([`Consumer::complete_batch`]: one lock or round trip for
//! what every worker finished meanwhile), a lease keeper renews the leases of everything held
//! locally, and `drain` takes it all down without losing a delivery.
//!
//! A delivery stays *held* from its fetch until its outcome is recorded (or it is given back):
//! its lease is renewed all that time, and `drain` waits for the held set to empty.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::dispatch::{Decision, decide, run_handlers, status_update};
use super::{Inner, WeakBroker};
use crate::event::Event;
use crate::provider::{Consumer, ConsumerOptions, Delivery, ProviderError, StatusUpdate};

/// Lease renewals in flight at once.
const RENEWALS_AT_ONCE: usize = 32;

/// Largest batch fetched from the provider at once.
const MAX_FETCH: usize = 64;

/// Largest batch of final states recorded in one [`Consumer::complete_batch`] call.
const MAX_ACK: usize = 64;

/// A delivery whose handlers ran to a final decision (completed or failed), waiting for the
/// acknowledger to record it.
struct Finished {
    delivery: Arc<Delivery>,
    /// The event as the handlers saw it, when the broker wrote the `processing` mark itself
    /// (otherwise the delivery's event is that view).
    marked: Option<Box<Event>>,
    update: StatusUpdate,
    decision: Decision,
    elapsed: Duration,
}

impl Finished {
    fn event(&self) -> &Event {
        self.marked.as_deref().unwrap_or(&self.delivery.event)
    }
}

/// The bounded local queue between the reader and the workers, `capacity` deliveries deep.
/// The reader reserves room before it fetches ([`QueueSender::reserve`]), so nothing it
/// fetched ever waits outside the queue; any number of workers take from it without a lock
/// around the receiving end. It closes when the reader's end is dropped: workers then take
/// what is left and see `None`.
fn local_queue(capacity: usize) -> (QueueSender, QueueReceiver) {
    let (sender, receiver) = flume::unbounded();
    let room = Arc::new(Semaphore::new(capacity));
    (
        QueueSender {
            sender,
            room: room.clone(),
        },
        QueueReceiver { receiver, room },
    )
}

/// The reader's end of the local queue.
struct QueueSender {
    sender: flume::Sender<Arc<Delivery>>,
    /// Free slots; a slot is taken by a reservation and freed when a worker takes a delivery.
    room: Arc<Semaphore>,
}

impl QueueSender {
    /// Waits for at least one free slot, then reserves as many as are free (at most
    /// [`MAX_FETCH`]). `None` once the queue is closed.
    async fn reserve(&self) -> Option<Reserved<'_>> {
        let wanted = self.room.available_permits().clamp(1, MAX_FETCH);
        let permit = self.room.acquire_many(wanted as u32).await.ok()?;
        permit.forget();
        Some(Reserved {
            room: &self.room,
            left: wanted,
        })
    }

    /// Queues a delivery into a slot taken from a reservation with [`Reserved::take_one`].
    fn send(&self, delivery: Arc<Delivery>) {
        // The receivers live as long as the pool's workers; a delivery sent after every
        // worker has gone (abort) stays held and is given back by `drain`.
        let _ = self.sender.send(delivery);
    }
}

/// Slots reserved in the local queue; those not used are freed when it is dropped.
struct Reserved<'a> {
    room: &'a Semaphore,
    left: usize,
}

impl Reserved<'_> {
    /// How many slots are still reserved.
    fn len(&self) -> usize {
        self.left
    }

    /// Uses one reserved slot; `false` when none is left.
    fn take_one(&mut self) -> bool {
        if self.left == 0 {
            return false;
        }
        self.left -= 1;
        true
    }
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        if self.left > 0 {
            self.room.add_permits(self.left);
        }
    }
}

/// A worker's end of the local queue; workers share it.
#[derive(Clone)]
struct QueueReceiver {
    receiver: flume::Receiver<Arc<Delivery>>,
    room: Arc<Semaphore>,
}

impl QueueReceiver {
    /// The next queued delivery, freeing its slot; `None` once the reader has gone and the
    /// queue is empty. Cancel-safe: a delivery is only taken when this returns it.
    async fn recv(&self) -> Option<Arc<Delivery>> {
        let delivery = self.receiver.recv_async().await.ok()?;
        self.room.add_permits(1);
        Some(delivery)
    }
}

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

/// Deliveries held locally (queued or running), for lease renewal and accounting, by the
/// address of their shared allocation (unique while held: the map keeps it alive).
#[derive(Default)]
struct Held {
    deliveries: Mutex<HashMap<usize, Arc<Delivery>, foldhash::fast::RandomState>>,
}

impl Held {
    fn key(delivery: &Arc<Delivery>) -> usize {
        Arc::as_ptr(delivery) as usize
    }

    fn insert(&self, delivery: &Arc<Delivery>) {
        self.lock().insert(Self::key(delivery), delivery.clone());
    }

    fn remove(&self, delivery: &Arc<Delivery>) {
        self.lock().remove(&Self::key(delivery));
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    fn snapshot(&self) -> Vec<Arc<Delivery>> {
        self.lock().values().cloned().collect()
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<usize, Arc<Delivery>, foldhash::fast::RandomState>> {
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
        let (queue, taken) = local_queue(capacity);
        let stop_reading = CancellationToken::new();
        let abort = CancellationToken::new();
        let held = Arc::new(Held::default());
        let workers_done = Arc::new(tokio::sync::Notify::new());
        // Bounded: when recording outcomes falls behind (a slow backend), workers wait to
        // hand theirs over instead of running ever more events ahead of their acknowledgement.
        let (finished, to_acknowledge) = mpsc::channel::<Finished>(MAX_ACK.max(capacity));
        let mut tasks = JoinSet::new();
        tasks.spawn(read_loop(
            inner.clone(),
            consumer.clone(),
            queue,
            stop_reading.clone(),
            held.clone(),
        ));
        for _ in 0..config.worker_count {
            tasks.spawn(work_loop(
                inner.clone(),
                weak.clone(),
                consumer.clone(),
                taken.clone(),
                finished.clone(),
                abort.clone(),
                held.clone(),
                workers_done.clone(),
            ));
        }
        drop(finished);
        tasks.spawn(acknowledge_loop(
            inner.clone(),
            consumer.clone(),
            to_acknowledge,
            abort.clone(),
            held.clone(),
            workers_done.clone(),
        ));
        drop(taken);
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
    queue: QueueSender,
    stop: CancellationToken,
    held: Arc<Held>,
) {
    let mut failures = 0u32;
    loop {
        // Room is reserved before the fetch: nothing fetched waits in the reader.
        let reserved = tokio::select! {
            reserved = queue.reserve() => match reserved {
                Some(reserved) => reserved,
                None => return,
            },
            _ = stop.cancelled() => return,
        };
        let batch = tokio::select! {
            batch = consumer.fetch(reserved.len()) => batch,
            _ = stop.cancelled() => return,
        };
        match batch {
            Ok(batch) if batch.is_empty() => return, // consumer closed
            Ok(batch) => {
                failures = 0;
                let mut reserved = reserved;
                for delivery in batch {
                    if !reserved.take_one() {
                        // More than asked for: never drop one, hand it back.
                        if let Err(error) = consumer.release(&delivery).await {
                            tracing::warn!(event_id = %delivery.event.id, %error, "could not give back an extra delivery");
                        }
                        continue;
                    }
                    let delivery = Arc::new(delivery);
                    held.insert(&delivery);
                    inner.counters.queue_depth.fetch_add(1, Ordering::Relaxed);
                    inner.update_pool_gauges();
                    queue.send(delivery);
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

#[allow(clippy::too_many_arguments)] // the pool's shared parts, passed once per worker
async fn work_loop(
    inner: Arc<Inner>,
    weak: WeakBroker,
    consumer: Arc<dyn Consumer>,
    queue: QueueReceiver,
    finished: mpsc::Sender<Finished>,
    abort: CancellationToken,
    held: Arc<Held>,
    done: Arc<tokio::sync::Notify>,
) {
    loop {
        let delivery = tokio::select! {
            delivery = queue.recv() => delivery,
            _ = abort.cancelled() => return,
        };
        let Some(delivery) = delivery else { return };
        inner.counters.queue_depth.fetch_sub(1, Ordering::Relaxed);
        inner
            .counters
            .active_workers
            .fetch_add(1, Ordering::Relaxed);
        inner.update_pool_gauges();
        let outcome = tokio::select! {
            outcome = process(&inner, &weak, consumer.as_ref(), &delivery) => Some(outcome),
            _ = abort.cancelled() => None,
        };
        inner
            .counters
            .active_workers
            .fetch_sub(1, Ordering::Relaxed);
        inner.update_pool_gauges();
        match outcome {
            // Final: the acknowledger records it and lets go of the delivery.
            Some(Ok(Processed::Final(item))) => {
                // Biased: an outcome already reached is handed over whenever there is room,
                // even once abort has fired (its handlers would otherwise run again).
                let sent = tokio::select! {
                    biased;
                    sent = finished.send(*item) => sent.is_ok(),
                    _ = abort.cancelled() => false,
                };
                if !sent {
                    // Aborted before it was handed over: it stays held, `drain` gives it back.
                    return;
                }
            }
            Some(Ok(Processed::Retried)) => {
                held.remove(&delivery);
                done.notify_waiters();
            }
            Some(Err(error)) => {
                // The outcome could not be recorded: the delivery stays unacknowledged and is
                // redelivered after its lease.
                held.remove(&delivery);
                done.notify_waiters();
                tracing::error!(event_id = %delivery.event.id, %error, "could not record the outcome of an event; it will be redelivered");
            }
            // Aborted: stays held, `drain` gives it back.
            None => {}
        }
        if abort.is_cancelled() {
            return;
        }
    }
}

/// Records the final states the workers hand over, as many at once as are waiting (up to
/// [`MAX_ACK`]), then counts each decision and lets go of its delivery. Ends when every worker
/// is gone and nothing is left to record, or at once on abort (what is unrecorded stays held
/// and is given back).
async fn acknowledge_loop(
    inner: Arc<Inner>,
    consumer: Arc<dyn Consumer>,
    mut to_acknowledge: mpsc::Receiver<Finished>,
    abort: CancellationToken,
    held: Arc<Held>,
    done: Arc<tokio::sync::Notify>,
) {
    let mut batch: Vec<Finished> = Vec::with_capacity(MAX_ACK);
    loop {
        let received = tokio::select! {
            received = to_acknowledge.recv_many(&mut batch, MAX_ACK) => received,
            _ = abort.cancelled() => return,
        };
        if received == 0 {
            return; // every worker is gone
        }
        let results = {
            let items: Vec<(&Delivery, &StatusUpdate)> = batch
                .iter()
                .map(|item| (&*item.delivery, &item.update))
                .collect();
            tokio::select! {
                biased;
                results = consumer.complete_batch(&items) => results,
                // Unrecorded: the batch stays held, `drain` gives it back.
                _ = abort.cancelled() => return,
            }
        };
        let mut results = results.into_iter();
        for item in batch.drain(..) {
            let result = results.next().unwrap_or_else(|| {
                Err(ProviderError::backend(
                    "broker",
                    "the provider returned fewer results than outcomes it was given",
                ))
            });
            match result {
                Ok(()) => {
                    inner.record_decision(item.event(), &item.update, &item.decision, item.elapsed)
                }
                Err(error) => {
                    // Unacknowledged: redelivered after its lease.
                    tracing::error!(event_id = %item.delivery.event.id, %error, "could not record the outcome of an event; it will be redelivered");
                }
            }
            held.remove(&item.delivery);
        }
        done.notify_waiters();
    }
}

/// How the dispatch path ended for one delivery.
enum Processed {
    /// A final decision, still to be recorded by the acknowledger.
    Final(Box<Finished>),
    /// A retry, already recorded.
    Retried,
}

/// Runs one delivery through the dispatch path. A retry is recorded here; a final decision is
/// returned for the acknowledger.
async fn process(
    inner: &Inner,
    weak: &WeakBroker,
    consumer: &dyn Consumer,
    delivery: &Arc<Delivery>,
) -> Result<Processed, ProviderError> {
    let subscriptions = inner.registry.matching(&delivery.event.event_type);
    // The event as handlers see it: `processing`. Providers that record the mark with the
    // claim hand it out that way; for the others it is written here, one round trip.
    let marked = if delivery.processing_recorded || subscriptions.is_empty() {
        None
    } else {
        let mut event = delivery.event.clone();
        let processing = StatusUpdate::processing(&event);
        processing.apply(&mut event);
        if let Err(error) = inner.provider.update_status(&event.id, &processing).await {
            tracing::warn!(event_id = %event.id, %error, "could not mark event as processing");
        }
        Some(Box::new(event))
    };
    let event = marked.as_deref().unwrap_or(&delivery.event);
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
    if let Decision::Retry { delay, .. } = &decision {
        consumer.retry(delivery, &update, *delay).await?;
        inner.record_decision(event, &update, &decision, started.elapsed());
        return Ok(Processed::Retried);
    }
    Ok(Processed::Final(Box::new(Finished {
        delivery: delivery.clone(),
        marked,
        update,
        decision,
        elapsed: started.elapsed(),
    })))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventSource;

    fn delivery(n: u32) -> Arc<Delivery> {
        Arc::new(Delivery {
            event: Event::new(EventSource::System, "a.b", "test"),
            token: n.to_string(),
            delivery_count: 1,
            processing_recorded: true,
        })
    }

    #[tokio::test]
    async fn the_local_queue_reserves_free_slots_and_closes_after_its_last_delivery() {
        let (sender, receiver) = local_queue(3);
        let mut reserved = sender.reserve().await.expect("open");
        assert_eq!(reserved.len(), 3, "every free slot is reserved");
        assert!(reserved.take_one());
        sender.send(delivery(1));
        drop(reserved);
        assert_eq!(
            sender.room.available_permits(),
            2,
            "slots not used are given back"
        );
        let mut reserved = sender.reserve().await.expect("open");
        assert_eq!(reserved.len(), 2);
        assert!(reserved.take_one() && reserved.take_one());
        assert!(!reserved.take_one(), "no more than reserved");
        sender.send(delivery(2));
        sender.send(delivery(3));
        drop(reserved);
        assert!(
            futures::FutureExt::now_or_never(sender.reserve()).is_none(),
            "a full queue reserves nothing until a worker takes"
        );
        let first = receiver.recv().await.expect("queued");
        assert_eq!(first.token, "1", "in order");
        let reserved = sender.reserve().await.expect("a slot was freed");
        assert_eq!(reserved.len(), 1);
        drop(reserved);
        drop(sender);
        let rest: Vec<String> = [receiver.recv().await, receiver.recv().await]
            .into_iter()
            .map(|d| d.expect("still queued after the reader left").token.clone())
            .collect();
        assert_eq!(rest, ["2", "3"]);
        assert!(receiver.recv().await.is_none(), "closed once empty");
    }
}
