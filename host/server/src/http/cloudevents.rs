//! CloudEvents 1.0 (structured `application/cloudevents+json` and binary `ce-*` headers),
//! mapped to and from [`Event`] fields.
//!
//! | CloudEvents | Event |
//! | --- | --- |
//! | `id` | `id` (a new UUID when absent is not allowed: `id` is required by the spec) |
//! | `type` | `type` (must be a valid dotted event type) |
//! | `source` | `source` when it is `database`, `websocket`, `frontend`, `system` or `internal`; otherwise `source` is `system` and the URI is kept in `metadata.ce_source` |
//! | `time` | `created_at` |
//! | `data` (JSON; `datacontenttype` absent or `application/json`) | `payload` |
//! | `subject`, `dataschema` | `metadata.ce_subject`, `metadata.ce_dataschema` |
//! | extension `userid` (integer) | `user_id` |
//! | extensions `sessionid`, `schema`, `entity`, `operation` | the fields of the same name |
//! | any other extension | `metadata.<name>` |
//!
//! On the way out (`Accept: application/cloudevents+json`) the mapping is reversed, and the
//! event's `status`, `instance_id` and `retry_count` are added as extensions `status`,
//! `instanceid` and `retrycount`.

use axum::http::HeaderMap;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use super::ApiError;
use eventbroker::event::{Event, EventDraft, EventSource};

/// The structured-mode media type.
pub const STRUCTURED: &str = "application/cloudevents+json";

const KNOWN: [&str; 9] = [
    "specversion",
    "id",
    "type",
    "source",
    "time",
    "data",
    "datacontenttype",
    "subject",
    "dataschema",
];

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_cloudevent",
        message,
    )
}

/// An event draft from a structured-mode CloudEvent (a JSON object).
///
/// # Errors
/// 422 `invalid_cloudevent` naming the attribute at fault.
pub fn from_structured(object: Map<String, Value>) -> Result<EventDraft, ApiError> {
    let mut attributes = Map::new();
    let mut data = None;
    for (key, value) in object {
        match key.as_str() {
            "data" => data = Some(value),
            "data_base64" => {
                return Err(invalid(
                    "data_base64 is not supported: event payloads must be JSON",
                ));
            }
            _ => {
                attributes.insert(key, value);
            }
        }
    }
    build(attributes, data)
}

/// An event draft from a binary-mode CloudEvent: `ce-*` headers and a JSON body.
///
/// # Errors
/// 422 `invalid_cloudevent` naming the attribute at fault, or for a body that is not JSON.
pub fn from_binary(headers: &HeaderMap, body: &[u8]) -> Result<EventDraft, ApiError> {
    let mut attributes = Map::new();
    for (name, value) in headers {
        let Some(attribute) = name.as_str().strip_prefix("ce-") else {
            continue;
        };
        let text = value
            .to_str()
            .map_err(|_| invalid(format!("header ce-{attribute} is not valid text")))?;
        attributes.insert(attribute.to_owned(), Value::String(text.to_owned()));
    }
    if let Some(content_type) = headers.get(axum::http::header::CONTENT_TYPE) {
        let content_type = content_type.to_str().unwrap_or("");
        attributes.insert(
            "datacontenttype".into(),
            Value::String(content_type.to_owned()),
        );
    }
    let data = if body.is_empty() {
        None
    } else {
        Some(
            serde_json::from_slice(body)
                .map_err(|e| invalid(format!("the body (data) is not JSON: {e}")))?,
        )
    };
    build(attributes, data)
}

fn text(attributes: &Map<String, Value>, name: &str) -> Result<Option<String>, ApiError> {
    match attributes.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(invalid(format!("{name} must be a string, got {other}"))),
    }
}

fn build(attributes: Map<String, Value>, data: Option<Value>) -> Result<EventDraft, ApiError> {
    match text(&attributes, "specversion")?.as_deref() {
        Some("1.0") => {}
        Some(other) => {
            return Err(invalid(format!(
                "specversion {other:?} is not supported; use \"1.0\""
            )));
        }
        None => return Err(invalid("specversion is required")),
    }
    let id = text(&attributes, "id")?.ok_or_else(|| invalid("id is required"))?;
    let event_type = text(&attributes, "type")?.ok_or_else(|| invalid("type is required"))?;
    let source_uri = text(&attributes, "source")?.ok_or_else(|| invalid("source is required"))?;
    if let Some(content_type) = text(&attributes, "datacontenttype")? {
        let essence = content_type.split(';').next().unwrap_or("").trim();
        if essence != "application/json" {
            return Err(invalid(format!(
                "datacontenttype {content_type:?} is not supported; event payloads are application/json"
            )));
        }
    }
    let created_at = match text(&attributes, "time")? {
        Some(time) => Some(
            DateTime::parse_from_rfc3339(&time)
                .map_err(|e| invalid(format!("time {time:?} is not RFC 3339: {e}")))?
                .with_timezone(&Utc),
        ),
        None => None,
    };
    let mut metadata = Map::new();
    let source = match source_uri.parse::<EventSource>() {
        Ok(source) => source,
        Err(_) => {
            metadata.insert("ce_source".into(), Value::String(source_uri));
            EventSource::System
        }
    };
    for (attribute, key) in [("subject", "ce_subject"), ("dataschema", "ce_dataschema")] {
        if let Some(value) = text(&attributes, attribute)? {
            metadata.insert(key.into(), Value::String(value));
        }
    }
    let mut draft = EventDraft::new(event_type);
    draft.id = Some(id);
    draft.source = Some(source);
    draft.payload = data;
    draft.created_at = created_at;
    for (name, value) in attributes {
        if KNOWN.contains(&name.as_str()) {
            continue;
        }
        match name.as_str() {
            "userid" => {
                let id = match &value {
                    Value::Number(n) => n.as_i64(),
                    Value::String(s) => s.parse().ok(),
                    _ => None,
                };
                draft.user_id = Some(id.ok_or_else(|| {
                    invalid(format!("extension userid must be an integer, got {value}"))
                })?);
            }
            "sessionid" | "schema" | "entity" | "operation" => {
                let Value::String(text) = value else {
                    return Err(invalid(format!("extension {name} must be a string")));
                };
                match name.as_str() {
                    "sessionid" => draft.session_id = Some(text),
                    "schema" => draft.schema = Some(text),
                    "entity" => draft.entity = Some(text),
                    _ => draft.operation = Some(text),
                }
            }
            _ => {
                if !name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
                {
                    return Err(invalid(format!(
                        "attribute name {name:?} is invalid: CloudEvents attribute names are lowercase letters and digits"
                    )));
                }
                metadata.insert(name, value);
            }
        }
    }
    if !metadata.is_empty() {
        draft.metadata = Some(metadata);
    }
    Ok(draft)
}

/// The structured-mode CloudEvent of an event.
pub fn to_structured(event: &Event) -> Value {
    let mut object = Map::new();
    object.insert("specversion".into(), json!("1.0"));
    object.insert("id".into(), json!(event.id));
    object.insert("type".into(), json!(event.event_type));
    let source = event
        .metadata
        .get("ce_source")
        .cloned()
        .unwrap_or_else(|| json!(event.source.as_str()));
    object.insert("source".into(), source);
    object.insert("time".into(), json!(event.created_at.to_rfc3339()));
    object.insert("datacontenttype".into(), json!("application/json"));
    object.insert("data".into(), event.payload.clone());
    for (key, attribute) in [("ce_subject", "subject"), ("ce_dataschema", "dataschema")] {
        if let Some(value) = event.metadata.get(key) {
            object.insert(attribute.into(), value.clone());
        }
    }
    if let Some(user_id) = event.user_id {
        object.insert("userid".into(), json!(user_id));
    }
    for (name, value) in [
        ("sessionid", &event.session_id),
        ("schema", &event.schema),
        ("entity", &event.entity),
        ("operation", &event.operation),
    ] {
        if !value.is_empty() {
            object.insert(name.into(), json!(value));
        }
    }
    object.insert("status".into(), json!(event.status.as_str()));
    object.insert("instanceid".into(), json!(event.instance_id));
    object.insert("retrycount".into(), json!(event.retry_count));
    for (key, value) in &event.metadata {
        let reserved = key.starts_with("ce_") || object.contains_key(key);
        let valid_name = key
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if !reserved && valid_name {
            object.insert(key.clone(), value.clone());
        }
    }
    Value::Object(object)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn structured(value: Value) -> Result<EventDraft, ApiError> {
        from_structured(value.as_object().cloned().expect("object"))
    }

    #[test]
    fn structured_maps_every_documented_attribute() {
        let draft = structured(json!({
            "specversion": "1.0", "id": "ce-1", "type": "com.example.order.created",
            "source": "https://shop.example/orders", "time": "2026-01-02T03:04:05Z",
            "subject": "order-9", "datacontenttype": "application/json",
            "data": {"total": 12}, "userid": 42, "sessionid": "s-1", "schema": "shop",
            "entity": "orders", "operation": "create", "tenant": "acme"
        }))
        .expect("valid");
        assert_eq!(draft.id.as_deref(), Some("ce-1"));
        assert_eq!(draft.event_type, "com.example.order.created");
        assert_eq!(draft.source, Some(EventSource::System));
        assert_eq!(draft.payload, Some(json!({"total": 12})));
        assert_eq!(draft.user_id, Some(42));
        assert_eq!(draft.session_id.as_deref(), Some("s-1"));
        assert_eq!(draft.entity.as_deref(), Some("orders"));
        let metadata = draft.metadata.clone().unwrap();
        assert_eq!(metadata["ce_source"], "https://shop.example/orders");
        assert_eq!(metadata["ce_subject"], "order-9");
        assert_eq!(metadata["tenant"], "acme");
        assert_eq!(
            draft.created_at.unwrap().to_rfc3339(),
            "2026-01-02T03:04:05+00:00"
        );
        let known = structured(
            json!({"specversion": "1.0", "id": "x", "type": "a.b", "source": "database"}),
        )
        .unwrap();
        assert_eq!(known.source, Some(EventSource::Database));
        assert!(known.metadata.is_none());
    }

    #[test]
    fn round_trip_through_an_event() {
        let draft = structured(json!({
            "specversion": "1.0", "id": "ce-2", "type": "a.b", "source": "/x/y",
            "data": [1, 2], "userid": "7", "tenant": "acme"
        }))
        .unwrap();
        let event = draft.into_event("host-1");
        let back = to_structured(&event);
        assert_eq!(back["source"], "/x/y");
        assert_eq!(back["data"], json!([1, 2]));
        assert_eq!(back["userid"], 7);
        assert_eq!(back["tenant"], "acme");
        assert_eq!(back["status"], "pending");
        assert_eq!(back["instanceid"], "host-1");
        assert!(back.get("ce_source").is_none());
    }

    #[test]
    fn bad_cloudevents_name_the_attribute() {
        for (value, needle) in [
            (
                json!({"id": "1", "type": "a.b", "source": "s"}),
                "specversion is required",
            ),
            (
                json!({"specversion": "0.3", "id": "1", "type": "a.b", "source": "s"}),
                "0.3",
            ),
            (
                json!({"specversion": "1.0", "type": "a.b", "source": "s"}),
                "id is required",
            ),
            (
                json!({"specversion": "1.0", "id": "1", "source": "s"}),
                "type is required",
            ),
            (
                json!({"specversion": "1.0", "id": "1", "type": "a.b"}),
                "source is required",
            ),
            (
                json!({"specversion": "1.0", "id": "1", "type": "a.b", "source": "s", "datacontenttype": "text/xml"}),
                "text/xml",
            ),
            (
                json!({"specversion": "1.0", "id": "1", "type": "a.b", "source": "s", "data_base64": "AA=="}),
                "data_base64",
            ),
            (
                json!({"specversion": "1.0", "id": "1", "type": "a.b", "source": "s", "time": "yesterday"}),
                "RFC 3339",
            ),
            (
                json!({"specversion": "1.0", "id": "1", "type": "a.b", "source": "s", "userid": "abc"}),
                "userid",
            ),
            (
                json!({"specversion": "1.0", "id": "1", "type": "a.b", "source": "s", "Bad-Name": 1}),
                "Bad-Name",
            ),
        ] {
            let err = structured(value).expect_err(needle);
            assert_eq!(err.code, "invalid_cloudevent");
            assert!(err.message.contains(needle), "{needle}: {}", err.message);
        }
    }

    #[test]
    fn binary_mode_reads_headers_and_body() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("ce-specversion", "1.0"),
            ("ce-id", "b-1"),
            ("ce-type", "a.b"),
            ("ce-source", "frontend"),
            ("ce-userid", "5"),
            ("content-type", "application/json; charset=utf-8"),
        ] {
            headers.insert(name, HeaderValue::from_static(value));
        }
        let draft = from_binary(&headers, br#"{"x": 1}"#).expect("valid");
        assert_eq!(draft.source, Some(EventSource::Frontend));
        assert_eq!(draft.user_id, Some(5));
        assert_eq!(draft.payload, Some(json!({"x": 1})));
        let err = from_binary(&headers, b"not json").unwrap_err();
        assert!(err.message.contains("not JSON"));
    }
}
