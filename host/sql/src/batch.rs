//! Group commit of the frequent writes: publishes, status updates and acknowledgements.
//!
//! Callers submit an [`Op`] and wait for its outcome. Writer tasks (one on SQLite, a few on
//! PostgreSQL) take whatever has queued up — one op when the database keeps up, up to
//! [`MAX_BATCH`] under load — and run it in one transaction: one commit (one fsync on
//! PostgreSQL) for many events. Each op's statements are exactly those it runs alone, so an
//! event's outcome is still written atomically. If a batch fails (a duplicate id, a
//! deadlock, a lost connection), it is rolled back and every op runs again in a transaction of
//! its own, so one bad op only fails itself.
//!
//! Time and outages:
//! - A batch and its replay share one deadline (`write_timeout`): no op waits longer, however
//!   many ops the batch holds.
//! - A batch that finds the database unreachable opens the [`circuit`](super::circuit) unless
//!   a quick probe shows the database answers again; while it is open every op fails at once.
//! - When the answer to a commit was lost (the connection failed or the deadline passed while
//!   committing), the batch may have been applied. Its replay is idempotent for inserts: an
//!   insert that finds the very same event stored (same id and content) succeeds instead of
//!   reporting a duplicate; a different event under the same id is still a duplicate.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use sqlx::{AnyConnection, AssertSqlSafe, Row};
use tokio::sync::{Mutex as AsyncMutex, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::circuit;
use super::dialect::Dialect;
use super::row::{EventValues, UpdateValues, decode_event};
use super::schema::insert_error;
use super::{NAME, Shared, db_error};
use eventbroker::provider::ProviderError;

/// Most ops committed together.
pub const MAX_BATCH: usize = 128;
/// Ops queued before submitters wait.
pub const QUEUE: usize = 4096;
/// Longest wait for the database to answer after a batch found it unreachable, before the
/// batch's ops fail and the circuit opens.
const INLINE_PROBE: std::time::Duration = std::time::Duration::from_secs(1);

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
/// `committing` is set once the commit is sent: from then on a failure leaves the outcome
/// unknown.
async fn run_batch(
    shared: &Shared,
    ops: &[&Op],
    committing: &AtomicBool,
) -> Result<Vec<bool>, sqlx::Error> {
    let mut tx = match shared.dialect {
        Dialect::Sqlite => shared.writer.begin_with("BEGIN IMMEDIATE").await?,
        // Publishes hold the group lock shared (a group being created waits for them): taken
        // with `BEGIN`, in the same round trip.
        Dialect::Postgres if ops.iter().any(|op| op.needs_group_lock()) => {
            shared
                .pool
                .begin_with(AssertSqlSafe(shared.q.begin_locked.clone()))
                .await?
        }
        Dialect::Postgres => shared.pool.begin().await?,
    };
    let mut outcomes = Vec::with_capacity(ops.len());
    for op in ops {
        outcomes.push(execute(shared, &mut tx, op).await?);
    }
    committing.store(true, Ordering::Release);
    tx.commit().await?;
    Ok(outcomes)
}

fn op_error(op: &Op, error: sqlx::Error) -> ProviderError {
    match op {
        Op::Insert { id, .. } => insert_error(error, id),
        _ => db_error(error),
    }
}

/// Why an attempt at a batch failed.
enum Cause {
    /// The database answered with an error, or the connection failed.
    Database(sqlx::Error),
    /// The deadline passed first.
    TimedOut,
    /// Another write found the database unreachable first.
    CircuitOpen,
}

/// A failed attempt.
struct Failure {
    cause: Cause,
    /// The commit had been sent: the batch may have been applied.
    unknown: bool,
}

impl Failure {
    /// Whether the database could not be reached (or did not answer in time).
    fn unreachable(&self) -> bool {
        match &self.cause {
            Cause::Database(error) => circuit::is_unreachable(error),
            Cause::TimedOut | Cause::CircuitOpen => true,
        }
    }

    /// A short description, for the circuit and for errors.
    fn describe(&self, shared: &Shared) -> String {
        match &self.cause {
            Cause::Database(error) => error.to_string(),
            Cause::TimedOut => format!(
                "no answer within write_timeout ({:?})",
                shared.options.write_timeout
            ),
            Cause::CircuitOpen => shared
                .circuit
                .reason()
                .unwrap_or_else(|| "database unreachable".to_owned()),
        }
    }

    /// The error reported for `op`.
    fn into_error(self, shared: &Shared, op: &Op) -> ProviderError {
        let described = self.describe(shared);
        match self.cause {
            Cause::Database(error) if !self.unknown => op_error(op, error),
            _ => ProviderError::backend(NAME, format!("{described}{}", unknown_note(self.unknown))),
        }
    }
}

/// What an error adds when the write's outcome is unknown.
fn unknown_note(unknown: bool) -> &'static str {
    if unknown {
        "; the answer to the commit was lost, so the write may have been applied"
    } else {
        ""
    }
}

/// One attempt at running `ops` in a transaction, bounded by `deadline` and abandoned when
/// the circuit opens meanwhile.
async fn attempt(shared: &Shared, ops: &[&Op], deadline: Instant) -> Result<Vec<bool>, Failure> {
    let committing = AtomicBool::new(false);
    let result = tokio::select! {
        result = tokio::time::timeout_at(deadline, run_batch(shared, ops, &committing)) => {
            result.map_err(|_| Cause::TimedOut)
        }
        () = shared.circuit.opened() => Err(Cause::CircuitOpen),
    };
    let unknown = committing.load(Ordering::Acquire);
    match result {
        Ok(Ok(outcomes)) => Ok(outcomes),
        Ok(Err(error)) => Err(Failure {
            cause: Cause::Database(error),
            unknown,
        }),
        Err(cause) => Err(Failure { cause, unknown }),
    }
}

/// Runs `ops` as one batch and, if it fails, each alone, all within one `write_timeout`.
async fn commit(shared: &Arc<Shared>, ops: &[&Op]) -> Vec<Result<bool, ProviderError>> {
    let deadline = Instant::now() + shared.options.write_timeout;
    let failure = match attempt(shared, ops, deadline).await {
        Ok(outcomes) => return outcomes.into_iter().map(Ok).collect(),
        Err(failure) => failure,
    };
    if failure.unreachable() {
        let opened = matches!(failure.cause, Cause::CircuitOpen);
        let left = deadline.saturating_duration_since(Instant::now());
        if opened || !circuit::probe(&shared.pool, left.min(INLINE_PROBE)).await {
            let mut cause = failure.describe(shared);
            if !opened {
                circuit::trip(shared, &cause);
                cause = format!("database unreachable: {cause}");
            }
            let error =
                ProviderError::backend(NAME, format!("{cause}{}", unknown_note(failure.unknown)));
            return ops.iter().map(|_| Err(error.clone())).collect();
        }
    }
    if ops.len() == 1 && !failure.unknown {
        return vec![Err(failure.into_error(shared, ops[0]))];
    }
    // Find the culprit (or, after a lost commit answer, what was applied): each op alone.
    let mut outcomes = Vec::with_capacity(ops.len());
    for op in ops {
        outcomes.push(replay(shared, op, deadline, failure.unknown).await);
    }
    outcomes
}

/// Runs `op` alone after its batch failed. `unknown`: the batch may have been applied, so an
/// insert finding its own event already stored succeeds.
async fn replay(
    shared: &Arc<Shared>,
    op: &Op,
    deadline: Instant,
    unknown: bool,
) -> Result<bool, ProviderError> {
    if let Some(reason) = shared.circuit.reason() {
        return Err(ProviderError::backend(
            NAME,
            format!("{reason}{}", unknown_note(unknown)),
        ));
    }
    if Instant::now() >= deadline {
        return Err(ProviderError::backend(
            NAME,
            format!(
                "write_timeout ({:?}) ran out before this write could be retried alone{}",
                shared.options.write_timeout,
                unknown_note(unknown)
            ),
        ));
    }
    let failure = match attempt(shared, &[op], deadline).await {
        Ok(mut outcomes) => return Ok(outcomes.pop().unwrap_or(false)),
        Err(failure) => failure,
    };
    if failure.unreachable() {
        circuit::trip(shared, &failure.describe(shared));
    }
    if let (Op::Insert { values, id, .. }, Cause::Database(sqlx::Error::Database(db))) =
        (op, &failure.cause)
        && db.is_unique_violation()
    {
        // Definite: the id is taken. By this very event if its batch was applied.
        if unknown && stored_equal(shared, values, deadline).await? {
            return Ok(true);
        }
        return Err(ProviderError::Duplicate(id.clone()));
    }
    let unknown = unknown || failure.unknown;
    Err(Failure { unknown, ..failure }.into_error(shared, op))
}

/// Whether the event stored under `values`' id is the event `values` describes (same id and
/// content; its processing state may have moved on).
///
/// # Errors
/// The read failed or the deadline passed.
async fn stored_equal(
    shared: &Shared,
    values: &EventValues,
    deadline: Instant,
) -> Result<bool, ProviderError> {
    let read = sqlx::query(AssertSqlSafe(shared.q.get.clone()))
        .bind(values.id().to_owned())
        .bind(shared.group().to_owned())
        .fetch_optional(&shared.pool);
    let row = tokio::time::timeout_at(deadline, read)
        .await
        .map_err(|_| {
            ProviderError::backend(
                NAME,
                "write_timeout ran out while checking whether a replayed insert was applied",
            )
        })?
        .map_err(db_error)?;
    match row {
        None => Ok(false),
        Some(row) => Ok(values.same_event(&EventValues::new(&decode_event(&row, 0)?)?)),
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
        let outcomes = match shared.circuit.check() {
            Ok(()) => commit(&shared, &ops).await,
            Err(error) => ops.iter().map(|_| Err(error.clone())).collect(),
        };
        shared.signal(wake).await;
        for (request, outcome) in requests.into_iter().zip(outcomes) {
            let _ = request.reply.send(outcome);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::config::SqlConfig;
    use crate::{SqlProvider, now_micros};
    use eventbroker::event::{Event, EventSource};
    use eventbroker::provider::Provider;

    async fn sqlite() -> (tempfile::TempDir, SqlProvider) {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = SqlConfig {
            url: format!("sqlite://{}", dir.path().join("events.db").display()),
            ..SqlConfig::default()
        };
        let provider = SqlProvider::connect(&config, &eventbroker::BrokerConfig::default())
            .await
            .expect("provider");
        (dir, provider)
    }

    fn insert(event: &Event) -> Op {
        Op::Insert {
            values: Box::new(EventValues::new(event).expect("values")),
            id: event.id.clone(),
            publish: true,
            now: now_micros(),
        }
    }

    /// After a lost commit answer, replaying an insert that finds the very same event stored
    /// succeeds; a different event under the id, or the same event when nothing was lost, is
    /// a duplicate.
    #[tokio::test]
    async fn replayed_inserts_are_idempotent_only_for_the_same_event_after_a_lost_answer() {
        let (_dir, provider) = sqlite().await;
        let shared = provider.shared.clone();
        let event =
            Event::new(EventSource::System, "replay.one", "h").with_payload(json!({"n": 1}));
        provider.publish(&event).await.expect("publish");
        let deadline = Instant::now() + Duration::from_secs(60);

        let replayed = replay(&shared, &insert(&event), deadline, true).await;
        assert!(matches!(replayed, Ok(true)), "{replayed:?}");

        let again = replay(&shared, &insert(&event), deadline, false).await;
        assert!(
            matches!(&again, Err(ProviderError::Duplicate(id)) if *id == event.id),
            "{again:?}"
        );

        let mut other = event.clone();
        other.payload = json!({"n": 2});
        for unknown in [true, false] {
            let replayed = replay(&shared, &insert(&other), deadline, unknown).await;
            assert!(
                matches!(&replayed, Err(ProviderError::Duplicate(id)) if *id == event.id),
                "{replayed:?}"
            );
        }
        let mut later = event.clone();
        later.created_at += chrono::TimeDelta::seconds(1);
        let replayed = replay(&shared, &insert(&later), deadline, true).await;
        assert!(
            matches!(replayed, Err(ProviderError::Duplicate(_))),
            "{replayed:?}"
        );
        provider.close().await;
    }

    /// A replay whose deadline has passed fails at once, saying so.
    #[tokio::test]
    async fn a_replay_after_the_deadline_fails_with_a_clear_error() {
        let (_dir, provider) = sqlite().await;
        let shared = provider.shared.clone();
        let event = Event::new(EventSource::System, "replay.late", "h");
        let replayed = replay(&shared, &insert(&event), Instant::now(), true).await;
        let error = replayed.expect_err("deadline passed").to_string();
        assert!(
            error.contains("write_timeout") && error.contains("may have been applied"),
            "{error}"
        );
        assert!(provider.get(&event.id).await.expect("get").is_none());
        provider.close().await;
    }
}
