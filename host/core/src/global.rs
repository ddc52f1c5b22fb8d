//! The process-wide default broker, for applications that want one broker without passing a
//! handle around (ResolveSpec's `Initialize`, `Publish`, `Subscribe`, …).

use std::sync::RwLock;

use crate::broker::{Broker, BrokerError, EventHandler, Published, SubscriptionId};
use std::sync::Arc;

use crate::config::BrokerConfig;
use crate::event::Event;
use crate::provider::Provider;

static DEFAULT_BROKER: RwLock<Option<Broker>> = RwLock::new(None);

/// Builds a broker over `provider`, starts it and installs it as the default, if
/// `config.enabled` is true. Returns the broker, or `None` when the broker is disabled in
/// config.
///
/// # Errors
/// [`BrokerError::Config`] for an invalid config, and the provider's errors joining its
/// consumer group.
pub async fn initialize(
    config: &BrokerConfig,
    provider: Arc<dyn Provider>,
) -> Result<Option<Broker>, BrokerError> {
    if !config.enabled {
        tracing::info!("event broker disabled (event_broker.enabled is false)");
        return Ok(None);
    }
    config.validate()?;
    let broker = Broker::new(config.clone(), provider);
    broker.start().await?;
    set_default_broker(broker.clone());
    Ok(Some(broker))
}

/// Installs `broker` as the default, replacing any previous one (which keeps running).
pub fn set_default_broker(broker: Broker) {
    *DEFAULT_BROKER.write().unwrap_or_else(|p| p.into_inner()) = Some(broker);
}

/// The default broker, if one is installed.
pub fn default_broker() -> Option<Broker> {
    DEFAULT_BROKER
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
}

/// Removes and returns the default broker (it keeps running until stopped).
pub fn take_default_broker() -> Option<Broker> {
    DEFAULT_BROKER
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .take()
}

fn require() -> Result<Broker, BrokerError> {
    default_broker().ok_or(BrokerError::NoDefaultBroker)
}

/// [`Broker::publish`] on the default broker.
///
/// # Errors
/// [`BrokerError::NoDefaultBroker`], or the broker's publish errors.
pub async fn publish(event: Event) -> Result<Published, BrokerError> {
    require()?.publish(event).await
}

/// [`Broker::publish_async`] on the default broker.
///
/// # Errors
/// [`BrokerError::NoDefaultBroker`], or the broker's publish errors.
pub async fn publish_async(event: Event) -> Result<String, BrokerError> {
    require()?.publish_async(event).await
}

/// [`Broker::publish_sync`] on the default broker.
///
/// # Errors
/// [`BrokerError::NoDefaultBroker`], or the broker's publish errors.
pub async fn publish_sync(event: Event) -> Result<Event, BrokerError> {
    require()?.publish_sync(event).await
}

/// [`Broker::subscribe`] on the default broker.
///
/// # Errors
/// [`BrokerError::NoDefaultBroker`], or a malformed pattern.
pub fn subscribe(pattern: &str, handler: impl EventHandler) -> Result<SubscriptionId, BrokerError> {
    require()?.subscribe(pattern, handler)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventSource, EventStatus};
    use crate::handler_fn;

    #[tokio::test]
    async fn default_broker_round_trip() {
        let memory = || Arc::new(crate::MemoryProvider::default());
        let disabled = initialize(&BrokerConfig::default(), memory())
            .await
            .expect("disabled is fine");
        assert!(disabled.is_none());
        let config = BrokerConfig {
            enabled: true,
            ..BrokerConfig::default()
        };
        let broker = initialize(&config, memory())
            .await
            .expect("init")
            .expect("enabled");
        subscribe("a.*", handler_fn(|_, _| async { Ok(()) })).expect("subscribe");
        let done = publish_sync(Event::new(EventSource::System, "a.b", ""))
            .await
            .expect("publish");
        assert_eq!(done.status, EventStatus::Completed);
        assert_eq!(done.instance_id, broker.instance_id());
        publish_async(Event::new(EventSource::System, "a.c", ""))
            .await
            .expect("async");
        let taken = take_default_broker().expect("installed");
        taken.stop().await.expect("stop");
        let err = publish_async(Event::new(EventSource::System, "a.c", ""))
            .await
            .unwrap_err();
        assert!(matches!(err, BrokerError::NoDefaultBroker), "{err}");
    }
}
