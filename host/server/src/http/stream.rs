//! `GET /v1/stream?pattern=…`: Server-Sent Events of events as they are published and as their
//! status changes. Each message has `event: <status>`, `id: <event id>` and the event as JSON
//! `data`. A watcher too slow to keep up receives `event: error` with the reason and the stream
//! ends (reconnect to continue); it is never silently skipped ahead.
//!
//! Memory held for a client that stops reading is bounded: the provider's watcher holds at
//! most `watcher_buffer` events and cuts itself when it would hold more, and hyper writes the
//! response through a bounded buffer, polling the stream only as the socket drains.

use std::convert::Infallible;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures::{Stream, StreamExt};
use serde::Deserialize;

use super::{ApiError, ApiQuery, AppState};
use eventbroker::pattern::Pattern;

/// Query parameters of `GET /v1/stream`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    /// Which event types to follow (default `*`, everything).
    pub pattern: Option<Pattern>,
}

/// `GET /v1/stream`.
#[utoipa::path(
    get,
    path = "/v1/stream",
    tag = "events",
    params(("pattern" = Option<String>, Query, description = "Event types to follow (default `*`)")),
    responses(
        (status = 200, description = "Server-Sent Events: `event: <status>`, `id: <event id>`, the event as JSON data", content_type = "text/event-stream", body = String),
        (status = "default", description = "An error, in the JSON envelope", body = crate::http::openapi::ErrorBody)
    ),
    security((), ("bearer" = []))
)]
pub async fn stream(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<StreamQuery>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let pattern = match query.pattern {
        Some(pattern) => pattern,
        None => Pattern::new("*").map_err(eventbroker::broker::BrokerError::from)?,
    };
    let events = state.broker().provider().stream(&pattern).await?;
    let messages = events.map(|item| {
        let message = match item {
            Ok(event) => {
                let message = SseEvent::default()
                    .event(event.status.as_str())
                    .id(event.id.clone());
                message.json_data(&event).unwrap_or_else(|_| {
                    SseEvent::default().event("error").data("unencodable event")
                })
            }
            Err(error) => SseEvent::default().event("error").data(error.to_string()),
        };
        Ok(message)
    });
    Ok(Sse::new(messages).keep_alive(KeepAlive::new().interval(state.limits().sse_keep_alive)))
}
