//! Distributed tracing: trace context in and out of each sidecar hop,
//! the sampling decision, and the span each sampled hop records.
//!
//! Formats: W3C Trace Context (`traceparent`, with `tracestate` passed on
//! unchanged) and B3, single (`b3`) and multi-header (`x-b3-*`). A request
//! keeps the format it came with; one that came with none starts a trace
//! in the config's format ([`crate::config::Tracing::inject`]).
//!
//! What must hold:
//! - The trace id is kept across every hop; each hop is a span of its own
//!   (a server span on inbound listeners, a client span on outbound ones),
//!   whose id is the parent id the next hop receives.
//! - The caller's sampling decision is honoured (W3C flags, B3 `1`/`0`/`d`);
//!   only a request without one is sampled at the configured rate.
//! - Malformed context is ignored as if absent (a new trace), never an
//!   error for the request: tracing must not break traffic.
//! - Recording a span never waits: see [`export`].

pub mod export;
pub mod otlp;

use crate::balance::Rng;

/// The trace-context header names this module reads and rewrites; the
/// request's own copies are dropped when a hop forwards its context.
pub const HEADERS: [&str; 7] = [
    "traceparent",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
];

/// Which headers carry the context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    W3c,
    B3,
    B3Multi,
}

/// One hop's trace context: the trace, this hop's span, the caller's
/// span (the parent), and whether the trace is sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hop {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent: Option<[u8; 8]>,
    pub sampled: bool,
    pub format: Format,
}

fn hex_nibble(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes exactly `N` bytes of hex.
fn unhex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = hex_nibble(pair[0])? << 4 | hex_nibble(pair[1])?;
    }
    Some(out)
}

/// A B3 trace id: 32 hex digits, or 16 (a 64-bit id, left-padded).
fn unhex_trace_id(s: &[u8]) -> Option<[u8; 16]> {
    match s.len() {
        32 => unhex::<16>(s),
        16 => {
            let low = unhex::<8>(s)?;
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&low);
            Some(id)
        }
        _ => None,
    }
}

/// Appends lowercase hex.
pub fn push_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(HEX[usize::from(b >> 4)]);
        out.push(HEX[usize::from(b & 0xf)]);
    }
}

pub fn hex(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len() * 2);
    push_hex(&mut out, bytes);
    String::from_utf8(out).unwrap_or_default()
}

/// What arrived with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Incoming {
    trace_id: [u8; 16],
    parent: [u8; 8],
    /// None: the caller deferred the decision (B3 without a sampled flag).
    sampled: Option<bool>,
    format: Format,
}

/// W3C `traceparent`: `00-<32 hex>-<16 hex>-<2 hex flags>`; a higher
/// version may append fields after the flags (RFC: parse the first four).
fn parse_traceparent(v: &[u8]) -> Option<Incoming> {
    let v = v.trim_ascii();
    if v.len() < 55 || (v.len() > 55 && v[55] != b'-') {
        return None;
    }
    let version = unhex::<1>(&v[0..2])?[0];
    if version == 0xff || (version == 0 && v.len() != 55) {
        return None;
    }
    if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let trace_id = unhex::<16>(&v[3..35])?;
    let parent = unhex::<8>(&v[36..52])?;
    let flags = unhex::<1>(&v[53..55])?[0];
    // All-zero ids are invalid.
    if trace_id == [0; 16] || parent == [0; 8] {
        return None;
    }
    Some(Incoming {
        trace_id,
        parent,
        sampled: Some(flags & 1 == 1),
        format: Format::W3c,
    })
}

fn b3_sampled(v: &[u8]) -> Option<Option<bool>> {
    match v.trim_ascii() {
        b"1" | b"d" | b"true" => Some(Some(true)),
        b"0" | b"false" => Some(Some(false)),
        _ => None,
    }
}

/// B3 single: `<trace>-<span>[-<sampled>[-<parent>]]`; a lone `0`/`1`/`d`
/// is a decision without ids.
fn parse_b3(v: &[u8]) -> Result<Option<Incoming>, Option<bool>> {
    let v = v.trim_ascii();
    let mut parts = v.split(|&b| b == b'-');
    let first = parts.next().unwrap_or_default();
    let Some(second) = parts.next() else {
        // A decision only (`b3: 0`).
        return Err(b3_sampled(first).flatten());
    };
    let (Some(trace_id), Some(parent)) = (unhex_trace_id(first), unhex::<8>(second)) else {
        return Ok(None);
    };
    let sampled = match parts.next() {
        None => None,
        Some(s) => match b3_sampled(s) {
            Some(s) => s,
            None => return Ok(None),
        },
    };
    Ok(Some(Incoming {
        trace_id,
        parent,
        sampled,
        format: Format::B3,
    }))
}

/// How a tracer decides and formats; made from the config.
#[derive(Debug, Clone, Copy)]
pub struct Sampler {
    /// Sampled out of 2^32 for requests without a decision.
    threshold: u64,
    pub inject: Format,
}

impl Sampler {
    pub fn new(rate: f64, inject: Format) -> Self {
        Self {
            threshold: (rate.clamp(0.0, 1.0) * f64::from(u32::MAX) + 0.5) as u64,
            inject,
        }
    }

    fn roll(&self, rng: &Rng) -> bool {
        self.threshold > 0 && (rng.next_u64() & u64::from(u32::MAX)) < self.threshold
    }

    /// This hop's context: continues the trace the request carries (read
    /// with `header`, a case-insensitive lookup), or starts one.
    pub fn hop<'a>(&self, rng: &Rng, header: impl Fn(&str) -> Option<&'a [u8]>) -> Hop {
        let mut decided: Option<bool> = None;
        let incoming = if let Some(tp) = header("traceparent") {
            parse_traceparent(tp)
        } else if let Some(b3) = header("b3") {
            match parse_b3(b3) {
                Ok(found) => found,
                Err(decision) => {
                    decided = decision;
                    None
                }
            }
        } else if let (Some(t), Some(s)) = (header("x-b3-traceid"), header("x-b3-spanid")) {
            let flags_debug = header("x-b3-flags").is_some_and(|f| f.trim_ascii() == b"1");
            let sampled = if flags_debug {
                Some(true)
            } else {
                header("x-b3-sampled").and_then(b3_sampled).flatten()
            };
            match (unhex_trace_id(t.trim_ascii()), unhex::<8>(s.trim_ascii())) {
                (Some(trace_id), Some(parent)) => Some(Incoming {
                    trace_id,
                    parent,
                    sampled,
                    format: Format::B3Multi,
                }),
                _ => None,
            }
        } else {
            decided = header("x-b3-sampled").and_then(b3_sampled).flatten();
            None
        };
        let span_id = nonzero_id(rng);
        match incoming {
            Some(i) => Hop {
                trace_id: i.trace_id,
                span_id,
                parent: Some(i.parent),
                sampled: i.sampled.unwrap_or_else(|| self.roll(rng)),
                format: i.format,
            },
            None => {
                let mut trace_id = [0u8; 16];
                trace_id[..8].copy_from_slice(&rng.next_u64().to_be_bytes());
                trace_id[8..].copy_from_slice(&nonzero_id(rng));
                Hop {
                    trace_id,
                    span_id,
                    parent: None,
                    sampled: decided.unwrap_or_else(|| self.roll(rng)),
                    format: self.inject,
                }
            }
        }
    }
}

fn nonzero_id(rng: &Rng) -> [u8; 8] {
    (rng.next_u64() | 1).to_be_bytes()
}

impl Hop {
    /// The header fields that carry this hop's context to the next one,
    /// as (lowercase name, value): this hop's span is their parent.
    pub fn outgoing(&self) -> smallvec::SmallVec<[(&'static str, Vec<u8>); 3]> {
        let mut out = smallvec::SmallVec::new();
        let sampled = if self.sampled { b'1' } else { b'0' };
        match self.format {
            Format::W3c => {
                let mut v = Vec::with_capacity(55);
                v.extend_from_slice(b"00-");
                push_hex(&mut v, &self.trace_id);
                v.push(b'-');
                push_hex(&mut v, &self.span_id);
                v.extend_from_slice(if self.sampled { b"-01" } else { b"-00" });
                out.push(("traceparent", v));
            }
            Format::B3 => {
                let mut v = Vec::with_capacity(68);
                push_hex(&mut v, &self.trace_id);
                v.push(b'-');
                push_hex(&mut v, &self.span_id);
                v.push(b'-');
                v.push(sampled);
                if let Some(p) = self.parent {
                    v.push(b'-');
                    push_hex(&mut v, &p);
                }
                out.push(("b3", v));
            }
            Format::B3Multi => {
                let mut t = Vec::with_capacity(32);
                push_hex(&mut t, &self.trace_id);
                out.push(("x-b3-traceid", t));
                let mut s = Vec::with_capacity(16);
                push_hex(&mut s, &self.span_id);
                out.push(("x-b3-spanid", s));
                if let Some(p) = self.parent {
                    let mut v = Vec::with_capacity(16);
                    push_hex(&mut v, &p);
                    out.push(("x-b3-parentspanid", v));
                }
                out.push(("x-b3-sampled", vec![sampled]));
            }
        }
        out
    }
}

/// The span of a completed, sampled hop: a server span on an inbound
/// listener, a client span on an outbound one, named `METHOD route` (the
/// listener when no route matched), with OpenTelemetry's HTTP attribute
/// names where one exists and `pilotfish.*` for the mesh's own, and one
/// `retry` event per retry.
pub fn span(
    hop: &Hop,
    r: &crate::metrics::tap::Request<'_>,
    now: std::time::SystemTime,
) -> otlp::Span {
    use otlp::Value::{Int, Str};
    let ns = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    };
    // Wall-clock times from the monotonic ones: `now` is `r.ended`.
    let at = |t: std::time::Instant| ns(now - r.ended.saturating_duration_since(t));
    let l = &r.labels;
    let note = r.note;
    let mut attributes = vec![
        ("http.request.method", Str(r.method.to_string())),
        ("url.path", Str(r.target.to_string())),
        (
            "network.protocol.version",
            Str(r.version.trim_start_matches("HTTP/").to_string()),
        ),
        ("client.address", Str(r.client.to_string())),
        ("http.response.status_code", Int(i64::from(note.status))),
        ("pilotfish.direction", Str(l.direction.name().to_string())),
        ("pilotfish.listener", Str(l.listener.to_string())),
        ("pilotfish.tls", otlp::Value::Bool(l.tls)),
        ("pilotfish.attempts", Int(i64::from(note.attempts))),
    ];
    let mut opt = |k: &'static str, v: Option<String>| {
        if let Some(v) = v {
            attributes.push((k, Str(v)));
        }
    };
    opt("server.address", r.authority.map(str::to_string));
    opt("pilotfish.route", l.route.map(str::to_string));
    opt("pilotfish.cluster", l.cluster.map(str::to_string));
    opt("pilotfish.peer_identity", l.peer.map(str::to_string));
    opt("pilotfish.upstream", note.upstream.map(|a| a.to_string()));
    opt("pilotfish.error", note.error.map(str::to_string));
    if let Some(g) = note.grpc_status {
        attributes.push(("rpc.grpc.status_code", Int(i64::from(g))));
    }
    let events = note
        .retried_at
        .iter()
        .enumerate()
        .filter_map(|(i, t)| {
            t.map(|t| otlp::Event {
                time_ns: at(t),
                name: "retry",
                attributes: vec![("pilotfish.attempt", Int(i as i64 + 2))],
            })
        })
        .collect();
    let error = if let Some(e) = note.error {
        Some(e.to_string())
    } else if note.status == 0 {
        Some("no response".to_string())
    } else if note.status >= 500 {
        Some(format!("status {}", note.status))
    } else {
        note.grpc_status
            .filter(|&g| g != 0)
            .map(|g| format!("grpc-status {g}"))
    };
    otlp::Span {
        trace_id: hop.trace_id,
        span_id: hop.span_id,
        parent: hop.parent,
        name: format!("{} {}", r.method, l.route.unwrap_or(l.listener)),
        kind: match l.direction {
            crate::config::intercept::Direction::Inbound => otlp::Kind::Server,
            crate::config::intercept::Direction::Outbound => otlp::Kind::Client,
        },
        start_ns: at(r.started),
        end_ns: ns(now),
        attributes,
        events,
        error,
    }
}

/// Whether `name` is a trace-context header this module rewrites.
pub fn is_context_header(name: &[u8]) -> bool {
    HEADERS
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(s: &Sampler, headers: &[(&str, &str)]) -> Hop {
        let rng = Rng::seeded(7);
        s.hop(&rng, |name| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_bytes())
        })
    }

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

    #[test]
    fn w3c_is_continued_with_a_new_span_and_the_callers_decision() {
        let never = Sampler::new(0.0, Format::W3c);
        let tp = format!("00-{TRACE}-00f067aa0ba902b7-01");
        let h = hop(&never, &[("traceparent", &tp)]);
        assert_eq!(hex(&h.trace_id), TRACE);
        assert_eq!(
            h.parent.map(|p| hex(&p)).as_deref(),
            Some("00f067aa0ba902b7")
        );
        assert!(h.sampled, "the caller's flag wins over the rate");
        assert_ne!(hex(&h.span_id), "00f067aa0ba902b7");
        let (name, v) = &h.outgoing()[0];
        assert_eq!(*name, "traceparent");
        let v = String::from_utf8(v.clone()).unwrap();
        assert_eq!(v, format!("00-{TRACE}-{}-01", hex(&h.span_id)));
        // Not sampled by the caller: not sampled here, even at rate 1.
        let always = Sampler::new(1.0, Format::W3c);
        let tp = format!("00-{TRACE}-00f067aa0ba902b7-00");
        assert!(!hop(&always, &[("traceparent", &tp)]).sampled);
        // A future version with extra fields is read; garbage is a new trace.
        let tp = format!("cc-{TRACE}-00f067aa0ba902b7-01-what-the-future-has");
        assert_eq!(hex(&hop(&never, &[("traceparent", &tp)]).trace_id), TRACE);
        for bad in [
            format!("00-{TRACE}-0000000000000000-01"),
            format!("00-{}-00f067aa0ba902b7-01", "0".repeat(32)),
            format!("00-{TRACE}-00f067aa0ba902b7-01-extra"),
            format!("ff-{TRACE}-00f067aa0ba902b7-01"),
            "00-xyz".to_string(),
        ] {
            let h = hop(&always, &[("traceparent", &bad)]);
            assert_ne!(hex(&h.trace_id), TRACE, "{bad}");
            assert_eq!(h.parent, None, "{bad}");
        }
    }

    #[test]
    fn b3_single_and_multi_keep_their_format() {
        let never = Sampler::new(0.0, Format::W3c);
        let h = hop(
            &never,
            &[(
                "b3",
                &format!("{TRACE}-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90"),
            )],
        );
        assert_eq!(
            (hex(&h.trace_id).as_str(), h.sampled, h.format),
            (TRACE, true, Format::B3)
        );
        let v = String::from_utf8(h.outgoing()[0].1.clone()).unwrap();
        assert_eq!(v, format!("{TRACE}-{}-1-e457b5a2e4d86bd1", hex(&h.span_id)));
        // A 64-bit trace id, deferred decision: the rate decides (0 here).
        let h = hop(&never, &[("b3", "a3ce929d0e0e4736-e457b5a2e4d86bd1")]);
        assert_eq!(
            hex(&h.trace_id),
            format!("{}a3ce929d0e0e4736", "0".repeat(16))
        );
        assert!(!h.sampled);
        // `b3: 0` alone: not sampled, a new trace.
        let always = Sampler::new(1.0, Format::B3);
        let h = hop(&always, &[("b3", "0")]);
        assert!(!h.sampled && h.parent.is_none());
        let multi = [
            ("X-B3-TraceId", TRACE),
            ("X-B3-SpanId", "e457b5a2e4d86bd1"),
            ("X-B3-Sampled", "1"),
        ];
        let h = hop(&never, &multi);
        assert_eq!((h.sampled, h.format), (true, Format::B3Multi));
        let out = h.outgoing();
        let names: Vec<&str> = out.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "x-b3-traceid",
                "x-b3-spanid",
                "x-b3-parentspanid",
                "x-b3-sampled"
            ]
        );
        assert_eq!(out[2].1, b"e457b5a2e4d86bd1");
    }

    #[test]
    fn a_span_has_the_hops_ids_kind_attributes_and_one_event_per_retry() {
        use crate::{config::intercept::Direction, metrics::golden::LabelsRef};
        let rng = Rng::seeded(3);
        let tp = format!("00-{TRACE}-00f067aa0ba902b7-01");
        let h = Sampler::new(0.0, Format::W3c)
            .hop(&rng, |n| (n == "traceparent").then_some(tp.as_bytes()));
        let started = std::time::Instant::now();
        let mut note = crate::http::Note {
            status: 503,
            ..Default::default()
        };
        note.attempt(1, started);
        note.attempt(2, started + std::time::Duration::from_millis(1));
        note.attempt(3, started + std::time::Duration::from_millis(2));
        let ended = started + std::time::Duration::from_millis(3);
        let r = crate::metrics::tap::Request {
            labels: LabelsRef {
                direction: Direction::Outbound,
                listener: "out",
                route: Some("api"),
                cluster: Some("b"),
                tls: true,
                peer: Some("spiffe://mesh/b"),
            },
            client: "127.0.0.1",
            method: "POST",
            authority: Some("b.mesh"),
            target: "/x",
            version: "HTTP/1.1",
            request_bytes: None,
            started,
            ended,
            note: &note,
        };
        let now = std::time::SystemTime::now();
        let s = span(&h, &r, now);
        assert_eq!(
            (s.trace_id, s.span_id, s.parent),
            (h.trace_id, h.span_id, h.parent)
        );
        assert_eq!(s.kind, otlp::Kind::Client);
        assert_eq!(s.name, "POST api");
        assert_eq!(s.end_ns - s.start_ns, 3_000_000);
        let attempts: Vec<_> = s
            .events
            .iter()
            .map(|e| (e.name, e.attributes[0].1.clone(), s.end_ns - e.time_ns))
            .collect();
        assert_eq!(
            attempts,
            [
                ("retry", otlp::Value::Int(2), 2_000_000),
                ("retry", otlp::Value::Int(3), 1_000_000)
            ]
        );
        assert_eq!(s.error.as_deref(), Some("status 503"));
        assert!(s.attributes.contains(&(
            "pilotfish.peer_identity",
            otlp::Value::Str("spiffe://mesh/b".into())
        )));
    }

    #[test]
    fn without_context_a_trace_starts_at_the_configured_rate() {
        let rng = Rng::seeded(1);
        let half = Sampler::new(0.5, Format::W3c);
        let sampled = (0..10_000)
            .filter(|_| half.hop(&rng, |_| None).sampled)
            .count();
        assert!((4_500..5_500).contains(&sampled), "{sampled}");
        let never = Sampler::new(0.0, Format::W3c);
        assert!(!(0..1000).any(|_| never.hop(&rng, |_| None).sampled));
        let always = Sampler::new(1.0, Format::B3Multi);
        let h = always.hop(&rng, |_| None);
        assert!(h.sampled && h.parent.is_none() && h.format == Format::B3Multi);
        assert_ne!(h.trace_id, [0; 16]);
    }
}
