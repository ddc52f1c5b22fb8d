//! The `handlers` section: where handlers live, their default limits and the instance pool;
//! the one place for its keys, defaults and validation.

use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use eventbroker::config::{InvalidValue, require_positive};
use serde::{Deserialize, Serialize};

/// WebAssembly handlers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HandlersConfig {
    /// Directory of `NAME.wasm` + `NAME.toml` handlers, loaded at start and watched.
    pub dir: PathBuf,
    /// Where compiled components are cached (default: the user's cache directory, e.g.
    /// `~/.cache/eventbroker`; no cache when the platform has none). Created readable and
    /// writable by the host's user only; a directory others can write is not used.
    pub cache_dir: Option<PathBuf>,
    /// Limits applied when a manifest does not set them.
    pub defaults: HandlerDefaults,
    /// Capacity of the instance pool shared by all handlers.
    pub pool: PoolConfig,
    /// Watch `dir` and apply changes while running (hot reload).
    pub watch: bool,
    /// How long a changed file must stay unchanged before it is loaded.
    #[serde(with = "humantime_serde")]
    pub debounce: Duration,
    /// Where the host's handlers come from: `directory` (its own `dir` only), `store` (the
    /// cluster handler store only) or `both` (the store, and files of `dir` published to it).
    /// Unset: `both` on a backend a cluster shares (PostgreSQL, Redis, NATS), `directory`
    /// otherwise (memory, SQLite: they have no store).
    pub source: Option<HandlerSource>,
    /// The cluster handler store: how hosts follow it.
    pub store: StoreConfig,
    /// Canary trials (`deploy --canary`).
    pub canary: CanaryConfig,
}

/// Where a host's handlers come from (`handlers.source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HandlerSource {
    /// The handlers directory of this host only: deploys write files, nothing is shared.
    Directory,
    /// The cluster handler store only; the directory is neither read nor watched.
    Store,
    /// The cluster handler store, and the directory as a way in: at start a file is published
    /// for handlers the store does not have, and a file changed while running is deployed to
    /// the whole cluster.
    Both,
}

/// How a host follows the cluster handler store (`handlers.store`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// How often the host reads the store even without a change notification (notifications
    /// can be lost when a connection drops).
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// How often the host reports what it runs (and judges running canaries); a report not
    /// renewed for three intervals drops the host from the listing.
    #[serde(with = "humantime_serde")]
    pub report_interval: Duration,
    /// Releases of each handler the store keeps (for rollback); the stable release and a
    /// running canary are always kept.
    pub keep_versions: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            poll_interval: Duration::from_secs(5),
            report_interval: Duration::from_secs(2),
            keep_versions: 5,
        }
    }
}

/// Canary trials (`handlers.canary`): how a canary is judged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CanaryConfig {
    /// How long a trial runs before the canary is promoted (when no failure rate is worse).
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Canary invocations across the cluster before any automatic decision.
    pub min_sample: u64,
    /// How many points (0–1) the canary's rate of any failure kind (trap, out of fuel,
    /// timeout, memory limit, guest fail) may exceed the stable version's before it is rolled
    /// back.
    pub tolerance: f64,
}

impl Default for CanaryConfig {
    fn default() -> Self {
        CanaryConfig {
            window: Duration::from_secs(300),
            min_sample: 100,
            tolerance: 0.05,
        }
    }
}

impl Default for HandlersConfig {
    fn default() -> Self {
        HandlersConfig {
            dir: PathBuf::from("handlers"),
            cache_dir: None,
            defaults: HandlerDefaults::default(),
            pool: PoolConfig::default(),
            watch: true,
            debounce: Duration::from_millis(500),
            source: None,
            store: StoreConfig::default(),
            canary: CanaryConfig::default(),
        }
    }
}

impl HandlersConfig {
    /// The compiled-component cache directory in effect: `cache_dir`, else the default.
    pub fn cache_dir(&self) -> Option<PathBuf> {
        self.cache_dir.clone().or_else(default_cache_dir)
    }
}

/// `~/.cache/eventbroker` (or the platform's equivalent); `None` when the platform has no
/// cache directory (e.g. no home directory), so that compiled code is never loaded from the
/// working directory by default.
pub fn default_cache_dir() -> Option<PathBuf> {
    dirs::cache_dir().map(|dir| dir.join("eventbroker"))
}

/// How a handler's instances are managed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum InstancePolicy {
    /// A new instance for every event: no state survives between events (the default).
    #[default]
    Fresh,
    /// A pool of warm instances reused across events; one that traps is discarded.
    Reuse,
}

/// Per-invocation limits of a handler, used where its manifest is silent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HandlerDefaults {
    /// Fuel (roughly, WebAssembly instructions) one invocation may burn.
    pub fuel: u64,
    /// Linear memory one instance may use.
    #[serde(with = "eventbroker::size::serde")]
    pub memory: ByteSize,
    /// Wall-clock deadline of one invocation.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Invocations of one handler running at once.
    pub concurrency: usize,
    /// `fresh` or `reuse`.
    pub instances: InstancePolicy,
    /// Log lines (host `log` plus stdout/stderr lines) one invocation may write; the rest are
    /// dropped and counted.
    pub max_log_lines: usize,
    /// Bytes of log one invocation may write.
    #[serde(with = "eventbroker::size::serde")]
    pub max_log_bytes: ByteSize,
    /// Derived events one invocation may publish.
    pub max_publishes: u32,
}

impl Default for HandlerDefaults {
    fn default() -> Self {
        HandlerDefaults {
            fuel: 100_000_000,
            memory: ByteSize::mib(64),
            timeout: Duration::from_secs(10),
            concurrency: 16,
            instances: InstancePolicy::Fresh,
            max_log_lines: 100,
            max_log_bytes: ByteSize::kib(64),
            max_publishes: 100,
        }
    }
}

/// The pooling allocator's capacity, shared by every handler of the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Instances (of all handlers) alive at once: running invocations, instances kept warm by
    /// `reuse` (evicted when another invocation needs the slot) and component loads. An
    /// invocation that finds every slot running for 100 ms is deferred (`busy`) without
    /// spending an attempt.
    pub instances: u32,
    /// Largest memory limit any handler may ask for.
    #[serde(with = "eventbroker::size::serde")]
    pub max_memory: ByteSize,
    /// Largest table any instance may have (large for Python/JavaScript components).
    pub table_elements: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            instances: 256,
            max_memory: ByteSize::mib(512),
            table_elements: 100_000,
        }
    }
}

impl HandlersConfig {
    /// Checks every rule serde cannot express, with keys under `handlers.`.
    ///
    /// # Errors
    /// [`InvalidValue`] naming the first key out of range.
    pub fn validate(&self) -> Result<(), InvalidValue> {
        require_positive([
            ("handlers.pool.instances", u64::from(self.pool.instances)),
            (
                "handlers.pool.table_elements",
                self.pool.table_elements as u64,
            ),
            ("handlers.pool.max_memory", self.pool.max_memory.as_u64()),
            (
                "handlers.defaults.concurrency",
                self.defaults.concurrency as u64,
            ),
            ("handlers.defaults.memory", self.defaults.memory.as_u64()),
        ])?;
        require_positive([
            (
                "handlers.store.keep_versions",
                self.store.keep_versions as u64,
            ),
            ("handlers.canary.min_sample", self.canary.min_sample),
        ])?;
        for (key, value) in [
            ("handlers.store.poll_interval", self.store.poll_interval),
            ("handlers.store.report_interval", self.store.report_interval),
            ("handlers.canary.window", self.canary.window),
        ] {
            if value.is_zero() {
                return Err(InvalidValue::new(key, "must be more than 0"));
            }
        }
        if !(0.0..1.0).contains(&self.canary.tolerance) {
            return Err(InvalidValue::new(
                "handlers.canary.tolerance",
                format!("({}) must be at least 0 and below 1", self.canary.tolerance),
            ));
        }
        if self.defaults.timeout.is_zero() {
            return Err(InvalidValue::new(
                "handlers.defaults.timeout",
                "must be more than 0",
            ));
        }
        if self.defaults.memory > self.pool.max_memory {
            return Err(InvalidValue::new(
                "handlers.defaults.memory",
                format!(
                    "({}) must not exceed handlers.pool.max_memory ({})",
                    self.defaults.memory, self.pool.max_memory
                ),
            ));
        }
        Ok(())
    }
}
