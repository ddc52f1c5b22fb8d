//! Dead letters from the server's delivery limit: when `max_deliver` is set, the server stops
//! redelivering a message after that many deliveries and publishes a `MAX_DELIVERIES`
//! advisory. Every host listens for it; each reads the message the advisory names and records
//! its event as `failed` in the group of the consumer the advisory names (a compare-and-set,
//! so the first host wins and the others see a finished event and do nothing). The event can then be listed with the dead letters and
//! re-run.
//!
//! Advisories are core NATS messages: one published while no host is connected is missed,
//! and that event stays in its last state (normally `processing`) until re-run by hand.

use std::sync::Arc;

use chrono::Utc;
use futures::StreamExt;
use serde::Deserialize;

use super::subjects::decode_name;
use super::{NAME, Shared};
use crate::event::{Event, EventStatus};
use crate::provider::ProviderError;

#[derive(Deserialize)]
struct MaxDeliveries {
    stream_seq: u64,
    #[serde(default)]
    deliveries: u64,
    #[serde(default)]
    consumer: String,
}

/// Subscribes to the advisories of this stream and handles them until shutdown.
pub(crate) async fn start(shared: &Arc<Shared>) -> Result<(), ProviderError> {
    let subject = format!(
        "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.*",
        shared.stream_name
    );
    let mut subscription = shared
        .client
        .subscribe(subject.clone())
        .await
        .map_err(|e| ProviderError::backend(NAME, format!("cannot subscribe to {subject}: {e}")))?;
    let weak = Arc::downgrade(shared);
    let shutdown = shared.shutdown.clone();
    tokio::spawn(async move {
        loop {
            let message = tokio::select! {
                message = subscription.next() => message,
                _ = shutdown.cancelled() => return,
            };
            let Some(message) = message else { return };
            let Some(shared) = weak.upgrade() else { return };
            match serde_json::from_slice::<MaxDeliveries>(&message.payload) {
                Ok(advisory) => {
                    if let Err(error) = dead_letter(&shared, &advisory).await {
                        tracing::warn!(sequence = advisory.stream_seq, %error, "could not record an event that reached max_deliver as failed");
                    }
                }
                Err(error) => tracing::debug!(%error, "ignoring an unreadable advisory"),
            }
        }
    });
    Ok(())
}

async fn dead_letter(shared: &Shared, advisory: &MaxDeliveries) -> Result<(), ProviderError> {
    let message = shared
        .stream
        .get_raw_message(advisory.stream_seq)
        .await
        .map_err(|e| ProviderError::backend(NAME, e))?;
    let published: Event = serde_json::from_slice(&message.payload)
        .map_err(|e| ProviderError::backend(NAME, format!("message is not an event: {e}")))?;
    let reason = format!(
        "delivered {} times to consumer group {:?} without being acknowledged (max_deliver reached)",
        advisory.deliveries, advisory.consumer
    );
    // The consumer is the group's durable consumer: the dead letter is that group's.
    let group = decode_name(&advisory.consumer);
    let result = shared
        .store
        .modify(&published.id, |record| {
            let current = record.state(&group);
            if current.is_finished() {
                return Err(ProviderError::InvalidState {
                    id: record.event.id.clone(),
                    status: current.status,
                    reason: "already finished",
                });
            }
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
            tracing::warn!(event_id = %published.id, %reason, "event recorded as failed");
            Ok(())
        }
        Err(ProviderError::InvalidState { .. } | ProviderError::NotFound(_)) => Ok(()),
        Err(error) => Err(error),
    }
}
