//! Side by side: Pilotfish, nginx and HAProxy in front of the same
//! upstream, under the same load, in one run, over several scenarios; and
//! the floor: a do-nothing forwarder on Pilotfish's runtime (`floor.rs`),
//! so each run shows how far Pilotfish is from the cheapest proxy of its
//! shape on that machine (not in the idle scenario: it is a CPU floor).
//!
//! Placement: every proxy alone on the last CPU (one worker each); the load
//! generators (wrk, our open-loop `load`, the L4 client) and the upstream
//! on the others, all pinned with taskset. Measurements are interleaved
//! (A B C A B C ...) and medians reported, because shared machines drift.
//!
//! Scenarios: HTTP/1.1 keep-alive with a small, a 16 KiB and a 1 MiB
//! response; a connection per request; L4 TCP bulk throughput; latency at
//! a fixed request rate (through-proxy percentile minus direct); idle
//! keep-alive connections (proxy RSS per connection). Per proxy:
//! requests/s or bytes/s, CPU µs per request (user+system from
//! /proc/PID/stat over the window), latency percentiles, RSS; and the
//! ratio Pilotfish/peer. A peer that is not installed is skipped with a
//! note. Results go to `<out>/<date>-<host>.md`, `.json` and `.svg`.

// The harness drives processes from plain threads, not workers.
#![allow(clippy::disallowed_methods)]

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use serde::Serialize;

use crate::sidecar::Sidecar;

pub(crate) const TICKS_PER_SEC: f64 = 100.0;
/// Idle connections held in the idle scenario (bounded further by the
/// file descriptors this process may open).
const IDLE_CONNECTIONS: usize = 10_000;
/// File descriptors asked for the proxies (10k clients + pooled upstreams).
const PROXY_NOFILE: u64 = 65_536;

pub(crate) struct Proc {
    pub(crate) child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM, not SIGKILL: nginx's master must take its workers along.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// A proxy under test.
struct Candidate {
    name: &'static str,
    http: SocketAddr,
    /// Its L4 (TCP) listener to the sink, if it has one.
    tcp: Option<SocketAddr>,
    /// Processes whose CPU and memory count as the proxy's.
    pids: Vec<u32>,
    _guard: Box<dyn std::any::Any>,
}

pub(crate) fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

pub(crate) fn installed(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub(crate) fn wait_listening(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on {addr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// User and system ticks of a process (all its threads).
pub(crate) fn cpu_ticks(pid: u32) -> (u64, u64) {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return (0, 0);
    };
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return (0, 0);
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    (
        f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0),
        f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0),
    )
}

fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .sum()
}

pub(crate) fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Whether children may be given [`PROXY_NOFILE`] descriptors (root with
/// CAP_SYS_RESOURCE; containers often lack it).
fn can_raise_nofile() -> bool {
    installed("prlimit")
        && Command::new("prlimit")
            .args([
                &format!("--nofile={PROXY_NOFILE}:{PROXY_NOFILE}"),
                "--",
                "true",
            ])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

/// This process's open-file limit (soft, hard).
fn nofile_limits() -> (u64, u64) {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            let line = l
                .lines()
                .find(|x| x.starts_with("Max open files"))?
                .to_string();
            let f: Vec<&str> = line.split_whitespace().collect();
            Some((f.get(3)?.parse().ok()?, f.get(4)?.parse().ok()?))
        })
        .unwrap_or((1024, 1024))
}

/// `taskset -c CPUS [prlimit --nofile=N:N --] PROGRAM`.
pub(crate) fn pinned(cpus: &str, program: &str, nofile: bool) -> Command {
    let mut c = Command::new("taskset");
    c.args(["-c", cpus]);
    if nofile {
        c.args([
            "prlimit",
            &format!("--nofile={PROXY_NOFILE}:{PROXY_NOFILE}"),
            "--",
        ]);
    }
    c.arg(program);
    c
}

/// The upstream: nginx serving `/` (12 B), `/16k` and `/1m` with keep-alive.
fn start_upstream_nginx(dir: &Path, listen: SocketAddr, cpus: &str) -> anyhow::Result<Proc> {
    let www = dir.join("www");
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("16k"), vec![b'x'; 16 * 1024])?;
    std::fs::write(www.join("1m"), vec![b'x'; 1024 * 1024])?;
    let conf = format!(
        "worker_processes 1;\ndaemon off;\nuser root;\npid {d}/nginx.pid;\nerror_log {d}/error.log crit;\nevents {{ worker_connections 4096; }}\nhttp {{\n access_log off;\n client_body_temp_path {d}/b; proxy_temp_path {d}/p; fastcgi_temp_path {d}/f; uwsgi_temp_path {d}/u; scgi_temp_path {d}/s;\n keepalive_requests 1000000;\n sendfile on;\n server {{ listen {listen}; root {w}; location = / {{ return 200 \"hello world\\n\"; }} }}\n}}\n",
        d = dir.display(),
        w = www.display(),
    );
    std::fs::write(dir.join("nginx.conf"), conf)?;
    let child = pinned(cpus, "nginx", false)
        .args(["-p", &dir.to_string_lossy(), "-c", "nginx.conf"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let p = Proc { child };
    wait_listening(listen)?;
    Ok(p)
}

fn nginx_stream_module() -> Option<&'static str> {
    ["/usr/lib/nginx/modules/ngx_stream_module.so"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}

/// How every peer proxy is started: CPU set, descriptor limit, connections.
struct Peer<'a> {
    cpus: &'a str,
    nofile: bool,
    connections: u64,
}

fn start_nginx_proxy(
    dir: &Path,
    http: SocketAddr,
    tcp: Option<(SocketAddr, SocketAddr)>,
    upstream: SocketAddr,
    peer: &Peer<'_>,
) -> anyhow::Result<Proc> {
    let Peer {
        cpus,
        nofile,
        connections,
    } = *peer;
    std::fs::create_dir_all(dir)?;
    let (load, stream) = match (tcp, nginx_stream_module()) {
        (Some((listen, sink)), Some(module)) => (
            format!("load_module {module};\n"),
            format!("stream {{ server {{ listen {listen}; proxy_pass {sink}; }} }}\n"),
        ),
        _ => (String::new(), String::new()),
    };
    let conf = format!(
        "{load}worker_processes 1;\n{rlimit}daemon off;\nuser root;\npid {d}/nginx.pid;\nerror_log {d}/error.log crit;\nevents {{ worker_connections {connections}; }}\n{stream}http {{\n access_log off;\n client_body_temp_path {d}/b; proxy_temp_path {d}/p; fastcgi_temp_path {d}/f; uwsgi_temp_path {d}/u; scgi_temp_path {d}/s;\n keepalive_requests 1000000;\n proxy_buffering off;\n proxy_buffer_size 64k;\n proxy_buffers 4 64k;\n proxy_busy_buffers_size 128k;\n upstream up {{ server {upstream}; keepalive 256; }}\n server {{ listen {http}; location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}\n}}\n",
        d = dir.display(),
        rlimit = if nofile { format!("worker_rlimit_nofile {PROXY_NOFILE};\n") } else { String::new() },
    );
    std::fs::write(dir.join("nginx.conf"), conf)?;
    let child = pinned(cpus, "nginx", nofile)
        .args(["-p", &dir.to_string_lossy(), "-c", "nginx.conf"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("stderr.log"))?)
        .spawn()?;
    let p = Proc { child };
    wait_listening(http).with_context(|| {
        let why = std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
        format!("nginx (proxy) did not start: {why}")
    })?;
    Ok(p)
}

fn start_haproxy(
    dir: &Path,
    (http, tcp): (SocketAddr, SocketAddr),
    upstream: SocketAddr,
    sink: SocketAddr,
    peer: &Peer<'_>,
) -> anyhow::Result<Proc> {
    let Peer {
        cpus,
        nofile,
        connections,
    } = *peer;
    std::fs::create_dir_all(dir)?;
    let conf = format!(
        "global\n nbthread 1\n maxconn {connections}\ndefaults\n timeout connect 5s\n timeout client 60s\n timeout server 60s\nfrontend f\n mode http\n bind {http}\n option http-keep-alive\n default_backend b\nbackend b\n mode http\n http-reuse always\n server s1 {upstream}\nlisten l4\n mode tcp\n bind {tcp}\n server sink {sink}\n"
    );
    std::fs::write(dir.join("haproxy.cfg"), conf)?;
    let child = pinned(cpus, "haproxy", nofile)
        .args(["-f", &dir.join("haproxy.cfg").to_string_lossy()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let p = Proc { child };
    wait_listening(http)?;
    Ok(p)
}

/// What wrk measured.
#[derive(Debug, Clone, Default)]
struct WrkRun {
    rps: f64,
    /// p50, p90, p99 in µs (wrk --latency).
    latency_us: [f64; 3],
}

fn wrk(
    url: &str,
    duration: Duration,
    connections: usize,
    cpus: &str,
    close: bool,
) -> anyhow::Result<WrkRun> {
    let mut cmd = pinned(cpus, "wrk", false);
    cmd.args([
        "-t1",
        &format!("-c{connections}"),
        &format!("-d{}s", duration.as_secs().max(1)),
        "--latency",
    ]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    let out = cmd.arg(url).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("Non-2xx") || text.contains("Socket errors") {
        bail!("wrk saw errors against {url}:\n{text}");
    }
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk output:\n{text}"))?;
    let pct = |label: &str| -> f64 {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(label))
            .map(|v| parse_wrk_time(v.trim()))
            .unwrap_or(f64::NAN)
    };
    Ok(WrkRun {
        rps,
        latency_us: [pct("50%"), pct("90%"), pct("99%")],
    })
}

/// wrk's `1.23ms`, `456.00us`, `2.00s` → µs.
fn parse_wrk_time(v: &str) -> f64 {
    let (num, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e6)
    } else {
        (v, f64::NAN)
    };
    num.parse::<f64>().map_or(f64::NAN, |n| n * scale)
}

/// One scenario's numbers for one proxy (medians over rounds).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Row {
    pub proxy: String,
    /// Requests/s (HTTP), or Gbit/s (L4), or idle connections held.
    pub throughput: f64,
    pub unit: &'static str,
    /// CPU µs per request (HTTP), CPU s per GiB (L4), RSS KiB per
    /// connection (idle), added p99 µs (fixed rate).
    pub cost: f64,
    pub cost_unit: &'static str,
    /// Each round's cost, in the order they ran: the spread behind the
    /// median (one value where the scenario runs once).
    pub cost_rounds: Vec<f64>,
    pub user_us: Option<f64>,
    /// p50, p90, p99 (µs): from wrk, or the fixed-rate run.
    pub latency_us: Option<[f64; 3]>,
    pub rss_kib: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ScenarioResult {
    pub name: String,
    pub description: String,
    pub direct: Option<Row>,
    pub rows: Vec<Row>,
    pub notes: Vec<String>,
}

/// A median with the range of the rounds behind it: "11.38 (11.20–11.52)".
fn with_spread(median: f64, rounds: &[f64]) -> String {
    let lo = rounds.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = rounds.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if rounds.len() > 1 {
        format!("{median:.2} ({lo:.2}–{hi:.2})")
    } else {
        format!("{median:.2}")
    }
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct Setup {
    rounds: usize,
    duration: Duration,
    load_cpus: String,
    candidates: Vec<Candidate>,
    upstream: SocketAddr,
    sink: SocketAddr,
}

pub struct Options {
    pub quick: bool,
    pub binary: Option<PathBuf>,
    pub runtime: String,
    pub out: PathBuf,
}

pub fn run(o: &Options) -> anyhow::Result<()> {
    anyhow::ensure!(
        installed("wrk") && installed("taskset"),
        "wrk and taskset are needed (apt-get install wrk util-linux)"
    );
    anyhow::ensure!(
        installed("nginx"),
        "nginx is needed as the common upstream (apt-get install nginx-light)"
    );
    let binary = crate::sidecar::locate_binary(o.binary.clone())?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (proxy_cpu, load_cpus) = if cpus >= 2 {
        (format!("{}", cpus - 1), format!("0-{}", cpus - 2))
    } else {
        ("0".into(), "0".into())
    };
    let nofile = can_raise_nofile();
    let proxy_fds = if nofile {
        PROXY_NOFILE
    } else {
        nofile_limits().1
    };
    // Each idle client holds one descriptor in the proxy; HAProxy reserves
    // two per connection it admits, so half the limit (less a margin) is
    // what every proxy can be asked to hold.
    let idle_target = if o.quick { 500 } else { IDLE_CONNECTIONS }
        .min((proxy_fds.saturating_sub(1000) / 2) as usize);
    let proxy_connections = idle_target as u64 + 256;
    let dir = std::env::temp_dir().join(format!("pilotfish-compare-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let placement = format!(
        "proxy on CPU {proxy_cpu} (one worker); wrk, the load generator, the L4 client, the sink and the upstream (nginx) on CPU {load_cpus}"
    );
    println!("placement: {placement}");

    let upstream = free_addr()?;
    let _upstream = start_upstream_nginx(&dir.join("upstream"), upstream, &load_cpus)?;
    let sink = crate::l4::sink()?;

    let mut candidates = Vec::new();
    let mut notes = Vec::new();
    if !o.quick && idle_target < IDLE_CONNECTIONS {
        notes.push(format!(
            "idle scenario: {idle_target} connections instead of {IDLE_CONNECTIONS}: the proxies may open {proxy_fds} files and HAProxy reserves two per connection"
        ));
    }
    let pf_toml = format!(
        "workers = 1\nmax_connections_per_worker = {proxy_connections}\n{}\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ncluster = \"up\"\nidle_timeout = \"5m\"\n[[listeners]]\nname = \"tcp\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\ncluster = \"sink\"\n[[clusters]]\nname = \"up\"\nendpoints = [\"{upstream}\"]\n[[clusters]]\nname = \"sink\"\nendpoints = [\"{sink}\"]\n",
        o.runtime
    );
    let pf_bin = dir.join("pilotfish-pinned.sh");
    let limit = if nofile {
        format!("prlimit --nofile={PROXY_NOFILE}:{PROXY_NOFILE} -- ")
    } else {
        String::new()
    };
    std::fs::write(
        &pf_bin,
        format!(
            "#!/bin/sh\nexec taskset -c {proxy_cpu} {limit}{} \"$@\"\n",
            binary.display()
        ),
    )?;
    Command::new("chmod")
        .args(["+x", &pf_bin.to_string_lossy()])
        .status()?;
    let sidecar = Sidecar::start(&pf_bin, "pilotfish", &dir, &pf_toml)?;
    candidates.push(Candidate {
        name: "pilotfish",
        http: sidecar.listener("web")?,
        tcp: Some(sidecar.listener("tcp")?),
        pids: vec![sidecar.pid()],
        _guard: Box::new(sidecar),
    });
    let peer = Peer {
        cpus: &proxy_cpu,
        nofile,
        connections: proxy_connections,
    };
    // nginx is installed (it is the upstream), so it is always a peer.
    {
        let http = free_addr()?;
        let tcp = nginx_stream_module().map(|_| free_addr()).transpose()?;
        let p = start_nginx_proxy(
            &dir.join("nginx-proxy"),
            http,
            tcp.map(|t| (t, sink)),
            upstream,
            &peer,
        )?;
        if tcp.is_none() {
            notes.push(
                "nginx: no stream module installed (nginx-light lacks it): no L4 numbers for nginx"
                    .to_string(),
            );
        }
        let mut pids = vec![p.child.id()];
        pids.extend(children(p.child.id()));
        candidates.push(Candidate {
            name: "nginx",
            http,
            tcp,
            pids,
            _guard: Box::new(p),
        });
    }
    if installed("haproxy") {
        let (http, tcp) = (free_addr()?, free_addr()?);
        let p = start_haproxy(&dir.join("haproxy"), (http, tcp), upstream, sink, &peer)?;
        let mut pids = vec![p.child.id()];
        pids.extend(children(p.child.id()));
        candidates.push(Candidate {
            name: "haproxy",
            http,
            tcp: Some(tcp),
            pids,
            _guard: Box::new(p),
        });
    } else {
        notes.push("haproxy: not installed, skipped".to_string());
    }
    {
        // The floor: the cheapest proxy of this shape on this machine.
        let (http, tcp) = (free_addr()?, free_addr()?);
        let child = pinned(
            &proxy_cpu,
            &std::env::current_exe()?.to_string_lossy(),
            nofile,
        )
        .args([
            "floor",
            "--route",
            &format!("{http}={upstream}"),
            "--route",
            &format!("{tcp}={sink}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
        let p = Proc { child };
        wait_listening(http)?;
        wait_listening(tcp)?;
        candidates.push(Candidate {
            name: "floor",
            http,
            tcp: Some(tcp),
            pids: vec![p.child.id()],
            _guard: Box::new(p),
        });
    }
    for n in &notes {
        println!("note: {n}");
    }

    let setup = Setup {
        rounds: if o.quick { 1 } else { 3 },
        duration: Duration::from_secs(if o.quick { 1 } else { 5 }),
        load_cpus,
        candidates,
        upstream,
        sink,
    };
    let mut results = Vec::new();
    for (name, path, connections, close) in [
        ("small keep-alive", "/", 64, false),
        ("16 KiB keep-alive", "/16k", 64, false),
        ("1 MiB keep-alive", "/1m", 8, false),
        ("connection per request", "/", 16, true),
    ] {
        let r = http_scenario(&setup, name, path, connections, close)?;
        print_result(&r);
        results.push(r);
    }
    let r = l4_scenario(&setup, if o.quick { 32 } else { 512 })?;
    print_result(&r);
    results.push(r);
    let r = fixed_rate_scenario(&setup, if o.quick { 1000.0 } else { 2000.0 })?;
    print_result(&r);
    results.push(r);
    let r = idle_scenario(&setup, idle_target)?;
    print_result(&r);
    results.push(r);

    let summary = ratio_table(&results);
    println!("\n{summary}");
    write_results(&o.out, &placement, &notes, &results, &summary)?;
    drop(setup);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn cpu_window<T>(
    pids: &[u32],
    f: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, f64, f64)> {
    let before: Vec<(u64, u64)> = pids.iter().map(|p| cpu_ticks(*p)).collect();
    let t = f()?;
    let after: Vec<(u64, u64)> = pids.iter().map(|p| cpu_ticks(*p)).collect();
    let (user, sys) = before
        .iter()
        .zip(&after)
        .fold((0u64, 0u64), |(u, s), (b, a)| {
            (u + a.0 - b.0, s + a.1 - b.1)
        });
    Ok((t, user as f64 / TICKS_PER_SEC, sys as f64 / TICKS_PER_SEC))
}

fn http_scenario(
    s: &Setup,
    name: &str,
    path: &str,
    connections: usize,
    close: bool,
) -> anyhow::Result<ScenarioResult> {
    println!(
        "\n== {name}: wrk -t1 -c{connections} -d{}s{} GET {path}, {} round(s)",
        s.duration.as_secs(),
        if close { " (Connection: close)" } else { "" },
        s.rounds
    );
    let url = |a: SocketAddr| format!("http://{a}{path}");
    let direct = wrk(
        &url(s.upstream),
        s.duration,
        connections,
        &s.load_cpus,
        close,
    )?;
    let mut samples: Vec<Vec<(WrkRun, f64, f64)>> = vec![Vec::new(); s.candidates.len()];
    for c in &s.candidates {
        wrk(
            &url(c.http),
            Duration::from_secs(1),
            connections,
            &s.load_cpus,
            close,
        )?; // warm-up
    }
    for _ in 0..s.rounds {
        for (i, c) in s.candidates.iter().enumerate() {
            let started = Instant::now();
            let (run, user, sys) = cpu_window(&c.pids, || {
                wrk(&url(c.http), s.duration, connections, &s.load_cpus, close)
            })?;
            let requests = run.rps * started.elapsed().as_secs_f64();
            samples[i].push((run, (user + sys) * 1e6 / requests, user * 1e6 / requests));
        }
    }
    let rows = s
        .candidates
        .iter()
        .zip(&samples)
        .map(|(c, v)| Row {
            proxy: c.name.into(),
            throughput: median(v.iter().map(|x| x.0.rps).collect()),
            unit: "req/s",
            cost: median(v.iter().map(|x| x.1).collect()),
            cost_unit: "CPU µs/req",
            cost_rounds: v.iter().map(|x| x.1).collect(),
            user_us: Some(median(v.iter().map(|x| x.2).collect())),
            latency_us: Some(std::array::from_fn(|k| {
                median(v.iter().map(|x| x.0.latency_us[k]).collect())
            })),
            rss_kib: rss_kib(&c.pids),
        })
        .collect();
    Ok(ScenarioResult {
        name: name.into(),
        description: format!(
            "HTTP/1.1 GET {path}, wrk -t1 -c{connections}{}",
            if close { ", Connection: close" } else { "" }
        ),
        direct: Some(Row {
            proxy: "direct".into(),
            throughput: direct.rps,
            unit: "req/s",
            latency_us: Some(direct.latency_us),
            ..Row::default()
        }),
        rows,
        notes: Vec::new(),
    })
}

/// Pushes `bytes` through `target` to the sink; returns seconds taken.
fn push(target: SocketAddr, bytes: usize) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut s = TcpStream::connect(target)?;
    let chunk = vec![0x5a_u8; 256 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        s.write_all(&chunk[..n])?;
        left -= n;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut count = [0u8; 8];
    s.read_exact(&mut count)?;
    anyhow::ensure!(
        u64::from_le_bytes(count) == bytes as u64,
        "the sink saw {} of {bytes} bytes",
        u64::from_le_bytes(count)
    );
    Ok(started.elapsed().as_secs_f64())
}

fn l4_scenario(s: &Setup, mib: usize) -> anyhow::Result<ScenarioResult> {
    println!(
        "\n== L4 bulk: {mib} MiB client → proxy → sink, {} round(s)",
        s.rounds
    );
    let bytes = mib * 1024 * 1024;
    let gbps = |secs: f64| bytes as f64 * 8.0 / secs / 1e9;
    // The client is this process: pin the pushing thread to the load CPUs.
    let load_cpus = s.load_cpus.clone();
    let pinned_push = move |target| {
        let cpus = load_cpus.clone();
        std::thread::spawn(move || {
            let first = cpus
                .split(['-', ','])
                .next()
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            core_affinity::set_for_current(core_affinity::CoreId { id: first });
            push(target, bytes)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("push thread panicked"))?
    };
    let direct = gbps(pinned_push(s.sink)?);
    let l4: Vec<&Candidate> = s.candidates.iter().filter(|c| c.tcp.is_some()).collect();
    let mut samples: Vec<Vec<(f64, f64)>> = vec![Vec::new(); l4.len()];
    for _ in 0..s.rounds {
        for (i, c) in l4.iter().enumerate() {
            let target = c.tcp.expect("filtered");
            let (secs, user, sys) = cpu_window(&c.pids, || pinned_push(target))?;
            samples[i].push((
                gbps(secs),
                (user + sys) / (bytes as f64 / (1u64 << 30) as f64),
            ));
        }
    }
    let rows = l4
        .iter()
        .zip(&samples)
        .map(|(c, v)| Row {
            proxy: c.name.into(),
            throughput: median(v.iter().map(|x| x.0).collect()),
            unit: "Gbit/s",
            cost: median(v.iter().map(|x| x.1).collect()),
            cost_unit: "CPU s/GiB",
            cost_rounds: v.iter().map(|x| x.1).collect(),
            rss_kib: rss_kib(&c.pids),
            ..Row::default()
        })
        .collect();
    Ok(ScenarioResult {
        name: "L4 bulk".into(),
        description: format!("{mib} MiB one way over one TCP connection"),
        direct: Some(Row {
            proxy: "direct".into(),
            throughput: direct,
            unit: "Gbit/s",
            ..Row::default()
        }),
        rows,
        notes: Vec::new(),
    })
}

fn fixed_rate_scenario(s: &Setup, rate: f64) -> anyhow::Result<ScenarioResult> {
    println!(
        "\n== fixed rate: {rate:.0} req/s open loop, 16 connections, {} round(s)",
        s.rounds
    );
    let measure = |target: SocketAddr| -> anyhow::Result<[f64; 3]> {
        let spec = crate::load::Spec {
            target,
            mode: crate::load::Mode::Http,
            rate: Some(rate),
            connections: 16,
            threads: 1,
            duration: s.duration.max(Duration::from_secs(1)),
            warmup: Duration::from_millis(300),
            request: crate::load::http_request("GET", "/", "bench", &[], 0, false),
            timeout: Duration::from_secs(10),
        };
        let r = crate::load::run(&spec)?;
        anyhow::ensure!(
            r.errors.is_empty(),
            "errors against {target}: {:?}",
            r.errors
        );
        Ok([0.5, 0.9, 0.99].map(|q| r.corrected.value_at_quantile(q) as f64))
    };
    let mut direct = Vec::new();
    let mut samples: Vec<Vec<[f64; 3]>> = vec![Vec::new(); s.candidates.len()];
    for _ in 0..s.rounds {
        direct.push(measure(s.upstream)?);
        for (i, c) in s.candidates.iter().enumerate() {
            samples[i].push(measure(c.http)?);
        }
    }
    let med = |v: &[[f64; 3]]| -> [f64; 3] {
        std::array::from_fn(|k| median(v.iter().map(|x| x[k]).collect()))
    };
    let d = med(&direct);
    let rows = s
        .candidates
        .iter()
        .zip(&samples)
        .map(|(c, v)| {
            let m = med(v);
            Row {
                proxy: c.name.into(),
                throughput: rate,
                unit: "req/s",
                cost: m[2] - d[2],
                cost_unit: "added p99 µs",
                // Each round against the direct run of the same round.
                cost_rounds: v.iter().zip(&direct).map(|(x, d)| x[2] - d[2]).collect(),
                latency_us: Some(m),
                rss_kib: rss_kib(&c.pids),
                ..Row::default()
            }
        })
        .collect();
    Ok(ScenarioResult {
        name: "fixed rate".into(),
        description: format!("{rate:.0} req/s open loop (coordinated omission corrected), 16 connections; added = proxy percentile - direct"),
        direct: Some(Row {
            proxy: "direct".into(),
            throughput: rate,
            unit: "req/s",
            latency_us: Some(d),
            ..Row::default()
        }),
        rows,
        notes: Vec::new(),
    })
}

fn idle_scenario(s: &Setup, wanted: usize) -> anyhow::Result<ScenarioResult> {
    // Our own descriptors bound how many we can hold.
    let soft = nofile_limits().0 as usize;
    let n = wanted.min(soft.saturating_sub(256));
    println!("\n== idle keep-alive: {n} connections, one request each, then held idle");
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    if n < wanted {
        notes.push(format!(
            "{n} connections instead of {wanted}: this process may open {soft} files"
        ));
    }
    // The floor holds an upstream connection and two buffers per client
    // connection: it is a floor for CPU, not for memory.
    for c in s.candidates.iter().filter(|c| c.name != "floor") {
        let before = rss_kib(&c.pids);
        let mut held = Vec::with_capacity(n);
        let mut buf = [0u8; 4096];
        for _ in 0..n {
            let mut t = TcpStream::connect(c.http)?;
            t.set_read_timeout(Some(Duration::from_secs(10)))?;
            t.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")?;
            let got = t.read(&mut buf)?;
            anyhow::ensure!(
                buf[..got].starts_with(b"HTTP/1.1 200"),
                "{}: no 200 on an idle-test connection",
                c.name
            );
            held.push(t);
        }
        std::thread::sleep(Duration::from_millis(300));
        let after = rss_kib(&c.pids);
        drop(held);
        rows.push(Row {
            proxy: c.name.into(),
            throughput: n as f64,
            unit: "connections",
            cost: (after.saturating_sub(before)) as f64 / n as f64,
            cost_unit: "KiB RSS/conn",
            cost_rounds: vec![(after.saturating_sub(before)) as f64 / n as f64],
            rss_kib: after,
            ..Row::default()
        });
        std::thread::sleep(Duration::from_millis(300));
    }
    Ok(ScenarioResult {
        name: "idle keep-alive".into(),
        description: format!("{n} idle keep-alive client connections; RSS growth per connection"),
        direct: None,
        rows,
        notes,
    })
}

fn print_result(r: &ScenarioResult) {
    println!(
        "{:<12}{:>14}{:>16}{:>12}{:>30}{:>12}",
        "proxy", "throughput", "cost", "user µs", "p50/p90/p99 µs", "RSS MiB"
    );
    for row in r.direct.iter().chain(&r.rows) {
        let lat = row.latency_us.map_or("-".to_string(), |l| {
            format!("{:.0}/{:.0}/{:.0}", l[0], l[1], l[2])
        });
        println!(
            "{:<12}{:>14}{:>16}{:>12}{:>30}{:>12}",
            row.proxy,
            format!("{:.2} {}", row.throughput, short(row.unit)),
            if row.cost_unit.is_empty() {
                "-".to_string()
            } else {
                format!("{:.2}", row.cost)
            },
            row.user_us.map_or("-".to_string(), |u| format!("{u:.1}")),
            lat,
            if row.proxy == "direct" {
                "-".to_string()
            } else {
                format!("{:.1}", row.rss_kib as f64 / 1024.0)
            },
        );
    }
    if let Some(unit) = r.rows.first().map(|r| r.cost_unit) {
        println!("(cost: {unit})");
    }
    for n in &r.notes {
        println!("note: {n}");
    }
}

fn short(unit: &str) -> &str {
    match unit {
        "connections" => "conn",
        u => u,
    }
}

/// Pilotfish / peer for each scenario: throughput (higher is better) and
/// cost (lower is better).
fn ratio_table(results: &[ScenarioResult]) -> String {
    let peers: Vec<String> = results
        .iter()
        .flat_map(|r| r.rows.iter().map(|x| x.proxy.clone()))
        .filter(|p| p != "pilotfish")
        .fold(Vec::new(), |mut v, p| {
            if !v.contains(&p) {
                v.push(p);
            }
            v
        });
    let mut out =
        String::from("Pilotfish / peer (throughput: >1 is better; cost: <1 is better)\n\n");
    out += "| scenario | cost unit |";
    for p in &peers {
        out += &format!(" throughput vs {p} | cost vs {p} |");
    }
    out += "\n|---|---|";
    for _ in &peers {
        out += "---|---|";
    }
    out += "\n";
    for r in results {
        let Some(pf) = r.rows.iter().find(|x| x.proxy == "pilotfish") else {
            continue;
        };
        out += &format!("| {} | {} |", r.name, pf.cost_unit);
        for p in &peers {
            match r.rows.iter().find(|x| &x.proxy == p) {
                Some(peer) => {
                    let t = if r.name == "fixed rate" || r.name == "idle keep-alive" {
                        "-".to_string()
                    } else {
                        format!("{:.2}", pf.throughput / peer.throughput)
                    };
                    // Added latency can be ~0 or negative within noise: a
                    // ratio would mislead, so show the difference instead.
                    let c = if r.name == "fixed rate" {
                        format!("{:+.0} µs", pf.cost - peer.cost)
                    } else if peer.cost.abs() < 1e-9 {
                        "-".to_string()
                    } else {
                        format!("{:.2}", pf.cost / peer.cost)
                    };
                    out += &format!(" {t} | {c} |");
                }
                None => out += " - | - |",
            }
        }
        out += "\n";
    }
    out
}

fn write_results(
    dir: &Path,
    placement: &str,
    notes: &[String],
    results: &[ScenarioResult],
    summary: &str,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_else(|_| "host".into())
        .trim()
        .to_string();
    let date = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let day = &date[..10];
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let base = dir.join(format!("{day}-{host}"));
    let mut md = format!(
        "# pilotfish-bench compare, {date}\n\nMachine: {host}, {cpus} CPUs, Linux {}\nPlacement: {placement}\n\n",
        kernel.trim()
    );
    for n in notes {
        md += &format!("- note: {n}\n");
    }
    md += &format!("\n{summary}\n");
    for r in results {
        md += &format!("\n## {}\n\n{}\n\n| proxy | throughput | {}, median (range of rounds) | user µs/req | p50/p90/p99 µs | RSS MiB |\n|---|---|---|---|---|---|\n", r.name, r.description, r.rows.first().map_or("cost", |x| x.cost_unit));
        for row in r.direct.iter().chain(&r.rows) {
            md += &format!(
                "| {} | {:.2} {} | {} | {} | {} | {} |\n",
                row.proxy,
                row.throughput,
                row.unit,
                if row.proxy == "direct" {
                    "-".into()
                } else {
                    with_spread(row.cost, &row.cost_rounds)
                },
                row.user_us.map_or("-".into(), |u| format!("{u:.1}")),
                row.latency_us.map_or("-".into(), |l| format!(
                    "{:.0}/{:.0}/{:.0}",
                    l[0], l[1], l[2]
                )),
                if row.proxy == "direct" {
                    "-".into()
                } else {
                    format!("{:.1}", row.rss_kib as f64 / 1024.0)
                },
            );
        }
        for n in &r.notes {
            md += &format!("\nnote: {n}\n");
        }
    }
    std::fs::write(base.with_extension("md"), md)?;
    let json = serde_json::json!({
        "date": date,
        "host": host,
        "cpus": cpus,
        "kernel": kernel.trim(),
        "placement": placement,
        "notes": notes,
        "scenarios": results,
    });
    std::fs::write(
        base.with_extension("json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    std::fs::write(base.with_extension("svg"), ratio_svg(results))?;
    println!("wrote {}.md, .json and .svg", base.display());
    Ok(())
}

/// A bar chart of Pilotfish's cost relative to each peer, per scenario
/// (1.0 = the same; below is cheaper).
fn ratio_svg(results: &[ScenarioResult]) -> String {
    let mut bars: Vec<(String, f64)> = Vec::new();
    for r in results {
        let Some(pf) = r.rows.iter().find(|x| x.proxy == "pilotfish") else {
            continue;
        };
        for peer in r.rows.iter().filter(|x| x.proxy != "pilotfish") {
            if r.name != "fixed rate" && peer.cost.abs() > 1e-9 && pf.cost.is_finite() {
                bars.push((format!("{} vs {}", r.name, peer.proxy), pf.cost / peer.cost));
            }
        }
    }
    let (w, row_h, left) = (760.0, 22.0, 260.0);
    let h = 60.0 + row_h * bars.len() as f64;
    let max = bars.iter().map(|b| b.1).fold(2.0_f64, f64::max).min(10.0);
    let x = |v: f64| left + (v.min(max) / max) * (w - left - 40.0);
    let mut svg = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<text x=\"10\" y=\"20\" font-size=\"14\">Pilotfish cost / peer cost (lower is better; line = 1.0)</text>\n");
    for (i, (label, v)) in bars.iter().enumerate() {
        let y = 40.0 + row_h * i as f64;
        let color = if *v <= 1.0 { "#2a7" } else { "#c54" };
        svg += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{label}</text><rect x=\"{left}\" y=\"{}\" width=\"{:.1}\" height=\"{}\" fill=\"{color}\"/><text x=\"{:.1}\" y=\"{}\">{v:.2}</text>\n",
            left - 6.0,
            y + 14.0,
            y + 3.0,
            x(*v) - left,
            row_h - 6.0,
            x(*v) + 4.0,
            y + 14.0
        );
    }
    svg += &format!(
        "<line x1=\"{0:.1}\" y1=\"35\" x2=\"{0:.1}\" y2=\"{1}\" stroke=\"#333\" stroke-dasharray=\"4 3\"/>\n</svg>\n",
        x(1.0),
        h - 10.0
    );
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_times_parse() {
        assert_eq!(parse_wrk_time("456.00us"), 456.0);
        assert_eq!(parse_wrk_time("1.50ms"), 1500.0);
        assert_eq!(parse_wrk_time("2.00s"), 2e6);
        assert!(parse_wrk_time("x").is_nan());
    }

    #[test]
    fn a_median_shows_the_range_of_its_rounds() {
        assert_eq!(
            with_spread(11.4, &[11.9, 11.2, 11.4]),
            "11.40 (11.20–11.90)"
        );
        assert_eq!(with_spread(3.5, &[3.5]), "3.50", "one round: no range");
    }

    #[test]
    fn ratios_divide_pilotfish_by_each_peer() {
        let row = |p: &str, t: f64, c: f64| Row {
            proxy: p.into(),
            throughput: t,
            cost: c,
            cost_unit: "CPU µs/req",
            ..Row::default()
        };
        let r = ScenarioResult {
            name: "small keep-alive".into(),
            rows: vec![row("pilotfish", 100.0, 10.0), row("nginx", 50.0, 20.0)],
            ..ScenarioResult::default()
        };
        let t = ratio_table(std::slice::from_ref(&r));
        assert!(
            t.contains("| small keep-alive | CPU µs/req | 2.00 | 0.50 |"),
            "{t}"
        );
        assert!(ratio_svg(&[r]).contains(">0.50</text>"));
    }
}
