//! Request spans of the HTTP trace layer, with secrets kept out of the logs: a `token` query
//! parameter (browsers pass the token that way to `GET /v1/ws` and to the page at `/`) is
//! recorded as `token=[redacted]`. Headers are never recorded.

use std::borrow::Cow;

use axum::http::{Request, Uri};
use tracing::Span;

/// The query parameter that carries a bearer token.
const TOKEN_PARAMETER: &str = "token";

/// The span of one request: method, path and query (token redacted), HTTP version.
pub(crate) fn make_span<B>(request: &Request<B>) -> Span {
    tracing::debug_span!(
        "request",
        method = %request.method(),
        uri = %redacted_uri(request.uri()),
        version = ?request.version(),
    )
}

/// Path and query of `uri`, each `token` parameter's value replaced by `[redacted]` (however
/// its name is percent-encoded).
pub(crate) fn redacted_uri(uri: &Uri) -> Cow<'_, str> {
    let Some(query) = uri.query() else {
        return Cow::Borrowed(uri.path());
    };
    let is_token = |pair: &str| {
        let name = pair.split('=').next().unwrap_or_default();
        serde_urlencoded::from_str::<Vec<(String, String)>>(name)
            .ok()
            .and_then(|pairs| pairs.into_iter().next())
            .is_some_and(|(decoded, _)| decoded == TOKEN_PARAMETER)
    };
    if !query.split('&').any(is_token) {
        return uri
            .path_and_query()
            .map_or(Cow::Borrowed(uri.path()), |pq| Cow::Borrowed(pq.as_str()));
    }
    let redacted: Vec<&str> = query
        .split('&')
        .map(|pair| {
            if is_token(pair) {
                "token=[redacted]"
            } else {
                pair
            }
        })
        .collect();
    Cow::Owned(format!("{}?{}", uri.path(), redacted.join("&")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_in_queries_are_redacted() {
        let cases = [
            ("/v1/ws?token=s3cret", "/v1/ws?token=[redacted]"),
            ("/?demo=a.b&token=s3cret", "/?demo=a.b&token=[redacted]"),
            ("/v1/ws?%74oken=s3cret&x=1", "/v1/ws?token=[redacted]&x=1"),
            (
                "/v1/ws?token=a&token=b",
                "/v1/ws?token=[redacted]&token=[redacted]",
            ),
            ("/v1/events?type=a.b&limit=2", "/v1/events?type=a.b&limit=2"),
            ("/v1/events?tokens=1", "/v1/events?tokens=1"),
            ("/healthz", "/healthz"),
        ];
        for (uri, expected) in cases {
            let uri: Uri = uri.parse().unwrap();
            assert_eq!(redacted_uri(&uri), expected, "{uri}");
        }
    }
}
