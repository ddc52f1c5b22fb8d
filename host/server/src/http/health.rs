//! `/healthz`, `/readyz` and `/metrics`.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::auth::{Access, authorize, bearer, challenge};
use super::{ApiError, AppState};

/// How long `/readyz` waits for the provider.
const PROVIDER_CHECK: Duration = Duration::from_secs(2);

/// `GET /healthz`: the process is up.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    responses(
        (status = 200, description = "The process is alive", body = crate::http::openapi::Health),
        (status = "default", description = "An error, in the JSON envelope", body = crate::http::openapi::ErrorBody)
    )
)]
pub async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// `GET /readyz`: 200 when the provider answers, the initial handler load is done and the host
/// is not shutting down; 503 with the reason otherwise.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "Ready to take traffic", body = crate::http::openapi::Health),
        (status = "default", description = "An error, in the JSON envelope", body = crate::http::openapi::ErrorBody)
    )
)]
pub async fn readyz(State(state): State<AppState>) -> Result<Response, ApiError> {
    if !state.is_accepting() {
        return Err(ApiError::unavailable("host is shutting down"));
    }
    if !state.handlers_loaded() {
        return Err(ApiError::unavailable("handlers are still loading"));
    }
    match tokio::time::timeout(PROVIDER_CHECK, state.broker().provider().ping()).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => {
            return Err(ApiError::unavailable(format!(
                "provider unreachable: {error}"
            )));
        }
        Err(_) => {
            return Err(ApiError::unavailable(format!(
                "provider did not answer within {}",
                humantime::format_duration(PROVIDER_CHECK)
            )));
        }
    }
    if !state.broker().is_running().await {
        return Err(ApiError::unavailable("broker is not running"));
    }
    Ok((StatusCode::OK, Json(json!({"status": "ready"}))).into_response())
}

/// `GET /metrics`: Prometheus (OpenMetrics) text; needs `Authorization: Bearer
/// <server.metrics_token>` (or an admin-scope token) when `server.metrics_token` is set.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses(
        (status = 200, description = "Prometheus metrics (OpenMetrics text)", content_type = "application/openmetrics-text", body = String),
        (status = "default", description = "An error, in the JSON envelope", body = crate::http::openapi::ErrorBody)
    ),
    security((), ("bearer" = []))
)]
pub async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(error) = authorize(state.tokens(), bearer(&headers), Access::Metrics) {
        return challenge(error);
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.broker().metrics().encode(),
    )
        .into_response()
}
