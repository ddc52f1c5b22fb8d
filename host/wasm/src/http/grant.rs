//! The `[http]` grant of a manifest: which URLs a handler may call, with which methods, and
//! how much. Parsing and matching only; no I/O.

use std::net::IpAddr;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use crate::WasmError;

/// Requests one invocation may make when the manifest does not say.
pub const DEFAULT_MAX_REQUESTS: u32 = 10;
/// Request body bytes when the manifest does not say.
pub const DEFAULT_MAX_REQUEST_BODY: u64 = 1024 * 1024;
/// Response body bytes when the manifest does not say.
pub const DEFAULT_MAX_RESPONSE_BODY: u64 = 1024 * 1024;

/// `[http]` as written in a manifest.
///
/// ```toml
/// [http]
/// allow = ["https://api.example.com", "http://127.0.0.1:9000/hooks/*"]
/// methods = ["POST"]          # default: any
/// max_requests = 10           # per invocation
/// max_request_body = "1MiB"
/// max_response_body = "1MiB"
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpManifest {
    /// URLs the handler may call: `scheme://host[:port][/path]`; a path ending in `*` allows
    /// every path under it, no path allows every path.
    pub allow: Vec<String>,
    /// Methods allowed (default: any).
    pub methods: Option<Vec<String>>,
    /// Requests per invocation.
    pub max_requests: Option<u32>,
    /// Largest request body.
    #[serde(default, with = "eventbroker::size::serde::option")]
    pub max_request_body: Option<ByteSize>,
    /// Largest response body.
    #[serde(default, with = "eventbroker::size::serde::option")]
    pub max_response_body: Option<ByteSize>,
}

/// Which paths a rule allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PathRule {
    /// Every path.
    Any,
    /// This path only.
    Exact(String),
    /// Every path starting with this.
    Prefix(String),
}

/// One allowed origin and path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AllowRule {
    /// As written.
    pub text: String,
    /// `http` or `https`.
    pub scheme: String,
    /// Host, lower case (without brackets for IPv6).
    pub host: String,
    /// Port (the scheme's default when not written).
    pub port: u16,
    /// Paths.
    pub path: PathRule,
    /// The address, when the host is an IP address: listed explicitly, so allowed even when
    /// it is loopback, link-local or private.
    pub address: Option<IpAddr>,
}

/// A resolved `[http]` grant.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HttpGrant {
    /// Allowed URLs.
    pub allow: Vec<AllowRule>,
    /// Allowed methods, upper case (`None`: any).
    pub methods: Option<Vec<String>>,
    /// Requests per invocation.
    pub max_requests: u32,
    /// Largest request body in bytes.
    pub max_request_body: u64,
    /// Largest response body in bytes.
    pub max_response_body: u64,
    /// When set, every request is refused with this reason (`eventbroker run --deny-net`):
    /// the grant still lets the component load.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refuse_all: Option<String>,
}

fn default_port(scheme: &str) -> u16 {
    if scheme == "https" { 443 } else { 80 }
}

impl AllowRule {
    /// Parses one `allow` entry.
    ///
    /// # Errors
    /// [`WasmError::Manifest`] saying what is wrong with it.
    pub fn parse(text: &str) -> Result<AllowRule, WasmError> {
        let bad = |why: &str| {
            WasmError::Manifest(format!(
                "http.allow entry {text:?} {why}; write scheme://host[:port][/path], e.g. \"https://api.example.com\" or \"http://127.0.0.1:9000/hooks/*\""
            ))
        };
        let uri: http::Uri = text.parse().map_err(|_| bad("is not a URL"))?;
        let scheme = uri
            .scheme_str()
            .map(str::to_ascii_lowercase)
            .ok_or_else(|| bad("has no scheme"))?;
        if scheme != "http" && scheme != "https" {
            return Err(bad("is neither http nor https"));
        }
        let authority = uri.authority().ok_or_else(|| bad("has no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("has user information"));
        }
        if uri.query().is_some() {
            return Err(bad("has a query"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        if host.is_empty() || host.contains('*') {
            return Err(bad("has no host, or a wildcard in it"));
        }
        let port = authority
            .port_u16()
            .unwrap_or_else(|| default_port(&scheme));
        let path = match uri.path() {
            "" | "/" | "/*" => PathRule::Any,
            path => match path.strip_suffix('*') {
                Some(prefix) => PathRule::Prefix(prefix.to_owned()),
                None if path.contains('*') => return Err(bad("has '*' inside its path")),
                None => PathRule::Exact(path.to_owned()),
            },
        };
        Ok(AllowRule {
            text: text.to_owned(),
            address: host.parse().ok(),
            scheme,
            host,
            port,
            path,
        })
    }

    fn allows(&self, scheme: &str, host: &str, port: u16, path: &str) -> bool {
        self.scheme == scheme
            && self.host == host
            && self.port == port
            && match &self.path {
                PathRule::Any => true,
                PathRule::Exact(exact) => path == exact,
                PathRule::Prefix(prefix) => path.starts_with(prefix.as_str()),
            }
    }
}

impl HttpManifest {
    /// Resolves the grant.
    ///
    /// # Errors
    /// [`WasmError::Manifest`] for an empty `allow`, an entry that is not an http(s) URL, an
    /// unknown method or a zero limit.
    pub fn resolve(self) -> Result<HttpGrant, WasmError> {
        if self.allow.is_empty() {
            return Err(WasmError::Manifest(
                "http.allow is empty: list the URLs the handler may call, or leave out [http]"
                    .into(),
            ));
        }
        let allow = self
            .allow
            .iter()
            .map(|rule| AllowRule::parse(rule))
            .collect::<Result<Vec<_>, _>>()?;
        let methods = match self.methods {
            Some(methods) => {
                let methods: Vec<String> = methods.iter().map(|m| m.to_ascii_uppercase()).collect();
                for method in &methods {
                    if http::Method::from_bytes(method.as_bytes()).is_err() || method.is_empty() {
                        return Err(WasmError::Manifest(format!(
                            "http.methods: {method:?} is not an HTTP method"
                        )));
                    }
                }
                Some(methods)
            }
            None => None,
        };
        let grant = HttpGrant {
            allow,
            methods,
            max_requests: self.max_requests.unwrap_or(DEFAULT_MAX_REQUESTS),
            max_request_body: self
                .max_request_body
                .map_or(DEFAULT_MAX_REQUEST_BODY, |b| b.as_u64()),
            max_response_body: self
                .max_response_body
                .map_or(DEFAULT_MAX_RESPONSE_BODY, |b| b.as_u64()),
            refuse_all: None,
        };
        for (key, value) in [
            ("http.max_requests", u64::from(grant.max_requests)),
            ("http.max_request_body", grant.max_request_body),
            ("http.max_response_body", grant.max_response_body),
        ] {
            if value == 0 {
                return Err(WasmError::Manifest(format!("{key} must be more than 0")));
            }
        }
        Ok(grant)
    }
}

impl HttpGrant {
    /// The rule allowing `method` on `uri`, or why none does.
    ///
    /// # Errors
    /// The reason, in words, for the log.
    pub fn check(&self, method: &http::Method, uri: &http::Uri) -> Result<&AllowRule, String> {
        if let Some(reason) = &self.refuse_all {
            return Err(reason.clone());
        }
        if let Some(methods) = &self.methods
            && !methods.iter().any(|m| m == method.as_str())
        {
            return Err(format!(
                "method {method} is not among http.methods ({})",
                methods.join(", ")
            ));
        }
        let scheme = uri.scheme_str().unwrap_or("").to_ascii_lowercase();
        let Some(authority) = uri.authority() else {
            return Err(format!("{uri} has no host"));
        };
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let port = authority
            .port_u16()
            .unwrap_or_else(|| default_port(&scheme));
        self.allow
            .iter()
            .find(|rule| rule.allows(&scheme, &host, port, uri.path()))
            .ok_or_else(|| {
                format!(
                    "{scheme}://{host}:{port}{} is not in http.allow ({})",
                    uri.path(),
                    self.allow
                        .iter()
                        .map(|r| r.text.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    }
}

/// The class of an address a handler may not reach unless it is listed explicitly:
/// loopback, private, link-local, shared (carrier-grade NAT), unspecified, multicast,
/// broadcast, documentation or unique-local; `None` for a public address.
pub fn restricted_class(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            if v4.is_loopback() {
                Some("loopback")
            } else if v4.is_private() {
                Some("private")
            } else if v4.is_link_local() {
                Some("link-local")
            } else if a == 100 && (64..128).contains(&b) {
                Some("shared (carrier-grade NAT)")
            } else if v4.is_unspecified() || a == 0 {
                Some("unspecified")
            } else if v4.is_multicast() || a >= 240 {
                Some("multicast or reserved")
            } else if v4.is_broadcast() {
                Some("broadcast")
            } else if v4.is_documentation() {
                Some("documentation")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return restricted_class(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.is_multicast() {
                Some("multicast")
            } else if first & 0xfe00 == 0xfc00 {
                Some("unique-local (private)")
            } else if first & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else {
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(text: &str) -> Result<HttpGrant, WasmError> {
        let manifest: HttpManifest =
            toml::from_str(text).map_err(|e| WasmError::Manifest(e.to_string()))?;
        manifest.resolve()
    }

    fn check(grant: &HttpGrant, method: &str, url: &str) -> Result<String, String> {
        let method = http::Method::from_bytes(method.as_bytes()).expect("method");
        let uri: http::Uri = url.parse().expect("url");
        grant.check(&method, &uri).map(|r| r.text.clone())
    }

    #[test]
    fn rules_match_scheme_host_port_path_and_method() {
        let g = grant(
            r#"allow = ["https://api.example.com", "http://127.0.0.1:9000/hooks/*", "http://h.test/exact"]
               methods = ["post", "GET"]"#,
        )
        .expect("grant");
        assert!(check(&g, "POST", "https://api.example.com/v1/x?y=1").is_ok());
        assert!(check(&g, "GET", "https://API.example.com:443/").is_ok());
        assert!(
            check(&g, "POST", "http://api.example.com/").is_err(),
            "scheme"
        );
        assert!(
            check(&g, "POST", "https://api.example.com:8443/").is_err(),
            "port"
        );
        assert!(
            check(&g, "POST", "https://evil.example.com/").is_err(),
            "host"
        );
        assert!(check(&g, "POST", "https://api.example.com.evil.test/").is_err());
        assert!(check(&g, "POST", "http://127.0.0.1:9000/hooks/orders").is_ok());
        assert!(
            check(&g, "POST", "http://127.0.0.1:9000/other").is_err(),
            "path"
        );
        assert!(check(&g, "POST", "http://h.test/exact").is_ok());
        assert!(check(&g, "POST", "http://h.test/exact/more").is_err());
        let refused = check(&g, "DELETE", "https://api.example.com/").expect_err("method");
        assert!(refused.contains("http.methods"), "{refused}");
        assert_eq!(
            g.allow[1].address,
            Some("127.0.0.1".parse().expect("ip")),
            "an IP literal is listed explicitly"
        );
    }

    #[test]
    fn bad_grants_say_why() {
        for (text, needle) in [
            ("allow = []", "empty"),
            ("allow = [\"ftp://x.test\"]", "neither http nor https"),
            ("allow = [\"x.test\"]", "scheme"),
            ("allow = [\"https://u:p@x.test\"]", "user information"),
            ("allow = [\"https://*.x.test\"]", "wildcard"),
            ("allow = [\"https://x.test/a*b\"]", "inside its path"),
            ("allow = [\"https://x.test/?q=1\"]", "query"),
            (
                "allow = [\"https://x.test\"]\nmethods = [\"GE T\"]",
                "not an HTTP method",
            ),
            (
                "allow = [\"https://x.test\"]\nmax_requests = 0",
                "max_requests",
            ),
            ("allow = [\"https://x.test\"]\nproxy = true", "proxy"),
        ] {
            let error = grant(text).expect_err(text).to_string();
            assert!(error.contains(needle), "{text}: {error}");
        }
    }

    #[test]
    fn restricted_addresses_are_named() {
        for (ip, class) in [
            ("127.0.0.1", "loopback"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("192.168.1.1", "private"),
            ("169.254.169.254", "link-local"),
            ("100.64.0.1", "shared (carrier-grade NAT)"),
            ("0.0.0.0", "unspecified"),
            ("::1", "loopback"),
            ("fd00::1", "unique-local (private)"),
            ("fe80::1", "link-local"),
            ("::ffff:10.0.0.1", "private"),
        ] {
            assert_eq!(
                restricted_class(ip.parse().expect("ip")),
                Some(class),
                "{ip}"
            );
        }
        for ip in ["93.184.216.34", "2606:4700::1111", "1.1.1.1"] {
            assert_eq!(restricted_class(ip.parse().expect("ip")), None, "{ip}");
        }
    }
}
