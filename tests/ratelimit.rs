//! Local rate limits through the real proxy: the burst then the rate,
//! answered with 429, `Retry-After` and `x-pilotfish-error: rate_limited`;
//! the counts over many requests match the configured rate (within a
//! tolerance for the test's own timing); the split across workers keeps
//! the whole process at the configured rate; routes and listeners limit
//! separately; HTTP/2 clients get the same answer. Both drivers.
#![allow(clippy::disallowed_methods)] // test threads may sleep

mod support;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use support::{http_client::Conn, http_upstream::HttpUpstream, *};

/// Sends GETs for `window` over `connections` keep-alive connections in
/// turn; (admitted, limited) and the time it took.
fn hammer(
    addr: std::net::SocketAddr,
    path: &str,
    connections: usize,
    window: Duration,
) -> (u64, u64, Duration) {
    let mut conns: Vec<Conn> = (0..connections).map(|_| Conn::open(addr)).collect();
    let started = Instant::now();
    let (mut ok, mut limited) = (0, 0);
    let mut i = 0;
    while started.elapsed() < window {
        let c = &mut conns[i % connections];
        i += 1;
        c.send(format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes());
        let r = c.read(false).expect("a response");
        match r.status {
            200 => ok += 1,
            429 => {
                assert_eq!(r.header("x-pilotfish-error"), Some("rate_limited"));
                let after: u64 = r.header("retry-after").unwrap().parse().unwrap();
                assert!((1..=2).contains(&after), "retry-after {after}");
                limited += 1;
            }
            s => panic!("unexpected status {s}: {}", r.text()),
        }
    }
    (ok, limited, started.elapsed())
}

/// Whether `got` is `want` within 2 requests and 15% (the test's clock
/// and the proxy's read time a little apart).
fn close_to(got: u64, want: f64) -> bool {
    (got as f64 - want).abs() <= 2.0 + 0.15 * want
}

#[test]
fn a_listener_limit_allows_its_burst_then_its_rate() {
    for driver in drivers() {
        let up = HttpUpstream::start();
        let toml = http_config(
            driver,
            "cluster = \"app\"\nrate_limit = { requests_per_second = 20, burst = 5 }",
            &cluster("app", &[up.addr], ""),
        );
        let (_proxy, addr) = start_toml(&toml, "web");
        let mut c = Conn::open(addr);
        for i in 0..5 {
            c.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n");
            assert_eq!(c.read(false).unwrap().status, 200, "{driver}: request {i}");
        }
        c.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n");
        let r = c.read(false).unwrap();
        assert_eq!(r.status, 429, "{driver}");
        assert_eq!(r.header("retry-after"), Some("1"), "{driver}");
        assert!(r.text().contains("listener's rate limit"), "{}", r.text());
        // The connection stays usable after a 429.
        std::thread::sleep(Duration::from_millis(1100));
        c.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(c.read(false).unwrap().status, 200, "{driver}");

        // Over a longer window: the burst (refilled by the wait) plus the
        // rate times the time.
        std::thread::sleep(Duration::from_millis(300));
        let (ok, limited, took) = hammer(addr, "/x", 4, Duration::from_millis(1500));
        let want = 5.0 + 20.0 * took.as_secs_f64();
        assert!(
            close_to(ok, want),
            "{driver}: {ok} admitted, want ~{want:.0}"
        );
        assert!(limited > ok, "{driver}: the rest were refused ({limited})");
    }
}

#[test]
fn two_workers_split_the_rate_so_the_process_allows_what_is_configured() {
    let up = HttpUpstream::start();
    let routes = r#"cluster = "app"
[[listeners.routes]]
name = "limited"
path_prefix = "/limited"
cluster = "app"
rate_limit = { requests_per_second = 40, burst = 4 }
"#;
    let toml = http_config("io_uring", routes, &cluster("app", &[up.addr], ""))
        .replace("workers = 1", "workers = 2");
    let (_proxy, addr) = start_toml(&toml, "web");
    // Many connections, so both workers get some (SO_REUSEPORT spreads them).
    let (ok, _, took) = hammer(addr, "/limited/x", 32, Duration::from_millis(2000));
    let want = 4.0 + 40.0 * took.as_secs_f64();
    assert!(close_to(ok, want), "{ok} admitted, want ~{want:.0}");
    // Another route on the same listener has no limit.
    let (ok, limited, _) = hammer(addr, "/free", 2, Duration::from_millis(300));
    assert!(ok > 0 && limited == 0, "{ok} {limited}");
}

#[test]
fn an_h2_client_gets_429_and_a_grpc_caller_resource_exhausted() {
    if !have("curl") {
        return;
    }
    let up = HttpUpstream::start();
    let toml = http_config(
        "io_uring",
        "cluster = \"app\"\nrate_limit = { requests_per_second = 1, burst = 1 }",
        &cluster("app", &[up.addr], ""),
    );
    let (_proxy, addr) = start_toml(&toml, "web");
    let url = format!("http://{addr}/x");
    // Two runs of curl, one connection each (curl 7.88 does not reuse a
    // prior-knowledge connection for a second URL).
    let text: String = (0..2)
        .map(|_| {
            let out = Command::new("curl")
                .args(["-s", "-i", "--http2-prior-knowledge", &url])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).to_ascii_lowercase()
        })
        .collect();
    assert!(text.contains("http/2 200"), "{text}");
    assert!(text.contains("http/2 429"), "{text}");
    assert!(text.contains("retry-after: 1"), "{text}");
    assert!(text.contains("x-pilotfish-error: rate_limited"), "{text}");
    // A gRPC caller (by content-type) gets a gRPC answer: HTTP 200 with
    // grpc-status 8, RESOURCE_EXHAUSTED (the bucket is empty by now).
    let out = Command::new("curl")
        .args([
            "-s",
            "-i",
            "--http2-prior-knowledge",
            "-X",
            "POST",
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "--data-binary",
            "",
            &format!("http://{addr}/pkg.Svc/Call"),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(text.contains("http/2 200"), "{text}");
    assert!(text.contains("grpc-status: 8"), "{text}");
    assert!(text.contains("retry-after: 1"), "{text}");
}
