//! Upstream clusters as one worker sees them: endpoints with their load,
//! latency, failures and ejection; the connection pool; the retry budget;
//! active health checks. All of it per worker, none of it shared.
//!
//! What must hold: outlier detection never ejects more than the
//! configured share of a cluster; an ejected or unhealthy endpoint gets no
//! new requests until it is back; retries never exceed the budget.

pub mod health;
pub mod pool;

use std::{
    cell::Cell,
    net::SocketAddr,
    rc::Rc,
    time::{Duration, Instant},
};

use crate::{
    balance::{ewma::PeakEwma, hash, p2c, Rng, RoundRobin},
    config::{
        http::{Breakers, HttpCluster, LbPolicy, UpstreamProtocol},
        limits::RETRY_BUDGET_MIN_CONCURRENT,
        Cluster,
    },
    metrics::{self, histograms, HttpCounters},
};
use pool::Pool;

/// One endpoint's state on this worker.
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub active: Cell<u64>,
    pub latency: PeakEwma,
    pub pool: Pool,
    /// Multiplexed HTTP/2 connections (clusters that speak h2).
    pub h2: crate::http2::client::H2Conns,
    consecutive_failures: Cell<u32>,
    ejected_until: Cell<Option<Instant>>,
    ejections: Cell<u32>,
    /// Active health-check verdict (true until a check says otherwise).
    pub healthy: Cell<bool>,
    pub(crate) check_streak: Cell<i32>,
}

impl Endpoint {
    fn new(addr: SocketAddr, now: Instant) -> Self {
        Self {
            addr,
            active: Cell::new(0),
            latency: PeakEwma::new(now),
            pool: Pool::default(),
            h2: Default::default(),
            consecutive_failures: Cell::new(0),
            ejected_until: Cell::new(None),
            ejections: Cell::new(0),
            healthy: Cell::new(true),
            check_streak: Cell::new(0),
        }
    }

    pub fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.get().is_some_and(|until| now < until)
    }

    fn eligible(&self, now: Instant) -> bool {
        self.healthy.get() && !self.is_ejected(now)
    }
}

/// A cluster on this worker.
#[derive(Debug)]
pub struct ClusterState {
    pub name: String,
    /// This cluster's histograms: new-connection connect time and time to
    /// the response's first byte (shared with later config generations).
    pub connect_histogram: histograms::Cell,
    pub first_byte_histogram: histograms::Cell,
    /// The config this state was built from; a config swap keeps the state
    /// (pools, ejections, health) of a cluster whose config is unchanged.
    pub source: Cluster,
    /// Shared with the next config generation's state for this cluster
    /// when only the endpoint list changed: an endpoint that stays keeps
    /// its pool, load, ejection and health ([`ClusterState::carry`]).
    pub endpoints: Vec<Rc<Endpoint>>,
    pub config: HttpCluster,
    pub connect_timeout: Duration,
    round_robin: RoundRobin,
    pub active_requests: Cell<u64>,
    pub active_retries: Cell<u64>,
    /// Open upstream connections (each holds a [`ConnToken`]); shared
    /// with the tokens, so a connection that outlives a config swap still
    /// counts down here when it closes.
    pub open_connections: Rc<Cell<u64>>,
    /// Requests waiting for a new connection.
    pub pending: Cell<u64>,
    /// This worker's share of the circuit-breaker caps (None: no cap).
    pub max_requests: Option<u64>,
    pub max_retries: Option<u64>,
    pub max_connections: Option<u64>,
    pub max_pending: Option<u64>,
    /// `protocol = "auto"` over TLS: an endpoint chose HTTP/1.1 in ALPN,
    /// so this cluster is spoken to in HTTP/1.1 from now on.
    pub h1_only: Cell<bool>,
}

/// One open upstream connection, counted in its cluster's
/// `open_connections` from the connect until the connection is dropped
/// (it travels with the connection: in the pool, in an exchange, in an
/// HTTP/2 connection's task).
#[derive(Debug)]
pub struct ConnToken(Rc<Cell<u64>>);

impl ConnToken {
    pub fn new(count: &Rc<Cell<u64>>) -> Self {
        count.set(count.get() + 1);
        ConnToken(Rc::clone(count))
    }
}

impl Drop for ConnToken {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

/// One worker's view of a cluster (`GET /clusters`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClusterReport {
    pub name: String,
    pub active_requests: u64,
    pub active_retries: u64,
    pub open_connections: u64,
    pub pending: u64,
    pub endpoints: Vec<EndpointReport>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct EndpointReport {
    pub address: SocketAddr,
    pub active_requests: u64,
    /// The active health checks' verdict (true without checks).
    pub healthy: bool,
    /// Remaining ejection time, if outlier detection ejected it.
    pub ejected_for_ms: Option<u64>,
    pub ejections: u32,
    pub consecutive_failures: u32,
    pub latency_ewma_us: u64,
    pub idle_pooled: usize,
}

/// What a finished attempt tells outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// Connect failure, reset, timeout, or a 5xx.
    Failure,
}

impl ClusterState {
    /// `workers`: how many share the cluster's circuit-breaker caps.
    pub fn new(
        c: &Cluster,
        worker: usize,
        workers: usize,
        now: Instant,
        store: &histograms::Store,
    ) -> Self {
        let (connect_histogram, first_byte_histogram) = store.cluster(&c.name);
        let breakers = c.http.breakers;
        Self {
            max_requests: Breakers::per_worker(breakers.max_requests, workers),
            max_retries: Breakers::per_worker(breakers.max_retries, workers),
            max_connections: Breakers::per_worker(breakers.max_connections, workers),
            max_pending: Breakers::per_worker(breakers.max_pending, workers),
            open_connections: Rc::new(Cell::new(0)),
            pending: Cell::new(0),
            name: c.name.clone(),
            connect_histogram,
            first_byte_histogram,
            source: c.clone(),
            endpoints: c
                .endpoints
                .iter()
                .map(|a| Rc::new(Endpoint::new(*a, now)))
                .collect(),
            config: c.http.clone(),
            connect_timeout: c.connect_timeout,
            round_robin: RoundRobin::new(c.endpoints.len(), worker),
            active_requests: Cell::new(0),
            active_retries: Cell::new(0),
            h1_only: Cell::new(false),
        }
    }

    /// The state for `c`, a new config of this cluster, when `c` differs
    /// from this state's only in its endpoint list (an EDS update): the
    /// endpoints that stay keep their state, the open-connection count
    /// and the protocol choice carry over; None if anything else changed
    /// (then the cluster starts afresh, as its connections may no longer
    /// fit it).
    pub fn carry(
        &self,
        c: &Cluster,
        worker: usize,
        workers: usize,
        now: Instant,
        store: &histograms::Store,
    ) -> Option<Self> {
        let same_but_endpoints = Cluster {
            endpoints: c.endpoints.clone(),
            ..self.source.clone()
        };
        if same_but_endpoints != *c {
            return None;
        }
        let mut next = Self::new(c, worker, workers, now, store);
        for slot in &mut next.endpoints {
            if let Some(kept) = self.endpoints.iter().find(|e| e.addr == slot.addr) {
                *slot = Rc::clone(kept);
            }
        }
        next.open_connections = Rc::clone(&self.open_connections);
        next.h1_only.set(self.h1_only.get());
        Some(next)
    }

    /// Whether requests to this cluster go out over HTTP/2: `h2`, or
    /// `auto` over TLS until an endpoint chose HTTP/1.1 in ALPN.
    pub fn speaks_h2(&self) -> bool {
        match self.config.protocol {
            UpstreamProtocol::H2 => true,
            UpstreamProtocol::Http1 => false,
            UpstreamProtocol::Auto => self.source.tls.is_some() && !self.h1_only.get(),
        }
    }

    /// The next endpoint in round-robin order, eligible or not (L4 connects
    /// use it: they try endpoints in turn and let the connect decide).
    pub fn next_round_robin(&self) -> usize {
        self.round_robin.pick()
    }

    /// Picks an endpoint for a request; `hash_key` is the value of the
    /// cluster's hash header when it has one. None: nothing is eligible.
    ///
    /// `avoid`: endpoints this request already failed on. A retry goes
    /// elsewhere when anywhere else is eligible (under every policy: a
    /// consistent hash would otherwise send the retry straight back to
    /// the endpoint that just failed), else to the same ones again.
    pub fn pick(
        &self,
        rng: &Rng,
        now: Instant,
        hash_key: Option<&[u8]>,
        avoid: &[usize],
    ) -> Option<usize> {
        if !avoid.is_empty() {
            let elsewhere = |i: usize| self.endpoints[i].eligible(now) && !avoid.contains(&i);
            if let Some(i) = self.pick_where(rng, hash_key, elsewhere) {
                return Some(i);
            }
        }
        self.pick_where(rng, hash_key, |i| self.endpoints[i].eligible(now))
    }

    fn pick_where(
        &self,
        rng: &Rng,
        hash_key: Option<&[u8]>,
        eligible: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let n = self.endpoints.len();
        if n == 0 {
            return None;
        }
        match &self.config.lb {
            LbPolicy::RoundRobin => (0..n)
                .map(|_| self.round_robin.pick())
                .find(|&i| eligible(i)),
            LbPolicy::LeastRequest => {
                p2c::pick(n, rng, eligible, |i| self.endpoints[i].active.get() as f64)
            }
            LbPolicy::Ewma => p2c::pick(n, rng, eligible, |i| {
                let e = &self.endpoints[i];
                e.latency.cost(e.active.get())
            }),
            LbPolicy::Hash { .. } => match hash_key {
                Some(key) => hash::pick(key, n, eligible),
                // No key: spread like round robin.
                None => (0..n)
                    .map(|_| self.round_robin.pick())
                    .find(|&i| eligible(i)),
            },
        }
    }

    /// Records an attempt's outcome for outlier detection; returns true if
    /// this ejected the endpoint.
    pub fn record(
        &self,
        endpoint: usize,
        outcome: Outcome,
        now: Instant,
        counters: &HttpCounters,
    ) -> bool {
        let e = &self.endpoints[endpoint];
        match outcome {
            Outcome::Success => {
                e.consecutive_failures.set(0);
                // Sustained health after an ejection forgives it.
                if !e.is_ejected(now) && e.ejected_until.get().is_some() {
                    e.ejected_until.set(None);
                }
                false
            }
            Outcome::Failure => {
                let failures = e.consecutive_failures.get() + 1;
                e.consecutive_failures.set(failures);
                let Some(o) = &self.config.outlier else {
                    return false;
                };
                if failures < o.consecutive_failures || e.is_ejected(now) {
                    return false;
                }
                let ejected = self.endpoints.iter().filter(|x| x.is_ejected(now)).count();
                let allowed = self.endpoints.len() * o.max_ejected_percent as usize / 100;
                if ejected + 1 > allowed {
                    return false;
                }
                let times = e.ejections.get().saturating_add(1);
                e.ejections.set(times);
                let factor = 1u32.checked_shl(times - 1).unwrap_or(u32::MAX);
                let time = o.base_ejection.saturating_mul(factor).min(o.max_ejection);
                e.ejected_until.set(Some(now + time));
                e.consecutive_failures.set(0);
                metrics::add(&counters.ejections, 1);
                tracing::info!(cluster = %self.name, endpoint = %e.addr, ?time, "endpoint ejected");
                true
            }
        }
    }

    /// Whether one more request may wait for a new connection, under the
    /// `max_pending` breaker: None, or the refusal with what it saw.
    pub fn pending_refused(&self) -> Option<(crate::metrics::ErrorReason, String)> {
        self.breaker_refusal(
            self.max_pending,
            self.pending.get(),
            crate::metrics::ErrorReason::CircuitBreakerMaxPending,
            "requests waiting for a connection",
            "max_pending",
        )
    }

    /// Whether a new connection may be opened now, under the
    /// `max_connections` breaker (asked once no pooled or multiplexed
    /// connection can take the request): None, or the refusal.
    pub fn connections_refused(&self) -> Option<(crate::metrics::ErrorReason, String)> {
        self.breaker_refusal(
            self.max_connections,
            self.open_connections.get(),
            crate::metrics::ErrorReason::CircuitBreakerMaxConnections,
            "connections open",
            "max_connections",
        )
    }

    /// A breaker at `max` (this worker's share) with `now` in use: None
    /// below it, else the refusal (built only then).
    fn breaker_refusal(
        &self,
        max: Option<u64>,
        now: u64,
        reason: crate::metrics::ErrorReason,
        what: &str,
        setting: &str,
    ) -> Option<(crate::metrics::ErrorReason, String)> {
        let max = max?;
        (now >= max).then(|| {
            let detail = format!(
                "cluster {:?} has {now} {what} on this worker, its {setting} share",
                self.name
            );
            (reason, detail)
        })
    }

    /// Counts a new connection until the token is dropped with it.
    pub fn connection_token(&self) -> ConnToken {
        ConnToken::new(&self.open_connections)
    }

    /// Whether one more request fits the `max_requests` breaker.
    pub fn request_allowed(&self) -> bool {
        self.max_requests
            .is_none_or(|max| self.active_requests.get() < max)
    }

    /// Whether one more retry fits the `max_retries` breaker.
    pub fn retry_under_breaker(&self) -> bool {
        self.max_retries
            .is_none_or(|max| self.active_retries.get() < max)
    }

    /// Whether one more retry fits the budget: retries in flight may be at
    /// most `retry_budget_percent` of active requests, or the minimum.
    pub fn retry_allowed(&self) -> bool {
        let budget = (self.active_requests.get() * u64::from(self.config.retry_budget_percent)
            / 100)
            .max(RETRY_BUDGET_MIN_CONCURRENT);
        self.active_retries.get() < budget
    }

    /// Whether a retry may start now: under the `max_retries` breaker and
    /// within the retry budget. A refusal is counted against whichever
    /// refused; an admitted retry is counted as a retry.
    pub fn admit_retry(&self, counters: &HttpCounters) -> bool {
        if !self.retry_under_breaker() {
            metrics::add(&counters.retries_over_breaker, 1);
            return false;
        }
        if !self.retry_allowed() {
            metrics::add(&counters.retries_over_budget, 1);
            return false;
        }
        metrics::add(&counters.retries, 1);
        true
    }

    /// This worker's view of the cluster, for `/clusters`.
    pub fn report(&self, now: Instant) -> ClusterReport {
        ClusterReport {
            name: self.name.clone(),
            active_requests: self.active_requests.get(),
            active_retries: self.active_retries.get(),
            open_connections: self.open_connections.get(),
            pending: self.pending.get(),
            endpoints: self
                .endpoints
                .iter()
                .map(|e| EndpointReport {
                    address: e.addr,
                    active_requests: e.active.get(),
                    healthy: e.healthy.get(),
                    ejected_for_ms: e
                        .ejected_until
                        .get()
                        .filter(|until| now < *until)
                        .map(|until| (until - now).as_millis() as u64),
                    ejections: e.ejections.get(),
                    consecutive_failures: e.consecutive_failures.get(),
                    latency_ewma_us: (e.latency.estimate() / 1000.0) as u64,
                    idle_pooled: e.pool.len(),
                })
                .collect(),
        }
    }

    /// Drops idle pooled connections past the idle timeout.
    pub fn expire_idle(&self, now: Instant) {
        for e in &self.endpoints {
            e.pool.expire(now, self.config.pool_idle_timeout);
            e.h2.expire(now, self.config.pool_idle_timeout);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{http::Outlier, Config};

    fn cluster(n: usize, lb: &str) -> ClusterState {
        let endpoints: Vec<String> = (0..n)
            .map(|i| format!("\"127.0.0.1:{}\"", 9000 + i))
            .collect();
        let text = format!(
            "[[listeners]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ncluster = \"c\"\n[[clusters]]\nname = \"c\"\nlb = \"{lb}\"\nendpoints = [{}]\n",
            endpoints.join(",")
        );
        let config = Config::parse("t.toml", &text).unwrap();
        ClusterState::new(
            &config.clusters[0],
            0,
            1,
            Instant::now(),
            &histograms::Store::default(),
        )
    }

    #[test]
    fn an_endpoint_only_change_keeps_the_state_of_endpoints_that_stay() {
        let old = cluster(2, "round_robin");
        let now = Instant::now();
        old.endpoints[0]
            .ejected_until
            .set(Some(now + Duration::from_secs(60)));
        old.endpoints[1].healthy.set(false);
        old.open_connections.set(3);
        let store = histograms::Store::default();
        let mut moved = old.source.clone();
        moved.endpoints = vec![
            "127.0.0.1:9000".parse().unwrap(),
            "127.0.0.1:9005".parse().unwrap(),
        ];
        let next = old
            .carry(&moved, 0, 1, now, &store)
            .expect("only endpoints changed");
        assert!(Rc::ptr_eq(&next.endpoints[0], &old.endpoints[0]), "kept");
        assert!(next.endpoints[0].is_ejected(now), "its ejection too");
        assert!(
            next.endpoints[1].healthy.get(),
            "a new endpoint starts healthy"
        );
        assert_eq!(next.open_connections.get(), 3, "connection count shared");
        let mut other = moved.clone();
        other.connect_timeout = Duration::from_millis(1);
        assert!(
            old.carry(&other, 0, 1, now, &store).is_none(),
            "anything else changed: start afresh"
        );
    }

    #[test]
    fn ejects_after_consecutive_failures_never_beyond_the_max_share() {
        let c = cluster(4, "round_robin");
        let counters = HttpCounters::default();
        let now = Instant::now();
        let o = Outlier::default();
        for e in 0..4 {
            for _ in 0..o.consecutive_failures {
                c.record(e, Outcome::Failure, now, &counters);
            }
        }
        let ejected = c.endpoints.iter().filter(|e| e.is_ejected(now)).count();
        assert_eq!(ejected, 2, "50% of 4");
        assert_eq!(counters.ejections.get(), 2);
        // Picks avoid the ejected ones.
        let rng = Rng::seeded(1);
        for _ in 0..20 {
            let i = c.pick(&rng, now, None, &[]).unwrap();
            assert!(!c.endpoints[i].is_ejected(now));
        }
        // Ejection ends after the base time, and doubles the next time.
        let later = now + o.base_ejection;
        assert!(c.endpoints.iter().all(|e| !e.is_ejected(later)));
        for _ in 0..o.consecutive_failures {
            c.record(0, Outcome::Failure, later, &counters);
        }
        assert!(c.endpoints[0].is_ejected(later + o.base_ejection));
        assert!(!c.endpoints[0].is_ejected(later + o.base_ejection * 2));
    }

    #[test]
    fn retry_budget_has_a_floor_and_a_share() {
        let c = cluster(1, "least_request");
        c.active_requests.set(100);
        c.active_retries.set(19);
        assert!(c.retry_allowed());
        c.active_retries.set(20);
        assert!(!c.retry_allowed());
        c.active_requests.set(1);
        c.active_retries.set(2);
        assert!(c.retry_allowed(), "the floor lets a quiet cluster retry");
    }

    #[test]
    fn unhealthy_endpoints_get_nothing() {
        let c = cluster(2, "ewma");
        c.endpoints[0].healthy.set(false);
        let rng = Rng::seeded(5);
        let now = Instant::now();
        assert!((0..50).all(|_| c.pick(&rng, now, None, &[]) == Some(1)));
        c.endpoints[1].healthy.set(false);
        assert_eq!(c.pick(&rng, now, None, &[]), None);
    }
}
