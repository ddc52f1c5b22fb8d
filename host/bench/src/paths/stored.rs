//! How reading events costs as the store grows: `get` by id and `list` (newest first, one page
//! of 100) with N events stored, on every backend.

use std::sync::Arc;
use std::time::{Duration, Instant};

use eventbroker::provider::{EventFilter, Provider};
use eventbroker::{BrokerConfig, MemoryProvider};
use eventbroker_nats::{NatsConfig, NatsProvider};
use eventbroker_redis::{RedisConfig, RedisProvider};
use eventbroker_sql::{SqlConfig, SqlProvider};
use futures::StreamExt;

use crate::harness::{broker_config, event, percentile};
use crate::paths::{nats, redis, sql};

/// Concurrent publishers while filling the store.
const FILLERS: usize = 32;
/// `get` calls measured per size.
const GETS: usize = 200;
/// `list` calls measured per size.
const LISTS: usize = 20;

/// The backends the stored-events table covers.
pub const BACKENDS: [&str; 5] = ["memory", "sqlite", "postgres", "redis", "nats"];

/// One line of the stored-events table.
#[derive(Debug, Clone)]
pub struct Reads {
    /// Backend name.
    pub backend: String,
    /// Events stored.
    pub stored: u64,
    /// Events stored per second while filling (`publish` from 32 tasks).
    pub fill_rate: f64,
    /// `get` by id: p50 and p99.
    pub get: (Duration, Duration),
    /// `list`, newest 100: p50 and p99.
    pub list: (Duration, Duration),
}

struct Opened {
    provider: Arc<dyn Provider>,
    nats: Option<Arc<NatsProvider>>,
    postgres_table: Option<String>,
    redis_stream: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

async fn open(backend: &str, config: &BrokerConfig) -> Result<Opened, String> {
    let unique = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let mut opened = Opened {
        provider: Arc::new(MemoryProvider::new(config)),
        nats: None,
        postgres_table: None,
        redis_stream: None,
        _dir: None,
    };
    match backend {
        "memory" => {}
        "sqlite" => {
            let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
            let database = SqlConfig {
                url: format!("sqlite://{}", dir.path().join("stored.db").display()),
                ..SqlConfig::default()
            };
            opened.provider = Arc::new(
                SqlProvider::connect(&database, config)
                    .await
                    .map_err(|e| e.to_string())?,
            );
            opened._dir = Some(dir);
        }
        "postgres" => {
            let table = format!("bench_stored_{unique}");
            let database = SqlConfig {
                url: sql::postgres_url(),
                table_name: table.clone(),
                ..SqlConfig::default()
            };
            opened.provider = Arc::new(
                SqlProvider::connect(&database, config)
                    .await
                    .map_err(|e| e.to_string())?,
            );
            opened.postgres_table = Some(table);
        }
        "redis" => {
            let stream = format!("eb-bench-stored:{unique}");
            let settings = RedisConfig {
                url: Some(format!("redis://{}/0", redis::addr())),
                stream_name: stream.clone(),
                max_len: 10_000_000,
                ..RedisConfig::default()
            };
            opened.provider = Arc::new(
                RedisProvider::connect(&settings, config)
                    .await
                    .map_err(|e| e.to_string())?,
            );
            opened.redis_stream = Some(stream);
        }
        "nats" => {
            let settings = NatsConfig {
                url: nats::url(),
                stream_name: format!("BENCHSTORED{unique}"),
                subjects: vec![format!("benchstored{unique}.>")],
                ..NatsConfig::default()
            };
            let provider = Arc::new(
                NatsProvider::connect(&settings, config)
                    .await
                    .map_err(|e| e.to_string())?,
            );
            opened.nats = Some(provider.clone());
            opened.provider = provider;
        }
        other => return Err(format!("unknown backend {other}")),
    }
    Ok(opened)
}

async fn close(opened: Opened) {
    opened.provider.close().await;
    if let Some(provider) = opened.nats {
        let _ = provider.destroy().await;
    }
    if let Some(table) = opened.postgres_table {
        sql::drop_tables(&sql::postgres_url(), &table).await;
    }
    if let Some(stream) = opened.redis_stream {
        redis::delete_keys(&stream).await;
    }
}

/// Fills `backend` with each size in `sizes` in turn (growing one store) and measures reads at
/// each; a backend that cannot be opened returns why.
pub async fn run(backend: &str, sizes: &[u64]) -> Result<Vec<Reads>, String> {
    let mut config = broker_config();
    // Nothing consumes: every stored event stays unfinished, so both memory bounds must
    // hold them all.
    let largest = sizes.iter().copied().max().unwrap_or(0) as usize + 1;
    config.memory.max_events = largest;
    config.buffer_size = largest;
    let opened = open(backend, &config).await?;
    let provider = opened.provider.clone();
    let mut ids: Vec<String> = Vec::new();
    let mut results = Vec::new();
    for &size in sizes {
        let wanted = size.saturating_sub(ids.len() as u64);
        let start = ids.len() as u64;
        let started = Instant::now();
        let added: Vec<String> = futures::stream::iter(start..start + wanted)
            .map(|i| {
                let provider = provider.clone();
                async move {
                    let event = event(i);
                    provider.publish(&event).await.map(|()| event.id)
                }
            })
            .buffer_unordered(FILLERS)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        let fill_rate = wanted as f64 / started.elapsed().as_secs_f64().max(1e-9);
        ids.extend(added);
        let mut gets = Vec::with_capacity(GETS);
        for k in 0..GETS {
            let id = &ids[(k * 7919) % ids.len()];
            let started = Instant::now();
            let found = provider.get(id).await.map_err(|e| e.to_string())?;
            gets.push(started.elapsed());
            assert!(found.is_some(), "stored event {id} found");
        }
        let mut lists = Vec::with_capacity(LISTS);
        for _ in 0..LISTS {
            let filter = EventFilter {
                limit: Some(100),
                ..EventFilter::default()
            };
            let started = Instant::now();
            let page = provider.list(&filter).await.map_err(|e| e.to_string())?;
            lists.push(started.elapsed());
            assert_eq!(page.len(), 100.min(ids.len()), "a full page");
        }
        gets.sort();
        lists.sort();
        results.push(Reads {
            backend: backend.to_owned(),
            stored: ids.len() as u64,
            fill_rate,
            get: (percentile(&gets, 0.5), percentile(&gets, 0.99)),
            list: (percentile(&lists, 0.5), percentile(&lists, 0.99)),
        });
    }
    close(opened).await;
    Ok(results)
}
