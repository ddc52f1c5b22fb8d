//! Broker + Redis Streams provider + a trivial native handler, against the bare Redis loop it
//! is built on (`XADD` by publishers, `XREADGROUP COUNT n BLOCK` + `XACK` by one consumer, the
//! same batch size), measured in the same run on the same server.
//!
//!     cargo bench -p eventbroker-redis --bench redis [-- EVENTS]
//!
//! Needs Redis at 127.0.0.1:6379 (`REDIS_ADDR` overrides); uses and deletes its own keys.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use eventbroker::{Broker, BrokerConfig, Event, EventSource, handler_fn};
use eventbroker_redis::{RedisConfig, RedisProvider};
use redis::aio::MultiplexedConnection;
use tokio::sync::Notify;

const PUBLISHERS: u64 = 4;

/// The trivial handler both sides run: count the event, signal when all are in.
#[derive(Clone)]
struct Counter {
    seen: Arc<AtomicU64>,
    target: u64,
    done: Arc<Notify>,
}

impl Counter {
    fn new(target: u64) -> Self {
        Counter {
            seen: Arc::new(AtomicU64::new(0)),
            target,
            done: Arc::new(Notify::new()),
        }
    }

    fn handle(&self, payload: &[u8]) {
        std::hint::black_box(payload);
        if self.seen.fetch_add(1, Ordering::AcqRel) + 1 == self.target {
            self.done.notify_one();
        }
    }
}

fn event(i: u64) -> Event {
    Event::new(EventSource::System, "bench.tick", "bench").with_payload(serde_json::json!({"n": i}))
}

fn addr() -> String {
    std::env::var("REDIS_ADDR").unwrap_or_else(|_| "127.0.0.1:6379".into())
}

async fn connection() -> MultiplexedConnection {
    redis::Client::open(format!("redis://{}/0", addr()))
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("Redis must be running for this benchmark")
}

async fn delete_keys(prefix: &str) {
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
            while counter.seen.load(Ordering::Acquire) < counter.target {
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
    let done = counter.done.notified();
    tokio::pin!(done);
    done.as_mut().enable();
    let started = Instant::now();
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let stream = stream.clone();
            tokio::spawn(async move {
                let mut conn = connection().await;
                for i in (p..events).step_by(PUBLISHERS as usize) {
                    let json = serde_json::to_string(&event(i)).expect("json");
                    let _: String = redis::cmd("XADD")
                        .arg(&stream)
                        .arg("*")
                        .arg("event")
                        .arg(json)
                        .query_async(&mut conn)
                        .await
                        .expect("xadd");
                }
            })
        })
        .collect();
    for publisher in publishers {
        publisher.await.expect("publisher");
    }
    done.await;
    let elapsed = started.elapsed();
    consumer.await.expect("consumer");
    delete_keys(&stream).await;
    elapsed
}

async fn broker(events: u64, batch: usize) -> Duration {
    let counter = Counter::new(events);
    let config = BrokerConfig {
        instance_id: "bench".into(),
        buffer_size: 10_000,
        ..BrokerConfig::default()
    };
    let redis = RedisConfig {
        url: Some(format!("redis://{}/0", addr())),
        stream_name: format!("eb-bench:{}", uuid::Uuid::new_v4().simple()),
        batch_size: batch,
        max_len: events,
        ..RedisConfig::default()
    };
    let provider: Arc<dyn eventbroker::Provider> = Arc::new(
        RedisProvider::connect(&redis, &config)
            .await
            .expect("Redis must be running for this benchmark"),
    );
    let broker = Broker::new(config.clone(), provider.clone());
    let handler = counter.clone();
    broker
        .subscribe(
            "bench.*",
            handler_fn(move |_, event| {
                let handler = handler.clone();
                async move {
                    handler.handle(event.payload.to_string().as_bytes());
                    Ok(())
                }
            }),
        )
        .expect("subscribe");
    broker.start().await.expect("start");
    let done = counter.done.notified();
    tokio::pin!(done);
    done.as_mut().enable();
    let started = Instant::now();
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let broker = broker.clone();
            tokio::spawn(async move {
                for i in (p..events).step_by(PUBLISHERS as usize) {
                    broker.publish_async(event(i)).await.expect("publish");
                }
            })
        })
        .collect();
    for publisher in publishers {
        publisher.await.expect("publisher");
    }
    done.await;
    let elapsed = started.elapsed();
    broker.stop().await.expect("stop");
    provider.close().await;
    delete_keys(&redis.stream_name).await;
    elapsed
}

fn rate(events: u64, elapsed: Duration) -> f64 {
    events as f64 / elapsed.as_secs_f64()
}

fn main() {
    let events: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(20_000);
    let batch = RedisConfig::default().batch_size;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        // Warm up both paths once.
        baseline(events / 10, batch).await;
        broker(events / 10, batch).await;
        let base = rate(events, baseline(events, batch).await);
        let full = rate(events, broker(events, batch).await);
        println!("events: {events}, batch size: {batch}, publishers: {PUBLISHERS}");
        println!("baseline: XADD -> XREADGROUP COUNT {batch} -> trivial handler -> XACK: {base:>10.0} events/s");
        println!("broker:   publish_async -> Redis provider -> worker pool -> trivial handler: {full:>10.0} events/s");
        println!("ratio broker/baseline: {:.3}", full / base);
    });
}
