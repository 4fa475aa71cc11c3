//! Writing heads for the other side: our framing, our hop-by-hop fields.
//!
//! What must hold: framing fields (Content-Length, Transfer-Encoding) are
//! written from the framing we decided, never copied; hop-by-hop fields
//! (Connection and every field it names, Keep-Alive, TE except `trailers`,
//! Trailer, Upgrade unless tunnelling, Proxy-*) are not forwarded; tracing
//! fields (traceparent, tracestate, b3) pass untouched.

use super::head::{Head, Hop, RequestHead, ResponseHead};

/// How the body we write is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutBody {
    /// No body and no framing field (GET without body, 204, ...).
    None,
    Length(u64),
    Chunked,
    /// HTTP/1.0 peer and no length: the body ends with the connection.
    Close,
}

/// Header changes applied to a forwarded head, in order: remove, set, add.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Edits {
    /// Lower-case names to drop.
    pub remove: Vec<String>,
    /// Fields to replace (every existing field of that name is dropped).
    pub set: Vec<(String, String)>,
    /// Fields to append.
    pub add: Vec<(String, String)>,
}

/// What the proxy itself adds to a forwarded request.
#[derive(Debug, Clone, Copy)]
pub struct Forwarding<'a> {
    /// The client's address, appended to X-Forwarded-For.
    pub client_ip: &'a str,
    /// "http" or "https", set as X-Forwarded-Proto.
    pub proto: &'a str,
    /// An x-request-id to add when the request has none.
    pub request_id: &'a [u8],
    /// The lower-case header that carries the caller's identity: every
    /// copy the client sent is dropped, and `identity` is written in it.
    pub identity_header: &'a str,
    /// The caller's verified SPIFFE ID (mTLS listeners).
    pub identity: Option<&'a str>,
    /// This hop's trace context (with `[tracing]`): the request's own
    /// context headers are replaced by the ones that make this hop the
    /// next one's parent. None: they pass through untouched.
    pub trace: Option<crate::trace::Hop>,
}

/// Whether `name` is one of the always hop-by-hop fields (or framing,
/// which we write ourselves). Dispatches on length first: this runs for
/// every field of every message.
fn always_hop_by_hop(name: &[u8]) -> bool {
    let is = |h: &[u8]| name.eq_ignore_ascii_case(h);
    match name.len() {
        2 => is(b"te"),
        7 => is(b"trailer") || is(b"upgrade"),
        10 => is(b"connection") || is(b"keep-alive"),
        14 => is(b"content-length"),
        17 => is(b"transfer-encoding"),
        _ => false,
    }
}

/// Whether a field must not cross this hop.
pub(crate) fn is_hop_by_hop(name: &[u8], head: &Head, hop: &Hop) -> bool {
    always_hop_by_hop(name)
        || (name.len() > 6 && name[..6].eq_ignore_ascii_case(b"proxy-"))
        || hop
            .listed
            .iter()
            .any(|r| name.eq_ignore_ascii_case(&head.bytes[r.clone()]))
}

/// Appends `n` in decimal (no formatting machinery on the hot path).
pub fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

fn named(name: &[u8], list: &[String]) -> bool {
    list.iter().any(|n| name.eq_ignore_ascii_case(n.as_bytes()))
}

pub(crate) fn write_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Writes the framing field; `codings` are the inner transfer codings
/// (ranges of `head`) that stay applied under a re-chunked body.
fn write_framing(
    out: &mut Vec<u8>,
    body: OutBody,
    head: &Head,
    codings: &[std::ops::Range<usize>],
) {
    match body {
        OutBody::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            push_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        OutBody::Chunked => {
            out.extend_from_slice(b"transfer-encoding: ");
            for c in codings {
                out.extend_from_slice(&head.bytes[c.clone()]);
                out.extend_from_slice(b", ");
            }
            out.extend_from_slice(b"chunked\r\n");
        }
        OutBody::None | OutBody::Close => {}
    }
}

fn write_edits(out: &mut Vec<u8>, edits: &Edits) {
    for (n, v) in edits.set.iter().chain(&edits.add) {
        write_field(out, n.as_bytes(), v.as_bytes());
    }
}

/// Writes the head we send upstream for `req`.
pub fn request(
    req: &RequestHead,
    body: OutBody,
    tunnel: bool,
    fwd: &Forwarding<'_>,
    edits: &Edits,
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(req.method());
    out.push(b' ');
    // Origin-form, normalized: what routing decided on is what the
    // upstream gets (absolute-form is rewritten, RFC 9112 §3.2.2).
    out.extend_from_slice(req.origin_target());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let head = &req.head;
    let mut xff: Vec<&[u8]> = Vec::new();
    let mut has_request_id = false;
    let mut te_trailers = false;
    for (name, value) in head.iter() {
        if name.eq_ignore_ascii_case(b"te") {
            te_trailers |= value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers"));
        }
        if name.eq_ignore_ascii_case(b"upgrade") && tunnel {
            write_field(out, name, value);
            continue;
        }
        if (req.target_authority.is_some() && name.eq_ignore_ascii_case(b"host"))
            || is_hop_by_hop(name, head, &req.hop)
            || named(name, &edits.remove)
            || edits
                .set
                .iter()
                .any(|(n, _)| name.eq_ignore_ascii_case(n.as_bytes()))
            || name.eq_ignore_ascii_case(b"x-forwarded-proto")
            || name.eq_ignore_ascii_case(fwd.identity_header.as_bytes())
            || (fwd.trace.is_some() && crate::trace::is_context_header(name))
        {
            continue;
        }
        if name.eq_ignore_ascii_case(b"x-forwarded-for") {
            xff.push(value);
            continue;
        }
        has_request_id |= name.eq_ignore_ascii_case(b"x-request-id");
        write_field(out, name, value);
    }
    if te_trailers {
        out.extend_from_slice(b"te: trailers\r\n");
    }
    if req.target_authority.is_some() || req.host.is_none() {
        // An absolute-form target's authority is the Host the upstream
        // gets. An HTTP/1.0 request without Host goes out as HTTP/1.1,
        // which requires one: empty then (RFC 9110 §7.2; found by the
        // request_head fuzzer).
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(req.authority().unwrap_or_default());
        out.extend_from_slice(b"\r\n");
    }
    if tunnel {
        out.extend_from_slice(b"connection: upgrade\r\n");
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    for v in xff {
        out.extend_from_slice(v);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(fwd.client_ip.as_bytes());
    out.extend_from_slice(b"\r\nx-forwarded-proto: ");
    out.extend_from_slice(fwd.proto.as_bytes());
    out.extend_from_slice(b"\r\n");
    if !has_request_id {
        write_field(out, b"x-request-id", fwd.request_id);
    }
    if let Some(id) = fwd.identity {
        write_field(out, fwd.identity_header.as_bytes(), id.as_bytes());
    }
    if let Some(hop) = &fwd.trace {
        for (name, value) in hop.outgoing() {
            write_field(out, name.as_bytes(), &value);
        }
    }
    write_framing(out, body, head, &req.codings);
    write_edits(out, edits);
    out.extend_from_slice(b"\r\n");
}

/// Writes the head we send the client for `res`.
///
/// `keep_alive` is whether the client connection stays open after this
/// response; `tunnel` keeps Upgrade for a 101.
pub fn response(
    res: &ResponseHead,
    body: OutBody,
    keep_alive: bool,
    tunnel: bool,
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(out, u64::from(res.status));
    out.push(b' ');
    out.extend_from_slice(res.reason());
    out.extend_from_slice(b"\r\n");
    let head = &res.head;
    for (name, value) in head.iter() {
        if tunnel && name.eq_ignore_ascii_case(b"upgrade") {
            write_field(out, name, value);
            continue;
        }
        // A body-less response (HEAD, 304) keeps its Content-Length: it
        // describes the representation, not this message's framing.
        if body == OutBody::None && name.eq_ignore_ascii_case(b"content-length") {
            write_field(out, name, value);
            continue;
        }
        if is_hop_by_hop(name, head, &res.hop) {
            continue;
        }
        write_field(out, name, value);
    }
    // Inner codings only survive when the upstream itself chunked; a
    // close-delimited body we re-chunk has none.
    let codings = if res.body == super::ResponseBody::Chunked {
        &res.codings[..]
    } else {
        &[]
    };
    write_framing(out, body, head, codings);
    if tunnel && res.status == 101 {
        out.extend_from_slice(b"connection: upgrade\r\n");
    } else if !keep_alive && !tunnel {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_form_goes_out_in_origin_form_with_its_authority_as_host() {
        let mut p = crate::http1::RequestParser::new(crate::http1::HeadLimits::default());
        let raw = b"GET http://a.example:80/x/%2e%2e/y?q HTTP/1.1\r\nHost: A.EXAMPLE\r\n\r\n";
        let (mut req, _) = p.parse(raw).unwrap().unwrap();
        req.normalize_path(crate::route::path::PathOptions::default())
            .unwrap();
        let fwd = Forwarding {
            client_ip: "127.0.0.1",
            proto: "http",
            request_id: b"id",
            identity_header: "x-id",
            identity: None,
            trace: None,
        };
        let mut out = Vec::new();
        request(
            &req,
            OutBody::None,
            false,
            &fwd,
            &Edits::default(),
            &mut out,
        );
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("GET /y?q HTTP/1.1\r\n"), "{text}");
        assert_eq!(
            text.matches("host:").count() + text.matches("Host:").count(),
            1,
            "{text}"
        );
        assert!(text.contains("host: a.example:80\r\n"), "{text}");
    }

    #[test]
    fn decimals_and_hop_by_hop_names() {
        for n in [0u64, 7, 10, 204, 65_536, u64::MAX] {
            let mut out = Vec::new();
            push_decimal(&mut out, n);
            assert_eq!(out, n.to_string().into_bytes());
        }
        for name in [
            "TE",
            "Connection",
            "keep-alive",
            "Transfer-Encoding",
            "content-length",
            "Upgrade",
            "trailer",
        ] {
            assert!(always_hop_by_hop(name.as_bytes()), "{name}");
        }
        for name in ["host", "tes", "connections", "traceparent", "x-upgrade"] {
            assert!(!always_hop_by_hop(name.as_bytes()), "{name}");
        }
    }
}
