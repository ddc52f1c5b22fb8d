//! Live watchers: every change of an event is published (by the same script that makes it)
//! on the pub/sub channel `{stream}:watch`, with the group whose state changed; each watcher
//! holds its own subscription, so a watcher on any host sees the events of every host: each
//! publish and each change of the provider's own group's state (others' are skipped).
//!
//! Pub/sub does not buffer for absent subscribers: a watcher whose connection is lost (or
//! that Redis disconnects for reading too slowly) gets an error item and its stream ends, so
//! it knows to reconnect instead of silently missing events.
//!
//! The Redis client queues received messages without limit, so the subscription is drained
//! continuously into a buffer of `watcher_buffer` events ([`bounded`]): a watcher that falls
//! further behind is cut with [`ProviderError::Lagged`] and its subscription closed, instead of
//! growing the host's memory.

use std::sync::Arc;

use futures::StreamExt;

use super::store::decode_watch;
use super::{NAME, Shared, backend};
use eventbroker::pattern::Pattern;
use eventbroker::provider::watch_buffer::bounded;
use eventbroker::provider::{EventStream, ProviderError, WatchItem};

/// Subscribes a new watcher to events whose type matches `pattern`.
pub(crate) async fn open(
    shared: Arc<Shared>,
    pattern: Pattern,
) -> Result<EventStream, ProviderError> {
    let timeout = shared.options.command_timeout;
    let subscribe = async {
        let mut pubsub = shared.client.get_async_pubsub().await?;
        pubsub.subscribe(&shared.keys.watch).await?;
        Ok::<_, redis::RedisError>(pubsub)
    };
    let pubsub = tokio::time::timeout(timeout, subscribe)
        .await
        .map_err(|_| ProviderError::backend(NAME, "timed out subscribing to the watch channel"))?
        .map_err(backend)?;
    let registered = shared.counters.watcher_opened();
    let own = shared.options.group.clone();
    let messages = pubsub.into_on_message().filter_map(move |message| {
        let item = match message.get_payload::<String>() {
            Ok(payload) => match decode_watch(&payload) {
                // A publish, or a change of the own group's state: other groups' are not shown.
                Ok((event, group))
                    if pattern.matches(&event.event_type)
                        && group.as_deref().is_none_or(|group| group == own) =>
                {
                    Some(Ok(event))
                }
                Ok(_) => None,
                Err(error) => {
                    tracing::warn!(%error, "ignoring an undecodable watch message");
                    None
                }
            },
            Err(error) => {
                tracing::warn!(%error, "ignoring a non-text watch message");
                None
            }
        };
        futures::future::ready(item)
    });
    let lost = futures::stream::once(async {
        Err::<_, ProviderError>(ProviderError::backend(
            NAME,
            "the watch connection was lost; events may have been missed, reconnect to continue",
        ))
    });
    let stream = messages
        .chain(lost)
        .map(move |item: WatchItem| {
            let _keep = &registered;
            item
        })
        .take_until(shared.shutdown.clone().cancelled_owned());
    Ok(bounded(Box::pin(stream), shared.options.watcher_buffer))
}
