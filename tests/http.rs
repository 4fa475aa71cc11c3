//! HTTP/1.1 through the proxy, in-process, against the test upstream:
//! forwarding and header hygiene, bodies both ways, pooling, pipelining,
//! retries, outlier ejection, timeouts, generated errors, traffic split.

// Test threads are not workers: a short sleep to order events is fine.
#![allow(clippy::disallowed_methods)]

mod support;

use std::time::{Duration, Instant};

use pilotfish::metrics::ErrorReason;
use support::{http_client::*, http_upstream::HttpUpstream, *};

fn simple(driver: &str, up: &HttpUpstream) -> (pilotfish::Proxy, std::net::SocketAddr) {
    start_toml(
        &http_config(driver, "cluster = \"app\"", &cluster("app", &[up.addr], "")),
        "web",
    )
}

#[test]
fn forwards_with_header_hygiene() {
    let up = HttpUpstream::start();
    for driver in drivers() {
        let (proxy, addr) = simple(driver, &up);
        let r = one(
            addr,
            b"GET /echo HTTP/1.1\r\nHost: svc\r\nConnection: keep-alive, x-hop\r\nX-Hop: secret\r\nKeep-Alive: 5\r\nProxy-Authorization: Basic x\r\nTE: trailers, gzip\r\nTrailer: x\r\nX-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Proto: https\r\ntraceparent: 00-abc-def-01\r\ntracestate: a=b\r\nb3: 1-2-1\r\n\r\n",
        );
        assert_eq!(r.status, 200, "{driver}");
        let seen = r.text().to_ascii_lowercase();
        for gone in [
            "x-hop",
            "keep-alive",
            "proxy-authorization",
            "trailer:",
            "connection:",
        ] {
            assert!(!seen.contains(gone), "{driver}: {gone} forwarded:\n{seen}");
        }
        for kept in [
            "traceparent: 00-abc-def-01",
            "tracestate: a=b",
            "b3: 1-2-1",
            "te: trailers\r\n",
            "host: svc",
        ] {
            assert!(seen.contains(kept), "{driver}: {kept} missing:\n{seen}");
        }
        assert!(
            seen.contains("x-forwarded-for: 10.0.0.1, 127.0.0.1"),
            "{seen}"
        );
        assert!(seen.contains("x-forwarded-proto: http\r\n"), "{seen}");
        assert!(seen.contains("x-request-id: "), "{seen}");
        // A request id the client sent is kept as is.
        let r = one(
            addr,
            b"GET /echo HTTP/1.1\r\nHost: svc\r\nX-Request-Id: abc\r\n\r\n",
        );
        assert_eq!(
            r.text().matches("x-request-id").count() + r.text().matches("X-Request-Id").count(),
            1
        );
        proxy.shutdown();
    }
}

#[test]
fn request_bodies_content_length_and_chunked() {
    let up = HttpUpstream::start();
    for driver in drivers() {
        let (proxy, addr) = simple(driver, &up);
        let r = one(
            addr,
            b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
        );
        assert!(
            r.text().ends_with("\r\n\r\nhello"),
            "{driver}: {}",
            r.text()
        );
        assert!(r.text().contains("content-length: 5"));
        let r = one(
            addr,
            b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
        );
        let text = r.text();
        assert!(text.ends_with("hello world"), "{driver}: {text}");
        assert!(
            text.contains("transfer-encoding: chunked"),
            "re-chunked: {text}"
        );
        assert!(!text.contains("ext=1"), "our framing, not theirs: {text}");
        proxy.shutdown();
    }
}

#[test]
fn response_bodies_every_framing() {
    let up = HttpUpstream::start();
    for driver in drivers() {
        let (proxy, addr) = simple(driver, &up);
        let mut c = Conn::open(addr);
        c.send(b"GET /chunked HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(c.read(false).unwrap().text(), "hello world");
        c.send(b"HEAD /big/1000 HTTP/1.1\r\nHost: a\r\n\r\n");
        let head = c.read(true).unwrap();
        assert_eq!(
            head.header("content-length"),
            Some("1000"),
            "HEAD keeps the length"
        );
        c.send(b"GET /status/304 HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(c.read(false).unwrap().status, 304);
        c.send(b"GET /status/204 HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(c.read(false).unwrap().status, 204);
        // Close-delimited upstream body: re-chunked, client stays connected.
        c.send(b"GET /until-close HTTP/1.1\r\nHost: a\r\n\r\n");
        let r = c.read(false).unwrap();
        assert_eq!(r.text(), "body until close");
        assert_eq!(r.header("transfer-encoding"), Some("chunked"));
        c.send(b"GET /big/300000 HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(c.read(false).unwrap().body.len(), 300_000);
        // HTTP/1.0 client: close-delimited, then closed.
        let mut old = Conn::open(addr);
        old.send(b"GET /until-close HTTP/1.0\r\n\r\n");
        let r = old.read(false).unwrap();
        assert_eq!(r.text(), "body until close");
        assert!(old.closed());
        proxy.shutdown();
    }
}

#[test]
fn sequential_requests_reuse_one_upstream_connection() {
    let up = HttpUpstream::start();
    let (proxy, addr) = simple("epoll", &up);
    let mut c = Conn::open(addr);
    for i in 0..20 {
        c.send(format!("GET /n{i} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes());
        assert_eq!(c.read(false).unwrap().text(), format!("ok /n{i}"));
    }
    // A second client connection, later: still the pooled upstream one.
    for i in 0..5 {
        assert_eq!(get(addr, &format!("/m{i}")).status, 200);
    }
    assert_eq!(
        up.connections(),
        1,
        "one pooled upstream connection for 25 requests"
    );
    let t = proxy.stats().total.http;
    assert_eq!(t.upstream_connects, 1);
    assert_eq!(t.pool_reuses, 24);
    proxy.shutdown();
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let up = HttpUpstream::start();
    for driver in drivers() {
        let (proxy, addr) = simple(driver, &up);
        let mut c = Conn::open(addr);
        c.send(b"GET /delay/50 HTTP/1.1\r\nHost: a\r\n\r\nGET /second HTTP/1.1\r\nHost: a\r\n\r\nPOST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabcGET /last HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(c.read(false).unwrap().text(), "late");
        assert_eq!(c.read(false).unwrap().text(), "ok /second");
        assert!(c.read(false).unwrap().text().ends_with("abc"));
        assert_eq!(c.read(false).unwrap().text(), "ok /last");
        proxy.shutdown();
    }
}

#[test]
fn generated_errors_name_their_reason() {
    let up = HttpUpstream::start();
    let toml = http_config(
        "epoll",
        "head_bytes_max = 2048\nuri_bytes_max = 64\nbody_bytes_max = 10\n[[listeners.routes]]\npath_prefix = \"/app\"\ncluster = \"app\"\n[[listeners.routes]]\npath_prefix = \"/dead\"\ncluster = \"dead\"",
        &(cluster("app", &[up.addr], "") + &cluster("dead", &[closed_port()], "connect_attempts = 1")),
    );
    let (proxy, addr) = start_toml(&toml, "web");
    let cases: Vec<(Vec<u8>, u16, ErrorReason)> = vec![
        (b"GET /nowhere HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(), 404, ErrorReason::NoRoute),
        (b"POST /app HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(), 400, ErrorReason::BadRequest),
        (b"GET /app HTTP/1.1\r\nHost: a\r\nX: a\r\n folded\r\n\r\n".to_vec(), 400, ErrorReason::BadRequest),
        (format!("GET /app HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n", "y".repeat(3000)).into_bytes(), 431, ErrorReason::HeadTooLarge),
        (format!("GET /app/{} HTTP/1.1\r\nHost: a\r\n\r\n", "u".repeat(200)).into_bytes(), 414, ErrorReason::UriTooLong),
        (b"POST /app HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nhello world".to_vec(), 413, ErrorReason::BodyTooLarge),
        (b"GET /dead HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(), 503, ErrorReason::ConnectFailed),
        (b"GET /app/reset HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(), 502, ErrorReason::UpstreamReset),
    ];
    for (raw, status, reason) in &cases {
        let r = one(addr, raw);
        assert_eq!(
            r.status,
            *status,
            "{}",
            String::from_utf8_lossy(&raw[..40.min(raw.len())])
        );
        assert_eq!(r.header("x-pilotfish-error"), Some(reason.name()));
        assert!(r.text().starts_with(&status.to_string()), "{}", r.text());
    }
    let t = proxy.stats().total.http;
    assert_eq!(t.generated(ErrorReason::NoRoute), 1, "{t:?}");
    assert_eq!(t.generated(ErrorReason::BadRequest), 2);
    assert_eq!(t.generated(ErrorReason::UpstreamReset), 1);
    proxy.shutdown();
}

#[test]
fn route_timeout_gives_504_within_the_timeout() {
    let up = HttpUpstream::start();
    let toml = http_config(
        "epoll",
        "cluster = \"app\"\nrequest_timeout = \"300ms\"",
        &cluster("app", &[up.addr], ""),
    );
    let (proxy, addr) = start_toml(&toml, "web");
    let started = Instant::now();
    let r = get(addr, "/delay/5000");
    let waited = started.elapsed();
    assert_eq!(r.status, 504);
    assert_eq!(r.header("x-pilotfish-error"), Some("upstream_timeout"));
    // Liveness bound, not a benchmark: the timeout plus a generous margin,
    // far below the upstream's 5 s.
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    proxy.shutdown();
}

#[test]
fn upstream_bad_framing_is_a_502_never_forwarded() {
    let up = HttpUpstream::start();
    let (proxy, addr) = simple("epoll", &up);
    let r = get(addr, "/bad-framing");
    assert_eq!(r.status, 502);
    assert_eq!(r.header("x-pilotfish-error"), Some("bad_upstream_response"));
    proxy.shutdown();
}

#[test]
fn retries_go_to_another_endpoint_and_outliers_are_ejected() {
    let good = HttpUpstream::start();
    let bad = HttpUpstream::always(503);
    let dead = closed_port();
    let route = "[[listeners.routes]]\npath_prefix = \"/\"\ncluster = \"app\"\nretry = { attempts = 3, on = [\"connect_failure\", \"reset\", \"503\"] }";
    let toml = http_config(
        "epoll",
        route,
        &cluster(
            "app",
            &[good.addr, bad.addr, dead],
            "outlier = { consecutive_failures = 2, base_ejection = \"1m\", max_ejected_percent = 67 }\nretry_budget_percent = 100",
        ),
    );
    let (proxy, addr) = start_toml(&toml, "web");
    for i in 0..30 {
        let r = get(addr, &format!("/r{i}"));
        assert_eq!(r.status, 200, "request {i} retried onto the good endpoint");
    }
    let t = proxy.stats().total.http;
    assert!(t.retries > 0, "{t:?}");
    assert_eq!(t.ejections, 2, "both failing endpoints ejected: {t:?}");
    let bad_hits = bad.requests();
    for _ in 0..10 {
        assert_eq!(get(addr, "/after").status, 200);
    }
    assert_eq!(
        bad.requests(),
        bad_hits,
        "an ejected endpoint gets no requests"
    );
    proxy.shutdown();
}

#[test]
fn non_idempotent_requests_are_not_retried_after_sending() {
    let bad = HttpUpstream::always(503);
    let good = HttpUpstream::start();
    let route = "[[listeners.routes]]\npath_prefix = \"/\"\ncluster = \"app\"\nretry = { attempts = 3, on = [\"503\"] }";
    let toml = http_config(
        "epoll",
        route,
        &cluster(
            "app",
            &[bad.addr, good.addr],
            "outlier = { disabled = true }",
        ),
    );
    let (proxy, addr) = start_toml(&toml, "web");
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(
            one(
                addr,
                b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx",
            )
            .status,
        );
    }
    assert!(
        statuses.contains(&503),
        "the POST that hit the bad endpoint got its 503: {statuses:?}"
    );
    assert_eq!(proxy.stats().total.http.retries, 0);
    proxy.shutdown();
}

#[test]
fn weighted_split_follows_the_weights() {
    let a = HttpUpstream::start();
    let b = HttpUpstream::start();
    let route = "[[listeners.routes]]\npath_prefix = \"/\"\nweighted = [{ cluster = \"a\", weight = 80 }, { cluster = \"b\", weight = 20 }]";
    let toml = http_config(
        "epoll",
        route,
        &(cluster("a", &[a.addr], "") + &cluster("b", &[b.addr], "")),
    );
    let (proxy, addr) = start_toml(&toml, "web");
    let mut c = Conn::open(addr);
    let n = 1000;
    for _ in 0..n {
        c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(c.read(false).unwrap().status, 200);
    }
    let share = a.requests() as f64 / n as f64;
    // Binomial(1000, 0.8): sd 1.3 %; 6 sd of slack keeps this from flaking.
    assert!((0.72..0.88).contains(&share), "a got {share}");
    assert_eq!(a.requests() + b.requests(), n);
    proxy.shutdown();
}

#[test]
fn websocket_upgrade_becomes_a_tunnel_after_101() {
    let up = HttpUpstream::start();
    for driver in drivers() {
        let (proxy, addr) = simple(driver, &up);
        let mut c = Conn::open(addr);
        c.send(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n");
        let r = c.read(false).unwrap();
        assert_eq!(r.status, 101, "{driver}");
        assert_eq!(r.header("upgrade"), Some("websocket"));
        c.send(b"frame-1");
        let mut buf = [0u8; 7];
        std::io::Read::read_exact(&mut c.reader, &mut buf).unwrap();
        assert_eq!(&buf, b"frame-1");
        proxy.shutdown();
    }
}

#[test]
fn expect_continue_is_passed_through() {
    let up = HttpUpstream::start();
    let (proxy, addr) = simple("epoll", &up);
    let mut c = Conn::open(addr);
    c.send(b"POST /echo HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n");
    let interim = c.read(false).unwrap();
    assert_eq!(interim.status, 100);
    c.send(b"body");
    let r = c.read(false).unwrap();
    assert_eq!(r.status, 200);
    assert!(r.text().ends_with("body"));
    proxy.shutdown();
}

#[test]
fn drain_closes_idle_keep_alive_connections_and_marks_responses_close() {
    let up = HttpUpstream::start();
    let (proxy, addr) = simple("epoll", &up);
    let mut idle = Conn::open(addr);
    idle.send(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(idle.read(false).unwrap().status, 200);
    let mut busy = Conn::open(addr);
    busy.send(b"GET /delay/300 HTTP/1.1\r\nHost: a\r\n\r\n");
    std::thread::sleep(Duration::from_millis(50));
    proxy.drain();
    assert!(
        idle.closed(),
        "an idle keep-alive connection is closed at once"
    );
    let r = busy.read(false).unwrap();
    assert_eq!(r.text(), "late", "the in-flight request completes");
    assert_eq!(r.header("connection"), Some("close"));
    assert!(busy.closed());
    assert!(
        proxy.exited().recv_timeout(IO_DEADLINE).is_err(),
        "workers exit"
    );
    proxy.join();
}

#[test]
fn per_route_header_edits_apply() {
    let up = HttpUpstream::start();
    let route = "[[listeners.routes]]\npath_prefix = \"/\"\ncluster = \"app\"\nrequest_headers = { add = { \"x-added\" = \"1\" }, set = { \"x-env\" = \"prod\" }, remove = [\"x-debug\"] }";
    let (proxy, addr) = start_toml(
        &http_config("epoll", route, &cluster("app", &[up.addr], "")),
        "web",
    );
    let r = one(
        addr,
        b"GET /echo HTTP/1.1\r\nHost: a\r\nX-Env: dev\r\nX-Debug: yes\r\n\r\n",
    );
    let seen = r.text().to_ascii_lowercase();
    assert!(seen.contains("x-added: 1"), "{seen}");
    assert!(
        seen.contains("x-env: prod") && !seen.contains("x-env: dev"),
        "{seen}"
    );
    assert!(!seen.contains("x-debug"), "{seen}");
    proxy.shutdown();
}

#[test]
fn hash_balancing_keeps_a_key_on_one_endpoint() {
    let ups: Vec<HttpUpstream> = (0..3).map(|_| HttpUpstream::start()).collect();
    let addrs: Vec<_> = ups.iter().map(|u| u.addr).collect();
    let toml = http_config(
        "epoll",
        "cluster = \"app\"",
        &cluster("app", &addrs, "lb = \"hash\"\nhash_header = \"x-user\""),
    );
    let (proxy, addr) = start_toml(&toml, "web");
    for user in 0..6 {
        let before: Vec<usize> = ups.iter().map(HttpUpstream::requests).collect();
        for _ in 0..5 {
            let raw = format!("GET / HTTP/1.1\r\nHost: a\r\nX-User: user-{user}\r\n\r\n");
            assert_eq!(one(addr, raw.as_bytes()).status, 200);
        }
        let moved: Vec<usize> = ups
            .iter()
            .zip(&before)
            .map(|(u, b)| u.requests() - b)
            .collect();
        assert_eq!(
            moved.iter().filter(|&&n| n > 0).count(),
            1,
            "user-{user} spread over {moved:?}"
        );
    }
    proxy.shutdown();
}

/// Issue 11 item 9: under `lb = "hash"`, a retry goes to another endpoint
/// (it used to hash straight back to the one that just failed).
#[test]
fn hash_balancing_retries_on_another_endpoint() {
    let healthy = HttpUpstream::start();
    let sick = HttpUpstream::always(503);
    let route = "[[listeners.routes]]\npath_prefix = \"/\"\ncluster = \"app\"\nretry = { attempts = 2, on = [\"503\"] }";
    let toml = http_config(
        "auto",
        route,
        &cluster(
            "app",
            &[healthy.addr, sick.addr],
            "lb = \"hash\"\nhash_header = \"x-user\"\nretry_budget_percent = 100\noutlier = { disabled = true }",
        ),
    );
    let (proxy, addr) = start_toml(&toml, "web");
    for user in 0..16 {
        let raw = format!("GET / HTTP/1.1\r\nHost: a\r\nX-User: user-{user}\r\n\r\n");
        let r = one(addr, raw.as_bytes());
        assert_eq!(r.status, 200, "user-{user}: {}", r.text());
    }
    assert!(sick.requests() > 0, "some keys hash to the sick endpoint");
    assert_eq!(
        healthy.requests(),
        16,
        "every request ended on the healthy one"
    );
    proxy.shutdown();
}

#[test]
fn active_health_checks_take_a_failing_endpoint_out() {
    let healthy = HttpUpstream::start();
    // Answers every request, health checks included, with 503.
    let sick = HttpUpstream::always(503);
    let toml = http_config(
        "epoll",
        "cluster = \"app\"",
        &cluster(
            "app",
            &[healthy.addr, sick.addr],
            "outlier = { disabled = true }\n[clusters.health_check]\npath = \"/healthz\"\ninterval = \"50ms\"\ntimeout = \"1s\"\nunhealthy_threshold = 2\nhealthy_threshold = 1",
        ),
    );
    let (proxy, addr) = start_toml(&toml, "web");
    eventually("health checks fail on the sick endpoint", || {
        proxy.stats().total.http.health_checks_failed >= 2
    });
    let sick_before = sick.requests();
    let mut c = Conn::open(addr);
    for _ in 0..20 {
        c.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(
            c.read(false).unwrap().status,
            200,
            "only the healthy endpoint serves"
        );
    }
    // The sick endpoint saw health checks only, no proxied request.
    let checks_meanwhile = sick.requests() - sick_before;
    assert!(
        checks_meanwhile < 20,
        "sick endpoint got {checks_meanwhile} requests"
    );
    assert!(proxy.stats().total.http.health_checks_ok > 0);
    proxy.shutdown();
}

#[test]
fn a_response_that_fails_midway_is_cut_off_not_completed() {
    let up = HttpUpstream::start();
    let (proxy, addr) = simple("epoll", &up);
    let mut c = Conn::open(addr);
    c.send(b"GET /truncated HTTP/1.1\r\nHost: a\r\n\r\n");
    // The head promised 100 bytes; the client gets the 10 that exist and
    // then a closed connection, never padding or a second response.
    let mut head_and_body = Vec::new();
    let _ = std::io::Read::read_to_end(&mut c.reader, &mut head_and_body);
    let text = String::from_utf8_lossy(&head_and_body);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(text.contains("content-length: 100"), "{text}");
    assert!(text.ends_with("\r\n\r\n0123456789"), "{text}");
    assert_eq!(proxy.stats().total.http.responses_cut, 1);
    proxy.shutdown();
}

#[test]
fn connect_becomes_a_tunnel_after_the_upstream_answers_2xx() {
    let up = HttpUpstream::start();
    for driver in drivers() {
        let (proxy, addr) = simple(driver, &up);
        let mut c = Conn::open(addr);
        c.send(b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n");
        let r = c.read(true).unwrap();
        assert_eq!(r.status, 200, "{driver}");
        c.send(b"raw bytes after CONNECT");
        let mut buf = [0u8; 23];
        std::io::Read::read_exact(&mut c.reader, &mut buf).unwrap();
        assert_eq!(&buf, b"raw bytes after CONNECT", "{driver}");
        proxy.shutdown();
    }
}

#[test]
fn interim_responses_are_relayed_and_bounded() {
    let up = HttpUpstream::start();
    let (proxy, addr) = simple("epoll", &up);
    let mut c = Conn::open(addr);
    c.send(b"GET /interims/2 HTTP/1.1\r\nHost: a\r\n\r\n");
    for _ in 0..2 {
        let hint = c.read(false).unwrap();
        assert_eq!(hint.status, 103);
        assert_eq!(hint.header("link"), Some("</a.css>; rel=preload"));
    }
    assert_eq!(c.read(false).unwrap().text(), "final");
    // An upstream streaming 1xx forever is cut off after the cap.
    let mut c = Conn::open(addr);
    c.send(b"GET /interims/100 HTTP/1.1\r\nHost: a\r\n\r\n");
    let last = std::iter::from_fn(|| c.read(false)).last().unwrap();
    assert_eq!(last.status, 502);
    assert_eq!(
        last.header("x-pilotfish-error"),
        Some("bad_upstream_response")
    );
    proxy.shutdown();
}

/// Issue 11 item 8: the route timeout runs from when the request was
/// forwarded in full, so a slow upload to a healthy upstream is no 504.
#[test]
fn the_route_timeout_starts_after_the_body_was_sent() {
    use std::io::Write;
    let up = HttpUpstream::start();
    for driver in drivers() {
        let (proxy, addr) = start_toml(
            &http_config(
                driver,
                "cluster = \"app\"\nrequest_timeout = \"300ms\"",
                &cluster("app", &[up.addr], ""),
            ),
            "web",
        );
        let mut c = Conn::open(addr);
        c.send(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n");
        for piece in [b"ab", b"cd", b"ef", b"gh", b"ij"] {
            std::thread::sleep(Duration::from_millis(150));
            c.writer.write_all(piece).unwrap();
        }
        let r = c.read(false).unwrap();
        assert_eq!(r.status, 200, "{driver}: {}", r.text());
        assert!(r.text().ends_with("abcdefghij"), "{driver}");
        // The timeout still bounds the wait for the answer.
        c.send(b"POST /delay/1000 HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx");
        let r = c
            .read(false)
            .unwrap_or_else(|| panic!("{driver}: closed: {:?}", proxy.stats().total));
        assert_eq!(r.status, 504, "{driver}");
        proxy.shutdown();
    }
}

/// Issue 11 item 8: bytes of a response head that arrive while the proxy
/// waits for `100 Continue` are kept (they used to be dropped with the
/// read when the 1 s wait ran out, and the rest parsed as garbage: 502).
#[test]
fn a_partial_head_during_the_continue_wait_is_kept() {
    use std::io::{Read, Write};
    let upstream = serve(|mut s| {
        let head = read_head_raw(&mut s);
        assert!(
            head.to_ascii_lowercase().contains("expect: 100-continue"),
            "{head}"
        );
        s.write_all(b"HTTP/1.1 200 OK\r\nConte").unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        let mut body = [0u8; 4];
        s.read_exact(&mut body).unwrap();
        s.write_all(b"nt-Length: 2\r\n\r\nok").unwrap();
        let _ = s.read(&mut body);
    });
    for driver in drivers() {
        let (proxy, addr) = start_toml(
            &http_config(
                driver,
                "cluster = \"app\"",
                &cluster("app", &[upstream], ""),
            ),
            "web",
        );
        let mut c = Conn::open(addr);
        c.send(
            b"POST /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\nbody",
        );
        let r = c.read(false).unwrap();
        assert_eq!((r.status, r.text().as_str()), (200, "ok"), "{driver}");
        proxy.shutdown();
    }
}

/// Issue 11 item 8: the request-head timeout is configurable and answers
/// 408 once a request line was seen; before that, the connection just
/// closes.
#[test]
fn a_stalled_request_head_gets_408() {
    let up = HttpUpstream::start();
    let (proxy, addr) = start_toml(
        &http_config(
            "auto",
            "cluster = \"app\"\nrequest_head_timeout = \"200ms\"",
            &cluster("app", &[up.addr], ""),
        ),
        "web",
    );
    let mut c = Conn::open(addr);
    c.send(b"GET / HTTP/1.1\r\nHost: a\r\n");
    let r = c.read(false).expect("an answer");
    assert_eq!(r.status, 408);
    assert_eq!(r.header("x-pilotfish-error"), Some("request_timeout"));
    let mut c = Conn::open(addr);
    c.send(b"GE");
    assert!(
        c.read(false).is_none(),
        "no request line: closed without an answer"
    );
    proxy.shutdown();
}

/// Issue 11 item 14: an upstream that answers before reading the whole
/// body (nginx's 413 to a large upload) gets its answer relayed at once;
/// the proxy stops sending, closes both connections after the response,
/// and counts it.
#[test]
fn an_early_answer_to_an_upload_is_relayed_at_once() {
    use std::io::Write;
    let upstream = serve(|mut s| {
        let _ = read_head_raw(&mut s);
        s.write_all(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 4\r\n\r\nbig\n")
            .unwrap();
        // Never reads the body; holds the connection for a while.
        std::thread::sleep(Duration::from_secs(10));
    });
    for driver in drivers() {
        let (proxy, addr) = start_toml(
            &http_config(
                driver,
                "cluster = \"app\"\nidle_timeout = \"60s\"",
                &cluster("app", &[upstream], ""),
            ),
            "web",
        );
        let mut c = Conn::open(addr);
        let total: usize = 64 << 20;
        c.send(
            format!("POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: {total}\r\n\r\n")
                .as_bytes(),
        );
        let mut w = c.writer.try_clone().unwrap();
        let uploader = std::thread::spawn(move || {
            let chunk = vec![b'x'; 64 * 1024];
            let mut sent = 0;
            while sent < total && w.write_all(&chunk).is_ok() {
                sent += chunk.len();
            }
            sent
        });
        let r = c.read(false).expect("the early answer");
        assert_eq!((r.status, r.text().as_str()), (413, "big\n"), "{driver}");
        assert_eq!(r.header("connection"), Some("close"), "{driver}");
        let sent = uploader.join().unwrap();
        assert!(sent < total, "{driver}: the proxy stopped reading the body");
        assert_eq!(proxy.stats().total.http.early_responses, 1, "{driver}");
        proxy.shutdown();
    }
}

/// Fault injection per route (issue 16 item 4): aborts with the asked
/// status instead of forwarding, delays before forwarding, only for
/// requests with the header when one is named, for the asked share.
#[test]
fn routes_inject_delays_and_aborts() {
    let up = HttpUpstream::start();
    let routes = "[[listeners.routes]]\nname = \"abort\"\npath_prefix = \"/abort/\"\ncluster = \"app\"\nfault = { abort = 418, abort_percent = 100 }\n\
[[listeners.routes]]\nname = \"delay\"\npath_prefix = \"/delay-me/\"\ncluster = \"app\"\nfault = { delay = \"300ms\", delay_percent = 100 }\n\
[[listeners.routes]]\nname = \"gated\"\npath_prefix = \"/gated/\"\ncluster = \"app\"\nfault = { abort_percent = 100, only_with_header = \"X-Fault\" }\n\
[[listeners.routes]]\nname = \"half\"\npath_prefix = \"/half/\"\ncluster = \"app\"\nfault = { abort = 500, abort_percent = 50 }";
    let (proxy, addr) = start_toml(
        &http_config("auto", routes, &cluster("app", &[up.addr], "")),
        "web",
    );
    let r = get(addr, "/abort/x");
    assert_eq!(r.status, 418);
    assert_eq!(r.header("x-pilotfish-error"), Some("fault_injected"));
    assert_eq!(up.requests(), 0, "an aborted request is not forwarded");

    let started = Instant::now();
    let r = get(addr, "/delay-me/echo");
    assert_eq!(r.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(300), "delayed");
    assert_eq!(up.requests(), 1);

    assert_eq!(get(addr, "/gated/x").status, 200, "no header: spared");
    let r = one(
        addr,
        b"GET /gated/x HTTP/1.1\r\nHost: a\r\nx-fault: 1\r\n\r\n",
    );
    assert_eq!(r.status, 503, "with the header: the default abort status");

    let mut c = Conn::open(addr);
    let mut aborted = 0;
    for _ in 0..400 {
        c.send(b"GET /half/x HTTP/1.1\r\nHost: a\r\n\r\n");
        let r = c.read(false).unwrap();
        if r.status == 500 {
            aborted += 1;
        } else {
            assert_eq!(r.status, 200);
        }
    }
    // Binomial(400, 0.5): ±100 is ten standard deviations.
    assert!((100..=300).contains(&aborted), "{aborted} of 400 aborted");
    let stats = proxy.stats().total.http;
    assert_eq!(stats.faults_aborted, 1 + 1 + aborted);
    assert_eq!(stats.faults_delayed, 1);
    proxy.shutdown();
}

#[test]
fn fault_settings_are_validated() {
    for (fault, why) in [
        ("{ abort_percent = 150 }", "between 0 and 100"),
        ("{ abort = 99, abort_percent = 1 }", "200 to 599"),
        ("{ delay_percent = 10 }", "needs a delay"),
        ("{ delay = \"1s\" }", "delay_percent"),
        (
            "{ abort_percent = 1, only_with_header = \"a b\" }",
            "not a header name",
        ),
    ] {
        let toml = http_config(
            "epoll",
            &format!(
                "[[listeners.routes]]\npath_prefix = \"/\"\ncluster = \"app\"\nfault = {fault}"
            ),
            &cluster("app", &[closed_port()], ""),
        );
        let e = pilotfish::Config::parse("t.toml", &toml)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(why) && e.contains("routes[0].fault"),
            "{fault}: {e}"
        );
    }
}

/// The connection breakers: past `max_connections` open to the cluster
/// (pooled or busy), a request that needs a new one gets 503
/// `circuit_breaker_max_connections`, while pooled ones are still reused;
/// past `max_pending` requests waiting for a connect, 503
/// `circuit_breaker_max_pending` at once.
#[test]
fn circuit_breakers_cap_connections_and_pending_connects() {
    let up = HttpUpstream::start();
    for driver in drivers() {
        let (proxy, addr) = start_toml(
            &http_config(
                driver,
                "cluster = \"app\"",
                &cluster(
                    "app",
                    &[up.addr],
                    "circuit_breakers = { max_connections = 2 }",
                ),
            ),
            "web",
        );
        let before = up.requests();
        let mut busy: Vec<Conn> = (0..2).map(|_| Conn::open(addr)).collect();
        for c in &mut busy {
            c.send(b"GET /delay/1000 HTTP/1.1\r\nHost: a\r\n\r\n");
        }
        eventually("two requests in flight", || up.requests() - before == 2);
        let r = get(addr, "/echo");
        assert_eq!(r.status, 503, "{driver}: {}", r.text());
        assert_eq!(
            r.header("x-pilotfish-error"),
            Some("circuit_breaker_max_connections"),
            "{driver}"
        );
        for c in &mut busy {
            assert_eq!(c.read(false).unwrap().status, 200, "{driver}");
        }
        // Both connections are pooled now (still open, still counted):
        // requests reuse them, one after another, and all get through.
        for _ in 0..5 {
            assert_eq!(get(addr, "/echo").status, 200, "{driver}");
        }
        let stats = proxy.stats().total.http;
        assert_eq!(stats.upstream_connects, 2, "{driver}: no third connection");
        proxy.shutdown();
    }

    // An endpoint whose accept queue is full: connects hang (the kernel
    // drops the SYNs), so requests wait for a connection.
    let stuck = blackhole();
    let stuck_addr = stuck.addr;
    for driver in drivers() {
        let (proxy, addr) = start_toml(
            &http_config(
                driver,
                "cluster = \"app\"",
                &cluster(
                    "app",
                    &[stuck_addr],
                    "connect_timeout = \"3s\"\ncircuit_breakers = { max_pending = 1 }",
                ),
            ),
            "web",
        );
        let mut waiting = Conn::open(addr);
        waiting.send(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n");
        eventually("one request waiting for a connect", || {
            proxy.stats().total.http.upstream_connects == 1
        });
        let r = get(addr, "/b");
        assert_eq!(r.status, 503, "{driver}: {}", r.text());
        assert_eq!(
            r.header("x-pilotfish-error"),
            Some("circuit_breaker_max_pending"),
            "{driver}"
        );
        // The waiting one ends with its connect timeout (503, connect failed).
        let w = waiting.read(false).unwrap();
        assert_eq!(w.status, 503, "{driver}");
        assert_eq!(
            w.header("x-pilotfish-error"),
            Some("upstream_connect_failed")
        );
        proxy.shutdown();
    }
}

/// `max_connections` on an HTTP/2 cluster: requests that arrive while the
/// one connection is still being made wait for it and share it, rather
/// than being refused because the connect in flight already counts.
#[test]
fn max_connections_on_an_h2_cluster_multiplexes_instead_of_refusing() {
    let up = HttpUpstream::start();
    for driver in drivers() {
        // B speaks h2c on its listener; A reaches it over h2, one
        // connection at most.
        let (b, b_addr) = start_toml(
            &http_config(driver, "cluster = \"app\"", &cluster("app", &[up.addr], "")),
            "web",
        );
        let (a, a_addr) = start_toml(
            &http_config(
                driver,
                "cluster = \"b\"",
                &cluster(
                    "b",
                    &[b_addr],
                    "protocol = \"h2\"\ncircuit_breakers = { max_connections = 1 }",
                ),
            ),
            "web",
        );
        let clients: Vec<_> = (0..8)
            .map(|_| std::thread::spawn(move || get(a_addr, "/delay/200").status))
            .collect();
        let statuses: Vec<u16> = clients.into_iter().map(|c| c.join().unwrap()).collect();
        assert_eq!(statuses, vec![200; 8], "{driver}");
        let stats = a.stats().total.http;
        assert_eq!(stats.upstream_connects, 1, "{driver}: one h2 connection");
        a.shutdown();
        b.shutdown();
    }
}

/// Circuit breakers per cluster (issue 16 item 2): past `max_requests`
/// in flight, a request gets 503 `circuit_breaker_max_requests` at once;
/// at `max_retries`, a failed attempt is not retried (counted).
#[test]
fn circuit_breakers_cap_requests_and_retries() {
    let up = HttpUpstream::start();
    let (proxy, addr) = start_toml(
        &http_config(
            "auto",
            "cluster = \"app\"",
            &cluster("app", &[up.addr], "circuit_breakers = { max_requests = 2 }"),
        ),
        "web",
    );
    let mut busy: Vec<Conn> = (0..2).map(|_| Conn::open(addr)).collect();
    for c in &mut busy {
        c.send(b"GET /delay/1000 HTTP/1.1\r\nHost: a\r\n\r\n");
    }
    eventually("two requests in flight", || up.requests() == 2);
    let r = get(addr, "/echo");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(
        r.header("x-pilotfish-error"),
        Some("circuit_breaker_max_requests")
    );
    for c in &mut busy {
        assert_eq!(c.read(false).unwrap().status, 200);
    }
    assert_eq!(get(addr, "/echo").status, 200, "room again");
    proxy.shutdown();

    // Retries: the upstream always answers 503, the route retries 503s.
    let sick = HttpUpstream::always(503);
    let route = "[[listeners.routes]]\npath_prefix = \"/\"\ncluster = \"app\"\nretry = { attempts = 3, on = [\"503\"] }";
    for (breaker, tries) in [("", 3), ("circuit_breakers = { max_retries = 0 }", 1)] {
        let before = sick.requests();
        let (proxy, addr) = start_toml(
            &http_config(
                "auto",
                route,
                &cluster(
                    "app",
                    &[sick.addr],
                    &format!(
                        "retry_budget_percent = 100\noutlier = {{ disabled = true }}\n{breaker}"
                    ),
                ),
            ),
            "web",
        );
        assert_eq!(get(addr, "/x").status, 503);
        assert_eq!(sick.requests() - before, tries, "{breaker:?}");
        let refused = proxy.stats().total.http.retries_over_breaker;
        assert_eq!(refused, u64::from(tries == 1), "{breaker:?}");
        proxy.shutdown();
    }
}

/// Trailers cross every hop (issue 12): a chunked request's trailer
/// section reaches the upstream, and an upstream's reaches the client,
/// straight through one proxy (HTTP/1.1 both sides) and through a sidecar
/// pair speaking h2 between them (HTTP/1.1 trailer sections become h2
/// trailer blocks and back). Connection-specific and framing fields in a
/// trailer section are not forwarded, nor, in a request, the fields the
/// proxy vouches for in the head (the caller's identity, forwarding).
#[test]
fn trailers_cross_every_hop_both_ways() {
    use std::io::Write;
    let (log, seen) = std::sync::mpsc::channel::<String>();
    let upstream = serve(move |mut s| loop {
        let head = read_head_raw(&mut s);
        if head.is_empty() {
            return;
        }
        // The chunked body ends with the trailer section's blank line.
        let body = read_head_raw(&mut s);
        if !body.ends_with("\r\n\r\n") {
            return;
        }
        let _ = log.send(body.to_ascii_lowercase());
        let answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Sum: abc\r\nContent-Length: 5\r\nGrpc-Status: 0\r\n\r\n";
        if s.write_all(answer).is_err() {
            return;
        }
    });
    let request = b"POST /up HTTP/1.1\r\nHost: a\r\nTE: trailers\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\nX-Req-Sum: 1\r\nConnection: x\r\nX-Pilotfish-Peer-Identity: spiffe://forged\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n";
    let check = |addr, what: &str| {
        let mut c = Conn::open(addr);
        c.send(request);
        let r = c.read(false).unwrap();
        assert_eq!((r.status, r.text().as_str()), (200, "hello"), "{what}");
        assert_eq!(
            r.trailers,
            vec![
                ("x-sum".to_string(), "abc".to_string()),
                ("grpc-status".to_string(), "0".to_string())
            ],
            "{what}"
        );
        let body = seen.recv_timeout(IO_DEADLINE).expect("the upstream got it");
        assert!(body.starts_with("4\r\nbody\r\n0\r\n"), "{what}: {body:?}");
        assert!(body.contains("x-req-sum: 1\r\n"), "{what}: {body:?}");
        assert!(!body.contains("connection"), "{what}: {body:?}");
        // What the proxy vouches for in the head cannot come in a trailer.
        assert!(!body.contains("forged"), "{what}: {body:?}");
        assert!(!body.contains("6.6.6.6"), "{what}: {body:?}");
    };
    for driver in drivers() {
        let (b, b_addr) = start_to(driver, upstream);
        check(b_addr, &format!("{driver}: one proxy"));
        let (a, a_addr) = start_toml(
            &http_config(
                driver,
                "cluster = \"b\"",
                &cluster("b", &[b_addr], "protocol = \"h2\""),
            ),
            "web",
        );
        check(a_addr, &format!("{driver}: h2 between two proxies"));
        a.shutdown();
        b.shutdown();
    }
}
