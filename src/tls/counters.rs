//! mTLS counters of one worker: handshakes by side and kind, failures by
//! reason, authorization decisions by caller identity.
//!
//! What must hold: like every counter, only the owning worker touches
//! them; the identity-labelled series are bounded ([`IDENTITY_SERIES_MAX`])
//! so a mesh of many callers cannot grow a worker's memory or a scrape
//! without limit: past the bound, decisions count under `(other)`.

use std::cell::{Cell, RefCell};

use serde::Serialize;

/// Distinct (listener, identity, decision) series kept per worker.
pub const IDENTITY_SERIES_MAX: usize = 256;
/// The identity label past [`IDENTITY_SERIES_MAX`].
pub const OTHER_IDENTITY: &str = "(other)";
/// The identity label of a caller without a certificate.
pub const NO_IDENTITY: &str = "(none)";

/// Which end of the handshake we were.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// We accepted (inbound listener).
    Inbound,
    /// We connected (cluster with `tls`).
    Outbound,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Side::Inbound => "inbound",
            Side::Outbound => "outbound",
        }
    }
}

#[derive(Debug, Default)]
pub struct TlsCounters {
    /// Full handshakes, inbound and outbound.
    pub full: [Cell<u64>; 2],
    /// Resumed handshakes, inbound and outbound.
    pub resumed: [Cell<u64>; 2],
    failures: RefCell<Vec<Failure>>,
    decisions: RefCell<Vec<Decision>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failure {
    pub side: Side,
    pub reason: &'static str,
    pub count: u64,
}

/// Where one connection's (denied, allowed) series sit in the list.
#[derive(Debug, Default)]
pub struct DecisionSlots([Cell<Option<usize>>; 2]);

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub listener: String,
    pub identity: String,
    pub allowed: bool,
    pub count: u64,
}

fn index(side: Side) -> usize {
    match side {
        Side::Inbound => 0,
        Side::Outbound => 1,
    }
}

impl TlsCounters {
    pub fn handshake(&self, side: Side, resumed: bool) {
        let cells = if resumed { &self.resumed } else { &self.full };
        let c = &cells[index(side)];
        c.set(c.get() + 1);
    }

    pub fn failure(&self, side: Side, reason: &'static str) {
        let mut list = self.failures.borrow_mut();
        match list
            .iter_mut()
            .find(|f| f.side == side && f.reason == reason)
        {
            Some(f) => f.count += 1,
            // Reasons are a fixed set of static names: the list is bounded.
            None => list.push(Failure {
                side,
                reason,
                count: 1,
            }),
        }
    }

    /// Counts one authorization decision for `identity` on `listener`.
    pub fn decision(&self, listener: &str, identity: Option<&str>, allowed: bool) {
        self.decision_cached(listener, identity, allowed, &DecisionSlots::default());
    }

    /// [`Self::decision`] for a connection that decides again and again
    /// (one HTTP request after another): `slots` remembers where its series
    /// are, so a request costs an index, not a search of every caller's.
    /// Series are never removed, so an index stays valid.
    pub fn decision_cached(
        &self,
        listener: &str,
        identity: Option<&str>,
        allowed: bool,
        slots: &DecisionSlots,
    ) {
        let slot = &slots.0[usize::from(allowed)];
        let mut list = self.decisions.borrow_mut();
        if let Some(d) = slot.get().and_then(|i| list.get_mut(i)) {
            d.count += 1;
            return;
        }
        let identity = identity.unwrap_or(NO_IDENTITY);
        let hit = |d: &Decision, id: &str| {
            d.allowed == allowed && d.listener == listener && d.identity == id
        };
        let found = match list.iter().position(|d| hit(d, identity)) {
            Some(i) => Some(i),
            None if list.len() >= IDENTITY_SERIES_MAX => {
                list.iter().position(|d| hit(d, OTHER_IDENTITY))
            }
            None => None,
        };
        let index = match found {
            Some(i) => {
                list[i].count += 1;
                i
            }
            None => {
                let identity = if list.len() < IDENTITY_SERIES_MAX {
                    identity
                } else {
                    OTHER_IDENTITY
                };
                list.push(Decision {
                    listener: listener.to_string(),
                    identity: identity.to_string(),
                    allowed,
                    count: 1,
                });
                list.len() - 1
            }
        };
        slot.set(Some(index));
    }

    pub fn snapshot(&self) -> TlsSnapshot {
        TlsSnapshot {
            handshakes_inbound: self.full[0].get(),
            handshakes_inbound_resumed: self.resumed[0].get(),
            handshakes_outbound: self.full[1].get(),
            handshakes_outbound_resumed: self.resumed[1].get(),
            handshake_failures: self.failures.borrow().clone(),
            authorization: self.decisions.borrow().clone(),
        }
    }
}

/// A copy of one worker's TLS counters (or their sum over workers).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TlsSnapshot {
    /// Full handshakes completed.
    pub handshakes_inbound: u64,
    pub handshakes_inbound_resumed: u64,
    pub handshakes_outbound: u64,
    pub handshakes_outbound_resumed: u64,
    pub handshake_failures: Vec<Failure>,
    pub authorization: Vec<Decision>,
}

impl TlsSnapshot {
    pub fn merge(&mut self, o: &TlsSnapshot) {
        self.handshakes_inbound += o.handshakes_inbound;
        self.handshakes_inbound_resumed += o.handshakes_inbound_resumed;
        self.handshakes_outbound += o.handshakes_outbound;
        self.handshakes_outbound_resumed += o.handshakes_outbound_resumed;
        for f in &o.handshake_failures {
            match self
                .handshake_failures
                .iter_mut()
                .find(|m| m.side == f.side && m.reason == f.reason)
            {
                Some(m) => m.count += f.count,
                None => self.handshake_failures.push(f.clone()),
            }
        }
        for d in &o.authorization {
            match self.authorization.iter_mut().find(|m| {
                m.allowed == d.allowed && m.listener == d.listener && m.identity == d.identity
            }) {
                Some(m) => m.count += d.count,
                None => self.authorization.push(d.clone()),
            }
        }
    }

    /// Failures with `reason` on `side` (0 if none).
    pub fn failures(&self, side: Side, reason: &str) -> u64 {
        self.handshake_failures
            .iter()
            .filter(|f| f.side == side && f.reason == reason)
            .map(|f| f.count)
            .sum()
    }

    /// Decisions for `identity` (0 if none).
    pub fn decisions(&self, identity: &str, allowed: bool) -> u64 {
        self.authorization
            .iter()
            .filter(|d| d.identity == identity && d.allowed == allowed)
            .map(|d| d.count)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_series_are_bounded_and_merge() {
        let c = TlsCounters::default();
        for i in 0..IDENTITY_SERIES_MAX + 10 {
            c.decision("in", Some(&format!("spiffe://td/{i}")), false);
        }
        c.decision("in", Some("spiffe://td/0"), false);
        let s = c.snapshot();
        assert_eq!(s.authorization.len(), IDENTITY_SERIES_MAX + 1);
        assert_eq!(s.decisions(OTHER_IDENTITY, false), 10);
        assert_eq!(s.decisions("spiffe://td/0", false), 2);
        // A connection's cached slots count into the same series.
        let slots = DecisionSlots::default();
        for _ in 0..3 {
            c.decision_cached("in", Some("spiffe://td/1"), false, &slots);
            c.decision_cached("in", Some("spiffe://td/1"), true, &slots);
        }
        let s = c.snapshot();
        assert_eq!(s.decisions("spiffe://td/1", false), 4);
        assert_eq!(s.decisions(OTHER_IDENTITY, true), 3, "past the bound");
        c.failure(Side::Inbound, "expired");
        c.failure(Side::Inbound, "expired");
        let mut total = c.snapshot();
        total.merge(&c.snapshot());
        assert_eq!(total.failures(Side::Inbound, "expired"), 4);
        assert_eq!(total.decisions("spiffe://td/0", false), 4);
    }
}
