//! The providers under test, each on a namespace of its own, with the faults that apply to
//! it and why the others do not. A provider whose service is unreachable is skipped loudly
//! (a failure under `EVENTBROKER_REQUIRE_SERVICES=1`), as everywhere in the suite.

use serde_json::json;

use crate::scenario::{Setup, Topology, big_payload_kib};
use eventbroker_testkit::{services, unique_suffix};

/// Address of the NATS server (with JetStream).
const NATS_ADDR: &str = "127.0.0.1:4222";

/// The URL of the PostgreSQL test database (`EVENTBROKER_TEST_POSTGRES_URL`, default the
/// local server's `test` database).
fn postgres_url() -> String {
    std::env::var("EVENTBROKER_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A provider that could not run, and why.
pub struct Skipped {
    /// Provider name.
    pub name: &'static str,
    /// Why it was skipped.
    pub reason: String,
}

/// Every provider: a setup, or why it is skipped.
pub fn all() -> Vec<Result<Setup, Skipped>> {
    vec![Ok(memory()), Ok(sqlite()), postgres(), redis(), nats()]
}

/// Runs `cleanup` on a thread of its own (outside any async runtime, so that it may start
/// one).
fn detached(
    cleanup: impl FnOnce() + Send + Sync + 'static,
) -> Option<Box<dyn FnOnce() + Send + Sync>> {
    Some(Box::new(move || {
        let _ = std::thread::spawn(cleanup).join();
    }))
}

/// The memory provider: one host; a crash loses its events by design.
pub fn memory() -> Setup {
    Setup {
        name: "memory",
        topology: Topology::Single,
        backend: None,
        broker: Box::new(
            |_: Option<u16>, _: &str| json!({"provider": "memory", "memory": {"watcher_buffer": 64}}),
        ),
        kill: false,
        not_applicable: vec![
            (
                "kill -9",
                "events live in the host process: a crash loses every unfinished event by \
                 design (the provider is for events you can lose)",
            ),
            ("backend cut", "there is no backend connection"),
            (
                "2 groups",
                "one host per store: a memory store cannot be shared by the hosts of two groups",
            ),
        ],
        // The provider keeps every event, padding included, in the host's memory.
        rss_allowance_kib: big_payload_kib(),
        cleanup: None,
    }
}

/// SQLite in a file of its own: one host, killed and restarted.
pub fn sqlite() -> Setup {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("events.db").display());
    Setup {
        name: "sqlite",
        topology: Topology::Single,
        backend: None,
        broker: Box::new(move |_: Option<u16>, _: &str| {
            json!({
                "provider": "database",
                "database": {
                    "url": url,
                    "poll_interval": "200ms",
                    "rescue_interval": "500ms",
                    "watcher_buffer": 64,
                },
            })
        }),
        kill: true,
        not_applicable: vec![
            (
                "backend cut",
                "the database is a file the host opens: there is no connection to cut (kill -9 \
                 covers the crash)",
            ),
            (
                "2 groups",
                "one host per SQLite file: the provider is not shared between processes",
            ),
        ],
        rss_allowance_kib: 0,
        cleanup: Some(Box::new(move || drop(dir))),
    }
}

/// PostgreSQL on a table of its own, through a proxy.
pub fn postgres() -> Result<Setup, Skipped> {
    let url = postgres_url();
    let parsed = reqwest::Url::parse(&url).expect("EVENTBROKER_TEST_POSTGRES_URL is a URL");
    let addr = format!(
        "{}:{}",
        parsed.host_str().unwrap_or("127.0.0.1"),
        parsed.port().unwrap_or(5432)
    );
    if !services::available("PostgreSQL", &addr) {
        return Err(Skipped {
            name: "postgres",
            reason: format!("PostgreSQL is not reachable at {addr}"),
        });
    }
    let table = format!("events_{}", unique_suffix());
    let (proxied, table2) = (parsed.clone(), table.clone());
    let cleanup_url = url.clone();
    Ok(Setup {
        name: "postgres",
        topology: Topology::Shared,
        backend: Some(addr),
        broker: Box::new(move |port: Option<u16>, _: &str| {
            let mut url = proxied.clone();
            let _ = url.set_host(Some("127.0.0.1"));
            let _ = url.set_port(port);
            json!({
                "provider": "database",
                "database": {
                    "url": url.as_str(),
                    "table_name": table2,
                    "poll_interval": "200ms",
                    "rescue_interval": "500ms",
                    "max_connections": 5,
                    "watcher_buffer": 64,
                },
            })
        }),
        kill: true,
        not_applicable: Vec::new(),
        rss_allowance_kib: 0,
        cleanup: detached(move || drop_postgres_tables(&cleanup_url, &table)),
    })
}

fn drop_postgres_tables(url: &str, table: &str) {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    runtime.block_on(async {
        let Ok(pool) = sqlx::PgPool::connect(url).await else {
            return;
        };
        // `table` is `events_` and hex digits: a plain identifier.
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP TABLE IF EXISTS {table}_deliveries, {table}_groups, {table}, {table}_migrations"
        )))
        .execute(&pool)
        .await;
        pool.close().await;
    });
}

/// Redis Streams on a stream name of its own, through a proxy.
pub fn redis() -> Result<Setup, Skipped> {
    let addr = std::env::var("REDIS_ADDR").unwrap_or_else(|_| "127.0.0.1:6379".into());
    if !services::available("Redis", &addr) {
        return Err(Skipped {
            name: "redis",
            reason: format!("Redis is not reachable at {addr}"),
        });
    }
    let stream = format!("eb-test:{}", unique_suffix());
    let (cleanup_url, cleanup_prefix) = (format!("redis://{addr}/0"), stream.clone());
    Ok(Setup {
        name: "redis",
        topology: Topology::Shared,
        backend: Some(addr),
        broker: Box::new(move |port: Option<u16>, group: &str| {
            json!({
                "provider": "redis",
                "redis": {
                    "url": format!("redis://127.0.0.1:{}/0", port.unwrap_or(6379)),
                    "stream_name": stream,
                    "consumer_group": group,
                    "block_time": "200ms",
                    "claim_interval": "200ms",
                    "command_timeout": "2s",
                    "watcher_buffer": 64,
                },
            })
        }),
        kill: true,
        not_applicable: Vec::new(),
        rss_allowance_kib: 0,
        // Every key of the stream's namespace is deleted.
        cleanup: detached(move || delete_redis_keys(&cleanup_url, &cleanup_prefix)),
    })
}

/// NATS JetStream on a stream and bucket of their own, through a proxy.
pub fn nats() -> Result<Setup, Skipped> {
    if !services::available("NATS", NATS_ADDR) {
        return Err(Skipped {
            name: "nats",
            reason: format!("NATS is not reachable at {NATS_ADDR}"),
        });
    }
    let suffix = unique_suffix();
    let config = eventbroker_nats::NatsConfig {
        url: format!("nats://{NATS_ADDR}"),
        stream_name: format!("EBTEST_{suffix}"),
        subjects: vec![format!("ebtest{suffix}.>")],
        ..eventbroker_nats::NatsConfig::default()
    };
    let (stream, subjects) = (config.stream_name.clone(), config.subjects.clone());
    Ok(Setup {
        name: "nats",
        topology: Topology::Shared,
        backend: Some(NATS_ADDR.to_owned()),
        broker: Box::new(move |port: Option<u16>, _: &str| {
            json!({
                "provider": "nats",
                "nats": {
                    "url": format!("nats://127.0.0.1:{}", port.unwrap_or(4222)),
                    "stream_name": stream,
                    "subjects": subjects,
                    "storage": "file",
                    "max_age": "1h",
                    "watcher_buffer": 64,
                },
            })
        }),
        kill: true,
        not_applicable: Vec::new(),
        rss_allowance_kib: 0,
        // Its stream and state bucket are deleted.
        cleanup: detached(move || delete_nats_namespace(&config)),
    })
}

/// Deletes every key under `prefix` on the Redis server at `url`.
fn delete_redis_keys(url: &str, prefix: &str) {
    let Ok(client) = redis::Client::open(url) else {
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

/// Deletes the stream, dead-letter stream and state bucket of a NATS namespace.
fn delete_nats_namespace(nats: &eventbroker_nats::NatsConfig) {
    let Ok(runtime) = tokio::runtime::Runtime::new() else {
        return;
    };
    runtime.block_on(async {
        let broker = eventbroker::BrokerConfig::default();
        if let Ok(provider) = eventbroker_nats::NatsProvider::connect(nats, &broker).await {
            let _ = provider.destroy().await;
        }
    });
}
