//! The Redis Streams provider: durable (as the Redis server is configured), shared by every
//! host pointing at the same stream, with consumer groups. The design (keys, scripts,
//! trimming, recovery) is described in `docs/providers/redis.md`.
//!
//! - Publishing is one script: the event hash, its indexes and the stream entry are written
//!   together, and an existing id is rejected ([`ProviderError::Duplicate`]).
//! - Consumers use `XREADGROUP` (bounded `BLOCK`), take over idle entries with `XAUTOCLAIM`,
//!   and every outcome (status, acknowledgement, redelivery, dead letter) is one script.
//! - Each consumer group keeps its own state of each event (hash fields and status index per
//!   group); queries show the configured `redis.consumer_group`.
//! - Watchers get events from a pub/sub channel, independent of the consumer groups.
//! - Every command has a timeout; reconnection is automatic.
//! - The cluster handler store ([`RedisHandlerStore`], from [`Provider::handler_store`]) keeps
//!   handler components, records and host reports under the same prefix.
//! - Handlers' key-value state ([`RedisKeyValue`], from [`Provider::keyvalue`]) is one hash per
//!   namespace under the same prefix; every write is one Lua script, so quotas and increments
//!   are exact across hosts (counters are signed 64-bit).
#![deny(missing_docs)]

pub mod config;
mod consumer;
mod entries;
mod handler_store;
mod keys;
mod keyvalue;
mod maintenance;
mod scripts;
mod store;
mod watch;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{
    Client, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisConnectionInfo, RedisError,
};
use tokio_util::sync::CancellationToken;

use eventbroker::config::BrokerConfig;
use eventbroker::provider::{
    Consumer, ConsumerOptions, Counters, EventFilter, EventStream, Provider, ProviderError,
    ProviderFeatures, ProviderStats, SortOrder, StatusUpdate,
};

pub use crate::config::RedisConfig;
pub use crate::handler_store::RedisHandlerStore;
pub use crate::keyvalue::RedisKeyValue;
use eventbroker::event::{Event, EventSource, EventStatus};
use eventbroker::pattern::Pattern;

use keys::Keys;
use scripts::Scripts;
use store::{StoredState, score, to_json};

pub(crate) const NAME: &str = "redis";

/// Index entries examined per round trip by `list`.
const LIST_CHUNK: usize = 200;

/// What the provider runs with, resolved from its [`RedisConfig`] and the broker's config.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// Where to connect.
    pub connection: ConnectionInfo,
    /// Stream key and prefix of every other key.
    pub stream: String,
    /// The Redis consumer group of the broker's workers (created at start).
    pub group: String,
    /// The broker-level group name that is mapped to [`Settings::group`].
    pub broker_group: String,
    /// The broker's lease: with no `claim_idle`, how long a delivery may stay idle before
    /// it counts as abandoned (by `requeue`).
    pub lease: Duration,
    /// Approximate stream length bound (never trimming unfinished entries).
    pub max_len: u64,
    /// Longest `BLOCK` of a read.
    pub block_time: Duration,
    /// Most entries per read.
    pub batch_size: usize,
    /// Idle time after which another consumer claims an entry (`None`: the consumer's lease).
    pub claim_idle: Option<Duration>,
    /// How often a consumer looks for idle entries.
    pub claim_interval: Duration,
    /// Empty consumers idle this long are deleted.
    pub consumer_idle_timeout: Duration,
    /// How long finished events are kept.
    pub retention: Duration,
    /// Interval of trimming, retention cleanup and idle-consumer removal.
    pub maintenance_interval: Duration,
    /// Timeout of every command and of connecting.
    pub command_timeout: Duration,
    /// Events buffered per watcher before it is cut off as lagging.
    pub watcher_buffer: usize,
}

impl Settings {
    /// The settings of `redis` (the `event_broker.redis` section) under `config`.
    ///
    /// # Errors
    /// [`ProviderError::Config`] for a value out of range or an invalid URL.
    fn resolve(redis: &RedisConfig, config: &BrokerConfig) -> Result<Self, ProviderError> {
        redis
            .validate()
            .map_err(|e| ProviderError::invalid(NAME, e))?;
        let invalid = |reason: String| ProviderError::Config {
            provider: NAME,
            reason,
        };
        let connection = match redis.url.as_deref().filter(|url| !url.is_empty()) {
            Some(url) => url
                .into_connection_info()
                .map_err(|e| invalid(format!("url: {e}")))?,
            None => {
                let addr = if redis.tls {
                    ConnectionAddr::TcpTls {
                        host: redis.host.clone(),
                        port: redis.port,
                        insecure: false,
                        tls_params: None,
                    }
                } else {
                    ConnectionAddr::Tcp(redis.host.clone(), redis.port)
                };
                let mut settings = RedisConnectionInfo::default().set_db(redis.db);
                if !redis.password.is_empty() {
                    settings = settings.set_password(&redis.password);
                }
                addr.into_connection_info()
                    .map_err(|e| invalid(format!("address: {e}")))?
                    .set_redis_settings(settings)
            }
        };
        Ok(Settings {
            connection,
            stream: redis.stream_name.clone(),
            group: redis.consumer_group.clone(),
            broker_group: config.consumer_group.clone(),
            lease: config.lease,
            max_len: redis.max_len,
            block_time: redis.block_time,
            batch_size: redis.batch_size,
            claim_idle: redis.claim_idle,
            claim_interval: redis.claim_interval,
            consumer_idle_timeout: redis.consumer_idle_timeout,
            retention: redis.retention,
            maintenance_interval: redis.maintenance_interval,
            command_timeout: redis.command_timeout,
            watcher_buffer: redis.watcher_buffer,
        })
    }
}

/// The Redis Streams provider. Cheap to clone; clones share connections and state.
#[derive(Clone)]
pub struct RedisProvider {
    shared: Arc<Shared>,
}

/// State shared by the provider, its consumers, watchers and maintenance task.
pub(crate) struct Shared {
    options: Settings,
    client: Client,
    conn: ConnectionManager,
    keys: Keys,
    scripts: Scripts,
    closed: AtomicBool,
    shutdown: CancellationToken,
    counters: Counters,
    consumers: Mutex<Vec<Weak<consumer::ConsumerInner>>>,
}

/// A backend failure.
pub(crate) fn backend(error: RedisError) -> ProviderError {
    ProviderError::backend(NAME, error)
}

/// Maps the error replies of the scripts to provider errors about event `id`.
pub(crate) fn script_error(error: RedisError, id: &str) -> ProviderError {
    match error.code() {
        Some("DUPLICATE") => ProviderError::Duplicate(id.to_owned()),
        Some("NOTFOUND") => ProviderError::NotFound(id.to_owned()),
        Some("NOTLEASED") => ProviderError::backend(
            NAME,
            format!("delivery of event {id} is no longer leased (its lease expired)"),
        ),
        Some("INVALIDSTATE") => ProviderError::InvalidState {
            id: id.to_owned(),
            status: error
                .detail()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(EventStatus::Processing),
            reason: "a consumer of the group holds a live lease on it; retry it once it \
                     finished or its lease expired",
        },
        _ => backend(error),
    }
}

/// Milliseconds since the epoch now.
pub(crate) fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// One status transition for the outcome script.
pub(crate) struct Transition<'a> {
    pub id: &'a str,
    pub mode: &'static str,
    pub group: &'a str,
    pub consumer: &'a str,
    pub entry: &'a str,
    pub status: Option<EventStatus>,
    pub state: Option<String>,
    pub finished_at: Option<chrono::DateTime<Utc>>,
    pub due_ms: i64,
    pub count: u32,
    pub error: Option<&'a str>,
}

impl<'a> Transition<'a> {
    pub(crate) fn new(id: &'a str, mode: &'static str) -> Self {
        Transition {
            id,
            mode,
            group: "",
            consumer: "",
            entry: "",
            status: None,
            state: None,
            finished_at: None,
            due_ms: 0,
            count: 0,
            error: None,
        }
    }
}

impl Shared {
    pub(crate) fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    fn check_open(&self) -> Result<(), ProviderError> {
        if self.closed.load(Ordering::Acquire) {
            Err(ProviderError::Closed)
        } else {
            Ok(())
        }
    }

    /// Creates `group` from the beginning of the stream (creating the stream) unless it exists,
    /// and makes sure its state index (`{p}:gs:{group}:…`) covers every stored event.
    pub(crate) async fn ensure_group(&self, group: &str) -> Result<(), ProviderError> {
        let result: Result<(), RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.keys.stream)
            .arg(group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.conn())
            .await;
        match result {
            Ok(()) => {}
            Err(error) if error.code() == Some("BUSYGROUP") => {}
            Err(error) => return Err(backend(error)),
        }
        self.index_group(group).await
    }

    /// Adds `group` to the groups whose state index writes maintain, then indexes the events
    /// stored before (once per group; an interrupted pass is redone at the next start).
    async fn index_group(&self, group: &str) -> Result<(), ProviderError> {
        let mut conn = self.conn();
        let (_, indexed): (i64, bool) = redis::pipe()
            .cmd("SADD")
            .arg(&self.keys.groups)
            .arg(group)
            .cmd("SISMEMBER")
            .arg(&self.keys.groups_indexed)
            .arg(group)
            .query_async(&mut conn)
            .await
            .map_err(backend)?;
        if indexed {
            return Ok(());
        }
        let mut first = 0usize;
        loop {
            let indexed: usize = self
                .scripts
                .index_group
                .arg(&self.keys.stream)
                .arg(group)
                .arg(first)
                .arg(LIST_CHUNK)
                .invoke_async(&mut conn)
                .await
                .map_err(backend)?;
            first += indexed;
            if indexed < LIST_CHUNK {
                break;
            }
        }
        let _: i64 = redis::cmd("SADD")
            .arg(&self.keys.groups_indexed)
            .arg(group)
            .query_async(&mut conn)
            .await
            .map_err(backend)?;
        Ok(())
    }

    /// How long a delivery may stay idle before `requeue` counts it as abandoned.
    fn abandoned_after(&self) -> Duration {
        self.options.claim_idle.unwrap_or(self.options.lease)
    }

    /// Runs the outcome script; returns the resulting status (`None` if the event is gone).
    pub(crate) async fn transition(
        &self,
        t: Transition<'_>,
    ) -> Result<Option<EventStatus>, ProviderError> {
        let finished = t.finished_at.unwrap_or_else(Utc::now);
        let reply: Vec<String> = self
            .scripts
            .outcome
            .arg(&self.keys.stream)
            .arg(t.id)
            .arg(t.mode)
            .arg(t.group)
            .arg(t.consumer)
            .arg(t.entry)
            .arg(t.status.map(EventStatus::as_str).unwrap_or(""))
            .arg(t.state.as_deref().unwrap_or(""))
            .arg(score(finished))
            .arg(self.options.retention.as_secs().max(1))
            .arg(t.due_ms)
            .arg(t.count)
            .arg(t.error.unwrap_or(""))
            .arg(self.options.max_len)
            .arg(&self.keys.watch)
            .arg(now_ms())
            .arg(u64::try_from(self.abandoned_after().as_millis()).unwrap_or(u64::MAX))
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| script_error(e, t.id))?;
        Ok(match reply.as_slice() {
            [ok, status] if ok == "ok" => status.parse().ok(),
            _ => None,
        })
    }

    /// Deletes an event and its index entries (with `settled_only`, only if every group
    /// finished it); returns whether the hash existed and was deleted.
    pub(crate) async fn prune(&self, id: &str, settled_only: bool) -> Result<bool, ProviderError> {
        let mut invocation = self.scripts.prune.prepare_invoke();
        invocation
            .arg(&self.keys.stream)
            .arg(id)
            .arg(if settled_only { "1" } else { "0" })
            .arg(&self.keys.all)
            .arg(&self.keys.finished);
        for status in EventStatus::ALL {
            invocation.arg(self.keys.by_status(status));
        }
        for source in EventSource::ALL {
            invocation.arg(self.keys.by_source(source));
        }
        let existed: i64 = invocation
            .invoke_async(&mut self.conn())
            .await
            .map_err(backend)?;
        Ok(existed == 1)
    }

    /// Events by id (in the given order) as `group` sees them, `None` for ids whose hash is
    /// gone.
    pub(crate) async fn load(
        &self,
        ids: &[String],
        group: &str,
    ) -> Result<Vec<Option<Event>>, ProviderError> {
        self.load_stored(ids, group)
            .await?
            .into_iter()
            .map(|stored| stored.map(|stored| stored.decode()).transpose())
            .collect()
    }

    /// The stored fields of events as `group` sees them, undecoded (`None`: no such event).
    pub(crate) async fn load_stored(
        &self,
        ids: &[String],
        group: &str,
    ) -> Result<Vec<Option<store::Stored>>, ProviderError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("HMGET")
                .arg(self.keys.event(id))
                .arg("event")
                .arg("status")
                .arg("state")
                .arg(format!("status:{group}"))
                .arg(format!("state:{group}"));
        }
        type Row = (
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
        );
        let rows: Vec<Row> = pipe.query_async(&mut self.conn()).await.map_err(backend)?;
        Ok(rows
            .into_iter()
            .map(|(event, status, state, group_status, group_state)| {
                event.map(|event| store::Stored {
                    event,
                    status: group_status.or(status),
                    state: group_state.or(state),
                })
            })
            .collect())
    }

    async fn insert(&self, event: &Event, deliver: bool) -> Result<(), ProviderError> {
        self.check_open()?;
        let event_json = to_json(event)?;
        let state = to_json(&StoredState::of_event(event))?;
        let finished = if event.status.is_finished() {
            score(event.completed_at.unwrap_or_else(Utc::now)).to_string()
        } else {
            String::new()
        };
        let _: i64 = self
            .scripts
            .store
            .key(self.keys.event(&event.id))
            .key(&self.keys.stream)
            .key(&self.keys.all)
            .key(self.keys.by_source(event.source))
            .key(self.keys.by_instance(&event.instance_id))
            .key(&self.keys.instances)
            .key(&self.keys.finished)
            .key(&self.keys.trim)
            .arg(&event.id)
            .arg(event_json)
            .arg(event.status.as_str())
            .arg(state)
            .arg(score(event.created_at))
            .arg(if deliver { "1" } else { "0" })
            .arg(finished)
            .arg(&self.keys.watch)
            .arg(event.source.as_str())
            .arg(&event.instance_id)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| script_error(e, &event.id))?;
        Ok(())
    }

    /// The index `list` walks, and whether it alone decides membership (apart from the time
    /// range, which is checked exactly in the host).
    fn index_for(&self, filter: &EventFilter) -> (String, bool) {
        let others = filter.user_id.is_some()
            || filter.handler.is_some()
            || filter.caused_by.is_some()
            || filter.session_id.is_some()
            || filter.schema.is_some()
            || filter.entity.is_some()
            || filter.operation.is_some()
            || filter.type_pattern.is_some()
            || filter.created_after.is_some()
            || filter.created_before.is_some();
        let picked = [
            filter
                .status
                .map(|s| self.keys.group_status(&self.options.group, s)),
            filter.source.map(|s| self.keys.by_source(s)),
            filter
                .instance_id
                .as_deref()
                .map(|i| self.keys.by_instance(i)),
        ];
        let set = picked.iter().filter(|k| k.is_some()).count();
        match picked.into_iter().flatten().next() {
            Some(key) => (key, set == 1 && !others),
            None => (self.keys.all.clone(), !others),
        }
    }

    async fn list(&self, filter: &EventFilter) -> Result<Vec<Event>, ProviderError> {
        let limit = filter.effective_limit();
        if limit == 0 {
            return Ok(Vec::new());
        }
        let (key, exact) = self.index_for(filter);
        let min = filter
            .created_after
            .map_or("-inf".to_owned(), |t| score(t).to_string());
        let max = filter
            .created_before
            .map_or("+inf".to_owned(), |t| score(t).to_string());
        // With an exact index the offset is applied by Redis; otherwise in the host.
        let mut position = if exact { filter.offset } else { 0 };
        let mut skip = if exact { 0 } else { filter.offset };
        let mut out = Vec::new();
        loop {
            let chunk = if exact {
                (limit - out.len()).min(LIST_CHUNK)
            } else {
                LIST_CHUNK
            };
            let mut cmd = redis::cmd("ZRANGE");
            cmd.arg(&key);
            match filter.order {
                SortOrder::Asc => cmd.arg(&min).arg(&max).arg("BYSCORE"),
                SortOrder::Desc => cmd.arg(&max).arg(&min).arg("BYSCORE").arg("REV"),
            };
            cmd.arg("LIMIT").arg(position).arg(chunk);
            let ids: Vec<String> = cmd.query_async(&mut self.conn()).await.map_err(backend)?;
            position += ids.len();
            let events = self.load(&ids, &self.options.group).await?;
            for (id, event) in ids.iter().zip(events) {
                let Some(event) = event else {
                    // Expired or deleted without its index entries: tidy up.
                    self.prune(id, false).await?;
                    continue;
                };
                if !filter.matches(&event) {
                    continue;
                }
                if skip > 0 {
                    skip -= 1;
                    continue;
                }
                out.push(event);
                if out.len() >= limit {
                    return Ok(out);
                }
            }
            if ids.len() < chunk {
                return Ok(out);
            }
        }
    }
}

impl RedisProvider {
    /// Connects (failing after the command timeout if the server is unreachable), creates the
    /// stream and the configured consumer group, and starts the maintenance task (which stops
    /// when the provider is closed or dropped).
    ///
    /// `redis` is the `event_broker.redis` section; `broker` gives the lease and the broker's
    /// consumer group (mapped to `redis.consumer_group`).
    ///
    /// # Errors
    /// [`ProviderError::Config`] for a setting out of range (naming its key);
    /// [`ProviderError::Backend`] when the server is unreachable or refuses the commands.
    pub async fn connect(
        redis: &RedisConfig,
        broker: &BrokerConfig,
    ) -> Result<Self, ProviderError> {
        let options = Settings::resolve(redis, broker)?;
        let client = Client::open(options.connection.clone()).map_err(backend)?;
        let manager_config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(options.command_timeout))
            .set_connection_timeout(Some(options.command_timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        let conn = tokio::time::timeout(
            options.command_timeout * 3,
            ConnectionManager::new_with_config(client.clone(), manager_config),
        )
        .await
        .map_err(|_| ProviderError::backend(NAME, "timed out connecting to Redis"))?
        .map_err(backend)?;
        let shared = Arc::new(Shared {
            keys: Keys::new(&options.stream),
            scripts: Scripts::new(),
            client,
            conn,
            closed: AtomicBool::new(false),
            shutdown: CancellationToken::new(),
            counters: Counters::default(),
            consumers: Mutex::new(Vec::new()),
            options,
        });
        shared.ensure_group(&shared.options.group).await?;
        tokio::spawn(maintenance::run(Arc::downgrade(&shared)));
        Ok(RedisProvider { shared })
    }

    /// Runs one maintenance pass now (trimming, retention cleanup, idle consumers).
    ///
    /// # Errors
    /// Backend failures.
    pub async fn maintain(&self) -> Result<(), ProviderError> {
        maintenance::pass(&self.shared).await
    }

    /// The Redis consumer group a broker group name maps to.
    fn group_name<'a>(&'a self, group: &'a str) -> &'a str {
        if group == self.shared.options.broker_group {
            &self.shared.options.group
        } else {
            group
        }
    }
}

#[async_trait]
impl Provider for RedisProvider {
    fn name(&self) -> &'static str {
        NAME
    }

    fn group(&self) -> &str {
        &self.shared.options.group
    }

    fn features(&self) -> ProviderFeatures {
        ProviderFeatures {
            durable: true,
            shared: true,
            consumer_groups: true,
            ordered: true,
        }
    }

    async fn publish(&self, event: &Event) -> Result<(), ProviderError> {
        self.shared.insert(event, true).await?;
        self.shared.counters.published();
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<Option<Event>, ProviderError> {
        Ok(self
            .shared
            .load(&[id.to_owned()], &self.shared.options.group)
            .await?
            .into_iter()
            .next()
            .flatten())
    }

    async fn list(&self, filter: &EventFilter) -> Result<Vec<Event>, ProviderError> {
        self.shared.list(filter).await
    }

    async fn update_status(&self, id: &str, update: &StatusUpdate) -> Result<(), ProviderError> {
        self.shared.check_open()?;
        let mut t = Transition::new(id, "update");
        t.group = &self.shared.options.group;
        t.status = Some(update.status);
        t.state = Some(to_json(&StoredState::of_update(update))?);
        t.finished_at = update.completed_at;
        self.shared.transition(t).await.map(drop)
    }

    async fn delete(&self, id: &str) -> Result<bool, ProviderError> {
        self.shared.prune(id, false).await
    }

    async fn requeue(&self, id: &str, update: &StatusUpdate) -> Result<(), ProviderError> {
        self.shared.check_open()?;
        let mut t = Transition::new(id, "requeue");
        t.group = &self.shared.options.group;
        t.status = Some(update.status);
        t.state = Some(to_json(&StoredState::of_update(update))?);
        t.finished_at = update.completed_at;
        self.shared.transition(t).await.map(drop)
    }

    async fn consume(&self, options: ConsumerOptions) -> Result<Arc<dyn Consumer>, ProviderError> {
        self.shared.check_open()?;
        let group = self.group_name(&options.group).to_owned();
        self.shared.ensure_group(&group).await?;
        let consumer = consumer::RedisConsumer::new(self.shared.clone(), group, &options);
        Ok(Arc::new(consumer))
    }

    async fn stream(&self, pattern: &Pattern) -> Result<EventStream, ProviderError> {
        self.shared.check_open()?;
        watch::open(self.shared.clone(), pattern.clone()).await
    }

    async fn ping(&self) -> Result<(), ProviderError> {
        self.shared.check_open()?;
        let _: String = redis::cmd("PING")
            .query_async(&mut self.shared.conn())
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn stats(&self) -> Result<ProviderStats, ProviderError> {
        let mut stats = ProviderStats::empty(NAME);
        let keys = &self.shared.keys;
        let mut pipe = redis::pipe();
        for status in EventStatus::ALL {
            pipe.cmd("ZCARD")
                .arg(keys.group_status(&self.shared.options.group, status));
        }
        pipe.cmd("XLEN").arg(&keys.stream);
        pipe.cmd("XLEN").arg(&keys.dead);
        let counts: Vec<u64> = pipe
            .query_async(&mut self.shared.conn())
            .await
            .map_err(backend)?;
        for (status, count) in EventStatus::ALL.iter().zip(&counts) {
            stats.by_status.insert(status.as_str().into(), *count);
        }
        let at = |i: usize| counts.get(i).copied().unwrap_or(0);
        let n = EventStatus::ALL.len();
        stats.backend.insert("stream_length".into(), at(n).into());
        stats
            .backend
            .insert("dead_letters".into(), at(n + 1).into());
        stats
            .backend
            .insert("stream".into(), keys.stream.clone().into());
        let groups: redis::Value = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&keys.stream)
            .query_async(&mut self.shared.conn())
            .await
            .unwrap_or(redis::Value::Nil);
        for (name, field, value) in entries::group_info(&groups) {
            stats
                .backend
                .insert(format!("group.{name}.{field}"), value.into());
        }
        self.shared.counters.fill(&mut stats);
        Ok(stats)
    }

    async fn close(&self) {
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.shared.shutdown.cancel();
        let consumers: Vec<_> = {
            let mut list = self
                .shared
                .consumers
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            list.drain(..).filter_map(|c| c.upgrade()).collect()
        };
        for consumer in consumers {
            consumer.close().await;
        }
    }

    /// The cluster handler store on this provider's connections and `stream_name` prefix
    /// ([`RedisHandlerStore`]).
    fn handler_store(&self) -> Option<Arc<dyn eventbroker::HandlerStore>> {
        Some(Arc::new(RedisHandlerStore::new(self.shared.clone())))
    }

    /// Handlers' key-value state on this provider's connections and `stream_name` prefix
    /// ([`RedisKeyValue`]).
    fn keyvalue(&self) -> Option<Arc<dyn eventbroker::keyvalue::KeyValueStore>> {
        Some(Arc::new(RedisKeyValue::new(self.shared.clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_come_from_the_redis_section() {
        let broker = BrokerConfig {
            consumer_group: "workers".into(),
            ..BrokerConfig::default()
        };
        let redis = RedisConfig {
            url: Some("rediss://:secret@cache.internal:6380/2".into()),
            claim_idle: Some(Duration::from_secs(30)),
            block_time: Duration::from_millis(250),
            stream_name: "app:events".into(),
            ..RedisConfig::default()
        };
        let options = Settings::resolve(&redis, &broker).expect("settings");
        assert!(matches!(
            options.connection.addr(),
            ConnectionAddr::TcpTls { host, port: 6380, .. } if host == "cache.internal"
        ));
        assert_eq!(options.connection.redis_settings().db(), 2);
        assert_eq!(
            options.connection.redis_settings().password(),
            Some("secret")
        );
        assert_eq!(options.stream, "app:events");
        assert_eq!(options.group, "resolvespec-workers");
        assert_eq!(options.broker_group, "workers");
        assert_eq!(options.claim_idle, Some(Duration::from_secs(30)));
    }

    #[test]
    fn host_form_and_bad_settings_name_the_key() {
        let broker = BrokerConfig::default();
        let mut redis = RedisConfig {
            tls: true,
            password: "pw".into(),
            db: 3,
            ..RedisConfig::default()
        };
        let options = Settings::resolve(&redis, &broker).expect("settings");
        assert!(matches!(
            options.connection.addr(),
            ConnectionAddr::TcpTls { port: 6379, .. }
        ));
        assert_eq!(options.connection.redis_settings().db(), 3);
        redis.url = Some("http://nope".into());
        assert!(matches!(
            Settings::resolve(&redis, &broker),
            Err(ProviderError::Config { .. })
        ));
        redis.url = None;
        redis.stream_name = " ".into();
        let error = Settings::resolve(&redis, &broker).expect_err("an error");
        assert!(
            error.to_string().contains("event_broker.redis.stream_name"),
            "{error}"
        );
        redis.stream_name = "s".into();
        redis.command_timeout = Duration::from_millis(1);
        let error = Settings::resolve(&redis, &broker).expect_err("an error");
        assert!(
            error
                .to_string()
                .contains("event_broker.redis.command_timeout"),
            "{error}"
        );
    }
}
