//! The activity counters every provider reports in [`ProviderStats`]: one definition, so that
//! "consumed" or "redelivered" means the same on every backend.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::ProviderStats;

/// What one provider instance did since it was opened. Backends call these at the points the
/// [`Provider`](super::Provider) and [`Consumer`](super::Consumer) contracts name; the stats
/// they report are filled by [`Counters::fill`].
#[derive(Debug, Default)]
pub struct Counters {
    published: AtomicU64,
    delivered: AtomicU64,
    acknowledged: AtomicU64,
    redelivered: AtomicU64,
    consumers: AtomicU64,
    watchers: Arc<AtomicU64>,
}

impl Counters {
    /// An event was accepted by `publish`.
    pub fn published(&self) {
        self.published.fetch_add(1, Ordering::Relaxed);
    }

    /// `count` deliveries were handed to a consumer by `fetch`.
    pub fn delivered(&self, count: usize) {
        self.delivered.fetch_add(count as u64, Ordering::Relaxed);
    }

    /// A delivery was acknowledged as finished (`complete`).
    pub fn acknowledged(&self) {
        self.acknowledged.fetch_add(1, Ordering::Relaxed);
    }

    /// A delivery was given back for redelivery (`retry`, `release`, a claim of an expired
    /// lease).
    pub fn redelivered(&self) {
        self.redelivered.fetch_add(1, Ordering::Relaxed);
    }

    /// A consumer was opened; call [`Counters::consumer_closed`] once when it closes.
    pub fn consumer_opened(&self) {
        self.consumers.fetch_add(1, Ordering::Relaxed);
    }

    /// A consumer opened with [`Counters::consumer_opened`] was closed.
    pub fn consumer_closed(&self) {
        // Saturating: a close that raced a failed open never wraps the count around.
        let _ = self
            .consumers
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// A watcher subscribed to the backend; it counts until the guard is dropped.
    pub fn watcher_opened(&self) -> WatcherGuard {
        self.watchers.fetch_add(1, Ordering::Relaxed);
        WatcherGuard(self.watchers.clone())
    }

    /// Open watchers counted by [`Counters::watcher_opened`].
    pub fn watchers(&self) -> u64 {
        self.watchers.load(Ordering::Relaxed)
    }

    /// Open consumers counted by [`Counters::consumer_opened`].
    pub fn consumers(&self) -> u64 {
        self.consumers.load(Ordering::Relaxed)
    }

    /// Writes the counts into `stats`: `published`, `consumed`, `acknowledged`,
    /// `redelivered`, `consumers` and `subscribers` (open watchers). A backend that knows
    /// its consumers or watchers better (a broadcast channel's receivers) overwrites those
    /// two afterwards.
    pub fn fill(&self, stats: &mut ProviderStats) {
        stats.published = self.published.load(Ordering::Relaxed);
        stats.consumed = self.delivered.load(Ordering::Relaxed);
        stats.acknowledged = self.acknowledged.load(Ordering::Relaxed);
        stats.redelivered = self.redelivered.load(Ordering::Relaxed);
        stats.consumers = self.consumers();
        stats.subscribers = self.watchers();
    }
}

/// Counts one open watcher of [`Counters`] until dropped.
#[derive(Debug)]
pub struct WatcherGuard(Arc<AtomicU64>);

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_reach_the_stats_and_guards_uncount() {
        let counters = Counters::default();
        counters.published();
        counters.delivered(3);
        counters.acknowledged();
        counters.redelivered();
        counters.consumer_opened();
        let guard = counters.watcher_opened();
        let mut stats = ProviderStats::empty("x");
        counters.fill(&mut stats);
        assert_eq!(
            (
                stats.published,
                stats.consumed,
                stats.acknowledged,
                stats.redelivered
            ),
            (1, 3, 1, 1)
        );
        assert_eq!((stats.consumers, stats.subscribers), (1, 1));
        drop(guard);
        counters.consumer_closed();
        counters.consumer_closed();
        assert_eq!((counters.watchers(), counters.consumers()), (0, 0));
    }
}
