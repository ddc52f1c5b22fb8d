//! The memory provider with the trivial native handler, against a bare tokio channel feeding
//! the same handler; how throughput falls as more handlers match each event; and what one
//! stored event costs in memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use eventbroker::provider::Provider;
use eventbroker::{Broker, MemoryProvider};

use crate::harness::{self, Counter, Publishers, broker_config, event, rate, subscribe_trivial};
use crate::{CpuRow, Row};

/// A bare tokio channel (capacity 1000) from [`harness::PUBLISHERS`] tasks to one consumer
/// running the trivial handler.
pub async fn bare(events: u64) -> Duration {
    let counter = Counter::new(events);
    let (sender, mut receiver) = tokio::sync::mpsc::channel(1000);
    let consumer = {
        let counter = counter.clone();
        tokio::spawn(async move {
            while let Some(event) = receiver.recv().await {
                let event: eventbroker::Event = event;
                counter.handle(&event.payload);
            }
        })
    };
    let started = Instant::now();
    let publishing = sender.clone();
    Publishers::spawn(events, move |i| {
        let sender = publishing.clone();
        async move {
            sender.send(event(i)).await.expect("consumer alive");
        }
    })
    .join()
    .await;
    counter.wait().await;
    let elapsed = started.elapsed();
    drop(sender);
    consumer.await.expect("consumer");
    elapsed
}

/// A running broker on a fresh memory provider with `handlers` trivial handlers.
pub async fn broker(handlers: usize) -> Broker {
    let config = broker_config();
    let provider = Arc::new(MemoryProvider::new(&config));
    let broker = Broker::new(config, provider);
    for n in 0..handlers {
        subscribe_trivial(&broker, &format!("trivial-{n}"));
    }
    broker.start().await.expect("start");
    broker
}

/// The `memory` row.
pub async fn run(events: u64) -> Row {
    bare(events / 10).await;
    let bare = harness::median_rate_cpu(None, events, || bare(events)).await;
    let broker = broker(1).await;
    let (peak, latency) = harness::broker_run(&broker, events, None).await;
    broker.stop().await.expect("stop");
    Row {
        path: "memory, native handler".into(),
        baseline: "tokio mpsc channel".into(),
        bare: bare.rate,
        broker: peak.rate,
        latency: Some(latency),
        cpu: Some(CpuRow {
            bare: bare.cpu,
            broker: peak.cpu,
        }),
    }
}

/// Events/s with 1, 2, 4 and 16 trivial handlers matching each event.
pub async fn fan_out(events: u64) -> Vec<(usize, f64)> {
    let mut rates = Vec::new();
    for handlers in [1, 2, 4, 16] {
        let broker = broker(handlers).await;
        harness::drive(&broker, events / 10).await;
        rates.push((
            handlers,
            rate(events, harness::drive(&broker, events).await),
        ));
        broker.stop().await.expect("stop");
    }
    rates
}

/// Resident memory of this process, in bytes (`VmRSS` of Linux's `/proc/self/status`).
fn resident() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Bytes of resident memory per event stored in the memory provider (no consumer, so every
/// event stays `pending`), measured over `events` events of the benchmark's shape.
pub async fn bytes_per_event(events: u64) -> Option<f64> {
    let mut config = broker_config();
    // No consumer: every event stays unfinished, so the unfinished limit must hold them all.
    config.buffer_size = events as usize + 1;
    let provider = MemoryProvider::new(&config);
    let before = resident()?;
    for i in 0..events {
        provider.publish(&event(i)).await.expect("publish");
    }
    let after = resident()?;
    let per_event = after.saturating_sub(before) as f64 / events as f64;
    drop(provider);
    Some(per_event)
}
