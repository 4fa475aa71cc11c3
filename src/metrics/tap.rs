//! Live tap: copies of completed requests, filtered, streamed to an
//! operator through the admin socket (`GET /tap`, `pilotfish admin tap`).
//!
//! The admin side ([`crate::admin`]) makes a [`Spec`] and a bounded
//! channel, and gives both to every worker ([`crate::worker::Command::Tap`]).
//! Each worker keeps its attached taps in its own [`Taps`] and, as each
//! HTTP request completes, offers the request to them.
//!
//! What must hold:
//! - With no tap attached, the data path pays one load and one branch
//!   per request ([`Taps::active`]); the copies a tap needs (method,
//!   target, authority) are made only while one is attached.
//! - A tap never slows a request: events go through `try_send` to a
//!   bounded queue ([`QUEUE_EVENTS`]); a full queue, or a request over
//!   the tap's rate ([`Spec::rate`], split across workers), drops the
//!   event and counts it, and the next event from that worker carries
//!   the count, so the stream says what it left out.
//! - At most [`TAPS_MAX`] taps at once (the admin server enforces it); a
//!   worker forgets a tap when the admin side says so ([`Taps::detach`])
//!   or when the receiving end is gone.
//! - Filters compare names from the config and normalized request
//!   fields: the authority lowercased, without a trailing dot, matched
//!   with or without its port.

use std::{
    cell::{Cell, RefCell},
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use crossbeam_channel::{Sender, TrySendError};
use serde::{Deserialize, Serialize};

/// Taps attached at once. Each holds an admin connection (of the admin
/// server's 8) and costs every worker a filter check per request.
pub const TAPS_MAX: usize = 4;
/// Events per second a tap gets when it asks for no rate.
pub const RATE_DEFAULT: u32 = 100;
/// The most events per second a tap may ask for: a terminal or a script
/// reading JSON lines; more than this is what the access log is for.
pub const RATE_MAX: u32 = 10_000;
/// Events queued between the workers and the admin thread writing them
/// (each a few hundred bytes): one second of the largest rate.
pub const QUEUE_EVENTS: usize = RATE_MAX as usize;

/// What a tap wants to see. Empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub listener: Option<String>,
    pub route: Option<String>,
    /// Lowercased, without a trailing dot; with a port it must match the
    /// request's port too.
    pub authority: Option<String>,
    pub path_prefix: Option<String>,
    /// Uppercase.
    pub method: Option<String>,
    pub status: Option<StatusMatch>,
    /// The peer's SPIFFE ID: the caller's on inbound listeners, the
    /// upstream's (as its cluster verifies it) on outbound ones.
    pub peer: Option<String>,
}

/// A status filter: `5xx` or `503`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusMatch {
    Class(u16),
    Code(u16),
}

impl StatusMatch {
    /// `2xx`..`5xx` or a code 100..=599.
    pub fn parse(s: &str) -> Option<StatusMatch> {
        let b = s.as_bytes();
        if b.len() == 3 && b[1..].eq_ignore_ascii_case(b"xx") && (b'1'..=b'5').contains(&b[0]) {
            return Some(StatusMatch::Class(u16::from(b[0] - b'0')));
        }
        let code: u16 = s.parse().ok()?;
        (100..=599)
            .contains(&code)
            .then_some(StatusMatch::Code(code))
    }

    fn matches(self, status: u16) -> bool {
        match self {
            StatusMatch::Class(c) => status / 100 == c,
            StatusMatch::Code(c) => status == c,
        }
    }
}

/// Lowercased, trailing dot removed (`B.Mesh.:80` → `b.mesh:80`).
pub fn normalize_authority(a: &str) -> String {
    let (host, port) = split_port(a);
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    match port {
        Some(p) => format!("{host}:{p}"),
        None => host,
    }
}

fn split_port(a: &str) -> (&str, Option<&str>) {
    match a.rsplit_once(':') {
        // Not inside an IPv6 literal's brackets.
        Some((h, p)) if !p.contains(']') && p.bytes().all(|b| b.is_ascii_digit()) => (h, Some(p)),
        _ => (a, None),
    }
}

impl Filter {
    pub fn matches(&self, r: &Request<'_>) -> bool {
        fn eq(want: &Option<String>, have: Option<&str>) -> bool {
            want.as_deref().is_none_or(|w| have == Some(w))
        }
        eq(&self.listener, Some(r.labels.listener))
            && eq(&self.route, r.labels.route)
            && eq(&self.peer, r.labels.peer)
            && self
                .method
                .as_deref()
                .is_none_or(|m| m.eq_ignore_ascii_case(r.method))
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|p| r.target.starts_with(p))
            && self.status.is_none_or(|s| s.matches(r.note.status))
            && self
                .authority
                .as_deref()
                .is_none_or(|want| r.authority.is_some_and(|a| authority_matches(want, a)))
    }
}

impl Filter {
    /// Whether a request with this head may match: the filters known
    /// before the request is forwarded. A request no tap may want is
    /// never copied.
    fn may_match(
        &self,
        listener: &str,
        method: &[u8],
        target: &[u8],
        authority: Option<&[u8]>,
    ) -> bool {
        self.listener.as_deref().is_none_or(|l| l == listener)
            && self
                .method
                .as_deref()
                .is_none_or(|m| m.as_bytes().eq_ignore_ascii_case(method))
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|p| target.starts_with(p.as_bytes()))
            && self.authority.as_deref().is_none_or(|want| {
                authority
                    .and_then(|a| std::str::from_utf8(a).ok())
                    .is_some_and(|a| authority_matches(want, a))
            })
    }
}

/// `want` is normalized; `have` is as the request gave it.
fn authority_matches(want: &str, have: &str) -> bool {
    let (host, port) = split_port(have);
    let host = host.strip_suffix('.').unwrap_or(host);
    let (want_host, want_port) = split_port(want);
    want_host.eq_ignore_ascii_case(host) && want_port.is_none_or(|p| port == Some(p))
}

/// One tap, as every worker gets it.
#[derive(Debug)]
pub struct Spec {
    pub id: u64,
    pub filter: Filter,
    /// Events per second for the whole process; each worker lets through
    /// its share (rounded up).
    pub rate: u32,
    pub workers: usize,
}

/// A completed request, as the worker saw it; borrowed, so that nothing
/// is built for a request no tap wants.
pub struct Request<'a> {
    /// Direction, listener, route, cluster, TLS and peer, as the golden
    /// metrics label the request (the peer is the caller inbound, the
    /// upstream's verified identity outbound).
    pub labels: super::golden::LabelsRef<'a>,
    pub client: &'a str,
    pub method: &'a str,
    pub authority: Option<&'a str>,
    pub target: &'a str,
    pub version: &'static str,
    pub request_bytes: Option<u64>,
    /// When the request head was complete.
    pub started: Instant,
    pub ended: Instant,
    pub note: &'a crate::http::Note,
}

/// One line of a tap's stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    pub time: String,
    pub worker: usize,
    pub direction: String,
    pub listener: String,
    pub route: Option<String>,
    pub cluster: Option<String>,
    pub tls: bool,
    pub peer: Option<String>,
    pub client: String,
    pub method: String,
    pub authority: Option<String>,
    pub path: String,
    pub version: String,
    /// 0: no response was sent (the client went away, or it was cut).
    pub status: u16,
    pub grpc_status: Option<u32>,
    /// The upstream endpoint that answered.
    pub endpoint: Option<SocketAddr>,
    /// Attempts sent upstream: 1 + retries.
    pub attempts: u32,
    /// Why the proxy answered itself (`x-pilotfish-error`), if it did.
    pub error: Option<String>,
    /// Body sizes where the framing declared them (Content-Length).
    pub request_bytes: Option<u64>,
    pub response_bytes: Option<u64>,
    /// Times from the moment the request head was complete: opening a new
    /// upstream connection (absent when pooled), the upstream's response
    /// head, and the end of the response.
    pub connect_us: Option<u64>,
    pub first_byte_us: Option<u64>,
    pub total_us: u64,
    /// Events this worker dropped for this tap since its last one (rate
    /// or a full queue).
    pub dropped: u64,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Event {
    fn of(r: &Request<'_>, worker: usize, dropped: u64) -> Event {
        let own = |s: Option<&str>| s.map(str::to_string);
        Event {
            time: crate::access_log::now(),
            worker,
            direction: r.labels.direction.name().to_string(),
            listener: r.labels.listener.to_string(),
            route: own(r.labels.route),
            cluster: own(r.labels.cluster),
            tls: r.labels.tls,
            peer: own(r.labels.peer),
            client: r.client.to_string(),
            method: r.method.to_string(),
            authority: own(r.authority),
            path: r.target.to_string(),
            version: r.version.to_string(),
            status: r.note.status,
            grpc_status: r.note.grpc_status,
            endpoint: r.note.upstream,
            attempts: r.note.attempts,
            error: own(r.note.error),
            request_bytes: r.request_bytes,
            response_bytes: r.note.response_bytes,
            connect_us: r.note.connect.map(micros),
            first_byte_us: r
                .note
                .first_byte
                .map(|t| micros(t.saturating_duration_since(r.started))),
            total_us: micros(r.ended.saturating_duration_since(r.started)),
            dropped,
        }
    }
}

/// A tap as one worker holds it.
struct Attached {
    spec: Arc<Spec>,
    tx: Sender<Event>,
    /// This worker's share of the rate, and the tokens left this second.
    share: u32,
    tokens: u32,
    refilled: Instant,
    dropped: u64,
}

/// One worker's attached taps. Only that worker's thread touches them.
#[derive(Default)]
pub struct Taps {
    list: RefCell<Vec<Attached>>,
    any: Cell<bool>,
}

impl std::fmt::Debug for Taps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Taps")
            .field("attached", &self.list.borrow().len())
            .finish()
    }
}

impl Taps {
    /// Whether any tap is attached: the one check the data path makes.
    #[inline]
    pub fn active(&self) -> bool {
        self.any.get()
    }

    /// Whether any attached tap may want a request with this head (see
    /// [`Filter::may_match`]); call only when [`Self::active`].
    pub fn may_want(
        &self,
        listener: &str,
        method: &[u8],
        target: &[u8],
        authority: Option<&[u8]>,
    ) -> bool {
        self.list
            .borrow()
            .iter()
            .any(|t| t.spec.filter.may_match(listener, method, target, authority))
    }

    pub fn attach(&self, spec: Arc<Spec>, tx: Sender<Event>) {
        let share = spec.rate.div_ceil(spec.workers.max(1) as u32).max(1);
        let mut list = self.list.borrow_mut();
        list.push(Attached {
            spec,
            tx,
            share,
            tokens: share,
            refilled: Instant::now(),
            dropped: 0,
        });
        self.any.set(true);
    }

    pub fn detach(&self, id: u64) {
        let mut list = self.list.borrow_mut();
        list.retain(|t| t.spec.id != id);
        self.any.set(!list.is_empty());
    }

    /// Offers a completed request to every attached tap.
    pub fn offer(&self, worker: usize, r: &Request<'_>) {
        let mut list = self.list.borrow_mut();
        list.retain_mut(|t| {
            if !t.spec.filter.matches(r) {
                return true;
            }
            if r.ended.saturating_duration_since(t.refilled) >= Duration::from_secs(1) {
                t.tokens = t.share;
                t.refilled = r.ended;
            }
            if t.tokens == 0 {
                t.dropped += 1;
                return true;
            }
            match t.tx.try_send(Event::of(r, worker, t.dropped)) {
                Ok(()) => {
                    t.tokens -= 1;
                    t.dropped = 0;
                    true
                }
                Err(TrySendError::Full(_)) => {
                    t.dropped += 1;
                    true
                }
                Err(TrySendError::Disconnected(_)) => false,
            }
        });
        self.any.set(!list.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::Note;

    fn request<'a>(note: &'a Note, authority: Option<&'a str>, target: &'a str) -> Request<'a> {
        let now = Instant::now();
        Request {
            labels: crate::metrics::golden::LabelsRef {
                direction: crate::config::intercept::Direction::Inbound,
                listener: "in",
                route: Some("api"),
                cluster: Some("b"),
                tls: true,
                peer: Some("spiffe://mesh/a"),
            },
            client: "127.0.0.1:1",
            method: "GET",
            authority,
            target,
            version: "HTTP/1.1",
            request_bytes: Some(0),
            started: now,
            ended: now,
            note,
        }
    }

    #[test]
    fn filters_match_normalized_fields() {
        let note = Note {
            status: 503,
            ..Note::default()
        };
        let r = request(&note, Some("B.Mesh.:8080"), "/api/x");
        let f = |filter: Filter| filter.matches(&r);
        assert!(f(Filter::default()));
        assert!(f(Filter {
            authority: Some(normalize_authority("b.mesh")),
            ..Filter::default()
        }));
        assert!(f(Filter {
            authority: Some(normalize_authority("b.mesh.:8080")),
            ..Filter::default()
        }));
        assert!(!f(Filter {
            authority: Some(normalize_authority("b.mesh:80")),
            ..Filter::default()
        }));
        assert!(f(Filter {
            status: StatusMatch::parse("5xx"),
            method: Some("get".into()),
            path_prefix: Some("/api".into()),
            peer: Some("spiffe://mesh/a".into()),
            route: Some("api".into()),
            listener: Some("in".into()),
            ..Filter::default()
        }));
        assert!(!f(Filter {
            status: StatusMatch::parse("2xx"),
            ..Filter::default()
        }));
        assert!(!f(Filter {
            status: StatusMatch::parse("502"),
            ..Filter::default()
        }));
        assert!(!f(Filter {
            peer: Some("spiffe://mesh/c".into()),
            ..Filter::default()
        }));
        assert!(!f(Filter {
            path_prefix: Some("/web".into()),
            ..Filter::default()
        }));
        // The head-only check agrees, and refuses early what cannot match.
        let head = Filter {
            method: Some("GET".into()),
            path_prefix: Some("/api".into()),
            authority: Some(normalize_authority("b.mesh")),
            listener: Some("in".into()),
            ..Filter::default()
        };
        assert!(head.may_match("in", b"get", b"/api/x", Some(b"B.mesh:8080")));
        assert!(!head.may_match("in", b"POST", b"/api/x", Some(b"b.mesh")));
        assert!(!head.may_match("in", b"GET", b"/web", Some(b"b.mesh")));
        assert!(!head.may_match("in", b"GET", b"/api", None));
        assert!(!head.may_match("out", b"GET", b"/api", Some(b"b.mesh")));
        assert_eq!(StatusMatch::parse("6xx"), None);
        assert_eq!(StatusMatch::parse("99"), None);
        assert_eq!(StatusMatch::parse("4XX"), Some(StatusMatch::Class(4)));
    }

    #[test]
    fn rate_and_queue_drops_are_carried_by_the_next_event() {
        let note = Note::default();
        let r = request(&note, None, "/");
        let attach = |rate: u32, queue: usize| {
            let (tx, rx) = crossbeam_channel::bounded(queue);
            let taps = Taps::default();
            assert!(!taps.active());
            let filter = Filter::default();
            let spec = Spec {
                id: 1,
                filter,
                rate,
                workers: 1,
            };
            taps.attach(Arc::new(spec), tx);
            assert!(taps.active());
            (taps, rx)
        };
        // Over the rate (2 per second): two go, two are dropped.
        let (taps, rx) = attach(2, 10);
        for _ in 0..4 {
            taps.offer(0, &r);
        }
        assert_eq!(rx.try_iter().map(|e| e.dropped).collect::<Vec<_>>(), [0, 0]);
        // A second later: the next event carries both drops.
        let later = Request {
            ended: Instant::now() + Duration::from_secs(1),
            ..request(&note, None, "/")
        };
        taps.offer(0, &later);
        assert_eq!(rx.try_recv().unwrap().dropped, 2);
        // The receiver gone: the tap goes at the next offer.
        drop(rx);
        taps.offer(0, &later);
        assert!(!taps.active());

        // A full queue (the reader is slow): dropped and counted too.
        let (taps, rx) = attach(100, 1);
        for _ in 0..3 {
            taps.offer(0, &r);
        }
        assert_eq!(rx.try_recv().unwrap().dropped, 0);
        taps.offer(0, &r);
        assert_eq!(rx.try_recv().unwrap().dropped, 2);
        taps.detach(1);
        assert!(!taps.active());
    }
}
