//! The `server` section: the HTTP server's keys and defaults (validated by
//! `ServerConfig::validate` in the parent module).

use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

/// The HTTP server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: String,
    /// One bearer token for every `/v1` route (admin scope). When any of `token`,
    /// `admin_token` or `publish_token` is set, every `/v1` route needs a token.
    pub token: Option<String>,
    /// Bearer token of the admin scope: deploy, remove, re-run, and everything else.
    pub admin_token: Option<String>,
    /// Bearer token of the publish scope: publishing and reading. Set alone, admin routes
    /// are refused.
    pub publish_token: Option<String>,
    /// When set, `/metrics` needs this bearer token (or an admin-scope one); open otherwise.
    pub metrics_token: Option<String>,
    /// Allow listening on a non-loopback address without any token (a proxy in front
    /// authenticates).
    pub allow_unauthenticated: bool,
    /// `Host` values accepted besides `localhost`, `127.0.0.1`, `[::1]` and the listen address
    /// (`host` or `host:port`); `*` accepts any.
    pub allowed_hosts: Vec<String>,
    /// Origins (`https://app.example`) whose pages may open WebSockets and send
    /// state-changing requests, besides the host's own; `*` allows any.
    pub allowed_origins: Vec<String>,
    /// Largest accepted request body (component uploads excepted).
    #[serde(with = "eventbroker::size::serde")]
    pub body_limit: ByteSize,
    /// Largest accepted component upload (component plus manifest).
    #[serde(with = "eventbroker::size::serde")]
    pub upload_limit: ByteSize,
    /// Events in one `POST /v1/events/batch`.
    pub max_batch: usize,
    /// Interval of keep-alive comments on `GET /v1/stream`.
    #[serde(with = "humantime_serde")]
    pub sse_keep_alive: Duration,
    /// WebSocket clients (`GET /v1/ws`).
    pub websocket: WebSocketConfig,
}

/// Per-connection limits of WebSocket clients (`GET /v1/ws`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    /// Largest message a client may send; a larger one closes the connection (code 1009).
    #[serde(with = "eventbroker::size::serde")]
    pub max_message_size: ByteSize,
    /// Publishes per second a connection may sustain (token bucket); more are refused with
    /// a `rate_limited` error.
    pub publish_rate: u32,
    /// Publishes a connection may make in a burst above the rate.
    pub publish_burst: u32,
    /// Messages queued for a client; a client that lets it fill is disconnected (code 1008,
    /// with the reason) rather than slowing the broker.
    pub outbound_buffer: usize,
    /// Patterns one connection may subscribe to at once.
    pub max_subscriptions: usize,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        WebSocketConfig {
            max_message_size: ByteSize::kib(64),
            publish_rate: 100,
            publish_burst: 100,
            outbound_buffer: 1024,
            max_subscriptions: 32,
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8080".into(),
            token: None,
            admin_token: None,
            publish_token: None,
            metrics_token: None,
            allow_unauthenticated: false,
            allowed_hosts: Vec::new(),
            allowed_origins: Vec::new(),
            body_limit: ByteSize::mib(2),
            upload_limit: ByteSize::mib(64),
            max_batch: 1000,
            sse_keep_alive: Duration::from_secs(15),
            websocket: WebSocketConfig::default(),
        }
    }
}
