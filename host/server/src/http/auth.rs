//! Who may do what: bearer tokens and their scopes, the route guard, and what a publisher who
//! presented no token may claim about an event.
//!
//! Scopes: `server.token` and `server.admin_token` grant **admin** (everything);
//! `server.publish_token` grants **publish** (publishing and reading). A host with none of the
//! three is *open*: every route answers without a token (`serve` allows that only on a loopback
//! address, or with `server.allow_unauthenticated`). As soon as one is set, every `/v1` route
//! needs a valid token, and admin routes (deploy, remove, re-run) need an admin-scope token —
//! with only `publish_token` set they are refused. `server.metrics_token`, when set, guards
//! `/metrics` (an admin-scope token works too).
//!
//! Whoever published without a token (possible only on an open host) may not set `user_id` or
//! the privileged sources `database` and `internal`: those claim an identity, or that the event
//! came from the database or from a handler, and handlers may trust them.

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState};
use eventbroker::event::{EventDraft, EventSource};

/// Bearer tokens guarding the API (the `server` section's `token`, `admin_token`,
/// `publish_token` and `metrics_token`).
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    /// One token for every route (admin scope).
    pub token: Option<String>,
    /// Admin scope: deploy, remove, re-run, and everything publish scope may do.
    pub admin: Option<String>,
    /// Publish scope: publishing and reading.
    pub publish: Option<String>,
    /// Guards `/metrics` when set (admin-scope tokens work too).
    pub metrics: Option<String>,
}

impl Tokens {
    /// Whether any of `token`, `admin_token` or `publish_token` is set: then every `/v1` route
    /// needs a token. `false` means an open host.
    pub fn protected(&self) -> bool {
        self.token.is_some() || self.admin.is_some() || self.publish.is_some()
    }

    fn has_admin_scope(&self) -> bool {
        self.token.is_some() || self.admin.is_some()
    }

    /// The scope `presented` grants, or `None` if it matches no configured token.
    fn scope_of(&self, presented: &str) -> Option<Scope> {
        if matches(presented, &self.token) || matches(presented, &self.admin) {
            Some(Scope::Admin)
        } else if matches(presented, &self.publish) {
            Some(Scope::Publish)
        } else {
            None
        }
    }
}

/// What the caller of a route proved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scope {
    /// No token (only possible on an open host, or on `/metrics`).
    #[default]
    Anonymous,
    /// A publish-scope token.
    Publish,
    /// An admin-scope token.
    Admin,
}

/// Which group a route belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Reading events, stats, the stream, handlers; connecting a WebSocket.
    Read,
    /// Publishing.
    Publish,
    /// Deploying, removing, re-running.
    Admin,
    /// `/metrics`.
    Metrics,
}

/// The token of an `Authorization` header: scheme `Bearer`, matched case-insensitively
/// (RFC 9110 §11.1).
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|token| !token.is_empty())
}

fn matches(presented: &str, token: &Option<String>) -> bool {
    token.as_deref().is_some_and(|token| {
        constant_time_eq::constant_time_eq(presented.as_bytes(), token.as_bytes())
    })
}

fn unauthorized(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
}

/// Checks a presented token (from a header, a query or a WebSocket subprotocol) against the
/// route group; returns the caller's scope.
pub(crate) fn authorize(
    tokens: &Tokens,
    presented: Option<&str>,
    access: Access,
) -> Result<Scope, ApiError> {
    let scope = presented.and_then(|presented| tokens.scope_of(presented));
    if access == Access::Metrics {
        if tokens.metrics.is_none() || scope == Some(Scope::Admin) {
            return Ok(scope.unwrap_or_default());
        }
        return match presented {
            Some(presented) if matches(presented, &tokens.metrics) => Ok(Scope::Anonymous),
            Some(_) => Err(unauthorized(
                "the token is not valid for /metrics (server.metrics_token)",
            )),
            None => Err(unauthorized(
                "/metrics needs Authorization: Bearer <server.metrics_token>",
            )),
        };
    }
    if !tokens.protected() {
        return Ok(scope.unwrap_or_default());
    }
    if access == Access::Admin && !tokens.has_admin_scope() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "admin endpoints are off: this host has only server.publish_token; set server.token \
             or server.admin_token to deploy, remove handlers and re-run events",
        ));
    }
    match (scope, presented) {
        (None, None) => Err(unauthorized(
            "this endpoint needs Authorization: Bearer <token>",
        )),
        (None, Some(_)) => Err(unauthorized("the token is not valid for this host")),
        (Some(Scope::Publish), _) if access == Access::Admin => Err(unauthorized(
            "this endpoint needs an admin token (server.token or server.admin_token)",
        )),
        (Some(scope), _) => Ok(scope),
    }
}

/// Refuses the claims only an authenticated publisher may make: a `user_id`, or source
/// `database` or `internal`.
pub(crate) fn check_claims(draft: &EventDraft, scope: Scope) -> Result<(), ApiError> {
    if scope != Scope::Anonymous {
        return Ok(());
    }
    let refused = |what: String| {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "{what} may only be set by a publisher with a token (set server.token or \
                 server.publish_token and send Authorization: Bearer <token>); without one, source \
                 may be system, frontend or websocket and user_id must be absent"
            ),
        )
    };
    if draft.user_id.is_some() {
        return Err(refused("user_id".into()));
    }
    match draft.source {
        Some(source @ (EventSource::Database | EventSource::Internal)) => {
            Err(refused(format!("source {source}")))
        }
        _ => Ok(()),
    }
}

/// The caller's scope, as the route guard established it ([`Scope::Anonymous`] on routes
/// without a guard).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Caller(pub Scope);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<Caller>()
            .copied()
            .unwrap_or_default())
    }
}

/// An authentication failure with the `WWW-Authenticate` challenge.
pub(crate) fn challenge(error: ApiError) -> Response {
    let unauthorized = error.status == StatusCode::UNAUTHORIZED;
    let mut response = error.into_response();
    if unauthorized {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

/// Route layer: authorizes the request for its group, records the [`Caller`], and refuses
/// publish and admin requests while the host shuts down.
pub(crate) async fn guard(
    State((state, access)): State<(AppState, Access)>,
    mut request: Request,
    next: Next,
) -> Response {
    let scope = match authorize(state.tokens(), bearer(request.headers()), access) {
        Ok(scope) => scope,
        Err(error) => return challenge(error),
    };
    if matches!(access, Access::Publish | Access::Admin) && !state.is_accepting() {
        return ApiError::unavailable("host is shutting down").into_response();
    }
    request.extensions_mut().insert(Caller(scope));
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: Option<&'static str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(value) = value {
            headers.insert(header::AUTHORIZATION, HeaderValue::from_static(value));
        }
        headers
    }

    fn allowed(tokens: &Tokens, authorization: Option<&'static str>, access: Access) -> bool {
        authorize(tokens, bearer(&headers(authorization)), access).is_ok()
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for value in ["Bearer abc", "bearer abc", "BEARER abc", "bEaReR   abc "] {
            assert_eq!(bearer(&headers(Some(value))), Some("abc"), "{value}");
        }
        for value in ["Basic abc", "Bearerabc", "Bearer ", "abc"] {
            assert_eq!(bearer(&headers(Some(value))), None, "{value}");
        }
    }

    #[test]
    fn an_open_host_lets_everyone_in_anonymously() {
        let open = Tokens::default();
        for access in [
            Access::Read,
            Access::Publish,
            Access::Admin,
            Access::Metrics,
        ] {
            assert_eq!(
                authorize(&open, None, access).ok(),
                Some(Scope::Anonymous),
                "{access:?}"
            );
        }
    }

    #[test]
    fn tokens_guard_their_groups() {
        let tokens = Tokens {
            admin: Some("adm".into()),
            publish: Some("pub".into()),
            ..Tokens::default()
        };
        let cases = [
            (None, Access::Read, false),
            (Some("Bearer pub"), Access::Read, true),
            (Some("Bearer adm"), Access::Read, true),
            (None, Access::Publish, false),
            (Some("Bearer pub"), Access::Publish, true),
            (Some("bearer pub"), Access::Publish, true),
            (Some("Bearer wrong"), Access::Publish, false),
            (Some("Bearer pub"), Access::Admin, false),
            (Some("Bearer adm"), Access::Admin, true),
            (Some("Basic adm"), Access::Admin, false),
            (None, Access::Metrics, true),
        ];
        for (authorization, access, ok) in cases {
            assert_eq!(
                allowed(&tokens, authorization, access),
                ok,
                "{authorization:?} {access:?}"
            );
        }
    }

    #[test]
    fn an_admin_token_alone_closes_every_write_and_read() {
        let admin_only = Tokens {
            admin: Some("adm".into()),
            ..Tokens::default()
        };
        for access in [Access::Read, Access::Publish, Access::Admin] {
            assert!(!allowed(&admin_only, None, access), "{access:?}");
            assert!(
                allowed(&admin_only, Some("Bearer adm"), access),
                "{access:?}"
            );
        }
    }

    #[test]
    fn one_token_covers_everything() {
        let one = Tokens {
            token: Some("t".into()),
            ..Tokens::default()
        };
        for access in [Access::Read, Access::Publish, Access::Admin] {
            assert!(!allowed(&one, None, access), "{access:?}");
            assert!(!allowed(&one, Some("Bearer x"), access), "{access:?}");
            assert_eq!(
                authorize(&one, Some("t"), access).ok(),
                Some(Scope::Admin),
                "{access:?}"
            );
        }
    }

    #[test]
    fn a_publish_token_alone_turns_admin_routes_off() {
        let publish_only = Tokens {
            publish: Some("pub".into()),
            ..Tokens::default()
        };
        assert!(allowed(&publish_only, Some("Bearer pub"), Access::Publish));
        for authorization in [None, Some("Bearer pub")] {
            let error = authorize(
                &publish_only,
                bearer(&headers(authorization)),
                Access::Admin,
            )
            .unwrap_err();
            assert_eq!(error.status, StatusCode::FORBIDDEN);
            assert!(error.message.contains("server.admin_token"), "{error:?}");
        }
    }

    #[test]
    fn the_metrics_token_guards_only_metrics() {
        let tokens = Tokens {
            admin: Some("adm".into()),
            metrics: Some("met".into()),
            ..Tokens::default()
        };
        assert!(!allowed(&tokens, None, Access::Metrics));
        assert!(!allowed(&tokens, Some("Bearer wrong"), Access::Metrics));
        assert!(allowed(&tokens, Some("Bearer met"), Access::Metrics));
        assert!(allowed(&tokens, Some("Bearer adm"), Access::Metrics));
        assert!(!allowed(&tokens, Some("Bearer met"), Access::Read));
        let metrics_only = Tokens {
            metrics: Some("met".into()),
            ..Tokens::default()
        };
        assert!(allowed(&metrics_only, None, Access::Publish), "still open");
        assert!(!allowed(&metrics_only, None, Access::Metrics));
    }

    #[test]
    fn anonymous_publishers_may_not_claim_identities_or_privileged_sources() {
        let draft = |source: Option<EventSource>, user_id: Option<i64>| EventDraft {
            source,
            user_id,
            ..EventDraft::new("a.b")
        };
        for source in [
            None,
            Some(EventSource::System),
            Some(EventSource::Frontend),
            Some(EventSource::Websocket),
        ] {
            assert!(check_claims(&draft(source, None), Scope::Anonymous).is_ok());
        }
        for (source, user_id) in [
            (Some(EventSource::Database), None),
            (Some(EventSource::Internal), None),
            (None, Some(7)),
        ] {
            let error = check_claims(&draft(source, user_id), Scope::Anonymous).unwrap_err();
            assert_eq!(
                (error.status, error.code),
                (StatusCode::FORBIDDEN, "forbidden")
            );
        }
        for scope in [Scope::Publish, Scope::Admin] {
            assert!(check_claims(&draft(Some(EventSource::Database), Some(7)), scope).is_ok());
        }
    }
}
