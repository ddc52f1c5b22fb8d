//! The database backends under test: SQLite in a temp file, PostgreSQL on a table of its own
//! (skipped loudly when the server is unreachable).

#![allow(dead_code)]

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Duration;

use eventbroker::config::BrokerConfig;
use eventbroker::provider::{Provider, ProviderError};
use eventbroker_sql::{SqlConfig, SqlProvider};
use eventbroker_testkit::backends::{Backend, Open, base_config};
use eventbroker_testkit::{services, unique_suffix};

/// A broker config with the database section it runs on (derefs to the broker's part).
#[derive(Debug, Clone)]
pub struct Setup {
    /// The broker's settings.
    pub broker: BrokerConfig,
    /// The `event_broker.database` section.
    pub database: SqlConfig,
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

/// Opens a provider as `setup` configures it.
pub async fn open(setup: &Setup) -> Result<Arc<dyn Provider>, ProviderError> {
    Ok(Arc::new(
        SqlProvider::connect(&setup.database, &setup.broker).await?,
    ))
}

/// A database backend under test: its setup, and the shared [`Backend`] (deref) that opens
/// providers on it.
pub struct SqlBackend {
    /// What its providers are opened with.
    pub config: Setup,
    backend: Backend,
}

impl Deref for SqlBackend {
    type Target = Backend;
    fn deref(&self) -> &Backend {
        &self.backend
    }
}

impl SqlBackend {
    fn new(name: &'static str, config: Setup) -> Self {
        let setup = config.clone();
        let backend = Backend::new(name, move |options: Open| {
            let mut setup = setup.clone();
            setup.broker.consumer_group = options.group;
            if let Some(buffer) = options.watcher_buffer {
                setup.database.watcher_buffer = buffer;
            }
            async move { open(&setup).await }
        });
        SqlBackend { config, backend }
    }

    /// The shared backend, for the conformance suite.
    pub fn into_backend(self) -> Backend {
        self.backend
    }
}

/// SQLite in a file of its own under the system temp directory.
pub async fn sqlite() -> Option<SqlBackend> {
    let dir = std::env::temp_dir().join(format!("eventbroker-test-{}", unique_suffix()));
    let database = SqlConfig {
        url: format!("sqlite://{}", dir.join("events.db").display()),
        poll_interval: Duration::from_millis(50),
        rescue_interval: Duration::from_millis(200),
        ..SqlConfig::default()
    };
    Some(SqlBackend::new(
        "sqlite",
        Setup {
            broker: base_config(),
            database,
        },
    ))
}

/// The URL of the PostgreSQL test database (`EVENTBROKER_TEST_POSTGRES_URL`, default the local
/// server's `test` database).
pub fn postgres_url() -> String {
    std::env::var("EVENTBROKER_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// PostgreSQL on a table of its own, or `None` after a loud skip when the server is down.
pub async fn postgres() -> Option<SqlBackend> {
    if !services::available("PostgreSQL", "127.0.0.1:5432") {
        return None;
    }
    sweep_old_postgres_tables(&postgres_url()).await;
    let database = SqlConfig {
        url: postgres_url(),
        table_name: format!("events_{}", unique_suffix()),
        poll_interval: Duration::from_millis(200),
        rescue_interval: Duration::from_millis(200),
        max_connections: 8,
        ..SqlConfig::default()
    };
    Some(SqlBackend::new(
        "postgres",
        Setup {
            broker: base_config(),
            database,
        },
    ))
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
                        "DROP TABLE IF EXISTS {prefix}_deliveries, {prefix}_groups, \
                         {prefix}_states, {prefix}_handlers, {prefix}_handler_components, \
                         {prefix}_handler_reports, {prefix}_kv, {prefix}_kv_usage, {prefix}, \
                         {prefix}_migrations"
                    )))
                    .execute(&pool)
                    .await;
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP SEQUENCE IF EXISTS {prefix}_handler_revisions"
                    )))
                    .execute(&pool)
                    .await;
                }
            }
            pool.close().await;
        })
        .await;
}
