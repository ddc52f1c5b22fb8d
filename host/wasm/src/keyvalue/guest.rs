//! What a guest's `wasi:keyvalue` calls do: the checks of the grant, budget and sizes, the
//! call to the store within the invocation's deadline, metrics, and the error the guest sees.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use wasmtime::component::Resource;

use super::KeyValueBinding;
use super::bindings::{atomics, batch, store};
use super::grant::KeyValueGrant;
use crate::log::LogSink;
use crate::state::HostState;
use eventbroker::KeyValueStore;
use eventbroker::keyvalue::{self, KeyPage, KvError, Namespace, Quota};
use eventbroker::metrics::Metrics;

/// A bucket a guest opened: the namespace its operations go to.
pub struct OpenBucket {
    ns: Namespace,
}

/// The key-value state of one guest store: its grant, the host's store, and the current
/// invocation's operation count and deadline.
pub(crate) struct KvAccess {
    grant: Option<Arc<KeyValueGrant>>,
    binding: Option<KeyValueBinding>,
    handler: String,
    log: Arc<Mutex<LogSink>>,
    metrics: Option<Arc<Metrics>>,
    operations: u32,
    deadline: Option<Instant>,
}

/// A refusal or failure, as the guest sees it.
type GuestResult<T> = Result<T, store::Error>;

impl KvAccess {
    /// Key-value access of `handler` under `grant` (none: nothing may be opened).
    pub(crate) fn new(
        grant: Option<Arc<KeyValueGrant>>,
        binding: Option<KeyValueBinding>,
        handler: String,
        log: Arc<Mutex<LogSink>>,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        KvAccess {
            grant,
            binding,
            handler,
            log,
            metrics,
            operations: 0,
            deadline: None,
        }
    }

    /// Starts an invocation that must end by `deadline`: the operation budget starts afresh.
    pub(crate) fn begin(&mut self, deadline: Instant) {
        self.operations = 0;
        self.deadline = Some(deadline);
    }

    fn say(&self, message: String) {
        crate::log::host_warning(&self.log, &self.handler, message);
    }

    fn count(&self, op: &'static str, result: &'static str, started: Instant) {
        if let Some(metrics) = &self.metrics {
            metrics.handler_kv_operation(&self.handler, op, result, started.elapsed());
        }
    }

    /// Refuses `op` with `reason`, in the log and to the guest.
    fn refuse<T>(&self, op: &'static str, error: store::Error, reason: String) -> GuestResult<T> {
        self.say(format!("key-value {op} refused: {reason}"));
        self.count(op, "refused", Instant::now());
        Err(error)
    }

    /// Opens `bucket` when the grant lists it.
    fn open(&self, bucket: &str) -> GuestResult<OpenBucket> {
        let Some(grant) = &self.grant else {
            return self.refuse(
                "open",
                store::Error::AccessDenied,
                "the manifest has no [keyvalue] section".into(),
            );
        };
        if !grant.grants(bucket) {
            return self.refuse(
                "open",
                store::Error::AccessDenied,
                format!(
                    "bucket {bucket:?} is not granted; the manifest's [keyvalue] buckets are: {}",
                    grant.buckets.join(", ")
                ),
            );
        }
        let Some(binding) = &self.binding else {
            return self.refuse(
                "open",
                store::Error::Other("this host has no key-value store".into()),
                "this host has no key-value store".into(),
            );
        };
        self.count("open", "ok", Instant::now());
        Ok(OpenBucket {
            ns: Namespace::new(&binding.scope, &self.handler, bucket),
        })
    }

    /// Takes `cost` operations from the budget and checks `keys` and `value`; the store, quota
    /// and time left when allowed.
    fn admit(
        &mut self,
        op: &'static str,
        cost: u32,
        keys: &[&str],
        value: Option<&[u8]>,
    ) -> GuestResult<(Arc<dyn KeyValueStore>, Quota, std::time::Duration)> {
        let (Some(grant), Some(binding)) = (&self.grant, &self.binding) else {
            return self.refuse(
                op,
                store::Error::AccessDenied,
                "no key-value grant or store".into(),
            );
        };
        let (max_operations, quota, backend) =
            (grant.max_operations, grant.quota(), binding.store.clone());
        self.operations = self.operations.saturating_add(cost);
        if self.operations > max_operations {
            let reason = format!(
                "the key-value operation budget of this invocation is used up ({max_operations} operations, keyvalue.max_operations)"
            );
            return self.refuse(op, store::Error::Other(reason.clone()), reason);
        }
        let checked = keys
            .iter()
            .try_for_each(|key| keyvalue::check_key(key))
            .and_then(|()| value.map_or(Ok(()), keyvalue::check_value));
        if let Err(error) = checked {
            return self.refuse(
                op,
                store::Error::Other(error.to_string()),
                error.to_string(),
            );
        }
        let left = self
            .deadline
            .map(|deadline| deadline.saturating_duration_since(Instant::now()))
            .unwrap_or(std::time::Duration::MAX);
        Ok((backend, quota, left))
    }

    /// Ends `op`: counts it and turns a store error into the guest's error (refusals by the
    /// quota also go to the log).
    fn finish<T>(
        &self,
        op: &'static str,
        started: Instant,
        result: Result<Result<T, KvError>, tokio::time::error::Elapsed>,
    ) -> GuestResult<T> {
        let result = result.unwrap_or_else(|_| {
            Err(KvError::backend(
                "host",
                "the invocation's deadline passed while waiting for the key-value store",
            ))
        });
        match result {
            Ok(value) => {
                self.count(op, "ok", started);
                Ok(value)
            }
            Err(error) => {
                let label = match error {
                    KvError::QuotaExceeded(_) => "quota",
                    KvError::Backend { .. } => "error",
                    _ => "refused",
                };
                self.count(op, label, started);
                if !matches!(error, KvError::Backend { .. }) {
                    self.say(format!("key-value {op} refused: {error}"));
                } else {
                    tracing::warn!(handler = %self.handler, %error, "key-value {op} failed");
                }
                Err(store::Error::Other(error.to_string()))
            }
        }
    }
}

impl HostState {
    fn bucket_ns(&mut self, bucket: &Resource<OpenBucket>) -> wasmtime::Result<Namespace> {
        Ok(self.kv_parts().0.get(bucket)?.ns.clone())
    }
}

/// Runs one store call under the checks of [`KvAccess::admit`] and [`KvAccess::finish`].
macro_rules! kv_call {
    ($state:ident, $op:literal, $cost:expr, $keys:expr, $value:expr, |$store:ident, $quota:ident| $call:expr) => {{
        let ($store, $quota, left) = match $state.kv_parts().1.admit($op, $cost, $keys, $value) {
            Ok(admitted) => admitted,
            Err(error) => return Ok(Err(error)),
        };
        let started = Instant::now();
        let result = tokio::time::timeout(left, $call).await;
        Ok($state.kv_parts().1.finish($op, started, result))
    }};
}

impl store::Host for HostState {
    async fn open(
        &mut self,
        identifier: String,
    ) -> wasmtime::Result<GuestResult<Resource<OpenBucket>>> {
        self.charge(identifier.len())?;
        let opened = self.kv_parts().1.open(&identifier);
        match opened {
            Ok(bucket) => Ok(Ok(self.kv_parts().0.push(bucket)?)),
            Err(error) => Ok(Err(error)),
        }
    }
}

impl store::HostBucket for HostState {
    async fn get(
        &mut self,
        bucket: Resource<OpenBucket>,
        key: String,
    ) -> wasmtime::Result<GuestResult<Option<Vec<u8>>>> {
        self.charge(key.len())?;
        let ns = self.bucket_ns(&bucket)?;
        let found = kv_call!(self, "get", 1, &[&key], None, |store, _quota| store
            .get(&ns, &key));
        if let Ok(Ok(Some(value))) = &found {
            self.charge(value.len())?;
        }
        found
    }

    async fn set(
        &mut self,
        bucket: Resource<OpenBucket>,
        key: String,
        value: Vec<u8>,
    ) -> wasmtime::Result<GuestResult<()>> {
        self.charge(key.len() + value.len())?;
        let ns = self.bucket_ns(&bucket)?;
        kv_call!(self, "set", 1, &[&key], Some(&value), |store, quota| store
            .set(&ns, &key, &value, &quota))
    }

    async fn delete(
        &mut self,
        bucket: Resource<OpenBucket>,
        key: String,
    ) -> wasmtime::Result<GuestResult<()>> {
        self.charge(key.len())?;
        let ns = self.bucket_ns(&bucket)?;
        kv_call!(self, "delete", 1, &[&key], None, |store, _quota| store
            .delete(&ns, &key))
    }

    async fn exists(
        &mut self,
        bucket: Resource<OpenBucket>,
        key: String,
    ) -> wasmtime::Result<GuestResult<bool>> {
        self.charge(key.len())?;
        let ns = self.bucket_ns(&bucket)?;
        kv_call!(self, "exists", 1, &[&key], None, |store, _quota| store
            .exists(&ns, &key))
    }

    async fn list_keys(
        &mut self,
        bucket: Resource<OpenBucket>,
        cursor: Option<u64>,
    ) -> wasmtime::Result<GuestResult<store::KeyResponse>> {
        let ns = self.bucket_ns(&bucket)?;
        let page: wasmtime::Result<GuestResult<KeyPage>> =
            kv_call!(self, "list_keys", 1, &[], None, |store, _quota| store
                .list_keys(&ns, cursor));
        match page? {
            Ok(page) => {
                self.charge(page.keys.iter().map(String::len).sum())?;
                Ok(Ok(store::KeyResponse {
                    keys: page.keys,
                    cursor: page.cursor,
                }))
            }
            Err(error) => Ok(Err(error)),
        }
    }

    async fn drop(&mut self, bucket: Resource<OpenBucket>) -> wasmtime::Result<()> {
        self.kv_parts().0.delete(bucket)?;
        Ok(())
    }
}

impl atomics::Host for HostState {
    async fn increment(
        &mut self,
        bucket: Resource<OpenBucket>,
        key: String,
        delta: u64,
    ) -> wasmtime::Result<GuestResult<u64>> {
        self.charge(key.len())?;
        let ns = self.bucket_ns(&bucket)?;
        kv_call!(self, "increment", 1, &[&key], None, |store, quota| store
            .increment(&ns, &key, delta, &quota))
    }
}

impl batch::Host for HostState {
    async fn get_many(
        &mut self,
        bucket: Resource<OpenBucket>,
        keys: Vec<String>,
    ) -> wasmtime::Result<GuestResult<Vec<Option<(String, Vec<u8>)>>>> {
        self.charge(keys.iter().map(String::len).sum())?;
        let ns = self.bucket_ns(&bucket)?;
        let cost = u32::try_from(keys.len()).unwrap_or(u32::MAX);
        let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let found = kv_call!(self, "get", cost, &key_refs, None, |store, _quota| async {
            let mut found = Vec::with_capacity(keys.len());
            for key in &keys {
                found.push(store.get(&ns, key).await?.map(|value| (key.clone(), value)));
            }
            Ok(found)
        });
        if let Ok(Ok(values)) = &found {
            self.charge(values.iter().flatten().map(|(_, v)| v.len()).sum())?;
        }
        found
    }

    async fn set_many(
        &mut self,
        bucket: Resource<OpenBucket>,
        key_values: Vec<(String, Vec<u8>)>,
    ) -> wasmtime::Result<GuestResult<()>> {
        self.charge(key_values.iter().map(|(k, v)| k.len() + v.len()).sum())?;
        let ns = self.bucket_ns(&bucket)?;
        let cost = u32::try_from(key_values.len()).unwrap_or(u32::MAX);
        let key_refs: Vec<&str> = key_values.iter().map(|(k, _)| k.as_str()).collect();
        if let Some(error) = key_values
            .iter()
            .find_map(|(_, value)| keyvalue::check_value(value).err())
        {
            let reason = error.to_string();
            return Ok(self.kv_parts().1.refuse(
                "set",
                store::Error::Other(reason.clone()),
                reason,
            ));
        }
        kv_call!(self, "set", cost, &key_refs, None, |store, quota| async {
            for (key, value) in &key_values {
                store.set(&ns, key, value, &quota).await?;
            }
            Ok(())
        })
    }

    async fn delete_many(
        &mut self,
        bucket: Resource<OpenBucket>,
        keys: Vec<String>,
    ) -> wasmtime::Result<GuestResult<()>> {
        self.charge(keys.iter().map(String::len).sum())?;
        let ns = self.bucket_ns(&bucket)?;
        let cost = u32::try_from(keys.len()).unwrap_or(u32::MAX);
        let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        kv_call!(
            self,
            "delete",
            cost,
            &key_refs,
            None,
            |store, _quota| async {
                for key in &keys {
                    store.delete(&ns, key).await?;
                }
                Ok(())
            }
        )
    }
}
