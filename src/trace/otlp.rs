//! Spans as OTLP protobuf: an `ExportTraceServiceRequest`
//! (opentelemetry-proto v1, `collector/trace/v1/trace_service.proto` and
//! `trace/v1/trace.proto`) for `POST /v1/traces` over HTTP.
//!
//! Written by hand for the few messages a span needs rather than with a
//! code generator: the field numbers below are the proto's, and the tests
//! (here and in tests/tracing.rs, which decodes with the official Python
//! `opentelemetry-proto` package) hold the encoding to them.
//!
//! What must hold: every length is the exact length of what follows; ids
//! are 16 and 8 bytes; times are nanoseconds since the Unix epoch.

/// A span, as a hop records it.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent: Option<[u8; 8]>,
    pub name: String,
    pub kind: Kind,
    pub start_ns: u64,
    pub end_ns: u64,
    pub attributes: Vec<(&'static str, Value)>,
    pub events: Vec<Event>,
    /// Some: the span failed (status ERROR), with why.
    pub error: Option<String>,
}

/// `Span.SpanKind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Server = 2,
    Client = 3,
}

/// `AnyValue`, the kinds a hop uses.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
}

/// `Span.Event`.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub time_ns: u64,
    pub name: &'static str,
    pub attributes: Vec<(&'static str, Value)>,
}

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, u64::from(field) << 3 | u64::from(wire));
}

fn bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    key(out, field, LEN);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn fixed64(out: &mut Vec<u8>, field: u32, v: u64) {
    key(out, field, FIXED64);
    out.extend_from_slice(&v.to_le_bytes());
}

/// A nested message: encoded by `f` at the end of `out`, then its key and
/// length are inserted before it (one move of the bytes, no scratch
/// buffer: callgrind counted the buffers at most of a span's encoding).
fn message(out: &mut Vec<u8>, field: u32, f: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    f(out);
    let len = out.len() - start;
    // Two varints: at most 10 bytes each.
    let mut head = [0u8; 20];
    let mut n = 0;
    for mut v in [u64::from(field) << 3 | u64::from(LEN), len as u64] {
        while v >= 0x80 {
            head[n] = (v as u8) | 0x80;
            v >>= 7;
            n += 1;
        }
        head[n] = v as u8;
        n += 1;
    }
    out.splice(start..start, head[..n].iter().copied());
}

/// `KeyValue { key = 1; value = 2 }`, `AnyValue { string_value = 1;
/// bool_value = 2; int_value = 3 }`.
fn key_value(out: &mut Vec<u8>, field: u32, k: &str, v: &Value) {
    message(out, field, |kv| {
        bytes(kv, 1, k.as_bytes());
        message(kv, 2, |any| match v {
            Value::Str(s) => bytes(any, 1, s.as_bytes()),
            Value::Bool(b) => {
                key(any, 2, VARINT);
                varint(any, u64::from(*b));
            }
            Value::Int(i) => {
                key(any, 3, VARINT);
                varint(any, *i as u64);
            }
        });
    });
}

fn span(out: &mut Vec<u8>, s: &Span) {
    bytes(out, 1, &s.trace_id);
    bytes(out, 2, &s.span_id);
    if let Some(p) = &s.parent {
        bytes(out, 4, p);
    }
    bytes(out, 5, s.name.as_bytes());
    key(out, 6, VARINT);
    varint(out, s.kind as u64);
    fixed64(out, 7, s.start_ns);
    fixed64(out, 8, s.end_ns);
    for (k, v) in &s.attributes {
        key_value(out, 9, k, v);
    }
    for e in &s.events {
        message(out, 11, |ev| {
            fixed64(ev, 1, e.time_ns);
            bytes(ev, 2, e.name.as_bytes());
            for (k, v) in &e.attributes {
                key_value(ev, 3, k, v);
            }
        });
    }
    // Status { message = 2; code = 3 }: ERROR = 2, UNSET (absent) otherwise.
    if let Some(why) = &s.error {
        message(out, 15, |st| {
            bytes(st, 2, why.as_bytes());
            key(st, 3, VARINT);
            varint(st, 2);
        });
    }
}

/// An `ExportTraceServiceRequest` with one resource (`service.name` and
/// the proxy's attributes) and one instrumentation scope.
pub fn export_request(
    service: &str,
    resource: &[(&'static str, Value)],
    spans: &[Span],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 * spans.len() + 128);
    // ExportTraceServiceRequest { repeated ResourceSpans resource_spans = 1 }
    message(&mut out, 1, |rs| {
        // ResourceSpans { Resource resource = 1; repeated ScopeSpans scope_spans = 2 }
        message(rs, 1, |r| {
            // Resource { repeated KeyValue attributes = 1 }
            key_value(r, 1, "service.name", &Value::Str(service.to_string()));
            for (k, v) in resource {
                key_value(r, 1, k, v);
            }
        });
        message(rs, 2, |ss| {
            // ScopeSpans { InstrumentationScope scope = 1; repeated Span spans = 2 }
            message(ss, 1, |scope| {
                bytes(scope, 1, b"pilotfish");
                bytes(scope, 2, env!("CARGO_PKG_VERSION").as_bytes());
            });
            for s in spans {
                message(ss, 2, |out| span(out, s));
            }
        });
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_a_span_encode_to_the_proto_wire_format() {
        let mut v = Vec::new();
        varint(&mut v, 300);
        assert_eq!(v, [0xac, 0x02]);
        let s = Span {
            trace_id: [1; 16],
            span_id: [2; 8],
            parent: None,
            name: "n".into(),
            kind: Kind::Server,
            start_ns: 1,
            end_ns: 2,
            attributes: vec![("k", Value::Int(-1))],
            events: vec![],
            error: None,
        };
        let mut out = Vec::new();
        span(&mut out, &s);
        // trace_id: field 1, LEN 16.
        assert_eq!(&out[..2], [0x0a, 16]);
        // span_id: field 2, LEN 8, after the 16 bytes.
        assert_eq!(&out[18..20], [0x12, 8]);
        // name: field 5.
        assert_eq!(&out[28..31], [0x2a, 1, b'n']);
        // kind: field 6 varint 2; start: field 7 fixed64.
        assert_eq!(&out[31..34], [0x30, 2, 0x39]);
        // A negative int64 is a ten-byte varint.
        let tail = &out[out.len() - 10..];
        assert_eq!(tail[9], 0x01);
    }
}
