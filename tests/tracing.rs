//! Distributed tracing through a real sidecar pair (app → sidecar A →
//! sidecar B → upstream), with spans received by an OTLP/HTTP receiver
//! that decodes them with the official OpenTelemetry protobuf definitions
//! (tests/peers/otlp_receiver.py, PyPI `opentelemetry-proto`).
//!
//! Checked: each header format (W3C, B3 single, B3 multi) keeps its trace
//! id across both hops while each hop gets a span of its own that is the
//! next hop's parent, over HTTP/1.1 and over h2 between the sidecars; the
//! caller's sampling decision wins over the rate; a request without
//! context starts a trace at the configured rate; the access log carries
//! the ids; and a collector that is down or stuck fails no request.
#![allow(clippy::disallowed_methods)] // test threads may sleep
#![allow(clippy::disallowed_types)] // the receiver's reader thread shares what it read

mod support;

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use pilotfish::Proxy;
use serde_json::Value;
use support::{http_client::one, http_upstream::HttpUpstream, *};

const RECEIVER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/otlp_receiver.py");

/// The OTLP receiver, killed on drop; spans as it decoded them.
struct Receiver {
    child: Child,
    port: u16,
    spans: Arc<Mutex<Vec<Value>>>,
}

impl Receiver {
    fn start(args: &[&str]) -> Option<Self> {
        if !have_py("opentelemetry.proto.collector.trace.v1.trace_service_pb2") {
            return None;
        }
        let mut child = Command::new("python3")
            .arg(RECEIVER)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the OTLP receiver");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let port = line
            .trim()
            .strip_prefix("port ")
            .and_then(|p| p.parse().ok())
            .expect("the receiver prints its port");
        let spans = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&spans);
        thread::spawn(move || {
            for line in out.lines() {
                let Ok(line) = line else { return };
                sink.lock()
                    .unwrap()
                    .push(serde_json::from_str(&line).unwrap());
            }
        });
        Some(Receiver { child, port, spans })
    }

    /// Waits for the spans of `trace_id` until there are `n`.
    fn trace(&self, trace_id: &str, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + IO_DEADLINE;
        loop {
            let found: Vec<Value> = self
                .spans
                .lock()
                .unwrap()
                .iter()
                .filter(|s| s["trace_id"] == trace_id)
                .cloned()
                .collect();
            if found.len() >= n {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "trace {trace_id}: {} of {n} spans came",
                found.len()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn count(&self) -> usize {
        self.spans.lock().unwrap().len()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sidecar B (inbound, in front of the upstream) and sidecar A
/// (outbound, to B over `between`: "http1" or "h2"), both tracing to
/// `collector` at `rate`.
struct Pair {
    a: Proxy,
    _b: Proxy,
    b_log: std::path::PathBuf,
}

fn pair(upstream: SocketAddr, collector: &str, rate: f64, between: &str, dir: &Path) -> Pair {
    let tracing = |service: &str| {
        format!(
            "[tracing]\ncollector = \"{collector}\"\nsample_rate = {rate}\nservice_name = \"{service}\"\n"
        )
    };
    let b_log = dir.join(format!("b-{between}.log"));
    let b = Proxy::start(
        pilotfish::Config::parse(
            "b.toml",
            &format!(
                r#"workers = 1
{}
[[listeners]]
name = "inbound"
bind = "127.0.0.1:0"
protocol = "http"
direction = "inbound"
cluster = "app"
access_log = {{ path = "{}", format = "json" }}
[[clusters]]
name = "app"
endpoints = ["{upstream}"]
"#,
                tracing("orders"),
                b_log.display()
            ),
        )
        .unwrap(),
    )
    .unwrap();
    let b_addr = b.listener_addr("inbound").unwrap();
    let a = Proxy::start(
        pilotfish::Config::parse(
            "a.toml",
            &format!(
                r#"workers = 1
{}
[[listeners]]
name = "out"
bind = "127.0.0.1:0"
protocol = "http"
cluster = "orders"
[[listeners.routes]]
name = "orders-api"
path_prefix = "/"
cluster = "orders"
[[clusters]]
name = "orders"
protocol = "{between}"
endpoints = ["{b_addr}"]
"#,
                tracing("frontend"),
            ),
        )
        .unwrap(),
    )
    .unwrap();
    Pair { a, _b: b, b_log }
}

/// `GET /echo` through A with `headers`; the head the upstream received.
fn through(a: &Proxy, headers: &[(&str, &str)]) -> HashMap<String, String> {
    let extra: String = headers
        .iter()
        .map(|(n, v)| format!("{n}: {v}\r\n"))
        .collect();
    let raw = format!("GET /echo HTTP/1.1\r\nHost: orders\r\n{extra}\r\n");
    let r = one(a.listener_addr("out").unwrap(), raw.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    r.text()
        .lines()
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect()
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

#[test]
fn each_format_keeps_its_trace_and_each_hop_is_the_next_ones_parent() {
    let Some(rx) = Receiver::start(&[]) else {
        return;
    };
    let up = HttpUpstream::start();
    let dir = temp_dir("tracing-formats");
    let collector = format!("127.0.0.1:{}", rx.port);
    for between in ["http1", "h2"] {
        // Rate 0: only the callers' flags sample.
        let p = pair(up.addr, &collector, 0.0, between, &dir);
        let cases: [(&str, Vec<(&str, String)>); 3] = [
            (
                "w3c",
                vec![
                    ("traceparent", format!("00-{TRACE}-{PARENT}-01")),
                    ("tracestate", "vendor=opaque".to_string()),
                ],
            ),
            ("b3", vec![("b3", format!("{TRACE}-{PARENT}-1"))]),
            (
                "b3multi",
                vec![
                    ("X-B3-TraceId", TRACE.to_string()),
                    ("X-B3-SpanId", PARENT.to_string()),
                    ("X-B3-Sampled", "1".to_string()),
                ],
            ),
        ];
        for (i, (format, headers)) in cases.iter().enumerate() {
            // A trace id of its own per case, so the spans can be told apart.
            let case = i + if between == "h2" { 8 } else { 0 };
            let trace = format!("{}{case:x}", &TRACE[..31]);
            let headers: Vec<(&str, String)> = headers
                .iter()
                .map(|(n, v)| (*n, v.replace(TRACE, &trace)))
                .collect();
            let borrowed: Vec<(&str, &str)> =
                headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            let seen = through(&p.a, &borrowed);
            let what = format!("{between} {format}");
            // What the upstream got: the same trace, B's span as parent.
            let (got_trace, got_parent) = match *format {
                "w3c" => {
                    let tp = &seen["traceparent"];
                    let parts: Vec<&str> = tp.split('-').collect();
                    assert_eq!((parts[0], parts[3]), ("00", "01"), "{what}: {tp}");
                    assert_eq!(seen["tracestate"], "vendor=opaque", "{what}");
                    (parts[1].to_string(), parts[2].to_string())
                }
                "b3" => {
                    let parts: Vec<&str> = seen["b3"].split('-').collect();
                    assert_eq!(parts[2], "1", "{what}");
                    (parts[0].to_string(), parts[1].to_string())
                }
                _ => {
                    assert_eq!(seen["x-b3-sampled"], "1", "{what}");
                    (seen["x-b3-traceid"].clone(), seen["x-b3-spanid"].clone())
                }
            };
            assert_eq!(got_trace, trace, "{what}: the trace id is kept");
            assert!(
                !seen.contains_key("traceparent") || *format == "w3c",
                "{what}: one format"
            );
            let spans = rx.trace(&trace, 2);
            assert_eq!(spans.len(), 2, "{what}: {spans:?}");
            let client = spans
                .iter()
                .find(|s| s["kind"] == 3)
                .expect("A's client span");
            let server = spans
                .iter()
                .find(|s| s["kind"] == 2)
                .expect("B's server span");
            assert_eq!(client["service"], "frontend", "{what}");
            assert_eq!(server["service"], "orders", "{what}");
            assert_eq!(client["parent_span_id"], PARENT, "{what}");
            assert_eq!(server["parent_span_id"], client["span_id"], "{what}");
            assert_eq!(got_parent, server["span_id"].as_str().unwrap(), "{what}");
            assert_ne!(client["span_id"], server["span_id"]);
            assert_eq!(client["name"], "GET orders-api", "{what}");
            let attrs = &client["attributes"];
            assert_eq!(attrs["http.request.method"], "GET");
            assert_eq!(attrs["url.path"], "/echo");
            assert_eq!(attrs["http.response.status_code"], 200);
            assert_eq!(attrs["pilotfish.cluster"], "orders");
            assert_eq!(
                attrs["pilotfish.upstream"],
                p._b.listener_addr("inbound").unwrap().to_string()
            );
            assert_eq!(server["attributes"]["pilotfish.direction"], "inbound");
            assert_eq!(
                server["attributes"]["pilotfish.upstream"],
                up.addr.to_string()
            );
            assert_eq!(server["status"]["code"], 0, "{what}: unset");
            assert!(
                client["start"].as_u64() <= server["start"].as_u64(),
                "{what}"
            );
            // (Not so for the ends: B notes its end after its last write
            // completes, which may be after A relayed that byte.)
            // B's access log line has the ids of its span.
            let log = std::fs::read_to_string(&p.b_log).unwrap_or_default();
            let logged = log.lines().any(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                v["trace_id"] == trace && v["span_id"] == server["span_id"]
            });
            let deadline = Instant::now() + IO_DEADLINE;
            let mut logged = logged;
            while !logged && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(50));
                logged = std::fs::read_to_string(&p.b_log)
                    .unwrap()
                    .lines()
                    .any(|l| l.contains(&trace) && l.contains(server["span_id"].as_str().unwrap()));
            }
            assert!(logged, "{what}: the access log has the trace and span ids");
        }
    }
}

#[test]
fn the_callers_decision_wins_and_new_traces_follow_the_rate() {
    let Some(rx) = Receiver::start(&[]) else {
        return;
    };
    let up = HttpUpstream::start();
    let dir = temp_dir("tracing-sampling");
    let collector = format!("127.0.0.1:{}", rx.port);
    // Rate 1: every new trace is sampled, but a caller's "no" is kept.
    let always = pair(up.addr, &collector, 1.0, "http1", &dir);
    let declined = "4bf92f3577b34da6a3ce929d0e0e4700";
    let seen = through(
        &always.a,
        &[("traceparent", &format!("00-{declined}-{PARENT}-00"))],
    );
    assert!(seen["traceparent"].ends_with("-00"), "{seen:?}");
    let seen = through(&always.a, &[("b3", "0")]);
    assert!(
        seen["traceparent"].ends_with("-00"),
        "a b3 decision alone: {seen:?}"
    );
    // No context: a new trace, sampled, started at A (no parent).
    let seen = through(&always.a, &[]);
    let tp: Vec<&str> = seen["traceparent"].split('-').collect();
    assert_eq!(tp[3], "01");
    let spans = rx.trace(tp[1], 2);
    let client = spans.iter().find(|s| s["kind"] == 3).unwrap();
    assert_eq!(client["parent_span_id"], "", "A started the trace");
    thread::sleep(Duration::from_millis(600));
    assert!(
        rx.spans
            .lock()
            .unwrap()
            .iter()
            .all(|s| s["trace_id"] != declined),
        "a declined trace records no span"
    );
    // Rate 0: context is still propagated (new trace, not sampled), and
    // nothing is recorded.
    let before = rx.count();
    let never = pair(up.addr, &collector, 0.0, "http1", &dir);
    for _ in 0..20 {
        let seen = through(&never.a, &[]);
        assert!(seen["traceparent"].ends_with("-00"), "{seen:?}");
    }
    thread::sleep(Duration::from_millis(600));
    assert_eq!(rx.count(), before);
}

/// `pilotfish_<name>` summed over its samples with `core=...`, from /metrics.
fn metric(proxy: &Proxy, dir: &Path, name: &str, core: &str) -> f64 {
    let socket = dir.join(format!("admin-{}.sock", rand_suffix()));
    let _server = admin_server(proxy, Some(socket.clone()), None);
    let (_, text) = pilotfish::admin::client::request(&socket, "GET", "/metrics").unwrap();
    let prefix = format!("pilotfish_{name}{{core=\"{core}\"}} ");
    text.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.parse::<f64>().unwrap())
        .sum()
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[test]
fn a_collector_that_is_down_or_stuck_fails_no_request() {
    let up = HttpUpstream::start();
    let dir = temp_dir("tracing-down");
    // Down: nothing listens there.
    let down = closed_port().to_string();
    let p = pair(up.addr, &down, 1.0, "http1", &dir);
    for _ in 0..200 {
        through(&p.a, &[]);
    }
    eventually("the exporter counts the spans it could not deliver", || {
        metric(&p.a, &dir, "trace_spans_dropped_total", "exporter") > 0.0
    });
    assert_eq!(metric(&p.a, &dir, "trace_spans_total", "0"), 200.0);

    // Stuck: the receiver takes every batch and answers only after a
    // minute; the exporter gives up on each after its timeout, and the
    // requests go on meanwhile.
    let Some(rx) = Receiver::start(&["--delay", "60"]) else {
        return;
    };
    let stuck = format!("127.0.0.1:{}", rx.port);
    let p = pair(up.addr, &stuck, 1.0, "http1", &dir);
    for _ in 0..300 {
        through(&p.a, &[]);
    }
    assert_eq!(metric(&p.a, &dir, "trace_spans_total", "0"), 300.0);
    eventually("a stuck collector's batches fail", || {
        metric(&p.a, &dir, "trace_spans_dropped_total", "exporter") > 0.0
    });
    assert_eq!(rx.count(), 0);
}
