//! The cluster handler store conformance suite on PostgreSQL (skipped loudly when the server
//! is unreachable). SQLite has no handler store: checked below.

mod common;

eventbroker_testkit::handler_store_conformance!(postgres, async {
    common::postgres()
        .await
        .map(common::SqlBackend::into_backend)
});

/// SQLite is one host's database: its provider offers no handler store.
#[tokio::test]
async fn sqlite_has_no_handler_store() {
    let backend = common::sqlite().await.expect("sqlite backend");
    let provider = common::open(&backend.config).await.expect("open sqlite");
    assert!(provider.handler_store().is_none());
    provider.close().await;
}
