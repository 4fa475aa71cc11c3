//! Power of two choices: pick two distinct eligible endpoints at random,
//! keep the one with the lower load. Mitzenmacher's result: nearly the
//! balance of "least loaded" without scanning or herding on one endpoint.

use super::rng::Rng;

/// Picks among `0..n` the endpoint with the lower `load` of two random
/// eligible ones; `None` if none is eligible.
pub fn pick(
    n: usize,
    rng: &Rng,
    eligible: impl Fn(usize) -> bool,
    load: impl Fn(usize) -> f64,
) -> Option<usize> {
    let candidates: smallvec::SmallVec<[usize; 16]> = (0..n).filter(|&i| eligible(i)).collect();
    match candidates.len() {
        0 => None,
        1 => Some(candidates[0]),
        len => {
            let a = rng.below(len as u64) as usize;
            let mut b = rng.below(len as u64 - 1) as usize;
            if b >= a {
                b += 1;
            }
            let (a, b) = (candidates[a], candidates[b]);
            Some(if load(b) < load(a) { b } else { a })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefers_the_less_loaded_and_skips_ineligible() {
        let rng = Rng::seeded(3);
        let loads = [10.0, 0.0, 10.0];
        let mut picks = [0; 3];
        for _ in 0..3000 {
            picks[pick(3, &rng, |_| true, |i| loads[i]).unwrap()] += 1;
        }
        // Endpoint 1 wins every pair it is in: 2/3 of draws.
        assert!(picks[1] > 1800, "{picks:?}");
        assert_eq!(pick(3, &rng, |i| i == 2, |i| loads[i]), Some(2));
        assert_eq!(pick(3, &rng, |_| false, |i| loads[i]), None);
    }
}
