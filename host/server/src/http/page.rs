//! `GET /`: the operator console — recent events with filters and paging, an event's detail
//! (payload, metadata, per-handler outcomes with the log lines of failed attempts, its cause
//! and derived events), retry of one event or a filtered set, the dead letters, the handlers
//! with their counters and percentiles, deploy and remove, and a chart of this host's rates
//! and queue depth. One static HTML file (plain DOM and `fetch`, no build step) embedded in
//! the binary; everything it shows comes from the `/v1` API, live updates from `/v1/ws`.
//! Token-protected calls ask for the token (kept in the tab's sessionStorage; `?token=`
//! also works).

use axum::response::Html;

/// The page.
#[utoipa::path(
    get,
    path = "/",
    tag = "operations",
    responses(
        (status = 200, description = "The operator console", content_type = "text/html", body = String),
        (status = "default", description = "An error, in the JSON envelope", body = crate::http::openapi::ErrorBody)
    )
)]
pub async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}
