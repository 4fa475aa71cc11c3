//! Side by side: Pilotfish, nginx and HAProxy as HTTP/1.1 reverse proxies
//! in front of the same upstream, under the same load, in one run.
//!
//! Placement (2-core machines): the proxy alone on the last CPU; the load
//! generator (wrk) and the upstream (an nginx returning a small body) on
//! the others, all pinned with taskset. Every proxy runs one worker and
//! keeps upstream connections alive. Rounds are interleaved (A B C A B C)
//! and medians reported, because shared machines drift.
//!
//! Per proxy: requests/s, proxy CPU µs per request (user+system from
//! /proc/PID/stat over the measured window), of which user space, and the
//! ratio to each peer. A peer that is not installed is skipped with a note.

// The harness drives processes from plain threads, not workers.
#![allow(clippy::disallowed_methods)]

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

use crate::sidecar::Sidecar;

const TICKS_PER_SEC: f64 = 100.0;

struct Proc {
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// A measured proxy under test.
struct Candidate {
    name: &'static str,
    addr: SocketAddr,
    /// Processes whose CPU counts as the proxy's (master and workers).
    pids: Vec<u32>,
    /// Stops the proxy when the candidate is dropped.
    _guard: Box<dyn std::any::Any>,
}

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn installed(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn wait_listening(addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on {addr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// User and system ticks of a process and its threads.
fn cpu_ticks(pid: u32) -> (u64, u64) {
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

fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn pinned(cpus: &str, program: &str) -> Command {
    let mut c = Command::new("taskset");
    c.args(["-c", cpus, program]);
    c
}

fn nginx_conf(dir: &Path, listen: SocketAddr, body: &str) -> String {
    format!(
        "worker_processes 1;\ndaemon off;\nuser root;\npid {d}/nginx.pid;\nerror_log {d}/error.log crit;\nevents {{ worker_connections 4096; }}\nhttp {{\n access_log off;\n client_body_temp_path {d}/b; proxy_temp_path {d}/p; fastcgi_temp_path {d}/f; uwsgi_temp_path {d}/u; scgi_temp_path {d}/s;\n keepalive_requests 1000000;\n {body}\n server {{ listen {listen}; {server} }}\n}}\n",
        d = dir.display(),
        server = if body.contains("upstream") { "location / { proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\"; }" } else { "location / { return 200 \"hello world\\n\"; }" },
    )
}

fn start_nginx(
    dir: &Path,
    listen: SocketAddr,
    upstream: Option<SocketAddr>,
    cpus: &str,
) -> anyhow::Result<Proc> {
    std::fs::create_dir_all(dir)?;
    let extra = upstream.map_or(String::new(), |u| {
        format!("upstream up {{ server {u}; keepalive 64; }}")
    });
    std::fs::write(dir.join("nginx.conf"), nginx_conf(dir, listen, &extra))?;
    let child = pinned(cpus, "nginx")
        .args(["-p", dir.to_str().unwrap_or("."), "-c", "nginx.conf"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    wait_listening(listen)?;
    Ok(Proc { child })
}

fn start_haproxy(
    dir: &Path,
    listen: SocketAddr,
    upstream: SocketAddr,
    cpus: &str,
) -> anyhow::Result<Proc> {
    std::fs::create_dir_all(dir)?;
    let conf = format!(
        "global\n nbthread 1\n maxconn 4096\ndefaults\n mode http\n timeout connect 5s\n timeout client 30s\n timeout server 30s\n http-reuse always\n option http-keep-alive\nfrontend f\n bind {listen}\n default_backend b\nbackend b\n server s1 {upstream}\n"
    );
    std::fs::write(dir.join("haproxy.cfg"), conf)?;
    let child = pinned(cpus, "haproxy")
        .args(["-f", dir.join("haproxy.cfg").to_str().unwrap_or("")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    wait_listening(listen)?;
    Ok(Proc { child })
}

/// wrk's requests/s for `duration` against `addr`.
fn wrk(
    addr: SocketAddr,
    duration: Duration,
    connections: usize,
    cpus: &str,
) -> anyhow::Result<f64> {
    let out = pinned(cpus, "wrk")
        .args([
            "-t1",
            &format!("-c{connections}"),
            &format!("-d{}s", duration.as_secs()),
            &format!("http://{addr}/"),
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("Non-2xx") || text.contains("Socket errors") {
        bail!("wrk saw errors against {addr}:\n{text}");
    }
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk output:\n{text}"))
}

#[derive(Default, Clone)]
struct Sample {
    rps: f64,
    cpu_us: f64,
    user_us: f64,
}

pub fn run(quick: bool, binary: Option<PathBuf>, runtime: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        installed("wrk") && installed("taskset"),
        "wrk and taskset are needed (apt-get install wrk util-linux)"
    );
    let binary = crate::sidecar::locate_binary(binary)?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (proxy_cpu, load_cpus) = if cpus >= 2 {
        (format!("{}", cpus - 1), format!("0-{}", cpus - 2))
    } else {
        ("0".into(), "0".into())
    };
    let (rounds, duration) = if quick {
        (1, Duration::from_secs(2))
    } else {
        (3, Duration::from_secs(8))
    };
    let connections = 64;
    println!("HTTP/1.1 keep-alive, small body (12 B), wrk -t1 -c{connections} -d{}s, {rounds} interleaved round(s), medians", duration.as_secs());
    println!("placement: proxy on CPU {proxy_cpu}; wrk and the upstream (nginx, return 200) on CPU {load_cpus}; one proxy worker");
    let dir = std::env::temp_dir().join(format!("pilotfish-compare-{}", std::process::id()));
    let upstream_addr = free_addr()?;
    let _upstream = start_nginx(&dir.join("upstream"), upstream_addr, None, &load_cpus)?;

    let mut candidates = Vec::new();
    let pf_toml = format!(
        "workers = 1\n{runtime}\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ncluster = \"up\"\n[[clusters]]\nname = \"up\"\nendpoints = [\"{upstream_addr}\"]\n"
    );
    std::fs::create_dir_all(&dir)?;
    let pf_bin = dir.join("pilotfish-pinned.sh");
    std::fs::write(
        &pf_bin,
        format!(
            "#!/bin/sh\nexec taskset -c {proxy_cpu} {} \"$@\"\n",
            binary.display()
        ),
    )?;
    Command::new("chmod")
        .args(["+x", pf_bin.to_str().unwrap_or("")])
        .status()?;
    let sidecar = Sidecar::start(&pf_bin, "pilotfish", &dir, &pf_toml)?;
    candidates.push(Candidate {
        name: "pilotfish",
        addr: sidecar.listener("web")?,
        pids: vec![sidecar.pid()],
        _guard: Box::new(sidecar),
    });
    if installed("nginx") {
        let addr = free_addr()?;
        let p = start_nginx(
            &dir.join("nginx-proxy"),
            addr,
            Some(upstream_addr),
            &proxy_cpu,
        )?;
        let mut pids = vec![p.child.id()];
        pids.extend(children(p.child.id()));
        candidates.push(Candidate {
            name: "nginx",
            addr,
            pids,
            _guard: Box::new(p),
        });
    } else {
        println!("nginx: not installed, skipped");
    }
    if installed("haproxy") {
        let addr = free_addr()?;
        let p = start_haproxy(&dir.join("haproxy"), addr, upstream_addr, &proxy_cpu)?;
        let mut pids = vec![p.child.id()];
        pids.extend(children(p.child.id()));
        candidates.push(Candidate {
            name: "haproxy",
            addr,
            pids,
            _guard: Box::new(p),
        });
    } else {
        println!("haproxy: not installed, skipped");
    }
    let direct_rps = {
        let _ = wrk(
            upstream_addr,
            Duration::from_secs(1),
            connections,
            &load_cpus,
        )?;
        wrk(upstream_addr, duration, connections, &load_cpus)?
    };
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); candidates.len()];
    for c in &candidates {
        wrk(c.addr, Duration::from_secs(1), connections, &load_cpus)?; // warm-up
    }
    for _ in 0..rounds {
        for (i, c) in candidates.iter().enumerate() {
            let before: Vec<(u64, u64)> = c.pids.iter().map(|p| cpu_ticks(*p)).collect();
            let started = Instant::now();
            let rps = wrk(c.addr, duration, connections, &load_cpus)?;
            let elapsed = started.elapsed().as_secs_f64();
            let after: Vec<(u64, u64)> = c.pids.iter().map(|p| cpu_ticks(*p)).collect();
            let (user, sys) = before
                .iter()
                .zip(&after)
                .fold((0u64, 0u64), |(u, s), (b, a)| {
                    (u + a.0 - b.0, s + a.1 - b.1)
                });
            let requests = rps * elapsed;
            samples[i].push(Sample {
                rps,
                cpu_us: (user + sys) as f64 / TICKS_PER_SEC * 1e6 / requests,
                user_us: user as f64 / TICKS_PER_SEC * 1e6 / requests,
            });
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    println!("\ndirect to the upstream: {direct_rps:.0} req/s (the load side's ceiling)\n");
    println!(
        "{:<12}{:>12}{:>20}{:>22}",
        "proxy", "req/s", "CPU µs/request", "of which user µs"
    );
    let mut rows = Vec::new();
    for (i, c) in candidates.iter().enumerate() {
        let rps = median(&mut samples[i].iter().map(|s| s.rps).collect());
        let cpu = median(&mut samples[i].iter().map(|s| s.cpu_us).collect());
        let user = median(&mut samples[i].iter().map(|s| s.user_us).collect());
        println!("{:<12}{:>12.0}{:>20.1}{:>22.1}", c.name, rps, cpu, user);
        rows.push((c.name, rps, cpu));
    }
    if let Some(&(_, pf_rps, pf_cpu)) = rows.first() {
        for (name, rps, cpu) in rows.iter().skip(1) {
            println!(
                "pilotfish / {name}: req/s x{:.2}, CPU per request x{:.2}",
                pf_rps / rps,
                pf_cpu / cpu
            );
        }
    }
    drop(candidates);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
