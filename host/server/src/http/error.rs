//! API errors: every failure is JSON `{"error": {"code", "message"}}` with a stable code and
//! the matching HTTP status.

use axum::extract::multipart::{MultipartError, MultipartRejection};
use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use eventbroker::broker::BrokerError;
use eventbroker::provider::ProviderError;
use eventbroker_wasm::WasmError;

/// An error response of the HTTP API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code, e.g. `invalid_event`.
    pub code: &'static str,
    /// Human-readable explanation.
    pub message: String,
}

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 503 `unavailable`: the host is shutting down or not ready.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// The JSON envelope `{"error": {"code", "message"}}` every error response carries.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"code": self.code, "message": self.message}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.body();
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let message = rejection.body_text();
        match rejection {
            JsonRejection::MissingJsonContentType(_) => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "expected Content-Type: application/json",
            ),
            JsonRejection::JsonSyntaxError(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", message)
            }
            JsonRejection::JsonDataError(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_event", message)
            }
            JsonRejection::BytesRejection(_)
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE =>
            {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", message)
            }
            other => ApiError::new(other.status(), "invalid_body", message),
        }
    }
}

impl From<BytesRejection> for ApiError {
    fn from(rejection: BytesRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                "request body is larger than the configured limit",
            )
        } else {
            ApiError::new(rejection.status(), "invalid_body", rejection.body_text())
        }
    }
}

impl From<MultipartRejection> for ApiError {
    fn from(rejection: MultipartRejection) -> Self {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "{}; send multipart/form-data with a `component` part (and an optional `manifest` part), or the component alone as application/wasm",
                rejection.body_text()
            ),
        )
    }
}

impl From<MultipartError> for ApiError {
    fn from(error: MultipartError) -> Self {
        let status = error.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "body_too_large"
        } else {
            "invalid_body"
        };
        ApiError::new(status, code, error.body_text())
    }
}

impl From<WasmError> for ApiError {
    fn from(error: WasmError) -> Self {
        let message = error.to_string();
        match error {
            WasmError::NotFound(_) | WasmError::NoRelease(_) => ApiError::not_found(message),
            WasmError::Conflict(_) => ApiError::new(StatusCode::CONFLICT, "conflict", message),
            WasmError::Store(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                message,
            ),
            WasmError::Io(_) | WasmError::Engine(_) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
            }
            _ => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "handler_rejected",
                message,
            ),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            rejection.body_text(),
        )
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_path",
            rejection.body_text(),
        )
    }
}

impl From<BrokerError> for ApiError {
    fn from(error: BrokerError) -> Self {
        let message = error.to_string();
        match error {
            BrokerError::Invalid(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_event", message)
            }
            BrokerError::Pattern(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_pattern", message)
            }
            BrokerError::NotRunning | BrokerError::Stopped | BrokerError::NoDefaultBroker => {
                ApiError::unavailable(message)
            }
            BrokerError::QueueFull(_) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", message)
            }
            BrokerError::StoppedBeforeFinished(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unfinished", message)
            }
            BrokerError::CausationTooDeep(_) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "causation_too_deep",
                message,
            ),
            BrokerError::UnknownSubscription(_) | BrokerError::UnknownSubscriptionName(_) => {
                ApiError::not_found(message)
            }
            BrokerError::DuplicateName(_) | BrokerError::AlreadyRunning => {
                ApiError::new(StatusCode::CONFLICT, "conflict", message)
            }
            BrokerError::Provider(provider) => provider.into(),
            BrokerError::Config(_) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "invalid_config", message)
            }
        }
    }
}

impl From<ProviderError> for ApiError {
    fn from(error: ProviderError) -> Self {
        let message = error.to_string();
        match error {
            ProviderError::Duplicate(_) => {
                ApiError::new(StatusCode::CONFLICT, "duplicate_id", message)
            }
            ProviderError::NotFound(_) => ApiError::not_found(message),
            ProviderError::InvalidState { .. } => {
                ApiError::new(StatusCode::CONFLICT, "invalid_state", message)
            }
            ProviderError::Full(_) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", message)
            }
            ProviderError::Closed => ApiError::unavailable(message),
            ProviderError::Lagged(_) => ApiError::new(StatusCode::GONE, "lagged", message),
            ProviderError::Config { .. } => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "provider_misconfigured",
                message,
            ),
            ProviderError::Backend { .. } => {
                ApiError::new(StatusCode::BAD_GATEWAY, "provider_error", message)
            }
        }
    }
}
