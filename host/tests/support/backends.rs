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
