//! HTTP/1.1 listeners: parse each request, route it, forward it to a pooled
//! upstream connection with retries, relay the response, keep the client
//! connection alive when both sides allow it.
//!
//! What must hold: requests on one connection are answered in order
//! (pipelined bytes wait in the buffer until the previous response is
//! done); a request is retried only before any response byte reached the
//! client and only when its body can be replayed (it has none); a response
//! that fails midway is cut off (connection closed), never completed with
//! made-up bytes; every generated response says why.

pub mod body;
pub mod downstream;
pub mod exchange;
pub mod inbound;
pub mod pipeline;
pub mod ratelimit;
pub mod respond;

use std::{
    net::SocketAddr,
    rc::Rc,
    time::{Duration, Instant},
};

use monoio::net::TcpStream;

use crate::metrics::golden::LabelsRef;
use crate::{
    config::{http::HttpListener, CopyMode, Listener, ListenerKind},
    http1::{HeadError, RequestBody, RequestHead, RequestParser},
    l4,
    metrics::{self, ErrorReason},
    tls::{identity::SpiffeId, stream::Stream},
    worker::{gate::Slot, Worker},
};
use body::Source;
use inbound::{write_all_timed, Inbound};

/// After answering a request whose body was not read in full (an early
/// upstream answer, a refusal), the client may still be sending it; a
/// close with unread bytes would reset the connection and can destroy the
/// answer before the client reads it (RFC 9112 §9.6). So the connection
/// stops writing, and reads and discards for at most this long and
/// [`LINGER_BYTES_MAX`] bytes before it closes (nginx's lingering close).
pub(crate) const LINGER_TIME: Duration = Duration::from_secs(2);
/// See [`LINGER_TIME`]: past this many discarded bytes, close anyway.
pub(crate) const LINGER_BYTES_MAX: usize = 1024 * 1024;
/// When the process drains, a keep-alive connection idle between requests
/// is closed after this long: an active client's next request, usually
/// already on its way, is answered (with `connection: close`) instead of
/// meeting a close (the keep-alive race that makes clients see a reset,
/// e.g. during an in-place upgrade); a really idle one goes soon.
const DRAIN_IDLE_GRACE: Duration = Duration::from_secs(1);

/// A plaintext keep-alive connection that has waited this long for its
/// next request parks: it gives back its read buffer and the state of a
/// request in progress (8.5 KiB), and waits for readiness alone, so an
/// idle connection holds about 3.3 KiB instead of 10.1 (idle-rss.sh with
/// paced connects, 2026-12-03). Long enough that a connection in use (more
/// than a few requests a second) never parks, since waking a parked one
/// costs an allocation and a readiness wait. TLS connections do not park:
/// their reads go through rustls, which cannot cancel one midway.
pub(crate) const PARK_AFTER: Duration = Duration::from_millis(100);

/// Bytes a client connection's read buffer starts with; it grows (up to
/// the head limit) only for a head that does not fit, and (up to
/// [`body::STREAM_BUFFER_BYTES_MAX`]) for a streamed body that keeps
/// filling it. Held for the connection's life, so it starts small: most
/// request heads fit in 1 KiB, and small allocations share pages, so an
/// idle keep-alive connection does not pin a whole page for it.
const CLIENT_BUFFER_BYTES: usize = 1024;

/// One client connection.
pub struct Client {
    pub stream: Stream,
    pub inbound: Inbound,
    pub ip: String,
    /// The caller's verified identity (mTLS listeners with a client
    /// certificate).
    pub identity: Option<SpiffeId>,
    /// Where this caller's authorization counters are.
    pub decisions: crate::tls::counters::DecisionSlots,
    /// What happened to the current request, for the access log.
    pub note: Note,
    /// Overrides the listener's `cluster` (see [`Accepted::cluster`]).
    pub cluster: Option<usize>,
    /// Bounds writes of responses to this client (reads have the
    /// inbound's); dropped while the connection is parked.
    pub writes: inbound::Timer,
}

/// What one request came to: the final status sent (0: none), the
/// upstream that answered, and the reason if the proxy answered itself;
/// with the timing a tap shows. Filled by both versions' code from values
/// the data path has anyway (no extra clock reads).
#[derive(Debug, Clone, Copy, Default)]
pub struct Note {
    pub status: u16,
    /// The cluster the request was sent to (or would have been).
    pub cluster: Option<usize>,
    pub upstream: Option<SocketAddr>,
    pub error: Option<&'static str>,
    /// Who caused `error` (None for an injected fault).
    pub blame: Option<metrics::Blame>,
    /// The gRPC status (HTTP/2 responses, from headers or trailers).
    pub grpc_status: Option<u32>,
    /// When the upstream's response head arrived.
    pub first_byte: Option<Instant>,
    /// How long opening the answering attempt's upstream connection took;
    /// None when it came from the pool.
    pub connect: Option<Duration>,
    /// Attempts made: 1 + retries (0: none was sent upstream).
    pub attempts: u32,
    /// The response body's length when its framing declared one.
    pub response_bytes: Option<u64>,
    /// This hop's trace context (with `[tracing]`).
    pub trace: Option<crate::trace::Hop>,
    /// When each retry began (the first [`RETRY_TIMES_MAX`]), for the
    /// span's retry events.
    pub retried_at: [Option<Instant>; RETRY_TIMES_MAX],
}

/// Retries whose start time a request's span shows; further retries are
/// counted in `attempts` only.
pub const RETRY_TIMES_MAX: usize = 4;

impl Note {
    /// Notes that attempt `attempt` (1-based) begins at `now`.
    pub fn attempt(&mut self, attempt: u32, now: Instant) {
        self.attempts = attempt;
        if let Some(slot) = (attempt as usize)
            .checked_sub(2)
            .and_then(|i| self.retried_at.get_mut(i))
        {
            *slot = Some(now);
        }
    }
}

/// What the connection does after a request.
pub enum Next {
    KeepAlive,
    Close,
    /// 101 / CONNECT 2xx: bytes both ways from now on.
    Tunnel(exchange::Upstream),
}

/// Serves one accepted HTTP connection to completion.
pub async fn serve(
    worker: Rc<Worker>,
    listener_index: usize,
    stream: TcpStream,
    peer: SocketAddr,
    conn_id: u64,
    _slot: Slot,
) {
    let _active = metrics::ActiveGuard::new(&worker.counters.connections_active);
    let listener = &worker.config.listeners[listener_index];
    let _ = stream.set_nodelay(true);
    let conn = match &listener.tls {
        None => Accepted {
            stream: Stream::Plain(stream),
            identity: None,
            h2: false,
            cluster: None,
        },
        Some(settings) => {
            // Boxed: the handshake's state (over 1 KiB with its timer)
            // would otherwise stay in this future, as room, for the whole
            // life of every connection, plaintext and idle ones included.
            let accepted = Box::pin(worker.tls.accept(
                &worker.counters.tls,
                settings,
                true,
                stream,
                &listener.name,
                conn_id,
            ))
            .await;
            let Some((stream, caller)) = accepted else {
                return;
            };
            Accepted {
                stream,
                identity: caller.identity,
                h2: caller.h2,
                cluster: None,
            }
        }
    };
    serve_accepted(Rc::clone(&worker), listener_index, conn, peer, conn_id).await;
}

/// A connection ready for HTTP: TLS (if any) terminated.
pub struct Accepted {
    pub stream: Stream,
    /// The caller's verified identity.
    pub identity: Option<SpiffeId>,
    /// ALPN chose `h2`.
    pub h2: bool,
    /// Where requests no route matches go, instead of the listener's
    /// `cluster` (an intercepted connection's original destination).
    pub cluster: Option<usize>,
}

/// Serves HTTP/1.x (or HTTP/2, by ALPN or the h2c preface) on a
/// connection whose TLS is already settled.
pub async fn serve_accepted(
    mut worker: Rc<Worker>,
    mut listener_index: usize,
    conn: Accepted,
    peer: SocketAddr,
    conn_id: u64,
) {
    if conn.h2 {
        let caller = crate::http2::server::Caller {
            ip: peer.ip().to_string(),
            identity: conn.identity,
            tls: true,
            decisions: Default::default(),
            cluster: conn.cluster,
        };
        // Boxed where it is made: a future held in a local (even one
        // moved from) keeps its room in this future's state.
        Box::pin(crate::http2::server::serve(
            Rc::clone(&worker),
            listener_index,
            conn.stream,
            Vec::new(),
            caller,
            conn_id,
        ))
        .await;
        return;
    }
    let mut client = Client {
        stream: conn.stream,
        inbound: Inbound::new(Vec::with_capacity(CLIENT_BUFFER_BYTES)),
        ip: peer.ip().to_string(),
        identity: conn.identity,
        decisions: Default::default(),
        note: Note::default(),
        cluster: conn.cluster,
        writes: None,
    };
    let mut first = true;
    loop {
        // Boxed (where it is made: see above): a request in progress
        // holds 8.5 KiB of state, most of it the exchange, which a parked
        // connection gives back; a busy connection allocates it once per
        // burst, not per request.
        let served = Box::pin(burst(
            &worker,
            listener_index,
            client,
            &mut first,
            conn_id,
            peer,
        ));
        let Some((parked, moved)) = served.await else {
            return;
        };
        client = parked;
        if let Some((next, index)) = moved {
            // A newer config generation keeps this listener as it was:
            // the connection goes on there, with what it has read.
            metrics::add(&worker.counters.connections_carried, 1);
            worker = next;
            listener_index = index;
            continue;
        }
        let idle = worker.config.listeners[listener_index].idle_timeout;
        metrics::add(&worker.counters.connections_parked, 1);
        // Nothing is buffered (a burst parks only between requests) and
        // no read is in flight: the read buffer goes back too, and the
        // next read allocates one.
        client.inbound = Inbound::new(Vec::new());
        client.writes = None;
        if !park(&worker, &client.stream, idle.saturating_sub(PARK_AFTER)).await {
            return;
        }
    }
}

/// Serves requests on `client` while they keep coming. None: the
/// connection is done (closed, handed to HTTP/2 or a tunnel). Some with
/// no move: it parked, having waited [`PARK_AFTER`] between requests with
/// nothing read (plaintext only), and the caller waits for its next bytes
/// without holding a buffer. Some with a move: a newer config generation
/// keeps this listener unchanged, and the connection goes on there
/// ([`Worker::carried`]).
#[allow(clippy::type_complexity)]
async fn burst(
    worker: &Rc<Worker>,
    listener_index: usize,
    mut client: Client,
    first: &mut bool,
    conn_id: u64,
    peer: SocketAddr,
) -> Option<(Client, Option<(Rc<Worker>, usize)>)> {
    let listener = &worker.config.listeners[listener_index];
    let ListenerKind::Http(http) = &listener.kind else {
        unreachable!("only http and intercept listeners come here");
    };
    let idle = listener.idle_timeout;
    // Parses into pooled buffers, given back when the burst ends (a new
    // connection allocates no head; a parked one keeps none).
    let mut parser = crate::worker::buffers::PooledParser::new(http.limits, &worker.heads);
    // Made at the first wait that may park (one per burst). A burst's
    // first read does not park: on a new connection the request is
    // usually there already, and after a park the socket just became
    // readable; so a connection per request pays for no canceller.
    let mut canceller = None;
    let mut may_park = false;
    loop {
        // Between requests: after a swap, go on in the new generation.
        if !*first && worker.retired.is_fired() {
            if let Some(next) = worker.carried(listener_index) {
                return Some((client, Some(next)));
            }
        }
        let head = read_head(
            &mut client,
            &mut parser,
            http,
            idle,
            worker,
            may_park.then_some(&mut canceller),
        )
        .await;
        may_park = true;
        let mut req = match head {
            Ok(Head::Request(req)) => req,
            Ok(Head::Closed) => return None,
            Ok(Head::Parked) => return Some((client, None)),
            Err(_)
                if *first
                    && client
                        .inbound
                        .data()
                        .starts_with(crate::http2::PREFACE_START) =>
            {
                // HTTP/2 with prior knowledge (h2c): h2 reads the preface
                // from what was read so far, and checks all of it.
                let Client {
                    stream,
                    inbound,
                    ip,
                    identity,
                    decisions,
                    cluster,
                    ..
                } = client;
                let caller = crate::http2::server::Caller {
                    ip,
                    identity,
                    tls: stream.is_tls(),
                    decisions,
                    cluster,
                };
                let already = inbound.data().to_vec();
                Box::pin(crate::http2::server::serve(
                    Rc::clone(worker),
                    listener_index,
                    stream,
                    already,
                    caller,
                    conn_id,
                ))
                .await;
                return None;
            }
            Err(e) => {
                metrics::add(&worker.counters.http.requests, 1);
                let reason = match e.request_status() {
                    408 => ErrorReason::RequestTimeout,
                    431 => ErrorReason::HeadTooLarge,
                    414 => ErrorReason::UriTooLong,
                    505 => ErrorReason::UnsupportedVersion,
                    501 => ErrorReason::NotImplemented,
                    _ => ErrorReason::BadRequest,
                };
                tracing::debug!(conn_id, %peer, error = %e, "bad request head");
                Box::pin(send_generated(
                    worker,
                    &mut client,
                    reason,
                    &e.to_string(),
                    true,
                    idle,
                ))
                .await;
                return None;
            }
        };
        *first = false;
        metrics::add(&worker.counters.http.requests, 1);
        let started = Instant::now();
        let mut route = None;
        client.note = Note::default();
        // Copied only when this listener logs: the head is consumed below.
        let logged = listener.access_log.as_ref().map(|log| {
            (
                log,
                req.method().to_vec(),
                req.target().to_vec(),
                req.version,
            )
        });
        client.note.trace = worker.config.tracing.as_ref().map(|t| {
            crate::trace::Sampler::new(t.sample_rate, t.inject)
                .hop(&worker.rng, |name| req.head.get(name))
        });
        // Copied only while a tap may want it or the trace is sampled.
        let tapped = worker.taps.active()
            && worker.taps.may_want(
                &listener.name,
                req.method(),
                req.target(),
                req.head.get("host"),
            );
        let sampled = client.note.trace.is_some_and(|t| t.sampled);
        let copied = (tapped || sampled).then(|| HeadCopy::of(&req));
        // Not boxed, though the exchange is this task's largest state:
        // boxed, an idle keep-alive connection costs 5.75 KiB of RSS
        // instead of 10.1 (idle-rss.sh 5000), but every request pays for
        // copying the future into its box: +1,404 instructions per request
        // (16,885 -> 18,289, callgrind-per-request.sh 8) and +3% CPU
        // (ab-cpu.sh keep-alive: 21.0 -> 21.7 us median of 3, every round
        // higher), 2026-12-02. Most of that is the allocation itself: the
        // exchange holds monoio timeouts, whose timer entries are aligned
        // to 128 bytes, so glibc serves the box through posix_memalign
        // (about 1,000 instructions; see `--features mimalloc` in
        // main.rs). The rare paths below are boxed instead.
        // Whether a Close after this request may leave body bytes unread.
        let body_unread = !matches!(req.body, RequestBody::Empty | RequestBody::Length(0));
        let next = handle(
            worker,
            listener_index,
            http,
            &mut client,
            &mut req,
            idle,
            conn_id,
            &mut route,
        )
        .await;
        parser.spare.recycle(std::mem::take(&mut req.head));
        let ended = Instant::now();
        let took = ended - started;
        worker.histograms.listener(listener_index, took);
        if let Some(route) = route {
            worker.histograms.route(listener_index, route, took);
        }
        // One set of labels for the golden metrics, the taps and the span.
        let labels = LabelsRef::of(
            &worker.config,
            listener_index,
            route.map(|r| http.routes[r].name.as_str()),
            client.note.cluster,
            !matches!(client.stream, Stream::Plain(_)),
            client.identity.as_ref().map(|i| i.as_str()),
        );
        if let Some(copy) = copied {
            copy.finish(worker, &client, labels, (started, ended), tapped);
        }
        if let Some((log, method, target, version)) = logged {
            let line = crate::access_log::Line {
                time: crate::access_log::now(),
                worker: worker.id,
                listener: &listener.name,
                route: route.map(|r| http.routes[r].name.as_str()),
                client: &client.ip,
                peer_identity: client.identity.as_ref().map(|i| i.as_str()),
                tls: !matches!(client.stream, Stream::Plain(_)),
                method: &String::from_utf8_lossy(&method),
                target: &String::from_utf8_lossy(&target),
                version: match version {
                    crate::http1::Version::Http10 => "HTTP/1.0",
                    crate::http1::Version::Http11 => "HTTP/1.1",
                },
                status: client.note.status,
                duration_us: took.as_micros() as u64,
                upstream: client.note.upstream,
                error: client.note.error,
                blame: client.note.blame.map(metrics::Blame::name),
                grpc_status: None,
                trace_id: client.note.trace.map(|t| crate::trace::hex(&t.trace_id)),
                span_id: client.note.trace.map(|t| crate::trace::hex(&t.span_id)),
            };
            worker.access_log.record(&worker.counters, log, &line);
        }
        worker
            .counters
            .golden
            .http(labels, client.note.status, None, took);
        match next {
            Next::KeepAlive => continue,
            Next::Close if body_unread => {
                let buf = worker.buffers.take();
                let buf =
                    inbound::linger(&mut client.stream, buf, LINGER_TIME, LINGER_BYTES_MAX).await;
                worker.buffers.give(buf);
                return None;
            }
            Next::Close => return None,
            Next::Tunnel(up) => {
                Box::pin(tunnel(worker, client, up, idle)).await;
                return None;
            }
        }
    }
}

/// What a tap or a span needs from a request head that the exchange
/// consumes.
struct HeadCopy {
    method: Vec<u8>,
    target: Vec<u8>,
    authority: Option<Vec<u8>>,
    version: crate::http1::Version,
    request_bytes: Option<u64>,
}

impl HeadCopy {
    fn of(req: &RequestHead) -> Self {
        HeadCopy {
            method: req.method().to_vec(),
            target: req.target().to_vec(),
            authority: req.head.get("host").map(<[u8]>::to_vec),
            version: req.version,
            request_bytes: match req.body {
                RequestBody::Empty => Some(0),
                RequestBody::Length(n) => Some(n),
                RequestBody::Chunked => None,
            },
        }
    }

    /// Offers the completed request to the taps (`tapped`) and records
    /// its span (a sampled trace).
    #[inline(never)]
    fn finish(
        self,
        worker: &Worker,
        client: &Client,
        labels: LabelsRef<'_>,
        (started, ended): (Instant, Instant),
        tapped: bool,
    ) {
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let authority = self.authority.as_deref().map(text);
        finished(
            worker,
            tapped,
            &crate::metrics::tap::Request {
                labels,
                client: &client.ip,
                method: &text(&self.method),
                authority: authority.as_deref(),
                target: &text(&self.target),
                version: match self.version {
                    crate::http1::Version::Http10 => "HTTP/1.0",
                    crate::http1::Version::Http11 => "HTTP/1.1",
                },
                request_bytes: self.request_bytes,
                started,
                ended,
                note: &client.note,
            },
        );
    }
}

/// A completed request, whatever its version: offered to the taps when
/// one may want it, and its span recorded when its trace is sampled.
pub(crate) fn finished(worker: &Worker, tapped: bool, r: &crate::metrics::tap::Request<'_>) {
    if tapped {
        worker.taps.offer(worker.id, r);
    }
    if let (Some(hop), Some(tracing)) = (r.note.trace, worker.config.tracing.as_ref()) {
        if hop.sampled {
            let span = crate::trace::span(&hop, r, std::time::SystemTime::now());
            worker.spans.record(&worker.counters, tracing, span);
        }
    }
}

/// What waiting for a request head came to, short of an error.
// Returned by value once per request, as the Option it replaces was;
// boxing the head would allocate per request.
#[allow(clippy::large_enum_variant)]
enum Head {
    Request(RequestHead),
    /// The client closed or idled out between requests (not an error).
    Closed,
    /// [`PARK_AFTER`] passed between requests with nothing read: the
    /// burst ends and the connection waits without a buffer.
    Parked,
}

/// Reads the next request head. With a `canceller` (a place to make
/// one), a plaintext connection may park between requests.
async fn read_head(
    client: &mut Client,
    parser: &mut RequestParser,
    http: &HttpListener,
    idle: Duration,
    worker: &Worker,
    mut canceller: Option<&mut Option<monoio::io::Canceller>>,
) -> Result<Head, HeadError> {
    let mut deadline: Option<Instant> = None;
    loop {
        if !client.inbound.is_empty() {
            if let Some((head, used)) = parser.parse(client.inbound.data())? {
                client.inbound.consume(used);
                return Ok(Head::Request(head));
            }
            deadline.get_or_insert_with(|| Instant::now() + http.head_timeout);
        }
        let wait = match deadline {
            None => idle,
            Some(d) => d.saturating_duration_since(Instant::now()),
        };
        let max = http.limits.head_bytes + 1;
        // A timeout loses the read in flight (and its buffer), so whether a
        // request line was seen is decided before: then the answer is 408,
        // else the connection just closes.
        let line_seen = client.inbound.data().contains(&b'\n');
        let filled = if client.inbound.is_empty() {
            // Between requests: a drain closes the connection after a
            // short grace rather than waiting out the keep-alive (a request
            // already on its way in the grace is answered, with
            // `connection: close`: closing at once would race an active
            // client's next request), and a new connection that needs this
            // one's slot closes it now (this one idle longest).
            let idle_here = worker.slots.register_idle();
            let drained = async {
                worker.draining.wait().await;
                monoio::time::sleep(DRAIN_IDLE_GRACE).await;
            };
            let Client {
                stream, inbound, ..
            } = client;
            let read = async {
                match stream {
                    // A plaintext read can be cancelled without losing
                    // what it read, so a quiet connection parks.
                    Stream::Plain(tcp) if PARK_AFTER < wait && canceller.is_some() => {
                        let slot = canceller.take().expect("checked");
                        let canceller = (worker.driver == crate::worker::Driver::IoUring)
                            .then(|| slot.get_or_insert_with(Default::default));
                        inbound.fill_or_park(tcp, max, PARK_AFTER, canceller).await
                    }
                    stream => inbound.fill(stream, max, wait).await.map(Some),
                }
            };
            monoio::select! {
                r = read => match r {
                    Ok(Some(n)) => Ok(n),
                    Ok(None) => return Ok(Head::Parked),
                    Err(e) => Err(e),
                },
                _ = drained => return Ok(Head::Closed),
                _ = idle_here.evicted() => return Ok(Head::Closed),
            }
        } else {
            client.inbound.fill(&mut client.stream, max, wait).await
        };
        match filled {
            // First: a timeout also empties the buffer (see `line_seen`).
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                return if line_seen {
                    Err(HeadError::TimedOut)
                } else {
                    Ok(Head::Closed)
                };
            }
            Ok(0) | Err(_) if client.inbound.is_empty() => return Ok(Head::Closed),
            Ok(0) => return Err(HeadError::Syntax("connection closed inside a request head")),
            Ok(_) => {}
            Err(_) => return Err(HeadError::HeadTooLarge),
        }
    }
}

/// Waits, holding no buffer, until a parked connection's client sends
/// again (true), or closes it: the keep-alive time `left` ran out, the
/// process drains, or a new connection needs its slot (false).
async fn park(worker: &Worker, stream: &Stream, left: Duration) -> bool {
    let Stream::Plain(tcp) = stream else {
        // Not reached: only plaintext connections park (see `read_head`);
        // going straight back to the burst is the safe answer.
        return true;
    };
    let idle_here = worker.slots.register_idle();
    // One timer at a time (a monoio timer is 640 bytes of this future):
    // the keep-alive wait, then, if the process drains, the grace.
    monoio::select! {
        ready = monoio::time::timeout(left, tcp.readable(false)) => return matches!(ready, Ok(Ok(()))),
        _ = idle_here.evicted() => return false,
        _ = worker.draining.wait() => {}
    }
    monoio::select! {
        ready = monoio::time::timeout(DRAIN_IDLE_GRACE, tcp.readable(false)) => matches!(ready, Ok(Ok(()))),
        _ = idle_here.evicted() => false,
    }
}

/// Routes and forwards one request; says what the connection does next,
/// and notes the route taken (for its histogram) in `route_out`.
#[allow(clippy::too_many_arguments)]
async fn handle(
    worker: &Rc<Worker>,
    listener_index: usize,
    http: &HttpListener,
    client: &mut Client,
    req: &mut RequestHead,
    idle: Duration,
    conn_id: u64,
    route_out: &mut Option<usize>,
) -> Next {
    let listener = &worker.config.listeners[listener_index];
    // Before anything decides on the path: routing, authorization and the
    // upstream must all see one spelling of it.
    match req.normalize_path(http.paths) {
        Ok(changed) => {
            if changed {
                metrics::add(&worker.counters.http.paths_normalized, 1);
            }
        }
        Err(e) => {
            tracing::debug!(conn_id, error = %e, "path refused");
            return refuse(
                worker,
                client,
                req,
                ErrorReason::BadPath,
                &e.to_string(),
                idle,
            )
            .await;
        }
    }
    if let (RequestBody::Length(n), Some(max)) = (req.body, http.body_bytes_max) {
        if n > max {
            let detail = format!("request body of {n} bytes exceeds the limit of {max}");
            send_generated(
                worker,
                client,
                ErrorReason::BodyTooLarge,
                &detail,
                true,
                idle,
            )
            .await;
            return Next::Close;
        }
    }
    let view = exchange::View(req);
    let route_index = crate::route::select(&http.routes, &view);
    *route_out = route_index;
    let route = route_index.map(|i| &http.routes[i]);
    if let Some(why) = worker.refuse_for_memory() {
        return refuse(worker, client, req, ErrorReason::Overload, why, idle).await;
    }
    let caller = client.identity.as_ref();
    if let Some(denied) = authorize(worker, listener, route, caller, &client.decisions) {
        return refuse(worker, client, req, ErrorReason::Forbidden, &denied, idle).await;
    }
    let id = caller.map(|i| i.as_str());
    if let Err(limited) = worker
        .limits
        .check(listener_index, route_index, id, Instant::now())
    {
        let detail = limited.to_string();
        let reason = ErrorReason::RateLimited;
        worker.counters.generated(reason, &detail);
        let answer = Answer {
            retry_after: Some(limited.retry_after),
            ..Answer::of(reason, &detail)
        };
        return refuse_with(worker, client, req, answer, idle).await;
    }
    if let Some(fault) = route.and_then(|r| r.fault.as_ref()) {
        if let Some(status) = inject(worker, fault, |h| req.head.get(h).is_some()).await {
            metrics::add(&worker.counters.http.faults_aborted, 1);
            let answer = Answer {
                status,
                name: "fault_injected",
                detail: "injected by this route's fault settings",
                retry_after: None,
                blame: None,
            };
            return refuse_with(worker, client, req, answer, idle).await;
        }
    }
    let cluster = match (route, client.cluster.or(http.default_cluster)) {
        (Some(r), _) => crate::route::pick_weighted(&r.clusters, &worker.rng),
        (None, Some(c)) => c,
        (None, None) => {
            let why = "no route matches this request";
            return refuse(worker, client, req, ErrorReason::NoRoute, why, idle).await;
        }
    };
    client.note.cluster = Some(cluster);
    let result = exchange::forward(worker, http, route, cluster, client, req, idle).await;
    match result {
        Ok(next) => next,
        Err(exchange::Failure::Generated {
            reason,
            detail,
            close,
        }) => {
            let close = close || !req.hop.keep_alive;
            send_generated(worker, client, reason, &detail, close, idle).await;
            if close {
                Next::Close
            } else {
                Next::KeepAlive
            }
        }
        Err(exchange::Failure::Cut(why)) => {
            metrics::add(&worker.counters.http.responses_cut, 1);
            tracing::debug!(conn_id, %why, "response cut off");
            Next::Close
        }
    }
}

/// Answers `req` with a generated response before anything was forwarded.
/// The connection stays open only if the request had no body left unread
/// and the client keeps it alive.
async fn refuse(
    worker: &Worker,
    client: &mut Client,
    req: &RequestHead,
    reason: ErrorReason,
    detail: &str,
    idle: Duration,
) -> Next {
    worker.counters.generated(reason, detail);
    refuse_with(worker, client, req, Answer::of(reason, detail), idle).await
}

/// A generated answer: status, the `x-pilotfish-error` token, the text,
/// and when to retry (rate limits).
struct Answer<'a> {
    status: u16,
    name: &'static str,
    detail: &'a str,
    retry_after: Option<u64>,
    /// None for a fault the route injected on purpose.
    blame: Option<metrics::Blame>,
}

impl<'a> Answer<'a> {
    fn of(reason: ErrorReason, detail: &'a str) -> Self {
        Answer {
            status: reason.status(),
            name: reason.name(),
            detail,
            retry_after: None,
            blame: Some(reason.blame()),
        }
    }
}

/// [`refuse`] with any answer (fault injection answers with the status
/// its route asks for); the caller counts why.
async fn refuse_with(
    worker: &Worker,
    client: &mut Client,
    req: &RequestHead,
    answer: Answer<'_>,
    idle: Duration,
) -> Next {
    let body_pending = !matches!(req.body, RequestBody::Empty | RequestBody::Length(0));
    write_generated(worker, client, answer, body_pending, idle).await;
    if body_pending || !req.hop.keep_alive {
        Next::Close
    } else {
        Next::KeepAlive
    }
}

/// Applies a route's fault injection: maybe waits the delay; returns the
/// status to answer with when this request is aborted.
pub(crate) async fn inject(
    worker: &Worker,
    fault: &crate::config::http::Fault,
    has_header: impl Fn(&str) -> bool,
) -> Option<u16> {
    let eligible = fault.only_with_header.as_deref().is_none_or(has_header);
    if !eligible {
        return None;
    }
    let roll = |per_10k: u32| per_10k > 0 && worker.rng.below(10_000) < u64::from(per_10k);
    if roll(fault.delay_per_10k) {
        metrics::add(&worker.counters.http.faults_delayed, 1);
        monoio::time::sleep(fault.delay).await;
    }
    roll(fault.abort_per_10k).then_some(fault.abort_status)
}

/// Checks the caller against the listener's and the route's allow-lists;
/// Some(reason) when it is denied. Each decision under an allow-list is
/// counted with the caller's identity.
pub(crate) fn authorize(
    worker: &Worker,
    listener: &Listener,
    route: Option<&crate::config::http::Route>,
    id: Option<&SpiffeId>,
    decisions: &crate::tls::counters::DecisionSlots,
) -> Option<String> {
    let listener_list = listener.authorize.as_ref();
    let route_list = route.and_then(|r| r.authorize.as_ref().map(|a| (r, a)));
    if listener_list.is_none() && route_list.is_none() {
        return None;
    }
    let counters = &worker.counters.tls;
    let check = |list: &[crate::tls::identity::Pattern]| {
        id.is_some_and(|id| crate::tls::identity::allowed(list, id))
    };
    let caller = id.map_or("(no client certificate)", |i| i.as_str());
    let denied = if listener_list.is_some_and(|l| !check(l)) {
        Some(format!(
            "caller {caller} is not authorized on listener {:?}",
            listener.name
        ))
    } else if let Some((r, _)) = route_list.filter(|(_, l)| !check(l)) {
        Some(format!(
            "caller {caller} is not authorized for route {:?}",
            r.name
        ))
    } else {
        None
    };
    counters.decision_cached(
        &listener.name,
        id.map(|i| i.as_str()),
        denied.is_none(),
        decisions,
    );
    denied
}

async fn send_generated(
    worker: &Worker,
    client: &mut Client,
    reason: ErrorReason,
    detail: &str,
    close: bool,
    idle: Duration,
) {
    worker.counters.generated(reason, detail);
    write_generated(worker, client, Answer::of(reason, detail), close, idle).await;
}

/// Writes a generated answer (counted by status, noted for the log).
async fn write_generated(
    worker: &Worker,
    client: &mut Client,
    answer: Answer<'_>,
    close: bool,
    idle: Duration,
) {
    worker.counters.http.response(answer.status);
    client.note.status = answer.status;
    client.note.error = Some(answer.name);
    client.note.blame = answer.blame;
    let mut out = worker.heads.take();
    respond::generated_with(
        answer.status,
        answer.name,
        answer.detail,
        close,
        answer.retry_after,
        &mut out,
    );
    let (_, out) = write_all_timed(&mut client.stream, out, idle).await;
    worker.heads.give(out);
}

/// After a 101 or a CONNECT 2xx: flush what each side already sent, then
/// copy both ways until both close (or idle out).
async fn tunnel(worker: &Worker, mut client: Client, mut up: exchange::Upstream, idle: Duration) {
    let flushed = async {
        let n = client.inbound.data().len();
        client.inbound.write_to(&mut up.stream, n, idle).await?;
        let n = up.inbound.data().len();
        up.inbound.write_to(&mut client.stream, n, idle).await
    };
    if flushed.await.is_err() {
        return;
    }
    worker.buffers.give_inbound(up.inbound);
    let tally = l4::copy::Tally::default();
    let copied = l4::copy::both_ways(worker, CopyMode::Buffered, client.stream, up.stream, &tally);
    monoio::select! {
        _ = copied => {}
        _ = l4::idle(&tally.activity, idle) => {}
    }
}

/// The client connection as the source of a request body.
pub fn request_source<'a>(client: &'a mut Client) -> Source<'a, Stream> {
    Source {
        inbound: &mut client.inbound,
        stream: &mut client.stream,
        side: body::Side::Downstream,
        pace: body::Pace::default(),
    }
}
