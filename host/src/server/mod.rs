//! The HTTP API (axum), versioned under `/v1`.
//!
//! Every error is JSON `{"error": {"code", "message"}}` (see [`ApiError`]); no input makes the
//! server panic (a panic in a route is caught and answered with a 500).

mod error;
mod events;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::{FromRequest, FromRequestParts};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

pub use error::ApiError;

use crate::broker::Broker;

/// What the routes share.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<StateInner>,
}

struct StateInner {
    broker: Broker,
    accepting: AtomicBool,
}

impl AppState {
    /// State over a (started) broker.
    pub fn new(broker: Broker) -> Self {
        AppState {
            inner: Arc::new(StateInner {
                broker,
                accepting: AtomicBool::new(true),
            }),
        }
    }

    /// The broker.
    pub fn broker(&self) -> &Broker {
        &self.inner.broker
    }

    /// From now on, publishing endpoints answer 503 (the host is shutting down).
    pub fn stop_accepting(&self) {
        self.inner.accepting.store(false, Ordering::Release);
    }

    /// Whether publishing endpoints accept events.
    pub fn is_accepting(&self) -> bool {
        self.inner.accepting.load(Ordering::Acquire)
    }

    pub(crate) fn check_accepting(&self) -> Result<(), ApiError> {
        if self.is_accepting() {
            Ok(())
        } else {
            Err(ApiError::unavailable("host is shutting down"))
        }
    }
}

/// Limits of the router.
#[derive(Debug, Clone, Copy)]
pub struct RouterLimits {
    /// Largest request body.
    pub body_limit: usize,
}

/// The full router.
pub fn router(state: AppState, limits: RouterLimits) -> Router {
    let v1 = Router::new()
        .route("/events", get(events::list).post(events::publish))
        .route("/events/{id}", get(events::get));
    Router::new()
        .route("/healthz", get(healthz))
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

async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
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

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> axum::response::Response {
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
