//! The processing state one consumer group keeps for one event.
//!
//! An event's published fields (id, type, payload, …) are shared by every group; its processing
//! state (status, error, retry count, per-handler outcomes, processing and completion times) is
//! kept per (event, group). A group that has not touched an event yet sees it in the state it
//! was stored with ([`GroupState::of`] of the stored event), which for a published event is
//! fresh: `pending`, no error, no retries, no outcomes.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::StatusUpdate;
use crate::event::{Event, EventStatus, HandlerOutcome};

/// One consumer group's processing state of one event.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupState {
    /// The event's status in this group.
    #[serde(default)]
    pub status: EventStatus,
    /// The group's last error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Retries in this group so far.
    #[serde(default)]
    pub retry_count: u32,
    /// What each of the group's handlers did with the event.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub handlers: Vec<HandlerOutcome>,
    /// When the group last started processing the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub processed_at: Option<DateTime<Utc>>,
    /// When the group finished the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<DateTime<Utc>>,
}

impl GroupState {
    /// The state carried by `event` itself (the state it was stored with).
    pub fn of(event: &Event) -> Self {
        GroupState {
            status: event.status,
            error: event.error.clone(),
            retry_count: event.retry_count,
            handlers: event.handlers.clone(),
            processed_at: event.processed_at,
            completed_at: event.completed_at,
        }
    }

    /// Whether the group is done with the event (`completed` or `failed`).
    pub fn is_finished(&self) -> bool {
        self.status.is_finished()
    }

    /// Writes this state into `event`, replacing the state fields it carries.
    pub fn show(&self, event: &mut Event) {
        event.status = self.status;
        event.error = self.error.clone();
        event.retry_count = self.retry_count;
        event.handlers = self.handlers.clone();
        event.processed_at = self.processed_at;
        event.completed_at = self.completed_at;
    }

    /// `event` as this group sees it.
    pub fn view(&self, event: &Event) -> Event {
        let mut event = event.clone();
        self.show(&mut event);
        event
    }

    /// The state a claim records when the backend marks `processing` with it
    /// ([`super::Delivery::processing_recorded`]): what [`StatusUpdate::processing`] writes —
    /// `processing` since `at`, not completed — keeping the error, retry count and outcomes.
    pub fn claim(&mut self, at: chrono::DateTime<chrono::Utc>) {
        self.status = EventStatus::Processing;
        self.processed_at = Some(at);
        self.completed_at = None;
    }

    /// Applies a broker update, with the rules of [`StatusUpdate::apply`] (a missing
    /// processing time keeps the one recorded).
    pub fn apply(&mut self, update: &StatusUpdate) {
        self.status = update.status;
        self.error = update.error.clone();
        self.retry_count = update.retry_count;
        self.handlers = update.handlers.clone();
        self.processed_at = update.processed_at.or(self.processed_at);
        self.completed_at = update.completed_at;
    }

    /// The state after a delivery was given back unprocessed (released, or abandoned by a
    /// host whose lease expired): `pending` again and not completed, unless
    /// [`release_keeps`] the current status.
    pub fn release(&mut self) {
        if release_keeps(self.status) {
            return;
        }
        self.status = EventStatus::Pending;
        self.completed_at = None;
    }
}

/// Whether a group's state in `status` stays as it is when a delivery of the event is given
/// back unprocessed (released, or abandoned by a host whose lease expired): a finished outcome
/// is never undone by a delivery that was not attempted; every other status goes back to
/// `pending` (and loses its completion time).
///
/// This is the one copy of the rule. The memory and NATS providers apply it through
/// [`GroupState::release`]; the SQL and Redis providers render [`statuses_kept_by_release`]
/// into their queries and scripts, so a fifth backend inherits it the same way.
pub fn release_keeps(status: EventStatus) -> bool {
    status.is_finished()
}

/// The statuses [`release_keeps`], for backends that render the rule into a query or script.
pub fn statuses_kept_by_release() -> impl Iterator<Item = EventStatus> {
    EventStatus::ALL
        .into_iter()
        .filter(|status| release_keeps(*status))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventSource;

    #[test]
    fn a_state_round_trips_through_an_event_and_applies_updates() {
        let event = Event::new(EventSource::System, "a.b", "h");
        let fresh = GroupState::of(&event);
        assert_eq!(fresh, GroupState::default(), "a new event's state is fresh");
        let mut state = fresh.clone();
        let started = Utc::now();
        state.apply(&StatusUpdate {
            status: EventStatus::Failed,
            error: Some("boom".into()),
            retry_count: 2,
            handlers: Vec::new(),
            processed_at: Some(started),
            completed_at: Some(started),
        });
        state.apply(&StatusUpdate {
            status: EventStatus::Failed,
            error: Some("again".into()),
            retry_count: 3,
            handlers: Vec::new(),
            processed_at: None,
            completed_at: Some(started),
        });
        assert_eq!(state.processed_at, Some(started), "processing time is kept");
        let shown = state.view(&event);
        assert_eq!(GroupState::of(&shown), state);
        assert_eq!(shown.payload, event.payload);
        state.release();
        assert_eq!(
            state.status,
            EventStatus::Failed,
            "a finished outcome is kept"
        );
        assert_eq!(state.completed_at, Some(started));
        state.status = EventStatus::Processing;
        state.release();
        assert_eq!(state.status, EventStatus::Pending);
        assert_eq!(state.completed_at, None);
        assert_eq!(state.retry_count, 3, "a release keeps the retry count");
        assert_eq!(
            statuses_kept_by_release().collect::<Vec<_>>(),
            [EventStatus::Completed, EventStatus::Failed]
        );
    }
}
