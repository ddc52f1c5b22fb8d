//! Consumer groups: one durable JetStream pull consumer per group (explicit acknowledgement,
//! `ack_wait`, `max_deliver`, `backoff`). Every host joining the group pulls from the same
//! durable consumer, so the server hands each message to one of them at a time.
//!
//! - A delivery's token is the message's acknowledgement subject, so any outcome can be sent
//!   for it later without keeping the message.
//! - `fetch` first takes what is available at once (a `no_wait` pull); when nothing is, it
//!   long-polls for one message, then tops the batch up without waiting. A long poll cut short
//!   by `close` is drained in the background and whatever it still delivers is given back with
//!   a negative acknowledgement, so nothing waits for `ack_wait`.
//! - The current state of each delivered event, as the consumer's group sees it, comes from the
//!   state store (so retries see the group's handler outcomes of earlier attempts). A first
//!   delivery of an event the group already finished, a re-run addressed to another group
//!   (header [`GROUP_HEADER`]), and any delivery of a deleted event, are acknowledged and
//!   skipped.
//! - `complete` writes the final state, then acknowledges (`+ACK`, confirmed by the server) or,
//!   for `failed`, terminates (`+TERM`); `retry` writes the state and sends a delayed `-NAK`;
//!   `release` writes `pending` and sends `-NAK`; `keep_alive` sends `+WPI` (in progress),
//!   which restarts the server's `ack_wait` timer.
//! - `close` (and dropping the consumer) gives every delivery it still holds back with `-NAK`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::message::{AckKind, Acker};
use async_trait::async_trait;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::store::{Lookup, Record};
use super::{NAME, Shared};
use crate::event::{Event, EventStatus};
use crate::provider::{Consumer, Delivery, ProviderError, StatusUpdate};

/// How long one long-poll pull request waits on the server.
const LONG_POLL: Duration = Duration::from_secs(5);

/// Header of a message meant for one consumer group only (a re-run of that group's).
pub(crate) const GROUP_HEADER: &str = "Eventbroker-Group";

fn backend(error: impl std::fmt::Display) -> ProviderError {
    ProviderError::backend(NAME, error)
}

/// A member of one consumer group.
pub(crate) struct NatsConsumer {
    shared: Arc<Shared>,
    consumer: PullConsumer,
    group: String,
    closed: CancellationToken,
    counted: AtomicBool,
    /// Acknowledgement subjects of deliveries handed out and not yet settled.
    outstanding: Arc<Mutex<HashSet<String>>>,
}

impl NatsConsumer {
    pub(crate) fn new(shared: Arc<Shared>, consumer: PullConsumer, group: String) -> Self {
        let closed = shared.shutdown.child_token();
        NatsConsumer {
            shared,
            consumer,
            group,
            closed,
            counted: AtomicBool::new(true),
            outstanding: Arc::default(),
        }
    }

    fn outstanding(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.outstanding.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Messages available right now, up to `max`.
    async fn pull_now(
        &self,
        max: usize,
    ) -> Result<Vec<async_nats::jetstream::Message>, ProviderError> {
        let mut batch = self
            .consumer
            .fetch()
            .max_messages(max)
            .expires(LONG_POLL)
            .messages()
            .await
            .map_err(|e| backend(format!("pull from group {:?} failed: {e}", self.group)))?;
        let mut messages = Vec::new();
        while let Some(message) = batch.next().await {
            messages.push(message.map_err(|e| backend(format!("pull failed: {e}")))?);
        }
        Ok(messages)
    }

    /// Turns messages into deliveries, skipping (and settling) those that need no processing.
    async fn admit(&self, messages: Vec<async_nats::jetstream::Message>) -> Vec<Delivery> {
        let checks = messages.into_iter().map(|message| self.admit_one(message));
        futures::future::join_all(checks)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    async fn admit_one(&self, message: async_nats::jetstream::Message) -> Option<Delivery> {
        let delivered = message.info().map(|info| info.delivered).unwrap_or(1);
        // `split` moves the acknowledgement subject into the acker: take it first.
        let token = message.reply.as_ref()?.to_string();
        let (message, acker) = message.split();
        let for_group = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(GROUP_HEADER))
            .map(|group| group.as_str().to_owned());
        if for_group.is_some_and(|group| group != self.group) {
            // Another group's re-run.
            let _ = acker.ack().await;
            return None;
        }
        let published: Event = match serde_json::from_slice(&message.payload) {
            Ok(event) => event,
            Err(error) => {
                tracing::warn!(subject = %message.subject, %error, "terminating a message that is not an event");
                let _ = acker.ack_with(AckKind::Term).await;
                return None;
            }
        };
        let count = u32::try_from(delivered.max(1)).unwrap_or(u32::MAX);
        match self.shared.store.lookup(&published.id).await {
            Ok(Lookup::Live(current))
                if delivered <= 1 && current.record.state(&self.group).is_finished() =>
            {
                let _ = acker.ack().await;
                None
            }
            Ok(Lookup::Live(current)) => {
                self.outstanding().insert(token.clone());
                Some(Delivery {
                    event: current.record.view(&self.group),
                    token,
                    delivery_count: count,
                })
            }
            Ok(Lookup::TakenBack { revision }) => {
                // Its publish reported a failure and took the state back, yet the server had
                // stored the message: the event was accepted after all. Restore its state.
                let stored = Record::new(published.clone());
                match self.shared.store.restore(&stored, revision).await {
                    Ok(_) => {
                        tracing::info!(event_id = %published.id, "restored the state of an event whose publish seemed to fail");
                        self.outstanding().insert(token.clone());
                        Some(Delivery {
                            event: published,
                            token,
                            delivery_count: count,
                        })
                    }
                    Err(_) => {
                        // Changed meanwhile (published again): look again on redelivery.
                        let _ = acker.ack_with(AckKind::Nak(None)).await;
                        None
                    }
                }
            }
            Ok(Lookup::Absent) => {
                // Deleted (or expired) meanwhile: nothing to do.
                let _ = acker.ack().await;
                None
            }
            Err(error) => {
                tracing::warn!(event_id = %published.id, %error, "cannot read event state; redelivering");
                let _ = acker
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
                None
            }
        }
    }

    fn acker(&self, delivery: &Delivery) -> Acker {
        Acker::new(
            self.shared.context.clone(),
            Some(async_nats::Subject::from(delivery.token.clone())),
        )
    }

    /// Sends `kind` for a delivery and forgets it.
    async fn settle(
        &self,
        delivery: &Delivery,
        kind: AckKind,
        confirm: bool,
    ) -> Result<(), ProviderError> {
        self.outstanding().remove(&delivery.token);
        let acker = self.acker(delivery);
        let sent = if confirm {
            acker.double_ack_with(kind).await
        } else {
            acker.ack_with(kind).await
        };
        sent.map_err(|e| {
            backend(format!(
                "cannot acknowledge event {}: {e}; it will be redelivered",
                delivery.event.id
            ))
        })
    }

    /// Gives every unsettled delivery back at once (close and drop).
    fn hand_back(&self) {
        if !self.counted.swap(false, Ordering::AcqRel) {
            return;
        }
        self.closed.cancel();
        self.shared.counters.consumers_closed();
        let tokens: Vec<String> = self.outstanding().drain().collect();
        if tokens.is_empty() {
            return;
        }
        let context = self.shared.context.clone();
        let give_back = async move {
            for token in tokens {
                let acker = Acker::new(context.clone(), Some(async_nats::Subject::from(token)));
                let _ = acker.ack_with(AckKind::Nak(None)).await;
            }
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(give_back);
        }
    }
}

/// Reads an abandoned long poll to its end and gives back whatever it still delivers.
async fn drain_abandoned(mut batch: async_nats::jetstream::consumer::pull::Batch) {
    while let Some(message) = batch.next().await {
        if let Ok(message) = message {
            let _ = message.ack_with(AckKind::Nak(None)).await;
        }
    }
}

#[async_trait]
impl Consumer for NatsConsumer {
    async fn fetch(&self, max: usize) -> Result<Vec<Delivery>, ProviderError> {
        let max = max.max(1);
        loop {
            if self.closed.is_cancelled() {
                return Ok(Vec::new());
            }
            let mut messages = self.pull_now(max).await?;
            if messages.is_empty() {
                let mut batch = self
                    .consumer
                    .batch()
                    .max_messages(1)
                    .expires(LONG_POLL)
                    .messages()
                    .await
                    .map_err(|e| {
                        backend(format!("pull from group {:?} failed: {e}", self.group))
                    })?;
                let first = tokio::select! {
                    first = batch.next() => first,
                    _ = self.closed.cancelled() => {
                        tokio::spawn(drain_abandoned(batch));
                        return Ok(Vec::new());
                    }
                };
                match first {
                    None => continue,
                    Some(Err(e)) => return Err(backend(format!("pull failed: {e}"))),
                    Some(Ok(message)) => messages.push(message),
                }
                if max > 1 {
                    // Topping up is optional: keep the message already taken if it fails.
                    match self.pull_now(max - 1).await {
                        Ok(more) => messages.extend(more),
                        Err(error) => tracing::debug!(%error, "could not top up a batch"),
                    }
                }
            }
            let deliveries = self.admit(messages).await;
            if self.closed.is_cancelled() {
                for delivery in &deliveries {
                    let _ = self.settle(delivery, AckKind::Nak(None), false).await;
                }
                return Ok(Vec::new());
            }
            if !deliveries.is_empty() {
                self.shared
                    .counters
                    .consumed
                    .fetch_add(deliveries.len() as u64, Ordering::Relaxed);
                return Ok(deliveries);
            }
        }
    }

    async fn complete(
        &self,
        delivery: &Delivery,
        update: &StatusUpdate,
    ) -> Result<(), ProviderError> {
        let written = self
            .shared
            .store
            .modify(&delivery.event.id, |record| {
                record.change(&self.group, |state| state.apply(update));
                Ok(())
            })
            .await;
        if let Err(error) = written {
            if matches!(error, ProviderError::NotFound(_)) {
                // Deleted while it ran: nothing left to record, stop redelivering it.
                self.settle(delivery, AckKind::Term, false).await?;
            }
            return Err(error);
        }
        let kind = if update.status == EventStatus::Failed {
            AckKind::Term
        } else {
            AckKind::Ack
        };
        self.settle(delivery, kind, true).await?;
        self.shared
            .counters
            .acknowledged
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn retry(
        &self,
        delivery: &Delivery,
        update: &StatusUpdate,
        delay: Duration,
    ) -> Result<(), ProviderError> {
        self.shared
            .store
            .modify(&delivery.event.id, |record| {
                record.change(&self.group, |state| state.apply(update));
                Ok(())
            })
            .await?;
        let delay = (!delay.is_zero()).then_some(delay);
        self.settle(delivery, AckKind::Nak(delay), false).await?;
        self.shared
            .counters
            .redelivered
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn release(&self, delivery: &Delivery) -> Result<(), ProviderError> {
        self.shared
            .store
            .modify(&delivery.event.id, |record| {
                record.change(&self.group, |state| state.release());
                Ok(())
            })
            .await?;
        self.settle(delivery, AckKind::Nak(None), false).await?;
        self.shared
            .counters
            .redelivered
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn keep_alive(&self, delivery: &Delivery) -> Result<(), ProviderError> {
        self.acker(delivery)
            .ack_with(AckKind::Progress)
            .await
            .map_err(|e| {
                backend(format!(
                    "cannot extend the lease of event {}: {e}",
                    delivery.event.id
                ))
            })
    }

    async fn close(&self) {
        self.hand_back();
    }
}

impl Drop for NatsConsumer {
    fn drop(&mut self) {
        self.hand_back();
    }
}
