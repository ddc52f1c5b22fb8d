//! The server's listener: each HTTP/1 request head is looked at before hyper parses it, so that
//! requests hyper would refuse with a bare status line and no body get the API's JSON error
//! envelope instead.
//!
//! hyper answers a request target the `http` crate cannot parse (an unencoded `>` or `"` in a
//! query, say), too many headers or too long a head with `400`/`431`/`414` and an empty body,
//! before any router code runs. [`CheckedIo`] follows the request framing of the bytes a client
//! sends (heads, `Content-Length` bodies) and holds each head back until it is complete; a head
//! that hyper would refuse is withheld, hyper sees the end of the stream after the requests
//! before it, and once hyper has answered those and shuts the connection down, the JSON error
//! is written in its place (`connection: close`).
//!
//! Anything this does not fully follow is passed through untouched for hyper to judge: the
//! HTTP/2 preface, request heads httparse refuses for other reasons, `Transfer-Encoding`
//! bodies and upgrades (WebSocket) make the rest of the connection pass through unchecked.

mod requests;
mod responses;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use requests::{Framing, State};
use responses::Responses;

/// Bytes read from the socket at a time while checking.
const READ_CHUNK: usize = 8192;

/// A listener whose connections are [`CheckedIo`].
pub struct CheckedListener<L> {
    inner: L,
}

impl<L> CheckedListener<L> {
    /// Wraps `inner`.
    pub fn new(inner: L) -> Self {
        CheckedListener { inner }
    }
}

impl<L> axum::serve::Listener for CheckedListener<L>
where
    L: axum::serve::Listener,
{
    type Io = CheckedIo<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = self.inner.accept().await;
        (CheckedIo::new(io), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A connection whose incoming request heads are checked (see the module docs).
pub struct CheckedIo<T> {
    inner: T,
    /// Bytes read from the client that hyper has not been given yet.
    pending: BytesMut,
    /// How many bytes at the front of `pending` hyper may have.
    ready: usize,
    framing: Framing,
    /// The responses hyper has written, to know when it has answered all it was given.
    responses: Responses,
    /// hyper's read, parked while a withheld request waits for earlier answers.
    parked: Option<Waker>,
    eof: bool,
    /// Bytes of the rejection response already written.
    written: usize,
}

impl<T> CheckedIo<T> {
    /// Wraps a fresh connection.
    pub fn new(inner: T) -> Self {
        CheckedIo {
            inner,
            pending: BytesMut::new(),
            ready: 0,
            framing: Framing::new(),
            responses: Responses::new(),
            parked: None,
            eof: false,
            written: 0,
        }
    }

    /// Classifies newly read bytes, recording the requests let through.
    fn advance(&mut self) {
        self.ready = self.framing.advance(&self.pending, 0, self.eof);
        for head in self.framing.released.drain(..) {
            self.responses.expect(head);
        }
        if self.framing.state == State::Passthrough {
            self.responses.untrack();
        }
    }

    /// Follows bytes hyper wrote; wakes a parked read once everything is answered.
    fn wrote(&mut self, bytes: &[u8]) {
        self.responses.feed(bytes);
        if self.responses.all_answered() == Some(true)
            && let Some(waker) = self.parked.take()
        {
            waker.wake();
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CheckedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.ready > 0 {
                let n = this.ready.min(out.remaining());
                out.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                this.ready -= n;
                return Poll::Ready(Ok(()));
            }
            match this.framing.state {
                // A withheld request: the stream ends for hyper once it has answered all
                // requests before it (ending it earlier would make hyper drop the one in
                // progress). When that cannot be known (a close-delimited body), hyper closes
                // by itself after that response.
                State::Rejected(_) => {
                    if this.responses.all_answered() == Some(true) {
                        return Poll::Ready(Ok(()));
                    }
                    this.parked = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                State::Passthrough if this.pending.is_empty() => {
                    return Pin::new(&mut this.inner).poll_read(cx, out);
                }
                _ => {}
            }
            if this.eof {
                this.advance();
                if this.ready == 0 {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut chunk = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut chunk))?;
            if chunk.filled().is_empty() {
                this.eof = true;
            }
            this.pending.extend_from_slice(chunk.filled());
            this.advance();
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CheckedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        this.wrote(&buf[..written]);
        Poll::Ready(Ok(written))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut left = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs))?;
        let written = left;
        for buf in bufs {
            if left == 0 {
                break;
            }
            let n = left.min(buf.len());
            this.wrote(&buf[..n]);
            left -= n;
        }
        Poll::Ready(Ok(written))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    /// Writes the pending rejection (if any) after hyper's last response, then shuts down.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let State::Rejected(response) = &this.framing.state {
            while this.written < response.len() {
                let n =
                    ready!(Pin::new(&mut this.inner).poll_write(cx, &response[this.written..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                this.written += n;
            }
            ready!(Pin::new(&mut this.inner).poll_flush(cx))?;
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Reads what `io` lets through until it would wait (the client's bytes are all in
    /// memory, so waiting means withheld) or ends.
    fn read_available<T: AsyncRead + Unpin>(io: &mut CheckedIo<T>) -> (Vec<u8>, bool) {
        use futures::FutureExt;
        let mut seen = Vec::new();
        let mut buf = [0u8; 64];
        loop {
            match io.read(&mut buf).now_or_never() {
                Some(Ok(0)) => return (seen, true),
                Some(Ok(n)) => seen.extend_from_slice(&buf[..n]),
                Some(Err(error)) => panic!("read failed: {error}"),
                None => return (seen, false),
            }
        }
    }

    #[tokio::test]
    async fn the_rejection_waits_for_earlier_answers_and_is_written_at_shutdown() {
        let (client, server) = tokio::io::duplex(1 << 16);
        let mut io = CheckedIo::new(server);
        let (mut client_read, mut client_write) = tokio::io::split(client);
        client_write
            .write_all(b"GET /a HTTP/1.1\r\n\r\nGET /a?b>c HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        // hyper gets the good request; the stream does not end while it is unanswered.
        let (seen, ended) = read_available(&mut io);
        assert_eq!(seen, b"GET /a HTTP/1.1\r\n\r\n");
        assert!(!ended, "the stream must not end before the answer");
        io.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await
            .unwrap();
        let (seen, ended) = read_available(&mut io);
        assert!(
            seen.is_empty() && ended,
            "answered: now the stream ends for hyper"
        );
        io.shutdown().await.unwrap();
        drop(io);
        let mut answer = String::new();
        client_read.read_to_string(&mut answer).await.unwrap();
        let (first, second) = answer.split_once("ok").unwrap();
        assert!(first.starts_with("HTTP/1.1 200 OK"));
        assert!(second.starts_with("HTTP/1.1 400 Bad Request"), "{answer}");
        assert!(second.ends_with("}}"), "{answer}");
    }
}
