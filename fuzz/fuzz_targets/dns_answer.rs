//! Attack defended: a name server (or anyone who can put a datagram on the
//! resolver's socket) sending a malformed answer: cut records, lengths
//! past the end, compression-pointer loops, wrong address lengths. The
//! parser must never panic or read out of bounds, and never return more
//! than its cap of addresses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pilotfish::dns::stub::{parse, ANSWERS_MAX, TYPE_A, TYPE_AAAA};

fuzz_target!(|data: &[u8]| {
    let qtype = if data.first().is_some_and(|b| b & 1 == 1) {
        TYPE_AAAA
    } else {
        TYPE_A
    };
    let id = data
        .get(..2)
        .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
    if let Ok(addrs) = parse(data, id, "orders.svc.local", qtype) {
        assert!(addrs.len() <= ANSWERS_MAX);
        for a in addrs {
            assert_eq!(a.is_ipv6(), qtype == TYPE_AAAA, "an address of the type asked");
        }
    }
});
