//! A minimal OTLP/HTTP trace receiver for the demos: accepts
//! `POST /v1/traces` (protobuf `ExportTraceServiceRequest`), keeps the
//! spans, answers 200. It decodes only what the reports use (ids, times,
//! status, string attributes, the resource's `service.name`) with a small
//! protobuf wire-format reader, so the demo runs without a collector
//! installed. The test suite checks the proxy's encoding against the
//! official definitions instead (tests/tracing.rs).
//!
//! Bounded: request bodies up to [`BODY_BYTES_MAX`], at most
//! [`SPANS_MAX`] spans kept (more are counted and dropped).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use crossbeam_channel::{Receiver, Sender};

/// One export request's body at most.
const BODY_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Spans kept for the report.
const SPANS_MAX: usize = 2_000_000;

#[derive(Debug, Clone, Default)]
pub struct Span {
    pub service: String,
    pub trace_id: Vec<u8>,
    pub span_id: Vec<u8>,
    pub parent: Vec<u8>,
    pub name: String,
    pub start_ns: u64,
    pub end_ns: u64,
    pub attributes: Vec<(String, String)>,
    /// Status code ERROR.
    pub error: bool,
}

impl Span {
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

pub struct Sink {
    pub addr: SocketAddr,
    spans: Receiver<Span>,
    pub dropped: Arc<AtomicU64>,
}

impl Sink {
    /// The spans received so far.
    pub fn spans(&self) -> Vec<Span> {
        self.spans.try_iter().collect()
    }
}

pub fn start() -> std::io::Result<Sink> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let (tx, rx) = crossbeam_channel::bounded(SPANS_MAX);
    let dropped = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&dropped);
    thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let (tx, counted) = (tx.clone(), Arc::clone(&counted));
            thread::spawn(move || serve(conn, &tx, &counted));
        }
    });
    Ok(Sink {
        addr,
        spans: rx,
        dropped,
    })
}

fn serve(conn: TcpStream, tx: &Sender<Span>, dropped: &AtomicU64) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(mut w) = conn.try_clone() else { return };
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut length = 0usize;
        loop {
            line.clear();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            if let Some((n, v)) = line.split_once(':') {
                if n.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
        }
        if length > BODY_BYTES_MAX {
            return;
        }
        let mut body = vec![0u8; length];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        for span in decode(&body) {
            if tx.try_send(span).is_err() {
                dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        if w.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n",
        )
        .is_err()
        {
            return;
        }
    }
}

/// The fields of one message: (field number, value), where a value is a
/// varint, a fixed64 or a length-delimited slice.
enum Field<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
}

fn fields(mut b: &[u8]) -> impl Iterator<Item = (u64, Field<'_>)> {
    fn varint(b: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first()?;
            *b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Some(v);
            }
        }
        None
    }
    std::iter::from_fn(move || {
        let key = varint(&mut b)?;
        let field = match key & 7 {
            0 => Field::Varint(varint(&mut b)?),
            1 => {
                let (v, rest) = b.split_first_chunk::<8>()?;
                b = rest;
                Field::Fixed64(u64::from_le_bytes(*v))
            }
            2 => {
                let n = usize::try_from(varint(&mut b)?).ok()?;
                if n > b.len() {
                    return None;
                }
                let (v, rest) = b.split_at(n);
                b = rest;
                Field::Bytes(v)
            }
            5 => {
                b = b.get(4..)?;
                Field::Varint(0)
            }
            _ => return None,
        };
        Some((key >> 3, field))
    })
}

fn bytes_of(msg: &[u8], number: u64) -> impl Iterator<Item = &[u8]> {
    fields(msg).filter_map(move |(n, f)| match f {
        Field::Bytes(b) if n == number => Some(b),
        _ => None,
    })
}

/// `KeyValue` → (key, value as text).
fn key_value(kv: &[u8]) -> (String, String) {
    let key = bytes_of(kv, 1)
        .next()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .unwrap_or_default();
    let value = bytes_of(kv, 2)
        .next()
        .and_then(|any| {
            fields(any).next().map(|(n, f)| match (n, f) {
                (1, Field::Bytes(s)) => String::from_utf8_lossy(s).into_owned(),
                (2, Field::Varint(v)) => (v != 0).to_string(),
                (3, Field::Varint(v)) => (v as i64).to_string(),
                _ => String::new(),
            })
        })
        .unwrap_or_default();
    (key, value)
}

/// ExportTraceServiceRequest → spans (field numbers from
/// opentelemetry-proto v1, as in the proxy's encoder).
pub fn decode(body: &[u8]) -> Vec<Span> {
    let mut out = Vec::new();
    for rs in bytes_of(body, 1) {
        let service = bytes_of(rs, 1)
            .flat_map(|resource| bytes_of(resource, 1).map(key_value))
            .find(|(k, _)| k == "service.name")
            .map(|(_, v)| v)
            .unwrap_or_default();
        for ss in bytes_of(rs, 2) {
            for s in bytes_of(ss, 2) {
                let mut span = Span {
                    service: service.clone(),
                    ..Span::default()
                };
                for (n, f) in fields(s) {
                    match (n, f) {
                        (1, Field::Bytes(b)) => span.trace_id = b.to_vec(),
                        (2, Field::Bytes(b)) => span.span_id = b.to_vec(),
                        (4, Field::Bytes(b)) => span.parent = b.to_vec(),
                        (5, Field::Bytes(b)) => span.name = String::from_utf8_lossy(b).into_owned(),
                        (7, Field::Fixed64(t)) => span.start_ns = t,
                        (8, Field::Fixed64(t)) => span.end_ns = t,
                        (9, Field::Bytes(kv)) => span.attributes.push(key_value(kv)),
                        (15, Field::Bytes(st)) => {
                            span.error =
                                fields(st).any(|(n, f)| matches!((n, f), (3, Field::Varint(2))));
                        }
                        _ => {}
                    }
                }
                out.push(span);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use pilotfish::trace::otlp::{export_request, Event, Kind, Span, Value};

    #[test]
    fn decodes_what_the_proxy_encodes() {
        let span = Span {
            trace_id: [7; 16],
            span_id: [8; 8],
            parent: Some([9; 8]),
            name: "GET api".into(),
            kind: Kind::Server,
            start_ns: 1_000,
            end_ns: 5_000,
            attributes: vec![
                ("pilotfish.upstream", Value::Str("127.0.0.1:9".into())),
                ("http.response.status_code", Value::Int(503)),
            ],
            events: vec![Event {
                time_ns: 2_000,
                name: "retry",
                attributes: vec![],
            }],
            error: Some("status 503".into()),
        };
        let body = export_request("svc", &[], &[span]);
        let got = super::decode(&body);
        assert_eq!(got.len(), 1);
        let s = &got[0];
        assert_eq!(s.service, "svc");
        assert_eq!(
            (
                s.trace_id.as_slice(),
                s.span_id.as_slice(),
                s.parent.as_slice()
            ),
            (&[7u8; 16][..], &[8u8; 8][..], &[9u8; 8][..])
        );
        assert_eq!((s.start_ns, s.end_ns, s.error), (1_000, 5_000, true));
        assert_eq!(s.attr("pilotfish.upstream"), Some("127.0.0.1:9"));
        assert_eq!(s.attr("http.response.status_code"), Some("503"));
        assert_eq!(s.name, "GET api");
    }
}
