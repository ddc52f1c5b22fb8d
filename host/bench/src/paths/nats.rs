//! The NATS JetStream provider with the trivial native handler, against the bare async-nats
//! JetStream loop: publish awaiting the server's ack, pull in batches, ack confirmed by the
//! server, on the same server. `NATS_URL` overrides `nats://127.0.0.1:4222`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use eventbroker::{Broker, Event};
use eventbroker_nats::{NatsConfig, NatsProvider, NatsStorage};
use futures::StreamExt;

use crate::harness::{self, Counter, Publishers, broker_config, event, subscribe_trivial};
use crate::paths::{Outcome, skipped};
use crate::{CpuRow, Row};

/// Largest pull batch on both sides (the broker's worker pool fetches at most 64).
const BATCH: usize = 64;

/// The NATS server the benchmark uses.
pub fn url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
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
    let started = Instant::now();
    let worker = {
        let counter = counter.clone();
        tokio::spawn(async move {
            while !counter.finished() {
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
                    counter.handle(&event.payload);
                    message.double_ack().await.expect("ack");
                }
            }
        })
    };
    let (publishing, subject) = (js.clone(), format!("bench{id}.system.bench.tick"));
    Publishers::spawn(events, move |i| {
        let (js, subject) = (publishing.clone(), subject.clone());
        async move {
            let e = event(i);
            let payload = serde_json::to_vec(&e).expect("encode");
            js.send_publish(
                subject,
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
    .join()
    .await;
    counter.wait().await;
    let elapsed = started.elapsed();
    worker.await.expect("worker");
    js.delete_stream(&name).await.expect("delete stream");
    elapsed
}

/// The server's process name, for the CPU figures.
const SERVER: &str = "nats-server";

async fn measure(url: &str, events: u64) -> (harness::Measured, harness::Latency) {
    let id = unique();
    let config = broker_config();
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
            .expect("NATS provider"),
    );
    let broker = Broker::new(config, provider.clone());
    subscribe_trivial(&broker, "trivial");
    broker.start().await.expect("start");
    let measured = harness::broker_run(&broker, events, Some(SERVER)).await;
    broker.stop().await.expect("stop");
    provider.destroy().await.expect("destroy");
    measured
}

/// The `nats` row, or a skip when NATS is not reachable.
pub async fn run(events: u64) -> Outcome {
    let url = url();
    if async_nats::connect(url.as_str()).await.is_err() {
        return Err(skipped("nats", format!("NATS not reachable at {url}")));
    }
    baseline(&url, events / 10).await;
    let bare = harness::median_rate_cpu(Some(SERVER), events, || baseline(&url, events)).await;
    let (peak, latency) = measure(&url, events).await;
    Ok(Row {
        path: "nats".into(),
        baseline: format!("publish (acked) + pull {BATCH} + ack"),
        bare: bare.rate,
        broker: peak.rate,
        latency: Some(latency),
        cpu: Some(CpuRow {
            bare: bare.cpu,
            broker: peak.cpu,
        }),
    })
}
