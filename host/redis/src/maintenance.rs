//! Periodic upkeep, run by every host (each step is an atomic script or idempotent, so hosts
//! running it at the same time do no harm):
//!
//! - trimming: keep about `max_len` stream entries, never trimming an entry that some group
//!   has not read or not acknowledged (the bound is stored for `XADD … MINID ~` too);
//! - retention: remove settled events (finished by every consumer group; hash and index
//!   entries) `retention` after the last group finished them;
//! - idle consumers: delete consumers that hold nothing and have been idle for
//!   `consumer_idle_timeout`.

use std::sync::{Arc, Weak};

use chrono::Utc;

use super::store::score;
use super::{Shared, backend};
use eventbroker::provider::ProviderError;

/// Finished events removed per round trip.
const CLEANUP_CHUNK: usize = 500;

/// Runs [`pass`] every maintenance interval (the first one interval after start) until the provider is closed or dropped.
pub(crate) async fn run(shared: Weak<Shared>) {
    let (interval, shutdown) = match shared.upgrade() {
        Some(s) => (s.options.maintenance_interval, s.shutdown.clone()),
        None => return,
    };
    // The first pass comes one interval after start.
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if let Err(error) = pass(&shared).await {
            tracing::warn!(%error, "redis provider maintenance failed; retrying next interval");
        }
    }
}

/// One maintenance pass.
pub(crate) async fn pass(shared: &Arc<Shared>) -> Result<(), ProviderError> {
    let keys = &shared.keys;
    let _: Option<String> = shared
        .scripts
        .trim
        .key(&keys.stream)
        .key(&keys.trim)
        .arg(shared.options.max_len)
        .invoke_async(&mut shared.conn())
        .await
        .map_err(backend)?;

    let retention =
        chrono::Duration::from_std(shared.options.retention).unwrap_or(chrono::Duration::MAX);
    let cutoff = Utc::now()
        .checked_sub_signed(retention)
        .map_or(i64::MIN, score);
    loop {
        let expired: Vec<String> = redis::cmd("ZRANGE")
            .arg(&keys.finished)
            .arg("-inf")
            .arg(cutoff)
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(0)
            .arg(CLEANUP_CHUNK)
            .query_async(&mut shared.conn())
            .await
            .map_err(backend)?;
        for id in &expired {
            // An event a group has not finished (one created since) leaves the index instead.
            shared.prune(id, true).await?;
        }
        if expired.len() < CLEANUP_CHUNK {
            break;
        }
    }

    let removed: i64 = shared
        .scripts
        .delete_idle_consumers
        .arg(&keys.stream)
        .arg("")
        .arg(shared.options.consumer_idle_timeout.as_millis() as u64)
        .arg("")
        .invoke_async(&mut shared.conn())
        .await
        .map_err(backend)?;
    if removed > 0 {
        tracing::info!(removed, "deleted idle Redis consumers that held no entries");
    }
    Ok(())
}
