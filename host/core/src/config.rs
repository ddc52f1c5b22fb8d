//! Typed configuration: defaults (one home, [`Default`] impls below), then a YAML or TOML file
//! (chosen by extension) with `${VAR}` / `${VAR:-default}` expansion, then environment
//! overrides.
//!
//! Expansion happens after the file is parsed, inside its string values (not keys): whatever a
//! variable holds (`#`, `: `, quotes, newlines, `$`) becomes exactly that value's text and can
//! never change the file's structure. Numbers and booleans may be written as strings
//! (`worker_count: "${WORKERS:-10}"`), which TOML requires for references anyway.
//!
//! Environment overrides are `EVENTBROKER_` followed by the key path in upper case with `__`
//! between levels, e.g. `EVENTBROKER_EVENT_BROKER__WORKER_COUNT=4` or
//! `EVENTBROKER_SERVER__LISTEN=0.0.0.0:8080`. Variables without `__` after the prefix (such as
//! `EVENTBROKER_SERVER_URL`, used by the CLI) are not configuration keys.
//!
//! Unknown keys and bad values are errors naming the key and, for closed sets, the allowed
//! values.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Serialize};

/// The whole host configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The broker: provider, mode, workers, retries and backend settings.
    pub event_broker: BrokerConfig,
    /// The HTTP server of `eventbroker serve`.
    pub server: ServerConfig,
    /// WebAssembly handlers: where they live and their default limits.
    pub handlers: HandlersConfig,
    /// Logging.
    pub log: LogConfig,
    /// PostgreSQL change capture (off while `tables` is empty).
    pub capture: CaptureConfig,
}

/// Which backend stores and delivers events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// In-process, bounded, not durable (the default).
    #[default]
    Memory,
    /// SQLite or PostgreSQL.
    Database,
    /// Redis Streams.
    Redis,
    /// NATS JetStream.
    Nats,
}

impl ProviderKind {
    /// The name used in config.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Memory => "memory",
            ProviderKind::Database => "database",
            ProviderKind::Redis => "redis",
            ProviderKind::Nats => "nats",
        }
    }
}

/// Whether `publish` waits for handlers.
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
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// Whether the library's `initialize` creates a broker. `eventbroker serve` always runs one.
    pub enabled: bool,
    /// Backend: `memory`, `database`, `redis` or `nats`.
    pub provider: ProviderKind,
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
    pub max_payload: ByteSize,
    /// Retries of failed handlers.
    pub retry_policy: RetryPolicy,
    /// The memory provider.
    pub memory: MemoryConfig,
    /// The Redis provider.
    pub redis: RedisConfig,
    /// The NATS provider.
    pub nats: NatsConfig,
    /// The database provider.
    pub database: DatabaseConfig,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            enabled: false,
            provider: ProviderKind::Memory,
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
            redis: RedisConfig::default(),
            nats: NatsConfig::default(),
            database: DatabaseConfig::default(),
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

/// Storage of the NATS JetStream stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NatsStorage {
    /// On disk (the default).
    #[default]
    File,
    /// In memory.
    Memory,
}

/// The NATS JetStream provider.
///
/// Events go to a JetStream stream on subjects `{prefix}.{source}.{type}` (the prefix is the
/// first entry of `subjects` without its trailing `.>`); their current state lives in a
/// key-value bucket keyed by event id; every consumer group is a durable pull consumer.
/// See `docs/providers/nats.md`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL, or several separated by commas (`nats://`, `tls://`). Default
    /// `nats://localhost:4222`.
    pub url: String,
    /// JetStream stream name. Default `RESOLVESPEC_EVENTS`.
    pub stream_name: String,
    /// Subjects the stream captures; the first must have the form `prefix.>` and events are
    /// published under that prefix. Default `["events.>"]`.
    pub subjects: Vec<String>,
    /// `file` (durable, the default) or `memory` (lost when the server restarts); applies to
    /// the stream and the key-value bucket.
    pub storage: NatsStorage,
    /// Events (stream messages and their state) older than this are discarded, finished or
    /// not. Default 24h.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Publishes with an event id seen within this window are dropped by the server and
    /// reported as duplicates. Default 2m; at most `max_age`.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// Key-value bucket holding each event's current state. Default: `{stream_name}_STATE`.
    pub kv_bucket: Option<String>,
    /// User name (with `password`). Default none.
    pub user: Option<String>,
    /// Password (with `user`). Default none.
    pub password: Option<String>,
    /// Authentication token. Default none.
    pub token: Option<String>,
    /// NATS credentials file (JWT + NKey seed, `.creds`). Default none.
    pub creds_file: Option<PathBuf>,
    /// TLS settings.
    pub tls: NatsTlsConfig,
    /// How long the server waits for an acknowledgement before redelivering; running
    /// invocations extend it with in-progress acknowledgements. Default: the broker's `lease`.
    #[serde(default, with = "humantime_serde::option")]
    pub ack_wait: Option<Duration>,
    /// Most deliveries of one event to one consumer group (counting retries and
    /// redeliveries after a crash); when reached the event is recorded as `failed` (a dead
    /// letter). Default: unlimited (the broker's `retry_policy` bounds handler retries).
    pub max_deliver: Option<u32>,
    /// Redelivery delays after an acknowledgement timeout, one per delivery (the last one
    /// repeats); when set, the first entry replaces `ack_wait`. Default empty (redeliver after
    /// `ack_wait`).
    #[serde(with = "duration_list")]
    pub backoff: Vec<Duration>,
    /// Events buffered per live watcher (SSE/WebSocket) before it is cut off as too slow.
    /// Default 1024.
    pub watcher_buffer: usize,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://localhost:4222".into(),
            stream_name: "RESOLVESPEC_EVENTS".into(),
            subjects: vec!["events.>".into()],
            storage: NatsStorage::File,
            max_age: Duration::from_secs(24 * 3600),
            duplicate_window: Duration::from_secs(120),
            kv_bucket: None,
            user: None,
            password: None,
            token: None,
            creds_file: None,
            tls: NatsTlsConfig::default(),
            ack_wait: None,
            max_deliver: None,
            backoff: Vec::new(),
            watcher_buffer: 1024,
        }
    }
}

impl NatsConfig {
    /// The key-value bucket in effect: `kv_bucket`, or `{stream_name}_STATE`.
    pub fn kv_bucket(&self) -> String {
        self.kv_bucket
            .clone()
            .unwrap_or_else(|| format!("{}_STATE", self.stream_name))
    }

    /// Checks every acknowledgement deadline the server applies against the broker's lease
    /// renewal period (`renewal`, see [`BrokerConfig::lease_renewal_period`]): `ack_wait`, and
    /// each `backoff` entry (the first replaces `ack_wait`, the others are the deadlines of later
    /// deliveries) must be at least two renewal periods, so that a running handler's
    /// in-progress acknowledgements always reach the server before its deadline and the event
    /// is not redelivered while it runs.
    ///
    /// # Errors
    /// The key at fault and a reason that names `event_broker.lease` and the bound.
    pub fn check_deadlines(&self, renewal: Duration) -> Result<(), (&'static str, String)> {
        let least = renewal * 2;
        let explain = |what: String, value: Duration| {
            format!(
                "{what}is {value:?}, shorter than twice the lease renewal period \
                 (event_broker.lease / 3 = {renewal:?}): the server would redeliver the event \
                 while its handler still runs. Set it to at least {least:?}, or lower \
                 event_broker.lease to at most {:?}",
                value * 3 / 2
            )
        };
        if let Some(ack_wait) = self.ack_wait
            && ack_wait < least
        {
            return Err(("event_broker.nats.ack_wait", explain("".into(), ack_wait)));
        }
        for (n, delay) in self.backoff.iter().enumerate() {
            if *delay < least {
                return Err((
                    "event_broker.nats.backoff",
                    explain(format!("entry {n} "), *delay),
                ));
            }
        }
        Ok(())
    }
}

/// TLS for the NATS connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct NatsTlsConfig {
    /// Require TLS even when the URL scheme is `nats://` (a `tls://` URL always requires it).
    /// Default false.
    pub required: bool,
    /// PEM file of root certificates to trust in addition to the system's. Default none.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for servers that verify clients (with `key_file`).
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
}

/// A list of durations in humantime form (`["1s", "5s", "30s"]`).
mod duration_list {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(list: &[Duration], serializer: S) -> Result<S::Ok, S::Error> {
        list.iter()
            .map(|d| humantime_serde::Serde::from(*d))
            .collect::<Vec<_>>()
            .serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<Duration>, D::Error> {
        let list = Vec::<humantime_serde::Serde<Duration>>::deserialize(deserializer)?;
        Ok(list.into_iter().map(|d| d.into_inner()).collect())
    }
}

/// The database provider (SQLite or PostgreSQL, chosen by the URL's scheme).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// Connection URL: `postgres://user:pass@host/db` or `sqlite://path/to/file.db` (the file
    /// and its directory are created if missing). Default `sqlite://eventbroker.db`.
    pub url: String,
    /// Name of the events table (a plain SQL identifier: letters, digits and `_`, starting
    /// with a letter or `_`, at most 40 characters). The provider's other tables are named
    /// after it (`<table>_deliveries`, `<table>_groups`, `<table>_migrations`). Default `events`.
    pub table_name: String,
    /// How often consumers and watchers look for new work when no notification arrived
    /// (PostgreSQL wakes them with `LISTEN/NOTIFY`; SQLite relies on it for other processes).
    /// Default 1s.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Largest connection pool. Default 10.
    pub max_connections: u32,
    /// How long to wait for a connection (at start and from the pool). Default 10s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Most deliveries claimed by one query. Default 64.
    pub batch_size: usize,
    /// How often expired leases (a host that died mid-event) are returned to `pending`.
    /// Expired deliveries are claimable at once regardless; this resets their status.
    /// Default 10s.
    #[serde(with = "humantime_serde")]
    pub rescue_interval: Duration,
    /// Events buffered per live watcher before it is cut off as too slow. Default 1024.
    pub watcher_buffer: usize,
    /// Longest time one group-commit batch of writes may take, including re-running its
    /// writes one by one after a failure; writes still unfinished then fail. A database
    /// found unreachable makes every write fail at once until it answers again. Default 10s.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: "sqlite://eventbroker.db".into(),
            table_name: "events".into(),
            poll_interval: Duration::from_secs(1),
            max_connections: 10,
            connect_timeout: Duration::from_secs(10),
            batch_size: 64,
            rescue_interval: Duration::from_secs(10),
            watcher_buffer: 1024,
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// A change that PostgreSQL change capture publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaptureOperation {
    /// `INSERT`, published as `schema.table.create`.
    Create,
    /// `UPDATE`, published as `schema.table.update`.
    Update,
    /// `DELETE`, published as `schema.table.delete`.
    Delete,
}

impl CaptureOperation {
    /// The operation's name in event types.
    pub fn as_str(self) -> &'static str {
        match self {
            CaptureOperation::Create => "create",
            CaptureOperation::Update => "update",
            CaptureOperation::Delete => "delete",
        }
    }

    /// The SQL trigger event that produces it.
    pub fn trigger_event(self) -> &'static str {
        match self {
            CaptureOperation::Create => "INSERT",
            CaptureOperation::Update => "UPDATE",
            CaptureOperation::Delete => "DELETE",
        }
    }
}

/// PostgreSQL change capture: `eventbroker serve` publishes `schema.table.create|update|delete`
/// events (source `database`) for every committed change of the watched tables.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureConfig {
    /// Connection URL of the watched database (`postgres://…`); required when `tables` is set.
    pub url: String,
    /// Watched tables as `schema.table` (plain identifiers, case-sensitive). Empty: capture off.
    pub tables: Vec<String>,
    /// Which changes are captured.
    pub operations: Vec<CaptureOperation>,
    /// How often the outbox is polled when no notification arrives.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Outbox rows published per transaction.
    pub batch_size: usize,
    /// Schema (in the watched database) holding the outbox table and the trigger function.
    pub schema: String,
    /// Install (or update) the trigger function, triggers and outbox when the host starts.
    /// Off: install them with `eventbroker capture install`.
    pub install: bool,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            url: String::new(),
            tables: Vec::new(),
            operations: vec![
                CaptureOperation::Create,
                CaptureOperation::Update,
                CaptureOperation::Delete,
            ],
            poll_interval: Duration::from_secs(1),
            batch_size: 100,
            schema: "eventbroker".into(),
            install: true,
        }
    }
}

impl CaptureConfig {
    /// Whether capture is on (some table is watched).
    pub fn enabled(&self) -> bool {
        !self.tables.is_empty()
    }
}

/// The HTTP server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: String,
    /// One bearer token for every `/v1` route (admin scope). When any of `token`,
    /// `admin_token` or `publish_token` is set, every `/v1` route needs a token.
    pub token: Option<String>,
    /// Bearer token of the admin scope: deploy, remove, re-run, and everything else.
    pub admin_token: Option<String>,
    /// Bearer token of the publish scope: publishing and reading. Set alone, admin routes
    /// are refused.
    pub publish_token: Option<String>,
    /// When set, `/metrics` needs this bearer token (or an admin-scope one); open otherwise.
    pub metrics_token: Option<String>,
    /// Allow listening on a non-loopback address without any token (a proxy in front
    /// authenticates).
    pub allow_unauthenticated: bool,
    /// `Host` values accepted besides `localhost`, `127.0.0.1`, `[::1]` and the listen address
    /// (`host` or `host:port`); `*` accepts any.
    pub allowed_hosts: Vec<String>,
    /// Origins (`https://app.example`) whose pages may open WebSockets and send
    /// state-changing requests, besides the host's own; `*` allows any.
    pub allowed_origins: Vec<String>,
    /// Largest accepted request body (component uploads excepted).
    pub body_limit: ByteSize,
    /// Largest accepted component upload (component plus manifest).
    pub upload_limit: ByteSize,
    /// Events in one `POST /v1/events/batch`.
    pub max_batch: usize,
    /// Interval of keep-alive comments on `GET /v1/stream`.
    #[serde(with = "humantime_serde")]
    pub sse_keep_alive: Duration,
    /// WebSocket clients (`GET /v1/ws`).
    pub websocket: WebSocketConfig,
}

/// Per-connection limits of WebSocket clients (`GET /v1/ws`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    /// Largest message a client may send; a larger one closes the connection (code 1009).
    pub max_message_size: ByteSize,
    /// Publishes per second a connection may sustain (token bucket); more are refused with
    /// a `rate_limited` error.
    pub publish_rate: u32,
    /// Publishes a connection may make in a burst above the rate.
    pub publish_burst: u32,
    /// Messages queued for a client; a client that lets it fill is disconnected (code 1008,
    /// with the reason) rather than slowing the broker.
    pub outbound_buffer: usize,
    /// Patterns one connection may subscribe to at once.
    pub max_subscriptions: usize,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        WebSocketConfig {
            max_message_size: ByteSize::kib(64),
            publish_rate: 100,
            publish_burst: 100,
            outbound_buffer: 1024,
            max_subscriptions: 32,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8080".into(),
            token: None,
            admin_token: None,
            publish_token: None,
            metrics_token: None,
            allow_unauthenticated: false,
            allowed_hosts: Vec::new(),
            allowed_origins: Vec::new(),
            body_limit: ByteSize::mib(2),
            upload_limit: ByteSize::mib(64),
            max_batch: 1000,
            sse_keep_alive: Duration::from_secs(15),
            websocket: WebSocketConfig::default(),
        }
    }
}

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

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `eventbroker=debug`; `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// The file formats a config file may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    /// `.yaml` / `.yml`.
    Yaml,
    /// `.toml`.
    Toml,
}

impl FileFormat {
    /// The format of `path`, by extension.
    ///
    /// # Errors
    /// [`ConfigError::Format`] for other extensions.
    pub fn of(path: &Path) -> Result<Self, ConfigError> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("yaml" | "yml") => Ok(FileFormat::Yaml),
            Some("toml") => Ok(FileFormat::Toml),
            _ => Err(ConfigError::Format(path.to_path_buf())),
        }
    }
}

/// YAML for figment, through the maintained `serde_yaml_ng`.
struct Yaml;

impl Format for Yaml {
    type Error = serde_yaml_ng::Error;
    const NAME: &'static str = "YAML";

    fn from_str<T: serde::de::DeserializeOwned>(string: &str) -> Result<T, Self::Error> {
        serde_yaml_ng::from_str(string)
    }
}

/// The prefix of configuration environment variables.
pub const ENV_PREFIX: &str = "EVENTBROKER_";

impl Config {
    /// Defaults, then the file at `path` (if any), then `EVENTBROKER_…__…` variables.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, variable or key at fault.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let file = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                Some((FileFormat::of(path)?, text))
            }
            None => None,
        };
        Self::build(file.as_ref().map(|(format, text)| (*format, text.as_str())))
    }

    /// Like [`Config::load`] with the file's text given directly.
    ///
    /// # Errors
    /// [`ConfigError`] naming the variable or key at fault.
    pub fn from_text(format: FileFormat, text: &str) -> Result<Config, ConfigError> {
        Self::build(Some((format, text)))
    }

    fn build(file: Option<(FileFormat, &str)>) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some((format, text)) = file {
            figment = figment.merge(ExpandedFile::parse(format, text)?);
        }
        let env = Env::prefixed(ENV_PREFIX)
            .filter(|key| key.as_str().contains("__"))
            .split("__");
        // Lossy: a number or boolean given as a string (an expanded `${VAR}`) is converted.
        let config: Config = figment
            .merge(env)
            .extract_lossy()
            .map_err(|e| ConfigError::Invalid(Box::new(e)))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks rules serde cannot express.
    ///
    /// # Errors
    /// [`ConfigError::Value`] naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let broker = &self.event_broker;
        let positive = [
            ("event_broker.worker_count", broker.worker_count),
            ("event_broker.buffer_size", broker.buffer_size),
            ("event_broker.memory.max_events", broker.memory.max_events),
            (
                "event_broker.memory.watcher_buffer",
                broker.memory.watcher_buffer,
            ),
            (
                "event_broker.database.watcher_buffer",
                broker.database.watcher_buffer,
            ),
            (
                "event_broker.redis.watcher_buffer",
                broker.redis.watcher_buffer,
            ),
            (
                "event_broker.nats.watcher_buffer",
                broker.nats.watcher_buffer,
            ),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(ConfigError::Value {
                    key,
                    reason: "must be at least 1".into(),
                });
            }
        }
        if broker.instance_id.trim().is_empty() {
            return Err(ConfigError::Value {
                key: "event_broker.instance_id",
                reason: "must not be empty".into(),
            });
        }
        if broker.consumer_group.trim().is_empty() {
            return Err(ConfigError::Value {
                key: "event_broker.consumer_group",
                reason: "must not be empty".into(),
            });
        }
        let policy = &broker.retry_policy;
        if !(policy.backoff_factor.is_finite() && policy.backoff_factor >= 1.0) {
            return Err(ConfigError::Value {
                key: "event_broker.retry_policy.backoff_factor",
                reason: format!("must be a number >= 1.0, got {}", policy.backoff_factor),
            });
        }
        if policy.initial_delay > policy.max_delay {
            return Err(ConfigError::Value {
                key: "event_broker.retry_policy.initial_delay",
                reason: "must not exceed retry_policy.max_delay".into(),
            });
        }
        if broker.database.write_timeout.is_zero() {
            return Err(ConfigError::Value {
                key: "event_broker.database.write_timeout",
                reason: "must be more than 0".into(),
            });
        }
        let websocket = &self.server.websocket;
        let positive = [
            (
                "server.websocket.publish_rate",
                websocket.publish_rate as usize,
            ),
            (
                "server.websocket.publish_burst",
                websocket.publish_burst as usize,
            ),
            (
                "server.websocket.outbound_buffer",
                websocket.outbound_buffer,
            ),
            (
                "server.websocket.max_subscriptions",
                websocket.max_subscriptions,
            ),
            (
                "server.websocket.max_message_size",
                websocket.max_message_size.as_u64() as usize,
            ),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(ConfigError::Value {
                    key,
                    reason: "must be at least 1".into(),
                });
            }
        }
        if broker.provider == ProviderKind::Nats {
            broker
                .nats
                .check_deadlines(broker.lease_renewal_period())
                .map_err(|(key, reason)| ConfigError::Value { key, reason })?;
        }
        crate::hooks::capture::check_config(&self.capture)
            .map_err(|(key, reason)| ConfigError::Value { key, reason })?;
        crate::server::check_config(&self.server)
            .map_err(|(key, reason)| ConfigError::Value { key, reason })?;
        Ok(())
    }
}

/// A config file, parsed, with `${VAR}`, `${VAR:-default}` and `$VAR` expanded inside its
/// string values (`$$` is a literal `$`). Comments are gone by then, so a commented-out
/// reference needs no variable.
struct ExpandedFile {
    format: FileFormat,
    data: Map<Profile, Dict>,
}

impl ExpandedFile {
    fn parse(format: FileFormat, text: &str) -> Result<ExpandedFile, ConfigError> {
        let mut data = match format {
            FileFormat::Yaml => Yaml::string(text).data(),
            FileFormat::Toml => Toml::string(text).data(),
        }
        .map_err(|e| ConfigError::Invalid(Box::new(e)))?;
        for dict in data.values_mut() {
            for (key, value) in dict.iter_mut() {
                expand_value(key, value)?;
            }
        }
        Ok(ExpandedFile { format, data })
    }
}

impl Provider for ExpandedFile {
    fn metadata(&self) -> Metadata {
        Metadata::named(match self.format {
            FileFormat::Yaml => "YAML config file",
            FileFormat::Toml => "TOML config file",
        })
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(self.data.clone())
    }
}

/// Expands references in every string under `value`; `key` is its path, for errors.
fn expand_value(key: &str, value: &mut Value) -> Result<(), ConfigError> {
    match value {
        Value::String(_, text) if text.contains('$') => {
            let expanded = shellexpand::env(text).map_err(|e| ConfigError::Variable {
                key: key.to_owned(),
                name: e.var_name,
                reason: e.cause.to_string(),
            })?;
            *text = expanded.into_owned();
        }
        Value::Dict(_, dict) => {
            for (name, value) in dict.iter_mut() {
                expand_value(&format!("{key}.{name}"), value)?;
            }
        }
        Value::Array(_, items) => {
            for (index, value) in items.iter_mut().enumerate() {
                expand_value(&format!("{key}[{index}]"), value)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Why configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file extension names no supported format.
    #[error("config file {0} must end in .yaml, .yml or .toml")]
    Format(PathBuf),
    /// A `${VAR}` reference cannot be expanded.
    #[error(
        "config key {key} refers to environment variable {name:?}, which is {reason}; set it or write ${{{name}:-default}}"
    )]
    Variable {
        /// The key whose value holds the reference.
        key: String,
        /// The variable.
        name: String,
        /// Why it failed (not present, not unicode).
        reason: String,
    },
    /// Parsing or typing failed; the message names the key and the allowed values.
    #[error("invalid configuration: {0}")]
    Invalid(#[source] Box<figment::Error>),
    /// A value breaks a rule.
    #[error("invalid configuration: {key} {reason}")]
    Value {
        /// The key path.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// Runs `f` with an empty process environment, serialized with every other test that touches
/// the environment: config loading reads `EVENTBROKER_*` variables, and tests that set them do
/// so inside figment's `Jail`, which only serializes its own users.
#[cfg(test)]
#[allow(clippy::result_large_err)]
pub(crate) fn with_isolated_env<T>(f: impl FnOnce() -> T) -> T {
    let mut out = None;
    figment::Jail::expect_with(|jail| {
        jail.clear_env();
        out = Some(f());
        Ok(())
    });
    out.expect("the jailed closure ran")
}

#[cfg(test)]
// figment's `Jail` closures must return its large error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn defaults_match_the_plan() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            defaults_are_the_plans();
            Ok(())
        });
    }

    fn defaults_are_the_plans() {
        let config = Config::load(None).expect("defaults");
        let broker = &config.event_broker;
        assert!(!broker.enabled);
        assert_eq!(broker.provider, ProviderKind::Memory);
        assert_eq!(broker.mode, ProcessingMode::Async);
        assert_eq!(broker.worker_count, 10);
        assert_eq!(broker.buffer_size, 1000);
        assert_eq!(broker.instance_id, default_instance_id());
        assert_eq!(broker.retry_policy.max_retries, 3);
        assert_eq!(broker.retry_policy.initial_delay, Duration::from_secs(1));
        assert_eq!(broker.retry_policy.max_delay, Duration::from_secs(30));
        assert_eq!(broker.retry_policy.backoff_factor, 2.0);
        assert_eq!(broker.redis.stream_name, "resolvespec:events");
        assert_eq!(broker.redis.consumer_group, "resolvespec-workers");
        assert_eq!(broker.nats.url, "nats://localhost:4222");
        assert_eq!(broker.nats.stream_name, "RESOLVESPEC_EVENTS");
        assert_eq!(broker.database.poll_interval, Duration::from_secs(1));
        assert_eq!(config.server.listen, "127.0.0.1:8080");
    }

    #[test]
    fn every_example_config_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut checked = Vec::new();
        for entry in std::fs::read_dir(&dir).expect("examples dir") {
            let path = entry.expect("entry").path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with("config-") && (name.ends_with(".yaml") || name.ends_with(".toml")) {
                with_isolated_env(|| Config::load(Some(&path)))
                    .unwrap_or_else(|e| panic!("{name} does not load: {e}"));
                checked.push(name.to_owned());
            }
        }
        assert!(checked.len() >= 6, "examples found: {checked:?}");
    }

    #[test]
    fn yaml_and_toml_files() {
        with_isolated_env(|| {
            let yaml = "event_broker:\n  provider: redis\n  worker_count: 4\n  retry_policy:\n    initial_delay: 250ms\n";
            let config = Config::from_text(FileFormat::Yaml, yaml).expect("yaml");
            assert_eq!(config.event_broker.provider, ProviderKind::Redis);
            assert_eq!(config.event_broker.worker_count, 4);
            assert_eq!(
                config.event_broker.retry_policy.initial_delay,
                Duration::from_millis(250)
            );
            assert_eq!(
                config.event_broker.retry_policy.max_retries, 3,
                "untouched default"
            );
            let toml = "[event_broker]\nmode = \"sync\"\n[event_broker.redis]\nport = 6380\n";
            let config = Config::from_text(FileFormat::Toml, toml).expect("toml");
            assert_eq!(config.event_broker.mode, ProcessingMode::Sync);
            assert_eq!(config.event_broker.redis.port, 6380);
        });
    }

    #[test]
    fn env_expansion_in_files() {
        Jail::expect_with(|jail| {
            jail.set_env("EB_TEST_HOST", "redis.internal");
            let yaml = "event_broker:\n  instance_id: \"${EB_TEST_HOST}\"\n  redis:\n    host: ${EB_TEST_HOST}\n    password: \"${EB_TEST_UNSET:-fallback}\"\n    stream_name: \"cost$$\"\n";
            let config = Config::from_text(FileFormat::Yaml, yaml).expect("expanded");
            assert_eq!(config.event_broker.instance_id, "redis.internal");
            assert_eq!(config.event_broker.redis.host, "redis.internal");
            assert_eq!(config.event_broker.redis.password, "fallback");
            assert_eq!(config.event_broker.redis.stream_name, "cost$");
            let err = Config::from_text(FileFormat::Yaml, "log:\n  level: ${EB_TEST_MISSING}\n")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("EB_TEST_MISSING") && err.contains("log.level"),
                "{err}"
            );
            // A commented-out reference needs no variable, in either format.
            let yaml = "server:\n  # admin_token: \"${EB_TEST_MISSING}\"\n  listen: 127.0.0.1:1\n";
            let config = Config::from_text(FileFormat::Yaml, yaml).expect("comment ignored");
            assert_eq!(config.server.listen, "127.0.0.1:1");
            let toml =
                "[server]\n  # admin_token = \"${EB_TEST_MISSING}\"\nlisten = \"127.0.0.1:2\"\n";
            let config = Config::from_text(FileFormat::Toml, toml).expect("comment ignored");
            assert_eq!(config.server.listen, "127.0.0.1:2");
            Ok(())
        });
    }

    #[test]
    fn expanded_values_round_trip_exactly_and_cannot_change_the_structure() {
        Jail::expect_with(|jail| {
            jail.clear_env();
            let secrets = [
                "p#ss: word",
                "# all comment",
                "line one\nline two: x\n- item",
                "quo\"te and 'apostrophe'",
                "cost $5, $$ and ${NOT_A_VAR}",
                "back\\slash\t{x: [y]}",
                " padded ",
                "",
            ];
            for secret in secrets {
                jail.set_env("EB_TEST_SECRET", secret);
                let yaml = "event_broker:\n  redis:\n    password: ${EB_TEST_SECRET}\n    url: \"redis://:${EB_TEST_SECRET}@h/0\"\n  nats:\n    password: '${EB_TEST_SECRET}'\n";
                let toml = "[event_broker.redis]\npassword = \"${EB_TEST_SECRET}\"\nurl = 'redis://:${EB_TEST_SECRET}@h/0'\n[event_broker.nats]\npassword = \"\"\"${EB_TEST_SECRET}\"\"\"\n";
                for (format, text) in [(FileFormat::Yaml, yaml), (FileFormat::Toml, toml)] {
                    let config = Config::from_text(format, text)
                        .unwrap_or_else(|e| panic!("{format:?} with {secret:?}: {e}"));
                    let broker = &config.event_broker;
                    assert_eq!(broker.redis.password, secret, "{format:?}");
                    assert_eq!(
                        broker.redis.url.as_deref(),
                        Some(format!("redis://:{secret}@h/0").as_str()),
                        "{format:?}"
                    );
                    assert_eq!(broker.nats.password.as_deref(), Some(secret), "{format:?}");
                }
            }
            // Numbers and booleans come through strings; `$$` stays a literal `$`.
            jail.set_env("EB_TEST_WORKERS", "4");
            jail.set_env("EB_TEST_WATCH", "false");
            let yaml = "event_broker:\n  worker_count: ${EB_TEST_WORKERS}\n  consumer_group: \"g$$1\"\nhandlers:\n  watch: ${EB_TEST_WATCH}\n";
            let toml = "[event_broker]\nworker_count = \"${EB_TEST_WORKERS}\"\nconsumer_group = \"g$$1\"\n[handlers]\nwatch = \"${EB_TEST_WATCH:-true}\"\n";
            for (format, text) in [(FileFormat::Yaml, yaml), (FileFormat::Toml, toml)] {
                let config = Config::from_text(format, text).expect("typed values");
                assert_eq!(config.event_broker.worker_count, 4, "{format:?}");
                assert_eq!(config.event_broker.consumer_group, "g$1", "{format:?}");
                assert!(!config.handlers.watch, "{format:?}");
            }
            Ok(())
        });
    }

    #[test]
    fn server_security_settings_are_validated() {
        with_isolated_env(|| {
            let yaml = "server:\n  token: abc\n  metrics_token: m\n  allowed_hosts: [events.example.com, \"10.0.0.2:8080\"]\n  allowed_origins: [\"https://app.example\"]\n";
            let config = Config::from_text(FileFormat::Yaml, yaml).expect("valid");
            assert_eq!(config.server.token.as_deref(), Some("abc"));
            assert_eq!(config.server.allowed_hosts.len(), 2);
            for (yaml, key) in [
                ("server:\n  token: \"\"\n", "server.token"),
                ("server:\n  admin_token: \"a b\"\n", "server.admin_token"),
                (
                    "server:\n  allowed_hosts: [\"a b\"]\n",
                    "server.allowed_hosts",
                ),
                (
                    "server:\n  allowed_origins: [app.example]\n",
                    "server.allowed_origins",
                ),
            ] {
                let err = Config::from_text(FileFormat::Yaml, yaml)
                    .unwrap_err()
                    .to_string();
                assert!(err.contains(key), "{yaml}: {err}");
            }
        });
    }

    #[test]
    fn env_overrides_files() {
        Jail::expect_with(|jail| {
            jail.set_env("EVENTBROKER_EVENT_BROKER__WORKER_COUNT", "7");
            jail.set_env("EVENTBROKER_EVENT_BROKER__RETRY_POLICY__MAX_RETRIES", "0");
            jail.set_env("EVENTBROKER_SERVER__LISTEN", "0.0.0.0:9000");
            jail.set_env("EVENTBROKER_SERVER_URL", "http://not-config");
            let config = Config::from_text(FileFormat::Yaml, "event_broker:\n  worker_count: 3\n")
                .expect("env");
            assert_eq!(config.event_broker.worker_count, 7);
            assert_eq!(config.event_broker.retry_policy.max_retries, 0);
            assert_eq!(config.server.listen, "0.0.0.0:9000");
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        with_isolated_env(|| {
            let err = Config::from_text(FileFormat::Yaml, "event_broker:\n  worker_cont: 3\n")
                .unwrap_err()
                .to_string();
            assert!(err.contains("worker_cont"), "{err}");
            let err = Config::from_text(FileFormat::Yaml, "event_broker:\n  provider: kafka\n")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("kafka") && err.contains("memory") && err.contains("nats"),
                "{err}"
            );
            assert!(err.contains("provider"), "{err}");
            let err = Config::from_text(
                FileFormat::Toml,
                "[event_broker]\nworker_count = \"many\"\n",
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains("worker_count"), "{err}");
            let err = Config::from_text(FileFormat::Yaml, "event_broker:\n  worker_count: 0\n")
                .unwrap_err()
                .to_string();
            assert!(err.contains("event_broker.worker_count"), "{err}");
            let err = Config::from_text(
                FileFormat::Yaml,
                "event_broker:\n  retry_policy:\n    initial_delay: soon\n",
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains("initial_delay"), "{err}");
            assert!(FileFormat::of(Path::new("c.ini")).is_err());
        });
    }

    #[test]
    fn watcher_buffers_and_the_write_timeout_are_validated_by_key() {
        with_isolated_env(|| {
            for provider in ["memory", "database", "redis", "nats"] {
                let text = format!("event_broker:\n  {provider}:\n    watcher_buffer: 0\n");
                let err = Config::from_text(FileFormat::Yaml, &text)
                    .unwrap_err()
                    .to_string();
                let key = format!("event_broker.{provider}.watcher_buffer");
                assert!(err.contains(&key), "{err}");
            }
            let err = Config::from_text(
                FileFormat::Yaml,
                "event_broker:\n  database:\n    write_timeout: 0s\n",
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains("event_broker.database.write_timeout"), "{err}");
            let config = Config::from_text(
                FileFormat::Yaml,
                "event_broker:\n  redis:\n    watcher_buffer: 16\n  database:\n    \
                 write_timeout: 3s\n",
            )
            .expect("valid");
            assert_eq!(config.event_broker.redis.watcher_buffer, 16);
            assert_eq!(
                config.event_broker.database.write_timeout,
                Duration::from_secs(3)
            );
        });
    }

    #[test]
    fn retry_delays_grow_and_cap() {
        let policy = RetryPolicy {
            jitter: false,
            ..RetryPolicy::default()
        };
        assert_eq!(policy.delay(1), Duration::from_secs(1));
        assert_eq!(policy.delay(2), Duration::from_secs(2));
        assert_eq!(policy.delay(3), Duration::from_secs(4));
        assert_eq!(policy.delay(20), Duration::from_secs(30));
        let jittered = RetryPolicy::default();
        for retry in 1..6 {
            let delay = jittered.delay(retry);
            assert!(
                delay >= policy.delay(retry).min(policy.max_delay) && delay <= policy.max_delay
            );
        }
    }
}
