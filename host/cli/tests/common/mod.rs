//! Shared harness of the binary's tests: `serve` processes alone and in clusters, and the
//! namespaces of the shared backends they run on.

#![allow(dead_code, unused_imports)]

pub mod cluster;
pub mod serve;

pub use eventbroker_testkit::{PATIENCE, guests, services, unique_suffix};

/// The URL of the PostgreSQL test database (`EVENTBROKER_TEST_POSTGRES_URL`, default the local
/// server's `test` database).
pub fn postgres_url() -> String {
    std::env::var("EVENTBROKER_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Address of the NATS server (with JetStream).
pub const NATS_ADDR: &str = "127.0.0.1:4222";

/// The NATS section of an isolated namespace named by `suffix` (its stream and bucket are
/// deleted by [`delete_nats_namespace`]).
pub fn nats_section(suffix: &str) -> eventbroker_nats::NatsConfig {
    eventbroker_nats::NatsConfig {
        url: format!("nats://{NATS_ADDR}"),
        stream_name: format!("EBTEST_{suffix}"),
        subjects: vec![format!("ebtest{suffix}.>")],
        storage: eventbroker_nats::NatsStorage::File,
        max_age: std::time::Duration::from_secs(3600),
        ..eventbroker_nats::NatsConfig::default()
    }
}

/// Deletes the stream and bucket of a NATS namespace (blocking: a runtime of its own).
pub fn delete_nats_namespace(nats: &eventbroker_nats::NatsConfig) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let broker = eventbroker::BrokerConfig::default();
        match eventbroker_nats::NatsProvider::connect(nats, &broker).await {
            Ok(provider) => {
                if let Err(error) = provider.destroy().await {
                    eprintln!("could not delete the test stream: {error}");
                }
            }
            Err(error) => eprintln!("could not delete the test stream: {error}"),
        }
    });
}
