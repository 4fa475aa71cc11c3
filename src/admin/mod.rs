//! The admin socket: HTTP/1.1 on a Unix socket (mode 0600), served by a
//! thread of its own, never by a data worker.
//!
//! Endpoints today: `GET /live`, `GET /ready`, `GET /stats` (JSON, merged
//! and per core), `GET /metrics` (Prometheus text), `GET /histograms`
//! (`hgrm` or JSON, filtered by listener, route, cluster, metric, core;
//! `reset=true` for interval histograms), `GET /config`, `GET /clusters`
//! (endpoints with health, ejection, load, per core), `POST /drain`,
//! `POST /log-level?filter=...`.
//!
//! What must hold: a scrape costs a worker only the copy of its own
//! counters and histograms (asked through its mailbox); admin connections
//! are bounded in number and time; the socket file is created 0600 and
//! removed when the server stops.

pub mod client;
pub mod prometheus;

use std::{
    io::{Read, Write},
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

use crossbeam_channel::Sender;
use serde::Serialize;

use crate::{
    config::{limits::ACCEPT_ERROR_BACKOFF, Config},
    http1::{HeadLimits, RequestParser},
    metrics::{
        histograms::{self, Key},
        Snapshot,
    },
    worker::{self, Command},
};

/// Admin connections served at once; more wait in the backlog. The admin
/// socket is for a local agent and an operator, not for traffic.
const CONNECTIONS_MAX: usize = 8;
/// An admin client gets this long to send its request and read the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Request head cap on the admin socket (POST bodies are not read yet).
const HEAD_BYTES_MAX: usize = 16 * 1024;

/// What the admin thread needs from the proxy.
pub struct State {
    pub config: Arc<Config>,
    pub mailboxes: Vec<Sender<Command>>,
    /// Set once draining starts: /ready answers 503 from then on.
    pub draining: Arc<AtomicBool>,
    /// Replaces the log filter (`POST /log-level?filter=...`); None where
    /// the embedding program does not allow it.
    pub set_log_filter: Option<SetLogFilter>,
}

/// Replaces the process's log filter; Err says why the filter is invalid.
pub type SetLogFilter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// The running admin server; stops and removes its socket on drop.
pub struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Binds `path` (replacing a stale socket) and serves it.
    pub fn start(path: &Path, state: State) -> std::io::Result<Server> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Under systemd, RuntimeDirectory= made it; by hand, we do.
            std::fs::create_dir_all(dir)?;
        }
        if path.exists() {
            // A socket left by a crashed run; a live one would still be
            // bound by its owner, and binding over it is what we want.
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(state);
        let s = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("pilotfish-admin".into())
            .spawn(move || accept_loop(listener, state, s))?;
        tracing::info!(socket = %path.display(), "admin socket listening");
        Ok(Server {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: UnixListener, state: Arc<State>, stop: Arc<AtomicBool>) {
    let live = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(conn) = conn else {
            // EMFILE and friends: back off instead of spinning. This is the
            // admin thread, not a worker, so blocking it is fine.
            #[allow(clippy::disallowed_methods)]
            std::thread::sleep(ACCEPT_ERROR_BACKOFF);
            continue;
        };
        if live.load(Ordering::SeqCst) >= CONNECTIONS_MAX {
            let _ = respond(&conn, 503, "text/plain", b"admin socket busy\n");
            continue;
        }
        live.fetch_add(1, Ordering::SeqCst);
        let (state, done) = (Arc::clone(&state), Arc::clone(&live));
        let spawned = std::thread::Builder::new()
            .name("pilotfish-admin-conn".into())
            .spawn(move || {
                serve(conn, &state);
                done.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            live.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

fn serve(mut conn: UnixStream, state: &State) {
    let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
    let _ = conn.set_write_timeout(Some(IO_TIMEOUT));
    let mut parser = RequestParser::new(HeadLimits {
        head_bytes: HEAD_BYTES_MAX,
        ..HeadLimits::default()
    });
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let req = loop {
        match parser.parse(&buf) {
            Ok(Some((req, _))) => break req,
            Ok(None) => {}
            Err(e) => {
                let _ = respond(&conn, 400, "text/plain", format!("{e}\n").as_bytes());
                return;
            }
        }
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let target = String::from_utf8_lossy(req.target()).into_owned();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let query = Query::parse(query);
    let (status, kind, body) = route(req.method(), path, &query, state);
    let _ = respond(&conn, status, kind, &body);
}

fn respond(mut conn: &UnixStream, status: u16, kind: &str, body: &[u8]) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
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

fn route(method: &[u8], path: &str, query: &Query, state: &State) -> Reply {
    match (method, path) {
        (b"GET", "/live") => text(200, "live\n"),
        (b"GET", "/ready") => ready(state),
        (b"GET", "/stats") => json(&stats(state)),
        (b"GET", "/metrics") => {
            let reports = worker::collect_reports(&state.mailboxes);
            let hist = worker::collect_histograms(&state.mailboxes, false);
            (
                200,
                "text/plain; version=0.0.4",
                prometheus::render(&reports, &hist).into_bytes(),
            )
        }
        (b"GET", "/histograms") => histograms(query, state),
        (b"GET", "/config") => json(&*state.config),
        (b"GET", "/clusters") => json(&worker::collect_clusters(&state.mailboxes)),
        (b"POST", "/log-level") => log_level(query, state),
        (b"POST", "/drain") => {
            state.draining.store(true, Ordering::SeqCst);
            for m in &state.mailboxes {
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
    let answered = worker::collect_reports(&state.mailboxes).len();
    if answered == state.mailboxes.len() {
        text(200, "ready\n")
    } else {
        text(
            503,
            format!("{answered} of {} workers answered\n", state.mailboxes.len()),
        )
    }
}

#[derive(Serialize)]
struct Stats {
    total: Snapshot,
    workers: Vec<worker::WorkerReport>,
}

fn stats(state: &State) -> Stats {
    let workers = worker::collect_reports(&state.mailboxes);
    let mut total = Snapshot::default();
    for w in &workers {
        total.merge(&w.counters);
    }
    Stats { total, workers }
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
    let reports = worker::collect_histograms(&state.mailboxes, reset);
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
