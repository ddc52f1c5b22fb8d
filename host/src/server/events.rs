//! `/v1/events`: publish and query.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{ApiError, ApiJson, ApiPath, ApiQuery, AppState};
use crate::config::ProcessingMode;
use crate::event::{Event, EventDraft};
use crate::provider::EventFilter;

/// Query parameters of `POST /v1/events`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishQuery {
    /// `sync` waits for the handlers; `async` (the configured default) queues.
    pub mode: Option<ProcessingMode>,
}

/// `POST /v1/events`: 202 `{"id","status":"pending"}` when queued, 200 with the final event in
/// sync mode.
pub async fn publish(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<PublishQuery>,
    ApiJson(draft): ApiJson<EventDraft>,
) -> Result<Response, ApiError> {
    state.check_accepting()?;
    let broker = state.broker();
    let event = draft.into_event(broker.instance_id());
    match query.mode.unwrap_or(broker.config().mode) {
        ProcessingMode::Async => {
            let id = broker.publish_async(event).await?;
            Ok((
                StatusCode::ACCEPTED,
                Json(json!({"id": id, "status": "pending"})),
            )
                .into_response())
        }
        ProcessingMode::Sync => {
            let event = broker.publish_sync(event).await?;
            Ok((StatusCode::OK, Json(event)).into_response())
        }
    }
}

/// `GET /v1/events/{id}`.
pub async fn get(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Event>, ApiError> {
    state
        .broker()
        .provider()
        .get(&id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no event with id {id:?}")))
}

/// The body of `GET /v1/events`.
#[derive(Debug, Serialize, Deserialize)]
pub struct EventPage {
    /// The events of this page.
    pub events: Vec<Event>,
    /// Number of events on this page.
    pub count: usize,
    /// Page size applied.
    pub limit: usize,
    /// Offset applied.
    pub offset: usize,
}

/// `GET /v1/events?…`: every [`EventFilter`] field as a query parameter.
pub async fn list(
    State(state): State<AppState>,
    ApiQuery(filter): ApiQuery<EventFilter>,
) -> Result<Json<EventPage>, ApiError> {
    let events = state.broker().provider().list(&filter).await?;
    Ok(Json(EventPage {
        count: events.len(),
        limit: filter.effective_limit(),
        offset: filter.offset,
        events,
    }))
}
