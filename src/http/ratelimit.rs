//! Local rate limiting: token buckets per listener, per route, and per
//! caller identity, answered with 429 and `Retry-After` (gRPC:
//! RESOURCE_EXHAUSTED).
//!
//! Per core by design: each worker holds its own buckets (no sharing on
//! the data path), each with 1/N of the configured rate and burst for N
//! workers, rounded up, so the whole process allows the configured rate
//! (a little more when the split rounds up). A client whose connections
//! all land on one core sees that core's share; many clients, spread by
//! SO_REUSEPORT, see the whole.
//!
//! What must hold: a check costs no allocation once a caller's bucket
//! exists; per-identity buckets are capped at [`IDENTITIES_MAX`] per
//! limiter and worker, and callers beyond share one overflow bucket; a
//! config swap starts every bucket full.

use std::{
    cell::{Cell, RefCell},
    collections::HashMap,
    time::{Duration, Instant},
};

use crate::config::{http::RateLimit, Config, ListenerKind};

/// Distinct caller identities with a bucket of their own, per limiter and
/// worker; the rest share one. The same bound as the golden metrics'.
pub const IDENTITIES_MAX: usize = crate::metrics::golden::IDENTITIES_MAX;

/// Tokens are counted in millionths, so small per-core rates refill
/// smoothly.
const SCALE: u64 = 1_000_000;

/// One token bucket.
#[derive(Debug)]
struct Bucket {
    tokens: Cell<u64>,
    updated: Cell<Instant>,
}

/// A limit as one worker applies it: its share of the rate and burst.
#[derive(Debug)]
struct Share {
    /// Tokens (×[`SCALE`]) added per second, and held at most.
    per_second: u64,
    burst: u64,
}

impl Bucket {
    fn full(share: &Share, now: Instant) -> Self {
        Bucket {
            tokens: Cell::new(share.burst),
            updated: Cell::new(now),
        }
    }

    /// Takes a token, or says how long until one is there.
    fn take(&self, share: &Share, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.updated.get());
        // Saturating: a high rate idle for hours would overflow u64, and a
        // truncating cast would then leave the bucket nearly empty.
        let added =
            u64::try_from(elapsed.as_nanos() * u128::from(share.per_second) / 1_000_000_000)
                .unwrap_or(u64::MAX);
        let tokens = self.tokens.get().saturating_add(added).min(share.burst);
        if added > 0 {
            self.updated.set(now);
        }
        if tokens >= SCALE {
            self.tokens.set(tokens - SCALE);
            return Ok(());
        }
        self.tokens.set(tokens);
        let missing = SCALE - tokens;
        Err(Duration::from_nanos(
            (u128::from(missing) * 1_000_000_000 / u128::from(share.per_second.max(1))) as u64,
        ))
    }
}

/// One configured limit on one worker.
#[derive(Debug)]
struct Limiter {
    share: Share,
    shared: Bucket,
    /// Per caller identity, when the limit asks for it; callers without
    /// an identity share `shared`.
    by_identity: Option<RefCell<HashMap<String, Bucket>>>,
    overflow: Bucket,
}

impl Limiter {
    fn new(limit: &RateLimit, workers: usize, now: Instant) -> Self {
        let n = workers.max(1) as u64;
        let share = Share {
            per_second: (u64::from(limit.per_second) * SCALE).div_ceil(n),
            // Whole tokens: a share of 2.5 would admit only 2 at once.
            burst: u64::from(limit.burst).div_ceil(n).max(1) * SCALE,
        };
        Limiter {
            shared: Bucket::full(&share, now),
            overflow: Bucket::full(&share, now),
            by_identity: limit.per_identity.then(RefCell::default),
            share,
        }
    }

    fn take(&self, identity: Option<&str>, now: Instant) -> Result<(), Duration> {
        let (Some(map), Some(id)) = (&self.by_identity, identity) else {
            return self.shared.take(&self.share, now);
        };
        let mut map = map.borrow_mut();
        if let Some(b) = map.get(id) {
            return b.take(&self.share, now);
        }
        if map.len() >= IDENTITIES_MAX {
            return self.overflow.take(&self.share, now);
        }
        let b = Bucket::full(&self.share, now);
        let taken = b.take(&self.share, now);
        map.insert(id.to_string(), b);
        taken
    }
}

/// A refusal: which limit, and when to come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// `listener` or `route`.
    pub scope: &'static str,
    /// Whole seconds until a token is back, at least 1 (`Retry-After`).
    pub retry_after: u64,
}

impl std::fmt::Display for Limited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "this {}'s rate limit is reached; retry in {} s",
            self.scope, self.retry_after
        )
    }
}

/// One worker's buckets for one config generation.
#[derive(Debug, Default)]
pub struct Limits {
    /// By listener index; per listener, by route index.
    listeners: Vec<Option<Limiter>>,
    routes: Vec<Vec<Option<Limiter>>>,
}

impl Limits {
    pub fn new(config: &Config, now: Instant) -> Self {
        let mut limits = Limits::default();
        for l in &config.listeners {
            let (listener, routes) = match &l.kind {
                ListenerKind::Http(h) => (
                    h.rate_limit
                        .as_ref()
                        .map(|r| Limiter::new(r, config.workers, now)),
                    h.routes
                        .iter()
                        .map(|r| {
                            r.rate_limit
                                .as_ref()
                                .map(|r| Limiter::new(r, config.workers, now))
                        })
                        .collect(),
                ),
                ListenerKind::Tcp { .. } => (None, Vec::new()),
            };
            limits.listeners.push(listener);
            limits.routes.push(routes);
        }
        limits
    }

    /// Takes a token from the listener's bucket, then the route's; the
    /// first that has none refuses (a refused request takes nothing from
    /// the route).
    pub fn check(
        &self,
        listener: usize,
        route: Option<usize>,
        identity: Option<&str>,
        now: Instant,
    ) -> Result<(), Limited> {
        let refuse = |scope, wait: Duration| Limited {
            scope,
            retry_after: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
        };
        if let Some(Some(l)) = self.listeners.get(listener) {
            l.take(identity, now).map_err(|w| refuse("listener", w))?;
        }
        let r = route.and_then(|r| self.routes.get(listener)?.get(r)?.as_ref());
        if let Some(r) = r {
            r.take(identity, now).map_err(|w| refuse("route", w))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(per_second: u32, burst: u32, per_identity: bool) -> RateLimit {
        RateLimit {
            per_second,
            burst,
            per_identity,
        }
    }

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let l = Limiter::new(&limit(10, 5, false), 1, t0);
        let allowed = (0..20).filter(|_| l.take(None, t0).is_ok()).count();
        assert_eq!(allowed, 5);
        // 10 per second: one token every 100 ms.
        let wait = l.take(None, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        assert!(l.take(None, t0 + Duration::from_millis(99)).is_err());
        assert!(l.take(None, t0 + Duration::from_millis(100)).is_ok());
        // A second later: 10 more, never more than the burst.
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!((0..20).filter(|_| l.take(None, t1).is_ok()).count(), 5);
    }

    #[test]
    fn a_refill_past_u64_saturates_to_the_burst() {
        let t0 = Instant::now();
        let share = Share {
            per_second: 1 << 63,
            burst: 3 * SCALE,
        };
        let b = Bucket::full(&share, t0);
        assert_eq!((0..5).filter(|_| b.take(&share, t0).is_ok()).count(), 3);
        // Two seconds make exactly 2^64 micro-tokens: a truncating cast
        // would add none.
        let later = t0 + Duration::from_secs(2);
        assert_eq!((0..5).filter(|_| b.take(&share, later).is_ok()).count(), 3);
    }

    #[test]
    fn workers_split_the_rate_and_identities_get_their_own_bucket() {
        let t0 = Instant::now();
        // 100/s and a burst of 10 over 4 workers: 25/s, burst 3 here.
        let l = Limiter::new(&limit(100, 10, true), 4, t0);
        let a = (0..10)
            .filter(|_| l.take(Some("spiffe://a"), t0).is_ok())
            .count();
        let b = (0..10)
            .filter(|_| l.take(Some("spiffe://b"), t0).is_ok())
            .count();
        assert_eq!((a, b), (3, 3));
        let t1 = t0 + Duration::from_secs(1);
        // 25 refilled, capped at the burst of 3.
        assert_eq!(
            (0..30)
                .filter(|_| l.take(Some("spiffe://a"), t1).is_ok())
                .count(),
            3
        );
        // Beyond the cap, callers share the overflow bucket.
        for i in 0..IDENTITIES_MAX - 2 {
            let _ = l.take(Some(&format!("spiffe://x/{i}")), t1);
        }
        let over = (0..10)
            .filter(|i| l.take(Some(&format!("spiffe://late/{i}")), t1).is_ok())
            .count();
        assert_eq!(over, 3, "one shared bucket for the late callers");
    }
}
