//! CloudEvents 1.0 (structured `application/cloudevents+json` and binary `ce-*` headers),
//! mapped to and from [`Event`] fields.
//!
//! | CloudEvents | Event |
//! | --- | --- |
//! | `id` | `id` when it is a valid event id (letters, digits, `-_.:`, at most 128 bytes); any other id the spec allows (a non-empty string) becomes a UUID v5 of source and id, and the original is kept in `metadata.ce_id` and given back as `id` |
//! | `type` | `type` (must be a valid dotted event type) |
//! | `source` | `source` when it is `database`, `websocket`, `frontend`, `system` or `internal`; otherwise `source` is `system` and the URI is kept in `metadata.ce_source` |
//! | `time` | `created_at` |
//! | `data` with `datacontenttype` absent or JSON (`application/json`, `…+json`) | `payload` |
//! | `data` of another content type (text, XML…) | `payload` as a JSON string, `metadata.ce_datacontenttype` |
//! | `data_base64` (binary data; in binary mode, a body that is not UTF-8 text) | `payload` as the base64 text, `metadata.ce_data_base64 = true`, `metadata.ce_datacontenttype` |
//! | no data | `payload` `null`, and no `data` on the way out |
//! | `subject`, `dataschema` | `metadata.ce_subject`, `metadata.ce_dataschema` |
//! | extension `userid` (integer) | `user_id` |
//! | extensions `sessionid`, `schema`, `entity`, `operation` | the fields of the same name |
//! | any other extension | `metadata.<name>` |
//!
//! Binary-mode `ce-*` header values are percent-decoded (the HTTP binding encodes characters
//! outside printable ASCII, `"` and `%`). A batch (`application/cloudevents-batch+json`, a JSON
//! array of structured events) is accepted on `POST /v1/events` as on `/v1/events/batch`.
//!
//! On the way out (`Accept: application/cloudevents+json`) the mapping is reversed, and the
//! event's `status`, `instance_id` and `retry_count` are added as extensions `status`,
//! `instanceid` and `retrycount`.

use axum::http::HeaderMap;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use super::ApiError;
use eventbroker::event::{Event, EventDraft, EventSource, validate_id};

/// The structured-mode media type.
pub const STRUCTURED: &str = "application/cloudevents+json";

/// The batch media type.
pub const BATCH: &str = "application/cloudevents-batch+json";

/// The data of a CloudEvent, as it arrived.
enum Data {
    /// No data.
    Absent,
    /// `data`, a JSON value (of a JSON content type, or text of another).
    Value(Value),
    /// `data_base64`, or a binary-mode body that is not text: the base64 text.
    Base64(String),
}

/// Whether a content type carries JSON (`application/json`, `text/json`, `…+json`).
fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence == "text/json" || essence.ends_with("+json")
}

const KNOWN: [&str; 10] = [
    "data_base64",
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
    let mut data = Data::Absent;
    let mut base64 = None;
    for (key, value) in object {
        match key.as_str() {
            "data" => data = Data::Value(value),
            "data_base64" => base64 = Some(value),
            _ => {
                attributes.insert(key, value);
            }
        }
    }
    if let Some(encoded) = base64 {
        if !matches!(data, Data::Absent) {
            return Err(invalid("data and data_base64 are both set; send one"));
        }
        let Value::String(encoded) = encoded else {
            return Err(invalid("data_base64 must be a string"));
        };
        BASE64
            .decode(encoded.as_bytes())
            .map_err(|e| invalid(format!("data_base64 is not base64: {e}")))?;
        data = Data::Base64(encoded);
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
        let decoded = percent_encoding::percent_decode_str(text)
            .decode_utf8()
            .map_err(|_| {
                invalid(format!(
                    "header ce-{attribute} is not UTF-8 once percent-decoded"
                ))
            })?;
        attributes.insert(attribute.to_owned(), Value::String(decoded.into_owned()));
    }
    let content_type = match headers.get(axum::http::header::CONTENT_TYPE) {
        Some(value) => {
            let text = value
                .to_str()
                .map_err(|_| invalid("the Content-Type header is not valid text"))?;
            attributes.insert("datacontenttype".into(), Value::String(text.to_owned()));
            Some(text.to_owned())
        }
        None => None,
    };
    let data = if body.is_empty() {
        Data::Absent
    } else if content_type.as_deref().is_none_or(is_json) {
        Data::Value(
            serde_json::from_slice(body)
                .map_err(|e| invalid(format!("the body (data) is not JSON: {e}")))?,
        )
    } else {
        match std::str::from_utf8(body) {
            Ok(text) => Data::Value(Value::String(text.to_owned())),
            Err(_) => Data::Base64(BASE64.encode(body)),
        }
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

fn build(attributes: Map<String, Value>, data: Data) -> Result<EventDraft, ApiError> {
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
    if id.is_empty() {
        return Err(invalid("id must not be empty"));
    }
    let event_type = text(&attributes, "type")?.ok_or_else(|| invalid("type is required"))?;
    let source_uri = text(&attributes, "source")?.ok_or_else(|| invalid("source is required"))?;
    if source_uri.is_empty() {
        return Err(invalid("source must not be empty"));
    }
    let content_type = text(&attributes, "datacontenttype")?;
    let created_at = match text(&attributes, "time")? {
        Some(time) => Some(
            DateTime::parse_from_rfc3339(&time)
                .map_err(|e| invalid(format!("time {time:?} is not RFC 3339: {e}")))?
                .with_timezone(&Utc),
        ),
        None => None,
    };
    let mut metadata = Map::new();
    // Ids unique per source, as the spec allows, that are not valid event ids: a stable id
    // derived from both, the original given back on the way out.
    let event_id =
        if validate_id(&id).is_ok() && !super::events::RESERVED_IDS.contains(&id.as_str()) {
            id
        } else {
            let derived = uuid::Uuid::new_v5(
                &uuid::Uuid::NAMESPACE_URL,
                format!("{source_uri}\n{id}").as_bytes(),
            );
            metadata.insert("ce_id".into(), Value::String(id));
            derived.to_string()
        };
    let payload = match data {
        Data::Absent => Value::Null,
        Data::Value(value) => {
            if let Some(content_type) = content_type.as_ref().filter(|c| !is_json(c)) {
                metadata.insert(
                    "ce_datacontenttype".into(),
                    Value::String(content_type.clone()),
                );
            }
            value
        }
        Data::Base64(encoded) => {
            if let Some(content_type) = &content_type {
                metadata.insert(
                    "ce_datacontenttype".into(),
                    Value::String(content_type.clone()),
                );
            }
            metadata.insert("ce_data_base64".into(), Value::Bool(true));
            Value::String(encoded)
        }
    };
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
    draft.id = Some(event_id);
    draft.source = Some(source);
    draft.payload = Some(payload);
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
    let id = event
        .metadata
        .get("ce_id")
        .cloned()
        .unwrap_or_else(|| json!(event.id));
    object.insert("id".into(), id);
    object.insert("type".into(), json!(event.event_type));
    let source = event
        .metadata
        .get("ce_source")
        .cloned()
        .unwrap_or_else(|| json!(event.source.as_str()));
    object.insert("source".into(), source);
    object.insert("time".into(), json!(event.created_at.to_rfc3339()));
    let content_type = event.metadata.get("ce_datacontenttype").cloned();
    let base64 = event.metadata.get("ce_data_base64") == Some(&Value::Bool(true));
    match (&event.payload, base64) {
        (Value::Null, _) => {}
        (Value::String(encoded), true) => {
            if let Some(content_type) = content_type {
                object.insert("datacontenttype".into(), content_type);
            }
            object.insert("data_base64".into(), json!(encoded));
        }
        (payload, _) => {
            object.insert(
                "datacontenttype".into(),
                content_type.unwrap_or_else(|| json!("application/json")),
            );
            object.insert("data".into(), payload.clone());
        }
    }
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
                json!({"specversion": "1.0", "id": "1", "type": "a.b", "source": "s", "data": 1, "data_base64": "AA=="}),
                "both set",
            ),
            (
                json!({"specversion": "1.0", "id": "1", "type": "a.b", "source": "s", "data_base64": "not base64!"}),
                "not base64",
            ),
            (
                json!({"specversion": "1.0", "id": "", "type": "a.b", "source": "s"}),
                "id must not be empty",
            ),
            (
                json!({"specversion": "1.0", "id": "1", "type": "a.b", "source": ""}),
                "source must not be empty",
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

    /// The examples of the CloudEvents JSON format specification (section 3.1 and appendix),
    /// each published and given back as it came.
    #[test]
    fn the_specs_examples_round_trip() {
        let examples = [
            // JSON data.
            json!({
                "specversion": "1.0", "type": "com.example.someevent", "source": "/mycontext",
                "id": "A234-1234-1234", "time": "2018-04-05T17:31:00Z",
                "comexampleextension1": "value", "comexampleothervalue": 5,
                "datacontenttype": "application/json", "data": {"appinfoA": "abc", "appinfoB": 123, "appinfoC": true}
            }),
            // Binary data.
            json!({
                "specversion": "1.0", "type": "com.example.someevent", "source": "/mycontext",
                "id": "B234-1234-1234", "time": "2018-04-05T17:31:00Z",
                "comexampleextension1": "value", "comexampleothervalue": 5,
                "datacontenttype": "application/vnd.apache.thrift.binary", "data_base64": "Zm9vYmFyCg=="
            }),
            // Text (XML) data.
            json!({
                "specversion": "1.0", "type": "com.example.someevent", "source": "/mycontext",
                "id": "C234-1234-1234", "time": "2018-04-05T17:31:00Z",
                "comexampleextension1": "value", "comexampleothervalue": 5,
                "datacontenttype": "application/xml", "data": "<much wow=\"xml\"/>"
            }),
            // No data at all.
            json!({
                "specversion": "1.0", "type": "com.example.someevent", "source": "/mycontext",
                "id": "D234-1234-1234", "time": "2018-04-05T17:31:00Z"
            }),
            // An id the spec allows that is not a valid event id here.
            json!({
                "specversion": "1.0", "type": "com.example.someevent", "source": "/mycontext",
                "id": "order 42/übung", "time": "2018-04-05T17:31:00Z", "data": [1]
            }),
        ];
        for example in examples {
            let draft = structured(example.clone()).expect("a spec example is valid");
            let event = draft.into_event("host-1");
            event.validate(1 << 20).expect("a valid event");
            let back = to_structured(&event);
            for (key, value) in example.as_object().unwrap() {
                let given = if key == "time" {
                    json!(
                        DateTime::parse_from_rfc3339(value.as_str().unwrap())
                            .unwrap()
                            .with_timezone(&Utc)
                            .to_rfc3339()
                    )
                } else {
                    value.clone()
                };
                assert_eq!(back.get(key), Some(&given), "{key} of {example}");
            }
            for absent in ["data", "data_base64", "datacontenttype"] {
                if example.get(absent).is_none() && absent != "datacontenttype" {
                    assert!(back.get(absent).is_none(), "{absent} stays absent: {back}");
                }
            }
        }
        // The derived id is stable: the same source and id always map to the same event.
        let a =
            structured(json!({"specversion": "1.0", "type": "a.b", "source": "/s", "id": "x y"}))
                .unwrap();
        let b =
            structured(json!({"specversion": "1.0", "type": "a.b", "source": "/s", "id": "x y"}))
                .unwrap();
        let c =
            structured(json!({"specversion": "1.0", "type": "a.b", "source": "/t", "id": "x y"}))
                .unwrap();
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, c.id);
    }

    #[test]
    fn binary_mode_percent_decodes_headers_and_keeps_non_json_bodies() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("ce-specversion", "1.0"),
            ("ce-id", "p-1"),
            ("ce-type", "a.b"),
            ("ce-source", "/caf%C3%A9"),
            ("ce-subject", "50%25%20off%20%22today%22"),
            ("content-type", "text/plain; charset=utf-8"),
        ] {
            headers.insert(name, HeaderValue::from_static(value));
        }
        let draft = from_binary(&headers, "grüße".as_bytes()).expect("valid");
        let metadata = draft.metadata.clone().unwrap();
        assert_eq!(metadata["ce_source"], "/café");
        assert_eq!(metadata["ce_subject"], "50% off \"today\"");
        assert_eq!(draft.payload, Some(json!("grüße")));
        let back = to_structured(&draft.into_event("h"));
        assert_eq!(back["data"], "grüße");
        assert_eq!(back["datacontenttype"], "text/plain; charset=utf-8");
        assert_eq!(back["source"], "/café");

        headers.insert(
            "content-type",
            HeaderValue::from_static("application/octet-stream"),
        );
        let draft = from_binary(&headers, &[0, 159, 146, 150]).expect("valid");
        let back = to_structured(&draft.into_event("h"));
        assert_eq!(back["data_base64"], "AJ+Slg==");
        assert_eq!(back["datacontenttype"], "application/octet-stream");
        assert!(back.get("data").is_none());

        headers.insert("ce-id", HeaderValue::from_static("%FF"));
        let err = from_binary(&headers, b"x").unwrap_err();
        assert!(err.message.contains("ce-id"), "{}", err.message);
        headers.insert("ce-id", HeaderValue::from_static("p-2"));
        headers.remove("content-type");
        let draft = from_binary(&headers, b"").expect("no body, no data");
        let back = to_structured(&draft.into_event("h"));
        assert!(
            back.get("data").is_none() && back.get("datacontenttype").is_none(),
            "{back}"
        );
    }
}
