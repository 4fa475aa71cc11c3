//! The control plane: a real management server (Python grpcio with the
//! official Envoy protos from PyPI, tests/peers/xds_server.py) pushes
//! clusters, endpoints, listeners and routes over ADS; traffic through the
//! proxy follows each push; a bad push is NACKed with the field named and
//! the last good config keeps serving; a restarted server is resumed; a
//! hundred pushes under load fail no request. `.ci/run` installs
//! xds-protos (with its own grpcio and protobuf) into `target/py-xds`, kept
//! apart because it bundles an old copy of the OpenTelemetry protos that
//! would shadow the OTLP receiver's; outside CI a missing one skips (it
//! says so).

#![cfg(feature = "xds")]

mod support;

use std::{
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    path::Path,
    process::{Child, ChildStdin, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc, Arc,
    },
    thread,
    time::{Duration, Instant},
};

use pilotfish::Proxy;
use serde_json::{json, Value};
use support::{http_client, http_upstream::HttpUpstream};

const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/xds_server.py");
/// How long a push may take to be applied and acknowledged.
const EVENT_DEADLINE: Duration = Duration::from_secs(20);

/// Where xds-protos is installed (`pip install --target`).
fn py_path() -> String {
    std::env::var("PILOTFISH_PY_XDS")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/target/py-xds").into())
}

fn have_peers() -> bool {
    support::have_py_in(
        "grpc, envoy.service.discovery.v3.ads_pb2_grpc",
        Some(&py_path()),
    )
}

/// The management server, killed on drop.
struct Mgmt {
    child: Child,
    stdin: ChildStdin,
    events: mpsc::Receiver<Value>,
    /// Events received and not yet taken by a wait.
    log: std::cell::RefCell<Vec<Value>>,
    port: u16,
}

impl Mgmt {
    fn start(port: u16) -> Self {
        Self::start_with(port, &[])
    }

    fn start_with(port: u16, extra: &[&str]) -> Self {
        let mut child = Command::new("python3")
            .args([PEER, "--port", &port.to_string()])
            .args(extra)
            .env("PYTHONPATH", py_path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the management server");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, events) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let first = events.recv_timeout(EVENT_DEADLINE).expect("the port line");
        let port = first["port"].as_u64().expect("a port event") as u16;
        Mgmt {
            child,
            stdin,
            events,
            log: Default::default(),
            port,
        }
    }

    fn set(&mut self, kind: &str, version: &str, resources: Vec<Value>) {
        let line = json!({"op": "set", "type": kind, "version": version, "resources": resources});
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// [`Self::set`] for one node's own snapshot.
    fn set_for(&mut self, node: &str, kind: &str, version: &str, resources: Vec<Value>) {
        let line = json!({"op": "set", "node": node, "type": kind, "version": version, "resources": resources});
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Takes the first event, received before or after this call, that
    /// `pred` accepts and no earlier wait took (the client answers types
    /// in its own order); fails on a script error.
    fn wait(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let mut log = self.log.borrow_mut();
        if let Some(i) = log.iter().position(&pred) {
            return log.remove(i);
        }
        let deadline = Instant::now() + EVENT_DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let e = self.events.recv_timeout(left).unwrap_or_else(|_| {
                let nacks: Vec<_> = log.iter().filter(|e| e["event"] == "nack").collect();
                panic!("timed out waiting for {what}; NACKs meanwhile: {nacks:#?}")
            });
            assert_ne!(e["event"], "script_error", "{e}");
            if pred(&e) {
                return e;
            }
            log.push(e);
        }
    }

    fn ack(&self, kind: &str, version: &str) -> Value {
        self.wait(&format!("ACK of {kind} {version}"), |e| {
            e["event"] == "ack" && e["type"] == kind && e["version"] == version
        })
    }

    fn nack(&self, kind: &str) -> Value {
        self.wait(&format!("NACK of {kind}"), |e| {
            e["event"] == "nack" && e["type"] == kind
        })
    }
}

impl Drop for Mgmt {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn socket(addr: SocketAddr) -> Value {
    json!({"socket_address": {"address": addr.ip().to_string(), "port_value": addr.port()}})
}

fn eds_cluster(name: &str) -> Value {
    json!({
        "name": name,
        "type": "EDS",
        "eds_cluster_config": {"eds_config": {"ads": {}}},
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
    })
}

fn static_cluster(name: &str, endpoint: SocketAddr) -> Value {
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket(endpoint)}}]}],
        },
    })
}

fn assignment(cluster: &str, endpoints: &[SocketAddr]) -> Value {
    let lb: Vec<Value> = endpoints
        .iter()
        .map(|a| json!({"endpoint": {"address": socket(*a)}}))
        .collect();
    json!({"cluster_name": cluster, "endpoints": [{"lb_endpoints": lb}]})
}

fn http_listener(name: &str, route_config: &str) -> Value {
    json!({
        "name": name,
        "address": socket("127.0.0.1:0".parse().unwrap()),
        "traffic_direction": "INBOUND",
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": name,
                "rds": {"route_config_name": route_config, "config_source": {"ads": {}}},
                "http_filters": [{
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                }],
            },
        }]}],
    })
}

fn route_config(name: &str, routes: Vec<Value>) -> Value {
    json!({"name": name, "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]})
}

fn prefix_route(prefix: &str, cluster: &str) -> Value {
    json!({"match": {"prefix": prefix}, "route": {"cluster": cluster, "timeout": "5s"}})
}

/// An in-process sidecar whose config is `[xds]` and nothing else, with
/// its control-plane client; `delta`: the incremental protocol.
fn sidecar(server: u16, delta: bool) -> (Proxy, pilotfish::xds::ads::Client) {
    let text = format!(
        r#"workers = 1
[xds]
server = "127.0.0.1:{server}"
node_id = "sidecar~127.0.0.1~test.default~default.svc.cluster.local"
cluster = "frontend"
delta = {delta}
"#
    );
    let config = pilotfish::Config::parse("bootstrap.toml", &text).unwrap();
    let xds = config.xds.clone().unwrap();
    let proxy = Proxy::start(config).unwrap();
    let controller = proxy.controller();
    controller.set_base(Path::new("bootstrap.toml"), &text);
    let client = pilotfish::xds::ads::spawn(xds, controller).unwrap();
    (proxy, client)
}

/// An in-process sidecar from a config `text` with `[xds]`, and its
/// control-plane client.
fn start_with_xds(text: &str) -> (Proxy, pilotfish::xds::ads::Client) {
    let config = pilotfish::Config::parse("bootstrap.toml", text).unwrap();
    let proxy = Proxy::start(config.clone()).unwrap();
    proxy
        .controller()
        .set_base(Path::new("bootstrap.toml"), text);
    let client =
        pilotfish::xds::ads::spawn(config.xds.clone().unwrap(), proxy.controller()).unwrap();
    (proxy, client)
}

/// A management server over TLS, requiring a client certificate from
/// `ca`, its own certificate (from `ca`) naming `istiod.mesh.local`.
fn tls_mgmt(ca: &support::pki::TestCa, dir: &Path) -> Mgmt {
    let server_dir = dir.join("server");
    support::pki::leaf(ca, "spiffe://mesh.local/ns/istio-system/sa/istiod", |p| {
        p.subject_alt_names.push(rcgen::SanType::DnsName(
            "istiod.mesh.local".try_into().unwrap(),
        ));
    })
    .write(&server_dir, &ca.pem);
    let arg = |f: &str| server_dir.join(f).display().to_string();
    let (cert, key, ca_file) = (arg("cert.pem"), arg("key.pem"), arg("ca.pem"));
    Mgmt::start_with(
        0,
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--client-ca",
            &ca_file,
        ],
    )
}

fn listener_addr(proxy: &Proxy, name: &str) -> Option<SocketAddr> {
    proxy
        .listeners()
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, a)| a)
}

/// The first push of every type, acknowledged; returns the listener.
fn initial_push(m: &mut Mgmt, proxy: &Proxy, endpoint: SocketAddr) -> SocketAddr {
    m.set("clusters", "c1", vec![eds_cluster("orders")]);
    m.set("endpoints", "e1", vec![assignment("orders", &[endpoint])]);
    m.set("listeners", "l1", vec![http_listener("inbound", "r1")]);
    m.set(
        "routes",
        "r1",
        vec![route_config("r1", vec![prefix_route("/", "orders")])],
    );
    m.ack("clusters", "c1");
    m.ack("endpoints", "e1");
    m.ack("listeners", "l1");
    m.ack("routes", "r1");
    listener_addr(proxy, "inbound").expect("the pushed listener serves")
}

#[test]
fn pushes_drive_traffic_and_a_bad_push_is_refused() {
    pushes_drive_traffic(false);
}

#[test]
fn delta_pushes_drive_traffic_and_a_bad_push_is_refused() {
    pushes_drive_traffic(true);
}

fn pushes_drive_traffic(delta: bool) {
    if !have_peers() {
        return;
    }
    let a = HttpUpstream::start();
    let b = HttpUpstream::start();
    let mut m = Mgmt::start(0);
    let (proxy, _client) = sidecar(m.port, delta);
    let first = m.wait("the first request", |e| e["event"] == "request");
    assert_eq!(
        first["node"],
        "sidecar~127.0.0.1~test.default~default.svc.cluster.local"
    );
    assert_eq!(first["cluster"], "frontend");
    let addr = initial_push(&mut m, &proxy, a.addr);
    let r = http_client::get(addr, "/hello");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "ok /hello");
    assert_eq!((a.requests(), b.requests()), (1, 0));

    // Endpoints move: traffic follows.
    m.set("endpoints", "e2", vec![assignment("orders", &[b.addr])]);
    m.ack("endpoints", "e2");
    assert_eq!(http_client::get(addr, "/moved").status, 200);
    assert_eq!((a.requests(), b.requests()), (1, 1));

    // A route to a second (static) cluster.
    m.set(
        "clusters",
        "c2",
        vec![eds_cluster("orders"), static_cluster("billing", a.addr)],
    );
    m.ack("clusters", "c2");
    m.set(
        "routes",
        "r2",
        vec![route_config(
            "r1",
            vec![
                prefix_route("/billing", "billing"),
                prefix_route("/", "orders"),
            ],
        )],
    );
    m.ack("routes", "r2");
    assert_eq!(http_client::get(addr, "/billing/x").status, 200);
    assert_eq!((a.requests(), b.requests()), (2, 1));
    assert_eq!(http_client::get(addr, "/other").status, 200);
    assert_eq!((a.requests(), b.requests()), (2, 2));

    // What Pilotfish cannot honour is refused, naming the field; the
    // last good config keeps serving.
    let mut maglev = eds_cluster("orders");
    maglev["lb_policy"] = json!("MAGLEV");
    m.set(
        "clusters",
        "c3",
        vec![maglev, static_cluster("billing", a.addr)],
    );
    let nack = m.nack("clusters");
    let detail = nack["detail"].as_str().unwrap();
    assert!(
        detail.contains("\"orders\"") && detail.contains("lb_policy"),
        "{detail}"
    );
    if !delta {
        assert_eq!(
            nack["version"], "c2",
            "a NACK carries the last good version"
        );
    }
    let mut tls = static_cluster("billing", a.addr);
    tls["transport_socket"] = json!({"name": "envoy.transport_sockets.tls"});
    m.set("clusters", "c4", vec![eds_cluster("orders"), tls]);
    let detail = m.nack("clusters")["detail"].as_str().unwrap().to_string();
    assert!(detail.contains("transport_socket"), "{detail}");
    // A route to a cluster that does not exist fails validation.
    m.set(
        "routes",
        "r3",
        vec![route_config("r1", vec![prefix_route("/", "nowhere")])],
    );
    let detail = m.nack("routes")["detail"].as_str().unwrap().to_string();
    assert!(detail.contains("nowhere"), "{detail}");
    assert_eq!(http_client::get(addr, "/still").status, 200);
    assert_eq!((a.requests(), b.requests()), (2, 3));

    // The admin socket shows the pushed resources, the versions, and the
    // counts of accepted and refused pushes.
    let dir = support::temp_dir("xds-admin");
    let sock = dir.join("admin.sock");
    let _admin = support::admin_server(&proxy, Some(sock.clone()), None);
    let (status, body) = pilotfish::admin::client::request(&sock, "GET", "/config").unwrap();
    assert_eq!(status, 200, "{body}");
    let config: Value = serde_json::from_str(&body).unwrap();
    let plane = &config["dynamic"]["control_plane"];
    assert_eq!(plane["connected"], true, "{plane}");
    assert_eq!(plane["types"]["clusters"]["version"], "c2");
    assert_eq!(plane["types"]["clusters"]["rejected"], 2);
    assert_eq!(plane["types"]["routes"]["rejected"], 1);
    assert_eq!(plane["types"]["endpoints"]["version"], "e2");
    let names: Vec<&str> = config["dynamic"]["resources"]["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["billing", "orders"]);
    assert!(
        config["clusters"].as_array().unwrap().len() == 2,
        "running config too"
    );
    let (_, metrics) = pilotfish::admin::client::request(&sock, "GET", "/metrics").unwrap();
    for line in [
        "pilotfish_xds_connected 1",
        "pilotfish_xds_updates_total{type=\"clusters\",result=\"accepted\"} 2",
        "pilotfish_xds_updates_total{type=\"clusters\",result=\"rejected\"} 2",
        "pilotfish_xds_resources{type=\"clusters\"} 2",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in /metrics"
        );
    }
    assert!(metrics.contains("pilotfish_xds_seconds_since_update "));

    // A listener removed stops serving; clusters scaled to zero answer 503.
    m.set("endpoints", "e3", vec![assignment("orders", &[])]);
    m.ack("endpoints", "e3");
    let r = http_client::get(addr, "/empty");
    assert_eq!(r.status, 503, "{}", r.text());
    m.set("listeners", "l2", vec![]);
    m.ack("listeners", "l2");
    assert!(listener_addr(&proxy, "inbound").is_none());
    assert!(std::net::TcpStream::connect(addr).is_err());
}

#[test]
fn a_restarted_server_is_resumed_and_traffic_is_unaffected_meanwhile() {
    restarted_server(false);
}

#[test]
fn a_restarted_delta_server_is_resumed_from_the_versions_held() {
    restarted_server(true);
}

fn restarted_server(delta: bool) {
    if !have_peers() {
        return;
    }
    let a = HttpUpstream::start();
    let mut m = Mgmt::start(0);
    let port = m.port;
    let (proxy, _client) = sidecar(port, delta);
    let addr = initial_push(&mut m, &proxy, a.addr);
    assert_eq!(http_client::get(addr, "/before").status, 200);
    drop(m);
    // The server is gone: the last good config keeps serving.
    support::eventually("the client to notice", || {
        !proxy.controller().xds_status().report().connected
    });
    for i in 0..20 {
        assert_eq!(http_client::get(addr, &format!("/gone/{i}")).status, 200);
    }
    // Back on the same port: the client reconnects and says what it holds.
    let mut m = Mgmt::start(port);
    let resumed = m.wait("a resuming CDS request", |e| {
        e["event"] == "request" && e["type"] == "clusters" && e["nonce"] == ""
    });
    let eds = m.wait("a resuming EDS request", |e| {
        e["event"] == "request" && e["type"] == "endpoints" && e["nonce"] == ""
    });
    assert_eq!(eds["names"], json!(["orders"]));
    if delta {
        // Every resource held, by name, with the version it came with.
        let held = resumed["initial"].as_object().unwrap();
        assert_eq!(held.keys().collect::<Vec<_>>(), ["orders"], "{resumed}");
        assert!(eds["initial"]["orders"].is_string(), "{eds}");
    } else {
        assert_eq!(resumed["version"], "c1", "{resumed}");
        assert_eq!(eds["version"], "e1");
    }
    // The new server's state is what it is told: a fresh push applies.
    let b = HttpUpstream::start();
    m.set("clusters", "c1", vec![eds_cluster("orders")]);
    m.set("endpoints", "e9", vec![assignment("orders", &[b.addr])]);
    m.ack("endpoints", "e9");
    assert_eq!(http_client::get(addr, "/after").status, 200);
    assert_eq!(b.requests(), 1);
    assert!(proxy.controller().xds_status().report().connects >= 2);
}

#[test]
fn a_hundred_pushes_under_load_fail_no_request() {
    hundred_pushes_under_load(false);
}

#[test]
fn a_hundred_delta_pushes_under_load_fail_no_request() {
    hundred_pushes_under_load(true);
}

fn hundred_pushes_under_load(delta: bool) {
    if !have_peers() {
        return;
    }
    let a = HttpUpstream::start();
    let b = HttpUpstream::start();
    let mut m = Mgmt::start(0);
    let (proxy, _client) = sidecar(m.port, delta);
    let addr = initial_push(&mut m, &proxy, a.addr);
    // A second cluster for the route pushes to split traffic with.
    let w = HttpUpstream::start();
    m.set(
        "clusters",
        "c2",
        vec![eds_cluster("orders"), static_cluster("billing", w.addr)],
    );
    m.ack("clusters", "c2");
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let closes = Arc::new(AtomicUsize::new(0));
    let load: Vec<_> = (0..2)
        .map(|c| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            let closes = closes.clone();
            thread::spawn(move || {
                // Keep-alive on one connection, a new connection every 50
                // and whenever the proxy says `Connection: close` (it does
                // on connections of a config generation a push retired).
                let mut conn = http_client::Conn::open(addr);
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    if n.is_multiple_of(50) {
                        conn = http_client::Conn::open(addr);
                    }
                    conn.send(format!("GET /load/{c}/{n} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
                    match conn.read(false) {
                        Some(r) if r.status == 200 => {
                            if r.header("connection") == Some("close") {
                                closes.fetch_add(1, Ordering::SeqCst);
                                conn = http_client::Conn::open(addr);
                            }
                            ok.fetch_add(1, Ordering::SeqCst)
                        }
                        other => {
                            eprintln!("failed: {:?}", other.map(|r| (r.status, r.text())));
                            failed.fetch_add(1, Ordering::SeqCst);
                            conn = http_client::Conn::open(addr);
                            0
                        }
                    };
                }
            })
        })
        .collect();
    for i in 0..100 {
        let version = format!("p{i}");
        match i % 4 {
            // Endpoints churn between one, the other and both.
            0 => m.set("endpoints", &version, vec![assignment("orders", &[b.addr])]),
            1 => m.set(
                "endpoints",
                &version,
                vec![assignment("orders", &[a.addr, b.addr])],
            ),
            // Weights move between the two clusters; each route push
            // differs (a delta server sends only changes).
            2 => m.set(
                "routes",
                &version,
                vec![route_config(
                    "r1",
                    vec![json!({"match": {"prefix": "/"}, "route": {"weighted_clusters": {"clusters": [
                        {"name": "orders", "weight": 1 + i % 7},
                        {"name": "billing", "weight": 1 + (i / 4) % 5},
                    ]}}})],
                )],
            ),
            _ => m.set("endpoints", &version, vec![assignment("orders", &[a.addr])]),
        }
        let kind = if i % 4 == 2 { "routes" } else { "endpoints" };
        m.ack(kind, &version);
    }
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.join().unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    eprintln!("{ok} requests across 100 pushes, {failed} failed");
    assert!(ok > 100, "the load ran ({ok} requests)");
    assert_eq!(failed, 0);
    assert!(a.requests() > 0 && b.requests() > 0);
    assert!(w.requests() > 0, "the weighted routes split traffic");
    // Endpoint pushes keep the listener as it was: its keep-alive
    // connections move to the new generation. Route pushes change the
    // listener, and close each client's connection once (25 pushes, 2
    // clients).
    let closes = closes.load(Ordering::SeqCst);
    let carried = proxy.stats().total.connections_carried;
    eprintln!("{closes} connection: close answers, {carried} connections carried");
    assert!(
        closes <= 25 * 2,
        "{closes} closes: endpoint pushes closed connections"
    );
    assert!(
        carried > 0,
        "no connection was carried to a newer generation"
    );
}

const GRPC_PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/grpc_peer.py");
const SIDECAR_NODE: &str = "sidecar~127.0.0.1~test.default~default.svc.cluster.local";

/// Runs `grpc_peer.py xds-unary TARGET` with `env`; returns its JSON line.
fn grpc_unary(target: &str, env: &[(&str, &str)]) -> Value {
    let out = Command::new("python3")
        .args([GRPC_PEER, "xds-unary", target])
        .env("PYTHONPATH", py_path())
        .envs(env.iter().copied())
        .stderr(Stdio::inherit())
        .output()
        .expect("run the gRPC client");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or("{}"))
        .unwrap_or_else(|_| json!({"raw": text}))
}

/// Keeps the test server honest: gRPC's own xDS client (grpcio's, which
/// nobody here wrote) consumes the same cluster and endpoint snapshot as
/// Pilotfish does, each with its node's own listener and routes, and both
/// reach the same gRPC server.
#[test]
fn grpcs_own_xds_client_consumes_the_same_snapshots() {
    if !have_peers() {
        return;
    }
    let mut server = Command::new("python3")
        .args([GRPC_PEER, "server"])
        .env("PYTHONPATH", py_path())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the gRPC server");
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let grpc_addr: SocketAddr = format!("127.0.0.1:{}", line.trim()).parse().unwrap();
    struct Kill(Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _server = Kill(server);

    let mut m = Mgmt::start(0);
    let (proxy, _client) = sidecar(m.port, false);
    let mut cluster = eds_cluster("orders-cluster");
    cluster["typed_extension_protocol_options"] = json!({
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    });
    m.set("clusters", "c1", vec![cluster]);
    m.set(
        "endpoints",
        "e1",
        vec![json!({"cluster_name": "orders-cluster", "endpoints": [{
            "locality": {"region": "r1", "zone": "z1"},
            "load_balancing_weight": 1,
            "lb_endpoints": [{"endpoint": {"address": socket(grpc_addr)}}],
        }]})],
    );
    // Each node's own front: a sidecar listener for Pilotfish, an API
    // listener (a client-side HttpConnectionManager) for gRPC.
    m.set_for(
        SIDECAR_NODE,
        "listeners",
        "pf-l1",
        vec![http_listener("inbound", "pf-routes")],
    );
    m.set_for(
        SIDECAR_NODE,
        "routes",
        "pf-r1",
        vec![route_config(
            "pf-routes",
            vec![prefix_route("/", "orders-cluster")],
        )],
    );
    let router = json!({"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}});
    m.set_for(
        "grpc-client",
        "listeners",
        "g-l1",
        vec![json!({"name": "orders", "api_listener": {"api_listener": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "rds": {"route_config_name": "grpc-routes", "config_source": {"ads": {}}},
            "http_filters": [router],
        }}})],
    );
    m.set_for(
        "grpc-client",
        "routes",
        "g-r1",
        vec![
            json!({"name": "grpc-routes", "virtual_hosts": [{"name": "v", "domains": ["orders"],
            "routes": [{"match": {"prefix": ""}, "route": {"cluster": "orders-cluster"}}]}]}),
        ],
    );
    m.ack("clusters", "c1");
    m.ack("endpoints", "e1");
    m.ack("listeners", "pf-l1");
    m.ack("routes", "pf-r1");
    let through_pilotfish = listener_addr(&proxy, "inbound").unwrap();
    let r = grpc_unary(&through_pilotfish.to_string(), &[]);
    assert_eq!(r["unary"], "via-xds", "through Pilotfish: {r}");

    let dir = support::temp_dir("grpc-xds");
    let bootstrap = dir.join("bootstrap.json");
    std::fs::write(
        &bootstrap,
        json!({
            "xds_servers": [{"server_uri": format!("127.0.0.1:{}", m.port),
                             "channel_creds": [{"type": "insecure"}],
                             "server_features": ["xds_v3"]}],
            "node": {"id": "grpc-client", "cluster": "grpc", "locality": {"region": "r1", "zone": "z1"}},
        })
        .to_string(),
    )
    .unwrap();
    let r = grpc_unary(
        "xds:///orders",
        &[("GRPC_XDS_BOOTSTRAP", bootstrap.to_str().unwrap())],
    );
    assert_eq!(r["unary"], "via-xds", "gRPC's own xDS client: {r}");
    // It asked for and acknowledged the very snapshot Pilotfish runs on.
    for (kind, version) in [
        ("listeners", "g-l1"),
        ("routes", "g-r1"),
        ("clusters", "c1"),
        ("endpoints", "e1"),
    ] {
        m.wait(&format!("gRPC's ACK of {kind} {version}"), |e| {
            e["event"] == "ack"
                && e["node"] == "grpc-client"
                && e["type"] == kind
                && e["version"] == version
        });
    }
}

/// The stream to the management server is mutual TLS with the sidecar's
/// own SPIFFE certificate (`[xds] tls`): the server sees the identity, and
/// the sidecar checks the server's name.
#[test]
fn the_stream_to_the_management_server_can_be_mutual_tls() {
    if !have_peers() {
        return;
    }
    use support::pki::{leaf, new_ca, tls_table, FRONTEND};
    let dir = support::temp_dir("xds-mtls");
    let ca = new_ca("mesh.local");
    let sidecar_dir = dir.join("sidecar");
    leaf(&ca, FRONTEND, |_| {}).write(&sidecar_dir, &ca.pem);
    let mut m = tls_mgmt(&ca, &dir);
    let text = format!(
        r#"workers = 1
{tls}
[xds]
server = "localhost:{port}"
node_id = "mtls-node"
tls = {{ server_name = "istiod.mesh.local" }}
"#,
        tls = tls_table(&sidecar_dir),
        port = m.port
    );
    let (proxy, _client) = start_with_xds(&text);
    let opened = m.wait("a TLS stream", |e| {
        e["event"] == "stream" && e["open"] == true
    });
    let sans = opened["peer"]["x509_subject_alternative_name"].to_string();
    assert!(
        sans.contains(FRONTEND),
        "the server saw the sidecar's identity: {opened}"
    );
    let a = HttpUpstream::start();
    let addr = initial_push(&mut m, &proxy, a.addr);
    assert_eq!(http_client::get(addr, "/over-mtls").status, 200);

    // A server whose certificate does not carry the expected name is
    // refused: nothing is taken from it.
    let wrong = format!(
        "{}tls = {{ server_name = \"other.mesh.local\" }}\n",
        text.split("tls = {").next().unwrap()
    );
    let config = pilotfish::Config::parse("wrong.toml", &wrong).unwrap();
    let other = Proxy::start(config.clone()).unwrap();
    other.controller().set_base(Path::new("wrong.toml"), &wrong);
    let _refused =
        pilotfish::xds::ads::spawn(config.xds.clone().unwrap(), other.controller()).unwrap();
    support::eventually("the client to give up on the wrong name", || {
        other
            .controller()
            .xds_status()
            .report()
            .last_error
            .is_some_and(|e| e.contains("connect") || e.contains("stream"))
    });
    assert!(!other.controller().xds_status().report().connected);
    assert!(
        other.listeners().is_empty(),
        "nothing taken from the wrong server"
    );
}

/// An SDS secret holding a certificate chain and key, inline.
fn certificate_secret(name: &str, leaf: &support::pki::Leaf) -> Value {
    json!({"name": name, "tls_certificate": {
        "certificate_chain": {"inline_string": leaf.cert_pem},
        "private_key": {"inline_string": leaf.key_pem},
    }})
}

/// An SDS secret holding a trust bundle, inline.
fn bundle_secret(name: &str, pem: &str) -> Value {
    json!({"name": name, "validation_context": {"trusted_ca": {"inline_string": pem}}})
}

/// One request over a new mTLS connection; Ok(the server's serial).
fn tls_request(
    addr: SocketAddr,
    client: &Arc<rustls::ClientConfig>,
    path: &str,
) -> Result<String, String> {
    use std::io::Read;
    let mut s = support::pki::tls_connect(addr, Arc::clone(client))?;
    let serial = support::pki::server_serial(&s);
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: o\r\nconnection: close\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    if answer.starts_with(b"HTTP/1.1 200") {
        Ok(serial)
    } else {
        Err(format!("answered {:?}", String::from_utf8_lossy(&answer)))
    }
}

#[test]
fn pushed_certificates_rotate_the_identity_under_load() {
    pushed_certificates(false);
}

#[test]
fn delta_pushed_certificates_rotate_the_identity_under_load() {
    pushed_certificates(true);
}

/// SDS: the workload certificate and trust bundle come from the control
/// plane. A hundred certificate pushes under mTLS load fail no request, each
/// new handshake after an ACK presents the pushed certificate, a bundle
/// push changes whom the listener accepts, and a bad secret is NACKed
/// naming the field while the material in use keeps serving.
fn pushed_certificates(delta: bool) {
    use support::pki::{client_config, leaf, new_ca, tls_table, FRONTEND, ORDERS};
    if !have_peers() {
        return;
    }
    let dir = support::temp_dir(if delta { "xds-sds-delta" } else { "xds-sds" });
    let (ca1, ca2) = (new_ca("mesh.local one"), new_ca("mesh.local two"));
    let bootstrap = leaf(&ca1, ORDERS, |_| {});
    bootstrap.write(&dir, &ca1.pem);
    let app = HttpUpstream::start();
    // Secrets are taken only from a server that proved who it is.
    let mut m = tls_mgmt(&ca1, &dir);
    let text = format!(
        r#"workers = 1
{tls}
[[listeners]]
name = "inbound"
bind = "127.0.0.1:0"
protocol = "http"
cluster = "app"
tls = {{ require_client_cert = true }}
[[clusters]]
name = "app"
endpoints = ["{app}"]
[xds]
server = "localhost:{port}"
node_id = "sds-node"
delta = {delta}
resources = ["secrets"]
tls = {{ server_name = "istiod.mesh.local" }}
"#,
        tls = tls_table(&dir),
        app = app.addr,
        port = m.port,
    );
    let (proxy, _client) = start_with_xds(&text);
    let asked = m.wait("the SDS request", |e| {
        e["event"] == "request" && e["type"] == "secrets"
    });
    assert_eq!(asked["names"], json!(["ROOTCA", "default"]), "{asked}");
    let addr = listener_addr(&proxy, "inbound").unwrap();
    let both = format!("{}{}", ca1.pem, ca2.pem);
    let client1 = client_config(&both, Some(&leaf(&ca1, FRONTEND, |_| {})), ORDERS);
    let client2 = client_config(&both, Some(&leaf(&ca2, FRONTEND, |_| {})), ORDERS);
    assert_eq!(tls_request(addr, &client1, "/"), Ok(bootstrap.serial()));
    assert!(
        tls_request(addr, &client2, "/").is_err(),
        "CA two is not trusted yet"
    );
    assert_eq!(proxy.controller().tls_status().unwrap().source, "files");

    // Load: new mTLS connections, one request each, and one keep-alive
    // connection opened before the first push.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut load = Vec::new();
    for _ in 0..2 {
        let (stop, ok, failed, client) = (
            stop.clone(),
            ok.clone(),
            failed.clone(),
            Arc::clone(&client1),
        );
        load.push(thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match tls_request(addr, &client, "/load") {
                    Ok(_) => ok.fetch_add(1, Ordering::SeqCst),
                    Err(e) => {
                        eprintln!("failed: {e}");
                        failed.fetch_add(1, Ordering::SeqCst)
                    }
                };
            }
        }));
    }
    let mut long = support::pki::tls_connect(addr, Arc::clone(&client1)).unwrap();
    let mut kept_alive = 0;
    let mut keep_alive_request = |long: &mut support::pki::TlsConn| {
        use std::io::Read;
        long.write_all(b"GET /long HTTP/1.1\r\nHost: o\r\n\r\n")
            .unwrap();
        // HttpUpstream answers "ok <path>" with a content-length.
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        while !got.ends_with(b"ok /long") {
            let n = long.read(&mut buf).unwrap();
            assert!(n > 0, "the keep-alive connection closed");
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got.starts_with(b"HTTP/1.1 200"));
        kept_alive += 1;
    };
    keep_alive_request(&mut long);

    let pushes = 100;
    let mut serial = String::new();
    for i in 1..=pushes {
        let next = leaf(&ca1, ORDERS, |_| {});
        let version = format!("s{i}");
        m.set(
            "secrets",
            &version,
            vec![
                certificate_secret("default", &next),
                bundle_secret("ROOTCA", &ca1.pem),
            ],
        );
        m.ack("secrets", &version);
        serial = next.serial();
        assert_eq!(
            tls_request(addr, &client1, "/after-push").as_deref(),
            Ok(serial.as_str()),
            "a handshake after the ACK presents push {i}"
        );
        keep_alive_request(&mut long);
    }
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.join().unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    println!("{pushes} certificate pushes: {ok} mTLS requests ok, {failed} failed, {kept_alive} on one kept-alive connection");
    assert!(ok > 0);
    assert_eq!(failed, 0);
    let status = proxy.controller().tls_status().unwrap();
    assert_eq!(
        (status.source, status.serial.as_str()),
        ("xds", serial.as_str())
    );

    // A bad secret is refused, naming it and the field; the material in
    // use keeps serving.
    let other = leaf(&ca1, ORDERS, |_| {});
    let mut mismatched = certificate_secret("default", &leaf(&ca1, ORDERS, |_| {}));
    mismatched["tls_certificate"]["private_key"]["inline_string"] = json!(other.key_pem);
    m.set(
        "secrets",
        "bad-key",
        vec![mismatched, bundle_secret("ROOTCA", &ca1.pem)],
    );
    let detail = m.nack("secrets")["detail"].as_str().unwrap().to_string();
    assert!(
        detail.contains("Secret \"default\" tls_certificate.private_key")
            && detail.contains("does not match"),
        "{detail}"
    );
    let by_path = json!({"name": "default", "tls_certificate": {
        "certificate_chain": {"filename": "/etc/certs/cert.pem"},
        "private_key": {"inline_string": other.key_pem},
    }});
    m.set(
        "secrets",
        "by-path",
        vec![by_path, bundle_secret("ROOTCA", &ca1.pem)],
    );
    let detail = m.nack("secrets")["detail"].as_str().unwrap().to_string();
    assert!(
        detail.contains("tls_certificate.certificate_chain.filename"),
        "{detail}"
    );
    assert_eq!(
        tls_request(addr, &client1, "/").as_deref(),
        Ok(serial.as_str())
    );
    // Another workload's certificate, however well signed, is refused: a
    // control plane rotates this identity, it does not change it.
    m.set(
        "secrets",
        "other-identity",
        vec![
            certificate_secret("default", &leaf(&ca1, FRONTEND, |_| {})),
            bundle_secret("ROOTCA", &ca1.pem),
        ],
    );
    let detail = m.nack("secrets")["detail"].as_str().unwrap().to_string();
    assert!(detail.contains("but this workload is"), "{detail}");
    assert_eq!(
        tls_request(addr, &client1, "/").as_deref(),
        Ok(serial.as_str())
    );

    // The trust bundle follows its pushes: CA two added, then CA one
    // dropped (with a certificate from CA two).
    m.set(
        "secrets",
        "both-cas",
        vec![
            certificate_secret("default", &leaf(&ca1, ORDERS, |_| {})),
            bundle_secret("ROOTCA", &both),
        ],
    );
    m.ack("secrets", "both-cas");
    assert!(
        tls_request(addr, &client2, "/").is_ok(),
        "CA two is trusted now"
    );
    let moved = leaf(&ca2, ORDERS, |_| {});
    m.set(
        "secrets",
        "ca-two",
        vec![
            certificate_secret("default", &moved),
            bundle_secret("ROOTCA", &ca2.pem),
        ],
    );
    m.ack("secrets", "ca-two");
    assert_eq!(
        tls_request(addr, &client2, "/").as_deref(),
        Ok(moved.serial().as_str())
    );
    assert!(
        tls_request(addr, &client1, "/").is_err(),
        "CA one is no longer trusted"
    );
    let report = proxy.controller().xds_status().report();
    assert_eq!(report.types["secrets"].rejected, 3, "{report:?}");
    drop(long);
    proxy.shutdown();
}

/// A TLS transport socket that presents the workload's certificate
/// (`default`), verifies with its bundle (`ROOTCA`), and matches peer SANs.
fn tls_socket(context: &str, sans: Vec<Value>, extra: Value) -> Value {
    let mut typed = json!({
        "@type": format!("type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.{context}"),
        "common_tls_context": {
            "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": {"ads": {}}}],
            "combined_validation_context": {
                "default_validation_context": {"match_typed_subject_alt_names": sans},
                "validation_context_sds_secret_config": {"name": "ROOTCA", "sds_config": {"ads": {}}},
            },
        },
    });
    for (k, v) in extra.as_object().unwrap() {
        typed[k] = v.clone();
    }
    json!({"name": "envoy.transport_sockets.tls", "typed_config": typed})
}

fn uri_san(exact: Option<&str>, prefix: Option<&str>) -> Value {
    let matcher = match (exact, prefix) {
        (Some(e), _) => json!({"exact": e}),
        (_, Some(p)) => json!({"prefix": p}),
        _ => unreachable!(),
    };
    json!({"san_type": "URI", "matcher": matcher})
}

/// A sidecar pair driven only by the control plane: B's inbound listener
/// terminates mTLS (a DownstreamTlsContext with SAN matchers), A's cluster
/// originates it (an UpstreamTlsContext expecting B's SPIFFE ID). Traffic
/// flows with the caller's identity; pushing another expected identity to
/// A, or another allow-list to B, stops it.
#[test]
fn a_sidecar_pair_is_wired_for_mtls_by_the_control_plane() {
    use support::pki::{leaf, new_ca, tls_table, FRONTEND, ORDERS};
    if !have_peers() {
        return;
    }
    let dir = support::temp_dir("xds-pair");
    let ca = new_ca("mesh.local");
    leaf(&ca, FRONTEND, |_| {}).write(&dir.join("a"), &ca.pem);
    leaf(&ca, ORDERS, |_| {}).write(&dir.join("b"), &ca.pem);
    let app = HttpUpstream::start();
    let mut m = Mgmt::start(0);
    let start = |node: &str| {
        let text = format!(
            "workers = 1\n{tls}[xds]\nserver = \"127.0.0.1:{port}\"\nnode_id = \"{node}\"\n",
            tls = tls_table(&dir.join(node)),
            port = m.port
        );
        start_with_xds(&text)
    };
    let (b, _b_client) = start("b");
    let (a, _a_client) = start("a");
    let routes = |name: &str, cluster: &str| route_config(name, vec![prefix_route("/", cluster)]);

    // B: an inbound listener that requires a client certificate from
    // spiffe://mesh.local/ns/prod/..., in front of the app.
    let mut inbound = http_listener("inbound", "b-routes");
    let b_socket = |prefix: &str| {
        tls_socket(
            "DownstreamTlsContext",
            vec![uri_san(None, Some(prefix))],
            json!({"require_client_certificate": true}),
        )
    };
    inbound["filter_chains"][0]["transport_socket"] = b_socket("spiffe://mesh.local/ns/prod/");
    m.set_for(
        "b",
        "clusters",
        "b-c1",
        vec![static_cluster("app", app.addr)],
    );
    m.set_for("b", "listeners", "b-l1", vec![inbound.clone()]);
    m.set_for("b", "routes", "b-r1", vec![routes("b-routes", "app")]);
    for (kind, version) in [
        ("clusters", "b-c1"),
        ("listeners", "b-l1"),
        ("routes", "b-r1"),
    ] {
        m.ack(kind, version);
    }
    let b_in = listener_addr(&b, "inbound").expect("B's pushed listener serves");

    // A: an outbound listener to B's inbound, over mTLS expecting orders.
    let a_cluster = |expect: &str| {
        let mut c = static_cluster("orders", b_in);
        c["transport_socket"] = tls_socket(
            "UpstreamTlsContext",
            vec![uri_san(Some(expect), None)],
            json!({"sni": "outbound_.8080_._.orders.prod.svc.cluster.local"}),
        );
        c
    };
    m.set_for("a", "clusters", "a-c1", vec![a_cluster(ORDERS)]);
    m.set_for(
        "a",
        "listeners",
        "a-l1",
        vec![http_listener("out", "a-routes")],
    );
    m.set_for("a", "routes", "a-r1", vec![routes("a-routes", "orders")]);
    for (kind, version) in [
        ("clusters", "a-c1"),
        ("listeners", "a-l1"),
        ("routes", "a-r1"),
    ] {
        m.ack(kind, version);
    }
    let a_out = listener_addr(&a, "out").expect("A's pushed listener serves");
    let r = http_client::get(a_out, "/echo");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.text()
            .to_ascii_lowercase()
            .contains(&format!("x-pilotfish-peer-identity: {FRONTEND}")),
        "the app sees the caller's identity: {}",
        r.text()
    );

    // A now expects another identity: B's certificate no longer passes.
    m.set_for(
        "a",
        "clusters",
        "a-c2",
        vec![a_cluster("spiffe://mesh.local/ns/prod/sa/billing")],
    );
    m.ack("clusters", "a-c2");
    let r = http_client::get(a_out, "/echo");
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("wrong_identity"), "{}", r.text());
    m.set_for("a", "clusters", "a-c3", vec![a_cluster(ORDERS)]);
    m.ack("clusters", "a-c3");
    assert_eq!(http_client::get(a_out, "/echo").status, 200);

    // B now allows only another namespace: A's calls are refused there.
    inbound["filter_chains"][0]["transport_socket"] = b_socket("spiffe://mesh.local/ns/ops/");
    m.set_for("b", "listeners", "b-l2", vec![inbound]);
    m.ack("listeners", "b-l2");
    let r = http_client::get(a_out, "/echo");
    assert_eq!(r.status, 403, "{}", r.text());
    a.shutdown();
    b.shutdown();
}
