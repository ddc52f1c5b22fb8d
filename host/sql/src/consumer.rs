//! Work-sharing consumers: claims by lease over the deliveries table.
//!
//! A claim takes up to `batch_size` deliveries of the group whose `visible_at` has passed, in
//! `seq` (publish) order, and sets `visible_at` to the lease's end with a fresh lease token:
//! - PostgreSQL: one statement, `SELECT … FOR UPDATE SKIP LOCKED` feeding an `UPDATE`, so
//!   concurrent consumers on any host take disjoint rows without waiting for each other;
//! - SQLite: one `UPDATE … RETURNING` on the provider's single writer connection (SQLite
//!   serializes writers, across processes too).
//!
//! Acknowledgements match the lease token, so a consumer whose lease expired (and whose
//! delivery went to someone else) cannot acknowledge it. Every acknowledgement writes the
//! group's new state of the event (`T_states`) and the delivery's in one transaction; a
//! delivery carries the event as its group sees it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::{AssertSqlSafe, Row};
use tokio_util::sync::CancellationToken;

use super::batch::{self, DeliveryKey, Op};
use super::dialect::Dialect;
use super::row::{UpdateValues, decode_event, nanos};
use super::schema::Queries;
use super::{NAME, Shared, db_error, micros, now_micros};
use eventbroker::EventStatus;
use eventbroker::provider::{Consumer, Delivery, ProviderError, StatusUpdate};

/// A consumer of one group.
pub struct SqlConsumer {
    pub(super) shared: Arc<Shared>,
    /// Key in the provider's table of open consumers.
    pub(super) key: u64,
    pub(super) group: String,
    pub(super) name: String,
    pub(super) lease: Duration,
    pub(super) closed: AtomicBool,
    /// Cancelled by `close` and by the provider's close.
    pub(super) cancel: CancellationToken,
}

/// The parts of a delivery token: the event's `seq` and the claim's lease token.
fn parse_token(delivery: &Delivery) -> Result<(i64, &str), ProviderError> {
    delivery
        .token
        .split_once(':')
        .and_then(|(seq, lease)| Some((seq.parse().ok()?, lease)))
        .ok_or_else(|| ProviderError::backend(NAME, "malformed delivery token"))
}

fn lease_lost(delivery: &Delivery) -> ProviderError {
    ProviderError::backend(
        NAME,
        format!(
            "delivery of event {} is no longer leased (its lease expired and it may have been \
             handed to another consumer)",
            delivery.event.id
        ),
    )
}

impl SqlConsumer {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire) || self.cancel.is_cancelled()
    }

    fn key_of(&self, delivery: &Delivery) -> Result<DeliveryKey, ProviderError> {
        let (seq, token) = parse_token(delivery)?;
        Ok(DeliveryKey {
            group: self.group.clone(),
            seq,
            token: token.to_owned(),
        })
    }

    /// Claims up to `max` deliveries.
    async fn claim(&self, max: usize) -> Result<Vec<Delivery>, ProviderError> {
        let shared = &self.shared;
        let now = now_micros();
        let lease_end = now.saturating_add(micros(self.lease));
        let token = uuid::Uuid::new_v4().simple().to_string();
        let limit = i64::try_from(max).unwrap_or(i64::MAX);
        let started = chrono::Utc::now();
        let started_nanos = nanos(started, "processed_at")?;
        let mut deliveries = Vec::new();
        match shared.dialect {
            Dialect::Postgres => {
                let rows = sqlx::query(AssertSqlSafe(shared.q.claim.clone()))
                    .bind(self.group.clone())
                    .bind(now)
                    .bind(limit)
                    .bind(lease_end)
                    .bind(token.clone())
                    .bind(self.name.clone())
                    .bind(started_nanos)
                    .bind(shared.q.channel.clone())
                    .fetch_all(&shared.pool)
                    .await
                    .map_err(db_error)?;
                for row in &rows {
                    let seq: i64 = row.try_get(0).map_err(db_error)?;
                    let count: i64 = row.try_get(1).map_err(db_error)?;
                    let marked: bool = row.try_get(2).map_err(db_error)?;
                    let mut event = decode_event(row, 3)?;
                    if marked {
                        // The row shows the state before the claim's own mark.
                        event.status = EventStatus::Processing;
                        event.processed_at = Some(started);
                        event.completed_at = None;
                    }
                    deliveries.push(Delivery {
                        event,
                        token: format!("{seq}:{token}"),
                        delivery_count: u32::try_from(count).unwrap_or(u32::MAX),
                        processing_recorded: marked,
                    });
                }
            }
            Dialect::Sqlite => {
                let claimed = sqlx::query(AssertSqlSafe(shared.q.claim.clone()))
                    .bind(self.group.clone())
                    .bind(now)
                    .bind(limit)
                    .bind(lease_end)
                    .bind(token.clone())
                    .bind(self.name.clone())
                    .fetch_all(&shared.writer)
                    .await
                    .map_err(db_error)?;
                if claimed.is_empty() {
                    return Ok(deliveries);
                }
                let mut counts = Vec::with_capacity(claimed.len());
                for row in &claimed {
                    let seq: i64 = row.try_get(0).map_err(db_error)?;
                    let count: i64 = row.try_get(1).map_err(db_error)?;
                    counts.push((seq, count));
                }
                counts.sort_unstable();
                let mut query = sqlx::query(AssertSqlSafe(Queries::events_by_seq(
                    &shared.table,
                    counts.len(),
                )))
                .bind(self.group.clone());
                for (seq, _) in &counts {
                    query = query.bind(*seq);
                }
                let rows = query.fetch_all(&shared.pool).await.map_err(db_error)?;
                let mut events = HashMap::with_capacity(rows.len());
                for row in &rows {
                    let seq: i64 = row.try_get(0).map_err(db_error)?;
                    events.insert(seq, decode_event(row, 1)?);
                }
                for (seq, count) in counts {
                    // An event deleted between the claim and the read has no delivery left.
                    if let Some(event) = events.remove(&seq) {
                        deliveries.push(Delivery {
                            event,
                            token: format!("{seq}:{token}"),
                            delivery_count: u32::try_from(count).unwrap_or(u32::MAX),
                            processing_recorded: false,
                        });
                    }
                }
            }
        }
        Ok(deliveries)
    }

    /// How long until the group's next delivery becomes visible, capped by the poll interval.
    async fn idle_wait(&self) -> Result<Duration, ProviderError> {
        let poll = self.shared.options.poll_interval;
        let next: Option<i64> = sqlx::query_scalar(AssertSqlSafe(self.shared.q.next_due.clone()))
            .bind(self.group.clone())
            .fetch_one(&self.shared.pool)
            .await
            .map_err(db_error)?;
        Ok(match next {
            Some(due) => {
                let wait = due.saturating_sub(now_micros()).max(0);
                Duration::from_micros(u64::try_from(wait).unwrap_or(0)).min(poll)
            }
            None => poll,
        }
        .max(Duration::from_millis(1)))
    }

    /// Gives every lease this consumer holds back to its group. Idempotent.
    pub(super) async fn hand_back(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.cancel.cancel();
        self.shared.forget_consumer(self.key);
        // A closed provider already handed back the leases of its open consumers.
        if self.shared.is_closed() {
            return;
        }
        if let Err(error) = hand_back_leases(&self.shared, &self.group, &self.name).await {
            tracing::warn!(%error, consumer = %self.name, "could not hand back leases; they are redelivered when they expire");
        }
    }
}

/// Makes every delivery leased by consumer `name` of `group` visible again now.
pub(super) async fn hand_back_leases(
    shared: &Shared,
    group: &str,
    name: &str,
) -> Result<(), ProviderError> {
    let result = sqlx::query(AssertSqlSafe(shared.q.hand_back.clone()))
        .bind(group.to_owned())
        .bind(name.to_owned())
        .bind(now_micros())
        .execute(shared.writer())
        .await
        .map_err(db_error)?;
    if result.rows_affected() > 0 {
        shared.signal(true).await;
        if shared.dialect == Dialect::Postgres {
            // Other hosts' consumers may take the handed-back deliveries now.
            sqlx::query(AssertSqlSafe(shared.q.wake.clone()))
                .bind(shared.q.channel.clone())
                .execute(&shared.pool)
                .await
                .map_err(db_error)?;
        }
    }
    Ok(())
}

#[async_trait]
impl Consumer for SqlConsumer {
    async fn fetch(&self, max: usize) -> Result<Vec<Delivery>, ProviderError> {
        let max = max.clamp(1, self.shared.options.batch_size.max(1));
        loop {
            if self.is_closed() {
                return Ok(Vec::new());
            }
            let woken = self.shared.hub.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let batch = self.claim(max).await?;
            if !batch.is_empty() {
                self.shared.counters.delivered(batch.len());
                return Ok(batch);
            }
            let wait = self.idle_wait().await?;
            tokio::select! {
                _ = woken => {}
                _ = self.cancel.cancelled() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn complete(
        &self,
        delivery: &Delivery,
        update: &StatusUpdate,
    ) -> Result<(), ProviderError> {
        let op = Op::Complete {
            key: self.key_of(delivery)?,
            values: UpdateValues::new(update)?,
        };
        if !batch::submit(&self.shared.submitter, op).await? {
            return Err(lease_lost(delivery));
        }
        self.shared.counters.acknowledged();
        Ok(())
    }

    async fn retry(
        &self,
        delivery: &Delivery,
        update: &StatusUpdate,
        delay: Duration,
    ) -> Result<(), ProviderError> {
        let op = Op::Retry {
            key: self.key_of(delivery)?,
            values: UpdateValues::new(update)?,
            due: now_micros().saturating_add(micros(delay)),
        };
        if !batch::submit(&self.shared.submitter, op).await? {
            return Err(lease_lost(delivery));
        }
        self.shared.counters.redelivered();
        Ok(())
    }

    async fn release(&self, delivery: &Delivery) -> Result<(), ProviderError> {
        let op = Op::Release {
            key: self.key_of(delivery)?,
            now: now_micros(),
        };
        if !batch::submit(&self.shared.submitter, op).await? {
            return Err(lease_lost(delivery));
        }
        self.shared.counters.redelivered();
        Ok(())
    }

    async fn keep_alive(&self, delivery: &Delivery) -> Result<(), ProviderError> {
        let (seq, token) = parse_token(delivery)?;
        let lease_end = now_micros().saturating_add(micros(self.lease));
        let updated = sqlx::query(AssertSqlSafe(self.shared.q.keep_alive.clone()))
            .bind(self.group.clone())
            .bind(seq)
            .bind(token.to_owned())
            .bind(lease_end)
            .execute(self.shared.writer())
            .await
            .map_err(db_error)?;
        if updated.rows_affected() == 0 {
            return Err(lease_lost(delivery));
        }
        Ok(())
    }

    async fn close(&self) {
        self.hand_back().await;
    }
}

impl Drop for SqlConsumer {
    fn drop(&mut self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.cancel.cancel();
        // Hand the leases back in the background when a runtime is there (the provider's
        // close does it if it comes first); otherwise they are redelivered when they expire.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.shared.forget_consumer(self.key);
            return;
        };
        let shared = self.shared.clone();
        let key = self.key;
        let group = std::mem::take(&mut self.group);
        let name = std::mem::take(&mut self.name);
        runtime.spawn(async move {
            if shared.is_closed() {
                return;
            }
            let _ = hand_back_leases(&shared, &group, &name).await;
            shared.forget_consumer(key);
        });
    }
}
