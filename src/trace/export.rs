//! Span export: per-core buffers, a bounded queue, and one exporter
//! thread that POSTs OTLP/HTTP protobuf to the configured collector.
//!
//! What must hold: a request never waits on tracing. A worker appends
//! spans to its own buffer and hands full (or [`FLUSH_INTERVAL`]-old)
//! batches to the exporter with `try_send`; when the queue is full (the
//! collector is slow or down), the batch is dropped and its spans counted
//! (`trace_spans_dropped`). The exporter bounds each export in time
//! ([`EXPORT_TIMEOUT`]) and counts what it could not deliver. Memory is
//! bounded by [`BATCH_SPANS`] per core plus [`QUEUE_BATCHES`] batches.

use std::{
    cell::RefCell,
    io::{Read, Write},
    net::{TcpStream, ToSocketAddrs},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use super::otlp::{self, Span, Value};
use crate::{config::Tracing, metrics::Counters};

/// A core hands its spans over at this many: one export request of a few
/// hundred KiB at most.
pub const BATCH_SPANS: usize = 512;
/// Batches waiting for the exporter (all cores): 64 × 512 spans. A
/// collector this far behind is down or overloaded; traffic must not be.
pub const QUEUE_BATCHES: usize = 64;
/// A partly filled buffer is handed over at least this often.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(200);
/// Connecting, sending one batch and reading the answer, each at most
/// this long: a stuck collector costs the exporter this per batch, while
/// workers drop what the full queue cannot take.
pub const EXPORT_TIMEOUT: Duration = Duration::from_secs(2);
/// The collector's answer is read this far (status line and headers).
const RESPONSE_BYTES_MAX: u64 = 16 * 1024;

/// Spans from one core for one collector; `None` asks the exporter to stop.
#[derive(Debug)]
pub struct Batch {
    target: Option<Arc<Tracing>>,
    spans: Vec<Span>,
}

/// What the exporter delivered and lost, read by the admin server.
#[derive(Debug, Default)]
pub struct ExportStats {
    pub exported: AtomicU64,
    /// Spans in batches the collector refused or never answered, or that
    /// were still queued when the proxy stopped.
    pub failed: AtomicU64,
    /// Set when the proxy stops: what is queued gets [`EXPORT_TIMEOUT`]
    /// more, then is counted as failed.
    stopping: std::sync::atomic::AtomicBool,
}

/// The exporter thread, as its owner holds it.
#[derive(Debug)]
pub struct Exporter {
    sink: Sender<Batch>,
    stats: Arc<ExportStats>,
    thread: JoinHandle<()>,
}

impl Exporter {
    pub fn start() -> std::io::Result<Exporter> {
        let (sink, rx) = crossbeam_channel::bounded(QUEUE_BATCHES);
        let stats = Arc::new(ExportStats::default());
        let counted = Arc::clone(&stats);
        let thread = std::thread::Builder::new()
            .name("pilotfish-otlp".into())
            .spawn(move || export_batches(&rx, &counted))?;
        Ok(Exporter {
            sink,
            stats,
            thread,
        })
    }

    pub fn sink(&self) -> Sender<Batch> {
        self.sink.clone()
    }

    pub fn stats(&self) -> Arc<ExportStats> {
        Arc::clone(&self.stats)
    }

    /// Exports what is queued (each batch bounded by [`EXPORT_TIMEOUT`]),
    /// then stops. Call after the workers exited.
    pub fn finish(self) {
        self.stats.stopping.store(true, Ordering::SeqCst);
        let stop = Batch {
            target: None,
            spans: Vec::new(),
        };
        if self.sink.send_timeout(stop, EXPORT_TIMEOUT).is_ok() {
            let _ = self.thread.join();
        }
    }
}

fn export_batches(rx: &Receiver<Batch>, stats: &ExportStats) {
    let mut give_up_at: Option<std::time::Instant> = None;
    while let Ok(batch) = rx.recv() {
        let Some(target) = batch.target else {
            return;
        };
        let n = batch.spans.len() as u64;
        if stats.stopping.load(Ordering::SeqCst) {
            let now = std::time::Instant::now();
            if now > *give_up_at.get_or_insert(now + EXPORT_TIMEOUT) {
                stats.failed.fetch_add(n, Ordering::Relaxed);
                continue;
            }
        }
        match export(&target, &batch.spans) {
            Ok(()) => stats.exported.fetch_add(n, Ordering::Relaxed),
            Err(e) => {
                tracing::debug!(collector = %target.collector, error = %e, spans = n, "span export failed");
                stats.failed.fetch_add(n, Ordering::Relaxed)
            }
        };
    }
}

/// One `POST /v1/traces` on a connection of its own.
fn export(target: &Tracing, spans: &[Span]) -> Result<(), String> {
    let resource = [("telemetry.sdk.name", Value::Str("pilotfish".into()))];
    let body = otlp::export_request(&target.service_name, &resource, spans);
    let addr = target
        .collector
        .to_socket_addrs()
        .map_err(|e| format!("resolving {}: {e}", target.collector))?
        .next()
        .ok_or_else(|| format!("{} resolves to no address", target.collector))?;
    let mut s = TcpStream::connect_timeout(&addr, EXPORT_TIMEOUT).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(EXPORT_TIMEOUT))
        .and_then(|()| s.set_read_timeout(Some(EXPORT_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    let head = format!(
        "POST {} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/x-protobuf\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        target.path,
        target.collector,
        body.len()
    );
    s.write_all(head.as_bytes())
        .and_then(|()| s.write_all(&body))
        .map_err(|e| format!("sending: {e}"))?;
    let mut answer = [0u8; 12];
    (&mut s)
        .take(RESPONSE_BYTES_MAX)
        .read_exact(&mut answer)
        .map_err(|e| format!("reading the answer: {e}"))?;
    // "HTTP/1.1 200": any 2xx is success (OTLP/HTTP answers 200).
    match &answer[9..10] {
        b"2" => Ok(()),
        _ => Err(format!(
            "collector answered {}",
            String::from_utf8_lossy(&answer[9..12])
        )),
    }
}

/// One core's spans not yet handed to the exporter.
#[derive(Debug)]
pub struct Buffers {
    sink: Sender<Batch>,
    pending: RefCell<Vec<Span>>,
    /// Where the pending spans go: the config of the last span recorded.
    target: RefCell<Option<Arc<Tracing>>>,
}

impl Buffers {
    pub fn new(sink: Sender<Batch>) -> Self {
        Self {
            sink,
            pending: RefCell::default(),
            target: RefCell::default(),
        }
    }

    /// Buffers `span` for `target`'s collector; hands the buffer over at
    /// [`BATCH_SPANS`].
    pub fn record(&self, counters: &Counters, target: &Tracing, span: Span) {
        crate::metrics::add(&counters.trace_spans, 1);
        let changed = self.target.borrow().as_deref() != Some(target);
        if changed {
            // The first span, or a config swap changed the tracing
            // config: what was buffered goes to the old collector first.
            self.flush(counters);
            *self.target.borrow_mut() = Some(Arc::new(target.clone()));
        }
        let full = {
            let mut pending = self.pending.borrow_mut();
            pending.push(span);
            pending.len() >= BATCH_SPANS
        };
        if full {
            self.flush(counters);
        }
    }

    /// Whether no span waits to be handed over.
    pub fn is_empty(&self) -> bool {
        self.pending.borrow().is_empty()
    }

    /// Hands what is buffered to the exporter, or drops and counts it when
    /// the queue is full.
    pub fn flush(&self, counters: &Counters) {
        let spans = std::mem::take(&mut *self.pending.borrow_mut());
        if spans.is_empty() {
            return;
        }
        let n = spans.len() as u64;
        let Some(target) = self.target.borrow().clone() else {
            return;
        };
        let batch = Batch {
            target: Some(target),
            spans,
        };
        match self.sink.try_send(batch) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                crate::metrics::add(&counters.trace_spans_dropped, n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(n: u8) -> Span {
        Span {
            trace_id: [n; 16],
            span_id: [n; 8],
            parent: None,
            name: "GET".into(),
            kind: otlp::Kind::Server,
            start_ns: 1,
            end_ns: 2,
            attributes: Vec::new(),
            events: Vec::new(),
            error: None,
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts_without_waiting() {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let buffers = Buffers::new(tx);
        let counters = Counters::default();
        let target = Tracing {
            collector: "127.0.0.1:4318".into(),
            path: "/v1/traces".into(),
            sample_rate: 1.0,
            service_name: "s".into(),
            inject: crate::trace::Format::W3c,
        };
        buffers.record(&counters, &target, span(1));
        buffers.flush(&counters);
        // The queue holds one batch: the next is dropped, not waited for.
        buffers.record(&counters, &target, span(2));
        buffers.record(&counters, &target, span(3));
        buffers.flush(&counters);
        assert_eq!(counters.trace_spans.get(), 3);
        assert_eq!(counters.trace_spans_dropped.get(), 2);
        let batch = rx.try_recv().unwrap();
        assert_eq!(batch.spans, [span(1)]);
        // A swapped tracing config: what was buffered goes out first, to
        // the collector it was recorded for.
        buffers.record(&counters, &target, span(4));
        let moved = Tracing {
            collector: "127.0.0.1:4319".into(),
            ..target.clone()
        };
        buffers.record(&counters, &moved, span(5));
        let first = rx.try_recv().unwrap();
        assert_eq!(first.target.unwrap().collector, "127.0.0.1:4318");
        assert_eq!(first.spans, [span(4)]);
    }
}
