//! A backend under test: a way to open providers on one isolated namespace (a table, stream
//! or key prefix of its own), and what to delete when the test is done with it.
//!
//! Each backend crate builds its [`Backend`] in its own tests (it knows its config and has its
//! client for cleanup), then runs the shared cases on it with [`crate::conformance!`]. A
//! backend whose service is unreachable is `None` after a loud skip
//! ([`crate::services::available`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use eventbroker::config::BrokerConfig;
use eventbroker::provider::{MemoryProvider, Provider, ProviderError};

/// The own consumer group ([`Provider::group`]) of every backend's providers: the group whose
/// state `get`, `list` and `stats` show.
pub const OWN_GROUP: &str = "g";

/// What a provider opened by [`Backend::open`] must be like.
#[derive(Debug, Clone)]
pub struct Open {
    /// Its own consumer group (`event_broker.consumer_group`, and for Redis
    /// `redis.consumer_group`).
    pub group: String,
    /// Events buffered per watcher (the backend's `watcher_buffer`), if not the backend's
    /// default.
    pub watcher_buffer: Option<usize>,
}

impl Default for Open {
    fn default() -> Self {
        Open {
            group: OWN_GROUP.to_owned(),
            watcher_buffer: None,
        }
    }
}

type Opened = Pin<Box<dyn Future<Output = Result<Arc<dyn Provider>, ProviderError>> + Send>>;
type Opener = Box<dyn Fn(Open) -> Opened + Send + Sync>;

/// A backend under test: opens providers on one namespace, and deletes the namespace when
/// dropped (if given a cleanup).
pub struct Backend {
    /// Backend name, for messages.
    pub name: &'static str,
    opener: Opener,
    /// The memory provider's single instance (memory cannot be opened twice).
    single: Option<MemoryProvider>,
    cleanup: Option<Box<dyn FnOnce() + Send>>,
}

impl Backend {
    /// A backend whose providers `open` builds; each call must open a new instance (a new
    /// "host") on the same storage.
    pub fn new<F, Fut>(name: &'static str, open: F) -> Self
    where
        F: Fn(Open) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Arc<dyn Provider>, ProviderError>> + Send + 'static,
    {
        Backend {
            name,
            opener: Box::new(move |options| Box::pin(open(options))),
            single: None,
            cleanup: None,
        }
    }

    /// The memory backend: one provider instance shared by every `connect` (a memory
    /// provider cannot be reopened), and fresh ones for [`Backend::open`] with settings.
    pub fn memory(config: BrokerConfig) -> Self {
        let single = MemoryProvider::new(&config);
        let mut backend = Backend::new("memory", move |options: Open| {
            let mut config = config.clone();
            config.consumer_group = options.group;
            if let Some(buffer) = options.watcher_buffer {
                config.memory.watcher_buffer = buffer;
            }
            async move { Ok(Arc::new(MemoryProvider::new(&config)) as Arc<dyn Provider>) }
        });
        backend.single = Some(single);
        backend
    }

    /// Runs `cleanup` when the backend is dropped (on a thread of its own if it must block:
    /// `Drop` may run inside the test's runtime).
    pub fn with_cleanup(mut self, cleanup: impl FnOnce() + Send + 'static) -> Self {
        self.cleanup = Some(Box::new(cleanup));
        self
    }

    /// A provider on this backend's namespace in [`OWN_GROUP`]. Each call opens a new
    /// instance (a new "host") on the same storage, except for the memory backend, which has
    /// only one.
    pub async fn connect(&self) -> Arc<dyn Provider> {
        self.connect_in_group(OWN_GROUP).await
    }

    /// A provider on this backend's namespace whose own group is `group`: a host configured
    /// with that consumer group. The memory backend gives a handle on its single instance.
    pub async fn connect_in_group(&self, group: &str) -> Arc<dyn Provider> {
        if let Some(single) = &self.single {
            return Arc::new(single.in_group(group));
        }
        self.open(Open {
            group: group.to_owned(),
            watcher_buffer: None,
        })
        .await
    }

    /// A new provider instance on this backend's namespace, as `options` asks (for memory: a
    /// new, empty provider).
    pub async fn open(&self, options: Open) -> Arc<dyn Provider> {
        match (self.opener)(options).await {
            Ok(provider) => provider,
            Err(error) => panic!("{}: cannot open the provider: {error}", self.name),
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(cleanup) = self.cleanup.take() {
            let _ = std::thread::spawn(cleanup).join();
        }
    }
}

/// The base config of every backend: a host id, [`OWN_GROUP`] as the own consumer group,
/// and defaults.
pub fn base_config() -> BrokerConfig {
    BrokerConfig {
        instance_id: format!("test-{}", crate::unique_suffix()),
        consumer_group: OWN_GROUP.into(),
        ..BrokerConfig::default()
    }
}

/// The embedded memory provider (always available), with room for the suite's volumes.
pub fn memory() -> Backend {
    let mut config = base_config();
    config.memory.max_events = 100_000;
    config.buffer_size = 100_000;
    Backend::memory(config)
}
