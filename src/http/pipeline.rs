//! The version-independent request path: every exchange with HTTP/2 on
//! either side goes through here (h2 client to HTTP/1.1 or h2 upstream,
//! HTTP/1.1 client to h2 upstream). It uses the same cluster decisions as
//! the HTTP/1.1 path (balancing, breakers, retry budget, outlier
//! detection, pools, timeouts) through [`ClusterState`]; only reading and
//! writing messages depends on the version, behind [`Downstream`] and
//! [`UpConn`].
//!
//! HTTP/1.1 to HTTP/1.1 takes its own path (`exchange`) by default, which
//! moves bytes without building header maps. Both paths share the cluster
//! decisions, the retry conditions ([`Condition`]) and the failure
//! mapping ([`head_failure`]), and this one handles everything the
//! HTTP/1.1 suites check (interim responses, `Expect: 100-continue`, an
//! early answer to an upload, the route timeout starting after the body):
//! CI runs those suites through here too (`PILOTFISH_HTTP1_VIA_PIPELINE`).
//! It is not the default because it costs more: measured at 1 worker,
//! small keep-alive requests, 28,598 against 16,963 user-space
//! instructions per request (`callgrind-per-request.sh`), 28.9 against
//! 21.3 µs of proxy CPU (`ab-cpu.sh`, 3 rounds), mostly header maps built
//! and dropped, URI parsing and the copies between them.
//!
//! What must hold: as in `exchange`, a retry happens only before anything
//! reached the client, only for a request without a body, within the
//! budget and breakers; a response that fails midway is cut (RST_STREAM on
//! h2, connection closed on HTTP/1.1), never completed with made-up bytes;
//! h2 flow-control capacity is released only after the bytes were
//! forwarded, so a slow reader on one side back-pressures the other
//! through the windows; a client's RST_STREAM cancels the upstream stream
//! (dropping it resets it), and an upstream reset reaches an h2 client as
//! a reset.

use std::{
    future::poll_fn,
    io,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use monoio::net::TcpStream;

use super::{
    body::{BodyError, Side},
    exchange::{head_failure, AttemptError, Condition, Failure, HeadRead},
    inbound::{write_all_timed, Inbound},
};
use crate::{
    config::http::{HttpListener, RetryPolicy, Route, UpstreamProtocol},
    http1::{
        chunked::{ChunkedDecoder, Trailers},
        head::RequestKind,
        write::{Edits, Forwarding, OutBody},
        HeadLimits, ResponseBody, ResponseHead, ResponseParser,
    },
    http2::{grpc, headers},
    metrics::{self, histograms, ActiveGuard, ErrorReason},
    tls::{per_worker::Alpn, stream::Stream},
    upstream::{ClusterState, ConnToken, Outcome},
    worker::Worker,
};

/// A request, whatever version it came in.
#[derive(Debug)]
pub struct Request {
    pub method: Method,
    /// Absolute: scheme, authority, normalized path and query.
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: BodyKind,
    /// `content-type: application/grpc…`: errors are answered as gRPC.
    pub grpc: bool,
    /// The caller's `grpc-timeout`.
    pub grpc_timeout: Option<Duration>,
}

/// How much body a message has, as far as its head tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Empty,
    Length(u64),
    /// Streamed until the sender ends it.
    Streamed,
}

/// The client side of one exchange, whatever its version. Its futures are
/// not `Send`, by design: a request lives and dies on one worker.
#[allow(async_fn_in_trait)]
pub trait Downstream {
    /// The request body as h2 delivers it, for a direct h2-to-h2 pump
    /// (end-to-end flow control, and request and response at once, which
    /// gRPC streaming needs). None for HTTP/1.1 clients.
    fn take_h2_body(&mut self) -> Option<h2::RecvStream>;
    /// The next piece of the request body; None at its end.
    async fn body_chunk(&mut self, idle: Duration) -> Result<Option<Bytes>, BodyError>;
    /// `n` bytes of request body were forwarded: the client may send more.
    fn release(&mut self, n: usize);
    /// The request's trailers, once [`Self::body_chunk`] said the body
    /// ended (an HTTP/1.1 chunked trailer section, an h2 trailer block).
    async fn request_trailers(&mut self, idle: Duration) -> Result<Option<HeaderMap>, BodyError>;
    /// Relays an interim (1xx) response head, where the client's version
    /// has them (a `100 Continue` only to a client that expects one).
    /// Ok(true): it was sent.
    async fn interim(&mut self, status: StatusCode, headers: HeaderMap) -> io::Result<bool>;
    /// Sends the response head; `body` says what follows.
    async fn respond(
        &mut self,
        status: StatusCode,
        headers: HeaderMap,
        body: BodyKind,
    ) -> io::Result<()>;
    async fn data(&mut self, data: Bytes) -> io::Result<()>;
    /// Ends the response body, with trailers when the client can take them.
    async fn finish(&mut self, trailers: Option<HeaderMap>) -> io::Result<()>;
    /// Resolves when the client cancels (h2 RST_STREAM); never for
    /// HTTP/1.1 (a closed connection shows up as a failed write).
    async fn cancelled(&mut self) -> h2::Reason;
    /// Cuts the response: RST_STREAM on h2 (the connection is closed by
    /// the caller on HTTP/1.1).
    fn reset(&mut self, reason: h2::Reason);
    /// What the request came to, for the access log, metrics and taps.
    fn note(&mut self) -> &mut super::Note;
}

/// What one request needs to know about where it came from.
pub struct Origin<'a> {
    pub client_ip: &'a str,
    pub tls: bool,
    pub identity: Option<&'a str>,
}

/// Forwards `req` to `cluster_index` with the route's policy. Ok(true):
/// the response went out complete and the client connection may be
/// kept (HTTP/1.1).
#[allow(clippy::too_many_arguments)]
pub async fn forward<D: Downstream>(
    worker: &Worker,
    http: &HttpListener,
    route: Option<&Route>,
    cluster_index: usize,
    origin: &Origin<'_>,
    mut req: Request,
    down: &mut D,
    idle: Duration,
) -> Result<(), Failure> {
    let cluster = &*worker.clusters[cluster_index];
    let default_policy = RetryPolicy::default();
    let no_edits = Edits::default();
    let policy = route.map_or(&default_policy, |r| &r.retry);
    let mut timeout = route.map_or(http.request_timeout, |r| r.timeout);
    if let Some(t) = req.grpc_timeout {
        timeout = timeout.min(t);
    }
    let edits = route.map_or(&no_edits, |r| &r.edits);
    let request_id = super::exchange::request_id(&worker.rng);
    let fwd = Forwarding {
        client_ip: origin.client_ip,
        proto: if origin.tls { "https" } else { "http" },
        request_id: &request_id,
        identity_header: &http.identity_header,
        identity: origin.identity,
        trace: down.note().trace,
    };
    headers::forwarding(&mut req.headers, &fwd, edits);
    let ctx = Ctx {
        worker,
        cluster,
        policy,
        deadline: std::cell::Cell::new(Instant::now() + timeout),
        timeout,
        grpc: req.grpc,
        trailers: Trailers::Request {
            identity_header: &http.identity_header,
        },
        idle,
        body_bytes_max: http.body_bytes_max,
        opened: std::cell::Cell::new(None),
    };
    ctx.attempts(&req, down).await
}

struct Ctx<'a> {
    worker: &'a Worker,
    cluster: &'a ClusterState,
    policy: &'a RetryPolicy,
    deadline: std::cell::Cell<Instant>,
    /// The route timeout (capped by `grpc-timeout`).
    timeout: Duration,
    /// A gRPC call's deadline covers the whole call, its stream included.
    grpc: bool,
    /// What the request's trailers may carry up (not the fields this
    /// proxy vouches for in the head).
    trailers: Trailers<'a>,
    idle: Duration,
    body_bytes_max: Option<u64>,
    /// How long the current attempt's new connection took to open (taken
    /// into the note when the attempt sends its request).
    opened: std::cell::Cell<Option<Duration>>,
}

/// Notes an upstream's response head.
fn note_answer(
    note: &mut super::Note,
    status: u16,
    upstream: std::net::SocketAddr,
    at: Instant,
    body: BodyKind,
) {
    note.status = status;
    note.upstream = Some(upstream);
    note.first_byte = Some(at);
    note.response_bytes = match body {
        BodyKind::Empty => Some(0),
        BodyKind::Length(n) => Some(n),
        BodyKind::Streamed => None,
    };
}

/// A connection for one attempt.
enum UpConn {
    H1(Stream, ConnToken),
    H2(crate::http2::client::Lease),
}

impl Ctx<'_> {
    fn generated(&self, reason: ErrorReason, detail: String) -> Failure {
        Failure::Generated {
            reason,
            detail,
            close: true,
        }
    }

    async fn attempts<D: Downstream>(&self, req: &Request, down: &mut D) -> Result<(), Failure> {
        let cluster = self.cluster;
        let counters = &self.worker.counters.http;
        let bodiless = req.body == BodyKind::Empty || req.body == BodyKind::Length(0);
        let replay_ok = bodiless
            && (self.policy.non_idempotent
                || super::exchange::is_idempotent(req.method.as_str().as_bytes()));
        if !cluster.request_allowed() {
            return Err(self.generated(
                ErrorReason::CircuitBreakerMaxRequests,
                format!(
                    "cluster {:?} has {} requests in flight on this worker, its max_requests share",
                    cluster.name,
                    cluster.active_requests.get()
                ),
            ));
        }
        let _active = ActiveGuard::new(&cluster.active_requests);
        let mut last: Option<Failure> = None;
        let mut failed_on: smallvec::SmallVec<[usize; 4]> = smallvec::SmallVec::new();
        for attempt in 1..=self.policy.attempts {
            if attempt > 1 && !cluster.admit_retry(counters) {
                break;
            }
            let _retrying = (attempt > 1).then(|| ActiveGuard::new(&cluster.active_retries));
            let now = Instant::now();
            if now >= self.deadline.get() {
                break;
            }
            let hash_key = match &cluster.config.lb {
                crate::config::http::LbPolicy::Hash { header } => {
                    req.headers.get(header.as_str()).map(HeaderValue::as_bytes)
                }
                _ => None,
            };
            let Some(ep) = cluster.pick(&self.worker.rng, now, hash_key, &failed_on) else {
                return Err(last.unwrap_or_else(|| {
                    self.generated(
                        ErrorReason::NoHealthyEndpoint,
                        format!("no endpoint of cluster {:?} is available", cluster.name),
                    )
                }));
            };
            let _ep_active = ActiveGuard::new(&cluster.endpoints[ep].active);
            let may_retry = attempt < self.policy.attempts && replay_ok;
            down.note().attempt(attempt, now);
            match self.attempt(ep, req, down, may_retry).await {
                Ok(()) => return Ok(()),
                Err(AttemptError::Final(f)) => return Err(f),
                Err(AttemptError::Retryable {
                    condition,
                    reason,
                    detail,
                }) => {
                    cluster.record(ep, Outcome::Failure, Instant::now(), counters);
                    failed_on.push(ep);
                    // Only an upstream's failure is worth another try: every
                    // retryable error is one by construction.
                    debug_assert_eq!(reason.blame(), crate::metrics::Blame::Upstream);
                    let allowed = condition.allowed(self.policy, replay_ok);
                    tracing::debug!(cluster = %cluster.name, attempt, ?condition, %detail, allowed, "attempt failed");
                    last = Some(self.generated(reason, detail));
                    if !allowed {
                        break;
                    }
                }
            }
        }
        Err(last.unwrap_or_else(|| {
            self.generated(
                ErrorReason::UpstreamTimeout,
                format!("no response from cluster {:?} in time", cluster.name),
            )
        }))
    }

    fn left(&self) -> Duration {
        self.deadline
            .get()
            .saturating_duration_since(Instant::now())
    }

    /// The request's trailers once its body ended, without what
    /// [`Self::trailers`] keeps back.
    async fn request_trailers<D: Downstream>(
        &self,
        down: &mut D,
    ) -> Result<Option<HeaderMap>, BodyError> {
        let trailers = down.request_trailers(self.idle).await?;
        Ok(trailers.and_then(|t| headers::scrub_trailers(t, self.trailers)))
    }

    /// The request went up in full: for one with a body the route timeout
    /// starts now (a long upload is not a slow upstream), as on the
    /// HTTP/1.1 path; a gRPC deadline is the whole call's.
    fn body_sent(&self) {
        if !self.grpc {
            self.deadline.set(Instant::now() + self.timeout);
        }
    }

    /// A connection to endpoint `ep`: a pooled one, else a new one.
    async fn connect(&self, ep: usize) -> Result<UpConn, AttemptError> {
        let endpoint = &self.cluster.endpoints[ep];
        let pooled = if self.cluster.speaks_h2() {
            endpoint.h2.checkout().map(UpConn::H2)
        } else {
            let timeout = self.cluster.config.pool_idle_timeout;
            endpoint
                .pool
                .checkout(Instant::now(), timeout)
                .map(|(s, token)| UpConn::H1(s, token))
        };
        if let Some(conn) = pooled {
            metrics::add(&self.worker.counters.http.pool_reuses, 1);
            return Ok(conn);
        }
        // Boxed: a handshake's state (TLS, h2) is large, and inline it
        // would be copied with every request's future, pooled or not.
        let started = Instant::now();
        let conn = Box::pin(self.connect_new(ep)).await?;
        self.opened.set(Some(started.elapsed()));
        Ok(conn)
    }

    /// [`Self::connect`] without a pooled connection: waits for an h2
    /// connect in flight, else opens a new connection.
    async fn connect_new(&self, ep: usize) -> Result<UpConn, AttemptError> {
        let endpoint = &self.cluster.endpoints[ep];
        let counters = &self.worker.counters.http;
        let h2 = self.cluster.speaks_h2();
        // Waiting for another request's h2 connect counts as pending too.
        if let Some((reason, detail)) = self.cluster.pending_refused() {
            return Err(AttemptError::Final(self.generated(reason, detail)));
        }
        let _pending = ActiveGuard::new(&self.cluster.pending);
        let mut _connecting = None;
        if h2 {
            loop {
                if let Some(lease) = endpoint.h2.checkout() {
                    metrics::add(&counters.pool_reuses, 1);
                    return Ok(UpConn::H2(lease));
                }
                match endpoint.h2.in_flight() {
                    // Another request is connecting: its connection will
                    // likely have room for this one too.
                    Some(done) => {
                        if monoio::time::timeout(self.left(), done.wait())
                            .await
                            .is_err()
                        {
                            return Err(self.timeout_failure());
                        }
                    }
                    None => break,
                }
            }
        } else if let Some((s, token)) = endpoint
            .pool
            .checkout(Instant::now(), self.cluster.config.pool_idle_timeout)
        {
            metrics::add(&counters.pool_reuses, 1);
            return Ok(UpConn::H1(s, token));
        }
        // Only now, with no pooled or multiplexed connection to take the
        // request (an h2 connect in flight is waited for above, not
        // refused), does the connection cap apply.
        if let Some((reason, detail)) = self.cluster.connections_refused() {
            return Err(AttemptError::Final(self.generated(reason, detail)));
        }
        if h2 {
            _connecting = Some(endpoint.h2.start_connect());
        }
        let token = self.cluster.connection_token();
        metrics::add(&counters.upstream_connects, 1);
        let failed = |detail: String| AttemptError::Retryable {
            condition: Condition::ConnectFailure,
            reason: ErrorReason::ConnectFailed,
            detail,
        };
        let limit = self.cluster.connect_timeout.min(self.left());
        let started = Instant::now();
        let tcp = match monoio::time::timeout(limit, TcpStream::connect_addr(endpoint.addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(failed(format!("connect to {} failed: {e}", endpoint.addr))),
            Err(_) => return Err(failed(format!("connect to {} timed out", endpoint.addr))),
        };
        let _ = tcp.set_nodelay(true);
        let (stream, speaks_h2) = match &self.cluster.source.tls {
            None => (Stream::Plain(tcp), h2),
            Some(tls) => {
                let alpn = match self.cluster.config.protocol {
                    UpstreamProtocol::H2 => Alpn::H2,
                    UpstreamProtocol::Http1 => Alpn::Http1,
                    UpstreamProtocol::Auto if h2 => Alpn::Both,
                    UpstreamProtocol::Auto => Alpn::Http1,
                };
                let limit = self.cluster.connect_timeout.min(self.left());
                let (s, chose_h2) = self
                    .worker
                    .tls
                    .connect(&self.worker.counters.tls, tls, alpn, tcp, limit)
                    .await
                    .map_err(failed)?;
                // `protocol = "h2"` insists; `auto` follows the server.
                let speaks = chose_h2 || self.cluster.config.protocol == UpstreamProtocol::H2;
                if h2 && !speaks {
                    self.cluster.h1_only.set(true);
                }
                (s, speaks)
            }
        };
        histograms::record(&self.cluster.connect_histogram, started.elapsed());
        if !speaks_h2 {
            return Ok(UpConn::H1(stream, token));
        }
        let limit = self.left();
        match monoio::time::timeout(
            limit,
            crate::http2::client::handshake(stream, &self.cluster.config.h2, token),
        )
        .await
        {
            Ok(Ok((send, closed))) => Ok(UpConn::H2(endpoint.h2.add(send, closed))),
            Ok(Err(e)) => Err(failed(format!(
                "HTTP/2 handshake with {}: {e}",
                endpoint.addr
            ))),
            Err(_) => Err(failed(format!(
                "HTTP/2 handshake with {} timed out",
                endpoint.addr
            ))),
        }
    }

    async fn attempt<D: Downstream>(
        &self,
        ep: usize,
        req: &Request,
        down: &mut D,
        may_retry: bool,
    ) -> Result<(), AttemptError> {
        // Each exchange is boxed: the request's own future (copied into
        // its task when spawned) stays small whichever version goes up.
        let conn = self.connect(ep).await?;
        down.note().connect = self.opened.take();
        match conn {
            UpConn::H2(lease) => Box::pin(self.over_h2(ep, lease, req, down, may_retry)).await,
            UpConn::H1(stream, token) => {
                if req.grpc {
                    // gRPC needs trailers and streaming both ways.
                    return Err(AttemptError::Final(self.generated(
                        ErrorReason::NotImplemented,
                        format!(
                            "gRPC needs HTTP/2, and cluster {:?} speaks HTTP/1.1",
                            self.cluster.name
                        ),
                    )));
                }
                Box::pin(self.over_h1(ep, stream, token, req, down, may_retry)).await
            }
        }
    }

    fn timeout_failure(&self) -> AttemptError {
        AttemptError::Final(self.generated(
            ErrorReason::UpstreamTimeout,
            format!("no response from cluster {:?} in time", self.cluster.name),
        ))
    }

    /// Judges the response head: records the outcome for balancing, and
    /// says whether to retry it (a retryable 5xx or gRPC status while a
    /// retry is allowed).
    fn judge(
        &self,
        ep: usize,
        status: u16,
        grpc_status: Option<u32>,
        may_retry: bool,
        sent_at: Instant,
    ) -> Result<Instant, AttemptError> {
        let now = Instant::now();
        let endpoint = &self.cluster.endpoints[ep];
        endpoint.latency.observe(now - sent_at, now);
        histograms::record(&self.cluster.first_byte_histogram, now - sent_at);
        let counters = &self.worker.counters.http;
        let status_retryable = self.policy.on_status.contains(&status)
            || grpc_status.is_some_and(|g| self.policy.on_grpc.contains(&g));
        let failed = status >= 500 || grpc_status == Some(grpc::UNAVAILABLE);
        if status_retryable && may_retry {
            if !self.cluster.retry_under_breaker() {
                metrics::add(&counters.retries_over_breaker, 1);
            } else if !self.cluster.retry_allowed() {
                metrics::add(&counters.retries_over_budget, 1);
            } else {
                return Err(AttemptError::Retryable {
                    condition: Condition::Status,
                    reason: ErrorReason::UpstreamReset,
                    detail: match grpc_status {
                        Some(g) => format!("upstream answered grpc-status {g}"),
                        None => format!("upstream answered {status}"),
                    },
                });
            }
        }
        let outcome = if failed {
            Outcome::Failure
        } else {
            Outcome::Success
        };
        self.cluster.record(ep, outcome, now, counters);
        Ok(now)
    }

    /// One attempt over an h2 stream.
    async fn over_h2<D: Downstream>(
        &self,
        ep: usize,
        lease: crate::http2::client::Lease,
        req: &Request,
        down: &mut D,
        may_retry: bool,
    ) -> Result<(), AttemptError> {
        let mut send = lease.send.clone();
        let scheme = if self.cluster.source.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let mut builder = http::Request::builder()
            .method(req.method.clone())
            .uri(with_scheme(
                &req.uri,
                scheme,
                self.cluster.endpoints[ep].addr,
            ));
        if let Some(h) = builder.headers_mut() {
            *h = req.headers.clone();
            if req.grpc_timeout.is_some() {
                // Passed on reduced by the time already spent here.
                if let Ok(v) = HeaderValue::from_str(&grpc::format_timeout(self.left())) {
                    h.insert("grpc-timeout", v);
                }
            }
        }
        let request = builder.body(()).map_err(|e| {
            AttemptError::Final(self.generated(ErrorReason::BadRequest, format!("request: {e}")))
        })?;
        let reset = |e: h2::Error| AttemptError::Retryable {
            condition: Condition::Reset,
            reason: ErrorReason::UpstreamReset,
            detail: format!("HTTP/2 upstream: {e}"),
        };
        let left = self.left();
        send = match monoio::time::timeout(left, send.ready()).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(reset(e)),
            Err(_) => return Err(self.timeout_failure()),
        };
        let end = req.body == BodyKind::Empty;
        let (response, mut up_body) = send.send_request(request, end).map_err(reset)?;
        let sent_at = Instant::now();
        let left = self.left();
        // The request body goes up while the response comes down (gRPC
        // streams both ways at once).
        let response = if end {
            match race_cancel(down, monoio::time::timeout(left, response)).await {
                Err(why) => return Err(AttemptError::Final(Failure::Cut(why))),
                Ok(r) => r,
            }
        } else if let Some(mut h2_body) = down.take_h2_body() {
            let pump = pump_h2(&mut h2_body, &mut up_body, self.trailers, self.idle);
            let head = monoio::time::timeout(left, response);
            futures_util::pin_mut!(pump, head);
            match futures_util::future::select(head, pump).await {
                futures_util::future::Either::Left((r, pump)) => {
                    // The body keeps streaming while the response does.
                    let r = match r {
                        Ok(Ok(resp)) => resp,
                        Ok(Err(e)) => return Err(upstream_stream_error(self, e)),
                        Err(_) => return Err(self.timeout_failure()),
                    };
                    let (parts, body) = r.into_parts();
                    // Boxed: streaming both ways is the rare (gRPC) case,
                    // and its state would enlarge every request's.
                    let relay = self.relay_h2_response(
                        ep,
                        parts,
                        body,
                        down,
                        may_retry,
                        sent_at,
                        Some(pump),
                    );
                    return Box::pin(relay).await;
                }
                futures_util::future::Either::Right((pumped, head)) => {
                    if let Err(e) = pumped {
                        return Err(AttemptError::Final(Failure::from_request_body(e)));
                    }
                    head.await
                }
            }
        } else {
            if let Err(e) = self.send_body_h2(down, &mut up_body).await {
                return Err(AttemptError::Final(Failure::from_request_body(e)));
            }
            self.body_sent();
            monoio::time::timeout(self.left(), response).await
        };
        let resp = match response {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => return Err(upstream_stream_error(self, e)),
            Err(_) => return Err(self.timeout_failure()),
        };
        let (parts, body) = resp.into_parts();
        self.relay_h2_response(
            ep,
            parts,
            body,
            down,
            may_retry,
            sent_at,
            None::<std::future::Pending<Result<(), BodyError>>>,
        )
        .await
    }

    /// Request body from an HTTP/1.1 client to an h2 stream.
    async fn send_body_h2<D: Downstream>(
        &self,
        down: &mut D,
        up: &mut h2::SendStream<Bytes>,
    ) -> Result<(), BodyError> {
        let mut total = 0u64;
        while let Some(chunk) = down.body_chunk(self.idle).await? {
            total += chunk.len() as u64;
            if self.body_bytes_max.is_some_and(|max| total > max) {
                return Err(BodyError::TooLarge);
            }
            let n = chunk.len();
            send_h2_data(up, chunk, false, self.idle)
                .await
                .map_err(|e| BodyError::Io(Side::Upstream, e))?;
            down.release(n);
        }
        match self.request_trailers(down).await? {
            Some(t) => up
                .send_trailers(t)
                .map_err(|e| BodyError::Io(Side::Upstream, io::Error::other(e))),
            None => send_h2_data(up, Bytes::new(), true, self.idle)
                .await
                .map_err(|e| BodyError::Io(Side::Upstream, e)),
        }
    }

    /// Relays an h2 upstream's response to the client; `pump` is the
    /// request body still streaming up, driven alongside.
    #[allow(clippy::too_many_arguments)]
    async fn relay_h2_response<D: Downstream, P>(
        &self,
        ep: usize,
        parts: http::response::Parts,
        mut body: h2::RecvStream,
        down: &mut D,
        may_retry: bool,
        sent_at: Instant,
        pump: Option<P>,
    ) -> Result<(), AttemptError>
    where
        P: std::future::Future<Output = Result<(), BodyError>> + Unpin,
    {
        let trailers_only = body.is_end_stream();
        let grpc_status = parts
            .headers
            .get("grpc-status")
            .and_then(|v| std::str::from_utf8(v.as_bytes()).ok()?.parse().ok());
        let answered = self.judge(
            ep,
            parts.status.as_u16(),
            if trailers_only { grpc_status } else { None },
            may_retry,
            sent_at,
        )?;
        let kind = if trailers_only {
            BodyKind::Empty
        } else {
            headers::content_length(&parts.headers).map_or(BodyKind::Streamed, BodyKind::Length)
        };
        note_answer(
            down.note(),
            parts.status.as_u16(),
            self.cluster.endpoints[ep].addr,
            answered,
            kind,
        );
        self.worker.counters.http.response(parts.status.as_u16());
        let cut = |why: String| AttemptError::Final(Failure::Cut(why));
        down.respond(parts.status, parts.headers, kind)
            .await
            .map_err(|e| cut(format!("writing the response head: {e}")))?;
        if trailers_only {
            return Ok(());
        }
        let relay = async {
            let mut flow = body.flow_control().clone();
            loop {
                let next = monoio::select! {
                    d = monoio::time::timeout(self.idle, body.data()) => d,
                    reason = down.cancelled() => {
                        return Err(format!("client reset the stream ({reason:?})"));
                    }
                };
                match next {
                    Err(_) => return Err("upstream response body timed out".to_string()),
                    Ok(None) => break,
                    Ok(Some(Err(e))) => {
                        let reason = e.reason().unwrap_or(h2::Reason::INTERNAL_ERROR);
                        down.reset(reason);
                        return Err(format!("upstream response body: {e}"));
                    }
                    Ok(Some(Ok(data))) => {
                        let n = data.len();
                        down.data(data)
                            .await
                            .map_err(|e| format!("writing the response body: {e}"))?;
                        let _ = flow.release_capacity(n);
                    }
                }
            }
            let trailers = match monoio::time::timeout(self.idle, body.trailers()).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    down.reset(e.reason().unwrap_or(h2::Reason::INTERNAL_ERROR));
                    return Err(format!("upstream trailers: {e}"));
                }
                Err(_) => return Err("upstream trailers timed out".to_string()),
            };
            down.finish(trailers)
                .await
                .map_err(|e| format!("ending the response: {e}"))
        };
        let result = match pump {
            None => relay.await,
            Some(pump) => {
                futures_util::pin_mut!(relay);
                match futures_util::future::select(relay, pump).await {
                    futures_util::future::Either::Left((done, _pump)) => done,
                    futures_util::future::Either::Right((pumped, relay)) => match pumped {
                        Ok(()) => relay.await,
                        Err(e) => Err(format!("request body: {e:?}")),
                    },
                }
            }
        };
        result.map_err(|why| {
            self.cluster.record(
                ep,
                Outcome::Failure,
                Instant::now(),
                &self.worker.counters.http,
            );
            cut(why)
        })
    }

    /// One attempt over an HTTP/1.1 connection (h2 client, or `auto`
    /// cluster whose server chose HTTP/1.1).
    async fn over_h1<D: Downstream>(
        &self,
        ep: usize,
        stream: Stream,
        token: ConnToken,
        req: &Request,
        down: &mut D,
        may_retry: bool,
    ) -> Result<(), AttemptError> {
        let worker = self.worker;
        let mut up = super::exchange::Upstream {
            stream,
            inbound: worker.buffers.take_inbound(),
            token,
        };
        let out_body = match req.body {
            BodyKind::Empty => OutBody::None,
            BodyKind::Length(n) => OutBody::Length(n),
            BodyKind::Streamed => OutBody::Chunked,
        };
        let mut head = worker.heads.take();
        headers::request_to_h1(&req.method, &req.uri, &req.headers, out_body, &mut head);
        let reset = |detail: String| AttemptError::Retryable {
            condition: Condition::Reset,
            reason: ErrorReason::UpstreamReset,
            detail,
        };
        let (written, head) = up
            .inbound
            .write_all_on_timer(&mut up.stream, head, self.idle)
            .await;
        worker.heads.give(head);
        written.map_err(|e| reset(format!("sending the request head: {e}")))?;
        let sent_at = Instant::now();
        let kind = if req.method == Method::HEAD {
            RequestKind::Head
        } else {
            RequestKind::Other
        };
        let mut parser = ResponseParser::new(HeadLimits::default());
        let mut interims = 0;
        let mut early = false;
        let mut raced = None;
        if req.body != BodyKind::Empty {
            let (back, raced_body) = self
                .race_body_h1(ep, up, &mut parser, kind, down, out_body)
                .await;
            up = back;
            let (resp, before, answered_early) = raced_body?;
            for interim in &before {
                self.relay_interim(down, interim).await?;
            }
            interims = before.len();
            early = answered_early;
            raced = Some(resp);
        }
        let resp = loop {
            if let Some(resp) = raced.take() {
                break resp;
            }
            let read = super::exchange::read_head_from(
                &mut up.stream,
                &mut up.inbound,
                &mut parser,
                kind,
                self.left(),
            );
            // A client that resets its stream (h2) stops the wait: the
            // upstream connection is then closed, not pooled.
            let r = match race_cancel(down, read).await {
                Ok(r) => r,
                Err(why) => return Err(AttemptError::Final(Failure::Cut(why))),
            };
            match r {
                Ok(r) if r.is_interim() => {
                    interims += 1;
                    let e = HeadRead::TooManyInterims;
                    if interims > super::exchange::INTERIM_RESPONSES_MAX {
                        return Err(head_failure(worker, self.cluster, ep, e, true));
                    }
                    self.relay_interim(down, &r).await?;
                }
                Ok(r) => break r,
                Err(e) => return Err(head_failure(worker, self.cluster, ep, e, true)),
            }
        };
        let answered = self.judge(ep, resp.status, None, may_retry, sent_at)?;
        let (status, h) = headers::response_from_h1(&resp).map_err(|e| {
            AttemptError::Final(self.generated(ErrorReason::BadUpstreamResponse, e.to_string()))
        })?;
        let kind = match resp.body {
            ResponseBody::None | ResponseBody::Tunnel => BodyKind::Empty,
            ResponseBody::Length(n) => BodyKind::Length(n),
            ResponseBody::Chunked | ResponseBody::UntilClose => BodyKind::Streamed,
        };
        note_answer(
            down.note(),
            status.as_u16(),
            self.cluster.endpoints[ep].addr,
            answered,
            kind,
        );
        worker.counters.http.response(status.as_u16());
        let cut = |why: String| AttemptError::Final(Failure::Cut(why));
        down.respond(status, h, kind)
            .await
            .map_err(|e| cut(format!("writing the response head: {e}")))?;
        let mut reader = H1Body::new(resp.body, Side::Upstream);
        loop {
            let chunk = reader
                .next(&mut up.inbound, &mut up.stream, self.idle, None)
                .await;
            match chunk {
                Ok(Some(data)) => down
                    .data(data)
                    .await
                    .map_err(|e| cut(format!("writing the response body: {e}")))?,
                Ok(None) => break,
                Err(e) => {
                    self.cluster.record(
                        ep,
                        Outcome::Failure,
                        Instant::now(),
                        &worker.counters.http,
                    );
                    down.reset(h2::Reason::INTERNAL_ERROR);
                    return Err(cut(format!("upstream response body: {e:?}")));
                }
            }
        }
        down.finish(reader.trailers())
            .await
            .map_err(|e| cut(format!("ending the response: {e}")))?;
        // After an early answer the upstream did not get the whole body.
        let reusable = !early
            && resp.hop.keep_alive
            && resp.version == crate::http1::Version::Http11
            && resp.body != ResponseBody::UntilClose
            && up.inbound.is_empty();
        let super::exchange::Upstream {
            stream,
            inbound,
            token,
        } = up;
        worker.buffers.give_inbound(inbound);
        if reusable {
            self.cluster.endpoints[ep].pool.checkin(
                stream,
                token,
                Instant::now(),
                self.cluster.config.max_idle_per_endpoint,
            );
        }
        Ok(())
    }

    /// Relays an HTTP/1.1 upstream's interim response to the client.
    async fn relay_interim<D: Downstream>(
        &self,
        down: &mut D,
        r: &crate::http1::ResponseHead,
    ) -> Result<(), AttemptError> {
        let (status, h) = headers::response_from_h1(r).map_err(|e| {
            let detail = format!("interim response: {e}");
            AttemptError::Final(self.generated(ErrorReason::BadUpstreamResponse, detail))
        })?;
        let sent = down
            .interim(status, h)
            .await
            .map_err(|e| AttemptError::Final(Failure::Cut(format!("interim response: {e}"))))?;
        if sent {
            self.worker.counters.http.response(status.as_u16());
        }
        Ok(())
    }

    /// Sends the request body while watching the upstream for an answer:
    /// an upstream may answer before it read the whole body (a 413 or 401
    /// to an upload, RFC 9112 §9.5) and must not be left waiting for the
    /// rest while we wait for its answer. Returns the final head, the
    /// interim ones before it, and whether it came early (sending then
    /// stopped; neither connection can be kept).
    async fn race_body_h1<D: Downstream>(
        &self,
        ep: usize,
        up: super::exchange::Upstream,
        parser: &mut ResponseParser,
        kind: RequestKind,
        down: &mut D,
        out: OutBody,
    ) -> (super::exchange::Upstream, Raced) {
        use futures_util::{future::Either, FutureExt};
        use monoio::io::Splitable;
        // Taken and given back: the stream splits into a read and a write
        // half.
        let super::exchange::Upstream {
            stream,
            mut inbound,
            token,
        } = up;
        let (mut reader, mut writer) = stream.into_split();
        let raced = {
            let heads = super::exchange::heads_while_sending(
                &mut reader,
                &mut inbound,
                parser,
                kind,
                |_| {},
            );
            let body = self.send_body_h1(down, &mut writer, out);
            let (heads, body) = (std::pin::pin!(heads), std::pin::pin!(body));
            match futures_util::future::select(heads, body).await {
                Either::Left((Ok((r, interims)), unsent)) => {
                    // Both may have become ready in the same turn: give
                    // the body one more poll before calling it early.
                    if let Some(Ok(())) = unsent.now_or_never() {
                        self.body_sent();
                        Ok((r, interims, false))
                    } else {
                        metrics::add(&self.worker.counters.http.early_responses, 1);
                        tracing::debug!(
                            status = r.status,
                            "response before the request body was sent in full"
                        );
                        Ok((r, interims, true))
                    }
                }
                Either::Left((Err(e), _)) => {
                    Err(head_failure(self.worker, self.cluster, ep, e, true))
                }
                Either::Right((Err(e), _)) => {
                    Err(AttemptError::Final(Failure::from_request_body(e)))
                }
                Either::Right((Ok(()), heads)) => {
                    self.body_sent();
                    match monoio::time::timeout(self.left(), heads).await {
                        Ok(Ok((r, interims))) => Ok((r, interims, false)),
                        Ok(Err(e)) => Err(head_failure(self.worker, self.cluster, ep, e, true)),
                        Err(_) => Err(self.timeout_failure()),
                    }
                }
            }
        };
        let stream = reader
            .reunite(writer)
            .unwrap_or_else(|_| unreachable!("the two halves of one stream"));
        let up = super::exchange::Upstream {
            stream,
            inbound,
            token,
        };
        (up, raced)
    }

    /// Request body from any client to an HTTP/1.1 upstream, framed as
    /// `out`.
    async fn send_body_h1<D: Downstream, W: monoio::io::AsyncWriteRent>(
        &self,
        down: &mut D,
        up: &mut W,
        out: OutBody,
    ) -> Result<(), BodyError> {
        let mut total = 0u64;
        let mut buf = self.worker.heads.take();
        let result = async {
            while let Some(chunk) = down.body_chunk(self.idle).await? {
                if chunk.is_empty() {
                    // An empty chunk would be read as the last chunk, and
                    // the real one after it as the next request's start.
                    continue;
                }
                total += chunk.len() as u64;
                if self.body_bytes_max.is_some_and(|max| total > max) {
                    return Err(BodyError::TooLarge);
                }
                buf.clear();
                if out == OutBody::Chunked {
                    crate::http1::chunked::write_chunk_size(chunk.len(), &mut buf);
                    buf.extend_from_slice(&chunk);
                    buf.extend_from_slice(crate::http1::chunked::CHUNK_END);
                } else {
                    buf.extend_from_slice(&chunk);
                }
                let (r, back) = write_all_timed(up, std::mem::take(&mut buf), self.idle).await;
                buf = back;
                r.map_err(|e| BodyError::Io(Side::Upstream, e))?;
                down.release(chunk.len());
            }
            if out == OutBody::Chunked {
                buf.clear();
                let trailers = self.request_trailers(down).await?;
                headers::write_last_chunk(trailers.as_ref(), self.trailers, &mut buf);
                let (r, back) = write_all_timed(up, std::mem::take(&mut buf), self.idle).await;
                buf = back;
                r.map_err(|e| BodyError::Io(Side::Upstream, e))?;
            }
            Ok(())
        }
        .await;
        self.worker.heads.give(buf);
        result
    }
}

/// What racing the request body against the response head came to: the
/// final head, the interim ones before it, and whether it came early.
type Raced = Result<(ResponseHead, Vec<ResponseHead>, bool), AttemptError>;

/// Waits for `f` unless the client cancels first.
async fn race_cancel<D: Downstream, F: std::future::Future>(
    down: &mut D,
    f: F,
) -> Result<F::Output, String> {
    monoio::select! {
        r = f => Ok(r),
        reason = down.cancelled() => Err(format!("client reset the stream ({reason:?})")),
    }
}

fn upstream_stream_error(ctx: &Ctx<'_>, e: h2::Error) -> AttemptError {
    // A stream refused (REFUSED_STREAM, or GOAWAY past its id) never
    // reached the upstream application: safe to retry anywhere.
    let refused = e.reason() == Some(h2::Reason::REFUSED_STREAM) || e.is_go_away();
    if refused || e.is_io() {
        AttemptError::Retryable {
            condition: if refused {
                Condition::ConnectFailure
            } else {
                Condition::Reset
            },
            reason: ErrorReason::UpstreamReset,
            detail: format!("HTTP/2 upstream of cluster {:?}: {e}", ctx.cluster.name),
        }
    } else {
        AttemptError::Final(Failure::Generated {
            reason: ErrorReason::UpstreamReset,
            detail: format!("HTTP/2 upstream of cluster {:?}: {e}", ctx.cluster.name),
            close: true,
        })
    }
}

/// `uri` with its scheme replaced (the upstream's, not the client's); one
/// without an authority (an HTTP/1.0 request without Host) names the
/// endpoint, as h2 needs `:scheme` and `:authority` beside `:path`.
fn with_scheme(uri: &Uri, scheme: &'static str, endpoint: std::net::SocketAddr) -> Uri {
    let mut parts = uri.clone().into_parts();
    if parts.authority.is_none() {
        parts.authority = http::uri::Authority::try_from(endpoint.to_string()).ok();
    }
    parts.scheme = Some(if scheme == "https" {
        http::uri::Scheme::HTTPS
    } else {
        http::uri::Scheme::HTTP
    });
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
}

/// Sends `data` on an h2 stream as the peer's window allows: waits for
/// capacity (flow control), so nothing piles up in h2's send buffer
/// beyond what the peer granted.
pub async fn send_h2_data(
    send: &mut h2::SendStream<Bytes>,
    mut data: Bytes,
    end: bool,
    idle: Duration,
) -> io::Result<()> {
    let to_io = |e: h2::Error| io::Error::other(e.to_string());
    if data.is_empty() {
        // Nothing to wait for: an empty DATA frame only to end the stream.
        if end {
            send.send_data(data, true).map_err(to_io)?;
        }
        return Ok(());
    }
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let cap = monoio::time::timeout(idle, poll_fn(|cx| send.poll_capacity(cx)))
            .await
            .map_err(|_| super::inbound::timed_out())?;
        let cap = match cap {
            None => return Err(io::ErrorKind::BrokenPipe.into()),
            Some(Err(e)) => return Err(to_io(e)),
            Some(Ok(0)) => continue,
            Some(Ok(n)) => n,
        };
        let piece = data.split_to(cap.min(data.len()));
        send.send_data(piece, end && data.is_empty())
            .map_err(to_io)?;
    }
    Ok(())
}

/// Pumps an h2 request body into an h2 upstream stream, trailers too;
/// capacity goes back to the client only once forwarded.
async fn pump_h2(
    from: &mut h2::RecvStream,
    to: &mut h2::SendStream<Bytes>,
    policy: Trailers<'_>,
    idle: Duration,
) -> Result<(), BodyError> {
    let mut flow = from.flow_control().clone();
    loop {
        // No idle bound while the client streams: gRPC streams may be
        // quiet for long; the client's own deadline and the route
        // timeout bound the exchange.
        let next = from.data().await;
        match next {
            None => break,
            Some(Err(e)) => {
                to.send_reset(e.reason().unwrap_or(h2::Reason::CANCEL));
                return Err(BodyError::Io(
                    Side::Downstream,
                    io::Error::other(e.to_string()),
                ));
            }
            Some(Ok(data)) => {
                let n = data.len();
                send_h2_data(to, data, false, idle)
                    .await
                    .map_err(|e| BodyError::Io(Side::Upstream, e))?;
                let _ = flow.release_capacity(n);
            }
        }
    }
    match from
        .trailers()
        .await
        .map(|t| t.and_then(|t| headers::scrub_trailers(t, policy)))
    {
        Ok(Some(t)) => to
            .send_trailers(t)
            .map_err(|e| BodyError::Io(Side::Upstream, io::Error::other(e.to_string()))),
        Ok(None) => to
            .send_data(Bytes::new(), true)
            .map_err(|e| BodyError::Io(Side::Upstream, io::Error::other(e.to_string()))),
        Err(e) => Err(BodyError::Io(
            Side::Downstream,
            io::Error::other(e.to_string()),
        )),
    }
}

/// Reads an HTTP/1.1 body (either direction) as pieces: Content-Length,
/// chunked (decoded strictly), or until close.
pub struct H1Body {
    state: H1State,
    side: Side,
    total: u64,
    pace: super::body::Pace,
    /// A chunked body's trailer section, once it ended.
    trailers: Vec<u8>,
}

enum H1State {
    Length(u64),
    Chunked(ChunkedDecoder),
    UntilClose,
    Done,
}

impl H1Body {
    pub fn new(body: ResponseBody, side: Side) -> Self {
        let state = match body {
            ResponseBody::None | ResponseBody::Tunnel | ResponseBody::Length(0) => H1State::Done,
            ResponseBody::Length(n) => H1State::Length(n),
            ResponseBody::Chunked => H1State::Chunked(ChunkedDecoder::default()),
            ResponseBody::UntilClose => H1State::UntilClose,
        };
        Self {
            state,
            side,
            total: 0,
            pace: super::body::Pace::default(),
            trailers: Vec::new(),
        }
    }

    /// The trailers of a chunked body that ended, as an h2 trailer block.
    pub fn trailers(&self) -> Option<HeaderMap> {
        if self.trailers.is_empty() {
            return None;
        }
        // A request's are scrubbed further where they go up
        // (`Ctx::request_trailers`).
        headers::trailers_from_h1(&self.trailers, Trailers::Response)
    }

    /// The next piece; None at the body's end. `limit` bounds the total.
    pub async fn next<S: monoio::io::AsyncReadRent>(
        &mut self,
        inbound: &mut Inbound,
        stream: &mut S,
        idle: Duration,
        limit: Option<u64>,
    ) -> Result<Option<Bytes>, BodyError> {
        loop {
            if matches!(self.state, H1State::Done) {
                return Ok(None);
            }
            if inbound.is_empty() {
                if inbound.saturated() {
                    let grown = (inbound.capacity() * 2).min(super::body::STREAM_BUFFER_BYTES_MAX);
                    inbound.reserve_to(grown);
                }
                let cap = inbound.capacity();
                match inbound.fill(stream, cap, idle).await {
                    Ok(0) if matches!(self.state, H1State::UntilClose) => {
                        self.state = H1State::Done;
                        return Ok(None);
                    }
                    Ok(0) => return Err(BodyError::Truncated(self.side)),
                    Ok(n) if self.side == Side::Downstream => {
                        self.pace.note(n).map_err(|e| BodyError::Io(self.side, e))?;
                    }
                    Ok(_) => {}
                    Err(e) => return Err(BodyError::Io(self.side, e)),
                }
            }
            let piece = match &mut self.state {
                H1State::Done => return Ok(None),
                H1State::Length(left) => {
                    let n = (inbound.data().len() as u64).min(*left) as usize;
                    let piece = Bytes::copy_from_slice(&inbound.data()[..n]);
                    inbound.consume(n);
                    *left -= n as u64;
                    if *left == 0 {
                        self.state = H1State::Done;
                    }
                    Some(piece)
                }
                H1State::UntilClose => {
                    let n = inbound.data().len();
                    let piece = Bytes::copy_from_slice(inbound.data());
                    inbound.consume(n);
                    Some(piece)
                }
                H1State::Chunked(decoder) => {
                    let d = decoder
                        .decode(inbound.data())
                        .map_err(|e| BodyError::Framing(self.side, e))?;
                    let piece = d
                        .data
                        .map(|range| Bytes::copy_from_slice(&inbound.data()[range]));
                    inbound.consume(d.consumed);
                    if decoder.is_done() {
                        self.trailers = decoder.take_trailers();
                        self.state = H1State::Done;
                    }
                    piece
                }
            };
            if let Some(piece) = piece.filter(|p| !p.is_empty()) {
                self.total += piece.len() as u64;
                if limit.is_some_and(|max| self.total > max) {
                    return Err(BodyError::TooLarge);
                }
                return Ok(Some(piece));
            }
        }
    }
}
