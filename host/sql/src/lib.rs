//! The database provider: SQLite (embedded, durable, one host) or PostgreSQL (durable,
//! shared by every host of a cluster), chosen by the scheme of `database.url`.
//!
//! - Schema: versioned migrations at start ([`schema`]); the events table name is checked to be
//!   a plain identifier and is the only text ever put into SQL, values go through placeholders.
//! - Delivery: one row per (consumer group, event) in `T_deliveries`, written in the event's
//!   own transaction; consumers claim rows by lease ([`consumer`]). Nothing is skipped when
//!   publishers commit out of order, each group receives every event, and a host that dies
//!   mid-event loses nothing: its leases expire and the deliveries are claimed again (a rescuer
//!   also returns the group's status of the events to `pending`).
//! - State: each group keeps its own processing state of each event in `T_states`; queries
//!   show the provider's own group (`event_broker.consumer_group`).
//! - Wake-ups: PostgreSQL `LISTEN/NOTIFY`, SQLite polling plus in-process signals, the poll
//!   interval as fallback ([`watch`]).
//! - Watchers see the events of every host sharing the database ([`watch`]).
//! - PostgreSQL also offers the cluster handler store ([`handler_store`]); SQLite has none.
//! - Both keep handlers' key-value state ([`keyvalue`]): one transaction per operation, so
//!   increments and quota checks are exact across hosts.
//!
//! `docs/providers/database.md` describes the design, its trade-offs and tuning.
#![deny(missing_docs)]

mod batch;
mod circuit;
pub mod config;
mod consumer;
pub mod dialect;
pub mod handler_store;
pub mod keyvalue;
mod list;
mod row;
mod schema;
mod watch;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use sqlx::any::AnyPoolOptions;
use sqlx::{Any, AnyPool, AssertSqlSafe, Executor, Row, Transaction};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use self::consumer::SqlConsumer;
use self::dialect::{Dialect, Target};
use self::row::{EventValues, UpdateValues, decode_event};
use self::schema::Queries;
use self::watch::{Hub, WatchMessage};
use eventbroker::config::BrokerConfig;
use eventbroker::provider::{
    Consumer, ConsumerOptions, Counters, EventFilter, EventStream, Provider, ProviderError,
    ProviderFeatures, ProviderStats, StatusUpdate,
};

pub use crate::config::SqlConfig;
use eventbroker::event::{Event, EventStatus};
use eventbroker::pattern::Pattern;

/// The provider's name in config and errors.
pub(crate) const NAME: &str = "database";

/// What the provider runs with: its config section and its own consumer group
/// ([`Provider::group`], the broker's `consumer_group`).
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// `postgres://…` or `sqlite://path`.
    pub(crate) url: String,
    /// Events table name (a plain identifier).
    pub(crate) table_name: String,
    /// Fallback interval of consumers and watchers without notifications.
    pub(crate) poll_interval: Duration,
    /// Largest connection pool.
    pub(crate) max_connections: u32,
    /// Connection timeout.
    pub(crate) connect_timeout: Duration,
    /// Most deliveries claimed at once.
    pub(crate) batch_size: usize,
    /// Interval of the expired-lease rescuer.
    pub(crate) rescue_interval: Duration,
    /// Events buffered per watcher before it is cut off as lagging.
    pub(crate) watcher_buffer: usize,
    /// The provider's own consumer group ([`Provider::group`]).
    pub(crate) group: String,
    /// Deadline of one group-commit batch, its replay included ([`batch`]).
    pub(crate) write_timeout: Duration,
}

impl Settings {
    fn new(config: &SqlConfig, group: &str) -> Self {
        Settings {
            url: config.url.clone(),
            table_name: config.table_name.clone(),
            poll_interval: config.poll_interval,
            max_connections: config.max_connections,
            connect_timeout: config.connect_timeout,
            batch_size: config.batch_size,
            rescue_interval: config.rescue_interval,
            watcher_buffer: config.watcher_buffer,
            group: group.to_owned(),
            write_timeout: config.write_timeout,
        }
    }
}

/// Microseconds since the Unix epoch, on this host's clock.
pub(crate) fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A duration in whole microseconds (saturating).
pub(crate) fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

/// A database failure as a provider error.
pub(crate) fn db_error(error: sqlx::Error) -> ProviderError {
    ProviderError::backend(NAME, error)
}

/// State shared by the provider, its consumers and its background tasks.
pub(crate) struct Shared {
    dialect: Dialect,
    table: String,
    q: Queries,
    /// Reads, and every statement on PostgreSQL.
    pool: AnyPool,
    /// SQLite: the single writer connection (serializes this process's writes instead of
    /// letting connections spin on the file lock). PostgreSQL: the same pool as `pool`.
    writer: AnyPool,
    options: Settings,
    closed: AtomicBool,
    shutdown: CancellationToken,
    hub: Arc<Hub>,
    sqlite_key: Option<PathBuf>,
    watchers: broadcast::Sender<WatchMessage>,
    /// PostgreSQL: a message after each notified change of a handler store record (and after
    /// the listener lost its connection); feeds [`handler_store::PgHandlerStore`]'s changes.
    handler_changes: broadcast::Sender<()>,
    counters: Counters,
    /// Open consumers: key → (group, name), for handing their leases back on close.
    consumers: Mutex<HashMap<u64, (String, String)>>,
    next_consumer: AtomicU64,
    /// Groups known to exist (their deliveries are written by every publish).
    groups: Mutex<HashSet<String>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Frequent writes go through the group-commit writers ([`batch`]).
    submitter: batch::Submitter,
    /// Open while the database is unreachable: writes fail at once ([`circuit`]).
    circuit: circuit::Circuit,
}

impl Shared {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn check_open(&self) -> Result<(), ProviderError> {
        if self.is_closed() {
            Err(ProviderError::Closed)
        } else {
            Ok(())
        }
    }

    fn writer(&self) -> &AnyPool {
        &self.writer
    }

    /// The provider's own consumer group.
    fn group(&self) -> &str {
        &self.options.group
    }

    fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
        mutex.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn forget_consumer(&self, key: u64) {
        Self::lock(&self.consumers).remove(&key);
    }

    /// A write transaction: SQLite `BEGIN IMMEDIATE` on the writer (takes the write lock up
    /// front, so the transaction never fails half-way on a lock upgrade); PostgreSQL `BEGIN`.
    async fn begin_write(&self) -> Result<Transaction<'static, Any>, ProviderError> {
        match self.dialect {
            Dialect::Sqlite => self.writer.begin_with("BEGIN IMMEDIATE").await,
            Dialect::Postgres => self.pool.begin().await,
        }
        .map_err(db_error)
    }

    /// Tells local consumers (`work`) and watchers that something changed. PostgreSQL's
    /// other hosts learn it from the NOTIFY sent by the statement itself.
    async fn signal(&self, work: bool) {
        match (&self.sqlite_key, work) {
            (Some(key), _) => watch::signal_sqlite(key, work),
            (None, true) => self.hub.wake.notify_waiters(),
            (None, false) => {}
        }
    }

    /// Makes sure `group` exists; a new group gets a delivery of every unfinished published
    /// event. On PostgreSQL an exclusive advisory lock (publishes hold it shared) makes sure
    /// no publish in flight misses the new group.
    async fn ensure_group(&self, group: &str) -> Result<(), ProviderError> {
        if Self::lock(&self.groups).contains(group) {
            return Ok(());
        }
        let exists = sqlx::query(AssertSqlSafe(self.q.group_exists.clone()))
            .bind(group.to_owned())
            .fetch_optional(&self.pool)
            .await
            .map_err(db_error)?
            .is_some();
        if !exists {
            let mut tx = self.begin_write().await?;
            if self.dialect == Dialect::Postgres {
                tx.execute(
                    sqlx::query(AssertSqlSafe(self.q.lock_exclusive.clone()))
                        .bind(self.q.lock_name.clone()),
                )
                .await
                .map_err(db_error)?;
            }
            let now = now_micros();
            let inserted = sqlx::query(AssertSqlSafe(self.q.insert_group.clone()))
                .bind(group.to_owned())
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
            if inserted.rows_affected() > 0 {
                sqlx::query(AssertSqlSafe(self.q.backfill.clone()))
                    .bind(group.to_owned())
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_error)?;
            }
            tx.commit().await.map_err(db_error)?;
        }
        Self::lock(&self.groups).insert(group.to_owned());
        Ok(())
    }

    /// Inserts an event; `publish` also makes it deliverable to every group.
    async fn insert(&self, event: &Event, publish: bool) -> Result<(), ProviderError> {
        self.check_open()?;
        let op = batch::Op::Insert {
            values: Box::new(EventValues::new(event)?),
            id: event.id.clone(),
            publish,
            now: now_micros(),
        };
        batch::submit(&self.submitter, op).await?;
        Ok(())
    }

    /// Returns expired leases to the group and their events' status to `pending`.
    async fn rescue(&self) -> Result<u64, ProviderError> {
        let now = now_micros();
        let rescued = match self.dialect {
            Dialect::Postgres => {
                let row = sqlx::query(AssertSqlSafe(self.q.rescue.clone()))
                    .bind(now)
                    .fetch_one(&self.pool)
                    .await
                    .map_err(db_error)?;
                let leases: i64 = row.try_get(0).map_err(db_error)?;
                u64::try_from(leases).unwrap_or(0)
            }
            Dialect::Sqlite => {
                let mut tx = self.begin_write().await?;
                sqlx::query(AssertSqlSafe(self.q.rescue.clone()))
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_error)?;
                let cleared = sqlx::query(AssertSqlSafe(self.q.rescue_leases.clone()))
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_error)?;
                tx.commit().await.map_err(db_error)?;
                cleared.rows_affected()
            }
        };
        if rescued > 0 {
            self.signal(true).await;
        }
        Ok(rescued)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // A provider dropped without `close`: stop the background tasks (they hold only weak
        // references, but the listener would otherwise wait for its next notification).
        self.shutdown.cancel();
    }
}

/// The SQL provider. Cheap to clone; clones share the pools and state.
#[derive(Clone)]
pub struct SqlProvider {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SqlProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlProvider")
            .field("dialect", &self.shared.dialect)
            .field("table", &self.shared.table)
            .finish_non_exhaustive()
    }
}

async fn after_connect_sqlite(conn: &mut sqlx::AnyConnection) -> Result<(), sqlx::Error> {
    // WAL: readers never block the writer; NORMAL sync is durable across process crashes
    // (a power loss can lose the last commits); wait for other processes' locks.
    conn.execute("PRAGMA synchronous = NORMAL").await?;
    conn.execute("PRAGMA busy_timeout = 10000").await?;
    Ok(())
}

impl SqlProvider {
    /// Connects, migrates the schema and starts the background tasks (listener or poller,
    /// lease rescuer). Must be called inside a tokio runtime.
    ///
    /// `config` is the `event_broker.database` section; the provider's own consumer group is
    /// `broker.consumer_group`.
    ///
    /// # Errors
    /// [`ProviderError::Config`] for a setting out of range (naming its key);
    /// [`ProviderError::Backend`] when the database cannot be reached or migrated.
    pub async fn connect(config: &SqlConfig, broker: &BrokerConfig) -> Result<Self, ProviderError> {
        config
            .validate()
            .map_err(|e| ProviderError::invalid(NAME, e))?;
        let options = Settings::new(config, &broker.consumer_group);
        let target = Target::parse(&options.url)?;
        sqlx::any::install_default_drivers();
        let shown_url = dialect::redact(&options.url);
        let connect_error = move |error: sqlx::Error| {
            ProviderError::backend(NAME, format!("cannot connect to {shown_url}: {error}"))
        };
        let (pool, writer, sqlite_key) = match target.dialect {
            Dialect::Postgres => {
                let pool = AnyPoolOptions::new()
                    .max_connections(options.max_connections)
                    .acquire_timeout(options.connect_timeout)
                    .connect(&target.url)
                    .await
                    .map_err(&connect_error)?;
                (pool.clone(), pool, None)
            }
            Dialect::Sqlite => {
                let path = target.path.clone().unwrap_or_default();
                if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    std::fs::create_dir_all(parent).map_err(|error| {
                        ProviderError::backend(
                            NAME,
                            format!("cannot create directory {}: {error}", parent.display()),
                        )
                    })?;
                }
                let writer = AnyPoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(options.connect_timeout.max(Duration::from_secs(30)))
                    .after_connect(|conn, _| Box::pin(after_connect_sqlite(conn)))
                    .connect(&target.url)
                    .await
                    .map_err(&connect_error)?;
                // WAL is a property of the file; set it once, before the readers connect.
                let mode: String = sqlx::query_scalar("PRAGMA journal_mode = WAL")
                    .fetch_one(&writer)
                    .await
                    .map_err(&connect_error)?;
                if !mode.eq_ignore_ascii_case("wal") {
                    tracing::warn!(%mode, "SQLite did not switch to WAL mode; readers will block the writer");
                }
                let pool = AnyPoolOptions::new()
                    .max_connections(options.max_connections)
                    .acquire_timeout(options.connect_timeout)
                    .after_connect(|conn, _| Box::pin(after_connect_sqlite(conn)))
                    .connect(&target.url)
                    .await
                    .map_err(&connect_error)?;
                (pool, writer, Some(watch::sqlite_key(&path)))
            }
        };
        schema::migrate(&writer, target.dialect, &options.table_name).await?;
        let (watchers, _) = broadcast::channel(options.watcher_buffer);
        let (handler_changes, _) = broadcast::channel(handler_store::FEED_BUFFER);
        let (submitter, queue) = tokio::sync::mpsc::channel(batch::QUEUE);
        let queue: batch::Queue = Arc::new(tokio::sync::Mutex::new(queue));
        // SQLite has one writer; PostgreSQL commits in parallel on a few connections.
        let writers = match target.dialect {
            Dialect::Sqlite => 1,
            Dialect::Postgres => (options.max_connections / 2).clamp(1, 4),
        };
        let shared = Arc::new(Shared {
            dialect: target.dialect,
            table: options.table_name.clone(),
            q: Queries::new(target.dialect, &options.table_name),
            pool,
            writer,
            closed: AtomicBool::new(false),
            shutdown: CancellationToken::new(),
            hub: Arc::new(Hub::default()),
            sqlite_key,
            watchers,
            handler_changes,
            counters: Counters::default(),
            consumers: Mutex::new(HashMap::new()),
            next_consumer: AtomicU64::new(1),
            groups: Mutex::new(HashSet::new()),
            tasks: Mutex::new(Vec::new()),
            submitter,
            circuit: circuit::Circuit::default(),
            options,
        });
        let mut tasks = Vec::new();
        for _ in 0..writers {
            tasks.push(tokio::spawn(batch::writer(
                Arc::downgrade(&shared),
                queue.clone(),
                shared.shutdown.clone(),
            )));
        }
        match target.dialect {
            Dialect::Postgres => {
                let mut listener = sqlx::postgres::PgListener::connect(&target.url)
                    .await
                    .map_err(&connect_error)?;
                let mut channels = vec![shared.q.channel.as_str()];
                channels.extend(shared.q.handlers.as_ref().map(|h| h.channel.as_str()));
                listener
                    .listen_all(channels)
                    .await
                    .map_err(&connect_error)?;
                tasks.push(tokio::spawn(watch::pg_listener(
                    Arc::downgrade(&shared),
                    shared.hub.clone(),
                    listener,
                    shared.shutdown.clone(),
                )));
            }
            Dialect::Sqlite => {
                if let Some(key) = &shared.sqlite_key {
                    watch::register_sqlite_hub(key, &shared.hub);
                }
                // Where watchers start, read before the provider is handed out: a poller that
                // took its starting point only when it first ran could start after a watcher
                // subscribed and events were written, and skip those events for good.
                let start = watch::newest_change(&shared).await?;
                tasks.push(tokio::spawn(watch::sqlite_poller(
                    Arc::downgrade(&shared),
                    shared.hub.clone(),
                    start,
                    shared.shutdown.clone(),
                )));
            }
        }
        tasks.push(tokio::spawn(rescue_loop(
            Arc::downgrade(&shared),
            shared.shutdown.clone(),
        )));
        *Shared::lock(&shared.tasks) = tasks;
        Ok(SqlProvider { shared })
    }

    /// Which database this provider uses.
    pub fn dialect(&self) -> Dialect {
        self.shared.dialect
    }

    /// Returns expired leases to their groups now (the rescuer does this periodically);
    /// returns how many.
    ///
    /// # Errors
    /// Database failures.
    pub async fn rescue_expired_leases(&self) -> Result<u64, ProviderError> {
        self.shared.check_open()?;
        self.shared.rescue().await
    }
}

async fn rescue_loop(shared: std::sync::Weak<Shared>, shutdown: CancellationToken) {
    let interval = match shared.upgrade() {
        Some(shared) => shared.options.rescue_interval,
        None => return,
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        match shared.rescue().await {
            Ok(0) => {}
            Ok(rescued) => {
                tracing::info!(rescued, "returned expired leases to pending");
            }
            Err(error) => tracing::warn!(%error, "rescuing expired leases failed"),
        }
    }
}

#[async_trait]
impl Provider for SqlProvider {
    fn name(&self) -> &'static str {
        NAME
    }

    fn group(&self) -> &str {
        self.shared.group()
    }

    fn features(&self) -> ProviderFeatures {
        ProviderFeatures {
            durable: true,
            shared: self.shared.dialect == Dialect::Postgres,
            consumer_groups: true,
            ordered: true,
        }
    }

    async fn publish(&self, event: &Event) -> Result<(), ProviderError> {
        self.shared.insert(event, true).await?;
        self.shared.counters.published();
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<Option<Event>, ProviderError> {
        self.shared.check_open()?;
        let row = sqlx::query(AssertSqlSafe(self.shared.q.get.clone()))
            .bind(id.to_owned())
            .bind(self.shared.group().to_owned())
            .fetch_optional(&self.shared.pool)
            .await
            .map_err(db_error)?;
        row.map(|row| decode_event(&row, 0)).transpose()
    }

    async fn list(&self, filter: &EventFilter) -> Result<Vec<Event>, ProviderError> {
        self.shared.check_open()?;
        list::list(&self.shared, filter).await
    }

    async fn update_status(&self, id: &str, update: &StatusUpdate) -> Result<(), ProviderError> {
        let shared = &self.shared;
        shared.check_open()?;
        let op = batch::Op::UpdateStatus {
            id: id.to_owned(),
            group: shared.group().to_owned(),
            values: UpdateValues::new(update)?,
        };
        let found = batch::submit(&shared.submitter, op).await?;
        if !found {
            return Err(ProviderError::NotFound(id.to_owned()));
        }
        Ok(())
    }

    async fn delete(&self, id: &str) -> Result<bool, ProviderError> {
        let shared = &self.shared;
        shared.check_open()?;
        match shared.dialect {
            Dialect::Postgres => Ok(sqlx::query(AssertSqlSafe(shared.q.delete_event.clone()))
                .bind(id.to_owned())
                .fetch_optional(&shared.pool)
                .await
                .map_err(db_error)?
                .is_some()),
            Dialect::Sqlite => {
                let mut tx = shared.begin_write().await?;
                let row = sqlx::query(AssertSqlSafe(shared.q.delete_event.clone()))
                    .bind(id.to_owned())
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(db_error)?;
                let Some(row) = row else {
                    return Ok(false);
                };
                let seq: i64 = row.try_get(0).map_err(db_error)?;
                for sql in [&shared.q.delete_deliveries, &shared.q.delete_states] {
                    sqlx::query(AssertSqlSafe(sql.clone()))
                        .bind(seq)
                        .execute(&mut *tx)
                        .await
                        .map_err(db_error)?;
                }
                tx.commit().await.map_err(db_error)?;
                Ok(true)
            }
        }
    }

    async fn requeue(&self, id: &str, update: &StatusUpdate) -> Result<(), ProviderError> {
        let shared = &self.shared;
        shared.check_open()?;
        let group = shared.group().to_owned();
        let values = UpdateValues::new(update)?;
        let now = now_micros();
        // One transaction: lock the event row, then the group's delivery row (PostgreSQL:
        // `FOR UPDATE`, so a claim in flight is waited for and seen), then read the group's
        // status; SQLite's write transaction serializes all of it anyway.
        let mut tx = shared.begin_write().await?;
        let seq: Option<i64> = sqlx::query_scalar(AssertSqlSafe(shared.q.lock_event.clone()))
            .bind(id.to_owned())
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_error)?;
        let Some(seq) = seq else {
            return Err(ProviderError::NotFound(id.to_owned()));
        };
        let delivery = sqlx::query(AssertSqlSafe(shared.q.delivery_of.clone()))
            .bind(group.clone())
            .bind(seq)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_error)?;
        let live = match delivery {
            Some(row) => {
                let token: Option<String> = row.try_get(0).map_err(db_error)?;
                let visible_at: i64 = row.try_get(1).map_err(db_error)?;
                token.is_some() && visible_at > now
            }
            None => false,
        };
        if live {
            let status: String = sqlx::query_scalar(AssertSqlSafe(shared.q.status_by_seq.clone()))
                .bind(group.clone())
                .bind(seq)
                .fetch_one(&mut *tx)
                .await
                .map_err(db_error)?;
            return Err(ProviderError::InvalidState {
                id: id.to_owned(),
                status: status.parse().unwrap_or(EventStatus::Processing),
                reason: "a consumer of the group holds a live lease on it; retry it once it \
                         finished or its lease expired",
            });
        }
        // Replacing the delivery row revokes an expired lease: its holder's token no longer
        // matches, so it can neither acknowledge nor extend it.
        values
            .bind(
                sqlx::query(AssertSqlSafe(shared.q.upsert_by_seq.clone()))
                    .bind(group.clone())
                    .bind(seq),
            )
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        sqlx::query(AssertSqlSafe(shared.q.requeue_delivery.clone()))
            .bind(group.clone())
            .bind(seq)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        if shared.dialect == Dialect::Postgres {
            sqlx::query(AssertSqlSafe(shared.q.notify.clone()))
                .bind(shared.q.channel.clone())
                .bind(watch::state_notification(true, id, &group))
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
        }
        tx.commit().await.map_err(db_error)?;
        shared.signal(true).await;
        Ok(())
    }

    async fn consume(&self, options: ConsumerOptions) -> Result<Arc<dyn Consumer>, ProviderError> {
        let shared = &self.shared;
        shared.check_open()?;
        shared.ensure_group(&options.group).await?;
        let key = shared.next_consumer.fetch_add(1, Ordering::Relaxed);
        Shared::lock(&shared.consumers).insert(key, (options.group.clone(), options.name.clone()));
        Ok(Arc::new(SqlConsumer {
            shared: shared.clone(),
            key,
            group: options.group,
            name: options.name,
            lease: options.lease,
            closed: AtomicBool::new(false),
            cancel: shared.shutdown.child_token(),
        }))
    }

    async fn stream(&self, pattern: &Pattern) -> Result<EventStream, ProviderError> {
        self.shared.check_open()?;
        let stream = watch::watcher_stream(
            self.shared.watchers.subscribe(),
            pattern,
            self.shared.shutdown.clone(),
        );
        Ok(eventbroker::provider::watch_buffer::bounded(
            stream,
            self.shared.options.watcher_buffer,
        ))
    }

    async fn ping(&self) -> Result<(), ProviderError> {
        self.shared.check_open()?;
        sqlx::query("SELECT 1")
            .execute(&self.shared.pool)
            .await
            .map_err(db_error)?;
        Ok(())
    }

    async fn stats(&self) -> Result<ProviderStats, ProviderError> {
        let shared = &self.shared;
        shared.check_open()?;
        let mut stats = ProviderStats::empty(NAME);
        let rows = sqlx::query(AssertSqlSafe(shared.q.count_by_status.clone()))
            .bind(shared.group().to_owned())
            .fetch_all(&shared.pool)
            .await
            .map_err(db_error)?;
        let mut stored = 0u64;
        for row in &rows {
            let status: String = row.try_get(0).map_err(db_error)?;
            let count: i64 = row.try_get(1).map_err(db_error)?;
            let count = u64::try_from(count).unwrap_or(0);
            stored += count;
            *stats.by_status.entry(status).or_default() += count;
        }
        let groups = sqlx::query(AssertSqlSafe(shared.q.group_stats.clone()))
            .bind(now_micros())
            .fetch_all(&shared.pool)
            .await
            .map_err(db_error)?;
        for row in &groups {
            let name: String = row.try_get(0).map_err(db_error)?;
            let backlog: i64 = row.try_get(1).map_err(db_error)?;
            let leased: i64 = row.try_get(2).map_err(db_error)?;
            stats
                .backend
                .insert(format!("group.{name}.backlog"), backlog.into());
            stats
                .backend
                .insert(format!("group.{name}.leased"), leased.into());
        }
        stats.backend.insert("stored".into(), stored.into());
        stats.backend.insert(
            "dialect".into(),
            match shared.dialect {
                Dialect::Postgres => "postgres",
                Dialect::Sqlite => "sqlite",
            }
            .into(),
        );
        stats
            .backend
            .insert("table".into(), shared.table.clone().into());
        stats
            .backend
            .insert("pool_size".into(), shared.pool.size().into());
        shared.counters.fill(&mut stats);
        stats.consumers = Shared::lock(&shared.consumers).len() as u64;
        stats.subscribers = shared.watchers.receiver_count() as u64;
        Ok(stats)
    }

    /// PostgreSQL: the cluster handler store on this provider's pool and listener
    /// ([`handler_store::PgHandlerStore`]). SQLite: `None`; it is one host's database, so a
    /// host keeps its handlers in its own directory.
    fn handler_store(&self) -> Option<Arc<dyn eventbroker::HandlerStore>> {
        handler_store::PgHandlerStore::new(self.shared.clone())
            .map(|store| Arc::new(store) as Arc<dyn eventbroker::HandlerStore>)
    }

    /// Handlers' key-value state in this provider's database, on its pools
    /// ([`keyvalue::SqlKeyValue`]): shared by every host using the database.
    fn keyvalue(&self) -> Option<Arc<dyn eventbroker::KeyValueStore>> {
        Some(Arc::new(keyvalue::SqlKeyValue::new(self.shared.clone())))
    }

    async fn close(&self) {
        let shared = &self.shared;
        if shared.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        // Hand back what open consumers still hold, so another host (or this one after a
        // restart) gets it at once instead of after the lease.
        let open: Vec<(String, String)> = Shared::lock(&shared.consumers)
            .drain()
            .map(|(_, v)| v)
            .collect();
        for (group, name) in open {
            if let Err(error) = consumer::hand_back_leases(shared, &group, &name).await {
                tracing::warn!(%error, consumer = %name, "could not hand back leases on close");
            }
        }
        shared.shutdown.cancel();
        let tasks: Vec<JoinHandle<()>> = Shared::lock(&shared.tasks).drain(..).collect();
        for task in tasks {
            let _ = task.await;
        }
        if let Some(key) = &shared.sqlite_key {
            watch::unregister_sqlite_hub(key, &shared.hub);
        }
        shared.pool.close().await;
        shared.writer.close().await;
    }
}
