//! # eventbroker
//!
//! The event broker an application embeds: it accepts events, stores them through a pluggable
//! provider, and runs event handlers on a worker pool with retries, dead letters and
//! per-handler limits. This crate depends on no WebAssembly runtime, database driver, HTTP
//! server or CLI library: the durable backends (`eventbroker-sql`, `eventbroker-redis`,
//! `eventbroker-nats`), WebAssembly handlers (`eventbroker-wasm`) and the service
//! (`eventbroker-server`) are crates of their own built on this one.
//!
//! ## Map
//! - [`event`]: the [`Event`] model, sources, statuses and validation.
//! - [`pattern`]: subscription patterns (`*`, `>`/`**`) and the index that matches them.
//! - [`provider`]: the [`Provider`] and [`Consumer`] traits (store, query, work-sharing
//!   consumers, fan-out watchers), the bookkeeping every backend shares, and the in-memory
//!   [`MemoryProvider`].
//! - [`broker`]: [`Broker`] — publish (sync/async), subscriptions, the worker pool, the one
//!   place that decides status and retries.
//! - [`config`]: [`BrokerConfig`], its defaults and validation.
//! - [`hooks`]: CRUD hooks for embedding applications.
//! - [`handler_store`]: the [`HandlerStore`] trait a shared backend implements so that a
//!   cluster keeps its handlers in one place.
//! - [`keyvalue`]: the [`KeyValueStore`] trait a backend implements so that handlers keep
//!   state shared by every host, and the in-process [`MemoryKeyValue`].
//! - [`metrics`]: Prometheus metrics.
//!
//! ## How an event flows
//! `publish` → [`Event::validate`] → [`Provider::publish`] → the provider's consumer group →
//! a pool worker → every matching subscription, concurrently → outcome → `completed`,
//! `failed` (dead letter) or a retry with backoff, recorded and acknowledged by the provider.
//!
//! # Examples
//! Embedding a broker with a native handler:
//! ```
//! use std::sync::Arc;
//! use eventbroker::{Broker, BrokerConfig, Event, EventSource, EventStatus, MemoryProvider, handler_fn};
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = BrokerConfig { worker_count: 2, ..BrokerConfig::default() };
//! config.validate()?;
//! let broker = Broker::new(config.clone(), Arc::new(MemoryProvider::new(&config)));
//! broker.subscribe("public.orders.*", handler_fn(|_ctx, event| async move {
//!     println!("order event {} ({})", event.id, event.event_type);
//!     Ok(())
//! }))?;
//! broker.start().await?;
//! let event = Event::new(EventSource::System, "public.orders.create", "host-1");
//! let done = broker.publish_sync(event).await?;
//! assert_eq!(done.status, EventStatus::Completed);
//! broker.stop().await?;
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

pub mod broker;
pub mod config;
pub mod event;
mod global;
pub mod handler_store;
pub mod hooks;
pub mod keyvalue;
pub mod metrics;
pub mod pattern;
#[cfg(target_os = "linux")]
mod process_metrics;
pub mod provider;
pub mod size;
pub mod trace_context;

pub use broker::{
    Broker, BrokerError, BrokerStats, EventHandler, HandlerContext, HandlerResult, Published,
    StopReport, SubscribeOptions, SubscriptionId, WeakBroker, handler_fn,
};
pub use config::{BrokerConfig, InvalidValue, MemoryConfig, ProcessingMode, RetryPolicy};
pub use event::{
    Event, EventSource, EventStatus, Failure, FailureKind, HandlerOutcome, OutcomeState,
    ValidationError, event_type,
};
pub use global::{
    default_broker, initialize, publish, publish_async, publish_sync, set_default_broker,
    subscribe, take_default_broker,
};
pub use handler_store::{HandlerStore, StoreError, StoredRecord};
pub use keyvalue::{KeyValueStore, KvError, MemoryKeyValue};
pub use pattern::{Pattern, PatternError, PatternIndex};
pub use provider::{
    Consumer, Delivery, EventFilter, MemoryProvider, Provider, ProviderError, ProviderStats,
};
