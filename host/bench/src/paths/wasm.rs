//! WebAssembly handlers: bare wasmtime calls of an example guest (a fresh instance per call,
//! and one reused instance) against the same guest dispatched by broker + memory provider
//! under the `fresh` and `reuse` policies, on one engine (the host's settings).

use std::sync::Arc;
use std::time::{Duration, Instant};

use eventbroker::{Broker, Event, EventSource, MemoryProvider};
use eventbroker_testkit::guests;
use eventbroker_wasm::bare::BareGuest;
use eventbroker_wasm::config::{HandlersConfig, PoolConfig};
use eventbroker_wasm::{HandlerSet, WasmEngine};

use crate::harness::{self, broker_config};
use crate::{CpuRow, Row};

/// The guest every WebAssembly row runs.
pub const GUEST: &str = "rust_audit_logger";

fn event() -> Event {
    Event::new(EventSource::Database, "bench.users.create", "bench")
        .with_payload(serde_json::json!({"id": 1, "name": "Ada"}))
}

async fn bare_fresh(guest: &BareGuest, calls: u64) -> Duration {
    let prepared = guest.prepare(&event());
    let started = Instant::now();
    for _ in 0..calls {
        guest.call_fresh(&prepared).await.expect("call");
    }
    started.elapsed()
}

async fn bare_reuse(guest: &BareGuest, calls: u64) -> Duration {
    let prepared = guest.prepare(&event());
    let mut instance = guest.instance().await.expect("instance");
    let started = Instant::now();
    for _ in 0..calls {
        instance.call(&prepared).await.expect("call");
    }
    started.elapsed()
}

async fn broker(engine: &WasmEngine, bytes: &[u8], policy: &str) -> (Broker, HandlerSet) {
    let config = broker_config();
    let provider = Arc::new(MemoryProvider::new(&config));
    let broker = Broker::new(config, provider);
    let handlers = HandlerSet::new(engine.clone(), broker.clone(), HandlersConfig::default());
    let manifest =
        format!("patterns = [\"bench.>\"]\ninstances = \"{policy}\"\nconcurrency = 64\n");
    handlers
        .apply("guest", bytes.to_vec(), Some(&manifest))
        .await
        .expect("handler loads");
    broker.start().await.expect("start");
    (broker, handlers)
}

/// The `wasm fresh` and `wasm reuse` rows.
pub async fn run(events: u64) -> Vec<Row> {
    let built = guests::build();
    let bytes = std::fs::read(built.guest(GUEST)).expect("guest built");
    let engine = WasmEngine::new(&PoolConfig::default(), None).expect("engine");
    let guest = BareGuest::new(&engine, &bytes).expect("guest loads");
    let mut rows = Vec::new();
    for policy in ["fresh", "reuse"] {
        let bare = match policy {
            "fresh" => {
                bare_fresh(&guest, events / 10).await;
                harness::median_rate_cpu(None, events, || bare_fresh(&guest, events)).await
            }
            _ => {
                bare_reuse(&guest, events / 10).await;
                harness::median_rate_cpu(None, events, || bare_reuse(&guest, events)).await
            }
        };
        let (broker, handlers) = broker(&engine, &bytes, policy).await;
        let (peak, latency) = harness::broker_run(&broker, events, None).await;
        broker.stop().await.expect("stop");
        drop(handlers);
        rows.push(Row {
            path: format!("wasm {policy}, memory"),
            baseline: format!("wasmtime call, {policy} instance"),
            bare: bare.rate,
            broker: peak.rate,
            latency: Some(latency),
            cpu: Some(CpuRow {
                bare: bare.cpu,
                broker: peak.cpu,
            }),
        });
    }
    rows
}
