//! The admin server: HTTP/1.1 on a Unix socket (mode 0600) and optionally
//! on a TCP address, served by threads of its own, never by a data worker.
//!
//! Endpoints: `GET /live`, `GET /ready`, `GET /stats` (JSON, merged and per
//! core), `GET /metrics` (Prometheus text), `GET /histograms` (`hgrm` or
//! JSON, filtered by listener, route, cluster, metric, core; `reset=true`
//! for interval histograms), `GET /config`, `GET /clusters` (endpoints with
//! health, ejection, load, per core), `POST /config` (a whole TOML config,
//! swapped on every worker or none; see [`crate::control`]), `POST /drain`,
//! `POST /log-level?filter=...`.
//!
//! What must hold: a scrape costs a worker only the copy of its own
//! counters and histograms (asked through its mailbox); admin connections
//! are bounded in number, size and time; mutations (every POST) are
//! answered only on the Unix socket or to a loopback peer; the socket file
//! is created 0600 and removed when the server stops.

pub mod client;
pub mod prometheus;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::{
        fs::PermissionsExt,
        net::{UnixListener, UnixStream},
    },
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use serde::Serialize;

use crate::{
    config::{
        limits::{ACCEPT_ERROR_BACKOFF, CONFIG_FILE_BYTES_MAX},
        Config,
    },
    control::Controller,
    http1::{HeadLimits, RequestParser},
    metrics::{
        histograms::{self, Key},
        Snapshot,
    },
    worker::{self, Command},
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
    fn mailboxes(&self) -> &[crossbeam_channel::Sender<Command>] {
        self.control.mailboxes()
    }
}

/// Replaces the process's log filter; Err says why the filter is invalid.
pub type SetLogFilter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Where the admin server listens.
#[derive(Debug, Clone, Default)]
pub struct Listen {
    /// The Unix socket (created 0600; mutations allowed).
    pub socket: Option<PathBuf>,
    /// A TCP address, e.g. for a Prometheus scraper on the node; mutations
    /// only from loopback peers.
    pub tcp: Option<SocketAddr>,
}

/// The running admin server; stops and removes its socket on drop.
pub struct Server {
    socket: Option<PathBuf>,
    tcp: Option<SocketAddr>,
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
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(state);
        let live = Arc::new(AtomicUsize::new(0));
        let mut server = Server {
            socket: None,
            tcp: None,
            stop: Arc::clone(&stop),
            threads: Vec::new(),
            listening: Vec::new(),
        };
        if let Some(path) = &listen.socket {
            let listener = bind_unix(path)?;
            let fd = std::os::fd::OwnedFd::from(listener.try_clone()?);
            server.spawn_accept("pilotfish-admin", fd, &state, &live, move || {
                listener.accept().map(|(c, _)| (Conn::Unix(c), true))
            })?;
            server.socket = Some(path.clone());
            tracing::info!(socket = %path.display(), "admin socket listening");
        }
        if let Some(addr) = listen.tcp {
            let listener = TcpListener::bind(addr)?;
            let bound = listener.local_addr()?;
            let fd = std::os::fd::OwnedFd::from(listener.try_clone()?);
            server.spawn_accept("pilotfish-admin-tcp", fd, &state, &live, move || {
                listener
                    .accept()
                    .map(|(c, peer)| (Conn::Tcp(c), peer.ip().is_loopback()))
            })?;
            server.tcp = Some(bound);
            tracing::info!(address = %bound, "admin TCP listener (mutations from loopback only)");
        }
        Ok(server)
    }

    /// Serves one listening socket on a thread of its own; `listening` (a
    /// clone of it) is kept so that drop can shut it down.
    fn spawn_accept(
        &mut self,
        name: &str,
        listening: std::os::fd::OwnedFd,
        state: &Arc<State>,
        live: &Arc<AtomicUsize>,
        accept: impl Fn() -> std::io::Result<(Conn, bool)> + Send + 'static,
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

/// Accepts until stopped. `accept` gives a connection and whether its peer
/// may mutate (the Unix socket, or a loopback TCP peer).
fn accept_loop(
    accept: impl Fn() -> std::io::Result<(Conn, bool)>,
    state: &Arc<State>,
    stop: &AtomicBool,
    live: &Arc<AtomicUsize>,
) {
    loop {
        let accepted = accept();
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok((mut conn, local)) = accepted else {
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
                serve(conn, local, &state);
                done.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            live.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn serve(mut conn: Conn, local: bool, state: &State) {
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
    let (status, kind, answer) = if req.method() != b"GET" && !local {
        text(
            403,
            "mutations are answered only on the admin Unix socket or to a loopback peer\n",
        )
    } else {
        route(req.method(), path, &query, &body, state)
    };
    let _ = respond(&mut conn, status, kind, &answer);
}

fn respond(conn: &mut Conn, status: u16, kind: &str, body: &[u8]) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
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

fn route(method: &[u8], path: &str, query: &Query, body: &[u8], state: &State) -> Reply {
    match (method, path) {
        (b"GET", "/live") => text(200, "live\n"),
        (b"GET", "/ready") => ready(state),
        (b"GET", "/stats") => json(&stats(state)),
        (b"GET", "/metrics") => {
            let reports = worker::collect_reports(state.mailboxes());
            let hist = worker::collect_histograms(state.mailboxes(), false);
            (
                200,
                "text/plain; version=0.0.4",
                prometheus::render(&reports, &hist, state.control.tls_status().as_ref())
                    .into_bytes(),
            )
        }
        (b"GET", "/histograms") => histograms(query, state),
        (b"GET", "/config") => json(&*state.control.config()),
        (b"POST", "/config") => apply(query, body, state),
        (b"GET", "/clusters") => json(&worker::collect_clusters(state.mailboxes())),
        (b"POST", "/log-level") => log_level(query, state),
        (b"POST", "/drain") => {
            state.draining.store(true, Ordering::SeqCst);
            for m in state.mailboxes() {
                let _ = m.try_send(Command::Drain);
            }
            text(200, "draining\n")
        }
        (
            _,
            "/live" | "/ready" | "/stats" | "/metrics" | "/histograms" | "/config" | "/clusters"
            | "/drain" | "/log-level",
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
    let config = match Config::parse("POST /config", text_body) {
        Ok(c) => c,
        Err(e) => return text(400, format!("{e}\n")),
    };
    match state.control.apply(config) {
        Ok(changes) if query.get("format") == Some("json") => json(&changes),
        Ok(changes) => text(200, format!("{}\n", changes.summary())),
        Err(e) => {
            tracing::warn!(error = %e, "config swap refused");
            text(e.status(), format!("{e}\n"))
        }
    }
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
    /// The certificate new handshakes present (absent without `[tls]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<crate::control::TlsStatus>,
    workers: Vec<worker::WorkerReport>,
}

fn stats(state: &State) -> Stats {
    let workers = worker::collect_reports(state.mailboxes());
    let mut total = Snapshot::default();
    for w in &workers {
        total.merge(&w.counters);
    }
    Stats {
        total,
        tls: state.control.tls_status(),
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
/// filters to select exactly one.
fn histograms(query: &Query, state: &State) -> Reply {
    let reset = query.get("reset") == Some("true");
    let core: Option<usize> = match query.get("core").map(str::parse) {
        None => None,
        Some(Ok(c)) => Some(c),
        Some(Err(_)) => return text(400, "core must be a number\n"),
    };
    let reports = worker::collect_histograms(state.mailboxes(), reset);
    let wanted = |k: &Key| {
        let field = |name: &str, value: &Option<String>| {
            query
                .get(name)
                .is_none_or(|want| value.as_deref() == Some(want))
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
            many => text(
                400,
                format!(
                    "{} histograms match; narrow with listener=, route=, cluster=, metric=\n",
                    many.len()
                ),
            ),
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
