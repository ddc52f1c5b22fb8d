//! Drain bookkeeping: the events this broker accepted and has not finished yet, which `stop`
//! waits for on providers that are not shared.
//!
//! They are tracked by id, not counted, so that a final decision about an event this broker
//! did not publish (a backlog left in SQLite by an earlier run) or about an event whose
//! publish was abandoned after the provider stored it cannot make the books go negative.
//! A publish registers its event before the hand-off (so that a fast worker cannot finish it
//! first) through a guard that removes it again unless the hand-off happened: a publish that
//! fails, or whose caller drops it while it waits (e.g. for room in a full queue), leaves the
//! books as it found them.

use std::sync::Mutex;

use tokio::sync::Notify;

/// Ids of events in flight, hashed with foldhash (seeded per process; cheaper than SipHash on
/// every publish and every finish).
type IdSet = std::collections::HashSet<String, foldhash::fast::RandomState>;

/// Events accepted by this broker and not finished.
#[derive(Default)]
pub(crate) struct Outstanding {
    ids: Mutex<IdSet>,
    /// Signalled when the last outstanding event finishes.
    pub(crate) idle: Notify,
}

impl Outstanding {
    fn lock(&self) -> std::sync::MutexGuard<'_, IdSet> {
        self.ids.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many events are outstanding.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    /// Registers event `id` as being handed off; see [`Accepting`]. An id that is already
    /// outstanding (a second publish with the same id, which the provider refuses as a
    /// duplicate) is left to the event that has it.
    pub(crate) fn accepting<'a>(&'a self, id: &'a str) -> Accepting<'a> {
        let inserted = self.lock().insert(id.to_owned());
        Accepting {
            outstanding: self,
            id,
            armed: inserted,
        }
    }

    /// Event `id` reached a final state (a no-op for events this broker did not accept).
    pub(crate) fn finish(&self, id: &str) {
        let mut ids = self.lock();
        if ids.remove(id) && ids.is_empty() {
            drop(ids);
            self.idle.notify_waiters();
        }
    }
}

/// An event being handed to the provider: outstanding from creation, and after
/// [`Accepting::handed_off`] until its final decision; dropped before that, it is forgotten.
pub(crate) struct Accepting<'a> {
    outstanding: &'a Outstanding,
    id: &'a str,
    armed: bool,
}

impl Accepting<'_> {
    /// The provider accepted the event: it stays outstanding until it finishes.
    pub(crate) fn handed_off(mut self) {
        self.armed = false;
    }
}

impl Drop for Accepting<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.outstanding.finish(self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_abandoned_hand_off_is_forgotten_and_a_finished_one_is_removed() {
        let outstanding = Outstanding::default();
        drop(outstanding.accepting("abandoned"));
        assert_eq!(outstanding.len(), 0);
        outstanding.accepting("accepted").handed_off();
        assert_eq!(outstanding.len(), 1);
        outstanding.finish("someone-else's");
        assert_eq!(outstanding.len(), 1, "unknown ids change nothing");
        drop(outstanding.accepting("accepted"));
        assert_eq!(
            outstanding.len(),
            1,
            "a duplicate publish leaves the first one counted"
        );
        outstanding.finish("accepted");
        outstanding.finish("accepted");
        assert_eq!(outstanding.len(), 0);
    }
}
