//! Guest stdout/stderr turned into log lines.
//!
//! wasmtime-wasi ships in-memory pipes, but they fail the guest's write once
//! full and only hand over bytes at the end. Functions need lines delivered as
//! they are written (for `logs --follow`) and a cap that truncates instead of
//! breaking the guest, so this small stream is written here.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

use crate::labels::RequestLabels;

/// Which guest stream a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStream {
    /// The guest's standard output.
    Stdout,
    /// The guest's standard error.
    Stderr,
}

impl LogStream {
    /// The stream's conventional name.
    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
        }
    }
}

/// Receives the log lines of every invocation on the node.
///
/// Called from the guest's write path, once per complete line: it must not
/// block (queue the line and return).
pub trait LogSink: Send + Sync {
    /// One line written by the guest, without its trailing newline.
    fn line(&self, labels: &RequestLabels, stream: LogStream, line: &str);
}

/// Longest line kept whole; longer output is split so one write without a
/// newline cannot grow the buffer without bound.
const MAX_LINE_BYTES: usize = 16 * 1024;

/// Line splitting and the per-invocation byte cap for one guest stream.
struct LineSplitter {
    labels: Arc<RequestLabels>,
    sink: Arc<dyn LogSink>,
    stream: LogStream,
    partial: Vec<u8>,
    bytes_left: usize,
    truncated: bool,
}

impl LineSplitter {
    fn write(&mut self, mut bytes: &[u8]) {
        if self.truncated {
            return;
        }
        if bytes.len() > self.bytes_left {
            bytes = &bytes[..self.bytes_left];
            self.truncated = true;
        }
        self.bytes_left -= bytes.len();
        for piece in bytes.split_inclusive(|&b| b == b'\n') {
            match piece.strip_suffix(b"\n") {
                Some(rest) => {
                    self.partial.extend_from_slice(rest);
                    // A blank line the guest printed is a line too.
                    self.send_line();
                }
                None => {
                    self.partial.extend_from_slice(piece);
                    if self.partial.len() >= MAX_LINE_BYTES {
                        self.emit();
                    }
                }
            }
        }
        if self.truncated {
            self.emit();
            self.truncation_marker();
        }
    }

    fn truncation_marker(&self) {
        self.sink.line(
            &self.labels,
            self.stream,
            "[mayfly] log output truncated: this invocation reached its log limit",
        );
    }

    /// A whole line from the host. It ends any partial guest line first (so
    /// the two never merge) and counts toward the cap, so a guest that
    /// provokes host lines in a loop cannot flood the log either.
    fn host_line(&mut self, line: &str) {
        if self.truncated {
            return;
        }
        self.emit();
        let cost = line.len() + 1;
        if cost > self.bytes_left {
            self.bytes_left = 0;
            self.truncated = true;
            self.truncation_marker();
            return;
        }
        self.bytes_left -= cost;
        self.sink.line(&self.labels, self.stream, line);
    }

    /// Sends what is pending as a line, if anything is: a partial line
    /// ended by the cap, a host line, or the invocation's end.
    fn emit(&mut self) {
        if !self.partial.is_empty() {
            self.send_line();
        }
    }

    /// Sends what is pending as one line, even an empty one.
    fn send_line(&mut self) {
        let line = String::from_utf8_lossy(&self.partial);
        let line = line.strip_suffix('\r').unwrap_or(&line);
        self.sink.line(&self.labels, self.stream, line);
        self.partial.clear();
    }
}

impl Drop for LineSplitter {
    // The store, and with it this splitter, is dropped when the invocation
    // ends: a last line without a newline is still a line.
    fn drop(&mut self) {
        self.emit();
    }
}

/// A guest stdout or stderr that forwards complete lines to a [`LogSink`].
#[derive(Clone)]
pub(crate) struct GuestOutput(Arc<Mutex<LineSplitter>>);

impl GuestOutput {
    pub(crate) fn new(
        labels: Arc<RequestLabels>,
        sink: Arc<dyn LogSink>,
        stream: LogStream,
        max_bytes: usize,
    ) -> Self {
        Self(Arc::new(Mutex::new(LineSplitter {
            labels,
            sink,
            stream,
            partial: Vec::new(),
            bytes_left: max_bytes,
            truncated: false,
        })))
    }

    /// Ends the current invocation's output (a last partial line is still a
    /// line) and starts `labels`'s, with a fresh byte allowance: for a kept
    /// instance that serves one request after another.
    pub(crate) fn rebind(&self, labels: Arc<RequestLabels>, max_bytes: usize) {
        let mut splitter = self.0.lock().unwrap_or_else(|p| p.into_inner());
        splitter.emit();
        splitter.labels = labels;
        splitter.bytes_left = max_bytes;
        splitter.truncated = false;
    }

    /// Writes one line on behalf of the host (a refused capability, say), so
    /// it shows up in the function's own log next to its output. `line` must
    /// not contain newlines: escape guest-controlled text in it.
    pub(crate) fn host_line(&self, line: &str) {
        let mut splitter = self.0.lock().unwrap_or_else(|p| p.into_inner());
        splitter.host_line(line);
    }

    /// Who is writing now: the invocation this stream is bound to.
    pub(crate) fn labels(&self) -> Arc<RequestLabels> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .labels
            .clone()
    }

    /// Emits the last partial line of the current invocation.
    pub(crate) fn finish(&self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).emit();
    }

    fn write(&self, bytes: &[u8]) {
        // A poisoned lock means a sink panicked mid-line; keep logging.
        let mut splitter = self.0.lock().unwrap_or_else(|p| p.into_inner());
        splitter.write(bytes);
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl Pollable for GuestOutput {
    async fn ready(&mut self) {}
}

impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        GuestOutput::write(self, &bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        // Output past the cap is dropped, never refused, so a chatty guest
        // keeps running; the permit only bounds one write's allocation.
        Ok(64 * 1024)
    }
}

impl AsyncWrite for GuestOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        GuestOutput::write(&self, buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Collect(Mutex<Vec<String>>);

    impl LogSink for Collect {
        fn line(&self, _: &RequestLabels, stream: LogStream, line: &str) {
            self.0
                .lock()
                .unwrap()
                .push(format!("{}:{line}", stream.as_str()));
        }
    }

    fn output(sink: &Arc<Collect>, max: usize) -> GuestOutput {
        GuestOutput::new(
            RequestLabels::for_test("f"),
            sink.clone(),
            LogStream::Stdout,
            max,
        )
    }

    #[test]
    fn splits_lines_across_writes_and_flushes_the_tail() {
        let sink = Arc::new(Collect::default());
        let out = output(&sink, 1024);
        out.write(b"one\ntw");
        out.write(b"o\r\nthree");
        drop(out);
        assert_eq!(
            *sink.0.lock().unwrap(),
            ["stdout:one", "stdout:two", "stdout:three"]
        );
    }

    #[test]
    fn blank_lines_are_kept() {
        let sink = Arc::new(Collect::default());
        let out = output(&sink, 1024);
        out.write(b"a\n\nb\n");
        out.write(b"\r\n");
        drop(out);
        assert_eq!(
            *sink.0.lock().unwrap(),
            ["stdout:a", "stdout:", "stdout:b", "stdout:"]
        );
    }

    #[test]
    fn truncates_at_the_cap_with_a_marker() {
        let sink = Arc::new(Collect::default());
        let out = output(&sink, 6);
        out.write(b"abc\ndefgh\n");
        out.write(b"more\n");
        drop(out);
        let lines = sink.0.lock().unwrap();
        assert_eq!(lines[0], "stdout:abc");
        assert_eq!(lines[1], "stdout:de");
        assert!(lines[2].contains("truncated"));
        assert_eq!(lines.len(), 3);
    }

    #[test]
    fn host_lines_end_a_partial_line_and_count_toward_the_cap() {
        let sink = Arc::new(Collect::default());
        let out = output(&sink, 24);
        out.write(b"partial");
        out.host_line("mayfly: denied");
        out.host_line("mayfly: denied again");
        out.host_line("mayfly: dropped");
        drop(out);
        let lines = sink.0.lock().unwrap();
        assert_eq!(lines[0], "stdout:partial");
        assert_eq!(lines[1], "stdout:mayfly: denied");
        assert!(lines[2].contains("truncated"));
        assert_eq!(lines.len(), 3);
    }
}
