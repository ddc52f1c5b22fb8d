//! PostgreSQL change capture: triggers + an outbox table, drained into the broker.
//!
//! [`install`] creates (idempotently) in the watched database a schema (`capture.schema`,
//! default `eventbroker`) holding the outbox table `capture_outbox` and the trigger function
//! `capture_change()`, and an `AFTER INSERT/UPDATE/DELETE … FOR EACH ROW` trigger named
//! `eventbroker_capture` on every watched table. The trigger writes one outbox row per changed
//! row (schema, table, operation, old and new row as JSONB, transaction id) in the same
//! transaction as the change, and notifies the channel `<schema>_capture`.
//!
//! [`Capture`] drains the outbox in id order (LISTEN/NOTIFY wakes it, `poll_interval` is the
//! fallback), publishes each row as a `schema.table.create|update|delete` event with source
//! `database`, and deletes the row only after the broker accepted the event. The event id is
//! the row's `event_id` (a UUID), so a row published again after a crash between publish and
//! delete is refused as a duplicate instead of becoming a second event: delivery is
//! at-least-once into the broker and each change is one event. Changes committed while no
//! host runs wait in the outbox and are published at the next start.
//!
//! [`uninstall`] drops the triggers, the function, the outbox and the schema (when empty).

pub mod config;
mod drain;
mod sql;

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use eventbroker::config::InvalidValue;

pub use self::config::{CaptureConfig, CaptureOperation};
use eventbroker::broker::Broker;

pub use sql::{InstallReport, UninstallReport, install, uninstall};

/// The name of the trigger on each watched table.
pub const TRIGGER_NAME: &str = "eventbroker_capture";
/// The name of the outbox table (in `capture.schema`).
pub const OUTBOX_TABLE: &str = "capture_outbox";
/// The name of the trigger function (in `capture.schema`).
pub const FUNCTION_NAME: &str = "capture_change";
/// Longest accepted `capture.schema` (the notification channel `<schema>_capture` must fit
/// PostgreSQL's 63-byte identifiers).
pub const MAX_SCHEMA_LEN: usize = 48;

/// Errors of change capture.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The capture section of the config is invalid.
    #[error("invalid configuration: {key} {reason}")]
    Config {
        /// The key at fault.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A watched table does not exist.
    #[error("capture.tables names {0}, which does not exist in the watched database")]
    MissingTable(String),
    /// Uninstall would drop changes not yet published.
    #[error(
        "the outbox still holds {0} captured changes not yet published; start the host to drain them, or pass --force to drop them"
    )]
    Pending(i64),
    /// The database failed or could not be reached.
    #[error("change capture database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// A plain SQL identifier: ASCII letter or `_`, then letters, digits or `_`, at most 63 bytes.
pub fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 63
}

/// A watched table, `schema.table`, both plain identifiers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TableName {
    /// The schema.
    pub schema: String,
    /// The table.
    pub table: String,
}

impl TableName {
    /// Parses `schema.table`.
    ///
    /// # Errors
    /// A message saying what is wrong with the name.
    pub fn parse(name: &str) -> Result<TableName, String> {
        let Some((schema, table)) = name.split_once('.') else {
            return Err(format!("{name:?} must be written schema.table"));
        };
        for part in [schema, table] {
            if !is_identifier(part) {
                return Err(format!(
                    "{name:?}: {part:?} is not a plain SQL identifier (letters, digits and _, not starting with a digit)"
                ));
            }
        }
        Ok(TableName {
            schema: schema.to_owned(),
            table: table.to_owned(),
        })
    }

    /// The quoted form `"schema"."table"` (safe: both parts are checked identifiers).
    pub fn quoted(&self) -> String {
        format!("\"{}\".\"{}\"", self.schema, self.table)
    }
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.schema, self.table)
    }
}

/// Checks the capture section; on error returns the key at fault and the reason.
///
/// # Errors
/// `(key, reason)` for the first problem found.
impl CaptureConfig {
    /// Checks the `capture` section: a plain schema name, and when capture is on, a
    /// PostgreSQL URL, valid table names, at least one operation, positive bounds.
    ///
    /// # Errors
    /// [`InvalidValue`] naming the key.
    pub fn validate(&self) -> Result<(), InvalidValue> {
        check_config(self).map_err(|(key, reason)| InvalidValue::new(key, reason))
    }
}

fn check_config(config: &CaptureConfig) -> Result<(), (&'static str, String)> {
    if !is_identifier(&config.schema) || config.schema.len() > MAX_SCHEMA_LEN {
        return Err((
            "capture.schema",
            format!(
                "{:?} must be a plain SQL identifier of at most {MAX_SCHEMA_LEN} bytes",
                config.schema
            ),
        ));
    }
    if !config.enabled() {
        return Ok(());
    }
    if !(config.url.starts_with("postgres://") || config.url.starts_with("postgresql://")) {
        return Err((
            "capture.url",
            "must be a postgres:// URL when capture.tables is set".into(),
        ));
    }
    for table in &config.tables {
        TableName::parse(table).map_err(|reason| ("capture.tables", reason))?;
    }
    if config.operations.is_empty() {
        return Err((
            "capture.operations",
            "must name at least one of create, update, delete".into(),
        ));
    }
    if config.batch_size == 0 {
        return Err(("capture.batch_size", "must be at least 1".into()));
    }
    if config.poll_interval.is_zero() {
        return Err(("capture.poll_interval", "must be more than 0".into()));
    }
    Ok(())
}

/// The watched tables, parsed.
fn tables(config: &CaptureConfig) -> Result<Vec<TableName>, CaptureError> {
    config
        .tables
        .iter()
        .map(|name| {
            TableName::parse(name).map_err(|reason| CaptureError::Config {
                key: "capture.tables",
                reason,
            })
        })
        .collect()
}

/// Connects to the watched database.
///
/// # Errors
/// [`CaptureError::Database`] if it cannot be reached.
pub async fn connect(config: &CaptureConfig) -> Result<PgPool, CaptureError> {
    check_config(config).map_err(|(key, reason)| CaptureError::Config { key, reason })?;
    Ok(PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&config.url)
        .await?)
}

/// A running capture task. Stop it with [`Capture::stop`] before stopping the broker.
pub struct Capture {
    cancel: CancellationToken,
    task: JoinHandle<()>,
    pool: PgPool,
}

impl Capture {
    /// Connects, installs the triggers and outbox when `config.install` is on, and starts
    /// draining the outbox into `broker` (which must be running). Rows already in the outbox
    /// (changes committed while no host ran) are published first.
    ///
    /// # Errors
    /// [`CaptureError`] if the database cannot be reached or the install fails.
    pub async fn start(config: &CaptureConfig, broker: Broker) -> Result<Capture, CaptureError> {
        let pool = connect(config).await?;
        if config.install {
            let report = install(&pool, config).await?;
            tracing::info!(
                tables = %report.tables.join(" "),
                removed = %report.removed.join(" "),
                pending = report.pending,
                "change capture installed"
            );
        }
        let cancel = CancellationToken::new();
        let task = tokio::spawn(drain::run(
            pool.clone(),
            config.clone(),
            broker,
            cancel.clone(),
        ));
        Ok(Capture { cancel, task, pool })
    }

    /// Stops draining (a batch in progress stops after the row being published, and what was
    /// published is removed from the outbox) and closes the connections.
    /// Undrained rows stay in the outbox for the next start.
    pub async fn stop(self) {
        self.cancel.cancel();
        if let Err(error) = self.task.await {
            tracing::error!(%error, "change capture task failed");
        }
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(TableName::parse("public.orders").is_ok());
        assert_eq!(
            TableName::parse("public.orders").unwrap().quoted(),
            "\"public\".\"orders\""
        );
        for bad in [
            "orders",
            "public.",
            "a.b.c",
            "public.or\"ders",
            "1a.b",
            "a.b; drop table x",
        ] {
            assert!(TableName::parse(bad).is_err(), "{bad}");
        }
        let mut config = CaptureConfig::default();
        assert!(check_config(&config).is_ok(), "off by default");
        config.tables = vec!["public.orders".into()];
        assert_eq!(check_config(&config).unwrap_err().0, "capture.url");
        config.url = "postgres://localhost/test".into();
        assert!(check_config(&config).is_ok());
        config.operations.clear();
        assert_eq!(check_config(&config).unwrap_err().0, "capture.operations");
        config.operations = CaptureConfig::default().operations;
        config.schema = "x".repeat(MAX_SCHEMA_LEN + 1);
        assert_eq!(check_config(&config).unwrap_err().0, "capture.schema");
    }
}
