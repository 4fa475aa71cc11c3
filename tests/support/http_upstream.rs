//! A small HTTP/1.1 upstream for tests, written independently of the
//! proxy's codec (httparse plus hand-rolled body reading), so a bug in the
//! proxy's codec cannot hide behind the same bug here.
//!
//! Behaviour by the first path segment that names a command (so routes
//! may add a prefix, as in `/app/status/503`):
//! - `/echo`: 200, body = the request head as received, a blank line, then
//!   the request body (so tests see exactly what the proxy forwarded).
//! - `/status/N`: status N, empty body.
//! - `/delay/MS`: waits MS milliseconds, then 200 "late".
//! - `/reset`: closes without answering.
//! - `/chunked`: 200 with a chunked body "hello world".
//! - `/until-close`: 200 without length; the body ends at close.
//! - `/big/N`: 200 with N bytes of a fixed pattern (Content-Length).
//! - `/bad-framing`: 200 with both Content-Length and Transfer-Encoding.
//! - `/truncated`: promises 100 bytes, sends 10, closes.
//! - `/interims/N`: N `103 Early Hints`, then 200 "final".
//! - `/ws`: answers an Upgrade with 101, then echoes bytes.
//! - any `CONNECT`: 200, then echoes bytes.
//! - anything else: 200 "ok <path>".

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

#[derive(Debug, Default)]
pub struct Stats {
    pub connections: AtomicUsize,
    pub requests: AtomicUsize,
}

pub struct HttpUpstream {
    pub addr: SocketAddr,
    pub stats: Arc<Stats>,
}

impl HttpUpstream {
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// Every request answered with `status` (outlier and retry tests).
    pub fn always(status: u16) -> Self {
        Self::start_with(Some(status))
    }

    fn start_with(fixed: Option<u16>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = Arc::new(Stats::default());
        let s = Arc::clone(&stats);
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                s.connections.fetch_add(1, Ordering::SeqCst);
                let s = Arc::clone(&s);
                thread::spawn(move || serve(conn, &s, fixed));
            }
        });
        Self { addr, stats }
    }

    pub fn connections(&self) -> usize {
        self.stats.connections.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> usize {
        self.stats.requests.load(Ordering::SeqCst)
    }
}

fn serve(conn: TcpStream, stats: &Stats, fixed: Option<u16>) {
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // Head and body go out in separate writes; without this, Nagle plus
    // the peer's delayed ACK adds 40 ms to every response.
    conn.set_nodelay(true).unwrap();
    let mut writer = conn.try_clone().unwrap();
    let mut reader = BufReader::new(conn);
    loop {
        let mut head = Vec::new();
        loop {
            let before = head.len();
            match reader.read_until(b'\n', &mut head) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if head[before..] == *b"\r\n" {
                break;
            }
        }
        stats.requests.fetch_add(1, Ordering::SeqCst);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        if !matches!(req.parse(&head), Ok(httparse::Status::Complete(_))) {
            let _ = writer.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n");
            return;
        }
        let path = req.path.unwrap_or("/").to_string();
        let get = |n: &str| {
            req.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(n))
                .map(|h| String::from_utf8_lossy(h.value).to_string())
        };
        let chunked =
            get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().ends_with("chunked"));
        let length: usize = get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let close = get("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let upgrade = get("upgrade").is_some();
        if let Some(cont) = get("expect") {
            if cont.eq_ignore_ascii_case("100-continue") {
                let _ = writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
            }
        }
        let body = if chunked {
            read_chunked(&mut reader)
        } else {
            read_exact(&mut reader, length)
        };
        let Some(body) = body else { return };
        if req.method == Some("CONNECT") {
            // A CONNECT target: establish, then echo bytes both ways.
            let _ = writer.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n");
            echo_until_closed(&mut reader, &mut writer);
            return;
        }
        if let Some(status) = fixed {
            let _ = write!(
                writer,
                "HTTP/1.1 {status} Fixed\r\ncontent-length: 0\r\n\r\n"
            );
            continue;
        }
        let ok = |w: &mut TcpStream, body: &[u8]| {
            let _ = write!(
                w,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            let _ = w.write_all(body);
        };
        // The command is the first known segment, so routes may prefix it.
        const COMMANDS: &[&str] = &[
            "echo",
            "status",
            "delay",
            "reset",
            "chunked",
            "until-close",
            "big",
            "bad-framing",
            "ws",
            "truncated",
            "interims",
        ];
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let at = segments
            .iter()
            .position(|s| COMMANDS.contains(s))
            .unwrap_or(segments.len());
        let command = (
            segments.get(at).copied().unwrap_or(""),
            segments.get(at + 1).copied(),
        );
        match command {
            ("echo", _) => {
                let mut out = head.clone();
                out.extend_from_slice(&body);
                ok(&mut writer, &out);
            }
            ("status", Some(code)) => {
                let _ = write!(
                    writer,
                    "HTTP/1.1 {code} Status\r\ncontent-length: 0\r\n\r\n"
                );
            }
            ("delay", Some(ms)) => {
                thread::sleep(Duration::from_millis(ms.parse().unwrap_or(0)));
                ok(&mut writer, b"late");
            }
            ("reset", _) => return,
            ("chunked", _) => {
                let _ = writer.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n");
            }
            ("until-close", _) => {
                let _ = writer
                    .write_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nbody until close");
                return;
            }
            ("big", Some(n)) => {
                let n: usize = n.parse().unwrap_or(0);
                let _ = write!(writer, "HTTP/1.1 200 OK\r\ncontent-length: {n}\r\n\r\n");
                if req.method == Some("HEAD") {
                    continue;
                }
                let block = [b'z'; 64 * 1024];
                let mut left = n;
                while left > 0 {
                    let k = left.min(block.len());
                    if writer.write_all(&block[..k]).is_err() {
                        return;
                    }
                    left -= k;
                }
            }
            ("interims", Some(n)) => {
                // N interim responses (103 Early Hints), then 200.
                for _ in 0..n.parse::<usize>().unwrap_or(0) {
                    let _ = writer.write_all(
                        b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n",
                    );
                }
                ok(&mut writer, b"final");
            }
            ("truncated", _) => {
                // Promises 100 bytes, sends 10, closes.
                let _ =
                    writer.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789");
                return;
            }
            ("bad-framing", _) => {
                let _ = writer.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
            }
            ("ws", _) if upgrade => {
                let _ = writer.write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n");
                echo_until_closed(&mut reader, &mut writer);
                return;
            }
            _ => ok(&mut writer, format!("ok {path}").as_bytes()),
        }
        if close {
            return;
        }
    }
}

/// After a 101 or a CONNECT 200: echo bytes until the peer closes.
fn echo_until_closed(reader: &mut BufReader<TcpStream>, writer: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = reader.read(&mut buf) {
        if n == 0 || writer.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

fn read_exact(r: &mut impl Read, n: usize) -> Option<Vec<u8>> {
    let mut body = vec![0u8; n];
    r.read_exact(&mut body).ok()?;
    Some(body)
}

fn read_chunked(r: &mut BufReader<TcpStream>) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line).ok()?;
        let size = usize::from_str_radix(line.trim_end().split(';').next()?, 16).ok()?;
        if size == 0 {
            // Trailers until the empty line.
            loop {
                let mut t = String::new();
                r.read_line(&mut t).ok()?;
                if t == "\r\n" {
                    return Some(body);
                }
            }
        }
        let mut chunk = vec![0u8; size + 2];
        r.read_exact(&mut chunk).ok()?;
        body.extend_from_slice(&chunk[..size]);
    }
}
