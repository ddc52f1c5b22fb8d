//! What the state bucket holds for one event: its current state plus the bookkeeping that ties
//! the state to the stream, so that no stale message or stale worker can change it.
//!
//! - `seq` is the stream sequence of the message that carries the event's current run (its
//!   publish, or its latest re-run). A message with another sequence for the same event (an
//!   older run, or a copy stored again after the duplicate window) is stale and skipped.
//! - `claims` holds, per consumer group (by durable consumer name), the token of the delivery
//!   that owns the event in that group. A delivery claims the event when it is handed out, and
//!   only the owning delivery may record an outcome, which settles (removes) its claim: a
//!   worker whose delivery was redelivered to someone else cannot overwrite the newer outcome
//!   or acknowledge the newer delivery.
//!
//! Stored as `{"event": {..}, "seq": N, "claims": {..}}`. States written before this format
//! (the bare event) are still read, as records without a sequence or claims.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::NAME;
use crate::event::Event;
use crate::provider::ProviderError;

/// One event's entry in the state bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Record {
    /// The event's current state.
    pub event: Event,
    /// Stream sequence of the message carrying the current run; `None` for events written
    /// with `store` only (sync mode), which have no message, and for states written before
    /// sequences were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// Delivery token of the delivery that owns the event, by durable consumer name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub claims: BTreeMap<String, String>,
}

/// A delivery tried to record an outcome for an event that another delivery owns now.
pub(crate) fn lease_lost(id: &str) -> ProviderError {
    ProviderError::backend(
        NAME,
        format!(
            "delivery of event {id} is no longer leased (its acknowledgement deadline passed and \
             it was handed to another consumer); its outcome is not recorded"
        ),
    )
}

impl Record {
    /// A record of `event`, carried by the message at `seq` (if any), owned by no delivery.
    pub(crate) fn new(event: Event, seq: Option<u64>) -> Self {
        Record {
            event,
            seq,
            claims: BTreeMap::new(),
        }
    }

    /// Whether the message at stream sequence `seq` carries the current run. Records without
    /// a sequence accept any message.
    pub(crate) fn carried_by(&self, seq: u64) -> bool {
        self.seq.is_none_or(|current| current == seq)
    }

    /// Makes delivery `token` the owner of the event in `group`, replacing an older owner.
    pub(crate) fn claim(&mut self, group: &str, token: &str) {
        self.claims.insert(group.to_owned(), token.to_owned());
    }

    /// Whether delivery `token` owns the event in `group`.
    pub(crate) fn owned_by(&self, group: &str, token: &str) -> bool {
        self.claims.get(group).is_some_and(|owner| owner == token)
    }

    /// Ends the ownership of delivery `token` in `group`.
    ///
    /// # Errors
    /// The lease-lost error when another delivery (or none) owns the event.
    pub(crate) fn settle(&mut self, group: &str, token: &str) -> Result<(), ProviderError> {
        if !self.owned_by(group, token) {
            return Err(lease_lost(&self.event.id));
        }
        self.claims.remove(group);
        Ok(())
    }

    /// Whether every delivery of the current run has recorded its outcome and it was final:
    /// changing such a state back to `pending` or `processing` outside of a delivery can only
    /// be a late write from a worker that lost its delivery.
    pub(crate) fn settled_final(&self) -> bool {
        self.seq.is_some() && self.claims.is_empty() && self.event.status.is_finished()
    }

    /// The JSON stored in the bucket.
    pub(crate) fn encode(&self) -> Result<Bytes, ProviderError> {
        serde_json::to_vec(self).map(Bytes::from).map_err(|e| {
            ProviderError::backend(NAME, format!("cannot encode event {}: {e}", self.event.id))
        })
    }

    /// Reads a stored record, or a bare event stored by an earlier version.
    pub(crate) fn decode(value: &[u8]) -> Result<Self, ProviderError> {
        match serde_json::from_slice::<Record>(value) {
            Ok(record) => Ok(record),
            Err(error) => serde_json::from_slice::<Event>(value)
                .map(|event| Record::new(event, None))
                .map_err(|_| {
                    ProviderError::backend(
                        NAME,
                        format!("stored event state is not valid JSON: {error}"),
                    )
                }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventSource, EventStatus};

    fn event() -> Event {
        Event::new(EventSource::System, "a.b", "test")
    }

    #[test]
    fn records_round_trip_and_bare_events_still_read() {
        let mut record = Record::new(event(), Some(7));
        record.claim("workers", "$JS.ACK.S.workers.1.7.9.0.0");
        let decoded = Record::decode(&record.encode().unwrap()).unwrap();
        assert_eq!(decoded, record);
        let bare = serde_json::to_vec(&record.event).unwrap();
        assert_eq!(
            Record::decode(&bare).unwrap(),
            Record::new(record.event.clone(), None)
        );
        let error = Record::decode(b"{\"nope\": 1}").unwrap_err();
        assert!(error.to_string().contains("not valid JSON"), "{error}");
    }

    #[test]
    fn only_the_owning_delivery_settles() {
        let mut record = Record::new(event(), Some(3));
        record.claim("g", "old");
        record.claim("g", "new");
        record.claim("other", "x");
        let error = record.settle("g", "old").unwrap_err();
        assert!(error.to_string().contains("no longer leased"), "{error}");
        record.settle("g", "new").unwrap();
        assert!(record.settle("g", "new").is_err(), "settles once");
        assert!(record.owned_by("other", "x"));
        assert!(record.carried_by(3) && !record.carried_by(4));
        assert!(Record::new(event(), None).carried_by(4));
    }

    #[test]
    fn settled_final_needs_a_message_no_owner_and_a_final_status() {
        let mut record = Record::new(event(), Some(1));
        assert!(!record.settled_final());
        record.event.status = EventStatus::Completed;
        assert!(record.settled_final());
        record.claim("g", "t");
        assert!(!record.settled_final());
        let mut stored_only = Record::new(event(), None);
        stored_only.event.status = EventStatus::Failed;
        assert!(!stored_only.settled_final());
    }
}
