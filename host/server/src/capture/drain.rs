//! The capture task: drains the outbox into the broker in id order.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};
use sqlx::postgres::PgListener;
use sqlx::{AssertSqlSafe, PgPool, Row};
use tokio_util::sync::CancellationToken;

use super::config::CaptureConfig;
use super::{OUTBOX_TABLE, sql};
use eventbroker::broker::{Broker, BrokerError};
use eventbroker::event::{Event, EventSource};
use eventbroker::provider::ProviderError;

/// The `source` label of this event source in metrics.
const METRIC_SOURCE: &str = "capture";
/// Longest wait between attempts after a failure.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// One outbox row.
#[derive(Debug, Clone)]
pub(super) struct Change {
    pub id: i64,
    pub event_id: uuid::Uuid,
    pub schema: String,
    pub table: String,
    pub op: String,
    pub old_row: Option<Value>,
    pub new_row: Option<Value>,
    pub txid: i64,
    pub captured_at: DateTime<Utc>,
}

/// Primary-key columns by table, looked up once per table.
#[derive(Default)]
struct Keys(HashMap<(String, String), Vec<String>>);

impl Keys {
    async fn get(&mut self, pool: &PgPool, schema: &str, table: &str) -> &[String] {
        let key = (schema.to_owned(), table.to_owned());
        if !self.0.contains_key(&key) {
            let columns = sqlx::query_scalar::<_, String>(
                "SELECT a.attname::text
                   FROM pg_index i
                   JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
                  WHERE i.indrelid = to_regclass($1) AND i.indisprimary
                  ORDER BY array_position(i.indkey::int2[], a.attnum)",
            )
            .bind(format!("\"{schema}\".\"{table}\""))
            .fetch_all(pool)
            .await
            .unwrap_or_else(|error| {
                tracing::warn!(%error, schema, table, "cannot look up the primary key; events carry no id");
                Vec::new()
            });
            self.0.insert(key.clone(), columns);
        }
        self.0.get(&key).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// The record's id: the primary-key column's value, an object of the key columns when the key
/// is composite, or null without a primary key.
fn record_id(columns: &[String], row: Option<&Value>) -> Value {
    let Some(Value::Object(row)) = row else {
        return Value::Null;
    };
    match columns {
        [] => Value::Null,
        [column] => row.get(column).cloned().unwrap_or(Value::Null),
        many => Value::Object(
            many.iter()
                .map(|c| (c.clone(), row.get(c).cloned().unwrap_or(Value::Null)))
                .collect(),
        ),
    }
}

/// The event of one change: type `schema.table.op`, source `database`, id the row's
/// `event_id`, created at the change time. Payload: the new row (create); `{id, data, old}`
/// (update); `{id, old}` (delete). Metadata: `table_name`, `txid`, `capture_id`.
pub(super) fn change_event(change: &Change, key: &[String], instance_id: &str) -> Event {
    let mut event = Event::crud(
        EventSource::Database,
        &change.schema,
        &change.table,
        &change.op,
        instance_id,
    );
    event.id = change.event_id.to_string();
    event.created_at = change.captured_at;
    let old = change.old_row.clone().unwrap_or(Value::Null);
    let new = change.new_row.clone().unwrap_or(Value::Null);
    event.payload = match change.op.as_str() {
        "create" => new,
        "update" => json!({
            "id": record_id(key, change.new_row.as_ref()),
            "data": new,
            "old": old,
        }),
        _ => json!({ "id": record_id(key, change.old_row.as_ref()), "old": old }),
    };
    let mut metadata = Map::new();
    metadata.insert(
        "table_name".into(),
        Value::String(format!("{}.{}", change.schema, change.table)),
    );
    metadata.insert("txid".into(), json!(change.txid));
    metadata.insert("capture_id".into(), json!(change.id));
    event.metadata = metadata;
    event
}

/// Publishes one change; `Ok` once the broker holds its event (a duplicate counts: it was
/// published before). A change that can never become a valid event (e.g. a row larger than
/// `max_payload`) is published with a stub payload naming the problem, so it is not lost.
async fn publish(broker: &Broker, change: &Change, key: &[String]) -> Result<(), BrokerError> {
    let event = change_event(change, key, broker.instance_id());
    match broker.publish_async(event.clone()).await {
        Ok(_) | Err(BrokerError::Provider(ProviderError::Duplicate(_))) => Ok(()),
        Err(BrokerError::Invalid(invalid)) => {
            tracing::error!(
                capture_id = change.id,
                event_type = %event.event_type,
                error = %invalid,
                "captured change is not a valid event; publishing it without its rows"
            );
            broker.metrics().source_publish_failed(METRIC_SOURCE);
            let row = change.new_row.as_ref().or(change.old_row.as_ref());
            let stub = event.with_payload(json!({
                "id": record_id(key, row),
                "error": format!("the captured rows were left out: {invalid}"),
            }));
            match broker.publish_async(stub).await {
                Ok(_) | Err(BrokerError::Provider(ProviderError::Duplicate(_))) => Ok(()),
                Err(BrokerError::Invalid(invalid)) => {
                    // Not even the stub is valid (e.g. an unusable table name): nothing can
                    // ever publish this row; it is logged in full and dropped.
                    tracing::error!(
                        capture_id = change.id,
                        schema = %change.schema,
                        table = %change.table,
                        op = %change.op,
                        row = %row.map(|r| r.to_string()).unwrap_or_default(),
                        error = %invalid,
                        "captured change dropped: it cannot be expressed as an event"
                    );
                    Ok(())
                }
                Err(other) => Err(other),
            }
        }
        Err(other) => Err(other),
    }
}

/// One transaction: lock, read a batch in id order, publish, delete what was published.
/// Stops between rows when cancelled (committing what was published). Returns how many rows
/// were published, and the error that stopped the batch early.
async fn drain_once(
    pool: &PgPool,
    config: &CaptureConfig,
    broker: &Broker,
    keys: &mut Keys,
    cancel: &CancellationToken,
) -> Result<(usize, Option<BrokerError>), sqlx::Error> {
    let schema = config.schema.as_str();
    let mut tx = pool.begin().await?;
    sql::lock(&mut tx, schema).await?;
    let select = format!(
        "SELECT id, event_id, schema_name, table_name, op, old_row, new_row, txid, captured_at
           FROM \"{schema}\".\"{OUTBOX_TABLE}\" ORDER BY id LIMIT $1"
    );
    let rows = sqlx::query(AssertSqlSafe(select))
        .bind(config.batch_size as i64)
        .fetch_all(&mut *tx)
        .await?;
    let mut done = Vec::with_capacity(rows.len());
    let mut stopped = None;
    for row in &rows {
        if cancel.is_cancelled() {
            // Stopping: what was published is deleted below; the rest waits for next time.
            break;
        }
        let change = Change {
            id: row.try_get("id")?,
            event_id: row.try_get("event_id")?,
            schema: row.try_get("schema_name")?,
            table: row.try_get("table_name")?,
            op: row.try_get("op")?,
            old_row: row.try_get("old_row")?,
            new_row: row.try_get("new_row")?,
            txid: row.try_get("txid")?,
            captured_at: row.try_get("captured_at")?,
        };
        let key = keys.get(pool, &change.schema, &change.table).await.to_vec();
        match publish(broker, &change, &key).await {
            Ok(()) => done.push(change.id),
            Err(error) => {
                // Later rows wait: publishing them first would reorder changes.
                broker.metrics().source_publish_failed(METRIC_SOURCE);
                stopped = Some(error);
                break;
            }
        }
    }
    if !done.is_empty() {
        let delete = format!("DELETE FROM \"{schema}\".\"{OUTBOX_TABLE}\" WHERE id = ANY($1)");
        sqlx::query(AssertSqlSafe(delete))
            .bind(&done)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok((done.len(), stopped))
}

/// Listens on the notification channel; `None` if listening is not possible (polling only).
async fn listen(pool: &PgPool, schema: &str) -> Option<PgListener> {
    let mut listener = match PgListener::connect_with(pool).await {
        Ok(listener) => listener,
        Err(error) => {
            tracing::warn!(%error, "change capture cannot LISTEN; polling only");
            return None;
        }
    };
    if let Err(error) = listener.listen(&format!("{schema}_capture")).await {
        tracing::warn!(%error, "change capture cannot LISTEN; polling only");
        return None;
    }
    Some(listener)
}

/// The capture loop: drain until the outbox is empty, then wait for a notification, the poll
/// interval or cancellation. Failures are logged and retried with growing delays.
pub(super) async fn run(
    pool: PgPool,
    config: CaptureConfig,
    broker: Broker,
    cancel: CancellationToken,
) {
    let mut keys = Keys::default();
    let mut listener = listen(&pool, &config.schema).await;
    let mut backoff = config.poll_interval;
    loop {
        if cancel.is_cancelled() {
            break;
        }
        let wait = match drain_once(&pool, &config, &broker, &mut keys, &cancel).await {
            Ok((published, None)) => {
                backoff = config.poll_interval;
                if published > 0 {
                    tracing::debug!(published, "change capture published changes");
                }
                if published == config.batch_size {
                    continue;
                }
                config.poll_interval
            }
            Ok((published, Some(error))) => {
                tracing::warn!(%error, published, retry_in = ?backoff, "change capture could not publish; retrying");
                backoff = (backoff * 2).min(MAX_BACKOFF);
                backoff
            }
            Err(error) => {
                tracing::warn!(%error, retry_in = ?backoff, "change capture cannot read the outbox; retrying");
                backoff = (backoff * 2).min(MAX_BACKOFF);
                backoff
            }
        };
        let notified = async {
            match listener.as_mut() {
                Some(listener) => {
                    if let Err(error) = listener.recv().await {
                        tracing::debug!(%error, "change capture notification channel failed");
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = notified => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
    tracing::debug!("change capture stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(op: &str, old: Option<Value>, new: Option<Value>) -> Change {
        Change {
            id: 42,
            event_id: uuid::Uuid::new_v4(),
            schema: "shop".into(),
            table: "orders".into(),
            op: op.into(),
            old_row: old,
            new_row: new,
            txid: 7,
            captured_at: Utc::now(),
        }
    }

    #[test]
    fn events_by_operation() {
        let key = vec!["id".to_owned()];
        let created = change("create", None, Some(json!({"id": 1, "total": 5})));
        let event = change_event(&created, &key, "h");
        assert_eq!(event.event_type, "shop.orders.create");
        assert_eq!(event.source, EventSource::Database);
        assert_eq!(event.id, created.event_id.to_string());
        assert_eq!(event.payload, json!({"id": 1, "total": 5}));
        assert_eq!(event.metadata["table_name"], "shop.orders");
        assert_eq!(event.metadata["capture_id"], 42);

        let updated = change(
            "update",
            Some(json!({"id": 1, "total": 5})),
            Some(json!({"id": 1, "total": 6})),
        );
        let event = change_event(&updated, &key, "h");
        assert_eq!(event.payload["id"], 1);
        assert_eq!(event.payload["data"]["total"], 6);
        assert_eq!(event.payload["old"]["total"], 5);

        let deleted = change("delete", Some(json!({"a": 1, "b": 2, "c": 3})), None);
        let event = change_event(&deleted, &["a".to_owned(), "b".to_owned()], "h");
        assert_eq!(event.event_type, "shop.orders.delete");
        assert_eq!(event.payload["id"], json!({"a": 1, "b": 2}));
        assert_eq!(change_event(&deleted, &[], "h").payload["id"], Value::Null);
    }

    #[tokio::test]
    async fn a_republished_change_is_one_event_and_an_oversized_row_is_not_lost() {
        let config = eventbroker::config::BrokerConfig {
            max_payload: bytesize::ByteSize::b(200),
            ..Default::default()
        };
        let provider = eventbroker::provider::MemoryProvider::new(&config);
        let broker = Broker::new(config, std::sync::Arc::new(provider));
        broker.start().await.expect("start");
        let key = vec!["id".to_owned()];
        let small = change("create", None, Some(json!({"id": 1, "total": 5})));
        publish(&broker, &small, &key).await.expect("first publish");
        publish(&broker, &small, &key)
            .await
            .expect("a re-publish is accepted as a duplicate");
        let all = broker
            .provider()
            .list(&eventbroker::provider::EventFilter::default())
            .await
            .expect("list");
        assert_eq!(all.len(), 1, "one event per change");

        let big = change(
            "create",
            None,
            Some(json!({"id": 2, "blob": "x".repeat(1000)})),
        );
        publish(&broker, &big, &key)
            .await
            .expect("published without its rows");
        let stored = broker
            .provider()
            .get(&big.event_id.to_string())
            .await
            .expect("get")
            .expect("stored");
        assert_eq!(stored.payload["id"], 2);
        assert!(
            stored.payload["error"]
                .as_str()
                .unwrap_or("")
                .contains("left out"),
            "{}",
            stored.payload
        );
        broker.stop().await.expect("stop");
    }
}
