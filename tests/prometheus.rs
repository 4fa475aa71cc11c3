//! A real Prometheus server (Debian's prometheus package) scrapes the
//! admin TCP listener while traffic flows, and its HTTP API answers
//! `rate()` over the golden request counter and `histogram_quantile()`
//! over the duration histogram: the exposition works with the tool
//! operators query it with, not just with a parser.
//!
//! Outside CI a machine without `prometheus` skips (and says so); under
//! CI=true that is a failure.
#![allow(clippy::disallowed_methods)] // test threads may sleep

mod support;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use support::{http_client::Conn, http_upstream::HttpUpstream, *};

/// How long Prometheus gets to start, scrape twice and answer.
const PROMETHEUS_DEADLINE: Duration = Duration::from_secs(90);

fn have_prometheus() -> bool {
    let found = Command::new("sh")
        .args(["-c", "command -v prometheus"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var("CI").is_err(),
            "prometheus (Debian package prometheus) is needed under CI"
        );
        eprintln!("skipped: no prometheus binary");
    }
    found
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `GET path` on Prometheus's HTTP API; the JSON body.
fn api(addr: SocketAddr, path: &str) -> Option<serde_json::Value> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: prometheus\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let body = text.split_once("\r\n\r\n")?.1;
    serde_json::from_str(body).ok()
}

/// Percent-encodes a PromQL expression for a query string.
fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The single value an instant query returns, once it returns one.
fn query(addr: SocketAddr, promql: &str) -> Option<f64> {
    let v = api(addr, &format!("/api/v1/query?query={}", encode(promql)))?;
    let result = v["data"]["result"].as_array()?;
    let value = result.first()?["value"][1].as_str()?;
    value.parse().ok()
}

#[test]
fn a_real_prometheus_scrapes_the_admin_listener_and_queries_rate_and_quantiles() {
    if !have_prometheus() {
        return;
    }
    let up = HttpUpstream::start();
    let toml = http_config(
        "auto",
        "cluster = \"app\"\n[[listeners.routes]]\nname = \"api\"\npath_prefix = \"/api\"\ncluster = \"app\"",
        &cluster("app", &[up.addr], ""),
    );
    let proxy =
        pilotfish::Proxy::start(pilotfish::Config::parse("p.toml", &toml).unwrap()).unwrap();
    let web = proxy.listener_addr("web").unwrap();
    let admin = admin_server(&proxy, None, Some("127.0.0.1:0".parse().unwrap()));
    let scrape_target = admin.tcp_addr().unwrap();

    // Traffic for the whole test: a request every 5 ms, bounded in time.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let mut c = Conn::open(web);
            let started = Instant::now();
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) && started.elapsed() < PROMETHEUS_DEADLINE {
                c.send(b"GET /api/x HTTP/1.1\r\nHost: app\r\n\r\n");
                assert_eq!(c.read(false).expect("response").status, 200);
                sent += 1;
                thread::sleep(Duration::from_millis(5));
            }
            sent
        })
    };

    let dir = temp_dir("prometheus");
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: pilotfish\n    static_configs:\n      - targets: [\"{scrape_target}\"]\n"
        ),
    )
    .unwrap();
    let web_listen = closed_port();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let _prometheus = Killed(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={web_listen}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start prometheus"),
    );

    let deadline = Instant::now() + PROMETHEUS_DEADLINE;
    let rate = "sum(rate(pilotfish_requests_total{listener=\"web\",route=\"api\"}[10s]))";
    let p99 = "histogram_quantile(0.99, sum by (le) (rate(pilotfish_request_duration_seconds_bucket{route=\"api\"}[10s])))";
    let (rate, p99) = loop {
        let up = query(web_listen, "up{job=\"pilotfish\"}");
        let r = query(web_listen, rate);
        let q = query(web_listen, p99);
        if let (Some(1.0), Some(r), Some(q)) = (up, r, q) {
            if r > 0.0 && q.is_finite() {
                break (r, q);
            }
        }
        assert!(
            Instant::now() < deadline,
            "no answer from Prometheus (up {up:?}, rate {r:?}, p99 {q:?}): {}",
            std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(500));
    };
    stop.store(true, Ordering::Relaxed);
    let sent = load.join().unwrap();
    assert!(sent > 0);
    // One request per ~5 ms plus the round trip: well under 1000/s, well
    // over nothing.
    assert!(rate > 1.0 && rate < 1000.0, "rate {rate}");
    // Loopback requests: the 99th percentile is inside the bucket range
    // (100 µs … 30 s), in seconds.
    assert!(p99 > 0.0 && p99 <= 30.0, "p99 {p99}");
    // The exact histograms' families are queryable too.
    let count = query(
        web_listen,
        "sum(pilotfish_listener_request_duration_seconds_count{listener=\"web\"})",
    )
    .unwrap_or(0.0);
    assert!(count > 0.0, "listener histogram count {count}");
    drop(admin);
    proxy.shutdown();
}
