//! WebAssembly handlers: bare wasmtime calls of an example guest (a fresh instance per call,
//! and one reused instance) against the same guest dispatched through broker + memory provider
//! with the `fresh` and `reuse` policies, measured in the same run on the same engine settings
//! (pooling allocator, fuel, epochs, `keep_resident`).
//!
//!     cargo bench -p eventbroker-wasm --bench wasm [-- EVENTS]

use std::sync::Arc;
use std::time::{Duration, Instant};

use eventbroker_testkit::guests;

use eventbroker::{Broker, BrokerConfig, Event, EventSource, MemoryProvider};
use eventbroker_wasm::bare::BareGuest;
use eventbroker_wasm::config::{HandlersConfig, PoolConfig};
use eventbroker_wasm::{HandlerSet, WasmEngine};

fn event(i: u64) -> Event {
    Event::new(EventSource::Database, "public.users.create", "bench")
        .with_payload(serde_json::json!({"id": i, "name": "Ada"}))
}

async fn bare_fresh(guest: &BareGuest, events: u64) -> Duration {
    let prepared = guest.prepare(&event(0));
    let started = Instant::now();
    for _ in 0..events {
        guest.call_fresh(&prepared).await.expect("call");
    }
    started.elapsed()
}

async fn bare_reuse(guest: &BareGuest, events: u64) -> Duration {
    let prepared = guest.prepare(&event(0));
    let mut instance = guest.instance().await.expect("instance");
    let started = Instant::now();
    for _ in 0..events {
        instance.call(&prepared).await.expect("call");
    }
    started.elapsed()
}

async fn through_broker(engine: &WasmEngine, bytes: &[u8], policy: &str, events: u64) -> Duration {
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
    let handlers = HandlerSet::new(engine.clone(), broker.clone(), HandlersConfig::default());
    let manifest = format!("patterns = [\"*\"]\ninstances = \"{policy}\"\nconcurrency = 64\n");
    handlers
        .apply("guest", bytes.to_vec(), Some(&manifest))
        .await
        .expect("handler loads");
    broker.start().await.expect("start");
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
    loop {
        let stats = broker.stats().await.expect("stats");
        if stats.processed >= events {
            assert_eq!(stats.completed, events, "every event completed");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
        .unwrap_or(20_000);
    let built = guests::build();
    let bytes = std::fs::read(built.guest("rust_audit_logger")).expect("guest built");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let engine = WasmEngine::new(&PoolConfig::default(), None).expect("engine");
        let guest = BareGuest::new(&engine, &bytes).expect("guest loads");
        // Warm up.
        bare_fresh(&guest, events / 10).await;
        bare_reuse(&guest, events / 10).await;
        through_broker(&engine, &bytes, "fresh", events / 10).await;
        let bare_fresh = rate(events, bare_fresh(&guest, events).await);
        let bare_reuse = rate(events, bare_reuse(&guest, events).await);
        let broker_fresh = rate(events, through_broker(&engine, &bytes, "fresh", events).await);
        let broker_reuse = rate(events, through_broker(&engine, &bytes, "reuse", events).await);
        println!("guest: rust_audit_logger ({} bytes), events: {events}", bytes.len());
        println!("bare wasmtime, fresh instance per call: {bare_fresh:>10.0} calls/s");
        println!("bare wasmtime, reused instance:         {bare_reuse:>10.0} calls/s");
        println!("broker + memory provider, fresh:        {broker_fresh:>10.0} events/s  ratio broker/bare {:.3}", broker_fresh / bare_fresh);
        println!("broker + memory provider, reuse:        {broker_reuse:>10.0} events/s  ratio broker/bare {:.3}", broker_reuse / bare_reuse);
    });
}
