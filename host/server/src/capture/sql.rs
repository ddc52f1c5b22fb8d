//! Installing and removing the trigger function, the triggers and the outbox.
//!
//! Every statement interpolates only checked identifiers (see [`super::is_identifier`]),
//! always double-quoted; values go through bind parameters. Install and uninstall run in one
//! transaction under an advisory lock, so hosts starting together do not race.

use sqlx::{AssertSqlSafe, PgPool, Postgres, Row, Transaction};

use super::config::CaptureConfig;
use super::{CaptureError, FUNCTION_NAME, OUTBOX_TABLE, TRIGGER_NAME, TableName, tables};

/// First key of the advisory locks taken by install, uninstall and the drainer.
pub(super) const LOCK_CLASS: i32 = 0x6576_6272; // "evbr"

/// What [`install`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallReport {
    /// Tables whose trigger was created or updated.
    pub tables: Vec<String>,
    /// Tables no longer in the config whose trigger was dropped.
    pub removed: Vec<String>,
    /// Changes waiting in the outbox.
    pub pending: i64,
}

/// What [`uninstall`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UninstallReport {
    /// Tables whose trigger was dropped.
    pub tables: Vec<String>,
    /// Unpublished changes dropped with the outbox (only with `force`).
    pub dropped_changes: i64,
    /// Whether the schema was dropped (it is kept when other objects live in it).
    pub schema_dropped: bool,
}

fn q(identifier: &str) -> String {
    format!("\"{identifier}\"")
}

/// Takes the transaction-scoped advisory lock of `schema`.
pub(super) async fn lock(
    tx: &mut Transaction<'_, Postgres>,
    schema: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2))")
        .bind(LOCK_CLASS)
        .bind(schema)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// The trigger function's definition.
fn function_sql(schema: &str) -> String {
    let (s, outbox, function) = (q(schema), q(OUTBOX_TABLE), q(FUNCTION_NAME));
    let channel = format!("{schema}_capture");
    format!(
        r#"CREATE OR REPLACE FUNCTION {s}.{function}() RETURNS trigger
LANGUAGE plpgsql AS $eventbroker$
BEGIN
    INSERT INTO {s}.{outbox} (schema_name, table_name, op, old_row, new_row)
    VALUES (
        TG_TABLE_SCHEMA,
        TG_TABLE_NAME,
        CASE TG_OP WHEN 'INSERT' THEN 'create' WHEN 'UPDATE' THEN 'update' ELSE 'delete' END,
        CASE WHEN TG_OP IN ('UPDATE', 'DELETE') THEN to_jsonb(OLD) END,
        CASE WHEN TG_OP IN ('INSERT', 'UPDATE') THEN to_jsonb(NEW) END
    );
    PERFORM pg_notify('{channel}', '');
    RETURN NULL;
END
$eventbroker$"#
    )
}

/// `(schema, table)` of every table carrying our trigger.
async fn triggered_tables(
    tx: &mut Transaction<'_, Postgres>,
    schema: &str,
) -> Result<Vec<TableName>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT n.nspname::text AS schema_name, c.relname::text AS table_name
           FROM pg_trigger t
           JOIN pg_class c ON c.oid = t.tgrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace
           JOIN pg_proc p ON p.oid = t.tgfoid
           JOIN pg_namespace pn ON pn.oid = p.pronamespace
          WHERE t.tgname = $1 AND p.proname = $2 AND pn.nspname = $3
          ORDER BY 1, 2",
    )
    .bind(TRIGGER_NAME)
    .bind(FUNCTION_NAME)
    .bind(schema)
    .fetch_all(&mut **tx)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(TableName {
                schema: row.try_get("schema_name")?,
                table: row.try_get("table_name")?,
            })
        })
        .collect()
}

async fn pending(tx: &mut Transaction<'_, Postgres>, schema: &str) -> Result<i64, sqlx::Error> {
    let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
        .bind(format!("{}.{}", q(schema), q(OUTBOX_TABLE)))
        .fetch_one(&mut **tx)
        .await?;
    if exists.is_none() {
        return Ok(0);
    }
    let sql = format!("SELECT count(*) FROM {}.{}", q(schema), q(OUTBOX_TABLE));
    sqlx::query_scalar(AssertSqlSafe(sql))
        .fetch_one(&mut **tx)
        .await
}

async fn execute(tx: &mut Transaction<'_, Postgres>, sql: String) -> Result<(), sqlx::Error> {
    sqlx::query(AssertSqlSafe(sql)).execute(&mut **tx).await?;
    Ok(())
}

/// Creates or updates the schema, outbox, function and triggers for `config`, and drops our
/// trigger from tables no longer listed. Idempotent; rows already in the outbox are kept.
///
/// # Errors
/// [`CaptureError::MissingTable`] if a watched table does not exist (nothing is changed);
/// database errors.
pub async fn install(pool: &PgPool, config: &CaptureConfig) -> Result<InstallReport, CaptureError> {
    let watched = tables(config)?;
    let schema = config.schema.as_str();
    let mut tx = pool.begin().await?;
    lock(&mut tx, schema).await?;
    for table in &watched {
        let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
            .bind(table.quoted())
            .fetch_one(&mut *tx)
            .await?;
        if exists.is_none() {
            return Err(CaptureError::MissingTable(table.to_string()));
        }
    }
    let (s, outbox) = (q(schema), q(OUTBOX_TABLE));
    execute(&mut tx, format!("CREATE SCHEMA IF NOT EXISTS {s}")).await?;
    execute(
        &mut tx,
        format!(
            "CREATE TABLE IF NOT EXISTS {s}.{outbox} (
                id bigserial PRIMARY KEY,
                event_id uuid NOT NULL DEFAULT gen_random_uuid(),
                schema_name text NOT NULL,
                table_name text NOT NULL,
                op text NOT NULL,
                old_row jsonb,
                new_row jsonb,
                txid bigint NOT NULL DEFAULT txid_current(),
                captured_at timestamptz NOT NULL DEFAULT clock_timestamp()
            )"
        ),
    )
    .await?;
    execute(&mut tx, function_sql(schema)).await?;
    let events: Vec<&str> = config
        .operations
        .iter()
        .map(|op| op.trigger_event())
        .collect();
    let mut installed = Vec::new();
    for table in &watched {
        execute(
            &mut tx,
            format!(
                "CREATE OR REPLACE TRIGGER {} AFTER {} ON {} FOR EACH ROW EXECUTE FUNCTION {s}.{}()",
                q(TRIGGER_NAME),
                events.join(" OR "),
                table.quoted(),
                q(FUNCTION_NAME),
            ),
        )
        .await?;
        installed.push(table.to_string());
    }
    let mut removed = Vec::new();
    for table in triggered_tables(&mut tx, schema).await? {
        if !watched.contains(&table) {
            execute(
                &mut tx,
                format!(
                    "DROP TRIGGER IF EXISTS {} ON {}",
                    q(TRIGGER_NAME),
                    table.quoted()
                ),
            )
            .await?;
            removed.push(table.to_string());
        }
    }
    let pending = pending(&mut tx, schema).await?;
    tx.commit().await?;
    Ok(InstallReport {
        tables: installed,
        removed,
        pending,
    })
}

/// Drops the triggers, the function, the outbox and (when nothing else lives in it) the
/// schema. Refuses while the outbox holds unpublished changes, unless `force`.
///
/// # Errors
/// [`CaptureError::Pending`] (nothing is changed); database errors.
pub async fn uninstall(
    pool: &PgPool,
    config: &CaptureConfig,
    force: bool,
) -> Result<UninstallReport, CaptureError> {
    let schema = config.schema.as_str();
    let mut tx = pool.begin().await?;
    lock(&mut tx, schema).await?;
    let pending = pending(&mut tx, schema).await?;
    if pending > 0 && !force {
        return Err(CaptureError::Pending(pending));
    }
    let mut dropped = Vec::new();
    for table in triggered_tables(&mut tx, schema).await? {
        execute(
            &mut tx,
            format!(
                "DROP TRIGGER IF EXISTS {} ON {}",
                q(TRIGGER_NAME),
                table.quoted()
            ),
        )
        .await?;
        dropped.push(table.to_string());
    }
    let s = q(schema);
    execute(
        &mut tx,
        format!("DROP FUNCTION IF EXISTS {s}.{}()", q(FUNCTION_NAME)),
    )
    .await?;
    execute(
        &mut tx,
        format!("DROP TABLE IF EXISTS {s}.{}", q(OUTBOX_TABLE)),
    )
    .await?;
    let others: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1",
    )
    .bind(schema)
    .fetch_one(&mut *tx)
    .await?;
    let functions: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = $1",
    )
    .bind(schema)
    .fetch_one(&mut *tx)
    .await?;
    // `public` is never dropped, even when empty.
    let schema_dropped = others == 0 && functions == 0 && schema != "public";
    if schema_dropped {
        execute(&mut tx, format!("DROP SCHEMA IF EXISTS {s}")).await?;
    }
    tx.commit().await?;
    Ok(UninstallReport {
        tables: dropped,
        dropped_changes: pending,
        schema_dropped,
    })
}
