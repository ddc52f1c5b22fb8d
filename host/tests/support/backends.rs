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
