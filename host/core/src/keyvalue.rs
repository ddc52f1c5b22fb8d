//! Key-value state for handlers: the [`KeyValueStore`] a backend implements so that handlers
//! keep small state (de-duplication keys, counters, last-seen values) between events, shared
//! by every host of a cluster that uses the same backend.
//!
//! A store holds independent *namespaces* (one per consumer group, handler and bucket, see
//! [`Namespace`]); keys are any UTF-8 strings, values any bytes. Every write that can add
//! a key or bytes is checked against a [`Quota`] of its namespace, where the usage counted is
//! the number of keys and the sum of the lengths of keys and values. A backend keeps this
//! accounting itself, so that hosts sharing it share the quota.
//!
//! [`KeyValueStore::increment`] is atomic on every backend: two hosts incrementing one key
//! concurrently never lose an update. Values written by `increment` are decimal text, so
//! `get` reads them back as, e.g., `b"42"`. Backends document anything weaker (e.g. how their
//! quota behaves when a host dies in the middle of a write).
//!
//! [`MemoryKeyValue`] is the in-process implementation (the memory provider's, and the local
//! runner's).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;

/// The longest key a store accepts, in bytes.
pub const MAX_KEY_BYTES: usize = 512;
/// The largest value a store accepts, in bytes (every backend stores one this size in one
/// message or row; NATS's default message limit is 1 MiB).
pub const MAX_VALUE_BYTES: usize = 512 * 1024;

/// Where one handler's bucket lives: its consumer group (`scope`), the handler's name and the
/// bucket's name. Two handlers, or one handler in two consumer groups, never see each other's
/// keys.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Namespace {
    id: String,
}

impl Namespace {
    /// The namespace of `bucket` of `handler` in consumer group `scope`.
    pub fn new(scope: &str, handler: &str, bucket: &str) -> Self {
        Namespace {
            id: format!("{scope}/{handler}/{bucket}"),
        }
    }

    /// The namespace as one string, `scope/handler/bucket`: what backends key their data by.
    /// Handler and bucket names cannot contain `/`, so distinct namespaces have distinct ids.
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// The limits of one namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    /// Keys it may hold.
    pub max_keys: u64,
    /// Bytes it may hold, keys and values together.
    pub max_bytes: u64,
}

/// What a namespace holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Keys.
    pub keys: u64,
    /// Bytes of keys and values together.
    pub bytes: u64,
}

impl Usage {
    /// Whether a namespace holding `self` may replace the value of `key` (now `old` bytes long,
    /// `None` when the key is absent) by one of `new` bytes under `quota`; `Err` names the
    /// limit it would pass. A write that does not grow the namespace is always allowed.
    ///
    /// # Errors
    /// [`KvError::QuotaExceeded`].
    pub fn admit(
        &self,
        key: &str,
        old: Option<usize>,
        new: usize,
        quota: &Quota,
    ) -> Result<Usage, KvError> {
        let after = self.after_write(key, old, new);
        if after.keys > self.keys && after.keys > quota.max_keys {
            return Err(KvError::QuotaExceeded(format!(
                "the bucket holds {} keys, its quota (max_keys)",
                self.keys
            )));
        }
        if after.bytes > self.bytes && after.bytes > quota.max_bytes {
            return Err(KvError::QuotaExceeded(format!(
                "writing {new} bytes to key {key:?} would make the bucket hold {} bytes; its quota (max_bytes) is {}",
                after.bytes, quota.max_bytes
            )));
        }
        Ok(after)
    }

    /// The usage after writing `new` bytes to `key`, whose value is now `old` bytes long (or
    /// absent).
    pub fn after_write(&self, key: &str, old: Option<usize>, new: usize) -> Usage {
        match old {
            Some(old) => Usage {
                keys: self.keys,
                bytes: (self.bytes + new as u64).saturating_sub(old as u64),
            },
            None => Usage {
                keys: self.keys + 1,
                bytes: self.bytes + (key.len() + new) as u64,
            },
        }
    }

    /// The usage after deleting `key`, whose value is `old` bytes long.
    pub fn after_delete(&self, key: &str, old: usize) -> Usage {
        Usage {
            keys: self.keys.saturating_sub(1),
            bytes: self.bytes.saturating_sub((key.len() + old) as u64),
        }
    }
}

/// One page of a namespace's keys.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyPage {
    /// Keys of this page.
    pub keys: Vec<String>,
    /// Where the next page starts; `None` after the last page.
    pub cursor: Option<u64>,
}

impl KeyPage {
    /// Offset paging: the `size` keys of `keys` (in an order that does not change between
    /// calls) starting at offset `cursor`, and the cursor of the next page.
    pub fn at_offset<'a>(
        keys: impl ExactSizeIterator<Item = &'a String>,
        cursor: Option<u64>,
        size: usize,
    ) -> KeyPage {
        let total = keys.len();
        let start = usize::try_from(cursor.unwrap_or(0)).unwrap_or(usize::MAX);
        let keys: Vec<String> = keys.skip(start).take(size).cloned().collect();
        let next = start.saturating_add(keys.len());
        KeyPage {
            keys,
            cursor: (next < total).then_some(next as u64),
        }
    }
}

/// Why a key-value operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KvError {
    /// The write would pass the namespace's quota; nothing was written.
    #[error("quota exceeded: {0}")]
    QuotaExceeded(String),
    /// The key is empty or longer than [`MAX_KEY_BYTES`].
    #[error("invalid key: {0}")]
    InvalidKey(String),
    /// The value is larger than [`MAX_VALUE_BYTES`].
    #[error("value too large: {0}")]
    ValueTooLarge(String),
    /// `increment` on a value that is not a decimal number below 2^64, or an increment that
    /// would pass 2^64 − 1 (or the backend's own integer limit).
    #[error("cannot increment: {0}")]
    NotANumber(String),
    /// The backend failed or could not be reached.
    #[error("key-value store ({backend}): {message}")]
    Backend {
        /// Backend name.
        backend: &'static str,
        /// What failed.
        message: String,
    },
}

impl KvError {
    /// A backend failure of `backend`.
    pub fn backend(backend: &'static str, message: impl std::fmt::Display) -> Self {
        KvError::Backend {
            backend,
            message: message.to_string(),
        }
    }
}

/// Checks a key: not empty, no NUL character (PostgreSQL text cannot hold it), at most
/// [`MAX_KEY_BYTES`] bytes.
///
/// # Errors
/// [`KvError::InvalidKey`].
pub fn check_key(key: &str) -> Result<(), KvError> {
    if key.is_empty() {
        return Err(KvError::InvalidKey("a key may not be empty".into()));
    }
    if key.contains('\0') {
        return Err(KvError::InvalidKey(
            "a key may not contain the NUL character".into(),
        ));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(KvError::InvalidKey(format!(
            "a key may be at most {MAX_KEY_BYTES} bytes; this one is {}",
            key.len()
        )));
    }
    Ok(())
}

/// Checks a value's size: at most [`MAX_VALUE_BYTES`].
///
/// # Errors
/// [`KvError::ValueTooLarge`].
pub fn check_value(value: &[u8]) -> Result<(), KvError> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(KvError::ValueTooLarge(format!(
            "a value may be at most {MAX_VALUE_BYTES} bytes; this one is {}",
            value.len()
        )));
    }
    Ok(())
}

/// The value after incrementing `current` (decimal text, or absent: 0) by `delta`.
///
/// # Errors
/// [`KvError::NotANumber`] when `current` is not decimal text of a `u64`, or on overflow.
pub fn incremented(key: &str, current: Option<&[u8]>, delta: u64) -> Result<u64, KvError> {
    let now = match current {
        None => 0,
        Some(bytes) => std::str::from_utf8(bytes)
            .ok()
            .and_then(|text| text.parse::<u64>().ok())
            .ok_or_else(|| {
                KvError::NotANumber(format!("the value of key {key:?} is not a decimal number"))
            })?,
    };
    now.checked_add(delta).ok_or_else(|| {
        KvError::NotANumber(format!(
            "incrementing key {key:?} ({now}) by {delta} passes 2^64 - 1"
        ))
    })
}

/// Key-value storage for handlers. Every method is safe to call from several hosts at once;
/// keys and values given to it have passed [`check_key`] and [`check_value`]. Values written by
/// [`KeyValueStore::increment`] are decimal text.
#[async_trait]
pub trait KeyValueStore: Send + Sync + 'static {
    /// Backend name, for messages and metrics.
    fn backend(&self) -> &'static str;

    /// The value of `key`, `None` when absent.
    ///
    /// # Errors
    /// Backend failures.
    async fn get(&self, ns: &Namespace, key: &str) -> Result<Option<Vec<u8>>, KvError>;

    /// Sets `key` to `value`, unless the write would take the namespace past `quota`
    /// (checked and written as one step where the backend can, see the backend's docs).
    ///
    /// # Errors
    /// [`KvError::QuotaExceeded`] (nothing written), backend failures.
    async fn set(
        &self,
        ns: &Namespace,
        key: &str,
        value: &[u8],
        quota: &Quota,
    ) -> Result<(), KvError>;

    /// Deletes `key`; deleting an absent key is not an error.
    ///
    /// # Errors
    /// Backend failures.
    async fn delete(&self, ns: &Namespace, key: &str) -> Result<(), KvError>;

    /// Whether `key` is present.
    ///
    /// # Errors
    /// Backend failures.
    async fn exists(&self, ns: &Namespace, key: &str) -> Result<bool, KvError> {
        Ok(self.get(ns, key).await?.is_some())
    }

    /// A page of the namespace's keys, starting at `cursor` (`None`: the first page). Paging
    /// to the end returns every key present throughout the listing exactly once.
    ///
    /// # Errors
    /// Backend failures.
    async fn list_keys(&self, ns: &Namespace, cursor: Option<u64>) -> Result<KeyPage, KvError>;

    /// Atomically adds `delta` to the number stored at `key` (absent: 0) and returns the new
    /// value. Concurrent increments, from any host, are never lost. Creating the key counts
    /// against `quota`.
    ///
    /// # Errors
    /// [`KvError::NotANumber`], [`KvError::QuotaExceeded`], backend failures.
    async fn increment(
        &self,
        ns: &Namespace,
        key: &str,
        delta: u64,
        quota: &Quota,
    ) -> Result<u64, KvError>;

    /// What the namespace holds, as the quota counts it.
    ///
    /// # Errors
    /// Backend failures.
    async fn usage(&self, ns: &Namespace) -> Result<Usage, KvError>;
}

/// Keys per page of [`MemoryKeyValue::list_keys`].
const MEMORY_PAGE: usize = 1000;

#[derive(Default)]
struct MemoryBucket {
    entries: BTreeMap<String, Vec<u8>>,
    usage: Usage,
}

impl MemoryBucket {
    fn write(&mut self, key: &str, value: Vec<u8>, quota: &Quota) -> Result<(), KvError> {
        let old = self.entries.get(key).map(Vec::len);
        self.usage = self.usage.admit(key, old, value.len(), quota)?;
        self.entries.insert(key.to_owned(), value);
        Ok(())
    }
}

/// The in-process key-value store: every operation (quota checks included) is atomic.
/// Cheap to clone; clones share the data.
#[derive(Clone, Default)]
pub struct MemoryKeyValue {
    buckets: Arc<Mutex<HashMap<String, MemoryBucket>>>,
}

impl MemoryKeyValue {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every namespace id with its entries, in key order (for `eventbroker run --kv`).
    pub fn export(&self) -> BTreeMap<String, BTreeMap<String, Vec<u8>>> {
        self.buckets
            .lock()
            .iter()
            .filter(|(_, bucket)| !bucket.entries.is_empty())
            .map(|(id, bucket)| (id.clone(), bucket.entries.clone()))
            .collect()
    }

    /// Replaces the entries of namespace `ns`, without quota checks (for
    /// `eventbroker run --kv`).
    pub fn import(&self, ns: &Namespace, entries: BTreeMap<String, Vec<u8>>) {
        let usage = entries
            .iter()
            .fold(Usage::default(), |usage, (key, value)| {
                usage.after_write(key, None, value.len())
            });
        self.buckets
            .lock()
            .insert(ns.id().to_owned(), MemoryBucket { entries, usage });
    }
}

#[async_trait]
impl KeyValueStore for MemoryKeyValue {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn get(&self, ns: &Namespace, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self
            .buckets
            .lock()
            .get(ns.id())
            .and_then(|bucket| bucket.entries.get(key).cloned()))
    }

    async fn set(
        &self,
        ns: &Namespace,
        key: &str,
        value: &[u8],
        quota: &Quota,
    ) -> Result<(), KvError> {
        self.buckets
            .lock()
            .entry(ns.id().to_owned())
            .or_default()
            .write(key, value.to_vec(), quota)
    }

    async fn delete(&self, ns: &Namespace, key: &str) -> Result<(), KvError> {
        let mut buckets = self.buckets.lock();
        if let Some(bucket) = buckets.get_mut(ns.id())
            && let Some(old) = bucket.entries.remove(key)
        {
            bucket.usage = bucket.usage.after_delete(key, old.len());
        }
        Ok(())
    }

    async fn list_keys(&self, ns: &Namespace, cursor: Option<u64>) -> Result<KeyPage, KvError> {
        let buckets = self.buckets.lock();
        let Some(bucket) = buckets.get(ns.id()) else {
            return Ok(KeyPage::default());
        };
        Ok(KeyPage::at_offset(
            bucket.entries.keys(),
            cursor,
            MEMORY_PAGE,
        ))
    }

    async fn increment(
        &self,
        ns: &Namespace,
        key: &str,
        delta: u64,
        quota: &Quota,
    ) -> Result<u64, KvError> {
        let mut buckets = self.buckets.lock();
        let bucket = buckets.entry(ns.id().to_owned()).or_default();
        let value = incremented(key, bucket.entries.get(key).map(Vec::as_slice), delta)?;
        bucket.write(key, value.to_string().into_bytes(), quota)?;
        Ok(value)
    }

    async fn usage(&self, ns: &Namespace) -> Result<Usage, KvError> {
        Ok(self
            .buckets
            .lock()
            .get(ns.id())
            .map(|bucket| bucket.usage)
            .unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOMY: Quota = Quota {
        max_keys: 100,
        max_bytes: 10_000,
    };

    #[test]
    fn usage_counts_keys_and_bytes_and_admits_shrinking_writes() {
        let tight = Quota {
            max_keys: 1,
            max_bytes: 10,
        };
        let empty = Usage::default();
        let one = empty.admit("ab", None, 8, &tight).expect("fits exactly");
        assert_eq!(one, Usage { keys: 1, bytes: 10 });
        assert!(matches!(
            one.admit("c", None, 0, &tight),
            Err(KvError::QuotaExceeded(_))
        ));
        assert!(matches!(
            one.admit("ab", Some(8), 9, &tight),
            Err(KvError::QuotaExceeded(_))
        ));
        assert_eq!(
            one.admit("ab", Some(8), 2, &tight).expect("shrinks"),
            Usage { keys: 1, bytes: 4 }
        );
        // A namespace already over a lowered quota may still shrink.
        let over = Usage {
            keys: 5,
            bytes: 500,
        };
        assert!(over.admit("ab", Some(8), 1, &tight).is_ok());
        assert_eq!(one.after_delete("ab", 8), Usage::default());
    }

    #[test]
    fn increments_parse_decimal_text_and_refuse_overflow() {
        assert_eq!(incremented("k", None, 3).expect("absent is 0"), 3);
        assert_eq!(incremented("k", Some(b"40"), 2).expect("adds"), 42);
        assert!(matches!(
            incremented("k", Some(b"x"), 1),
            Err(KvError::NotANumber(_))
        ));
        assert!(matches!(
            incremented("k", Some(u64::MAX.to_string().as_bytes()), 1),
            Err(KvError::NotANumber(_))
        ));
    }

    #[test]
    fn offset_pages_follow_the_cursor_to_the_end() {
        let keys: Vec<String> = (0..1005).map(|i| format!("k{i:05}")).collect();
        let first = KeyPage::at_offset(keys.iter(), None, 1000);
        assert_eq!((first.keys.len(), first.cursor), (1000, Some(1000)));
        let last = KeyPage::at_offset(keys.iter(), first.cursor, 1000);
        assert_eq!((last.keys.len(), last.cursor), (5, None));
        assert_eq!(
            KeyPage::at_offset(keys.iter(), Some(u64::MAX), 1000),
            KeyPage::default()
        );
        assert_eq!(
            KeyPage::at_offset([].iter(), None, 1000),
            KeyPage::default()
        );
    }

    #[test]
    fn keys_are_checked() {
        assert!(check_key("").is_err());
        assert!(check_key("a\0b").is_err());
        assert!(check_key(&"k".repeat(MAX_KEY_BYTES + 1)).is_err());
        assert!(check_key("dedupe:order-1").is_ok());
    }

    #[tokio::test]
    async fn memory_store_keeps_namespaces_apart_and_pages_keys() {
        let store = MemoryKeyValue::new();
        let (a, b) = (Namespace::new("g", "h", "a"), Namespace::new("g", "h", "b"));
        for i in 0..(MEMORY_PAGE + 5) {
            store
                .set(
                    &a,
                    &format!("k{i:05}"),
                    b"v",
                    &Quota {
                        max_keys: 10_000,
                        max_bytes: 1 << 20,
                    },
                )
                .await
                .expect("set");
        }
        assert_eq!(store.get(&b, "k00000").await.expect("get"), None);
        let first = store.list_keys(&a, None).await.expect("page");
        assert_eq!(first.keys.len(), MEMORY_PAGE);
        let second = store.list_keys(&a, first.cursor).await.expect("page");
        assert_eq!(second.keys.len(), 5);
        assert_eq!(second.cursor, None);
        assert_eq!(store.increment(&b, "n", 2, &ROOMY).await.expect("incr"), 2);
        assert_eq!(store.get(&b, "n").await.expect("get"), Some(b"2".to_vec()));
        store.delete(&b, "n").await.expect("delete");
        assert_eq!(store.usage(&b).await.expect("usage"), Usage::default());
    }
}
