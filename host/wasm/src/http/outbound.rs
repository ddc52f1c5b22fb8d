//! Outbound HTTP of one guest store (`wasi:http/outgoing-handler`), checked against the
//! handler's `[http]` grant before anything leaves the host.
//!
//! Every request, redirects included (a guest's client that follows a redirect sends a new
//! request through here), is checked in this order, and refused with an error code the guest
//! sees (never a trap), the reason written to the invocation's log:
//! 1. a grant exists (a component without one cannot even be deployed);
//! 2. the invocation's request budget (`http.max_requests`) is not spent;
//! 3. the method and URL match an `http.allow` rule (`HTTP-request-denied`);
//! 4. the host's DNS answers are all public addresses, unless the rule names the address
//!    itself (`destination-IP-prohibited`); plain `http` then connects to the address that was
//!    checked, so a second lookup cannot swap it;
//! 5. the request runs under timeouts bounded by the invocation's remaining deadline, with its
//!    body capped at `http.max_request_body` and the response body at `http.max_response_body`.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

use super::grant::{DEFAULT_MAX_REQUEST_BODY, HttpGrant, restricted_class};
use crate::log::LogSink;
use eventbroker::metrics::Metrics;

type Sent = Box<
    dyn Future<
            Output = Result<
                (
                    http::Response<WasiBody>,
                    Box<dyn Future<Output = Result<(), Error>> + Send>,
                ),
                Error,
            >,
        > + Send,
>;

/// The outbound HTTP state of one guest store.
pub(crate) struct OutboundHttp {
    grant: Option<Arc<HttpGrant>>,
    handler: String,
    log: Arc<Mutex<LogSink>>,
    metrics: Option<Arc<Metrics>>,
    /// Requests made by the current invocation.
    requests: u32,
    /// The current invocation's deadline.
    deadline: Option<Instant>,
}

impl OutboundHttp {
    /// Outbound HTTP for `handler` under `grant` (none: every request is refused).
    pub(crate) fn new(
        grant: Option<Arc<HttpGrant>>,
        handler: String,
        log: Arc<Mutex<LogSink>>,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        OutboundHttp {
            grant,
            handler,
            log,
            metrics,
            requests: 0,
            deadline: None,
        }
    }

    /// Starts an invocation that must end by `deadline`: the request budget starts afresh.
    pub(crate) fn begin(&mut self, deadline: Instant) {
        self.requests = 0;
        self.deadline = Some(deadline);
    }

    /// Refuses `request` with `error`: the reason goes to the invocation's log and the
    /// metrics at once; the guest sees `error` once it has finished writing the request's
    /// body (see [`drain`]).
    fn refuse(&self, request: http::Request<WasiBody>, error: Error, reason: String) -> Sent {
        crate::log::host_warning(
            &self.log,
            &self.handler,
            format!("outbound HTTP refused: {reason}"),
        );
        if let Some(metrics) = &self.metrics {
            metrics.handler_http_request(&self.handler, "refused", Duration::ZERO, 0, 0);
        }
        let limit = self
            .grant
            .as_ref()
            .map_or(DEFAULT_MAX_REQUEST_BODY, |g| g.max_request_body);
        let within = self.remaining();
        Box::new(async move {
            drain(request.into_body(), limit, within).await;
            Err(error)
        })
    }

    /// What is left of the invocation's deadline (30 s outside an invocation).
    fn remaining(&self) -> Duration {
        self.deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(30))
    }
}

/// Reads and discards what the guest writes to the body of a request that will not be sent
/// (at most `limit` bytes, for at most `within`). A guest may hand a request to the host
/// before writing its body (JavaScript's `fetch` does): draining lets it finish writing, so
/// that it sees the refusal as the request's error code instead of a closed body stream,
/// which some guest runtimes cannot handle and abort on.
async fn drain(mut body: WasiBody, limit: u64, within: Duration) {
    let read = async {
        let mut seen = 0u64;
        while let Some(Ok(frame)) = body.frame().await {
            seen = seen.saturating_add(frame.data_ref().map_or(0, |d| d.len() as u64));
            if seen > limit {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(within, read).await;
}

/// A body that fails with `exceeded` once more than `limit` bytes went through, and counts
/// them into `seen`.
struct Capped {
    inner: WasiBody,
    limit: u64,
    seen: Arc<AtomicU64>,
    exceeded: fn(u64) -> Error,
    /// Called with the bytes seen when the body is dropped (read to its end or abandoned).
    on_drop: Option<Box<dyn FnOnce(u64) + Send>>,
    /// Where to say that the limit was exceeded (the guest may only see a stream error).
    log: Arc<Mutex<LogSink>>,
    /// The limit's key, for that message.
    key: &'static str,
}

impl Drop for Capped {
    fn drop(&mut self) {
        if let Some(on_drop) = self.on_drop.take() {
            on_drop(self.seen.load(Ordering::Relaxed));
        }
    }
}

impl Body for Capped {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            let total =
                self.seen.fetch_add(data.len() as u64, Ordering::Relaxed) + data.len() as u64;
            if total > self.limit {
                let message = format!(
                    "outbound HTTP body over {} ({}): cut off",
                    self.key,
                    bytesize::ByteSize::b(self.limit)
                );
                tracing::warn!("{message}");
                self.log
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push("warn", message);
                return Poll::Ready(Some(Err((self.exceeded)(self.limit))));
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}

/// What a capped body is limited to and reports to.
struct Cap {
    limit: u64,
    key: &'static str,
    exceeded: fn(u64) -> Error,
    log: Arc<Mutex<LogSink>>,
}

fn capped(
    inner: WasiBody,
    cap: Cap,
    seen: Arc<AtomicU64>,
    on_drop: Option<Box<dyn FnOnce(u64) + Send>>,
) -> WasiBody {
    Capped {
        inner,
        limit: cap.limit,
        seen,
        exceeded: cap.exceeded,
        on_drop,
        log: cap.log,
        key: cap.key,
    }
    .boxed_unsync()
}

/// The addresses `host` resolves to, each checked: `Err` names the first restricted one.
async fn resolve_public(host: &str, port: u16) -> Result<Vec<SocketAddr>, (Error, String)> {
    let addresses: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| {
            (
                Error::DnsError {
                    rcode: Some(e.to_string()),
                    info_code: None,
                },
                format!("cannot resolve {host}: {e}"),
            )
        })?
        .collect();
    if addresses.is_empty() {
        return Err((
            Error::DnsError {
                rcode: None,
                info_code: None,
            },
            format!("{host} resolves to no address"),
        ));
    }
    for address in &addresses {
        if let Some(class) = restricted_class(address.ip()) {
            return Err((
                Error::DestinationIpProhibited,
                format!(
                    "{host} resolves to {}, a {class} address; handlers reach such addresses only when http.allow names the address itself (e.g. http://{}:{port})",
                    address.ip(),
                    address.ip()
                ),
            ));
        }
    }
    Ok(addresses)
}

/// `uri` with its host replaced by `address` (plain HTTP only: the `Host` header keeps the
/// name).
fn pinned(uri: &http::Uri, address: IpAddr, port: u16) -> Option<http::Uri> {
    let authority = match address {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    };
    http::Uri::builder()
        .scheme(uri.scheme_str()?)
        .authority(authority)
        .path_and_query(uri.path_and_query().map_or("/", |p| p.as_str()))
        .build()
        .ok()
}

impl WasiHttpHooks for OutboundHttp {
    fn send_request(
        &mut self,
        mut request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> Sent {
        drop(fut);
        let Some(grant) = self.grant.clone() else {
            return self.refuse(
                request,
                Error::HttpRequestDenied,
                "the handler's manifest grants no outbound HTTP ([http] allow = [...])".into(),
            );
        };
        self.requests += 1;
        if self.requests > grant.max_requests {
            return self.refuse(
                request,
                Error::HttpRequestDenied,
                format!(
                    "request {} of this invocation is over http.max_requests ({})",
                    self.requests, grant.max_requests
                ),
            );
        }
        let rule = match grant.check(request.method(), request.uri()) {
            Ok(rule) => rule.clone(),
            Err(reason) => {
                let reason = format!("{} {}: {reason}", request.method(), request.uri());
                return self.refuse(request, Error::HttpRequestDenied, reason);
            }
        };
        let remaining = self.remaining();
        if remaining.is_zero() {
            return self.refuse(
                request,
                Error::ConnectionTimeout,
                "the invocation's deadline has passed".into(),
            );
        }
        // A little below the invocation's own deadline, so that the guest sees the request's
        // timeout as an error it can handle before the sandbox interrupts it.
        let remaining = remaining.mul_f32(0.9);
        let bound = |t: Option<Duration>| Some(t.map_or(remaining, |t| t.min(remaining)));
        let options = RequestOptions {
            connect_timeout: bound(options.and_then(|o| o.connect_timeout)),
            first_byte_timeout: bound(options.and_then(|o| o.first_byte_timeout)),
            between_bytes_timeout: bound(options.and_then(|o| o.between_bytes_timeout)),
        };
        let (handler, log, metrics) =
            (self.handler.clone(), self.log.clone(), self.metrics.clone());
        let sent_bytes = Arc::new(AtomicU64::new(0));
        let received_bytes = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        Box::new(async move {
            let note = |outcome: &str, reason: Option<String>| {
                if let Some(reason) = reason {
                    crate::log::host_warning(
                        &log,
                        &handler,
                        format!("outbound HTTP refused: {reason}"),
                    );
                }
                if let Some(metrics) = &metrics {
                    metrics.handler_http_request(
                        &handler,
                        outcome,
                        started.elapsed(),
                        sent_bytes.load(Ordering::Relaxed),
                        0,
                    );
                }
            };
            let address = match rule.address {
                Some(address) => address,
                None => match resolve_public(&rule.host, rule.port).await {
                    Ok(addresses) => addresses[0].ip(),
                    Err((error, reason)) => {
                        note("refused", Some(reason));
                        drain(request.into_body(), grant.max_request_body, remaining).await;
                        return Err(error);
                    }
                },
            };
            if rule.scheme == "http"
                && let Some(uri) = pinned(request.uri(), address, rule.port)
            {
                *request.uri_mut() = uri;
            }
            let request = request.map(|body| {
                capped(
                    body,
                    Cap {
                        limit: grant.max_request_body,
                        key: "http.max_request_body",
                        exceeded: |limit| Error::HttpRequestBodySize(Some(limit)),
                        log: log.clone(),
                    },
                    sent_bytes.clone(),
                    None,
                )
            });
            let sent = tokio::time::timeout(
                remaining,
                wasmtime_wasi_http::default_send_request(request, Some(options)),
            )
            .await;
            match sent {
                Ok(Ok((response, io))) => {
                    note(response.status().as_str(), None);
                    let count_received: Option<Box<dyn FnOnce(u64) + Send>> =
                        metrics.clone().map(|metrics| {
                            let handler = handler.clone();
                            Box::new(move |bytes| {
                                metrics.handler_http_bytes(&handler, "received", bytes)
                            }) as Box<dyn FnOnce(u64) + Send>
                        });
                    let response = response.map(|body| {
                        capped(
                            body.boxed_unsync(),
                            Cap {
                                limit: grant.max_response_body,
                                key: "http.max_response_body",
                                exceeded: |limit| Error::HttpResponseBodySize(Some(limit)),
                                log: log.clone(),
                            },
                            received_bytes.clone(),
                            count_received,
                        )
                    });
                    Ok((response, Box::new(io) as Box<dyn Future<Output = _> + Send>))
                }
                Ok(Err(error)) => {
                    note("error", None);
                    Err(error)
                }
                Err(_) => {
                    note(
                        "error",
                        Some(format!(
                            "no answer within the invocation's remaining {remaining:?}"
                        )),
                    );
                    Err(Error::HttpResponseTimeout)
                }
            }
        })
    }
}
