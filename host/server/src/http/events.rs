//! `/v1/events` and `/v1/stats`: publish (JSON, CloudEvents structured or binary, batches),
//! query, re-run.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::auth::{Caller, check_claims};
use super::cloudevents;
use super::{ApiBody, ApiError, ApiPath, ApiQuery, AppState};
use eventbroker::broker::{BrokerStats, Published};
use eventbroker::config::ProcessingMode;
use eventbroker::event::{Event, EventDraft, EventStatus};
use eventbroker::provider::EventFilter;

/// Query parameters of `POST /v1/events`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishQuery {
    /// `sync` waits for the handlers; `async` (the configured default) queues.
    pub mode: Option<ProcessingMode>,
}

/// Event ids the API could not address: `/v1/events/{id}` would be another endpoint.
pub(crate) const RESERVED_IDS: [&str; 2] = ["batch", "retry"];

/// Refuses an id chosen by a publisher that `GET /v1/events/{id}` could never reach.
pub(crate) fn check_addressable_id(draft: &EventDraft) -> Result<(), ApiError> {
    match draft.id.as_deref() {
        Some(id) if RESERVED_IDS.contains(&id) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_event",
            format!("invalid id: {id:?} is reserved (/v1/events/{id} is another endpoint)"),
        )),
        _ => Ok(()),
    }
}

fn content_type(headers: &HeaderMap) -> &str {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::trim)
        .unwrap_or("")
}

/// Parses JSON, telling malformed JSON (400) from a valid document of the wrong shape (422).
fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|error| {
        if error.is_data() {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_event",
                format!("invalid {what}: {error}"),
            )
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("malformed JSON: {error}"),
            )
        }
    })
}

/// Reads the event of a publish request in whichever form it came.
fn read_draft(headers: &HeaderMap, body: &[u8]) -> Result<EventDraft, ApiError> {
    if headers.contains_key("ce-specversion") {
        return cloudevents::from_binary(headers, body);
    }
    match content_type(headers) {
        "application/json" => parse_json(body, "event"),
        cloudevents::STRUCTURED => {
            let object: serde_json::Map<String, Value> = parse_json(body, "CloudEvent")?;
            cloudevents::from_structured(object)
        }
        "" => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "missing Content-Type: use application/json, application/cloudevents+json, or CloudEvents binary mode (ce-* headers)",
        )),
        other => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "Content-Type {other:?} is not supported: use application/json, application/cloudevents+json, or CloudEvents binary mode (ce-* headers)"
            ),
        )),
    }
}

/// `POST /v1/events`: 202 `{"id","status":"pending"}` when queued, 200 with the final event in
/// sync mode (`?mode=sync`, or `event_broker.mode: sync`). A sync request only waits: a
/// client that gives up does not affect the event's processing (see [`crate::broker`]). A
/// publisher without a token may not set `user_id` or source `database` or `internal` (403
/// `forbidden`).
#[utoipa::path(
    post,
    path = "/v1/events",
    tag = "events",
    params(("mode" = Option<eventbroker::config::ProcessingMode>, Query, description = "`sync` waits for the handlers; default `event_broker.mode`")),
    request_body(
        description = "An event; a structured CloudEvent; a CloudEvents batch; or binary mode (`ce-*` headers, the data as the body)",
        content(
            (eventbroker::event::EventDraft = "application/json"),
            (Object = "application/cloudevents+json"),
            (Vec<Object> = "application/cloudevents-batch+json")
        )
    ),
    responses(
        (status = 202, description = "Queued", body = crate::http::openapi::Accepted),
        (status = 200, description = "Sync mode: the final event. A CloudEvents batch: the batch result", body = Object),
        (status = "default", description = "An error, in the JSON envelope", body = crate::http::openapi::ErrorBody)
    ),
    security((), ("bearer" = []))
)]
pub async fn publish(
    State(state): State<AppState>,
    Caller(scope): Caller,
    ApiQuery(query): ApiQuery<PublishQuery>,
    headers: HeaderMap,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    // A CloudEvents batch is accepted where single CloudEvents are (the HTTP binding's one
    // endpoint), with the answer of `POST /v1/events/batch`.
    if content_type(&headers) == cloudevents::BATCH && !headers.contains_key("ce-specversion") {
        return publish_batch(&state, scope, true, &headers, &body).await;
    }
    let draft = read_draft(&headers, &body)?;
    check_claims(&draft, scope)?;
    check_addressable_id(&draft)?;
    let broker = state.broker();
    let mut event = draft.into_event(broker.instance_id());
    carry_trace_context(&headers, &mut event.metadata);
    let mode = query.mode.unwrap_or(broker.config().mode);
    Ok(match broker.publish_with_mode(mode, event).await? {
        Published::Queued(id) => (
            StatusCode::ACCEPTED,
            Json(json!({"id": id, "status": "pending"})),
        )
            .into_response(),
        Published::Processed(event) => (StatusCode::OK, Json(event)).into_response(),
    })
}

/// Copies the request's W3C `traceparent`/`tracestate` headers into an event that carries no
/// trace context of its own (see [`eventbroker::trace_context`]).
fn carry_trace_context(headers: &HeaderMap, metadata: &mut serde_json::Map<String, Value>) {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(parent) = header("traceparent") {
        eventbroker::trace_context::carry(metadata, parent, header("tracestate"));
    }
}

/// `POST /v1/events/batch`: a JSON array of events (or of structured CloudEvents with
/// `Content-Type: application/cloudevents-batch+json`), each published on its own; the answer
/// lists, in order, `{"id","status":"pending"}` or `{"error":{"code","message"}}` per item
/// (an item claiming what its publisher may not claim is refused like `POST /v1/events`).
#[utoipa::path(
    post,
    path = "/v1/events/batch",
    tag = "events",
    request_body(
        description = "Events, each published on its own",
        content(
            (Vec<eventbroker::event::EventDraft> = "application/json"),
            (Vec<Object> = "application/cloudevents-batch+json")
        )
    ),
    responses(
        (status = 200, description = "Every item's outcome, in order", body = crate::http::openapi::BatchResult),
        (status = "default", description = "An error, in the JSON envelope", body = crate::http::openapi::ErrorBody)
    ),
    security((), ("bearer" = []))
)]
pub async fn batch(
    State(state): State<AppState>,
    Caller(scope): Caller,
    headers: HeaderMap,
    ApiBody(body): ApiBody,
) -> Result<Response, ApiError> {
    let cloudevents = match content_type(&headers) {
        "application/json" => false,
        cloudevents::BATCH => true,
        other => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!(
                    "Content-Type {other:?} is not supported: use application/json (an array of events) or application/cloudevents-batch+json"
                ),
            ));
        }
    };
    publish_batch(&state, scope, cloudevents, &headers, &body).await
}

/// Publishes each item of a batch on its own; the answer lists every item's outcome in order.
async fn publish_batch(
    state: &AppState,
    scope: super::auth::Scope,
    cloudevents: bool,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    let items: Vec<Value> = parse_json(body, "batch (expected a JSON array)")?;
    let limit = state.limits().max_batch;
    if items.len() > limit {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_large",
            format!("{} events in one batch; the limit is {limit}", items.len()),
        ));
    }
    let broker = state.broker();
    let mut results = Vec::with_capacity(items.len());
    let (mut accepted, mut rejected) = (0, 0);
    for (index, item) in items.into_iter().enumerate() {
        let draft = if cloudevents {
            match item {
                Value::Object(object) => cloudevents::from_structured(object),
                _ => Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_cloudevent",
                    "batch items must be JSON objects",
                )),
            }
        } else {
            serde_json::from_value::<EventDraft>(item).map_err(|e| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_event",
                    format!("item {index}: {e}"),
                )
            })
        };
        let checked = draft.and_then(|draft| {
            check_claims(&draft, scope)?;
            check_addressable_id(&draft)?;
            Ok(draft)
        });
        let outcome = match checked {
            Ok(draft) => {
                let mut event = draft.into_event(broker.instance_id());
                carry_trace_context(headers, &mut event.metadata);
                broker.publish_async(event).await.map_err(ApiError::from)
            }
            Err(error) => Err(error),
        };
        match outcome {
            Ok(id) => {
                accepted += 1;
                results.push(json!({"id": id, "status": "pending"}));
            }
            Err(error) => {
                rejected += 1;
                results.push(json!({"error": {"code": error.code, "message": error.message}}));
            }
        }
    }
    Ok((
        StatusCode::OK,
        Json(json!({"accepted": accepted, "rejected": rejected, "results": results})),
    )
        .into_response())
}

/// `GET /v1/events/{id}`: the event as JSON, or as a structured CloudEvent when the request
/// accepts `application/cloudevents+json`.
#[utoipa::path(
    get,
    path = "/v1/events/{id}",
    tag = "events",
    params(("id" = String, Path, description = "Event id")),
    responses(
        (status = 200, description = "The event (a structured CloudEvent with `Accept: application/cloudevents+json`)",
            content((eventbroker::event::Event = "application/json"), (Object = "application/cloudevents+json"))),
        (status = "default", description = "An error, in the JSON envelope", body = crate::http::openapi::ErrorBody)
    ),
    security((), ("bearer" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let event = state
        .broker()
        .provider()
        .get(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no event with id {id:?}")))?;
    let wants_cloudevent = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains(cloudevents::STRUCTURED));
    if wants_cloudevent {
        return Ok((
            [(header::CONTENT_TYPE, cloudevents::STRUCTURED)],
            Json(cloudevents::to_structured(&event)),
        )
            .into_response());
    }
    Ok(Json(event).into_response())
}

/// The body of `GET /v1/events`.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
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
#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "events",
    params(eventbroker::provider::EventFilter),
    responses(
        (status = 200, description = "A page of events, newest first unless `order=asc`", body = EventPage),
        (status = "default", description = "An error, in the JSON envelope", body = crate::http::openapi::ErrorBody)
    ),
    security((), ("bearer" = []))
)]
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

/// `POST /v1/events/{id}/retry`: re-runs a finished event (handlers that succeeded are not run
/// again). 202 when queued.
#[utoipa::path(
    post,
    path = "/v1/events/{id}/retry",
    tag = "events",
    params(("id" = String, Path, description = "Event id")),
    responses(
        (status = 202, description = "Queued again; handlers that succeeded are not run again", body = crate::http::openapi::Accepted),
        (status = "default", description = "An error, in the JSON envelope", body = crate::http::openapi::ErrorBody)
    ),
    security((), ("bearer" = []))
)]
pub async fn retry(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    state.broker().retry_event(&id).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"id": id, "status": "pending"})),
    )
        .into_response())
}

/// The answer of `POST /v1/events/retry`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RetriedSet {
    /// Events queued again.
    pub retried: usize,
    /// Events that could not be retried (each with its error in `results`).
    pub refused: usize,
    /// One result per event: `{"id", "status": "pending"}` or `{"id", "error": {...}}`.
    #[schema(value_type = Vec<Object>)]
    pub results: Vec<Value>,
    /// Whether more failed events may match: the page was full. Retried events leave
    /// `failed`, so calling again with the same filter continues with the next ones.
    pub more: bool,
}

/// `POST /v1/events/retry?…`: re-runs a filtered set of failed events (the filters of
/// `GET /v1/events`; `status` may be left out and can only be `failed`), at most `limit`
/// (default 100, at most 1000) per call.
#[utoipa::path(
    post,
    path = "/v1/events/retry",
    tag = "events",
    params(eventbroker::provider::EventFilter),
    responses(
        (status = 200, description = "Each matching failed event retried, or why not", body = RetriedSet),
        (status = "default", description = "An error, in the JSON envelope", body = crate::http::openapi::ErrorBody)
    ),
    security((), ("bearer" = []))
)]
pub async fn retry_set(
    State(state): State<AppState>,
    ApiQuery(mut filter): ApiQuery<EventFilter>,
) -> Result<Json<RetriedSet>, ApiError> {
    match filter.status {
        None | Some(EventStatus::Failed) => filter.status = Some(EventStatus::Failed),
        Some(other) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_query",
                format!(
                    "status={} cannot be retried: only failed events are (leave status out)",
                    other.as_str()
                ),
            ));
        }
    }
    let broker = state.broker();
    let events = broker.provider().list(&filter).await?;
    let more = events.len() == filter.effective_limit();
    let mut set = RetriedSet {
        retried: 0,
        refused: 0,
        results: Vec::with_capacity(events.len()),
        more,
    };
    for event in events {
        match broker.retry_event(&event.id).await.map_err(ApiError::from) {
            Ok(()) => {
                set.retried += 1;
                set.results
                    .push(json!({"id": event.id, "status": "pending"}));
            }
            Err(error) => {
                set.refused += 1;
                let mut item = error.body();
                item["id"] = json!(event.id);
                set.results.push(item);
            }
        }
    }
    Ok(Json(set))
}

/// `GET /v1/stats`.
#[utoipa::path(
    get,
    path = "/v1/stats",
    tag = "events",
    responses(
        (status = 200, description = "Counters of the broker, its subscriptions and its provider", body = Object),
        (status = "default", description = "An error, in the JSON envelope", body = crate::http::openapi::ErrorBody)
    ),
    security((), ("bearer" = []))
)]
pub async fn stats(State(state): State<AppState>) -> Result<Json<BrokerStats>, ApiError> {
    Ok(Json(state.broker().stats().await?))
}
