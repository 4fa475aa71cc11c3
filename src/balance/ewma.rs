//! Peak-EWMA latency, as linkerd and Finagle balance on: the estimate
//! jumps up to any slower observation at once and decays towards faster
//! ones with time constant [`DECAY`]. An endpoint's cost is its estimate
//! times (active requests + 1), compared with power of two choices.

use std::{
    cell::Cell,
    time::{Duration, Instant},
};

/// How fast old observations fade: linkerd's default.
pub const DECAY: Duration = Duration::from_secs(10);
/// The estimate a new endpoint starts with: optimistic enough to get
/// traffic, pessimistic enough not to get all of it (1 ms).
const INITIAL_NANOS: f64 = 1_000_000.0;

#[derive(Debug)]
pub struct PeakEwma {
    nanos: Cell<f64>,
    stamp: Cell<Instant>,
}

impl PeakEwma {
    pub fn new(now: Instant) -> Self {
        Self {
            nanos: Cell::new(INITIAL_NANOS),
            stamp: Cell::new(now),
        }
    }

    /// Records one round trip that ended at `now`.
    pub fn observe(&self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_nanos() as f64;
        let old = self.nanos.get();
        if rtt > old {
            self.nanos.set(rtt);
        } else {
            let elapsed = now
                .saturating_duration_since(self.stamp.get())
                .as_secs_f64();
            let w = (-elapsed / DECAY.as_secs_f64()).exp();
            self.nanos.set(old * w + rtt * (1.0 - w));
        }
        self.stamp.set(now);
    }

    /// The current estimate in nanoseconds.
    pub fn estimate(&self) -> f64 {
        self.nanos.get()
    }

    /// Load for power of two choices.
    pub fn cost(&self, active: u64) -> f64 {
        self.nanos.get() * (active + 1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jumps_to_peaks_and_decays_towards_faster_samples() {
        let t0 = Instant::now();
        let e = PeakEwma::new(t0);
        e.observe(Duration::from_millis(50), t0);
        assert_eq!(e.estimate(), 50_000_000.0);
        e.observe(Duration::from_millis(1), t0 + DECAY);
        let after = e.estimate();
        assert!(after < 50_000_000.0 * 0.4 && after > 1_000_000.0, "{after}");
        assert!(e.cost(3) > e.cost(0));
    }
}
