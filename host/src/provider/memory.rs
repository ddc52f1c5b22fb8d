//! The embedded in-memory provider: the default, for a single host.
//!
//! - Bounded: at most `max_events` stored. When full, the least recently used *finished*
//!   (completed or failed) event is evicted; pending and processing events are never evicted:
//!   a publish that would need to evict one waits up to `publish_timeout` for room and then
//!   fails with [`ProviderError::Full`]. At most `max_pending` events may be unfinished at once
//!   (the broker's `buffer_size`), with the same wait-then-fail rule.
//! - A cleanup task removes finished events older than `max_age`.
//! - Consumer groups share work with leases: a delivery not acknowledged within its lease is
//!   redelivered, and a dropped or closed consumer's deliveries are redelivered at once.
//! - Watchers get a bounded buffer; one that falls behind gets [`ProviderError::Lagged`].
//!
//! Nothing survives the process: the provider is not durable.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use futures::StreamExt;
use lru::LruCache;
use tokio::sync::{Notify, broadcast};
use tokio::time::Instant;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_util::sync::CancellationToken;

use super::{
    Consumer, ConsumerOptions, Delivery, EventFilter, EventStream, Provider, ProviderError,
    ProviderFeatures, ProviderStats, StatusUpdate,
};
use crate::config::BrokerConfig;
use crate::event::{Event, EventStatus};
use crate::pattern::Pattern;

const NAME: &str = "memory";

/// Settings of the memory provider.
#[derive(Debug, Clone)]
pub struct MemoryOptions {
    /// Most events stored at once (finished ones are evicted to make room).
    pub max_events: usize,
    /// Most unfinished (pending or processing) events at once.
    pub max_pending: usize,
    /// How long a publish waits for room before failing with [`ProviderError::Full`].
    pub publish_timeout: Duration,
    /// Finished events older than this are removed by the cleanup task.
    pub max_age: Duration,
    /// How often the cleanup task runs.
    pub cleanup_interval: Duration,
    /// Events buffered per watcher before it is cut off as lagging.
    pub watcher_buffer: usize,
}

impl Default for MemoryOptions {
    fn default() -> Self {
        MemoryOptions {
            max_events: 10_000,
            max_pending: 1_000,
            publish_timeout: Duration::from_secs(5),
            max_age: Duration::from_secs(3600),
            cleanup_interval: Duration::from_secs(60),
            watcher_buffer: 1024,
        }
    }
}

impl MemoryOptions {
    /// The options a broker config asks for (`memory` section and `buffer_size`).
    pub fn from_config(config: &BrokerConfig) -> Self {
        MemoryOptions {
            max_events: config.memory.max_events.max(1),
            max_pending: config.buffer_size.max(1),
            publish_timeout: config.publish_timeout,
            max_age: config.memory.max_age,
            cleanup_interval: config.memory.cleanup_interval,
            watcher_buffer: config.memory.watcher_buffer.max(1),
        }
    }
}

/// The in-memory provider. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct MemoryProvider {
    inner: Arc<Inner>,
}

struct Inner {
    options: MemoryOptions,
    state: Mutex<State>,
    /// Signalled whenever room may have appeared (an event finished or was removed).
    room: Notify,
    watchers: broadcast::Sender<Event>,
    closed: AtomicBool,
    /// Cancelled by `close`: ends watcher streams.
    shutdown: CancellationToken,
    counters: Counters,
}

#[derive(Default)]
struct Counters {
    published: AtomicU64,
    consumed: AtomicU64,
    acknowledged: AtomicU64,
    redelivered: AtomicU64,
    consumers: AtomicU64,
}

struct Entry {
    event: Event,
    /// Position in the delivery log, for published (not merely stored) events.
    seq: Option<u64>,
}

struct State {
    events: HashMap<String, Entry>,
    /// Finished events, least recently used first.
    finished: LruCache<String, ()>,
    unfinished: usize,
    /// Delivery log: sequence number to event id, in publish order.
    log: BTreeMap<u64, String>,
    next_seq: u64,
    groups: HashMap<String, Group>,
    next_token: u64,
}

struct Group {
    /// Next log position to hand out.
    cursor: u64,
    /// Deliveries to repeat, earliest due first: (due, seq, id, deliveries so far).
    redeliver: BinaryHeap<Reverse<(Instant, u64, String, u32)>>,
    /// Deliveries out with consumers, by token.
    leased: HashMap<u64, Lease>,
    /// Delivery counts of events handed out at least once.
    counts: HashMap<String, u32>,
    wake: Arc<Notify>,
}

struct Lease {
    id: String,
    seq: u64,
    consumer: u64,
    deadline: Instant,
    lease: Duration,
    count: u32,
}

impl Group {
    fn new(start: u64) -> Self {
        Group {
            cursor: start,
            redeliver: BinaryHeap::new(),
            leased: HashMap::new(),
            counts: HashMap::new(),
            wake: Arc::new(Notify::new()),
        }
    }
}

impl MemoryProvider {
    /// A new, empty provider. Inside a tokio runtime it also starts the cleanup task, which
    /// stops when the provider is closed or dropped.
    pub fn new(options: MemoryOptions) -> Self {
        let (watchers, _) = broadcast::channel(options.watcher_buffer.max(1));
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                events: HashMap::new(),
                finished: LruCache::unbounded(),
                unfinished: 0,
                log: BTreeMap::new(),
                next_seq: 1,
                groups: HashMap::new(),
                next_token: 1,
            }),
            room: Notify::new(),
            watchers,
            closed: AtomicBool::new(false),
            shutdown: CancellationToken::new(),
            counters: Counters::default(),
            options,
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(cleanup_loop(Arc::downgrade(&inner)));
        }
        MemoryProvider { inner }
    }

    /// Removes finished events older than `max_age`; returns how many were removed.
    pub fn cleanup(&self) -> usize {
        self.inner.cleanup()
    }
}

async fn cleanup_loop(inner: Weak<Inner>) {
    let interval = match inner.upgrade() {
        Some(inner) => inner
            .options
            .cleanup_interval
            .max(Duration::from_millis(10)),
        None => return,
    };
    let mut ticker = tokio::time::interval(interval);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.closed.load(Ordering::Acquire) {
            return;
        }
        let removed = inner.cleanup();
        if removed > 0 {
            tracing::debug!(removed, "memory provider removed expired finished events");
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than stopping the host, so a poisoned lock is simply taken over.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn check_open(&self) -> Result<(), ProviderError> {
        if self.closed.load(Ordering::Acquire) {
            Err(ProviderError::Closed)
        } else {
            Ok(())
        }
    }

    fn cleanup(&self) -> usize {
        let Ok(max_age) = chrono::Duration::from_std(self.options.max_age) else {
            return 0;
        };
        let cutoff = Utc::now() - max_age;
        let mut state = self.lock();
        let expired: Vec<String> = state
            .events
            .iter()
            .filter(|(_, entry)| {
                entry.event.status.is_finished()
                    && entry.event.completed_at.unwrap_or(entry.event.created_at) < cutoff
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            state.remove(id);
        }
        drop(state);
        if !expired.is_empty() {
            self.room.notify_waiters();
        }
        expired.len()
    }

    /// Inserts an event, waiting for room up to the publish timeout.
    async fn insert(&self, event: &Event, deliver: bool) -> Result<(), ProviderError> {
        let deadline = Instant::now() + self.options.publish_timeout;
        loop {
            self.check_open()?;
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.try_insert(event, deliver) {
                Ok(()) => return Ok(()),
                Err(InsertError::Provider(error)) => return Err(error),
                Err(InsertError::NoRoom(reason)) => {
                    if tokio::time::timeout_at(deadline, notified).await.is_err() {
                        return Err(ProviderError::Full(format!(
                            "memory provider is full ({reason}); waited {}",
                            humantime::format_duration(self.options.publish_timeout)
                        )));
                    }
                }
            }
        }
    }

    fn try_insert(&self, event: &Event, deliver: bool) -> Result<(), InsertError> {
        let mut state = self.lock();
        if state.events.contains_key(&event.id) {
            return Err(InsertError::Provider(ProviderError::Duplicate(
                event.id.clone(),
            )));
        }
        let unfinished = !event.status.is_finished();
        if unfinished && state.unfinished >= self.options.max_pending {
            return Err(InsertError::NoRoom(format!(
                "{} unfinished events, the limit (buffer_size) is {}",
                state.unfinished, self.options.max_pending
            )));
        }
        while state.events.len() >= self.options.max_events {
            let Some((oldest, ())) = state.finished.pop_lru() else {
                return Err(InsertError::NoRoom(format!(
                    "{} events stored and none finished to evict (max_events {})",
                    state.events.len(),
                    self.options.max_events
                )));
            };
            state.remove(&oldest);
        }
        let seq = deliver.then(|| {
            let seq = state.next_seq;
            state.next_seq += 1;
            state.log.insert(seq, event.id.clone());
            seq
        });
        if unfinished {
            state.unfinished += 1;
        } else {
            state.finished.put(event.id.clone(), ());
        }
        state.events.insert(
            event.id.clone(),
            Entry {
                event: event.clone(),
                seq,
            },
        );
        if deliver {
            for group in state.groups.values() {
                group.wake.notify_waiters();
            }
        }
        drop(state);
        let _ = self.watchers.send(event.clone());
        Ok(())
    }

    /// Applies a status update to a stored event, keeping the counts and LRU right.
    /// Returns the updated event for watchers.
    fn apply(state: &mut State, id: &str, update: &StatusUpdate) -> Result<Event, ProviderError> {
        let entry = state
            .events
            .get_mut(id)
            .ok_or_else(|| ProviderError::NotFound(id.to_owned()))?;
        let was_finished = entry.event.status.is_finished();
        update.apply(&mut entry.event);
        let event = entry.event.clone();
        match (was_finished, event.status.is_finished()) {
            (false, true) => {
                state.unfinished -= 1;
                state.finished.put(id.to_owned(), ());
            }
            (true, false) => {
                state.unfinished += 1;
                state.finished.pop(id);
            }
            _ => {}
        }
        Ok(event)
    }

    fn notify_change(&self, event: Event, finished: bool) {
        if finished {
            self.room.notify_waiters();
        }
        let _ = self.watchers.send(event);
    }
}

enum InsertError {
    Provider(ProviderError),
    NoRoom(String),
}

impl State {
    fn remove(&mut self, id: &str) -> Option<Event> {
        let entry = self.events.remove(id)?;
        if entry.event.status.is_finished() {
            self.finished.pop(id);
        } else {
            self.unfinished -= 1;
        }
        if let Some(seq) = entry.seq {
            self.log.remove(&seq);
        }
        for group in self.groups.values_mut() {
            group.counts.remove(id);
        }
        Some(entry.event)
    }

    /// Moves expired leases of `group` back to the redelivery queue.
    fn expire_leases(group: &mut Group, now: Instant) {
        let expired: Vec<u64> = group
            .leased
            .iter()
            .filter(|(_, lease)| lease.deadline <= now)
            .map(|(token, _)| *token)
            .collect();
        for token in expired {
            if let Some(lease) = group.leased.remove(&token) {
                group
                    .redeliver
                    .push(Reverse((now, lease.seq, lease.id, lease.count)));
            }
        }
    }
}

#[async_trait]
impl Provider for MemoryProvider {
    fn name(&self) -> &'static str {
        NAME
    }

    fn features(&self) -> ProviderFeatures {
        ProviderFeatures {
            durable: false,
            shared: false,
            consumer_groups: true,
            ordered: true,
        }
    }

    async fn store(&self, event: &Event) -> Result<(), ProviderError> {
        self.inner.insert(event, false).await
    }

    async fn publish(&self, event: &Event) -> Result<(), ProviderError> {
        self.inner.insert(event, true).await?;
        self.inner
            .counters
            .published
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<Option<Event>, ProviderError> {
        let mut state = self.inner.lock();
        let event = state.events.get(id).map(|entry| entry.event.clone());
        if event.as_ref().is_some_and(|e| e.status.is_finished()) {
            state.finished.promote(id);
        }
        Ok(event)
    }

    async fn list(&self, filter: &EventFilter) -> Result<Vec<Event>, ProviderError> {
        let matching: Vec<Event> = {
            let state = self.inner.lock();
            state
                .events
                .values()
                .filter(|entry| filter.matches(&entry.event))
                .map(|entry| entry.event.clone())
                .collect()
        };
        Ok(filter.paginate(matching))
    }

    async fn update_status(&self, id: &str, update: &StatusUpdate) -> Result<(), ProviderError> {
        self.inner.check_open()?;
        let event = Inner::apply(&mut self.inner.lock(), id, update)?;
        self.inner.notify_change(event, update.status.is_finished());
        Ok(())
    }

    async fn delete(&self, id: &str) -> Result<bool, ProviderError> {
        let removed = self.inner.lock().remove(id).is_some();
        if removed {
            self.inner.room.notify_waiters();
        }
        Ok(removed)
    }

    async fn requeue(&self, id: &str, update: &StatusUpdate) -> Result<(), ProviderError> {
        self.inner.check_open()?;
        let event = {
            let mut state = self.inner.lock();
            let entry = state
                .events
                .get(id)
                .ok_or_else(|| ProviderError::NotFound(id.to_owned()))?;
            if !entry.event.status.is_finished() {
                return Err(ProviderError::InvalidState {
                    id: id.to_owned(),
                    status: entry.event.status,
                    reason: "only completed or failed events can be re-run",
                });
            }
            let old_seq = entry.seq;
            let event = Inner::apply(&mut state, id, update)?;
            if let Some(seq) = old_seq {
                state.log.remove(&seq);
            }
            let seq = state.next_seq;
            state.next_seq += 1;
            state.log.insert(seq, id.to_owned());
            if let Some(entry) = state.events.get_mut(id) {
                entry.seq = Some(seq);
            }
            for group in state.groups.values_mut() {
                group.counts.remove(id);
                group.wake.notify_waiters();
            }
            event
        };
        self.inner.notify_change(event, false);
        Ok(())
    }

    async fn consume(&self, options: ConsumerOptions) -> Result<Arc<dyn Consumer>, ProviderError> {
        self.inner.check_open()?;
        let (id, wake) = {
            let mut state = self.inner.lock();
            let start = state.log.keys().next().copied().unwrap_or(state.next_seq);
            let wake = state
                .groups
                .entry(options.group.clone())
                .or_insert_with(|| Group::new(start))
                .wake
                .clone();
            let id = state.next_token;
            state.next_token += 1;
            (id, wake)
        };
        self.inner
            .counters
            .consumers
            .fetch_add(1, Ordering::Relaxed);
        Ok(Arc::new(MemoryConsumer {
            provider: self.inner.clone(),
            id,
            group: options.group,
            lease: options.lease,
            wake,
            closed: AtomicBool::new(false),
            close_signal: Notify::new(),
        }))
    }

    async fn stream(&self, pattern: &Pattern) -> Result<EventStream, ProviderError> {
        self.inner.check_open()?;
        let pattern = pattern.clone();
        let receiver = self.inner.watchers.subscribe();
        let stream = BroadcastStream::new(receiver)
            .filter_map(move |item| {
                let item = match item {
                    Ok(event) if pattern.matches(&event.event_type) => Some(Ok(event)),
                    Ok(_) => None,
                    Err(BroadcastStreamRecvError::Lagged(missed)) => {
                        Some(Err(ProviderError::Lagged(missed)))
                    }
                };
                futures::future::ready(item)
            })
            .scan(false, |ended, item| {
                // End the stream right after a lag report: the watcher must reconnect.
                if *ended {
                    return futures::future::ready(None);
                }
                *ended = item.is_err();
                futures::future::ready(Some(item))
            })
            .take_until(self.inner.shutdown.clone().cancelled_owned());
        Ok(super::watch_buffer::bounded(
            Box::pin(stream),
            self.inner.options.watcher_buffer,
        ))
    }

    async fn ping(&self) -> Result<(), ProviderError> {
        self.inner.check_open()
    }

    async fn stats(&self) -> Result<ProviderStats, ProviderError> {
        let mut stats = ProviderStats::empty(NAME);
        {
            let state = self.inner.lock();
            for entry in state.events.values() {
                *stats
                    .by_status
                    .entry(entry.event.status.as_str().into())
                    .or_default() += 1;
            }
            stats
                .backend
                .insert("stored".into(), state.events.len().into());
            stats
                .backend
                .insert("max_events".into(), self.inner.options.max_events.into());
            for (name, group) in &state.groups {
                let backlog = state.log.range(group.cursor..).count() + group.redeliver.len();
                stats
                    .backend
                    .insert(format!("group.{name}.backlog"), backlog.into());
                stats
                    .backend
                    .insert(format!("group.{name}.leased"), group.leased.len().into());
            }
        }
        let counters = &self.inner.counters;
        stats.published = counters.published.load(Ordering::Relaxed);
        stats.consumed = counters.consumed.load(Ordering::Relaxed);
        stats.acknowledged = counters.acknowledged.load(Ordering::Relaxed);
        stats.redelivered = counters.redelivered.load(Ordering::Relaxed);
        stats.consumers = counters.consumers.load(Ordering::Relaxed);
        stats.subscribers = self.inner.watchers.receiver_count() as u64;
        Ok(stats)
    }

    async fn close(&self) {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let state = self.inner.lock();
        for group in state.groups.values() {
            group.wake.notify_waiters();
        }
        drop(state);
        self.inner.room.notify_waiters();
        self.inner.shutdown.cancel();
    }
}

/// A consumer of one group of a [`MemoryProvider`].
struct MemoryConsumer {
    provider: Arc<Inner>,
    id: u64,
    group: String,
    lease: Duration,
    wake: Arc<Notify>,
    closed: AtomicBool,
    close_signal: Notify,
}

impl MemoryConsumer {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire) || self.provider.closed.load(Ordering::Acquire)
    }

    /// Takes up to `max` deliveries; also returns when the next timed redelivery or lease
    /// expiry is due, so the caller can sleep until then.
    fn take(&self, max: usize) -> (Vec<Delivery>, Option<Instant>) {
        let now = Instant::now();
        let mut state = self.provider.lock();
        let State {
            events,
            log,
            groups,
            next_token,
            ..
        } = &mut *state;
        let Some(group) = groups.get_mut(&self.group) else {
            return (Vec::new(), None);
        };
        State::expire_leases(group, now);
        let mut out = Vec::new();
        let mut lease = |group: &mut Group, id: String, seq: u64, count: u32, event: &Event| {
            let token = *next_token;
            *next_token += 1;
            group.leased.insert(
                token,
                Lease {
                    id,
                    seq,
                    consumer: self.id,
                    deadline: now + self.lease,
                    lease: self.lease,
                    count,
                },
            );
            Delivery {
                event: event.clone(),
                token: token.to_string(),
                delivery_count: count,
            }
        };
        while out.len() < max {
            match group.redeliver.peek() {
                Some(Reverse((due, ..))) if *due <= now => {}
                _ => break,
            }
            let Some(Reverse((_, seq, id, count))) = group.redeliver.pop() else {
                break;
            };
            // Skip events deleted or requeued (new log position) meanwhile.
            let Some(entry) = events.get(&id).filter(|e| e.seq == Some(seq)) else {
                continue;
            };
            let delivery = lease(group, id, seq, count + 1, &entry.event);
            group.counts.insert(entry.event.id.clone(), count + 1);
            out.push(delivery);
        }
        while out.len() < max {
            let Some((&seq, id)) = log.range(group.cursor..).next() else {
                break;
            };
            group.cursor = seq + 1;
            let Some(entry) = events.get(id) else {
                continue;
            };
            if entry.event.status.is_finished() {
                continue;
            }
            let count = group.counts.get(id).copied().unwrap_or(0) + 1;
            group.counts.insert(id.clone(), count);
            let delivery = lease(group, id.clone(), seq, count, &entry.event);
            out.push(delivery);
        }
        let next_due = group
            .redeliver
            .peek()
            .map(|Reverse((due, ..))| *due)
            .into_iter()
            .chain(group.leased.values().map(|lease| lease.deadline))
            .min();
        (out, next_due)
    }

    /// Closes this consumer once: wakes a pending fetch and returns every delivery it still
    /// holds to its group for immediate redelivery.
    fn hand_back(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.close_signal.notify_waiters();
        let now = Instant::now();
        let mut state = self.provider.lock();
        if let Some(group) = state.groups.get_mut(&self.group) {
            let mine: Vec<u64> = group
                .leased
                .iter()
                .filter(|(_, lease)| lease.consumer == self.id)
                .map(|(token, _)| *token)
                .collect();
            for token in mine {
                if let Some(lease) = group.leased.remove(&token) {
                    group
                        .redeliver
                        .push(Reverse((now, lease.seq, lease.id, lease.count)));
                }
            }
            group.wake.notify_waiters();
        }
        drop(state);
        self.provider
            .counters
            .consumers
            .fetch_sub(1, Ordering::Relaxed);
    }

    fn take_lease(&self, delivery: &Delivery) -> Result<Lease, ProviderError> {
        let token: u64 = delivery
            .token
            .parse()
            .map_err(|_| ProviderError::backend(NAME, "malformed delivery token"))?;
        let mut state = self.provider.lock();
        state
            .groups
            .get_mut(&self.group)
            .and_then(|group| group.leased.remove(&token))
            .ok_or_else(|| {
                ProviderError::backend(
                    NAME,
                    format!(
                        "delivery of event {} is no longer leased (its lease expired)",
                        delivery.event.id
                    ),
                )
            })
    }

    fn requeue_lease(&self, lease: Lease, due: Instant) {
        let mut state = self.provider.lock();
        if let Some(group) = state.groups.get_mut(&self.group) {
            group
                .redeliver
                .push(Reverse((due, lease.seq, lease.id, lease.count)));
            group.wake.notify_waiters();
        }
        self.provider
            .counters
            .redelivered
            .fetch_add(1, Ordering::Relaxed);
    }
}

#[async_trait]
impl Consumer for MemoryConsumer {
    async fn fetch(&self, max: usize) -> Result<Vec<Delivery>, ProviderError> {
        let max = max.max(1);
        loop {
            if self.is_closed() {
                return Ok(Vec::new());
            }
            let woken = self.wake.notified();
            let closing = self.close_signal.notified();
            tokio::pin!(woken, closing);
            woken.as_mut().enable();
            closing.as_mut().enable();
            if self.is_closed() {
                return Ok(Vec::new());
            }
            let (batch, next_due) = self.take(max);
            if !batch.is_empty() {
                self.provider
                    .counters
                    .consumed
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                return Ok(batch);
            }
            let timer = async {
                match next_due {
                    Some(due) => tokio::time::sleep_until(due).await,
                    None => futures::future::pending().await,
                }
            };
            tokio::select! {
                _ = woken => {}
                _ = closing => {}
                _ = timer => {}
            }
        }
    }

    async fn complete(
        &self,
        delivery: &Delivery,
        update: &StatusUpdate,
    ) -> Result<(), ProviderError> {
        let lease = self.take_lease(delivery)?;
        let event = {
            let mut state = self.provider.lock();
            if let Some(group) = state.groups.get_mut(&self.group) {
                group.counts.remove(&lease.id);
            }
            Inner::apply(&mut state, &lease.id, update)?
        };
        self.provider
            .counters
            .acknowledged
            .fetch_add(1, Ordering::Relaxed);
        self.provider
            .notify_change(event, update.status.is_finished());
        Ok(())
    }

    async fn retry(
        &self,
        delivery: &Delivery,
        update: &StatusUpdate,
        delay: Duration,
    ) -> Result<(), ProviderError> {
        let lease = self.take_lease(delivery)?;
        let event = Inner::apply(&mut self.provider.lock(), &lease.id, update)?;
        self.requeue_lease(lease, Instant::now() + delay);
        self.provider.notify_change(event, false);
        Ok(())
    }

    async fn release(&self, delivery: &Delivery) -> Result<(), ProviderError> {
        let mut lease = self.take_lease(delivery)?;
        // A released delivery was not attempted: do not count it.
        lease.count = lease.count.saturating_sub(1);
        let event = {
            let mut state = self.provider.lock();
            let current = state
                .events
                .get(&lease.id)
                .map(|entry| entry.event.clone())
                .ok_or_else(|| ProviderError::NotFound(lease.id.clone()))?;
            let update = StatusUpdate {
                status: EventStatus::Pending,
                error: current.error,
                retry_count: current.retry_count,
                handlers: current.handlers,
                processed_at: current.processed_at,
                completed_at: None,
            };
            Inner::apply(&mut state, &lease.id, &update)?
        };
        self.requeue_lease(lease, Instant::now());
        self.provider.notify_change(event, false);
        Ok(())
    }

    async fn keep_alive(&self, delivery: &Delivery) -> Result<(), ProviderError> {
        let token: u64 = delivery
            .token
            .parse()
            .map_err(|_| ProviderError::backend(NAME, "malformed delivery token"))?;
        let mut state = self.provider.lock();
        let lease = state
            .groups
            .get_mut(&self.group)
            .and_then(|group| group.leased.get_mut(&token))
            .ok_or_else(|| ProviderError::backend(NAME, "delivery is no longer leased"))?;
        lease.deadline = Instant::now() + lease.lease;
        Ok(())
    }

    async fn close(&self) {
        self.hand_back();
    }
}

impl Drop for MemoryConsumer {
    fn drop(&mut self) {
        self.hand_back();
    }
}
