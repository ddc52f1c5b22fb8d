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
//!   state store (so retries see the group's handler outcomes of earlier attempts), and the
//!   delivery claims the event in its group (compare-and-set, see [`super::record`]): only the
//!   owning delivery may record an outcome or acknowledge. The claim also numbers the delivery
//!   (its `delivery_count`): the record counts the deliveries of the run, as the server's
//!   delivered count can restart at 1 for a redelivery (see [`super::record`]). A re-run meant
//!   for another group (header [`GROUP_HEADER`]), a message that does not carry the group's
//!   current run (an older run, a copy), a first delivery (by that number) of an event the group
//!   already finished, and any delivery of a deleted event, are acknowledged and skipped.
//! - A live owner is never replaced: a delivery of an event whose claim in the group belongs to
//!   another delivery and has not expired (a copy the server handed out while the first
//!   delivery still runs, see [`NatsConsumer::claim`]) is given back with a delayed `-NAK` for
//!   when that claim would expire, without running. So after a crash the event runs again
//!   once both the server's `ack_wait` and the claim's lease have passed.
//! - A message whose event has no state yet (its publish stopped after storing the message)
//!   gets its state written from the message; a re-run message made from the group's state as
//!   it still is (the re-run stopped after storing the message) switches the group to it.
//! - `complete` writes the final state and settles the claim, then acknowledges (`+ACK`,
//!   confirmed by the server) or, for `failed`, terminates (`+TERM`); `retry` writes the state
//!   and sends a delayed `-NAK`; `release` writes `pending` and sends `-NAK`; each refuses,
//!   without writing or acknowledging anything, when the delivery no longer owns the event.
//!   `keep_alive` extends the claim (so `requeue` sees the owner alive) and sends `+WPI` (in
//!   progress), which restarts the server's `ack_wait` timer; a delivery that no longer owns
//!   the event gets the lease-lost error and sends nothing.
//! - `close` (and dropping the consumer) gives every delivery it still owns back: its claim is
//!   settled and the state released, then it gets a `-NAK`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::message::{AckKind, Acker};
use async_trait::async_trait;
use chrono::Utc;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::record::{Claim, Record};
use super::store::{Lookup, Versioned};
use super::subjects::{Rerun, rerun_of};
use super::{NAME, Shared};
use eventbroker::event::{Event, EventStatus};
use eventbroker::provider::{Consumer, Delivery, GroupState, ProviderError, StatusUpdate};

/// How long one long-poll pull request waits on the server.
const LONG_POLL: Duration = Duration::from_secs(5);
/// How often claiming a delivered event is retried when its state changes meanwhile.
const CLAIM_ATTEMPTS: usize = 16;
/// The header carrying a message's id (the event id, or the re-run's id).
const MESSAGE_ID: &str = "Nats-Msg-Id";
/// Header of a message meant for one consumer group only (a re-run of that group's).
pub(crate) const GROUP_HEADER: &str = "Eventbroker-Group";
/// The shortest wait before a copy of a running delivery is offered again.
const LEAST_DEFERRAL: Duration = Duration::from_millis(100);

fn backend(error: impl std::fmt::Display) -> ProviderError {
    ProviderError::backend(NAME, error)
}

/// A member of one consumer group.
pub(crate) struct NatsConsumer {
    shared: Arc<Shared>,
    consumer: PullConsumer,
    group: String,
    /// The durable consumer's name (the encoded group name).
    durable: String,
    /// How long a claim stays alive without a renewal (the lease the group was joined with).
    lease: chrono::Duration,
    closed: CancellationToken,
    counted: AtomicBool,
    /// Deliveries handed out and not yet settled, by acknowledgement subject.
    outstanding: Arc<Mutex<HashMap<String, Outstanding>>>,
}

/// A delivery handed out and not yet settled.
struct Outstanding {
    /// Its event.
    id: String,
    /// The record as this consumer last wrote it, with its revision: the next write tries a
    /// compare-and-set from it without reading the record first (and reads it when the
    /// record changed meanwhile).
    known: Option<Versioned>,
}

/// What a delivered message means for this group ([`NatsConsumer::claim`]).
enum Admission {
    /// The delivery owns the event now: the record as written by the claim.
    Claimed(Box<Versioned>),
    /// Nothing to do: the message is acknowledged and skipped.
    Skip,
    /// Another delivery owns the event and is alive: the message is given back to be offered
    /// again after this long (when that claim would expire), without running it.
    Defer(Duration),
}

/// What a delivered message says about itself.
struct Arrival {
    /// The event as published (or as re-run).
    published: Event,
    /// The acknowledgement subject: the delivery's token.
    token: String,
    /// Stream sequence of the message.
    seq: u64,
    /// Deliveries of this message to this group, this one included.
    delivered: u32,
    /// For a re-run message, the group state it re-runs.
    rerun: Option<Rerun>,
}

impl NatsConsumer {
    pub(crate) fn new(
        shared: Arc<Shared>,
        consumer: PullConsumer,
        group: String,
        durable: String,
        lease: Duration,
    ) -> Self {
        let closed = shared.shutdown.child_token();
        NatsConsumer {
            shared,
            consumer,
            group,
            durable,
            lease: chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX),
            closed,
            counted: AtomicBool::new(true),
            outstanding: Arc::default(),
        }
    }

    fn outstanding(&self) -> std::sync::MutexGuard<'_, HashMap<String, Outstanding>> {
        self.outstanding.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The record last written for `delivery`, taken out for its next write.
    fn take_known(&self, delivery: &Delivery) -> Option<Versioned> {
        self.outstanding()
            .get_mut(&delivery.token)
            .and_then(|held| held.known.take())
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
        // `split` moves the acknowledgement subject into the acker: take it first.
        let token = message.reply.as_ref()?.to_string();
        let (seq, delivered) = match message.info() {
            Ok(info) => (info.stream_sequence, info.delivered),
            Err(error) => {
                tracing::warn!(subject = %message.subject, %error, "terminating a message without delivery information");
                let _ = message.ack_with(AckKind::Term).await;
                return None;
            }
        };
        let header = |name: &str| {
            message
                .headers
                .as_ref()
                .and_then(|headers| headers.get(name))
                .map(|value| value.as_str().to_owned())
        };
        let message_id = header(MESSAGE_ID);
        let for_group = header(GROUP_HEADER);
        let (message, acker) = message.split();
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
        let rerun = message_id.and_then(|id| rerun_of(&id, &published.id));
        if rerun
            .as_ref()
            .is_some_and(|rerun| rerun.group != self.durable)
        {
            // Another group's re-run, without the header.
            let _ = acker.ack().await;
            return None;
        }
        let arrival = Arrival {
            published,
            token,
            seq,
            delivered: u32::try_from(delivered.max(1)).unwrap_or(u32::MAX),
            rerun,
        };
        match self.claim(&arrival).await {
            Ok(Admission::Claimed(claimed)) => {
                let event = claimed.record.view(&self.group);
                let delivery_count = claimed.record.deliveries(&self.group);
                // Unfinished events are `processing` since the claim ([`Self::owned`]).
                let processing_recorded = !event.status.is_finished();
                self.outstanding().insert(
                    arrival.token.clone(),
                    Outstanding {
                        id: event.id.clone(),
                        known: Some(*claimed),
                    },
                );
                Some(Delivery {
                    event,
                    token: arrival.token,
                    delivery_count,
                    processing_recorded,
                })
            }
            Ok(Admission::Skip) => {
                let _ = acker.ack().await;
                None
            }
            Ok(Admission::Defer(wait)) => {
                tracing::debug!(event_id = %arrival.published.id, token = %arrival.token, ?wait, "another delivery of this event is running; offering this one again later");
                let _ = acker.ack_with(AckKind::Nak(Some(wait))).await;
                None
            }
            Err(error) => {
                tracing::warn!(event_id = %arrival.published.id, %error, "cannot claim event; redelivering");
                let _ = acker
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                    .await;
                None
            }
        }
    }

    /// Decides what a delivered message means for its event in this group and, when the event
    /// is to be processed, makes this delivery its owner in the group (a compare-and-set,
    /// repeated when the state changes meanwhile). Returns the record as claimed (the event as
    /// the group sees it, with the delivery's number, [`Record::next_delivery`]); or that there
    /// is nothing to do (the message is then acknowledged and skipped); or, when another
    /// delivery owns the event and its claim is alive, how long until that claim would expire:
    /// a live owner is never replaced. The server hands out such a delivery when it redelivers
    /// ahead of the owner's lease, and nats-server before nats-io/nats-server#5305 hands out a
    /// copy of a message still in flight as a first delivery (it rewinds the consumer when a
    /// redelivery finds no pull request able to take it): replacing the owner would run the
    /// event twice. An owner that died stops renewing, and its claim expires within a lease.
    async fn claim(&self, arrival: &Arrival) -> Result<Admission, ProviderError> {
        let store = &self.shared.store;
        let id = &arrival.published.id;
        let group = &self.group;
        for _ in 0..CLAIM_ATTEMPTS {
            let (record, written) = match store.lookup(id).await? {
                Lookup::Missing | Lookup::TakenBack { .. } if arrival.rerun.is_some() => {
                    // A re-run of an event whose record is gone (expired): nothing to re-run.
                    return Ok(Admission::Skip);
                }
                Lookup::Missing => {
                    // Its publish stopped after storing the message: the event was accepted.
                    let record = self.owned(
                        Record::new(arrival.published.clone(), Some(arrival.seq)),
                        arrival,
                    );
                    let written = store.create(&record).await;
                    (record, written)
                }
                Lookup::Deleted => return Ok(Admission::Skip),
                Lookup::TakenBack { revision } => {
                    // An earlier version took the state of a publish back that the server had
                    // stored after all: the event was accepted. Restore its state.
                    let record = self.owned(
                        Record::new(arrival.published.clone(), Some(arrival.seq)),
                        arrival,
                    );
                    let written = store.replace(&record, revision).await;
                    (record, written)
                }
                Lookup::Live(current) => {
                    let Versioned {
                        mut record,
                        revision,
                    } = *current;
                    let switch = arrival
                        .rerun
                        .as_ref()
                        .is_some_and(|rerun| rerun.version == record.version(group));
                    if switch {
                        // A re-run made from the group's state as it still is, whose own switch
                        // did not happen: switch the group to it.
                        record.rerun(group, GroupState::of(&arrival.published), arrival.seq);
                    } else if !record.carried_by(group, arrival.seq)
                        || (record.next_delivery(group, arrival.delivered) <= 1
                            && record.state(group).is_finished())
                    {
                        return Ok(Admission::Skip);
                    } else if let Some(expires) =
                        record.claimed_by_another_until(group, &arrival.token, Utc::now())
                    {
                        return Ok(Admission::Defer(self.deferral(expires)));
                    } else {
                        record.changed = None;
                    }
                    let record = self.owned(record, arrival);
                    let written = store.replace(&record, revision).await;
                    (record, written)
                }
            };
            match written {
                Ok(revision) => {
                    return Ok(Admission::Claimed(Box::new(Versioned { record, revision })));
                }
                Err(error) => {
                    tracing::debug!(event_id = %id, %error, "event changed while being claimed; looking again")
                }
            }
        }
        Err(backend(format!(
            "event {id} changed {CLAIM_ATTEMPTS} times while being claimed"
        )))
    }

    /// How long a delivery waits for a live claim expiring at `expires`: until then (the
    /// owner's clock may run ahead of this host's: never more than a lease), and at least
    /// [`LEAST_DEFERRAL`].
    fn deferral(&self, expires: chrono::DateTime<Utc>) -> Duration {
        let lease = self.lease.to_std().unwrap_or(Duration::MAX);
        (expires - Utc::now())
            .to_std()
            .unwrap_or_default()
            .min(lease)
            .max(LEAST_DEFERRAL)
    }

    /// Until when a claim taken or renewed now stays alive.
    fn expiry(&self) -> chrono::DateTime<Utc> {
        Utc::now()
            .checked_add_signed(self.lease)
            .unwrap_or(chrono::DateTime::<Utc>::MAX_UTC)
    }

    /// `record`, owned by the delivery of `arrival` in this group, counted as its next
    /// delivery and, unless the group already finished the event, `processing` since now:
    /// the claim is the mark ([`Delivery::processing_recorded`]), one write instead of two.
    fn owned(&self, mut record: Record, arrival: &Arrival) -> Record {
        let number = record.next_delivery(&self.group, arrival.delivered);
        record.claim(
            &self.group,
            Claim {
                delivery: arrival.token.clone(),
                expires: self.expiry(),
            },
            number,
        );
        if !record.state(&self.group).is_finished() {
            record.change(&self.group, |state| state.claim(Utc::now()));
        }
        record
    }

    /// Writes the outcome of `delivery` with `change` and settles its claim.
    ///
    /// # Errors
    /// The lease-lost error (nothing written) when another delivery owns the event now;
    /// [`ProviderError::NotFound`] when it was deleted; backend failures.
    async fn record_outcome(
        &self,
        delivery: &Delivery,
        mut change: impl FnMut(&mut GroupState),
    ) -> Result<(), ProviderError> {
        let mut lost = false;
        let known = self.take_known(delivery);
        let written = self
            .shared
            .store
            .modify_from(&delivery.event.id, known, |record| {
                lost = !record.owned_by(&self.group, &delivery.token);
                record.settle(&self.group, &delivery.token)?;
                record.change(&self.group, &mut change);
                Ok(())
            })
            .await;
        if lost {
            // Another delivery owns it: this one must not acknowledge, even when closing.
            self.outstanding().remove(&delivery.token);
        }
        written.map(drop)
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

    /// Stops the consumer (once) and returns the work of giving back every delivery it handed
    /// out, has not settled and still owns: its claim is settled (the state goes back as in
    /// [`Consumer::release`]), so that the next delivery need not wait for the claim to expire,
    /// then it gets a `-NAK`. A delivery that was handed to someone else gets nothing: a `-NAK`
    /// would make the server redeliver the newer one while it runs.
    fn stop(&self) -> Option<impl Future<Output = ()> + Send + 'static> {
        if !self.counted.swap(false, Ordering::AcqRel) {
            return None;
        }
        self.closed.cancel();
        self.shared.counters.consumer_closed();
        let held: Vec<(String, String)> = self
            .outstanding()
            .drain()
            .map(|(token, held)| (token, held.id))
            .collect();
        if held.is_empty() {
            return None;
        }
        let context = self.shared.context.clone();
        let store = self.shared.store.clone();
        let group = self.group.clone();
        Some(async move {
            let give_back = held.into_iter().map(|(token, id)| {
                let (context, store, group) = (context.clone(), store.clone(), group.clone());
                async move {
                    let released = store
                        .modify(&id, |record| {
                            record.settle(&group, &token)?;
                            record.change(&group, GroupState::release);
                            Ok(())
                        })
                        .await;
                    if released.is_ok() {
                        let acker = Acker::new(context, Some(async_nats::Subject::from(token)));
                        let _ = acker.ack_with(AckKind::Nak(None)).await;
                    }
                }
            });
            futures::future::join_all(give_back).await;
        })
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
                // Claimed but not handed out: settle the claims too, so that another member
                // need not wait for them to expire.
                for delivery in &deliveries {
                    let _ = self.release(delivery).await;
                }
                return Ok(Vec::new());
            }
            if !deliveries.is_empty() {
                self.shared.counters.delivered(deliveries.len());
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
            .record_outcome(delivery, |state| state.apply(update))
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
        self.shared.counters.acknowledged();
        Ok(())
    }

    async fn retry(
        &self,
        delivery: &Delivery,
        update: &StatusUpdate,
        delay: Duration,
    ) -> Result<(), ProviderError> {
        self.record_outcome(delivery, |state| state.apply(update))
            .await?;
        let delay = (!delay.is_zero()).then_some(delay);
        self.settle(delivery, AckKind::Nak(delay), false).await?;
        self.shared.counters.redelivered();
        Ok(())
    }

    async fn release(&self, delivery: &Delivery) -> Result<(), ProviderError> {
        self.record_outcome(delivery, GroupState::release).await?;
        self.settle(delivery, AckKind::Nak(None), false).await?;
        self.shared.counters.redelivered();
        Ok(())
    }

    async fn keep_alive(&self, delivery: &Delivery) -> Result<(), ProviderError> {
        let expires = self.expiry();
        let mut lost = false;
        let known = self.take_known(delivery);
        let renewed = self
            .shared
            .store
            .modify_from(&delivery.event.id, known, |record| {
                lost = !record.owned_by(&self.group, &delivery.token);
                record.renew(&self.group, &delivery.token, expires)
            })
            .await;
        if let Ok(written) = &renewed
            && !lost
            && let Some(held) = self.outstanding().get_mut(&delivery.token)
        {
            held.known = Some(written.clone());
        }
        if lost {
            // Another delivery owns it (or it was re-run): extending this one on the server
            // would extend the newer delivery of the same message.
            self.outstanding().remove(&delivery.token);
            return renewed.map(drop);
        }
        self.acker(delivery)
            .ack_with(AckKind::Progress)
            .await
            .map_err(|e| {
                backend(format!(
                    "cannot extend the lease of event {}: {e}",
                    delivery.event.id
                ))
            })?;
        renewed.map(drop)
    }

    async fn close(&self) {
        if let Some(give_back) = self.stop() {
            give_back.await;
        }
    }
}

impl Drop for NatsConsumer {
    fn drop(&mut self) {
        if let Some(give_back) = self.stop()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(give_back);
        }
    }
}
