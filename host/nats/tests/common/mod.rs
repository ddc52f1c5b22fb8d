//! The NATS backend under test: a stream, subject prefix and key-value bucket of its own on
//! the local server (JetStream), deleted when the test is done; skipped loudly when NATS is
//! unreachable.

#![allow(dead_code)]

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Duration;

use eventbroker::config::BrokerConfig;
use eventbroker_nats::{NatsConfig, NatsProvider, NatsStorage};
use eventbroker_testkit::backends::{Backend, Open, base_config};
use eventbroker_testkit::{services, unique_suffix};

/// Address of the NATS server (with JetStream).
pub const NATS_ADDR: &str = "127.0.0.1:4222";

/// Prefix of the streams and buckets NATS test backends create.
const NATS_TEST_PREFIX: &str = "EBTEST_";

/// A broker config with the NATS section it runs on (derefs to the broker's part).
#[derive(Debug, Clone)]
pub struct Setup {
    /// The broker's settings.
    pub broker: BrokerConfig,
    /// The `event_broker.nats` section.
    pub nats: NatsConfig,
}

impl Deref for Setup {
    type Target = BrokerConfig;
    fn deref(&self) -> &BrokerConfig {
        &self.broker
    }
}

impl DerefMut for Setup {
    fn deref_mut(&mut self) -> &mut BrokerConfig {
        &mut self.broker
    }
}

/// The NATS section of an isolated namespace named by `suffix`.
pub fn nats_section(suffix: &str) -> NatsConfig {
    NatsConfig {
        url: format!("nats://{NATS_ADDR}"),
        stream_name: format!("{NATS_TEST_PREFIX}{suffix}"),
        subjects: vec![format!("ebtest{suffix}.>")],
        storage: NatsStorage::File,
        max_age: Duration::from_secs(3600),
        ..NatsConfig::default()
    }
}

/// NATS JetStream on the local server, on a namespace of its own, for the conformance suite.
/// Leftovers of earlier runs older than an hour are deleted on first use; the namespace is
/// deleted when the backend is dropped.
pub async fn backend() -> Option<Backend> {
    if !services::available("NATS", NATS_ADDR) {
        return None;
    }
    sweep_nats_leftovers().await;
    let setup = Setup {
        broker: base_config(),
        nats: nats_section(&unique_suffix()),
    };
    let nats = setup.nats.clone();
    Some(
        Backend::new("nats", move |options: Open| {
            let mut setup = setup.clone();
            setup.broker.consumer_group = options.group;
            if let Some(buffer) = options.watcher_buffer {
                setup.nats.watcher_buffer = buffer;
            }
            async move {
                let provider = NatsProvider::connect(&setup.nats, &setup.broker).await?;
                Ok(Arc::new(provider) as Arc<dyn eventbroker::Provider>)
            }
        })
        .with_cleanup(move || delete_nats_namespace(&nats)),
    )
}

/// Deletes the streams and buckets of a NATS namespace, the handler store's and the key-value
/// state's included (blocking: on a runtime of its own).
pub fn delete_nats_namespace(nats: &NatsConfig) {
    let stream = nats.stream_name.clone();
    let dead_letters = format!("{stream}_DEAD_LETTERS");
    let bucket_stream = format!("KV_{}", nats.kv_bucket());
    let handler_streams = [
        format!("KV_{}", nats.handler_records_bucket()),
        format!("OBJ_{}", nats.handler_components_bucket()),
        format!("KV_{}", nats.handler_reports_bucket()),
        format!("KV_{}", nats.keyvalue_bucket()),
    ];
    let url = nats.url.clone();
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    runtime.block_on(async {
        let connect = async_nats::connect(url.as_str());
        let Ok(Ok(client)) = tokio::time::timeout(Duration::from_secs(5), connect).await else {
            return;
        };
        let js = async_nats::jetstream::new(client);
        for name in [stream, dead_letters, bucket_stream]
            .into_iter()
            .chain(handler_streams)
        {
            let _ = tokio::time::timeout(Duration::from_secs(5), js.delete_stream(&name)).await;
        }
    });
}

/// Deletes test streams and buckets (`EBTEST_*`) created more than an hour ago, once per
/// process: tests cannot always tear down what they created (a panicking test, a killed run).
async fn sweep_nats_leftovers() {
    static SWEPT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    SWEPT
        .get_or_init(|| async {
            use futures::StreamExt;
            let Ok(client) = async_nats::connect(NATS_ADDR).await else {
                return;
            };
            let js = async_nats::jetstream::new(client);
            let cutoff = chrono::Utc::now().timestamp() - 3600;
            let mut streams = js.streams();
            let mut stale = Vec::new();
            while let Some(Ok(info)) = streams.next().await {
                let name = &info.config.name;
                let ours = name.starts_with(NATS_TEST_PREFIX)
                    || name.starts_with(&format!("KV_{NATS_TEST_PREFIX}"))
                    || name.starts_with(&format!("OBJ_{NATS_TEST_PREFIX}"));
                if ours && info.created.unix_timestamp() < cutoff {
                    stale.push(name.clone());
                }
            }
            for name in stale {
                let _ = js.delete_stream(&name).await;
            }
        })
        .await;
}
