//! The bounded buffer every watcher ([`super::Provider::stream`]) reads through.
//!
//! Backends deliver watcher events on their own schedule (a Redis pub/sub connection, NATS
//! push consumers, an in-process broadcast) and some queue them without limit for a reader
//! that does not poll. [`bounded`] puts a task between the backend and the reader: the task
//! drains the backend continuously into a queue of at most `capacity` events. When a further
//! event arrives while the queue is full, the watcher is cut at once: the backend stream is
//! dropped (releasing its subscription, which [`super::ProviderStats::subscribers`] then no
//! longer counts), and the reader gets the queued events followed by
//! [`ProviderError::Lagged`] and the end of the stream. A stalled reader therefore holds at
//! most `capacity` events, whatever the backend and however long it stalls.

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{EventStream, ProviderError, WatchItem};

/// Wraps `inner` so that at most `capacity` (at least 1) undelivered events are held for the
/// reader; see the module documentation. Must be called inside a tokio runtime.
///
/// The returned stream yields `inner`'s items in order and ends after the first error item
/// (passed on as it is), after [`ProviderError::Lagged`] when the reader fell `capacity`
/// events behind, or when `inner` ends.
pub fn bounded(inner: EventStream, capacity: usize) -> EventStream {
    let capacity = capacity.max(1);
    // One slot more than the events it may hold: the lag report always fits.
    let (sender, receiver) = mpsc::channel(capacity + 1);
    tokio::spawn(pump(inner, sender));
    Box::pin(ReceiverStream::new(receiver))
}

/// Moves items from `inner` to `sender` until `inner` ends, an error was passed on, the
/// reader lagged or went away.
async fn pump(mut inner: EventStream, sender: mpsc::Sender<WatchItem>) {
    loop {
        let item = tokio::select! {
            biased;
            _ = sender.closed() => return,
            item = inner.next() => item,
        };
        let Some(item) = item else { return };
        let (item, last) = admit(item, sender.capacity());
        if sender.try_send(item).is_err() || last {
            return;
        }
    }
}

/// What to queue for `item` when `free` slots are left, and whether it ends the stream: an
/// event is queued while more than the reserved slot is free; otherwise the lag report
/// takes the reserved slot instead.
fn admit(item: WatchItem, free: usize) -> (WatchItem, bool) {
    match item {
        Err(error) => (Err(error), true),
        Ok(_) if free <= 1 => (Err(ProviderError::Lagged(1)), true),
        Ok(event) => (Ok(event), false),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::event::{Event, EventSource};

    fn event(n: usize) -> Event {
        Event::new(EventSource::System, format!("t.n{n}"), "test")
    }

    /// A source of `count` events that records when it is dropped (the backend subscription
    /// being released).
    fn source(count: usize, dropped: Arc<AtomicBool>) -> EventStream {
        struct Flag(Arc<AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let flag = Flag(dropped);
        let events = futures::stream::iter((0..count).map(|n| Ok(event(n))))
            .chain(futures::stream::pending());
        Box::pin(events.map(move |item: WatchItem| {
            let _ = &flag;
            item
        }))
    }

    #[tokio::test]
    async fn a_reader_that_never_polls_is_cut_after_capacity_events() {
        let dropped = Arc::new(AtomicBool::new(false));
        let mut watcher = bounded(source(1000, dropped.clone()), 8);
        // The source is released as soon as the ninth event finds the buffer full.
        tokio::time::timeout(std::time::Duration::from_secs(30), async {
            while !dropped.load(Ordering::SeqCst) {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the lagging watcher's source is released");
        let mut events = 0;
        let last = loop {
            match watcher.next().await {
                Some(Ok(_)) => events += 1,
                other => break other,
            }
        };
        assert_eq!(events, 8, "exactly the buffered events are delivered");
        assert!(
            matches!(last, Some(Err(ProviderError::Lagged(_)))),
            "{last:?}"
        );
        assert!(
            watcher.next().await.is_none(),
            "the stream ends after the report"
        );
    }

    #[tokio::test]
    async fn an_error_is_passed_on_and_ends_the_stream() {
        let items: Vec<WatchItem> = vec![
            Ok(event(0)),
            Err(ProviderError::backend("test", "connection lost")),
            Ok(event(1)),
        ];
        let inner: EventStream = Box::pin(futures::stream::iter(items));
        let got: Vec<WatchItem> = bounded(inner, 4).collect().await;
        assert_eq!(got.len(), 2);
        assert!(matches!(&got[1], Err(ProviderError::Backend { .. })));
    }

    #[tokio::test]
    async fn dropping_the_reader_releases_the_source() {
        let dropped = Arc::new(AtomicBool::new(false));
        let watcher = bounded(source(0, dropped.clone()), 4);
        drop(watcher);
        tokio::time::timeout(std::time::Duration::from_secs(30), async {
            while !dropped.load(Ordering::SeqCst) {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the source is released when the reader goes away");
    }
}
