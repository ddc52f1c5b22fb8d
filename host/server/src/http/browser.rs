//! Defences against web pages driving the host through a visitor's browser.
//!
//! - **`Host` allow-list** (DNS rebinding: a page on `attacker.example` whose name is re-pointed
//!   at the host's address is same-origin with it from the browser's point of view, but its
//!   requests carry `Host: attacker.example`). Every request's `Host` must name the host: by
//!   default `localhost`, `127.0.0.1`, `[::1]` and the listen address, with the bound port;
//!   listening on an unspecified address (`0.0.0.0`, `[::]`) also admits any IP address with the
//!   bound port (an address cannot be re-pointed by DNS). `server.allowed_hosts` adds names;
//!   `*` turns the check off. Refused: 421 `invalid_host`.
//! - **`Origin` check** on WebSocket upgrades and on state-changing requests (any method but
//!   GET, HEAD, OPTIONS, TRACE): a browser sends `Origin` on those; it must be the host's own
//!   origin (the page at `/`) or listed in `server.allowed_origins` (`*`: any). Without
//!   `Origin`, a request a browser marks cross-site (`Sec-Fetch-Site`) is refused too.
//!   Clients that are not browsers send no `Origin` and are not affected. Refused: 403
//!   `forbidden_origin`.
//! - **Form posts**: a `POST` without `Origin` whose content type an HTML form can send
//!   (old browsers omit `Origin` on cross-site form posts) is refused with 415
//!   `unsupported_media_type`. The one endpoint that takes such a body is a binary-mode
//!   CloudEvent (`text/plain` data with `ce-*` headers): a form cannot send headers, and a
//!   cross-site `fetch` with them needs a CORS preflight the host never grants.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{Request, State};
use axum::http::uri::{Authority, Uri};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState};

/// One accepted `Host`: a lowercase host (IPv6 in brackets) and, optionally, a port.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HostEntry {
    host: String,
    port: Option<u16>,
}

impl HostEntry {
    fn parse(text: &str) -> Result<HostEntry, String> {
        let authority: Authority = text
            .parse()
            .map_err(|error| format!("{text:?} is not a host or host:port: {error}"))?;
        if authority.as_str().contains('@') {
            return Err(format!("{text:?} is not a host or host:port"));
        }
        Ok(HostEntry {
            host: authority.host().to_ascii_lowercase(),
            port: authority.port_u16(),
        })
    }

    fn matches(&self, host: &HostEntry) -> bool {
        self.host == host.host
            && match (self.port, host.port) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

/// A normalised origin: `scheme://host[:port]`, lowercase, without the scheme's default port.
fn normalize_origin(text: &str) -> Result<String, String> {
    if text == "null" {
        return Ok("null".into());
    }
    let uri: Uri = text
        .parse()
        .map_err(|error| format!("{text:?} is not an origin: {error}"))?;
    let scheme = uri
        .scheme_str()
        .map(str::to_ascii_lowercase)
        .filter(|scheme| scheme == "http" || scheme == "https")
        .ok_or_else(|| format!("{text:?} is not an origin: expected http:// or https://"))?;
    let authority = uri
        .authority()
        .filter(|authority| !authority.as_str().contains('@'))
        .ok_or_else(|| format!("{text:?} is not an origin: expected scheme://host[:port]"))?;
    if uri
        .path_and_query()
        .is_some_and(|path| path.as_str() != "/")
    {
        return Err(format!(
            "{text:?} is not an origin: an origin has no path or query"
        ));
    }
    let default_port = if scheme == "https" { 443 } else { 80 };
    let host = authority.host().to_ascii_lowercase();
    Ok(match authority.port_u16() {
        Some(port) if port != default_port => format!("{scheme}://{host}:{port}"),
        _ => format!("{scheme}://{host}"),
    })
}

/// Checks `server.allowed_hosts` and `server.allowed_origins` entries; the error names the key.
pub(crate) fn check_config(
    allowed_hosts: &[String],
    allowed_origins: &[String],
) -> Result<(), (&'static str, String)> {
    for entry in allowed_hosts.iter().filter(|entry| *entry != "*") {
        HostEntry::parse(entry).map_err(|reason| ("server.allowed_hosts", reason))?;
    }
    for entry in allowed_origins.iter().filter(|entry| *entry != "*") {
        normalize_origin(entry).map_err(|reason| ("server.allowed_origins", reason))?;
    }
    Ok(())
}

/// Why a [`BrowserPolicy`] cannot be built.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {key} {reason}")]
pub struct PolicyError {
    /// The config key.
    pub key: &'static str,
    /// What is wrong.
    pub reason: String,
}

/// Which `Host` and `Origin` values the server accepts.
#[derive(Debug, Clone)]
pub struct BrowserPolicy {
    /// `None`: any host (`*`).
    hosts: Option<Vec<HostEntry>>,
    /// Listening on an unspecified address: any IP address with this port is accepted.
    any_ip_port: Option<u16>,
    /// `None`: any origin (`*`).
    origins: Option<Vec<String>>,
}

impl BrowserPolicy {
    /// The policy of a server bound to `bound`, with the configured extra hosts and origins.
    ///
    /// # Errors
    /// [`PolicyError`] naming the key of an entry that is not a host or an origin.
    pub fn new(
        bound: SocketAddr,
        allowed_hosts: &[String],
        allowed_origins: &[String],
    ) -> Result<BrowserPolicy, PolicyError> {
        check_config(allowed_hosts, allowed_origins)
            .map_err(|(key, reason)| PolicyError { key, reason })?;
        let port = bound.port();
        let hosts = if allowed_hosts.iter().any(|entry| entry == "*") {
            None
        } else {
            let mut hosts: Vec<HostEntry> = ["localhost", "127.0.0.1", "[::1]"]
                .into_iter()
                .map(|host| HostEntry {
                    host: host.into(),
                    port: Some(port),
                })
                .collect();
            if !bound.ip().is_unspecified() {
                hosts.push(HostEntry {
                    host: match bound.ip() {
                        IpAddr::V4(ip) => ip.to_string(),
                        IpAddr::V6(ip) => format!("[{ip}]"),
                    },
                    port: Some(port),
                });
            }
            for entry in allowed_hosts {
                hosts.push(HostEntry::parse(entry).map_err(|reason| PolicyError {
                    key: "server.allowed_hosts",
                    reason,
                })?);
            }
            Some(hosts)
        };
        let origins = if allowed_origins.iter().any(|entry| entry == "*") {
            None
        } else {
            let mut origins = Vec::with_capacity(allowed_origins.len());
            for entry in allowed_origins {
                origins.push(normalize_origin(entry).map_err(|reason| PolicyError {
                    key: "server.allowed_origins",
                    reason,
                })?);
            }
            Some(origins)
        };
        Ok(BrowserPolicy {
            hosts,
            any_ip_port: bound.ip().is_unspecified().then_some(port),
            origins,
        })
    }

    fn host_allowed(&self, host: &str) -> bool {
        let Some(hosts) = &self.hosts else {
            return true;
        };
        let Ok(host) = HostEntry::parse(host) else {
            return false;
        };
        if hosts.iter().any(|entry| entry.matches(&host)) {
            return true;
        }
        let literal = host.host.trim_start_matches('[').trim_end_matches(']');
        self.any_ip_port.is_some_and(|port| {
            host.port.is_none_or(|p| p == port) && literal.parse::<IpAddr>().is_ok()
        })
    }

    /// Whether `origin` is the host's own (`host` is the request's `Host`) or allowed.
    fn origin_allowed(&self, origin: &str, host: Option<&str>) -> bool {
        let Some(allowed) = &self.origins else {
            return true;
        };
        let Ok(origin) = normalize_origin(origin) else {
            return false;
        };
        if allowed.contains(&origin) {
            return true;
        }
        same_origin(&origin, host)
    }

    /// Checks one request; the error is the response to send instead.
    pub(crate) fn check(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Result<(), ApiError> {
        let host = headers
            .get(header::HOST)
            .map(|value| value.to_str().unwrap_or("\u{fffd}"))
            .or_else(|| uri.authority().map(Authority::as_str));
        // A request without any Host (HTTP/1.0 tools) cannot come from a browser.
        if let Some(host) = host
            && !self.host_allowed(host)
        {
            return Err(ApiError::new(
                StatusCode::MISDIRECTED_REQUEST,
                "invalid_host",
                format!(
                    "Host {host:?} is not a name of this server (a protection against DNS \
                     rebinding); add it to server.allowed_hosts"
                ),
            ));
        }
        let upgrade = headers
            .get(header::UPGRADE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value.eq_ignore_ascii_case("websocket"));
        let safe = matches!(
            *method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
        );
        if safe && !upgrade {
            return Ok(());
        }
        let what = if upgrade {
            "WebSocket connections"
        } else {
            "requests that change state"
        };
        let refuse = |message: String| {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden_origin",
                message,
            ))
        };
        if let Some(origin) = headers.get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("\u{fffd}");
            if self.origin_allowed(origin, host) {
                return Ok(());
            }
            return refuse(format!(
                "{what} from origin {origin:?} are refused: only the host's own page and \
                 server.allowed_origins may make them"
            ));
        }
        let fetch_site = headers
            .get("sec-fetch-site")
            .and_then(|value| value.to_str().ok());
        if matches!(fetch_site, Some("cross-site" | "same-site")) {
            return refuse(format!(
                "{what} from another site are refused (Sec-Fetch-Site: {})",
                fetch_site.unwrap_or_default()
            ));
        }
        // No endpoint takes a form body, and an old browser's cross-site form post carries
        // no Origin: refused as the wrong media type, which is what a client that forgot its
        // content type needs to hear.
        if *method == Method::POST
            && form_content_type(headers)
            && !headers.contains_key("ce-specversion")
        {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "this API takes no form bodies (form-urlencoded, multipart, text/plain) on POST: \
                 send application/json (curl: -H 'content-type: application/json')",
            ));
        }
        Ok(())
    }
}

/// Whether the content type is one a cross-site HTML form (or a "simple" fetch) can send.
fn form_content_type(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
    else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or("").trim();
    [
        "application/x-www-form-urlencoded",
        "multipart/form-data",
        "text/plain",
    ]
    .iter()
    .any(|form| essence.eq_ignore_ascii_case(form))
}

/// Whether the normalised `origin` names the same host and port as the request's `Host`.
fn same_origin(origin: &str, host: Option<&str>) -> bool {
    let (Some(host), Some((scheme, origin_authority))) = (host, origin.split_once("://")) else {
        return false;
    };
    let default_port = if scheme == "https" { 443 } else { 80 };
    let (Ok(origin), Ok(host)) = (HostEntry::parse(origin_authority), HostEntry::parse(host))
    else {
        return false;
    };
    origin.host == host.host
        && origin.port.unwrap_or(default_port) == host.port.unwrap_or(default_port)
}

/// Middleware: [`BrowserPolicy::check`] on every request.
pub(crate) async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    match state
        .browser()
        .check(request.method(), request.uri(), request.headers())
    {
        Ok(()) => next.run(request).await,
        Err(error) => error.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn policy(bound: &str, hosts: &[&str], origins: &[&str]) -> BrowserPolicy {
        let strings = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        BrowserPolicy::new(bound.parse().unwrap(), &strings(hosts), &strings(origins)).unwrap()
    }

    fn request(method: Method, pairs: &[(&'static str, &'static str)]) -> (Method, HeaderMap) {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.insert(*name, HeaderValue::from_static(value));
        }
        (method, headers)
    }

    fn code(
        policy: &BrowserPolicy,
        method: Method,
        pairs: &[(&'static str, &'static str)],
    ) -> Option<&'static str> {
        let (method, headers) = request(method, pairs);
        policy
            .check(&method, &Uri::from_static("/v1/events"), &headers)
            .err()
            .map(|error| error.code)
    }

    #[test]
    fn default_hosts_are_the_loopback_names_and_the_listen_address() {
        let local = policy("127.0.0.1:8080", &[], &[]);
        for host in [
            "127.0.0.1:8080",
            "localhost:8080",
            "LOCALHOST:8080",
            "[::1]:8080",
            "localhost",
        ] {
            assert_eq!(code(&local, Method::GET, &[("host", host)]), None, "{host}");
        }
        for host in [
            "attacker.example",
            "attacker.example:8080",
            "localhost:9090",
            "10.0.0.1:8080",
            "user@localhost:8080",
            "",
        ] {
            assert_eq!(
                code(&local, Method::GET, &[("host", host)]),
                Some("invalid_host"),
                "{host}"
            );
        }
        let lan = policy("10.0.0.5:80", &["events.example.com"], &[]);
        for host in [
            "10.0.0.5",
            "10.0.0.5:80",
            "events.example.com",
            "Events.Example.com:443",
        ] {
            assert_eq!(code(&lan, Method::GET, &[("host", host)]), None, "{host}");
        }
        assert_eq!(
            code(&lan, Method::GET, &[("host", "10.0.0.6")]),
            Some("invalid_host")
        );
        let any = policy("0.0.0.0:8080", &[], &[]);
        for host in ["192.168.1.9:8080", "[fe80::1]:8080", "localhost:8080"] {
            assert_eq!(code(&any, Method::GET, &[("host", host)]), None, "{host}");
        }
        for host in ["192.168.1.9:9999", "myhost:8080"] {
            assert_eq!(
                code(&any, Method::GET, &[("host", host)]),
                Some("invalid_host"),
                "{host}"
            );
        }
        let star = policy("127.0.0.1:8080", &["*"], &[]);
        assert_eq!(
            code(&star, Method::GET, &[("host", "anything.example")]),
            None
        );
        assert_eq!(
            code(&local, Method::GET, &[]),
            None,
            "no Host: not a browser"
        );
    }

    #[test]
    fn origins_are_checked_on_writes_and_websocket_upgrades() {
        let local = policy("127.0.0.1:8080", &[], &["https://app.example"]);
        let host = ("host", "127.0.0.1:8080");
        let evil = ("origin", "http://evil.example");
        let upgrade = ("upgrade", "websocket");
        assert_eq!(
            code(&local, Method::GET, &[host, evil]),
            None,
            "reads are not checked"
        );
        for method in [Method::POST, Method::PUT, Method::DELETE, Method::PATCH] {
            assert_eq!(
                code(&local, method.clone(), &[host, evil]),
                Some("forbidden_origin"),
                "{method}"
            );
            assert_eq!(
                code(&local, method.clone(), &[host]),
                None,
                "{method} without Origin"
            );
        }
        assert_eq!(
            code(&local, Method::GET, &[host, evil, upgrade]),
            Some("forbidden_origin")
        );
        assert_eq!(
            code(&local, Method::GET, &[host, ("origin", "null"), upgrade]),
            Some("forbidden_origin")
        );
        for origin in [
            "http://127.0.0.1:8080",
            "HTTP://127.0.0.1:8080",
            "https://app.example",
            "https://app.example:443",
        ] {
            assert_eq!(
                code(&local, Method::GET, &[host, ("origin", origin), upgrade]),
                None,
                "{origin}"
            );
            assert_eq!(
                code(&local, Method::POST, &[host, ("origin", origin)]),
                None,
                "{origin}"
            );
        }
        assert_eq!(
            code(
                &local,
                Method::POST,
                &[host, ("origin", "http://localhost:8080")]
            ),
            Some("forbidden_origin"),
            "another name is another origin"
        );
        assert_eq!(
            code(&local, Method::GET, &[host, upgrade]),
            None,
            "non-browser client"
        );
        assert_eq!(
            code(
                &local,
                Method::POST,
                &[host, ("sec-fetch-site", "cross-site")]
            ),
            Some("forbidden_origin")
        );
        assert_eq!(
            code(
                &local,
                Method::POST,
                &[host, ("sec-fetch-site", "same-origin")]
            ),
            None
        );
        for form in [
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "text/plain;charset=utf-8",
        ] {
            assert_eq!(
                code(&local, Method::POST, &[host, ("content-type", form)]),
                Some("unsupported_media_type"),
                "{form}"
            );
        }
        assert_eq!(
            code(
                &local,
                Method::POST,
                &[host, ("content-type", "application/json")]
            ),
            None
        );
        // A binary-mode CloudEvent with text data: headers no form can send.
        assert_eq!(
            code(
                &local,
                Method::POST,
                &[
                    host,
                    ("content-type", "text/plain"),
                    ("ce-specversion", "1.0")
                ]
            ),
            None
        );
        assert_eq!(
            code(
                &local,
                Method::PUT,
                &[host, ("content-type", "multipart/form-data; boundary=x")]
            ),
            None
        );
        let any = policy("127.0.0.1:8080", &[], &["*"]);
        assert_eq!(code(&any, Method::POST, &[host, evil]), None);
    }

    #[test]
    fn bad_entries_name_their_key() {
        let strings = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            check_config(&strings(&["a b"]), &[]).unwrap_err().0,
            "server.allowed_hosts"
        );
        for origin in [
            "app.example",
            "ftp://app.example",
            "https://app.example/path",
            "https://u@app.example",
        ] {
            assert_eq!(
                check_config(&[], &strings(&[origin])).unwrap_err().0,
                "server.allowed_origins",
                "{origin}"
            );
        }
        assert!(
            check_config(
                &strings(&["*", "x.example:8443"]),
                &strings(&["*", "null", "http://x.example:8080/"])
            )
            .is_ok()
        );
    }
}
