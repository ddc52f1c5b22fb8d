//! The cluster handler store on NATS JetStream ([`NatsHandlerStore`]): where the hosts
//! sharing a server keep their handler components, the deployment record of each handler and
//! each host's report, in three buckets named after `stream_name` (see
//! `docs/providers/nats.md`):
//!
//! - records: a key-value bucket (`{stream_name}_HANDLER_RECORDS`, history 1) keyed by
//!   handler name; a record's revision is its entry's revision, the sequence of the bucket's
//!   stream, so it grows across a delete and a re-create. Writes are compare-and-set on it
//!   (the server checks the expected last sequence of the key); a deleted record leaves a
//!   delete marker, which reads skip;
//! - components: an object store bucket (`{stream_name}_HANDLER_COMPONENTS`) keyed by version
//!   (chunked, so components of any size fit);
//! - reports: a key-value bucket (`{stream_name}_HANDLER_REPORTS`, history 1) keyed by host,
//!   whose values carry their expiry: expired reports are left out of reads and deleted then;
//!   the bucket's `max_age` ([`REPORTS_MAX_AGE`]) removes whatever nobody deleted.
//!
//! The buckets are created (or their settings updated) on first use, on the provider's
//! connection, so hosts that never use the store never create them. Keys are handler and host
//! names as they are when made of letters, digits, `_` and `-`, hex-encoded (`=` + hex)
//! otherwise.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use async_nats::jetstream::object_store::{self, GetErrorKind, InfoErrorKind, ObjectStore};
use async_nats::jetstream::stream::{self, StorageType};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::io::AsyncReadExt;
use tokio::sync::OnceCell;

use crate::NAME;
use crate::config::NatsConfig;
use crate::scan::Scan;
use crate::subjects::{decode_name, encode_name};
use eventbroker::handler_store::{HandlerStore, StoreError, StoredRecord, Written};

/// The `max_age` of the reports bucket: a report not rewritten for this long is removed by the
/// server even if no host read (and deleted) it after it expired. A report written with a
/// longer `ttl` lives this long only.
pub const REPORTS_MAX_AGE: Duration = Duration::from_secs(24 * 60 * 60);

fn failure(error: impl std::fmt::Display) -> StoreError {
    StoreError::backend(NAME, error)
}

/// The handler store of a cluster sharing a NATS server, on the provider's JetStream context
/// (obtained through [`eventbroker::Provider::handler_store`]). Every method is safe to call
/// from several hosts at once: record writes and deletes are compare-and-set on the record's
/// revision, checked by the server; components are keyed by their content hash; reports are
/// per host. Opening the buckets is retried by the next call when it fails.
pub struct NatsHandlerStore {
    context: jetstream::Context,
    storage: StorageType,
    records_bucket: String,
    components_bucket: String,
    reports_bucket: String,
    buckets: OnceCell<Buckets>,
}

/// The opened buckets.
struct Buckets {
    records: kv::Store,
    components: ObjectStore,
    reports: kv::Store,
}

/// A host's report as stored: its text and when it expires.
#[derive(serde::Serialize, serde::Deserialize)]
struct Report {
    /// Unix time in milliseconds (the writing host's clock) after which the report is dead.
    expires_at: i64,
    doc: String,
}

impl NatsHandlerStore {
    /// A store on `context` using the buckets `config` names (storage as `storage`). Nothing
    /// is sent to the server before the first call.
    pub(crate) fn new(
        context: jetstream::Context,
        config: &NatsConfig,
        storage: StorageType,
    ) -> Self {
        NatsHandlerStore {
            context,
            storage,
            records_bucket: config.handler_records_bucket(),
            components_bucket: config.handler_components_bucket(),
            reports_bucket: config.handler_reports_bucket(),
            buckets: OnceCell::new(),
        }
    }

    /// Deletes the three buckets with everything in them (tear-down); missing ones are fine.
    ///
    /// # Errors
    /// Backend failures.
    pub(crate) async fn destroy(&self) -> Result<(), StoreError> {
        let streams = [
            format!("KV_{}", self.records_bucket),
            format!("OBJ_{}", self.components_bucket),
            format!("KV_{}", self.reports_bucket),
        ];
        for name in streams {
            crate::buckets::delete_stream(&self.context, &name)
                .await
                .map_err(failure)?;
        }
        Ok(())
    }

    async fn buckets(&self) -> Result<&Buckets, StoreError> {
        self.buckets.get_or_try_init(|| self.open()).await
    }

    /// Creates the buckets, or updates their settings when they exist.
    async fn open(&self) -> Result<Buckets, StoreError> {
        let records = self
            .open_kv(
                &self.records_bucket,
                "eventbroker: deployment record of each handler, keyed by handler name",
                Duration::ZERO,
            )
            .await?;
        let reports = self
            .open_kv(
                &self.reports_bucket,
                "eventbroker: each host's report of the handlers it runs, keyed by host",
                REPORTS_MAX_AGE,
            )
            .await?;
        let bucket = &self.components_bucket;
        // The settings the client library gives object stores, written directly so that an
        // existing bucket is opened as is (the library's creation fails when it exists).
        self.context
            .create_or_update_stream(stream::Config {
                name: format!("OBJ_{bucket}"),
                description: Some("eventbroker: handler components, keyed by version".into()),
                subjects: vec![format!("$O.{bucket}.C.>"), format!("$O.{bucket}.M.>")],
                storage: self.storage,
                num_replicas: 1,
                discard: stream::DiscardPolicy::New,
                allow_rollup: true,
                allow_direct: true,
                ..stream::Config::default()
            })
            .await
            .map_err(|e| {
                failure(format!(
                    "cannot create or update object store {bucket:?}: {e}"
                ))
            })?;
        let components = self
            .context
            .get_object_store(bucket)
            .await
            .map_err(|e| failure(format!("cannot open object store {bucket:?}: {e}")))?;
        Ok(Buckets {
            records,
            components,
            reports,
        })
    }

    /// Creates or updates a key-value bucket ([`crate::buckets::open_kv`]).
    async fn open_kv(
        &self,
        bucket: &str,
        description: &str,
        max_age: Duration,
    ) -> Result<kv::Store, StoreError> {
        crate::buckets::open_kv(&self.context, bucket, description, self.storage, max_age)
            .await
            .map_err(failure)
    }
}

/// The live entries of a bucket, as `(key, revision, value)` ([`crate::scan`]).
async fn scan(kv: &kv::Store, what: &str) -> Result<Vec<(String, u64, Bytes)>, StoreError> {
    let mut entries = Vec::new();
    let every_key = Scan {
        what,
        filter: format!("{}>", kv.prefix),
        headers_only: false,
    };
    crate::scan::scan(kv, every_key, |key, message| {
        let revision = message
            .info()
            .map_err(|e| format!("listing {what} failed: {e}"))?
            .stream_sequence;
        entries.push((key.to_owned(), revision, message.payload.clone()));
        Ok(())
    })
    .await
    .map_err(failure)?;
    Ok(entries)
}

fn text(name: &str, value: &[u8]) -> Result<String, StoreError> {
    String::from_utf8(value.to_vec())
        .map_err(|_| failure(format!("the stored value of {name:?} is not UTF-8 text")))
}

fn now_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[async_trait]
impl HandlerStore for NatsHandlerStore {
    fn backend(&self) -> &'static str {
        NAME
    }

    /// Stores the component unless the bucket already holds `version` (a version is its
    /// content hash, so an object of that name and size is this component).
    async fn put_component(&self, version: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let components = &self.buckets().await?.components;
        match components.info(version).await {
            Ok(info) if !info.deleted && info.size == bytes.len() => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == InfoErrorKind::NotFound => {}
            Err(e) => return Err(failure(format!("cannot read component {version}: {e}"))),
        }
        let mut reader = bytes;
        components
            .put(
                object_store::ObjectMetadata {
                    name: version.to_owned(),
                    ..object_store::ObjectMetadata::default()
                },
                &mut reader,
            )
            .await
            .map(drop)
            .map_err(|e| failure(format!("cannot store component {version}: {e}")))
    }

    async fn component(&self, version: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let components = &self.buckets().await?.components;
        let mut object = match components.get(version).await {
            Ok(object) => object,
            Err(e) if e.kind() == GetErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(failure(format!("cannot read component {version}: {e}"))),
        };
        let mut bytes = Vec::with_capacity(object.info().size);
        object
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| failure(format!("cannot read component {version}: {e}")))?;
        Ok(Some(bytes))
    }

    async fn delete_component(&self, version: &str) -> Result<(), StoreError> {
        let components = &self.buckets().await?.components;
        match components.info(version).await {
            Ok(info) if info.deleted => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == InfoErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(failure(format!("cannot read component {version}: {e}"))),
        }
        match components.delete(version).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == object_store::DeleteErrorKind::NotFound => Ok(()),
            Err(e) => Err(failure(format!("cannot delete component {version}: {e}"))),
        }
    }

    async fn records(&self) -> Result<Vec<StoredRecord>, StoreError> {
        let records = &self.buckets().await?.records;
        scan(records, "handler records")
            .await?
            .into_iter()
            .map(|(key, revision, value)| {
                let name = decode_name(&key);
                Ok(StoredRecord {
                    doc: text(&name, &value)?,
                    name,
                    revision,
                })
            })
            .collect()
    }

    async fn record(&self, name: &str) -> Result<Option<StoredRecord>, StoreError> {
        let records = &self.buckets().await?.records;
        let entry = records
            .entry(encode_name(name))
            .await
            .map_err(|e| failure(format!("cannot read handler record {name:?}: {e}")))?;
        match entry {
            Some(entry) if entry.operation == Operation::Put => Ok(Some(StoredRecord {
                name: name.to_owned(),
                revision: entry.revision,
                doc: text(name, &entry.value)?,
            })),
            // Deleted (a marker), or never written.
            _ => Ok(None),
        }
    }

    async fn write_record(
        &self,
        name: &str,
        doc: &str,
        expected: Option<u64>,
    ) -> Result<Written, StoreError> {
        let records = &self.buckets().await?.records;
        let key = encode_name(name);
        let value = Bytes::copy_from_slice(doc.as_bytes());
        match expected {
            None => match records.create(&key, value).await {
                Ok(revision) => Ok(Written::Done(revision)),
                // Also what a concurrent re-create of a deleted name loses with.
                Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Ok(Written::Conflict),
                Err(e) => Err(failure(format!(
                    "cannot create handler record {name:?}: {e}"
                ))),
            },
            // No record has revision 0 (the server reads it as "no entry").
            Some(0) => Ok(Written::Conflict),
            Some(revision) => match records.update(&key, value, revision).await {
                Ok(revision) => Ok(Written::Done(revision)),
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => Ok(Written::Conflict),
                Err(e) => Err(failure(format!(
                    "cannot update handler record {name:?}: {e}"
                ))),
            },
        }
    }

    async fn delete_record(&self, name: &str, expected: u64) -> Result<bool, StoreError> {
        if expected == 0 {
            return Ok(false);
        }
        let records = &self.buckets().await?.records;
        // A revision is a stream sequence naming one write: only a live record has the
        // revision a caller read, never a delete marker or another key's entry.
        match records
            .delete_expect_revision(encode_name(name), Some(expected))
            .await
        {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => Ok(false),
            Err(e) => Err(failure(format!(
                "cannot delete handler record {name:?}: {e}"
            ))),
        }
    }

    async fn put_report(&self, host: &str, doc: &str, ttl: Duration) -> Result<(), StoreError> {
        let reports = &self.buckets().await?.reports;
        let ttl = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let report = Report {
            expires_at: now_millis().saturating_add(ttl),
            doc: doc.to_owned(),
        };
        let value = serde_json::to_vec(&report)
            .map_err(|e| failure(format!("cannot encode the report of {host:?}: {e}")))?;
        reports
            .put(encode_name(host), value.into())
            .await
            .map(drop)
            .map_err(|e| failure(format!("cannot store the report of {host:?}: {e}")))
    }

    /// Live reports; expired ones are deleted on the way (each only if not rewritten since).
    async fn reports(&self) -> Result<Vec<(String, String)>, StoreError> {
        let reports = &self.buckets().await?.reports;
        let now = now_millis();
        let mut live = Vec::new();
        for (key, revision, value) in scan(reports, "host reports").await? {
            let host = decode_name(&key);
            let report: Report = match serde_json::from_slice(&value) {
                Ok(report) => report,
                Err(error) => {
                    tracing::warn!(%host, %error, "skipping an unreadable host report");
                    continue;
                }
            };
            if report.expires_at > now {
                live.push((host, report.doc));
            } else if let Err(error) = reports.purge_expect_revision(&key, Some(revision)).await
                && error.kind() != UpdateErrorKind::WrongLastRevision
            {
                tracing::debug!(%host, %error, "could not delete an expired host report");
            }
        }
        Ok(live)
    }

    async fn changes(&self) -> Result<BoxStream<'static, ()>, StoreError> {
        let records = &self.buckets().await?.records;
        let watch = records
            .watch_all()
            .await
            .map_err(|e| failure(format!("cannot watch handler records: {e}")))?;
        Ok(watch
            .take_while(|entry| {
                if let Err(error) = entry {
                    tracing::debug!(%error, "the handler record feed ended");
                }
                futures::future::ready(entry.is_ok())
            })
            .map(drop)
            .boxed())
    }
}
