//! # eventbroker-server
//!
//! The eventbroker service: everything `eventbroker serve` runs, as a library.
//!
//! - [`config`]: the config file, composed of each component's section (the broker's, the
//!   backends', the handlers', and this crate's `server`, `log` and `capture`).
//! - [`connect`]: the configured provider, from the backend crates.
//! - [`service`]: [`Service::start`] / [`run`] — provider, broker, WebAssembly handlers
//!   (loaded and watched), the HTTP server, change capture and graceful shutdown.
//! - the HTTP API (axum, private module `http`): events, SSE, WebSocket, handlers, health,
//!   metrics and the console page, behind the listener's request checks and the
//!   token/Origin/Host policy; [`Service`] serves it.
//! - [`capture`]: PostgreSQL change capture (triggers, outbox, drain into the broker).
//! - [`telemetry`]: tracing setup.
//!
//! An application that only embeds a broker needs the `eventbroker` crate alone.
#![deny(missing_docs)]

pub mod capture;
pub mod config;
mod http;
mod providers;
pub mod service;
pub mod telemetry;

pub use config::{BackendConfig, Config, ConfigError, FileFormat, ProviderKind};
pub use http::PolicyError;
pub use providers::connect;
pub use service::{Service, ServiceError, run};
