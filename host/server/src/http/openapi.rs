//! The HTTP API as an OpenAPI 3.1 document, generated from the handlers' own annotations
//! (`utoipa`) and served at `GET /openapi.json`. Every error answer, on every route, is the
//! JSON envelope [`ErrorBody`]: the document says so with a `default` response.
//!
//! `.ci/run` checks the document against a live host with a property-based fuzzer
//! (schemathesis, `host/cli/tests/openapi.rs`): every response must match it, none may be a
//! 5xx.

use axum::Json;
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

/// Every error answer: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable machine-readable code, e.g. `invalid_event`, `not_found`, `unauthorized`.
    pub code: String,
    /// What went wrong and what to do, for a person.
    pub message: String,
}

/// The answer to an accepted, queued publish or retry.
#[derive(Debug, Serialize, ToSchema)]
pub struct Accepted {
    /// The event id.
    pub id: String,
    /// Always `pending`.
    pub status: String,
}

/// The answer of a batch: per item, in order, `{"id", "status"}` or `{"error": {...}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchResult {
    /// Items published.
    pub accepted: u64,
    /// Items refused.
    pub rejected: u64,
    /// One result per item.
    #[schema(value_type = Vec<Object>)]
    pub results: Vec<serde_json::Value>,
}

/// `GET /v1/handlers`.
#[derive(Debug, Serialize, ToSchema)]
pub struct HandlerList {
    /// The handlers, each as `GET /v1/handlers/{name}` gives it.
    #[schema(value_type = Vec<Object>)]
    pub handlers: Vec<serde_json::Value>,
}

/// The parts of a deploy (`PUT /v1/handlers/{name}` as `multipart/form-data`). The document's
/// description only: the handler reads the parts as a stream, not through this type.
#[allow(dead_code)]
#[derive(Debug, serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeployForm {
    /// The component (`.wasm`).
    #[schema(value_type = String, format = Binary)]
    pub component: Vec<u8>,
    /// The manifest (TOML text).
    pub manifest: Option<String>,
}

/// `/healthz` and `/readyz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok` (alive) or `ready`.
    pub status: String,
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "eventbroker",
        description = "An event broker host whose handlers are sandboxed WebAssembly components. \
            Tokens (server.token, admin_token, publish_token) are bearer tokens; on a loopback \
            host without tokens every route is open.",
        license(name = "Apache-2.0")
    ),
    paths(
        super::events::publish,
        super::events::batch,
        super::events::list,
        super::events::get,
        super::events::retry,
        super::events::retry_set,
        super::events::stats,
        super::activity::history,
        super::stream::stream,
        super::handlers::list,
        super::handlers::get,
        super::handlers::deploy,
        super::handlers::remove,
        super::handlers::rollback,
        super::handlers::promote,
        super::handlers::abort,
        super::ws::ws,
        super::health::healthz,
        super::health::readyz,
        super::health::metrics,
        super::page::page,
        openapi_json,
    ),
    components(schemas(
        ErrorBody,
        ErrorDetail,
        Accepted,
        BatchResult,
        HandlerList,
        DeployForm,
        super::handlers::RollbackBody,
        Health,
        super::activity::History,
        super::activity::Sample,
        eventbroker::broker::Activity,
        eventbroker::provider::SortOrder,
        eventbroker::config::ProcessingMode,
        eventbroker::event::EventSource,
        eventbroker::event::EventStatus
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "events", description = "Publish, query and retry events"),
        (name = "handlers", description = "Deploy, list and remove WebAssembly handlers"),
        (name = "operations", description = "Health, readiness, metrics, the console")
    )
)]
pub struct ApiDoc;

/// `GET /openapi.json`: this document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses(
        (status = 200, description = "The OpenAPI 3.1 document of this API", body = Object),
        (status = "default", description = "An error", body = ErrorBody)
    )
)]
pub async fn openapi_json() -> impl IntoResponse {
    Json(ApiDoc::openapi())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every route the router serves is in the document (and nothing else).
    #[test]
    fn the_document_lists_every_route() {
        let document = serde_json::to_value(ApiDoc::openapi()).expect("serializes");
        assert_eq!(document["openapi"], "3.1.0");
        let mut documented: Vec<String> = document["paths"]
            .as_object()
            .expect("paths")
            .iter()
            .flat_map(|(path, item)| {
                item.as_object()
                    .expect("path item")
                    .keys()
                    .map(move |method| format!("{} {path}", method.to_uppercase()))
            })
            .collect();
        documented.sort();
        let mut served: Vec<String> = [
            "GET /",
            "GET /healthz",
            "GET /readyz",
            "GET /metrics",
            "GET /openapi.json",
            "GET /v1/events",
            "POST /v1/events",
            "POST /v1/events/batch",
            "GET /v1/events/{id}",
            "POST /v1/events/{id}/retry",
            "POST /v1/events/retry",
            "GET /v1/stats",
            "GET /v1/stats/history",
            "GET /v1/stream",
            "GET /v1/handlers",
            "GET /v1/handlers/{name}",
            "PUT /v1/handlers/{name}",
            "DELETE /v1/handlers/{name}",
            "POST /v1/handlers/{name}/rollback",
            "POST /v1/handlers/{name}/promote",
            "POST /v1/handlers/{name}/abort",
            "GET /v1/ws",
        ]
        .map(str::to_owned)
        .to_vec();
        served.sort();
        assert_eq!(documented, served);
        // A payload is any JSON value (arrays, strings, numbers too), in events and drafts.
        for schema in ["Event", "EventDraft"] {
            let payload = &document["components"]["schemas"][schema]["properties"]["payload"];
            assert!(!payload.is_null(), "{schema} has a payload");
            assert!(
                !payload.to_string().contains("\"object\""),
                "{schema}.payload must admit any JSON value: {payload}"
            );
        }
        // Every operation documents its errors as the envelope.
        for (path, item) in document["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap() {
                let default = &operation["responses"]["default"];
                assert_eq!(
                    default["content"]["application/json"]["schema"]["$ref"],
                    "#/components/schemas/ErrorBody",
                    "{method} {path}"
                );
            }
        }
    }
}
