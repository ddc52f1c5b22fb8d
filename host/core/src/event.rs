//! The event model: what an event is, where it comes from, the states it moves through,
//! and the rules a well-formed event obeys.
//!
//! Field names and meanings follow ResolveSpec's event broker plan; the JSON form uses
//! snake_case field names and lowercase enum values.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

/// Longest accepted event type, in bytes.
pub const MAX_TYPE_LEN: usize = 255;
/// Longest accepted caller-given event id, in bytes.
pub const MAX_ID_LEN: usize = 128;
/// Longest accepted `session_id`, `schema`, `entity` and `operation`, in bytes.
pub const MAX_FIELD_LEN: usize = 255;
/// Largest accepted metadata object, in bytes of its compact JSON encoding. Metadata is kept
/// parsed, where it can take many times its encoded size (an array of zeros grows ~16×), so it
/// has a bound of its own, well below the payload's.
pub const MAX_METADATA_BYTES: usize = 64 * 1024;

/// Where an event came from.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EventSource {
    /// A database change (CRUD hooks, change capture).
    Database,
    /// A WebSocket client.
    Websocket,
    /// A browser or app front end.
    Frontend,
    /// The host itself or an operator.
    #[default]
    System,
    /// Derived events published by handlers.
    Internal,
}

impl EventSource {
    /// Every source, in declaration order.
    pub const ALL: [EventSource; 5] = [
        EventSource::Database,
        EventSource::Websocket,
        EventSource::Frontend,
        EventSource::System,
        EventSource::Internal,
    ];

    /// The lowercase name used in JSON, SQL and subjects.
    pub fn as_str(self) -> &'static str {
        match self {
            EventSource::Database => "database",
            EventSource::Websocket => "websocket",
            EventSource::Frontend => "frontend",
            EventSource::System => "system",
            EventSource::Internal => "internal",
        }
    }
}

impl fmt::Display for EventSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventSource {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventSource::ALL
            .into_iter()
            .find(|source| source.as_str() == s)
            .ok_or_else(|| ValidationError::UnknownValue {
                field: "source",
                value: s.to_owned(),
                allowed: "database, websocket, frontend, system, internal",
            })
    }
}

/// The processing state of an event.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EventStatus {
    /// Accepted, waiting for (or between) processing attempts.
    #[default]
    Pending,
    /// A worker is running its handlers.
    Processing,
    /// Every matching handler succeeded (or none matched).
    Completed,
    /// A handler failed for good: the event is a dead letter.
    Failed,
}

impl EventStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [EventStatus; 4] = [
        EventStatus::Pending,
        EventStatus::Processing,
        EventStatus::Completed,
        EventStatus::Failed,
    ];

    /// The lowercase name used in JSON and SQL.
    pub fn as_str(self) -> &'static str {
        match self {
            EventStatus::Pending => "pending",
            EventStatus::Processing => "processing",
            EventStatus::Completed => "completed",
            EventStatus::Failed => "failed",
        }
    }

    /// True for `completed` and `failed`: no more processing will happen on its own.
    pub fn is_finished(self) -> bool {
        matches!(self, EventStatus::Completed | EventStatus::Failed)
    }
}

impl fmt::Display for EventStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventStatus {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EventStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| ValidationError::UnknownValue {
                field: "status",
                value: s.to_owned(),
                allowed: "pending, processing, completed, failed",
            })
    }
}

/// Why one handler invocation failed.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The handler asked to be retried later (a transient failure).
    Retry,
    /// The handler said the event can never succeed.
    Fail,
    /// The handler did not finish within its deadline.
    Timeout,
    /// The handler panicked (native handlers).
    Panic,
    /// A WebAssembly guest ran out of fuel.
    OutOfFuel,
    /// A WebAssembly guest hit its memory limit.
    MemoryLimit,
    /// A WebAssembly guest trapped.
    Trap,
    /// The host could not run the handler (instantiation failed, handler removed, …).
    Host,
    /// The handler was at its concurrency limit: the event is deferred for this handler and
    /// retried later without counting an attempt.
    Busy,
}

impl FailureKind {
    /// The snake_case name used in JSON and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Retry => "retry",
            FailureKind::Fail => "fail",
            FailureKind::Timeout => "timeout",
            FailureKind::Panic => "panic",
            FailureKind::OutOfFuel => "out_of_fuel",
            FailureKind::MemoryLimit => "memory_limit",
            FailureKind::Trap => "trap",
            FailureKind::Host => "host",
            FailureKind::Busy => "busy",
        }
    }

    /// Whether a failure of this kind is retried unless the handler's policy says otherwise.
    ///
    /// Deterministic failures (the same input fails the same way) are not retried: out of fuel,
    /// memory limit, trap, an explicit "fail", and a panic. Timeouts, explicit "retry" requests
    /// and host-side problems are.
    pub fn retryable_by_default(self) -> bool {
        matches!(
            self,
            FailureKind::Retry | FailureKind::Timeout | FailureKind::Host | FailureKind::Busy
        )
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The record of one failed handler invocation.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    /// What kind of failure it was.
    pub kind: FailureKind,
    /// Human-readable detail: the guest's message, the trap text, the panic message.
    pub message: String,
    /// Whether the broker will retry it (within the retry budget).
    pub retryable: bool,
    /// Fuel the invocation consumed, for WebAssembly handlers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuel_used: Option<u64>,
    /// The last lines the invocation logged, oldest first (capped).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub log_tail: Vec<String>,
    /// Whether the event is to run again for this handler without counting an attempt (a
    /// canary version's failure, retried on the stable version). Failures of kind
    /// [`FailureKind::Busy`] are always deferred.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deferred: bool,
}

impl Failure {
    /// A failure of `kind` with the kind's default retry decision.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Failure {
            kind,
            message: message.into(),
            retryable: kind.retryable_by_default(),
            fuel_used: None,
            log_tail: Vec::new(),
            deferred: false,
        }
    }

    /// Whether the handler runs again for this event without counting an attempt: a busy
    /// handler, or a failure marked [`Failure::deferred`].
    pub fn is_deferral(&self) -> bool {
        self.deferred || self.kind == FailureKind::Busy
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

/// Where one handler stands with one event.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeState {
    /// The handler succeeded; retries of the event skip it.
    Succeeded,
    /// The handler failed and will be retried.
    Retrying,
    /// The handler failed for good.
    Failed,
}

/// What one handler did with one event, kept across retries and hosts.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HandlerOutcome {
    /// The subscription name (stable across restarts and hosts).
    pub handler: String,
    /// The handler version that produced the latest attempt (WebAssembly handlers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Where the handler stands.
    pub state: OutcomeState,
    /// How many times the handler ran for this event.
    pub attempts: u32,
    /// The last failure, if the last attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<Failure>,
    /// When the last attempt finished.
    pub finished_at: DateTime<Utc>,
}

/// An event, as published, stored, delivered and reported.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// Unique id: a UUID v4 unless the publisher chose one.
    pub id: String,
    /// Where the event came from.
    pub source: EventSource,
    /// Dotted type, conventionally `schema.entity.operation`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Processing state.
    #[serde(default)]
    pub status: EventStatus,
    /// Arbitrary JSON payload.
    #[serde(default)]
    pub payload: Value,
    /// The user the event concerns or came from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<i64>,
    /// The session the event came from, if any.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub session_id: String,
    /// The host instance that accepted the event.
    #[serde(default)]
    pub instance_id: String,
    /// Database schema (CRUD events).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub schema: String,
    /// Entity or table (CRUD events).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub entity: String,
    /// Operation: create, update, delete, read (CRUD events), or any verb.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub operation: String,
    /// When the event was created.
    pub created_at: DateTime<Utc>,
    /// When processing last started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processed_at: Option<DateTime<Utc>>,
    /// When the event reached `completed` or `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<DateTime<Utc>>,
    /// The last error, for failed (or retrying) events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Free-form JSON object.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub metadata: Map<String, Value>,
    /// How many times processing was retried.
    #[serde(default)]
    pub retry_count: u32,
    /// What each matching handler did, kept across retries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub handlers: Vec<HandlerOutcome>,
}

/// An event as a publisher submits it (HTTP, CLI, guests): only `type` is required; the host
/// fills id, status, timestamps and instance id.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventDraft {
    /// Caller-chosen id (default: a new UUID v4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Source (default `system`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<EventSource>,
    /// Dotted type.
    #[serde(rename = "type")]
    #[cfg_attr(
        feature = "openapi",
        schema(max_length = 255, pattern = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
    )]
    pub event_type: String,
    /// JSON payload (default `{}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
    /// User id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<i64>,
    /// Session id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// Schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    /// Entity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity: Option<String>,
    /// Operation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
    /// Metadata object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub metadata: Option<Map<String, Value>>,
    /// When the event happened (default: when it is accepted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<DateTime<Utc>>,
}

impl EventDraft {
    /// A draft of the given type with everything else defaulted.
    pub fn new(event_type: impl Into<String>) -> Self {
        EventDraft {
            event_type: event_type.into(),
            ..EventDraft::default()
        }
    }

    /// The event this draft describes, accepted by `instance_id`. Not yet validated.
    pub fn into_event(self, instance_id: &str) -> Event {
        let mut event = Event::new(
            self.source.unwrap_or_default(),
            self.event_type,
            instance_id,
        );
        if let Some(id) = self.id {
            event.id = id;
        }
        if let Some(payload) = self.payload {
            event.payload = payload;
        }
        event.user_id = self.user_id;
        event.session_id = self.session_id.unwrap_or_default();
        event.schema = self.schema.unwrap_or_default();
        event.entity = self.entity.unwrap_or_default();
        event.operation = self.operation.unwrap_or_default();
        event.metadata = self.metadata.unwrap_or_default();
        if let Some(created_at) = self.created_at {
            event.created_at = created_at;
        }
        event
    }
}

/// `schema.entity.operation`: the conventional type of a CRUD event.
///
/// # Examples
/// ```
/// assert_eq!(eventbroker::event_type("public", "users", "create"), "public.users.create");
/// ```
pub fn event_type(schema: &str, entity: &str, operation: &str) -> String {
    format!("{schema}.{entity}.{operation}")
}

impl Event {
    /// A new pending event with a fresh UUID v4, `created_at` now, an empty JSON object
    /// as payload and the given instance id.
    ///
    /// # Examples
    /// ```
    /// use eventbroker::{Event, EventSource, EventStatus};
    /// let event = Event::new(EventSource::Database, "public.users.create", "host-1");
    /// assert_eq!(event.status, EventStatus::Pending);
    /// assert_eq!(event.id.len(), 36);
    /// ```
    pub fn new(
        source: EventSource,
        event_type: impl Into<String>,
        instance_id: impl Into<String>,
    ) -> Self {
        Event {
            id: Uuid::new_v4().to_string(),
            source,
            event_type: event_type.into(),
            status: EventStatus::Pending,
            payload: Value::Object(Map::new()),
            user_id: None,
            session_id: String::new(),
            instance_id: instance_id.into(),
            schema: String::new(),
            entity: String::new(),
            operation: String::new(),
            created_at: Utc::now(),
            processed_at: None,
            completed_at: None,
            error: None,
            metadata: Map::new(),
            retry_count: 0,
            handlers: Vec::new(),
        }
    }

    /// A CRUD event: type `schema.entity.operation` with those three fields set.
    pub fn crud(
        source: EventSource,
        schema: &str,
        entity: &str,
        operation: &str,
        instance_id: impl Into<String>,
    ) -> Self {
        let mut event = Event::new(source, event_type(schema, entity, operation), instance_id);
        event.schema = schema.to_owned();
        event.entity = entity.to_owned();
        event.operation = operation.to_owned();
        event
    }

    /// Sets the payload (builder style).
    pub fn with_payload(mut self, payload: Value) -> Self {
        self.payload = payload;
        self
    }

    /// Sets one metadata key (builder style).
    pub fn with_metadata(mut self, key: impl Into<String>, value: Value) -> Self {
        self.metadata.insert(key.into(), value);
        self
    }

    /// Checks the rules every accepted event obeys.
    ///
    /// # Errors
    /// A [`ValidationError`] naming the offending field: an empty or malformed id or type,
    /// a `session_id`, `schema`, `entity` or `operation` longer than [`MAX_FIELD_LEN`],
    /// metadata whose JSON encoding is larger than [`MAX_METADATA_BYTES`], or a payload whose
    /// JSON encoding is larger than `max_payload_bytes`.
    pub fn validate(&self, max_payload_bytes: usize) -> Result<(), ValidationError> {
        validate_id(&self.id)?;
        validate_type(&self.event_type)?;
        for (field, value) in [
            ("session_id", &self.session_id),
            ("schema", &self.schema),
            ("entity", &self.entity),
            ("operation", &self.operation),
        ] {
            if value.len() > MAX_FIELD_LEN {
                return Err(ValidationError::TooLarge {
                    field,
                    size: value.len(),
                    limit: MAX_FIELD_LEN,
                });
            }
        }
        let size = encoded_size(&self.metadata);
        if size > MAX_METADATA_BYTES {
            return Err(ValidationError::TooLarge {
                field: "metadata",
                size,
                limit: MAX_METADATA_BYTES,
            });
        }
        let size = payload_size(&self.payload);
        if size > max_payload_bytes {
            return Err(ValidationError::TooLarge {
                field: "payload",
                size,
                limit: max_payload_bytes,
            });
        }
        Ok(())
    }
}

/// The size in bytes of a JSON value's compact encoding.
pub fn payload_size(value: &Value) -> usize {
    encoded_size(value)
}

/// The size in bytes of the compact JSON encoding of anything serializable.
pub fn encoded_size<T: Serialize + ?Sized>(value: &T) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    // The sink cannot fail, and JSON values and maps always serialize.
    let _ = serde_json::to_writer(&mut counter, value);
    counter.0
}

/// Checks an event id: 1 to 128 characters of letters, digits, `-`, `_`, `.` and `:`.
///
/// # Errors
/// [`ValidationError::Invalid`] naming the field `id`.
pub fn validate_id(id: &str) -> Result<(), ValidationError> {
    if id.is_empty() {
        return Err(ValidationError::Invalid {
            field: "id",
            reason: "must not be empty".into(),
        });
    }
    if id.len() > MAX_ID_LEN {
        return Err(ValidationError::Invalid {
            field: "id",
            reason: format!("is {} bytes long, the limit is {MAX_ID_LEN}", id.len()),
        });
    }
    if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
    {
        return Err(ValidationError::Invalid {
            field: "id",
            reason: format!("contains {bad:?}; allowed are letters, digits, '-', '_', '.' and ':'"),
        });
    }
    Ok(())
}

/// Checks an event type: dot-separated segments of letters, digits, `_` and `-`,
/// at most 255 bytes in all.
///
/// # Errors
/// [`ValidationError::Invalid`] naming the field `type` and the offending segment.
pub fn validate_type(event_type: &str) -> Result<(), ValidationError> {
    let invalid = |reason: String| ValidationError::Invalid {
        field: "type",
        reason,
    };
    if event_type.is_empty() {
        return Err(invalid("must not be empty".into()));
    }
    if event_type.len() > MAX_TYPE_LEN {
        return Err(invalid(format!(
            "is {} bytes long, the limit is {MAX_TYPE_LEN}",
            event_type.len()
        )));
    }
    for (index, segment) in event_type.split('.').enumerate() {
        if segment.is_empty() {
            return Err(invalid(format!(
                "{event_type:?} has an empty segment at position {}",
                index + 1
            )));
        }
        if let Some(bad) = segment
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-')))
        {
            return Err(invalid(format!(
                "{event_type:?}: segment {segment:?} contains {bad:?}; \
                 allowed are letters, digits, '_' and '-'"
            )));
        }
    }
    Ok(())
}

/// Why an event (or a value meant for one) was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// A field's value breaks a rule.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field, as named in JSON.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A field holds a value outside its closed set.
    #[error("unknown {field} {value:?}; allowed values: {allowed}")]
    UnknownValue {
        /// The field, as named in JSON.
        field: &'static str,
        /// The value given.
        value: String,
        /// The allowed values, comma-separated.
        allowed: &'static str,
    },
    /// A field is larger than allowed.
    #[error("{field} is {size} bytes, larger than the limit of {limit} bytes")]
    TooLarge {
        /// The field, as named in JSON.
        field: &'static str,
        /// Its size in bytes.
        size: usize,
        /// The configured limit in bytes.
        limit: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn new_fills_identity_and_state() {
        let event = Event::new(EventSource::Frontend, "chat.message", "host-a");
        assert!(Uuid::parse_str(&event.id).is_ok());
        assert_eq!(event.status, EventStatus::Pending);
        assert_eq!(event.instance_id, "host-a");
        assert_eq!(event.retry_count, 0);
        assert!(event.processed_at.is_none() && event.completed_at.is_none());
    }

    #[test]
    fn crud_sets_type_and_parts() {
        let event = Event::crud(EventSource::Database, "public", "users", "create", "h");
        assert_eq!(event.event_type, "public.users.create");
        assert_eq!(
            (
                event.schema.as_str(),
                event.entity.as_str(),
                event.operation.as_str()
            ),
            ("public", "users", "create")
        );
    }

    #[test]
    fn json_is_snake_case_and_round_trips() {
        let mut event = Event::crud(EventSource::Database, "public", "users", "update", "h1")
            .with_payload(json!({"id": 7}))
            .with_metadata("table", json!("users"));
        event.user_id = Some(42);
        event.session_id = "s-1".into();
        event.processed_at = Some(Utc::now());
        let text = serde_json::to_string(&event).expect("serialize");
        for key in [
            "\"type\":",
            "\"user_id\":42",
            "\"session_id\":",
            "\"instance_id\":",
            "\"created_at\":",
            "\"processed_at\":",
            "\"retry_count\":0",
            "\"source\":\"database\"",
            "\"status\":\"pending\"",
        ] {
            assert!(text.contains(key), "{key} missing from {text}");
        }
        let back: Event = serde_json::from_str(&text).expect("deserialize");
        assert_eq!(back, event);
    }

    #[test]
    fn unknown_source_and_status_are_rejected_by_name() {
        let err = "queue".parse::<EventSource>().unwrap_err();
        assert!(
            err.to_string().contains("unknown source \"queue\""),
            "{err}"
        );
        let err = "done".parse::<EventStatus>().unwrap_err();
        assert!(err.to_string().contains("status"), "{err}");
        let json = json!({"id": "a", "source": "queue", "type": "a.b", "created_at": Utc::now()});
        let err = serde_json::from_value::<Event>(json).unwrap_err();
        assert!(err.to_string().contains("queue"), "{err}");
    }

    #[test]
    fn non_object_metadata_and_unknown_fields_are_rejected() {
        let base = json!({"id": "a", "source": "system", "type": "a.b", "created_at": Utc::now()});
        let mut with_array = base.clone();
        with_array["metadata"] = json!([1, 2]);
        let err = serde_json::from_value::<Event>(with_array).unwrap_err();
        assert!(err.to_string().contains("map"), "{err}");
        let mut with_extra = base;
        with_extra["colour"] = json!("red");
        let err = serde_json::from_value::<Event>(with_extra).unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
    }

    #[test]
    fn type_rules() {
        for good in ["a", "public.users.create", "chat.message-sent", "x_1.Y_2"] {
            validate_type(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for (bad, needle) in [
            ("", "empty"),
            ("a..b", "position 2"),
            (".a", "position 1"),
            ("a.", "position 2"),
            ("a.b c", "' '"),
            ("a.*", "'*'"),
            ("a.>", "'>'"),
        ] {
            let err = validate_type(bad).expect_err(bad).to_string();
            assert!(err.contains("invalid type"), "{err}");
            assert!(err.contains(needle), "{bad}: {err}");
        }
        let long = "a".repeat(MAX_TYPE_LEN + 1);
        assert!(validate_type(&long).is_err());
    }

    #[test]
    fn id_rules() {
        validate_id("0b6f3c1e-aaaa-4bbb-8ccc-123456789abc").expect("uuid");
        validate_id("order:42").expect("caller-given");
        assert!(validate_id("").is_err());
        assert!(validate_id("has space").is_err());
        assert!(validate_id(&"x".repeat(MAX_ID_LEN + 1)).is_err());
    }

    #[test]
    fn metadata_and_text_fields_are_bounded() {
        let ok = Event::new(EventSource::System, "a.b", "h")
            .with_metadata("zeros", json!(vec![0; 1000]));
        ok.validate(1000).expect("small metadata fits");
        // An array of zeros: 2 bytes per element encoded, ~16 times that once parsed.
        let zeros = Event::new(EventSource::System, "a.b", "h")
            .with_metadata("zeros", json!(vec![0; MAX_METADATA_BYTES / 2]));
        let err = zeros.validate(usize::MAX).unwrap_err();
        assert!(
            matches!(
                err,
                ValidationError::TooLarge {
                    field: "metadata",
                    ..
                }
            ),
            "{err}"
        );
        for field in ["session_id", "schema", "entity", "operation"] {
            let mut event = Event::new(EventSource::System, "a.b", "h");
            let long = "x".repeat(MAX_FIELD_LEN + 1);
            match field {
                "session_id" => event.session_id = long,
                "schema" => event.schema = long,
                "entity" => event.entity = long,
                _ => event.operation = long,
            }
            let err = event.validate(usize::MAX).unwrap_err().to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn payload_limit_names_the_field() {
        let event = Event::new(EventSource::System, "a.b", "h")
            .with_payload(json!({"text": "x".repeat(100)}));
        event.validate(1000).expect("fits");
        let err = event.validate(50).unwrap_err();
        assert!(matches!(
            err,
            ValidationError::TooLarge {
                field: "payload",
                ..
            }
        ));
        assert!(err.to_string().contains("payload"));
        assert_eq!(payload_size(&json!({"a":1})), 7);
    }

    #[test]
    fn failure_kinds_default_retry() {
        assert!(FailureKind::Retry.retryable_by_default());
        assert!(FailureKind::Timeout.retryable_by_default());
        for kind in [
            FailureKind::Fail,
            FailureKind::OutOfFuel,
            FailureKind::MemoryLimit,
            FailureKind::Trap,
            FailureKind::Panic,
        ] {
            assert!(!kind.retryable_by_default(), "{kind}");
        }
    }
}
