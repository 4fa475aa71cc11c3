//! Transparent interception: connections the redirect rules ([`rules`])
//! send to the `[intercept]` listeners, served by where they were going.
//!
//! Outbound (the app's own connections out): the original destination
//! (and a ClientHello's SNI) picks a cluster by its `destinations`;
//! detected HTTP/1.x and HTTP/2 get the full HTTP pipeline with that
//! cluster (mTLS origination to the peer sidecar included), anything else
//! the L4 relay to it; a destination no cluster claims is passed through
//! or refused, per `outbound_policy`.
//!
//! Inbound (callers in): mTLS from peer sidecars is terminated (ALPN `h2`
//! or `http/1.1`: HTTP pipeline; none: opaque TCP) and authorized, then
//! sent to the local app on the port the caller dialled (an inbound
//! cluster for that port, else `127.0.0.1:port`). Plaintext callers are
//! refused (`strict`) or served without an identity (`permissive`).
//!
//! What must hold: no connection loops (a connection whose original
//! destination is this proxy's own listener is closed and counted; the
//! proxy's own connections are excluded by the rules); detection reads
//! at most [`detect::DETECT_BYTES_MAX`] bytes for at most the configured
//! timeout and consumes nothing; every outcome is counted.

pub mod detect;
pub mod rules;
pub mod socket;

use std::{
    cell::Cell,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    rc::Rc,
    time::{Duration, Instant},
};

use monoio::net::TcpStream;
use serde::Serialize;

use crate::{
    config::{
        intercept::{Direction, InboundMode, OutboundPolicy},
        Config, CopyMode,
    },
    http::{self, Accepted},
    l4,
    metrics::{self, add},
    tls::{identity, stream::Stream},
    worker::{gate::Slot, Worker},
};
use detect::Detected;

/// Time a passed-through connection (no cluster claimed its destination)
/// gets to connect to where the app meant to go. The app's own connect
/// already succeeded (to us), so this is the real connect's budget.
const PASSTHROUGH_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Interception counters of one worker.
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections whose original destination was one of our listeners.
    pub loops: Cell<u64>,
    /// Connections without a readable original destination (not
    /// redirected, or conntrack missing).
    pub no_original_dst: Cell<u64>,
    pub detected_http1: Cell<u64>,
    pub detected_http2: Cell<u64>,
    pub detected_tls: Cell<u64>,
    pub detected_opaque: Cell<u64>,
    /// Detection ran out of time (taken as opaque).
    pub detect_timeouts: Cell<u64>,
    /// Connections to an `opaque_ports` port: no detection.
    pub detect_skipped: Cell<u64>,
    pub outbound_routed: Cell<u64>,
    pub outbound_passthrough: Cell<u64>,
    pub outbound_denied: Cell<u64>,
    pub inbound_mtls: Cell<u64>,
    /// Plaintext callers let in (permissive).
    pub inbound_plaintext: Cell<u64>,
    /// Plaintext callers closed (strict).
    pub inbound_plaintext_refused: Cell<u64>,
    /// mTLS callers refused by the listener's `authorize` (opaque TCP;
    /// HTTP refusals are 403s, counted with the HTTP counters).
    pub inbound_unauthorized: Cell<u64>,
}

/// A copy of [`Counters`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    pub loops: u64,
    pub no_original_dst: u64,
    pub detected_http1: u64,
    pub detected_http2: u64,
    pub detected_tls: u64,
    pub detected_opaque: u64,
    pub detect_timeouts: u64,
    pub detect_skipped: u64,
    pub outbound_routed: u64,
    pub outbound_passthrough: u64,
    pub outbound_denied: u64,
    pub inbound_mtls: u64,
    pub inbound_plaintext: u64,
    pub inbound_plaintext_refused: u64,
    pub inbound_unauthorized: u64,
}

/// A counter's name, help text and value, for the Prometheus page.
pub type Field = (&'static str, &'static str, fn(&Snapshot) -> u64);

/// Every counter, for the Prometheus page.
pub const FIELDS: &[Field] = &[
    (
        "loops",
        "Intercepted connections closed because their original destination was this proxy.",
        |s| s.loops,
    ),
    (
        "no_original_dst",
        "Intercepted connections without an original destination (closed).",
        |s| s.no_original_dst,
    ),
    (
        "detected_http1",
        "Outbound intercepted connections detected as HTTP/1.x.",
        |s| s.detected_http1,
    ),
    (
        "detected_http2",
        "Outbound intercepted connections detected as HTTP/2 (prior knowledge).",
        |s| s.detected_http2,
    ),
    (
        "detected_tls",
        "Outbound intercepted connections detected as TLS (the app's own).",
        |s| s.detected_tls,
    ),
    (
        "detected_opaque",
        "Outbound intercepted connections detected as opaque TCP.",
        |s| s.detected_opaque,
    ),
    (
        "detect_timeouts",
        "Protocol detections that ran out of time (taken as opaque TCP).",
        |s| s.detect_timeouts,
    ),
    (
        "detect_skipped",
        "Connections to opaque_ports: no detection.",
        |s| s.detect_skipped,
    ),
    (
        "outbound_routed",
        "Outbound connections sent to the cluster their destination matched.",
        |s| s.outbound_routed,
    ),
    (
        "outbound_passthrough",
        "Outbound connections no cluster claimed, passed through.",
        |s| s.outbound_passthrough,
    ),
    (
        "outbound_denied",
        "Outbound connections no cluster claimed, refused (outbound_policy deny).",
        |s| s.outbound_denied,
    ),
    (
        "inbound_mtls",
        "Inbound connections from mesh peers (mTLS).",
        |s| s.inbound_mtls,
    ),
    (
        "inbound_plaintext",
        "Inbound plaintext connections let in (permissive).",
        |s| s.inbound_plaintext,
    ),
    (
        "inbound_plaintext_refused",
        "Inbound plaintext connections refused (strict).",
        |s| s.inbound_plaintext_refused,
    ),
    (
        "inbound_unauthorized",
        "Inbound opaque mTLS connections refused by authorize.",
        |s| s.inbound_unauthorized,
    ),
];

impl Counters {
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            loops: self.loops.get(),
            no_original_dst: self.no_original_dst.get(),
            detected_http1: self.detected_http1.get(),
            detected_http2: self.detected_http2.get(),
            detected_tls: self.detected_tls.get(),
            detected_opaque: self.detected_opaque.get(),
            detect_timeouts: self.detect_timeouts.get(),
            detect_skipped: self.detect_skipped.get(),
            outbound_routed: self.outbound_routed.get(),
            outbound_passthrough: self.outbound_passthrough.get(),
            outbound_denied: self.outbound_denied.get(),
            inbound_mtls: self.inbound_mtls.get(),
            inbound_plaintext: self.inbound_plaintext.get(),
            inbound_plaintext_refused: self.inbound_plaintext_refused.get(),
            inbound_unauthorized: self.inbound_unauthorized.get(),
        }
    }

    fn detected(&self, d: &Detected) {
        add(
            match d {
                Detected::Http1 => &self.detected_http1,
                Detected::Http2 => &self.detected_http2,
                Detected::Tls { .. } => &self.detected_tls,
                Detected::Opaque | Detected::NeedMore => &self.detected_opaque,
            },
            1,
        );
    }
}

impl Snapshot {
    pub fn merge(&mut self, o: &Snapshot) {
        self.loops += o.loops;
        self.no_original_dst += o.no_original_dst;
        self.detected_http1 += o.detected_http1;
        self.detected_http2 += o.detected_http2;
        self.detected_tls += o.detected_tls;
        self.detected_opaque += o.detected_opaque;
        self.detect_timeouts += o.detect_timeouts;
        self.detect_skipped += o.detect_skipped;
        self.outbound_routed += o.outbound_routed;
        self.outbound_passthrough += o.outbound_passthrough;
        self.outbound_denied += o.outbound_denied;
        self.inbound_mtls += o.inbound_mtls;
        self.inbound_plaintext += o.inbound_plaintext;
        self.inbound_plaintext_refused += o.inbound_plaintext_refused;
        self.inbound_unauthorized += o.inbound_unauthorized;
    }
}

/// The cluster whose `destinations` claim a connection to `dst` (with
/// this SNI) on this side; the first in config order wins.
pub fn cluster_for(
    config: &Config,
    direction: Direction,
    dst: SocketAddr,
    sni: Option<&str>,
) -> Option<usize> {
    config.clusters.iter().position(|c| {
        c.direction == direction && c.destinations.iter().any(|d| d.matches(dst, sni))
    })
}

/// Serves one connection accepted on an intercept listener.
pub async fn serve(
    worker: Rc<Worker>,
    listener_index: usize,
    stream: TcpStream,
    peer: SocketAddr,
    conn_id: u64,
    _slot: Slot,
) {
    let _active = metrics::ActiveGuard::new(&worker.counters.connections_active);
    let accepted = Instant::now();
    let counters = &worker.counters.intercept;
    let listener = &worker.config.listeners[listener_index];
    let dst = match socket::original_dst(&stream, peer) {
        Ok(dst) => dst,
        Err(e) => {
            add(&counters.no_original_dst, 1);
            tracing::debug!(conn_id, %peer, error = %e, "no original destination; closing");
            return;
        }
    };
    if is_own(&worker, &stream, dst) {
        add(&counters.loops, 1);
        // Counted; logged at debug only: any process in the pod can open
        // such connections, and a line per connection would flood the log.
        tracing::debug!(conn_id, %peer, %dst, listener = %listener.name, "connection to the proxy's own listener on an intercept port (a loop, or a direct call); closing");
        return;
    }
    let _ = stream.set_nodelay(true);
    match listener.direction {
        Some(Direction::Outbound) => {
            outbound(
                &worker,
                listener_index,
                stream,
                peer,
                dst,
                conn_id,
                accepted,
            )
            .await
        }
        Some(Direction::Inbound) => {
            inbound(
                &worker,
                listener_index,
                stream,
                peer,
                dst,
                conn_id,
                accepted,
            )
            .await
        }
        None => {}
    }
}

/// Whether `dst` is this proxy itself: the connection was not redirected
/// (its original destination is the listener it arrived on), or it was
/// bound for another of our listeners.
fn is_own(worker: &Worker, stream: &TcpStream, dst: SocketAddr) -> bool {
    let local = stream
        .local_addr()
        .map(|a| SocketAddr::new(crate::config::intercept::canonical(a.ip()), a.port()));
    if local.is_ok_and(|l| l == dst) {
        return true;
    }
    worker.binds.iter().any(|b| {
        b.port() == dst.port()
            && (b.ip() == dst.ip() || (b.ip().is_unspecified() && dst.ip().is_loopback()))
    })
}

async fn outbound(
    worker: &Rc<Worker>,
    listener_index: usize,
    stream: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    conn_id: u64,
    accepted: Instant,
) {
    let Some(settings) = &worker.config.intercept else {
        return;
    };
    let counters = &worker.counters.intercept;
    let detected = if settings.opaque_ports.contains(&dst.port()) {
        add(&counters.detect_skipped, 1);
        Detected::Opaque
    } else {
        let peeked = socket::detect_on(&stream, settings.detect_timeout, &worker.buffers).await;
        if peeked.closed {
            return;
        }
        if peeked.timed_out {
            add(&counters.detect_timeouts, 1);
        }
        counters.detected(&peeked.detected);
        peeked.detected
    };
    worker.histograms.detect(listener_index, accepted.elapsed());
    let sni = match &detected {
        Detected::Tls { sni, .. } => sni.as_deref(),
        _ => None,
    };
    let Some(cluster) = cluster_for(&worker.config, Direction::Outbound, dst, sni) else {
        match settings.outbound_policy {
            OutboundPolicy::Deny => {
                add(&counters.outbound_denied, 1);
                tracing::debug!(conn_id, %peer, %dst, "no cluster claims this destination; refused (outbound_policy deny)");
            }
            OutboundPolicy::Passthrough => {
                add(&counters.outbound_passthrough, 1);
                tracing::debug!(conn_id, %peer, %dst, "no cluster claims this destination; passed through");
                let Some(upstream) = connect_plain(dst).await else {
                    metrics::add(&worker.counters.connections_unrouted, 1);
                    return;
                };
                let hop = Hop {
                    cluster: None,
                    client_tls: false,
                    caller: None,
                };
                relay(
                    worker,
                    listener_index,
                    Stream::Plain(stream),
                    upstream,
                    hop,
                    conn_id,
                )
                .await;
            }
        }
        return;
    };
    add(&counters.outbound_routed, 1);
    tracing::debug!(conn_id, %peer, %dst, cluster = %worker.config.clusters[cluster].name, ?detected, "intercepted");
    match detected {
        Detected::Http1 | Detected::Http2 => {
            let conn = Accepted {
                stream: Stream::Plain(stream),
                identity: None,
                h2: false,
                cluster: Some(cluster),
            };
            http::serve_accepted(Rc::clone(worker), listener_index, conn, peer, conn_id).await;
        }
        _ => {
            let Some((upstream, _)) = l4::connect::connect(worker, cluster).await else {
                metrics::add(&worker.counters.connections_unrouted, 1);
                return;
            };
            let hop = Hop {
                cluster: Some(cluster),
                client_tls: false,
                caller: None,
            };
            relay(
                worker,
                listener_index,
                Stream::Plain(stream),
                upstream,
                hop,
                conn_id,
            )
            .await;
        }
    }
}

async fn inbound(
    worker: &Rc<Worker>,
    listener_index: usize,
    stream: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    conn_id: u64,
    accepted: Instant,
) {
    let Some(settings) = &worker.config.intercept else {
        return;
    };
    let counters = &worker.counters.intercept;
    let listener = &worker.config.listeners[listener_index];
    let first = socket::first_byte(&stream, settings.detect_timeout).await;
    // Inbound, the first byte decides (TLS or plaintext); permissive
    // plaintext then peeks further, which the HTTP pipeline's own
    // timings cover.
    worker.histograms.detect(listener_index, accepted.elapsed());
    let tls = match (&listener.tls, first) {
        // A TLS record of type handshake: a ClientHello.
        (Some(tls), Some(0x16)) => Some(tls),
        _ => None,
    };
    let cluster = cluster_for(&worker.config, Direction::Inbound, dst, None);
    if let Some(tls) = tls {
        let accepted = worker
            .tls
            .accept(
                &worker.counters.tls,
                tls,
                true,
                stream,
                &listener.name,
                conn_id,
            )
            .await;
        let Some((stream, caller)) = accepted else {
            return;
        };
        add(&counters.inbound_mtls, 1);
        if caller.h2 || caller.http1 {
            let conn = Accepted {
                stream,
                identity: caller.identity,
                h2: caller.h2,
                cluster,
            };
            http::serve_accepted(Rc::clone(worker), listener_index, conn, peer, conn_id).await;
            return;
        }
        if let Some(allow) = &listener.authorize {
            let id = caller.identity.as_ref();
            let allowed = id.is_some_and(|id| identity::allowed(allow, id));
            worker
                .counters
                .tls
                .decision(&listener.name, id.map(|i| i.as_str()), allowed);
            if !allowed {
                add(&counters.inbound_unauthorized, 1);
                tracing::debug!(conn_id, %peer, caller = ?id.map(|i| i.as_str()), "caller not authorized; closing");
                return;
            }
        }
        let hop = Hop {
            cluster,
            client_tls: true,
            caller: caller.identity.as_ref().map(|i| i.as_str()),
        };
        to_app(worker, listener_index, stream, hop, dst, conn_id).await;
        return;
    }
    match settings.inbound_mode {
        InboundMode::Strict => {
            add(&counters.inbound_plaintext_refused, 1);
            tracing::debug!(conn_id, %peer, %dst, "plaintext caller refused (inbound_mode strict)");
        }
        InboundMode::Permissive => {
            add(&counters.inbound_plaintext, 1);
            let detected = if settings.opaque_ports.contains(&dst.port()) || first.is_none() {
                Detected::Opaque
            } else {
                socket::detect_on(&stream, settings.detect_timeout, &worker.buffers)
                    .await
                    .detected
            };
            tracing::debug!(conn_id, %peer, %dst, ?detected, "plaintext caller (inbound_mode permissive)");
            match detected {
                Detected::Http1 | Detected::Http2 => {
                    let conn = Accepted {
                        stream: Stream::Plain(stream),
                        identity: None,
                        h2: false,
                        cluster,
                    };
                    http::serve_accepted(Rc::clone(worker), listener_index, conn, peer, conn_id)
                        .await;
                }
                _ if listener.authorize.is_some() => {
                    // No identity cannot be on an allow-list.
                    add(&counters.inbound_unauthorized, 1);
                }
                _ => {
                    to_app(
                        worker,
                        listener_index,
                        Stream::Plain(stream),
                        Hop {
                            cluster,
                            client_tls: false,
                            caller: None,
                        },
                        dst,
                        conn_id,
                    )
                    .await
                }
            }
        }
    }
}

/// Opaque inbound bytes to the local app: the inbound cluster for the
/// port, else the port on loopback (which the rules never capture).
async fn to_app(
    worker: &Rc<Worker>,
    listener_index: usize,
    client: Stream,
    hop: Hop<'_>,
    dst: SocketAddr,
    conn_id: u64,
) {
    let upstream = match hop.cluster {
        Some(c) => l4::connect::connect(worker, c).await.map(|(s, _)| s),
        None => {
            let app = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), dst.port());
            connect_plain(app).await
        }
    };
    let Some(upstream) = upstream else {
        metrics::add(&worker.counters.connections_unrouted, 1);
        tracing::debug!(conn_id, %dst, "the local app did not accept; closing");
        return;
    };
    relay(worker, listener_index, client, upstream, hop, conn_id).await;
}

/// What a relayed connection's golden metrics are labelled with.
struct Hop<'a> {
    cluster: Option<usize>,
    client_tls: bool,
    caller: Option<&'a str>,
}

/// A plaintext connect to where a connection was going (passthrough, or
/// the local app), bounded by [`PASSTHROUGH_CONNECT_TIMEOUT`].
async fn connect_plain(addr: SocketAddr) -> Option<Stream> {
    let connected =
        monoio::time::timeout(PASSTHROUGH_CONNECT_TIMEOUT, TcpStream::connect_addr(addr)).await;
    let Ok(Ok(s)) = connected else {
        return None;
    };
    let _ = s.set_nodelay(true);
    Some(Stream::Plain(s))
}

/// Bytes both ways until either side is done or the pair idles out.
async fn relay(
    worker: &Rc<Worker>,
    listener_index: usize,
    client: Stream,
    upstream: Stream,
    hop: Hop<'_>,
    conn_id: u64,
) {
    let listener = &worker.config.listeners[listener_index];
    let started = Instant::now();
    let tally = l4::copy::Tally::default();
    let copied = l4::copy::both_ways(worker, CopyMode::Auto, client, upstream, &tally);
    let outcome = monoio::select! {
        r = copied => Some(r),
        _ = l4::idle(&tally.activity, listener.idle_timeout) => None,
    };
    worker.histograms.relayed(listener_index, started.elapsed());
    worker.counters.golden.tcp(
        crate::metrics::golden::LabelsRef::of(
            &worker.config,
            listener_index,
            None,
            hop.cluster,
            hop.client_tls,
            hop.caller,
        ),
        tally.up.get(),
        tally.down.get(),
    );
    match outcome {
        Some(Ok(())) => tracing::debug!(conn_id, "closed cleanly"),
        Some(Err(e)) => tracing::debug!(conn_id, error = %e, "closed on error"),
        None => metrics::add(&worker.counters.idle_timeouts, 1),
    }
}
