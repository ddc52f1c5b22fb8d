//! The embedded in-memory provider: the default, for a single host.
//!
//! - Bounded: at most `max_events` stored. When full, the least recently used *settled* event
//!   (finished by every consumer group that exists) is evicted; other events are never
//!   evicted: a publish that would need to evict one waits up to `publish_timeout` for room and
//!   then fails with [`ProviderError::Full`]. At most `max_pending` events may be unsettled at
//!   once (the broker's `buffer_size`), with the same wait-then-fail rule.
//! - A cleanup task removes settled events older than `max_age`.
//! - Consumer groups share work with leases: a delivery not acknowledged within its lease is
//!   redelivered, and a dropped or closed consumer's deliveries are redelivered at once. Each
//!   group keeps its own processing state of each event; the provider's own group (from
//!   `event_broker.consumer_group`) exists from the start, and a group created later starts at
//!   the oldest event still stored, so it receives every retained event.
//! - Watchers get a bounded buffer; one that falls behind gets [`ProviderError::Lagged`].
//!
//! Nothing survives the process: the provider is not durable.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use lru::LruCache;
use parking_lot::{Mutex, MutexGuard};
use tokio::sync::{Notify, broadcast};
use tokio::time::Instant;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_util::sync::CancellationToken;

use super::{
    Consumer, ConsumerOptions, Counters, Delivery, EventFilter, EventStream, GroupState, Provider,
    ProviderError, ProviderFeatures, ProviderStats, SortOrder, StatusUpdate,
};
use crate::config::BrokerConfig;
use crate::event::{Event, EventStatus};
use crate::pattern::Pattern;

const NAME: &str = "memory";

/// The provider's maps, keyed by event ids and group names: foldhash (hashbrown's default,
/// seeded per process) hashes an id several times faster than the standard SipHash, and
/// every event is looked up in several maps.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// An event id as the provider's maps, indexes and leases hold it: one allocation per stored
/// event, shared by every structure that refers to it.
type Id = Arc<str>;

/// What the provider takes from its [`BrokerConfig`] (the `memory` section, `buffer_size`,
/// `publish_timeout` and `consumer_group`).
#[derive(Debug, Clone)]
struct Settings {
    /// Most events stored at once (settled ones are evicted to make room).
    max_events: usize,
    /// Most unsettled events (not yet finished by every consumer group) at once.
    max_pending: usize,
    /// How long a publish waits for room before failing with [`ProviderError::Full`].
    publish_timeout: Duration,
    /// Settled events older than this are removed by the cleanup task.
    max_age: Duration,
    /// How often the cleanup task runs.
    cleanup_interval: Duration,
    /// Events buffered per watcher before it is cut off as lagging.
    watcher_buffer: usize,
    /// The provider's own consumer group ([`Provider::group`]); it exists from the start.
    group: String,
}

impl Settings {
    fn of(config: &BrokerConfig) -> Self {
        // `BrokerConfig::validate` rejects zeros; a config built in code that skipped it
        // still gets a working provider rather than a panic in `broadcast::channel`.
        Settings {
            max_events: config.memory.max_events.max(1),
            max_pending: config.buffer_size.max(1),
            publish_timeout: config.publish_timeout,
            max_age: config.memory.max_age,
            cleanup_interval: config.memory.cleanup_interval.max(Duration::from_millis(1)),
            watcher_buffer: config.memory.watcher_buffer.max(1),
            group: config.consumer_group.clone(),
        }
    }
}

/// The in-memory provider. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct MemoryProvider {
    inner: Arc<Inner>,
    /// The own group of this handle.
    group: Arc<str>,
}

struct Inner {
    options: Settings,
    state: Mutex<State>,
    /// Signalled whenever room may have appeared (an event settled or was removed).
    room: Notify,
    watchers: broadcast::Sender<Change>,
    closed: AtomicBool,
    /// Cancelled by `close`: ends watcher streams.
    shutdown: CancellationToken,
    counters: Counters,
    /// Handlers' key-value state, shared by every group's handle.
    keyvalue: crate::keyvalue::MemoryKeyValue,
}

/// What watchers receive: an event as stored (`group: None`) or after a change of one
/// group's state (in that group's state).
#[derive(Clone)]
struct Change {
    group: Option<Arc<str>>,
    event: Event,
}

struct Entry {
    /// The event as stored; its state fields are the state a group starts from.
    event: Event,
    /// Position in the delivery log, for published (not merely stored) events.
    seq: Option<u64>,
    /// The states of the groups that changed it.
    states: HashMap<String, GroupState>,
    /// Every group is done with it (it may be evicted).
    settled: bool,
}

impl Entry {
    fn state(&self, group: &str) -> GroupState {
        self.states
            .get(group)
            .cloned()
            .unwrap_or_else(|| GroupState::of(&self.event))
    }

    /// The group's status, without copying its state.
    fn status(&self, group: &str) -> EventStatus {
        self.states
            .get(group)
            .map_or(self.event.status, |state| state.status)
    }

    /// The group's own state, created from the stored one on its first change.
    fn state_mut(&mut self, group: &str) -> &mut GroupState {
        if !self.states.contains_key(group) {
            let initial = GroupState::of(&self.event);
            self.states.insert(group.to_owned(), initial);
        }
        self.states
            .get_mut(group)
            .expect("the group's state was just ensured")
    }

    /// Whether the event as `group` sees it passes `filter`, without copying it.
    fn matches(&self, group: &str, filter: &EventFilter) -> bool {
        match self.states.get(group) {
            Some(state) => filter.matches_in(&self.event, state.status, &state.handlers),
            None => filter.matches(&self.event),
        }
    }

    fn view(&self, group: &str) -> Event {
        match self.states.get(group) {
            Some(state) => state.view(&self.event),
            None => self.event.clone(),
        }
    }

    fn finished_in(&self, group: &str) -> bool {
        self.states
            .get(group)
            .map_or(self.event.status.is_finished(), GroupState::is_finished)
    }

    /// Whether every group is done with it: each state recorded is finished, and each other
    /// existing group either never receives it (only stored) or starts from a finished state.
    fn is_settled(&self, groups: &HashMap<String, Group>) -> bool {
        self.states.values().all(GroupState::is_finished)
            && groups.keys().all(|group| {
                self.states.contains_key(group)
                    || self.seq.is_none()
                    || self.event.status.is_finished()
            })
    }

    /// When the last group finished it (its creation time if none recorded one).
    fn finished_at(&self) -> DateTime<Utc> {
        self.states
            .values()
            .filter_map(|state| state.completed_at)
            .chain(self.event.completed_at)
            .max()
            .unwrap_or(self.event.created_at)
    }
}

struct State {
    events: HashMap<Id, Entry>,
    /// Every stored event by (creation time, id): `list` walks it in the page's order and
    /// stops once the page is full, instead of sorting every stored event.
    by_time: BTreeSet<(DateTime<Utc>, Id)>,
    /// Settled events, least recently used first.
    settled: LruCache<Id, ()>,
    unsettled: usize,
    /// Delivery log: sequence number to event id, in publish order.
    log: BTreeMap<u64, Id>,
    next_seq: u64,
    groups: HashMap<String, Group>,
    next_token: u64,
}

struct Group {
    /// Next log position to hand out.
    cursor: u64,
    /// Deliveries to repeat, earliest due first.
    redeliver: BinaryHeap<Reverse<Redelivery>>,
    /// The ticket of each event's one valid entry in `redeliver` (older ones are skipped).
    queued: HashMap<Id, u64>,
    next_ticket: u64,
    /// Deliveries out with consumers, by token.
    leased: HashMap<u64, Lease>,
    /// Delivery counts of events handed out at least once.
    counts: HashMap<Id, u32>,
    wake: Arc<Notify>,
}

/// A queued (re)delivery: (due, seq, id, deliveries so far, ticket).
type Redelivery = (Instant, u64, Id, u32, u64);

struct Lease {
    id: Id,
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
            queued: HashMap::default(),
            next_ticket: 1,
            leased: HashMap::default(),
            counts: HashMap::default(),
            wake: Arc::new(Notify::new()),
        }
    }

    /// Queues a (re)delivery of `id` due at `due`, replacing any queued before.
    fn schedule(&mut self, due: Instant, seq: u64, id: Id, count: u32) {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.queued.insert(id.clone(), ticket);
        self.redeliver.push(Reverse((due, seq, id, count, ticket)));
    }

    /// Whether a consumer holds a lease on `id` that has not expired.
    fn is_leased(&self, id: &str, now: Instant) -> bool {
        self.leased
            .values()
            .any(|lease| &*lease.id == id && lease.deadline > now)
    }
}

impl Default for MemoryProvider {
    /// A provider with the default [`BrokerConfig`].
    fn default() -> Self {
        MemoryProvider::new(&BrokerConfig::default())
    }
}

impl MemoryProvider {
    /// A new, empty provider configured by `config`: it keeps at most
    /// `config.memory.max_events` events and `config.buffer_size` unfinished ones, and its own
    /// group (`config.consumer_group`) exists from the start. Inside a tokio runtime it also
    /// starts the cleanup task, which stops when the provider is closed or dropped.
    pub fn new(config: &BrokerConfig) -> Self {
        let options = Settings::of(config);
        let (watchers, _) = broadcast::channel(options.watcher_buffer.max(1));
        let group: Arc<str> = Arc::from(options.group.as_str());
        let mut groups = HashMap::default();
        groups.insert(options.group.clone(), Group::new(1));
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                events: HashMap::default(),
                by_time: BTreeSet::new(),
                settled: LruCache::unbounded(),
                unsettled: 0,
                log: BTreeMap::new(),
                next_seq: 1,
                groups,
                next_token: 1,
            }),
            room: Notify::new(),
            watchers,
            closed: AtomicBool::new(false),
            shutdown: CancellationToken::new(),
            counters: Counters::default(),
            keyvalue: crate::keyvalue::MemoryKeyValue::new(),
            options,
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(cleanup_loop(Arc::downgrade(&inner)));
        }
        MemoryProvider { inner, group }
    }

    /// A handle on the same storage whose own group is `group`: what a host configured with
    /// that group sees (`get`, `list`, `stats`, `requeue`, watchers). The group is created
    /// when one of its consumers joins. Closing any handle closes the storage.
    pub fn in_group(&self, group: &str) -> MemoryProvider {
        MemoryProvider {
            inner: self.inner.clone(),
            group: Arc::from(group),
        }
    }

    /// Removes settled events older than `max_age`; returns how many were removed.
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
            tracing::debug!(removed, "memory provider removed expired settled events");
        }
    }
}

impl Inner {
    /// The state lock. Every publisher, reader and worker takes it for a few microseconds;
    /// `parking_lot`'s lock spins briefly before it parks a thread, which under that load
    /// costs far less than putting the thread to sleep and waking it (a panic while holding
    /// it leaves nothing that matters more than stopping the host, so it does not poison).
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock()
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
        let expired: Vec<Id> = state
            .events
            .iter()
            .filter(|(_, entry)| entry.settled && entry.finished_at() < cutoff)
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
    async fn insert(&self, event: &Event, deliver: bool, group: &str) -> Result<(), ProviderError> {
        self.check_open()?;
        // The common case, room at once, registers for no wake-up: that would take the
        // `room` lock twice per publish, against every worker that frees room.
        match self.try_insert(event, deliver, group) {
            Ok(()) => return Ok(()),
            Err(InsertError::Provider(error)) => return Err(error),
            Err(InsertError::NoRoom(_)) => {}
        }
        let deadline = Instant::now() + self.options.publish_timeout;
        loop {
            self.check_open()?;
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.try_insert(event, deliver, group) {
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

    /// Inserts an event; its own state becomes the state of the inserting handle's `group`.
    fn try_insert(&self, event: &Event, deliver: bool, group: &str) -> Result<(), InsertError> {
        // Built before taking the lock: cloning an event allocates, and every publisher,
        // reader and worker waits on this lock.
        let mut entry = Entry {
            event: event.clone(),
            seq: None,
            states: HashMap::from_iter([(group.to_owned(), GroupState::of(event))]),
            settled: false,
        };
        let id: Id = Arc::from(event.id.as_str());
        let mut state = self.lock();
        if state.events.contains_key(event.id.as_str()) {
            drop(state);
            return Err(InsertError::Provider(ProviderError::Duplicate(
                id.to_string(),
            )));
        }
        entry.seq = deliver.then_some(state.next_seq);
        entry.settled = entry.is_settled(&state.groups);
        if !entry.settled && state.unsettled >= self.options.max_pending {
            return Err(InsertError::NoRoom(format!(
                "{} unfinished events, the limit (buffer_size) is {}",
                state.unsettled, self.options.max_pending
            )));
        }
        while state.events.len() >= self.options.max_events {
            let Some((oldest, ())) = state.settled.pop_lru() else {
                return Err(InsertError::NoRoom(format!(
                    "{} events stored and none finished by every group to evict (max_events {})",
                    state.events.len(),
                    self.options.max_events
                )));
            };
            state.remove(&oldest);
        }
        if let Some(seq) = entry.seq {
            state.next_seq += 1;
            state.log.insert(seq, id.clone());
        }
        if entry.settled {
            state.settled.put(id.clone(), ());
        } else {
            state.unsettled += 1;
        }
        state.by_time.insert((event.created_at, id.clone()));
        state.events.insert(id, entry);
        if deliver {
            for group in state.groups.values() {
                group.wake.notify_waiters();
            }
        }
        drop(state);
        if self.watching() {
            let _ = self.watchers.send(Change {
                group: None,
                event: event.clone(),
            });
        }
        Ok(())
    }

    /// Whether any watcher is subscribed: changes are only rendered for watchers when one is.
    fn watching(&self) -> bool {
        self.watchers.receiver_count() > 0
    }

    /// Applies `change` to the state of `group` of a stored event, keeping the settled count
    /// and LRU right. Returns the event in the group's new state when a watcher listens (for
    /// [`Inner::notify_change`]), and whether it settled.
    fn change(
        &self,
        state: &mut State,
        id: &str,
        group: &str,
        change: impl FnOnce(&mut GroupState),
    ) -> Result<(Option<Event>, bool), ProviderError> {
        let entry = state
            .events
            .get_mut(id)
            .ok_or_else(|| ProviderError::NotFound(id.to_owned()))?;
        change(entry.state_mut(group));
        let event = self.watching().then(|| entry.view(group));
        let settled = state.resettle(id);
        Ok((event, settled))
    }

    fn notify_change(&self, group: &str, event: Option<Event>, settled: bool) {
        if settled {
            // One event settled: room for one publisher. Waking every waiting publisher
            // made them all fight for the lock under load, and all but one wait again.
            self.room.notify_one();
        }
        if let Some(event) = event {
            let _ = self.watchers.send(Change {
                group: Some(Arc::from(group)),
                event,
            });
        }
    }
}

enum InsertError {
    Provider(ProviderError),
    NoRoom(String),
}

impl State {
    fn remove(&mut self, id: &str) -> Option<Event> {
        let (key, entry) = self.events.remove_entry(id)?;
        self.by_time.remove(&(entry.event.created_at, key));
        if entry.settled {
            self.settled.pop(id);
        } else {
            self.unsettled -= 1;
        }
        if let Some(seq) = entry.seq {
            self.log.remove(&seq);
        }
        for group in self.groups.values_mut() {
            group.counts.remove(id);
            group.queued.remove(id);
        }
        Some(entry.event)
    }

    /// Recomputes whether an event is settled; returns whether it is.
    fn resettle(&mut self, id: &str) -> bool {
        let Some(entry) = self.events.get_mut(id) else {
            return false;
        };
        let settled = entry.is_settled(&self.groups);
        if settled != entry.settled {
            entry.settled = settled;
            if settled {
                self.unsettled -= 1;
                if let Some((key, _)) = self.events.get_key_value(id) {
                    self.settled.put(key.clone(), ());
                }
            } else {
                self.unsettled += 1;
                self.settled.pop(id);
            }
        }
        settled
    }

    /// Creates `group` unless it exists. A new group starts at the oldest event still in the
    /// log, so it receives every retained event; those are unsettled again until it is done.
    fn ensure_group(&mut self, group: &str) -> Arc<Notify> {
        if let Some(existing) = self.groups.get(group) {
            return existing.wake.clone();
        }
        let start = self.log.keys().next().copied().unwrap_or(self.next_seq);
        let created = Group::new(start);
        let wake = created.wake.clone();
        self.groups.insert(group.to_owned(), created);
        let ids: Vec<Id> = self.events.keys().cloned().collect();
        for id in ids {
            self.resettle(&id);
        }
        wake
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
                group.schedule(now, lease.seq, lease.id, lease.count);
            }
        }
    }
}

#[async_trait]
impl Provider for MemoryProvider {
    fn name(&self) -> &'static str {
        NAME
    }

    fn group(&self) -> &str {
        &self.group
    }

    fn features(&self) -> ProviderFeatures {
        ProviderFeatures {
            durable: false,
            shared: false,
            consumer_groups: true,
            ordered: true,
        }
    }

    async fn publish(&self, event: &Event) -> Result<(), ProviderError> {
        self.inner.insert(event, true, &self.group).await?;
        self.inner.counters.published();
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<Option<Event>, ProviderError> {
        let mut state = self.inner.lock();
        let Some(entry) = state.events.get(id) else {
            return Ok(None);
        };
        let event = entry.view(&self.group);
        if entry.settled {
            state.settled.promote(id);
        }
        Ok(Some(event))
    }

    async fn list(&self, filter: &EventFilter) -> Result<Vec<Event>, ProviderError> {
        let state = self.inner.lock();
        let in_order: Box<dyn Iterator<Item = &(DateTime<Utc>, Id)>> = match filter.order {
            SortOrder::Desc => Box::new(state.by_time.iter().rev()),
            SortOrder::Asc => Box::new(state.by_time.iter()),
        };
        // Walked in the page's order (creation time, then id): the first `offset + limit`
        // matches are the page and what it skips; only those are copied.
        Ok(in_order
            .filter_map(|(_, id)| state.events.get(id))
            .filter(|entry| entry.matches(&self.group, filter))
            .skip(filter.offset)
            .take(filter.effective_limit())
            .map(|entry| entry.view(&self.group))
            .collect())
    }

    async fn update_status(&self, id: &str, update: &StatusUpdate) -> Result<(), ProviderError> {
        self.inner.check_open()?;
        let (event, settled) = self
            .inner
            .change(&mut self.inner.lock(), id, &self.group, |s| s.apply(update))?;
        self.inner.notify_change(&self.group, event, settled);
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
        let now = Instant::now();
        let group = &*self.group;
        let (event, settled) = {
            let mut state = self.inner.lock();
            state.ensure_group(group);
            let (key, entry) = state
                .events
                .get_key_value(id)
                .ok_or_else(|| ProviderError::NotFound(id.to_owned()))?;
            let key = key.clone();
            let current = entry.state(group);
            let seq = entry.seq;
            let Some(queue) = state.groups.get_mut(group) else {
                return Err(ProviderError::NotFound(id.to_owned()));
            };
            if queue.is_leased(id, now) {
                return Err(ProviderError::InvalidState {
                    id: id.to_owned(),
                    status: current.status,
                    reason: "a consumer of the group holds a live lease on it; retry it once \
                             it finished or its lease expired",
                });
            }
            // Revoke expired leases: their holders can no longer acknowledge.
            queue.leased.retain(|_, lease| &*lease.id != id);
            queue.counts.remove(id);
            if seq.is_some_and(|seq| seq >= queue.cursor) {
                // Not handed out yet: it is deliverable as it is.
                queue.queued.remove(id);
            } else {
                queue.schedule(now, seq.unwrap_or(0), key, 0);
            }
            queue.wake.notify_waiters();
            self.inner
                .change(&mut state, id, group, |s| s.apply(update))?
        };
        self.inner.notify_change(group, event, settled);
        Ok(())
    }

    async fn consume(&self, options: ConsumerOptions) -> Result<Arc<dyn Consumer>, ProviderError> {
        self.inner.check_open()?;
        let (id, wake) = {
            let mut state = self.inner.lock();
            let wake = state.ensure_group(&options.group);
            let id = state.next_token;
            state.next_token += 1;
            (id, wake)
        };
        self.inner.counters.consumer_opened();
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
        let own = self.group.clone();
        let receiver = self.inner.watchers.subscribe();
        let stream = BroadcastStream::new(receiver)
            .filter_map(move |item| {
                let item = match item {
                    Ok(Change { group, event })
                        if pattern.matches(&event.event_type)
                            && group.as_ref().is_none_or(|group| *group == own) =>
                    {
                        Some(Ok(event))
                    }
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
            // Counted without copying any state: this scans every stored event.
            let mut counts = [0u64; EventStatus::ALL.len()];
            for entry in state.events.values() {
                let status = entry.status(&self.group);
                if let Some(slot) = EventStatus::ALL.iter().position(|s| *s == status) {
                    counts[slot] += 1;
                }
            }
            for (status, count) in EventStatus::ALL.iter().zip(counts) {
                *stats.by_status.entry(status.as_str().into()).or_default() += count;
            }
            stats
                .backend
                .insert("stored".into(), state.events.len().into());
            stats
                .backend
                .insert("unsettled".into(), state.unsettled.into());
            stats
                .backend
                .insert("max_events".into(), self.inner.options.max_events.into());
            for (name, group) in &state.groups {
                let backlog = state.log.range(group.cursor..).count() + group.queued.len();
                stats
                    .backend
                    .insert(format!("group.{name}.backlog"), backlog.into());
                stats
                    .backend
                    .insert(format!("group.{name}.leased"), group.leased.len().into());
            }
        }
        self.inner.counters.fill(&mut stats);
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

    /// The in-process store ([`crate::keyvalue::MemoryKeyValue`]), shared by every handle on
    /// this storage; its contents end with the process.
    fn keyvalue(&self) -> Option<Arc<dyn crate::keyvalue::KeyValueStore>> {
        Some(Arc::new(self.inner.keyvalue.clone()))
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

    /// Takes up to `max` deliveries, recording `processing` for each in the same step; also
    /// returns when the next timed redelivery or lease expiry is due, so the caller can sleep
    /// until then, and the changed events for watchers (only when some watcher listens).
    fn take(&self, max: usize) -> (Vec<Delivery>, Option<Instant>, Vec<Event>) {
        let now = Instant::now();
        let started_at = Utc::now();
        let render = self.provider.watching();
        let mut changes = Vec::new();
        let mut state = self.provider.lock();
        let State {
            events,
            log,
            groups,
            next_token,
            ..
        } = &mut *state;
        let Some(group) = groups.get_mut(&self.group) else {
            return (Vec::new(), None, Vec::new());
        };
        State::expire_leases(group, now);
        let mut out = Vec::new();
        // Leases the delivery and, unless the group already finished the event, records
        // `processing` in the same step (the claim is the mark).
        let mut lease = |group: &mut Group, id: Id, seq: u64, count: u32, entry: &mut Entry| {
            let token = *next_token;
            *next_token += 1;
            let processing_recorded = !entry.finished_in(&self.group);
            if processing_recorded {
                entry.state_mut(&self.group).claim(started_at);
            }
            let event = entry.view(&self.group);
            if render && processing_recorded {
                changes.push(event.clone());
            }
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
                event,
                token: token.to_string(),
                delivery_count: count,
                processing_recorded,
            }
        };
        while out.len() < max {
            match group.redeliver.peek() {
                Some(Reverse((due, ..))) if *due <= now => {}
                _ => break,
            }
            let Some(Reverse((_, seq, id, count, ticket))) = group.redeliver.pop() else {
                break;
            };
            // Skip entries replaced by a later one (a requeue) and deleted events.
            if group.queued.get(&id) != Some(&ticket) {
                continue;
            }
            group.queued.remove(&id);
            let Some(entry) = events.get_mut(&id) else {
                continue;
            };
            group.counts.insert(id.clone(), count + 1);
            let delivery = lease(group, id, seq, count + 1, entry);
            out.push(delivery);
        }
        while out.len() < max {
            let Some((&seq, id)) = log.range(group.cursor..).next() else {
                break;
            };
            group.cursor = seq + 1;
            let Some(entry) = events.get_mut(id) else {
                continue;
            };
            if entry.finished_in(&self.group) {
                continue;
            }
            let count = group.counts.get(id).copied().unwrap_or(0) + 1;
            group.counts.insert(id.clone(), count);
            let delivery = lease(group, id.clone(), seq, count, entry);
            out.push(delivery);
        }
        let next_due = group
            .redeliver
            .peek()
            .map(|Reverse((due, ..))| *due)
            .into_iter()
            .chain(group.leased.values().map(|lease| lease.deadline))
            .min();
        (out, next_due, changes)
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
                    group.schedule(now, lease.seq, lease.id, lease.count);
                }
            }
            group.wake.notify_waiters();
        }
        drop(state);
        self.provider.counters.consumer_closed();
    }

    /// [`MemoryConsumer::take`], with its changes sent to watchers and its deliveries counted.
    fn take_batch(&self, max: usize) -> (Vec<Delivery>, Option<Instant>) {
        let (batch, next_due, changes) = self.take(max);
        for event in changes {
            self.provider.notify_change(&self.group, Some(event), false);
        }
        if !batch.is_empty() {
            self.provider.counters.delivered(batch.len());
        }
        (batch, next_due)
    }

    fn take_lease(&self, delivery: &Delivery) -> Result<Lease, ProviderError> {
        self.take_lease_in(&mut self.provider.lock(), delivery)
    }

    /// Removes the lease of `delivery` from the group, under the caller's lock.
    fn take_lease_in(
        &self,
        state: &mut State,
        delivery: &Delivery,
    ) -> Result<Lease, ProviderError> {
        let token: u64 = delivery
            .token
            .parse()
            .map_err(|_| ProviderError::backend(NAME, "malformed delivery token"))?;
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

    /// Acknowledges `delivery` and records its final state, under the caller's lock; returns
    /// what [`Inner::notify_change`] needs.
    fn complete_in(
        &self,
        state: &mut State,
        delivery: &Delivery,
        update: &StatusUpdate,
    ) -> Result<(Option<Event>, bool), ProviderError> {
        let lease = self.take_lease_in(state, delivery)?;
        if let Some(group) = state.groups.get_mut(&self.group) {
            group.counts.remove(&lease.id);
        }
        self.provider
            .change(state, &lease.id, &self.group, |s| s.apply(update))
    }

    fn requeue_lease(&self, lease: Lease, due: Instant) {
        let mut state = self.provider.lock();
        if let Some(group) = state.groups.get_mut(&self.group) {
            group.schedule(due, lease.seq, lease.id, lease.count);
            group.wake.notify_waiters();
        }
        self.provider.counters.redelivered();
    }
}

#[async_trait]
impl Consumer for MemoryConsumer {
    async fn fetch(&self, max: usize) -> Result<Vec<Delivery>, ProviderError> {
        let max = max.max(1);
        if self.is_closed() {
            return Ok(Vec::new());
        }
        // Under load deliveries are waiting: take them without registering for a wake-up
        // (registering takes the group's wake-up lock, which every publish also takes).
        let (batch, _) = self.take_batch(max);
        if !batch.is_empty() {
            return Ok(batch);
        }
        loop {
            let woken = self.wake.notified();
            let closing = self.close_signal.notified();
            tokio::pin!(woken, closing);
            woken.as_mut().enable();
            closing.as_mut().enable();
            if self.is_closed() {
                return Ok(Vec::new());
            }
            let (batch, next_due) = self.take_batch(max);
            if !batch.is_empty() {
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
            if self.is_closed() {
                return Ok(Vec::new());
            }
        }
    }

    async fn complete(
        &self,
        delivery: &Delivery,
        update: &StatusUpdate,
    ) -> Result<(), ProviderError> {
        self.complete_batch(&[(delivery, update)])
            .await
            .pop()
            .unwrap_or_else(|| {
                Err(ProviderError::backend(
                    NAME,
                    "a batch of one gave no result",
                ))
            })
    }

    async fn complete_batch(
        &self,
        items: &[(&Delivery, &StatusUpdate)],
    ) -> Vec<Result<(), ProviderError>> {
        // One lock for the whole batch: each acknowledgement with its final state.
        let (results, changes): (Vec<_>, Vec<_>) = {
            let mut state = self.provider.lock();
            items
                .iter()
                .map(
                    |(delivery, update)| match self.complete_in(&mut state, delivery, update) {
                        Ok(change) => (Ok(()), Some(change)),
                        Err(error) => (Err(error), None),
                    },
                )
                .unzip()
        };
        for (event, settled) in changes.into_iter().flatten() {
            self.provider.counters.acknowledged();
            self.provider.notify_change(&self.group, event, settled);
        }
        results
    }

    async fn retry(
        &self,
        delivery: &Delivery,
        update: &StatusUpdate,
        delay: Duration,
    ) -> Result<(), ProviderError> {
        let lease = self.take_lease(delivery)?;
        let (event, settled) =
            self.provider
                .change(&mut self.provider.lock(), &lease.id, &self.group, |s| {
                    s.apply(update)
                })?;
        self.requeue_lease(lease, Instant::now() + delay);
        self.provider.notify_change(&self.group, event, settled);
        Ok(())
    }

    async fn release(&self, delivery: &Delivery) -> Result<(), ProviderError> {
        let mut lease = self.take_lease(delivery)?;
        // A released delivery was not attempted: do not count it.
        lease.count = lease.count.saturating_sub(1);
        let (event, settled) = self.provider.change(
            &mut self.provider.lock(),
            &lease.id,
            &self.group,
            GroupState::release,
        )?;
        self.requeue_lease(lease, Instant::now());
        self.provider.notify_change(&self.group, event, settled);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventSource, EventStatus};

    fn options(group: &str) -> ConsumerOptions {
        ConsumerOptions {
            group: group.into(),
            name: format!("{group}-consumer"),
            lease: Duration::from_secs(60),
        }
    }

    fn done() -> StatusUpdate {
        StatusUpdate {
            status: EventStatus::Completed,
            error: None,
            retry_count: 0,
            handlers: Vec::new(),
            processed_at: Some(Utc::now()),
            completed_at: Some(Utc::now()),
        }
    }

    /// `list` walks the creation-time index: events evicted, deleted or expired leave it with
    /// the events themselves (no stale entries, no growth), and pages come out in order.
    #[tokio::test]
    async fn the_list_index_follows_evictions_and_deletions() {
        let mut config = BrokerConfig {
            consumer_group: "a".into(),
            ..BrokerConfig::default()
        };
        config.memory.max_events = 5;
        let provider = MemoryProvider::new(&config);
        let consumer = provider.consume(options("a")).await.expect("consume");
        let mut published = Vec::new();
        for n in 0..12 {
            let mut event = Event::new(EventSource::System, "index.test", "h");
            // Out of creation order on purpose: the index, not publish order, decides.
            event.created_at += chrono::Duration::milliseconds((n * 7) % 5);
            provider.publish(&event).await.expect("publish");
            published.push(event);
            for delivery in consumer.fetch(8).await.expect("fetch") {
                consumer
                    .complete(&delivery, &done())
                    .await
                    .expect("complete");
            }
        }
        assert!(provider.delete(&published[11].id).await.expect("delete"));
        let mut expected: Vec<(DateTime<Utc>, String)> = {
            let state = provider.inner.lock();
            assert_eq!(state.by_time.len(), state.events.len());
            assert!(state.by_time.iter().all(|(at, id)| {
                state
                    .events
                    .get(id)
                    .is_some_and(|e| e.event.created_at == *at)
            }));
            state
                .by_time
                .iter()
                .map(|(at, id)| (*at, id.to_string()))
                .collect()
        };
        expected.reverse();
        let listed = provider.list(&EventFilter::default()).await.expect("list");
        let listed: Vec<(DateTime<Utc>, String)> =
            listed.into_iter().map(|e| (e.created_at, e.id)).collect();
        assert_eq!(listed, expected, "newest first, every stored event once");
        let page = provider
            .list(&EventFilter {
                offset: 1,
                limit: Some(2),
                order: SortOrder::Asc,
                ..EventFilter::default()
            })
            .await
            .expect("list");
        let page: Vec<String> = page.into_iter().map(|e| e.id).collect();
        let oldest: Vec<String> = expected
            .iter()
            .rev()
            .skip(1)
            .take(2)
            .map(|(_, id)| id.clone())
            .collect();
        assert_eq!(page, oldest);
    }

    #[tokio::test]
    async fn an_event_is_evicted_only_once_every_group_finished_it() {
        let mut config = BrokerConfig {
            publish_timeout: Duration::from_millis(50),
            consumer_group: "a".into(),
            ..BrokerConfig::default()
        };
        config.memory.max_events = 2;
        let provider = MemoryProvider::new(&config);
        let in_b = provider.in_group("b");
        let consumer_a = provider.consume(options("a")).await.expect("consume");
        let consumer_b = in_b.consume(options("b")).await.expect("consume");
        let events: Vec<Event> = (0..3)
            .map(|_| Event::new(EventSource::System, "evict.test", "h"))
            .collect();
        for event in &events[..2] {
            provider.publish(event).await.expect("publish");
        }
        for delivery in consumer_a.fetch(2).await.expect("fetch") {
            consumer_a
                .complete(&delivery, &done())
                .await
                .expect("complete");
        }
        assert!(
            matches!(
                provider.publish(&events[2]).await,
                Err(ProviderError::Full(_))
            ),
            "events group b has not finished are not evicted"
        );
        let first = consumer_b.fetch(1).await.expect("fetch").remove(0);
        assert_eq!(first.event.id, events[0].id);
        assert_eq!(
            first.event.status,
            EventStatus::Processing,
            "group b sees its own state (claimed), not group a's completed one"
        );
        consumer_b
            .complete(&first, &done())
            .await
            .expect("complete");
        provider
            .publish(&events[2])
            .await
            .expect("room after group b finished one");
        assert!(provider.get(&events[0].id).await.expect("get").is_none());
        let kept = in_b.get(&events[1].id).await.expect("get").expect("kept");
        assert_eq!(kept.status, EventStatus::Pending, "group b's view");
        let kept = provider
            .get(&events[1].id)
            .await
            .expect("get")
            .expect("kept");
        assert_eq!(kept.status, EventStatus::Completed, "group a's view");
    }
}
