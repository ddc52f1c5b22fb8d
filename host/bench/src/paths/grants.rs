//! Grants: what one outbound HTTP request and one key-value increment cost a guest, against
//! the same operation made natively from the host, measured in the same run.
//!
//! - **HTTP**: a GET to a loopback server (axum), a new connection per request on both sides:
//!   the guest's `wasi:http` request (the `http-caller` fixture) goes through the host's grant
//!   checks and `wasmtime-wasi-http`; the native request is `reqwest` without a connection pool.
//! - **Key-value**: one increment of one key on each backend. Natively: the backend's own
//!   round trip (memory: a map under a mutex; SQLite and PostgreSQL: one upsert `… RETURNING`;
//!   Redis: `HINCRBY`; NATS: one KV put), and the store's `increment` called from the host
//!   (the quota check, and on NATS the compare-and-set, included). From a guest:
//!   `wasi:keyvalue/atomics.increment` (the `kv-client` fixture).
//!
//! A guest's cost per operation is (median invocation doing [`OPS`] operations − median
//! invocation doing none) / [`OPS`], each invocation on a fresh instance through the local
//! runner (no broker), so instantiation is not counted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use eventbroker::keyvalue::{Namespace, Quota};
use eventbroker::{BrokerConfig, Event, EventSource, KeyValueStore, MemoryKeyValue, Provider};
use eventbroker_testkit::guests;
use eventbroker_wasm::WasmEngine;
use eventbroker_wasm::config::PoolConfig;
use eventbroker_wasm::keyvalue::KeyValueBinding;
use eventbroker_wasm::runner::{self, Overrides};
use serde_json::{Value, json};
use sqlx::Executor;

use crate::harness::percentile;

/// Operations per measured guest invocation.
pub const OPS: u64 = 20;
/// Guest invocations per measurement (each side).
const INVOCATIONS: usize = 40;
/// Native operations per measurement.
const NATIVE: usize = 400;

/// One measured operation.
#[derive(Debug, Clone)]
pub struct GrantRow {
    /// What was measured (`http GET`, `increment, redis`, …).
    pub operation: String,
    /// What the native baseline does.
    pub baseline: String,
    /// The native operation, median.
    pub native: Duration,
    /// The store's own method called from the host, median (key-value only).
    pub host_api: Option<Duration>,
    /// The operation made by a guest.
    pub guest: Duration,
}

const QUOTA: Quota = Quota {
    max_keys: 1_000,
    max_bytes: 1 << 20,
};

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort_unstable();
    percentile(&times, 0.5)
}

/// Median duration of the guest's invocations on `payload`, run `INVOCATIONS` times.
async fn guest_median(
    engine: &WasmEngine,
    bytes: &[u8],
    manifest: &str,
    payload: Value,
) -> Duration {
    let events: Vec<Event> = (0..INVOCATIONS)
        .map(|_| {
            Event::new(EventSource::System, "bench.grant", "bench").with_payload(payload.clone())
        })
        .collect();
    let report = runner::run(engine, bytes, Some(manifest), &Overrides::default(), events)
        .await
        .expect("the fixture loads");
    for result in &report.results {
        if let Err(failure) = &result.invocation.result {
            panic!("the fixture failed: {failure:?}");
        }
    }
    // The first invocation compiles nothing (the runner compiled before) but warms caches.
    median(
        report.results[1..]
            .iter()
            .map(|r| r.invocation.duration)
            .collect(),
    )
}

/// The guest's cost of one operation: invocations doing `OPS` of them against none.
async fn guest_cost(
    engine: &WasmEngine,
    bytes: &[u8],
    manifest: &str,
    with_ops: Value,
    without: Value,
) -> Duration {
    let busy = guest_median(engine, bytes, manifest, with_ops).await;
    let idle = guest_median(engine, bytes, manifest, without).await;
    busy.saturating_sub(idle) / OPS as u32
}

async fn native_median<F, Fut>(mut operation: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    for _ in 0..NATIVE / 10 {
        operation().await;
    }
    let mut times = Vec::with_capacity(NATIVE);
    for _ in 0..NATIVE {
        let started = Instant::now();
        operation().await;
        times.push(started.elapsed());
    }
    median(times)
}

/// The HTTP row: a loopback GET.
async fn http() -> GrantRow {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::any(|_: axum::body::Bytes| async { "ok" }),
    );
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let url = format!("http://127.0.0.1:{port}/hook");

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let native = native_median(|| {
        let request = client.get(&url).send();
        async move {
            let response = request.await.expect("native request");
            response.bytes().await.expect("body");
        }
    })
    .await;

    let bytes = std::fs::read(guests::build().fixtures.join("http_caller.wasm"))
        .expect("http_caller built");
    let engine = WasmEngine::new(&PoolConfig::default(), None).expect("engine");
    let manifest = format!(
        "timeout = \"30s\"\n[http]\nallow = [\"http://127.0.0.1:{port}/*\"]\nmax_requests = {OPS}\n"
    );
    let guest = guest_cost(
        &engine,
        &bytes,
        &manifest,
        json!({"url": url, "method": "GET", "body_bytes": 0, "requests": OPS}),
        json!({"url": url, "method": "GET", "body_bytes": 0, "requests": 0}),
    )
    .await;
    server.abort();
    GrantRow {
        operation: "http GET, loopback".into(),
        baseline: "reqwest GET, new connection".into(),
        native,
        host_api: None,
        guest,
    }
}

/// The key-value row of one backend: `store` is the provider's, `native` its bare increment.
async fn increment_row<F, Fut>(
    backend: &str,
    baseline: &str,
    store: Arc<dyn KeyValueStore>,
    native: F,
) -> GrantRow
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let native = native_median(native).await;
    let ns = Namespace::new("bench", "host", "counts");
    let host_api = native_median(|| {
        let (store, ns) = (store.clone(), ns.clone());
        async move {
            store
                .increment(&ns, "n", 1, &QUOTA)
                .await
                .expect("increment");
        }
    })
    .await;
    let bytes =
        std::fs::read(guests::build().fixtures.join("kv_client.wasm")).expect("kv_client built");
    let engine = WasmEngine::new(&PoolConfig::default(), None).expect("engine");
    engine
        .set_keyvalue(KeyValueBinding {
            store,
            scope: "bench".into(),
        })
        .expect("binding");
    let manifest =
        format!("timeout = \"30s\"\n[keyvalue]\nbuckets = [\"b\"]\nmax_operations = {OPS}\n");
    let ops: Vec<Value> = (0..OPS).map(|_| json!(["increment", "n", 1])).collect();
    let guest = guest_cost(
        &engine,
        &bytes,
        &manifest,
        json!({"ops": ops}),
        json!({"ops": []}),
    )
    .await;
    GrantRow {
        operation: format!("increment, {backend}"),
        baseline: baseline.into(),
        native,
        host_api: Some(host_api),
        guest,
    }
}

async fn memory() -> GrantRow {
    let map = Arc::new(std::sync::Mutex::new(std::collections::HashMap::<
        String,
        u64,
    >::new()));
    let native = || {
        let map = map.clone();
        async move {
            *map.lock().expect("map").entry("n".to_owned()).or_default() += 1;
        }
    };
    increment_row(
        "memory",
        "HashMap under a mutex",
        Arc::new(MemoryKeyValue::new()),
        native,
    )
    .await
}

/// An upsert that increments, as one statement.
fn upsert(table: &str, placeholder: &str) -> String {
    format!(
        "INSERT INTO {table} (k, v) VALUES ({placeholder}, 1) ON CONFLICT (k) DO UPDATE SET v = {table}.v + 1 RETURNING v"
    )
}

async fn sqlite(dir: &std::path::Path) -> GrantRow {
    let bare = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(
            sqlx::sqlite::SqliteConnectOptions::new()
                .filename(dir.join("bare.db"))
                .create_if_missing(true)
                .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                .synchronous(sqlx::sqlite::SqliteSynchronous::Normal),
        )
        .await
        .expect("sqlite");
    bare.execute("CREATE TABLE counters (k TEXT PRIMARY KEY, v INTEGER NOT NULL)")
        .await
        .expect("table");
    let statement = upsert("counters", "?");
    sql_row(
        "sqlite",
        format!("sqlite://{}", dir.join("kv.db").display()),
        || {
            let (bare, statement) = (bare.clone(), statement.clone());
            async move {
                sqlx::query(sqlx::AssertSqlSafe(statement))
                    .bind("n")
                    .fetch_one(&bare)
                    .await
                    .expect("upsert");
            }
        },
    )
    .await
}

/// The row of an SQL backend: its provider's store on `url` (on tables of their own, dropped
/// afterwards on PostgreSQL) against `native`.
async fn sql_row<F, Fut>(backend: &str, url: String, native: F) -> GrantRow
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let table = format!(
        "bench_kv_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let database = eventbroker_sql::SqlConfig {
        url: url.clone(),
        table_name: table.clone(),
        ..eventbroker_sql::SqlConfig::default()
    };
    let provider = eventbroker_sql::SqlProvider::connect(&database, &BrokerConfig::default())
        .await
        .expect("provider");
    let row = increment_row(
        backend,
        "one upsert … RETURNING",
        provider.keyvalue().expect("store"),
        native,
    )
    .await;
    provider.close().await;
    if url.starts_with("postgres") {
        super::sql::drop_tables(&url, &table).await;
    }
    row
}

async fn postgres() -> Result<GrantRow, String> {
    let url = super::sql::postgres_url();
    let bare = sqlx::PgPool::connect(&url)
        .await
        .map_err(|e| format!("PostgreSQL not reachable at {url}: {e}"))?;
    let table = format!(
        "bench_counters_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    bare.execute(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {table} (k TEXT PRIMARY KEY, v BIGINT NOT NULL)"
    )))
    .await
    .expect("table");
    let statement = upsert(&table, "$1");
    let row = sql_row("postgres", url, || {
        let (bare, statement) = (bare.clone(), statement.clone());
        async move {
            sqlx::query(sqlx::AssertSqlSafe(statement))
                .bind("n")
                .fetch_one(&bare)
                .await
                .expect("upsert");
        }
    })
    .await;
    let _ = bare
        .execute(sqlx::AssertSqlSafe(format!("DROP TABLE {table}")))
        .await;
    Ok(row)
}

async fn redis() -> Result<GrantRow, String> {
    let addr = super::redis::addr();
    let client = redis::Client::open(format!("redis://{addr}/0")).map_err(|e| e.to_string())?;
    let conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| format!("Redis not reachable at {addr}: {e}"))?;
    let prefix = format!("eb-bench:{}", uuid::Uuid::new_v4().simple());
    let provider: Arc<dyn Provider> = Arc::new(
        eventbroker_redis::RedisProvider::connect(
            &eventbroker_redis::RedisConfig {
                url: Some(format!("redis://{addr}/0")),
                stream_name: prefix.clone(),
                ..eventbroker_redis::RedisConfig::default()
            },
            &BrokerConfig::default(),
        )
        .await
        .map_err(|e| e.to_string())?,
    );
    let key = format!("{prefix}:bare");
    let row = increment_row(
        "redis",
        "HINCRBY",
        provider.keyvalue().expect("store"),
        || {
            let (mut conn, key) = (conn.clone(), key.clone());
            async move {
                let _: i64 = redis::cmd("HINCRBY")
                    .arg(&key)
                    .arg("n")
                    .arg(1)
                    .query_async(&mut conn)
                    .await
                    .expect("HINCRBY");
            }
        },
    )
    .await;
    provider.close().await;
    super::redis::delete_keys(&prefix).await;
    Ok(row)
}

async fn nats() -> Result<GrantRow, String> {
    let url = super::nats::url();
    let client = async_nats::connect(url.as_str())
        .await
        .map_err(|e| format!("NATS not reachable at {url}: {e}"))?;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let js = async_nats::jetstream::new(client);
    // A KV put is a JetStream publish to the bucket's subject, acknowledged: the same on a
    // stream of its own keeping one message per subject, as a KV bucket does.
    let bare_stream = format!("BENCHKV{id}");
    let subject = format!("benchkv{id}.n");
    js.create_stream(async_nats::jetstream::stream::Config {
        name: bare_stream.clone(),
        subjects: vec![format!("benchkv{id}.>")],
        max_messages_per_subject: 1,
        ..Default::default()
    })
    .await
    .map_err(|e| e.to_string())?;
    let provider = Arc::new(
        eventbroker_nats::NatsProvider::connect(
            &eventbroker_nats::NatsConfig {
                url: url.clone(),
                stream_name: format!("BENCH{id}"),
                subjects: vec![format!("bench{id}.>")],
                ..eventbroker_nats::NatsConfig::default()
            },
            &BrokerConfig::default(),
        )
        .await
        .map_err(|e| e.to_string())?,
    );
    let store = provider.keyvalue().expect("store");
    let row = increment_row("nats", "one KV put (publish, acked)", store, || {
        let (js, subject) = (js.clone(), subject.clone());
        async move {
            js.publish(subject, "1".into())
                .await
                .expect("publish")
                .await
                .expect("ack");
        }
    })
    .await;
    let _ = js.delete_stream(&bare_stream).await;
    let _ = provider.destroy().await;
    Ok(row)
}

/// Every grant row; a backend that cannot be reached gives its reason instead.
pub async fn run() -> Vec<Result<GrantRow, (String, String)>> {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut rows = vec![
        Ok(http().await),
        Ok(memory().await),
        Ok(sqlite(dir.path()).await),
    ];
    rows.push(
        postgres()
            .await
            .map_err(|e| ("increment, postgres".into(), e)),
    );
    rows.push(redis().await.map_err(|e| ("increment, redis".into(), e)));
    rows.push(nats().await.map_err(|e| ("increment, nats".into(), e)));
    rows
}
