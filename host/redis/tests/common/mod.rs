//! The Redis backend under test: a stream name (key prefix) of its own on the local server,
//! deleted when the test is done; skipped loudly when Redis is unreachable.

#![allow(dead_code)]

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Duration;

use eventbroker::config::BrokerConfig;
use eventbroker::provider::{Provider, ProviderError};
use eventbroker_redis::{RedisConfig, RedisProvider};
use eventbroker_testkit::backends::{Backend, OWN_GROUP, Open, base_config};
use eventbroker_testkit::{services, unique_suffix};

/// A broker config with the Redis section it runs on (derefs to the broker's part).
#[derive(Debug, Clone)]
pub struct Setup {
    /// The broker's settings.
    pub broker: BrokerConfig,
    /// The `event_broker.redis` section.
    pub redis: RedisConfig,
}

impl Deref for Setup {
    type Target = BrokerConfig;
    fn deref(&self) -> &BrokerConfig {
        &self.broker
    }
}

impl DerefMut for Setup {
    fn deref_mut(&mut self) -> &mut BrokerConfig {
        &mut self.broker
    }
}

/// The address of the Redis server (`REDIS_ADDR`, default 127.0.0.1:6379).
pub fn redis_addr() -> String {
    std::env::var("REDIS_ADDR").unwrap_or_else(|_| "127.0.0.1:6379".into())
}

/// Opens a provider as `setup` configures it.
pub async fn open(setup: &Setup) -> Result<Arc<dyn Provider>, ProviderError> {
    Ok(Arc::new(
        RedisProvider::connect(&setup.redis, &setup.broker).await?,
    ))
}

/// Deletes every key under `prefix` (blocking; run off the test's runtime).
pub fn delete_keys(url: &str, prefix: &str) {
    let Ok(client) = redis::Client::open(url) else {
        return;
    };
    let timeout = Duration::from_secs(5);
    let Ok(mut conn) = client.get_connection_with_timeout(timeout) else {
        return;
    };
    let _ = conn.set_read_timeout(Some(timeout));
    let keys: Vec<String> =
        match redis::Commands::scan_match::<_, String>(&mut conn, format!("{prefix}*")) {
            Ok(iter) => iter.filter_map(Result::ok).collect(),
            Err(_) => return,
        };
    for chunk in keys.chunks(500) {
        let _: Result<i64, _> = redis::cmd("DEL").arg(chunk).query(&mut conn);
    }
}

/// Redis Streams at [`redis_addr`], on a stream name of its own, for the conformance suite;
/// its keys are deleted when it is dropped.
pub async fn backend() -> Option<Backend> {
    let addr = redis_addr();
    if !services::available("Redis", &addr) {
        return None;
    }
    let mut broker = base_config();
    // Requeue counts a Redis delivery idle this long as abandoned (the suite's leases are
    // short).
    broker.lease = Duration::from_secs(2);
    let url = format!("redis://{addr}/0");
    let redis = RedisConfig {
        url: Some(url.clone()),
        stream_name: format!("eb-test:{}", unique_suffix()),
        consumer_group: OWN_GROUP.into(),
        // Short reads and claim checks, so that closes and lease expiries show quickly.
        block_time: Duration::from_millis(200),
        claim_interval: Duration::from_millis(100),
        ..RedisConfig::default()
    };
    let prefix = redis.stream_name.clone();
    let setup = Setup { broker, redis };
    Some(
        Backend::new("redis", move |options: Open| {
            let mut setup = setup.clone();
            setup.broker.consumer_group = options.group.clone();
            setup.redis.consumer_group = options.group;
            if let Some(buffer) = options.watcher_buffer {
                setup.redis.watcher_buffer = buffer;
            }
            async move { open(&setup).await }
        })
        .with_cleanup(move || delete_keys(&url, &prefix)),
    )
}
