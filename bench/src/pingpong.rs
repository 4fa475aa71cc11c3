//! The demo's closed-loop HTTP/1.1 load: a blocking thread per connection
//! sends `GET /`, waits for the whole response, records the round trip in
//! an HDR histogram, repeats. Histograms are per thread and merged at the
//! end. (`pilotfish-bench load` is the general harness; the demo keeps this
//! small loop so it can reset the sidecars' histograms between its warm-up
//! and measured runs.)

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;

use crate::load::{new_histogram, LATENCY_MAX_US, PERCENTILES};

/// Connections one run may open: each is a thread here.
pub const CONNECTIONS_MAX: usize = 1024;

#[derive(Debug)]
pub struct Outcome {
    pub histogram: Histogram<u64>,
    pub requests: u64,
    pub errors: u64,
    pub elapsed: Duration,
}

impl Outcome {
    fn empty() -> Self {
        Outcome {
            histogram: new_histogram(),
            requests: 0,
            errors: 0,
            elapsed: Duration::ZERO,
        }
    }

    /// One request answered, sent at `sent`.
    fn answered(&mut self, sent: Instant) {
        let us = sent
            .elapsed()
            .as_micros()
            .clamp(1, u128::from(LATENCY_MAX_US)) as u64;
        let _ = self.histogram.record(us);
        self.requests += 1;
    }

    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
}

/// Sets the returned flag on SIGINT/SIGTERM so loops can stop and clean up.
pub fn stop_on_ctrl_c() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop))?;
    }
    Ok(stop)
}

/// How the load uses its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// One connection per load thread, reused (keep-alive).
    KeepAlive,
    /// A new connection for every request (`Connection: close`); the
    /// round trip includes the connect.
    PerRequest,
}

pub fn run(
    target: SocketAddr,
    connections: usize,
    duration: Duration,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<Outcome> {
    run_with(target, connections, duration, stop, Reuse::KeepAlive)
}

pub fn run_with(
    target: SocketAddr,
    connections: usize,
    duration: Duration,
    stop: &Arc<AtomicBool>,
    reuse: Reuse,
) -> anyhow::Result<Outcome> {
    anyhow::ensure!(
        (1..=CONNECTIONS_MAX).contains(&connections),
        "connections must be 1..={CONNECTIONS_MAX}"
    );
    let started = Instant::now();
    let deadline = started + duration;
    let workers: Vec<_> = (0..connections)
        .map(|_| {
            let stop = Arc::clone(stop);
            thread::spawn(move || match reuse {
                Reuse::KeepAlive => one_http_connection(target, deadline, &stop),
                Reuse::PerRequest => connection_per_request(target, deadline, &stop),
            })
        })
        .collect();
    let mut total = Outcome::empty();
    for w in workers {
        let o = w
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))?;
        total.histogram.add(&o.histogram)?;
        total.requests += o.requests;
        total.errors += o.errors;
    }
    total.elapsed = started.elapsed();
    Ok(total)
}

fn one_http_connection(target: SocketAddr, deadline: Instant, stop: &AtomicBool) -> Outcome {
    let mut out = Outcome::empty();
    let Ok(mut s) = TcpStream::connect_timeout(&target, Duration::from_secs(5)) else {
        out.errors += 1;
        return out;
    };
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let request = b"GET / HTTP/1.1\r\nHost: demo\r\n\r\n";
    let mut buf = vec![0u8; 16 * 1024];
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        let sent = Instant::now();
        if s.write_all(request).is_err() || !read_http_response(&mut s, &mut buf) {
            out.errors += 1;
            break;
        }
        out.answered(sent);
    }
    out
}

/// `Connection: close` requests, each on a connection of its own: the
/// round trip runs from before the connect to the end of the response.
fn connection_per_request(target: SocketAddr, deadline: Instant, stop: &AtomicBool) -> Outcome {
    let mut out = Outcome::empty();
    let request = b"GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n";
    let mut buf = vec![0u8; 16 * 1024];
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        let sent = Instant::now();
        let answered =
            TcpStream::connect_timeout(&target, Duration::from_secs(5)).is_ok_and(|mut s| {
                let _ = s.set_nodelay(true);
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                s.write_all(request).is_ok() && read_http_response(&mut s, &mut buf)
            });
        if !answered {
            out.errors += 1;
            // A refused connect returns at once: do not spin on it.
            if out.errors > 100 {
                break;
            }
            continue;
        }
        out.answered(sent);
    }
    out
}

/// Reads one response with a 200 status and a Content-Length body.
fn read_http_response(s: &mut TcpStream, buf: &mut [u8]) -> bool {
    let mut have = 0;
    loop {
        if let Some(end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            if !head.starts_with("http/1.1 200") {
                return false;
            }
            let Some(len) = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
            else {
                return false;
            };
            let mut body_have = have - (end + 4);
            while body_have < len {
                let want = (len - body_have).min(buf.len());
                match s.read(&mut buf[..want]) {
                    Ok(0) | Err(_) => return false,
                    Ok(n) => body_have += n,
                }
            }
            return true;
        }
        if have == buf.len() {
            return false;
        }
        match s.read(&mut buf[have..]) {
            Ok(0) | Err(_) => return false,
            Ok(n) => have += n,
        }
    }
}

/// A percentile table, one column per named outcome.
pub fn table(rows: &[(&str, &Outcome)]) -> String {
    let mut out = format!("{:<22}", "");
    for (name, _) in rows {
        out += &format!("{name:>19}");
    }
    out += "\n";
    for p in PERCENTILES {
        let label = if p == 100.0 {
            "max".to_string()
        } else {
            format!("p{p}")
        };
        out += &format!("{:<22}", format!("{label} (µs)"));
        for (_, o) in rows {
            out += &format!("{:>19}", o.histogram.value_at_quantile(p / 100.0));
        }
        out += "\n";
    }
    out += &format!("{:<22}", "requests/s");
    for (_, o) in rows {
        out += &format!("{:>19.0}", o.rate());
    }
    out += &format!("\n{:<22}", "requests (errors)");
    for (_, o) in rows {
        out += &format!("{:>19}", format!("{} ({})", o.requests, o.errors));
    }
    out + "\n"
}
