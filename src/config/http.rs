//! The HTTP parts of the config: listener limits, routes, and the
//! cluster policies (balancing, pooling, retries, outlier detection,
//! health checks).
//!
//! What must hold: every route points at clusters that exist, weights are
//! positive, retry conditions are known, and every limit is bounded by the
//! constants in [`super::limits`].

use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::{duration::HumanDuration, limits::*};
use crate::http1::{write::Edits, HeadLimits};

/// An HTTP listener's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HttpListener {
    pub limits: HeadLimits,
    /// Request bodies larger than this get 413; None: unbounded (streamed).
    pub body_bytes_max: Option<u64>,
    pub routes: Vec<Route>,
    /// The listener's `cluster`: where requests no route matched go.
    pub default_cluster: Option<usize>,
    #[serde(with = "super::humantime_serde_compat")]
    pub request_timeout: Duration,
    /// Lower-case header that carries the caller's verified identity to
    /// the local app; removed from every request first.
    pub identity_header: String,
    /// How request paths are normalized before routing (and forwarded).
    pub paths: crate::route::path::PathOptions,
    /// Time a client gets to finish a request head once it sent its first
    /// byte (slow-loris bound); 408 when a request line was seen.
    #[serde(with = "super::humantime_serde_compat")]
    pub head_timeout: Duration,
    /// HTTP/2 settings for this listener's clients.
    pub h2: H2Settings,
    /// Requests this listener admits per second (the whole process).
    pub rate_limit: Option<RateLimit>,
}

/// A local rate limit: a token bucket of `burst` tokens refilled at
/// `per_second`, for the whole process (each of N workers holds 1/N; see
/// `crate::http::ratelimit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RateLimit {
    pub per_second: u32,
    pub burst: u32,
    /// One bucket per caller identity (mTLS) instead of one for all.
    pub per_identity: bool,
}

/// HTTP/2 flow control and concurrency for one side (a listener's
/// clients, or a cluster's endpoints). Defaults and bounds: see
/// `crate::http2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct H2Settings {
    /// Streams a peer may open at once (listeners only).
    pub max_concurrent_streams: u32,
    /// Unforwarded body bytes a peer may send per stream.
    pub stream_window: u32,
    /// ... and on the whole connection.
    pub connection_window: u32,
}

impl Default for H2Settings {
    fn default() -> Self {
        Self {
            max_concurrent_streams: crate::http2::MAX_CONCURRENT_STREAMS,
            stream_window: crate::http2::STREAM_WINDOW_BYTES,
            connection_window: crate::http2::CONNECTION_WINDOW_BYTES,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Route {
    pub name: String,
    pub host: Option<HostMatch>,
    pub path: Option<PathMatch>,
    pub method: Option<String>,
    pub headers: Vec<(String, String)>,
    /// (cluster index, weight); one entry for a plain `cluster`.
    pub clusters: Vec<(usize, u32)>,
    #[serde(with = "super::humantime_serde_compat")]
    pub timeout: Duration,
    pub retry: RetryPolicy,
    pub edits: Edits,
    /// Caller identities this route admits (on top of the listener's).
    pub authorize: Option<Vec<crate::tls::identity::Pattern>>,
    /// Faults injected into this route's requests (resilience testing).
    pub fault: Option<Fault>,
    /// Requests this route admits per second (the whole process).
    pub rate_limit: Option<RateLimit>,
}

/// Fault injection on a route, as Istio users test their services'
/// resilience: a delay before forwarding and/or an answer without
/// forwarding, each for a share of requests; optionally only for requests
/// that carry a header (so one client can test while others are spared).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Fault {
    #[serde(with = "super::humantime_serde_compat")]
    pub delay: Duration,
    /// Share of requests delayed, in hundredths of a percent (0..=10000).
    pub delay_per_10k: u32,
    /// Status of the injected answer (200..=599).
    pub abort_status: u16,
    /// Share of requests answered with `abort_status`, per 10,000.
    pub abort_per_10k: u32,
    /// Only requests carrying this (lower-case) header are eligible.
    pub only_with_header: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum HostMatch {
    Exact(String),
    /// `*.example.com`: stored as `.example.com`.
    Suffix(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RetryPolicy {
    /// Tries in all (1 = no retry).
    pub attempts: u32,
    pub on_connect_failure: bool,
    /// The upstream reset or closed before any response byte.
    pub on_reset: bool,
    pub on_status: Vec<u16>,
    /// gRPC status codes (in a trailers-only answer) that are retried.
    pub on_grpc: Vec<u32>,
    /// Retry POST and other non-idempotent methods too.
    pub non_idempotent: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: RETRY_ATTEMPTS_DEFAULT,
            on_connect_failure: true,
            on_reset: true,
            on_status: Vec::new(),
            on_grpc: Vec::new(),
            non_idempotent: false,
        }
    }
}

/// How a cluster picks an endpoint for each request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum LbPolicy {
    RoundRobin,
    /// Power of two choices, fewer active requests wins.
    LeastRequest,
    /// Peak-EWMA latency times active requests (linkerd's choice).
    Ewma,
    /// Consistent hash of a request header's value.
    Hash {
        header: String,
    },
}

/// HTTP-specific cluster settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HttpCluster {
    /// Which HTTP version the proxy speaks to the endpoints.
    pub protocol: UpstreamProtocol,
    /// Windows for h2 connections to the endpoints.
    pub h2: H2Settings,
    pub lb: LbPolicy,
    pub max_idle_per_endpoint: usize,
    #[serde(with = "super::humantime_serde_compat")]
    pub pool_idle_timeout: Duration,
    pub retry_budget_percent: u32,
    pub outlier: Option<Outlier>,
    pub health_check: Option<HealthCheck>,
    pub breakers: Breakers,
}

/// Circuit breakers: hard caps for the whole process, split evenly across
/// the workers (each worker enforces `ceil(cap / workers)` on its own
/// traffic, shared-nothing), so the configured cap is what the process
/// allows. None: no cap (the retry budget still bounds retries).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Breakers {
    /// Requests in flight to the cluster; past it, 503
    /// `circuit_breaker_max_requests`.
    pub max_requests: Option<u32>,
    /// Retries in flight to the cluster; past it, a failed attempt is not
    /// retried (counted).
    pub max_retries: Option<u32>,
    /// Open connections to the cluster's endpoints (idle in the pool,
    /// busy, or HTTP/2); a request that needs a new one past it gets 503
    /// `circuit_breaker_max_connections`.
    pub max_connections: Option<u32>,
    /// Requests waiting for a new connection (connect, TLS and HTTP/2
    /// handshakes); past it, 503 `circuit_breaker_max_pending`. Bounds
    /// the pile-up behind an endpoint that accepts slowly.
    pub max_pending: Option<u32>,
}

impl Breakers {
    /// This worker's share of a process-wide cap, rounded up (so that a
    /// cap below the worker count still admits one per worker).
    pub fn per_worker(cap: Option<u32>, workers: usize) -> Option<u64> {
        let workers = workers.max(1) as u64;
        cap.map(|c| u64::from(c).div_ceil(workers))
    }
}

/// A cluster's `protocol`: the HTTP version spoken to its endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 over the connection pool.
    Http1,
    /// HTTP/2: prior knowledge on plaintext, ALPN `h2` on TLS.
    H2,
    /// TLS: offer `h2` and `http/1.1` and speak what the endpoint picks
    /// (so Pilotfish sidecars talk h2 to each other); plaintext: HTTP/1.1.
    Auto,
}

impl Default for HttpCluster {
    fn default() -> Self {
        Self {
            protocol: UpstreamProtocol::Auto,
            h2: H2Settings::default(),
            lb: LbPolicy::RoundRobin,
            max_idle_per_endpoint: POOL_IDLE_PER_ENDPOINT_DEFAULT,
            pool_idle_timeout: POOL_IDLE_TIMEOUT_DEFAULT,
            retry_budget_percent: RETRY_BUDGET_PERCENT_DEFAULT,
            outlier: Some(Outlier::default()),
            health_check: None,
            breakers: Breakers::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Outlier {
    pub consecutive_failures: u32,
    #[serde(with = "super::humantime_serde_compat")]
    pub base_ejection: Duration,
    #[serde(with = "super::humantime_serde_compat")]
    pub max_ejection: Duration,
    pub max_ejected_percent: u32,
}

impl Default for Outlier {
    fn default() -> Self {
        Self {
            consecutive_failures: OUTLIER_CONSECUTIVE_FAILURES_DEFAULT,
            base_ejection: OUTLIER_BASE_EJECTION_DEFAULT,
            max_ejection: OUTLIER_MAX_EJECTION_DEFAULT,
            max_ejected_percent: OUTLIER_MAX_EJECTED_PERCENT_DEFAULT,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HealthCheck {
    pub path: String,
    #[serde(with = "super::humantime_serde_compat")]
    pub interval: Duration,
    #[serde(with = "super::humantime_serde_compat")]
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

/// The file's view of the HTTP settings.
pub(super) mod raw {
    use std::collections::BTreeMap;

    use super::*;

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Route {
        pub name: Option<Spanned<String>>,
        pub host: Option<Spanned<String>>,
        pub path: Option<Spanned<String>>,
        pub path_prefix: Option<Spanned<String>>,
        pub method: Option<Spanned<String>>,
        #[serde(default)]
        pub headers: BTreeMap<String, String>,
        pub cluster: Option<Spanned<String>>,
        pub weighted: Option<Spanned<Vec<Weighted>>>,
        pub timeout: Option<HumanDuration>,
        pub retry: Option<Retry>,
        pub request_headers: Option<HeaderEdits>,
        pub authorize: Option<Spanned<Vec<Spanned<String>>>>,
        pub fault: Option<Spanned<Fault>>,
        pub rate_limit: Option<Spanned<RateLimit>>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct RateLimit {
        pub requests_per_second: u32,
        pub burst: Option<u32>,
        pub per_identity: Option<bool>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Fault {
        pub delay: Option<HumanDuration>,
        pub delay_percent: Option<f64>,
        pub abort: Option<u16>,
        pub abort_percent: Option<f64>,
        pub only_with_header: Option<String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Weighted {
        pub cluster: Spanned<String>,
        pub weight: Spanned<u32>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Retry {
        pub attempts: Option<Spanned<u32>>,
        pub on: Option<Vec<Spanned<String>>>,
        #[serde(default)]
        pub non_idempotent: bool,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct HeaderEdits {
        #[serde(default)]
        pub add: BTreeMap<String, String>,
        #[serde(default)]
        pub set: BTreeMap<String, String>,
        #[serde(default)]
        pub remove: Vec<String>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Outlier {
        pub consecutive_failures: Option<Spanned<u32>>,
        pub base_ejection: Option<HumanDuration>,
        pub max_ejection: Option<HumanDuration>,
        pub max_ejected_percent: Option<Spanned<u32>>,
        #[serde(default)]
        pub disabled: bool,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Breakers {
        pub max_requests: Option<u32>,
        pub max_retries: Option<u32>,
        pub max_connections: Option<u32>,
        pub max_pending: Option<u32>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct HealthCheck {
        pub path: Spanned<String>,
        pub interval: Option<HumanDuration>,
        pub timeout: Option<HumanDuration>,
        pub healthy_threshold: Option<Spanned<u32>>,
        pub unhealthy_threshold: Option<Spanned<u32>>,
    }
}

/// Cross-field checks for the HTTP parts.
impl super::Validator<'_> {
    /// A `Spanned` number in `range`, or `default` when absent.
    fn bounded<T: Copy + PartialOrd + std::fmt::Display>(
        &self,
        value: &Option<Spanned<T>>,
        key: String,
        range: std::ops::RangeInclusive<T>,
        default: T,
    ) -> Result<T, super::ConfigError> {
        match value {
            None => Ok(default),
            Some(v) if range.contains(v.get_ref()) => Ok(*v.get_ref()),
            Some(v) => Err(self.error(
                v,
                key,
                format!("must be between {} and {}", range.start(), range.end()),
            )),
        }
    }

    /// HTTP/2 settings from a listener's or a cluster's keys.
    fn h2_settings(
        &self,
        key: &dyn Fn(&str) -> String,
        streams: &Option<Spanned<u32>>,
        stream_window: &Option<Spanned<u32>>,
        connection_window: &Option<Spanned<u32>>,
    ) -> Result<H2Settings, super::ConfigError> {
        use crate::http2::{
            CONNECTION_WINDOW_BYTES, CONNECTION_WINDOW_BYTES_MAX, MAX_CONCURRENT_STREAMS,
            MAX_CONCURRENT_STREAMS_MAX, STREAM_WINDOW_BYTES, STREAM_WINDOW_BYTES_MAX,
            STREAM_WINDOW_BYTES_MIN,
        };
        let s = H2Settings {
            max_concurrent_streams: self.bounded(
                streams,
                key("h2_max_concurrent_streams"),
                1..=MAX_CONCURRENT_STREAMS_MAX,
                MAX_CONCURRENT_STREAMS,
            )?,
            stream_window: self.bounded(
                stream_window,
                key("h2_stream_window"),
                STREAM_WINDOW_BYTES_MIN..=STREAM_WINDOW_BYTES_MAX,
                STREAM_WINDOW_BYTES,
            )?,
            connection_window: self.bounded(
                connection_window,
                key("h2_connection_window"),
                STREAM_WINDOW_BYTES_MIN..=CONNECTION_WINDOW_BYTES_MAX,
                CONNECTION_WINDOW_BYTES.max(stream_window.as_ref().map_or(0, |w| *w.get_ref())),
            )?,
        };
        if s.connection_window < s.stream_window {
            let anchor = connection_window.as_ref().or(stream_window.as_ref());
            if let Some(a) = anchor {
                return Err(self.error(
                    a,
                    key("h2_connection_window"),
                    "must be at least h2_stream_window".into(),
                ));
            }
        }
        Ok(s)
    }

    /// A tcp listener must not carry HTTP-only keys (they would be ignored).
    pub(super) fn no_http_keys(
        &self,
        i: usize,
        l: &super::raw::Listener,
    ) -> Result<(), super::ConfigError> {
        let http_only = l.request_timeout.is_some()
            || l.head_bytes_max.is_some()
            || l.headers_max.is_some()
            || l.uri_bytes_max.is_some()
            || l.body_bytes_max.is_some()
            || l.identity_header.is_some()
            || l.merge_slashes.is_some()
            || l.escaped_slashes.is_some()
            || l.request_head_timeout.is_some()
            || l.h2_max_concurrent_streams.is_some()
            || l.h2_stream_window.is_some()
            || l.h2_connection_window.is_some()
            || l.rate_limit.is_some()
            || !l.routes.is_empty();
        if http_only {
            return Err(self.error(
                &l.protocol,
                format!("listeners[{i}]"),
                "request_timeout, request_head_timeout, *_max limits, identity_header, merge_slashes, escaped_slashes, h2_* settings, rate_limit and routes apply to protocol \"http\" only".into(),
            ));
        }
        Ok(())
    }

    fn identity_header(
        &self,
        i: usize,
        l: &super::raw::Listener,
    ) -> Result<String, super::ConfigError> {
        let Some(h) = &l.identity_header else {
            return Ok(super::tls::IDENTITY_HEADER_DEFAULT.to_string());
        };
        let name = h.get_ref();
        let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        if name.is_empty() || !name.bytes().all(token) {
            return Err(self.error(
                h,
                format!("listeners[{i}].identity_header"),
                format!("{name:?} is not a valid header name"),
            ));
        }
        Ok(name.to_ascii_lowercase())
    }

    pub(super) fn http_listener(
        &self,
        i: usize,
        l: &super::raw::Listener,
        default_cluster: Option<usize>,
        clusters: &[super::raw::Cluster],
        tls: Option<&super::tls::ListenerTls>,
    ) -> Result<HttpListener, super::ConfigError> {
        let key = |f: &str| format!("listeners[{i}].{f}");
        let limits = HeadLimits {
            head_bytes: self.bounded(
                &l.head_bytes_max,
                key("head_bytes_max"),
                1024..=HTTP1_HEAD_BYTES_MAX,
                HTTP1_HEAD_BYTES_DEFAULT,
            )?,
            headers: self.bounded(
                &l.headers_max,
                key("headers_max"),
                1..=HTTP1_HEADERS_MAX,
                HTTP1_HEADERS_DEFAULT,
            )?,
            uri_bytes: self.bounded(
                &l.uri_bytes_max,
                key("uri_bytes_max"),
                16..=HTTP1_HEAD_BYTES_MAX,
                HTTP1_URI_BYTES_DEFAULT,
            )?,
        };
        if l.routes.len() > ROUTES_PER_LISTENER_MAX {
            return Err(self.error(
                &l.name,
                key("routes"),
                format!("at most {ROUTES_PER_LISTENER_MAX} routes per listener"),
            ));
        }
        let request_timeout = l.request_timeout.map_or(REQUEST_TIMEOUT_DEFAULT, |d| d.0);
        let routes = l
            .routes
            .iter()
            .enumerate()
            .map(|(j, r)| self.route(i, j, r, clusters, request_timeout, tls))
            .collect::<Result<Vec<_>, _>>()?;
        let h2 = self.h2_settings(
            &key,
            &l.h2_max_concurrent_streams,
            &l.h2_stream_window,
            &l.h2_connection_window,
        )?;
        Ok(HttpListener {
            h2,
            limits,
            body_bytes_max: l.body_bytes_max.as_ref().map(|b| *b.get_ref()),
            routes,
            default_cluster,
            request_timeout,
            identity_header: self.identity_header(i, l)?,
            paths: crate::route::path::PathOptions {
                merge_slashes: l.merge_slashes.unwrap_or(true),
                escaped_slashes: l
                    .escaped_slashes
                    .unwrap_or(crate::route::path::SlashAction::Reject),
            },
            head_timeout: l
                .request_head_timeout
                .map_or(REQUEST_HEAD_TIMEOUT_DEFAULT, |d| d.0),
            rate_limit: self.rate_limit(l.rate_limit.as_ref(), key("rate_limit"))?,
        })
    }

    fn cluster_index(
        &self,
        name: &Spanned<String>,
        key: String,
        clusters: &[super::raw::Cluster],
    ) -> Result<usize, super::ConfigError> {
        clusters
            .iter()
            .position(|c| c.name.get_ref() == name.get_ref())
            .ok_or_else(|| {
                self.error(
                    name,
                    key,
                    format!("no cluster named {:?} is defined", name.get_ref()),
                )
            })
    }

    fn route(
        &self,
        i: usize,
        j: usize,
        r: &raw::Route,
        clusters: &[super::raw::Cluster],
        default_timeout: Duration,
        tls: Option<&super::tls::ListenerTls>,
    ) -> Result<Route, super::ConfigError> {
        let key = |f: &str| format!("listeners[{i}].routes[{j}].{f}");
        let name = r
            .name
            .as_ref()
            .map_or_else(|| format!("route-{j}"), |n| n.get_ref().clone());
        let host = r.host.as_ref().map(|h| {
            let h = h.get_ref().to_ascii_lowercase();
            match h.strip_prefix('*') {
                Some(suffix) => HostMatch::Suffix(suffix.to_string()),
                None => HostMatch::Exact(h),
            }
        });
        let path = match (&r.path, &r.path_prefix) {
            (Some(p), Some(_)) => {
                return Err(self.error(
                    p,
                    key("path"),
                    "give `path` or `path_prefix`, not both".into(),
                ))
            }
            (Some(p), None) => Some(PathMatch::Exact(self.path_value(p, key("path"))?)),
            (None, Some(p)) => Some(PathMatch::Prefix(self.path_value(p, key("path_prefix"))?)),
            (None, None) => None,
        };
        if r.headers.len() > ROUTE_HEADER_MATCHES_MAX {
            return Err(self.error(
                r.name
                    .as_ref()
                    .unwrap_or(&Spanned::new(0..0, String::new())),
                key("headers"),
                format!("at most {ROUTE_HEADER_MATCHES_MAX} header matches"),
            ));
        }
        let clusters = match (&r.cluster, &r.weighted) {
            (Some(c), None) => vec![(self.cluster_index(c, key("cluster"), clusters)?, 1)],
            (None, Some(w)) => {
                let list = w.get_ref();
                if list.is_empty() || list.len() > WEIGHTED_CLUSTERS_MAX {
                    return Err(self.error(
                        w,
                        key("weighted"),
                        format!("needs 1 to {WEIGHTED_CLUSTERS_MAX} entries"),
                    ));
                }
                let mut out = Vec::with_capacity(list.len());
                for (k, entry) in list.iter().enumerate() {
                    let index = self.cluster_index(
                        &entry.cluster,
                        format!("listeners[{i}].routes[{j}].weighted[{k}].cluster"),
                        clusters,
                    )?;
                    let weight = *entry.weight.get_ref();
                    if !(1..=1_000_000).contains(&weight) {
                        return Err(self.error(
                            &entry.weight,
                            format!("listeners[{i}].routes[{j}].weighted[{k}].weight"),
                            "must be between 1 and 1000000".into(),
                        ));
                    }
                    out.push((index, weight));
                }
                out
            }
            (Some(c), Some(_)) => {
                return Err(self.error(
                    c,
                    key("cluster"),
                    "give `cluster` or `weighted`, not both".into(),
                ))
            }
            (None, None) => {
                return Err(self.error(
                    r.name
                        .as_ref()
                        .unwrap_or(&Spanned::new(0..0, String::new())),
                    key("cluster"),
                    "a route needs `cluster` or `weighted`".into(),
                ))
            }
        };
        Ok(Route {
            name,
            host,
            path,
            method: r.method.as_ref().map(|m| m.get_ref().clone()),
            headers: r
                .headers
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                .collect(),
            clusters,
            timeout: r.timeout.map_or(default_timeout, |d| d.0),
            retry: self.retry(r.retry.as_ref(), &key("retry"))?,
            edits: self.edits(r.request_headers.as_ref(), r, &key("request_headers"))?,
            authorize: self.authorize(tls, r.authorize.as_ref(), key("authorize"))?,
            fault: r
                .fault
                .as_ref()
                .map(|f| self.fault(f, key("fault")))
                .transpose()?,
            rate_limit: self.rate_limit(r.rate_limit.as_ref(), key("rate_limit"))?,
        })
    }

    pub(super) fn rate_limit(
        &self,
        raw: Option<&Spanned<raw::RateLimit>>,
        key: String,
    ) -> Result<Option<RateLimit>, super::ConfigError> {
        let Some(spanned) = raw else {
            return Ok(None);
        };
        let r = spanned.get_ref();
        if !(1..=RATE_LIMIT_PER_SECOND_MAX).contains(&r.requests_per_second) {
            return Err(self.error(
                spanned,
                format!("{key}.requests_per_second"),
                format!("must be between 1 and {RATE_LIMIT_PER_SECOND_MAX}"),
            ));
        }
        // Default burst: one second's worth, as a bucket usually starts.
        let burst = r.burst.unwrap_or(r.requests_per_second);
        if !(1..=RATE_LIMIT_PER_SECOND_MAX).contains(&burst) {
            return Err(self.error(
                spanned,
                format!("{key}.burst"),
                format!("must be between 1 and {RATE_LIMIT_PER_SECOND_MAX}"),
            ));
        }
        Ok(Some(RateLimit {
            per_second: r.requests_per_second,
            burst,
            per_identity: r.per_identity.unwrap_or(false),
        }))
    }

    fn fault(&self, f: &Spanned<raw::Fault>, key: String) -> Result<Fault, super::ConfigError> {
        let raw = f.get_ref();
        let err = |what: &str| self.error(f, key.clone(), what.to_string());
        let per_10k = |p: Option<f64>, name: &str| -> Result<u32, super::ConfigError> {
            match p {
                None => Ok(0),
                Some(p) if (0.0..=100.0).contains(&p) => Ok((p * 100.0).round() as u32),
                Some(_) => Err(err(&format!("{name} must be between 0 and 100"))),
            }
        };
        let delay = raw.delay.map(|d| d.0).unwrap_or_default();
        let delay_per_10k = per_10k(raw.delay_percent, "delay_percent")?;
        let abort_per_10k = per_10k(raw.abort_percent, "abort_percent")?;
        let abort_status = raw.abort.unwrap_or(503);
        if !(200..=599).contains(&abort_status) {
            return Err(err("abort must be a status from 200 to 599"));
        }
        if delay_per_10k > 0 && delay.is_zero() {
            return Err(err("delay_percent needs a delay"));
        }
        if raw.delay_percent.is_none() && raw.abort_percent.is_none() {
            return Err(err("give delay_percent (with delay) and/or abort_percent"));
        }
        let only_with_header = match &raw.only_with_header {
            None => None,
            Some(h)
                if !h.is_empty()
                    && h.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)) =>
            {
                Some(h.to_ascii_lowercase())
            }
            Some(h) => {
                return Err(err(&format!(
                    "only_with_header: {h:?} is not a header name"
                )))
            }
        };
        Ok(Fault {
            delay,
            delay_per_10k,
            abort_status,
            abort_per_10k,
            only_with_header,
        })
    }

    fn path_value(&self, p: &Spanned<String>, key: String) -> Result<String, super::ConfigError> {
        if !p.get_ref().starts_with('/') {
            return Err(self.error(p, key, "must start with `/`".into()));
        }
        // Requests are matched after normalization, so a route written in
        // another spelling could never match (or would match less than it
        // says). Checked with the most permissive slash handling.
        let opts = crate::route::path::PathOptions {
            merge_slashes: true,
            escaped_slashes: crate::route::path::SlashAction::Keep,
        };
        match crate::route::path::normalize(p.get_ref().as_bytes(), opts) {
            Ok(None) => Ok(p.get_ref().clone()),
            Ok(Some(normal)) => Err(self.error(
                p,
                key,
                format!(
                    "requests are matched on normalized paths; write it as {:?}",
                    String::from_utf8_lossy(&normal)
                ),
            )),
            Err(e) => Err(self.error(p, key, e.to_string())),
        }
    }

    fn retry(&self, r: Option<&raw::Retry>, key: &str) -> Result<RetryPolicy, super::ConfigError> {
        let Some(r) = r else {
            return Ok(RetryPolicy::default());
        };
        let mut policy = RetryPolicy {
            attempts: self.bounded(
                &r.attempts,
                format!("{key}.attempts"),
                1..=RETRY_ATTEMPTS_MAX,
                RETRY_ATTEMPTS_DEFAULT,
            )?,
            non_idempotent: r.non_idempotent,
            ..RetryPolicy::default()
        };
        if let Some(on) = &r.on {
            policy.on_connect_failure = false;
            policy.on_reset = false;
            for cond in on {
                match cond.get_ref().as_str() {
                    "connect_failure" => policy.on_connect_failure = true,
                    "reset" => policy.on_reset = true,
                    name if crate::http2::grpc::retryable_code(name).is_some() => {
                        policy.on_grpc.extend(crate::http2::grpc::retryable_code(name));
                    }
                    code => match code.parse::<u16>() {
                        Ok(c) if (500..=599).contains(&c) => policy.on_status.push(c),
                        _ => {
                            return Err(self.error(
                                cond,
                                format!("{key}.on"),
                                format!("unknown retry condition {code:?}: use \"connect_failure\", \"reset\", a 5xx status such as \"503\", or a gRPC status: \"cancelled\", \"deadline_exceeded\", \"resource_exhausted\", \"unavailable\""),
                            ))
                        }
                    },
                }
            }
        }
        Ok(policy)
    }

    fn edits(
        &self,
        e: Option<&raw::HeaderEdits>,
        r: &raw::Route,
        key: &str,
    ) -> Result<Edits, super::ConfigError> {
        let Some(e) = e else {
            return Ok(Edits::default());
        };
        let count = e.add.len() + e.set.len() + e.remove.len();
        let valid_name = |n: &str| {
            !n.is_empty()
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        };
        let valid_value = |v: &str| v.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b));
        let bad = e
            .add
            .iter()
            .chain(&e.set)
            .find(|(n, v)| !valid_name(n) || !valid_value(v))
            .map(|(n, _)| n.clone())
            .or_else(|| e.remove.iter().find(|n| !valid_name(n)).cloned());
        let anchor = r
            .name
            .clone()
            .unwrap_or_else(|| Spanned::new(0..0, String::new()));
        if let Some(bad) = bad {
            return Err(self.error(
                &anchor,
                key.to_string(),
                format!("invalid header name or value for {bad:?}"),
            ));
        }
        if count > ROUTE_HEADER_EDITS_MAX {
            return Err(self.error(
                &anchor,
                key.to_string(),
                format!("at most {ROUTE_HEADER_EDITS_MAX} header edits"),
            ));
        }
        let lower = |m: &std::collections::BTreeMap<String, String>| {
            m.iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                .collect()
        };
        Ok(Edits {
            remove: e.remove.iter().map(|n| n.to_ascii_lowercase()).collect(),
            set: lower(&e.set),
            add: lower(&e.add),
        })
    }

    pub(super) fn http_cluster(
        &self,
        i: usize,
        c: &super::raw::Cluster,
    ) -> Result<HttpCluster, super::ConfigError> {
        let key = |f: &str| format!("clusters[{i}].{f}");
        let lb = match c.lb.as_ref().map(|l| (l, l.get_ref().as_str())) {
            None | Some((_, "round_robin")) => LbPolicy::RoundRobin,
            Some((_, "least_request")) => LbPolicy::LeastRequest,
            Some((_, "ewma")) => LbPolicy::Ewma,
            Some((l, "hash")) => {
                let Some(h) = &c.hash_header else {
                    return Err(self.error(
                        l,
                        key("hash_header"),
                        "lb = \"hash\" needs `hash_header`".into(),
                    ));
                };
                LbPolicy::Hash {
                    header: h.get_ref().to_ascii_lowercase(),
                }
            }
            Some((l, other)) => {
                return Err(self.error(
                    l,
                    key("lb"),
                    format!("unknown lb {other:?}: use round_robin, least_request, ewma or hash"),
                ))
            }
        };
        if let (Some(h), false) = (&c.hash_header, matches!(lb, LbPolicy::Hash { .. })) {
            return Err(self.error(h, key("hash_header"), "needs lb = \"hash\"".into()));
        }
        let outlier = match &c.outlier {
            None => Some(Outlier::default()),
            Some(o) if o.disabled => None,
            Some(o) => Some(Outlier {
                consecutive_failures: self.bounded(
                    &o.consecutive_failures,
                    key("outlier.consecutive_failures"),
                    1..=1000,
                    OUTLIER_CONSECUTIVE_FAILURES_DEFAULT,
                )?,
                base_ejection: o
                    .base_ejection
                    .map_or(OUTLIER_BASE_EJECTION_DEFAULT, |d| d.0),
                max_ejection: o.max_ejection.map_or(OUTLIER_MAX_EJECTION_DEFAULT, |d| d.0),
                max_ejected_percent: self.bounded(
                    &o.max_ejected_percent,
                    key("outlier.max_ejected_percent"),
                    0..=100,
                    OUTLIER_MAX_EJECTED_PERCENT_DEFAULT,
                )?,
            }),
        };
        let health_check = match &c.health_check {
            None => None,
            Some(h) => Some(HealthCheck {
                path: self.path_value(&h.path, key("health_check.path"))?,
                interval: h.interval.map_or(Duration::from_secs(5), |d| d.0),
                timeout: h.timeout.map_or(Duration::from_secs(1), |d| d.0),
                healthy_threshold: self.bounded(
                    &h.healthy_threshold,
                    key("health_check.healthy_threshold"),
                    1..=100,
                    2,
                )?,
                unhealthy_threshold: self.bounded(
                    &h.unhealthy_threshold,
                    key("health_check.unhealthy_threshold"),
                    1..=100,
                    3,
                )?,
            }),
        };
        let protocol = match c.protocol.as_ref().map(|p| (p, p.get_ref().as_str())) {
            None | Some((_, "auto")) => UpstreamProtocol::Auto,
            Some((_, "http1")) => UpstreamProtocol::Http1,
            Some((_, "h2")) => UpstreamProtocol::H2,
            Some((p, other)) => {
                return Err(self.error(
                    p,
                    key("protocol"),
                    format!(
                        "unknown cluster protocol {other:?}: use \"http1\", \"h2\" or \"auto\""
                    ),
                ))
            }
        };
        let h2 = self.h2_settings(&key, &None, &c.h2_stream_window, &c.h2_connection_window)?;
        Ok(HttpCluster {
            h2,
            protocol,
            lb,
            max_idle_per_endpoint: self.bounded(
                &c.max_idle_per_endpoint,
                key("max_idle_per_endpoint"),
                0..=POOL_IDLE_PER_ENDPOINT_MAX,
                POOL_IDLE_PER_ENDPOINT_DEFAULT,
            )?,
            pool_idle_timeout: c
                .pool_idle_timeout
                .map_or(POOL_IDLE_TIMEOUT_DEFAULT, |d| d.0),
            retry_budget_percent: self.bounded(
                &c.retry_budget_percent,
                key("retry_budget_percent"),
                0..=100,
                RETRY_BUDGET_PERCENT_DEFAULT,
            )?,
            outlier,
            health_check,
            breakers: Breakers {
                max_requests: c.circuit_breakers.as_ref().and_then(|b| b.max_requests),
                max_retries: c.circuit_breakers.as_ref().and_then(|b| b.max_retries),
                max_connections: c.circuit_breakers.as_ref().and_then(|b| b.max_connections),
                max_pending: c.circuit_breakers.as_ref().and_then(|b| b.max_pending),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn parse(cluster_extra: &str, route_extra: &str) -> Result<Config, String> {
        let text = format!(
            "[[listeners]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ncluster = \"c\"\n\
             [[listeners.routes]]\nname = \"r\"\npath_prefix = \"/\"\ncluster = \"c\"\n{route_extra}\n\
             [[clusters]]\nname = \"c\"\nendpoints = [\"127.0.0.1:1\"]\n{cluster_extra}\n"
        );
        Config::parse("t.toml", &text).map_err(|e| e.to_string())
    }

    #[test]
    fn cluster_protocol_and_grpc_retry_conditions() {
        let c = parse("", "").unwrap();
        assert_eq!(c.clusters[0].http.protocol, UpstreamProtocol::Auto);
        for (text, want) in [
            ("h2", UpstreamProtocol::H2),
            ("http1", UpstreamProtocol::Http1),
            ("auto", UpstreamProtocol::Auto),
        ] {
            let c = parse(&format!("protocol = \"{text}\""), "").unwrap();
            assert_eq!(c.clusters[0].http.protocol, want);
        }
        let err = parse("protocol = \"h3\"", "").unwrap_err();
        assert!(
            err.contains("clusters[0].protocol") && err.contains("h3"),
            "{err}"
        );
        let c = parse(
            "",
            "retry = { on = [\"unavailable\", \"503\", \"cancelled\"] }",
        )
        .unwrap();
        let crate::config::ListenerKind::Http(http) = &c.listeners[0].kind else {
            panic!("an http listener");
        };
        let retry = &http.routes[0].retry;
        assert_eq!(retry.on_grpc, [14, 1]);
        assert_eq!(retry.on_status, [503]);
        let err = parse("", "retry = { on = [\"unavailabel\"] }").unwrap_err();
        assert!(err.contains("unavailabel") && err.contains("gRPC"), "{err}");
    }

    #[test]
    fn h2_windows_are_bounded_and_consistent() {
        let c = parse(
            "h2_stream_window = 1048576\nh2_connection_window = 4194304",
            "",
        )
        .unwrap();
        assert_eq!(c.clusters[0].http.h2.stream_window, 1 << 20);
        assert_eq!(c.clusters[0].http.h2.connection_window, 4 << 20);
        // A larger stream window raises the default connection window.
        let c = parse("h2_stream_window = 2097152", "").unwrap();
        assert_eq!(c.clusters[0].http.h2.connection_window, 2 << 20);
        let err = parse("h2_stream_window = 1000", "").unwrap_err();
        assert!(err.contains("clusters[0].h2_stream_window"), "{err}");
        let err = parse(
            "h2_stream_window = 1048576\nh2_connection_window = 65535",
            "",
        )
        .unwrap_err();
        assert!(err.contains("at least h2_stream_window"), "{err}");
        let text = "[[listeners]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ncluster = \"c\"\nh2_max_concurrent_streams = 10\n[[clusters]]\nname = \"c\"\nendpoints = [\"127.0.0.1:1\"]\n";
        let c = Config::parse("t.toml", text).unwrap();
        let crate::config::ListenerKind::Http(http) = &c.listeners[0].kind else {
            panic!("an http listener");
        };
        assert_eq!(http.h2.max_concurrent_streams, 10);
        let tcp = text.replace("protocol = \"http\"", "protocol = \"tcp\"");
        assert!(
            Config::parse("t.toml", &tcp).is_err(),
            "h2 keys on a tcp listener"
        );
    }
}
