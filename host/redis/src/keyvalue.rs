//! Handlers' key-value state on Redis ([`RedisKeyValue`]), under the provider's stream name
//! (`p`):
//!
//! - `p:kv:{namespace id}` (hash): one per namespace, key → value bytes; its `HLEN` is the
//!   namespace's key count;
//! - `p:kv-usage` (hash): namespace id → the bytes the namespace holds (keys' and values'
//!   lengths), dropped with the namespace's last key.
//!
//! Consistency: each write is one Lua script that runs atomically on the server (reads are
//! one command, or one `MULTI`/`EXEC`), so quotas are exact across hosts (the check, the
//! write and the usage update are one step) and a host dying mid-operation leaves nothing
//! half-done. `increment` is Redis's `HINCRBY` inside the script, so concurrent increments
//! from any host are never lost. Counters are signed 64-bit: an increment by more than
//! 2^63 − 1 or past 2^63 − 1, or of a value that is not plain decimal digits below 2^63 (a
//! sign or leading zeros make it not a number), fails with [`KvError::NotANumber`] and
//! changes nothing. Listing (`HSCAN`) returns every key present throughout exactly once,
//! unless keys are deleted during the listing: Redis may then shrink the hash and return
//! some keys twice. Durability is the server's, as for events: a write acknowledged just
//! before a crash or failover may be lost as its persistence and replication allow.

use std::sync::Arc;

use async_trait::async_trait;
use redis::RedisError;

use eventbroker::keyvalue::{KeyPage, KeyValueStore, KvError, Namespace, Quota, Usage};

use super::{NAME, Shared};

/// Hash fields `HSCAN` is asked to examine per page (a hash small enough to be stored as a
/// listpack comes back whole).
const PAGE: usize = 1000;

/// A Redis failure as a key-value error.
fn backend(error: RedisError) -> KvError {
    KvError::backend(NAME, error)
}

/// The refusal of a write of `key` under `quota`, from the `QUOTA keys bytes old new` detail
/// of a script's error reply; the message is the one [`Usage::admit`] gives.
fn quota_exceeded(key: &str, detail: Option<&str>, quota: &Quota) -> KvError {
    admit_refusal(key, detail.unwrap_or_default(), quota).unwrap_or_else(|| {
        KvError::QuotaExceeded(format!(
            "writing key {key:?} would pass the bucket's quota ({} keys, {} bytes)",
            quota.max_keys, quota.max_bytes
        ))
    })
}

/// What [`Usage::admit`] says of the write that `detail` (`keys bytes old new`, `old` -1 for
/// an absent key) describes; `None` when the detail is garbled or the write fits.
fn admit_refusal(key: &str, detail: &str, quota: &Quota) -> Option<KvError> {
    let numbers: Vec<i64> = detail
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    let [keys, bytes, old, new] = numbers[..] else {
        return None;
    };
    let usage = Usage {
        keys: u64::try_from(keys).ok()?,
        bytes: u64::try_from(bytes).ok()?,
    };
    let new = usize::try_from(new).ok()?;
    usage
        .admit(key, usize::try_from(old).ok(), new, quota)
        .err()
}

/// Why incrementing `key` by `delta` was refused, from the detail of a `NOTANUMBER` reply.
fn not_a_number(key: &str, delta: u64, detail: Option<&str>) -> KvError {
    KvError::NotANumber(match detail.map(str::trim) {
        Some("overflow") => format!(
            "incrementing key {key:?} by {delta} passes 2^63 - 1, the largest integer Redis \
             stores"
        ),
        _ => format!(
            "the value of key {key:?} is not a decimal number Redis can increment (digits only, \
             below 2^63)"
        ),
    })
}

/// Maps the error replies of the key-value scripts about `key` (`delta`: that of an
/// increment) to key-value errors.
fn script_error(error: RedisError, key: &str, quota: &Quota, delta: u64) -> KvError {
    match error.code() {
        Some("QUOTA") => quota_exceeded(key, error.detail(), quota),
        Some("NOTANUMBER") => not_a_number(key, delta, error.detail()),
        _ => backend(error),
    }
}

/// The delta of an increment as Redis takes it (a signed 64-bit integer).
fn redis_delta(key: &str, delta: u64) -> Result<i64, KvError> {
    i64::try_from(delta).map_err(|_| {
        KvError::NotANumber(format!(
            "incrementing key {key:?} by {delta}: Redis increments by at most 2^63 - 1"
        ))
    })
}

/// The key-value store of a [`crate::RedisProvider`], on the provider's connection manager
/// and key prefix. Safe to use from several hosts at once: every write is one Lua script
/// that checks the namespace's quota, writes and updates its usage (see the module docs for
/// the consistency this gives).
pub struct RedisKeyValue {
    shared: Arc<Shared>,
}

impl RedisKeyValue {
    /// The store on `shared`'s connections and keys.
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        RedisKeyValue { shared }
    }

    /// The hash of namespace `ns`.
    fn hash(&self, ns: &Namespace) -> String {
        self.shared.keys.kv(ns.id())
    }
}

#[async_trait]
impl KeyValueStore for RedisKeyValue {
    fn backend(&self) -> &'static str {
        NAME
    }

    async fn get(&self, ns: &Namespace, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        redis::cmd("HGET")
            .arg(self.hash(ns))
            .arg(key)
            .query_async(&mut self.shared.conn())
            .await
            .map_err(backend)
    }

    async fn set(
        &self,
        ns: &Namespace,
        key: &str,
        value: &[u8],
        quota: &Quota,
    ) -> Result<(), KvError> {
        let _: i64 = self
            .shared
            .scripts
            .kv_set
            .key(self.hash(ns))
            .key(&self.shared.keys.kv_usage)
            .arg(ns.id())
            .arg(key)
            .arg(value)
            .arg(quota.max_keys)
            .arg(quota.max_bytes)
            .invoke_async(&mut self.shared.conn())
            .await
            .map_err(|e| script_error(e, key, quota, 0))?;
        Ok(())
    }

    async fn delete(&self, ns: &Namespace, key: &str) -> Result<(), KvError> {
        let _: i64 = self
            .shared
            .scripts
            .kv_delete
            .key(self.hash(ns))
            .key(&self.shared.keys.kv_usage)
            .arg(ns.id())
            .arg(key)
            .invoke_async(&mut self.shared.conn())
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn exists(&self, ns: &Namespace, key: &str) -> Result<bool, KvError> {
        redis::cmd("HEXISTS")
            .arg(self.hash(ns))
            .arg(key)
            .query_async(&mut self.shared.conn())
            .await
            .map_err(backend)
    }

    async fn list_keys(&self, ns: &Namespace, cursor: Option<u64>) -> Result<KeyPage, KvError> {
        let (next, keys): (String, Vec<String>) = self
            .shared
            .scripts
            .kv_list
            .key(self.hash(ns))
            .arg(cursor.unwrap_or(0))
            .arg(PAGE)
            .invoke_async(&mut self.shared.conn())
            .await
            .map_err(backend)?;
        let next: u64 = next.parse().map_err(|_| {
            KvError::backend(NAME, format!("HSCAN returned an invalid cursor {next:?}"))
        })?;
        Ok(KeyPage {
            keys,
            cursor: (next != 0).then_some(next),
        })
    }

    async fn increment(
        &self,
        ns: &Namespace,
        key: &str,
        delta: u64,
        quota: &Quota,
    ) -> Result<u64, KvError> {
        let value: String = self
            .shared
            .scripts
            .kv_increment
            .key(self.hash(ns))
            .key(&self.shared.keys.kv_usage)
            .arg(ns.id())
            .arg(key)
            .arg(redis_delta(key, delta)?)
            .arg(quota.max_keys)
            .arg(quota.max_bytes)
            .invoke_async(&mut self.shared.conn())
            .await
            .map_err(|e| script_error(e, key, quota, delta))?;
        value.parse().map_err(|_| {
            KvError::backend(
                NAME,
                format!("incrementing key {key:?} left the value {value:?}"),
            )
        })
    }

    async fn usage(&self, ns: &Namespace) -> Result<Usage, KvError> {
        let (keys, bytes): (u64, Option<u64>) = redis::pipe()
            .atomic()
            .cmd("HLEN")
            .arg(self.hash(ns))
            .cmd("HGET")
            .arg(&self.shared.keys.kv_usage)
            .arg(ns.id())
            .query_async(&mut self.shared.conn())
            .await
            .map_err(backend)?;
        Ok(Usage {
            keys,
            bytes: bytes.unwrap_or(0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIGHT: Quota = Quota {
        max_keys: 1,
        max_bytes: 10,
    };

    #[test]
    fn quota_refusals_carry_the_core_message() {
        let refused = quota_exceeded("c", Some("1 10 -1 0"), &TIGHT);
        assert!(
            matches!(&refused, KvError::QuotaExceeded(m) if m.contains("max_keys")),
            "{refused:?}"
        );
        let refused = quota_exceeded("ab", Some("1 10 8 9"), &TIGHT);
        assert!(
            matches!(&refused, KvError::QuotaExceeded(m) if m.contains("max_bytes")),
            "{refused:?}"
        );
        assert!(matches!(
            quota_exceeded("ab", Some("garbled"), &TIGHT),
            KvError::QuotaExceeded(_)
        ));
    }

    #[test]
    fn deltas_and_results_are_limited_to_signed_64_bit() {
        assert_eq!(redis_delta("n", 5).expect("fits"), 5);
        assert!(redis_delta("n", i64::MAX as u64).is_ok());
        assert!(matches!(
            redis_delta("n", i64::MAX as u64 + 1),
            Err(KvError::NotANumber(_))
        ));
        assert!(matches!(
            not_a_number("n", 1, Some("overflow")),
            KvError::NotANumber(m) if m.contains("2^63 - 1")
        ));
        assert!(matches!(
            not_a_number("n", 1, Some("text")),
            KvError::NotANumber(m) if m.contains("not a decimal number")
        ));
    }
}
