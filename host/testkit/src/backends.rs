//! The provider backends the shared suites run against. Each constructor returns a
//! [`Backend`] on a namespace of its own (unique table, stream, key prefix…), or `None` after
//! a loud skip when the service it needs is unreachable (a failure under
//! `EVENTBROKER_REQUIRE_SERVICES=1`).

use std::sync::Arc;

use eventbroker::config::{BrokerConfig, ProviderKind};
use eventbroker::provider::{self, MemoryProvider, Provider, memory::MemoryOptions};

/// The own consumer group ([`Provider::group`]) of every backend's providers: the group whose
/// state `get`, `list` and `stats` show.
pub const OWN_GROUP: &str = "g";

/// A backend under test: a broker config naming one isolated namespace of one provider.
pub struct Backend {
    /// Backend name, for messages.
    pub name: &'static str,
    /// The config [`Backend::connect`] builds providers from.
    pub config: BrokerConfig,
    /// The memory provider's single instance (memory cannot be opened twice).
    single: Option<MemoryProvider>,
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
            return Arc::new(single.clone());
        }
        match provider::from_config(&self.config).await {
            Ok(provider) => provider,
            Err(error) => panic!("{}: cannot open the provider: {error}", self.name),
        }
    }

    /// A provider on this backend's namespace whose own group is `group`: a host configured
    /// with `event_broker.consumer_group` (and, for Redis, `redis.consumer_group`) `group`.
    /// The memory backend gives a handle on its single instance.
    pub async fn connect_in_group(&self, group: &str) -> Arc<dyn Provider> {
        if let Some(single) = &self.single {
            return Arc::new(single.in_group(group));
        }
        let mut config = self.config.clone();
        config.consumer_group = group.to_owned();
        config.redis.consumer_group = group.to_owned();
        match provider::from_config(&config).await {
            Ok(provider) => provider,
            Err(error) => panic!("{}: cannot open the provider: {error}", self.name),
        }
    }
}

/// The base config of every backend: a host id, [`OWN_GROUP`] as the own consumer group,
/// and defaults.
pub fn base_config(provider: ProviderKind) -> BrokerConfig {
    let mut config = BrokerConfig {
        provider,
        instance_id: format!("test-{}", super::unique_suffix()),
        consumer_group: OWN_GROUP.into(),
        ..BrokerConfig::default()
    };
    config.redis.consumer_group = OWN_GROUP.into();
    config
}

/// The embedded memory provider (always available).
pub async fn memory() -> Option<Backend> {
    let mut config = base_config(ProviderKind::Memory);
    config.memory.max_events = 100_000;
    config.buffer_size = 100_000;
    let provider = MemoryProvider::new(MemoryOptions::from_config(&config));
    Some(Backend {
        name: "memory",
        config,
        single: Some(provider),
    })
}

/// SQLite in a file of its own under the system temp directory.
pub async fn sqlite() -> Option<Backend> {
    let mut config = base_config(ProviderKind::Database);
    let dir = std::env::temp_dir().join(format!("eventbroker-test-{}", super::unique_suffix()));
    config.database.url = format!("sqlite://{}", dir.join("events.db").display());
    config.database.poll_interval = std::time::Duration::from_millis(50);
    config.database.rescue_interval = std::time::Duration::from_millis(200);
    Some(Backend::from_config("sqlite", config))
}

/// The URL of the PostgreSQL test database (`EVENTBROKER_TEST_POSTGRES_URL`, default the local
/// server's `test` database).
pub fn postgres_url() -> String {
    std::env::var("EVENTBROKER_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Drops the tables of test namespaces (`events_<suffix>`, `cluster_<suffix>`) migrated more
/// than an hour ago: tests cannot drop their own when they end, so each run sweeps what
/// earlier runs left behind. Once per process; failures are ignored.
async fn sweep_old_postgres_tables(url: &str) {
    static SWEPT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    SWEPT
        .get_or_init(|| async {
            let Ok(pool) = sqlx::PgPool::connect(url).await else {
                return;
            };
            let prefixes: Vec<String> = sqlx::query_scalar(
                "SELECT substring(tablename from '^(.*)_migrations$') FROM pg_tables \
                 WHERE schemaname = 'public' \
                 AND tablename ~ '^(events|cluster)_[0-9a-f]{12}_migrations$'",
            )
            .fetch_all(&pool)
            .await
            .unwrap_or_default();
            for prefix in prefixes {
                // `prefix` matched the pattern above: a plain identifier.
                let old: Option<bool> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT MAX(installed_on) < now() - interval '1 hour' FROM {prefix}_migrations"
                )))
                .fetch_one(&pool)
                .await
                .ok()
                .flatten();
                if old == Some(true) {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP TABLE IF EXISTS {prefix}_deliveries, {prefix}_groups, {prefix}, \
                         {prefix}_migrations"
                    )))
                    .execute(&pool)
                    .await;
                }
            }
            pool.close().await;
        })
        .await;
}

/// PostgreSQL on a table of its own, or `None` after a loud skip when the server is down.
pub async fn postgres() -> Option<Backend> {
    if !super::services::available("PostgreSQL", "127.0.0.1:5432") {
        return None;
    }
    sweep_old_postgres_tables(&postgres_url()).await;
    let mut config = base_config(ProviderKind::Database);
    config.database.url = postgres_url();
    config.database.table_name = format!("events_{}", super::unique_suffix());
    config.database.poll_interval = std::time::Duration::from_millis(200);
    config.database.rescue_interval = std::time::Duration::from_millis(200);
    config.database.max_connections = 8;
    Some(Backend::from_config("postgres", config))
}

/// Redis Streams at `REDIS_ADDR` (default 127.0.0.1:6379), on a stream name of its own.
pub async fn redis() -> Option<Backend> {
    let addr = std::env::var("REDIS_ADDR").unwrap_or_else(|_| "127.0.0.1:6379".into());
    if !super::services::available("Redis", &addr) {
        return None;
    }
    let mut config = base_config(ProviderKind::Redis);
    config.redis.url = Some(format!("redis://{addr}/0"));
    config.redis.stream_name = format!("eb-test:{}", super::unique_suffix());
    // Short reads and claim checks, so that closes and lease expiries show quickly.
    config.redis.block_time = std::time::Duration::from_millis(200);
    config.redis.claim_interval = std::time::Duration::from_millis(100);
    // Requeue counts a Redis delivery idle this long as abandoned (the suite's leases are
    // short).
    config.lease = std::time::Duration::from_secs(2);
    Some(Backend::from_config("redis", config))
}

/// Deletes a backend's namespace when the test is done with it: every key of a Redis backend
/// (its stream name is the key prefix), the stream and bucket of a NATS backend.
impl Drop for Backend {
    fn drop(&mut self) {
        if self.config.provider == ProviderKind::Nats {
            delete_nats_namespace(&self.config);
            return;
        }
        if self.config.provider != ProviderKind::Redis {
            return;
        }
        let (Some(url), prefix) = (&self.config.redis.url, &self.config.redis.stream_name) else {
            return;
        };
        let Ok(client) = redis::Client::open(url.as_str()) else {
            return;
        };
        let timeout = std::time::Duration::from_secs(5);
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
}

/// Deletes the streams and bucket of a NATS backend (on a thread of its own: `Drop` may run
/// inside the test's runtime, which cannot be blocked on).
fn delete_nats_namespace(config: &BrokerConfig) {
    let stream = config.nats.stream_name.clone();
    let dead_letters = format!("{stream}_DEAD_LETTERS");
    let bucket_stream = format!("KV_{}", config.nats.kv_bucket());
    let url = config.nats.url.clone();
    let deleted = std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        runtime.block_on(async {
            let connect = async_nats::connect(url.as_str());
            let Ok(Ok(client)) =
                tokio::time::timeout(std::time::Duration::from_secs(5), connect).await
            else {
                return;
            };
            let js = async_nats::jetstream::new(client);
            for name in [stream, dead_letters, bucket_stream] {
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    js.delete_stream(&name),
                )
                .await;
            }
        });
    });
    let _ = deleted.join();
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
