//! Attack defended: request smuggling through the request head. A head we
//! accept must be re-serialized into a form that our own strict parser
//! reads back as exactly one request with the same method, target and body
//! framing: if a crafted head could make us forward something that parses
//! differently, a peer behind us could see a different request boundary.
//! Also: no input may panic the parser, and every prefix of an accepted
//! head must be "incomplete", never a different answer. Routing sees what
//! the upstream gets: the forwarded target is the normalized origin-form
//! one, normalizing it again changes nothing, and the forwarded Host is
//! the authority we routed on.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pilotfish::http1::{
    write::{self, Edits, Forwarding, OutBody},
    HeadLimits, RequestBody, RequestParser,
};

fuzz_target!(|data: &[u8]| {
    let limits = HeadLimits::default();
    let Ok(Some((mut req, used))) = RequestParser::new(limits).parse(data) else {
        return;
    };
    if req.normalize_path(pilotfish::route::path::PathOptions::default()).is_err() {
        return;
    }
    assert!(used <= data.len());
    // An incremental parser fed prefixes agrees with the whole-buffer one.
    let mut incremental = RequestParser::new(limits);
    for cut in [used / 3, used / 2, used - 1] {
        assert_eq!(incremental.parse(&data[..cut]), Ok(None));
    }
    let body = match req.body {
        RequestBody::Empty => OutBody::None,
        RequestBody::Length(n) => OutBody::Length(n),
        RequestBody::Chunked => OutBody::Chunked,
    };
    let fwd = Forwarding {
        client_ip: "192.0.2.1",
        proto: "http",
        request_id: b"fuzz",
        identity_header: "x-pilotfish-peer-identity",
        identity: None,
        trace: None,
    };
    let mut out = Vec::new();
    write::request(&req, body, req.hop.upgrade, &fwd, &Edits::default(), &mut out);
    let (again, again_used) = RequestParser::new(wide())
        .parse(&out)
        .expect("our own output parses")
        .expect("our own output is complete");
    assert_eq!(again_used, out.len(), "exactly one request");
    assert_eq!(again.method(), req.method());
    assert_eq!(again.target(), req.origin_target());
    assert_eq!(again.body, req.body);
    let mut again = again;
    assert_eq!(
        again.normalize_path(pilotfish::route::path::PathOptions::default()),
        Ok(false),
        "a normalized path is normal"
    );
    if let Some(authority) = req.authority() {
        assert_eq!(again.authority(), Some(authority));
    }
});

/// Limits for re-parsing our own output: we add a few fields (forwarding,
/// framing), so a head at the input limits may exceed them by that much.
/// The invariant is about framing, not size.
fn wide() -> HeadLimits {
    use pilotfish::config::limits::{HTTP1_HEADERS_MAX, HTTP1_HEAD_BYTES_MAX};
    HeadLimits { head_bytes: HTTP1_HEAD_BYTES_MAX, headers: HTTP1_HEADERS_MAX, uri_bytes: HTTP1_HEAD_BYTES_MAX }
}
