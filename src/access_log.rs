//! The access log: one line per HTTP request (JSON or Common Log Format),
//! buffered per core and written by a thread of its own.
//!
//! What must hold: the data path never blocks on the log and never waits
//! for disk: a worker appends lines to its own buffer and hands full (or
//! [`FLUSH_INTERVAL`]-old) buffers to the writer through a bounded queue;
//! when the writer falls behind and the queue is full, the batch is
//! dropped and its lines counted in `access_log_dropped`, never queued
//! without bound. Memory is bounded by [`BATCH_BYTES`] per core per log
//! file plus [`QUEUE_BATCHES`] batches. Lines the writer could not write
//! (a full disk, a deleted directory) are counted too ([`Control::lost`]).
//!
//! Rotation: [`Control::reopen`] (SIGUSR1, as nginx does, and SIGHUP)
//! makes the writer close every file and reopen it by name at the next
//! write, so after `mv` (logrotate's default) lines go to the new file.
//! A path is checked writable before it is used ([`check_writable`]), at
//! `pilotfish check`, at start and on every config swap.

use std::{
    cell::RefCell,
    collections::HashMap,
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, SystemTime},
};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use serde::Serialize;

use crate::{
    config::{AccessLog, LogFormat},
    metrics::{self, Counters},
};

/// A core's buffer for one log file is handed to the writer at this size:
/// large enough that a write(2) carries hundreds of lines, small enough
/// that a dropped batch loses a bounded number of them.
pub const BATCH_BYTES: usize = 64 * 1024;
/// Batches waiting for the writer (all cores, all files): 16 MiB at most.
/// A writer this far behind is stuck on its disk; traffic must not be.
pub const QUEUE_BATCHES: usize = 256;
/// A partly filled buffer is handed over at least this often, so a quiet
/// proxy's lines still reach the file promptly.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);

/// How long the flusher sleeps when nothing was buffered (a proxy with no
/// traffic, or no access log): an idle worker wakes once a second instead
/// of ten times, and a line written after a quiet spell reaches the
/// writer within this.
pub const FLUSH_IDLE_INTERVAL: Duration = Duration::from_secs(1);

/// Lines for one log file, from one core; an empty path asks the writer
/// to finish (see [`Writer::finish`]).
#[derive(Debug)]
pub struct Batch {
    path: PathBuf,
    bytes: Vec<u8>,
    lines: u64,
}

/// The writer thread, as its owner holds it.
#[derive(Debug)]
pub struct Writer {
    sink: Sender<Batch>,
    control: Control,
    thread: JoinHandle<()>,
}

/// What other threads may do with a running writer (cheap to clone).
#[derive(Debug, Clone)]
pub struct Control {
    /// A pending "reopen every file"; one pending is as good as many.
    reopen: Sender<()>,
    lost: Arc<AtomicU64>,
}

impl Control {
    /// Closes every log file; each is reopened by its path at its next
    /// write (log rotation).
    pub fn reopen(&self) {
        let _ = self.reopen.try_send(());
    }

    /// Lines handed to the writer that it could not write.
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }
}

/// Whether every access log file `config` names can be opened for append
/// (created if missing), as `nginx -t` checks: a typo in a path must stop
/// a start or a swap, not lose every line at run time.
pub fn check_writable(config: &crate::Config) -> Result<(), String> {
    for l in &config.listeners {
        if let Some(log) = &l.access_log {
            open(&log.path).map_err(|e| {
                format!(
                    "listener {:?}: access log {}: {e}",
                    l.name,
                    log.path.display()
                )
            })?;
        }
    }
    Ok(())
}

impl Writer {
    /// Starts the writer thread.
    pub fn start() -> std::io::Result<Writer> {
        let (sink, rx) = crossbeam_channel::bounded(QUEUE_BATCHES);
        let (reopen, reopen_rx) = crossbeam_channel::bounded(1);
        let lost = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&lost);
        let thread = std::thread::Builder::new()
            .name("pilotfish-access-log".into())
            .spawn(move || write_batches(&rx, &reopen_rx, &counted))?;
        Ok(Writer {
            sink,
            control: Control { reopen, lost },
            thread,
        })
    }

    /// Reopening and the lost-line count, for the controller.
    pub fn control(&self) -> Control {
        self.control.clone()
    }

    /// Where workers send their batches.
    pub fn sink(&self) -> Sender<Batch> {
        self.sink.clone()
    }

    /// Writes what is queued, then stops. Call after the workers exited:
    /// the queue is FIFO, so their last batches are written first.
    pub fn finish(self) {
        let stop = Batch {
            path: PathBuf::new(),
            bytes: Vec::new(),
            lines: 0,
        };
        // Blocking is fine here (not a worker); the writer drains the queue.
        if self.sink.send(stop).is_ok() && self.thread.join().is_err() {
            tracing::error!("access log writer panicked");
        }
    }
}

fn write_batches(rx: &Receiver<Batch>, reopen: &Receiver<()>, lost: &AtomicU64) {
    // One handle per file, opened on first use; bounded by the listeners
    // that ever named a file (a config has at most LISTENERS_MAX).
    let mut files: HashMap<PathBuf, Box<dyn Write>> = HashMap::new();
    let mut failed: HashMap<PathBuf, u64> = HashMap::new();
    // Once every reopen sender is gone (the proxy stopping, or failing to
    // start), a disconnected receiver would be ready forever and spin
    // this loop: it is swapped for one that never is.
    let mut reopen = reopen.clone();
    loop {
        let batch = crossbeam_channel::select! {
            recv(rx) -> batch => match batch {
                Ok(b) => b,
                Err(_) => return,
            },
            recv(reopen) -> asked => {
                if asked.is_err() {
                    reopen = crossbeam_channel::never();
                    continue;
                }
                tracing::info!(files = files.len(), "access log files reopened");
                files.clear();
                continue;
            }
        };
        if batch.path.as_os_str().is_empty() {
            return;
        }
        // A reopen asked before this batch arrived applies to it (select
        // picks among ready channels at random).
        if reopen.try_recv().is_ok() {
            files.clear();
        }
        let out = match files.get_mut(&batch.path) {
            Some(out) => out,
            None => match open(&batch.path) {
                Ok(out) => files.entry(batch.path.clone()).or_insert(out),
                Err(e) => {
                    lost.fetch_add(batch.lines, Ordering::Relaxed);
                    complain(&mut failed, &batch.path, &e);
                    continue;
                }
            },
        };
        if let Err(e) = out.write_all(&batch.bytes).and_then(|()| out.flush()) {
            lost.fetch_add(batch.lines, Ordering::Relaxed);
            // Reopened at the next batch: the file may have been replaced.
            files.remove(&batch.path);
            complain(&mut failed, &batch.path, &e);
        }
    }
}

/// Logs a failing log file once, then once per 1000 failures.
fn complain(failed: &mut HashMap<PathBuf, u64>, path: &Path, e: &std::io::Error) {
    let n = failed.entry(path.to_path_buf()).or_default();
    if n.is_multiple_of(1000) {
        tracing::error!(file = %path.display(), error = %e, failures = *n + 1, "cannot write the access log");
    }
    *n += 1;
}

fn open(path: &Path) -> std::io::Result<Box<dyn Write>> {
    if path == Path::new("stdout") || path == Path::new("-") {
        return Ok(Box::new(std::io::stdout()));
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    Ok(Box::new(file))
}

/// One core's access log buffers (shared by its config generations).
#[derive(Debug)]
pub struct Buffers {
    sink: Sender<Batch>,
    /// (file, lines waiting, how many lines). Few entries: one per file.
    pending: RefCell<Vec<(PathBuf, Vec<u8>, u64)>>,
}

/// What one request line says.
#[derive(Debug, Serialize)]
pub struct Line<'a> {
    pub time: String,
    pub worker: usize,
    pub listener: &'a str,
    pub route: Option<&'a str>,
    pub client: &'a str,
    /// The caller's verified SPIFFE ID (mTLS listeners); CLF's authuser.
    pub peer_identity: Option<&'a str>,
    /// Whether the caller's connection was TLS. On an intercepted inbound
    /// port in `permissive` mode, `false` marks a plaintext caller from
    /// outside the mesh.
    pub tls: bool,
    pub method: &'a str,
    pub target: &'a str,
    pub version: &'a str,
    /// The status sent to the client (0: none was sent).
    pub status: u16,
    pub duration_us: u64,
    pub upstream: Option<SocketAddr>,
    /// Why the proxy answered itself, if it did.
    pub error: Option<&'static str>,
    /// Who caused `error`: `downstream`, `upstream` or `internal`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blame: Option<&'static str>,
    /// The `grpc-status` sent (gRPC requests over HTTP/2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u32>,
    /// The trace and this hop's span, in hex (with `[tracing]`, sampled
    /// or not: the ids travel either way).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub span_id: Option<String>,
}

/// The current time as an access log wants it.
pub fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

impl Buffers {
    pub fn new(sink: Sender<Batch>) -> Self {
        Self {
            sink,
            pending: RefCell::default(),
        }
    }

    /// Appends `line` to the buffer for `log`'s file; hands the buffer to
    /// the writer once it is [`BATCH_BYTES`] long.
    pub fn record(&self, counters: &Counters, log: &AccessLog, line: &Line<'_>) {
        let mut pending = self.pending.borrow_mut();
        let index = match pending.iter().position(|(p, _, _)| *p == log.path) {
            Some(i) => i,
            None => {
                pending.push((log.path.clone(), Vec::with_capacity(BATCH_BYTES), 0));
                pending.len() - 1
            }
        };
        let (_, buf, lines) = &mut pending[index];
        format(log.format, line, buf);
        *lines += 1;
        if buf.len() >= BATCH_BYTES {
            let (path, buf, lines) = pending.swap_remove(index);
            drop(pending);
            self.hand_over(counters, path, buf, lines);
        }
    }

    /// Whether no line waits to be handed over.
    pub fn is_empty(&self) -> bool {
        self.pending.borrow().is_empty()
    }

    /// Hands every non-empty buffer to the writer.
    pub fn flush(&self, counters: &Counters) {
        let taken = std::mem::take(&mut *self.pending.borrow_mut());
        for (path, buf, lines) in taken {
            if lines > 0 {
                self.hand_over(counters, path, buf, lines);
            }
        }
    }

    fn hand_over(&self, counters: &Counters, path: PathBuf, bytes: Vec<u8>, lines: u64) {
        match self.sink.try_send(Batch { path, bytes, lines }) {
            Ok(()) => metrics::add(&counters.access_log_lines, lines),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                metrics::add(&counters.access_log_dropped, lines);
            }
        }
    }
}

/// Writes one line (with its newline) in `format`.
pub fn format(format: LogFormat, line: &Line<'_>, out: &mut Vec<u8>) {
    match format {
        LogFormat::Json => {
            // Serialising plain strings and numbers into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *out, line);
        }
        LogFormat::Common => {
            // host ident authuser [date] "request" status bytes; the
            // caller's SPIFFE ID (no spaces or quotes) is the authuser.
            let _ = write!(
                out,
                "{} - {} [{}] \"{} ",
                line.client,
                line.peer_identity.unwrap_or("-"),
                clf_time(&line.time),
                line.method
            );
            // Quotes, backslashes and controls as \xHH, as nginx does, so
            // a request-target cannot break the line's fields.
            for &b in line.target.as_bytes() {
                if b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b) {
                    let _ = write!(out, "\\x{b:02X}");
                } else {
                    out.push(b);
                }
            }
            let _ = write!(out, " {}\" {} -", line.version, line.status);
        }
    }
    out.push(b'\n');
}

/// `2026-11-27T10:44:40.123Z` → `27/Nov/2026:10:44:40 +0000`.
fn clf_time(rfc3339: &str) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (Some(y), Some(m), Some(d), Some(t)) = (
        rfc3339.get(0..4),
        rfc3339.get(5..7).and_then(|m| m.parse::<usize>().ok()),
        rfc3339.get(8..10),
        rfc3339.get(11..19),
    ) else {
        return rfc3339.to_string();
    };
    let month = MONTHS.get(m.wrapping_sub(1)).copied().unwrap_or("???");
    format!("{d}/{month}/{y}:{t} +0000")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line() -> Line<'static> {
        Line {
            time: "2026-11-27T10:44:40.123Z".into(),
            worker: 1,
            listener: "web",
            route: Some("api"),
            client: "10.0.0.1",
            peer_identity: None,
            tls: false,
            method: "GET",
            target: "/a\"b",
            version: "HTTP/1.1",
            status: 200,
            duration_us: 42,
            upstream: Some("127.0.0.1:80".parse().unwrap()),
            error: None,
            blame: None,
            grpc_status: None,
            trace_id: None,
            span_id: None,
        }
    }

    #[test]
    fn json_lines_parse_back_and_escape() {
        let mut out = Vec::new();
        format(LogFormat::Json, &line(), &mut out);
        assert_eq!(out.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["target"], "/a\"b");
        assert_eq!(v["status"], 200);
        assert_eq!(v["upstream"], "127.0.0.1:80");
    }

    #[test]
    fn common_log_format() {
        let mut out = Vec::new();
        format(LogFormat::Common, &line(), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "10.0.0.1 - - [27/Nov/2026:10:44:40 +0000] \"GET /a\\x22b HTTP/1.1\" 200 -\n"
        );
        let mut out = Vec::new();
        let id = "spiffe://mesh.local/ns/prod/sa/frontend";
        let with_id = Line {
            peer_identity: Some(id),
            tls: true,
            ..line()
        };
        format(LogFormat::Common, &with_id, &mut out);
        assert!(String::from_utf8(out)
            .unwrap()
            .starts_with(&format!("10.0.0.1 - {id} [")));
        let mut out = Vec::new();
        format(LogFormat::Json, &with_id, &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["peer_identity"], id);
        assert_eq!(v["tls"], true);
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let buffers = Buffers::new(tx);
        let counters = Counters::default();
        let log = AccessLog {
            path: "/nonexistent/x.log".into(),
            format: LogFormat::Json,
        };
        buffers.record(&counters, &log, &line());
        buffers.flush(&counters);
        buffers.record(&counters, &log, &line());
        buffers.record(&counters, &log, &line());
        buffers.flush(&counters);
        assert_eq!(counters.access_log_lines.get(), 1);
        assert_eq!(counters.access_log_dropped.get(), 2);
        assert_eq!(rx.len(), 1);
    }
}
