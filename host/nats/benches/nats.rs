//! Broker + NATS JetStream provider + a trivial native handler, against the bare async-nats
//! JetStream loop (publish awaiting the server's ack, pull in batches, ack confirmed by the
//! server) on the same server, measured in the same run.
//!
//!     nice cargo bench -p eventbroker-nats --bench nats [-- EVENTS]
//!
//! Needs NATS with JetStream at `NATS_URL` (default `nats://127.0.0.1:4222`); prints a notice
//! and exits when it is unreachable. Streams and buckets are created under unique names and
//! deleted afterwards.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use eventbroker::{Broker, BrokerConfig, Event, EventSource, handler_fn};
use eventbroker_nats::{NatsConfig, NatsProvider, NatsStorage};
use futures::StreamExt;
use tokio::sync::Notify;

/// Publishing tasks on both sides.
const PUBLISHERS: u64 = 4;
/// Largest pull batch on both sides (the broker's worker pool fetches at most 64).
const BATCH: usize = 64;

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

    fn handle(&self, event: &Event) {
        std::hint::black_box(&event.payload);
        if self.seen.fetch_add(1, Ordering::AcqRel) + 1 == self.target {
            self.done.notify_one();
        }
    }
}

fn event(i: u64) -> Event {
    Event::new(EventSource::System, "bench.tick", "bench").with_payload(serde_json::json!({"n": i}))
}

fn unique() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Bare async-nats: publish (awaiting acks, with message ids) from several tasks while one
/// consumer pulls batches, decodes each event, runs the handler and acknowledges.
async fn baseline(url: &str, events: u64) -> Duration {
    let client = async_nats::connect(url).await.expect("connect");
    let js = jetstream::new(client);
    let id = unique();
    let name = format!("BENCH{id}");
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![format!("bench{id}.>")],
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .expect("stream");
    let pull: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("bench".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(60),
            ..Default::default()
        })
        .await
        .expect("consumer");
    let counter = Counter::new(events);
    let done = counter.done.notified();
    tokio::pin!(done);
    done.as_mut().enable();
    let started = Instant::now();
    let worker = {
        let counter = counter.clone();
        tokio::spawn(async move {
            while counter.seen.load(Ordering::Acquire) < counter.target {
                let mut batch = pull
                    .batch()
                    .max_messages(BATCH)
                    .expires(Duration::from_millis(50))
                    .messages()
                    .await
                    .expect("pull");
                while let Some(message) = batch.next().await {
                    let message = message.expect("message");
                    let event: Event = serde_json::from_slice(&message.payload).expect("event");
                    counter.handle(&event);
                    message.double_ack().await.expect("ack");
                }
            }
        })
    };
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let js = js.clone();
            let subject = format!("bench{id}.system.bench.tick");
            tokio::spawn(async move {
                for i in (p..events).step_by(PUBLISHERS as usize) {
                    let e = event(i);
                    let payload = serde_json::to_vec(&e).expect("encode");
                    js.send_publish(
                        subject.clone(),
                        jetstream::message::PublishMessage::build()
                            .payload(payload.into())
                            .message_id(&e.id),
                    )
                    .await
                    .expect("publish")
                    .await
                    .expect("ack");
                }
            })
        })
        .collect();
    for publisher in publishers {
        publisher.await.expect("publisher");
    }
    done.await;
    let elapsed = started.elapsed();
    worker.await.expect("worker");
    js.delete_stream(&name).await.expect("delete stream");
    elapsed
}

async fn broker(url: &str, events: u64) -> Duration {
    let id = unique();
    let config = BrokerConfig {
        instance_id: "bench".into(),
        buffer_size: 10_000,
        ..BrokerConfig::default()
    };
    let nats = NatsConfig {
        url: url.into(),
        stream_name: format!("BENCH{id}"),
        subjects: vec![format!("bench{id}.>")],
        storage: NatsStorage::File,
        ..NatsConfig::default()
    };
    let provider = Arc::new(
        NatsProvider::connect(&nats, &config)
            .await
            .expect("provider"),
    );
    let broker = Broker::new(config, provider.clone());
    let counter = Counter::new(events);
    let handler = counter.clone();
    broker
        .subscribe(
            "bench.*",
            handler_fn(move |_, event| {
                let handler = handler.clone();
                async move {
                    handler.handle(&event);
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
    provider.destroy().await.expect("destroy");
    elapsed
}

fn rate(events: u64, elapsed: Duration) -> f64 {
    events as f64 / elapsed.as_secs_f64()
}

fn main() {
    let events: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(10_000);
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        if async_nats::connect(url.as_str()).await.is_err() {
            println!("SKIPPED: NATS is not reachable at {url}; set NATS_URL");
            return;
        }
        // Warm up both paths once.
        baseline(&url, events / 10).await;
        broker(&url, events / 10).await;
        let base = rate(events, baseline(&url, events).await);
        let full = rate(events, broker(&url, events).await);
        println!("events: {events}");
        println!(
            "baseline: async-nats JetStream publish (acked) -> pull batch {BATCH} -> ack: {base:>10.0} events/s"
        );
        println!(
            "broker:   publish_async -> NATS provider (stream + KV state) -> worker pool -> trivial handler: {full:>10.0} events/s"
        );
        println!("ratio broker/baseline: {:.3}", full / base);
    });
}
