//! The transparent mesh demo (`pilotfish-bench demo --transparent`): two
//! pods as network namespaces joined by a veth pair, each with its
//! Pilotfish sidecar running as the proxy user (uid 1337) behind the
//! redirect rules `pilotfish intercept install` writes. The app in pod A
//! (this process's load threads, moved into pod A's namespace) dials pod
//! B's address and port as if there were no mesh; the HTTP upstream in pod
//! B (threads moved into pod B's namespace) answers. Between the pods the
//! bytes are mTLS (h2 between the sidecars, by ALPN).
//!
//! Measured in one run, the same closed-loop HTTP/1.1 load on the same
//! veth, keep-alive and with a new connection per request:
//! - direct: before any rule is installed;
//! - explicit-port mesh: the app dials sidecar A's own listener, which
//!   carries the request over mTLS to sidecar B's own listener (a port
//!   the inbound rules exclude): no redirect, no original destination, no
//!   detection;
//! - transparent mesh: the app dials B's address; the rules redirect it
//!   at both ends.
//!
//! The transparent minus the explicit figures are what interception
//! costs; the `protocol_detect` histograms from the sidecars' admin
//! sockets give the per-connection detection time directly.
//!
//! Needs root (namespaces, rules, setpriv), `ip` (iproute2), `nft` or
//! `iptables-restore`, and `setpriv`; says so otherwise. Everything it
//! makes lives in the two namespaces and is deleted with them, on success,
//! error or Ctrl-C.

use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use anyhow::Context;

use crate::{
    demo::{issue_identities, SERVICE_A, SERVICE_B},
    pingpong::{self, Outcome, Reuse},
    sidecar::Sidecar,
    upstream,
};

/// The sidecars' user: never redirected by the rules (systemd/pilotfish.sysusers).
const PROXY_UID: u32 = 1337;
const A_IP: &str = "10.79.0.1";
const B_IP: &str = "10.79.0.2";
/// A second address of pod B, for the direct windows only: a new
/// connection per request leaves thousands of TIME_WAIT sockets, and
/// their ports would slow the later windows' connects to `B_IP`.
const B_IP_DIRECT: &str = "10.79.0.3";
/// The app's port in pod B, dialled by the app in pod A.
const APP_PORT: u16 = 8080;
/// Sidecar A's explicit (non-intercepting) listener, on pod A's loopback.
const EXPLICIT_OUT: &str = "127.0.0.1:15080";
/// Sidecar B's explicit mTLS listener (excluded from inbound interception).
const EXPLICIT_IN_PORT: u16 = 15443;

struct Plan {
    connections: usize,
    warmup: Duration,
    measure: Duration,
}

/// `<target dir>/demo-transparent`, beside the plain demo's output.
pub fn default_out() -> PathBuf {
    crate::demo::default_out().with_file_name("demo-transparent")
}

pub fn run(
    quick: bool,
    connections: Option<usize>,
    out: &Path,
    binary: Option<PathBuf>,
) -> anyhow::Result<()> {
    preflight()?;
    let mut plan = if quick {
        Plan {
            connections: 4,
            warmup: Duration::from_millis(200),
            measure: Duration::from_secs(1),
        }
    } else {
        Plan {
            connections: 16,
            warmup: Duration::from_secs(1),
            measure: Duration::from_secs(5),
        }
    };
    if let Some(n) = connections {
        plan.connections = n;
    }
    let stop = pingpong::stop_on_ctrl_c()?;
    let binary = crate::sidecar::locate_binary(binary)?;
    std::fs::create_dir_all(out)?;
    // The sidecars run as the proxy user and write their admin sockets here.
    let owner = Some(rustix::process::Uid::from_raw(PROXY_UID));
    let group = Some(rustix::process::Gid::from_raw(PROXY_UID));
    rustix::fs::chown(out, owner, group).context("chown the output directory")?;
    std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o755))?;

    let tag = std::process::id();
    let a = Pod::new(&format!("pfdemo-a-{tag}"))?;
    let b = Pod::new(&format!("pfdemo-b-{tag}"))?;
    let (veth_a, veth_b) = (format!("pfa{tag}"), format!("pfb{tag}"));
    ip(&[
        "link", "add", &veth_a, "netns", &a.name, "type", "veth", "peer", "name", &veth_b, "netns",
        &b.name,
    ])?;
    let addresses = [
        (&a, &veth_a, A_IP),
        (&b, &veth_b, B_IP),
        (&b, &veth_b, B_IP_DIRECT),
    ];
    for (pod, dev, addr) in addresses {
        let cidr = format!("{addr}/24");
        ip(&["-n", &pod.name, "addr", "add", &cidr, "dev", dev])?;
        ip(&["-n", &pod.name, "link", "set", dev, "up"])?;
    }
    // Pod A makes thousands of new connections: let it reuse TIME_WAIT
    // ports (this namespace only).
    a.exec(&["sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1"])?;
    a.exec(&[
        "sysctl",
        "-q",
        "-w",
        "net.ipv4.ip_local_port_range=10000 65000",
    ])?;

    let pki = issue_identities(&binary, out)?;
    rustix::fs::chown(&pki, owner, group)?;
    for entry in walk(&pki)? {
        rustix::fs::chown(&entry, owner, group)?;
    }

    // Service B: the HTTP upstream, listening in pod B on every address
    // (B's address for direct calls, loopback for its sidecar).
    let app_listen: SocketAddr = format!("0.0.0.0:{APP_PORT}").parse()?;
    b.within(move || upstream::http(app_listen).map_err(anyhow::Error::from))?;
    let app: SocketAddr = format!("{B_IP}:{APP_PORT}").parse()?;
    println!(
        "pods: {} ({A_IP}) and {} ({B_IP}; {B_IP_DIRECT} for the direct windows), one veth pair",
        a.name, b.name
    );
    println!("service B (HTTP upstream)     {app} in pod B");

    // Both sidecars start now; no rule is installed until direct is measured.
    let sidecar_b = a_sidecar(&b, &binary, "sidecar-b", out, &config_b(out))?;
    let sidecar_a = a_sidecar(&a, &binary, "sidecar-a", out, &config_a(out))?;
    println!(
        "sidecar A as uid {PROXY_UID}   pid {}; sidecar B as uid {PROXY_UID}   pid {}",
        sidecar_a.pid(),
        sidecar_b.pid()
    );
    println!(
        "\nload from pod A: {} connections, HTTP/1.1 GET, closed loop; warm-up {:?}, then {:?} per window\n",
        plan.connections, plan.warmup, plan.measure
    );

    let pids = [sidecar_a.pid(), sidecar_b.pid()];
    let sockets = [out.join("sidecar-a.sock"), out.join("sidecar-b.sock")];
    let window = |target: SocketAddr, reuse: Reuse| -> anyhow::Result<(Outcome, f64)> {
        let warmup_stop = Arc::clone(&stop);
        let warmup = plan.warmup;
        let connections = plan.connections;
        a.within(move || pingpong::run_with(target, connections, warmup, &warmup_stop, reuse))?;
        for socket in &sockets {
            let _ = pilotfish::admin::client::request(socket, "POST", "/histograms?reset=true");
        }
        let before = cpu(&pids);
        let stop = Arc::clone(&stop);
        let measure = plan.measure;
        let o = a.within(move || pingpong::run_with(target, connections, measure, &stop, reuse))?;
        let used = (cpu(&pids) - before) as f64 / 100.0;
        let per_request_us = used * 1e6 / o.requests.max(1) as f64;
        anyhow::Ok((o, per_request_us))
    };

    let direct_app: SocketAddr = format!("{B_IP_DIRECT}:{APP_PORT}").parse()?;
    let (direct, _) = window(direct_app, Reuse::KeepAlive)?;
    let (direct_new, _) = window(direct_app, Reuse::PerRequest)?;

    for (pod, name) in [(&a, "sidecar-a"), (&b, "sidecar-b")] {
        let config = out.join(format!("{name}.toml"));
        let config = config.to_str().context("non-UTF-8 path")?;
        let installed = pod.exec(&[
            binary.to_str().context("non-UTF-8 path")?,
            "intercept",
            "install",
            "--config",
            config,
        ])?;
        print!("{}: {installed}", pod.name);
    }

    // The app's first call through the transparent mesh, as curl would.
    let first = a.within(move || first_call(app))?;
    println!("\npod A → http://{app}/ (no proxy configured in the app): {first}");
    let explicit: SocketAddr = EXPLICIT_OUT.parse()?;
    let (explicit_ka, cpu_explicit) = window(explicit, Reuse::KeepAlive)?;
    let (transparent, cpu_transparent) = window(app, Reuse::KeepAlive)?;
    let (explicit_new, _) = window(explicit, Reuse::PerRequest)?;
    let (transparent_new, _) = window(app, Reuse::PerRequest)?;
    let detect_a = detect_histogram(&sockets[0], "outbound")?;
    if stop.load(Ordering::Relaxed) {
        anyhow::bail!("interrupted; pods removed");
    }
    let all = [
        &direct,
        &explicit_ka,
        &transparent,
        &direct_new,
        &explicit_new,
        &transparent_new,
    ];
    anyhow::ensure!(
        all.iter().all(|o| o.requests > 0),
        "a window completed no request"
    );

    let mut report = String::from("Keep-alive round trip from pod A's app (µs)\n");
    report += &pingpong::table(&[
        ("direct", &direct),
        ("explicit-port mesh", &explicit_ka),
        ("transparent mesh", &transparent),
    ]);
    report += "\nA new connection per request (µs; connect included)\n";
    report += &pingpong::table(&[
        ("direct", &direct_new),
        ("explicit-port mesh", &explicit_new),
        ("transparent mesh", &transparent_new),
    ]);
    report += "\nLatency added (µs)          transparent    transparent    explicit\n";
    report += "                            over direct   over explicit   over direct\n";
    for (label, d, e, t) in [
        ("keep-alive", &direct, &explicit_ka, &transparent),
        (
            "new connection",
            &direct_new,
            &explicit_new,
            &transparent_new,
        ),
    ] {
        for p in [50.0, 99.0] {
            let at = |o: &Outcome| o.histogram.value_at_quantile(p / 100.0) as i64;
            report += &format!(
                "  {label:<15} p{p:<4} {:>13} {:>15} {:>13}\n",
                at(t) - at(d),
                at(t) - at(e),
                at(e) - at(d)
            );
        }
    }
    report += &format!(
        "sidecar CPU per request (both sidecars, keep-alive): transparent {cpu_transparent:.1} µs, explicit-port {cpu_explicit:.1} µs ({:.2}x)\n",
        cpu_transparent / cpu_explicit
    );
    report += &format!(
        "protocol detection at sidecar A (accept → protocol decided, from its admin socket, new-connection window): {} connections, p50 {} µs, p99 {} µs\n",
        detect_a.0, detect_a.1, detect_a.2
    );

    report += "\nInterception counters (each sidecar's /stats)\n";
    for (name, socket) in ["sidecar-a", "sidecar-b"].iter().zip(&sockets) {
        let (status, body) = pilotfish::admin::client::request(socket, "GET", "/stats")?;
        anyhow::ensure!(status == 200, "{name}: admin answered {status}: {body}");
        let stats: serde_json::Value = serde_json::from_str(&body)?;
        let i = &stats["total"]["intercept"];
        let fields: Vec<String> = i
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, v)| v.as_u64().is_some_and(|n| n > 0))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        report += &format!("  {name}: {}\n", fields.join(" "));
        let http = &stats["total"]["http"];
        if name == &"sidecar-b" {
            report += &format!(
                "  between the sidecars: mTLS, h2 by ALPN: {} requests on {} connection(s) accepted by sidecar B\n",
                http["h2_streams"].as_u64().unwrap_or(0),
                http["h2_connections"].as_u64().unwrap_or(0),
            );
        }
    }
    report += "\nEach sidecar's histograms from its admin socket (µs; the last window)\n";
    let named: Vec<(&str, PathBuf)> = ["sidecar-a", "sidecar-b"]
        .into_iter()
        .zip(sockets.iter().cloned())
        .collect();
    report += &crate::demo::histogram_tables(&named)?;
    report += &crate::demo::golden_table(&named)?;
    crate::demo::finish(
        out,
        "Pilotfish transparent mesh: round-trip latency by percentile (keep-alive)",
        &[
            ("direct", &direct.histogram),
            ("explicit-port mesh", &explicit_ka.histogram),
            ("transparent mesh", &transparent.histogram),
        ],
        &report,
    )?;
    // Sidecars stop (SIGTERM, drain) before their namespaces go; the rules
    // go with the namespaces.
    drop((sidecar_a, sidecar_b));
    Ok(())
}

/// Root and the tools, or a clear refusal.
fn preflight() -> anyhow::Result<()> {
    anyhow::ensure!(
        rustix::process::geteuid().is_root(),
        "demo --transparent needs root: it makes network namespaces, installs redirect rules in them and runs the sidecars as uid {PROXY_UID}; run it with sudo (the plain `demo` needs nothing)"
    );
    let have = |t: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let missing: Vec<&str> = ["ip", "setpriv", "sysctl"]
        .into_iter()
        .filter(|t| !have(t))
        .collect();
    anyhow::ensure!(
        missing.is_empty(),
        "demo --transparent needs {} (Debian: iproute2, util-linux, procps)",
        missing.join(", ")
    );
    anyhow::ensure!(
        have("nft") || have("iptables-restore"),
        "demo --transparent needs nft (Debian: nftables) or iptables-restore (iptables)"
    );
    Ok(())
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let o = Command::new("ip").args(args).output()?;
    anyhow::ensure!(
        o.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
    Ok(())
}

/// A pod: a network namespace, deleted with everything in it on drop.
struct Pod {
    name: String,
}

impl Pod {
    fn new(name: &str) -> anyhow::Result<Pod> {
        ip(&["netns", "add", name])?;
        let pod = Pod { name: name.into() };
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(pod)
    }

    /// `ip netns exec POD args...`, its stdout on success.
    fn exec(&self, args: &[&str]) -> anyhow::Result<String> {
        let o = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()?;
        anyhow::ensure!(
            o.status.success(),
            "in {}: {}: {}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&o.stderr)
        );
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// Runs `f` on a thread moved into this pod's network namespace: the
    /// sockets it (and the threads it spawns) opens are the pod's.
    fn within<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&ns),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .with_context(|| format!("setns {path}"))?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("a thread in the pod panicked"))?
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            });
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A sidecar in `pod`, as the proxy user.
fn a_sidecar(
    pod: &Pod,
    binary: &Path,
    name: &str,
    out: &Path,
    toml: &str,
) -> anyhow::Result<Sidecar> {
    let uid = PROXY_UID.to_string();
    let wrapper: Vec<String> = [
        "ip",
        "netns",
        "exec",
        &pod.name,
        "setpriv",
        &format!("--reuid={uid}"),
        &format!("--regid={uid}"),
        "--clear-groups",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Sidecar::start_with(binary, name, out, toml, &wrapper)
}

/// User + system CPU ticks of these processes.
fn cpu(pids: &[u32]) -> u64 {
    pids.iter()
        .map(|p| {
            let (u, s) = crate::compare::cpu_ticks(*p);
            u + s
        })
        .sum()
}

fn walk(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            all.extend(walk(&path)?);
        }
        all.push(path);
    }
    Ok(all)
}

/// One plain HTTP/1.1 request; its status line and body.
fn first_call(to: SocketAddr) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: service-b\r\nConnection: close\r\n\r\n")?;
    let mut response = Vec::new();
    s.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let status = text.lines().next().unwrap_or("").to_string();
    anyhow::ensure!(status.contains(" 200 "), "answered {text:?}");
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    Ok(format!(
        "{status}, {:?}",
        body.lines().next().unwrap_or("").trim()
    ))
}

/// (count, p50, p99) of a listener's protocol_detect histogram.
fn detect_histogram(socket: &Path, listener: &str) -> anyhow::Result<(u64, u64, u64)> {
    let (status, body) =
        pilotfish::admin::client::request(socket, "GET", "/histograms?format=json")?;
    anyhow::ensure!(status == 200, "admin answered {status}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body)?;
    let h = v
        .as_array()
        .into_iter()
        .flatten()
        .find(|h| h["key"]["metric"] == "protocol_detect" && h["key"]["listener"] == listener)
        .context("no protocol_detect histogram")?;
    let p = |want: f64| pilotfish::admin::client::percentile_us(h, want);
    Ok((h["count"].as_u64().unwrap_or(0), p(50.0), p(99.0)))
}

fn header(out: &Path, name: &str, service: &str) -> String {
    format!(
        r#"# written by pilotfish-bench demo --transparent
workers = 1
drain_timeout = "1s"
[admin]
socket = "{socket}"
[tls]
cert = "{tls}/cert.pem"
key = "{tls}/key.pem"
trust_bundle = "{tls}/ca.pem"
"#,
        socket = out.join(format!("{name}.sock")).display(),
        tls = out.join("pki").join(service).display(),
    )
}

/// Sidecar A: outbound interception of everything the app dials (the
/// cluster for B's app port carries it over mTLS), and an explicit
/// listener on loopback for the explicit-port comparison.
fn config_a(out: &Path) -> String {
    header(out, "sidecar-a", "service-a")
        + &format!(
            r#"[intercept]
outbound_listener = "outbound"
proxy_uid = {PROXY_UID}
proxy_gid = {PROXY_UID}

[[listeners]]
name = "outbound"
bind = "[::]:15001"
protocol = "auto"

[[listeners]]
name = "explicit"
bind = "{EXPLICIT_OUT}"
protocol = "http"
cluster = "service-b-explicit"

[[clusters]]
name = "service-b"
destinations = ["{B_IP}:{APP_PORT}"]
endpoints = ["{B_IP}:{APP_PORT}"]
tls = {{ server_identity = "{SERVICE_B}" }}

[[clusters]]
name = "service-b-explicit"
endpoints = ["{B_IP}:{EXPLICIT_IN_PORT}"]
tls = {{ server_identity = "{SERVICE_B}" }}
"#
        )
}

/// Sidecar B: inbound interception (mTLS only, service A only), and an
/// explicit mTLS listener on a port the rules leave alone.
fn config_b(out: &Path) -> String {
    header(out, "sidecar-b", "service-b")
        + &format!(
            r#"[intercept]
inbound_listener = "inbound"
proxy_uid = {PROXY_UID}
proxy_gid = {PROXY_UID}
exclude_inbound_ports = [{EXPLICIT_IN_PORT}]
inbound_mode = "strict"

[[listeners]]
name = "inbound"
bind = "[::]:15006"
protocol = "auto"
tls = {{}}
authorize = ["{SERVICE_A}"]

[[listeners]]
name = "explicit"
bind = "0.0.0.0:{EXPLICIT_IN_PORT}"
protocol = "http"
cluster = "app"
tls = {{ require_client_cert = true }}
authorize = ["{SERVICE_A}"]

[[clusters]]
name = "service-b"
direction = "inbound"
destinations = [":{APP_PORT}"]
endpoints = ["127.0.0.1:{APP_PORT}"]

[[clusters]]
name = "app"
endpoints = ["127.0.0.1:{APP_PORT}"]
"#
        )
}
