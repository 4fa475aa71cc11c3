//! The admin server: HTTP/1.1 on a Unix socket (mode 0600) and optionally
//! on a TCP address, served by threads of its own, never by a data worker.
//!
//! Endpoints: `GET /live`, `GET /ready`, `GET /stats` (JSON, merged and per
//! core), `GET /metrics` (Prometheus text), `GET /histograms` (`hgrm` or
//! JSON, filtered by listener, route, cluster, metric, core; `POST
//! /histograms?reset=true` copies and empties them, for interval
//! histograms), `GET /config`, `GET /clusters` (endpoints with health,
//! ejection, load, per core), `POST /config` (a whole TOML config, swapped
//! on every worker or none; see [`crate::control`]), `POST /drain`,
//! `POST /log-level?filter=...`, `GET /golden` (the golden metrics as
//! JSON), `GET /tap` (a live stream of requests, filtered: see [`tap`]).
//! Unknown query parameters are refused (a typo must not return
//! everything).
//!
//! Who may do what. Loopback is no trust boundary: in a pod every process
//! shares the sidecar's network namespace. So:
//! - the Unix socket (created 0600, removed when the server stops) serves
//!   every endpoint: its file mode is the credential;
//! - the TCP listener serves, to anyone, only what a scraper or a probe
//!   reads: `GET /live`, `/ready`, `/metrics`, `/histograms`. Everything
//!   else (the config with its file paths, stats, clusters, and every
//!   POST) needs `Authorization: Bearer <token>` with the token from
//!   `[admin] token_file`; without that file it is never served on TCP.
//!   Refusals are answered (401/403) and counted.
//! - every state change is a POST, on either listener.
//!
//! What must hold: a scrape costs a worker only the copy of its own
//! counters and histograms (asked through its mailbox); admin connections
//! are bounded in number, size and time.

pub mod client;
pub mod prometheus;
pub mod tap;
pub mod top;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::{
        fs::PermissionsExt,
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use serde::Serialize;

use crate::{
    config::limits::{ACCEPT_ERROR_BACKOFF, CONFIG_FILE_BYTES_MAX},
    control::Controller,
    http1::{HeadLimits, RequestParser},
    metrics::{
        histograms::{self, Key},
        Snapshot,
    },
    worker,
};

/// Admin connections served at once (both listeners together); more get a
/// 503. The admin server is for a local agent, a scraper and an operator,
/// not for traffic.
const CONNECTIONS_MAX: usize = 8;
/// An admin client gets this long to send its request and read the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Request head cap on the admin server.
const HEAD_BYTES_MAX: usize = 16 * 1024;
/// Request body cap: a whole config, as large as a config file may be.
const BODY_BYTES_MAX: u64 = CONFIG_FILE_BYTES_MAX;

/// What the admin threads need from the proxy.
pub struct State {
    /// The running config and the way to swap it; also every worker's
    /// mailbox.
    pub control: Arc<Controller>,
    /// Set once draining starts: /ready answers 503 from then on.
    pub draining: Arc<AtomicBool>,
    /// Replaces the log filter (`POST /log-level?filter=...`); None where
    /// the embedding program does not allow it.
    pub set_log_filter: Option<SetLogFilter>,
}

impl State {
    fn mailboxes(&self) -> &[crate::worker::Mailbox] {
        self.control.mailboxes()
    }
}

/// Replaces the process's log filter; Err says why the filter is invalid.
pub type SetLogFilter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Where the admin server listens.
#[derive(Clone, Default)]
pub struct Listen {
    /// The Unix socket (created 0600; every endpoint).
    pub socket: Option<PathBuf>,
    /// A TCP address, e.g. for a Prometheus scraper on the node: read-only
    /// endpoints to anyone, the rest only with `tcp_token`.
    pub tcp: Option<SocketAddr>,
    /// The bearer token that unlocks every endpoint on TCP (from
    /// `[admin] token_file`, see [`read_token`]). None: never.
    pub tcp_token: Option<String>,
}

impl std::fmt::Debug for Listen {
    // The token stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listen")
            .field("socket", &self.socket)
            .field("tcp", &self.tcp)
            .field("tcp_token", &self.tcp_token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

/// A token shorter than this is refused: it must not be guessable.
pub const TOKEN_BYTES_MIN: usize = 16;
/// A token file larger than this is not a token.
const TOKEN_FILE_BYTES_MAX: u64 = 4096;

/// Reads the admin TCP token from `path`: the file must be readable by
/// its owner only (like an ssh key: a token others can read protects
/// nothing), hold at most 4 KiB, and a token of at least 16 characters
/// (surrounding whitespace trimmed).
pub fn read_token(path: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(format!(
            "{}: mode {:o} lets others read the admin token; chmod 600 it",
            path.display(),
            meta.permissions().mode() & 0o777
        ));
    }
    if meta.len() > TOKEN_FILE_BYTES_MAX {
        return Err(format!(
            "{}: larger than {TOKEN_FILE_BYTES_MAX} bytes",
            path.display()
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let token = text.trim();
    if token.len() < TOKEN_BYTES_MIN || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{}: the token must be one word of at least {TOKEN_BYTES_MIN} characters",
            path.display()
        ));
    }
    Ok(token.to_string())
}

/// What a connection may reach, by the listener it came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// The Unix socket: everything.
    Socket,
    /// The TCP listener: read-only endpoints, or everything with the token.
    Tcp,
}

/// Admin requests refused on the TCP listener, by why (read by /metrics
/// and /stats; admin threads only, never a worker).
#[derive(Debug, Default)]
pub struct Refusals {
    /// A protected endpoint without a token configured.
    pub not_served: AtomicU64,
    /// A protected endpoint with a missing or wrong token.
    pub bad_token: AtomicU64,
}

/// The running admin server; stops and removes its socket on drop.
pub struct Server {
    socket: Option<PathBuf>,
    tcp: Option<SocketAddr>,
    /// A duplicate of the TCP listening socket (see [`Server::tcp_listener`]).
    tcp_listener: Option<TcpListener>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// The listening sockets (clones), shut down on drop to wake the
    /// blocked accepts: even when the socket file was removed meanwhile,
    /// so a connect by path could not reach it.
    listening: Vec<socket2::Socket>,
}

impl Server {
    /// Binds what `listen` names (replacing a stale Unix socket) and serves.
    pub fn start(listen: &Listen, state: State) -> std::io::Result<Server> {
        Self::start_with(listen, state, None)
    }

    /// [`Server::start`], serving TCP on `tcp_inherited` (a listening
    /// socket handed over by an upgrade) instead of binding `listen.tcp`.
    pub fn start_with(
        listen: &Listen,
        state: State,
        tcp_inherited: Option<TcpListener>,
    ) -> std::io::Result<Server> {
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(Shared {
            state,
            token: listen.tcp_token.clone(),
            refusals: Refusals::default(),
            taps: AtomicUsize::new(0),
            next_tap: AtomicU64::new(1),
        });
        let live = Arc::new(AtomicUsize::new(0));
        let mut server = Server {
            socket: None,
            tcp: None,
            tcp_listener: None,
            stop: Arc::clone(&stop),
            threads: Vec::new(),
            listening: Vec::new(),
        };
        if let Some(path) = &listen.socket {
            let listener = bind_unix(path)?;
            let fd = std::os::fd::OwnedFd::from(listener.try_clone()?);
            server.spawn_accept("pilotfish-admin", fd, &state, &live, move || {
                listener
                    .accept()
                    .map(|(c, _)| (Conn::Unix(c), Access::Socket))
            })?;
            server.socket = Some(path.clone());
            tracing::info!(socket = %path.display(), "admin socket listening");
        }
        if let Some(addr) = listen.tcp {
            let listener = match tcp_inherited {
                Some(l) => {
                    l.set_nonblocking(false)?;
                    l
                }
                None => TcpListener::bind(addr)?,
            };
            server.tcp_listener = Some(listener.try_clone()?);
            let bound = listener.local_addr()?;
            let fd = std::os::fd::OwnedFd::from(listener.try_clone()?);
            server.spawn_accept("pilotfish-admin-tcp", fd, &state, &live, move || {
                listener.accept().map(|(c, _)| (Conn::Tcp(c), Access::Tcp))
            })?;
            server.tcp = Some(bound);
            let token = if listen.tcp_token.is_some() {
                "every endpoint with the bearer token"
            } else {
                "read-only endpoints only"
            };
            tracing::info!(address = %bound, serves = token, "admin TCP listener");
        }
        Ok(server)
    }

    /// Serves one listening socket on a thread of its own; `listening` (a
    /// clone of it) is kept so that drop can shut it down.
    fn spawn_accept(
        &mut self,
        name: &str,
        listening: std::os::fd::OwnedFd,
        state: &Arc<Shared>,
        live: &Arc<AtomicUsize>,
        accept: impl Fn() -> std::io::Result<(Conn, Access)> + Send + 'static,
    ) -> std::io::Result<()> {
        self.listening.push(socket2::Socket::from(listening));
        let (state, stop, live) = (Arc::clone(state), Arc::clone(&self.stop), Arc::clone(live));
        self.threads.push(
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || accept_loop(accept, &state, &stop, &live))?,
        );
        Ok(())
    }

    /// The bound TCP address, if the server listens on TCP.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp
    }

    /// A duplicate of the TCP listening socket, for an upgrade to hand over.
    pub fn tcp_listener(&self) -> Option<(SocketAddr, TcpListener)> {
        Some((self.tcp?, self.tcp_listener.as_ref()?.try_clone().ok()?))
    }
}

fn bind_unix(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // Under systemd, RuntimeDirectory= made it; by hand, we do.
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        // A socket left by a crashed run; a live one would still be
        // bound by its owner, and binding over it is what we want.
        std::fs::remove_file(path)?;
    }
    // Created with the process umask, then narrowed before anyone could
    // use it for anything: the listener is not yet accepting.
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accepts: shutdown(2) on a listening socket makes
        // a blocked accept return at once on Linux.
        for l in &self.listening {
            let _ = l.shutdown(std::net::Shutdown::Both);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(path) = &self.socket {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// An accepted admin connection.
enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    fn set_timeouts(&self) {
        let t = Some(IO_TIMEOUT);
        let _ = match self {
            Conn::Unix(c) => c.set_read_timeout(t).and(c.set_write_timeout(t)),
            Conn::Tcp(c) => c.set_read_timeout(t).and(c.set_write_timeout(t)),
        };
    }
}

impl Conn {
    /// Whether the client closed its end (a tap's idle check). Peeks
    /// without blocking: no byte waiting, or one, means it is still there.
    #[allow(unsafe_code)]
    fn peer_gone(&self) -> bool {
        use std::os::fd::AsRawFd;
        let fd = match self {
            Conn::Unix(c) => c.as_raw_fd(),
            Conn::Tcp(c) => c.as_raw_fd(),
        };
        let mut byte = 0u8;
        // SAFETY: a one-byte buffer we own, on a socket this value owns.
        let n = unsafe {
            libc::recv(
                fd,
                (&raw mut byte).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n == 0
            || (n < 0
                && !matches!(
                    std::io::Error::last_os_error().kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                ))
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(c) => c.read(buf),
            Conn::Tcp(c) => c.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(c) => c.write(buf),
            Conn::Tcp(c) => c.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What the admin threads share: the proxy's state, the TCP token, and
/// the refusal counters.
struct Shared {
    state: State,
    token: Option<String>,
    refusals: Refusals,
    /// Taps attached now (see [`tap`]), and the next tap's id.
    taps: AtomicUsize,
    next_tap: AtomicU64,
}

/// Accepts until stopped. `accept` gives a connection and what it may reach.
fn accept_loop(
    accept: impl Fn() -> std::io::Result<(Conn, Access)>,
    state: &Arc<Shared>,
    stop: &AtomicBool,
    live: &Arc<AtomicUsize>,
) {
    loop {
        let accepted = accept();
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok((mut conn, access)) = accepted else {
            // EMFILE and friends: back off instead of spinning. This is the
            // admin thread, not a worker, so blocking it is fine.
            #[allow(clippy::disallowed_methods)]
            std::thread::sleep(ACCEPT_ERROR_BACKOFF);
            continue;
        };
        if live.load(Ordering::SeqCst) >= CONNECTIONS_MAX {
            conn.set_timeouts();
            let _ = respond(&mut conn, 503, "text/plain", b"admin server busy\n");
            continue;
        }
        live.fetch_add(1, Ordering::SeqCst);
        let (state, done) = (Arc::clone(state), Arc::clone(live));
        let spawned = std::thread::Builder::new()
            .name("pilotfish-admin-conn".into())
            .spawn(move || {
                serve(conn, access, &state);
                done.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            live.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn serve(mut conn: Conn, access: Access, shared: &Shared) {
    conn.set_timeouts();
    let mut parser = RequestParser::new(HeadLimits {
        head_bytes: HEAD_BYTES_MAX,
        ..HeadLimits::default()
    });
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let (req, head_len) = loop {
        match parser.parse(&buf) {
            Ok(Some(parsed)) => break parsed,
            Ok(None) => {}
            Err(e) => {
                let _ = respond(&mut conn, 400, "text/plain", format!("{e}\n").as_bytes());
                return;
            }
        }
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    // The body, framed strictly by the parser: Content-Length only (the
    // admin client and curl send it), bounded by the largest config file.
    let length = match req.body {
        crate::http1::RequestBody::Empty => 0,
        crate::http1::RequestBody::Length(n) => n,
        crate::http1::RequestBody::Chunked => {
            let msg = b"send the body with content-length\n";
            let _ = respond(&mut conn, 411, "text/plain", msg);
            return;
        }
    };
    if length > BODY_BYTES_MAX {
        let msg = format!("body is {length} bytes; the limit is {BODY_BYTES_MAX}\n");
        let _ = respond(&mut conn, 413, "text/plain", msg.as_bytes());
        return;
    }
    let mut body = buf.split_off(head_len.min(buf.len()));
    body.truncate(length as usize);
    if (body.len() as u64) < length {
        let rest = length - body.len() as u64;
        if (&mut conn).take(rest).read_to_end(&mut body).is_err() || (body.len() as u64) < length {
            return;
        }
    }
    let target = String::from_utf8_lossy(req.target()).into_owned();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let query = Query::parse(query);
    let (status, kind, answer) = match admit(access, req.method(), path, &req, shared) {
        Some(refused) => refused,
        None if req.method() == b"GET" && path == "/tap" => match unknown_param(path, &query)
            .map_or_else(|| tap::stream(&mut conn, &query, shared), Err)
        {
            Ok(()) => return,
            Err(reply) => reply,
        },
        None => route(req.method(), path, &query, &body, shared),
    };
    let _ = respond(&mut conn, status, kind, &answer);
}

/// Whether the TCP listener serves this request without a token: reads a
/// scraper or a probe needs, nothing that changes state or shows the
/// config (file paths) and the clusters.
fn public(method: &[u8], path: &str) -> bool {
    method == b"GET" && matches!(path, "/live" | "/ready" | "/metrics" | "/histograms")
}

/// None: serve the request. Some(reply): refused, and counted.
fn admit(
    access: Access,
    method: &[u8],
    path: &str,
    req: &crate::http1::RequestHead,
    shared: &Shared,
) -> Option<Reply> {
    if access == Access::Socket || public(method, path) {
        return None;
    }
    let Some(token) = &shared.token else {
        shared.refusals.not_served.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            path,
            "admin TCP: protected endpoint refused (no token_file)"
        );
        return Some(text(
            403,
            "the admin TCP listener serves GET /live, /ready, /metrics and /histograms only; use the admin Unix socket, or set [admin] token_file\n",
        ));
    };
    // The scheme name is case-insensitive (RFC 9110 §11.1).
    let presented = req
        .head
        .get("authorization")
        .filter(|v| v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer "))
        .map(|v| v[7..].trim_ascii());
    if presented.is_some_and(|p| constant_time_eq(p, token.as_bytes())) {
        return None;
    }
    shared.refusals.bad_token.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(path, "admin TCP: missing or wrong bearer token");
    Some(text(
        401,
        "this endpoint needs Authorization: Bearer <admin token>\n",
    ))
}

/// Compares without an early exit, so the time taken does not say how
/// much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn respond(conn: &mut Conn, status: u16, kind: &str, body: &[u8]) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes())?;
    conn.write_all(body)
}

/// `a=b&c=d`, no percent-decoding: names and values here are identifiers.
pub struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: &str) -> Self {
        Query(
            q.split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (k.to_string(), v.to_string())
                })
                .collect(),
        )
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(k, _)| k.as_str())
    }
}

type Reply = (u16, &'static str, Vec<u8>);

fn text(status: u16, body: impl Into<String>) -> Reply {
    (
        status,
        "text/plain; charset=utf-8",
        body.into().into_bytes(),
    )
}

fn json(value: &impl Serialize) -> Reply {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => (200, "application/json", body),
        Err(e) => text(500, format!("cannot encode: {e}\n")),
    }
}

/// The query parameters each endpoint understands; any other is refused
/// with 400, so that a typo (`listner=`) does not silently return all.
fn known_params(path: &str) -> &'static [&'static str] {
    match path {
        "/histograms" => &[
            "format", "listener", "route", "cluster", "metric", "core", "reset",
        ],
        "/config" => &["format"],
        "/metrics" => &["per_core"],
        "/log-level" => &["filter", "level"],
        "/tap" => tap::PARAMS,
        _ => &[],
    }
}

/// A 400 naming the first query parameter `path` does not know.
fn unknown_param(path: &str, query: &Query) -> Option<Reply> {
    let unknown = query.names().find(|n| !known_params(path).contains(n))?;
    let known = known_params(path);
    Some(text(
        400,
        if known.is_empty() {
            format!("{path} takes no query parameter; found {unknown:?}\n")
        } else {
            format!(
                "unknown parameter {unknown:?} for {path}; known: {}\n",
                known.join(", ")
            )
        },
    ))
}

fn route(method: &[u8], path: &str, query: &Query, body: &[u8], shared: &Shared) -> Reply {
    let state = &shared.state;
    if let Some(refused) = unknown_param(path, query) {
        return refused;
    }
    let reset = query.get("reset") == Some("true");
    match (method, path) {
        (b"GET", "/live") => text(200, "live\n"),
        (b"GET", "/ready") => ready(state),
        (b"GET", "/stats") => json(&stats(shared)),
        (b"GET", "/metrics") => {
            let reports = worker::collect_reports(state.mailboxes());
            let hist = worker::collect_histograms(state.mailboxes(), false);
            let tls = state.control.tls_status();
            let (spans_exported, spans_failed) = state.control.span_export();
            let extra = prometheus::Extra {
                tls: tls.as_ref(),
                access_log_lost: state.control.access_log_lost(),
                spans_exported,
                spans_failed,
                admin_refusals: Some(&shared.refusals),
                per_core: query.get("per_core") == Some("true"),
                overload: state.control.overload(),
                xds: Some(state.control.xds_status().report()).filter(|r| r.configured),
            };
            let out = prometheus::render(&reports, &hist, &extra);
            (200, "text/plain; version=0.0.4", out.into_bytes())
        }
        (b"GET", "/golden") => {
            let reports = worker::collect_reports(state.mailboxes());
            json(&crate::metrics::golden::merge(
                reports.iter().map(|r| &r.golden),
            ))
        }
        // Emptying histograms changes state: POST only.
        (b"GET", "/histograms") if reset => text(
            405,
            "reset=true empties the histograms: send it as POST /histograms?reset=true\n",
        ),
        (b"GET", "/histograms") => histograms(query, false, state),
        (b"POST", "/histograms") if reset => histograms(query, true, state),
        (b"GET", "/config") => config_json(state),
        (b"POST", "/config") => apply(query, body, state),
        (b"GET", "/clusters") => json(&worker::collect_clusters(state.mailboxes())),
        (b"POST", "/log-level") => log_level(query, state),
        (b"POST", "/drain") => {
            state.draining.store(true, Ordering::SeqCst);
            state.control.drain_all();
            text(200, "draining\n")
        }
        (
            _,
            "/live" | "/ready" | "/stats" | "/metrics" | "/histograms" | "/config" | "/clusters"
            | "/drain" | "/log-level" | "/tap",
        ) => text(405, "method not allowed\n"),
        _ => text(404, format!("no admin endpoint {path}\n")),
    }
}

/// `POST /config`: a whole TOML config, validated, then swapped on every
/// worker or none. 200 with what changed; 400 invalid (with file position);
/// 409 a worker could not prepare; 503 draining.
fn apply(query: &Query, body: &[u8], state: &State) -> Reply {
    let Ok(text_body) = std::str::from_utf8(body) else {
        return text(400, "the config must be UTF-8 TOML\n");
    };
    // Every field has a default, so an empty body would parse as a config
    // with no listeners: almost surely a mistake, never what to swap in.
    if text_body.trim().is_empty() {
        return text(400, "empty body: send a whole config (TOML)\n");
    }
    // The body replaces the file's layer; a control plane's resources
    // stay on top of it.
    match state
        .control
        .apply_text(std::path::Path::new("POST /config"), text_body)
    {
        Ok(changes) if query.get("format") == Some("json") => json(&changes),
        Ok(changes) => text(200, format!("{}\n", changes.summary())),
        Err(e) => {
            tracing::warn!(error = %e, "config swap refused");
            text(e.status(), format!("{e}\n"))
        }
    }
}

/// The running config; under a control plane, also `dynamic`: the
/// resources it pushed (as config tables), with the client's state and
/// each type's version.
fn config_json(state: &State) -> Reply {
    let config = state.control.config();
    let report = state.control.xds_status().report();
    if !report.configured {
        return json(&*config);
    }
    #[derive(Serialize)]
    struct WithDynamic<'a> {
        #[serde(flatten)]
        config: &'a crate::Config,
        dynamic: Dynamic,
    }
    #[derive(Serialize)]
    struct Dynamic {
        control_plane: crate::xds::Report,
        resources: crate::config::compose::Dynamic,
    }
    json(&WithDynamic {
        config: &config,
        dynamic: Dynamic {
            control_plane: report,
            resources: state.control.dynamic(),
        },
    })
}

fn log_level(query: &Query, state: &State) -> Reply {
    let Some(set) = &state.set_log_filter else {
        return text(404, "this process does not allow changing the log filter\n");
    };
    let Some(filter) = query.get("filter").or_else(|| query.get("level")) else {
        return text(
            400,
            "give filter=, e.g. filter=debug or filter=info,pilotfish::http=debug\n",
        );
    };
    match set(filter) {
        Ok(()) => {
            tracing::info!(filter, "log filter changed through the admin socket");
            text(200, format!("log filter: {filter}\n"))
        }
        Err(e) => text(400, format!("invalid filter {filter:?}: {e}\n")),
    }
}

fn ready(state: &State) -> Reply {
    if state.draining.load(Ordering::SeqCst) {
        return text(503, "draining\n");
    }
    let answered = worker::collect_reports(state.mailboxes()).len();
    if answered == state.mailboxes().len() {
        text(200, "ready\n")
    } else {
        text(
            503,
            format!(
                "{answered} of {} workers answered\n",
                state.mailboxes().len()
            ),
        )
    }
}

#[derive(Serialize)]
struct Stats {
    total: Snapshot,
    /// Admin TCP requests refused: (not served without a token, bad token).
    admin_tcp_refused: AdminRefusals,
    /// The certificate new handshakes present (absent without `[tls]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<crate::control::TlsStatus>,
    /// The memory overload stage (0 without `[overload] memory_max_mib`).
    overload: crate::lifecycle::overload::Report,
    workers: Vec<worker::WorkerReport>,
}

#[derive(Serialize)]
struct AdminRefusals {
    not_served: u64,
    bad_token: u64,
}

fn stats(shared: &Shared) -> Stats {
    let state = &shared.state;
    let workers = worker::collect_reports(state.mailboxes());
    let mut total = Snapshot::default();
    for w in &workers {
        total.merge(&w.counters);
    }
    // The writer's losses count with the cores' drops.
    total.access_log_dropped += state.control.access_log_lost();
    Stats {
        total,
        admin_tcp_refused: AdminRefusals {
            not_served: shared.refusals.not_served.load(Ordering::Relaxed),
            bad_token: shared.refusals.bad_token.load(Ordering::Relaxed),
        },
        tls: state.control.tls_status(),
        overload: state.control.overload(),
        workers,
    }
}

#[derive(Serialize)]
struct HistogramJson {
    key: Key,
    count: u64,
    min_us: u64,
    mean_us: f64,
    max_us: u64,
    percentiles_us: Vec<(f64, u64)>,
}

/// Filters the merged histograms by the query; `format=hgrm` needs the
/// filters to select exactly one. A filter given empty (`route=`) selects
/// histograms without that part: `listener=web&route=` is the listener's
/// total, not one of its routes'.
fn histograms(query: &Query, reset: bool, state: &State) -> Reply {
    let core: Option<usize> = match query.get("core").map(str::parse) {
        None => None,
        Some(Ok(c)) => Some(c),
        Some(Err(_)) => return text(400, "core must be a number\n"),
    };
    let reports = worker::collect_histograms(state.mailboxes(), reset);
    let wanted = |k: &Key| {
        let field = |name: &str, value: &Option<String>| match query.get(name) {
            None => true,
            Some("") => value.is_none(),
            Some(want) => value.as_deref() == Some(want),
        };
        field("listener", &k.listener)
            && field("route", &k.route)
            && field("cluster", &k.cluster)
            && query.get("metric").is_none_or(|m| m == k.metric.name())
    };
    let merged = histograms::merge_by_key(&reports, core, wanted);
    match query.get("format").unwrap_or("json") {
        "hgrm" => match merged.as_slice() {
            [(_, h)] => text(200, histograms::hgrm(h)),
            [] => text(404, "no histogram matches\n"),
            many => {
                let keys: Vec<String> = many.iter().map(|(k, _)| k.to_string()).collect();
                text(
                    400,
                    format!(
                        "{} histograms match; narrow with listener=, route=, cluster=, metric= (an empty value selects none: route= is the listener total):\n  {}\n",
                        many.len(),
                        keys.join("\n  ")
                    ),
                )
            }
        },
        "json" => json(
            &merged
                .iter()
                .map(|(k, h)| HistogramJson {
                    key: k.clone(),
                    count: h.len(),
                    min_us: if h.is_empty() { 0 } else { h.min() },
                    mean_us: h.mean(),
                    max_us: h.max(),
                    percentiles_us: [50.0, 75.0, 90.0, 99.0, 99.9, 99.99, 100.0]
                        .iter()
                        .map(|p| (*p, h.value_at_quantile(p / 100.0)))
                        .collect(),
                })
                .collect::<Vec<_>>(),
        ),
        other => text(400, format!("unknown format {other:?}: use json or hgrm\n")),
    }
}
