//! Per-worker counters and their snapshots.
//!
//! What must hold: a worker's counters are plain `Cell`s owned by that worker
//! (no atomics, no sharing); other threads only ever see a [`Snapshot`]
//! copied out on request through the worker's mailbox, and merge snapshots
//! themselves.

pub mod golden;
pub mod histograms;
pub mod tap;

use std::cell::Cell;

use serde::Serialize;

/// Counters of one worker. Only that worker's thread touches them.
#[derive(Debug, Default)]
pub struct Counters {
    pub connections_accepted: Cell<u64>,
    pub connections_active: Cell<u64>,
    /// Client connections closed because no upstream connect succeeded.
    pub connections_unrouted: Cell<u64>,
    pub bytes_downstream_to_upstream: Cell<u64>,
    pub bytes_upstream_to_downstream: Cell<u64>,
    /// Failed connect attempts (refused, unreachable, timed out).
    pub connect_failures: Cell<u64>,
    /// The subset of `connect_failures` that hit the connect timeout.
    pub connect_timeouts: Cell<u64>,
    pub idle_timeouts: Cell<u64>,
    /// Connections cut when the drain timeout ran out.
    pub drain_cut: Cell<u64>,
    pub accept_errors: Cell<u64>,
    /// Connection tasks that panicked; the worker kept serving.
    pub task_panics: Cell<u64>,
    /// Access log lines written, and dropped because the writer fell behind.
    pub access_log_lines: Cell<u64>,
    pub access_log_dropped: Cell<u64>,
    /// Spans recorded (sampled hops), and dropped because the exporter's
    /// queue was full (the collector slow or down).
    pub trace_spans: Cell<u64>,
    pub trace_spans_dropped: Cell<u64>,
    /// Idle keep-alive connections closed at the connection cap to admit a new one.
    pub connections_evicted_idle: Cell<u64>,
    /// Times a quiet keep-alive connection parked: gave back its buffer
    /// and request state to wait for readiness alone.
    pub connections_parked: Cell<u64>,
    /// HTTP/1.1 keep-alive connections moved to a newer config generation
    /// that kept their listener unchanged (instead of being closed).
    pub connections_carried: Cell<u64>,
    /// Connections refused at the cap with no idle connection to close (503 or closed at once).
    pub connections_refused_overload: Cell<u64>,
    /// Responses sent with `connection: close` because the worker was near
    /// its connection cap (the first overload stage).
    pub overload_keep_alive_off: Cell<u64>,
    /// Times an accept loop paused at memory overload stage 3.
    pub overload_accept_paused: Cell<u64>,
    pub http: HttpCounters,
    pub tls: crate::tls::counters::TlsCounters,
    pub intercept: crate::intercept::Counters,
    /// Requests and connections by mesh labels (not in [`Snapshot`]:
    /// reported beside it, see [`golden`]).
    pub golden: golden::Golden,
    /// Paces the log lines of generated responses ([`log_generated`]).
    pub generated_log: LogPace,
}

impl Counters {
    /// A response the proxy generated: counted by reason, and logged at
    /// the level its blame calls for ([`log_generated`]).
    pub fn generated(&self, reason: ErrorReason, detail: &str) {
        self.http.generated(reason);
        log_generated(self, reason, detail);
    }
}

/// Log lines of generated responses per reason and worker: at most one
/// per [`LOG_PACE`]; the ones left out are counted in the next. An outage
/// upstream at thousands of requests a second must not become thousands
/// of log lines (the counters have every one).
pub const LOG_PACE: std::time::Duration = std::time::Duration::from_secs(1);

/// See [`LOG_PACE`].
#[derive(Debug, Default)]
pub struct LogPace {
    last: [Cell<Option<std::time::Instant>>; ErrorReason::ALL.len()],
    left_out: [Cell<u64>; ErrorReason::ALL.len()],
}

/// Logs a generated response at the level its [`Blame`] calls for: a
/// client's mistake at debug (it is the client's to see, in the answer),
/// an upstream's failure at info, the proxy's own overload at warn;
/// paced by [`LogPace`].
fn log_generated(counters: &Counters, reason: ErrorReason, detail: &str) {
    let pace = &counters.generated_log;
    let i = reason.index();
    let now = std::time::Instant::now();
    if pace.last[i].get().is_some_and(|t| now - t < LOG_PACE) {
        add(&pace.left_out[i], 1);
        return;
    }
    pace.last[i].set(Some(now));
    let left_out = pace.left_out[i].replace(0);
    let blame = reason.blame();
    let (reason, who) = (reason.name(), blame.name());
    match blame {
        Blame::Internal => {
            tracing::warn!(reason, blame = who, detail, left_out, "generated response")
        }
        Blame::Upstream => {
            tracing::info!(reason, blame = who, detail, left_out, "generated response")
        }
        Blame::Downstream => {
            tracing::debug!(reason, blame = who, detail, left_out, "generated response")
        }
    }
}

/// Which side caused a failure. It follows from the [`ErrorReason`], as
/// the status does, and decides what the failure comes to: only an
/// upstream's failure may be retried, the `blame` label on the generated
/// responses metric and in the access log, and the log level
/// ([`log_generated`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The client sent something wrong, not allowed or not supported (4xx,
    /// 501, 505).
    Downstream,
    /// An endpoint or the cluster failed, or is saturated (502, 503, 504).
    Upstream,
    /// The proxy's own limits (overload).
    Internal,
}

impl Blame {
    pub fn name(self) -> &'static str {
        match self {
            Blame::Downstream => "downstream",
            Blame::Upstream => "upstream",
            Blame::Internal => "internal",
        }
    }
}

/// Why the proxy generated a response itself. Each is counted, and named
/// in the response's `x-pilotfish-error` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorReason {
    BadRequest,
    HeadTooLarge,
    UriTooLong,
    BodyTooLarge,
    NoRoute,
    NoHealthyEndpoint,
    ConnectFailed,
    UpstreamReset,
    BadUpstreamResponse,
    UpstreamTimeout,
    UnsupportedVersion,
    NotImplemented,
    /// The caller's identity is not on the listener's or route's allow-list.
    Forbidden,
    /// The path cannot be normalized (bad escape, encoded slash).
    BadPath,
    /// A request head was started and not finished in time.
    RequestTimeout,
    /// At the connection cap with no idle connection to close for it.
    Overload,
    /// The cluster's `max_requests` circuit breaker is at its cap.
    CircuitBreakerMaxRequests,
    /// The cluster's `max_connections` breaker: a new connection was
    /// needed and the cluster has that many open.
    CircuitBreakerMaxConnections,
    /// The cluster's `max_pending` breaker: that many requests already
    /// wait for a new connection.
    CircuitBreakerMaxPending,
    /// A listener's or route's local rate limit has no token left.
    RateLimited,
}

impl ErrorReason {
    pub const ALL: [ErrorReason; 20] = [
        ErrorReason::BadRequest,
        ErrorReason::HeadTooLarge,
        ErrorReason::UriTooLong,
        ErrorReason::BodyTooLarge,
        ErrorReason::NoRoute,
        ErrorReason::NoHealthyEndpoint,
        ErrorReason::ConnectFailed,
        ErrorReason::UpstreamReset,
        ErrorReason::BadUpstreamResponse,
        ErrorReason::UpstreamTimeout,
        ErrorReason::UnsupportedVersion,
        ErrorReason::NotImplemented,
        ErrorReason::Forbidden,
        ErrorReason::BadPath,
        ErrorReason::RequestTimeout,
        ErrorReason::Overload,
        ErrorReason::CircuitBreakerMaxRequests,
        ErrorReason::CircuitBreakerMaxConnections,
        ErrorReason::CircuitBreakerMaxPending,
        ErrorReason::RateLimited,
    ];

    pub fn status(self) -> u16 {
        match self {
            ErrorReason::BadRequest | ErrorReason::BadPath => 400,
            ErrorReason::RequestTimeout => 408,
            ErrorReason::Forbidden => 403,
            ErrorReason::RateLimited => 429,
            ErrorReason::NoRoute => 404,
            ErrorReason::BodyTooLarge => 413,
            ErrorReason::UriTooLong => 414,
            ErrorReason::HeadTooLarge => 431,
            ErrorReason::NotImplemented => 501,
            ErrorReason::UpstreamReset | ErrorReason::BadUpstreamResponse => 502,
            ErrorReason::NoHealthyEndpoint
            | ErrorReason::ConnectFailed
            | ErrorReason::Overload
            | ErrorReason::CircuitBreakerMaxRequests
            | ErrorReason::CircuitBreakerMaxConnections
            | ErrorReason::CircuitBreakerMaxPending => 503,
            ErrorReason::UpstreamTimeout => 504,
            ErrorReason::UnsupportedVersion => 505,
        }
    }

    /// Who caused it (see [`Blame`]).
    pub fn blame(self) -> Blame {
        match self {
            ErrorReason::BadRequest
            | ErrorReason::HeadTooLarge
            | ErrorReason::UriTooLong
            | ErrorReason::BodyTooLarge
            | ErrorReason::NoRoute
            | ErrorReason::UnsupportedVersion
            | ErrorReason::NotImplemented
            | ErrorReason::Forbidden
            | ErrorReason::BadPath
            | ErrorReason::RequestTimeout
            | ErrorReason::RateLimited => Blame::Downstream,
            ErrorReason::NoHealthyEndpoint
            | ErrorReason::ConnectFailed
            | ErrorReason::UpstreamReset
            | ErrorReason::BadUpstreamResponse
            | ErrorReason::UpstreamTimeout
            | ErrorReason::CircuitBreakerMaxRequests
            | ErrorReason::CircuitBreakerMaxConnections
            | ErrorReason::CircuitBreakerMaxPending => Blame::Upstream,
            ErrorReason::Overload => Blame::Internal,
        }
    }

    /// The gRPC status a gRPC caller gets for it: gRPC's HTTP-to-status
    /// table, except where the reason says more than the HTTP status.
    pub fn grpc_code(self) -> u32 {
        use crate::http2::grpc;
        match self {
            ErrorReason::UpstreamTimeout => grpc::DEADLINE_EXCEEDED,
            ErrorReason::RateLimited => grpc::RESOURCE_EXHAUSTED,
            other => grpc::code_for_http(other.status()),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ErrorReason::BadRequest => "bad_request",
            ErrorReason::HeadTooLarge => "head_too_large",
            ErrorReason::UriTooLong => "uri_too_long",
            ErrorReason::BodyTooLarge => "body_too_large",
            ErrorReason::NoRoute => "no_route",
            ErrorReason::NoHealthyEndpoint => "no_healthy_endpoint",
            ErrorReason::ConnectFailed => "upstream_connect_failed",
            ErrorReason::UpstreamReset => "upstream_reset",
            ErrorReason::BadUpstreamResponse => "bad_upstream_response",
            ErrorReason::UpstreamTimeout => "upstream_timeout",
            ErrorReason::UnsupportedVersion => "unsupported_http_version",
            ErrorReason::NotImplemented => "not_implemented",
            ErrorReason::Forbidden => "forbidden",
            ErrorReason::BadPath => "bad_path",
            ErrorReason::RequestTimeout => "request_timeout",
            ErrorReason::Overload => "overload",
            ErrorReason::CircuitBreakerMaxRequests => "circuit_breaker_max_requests",
            ErrorReason::CircuitBreakerMaxConnections => "circuit_breaker_max_connections",
            ErrorReason::CircuitBreakerMaxPending => "circuit_breaker_max_pending",
            ErrorReason::RateLimited => "rate_limited",
        }
    }

    fn index(self) -> usize {
        ErrorReason::ALL
            .iter()
            .position(|r| *r == self)
            .unwrap_or(0)
    }
}

/// gRPC status codes (OK = 0 through UNAUTHENTICATED = 16).
pub const GRPC_CODES: usize = 17;

/// HTTP counters of one worker.
#[derive(Debug, Default)]
pub struct HttpCounters {
    pub requests: Cell<u64>,
    /// Responses sent to clients by status class: 1xx (interim), 2xx ... 5xx.
    pub responses_by_class: [Cell<u64>; 5],
    /// gRPC responses by `grpc-status` (0..=16; anything else counts as
    /// 2, UNKNOWN), whether the upstream or the proxy answered.
    pub grpc_responses: [Cell<u64>; GRPC_CODES],
    /// Responses the proxy generated itself, by [`ErrorReason`].
    pub generated: [Cell<u64>; ErrorReason::ALL.len()],
    pub retries: Cell<u64>,
    /// Retries refused because the cluster's retry budget was spent.
    pub retries_over_budget: Cell<u64>,
    pub upstream_connects: Cell<u64>,
    pub pool_reuses: Cell<u64>,
    pub ejections: Cell<u64>,
    pub health_checks_ok: Cell<u64>,
    pub health_checks_failed: Cell<u64>,
    /// Responses cut off midway (connection closed, never completed).
    pub responses_cut: Cell<u64>,
    /// Requests whose path normalization rewrote (forwarded in normal form).
    pub paths_normalized: Cell<u64>,
    /// Responses that arrived before the request body was sent in full (sending stopped).
    pub early_responses: Cell<u64>,
    /// Retries not attempted because the cluster's max_retries breaker was at its cap.
    pub retries_over_breaker: Cell<u64>,
    /// Requests answered by a route's fault injection (not forwarded).
    pub faults_aborted: Cell<u64>,
    /// Requests delayed by a route's fault injection.
    pub faults_delayed: Cell<u64>,
    /// HTTP/2 client connections served, and streams (requests) on them.
    pub h2_connections: Cell<u64>,
    pub h2_streams: Cell<u64>,
    /// HTTP/2 client connections ended by a protocol error or an abuse
    /// limit (GOAWAY sent by h2 with the reason).
    pub h2_connection_errors: Cell<u64>,
    /// The subset ended with ENHANCE_YOUR_CALM by h2's abuse limits
    /// (rapid reset, CONTINUATION and empty-frame floods, header lists).
    pub h2_enhance_your_calm: Cell<u64>,
    /// Connections closed by the premature-reset rule.
    pub h2_premature_reset_closes: Cell<u64>,
}

impl HttpCounters {
    pub fn response(&self, status: u16) {
        if let Some(c) = self
            .responses_by_class
            .get(usize::from(status / 100).wrapping_sub(1))
        {
            add(c, 1);
        }
    }

    pub fn generated(&self, reason: ErrorReason) {
        add(&self.generated[reason.index()], 1);
    }

    pub fn grpc_response(&self, code: u32) {
        let i = usize::try_from(code)
            .ok()
            .filter(|&c| c < GRPC_CODES)
            .unwrap_or(2);
        add(&self.grpc_responses[i], 1);
    }
}

/// A copy of one worker's HTTP counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HttpSnapshot {
    pub requests: u64,
    pub responses_by_class: [u64; 5],
    pub grpc_responses: [u64; GRPC_CODES],
    /// (reason, count) for every reason, in [`ErrorReason::ALL`] order.
    pub generated: Vec<(&'static str, u64)>,
    pub retries: u64,
    pub retries_over_budget: u64,
    pub upstream_connects: u64,
    pub pool_reuses: u64,
    pub ejections: u64,
    pub health_checks_ok: u64,
    pub health_checks_failed: u64,
    pub responses_cut: u64,
    pub paths_normalized: u64,
    pub early_responses: u64,
    pub retries_over_breaker: u64,
    pub faults_aborted: u64,
    pub faults_delayed: u64,
    pub h2_connections: u64,
    pub h2_streams: u64,
    pub h2_connection_errors: u64,
    pub h2_enhance_your_calm: u64,
    pub h2_premature_reset_closes: u64,
}

impl HttpSnapshot {
    pub fn generated(&self, reason: ErrorReason) -> u64 {
        self.generated
            .iter()
            .find(|(n, _)| *n == reason.name())
            .map_or(0, |(_, c)| *c)
    }

    fn merge(&mut self, o: &HttpSnapshot) {
        self.requests += o.requests;
        for (a, b) in self.grpc_responses.iter_mut().zip(o.grpc_responses) {
            *a += b;
        }
        for (a, b) in self.responses_by_class.iter_mut().zip(o.responses_by_class) {
            *a += b;
        }
        if self.generated.is_empty() {
            self.generated = o.generated.clone();
        } else {
            for (a, b) in self.generated.iter_mut().zip(&o.generated) {
                a.1 += b.1;
            }
        }
        self.retries += o.retries;
        self.retries_over_budget += o.retries_over_budget;
        self.upstream_connects += o.upstream_connects;
        self.pool_reuses += o.pool_reuses;
        self.ejections += o.ejections;
        self.health_checks_ok += o.health_checks_ok;
        self.health_checks_failed += o.health_checks_failed;
        self.responses_cut += o.responses_cut;
        self.early_responses += o.early_responses;
        self.retries_over_breaker += o.retries_over_breaker;
        self.faults_aborted += o.faults_aborted;
        self.faults_delayed += o.faults_delayed;
        self.h2_connections += o.h2_connections;
        self.h2_streams += o.h2_streams;
        self.h2_connection_errors += o.h2_connection_errors;
        self.h2_enhance_your_calm += o.h2_enhance_your_calm;
        self.h2_premature_reset_closes += o.h2_premature_reset_closes;
        self.paths_normalized += o.paths_normalized;
    }
}

/// Counts one connection as active for as long as it lives (also through
/// a panic, since drop runs while unwinding).
#[derive(Debug)]
pub struct ActiveGuard<'a>(&'a Cell<u64>);

impl<'a> ActiveGuard<'a> {
    pub fn new(active: &'a Cell<u64>) -> Self {
        add(active, 1);
        Self(active)
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

/// A copy of one worker's counters, or a merge of several.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    pub connections_accepted: u64,
    pub connections_active: u64,
    pub connections_unrouted: u64,
    pub bytes_downstream_to_upstream: u64,
    pub bytes_upstream_to_downstream: u64,
    pub connect_failures: u64,
    pub connect_timeouts: u64,
    pub idle_timeouts: u64,
    pub drain_cut: u64,
    pub accept_errors: u64,
    pub task_panics: u64,
    pub access_log_lines: u64,
    pub access_log_dropped: u64,
    pub trace_spans: u64,
    pub trace_spans_dropped: u64,
    pub connections_evicted_idle: u64,
    pub connections_parked: u64,
    pub connections_carried: u64,
    pub connections_refused_overload: u64,
    pub overload_keep_alive_off: u64,
    pub overload_accept_paused: u64,
    pub http: HttpSnapshot,
    pub tls: crate::tls::counters::TlsSnapshot,
    pub intercept: crate::intercept::Snapshot,
}

/// Adds `n` to a counter cell.
#[inline]
pub fn add(cell: &Cell<u64>, n: u64) {
    cell.set(cell.get().wrapping_add(n));
}

impl Counters {
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            connections_accepted: self.connections_accepted.get(),
            connections_active: self.connections_active.get(),
            connections_unrouted: self.connections_unrouted.get(),
            bytes_downstream_to_upstream: self.bytes_downstream_to_upstream.get(),
            bytes_upstream_to_downstream: self.bytes_upstream_to_downstream.get(),
            connect_failures: self.connect_failures.get(),
            connect_timeouts: self.connect_timeouts.get(),
            idle_timeouts: self.idle_timeouts.get(),
            drain_cut: self.drain_cut.get(),
            accept_errors: self.accept_errors.get(),
            task_panics: self.task_panics.get(),
            access_log_lines: self.access_log_lines.get(),
            access_log_dropped: self.access_log_dropped.get(),
            trace_spans: self.trace_spans.get(),
            trace_spans_dropped: self.trace_spans_dropped.get(),
            connections_evicted_idle: self.connections_evicted_idle.get(),
            connections_parked: self.connections_parked.get(),
            connections_carried: self.connections_carried.get(),
            connections_refused_overload: self.connections_refused_overload.get(),
            overload_keep_alive_off: self.overload_keep_alive_off.get(),
            overload_accept_paused: self.overload_accept_paused.get(),
            http: HttpSnapshot {
                requests: self.http.requests.get(),
                responses_by_class: std::array::from_fn(|i| self.http.responses_by_class[i].get()),
                grpc_responses: std::array::from_fn(|i| self.http.grpc_responses[i].get()),
                generated: ErrorReason::ALL
                    .iter()
                    .map(|r| (r.name(), self.http.generated[r.index()].get()))
                    .collect(),
                retries: self.http.retries.get(),
                retries_over_budget: self.http.retries_over_budget.get(),
                upstream_connects: self.http.upstream_connects.get(),
                pool_reuses: self.http.pool_reuses.get(),
                ejections: self.http.ejections.get(),
                health_checks_ok: self.http.health_checks_ok.get(),
                health_checks_failed: self.http.health_checks_failed.get(),
                responses_cut: self.http.responses_cut.get(),
                early_responses: self.http.early_responses.get(),
                retries_over_breaker: self.http.retries_over_breaker.get(),
                faults_aborted: self.http.faults_aborted.get(),
                faults_delayed: self.http.faults_delayed.get(),
                h2_connections: self.http.h2_connections.get(),
                h2_streams: self.http.h2_streams.get(),
                h2_connection_errors: self.http.h2_connection_errors.get(),
                h2_enhance_your_calm: self.http.h2_enhance_your_calm.get(),
                h2_premature_reset_closes: self.http.h2_premature_reset_closes.get(),
                paths_normalized: self.http.paths_normalized.get(),
            },
            tls: self.tls.snapshot(),
            intercept: self.intercept.snapshot(),
        }
    }
}

impl Snapshot {
    /// Sums another worker's snapshot into this one.
    pub fn merge(&mut self, other: &Snapshot) {
        self.connections_accepted += other.connections_accepted;
        self.connections_active += other.connections_active;
        self.connections_unrouted += other.connections_unrouted;
        self.bytes_downstream_to_upstream += other.bytes_downstream_to_upstream;
        self.bytes_upstream_to_downstream += other.bytes_upstream_to_downstream;
        self.connect_failures += other.connect_failures;
        self.connect_timeouts += other.connect_timeouts;
        self.idle_timeouts += other.idle_timeouts;
        self.drain_cut += other.drain_cut;
        self.accept_errors += other.accept_errors;
        self.task_panics += other.task_panics;
        self.access_log_lines += other.access_log_lines;
        self.access_log_dropped += other.access_log_dropped;
        self.trace_spans += other.trace_spans;
        self.trace_spans_dropped += other.trace_spans_dropped;
        self.connections_evicted_idle += other.connections_evicted_idle;
        self.connections_parked += other.connections_parked;
        self.connections_carried += other.connections_carried;
        self.connections_refused_overload += other.connections_refused_overload;
        self.overload_keep_alive_off += other.overload_keep_alive_off;
        self.overload_accept_paused += other.overload_accept_paused;
        self.http.merge(&other.http);
        self.tls.merge(&other.tls);
        self.intercept.merge(&other.intercept);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_copies_and_merge_sums() {
        let c = Counters::default();
        add(&c.connections_accepted, 3);
        add(&c.bytes_downstream_to_upstream, 10);
        let mut total = c.snapshot();
        total.merge(&c.snapshot());
        assert_eq!(total.connections_accepted, 6);
        assert_eq!(total.bytes_downstream_to_upstream, 20);
    }

    #[test]
    fn blame_agrees_with_the_status_and_the_grpc_code() {
        use crate::http2::grpc;
        for r in ErrorReason::ALL {
            // A 4xx is the client's, and so are 501 and 505 (it asked
            // for what is not supported); 502, 503 and 504 are the
            // upstream's or ours.
            let clients = r.status() < 500 || matches!(r.status(), 501 | 505);
            assert_eq!(clients, r.blame() == Blame::Downstream, "{}", r.name());
        }
        assert_eq!(ErrorReason::Overload.blame(), Blame::Internal);
        assert_eq!(
            ErrorReason::UpstreamTimeout.grpc_code(),
            grpc::DEADLINE_EXCEEDED
        );
        assert_eq!(
            ErrorReason::RateLimited.grpc_code(),
            grpc::RESOURCE_EXHAUSTED
        );
        assert_eq!(ErrorReason::ConnectFailed.grpc_code(), grpc::UNAVAILABLE);
    }

    #[test]
    fn generated_logs_are_paced_per_reason_and_count_what_they_left_out() {
        let c = Counters::default();
        for _ in 0..5 {
            c.generated(ErrorReason::ConnectFailed, "x");
        }
        c.generated(ErrorReason::NoRoute, "y");
        assert_eq!(c.snapshot().http.generated(ErrorReason::ConnectFailed), 5);
        let i = ErrorReason::ConnectFailed.index();
        assert_eq!(
            c.generated_log.left_out[i].get(),
            4,
            "one line, four left out"
        );
        let j = ErrorReason::NoRoute.index();
        assert_eq!(
            c.generated_log.left_out[j].get(),
            0,
            "another reason has its own pace"
        );
        // A pace later, the next line goes out and says how many it skipped.
        c.generated_log.last[i].set(Some(std::time::Instant::now() - LOG_PACE));
        c.generated(ErrorReason::ConnectFailed, "x");
        assert_eq!(c.generated_log.left_out[i].get(), 0);
    }
}
