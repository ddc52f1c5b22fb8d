//! WebAssembly handlers: the engine (pooling allocator and its slots, fuel, epoch deadlines,
//! memory limiter, private compile cache), the bindings generated from `wit/`, the host imports
//! and the bounds on what a guest hands the host, handler manifests, loaded versions and their
//! invocation, the handler set (name → current version) and its loading from a directory,
//! component checks, and the local runner behind `eventbroker run`.
//!
//! # Examples
//! Loading a WebAssembly handler into a broker: the handler runs on every event its manifest's
//! patterns match, sandboxed under its own fuel, memory, time and concurrency limits.
//! ```no_run
//! use std::sync::Arc;
//! use eventbroker::{Broker, BrokerConfig, Event, EventSource, MemoryProvider};
//! use eventbroker_wasm::config::HandlersConfig;
//! use eventbroker_wasm::{HandlerSet, WasmEngine};
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = BrokerConfig::default();
//! let broker = Broker::new(config.clone(), Arc::new(MemoryProvider::new(&config)));
//! let handlers_config = HandlersConfig::default();
//! let engine = WasmEngine::new(&handlers_config.pool, handlers_config.cache_dir())?;
//! let handlers = HandlerSet::new(engine, broker.clone(), handlers_config);
//! // `audit.wasm` is a component built against `wit/`; `audit.toml` (optional) its manifest.
//! let manifest = std::fs::read_to_string("audit.toml").ok();
//! let info = handlers
//!     .apply("audit", std::fs::read("audit.wasm")?, manifest.as_deref())
//!     .await?;
//! println!("serving version {:?}", info.current.map(|v| v.version));
//! broker.start().await?;
//! broker.publish_sync(Event::new(EventSource::System, "public.orders.create", "host-1")).await?;
//! broker.stop().await?;
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

pub mod bare;
mod bindings;
mod cache;
pub mod check;
pub mod cluster;
mod component;
pub mod config;
mod draft;
mod engine;
mod handler;
pub mod http;
mod imports;
pub mod keyvalue;
pub mod limits;
mod log;
mod manifest;
mod outcome;
pub mod percentiles;
mod registry;
pub mod runner;
mod slots;
mod state;
mod watch;

pub use cluster::{ClusterInfo, ClusterStart, ClusterSync, DeployOptions, SyncState};
pub use component::{
    CompiledHandler, HandlerCounters, Invocation, OUTCOMES, PATTERNS_TIMEOUT, QUEUE_WAIT,
    VersionInfo,
};
pub use engine::{
    CompileSource, Compiled, ComponentBytes, EPOCH_TICK, WasmEngine, check_component_bytes,
    version_id,
};
pub use handler::WasmHandler;
pub use log::LogLine;
pub use manifest::{ConfigValue, HandlerSpec, Manifest, RetryOverrides, validate_name};
pub use registry::{HandlerInfo, HandlerSet, LoadReport, Rejection};
pub use slots::InstanceSlots;
pub use watch::{Watcher, watch};

/// Errors of the WebAssembly runtime boundary.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WasmError {
    /// The file is not WebAssembly at all.
    #[error("not a WebAssembly file (it does not start with the \\0asm magic bytes)")]
    NotWasm,
    /// The file starts with the WebAssembly magic bytes, but its version and layer field is
    /// neither a core module's nor a component's.
    #[error(
        "the file starts with the \\0asm magic bytes but is neither a core WebAssembly module \
         nor a component (its version and layer bytes are {0}); it is corrupt or made for a \
         WebAssembly version this host does not read"
    )]
    UnknownWasm(String),
    /// A core module was given where a component is needed.
    #[error(
        "this is a core WebAssembly module, not a component; build for the wasm32-wasip2 target \
         (cargo build --target wasm32-wasip2) or wrap it with `wasm-tools component new`"
    )]
    NotComponent,
    /// Compilation failed.
    #[error("component does not compile: {0}")]
    Compile(String),
    /// The component imports something the host does not provide.
    #[error("component cannot be linked: {0}")]
    Link(String),
    /// The component does not export what a handler must.
    #[error("component does not fit the handler world: {0}")]
    Exports(String),
    /// The manifest is invalid.
    #[error("invalid manifest: {0}")]
    Manifest(String),
    /// The engine could not be set up.
    #[error("wasm engine error: {0}")]
    Engine(String),
    /// Reading or writing handler files failed.
    #[error("{0}")]
    Io(String),
    /// No handler with this name.
    #[error("no handler named {0:?}")]
    NotFound(String),
    /// The handler has no such release (rollback target), or none to go back to.
    #[error("{0}")]
    NoRelease(String),
    /// The change does not apply to the handler's current deployment (a canary already runs,
    /// none runs, another host changed it meanwhile).
    #[error("{0}")]
    Conflict(String),
    /// The cluster handler store failed or holds something unreadable.
    #[error("{0}")]
    Store(String),
}
