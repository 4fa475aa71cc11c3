//! `GET /tap`: attaches a live tap on every worker and streams what it
//! sees, one JSON line per completed request ([`crate::metrics::tap`]
//! owns the worker side and the bounds); and `pilotfish admin tap`, which
//! prints that stream readably.
//!
//! What must hold: at most [`TAPS_MAX`] taps at once (a 503 beyond); a
//! tap ends when its client goes away (checked at least every
//! [`IDLE_CHECK`], also when nothing matches), after `count` events, or
//! when the proxy stops; at its end every worker is told to forget it.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use super::{Conn, Query, Reply, Shared};
use crate::{
    metrics::tap::{self, Event, Filter, Spec, StatusMatch, RATE_DEFAULT, RATE_MAX, TAPS_MAX},
    worker::Command,
};

/// With no event to write, this often the tap checks that its client is
/// still there.
const IDLE_CHECK: Duration = Duration::from_secs(1);
/// How long the workers get to attach a tap.
const ATTACH_WAIT: Duration = Duration::from_secs(2);
/// How long telling a worker to forget a tap may wait on a full mailbox.
const UNTAP_WAIT: Duration = Duration::from_secs(1);

/// The query parameters `/tap` understands.
pub const PARAMS: &[&str] = &[
    "listener",
    "route",
    "authority",
    "path_prefix",
    "method",
    "status",
    "peer",
    "rate",
    "count",
];

/// A parsed `/tap` query: the filter, the rate, and an optional count.
fn parse(query: &Query) -> Result<(Filter, u32, Option<u64>), String> {
    let own = |name: &str| {
        query
            .get(name)
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    };
    let status = match query.get("status") {
        None | Some("") => None,
        Some(s) => Some(
            StatusMatch::parse(s)
                .ok_or_else(|| format!("status={s:?}: give a class (5xx) or a code (503)"))?,
        ),
    };
    let number = |name: &str| -> Result<Option<u64>, String> {
        query
            .get(name)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| format!("{name}={v:?} is not a number"))
            })
            .transpose()
    };
    let rate = match number("rate")? {
        None => RATE_DEFAULT,
        Some(r) if (1..=u64::from(RATE_MAX)).contains(&r) => r as u32,
        Some(r) => return Err(format!("rate={r}: give 1..={RATE_MAX} events per second")),
    };
    let filter = Filter {
        listener: own("listener"),
        route: own("route"),
        authority: own("authority").map(|a| tap::normalize_authority(&a)),
        path_prefix: own("path_prefix"),
        method: own("method").map(|m| m.to_ascii_uppercase()),
        status,
        peer: own("peer"),
    };
    Ok((filter, rate, number("count")?))
}

/// Serves `GET /tap` on `conn` until the tap ends. Err: a reply to send
/// instead of the stream.
pub(super) fn stream(conn: &mut Conn, query: &Query, shared: &Shared) -> Result<(), Reply> {
    let (filter, rate, count) = parse(query).map_err(|e| super::text(400, e + "\n"))?;
    let live = &shared.taps;
    if live.fetch_add(1, Ordering::SeqCst) >= TAPS_MAX {
        live.fetch_sub(1, Ordering::SeqCst);
        return Err(super::text(
            503,
            format!("{TAPS_MAX} taps are attached already; detach one first\n"),
        ));
    }
    let _detached = Guard(live);
    let mailboxes = shared.state.mailboxes();
    let spec = Arc::new(Spec {
        id: shared.next_tap.fetch_add(1, Ordering::Relaxed),
        filter,
        rate,
        workers: mailboxes.len(),
    });
    let (tx, rx) = crossbeam_channel::bounded(tap::QUEUE_EVENTS);
    let (acks, acked) = crossbeam_channel::bounded(mailboxes.len());
    let asked = mailboxes
        .iter()
        .filter(|m| {
            m.try_send(Command::Tap {
                spec: Arc::clone(&spec),
                events: tx.clone(),
                reply: acks.clone(),
            })
            .is_ok()
        })
        .count();
    // Only the workers hold senders now: when they all exit, the stream ends.
    drop(tx);
    // The head goes out once the workers attached the tap, so a client
    // that has it knows every request from now on is seen.
    let deadline = std::time::Instant::now() + ATTACH_WAIT;
    let attached = (0..asked)
        .take_while(|_| acked.recv_deadline(deadline).is_ok())
        .count();
    let result = if attached == 0 {
        Err(super::text(503, "no worker took the tap\n"))
    } else {
        // Which workers see this tap: all of them unless one was too busy
        // to answer its mailbox in time.
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ncache-control: no-store\r\nx-pilotfish-tap-workers: {attached}/{}\r\nconnection: close\r\n\r\n",
            mailboxes.len()
        );
        let _ = conn.write_all(head.as_bytes());
        relay(conn, &rx, count);
        Ok(())
    };
    for m in mailboxes {
        let _ = m.send_timeout(Command::Untap(spec.id), UNTAP_WAIT);
    }
    result
}

/// Counts a tap as attached until dropped.
struct Guard<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Writes events as they come until the client goes, `count` were
/// written, or every worker is gone.
fn relay(conn: &mut Conn, rx: &crossbeam_channel::Receiver<Event>, count: Option<u64>) {
    let mut written = 0u64;
    let mut line = Vec::with_capacity(512);
    while count.is_none_or(|c| written < c) {
        match rx.recv_timeout(IDLE_CHECK) {
            Ok(event) => {
                line.clear();
                if serde_json::to_writer(&mut line, &event).is_err() {
                    continue;
                }
                line.push(b'\n');
                // A client that stops reading fails this write after the
                // admin write timeout; the workers drop and count meanwhile.
                if conn.write_all(&line).is_err() {
                    return;
                }
                written += 1;
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                if conn.peer_gone() {
                    return;
                }
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Options of `pilotfish admin tap`, as query parameters.
pub fn query_string(pairs: &[(&str, Option<String>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

/// `pilotfish admin tap`: streams `/tap` and prints each event on a line
/// (or the JSON as it comes with `json`). Returns when the stream ends.
pub fn run(socket: &Path, query: &str, json: bool, out: &mut impl Write) -> Result<(), String> {
    let mut s = UnixStream::connect(socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    write!(
        s,
        "GET /tap{query} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(s);
    let mut status_line = String::new();
    reader
        .read_line(&mut status_line)
        .map_err(|e| e.to_string())?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("malformed admin response")?;
    let mut line = String::new();
    // The head.
    loop {
        line.clear();
        if reader.read_line(&mut line).map_err(|e| e.to_string())? == 0 || line == "\r\n" {
            break;
        }
    }
    if status != 200 {
        let mut body = String::new();
        let _ = std::io::Read::read_to_string(&mut reader, &mut body);
        return Err(format!("{status}: {}", body.trim_end()));
    }
    loop {
        line.clear();
        if reader.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
            return Ok(());
        }
        let shown = if json {
            line.trim_end().to_string()
        } else {
            match serde_json::from_str::<Event>(&line) {
                Ok(e) => readable(&e),
                Err(_) => line.trim_end().to_string(),
            }
        };
        if writeln!(out, "{shown}").and_then(|()| out.flush()).is_err() {
            return Ok(());
        }
    }
}

fn ms(us: u64) -> String {
    format!("{:.2}ms", us as f64 / 1000.0)
}

/// One event on one line:
/// `12:00:01.234 w0 inbound  GET b.mesh/api → 200  1.21ms (connect 0.30ms, first byte 1.10ms) route=api cluster=b endpoint=… peer=spiffe://…`
pub fn readable(e: &Event) -> String {
    let time = e.time.get(11..23).unwrap_or(&e.time);
    let mut out = format!(
        "{time} w{} {:<8} {} {}{} → {}",
        e.worker,
        e.direction,
        e.method,
        e.authority.as_deref().unwrap_or(""),
        e.path,
        e.status
    );
    if let Some(g) = e.grpc_status {
        out += &format!(" grpc={g}");
    }
    out += &format!("  {}", ms(e.total_us));
    let mut parts = Vec::new();
    if let Some(c) = e.connect_us {
        parts.push(format!("connect {}", ms(c)));
    }
    if let Some(f) = e.first_byte_us {
        parts.push(format!("first byte {}", ms(f)));
    }
    if !parts.is_empty() {
        out += &format!(" ({})", parts.join(", "));
    }
    for (k, v) in [
        ("route", e.route.as_deref()),
        ("cluster", e.cluster.as_deref()),
        ("peer", e.peer.as_deref()),
        ("error", e.error.as_deref()),
    ] {
        if let Some(v) = v {
            out += &format!(" {k}={v}");
        }
    }
    if let Some(ep) = e.endpoint {
        out += &format!(" endpoint={ep}");
    }
    if e.attempts > 1 {
        out += &format!(" attempts={}", e.attempts);
    }
    if e.dropped > 0 {
        out += &format!("  [{} dropped before this]", e.dropped);
    }
    out
}
