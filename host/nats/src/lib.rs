//! The NATS JetStream provider: durable, shared by every host connected to the same server
//! (or cluster), with consumer groups.
//!
//! Layout on the server (see `docs/providers/nats.md`):
//! - a stream (`stream_name`, created or updated at start) capturing `subjects`; each event is
//!   one message on `{prefix}.{source}.{type}` whose `Nats-Msg-Id` is the event id, so the
//!   server drops a repeated publish within `duplicate_window`;
//! - a key-value bucket (`kv_bucket`) with each event's [`record::Record`] (the event as
//!   published and the sequence of its message; per consumer group that touched it, the
//!   group's processing state, the sequence of the group's re-run and the delivery that owns
//!   it), keyed by event id, written only by compare-and-set; status changes never go to the
//!   event subjects; queries show the own group (`event_broker.consumer_group`);
//! - one durable pull consumer per consumer group ([`consumer`]);
//! - a stream keeping the server's `MAX_DELIVERIES` advisories until a host recorded them
//!   ([`advisory`]);
//! - ordered ephemeral consumers for live watchers ([`watch`]);
//! - the cluster handler store's buckets, created on first use ([`handler_store`]);
//! - the bucket of handlers' key-value state, created on first use ([`keyvalue`]).
//!
//! Events whose delivery is provably abandoned are found by [`sweep`].
//!
//! Publish stores the message first, awaiting the server's acknowledgement (a publish whose
//! acknowledgement timed out is retried with the same message id, which the server
//! deduplicates, so a retry cannot store the event twice), then creates the state with the
//! message's sequence (an atomic create, which detects duplicates). A state therefore never
//! exists without its message: a publish cut short after the message leaves a message whose
//! state the consumer that delivers it writes. Re-runs work the same way, one group at a time:
//! a re-run message carries the header [`consumer::GROUP_HEADER`] naming its group, and only
//! that group's state switches to it.
#![deny(missing_docs)]

mod advisory;
mod buckets;
pub mod config;
mod consumer;
pub mod handler_store;
pub mod keyvalue;
mod record;
mod scan;
mod store;
mod subjects;
mod sweep;
mod watch;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, consumer as js_consumer};
use async_nats::{ConnectOptions, ServerAddr};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use self::consumer::NatsConsumer;
use self::record::Record;
use self::store::{StateStore, encode};
use self::sweep::Evidence;
use eventbroker::config::BrokerConfig;
use eventbroker::provider::{
    Consumer, ConsumerOptions, Counters, EventFilter, EventStream, Provider, ProviderError,
    ProviderFeatures, ProviderStats, StatusUpdate,
};

pub use crate::config::{NatsConfig, NatsStorage, NatsTlsConfig};
pub use crate::handler_store::NatsHandlerStore;
pub use crate::keyvalue::NatsKeyValue;
use eventbroker::event::Event;
use eventbroker::handler_store::HandlerStore;
use eventbroker::keyvalue::KeyValueStore;
use eventbroker::pattern::Pattern;

pub(crate) const NAME: &str = "nats";

/// Publish attempts when the server's acknowledgement does not arrive.
const PUBLISH_ATTEMPTS: u32 = 3;

/// The NATS JetStream provider. Cheap to clone; clones share one connection.
#[derive(Clone)]
pub struct NatsProvider {
    shared: Arc<Shared>,
}

/// State shared by the provider, its consumers and watchers.
pub(crate) struct Shared {
    client: async_nats::Client,
    context: jetstream::Context,
    stream: stream::Stream,
    stream_name: String,
    bucket: String,
    prefix: String,
    /// The provider's own consumer group (`event_broker.consumer_group`).
    group: String,
    store: StateStore,
    durable: bool,
    ack_wait: Option<Duration>,
    /// Events buffered per watcher before it is cut off as lagging.
    watcher_buffer: usize,
    max_deliver: Option<u32>,
    backoff: Vec<Duration>,
    closed: AtomicBool,
    shutdown: CancellationToken,
    counters: Counters,
    consumers: Mutex<Vec<Weak<NatsConsumer>>>,
    /// The cluster handler store, on this connection.
    handlers: Arc<NatsHandlerStore>,
    /// Handlers' key-value state, on this connection.
    keyvalue: Arc<NatsKeyValue>,
}

/// What the server answered to a publish.
struct Sent {
    /// Stream sequence of the stored message (of the earlier one, for a duplicate).
    sequence: u64,
    /// The server reported the first attempt as a duplicate: a message with this id was
    /// stored within the duplicate window before this publish.
    duplicate: bool,
}

fn config_error(reason: impl Into<String>) -> ProviderError {
    ProviderError::Config {
        provider: NAME,
        reason: reason.into(),
    }
}

fn backend(error: impl std::fmt::Display) -> ProviderError {
    ProviderError::backend(NAME, error)
}

/// Checks the settings (see [`NatsConfig::validate`]); returns the subject prefix.
fn validate(nats: &NatsConfig, broker: &BrokerConfig) -> Result<String, ProviderError> {
    nats.validate(broker)
        .map_err(|e| ProviderError::invalid(NAME, e))?;
    subjects::prefix_of(&nats.subjects)
}

async fn connect_client(
    config: &NatsConfig,
    name: &str,
) -> Result<async_nats::Client, ProviderError> {
    let mut options = ConnectOptions::new().name(name);
    if let (Some(user), Some(password)) = (&config.user, &config.password) {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &config.token {
        options = options.token(token.clone());
    }
    if let Some(path) = &config.creds_file {
        options = options.credentials_file(path).await.map_err(|e| {
            config_error(format!(
                "cannot read nats.creds_file {}: {e}",
                path.display()
            ))
        })?;
    }
    if config.tls.required {
        options = options.require_tls(true);
    }
    if let Some(ca) = &config.tls.ca_file {
        options = options.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&config.tls.cert_file, &config.tls.key_file) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    let addresses = config
        .url
        .split(',')
        .map(|url| url.trim().parse::<ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            config_error(format!(
                "nats.url {:?} is not a valid server URL: {e}",
                config.url
            ))
        })?;
    options
        .connect(addresses)
        .await
        .map_err(|e| backend(format!("cannot connect to NATS at {}: {e}", config.url)))
}

impl NatsProvider {
    /// Connects, creates or updates the stream, the state bucket and the dead-letter
    /// advisory stream, and starts recording the events that exhausted `max_deliver`.
    ///
    /// # Errors
    /// [`ProviderError::Config`] for invalid settings; [`ProviderError::Backend`] when the
    /// server is unreachable or refuses the stream or bucket (e.g. a changed `storage`).
    ///
    /// `nats` is the `event_broker.nats` section; `config` gives the instance id, the
    /// consumer group and the lease its deadlines are checked against.
    pub async fn connect(nats: &NatsConfig, config: &BrokerConfig) -> Result<Self, ProviderError> {
        let prefix = validate(nats, config)?;
        let client = connect_client(nats, &config.instance_id).await?;
        let context = jetstream::new(client.clone());
        let storage = match nats.storage {
            NatsStorage::File => StorageType::File,
            NatsStorage::Memory => StorageType::Memory,
        };
        context
            .create_or_update_stream(stream::Config {
                name: nats.stream_name.clone(),
                description: Some("eventbroker events".into()),
                subjects: nats.subjects.clone(),
                storage,
                max_age: nats.max_age,
                duplicate_window: nats.duplicate_window,
                retention: RetentionPolicy::Limits,
                discard: DiscardPolicy::Old,
                ..stream::Config::default()
            })
            .await
            .map_err(|e| {
                backend(format!(
                    "cannot create or update stream {:?}: {e}",
                    nats.stream_name
                ))
            })?;
        let stream = context
            .get_stream(&nats.stream_name)
            .await
            .map_err(|e| backend(format!("cannot open stream {:?}: {e}", nats.stream_name)))?;
        let bucket = nats.kv_bucket();
        let store = StateStore::open(&context, &bucket, storage, nats.max_age).await?;
        let handlers = Arc::new(NatsHandlerStore::new(context.clone(), nats, storage));
        let keyvalue = Arc::new(NatsKeyValue::new(context.clone(), nats, storage));
        let shared = Arc::new(Shared {
            client,
            context,
            stream,
            stream_name: nats.stream_name.clone(),
            bucket,
            prefix,
            group: config.consumer_group.clone(),
            store,
            durable: nats.storage == NatsStorage::File,
            ack_wait: nats.ack_wait,
            watcher_buffer: nats.watcher_buffer,
            max_deliver: nats.max_deliver,
            backoff: nats.backoff.clone(),
            closed: AtomicBool::new(false),
            shutdown: CancellationToken::new(),
            counters: Counters::default(),
            consumers: Mutex::new(Vec::new()),
            handlers,
            keyvalue,
        });
        advisory::start(&shared, storage, nats.max_age).await?;
        sweep::start(&shared);
        Ok(NatsProvider { shared })
    }

    /// Records every event whose delivery is provably abandoned as `failed` (what every host
    /// also does once a minute); returns how many. An event is abandoned when it is not
    /// finished, yet no consumer group will deliver the message of its current run again:
    /// the message left the stream, or every group settled it (see `docs/providers/nats.md`).
    ///
    /// # Errors
    /// [`ProviderError::Closed`]; backend failures.
    pub async fn sweep_abandoned(&self) -> Result<usize, ProviderError> {
        self.shared.check_open()?;
        sweep::sweep(&self.shared).await
    }

    /// Deletes the streams, the state bucket, the handler store's buckets and the key-value
    /// state bucket with everything in them (tear-down of tests and experiments). The provider
    /// is closed first.
    ///
    /// # Errors
    /// Backend failures.
    pub async fn destroy(&self) -> Result<(), ProviderError> {
        self.close().await;
        let shared = &self.shared;
        shared
            .context
            .delete_stream(&shared.stream_name)
            .await
            .map_err(|e| {
                backend(format!(
                    "cannot delete stream {:?}: {e}",
                    shared.stream_name
                ))
            })?;
        advisory::destroy(shared).await?;
        shared.handlers.destroy().await.map_err(backend)?;
        shared.keyvalue.destroy().await.map_err(backend)?;
        StateStore::destroy(&shared.context, &shared.bucket).await
    }
}

impl Shared {
    fn check_open(&self) -> Result<(), ProviderError> {
        if self.closed.load(Ordering::Acquire) {
            Err(ProviderError::Closed)
        } else {
            Ok(())
        }
    }

    /// Publishes one message (for one group only when `for_group` is set) and awaits the
    /// server's acknowledgement, retrying with the same message id when it does not arrive.
    async fn send(
        &self,
        subject: String,
        payload: Bytes,
        message_id: &str,
        for_group: Option<&str>,
    ) -> Result<Sent, ProviderError> {
        let mut last_error = String::new();
        for attempt in 0..PUBLISH_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            }
            let mut publish = PublishMessage::build()
                .payload(payload.clone())
                .message_id(message_id);
            if let Some(group) = for_group {
                publish = publish.header(consumer::GROUP_HEADER, group);
            }
            let ack = match self.context.send_publish(subject.clone(), publish).await {
                Ok(pending) => pending.await,
                Err(error) => Err(error),
            };
            match ack {
                // A duplicate on a retry means an earlier attempt was stored.
                Ok(ack) => {
                    return Ok(Sent {
                        sequence: ack.sequence,
                        duplicate: ack.duplicate && attempt == 0,
                    });
                }
                Err(error)
                    if matches!(
                        error.kind(),
                        PublishErrorKind::MaxPayloadExceeded
                            | PublishErrorKind::WrongLastMessageId
                            | PublishErrorKind::WrongLastSequence
                    ) =>
                {
                    return Err(backend(format!("publish to {subject} refused: {error}")));
                }
                Err(error) => {
                    tracing::debug!(%subject, attempt, %error, "publish not acknowledged");
                    last_error = error.to_string();
                }
            }
        }
        Err(backend(format!(
            "publish to {subject} not acknowledged after {PUBLISH_ATTEMPTS} attempts: {last_error}"
        )))
    }

    /// Creates the state of an event whose message was stored at `seq`. A state already
    /// written for that message (by a consumer that delivered it first) is fine.
    ///
    /// # Errors
    /// [`ProviderError::Duplicate`] when another event with this id is stored: the message
    /// just stored does not carry that event's run, so consumers skip it.
    async fn record_published(&self, event: &Event, seq: u64) -> Result<(), ProviderError> {
        match self
            .store
            .create(&Record::new(event.clone(), Some(seq)))
            .await
        {
            Ok(_) => Ok(()),
            Err(ProviderError::Duplicate(id)) => match self.store.get(&id).await? {
                Some(current) if current.record.seq == Some(seq) => Ok(()),
                _ => Err(ProviderError::Duplicate(id)),
            },
            Err(error) => Err(error),
        }
    }

    /// Checks that the own group may re-run the event whose record is `record`: the group
    /// finished it, or nothing processes it in the group — no delivery owns it (none was handed
    /// out, or the owner stopped renewing its claim for a whole lease) or the server proves its
    /// delivery abandoned ([`sweep`]). Events stored without a message (sync mode) are re-run
    /// only once finished.
    ///
    /// # Errors
    /// [`ProviderError::InvalidState`] otherwise; backend failures.
    async fn check_rerunnable(&self, id: &str, record: &Record) -> Result<(), ProviderError> {
        let group = &self.group;
        let state = record.state(group);
        if state.is_finished()
            || (record.run(group).is_some() && !record.held(group, chrono::Utc::now()))
            || Evidence::gather(self).await?.abandoned(record, group)
        {
            return Ok(());
        }
        Err(ProviderError::InvalidState {
            id: id.to_owned(),
            status: state.status,
            reason: "only finished events, and events nothing processes in the group (no live \
                     delivery owns them, or their delivery is provably abandoned), can be re-run",
        })
    }

    fn live_consumers(&self) -> Vec<Arc<NatsConsumer>> {
        let mut consumers = self.consumers.lock().unwrap_or_else(|p| p.into_inner());
        consumers.retain(|weak| weak.strong_count() > 0);
        consumers.iter().filter_map(Weak::upgrade).collect()
    }
}

#[async_trait]
impl Provider for NatsProvider {
    fn name(&self) -> &'static str {
        NAME
    }

    fn group(&self) -> &str {
        &self.shared.group
    }

    fn features(&self) -> ProviderFeatures {
        ProviderFeatures {
            durable: self.shared.durable,
            shared: true,
            consumer_groups: true,
            ordered: true,
        }
    }

    async fn publish(&self, event: &Event) -> Result<(), ProviderError> {
        let shared = &self.shared;
        shared.check_open()?;
        let subject = subjects::event_subject(&shared.prefix, event)?;
        let sent = shared
            .send(subject, encode(event)?, &event.id, None)
            .await?;
        if sent.duplicate {
            // Stored before within the window: by an earlier publish of this id (whose state
            // exists, or is written by the consumer that delivers its message).
            return Err(ProviderError::Duplicate(event.id.clone()));
        }
        shared.record_published(event, sent.sequence).await?;
        shared.counters.published();
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<Option<Event>, ProviderError> {
        self.shared.check_open()?;
        let group = &self.shared.group;
        Ok(self
            .shared
            .store
            .get(id)
            .await?
            .map(|v| v.record.view(group)))
    }

    async fn list(&self, filter: &EventFilter) -> Result<Vec<Event>, ProviderError> {
        self.shared.check_open()?;
        let group = &self.shared.group;
        let mut page = filter.page();
        self.shared
            .store
            .scan(|record| page.offer(record.view(group)))
            .await?;
        Ok(page.finish())
    }

    async fn update_status(&self, id: &str, update: &StatusUpdate) -> Result<(), ProviderError> {
        self.shared.check_open()?;
        let group = &self.shared.group;
        self.shared
            .store
            .modify(id, |record| {
                if !update.status.is_finished() && record.settled_final(group) {
                    return Err(ProviderError::InvalidState {
                        id: id.to_owned(),
                        status: record.state(group).status,
                        reason: "its delivery already recorded the final outcome; a late status \
                                 change from a worker that lost the delivery is refused",
                    });
                }
                record.change(group, |state| state.apply(update));
                Ok(())
            })
            .await
            .map(drop)
    }

    async fn delete(&self, id: &str) -> Result<bool, ProviderError> {
        self.shared.check_open()?;
        self.shared.store.delete(id).await
    }

    async fn requeue(&self, id: &str, update: &StatusUpdate) -> Result<(), ProviderError> {
        let shared = &self.shared;
        shared.check_open()?;
        let group = &shared.group;
        let current = shared
            .store
            .get(id)
            .await?
            .ok_or_else(|| ProviderError::NotFound(id.to_owned()))?;
        shared.check_rerunnable(id, &current.record).await?;
        let version = current.record.version(group);
        let mut state = current.record.state(group);
        state.apply(update);
        let next = state.view(&current.record.event);
        // The message first, for the own group only, named after the version of the group's
        // state it re-runs: a repeat of this re-run is dropped by the duplicate window, and a
        // re-run cut short after storing it is switched over by the group's consumer that
        // delivers it.
        let subject = subjects::event_subject(&shared.prefix, &next)?;
        let message_id = subjects::rerun_message_id(id, group, version);
        let sent = shared
            .send(subject, encode(&next)?, &message_id, Some(group))
            .await?;
        let mut switched = false;
        let written = shared
            .store
            .modify(id, |record| {
                if record.run(group) == Some(sent.sequence) {
                    // A consumer delivered the message first and switched the group over.
                    switched = true;
                    return Err(ProviderError::NotFound(id.to_owned()));
                }
                if record.version(group) != version {
                    return Err(ProviderError::InvalidState {
                        id: id.to_owned(),
                        status: record.state(group).status,
                        reason: "it changed while being re-run; the re-run was dropped",
                    });
                }
                record.rerun(group, state.clone(), sent.sequence);
                Ok(())
            })
            .await;
        match written {
            Ok(_) => Ok(()),
            Err(_) if switched => Ok(()),
            // When the server cannot be reached, the message is stored and the consumer that
            // delivers it switches the group over.
            Err(error) => Err(error),
        }
    }

    async fn consume(&self, options: ConsumerOptions) -> Result<Arc<dyn Consumer>, ProviderError> {
        let shared = &self.shared;
        shared.check_open()?;
        let durable = subjects::encode_name(&options.group);
        let config = js_consumer::pull::Config {
            durable_name: Some(durable.clone()),
            description: Some(format!("eventbroker consumer group {:?}", options.group)),
            ack_policy: js_consumer::AckPolicy::Explicit,
            ack_wait: shared.ack_wait.unwrap_or(options.lease),
            max_deliver: shared.max_deliver.map_or(-1, i64::from),
            backoff: shared.backoff.clone(),
            deliver_policy: js_consumer::DeliverPolicy::All,
            ..js_consumer::pull::Config::default()
        };
        let consumer: js_consumer::PullConsumer =
            shared.stream.create_consumer(config).await.map_err(|e| {
                backend(format!(
                    "cannot create or update consumer group {durable:?}: {e}"
                ))
            })?;
        tracing::debug!(group = %options.group, member = %options.name, "joined NATS consumer group");
        let consumer = Arc::new(NatsConsumer::new(
            shared.clone(),
            consumer,
            options.group,
            durable,
            options.lease,
        ));
        shared.counters.consumer_opened();
        shared
            .consumers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::downgrade(&consumer));
        Ok(consumer)
    }

    async fn stream(&self, pattern: &Pattern) -> Result<EventStream, ProviderError> {
        self.shared.check_open()?;
        watch::watch(&self.shared, pattern).await
    }

    async fn ping(&self) -> Result<(), ProviderError> {
        self.shared.check_open()?;
        self.shared
            .client
            .flush()
            .await
            .map_err(|error| ProviderError::backend(NAME, error))
    }

    async fn stats(&self) -> Result<ProviderStats, ProviderError> {
        let shared = &self.shared;
        shared.check_open()?;
        let mut stats = ProviderStats::empty(NAME);
        let mut stored = 0u64;
        shared
            .store
            .scan(|record| {
                stored += 1;
                *stats
                    .by_status
                    .entry(record.state(&shared.group).status.as_str().into())
                    .or_default() += 1;
            })
            .await?;
        let mut backend_stats = BTreeMap::new();
        backend_stats.insert("stored".to_owned(), stored.into());
        let info = shared
            .stream
            .get_info()
            .await
            .map_err(|e| backend(format!("cannot read stream info: {e}")))?;
        backend_stats.insert("stream.messages".to_owned(), info.state.messages.into());
        backend_stats.insert("stream.bytes".to_owned(), info.state.bytes.into());
        let mut consumers = shared.stream.consumers();
        while let Some(consumer) = consumers.next().await {
            let Ok(consumer) = consumer else { break };
            if consumer.config.durable_name.is_none() {
                continue;
            }
            let name = &consumer.name;
            backend_stats.insert(format!("group.{name}.backlog"), consumer.num_pending.into());
            backend_stats.insert(
                format!("group.{name}.leased"),
                consumer.num_ack_pending.into(),
            );
            backend_stats.insert(
                format!("group.{name}.redelivered"),
                consumer.num_redelivered.into(),
            );
        }
        stats.backend = backend_stats;
        self.shared.counters.fill(&mut stats);
        Ok(stats)
    }

    async fn close(&self) {
        let shared = &self.shared;
        if shared.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        shared.shutdown.cancel();
        for consumer in shared.live_consumers() {
            consumer.close().await;
        }
        if tokio::time::timeout(Duration::from_secs(5), shared.client.flush())
            .await
            .is_err()
        {
            tracing::warn!("NATS connection did not flush within 5s while closing");
        }
    }

    fn handler_store(&self) -> Option<Arc<dyn HandlerStore>> {
        Some(self.shared.handlers.clone())
    }

    /// Handlers' key-value state in the bucket `{stream_name}_HANDLER_KV` ([`NatsKeyValue`]).
    fn keyvalue(&self) -> Option<Arc<dyn KeyValueStore>> {
        Some(self.shared.keyvalue.clone())
    }
}
