//! Broker + memory provider + a trivial native handler, against a bare tokio channel feeding
//! the same handler, measured in the same run.
//!
//!     cargo bench -p eventbroker --bench dispatch [-- EVENTS]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use eventbroker::{Broker, BrokerConfig, Event, EventSource, MemoryProvider, handler_fn};
use tokio::sync::Notify;

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

    async fn handle(&self, event: &Event) {
        std::hint::black_box(&event.payload);
        if self.seen.fetch_add(1, Ordering::AcqRel) + 1 == self.target {
            self.done.notify_one();
        }
    }
}

fn event(i: u64) -> Event {
    Event::new(EventSource::System, "bench.tick", "bench").with_payload(serde_json::json!({"n": i}))
}

async fn baseline(events: u64) -> Duration {
    let counter = Counter::new(events);
    let (sender, mut receiver) = tokio::sync::mpsc::channel::<Event>(1000);
    let consumer = {
        let counter = counter.clone();
        tokio::spawn(async move {
            while let Some(event) = receiver.recv().await {
                counter.handle(&event).await;
            }
        })
    };
    let done = counter.done.notified();
    tokio::pin!(done);
    done.as_mut().enable();
    let started = Instant::now();
    for i in 0..events {
        sender.send(event(i)).await.expect("consumer alive");
    }
    done.await;
    let elapsed = started.elapsed();
    drop(sender);
    consumer.await.expect("consumer");
    elapsed
}

async fn broker(events: u64) -> Duration {
    let counter = Counter::new(events);
    let config = BrokerConfig {
        instance_id: "bench".into(),
        buffer_size: 10_000,
        memory: eventbroker::config::MemoryConfig {
            max_events: events as usize + 1,
            ..Default::default()
        },
        ..BrokerConfig::default()
    };
    let provider = Arc::new(MemoryProvider::new(&config));
    let broker = Broker::new(config, provider);
    let handler = counter.clone();
    broker
        .subscribe(
            "bench.*",
            handler_fn(move |_, event| {
                let handler = handler.clone();
                async move {
                    handler.handle(&event).await;
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
    let publishers: Vec<_> = (0..4)
        .map(|p| {
            let broker = broker.clone();
            tokio::spawn(async move {
                for i in (p..events).step_by(4) {
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
    elapsed
}

fn rate(events: u64, elapsed: Duration) -> f64 {
    events as f64 / elapsed.as_secs_f64()
}

fn main() {
    let events: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        // Warm up both paths once.
        baseline(events / 10).await;
        broker(events / 10).await;
        let base = rate(events, baseline(events).await);
        let full = rate(events, broker(events).await);
        println!("events: {events}");
        println!("baseline: tokio mpsc channel -> trivial handler: {base:>12.0} events/s");
        println!("broker:   publish_async -> memory provider -> worker pool -> trivial handler: {full:>12.0} events/s");
        println!("ratio broker/baseline: {:.3}", full / base);
    });
}
