//! The provider's tables, their versioned migrations, and every SQL statement it runs.
//!
//! Three tables per configured name `T` (validated by [`super::dialect::validate_identifier`],
//! the only text ever interpolated into SQL; values always go through placeholders):
//! - `T`: one row per event. `seq` is an internal ascending key (claim order), timestamps are
//!   Unix nanoseconds, JSON is stored as text. `published` tells published events (delivered
//!   to consumer groups) from merely stored ones (sync mode). SQLite adds `changed`, a
//!   change sequence assigned inside the single-writer transaction, which watchers poll.
//! - `T_groups`: the consumer groups that ever consumed.
//! - `T_deliveries`: one row per (group, event) not yet acknowledged by that group.
//!   `visible_at` (Unix microseconds) is when it may be claimed: the publish time, a retry's
//!   due time, or a lease's expiry (a visibility timeout). `lease_token` is set while leased.
//!   A row is deleted when its group acknowledges the event.
//!
//! Deliveries are rows created in the same transaction as the event, so a consumer never has
//! to reason about commit order: whatever is committed and visible is claimable, and nothing
//! is skipped when publishers commit out of `seq` order.

use sqlx::AnyPool;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AssertSqlSafe, SqlSafeStr};

use super::dialect::Dialect;
use super::row::{EVENT_COLUMN_COUNT, EVENT_COLUMNS, placeholders, update_assignments};
use super::{NAME, db_error};
use crate::provider::ProviderError;

/// The migrations, oldest first. Never edit an applied one: add a new version instead.
fn migrations(dialect: Dialect, t: &str) -> Vec<(i64, &'static str, String)> {
    let (seq_column, int, without_rowid) = match dialect {
        Dialect::Postgres => (
            "seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
            "BIGINT",
            "",
        ),
        Dialect::Sqlite => (
            "seq INTEGER PRIMARY KEY AUTOINCREMENT",
            "INTEGER",
            " WITHOUT ROWID",
        ),
    };
    let changed = match dialect {
        Dialect::Postgres => String::new(),
        Dialect::Sqlite => format!(",\n    changed {int} NOT NULL DEFAULT 0"),
    };
    let changed_index = match dialect {
        Dialect::Postgres => String::new(),
        Dialect::Sqlite => {
            format!("CREATE INDEX IF NOT EXISTS {t}_changed_idx ON {t} (changed);\n")
        }
    };
    let v1 = format!(
        "CREATE TABLE IF NOT EXISTS {t} (
    {seq_column},
    id TEXT NOT NULL UNIQUE,
    source TEXT NOT NULL,
    type TEXT NOT NULL,
    status TEXT NOT NULL,
    payload TEXT NOT NULL,
    user_id {int},
    session_id TEXT NOT NULL DEFAULT '',
    instance_id TEXT NOT NULL DEFAULT '',
    schema TEXT NOT NULL DEFAULT '',
    entity TEXT NOT NULL DEFAULT '',
    operation TEXT NOT NULL DEFAULT '',
    created_at {int} NOT NULL,
    processed_at {int},
    completed_at {int},
    error TEXT,
    metadata TEXT NOT NULL DEFAULT '{{}}',
    retry_count {int} NOT NULL DEFAULT 0,
    handlers TEXT NOT NULL DEFAULT '[]',
    published {int} NOT NULL DEFAULT 0{changed}
);
CREATE INDEX IF NOT EXISTS {t}_source_idx ON {t} (source);
CREATE INDEX IF NOT EXISTS {t}_type_idx ON {t} (type);
CREATE INDEX IF NOT EXISTS {t}_status_idx ON {t} (status);
CREATE INDEX IF NOT EXISTS {t}_created_at_idx ON {t} (created_at);
CREATE INDEX IF NOT EXISTS {t}_instance_id_idx ON {t} (instance_id);
{changed_index}CREATE TABLE IF NOT EXISTS {t}_groups (
    name TEXT PRIMARY KEY,
    created_at {int} NOT NULL
);
CREATE TABLE IF NOT EXISTS {t}_deliveries (
    grp TEXT NOT NULL,
    seq {int} NOT NULL,
    visible_at {int} NOT NULL,
    lease_token TEXT,
    consumer TEXT,
    delivery_count {int} NOT NULL DEFAULT 0,
    PRIMARY KEY (grp, seq)
){without_rowid};
CREATE INDEX IF NOT EXISTS {t}_deliveries_seq_idx ON {t}_deliveries (seq);
CREATE INDEX IF NOT EXISTS {t}_deliveries_leased_idx ON {t}_deliveries (visible_at)
    WHERE lease_token IS NOT NULL;
"
    );
    vec![(1, "events, consumer groups and deliveries", v1)]
}

/// Creates or upgrades the schema: versioned migrations recorded in `T_migrations`
/// (PostgreSQL serializes concurrent starts with an advisory lock).
///
/// # Errors
/// The database refused a migration, or an applied migration differs from this build's.
pub async fn migrate(pool: &AnyPool, dialect: Dialect, table: &str) -> Result<(), ProviderError> {
    let migrations = migrations(dialect, table)
        .into_iter()
        .map(|(version, description, sql)| {
            Migration::new(
                version,
                description.into(),
                MigrationType::Simple,
                AssertSqlSafe(sql).into_sql_str(),
                false,
            )
        })
        .collect();
    let mut migrator = Migrator::with_migrations(migrations);
    migrator.dangerous_set_table_name(format!("{table}_migrations"));
    migrator.run(pool).await.map_err(|error| {
        ProviderError::backend(NAME, format!("migrating table {table} failed: {error}"))
    })
}

/// Every statement of the provider, built once for one dialect and table.
#[derive(Debug, Clone)]
pub struct Queries {
    /// PostgreSQL: NOTIFY channel; SQLite: unused.
    pub channel: String,
    /// Advisory lock name serializing group creation against publishes (PostgreSQL).
    pub lock_name: String,
    /// `SELECT 1 FROM pg_advisory_xact_lock_shared(…)` ($1 lock name).
    pub lock_shared: String,
    /// `SELECT 1 FROM pg_advisory_xact_lock(…)` ($1 lock name).
    pub lock_exclusive: String,
    /// Inserts a published event and its deliveries. PostgreSQL: one statement, $1..$18
    /// event, $19 visible_at, $20 channel; returns seq. SQLite: event only, returns seq.
    pub publish: String,
    /// SQLite: deliveries of a just-published event for every group ($1 seq, $2 visible_at).
    pub publish_deliveries: String,
    /// Inserts a stored (not published) event: $1..$18 (PostgreSQL $19 channel).
    pub store: String,
    /// One event by id ($1).
    pub get: String,
    /// Status update by id: $1 id, $2..$7 update (PostgreSQL $8 channel).
    pub update_status: String,
    /// Deletes an event (PostgreSQL: and its deliveries) by id ($1); returns seq.
    pub delete_event: String,
    /// SQLite: deletes the deliveries of an event ($1 seq).
    pub delete_deliveries: String,
    /// Requeues a finished event: $1 id, $2..$7 update; PostgreSQL also upserts deliveries
    /// ($8 visible_at) and notifies ($9 channel). Returns seq.
    pub requeue: String,
    /// SQLite: upserts deliveries for every group ($1 seq, $2 visible_at).
    pub requeue_deliveries: String,
    /// The status of an event by id ($1).
    pub status_of: String,
    /// Whether a group exists ($1).
    pub group_exists: String,
    /// Creates a group ($1 name, $2 created_at) unless it exists.
    pub insert_group: String,
    /// Deliveries of every unfinished published event for a new group ($1 group,
    /// $2 visible_at).
    pub backfill: String,
    /// Claims up to $3 visible deliveries of group $1 at time $2: sets visible_at $4 (lease
    /// end), lease token $5, consumer $6. PostgreSQL returns seq, delivery_count and the
    /// event columns; SQLite returns seq, delivery_count.
    pub claim: String,
    /// The earliest `visible_at` of group $1.
    pub next_due: String,
    /// Acknowledges: $1 group, $2 seq, $3 token, $4..$9 update (PostgreSQL $10 channel).
    /// SQLite: deletes the delivery only.
    pub complete: String,
    /// SQLite: applies $2..$7 to the event with seq $1 (also used by retry).
    pub update_by_seq: String,
    /// Retry: $1 group, $2 seq, $3 token, $4 visible_at, $5..$10 update (PostgreSQL $11
    /// channel). SQLite: updates the delivery only.
    pub retry: String,
    /// Release: $1 group, $2 seq, $3 token, $4 visible_at (PostgreSQL $5 channel).
    /// SQLite: updates the delivery only.
    pub release: String,
    /// SQLite: status back to pending for the event with seq $1.
    pub release_event: String,
    /// Extends a lease: $1 group, $2 seq, $3 token, $4 new visible_at.
    pub keep_alive: String,
    /// Hands back every lease of consumer $2 in group $1, visible at $3.
    pub hand_back: String,
    /// A bare wake-up notification ($1 channel, PostgreSQL).
    pub wake: String,
    /// Expired leases back to pending, at time $1. PostgreSQL: one statement returning the
    /// number of leases cleared. SQLite: resets event statuses only.
    pub rescue: String,
    /// SQLite: clears expired leases at time $1.
    pub rescue_leases: String,
    /// Event counts by status.
    pub count_by_status: String,
    /// Per group: backlog and leased deliveries at time $1.
    pub group_stats: String,
    /// SQLite: the newest change sequence.
    pub max_changed: String,
    /// SQLite: changes after ($1 changed, $2 seq), at most $3: changed, seq, event columns.
    pub changes: String,
}

impl Queries {
    /// The statements for `dialect` on table `t` (already validated).
    pub fn new(dialect: Dialect, t: &str) -> Self {
        let d = format!("{t}_deliveries");
        let g = format!("{t}_groups");
        let values = placeholders(1, EVENT_COLUMN_COUNT);
        let next = EVENT_COLUMN_COUNT + 1;
        let qualified_columns = EVENT_COLUMNS
            .split(", ")
            .map(|c| format!("e.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let bump = format!("changed = (SELECT COALESCE(MAX(changed), 0) + 1 FROM {t})");
        let lock_shared =
            "SELECT 1 FROM pg_advisory_xact_lock_shared(hashtextextended($1, 0))".to_owned();
        let lock_exclusive =
            "SELECT 1 FROM pg_advisory_xact_lock(hashtextextended($1, 0))".to_owned();
        let common_get = format!("SELECT {EVENT_COLUMNS} FROM {t} WHERE id = $1");
        let insert_group = format!(
            "INSERT INTO {g} (name, created_at) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING"
        );
        let backfill = format!(
            "INSERT INTO {d} (grp, seq, visible_at, delivery_count) \
             SELECT $1, seq, $2, 0 FROM {t} \
             WHERE published = 1 AND status IN ('pending', 'processing') \
             ON CONFLICT (grp, seq) DO NOTHING"
        );
        let keep_alive = format!(
            "UPDATE {d} SET visible_at = $4 WHERE grp = $1 AND seq = $2 AND lease_token = $3"
        );
        let hand_back = format!(
            "UPDATE {d} SET visible_at = $3, lease_token = NULL, consumer = NULL \
             WHERE grp = $1 AND consumer = $2"
        );
        let next_due = format!("SELECT MIN(visible_at) FROM {d} WHERE grp = $1");
        let count_by_status = format!("SELECT status, COUNT(*) FROM {t} GROUP BY status");
        let group_stats = format!(
            "SELECT g.name, COUNT(d.seq), \
             COALESCE(SUM(CASE WHEN d.lease_token IS NOT NULL AND d.visible_at > $1 \
             THEN 1 ELSE 0 END), 0) \
             FROM {g} g LEFT JOIN {d} d ON d.grp = g.name GROUP BY g.name"
        );
        let status_of = format!("SELECT status FROM {t} WHERE id = $1");
        let group_exists = format!("SELECT 1 FROM {g} WHERE name = $1");
        let lease_clear = "lease_token = NULL, consumer = NULL";
        match dialect {
            Dialect::Postgres => Queries {
                channel: format!("{t}_events"),
                lock_name: format!("eventbroker:{t}"),
                lock_shared,
                lock_exclusive,
                publish: format!(
                    "WITH ins AS (INSERT INTO {t} ({EVENT_COLUMNS}, published) \
                     VALUES ({values}, 1) RETURNING seq, id), \
                     dl AS (INSERT INTO {d} (grp, seq, visible_at, delivery_count) \
                     SELECT g.name, ins.seq, ${next}, 0 FROM ins CROSS JOIN {g} g) \
                     SELECT ins.seq FROM ins, LATERAL pg_notify(${}, 'p' || ins.id) n",
                    next + 1
                ),
                publish_deliveries: String::new(),
                store: format!(
                    "WITH ins AS (INSERT INTO {t} ({EVENT_COLUMNS}, published) \
                     VALUES ({values}, 0) RETURNING seq, id) \
                     SELECT ins.seq FROM ins, LATERAL pg_notify(${next}, 'c' || ins.id) n"
                ),
                get: common_get,
                update_status: format!(
                    "WITH u AS (UPDATE {t} SET {} WHERE id = $1 RETURNING id) \
                     SELECT 1 FROM u, LATERAL pg_notify($8, 'c' || u.id) n",
                    update_assignments(2)
                ),
                delete_event: format!(
                    "WITH e AS (DELETE FROM {t} WHERE id = $1 RETURNING seq), \
                     dl AS (DELETE FROM {d} WHERE seq IN (SELECT seq FROM e)) \
                     SELECT seq FROM e"
                ),
                delete_deliveries: String::new(),
                requeue: format!(
                    "WITH u AS (UPDATE {t} SET {}, published = 1 WHERE id = $1 \
                     AND status IN ('completed', 'failed') RETURNING seq, id), \
                     dl AS (INSERT INTO {d} (grp, seq, visible_at, delivery_count) \
                     SELECT g.name, u.seq, $8, 0 FROM u CROSS JOIN {g} g \
                     ON CONFLICT (grp, seq) DO UPDATE SET visible_at = EXCLUDED.visible_at, \
                     {lease_clear}, delivery_count = 0) \
                     SELECT u.seq FROM u, LATERAL pg_notify($9, 'p' || u.id) n",
                    update_assignments(2)
                ),
                requeue_deliveries: String::new(),
                status_of,
                group_exists,
                insert_group,
                backfill,
                claim: format!(
                    "WITH c AS (SELECT grp, seq FROM {d} WHERE grp = $1 AND visible_at <= $2 \
                     ORDER BY seq LIMIT $3 FOR UPDATE SKIP LOCKED), \
                     u AS (UPDATE {d} dl SET visible_at = $4, lease_token = $5, consumer = $6, \
                     delivery_count = dl.delivery_count + 1 FROM c \
                     WHERE dl.grp = c.grp AND dl.seq = c.seq \
                     RETURNING dl.seq, dl.delivery_count) \
                     SELECT u.seq, u.delivery_count, {qualified_columns} \
                     FROM u JOIN {t} e ON e.seq = u.seq ORDER BY u.seq"
                ),
                next_due,
                complete: format!(
                    "WITH dl AS (DELETE FROM {d} WHERE grp = $1 AND seq = $2 AND lease_token = $3 \
                     RETURNING seq), \
                     u AS (UPDATE {t} e SET {} FROM dl WHERE e.seq = dl.seq RETURNING e.id) \
                     SELECT 1 FROM u, LATERAL pg_notify($10, 'c' || u.id) n",
                    update_assignments(4)
                ),
                update_by_seq: String::new(),
                retry: format!(
                    "WITH dl AS (UPDATE {d} SET visible_at = $4, {lease_clear} \
                     WHERE grp = $1 AND seq = $2 AND lease_token = $3 RETURNING seq), \
                     u AS (UPDATE {t} e SET {} FROM dl WHERE e.seq = dl.seq RETURNING e.id) \
                     SELECT 1 FROM u, LATERAL pg_notify($11, 'p' || u.id) n",
                    update_assignments(5)
                ),
                release: format!(
                    "WITH dl AS (UPDATE {d} SET visible_at = $4, {lease_clear}, \
                     delivery_count = GREATEST(delivery_count - 1, 0) \
                     WHERE grp = $1 AND seq = $2 AND lease_token = $3 RETURNING seq), \
                     u AS (UPDATE {t} e SET status = 'pending', completed_at = NULL \
                     FROM dl WHERE e.seq = dl.seq RETURNING e.id) \
                     SELECT 1 FROM u, LATERAL pg_notify($5, 'p' || u.id) n"
                ),
                release_event: String::new(),
                keep_alive,
                hand_back,
                wake: "SELECT 1 FROM pg_notify($1, 'w') n".to_owned(),
                rescue: format!(
                    "WITH x AS (UPDATE {d} SET {lease_clear} \
                     WHERE lease_token IS NOT NULL AND visible_at <= $1 RETURNING seq), \
                     u AS (UPDATE {t} e SET status = 'pending' \
                     FROM (SELECT DISTINCT seq FROM x) s \
                     WHERE e.seq = s.seq AND e.status = 'processing' RETURNING e.id) \
                     SELECT (SELECT COUNT(*) FROM x), (SELECT COUNT(*) FROM u)"
                ),
                rescue_leases: String::new(),
                count_by_status,
                group_stats,
                max_changed: String::new(),
                changes: String::new(),
            },
            Dialect::Sqlite => Queries {
                channel: String::new(),
                lock_name: String::new(),
                lock_shared,
                lock_exclusive,
                publish: format!(
                    "INSERT INTO {t} ({EVENT_COLUMNS}, published, changed) \
                     VALUES ({values}, 1, (SELECT COALESCE(MAX(changed), 0) + 1 FROM {t})) \
                     RETURNING seq"
                ),
                publish_deliveries: format!(
                    "INSERT INTO {d} (grp, seq, visible_at, delivery_count) \
                     SELECT name, $1, $2, 0 FROM {g}"
                ),
                store: format!(
                    "INSERT INTO {t} ({EVENT_COLUMNS}, published, changed) \
                     VALUES ({values}, 0, (SELECT COALESCE(MAX(changed), 0) + 1 FROM {t})) \
                     RETURNING seq"
                ),
                get: common_get,
                update_status: format!(
                    "UPDATE {t} SET {}, {bump} WHERE id = $1",
                    update_assignments(2)
                ),
                delete_event: format!("DELETE FROM {t} WHERE id = $1 RETURNING seq"),
                delete_deliveries: format!("DELETE FROM {d} WHERE seq = $1"),
                requeue: format!(
                    "UPDATE {t} SET {}, published = 1, {bump} WHERE id = $1 \
                     AND status IN ('completed', 'failed') RETURNING seq",
                    update_assignments(2)
                ),
                requeue_deliveries: format!(
                    "INSERT INTO {d} (grp, seq, visible_at, delivery_count) \
                     SELECT name, $1, $2, 0 FROM {g} WHERE true \
                     ON CONFLICT (grp, seq) DO UPDATE SET visible_at = excluded.visible_at, \
                     {lease_clear}, delivery_count = 0"
                ),
                status_of,
                group_exists,
                insert_group,
                backfill,
                claim: format!(
                    "UPDATE {d} SET visible_at = $4, lease_token = $5, consumer = $6, \
                     delivery_count = delivery_count + 1 \
                     WHERE grp = $1 AND seq IN (SELECT seq FROM {d} \
                     WHERE grp = $1 AND visible_at <= $2 ORDER BY seq LIMIT $3) \
                     RETURNING seq, delivery_count"
                ),
                next_due,
                complete: format!(
                    "DELETE FROM {d} WHERE grp = $1 AND seq = $2 AND lease_token = $3"
                ),
                update_by_seq: format!(
                    "UPDATE {t} SET {}, {bump} WHERE seq = $1",
                    update_assignments(2)
                ),
                retry: format!(
                    "UPDATE {d} SET visible_at = $4, {lease_clear} \
                     WHERE grp = $1 AND seq = $2 AND lease_token = $3"
                ),
                release: format!(
                    "UPDATE {d} SET visible_at = $4, {lease_clear}, \
                     delivery_count = MAX(delivery_count - 1, 0) \
                     WHERE grp = $1 AND seq = $2 AND lease_token = $3"
                ),
                release_event: format!(
                    "UPDATE {t} SET status = 'pending', completed_at = NULL, {bump} WHERE seq = $1"
                ),
                keep_alive,
                hand_back,
                wake: String::new(),
                rescue: format!(
                    "UPDATE {t} SET status = 'pending', {bump} WHERE status = 'processing' \
                     AND seq IN (SELECT seq FROM {d} \
                     WHERE lease_token IS NOT NULL AND visible_at <= $1)"
                ),
                rescue_leases: format!(
                    "UPDATE {d} SET {lease_clear} \
                     WHERE lease_token IS NOT NULL AND visible_at <= $1"
                ),
                count_by_status,
                group_stats,
                max_changed: format!("SELECT COALESCE(MAX(changed), 0) FROM {t}"),
                changes: format!(
                    "SELECT changed, seq, {EVENT_COLUMNS} FROM {t} \
                     WHERE changed > $1 OR (changed = $1 AND seq > $2) \
                     ORDER BY changed, seq LIMIT $3"
                ),
            },
        }
    }

    /// `SELECT` of the event columns for the events with the given `count` seqs
    /// (`$1..$count`), with seq first.
    pub fn events_by_seq(t: &str, count: usize) -> String {
        format!(
            "SELECT seq, {EVENT_COLUMNS} FROM {t} WHERE seq IN ({})",
            placeholders(1, count)
        )
    }

    /// `SELECT` of the event columns for the events with the given `count` ids.
    pub fn events_by_id(t: &str, count: usize) -> String {
        format!(
            "SELECT {EVENT_COLUMNS} FROM {t} WHERE id IN ({})",
            placeholders(1, count)
        )
    }
}

/// Maps a database error of a statement that inserts event `id`.
pub fn insert_error(error: sqlx::Error, id: &str) -> ProviderError {
    match &error {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            ProviderError::Duplicate(id.to_owned())
        }
        _ => db_error(error),
    }
}
