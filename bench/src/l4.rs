//! L4 throughput: bytes client → (proxy) → sink on loopback, direct and
//! through an in-process proxy with each copy mode and each driver.
//!
//! Placement: the proxy's single worker is pinned to the first CPU this
//! process may use; the client and the sink run unpinned. Each mode is
//! measured `rounds` times, interleaved, and the median reported, because
//! these machines are shared and noisy.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    thread,
    time::Instant,
};

use pilotfish::{Config, Proxy};

/// Bytes per write from the client, and per read in the sink.
const CHUNK_BYTES: usize = 256 * 1024;

#[derive(Clone, Copy)]
struct Mode {
    name: &'static str,
    proxy: Option<(&'static str, &'static str)>, // (driver, copy)
}

const MODES: [Mode; 6] = [
    Mode {
        name: "direct",
        proxy: None,
    },
    Mode {
        name: "io_uring buffered",
        proxy: Some(("io_uring", "buffered")),
    },
    Mode {
        name: "io_uring splice",
        proxy: Some(("io_uring", "splice")),
    },
    Mode {
        name: "io_uring splice (ops)",
        proxy: Some(("io_uring", "splice_io_uring")),
    },
    Mode {
        name: "epoll buffered",
        proxy: Some(("epoll", "buffered")),
    },
    Mode {
        name: "epoll splice",
        proxy: Some(("epoll", "splice")),
    },
];

pub fn run(mib: usize, rounds: usize) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=65536).contains(&mib) && (1..=50).contains(&rounds),
        "mib 1..=65536, rounds 1..=50"
    );
    let bytes = mib * 1024 * 1024;
    let sink = sink()?;
    let uring_ok = pilotfish::worker::runtime::io_uring_available();
    println!("L4 throughput, {mib} MiB per run, {rounds} interleaved rounds, median shown");
    println!("placement: proxy worker pinned to the first allowed CPU; client and sink unpinned");
    let mut results: Vec<(Mode, Vec<f64>, Vec<f64>)> = Vec::new();
    for mode in MODES {
        if mode.proxy.is_some_and(|(d, _)| d == "io_uring") && !uring_ok {
            println!("{}: skipped (io_uring unavailable)", mode.name);
            continue;
        }
        results.push((mode, Vec::new(), Vec::new()));
    }
    for _ in 0..rounds {
        for (mode, gbps, cpu) in &mut results {
            let (rate, cpu_s) = measure(*mode, sink, bytes)?;
            gbps.push(rate);
            cpu.push(cpu_s);
        }
    }
    let direct = median(&mut results[0].1.clone());
    println!(
        "\n{:<20}{:>12}{:>12}{:>22}",
        "mode", "Gbit/s", "vs direct", "proxy CPU s per GiB"
    );
    for (mode, gbps, cpu) in &mut results {
        let g = median(gbps);
        let c = median(cpu);
        let cpu_text = if mode.proxy.is_some() {
            format!("{:.3}", c / (bytes as f64 / (1u64 << 30) as f64))
        } else {
            "-".into()
        };
        println!(
            "{:<20}{:>12.2}{:>12.2}{:>22}",
            mode.name,
            g,
            g / direct,
            cpu_text
        );
    }
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// One measurement: Gbit/s and the proxy worker's CPU seconds.
fn measure(mode: Mode, sink: SocketAddr, bytes: usize) -> anyhow::Result<(f64, f64)> {
    let (proxy, target) = match mode.proxy {
        None => (None, sink),
        Some((driver, copy)) => {
            let toml = format!(
                "workers = 1\n[runtime]\ndriver = \"{driver}\"\n[[listeners]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\ncluster = \"c\"\ncopy = \"{copy}\"\n[[clusters]]\nname = \"c\"\nendpoints = [\"{sink}\"]\n"
            );
            let proxy = Proxy::start(Config::parse("bench.toml", &toml)?)?;
            let addr = proxy.listener_addr("l").expect("listener");
            (Some(proxy), addr)
        }
    };
    let cpu_before = worker_cpu_seconds();
    let started = Instant::now();
    let mut s = TcpStream::connect(target)?;
    let chunk = vec![0x5a_u8; CHUNK_BYTES];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(CHUNK_BYTES);
        s.write_all(&chunk[..n])?;
        left -= n;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    // The sink answers with the byte count it saw once it reads EOF.
    let mut count = [0u8; 8];
    s.read_exact(&mut count)?;
    let elapsed = started.elapsed();
    let cpu = worker_cpu_seconds() - cpu_before;
    anyhow::ensure!(
        u64::from_le_bytes(count) == bytes as u64,
        "sink saw {} of {bytes} bytes",
        u64::from_le_bytes(count)
    );
    if let Some(p) = proxy {
        p.shutdown();
    }
    Ok((bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e9, cpu))
}

/// A sink that counts bytes until EOF, then replies with the count.
pub fn sink() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            thread::spawn(move || {
                let mut buf = vec![0u8; CHUNK_BYTES];
                let mut total = 0u64;
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                let _ = s.write_all(&total.to_le_bytes());
            });
        }
    });
    Ok(addr)
}

/// CPU seconds (user + system) of the proxy's threads: its workers and
/// their io_uring kernel helpers.
fn worker_cpu_seconds() -> f64 {
    let ticks = 100.0; // USER_HZ on Linux
    let mut total = 0.0;
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    for t in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        let Some((head, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        // io_uring runs some ops (socket splice among them) on kernel
        // "iou-wrk" threads of this process: that work is the proxy's too.
        if !head.contains("(pilotfish-w") && !head.contains("(iou-wrk") {
            continue;
        }
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // After "comm) ": state is field 0; utime, stime are fields 11, 12.
        let utime: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0);
        let stime: f64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
        total += (utime + stime) / ticks;
    }
    total
}
