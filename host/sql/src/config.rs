//! The `event_broker.database` section: the one place for its keys, defaults and validation.

use std::time::Duration;

use eventbroker::config::{InvalidValue, require_positive};
use serde::{Deserialize, Serialize};

/// The database provider (SQLite or PostgreSQL, chosen by the URL's scheme).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SqlConfig {
    /// Connection URL: `postgres://user:pass@host/db` or `sqlite://path/to/file.db` (the file
    /// and its directory are created if missing). Default `sqlite://eventbroker.db`.
    pub url: String,
    /// Name of the events table (a plain SQL identifier: letters, digits and `_`, starting
    /// with a letter or `_`, at most 40 characters). The provider's other tables are named
    /// after it (`<table>_deliveries`, `<table>_groups`, `<table>_migrations`). Default `events`.
    pub table_name: String,
    /// How often consumers and watchers look for new work when no notification arrived
    /// (PostgreSQL wakes them with `LISTEN/NOTIFY`; SQLite relies on it for other processes).
    /// Default 1s.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Largest connection pool. Default 10.
    pub max_connections: u32,
    /// How long to wait for a connection (at start and from the pool). Default 10s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Most deliveries claimed by one query. Default 64.
    pub batch_size: usize,
    /// How often expired leases (a host that died mid-event) are returned to `pending`.
    /// Expired deliveries are claimable at once regardless; this resets their status.
    /// Default 10s.
    #[serde(with = "humantime_serde")]
    pub rescue_interval: Duration,
    /// Events buffered per live watcher before it is cut off as too slow. Default 1024.
    pub watcher_buffer: usize,
    /// Longest time one group-commit batch of writes may take, including re-running its
    /// writes one by one after a failure; writes still unfinished then fail. A database
    /// found unreachable makes every write fail at once until it answers again. Default 10s.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
}

impl Default for SqlConfig {
    fn default() -> Self {
        SqlConfig {
            url: "sqlite://eventbroker.db".into(),
            table_name: "events".into(),
            poll_interval: Duration::from_secs(1),
            max_connections: 10,
            connect_timeout: Duration::from_secs(10),
            batch_size: 64,
            rescue_interval: Duration::from_secs(10),
            watcher_buffer: 1024,
            write_timeout: Duration::from_secs(10),
        }
    }
}

impl SqlConfig {
    /// Checks every rule serde cannot express, with keys under `event_broker.database.`.
    ///
    /// # Errors
    /// [`InvalidValue`] naming the first key out of range.
    pub fn validate(&self) -> Result<(), InvalidValue> {
        if !(self.url.starts_with("postgres://")
            || self.url.starts_with("postgresql://")
            || self.url.starts_with("sqlite:"))
        {
            return Err(InvalidValue::new(
                "event_broker.database.url",
                "must start with postgres://, postgresql:// or sqlite:",
            ));
        }
        if let Some(reason) = crate::dialect::identifier_problem(&self.table_name) {
            return Err(InvalidValue::new(
                "event_broker.database.table_name",
                reason,
            ));
        }
        require_positive([
            (
                "event_broker.database.max_connections",
                u64::from(self.max_connections),
            ),
            ("event_broker.database.batch_size", self.batch_size as u64),
            (
                "event_broker.database.watcher_buffer",
                self.watcher_buffer as u64,
            ),
        ])?;
        for (key, value) in [
            ("event_broker.database.poll_interval", self.poll_interval),
            (
                "event_broker.database.connect_timeout",
                self.connect_timeout,
            ),
            (
                "event_broker.database.rescue_interval",
                self.rescue_interval,
            ),
            ("event_broker.database.write_timeout", self.write_timeout),
        ] {
            if value.is_zero() {
                return Err(InvalidValue::new(key, "must be more than 0"));
            }
        }
        Ok(())
    }
}
