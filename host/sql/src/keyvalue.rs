//! Handlers' key-value state on the database ([`eventbroker::KeyValueStore`]), on the
//! provider's own connection pools, in two tables named from the configured table `T`
//! (created by migration 4 of the provider's schema): `T_kv` holds each namespace's keys and
//! values, `T_kv_usage` each namespace's usage (keys, and bytes of keys and values) as its
//! quota counts it.
//!
//! Consistency: every operation is one database transaction, so increments and quota checks
//! are exact across every host sharing the database, and reads see every committed write. A
//! write (`set`, `increment`, `delete`) first locks its namespace — PostgreSQL locks the
//! namespace's usage row (`SELECT … FOR UPDATE`), SQLite takes the database's write lock
//! (`BEGIN IMMEDIATE`) — and then reads the key, checks the quota and writes the entry and the
//! new usage before it commits: concurrent increments are never lost, concurrent writers never
//! take a namespace past its quota, and a refused write (quota exceeded, not a number) or a
//! host dying mid-write changes nothing, so the usage always matches the entries. Writes to one
//! namespace therefore run one at a time (on SQLite, every write to the database does).
//! Listing pages through a namespace in the order its keys were created: a key present
//! throughout a listing is listed exactly once; keys created or deleted meanwhile may or may
//! not be.
//!
//! PostgreSQL stores keys as `TEXT`, which cannot hold the NUL character: a key containing it
//! is refused there as invalid (and never found).

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::any::AnyRow;
use sqlx::{Any, AssertSqlSafe, Row, Transaction};

use super::Shared;
use super::dialect::Dialect;
use super::schema::KvQueries;
use eventbroker::keyvalue::{
    KeyPage, KeyValueStore, KvError, Namespace, Quota, Usage, incremented,
};

/// Keys per page of [`SqlKeyValue::list_keys`].
const PAGE: usize = 1000;

/// A write transaction of the store.
type Tx = Transaction<'static, Any>;

/// Handlers' key-value state in the provider's database ([`crate::SqlProvider`]'s
/// `keyvalue()`): see the [module documentation](self) for what it guarantees. It keeps the
/// provider's shared state alive while it lives, and fails once the provider is closed.
pub struct SqlKeyValue {
    shared: Arc<Shared>,
    q: KvQueries,
}

impl std::fmt::Debug for SqlKeyValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlKeyValue")
            .field("dialect", &self.shared.dialect)
            .field("table", &self.shared.table)
            .finish_non_exhaustive()
    }
}

/// Whether `error` is SQLite's `SQLITE_BUSY` (any extended code of it).
fn is_sqlite_busy(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => db
            .code()
            .and_then(|code| code.parse::<i32>().ok())
            .is_some_and(|code| code & 0xff == 5),
        _ => false,
    }
}

/// A count read from the database (`BIGINT`, never negative).
fn count(value: i64, what: &str) -> Result<u64, String> {
    u64::try_from(value).map_err(|_| format!("negative {what} {value}"))
}

impl SqlKeyValue {
    /// The store of the provider sharing `shared`.
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        let q = KvQueries::new(shared.dialect, &shared.table);
        SqlKeyValue { shared, q }
    }

    fn error(&self, message: impl std::fmt::Display) -> KvError {
        KvError::backend(self.backend(), message)
    }

    /// A database failure; SQLite's `SQLITE_BUSY` says which lock it waited for in vain.
    fn db_error(&self, error: sqlx::Error) -> KvError {
        if self.shared.dialect == Dialect::Sqlite && is_sqlite_busy(&error) {
            return self.error(format!(
                "the database stayed locked by another connection past its busy timeout: {error}"
            ));
        }
        self.error(error)
    }

    fn check_open(&self) -> Result<(), KvError> {
        if self.shared.is_closed() {
            Err(self.error("the database provider is closed"))
        } else {
            Ok(())
        }
    }

    /// Whether the database can hold `key` (PostgreSQL `TEXT` cannot hold NUL).
    fn storable(&self, key: &str) -> bool {
        self.shared.dialect == Dialect::Sqlite || !key.contains('\0')
    }

    /// [`Self::storable`] for a write.
    fn check_storable(&self, key: &str) -> Result<(), KvError> {
        if self.storable(key) {
            Ok(())
        } else {
            Err(KvError::InvalidKey(
                "a key stored in PostgreSQL may not contain the NUL character".into(),
            ))
        }
    }

    /// A write transaction: SQLite `BEGIN IMMEDIATE` on the writer connection (the write lock
    /// up front, waiting up to the busy timeout for other processes); PostgreSQL `BEGIN`.
    async fn begin(&self) -> Result<Tx, KvError> {
        self.check_open()?;
        match self.shared.dialect {
            Dialect::Sqlite => self.shared.writer().begin_with("BEGIN IMMEDIATE").await,
            Dialect::Postgres => self.shared.pool.begin().await,
        }
        .map_err(|error| self.db_error(error))
    }

    /// Commits `tx` when `result` is a success, otherwise rolls it back at once (so that
    /// SQLite's write lock is not held until the connection is next used).
    async fn finish<T>(&self, tx: Tx, result: Result<T, KvError>) -> Result<T, KvError> {
        match result {
            Ok(value) => {
                tx.commit().await.map_err(|error| self.db_error(error))?;
                Ok(value)
            }
            Err(error) => {
                if let Err(rollback) = tx.rollback().await {
                    tracing::warn!(error = %rollback, "rolling back a key-value write failed");
                }
                Err(error)
            }
        }
    }

    fn decode_usage(&self, row: &AnyRow) -> Result<Usage, KvError> {
        let keys: i64 = row.try_get(0).map_err(|error| self.db_error(error))?;
        let bytes: i64 = row.try_get(1).map_err(|error| self.db_error(error))?;
        Ok(Usage {
            keys: count(keys, "key count").map_err(|message| self.error(message))?,
            bytes: count(bytes, "byte count").map_err(|message| self.error(message))?,
        })
    }

    fn to_i64(&self, value: u64) -> Result<i64, KvError> {
        i64::try_from(value).map_err(|_| self.error(format!("{value} is too large to store")))
    }

    /// Locks the namespace for the rest of `tx` and returns its usage; `None` when it has
    /// none yet (never written), unless `create` makes its (empty) usage row first so there
    /// is one to lock (PostgreSQL; SQLite's transaction holds the database's write lock).
    async fn lock_usage(
        &self,
        tx: &mut Tx,
        ns: &str,
        create: bool,
    ) -> Result<Option<Usage>, KvError> {
        if create && self.shared.dialect == Dialect::Postgres {
            sqlx::query(AssertSqlSafe(self.q.create_usage.clone()))
                .bind(ns.to_owned())
                .execute(&mut **tx)
                .await
                .map_err(|error| self.db_error(error))?;
        }
        let row = sqlx::query(AssertSqlSafe(self.q.lock_usage.clone()))
            .bind(ns.to_owned())
            .fetch_optional(&mut **tx)
            .await
            .map_err(|error| self.db_error(error))?;
        row.as_ref().map(|row| self.decode_usage(row)).transpose()
    }

    /// The length in bytes of the value of `key`, `None` when absent.
    async fn stored_length(
        &self,
        tx: &mut Tx,
        ns: &str,
        key: &str,
    ) -> Result<Option<usize>, KvError> {
        let length: Option<i64> = sqlx::query_scalar(AssertSqlSafe(self.q.length.clone()))
            .bind(ns.to_owned())
            .bind(key.to_owned())
            .fetch_optional(&mut **tx)
            .await
            .map_err(|error| self.db_error(error))?;
        length.map(|length| self.length(length)).transpose()
    }

    /// A value's length read from the database.
    fn length(&self, value: i64) -> Result<usize, KvError> {
        usize::try_from(value).map_err(|_| self.error(format!("invalid value length {value}")))
    }

    /// Writes `value` to `key`: replaces its value (`replace`) or inserts it with the
    /// namespace's next id.
    async fn put(
        &self,
        tx: &mut Tx,
        ns: &str,
        key: &str,
        value: Vec<u8>,
        replace: bool,
    ) -> Result<(), KvError> {
        let sql = if replace {
            &self.q.update
        } else {
            &self.q.insert
        };
        sqlx::query(AssertSqlSafe(sql.clone()))
            .bind(ns.to_owned())
            .bind(key.to_owned())
            .bind(value)
            .execute(&mut **tx)
            .await
            .map_err(|error| self.db_error(error))?;
        Ok(())
    }

    async fn save_usage(&self, tx: &mut Tx, ns: &str, usage: Usage) -> Result<(), KvError> {
        sqlx::query(AssertSqlSafe(self.q.save_usage.clone()))
            .bind(ns.to_owned())
            .bind(self.to_i64(usage.keys)?)
            .bind(self.to_i64(usage.bytes)?)
            .execute(&mut **tx)
            .await
            .map_err(|error| self.db_error(error))?;
        Ok(())
    }

    async fn set_in(
        &self,
        tx: &mut Tx,
        ns: &str,
        key: &str,
        value: &[u8],
        quota: &Quota,
    ) -> Result<(), KvError> {
        let usage = self.lock_usage(tx, ns, true).await?.unwrap_or_default();
        let old = self.stored_length(tx, ns, key).await?;
        let after = usage.admit(key, old, value.len(), quota)?;
        self.put(tx, ns, key, value.to_vec(), old.is_some()).await?;
        self.save_usage(tx, ns, after).await
    }

    async fn increment_in(
        &self,
        tx: &mut Tx,
        ns: &str,
        key: &str,
        delta: u64,
        quota: &Quota,
    ) -> Result<u64, KvError> {
        let usage = self.lock_usage(tx, ns, true).await?.unwrap_or_default();
        let current: Option<Vec<u8>> = sqlx::query_scalar(AssertSqlSafe(self.q.value.clone()))
            .bind(ns.to_owned())
            .bind(key.to_owned())
            .fetch_optional(&mut **tx)
            .await
            .map_err(|error| self.db_error(error))?;
        let value = incremented(key, current.as_deref(), delta)?;
        let text = value.to_string().into_bytes();
        let old = current.as_ref().map(Vec::len);
        let after = usage.admit(key, old, text.len(), quota)?;
        self.put(tx, ns, key, text, old.is_some()).await?;
        self.save_usage(tx, ns, after).await?;
        Ok(value)
    }

    async fn delete_in(&self, tx: &mut Tx, ns: &str, key: &str) -> Result<(), KvError> {
        // A namespace without a usage row was never written: it holds no keys.
        let Some(usage) = self.lock_usage(tx, ns, false).await? else {
            return Ok(());
        };
        let deleted: Option<i64> = sqlx::query_scalar(AssertSqlSafe(self.q.delete.clone()))
            .bind(ns.to_owned())
            .bind(key.to_owned())
            .fetch_optional(&mut **tx)
            .await
            .map_err(|error| self.db_error(error))?;
        match deleted {
            Some(old) => {
                let after = usage.after_delete(key, self.length(old)?);
                self.save_usage(tx, ns, after).await
            }
            None => Ok(()),
        }
    }

    fn decode_key(&self, row: &AnyRow) -> Result<(i64, String), KvError> {
        Ok((
            row.try_get(0).map_err(|error| self.db_error(error))?,
            row.try_get(1).map_err(|error| self.db_error(error))?,
        ))
    }
}

#[async_trait]
impl KeyValueStore for SqlKeyValue {
    fn backend(&self) -> &'static str {
        match self.shared.dialect {
            Dialect::Postgres => "postgres",
            Dialect::Sqlite => "sqlite",
        }
    }

    async fn get(&self, ns: &Namespace, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        self.check_open()?;
        if !self.storable(key) {
            return Ok(None);
        }
        sqlx::query_scalar(AssertSqlSafe(self.q.value.clone()))
            .bind(ns.id().to_owned())
            .bind(key.to_owned())
            .fetch_optional(&self.shared.pool)
            .await
            .map_err(|error| self.db_error(error))
    }

    async fn set(
        &self,
        ns: &Namespace,
        key: &str,
        value: &[u8],
        quota: &Quota,
    ) -> Result<(), KvError> {
        self.check_storable(key)?;
        let mut tx = self.begin().await?;
        let result = self.set_in(&mut tx, ns.id(), key, value, quota).await;
        self.finish(tx, result).await
    }

    async fn delete(&self, ns: &Namespace, key: &str) -> Result<(), KvError> {
        if !self.storable(key) {
            return self.check_open();
        }
        let mut tx = self.begin().await?;
        let result = self.delete_in(&mut tx, ns.id(), key).await;
        self.finish(tx, result).await
    }

    async fn exists(&self, ns: &Namespace, key: &str) -> Result<bool, KvError> {
        self.check_open()?;
        if !self.storable(key) {
            return Ok(false);
        }
        let row = sqlx::query(AssertSqlSafe(self.q.exists.clone()))
            .bind(ns.id().to_owned())
            .bind(key.to_owned())
            .fetch_optional(&self.shared.pool)
            .await
            .map_err(|error| self.db_error(error))?;
        Ok(row.is_some())
    }

    /// Pages in the order keys were created (not key order); the cursor is the id of the
    /// page's last key, so keys created or deleted meanwhile never shift the pages.
    async fn list_keys(&self, ns: &Namespace, cursor: Option<u64>) -> Result<KeyPage, KvError> {
        self.check_open()?;
        // Ids are positive `BIGINT`s: nothing lies past a larger cursor.
        let Ok(after) = i64::try_from(cursor.unwrap_or(0)) else {
            return Ok(KeyPage::default());
        };
        let rows = sqlx::query(AssertSqlSafe(self.q.keys.clone()))
            .bind(ns.id().to_owned())
            .bind(after)
            .bind((PAGE + 1) as i64)
            .fetch_all(&self.shared.pool)
            .await
            .map_err(|error| self.db_error(error))?;
        let mut keys = rows
            .iter()
            .map(|row| self.decode_key(row))
            .collect::<Result<Vec<_>, _>>()?;
        let more = keys.len() > PAGE;
        keys.truncate(PAGE);
        let cursor = match keys.last() {
            Some((id, _)) if more => Some(count(*id, "key id").map_err(|m| self.error(m))?),
            _ => None,
        };
        Ok(KeyPage {
            keys: keys.into_iter().map(|(_, key)| key).collect(),
            cursor,
        })
    }

    async fn increment(
        &self,
        ns: &Namespace,
        key: &str,
        delta: u64,
        quota: &Quota,
    ) -> Result<u64, KvError> {
        self.check_storable(key)?;
        let mut tx = self.begin().await?;
        let result = self.increment_in(&mut tx, ns.id(), key, delta, quota).await;
        self.finish(tx, result).await
    }

    async fn usage(&self, ns: &Namespace) -> Result<Usage, KvError> {
        self.check_open()?;
        let row = sqlx::query(AssertSqlSafe(self.q.usage.clone()))
            .bind(ns.id().to_owned())
            .fetch_optional(&self.shared.pool)
            .await
            .map_err(|error| self.db_error(error))?;
        Ok(row
            .as_ref()
            .map(|row| self.decode_usage(row))
            .transpose()?
            .unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_name_the_configured_tables_and_lock_on_postgres_only() {
        let pg = KvQueries::new(Dialect::Postgres, "events");
        assert!(pg.lock_usage.ends_with("FOR UPDATE"));
        assert!(pg.insert.contains("events_kv "));
        assert!(pg.save_usage.contains("events_kv_usage"));
        assert!(pg.length.contains("octet_length"));
        let sqlite = KvQueries::new(Dialect::Sqlite, "events");
        assert_eq!(sqlite.lock_usage, sqlite.usage);
        assert!(sqlite.length.contains("length(value)"));
    }

    #[test]
    fn stored_counts_are_never_negative() {
        assert_eq!(count(7, "key count"), Ok(7));
        assert!(count(-1, "key count").is_err());
    }
}
