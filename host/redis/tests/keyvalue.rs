//! The key-value conformance suite on Redis, and what only Redis does: counters are signed
//! 64-bit, and a refused increment leaves the value as it was.

mod common;

use std::sync::Arc;

use eventbroker::KeyValueStore;
use eventbroker::keyvalue::{KvError, Namespace, Quota, Usage};
use eventbroker_testkit::backends::Backend;

eventbroker_testkit::keyvalue_conformance!(redis, common::backend());

const ROOMY: Quota = Quota {
    max_keys: 1000,
    max_bytes: 1 << 20,
};

/// The backend (kept alive: dropping it deletes its keys) and a store on it, or `None`
/// (after a loud skip) without Redis.
async fn store() -> Option<(Backend, Arc<dyn KeyValueStore>)> {
    let backend = common::backend().await?;
    let store = backend
        .connect()
        .await
        .keyvalue()
        .expect("Redis offers a key-value store");
    Some((backend, store))
}

/// Asserts that incrementing `key` (now `value`) by `delta` is refused as not a number and
/// leaves the value.
async fn refused_as_not_a_number(
    store: &dyn KeyValueStore,
    ns: &Namespace,
    value: &str,
    delta: u64,
) {
    store
        .set(ns, "n", value.as_bytes(), &ROOMY)
        .await
        .expect("set");
    let refused = store.increment(ns, "n", delta, &ROOMY).await;
    assert!(
        matches!(refused, Err(KvError::NotANumber(_))),
        "{value} + {delta}: {refused:?}"
    );
    assert_eq!(
        store.get(ns, "n").await.expect("get"),
        Some(value.as_bytes().to_vec())
    );
}

#[tokio::test]
async fn counters_are_signed_64_bit_and_plain_digits() {
    let Some((_backend, store)) = store().await else {
        return;
    };
    let ns = Namespace::new("redis", "h", "limits");
    let max = i64::MAX.to_string();
    refused_as_not_a_number(&*store, &ns, &max, 1).await;
    refused_as_not_a_number(&*store, &ns, "0", i64::MAX as u64 + 1).await;
    refused_as_not_a_number(&*store, &ns, &u64::MAX.to_string(), 0).await;
    refused_as_not_a_number(&*store, &ns, "-5", 1).await;
    refused_as_not_a_number(&*store, &ns, "007", 1).await;
    refused_as_not_a_number(&*store, &ns, "", 1).await;
    store.set(&ns, "n", b"1", &ROOMY).await.expect("set");
    assert_eq!(
        store
            .increment(&ns, "n", i64::MAX as u64 - 1, &ROOMY)
            .await
            .expect("up to the limit"),
        i64::MAX as u64
    );
    assert_eq!(
        store.usage(&ns).await.expect("usage"),
        Usage {
            keys: 1,
            bytes: (1 + max.len()) as u64
        }
    );
}
