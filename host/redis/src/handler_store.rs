//! The cluster handler store on Redis ([`RedisHandlerStore`]): where the hosts sharing a Redis
//! database and `stream_name` keep their deployed handler components, the deployment record of
//! each handler and each host's report. Every key starts with the stream name (`p`):
//!
//! - `p:handler-component:{version}` (string): a component's bytes;
//! - `p:handlers` (hash): handler name → record JSON, and `p:handler-revisions` (hash): handler
//!   name → its revision, always written together by one script;
//! - `p:handler-revision` (string): the counter every record write takes its revision from
//!   (`INCR`), so the revisions of a name grow across a delete and re-create;
//! - `p:handler-report:{host}` (string, expiring): a host's report, and `p:handler-hosts`
//!   (set): the hosts that reported (members whose report expired are dropped when reading);
//! - `p:handlers-changed` (pub/sub channel): a message (the handler name) per record change.
//!
//! Record writes and deletes are compare-and-set Lua scripts (`WRITE_RECORD`,
//! `DELETE_RECORD`), atomic on the server; reads of a record and its revision are one
//! `MULTI`/`EXEC`, so a record is never paired with another write's revision.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use redis::RedisError;

use eventbroker::handler_store::{HandlerStore, StoreError, StoredRecord, Written};

use super::{NAME, Shared};

/// A Redis failure as a store error.
fn backend(error: RedisError) -> StoreError {
    StoreError::backend(NAME, error)
}

/// A stored revision (decimal text) as a number.
fn revision(name: &str, text: &str) -> Result<u64, StoreError> {
    text.parse().map_err(|_| {
        StoreError::backend(
            NAME,
            format!("handler {name:?} has an invalid revision {text:?}"),
        )
    })
}

/// The handler store of a [`crate::RedisProvider`], on the provider's connection manager (and
/// one dedicated pub/sub connection per change feed). Safe to use from several hosts at once:
/// component writes are idempotent, record writes are compare-and-set scripts, reports are per
/// host. Change feeds end when the provider is closed.
pub struct RedisHandlerStore {
    shared: Arc<Shared>,
}

impl RedisHandlerStore {
    /// The store on `shared`'s connections and keys.
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        RedisHandlerStore { shared }
    }
}

#[async_trait]
impl HandlerStore for RedisHandlerStore {
    fn backend(&self) -> &'static str {
        NAME
    }

    async fn put_component(&self, version: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let () = redis::cmd("SET")
            .arg(self.shared.keys.handler_component(version))
            .arg(bytes)
            .query_async(&mut self.shared.conn())
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn component(&self, version: &str) -> Result<Option<Vec<u8>>, StoreError> {
        redis::cmd("GET")
            .arg(self.shared.keys.handler_component(version))
            .query_async(&mut self.shared.conn())
            .await
            .map_err(backend)
    }

    async fn delete_component(&self, version: &str) -> Result<(), StoreError> {
        let _: i64 = redis::cmd("DEL")
            .arg(self.shared.keys.handler_component(version))
            .query_async(&mut self.shared.conn())
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn records(&self) -> Result<Vec<StoredRecord>, StoreError> {
        let keys = &self.shared.keys;
        let (docs, revisions): (Vec<(String, String)>, HashMap<String, String>) = redis::pipe()
            .atomic()
            .cmd("HGETALL")
            .arg(&keys.handler_records)
            .cmd("HGETALL")
            .arg(&keys.handler_revisions)
            .query_async(&mut self.shared.conn())
            .await
            .map_err(backend)?;
        let mut records = docs
            .into_iter()
            .map(|(name, doc)| {
                let text = revisions.get(&name).ok_or_else(|| {
                    StoreError::backend(NAME, format!("handler {name:?} has no revision"))
                })?;
                Ok(StoredRecord {
                    revision: revision(&name, text)?,
                    name,
                    doc,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        records.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(records)
    }

    async fn record(&self, name: &str) -> Result<Option<StoredRecord>, StoreError> {
        let keys = &self.shared.keys;
        let (doc, text): (Option<String>, Option<String>) = redis::pipe()
            .atomic()
            .cmd("HGET")
            .arg(&keys.handler_records)
            .arg(name)
            .cmd("HGET")
            .arg(&keys.handler_revisions)
            .arg(name)
            .query_async(&mut self.shared.conn())
            .await
            .map_err(backend)?;
        match (doc, text) {
            (Some(doc), Some(text)) => Ok(Some(StoredRecord {
                name: name.to_owned(),
                revision: revision(name, &text)?,
                doc,
            })),
            (None, None) => Ok(None),
            _ => Err(StoreError::backend(
                NAME,
                format!("handler {name:?} has a record or a revision but not both"),
            )),
        }
    }

    async fn write_record(
        &self,
        name: &str,
        doc: &str,
        expected: Option<u64>,
    ) -> Result<Written, StoreError> {
        let keys = &self.shared.keys;
        let written: u64 = self
            .shared
            .scripts
            .write_record
            .key(&keys.handler_records)
            .key(&keys.handler_revisions)
            .key(&keys.handler_revision)
            .arg(name)
            .arg(doc)
            .arg(expected.map(|r| r.to_string()).unwrap_or_default())
            .arg(&keys.handlers_changed)
            .invoke_async(&mut self.shared.conn())
            .await
            .map_err(backend)?;
        Ok(match written {
            0 => Written::Conflict,
            revision => Written::Done(revision),
        })
    }

    async fn delete_record(&self, name: &str, expected: u64) -> Result<bool, StoreError> {
        let keys = &self.shared.keys;
        let deleted: i64 = self
            .shared
            .scripts
            .delete_record
            .key(&keys.handler_records)
            .key(&keys.handler_revisions)
            .arg(name)
            .arg(expected.to_string())
            .arg(&keys.handlers_changed)
            .invoke_async(&mut self.shared.conn())
            .await
            .map_err(backend)?;
        Ok(deleted == 1)
    }

    async fn put_report(&self, host: &str, doc: &str, ttl: Duration) -> Result<(), StoreError> {
        let keys = &self.shared.keys;
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let () = redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(keys.handler_report(host))
            .arg(doc)
            .arg("PX")
            .arg(ttl_ms)
            .ignore()
            .cmd("SADD")
            .arg(&keys.handler_hosts)
            .arg(host)
            .ignore()
            .query_async(&mut self.shared.conn())
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn reports(&self) -> Result<Vec<(String, String)>, StoreError> {
        let keys = &self.shared.keys;
        let mut conn = self.shared.conn();
        let mut hosts: Vec<String> = redis::cmd("SMEMBERS")
            .arg(&keys.handler_hosts)
            .query_async(&mut conn)
            .await
            .map_err(backend)?;
        if hosts.is_empty() {
            return Ok(Vec::new());
        }
        hosts.sort();
        let report_keys: Vec<String> = hosts.iter().map(|h| keys.handler_report(h)).collect();
        let docs: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&report_keys)
            .query_async(&mut conn)
            .await
            .map_err(backend)?;
        let mut reports = Vec::with_capacity(hosts.len());
        let mut expired = Vec::new();
        for (host, doc) in hosts.into_iter().zip(docs) {
            match doc {
                Some(doc) => reports.push((host, doc)),
                None => expired.push(host),
            }
        }
        if !expired.is_empty() {
            // Only while the report is still missing: a host reporting again meanwhile stays.
            let mut drop = self.shared.scripts.drop_expired_hosts.prepare_invoke();
            drop.key(&keys.handler_hosts);
            for host in &expired {
                drop.key(keys.handler_report(host));
            }
            for host in &expired {
                drop.arg(host);
            }
            let _: i64 = drop.invoke_async(&mut conn).await.map_err(backend)?;
        }
        Ok(reports)
    }

    async fn changes(&self) -> Result<BoxStream<'static, ()>, StoreError> {
        let channel = &self.shared.keys.handlers_changed;
        let subscribe = async {
            let mut pubsub = self.shared.client.get_async_pubsub().await?;
            pubsub.subscribe(channel).await?;
            Ok::<_, RedisError>(pubsub)
        };
        let pubsub = tokio::time::timeout(self.shared.options.command_timeout, subscribe)
            .await
            .map_err(|_| {
                StoreError::backend(NAME, "timed out subscribing to the handler change channel")
            })?
            .map_err(backend)?;
        // Messages already queued are coalesced into one yield; the stream ends with the
        // connection or when the provider is closed.
        let feed = pubsub
            .into_on_message()
            .ready_chunks(256)
            .map(drop)
            .take_until(self.shared.shutdown.clone().cancelled_owned());
        Ok(Box::pin(feed))
    }
}
