//! A small, fast, seedable PRNG (xorshift64*), one per worker. Pickers take
//! it as a parameter, so tests replay exact sequences from a seed.

use std::cell::Cell;

#[derive(Debug)]
pub struct Rng {
    state: Cell<u64>,
}

impl Rng {
    pub fn seeded(seed: u64) -> Self {
        // Zero is a fixed point of xorshift; any other seed is fine.
        Self {
            state: Cell::new(seed | 1),
        }
    }

    /// Seeded from the clock and a salt (the worker id).
    pub fn from_time(salt: u64) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Self::seeded(nanos ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    pub fn next_u64(&self) -> u64 {
        let mut x = self.state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0), by multiply-shift (no modulo bias worth
    /// caring about for n far below 2^32).
    pub fn below(&self, n: u64) -> u64 {
        ((u128::from(self.next_u64() >> 32) * u128::from(n)) >> 32) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let rng = Rng::seeded(7);
        let mut seen = [0u32; 5];
        for _ in 0..10_000 {
            seen[rng.below(5) as usize] += 1;
        }
        assert!(seen.iter().all(|&c| c > 1_500), "{seen:?}");
    }
}
