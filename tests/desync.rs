//! The http_desync_guardian request vectors (tests/vectors/) run through
//! the HTTP/1.1 codec: severe ones are never forwarded, compliant ones are
//! forwarded with the same meaning, ambiguous ones are rejected or
//! forwarded in a form a strict parser reads as exactly one request.
//!
//! Each vector is a method, target, version and field list; we write it as
//! raw bytes with `Host: example.com` first (the vectors omit Host, which
//! HTTP/1.1 requires) and an empty line at the end.

use std::{collections::BTreeMap, path::Path};

use pilotfish::http1::{
    head::RequestKind,
    write::{self, Edits, Forwarding, OutBody},
    HeadLimits, RequestBody, RequestHead, RequestParser,
};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Vector {
    name: String,
    uri: String,
    method: String,
    version: String,
    #[serde(default)]
    headers: Vec<Field>,
    expected: Expected,
}

#[derive(Debug, Deserialize)]
struct Field {
    name: String,
    value: serde_norway::Value,
}

#[derive(Debug, Deserialize)]
struct Expected {
    tier: String,
}

fn scalar(v: &serde_norway::Value) -> String {
    match v {
        serde_norway::Value::String(s) => s.clone(),
        serde_norway::Value::Number(n) => n.to_string(),
        serde_norway::Value::Bool(b) => b.to_string(),
        other => panic!("unexpected field value {other:?}"),
    }
}

fn raw(v: &Vector) -> Vec<u8> {
    let mut out = format!("{} {}", v.method, v.uri);
    if !v.version.is_empty() {
        out += &format!(" {}", v.version);
    }
    out += "\r\nHost: example.com\r\n";
    for f in &v.headers {
        out += &format!("{}: {}\r\n", f.name, scalar(&f.value));
    }
    out += "\r\n";
    out.into_bytes()
}

fn parse(bytes: &[u8]) -> Option<RequestHead> {
    match RequestParser::new(HeadLimits::default()).parse(bytes) {
        Ok(Some((head, used))) if used == bytes.len() => Some(head),
        _ => None,
    }
}

/// What we would send upstream for `req`.
fn forwarded(req: &RequestHead) -> Vec<u8> {
    let body = match req.body {
        RequestBody::Empty => OutBody::None,
        RequestBody::Length(n) => OutBody::Length(n),
        RequestBody::Chunked => OutBody::Chunked,
    };
    let fwd = Forwarding {
        client_ip: "192.0.2.1",
        proto: "http",
        request_id: b"test-id",
        identity_header: "x-pilotfish-peer-identity",
        identity: None,
        trace: None,
    };
    let mut out = Vec::new();
    write::request(req, body, false, &fwd, &Edits::default(), &mut out);
    out
}

/// End-to-end fields as (lower-case name, value), in order.
fn end_to_end(req: &RequestHead) -> Vec<(String, Vec<u8>)> {
    const OURS: &[&str] = &["x-forwarded-for", "x-forwarded-proto", "x-request-id"];
    const FRAMING: &[&str] = &[
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
    ];
    req.head
        .iter()
        .map(|(n, v)| (String::from_utf8_lossy(n).to_ascii_lowercase(), v.to_vec()))
        .filter(|(n, _)| {
            !OURS.contains(&n.as_str())
                && !FRAMING.contains(&n.as_str())
                && !n.starts_with("proxy-")
        })
        .collect()
}

/// "Compliant" in http_desync_guardian means "no desync risk", judged on
/// framing alone. These vectors are malformed for other reasons, and RFC
/// 9112 has us answer 400; each is named with the reason.
const COMPLIANT_BUT_MALFORMED: &[(&str, &str)] = &[(
    "Empty URI",
    "`GET  HTTP/1.1` has no request-target (RFC 9112 §3: request-line = method SP request-target SP HTTP-version)",
)];

#[test]
fn desync_vectors() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/http_desync_guardian");
    let mut counts: BTreeMap<String, (usize, usize)> = BTreeMap::new(); // tier -> (rejected, forwarded)
    let mut total = 0;
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    for path in files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
    {
        let vectors: Vec<Vector> = serde_norway::from_str(&std::fs::read_to_string(path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for v in vectors {
            total += 1;
            let bytes = raw(&v);
            let parsed = parse(&bytes);
            let entry = counts.entry(v.expected.tier.clone()).or_default();
            let Some(req) = parsed else {
                entry.0 += 1;
                if v.expected.tier == "Compliant" {
                    let why = RequestParser::new(HeadLimits::default())
                        .parse(&bytes)
                        .err();
                    assert!(
                        COMPLIANT_BUT_MALFORMED
                            .iter()
                            .any(|(name, _)| *name == v.name),
                        "compliant vector rejected: {:?}: {why:?}\n{}",
                        v.name,
                        String::from_utf8_lossy(&bytes).escape_debug()
                    );
                }
                continue;
            };
            entry.1 += 1;
            assert_ne!(
                v.expected.tier, "Severe",
                "severe vector accepted: {}",
                v.name
            );
            // Whatever we accept, we forward in a form a strict parser reads
            // as exactly one request with the same meaning.
            let out = forwarded(&req);
            let again = parse(&out).unwrap_or_else(|| {
                panic!(
                    "{}: our own output does not parse: {}",
                    v.name,
                    String::from_utf8_lossy(&out)
                )
            });
            assert_eq!(again.method(), req.method(), "{}", v.name);
            assert_eq!(again.target(), req.target(), "{}", v.name);
            assert_eq!(again.body, req.body, "{}: framing changed", v.name);
            assert_eq!(
                end_to_end(&again),
                end_to_end(&req),
                "{}: fields changed",
                v.name
            );
            assert_eq!(RequestKind::of(&again), RequestKind::of(&req));
        }
    }
    eprintln!("desync vectors: {total} in all; per tier (rejected, forwarded): {counts:?}");
    assert_eq!(total, 159, "the vector set is complete");
    assert_eq!(
        counts.get("Severe").map(|c| c.1),
        Some(0),
        "no severe vector forwarded"
    );
    let compliant = counts.get("Compliant").copied().unwrap_or_default();
    assert_eq!(
        compliant.0,
        COMPLIANT_BUT_MALFORMED.len(),
        "only the listed compliant vectors are rejected"
    );
}
