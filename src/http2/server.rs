//! HTTP/2 on a listener: one task drives the connection (h2's accept
//! loop), one task per stream takes its request through routing,
//! authorization, fault injection and the pipeline, as HTTP/1.1 requests
//! go.
//!
//! What must hold: the connection advertises and enforces the limits in
//! [`super`] (streams, windows, header list, reset floods); a panic in a
//! stream's task ends that stream, never the worker; a drain, or a config
//! swap that changes this listener, ends the connection with a graceful
//! GOAWAY (h2 sends the two phases: first with the last possible id, then
//! with the last stream it took) and lets open streams finish; a swap that
//! keeps the listener as it was (an endpoint push) moves the connection to
//! the new generation instead ([`Worker::carried`]): its next streams are
//! served there, and the ones open finish where they started; a connection
//! with no stream for the listener's idle timeout is closed gracefully.

use std::{
    cell::Cell,
    future::poll_fn,
    io,
    panic::AssertUnwindSafe,
    rc::Rc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::FutureExt;
use h2::{server::SendResponse, RecvStream, SendStream};
use http::{HeaderMap, HeaderValue, StatusCode};

use super::{grpc, io::PollIo};
use crate::{
    config::{http::HttpListener, ListenerKind},
    http::{
        body::{BodyError, Side},
        exchange::Failure,
        pipeline::{self, BodyKind, Downstream, Origin, Request},
    },
    metrics::{self, ErrorReason},
    route::RequestView,
    tls::{counters::DecisionSlots, identity::SpiffeId, stream::Stream},
    worker::Worker,
};

/// Who is on the other end of an h2 connection.
pub struct Caller {
    pub ip: String,
    pub identity: Option<SpiffeId>,
    pub tls: bool,
    pub decisions: DecisionSlots,
    /// Overrides the listener's `cluster` (an intercepted connection's
    /// original destination picked it).
    pub cluster: Option<usize>,
}

/// Serves one HTTP/2 connection; `already` holds bytes read while
/// detecting the protocol (the start of the preface).
pub async fn serve(
    mut worker: Rc<Worker>,
    mut listener_index: usize,
    stream: Stream,
    already: Vec<u8>,
    caller: Caller,
    conn_id: u64,
) {
    let listener = &worker.config.listeners[listener_index];
    let ListenerKind::Http(http) = &listener.kind else {
        return;
    };
    metrics::add(&worker.counters.http.h2_connections, 1);
    let io = PollIo::new(stream, already);
    let mut builder = h2::server::Builder::new();
    builder
        .max_concurrent_streams(http.h2.max_concurrent_streams)
        .initial_window_size(http.h2.stream_window)
        .initial_connection_window_size(http.h2.connection_window)
        .max_header_list_size(super::HEADER_LIST_BYTES_MAX.min(http.limits.head_bytes as u32))
        .max_send_buffer_size(super::SEND_BUFFER_BYTES_MAX)
        .max_pending_accept_reset_streams(super::PENDING_ACCEPT_RESETS_MAX)
        .max_local_error_reset_streams(Some(super::LOCAL_ERROR_RESETS_MAX));
    let mut conn = match monoio::time::timeout(http.head_timeout, builder.handshake(io)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::debug!(conn_id, error = %e, "HTTP/2 handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(conn_id, "HTTP/2 preface not received in time");
            return;
        }
    };
    let caller = Rc::new(caller);
    let open = Rc::new(Cell::new(0usize));
    let resets = Rc::new(EarlyResets::default());
    let idle = listener.idle_timeout;
    let mut closing = false;
    loop {
        let next = if closing {
            conn.accept().await
        } else {
            let quiet = open.get() == 0;
            let woke = monoio::select! {
                n = conn.accept() => Wake::Next(n),
                _ = worker.retired.wait() => Wake::Retired,
                _ = monoio::time::sleep(idle), if quiet => Wake::Idle,
            };
            match woke {
                Wake::Next(n) => n,
                Wake::Retired => {
                    if let Some((next, index)) = worker.carried(listener_index) {
                        // The listener lives on unchanged: so does this
                        // connection, in the new generation.
                        metrics::add(&next.counters.connections_carried, 1);
                        worker = next;
                        listener_index = index;
                        continue;
                    }
                    conn.graceful_shutdown();
                    closing = true;
                    continue;
                }
                Wake::Idle => {
                    conn.graceful_shutdown();
                    closing = true;
                    continue;
                }
            }
        };
        match next {
            None => break,
            Some(Err(e)) if e.is_io() => {
                // The client went away (reset, closed mid-frame): not a
                // protocol error.
                tracing::debug!(conn_id, error = %e, "HTTP/2 client connection ended");
                break;
            }
            Some(Err(e)) => {
                // Protocol errors and the flood limits end here; h2 has
                // sent GOAWAY with the reason.
                metrics::add(&worker.counters.http.h2_connection_errors, 1);
                if e.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) {
                    metrics::add(&worker.counters.http.h2_enhance_your_calm, 1);
                }
                tracing::debug!(conn_id, error = %e, "HTTP/2 connection error");
                break;
            }
            Some(Ok((req, respond))) => {
                metrics::add(&worker.counters.http.h2_streams, 1);
                if !closing && resets.too_many() {
                    // Envoy's premature-reset rule: a client that cancels
                    // most of its streams after they went upstream makes
                    // us (and the upstream) work for nothing.
                    metrics::add(&worker.counters.http.h2_premature_reset_closes, 1);
                    tracing::debug!(
                        conn_id,
                        streams = resets.streams.get(),
                        resets = resets.early.get(),
                        "HTTP/2 client resets most of its streams early; closing"
                    );
                    conn.abrupt_shutdown(h2::Reason::ENHANCE_YOUR_CALM);
                    closing = true;
                    continue;
                }
                if !closing && !worker.keep_alive_ok() {
                    // Overload's first stage (near the connection cap or
                    // the memory ceiling; counted by keep_alive_ok): this
                    // stream is served, then GOAWAY turns the client over.
                    conn.graceful_shutdown();
                    closing = true;
                }
                open.set(open.get() + 1);
                // Boxed where it is made: the stream's future is several
                // KiB (the whole request pipeline), and unboxed it was
                // copied into the spawned block and again into the task.
                let task = Box::pin(stream_task(
                    Rc::clone(&worker),
                    listener_index,
                    Rc::clone(&caller),
                    req,
                    respond,
                    Rc::clone(&resets),
                ));
                let (counters, open) = (Rc::clone(&worker.counters), Rc::clone(&open));
                monoio::spawn(async move {
                    if AssertUnwindSafe(task).catch_unwind().await.is_err() {
                        metrics::add(&counters.task_panics, 1);
                        tracing::error!(conn_id, "HTTP/2 stream task panicked; stream reset");
                    }
                    open.set(open.get().saturating_sub(1));
                });
            }
        }
    }
    // Let h2 flush the GOAWAY (and whatever else it owes) before closing.
    let _ = monoio::time::timeout(Duration::from_secs(1), poll_fn(|cx| conn.poll_closed(cx))).await;
}

/// What woke a connection waiting for its next stream.
enum Wake<T> {
    Next(T),
    /// Its config generation retired (a swap or a drain).
    Retired,
    /// No stream for the idle timeout.
    Idle,
}

/// Streams a connection finished, and how many of them the client reset
/// before their response was complete.
#[derive(Default)]
struct EarlyResets {
    streams: Cell<u64>,
    early: Cell<u64>,
}

impl EarlyResets {
    /// At least [`super::PREMATURE_RESETS_STREAMS_MIN`] streams, more than
    /// half of them reset early.
    fn too_many(&self) -> bool {
        let (streams, early) = (self.streams.get(), self.early.get());
        streams >= super::PREMATURE_RESETS_STREAMS_MIN && early * 2 > streams
    }
}

/// Routing's view of an h2 request.
struct View<'a> {
    req: &'a Request,
    host: Option<&'a [u8]>,
    path: &'a [u8],
}

impl RequestView for View<'_> {
    fn method(&self) -> &[u8] {
        self.req.method.as_str().as_bytes()
    }

    fn host(&self) -> Option<&[u8]> {
        self.host.map(crate::route::route_host)
    }

    fn path(&self) -> &[u8] {
        self.path
    }

    fn header(&self, name: &str) -> Option<&[u8]> {
        self.req.headers.get(name).map(HeaderValue::as_bytes)
    }
}

use crate::http::Note;

/// The `grpc-status` in a header or trailer block, if any.
fn grpc_status(h: &HeaderMap) -> Option<u32> {
    std::str::from_utf8(h.get("grpc-status")?.as_bytes())
        .ok()?
        .parse()
        .ok()
}

/// The client side of one h2 stream.
struct H2Down {
    body: Option<RecvStream>,
    respond: SendResponse<Bytes>,
    send: Option<SendStream<Bytes>>,
    ended: bool,
    /// The client reset the stream before its response was complete.
    reset_by_client: bool,
    idle: Duration,
    note: Note,
    /// A `retry-after` for the generated answer (rate limits).
    retry_after: Option<u64>,
}

impl Downstream for H2Down {
    fn take_h2_body(&mut self) -> Option<RecvStream> {
        self.body.take()
    }

    async fn body_chunk(&mut self, idle: Duration) -> Result<Option<Bytes>, BodyError> {
        let Some(body) = self.body.as_mut() else {
            return Ok(None);
        };
        loop {
            return match monoio::time::timeout(idle, body.data()).await {
                Err(_) => Err(BodyError::Io(
                    Side::Downstream,
                    crate::http::inbound::timed_out(),
                )),
                Ok(None) => Ok(None),
                Ok(Some(Err(e))) => Err(BodyError::Io(Side::Downstream, io::Error::other(e))),
                // An empty DATA frame (often the one that ends the stream)
                // carries nothing to forward.
                Ok(Some(Ok(d))) if d.is_empty() => continue,
                Ok(Some(Ok(d))) => Ok(Some(d)),
            };
        }
    }

    fn release(&mut self, n: usize) {
        if let Some(body) = self.body.as_mut() {
            let _ = body.flow_control().release_capacity(n);
        }
    }

    async fn request_trailers(&mut self, idle: Duration) -> Result<Option<HeaderMap>, BodyError> {
        let Some(body) = self.body.as_mut() else {
            return Ok(None);
        };
        match monoio::time::timeout(idle, body.trailers()).await {
            Err(_) => Err(BodyError::Io(
                Side::Downstream,
                crate::http::inbound::timed_out(),
            )),
            Ok(Ok(t)) => Ok(t),
            Ok(Err(e)) => Err(BodyError::Io(Side::Downstream, io::Error::other(e))),
        }
    }

    async fn interim(&mut self, status: StatusCode, headers: HeaderMap) -> io::Result<bool> {
        // A 100 answers an HTTP/1.1 `Expect`, which h2 clients do not
        // send this way; others (103 Early Hints) are relayed.
        if status == StatusCode::CONTINUE {
            return Ok(false);
        }
        let mut resp = http::Response::new(());
        *resp.status_mut() = status;
        *resp.headers_mut() = headers;
        self.respond
            .send_informational(resp)
            .map(|()| true)
            .map_err(io::Error::other)
    }

    async fn respond(
        &mut self,
        status: StatusCode,
        headers: HeaderMap,
        body: BodyKind,
    ) -> io::Result<()> {
        let end = body == BodyKind::Empty;
        if end {
            // Trailers-only (gRPC): the status is in the headers.
            self.note.grpc_status = self.note.grpc_status.or(grpc_status(&headers));
        }
        let mut resp = http::Response::new(());
        *resp.status_mut() = status;
        *resp.headers_mut() = headers;
        let send = self.respond.send_response(resp, end).map_err(|e| {
            self.reset_by_client |= e.is_reset() && e.is_remote();
            io::Error::other(e)
        })?;
        self.ended = end;
        self.send = Some(send);
        Ok(())
    }

    async fn data(&mut self, data: Bytes) -> io::Result<()> {
        let Some(send) = self.send.as_mut() else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        if self.ended {
            // A body where the head said none (HEAD): dropped.
            return Ok(());
        }
        pipeline::send_h2_data(send, data, false, self.idle).await
    }

    async fn finish(&mut self, trailers: Option<HeaderMap>) -> io::Result<()> {
        let Some(send) = self.send.as_mut() else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        if std::mem::replace(&mut self.ended, true) {
            return Ok(());
        }
        if let Some(code) = trailers.as_ref().and_then(grpc_status) {
            self.note.grpc_status = Some(code);
        }
        match trailers {
            Some(t) => send.send_trailers(t),
            None => send.send_data(Bytes::new(), true),
        }
        .map_err(io::Error::other)
    }

    async fn cancelled(&mut self) -> h2::Reason {
        let reset = match self.send.as_mut() {
            Some(send) => poll_fn(|cx| send.poll_reset(cx)).await,
            None => poll_fn(|cx| self.respond.poll_reset(cx)).await,
        };
        self.reset_by_client = true;
        reset.unwrap_or(h2::Reason::CANCEL)
    }

    fn reset(&mut self, reason: h2::Reason) {
        self.ended = true;
        match self.send.as_mut() {
            Some(send) => send.send_reset(reason),
            None => self.respond.send_reset(reason),
        }
    }

    fn note(&mut self) -> &mut Note {
        &mut self.note
    }
}

/// One stream: from request head to the end of its response.
async fn stream_task(
    worker: Rc<Worker>,
    listener_index: usize,
    caller: Rc<Caller>,
    req: http::Request<RecvStream>,
    respond: SendResponse<Bytes>,
    resets: Rc<EarlyResets>,
) {
    let listener = &worker.config.listeners[listener_index];
    let ListenerKind::Http(http) = &listener.kind else {
        return;
    };
    metrics::add(&worker.counters.http.requests, 1);
    let started = Instant::now();
    let (parts, body) = req.into_parts();
    let mut down = H2Down {
        body: Some(body),
        respond,
        send: None,
        ended: false,
        reset_by_client: false,
        idle: listener.idle_timeout,
        note: Note::default(),
        retry_after: None,
    };
    let target = parts
        .uri
        .path_and_query()
        .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
    let method = parts.method.to_string();
    down.note.trace = worker.config.tracing.as_ref().map(|t| {
        crate::trace::Sampler::new(t.sample_rate, t.inject).hop(&worker.rng, |name| {
            parts.headers.get(name).map(HeaderValue::as_bytes)
        })
    });
    // Copied only while a tap may want it or the trace is sampled.
    let tapped = worker.taps.active()
        && worker.taps.may_want(
            &listener.name,
            method.as_bytes(),
            target.as_bytes(),
            parts.uri.authority().map(|a| a.as_str().as_bytes()),
        );
    let sampled = down.note.trace.is_some_and(|t| t.sampled);
    let copied = (tapped || sampled).then(|| {
        let authority = parts.uri.authority().map(|a| a.as_str().to_string());
        let length = crate::http2::headers::content_length(&parts.headers);
        (authority, length)
    });
    let mut route = None;
    handle(
        &worker,
        listener_index,
        http,
        &caller,
        parts,
        &mut down,
        &mut route,
    )
    .await;
    if let Some(code) = down.note.grpc_status {
        worker.counters.http.grpc_response(code);
    }
    resets.streams.set(resets.streams.get() + 1);
    if down.reset_by_client {
        resets.early.set(resets.early.get() + 1);
    }
    let ended = Instant::now();
    let took = ended - started;
    worker.histograms.listener(listener_index, took);
    if let Some(r) = route {
        worker.histograms.route(listener_index, r, took);
    }
    // One set of labels for the golden metrics, the taps and the span.
    let labels = crate::metrics::golden::LabelsRef::of(
        &worker.config,
        listener_index,
        route.map(|r| http.routes[r].name.as_str()),
        down.note.cluster,
        caller.tls,
        caller.identity.as_ref().map(|i| i.as_str()),
    );
    if let Some((authority, request_bytes)) = copied {
        crate::http::finished(
            &worker,
            tapped,
            &crate::metrics::tap::Request {
                labels,
                client: &caller.ip,
                method: &method,
                authority: authority.as_deref(),
                target: &target,
                version: "HTTP/2.0",
                request_bytes,
                started,
                ended,
                note: &down.note,
            },
        );
    }
    if let Some(log) = listener.access_log.as_ref() {
        let line = crate::access_log::Line {
            time: crate::access_log::now(),
            worker: worker.id,
            listener: &listener.name,
            route: route.map(|r| http.routes[r].name.as_str()),
            client: &caller.ip,
            peer_identity: caller.identity.as_ref().map(|i| i.as_str()),
            tls: caller.tls,
            method: &method,
            target: &target,
            version: "HTTP/2.0",
            status: down.note.status,
            duration_us: took.as_micros() as u64,
            upstream: down.note.upstream,
            error: down.note.error,
            blame: down.note.blame.map(crate::metrics::Blame::name),
            grpc_status: down.note.grpc_status,
            trace_id: down.note.trace.map(|t| crate::trace::hex(&t.trace_id)),
            span_id: down.note.trace.map(|t| crate::trace::hex(&t.span_id)),
        };
        worker.access_log.record(&worker.counters, log, &line);
    }
    worker
        .counters
        .golden
        .http(labels, down.note.status, down.note.grpc_status, took);
}

/// Builds the version-independent request, routes it and forwards it;
/// answers itself when it cannot.
async fn handle(
    worker: &Worker,
    listener_index: usize,
    http: &HttpListener,
    caller: &Caller,
    parts: http::request::Parts,
    down: &mut H2Down,
    route_out: &mut Option<usize>,
) {
    let listener = &worker.config.listeners[listener_index];
    let grpc = grpc::is_grpc(parts.headers.get("content-type").map(HeaderValue::as_bytes));
    let refuse = |reason: ErrorReason, detail: String| (reason, detail);
    let built = request(worker, http, parts, down.body.as_ref());
    let (req, path) = match built {
        Ok(r) => r,
        Err((reason, detail)) => return generated(worker, down, grpc, reason, &detail).await,
    };
    let authority = req.uri.authority().map(|a| a.as_str().as_bytes().to_vec());
    let view = View {
        req: &req,
        host: authority.as_deref(),
        path: &path,
    };
    let route_index = crate::route::select(&http.routes, &view);
    *route_out = route_index;
    let route = route_index.map(|i| &http.routes[i]);
    if let Some(why) = worker.refuse_for_memory() {
        return generated(worker, down, grpc, ErrorReason::Overload, why).await;
    }
    let denied = crate::http::authorize(
        worker,
        listener,
        route,
        caller.identity.as_ref(),
        &caller.decisions,
    );
    if let Some(denied) = denied {
        let (reason, detail) = refuse(ErrorReason::Forbidden, denied);
        return generated(worker, down, grpc, reason, &detail).await;
    }
    let id = caller.identity.as_ref().map(|i| i.as_str());
    if let Err(limited) = worker
        .limits
        .check(listener_index, route_index, id, Instant::now())
    {
        down.retry_after = Some(limited.retry_after);
        let detail = limited.to_string();
        return generated(worker, down, grpc, ErrorReason::RateLimited, &detail).await;
    }
    if let Some(fault) = route.and_then(|r| r.fault.as_ref()) {
        if let Some(status) =
            crate::http::inject(worker, fault, |h| req.headers.contains_key(h)).await
        {
            metrics::add(&worker.counters.http.faults_aborted, 1);
            let what = Answer {
                status,
                grpc_code: grpc::code_for_http(status),
                name: "fault_injected",
                blame: None,
            };
            let detail = "injected by this route's fault settings";
            return answer(worker, down, grpc, what, detail).await;
        }
    }
    let cluster = match (route, caller.cluster.or(http.default_cluster)) {
        (Some(r), _) => crate::route::pick_weighted(&r.clusters, &worker.rng),
        (None, Some(c)) => c,
        (None, None) => {
            return generated(
                worker,
                down,
                grpc,
                ErrorReason::NoRoute,
                "no route matches this request",
            )
            .await
        }
    };
    down.note.cluster = Some(cluster);
    let origin = Origin {
        client_ip: &caller.ip,
        tls: caller.tls,
        identity: caller.identity.as_ref().map(|i| i.as_str()),
    };
    let idle = listener.idle_timeout;
    let forwarded = pipeline::forward(worker, http, route, cluster, &origin, req, down, idle).await;
    let answered = match forwarded {
        Ok(()) => true,
        Err(Failure::Generated { reason, detail, .. }) => {
            if down.send.is_none() {
                generated(worker, down, grpc, reason, &detail).await;
                true
            } else {
                down.reset(h2::Reason::INTERNAL_ERROR);
                false
            }
        }
        Err(Failure::Cut(why)) => {
            metrics::add(&worker.counters.http.responses_cut, 1);
            tracing::debug!(%why, "HTTP/2 response cut off");
            if !down.ended {
                down.reset(h2::Reason::INTERNAL_ERROR);
            }
            false
        }
    };
    if answered && !down.reset_by_client {
        if let Some(body) = down.body.as_mut() {
            linger(body).await;
        }
    }
}

/// After a complete response to a request whose body is still coming (an
/// upstream, or the proxy, answered before reading it all): reads and discards the
/// rest, for at most [`crate::http::LINGER_TIME`] and
/// [`crate::http::LINGER_BYTES_MAX`], so the stream ends as the client
/// expects. Dropped unread, h2 resets it (RST_STREAM NO_ERROR, which RFC
/// 9113 §8.1 allows but curl 7.88 reports as an error): the HTTP/2 form of
/// the lingering close HTTP/1.1 connections get.
async fn linger(body: &mut RecvStream) {
    let deadline = Instant::now() + crate::http::LINGER_TIME;
    let mut left = crate::http::LINGER_BYTES_MAX;
    while !body.is_end_stream() {
        let wait = deadline.saturating_duration_since(Instant::now());
        match monoio::time::timeout(wait, body.data()).await {
            Ok(Some(Ok(data))) if data.len() <= left => {
                left -= data.len();
                let _ = body.flow_control().release_capacity(data.len());
            }
            _ => return,
        }
    }
}

type Refusal = (ErrorReason, String);

/// The pipeline's request from an h2 request head: authority checked,
/// path normalized. Also returns the normalized path (for routing).
fn request(
    worker: &Worker,
    http: &HttpListener,
    parts: http::request::Parts,
    body: Option<&RecvStream>,
) -> Result<(Request, Vec<u8>), Refusal> {
    let bad = |detail: &str| (ErrorReason::BadRequest, detail.to_string());
    let host = parts
        .headers
        .get(http::header::HOST)
        .map(HeaderValue::as_bytes);
    let authority = parts.uri.authority().map(|a| a.as_str().as_bytes());
    // RFC 9113 §8.3.1: a Host that names another entity than :authority
    // makes the request malformed; routing must not pick one of the two.
    if let (Some(h), Some(a)) = (host, authority) {
        if !h.eq_ignore_ascii_case(a) {
            return Err(bad("Host and :authority disagree"));
        }
    }
    let Some(authority) = authority.or(host).map(<[u8]>::to_vec) else {
        return Err(bad("request without :authority or Host"));
    };
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let split = target.find('?').unwrap_or(target.len());
    let (raw_path, query) = target.split_at(split);
    let path = match crate::route::path::normalize(raw_path.as_bytes(), http.paths) {
        Ok(None) => raw_path.as_bytes().to_vec(),
        Ok(Some(normal)) => {
            metrics::add(&worker.counters.http.paths_normalized, 1);
            normal
        }
        Err(e) => return Err((ErrorReason::BadPath, e.to_string())),
    };
    let mut uri = Vec::with_capacity(8 + authority.len() + target.len());
    uri.extend_from_slice(b"http://");
    uri.extend_from_slice(&authority);
    uri.extend_from_slice(&path);
    uri.extend_from_slice(query.as_bytes());
    let uri = http::Uri::try_from(uri).map_err(|_| bad("request target"))?;
    let body_kind = match body {
        Some(b) if b.is_end_stream() => BodyKind::Empty,
        None => BodyKind::Empty,
        Some(_) => super::headers::content_length(&parts.headers)
            .map_or(BodyKind::Streamed, BodyKind::Length),
    };
    if let (BodyKind::Length(n), Some(max)) = (body_kind, http.body_bytes_max) {
        if n > max {
            return Err((
                ErrorReason::BodyTooLarge,
                format!("request body of {n} bytes exceeds the limit of {max}"),
            ));
        }
    }
    let grpc = grpc::is_grpc(parts.headers.get("content-type").map(HeaderValue::as_bytes));
    let grpc_timeout = parts
        .headers
        .get("grpc-timeout")
        .and_then(|v| grpc::parse_timeout(v.as_bytes()));
    let mut headers = parts.headers;
    headers.remove(http::header::HOST);
    Ok((
        Request {
            method: parts.method,
            uri,
            headers,
            body: body_kind,
            grpc,
            grpc_timeout,
        },
        path,
    ))
}

/// Answers with a generated response for `reason` (counted).
async fn generated(
    worker: &Worker,
    down: &mut H2Down,
    grpc: bool,
    reason: ErrorReason,
    detail: &str,
) {
    worker.counters.generated(reason, detail);
    let what = Answer {
        status: reason.status(),
        grpc_code: reason.grpc_code(),
        name: reason.name(),
        blame: Some(reason.blame()),
    };
    answer(worker, down, grpc, what, detail).await;
}

/// What a generated answer says: the HTTP status (or, to gRPC callers,
/// the gRPC status), the `x-pilotfish-error` name and who was to blame.
struct Answer {
    status: u16,
    grpc_code: u32,
    name: &'static str,
    /// None for a fault the route injected on purpose.
    blame: Option<crate::metrics::Blame>,
}

/// Writes a generated answer: for gRPC callers HTTP 200 with the status
/// in `grpc-status` (trailers-only), else the status with a text body.
async fn answer(worker: &Worker, down: &mut H2Down, grpc: bool, what: Answer, detail: &str) {
    let Answer {
        status,
        grpc_code,
        name,
        blame,
    } = what;
    down.note.error = Some(name);
    down.note.blame = blame;
    let mut headers = HeaderMap::new();
    headers.insert("x-pilotfish-error", HeaderValue::from_static(name));
    if let Some(secs) = down.retry_after.take() {
        headers.insert("retry-after", HeaderValue::from(secs));
    }
    let http_status = if grpc { 200 } else { status };
    down.note.status = http_status;
    worker.counters.http.response(http_status);
    let code = StatusCode::from_u16(http_status).unwrap_or(StatusCode::BAD_GATEWAY);
    if grpc {
        headers.insert("content-type", HeaderValue::from_static("application/grpc"));
        headers.insert("grpc-status", HeaderValue::from(grpc_code));
        if let Ok(v) = HeaderValue::from_str(&grpc::encode_message(detail)) {
            headers.insert("grpc-message", v);
        }
        let _ = down.respond(code, headers, BodyKind::Empty).await;
        return;
    }
    headers.insert(
        "content-type",
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    let text = Bytes::from(format!("{detail}\n"));
    headers.insert("content-length", HeaderValue::from(text.len()));
    if down
        .respond(code, headers, BodyKind::Length(text.len() as u64))
        .await
        .is_ok()
        && down.data(text).await.is_ok()
    {
        let _ = down.finish(None).await;
    }
}
