//! Dead letters from the server's delivery limit: when a consumer group's `max_deliver` is
//! reached, the server stops redelivering the message and publishes a `MAX_DELIVERIES`
//! advisory. Advisories are plain NATS messages, lost when nobody listens, so a stream of the
//! provider's own (`{stream_name}_DEAD_LETTERS`, work-queue retention, same storage and
//! `max_age` as the events) captures them: an advisory published while no host is connected
//! waits there. Every host pulls from one durable consumer on it; the host that receives an
//! advisory records its event as `failed` in the group of the consumer the advisory names (a
//! compare-and-set, only while the group has not finished the event and the advisory is about
//! the message of the group's current run) and then acknowledges the advisory, which removes
//! it. If recording fails, the advisory is given back and tried again. The event can then be
//! listed with the group's dead letters and re-run.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{self, AckPolicy, PullConsumer};
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::stream::{self, RetentionPolicy, StorageType};
use chrono::Utc;
use futures::StreamExt;
use serde::Deserialize;

use super::subjects::decode_name;
use super::{NAME, Shared};
use eventbroker::event::{Event, EventStatus};
use eventbroker::provider::ProviderError;

/// The durable consumer every host pulls advisories from.
const CONSUMER: &str = "eventbroker-dead-letters";
/// How long an advisory being recorded is held before the server offers it again.
const ACK_WAIT: Duration = Duration::from_secs(10);
/// Pause before an advisory whose recording failed is offered again.
const RETRY_DELAY: Duration = Duration::from_secs(2);
/// Pause before pulling again after the pull itself failed.
const PULL_PAUSE: Duration = Duration::from_secs(1);

#[derive(Deserialize)]
struct MaxDeliveries {
    stream_seq: u64,
    #[serde(default)]
    deliveries: u64,
    #[serde(default)]
    consumer: String,
}

fn backend(error: impl std::fmt::Display) -> ProviderError {
    ProviderError::backend(NAME, error)
}

/// The name of the stream keeping the advisories of events stream `events`.
fn stream_name(events: &str) -> String {
    format!("{events}_DEAD_LETTERS")
}

/// Creates (or updates) the advisory stream and its consumer, and records the advisories it
/// delivers until shutdown.
///
/// # Errors
/// Backend failures creating the stream or the consumer.
pub(crate) async fn start(
    shared: &Arc<Shared>,
    storage: StorageType,
    max_age: Duration,
) -> Result<(), ProviderError> {
    let name = stream_name(&shared.stream_name);
    shared
        .context
        .create_or_update_stream(stream::Config {
            name: name.clone(),
            description: Some(format!(
                "eventbroker: max_deliver advisories of stream {}, kept until recorded",
                shared.stream_name
            )),
            subjects: vec![format!(
                "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.*",
                shared.stream_name
            )],
            retention: RetentionPolicy::WorkQueue,
            storage,
            max_age,
            ..stream::Config::default()
        })
        .await
        .map_err(|e| backend(format!("cannot create or update stream {name:?}: {e}")))?;
    let stream = shared
        .context
        .get_stream(&name)
        .await
        .map_err(|e| backend(format!("cannot open stream {name:?}: {e}")))?;
    let consumer: PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(CONSUMER.into()),
            description: Some("eventbroker: records events that reached max_deliver".into()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: ACK_WAIT,
            ..consumer::pull::Config::default()
        })
        .await
        .map_err(|e| {
            backend(format!(
                "cannot create the consumer of stream {name:?}: {e}"
            ))
        })?;
    tokio::spawn(record_advisories(Arc::downgrade(shared), consumer));
    Ok(())
}

/// Deletes the advisory stream (tear-down).
///
/// # Errors
/// Backend failures.
pub(crate) async fn destroy(shared: &Shared) -> Result<(), ProviderError> {
    let name = stream_name(&shared.stream_name);
    shared
        .context
        .delete_stream(&name)
        .await
        .map(drop)
        .map_err(|e| backend(format!("cannot delete stream {name:?}: {e}")))
}

/// Pulls advisories and records them, until the provider shuts down or goes away.
async fn record_advisories(shared: std::sync::Weak<Shared>, consumer: PullConsumer) {
    let Some(shutdown) = shared.upgrade().map(|s| s.shutdown.clone()) else {
        return;
    };
    loop {
        let messages = tokio::select! {
            messages = consumer.messages() => messages,
            _ = shutdown.cancelled() => return,
        };
        let mut messages = match messages {
            Ok(messages) => messages,
            Err(error) => {
                tracing::debug!(%error, "cannot pull max_deliver advisories; trying again");
                tokio::select! {
                    _ = tokio::time::sleep(PULL_PAUSE) => continue,
                    _ = shutdown.cancelled() => return,
                }
            }
        };
        loop {
            let message = tokio::select! {
                message = messages.next() => message,
                _ = shutdown.cancelled() => return,
            };
            let message = match message {
                Some(Ok(message)) => message,
                Some(Err(error)) => {
                    tracing::debug!(%error, "pulling max_deliver advisories failed");
                    continue;
                }
                None => break,
            };
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let outcome = match serde_json::from_slice::<MaxDeliveries>(&message.payload) {
                Ok(advisory) => match dead_letter(&shared, &advisory).await {
                    Ok(()) => AckKind::Ack,
                    Err(error) => {
                        tracing::warn!(sequence = advisory.stream_seq, %error, "could not record an event that reached max_deliver as failed; trying again");
                        AckKind::Nak(Some(RETRY_DELAY))
                    }
                },
                Err(error) => {
                    tracing::warn!(%error, "dropping an unreadable max_deliver advisory");
                    AckKind::Term
                }
            };
            if let Err(error) = message.ack_with(outcome).await {
                tracing::debug!(%error, "could not acknowledge a max_deliver advisory; it comes back");
            }
        }
    }
}

/// Records the event of the message an advisory names as `failed` in the advisory's group,
/// unless the group finished it or has re-run it since (the message no longer carries the
/// group's current run).
async fn dead_letter(shared: &Shared, advisory: &MaxDeliveries) -> Result<(), ProviderError> {
    let message = match shared.stream.get_raw_message(advisory.stream_seq).await {
        Ok(message) => message,
        Err(error) if error.kind() == stream::RawMessageErrorKind::NoMessageFound => {
            // Expired (max_age): its state expires with it.
            return Ok(());
        }
        Err(error) => return Err(backend(error)),
    };
    let published: Event = match serde_json::from_slice(&message.payload) {
        Ok(event) => event,
        Err(error) => {
            tracing::warn!(sequence = advisory.stream_seq, %error, "a message that reached max_deliver is not an event");
            return Ok(());
        }
    };
    // The consumer is the group's durable consumer: the dead letter is that group's.
    let group = decode_name(&advisory.consumer);
    let reason = format!(
        "delivered {} times to consumer group {group:?} without being acknowledged (max_deliver reached)",
        advisory.deliveries
    );
    let result = shared
        .store
        .modify(&published.id, |record| {
            let current = record.state(&group);
            if current.is_finished() || !record.carried_by(&group, advisory.stream_seq) {
                return Err(ProviderError::InvalidState {
                    id: record.event.id.clone(),
                    status: current.status,
                    reason: "already finished or re-run",
                });
            }
            record.revoke(&group);
            record.change(&group, |state| {
                state.status = EventStatus::Failed;
                state.error = Some(reason.clone());
                state.completed_at = Some(Utc::now());
            });
            Ok(())
        })
        .await;
    match result {
        Ok(_) => {
            tracing::warn!(event_id = %published.id, %group, %reason, "event recorded as failed");
            Ok(())
        }
        Err(ProviderError::InvalidState { .. } | ProviderError::NotFound(_)) => Ok(()),
        Err(error) => Err(error),
    }
}
