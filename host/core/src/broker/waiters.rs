//! Sync publishes waiting for their event's final state: a map from event id to the callers
//! waiting for it, fulfilled where the broker records a final decision. A waiter removes its
//! own entry when it is dropped, whether it was fulfilled or its caller went away.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::sync::oneshot;

use crate::event::Event;

/// The callers waiting for one event: (waiter token, where to send the final event).
type Waiting = Vec<(u64, oneshot::Sender<Event>)>;

/// The callers waiting for events to finish, by event id.
#[derive(Default)]
pub(crate) struct Waiters {
    map: Mutex<HashMap<String, Waiting>>,
    /// Registered waiters, so that finishing an event nobody waits for takes no lock.
    count: AtomicUsize,
    next_token: AtomicU64,
}

/// One caller's wait for one event. Dropping it unregisters it.
pub(crate) struct Waiter<'a> {
    waiters: &'a Waiters,
    id: String,
    token: u64,
    /// Receives the event in its final state.
    pub(crate) receiver: oneshot::Receiver<Event>,
}

impl Waiters {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Waiting>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a wait for event `id`; register before the event can be processed, so that
    /// its final state cannot be recorded before anyone listens.
    pub(crate) fn register(&self, id: &str) -> Waiter<'_> {
        let (sender, receiver) = oneshot::channel();
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        self.lock()
            .entry(id.to_owned())
            .or_default()
            .push((token, sender));
        self.count.fetch_add(1, Ordering::SeqCst);
        Waiter {
            waiters: self,
            id: id.to_owned(),
            token,
            receiver,
        }
    }

    /// Whether anyone waits for any event (a lock-free check).
    pub(crate) fn any(&self) -> bool {
        self.count.load(Ordering::SeqCst) > 0
    }

    /// Hands `event`, in its final state, to everyone waiting for it.
    pub(crate) fn finish(&self, event: &Event) {
        if self.count.load(Ordering::SeqCst) == 0 {
            return;
        }
        let Some(waiting) = self.lock().remove(&event.id) else {
            return;
        };
        for (_, sender) in waiting {
            // A caller that went away meanwhile drops its receiver: nothing to do.
            let _ = sender.send(event.clone());
        }
    }

    /// Registered waiters (fulfilled ones count until they are dropped).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let mut map = self.waiters.lock();
        if let Some(waiting) = map.get_mut(&self.id) {
            waiting.retain(|(token, _)| *token != self.token);
            if waiting.is_empty() {
                map.remove(&self.id);
            }
        }
        drop(map);
        self.waiters.count.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventSource;

    fn event(id: &str) -> Event {
        let mut event = Event::new(EventSource::System, "a.b", "h");
        event.id = id.into();
        event
    }

    #[test]
    fn finishing_wakes_every_waiter_of_that_event_only() {
        let waiters = Waiters::default();
        let mut first = waiters.register("x");
        let mut second = waiters.register("x");
        let mut other = waiters.register("y");
        waiters.finish(&event("x"));
        assert_eq!(first.receiver.try_recv().expect("woken").id, "x");
        assert_eq!(second.receiver.try_recv().expect("woken").id, "x");
        assert!(other.receiver.try_recv().is_err(), "y is not finished");
        drop((first, second, other));
        assert_eq!(waiters.len(), 0);
        assert!(waiters.lock().is_empty());
    }

    #[test]
    fn a_dropped_waiter_leaves_nothing_behind_and_spares_the_others() {
        let waiters = Waiters::default();
        let gone = waiters.register("x");
        let mut stays = waiters.register("x");
        drop(gone);
        assert_eq!(waiters.len(), 1);
        waiters.finish(&event("x"));
        assert!(stays.receiver.try_recv().is_ok());
        drop(stays);
        assert_eq!(waiters.len(), 0);
        assert!(waiters.lock().is_empty());
        // Finishing an event nobody waits for is a no-op.
        waiters.finish(&event("z"));
    }
}
