//! Events to SQL values and back, exactly: timestamps are stored as Unix nanoseconds
//! (`BIGINT`), JSON (payload, metadata, per-handler outcomes) as its text, so every field of an
//! event reads back equal to what was written.

use chrono::{DateTime, Utc};
use sqlx::any::{AnyArguments, AnyRow};
use sqlx::{Any, Row};

use super::NAME;
use eventbroker::event::Event;
use eventbroker::provider::{ProviderError, StatusUpdate};

/// A query on the `Any` driver.
pub type AnyQuery<'q> = sqlx::query::Query<'q, Any, AnyArguments>;

/// The event columns, in the order [`bind_event`] binds and [`decode_event`] reads them.
pub const EVENT_COLUMNS: &str = "id, source, type, status, payload, user_id, session_id, \
     instance_id, schema, entity, operation, created_at, processed_at, completed_at, error, \
     metadata, retry_count, handlers";

/// Number of columns in [`EVENT_COLUMNS`].
pub const EVENT_COLUMN_COUNT: usize = 18;

/// `$first, $first+1, …` for `count` placeholders.
pub fn placeholders(first: usize, count: usize) -> String {
    (first..first + count)
        .map(|n| format!("${n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn encode_error(what: &str, error: impl std::fmt::Display) -> ProviderError {
    ProviderError::backend(NAME, format!("cannot encode {what}: {error}"))
}

/// A timestamp as Unix nanoseconds.
///
/// # Errors
/// A time outside 1677-09-21 … 2262-04-11, which a 64-bit nanosecond count cannot hold.
pub fn nanos(time: DateTime<Utc>, field: &str) -> Result<i64, ProviderError> {
    time.timestamp_nanos_opt().ok_or_else(|| {
        ProviderError::backend(
            NAME,
            format!("{field} {time} is outside the storable range (years 1677 to 2262)"),
        )
    })
}

fn optional_nanos(time: Option<DateTime<Utc>>, field: &str) -> Result<Option<i64>, ProviderError> {
    time.map(|t| nanos(t, field)).transpose()
}

fn time(nanos: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_nanos(nanos)
}

/// The values of an event row, ready to bind.
pub struct EventValues {
    id: String,
    source: &'static str,
    event_type: String,
    status: &'static str,
    payload: String,
    user_id: Option<i64>,
    session_id: String,
    instance_id: String,
    schema: String,
    entity: String,
    operation: String,
    created_at: i64,
    processed_at: Option<i64>,
    completed_at: Option<i64>,
    error: Option<String>,
    metadata: String,
    retry_count: i64,
    handlers: String,
}

impl EventValues {
    /// The event id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether both describe the same event: equal id and content (type, source, payload,
    /// metadata, origin fields, creation time), whatever their processing state.
    pub fn same_event(&self, other: &EventValues) -> bool {
        self.id == other.id
            && self.source == other.source
            && self.event_type == other.event_type
            && self.payload == other.payload
            && self.user_id == other.user_id
            && self.session_id == other.session_id
            && self.instance_id == other.instance_id
            && self.schema == other.schema
            && self.entity == other.entity
            && self.operation == other.operation
            && self.created_at == other.created_at
            && self.metadata == other.metadata
    }

    /// Encodes `event`.
    ///
    /// # Errors
    /// Timestamps outside the storable range; JSON that cannot be encoded.
    pub fn new(event: &Event) -> Result<Self, ProviderError> {
        Ok(EventValues {
            id: event.id.clone(),
            source: event.source.as_str(),
            event_type: event.event_type.clone(),
            status: event.status.as_str(),
            payload: serde_json::to_string(&event.payload)
                .map_err(|e| encode_error("payload", e))?,
            user_id: event.user_id,
            session_id: event.session_id.clone(),
            instance_id: event.instance_id.clone(),
            schema: event.schema.clone(),
            entity: event.entity.clone(),
            operation: event.operation.clone(),
            created_at: nanos(event.created_at, "created_at")?,
            processed_at: optional_nanos(event.processed_at, "processed_at")?,
            completed_at: optional_nanos(event.completed_at, "completed_at")?,
            error: event.error.clone(),
            metadata: serde_json::to_string(&event.metadata)
                .map_err(|e| encode_error("metadata", e))?,
            retry_count: i64::from(event.retry_count),
            handlers: serde_json::to_string(&event.handlers)
                .map_err(|e| encode_error("handler outcomes", e))?,
        })
    }

    /// Binds the [`EVENT_COLUMN_COUNT`] values in [`EVENT_COLUMNS`] order.
    pub fn bind<'q>(&self, query: AnyQuery<'q>) -> AnyQuery<'q> {
        query
            .bind(self.id.clone())
            .bind(self.source)
            .bind(self.event_type.clone())
            .bind(self.status)
            .bind(self.payload.clone())
            .bind(self.user_id)
            .bind(self.session_id.clone())
            .bind(self.instance_id.clone())
            .bind(self.schema.clone())
            .bind(self.entity.clone())
            .bind(self.operation.clone())
            .bind(self.created_at)
            .bind(self.processed_at)
            .bind(self.completed_at)
            .bind(self.error.clone())
            .bind(self.metadata.clone())
            .bind(self.retry_count)
            .bind(self.handlers.clone())
    }
}

/// The values of a [`StatusUpdate`], ready to bind.
pub struct UpdateValues {
    status: &'static str,
    error: Option<String>,
    retry_count: i64,
    handlers: String,
    processed_at: Option<i64>,
    completed_at: Option<i64>,
}

impl UpdateValues {
    /// Encodes `update`.
    ///
    /// # Errors
    /// Timestamps outside the storable range; outcomes that cannot be encoded.
    pub fn new(update: &StatusUpdate) -> Result<Self, ProviderError> {
        Ok(UpdateValues {
            status: update.status.as_str(),
            error: update.error.clone(),
            retry_count: i64::from(update.retry_count),
            handlers: serde_json::to_string(&update.handlers)
                .map_err(|e| encode_error("handler outcomes", e))?,
            processed_at: optional_nanos(update.processed_at, "processed_at")?,
            completed_at: optional_nanos(update.completed_at, "completed_at")?,
        })
    }

    /// Binds the six values: status, error, retry count, handler outcomes, processing time,
    /// completion time.
    pub fn bind<'q>(&self, query: AnyQuery<'q>) -> AnyQuery<'q> {
        query
            .bind(self.status)
            .bind(self.error.clone())
            .bind(self.retry_count)
            .bind(self.handlers.clone())
            .bind(self.processed_at)
            .bind(self.completed_at)
    }
}

fn decode_error(column: &str, error: impl std::fmt::Display) -> ProviderError {
    ProviderError::backend(NAME, format!("stored event has a bad {column}: {error}"))
}

fn get<'r, T>(row: &'r AnyRow, index: usize, column: &str) -> Result<T, ProviderError>
where
    T: sqlx::Decode<'r, Any> + sqlx::Type<Any>,
{
    row.try_get::<T, usize>(index)
        .map_err(|e| decode_error(column, e))
}

fn json<T: serde::de::DeserializeOwned>(text: &str, column: &str) -> Result<T, ProviderError> {
    serde_json::from_str(text).map_err(|e| decode_error(column, e))
}

/// Reads an event from the [`EVENT_COLUMN_COUNT`] columns starting at `offset`.
///
/// # Errors
/// A column of the wrong type or with a value the event model does not accept.
pub fn decode_event(row: &AnyRow, offset: usize) -> Result<Event, ProviderError> {
    let at = |n: usize| offset + n;
    let source: String = get(row, at(1), "source")?;
    let status: String = get(row, at(3), "status")?;
    let payload: String = get(row, at(4), "payload")?;
    let metadata: String = get(row, at(15), "metadata")?;
    let handlers: String = get(row, at(17), "handlers")?;
    let retry_count: i64 = get(row, at(16), "retry_count")?;
    Ok(Event {
        id: get(row, at(0), "id")?,
        source: source.parse().map_err(|e| decode_error("source", e))?,
        event_type: get(row, at(2), "type")?,
        status: status.parse().map_err(|e| decode_error("status", e))?,
        payload: json(&payload, "payload")?,
        user_id: get(row, at(5), "user_id")?,
        session_id: get(row, at(6), "session_id")?,
        instance_id: get(row, at(7), "instance_id")?,
        schema: get(row, at(8), "schema")?,
        entity: get(row, at(9), "entity")?,
        operation: get(row, at(10), "operation")?,
        created_at: time(get(row, at(11), "created_at")?),
        processed_at: get::<Option<i64>>(row, at(12), "processed_at")?.map(time),
        completed_at: get::<Option<i64>>(row, at(13), "completed_at")?.map(time),
        error: get(row, at(14), "error")?,
        metadata: json(&metadata, "metadata")?,
        retry_count: u32::try_from(retry_count).map_err(|e| decode_error("retry_count", e))?,
        handlers: json(&handlers, "handlers")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_and_columns() {
        assert_eq!(placeholders(3, 3), "$3, $4, $5");
        assert_eq!(placeholders(1, 0), "");
        assert_eq!(EVENT_COLUMNS.split(',').count(), EVENT_COLUMN_COUNT);
    }

    #[test]
    fn nanosecond_timestamps_round_trip() {
        let t = DateTime::parse_from_rfc3339("2026-11-27T07:19:15.123456789Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(time(nanos(t, "t").unwrap()), t);
        let far = DateTime::parse_from_rfc3339("2300-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert!(nanos(far, "created_at").is_err());
    }
}
