//! Follows the responses hyper writes on a connection, to know when every request it was given
//! has been answered completely (heads, `Content-Length` and chunked bodies, interim `1xx`).
//!
//! hyper closes a connection at once, dropping the request in progress, when its client's
//! stream ends in the middle of a request; so a withheld request may only be replaced by the
//! end of the stream once hyper has nothing left to answer.

use std::collections::VecDeque;

/// Longest response head or chunk-size line followed.
const MAX_LINE: usize = 64 * 1024;

/// Where the framing of the written bytes stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// At (or inside, with `head` holding its start) a response head.
    Head,
    /// Inside a body of this many remaining bytes.
    Body(u64),
    /// Inside a chunked body.
    Chunked(Chunk),
    /// Not followed: a close-delimited body, a protocol switch, or something unexpected.
    Untracked,
}

/// Where a chunked body stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Chunk {
    /// Reading a chunk-size line (its start in `line`).
    Size,
    /// Inside chunk data of this many remaining bytes.
    Data(u64),
    /// This many bytes of the CRLF after chunk data remain.
    DataEnd(u8),
    /// Reading trailer lines until the empty one.
    Trailers,
}

/// The responses written so far on one connection.
#[derive(Debug)]
pub(super) struct Responses {
    state: State,
    /// The start of a response head or of a chunked-body line, not yet complete.
    line: Vec<u8>,
    /// For each request given to hyper and not yet answered: whether it was a `HEAD`.
    awaiting: VecDeque<bool>,
}

impl Responses {
    pub(super) fn new() -> Self {
        Responses {
            state: State::Head,
            line: Vec::new(),
            awaiting: VecDeque::new(),
        }
    }

    /// A request (a `HEAD` when `head`) was given to hyper and awaits its response.
    pub(super) fn expect(&mut self, head: bool) {
        self.awaiting.push_back(head);
    }

    /// Stops following (the requests are no longer followed either).
    pub(super) fn untrack(&mut self) {
        self.state = State::Untracked;
        self.line.clear();
    }

    /// Whether every request given to hyper has been answered completely. `None` when that
    /// cannot be known.
    pub(super) fn all_answered(&self) -> Option<bool> {
        match self.state {
            State::Untracked => None,
            State::Head => Some(self.awaiting.is_empty() && self.line.is_empty()),
            _ => Some(false),
        }
    }

    /// Follows `bytes`, written after everything fed before.
    pub(super) fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Untracked => return,
                State::Body(remaining) => {
                    let take = (*remaining).min(bytes.len() as u64);
                    *remaining -= take;
                    bytes = &bytes[take as usize..];
                    if *remaining == 0 {
                        self.state = State::Head;
                    }
                }
                State::Head => {
                    let Some(used) = self.take_until(bytes, b"\r\n\r\n") else {
                        return;
                    };
                    bytes = &bytes[used..];
                    let head = std::mem::take(&mut self.line);
                    self.state = self.after_head(&head);
                }
                State::Chunked(Chunk::Data(remaining)) => {
                    let take = (*remaining).min(bytes.len() as u64);
                    *remaining -= take;
                    bytes = &bytes[take as usize..];
                    if *remaining == 0 {
                        self.state = State::Chunked(Chunk::DataEnd(2));
                    }
                }
                State::Chunked(Chunk::DataEnd(remaining)) => {
                    let take = (*remaining).min(bytes.len().min(2) as u8);
                    *remaining -= take;
                    bytes = &bytes[take as usize..];
                    if *remaining == 0 {
                        self.state = State::Chunked(Chunk::Size);
                    }
                }
                State::Chunked(Chunk::Size) => {
                    let Some(used) = self.take_until(bytes, b"\n") else {
                        return;
                    };
                    bytes = &bytes[used..];
                    let line = std::mem::take(&mut self.line);
                    self.state = match chunk_size(&line) {
                        Some(0) => State::Chunked(Chunk::Trailers),
                        Some(size) => State::Chunked(Chunk::Data(size)),
                        None => State::Untracked,
                    };
                }
                State::Chunked(Chunk::Trailers) => {
                    let Some(used) = self.take_until(bytes, b"\n") else {
                        return;
                    };
                    bytes = &bytes[used..];
                    let line = std::mem::take(&mut self.line);
                    if line == b"\r\n" || line == b"\n" {
                        self.state = State::Head;
                    }
                }
            }
        }
    }

    /// Appends `bytes` to `line` up to and including `end`; returns how many were used, or
    /// `None` if all were (no `end` yet). An overlong line stops the following.
    fn take_until(&mut self, bytes: &[u8], end: &[u8]) -> Option<usize> {
        let from = self.line.len().saturating_sub(end.len() - 1);
        let before = self.line.len();
        self.line.extend_from_slice(bytes);
        match self.line[from..]
            .windows(end.len())
            .position(|window| window == end)
        {
            Some(at) => {
                let line_end = from + at + end.len();
                self.line.truncate(line_end);
                Some(line_end - before)
            }
            None => {
                if self.line.len() > MAX_LINE {
                    self.untrack();
                }
                None
            }
        }
    }

    /// The state after a complete response head.
    fn after_head(&mut self, head: &[u8]) -> State {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(_)) = response.parse(head) else {
            return State::Untracked;
        };
        let code = response.code.unwrap_or(0);
        if code == 101 {
            return State::Untracked;
        }
        if (100..200).contains(&code) {
            return State::Head;
        }
        let Some(request_was_head) = self.awaiting.pop_front() else {
            return State::Untracked;
        };
        if request_was_head || code == 204 || code == 304 {
            return State::Head;
        }
        let header = |name: &str| {
            response
                .headers
                .iter()
                .find(|header| header.name.eq_ignore_ascii_case(name))
                .and_then(|header| std::str::from_utf8(header.value).ok())
        };
        if let Some(encoding) = header("transfer-encoding") {
            return if encoding
                .to_ascii_lowercase()
                .trim_end()
                .ends_with("chunked")
            {
                State::Chunked(Chunk::Size)
            } else {
                State::Untracked
            };
        }
        match header("content-length").and_then(|value| value.trim().parse::<u64>().ok()) {
            Some(0) => State::Head,
            Some(length) => State::Body(length),
            None => State::Untracked,
        }
    }
}

/// The size of a chunk-size line (`1a;ext=x\r\n`).
fn chunk_size(line: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(line).ok()?;
    let size = text.split(';').next()?.trim();
    u64::from_str_radix(size, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_in_chunks(responses: &mut Responses, bytes: &[u8], chunk: usize) -> Vec<Option<bool>> {
        bytes
            .chunks(chunk)
            .map(|piece| {
                responses.feed(piece);
                responses.all_answered()
            })
            .collect()
    }

    #[test]
    fn answered_once_every_response_is_complete() {
        let written = b"HTTP/1.1 100 Continue\r\n\r\n\
HTTP/1.1 202 Accepted\r\ncontent-length: 5\r\n\r\nhello\
HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n\
HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\n\r\n\
HTTP/1.1 204 No Content\r\n\r\n";
        for chunk in [1, 3, 17, 4096] {
            let mut responses = Responses::new();
            for head in [false, true, false, false] {
                responses.expect(head);
            }
            let states = feed_in_chunks(&mut responses, written, chunk);
            assert_eq!(states.last(), Some(&Some(true)), "chunk {chunk}");
            assert!(
                states[..states.len() - 1].iter().all(|s| *s == Some(false)),
                "answered only at the very end (chunk {chunk})"
            );
        }
    }

    #[test]
    fn an_unfinished_body_or_an_unanswered_request_is_not_answered() {
        let mut responses = Responses::new();
        responses.expect(false);
        responses.expect(false);
        responses.feed(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
        assert_eq!(responses.all_answered(), Some(false), "one request left");
        responses.feed(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nok");
        assert_eq!(responses.all_answered(), Some(false), "body unfinished");
        responses.feed(b"ok");
        assert_eq!(responses.all_answered(), Some(true));
    }

    #[test]
    fn unfollowable_responses_are_unknown() {
        for written in [
            &b"HTTP/1.1 101 Switching Protocols\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\n\r\nclose-delimited",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
        ] {
            let mut responses = Responses::new();
            responses.expect(false);
            responses.feed(written);
            assert_eq!(responses.all_answered(), None);
        }
    }
}
