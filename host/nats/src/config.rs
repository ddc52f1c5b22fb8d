//! The `event_broker.nats` section: the one place for its keys, defaults and validation.

use std::path::PathBuf;
use std::time::Duration;

use eventbroker::config::{InvalidValue, require_positive};
use serde::{Deserialize, Serialize};

/// Storage of the NATS JetStream stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NatsStorage {
    /// On disk (the default).
    #[default]
    File,
    /// In memory.
    Memory,
}

/// The NATS JetStream provider.
///
/// Events go to a JetStream stream on subjects `{prefix}.{source}.{type}` (the prefix is the
/// first entry of `subjects` without its trailing `.>`); their current state lives in a
/// key-value bucket keyed by event id; every consumer group is a durable pull consumer.
/// See `docs/providers/nats.md`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL, or several separated by commas (`nats://`, `tls://`). Default
    /// `nats://localhost:4222`.
    pub url: String,
    /// JetStream stream name. Default `RESOLVESPEC_EVENTS`.
    pub stream_name: String,
    /// Subjects the stream captures; the first must have the form `prefix.>` and events are
    /// published under that prefix. Default `["events.>"]`.
    pub subjects: Vec<String>,
    /// `file` (durable, the default) or `memory` (lost when the server restarts); applies to
    /// the stream and the key-value bucket.
    pub storage: NatsStorage,
    /// Events (stream messages and their state) older than this are discarded, finished or
    /// not. Default 24h.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Publishes with an event id seen within this window are dropped by the server and
    /// reported as duplicates. Default 2m; at most `max_age`.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// Key-value bucket holding each event's current state. Default: `{stream_name}_STATE`.
    pub kv_bucket: Option<String>,
    /// User name (with `password`). Default none.
    pub user: Option<String>,
    /// Password (with `user`). Default none.
    pub password: Option<String>,
    /// Authentication token. Default none.
    pub token: Option<String>,
    /// NATS credentials file (JWT + NKey seed, `.creds`). Default none.
    pub creds_file: Option<PathBuf>,
    /// TLS settings.
    pub tls: NatsTlsConfig,
    /// How long the server waits for an acknowledgement before redelivering; running
    /// invocations extend it with in-progress acknowledgements. Default: the broker's `lease`.
    #[serde(default, with = "humantime_serde::option")]
    pub ack_wait: Option<Duration>,
    /// Most deliveries of one event to one consumer group (counting retries and
    /// redeliveries after a crash); when reached the event is recorded as `failed` (a dead
    /// letter). Default: unlimited (the broker's `retry_policy` bounds handler retries).
    pub max_deliver: Option<u32>,
    /// Redelivery delays after an acknowledgement timeout, one per delivery (the last one
    /// repeats); when set, the first entry replaces `ack_wait`. Default empty (redeliver after
    /// `ack_wait`).
    #[serde(with = "duration_list")]
    pub backoff: Vec<Duration>,
    /// Events buffered per live watcher (SSE/WebSocket) before it is cut off as too slow.
    /// Default 1024.
    pub watcher_buffer: usize,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://localhost:4222".into(),
            stream_name: "RESOLVESPEC_EVENTS".into(),
            subjects: vec!["events.>".into()],
            storage: NatsStorage::File,
            max_age: Duration::from_secs(24 * 3600),
            duplicate_window: Duration::from_secs(120),
            kv_bucket: None,
            user: None,
            password: None,
            token: None,
            creds_file: None,
            tls: NatsTlsConfig::default(),
            ack_wait: None,
            max_deliver: None,
            backoff: Vec::new(),
            watcher_buffer: 1024,
        }
    }
}

impl NatsConfig {
    /// The key-value bucket in effect: `kv_bucket`, or `{stream_name}_STATE`.
    pub fn kv_bucket(&self) -> String {
        self.kv_bucket
            .clone()
            .unwrap_or_else(|| format!("{}_STATE", self.stream_name))
    }

    /// The key-value bucket of the cluster's handler records (see
    /// [`crate::handler_store`]): `{stream_name}_HANDLER_RECORDS`.
    pub fn handler_records_bucket(&self) -> String {
        format!("{}_HANDLER_RECORDS", self.stream_name)
    }

    /// The object store bucket of the cluster's handler components (see
    /// [`crate::handler_store`]): `{stream_name}_HANDLER_COMPONENTS`.
    pub fn handler_components_bucket(&self) -> String {
        format!("{}_HANDLER_COMPONENTS", self.stream_name)
    }

    /// The key-value bucket of the hosts' handler reports (see [`crate::handler_store`]):
    /// `{stream_name}_HANDLER_REPORTS`.
    pub fn handler_reports_bucket(&self) -> String {
        format!("{}_HANDLER_REPORTS", self.stream_name)
    }

    /// The key-value bucket of handlers' key-value state (see [`crate::keyvalue`]):
    /// `{stream_name}_HANDLER_KV`.
    pub fn keyvalue_bucket(&self) -> String {
        format!("{}_HANDLER_KV", self.stream_name)
    }

    /// Checks every acknowledgement deadline the server applies against the broker's lease
    /// renewal period (`renewal`, see [`eventbroker::BrokerConfig::lease_renewal_period`]): `ack_wait`, and
    /// each `backoff` entry (the first replaces `ack_wait`, the others are the deadlines of later
    /// deliveries) must be at least two renewal periods, so that a running handler's
    /// in-progress acknowledgements always reach the server before its deadline and the event
    /// is not redelivered while it runs.
    ///
    /// # Errors
    /// [`InvalidValue`] naming the key at fault, with a reason that names
    /// `event_broker.lease` and the bound.
    pub fn check_deadlines(&self, renewal: Duration) -> Result<(), InvalidValue> {
        let least = renewal * 2;
        let explain = |what: String, value: Duration| {
            format!(
                "{what}is {value:?}, shorter than twice the lease renewal period \
                 (event_broker.lease / 3 = {renewal:?}): the server would redeliver the event \
                 while its handler still runs. Set it to at least {least:?}, or lower \
                 event_broker.lease to at most {:?}",
                value * 3 / 2
            )
        };
        if let Some(ack_wait) = self.ack_wait
            && ack_wait < least
        {
            return Err(InvalidValue::new(
                "event_broker.nats.ack_wait",
                explain("".into(), ack_wait),
            ));
        }
        for (n, delay) in self.backoff.iter().enumerate() {
            if *delay < least {
                return Err(InvalidValue::new(
                    "event_broker.nats.backoff",
                    explain(format!("entry {n} "), *delay),
                ));
            }
        }
        Ok(())
    }
}

/// TLS for the NATS connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct NatsTlsConfig {
    /// Require TLS even when the URL scheme is `nats://` (a `tls://` URL always requires it).
    /// Default false.
    pub required: bool,
    /// PEM file of root certificates to trust in addition to the system's. Default none.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for servers that verify clients (with `key_file`).
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
}

/// A list of durations in humantime form (`["1s", "5s", "30s"]`).
mod duration_list {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(list: &[Duration], serializer: S) -> Result<S::Ok, S::Error> {
        list.iter()
            .map(|d| humantime_serde::Serde::from(*d))
            .collect::<Vec<_>>()
            .serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<Duration>, D::Error> {
        let list = Vec::<humantime_serde::Serde<Duration>>::deserialize(deserializer)?;
        Ok(list.into_iter().map(|d| d.into_inner()).collect())
    }
}

impl NatsConfig {
    /// Checks every rule serde cannot express, with keys under `event_broker.nats.`, and the
    /// rules that tie this section to the broker's (`broker`): acknowledgement deadlines
    /// against the lease renewal period, `max_deliver` against the retry budget.
    ///
    /// # Errors
    /// [`InvalidValue`] naming the first key out of range.
    pub fn validate(&self, broker: &eventbroker::BrokerConfig) -> Result<(), InvalidValue> {
        if self.url.trim().is_empty() {
            return Err(InvalidValue::new(
                "event_broker.nats.url",
                "must not be empty",
            ));
        }
        // First: the deadline rule is the one a lease change most often breaks.
        self.check_deadlines(broker.lease_renewal_period())?;
        let plain = |value: &str| {
            !value.is_empty()
                && value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
        };
        if !plain(&self.stream_name) {
            return Err(InvalidValue::new(
                "event_broker.nats.stream_name",
                format!(
                    "{:?} may only contain letters, digits, '_' and '-'",
                    self.stream_name
                ),
            ));
        }
        let bucket = self.kv_bucket();
        if !plain(&bucket) {
            return Err(InvalidValue::new(
                "event_broker.nats.kv_bucket",
                format!("{bucket:?} may only contain letters, digits, '_' and '-'"),
            ));
        }
        if [
            self.handler_records_bucket(),
            self.handler_components_bucket(),
            self.handler_reports_bucket(),
            self.keyvalue_bucket(),
        ]
        .contains(&bucket)
        {
            return Err(InvalidValue::new(
                "event_broker.nats.kv_bucket",
                format!("{bucket:?} is the name of a handler store or key-value state bucket"),
            ));
        }
        require_positive([(
            "event_broker.nats.watcher_buffer",
            self.watcher_buffer as u64,
        )])?;
        if !self.max_age.is_zero() && self.duplicate_window > self.max_age {
            return Err(InvalidValue::new(
                "event_broker.nats.duplicate_window",
                "must not exceed event_broker.nats.max_age",
            ));
        }
        if self.user.is_some() != self.password.is_some() {
            return Err(InvalidValue::new(
                "event_broker.nats.user",
                "and event_broker.nats.password must be set together",
            ));
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return Err(InvalidValue::new(
                "event_broker.nats.tls.cert_file",
                "and event_broker.nats.tls.key_file must be set together",
            ));
        }
        if let Some(max_deliver) = self.max_deliver {
            let least = broker.retry_policy.max_retries.saturating_add(1);
            if max_deliver < least {
                return Err(InvalidValue::new(
                    "event_broker.nats.max_deliver",
                    format!(
                        "({max_deliver}) must be at least event_broker.retry_policy.max_retries + 1 \
                         ({least}; leave it unset for unlimited): the server would stop \
                         delivering an event before its retries are spent"
                    ),
                ));
            }
        }
        if !self.backoff.is_empty()
            && self
                .max_deliver
                .is_none_or(|max| max as usize <= self.backoff.len())
        {
            // The server refuses such a consumer when the first host joins the group.
            return Err(InvalidValue::new(
                "event_broker.nats.backoff",
                "needs event_broker.nats.max_deliver set, and greater than the number of \
                 backoff entries",
            ));
        }
        Ok(())
    }
}
