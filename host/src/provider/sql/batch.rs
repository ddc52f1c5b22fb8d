//! Group commit of the frequent writes: publishes, status updates and acknowledgements.
//!
//! Callers submit an [`Op`] and wait for its outcome. Writer tasks (one on SQLite, a few on
//! PostgreSQL) take whatever has queued up — one op when the database keeps up, up to
//! [`MAX_BATCH`] under load — and run it in one transaction: one commit (one fsync on
//! PostgreSQL) for many events. Each op's statements are exactly those it runs alone, so an
//! event's outcome is still written atomically. If a batch fails (a duplicate id, a
//! deadlock, a lost connection), it is rolled back and every op runs again in a transaction of
//! its own, so one bad op only fails itself.

use std::sync::Arc;

use sqlx::{AnyConnection, AssertSqlSafe, Executor, Row};
use tokio::sync::{Mutex as AsyncMutex, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::dialect::Dialect;
use super::row::{EventValues, UpdateValues};
use super::schema::insert_error;
use super::{Shared, db_error};
use crate::provider::ProviderError;

/// Most ops committed together.
pub const MAX_BATCH: usize = 128;
/// Ops queued before submitters wait.
pub const QUEUE: usize = 4096;

/// One write.
pub enum Op {
    /// Insert an event; `publish` also writes its deliveries.
    Insert {
        /// The event's values.
        values: Box<EventValues>,
        /// The event id (for the duplicate error).
        id: String,
        /// Deliverable to consumer groups (publish) or only stored.
        publish: bool,
        /// Visibility time of its deliveries (Unix microseconds).
        now: i64,
    },
    /// Status update of event `id` in consumer group `group`.
    UpdateStatus {
        /// Event id.
        id: String,
        /// The group whose state changes.
        group: String,
        /// The update.
        values: UpdateValues,
    },
    /// Acknowledge a delivery with the final update.
    Complete {
        /// Delivery key.
        key: DeliveryKey,
        /// The update.
        values: UpdateValues,
    },
    /// Write the update and make the delivery visible again at `due`.
    Retry {
        /// Delivery key.
        key: DeliveryKey,
        /// The update.
        values: UpdateValues,
        /// Visibility time (Unix microseconds).
        due: i64,
    },
    /// Give the delivery back unprocessed, visible at `now`.
    Release {
        /// Delivery key.
        key: DeliveryKey,
        /// Visibility time (Unix microseconds).
        now: i64,
    },
}

/// Identifies one leased delivery.
#[derive(Debug, Clone)]
pub struct DeliveryKey {
    /// Consumer group.
    pub group: String,
    /// Event seq.
    pub seq: i64,
    /// Lease token of the claim.
    pub token: String,
}

impl Op {
    /// Whether consumers should look for work after this op (and, for watchers, an event
    /// changed either way).
    fn wakes_consumers(&self) -> bool {
        matches!(
            self,
            Op::Insert { publish: true, .. } | Op::Retry { .. } | Op::Release { .. }
        )
    }

    fn needs_group_lock(&self) -> bool {
        matches!(self, Op::Insert { publish: true, .. })
    }
}

/// An op waiting for its writer.
pub struct Request {
    op: Op,
    /// `Ok(true)`: done; `Ok(false)`: the event or lease was not found.
    reply: oneshot::Sender<Result<bool, ProviderError>>,
}

/// The submitting side.
pub type Submitter = mpsc::Sender<Request>;
/// The writers' side.
pub type Queue = Arc<AsyncMutex<mpsc::Receiver<Request>>>;

/// Submits `op` and waits for its outcome.
///
/// # Errors
/// [`ProviderError::Closed`] when the provider closed first; the op's own errors.
pub async fn submit(submitter: &Submitter, op: Op) -> Result<bool, ProviderError> {
    let (reply, outcome) = oneshot::channel();
    submitter
        .send(Request { op, reply })
        .await
        .map_err(|_| ProviderError::Closed)?;
    outcome.await.map_err(|_| ProviderError::Closed)?
}

/// Runs one op's statements on `conn` (inside a transaction).
async fn execute(shared: &Shared, conn: &mut AnyConnection, op: &Op) -> Result<bool, sqlx::Error> {
    let q = &shared.q;
    let query = |sql: &String| sqlx::query(AssertSqlSafe(sql.clone()));
    match (shared.dialect, op) {
        (
            Dialect::Postgres,
            Op::Insert {
                values,
                publish,
                now,
                ..
            },
        ) => {
            let statement = if *publish {
                values.bind(query(&q.publish)).bind(*now)
            } else {
                values.bind(query(&q.store))
            };
            statement
                .bind(q.channel.clone())
                .fetch_one(&mut *conn)
                .await?;
            Ok(true)
        }
        (
            Dialect::Sqlite,
            Op::Insert {
                values,
                publish,
                now,
                ..
            },
        ) => {
            let sql = if *publish { &q.publish } else { &q.store };
            let row = values.bind(query(sql)).fetch_one(&mut *conn).await?;
            if *publish {
                let seq: i64 = row.try_get(0)?;
                query(&q.publish_deliveries)
                    .bind(seq)
                    .bind(*now)
                    .execute(&mut *conn)
                    .await?;
            }
            Ok(true)
        }
        (Dialect::Postgres, Op::UpdateStatus { id, group, values }) => Ok(values
            .bind(query(&q.update_status).bind(id.clone()).bind(group.clone()))
            .bind(q.channel.clone())
            .fetch_optional(&mut *conn)
            .await?
            .is_some()),
        (Dialect::Sqlite, Op::UpdateStatus { id, group, values }) => Ok(values
            .bind(query(&q.update_status).bind(id.clone()).bind(group.clone()))
            .execute(&mut *conn)
            .await?
            .rows_affected()
            > 0),
        (Dialect::Postgres, Op::Complete { key, values }) => Ok(values
            .bind(bind_key(query(&q.complete), key))
            .bind(q.channel.clone())
            .fetch_optional(&mut *conn)
            .await?
            .is_some()),
        (Dialect::Postgres, Op::Retry { key, values, due }) => Ok(values
            .bind(bind_key(query(&q.retry), key).bind(*due))
            .bind(q.channel.clone())
            .fetch_optional(&mut *conn)
            .await?
            .is_some()),
        (Dialect::Postgres, Op::Release { key, now }) => Ok(bind_key(query(&q.release), key)
            .bind(*now)
            .bind(q.channel.clone())
            .fetch_optional(&mut *conn)
            .await?
            .is_some()),
        (Dialect::Sqlite, Op::Complete { key, values }) => {
            let deleted = bind_key(query(&q.complete), key)
                .execute(&mut *conn)
                .await?;
            if deleted.rows_affected() == 0 {
                return Ok(false);
            }
            values
                .bind(
                    query(&q.upsert_by_seq)
                        .bind(key.group.clone())
                        .bind(key.seq),
                )
                .execute(&mut *conn)
                .await?;
            Ok(true)
        }
        (Dialect::Sqlite, Op::Retry { key, values, due }) => {
            let updated = bind_key(query(&q.retry), key)
                .bind(*due)
                .execute(&mut *conn)
                .await?;
            if updated.rows_affected() == 0 {
                return Ok(false);
            }
            values
                .bind(
                    query(&q.upsert_by_seq)
                        .bind(key.group.clone())
                        .bind(key.seq),
                )
                .execute(&mut *conn)
                .await?;
            Ok(true)
        }
        (Dialect::Sqlite, Op::Release { key, now }) => {
            let updated = bind_key(query(&q.release), key)
                .bind(*now)
                .execute(&mut *conn)
                .await?;
            if updated.rows_affected() == 0 {
                return Ok(false);
            }
            query(&q.release_event)
                .bind(key.group.clone())
                .bind(key.seq)
                .execute(&mut *conn)
                .await?;
            Ok(true)
        }
    }
}

fn bind_key<'q>(query: super::row::AnyQuery<'q>, key: &DeliveryKey) -> super::row::AnyQuery<'q> {
    query
        .bind(key.group.clone())
        .bind(key.seq)
        .bind(key.token.clone())
}

/// Runs `ops` in one transaction; the outcome of each, or the error that rolled it back.
async fn run_batch(shared: &Shared, ops: &[&Op]) -> Result<Vec<bool>, sqlx::Error> {
    let mut tx = match shared.dialect {
        Dialect::Sqlite => shared.writer.begin_with("BEGIN IMMEDIATE").await?,
        Dialect::Postgres => shared.pool.begin().await?,
    };
    if shared.dialect == Dialect::Postgres && ops.iter().any(|op| op.needs_group_lock()) {
        // Publishes hold the group lock shared: a group being created waits for them.
        tx.execute(
            sqlx::query(AssertSqlSafe(shared.q.lock_shared.clone()))
                .bind(shared.q.lock_name.clone()),
        )
        .await?;
    }
    let mut outcomes = Vec::with_capacity(ops.len());
    for op in ops {
        outcomes.push(execute(shared, &mut tx, op).await?);
    }
    tx.commit().await?;
    Ok(outcomes)
}

fn op_error(op: &Op, error: sqlx::Error) -> ProviderError {
    match op {
        Op::Insert { id, .. } => insert_error(error, id),
        _ => db_error(error),
    }
}

/// A writer: takes batches off `queue` until it is closed, or `shutdown` is cancelled and the
/// queue is empty.
pub async fn writer(shared: std::sync::Weak<Shared>, queue: Queue, shutdown: CancellationToken) {
    loop {
        let requests = {
            let mut receiver = queue.lock().await;
            let first = tokio::select! {
                biased;
                request = receiver.recv() => request,
                _ = shutdown.cancelled() => receiver.try_recv().ok(),
            };
            let Some(first) = first else { return };
            let mut requests = vec![first];
            while requests.len() < MAX_BATCH {
                match receiver.try_recv() {
                    Ok(request) => requests.push(request),
                    Err(_) => break,
                }
            }
            requests
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let ops: Vec<&Op> = requests.iter().map(|r| &r.op).collect();
        let wake = ops.iter().any(|op| op.wakes_consumers());
        let outcomes: Vec<Result<bool, ProviderError>> = match run_batch(&shared, &ops).await {
            Ok(outcomes) => outcomes.into_iter().map(Ok).collect(),
            Err(error) if ops.len() == 1 => vec![Err(op_error(ops[0], error))],
            Err(_) => {
                // Find the culprit: each op alone.
                let mut outcomes = Vec::with_capacity(ops.len());
                for op in &ops {
                    outcomes.push(
                        run_batch(&shared, std::slice::from_ref(op))
                            .await
                            .map(|mut o| o.pop().unwrap_or(false))
                            .map_err(|error| op_error(op, error)),
                    );
                }
                outcomes
            }
        };
        shared.signal(wake).await;
        for (request, outcome) in requests.into_iter().zip(outcomes) {
            let _ = request.reply.send(outcome);
        }
    }
}
