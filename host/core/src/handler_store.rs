//! The cluster handler store: where a cluster keeps its deployed handler components, the
//! deployment record of each handler (desired version, earlier versions, canary) and each
//! host's report of what it runs.
//!
//! Backends that a cluster shares (PostgreSQL, Redis, NATS) implement [`HandlerStore`] with
//! storage primitives only: content-addressed component bytes, one record per handler name
//! written by compare-and-set on a revision, per-host reports that expire, and a change feed.
//! What a record means (versions, rollback, canary decisions) is decided by the handler
//! registry (`eventbroker-wasm`), never by a backend. A provider offers its store through
//! [`crate::Provider::handler_store`].

use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;

/// A handler's deployment record as stored: an opaque JSON document and the revision the
/// store gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// Handler name.
    pub name: String,
    /// The store's revision of this record; a write must name it to replace the record.
    /// Revisions of one name only grow.
    pub revision: u64,
    /// The record (JSON text written by the registry).
    pub doc: String,
}

/// What a compare-and-set write found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Written; the record's new revision.
    Done(u64),
    /// Not written: the record's revision was not the expected one (another host wrote first).
    Conflict,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend failed or could not be reached.
    #[error("handler store ({backend}): {message}")]
    Backend {
        /// Backend name.
        backend: &'static str,
        /// What failed.
        message: String,
    },
}

impl StoreError {
    /// A backend failure of `backend`.
    pub fn backend(backend: &'static str, message: impl std::fmt::Display) -> Self {
        StoreError::Backend {
            backend,
            message: message.to_string(),
        }
    }
}

/// Storage for the handlers of a cluster. Every method is safe to call from several hosts at
/// once: component writes are idempotent (a version is its content hash), record writes are
/// compare-and-set, host reports are per host.
#[async_trait]
pub trait HandlerStore: Send + Sync + 'static {
    /// Backend name, for messages.
    fn backend(&self) -> &'static str;

    /// Stores a component's bytes under `version` (its content hash). Storing the same version
    /// again is harmless.
    ///
    /// # Errors
    /// Backend failures.
    async fn put_component(&self, version: &str, bytes: &[u8]) -> Result<(), StoreError>;

    /// A component's bytes, `None` when the store does not hold `version`.
    ///
    /// # Errors
    /// Backend failures.
    async fn component(&self, version: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Deletes a component's bytes (a version no record keeps any more); deleting a missing
    /// one is harmless.
    ///
    /// # Errors
    /// Backend failures.
    async fn delete_component(&self, version: &str) -> Result<(), StoreError>;

    /// Every handler's record.
    ///
    /// # Errors
    /// Backend failures.
    async fn records(&self) -> Result<Vec<StoredRecord>, StoreError>;

    /// One handler's record.
    ///
    /// # Errors
    /// Backend failures.
    async fn record(&self, name: &str) -> Result<Option<StoredRecord>, StoreError>;

    /// Writes `doc` as handler `name`'s record if its revision is `expected` (`None`: only if
    /// there is no record), and notifies every watcher.
    ///
    /// # Errors
    /// Backend failures.
    async fn write_record(
        &self,
        name: &str,
        doc: &str,
        expected: Option<u64>,
    ) -> Result<Written, StoreError>;

    /// Deletes handler `name`'s record if its revision is `expected`, and notifies every
    /// watcher. `Ok(false)` on a conflict or when there is no record.
    ///
    /// # Errors
    /// Backend failures.
    async fn delete_record(&self, name: &str, expected: u64) -> Result<bool, StoreError>;

    /// Writes this host's report (JSON text), replacing its previous one; it expires after
    /// `ttl` unless written again.
    ///
    /// # Errors
    /// Backend failures.
    async fn put_report(&self, host: &str, doc: &str, ttl: Duration) -> Result<(), StoreError>;

    /// Every live host's report, as `(host, doc)`.
    ///
    /// # Errors
    /// Backend failures.
    async fn reports(&self) -> Result<Vec<(String, String)>, StoreError>;

    /// A feed that yields once (at least) after each record change by any host; it may
    /// coalesce changes and may end when the backend connection drops, so a caller also polls.
    ///
    /// # Errors
    /// Backend failures setting up the feed.
    async fn changes(&self) -> Result<BoxStream<'static, ()>, StoreError>;
}
