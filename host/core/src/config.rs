//! The broker's configuration (ResolveSpec's `event_broker` section, without the backend
//! sections, which belong to the backend crates): keys, defaults and validation in one place.
//!
//! Loading from files and the environment is the service's job (`eventbroker-server`); an
//! embedding application can build a [`BrokerConfig`] in code or deserialize it with serde.
//! Every key has a default ([`Default`] impls below); [`BrokerConfig::validate`] rejects values
//! out of range with an error naming the key, instead of clamping them.

use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

/// A configuration value out of range, naming its key (`event_broker.worker_count`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {key} {reason}")]
pub struct InvalidValue {
    /// The key's full path, as written in a config file.
    pub key: String,
    /// What is wrong and what is allowed.
    pub reason: String,
}

impl InvalidValue {
    /// An error about `key`.
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        InvalidValue {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// Fails with "must be at least 1" naming the first key whose value is 0.
///
/// # Errors
/// [`InvalidValue`] for the first zero.
pub fn require_positive<'a>(
    values: impl IntoIterator<Item = (&'a str, u64)>,
) -> Result<(), InvalidValue> {
    for (key, value) in values {
        if value == 0 {
            return Err(InvalidValue::new(key, "must be at least 1"));
        }
    }
    Ok(())
}

/// Whether `publish` waits for handlers.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ProcessingMode {
    /// `publish` runs the matching handlers before returning.
    Sync,
    /// `publish` queues the event and returns (the default).
    #[default]
    Async,
}

/// Broker settings (ResolveSpec's `event_broker` section).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BrokerConfig {
    /// Whether the library's `initialize` creates a broker. `eventbroker serve` always runs one.
    pub enabled: bool,
    /// What `publish` does: `async` (queue and return) or `sync` (run handlers first).
    pub mode: ProcessingMode,
    /// Concurrent event workers.
    pub worker_count: usize,
    /// Bound of the local work queue, and (memory provider) of unfinished events.
    pub buffer_size: usize,
    /// This host's identity, recorded on the events it accepts. Defaults to the host name.
    pub instance_id: String,
    /// Consumer group shared by the hosts of one cluster.
    pub consumer_group: String,
    /// How long a publish waits for room in a full queue before failing.
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// Default deadline of one handler invocation.
    #[serde(with = "humantime_serde")]
    pub handler_timeout: Duration,
    /// How long `stop` drains queued and in-flight work before giving the rest back.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// A delivery not finished within this time is presumed abandoned and redelivered;
    /// running invocations renew it.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// Largest accepted payload (JSON-encoded).
    #[serde(with = "crate::size::serde")]
    pub max_payload: ByteSize,
    /// Retries of failed handlers.
    pub retry_policy: RetryPolicy,
    /// The memory provider.
    pub memory: MemoryConfig,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            enabled: false,
            mode: ProcessingMode::Async,
            worker_count: 10,
            buffer_size: 1000,
            instance_id: default_instance_id(),
            consumer_group: "eventbroker".into(),
            publish_timeout: Duration::from_secs(5),
            handler_timeout: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(30),
            lease: Duration::from_secs(60),
            max_payload: ByteSize::mib(1),
            retry_policy: RetryPolicy::default(),
            memory: MemoryConfig::default(),
        }
    }
}

impl BrokerConfig {
    /// How often the worker pool renews the lease of every delivery it holds (queued or
    /// running): a third of `lease`, at least 50 ms. Acknowledgement deadlines enforced by a
    /// backend (NATS `ack_wait` and `backoff`) must leave room for it.
    pub fn lease_renewal_period(&self) -> Duration {
        (self.lease / 3).max(Duration::from_millis(50))
    }
}

/// The host name, or `eventbroker` if it cannot be read.
pub fn default_instance_id() -> String {
    hostname::get()
        .ok()
        .and_then(|name| name.into_string().ok())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "eventbroker".into())
}

/// Exponential backoff with jitter between retries of a failed handler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Retries after the first attempt; 0 disables retrying.
    pub max_retries: u32,
    /// Delay before the first retry.
    #[serde(with = "humantime_serde")]
    pub initial_delay: Duration,
    /// Upper bound of any delay.
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
    /// Growth factor between consecutive delays.
    pub backoff_factor: f32,
    /// Randomise each delay (up to doubling it, capped by `max_delay`) so that retries of
    /// many events do not fire together.
    pub jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 3,
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
            backoff_factor: 2.0,
            jitter: true,
        }
    }
}

impl RetryPolicy {
    /// The delay before retry number `retry` (1-based).
    pub fn delay(&self, retry: u32) -> Duration {
        use backon::BackoffBuilder;
        let mut builder = backon::ExponentialBuilder::default()
            .with_min_delay(self.initial_delay)
            .with_max_delay(self.max_delay)
            .with_factor(self.backoff_factor.max(1.0))
            .without_max_times();
        if self.jitter {
            builder = builder.with_jitter();
        }
        builder
            .build()
            .nth(retry.saturating_sub(1) as usize)
            .unwrap_or(self.max_delay)
            .min(self.max_delay)
    }
}

/// The memory provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    /// Most events kept; the least recently used finished events are evicted beyond it.
    pub max_events: usize,
    /// Finished events older than this are removed.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// How often expired events are removed.
    #[serde(with = "humantime_serde")]
    pub cleanup_interval: Duration,
    /// Events buffered per live watcher before it is cut off as too slow.
    pub watcher_buffer: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            max_events: 10_000,
            max_age: Duration::from_secs(3600),
            cleanup_interval: Duration::from_secs(60),
            watcher_buffer: 1024,
        }
    }
}

impl BrokerConfig {
    /// Checks every rule serde cannot express, with keys under `event_broker.`.
    ///
    /// # Errors
    /// [`InvalidValue`] naming the first key out of range.
    pub fn validate(&self) -> Result<(), InvalidValue> {
        require_positive([
            ("event_broker.worker_count", self.worker_count as u64),
            ("event_broker.buffer_size", self.buffer_size as u64),
            (
                "event_broker.memory.max_events",
                self.memory.max_events as u64,
            ),
            (
                "event_broker.memory.watcher_buffer",
                self.memory.watcher_buffer as u64,
            ),
        ])?;
        if self.instance_id.trim().is_empty() {
            return Err(InvalidValue::new(
                "event_broker.instance_id",
                "must not be empty",
            ));
        }
        if self.consumer_group.trim().is_empty() {
            return Err(InvalidValue::new(
                "event_broker.consumer_group",
                "must not be empty",
            ));
        }
        if self.lease.is_zero() {
            return Err(InvalidValue::new(
                "event_broker.lease",
                "must be more than 0",
            ));
        }
        if self.memory.cleanup_interval.is_zero() {
            return Err(InvalidValue::new(
                "event_broker.memory.cleanup_interval",
                "must be more than 0",
            ));
        }
        self.retry_policy.validate("event_broker.retry_policy")
    }
}

impl RetryPolicy {
    /// Checks the policy; `prefix` is where it was written (`event_broker.retry_policy`, or a
    /// handler manifest's `retry`), for the key in the error.
    ///
    /// # Errors
    /// [`InvalidValue`] naming `{prefix}.backoff_factor` or `{prefix}.initial_delay`.
    pub fn validate(&self, prefix: &str) -> Result<(), InvalidValue> {
        if !(self.backoff_factor.is_finite() && self.backoff_factor >= 1.0) {
            return Err(InvalidValue::new(
                format!("{prefix}.backoff_factor"),
                format!("must be a number >= 1.0, got {}", self.backoff_factor),
            ));
        }
        if self.initial_delay > self.max_delay {
            return Err(InvalidValue::new(
                format!("{prefix}.initial_delay"),
                format!(
                    "({:?}) must not exceed {prefix}.max_delay ({:?})",
                    self.initial_delay, self.max_delay
                ),
            ));
        }
        Ok(())
    }
}
