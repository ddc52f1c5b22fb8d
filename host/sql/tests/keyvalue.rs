//! The key-value state conformance suite on SQLite and PostgreSQL (PostgreSQL is skipped
//! loudly when the server is unreachable), and what the database store adds: keyset paging
//! that deletes between pages do not shift, state that outlives the provider, and
//! PostgreSQL's refusal of NUL in keys.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use eventbroker::KeyValueStore;
use eventbroker::keyvalue::{KvError, Namespace, Quota, Usage};
use eventbroker::provider::Provider;
use eventbroker_testkit::unique_suffix;

eventbroker_testkit::keyvalue_conformance!(sqlite, async {
    common::sqlite().await.map(common::SqlBackend::into_backend)
});
eventbroker_testkit::keyvalue_conformance!(postgres, async {
    common::postgres()
        .await
        .map(common::SqlBackend::into_backend)
});

const ROOMY: Quota = Quota {
    max_keys: 100_000,
    max_bytes: 64 << 20,
};

fn namespace(bucket: &str) -> Namespace {
    Namespace::new("sql", &format!("h{}", unique_suffix()), bucket)
}

/// A provider on `backend` and its key-value store.
async fn open(backend: &common::SqlBackend) -> (Arc<dyn Provider>, Arc<dyn KeyValueStore>) {
    let provider = common::open(&backend.config).await.expect("open provider");
    let store = provider
        .keyvalue()
        .expect("the database offers a key-value store");
    (provider, store)
}

/// Deleting keys already listed does not make the listing skip keys still present.
async fn deletes_between_pages_skip_nothing(backend: &common::SqlBackend) {
    let (provider, store) = open(backend).await;
    let ns = namespace("keyset");
    let all: Vec<String> = (0..1500).map(|i| format!("k{i}")).collect();
    for key in &all {
        store.set(&ns, key, b"", &ROOMY).await.expect("set");
    }
    let first = store.list_keys(&ns, None).await.expect("first page");
    assert!(first.cursor.is_some(), "a second page");
    for key in &first.keys {
        store.delete(&ns, key).await.expect("delete");
    }
    let second = store
        .list_keys(&ns, first.cursor)
        .await
        .expect("second page");
    assert_eq!(second.cursor, None, "the last page");
    let listed: BTreeSet<&String> = first.keys.iter().chain(&second.keys).collect();
    assert_eq!(listed.len(), all.len(), "every key exactly once");
    assert_eq!(
        store.usage(&ns).await.expect("usage").keys,
        (all.len() - first.keys.len()) as u64
    );
    provider.close().await;
}

/// A provider opened after another closed sees its keys, values and usage.
async fn state_outlives_the_provider(backend: &common::SqlBackend) {
    let ns = namespace("durable");
    let (provider, store) = open(backend).await;
    store
        .set(&ns, "k", b"\x00\xffv", &ROOMY)
        .await
        .expect("set");
    assert_eq!(store.increment(&ns, "n", 3, &ROOMY).await.expect("incr"), 3);
    provider.close().await;
    assert!(matches!(
        store.get(&ns, "k").await,
        Err(KvError::Backend { .. })
    ));
    let (provider, store) = open(backend).await;
    assert_eq!(
        store.get(&ns, "k").await.expect("get"),
        Some(b"\x00\xffv".to_vec())
    );
    assert_eq!(store.increment(&ns, "n", 1, &ROOMY).await.expect("incr"), 4);
    assert_eq!(
        store.usage(&ns).await.expect("usage"),
        Usage {
            keys: 2,
            bytes: 2 + 3 + 1
        }
    );
    provider.close().await;
}

macro_rules! database_cases {
    ($module:ident, $open:expr; $($case:ident),+ $(,)?) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    if let Some(backend) = $open.await {
                        super::$case(&backend).await;
                    }
                }
            )+
        }
    };
}

database_cases!(sqlite_database, super::common::sqlite();
    deletes_between_pages_skip_nothing,
    state_outlives_the_provider,
);
database_cases!(postgres_database, super::common::postgres();
    deletes_between_pages_skip_nothing,
    state_outlives_the_provider,
);

/// PostgreSQL `TEXT` cannot hold NUL: such a key is refused as invalid and never found.
#[tokio::test]
async fn postgres_refuses_nul_in_keys() {
    let Some(backend) = common::postgres().await else {
        return;
    };
    let (provider, store) = open(&backend).await;
    let ns = namespace("nul");
    assert!(matches!(
        store.set(&ns, "a\0b", b"v", &ROOMY).await,
        Err(KvError::InvalidKey(_))
    ));
    assert!(matches!(
        store.increment(&ns, "a\0b", 1, &ROOMY).await,
        Err(KvError::InvalidKey(_))
    ));
    assert_eq!(store.get(&ns, "a\0b").await.expect("get"), None);
    assert!(!store.exists(&ns, "a\0b").await.expect("exists"));
    store.delete(&ns, "a\0b").await.expect("delete");
    assert_eq!(store.backend(), "postgres");
    provider.close().await;
}

/// SQLite stores any key the core accepts, NUL included.
#[tokio::test]
async fn sqlite_stores_nul_in_keys() {
    let backend = common::sqlite().await.expect("sqlite backend");
    let (provider, store) = open(&backend).await;
    let ns = namespace("nul");
    store.set(&ns, "a\0b", b"v", &ROOMY).await.expect("set");
    assert_eq!(
        store.get(&ns, "a\0b").await.expect("get"),
        Some(b"v".to_vec())
    );
    assert_eq!(store.get(&ns, "a").await.expect("get"), None);
    assert_eq!(store.backend(), "sqlite");
    provider.close().await;
}
