//! `pilotfish admin top`: the busiest routes and peers, refreshed every
//! interval in the terminal, like `linkerd viz top` or `htop`.
//!
//! Reads the golden metrics (`GET /golden`, the per-core series summed)
//! once per interval and shows what changed over the last interval: request
//! rate, success rate and p50/p99 estimated from the duration buckets (as
//! Prometheus's `histogram_quantile` does, by linear interpolation inside a
//! bucket). Exits on `q` or Ctrl-C with the terminal as it was; without a
//! terminal it refreshes until interrupted.
//!
//! What must hold: the terminal is restored however `top` ends (a guard
//! restores it on drop, also when the admin socket goes away); the
//! window's figures come from differences of two scrapes, so a counter
//! that went backwards (a restarted proxy) shows the new totals, never a
//! negative rate.

use std::{collections::HashMap, io::Write, path::Path, time::Duration, time::Instant};

use crate::metrics::golden::{self, Http, Labels, BUCKETS_US};

/// Rows shown at most (the terminal is rarely taller).
pub const ROWS_MAX: usize = 200;

/// One row of the table: one series over the last window.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub labels: Labels,
    pub rate: f64,
    /// Share of responses that were not failures (5xx, none sent, or a
    /// non-zero gRPC status); None when there were none.
    pub success: Option<f64>,
    pub p50: Option<Duration>,
    pub p99: Option<Duration>,
}

/// The rows for the window between two scrapes `secs` apart, busiest
/// first; series without requests in the window are left out.
pub fn window(prev: &golden::Snapshot, now: &golden::Snapshot, secs: f64) -> Vec<Row> {
    let before: HashMap<&Labels, &Http> = prev.http.iter().map(|(l, h)| (l, h)).collect();
    let mut rows: Vec<Row> = now
        .http
        .iter()
        .filter_map(|(labels, h)| {
            let d = delta(before.get(labels).copied(), h);
            if d.requests == 0 {
                return None;
            }
            let answered: u64 = d.responses.iter().map(|r| r.2).sum();
            let ok: u64 = d
                .responses
                .iter()
                .filter(|(code, grpc, _)| (1..500).contains(code) && grpc.is_none_or(|g| g == 0))
                .map(|r| r.2)
                .sum();
            Some(Row {
                labels: labels.clone(),
                rate: d.requests as f64 / secs.max(1e-3),
                success: (answered > 0).then(|| ok as f64 / answered as f64),
                p50: quantile(&d.buckets, 0.5),
                p99: quantile(&d.buckets, 0.99),
            })
        })
        .collect();
    rows.sort_by(|a, b| b.rate.total_cmp(&a.rate).then(a.labels.cmp(&b.labels)));
    rows
}

/// `now - prev`, or `now` where the series is new or went backwards.
fn delta(prev: Option<&Http>, now: &Http) -> Http {
    let Some(prev) = prev.filter(|p| p.requests <= now.requests) else {
        return now.clone();
    };
    let mut d = now.clone();
    d.requests -= prev.requests;
    for (a, b) in d.buckets.iter_mut().zip(prev.buckets) {
        *a = a.saturating_sub(b);
    }
    for (code, grpc, n) in &mut d.responses {
        let before = prev
            .responses
            .iter()
            .find(|(c, g, _)| c == code && g == grpc)
            .map_or(0, |r| r.2);
        *n = n.saturating_sub(before);
    }
    d
}

/// The q-quantile of per-bucket counts (not cumulative), interpolated
/// linearly inside its bucket; None without samples or beyond the last
/// bound.
pub fn quantile(buckets: &[u64], q: f64) -> Option<Duration> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut seen = 0u64;
    for (i, &n) in buckets.iter().enumerate() {
        if n > 0 && (seen + n) as f64 >= rank {
            let hi = *BUCKETS_US.get(i)?;
            let lo = if i == 0 { 0 } else { BUCKETS_US[i - 1] };
            let within = ((rank - seen as f64) / n as f64).clamp(0.0, 1.0);
            let us = lo as f64 + (hi - lo) as f64 * within;
            return Some(Duration::from_micros(us.round() as u64));
        }
        seen += n;
    }
    None
}

fn fmt_duration(d: Option<Duration>) -> String {
    match d {
        None => "-".into(),
        Some(d) if d < Duration::from_millis(1) => format!("{}µs", d.as_micros()),
        Some(d) if d < Duration::from_secs(1) => format!("{:.1}ms", d.as_secs_f64() * 1e3),
        Some(d) => format!("{:.2}s", d.as_secs_f64()),
    }
}

/// The screen: a header and the busiest `rows` rows.
pub fn render(rows: &[Row], shown: usize, interval: Duration) -> String {
    let mut out = format!(
        "pilotfish top — last {:?}, busiest first (q or Ctrl-C to quit)\n\n{:<9} {:<16} {:<14} {:<16} {:<44} {:>9} {:>8} {:>9} {:>9}\n",
        interval, "DIRECTION", "LISTENER", "ROUTE", "CLUSTER", "PEER", "RPS", "SUCCESS", "P50", "P99"
    );
    for r in rows.iter().take(shown) {
        let l = &r.labels;
        let cut = |s: Option<&str>, w: usize| {
            let s = s.unwrap_or("-");
            if s.chars().count() > w {
                let tail: String = s
                    .chars()
                    .rev()
                    .take(w - 1)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                format!("…{tail}")
            } else {
                s.to_string()
            }
        };
        out += &format!(
            "{:<9} {:<16} {:<14} {:<16} {:<44} {:>9.1} {:>8} {:>9} {:>9}\n",
            l.direction.name(),
            cut(Some(&l.listener), 16),
            cut(l.route.as_deref().filter(|r| !r.is_empty()), 14),
            cut(l.cluster.as_deref(), 16),
            cut(l.peer.as_deref(), 44),
            r.rate,
            r.success
                .map_or("-".into(), |s| format!("{:.1}%", s * 100.0)),
            fmt_duration(r.p50),
            fmt_duration(r.p99),
        );
    }
    if rows.is_empty() {
        out += "(no requests in the last interval)\n";
    }
    out
}

/// The terminal in raw mode on the alternate screen, restored on drop.
struct Terminal {
    saved: Option<libc::termios>,
}

impl Terminal {
    #[allow(unsafe_code)]
    fn enter() -> Terminal {
        // SAFETY: isatty, tcgetattr and tcsetattr on fd 0 with a termios
        // we own; a failure leaves `saved` None and the terminal as it was.
        let saved = unsafe {
            if libc::isatty(0) != 1 {
                None
            } else {
                let mut t: libc::termios = std::mem::zeroed();
                if libc::tcgetattr(0, &mut t) != 0 {
                    None
                } else {
                    let saved = t;
                    // Keys one at a time, unechoed; Ctrl-C as a byte (ISIG
                    // off) so that quitting restores the terminal.
                    t.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG);
                    t.c_cc[libc::VMIN] = 0;
                    t.c_cc[libc::VTIME] = 0;
                    (libc::tcsetattr(0, libc::TCSANOW, &t) == 0).then_some(saved)
                }
            }
        };
        if saved.is_some() {
            let _ = std::io::stdout().write_all(b"\x1b[?1049h\x1b[?25l");
        }
        Terminal { saved }
    }

    /// Waits up to `timeout` for a key; true when it asks to quit. (A CLI
    /// process, not a worker: blocking here is the point.)
    #[allow(unsafe_code, clippy::disallowed_methods)]
    fn quit_within(&self, timeout: Duration) -> bool {
        if self.saved.is_none() {
            std::thread::sleep(timeout);
            return false;
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let mut pfd = libc::pollfd {
                fd: 0,
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
            // SAFETY: one pollfd we own.
            let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
            if ready <= 0 {
                continue;
            }
            let mut b = [0u8; 1];
            // SAFETY: reads at most one byte into `b`, which we own.
            let n = unsafe { libc::read(0, b.as_mut_ptr().cast(), 1) };
            if n == 1 && matches!(b[0], b'q' | b'Q' | 0x03) {
                return true;
            }
            if n <= 0 {
                // Input closed: keep refreshing until interrupted.
                std::thread::sleep(left);
                return false;
            }
        }
    }
}

impl Drop for Terminal {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let _ = std::io::stdout().write_all(b"\x1b[?25h\x1b[?1049l");
            let _ = std::io::stdout().flush();
            // SAFETY: restoring the attributes read in `enter`.
            unsafe {
                libc::tcsetattr(0, libc::TCSANOW, saved);
            }
        }
    }
}

fn scrape(socket: &Path) -> Result<golden::Snapshot, String> {
    let (status, body) = super::client::request(socket, "GET", "/golden")
        .map_err(|e| format!("admin socket {}: {e}", socket.display()))?;
    if status != 200 {
        return Err(format!("admin answered {status}: {body}"));
    }
    serde_json::from_str(&body).map_err(|e| format!("unexpected /golden answer: {e}"))
}

/// Runs until `q`, Ctrl-C, or the admin socket fails.
pub fn run(socket: &Path, interval: Duration, rows: usize) -> Result<(), String> {
    let interval = interval.max(Duration::from_millis(100));
    let rows = rows.min(ROWS_MAX);
    let mut prev = scrape(socket)?;
    let mut at = Instant::now();
    let term = Terminal::enter();
    let show = |screen: &str| {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(format!("\x1b[H\x1b[2J{screen}").as_bytes());
        let _ = out.flush();
    };
    show(&format!(
        "pilotfish top — collecting the first {interval:?} (q or Ctrl-C to quit)\n"
    ));
    loop {
        if term.quit_within(interval) {
            return Ok(());
        }
        let now = scrape(socket)?;
        let secs = at.elapsed().as_secs_f64();
        at = Instant::now();
        show(&render(&window(&prev, &now, secs), rows, interval));
        prev = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::intercept::Direction;

    fn labels(route: &str) -> Labels {
        Labels {
            direction: Direction::Inbound,
            listener: "in".into(),
            route: Some(route.into()),
            cluster: Some("app".into()),
            tls: true,
            peer: Some("spiffe://mesh/sa/a".into()),
        }
    }

    fn series(requests: u64, ok: u64, fail: u64, bucket: usize) -> Http {
        let mut buckets = [0u64; BUCKETS_US.len() + 1];
        buckets[bucket] = requests;
        Http {
            requests,
            responses: vec![(200, None, ok), (503, None, fail)],
            buckets,
            duration_us_sum: 0,
        }
    }

    #[test]
    fn the_window_is_the_difference_busiest_first() {
        let prev = golden::Snapshot {
            http: vec![
                (labels("a"), series(100, 100, 0, 3)),
                (labels("b"), series(10, 10, 0, 3)),
            ],
            tcp: vec![],
        };
        let now = golden::Snapshot {
            http: vec![
                (labels("a"), series(120, 118, 2, 3)),
                (labels("b"), series(60, 60, 0, 3)),
                (labels("idle"), series(0, 0, 0, 3)),
            ],
            tcp: vec![],
        };
        let rows = window(&prev, &now, 2.0);
        assert_eq!(rows.len(), 2, "idle series left out");
        assert_eq!(rows[0].labels.route.as_deref(), Some("b"));
        assert_eq!(rows[0].rate, 25.0);
        assert_eq!(rows[1].rate, 10.0);
        assert_eq!(rows[1].success, Some(0.9));
        // Every request of the window in the (500 µs, 1 ms] bucket.
        let p50 = rows[1].p50.unwrap();
        assert!(p50 > Duration::from_micros(500) && p50 <= Duration::from_millis(1));
        let screen = render(&rows, 10, Duration::from_secs(2));
        assert!(screen.contains("90.0%"), "{screen}");
        assert!(screen.contains("25.0"), "{screen}");
    }

    #[test]
    fn a_restarted_proxy_shows_its_new_totals() {
        let prev = golden::Snapshot {
            http: vec![(labels("a"), series(100, 100, 0, 3))],
            tcp: vec![],
        };
        let now = golden::Snapshot {
            http: vec![(labels("a"), series(4, 4, 0, 3))],
            tcp: vec![],
        };
        assert_eq!(window(&prev, &now, 1.0)[0].rate, 4.0);
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        let mut b = [0u64; BUCKETS_US.len() + 1];
        b[0] = 50; // (0, 100 µs]
        b[1] = 50; // (100, 250 µs]
        assert_eq!(quantile(&b, 0.5), Some(Duration::from_micros(100)));
        assert_eq!(quantile(&b, 0.75), Some(Duration::from_micros(175)));
        assert_eq!(quantile(&[0; 17], 0.5), None);
        let mut over = [0u64; BUCKETS_US.len() + 1];
        over[BUCKETS_US.len()] = 1;
        assert_eq!(quantile(&over, 0.99), None, "beyond the last bound");
    }
}
