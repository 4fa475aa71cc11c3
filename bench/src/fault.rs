//! The "find the fault" demo: service B runs as two instances, one of
//! them faulty (it fails some requests with 503 and is slow on others);
//! service A calls B through the mTLS mesh. The report walks what an
//! operator would: the golden metrics say *that* B is failing and slow,
//! a tap on sidecar B and the traces both sidecars exported say *where*:
//! one endpoint. The verdict is computed from the data, not assumed.
//!
//! Everything runs on loopback: two upstream instances, two real
//! `pilotfish` sidecars with tracing on (sampled at 100%), an in-process
//! OTLP/HTTP receiver ([`crate::otlp_sink`]) and a closed-loop load that
//! keeps going through errors.

// The demo's own threads (load, tap reader, waiting for spans) may sleep:
// none of them is a proxy worker.
#![allow(clippy::disallowed_methods)]

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::net::UnixStream,
    path::Path,
    sync::{atomic::Ordering, Arc},
    thread,
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;

use crate::{
    demo::{self, SERVICE_A, SERVICE_B},
    otlp_sink,
    sidecar::Sidecar,
    upstream::{self, HttpOptions},
};

/// What the faulty instance does: 503 for this percentage of requests ...
const FAIL_PERCENT: u8 = 8;
/// ... and waits [`SLOW`] before answering this percentage.
const SLOW_PERCENT: u8 = 10;
const SLOW: Duration = Duration::from_millis(40);

pub fn run(quick: bool, out: &Path, binary: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let (connections, measure) = if quick {
        (4, Duration::from_secs(2))
    } else {
        (8, Duration::from_secs(10))
    };
    let stop = crate::pingpong::stop_on_ctrl_c()?;
    let binary = crate::sidecar::locate_binary(binary)?;
    std::fs::create_dir_all(out)?;
    demo::issue_identities(&binary, out)?;
    let sink = otlp_sink::start()?;
    let healthy = upstream::http("127.0.0.1:0".parse()?)?;
    let faulty = upstream::http_with(
        "127.0.0.1:0".parse()?,
        HttpOptions {
            fail_percent: FAIL_PERCENT,
            slow_percent: SLOW_PERCENT,
            slow: SLOW,
            ..HttpOptions::default()
        },
    )?;
    println!("service B instance 1          {healthy}");
    println!(
        "service B instance 2          {faulty}  (the fault: {FAIL_PERCENT}% answered 503, {SLOW_PERCENT}% held {SLOW:?}; the report must find it)"
    );
    println!("OTLP/HTTP receiver            {}", sink.addr);
    let tracing = |service: &str| {
        format!(
            "[tracing]\ncollector = \"{}\"\nsample_rate = 1.0\nservice_name = \"{service}\"\n",
            sink.addr
        )
    };
    let b = Sidecar::start(
        &binary,
        "fault-sidecar-b",
        out,
        &(demo::header(out, "fault-sidecar-b", "service-b")
            + &tracing("service-b")
            + &format!(
                r#"[[listeners]]
name = "inbound"
bind = "127.0.0.1:0"
protocol = "http"
cluster = "service-b"
tls = {{ require_client_cert = true }}
authorize = ["{SERVICE_A}"]
[[clusters]]
name = "service-b"
endpoints = ["{healthy}", "{faulty}"]
lb = "round_robin"
"#
            )),
    )?;
    let b_addr = b.listener("inbound")?;
    let a = Sidecar::start(
        &binary,
        "fault-sidecar-a",
        out,
        &(demo::header(out, "fault-sidecar-a", "service-a")
            + &tracing("service-a")
            + &format!(
                r#"[[listeners]]
name = "outbound"
bind = "127.0.0.1:0"
protocol = "http"
cluster = "service-b"
[[clusters]]
name = "service-b"
endpoints = ["{b_addr}"]
tls = {{ server_identity = "{SERVICE_B}" }}
"#
            )),
    )?;
    let a_addr = a.listener("outbound")?;
    println!("sidecar B (inbound, mTLS)     {b_addr}  pid {}", b.pid());
    println!("sidecar A (outbound)          {a_addr}  pid {}", a.pid());
    println!(
        "\nload: {connections} connections, HTTP/1.1 GET keep-alive, closed loop, {measure:?}; a tap on sidecar B and tracing on both sidecars meanwhile\n"
    );

    let b_socket = out.join("fault-sidecar-b.sock");
    let tap = Tap::attach(&b_socket)?;
    let load = load(a_addr, connections, measure, &stop);
    let events = tap.finish();
    // The sidecars hand spans over every 200 ms: give them time to arrive.
    thread::sleep(Duration::from_millis(800));
    let spans = sink.spans();
    if stop.load(Ordering::Relaxed) {
        anyhow::bail!("interrupted; sidecars stopped");
    }
    anyhow::ensure!(load.requests > 0, "no request completed");

    let mut report = String::from("Find the fault: service B answers badly. Where?\n\n");
    report += &format!(
        "1. What service A sees: {} requests, {} failed ({:.1}%), p50 {} µs, p99 {} µs, max {} µs\n",
        load.requests,
        load.failed,
        100.0 * load.failed as f64 / load.requests as f64,
        load.histogram.value_at_quantile(0.5),
        load.histogram.value_at_quantile(0.99),
        load.histogram.max(),
    );
    report += "\n2. Golden metrics (GET /golden on each sidecar): calls to service-b fail and are slow\n   at the tail, by caller and callee, but not which instance of service-b:\n";
    let sockets = [
        ("sidecar-a", out.join("fault-sidecar-a.sock")),
        ("sidecar-b", b_socket.clone()),
    ];
    let named: Vec<(&str, std::path::PathBuf)> =
        sockets.iter().map(|(n, p)| (*n, p.clone())).collect();
    report += &demo::golden_table(&named)?;

    report += "\n3. Tap on sidecar B (GET /tap), grouped by the endpoint that answered:\n";
    let by_endpoint = group(events.iter().map(|e| {
        (
            e["endpoint"].as_str().unwrap_or("-").to_string(),
            e["status"].as_u64().unwrap_or(0) >= 500,
            e["total_us"].as_u64().unwrap_or(0),
        )
    }));
    report += &table(&by_endpoint);
    let dropped: u64 = events.iter().filter_map(|e| e["dropped"].as_u64()).sum();
    if dropped > 0 {
        report +=
            &format!("   (the tap's rate bound dropped {dropped} events; the proportions stand)\n");
    }

    report +=
        "\n4. Traces (OTLP spans from both sidecars), sidecar B's server spans by upstream:\n";
    let server_spans: Vec<&otlp_sink::Span> =
        spans.iter().filter(|s| s.service == "service-b").collect();
    let by_upstream = group(server_spans.iter().map(|s| {
        (
            s.attr("pilotfish.upstream").unwrap_or("-").to_string(),
            s.error,
            (s.end_ns.saturating_sub(s.start_ns)) / 1000,
        )
    }));
    report += &table(&by_upstream);
    let lost = sink.dropped.load(Ordering::Relaxed);
    if lost > 0 {
        report += &format!("   (the receiver kept its first spans and dropped {lost})\n");
    }
    report +=
        "   The five slowest traces, hop by hop (A's client span → B's server span → upstream):\n";
    let mut slowest: Vec<&&otlp_sink::Span> = server_spans.iter().collect();
    slowest.sort_by_key(|s| std::cmp::Reverse(s.end_ns.saturating_sub(s.start_ns)));
    for s in slowest.iter().take(5) {
        let client = spans
            .iter()
            .find(|c| c.service == "service-a" && c.span_id == s.parent);
        report += &format!(
            "     trace {}: A {} µs → B {} µs → {}{}\n",
            hex(&s.trace_id),
            client.map_or("?".to_string(), |c| {
                ((c.end_ns.saturating_sub(c.start_ns)) / 1000).to_string()
            }),
            (s.end_ns.saturating_sub(s.start_ns)) / 1000,
            s.attr("pilotfish.upstream").unwrap_or("-"),
            if s.error { " (error)" } else { "" },
        );
    }

    // The verdict: the endpoint each source blames, by error rate and by
    // p99, must be the same one.
    let blame = |rows: &BTreeMap<String, Row>, by_errors: bool| -> Option<String> {
        rows.iter()
            .filter(|(k, r)| *k != "-" && r.count > 0)
            .max_by(|(_, x), (_, y)| {
                if by_errors {
                    x.error_rate().total_cmp(&y.error_rate())
                } else {
                    x.p99().cmp(&y.p99())
                }
            })
            .map(|(k, _)| k.clone())
    };
    let verdicts = [
        ("tap, errors", blame(&by_endpoint, true)),
        ("tap, p99", blame(&by_endpoint, false)),
        ("traces, errors", blame(&by_upstream, true)),
        ("traces, p99", blame(&by_upstream, false)),
    ];
    report += "\n5. Verdict: the endpoint each view blames\n";
    for (what, who) in &verdicts {
        report += &format!("   {what:<16} {}\n", who.as_deref().unwrap_or("(no data)"));
    }
    let agreed = verdicts
        .iter()
        .all(|(_, who)| who.as_deref() == Some(faulty.to_string().as_str()));
    report += &if agreed {
        format!("   All four point at {faulty}: the faulty instance.\n")
    } else {
        format!("   The views disagree (the faulty instance is {faulty}); a longer run gives each more data.\n")
    };
    std::fs::write(out.join("fault-report.txt"), &report)?;
    print!("{report}");
    println!(
        "\nreport: {}\nsidecar logs: {}/fault-sidecar-*.log",
        out.join("fault-report.txt").display(),
        out.display()
    );
    drop((a, b));
    anyhow::ensure!(agreed, "the views did not agree on the faulty endpoint");
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Requests, failures and latency of one endpoint.
struct Row {
    count: u64,
    errors: u64,
    histogram: Histogram<u64>,
}

impl Row {
    fn error_rate(&self) -> f64 {
        self.errors as f64 / self.count.max(1) as f64
    }

    fn p99(&self) -> u64 {
        self.histogram.value_at_quantile(0.99)
    }
}

fn group(items: impl Iterator<Item = (String, bool, u64)>) -> BTreeMap<String, Row> {
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    for (key, error, us) in items {
        let row = rows.entry(key).or_insert_with(|| Row {
            count: 0,
            errors: 0,
            histogram: Histogram::new(3).expect("3 significant digits is valid"),
        });
        row.count += 1;
        row.errors += u64::from(error);
        let _ = row.histogram.record(us.max(1));
    }
    rows
}

fn table(rows: &BTreeMap<String, Row>) -> String {
    let mut out = format!(
        "   {:<24}{:>10}{:>10}{:>10}{:>10}\n",
        "endpoint", "requests", "errors", "p50 µs", "p99 µs"
    );
    for (k, r) in rows {
        out += &format!(
            "   {:<24}{:>10}{:>9.1}%{:>10}{:>10}\n",
            k,
            r.count,
            100.0 * r.error_rate(),
            r.histogram.value_at_quantile(0.5),
            r.p99()
        );
    }
    out
}

/// A tap on the admin socket, read on a thread of its own.
struct Tap {
    reader: thread::JoinHandle<Vec<serde_json::Value>>,
    conn: UnixStream,
}

impl Tap {
    fn attach(socket: &Path) -> anyhow::Result<Tap> {
        let mut s = UnixStream::connect(socket)?;
        s.write_all(b"GET /tap?rate=10000 HTTP/1.1\r\nHost: admin\r\n\r\n")?;
        let conn = s.try_clone()?;
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line)?;
        anyhow::ensure!(line.contains(" 200 "), "tap refused: {line}");
        // The head ends once the workers attached the tap.
        while line != "\r\n" {
            line.clear();
            anyhow::ensure!(r.read_line(&mut line)? > 0, "tap closed early");
        }
        let reader = thread::spawn(move || {
            let mut events = Vec::new();
            let mut line = String::new();
            while r.read_line(&mut line).is_ok_and(|n| n > 0) {
                if let Ok(v) = serde_json::from_str(&line) {
                    events.push(v);
                }
                line.clear();
            }
            events
        });
        Ok(Tap { reader, conn })
    }

    /// Detaches (closes the connection) and returns what came.
    fn finish(self) -> Vec<serde_json::Value> {
        // Events already written are still read before the end of stream.
        thread::sleep(Duration::from_millis(300));
        let _ = self.conn.shutdown(std::net::Shutdown::Both);
        self.reader.join().unwrap_or_default()
    }
}

/// The closed-loop load: keep-alive connections that go on through error
/// statuses (the scenario has them by design).
struct Load {
    requests: u64,
    failed: u64,
    histogram: Histogram<u64>,
}

fn load(
    target: SocketAddr,
    connections: usize,
    duration: Duration,
    stop: &Arc<std::sync::atomic::AtomicBool>,
) -> Load {
    let deadline = Instant::now() + duration;
    let threads: Vec<_> = (0..connections)
        .map(|_| {
            let stop = Arc::clone(stop);
            thread::spawn(move || {
                let mut out = Load {
                    requests: 0,
                    failed: 0,
                    histogram: Histogram::new(3).expect("valid"),
                };
                let Ok(s) = TcpStream::connect_timeout(&target, Duration::from_secs(5)) else {
                    return out;
                };
                let _ = s.set_nodelay(true);
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                let Ok(mut w) = s.try_clone() else {
                    return out;
                };
                let mut r = BufReader::new(s);
                while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    if w.write_all(b"GET /orders HTTP/1.1\r\nHost: service-b\r\n\r\n")
                        .is_err()
                    {
                        break;
                    }
                    let Some(status) = read_response(&mut r) else {
                        break;
                    };
                    out.requests += 1;
                    out.failed += u64::from(status >= 500);
                    let _ = out
                        .histogram
                        .record(sent.elapsed().as_micros().max(1) as u64);
                }
                out
            })
        })
        .collect();
    let mut total = Load {
        requests: 0,
        failed: 0,
        histogram: Histogram::new(3).expect("valid"),
    };
    for t in threads {
        if let Ok(o) = t.join() {
            total.requests += o.requests;
            total.failed += o.failed;
            let _ = total.histogram.add(&o.histogram);
        }
    }
    total
}

/// One response's status; its Content-Length body is read and dropped.
fn read_response(r: &mut BufReader<TcpStream>) -> Option<u16> {
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let status = line.split_whitespace().nth(1)?.parse().ok()?;
    let mut length = 0usize;
    loop {
        line.clear();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().ok()?;
            }
        }
    }
    let mut body = vec![0u8; length];
    r.read_exact(&mut body).ok()?;
    Some(status)
}
