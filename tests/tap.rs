//! `GET /tap` on the admin socket and `pilotfish admin tap`: filters,
//! several taps at once, the rate bound with its drops reported in the
//! stream, the cap on taps, and a tap whose client goes away mid-stream.
#![allow(clippy::disallowed_methods)] // test threads may sleep

mod support;

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use support::{http_client::one, http_upstream::HttpUpstream, *};

/// An open tap: the head is read (so the workers have attached it).
struct Tap {
    reader: BufReader<UnixStream>,
    workers: String,
}

fn open_tap(socket: &Path, query: &str) -> Result<Tap, (u16, String)> {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(IO_DEADLINE)).unwrap();
    write!(
        s,
        "GET /tap{query} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status: u16 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut workers = String::new();
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if let Some(v) = line.strip_prefix("x-pilotfish-tap-workers: ") {
            workers = v.trim().to_string();
        }
        if line == "\r\n" || line.is_empty() {
            break;
        }
    }
    if status != 200 {
        let mut body = String::new();
        let _ = reader.read_to_string(&mut body);
        return Err((status, body));
    }
    Ok(Tap { reader, workers })
}

impl Tap {
    /// The next event, or None when the stream ends.
    fn next(&mut self) -> Option<serde_json::Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(serde_json::from_str(&line).expect("one JSON object per line")),
        }
    }

    /// Every event until the stream ends (the tap was given a count).
    fn all(mut self) -> Vec<serde_json::Value> {
        std::iter::from_fn(|| self.next()).collect()
    }
}

fn setup(
    tag: &str,
) -> (
    pilotfish::Proxy,
    std::net::SocketAddr,
    pilotfish::admin::Server,
    std::path::PathBuf,
    HttpUpstream,
) {
    let up = HttpUpstream::start();
    let routes = r#"cluster = "app"
[[listeners.routes]]
name = "api"
path_prefix = "/api"
cluster = "app"
[[listeners.routes]]
name = "web"
path_prefix = "/web"
cluster = "app"
"#;
    let toml = http_config("io_uring", routes, &cluster("app", &[up.addr], ""));
    let (proxy, addr) = start_toml(&toml, "web");
    let socket = temp_dir(tag).join("admin.sock");
    let admin = admin_server(&proxy, Some(socket.clone()), None);
    (proxy, addr, admin, socket, up)
}

fn request(addr: std::net::SocketAddr, method: &str, path: &str, host: &str) -> u16 {
    let body = if method == "POST" { "hello" } else { "" };
    let raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    one(addr, raw.as_bytes()).status
}

#[test]
fn taps_see_only_what_their_filters_match_with_timings() {
    let (_proxy, addr, _admin, socket, _up) = setup("tap-filters");
    // Three taps at once, each ending after its count.
    let failures = open_tap(&socket, "?route=api&status=5xx&count=2").unwrap();
    let posts = open_tap(&socket, "?method=post&path_prefix=/web&count=1").unwrap();
    let by_host = open_tap(&socket, "?authority=Orders.Mesh.&count=2").unwrap();
    assert_eq!(failures.workers, "1/1");

    let slow = Instant::now();
    assert_eq!(request(addr, "GET", "/api/delay/30", "payments.mesh"), 200);
    let slow_took = slow.elapsed();
    assert_eq!(
        request(addr, "GET", "/api/status/503", "orders.mesh:8080"),
        503
    );
    assert_eq!(
        request(addr, "GET", "/web/status/500", "payments.mesh"),
        500
    );
    let form = one(
        addr,
        b"POST /web/form HTTP/1.1\r\nHost: payments.mesh\r\nContent-Length: 5\r\n\r\nhello",
    );
    assert_eq!(form.status, 200);
    assert_eq!(request(addr, "GET", "/api/status/502", "ORDERS.mesh"), 502);
    // Matches nothing: none of the taps may show it.
    assert_eq!(request(addr, "GET", "/api/x", "payments.mesh"), 200);

    let failures = failures.all();
    let paths: Vec<&str> = failures
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["/api/status/503", "/api/status/502"]);
    for e in &failures {
        assert_eq!(e["route"], "api");
        assert_eq!(e["cluster"], "app");
        assert_eq!(e["listener"], "web");
        assert_eq!(e["direction"], "outbound");
        assert_eq!(e["method"], "GET");
        assert_eq!(e["attempts"], 1);
        assert_eq!(e["dropped"], 0);
        assert_eq!(e["endpoint"], _up.addr.to_string());
        assert!(e["status"].as_u64().unwrap() >= 500);
    }

    let posts = posts.all();
    assert_eq!(posts.len(), 1);
    assert_eq!(posts[0]["path"], "/web/form");
    assert_eq!(posts[0]["request_bytes"], 5);
    assert_eq!(posts[0]["response_bytes"], form.body.len(), "{}", posts[0]);

    let by_host = by_host.all();
    let statuses: Vec<u64> = by_host
        .iter()
        .map(|e| e["status"].as_u64().unwrap())
        .collect();
    assert_eq!(
        statuses,
        [503, 502],
        "authority matched with any case, port and trailing dot"
    );

    // The timing breakdown of the slow request, seen by a tap of its own.
    let mut timed = open_tap(&socket, "?path_prefix=/api/delay&count=1").unwrap();
    assert_eq!(request(addr, "GET", "/api/delay/30", "payments.mesh"), 200);
    let e = timed.next().unwrap();
    let first_byte = e["first_byte_us"].as_u64().unwrap();
    let total = e["total_us"].as_u64().unwrap();
    assert!(first_byte >= 30_000, "the upstream waited 30 ms: {e}");
    assert!(total >= first_byte, "{e}");
    assert!(total < slow_took.as_micros() as u64 * 20, "{e}");
    // A pooled connection has no connect time.
    assert!(e["connect_us"].is_null(), "{e}");
}

#[test]
fn a_tap_is_bounded_by_its_rate_and_says_what_it_dropped() {
    let (_proxy, addr, _admin, socket, _up) = setup("tap-rate");
    let mut tap = open_tap(&socket, "?rate=5").unwrap();
    let burst = 30;
    for _ in 0..burst {
        assert_eq!(request(addr, "GET", "/api/x", "a"), 200);
    }
    // After a second the budget is back: this one goes through and
    // carries the count of what was dropped since the last one.
    thread::sleep(Duration::from_millis(1100));
    assert_eq!(request(addr, "GET", "/api/last", "a"), 200);
    let mut seen = 0u64;
    let mut dropped = 0u64;
    loop {
        let e = tap.next().expect("the stream goes on");
        seen += 1;
        dropped += e["dropped"].as_u64().unwrap();
        if e["path"] == "/api/last" {
            break;
        }
    }
    assert!(seen < burst, "the rate bound let {seen} of {burst} through");
    assert!(dropped > 0);
    assert_eq!(
        seen + dropped,
        burst + 1,
        "every request is either shown or counted"
    );
}

#[test]
fn taps_are_capped_and_a_client_that_leaves_frees_its_tap() {
    let (_proxy, addr, _admin, socket, _up) = setup("tap-cap");
    let mut taps: Vec<Tap> = (0..4).map(|_| open_tap(&socket, "").unwrap()).collect();
    let (status, body) = open_tap(&socket, "").err().expect("a fifth tap is refused");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("4 taps"), "{body}");
    // Bad filters are refused with the reason.
    assert_eq!(open_tap(&socket, "?status=6xx").err().unwrap().0, 400);
    assert_eq!(open_tap(&socket, "?rate=0").err().unwrap().0, 400);
    assert_eq!(open_tap(&socket, "?pth=/x").err().unwrap().0, 400);

    // One client reads an event, then goes away mid-stream; the others
    // leave without reading. The proxy keeps serving, and the taps are
    // freed (the admin side notices within a second or at the next write).
    assert_eq!(request(addr, "GET", "/api/x", "a"), 200);
    assert_eq!(taps[0].next().unwrap()["path"], "/api/x");
    taps.clear();
    for _ in 0..20 {
        assert_eq!(request(addr, "GET", "/api/x", "a"), 200);
    }
    eventually("the four taps are freed", || {
        let four: Vec<_> = (0..4).filter_map(|_| open_tap(&socket, "").ok()).collect();
        four.len() == 4
    });
}

#[test]
fn admin_tap_prints_one_readable_line_per_request() {
    let (_proxy, addr, _admin, socket, _up) = setup("tap-cli");
    let child = Command::new(env!("CARGO_BIN_EXE_pilotfish"))
        .args(["admin", "--socket"])
        .arg(&socket)
        .args(["tap", "--route", "web", "--count", "2"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The CLI attaches in the background: send until both lines came.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let stop = std::sync::Arc::clone(&stop);
        thread::spawn(move || {
            for i in 0..200 {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                request(
                    addr,
                    "GET",
                    &format!("/web/status/{}", 200 + i % 2),
                    "shop.mesh",
                );
                thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    for l in &lines {
        assert!(l.contains("GET shop.mesh/web/status/20"), "{l}");
        assert!(l.contains("route=web cluster=app"), "{l}");
        assert!(l.contains("ms"), "{l}");
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    sender.join().unwrap();
    // The CLI says why when refused.
    let refused = Command::new(env!("CARGO_BIN_EXE_pilotfish"))
        .args(["admin", "--socket"])
        .arg(&socket)
        .args(["tap", "--status", "7xx"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("400"));
}
