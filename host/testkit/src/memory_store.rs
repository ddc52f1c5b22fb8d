//! A cluster handler store in memory ([`MemoryHandlerStore`]), shared by the hosts of one test
//! process: the registry's cluster logic tested without a backend server.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use eventbroker::handler_store::{HandlerStore, StoreError, StoredRecord, Written};
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::broadcast;

#[derive(Default)]
struct State {
    components: BTreeMap<String, Vec<u8>>,
    records: BTreeMap<String, (u64, String)>,
    reports: BTreeMap<String, (String, Instant)>,
    revision: u64,
}

/// A [`HandlerStore`] in memory. Clones share the store (hosts of one cluster).
#[derive(Clone)]
pub struct MemoryHandlerStore {
    state: Arc<Mutex<State>>,
    changes: broadcast::Sender<()>,
}

impl Default for MemoryHandlerStore {
    fn default() -> Self {
        MemoryHandlerStore {
            state: Arc::default(),
            changes: broadcast::channel(64).0,
        }
    }
}

impl MemoryHandlerStore {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many components it holds.
    pub fn component_count(&self) -> usize {
        self.state().components.len()
    }
}

#[async_trait]
impl HandlerStore for MemoryHandlerStore {
    fn backend(&self) -> &'static str {
        "test-memory"
    }

    async fn put_component(&self, version: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.state()
            .components
            .insert(version.to_owned(), bytes.to_vec());
        Ok(())
    }

    async fn component(&self, version: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.state().components.get(version).cloned())
    }

    async fn delete_component(&self, version: &str) -> Result<(), StoreError> {
        self.state().components.remove(version);
        Ok(())
    }

    async fn records(&self) -> Result<Vec<StoredRecord>, StoreError> {
        Ok(self
            .state()
            .records
            .iter()
            .map(|(name, (revision, doc))| StoredRecord {
                name: name.clone(),
                revision: *revision,
                doc: doc.clone(),
            })
            .collect())
    }

    async fn record(&self, name: &str) -> Result<Option<StoredRecord>, StoreError> {
        Ok(self
            .state()
            .records
            .get(name)
            .map(|(revision, doc)| StoredRecord {
                name: name.to_owned(),
                revision: *revision,
                doc: doc.clone(),
            }))
    }

    async fn write_record(
        &self,
        name: &str,
        doc: &str,
        expected: Option<u64>,
    ) -> Result<Written, StoreError> {
        let written = {
            let mut state = self.state();
            let current = state.records.get(name).map(|(r, _)| *r);
            if current != expected {
                return Ok(Written::Conflict);
            }
            state.revision += 1;
            let revision = state.revision;
            state
                .records
                .insert(name.to_owned(), (revision, doc.to_owned()));
            revision
        };
        let _ = self.changes.send(());
        Ok(Written::Done(written))
    }

    async fn delete_record(&self, name: &str, expected: u64) -> Result<bool, StoreError> {
        let deleted = {
            let mut state = self.state();
            if state.records.get(name).map(|(r, _)| *r) == Some(expected) {
                state.records.remove(name);
                state.revision += 1;
                true
            } else {
                false
            }
        };
        if deleted {
            let _ = self.changes.send(());
        }
        Ok(deleted)
    }

    async fn put_report(&self, host: &str, doc: &str, ttl: Duration) -> Result<(), StoreError> {
        self.state()
            .reports
            .insert(host.to_owned(), (doc.to_owned(), Instant::now() + ttl));
        Ok(())
    }

    async fn reports(&self) -> Result<Vec<(String, String)>, StoreError> {
        let now = Instant::now();
        let mut state = self.state();
        state.reports.retain(|_, (_, expires)| *expires > now);
        Ok(state
            .reports
            .iter()
            .map(|(host, (doc, _))| (host.clone(), doc.clone()))
            .collect())
    }

    async fn changes(&self) -> Result<BoxStream<'static, ()>, StoreError> {
        let receiver = self.changes.subscribe();
        Ok(tokio_stream::wrappers::BroadcastStream::new(receiver)
            .map(|_| ())
            .boxed())
    }
}
