//! Heads across versions: HTTP/1.1 heads to HTTP/2 header maps and back,
//! by RFC 9113 §8.2, plus the fields the proxy itself adds to a forwarded
//! request.
//!
//! What must hold: names go out lower-case on HTTP/2; connection-specific
//! fields (Connection and what it names, Keep-Alive, Proxy-Connection,
//! Transfer-Encoding, Upgrade, TE other than `trailers`) never cross into
//! HTTP/2; `Host` becomes `:authority` and back; cookie crumbs are joined
//! with `; ` for HTTP/1.1 (RFC 9113 §8.2.3); framing is always written
//! from the framing the proxy decided, never copied.

use http::{
    header::{self, HeaderName, HeaderValue},
    HeaderMap, Method, StatusCode, Uri,
};

use crate::http1::{
    chunked::Trailers,
    head::{RequestHead, ResponseHead},
    write::{self, is_hop_by_hop, write_field, Edits, Forwarding, OutBody},
};

/// Why a head cannot be carried into the other version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Untranslatable(pub String);

fn bad(what: impl Into<String>) -> Untranslatable {
    Untranslatable(what.into())
}

/// Fields that are connection-specific in HTTP/1.1 and must not appear
/// in an HTTP/2 message (RFC 9113 §8.2.2), plus `host` (carried as
/// `:authority`) and the framing fields the proxy writes itself.
fn h1_only(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "upgrade"
            | "te"
            | "trailer"
            | "host"
    )
}

/// Whether `te` lists `trailers` (the one TE value HTTP/2 keeps).
fn te_trailers(value: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers"))
}

/// The request an HTTP/1.1 client sent, as an HTTP/2 request head for an
/// upstream reached over `scheme` (normalized target, authority from an
/// absolute-form target or Host).
pub fn request_from_h1(
    req: &RequestHead,
    scheme: &'static str,
) -> Result<(Method, Uri, HeaderMap), Untranslatable> {
    let method = Method::from_bytes(req.method()).map_err(|_| bad("method"))?;
    let authority = req.authority().unwrap_or_default();
    let mut uri = Vec::with_capacity(scheme.len() + 3 + authority.len() + 64);
    // No authority (an HTTP/1.0 request without Host): the target stays
    // in origin form, and the upstream side names the endpoint.
    if !authority.is_empty() {
        uri.extend_from_slice(scheme.as_bytes());
        uri.extend_from_slice(b"://");
        uri.extend_from_slice(authority);
    }
    escape_target(req.origin_target(), &mut uri);
    let uri = Uri::try_from(uri).map_err(|e| bad(format!("request target: {e}")))?;
    let mut headers = HeaderMap::with_capacity(req.head.fields.len() + 4);
    if req.head.get_all("te").any(te_trailers) {
        headers.append(header::TE, HeaderValue::from_static("trailers"));
    }
    h2_fields(&req.head, &req.hop, &mut headers)?;
    Ok((method, uri, headers))
}

/// Appends an HTTP/1.1 origin-form target, percent-encoding the bytes
/// that HTTP/1.1 parsers take in practice but a URI may not hold (`"`,
/// `<`, `>`, `\`, `^`, `` ` ``, `{`, `|`, `}`, and non-ASCII: RFC 3986
/// §2): `/q?a="b"` reaches an h2 upstream as `/q?a=%22b%22`, which means
/// the same, instead of being refused. `%` itself is left alone.
fn escape_target(target: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in target {
        if b.is_ascii_graphic() && !b"\"<>\\^`{|}".contains(&b) {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
        }
    }
}

/// Copies an HTTP/1.1 head's end-to-end fields into an h2 header map:
/// hop-by-hop and connection-specific ones stay behind (TE too: the
/// caller adds `te: trailers` when it was asked for). Content-Length is
/// framing we decided on and stays valid on h2, where the peer checks the
/// DATA against it.
fn h2_fields(
    head: &crate::http1::head::Head,
    hop: &crate::http1::head::Hop,
    out: &mut HeaderMap,
) -> Result<(), Untranslatable> {
    for (name, value) in head.iter() {
        let framing = name.eq_ignore_ascii_case(b"content-length");
        if !framing && is_hop_by_hop(name, head, hop) {
            continue;
        }
        let name = HeaderName::from_bytes(name).map_err(|_| bad("field name"))?;
        if h1_only(&name) {
            continue;
        }
        let value = HeaderValue::from_bytes(value).map_err(|_| bad("field value"))?;
        out.append(name, value);
    }
    Ok(())
}

/// What the proxy adds to (and removes from) every forwarded request, on
/// a header map: the same fields as [`write::request`] writes on HTTP/1.
pub fn forwarding(headers: &mut HeaderMap, fwd: &Forwarding<'_>, edits: &Edits) {
    // Names as constants: a name given as text is parsed on every call
    // (callgrind: this function cost 4.7k instructions per request so).
    const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
    const XFP: HeaderName = HeaderName::from_static("x-forwarded-proto");
    const XRID: HeaderName = HeaderName::from_static("x-request-id");
    if let Ok(name) = HeaderName::from_bytes(fwd.identity_header.as_bytes()) {
        headers.remove(&name);
        if let Some(value) = fwd.identity.and_then(|v| HeaderValue::from_str(v).ok()) {
            headers.insert(name, value);
        }
    }
    let client = match headers.get(&XFF) {
        None => HeaderValue::from_str(fwd.client_ip).ok(),
        Some(_) => {
            let mut xff = Vec::new();
            for v in headers.get_all(&XFF) {
                xff.extend_from_slice(v.as_bytes());
                xff.extend_from_slice(b", ");
            }
            xff.extend_from_slice(fwd.client_ip.as_bytes());
            HeaderValue::from_bytes(&xff).ok()
        }
    };
    if let Some(v) = client {
        headers.insert(XFF, v);
    }
    let proto = if fwd.proto == "https" {
        HeaderValue::from_static("https")
    } else {
        HeaderValue::from_static("http")
    };
    headers.insert(XFP, proto);
    if !headers.contains_key(&XRID) {
        if let Ok(v) = HeaderValue::from_bytes(fwd.request_id) {
            headers.insert(XRID, v);
        }
    }
    if let Some(hop) = &fwd.trace {
        for name in crate::trace::HEADERS {
            headers.remove(name);
        }
        for (name, value) in hop.outgoing() {
            if let Ok(v) = HeaderValue::from_bytes(&value) {
                headers.insert(HeaderName::from_static(name), v);
            }
        }
    }
    for name in &edits.remove {
        headers.remove(name.as_str());
    }
    for (n, v) in &edits.set {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(n.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            headers.insert(n, v);
        }
    }
    for (n, v) in &edits.add {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(n.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            headers.append(n, v);
        }
    }
}

/// Writes an HTTP/1.1 request head for an HTTP/2 request: `host` from
/// the authority, cookie crumbs joined, framing as decided.
pub fn request_to_h1(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: OutBody,
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    let target = uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(if target.is_empty() { "/" } else { target }.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    let host = uri
        .authority()
        .map(|a| a.as_str().as_bytes())
        .or_else(|| headers.get(header::HOST).map(HeaderValue::as_bytes))
        .unwrap_or_default();
    out.extend_from_slice(host);
    out.extend_from_slice(b"\r\n");
    if headers
        .get_all(header::TE)
        .iter()
        .any(|v| te_trailers(v.as_bytes()))
    {
        out.extend_from_slice(b"te: trailers\r\n");
    }
    let mut cookies: Vec<&[u8]> = Vec::new();
    for (name, value) in headers {
        if h1_only(name) || name == header::CONTENT_LENGTH {
            continue;
        }
        if name == header::COOKIE {
            cookies.push(value.as_bytes());
            continue;
        }
        write_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if !cookies.is_empty() {
        out.extend_from_slice(b"cookie: ");
        for (i, c) in cookies.iter().enumerate() {
            if i > 0 {
                out.extend_from_slice(b"; ");
            }
            out.extend_from_slice(c);
        }
        out.extend_from_slice(b"\r\n");
    }
    framing(out, body);
    out.extend_from_slice(b"\r\n");
}

fn framing(out: &mut Vec<u8>, body: OutBody) {
    match body {
        OutBody::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            write::push_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        OutBody::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        OutBody::None | OutBody::Close => {}
    }
}

/// An HTTP/1.1 upstream's response head as an HTTP/2 response head.
pub fn response_from_h1(resp: &ResponseHead) -> Result<(StatusCode, HeaderMap), Untranslatable> {
    let status = StatusCode::from_u16(resp.status).map_err(|_| bad("status"))?;
    let mut headers = HeaderMap::with_capacity(resp.head.fields.len());
    h2_fields(&resp.head, &resp.hop, &mut headers)?;
    Ok((status, headers))
}

/// Writes an HTTP/1.1 response head for an HTTP/2 response.
pub fn response_to_h1(
    status: StatusCode,
    headers: &HeaderMap,
    body: OutBody,
    keep_alive: bool,
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    write::push_decimal(out, u64::from(status.as_u16()));
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        // A body-less answer (HEAD, 304) keeps its Content-Length: it
        // describes the representation, not this message's framing.
        let length = name == header::CONTENT_LENGTH;
        if h1_only(name) || (length && body != OutBody::None) {
            continue;
        }
        write_field(out, name.as_str().as_bytes(), value.as_bytes());
    }
    framing(out, body);
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// An HTTP/1.1 trailer section (raw, as the chunked decoder keeps it) as
/// an h2 trailer block: the fields `policy` allows, names lowercased; a
/// field h2 cannot carry is left out. None when nothing is left.
pub fn trailers_from_h1(raw: &[u8], policy: Trailers<'_>) -> Option<HeaderMap> {
    let mut map = HeaderMap::new();
    for (name, value) in
        crate::http1::chunked::trailer_fields(raw).filter(|(n, _)| policy.allows(n))
    {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            map.append(n, v);
        }
    }
    (!map.is_empty()).then_some(map)
}

/// Drops the fields of an h2 trailer block that `policy` does not allow;
/// None when nothing is left.
pub fn scrub_trailers(mut map: HeaderMap, policy: Trailers<'_>) -> Option<HeaderMap> {
    let refused: Vec<HeaderName> = map
        .keys()
        .filter(|n| !policy.allows(n.as_str().as_bytes()))
        .cloned()
        .collect();
    for name in refused {
        map.remove(name);
    }
    (!map.is_empty()).then_some(map)
}

/// Appends the last chunk with an h2 trailer block as its trailer section
/// (the fields `policy` allows; just the last chunk for None).
pub fn write_last_chunk(trailers: Option<&HeaderMap>, policy: Trailers<'_>, out: &mut Vec<u8>) {
    out.extend_from_slice(b"0\r\n");
    for (name, value) in trailers.into_iter().flatten() {
        if policy.allows(name.as_str().as_bytes()) {
            write_field(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    out.extend_from_slice(b"\r\n");
}

/// The Content-Length of an HTTP/2 message, when it has one valid value.
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    let mut all = headers.get_all(header::CONTENT_LENGTH).iter();
    let first = all.next()?;
    if all.next().is_some() {
        return None;
    }
    std::str::from_utf8(first.as_bytes()).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http1::{HeadLimits, RequestParser};

    fn parse(raw: &[u8]) -> RequestHead {
        RequestParser::new(HeadLimits::default())
            .parse(raw)
            .unwrap()
            .unwrap()
            .0
    }

    #[test]
    fn h1_request_loses_connection_fields_and_keeps_te_trailers() {
        let req = parse(
            b"POST /a?b HTTP/1.1\r\nHost: Svc:8080\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n\
              Keep-Alive: 5\r\nTE: trailers, gzip\r\nUpgrade: foo\r\nProxy-Connection: x\r\n\
              Content-Length: 3\r\nX-Keep: yes\r\n\r\n",
        );
        let (method, uri, h) = request_from_h1(&req, "https").unwrap();
        assert_eq!(method, Method::POST);
        assert_eq!(uri.to_string(), "https://Svc:8080/a?b");
        assert_eq!(h.get("te").unwrap(), "trailers");
        assert_eq!(h.get("x-keep").unwrap(), "yes");
        assert_eq!(h.get("content-length").unwrap(), "3");
        for gone in [
            "connection",
            "x-hop",
            "keep-alive",
            "upgrade",
            "proxy-connection",
            "host",
        ] {
            assert!(!h.contains_key(gone), "{gone}");
        }
    }

    #[test]
    fn h1_targets_a_uri_cannot_hold_are_escaped_and_a_missing_host_stays_missing() {
        let req = parse(b"GET /q?a=\"b\"&c={x}|%41 HTTP/1.1\r\nHost: svc\r\n\r\n");
        let (_, uri, _) = request_from_h1(&req, "http").unwrap();
        assert_eq!(uri.to_string(), "http://svc/q?a=%22b%22&c=%7Bx%7D%7C%41");
        // HTTP/1.0 without Host: origin form, no authority made up here.
        let req = parse(b"GET /x HTTP/1.0\r\n\r\n");
        let (_, uri, _) = request_from_h1(&req, "http").unwrap();
        assert_eq!((uri.authority(), uri.path()), (None, "/x"));
    }

    #[test]
    fn h2_request_to_h1_gets_host_joined_cookies_and_our_framing() {
        let mut h = HeaderMap::new();
        h.append("cookie", HeaderValue::from_static("a=1"));
        h.append("cookie", HeaderValue::from_static("b=2"));
        h.append("content-length", HeaderValue::from_static("999"));
        h.append("te", HeaderValue::from_static("trailers"));
        h.append("x-y", HeaderValue::from_static("z"));
        let uri: Uri = "http://svc.local/p?q=1".parse().unwrap();
        let mut out = Vec::new();
        request_to_h1(&Method::GET, &uri, &h, OutBody::Chunked, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("GET /p?q=1 HTTP/1.1\r\nhost: svc.local\r\n"),
            "{text}"
        );
        assert!(text.contains("cookie: a=1; b=2\r\n"), "{text}");
        assert!(text.contains("transfer-encoding: chunked\r\n"), "{text}");
        assert!(!text.contains("999"), "{text}");
        // Kept, as the HTTP/1.1 path keeps it: the client takes trailers.
        assert!(text.contains("te: trailers\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\n"));
    }

    #[test]
    fn forwarding_fields_replace_what_the_client_claimed() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        h.insert("x-caller", HeaderValue::from_static("spiffe://forged"));
        let fwd = Forwarding {
            client_ip: "10.0.0.1",
            proto: "http",
            request_id: b"abc",
            identity_header: "x-caller",
            identity: None,
            trace: None,
        };
        forwarding(&mut h, &fwd, &Edits::default());
        assert_eq!(h.get("x-forwarded-for").unwrap(), "1.2.3.4, 10.0.0.1");
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "http");
        assert!(h.get("x-caller").is_none());
        assert_eq!(h.get("x-request-id").unwrap(), "abc");
    }

    #[test]
    fn content_length_must_be_single_and_numeric() {
        let mut h = HeaderMap::new();
        assert_eq!(content_length(&h), None);
        h.append("content-length", HeaderValue::from_static("12"));
        assert_eq!(content_length(&h), Some(12));
        h.append("content-length", HeaderValue::from_static("12"));
        assert_eq!(content_length(&h), None);
    }
}
