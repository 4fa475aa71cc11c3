//! Golden metrics: who calls whom, how often it fails, how long it takes.
//!
//! One core's table of series, each keyed by the mesh labels an operator
//! asks by: direction (inbound/outbound), listener, route, cluster, whether
//! the peer hop is TLS, and the peer's identity (the caller's SPIFFE ID
//! inbound, the server identity the cluster verifies outbound). HTTP series
//! count requests, responses by status code and gRPC status, and request
//! durations in fixed buckets; TCP series count connections and bytes.
//!
//! What must hold:
//! - **One count per request.** A request is recorded once, when it ends,
//!   in exactly one series (unlike the latency histograms, where a routed
//!   request is in its listener's and its route's).
//! - **Bounded.** Names come from the config; identities are capped at
//!   [`IDENTITIES_MAX`] per core (others are [`OVERFLOW`]), status codes
//!   per series at [`CODES_MAX`], series per core at [`SERIES_MAX`] (others
//!   go to one series whose labels are all [`OVERFLOW`]).
//! - **No allocation on the hot path** once a series exists: lookups hash
//!   borrowed label values and compare them in place.
//! - **Per core.** Summed over cores only when served ([`merge`]).

use std::{
    cell::RefCell,
    collections::{HashMap, HashSet},
    hash::{BuildHasher, BuildHasherDefault, Hasher},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::config::intercept::Direction;

/// Distinct peer identities one core labels series with: a mesh where
/// one service has more distinct callers than this is unusual, and each
/// identity multiplies the series. Beyond it the label is [`OVERFLOW`].
pub const IDENTITIES_MAX: usize = 100;
/// Label sets one core keeps: listeners × routes × clusters × identities
/// of a large config, with room. Beyond it requests are counted in one
/// series whose labels are all [`OVERFLOW`].
pub const SERIES_MAX: usize = 4096;
/// Distinct (status code, gRPC status) pairs one series keeps; beyond it
/// the code is counted as 0 ("other"). Real services answer with a
/// handful.
pub const CODES_MAX: usize = 32;
/// The label value that stands for "over the bound".
pub const OVERFLOW: &str = "overflow";

/// Request duration bucket upper bounds, µs: 100 µs (a sidecar hop on
/// loopback) to 30 s (a slow call), about three per decade.
pub const BUCKETS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 10_000_000, 30_000_000,
];

/// The labels of one series, borrowed from the request being recorded.
#[derive(Debug, Clone, Copy)]
pub struct LabelsRef<'a> {
    pub direction: Direction,
    pub listener: &'a str,
    pub route: Option<&'a str>,
    pub cluster: Option<&'a str>,
    pub tls: bool,
    pub peer: Option<&'a str>,
}

impl<'a> LabelsRef<'a> {
    /// The labels of a request or connection on `listener` sent to
    /// `cluster`. Inbound, the peer is the caller (its verified identity,
    /// TLS if the client connection is); outbound, the peer is the
    /// upstream (the identity the cluster verifies, TLS if it originates
    /// it).
    pub fn of(
        config: &'a crate::config::Config,
        listener: usize,
        route: Option<&'a str>,
        cluster: Option<usize>,
        client_tls: bool,
        caller: Option<&'a str>,
    ) -> Self {
        let l = &config.listeners[listener];
        let c = cluster.map(|c| &config.clusters[c]);
        let (tls, peer) = match l.traffic {
            Direction::Inbound => (client_tls, caller),
            Direction::Outbound => {
                let tls = c.and_then(|c| c.tls.as_ref());
                (tls.is_some(), tls.map(|t| t.server_identity.as_str()))
            }
        };
        Self {
            direction: l.traffic,
            listener: &l.name,
            route,
            cluster: c.map(|c| c.name.as_str()),
            tls,
            peer,
        }
    }
}

/// The labels of one series, owned.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Labels {
    pub direction: Direction,
    pub listener: String,
    pub route: Option<String>,
    pub cluster: Option<String>,
    pub tls: bool,
    pub peer: Option<String>,
}

impl Labels {
    fn of(l: &LabelsRef<'_>) -> Self {
        Self {
            direction: l.direction,
            listener: l.listener.to_string(),
            route: l.route.map(str::to_string),
            cluster: l.cluster.map(str::to_string),
            tls: l.tls,
            peer: l.peer.map(str::to_string),
        }
    }

    fn is(&self, l: &LabelsRef<'_>) -> bool {
        self.direction == l.direction
            && self.tls == l.tls
            && self.listener == l.listener
            && self.route.as_deref() == l.route
            && self.cluster.as_deref() == l.cluster
            && self.peer.as_deref() == l.peer
    }

    fn overflow(direction: Direction) -> Self {
        let o = || Some(OVERFLOW.to_string());
        Self {
            direction,
            listener: OVERFLOW.to_string(),
            route: o(),
            cluster: o(),
            tls: false,
            peer: o(),
        }
    }
}

/// One HTTP series.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Http {
    pub requests: u64,
    /// (status code sent, gRPC status, count); code 0: none was sent.
    pub responses: Vec<(u16, Option<u32>, u64)>,
    /// Requests per [`BUCKETS_US`] bucket (not cumulative); the last
    /// entry counts those over the largest bound.
    pub buckets: [u64; BUCKETS_US.len() + 1],
    pub duration_us_sum: u64,
}

impl Http {
    fn record(&mut self, status: u16, grpc: Option<u32>, took: Duration) {
        self.requests += 1;
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.duration_us_sum = self.duration_us_sum.saturating_add(us);
        self.buckets[BUCKETS_US.partition_point(|&le| le < us)] += 1;
        let key = if self.responses.len() >= CODES_MAX
            && !self
                .responses
                .iter()
                .any(|(c, g, _)| *c == status && *g == grpc)
        {
            (0, None)
        } else {
            (status, grpc)
        };
        match self.responses.iter_mut().find(|(c, g, _)| (*c, *g) == key) {
            Some((_, _, n)) => *n += 1,
            None => self.responses.push((key.0, key.1, 1)),
        }
    }

    fn merge(&mut self, o: &Http) {
        self.requests += o.requests;
        self.duration_us_sum = self.duration_us_sum.saturating_add(o.duration_us_sum);
        for (a, b) in self.buckets.iter_mut().zip(o.buckets) {
            *a += b;
        }
        for &(c, g, n) in &o.responses {
            match self
                .responses
                .iter_mut()
                .find(|(c2, g2, _)| (*c2, *g2) == (c, g))
            {
                Some((_, _, m)) => *m += n,
                None => self.responses.push((c, g, n)),
            }
        }
    }
}

/// One TCP series.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Tcp {
    pub connections: u64,
    /// Bytes from the client (sent upstream) and to it.
    pub bytes_received: u64,
    pub bytes_sent: u64,
}

/// A small, fast, fixed hasher (the Fx multiply-rotate) for label
/// strings: the keys are config names and verified identities, not
/// attacker-chosen at will, and the table is bounded anyway.
#[derive(Debug, Default, Clone, Copy)]
struct Fx(u64);

impl Hasher for Fx {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let word = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(K);
        }
        for &b in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(K);
        }
    }

    fn write_u64(&mut self, n: u64) {
        // A precomputed hash as the key: used as it is.
        self.0 = self.0.rotate_left(5) ^ n;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type Fixed = BuildHasherDefault<Fx>;

#[derive(Debug)]
struct Table<T> {
    /// Hash of the borrowed labels → the series with that hash.
    series: HashMap<u64, Vec<(Labels, T)>, Fixed>,
    len: usize,
}

impl<T: Default> Table<T> {
    fn new() -> Self {
        Self {
            series: HashMap::default(),
            len: 0,
        }
    }

    fn get(&mut self, l: &LabelsRef<'_>) -> &mut T {
        let hash = hash(l);
        // The common case, an existing series: found without allocating.
        let found = self
            .series
            .get(&hash)
            .and_then(|v| v.iter().position(|(k, _)| k.is(l)));
        if let Some(i) = found {
            let bucket = self.series.get_mut(&hash).expect("found just above");
            return &mut bucket[i].1;
        }
        let labels = if self.len < SERIES_MAX {
            Labels::of(l)
        } else {
            Labels::overflow(l.direction)
        };
        let bucket = self.series.entry(hash_owned(&labels)).or_default();
        let at = match bucket.iter().position(|(k, _)| *k == labels) {
            Some(i) => i,
            None => {
                self.len += 1;
                bucket.push((labels, T::default()));
                bucket.len() - 1
            }
        };
        &mut bucket[at].1
    }

    fn snapshot(&self) -> Vec<(Labels, T)>
    where
        T: Clone,
    {
        self.series.values().flatten().cloned().collect()
    }
}

fn hash(l: &LabelsRef<'_>) -> u64 {
    Fixed::default().hash_one((l.direction, l.listener, l.route, l.cluster, l.tls, l.peer))
}

fn hash_owned(l: &Labels) -> u64 {
    hash(&LabelsRef {
        direction: l.direction,
        listener: &l.listener,
        route: l.route.as_deref(),
        cluster: l.cluster.as_deref(),
        tls: l.tls,
        peer: l.peer.as_deref(),
    })
}

/// One core's golden metrics.
#[derive(Debug)]
pub struct Golden {
    http: RefCell<Table<Http>>,
    tcp: RefCell<Table<Tcp>>,
    identities: RefCell<HashSet<String, Fixed>>,
}

impl Default for Golden {
    fn default() -> Self {
        Self {
            http: RefCell::new(Table::new()),
            tcp: RefCell::new(Table::new()),
            identities: RefCell::default(),
        }
    }
}

/// A core's series, or the sum of several cores'.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Snapshot {
    pub http: Vec<(Labels, Http)>,
    pub tcp: Vec<(Labels, Tcp)>,
}

impl Golden {
    /// `peer` as a label value: itself while this core has seen fewer
    /// than [`IDENTITIES_MAX`] identities (or has seen it), else
    /// [`OVERFLOW`].
    fn peer<'a>(&self, peer: Option<&'a str>) -> Option<&'a str> {
        let id = peer?;
        let mut known = self.identities.borrow_mut();
        if known.contains(id) {
            return Some(id);
        }
        if known.len() < IDENTITIES_MAX {
            known.insert(id.to_string());
            return Some(id);
        }
        Some(OVERFLOW)
    }

    /// An HTTP request that ended with `status` (0: no response sent).
    pub fn http(&self, labels: LabelsRef<'_>, status: u16, grpc: Option<u32>, took: Duration) {
        let labels = LabelsRef {
            peer: self.peer(labels.peer),
            ..labels
        };
        self.http
            .borrow_mut()
            .get(&labels)
            .record(status, grpc, took);
    }

    /// A TCP connection that closed after moving these bytes.
    pub fn tcp(&self, labels: LabelsRef<'_>, received: u64, sent: u64) {
        let labels = LabelsRef {
            peer: self.peer(labels.peer),
            ..labels
        };
        let mut table = self.tcp.borrow_mut();
        let s = table.get(&labels);
        s.connections += 1;
        s.bytes_received += received;
        s.bytes_sent += sent;
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            http: self.http.borrow().snapshot(),
            tcp: self.tcp.borrow().snapshot(),
        }
    }
}

/// Sums cores' snapshots series by series, sorted by labels.
pub fn merge<'a>(parts: impl IntoIterator<Item = &'a Snapshot>) -> Snapshot {
    let mut http: HashMap<Labels, Http> = HashMap::new();
    let mut tcp: HashMap<Labels, Tcp> = HashMap::new();
    for p in parts {
        for (l, s) in &p.http {
            http.entry(l.clone()).or_default().merge(s);
        }
        for (l, s) in &p.tcp {
            let t = tcp.entry(l.clone()).or_default();
            t.connections += s.connections;
            t.bytes_received += s.bytes_received;
            t.bytes_sent += s.bytes_sent;
        }
    }
    let mut out = Snapshot {
        http: http.into_iter().collect(),
        tcp: tcp.into_iter().collect(),
    };
    out.http.sort_by(|a, b| a.0.cmp(&b.0));
    out.tcp.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, h) in &mut out.http {
        h.responses.sort_unstable();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels<'a>(listener: &'a str, peer: Option<&'a str>) -> LabelsRef<'a> {
        LabelsRef {
            direction: Direction::Inbound,
            listener,
            route: Some("api"),
            cluster: Some("app"),
            tls: true,
            peer,
        }
    }

    #[test]
    fn each_request_counts_once_in_its_series() {
        let g = Golden::default();
        let ms = Duration::from_millis(1);
        g.http(labels("in", Some("spiffe://a")), 200, None, ms);
        g.http(labels("in", Some("spiffe://a")), 503, None, ms * 20);
        g.http(labels("in", Some("spiffe://b")), 200, Some(0), ms);
        let s = merge([&g.snapshot()]);
        assert_eq!(s.http.len(), 2);
        let a = &s
            .http
            .iter()
            .find(|(l, _)| l.peer.as_deref() == Some("spiffe://a"))
            .unwrap()
            .1;
        assert_eq!(a.requests, 2);
        assert_eq!(a.responses, vec![(200, None, 1), (503, None, 1)]);
        assert_eq!(a.buckets.iter().sum::<u64>(), 2);
        // 1 ms is in the (500 µs, 1 ms] bucket, 20 ms in (10, 25] ms.
        assert_eq!(a.buckets[3], 1);
        assert_eq!(a.buckets[7], 1);
        assert_eq!(a.duration_us_sum, 21_000);
    }

    #[test]
    fn identities_over_the_cap_are_overflow() {
        let g = Golden::default();
        let ids: Vec<String> = (0..IDENTITIES_MAX + 5)
            .map(|i| format!("spiffe://mesh/sa/{i}"))
            .collect();
        for id in &ids {
            g.http(labels("in", Some(id)), 200, None, Duration::ZERO);
        }
        // A known identity keeps its own label after the cap is reached.
        g.http(labels("in", Some(&ids[0])), 200, None, Duration::ZERO);
        let s = g.snapshot();
        assert_eq!(s.http.len(), IDENTITIES_MAX + 1);
        let overflow = s
            .http
            .iter()
            .find(|(l, _)| l.peer.as_deref() == Some(OVERFLOW))
            .unwrap();
        assert_eq!(overflow.1.requests, 5);
        let first = s
            .http
            .iter()
            .find(|(l, _)| l.peer.as_deref() == Some(ids[0].as_str()))
            .unwrap();
        assert_eq!(first.1.requests, 2);
    }

    #[test]
    fn series_over_the_cap_share_one_overflow_series() {
        let g = Golden::default();
        let names: Vec<String> = (0..SERIES_MAX + 3).map(|i| format!("l{i}")).collect();
        for n in &names {
            g.tcp(labels(n, None), 1, 2);
        }
        let s = g.snapshot();
        assert_eq!(s.tcp.len(), SERIES_MAX + 1);
        let o = s.tcp.iter().find(|(l, _)| l.listener == OVERFLOW).unwrap();
        assert_eq!(o.1.connections, 3);
        assert_eq!((o.1.bytes_received, o.1.bytes_sent), (3, 6));
    }

    #[test]
    fn status_codes_per_series_are_bounded() {
        let g = Golden::default();
        for code in 100..(100 + CODES_MAX as u16 + 10) {
            g.http(labels("in", None), code, None, Duration::ZERO);
        }
        let s = g.snapshot();
        let h = &s.http[0].1;
        assert_eq!(h.responses.len(), CODES_MAX + 1);
        assert_eq!(h.responses.iter().find(|r| r.0 == 0).unwrap().2, 10);
    }

    #[test]
    fn cores_merge_series_by_labels() {
        let (a, b) = (Golden::default(), Golden::default());
        a.http(labels("in", None), 200, None, Duration::ZERO);
        b.http(labels("in", None), 200, None, Duration::ZERO);
        b.http(labels("in", None), 404, None, Duration::ZERO);
        let s = merge([&a.snapshot(), &b.snapshot()]);
        assert_eq!(s.http.len(), 1);
        assert_eq!(s.http[0].1.requests, 3);
        assert_eq!(s.http[0].1.responses, vec![(200, None, 2), (404, None, 1)]);
    }
}
