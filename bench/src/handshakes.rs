//! Full mTLS handshakes per second per core: Pilotfish's inbound listener
//! against nginx and HAProxy terminating the same mutual TLS, same run.
//!
//! Each proxy runs on one CPU (one worker), the clients on the others.
//! Every client connection is new and never resumed (the client keeps no
//! sessions): TCP connect, TLS 1.3 handshake presenting a client SVID, one
//! tiny request the proxy answers itself (404: no upstream work), close.
//! The proxy's CPU time over the window gives the cost of one connection,
//! and its inverse the full handshakes one core sustains.
//!
//! All three verify the client certificate against the same CA; Pilotfish
//! also applies the SPIFFE SVID rules and its allow-list, the others only
//! X.509 chain checks. Certificates come from the development CA (ECDSA
//! P-256), as `pilotfish ca` makes them.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Context;
use pilotfish::tls::{identity::SpiffeId, material::Material};
use rustls::{ClientConfig, ClientConnection};

use crate::compare::{
    children, cpu_ticks, free_addr, installed, median, pinned, wait_listening, Proc, TICKS_PER_SEC,
};

const CLIENT_ID: &str = "spiffe://bench.mesh/ns/default/sa/client";
const SERVER_ID: &str = "spiffe://bench.mesh/ns/default/sa/server";
/// What every client sends after the handshake; every proxy answers it
/// itself with a 404.
const REQUEST: &[u8] = b"GET /handshake HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n";

struct Candidate {
    name: &'static str,
    addr: SocketAddr,
    pids: Vec<u32>,
    _guard: Box<dyn std::any::Any>,
}

/// One measurement window.
struct Window {
    handshakes: u64,
    errors: u64,
    seconds: f64,
    cpu_seconds: f64,
}

pub fn run(quick: bool, binary: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    anyhow::ensure!(installed("taskset"), "taskset is needed (util-linux)");
    let binary = crate::sidecar::locate_binary(binary)?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (proxy_cpu, load_cpus): (String, Vec<usize>) = if cpus >= 2 {
        (format!("{}", cpus - 1), (0..cpus - 1).collect())
    } else {
        ("0".into(), vec![0])
    };
    let dir = std::env::temp_dir().join(format!("pilotfish-handshakes-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let (client, pki) = pki(&dir)?;
    println!(
        "placement: proxy on CPU {proxy_cpu} (one worker); TLS clients on CPU(s) {load_cpus:?}"
    );

    let mut candidates = vec![start_pilotfish(&binary, &dir, &pki, &proxy_cpu)?];
    if installed("nginx") {
        candidates.push(start_nginx(&dir, &pki, &proxy_cpu)?);
    } else {
        println!("note: nginx not installed, skipped");
    }
    if installed("haproxy") {
        candidates.push(start_haproxy(&dir, &pki, &proxy_cpu)?);
    } else {
        println!("note: haproxy not installed, skipped");
    }
    // Every candidate must complete the exchange before it is measured.
    for c in &candidates {
        let (status, _) =
            one(c.addr, &client).with_context(|| format!("{}: first handshake", c.name))?;
        anyhow::ensure!(status == 404, "{}: answered {status}, expected 404", c.name);
    }

    let rounds = if quick { 1 } else { 3 };
    let window = Duration::from_secs(if quick { 1 } else { 5 });
    let clients = load_cpus.len() * 8;
    println!(
        "load: {clients} client threads, a new connection and a full TLS 1.3 handshake (client certificate, no resumption) per request; {rounds} round(s) of {window:?}, interleaved\n"
    );
    let mut results: Vec<Vec<Window>> = candidates.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        for (c, out) in candidates.iter().zip(results.iter_mut()) {
            let w = measure(c, &client, clients, &load_cpus, window)?;
            anyhow::ensure!(w.handshakes > 0, "{}: no handshake completed", c.name);
            out.push(w);
        }
    }
    println!(
        "{:<10} {:>14} {:>16} {:>20} {:>8}",
        "proxy", "handshakes/s", "CPU µs/handshake", "handshakes/s/core", "errors"
    );
    let mut costs = Vec::new();
    for (c, ws) in candidates.iter().zip(&results) {
        let rate = median(ws.iter().map(|w| w.handshakes as f64 / w.seconds).collect());
        let cost = median(
            ws.iter()
                .map(|w| w.cpu_seconds * 1e6 / w.handshakes as f64)
                .collect(),
        );
        let errors: u64 = ws.iter().map(|w| w.errors).sum();
        println!(
            "{:<10} {:>14.0} {:>16.1} {:>20.0} {:>8}",
            c.name,
            rate,
            cost,
            1e6 / cost,
            errors
        );
        costs.push((c.name, cost));
    }
    if let Some((_, own)) = costs.first().copied() {
        for (name, cost) in &costs[1..] {
            println!(
                "cost vs {name}: {:.2} (below 1: Pilotfish spends less CPU per handshake)",
                own / cost
            );
        }
    }
    drop(candidates);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Paths of the server's material.
struct Pki {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    ca: std::path::PathBuf,
    /// cert + key in one file (HAProxy's `crt`).
    combined: std::path::PathBuf,
}

fn pki(dir: &Path) -> anyhow::Result<(Arc<ClientConfig>, Pki)> {
    use pilotfish::tls::ca;
    let ca_dir = dir.join("ca");
    ca::init(&ca_dir)?;
    let day = Duration::from_secs(86_400);
    ca::issue(
        &ca_dir,
        &SpiffeId::parse(SERVER_ID)?,
        &dir.join("server"),
        day,
    )?;
    ca::issue(
        &ca_dir,
        &SpiffeId::parse(CLIENT_ID)?,
        &dir.join("client"),
        day,
    )?;
    let s = dir.join("server");
    let combined = s.join("combined.pem");
    std::fs::write(
        &combined,
        std::fs::read_to_string(s.join("cert.pem"))? + &std::fs::read_to_string(s.join("key.pem"))?,
    )?;
    let c = dir.join("client");
    let mut m = Material::load(&c.join("cert.pem"), &c.join("key.pem"), &c.join("ca.pem"))?;
    // No resumption: every handshake is a full one.
    m.session_lifetime = Duration::ZERO;
    let provider = pilotfish::tls::material::provider();
    let config = m.client_config(&provider, SpiffeId::parse(SERVER_ID)?, false, &[])?;
    Ok((
        config,
        Pki {
            cert: s.join("cert.pem"),
            key: s.join("key.pem"),
            ca: s.join("ca.pem"),
            combined,
        },
    ))
}

fn start_pilotfish(binary: &Path, dir: &Path, pki: &Pki, cpu: &str) -> anyhow::Result<Candidate> {
    let toml = format!(
        "workers = 1\n[tls]\ncert = \"{}\"\nkey = \"{}\"\ntrust_bundle = \"{}\"\n[[listeners]]\nname = \"inbound\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ntls = {{ require_client_cert = true }}\nauthorize = [\"{CLIENT_ID}\"]\n",
        pki.cert.display(),
        pki.key.display(),
        pki.ca.display()
    );
    let wrapper = dir.join("pilotfish-pinned.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec taskset -c {cpu} {} \"$@\"\n",
            binary.display()
        ),
    )?;
    Command::new("chmod")
        .args(["+x", &wrapper.to_string_lossy()])
        .status()?;
    let sidecar = crate::sidecar::Sidecar::start(&wrapper, "pilotfish", dir, &toml)?;
    Ok(Candidate {
        name: "pilotfish",
        addr: sidecar.listener("inbound")?,
        pids: vec![sidecar.pid()],
        _guard: Box::new(sidecar),
    })
}

fn start_nginx(dir: &Path, pki: &Pki, cpu: &str) -> anyhow::Result<Candidate> {
    let d = dir.join("nginx");
    std::fs::create_dir_all(&d)?;
    let addr = free_addr()?;
    let conf = format!(
        "worker_processes 1;\ndaemon off;\nuser root;\npid {d}/nginx.pid;\nerror_log {d}/error.log crit;\nevents {{ worker_connections 4096; }}\nhttp {{\n access_log off;\n client_body_temp_path {d}/b; proxy_temp_path {d}/p; fastcgi_temp_path {d}/f; uwsgi_temp_path {d}/u; scgi_temp_path {d}/s;\n ssl_session_cache off;\n ssl_session_tickets off;\n server {{\n  listen {addr} ssl;\n  ssl_protocols TLSv1.3;\n  ssl_certificate {cert};\n  ssl_certificate_key {key};\n  ssl_client_certificate {ca};\n  ssl_verify_client on;\n  location / {{ return 404; }}\n }}\n}}\n",
        d = d.display(),
        cert = pki.cert.display(),
        key = pki.key.display(),
        ca = pki.ca.display(),
    );
    std::fs::write(d.join("nginx.conf"), conf)?;
    let args = ["-p", &d.to_string_lossy(), "-c", "nginx.conf"].map(String::from);
    spawn_peer("nginx", &args, &d, addr, cpu)
}

/// Starts a peer proxy pinned to `cpu`, waits until it listens on `addr`.
fn spawn_peer(
    name: &'static str,
    args: &[String],
    dir: &Path,
    addr: SocketAddr,
    cpu: &str,
) -> anyhow::Result<Candidate> {
    let child = pinned(cpu, name, false)
        .args(args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("stderr.log"))?)
        .spawn()?;
    let p = Proc { child };
    wait_listening(addr)
        .with_context(|| std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default())?;
    let mut pids = vec![p.child.id()];
    pids.extend(children(p.child.id()));
    Ok(Candidate {
        name,
        addr,
        pids,
        _guard: Box::new(p),
    })
}

fn start_haproxy(dir: &Path, pki: &Pki, cpu: &str) -> anyhow::Result<Candidate> {
    let d = dir.join("haproxy");
    std::fs::create_dir_all(&d)?;
    let addr = free_addr()?;
    let conf = format!(
        "global\n nbthread 1\n maxconn 4096\n tune.ssl.cachesize 0\ndefaults\n timeout connect 5s\n timeout client 30s\n timeout server 30s\nfrontend f\n mode http\n bind {addr} ssl crt {crt} ca-file {ca} verify required ssl-min-ver TLSv1.3 no-tls-tickets\n http-request return status 404\n",
        crt = pki.combined.display(),
        ca = pki.ca.display(),
    );
    std::fs::write(d.join("haproxy.cfg"), conf)?;
    let args = [
        "-f".to_string(),
        d.join("haproxy.cfg").display().to_string(),
    ];
    spawn_peer("haproxy", &args, &d, addr, cpu)
}

/// One connection: handshake, the request, the whole answer. Ok(status).
fn one(addr: SocketAddr, config: &Arc<ClientConfig>) -> anyhow::Result<(u16, usize)> {
    let mut tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    tcp.set_nodelay(true)?;
    let mut conn = ClientConnection::new(Arc::clone(config), pilotfish::tls::material::sni())?;
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    tls.write_all(REQUEST)?;
    let mut answer = Vec::with_capacity(512);
    let mut buf = [0u8; 4096];
    loop {
        match tls.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            // Peers that close without close_notify end the answer too.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e.into()),
        }
        if answer.len() > 64 * 1024 {
            anyhow::bail!("answer too long");
        }
    }
    let status = std::str::from_utf8(answer.get(9..12).unwrap_or_default())
        .ok()
        .and_then(|s| s.parse().ok())
        .context("no status line")?;
    Ok((status, answer.len()))
}

fn measure(
    c: &Candidate,
    config: &Arc<ClientConfig>,
    clients: usize,
    cpus: &[usize],
    window: Duration,
) -> anyhow::Result<Window> {
    let stop = Arc::new(AtomicBool::new(false));
    let (done, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let before: Vec<(u64, u64)> = c.pids.iter().map(|p| cpu_ticks(*p)).collect();
    let started = Instant::now();
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let (stop, done, errors) = (stop.clone(), done.clone(), errors.clone());
            let (config, addr, cpu) = (Arc::clone(config), c.addr, cpus[i % cpus.len()]);
            thread::spawn(move || {
                core_affinity::set_for_current(core_affinity::CoreId { id: cpu });
                while !stop.load(Ordering::Relaxed) {
                    match one(addr, &config) {
                        Ok((404, _)) => done.fetch_add(1, Ordering::Relaxed),
                        _ => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    // A plain thread, not a worker: sleeping here blocks nothing.
    #[allow(clippy::disallowed_methods)]
    thread::sleep(window);
    let after: Vec<(u64, u64)> = c.pids.iter().map(|p| cpu_ticks(*p)).collect();
    let handshakes = done.load(Ordering::Relaxed);
    let seconds = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let ticks: u64 = before
        .iter()
        .zip(&after)
        .map(|(b, a)| (a.0 + a.1).saturating_sub(b.0 + b.1))
        .sum();
    Ok(Window {
        handshakes,
        errors: errors.load(Ordering::Relaxed),
        seconds,
        cpu_seconds: ticks as f64 / TICKS_PER_SEC,
    })
}
