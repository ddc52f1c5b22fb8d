//! PostgreSQL change capture end to end: a host watching tables of the real PostgreSQL
//! (127.0.0.1:5432, database `test`), each test in its own schemas.

use std::time::{SystemTime, UNIX_EPOCH};

use eventbroker::provider::SortOrder;
use eventbroker::{Event, EventFilter, EventStatus};
use eventbroker_server::capture;
use eventbroker_server::config::CaptureConfig;
use eventbroker_tests::guests;
use eventbroker_tests::host::{TestHost, install};
use eventbroker_tests::{services, wait_for};
use serde_json::json;
use sqlx::{AssertSqlSafe, PgPool};

const URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A unique name prefix for this test's schemas.
fn unique(test: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("cap_{test}_{}_{nanos}", std::process::id())
}

async fn exec(pool: &PgPool, sql: String) {
    sqlx::query(AssertSqlSafe(sql.clone()))
        .execute(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// The watched database with a fresh schema holding `orders`; `None` (after a loud skip)
/// without PostgreSQL.
async fn database(test: &str) -> Option<(PgPool, String)> {
    if !services::available("PostgreSQL", "127.0.0.1:5432") {
        return None;
    }
    let pool = PgPool::connect(URL).await.expect("connect to PostgreSQL");
    let schema = unique(test);
    exec(&pool, format!("CREATE SCHEMA \"{schema}\"")).await;
    exec(
        &pool,
        format!("CREATE TABLE \"{schema}\".orders (id serial PRIMARY KEY, item text NOT NULL, qty int NOT NULL)"),
    )
    .await;
    Some((pool, schema))
}

fn capture_config(schema: &str) -> CaptureConfig {
    CaptureConfig {
        url: URL.into(),
        tables: vec![format!("{schema}.orders")],
        schema: format!("{schema}_cb"),
        ..CaptureConfig::default()
    }
}

/// A host capturing `schema.orders`, with the audit logger handling every event.
async fn host(schema: &str) -> TestHost {
    let built = guests::build();
    let capture = capture_config(schema);
    TestHost::start(move |config, dir| {
        config.capture = capture;
        let manifest =
            std::fs::read_to_string(built.guest_dir("rust-audit-logger").join("manifest.toml"))
                .expect("manifest");
        install(
            dir,
            "audit-logger",
            &built.guest("rust_audit_logger"),
            Some(&manifest),
        );
    })
    .await
}

/// The finished events of `schema`, oldest first, once there are `count` of them.
async fn finished_events(host: &TestHost, schema: &str, count: usize) -> Vec<Event> {
    let provider = host.service.broker().provider().clone();
    let filter = EventFilter {
        schema: Some(schema.to_owned()),
        order: SortOrder::Asc,
        ..EventFilter::default()
    };
    wait_for(&format!("{count} finished events of {schema}"), || {
        let provider = provider.clone();
        let filter = filter.clone();
        async move {
            let events = provider.list(&filter).await.expect("list");
            (events.len() >= count && events.iter().all(|e| e.status.is_finished()))
                .then_some(events)
        }
    })
    .await
}

fn assert_handled(event: &Event) {
    assert_eq!(event.status, EventStatus::Completed, "{event:#?}");
    assert_eq!(event.source.as_str(), "database");
    let audit = event
        .handlers
        .iter()
        .find(|o| o.handler == "audit-logger")
        .unwrap_or_else(|| panic!("the WASM handler did not run: {event:#?}"));
    assert_eq!(audit.attempts, 1);
}

async fn cleanup(pool: &PgPool, schema: &str) {
    exec(pool, format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE")).await;
    exec(
        pool,
        format!("DROP SCHEMA IF EXISTS \"{schema}_cb\" CASCADE"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_changes_become_events_handled_by_wasm() {
    let Some((pool, schema)) = database("live").await else {
        return;
    };
    let host = host(&schema).await;
    let orders = format!("\"{schema}\".orders");
    exec(
        &pool,
        format!("INSERT INTO {orders} (item, qty) VALUES ('tea', 1)"),
    )
    .await;
    exec(
        &pool,
        format!("UPDATE {orders} SET qty = 2 WHERE item = 'tea'"),
    )
    .await;
    exec(&pool, format!("DELETE FROM {orders} WHERE item = 'tea'")).await;
    // A rolled-back change is never published.
    let mut tx = pool.begin().await.expect("begin");
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {orders} (item, qty) VALUES ('ghost', 9)"
    )))
    .execute(&mut *tx)
    .await
    .expect("insert");
    tx.rollback().await.expect("rollback");
    // Several rows in one transaction: one event each, in order.
    exec(
        &pool,
        format!("INSERT INTO {orders} (item, qty) VALUES ('a', 1), ('b', 2), ('c', 3)"),
    )
    .await;

    let events = finished_events(&host, &schema, 6).await;
    let summary: Vec<(String, String)> = events
        .iter()
        .map(|e| (e.event_type.clone(), e.payload.to_string()))
        .collect();
    assert_eq!(events.len(), 6, "{summary:#?}");
    let types: Vec<&str> = events.iter().map(|e| e.operation.as_str()).collect();
    assert_eq!(
        types,
        ["create", "update", "delete", "create", "create", "create"],
        "{summary:#?}"
    );
    for event in &events {
        assert_handled(event);
        assert_eq!(event.entity, "orders");
        assert_eq!(event.metadata["table_name"], format!("{schema}.orders"));
        assert!(event.event_type.starts_with(&format!("{schema}.orders.")));
    }
    assert_eq!(events[0].payload["item"], "tea");
    assert_eq!(events[0].payload["qty"], 1);
    assert_eq!(events[1].payload["id"], events[0].payload["id"]);
    assert_eq!(events[1].payload["data"]["qty"], 2);
    assert_eq!(events[1].payload["old"]["qty"], 1);
    assert_eq!(
        events[2].payload,
        json!({"id": events[0].payload["id"], "old": {"id": events[0].payload["id"], "item": "tea", "qty": 2}})
    );
    let items: Vec<&str> = events[3..]
        .iter()
        .map(|e| e.payload["item"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(items, ["a", "b", "c"]);
    assert!(
        !summary.iter().any(|(_, p)| p.contains("ghost")),
        "rolled back change published"
    );

    host.stop().await;
    // The outbox is empty: every published change was removed.
    let left: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM \"{schema}_cb\".capture_outbox"
    )))
    .fetch_one(&pool)
    .await
    .expect("count");
    assert_eq!(left, 0);
    cleanup(&pool, &schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_while_the_host_is_down_are_published_at_start() {
    let Some((pool, schema)) = database("down").await else {
        return;
    };
    let orders = format!("\"{schema}\".orders");
    // First start installs the triggers.
    let first = host(&schema).await;
    exec(
        &pool,
        format!("INSERT INTO {orders} (item, qty) VALUES ('before', 1)"),
    )
    .await;
    let before = finished_events(&first, &schema, 1).await;
    assert_handled(&before[0]);
    first.stop().await;

    // The host is down: these changes wait in the outbox.
    exec(
        &pool,
        format!("INSERT INTO {orders} (item, qty) VALUES ('while-down', 5)"),
    )
    .await;
    exec(
        &pool,
        format!("UPDATE {orders} SET qty = 6 WHERE item = 'while-down'"),
    )
    .await;
    let waiting: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM \"{schema}_cb\".capture_outbox"
    )))
    .fetch_one(&pool)
    .await
    .expect("count");
    assert_eq!(waiting, 2, "changes wait in the outbox while no host runs");

    // The memory provider of the new host starts empty: it sees exactly the missed changes.
    let second = host(&schema).await;
    let events = finished_events(&second, &schema, 2).await;
    let ops: Vec<(&str, &serde_json::Value)> = events
        .iter()
        .map(|e| (e.operation.as_str(), &e.payload))
        .collect();
    assert_eq!(events.len(), 2, "{ops:#?}");
    assert_eq!(events[0].operation, "create");
    assert_eq!(events[0].payload["item"], "while-down");
    assert_eq!(events[1].operation, "update");
    assert_eq!(events[1].payload["data"]["qty"], 6);
    for event in &events {
        assert_handled(event);
    }
    second.stop().await;

    // Uninstall removes everything it installed, and install is idempotent.
    let config = capture_config(&schema);
    let capture_pool = capture::connect(&config).await.expect("connect");
    capture::install(&capture_pool, &config)
        .await
        .expect("install again");
    let report = capture::install(&capture_pool, &config)
        .await
        .expect("install is idempotent");
    assert_eq!(report.tables, [format!("{schema}.orders")]);
    assert_eq!(report.pending, 0);
    let report = capture::uninstall(&capture_pool, &config, false)
        .await
        .expect("uninstall");
    assert_eq!(report.tables, [format!("{schema}.orders")]);
    assert!(report.schema_dropped);
    let triggers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND NOT t.tgisinternal",
    )
    .bind(&schema)
    .fetch_one(&pool)
    .await
    .expect("count triggers");
    assert_eq!(triggers, 0);
    let outbox_schema: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_namespace WHERE nspname = $1")
            .bind(format!("{schema}_cb"))
            .fetch_one(&pool)
            .await
            .expect("count schemas");
    assert_eq!(outbox_schema, 0);
    // Changes after uninstall are not captured (the table works as before).
    exec(
        &pool,
        format!("INSERT INTO {orders} (item, qty) VALUES ('after', 1)"),
    )
    .await;
    capture_pool.close().await;
    cleanup(&pool, &schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uninstall_refuses_to_drop_unpublished_changes_and_missing_tables_are_errors() {
    let Some((pool, schema)) = database("guard").await else {
        return;
    };
    let config = capture_config(&schema);
    let capture_pool = capture::connect(&config).await.expect("connect");
    capture::install(&capture_pool, &config)
        .await
        .expect("install");
    exec(
        &pool,
        format!("INSERT INTO \"{schema}\".orders (item, qty) VALUES ('x', 1)"),
    )
    .await;
    let error = capture::uninstall(&capture_pool, &config, false)
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("1 captured changes not yet published"),
        "{error}"
    );
    let report = capture::uninstall(&capture_pool, &config, true)
        .await
        .expect("forced");
    assert_eq!(report.dropped_changes, 1);

    let mut missing = config.clone();
    missing.tables.push(format!("{schema}.nope"));
    let error = capture::install(&capture_pool, &missing).await.unwrap_err();
    assert!(
        error.to_string().contains(&format!("{schema}.nope")),
        "{error}"
    );
    capture_pool.close().await;
    cleanup(&pool, &schema).await;
}
