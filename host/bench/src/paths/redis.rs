//! The Redis Streams provider with the trivial native handler, against the bare Redis loop it
//! is built on: `XADD` by publishers, `XREADGROUP COUNT n BLOCK` + `XACK` by one consumer, the
//! same batch size, on the same server. `REDIS_ADDR` overrides `127.0.0.1:6379`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use eventbroker::Broker;
use eventbroker_redis::{RedisConfig, RedisProvider};
use redis::aio::MultiplexedConnection;

use crate::harness::{self, Counter, Publishers, broker_config, event, subscribe_trivial};
use crate::paths::{Outcome, skipped};
use crate::{CpuRow, Row};

/// The server's process name, for the CPU figures.
const SERVER: &str = "redis-server";

pub(crate) fn addr() -> String {
    std::env::var("REDIS_ADDR").unwrap_or_else(|_| "127.0.0.1:6379".into())
}

async fn connection() -> MultiplexedConnection {
    redis::Client::open(format!("redis://{}/0", addr()))
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("Redis must be running for this benchmark")
}

pub(crate) async fn delete_keys(prefix: &str) {
    let mut conn = connection().await;
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    keys.push(prefix.to_owned());
    for chunk in keys.chunks(1000) {
        let _: Result<i64, _> = redis::cmd("DEL").arg(chunk).query_async(&mut conn).await;
    }
}

/// Bare loop: publishers `XADD` the event JSON; one consumer reads batches and acknowledges.
async fn baseline(events: u64, batch: usize) -> Duration {
    let stream = format!("eb-bench:{}", uuid::Uuid::new_v4().simple());
    let mut conn = connection().await;
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("g")
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await
        .expect("create group");
    let counter = Counter::new(events);
    let consumer = {
        let counter = counter.clone();
        let stream = stream.clone();
        tokio::spawn(async move {
            let mut conn = connection().await;
            while !counter.finished() {
                let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg("g")
                    .arg("c")
                    .arg("COUNT")
                    .arg(batch)
                    .arg("BLOCK")
                    .arg(1000)
                    .arg("STREAMS")
                    .arg(&stream)
                    .arg(">")
                    .query_async(&mut conn)
                    .await
                    .unwrap_or_default();
                let mut ids = Vec::new();
                for key in reply.keys {
                    for entry in key.ids {
                        if let Some(redis::Value::BulkString(payload)) = entry.map.get("event") {
                            counter.handle(payload);
                        }
                        ids.push(entry.id);
                    }
                }
                if !ids.is_empty() {
                    let _: i64 = redis::cmd("XACK")
                        .arg(&stream)
                        .arg("g")
                        .arg(&ids)
                        .query_async(&mut conn)
                        .await
                        .expect("ack");
                }
            }
        })
    };
    // One multiplexed connection shared by the publishers, as the provider shares one.
    let (publishing, key) = (connection().await, stream.clone());
    let started = Instant::now();
    Publishers::spawn(events, move |i| {
        let (mut conn, key) = (publishing.clone(), key.clone());
        async move {
            let json = serde_json::to_string(&event(i)).expect("json");
            let _: String = redis::cmd("XADD")
                .arg(&key)
                .arg("*")
                .arg("event")
                .arg(json)
                .query_async(&mut conn)
                .await
                .expect("xadd");
        }
    })
    .join()
    .await;
    counter.wait().await;
    let elapsed = started.elapsed();
    consumer.await.expect("consumer");
    delete_keys(&stream).await;
    elapsed
}

async fn measure(events: u64, batch: usize) -> (harness::Measured, harness::Latency) {
    let config = broker_config();
    let redis = RedisConfig {
        url: Some(format!("redis://{}/0", addr())),
        stream_name: format!("eb-bench:{}", uuid::Uuid::new_v4().simple()),
        batch_size: batch,
        ..RedisConfig::default()
    };
    let provider: Arc<dyn eventbroker::Provider> = Arc::new(
        RedisProvider::connect(&redis, &config)
            .await
            .expect("Redis provider"),
    );
    let broker = Broker::new(config, provider.clone());
    subscribe_trivial(&broker, "trivial");
    broker.start().await.expect("start");
    let measured = harness::broker_run(&broker, events, Some(SERVER)).await;
    broker.stop().await.expect("stop");
    provider.close().await;
    delete_keys(&redis.stream_name).await;
    measured
}

/// The `redis` row, or a skip when Redis is not reachable.
pub async fn run(events: u64) -> Outcome {
    let reachable = redis::Client::open(format!("redis://{}/0", addr()))
        .map(|client| async move { client.get_multiplexed_async_connection().await.is_ok() });
    let reachable = match reachable {
        Ok(check) => check.await,
        Err(_) => false,
    };
    if !reachable {
        return Err(skipped(
            "redis",
            format!("Redis not reachable at {}", addr()),
        ));
    }
    let batch = RedisConfig::default().batch_size;
    baseline(events / 10, batch).await;
    let bare = harness::median_rate_cpu(Some(SERVER), events, || baseline(events, batch)).await;
    let (peak, latency) = measure(events, batch).await;
    Ok(Row {
        path: "redis".into(),
        baseline: format!("XADD + XREADGROUP {batch} + XACK"),
        bare: bare.rate,
        broker: peak.rate,
        latency: Some(latency),
        cpu: Some(CpuRow {
            bare: bare.cpu,
            broker: peak.cpu,
        }),
    })
}
