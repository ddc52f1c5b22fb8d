//! The provider's tables, their versioned migrations, and every SQL statement it runs.
//!
//! Four tables per configured name `T` (validated by [`super::dialect::validate_identifier`],
//! the only text ever interpolated into SQL; values always go through placeholders):
//! - `T`: one row per event. `seq` is an internal ascending key (claim order), timestamps are
//!   Unix nanoseconds, JSON is stored as text. `published` tells published events (delivered
//!   to consumer groups) from merely stored ones (sync mode). Its state columns (status,
//!   error, retry count, handler outcomes, times) are the state the event was stored with,
//!   the starting state of every group. SQLite adds `changed`, a change sequence assigned
//!   inside the single-writer transaction, which watchers poll.
//! - `T_states`: one row per (group, event) whose state the group changed: the group's own
//!   status, error, retry count, handler outcomes and times (SQLite: and `changed`, from the
//!   same sequence as `T.changed`). A group reads an event joined with its state row, the
//!   event row's state standing in when there is none.
//! - `T_groups`: the consumer groups that ever consumed.
//! - `T_deliveries`: one row per (group, event) not yet acknowledged by that group.
//!   `visible_at` (Unix microseconds) is when it may be claimed: the publish time, a retry's
//!   due time, or a lease's expiry (a visibility timeout). `lease_token` is set while leased.
//!   A row is deleted when its group acknowledges the event.
//!
//! PostgreSQL also holds the cluster handler store ([`crate::handler_store`], migration 3):
//! `T_handlers` (one record per handler name and its revision), `T_handler_components`
//! (component bytes by version), `T_handler_reports` (each host's report and its expiry) and
//! the sequence `T_handler_revisions` every record write takes its revision from.
//!
//! Both hold handlers' key-value state ([`crate::keyvalue`], migration 4): `T_kv` (one row
//! per namespace and key: the value's bytes and an id unique in the namespace, the order keys
//! are listed in) and `T_kv_usage` (each namespace's keys and bytes, as its quota counts them).
//!
//! Deliveries are rows created in the same transaction as the event, so a consumer never has
//! to reason about commit order: whatever is committed and visible is claimable, and nothing
//! is skipped when publishers commit out of `seq` order.

use sqlx::AnyPool;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AssertSqlSafe, SqlSafeStr};

use super::dialect::Dialect;
use super::row::{EVENT_COLUMN_COUNT, EVENT_COLUMNS, placeholders};
use super::{NAME, db_error};
use eventbroker::provider::{ProviderError, statuses_kept_by_release};

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
    let state_changed = match dialect {
        Dialect::Postgres => String::new(),
        Dialect::Sqlite => format!(",\n    changed {int} NOT NULL DEFAULT 0"),
    };
    let state_changed_index = match dialect {
        Dialect::Postgres => String::new(),
        Dialect::Sqlite => {
            format!("CREATE INDEX IF NOT EXISTS {t}_states_changed_idx ON {t}_states (changed);\n")
        }
    };
    // Version 1 kept one state per event, shared by every group: each existing group keeps
    // it as its own, and published events start fresh for groups created from now on.
    let v2 = format!(
        "CREATE TABLE IF NOT EXISTS {t}_states (
    grp TEXT NOT NULL,
    seq {int} NOT NULL,
    status TEXT NOT NULL,
    error TEXT,
    retry_count {int} NOT NULL DEFAULT 0,
    handlers TEXT NOT NULL DEFAULT '[]',
    processed_at {int},
    completed_at {int}{state_changed},
    PRIMARY KEY (grp, seq)
){without_rowid};
CREATE INDEX IF NOT EXISTS {t}_states_seq_idx ON {t}_states (seq);
CREATE INDEX IF NOT EXISTS {t}_states_status_idx ON {t}_states (grp, status);
{state_changed_index}INSERT INTO {t}_states
    (grp, seq, status, error, retry_count, handlers, processed_at, completed_at)
    SELECT g.name, e.seq, e.status, e.error, e.retry_count, e.handlers, e.processed_at,
        e.completed_at
    FROM {t} e CROSS JOIN {t}_groups g WHERE e.published = 1;
UPDATE {t} SET status = 'pending', error = NULL, retry_count = 0, handlers = '[]',
    processed_at = NULL, completed_at = NULL
    WHERE published = 1;
"
    );
    let mut migrations = vec![
        (1, "events, consumer groups and deliveries", v1),
        (2, "per-group event states", v2),
    ];
    // The cluster handler store exists on PostgreSQL only (SQLite is one host): version 3 is
    // never applied to SQLite, and later versions keep counting from 4 on both dialects.
    if dialect == Dialect::Postgres {
        migrations.push((3, "cluster handler store", handler_store_tables(t)));
    }
    migrations.push((4, "handlers' key-value state", keyvalue_tables(dialect, t)));
    migrations
}

/// The tables of handlers' key-value state ([`crate::keyvalue`]): the entries, each with an id
/// unique in its namespace (the order keys are listed in), and each namespace's usage.
fn keyvalue_tables(dialect: Dialect, t: &str) -> String {
    let blob = match dialect {
        Dialect::Postgres => "BYTEA",
        Dialect::Sqlite => "BLOB",
    };
    format!(
        "CREATE TABLE IF NOT EXISTS {t}_kv (
    ns TEXT NOT NULL,
    key TEXT NOT NULL,
    value {blob} NOT NULL,
    id BIGINT NOT NULL,
    PRIMARY KEY (ns, key)
);
CREATE UNIQUE INDEX IF NOT EXISTS {t}_kv_id_idx ON {t}_kv (ns, id);
CREATE TABLE IF NOT EXISTS {t}_kv_usage (
    ns TEXT PRIMARY KEY,
    keys BIGINT NOT NULL,
    bytes BIGINT NOT NULL
);
"
    )
}

/// PostgreSQL: the tables of the cluster handler store ([`crate::handler_store`]) and the
/// sequence every record write takes its revision from (so that a name deleted and created
/// again never reuses a revision).
fn handler_store_tables(t: &str) -> String {
    format!(
        "CREATE SEQUENCE IF NOT EXISTS {t}_handler_revisions;
CREATE TABLE IF NOT EXISTS {t}_handlers (
    name TEXT PRIMARY KEY,
    revision BIGINT NOT NULL,
    doc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS {t}_handler_components (
    version TEXT PRIMARY KEY,
    bytes BYTEA NOT NULL,
    stored_at TIMESTAMPTZ
);
CREATE TABLE IF NOT EXISTS {t}_handler_reports (
    host TEXT PRIMARY KEY,
    doc TEXT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
"
    )
}

/// The columns whose values are per group ([`eventbroker::provider::GroupState`]).
const STATE_COLUMNS: [&str; 6] = [
    "status",
    "processed_at",
    "completed_at",
    "error",
    "retry_count",
    "handlers",
];

/// The event columns as one group sees them, in `EVENT_COLUMNS` order and under those names,
/// over `T e LEFT JOIN T_states s` ([`view_from`]).
pub fn view_columns() -> String {
    EVENT_COLUMNS
        .split(", ")
        .map(|column| {
            if STATE_COLUMNS.contains(&column) {
                format!("CASE WHEN s.seq IS NULL THEN e.{column} ELSE s.{column} END AS {column}")
            } else {
                format!("e.{column} AS {column}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `T e LEFT JOIN T_states s` for the group given by the SQL expression `group`.
pub fn view_from(t: &str, group: &str) -> String {
    format!("{t} e LEFT JOIN {t}_states s ON s.grp = {group} AND s.seq = e.seq")
}

/// An upsert of the state of group `group` (an SQL expression) for the event `e` selected by
/// `from` (a `FROM … WHERE …` clause naming it `e`), with the six update values from
/// placeholder `$first` in [`super::row::UpdateValues::bind`] order. A missing processing time keeps the
/// one recorded (or the event row's). SQLite also assigns the next change sequence.
fn upsert_state(dialect: Dialect, t: &str, group: &str, from: &str, first: usize) -> String {
    let p = |offset: usize| format!("${}", first + offset);
    let (column, value, set) = match dialect {
        Dialect::Postgres => (String::new(), String::new(), String::new()),
        Dialect::Sqlite => (
            ", changed".to_owned(),
            format!(", {}", sqlite_bump(t)),
            ", changed = excluded.changed".to_owned(),
        ),
    };
    format!(
        "INSERT INTO {t}_states AS cur \
         (grp, seq, status, error, retry_count, handlers, processed_at, completed_at{column}) \
         SELECT {group}, e.seq, {}, {}, {}, {}, COALESCE({}, e.processed_at), {}{value} {from} \
         ON CONFLICT (grp, seq) DO UPDATE SET status = excluded.status, \
         error = excluded.error, retry_count = excluded.retry_count, \
         handlers = excluded.handlers, processed_at = COALESCE({}, cur.processed_at), \
         completed_at = excluded.completed_at{set}",
        p(0),
        p(1),
        p(2),
        p(3),
        p(4),
        p(5),
        p(4),
    )
}

/// The statuses a release keeps ([`statuses_kept_by_release`], the core's rule) as an SQL
/// list: `'completed', 'failed'`.
fn kept_by_release() -> String {
    statuses_kept_by_release()
        .map(|status| format!("'{}'", status.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// An upsert giving the state of group `group` of the event `e` selected by `from` back
/// unprocessed, by the core's rule ([`eventbroker::provider::release_keeps`]): `pending` and
/// not completed, unless the group's status is one a release keeps; its other fields stay.
fn release_state(dialect: Dialect, t: &str, group: &str, from: &str) -> String {
    let (column, value, set) = match dialect {
        Dialect::Postgres => (String::new(), String::new(), String::new()),
        Dialect::Sqlite => (
            ", changed".to_owned(),
            format!(", {}", sqlite_bump(t)),
            ", changed = excluded.changed".to_owned(),
        ),
    };
    let kept = kept_by_release();
    format!(
        "INSERT INTO {t}_states AS cur \
         (grp, seq, status, error, retry_count, handlers, processed_at, completed_at{column}) \
         SELECT {group}, e.seq, \
         CASE WHEN e.status IN ({kept}) THEN e.status ELSE 'pending' END, \
         e.error, e.retry_count, e.handlers, e.processed_at, \
         CASE WHEN e.status IN ({kept}) THEN e.completed_at ELSE NULL END{value} {from} \
         ON CONFLICT (grp, seq) DO UPDATE SET \
         status = CASE WHEN cur.status IN ({kept}) THEN cur.status ELSE 'pending' END, \
         completed_at = CASE WHEN cur.status IN ({kept}) THEN cur.completed_at ELSE NULL END{set}"
    )
}

/// SQLite: the next change sequence, shared by `T` and `T_states`.
fn sqlite_bump(t: &str) -> String {
    format!(
        "(SELECT MAX(m) + 1 FROM (SELECT COALESCE(MAX(changed), 0) AS m FROM {t} \
         UNION ALL SELECT COALESCE(MAX(changed), 0) FROM {t}_states))"
    )
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
    /// PostgreSQL: the cluster handler store's statements (its channel is listened to with
    /// `channel`); SQLite: `None`, it has no handler store.
    pub handlers: Option<HandlerQueries>,
    /// Advisory lock name serializing group creation against publishes (PostgreSQL).
    pub lock_name: String,
    /// PostgreSQL: `BEGIN` and the shared advisory lock on `lock_name` in one simple query
    /// (one round trip), for a batch of writes that publishes: publishes hold the lock shared
    /// so that a group being created waits for them. The batch's statements that follow take
    /// their snapshots after the lock. SQLite: unused.
    pub begin_locked: String,
    /// `SELECT 1 FROM pg_advisory_xact_lock(…)` ($1 lock name).
    pub lock_exclusive: String,
    /// Inserts a published event and its deliveries. PostgreSQL: one statement, $1..$18
    /// event, $19 visible_at, $20 channel; returns seq. SQLite: event only, returns seq.
    pub publish: String,
    /// SQLite: deliveries of a just-published event for every group ($1 seq, $2 visible_at).
    pub publish_deliveries: String,
    /// Inserts a stored (not published) event: $1..$18 (PostgreSQL $19 channel).
    pub store: String,
    /// One event by id ($1) as group $2 sees it.
    pub get: String,
    /// Status update of group $2 by event id $1, update $3..$8 (PostgreSQL $9 channel).
    pub update_status: String,
    /// Deletes an event (PostgreSQL: and its states and deliveries) by id ($1); returns seq.
    pub delete_event: String,
    /// SQLite: deletes the deliveries of an event ($1 seq).
    pub delete_deliveries: String,
    /// SQLite: deletes the group states of an event ($1 seq).
    pub delete_states: String,
    /// Requeue: the seq of event $1, locked on PostgreSQL.
    pub lock_event: String,
    /// Requeue: lease token and `visible_at` of the delivery of group $1, seq $2 (locked on
    /// PostgreSQL).
    pub delivery_of: String,
    /// Requeue: the status group $1 sees for the event with seq $2.
    pub status_by_seq: String,
    /// The state of group $1 for the event with seq $2 from update $3..$8 (also used by
    /// complete and retry on SQLite).
    pub upsert_by_seq: String,
    /// Requeue: the delivery of group $1, seq $2 visible at $3, unleased, counted afresh.
    pub requeue_delivery: String,
    /// A notification ($1 channel, $2 payload; PostgreSQL).
    pub notify: String,
    /// Whether a group exists ($1).
    pub group_exists: String,
    /// Creates a group ($1 name, $2 created_at) unless it exists.
    pub insert_group: String,
    /// Deliveries of every published event group $1 has not finished, for the new group $1
    /// ($2 visible_at).
    pub backfill: String,
    /// Claims up to $3 visible deliveries of group $1 at time $2: sets visible_at $4 (lease
    /// end), lease token $5, consumer $6. PostgreSQL returns seq, delivery_count and the
    /// event columns as the group sees them; SQLite returns seq, delivery_count.
    pub claim: String,
    /// The earliest `visible_at` of group $1.
    pub next_due: String,
    /// Acknowledges: $1 group, $2 seq, $3 token, $4..$9 update (PostgreSQL $10 channel).
    /// SQLite: deletes the delivery only.
    pub complete: String,
    /// Retry: $1 group, $2 seq, $3 token, $4 visible_at, $5..$10 update (PostgreSQL $11
    /// channel). SQLite: updates the delivery only.
    pub retry: String,
    /// Release: $1 group, $2 seq, $3 token, $4 visible_at (PostgreSQL $5 channel).
    /// SQLite: updates the delivery only.
    pub release: String,
    /// SQLite: the state of group $1 back to pending for the event with seq $2.
    pub release_event: String,
    /// Extends a lease: $1 group, $2 seq, $3 token, $4 new visible_at.
    pub keep_alive: String,
    /// Hands back every lease of consumer $2 in group $1, visible at $3.
    pub hand_back: String,
    /// A bare wake-up notification ($1 channel, PostgreSQL).
    pub wake: String,
    /// Expired leases back to pending (in their group's state), at time $1. PostgreSQL: one
    /// statement returning the number of leases cleared. SQLite: resets states only.
    pub rescue: String,
    /// SQLite: clears expired leases at time $1.
    pub rescue_leases: String,
    /// Event counts by the status group $1 sees.
    pub count_by_status: String,
    /// Per group: backlog and leased deliveries at time $1.
    pub group_stats: String,
    /// SQLite: the newest change sequence.
    pub max_changed: String,
    /// SQLite: changes of events and of group $4's states after ($1 changed, $2 seq), at most
    /// $3: changed, seq, event columns as group $4 sees them.
    pub changes: String,
}

impl Queries {
    /// The statements for `dialect` on table `t` (already validated).
    pub fn new(dialect: Dialect, t: &str) -> Self {
        let d = format!("{t}_deliveries");
        let g = format!("{t}_groups");
        let st = format!("{t}_states");
        let kept = kept_by_release();
        let values = placeholders(1, EVENT_COLUMN_COUNT);
        let next = EVENT_COLUMN_COUNT + 1;
        let view = view_columns();
        let bump = sqlite_bump(t);
        // The lock name is built from the table name, an identifier (letters, digits, '_').
        let begin_locked = format!(
            "BEGIN; SELECT 1 FROM pg_advisory_xact_lock_shared(hashtextextended('{}', 0))",
            format!("eventbroker:{t}").replace('\'', "''")
        );
        let lock_exclusive =
            "SELECT 1 FROM pg_advisory_xact_lock(hashtextextended($1, 0))".to_owned();
        let get = format!("SELECT {view} FROM {} WHERE e.id = $1", view_from(t, "$2"));
        let insert_group = format!(
            "INSERT INTO {g} (name, created_at) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING"
        );
        let backfill = format!(
            "INSERT INTO {d} (grp, seq, visible_at, delivery_count) \
             SELECT $1, e.seq, $2, 0 FROM {t} e WHERE e.published = 1 \
             AND NOT EXISTS (SELECT 1 FROM {st} s WHERE s.grp = $1 AND s.seq = e.seq \
             AND s.status IN ('completed', 'failed')) \
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
        let count_by_status = format!(
            "SELECT CASE WHEN s.seq IS NULL THEN e.status ELSE s.status END, COUNT(*) \
             FROM {} GROUP BY 1",
            view_from(t, "$1")
        );
        let group_stats = format!(
            "SELECT g.name, COUNT(d.seq), \
             COALESCE(SUM(CASE WHEN d.lease_token IS NOT NULL AND d.visible_at > $1 \
             THEN 1 ELSE 0 END), 0) \
             FROM {g} g LEFT JOIN {d} d ON d.grp = g.name GROUP BY g.name"
        );
        let group_exists = format!("SELECT 1 FROM {g} WHERE name = $1");
        let lease_clear = "lease_token = NULL, consumer = NULL";
        let lock = match dialect {
            Dialect::Postgres => " FOR UPDATE",
            Dialect::Sqlite => "",
        };
        let lock_event = format!("SELECT seq FROM {t} WHERE id = $1{lock}");
        let delivery_of =
            format!("SELECT lease_token, visible_at FROM {d} WHERE grp = $1 AND seq = $2{lock}");
        let status_by_seq = format!(
            "SELECT CASE WHEN s.seq IS NULL THEN e.status ELSE s.status END FROM {} \
             WHERE e.seq = $2",
            view_from(t, "$1")
        );
        let upsert_by_seq =
            upsert_state(dialect, t, "$1", &format!("FROM {t} e WHERE e.seq = $2"), 3);
        let requeue_delivery = format!(
            "INSERT INTO {d} (grp, seq, visible_at, delivery_count) VALUES ($1, $2, $3, 0) \
             ON CONFLICT (grp, seq) DO UPDATE SET visible_at = excluded.visible_at, \
             {lease_clear}, delivery_count = 0"
        );
        match dialect {
            Dialect::Postgres => Queries {
                channel: format!("{t}_events"),
                handlers: Some(HandlerQueries::new(t)),
                lock_name: format!("eventbroker:{t}"),
                begin_locked,
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
                get,
                update_status: format!(
                    "WITH u AS ({} RETURNING seq) \
                     SELECT 1 FROM u, LATERAL pg_notify($9, 'C' || $1 || '/' || $2) n",
                    upsert_state(dialect, t, "$2", &format!("FROM {t} e WHERE e.id = $1"), 3)
                ),
                delete_event: format!(
                    "WITH e AS (DELETE FROM {t} WHERE id = $1 RETURNING seq), \
                     dl AS (DELETE FROM {d} WHERE seq IN (SELECT seq FROM e)), \
                     gs AS (DELETE FROM {st} WHERE seq IN (SELECT seq FROM e)) \
                     SELECT seq FROM e"
                ),
                delete_deliveries: String::new(),
                delete_states: String::new(),
                lock_event,
                delivery_of,
                status_by_seq,
                upsert_by_seq,
                requeue_delivery,
                notify: "SELECT 1 FROM pg_notify($1, $2) n".to_owned(),
                group_exists,
                insert_group,
                backfill,
                // The claim records `processing` in the same statement (the lease is the
                // mark) for events the group has not finished, and notifies watchers of it;
                // the view returned is the state before, which the consumer patches.
                claim: format!(
                    "WITH c AS (SELECT grp, seq FROM {d} WHERE grp = $1 AND visible_at <= $2 \
                     ORDER BY seq LIMIT $3 FOR UPDATE SKIP LOCKED), \
                     u AS (UPDATE {d} dl SET visible_at = $4, lease_token = $5, consumer = $6, \
                     delivery_count = dl.delivery_count + 1 FROM c \
                     WHERE dl.grp = c.grp AND dl.seq = c.seq \
                     RETURNING dl.seq, dl.delivery_count), \
                     m AS (INSERT INTO {st} AS cur \
                     (grp, seq, status, error, retry_count, handlers, processed_at, completed_at) \
                     SELECT $1, e.seq, 'processing', e.error, e.retry_count, e.handlers, $7, CAST(NULL AS BIGINT) \
                     FROM u JOIN {t} e ON e.seq = u.seq \
                     LEFT JOIN {st} s ON s.grp = $1 AND s.seq = e.seq \
                     WHERE COALESCE(s.status, e.status) NOT IN ({kept}) \
                     ON CONFLICT (grp, seq) DO UPDATE SET status = 'processing', \
                     processed_at = excluded.processed_at, completed_at = NULL RETURNING seq), \
                     n AS (SELECT m.seq FROM m JOIN {t} e ON e.seq = m.seq \
                     CROSS JOIN LATERAL pg_notify($8, 'C' || e.id || '/' || $1) x) \
                     SELECT u.seq, u.delivery_count, n.seq IS NOT NULL AS marked, {view} \
                     FROM u JOIN {t} e ON e.seq = u.seq \
                     LEFT JOIN {st} s ON s.grp = $1 AND s.seq = e.seq \
                     LEFT JOIN n ON n.seq = u.seq ORDER BY u.seq"
                ),
                next_due,
                complete: format!(
                    "WITH dl AS (DELETE FROM {d} WHERE grp = $1 AND seq = $2 AND lease_token = $3 \
                     RETURNING seq), \
                     u AS ({} RETURNING seq) \
                     SELECT 1 FROM u JOIN {t} e ON e.seq = u.seq \
                     CROSS JOIN LATERAL pg_notify($10, 'C' || e.id || '/' || $1) n",
                    upsert_state(
                        dialect,
                        t,
                        "$1",
                        &format!("FROM dl JOIN {t} e ON e.seq = dl.seq WHERE true"),
                        4
                    )
                ),
                retry: format!(
                    "WITH dl AS (UPDATE {d} SET visible_at = $4, {lease_clear} \
                     WHERE grp = $1 AND seq = $2 AND lease_token = $3 RETURNING seq), \
                     u AS ({} RETURNING seq) \
                     SELECT 1 FROM u JOIN {t} e ON e.seq = u.seq \
                     CROSS JOIN LATERAL pg_notify($11, 'P' || e.id || '/' || $1) n",
                    upsert_state(
                        dialect,
                        t,
                        "$1",
                        &format!("FROM dl JOIN {t} e ON e.seq = dl.seq WHERE true"),
                        5
                    )
                ),
                release: format!(
                    "WITH dl AS (UPDATE {d} SET visible_at = $4, {lease_clear}, \
                     delivery_count = GREATEST(delivery_count - 1, 0) \
                     WHERE grp = $1 AND seq = $2 AND lease_token = $3 RETURNING seq), \
                     u AS ({} RETURNING seq) \
                     SELECT 1 FROM u JOIN {t} e ON e.seq = u.seq \
                     CROSS JOIN LATERAL pg_notify($5, 'P' || e.id || '/' || $1) n",
                    release_state(
                        dialect,
                        t,
                        "$1",
                        &format!("FROM dl JOIN {t} e ON e.seq = dl.seq WHERE true")
                    )
                ),
                release_event: String::new(),
                keep_alive,
                hand_back,
                wake: "SELECT 1 FROM pg_notify($1, 'w') n".to_owned(),
                rescue: format!(
                    "WITH x AS (UPDATE {d} SET {lease_clear} \
                     WHERE lease_token IS NOT NULL AND visible_at <= $1 RETURNING grp, seq), \
                     u AS (UPDATE {st} s SET status = 'pending' FROM x \
                     WHERE s.grp = x.grp AND s.seq = x.seq AND s.status NOT IN ({kept}) \
                     AND s.status <> 'pending' \
                     RETURNING s.seq) \
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
                handlers: None,
                lock_name: String::new(),
                begin_locked: String::new(),
                lock_exclusive,
                publish: format!(
                    "INSERT INTO {t} ({EVENT_COLUMNS}, published, changed) \
                     VALUES ({values}, 1, {bump}) RETURNING seq"
                ),
                publish_deliveries: format!(
                    "INSERT INTO {d} (grp, seq, visible_at, delivery_count) \
                     SELECT name, $1, $2, 0 FROM {g}"
                ),
                store: format!(
                    "INSERT INTO {t} ({EVENT_COLUMNS}, published, changed) \
                     VALUES ({values}, 0, {bump}) RETURNING seq"
                ),
                get,
                update_status: upsert_state(
                    dialect,
                    t,
                    "$2",
                    &format!("FROM {t} e WHERE e.id = $1"),
                    3,
                ),
                delete_event: format!("DELETE FROM {t} WHERE id = $1 RETURNING seq"),
                delete_deliveries: format!("DELETE FROM {d} WHERE seq = $1"),
                delete_states: format!("DELETE FROM {st} WHERE seq = $1"),
                lock_event,
                delivery_of,
                status_by_seq,
                upsert_by_seq,
                requeue_delivery,
                notify: String::new(),
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
                retry: format!(
                    "UPDATE {d} SET visible_at = $4, {lease_clear} \
                     WHERE grp = $1 AND seq = $2 AND lease_token = $3"
                ),
                release: format!(
                    "UPDATE {d} SET visible_at = $4, {lease_clear}, \
                     delivery_count = MAX(delivery_count - 1, 0) \
                     WHERE grp = $1 AND seq = $2 AND lease_token = $3"
                ),
                release_event: release_state(
                    dialect,
                    t,
                    "$1",
                    &format!("FROM {t} e WHERE e.seq = $2"),
                ),
                keep_alive,
                hand_back,
                wake: String::new(),
                rescue: format!(
                    "UPDATE {st} SET status = 'pending', changed = {bump} \
                     WHERE status NOT IN ({kept}) AND status <> 'pending' AND EXISTS (SELECT 1 FROM {d} d \
                     WHERE d.grp = {st}.grp AND d.seq = {st}.seq \
                     AND d.lease_token IS NOT NULL AND d.visible_at <= $1)"
                ),
                rescue_leases: format!(
                    "UPDATE {d} SET {lease_clear} \
                     WHERE lease_token IS NOT NULL AND visible_at <= $1"
                ),
                count_by_status,
                group_stats,
                max_changed: format!(
                    "SELECT MAX(m) FROM (SELECT COALESCE(MAX(changed), 0) AS m FROM {t} \
                     UNION ALL SELECT COALESCE(MAX(changed), 0) FROM {st})"
                ),
                changes: format!(
                    "SELECT changed, seq, {EVENT_COLUMNS} FROM (\
                     SELECT e.changed AS changed, e.seq AS seq, {view} FROM {} \
                     WHERE e.changed > $1 OR (e.changed = $1 AND e.seq > $2) \
                     UNION ALL \
                     SELECT s.changed, s.seq, {view} FROM {st} s JOIN {t} e ON e.seq = s.seq \
                     WHERE s.grp = $4 AND (s.changed > $1 OR (s.changed = $1 AND s.seq > $2))\
                     ) ORDER BY changed, seq LIMIT $3",
                    view_from(t, "$4")
                ),
            },
        }
    }

    /// `SELECT` of seq and the event columns as group `$1` sees them, for the events with the
    /// given `count` seqs (`$2..`).
    pub fn events_by_seq(t: &str, count: usize) -> String {
        format!(
            "SELECT e.seq, {} FROM {} WHERE e.seq IN ({})",
            view_columns(),
            view_from(t, "$1"),
            placeholders(2, count)
        )
    }

    /// `SELECT` of the event columns as group `$1` sees them, for the events with the given
    /// `count` ids (`$2..`).
    pub fn events_by_id(t: &str, count: usize) -> String {
        format!(
            "SELECT {} FROM {} WHERE e.id IN ({})",
            view_columns(),
            view_from(t, "$1"),
            placeholders(2, count)
        )
    }
}

/// The statements of the cluster handler store (PostgreSQL only), built once per table.
#[derive(Debug, Clone)]
pub struct HandlerQueries {
    /// NOTIFY channel of record changes (`T_handlers`; the payload is the handler name).
    pub channel: String,
    /// Stores component $1 with bytes $2 unless that version is stored already.
    pub put_component: String,
    /// The bytes of component $1.
    pub component: String,
    /// Deletes component $1.
    pub delete_component: String,
    /// Every record: name, revision, doc.
    pub records: String,
    /// Record $1: name, revision, doc.
    pub record: String,
    /// Creates record $1 with doc $2 if there is none, and notifies channel $3; returns the
    /// new revision (no row: it exists).
    pub create_record: String,
    /// Replaces record $1 with doc $2 if its revision is $3, and notifies channel $4; returns
    /// the new revision (no row: a conflict).
    pub update_record: String,
    /// Deletes record $1 if its revision is $2, and notifies channel $3; a row when deleted.
    pub delete_record: String,
    /// Upserts host $1's report $2, expiring in $3 microseconds.
    pub put_report: String,
    /// Deletes the expired reports no one else is touching (it never waits on a lock, so
    /// concurrent readers cannot deadlock) and returns the live ones: host, doc.
    pub reports: String,
}

impl HandlerQueries {
    /// The statements on the handler store tables of events table `t` (already validated).
    pub fn new(t: &str) -> Self {
        let h = format!("{t}_handlers");
        let c = format!("{t}_handler_components");
        let r = format!("{t}_handler_reports");
        // The sequence name is an identifier built from `t`; as a `regclass` literal it is
        // case-folded like the unquoted name it was created with.
        let next = format!("nextval('{t}_handler_revisions')");
        HandlerQueries {
            channel: format!("{t}_handlers"),
            put_component: format!(
                "INSERT INTO {c} (version, bytes, stored_at) VALUES ($1, $2, now()) \
                 ON CONFLICT (version) DO NOTHING"
            ),
            component: format!("SELECT bytes FROM {c} WHERE version = $1"),
            delete_component: format!("DELETE FROM {c} WHERE version = $1"),
            records: format!("SELECT name, revision, doc FROM {h} ORDER BY name"),
            record: format!("SELECT name, revision, doc FROM {h} WHERE name = $1"),
            create_record: format!(
                "WITH w AS (INSERT INTO {h} (name, revision, doc) VALUES ($1, {next}, $2) \
                 ON CONFLICT (name) DO NOTHING RETURNING name, revision) \
                 SELECT w.revision FROM w, LATERAL pg_notify($3, w.name) n"
            ),
            update_record: format!(
                "WITH w AS (UPDATE {h} SET revision = {next}, doc = $2 \
                 WHERE name = $1 AND revision = $3 RETURNING name, revision) \
                 SELECT w.revision FROM w, LATERAL pg_notify($4, w.name) n"
            ),
            delete_record: format!(
                "WITH d AS (DELETE FROM {h} WHERE name = $1 AND revision = $2 RETURNING name) \
                 SELECT 1 FROM d, LATERAL pg_notify($3, d.name) n"
            ),
            put_report: format!(
                "INSERT INTO {r} (host, doc, expires_at) \
                 VALUES ($1, $2, now() + CAST($3 AS DOUBLE PRECISION) * INTERVAL '1 microsecond') \
                 ON CONFLICT (host) DO UPDATE SET doc = excluded.doc, \
                 expires_at = excluded.expires_at"
            ),
            reports: format!(
                "WITH gone AS (DELETE FROM {r} WHERE host IN (SELECT host FROM {r} \
                 WHERE expires_at <= now() FOR UPDATE SKIP LOCKED)) \
                 SELECT host, doc FROM {r} WHERE expires_at > now() ORDER BY host"
            ),
        }
    }
}

/// The statements of handlers' key-value state ([`crate::keyvalue`]), built once per store.
/// Every one takes the namespace as `$1`.
#[derive(Debug, Clone)]
pub struct KvQueries {
    /// The value of key $2.
    pub value: String,
    /// A row when key $2 is present.
    pub exists: String,
    /// The length in bytes of the value of key $2.
    pub length: String,
    /// PostgreSQL: creates the namespace's usage row (zero) unless it exists, so that it can
    /// be locked. SQLite: unused (its write transactions lock the database).
    pub create_usage: String,
    /// The namespace's usage: keys, bytes.
    pub usage: String,
    /// The namespace's usage (keys, bytes), locking its row until the transaction ends
    /// (PostgreSQL `FOR UPDATE`; SQLite: the same as `usage`).
    pub lock_usage: String,
    /// Sets the namespace's usage to $2 keys, $3 bytes.
    pub save_usage: String,
    /// Inserts key $2 with value $3 and the namespace's next id.
    pub insert: String,
    /// Replaces the value of key $2 by $3.
    pub update: String,
    /// Deletes key $2; returns the length in bytes of its value.
    pub delete: String,
    /// Up to $3 keys with an id above $2, in id order: id, key.
    pub keys: String,
}

impl KvQueries {
    /// The statements on the key-value tables of events table `t` (already validated).
    pub fn new(dialect: Dialect, t: &str) -> Self {
        let kv = format!("{t}_kv");
        let u = format!("{t}_kv_usage");
        let (length, lock) = match dialect {
            Dialect::Postgres => ("CAST(octet_length(value) AS BIGINT)", " FOR UPDATE"),
            Dialect::Sqlite => ("CAST(length(value) AS BIGINT)", ""),
        };
        let usage = format!("SELECT keys, bytes FROM {u} WHERE ns = $1");
        KvQueries {
            value: format!("SELECT value FROM {kv} WHERE ns = $1 AND key = $2"),
            exists: format!("SELECT 1 FROM {kv} WHERE ns = $1 AND key = $2"),
            length: format!("SELECT {length} FROM {kv} WHERE ns = $1 AND key = $2"),
            create_usage: format!(
                "INSERT INTO {u} (ns, keys, bytes) VALUES ($1, 0, 0) ON CONFLICT (ns) DO NOTHING"
            ),
            lock_usage: format!("{usage}{lock}"),
            usage,
            save_usage: format!(
                "INSERT INTO {u} (ns, keys, bytes) VALUES ($1, $2, $3) \
                 ON CONFLICT (ns) DO UPDATE SET keys = excluded.keys, bytes = excluded.bytes"
            ),
            insert: format!(
                "INSERT INTO {kv} (ns, key, value, id) VALUES ($1, $2, $3, \
                 (SELECT COALESCE(MAX(id), 0) + 1 FROM {kv} WHERE ns = $1))"
            ),
            update: format!("UPDATE {kv} SET value = $3 WHERE ns = $1 AND key = $2"),
            delete: format!("DELETE FROM {kv} WHERE ns = $1 AND key = $2 RETURNING {length}"),
            keys: format!(
                "SELECT id, key FROM {kv} WHERE ns = $1 AND id > $2 ORDER BY id LIMIT $3"
            ),
        }
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

#[cfg(test)]
mod tests {
    use sqlx::any::AnyPoolOptions;
    use sqlx::{AssertSqlSafe, Row};

    use super::*;

    /// A database at schema version 1 (one state per event, shared by the groups) upgrades to
    /// per-group states: each group that existed keeps the shared state as its own, and the
    /// published event starts afresh for groups created later.
    #[tokio::test]
    async fn version_1_data_keeps_its_state_for_existing_groups_only() {
        sqlx::any::install_default_drivers();
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("v1.db").display());
        let pool = AnyPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .expect("connect");
        let table = "events";
        let v1: Vec<Migration> = migrations(Dialect::Sqlite, table)
            .into_iter()
            .filter(|(version, ..)| *version == 1)
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
        let mut migrator = Migrator::with_migrations(v1);
        migrator.dangerous_set_table_name(format!("{table}_migrations"));
        migrator.run(&pool).await.expect("version 1");
        for sql in [
            "INSERT INTO events_groups (name, created_at) VALUES ('old', 0)",
            "INSERT INTO events (id, source, type, status, payload, created_at, error, \
             retry_count, handlers, completed_at, published) VALUES ('e1', 'system', 'a.b', \
             'failed', '{}', 1, 'boom', 2, '[]', 5, 1)",
            "INSERT INTO events (id, source, type, status, payload, created_at, published) \
             VALUES ('s1', 'system', 'a.b', 'completed', '{}', 1, 0)",
        ] {
            sqlx::query(sql).execute(&pool).await.expect("legacy row");
        }
        migrate(&pool, Dialect::Sqlite, table)
            .await
            .expect("version 2");
        let state = |group: &'static str, id: &'static str| {
            let pool = pool.clone();
            async move {
                let view = format!(
                    "SELECT {} FROM {}",
                    view_columns(),
                    view_from(table, &format!("'{group}'"))
                );
                let row = sqlx::query(AssertSqlSafe(format!(
                    "SELECT status, error, retry_count FROM ({view}) v WHERE id = $1"
                )))
                .bind(id)
                .fetch_one(&pool)
                .await
                .expect("view");
                let status: String = row.try_get(0).expect("status");
                let error: Option<String> = row.try_get(1).expect("error");
                let retries: i64 = row.try_get(2).expect("retry_count");
                (status, error, retries)
            }
        };
        assert_eq!(
            state("old", "e1").await,
            ("failed".into(), Some("boom".into()), 2),
            "an existing group keeps the shared state"
        );
        assert_eq!(
            state("new", "e1").await,
            ("pending".into(), None, 0),
            "a later group starts afresh"
        );
        assert_eq!(
            state("new", "s1").await.0,
            "completed",
            "a stored (sync) event keeps its state"
        );
        pool.close().await;
    }
}
