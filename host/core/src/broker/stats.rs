//! Broker counters and the stats snapshot.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use serde::Serialize;

use super::registry::SubscriptionStats;
use crate::provider::ProviderStats;

/// Counters updated on the dispatch path (lock-free).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub published: AtomicU64,
    pub processed: AtomicU64,
    pub completed: AtomicU64,
    pub failed: AtomicU64,
    pub retried: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub queue_depth: AtomicUsize,
    pub active_workers: AtomicUsize,
}

impl Counters {
    pub(crate) fn load(v: &AtomicU64) -> u64 {
        v.load(Ordering::Relaxed)
    }
}

/// This host's in-process counters and gauges, read without asking the provider: cheap
/// enough to sample every few seconds ([`Broker::activity`](super::Broker::activity)).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Activity {
    /// Events accepted by `publish` since start.
    pub published: u64,
    /// Events that reached `completed` here since start.
    pub completed: u64,
    /// Events that reached `failed` here since start.
    pub failed: u64,
    /// Retries scheduled since start.
    pub retried: u64,
    /// Deliveries fetched from the provider and waiting for a worker.
    pub queue_depth: usize,
    /// Workers running handlers right now.
    pub active_workers: usize,
}

/// A snapshot of the broker's activity.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BrokerStats {
    /// This host's instance id.
    pub instance_id: String,
    /// `created`, `running`, `stopping` or `stopped`.
    pub state: &'static str,
    /// `sync` or `async`.
    pub mode: &'static str,
    /// Events accepted by `publish`.
    pub published: u64,
    /// Events that reached `completed` or `failed` here.
    pub processed: u64,
    /// Events that reached `completed` here.
    pub completed: u64,
    /// Events that reached `failed` here (dead letters).
    pub failed: u64,
    /// Retries scheduled.
    pub retried: u64,
    /// Events dead-lettered (same as `failed`, named as in the plan).
    pub dead_lettered: u64,
    /// Deliveries fetched from the provider and waiting for a worker.
    pub queue_depth: usize,
    /// Workers running handlers right now.
    pub active_workers: usize,
    /// Configured workers.
    pub worker_count: usize,
    /// Per-subscription counts.
    pub subscriptions: Vec<SubscriptionStats>,
    /// The provider's own view.
    pub provider: ProviderStats,
}
