//! Every bound Pilotfish enforces, with its default and the reason for it.
//!
//! Defaults are used when the config file is silent; hard maxima cap what a
//! config may ask for, so a typo cannot turn a limit into "unbounded".
//! Relations between limits are checked at compile time below.

use std::time::Duration;

/// Workers the config may ask for. One pinned thread per core; past a few
/// hundred the per-worker listener sockets and pools cost more than they buy.
pub const WORKERS_MAX: usize = 512;

/// Concurrent client connections per worker before it stops accepting (the
/// kernel backlog then queues, and past that refuses). Bounds fds and memory:
/// each proxied pair holds two sockets and, with buffered copy, two buffers.
pub const MAX_CONNECTIONS_PER_WORKER_DEFAULT: usize = 10_000;
/// Hard cap on `max_connections_per_worker`: far above what one core serves,
/// low enough that memory per worker stays bounded (2 × 64 KiB × 262k = 32 GiB
/// is already absurd, so no more).
pub const MAX_CONNECTIONS_PER_WORKER_MAX: usize = 262_144;

/// An L4 pair with no bytes moving either way for this long is closed. Long
/// enough for chatty keep-alive protocols, short enough that dead peers
/// without TCP keepalive do not pin fds forever.
pub const IDLE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(300);

/// Upstream connect timeout. On loopback or in one cluster a healthy connect
/// takes well under a millisecond; a second means the endpoint is gone.
pub const CONNECT_TIMEOUT_DEFAULT: Duration = Duration::from_secs(1);

/// Time in-flight connections get to finish after SIGTERM before they are cut.
/// Kept below systemd's default `TimeoutStopSec` (90 s) so we exit on our own.
pub const DRAIN_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);

/// Connect attempts per client connection (the first try plus retries, each
/// to the next endpoint). Bounds the time a client waits to
/// `attempts × connect_timeout`.
pub const CONNECT_ATTEMPTS_DEFAULT: u32 = 3;
/// A config may not ask for more: past this, the client has long given up.
pub const CONNECT_ATTEMPTS_MAX: u32 = 16;

/// Any configured duration must be at least this: a zero timeout would fire
/// before the first byte could move.
pub const DURATION_MIN: Duration = Duration::from_millis(1);
/// And at most this (a day): longer "timeouts" are typos that pin resources.
pub const DURATION_MAX: Duration = Duration::from_secs(24 * 3600);

/// Bytes per read in the buffered copy path, one buffer per direction. 64 KiB
/// matches the default pipe and socket buffer sizes, so one read drains what
/// loopback TCP delivers at once (measured fastest in ../shared/NOTES.md).
pub const COPY_BUFFER_BYTES: usize = 64 * 1024;

/// Bytes per splice(2) call in the splice copy path. A pipe holds 64 KiB by
/// default; asking for more only returns short counts.
pub const SPLICE_CHUNK_BYTES: u32 = 64 * 1024;

/// Buffers a worker keeps for reuse after connections close. Buffers beyond
/// this are freed, so a burst does not leave memory held forever.
pub const COPY_BUFFER_POOL_MAX: usize = 1024;

/// Endpoints per cluster. Round robin and health state are per endpoint, per
/// worker; thousands of endpoints in one sidecar cluster is a config error.
pub const ENDPOINTS_PER_CLUSTER_MAX: usize = 4096;

/// Listeners and clusters per config: each listener is a socket per worker.
pub const LISTENERS_MAX: usize = 256;
/// See [`LISTENERS_MAX`].
pub const CLUSTERS_MAX: usize = 1024;

/// Config file size we are willing to parse; bounds start-up memory.
pub const CONFIG_FILE_BYTES_MAX: u64 = 4 * 1024 * 1024;

/// Pending control messages per worker mailbox. Control traffic is rare
/// (drain, snapshots); a full mailbox means the worker is wedged, and the
/// sender gets an error instead of queueing without bound.
pub const MAILBOX_CAPACITY: usize = 64;

/// How often a draining worker looks whether its connections are done
/// (messages themselves wake it at once: see `worker::mailbox`).
pub const MAILBOX_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// The longest a worker's mailbox loop sleeps with no message: a safety
/// net only (a message rings the worker awake), so an idle worker wakes
/// once a second instead of a hundred times (the 10 ms polling it
/// replaced cost an idle sidecar about 0.7% of a core).
pub const MAILBOX_IDLE_WAKE: Duration = Duration::from_secs(1);

/// Accept backlog per listener socket, per worker.
pub const LISTEN_BACKLOG: i32 = 1024;

/// Pause after an accept error such as EMFILE, so a worker out of fds does not
/// spin; connections wait in the backlog meanwhile.
pub const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

const _: () = assert!(SPLICE_CHUNK_BYTES as usize <= COPY_BUFFER_BYTES);
const _: () = assert!(MAX_CONNECTIONS_PER_WORKER_DEFAULT <= MAX_CONNECTIONS_PER_WORKER_MAX);
const _: () = assert!(CONNECT_ATTEMPTS_DEFAULT <= CONNECT_ATTEMPTS_MAX);

// ---- HTTP/1.1 -------------------------------------------------------------

/// Request head cap (request line + fields) before we answer 431; bounds
/// slow-loris memory per connection. Also the response head cap (502).
pub const HTTP1_HEAD_BYTES_DEFAULT: usize = 64 * 1024;
/// The most a listener may configure: one head must fit one read buffer
/// several times over, and a megabyte of headers is an attack, not a request.
pub const HTTP1_HEAD_BYTES_MAX: usize = 1024 * 1024;
/// Header fields per head before 431. Real clients send under 50.
pub const HTTP1_HEADERS_DEFAULT: usize = 100;
/// httparse parses into a fixed array of this many slots on the stack
/// (32 bytes each), so a listener may not configure more.
pub const HTTP1_HEADERS_MAX: usize = 256;
/// Request-target length before 414. Browsers cap URLs near 8 KiB too.
pub const HTTP1_URI_BYTES_DEFAULT: usize = 8 * 1024;
/// Bytes of chunk extensions on one chunk-size line: extensions are ignored
/// by every real peer, so a long one is only ever a resource attack.
pub const HTTP1_CHUNK_LINE_BYTES_MAX: usize = 4 * 1024;
/// Hex digits in a chunk size (leading zeros included): 16 digits already
/// express u64::MAX; more is an overflow attempt.
pub const HTTP1_CHUNK_SIZE_DIGITS_MAX: usize = 16;
/// Total bytes of a chunked body's trailer section. Trailers are validated
/// and kept this far for the next hop (a trailer section is rarely more
/// than a checksum or a status; HTTP/2's header-list limit bounds the h2
/// side).
pub const HTTP1_TRAILER_BYTES_MAX: usize = 16 * 1024;

const _: () = assert!(HTTP1_HEAD_BYTES_DEFAULT <= HTTP1_HEAD_BYTES_MAX);
const _: () = assert!(HTTP1_HEADERS_DEFAULT <= HTTP1_HEADERS_MAX);

// ---- HTTP routing and upstreams --------------------------------------------

/// Routes per listener: matched in order per request, so a long list is
/// latency on every request as well as a config smell.
pub const ROUTES_PER_LISTENER_MAX: usize = 1024;

/// Latency series one config may name: one per listener, one per route,
/// two per cluster. Each worker keeps each series (allocated on first
/// record, at most ~25 KiB for a route or cluster series, ~188 KiB for a
/// listener's; see `metrics::histograms`), so this bounds histogram memory
/// per worker to ~150 MiB in the worst case.
pub const HISTOGRAM_SERIES_MAX: usize = 4096;
/// Clusters one route may split traffic across.
pub const WEIGHTED_CLUSTERS_MAX: usize = 64;
/// Header matches per route.
pub const ROUTE_HEADER_MATCHES_MAX: usize = 32;
/// Header edits (add + set + remove) per route.
pub const ROUTE_HEADER_EDITS_MAX: usize = 64;
/// Time to receive the response head once a request is routed, unless the
/// route says otherwise (then 504).
pub const REQUEST_TIMEOUT_DEFAULT: Duration = Duration::from_secs(15);

/// Time a client gets to send a whole request head once it sent its first
/// byte (slow-loris bound; the idle timeout covers the wait before it).
/// Real clients send a head in one write; 10 s covers a slow mobile link.
pub const REQUEST_HEAD_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// Tries per request (the first one plus retries). Each retry is also
/// bounded by the cluster's retry budget.
pub const RETRY_ATTEMPTS_DEFAULT: u32 = 2;
/// A route may not ask for more tries: past this a retry storm costs more
/// than the failure it hides.
pub const RETRY_ATTEMPTS_MAX: u32 = 5;
/// Retries may add at most this share (percent) of a cluster's active
/// requests on each worker; beyond it, failures are returned, not retried.
pub const RETRY_BUDGET_PERCENT_DEFAULT: u32 = 20;
/// Retries always allowed per worker and cluster regardless of the budget,
/// so a quiet cluster can still retry its occasional failure.
pub const RETRY_BUDGET_MIN_CONCURRENT: u64 = 3;
/// Idle keep-alive connections kept per endpoint, per worker. It must
/// cover the worker's peak concurrency to that endpoint: below it,
/// connections returned after a burst are closed and reopened for the next
/// one (at 32, 64 concurrent clients churned a new upstream connection
/// every 25 requests, measured with strace). Idle ones still expire after
/// the pool idle timeout.
pub const POOL_IDLE_PER_ENDPOINT_DEFAULT: usize = 256;
/// The most a cluster may configure: idle sockets cost fds on both sides.
pub const POOL_IDLE_PER_ENDPOINT_MAX: usize = 4096;
/// An idle pooled connection older than this is closed rather than reused;
/// below common upstream keep-alive timeouts (nginx: 75 s, Node: 5 s is
/// lower, so set it per cluster for such upstreams).
pub const POOL_IDLE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(60);
/// Outlier detection: consecutive failures (connect failure or 5xx) that
/// eject an endpoint on a worker.
pub const OUTLIER_CONSECUTIVE_FAILURES_DEFAULT: u32 = 5;
/// First ejection time; each further ejection doubles it up to the max.
pub const OUTLIER_BASE_EJECTION_DEFAULT: Duration = Duration::from_secs(10);
/// See [`OUTLIER_BASE_EJECTION_DEFAULT`].
pub const OUTLIER_MAX_EJECTION_DEFAULT: Duration = Duration::from_secs(300);
/// Never eject more than this share (percent) of a cluster's endpoints.
pub const OUTLIER_MAX_EJECTED_PERCENT_DEFAULT: u32 = 50;
/// Health-check response bytes read before the check counts as failed.
pub const HEALTH_CHECK_RESPONSE_BYTES_MAX: usize = 16 * 1024;

/// The share of requests without a caller's sampling decision that start
/// a sampled trace: 1%, Envoy's and Istio's default, enough to see every
/// busy path while costing the collector little.
pub const TRACE_SAMPLE_RATE_DEFAULT: f64 = 0.01;

/// The largest rate a local rate limit may name (per second, whole
/// process): beyond, a limit protects nothing a sidecar could serve.
pub const RATE_LIMIT_PER_SECOND_MAX: u32 = 10_000_000;

/// Name servers in `[dns] resolvers`: each is tried in turn when the one
/// before does not answer, so more than a few only adds waiting.
pub const DNS_RESOLVERS_MAX: usize = 8;
/// How often names are resolved again by default (Envoy's default too).
pub const DNS_REFRESH_DEFAULT: std::time::Duration = std::time::Duration::from_secs(5);
/// The shortest refresh: a round asks for every name, A and AAAA.
pub const DNS_REFRESH_MIN: std::time::Duration = std::time::Duration::from_millis(100);
/// Host names resolved in all (every cluster's together): each is asked
/// every refresh, so the count bounds the resolver thread's work.
pub const DNS_NAMES_MAX: usize = 1024;
/// How long one name server has to answer one query.
pub const DNS_QUERY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
