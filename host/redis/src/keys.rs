//! Key names of the Redis provider. Every key starts with the configured stream name, so one
//! Redis database can hold several independent brokers (or test namespaces).

use eventbroker::event::{EventSource, EventStatus};

/// The key layout for one stream name.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    /// The stream itself (`{p}`); also the prefix of every other key.
    pub stream: String,
    /// Dead-letter stream (`{p}:dead`).
    pub dead: String,
    /// Sorted set of every stored event id by creation time (`{p}:idx:all`).
    pub all: String,
    /// Sorted set of finished event ids by completion time (`{p}:idx:finished`).
    pub finished: String,
    /// Set of instance ids that have an index (`{p}:instances`).
    pub instances: String,
    /// The current safe trimming bound (`{p}:trim`).
    pub trim: String,
    /// Pub/sub channel of watchers (`{p}:watch`).
    pub watch: String,
    /// Set of the consumer groups whose state indexes writes maintain (`{p}:groups`).
    pub groups: String,
    /// Set of the groups whose state index covers every stored event (`{p}:groups:indexed`).
    pub groups_indexed: String,
    /// Hash of the handler store's records, handler name → record JSON (`{p}:handlers`).
    pub handler_records: String,
    /// Hash of the handler store's record revisions, handler name → revision
    /// (`{p}:handler-revisions`).
    pub handler_revisions: String,
    /// Counter every record write takes its revision from (`{p}:handler-revision`).
    pub handler_revision: String,
    /// Set of the host names that wrote a handler report (`{p}:handler-hosts`).
    pub handler_hosts: String,
    /// Pub/sub channel of handler record changes (`{p}:handlers-changed`).
    pub handlers_changed: String,
    /// Hash of the key-value namespaces' byte usage, namespace id → bytes (`{p}:kv-usage`).
    pub kv_usage: String,
}

impl Keys {
    pub(crate) fn new(stream: &str) -> Self {
        Keys {
            stream: stream.to_owned(),
            dead: format!("{stream}:dead"),
            all: format!("{stream}:idx:all"),
            finished: format!("{stream}:idx:finished"),
            instances: format!("{stream}:instances"),
            trim: format!("{stream}:trim"),
            watch: format!("{stream}:watch"),
            groups: format!("{stream}:groups"),
            groups_indexed: format!("{stream}:groups:indexed"),
            handler_records: format!("{stream}:handlers"),
            handler_revisions: format!("{stream}:handler-revisions"),
            handler_revision: format!("{stream}:handler-revision"),
            handler_hosts: format!("{stream}:handler-hosts"),
            handlers_changed: format!("{stream}:handlers-changed"),
            kv_usage: format!("{stream}:kv-usage"),
        }
    }

    /// The hash of one event (`{p}:ev:{id}`).
    pub(crate) fn event(&self, id: &str) -> String {
        format!("{}:ev:{id}", self.stream)
    }

    /// Index of events in one status, as written before group states existed (kept only to
    /// be cleaned up).
    pub(crate) fn by_status(&self, status: EventStatus) -> String {
        format!("{}:idx:status:{}", self.stream, status.as_str())
    }

    /// Index of the events one consumer group sees in one status (`{p}:gs:{group}:{status}`).
    pub(crate) fn group_status(&self, group: &str, status: EventStatus) -> String {
        format!("{}:gs:{group}:{}", self.stream, status.as_str())
    }

    /// Index of events from one source.
    pub(crate) fn by_source(&self, source: EventSource) -> String {
        format!("{}:idx:source:{}", self.stream, source.as_str())
    }

    /// A handler component's bytes (`{p}:handler-component:{version}`).
    pub(crate) fn handler_component(&self, version: &str) -> String {
        format!("{}:handler-component:{version}", self.stream)
    }

    /// A host's handler report, expiring unless renewed (`{p}:handler-report:{host}`).
    pub(crate) fn handler_report(&self, host: &str) -> String {
        format!("{}:handler-report:{host}", self.stream)
    }

    /// The hash of one key-value namespace, key → value (`{p}:kv:{namespace id}`).
    pub(crate) fn kv(&self, namespace: &str) -> String {
        format!("{}:kv:{namespace}", self.stream)
    }

    /// Index of events accepted by one host instance.
    pub(crate) fn by_instance(&self, instance: &str) -> String {
        format!("{}:idx:instance:{instance}", self.stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_the_stream_prefix() {
        let keys = Keys::new("s");
        assert_eq!(keys.event("e1"), "s:ev:e1");
        assert_eq!(keys.by_status(EventStatus::Failed), "s:idx:status:failed");
        assert_eq!(keys.by_source(EventSource::System), "s:idx:source:system");
        assert_eq!(keys.by_instance("h1"), "s:idx:instance:h1");
        assert_eq!(keys.dead, "s:dead");
        assert_eq!(
            keys.group_status("g", EventStatus::Pending),
            "s:gs:g:pending"
        );
        assert_eq!(keys.handler_component("v1"), "s:handler-component:v1");
        assert_eq!(keys.handler_report("h1"), "s:handler-report:h1");
        assert_eq!(keys.handlers_changed, "s:handlers-changed");
        assert_eq!(keys.kv("g/h/b"), "s:kv:g/h/b");
        assert_eq!(keys.kv_usage, "s:kv-usage");
    }
}
