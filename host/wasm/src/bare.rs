//! The guest called with wasmtime directly — same engine (pooling allocator, fuel, epochs,
//! stack size, `keep_resident`), same linker, same bindings — but without the broker or the
//! per-invocation accounting (concurrency slots, deadlines, log capture, failure records).
//! Benchmarks use it as the physical limit the broker path is compared with.

use std::collections::BTreeMap;
use std::sync::Arc;

use wasmtime::Store;
use wasmtime::component::{Instance, InstancePre};

use super::WasmError;
use super::bindings::HandlerIndices;
use super::bindings::types as wit;
use super::component::to_wit_event;
use super::engine::WasmEngine;
use super::state::{HostState, Publisher, StoreSettings};
use eventbroker::event::Event;

/// A compiled, linked guest ready for bare calls.
pub struct BareGuest {
    engine: WasmEngine,
    pre: InstancePre<HostState>,
    indices: HandlerIndices,
    settings: Arc<StoreSettings>,
}

/// An event converted to the guest's types once, outside the measured loop.
pub struct PreparedEvent {
    event: wit::Event,
    context: wit::Context,
    id: String,
}

/// One instance kept across calls.
pub struct BareInstance {
    store: Store<HostState>,
    instance: Instance,
    indices: HandlerIndices,
}

fn error(e: wasmtime::Error) -> WasmError {
    WasmError::Exports(format!("{e:#}"))
}

fn new_store(guest: &BareGuest) -> Store<HostState> {
    let mut store = Store::new(
        guest.engine.engine(),
        HostState::new(guest.settings.clone()),
    );
    // The engine meters fuel and checks epochs; a bare call gets all of both. The epoch
    // deadline is relative to the current epoch (which keeps growing), so `u64::MAX` would
    // wrap around to a deadline already passed: half of it is unreachable instead.
    let _ = store.set_fuel(u64::MAX);
    store.set_epoch_deadline(u64::MAX / 2);
    store
}

impl BareGuest {
    /// Compiles (or loads from the engine's cache) and links `bytes`.
    ///
    /// # Errors
    /// [`WasmError`] if the component does not load.
    pub fn new(engine: &WasmEngine, bytes: &[u8]) -> Result<Self, WasmError> {
        let (component, _) = engine.compile(bytes)?;
        let pre = engine
            .linker()
            .instantiate_pre(&component)
            .map_err(|e| WasmError::Link(format!("{e:#}")))?;
        let indices = HandlerIndices::new(&pre).map_err(error)?;
        Ok(BareGuest {
            engine: engine.clone(),
            pre,
            indices,
            settings: Arc::new(StoreSettings {
                handler: "bare".into(),
                version: "bare".into(),
                memory: u64::MAX,
                fuel: u64::MAX,
                max_log_lines: 100,
                max_log_bytes: 64 << 10,
                max_publishes: 100,
                config: BTreeMap::new(),
                timeout: std::time::Duration::from_secs(3600),
                http: None,
                keyvalue: None,
                keyvalue_store: None,
                metrics: None,
            }),
        })
    }

    /// Converts an event for the guest.
    pub fn prepare(&self, event: &Event) -> PreparedEvent {
        PreparedEvent {
            event: to_wit_event(event),
            context: wit::Context {
                attempt: 1,
                handler: "bare".into(),
                version: "bare".into(),
                deadline_ms: u64::MAX,
            },
            id: event.id.clone(),
        }
    }

    /// A new instance, then one call: the `fresh` policy without the broker.
    ///
    /// # Errors
    /// [`WasmError`] if instantiation or the call traps.
    pub async fn call_fresh(&self, prepared: &PreparedEvent) -> Result<(), WasmError> {
        let mut instance = self.instance().await?;
        instance.call(prepared).await
    }

    /// A new instance for repeated calls: the `reuse` policy without the broker.
    ///
    /// # Errors
    /// [`WasmError`] if instantiation traps.
    pub async fn instance(&self) -> Result<BareInstance, WasmError> {
        let mut store = new_store(self);
        let instance = self
            .pre
            .instantiate_async(&mut store)
            .await
            .map_err(error)?;
        Ok(BareInstance {
            store,
            instance,
            indices: self.indices.clone(),
        })
    }
}

impl BareInstance {
    /// Calls `handle` once.
    ///
    /// # Errors
    /// [`WasmError`] if the call traps or the guest returns an error.
    pub async fn call(&mut self, prepared: &PreparedEvent) -> Result<(), WasmError> {
        self.store.data_mut().begin(&prepared.id, Publisher::Record);
        let guest = self
            .indices
            .load(&mut self.store, &self.instance)
            .map_err(error)?;
        let result = guest
            .call_handle(&mut self.store, &prepared.event, &prepared.context)
            .await
            .map_err(error)?;
        self.store.data_mut().finish();
        result.map_err(|e| WasmError::Exports(format!("guest returned {e:?}")))
    }
}
