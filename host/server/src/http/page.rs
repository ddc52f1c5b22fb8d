//! `GET /`: a small live view of the host — events as they happen (over the WebSocket),
//! the handlers and a publish form. One static HTML file embedded in the binary; it reads an
//! optional `?token=` for authenticated hosts and `?demo=TYPE` to publish one event on load.

use axum::response::Html;

/// The page.
#[utoipa::path(
    get,
    path = "/",
    tag = "operations",
    responses(
        (status = 200, description = "The operator page", content_type = "text/html", body = String),
        (status = "default", description = "An error, in the JSON envelope", body = crate::http::openapi::ErrorBody)
    )
)]
pub async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}
