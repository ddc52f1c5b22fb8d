//! `/v1/handlers`: list, deploy (component plus manifest in one request; a canary with
//! `?canary=PERCENT`), remove; in a cluster also rollback, and promote or abort a canary.

use axum::Json;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use serde::Deserialize;

use super::{ApiError, ApiPath, ApiQuery, AppState};
use eventbroker_wasm::{DeployOptions, HandlerInfo};

/// Query parameters of `PUT /v1/handlers/{name}`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeployQuery {
    /// Deploy as a canary receiving this percentage (1-99, an optional `%` suffix) of the
    /// handler's events, chosen by a stable hash of the event id; needs a cluster handler
    /// store.
    pub canary: Option<String>,
}

/// The canary share of `?canary=`, `10` or `10%`.
fn canary_share(text: &str) -> Result<u8, ApiError> {
    text.trim()
        .trim_end_matches('%')
        .parse::<u8>()
        .ok()
        .filter(|n| (1..=99).contains(n))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                format!("canary={text:?} is not a share from 1% to 99% (e.g. canary=10%)"),
            )
        })
}

/// The body of `POST /v1/handlers/{name}/rollback` (optional).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackBody {
    /// The release to return to: `#N`, `N`, or a prefix (4+ characters) of its component
    /// hash. Default: the release before the stable one.
    pub to: Option<String>,
}

/// `GET /v1/handlers`.
#[utoipa::path(
    get,
    path = "/v1/handlers",
    tag = "handlers",
    responses(
        (status = 200, description = "Every handler with its version, limits, counters and last rejection", body = crate::http::openapi::HandlerList),
        (status = "default", description = "An error, in the JSON envelope", body = crate::http::openapi::ErrorBody)
    ),
    security((), ("bearer" = []))
)]
pub async fn list(State(state): State<AppState>) -> Result<Response, ApiError> {
    let handlers = state.handlers()?.list();
    Ok(Json(json!({"handlers": handlers})).into_response())
}

/// `GET /v1/handlers/{name}`.
#[utoipa::path(
    get,
    path = "/v1/handlers/{name}",
    tag = "handlers",
    params(("name" = String, Path, description = "Handler name", pattern = "^[A-Za-z0-9_-]{1,64}$")),
    responses(
        (status = 200, description = "The handler", body = Object),
        (status = "default", description = "An error, in the JSON envelope", body = crate::http::openapi::ErrorBody)
    ),
    security((), ("bearer" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<HandlerInfo>, ApiError> {
    state
        .handlers()?
        .get(&name)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no handler named {name:?}")))
}

/// `PUT /v1/handlers/{name}`: deploys a component, either as `multipart/form-data` with a
/// `component` part and an optional `manifest` part (TOML), or as the bare component with
/// `Content-Type: application/wasm`. The version is compiled and checked first; a rejected
/// upload answers 422 with the reason and the previous version keeps serving. On success the
/// files are written to the handlers directory (so the deploy survives a restart) and the new
/// version serves every later event.
#[utoipa::path(
    put,
    path = "/v1/handlers/{name}",
    tag = "handlers",
    params(("name" = String, Path, description = "Handler name: 1-64 letters, digits, `-` or `_`", pattern = "^[A-Za-z0-9_-]{1,64}$"), DeployQuery),
    request_body(
        description = "The component (and optionally its TOML manifest as a `manifest` part)",
        content(
            (crate::http::openapi::DeployForm = "multipart/form-data"),
            (Vec<u8> = "application/wasm")
        )
    ),
    responses(
        (status = 200, description = "Deployed: the handler as now serving", body = Object),
        (status = "default", description = "An error, in the JSON envelope", body = crate::http::openapi::ErrorBody)
    ),
    security((), ("bearer" = []))
)]
pub async fn deploy(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<DeployQuery>,
    request: Request,
) -> Result<Json<HandlerInfo>, ApiError> {
    let handlers = state.handlers()?.clone();
    let options = DeployOptions {
        canary: query.canary.as_deref().map(canary_share).transpose()?,
    };
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let (component, manifest) = if content_type.starts_with("application/wasm") {
        let super::ApiBody(body) = super::ApiBody::from_request(request, &state).await?;
        (body.to_vec(), None)
    } else {
        let mut multipart = Multipart::from_request(request, &state).await?;
        let mut component = None;
        let mut manifest = None;
        while let Some(field) = multipart.next_field().await? {
            match field.name() {
                Some("component") => component = Some(field.bytes().await?.to_vec()),
                Some("manifest") => {
                    let bytes = field.bytes().await?;
                    let text = String::from_utf8(bytes.to_vec()).map_err(|_| {
                        ApiError::new(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            "handler_rejected",
                            "invalid manifest: not UTF-8 text",
                        )
                    })?;
                    manifest = Some(text);
                }
                other => {
                    return Err(ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "invalid_body",
                        format!(
                            "unexpected form part {:?}; expected `component` and optionally `manifest`",
                            other.unwrap_or("")
                        ),
                    ));
                }
            }
        }
        let component = component.ok_or_else(|| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_body",
                "the form has no `component` part",
            )
        })?;
        (component, manifest)
    };
    let info = handlers
        .deploy_with(&name, component, manifest.as_deref(), options)
        .await?;
    Ok(Json(info))
}

/// `POST /v1/handlers/{name}/rollback`: makes an earlier release stable again on every host
/// of the cluster (ending any canary).
#[utoipa::path(
    post,
    path = "/v1/handlers/{name}/rollback",
    tag = "handlers",
    params(("name" = String, Path, description = "Handler name", pattern = "^[A-Za-z0-9_-]{1,64}$")),
    request_body(content = Option<RollbackBody>, description = "The release to return to (default: the one before the stable release)"),
    responses(
        (status = 200, description = "The handler after the rollback", body = Object),
        (status = "default", description = "An error, in the JSON envelope", body = crate::http::openapi::ErrorBody)
    ),
    security((), ("bearer" = []))
)]
pub async fn rollback(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    super::ApiBody(body): super::ApiBody,
) -> Result<Json<HandlerInfo>, ApiError> {
    let body: RollbackBody = if body.iter().all(u8::is_ascii_whitespace) {
        RollbackBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                format!("invalid rollback body: {e}; expected {{\"to\": \"#N\"}} or nothing"),
            )
        })?
    };
    let info = state
        .handlers()?
        .rollback(&name, body.to.as_deref())
        .await?;
    Ok(Json(info))
}

/// `POST /v1/handlers/{name}/promote`: makes the running canary the stable release now.
#[utoipa::path(
    post,
    path = "/v1/handlers/{name}/promote",
    tag = "handlers",
    params(("name" = String, Path, description = "Handler name", pattern = "^[A-Za-z0-9_-]{1,64}$")),
    responses(
        (status = 200, description = "The handler, its canary promoted", body = Object),
        (status = "default", description = "An error, in the JSON envelope", body = crate::http::openapi::ErrorBody)
    ),
    security((), ("bearer" = []))
)]
pub async fn promote(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<HandlerInfo>, ApiError> {
    Ok(Json(state.handlers()?.end_canary(&name, true).await?))
}

/// `POST /v1/handlers/{name}/abort`: ends the running canary; the stable release serves
/// every event again.
#[utoipa::path(
    post,
    path = "/v1/handlers/{name}/abort",
    tag = "handlers",
    params(("name" = String, Path, description = "Handler name", pattern = "^[A-Za-z0-9_-]{1,64}$")),
    responses(
        (status = 200, description = "The handler, its canary aborted", body = Object),
        (status = "default", description = "An error, in the JSON envelope", body = crate::http::openapi::ErrorBody)
    ),
    security((), ("bearer" = []))
)]
pub async fn abort(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<HandlerInfo>, ApiError> {
    Ok(Json(state.handlers()?.end_canary(&name, false).await?))
}

/// `DELETE /v1/handlers/{name}`: unsubscribes the handler, waits for its running invocations,
/// and deletes its files. 204 when done.
#[utoipa::path(
    delete,
    path = "/v1/handlers/{name}",
    tag = "handlers",
    params(("name" = String, Path, description = "Handler name", pattern = "^[A-Za-z0-9_-]{1,64}$")),
    responses(
        (status = 204, description = "Removed, after its running invocations finished"),
        (status = "default", description = "An error, in the JSON envelope", body = crate::http::openapi::ErrorBody)
    ),
    security((), ("bearer" = []))
)]
pub async fn remove(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Response, ApiError> {
    state.handlers()?.undeploy(&name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
