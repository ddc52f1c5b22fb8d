//! Talking to a running host: where it is (`--server`), how to authenticate (`--token`), and
//! errors that say what to do (a refused connection, a missing token).

use std::time::Duration;

use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::exit::{Exit, fail};

/// The default host address.
pub const DEFAULT_SERVER: &str = "127.0.0.1:8080";

/// Parses `--server`: a URL (`http://host:port/prefix`, `https://…`), `host:port`, `host`
/// (port 8080), `:port` or a bare port (both on 127.0.0.1).
///
/// # Errors
/// A message naming the accepted forms.
pub fn parse_server(text: &str) -> Result<Url, String> {
    let text = text.trim();
    let bad = || {
        format!(
            "{text:?} is not a server address: give host:port (127.0.0.1:8080), a port (8080) or a URL (http://host:8080)"
        )
    };
    if text.is_empty() {
        return Err(bad());
    }
    let with_scheme = if text.contains("://") {
        text.to_owned()
    } else if let Some(port) = text.strip_prefix(':') {
        format!("http://127.0.0.1:{port}")
    } else if text.bytes().all(|b| b.is_ascii_digit()) {
        format!("http://127.0.0.1:{text}")
    } else {
        format!("http://{text}")
    };
    let mut url = Url::parse(&with_scheme).map_err(|_| bad())?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "{text:?}: the server is reached over http:// or https://, not {}://",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad());
    }
    if url.port().is_none() && !text.contains("://") {
        let _ = url.set_port(Some(8080));
    }
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}

/// A connection to one host.
#[derive(Debug, Clone)]
pub struct Remote {
    client: reqwest::Client,
    base: Url,
    token: Option<String>,
}

impl Remote {
    /// A client for the host at `base` (see [`parse_server`]).
    ///
    /// # Errors
    /// When the HTTP client cannot be built (TLS roots unavailable).
    pub fn new(base: Url, token: Option<String>) -> anyhow::Result<Remote> {
        let client = reqwest::Client::builder()
            .user_agent(concat!("eventbroker-cli/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| fail(Exit::Failed, format!("cannot build an HTTP client: {e}")))?;
        Ok(Remote {
            client,
            base,
            token,
        })
    }

    /// The host's address as given.
    pub fn base(&self) -> &Url {
        &self.base
    }

    /// A request to `path` (relative to the base, without a leading `/`), with the token.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let url = self
            .base
            .join(path.trim_start_matches('/'))
            .unwrap_or_else(|_| self.base.clone());
        let request = self.client.request(method, url);
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Sends `request`; a transport failure becomes an error that says how to reach the host.
    ///
    /// # Errors
    /// [`Exit::Unreachable`] with advice.
    pub async fn send(&self, request: RequestBuilder) -> anyhow::Result<Response> {
        request.send().await.map_err(|e| self.unreachable(&e))
    }

    /// Sends `request` and reads a 2xx JSON answer; anything else becomes an error with the
    /// API's own message.
    ///
    /// # Errors
    /// See [`Remote::send`] and [`Remote::refused`].
    pub async fn call<T: DeserializeOwned>(&self, request: RequestBuilder) -> anyhow::Result<T> {
        let response = self.send(request).await?;
        let status = response.status();
        if !status.is_success() {
            return Err(self.refused(response).await);
        }
        let body = response.bytes().await.map_err(|e| self.unreachable(&e))?;
        serde_json::from_slice(&body).map_err(|e| {
            fail(
                Exit::Failed,
                format!(
                    "{} answered {status} with a body this CLI does not understand ({e}); is it an eventbroker host of the same version?",
                    self.base
                ),
            )
        })
    }

    /// The error for a non-2xx answer: the API's code and message, plus what to do about a
    /// 401 or 403.
    pub async fn refused(&self, response: Response) -> anyhow::Error {
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let code = body["error"]["code"].as_str().unwrap_or("");
        let message = body["error"]["message"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| {
                status
                    .canonical_reason()
                    .unwrap_or("no reason given")
                    .to_owned()
            });
        let what = if code.is_empty() {
            format!("{status}")
        } else {
            format!("{status}, {code}")
        };
        match status {
            StatusCode::UNAUTHORIZED => fail(
                Exit::Denied,
                format!(
                    "{} wants a token ({what}): {message}\n  pass --token TOKEN or set EVENTBROKER_TOKEN (the host's server.token, server.admin_token or server.publish_token)",
                    self.base
                ),
            ),
            StatusCode::FORBIDDEN => fail(
                Exit::Denied,
                format!(
                    "{} refused this token ({what}): {message}\n  deploy, remove and retry need the admin token; publish needs the publish or admin token",
                    self.base
                ),
            ),
            _ => fail(
                Exit::Failed,
                format!("{} answered {what}: {message}", self.base),
            ),
        }
    }

    fn unreachable(&self, error: &reqwest::Error) -> anyhow::Error {
        let mut cause = error.to_string();
        let mut source = std::error::Error::source(error);
        while let Some(inner) = source {
            cause = inner.to_string();
            source = inner.source();
        }
        let advice = if error.is_connect() {
            "is `eventbroker serve` running there? Point the CLI at the host with --server HOST:PORT or EVENTBROKER_SERVER"
        } else if error.is_timeout() {
            "the host did not answer in time; is it overloaded or behind a firewall?"
        } else {
            "check the address given with --server or EVENTBROKER_SERVER"
        };
        fail(
            Exit::Unreachable,
            format!("cannot reach {}: {cause}\n  {advice}", self.base),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::parse_server;

    #[test]
    fn server_addresses_in_every_documented_form() {
        let cases = [
            ("127.0.0.1:8080", "http://127.0.0.1:8080/"),
            ("localhost:9000", "http://localhost:9000/"),
            ("broker.internal", "http://broker.internal:8080/"),
            (":9000", "http://127.0.0.1:9000/"),
            ("9000", "http://127.0.0.1:9000/"),
            ("http://h:1/", "http://h:1/"),
            ("https://h.example", "https://h.example/"),
            ("http://h:1/prefix", "http://h:1/prefix/"),
            ("[::1]:8080", "http://[::1]:8080/"),
        ];
        for (given, expected) in cases {
            assert_eq!(
                parse_server(given).map(|u| u.to_string()).as_deref(),
                Ok(expected),
                "{given}"
            );
        }
        for bad in ["", "ftp://h", "http://", "h:port", "http://h:99999"] {
            let error = parse_server(bad).expect_err(bad);
            assert!(
                error.contains("server") || error.contains("http"),
                "{bad}: {error}"
            );
        }
    }
}
