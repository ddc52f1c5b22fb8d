//! The HTTP API (axum), versioned under `/v1`.
//!
//! Every error is JSON `{"error": {"code", "message"}}` (see [`ApiError`]); no input makes the
//! server panic (a panic in a route is caught and answered with a 500) or hang (bodies are
//! size-limited; long requests are bounded by the handler timeouts behind them).
//!
//! Access: routes are grouped as read, publish and admin, guarded by bearer tokens (see
//! [`auth`]); every request's `Host`, and the `Origin` of state-changing and WebSocket
//! requests, are checked against what the host answers to (see [`browser`]); request heads
//! hyper cannot parse are answered with the JSON envelope too (see [`wire`]). While the host
//! shuts down, publish and admin routes answer 503.

mod activity;
pub mod auth;
pub mod browser;
pub mod cloudevents;
pub mod config;
mod error;
mod events;
mod handlers;
mod health;
pub mod openapi;
mod page;
mod stream;
mod trace;
pub mod wire;
pub mod ws;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

pub use auth::Tokens;
pub use browser::{BrowserPolicy, PolicyError};
pub use error::ApiError;

use eventbroker::config::InvalidValue;

pub use self::config::ServerConfig;
use auth::Access;
use eventbroker::broker::Broker;
use eventbroker_wasm::HandlerSet;

/// What the routes share.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<StateInner>,
}

struct StateInner {
    broker: Broker,
    handlers: Option<HandlerSet>,
    limits: RouterLimits,
    security: Security,
    activity: Arc<activity::ActivityLog>,
    accepting: AtomicBool,
    handlers_loaded: AtomicBool,
}

/// Who may use the server: its bearer tokens and the `Host`/`Origin` policy.
#[derive(Debug, Clone)]
pub struct Security {
    /// Bearer tokens and their scopes.
    pub tokens: Tokens,
    /// Accepted `Host` and `Origin` values.
    pub browser: BrowserPolicy,
}

impl Security {
    /// The security settings of `config` for a server bound to `bound`.
    ///
    /// # Errors
    /// [`PolicyError`] naming the key of an invalid `allowed_hosts`/`allowed_origins` entry.
    pub fn from_config(
        config: &ServerConfig,
        bound: std::net::SocketAddr,
    ) -> Result<Security, PolicyError> {
        Ok(Security {
            tokens: Tokens {
                token: config.token.clone(),
                admin: config.admin_token.clone(),
                publish: config.publish_token.clone(),
                metrics: config.metrics_token.clone(),
            },
            browser: BrowserPolicy::new(bound, &config.allowed_hosts, &config.allowed_origins)?,
        })
    }
}

impl ServerConfig {
    /// Checks the `server` section: tokens are non-empty without whitespace,
    /// `allowed_hosts` and `allowed_origins` entries parse, WebSocket bounds are positive.
    ///
    /// # Errors
    /// [`InvalidValue`] naming the key.
    pub fn validate(&self) -> Result<(), InvalidValue> {
        check_config(self).map_err(|(key, reason)| InvalidValue::new(key, reason))?;
        let websocket = &self.websocket;
        eventbroker::config::require_positive([
            (
                "server.websocket.publish_rate",
                u64::from(websocket.publish_rate),
            ),
            (
                "server.websocket.publish_burst",
                u64::from(websocket.publish_burst),
            ),
            (
                "server.websocket.outbound_buffer",
                websocket.outbound_buffer as u64,
            ),
            (
                "server.websocket.max_subscriptions",
                websocket.max_subscriptions as u64,
            ),
            (
                "server.websocket.max_message_size",
                websocket.max_message_size.as_u64(),
            ),
        ])
    }
}

/// Checks the `server` section's security settings: tokens are non-empty without surrounding
/// whitespace, `allowed_hosts` and `allowed_origins` entries parse. The error names the key.
fn check_config(config: &ServerConfig) -> Result<(), (&'static str, String)> {
    let tokens = [
        ("server.token", &config.token),
        ("server.admin_token", &config.admin_token),
        ("server.publish_token", &config.publish_token),
        ("server.metrics_token", &config.metrics_token),
    ];
    for (key, token) in tokens {
        if let Some(token) = token {
            if token.is_empty() {
                return Err((
                    key,
                    "is empty (an unset ${VAR:-}?); set a value or remove the key".into(),
                ));
            }
            if token.trim() != token || token.contains(char::is_whitespace) {
                return Err((key, "must not contain whitespace".into()));
            }
        }
    }
    browser::check_config(&config.allowed_hosts, &config.allowed_origins)
}

/// Limits of the router.
#[derive(Debug, Clone, Copy)]
pub struct RouterLimits {
    /// Largest request body.
    pub body_limit: usize,
    /// Largest component upload.
    pub upload_limit: usize,
    /// Events in one batch.
    pub max_batch: usize,
    /// Keep-alive interval of the event stream.
    pub sse_keep_alive: Duration,
    /// Per-connection limits of WebSocket clients.
    pub websocket: ws::WsLimits,
}

impl Default for RouterLimits {
    fn default() -> Self {
        RouterLimits {
            body_limit: 2 << 20,
            upload_limit: 64 << 20,
            max_batch: 1000,
            sse_keep_alive: Duration::from_secs(15),
            websocket: ws::WsLimits::default(),
        }
    }
}

impl AppState {
    /// State over a broker and (for a full host) its WebAssembly handlers.
    pub fn new(
        broker: Broker,
        handlers: Option<HandlerSet>,
        limits: RouterLimits,
        security: Security,
    ) -> Self {
        AppState {
            inner: Arc::new(StateInner {
                activity: activity::ActivityLog::start(&broker),
                broker,
                handlers,
                limits,
                security,
                accepting: AtomicBool::new(true),
                handlers_loaded: AtomicBool::new(false),
            }),
        }
    }

    /// The broker.
    pub fn broker(&self) -> &Broker {
        &self.inner.broker
    }

    pub(crate) fn handlers(&self) -> Result<&HandlerSet, ApiError> {
        self.inner.handlers.as_ref().ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_IMPLEMENTED,
                "no_handlers",
                "this host runs without WebAssembly handlers",
            )
        })
    }

    pub(crate) fn activity(&self) -> &activity::ActivityLog {
        &self.inner.activity
    }

    pub(crate) fn limits(&self) -> &RouterLimits {
        &self.inner.limits
    }

    pub(crate) fn tokens(&self) -> &Tokens {
        &self.inner.security.tokens
    }

    pub(crate) fn browser(&self) -> &BrowserPolicy {
        &self.inner.security.browser
    }

    /// From now on, publish and admin routes answer 503 (the host is shutting down).
    pub fn stop_accepting(&self) {
        self.inner.accepting.store(false, Ordering::Release);
    }

    /// Marks the initial handler load as done (for `/readyz`).
    pub fn set_handlers_loaded(&self) {
        self.inner.handlers_loaded.store(true, Ordering::Release);
    }

    pub(crate) fn handlers_loaded(&self) -> bool {
        self.inner.handlers_loaded.load(Ordering::Acquire)
    }

    /// Whether publish and admin routes accept requests.
    pub fn is_accepting(&self) -> bool {
        self.inner.accepting.load(Ordering::Acquire)
    }
}

/// The full router.
pub fn router(state: AppState) -> Router {
    let limits = *state.limits();
    let guarded = |routes: Router<AppState>, access: Access| {
        routes.route_layer(middleware::from_fn_with_state(
            (state.clone(), access),
            auth::guard,
        ))
    };
    let read = Router::new()
        .route("/events", get(events::list))
        .route("/events/{id}", get(events::get))
        .route("/stats", get(events::stats))
        .route("/stats/history", get(activity::history))
        .route("/stream", get(stream::stream))
        .route("/handlers", get(handlers::list))
        .route("/handlers/{name}", get(handlers::get));
    let publish = Router::new()
        .route("/events", post(events::publish))
        .route("/events/batch", post(events::batch));
    let admin = Router::new()
        .route("/events/retry", post(events::retry_set))
        .route("/events/{id}/retry", post(events::retry))
        .route(
            "/handlers/{name}",
            axum::routing::put(handlers::deploy)
                .delete(handlers::remove)
                .layer(axum::extract::DefaultBodyLimit::max(limits.upload_limit)),
        )
        .route("/handlers/{name}/rollback", post(handlers::rollback))
        .route("/handlers/{name}/promote", post(handlers::promote))
        .route("/handlers/{name}/abort", post(handlers::abort));
    let v1 = guarded(read, Access::Read)
        .merge(guarded(publish, Access::Publish))
        .merge(guarded(admin, Access::Admin))
        // The WebSocket authenticates itself: browsers cannot set headers on it.
        .merge(Router::new().route("/ws", get(ws::ws)));
    Router::new()
        .route("/", get(page::page))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/openapi.json", get(openapi::openapi_json))
        .nest("/v1", v1)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(limits.body_limit))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            browser::guard,
        ))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            panic_response,
        ))
        .layer(
            tower_http::trace::TraceLayer::new_for_http()
                .make_span_with(trace::make_span::<axum::body::Body>),
        )
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this endpoint",
    )
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal error; see the host's log",
    )
    .into_response()
}

/// `Query` whose rejections are [`ApiError`]s.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

/// `Path` whose rejections are [`ApiError`]s.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

/// The raw body, size-limited, whose rejections are [`ApiError`]s.
pub struct ApiBody(pub axum::body::Bytes);

impl<S: Send + Sync> FromRequest<S> for ApiBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        axum::body::Bytes::from_request(request, state)
            .await
            .map(ApiBody)
            .map_err(ApiError::from)
    }
}
