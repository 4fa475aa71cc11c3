//! `pilotfish-bench upstream`: an HTTP/1.1 server and a TCP echo server for
//! tests and benchmarks, with delays and fault injection.
//!
//! A thread per connection with blocking I/O: simple, and fast enough for
//! the connection counts the harness uses (it must never be the bottleneck
//! of what it serves, and it is not the thing being measured; `compare`
//! uses nginx as its upstream).
//!
//! HTTP behaviour comes from the flags, and each request may override it
//! with headers: `x-bench-status: 503`, `x-bench-body-size: 16384`,
//! `x-bench-delay: 20ms`, `x-bench-fault: reset-after=100 | hang |
//! close-mid-body | bad-framing`.
//!
//! What must hold: request heads and bodies are bounded (a head over
//! [`HEAD_BYTES_MAX`] closes the connection), connections are bounded
//! ([`CONNECTIONS_MAX`]), and a hang lasts at most [`HANG_MAX`].

// The upstream runs on plain threads, not proxy workers.
#![allow(clippy::disallowed_methods)]

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

/// Connections served at once; more are closed at accept.
const CONNECTIONS_MAX: usize = 16_384;
/// Largest request head read.
const HEAD_BYTES_MAX: usize = 64 * 1024;
/// Largest response body served (1 GiB): a typo must not allocate more.
const BODY_BYTES_MAX: usize = 1 << 30;
/// A `hang` fault holds the connection this long at most.
const HANG_MAX: Duration = Duration::from_secs(60);
/// Body bytes written per write(2).
const WRITE_CHUNK: usize = 64 * 1024;

/// Starts a TCP echo server on `listen` (port 0 for any); returns its address.
pub fn echo(listen: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(listen)?;
    let addr = listener.local_addr()?;
    let live = Arc::new(AtomicUsize::new(0));
    thread::Builder::new()
        .name("echo-accept".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                if live.load(Ordering::Relaxed) >= CONNECTIONS_MAX {
                    continue; // dropped: closed
                }
                let live = Arc::clone(&live);
                live.fetch_add(1, Ordering::Relaxed);
                thread::spawn(move || {
                    let _ = s.set_nodelay(true);
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = s.shutdown(Shutdown::Write);
                    live.fetch_sub(1, Ordering::Relaxed);
                });
            }
        })?;
    Ok(addr)
}

/// A fault injected into one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Send the head and `n` body bytes, then reset (RST).
    ResetAfter(usize),
    /// Read the request, answer nothing (up to [`HANG_MAX`]).
    Hang,
    /// Send the head and half the body, then close (FIN).
    CloseMidBody,
    /// Send both Content-Length and Transfer-Encoding: chunked.
    BadFraming,
}

impl std::str::FromStr for Fault {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "hang" => Ok(Fault::Hang),
            "close-mid-body" => Ok(Fault::CloseMidBody),
            "bad-framing" => Ok(Fault::BadFraming),
            other => other
                .strip_prefix("reset-after=")
                .and_then(|n| n.parse().ok())
                .map(Fault::ResetAfter)
                .ok_or_else(|| {
                    format!(
                        "unknown fault {other:?}: reset-after=N, hang, close-mid-body, bad-framing"
                    )
                }),
        }
    }
}

/// How the HTTP upstream answers (per-request headers may override).
#[derive(Debug, Clone, clap::Args)]
pub struct HttpOptions {
    /// Response status.
    #[arg(long, default_value_t = 200)]
    pub status: u16,
    /// Response body bytes.
    #[arg(long, default_value_t = 12)]
    pub body_size: usize,
    /// Wait this long before answering.
    #[arg(long, value_parser = crate::humantime_arg)]
    pub delay: Option<Duration>,
    /// With --delay: wait a random time between --delay and this.
    #[arg(long, value_parser = crate::humantime_arg)]
    pub delay_max: Option<Duration>,
    /// A fault for every response: reset-after=N, hang, close-mid-body, bad-framing.
    #[arg(long)]
    pub fault: Option<Fault>,
    /// Stall the Nth request (counted from 1 over all connections) ...
    #[arg(long)]
    pub stall_request: Option<u64>,
    /// ... for this long (a one-off stall, for coordinated-omission checks).
    #[arg(long, value_parser = crate::humantime_arg, default_value = "500ms")]
    pub stall: Duration,
    /// Answer 503 to this percentage of requests, at random (a faulty
    /// instance).
    #[arg(long, default_value_t = 0)]
    pub fail_percent: u8,
    /// Wait --slow before answering this percentage of requests, at random.
    #[arg(long, default_value_t = 0)]
    pub slow_percent: u8,
    #[arg(long, value_parser = crate::humantime_arg, default_value = "20ms")]
    pub slow: Duration,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            status: 200,
            body_size: 12,
            delay: None,
            delay_max: None,
            fault: None,
            stall_request: None,
            stall: Duration::from_millis(500),
            fail_percent: 0,
            slow_percent: 0,
            slow: Duration::from_millis(20),
        }
    }
}

struct Shared {
    options: HttpOptions,
    body: Vec<u8>,
    requests: AtomicU64,
    live: AtomicUsize,
}

/// Starts the HTTP upstream with default options (200, "hello world\n").
pub fn http(listen: SocketAddr) -> std::io::Result<SocketAddr> {
    http_with(listen, HttpOptions::default())
}

/// Starts the HTTP upstream on `listen`; returns its address.
pub fn http_with(listen: SocketAddr, options: HttpOptions) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(listen)?;
    let addr = listener.local_addr()?;
    let mut body = b"hello world\n".to_vec();
    body.resize(WRITE_CHUNK, b'x');
    let shared = Arc::new(Shared {
        options,
        body,
        requests: AtomicU64::new(0),
        live: AtomicUsize::new(0),
    });
    thread::Builder::new()
        .name("http-accept".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(s) = stream else { continue };
                if shared.live.load(Ordering::Relaxed) >= CONNECTIONS_MAX {
                    continue;
                }
                shared.live.fetch_add(1, Ordering::Relaxed);
                let shared = Arc::clone(&shared);
                thread::spawn(move || {
                    serve(s, &shared);
                    shared.live.fetch_sub(1, Ordering::Relaxed);
                });
            }
        })?;
    Ok(addr)
}

/// One request's answer, after flags and headers.
struct Answer {
    status: u16,
    body_size: usize,
    delay: Option<Duration>,
    fault: Option<Fault>,
    close: bool,
}

fn serve(mut s: TcpStream, shared: &Shared) {
    let _ = s.set_nodelay(true);
    let mut buf = vec![0u8; 16 * 1024];
    let mut have = 0;
    let mut rng = (std::process::id() as u64) ^ (&buf as *const _ as u64) | 1;
    loop {
        // Answer every complete request in the buffer (pipelining).
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut headers);
            let head_len = match req.parse(&buf[..have]) {
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial) => break,
                Err(_) => return,
            };
            let o = &shared.options;
            let mut a = Answer {
                status: o.status,
                body_size: o.body_size,
                delay: o.delay,
                fault: o.fault,
                close: req.version == Some(0),
            };
            let mut body_len = 0usize;
            for h in req.headers.iter() {
                let v = std::str::from_utf8(h.value).unwrap_or("").trim();
                match h.name.to_ascii_lowercase().as_str() {
                    "content-length" => body_len = v.parse().unwrap_or(0),
                    "transfer-encoding" => return, // not served: close
                    "connection" if v.eq_ignore_ascii_case("close") => a.close = true,
                    "x-bench-status" => a.status = v.parse().unwrap_or(a.status),
                    "x-bench-body-size" => a.body_size = v.parse().unwrap_or(a.body_size),
                    "x-bench-delay" => a.delay = crate::humantime_arg(v).ok().or(a.delay),
                    "x-bench-fault" => a.fault = v.parse().ok().or(a.fault),
                    _ => {}
                }
            }
            a.body_size = a.body_size.min(BODY_BYTES_MAX);
            if let (Some(lo), Some(hi)) = (a.delay, o.delay_max) {
                if hi > lo {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let spread = (hi - lo).as_micros() as u64;
                    a.delay = Some(lo + Duration::from_micros(rng % (spread + 1)));
                }
            }
            if o.fail_percent > 0 || o.slow_percent > 0 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let roll = (rng % 100) as u8;
                if roll < o.fail_percent {
                    a.status = 503;
                } else if roll < o.fail_percent.saturating_add(o.slow_percent) {
                    a.delay = Some(a.delay.unwrap_or_default() + o.slow);
                }
            }
            let n = shared.requests.fetch_add(1, Ordering::Relaxed) + 1;
            if o.stall_request == Some(n) {
                thread::sleep(o.stall);
            }
            // Skip the request body (the whole request is consumed before
            // answering).
            let mut consumed = head_len;
            let mut body_left = body_len;
            let in_buf = (have - head_len).min(body_left);
            consumed += in_buf;
            body_left -= in_buf;
            while body_left > 0 {
                match s.read(&mut buf[..body_left.min(16 * 1024)]) {
                    Ok(0) | Err(_) => return,
                    Ok(k) => body_left -= k,
                }
            }
            buf.copy_within(consumed.min(have)..have, 0);
            have -= consumed.min(have);
            if !answer(&mut s, &a, &shared.body) || a.close {
                return;
            }
        }
        if have == buf.len() {
            if buf.len() >= HEAD_BYTES_MAX {
                return;
            }
            buf.resize(buf.len() * 2, 0);
        }
        match s.read(&mut buf[have..]) {
            Ok(0) | Err(_) => return,
            Ok(n) => have += n,
        }
    }
}

/// Answers up to this size (head aside) are written in one call.
const SINGLE_WRITE_BYTES_MAX: usize = 16 * 1024;

/// Writes one response; false when the connection must end.
fn answer(s: &mut TcpStream, a: &Answer, body: &[u8]) -> bool {
    if let Some(d) = a.delay {
        thread::sleep(d);
    }
    let reason = match a.status {
        200 => "OK",
        404 => "Not Found",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    };
    let connection = if a.close { "connection: close\r\n" } else { "" };
    let head = match a.fault {
        Some(Fault::Hang) => {
            let _ = s.set_read_timeout(Some(HANG_MAX));
            let mut b = [0u8; 1];
            let _ = s.read(&mut b);
            return false;
        }
        Some(Fault::BadFraming) => format!(
            "HTTP/1.1 {} {reason}\r\ncontent-length: {}\r\ntransfer-encoding: chunked\r\n{connection}\r\n",
            a.status, a.body_size
        ),
        _ => format!(
            "HTTP/1.1 {} {reason}\r\ncontent-length: {}\r\n{connection}\r\n",
            a.status, a.body_size
        ),
    };
    let limit = match a.fault {
        Some(Fault::ResetAfter(n)) => n.min(a.body_size),
        Some(Fault::CloseMidBody) => a.body_size / 2,
        _ => a.body_size,
    };
    if a.fault.is_none() && limit <= body.len() && limit <= SINGLE_WRITE_BYTES_MAX {
        // A small answer goes out in one write, head and body, as real
        // servers send it (nginx writes both at once): a process killed
        // between two writes would leave a head without its body, which
        // no proxy can complete, an artefact of this server and not the
        // restart the reliability bench measures.
        let mut out = Vec::with_capacity(head.len() + limit);
        out.extend_from_slice(head.as_bytes());
        out.extend_from_slice(&body[..limit]);
        return s.write_all(&out).is_ok();
    }
    if s.write_all(head.as_bytes()).is_err() {
        return false;
    }
    let mut left = limit;
    while left > 0 {
        let n = left.min(body.len());
        if s.write_all(&body[..n]).is_err() {
            return false;
        }
        left -= n;
    }
    match a.fault {
        Some(Fault::ResetAfter(_)) => {
            // SO_LINGER 0: close sends RST instead of FIN.
            let sock = socket2::SockRef::from(&*s);
            let _ = sock.set_linger(Some(Duration::ZERO));
            false
        }
        Some(Fault::CloseMidBody | Fault::BadFraming) => false,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(addr: SocketAddr, req: &str) -> (String, std::io::Result<()>) {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = Vec::new();
        let r = s.read_to_end(&mut out).map(|_| ());
        (String::from_utf8_lossy(&out).into_owned(), r)
    }

    #[test]
    fn answers_by_flags_and_by_header() {
        let addr = http_with(
            "127.0.0.1:0".parse().unwrap(),
            HttpOptions {
                body_size: 100,
                ..HttpOptions::default()
            },
        )
        .unwrap();
        let (text, _) = exchange(
            addr,
            "GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
        );
        assert!(
            text.starts_with("HTTP/1.1 200 OK\r\ncontent-length: 100\r\n"),
            "{text}"
        );
        let body = format!("hello world\n{}", "x".repeat(88));
        assert!(text.ends_with(&format!("\r\n\r\n{body}")), "{text}");
        let (text, _) = exchange(
            addr,
            "GET / HTTP/1.1\r\nhost: a\r\nx-bench-status: 503\r\nx-bench-body-size: 0\r\nconnection: close\r\n\r\n",
        );
        assert!(text.starts_with("HTTP/1.1 503 "), "{text}");
        let (text, _) = exchange(
            addr,
            "GET / HTTP/1.1\r\nhost: a\r\nx-bench-fault: close-mid-body\r\n\r\n",
        );
        assert!(
            text.contains("content-length: 100")
                && text.ends_with(&format!("\r\n\r\n{}", &body[..50])),
            "half the body, then a close: {text}"
        );
        let (text, _) = exchange(
            addr,
            "GET / HTTP/1.1\r\nhost: a\r\nx-bench-fault: bad-framing\r\n\r\n",
        );
        assert!(text.contains("transfer-encoding: chunked"), "{text}");
        let (text, read) = exchange(
            addr,
            "GET / HTTP/1.1\r\nhost: a\r\nx-bench-fault: reset-after=5\r\n\r\n",
        );
        assert!(
            read.is_err() || text.ends_with("hello"),
            "a reset after 5 body bytes: {text:?} {read:?}"
        );
    }

    #[test]
    fn faults_parse() {
        assert_eq!("reset-after=10".parse(), Ok(Fault::ResetAfter(10)));
        assert_eq!("hang".parse(), Ok(Fault::Hang));
        assert!("nope".parse::<Fault>().is_err());
    }
}
