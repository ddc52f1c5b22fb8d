//! Conformance cases of handlers' key-value state ([`eventbroker::KeyValueStore`]), run by
//! every backend that offers it. Two providers opened on one backend play two hosts; each case
//! works in namespaces of its own.

use std::collections::BTreeSet;
use std::sync::Arc;

use eventbroker::KeyValueStore;
use eventbroker::keyvalue::{KvError, Namespace, Quota, Usage};

use crate::backends::Backend;
use crate::unique_suffix;

async fn store(backend: &Backend) -> Arc<dyn KeyValueStore> {
    backend
        .connect()
        .await
        .keyvalue()
        .unwrap_or_else(|| panic!("{}: the backend offers a key-value store", backend.name))
}

fn namespace(bucket: &str) -> Namespace {
    Namespace::new("conformance", &format!("h{}", unique_suffix()), bucket)
}

const ROOMY: Quota = Quota {
    max_keys: 100_000,
    max_bytes: 64 << 20,
};

/// Values are stored byte for byte (empty, binary and a large one), replaced, deleted, and
/// kept apart from another namespace's; the usage counts keys and bytes.
pub async fn get_set_delete_round_trip(backend: &Backend) {
    let store = store(backend).await;
    let (ns, other) = (namespace("a"), namespace("a"));
    let binary: Vec<u8> = (0..=255u8).collect();
    let large: Vec<u8> = (0..eventbroker::keyvalue::MAX_VALUE_BYTES)
        .map(|i| (i % 251) as u8)
        .collect();
    assert_eq!(store.get(&ns, "k").await.expect("get"), None);
    assert!(!store.exists(&ns, "k").await.expect("exists"));
    store
        .set(&ns, "empty", b"", &ROOMY)
        .await
        .expect("set empty");
    store.set(&ns, "k", &binary, &ROOMY).await.expect("set");
    store
        .set(&ns, "ключ 🔑 with spaces/and.dots*>", b"x", &ROOMY)
        .await
        .expect("set unicode key");
    store
        .set(&ns, "large", &large, &ROOMY)
        .await
        .expect("large");
    assert_eq!(store.get(&ns, "empty").await.expect("get"), Some(vec![]));
    assert!(store.exists(&ns, "empty").await.expect("exists"));
    assert_eq!(store.get(&ns, "k").await.expect("get"), Some(binary));
    assert_eq!(
        store
            .get(&ns, "ключ 🔑 with spaces/and.dots*>")
            .await
            .expect("get"),
        Some(b"x".to_vec())
    );
    assert_eq!(store.get(&ns, "large").await.expect("get"), Some(large));
    assert_eq!(store.get(&other, "k").await.expect("get"), None);
    store.set(&ns, "k", b"v2", &ROOMY).await.expect("replace");
    assert_eq!(
        store.get(&ns, "k").await.expect("get"),
        Some(b"v2".to_vec())
    );
    store.delete(&ns, "large").await.expect("delete");
    store.delete(&ns, "large").await.expect("delete again");
    assert_eq!(store.get(&ns, "large").await.expect("get"), None);
    let key_bytes = ("empty".len() + "k".len() + "ключ 🔑 with spaces/and.dots*>".len()) as u64;
    assert_eq!(
        store.usage(&ns).await.expect("usage"),
        Usage {
            keys: 3,
            bytes: key_bytes + 2 + 1
        }
    );
    assert_eq!(store.usage(&other).await.expect("usage"), Usage::default());
}

/// Paging through a namespace's keys returns each key exactly once.
pub async fn list_keys_pages_through_every_key(backend: &Backend) {
    let store = store(backend).await;
    let ns = namespace("list");
    assert_eq!(
        store.list_keys(&ns, None).await.expect("empty list").keys,
        Vec::<String>::new()
    );
    let expected: BTreeSet<String> = (0..2500).map(|i| format!("key-{i}")).collect();
    for key in &expected {
        store.set(&ns, key, b"1", &ROOMY).await.expect("set");
    }
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = store.list_keys(&ns, cursor).await.expect("page");
        seen.extend(page.keys);
        match page.cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
        assert!(seen.len() <= 2 * expected.len(), "listing does not end");
    }
    assert_eq!(seen.len(), expected.len(), "every key exactly once");
    assert_eq!(seen.into_iter().collect::<BTreeSet<_>>(), expected);
}

/// Writes past the key or byte quota are refused and write nothing; replacing within the
/// quota, shrinking and deleting work; a delete frees room.
pub async fn quotas_refuse_growth_past_the_limit(backend: &Backend) {
    let store = store(backend).await;
    let ns = namespace("quota");
    let quota = Quota {
        max_keys: 2,
        max_bytes: 20,
    };
    store
        .set(&ns, "a", b"123456789", &quota)
        .await
        .expect("10 bytes");
    store.set(&ns, "b", b"12", &quota).await.expect("13 bytes");
    assert!(matches!(
        store.set(&ns, "c", b"", &quota).await,
        Err(KvError::QuotaExceeded(_))
    ));
    assert!(matches!(
        store.increment(&ns, "c", 1, &quota).await,
        Err(KvError::QuotaExceeded(_))
    ));
    assert_eq!(store.get(&ns, "c").await.expect("get"), None);
    let refused = store.set(&ns, "b", b"1234567890", &quota).await;
    assert!(
        matches!(refused, Err(KvError::QuotaExceeded(_))),
        "21 bytes: {refused:?}"
    );
    assert_eq!(
        store.get(&ns, "b").await.expect("get"),
        Some(b"12".to_vec())
    );
    store
        .set(&ns, "b", b"123456789", &quota)
        .await
        .expect("20 bytes");
    assert_eq!(
        store.usage(&ns).await.expect("usage"),
        Usage { keys: 2, bytes: 20 }
    );
    store.set(&ns, "a", b"1", &quota).await.expect("shrink");
    store.delete(&ns, "b").await.expect("delete");
    store.set(&ns, "c", b"1", &quota).await.expect("room again");
    assert_eq!(
        store.usage(&ns).await.expect("usage"),
        Usage { keys: 2, bytes: 4 }
    );
    // Emptied, the bucket holds nothing and lists nothing.
    store.delete(&ns, "a").await.expect("delete");
    store.delete(&ns, "c").await.expect("delete");
    assert_eq!(store.usage(&ns).await.expect("usage"), Usage::default());
    assert_eq!(
        store.list_keys(&ns, None).await.expect("list").keys,
        Vec::<String>::new()
    );
}

/// `increment` creates a key, adds to it, keeps decimal text, refuses a value that is not a
/// number and an overflow, and leaves the value as it was when it refuses.
pub async fn increment_counts_in_decimal_text(backend: &Backend) {
    let store = store(backend).await;
    let ns = namespace("count");
    assert_eq!(
        store.increment(&ns, "n", 5, &ROOMY).await.expect("create"),
        5
    );
    assert_eq!(store.increment(&ns, "n", 0, &ROOMY).await.expect("zero"), 5);
    assert_eq!(
        store.increment(&ns, "n", 37, &ROOMY).await.expect("add"),
        42
    );
    assert_eq!(
        store.get(&ns, "n").await.expect("get"),
        Some(b"42".to_vec())
    );
    store.set(&ns, "text", b"hello", &ROOMY).await.expect("set");
    assert!(matches!(
        store.increment(&ns, "text", 1, &ROOMY).await,
        Err(KvError::NotANumber(_))
    ));
    assert_eq!(
        store.get(&ns, "text").await.expect("get"),
        Some(b"hello".to_vec())
    );
    store.set(&ns, "set", b"7", &ROOMY).await.expect("set");
    assert_eq!(
        store.increment(&ns, "set", 1, &ROOMY).await.expect("add"),
        8
    );
    // Far above any backend's integer limit: refused on every backend, the value kept.
    let near = (i64::MAX as u64).to_string();
    store
        .set(&ns, "big", near.as_bytes(), &ROOMY)
        .await
        .expect("set");
    assert!(matches!(
        store.increment(&ns, "big", u64::MAX / 2 + 2, &ROOMY).await,
        Err(KvError::NotANumber(_))
    ));
    assert_eq!(
        store.get(&ns, "big").await.expect("get"),
        Some(near.into_bytes())
    );
}

/// An increment whose longer result would pass the byte quota (`99` → `100`) is refused and
/// changes nothing: neither the value nor the usage.
pub async fn an_increment_growing_past_the_byte_quota_changes_nothing(backend: &Backend) {
    let store = store(backend).await;
    let ns = namespace("grow");
    let quota = Quota {
        max_keys: 10,
        max_bytes: 3,
    };
    store.set(&ns, "n", b"98", &quota).await.expect("3 bytes");
    assert_eq!(store.increment(&ns, "n", 1, &quota).await.expect("99"), 99);
    let refused = store.increment(&ns, "n", 1, &quota).await;
    assert!(
        matches!(&refused, Err(KvError::QuotaExceeded(m)) if m.contains("max_bytes")),
        "{refused:?}"
    );
    assert_eq!(
        store.get(&ns, "n").await.expect("get"),
        Some(b"99".to_vec())
    );
    assert_eq!(
        store.usage(&ns).await.expect("usage"),
        Usage { keys: 1, bytes: 3 }
    );
}

/// Two hosts incrementing one key from many tasks at once: no increment is lost, and every
/// returned value is distinct (each increment saw the one before it).
pub async fn concurrent_increments_from_two_hosts_are_exact(backend: &Backend) {
    let (a, b) = (store(backend).await, store(backend).await);
    let ns = namespace("race");
    const TASKS: u64 = 4;
    const EACH: u64 = 40;
    let mut tasks = Vec::new();
    for task in 0..(2 * TASKS) {
        let store = if task % 2 == 0 { a.clone() } else { b.clone() };
        let ns = ns.clone();
        tasks.push(tokio::spawn(async move {
            let mut returned = Vec::new();
            for _ in 0..EACH {
                returned.push(
                    store
                        .increment(&ns, "counter", 1, &ROOMY)
                        .await
                        .expect("increment"),
                );
            }
            returned
        }));
    }
    let mut returned = BTreeSet::new();
    for task in tasks {
        for value in task.await.expect("task") {
            assert!(returned.insert(value), "value {value} returned twice");
        }
    }
    let total = 2 * TASKS * EACH;
    assert_eq!(returned, (1..=total).collect::<BTreeSet<_>>());
    assert_eq!(
        a.get(&ns, "counter").await.expect("get"),
        Some(total.to_string().into_bytes())
    );
}

/// Two hosts racing to add distinct keys to a namespace with a key quota: the namespace ends
/// holding exactly the quota, and exactly that many writes succeeded.
pub async fn concurrent_writers_never_pass_the_key_quota(backend: &Backend) {
    let (a, b) = (store(backend).await, store(backend).await);
    let ns = namespace("crowd");
    let quota = Quota {
        max_keys: 10,
        max_bytes: 1 << 20,
    };
    let mut tasks = Vec::new();
    for task in 0..8u32 {
        let store = if task % 2 == 0 { a.clone() } else { b.clone() };
        let ns = ns.clone();
        tasks.push(tokio::spawn(async move {
            let mut written = 0u64;
            for i in 0..5u32 {
                match store.set(&ns, &format!("k-{task}-{i}"), b"v", &quota).await {
                    Ok(()) => written += 1,
                    Err(KvError::QuotaExceeded(_)) => {}
                    Err(other) => panic!("set failed: {other}"),
                }
            }
            written
        }));
    }
    let mut written = 0;
    for task in tasks {
        written += task.await.expect("task");
    }
    assert_eq!(written, quota.max_keys, "writes that succeeded");
    assert_eq!(a.usage(&ns).await.expect("usage").keys, quota.max_keys);
    let mut listed = 0;
    let mut cursor = None;
    loop {
        let page = a.list_keys(&ns, cursor).await.expect("list");
        listed += page.keys.len() as u64;
        match page.cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(listed, quota.max_keys, "keys present");
}

/// Generates one test per key-value conformance case in a module named `$backend` (same
/// arguments as [`crate::conformance!`]).
#[macro_export]
macro_rules! keyvalue_conformance {
    ($backend:ident, $open:expr) => {
        mod $backend {
            #[allow(unused_imports)]
            use super::*;
            use $crate::conformance::keyvalue as cases;
            $crate::conformance!(@cases $open;
                get_set_delete_round_trip,
                list_keys_pages_through_every_key,
                quotas_refuse_growth_past_the_limit,
                increment_counts_in_decimal_text,
                an_increment_growing_past_the_byte_quota_changes_nothing,
                concurrent_increments_from_two_hosts_are_exact,
                concurrent_writers_never_pass_the_key_quota,
            );
        }
    };
}
