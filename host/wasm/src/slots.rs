//! The instance pool's slots, shared by every handler of a host, and the warm instances kept
//! for the `reuse` policy.
//!
//! The pooling allocator holds at most `handlers.pool.instances` instances at once. Every live
//! guest instance holds one [`Slot`]: one running an invocation, one reading a component's
//! default patterns, and one kept warm between invocations under `reuse`. A warm instance is
//! idle capacity, not a reservation:
//! - whoever needs a slot while none is free evicts the least recently used idle warm instance
//!   of any handler first;
//! - a finished `reuse` invocation keeps its instance warm only while nobody waits for a slot;
//! - otherwise it waits a short while for a running instance to end, and gives up with
//!   [`PoolFull`] (the invocation is then deferred as `busy`, without spending an attempt).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use wasmtime::Store;
use wasmtime::component::Instance;

use super::state::HostState;

/// No slot of the instance pool became free in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the instance pool is full: all {capacity} instances (handlers.pool.instances) are running \
     invocations"
)]
pub struct PoolFull {
    /// The pool's capacity.
    pub capacity: usize,
}

/// The right to one live instance of the pool; released when dropped.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
}

/// A live guest instance with its store, holding its slot. Fields drop in order: the store
/// (which returns the instance to the pool) before the slot.
pub(crate) struct Live {
    pub(crate) store: Store<HostState>,
    pub(crate) instance: Instance,
    _slot: Slot,
}

impl Live {
    /// An instance holding `slot`.
    pub(crate) fn new(store: Store<HostState>, instance: Instance, slot: Slot) -> Self {
        Live {
            store,
            instance,
            _slot: slot,
        }
    }
}

/// The idle warm instances of one handler version, most recently used last.
#[derive(Default)]
pub(crate) struct WarmPool {
    idle: Mutex<VecDeque<(Instant, Live)>>,
}

impl WarmPool {
    fn idle(&self) -> std::sync::MutexGuard<'_, VecDeque<(Instant, Live)>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most recently used idle instance, if any.
    pub(crate) fn take(&self) -> Option<Live> {
        self.idle().pop_back().map(|(_, live)| live)
    }

    /// Keeps `live` warm, unless someone is waiting for a slot: then it is dropped and its
    /// slot goes to them.
    pub(crate) fn put(&self, live: Live, slots: &InstanceSlots) {
        if slots.waiting.load(Ordering::Acquire) > 0 {
            return;
        }
        self.idle().push_back((Instant::now(), live));
    }

    /// Drops every idle instance.
    pub(crate) fn clear(&self) {
        let idle = std::mem::take(&mut *self.idle());
        drop(idle);
    }

    fn oldest(&self) -> Option<Instant> {
        self.idle().front().map(|(since, _)| *since)
    }

    fn evict_oldest(&self) -> Option<Live> {
        self.idle().pop_front().map(|(_, live)| live)
    }
}

/// The slots of one engine's instance pool.
pub struct InstanceSlots {
    permits: Arc<Semaphore>,
    capacity: usize,
    /// Acquirers that found no free slot and wait for one.
    waiting: AtomicUsize,
    warm: Mutex<Vec<Weak<WarmPool>>>,
}

/// Decrements the waiter count when an acquirer stops waiting, however it stops.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl InstanceSlots {
    /// `capacity` slots (at least one).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        InstanceSlots {
            permits: Arc::new(Semaphore::new(capacity)),
            capacity,
            waiting: AtomicUsize::new(0),
            warm: Mutex::new(Vec::new()),
        }
    }

    /// The number of slots.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Slots neither running nor warm.
    pub fn free(&self) -> usize {
        self.permits.available_permits()
    }

    /// Instances kept warm, over all handlers.
    pub fn warm(&self) -> usize {
        self.pools().iter().map(|pool| pool.idle().len()).sum()
    }

    /// A slot: a free one, else one freed by evicting the least recently used warm instance,
    /// else the first one released within `wait`.
    ///
    /// # Errors
    /// [`PoolFull`] when none became free within `wait`.
    pub async fn acquire(&self, wait: Duration) -> Result<Slot, PoolFull> {
        // Counted as waiting before looking, so that an instance finishing meanwhile is not
        // kept warm while this caller waits.
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let _waiting = Waiting(&self.waiting);
        loop {
            if let Ok(permit) = self.permits.clone().try_acquire_owned() {
                return Ok(Slot { _permit: permit });
            }
            if !self.evict_one() {
                break;
            }
        }
        match tokio::time::timeout(wait, self.permits.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(Slot { _permit: permit }),
            // The semaphore is never closed; a closed one has no slot to give either.
            Ok(Err(_)) | Err(_) => Err(PoolFull {
                capacity: self.capacity,
            }),
        }
    }

    /// Makes the idle instances of `pool` evictable by any handler that needs a slot.
    pub(crate) fn register(&self, pool: &Arc<WarmPool>) {
        let mut warm = self.warm.lock().unwrap_or_else(|p| p.into_inner());
        warm.retain(|weak| weak.strong_count() > 0);
        warm.push(Arc::downgrade(pool));
    }

    fn pools(&self) -> Vec<Arc<WarmPool>> {
        let mut warm = self.warm.lock().unwrap_or_else(|p| p.into_inner());
        warm.retain(|weak| weak.strong_count() > 0);
        warm.iter().filter_map(Weak::upgrade).collect()
    }

    /// Drops the least recently used idle warm instance of any handler; false if none is idle.
    fn evict_one(&self) -> bool {
        let pools = self.pools();
        let oldest = pools
            .iter()
            .filter_map(|pool| pool.oldest().map(|since| (since, pool)))
            .min_by_key(|(since, _)| *since);
        match oldest.and_then(|(_, pool)| pool.evict_oldest()) {
            Some(live) => {
                drop(live);
                true
            }
            // Another acquirer took it in between; look again.
            None => pools.iter().any(|pool| pool.evict_oldest().is_some()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_pool_refuses_after_the_wait_and_a_released_slot_is_reused() {
        let slots = InstanceSlots::new(2);
        let first = slots.acquire(Duration::ZERO).await.expect("free");
        let _second = slots.acquire(Duration::ZERO).await.expect("free");
        assert_eq!(slots.free(), 0);
        let full = slots
            .acquire(Duration::from_millis(1))
            .await
            .expect_err("full");
        assert_eq!(full.capacity, 2);
        assert!(
            full.to_string().contains("handlers.pool.instances"),
            "{full}"
        );
        drop(first);
        slots
            .acquire(Duration::from_secs(60))
            .await
            .expect("released");
        assert_eq!(slots.waiting.load(Ordering::Acquire), 0);
    }
}
