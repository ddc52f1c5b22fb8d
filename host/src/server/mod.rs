//! The HTTP API (axum), versioned under `/v1`.
//!
//! Every error is JSON `{"error": {"code", "message"}}` (see [`ApiError`]); no input makes the
//! server panic (a panic in a route is caught and answered with a 500) or hang (bodies are
//! size-limited; long requests are bounded by the handler timeouts behind them).
//!
//! Access: routes are grouped as read, publish and admin. Admin routes (deploy, remove,
//! re-run) need `Authorization: Bearer <server.admin_token>` when it is set; publish routes
//! need `server.publish_token` (or the admin token) when it is set; read routes need either
//! token as soon as one is configured. While the host shuts down, publish and admin routes
//! answer 503.

pub mod cloudevents;
mod error;
mod events;
mod handlers;
mod health;
mod page;
mod stream;
pub mod ws;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

pub use error::ApiError;

use crate::broker::Broker;
use crate::wasm::HandlerSet;

/// What the routes share.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<StateInner>,
}

struct StateInner {
    broker: Broker,
    handlers: Option<HandlerSet>,
    limits: RouterLimits,
    tokens: Tokens,
    accepting: AtomicBool,
    handlers_loaded: AtomicBool,
}

/// Bearer tokens guarding the API.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    /// Required by admin routes (and accepted everywhere).
    pub admin: Option<String>,
    /// Required by publish routes (and accepted by read routes).
    pub publish: Option<String>,
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
        tokens: Tokens,
    ) -> Self {
        AppState {
            inner: Arc::new(StateInner {
                broker,
                handlers,
                limits,
                tokens,
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

    pub(crate) fn limits(&self) -> &RouterLimits {
        &self.inner.limits
    }

    pub(crate) fn tokens(&self) -> &Tokens {
        &self.inner.tokens
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

/// Which group a route belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Publish,
    Admin,
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

fn matches(presented: Option<&str>, token: &Option<String>) -> bool {
    match (presented, token) {
        (Some(presented), Some(token)) => {
            constant_time_eq::constant_time_eq(presented.as_bytes(), token.as_bytes())
        }
        _ => false,
    }
}

fn authorize(tokens: &Tokens, headers: &HeaderMap, access: Access) -> Result<(), ApiError> {
    authorize_token(tokens, bearer(headers), access)
}

/// Checks a presented token (from a header, a query or a WebSocket subprotocol).
fn authorize_token(
    tokens: &Tokens,
    presented: Option<&str>,
    access: Access,
) -> Result<(), ApiError> {
    let admin = matches(presented, &tokens.admin);
    let allowed = match access {
        Access::Admin => tokens.admin.is_none() || admin,
        Access::Publish => tokens.publish.is_none() || admin || matches(presented, &tokens.publish),
        Access::Read => {
            (tokens.admin.is_none() && tokens.publish.is_none())
                || admin
                || matches(presented, &tokens.publish)
        }
    };
    if allowed {
        return Ok(());
    }
    let message = match (presented, access) {
        (None, _) => "this endpoint needs Authorization: Bearer <token>".to_owned(),
        (Some(_), Access::Admin) => "the admin token is required for this endpoint".to_owned(),
        (Some(_), _) => "the token is not valid for this endpoint".to_owned(),
    };
    Err(ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        message,
    ))
}

async fn guard(
    State((state, access)): State<(AppState, Access)>,
    request: Request,
    next: Next,
) -> Response {
    if let Err(error) = authorize(&state.inner.tokens, request.headers(), access) {
        let mut response = error.into_response();
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return response;
    }
    if access != Access::Read && !state.is_accepting() {
        return ApiError::unavailable("host is shutting down").into_response();
    }
    next.run(request).await
}

/// The full router.
pub fn router(state: AppState) -> Router {
    let limits = *state.limits();
    let guarded = |routes: Router<AppState>, access: Access| {
        routes.route_layer(middleware::from_fn_with_state(
            (state.clone(), access),
            guard,
        ))
    };
    let read = Router::new()
        .route("/events", get(events::list))
        .route("/events/{id}", get(events::get))
        .route("/stats", get(events::stats))
        .route("/stream", get(stream::stream))
        .route("/handlers", get(handlers::list))
        .route("/handlers/{name}", get(handlers::get));
    let publish = Router::new()
        .route("/events", post(events::publish))
        .route("/events/batch", post(events::batch));
    let admin = Router::new()
        .route("/events/{id}/retry", post(events::retry))
        .route(
            "/handlers/{name}",
            axum::routing::put(handlers::deploy)
                .delete(handlers::remove)
                .layer(axum::extract::DefaultBodyLimit::max(limits.upload_limit)),
        );
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
        .nest("/v1", v1)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(limits.body_limit))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            panic_response,
        ))
        .layer(tower_http::trace::TraceLayer::new_for_http())
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

/// `Json` whose rejections are [`ApiError`]s.
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(token: Option<&'static str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(token) = token {
            headers.insert(header::AUTHORIZATION, HeaderValue::from_static(token));
        }
        headers
    }

    #[test]
    fn tokens_guard_their_groups() {
        let open = Tokens::default();
        for access in [Access::Read, Access::Publish, Access::Admin] {
            assert!(authorize(&open, &headers(None), access).is_ok());
        }
        let tokens = Tokens {
            admin: Some("adm".into()),
            publish: Some("pub".into()),
        };
        let cases = [
            (None, Access::Read, false),
            (Some("Bearer pub"), Access::Read, true),
            (Some("Bearer adm"), Access::Read, true),
            (Some("Bearer pub"), Access::Publish, true),
            (Some("Bearer wrong"), Access::Publish, false),
            (Some("Bearer pub"), Access::Admin, false),
            (Some("Bearer adm"), Access::Admin, true),
            (Some("Basic adm"), Access::Admin, false),
        ];
        for (token, access, ok) in cases {
            assert_eq!(
                authorize(&tokens, &headers(token), access).is_ok(),
                ok,
                "{token:?} {access:?}"
            );
        }
        let admin_only = Tokens {
            admin: Some("adm".into()),
            publish: None,
        };
        assert!(authorize(&admin_only, &headers(None), Access::Publish).is_ok());
        assert!(authorize(&admin_only, &headers(None), Access::Admin).is_err());
        assert!(authorize(&admin_only, &headers(None), Access::Read).is_err());
    }
}
