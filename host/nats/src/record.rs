//! What the state bucket holds for one event: the event as published, and per consumer group
//! its processing state plus the bookkeeping that ties that state to the stream, so that no
//! stale message or stale worker can change it.
//!
//! - `event` is the event as published (or stored); its state fields are the state every group
//!   starts from ([`GroupState::of`]).
//! - `seq` is the stream sequence of the event's published message. Each group runs the event
//!   from that message until the group re-runs it: a re-run is a message of its own, whose
//!   sequence the group's entry records (`groups.{g}.seq`). A message with another sequence for
//!   the same event (an older run, another group's re-run, a copy stored again after the
//!   duplicate window) is stale for the group and skipped.
//! - `groups` holds, per group that touched the event, its [`GroupState`], the sequence of its
//!   re-run, a `version` counting the writes of the group's entry (a re-run names the version it
//!   was made from, see [`super::subjects::rerun_message_id`]), the [`Claim`] of the delivery
//!   that owns the event in the group, and how many deliveries of the group's current run
//!   claimed it. A delivery claims the event when it is handed out, and only the owning delivery
//!   may record an outcome, which settles (removes) its claim: a worker whose delivery was
//!   redelivered to someone else cannot overwrite the newer outcome or acknowledge the newer
//!   delivery.
//! - A delivery's number is one more than the deliveries of the run that claimed the event
//!   before it, and at least the server's delivered count: the server's count alone is not
//!   trusted, as nats-server before nats-io/nats-server#5305 (2.9.x included) hands a
//!   redelivery that found no pull request able to take it out again later as a first delivery
//!   (delivered count 1). A delivery the server made that claimed nothing (given
//!   back unread, or whose claim failed) is known from the server's count only.
//! - `changed` names the group whose state the last write changed, for watchers; `None` when the
//!   write changed no group's state (the event's creation, a renewal, a claim of an event the
//!   group already finished; a claim of an unfinished one records `processing`).
//!
//! Stored as `{"event": {..}, "seq": N, "groups": {"g": {"status": .., "seq": N, "version": N,
//! "claim": {..}, "deliveries": N}}, "changed": "g"}`. States written before this format (the
//! bare event) are still read, as records without a sequence or groups.

use std::collections::BTreeMap;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::NAME;
use eventbroker::event::Event;
use eventbroker::provider::{GroupState, ProviderError};

/// One event's entry in the state bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Record {
    /// The event as published or stored; its state is every group's starting state.
    pub event: Event,
    /// Stream sequence of the message that published the event; `None` for events written
    /// with `store` only (sync mode), which have no message, and for states written before
    /// sequences were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// The entries of the groups that touched the event, by group name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub groups: BTreeMap<String, GroupRecord>,
    /// The group whose state the last write changed (`None`: no group's state changed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changed: Option<String>,
}

/// One group's entry of an event.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct GroupRecord {
    /// The group's processing state.
    #[serde(flatten)]
    pub state: GroupState,
    /// Stream sequence of the group's latest re-run message; `None`: the group runs the
    /// published message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// How many times the entry was written.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub version: u64,
    /// The delivery that owns the event in the group, if one does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<Claim>,
    /// The number of the latest delivery of the group's current run that claimed the event
    /// (0: none did yet); a re-run starts again from 0.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub deliveries: u32,
}

/// The ownership of an event by one delivery of one group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Claim {
    /// The delivery's token (its acknowledgement subject).
    pub delivery: String,
    /// Until when the owner is known to be alive: the time of the claim or of its latest
    /// renewal plus the lease of the group's consumer (the owning host's clock).
    pub expires: DateTime<Utc>,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

fn is_zero_u32(value: &u32) -> bool {
    *value == 0
}

/// A delivery tried to record an outcome for an event that another delivery owns now.
pub(crate) fn lease_lost(id: &str) -> ProviderError {
    ProviderError::backend(
        NAME,
        format!(
            "delivery of event {id} is no longer leased (its acknowledgement deadline passed and \
             it was handed to another consumer, or it was re-run); its outcome is not recorded"
        ),
    )
}

impl Record {
    /// A record of `event`, published by the message at `seq` (if any), touched by no group.
    pub(crate) fn new(event: Event, seq: Option<u64>) -> Self {
        Record {
            event,
            seq,
            groups: BTreeMap::new(),
            changed: None,
        }
    }

    /// `group`'s state of the event.
    pub(crate) fn state(&self, group: &str) -> GroupState {
        self.groups
            .get(group)
            .map_or_else(|| GroupState::of(&self.event), |entry| entry.state.clone())
    }

    /// The event as `group` sees it.
    pub(crate) fn view(&self, group: &str) -> Event {
        match self.groups.get(group) {
            Some(entry) => entry.state.view(&self.event),
            None => self.event.clone(),
        }
    }

    /// How many times `group`'s entry was written (0: never).
    pub(crate) fn version(&self, group: &str) -> u64 {
        self.groups.get(group).map_or(0, |entry| entry.version)
    }

    /// Stream sequence of the message carrying `group`'s current run: its latest re-run, or
    /// the publish.
    pub(crate) fn run(&self, group: &str) -> Option<u64> {
        self.groups
            .get(group)
            .and_then(|entry| entry.seq)
            .or(self.seq)
    }

    /// Whether the message at stream sequence `seq` carries `group`'s current run. Records
    /// without any sequence accept any message.
    pub(crate) fn carried_by(&self, group: &str, seq: u64) -> bool {
        self.run(group).is_none_or(|current| current == seq)
    }

    /// `group`'s entry for writing (created from the event's state), counted as one write.
    fn entry_mut(&mut self, group: &str) -> &mut GroupRecord {
        let event = &self.event;
        let entry = self
            .groups
            .entry(group.to_owned())
            .or_insert_with(|| GroupRecord {
                state: GroupState::of(event),
                ..GroupRecord::default()
            });
        entry.version += 1;
        entry
    }

    /// Changes `group`'s state and records that it changed.
    pub(crate) fn change(&mut self, group: &str, change: impl FnOnce(&mut GroupState)) {
        change(&mut self.entry_mut(group).state);
        self.changed = Some(group.to_owned());
    }

    /// The number a delivery of `group`'s current run that the server counts as its
    /// `reported`-th gets: one more than the latest delivery that claimed the event, and at
    /// least `reported` (see the module documentation).
    pub(crate) fn next_delivery(&self, group: &str, reported: u32) -> u32 {
        self.deliveries(group).saturating_add(1).max(reported)
    }

    /// The number of the latest delivery of `group`'s current run that claimed the event (0:
    /// none did yet).
    pub(crate) fn deliveries(&self, group: &str) -> u32 {
        self.groups.get(group).map_or(0, |entry| entry.deliveries)
    }

    /// Makes `claim`, the delivery numbered `number` ([`Record::next_delivery`]), the owner of
    /// the event in `group`, replacing an older owner. Changes no state: the caller says in
    /// `changed` whether its write changed one.
    pub(crate) fn claim(&mut self, group: &str, claim: Claim, number: u32) {
        let entry = self.entry_mut(group);
        entry.claim = Some(claim);
        entry.deliveries = entry.deliveries.max(number);
    }

    /// Whether `delivery` owns the event in `group`.
    pub(crate) fn owned_by(&self, group: &str, delivery: &str) -> bool {
        self.groups
            .get(group)
            .and_then(|entry| entry.claim.as_ref())
            .is_some_and(|claim| claim.delivery == delivery)
    }

    /// Whether a delivery owns the event in `group` and was alive at `now` (its claim has not
    /// expired).
    pub(crate) fn held(&self, group: &str, now: DateTime<Utc>) -> bool {
        self.groups
            .get(group)
            .and_then(|entry| entry.claim.as_ref())
            .is_some_and(|claim| claim.expires > now)
    }

    /// Until when another delivery than `delivery` owns the event in `group`, if that claim is
    /// still alive at `now`: a delivery arriving meanwhile is a copy of a running one (or a
    /// redelivery ahead of the owner's lease) and must not take the event over.
    pub(crate) fn claimed_by_another_until(
        &self,
        group: &str,
        delivery: &str,
        now: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        self.groups
            .get(group)
            .and_then(|entry| entry.claim.as_ref())
            .filter(|claim| claim.delivery != delivery && claim.expires > now)
            .map(|claim| claim.expires)
    }

    /// Extends the claim of `delivery` in `group` until `expires`; changes no state.
    ///
    /// # Errors
    /// The lease-lost error when another delivery (or none) owns the event.
    pub(crate) fn renew(
        &mut self,
        group: &str,
        delivery: &str,
        expires: DateTime<Utc>,
    ) -> Result<(), ProviderError> {
        if !self.owned_by(group, delivery) {
            return Err(lease_lost(&self.event.id));
        }
        if let Some(claim) = self.entry_mut(group).claim.as_mut() {
            claim.expires = expires;
        }
        self.changed = None;
        Ok(())
    }

    /// Ends the ownership of `delivery` in `group`.
    ///
    /// # Errors
    /// The lease-lost error when another delivery (or none) owns the event.
    pub(crate) fn settle(&mut self, group: &str, delivery: &str) -> Result<(), ProviderError> {
        if !self.owned_by(group, delivery) {
            return Err(lease_lost(&self.event.id));
        }
        self.entry_mut(group).claim = None;
        Ok(())
    }

    /// Takes the event away from whichever delivery owns it in `group` (the sweep, a dead
    /// letter): that delivery can no longer record an outcome.
    pub(crate) fn revoke(&mut self, group: &str) {
        if let Some(entry) = self.groups.get_mut(group) {
            entry.claim = None;
        }
    }

    /// Switches `group` to a re-run carried by the message at `seq`, in `state`, owned by no
    /// delivery.
    pub(crate) fn rerun(&mut self, group: &str, state: GroupState, seq: u64) {
        let entry = self.entry_mut(group);
        entry.state = state;
        entry.seq = Some(seq);
        entry.claim = None;
        entry.deliveries = 0;
        self.changed = Some(group.to_owned());
    }

    /// Whether every delivery of `group`'s current run has recorded its outcome and it was
    /// final: changing such a state back to `pending` or `processing` outside of a delivery
    /// can only be a late write from a worker that lost its delivery.
    pub(crate) fn settled_final(&self, group: &str) -> bool {
        self.run(group).is_some()
            && self
                .groups
                .get(group)
                .is_none_or(|entry| entry.claim.is_none())
            && self.state(group).is_finished()
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
    use eventbroker::event::{EventSource, EventStatus};

    fn event() -> Event {
        Event::new(EventSource::System, "a.b", "test")
    }

    fn claim(delivery: &str) -> Claim {
        Claim {
            delivery: delivery.into(),
            expires: Utc::now() + chrono::Duration::seconds(60),
        }
    }

    #[test]
    fn records_round_trip_and_earlier_values_still_read() {
        let mut record = Record::new(event(), Some(7));
        record.change("g", |state| state.status = EventStatus::Failed);
        record.claim("workers", claim("$JS.ACK.S.workers.1.7.9.0.0"), 1);
        record.rerun("other", GroupState::default(), 9);
        let decoded = Record::decode(&record.encode().unwrap()).unwrap();
        assert_eq!(decoded, record);
        assert_eq!(decoded.view("g").status, EventStatus::Failed);
        assert_eq!(decoded.view("workers").status, EventStatus::Pending);
        assert_eq!(decoded.view("unknown").status, EventStatus::Pending);

        // A bare event (the first format).
        let mut finished = event();
        finished.status = EventStatus::Completed;
        let bare = serde_json::to_vec(&finished).unwrap();
        let read = Record::decode(&bare).unwrap();
        assert_eq!(read, Record::new(finished.clone(), None));
        assert_eq!(read.state("any").status, EventStatus::Completed);

        // Group states without stream bookkeeping (a format of the development history).
        let states = serde_json::json!({
            "event": finished,
            "groups": {"g": {"status": "failed", "error": "boom", "retry_count": 2}},
            "changed": "g"
        });
        let read = Record::decode(&serde_json::to_vec(&states).unwrap()).unwrap();
        assert_eq!(read.state("g").status, EventStatus::Failed);
        assert_eq!(read.state("g").retry_count, 2);
        assert_eq!(read.version("g"), 0);
        assert_eq!(read.run("g"), None);

        let error = Record::decode(b"{\"nope\": 1}").unwrap_err();
        assert!(error.to_string().contains("not valid JSON"), "{error}");
    }

    #[test]
    fn only_the_owning_delivery_settles_or_renews() {
        let mut record = Record::new(event(), Some(3));
        record.claim("g", claim("old"), 1);
        record.claim("g", claim("new"), 1);
        record.claim("other", claim("x"), 1);
        let error = record.settle("g", "old").unwrap_err();
        assert!(error.to_string().contains("no longer leased"), "{error}");
        assert!(record.renew("g", "old", Utc::now()).is_err());
        record.renew("g", "new", Utc::now()).unwrap();
        record.settle("g", "new").unwrap();
        assert!(record.settle("g", "new").is_err(), "settles once");
        assert!(record.owned_by("other", "x"));
        record.revoke("other");
        assert!(!record.owned_by("other", "x"));
    }

    #[test]
    fn each_group_runs_the_publish_until_it_re_runs() {
        let mut record = Record::new(event(), Some(3));
        assert!(record.carried_by("g", 3) && !record.carried_by("g", 4));
        let before = record.version("g");
        record.claim("g", claim("d"), 1);
        record.rerun("g", GroupState::default(), 8);
        assert!(record.version("g") > before);
        assert!(record.carried_by("g", 8) && !record.carried_by("g", 3));
        assert!(!record.owned_by("g", "d"), "a re-run has no owner yet");
        assert!(record.carried_by("h", 3) && !record.carried_by("h", 8));
        assert!(Record::new(event(), None).carried_by("g", 4));
    }

    #[test]
    fn deliveries_are_numbered_per_run_and_never_below_the_servers_count() {
        let mut record = Record::new(event(), Some(3));
        assert_eq!(record.next_delivery("g", 1), 1);
        record.claim("g", claim("first"), record.next_delivery("g", 1));
        // The server counts a redelivery as a first one (its count went back to 1).
        assert_eq!(record.next_delivery("g", 1), 2);
        record.claim("g", claim("second"), record.next_delivery("g", 1));
        assert_eq!(record.deliveries("g"), 2);
        // Deliveries that claimed nothing are known from the server's count only.
        assert_eq!(record.next_delivery("g", 5), 5);
        record.claim("g", claim("fifth"), record.next_delivery("g", 5));
        assert_eq!(record.deliveries("g"), 5);
        assert_eq!(record.deliveries("h"), 0, "counted per group");
        // A re-run is a message of its own: its deliveries count from the start.
        record.rerun("g", GroupState::default(), 8);
        assert_eq!(record.next_delivery("g", 1), 1);
        let decoded = Record::decode(&record.encode().unwrap()).unwrap();
        assert_eq!(decoded, record);
    }

    #[test]
    fn only_a_live_claim_of_another_delivery_keeps_a_new_one_out() {
        let mut record = Record::new(event(), Some(1));
        let now = Utc::now();
        assert_eq!(record.claimed_by_another_until("g", "d2", now), None);
        record.claim("g", claim("d1"), 1);
        let expires = record.groups["g"].claim.as_ref().map(|c| c.expires);
        assert!(expires.is_some_and(|at| at > now));
        assert_eq!(record.claimed_by_another_until("g", "d2", now), expires);
        assert_eq!(
            record.claimed_by_another_until("g", "d1", now),
            None,
            "its own"
        );
        assert_eq!(
            record.claimed_by_another_until("h", "d2", now),
            None,
            "another group"
        );
        let later = expires.unwrap_or(now) + chrono::Duration::milliseconds(1);
        assert_eq!(
            record.claimed_by_another_until("g", "d2", later),
            None,
            "expired"
        );
        record.settle("g", "d1").unwrap();
        assert_eq!(
            record.claimed_by_another_until("g", "d2", now),
            None,
            "settled"
        );
    }

    #[test]
    fn a_claim_is_held_until_it_expires() {
        let mut record = Record::new(event(), Some(1));
        let now = Utc::now();
        assert!(!record.held("g", now));
        record.claim(
            "g",
            Claim {
                delivery: "d".into(),
                expires: now + chrono::Duration::seconds(1),
            },
            1,
        );
        assert!(record.held("g", now));
        assert!(!record.held("g", now + chrono::Duration::seconds(2)));
        assert!(!record.held("h", now));
    }

    #[test]
    fn settled_final_needs_a_message_no_owner_and_a_final_status_in_the_group() {
        let mut record = Record::new(event(), Some(1));
        assert!(!record.settled_final("g"));
        record.change("g", |state| state.status = EventStatus::Completed);
        assert!(record.settled_final("g"));
        assert!(!record.settled_final("h"), "another group has not finished");
        record.claim("g", claim("t"), 1);
        assert!(!record.settled_final("g"));
        let mut stored_only = Record::new(event(), None);
        stored_only.change("g", |state| state.status = EventStatus::Failed);
        assert!(!stored_only.settled_final("g"));
    }

    #[test]
    fn changed_names_the_group_whose_state_changed() {
        let mut record = Record::new(event(), Some(1));
        record.change("g", |state| state.status = EventStatus::Processing);
        assert_eq!(record.changed.as_deref(), Some("g"));
        record.claim("g", claim("d"), 1);
        record.renew("g", "d", Utc::now()).unwrap();
        assert_eq!(record.changed, None, "a renewal changes no state");
        record.rerun("h", GroupState::default(), 2);
        assert_eq!(record.changed.as_deref(), Some("h"));
    }
}
