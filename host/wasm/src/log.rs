//! The log of one invocation: host `log` lines and the guest's stdout and stderr split into
//! lines, capped in lines and bytes (the rest is counted, not kept). Splitting is linear in
//! the bytes written, however the guest cuts its writes.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};

use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

/// One captured log line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LogLine {
    /// `trace`, `debug`, `info`, `warn`, `error`, or `stdout`/`stderr` for captured output.
    pub level: &'static str,
    /// The text.
    pub message: String,
}

/// The unfinished last line of one output stream.
#[derive(Debug, Default)]
struct Partial {
    bytes: Vec<u8>,
    /// The line grew past the byte budget: it was counted as dropped, and the rest of it up
    /// to the next newline is skipped.
    skipping: bool,
}

/// Writes a warning the host raises about `handler`'s invocation (a refused capability, a cap
/// reached) to the host's log and to the invocation's `log`, where the guest's operator sees
/// it in the failure's log tail.
pub(crate) fn host_warning(log: &std::sync::Mutex<LogSink>, handler: &str, message: String) {
    tracing::warn!(%handler, "{message}");
    log.lock()
        .unwrap_or_else(|p| p.into_inner())
        .push("warn", message);
}

/// The log of one invocation, capped in lines and bytes; the rest is counted, not kept.
#[derive(Debug, Default)]
pub struct LogSink {
    lines: Vec<LogLine>,
    bytes: usize,
    dropped: usize,
    max_lines: usize,
    max_bytes: usize,
    partial: [Partial; 2],
    /// Bytes written to stdout and stderr since last taken (charged to the guest's fuel).
    written: usize,
    /// Bytes examined while splitting lines (to prove that splitting is linear).
    #[cfg(test)]
    examined: usize,
}

impl LogSink {
    /// An empty log with these budgets.
    pub(crate) fn new(max_lines: usize, max_bytes: usize) -> Self {
        LogSink {
            max_lines,
            max_bytes,
            ..LogSink::default()
        }
    }

    /// Whether a line of `len` bytes fits the remaining budget.
    pub(crate) fn fits(&self, len: usize) -> bool {
        self.lines.len() < self.max_lines && self.bytes + len <= self.max_bytes
    }

    /// Records a line; returns false if it was over budget and dropped.
    pub(crate) fn push(&mut self, level: &'static str, message: String) -> bool {
        if !self.fits(message.len()) {
            self.dropped += 1;
            return false;
        }
        self.bytes += message.len();
        self.lines.push(LogLine { level, message });
        true
    }

    /// Counts a line that was over budget without receiving it.
    pub(crate) fn count_dropped(&mut self) {
        self.dropped += 1;
    }

    /// Appends output of stream 0 (stdout) or 1 (stderr), emitting each completed line. Every
    /// byte is examined once and copied at most once.
    pub(crate) fn write_stream(&mut self, stream: usize, mut bytes: &[u8]) {
        let level = if stream == 0 { "stdout" } else { "stderr" };
        self.written += bytes.len();
        while let Some(end) = bytes.iter().position(|&b| b == b'\n') {
            #[cfg(test)]
            {
                self.examined += end + 1;
            }
            let (line, rest) = (&bytes[..end], &bytes[end + 1..]);
            bytes = rest;
            let room = self.fits(0);
            let partial = &mut self.partial[stream];
            if std::mem::take(&mut partial.skipping) {
                continue;
            }
            if partial.bytes.len() + line.len() > self.max_bytes || !room {
                partial.bytes.clear();
                self.dropped += 1;
                continue;
            }
            let mut text = std::mem::take(&mut partial.bytes);
            text.extend_from_slice(line);
            self.push(level, String::from_utf8_lossy(&text).into_owned());
        }
        #[cfg(test)]
        {
            self.examined += bytes.len();
        }
        let partial = &mut self.partial[stream];
        if partial.skipping || bytes.is_empty() {
            return;
        }
        // Guard against a guest writing an endless line without newlines.
        if partial.bytes.len() + bytes.len() > self.max_bytes {
            partial.bytes.clear();
            partial.skipping = true;
            self.dropped += 1;
        } else {
            partial.bytes.extend_from_slice(bytes);
        }
    }

    /// Bytes written to stdout and stderr since the last call.
    pub(crate) fn take_written(&mut self) -> usize {
        std::mem::take(&mut self.written)
    }

    /// Ends the invocation: the kept lines (unfinished output lines included) and how many
    /// were dropped. The budgets are not reset; a new invocation starts from a new sink.
    pub(crate) fn finish(&mut self) -> (Vec<LogLine>, usize) {
        for stream in 0..2 {
            let rest = std::mem::take(&mut self.partial[stream]);
            if !rest.bytes.is_empty() {
                let level = if stream == 0 { "stdout" } else { "stderr" };
                self.push(level, String::from_utf8_lossy(&rest.bytes).into_owned());
            }
        }
        (
            std::mem::take(&mut self.lines),
            std::mem::replace(&mut self.dropped, 0),
        )
    }
}

/// A guest's stdout or stderr, written into the invocation's [`LogSink`].
#[derive(Clone)]
pub(crate) struct CapturedOutput {
    pub(crate) sink: Arc<Mutex<LogSink>>,
    pub(crate) stream: usize,
}

impl IsTerminal for CapturedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CapturedOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl AsyncWrite for CapturedOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.sink
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write_stream(self.stream, buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_sink_caps_lines_and_bytes_and_splits_streams() {
        let mut sink = LogSink::new(3, 1000);
        sink.write_stream(0, b"hello\nwor");
        sink.write_stream(0, b"ld\n");
        sink.push("info", "direct".into());
        sink.push("info", "over".into());
        sink.write_stream(1, b"tail without newline");
        let (lines, dropped) = sink.finish();
        let texts: Vec<_> = lines
            .iter()
            .map(|l| (l.level, l.message.as_str()))
            .collect();
        assert_eq!(
            texts,
            [("stdout", "hello"), ("stdout", "world"), ("info", "direct")]
        );
        assert_eq!(dropped, 2);
        let mut small = LogSink::new(100, 10);
        small.push("info", "0123456789".into());
        assert!(!small.push("info", "x".into()));
        let mut endless = LogSink::new(100, 8);
        endless.write_stream(0, &[b'x'; 64]);
        let (lines, dropped) = endless.finish();
        assert!(lines.is_empty());
        assert_eq!(dropped, 1);
    }

    #[test]
    fn an_over_long_line_is_dropped_once_and_the_next_line_is_kept() {
        let mut sink = LogSink::new(100, 16);
        for _ in 0..10 {
            sink.write_stream(0, b"0123456789");
        }
        sink.write_stream(0, b"end of the long line\nnext\n");
        let (lines, dropped) = sink.finish();
        assert_eq!(dropped, 1, "{lines:?}");
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].message, "next");
    }

    #[test]
    fn splitting_is_linear_in_the_bytes_written() {
        // One byte per write: a splitter that rescans the partial line on every write
        // examines ~n²/2 bytes (here ~10¹¹); this one examines each byte once.
        let n = 1 << 20;
        let mut sink = LogSink::new(100, 2 * n);
        for _ in 0..n {
            sink.write_stream(0, b"x");
        }
        for _ in 0..n {
            sink.write_stream(0, b"y\n");
        }
        assert!(sink.examined <= 3 * n, "examined {} bytes", sink.examined);
        assert_eq!(sink.take_written(), 3 * n);
        let (lines, dropped) = sink.finish();
        assert_eq!(lines.len(), 100);
        assert_eq!(lines[0].message.len(), n + 1);
        assert!(dropped > 0);
    }
}
