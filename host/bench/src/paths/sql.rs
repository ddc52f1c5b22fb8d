//! The database provider (SQLite and PostgreSQL) with the trivial native handler, against the
//! bare SQL loop on the same database: insert each event; claim a batch; mark it completed.
//!
//! PostgreSQL is `EVENTBROKER_BENCH_POSTGRES_URL` (default the local `test` database).

use std::sync::Arc;
use std::time::{Duration, Instant};

use eventbroker::Broker;
use eventbroker::provider::Provider;
use eventbroker_sql::{SqlConfig, SqlProvider};
use sqlx::{Executor, PgPool, Row as _, SqlitePool};

use crate::harness::{self, Publishers, broker_config, event, subscribe_trivial};
use crate::paths::{Outcome, skipped};
use crate::{CpuRow, Row};

/// The claim batch of both sides (the provider's `batch_size`).
const BATCH: i64 = 64;

fn suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// The PostgreSQL database the benchmark uses.
pub fn postgres_url() -> String {
    std::env::var("EVENTBROKER_BENCH_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

async fn broker(database: SqlConfig) -> (Broker, Arc<dyn Provider>) {
    let config = broker_config();
    let provider: Arc<dyn Provider> = Arc::new(
        SqlProvider::connect(&database, &config)
            .await
            .expect("provider"),
    );
    let broker = Broker::new(config, provider.clone());
    subscribe_trivial(&broker, "trivial");
    broker.start().await.expect("start");
    (broker, provider)
}

/// The server's process name, for the CPU figures.
const POSTGRES: &str = "postgres";

async fn measure(
    database: SqlConfig,
    events: u64,
    server: Option<&'static str>,
) -> (harness::Measured, harness::Latency) {
    let (broker, provider) = broker(database).await;
    let measured = harness::broker_run(&broker, events, server).await;
    broker.stop().await.expect("stop");
    provider.close().await;
    measured
}

/// The `sqlite` row (a database file in a temporary directory).
pub async fn sqlite(events: u64) -> Row {
    let dir = tempfile::tempdir().expect("temp dir");
    bare_sqlite(&dir.path().join("warm-bare.db"), events / 10).await;
    let mut run = 0;
    let bare = harness::median_rate_cpu(None, events, || {
        run += 1;
        let path = dir.path().join(format!("bare-{run}.db"));
        async move { bare_sqlite(&path, events).await }
    })
    .await;
    let database = SqlConfig {
        url: format!("sqlite://{}", dir.path().join("broker.db").display()),
        batch_size: BATCH as usize,
        ..SqlConfig::default()
    };
    let (peak, latency) = measure(database, events, None).await;
    Row {
        path: "sqlite".into(),
        baseline: "insert + claim batch + update".into(),
        bare: bare.rate,
        broker: peak.rate,
        latency: Some(latency),
        cpu: Some(CpuRow {
            bare: bare.cpu,
            broker: peak.cpu,
        }),
    }
}

/// Drops the broker's tables (and the handler store's sequence) named after `table`.
pub async fn drop_tables(url: &str, table: &str) {
    if let Ok(pool) = PgPool::connect(url).await {
        for suffix in [
            "_deliveries",
            "_states",
            "_groups",
            "_kv",
            "_kv_usage",
            "_handlers",
            "_handler_components",
            "_handler_reports",
            "_migrations",
            "",
        ] {
            let _ = pool
                .execute(sqlx::AssertSqlSafe(format!(
                    "DROP TABLE IF EXISTS {table}{suffix}"
                )))
                .await;
        }
        let _ = pool
            .execute(sqlx::AssertSqlSafe(format!(
                "DROP SEQUENCE IF EXISTS {table}_handler_revisions"
            )))
            .await;
    }
}

/// The `postgres` row, or a skip when the database is not reachable.
pub async fn postgres(events: u64) -> Outcome {
    let url = postgres_url();
    if PgPool::connect(&url).await.is_err() {
        return Err(skipped(
            "postgres",
            format!("PostgreSQL not reachable at {url}"),
        ));
    }
    bare_postgres(&url, events / 10).await;
    let bare =
        harness::median_rate_cpu(Some(POSTGRES), events, || bare_postgres(&url, events)).await;
    let table = format!("bench_{}", suffix());
    let database = SqlConfig {
        url: url.clone(),
        table_name: table.clone(),
        batch_size: BATCH as usize,
        ..SqlConfig::default()
    };
    let (peak, latency) = measure(database, events, Some(POSTGRES)).await;
    drop_tables(&url, &table).await;
    Ok(Row {
        path: "postgres".into(),
        baseline: "insert + claim batch + update".into(),
        bare: bare.rate,
        broker: peak.rate,
        latency: Some(latency),
        cpu: Some(CpuRow {
            bare: bare.cpu,
            broker: peak.cpu,
        }),
    })
}

/// The bare loop on PostgreSQL: inserts by four publishers; one consumer claims `BATCH` rows
/// with `FOR UPDATE SKIP LOCKED` and marks them completed in one statement.
async fn bare_postgres(url: &str, events: u64) -> Duration {
    let pool = PgPool::connect(url).await.expect("connect");
    let table = format!("bench_bare_{}", suffix());
    pool.execute(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {table} (seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, \
         id TEXT NOT NULL UNIQUE, type TEXT NOT NULL, payload TEXT NOT NULL, \
         status TEXT NOT NULL, leased_until BIGINT NOT NULL DEFAULT 0)"
    )))
    .await
    .expect("create");
    let insert =
        format!("INSERT INTO {table} (id, type, payload, status) VALUES ($1, $2, $3, 'pending')");
    let claim = format!(
        "WITH c AS (SELECT seq FROM {table} WHERE status = 'pending' AND leased_until = 0 \
         ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED) \
         UPDATE {table} t SET leased_until = 1 FROM c WHERE t.seq = c.seq RETURNING t.seq, t.payload"
    );
    let complete = format!("UPDATE {table} SET status = 'completed' WHERE seq = ANY($1)");
    let started = Instant::now();
    let publishers = {
        let pool = pool.clone();
        Publishers::spawn(events, move |i| {
            let (pool, insert) = (pool.clone(), insert.clone());
            async move {
                let e = event(i);
                sqlx::query(sqlx::AssertSqlSafe(insert))
                    .bind(e.id)
                    .bind(e.event_type)
                    .bind(e.payload.to_string())
                    .execute(&pool)
                    .await
                    .expect("insert");
            }
        })
    };
    let mut done = 0u64;
    while done < events {
        let rows = sqlx::query(sqlx::AssertSqlSafe(claim.clone()))
            .bind(BATCH)
            .fetch_all(&pool)
            .await
            .expect("claim");
        if rows.is_empty() {
            tokio::task::yield_now().await;
            continue;
        }
        let seqs: Vec<i64> = rows.iter().map(|r| r.get::<i64, _>(0)).collect();
        for row in &rows {
            std::hint::black_box(row.get::<String, _>(1));
        }
        sqlx::query(sqlx::AssertSqlSafe(complete.clone()))
            .bind(&seqs)
            .execute(&pool)
            .await
            .expect("complete");
        done += seqs.len() as u64;
    }
    let elapsed = started.elapsed();
    publishers.join().await;
    pool.execute(sqlx::AssertSqlSafe(format!("DROP TABLE {table}")))
        .await
        .expect("drop");
    elapsed
}

/// The bare loop on SQLite (WAL, synchronous=NORMAL, one writer connection like the provider):
/// inserts by four publishers; one consumer claims `BATCH` rows with `UPDATE … RETURNING` and
/// marks them completed in one statement.
async fn bare_sqlite(path: &std::path::Path, events: u64) -> Duration {
    use sqlx::sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
    };
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal);
    let pool: SqlitePool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .expect("connect");
    pool.execute(
        "CREATE TABLE bare (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, \
         type TEXT NOT NULL, payload TEXT NOT NULL, status TEXT NOT NULL, \
         leased_until INTEGER NOT NULL DEFAULT 0)",
    )
    .await
    .expect("create");
    let started = Instant::now();
    let publishers = {
        let pool = pool.clone();
        Publishers::spawn(events, move |i| {
            let pool = pool.clone();
            async move {
                let e = event(i);
                sqlx::query(
                    "INSERT INTO bare (id, type, payload, status) VALUES ($1, $2, $3, 'pending')",
                )
                .bind(e.id)
                .bind(e.event_type)
                .bind(e.payload.to_string())
                .execute(&pool)
                .await
                .expect("insert");
            }
        })
    };
    let mut done = 0u64;
    while done < events {
        let rows = sqlx::query(
            "UPDATE bare SET leased_until = 1 WHERE seq IN (SELECT seq FROM bare \
             WHERE status = 'pending' AND leased_until = 0 ORDER BY seq LIMIT $1) \
             RETURNING seq, payload",
        )
        .bind(BATCH)
        .fetch_all(&pool)
        .await
        .expect("claim");
        if rows.is_empty() {
            tokio::task::yield_now().await;
            continue;
        }
        let seqs: Vec<String> = rows
            .iter()
            .map(|r| r.get::<i64, _>(0).to_string())
            .collect();
        for row in &rows {
            std::hint::black_box(row.get::<String, _>(1));
        }
        // SQLite has no arrays: a JSON array of the claimed seqs.
        sqlx::query(
            "UPDATE bare SET status = 'completed' WHERE seq IN (SELECT value FROM json_each($1))",
        )
        .bind(format!("[{}]", seqs.join(",")))
        .execute(&pool)
        .await
        .expect("complete");
        done += seqs.len() as u64;
    }
    let elapsed = started.elapsed();
    publishers.join().await;
    pool.close().await;
    elapsed
}
