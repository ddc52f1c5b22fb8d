//! The provider conformance suite on SQLite and PostgreSQL.

mod common;

eventbroker_testkit::conformance!(sqlite, async {
    common::sqlite().await.map(common::SqlBackend::into_backend)
});
eventbroker_testkit::conformance!(postgres, async {
    common::postgres()
        .await
        .map(common::SqlBackend::into_backend)
});
