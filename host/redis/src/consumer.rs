//! A work-sharing consumer: one Redis consumer (unique name) in a consumer group.
//!
//! `fetch` first re-reads this consumer's own pending entries (after a start or a failed read,
//! whose reply may have been lost), then claims entries other consumers left idle longer than
//! the claim threshold (`XAUTOCLAIM`, every claim interval), moves the group's due delayed
//! redeliveries back into the stream, and finally reads new entries with `XREADGROUP … BLOCK`
//! on a dedicated connection (closing the consumer unblocks it with `CLIENT UNBLOCK`).
//!
//! Entries addressed to another group (redeliveries of that group) are acknowledged and
//! skipped; entries whose event was deleted are acknowledged and skipped.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::entries::{self, Entry};
use super::store::{Stored, StoredState, to_json};
use super::{NAME, Shared, Transition, backend, now_ms};
use eventbroker::event::{Event, EventStatus};
use eventbroker::provider::{Consumer, ConsumerOptions, Delivery, ProviderError, StatusUpdate};

/// Largest number of own pending entries handed back per round when closing.
const HAND_BACK_PAGE: usize = 100;

/// The consumer handed to the broker; closing it (or dropping it) hands back what it holds.
pub(crate) struct RedisConsumer {
    inner: Arc<ConsumerInner>,
}

/// The consumer's state, shared with the provider (which closes it on close).
pub(crate) struct ConsumerInner {
    shared: Arc<Shared>,
    group: String,
    name: String,
    claim_idle: Duration,
    claim_every: Duration,
    closed: AtomicBool,
    cancel: CancellationToken,
    read: tokio::sync::Mutex<ReadState>,
    /// Entry ids delivered and not yet completed, retried or released.
    outstanding: Mutex<HashSet<String>>,
    /// Client id of the blocking connection (for `CLIENT UNBLOCK`), or -1.
    blocking_client: AtomicI64,
    handed_back: tokio::sync::Mutex<bool>,
}

struct ReadState {
    blocking: Option<MultiplexedConnection>,
    /// Own pending entries must be re-read, starting after this id.
    reread_from: Option<String>,
    claim_cursor: String,
    next_claim: Instant,
    next_move: Instant,
}

impl RedisConsumer {
    pub(crate) fn new(shared: Arc<Shared>, group: String, options: &ConsumerOptions) -> Self {
        let claim_idle = shared
            .options
            .claim_idle
            .unwrap_or(options.lease)
            .max(Duration::from_millis(1));
        let claim_every = shared
            .options
            .claim_interval
            .min(claim_idle / 2)
            .max(Duration::from_millis(5));
        let now = Instant::now();
        let inner = Arc::new(ConsumerInner {
            cancel: shared.shutdown.child_token(),
            group,
            name: options.name.clone(),
            claim_idle,
            claim_every,
            closed: AtomicBool::new(false),
            read: tokio::sync::Mutex::new(ReadState {
                blocking: None,
                reread_from: Some("0".into()),
                claim_cursor: "0-0".into(),
                next_claim: now,
                next_move: now,
            }),
            outstanding: Mutex::new(HashSet::new()),
            blocking_client: AtomicI64::new(-1),
            handed_back: tokio::sync::Mutex::new(false),
            shared,
        });
        inner.shared.counters.consumer_opened();
        {
            let mut consumers = inner
                .shared
                .consumers
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            consumers.retain(|c| c.strong_count() > 0);
            consumers.push(Arc::downgrade(&inner));
        }
        RedisConsumer { inner }
    }
}

impl ConsumerInner {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire) || self.cancel.is_cancelled()
    }

    fn outstanding(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.outstanding.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn blocking_conn(
        &self,
        state: &mut ReadState,
    ) -> Result<MultiplexedConnection, ProviderError> {
        if let Some(conn) = &state.blocking {
            return Ok(conn.clone());
        }
        let options = &self.shared.options;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(options.command_timeout))
            .set_response_timeout(Some(options.block_time + options.command_timeout));
        let mut conn = self
            .shared
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(backend)?;
        let id: i64 = redis::cmd("CLIENT")
            .arg("ID")
            .query_async(&mut conn)
            .await
            .map_err(backend)?;
        self.blocking_client.store(id, Ordering::Release);
        state.blocking = Some(conn.clone());
        Ok(conn)
    }

    async fn unblock(&self) {
        let id = self.blocking_client.load(Ordering::Acquire);
        if id < 0 {
            return;
        }
        let result: Result<Value, _> = redis::cmd("CLIENT")
            .arg("UNBLOCK")
            .arg(id)
            .query_async(&mut self.shared.conn())
            .await;
        if let Err(error) = result {
            tracing::debug!(%error, "could not unblock a consumer read");
        }
    }

    async fn fetch(&self, max: usize) -> Result<Vec<Delivery>, ProviderError> {
        let max = max.clamp(1, self.shared.options.batch_size);
        loop {
            if self.is_closed() {
                return Ok(Vec::new());
            }
            let mut state = self.read.lock().await;
            if self.is_closed() {
                return Ok(Vec::new());
            }
            match self.fetch_once(&mut state, max).await {
                Ok(batch) => {
                    // After a close, what was read stays pending and close hands it back.
                    if self.is_closed() {
                        return Ok(Vec::new());
                    }
                    if !batch.is_empty() {
                        let mut outstanding = self.outstanding();
                        for delivery in &batch {
                            outstanding.insert(delivery.token.clone());
                        }
                        drop(outstanding);
                        self.shared.counters.delivered(batch.len());
                        return Ok(batch);
                    }
                }
                Err(error) => {
                    state.blocking = None;
                    self.blocking_client.store(-1, Ordering::Release);
                    state.reread_from = Some("0".into());
                    if error.to_string().contains("NOGROUP") {
                        // The stream or group was deleted: recreate it and go on.
                        self.shared.ensure_group(&self.group).await?;
                        continue;
                    }
                    return Err(error);
                }
            }
        }
    }

    async fn fetch_once(
        &self,
        state: &mut ReadState,
        max: usize,
    ) -> Result<Vec<Delivery>, ProviderError> {
        let keys = &self.shared.keys;
        if let Some(from) = state.reread_from.clone() {
            // Snapshot what the broker holds *before* reading: a delivery completed while the
            // read runs leaves the set but may still be in the reply.
            let held = self.outstanding().clone();
            let reply: Value = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(&self.group)
                .arg(&self.name)
                .arg("COUNT")
                .arg(max)
                .arg("STREAMS")
                .arg(&keys.stream)
                .arg(&from)
                .query_async(&mut self.shared.conn())
                .await
                .map_err(backend)?;
            let found = entries::read_reply(&reply);
            state.reread_from = if found.len() < max {
                None
            } else {
                found.last().map(|e| e.id.clone())
            };
            let mine: Vec<Entry> = found
                .into_iter()
                .filter(|e| !held.contains(&e.id))
                .collect();
            let batch = self.resolve(mine, true).await?;
            if !batch.is_empty() {
                return Ok(batch);
            }
        }
        let now = Instant::now();
        if now >= state.next_claim {
            let held = self.outstanding().clone();
            let reply: Value = redis::cmd("XAUTOCLAIM")
                .arg(&keys.stream)
                .arg(&self.group)
                .arg(&self.name)
                .arg(self.claim_idle.as_millis() as u64)
                .arg(&state.claim_cursor)
                .arg("COUNT")
                .arg(max)
                .query_async(&mut self.shared.conn())
                .await
                .map_err(backend)?;
            let (cursor, claimed) = entries::autoclaim_reply(&reply);
            if cursor == "0-0" {
                state.next_claim = now + self.claim_every;
            }
            state.claim_cursor = cursor;
            let claimed: Vec<Entry> = claimed
                .into_iter()
                .filter(|e| !held.contains(&e.id))
                .collect();
            if !claimed.is_empty() {
                tracing::info!(
                    count = claimed.len(),
                    group = %self.group,
                    "claimed idle deliveries of another consumer"
                );
            }
            let batch = self.resolve(claimed, true).await?;
            if !batch.is_empty() {
                return Ok(batch);
            }
        }
        if now >= state.next_move {
            let next: Option<String> = self
                .shared
                .scripts
                .move_due
                .arg(&keys.stream)
                .arg(&self.group)
                .arg(now_ms())
                .arg(max)
                .invoke_async(&mut self.shared.conn())
                .await
                .map_err(backend)?;
            let wait = next
                .and_then(|due| due.parse::<f64>().ok())
                .map(|due| Duration::from_millis((due as i64 - now_ms()).max(0) as u64))
                .unwrap_or(self.shared.options.block_time);
            state.next_move = now + wait.min(self.shared.options.block_time);
        }
        let block = self
            .shared
            .options
            .block_time
            .min(state.next_claim.saturating_duration_since(now))
            .min(state.next_move.saturating_duration_since(now))
            .max(Duration::from_millis(1));
        let mut conn = self.blocking_conn(state).await?;
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.group)
            .arg(&self.name)
            .arg("COUNT")
            .arg(max)
            .arg("BLOCK")
            .arg(block.as_millis() as u64)
            .arg("STREAMS")
            .arg(&keys.stream)
            .arg(">");
        let read = cmd.query_async::<Value>(&mut conn);
        tokio::pin!(read);
        let reply = tokio::select! {
            reply = &mut read => reply,
            _ = self.cancel.cancelled() => {
                self.unblock().await;
                read.await
            }
        }
        .map_err(backend)?;
        self.resolve(entries::read_reply(&reply), false).await
    }

    /// Turns entries into deliveries: loads their events as this group sees them,
    /// acknowledges entries that are not for this group or whose event is gone.
    async fn resolve(
        &self,
        found: Vec<Entry>,
        redelivered: bool,
    ) -> Result<Vec<Delivery>, ProviderError> {
        if found.is_empty() {
            return Ok(Vec::new());
        }
        let mut skip = Vec::new();
        let mut wanted = Vec::new();
        for entry in found {
            match entry.field("id") {
                Some(_) if entry.field("group").is_none_or(|g| g == self.group) => {
                    wanted.push(entry)
                }
                _ => skip.push(entry.id),
            }
        }
        let ids: Vec<String> = wanted
            .iter()
            .filter_map(|e| e.field("id").map(str::to_owned))
            .collect();
        let stored = self.shared.load_stored(&ids, &self.group).await?;
        let events = self.claim(&ids, stored).await?;
        let counts = if redelivered && !wanted.is_empty() {
            self.delivery_counts(&wanted).await?
        } else {
            Default::default()
        };
        let mut out = Vec::new();
        for (entry, event) in wanted.into_iter().zip(events) {
            let Some((event, processing_recorded)) = event else {
                skip.push(entry.id);
                continue;
            };
            let before: u32 = entry.field("n").and_then(|n| n.parse().ok()).unwrap_or(0);
            let times = counts.get(&entry.id).copied().unwrap_or(1).max(1);
            out.push(Delivery {
                event,
                token: entry.id,
                delivery_count: before.saturating_add(times),
                processing_recorded,
            });
        }
        if !skip.is_empty() {
            let _: i64 = redis::cmd("XACK")
                .arg(&self.shared.keys.stream)
                .arg(&self.group)
                .arg(&skip)
                .query_async(&mut self.shared.conn())
                .await
                .map_err(backend)?;
        }
        Ok(out)
    }

    /// Decodes the loaded events and records `processing` for the unfinished ones, all in one
    /// script run ([`super::scripts::Scripts::claim`]); returns each event as the worker
    /// sees it and whether the mark was recorded (an event changed since it was loaded is
    /// left as it is: the worker marks it).
    async fn claim(
        &self,
        ids: &[String],
        stored: Vec<Option<Stored>>,
    ) -> Result<Vec<Option<(Event, bool)>>, ProviderError> {
        let now = chrono::Utc::now();
        let mut out = Vec::with_capacity(stored.len());
        let mut script = self.shared.scripts.claim.prepare_invoke();
        script
            .arg(&self.shared.keys.stream)
            .arg(&self.group)
            .arg(&self.shared.keys.watch);
        let mut claimed = Vec::new();
        for (index, (id, stored)) in ids.iter().zip(stored).enumerate() {
            let Some(stored) = stored else {
                out.push(None);
                continue;
            };
            let event = stored.decode()?;
            if event.status.is_finished() {
                out.push(Some((event, false)));
                continue;
            }
            let mut marked = event.clone();
            marked.status = EventStatus::Processing;
            marked.processed_at = Some(now);
            marked.completed_at = None;
            let state = to_json(&StoredState::of_event(&marked))?;
            script
                .arg(id)
                .arg(stored.status.as_deref().unwrap_or(""))
                .arg(stored.state.as_deref().unwrap_or(""))
                .arg(state);
            claimed.push((index, marked));
            out.push(Some((event, false)));
        }
        if claimed.is_empty() {
            return Ok(out);
        }
        let recorded: Vec<i64> = script
            .invoke_async(&mut self.shared.conn())
            .await
            .map_err(backend)?;
        for ((index, marked), recorded) in claimed.into_iter().zip(recorded) {
            if recorded == 1 {
                out[index] = Some((marked, true));
            }
        }
        Ok(out)
    }

    /// How often Redis delivered each entry to this group.
    async fn delivery_counts(
        &self,
        found: &[Entry],
    ) -> Result<std::collections::HashMap<String, u32>, ProviderError> {
        let (Some(first), Some(last)) = (found.first(), found.last()) else {
            return Ok(Default::default());
        };
        let reply: Value = redis::cmd("XPENDING")
            .arg(&self.shared.keys.stream)
            .arg(&self.group)
            .arg(&first.id)
            .arg(&last.id)
            .arg(found.len().max(1) * 2)
            .arg(&self.name)
            .query_async(&mut self.shared.conn())
            .await
            .map_err(backend)?;
        Ok(entries::pending_reply(&reply)
            .into_iter()
            .map(|(id, _, count)| (id, count))
            .collect())
    }

    fn settled(&self, delivery: &Delivery) {
        self.outstanding().remove(&delivery.token);
    }

    fn transition<'a>(&'a self, delivery: &'a Delivery, mode: &'static str) -> Transition<'a> {
        let mut t = Transition::new(&delivery.event.id, mode);
        t.group = &self.group;
        t.consumer = &self.name;
        t.entry = &delivery.token;
        t
    }

    /// Closes once: ends fetches, waits for a running read, hands back every entry still
    /// pending for this consumer (immediate redelivery), then deletes the consumer if empty.
    pub(crate) async fn close(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            self.cancel.cancel();
        }
        let mut done = self.handed_back.lock().await;
        if *done {
            return;
        }
        *done = true;
        self.unblock().await;
        let _reading = self.read.lock().await;
        if let Err(error) = self.hand_back().await {
            tracing::warn!(%error, consumer = %self.name, "could not hand back deliveries on close; they are redelivered after the claim idle time");
        }
        self.shared.counters.consumer_closed();
    }

    async fn hand_back(&self) -> Result<(), ProviderError> {
        let keys = &self.shared.keys;
        let mut conn = self.shared.conn();
        for _ in 0..1000 {
            let reply: Value = redis::cmd("XPENDING")
                .arg(&keys.stream)
                .arg(&self.group)
                .arg("-")
                .arg("+")
                .arg(HAND_BACK_PAGE)
                .arg(&self.name)
                .query_async(&mut conn)
                .await
                .map_err(backend)?;
            let pending = entries::pending_reply(&reply);
            if pending.is_empty() {
                break;
            }
            for (entry_id, _, times) in pending {
                let reply: Value = redis::cmd("XRANGE")
                    .arg(&keys.stream)
                    .arg(&entry_id)
                    .arg(&entry_id)
                    .query_async(&mut conn)
                    .await
                    .map_err(backend)?;
                let entry = entries::entries(&reply).into_iter().next();
                let event_id = entry
                    .as_ref()
                    .and_then(|e| e.field("id"))
                    .map(str::to_owned);
                let Some(event_id) = event_id else {
                    let _: i64 = redis::cmd("XACK")
                        .arg(&keys.stream)
                        .arg(&self.group)
                        .arg(&entry_id)
                        .query_async(&mut conn)
                        .await
                        .map_err(backend)?;
                    continue;
                };
                let before: u32 = entry
                    .as_ref()
                    .and_then(|e| e.field("n"))
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                let mut t = Transition::new(&event_id, "release");
                t.group = &self.group;
                t.consumer = &self.name;
                t.entry = &entry_id;
                // The handed-back delivery was not attempted: do not count it.
                t.count = before.saturating_add(times.saturating_sub(1));
                self.shared.transition(t).await?;
                self.shared.counters.redelivered();
            }
        }
        self.outstanding().clear();
        let _: i64 = self
            .shared
            .scripts
            .delete_idle_consumers
            .arg(&keys.stream)
            .arg(&self.group)
            .arg(i64::MAX)
            .arg(&self.name)
            .invoke_async(&mut conn)
            .await
            .map_err(backend)?;
        Ok(())
    }
}

#[async_trait]
impl Consumer for RedisConsumer {
    async fn fetch(&self, max: usize) -> Result<Vec<Delivery>, ProviderError> {
        self.inner.fetch(max).await
    }

    async fn complete(
        &self,
        delivery: &Delivery,
        update: &StatusUpdate,
    ) -> Result<(), ProviderError> {
        let inner = &self.inner;
        let mut t = inner.transition(delivery, "complete");
        t.status = Some(update.status);
        t.state = Some(to_json(&StoredState::of_update(update))?);
        t.finished_at = update.completed_at;
        t.error = update.error.as_deref();
        let result = inner.shared.transition(t).await;
        inner.settled(delivery);
        result?;
        inner.shared.counters.acknowledged();
        Ok(())
    }

    async fn retry(
        &self,
        delivery: &Delivery,
        update: &StatusUpdate,
        delay: Duration,
    ) -> Result<(), ProviderError> {
        let inner = &self.inner;
        let mut t = inner.transition(delivery, "retry");
        t.status = Some(update.status);
        t.state = Some(to_json(&StoredState::of_update(update))?);
        t.due_ms = if delay.is_zero() {
            0
        } else {
            now_ms().saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 2))
        };
        t.count = delivery.delivery_count;
        let result = inner.shared.transition(t).await;
        inner.settled(delivery);
        result?;
        inner.shared.counters.redelivered();
        Ok(())
    }

    async fn release(&self, delivery: &Delivery) -> Result<(), ProviderError> {
        let inner = &self.inner;
        let mut t = inner.transition(delivery, "release");
        // A released delivery was not attempted: do not count it.
        t.count = delivery.delivery_count.saturating_sub(1);
        let result = inner.shared.transition(t).await;
        inner.settled(delivery);
        result?;
        inner.shared.counters.redelivered();
        Ok(())
    }

    async fn keep_alive(&self, delivery: &Delivery) -> Result<(), ProviderError> {
        let inner = &self.inner;
        let renewed: i64 = inner
            .shared
            .scripts
            .keep_alive
            .arg(&inner.shared.keys.stream)
            .arg(&inner.group)
            .arg(&inner.name)
            .arg(&delivery.token)
            .invoke_async(&mut inner.shared.conn())
            .await
            .map_err(backend)?;
        if renewed == 1 {
            Ok(())
        } else {
            Err(ProviderError::backend(
                NAME,
                format!(
                    "delivery of event {} is no longer leased (another consumer claimed it)",
                    delivery.event.id
                ),
            ))
        }
    }

    async fn close(&self) {
        self.inner.close().await;
    }
}

impl Drop for RedisConsumer {
    fn drop(&mut self) {
        if *self
            .inner
            .handed_back
            .try_lock()
            .map(|done| *done)
            .as_ref()
            .unwrap_or(&true)
        {
            return;
        }
        let inner = self.inner.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { inner.close().await });
        }
    }
}
