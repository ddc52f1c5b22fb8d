//! Broker + database provider + a trivial native handler, against the bare SQL loop on the same
//! database (insert each event; claim a batch; mark the batch completed), measured in the same
//! run, for SQLite and (when reachable) PostgreSQL.
//!
//!     cargo bench -p eventbroker-sql --bench sql [-- EVENTS]
//!
//! PostgreSQL is `EVENTBROKER_BENCH_POSTGRES_URL` (default the local `test` database); it is
//! skipped with a message when unreachable.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use eventbroker::provider::Provider;
use eventbroker::{Broker, BrokerConfig, Event, EventSource, EventStatus, handler_fn};
use eventbroker_sql::{SqlConfig as DatabaseConfig, SqlProvider};
use sqlx::{Executor, PgPool, Row, SqlitePool};

/// Publisher tasks on both sides.
const PUBLISHERS: u64 = 4;
/// The claim batch of both sides (the provider's `batch_size`).
const BATCH: i64 = 64;

fn event(i: u64) -> Event {
    Event::new(EventSource::System, "bench.tick", "bench").with_payload(serde_json::json!({"n": i}))
}

fn rate(events: u64, elapsed: Duration) -> f64 {
    events as f64 / elapsed.as_secs_f64()
}

fn suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// Events/s through `publish_async` → provider → worker pool → trivial handler → completed.
async fn broker(database: DatabaseConfig, events: u64) -> f64 {
    let config = BrokerConfig {
        instance_id: "bench".into(),
        buffer_size: 10_000,
        ..BrokerConfig::default()
    };
    let provider: Arc<dyn Provider> = Arc::new(
        SqlProvider::connect(&database, &config)
            .await
            .expect("provider"),
    );
    let broker = Broker::new(config, provider.clone());
    let seen = Arc::new(AtomicU64::new(0));
    let counter = seen.clone();
    broker
        .subscribe(
            "bench.*",
            handler_fn(move |_, event| {
                let counter = counter.clone();
                async move {
                    std::hint::black_box(&event.payload);
                    counter.fetch_add(1, Ordering::Relaxed);
                    Ok(())
                }
            }),
        )
        .expect("subscribe");
    broker.start().await.expect("start");
    let started = Instant::now();
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let broker = broker.clone();
            tokio::spawn(async move {
                for i in (p..events).step_by(PUBLISHERS as usize) {
                    broker.publish_async(event(i)).await.expect("publish");
                }
            })
        })
        .collect();
    for publisher in publishers {
        publisher.await.expect("publisher");
    }
    // Done when every event is recorded as completed, not merely handled (counting by
    // status scans the table, so look only once the handler saw everything).
    while seen.load(Ordering::Relaxed) < events {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    loop {
        let stats = provider.stats().await.expect("stats");
        if stats.by_status[EventStatus::Completed.as_str()] >= events {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    assert_eq!(
        seen.load(Ordering::Relaxed),
        events,
        "each event handled once"
    );
    broker.stop().await.expect("stop");
    rate(events, elapsed)
}

/// The bare loop on PostgreSQL: inserts by four publishers; one consumer claims `BATCH` rows
/// with `FOR UPDATE SKIP LOCKED` and marks them completed in one statement.
async fn bare_postgres(url: &str, events: u64) -> f64 {
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
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let pool = pool.clone();
            let insert = insert.clone();
            tokio::spawn(async move {
                for i in (p..events).step_by(PUBLISHERS as usize) {
                    let e = event(i);
                    sqlx::query(sqlx::AssertSqlSafe(insert.clone()))
                        .bind(e.id)
                        .bind(e.event_type)
                        .bind(e.payload.to_string())
                        .execute(&pool)
                        .await
                        .expect("insert");
                }
            })
        })
        .collect();
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
    for publisher in publishers {
        publisher.await.expect("publisher");
    }
    pool.execute(sqlx::AssertSqlSafe(format!("DROP TABLE {table}")))
        .await
        .expect("drop");
    rate(events, elapsed)
}

/// The bare loop on SQLite (WAL, synchronous=NORMAL, one writer connection like the provider):
/// inserts by four publishers; one consumer claims `BATCH` rows with `UPDATE … RETURNING` and
/// marks them completed in one statement.
async fn bare_sqlite(path: &std::path::Path, events: u64) -> f64 {
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
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let pool = pool.clone();
            tokio::spawn(async move {
                for i in (p..events).step_by(PUBLISHERS as usize) {
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
        })
        .collect();
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
    for publisher in publishers {
        publisher.await.expect("publisher");
    }
    pool.close().await;
    rate(events, elapsed)
}

fn print(name: &str, events: u64, bare: f64, full: f64) {
    println!("{name}: events: {events}, batch: {BATCH}");
    println!(
        "  baseline: bare insert + claim + update loop:                 {bare:>10.0} events/s"
    );
    println!(
        "  broker:   publish_async -> {name} provider -> workers -> handler: {full:>10.0} events/s"
    );
    println!("  ratio broker/baseline: {:.3}", full / bare);
}

fn main() {
    let events: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let sqlite = |name: &str| DatabaseConfig {
            url: format!("sqlite://{}", dir.path().join(name).display()),
            batch_size: BATCH as usize,
            ..DatabaseConfig::default()
        };
        // Warm up once, then measure.
        bare_sqlite(&dir.path().join("warm-bare.db"), events / 10).await;
        broker(sqlite("warm.db"), events / 10).await;
        let bare = bare_sqlite(&dir.path().join("bare.db"), events).await;
        let full = broker(sqlite("broker.db"), events).await;
        print("sqlite", events, bare, full);

        let url = std::env::var("EVENTBROKER_BENCH_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        if PgPool::connect(&url).await.is_err() {
            println!("postgres: SKIPPED, not reachable at {url}");
            return;
        }
        let tables = [format!("bench_{}", suffix()), format!("bench_{}", suffix())];
        let postgres = |table: &str| DatabaseConfig {
            url: url.clone(),
            table_name: table.to_owned(),
            batch_size: BATCH as usize,
            ..DatabaseConfig::default()
        };
        bare_postgres(&url, events / 10).await;
        broker(postgres(&tables[0]), events / 10).await;
        let bare = bare_postgres(&url, events).await;
        let full = broker(postgres(&tables[1]), events).await;
        print("postgres", events, bare, full);
        // Drop the broker's tables of the warm-up and measured runs.
        if let Ok(pool) = PgPool::connect(&url).await {
            for table in &tables {
                for suffix in ["_deliveries", "_groups", "_migrations", ""] {
                    let _ = pool
                        .execute(sqlx::AssertSqlSafe(format!(
                            "DROP TABLE IF EXISTS {table}{suffix}"
                        )))
                        .await;
                }
            }
        }
    });
}
