//! One request's trip upstream: pick an endpoint, take a pooled connection
//! or connect, send the re-serialized head and body, read the response
//! head, retry when the policy, the budget and the body allow, then relay
//! the response to the client.
//!
//! What must hold: a retry happens only before any response byte reached
//! the client, only for conditions the route lists, only within the
//! cluster's retry budget, and (except after a connect failure, when
//! nothing was sent) only for idempotent methods without a body. An
//! upstream connection goes back to the pool only after a complete
//! response on a connection both sides keep alive.

use std::time::{Duration, Instant};

use futures_util::future::Either;
use monoio::{
    io::{AsyncReadRent, AsyncWriteRent, Splitable},
    net::TcpStream,
};

use crate::tls::{per_worker::Alpn, stream::Stream};

use super::{
    body::{self, BodyError, Side, Source},
    inbound::{write_all_within, Inbound},
    Client, Next,
};
use crate::{
    config::http::{HttpListener, LbPolicy, RetryPolicy, Route},
    http1::{
        chunked::Trailers,
        head::RequestKind,
        write::{self, Edits, Forwarding, OutBody},
        HeadError, HeadLimits, RequestBody, RequestHead, ResponseBody, ResponseHead,
        ResponseParser, Version,
    },
    metrics::{self, histograms, ActiveGuard, ErrorReason},
    route::RequestView,
    upstream::{ClusterState, ConnToken, Outcome},
    worker::Worker,
};

/// How long we wait for an upstream's `100 Continue` before sending the
/// body anyway (curl waits 1 s too; RFC 9110 §10.1.1 lets a client send).
const EXPECT_CONTINUE_WAIT: Duration = Duration::from_secs(1);

/// Over TLS, response bodies up to this size that arrived with the head
/// are copied behind the head and sent in one write (one record, one
/// syscall): the TLS stream writes one buffer per call, so a vectored
/// write would cost a record and a syscall per part.
const INLINE_BODY_BYTES_MAX: usize = 16 * 1024;

/// Body bytes that arrived with the head, up to this many, are copied
/// behind the head (a small copy costs less than a vectored write's boxed
/// iovecs); more go out from the read buffer in one vectored write with
/// the head, uncopied.
const INLINE_COPY_BYTES_MAX: usize = 2 * 1024;

/// Interim (1xx) responses accepted before the final one. Real upstreams
/// send one or two (100, 103); without a cap, one that streams them would
/// keep us relaying until the request timeout.
pub(crate) const INTERIM_RESPONSES_MAX: usize = 16;

/// An upstream connection during one exchange.
pub struct Upstream {
    pub stream: Stream,
    pub inbound: Inbound,
    /// Counts this connection as open in its cluster (the
    /// `max_connections` breaker) for as long as it lives.
    pub token: ConnToken,
}

/// Why a request got no relayed response.
#[derive(Debug)]
pub enum Failure {
    /// Nothing reached the client yet: answer with a generated response.
    Generated {
        reason: ErrorReason,
        detail: String,
        close: bool,
    },
    /// The response failed midway: close the connection.
    Cut(String),
}

impl Failure {
    /// What a failure while sending the request body comes to: the
    /// client's fault (413, 400), the upstream's (502), or a cut.
    pub fn from_request_body(e: BodyError) -> Failure {
        match e {
            BodyError::TooLarge => Failure::Generated {
                reason: ErrorReason::BodyTooLarge,
                detail: "request body exceeds the limit".into(),
                close: true,
            },
            BodyError::Framing(Side::Downstream, c) => Failure::Generated {
                reason: ErrorReason::BadRequest,
                detail: format!("request body: {c}"),
                close: true,
            },
            BodyError::Io(Side::Upstream, err) => Failure::Generated {
                reason: ErrorReason::UpstreamReset,
                detail: format!("upstream failed while receiving the body: {err}"),
                close: true,
            },
            other => Failure::Cut(format!("client request body: {other:?}")),
        }
    }
}

/// Routing's view of an HTTP/1 request.
pub struct View<'a>(pub &'a RequestHead);

impl RequestView for View<'_> {
    fn method(&self) -> &[u8] {
        self.0.method()
    }

    fn host(&self) -> Option<&[u8]> {
        // An absolute-form target's authority wins over Host (they were
        // checked to agree at parse).
        self.0.authority().map(crate::route::route_host)
    }

    fn path(&self) -> &[u8] {
        self.0.path()
    }

    fn header(&self, name: &str) -> Option<&[u8]> {
        self.0.head.get(name)
    }
}

/// What went wrong in one attempt, and whether a retry may fix it (both
/// request paths use it, so they retry on the same conditions).
pub(crate) enum AttemptError {
    /// Nothing reached the upstream's application, or it reset before
    /// answering: another endpoint may do better.
    Retryable {
        condition: Condition,
        reason: ErrorReason,
        detail: String,
    },
    Final(Failure),
}

/// Why an attempt may be retried: the route's `retry_on` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Condition {
    /// Nothing was sent: any request may go elsewhere.
    ConnectFailure,
    /// The upstream closed or reset before answering.
    Reset,
    /// A status the route retries; judged retryable when it came.
    Status,
}

impl Condition {
    /// Whether the policy retries this condition for a request that can
    /// (`replay_ok`: no body, idempotent or allowed) be sent again.
    pub(crate) fn allowed(self, policy: &RetryPolicy, replay_ok: bool) -> bool {
        match self {
            Condition::ConnectFailure => policy.on_connect_failure,
            Condition::Reset => policy.on_reset && replay_ok,
            Condition::Status => true,
        }
    }
}

/// What a failed read of a response head comes to. `close`: the client's
/// request body was not read in full, so its connection must close.
pub(crate) fn head_failure(
    worker: &Worker,
    cluster: &ClusterState,
    ep: usize,
    e: HeadRead,
    close: bool,
) -> AttemptError {
    let bad_response = |detail: String, close: bool| {
        // The upstream broke the protocol: counted against the endpoint
        // (outlier detection), answered with a 502.
        cluster.record(ep, Outcome::Failure, Instant::now(), &worker.counters.http);
        AttemptError::Final(Failure::Generated {
            reason: ErrorReason::BadUpstreamResponse,
            detail,
            close,
        })
    };
    match e {
        HeadRead::TimedOut => AttemptError::Final(Failure::Generated {
            reason: ErrorReason::UpstreamTimeout,
            detail: format!("no response from cluster {:?} in time", cluster.name),
            close,
        }),
        HeadRead::Closed { partial: false } | HeadRead::Reset(_) => AttemptError::Retryable {
            condition: Condition::Reset,
            reason: ErrorReason::UpstreamReset,
            detail: format!(
                "cluster {:?} closed the connection before answering",
                cluster.name
            ),
        },
        HeadRead::Closed { partial: true } => AttemptError::Final(Failure::Generated {
            reason: ErrorReason::BadUpstreamResponse,
            detail: "upstream closed inside a response head".into(),
            close,
        }),
        // Interims were relayed already: the connection cannot stay.
        HeadRead::TooManyInterims => bad_response(
            format!("more than {INTERIM_RESPONSES_MAX} interim (1xx) responses"),
            true,
        ),
        HeadRead::Bad(h) => bad_response(format!("invalid response from upstream: {h}"), close),
    }
}

/// 32 hex digits of randomness, without allocating.
pub(crate) fn request_id(rng: &crate::balance::Rng) -> [u8; 32] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let (a, b) = (rng.next_u64(), rng.next_u64());
    let mut id = [0u8; 32];
    for (i, byte) in id.iter_mut().enumerate() {
        let word = if i < 16 { a } else { b };
        *byte = HEX[((word >> ((i % 16) * 4)) & 0xf) as usize];
    }
    id
}

pub(crate) fn is_idempotent(method: &[u8]) -> bool {
    matches!(
        method,
        b"GET" | b"HEAD" | b"OPTIONS" | b"TRACE" | b"PUT" | b"DELETE"
    )
}

/// Forwards `req` to `cluster`, retrying as the route allows.
pub async fn forward(
    worker: &Worker,
    http: &HttpListener,
    route: Option<&Route>,
    cluster_index: usize,
    client: &mut Client,
    req: &RequestHead,
    idle: Duration,
) -> Result<Next, Failure> {
    let cluster = &*worker.clusters[cluster_index];
    let tunnel = req.hop.upgrade || req.is_connect();
    if !tunnel && (cluster.speaks_h2() || worker.http1_via_pipeline) {
        // Tunnels stay on HTTP/1.1 (h2 would need extended CONNECT).
        let via = super::downstream::forward(worker, http, route, cluster_index, client, req, idle);
        return Box::pin(via).await;
    }
    let default_policy = RetryPolicy::default();
    let no_edits = Edits::default();
    let policy = route.map_or(&default_policy, |r| &r.retry);
    let timeout = route.map_or(http.request_timeout, |r| r.timeout);
    let edits = route.map_or(&no_edits, |r| &r.edits);
    let body_out = match req.body {
        RequestBody::Empty => OutBody::None,
        RequestBody::Length(n) => OutBody::Length(n),
        RequestBody::Chunked => OutBody::Chunked,
    };
    let request_id = request_id(&worker.rng);
    let fwd = Forwarding {
        client_ip: &client.ip,
        proto: if client.stream.is_tls() {
            "https"
        } else {
            "http"
        },
        request_id: &request_id,
        identity_header: &http.identity_header,
        identity: client.identity.as_ref().map(|i| i.as_str()),
        trace: client.note.trace,
    };
    let hash_key = match &cluster.config.lb {
        LbPolicy::Hash { header } => req.head.get(header.as_str()),
        _ => None,
    };
    // Lent by the worker for this request only.
    let mut head = worker.heads.take();
    write::request(req, body_out, tunnel, &fwd, edits, &mut head);
    let result = attempts(
        worker, cluster, policy, client, req, &mut head, timeout, hash_key, http, idle,
    )
    .await;
    worker.heads.give(head);
    result
}

/// The attempt loop of [`forward`].
#[allow(clippy::too_many_arguments)]
async fn attempts(
    worker: &Worker,
    cluster: &ClusterState,
    policy: &RetryPolicy,
    client: &mut Client,
    req: &RequestHead,
    head: &mut Vec<u8>,
    timeout: Duration,
    hash_key: Option<&[u8]>,
    http: &HttpListener,
    idle: Duration,
) -> Result<Next, Failure> {
    let began = Instant::now();
    let deadline = began + timeout;
    let bodiless = matches!(req.body, RequestBody::Empty | RequestBody::Length(0));
    let replay_ok = bodiless && (policy.non_idempotent || is_idempotent(req.method()));
    if !cluster.request_allowed() {
        return Err(Failure::Generated {
            reason: ErrorReason::CircuitBreakerMaxRequests,
            detail: format!(
                "cluster {:?} has {} requests in flight on this worker, its max_requests share",
                cluster.name,
                cluster.active_requests.get()
            ),
            close: !bodiless,
        });
    }
    let _active = ActiveGuard::new(&cluster.active_requests);
    let counters = &worker.counters.http;
    let no_endpoint = || Failure::Generated {
        reason: ErrorReason::NoHealthyEndpoint,
        detail: format!("no endpoint of cluster {:?} is available", cluster.name),
        close: !bodiless,
    };
    // Built only on failure: the success path allocates no message.
    let mut last: Option<Failure> = None;
    // Endpoints that failed this request: retries go elsewhere if they can.
    let mut failed_on: smallvec::SmallVec<[usize; 4]> = smallvec::SmallVec::new();
    for attempt in 1..=policy.attempts {
        if attempt > 1 && !cluster.admit_retry(counters) {
            break;
        }
        let _retrying = (attempt > 1).then(|| ActiveGuard::new(&cluster.active_retries));
        // The first attempt starts now: one clock read less per request.
        let now = if attempt == 1 { began } else { Instant::now() };
        if now >= deadline {
            break;
        }
        let Some(ep) = cluster.pick(&worker.rng, now, hash_key, &failed_on) else {
            return Err(last.unwrap_or_else(no_endpoint));
        };
        let _ep_active = ActiveGuard::new(&cluster.endpoints[ep].active);
        // A retryable status is retried only if a retry would be allowed
        // now; otherwise the upstream's own answer is relayed (rather than
        // discarded for a retry that would then be refused, which left the
        // client a 502), and the refusal is counted when it happens.
        let status_retry = attempt < policy.attempts && replay_ok && !policy.on_status.is_empty();
        let retry_refused = if !status_retry {
            None
        } else if !cluster.retry_under_breaker() {
            Some(&counters.retries_over_breaker)
        } else if !cluster.retry_allowed() {
            Some(&counters.retries_over_budget)
        } else {
            None
        };
        let retry_status = status_retry && retry_refused.is_none();
        let ctx = Attempt {
            worker,
            http,
            cluster,
            ep,
            req,
            policy,
            deadline,
            began: now,
            timeout,
            idle,
            retry_status,
            retry_refused,
        };
        if head.is_empty() {
            // A write of the head timed out and took the buffer with it.
            break;
        }
        client.note.attempt(attempt, now);
        match ctx.run(client, head).await {
            Ok(next) => return Ok(next),
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
                let allowed = condition.allowed(policy, replay_ok);
                tracing::debug!(cluster = %cluster.name, attempt, ?condition, %detail, allowed, "attempt failed");
                last = Some(Failure::Generated {
                    reason,
                    detail,
                    close: !bodiless,
                });
                if !allowed {
                    break;
                }
            }
        }
    }
    Err(last.unwrap_or_else(|| {
        // Out of time before any attempt could finish.
        Failure::Generated {
            reason: ErrorReason::UpstreamTimeout,
            detail: format!("no response from cluster {:?} in time", cluster.name),
            close: !bodiless,
        }
    }))
}

/// One attempt at one endpoint.
struct Attempt<'a> {
    worker: &'a Worker,
    http: &'a HttpListener,
    cluster: &'a ClusterState,
    ep: usize,
    req: &'a RequestHead,
    policy: &'a RetryPolicy,
    deadline: Instant,
    /// When this attempt began (its endpoint was picked): good enough for
    /// the pool's idle checks, so the checkout reads no clock of its own.
    began: Instant,
    /// The route timeout: for a request with a body, the time the final
    /// response head may take once the body was sent in full.
    timeout: Duration,
    idle: Duration,
    /// A retryable status may be retried (else it is relayed).
    retry_status: bool,
    /// The counter to bump when a retryable status is relayed because a
    /// breaker or the budget refuses the retry.
    retry_refused: Option<&'a std::cell::Cell<u64>>,
}

impl Attempt<'_> {
    fn until_deadline(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    fn timeout_failure(&self, close: bool) -> AttemptError {
        AttemptError::Final(Failure::Generated {
            reason: ErrorReason::UpstreamTimeout,
            detail: format!("no response from cluster {:?} in time", self.cluster.name),
            close,
        })
    }

    /// A pooled connection (None), or a new one and how long it took.
    async fn connect(&self) -> Result<(Stream, ConnToken, Option<Duration>), AttemptError> {
        let endpoint = &self.cluster.endpoints[self.ep];
        let counters = &self.worker.counters.http;
        if let Some((s, token)) = endpoint
            .pool
            .checkout(self.began, self.cluster.config.pool_idle_timeout)
        {
            metrics::add(&counters.pool_reuses, 1);
            return Ok((s, token, None));
        }
        let refused = self
            .cluster
            .pending_refused()
            .or_else(|| self.cluster.connections_refused());
        if let Some((reason, detail)) = refused {
            return Err(AttemptError::Final(Failure::Generated {
                reason,
                detail,
                close: false,
            }));
        }
        let _pending = ActiveGuard::new(&self.cluster.pending);
        let token = self.cluster.connection_token();
        metrics::add(&counters.upstream_connects, 1);
        let limit = self.cluster.connect_timeout.min(self.until_deadline());
        let failed = |detail: String| AttemptError::Retryable {
            condition: Condition::ConnectFailure,
            reason: ErrorReason::ConnectFailed,
            detail,
        };
        let started = Instant::now();
        match monoio::time::timeout(limit, TcpStream::connect_addr(endpoint.addr)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                let s = match &self.cluster.source.tls {
                    None => Stream::Plain(s),
                    Some(tls) => {
                        let counters = &self.worker.counters.tls;
                        let limit = self.cluster.connect_timeout.min(self.until_deadline());
                        self.worker
                            .tls
                            .connect(counters, tls, Alpn::Http1, s, limit)
                            .await
                            .map_err(failed)?
                            .0
                    }
                };
                let took = started.elapsed();
                histograms::record(&self.cluster.connect_histogram, took);
                Ok((s, token, Some(took)))
            }
            Ok(Err(e)) => Err(failed(format!("connect to {} failed: {e}", endpoint.addr))),
            Err(_) => Err(failed(format!("connect to {} timed out", endpoint.addr))),
        }
    }

    async fn run(&self, client: &mut Client, head: &mut Vec<u8>) -> Result<Next, AttemptError> {
        let (stream, token, opened) = self.connect().await?;
        client.note.connect = opened;
        let mut up = Upstream {
            stream,
            inbound: self.worker.buffers.take_inbound(),
            token,
        };
        let kind = RequestKind::of(self.req);
        let mut parser = ResponseParser::new(HeadLimits::default());
        parser.spare = self.worker.heads.take_parsed();
        let bodiless = matches!(self.req.body, RequestBody::Empty | RequestBody::Length(0));
        let result = match self.send_head(head, &mut up).await {
            Err(e) => Err(e),
            // Forwarded in full with its head: the route timeout runs from
            // the start of the attempts (it also bounds their connects).
            Ok(sent_at) if bodiless => {
                self.exchange(client, &mut up, sent_at, None, &mut parser, kind)
                    .await
            }
            Ok(sent_at) => {
                let (back, raced) = self.send_body_racing(client, up, &mut parser, kind).await;
                up = back;
                match raced {
                    Ok(raced) => {
                        self.exchange(client, &mut up, sent_at, Some(raced), &mut parser, kind)
                            .await
                    }
                    Err(e) => Err(e),
                }
            }
        };
        self.worker
            .heads
            .give_parsed(std::mem::take(&mut parser.spare));
        match result {
            Ok((next, reusable)) => {
                let Upstream {
                    stream,
                    inbound,
                    token,
                } = up;
                if let Next::Tunnel(_) = next {
                    unreachable!("tunnels return from exchange directly");
                }
                if reusable && inbound.is_empty() {
                    let max = self.cluster.config.max_idle_per_endpoint;
                    self.cluster.endpoints[self.ep].pool.checkin(
                        stream,
                        token,
                        Instant::now(),
                        max,
                    );
                }
                self.worker.buffers.give_inbound(inbound);
                Ok(next)
            }
            Err(Exit::Tunnel) => Ok(Next::Tunnel(up)),
            Err(Exit::Failed(e)) => {
                self.worker.buffers.give_inbound(up.inbound);
                Err(e)
            }
        }
    }

    /// Writes the re-serialized request head; returns when it was sent.
    async fn send_head(&self, head: &mut Vec<u8>, up: &mut Upstream) -> Result<Instant, Exit> {
        let (written, back) = up
            .inbound
            .write_all_on_timer(&mut up.stream, std::mem::take(head), self.idle)
            .await;
        *head = back;
        match written {
            Ok(()) => Ok(Instant::now()),
            Err(e) => Err(Exit::Failed(AttemptError::Retryable {
                condition: Condition::Reset,
                reason: ErrorReason::UpstreamReset,
                detail: format!("sending the request failed: {e}"),
            })),
        }
    }

    /// Sends the body while watching the upstream for an answer: an
    /// upstream may answer before it has read the whole body (a 413 or 401
    /// to an upload, RFC 9112 §9.5), and must not be left waiting for the
    /// rest while we wait for its answer. The `Upstream` is taken and given
    /// back because this splits its stream into a read and a write half.
    async fn send_body_racing(
        &self,
        client: &mut Client,
        up: Upstream,
        parser: &mut ResponseParser,
        kind: RequestKind,
    ) -> (Upstream, Result<Raced, Exit>) {
        let Upstream {
            stream,
            mut inbound,
            token,
        } = up;
        let (mut reader, mut writer) = stream.into_split();
        let raced = self
            .race_body(client, &mut reader, &mut writer, &mut inbound, parser, kind)
            .await;
        let stream = reader
            .reunite(writer)
            .unwrap_or_else(|_| unreachable!("the two halves of one stream"));
        (
            Upstream {
                stream,
                inbound,
                token,
            },
            raced,
        )
    }

    /// Reads response heads until the final one (a request forwarded with
    /// its head, no body), relaying interims, within the route deadline.
    async fn final_head(
        &self,
        client: &mut Client,
        up: &mut Upstream,
        parser: &mut ResponseParser,
        kind: RequestKind,
    ) -> Result<ResponseHead, Exit> {
        let mut interims = 0;
        loop {
            let wait = self.until_deadline();
            let resp = read_head_from(&mut up.stream, &mut up.inbound, parser, kind, wait)
                .await
                .map_err(|e| Exit::Failed(self.head_failure(e, false)))?;
            if !resp.is_interim() {
                return Ok(resp);
            }
            interims += 1;
            if interims > INTERIM_RESPONSES_MAX {
                return Err(Exit::Failed(
                    self.head_failure(HeadRead::TooManyInterims, false),
                ));
            }
            if resp.status != 100 || self.req.hop.expect_continue {
                self.relay_interim(client, &resp).await?;
            }
        }
    }

    /// The body phase: the body goes up (after a `100 Continue`, or
    /// [`EXPECT_CONTINUE_WAIT`], when the client expects one) while the
    /// upstream's response heads are read. Returns the final response
    /// head, the interim ones that came before it, and whether it came
    /// before the body was sent in full (sending then stopped).
    async fn race_body<R: AsyncReadRent, W: AsyncWriteRent>(
        &self,
        client: &mut Client,
        reader: &mut R,
        writer: &mut W,
        inbound: &mut Inbound,
        parser: &mut ResponseParser,
        kind: RequestKind,
    ) -> Result<Raced, Exit> {
        let go_ahead = crate::worker::gate::Trigger::default();
        let heads = heads_while_sending(reader, inbound, parser, kind, |r| {
            if r.status == 100 {
                go_ahead.fire();
            }
        });
        let body = async {
            if self.req.hop.expect_continue {
                let wait = EXPECT_CONTINUE_WAIT.min(self.until_deadline());
                let continued = monoio::select! {
                    _ = go_ahead.wait() => true,
                    _ = monoio::time::sleep(wait) => false,
                };
                if continued {
                    self.relay_continue(client).await?;
                }
            }
            self.send_body(client, writer).await
        };
        let (heads, body) = (std::pin::pin!(heads), std::pin::pin!(body));
        match futures_util::future::select(heads, body).await {
            Either::Left((Ok((resp, interims)), unsent)) => {
                // Both may have become ready in the same turn (the last
                // write completed, the upstream answered at once): select
                // polls the heads first, so give the body one more poll
                // before calling the answer early.
                use futures_util::FutureExt;
                if let Some(Ok(())) = unsent.now_or_never() {
                    return Ok(Raced {
                        response: resp,
                        interims,
                        early: false,
                    });
                }
                // Sending stops: the rest of the body is not wanted.
                metrics::add(&self.worker.counters.http.early_responses, 1);
                tracing::debug!(
                    status = resp.status,
                    "response before the request body was sent in full"
                );
                Ok(Raced {
                    response: resp,
                    interims,
                    early: true,
                })
            }
            Either::Left((Err(e), _)) => Err(Exit::Failed(self.head_failure(e, true))),
            Either::Right((Err(e), _)) => Err(e),
            Either::Right((Ok(()), heads)) => {
                // The request is forwarded in full: the route timeout
                // starts now (a long upload is not a slow upstream).
                match monoio::time::timeout(self.timeout, heads).await {
                    Ok(Ok((resp, interims))) => Ok(Raced {
                        response: resp,
                        interims,
                        early: false,
                    }),
                    Ok(Err(e)) => Err(Exit::Failed(self.head_failure(e, false))),
                    Err(_) => Err(Exit::Failed(self.timeout_failure(false))),
                }
            }
        }
    }

    /// The exchange proper, once the request went up. Ok((next, upstream
    /// reusable)).
    async fn exchange(
        &self,
        client: &mut Client,
        up: &mut Upstream,
        sent_at: Instant,
        raced: Option<Raced>,
        parser: &mut ResponseParser,
        kind: RequestKind,
    ) -> Result<(Next, bool), Exit> {
        let req = self.req;
        let idle = self.idle;
        let (resp, body_sent) = match raced {
            Some(raced) => {
                // Interims that came while the body went up: a 100 was
                // answered then (or not wanted); others go to the client
                // before the final response.
                for interim in raced.interims.iter().filter(|r| r.status != 100) {
                    self.relay_interim(client, interim).await?;
                }
                (raced.response, !raced.early)
            }
            None => (self.final_head(client, up, parser, kind).await?, true),
        };
        let now = Instant::now();
        let endpoint = &self.cluster.endpoints[self.ep];
        endpoint.latency.observe(now - sent_at, now);
        histograms::record(&self.cluster.first_byte_histogram, now - sent_at);
        let counters = &self.worker.counters.http;
        if resp.status >= 500 {
            if self.policy.on_status.contains(&resp.status) {
                if self.retry_status {
                    return Err(Exit::Failed(AttemptError::Retryable {
                        condition: Condition::Status,
                        reason: ErrorReason::UpstreamReset,
                        detail: format!("upstream answered {}", resp.status),
                    }));
                }
                if let Some(refused) = self.retry_refused {
                    metrics::add(refused, 1);
                }
            }
            self.cluster
                .record(self.ep, Outcome::Failure, now, counters);
        } else {
            self.cluster
                .record(self.ep, Outcome::Success, now, counters);
        }
        if resp.status == 101 && !req.hop.upgrade {
            return Err(Exit::Failed(AttemptError::Final(Failure::Generated {
                reason: ErrorReason::BadUpstreamResponse,
                detail: "101 Switching Protocols to a request that asked for no upgrade".into(),
                close: !body_sent,
            })));
        }
        let tunnel = resp.body == ResponseBody::Tunnel;
        let client_http11 = req.version == Version::Http11;
        let out_body = match resp.body {
            ResponseBody::None | ResponseBody::Tunnel => OutBody::None,
            ResponseBody::Length(n) => OutBody::Length(n),
            ResponseBody::Chunked => OutBody::Chunked,
            ResponseBody::UntilClose if client_http11 && req.hop.keep_alive => OutBody::Chunked,
            ResponseBody::UntilClose => OutBody::Close,
        };
        // A final answer before the request body was sent: the client may
        // still be sending it, so this connection ends after the response.
        // Draining, or a newer config generation took over: this response
        // says `connection: close`, so the client reconnects onto it.
        let client_keep = req.hop.keep_alive
            && body_sent
            && out_body != OutBody::Close
            && !tunnel
            && self.worker.keep_alive_ok();
        let mut out = self.worker.heads.take();
        write::response(&resp, out_body, client_keep, tunnel, &mut out);
        // Body bytes already read go out with the head, in one write:
        // copied behind it when few (or over TLS, where a vectored write
        // would cost a record and a syscall per part), else straight from
        // the read buffer in a vectored write.
        let mut body_left = match resp.body {
            ResponseBody::Length(n) => n,
            _ => 0,
        };
        let mut with_head = usize::try_from(body_left)
            .unwrap_or(usize::MAX)
            .min(up.inbound.data().len());
        let tls = client.stream.is_tls();
        let (written, out) = if tls || with_head <= INLINE_COPY_BYTES_MAX {
            if with_head > INLINE_BODY_BYTES_MAX {
                // TLS, a large body: the head alone, the body streamed.
                with_head = 0;
            }
            out.extend_from_slice(&up.inbound.data()[..with_head]);
            up.inbound.consume(with_head);
            write_all_within(&mut client.writes, &mut client.stream, out, self.idle).await
        } else {
            let (timer, stream) = (&mut client.writes, &mut client.stream);
            up.inbound
                .write_after(timer, stream, out, with_head, self.idle)
                .await
        };
        body_left -= with_head as u64;
        self.worker.heads.give(out);
        counters.response(resp.status);
        client.note.status = resp.status;
        client.note.upstream = Some(self.cluster.endpoints[self.ep].addr);
        client.note.first_byte = Some(now);
        client.note.response_bytes = match out_body {
            OutBody::None => Some(0),
            OutBody::Length(n) => Some(n),
            OutBody::Chunked | OutBody::Close => None,
        };
        if let Err(e) = written {
            return Err(Exit::Failed(AttemptError::Final(Failure::Cut(format!(
                "writing the response head: {e}"
            )))));
        }
        if tunnel {
            return Err(Exit::Tunnel);
        }
        let mut src = Source {
            inbound: &mut up.inbound,
            stream: &mut up.stream,
            side: Side::Upstream,
            pace: super::body::Pace::default(),
        };
        let mut scratch = Vec::new();
        let relayed = match resp.body {
            ResponseBody::None | ResponseBody::Tunnel => Ok(()),
            ResponseBody::Length(_) => {
                body::copy_length(&mut src, &mut client.stream, body_left, idle).await
            }
            ResponseBody::Chunked => {
                let policy = (None, Trailers::Response);
                body::copy_chunked(&mut src, &mut client.stream, &mut scratch, policy, idle)
                    .await
                    .map(|_| ())
            }
            ResponseBody::UntilClose => {
                let rechunk = out_body == OutBody::Chunked;
                body::copy_until_close(&mut src, &mut client.stream, &mut scratch, rechunk, idle)
                    .await
            }
        };
        if let Err(e) = relayed {
            if e.side() == Side::Upstream {
                self.cluster
                    .record(self.ep, Outcome::Failure, Instant::now(), counters);
            }
            return Err(Exit::Failed(AttemptError::Final(Failure::Cut(format!(
                "response body: {e:?}"
            )))));
        }
        // A HEAD answer that announced a length is not reused: an upstream
        // that wrongly sends the body anyway would leave it in the pooled
        // connection, where the next request would read it as its answer.
        let head_with_length =
            req.is_head() && resp.head.get("content-length").is_some_and(|v| v != b"0");
        let reusable = resp.hop.keep_alive
            && resp.version == Version::Http11
            && resp.body != ResponseBody::UntilClose
            && body_sent
            && !head_with_length;
        let next = if client_keep {
            Next::KeepAlive
        } else {
            Next::Close
        };
        parser.spare.recycle(resp.head);
        Ok((next, reusable))
    }

    /// Streams the request body from the client to the upstream.
    async fn send_body<W: AsyncWriteRent>(
        &self,
        client: &mut Client,
        up: &mut W,
    ) -> Result<(), Exit> {
        let mut src = super::request_source(client);
        let mut scratch = Vec::new();
        let sent = match self.req.body {
            RequestBody::Empty => Ok(()),
            RequestBody::Length(n) => body::copy_length(&mut src, up, n, self.idle).await,
            RequestBody::Chunked => body::copy_chunked(
                &mut src,
                up,
                &mut scratch,
                (
                    self.http.body_bytes_max,
                    Trailers::Request {
                        identity_header: &self.http.identity_header,
                    },
                ),
                self.idle,
            )
            .await
            .map(|_| ()),
        };
        sent.map_err(|e| {
            let failure = Failure::from_request_body(e);
            Exit::Failed(AttemptError::Final(failure))
        })
    }

    /// Tells an HTTP/1.1 client that expects it to send its body now.
    async fn relay_continue(&self, client: &mut Client) -> Result<(), Exit> {
        if self.req.version != Version::Http11 {
            return Ok(());
        }
        let mut out = self.worker.heads.take();
        out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
        let (written, out) =
            write_all_within(&mut client.writes, &mut client.stream, out, self.idle).await;
        self.worker.heads.give(out);
        self.worker.counters.http.response(100);
        written.map_err(|e| {
            Exit::Failed(AttemptError::Final(Failure::Cut(format!(
                "100 Continue: {e}"
            ))))
        })
    }

    /// Forwards an interim (1xx) response to an HTTP/1.1 client.
    async fn relay_interim(&self, client: &mut Client, resp: &ResponseHead) -> Result<(), Exit> {
        if self.req.version != Version::Http11 {
            return Ok(());
        }
        let mut out = self.worker.heads.take();
        write::response(resp, OutBody::None, true, false, &mut out);
        let (written, out) =
            write_all_within(&mut client.writes, &mut client.stream, out, self.idle).await;
        self.worker.heads.give(out);
        self.worker.counters.http.response(resp.status);
        written.map_err(|e| {
            Exit::Failed(AttemptError::Final(Failure::Cut(format!(
                "interim response: {e}"
            ))))
        })
    }

    fn head_failure(&self, e: HeadRead, client_body_pending: bool) -> AttemptError {
        head_failure(self.worker, self.cluster, self.ep, e, client_body_pending)
    }
}

/// Reads response heads until the final one while a request body goes up;
/// returns it with the interim ones before it (at most
/// [`INTERIM_RESPONSES_MAX`]), each also shown to `on_interim` as it
/// comes. No deadline of its own (a day is "none"): while the body goes
/// up, its reads and writes have idle timeouts, and once it was sent the
/// caller bounds the rest by the route timeout. A deadline here would cut
/// a healthy long upload.
pub(crate) async fn heads_while_sending<R: AsyncReadRent>(
    reader: &mut R,
    inbound: &mut Inbound,
    parser: &mut ResponseParser,
    kind: RequestKind,
    mut on_interim: impl FnMut(&ResponseHead),
) -> Result<(ResponseHead, Vec<ResponseHead>), HeadRead> {
    let mut interims = Vec::new();
    loop {
        let resp = read_head_from(
            reader,
            inbound,
            parser,
            kind,
            crate::config::limits::DURATION_MAX,
        )
        .await?;
        if !resp.is_interim() {
            return Ok((resp, interims));
        }
        if interims.len() >= INTERIM_RESPONSES_MAX {
            return Err(HeadRead::TooManyInterims);
        }
        on_interim(&resp);
        interims.push(resp);
    }
}

/// Reads one response head from `stream` into `inbound`, waiting at most
/// `wait`. A timeout drops the read in flight, so the connection is not
/// used again after one (every caller fails the attempt on it).
pub(crate) async fn read_head_from<R: AsyncReadRent>(
    stream: &mut R,
    inbound: &mut Inbound,
    parser: &mut ResponseParser,
    kind: RequestKind,
    wait: Duration,
) -> Result<ResponseHead, HeadRead> {
    let deadline = Instant::now() + wait;
    loop {
        if !inbound.is_empty() {
            match parser.parse(inbound.data(), kind) {
                Ok(Some((head, used))) => {
                    inbound.consume(used);
                    return Ok(head);
                }
                Ok(None) => {}
                Err(e) => return Err(HeadRead::Bad(e)),
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HeadRead::TimedOut);
        }
        let max = HeadLimits::default().head_bytes + 1;
        match inbound.fill(stream, max, left).await {
            Ok(0) => {
                return Err(HeadRead::Closed {
                    partial: !inbound.is_empty(),
                })
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Err(HeadRead::TimedOut),
            Err(e) if inbound.is_empty() => return Err(HeadRead::Reset(e)),
            Err(_) => return Err(HeadRead::Bad(HeadError::HeadTooLarge)),
        }
    }
}

#[derive(Debug)]
pub(crate) enum HeadRead {
    TimedOut,
    /// More interim (1xx) responses than [`INTERIM_RESPONSES_MAX`].
    TooManyInterims,
    Closed {
        partial: bool,
    },
    Reset(#[allow(dead_code)] std::io::Error),
    Bad(HeadError),
}

/// What the body phase read: the final response head, the interim ones
/// before it, and whether it came before the body was sent in full.
struct Raced {
    response: ResponseHead,
    interims: Vec<ResponseHead>,
    early: bool,
}

/// How an exchange ended when it did not simply finish.
enum Exit {
    Tunnel,
    Failed(AttemptError),
}
