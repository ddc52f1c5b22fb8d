//! `eventbroker capture install|uninstall` against the real PostgreSQL.

use std::process::Command;

use eventbroker_testkit::services;
use sqlx::{AssertSqlSafe, PgPool};

const URL: &str = "postgres://postgres@127.0.0.1:5432/test";

fn eventbroker(args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_eventbroker"))
        .args(args)
        .output()
        .expect("run eventbroker");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

async fn count(pool: &PgPool, sql: &str, schema: &str) -> i64 {
    sqlx::query_scalar(AssertSqlSafe(sql.to_owned()))
        .bind(schema)
        .fetch_one(pool)
        .await
        .expect("count")
}

#[tokio::test]
async fn install_and_uninstall_from_the_command_line() {
    if !services::available("PostgreSQL", "127.0.0.1:5432") {
        return;
    }
    let schema = format!("capcli_{}", uuid::Uuid::new_v4().simple());
    let pool = PgPool::connect(URL).await.expect("connect");
    for sql in [
        format!("CREATE SCHEMA \"{schema}\""),
        format!("CREATE TABLE \"{schema}\".items (id int PRIMARY KEY)"),
    ] {
        sqlx::query(AssertSqlSafe(sql))
            .execute(&pool)
            .await
            .expect("setup");
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("capture.yaml");
    std::fs::write(
        &config,
        format!(
            "capture:\n  url: {URL}\n  tables: [\"{schema}.items\"]\n  operations: [create, delete]\n  schema: {schema}_cb\n"
        ),
    )
    .expect("write config");
    let config = config.to_str().expect("utf-8 path");
    let triggers = "SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid \
                    JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND NOT t.tgisinternal";

    for _ in 0..2 {
        let (ok, out) = eventbroker(&["capture", "install", "--config", config]);
        assert!(ok, "{out}");
        assert!(
            out.contains(&format!("triggers on {schema}.items")),
            "{out}"
        );
    }
    assert_eq!(count(&pool, triggers, &schema).await, 1);

    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO \"{schema}\".items VALUES (1)"
    )))
    .execute(&pool)
    .await
    .expect("insert");
    let (ok, out) = eventbroker(&["capture", "uninstall", "--config", config]);
    assert!(!ok, "uninstall must refuse while changes wait: {out}");
    assert!(out.contains("--force"), "{out}");
    let (ok, out) = eventbroker(&["capture", "uninstall", "--config", config, "--force"]);
    assert!(ok, "{out}");
    assert!(out.contains("1 unpublished changes were dropped"), "{out}");
    assert_eq!(count(&pool, triggers, &schema).await, 0);
    let schemas = "SELECT count(*) FROM pg_namespace WHERE nspname = $1";
    assert_eq!(count(&pool, schemas, &format!("{schema}_cb")).await, 0);

    let (ok, out) = eventbroker(&["capture", "install", "--config", "/nonexistent.yaml"]);
    assert!(!ok && out.contains("cannot read config file"), "{out}");
    sqlx::query(AssertSqlSafe(format!("DROP SCHEMA \"{schema}\" CASCADE")))
        .execute(&pool)
        .await
        .expect("cleanup");
}
