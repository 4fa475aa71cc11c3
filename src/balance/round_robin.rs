//! Round robin over a cluster's endpoints, per worker.
//!
//! Each worker starts at a different offset so that N workers accepting at
//! once do not all hit endpoint 0 first.

use std::cell::Cell;

#[derive(Debug)]
pub struct RoundRobin {
    next: Cell<usize>,
    len: usize,
}

impl RoundRobin {
    /// A picker over `len` endpoints, starting at `offset`. A cluster with
    /// no endpoints (an xDS cluster scaled to zero, or one whose endpoints
    /// have not arrived yet) gets a picker over one slot that its callers
    /// never use: they check for endpoints first.
    pub fn new(len: usize, offset: usize) -> Self {
        let len = len.max(1);
        Self {
            next: Cell::new(offset % len),
            len,
        }
    }

    /// The index of the next endpoint to try.
    pub fn pick(&self) -> usize {
        let i = self.next.get();
        self.next.set((i + 1) % self.len);
        i
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycles_through_every_endpoint_from_offset() {
        let rr = RoundRobin::new(3, 4);
        let picks: Vec<_> = (0..6).map(|_| rr.pick()).collect();
        assert_eq!(picks, [1, 2, 0, 1, 2, 0]);
    }
}
