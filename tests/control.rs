//! Live config swaps through the admin socket (`POST /config`): routing
//! changes under continuous traffic with no failed request and no refused
//! connection; an invalid config, a restart-only change and a config one
//! worker cannot prepare all change nothing; the admin TCP listener refuses
//! mutations from a non-loopback peer.

// Test threads are not workers: polling with a short sleep is fine here.
#![allow(clippy::disallowed_methods)]

mod support;

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use pilotfish::admin::{client, Listen, Server, State};
use support::{http_client::*, http_upstream::HttpUpstream, *};

/// A two-worker HTTP config whose only route tags each request with
/// `x-config: {tag}` and sends it to `upstream`; `extra` is appended.
fn tagged_config(bind: SocketAddr, tag: &str, upstream: SocketAddr, extra: &str) -> String {
    format!(
        "workers = 2\ndrain_timeout = \"2s\"\n[[listeners]]\nname = \"web\"\nbind = \"{bind}\"\nprotocol = \"http\"\n[[listeners.routes]]\nname = \"all\"\npath_prefix = \"/\"\ncluster = \"app\"\nrequest_headers = {{ set = {{ \"x-config\" = \"{tag}\" }} }}\n{extra}\n{}",
        cluster("app", &[upstream], "")
    )
}

fn start(toml: &str, dir: &Path) -> (pilotfish::Proxy, Server, std::path::PathBuf, SocketAddr) {
    let (proxy, addr) = start_toml(toml, "web");
    let socket = dir.join("admin.sock");
    let server = admin_server(&proxy, Some(socket.clone()), None);
    (proxy, server, socket, addr)
}

fn post_config(socket: &Path, toml: &str) -> (u16, String) {
    client::request_with_body(socket, "POST", "/config", toml.as_bytes()).unwrap()
}

/// Which config tagged this echoed request, if the response is an echo.
fn tag_of(r: &Response) -> Option<String> {
    let text = r.text();
    let line = text
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("x-config:"))?;
    Some(line.split(':').nth(1)?.trim().to_string())
}

/// Drives traffic until `stop`: keep-alive clients that reconnect when told
/// `connection: close`, and clients that open a connection per request.
/// Every failure (refused connect, error status, lost response) counts.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    /// Responses tagged by the second config.
    seen_two: Arc<AtomicUsize>,
}

impl Load {
    fn start(addr: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed, seen_two) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        let mut threads = Vec::new();
        for keep_alive in [true, true, false, false] {
            let (stop, ok, failed, seen_two) = (
                Arc::clone(&stop),
                Arc::clone(&ok),
                Arc::clone(&failed),
                Arc::clone(&seen_two),
            );
            threads.push(thread::spawn(move || {
                let mut conn: Option<Conn> = None;
                while !stop.load(Ordering::SeqCst) {
                    let c = match conn.take() {
                        Some(c) => c,
                        None => match TcpStream::connect(addr) {
                            Ok(s) => {
                                drop(s);
                                Conn::open(addr)
                            }
                            Err(e) => {
                                eprintln!("connect refused: {e}");
                                failed.fetch_add(1, Ordering::SeqCst);
                                continue;
                            }
                        },
                    };
                    let mut c = c;
                    c.send(b"GET /echo HTTP/1.1\r\nHost: load\r\n\r\n");
                    match c.read(false) {
                        Some(r) if r.status == 200 => {
                            ok.fetch_add(1, Ordering::SeqCst);
                            if tag_of(&r).as_deref() == Some("two") {
                                seen_two.fetch_add(1, Ordering::SeqCst);
                            }
                            let close = r.header("connection") == Some("close");
                            if keep_alive && !close {
                                conn = Some(c);
                            }
                        }
                        other => {
                            eprintln!("failed request: {other:?}");
                            failed.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            }));
        }
        Self {
            stop,
            threads,
            ok,
            failed,
            seen_two,
        }
    }

    fn finish(self) -> (usize, usize, usize) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().unwrap();
        }
        (
            self.ok.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
            self.seen_two.load(Ordering::SeqCst),
        )
    }
}

fn wait_for(count: &AtomicUsize, at_least: usize) {
    let deadline = Instant::now() + IO_DEADLINE;
    while count.load(Ordering::SeqCst) < at_least {
        assert!(Instant::now() < deadline, "traffic stalled");
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn swap_under_load_changes_routing_with_no_failed_request() {
    let (one, two) = (HttpUpstream::start(), HttpUpstream::start());
    let dir = temp_dir("swap");
    let first = tagged_config("127.0.0.1:0".parse().unwrap(), "one", one.addr, "");
    let (proxy, _server, socket, addr) = start(&first, &dir);
    let load = Load::start(addr);
    wait_for(&load.ok, 200);

    // The same listener address (its socket is kept), a new tag and a new
    // upstream, plus a new listener.
    let second = tagged_config(
        addr,
        "two",
        two.addr,
        "[[listeners]]\nname = \"extra\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ncluster = \"app\"",
    );
    let (status, body) = post_config(&socket, &second);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("generation 1"), "{body}");
    assert!(body.contains("listeners added: extra"), "{body}");
    assert!(body.contains("clusters changed: app"), "{body}");

    // apply returned: every worker now gives new connections the new config.
    for _ in 0..20 {
        let r = get(addr, "/echo");
        assert_eq!(tag_of(&r).as_deref(), Some("two"), "{}", r.text());
    }
    let extra = proxy.listener_addr("extra").expect("the new listener");
    assert_eq!(get(extra, "/echo").status, 200);
    wait_for(&load.seen_two, 200);

    // A third config drops the extra listener again.
    let third = tagged_config(addr, "three", two.addr, "");
    let (status, body) = post_config(&socket, &third);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("listeners removed: extra"), "{body}");
    eventually("the removed listener's sockets close", || {
        TcpStream::connect(extra).is_err()
    });
    let ok_before = load.ok.load(Ordering::SeqCst);
    wait_for(&load.ok, ok_before + 200);

    // Swap back and forth while requests are in flight on both workers.
    for round in 0..8 {
        let (tag, upstream) = if round % 2 == 0 {
            ("one", one.addr)
        } else {
            ("three", two.addr)
        };
        let (status, body) = post_config(&socket, &tagged_config(addr, tag, upstream, ""));
        assert_eq!(status, 200, "{body}");
        let ok_before = load.ok.load(Ordering::SeqCst);
        wait_for(&load.ok, ok_before + 100);
    }

    let (ok, failed, seen_two) = load.finish();
    eprintln!("{ok} requests ok, {failed} failed, {seen_two} tagged by the second config");
    assert_eq!(failed, 0, "{failed} of {} requests failed", ok + failed);
    assert!(seen_two > 0 && one.requests() > 0 && two.requests() > 0);
    let config = client::request(&socket, "GET", "/config").unwrap().1;
    assert!(
        config.contains("three"),
        "GET /config shows the running config"
    );
    proxy.shutdown();
}

#[test]
fn invalid_or_restart_only_configs_get_400_and_change_nothing() {
    let up = HttpUpstream::start();
    let dir = temp_dir("swap-invalid");
    let first = tagged_config("127.0.0.1:0".parse().unwrap(), "one", up.addr, "");
    let (proxy, _server, socket, addr) = start(&first, &dir);
    let before = client::request(&socket, "GET", "/config").unwrap().1;

    let broken = first.replace("protocol = \"http\"", "protocol = \"htp\"");
    let (status, body) = post_config(&socket, &broken);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("POST /config:6:"), "names where: {body}");
    assert!(body.contains("protocol"), "names the field: {body}");

    let unknown_cluster = first.replace("cluster = \"app\"", "cluster = \"nope\"");
    let (status, body) = post_config(&socket, &unknown_cluster);
    assert_eq!(status, 400, "{body}");

    let more_workers =
        tagged_config(addr, "two", up.addr, "").replace("workers = 2", "workers = 3");
    let (status, body) = post_config(&socket, &more_workers);
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("restart") && body.contains("workers"),
        "{body}"
    );

    assert_eq!(
        client::request(&socket, "GET", "/config").unwrap().1,
        before
    );
    for _ in 0..10 {
        assert_eq!(tag_of(&get(addr, "/echo")).as_deref(), Some("one"));
    }
    proxy.shutdown();
}

#[test]
fn a_config_one_worker_cannot_prepare_switches_no_worker() {
    let up = HttpUpstream::start();
    let dir = temp_dir("swap-fail");
    let first = tagged_config("127.0.0.1:0".parse().unwrap(), "one", up.addr, "");
    let (proxy, _server, socket, addr) = start(&first, &dir);

    // Worker 1 alone fails to prepare any config with this listener.
    pilotfish::worker::fault::fail_prepare_on(1, "canary");
    let second = tagged_config(
        addr,
        "two",
        up.addr,
        "[[listeners]]\nname = \"canary\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ncluster = \"app\"",
    );
    let (status, body) = post_config(&socket, &second);
    assert_eq!(status, 409, "{body}");
    assert!(
        body.contains("no worker switched") && body.contains("worker 1"),
        "{body}"
    );

    // A real bind failure too: the port is held by another socket, so the
    // swap is refused before any worker is asked.
    let holder = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap();
    let third = tagged_config(
        addr,
        "three",
        up.addr,
        &format!("[[listeners]]\nname = \"taken\"\nbind = \"{taken}\"\nprotocol = \"http\"\ncluster = \"app\""),
    );
    let (status, body) = post_config(&socket, &third);
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("address in use"), "{body}");

    // Fresh connections land on both workers; all still get config one.
    for _ in 0..40 {
        assert_eq!(tag_of(&get(addr, "/echo")).as_deref(), Some("one"));
    }
    let stats: serde_json::Value =
        serde_json::from_str(&client::request(&socket, "GET", "/stats").unwrap().1).unwrap();
    for w in stats["workers"].as_array().unwrap() {
        assert_eq!(w["generation"], 0, "{w}");
        assert!(
            w["counters"]["connections_accepted"].as_u64().unwrap() > 0,
            "{w}"
        );
    }
    assert!(proxy.listener_addr("canary").is_none());
    proxy.shutdown();
}

/// A local address that is not loopback (the first host address the kernel
/// lists in /proc/net/fib_trie), if the machine has one.
fn non_loopback_address() -> Option<std::net::IpAddr> {
    let trie = std::fs::read_to_string("/proc/net/fib_trie").ok()?;
    let lines: Vec<&str> = trie.lines().collect();
    lines.windows(2).find_map(|w| {
        let ip: std::net::IpAddr = w[0].trim().trim_start_matches("|-- ").parse().ok()?;
        (w[1].contains("/32 host LOCAL") && !ip.is_loopback()).then_some(ip)
    })
}

/// Issue 11 item 4: loopback is no credential. The TCP listener serves
/// read-only endpoints to anyone (loopback included) and everything else
/// only with the bearer token; without a token file, never.
#[test]
fn admin_tcp_serves_reads_to_anyone_and_the_rest_only_with_the_token() {
    let up = HttpUpstream::start();
    let first = tagged_config("127.0.0.1:0".parse().unwrap(), "one", up.addr, "");
    let (proxy, _) = start_toml(&first, "web");
    let token = "s3cret-token-of-enough-length";
    for with_token in [false, true] {
        let state = State {
            control: proxy.controller(),
            draining: Arc::new(AtomicBool::new(false)),
            set_log_filter: None,
        };
        let listen = Listen {
            socket: None,
            tcp: Some("0.0.0.0:0".parse().unwrap()),
            tcp_token: with_token.then(|| token.to_string()),
        };
        let server = Server::start(&listen, state).unwrap();
        let port = server.tcp_addr().unwrap().port();
        let ask = |ip: std::net::IpAddr, method: &str, path: &str, auth: &str| -> u16 {
            let mut c = Conn::open(SocketAddr::new(ip, port));
            c.send(
                format!("{method} {path} HTTP/1.1\r\nHost: a\r\n{auth}Content-Length: 0\r\n\r\n")
                    .as_bytes(),
            );
            c.read(false).expect("an answer").status
        };
        let mut ips = vec!["127.0.0.1".parse().unwrap()];
        ips.extend(non_loopback_address());
        for ip in ips {
            for path in ["/live", "/ready", "/metrics", "/histograms"] {
                assert_eq!(ask(ip, "GET", path, ""), 200, "{ip} GET {path}");
            }
            let refused = if with_token { 401 } else { 403 };
            for (method, path) in [
                ("POST", "/drain"),
                ("POST", "/config"),
                ("POST", "/log-level?filter=debug"),
                ("POST", "/histograms?reset=true"),
                ("GET", "/config"),
                ("GET", "/stats"),
                ("GET", "/clusters"),
            ] {
                assert_eq!(ask(ip, method, path, ""), refused, "{ip} {method} {path}");
                let wrong = "Authorization: Bearer s3cret-token-of-enough-lengtH\r\n";
                assert_eq!(
                    ask(ip, method, path, wrong),
                    refused,
                    "{ip} {method} {path}"
                );
            }
            // A GET never resets, with or without a token.
            assert_eq!(ask(ip, "GET", "/histograms?reset=true", ""), 405);
            let good = format!("Authorization: Bearer {token}\r\n");
            if with_token {
                assert_eq!(ask(ip, "GET", "/config", &good), 200);
                // The scheme name is case-insensitive.
                let lower = format!("authorization: bearer {token}\r\n");
                assert_eq!(ask(ip, "GET", "/config", &lower), 200);
                // Routed: an empty config is invalid (400), not forbidden.
                assert_eq!(ask(ip, "POST", "/config", &good), 400);
            } else {
                assert_eq!(
                    ask(ip, "GET", "/config", &good),
                    403,
                    "no token file: never"
                );
            }
        }
        // Refusals are counted, and the proxy was not drained by them.
        let mut c = Conn::open(SocketAddr::new("127.0.0.1".parse().unwrap(), port));
        c.send(b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n");
        let metrics = c.read(false).unwrap().text();
        let reason = if with_token {
            "bad_token"
        } else {
            "not_served"
        };
        let line = metrics
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "pilotfish_admin_tcp_refused_total{{reason=\"{reason}\"}}"
                ))
            })
            .expect("refusal counter");
        let n: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(n >= 14, "{line}");
        assert_eq!(
            get(proxy.listener_addr("web").unwrap(), "/echo").status,
            200
        );
        drop(server);
    }
    proxy.shutdown();
}

#[test]
fn admin_tokens_must_be_private_and_long() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("admin-token");
    let path = dir.join("token");
    std::fs::write(&path, "s3cret-token-of-enough-length\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = pilotfish::admin::read_token(&path).unwrap_err();
    assert!(e.contains("chmod 600"), "{e}");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        pilotfish::admin::read_token(&path).unwrap(),
        "s3cret-token-of-enough-length"
    );
    std::fs::write(&path, "short\n").unwrap();
    assert!(pilotfish::admin::read_token(&path).is_err());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_swap_keeps_the_pools_of_clusters_it_did_not_change() {
    let up = HttpUpstream::start();
    let dir = temp_dir("swap-pool");
    let one_worker = |toml: String| toml.replace("workers = 2", "workers = 1");
    let first = one_worker(tagged_config(
        "127.0.0.1:0".parse().unwrap(),
        "one",
        up.addr,
        "",
    ));
    let (proxy, _server, socket, addr) = start(&first, &dir);
    assert_eq!(tag_of(&get(addr, "/echo")).as_deref(), Some("one"));
    assert_eq!(up.connections(), 1);

    // Only the route changed: the cluster's pooled connection is reused.
    let (status, body) = post_config(
        &socket,
        &one_worker(tagged_config(addr, "two", up.addr, "")),
    );
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains("clusters changed"), "{body}");
    assert_eq!(tag_of(&get(addr, "/echo")).as_deref(), Some("two"));
    assert_eq!(up.connections(), 1, "the unchanged cluster kept its pool");

    // The cluster changed: new state, new pool, a new upstream connection.
    let changed = one_worker(tagged_config(addr, "three", up.addr, ""))
        .replace("endpoints = [", "connect_timeout = \"2s\"\nendpoints = [");
    let (status, body) = post_config(&socket, &changed);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("clusters changed: app"), "{body}");
    assert_eq!(tag_of(&get(addr, "/echo")).as_deref(), Some("three"));
    assert_eq!(up.connections(), 2);
    proxy.shutdown();
}

/// A swap that changes only a cluster's endpoints keeps the state of the
/// endpoints that stay (their pooled connection is reused) and keeps
/// keep-alive clients connected (their next response does not say
/// `connection: close`); a swap that changes the listener closes them.
#[test]
fn an_endpoint_only_swap_keeps_pools_and_keep_alive_connections() {
    let (a, b) = (HttpUpstream::start(), HttpUpstream::start());
    let dir = temp_dir("swap-endpoints");
    let one_worker = |toml: String| toml.replace("workers = 2", "workers = 1");
    let first = one_worker(tagged_config(
        "127.0.0.1:0".parse().unwrap(),
        "one",
        a.addr,
        "",
    ));
    let (proxy, _server, socket, addr) = start(&first, &dir);
    let mut conn = Conn::open(addr);
    let ask = |conn: &mut Conn| {
        conn.send(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n");
        conn.read(false).expect("a response")
    };
    let r = ask(&mut conn);
    assert_eq!((r.status, r.header("connection")), (200, None));
    assert_eq!(a.connections(), 1);

    // The endpoint list grows: endpoint a keeps its pooled connection.
    let both = one_worker(tagged_config(addr, "one", a.addr, "")).replace(
        &format!("endpoints = [\"{}\"]", a.addr),
        &format!("endpoints = [\"{}\", \"{}\"]", a.addr, b.addr),
    );
    assert!(both.contains(&b.addr.to_string()), "{both}");
    let (status, body) = post_config(&socket, &both);
    assert_eq!(status, 200, "{body}");
    for _ in 0..4 {
        let r = ask(&mut conn);
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("connection"),
            None,
            "an endpoint push closed a client"
        );
    }
    assert_eq!(a.connections(), 1, "endpoint a kept its pool");
    assert_eq!(b.connections(), 1, "round robin reached the new endpoint");
    assert!(proxy.stats().total.connections_carried >= 1);

    // The listener's route changes: this connection is told to close.
    let (status, body) = post_config(
        &socket,
        &both.replace("\"x-config\" = \"one\"", "\"x-config\" = \"two\""),
    );
    assert_eq!(status, 200, "{body}");
    let r = ask(&mut conn);
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(
        tag_of(&r).as_deref(),
        Some("one"),
        "served on its generation"
    );
    assert_eq!(tag_of(&get(addr, "/echo")).as_deref(), Some("two"));
    proxy.shutdown();
}

/// HTTP/2 as HTTP/1.1 above: an endpoint-only swap moves an h2c
/// connection to the new generation with no GOAWAY (its next streams are
/// served there), and a swap that changes its listener sends GOAWAY.
#[test]
fn an_endpoint_only_swap_keeps_h2_connections_open() {
    use std::{
        io::{BufRead, BufReader, Write},
        process::{Command, Stdio},
    };
    if !have_py("h2") {
        return;
    }
    let (a, b) = (HttpUpstream::start(), HttpUpstream::start());
    let dir = temp_dir("swap-endpoints-h2");
    let one_worker = |toml: String| toml.replace("workers = 2", "workers = 1");
    let first = one_worker(tagged_config(
        "127.0.0.1:0".parse().unwrap(),
        "one",
        a.addr,
        "",
    ));
    let (proxy, _server, socket, addr) = start(&first, &dir);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/h2_raw.py");
    let mut child = Command::new("timeout")
        .args(["60", "python3", script, "steps", &addr.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut to = child.stdin.take().unwrap();
    let mut from = BufReader::new(child.stdout.take().unwrap());
    let mut step = |line: &str| -> serde_json::Value {
        writeln!(to, "{line}").unwrap();
        to.flush().unwrap();
        let mut out = String::new();
        from.read_line(&mut out).unwrap();
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out:?}"))
    };
    let tag = |r: &serde_json::Value| {
        let body = r["body"].as_str().unwrap_or("").to_ascii_lowercase();
        body.lines()
            .find_map(|l| l.strip_prefix("x-config:").map(|v| v.trim().to_string()))
    };
    let r = step("GET /echo");
    assert_eq!(
        (r["status"].as_u64(), tag(&r).as_deref()),
        (Some(200), Some("one")),
        "{r}"
    );

    // Endpoints change, three times: no GOAWAY, and the connection's next
    // streams reach the new endpoint.
    let both = one_worker(tagged_config(addr, "one", a.addr, "")).replace(
        &format!("endpoints = [\"{}\"]", a.addr),
        &format!("endpoints = [\"{}\", \"{}\"]", a.addr, b.addr),
    );
    for config in [
        &both,
        &first.replace("127.0.0.1:0", &addr.to_string()),
        &both,
    ] {
        let (status, body) = post_config(&socket, config);
        assert_eq!(status, 200, "{body}");
        let waited = step("WAIT 1");
        assert_eq!(waited["goaway"], serde_json::Value::Null, "{waited}");
        assert_eq!(waited["closed"], false, "{waited}");
        for _ in 0..2 {
            let r = step("GET /echo");
            assert_eq!(r["status"].as_u64(), Some(200), "{r}");
        }
    }
    assert!(b.requests() >= 1, "round robin reached the new endpoint");
    assert_eq!(proxy.stats().total.http.h2_connections, 1);
    assert!(proxy.stats().total.connections_carried >= 3);

    // The route changes: GOAWAY (NO_ERROR), the graceful kind.
    let (status, body) = post_config(
        &socket,
        &both.replace("\"x-config\" = \"one\"", "\"x-config\" = \"two\""),
    );
    assert_eq!(status, 200, "{body}");
    let waited = step("WAIT 5");
    assert_eq!(waited["goaway"], "NO_ERROR", "{waited}");
    drop(to);
    let _ = child.wait();
    proxy.shutdown();
}

/// An idle worker sleeps: its mailbox loop wakes for a message, a ping
/// or the once-a-second safety net, not on a timer of its own (it polled
/// every 10 ms, a hundred wakes a second, before the mailbox had a bell).
/// A message is still answered by every worker, both drivers.
#[test]
fn an_idle_worker_sleeps_until_its_mailbox_rings() {
    for driver in ["io_uring", "epoll"] {
        let upstream = HttpUpstream::start();
        let toml = format!(
            "runtime = {{ driver = \"{driver}\" }}\n{}",
            tagged_config("127.0.0.1:0".parse().unwrap(), "a", upstream.addr, "")
        );
        let (proxy, _addr) = start_toml(&toml, "web");
        let lifelines = proxy.lifelines();
        assert_eq!(lifelines.len(), 2);
        // Past start-up's own messages.
        thread::sleep(Duration::from_millis(300));
        let before: Vec<u64> = lifelines.iter().map(|l| l.beats()).collect();
        thread::sleep(Duration::from_millis(800));
        for (l, b) in lifelines.iter().zip(&before) {
            // At most the safety net's one wake in 0.8 s (polling: ~80).
            assert!(
                l.beats() - b <= 1,
                "{driver}: {} wakes while idle",
                l.beats() - b
            );
        }
        // A message wakes every worker, and each answers.
        assert_eq!(
            proxy.histograms(false).len(),
            2,
            "{driver}: every worker answered"
        );
        // A ping wakes a worker too (the watchdog's check).
        let woken = lifelines[0].beats();
        lifelines[0].ping();
        let deadline = Instant::now() + Duration::from_secs(5);
        while lifelines[0].beats() == woken {
            assert!(Instant::now() < deadline, "{driver}: a ping woke no one");
            thread::sleep(Duration::from_millis(5));
        }
        proxy.shutdown();
    }
}
