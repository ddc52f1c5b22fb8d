//! Derived-event drafts from guests: bounded field by field before anything is parsed, then
//! parsed and validated with the rules the broker applies to every published event — the same
//! for `serve` and for `eventbroker run`.

use serde_json::{Map, Value};

use super::bindings::types::{EventDraft, Source};
use eventbroker::event::{
    Event, EventDraft as HostDraft, EventSource, MAX_FIELD_LEN, MAX_METADATA_BYTES, MAX_TYPE_LEN,
    ValidationError,
};

/// The bytes of a draft's text fields: what the guest handed the host.
pub(crate) fn draft_size(draft: &EventDraft) -> usize {
    let optional = |text: &Option<String>| text.as_ref().map_or(0, String::len);
    draft.event_type.len()
        + optional(&draft.payload)
        + optional(&draft.session_id)
        + optional(&draft.schema)
        + optional(&draft.entity)
        + optional(&draft.operation)
        + optional(&draft.metadata)
}

fn source_of(source: Source) -> EventSource {
    match source {
        Source::Database => EventSource::Database,
        Source::Websocket => EventSource::Websocket,
        Source::Frontend => EventSource::Frontend,
        Source::System => EventSource::System,
        Source::Internal => EventSource::Internal,
    }
}

fn too_large(field: &'static str, size: usize, limit: usize) -> String {
    ValidationError::TooLarge { field, size, limit }.to_string()
}

/// Refuses a draft whose fields are over their limits, before any of it is parsed: the type
/// over [`MAX_TYPE_LEN`], `session_id`, `schema`, `entity` or `operation` over
/// [`MAX_FIELD_LEN`], the payload text over `max_payload`, the metadata text over
/// [`MAX_METADATA_BYTES`].
fn check_sizes(draft: &EventDraft, max_payload: usize) -> Result<(), String> {
    if draft.event_type.len() > MAX_TYPE_LEN {
        return Err(too_large("type", draft.event_type.len(), MAX_TYPE_LEN));
    }
    for (field, value) in [
        ("session_id", &draft.session_id),
        ("schema", &draft.schema),
        ("entity", &draft.entity),
        ("operation", &draft.operation),
    ] {
        let size = value.as_ref().map_or(0, String::len);
        if size > MAX_FIELD_LEN {
            return Err(too_large(field, size, MAX_FIELD_LEN));
        }
    }
    if let Some(payload) = &draft.payload
        && payload.len() > max_payload
    {
        return Err(too_large("payload", payload.len(), max_payload));
    }
    if let Some(metadata) = &draft.metadata
        && metadata.len() > MAX_METADATA_BYTES
    {
        return Err(too_large("metadata", metadata.len(), MAX_METADATA_BYTES));
    }
    Ok(())
}

/// Turns a guest's draft into an event accepted by instance `instance_id`, or says why it
/// cannot be one. Every size is checked before parsing; the parsed event is then checked by
/// [`Event::validate`] with `max_payload`, as the broker checks every published event.
///
/// # Errors
/// A message for the guest naming the field at fault.
pub(crate) fn to_event(
    draft: EventDraft,
    instance_id: &str,
    max_payload: usize,
) -> Result<Event, String> {
    check_sizes(&draft, max_payload)?;
    let payload = match draft.payload {
        Some(text) => Some(
            serde_json::from_str::<Value>(&text)
                .map_err(|e| format!("payload is not JSON: {e}"))?,
        ),
        None => None,
    };
    let metadata = match draft.metadata {
        Some(text) => Some(
            serde_json::from_str::<Map<String, Value>>(&text)
                .map_err(|e| format!("metadata is not a JSON object: {e}"))?,
        ),
        None => None,
    };
    let event = HostDraft {
        id: None,
        source: Some(draft.source.map_or(EventSource::Internal, source_of)),
        event_type: draft.event_type,
        payload,
        user_id: draft.user_id,
        session_id: draft.session_id,
        schema: draft.schema,
        entity: draft.entity,
        operation: draft.operation,
        metadata,
        created_at: None,
    }
    .into_event(instance_id);
    event.validate(max_payload).map_err(|e| e.to_string())?;
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draft() -> EventDraft {
        EventDraft {
            event_type: "fixture.derived".into(),
            source: None,
            payload: Some("{\"n\":1}".into()),
            user_id: None,
            session_id: None,
            schema: None,
            entity: None,
            operation: None,
            metadata: None,
        }
    }

    #[test]
    fn a_valid_draft_becomes_an_internal_event() {
        let event = to_event(draft(), "local", 1024).expect("valid");
        assert_eq!(event.source, EventSource::Internal);
        assert_eq!(event.payload["n"], 1);
        assert_eq!(draft_size(&draft()), "fixture.derived".len() + 7);
    }

    #[test]
    fn every_field_is_bounded_before_parsing() {
        let long = |n: usize| Some("x".repeat(n));
        let cases: Vec<(EventDraft, &str)> = vec![
            (
                EventDraft {
                    session_id: long(MAX_FIELD_LEN + 1),
                    ..draft()
                },
                "session_id",
            ),
            (
                EventDraft {
                    schema: long(MAX_FIELD_LEN + 1),
                    ..draft()
                },
                "schema",
            ),
            (
                EventDraft {
                    entity: long(MAX_FIELD_LEN + 1),
                    ..draft()
                },
                "entity",
            ),
            (
                EventDraft {
                    operation: long(MAX_FIELD_LEN + 1),
                    ..draft()
                },
                "operation",
            ),
            (
                EventDraft {
                    event_type: "a".repeat(MAX_TYPE_LEN + 1),
                    ..draft()
                },
                "type",
            ),
            // Not JSON at all: refused for its size, never parsed.
            (
                EventDraft {
                    payload: long(2048),
                    ..draft()
                },
                "payload is 2048 bytes",
            ),
            (
                EventDraft {
                    metadata: long(MAX_METADATA_BYTES + 1),
                    ..draft()
                },
                "metadata",
            ),
        ];
        for (draft, needle) in cases {
            let err = to_event(draft, "local", 1024).unwrap_err();
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }

    #[test]
    fn the_parsed_event_is_validated_like_a_published_one() {
        // Within the text limit but larger once encoded compactly (1e2 becomes 100.0).
        let err = to_event(
            EventDraft {
                payload: Some("[1e2,1e2,1e2]".into()),
                ..draft()
            },
            "local",
            13,
        )
        .unwrap_err();
        assert!(err.contains("payload"), "{err}");
        let err = to_event(
            EventDraft {
                event_type: "bad..type".into(),
                ..draft()
            },
            "local",
            1024,
        )
        .unwrap_err();
        assert!(err.contains("invalid type"), "{err}");
    }
}
