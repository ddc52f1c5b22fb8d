//! The framing of the bytes a client sends: request heads (held back until complete, then
//! checked), `Content-Length` bodies, and where following stops.

use axum::http::{StatusCode, Uri};

use crate::http::ApiError;

/// Headers hyper accepts in one request (its default).
pub(super) const MAX_HEADERS: usize = 100;
/// Longest request head hyper buffers (its default read buffer: 8 KiB + 100 × 4 KiB).
pub(super) const MAX_HEAD: usize = 8192 + 4096 * 100;
/// Longest request target hyper accepts.
const MAX_TARGET: usize = (u16::MAX - 1) as usize;

/// Where the framing of the client's bytes stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum State {
    /// At the start of a request head.
    Head,
    /// Inside a body of this many remaining bytes.
    Body(u64),
    /// Not followed any more: everything passes.
    Passthrough,
    /// A head hyper would refuse: nothing more passes; this response is written at shutdown.
    Rejected(Vec<u8>),
}

/// What one look at a head found.
enum Head {
    /// More bytes are needed.
    Partial,
    /// A good head of `len` bytes (of a `HEAD` request when `head`); the framing continues
    /// with `next`.
    Complete { len: usize, head: bool, next: State },
    /// Not something this follows; hyper decides.
    Unfollowed,
    /// Refused with this error.
    Refused(ApiError),
}

/// The framing of the bytes a client sends, in the order sent.
#[derive(Debug)]
pub(super) struct Framing {
    pub(super) state: State,
    /// For each head let through since last taken: whether it was a `HEAD` request.
    pub(super) released: Vec<bool>,
    /// Bytes of the current (incomplete) head already searched for its end, so that a head
    /// trickling in byte by byte is scanned once, not once per byte.
    scanned: usize,
}

impl Framing {
    pub(super) fn new() -> Self {
        Framing {
            state: State::Head,
            released: Vec::new(),
            scanned: 0,
        }
    }

    /// Classifies `pending[ready..]` and returns how much of `pending` may now go to hyper.
    /// At `eof`, an incomplete head is let through for hyper to report.
    pub(super) fn advance(&mut self, pending: &[u8], mut ready: usize, eof: bool) -> usize {
        while ready < pending.len() {
            let rest = &pending[ready..];
            match &mut self.state {
                State::Passthrough => return pending.len(),
                State::Rejected(_) => return ready,
                State::Body(remaining) => {
                    let take = (*remaining).min(rest.len() as u64);
                    *remaining -= take;
                    ready += take as usize;
                    if *remaining == 0 {
                        self.state = State::Head;
                    }
                }
                State::Head => {
                    // Blank lines before a request are let through (hyper skips them).
                    let blank = rest
                        .iter()
                        .take_while(|byte| matches!(byte, b'\r' | b'\n'))
                        .count();
                    if blank > 0 && self.scanned == 0 {
                        ready += blank;
                        continue;
                    }
                    match self.head(rest) {
                        Head::Partial if eof => {
                            self.state = State::Passthrough;
                            return pending.len();
                        }
                        Head::Partial => return ready,
                        Head::Complete { len, head, next } => {
                            ready += len;
                            self.released.push(head);
                            self.scanned = 0;
                            self.state = next;
                        }
                        Head::Unfollowed => self.state = State::Passthrough,
                        Head::Refused(error) => {
                            self.state = State::Rejected(response(&error));
                            return ready;
                        }
                    }
                }
            }
        }
        ready
    }

    /// Looks for the end of the head at the start of `rest` (a blank line) and, once found,
    /// inspects the whole head.
    fn head(&mut self, rest: &[u8]) -> Head {
        let from = self.scanned.saturating_sub(2);
        let end = rest[from..]
            .windows(2)
            .position(|pair| pair == b"\n\n")
            .map(|at| from + at + 2)
            .into_iter()
            .chain(
                rest[from..]
                    .windows(3)
                    .position(|triple| triple == b"\n\r\n")
                    .map(|at| from + at + 3),
            )
            .min();
        let Some(end) = end else {
            self.scanned = rest.len();
            if rest.len() > MAX_HEAD {
                return Head::Refused(too_large(
                    "the request head is larger than the server accepts",
                ));
            }
            return Head::Partial;
        };
        match inspect(&rest[..end]) {
            // A head that ends where httparse says is complete; anything else is unusual.
            Head::Complete { len, head, next } if len == end => Head::Complete { len, head, next },
            Head::Complete { .. } | Head::Partial => Head::Unfollowed,
            other => other,
        }
    }
}

/// A complete HTTP/1.1 response carrying `error`, closing the connection.
fn response(error: &ApiError) -> Vec<u8> {
    let body = error.body().to_string();
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        error.status.as_u16(),
        error.status.canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// Inspects a request head (up to and including its blank line).
fn inspect(bytes: &[u8]) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let parsed = request.parse(bytes);
    if let Some(target) = request.path
        && let Err(error) = check_target(target)
    {
        return Head::Refused(error);
    }
    match parsed {
        Ok(httparse::Status::Partial) => Head::Partial,
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => Head::Refused(too_large(
            "the request head is larger than the server accepts",
        )),
        Ok(httparse::Status::Complete(len)) => Head::Complete {
            len,
            head: request.method == Some("HEAD"),
            next: body_framing(&request),
        },
        Err(httparse::Error::TooManyHeaders) => Head::Refused(too_large(format!(
            "a request may carry at most {MAX_HEADERS} headers"
        ))),
        // A byte httparse refuses in the target (a control character, say).
        Err(httparse::Error::Token) if request.method.is_some() && request.path.is_none() => {
            Head::Refused(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the request target contains a control character; percent-encode it",
            ))
        }
        // After a valid target, no `HTTP/1.x`: most often a space in the target.
        Err(httparse::Error::Version)
            if request.path.is_some() && !bytes.starts_with(b"PRI * HTTP/2.0") =>
        {
            Head::Refused(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the request line is not `METHOD TARGET HTTP/1.x`; a space in the target must be \
                 percent-encoded (%20)",
            ))
        }
        Err(_) => Head::Unfollowed,
    }
}

fn too_large(message: impl Into<String>) -> ApiError {
    ApiError::new(
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "headers_too_large",
        message,
    )
}

/// Refuses a request target hyper would refuse, saying whether the path or the query is at fault.
fn check_target(target: &str) -> Result<(), ApiError> {
    if target.len() > MAX_TARGET {
        return Err(ApiError::new(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!("the request target is longer than {MAX_TARGET} bytes"),
        ));
    }
    let Err(error) = Uri::try_from(target) else {
        return Ok(());
    };
    let shown: String = target.chars().take(200).collect();
    let in_query = target
        .split_once('?')
        .is_some_and(|(path, _)| Uri::try_from(path).is_ok());
    let (code, part) = if in_query {
        ("invalid_query", "query string")
    } else {
        ("invalid_path", "path")
    };
    Err(ApiError::new(
        StatusCode::BAD_REQUEST,
        code,
        format!(
            "the {part} of {shown:?} is not valid ({error}): percent-encode characters such as \
             space, \", <, > and \\ (e.g. > as %3E)"
        ),
    ))
}

/// How the body after a complete head is framed, as far as this follows it.
fn body_framing(request: &httparse::Request<'_, '_>) -> State {
    if request.method == Some("CONNECT") {
        return State::Passthrough;
    }
    let mut length = None;
    for header in request.headers.iter() {
        let name = header.name;
        if name.eq_ignore_ascii_case("upgrade") || name.eq_ignore_ascii_case("transfer-encoding") {
            return State::Passthrough;
        }
        if name.eq_ignore_ascii_case("content-length") {
            let parsed = std::str::from_utf8(header.value)
                .ok()
                .map(str::trim)
                .filter(|value| !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|value| value.parse::<u64>().ok());
            match (parsed, length) {
                (Some(value), None) => length = Some(value),
                (Some(value), Some(previous)) if value == previous => {}
                // Unusual or conflicting lengths: hyper judges them.
                _ => return State::Passthrough,
            }
        }
    }
    match length {
        Some(length) if length > 0 => State::Body(length),
        _ => State::Head,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` to a framing in chunks of `chunk` bytes; returns what passed and the
    /// rejection, if any.
    fn run(input: &[u8], chunk: usize) -> (Vec<u8>, Option<String>) {
        let mut framing = Framing::new();
        let mut pending = Vec::new();
        let mut passed = Vec::new();
        for piece in input.chunks(chunk) {
            pending.extend_from_slice(piece);
            let ready = framing.advance(&pending, 0, false);
            passed.extend(pending.drain(..ready));
        }
        let ready = framing.advance(&pending, 0, true);
        passed.extend(pending.drain(..ready));
        let rejected = match framing.state {
            State::Rejected(response) => Some(String::from_utf8(response).unwrap()),
            _ => None,
        };
        (passed, rejected)
    }

    #[test]
    fn good_requests_pass_whole_in_any_chunking() {
        let input = b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n{\"type\":\"a.b\",\"x\":\"GET /?a=> HTTP/1.1\"}\
GET /v1/events?type=a.%3E HTTP/1.1\r\nHost: x\r\n\r\n";
        for chunk in [1, 2, 7, 64, 4096] {
            let (passed, rejected) = run(input, chunk);
            assert_eq!(rejected, None, "chunk {chunk}");
            assert_eq!(passed, input, "chunk {chunk}");
        }
    }

    #[test]
    fn a_bad_target_is_withheld_after_the_good_requests_before_it() {
        let good = b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc";
        let bad = b"GET /v1/events?type=a>b HTTP/1.1\r\nHost: x\r\n\r\n";
        let input = [&good[..], &bad[..]].concat();
        for chunk in [1, 5, 4096] {
            let (passed, rejected) = run(&input, chunk);
            assert_eq!(passed, good, "chunk {chunk}");
            let rejected = rejected.expect("rejected");
            assert!(
                rejected.starts_with("HTTP/1.1 400 Bad Request\r\n"),
                "{rejected}"
            );
            assert!(
                rejected.contains("\"code\":\"invalid_query\""),
                "{rejected}"
            );
            let body = rejected.split("\r\n\r\n").nth(1).unwrap();
            assert!(rejected.contains(&format!("content-length: {}\r\n", body.len())));
        }
        let (_, rejected) = run(b"GET /a<b HTTP/1.1\r\n\r\n", 4096);
        assert!(rejected.unwrap().contains("invalid_path"));
    }

    #[test]
    fn unfollowed_framings_pass_through() {
        for input in [
            &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nGET /a>b HTTP/1.1\r\n\r\n"[..],
            b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /a>b HTTP/1.1\r\n\r\n",
            b"GET /v1/ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\x81\x05GET /a>b HTTP/1.1\r\n",
            b"POST /a HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxyGET /a>b HTTP/1.1\r\n\r\n",
            b"GET /a HTTP/1.1\r\nBad Header: x\r\n\r\nGET /a>b HTTP/1.1\r\n\r\n",
        ] {
            let (passed, rejected) = run(input, 3);
            assert_eq!(rejected, None);
            assert_eq!(passed, input);
        }
        // An incomplete head at the end of the stream goes to hyper, which reports it.
        let (passed, rejected) = run(b"GET /a HTTP/1.1\r\nHost:", 4);
        assert_eq!((passed.len(), rejected), (22, None));
    }

    #[test]
    fn oversized_heads_are_refused_with_431() {
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for n in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("x-{n}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        let (passed, rejected) = run(&many, 4096);
        assert!(passed.is_empty());
        assert!(rejected.unwrap().starts_with("HTTP/1.1 431 "));
        let huge = [&b"GET / HTTP/1.1\r\nx: "[..], &vec![b'a'; MAX_HEAD + 1]].concat();
        let (_, rejected) = run(&huge, 65536);
        assert!(rejected.unwrap().contains("headers_too_large"));
    }
}
