//! The provider backends the shared suites run against. Each constructor returns a
//! [`Backend`] on a namespace of its own (unique table, stream, key prefix…), or `None` after
//! a loud skip when the service it needs is unreachable (a failure under
//! `EVENTBROKER_REQUIRE_SERVICES=1`).

use std::sync::Arc;

use eventbroker::config::{BrokerConfig, ProviderKind};
use eventbroker::provider::{self, MemoryProvider, Provider, memory::MemoryOptions};

/// A backend under test: a broker config naming one isolated namespace of one provider.
pub struct Backend {
    /// Backend name, for messages.
    pub name: &'static str,
    /// The config [`Backend::connect`] builds providers from.
    pub config: BrokerConfig,
    /// The memory provider's single instance (memory cannot be opened twice).
    single: Option<Arc<dyn Provider>>,
}

impl Backend {
    /// A backend whose providers are built from `config` by `provider::from_config`.
    pub fn from_config(name: &'static str, config: BrokerConfig) -> Self {
        Backend {
            name,
            config,
            single: None,
        }
    }

    /// A provider on this backend's namespace. Each call opens a new instance (a new "host")
    /// on the same storage, except for the memory backend, which has only one.
    pub async fn connect(&self) -> Arc<dyn Provider> {
        if let Some(single) = &self.single {
            return single.clone();
        }
        match provider::from_config(&self.config).await {
            Ok(provider) => provider,
            Err(error) => panic!("{}: cannot open the provider: {error}", self.name),
        }
    }
}

/// The base config of every backend: a host id and defaults.
pub fn base_config(provider: ProviderKind) -> BrokerConfig {
    BrokerConfig {
        provider,
        instance_id: format!("test-{}", super::unique_suffix()),
        ..BrokerConfig::default()
    }
}

/// The embedded memory provider (always available).
pub async fn memory() -> Option<Backend> {
    let mut config = base_config(ProviderKind::Memory);
    config.memory.max_events = 100_000;
    config.buffer_size = 100_000;
    let provider: Arc<dyn Provider> =
        Arc::new(MemoryProvider::new(MemoryOptions::from_config(&config)));
    Some(Backend {
        name: "memory",
        config,
        single: Some(provider),
    })
}

/// Address of the NATS server (with JetStream) the NATS backend uses.
pub const NATS_ADDR: &str = "127.0.0.1:4222";

/// Prefix of the streams and buckets NATS test backends create.
const NATS_TEST_PREFIX: &str = "EBTEST_";

/// NATS JetStream on the local server: a stream, subject prefix and key-value bucket of its
/// own (`EBTEST_<suffix>`, `ebtest<suffix>.>`), on file storage. Leftovers of earlier runs
/// older than an hour are deleted on first use.
pub async fn nats() -> Option<Backend> {
    if !super::services::available("NATS", NATS_ADDR) {
        return None;
    }
    sweep_nats_leftovers().await;
    Some(Backend::from_config(
        "nats",
        nats_config(&super::unique_suffix()),
    ))
}

/// The broker config of an isolated NATS namespace named by `suffix`.
pub fn nats_config(suffix: &str) -> BrokerConfig {
    let mut config = base_config(ProviderKind::Nats);
    config.nats.url = format!("nats://{NATS_ADDR}");
    config.nats.stream_name = format!("{NATS_TEST_PREFIX}{suffix}");
    config.nats.subjects = vec![format!("ebtest{suffix}.>")];
    config.nats.storage = eventbroker::config::NatsStorage::File;
    config.nats.max_age = std::time::Duration::from_secs(3600);
    config
}

/// Deletes test streams and buckets (`EBTEST_*`) created more than an hour ago, once per
/// process: tests cannot always tear down what they created (a panicking test, a killed run).
async fn sweep_nats_leftovers() {
    static SWEPT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    SWEPT
        .get_or_init(|| async {
            use futures::StreamExt;
            let Ok(client) = async_nats::connect(NATS_ADDR).await else {
                return;
            };
            let js = async_nats::jetstream::new(client);
            let cutoff = chrono::Utc::now().timestamp() - 3600;
            let mut streams = js.streams();
            let mut stale = Vec::new();
            while let Some(Ok(info)) = streams.next().await {
                let name = &info.config.name;
                let ours = name.starts_with(NATS_TEST_PREFIX)
                    || name.starts_with(&format!("KV_{NATS_TEST_PREFIX}"));
                if ours && info.created.unix_timestamp() < cutoff {
                    stale.push(name.clone());
                }
            }
            for name in stale {
                let _ = js.delete_stream(&name).await;
            }
        })
        .await;
}
