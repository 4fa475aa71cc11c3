//! Attack defended: route and authorization bypass by the spelling of a
//! path (the class of Envoy's CVE-2019-9901). What the proxy routes on must
//! be what a decoding upstream resolves, so the normal form must be a fixed
//! point: normalizing it again changes nothing. It must also hold no dot
//! segment, no run of `/` (when merging), no escape of an unreserved
//! character, and, when encoded slashes are refused or unescaped, no
//! `%2F`, `%5C` or `\` at all. No input may panic the normalizer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pilotfish::route::path::{normalize, PathOptions, SlashAction};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, path)) = data.split_first() else {
        return;
    };
    let opts = PathOptions {
        merge_slashes: selector & 1 == 0,
        escaped_slashes: match selector >> 1 & 3 {
            0 => SlashAction::Reject,
            1 => SlashAction::Unescape,
            _ => SlashAction::Keep,
        },
    };
    let Ok(normal) = normalize(path, opts) else {
        return;
    };
    let normal = normal.unwrap_or_else(|| path.to_vec());
    assert_eq!(normal.first(), Some(&b'/'));
    assert_eq!(normalize(&normal, opts), Ok(None), "a fixed point");
    for segment in normal[1..].split(|&b| b == b'/') {
        assert!(segment != b"." && segment != b"..", "dot segment left");
    }
    if opts.merge_slashes {
        assert!(!normal.windows(2).any(|w| w == b"//"), "slashes not merged");
    }
    for (i, w) in normal.windows(3).enumerate() {
        if w[0] != b'%' {
            continue;
        }
        let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
        let (Some(hi), Some(lo)) = (hex(w[1]), hex(w[2])) else {
            panic!("bad escape left at {i}");
        };
        let v = hi << 4 | lo;
        assert!(
            !(v.is_ascii_alphanumeric() || b"-._~".contains(&v)),
            "unreserved character still escaped"
        );
        assert!(w[1..].iter().all(|b| !b.is_ascii_lowercase()), "lower-case hex");
        if opts.escaped_slashes != SlashAction::Keep {
            assert!(v != b'/' && v != b'\\', "encoded slash left");
        }
    }
    if opts.escaped_slashes != SlashAction::Keep {
        assert!(!normal.contains(&b'\\'), "backslash left");
    }
});
