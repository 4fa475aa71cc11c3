//! Attack defended: a malicious or broken upstream smuggling a second
//! response (or hiding part of one) through ambiguous response framing.
//! A response head we accept must be re-serialized into a form our strict
//! parser reads back with the same status and framing; nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pilotfish::http1::{
    head::RequestKind,
    write::{self, OutBody},
    HeadLimits, ResponseBody, ResponseParser,
};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, data)) = data.split_first() else { return };
    let kind = match selector % 3 {
        0 => RequestKind::Other,
        1 => RequestKind::Head,
        _ => RequestKind::Connect,
    };
    let Ok(Some((res, _))) = ResponseParser::new(HeadLimits::default()).parse(data, kind) else {
        return;
    };
    let body = match res.body {
        ResponseBody::None | ResponseBody::Tunnel => OutBody::None,
        ResponseBody::Length(n) => OutBody::Length(n),
        ResponseBody::Chunked | ResponseBody::UntilClose => OutBody::Chunked,
    };
    let tunnel = res.body == ResponseBody::Tunnel;
    let mut out = Vec::new();
    write::response(&res, body, true, tunnel, &mut out);
    let (again, used) = ResponseParser::new(wide())
        .parse(&out, kind)
        .expect("our own output parses")
        .expect("complete");
    assert_eq!(used, out.len());
    assert_eq!(again.status, res.status);
    let expected = match res.body {
        ResponseBody::UntilClose => ResponseBody::Chunked,
        other => other,
    };
    assert_eq!(again.body, expected);
});

/// Limits for re-parsing our own output: we add a few fields (forwarding,
/// framing), so a head at the input limits may exceed them by that much.
/// The invariant is about framing, not size.
fn wide() -> HeadLimits {
    use pilotfish::config::limits::{HTTP1_HEADERS_MAX, HTTP1_HEAD_BYTES_MAX};
    HeadLimits { head_bytes: HTTP1_HEAD_BYTES_MAX, headers: HTTP1_HEADERS_MAX, uri_bytes: HTTP1_HEAD_BYTES_MAX }
}
