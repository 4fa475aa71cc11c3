//! Per-worker counters and their snapshots.
//!
//! What must hold: a worker's counters are plain `Cell`s owned by that worker
//! (no atomics, no sharing); other threads only ever see a [`Snapshot`]
//! copied out on request through the worker's mailbox, and merge snapshots
//! themselves.

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
}
