//! The cluster handler store on PostgreSQL ([`eventbroker::HandlerStore`]): where the hosts
//! sharing the database keep their handlers' components, deployment records and reports.
//!
//! It runs on the provider's own connection pool and notification listener (no connections of
//! its own), on three tables and a sequence named from the configured table `T` (created by
//! migration 3 of the provider's schema):
//! - `T_handler_components`: component bytes by version (content hash); writes are idempotent.
//! - `T_handlers`: one record per handler name with its revision. Every write takes a fresh
//!   revision from the sequence `T_handler_revisions`, so revisions grow across a delete and
//!   re-create. Writes and deletes are compare-and-set in one statement that also sends
//!   `NOTIFY T_handlers, '<name>'`, so a change and its notification commit together.
//! - `T_handler_reports`: each host's report and when it expires (`now() + ttl` on the
//!   database's clock, so hosts' clocks do not matter); reading drops expired ones.
//!
//! SQLite has no handler store: it is one host's database ([`crate::SqlProvider`] returns
//! `None`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use sqlx::{AssertSqlSafe, Row};
use tokio_stream::wrappers::BroadcastStream;

use super::Shared;
use super::schema::HandlerQueries;
use eventbroker::handler_store::{HandlerStore, StoreError, StoredRecord, Written};

/// The backend name in the store's errors.
const BACKEND: &str = "postgres";

/// Change signals buffered per feed; a feed that falls further behind still yields (once for
/// everything it missed), as a feed may coalesce changes.
pub(crate) const FEED_BUFFER: usize = 16;

/// Longest report lifetime: a longer `ttl` is cut to this (about 100 years), which keeps the
/// expiry inside PostgreSQL's timestamp range.
const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

fn backend_error(error: impl std::fmt::Display) -> StoreError {
    StoreError::backend(BACKEND, error)
}

/// The cluster handler store of a PostgreSQL provider ([`crate::SqlProvider`]'s
/// `handler_store()`).
///
/// Guarantees: component writes are idempotent; a record is created only where none exists
/// and replaced or deleted only from its current revision, each in a single statement
/// (concurrent writers from one revision: exactly one wins); a record's revisions only grow,
/// across deletes too; every record change notifies every host's [`HandlerStore::changes`]
/// feed in the change's own transaction. It keeps the provider's shared state alive while it
/// lives, and fails once the provider is closed.
pub struct PgHandlerStore {
    shared: Arc<Shared>,
    q: HandlerQueries,
}

impl std::fmt::Debug for PgHandlerStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgHandlerStore")
            .field("table", &self.shared.table)
            .finish_non_exhaustive()
    }
}

impl PgHandlerStore {
    /// The store of the provider sharing `shared`; `None` when its database has none (SQLite).
    pub(crate) fn new(shared: Arc<Shared>) -> Option<Self> {
        let q = shared.q.handlers.clone()?;
        Some(PgHandlerStore { shared, q })
    }

    fn check_open(&self) -> Result<(), StoreError> {
        if self.shared.is_closed() {
            Err(backend_error("the database provider is closed"))
        } else {
            Ok(())
        }
    }

    fn pool(&self) -> &sqlx::AnyPool {
        &self.shared.pool
    }
}

/// A revision read from the database (a `BIGINT` from the sequence, never negative).
fn revision(value: i64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| backend_error(format!("negative revision {value}")))
}

fn decode_record(row: &sqlx::any::AnyRow) -> Result<StoredRecord, StoreError> {
    Ok(StoredRecord {
        name: row.try_get(0).map_err(backend_error)?,
        revision: revision(row.try_get(1).map_err(backend_error)?)?,
        doc: row.try_get(2).map_err(backend_error)?,
    })
}

#[async_trait]
impl HandlerStore for PgHandlerStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn put_component(&self, version: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.check_open()?;
        sqlx::query(AssertSqlSafe(self.q.put_component.clone()))
            .bind(version.to_owned())
            .bind(bytes.to_vec())
            .execute(self.pool())
            .await
            .map_err(backend_error)?;
        Ok(())
    }

    async fn component(&self, version: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.check_open()?;
        sqlx::query_scalar(AssertSqlSafe(self.q.component.clone()))
            .bind(version.to_owned())
            .fetch_optional(self.pool())
            .await
            .map_err(backend_error)
    }

    async fn delete_component(&self, version: &str) -> Result<(), StoreError> {
        self.check_open()?;
        sqlx::query(AssertSqlSafe(self.q.delete_component.clone()))
            .bind(version.to_owned())
            .execute(self.pool())
            .await
            .map_err(backend_error)?;
        Ok(())
    }

    async fn records(&self) -> Result<Vec<StoredRecord>, StoreError> {
        self.check_open()?;
        let rows = sqlx::query(AssertSqlSafe(self.q.records.clone()))
            .fetch_all(self.pool())
            .await
            .map_err(backend_error)?;
        rows.iter().map(decode_record).collect()
    }

    async fn record(&self, name: &str) -> Result<Option<StoredRecord>, StoreError> {
        self.check_open()?;
        let row = sqlx::query(AssertSqlSafe(self.q.record.clone()))
            .bind(name.to_owned())
            .fetch_optional(self.pool())
            .await
            .map_err(backend_error)?;
        row.as_ref().map(decode_record).transpose()
    }

    async fn write_record(
        &self,
        name: &str,
        doc: &str,
        expected: Option<u64>,
    ) -> Result<Written, StoreError> {
        self.check_open()?;
        let query = match expected {
            None => sqlx::query_scalar(AssertSqlSafe(self.q.create_record.clone()))
                .bind(name.to_owned())
                .bind(doc.to_owned())
                .bind(self.q.channel.clone()),
            Some(expected) => {
                // No stored revision exceeds `i64::MAX`: a larger one can only conflict.
                let Ok(expected) = i64::try_from(expected) else {
                    return Ok(Written::Conflict);
                };
                sqlx::query_scalar(AssertSqlSafe(self.q.update_record.clone()))
                    .bind(name.to_owned())
                    .bind(doc.to_owned())
                    .bind(expected)
                    .bind(self.q.channel.clone())
            }
        };
        let written: Option<i64> = query
            .fetch_optional(self.pool())
            .await
            .map_err(backend_error)?;
        match written {
            Some(value) => Ok(Written::Done(revision(value)?)),
            None => Ok(Written::Conflict),
        }
    }

    async fn delete_record(&self, name: &str, expected: u64) -> Result<bool, StoreError> {
        self.check_open()?;
        let Ok(expected) = i64::try_from(expected) else {
            return Ok(false);
        };
        let deleted = sqlx::query(AssertSqlSafe(self.q.delete_record.clone()))
            .bind(name.to_owned())
            .bind(expected)
            .bind(self.q.channel.clone())
            .fetch_optional(self.pool())
            .await
            .map_err(backend_error)?;
        Ok(deleted.is_some())
    }

    async fn put_report(&self, host: &str, doc: &str, ttl: Duration) -> Result<(), StoreError> {
        self.check_open()?;
        sqlx::query(AssertSqlSafe(self.q.put_report.clone()))
            .bind(host.to_owned())
            .bind(doc.to_owned())
            .bind(super::micros(ttl.min(MAX_TTL)))
            .execute(self.pool())
            .await
            .map_err(backend_error)?;
        Ok(())
    }

    async fn reports(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.check_open()?;
        let rows = sqlx::query(AssertSqlSafe(self.q.reports.clone()))
            .fetch_all(self.pool())
            .await
            .map_err(backend_error)?;
        rows.iter()
            .map(|row| {
                Ok((
                    row.try_get(0).map_err(backend_error)?,
                    row.try_get(1).map_err(backend_error)?,
                ))
            })
            .collect()
    }

    /// Yields after each notified record change (several may coalesce into one yield) and
    /// whenever the provider's listener lost its connection (changes may have been missed);
    /// the listener reconnects by itself, so the feed stays open until the provider closes.
    async fn changes(&self) -> Result<BoxStream<'static, ()>, StoreError> {
        self.check_open()?;
        // Lagging only means several changes coalesced: yield for them as well.
        let stream = BroadcastStream::new(self.shared.handler_changes.subscribe())
            .map(|_| ())
            .take_until(self.shared.shutdown.clone().cancelled_owned());
        Ok(Box::pin(stream))
    }
}
