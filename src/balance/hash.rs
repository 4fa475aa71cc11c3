//! Consistent hashing of a request key onto endpoints (jump consistent
//! hash, Lamping & Veach 2014): no ring to build, no memory, and only
//! 1/n of keys move when the endpoint count changes. An ineligible
//! (ejected, unhealthy) endpoint is skipped by rehashing with a salt, so a
//! key keeps its endpoint whenever that endpoint is available.

/// Rehashes tried before falling back to the first eligible endpoint.
const REHASH_MAX: u64 = 8;

/// FNV-1a: fast, stable across builds and processes (the std hasher is
/// randomly keyed per process, which would move keys between restarts).
pub fn key_hash(key: &[u8]) -> u64 {
    key.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Jump consistent hash of `key` into `0..buckets` (buckets > 0).
pub fn jump(mut key: u64, buckets: usize) -> usize {
    let (mut b, mut j) = (-1i64, 0i64);
    while j < buckets as i64 {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as usize
}

/// The endpoint for `key` among `n`, skipping ineligible ones.
pub fn pick(key: &[u8], n: usize, eligible: impl Fn(usize) -> bool) -> Option<usize> {
    let h = key_hash(key);
    for salt in 0..REHASH_MAX {
        let i = jump(h ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15), n);
        if eligible(i) {
            return Some(i);
        }
    }
    (0..n).find(|&i| eligible(i))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_key_same_endpoint_and_few_moves_on_growth() {
        assert_eq!(pick(b"user-42", 5, |_| true), pick(b"user-42", 5, |_| true));
        let moved = (0..10_000u32)
            .filter(|k| {
                jump(key_hash(&k.to_le_bytes()), 10) != jump(key_hash(&k.to_le_bytes()), 11)
            })
            .count();
        // Ideal: 1/11 of keys move (~909).
        assert!((600..1300).contains(&moved), "{moved}");
    }

    #[test]
    fn skips_ineligible_endpoints() {
        let home = pick(b"k", 4, |_| true).unwrap();
        let other = pick(b"k", 4, |i| i != home).unwrap();
        assert_ne!(other, home);
        assert_eq!(pick(b"k", 4, |_| false), None);
    }
}
