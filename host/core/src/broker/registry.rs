//! The subscription registry: which handlers exist, under which patterns, with which limits.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Serialize;

use super::handler::EventHandler;
use crate::config::RetryPolicy;
use crate::pattern::{Pattern, PatternIndex};

/// Identifies one subscription within one broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct SubscriptionId(pub u64);

impl fmt::Display for SubscriptionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sub-{}", self.0)
    }
}

/// Options of one subscription. Unset values take the broker's defaults.
#[derive(Debug, Clone, Default)]
pub struct SubscribeOptions {
    /// Stable name, recorded in event outcomes so that retries (possibly on another host)
    /// re-run only the handlers that failed. Defaults to `sub-N` in registration order;
    /// set it explicitly when handlers are registered in varying order.
    pub name: Option<String>,
    /// Deadline of one invocation.
    pub timeout: Option<Duration>,
    /// Retry policy of this handler.
    pub retry: Option<RetryPolicy>,
}

/// One handler under one or more patterns.
pub struct Subscription {
    /// Broker-local id.
    pub id: SubscriptionId,
    /// Stable name.
    pub name: String,
    /// Patterns it matches.
    pub patterns: Vec<Pattern>,
    /// The handler.
    pub handler: Arc<dyn EventHandler>,
    /// Deadline of one invocation.
    pub timeout: Duration,
    /// Its retry policy.
    pub retry: RetryPolicy,
    /// Its counters.
    pub counters: SubscriptionCounters,
}

/// Per-subscription counters.
#[derive(Debug, Default)]
pub struct SubscriptionCounters {
    /// Invocations started.
    pub invocations: AtomicU64,
    /// Invocations that succeeded.
    pub succeeded: AtomicU64,
    /// Invocations that failed (retried or not).
    pub failed: AtomicU64,
}

/// A snapshot of one subscription's counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SubscriptionStats {
    /// Broker-local id.
    pub id: SubscriptionId,
    /// Stable name.
    pub name: String,
    /// Patterns.
    pub patterns: Vec<String>,
    /// Invocations started.
    pub invocations: u64,
    /// Invocations that succeeded.
    pub succeeded: u64,
    /// Invocations that failed.
    pub failed: u64,
}

impl Subscription {
    pub(crate) fn stats(&self) -> SubscriptionStats {
        SubscriptionStats {
            id: self.id,
            name: self.name.clone(),
            patterns: self.patterns.iter().map(|p| p.to_string()).collect(),
            invocations: self.counters.invocations.load(Ordering::Relaxed),
            succeeded: self.counters.succeeded.load(Ordering::Relaxed),
            failed: self.counters.failed.load(Ordering::Relaxed),
        }
    }
}

/// All subscriptions of a broker, indexed by pattern.
#[derive(Default)]
pub(crate) struct Registry {
    inner: RwLock<RegistryInner>,
    next_id: AtomicU64,
}

#[derive(Default)]
struct RegistryInner {
    index: PatternIndex<SubscriptionId>,
    subscriptions: HashMap<SubscriptionId, Arc<Subscription>>,
}

impl Registry {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, RegistryInner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, RegistryInner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn next_id(&self) -> SubscriptionId {
        SubscriptionId(self.next_id.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// Adds a subscription; fails if its name is taken.
    pub(crate) fn insert(&self, subscription: Subscription) -> Result<(), String> {
        let mut inner = self.write();
        if inner
            .subscriptions
            .values()
            .any(|s| s.name == subscription.name)
        {
            return Err(subscription.name);
        }
        for pattern in &subscription.patterns {
            inner.index.insert(pattern, subscription.id);
        }
        inner
            .subscriptions
            .insert(subscription.id, Arc::new(subscription));
        Ok(())
    }

    /// Replaces the subscription named like `subscription` (or adds it) in one step, so that
    /// every event sees either the old or the new one. Returns the replaced one.
    pub(crate) fn replace(&self, subscription: Subscription) -> Option<Arc<Subscription>> {
        let mut inner = self.write();
        let old = inner
            .subscriptions
            .values()
            .find(|s| s.name == subscription.name)
            .cloned();
        if let Some(old) = &old {
            for pattern in &old.patterns {
                inner.index.remove(pattern, &old.id);
            }
            inner.subscriptions.remove(&old.id);
        }
        for pattern in &subscription.patterns {
            inner.index.insert(pattern, subscription.id);
        }
        inner
            .subscriptions
            .insert(subscription.id, Arc::new(subscription));
        old
    }

    pub(crate) fn remove(&self, id: SubscriptionId) -> Option<Arc<Subscription>> {
        let mut inner = self.write();
        let subscription = inner.subscriptions.remove(&id)?;
        for pattern in &subscription.patterns {
            inner.index.remove(pattern, &id);
        }
        Some(subscription)
    }

    pub(crate) fn by_name(&self, name: &str) -> Option<Arc<Subscription>> {
        self.read()
            .subscriptions
            .values()
            .find(|s| s.name == name)
            .cloned()
    }

    /// Every subscription matching `event_type`, each once, in id order.
    pub(crate) fn matching(&self, event_type: &str) -> Vec<Arc<Subscription>> {
        let inner = self.read();
        let mut ids = inner.index.matches(event_type);
        ids.sort_unstable();
        ids.dedup();
        ids.iter()
            .filter_map(|id| inner.subscriptions.get(id).cloned())
            .collect()
    }

    pub(crate) fn all(&self) -> Vec<Arc<Subscription>> {
        let mut all: Vec<_> = self.read().subscriptions.values().cloned().collect();
        all.sort_by_key(|s| s.id);
        all
    }
}
