//! Wake-ups and live watchers.
//!
//! - Consumers sleep on [`Hub::wake`] (with the poll interval as a fallback). Local writes
//!   signal it directly; on PostgreSQL every host's listener signals it on `NOTIFY`; SQLite
//!   signals every provider instance on the same file in this process.
//! - Watchers read a broadcast channel fed by one task per provider: on PostgreSQL the
//!   listener, which fetches each notified event by id; on SQLite a poller that reads event
//!   rows and the own group's state rows by their change sequence (`changed`), woken early by
//!   local writes. Either way a watcher sees the events written by every host sharing the
//!   database, each publish and each change of the provider's own group's state, in that
//!   group's state; other groups' changes are not shown.
//! - On PostgreSQL the same listener also listens on the handler store's channel and signals
//!   its change feeds ([`crate::handler_store`]), so they share its connection and reconnects.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Duration;

use futures::StreamExt;
use sqlx::postgres::PgListener;
use sqlx::{AssertSqlSafe, Row};
use tokio::sync::{Notify, broadcast};
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_util::sync::CancellationToken;

use super::row::decode_event;
use super::schema::Queries;
use super::{NAME, Shared, db_error};
use eventbroker::event::Event;
use eventbroker::pattern::Pattern;
use eventbroker::provider::{EventStream, ProviderError};

/// Most notified ids fetched by one query (PostgreSQL watchers).
const FETCH_CHUNK: usize = 100;
/// Most changed rows read by one poll (SQLite watchers).
const POLL_PAGE: i64 = 500;

/// What watchers receive.
#[derive(Debug, Clone)]
pub enum WatchMessage {
    /// An event as published or after a change.
    Event(Box<Event>),
    /// Notifications may have been missed (the listener's connection dropped).
    Lost,
}

/// Signals shared by the tasks and consumers of one provider instance.
#[derive(Default)]
pub struct Hub {
    /// Work may be claimable: consumers re-check.
    pub wake: Notify,
    /// An event changed: the SQLite poller reads now instead of at its next tick.
    pub changed: Notify,
}

/// Provider instances of this process per SQLite file, so that a write through one wakes the
/// others at once.
static SQLITE_HUBS: LazyLock<Mutex<HashMap<PathBuf, Vec<Weak<Hub>>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn hubs() -> std::sync::MutexGuard<'static, HashMap<PathBuf, Vec<Weak<Hub>>>> {
    SQLITE_HUBS.lock().unwrap_or_else(|p| p.into_inner())
}

/// The registry key of a SQLite file (canonical once it exists).
pub fn sqlite_key(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Registers `hub` as a provider instance on the SQLite file `key`.
pub fn register_sqlite_hub(key: &Path, hub: &Arc<Hub>) {
    let mut hubs = hubs();
    let list = hubs.entry(key.to_path_buf()).or_default();
    list.retain(|weak| weak.strong_count() > 0);
    list.push(Arc::downgrade(hub));
}

/// Removes `hub` from the registry.
pub fn unregister_sqlite_hub(key: &Path, hub: &Arc<Hub>) {
    let mut hubs = hubs();
    if let Some(list) = hubs.get_mut(key) {
        list.retain(|weak| weak.strong_count() > 0 && !std::ptr::eq(weak.as_ptr(), &**hub));
        if list.is_empty() {
            hubs.remove(key);
        }
    }
}

/// Signals every provider instance of this process on the SQLite file `key`.
pub fn signal_sqlite(key: &Path, work: bool) {
    let targets: Vec<Arc<Hub>> = hubs()
        .get(key)
        .map(|list| list.iter().filter_map(Weak::upgrade).collect())
        .unwrap_or_default();
    for hub in targets {
        if work {
            hub.wake.notify_waiters();
        }
        hub.changed.notify_one();
    }
}

/// A watcher stream over `receiver`: events matching `pattern`, ending after an error or
/// when `shutdown` is cancelled.
pub fn watcher_stream(
    receiver: broadcast::Receiver<WatchMessage>,
    pattern: &Pattern,
    shutdown: CancellationToken,
) -> EventStream {
    let pattern = pattern.clone();
    let stream = BroadcastStream::new(receiver)
        .filter_map(move |item| {
            let item = match item {
                Ok(WatchMessage::Event(event)) if pattern.matches(&event.event_type) => {
                    Some(Ok(*event))
                }
                Ok(WatchMessage::Event(_)) => None,
                Ok(WatchMessage::Lost) => Some(Err(ProviderError::backend(
                    NAME,
                    "the connection carrying change notifications was lost and events may \
                     have been missed; reconnect to continue",
                ))),
                Err(BroadcastStreamRecvError::Lagged(missed)) => {
                    Some(Err(ProviderError::Lagged(missed)))
                }
            };
            futures::future::ready(item)
        })
        .scan(false, |ended, item| {
            // End the stream right after an error: the watcher must reconnect.
            if *ended {
                return futures::future::ready(None);
            }
            *ended = item.is_err();
            futures::future::ready(Some(item))
        })
        .take_until(shutdown.cancelled_owned());
    Box::pin(stream)
}

/// A parsed notification payload: `p<id>` (published: deliverable and changed), `c<id>`
/// (stored), `P<id>/<group>` (the group's state changed and the event is deliverable to it
/// again), `C<id>/<group>` (the group's state changed), `w` (wake consumers only).
#[derive(Debug, PartialEq)]
struct Notification<'a> {
    /// Consumers should look for work.
    work: bool,
    /// The event that changed, if any.
    id: Option<&'a str>,
    /// The group whose state changed (`None`: the event itself, seen by every group).
    group: Option<&'a str>,
}

fn parse_notification(payload: &str) -> Notification<'_> {
    match payload.split_at_checked(1) {
        Some(("p", id)) => Notification {
            work: true,
            id: Some(id),
            group: None,
        },
        Some(("c", id)) => Notification {
            work: false,
            id: Some(id),
            group: None,
        },
        Some((kind @ ("P" | "C"), rest)) => {
            // Event ids never contain '/'; group names may.
            let (id, group) = rest.split_once('/').unwrap_or((rest, ""));
            Notification {
                work: kind == "P",
                id: Some(id),
                group: Some(group),
            }
        }
        _ => Notification {
            work: true,
            id: None,
            group: None,
        },
    }
}

/// The payload announcing a change of `group`'s state of event `id` (`deliverable`: the
/// event became deliverable to the group again).
pub fn state_notification(deliverable: bool, id: &str, group: &str) -> String {
    format!("{}{id}/{group}", if deliverable { 'P' } else { 'C' })
}

/// PostgreSQL: receives notifications until `shutdown`, waking consumers and feeding
/// watchers and the handler store's change feeds (notifications on its channel, and a signal
/// whenever notifications may have been missed).
pub async fn pg_listener(
    shared: Weak<Shared>,
    hub: Arc<Hub>,
    mut listener: PgListener,
    shutdown: CancellationToken,
) {
    let mut failures = 0u32;
    loop {
        let received = tokio::select! {
            _ = shutdown.cancelled() => return,
            received = listener.try_recv() => received,
        };
        match received {
            Ok(Some(first)) => {
                failures = 0;
                let mut wake = false;
                let mut ids: Vec<String> = Vec::new();
                let mut next = Some(first);
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                let mut handlers = false;
                while let Some(notification) = next.take() {
                    if notification.channel() == shared.q.channel {
                        let parsed = parse_notification(notification.payload());
                        wake |= parsed.work;
                        // Watchers show the own group: other groups' state changes are not
                        // theirs.
                        let own = parsed
                            .group
                            .is_none_or(|group| group == shared.options.group);
                        if let (Some(id), true) = (parsed.id, own) {
                            ids.push(id.to_owned());
                        }
                    } else {
                        // The handler store's channel: its feed only needs to know that
                        // something changed.
                        handlers = true;
                    }
                    if ids.len() < 10 * FETCH_CHUNK {
                        next = listener.next_buffered();
                    }
                }
                if wake {
                    hub.wake.notify_waiters();
                }
                if handlers {
                    let _ = shared.handler_changes.send(());
                }
                if shared.watchers.receiver_count() > 0
                    && !ids.is_empty()
                    && let Err(error) = publish_by_id(&shared, ids).await
                {
                    tracing::warn!(%error, "could not fetch notified events for watchers");
                    let _ = shared.watchers.send(WatchMessage::Lost);
                }
            }
            Ok(None) => {
                tracing::warn!("lost the PostgreSQL notification connection; reconnected");
                hub.wake.notify_waiters();
                let Some(shared) = shared.upgrade() else {
                    return;
                };
                let _ = shared.watchers.send(WatchMessage::Lost);
                // Record changes may have been missed: handler store feeds look again.
                let _ = shared.handler_changes.send(());
            }
            Err(error) => {
                failures += 1;
                let pause = Duration::from_millis(100 * 2u64.pow(failures.min(6)))
                    .min(Duration::from_secs(5));
                tracing::warn!(%error, retry_in = ?pause, "PostgreSQL notification listener failed");
                if let Some(shared) = shared.upgrade() {
                    let _ = shared.watchers.send(WatchMessage::Lost);
                    let _ = shared.handler_changes.send(());
                }
                hub.wake.notify_waiters();
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}

/// Fetches the events with these ids (in notification order, once each) and broadcasts them.
async fn publish_by_id(shared: &Shared, mut ids: Vec<String>) -> Result<(), ProviderError> {
    // Keep the last notification of each id: the fetch returns the current state anyway.
    let mut seen = std::collections::HashSet::new();
    ids.reverse();
    ids.retain(|id| seen.insert(id.clone()));
    ids.reverse();
    for chunk in ids.chunks(FETCH_CHUNK) {
        let sql = Queries::events_by_id(&shared.table, chunk.len());
        let mut query = sqlx::query(AssertSqlSafe(sql)).bind(shared.options.group.clone());
        for id in chunk {
            query = query.bind(id.clone());
        }
        let rows = query.fetch_all(&shared.pool).await.map_err(db_error)?;
        let mut by_id = HashMap::with_capacity(rows.len());
        for row in &rows {
            let event = decode_event(row, 0)?;
            by_id.insert(event.id.clone(), event);
        }
        for id in chunk {
            if let Some(event) = by_id.remove(id) {
                let _ = shared.watchers.send(WatchMessage::Event(Box::new(event)));
            }
        }
    }
    Ok(())
}

/// SQLite: reads changed rows after the last seen change sequence, every poll interval or
/// when a local write signals, and broadcasts them to watchers.
/// Watchers see every change after `start` ([`newest_change`] when the provider connected).
pub async fn sqlite_poller(
    shared: Weak<Shared>,
    hub: Arc<Hub>,
    start: i64,
    shutdown: CancellationToken,
) {
    let mut cursor = (start, i64::MAX);
    loop {
        let interval = match shared.upgrade() {
            Some(shared) => {
                if let Err(error) = poll_changes(&shared, &mut cursor).await {
                    tracing::warn!(%error, "polling SQLite for changes failed");
                }
                shared.options.poll_interval
            }
            None => return,
        };
        // Local writes trigger a read at once while someone watches; without watchers the
        // cursor only moves forward at each tick.
        let tick = tokio::time::Instant::now() + interval;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = hub.changed.notified() => {
                    let watched = shared
                        .upgrade()
                        .is_some_and(|shared| shared.watchers.receiver_count() > 0);
                    if watched {
                        break;
                    }
                }
                _ = tokio::time::sleep_until(tick) => break,
            }
        }
    }
}

/// The newest change sequence of the database (SQLite).
///
/// # Errors
/// The database cannot be read.
pub async fn newest_change(shared: &Shared) -> Result<i64, ProviderError> {
    sqlx::query_scalar(AssertSqlSafe(shared.q.max_changed.clone()))
        .fetch_one(&shared.pool)
        .await
        .map_err(db_error)
}

async fn poll_changes(shared: &Shared, cursor: &mut (i64, i64)) -> Result<(), ProviderError> {
    // Read the newest change before looking at the watcher count: a watcher that subscribes
    // after this read sees every change committed after it subscribed.
    let newest = newest_change(shared).await?;
    let (mut changed, mut seq) = *cursor;
    if shared.watchers.receiver_count() == 0 {
        *cursor = (
            newest.max(changed),
            if newest > changed { i64::MAX } else { seq },
        );
        return Ok(());
    }
    let result = async {
        loop {
            let rows = sqlx::query(AssertSqlSafe(shared.q.changes.clone()))
                .bind(changed)
                .bind(seq)
                .bind(POLL_PAGE)
                .bind(shared.options.group.clone())
                .fetch_all(&shared.pool)
                .await
                .map_err(db_error)?;
            for row in &rows {
                changed = row.try_get(0).map_err(db_error)?;
                seq = row.try_get(1).map_err(db_error)?;
                let event = decode_event(row, 2)?;
                let _ = shared.watchers.send(WatchMessage::Event(Box::new(event)));
            }
            if (rows.len() as i64) < POLL_PAGE {
                return Ok(());
            }
        }
    }
    .await;
    *cursor = (changed, seq);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_parse() {
        let parsed = |work, id, group| Notification { work, id, group };
        assert_eq!(parse_notification("pabc"), parsed(true, Some("abc"), None));
        assert_eq!(parse_notification("cabc"), parsed(false, Some("abc"), None));
        assert_eq!(parse_notification("w"), parsed(true, None, None));
        assert_eq!(parse_notification(""), parsed(true, None, None));
        let payload = state_notification(true, "e:1", "a/b c");
        assert_eq!(
            parse_notification(&payload),
            parsed(true, Some("e:1"), Some("a/b c"))
        );
        let payload = state_notification(false, "e1", "g");
        assert_eq!(
            parse_notification(&payload),
            parsed(false, Some("e1"), Some("g"))
        );
    }
}
