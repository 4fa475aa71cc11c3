//! The admin socket: merged and per-core histograms agree with the
//! traffic sent, /metrics parses as Prometheus text and matches the
//! counters, .hgrm round-trips, the socket is 0600 and removed on exit.

mod support;

use std::{os::unix::fs::PermissionsExt, path::Path, time::Duration};

use pilotfish::admin::{client, Server};
use support::{http_client::*, http_upstream::HttpUpstream, *};

fn admin_for(proxy: &pilotfish::Proxy, dir: &Path) -> (Server, std::path::PathBuf) {
    let path = dir.join("admin.sock");
    (admin_server(proxy, Some(path.clone()), None), path)
}

fn get_json(socket: &Path, path: &str) -> serde_json::Value {
    let (status, body) = client::request(socket, "GET", path).unwrap();
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

#[test]
fn merged_histograms_match_per_core_sums_and_the_traffic() {
    let up = HttpUpstream::start();
    let toml = http_config("auto", "cluster = \"app\"", &cluster("app", &[up.addr], ""))
        .replace("workers = 1", "workers = 2");
    let (proxy, addr) = start_toml(&toml, "web");
    let dir = temp_dir("admin");
    let (_server, socket) = admin_for(&proxy, &dir);
    let sent = 60;
    for i in 0..sent {
        // A fresh connection each: the kernel spreads them over both workers.
        let path = if i % 2 == 0 { "/delay/20" } else { "/delay/40" };
        assert_eq!(get(addr, path).status, 200);
    }
    let merged = get_json(
        &socket,
        "/histograms?listener=web&metric=request_total&format=json",
    );
    let merged = &merged[0];
    assert_eq!(merged["count"].as_u64(), Some(sent), "{merged}");
    let per_core: u64 = (0..2)
        .map(|core| {
            get_json(&socket, &format!("/histograms?listener=web&core={core}"))[0]["count"]
                .as_u64()
                .unwrap()
        })
        .sum();
    assert_eq!(per_core, sent, "merged = sum of per-core");
    // Known delays: half at 20 ms, half at 40 ms (plus proxy and scheduling time).
    let p = |want: f64| {
        merged["percentiles_us"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x[0].as_f64() == Some(want))
            .unwrap()[1]
            .as_u64()
            .unwrap()
    };
    assert!((20_000..40_000).contains(&p(50.0)), "p50 {}", p(50.0));
    assert!((40_000..200_000).contains(&p(99.0)), "p99 {}", p(99.0));
    // The upstream's own time shows in time-to-first-byte for the cluster.
    let ttfb = get_json(
        &socket,
        "/histograms?cluster=app&metric=upstream_first_byte",
    );
    assert_eq!(ttfb[0]["count"].as_u64(), Some(sent));
    let stats = get_json(&socket, "/stats");
    assert_eq!(stats["total"]["http"]["requests"].as_u64(), Some(sent));
    assert_eq!(stats["workers"].as_array().unwrap().len(), 2);
    proxy.shutdown();
}

#[test]
fn metrics_parse_as_prometheus_text_and_match_the_counters() {
    let up = HttpUpstream::start();
    let (proxy, addr) = start_toml(
        &http_config(
            "epoll",
            "cluster = \"app\"",
            &cluster("app", &[up.addr], ""),
        ),
        "web",
    );
    let dir = temp_dir("metrics");
    let (_server, socket) = admin_for(&proxy, &dir);
    for _ in 0..7 {
        assert_eq!(get(addr, "/x").status, 200);
    }
    assert_eq!(get(addr, "/status/503").status, 503);
    let (status, text) = client::request(&socket, "GET", "/metrics").unwrap();
    assert_eq!(status, 200);
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid exposition text");
    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum()
    };
    assert_eq!(value("pilotfish_http_requests_total", &[]), 8.0);
    assert_eq!(
        value("pilotfish_http_responses_total", &[("class", "2xx")]),
        7.0
    );
    assert_eq!(
        value("pilotfish_http_responses_total", &[("class", "5xx")]),
        1.0
    );
    assert!(
        scrape
            .docs
            .contains_key("pilotfish_listener_request_duration_seconds"),
        "HELP lines present"
    );
    let hist = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "pilotfish_listener_request_duration_seconds"
                && s.labels.get("listener") == Some("web")
        })
        .expect("a histogram for the listener");
    match &hist.value {
        prometheus_parse::Value::Histogram(buckets) => {
            assert_eq!(
                buckets.last().unwrap().count,
                8.0,
                "+Inf bucket counts every request"
            );
        }
        other => panic!("not a histogram: {other:?}"),
    }
    // A generated answer is counted with who caused it.
    let bad = one(
        addr,
        b"GET /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    );
    assert_eq!(bad.status, 400);
    let (_, text) = client::request(&socket, "GET", "/metrics").unwrap();
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("pilotfish_http_generated_responses_total{")
                && l.contains("reason=\"bad_request\"")
        })
        .expect("a bad_request line");
    assert!(
        line.contains("blame=\"downstream\"") && line.ends_with(" 1"),
        "{line}"
    );
    proxy.shutdown();
}

#[test]
fn hgrm_round_trips_to_the_json_percentiles() {
    let up = HttpUpstream::start();
    let (proxy, addr) = start_toml(
        &http_config(
            "epoll",
            "cluster = \"app\"",
            &cluster("app", &[up.addr], ""),
        ),
        "web",
    );
    let dir = temp_dir("hgrm");
    let (_server, socket) = admin_for(&proxy, &dir);
    let mut c = Conn::open(addr);
    for i in 0..200 {
        c.send(format!("GET /delay/{} HTTP/1.1\r\nHost: a\r\n\r\n", i % 3).as_bytes());
        assert_eq!(c.read(false).unwrap().status, 200);
    }
    let json = get_json(&socket, "/histograms?listener=web");
    let (status, hgrm) =
        client::request(&socket, "GET", "/histograms?listener=web&format=hgrm").unwrap();
    assert_eq!(status, 200, "{hgrm}");
    let rows = pilotfish::metrics::histograms::parse_hgrm(&hgrm);
    assert_eq!(rows.last().unwrap().2, json[0]["count"].as_u64().unwrap());
    for pair in json[0]["percentiles_us"].as_array().unwrap() {
        let (p, us) = (
            pair[0].as_f64().unwrap() / 100.0,
            pair[1].as_u64().unwrap() as f64,
        );
        if p >= 1.0 {
            continue;
        }
        // The hgrm is a step function: the JSON percentile lies between
        // the values of the rows that bracket it.
        let at = rows.iter().position(|r| r.1 >= p).unwrap();
        let above = rows[at].0;
        let below = if at == 0 { 0.0 } else { rows[at - 1].0 };
        let slack = us * 0.002 + 1.0;
        assert!(
            below - slack <= us && us <= above + slack,
            "p{p}: {us} µs not within [{below}, {above}]"
        );
    }
    // reset=true empties: the next read counts only new traffic.
    let _ = client::request(&socket, "POST", "/histograms?listener=web&reset=true").unwrap();
    assert_eq!(
        get_json(&socket, "/histograms?listener=web")[0]["count"].as_u64(),
        Some(0)
    );
    proxy.shutdown();
}

#[test]
fn the_socket_is_private_and_removed_on_exit() {
    let up = HttpUpstream::start();
    let dir = temp_dir("sock");
    let socket = dir.join("run").join("admin.sock");
    let toml = http_config(
        "epoll",
        "cluster = \"app\"",
        &cluster("app", &[up.addr], ""),
    )
    .replace(
        "[runtime]",
        &format!("[admin]\nsocket = \"{}\"\n[runtime]", socket.display()),
    )
    .replace("name = \"web\"", "name = \"app-out\"");
    let mut child = ChildProxy::spawn(&toml);
    child.wait_ready();
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let (status, body) = client::request(&socket, "GET", "/ready").unwrap();
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    let (status, _) = client::request(&socket, "GET", "/live").unwrap();
    assert_eq!(status, 200);
    let (status, _) = client::request(&socket, "POST", "/drain").unwrap();
    assert_eq!(status, 200, "drain through the admin socket");
    let exited = child
        .wait_exit(Duration::from_secs(15))
        .expect("exits after the drain");
    assert!(exited.success());
    assert!(!socket.exists(), "socket removed on exit");
}

#[test]
fn clusters_show_ejected_and_healthy_endpoints_per_core() {
    let good = HttpUpstream::start();
    let bad = HttpUpstream::always(503);
    let toml = http_config(
        "epoll",
        "cluster = \"app\"",
        &cluster("app", &[good.addr, bad.addr], "outlier = { consecutive_failures = 2, base_ejection = \"1m\", max_ejected_percent = 50 }"),
    );
    let (proxy, addr) = start_toml(&toml, "web");
    let dir = temp_dir("clusters");
    let (_server, socket) = admin_for(&proxy, &dir);
    for _ in 0..6 {
        let _ = get(addr, "/x");
    }
    let clusters = get_json(&socket, "/clusters");
    let endpoints = clusters[0]["clusters"][0]["endpoints"]
        .as_array()
        .unwrap()
        .clone();
    let by_addr = |a: std::net::SocketAddr| {
        endpoints
            .iter()
            .find(|e| e["address"] == a.to_string())
            .unwrap()
            .clone()
    };
    assert!(
        by_addr(bad.addr)["ejected_for_ms"].as_u64().is_some(),
        "{endpoints:?}"
    );
    assert!(by_addr(good.addr)["ejected_for_ms"].is_null());
    assert_eq!(by_addr(bad.addr)["ejections"].as_u64(), Some(1));
    assert_eq!(by_addr(good.addr)["idle_pooled"].as_u64(), Some(1));
    proxy.shutdown();
}

#[test]
fn log_level_changes_at_run_time() {
    let up = HttpUpstream::start();
    let dir = temp_dir("loglevel");
    let socket = dir.join("admin.sock");
    let toml = http_config(
        "epoll",
        "cluster = \"app\"",
        &cluster("app", &[up.addr], ""),
    )
    .replace(
        "[runtime]",
        &format!("[admin]\nsocket = \"{}\"\n[runtime]", socket.display()),
    )
    .replace("name = \"web\"", "name = \"app-out\"");
    let mut child = ChildProxy::spawn(&toml);
    child.wait_ready();
    let (status, body) = client::request(&socket, "POST", "/log-level?filter=debug").unwrap();
    assert_eq!((status, body.as_str()), (200, "log filter: debug\n"));
    let (status, _) = client::request(&socket, "POST", "/log-level?filter=[[bad").unwrap();
    assert_eq!(status, 400, "an invalid filter is refused");
    let (status, _) = client::request(&socket, "GET", "/log-level").unwrap();
    assert_eq!(status, 405, "mutations are POST only");
    child.signal(15);
    assert!(child
        .wait_exit(Duration::from_secs(15))
        .is_some_and(|s| s.success()));
}

#[test]
fn access_log_writes_one_line_per_request_from_every_core() {
    let up = HttpUpstream::start();
    let dir = temp_dir("access-log");
    let json_log = dir.join("access.json.log");
    let clf_log = dir.join("access.clf.log");
    let toml = format!(
        "workers = 2\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\naccess_log = {{ path = \"{}\", format = \"json\" }}\n[[listeners.routes]]\nname = \"app\"\npath_prefix = \"/app/\"\ncluster = \"app\"\n[[listeners]]\nname = \"plain\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ncluster = \"app\"\naccess_log = {{ path = \"{}\", format = \"common\" }}\n{}",
        json_log.display(),
        clf_log.display(),
        cluster("app", &[up.addr], "")
    );
    let (proxy, web) = start_toml(&toml, "web");
    let plain = proxy.listener_addr("plain").unwrap();
    for i in 0..40 {
        // Fresh connections: both workers log.
        let path = if i % 4 == 0 { "/nowhere" } else { "/app/x" };
        get(web, path);
    }
    for _ in 0..10 {
        assert_eq!(get(plain, "/q?a=\"b\"").status, 200);
    }
    let stats = proxy.stats();
    proxy.shutdown();

    let text = std::fs::read_to_string(&json_log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 40, "{text}");
    let count = |status: u64| lines.iter().filter(|l| l["status"] == status).count();
    assert_eq!(count(200), 30);
    assert_eq!(count(404), 10);
    let routed = lines.iter().find(|l| l["status"] == 200).unwrap();
    assert_eq!(routed["route"], "app");
    assert_eq!(routed["upstream"], up.addr.to_string());
    assert_eq!(routed["method"], "GET");
    let refused = lines.iter().find(|l| l["status"] == 404).unwrap();
    assert_eq!(refused["error"], "no_route");
    assert_eq!(refused["blame"], "downstream", "{refused}");
    assert!(routed.get("blame").is_none(), "{routed}");
    let workers: std::collections::BTreeSet<u64> = lines
        .iter()
        .map(|l| l["worker"].as_u64().unwrap())
        .collect();
    assert_eq!(workers.len(), 2, "both cores logged: {workers:?}");

    let clf = std::fs::read_to_string(&clf_log).unwrap();
    assert_eq!(clf.lines().count(), 10, "{clf}");
    for line in clf.lines() {
        assert!(
            line.starts_with("127.0.0.1 - - [")
                && line.ends_with("\"GET /q?a=\\x22b\\x22 HTTP/1.1\" 200 -"),
            "{line}"
        );
    }
    assert_eq!(stats.total.access_log_dropped, 0);
}

#[test]
fn the_server_stops_even_when_its_socket_file_was_removed() {
    let up = HttpUpstream::start();
    let toml = http_config(
        "epoll",
        "cluster = \"app\"",
        &cluster("app", &[up.addr], ""),
    );
    let (proxy, _) = start_toml(&toml, "web");
    let dir = temp_dir("admin-removed");
    let (server, socket) = admin_for(&proxy, &dir);
    assert_eq!(client::request(&socket, "GET", "/live").unwrap().0, 200);
    // tmpfiles cleanup, or an operator, removes the file under us.
    std::fs::remove_file(&socket).unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(server);
        let _ = done_tx.send(());
    });
    done_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the admin server stops without its socket file");
    proxy.shutdown();
}

/// Issue 11 item 12: hgrm says its unit (µs) and the real sub-bucket
/// count; any single histogram can be selected (`route=` empty is the
/// listener's total once routes have traffic too); unknown parameters
/// and a GET that would reset are refused.
#[test]
fn any_single_histogram_can_be_selected_and_typos_are_refused() {
    let up = HttpUpstream::start();
    let (proxy, addr) = start_toml(
        &http_config(
            "auto",
            "cluster = \"app\"\n[[listeners.routes]]\nname = \"r\"\npath_prefix = \"/r/\"\ncluster = \"app\"",
            &cluster("app", &[up.addr], ""),
        ),
        "web",
    );
    let dir = temp_dir("hgrm-select");
    let (_server, socket) = admin_for(&proxy, &dir);
    let mut c = Conn::open(addr);
    for path in ["/r/echo", "/r/echo", "/other"] {
        c.send(format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes());
        assert_eq!(c.read(false).unwrap().status, 200);
    }
    let ask = |q: &str| client::request(&socket, "GET", &format!("/histograms?{q}")).unwrap();
    let (status, body) = ask("listener=web&format=hgrm");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("route=r"), "the matches are listed: {body}");
    let (status, total) = ask("listener=web&route=&format=hgrm");
    assert_eq!(status, 200, "{total}");
    assert!(total.contains("Total count    =            3]"), "{total}");
    assert!(total.contains("#[Unit    = microseconds]"), "{total}");
    assert!(total.contains("SubBuckets     =         2048]"), "{total}");
    let (status, route) = ask("listener=web&route=r&format=hgrm");
    assert_eq!(status, 200, "{route}");
    assert!(route.contains("Total count    =            2]"), "{route}");
    let (status, body) = ask("listner=web");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("listner"), "{body}");
    let (status, _) = client::request(&socket, "GET", "/stats?verbose=1").unwrap();
    assert_eq!(status, 400);
    let (status, body) = ask("reset=true");
    assert_eq!(status, 405, "{body}");
    let (status, _) = client::request(&socket, "POST", "/histograms?reset=true").unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        get_json(&socket, "/histograms?listener=web&route=")[0]["count"].as_u64(),
        Some(0)
    );
    proxy.shutdown();
}
