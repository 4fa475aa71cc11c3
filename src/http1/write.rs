//! Writing heads for the other side: our framing, our hop-by-hop fields.
//!
//! What must hold: framing fields (Content-Length, Transfer-Encoding) are
//! written from the framing we decided, never copied; hop-by-hop fields
//! (Connection and every field it names, Keep-Alive, TE except `trailers`,
//! Trailer, Upgrade unless tunnelling, Proxy-*) are not forwarded; tracing
//! fields (traceparent, tracestate, b3) pass untouched.

use std::io::Write;

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
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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
    pub request_id: &'a str,
}

const ALWAYS_HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "content-length",
    "upgrade",
];

/// Whether a field must not cross this hop.
fn is_hop_by_hop(name: &[u8], head: &Head, hop: &Hop) -> bool {
    ALWAYS_HOP_BY_HOP
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
        || (name.len() > 6 && name[..6].eq_ignore_ascii_case(b"proxy-"))
        || hop
            .listed
            .iter()
            .any(|r| name.eq_ignore_ascii_case(&head.bytes[r.clone()]))
}

fn named(name: &[u8], list: &[String]) -> bool {
    list.iter().any(|n| name.eq_ignore_ascii_case(n.as_bytes()))
}

fn write_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
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
            let _ = write!(out, "content-length: {n}\r\n");
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
    out.extend_from_slice(req.target());
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
        if is_hop_by_hop(name, head, &req.hop)
            || named(name, &edits.remove)
            || edits
                .set
                .iter()
                .any(|(n, _)| name.eq_ignore_ascii_case(n.as_bytes()))
            || name.eq_ignore_ascii_case(b"x-forwarded-proto")
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
        write_field(out, b"x-request-id", fwd.request_id.as_bytes());
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
    let _ = write!(out, "HTTP/1.1 {} ", res.status);
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
    if tunnel {
        out.extend_from_slice(b"connection: upgrade\r\n");
    } else if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}
