//! `pilotfish-bench load`: HTTP/1.1 (keep-alive or a connection per
//! request) and raw TCP request/response load, open loop at a fixed rate or
//! closed loop, on pinned monoio threads.
//!
//! Open loop follows wrk2's model: every connection owns an even share of
//! the rate and a fixed schedule of send times, phase-shifted so the
//! connections interleave. A request the server delayed (its connection was
//! still waiting for the previous response when it fell due) has its
//! latency measured from when it was *scheduled*, not from when it was
//! sent, so a server that stalls is charged for every request that the
//! stall delayed (coordinated-omission correction). A request sent late only
//! because the runtime's millisecond timer woke late is measured from its
//! send: that lateness is the harness's. The uncorrected service time (from
//! the actual send) is recorded alongside, to show what a closed-loop tool
//! would have reported.
//!
//! What must hold: every count and time is bounded (connections, threads,
//! response sizes, a timeout per request); no sample is recorded for a
//! request scheduled before the warm-up ended; errors are counted by kind,
//! and a failed connection is replaced, so one error does not stop a run.

// The harness runs on its own threads, not proxy workers.
#![allow(clippy::disallowed_methods)]

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use monoio::{
    buf::IoBufMut,
    io::{AsyncReadRent, AsyncWriteRentExt},
    net::TcpStream,
};
use serde::Serialize;

/// Highest latency recorded (µs): one minute. Longer is a timeout, not a sample.
pub const LATENCY_MAX_US: u64 = 60_000_000;
/// Connections one run may open (all threads together).
pub const CONNECTIONS_MAX: usize = 20_000;
/// Load threads: one per core is the point; more only add contention.
pub const THREADS_MAX: usize = 256;
/// Largest response head we read; larger is an error (`head_too_large`).
const HEAD_BYTES_MAX: usize = 64 * 1024;
/// Pause after a failed connect, so a dead target is not hammered in a
/// tight loop (open loop still charges the missed schedule to latency).
const RECONNECT_PAUSE: Duration = Duration::from_millis(10);

/// What one request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// HTTP/1.1 on keep-alive connections.
    Http,
    /// HTTP/1.1, a new connection per request (`connection: close`).
    HttpClose,
    /// Raw TCP: `size` bytes out, the same number back (an echo server).
    Tcp,
}

/// A load run's parameters.
#[derive(Debug, Clone)]
pub struct Spec {
    pub target: SocketAddr,
    pub mode: Mode,
    /// Total requests per second over all connections; None: closed loop.
    pub rate: Option<f64>,
    pub connections: usize,
    pub threads: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// HTTP: the request bytes (head and body); TCP: the payload.
    pub request: Vec<u8>,
    /// A request without a complete response within this is an error.
    pub timeout: Duration,
}

/// Builds an HTTP/1.1 request.
pub fn http_request(
    method: &str,
    path: &str,
    host: &str,
    headers: &[String],
    body_size: usize,
    close: bool,
) -> Vec<u8> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: {host}\r\n");
    for h in headers {
        head += h;
        head += "\r\n";
    }
    if body_size > 0 || !matches!(method, "GET" | "HEAD") {
        head += &format!("content-length: {body_size}\r\n");
    }
    if close {
        head += "connection: close\r\n";
    }
    head += "\r\n";
    let mut out = head.into_bytes();
    out.resize(out.len() + body_size, b'x');
    out
}

/// What a run measured (merged over threads).
#[derive(Debug)]
pub struct Report {
    pub spec_rate: Option<f64>,
    /// From the scheduled send time (open loop); equals `service` in a
    /// closed loop, where a request is scheduled when the last one ends.
    pub corrected: Histogram<u64>,
    /// From the actual send time.
    pub service: Histogram<u64>,
    pub requests: u64,
    pub errors: BTreeMap<&'static str, u64>,
    pub bytes_received: u64,
    /// The measured window (after the warm-up).
    pub elapsed: Duration,
}

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, 3).expect("valid histogram bounds")
}

impl Report {
    fn empty(rate: Option<f64>) -> Self {
        Self {
            spec_rate: rate,
            corrected: new_histogram(),
            service: new_histogram(),
            requests: 0,
            errors: BTreeMap::new(),
            bytes_received: 0,
            elapsed: Duration::ZERO,
        }
    }

    fn merge(&mut self, other: &Report) {
        // Same bounds everywhere: adding cannot fail.
        let _ = self.corrected.add(&other.corrected);
        let _ = self.service.add(&other.service);
        self.requests += other.requests;
        self.bytes_received += other.bytes_received;
        for (k, v) in &other.errors {
            *self.errors.entry(k).or_default() += v;
        }
    }

    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn record(&mut self, scheduled: Instant, sent: Instant, done: Instant) {
        let us = |d: Duration| (d.as_micros() as u64).clamp(1, LATENCY_MAX_US);
        let _ = self.corrected.record(us(done - scheduled));
        let _ = self.service.record(us(done - sent));
        self.requests += 1;
    }

    fn error(&mut self, kind: &'static str) {
        *self.errors.entry(kind).or_default() += 1;
    }

    /// The human report: percentile table, throughput, errors.
    pub fn table(&self) -> String {
        let open = self.spec_rate.is_some();
        let mut out = String::new();
        if let Some(rate) = self.spec_rate {
            out += &format!("open loop at {rate:.0} req/s: latency from the scheduled send (coordinated omission corrected); service time from the actual send\n");
        } else {
            out += "closed loop: each connection sends when its last response is complete\n";
        }
        out += &format!(
            "{:<14}{:>14}{}\n",
            "",
            "latency µs",
            if open {
                format!("{:>16}", "service µs")
            } else {
                String::new()
            }
        );
        for p in PERCENTILES {
            let label = if p == 100.0 {
                "max".to_string()
            } else {
                format!("p{p}")
            };
            out += &format!(
                "{label:<14}{:>14}",
                self.corrected.value_at_quantile(p / 100.0)
            );
            if open {
                out += &format!("{:>16}", self.service.value_at_quantile(p / 100.0));
            }
            out += "\n";
        }
        out += &format!(
            "requests {} in {:.2}s: {:.0} req/s, {:.1} MB/s received\n",
            self.requests,
            self.elapsed.as_secs_f64(),
            self.rate(),
            self.bytes_received as f64 / self.elapsed.as_secs_f64().max(1e-9) / 1e6
        );
        if self.errors.is_empty() {
            out += "errors: none\n";
        } else {
            let list: Vec<String> = self
                .errors
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            out += &format!("errors: {}\n", list.join(", "));
        }
        out
    }

    pub fn json(&self) -> serde_json::Value {
        let pct = |h: &Histogram<u64>| {
            PERCENTILES
                .iter()
                .map(|p| (format!("p{p}"), h.value_at_quantile(p / 100.0)))
                .collect::<BTreeMap<_, _>>()
        };
        serde_json::json!({
            "rate_target": self.spec_rate,
            "requests": self.requests,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "requests_per_s": self.rate(),
            "bytes_received": self.bytes_received,
            "errors": self.errors,
            "latency_us": pct(&self.corrected),
            "service_us": pct(&self.service),
            "latency_mean_us": self.corrected.mean(),
        })
    }
}

/// The percentiles every report shows.
pub const PERCENTILES: [f64; 7] = [50.0, 75.0, 90.0, 99.0, 99.9, 99.99, 100.0];

/// Connection `index` of `connections` sharing `rate` requests/s: its k-th
/// request is due at `start + (index/connections + k) / per_connection`.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    start: Instant,
    interval: Duration,
    phase: Duration,
}

impl Schedule {
    pub fn new(start: Instant, rate: f64, connections: usize, index: usize) -> Self {
        let per_connection = rate / connections as f64;
        let interval = Duration::from_secs_f64(1.0 / per_connection);
        let phase = interval.mul_f64(index as f64 / connections as f64);
        Self {
            start,
            interval,
            phase,
        }
    }

    pub fn due(&self, k: u64) -> Instant {
        self.start + self.phase + self.interval.mul_f64(k as f64)
    }
}

/// Runs the load and returns the merged report.
pub fn run(spec: &Spec) -> anyhow::Result<Report> {
    anyhow::ensure!(
        (1..=CONNECTIONS_MAX).contains(&spec.connections),
        "connections must be 1..={CONNECTIONS_MAX}"
    );
    anyhow::ensure!(
        (1..=THREADS_MAX).contains(&spec.threads),
        "threads must be 1..={THREADS_MAX}"
    );
    if let Some(rate) = spec.rate {
        anyhow::ensure!(rate > 0.0, "the rate must be positive");
    }
    let threads = spec.threads.min(spec.connections);
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let start = Instant::now() + Duration::from_millis(20);
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let spec = spec.clone();
            let core = (!cores.is_empty()).then(|| cores[t % cores.len()]);
            std::thread::Builder::new()
                .name(format!("load-{t}"))
                .spawn(move || {
                    if let Some(c) = core {
                        core_affinity::set_for_current(c);
                    }
                    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                        .enable_timer()
                        .build()
                        .map_err(|e| anyhow::anyhow!("load runtime: {e}"))?;
                    Ok::<_, anyhow::Error>(rt.block_on(thread_main(spec, t, threads, start)))
                })
        })
        .collect::<Result<_, _>>()?;
    let mut total = Report::empty(spec.rate);
    for h in handles {
        let r = h
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
        total.merge(&r);
    }
    total.elapsed = spec.duration;
    Ok(total)
}

async fn thread_main(spec: Spec, thread: usize, threads: usize, start: Instant) -> Report {
    let mine: Vec<usize> = (0..spec.connections)
        .filter(|c| c % threads == thread)
        .collect();
    let tasks: Vec<_> = mine
        .into_iter()
        .map(|c| monoio::spawn(connection(spec.clone(), c, start)))
        .collect();
    let mut report = Report::empty(spec.rate);
    for t in tasks {
        report.merge(&t.await);
    }
    report
}

/// One connection's share of the load, until the run ends.
async fn connection(spec: Spec, index: usize, start: Instant) -> Report {
    let mut report = Report::empty(spec.rate);
    let measure_from = start + spec.warmup;
    let end = measure_from + spec.duration;
    let schedule = spec
        .rate
        .map(|rate| Schedule::new(start, rate, spec.connections, index));
    let mut conn: Option<Wire> = None;
    let mut k = 0u64;
    let mut prev_done = start;
    loop {
        // (when to measure the latency from, the time that decides whether
        // the request falls in the measured window)
        let (scheduled, slot) = match &schedule {
            Some(s) => {
                let due = s.due(k);
                k += 1;
                if due >= end {
                    break;
                }
                if due > Instant::now() {
                    monoio::time::sleep_until(due.into()).await;
                }
                // The runtime's timers tick in whole milliseconds and round
                // up, so a sleep wakes up to ~1.5 ms late. When this
                // connection was idle at `due` (its last response came
                // first), that lateness is the harness's own, not the
                // server's: measure from the actual send. When the last
                // response came after `due`, the server delayed this
                // request: measure from `due` (the correction).
                let now = Instant::now();
                // The window is decided by the schedule: a request due in
                // the warm-up and sent a little late is not counted (it
                // made 1,001 of 1,000 scheduled in the harness's test).
                (if prev_done > due { due } else { now }, due)
            }
            None => {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                if now < start {
                    monoio::time::sleep_until(start.into()).await;
                }
                let now = Instant::now();
                (now, now)
            }
        };
        let measured = slot >= measure_from;
        let mut wire = match conn.take() {
            Some(w) => w,
            None => {
                match monoio::time::timeout(spec.timeout, TcpStream::connect(spec.target)).await {
                    Ok(Ok(s)) => {
                        let _ = s.set_nodelay(true);
                        Wire::new(s)
                    }
                    Ok(Err(_)) | Err(_) => {
                        if measured {
                            report.error("connect");
                        }
                        monoio::time::sleep(RECONNECT_PAUSE).await;
                        continue;
                    }
                }
            }
        };
        let sent = Instant::now();
        let outcome =
            monoio::time::timeout(spec.timeout, exchange(spec.mode, &mut wire, &spec.request))
                .await;
        let done = Instant::now();
        prev_done = done;
        match outcome {
            Ok(Ok((received, keep))) => {
                if measured {
                    report.record(scheduled, sent, done);
                    report.bytes_received += received;
                }
                if keep {
                    conn = Some(wire);
                }
            }
            // A failed or timed-out connection is dropped and replaced.
            Ok(Err(kind)) => {
                if measured {
                    report.error(kind);
                }
            }
            Err(_) => {
                if measured {
                    report.error("timeout");
                }
            }
        }
    }
    report
}

/// A connection and its read buffer.
struct Wire {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Wire {
    fn new(s: TcpStream) -> Self {
        Self {
            s,
            buf: Vec::with_capacity(16 * 1024),
        }
    }

    /// Reads more into the spare capacity of the buffer (grown if nearly
    /// full). EOF is an error (`closed`) unless `eof_ok`, then Ok(0).
    async fn fill(&mut self, eof_ok: bool) -> Result<usize, &'static str> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(16 * 1024);
        }
        let len = self.buf.len();
        let (r, slice) = self
            .s
            .read(std::mem::take(&mut self.buf).slice_mut(len..))
            .await;
        self.buf = slice.into_inner();
        match r {
            Ok(0) if eof_ok => Ok(0),
            Ok(0) => Err("closed"),
            Ok(n) => Ok(n),
            Err(_) => Err("read"),
        }
    }

    /// Discards the buffered bytes and reads more; the count read.
    async fn refill(&mut self, eof_ok: bool) -> Result<usize, &'static str> {
        self.buf.clear();
        self.fill(eof_ok).await
    }
}

/// Sends one request and reads its whole response. Ok((bytes received,
/// whether the connection may be reused)).
async fn exchange(mode: Mode, w: &mut Wire, request: &[u8]) -> Result<(u64, bool), &'static str> {
    // The request is copied into an owned buffer for the kernel: small,
    // and the copy is the load generator's cost, not the target's.
    let (written, _) = w.s.write_all(request.to_vec()).await;
    written.map_err(|_| "write")?;
    w.buf.clear();
    match mode {
        Mode::Tcp => {
            let want = request.len() as u64;
            let mut got = 0u64;
            while got < want {
                got += w.refill(false).await? as u64;
            }
            Ok((got, true))
        }
        Mode::Http | Mode::HttpClose => {
            let (n, keep) = read_response(w).await?;
            Ok((n, keep && mode == Mode::Http))
        }
    }
}

/// How a response body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
    UntilClose,
}

/// A parsed response head.
struct Head {
    len: usize,
    status: u16,
    framing: Framing,
    keep: bool,
    /// It carries `x-pilotfish-error`: the proxy generated it (and says why).
    generated: bool,
}

/// A response head; None while incomplete.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let n = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err("bad_response"),
    };
    let status = resp.code.unwrap_or(0);
    let mut framing = Framing::UntilClose;
    let mut keep = resp.version == Some(1);
    let mut generated = false;
    for h in resp.headers.iter() {
        generated |= h.name.eq_ignore_ascii_case("x-pilotfish-error");
        if h.name.eq_ignore_ascii_case("content-length") {
            let len = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or("bad_response")?;
            framing = Framing::Length(len);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding")
            && h.value.eq_ignore_ascii_case(b"chunked")
        {
            framing = Framing::Chunked;
        } else if h.name.eq_ignore_ascii_case("connection")
            && h.value.eq_ignore_ascii_case(b"close")
        {
            keep = false;
        }
    }
    if status == 204 || status == 304 {
        framing = Framing::Length(0);
    }
    Ok(Some(Head {
        len: n,
        status,
        framing,
        keep,
        generated,
    }))
}

/// Reads one response; non-2xx statuses are errors by class, those the
/// proxy generated (`x-pilotfish-error`) apart from the upstream's.
async fn read_response(w: &mut Wire) -> Result<(u64, bool), &'static str> {
    let Head {
        len: head_len,
        status,
        framing,
        keep,
        generated,
    } = loop {
        match parse_head(&w.buf)? {
            // An interim response: drop it and read on.
            Some(h) if (100..200).contains(&h.status) => {
                w.buf.drain(..h.len);
            }
            Some(head) => break head,
            None if w.buf.len() >= HEAD_BYTES_MAX => return Err("head_too_large"),
            None => {
                w.fill(false).await?;
            }
        }
    };
    let mut received = head_len as u64;
    w.buf.drain(..head_len);
    let keep = match framing {
        Framing::Length(len) => {
            let mut have = w.buf.len() as u64;
            while have < len {
                have += w.refill(false).await? as u64;
            }
            received += len;
            keep && have == len
        }
        Framing::UntilClose => {
            let mut have = w.buf.len() as u64;
            loop {
                match w.refill(true).await? {
                    0 => break,
                    n => have += n as u64,
                }
            }
            received += have;
            false
        }
        Framing::Chunked => {
            received += read_chunked(w).await?;
            keep
        }
    };
    if !(200..300).contains(&status) {
        return Err(match status / 100 {
            4 if generated => "generated_4xx",
            5 if generated => "generated_5xx",
            3 => "status_3xx",
            4 => "status_4xx",
            5 => "status_5xx",
            _ => "status_other",
        });
    }
    Ok((received, keep))
}

/// Walks a chunked body (data counted, not kept); the data bytes.
async fn read_chunked(w: &mut Wire) -> Result<u64, &'static str> {
    let mut data = 0u64;
    let mut pos = 0usize;
    loop {
        let line_end = loop {
            if let Some(i) = w.buf[pos..].windows(2).position(|x| x == b"\r\n") {
                break pos + i;
            }
            if w.buf.len() - pos > 1024 {
                return Err("bad_response");
            }
            w.fill(false).await?;
        };
        let size_text = std::str::from_utf8(&w.buf[pos..line_end]).map_err(|_| "bad_response")?;
        let size_hex = size_text.split(';').next().unwrap_or("").trim();
        let size = u64::from_str_radix(size_hex, 16).map_err(|_| "bad_response")?;
        // Skip the data and its CRLF (after the last, empty chunk: the CRLF
        // that ends an empty trailer section).
        data += size;
        pos = line_end + 2;
        let mut skip = size + 2;
        while ((w.buf.len() - pos) as u64) < skip {
            skip -= (w.buf.len() - pos) as u64;
            pos = 0;
            w.refill(false).await?;
        }
        pos += skip as usize;
        if size == 0 {
            return Ok(data);
        }
        if pos > 8 * 1024 {
            w.buf.drain(..pos);
            pos = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_spreads_connections_evenly() {
        let t0 = Instant::now();
        // 1000 req/s over 4 connections: each every 4 ms, offset by 1 ms.
        let s: Vec<Schedule> = (0..4).map(|i| Schedule::new(t0, 1000.0, 4, i)).collect();
        assert_eq!(s[0].due(0), t0);
        assert_eq!(s[1].due(0) - t0, Duration::from_millis(1));
        assert_eq!(s[3].due(2) - t0, Duration::from_millis(11));
        // Over one second the union of schedules has exactly 1000 sends.
        let mut sends = 0;
        for c in &s {
            let mut k = 0;
            while c.due(k) < t0 + Duration::from_secs(1) {
                k += 1;
                sends += 1;
            }
        }
        assert_eq!(sends, 1000);
    }

    #[test]
    fn corrected_latency_charges_a_stall_to_every_request_it_delayed() {
        // A synthetic run: one connection at 100 req/s for 2 s; the server
        // answers in 1 ms except once, when it stalls for 500 ms. Requests
        // queued behind the stall are sent late (closed connection), and
        // the corrected latency counts from their scheduled time.
        let t0 = Instant::now();
        let s = Schedule::new(t0, 100.0, 1, 0);
        let mut r = Report::empty(Some(100.0));
        let mut free_at = t0;
        for k in 0..200u64 {
            let due = s.due(k);
            let sent = due.max(free_at);
            let service = if k == 50 {
                Duration::from_millis(500)
            } else {
                Duration::from_millis(1)
            };
            let done = sent + service;
            r.record(due, sent, done);
            free_at = done;
        }
        assert_eq!(r.requests, 200);
        // ~50 requests were due during the stall: over 25% of samples are
        // above 1 ms once corrected; the uncorrected view sees one.
        let above = |h: &Histogram<u64>| h.count_between(2_000, LATENCY_MAX_US);
        assert_eq!(above(&r.service), 1);
        assert!(above(&r.corrected) >= 49, "{}", above(&r.corrected));
        assert!(r.corrected.value_at_quantile(0.99) >= 400_000);
        assert!(r.service.value_at_quantile(0.99) <= 1_100);
        assert_eq!(r.corrected.max(), r.service.max());
    }

    /// One server connection answering three requests: chunked (split
    /// across writes), Content-Length after a 103, then close-delimited.
    #[test]
    fn reads_each_framing_and_keeps_the_connection_when_it_may() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let answers: [&[&[u8]]; 3] = [
                &[b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;x=y\r\nhel", b"lo\r\n6\r\n world\r\n0\r\n\r\n"],
                &[b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc"],
                &[b"HTTP/1.1 200 OK\r\n\r\nuntil close"],
            ];
            for parts in answers {
                let _ = s.read(&mut buf).unwrap();
                for p in parts {
                    s.write_all(p).unwrap();
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        });
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut w = Wire::new(TcpStream::connect(addr).await.unwrap());
            let req = http_request("GET", "/", "t", &[], 0, false);
            let (n, keep) = exchange(Mode::Http, &mut w, &req).await.unwrap();
            let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".len() as u64;
            assert!(keep && n == head + 11, "chunked: {n}");
            let (n, keep) = exchange(Mode::Http, &mut w, &req).await.unwrap();
            assert!(keep && n == 38 + 3, "length after an interim: {n}");
            let (n, keep) = exchange(Mode::Http, &mut w, &req).await.unwrap();
            assert!(!keep && n == 19 + 11, "until close: {n}");
        });
        server.join().unwrap();
    }

    #[test]
    fn http_request_bytes() {
        let r = http_request("POST", "/x", "h", &["a: b".into()], 3, true);
        assert_eq!(
            String::from_utf8(r).unwrap(),
            "POST /x HTTP/1.1\r\nhost: h\r\na: b\r\ncontent-length: 3\r\nconnection: close\r\n\r\nxxx"
        );
    }
}
