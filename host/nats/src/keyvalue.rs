//! Handlers' key-value state on NATS JetStream ([`NatsKeyValue`]), shared by every host
//! connected to the same server: one key-value bucket, `{stream_name}_HANDLER_KV` (history 1, no
//! `max_age`, the provider's `storage`, one replica), created (or its settings updated) on
//! first use and deleted by [`crate::NatsProvider::destroy`].
//!
//! Layout: NATS keys allow only `[-/_=.a-zA-Z0-9]`, so the namespace id and the key are
//! hex-encoded: an entry is `{hex(namespace id)}.{hex(key)}`, and a namespace's usage (keys and
//! bytes, as the quota counts them, JSON) is `{hex(namespace id)}_usage` (hex has no `_`, an
//! entry always has a `.`, so the two never collide).
//!
//! Consistency:
//! - Reads (`get`, `exists`) see the latest acknowledged write of the key: the bucket has one
//!   replica, read from the server that writes it. A deleted key (its delete marker) reads as
//!   absent.
//! - Every write is a compare-and-set on the entry's revision (the server checks the key's
//!   last sequence), retried on conflict: writes to one key are serialized, and `increment` is
//!   atomic across hosts — no increment is lost and each returns a distinct value.
//! - Quota: the usage record is changed only by compare-and-set. A write that grows the
//!   namespace first reserves the growth in the usage record (refused there if it would pass
//!   the quota), then writes the entry; if the entry changed meanwhile, the reservation is
//!   given back and the write retried. Bytes freed by a write or a delete are given back after
//!   it. So concurrent writers on any number of hosts never take a namespace past its quota,
//!   and the usage is never under-counted. It can be over-counted, never under: a host that
//!   dies (or loses the server, or whose request times out with an unknown outcome) between a
//!   reservation and its write, or between a write that frees bytes and giving them back,
//!   leaves the usage higher than what the entries hold, for good (nothing recounts it); such a
//!   namespace is refused growth earlier than its quota says. A reservation in flight can also
//!   make a concurrent write be refused even though the reserving write then loses its race
//!   and gives the room back.
//! - `list_keys` is not a snapshot: each page scans the namespace's current keys (the last
//!   entry per key, through one ephemeral consumer), sorts them and returns the 1000 from the
//!   cursor's offset on. Paging through an unchanging namespace returns every key exactly once;
//!   keys added or deleted during the paging can shift the offsets, so a key sorting after them
//!   may be skipped or repeated. Each page costs a scan of the whole namespace.
//! - A write contended beyond [`MAX_ATTEMPTS`] compare-and-set attempts fails with a backend
//!   error, having written nothing.
//! - Entries never expire; a deleted key leaves a delete marker (a small message) in the
//!   bucket.

use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::kv::{self, Operation, UpdateErrorKind};
use async_nats::jetstream::stream::StorageType;
use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::OnceCell;

use crate::NAME;
use crate::config::NatsConfig;
use crate::scan::Scan;
use eventbroker::keyvalue::{
    KeyPage, KeyValueStore, KvError, Namespace, Quota, Usage, incremented,
};

/// Compare-and-set attempts of one operation before it gives up under contention.
pub const MAX_ATTEMPTS: u32 = 200;
/// Keys per page of [`KeyValueStore::list_keys`].
pub const PAGE: usize = 1000;
/// What follows the hex-encoded namespace id in the key of its usage record.
const USAGE_SUFFIX: &str = "_usage";
/// The longest pause between two attempts of a contended compare-and-set, in milliseconds.
const MAX_BACKOFF_MS: u64 = 8;

fn failure(error: impl std::fmt::Display) -> KvError {
    KvError::backend(NAME, error)
}

/// Handlers' key-value state on the provider's JetStream connection (obtained through
/// [`eventbroker::Provider::keyvalue`]); see the [module](self) for its consistency. Opening
/// the bucket is retried by the next call when it fails.
pub struct NatsKeyValue {
    context: jetstream::Context,
    storage: StorageType,
    bucket: String,
    kv: OnceCell<kv::Store>,
}

/// A key's latest entry as read before a compare-and-set.
struct Current {
    /// The value; `None` when absent (never written, or a delete marker).
    value: Option<Bytes>,
    /// The revision a compare-and-set expects: the latest entry's (a marker's included), 0
    /// when the key has none.
    revision: u64,
}

/// Keys and bytes added to or taken from a namespace's usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Change {
    keys: u64,
    bytes: u64,
}

impl Change {
    /// What replacing the value of a `key_len`-byte key (now `old` bytes long, or absent) by
    /// one of `new` bytes adds (`.0`) and frees (`.1`).
    fn of_write(key_len: usize, old: Option<usize>, new: usize) -> (Change, Change) {
        let new_bytes = (key_len + new) as u64;
        let old_bytes = old.map_or(0, |old| (key_len + old) as u64);
        let grow = Change {
            keys: u64::from(old.is_none()),
            bytes: new_bytes.saturating_sub(old_bytes),
        };
        let shrink = Change {
            keys: 0,
            bytes: old_bytes.saturating_sub(new_bytes),
        };
        (grow, shrink)
    }

    /// What deleting a `key_len`-byte key whose value is `old` bytes long frees.
    fn of_delete(key_len: usize, old: usize) -> Change {
        Change {
            keys: 1,
            bytes: (key_len + old) as u64,
        }
    }

    fn is_zero(self) -> bool {
        self == Change::default()
    }

    fn added_to(self, usage: Usage) -> Usage {
        Usage {
            keys: usage.keys.saturating_add(self.keys),
            bytes: usage.bytes.saturating_add(self.bytes),
        }
    }

    fn taken_from(self, usage: Usage) -> Usage {
        Usage {
            keys: usage.keys.saturating_sub(self.keys),
            bytes: usage.bytes.saturating_sub(self.bytes),
        }
    }
}

/// A namespace's usage as stored in its usage record.
#[derive(serde::Serialize, serde::Deserialize)]
struct UsageRecord {
    keys: u64,
    bytes: u64,
}

/// Outcome of a compare-and-set.
enum Cas {
    Done,
    /// The entry changed since it was read; nothing was written.
    Conflict,
}

/// The bucket key of `key` in `ns`.
fn entry_key(ns: &Namespace, key: &str) -> String {
    format!("{}.{}", hex::encode(ns.id()), hex::encode(key))
}

/// The bucket key of the usage record of `ns`.
fn usage_key(ns: &Namespace) -> String {
    format!("{}{USAGE_SUFFIX}", hex::encode(ns.id()))
}

/// The key that `bucket_key` (an entry key of `ns`, without the bucket's subject prefix)
/// encodes.
fn decode_key(ns_prefix: &str, bucket_key: &str) -> Result<String, KvError> {
    let undecodable = || {
        failure(format!(
            "the bucket holds an undecodable key {bucket_key:?}"
        ))
    };
    let encoded = bucket_key.strip_prefix(ns_prefix).ok_or_else(undecodable)?;
    let bytes = hex::decode(encoded).map_err(|_| undecodable())?;
    String::from_utf8(bytes).map_err(|_| undecodable())
}

/// Waits a little, randomly, before retrying a contended compare-and-set (not before the first
/// attempt), so that racing writers spread out.
async fn pause(attempt: u32) {
    if attempt == 0 {
        return;
    }
    let ceiling = u64::from(attempt).min(MAX_BACKOFF_MS) * 1000;
    let micros = RandomState::new().hash_one(attempt) % (ceiling + 1);
    tokio::time::sleep(Duration::from_micros(micros)).await;
}

fn contended(what: &str) -> KvError {
    failure(format!(
        "{what}: still contended after {MAX_ATTEMPTS} compare-and-set attempts"
    ))
}

impl NatsKeyValue {
    /// A store on `context` in the bucket `config` names (storage as `storage`). Nothing is
    /// sent to the server before the first call.
    pub(crate) fn new(
        context: jetstream::Context,
        config: &NatsConfig,
        storage: StorageType,
    ) -> Self {
        NatsKeyValue {
            context,
            storage,
            bucket: config.keyvalue_bucket(),
            kv: OnceCell::new(),
        }
    }

    /// Deletes the bucket with everything in it (tear-down); a missing bucket is fine.
    ///
    /// # Errors
    /// Backend failures.
    pub(crate) async fn destroy(&self) -> Result<(), KvError> {
        crate::buckets::delete_stream(&self.context, &format!("KV_{}", self.bucket))
            .await
            .map_err(failure)
    }

    async fn kv(&self) -> Result<&kv::Store, KvError> {
        self.kv.get_or_try_init(|| self.open()).await
    }

    /// Creates the bucket (entries never expire), or updates its settings when it exists
    /// ([`crate::buckets::open_kv`]).
    async fn open(&self) -> Result<kv::Store, KvError> {
        crate::buckets::open_kv(
            &self.context,
            &self.bucket,
            "eventbroker: handlers' key-value state",
            self.storage,
            Duration::ZERO,
        )
        .await
        .map_err(failure)
    }

    /// Writes `key` with the value `compute` makes of its current one (checked against
    /// `quota`, see the module's consistency notes), retrying on conflict; returns what
    /// `compute` returned with the value written.
    async fn write<T>(
        &self,
        ns: &Namespace,
        key: &str,
        quota: &Quota,
        compute: impl Fn(Option<&[u8]>) -> Result<(Bytes, T), KvError>,
    ) -> Result<T, KvError> {
        let kv = self.kv().await?;
        let entry = entry_key(ns, key);
        let usage = usage_key(ns);
        for attempt in 0..MAX_ATTEMPTS {
            pause(attempt).await;
            let current = read_entry(kv, &entry).await?;
            let (value, result) = compute(current.value.as_deref())?;
            let old = current.value.as_ref().map(Bytes::len);
            let new = value.len();
            let (grow, shrink) = Change::of_write(key.len(), old, new);
            if !grow.is_zero() {
                let admit =
                    |now: Usage| now.admit(key, old, new, quota).map(|_| grow.added_to(now));
                change_usage(kv, &usage, admit).await?;
            }
            match put_entry(kv, &entry, value, current.revision).await? {
                Cas::Done => {
                    give_back(kv, &usage, shrink).await;
                    return Ok(result);
                }
                Cas::Conflict if grow.is_zero() => {}
                Cas::Conflict => change_usage(kv, &usage, |now| Ok(grow.taken_from(now))).await?,
            }
        }
        Err(contended(&format!("writing key {key:?}")))
    }
}

/// The latest entry of `key`.
async fn read_entry(kv: &kv::Store, key: &str) -> Result<Current, KvError> {
    let entry = kv
        .entry(key)
        .await
        .map_err(|e| failure(format!("cannot read key {key:?}: {e}")))?;
    Ok(match entry {
        Some(entry) if entry.operation == Operation::Put => Current {
            value: Some(entry.value),
            revision: entry.revision,
        },
        Some(marker) => Current {
            value: None,
            revision: marker.revision,
        },
        None => Current {
            value: None,
            revision: 0,
        },
    })
}

/// Writes `value` to `key` if its latest entry is still at `revision` (0: it has none).
async fn put_entry(kv: &kv::Store, key: &str, value: Bytes, revision: u64) -> Result<Cas, KvError> {
    match kv.update(key, value, revision).await {
        Ok(_) => Ok(Cas::Done),
        Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => Ok(Cas::Conflict),
        Err(e) => Err(failure(format!("cannot write key {key:?}: {e}"))),
    }
}

/// The usage stored at `key`, with the revision a compare-and-set expects (0: none stored).
async fn read_usage(kv: &kv::Store, key: &str) -> Result<(Usage, u64), KvError> {
    let current = read_entry(kv, key).await?;
    let usage = match &current.value {
        None => Usage::default(),
        Some(value) => {
            let record: UsageRecord = serde_json::from_slice(value)
                .map_err(|e| failure(format!("the usage record {key:?} is unreadable: {e}")))?;
            Usage {
                keys: record.keys,
                bytes: record.bytes,
            }
        }
    };
    Ok((usage, current.revision))
}

/// Replaces the usage stored at `key` by what `next` makes of it, by compare-and-set, re-read
/// and retried on conflict. Only a conflict is retried: after a failure whose outcome is
/// unknown (a timeout), applying the change again could count it twice.
async fn change_usage(
    kv: &kv::Store,
    key: &str,
    next: impl Fn(Usage) -> Result<Usage, KvError>,
) -> Result<(), KvError> {
    for attempt in 0..MAX_ATTEMPTS {
        pause(attempt).await;
        let (now, revision) = read_usage(kv, key).await?;
        let after = next(now)?;
        let record = UsageRecord {
            keys: after.keys,
            bytes: after.bytes,
        };
        let value = serde_json::to_vec(&record)
            .map_err(|e| failure(format!("cannot encode the usage record {key:?}: {e}")))?;
        if let Cas::Done = put_entry(kv, key, value.into(), revision).await? {
            return Ok(());
        }
    }
    Err(contended(&format!("updating the usage record {key:?}")))
}

/// Takes `freed` from the usage stored at `key` after a write or delete freed it; a failure
/// leaves the usage over-counted and is logged (the write or delete is done).
async fn give_back(kv: &kv::Store, key: &str, freed: Change) {
    if freed.is_zero() {
        return;
    }
    if let Err(error) = change_usage(kv, key, |now| Ok(freed.taken_from(now))).await {
        tracing::warn!(%error, usage = key, "could not give back freed bytes; the usage stays over-counted");
    }
}

/// The bucket keys (without the bucket's subject prefix) under `filter` whose latest entry
/// is a value, read headers only ([`crate::scan`]).
async fn scan_keys(kv: &kv::Store, filter: String) -> Result<Vec<String>, KvError> {
    let mut keys = Vec::new();
    let listing = Scan {
        what: "key-value keys",
        filter,
        headers_only: true,
    };
    crate::scan::scan(kv, listing, |key, _| {
        keys.push(key.to_owned());
        Ok(())
    })
    .await
    .map_err(failure)?;
    Ok(keys)
}

#[async_trait]
impl KeyValueStore for NatsKeyValue {
    fn backend(&self) -> &'static str {
        NAME
    }

    async fn get(&self, ns: &Namespace, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        let kv = self.kv().await?;
        let current = read_entry(kv, &entry_key(ns, key)).await?;
        Ok(current.value.map(|value| value.to_vec()))
    }

    async fn set(
        &self,
        ns: &Namespace,
        key: &str,
        value: &[u8],
        quota: &Quota,
    ) -> Result<(), KvError> {
        let value = Bytes::copy_from_slice(value);
        self.write(ns, key, quota, |_| Ok((value.clone(), ())))
            .await
    }

    /// Deletes the entry if it is still the one read (else re-reads), then gives its bytes
    /// back to the usage.
    async fn delete(&self, ns: &Namespace, key: &str) -> Result<(), KvError> {
        let kv = self.kv().await?;
        let entry = entry_key(ns, key);
        for attempt in 0..MAX_ATTEMPTS {
            pause(attempt).await;
            let current = read_entry(kv, &entry).await?;
            let Some(old) = current.value else {
                return Ok(());
            };
            match kv
                .delete_expect_revision(&entry, Some(current.revision))
                .await
            {
                Ok(()) => {
                    give_back(kv, &usage_key(ns), Change::of_delete(key.len(), old.len())).await;
                    return Ok(());
                }
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => {}
                Err(e) => return Err(failure(format!("cannot delete key {key:?}: {e}"))),
            }
        }
        Err(contended(&format!("deleting key {key:?}")))
    }

    async fn list_keys(&self, ns: &Namespace, cursor: Option<u64>) -> Result<KeyPage, KvError> {
        let kv = self.kv().await?;
        let ns_prefix = format!("{}.", hex::encode(ns.id()));
        let filter = format!("{}{ns_prefix}>", kv.prefix);
        let mut keys = scan_keys(kv, filter)
            .await?
            .iter()
            .map(|bucket_key| decode_key(&ns_prefix, bucket_key))
            .collect::<Result<Vec<_>, _>>()?;
        keys.sort_unstable();
        Ok(KeyPage::at_offset(keys.iter(), cursor, PAGE))
    }

    async fn increment(
        &self,
        ns: &Namespace,
        key: &str,
        delta: u64,
        quota: &Quota,
    ) -> Result<u64, KvError> {
        self.write(ns, key, quota, |current| {
            let value = incremented(key, current, delta)?;
            Ok((Bytes::from(value.to_string()), value))
        })
        .await
    }

    /// The usage record: what the entries hold, plus whatever a host left over-counted (see
    /// the module's consistency notes).
    async fn usage(&self, ns: &Namespace) -> Result<Usage, KvError> {
        let kv = self.kv().await?;
        Ok(read_usage(kv, &usage_key(ns)).await?.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(key: &str) -> bool {
        !key.starts_with('.')
            && !key.ends_with('.')
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-/_=.".contains(c))
    }

    #[test]
    fn bucket_keys_are_valid_and_never_collide() {
        let ns = Namespace::new("group", "handler", "bucket");
        let entry = entry_key(&ns, "ключ 🔑 with spaces/and.dots*>");
        let usage = usage_key(&ns);
        assert!(valid(&entry), "{entry}");
        assert!(valid(&usage), "{usage}");
        assert_eq!(entry.matches('.').count(), 1);
        assert!(!usage.contains('.'));
        assert_ne!(
            entry_key(&Namespace::new("g", "h", "a"), "k"),
            entry_key(&Namespace::new("g", "h", "ak"), "")
        );
        let prefix = format!("{}.", hex::encode(ns.id()));
        assert_eq!(
            decode_key(&prefix, &entry).expect("decodes"),
            "ключ 🔑 with spaces/and.dots*>"
        );
        assert!(decode_key(&prefix, &usage).is_err());
    }

    #[test]
    fn changes_split_growth_from_freed_bytes() {
        let (grow, shrink) = Change::of_write(2, None, 8);
        assert_eq!(
            (grow, shrink),
            (Change { keys: 1, bytes: 10 }, Change::default())
        );
        let (grow, shrink) = Change::of_write(2, Some(8), 3);
        assert_eq!(
            (grow, shrink),
            (Change::default(), Change { keys: 0, bytes: 5 })
        );
        let (grow, shrink) = Change::of_write(2, Some(3), 8);
        assert_eq!(
            (grow, shrink),
            (Change { keys: 0, bytes: 5 }, Change::default())
        );
        let usage = Usage { keys: 3, bytes: 30 };
        let written = Usage::default().after_write("ab", None, 8);
        assert_eq!(
            Change::of_write(2, None, 8).0.added_to(Usage::default()),
            written
        );
        assert_eq!(
            Change::of_delete(2, 8).taken_from(usage),
            usage.after_delete("ab", 8)
        );
    }
}
