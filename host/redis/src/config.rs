//! The `event_broker.redis` section: the one place for its keys, defaults and validation.

use std::time::Duration;

use eventbroker::config::{InvalidValue, require_positive};
use serde::{Deserialize, Serialize};

/// The Redis Streams provider (see `docs/providers/redis.md`).
///
/// Every command runs with `command_timeout`; blocking reads block at most `block_time`, so no
/// call waits forever.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Full URL (`redis://[user:password@]host:port/db`, `rediss://…` for TLS); when set,
    /// host, port, password, db and tls are ignored.
    pub url: Option<String>,
    /// Stream key; every other key of the provider starts with it (`{stream_name}:…`).
    pub stream_name: String,
    /// The Redis consumer group the broker's workers join (it replaces
    /// `event_broker.consumer_group` for this provider). Created at start, from the beginning
    /// of the stream.
    pub consumer_group: String,
    /// Server host.
    pub host: String,
    /// Server port.
    pub port: u16,
    /// Password (empty for none).
    pub password: String,
    /// Database number.
    pub db: i64,
    /// Connect with TLS (host/port form; the URL form uses `rediss://`).
    pub tls: bool,
    /// Approximate stream length bound: older entries are trimmed, but never one that a
    /// consumer group has not finished (pending or not yet read).
    pub max_len: u64,
    /// Longest `BLOCK` of one `XREADGROUP`; also bounds how long closing a consumer waits.
    #[serde(with = "humantime_serde")]
    pub block_time: Duration,
    /// Most entries read per `XREADGROUP`/`XAUTOCLAIM` (`COUNT`).
    pub batch_size: usize,
    /// Entries idle (unacknowledged, not kept alive) longer than this are claimed by another
    /// consumer. Default: the broker's `lease`.
    #[serde(default, with = "humantime_serde")]
    pub claim_idle: Option<Duration>,
    /// How often each consumer looks for idle entries to claim (`XAUTOCLAIM`); at most half
    /// the claim idle time.
    #[serde(with = "humantime_serde")]
    pub claim_interval: Duration,
    /// Consumers with no pending entries that have been idle this long are deleted.
    #[serde(with = "humantime_serde")]
    pub consumer_idle_timeout: Duration,
    /// Finished (completed or failed) events are removed this long after they finished.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// How often trimming, retention cleanup and idle-consumer removal run.
    #[serde(with = "humantime_serde")]
    pub maintenance_interval: Duration,
    /// Timeout of every command (and of connecting).
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Events buffered per live watcher (SSE/WebSocket) before it is cut off as too slow.
    pub watcher_buffer: usize,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: None,
            stream_name: "resolvespec:events".into(),
            consumer_group: "resolvespec-workers".into(),
            host: "localhost".into(),
            port: 6379,
            password: String::new(),
            db: 0,
            tls: false,
            max_len: 10_000,
            block_time: Duration::from_secs(1),
            batch_size: 100,
            claim_idle: None,
            claim_interval: Duration::from_secs(5),
            consumer_idle_timeout: Duration::from_secs(3600),
            retention: Duration::from_secs(24 * 3600),
            maintenance_interval: Duration::from_secs(10),
            command_timeout: Duration::from_secs(5),
            watcher_buffer: 1024,
        }
    }
}

impl RedisConfig {
    /// Checks every rule serde cannot express, with keys under `event_broker.redis.`.
    ///
    /// # Errors
    /// [`InvalidValue`] naming the first key out of range.
    pub fn validate(&self) -> Result<(), InvalidValue> {
        if self.stream_name.trim().is_empty() {
            return Err(InvalidValue::new(
                "event_broker.redis.stream_name",
                "must not be empty",
            ));
        }
        if self.consumer_group.trim().is_empty() {
            return Err(InvalidValue::new(
                "event_broker.redis.consumer_group",
                "must not be empty",
            ));
        }
        require_positive([
            ("event_broker.redis.max_len", self.max_len),
            ("event_broker.redis.batch_size", self.batch_size as u64),
            (
                "event_broker.redis.watcher_buffer",
                self.watcher_buffer as u64,
            ),
        ])?;
        let at_least = |key: &str, value: Duration, least: Duration| {
            if value < least {
                Err(InvalidValue::new(
                    key,
                    format!("must be at least {least:?}, got {value:?}"),
                ))
            } else {
                Ok(())
            }
        };
        at_least(
            "event_broker.redis.block_time",
            self.block_time,
            Duration::from_millis(1),
        )?;
        at_least(
            "event_broker.redis.claim_interval",
            self.claim_interval,
            Duration::from_millis(10),
        )?;
        at_least(
            "event_broker.redis.retention",
            self.retention,
            Duration::from_secs(1),
        )?;
        at_least(
            "event_broker.redis.maintenance_interval",
            self.maintenance_interval,
            Duration::from_millis(100),
        )?;
        at_least(
            "event_broker.redis.command_timeout",
            self.command_timeout,
            Duration::from_millis(100),
        )?;
        if let Some(idle) = self.claim_idle {
            at_least(
                "event_broker.redis.claim_idle",
                idle,
                Duration::from_millis(1),
            )?;
        }
        Ok(())
    }
}
