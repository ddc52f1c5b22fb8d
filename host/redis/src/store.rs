//! How events are stored: one hash per event and sorted-set indexes.
//!
//! The hash `{p}:ev:{id}` holds `event` (the event's JSON as published), `status` and `state`
//! (the state it was stored with: every group's starting state), `source`, `instance`,
//! `entry` (its stream entry), and per consumer group `g` that changed it: `status:{g}`,
//! `state:{g}` (JSON of the fields the broker changes: error, retry count, handler outcomes,
//! processing and completion times), `entry:{g}` (the group's latest stream entry of it),
//! `delayed:{g}` (its delayed redelivery) and `dead:{g}` (its dead letter). `get` is one
//! `HMGET`; the scripts change the group fields without parsing the event, so payloads are
//! stored byte for byte as serialized.
//!
//! Indexes (sorted sets scored by creation time in microseconds, ties ordered by id): every
//! event, by source, by instance, by status per group (`{p}:gs:{g}:{status}`); plus settled
//! events (finished by every group) by completion time for the retention cleanup. `list`
//! walks the most selective index that applies, inside the creation time range, and filters
//! the rest in the host.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use eventbroker::event::{Event, EventStatus, HandlerOutcome};
use eventbroker::provider::{ProviderError, StatusUpdate};

use super::NAME;

/// The mutable part of an event, stored as the hash's `state` field.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct StoredState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub retry_count: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub handlers: Vec<HandlerOutcome>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processed_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<DateTime<Utc>>,
}

impl StoredState {
    pub(crate) fn of_event(event: &Event) -> Self {
        StoredState {
            error: event.error.clone(),
            retry_count: event.retry_count,
            handlers: event.handlers.clone(),
            processed_at: event.processed_at,
            completed_at: event.completed_at,
        }
    }

    /// The state after `update`, given the state before (processing time is kept when the
    /// update has none, as [`StatusUpdate::apply`] does).
    pub(crate) fn of_update(update: &StatusUpdate) -> Self {
        StoredState {
            error: update.error.clone(),
            retry_count: update.retry_count,
            handlers: update.handlers.clone(),
            processed_at: update.processed_at,
            completed_at: update.completed_at,
        }
    }

    fn apply(self, event: &mut Event) {
        event.error = self.error;
        event.retry_count = self.retry_count;
        event.handlers = self.handlers;
        if self.processed_at.is_some() {
            event.processed_at = self.processed_at;
        }
        event.completed_at = self.completed_at;
    }
}

/// Serializes to JSON for storage.
pub(crate) fn to_json<T: Serialize>(value: &T) -> Result<String, ProviderError> {
    serde_json::to_string(value).map_err(|e| ProviderError::backend(NAME, e))
}

/// Score of a time in the indexes: microseconds since the epoch (exact in a double).
pub(crate) fn score(time: DateTime<Utc>) -> i64 {
    time.timestamp_micros()
}

/// Rebuilds an event from the hash fields `event`, `status`, `state` (the group's fields when
/// it has them, the event's own otherwise).
pub(crate) fn decode(
    event: &str,
    status: Option<&str>,
    state: Option<&str>,
) -> Result<Event, ProviderError> {
    let mut decoded: Event = serde_json::from_str(event)
        .map_err(|e| ProviderError::backend(NAME, format!("stored event is not valid: {e}")))?;
    if let Some(status) = status {
        decoded.status = status
            .parse::<EventStatus>()
            .map_err(|e| ProviderError::backend(NAME, format!("stored status: {e}")))?;
    }
    if let Some(state) = state.filter(|s| *s != "null") {
        let state: StoredState = serde_json::from_str(state)
            .map_err(|e| ProviderError::backend(NAME, format!("stored state: {e}")))?;
        state.apply(&mut decoded);
    }
    Ok(decoded)
}

/// The stored fields of an event as one group sees them, as read from its hash.
pub(crate) struct Stored {
    /// The event's JSON.
    pub event: String,
    /// The group's status, or the event's own.
    pub status: Option<String>,
    /// The group's state JSON, or the event's own.
    pub state: Option<String>,
}

impl Stored {
    /// The event in this state.
    pub(crate) fn decode(&self) -> Result<Event, ProviderError> {
        decode(&self.event, self.status.as_deref(), self.state.as_deref())
    }
}

/// A watcher message: the stored fields of an event at one change, built by the scripts.
#[derive(Deserialize)]
struct WatchMessage {
    event: Event,
    status: EventStatus,
    state: Option<StoredState>,
    /// The group whose state changed (`None`: the event as stored).
    #[serde(default)]
    group: Option<String>,
}

/// Decodes a watcher message into the event as it is after the change, and the group whose
/// state changed (`None` for a publish).
pub(crate) fn decode_watch(message: &str) -> Result<(Event, Option<String>), ProviderError> {
    let message: WatchMessage = serde_json::from_str(message)
        .map_err(|e| ProviderError::backend(NAME, format!("watch message: {e}")))?;
    let mut event = message.event;
    event.status = message.status;
    if let Some(state) = message.state {
        state.apply(&mut event);
    }
    Ok((event, message.group))
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventbroker::event::EventSource;

    #[test]
    fn stored_fields_round_trip() {
        let mut event = Event::new(EventSource::System, "a.b", "h")
            .with_payload(serde_json::json!({"big": 12345678901234567_i64, "f": 0.1}));
        event.processed_at = Some(Utc::now());
        let json = to_json(&event).unwrap();
        let state = to_json(&StoredState::of_event(&event)).unwrap();
        let back = decode(&json, Some("pending"), Some(&state)).unwrap();
        assert_eq!(back, event);

        let update = StatusUpdate {
            status: EventStatus::Failed,
            error: Some("boom".into()),
            retry_count: 3,
            handlers: vec![],
            processed_at: None,
            completed_at: Some(Utc::now()),
        };
        let state = to_json(&StoredState::of_update(&update)).unwrap();
        let back = decode(&json, Some("failed"), Some(&state)).unwrap();
        let mut expected = event.clone();
        update.apply(&mut expected);
        assert_eq!(back, expected);

        let message = format!(r#"{{"event":{json},"status":"failed","state":{state}}}"#);
        assert_eq!(decode_watch(&message).unwrap(), (expected.clone(), None));
        let message =
            format!(r#"{{"event":{json},"status":"failed","state":{state},"group":"g 1"}}"#);
        assert_eq!(
            decode_watch(&message).unwrap(),
            (expected, Some("g 1".to_owned()))
        );
    }
}
