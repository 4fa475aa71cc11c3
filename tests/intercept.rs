//! Transparent interception, end to end, in network namespaces this test
//! makes: two "pods" (A and B) joined by a veth pair, and a third
//! namespace (C) for a caller from outside the mesh. Each pod runs the
//! real `pilotfish` binary as uid 1337 with the redirect rules that
//! `pilotfish intercept install` wrote; the apps (curl, nginx, small
//! Python servers) are unmodified and dial each other's addresses.
//!
//! Needs root, iproute2, nftables, nginx, curl, tcpdump and python3 (CI
//! installs them and runs as root). Without root the tests say so and
//! pass vacuously only outside CI: under CI=true they fail instead.
#![allow(clippy::disallowed_methods)]

mod support;

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use support::temp_dir;

const PROXY_UID: u32 = 1337;
const ID_A: &str = "spiffe://mesh.local/ns/test/sa/pod-a";
const ID_B: &str = "spiffe://mesh.local/ns/test/sa/pod-b";
const A_IP: &str = "10.77.0.1";
const B_IP: &str = "10.77.0.2";
const B_IP_FOR_C: &str = "10.78.0.2";
const C_IP: &str = "10.78.0.3";
const A_IP6: &str = "fd77::1";
const B_IP6: &str = "fd77::2";

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_pilotfish")
}

/// Whether this machine can run these tests; outside CI a machine that
/// cannot just skips them (with a note), in CI that is a failure.
fn capable() -> bool {
    let root = rustix::process::geteuid().is_root();
    let tools = [
        "ip", "nft", "nginx", "curl", "tcpdump", "python3", "setpriv",
    ]
    .iter()
    .all(|t| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if root && tools {
        return true;
    }
    let why = format!("interception tests need root and ip, nft, iptables-restore, nginx, curl, tcpdump, python3, setpriv (root: {root}, tools: {tools})");
    assert!(std::env::var("CI").is_err(), "{why}");
    eprintln!("skipped: {why}");
    false
}

fn sh(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    out
}

fn ok(args: &[&str]) -> String {
    let out = sh(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace, deleted (with its processes' sockets and veths)
/// when dropped.
struct Ns(String);

impl Ns {
    fn new(tag: &str) -> Ns {
        let name = format!(
            "pf{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        ok(&["ip", "netns", "add", &name]);
        ok(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Ns(name)
    }

    /// `ip netns exec NS args...`
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).args(args);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    fn spawn(&self, args: &[&str]) -> Child {
        self.cmd(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        // Kill whatever still runs in it, then the namespace.
        let _ = Command::new("ip")
            .args(["netns", "pids", &self.0])
            .output()
            .map(|o| {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            });
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Joins two namespaces with a veth pair and addresses on a /24 (and a
/// /64 when `v6` is given).
fn link(a: &Ns, a_if: &str, a_ip: &str, b: &Ns, b_if: &str, b_ip: &str, v6: Option<(&str, &str)>) {
    ok(&[
        "ip", "link", "add", a_if, "netns", &a.0, "type", "veth", "peer", "name", b_if, "netns",
        &b.0,
    ]);
    ok(&[
        "ip",
        "-n",
        &a.0,
        "addr",
        "add",
        &format!("{a_ip}/24"),
        "dev",
        a_if,
    ]);
    ok(&[
        "ip",
        "-n",
        &b.0,
        "addr",
        "add",
        &format!("{b_ip}/24"),
        "dev",
        b_if,
    ]);
    ok(&["ip", "-n", &a.0, "link", "set", a_if, "up"]);
    if let Some((a6, b6)) = v6 {
        // nodad: usable at once, no duplicate-address wait.
        ok(&[
            "ip",
            "-n",
            &a.0,
            "addr",
            "add",
            &format!("{a6}/64"),
            "dev",
            a_if,
            "nodad",
        ]);
        ok(&[
            "ip",
            "-n",
            &b.0,
            "addr",
            "add",
            &format!("{b6}/64"),
            "dev",
            b_if,
            "nodad",
        ]);
    }
    ok(&["ip", "-n", &b.0, "link", "set", b_if, "up"]);
}

/// A running sidecar: the real binary, as the proxy user, in a pod.
struct Sidecar {
    child: Child,
    admin: PathBuf,
}

impl Sidecar {
    fn start(ns: &Ns, dir: &Path, name: &str, toml: &str) -> Sidecar {
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, toml).unwrap();
        let admin = dir.join(format!("{name}.sock"));
        let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
        let uid = PROXY_UID.to_string();
        let child = ns
            .cmd(&[
                "setpriv",
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
                bin(),
                "run",
                "--config",
                config.to_str().unwrap(),
            ])
            .env("RUST_LOG", "info,pilotfish=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let s = Sidecar { child, admin };
        let deadline = Instant::now() + support::IO_DEADLINE;
        loop {
            let ready = Command::new(bin())
                .args(["admin", "--socket", s.admin.to_str().unwrap(), "ready"])
                .output()
                .is_ok_and(|o| o.status.success());
            if ready {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "sidecar {name} not ready: {}",
                std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The merged counters.
    fn stats(&self) -> serde_json::Value {
        let out = ok(&[
            bin(),
            "admin",
            "--socket",
            self.admin.to_str().unwrap(),
            "stats",
            "--json",
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["total"].clone()
    }

    /// The count of one histogram from the admin socket (0 if absent).
    fn histogram_count(&self, listener: &str, metric: &str) -> u64 {
        let (status, body) =
            pilotfish::admin::client::request(&self.admin, "GET", "/histograms?format=json")
                .unwrap();
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .find(|h| h["key"]["listener"] == listener && h["key"]["metric"] == metric)
            .and_then(|h| h["count"].as_u64())
            .unwrap_or(0)
    }

    fn intercept(&self, counter: &str) -> u64 {
        self.stats()["intercept"][counter]
            .as_u64()
            .unwrap_or_else(|| panic!("no intercept counter {counter}"))
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Certificates for the two pods, made with `pilotfish ca`, readable by
/// the proxy user only.
fn certs(dir: &Path) {
    let ca = dir.join("ca");
    ok(&[bin(), "ca", "init", ca.to_str().unwrap()]);
    for (name, id) in [("a", ID_A), ("b", ID_B)] {
        let out = dir.join(name);
        ok(&[
            bin(),
            "ca",
            "issue",
            "--ca",
            ca.to_str().unwrap(),
            "--spiffe-id",
            id,
            "--out",
            out.to_str().unwrap(),
        ]);
    }
    let owner = format!("{PROXY_UID}:{PROXY_UID}");
    ok(&["chown", "-R", &owner, dir.to_str().unwrap()]);
}

fn tls_table(dir: &Path, pod: &str) -> String {
    let d = dir.join(pod);
    format!(
        "[tls]\ncert = \"{0}/cert.pem\"\nkey = \"{0}/key.pem\"\ntrust_bundle = \"{0}/ca.pem\"\n",
        d.display()
    )
}

/// Pod A's sidecar: outbound interception; the clusters for B's ports.
fn config_a(dir: &Path, policy: &str, detect_timeout: &str) -> String {
    format!(
        r#"workers = 1
[admin]
socket = "{admin}"
{tls}
[intercept]
outbound_listener = "outbound"
proxy_uid = {PROXY_UID}
proxy_gid = {PROXY_UID}
outbound_policy = "{policy}"
opaque_ports = [2525]
detect_timeout = "{detect_timeout}"

[[listeners]]
name = "outbound"
bind = "[::]:15001"
protocol = "auto"

[[clusters]]
name = "b-http"
destinations = ["{B_IP}:80"]
endpoints = ["{B_IP}:80"]
tls = {{ server_identity = "{ID_B}" }}

[[clusters]]
name = "b-http-v6"
destinations = ["[{B_IP6}]:80"]
endpoints = ["[{B_IP6}]:80"]
tls = {{ server_identity = "{ID_B}" }}

[[clusters]]
name = "b-echo"
destinations = ["{B_IP}:7000"]
endpoints = ["{B_IP}:7000"]
tls = {{ server_identity = "{ID_B}" }}

# Claimed by the SNI of the app's own TLS, whatever the address.
[[clusters]]
name = "b-sni"
destinations = ["secure.b.mesh"]
endpoints = ["{B_IP}:8443"]
tls = {{ server_identity = "{ID_B}" }}

[[clusters]]
name = "b-banner"
destinations = ["{B_IP}:2525"]
endpoints = ["{B_IP}:2525"]
tls = {{ server_identity = "{ID_B}" }}

[[clusters]]
name = "b-banner-undeclared"
destinations = ["{B_IP}:2626"]
endpoints = ["{B_IP}:2626"]
tls = {{ server_identity = "{ID_B}" }}
"#,
        admin = dir.join("a.sock").display(),
        tls = tls_table(dir, "a"),
    )
}

/// Pod B's sidecar: inbound interception; the app's HTTP port has a
/// cluster (so requests get the HTTP pipeline), other ports go to
/// 127.0.0.1 as they are.
fn config_b(dir: &Path, mode: &str, authorize: bool) -> String {
    let authorize = if authorize {
        format!("authorize = [\"{ID_A}\"]\n")
    } else {
        String::new()
    };
    format!(
        r#"workers = 1
[admin]
socket = "{admin}"
{tls}
[intercept]
inbound_listener = "inbound"
proxy_uid = {PROXY_UID}
exclude_inbound_ports = [9999]
inbound_mode = "{mode}"
detect_timeout = "500ms"

[[listeners]]
name = "inbound"
bind = "[::]:15006"
protocol = "auto"
tls = {{}}
access_log = {{ path = "{log}", format = "json" }}
{authorize}
[[clusters]]
name = "app-http"
direction = "inbound"
destinations = [":80"]
endpoints = ["127.0.0.1:80"]
"#,
        admin = dir.join("b.sock").display(),
        log = dir.join("b-access.log").display(),
        tls = tls_table(dir, "b"),
    )
}

/// nginx in pod B on :80 (echoes the caller identity header and the URI,
/// logs each request) and :9999 (a port interception excludes).
fn nginx(ns: &Ns, dir: &Path) -> Child {
    let conf = dir.join("nginx.conf");
    let d = dir.display();
    std::fs::write(
        &conf,
        format!(
            r#"daemon off;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log;
events {{ worker_connections 64; }}
http {{
  access_log {d}/nginx-access.log;
  client_body_temp_path {d}/nginx-body;
  proxy_temp_path {d}/nginx-proxy;
  fastcgi_temp_path {d}/nginx-fastcgi;
  uwsgi_temp_path {d}/nginx-uwsgi;
  scgi_temp_path {d}/nginx-scgi;
  server {{
    listen 80;
    listen [::]:80;
    location / {{ return 200 "peer=$http_x_pilotfish_peer_identity uri=$request_uri\n"; }}
  }}
  server {{
    listen 9999;
    location / {{ return 200 "bypass\n"; }}
  }}
}}
"#
        ),
    )
    .unwrap();
    let child = ns.spawn(&["nginx", "-c", conf.to_str().unwrap()]);
    wait_port(ns, "127.0.0.1", 80);
    child
}

/// Python servers in pod B: an echo on :7000 and a server-first banner
/// on :2525 and :2626 (as SMTP greets before the client speaks).
fn tcp_servers(ns: &Ns, dir: &Path) -> Child {
    let script = r#"
import socket, ssl, sys, threading
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1] + "/cert.pem", sys.argv[1] + "/key.pem")
def tls_echo(c):
    try:
        t = ctx.wrap_socket(c, server_side=True)
        t.sendall(b"tls:" + t.recv(1024))
        t.close()
    except Exception:
        c.close()
def echo(c):
    while True:
        d = c.recv(65536)
        if not d: break
        c.sendall(d)
    c.close()
def banner(c):
    c.sendall(b"220 banner ready\r\n")
    d = c.recv(1024)
    c.sendall(b"250 got " + d)
    c.close()
def serve(port, fn):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(64)
    while True:
        c, _ = s.accept(); threading.Thread(target=fn, args=(c,), daemon=True).start()
threading.Thread(target=serve, args=(2525, banner), daemon=True).start()
threading.Thread(target=serve, args=(2626, banner), daemon=True).start()
threading.Thread(target=serve, args=(8443, tls_echo), daemon=True).start()
serve(7000, echo)
"#;
    let certs = dir.join("b");
    let child = ns.spawn(&["python3", "-c", script, certs.to_str().unwrap()]);
    for port in [7000, 2525, 2626, 8443] {
        wait_port(ns, "127.0.0.1", port);
    }
    child
}

/// Waits until something listens on ip:port inside `ns`.
fn wait_port(ns: &Ns, ip: &str, port: u16) {
    let probe =
        format!("import socket; s=socket.socket(); s.settimeout(1); s.connect(('{ip}', {port}))");
    let deadline = Instant::now() + support::IO_DEADLINE;
    while !ns.run(&["python3", "-c", &probe]).status.success() {
        assert!(Instant::now() < deadline, "nothing listens on {ip}:{port}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// A TCP client run in a pod as the app would: connects to ip:port,
/// optionally reads a greeting first, sends `send`, half-closes, and
/// prints everything received.
fn tcp_client(ns: &Ns, ip: &str, port: u16, greet_first: bool, send: &str) -> String {
    let script = format!(
        r#"
import socket, sys
s = socket.create_connection(("{ip}", {port}), timeout=10)
out = b""
if {greet}:
    out += s.recv(1024)
s.sendall(bytes.fromhex("{hex}"))
s.shutdown(socket.SHUT_WR)
while True:
    d = s.recv(65536)
    if not d: break
    out += d
sys.stdout.write(out.decode())
"#,
        greet = if greet_first { "True" } else { "False" },
        hex = send.bytes().map(|b| format!("{b:02x}")).collect::<String>(),
    );
    let out = ns.run(&["python3", "-c", &script]);
    if !out.status.success() {
        eprintln!("tcp client: {}", String::from_utf8_lossy(&out.stderr));
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The two pods (and an outsider), with rules installed and apps running.
struct Pods {
    dir: PathBuf,
    a: Ns,
    b: Ns,
    c: Ns,
    _apps: Vec<Child>,
}

impl Pods {
    fn new() -> Pods {
        let dir = temp_dir("intercept");
        certs(&dir);
        let (a, b, c) = (Ns::new("a"), Ns::new("b"), Ns::new("c"));
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}{n}", std::process::id() % 10000);
        let (va, vb) = (format!("va{tag}"), format!("vb{tag}"));
        link(&a, &va, A_IP, &b, &vb, B_IP, Some((A_IP6, B_IP6)));
        let (vc, cv) = (format!("vc{tag}"), format!("cv{tag}"));
        link(&c, &vc, C_IP, &b, &cv, B_IP_FOR_C, None);
        let apps = vec![nginx(&b, &dir), tcp_servers(&b, &dir)];
        Pods {
            dir,
            a,
            b,
            c,
            _apps: apps,
        }
    }

    fn veth_a(&self) -> String {
        let out = self.a.run(&["ip", "-o", "link", "show", "type", "veth"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let name = text.split(": ").nth(1).unwrap_or("").to_string();
        name.split('@').next().unwrap_or("").to_string()
    }

    /// Writes `toml` and runs `pilotfish intercept install` in `ns`.
    fn install(&self, ns: &Ns, name: &str, toml: &str) {
        self.install_with(ns, name, toml, "nft");
    }

    fn install_with(&self, ns: &Ns, name: &str, toml: &str, backend: &str) {
        let path = self.dir.join(format!("{name}-rules.toml"));
        std::fs::write(&path, toml).unwrap();
        let out = ns.run(&[
            bin(),
            "intercept",
            "install",
            "--backend",
            backend,
            "--config",
            path.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "install in {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Both sidecars with their rules.
    fn mesh(&self, policy: &str, mode: &str, authorize: bool) -> (Sidecar, Sidecar) {
        let a_toml = config_a(&self.dir, policy, "300ms");
        let b_toml = config_b(&self.dir, mode, authorize);
        self.install(&self.a, "a", &a_toml);
        self.install(&self.b, "b", &b_toml);
        let b = Sidecar::start(&self.b, &self.dir, "b", &b_toml);
        let a = Sidecar::start(&self.a, &self.dir, "a", &a_toml);
        (a, b)
    }

    fn nginx_requests(&self) -> usize {
        std::fs::read_to_string(self.dir.join("nginx-access.log"))
            .unwrap_or_default()
            .lines()
            .count()
    }
}

fn curl(ns: &Ns, args: &[&str]) -> String {
    let mut all = vec!["curl", "-sS", "--max-time", "10"];
    all.extend_from_slice(args);
    let out = ns.run(&all);
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// tcpdump on an interface inside a namespace, writing a pcap file.
struct Capture {
    child: Child,
    file: PathBuf,
}

impl Capture {
    fn start(ns: &Ns, iface: &str, file: PathBuf) -> Capture {
        let mut child = ns
            .cmd(&[
                "tcpdump",
                "-i",
                iface,
                // Without immediate mode, packets sat in the capture
                // ring and never reached the file on this kernel.
                "--immediate-mode",
                "-U",
                "-s",
                "0",
                "-w",
                file.to_str().unwrap(),
                "tcp",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // tcpdump says "listening on IFACE" once it captures.
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let started = lines.any(|l| l.is_ok_and(|l| l.contains("listening on")));
        assert!(started, "tcpdump did not start");
        // Keep draining its stderr so it never blocks on a full pipe.
        thread::spawn(move || for _ in lines {});
        Capture { child, file }
    }

    /// Stops the capture; the packets' text as `tcpdump -r -A` prints it.
    fn stop(mut self) -> String {
        thread::sleep(Duration::from_millis(200));
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        ok(&["tcpdump", "-nn", "-A", "-r", self.file.to_str().unwrap()])
    }
}

#[test]
fn http_from_an_unmodified_client_reaches_nginx_in_the_other_pod_over_mtls() {
    if !capable() {
        return;
    }
    let pods = Pods::new();
    let (a, b) = pods.mesh("passthrough", "strict", true);
    let capture = Capture::start(&pods.a, &pods.veth_a(), pods.dir.join("veth.pcap"));

    // One request first: one connection at each hop, no loop.
    let body = curl(&pods.a, &[&format!("http://{B_IP}/first?secret-marker=1")]);
    assert_eq!(body, format!("peer={ID_A} uri=/first?secret-marker=1\n"));
    assert_eq!(
        a.stats()["connections_accepted"],
        1,
        "A accepted its own connection: a loop"
    );
    assert_eq!(b.stats()["connections_accepted"], 1);
    assert_eq!(pods.nginx_requests(), 1);
    assert_eq!(a.intercept("detected_http1"), 1);
    assert_eq!(a.intercept("outbound_routed"), 1);
    assert_eq!(b.intercept("inbound_mtls"), 1);
    assert_eq!(a.intercept("loops") + b.intercept("loops"), 0);

    // HTTP/2 with prior knowledge from the app, HTTP/1.1 at nginx.
    let body = curl(
        &pods.a,
        &[
            "--http2-prior-knowledge",
            &format!("http://{B_IP}/h2?secret-marker=2"),
        ],
    );
    assert_eq!(body, format!("peer={ID_A} uri=/h2?secret-marker=2\n"));
    assert_eq!(a.intercept("detected_http2"), 1);

    // IPv6 end to end: IPv6 rules, IP6T_SO_ORIGINAL_DST on both sides.
    let body = curl(
        &pods.a,
        &["-g", &format!("http://[{B_IP6}]/v6?secret-marker=3")],
    );
    assert_eq!(body, format!("peer={ID_A} uri=/v6?secret-marker=3\n"));

    // A caller cannot claim an identity: the header it sends is replaced.
    let body = curl(
        &pods.a,
        &[
            "-H",
            "x-pilotfish-peer-identity: spiffe://mesh.local/ns/test/sa/admin",
            &format!("http://{B_IP}/spoof"),
        ],
    );
    assert_eq!(body, format!("peer={ID_A} uri=/spoof\n"));

    let packets = capture.stop();
    assert!(
        packets.contains(&format!("{B_IP}.80")),
        "the capture saw no packets to {B_IP}:80: {packets}"
    );
    for plaintext in [
        "secret-marker",
        "GET /",
        "HTTP/1.1",
        "peer=",
        "PRI * HTTP/2.0",
    ] {
        assert!(
            !packets.contains(plaintext),
            "plaintext {plaintext:?} crossed the veth between the pods"
        );
    }
}

#[test]
fn opaque_tcp_and_a_server_first_protocol_cross_the_mesh() {
    if !capable() {
        return;
    }
    let pods = Pods::new();
    let (a, b) = pods.mesh("passthrough", "strict", true);

    // Client-first bytes that are not HTTP: detected opaque, relayed over
    // mTLS, out at B to 127.0.0.1:7000.
    let echoed = tcp_client(&pods.a, B_IP, 7000, false, "\u{1}binary hello");
    assert_eq!(echoed, "\u{1}binary hello");
    assert_eq!(a.intercept("detected_opaque"), 1);
    assert!(b.intercept("inbound_mtls") >= 1);

    // Server-first on a port declared opaque: no detection, the banner
    // comes through at once.
    let got = tcp_client(&pods.a, B_IP, 2525, true, "HELO a\r\n");
    assert_eq!(got, "220 banner ready\r\n250 got HELO a\r\n");
    assert_eq!(a.intercept("detect_skipped"), 1);
    assert_eq!(a.intercept("detect_timeouts"), 0);

    // Server-first on a port not declared opaque: detection waits out its
    // timeout, then relays as opaque TCP; nothing is lost.
    let got = tcp_client(&pods.a, B_IP, 2626, true, "HELO b\r\n");
    assert_eq!(got, "220 banner ready\r\n250 got HELO b\r\n");
    assert_eq!(a.intercept("detect_timeouts"), 1);

    // The app's own TLS: detected as TLS, its SNI picks the cluster (no
    // cluster claims the address), relayed as bytes inside the sidecars'
    // mTLS to the app's TLS server in pod B.
    let tls_client = format!(
        r#"
import socket, ssl, sys
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
s = socket.create_connection(("{B_IP}", 8443), timeout=10)
t = ctx.wrap_socket(s, server_hostname="Secure.B.Mesh.")
t.sendall(b"hi")
sys.stdout.write(t.recv(1024).decode())
"#
    );
    let out = pods.a.run(&["python3", "-c", &tls_client]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "tls:hi",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(a.intercept("detected_tls"), 1);
    assert_eq!(a.intercept("outbound_passthrough"), 0);
    assert_eq!(a.intercept("outbound_routed"), 4);

    // Each of the four connections recorded its detection time once, and
    // its duration (when it closed) as a connection, never as a request.
    assert_eq!(a.histogram_count("outbound", "protocol_detect"), 4);
    let deadline = Instant::now() + support::IO_DEADLINE;
    while a.histogram_count("outbound", "connection_duration") < 4 {
        assert!(Instant::now() < deadline, "relayed connections not closed");
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(a.histogram_count("outbound", "connection_duration"), 4);
    assert_eq!(a.histogram_count("outbound", "request_total"), 0);
}

#[test]
fn destinations_no_cluster_claims_pass_through_or_are_denied() {
    if !capable() {
        return;
    }
    let pods = Pods::new();
    {
        let (a, _b) = pods.mesh("passthrough", "strict", true);
        // Port 9999 on B: no cluster in A, excluded from capture in B.
        assert_eq!(
            curl(&pods.a, &[&format!("http://{B_IP}:9999/")]),
            "bypass\n"
        );
        assert_eq!(a.intercept("outbound_passthrough"), 1);
        assert_eq!(a.intercept("outbound_denied"), 0);
    }
    let a_toml = config_a(&pods.dir, "deny", "300ms");
    pods.install(&pods.a, "a", &a_toml);
    let a = Sidecar::start(&pods.a, &pods.dir, "a", &a_toml);
    let out = pods.a.run(&[
        "curl",
        "-sS",
        "--max-time",
        "10",
        &format!("http://{B_IP}:9999/"),
    ]);
    assert!(!out.status.success(), "a denied destination answered");
    assert_eq!(a.intercept("outbound_denied"), 1);
    assert_eq!(a.intercept("outbound_passthrough"), 0);
}

#[test]
fn plaintext_callers_are_refused_when_strict_and_forwarded_when_permissive() {
    if !capable() {
        return;
    }
    let pods = Pods::new();
    {
        let (_a, b) = pods.mesh("passthrough", "strict", true);
        let out = pods.c.run(&[
            "curl",
            "-sS",
            "--max-time",
            "10",
            &format!("http://{B_IP_FOR_C}/from-c"),
        ]);
        assert!(
            !out.status.success(),
            "strict mode let a plaintext caller in"
        );
        assert_eq!(b.intercept("inbound_plaintext_refused"), 1);
        assert_eq!(pods.nginx_requests(), 0);
        // Excluded ports still bypass the proxy.
        assert_eq!(
            curl(&pods.c, &[&format!("http://{B_IP_FOR_C}:9999/")]),
            "bypass\n"
        );
    }
    // Permissive, no allow-list: the outsider gets in, with no identity
    // (and cannot forge one); the mesh peer still comes with its own.
    let (_a, b) = pods.mesh("passthrough", "permissive", false);
    let body = curl(
        &pods.c,
        &[
            "-H",
            &format!("x-pilotfish-peer-identity: {ID_A}"),
            &format!("http://{B_IP_FOR_C}/from-c"),
        ],
    );
    assert_eq!(body, "peer= uri=/from-c\n");
    assert_eq!(b.intercept("inbound_plaintext"), 1);
    let body = curl(&pods.a, &[&format!("http://{B_IP}/from-a")]);
    assert_eq!(body, format!("peer={ID_A} uri=/from-a\n"));
    assert_eq!(b.intercept("inbound_mtls"), 1);
    // The access log tells the outsider (plaintext, no identity) from the
    // mesh peer (mTLS, its SPIFFE ID).
    let log = pods.dir.join("b-access.log");
    let deadline = Instant::now() + support::IO_DEADLINE;
    let lines: Vec<serde_json::Value> = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .filter(|v: &serde_json::Value| v["target"] == "/from-c" || v["target"] == "/from-a")
            .collect();
        if lines.len() == 2 {
            break lines;
        }
        assert!(Instant::now() < deadline, "access log: {text}");
        thread::sleep(Duration::from_millis(50));
    };
    let from_c = lines.iter().find(|v| v["target"] == "/from-c").unwrap();
    assert_eq!(from_c["tls"], false, "{from_c}");
    assert!(from_c["peer_identity"].is_null(), "{from_c}");
    let from_a = lines.iter().find(|v| v["target"] == "/from-a").unwrap();
    assert_eq!(from_a["tls"], true, "{from_a}");
    assert_eq!(from_a["peer_identity"], ID_A, "{from_a}");
    drop(b);
    // With an allow-list, permissive still lets plaintext connect, but no
    // identity is on the list: 403.
    let b_toml = config_b(&pods.dir, "permissive", true);
    let b = Sidecar::start(&pods.b, &pods.dir, "b", &b_toml);
    let out = pods.c.run(&[
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "10",
        &format!("http://{B_IP_FOR_C}/from-c"),
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "403");
    assert_eq!(b.intercept("inbound_plaintext"), 1);
}

#[test]
fn a_direct_connection_to_the_intercept_listener_is_closed_as_a_loop() {
    if !capable() {
        return;
    }
    let pods = Pods::new();
    let (a, _b) = pods.mesh("passthrough", "strict", true);
    // The app dials the outbound listener itself: loopback is never
    // redirected, so its original destination is the listener.
    let got = tcp_client(&pods.a, "127.0.0.1", 15001, false, "GET / HTTP/1.1\r\n\r\n");
    assert_eq!(got, "");
    assert_eq!(a.intercept("loops"), 1);
    assert_eq!(a.stats()["http"]["requests"], 0);
}

#[test]
fn install_show_install_remove_leaves_the_ruleset_as_it_was() {
    if !capable() {
        return;
    }
    let dir = temp_dir("intercept-rules");
    let ns = Ns::new("r");
    let toml = format!(
        r#"[intercept]
outbound_listener = "out"
inbound_listener = "in"
proxy_uid = {PROXY_UID}
exclude_inbound_ports = [22]
exclude_outbound_ports = [53]
exclude_outbound_cidrs = ["169.254.169.254", "fd00::/8"]
inbound_mode = "permissive"

[[listeners]]
name = "out"
bind = "127.0.0.1:15001"
protocol = "auto"

[[listeners]]
name = "in"
bind = "0.0.0.0:15006"
protocol = "auto"
"#
    );
    let config = dir.join("rules.toml");
    std::fs::write(&config, toml).unwrap();
    let config = config.to_str().unwrap();
    // Something else's rules, which ours must leave alone.
    let other = "table inet other {\n  chain c {\n    type filter hook output priority 0; policy accept;\n    tcp dport 1 drop\n  }\n}\n";
    let out = ns
        .cmd(&["nft", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .map(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(other.as_bytes()).unwrap();
            c.wait().unwrap()
        });
    assert!(out.unwrap().success());
    let ruleset =
        || String::from_utf8_lossy(&ns.run(&["nft", "list", "ruleset"]).stdout).into_owned();
    let before = ruleset();

    let show = |expect: bool| {
        let out = ns.run(&[bin(), "intercept", "show"]);
        assert_eq!(out.status.success(), expect, "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    show(false);
    assert!(ns
        .run(&[bin(), "intercept", "install", "--config", config])
        .status
        .success());
    let first = show(true);
    for rule in [
        "meta skuid 1337 return",
        "redirect to :15001",
        "redirect to :15006",
        "tcp dport 22 return",
        "ip daddr 169.254.169.254 return",
        "ip6 daddr fd00::/8 return",
    ] {
        assert!(first.contains(rule), "{rule:?} missing from\n{first}");
    }
    assert!(ns
        .run(&[bin(), "intercept", "install", "--config", config])
        .status
        .success());
    assert_eq!(show(true), first, "installing twice changed the rules");
    assert!(ns.run(&[bin(), "intercept", "remove"]).status.success());
    assert_eq!(ruleset(), before, "remove left something behind");
    show(false);
    assert!(
        ns.run(&[bin(), "intercept", "remove"]).status.success(),
        "removing nothing is fine"
    );

    // Without CAP_NET_ADMIN: a clear refusal, nothing changed.
    let out = ns.run(&[
        "setpriv",
        "--reuid=1337",
        "--regid=1337",
        "--clear-groups",
        bin(),
        "intercept",
        "install",
        "--config",
        config,
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("CAP_NET_ADMIN"),
        "{out:?}"
    );
    assert_eq!(ruleset(), before);
}

#[test]
fn the_iptables_fallback_intercepts_too_and_removes_cleanly() {
    if !capable() {
        return;
    }
    let pods = Pods::new();
    let save = |ns: &Ns| {
        let v4 = ns.run(&["iptables-save", "-t", "nat"]);
        let v6 = ns.run(&["ip6tables-save", "-t", "nat"]);
        // Without the "# Generated/Completed" lines, which carry times.
        String::from_utf8_lossy(&[v4.stdout, v6.stdout].concat())
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let before = (save(&pods.a), save(&pods.b));
    let a_toml = config_a(&pods.dir, "passthrough", "300ms");
    let b_toml = config_b(&pods.dir, "strict", true);
    for _ in 0..2 {
        pods.install_with(&pods.a, "a", &a_toml, "iptables");
        pods.install_with(&pods.b, "b", &b_toml, "iptables");
    }
    let rules = save(&pods.a);
    assert_eq!(
        rules.matches("-A OUTPUT -j PILOTFISH_OUTPUT").count(),
        2,
        "one jump per family after two installs:\n{rules}"
    );
    assert!(rules.contains("--uid-owner 1337 -j RETURN"), "{rules}");
    let b = Sidecar::start(&pods.b, &pods.dir, "b", &b_toml);
    let a = Sidecar::start(&pods.a, &pods.dir, "a", &a_toml);
    let body = curl(&pods.a, &[&format!("http://{B_IP}/via-iptables")]);
    assert_eq!(body, format!("peer={ID_A} uri=/via-iptables\n"));
    let body = curl(&pods.a, &["-g", &format!("http://[{B_IP6}]/via-ip6tables")]);
    assert_eq!(body, format!("peer={ID_A} uri=/via-ip6tables\n"));
    assert_eq!(a.intercept("outbound_routed"), 2);
    assert_eq!(b.intercept("inbound_mtls"), 2);
    for ns in [&pods.a, &pods.b] {
        let out = ns.run(&[bin(), "intercept", "remove", "--backend", "iptables"]);
        assert!(out.status.success(), "{out:?}");
    }
    assert_eq!(
        (save(&pods.a), save(&pods.b)),
        before,
        "remove left rules behind"
    );
}
