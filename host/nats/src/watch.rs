//! Live watchers (`stream(pattern)`): fan-out, independent of the consumer groups.
//!
//! A watcher merges two ordered ephemeral consumers, both starting at "now":
//! - one on the event stream with the pattern's filter subject, so the server only sends
//!   matching publishes (and re-runs; other groups' re-runs are skipped here);
//! - one on the state bucket (a key-value watch), filtered here by the pattern, for every
//!   change of the provider's own group's state (the record's `changed`; other groups' changes,
//!   claims and renewals are skipped). A record that no group touched yet is shown unless it is
//!   still in its just-published state, which the first consumer already reported.
//!
//! Ordered consumers are recreated on gaps, but the client queues what the server pushes for
//! a reader that does not poll (up to 64 Ki messages per subscription, whatever their size).
//! So both are drained continuously into a buffer of `watcher_buffer` events ([`bounded`]): a
//! watcher that falls further behind is cut with [`ProviderError::Lagged`] and its
//! subscriptions are dropped (the server removes the ephemeral consumers). When both sources
//! have something ready, the publish is yielded first.

use async_nats::jetstream::consumer::{DeliverPolicy, ReplayPolicy, push};
use async_nats::jetstream::kv::Operation;
use futures::stream::{PollNext, StreamExt};

use super::consumer::GROUP_HEADER;
use super::record::Record;
use super::{NAME, Shared};
use eventbroker::event::{Event, EventStatus};
use eventbroker::pattern::Pattern;
use eventbroker::provider::watch_buffer::bounded;
use eventbroker::provider::{EventStream, ProviderError, WatchItem};

fn backend(error: impl std::fmt::Display) -> ProviderError {
    ProviderError::backend(NAME, error)
}

/// Whether a state entry is exactly what the publish carried (reported by the event side).
fn just_published(event: &Event) -> bool {
    event.status == EventStatus::Pending
        && event.processed_at.is_none()
        && event.retry_count == 0
        && event.handlers.is_empty()
        && event.error.is_none()
}

/// Opens a watcher over `pattern`.
pub(crate) async fn watch(
    shared: &Shared,
    pattern: &Pattern,
) -> Result<EventStream, ProviderError> {
    let filter = super::subjects::filter_subject(&shared.prefix, pattern);
    let stream = shared
        .context
        .get_stream(&shared.stream_name)
        .await
        .map_err(|e| backend(format!("cannot open stream {:?}: {e}", shared.stream_name)))?;
    let own_published = shared.group.clone();
    let published = stream
        .create_consumer(push::OrderedConfig {
            deliver_subject: shared.client.new_inbox(),
            description: Some("eventbroker watcher".into()),
            filter_subject: filter,
            deliver_policy: DeliverPolicy::New,
            replay_policy: ReplayPolicy::Instant,
            ..push::OrderedConfig::default()
        })
        .await
        .map_err(|e| backend(format!("cannot open a watcher: {e}")))?
        .messages()
        .await
        .map_err(|e| backend(format!("cannot open a watcher: {e}")))?
        .filter_map(move |message| {
            let item: Option<WatchItem> = match message {
                // Another group's re-run is not shown.
                Ok(message)
                    if message
                        .headers
                        .as_ref()
                        .and_then(|headers| headers.get(GROUP_HEADER))
                        .is_some_and(|group| group.as_str() != own_published) =>
                {
                    None
                }
                Ok(message) => match serde_json::from_slice::<Event>(&message.payload) {
                    Ok(event) => Some(Ok(event)),
                    Err(error) => {
                        tracing::warn!(subject = %message.subject, %error, "watcher skipped a message that is not an event");
                        None
                    }
                },
                Err(error) => Some(Err(backend(format!("watcher failed: {error}")))),
            };
            futures::future::ready(item)
        });
    let pattern = pattern.clone();
    let own = shared.group.clone();
    let changes = shared
        .store
        .watch()
        .await?
        .filter_map(move |entry| {
            let item: Option<WatchItem> = match entry {
                Ok(entry) if entry.operation == Operation::Put => {
                    let shown = Record::decode(&entry.value).map(|record| match &record.changed {
                        Some(group) if *group == own => Some(record.view(&own)),
                        Some(_) => None,
                        None if record.groups.is_empty() => {
                            Some(record.event).filter(|event| !just_published(event))
                        }
                        None => None,
                    });
                    match shown {
                        Ok(Some(event)) if pattern.matches(&event.event_type) => Some(Ok(event)),
                        Ok(_) => None,
                        Err(error) => {
                            tracing::warn!(key = %entry.key, %error, "watcher skipped an unreadable event state");
                            None
                        }
                    }
                }
                Ok(_) => None,
                Err(error) => Some(Err(backend(format!("watcher failed: {error}")))),
            };
            futures::future::ready(item)
        });
    let merged =
        futures::stream::select_with_strategy(published, changes, |_: &mut ()| PollNext::Left)
            // A failed source ends the watcher after reporting the error.
            .scan(false, |ended, item| {
                if *ended {
                    return futures::future::ready(None);
                }
                *ended = item.is_err();
                futures::future::ready(Some(item))
            })
            .take_until(shared.shutdown.clone().cancelled_owned());
    let guard = shared.counters.watcher_opened();
    let stream = merged.map(move |item| {
        let _ = &guard;
        item
    });
    Ok(bounded(Box::pin(stream), shared.watcher_buffer))
}
