//! The one place that maps a configured provider name to a backend crate.

use std::sync::Arc;

use eventbroker::config::BrokerConfig;
use eventbroker::provider::{MemoryProvider, Provider, ProviderError};
use eventbroker_nats::NatsProvider;
use eventbroker_redis::RedisProvider;
use eventbroker_sql::SqlProvider;

use crate::config::{BackendConfig, ProviderKind};

/// Opens the provider `backend.provider` names, with its section of `backend` and the
/// broker's settings (`broker`: consumer group, lease, queue bounds).
///
/// # Errors
/// The backend's construction errors: [`ProviderError::Config`] for a setting out of range
/// (naming its key), [`ProviderError::Backend`] for an unreachable server.
///
/// # Examples
/// ```
/// use eventbroker::BrokerConfig;
/// use eventbroker_server::config::BackendConfig;
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), eventbroker::ProviderError> {
/// let provider = eventbroker_server::connect(&BackendConfig::default(), &BrokerConfig::default()).await?;
/// assert_eq!(provider.name(), "memory");
/// # Ok(())
/// # }
/// ```
pub async fn connect(
    backend: &BackendConfig,
    broker: &BrokerConfig,
) -> Result<Arc<dyn Provider>, ProviderError> {
    Ok(match backend.provider {
        ProviderKind::Memory => Arc::new(MemoryProvider::new(broker)),
        ProviderKind::Database => Arc::new(SqlProvider::connect(&backend.database, broker).await?),
        ProviderKind::Redis => Arc::new(RedisProvider::connect(&backend.redis, broker).await?),
        ProviderKind::Nats => Arc::new(NatsProvider::connect(&backend.nats, broker).await?),
    })
}
