//! # eventbroker
//!
//! An event broker host: it accepts events, stores them through a pluggable provider, and runs
//! event handlers — native Rust closures or sandboxed WebAssembly components — on a worker pool
//! with retries, dead letters and per-handler limits.
//!
//! ## Map
//! - [`event`]: the [`Event`] model, sources, statuses and validation.
//! - [`pattern`]: subscription patterns (`*`, `>`/`**`) and the index that matches them.
//! - [`provider`]: the [`Provider`] trait (store, query, work-sharing consumers, fan-out
//!   watchers) and its backends.
//! - [`broker`]: [`Broker`] — publish (sync/async), subscriptions, the worker pool, the one
//!   place that decides status and retries.
//! - [`config`]: typed configuration from defaults, YAML/TOML files and the environment.
//! - [`server`]: the HTTP API.
//! - [`service`]: [`service::run`], the whole host as a library call (used by the binary and
//!   the end-to-end tests).
//! - [`hooks`]: event sources fed by databases: CRUD hooks for embedding applications and
//!   PostgreSQL change capture.
//! - [`metrics`]: Prometheus metrics.
//! - [`telemetry`]: tracing setup.
//! - [`wasm`]: WebAssembly handlers: engine, sandbox, handler set, `run` and `check`.
//!
//! ## How an event flows
//! `publish` (HTTP, CLI, library) → [`Event::validate`] → [`Provider::publish`] → the
//! provider's consumer group → a pool worker → every matching subscription, concurrently →
//! outcome → `completed`, `failed` (dead letter) or a retry with backoff, recorded and
//! acknowledged by the provider.
#![deny(missing_docs)]

pub mod broker;
pub mod config;
pub mod event;
mod global;
pub mod hooks;
pub mod metrics;
pub mod pattern;
pub mod provider;
pub mod server;
pub mod service;
pub mod telemetry;
pub mod wasm;

pub use broker::{
    Broker, BrokerError, BrokerStats, EventHandler, HandlerContext, HandlerResult, Published,
    StopReport, SubscribeOptions, SubscriptionId, WeakBroker, handler_fn,
};
pub use config::{BrokerConfig, Config, ConfigError, ProcessingMode, ProviderKind, RetryPolicy};
pub use event::{
    Event, EventSource, EventStatus, Failure, FailureKind, HandlerOutcome, OutcomeState,
    ValidationError, event_type,
};
pub use global::{
    default_broker, initialize, publish, publish_async, publish_sync, set_default_broker,
    subscribe, take_default_broker,
};
pub use pattern::{Pattern, PatternError, PatternIndex};
pub use provider::{
    Consumer, Delivery, EventFilter, MemoryProvider, Provider, ProviderError, ProviderStats,
};
