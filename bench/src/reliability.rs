//! `pilotfish-bench reliability`: each way a sidecar is disturbed in
//! production (config swaps, reloads, a drain, an in-place upgrade, an
//! upstream dying, slow and idle clients, floods), run against the real
//! binary under an open-loop load, with one table of what the clients saw.
//!
//! What must hold: every request the load sent is accounted for, either
//! answered by the upstream (succeeded), answered with a status the proxy
//! generated and explained (`x-pilotfish-error`), or failed otherwise
//! (reset, timeout, refused connect): the last column is the one that
//! should read 0. p99 is set against the no-fault baseline of the same
//! load shape, measured in the same run (the machines are noisy; only
//! ratios travel).
//!
//! Every process this starts (sidecars, their upgraded successors, upstream
//! children) is stopped when its scenario ends; everything listens on
//! 127.0.0.1, and every scenario is bounded in time.

// The scenario driver sleeps between disturbances; none of these threads
// is a proxy worker.
#![allow(clippy::disallowed_methods)]

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::Context;

use crate::{load, sidecar::Sidecar};

/// Python's h2 drives the HTTP/2 floods (the same raw-frame client the
/// integration tests use).
const H2_RAW: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/peers/h2_raw.py");

/// Open-loop load shapes, small enough that two cores carry the load,
/// the proxy and the upstream without saturating.
const KEEP_ALIVE_RATE: f64 = 1000.0;
const NEW_CONNECTION_RATE: f64 = 300.0;
const LOAD_CONNECTIONS: usize = 16;
/// The slowloris scenario's connection count (the issue's figure).
const SLOWLORIS: usize = 2000;
/// The idle keep-alive scenario's connection count (full run; --quick
/// holds fewer, so that CI stays far from the descriptor limit).
const IDLE_FULL: usize = 10_000;
const IDLE_QUICK: usize = 2_000;
/// Each flood's connections (closed loop, as fast as answered).
const FLOOD_CONNECTIONS: usize = 8;

pub struct Options {
    pub quick: bool,
    pub binary: Option<PathBuf>,
    pub out: PathBuf,
}

/// One line of the table.
struct Row {
    scenario: String,
    load: String,
    sent: u64,
    succeeded: u64,
    generated: u64,
    other: u64,
    /// Other failures by kind, e.g. `closed×2`.
    other_kinds: String,
    p99_us: u64,
    /// p99 of the same load shape without the fault; None for a row that
    /// is not the measured traffic (a flood's own requests).
    baseline_us: Option<u64>,
    note: String,
}

impl Row {
    fn new(scenario: &str, load: &Shape, r: &load::Report, baseline: Option<u64>) -> Self {
        let generated: u64 = r
            .errors
            .iter()
            .filter(|(k, _)| k.starts_with("generated_"))
            .map(|(_, v)| v)
            .sum();
        let other_kinds: Vec<String> = r
            .errors
            .iter()
            .filter(|(k, _)| !k.starts_with("generated_"))
            .map(|(k, v)| format!("{k}×{v}"))
            .collect();
        let other = r.errors.values().sum::<u64>() - generated;
        Row {
            scenario: scenario.into(),
            load: load.describe(),
            sent: r.requests + generated + other,
            succeeded: r.requests,
            generated,
            other,
            other_kinds: other_kinds.join(" "),
            p99_us: r.corrected.value_at_quantile(0.99),
            baseline_us: baseline,
            note: String::new(),
        }
    }

    fn note(mut self, note: impl Into<String>) -> Self {
        self.note = note.into();
        self
    }
}

/// A load shape: keep-alive or a new connection per request, open loop.
#[derive(Clone, Copy, PartialEq)]
enum Shape {
    KeepAlive,
    NewConnection,
}

impl Shape {
    fn describe(&self) -> String {
        match self {
            Shape::KeepAlive => format!("keep-alive {KEEP_ALIVE_RATE:.0}/s"),
            Shape::NewConnection => format!("new conn {NEW_CONNECTION_RATE:.0}/s"),
        }
    }

    fn spec(&self, target: SocketAddr, warmup: Duration, duration: Duration) -> load::Spec {
        let (mode, rate) = match self {
            Shape::KeepAlive => (load::Mode::Http, KEEP_ALIVE_RATE),
            Shape::NewConnection => (load::Mode::HttpClose, NEW_CONNECTION_RATE),
        };
        load::Spec {
            target,
            mode,
            rate: Some(rate),
            connections: LOAD_CONNECTIONS,
            threads: 1,
            duration,
            warmup,
            request: load::http_request("GET", "/", "svc", &[], 0, mode == load::Mode::HttpClose),
            timeout: Duration::from_secs(10),
        }
    }
}

/// What every scenario shares: where files go, the binary, the timing.
struct Bench {
    binary: PathBuf,
    dir: PathBuf,
    warmup: Duration,
    measure: Duration,
    quick: bool,
}

/// A load running in its own thread while the scenario disturbs the proxy.
struct Running {
    handle: thread::JoinHandle<anyhow::Result<load::Report>>,
    /// When the measured window starts.
    measured_from: Instant,
}

impl Running {
    fn start(spec: load::Spec) -> Self {
        let measured_from = Instant::now() + spec.warmup;
        Running {
            handle: thread::spawn(move || load::run(&spec)),
            measured_from,
        }
    }

    /// Sleeps until `fraction` of the measured window has passed.
    fn wait_until(&self, fraction: f64, measure: Duration) {
        let at = self.measured_from + measure.mul_f64(fraction);
        let now = Instant::now();
        if at > now {
            thread::sleep(at - now);
        }
    }

    fn finish(self) -> anyhow::Result<load::Report> {
        self.handle
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))?
    }
}

pub fn run(o: &Options) -> anyhow::Result<()> {
    let binary = crate::sidecar::locate_binary(o.binary.clone())?;
    raise_descriptor_limit();
    std::fs::create_dir_all(&o.out)?;
    let (warmup, measure) = if o.quick {
        (Duration::from_millis(500), Duration::from_secs(3))
    } else {
        (Duration::from_secs(1), Duration::from_secs(10))
    };
    let b = Bench {
        binary,
        dir: o.out.clone(),
        warmup,
        measure,
        quick: o.quick,
    };
    println!(
        "reliability: each scenario {measure:?} measured after {warmup:?} warm-up, open loop, 2 workers; files in {}",
        b.dir.display()
    );
    let mut rows = Vec::new();
    let base_keep = b.baseline(Shape::KeepAlive)?;
    let base_new = b.baseline(Shape::NewConnection)?;
    let p99 = |r: &Row| r.p99_us;
    let (bk, bn) = (p99(&base_keep), p99(&base_new));
    rows.push(base_keep);
    rows.push(base_new);
    type Scenario<'a> = Box<dyn Fn(&Bench, u64, u64) -> anyhow::Result<Vec<Row>> + 'a>;
    let scenarios: Vec<(&str, Scenario)> = vec![
        ("config swap", Box::new(|b, bk, _| b.config_swaps(bk))),
        ("SIGHUP reloads", Box::new(|b, bk, _| b.sighup_reloads(bk))),
        ("drain", Box::new(|b, bk, _| b.drain(bk))),
        ("upgrade", Box::new(|b, bk, bn| b.upgrade(bk, bn))),
        (
            "upstream restart",
            Box::new(|b, bk, _| b.upstream_restart(bk)),
        ),
        ("slowloris", Box::new(|b, bk, _| b.slowloris(bk))),
        (
            "idle keep-alive",
            Box::new(|b, bk, _| b.idle_connections(bk)),
        ),
        ("floods", Box::new(|b, bk, _| b.floods(bk))),
        ("h2 floods", Box::new(|b, bk, _| b.h2_floods(bk))),
    ];
    for (name, scenario) in scenarios {
        eprintln!("reliability: {name} ...");
        rows.extend(scenario(&b, bk, bn).with_context(|| format!("scenario {name:?}"))?);
    }
    let report = table(&rows);
    std::fs::write(b.dir.join("reliability.md"), &report)?;
    print!("{report}");
    println!("\nreport: {}", b.dir.join("reliability.md").display());
    let lost: u64 = rows
        .iter()
        .filter(|r| r.baseline_us.is_some())
        .map(|r| r.other)
        .sum();
    anyhow::ensure!(
        lost == 0,
        "{lost} request(s) of the measured traffic failed without a generated status"
    );
    Ok(())
}

impl Bench {
    /// A sidecar config: one HTTP listener on a fixed port (an upgrade and
    /// a second process in the drain need one), retries and outlier
    /// detection towards `endpoints`, an admin socket.
    fn config(&self, name: &str, port: u16, endpoints: &[SocketAddr], extra: &str) -> String {
        let list: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
        format!(
            r#"workers = 2
drain_timeout = "5s"
max_connections_per_worker = 20000
{extra}
[admin]
socket = "{dir}/{name}.sock"

[[listeners]]
name = "web"
bind = "127.0.0.1:{port}"
protocol = "http"
cluster = "up"
idle_timeout = "5m"
request_head_timeout = "10s"
body_bytes_max = 1048576

[[listeners.routes]]
name = "all"
path_prefix = "/"
cluster = "up"
retry = {{ attempts = 3, on = ["connect_failure", "reset", "503"] }}

[[clusters]]
name = "up"
endpoints = [{list}]
connect_timeout = "250ms"
[clusters.outlier]
consecutive_failures = 3
base_ejection = "2s"
max_ejected_percent = 50
"#,
            dir = self.dir.display(),
            list = list.join(", ")
        )
    }

    fn sidecar(&self, name: &str, config: &str) -> anyhow::Result<Sidecar> {
        Sidecar::start(&self.binary, name, &self.dir, config)
    }

    fn admin(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.sock"))
    }

    fn spec(&self, shape: Shape, port: u16) -> load::Spec {
        shape.spec(
            SocketAddr::from(([127, 0, 0, 1], port)),
            self.warmup,
            self.measure,
        )
    }

    /// The same load with nothing disturbing it.
    fn baseline(&self, shape: Shape) -> anyhow::Result<Row> {
        let up = crate::upstream::http("127.0.0.1:0".parse()?)?;
        let port = free_port()?;
        let _sc = self.sidecar("baseline", &self.config("baseline", port, &[up], ""))?;
        let r = load::run(&self.spec(shape, port))?;
        Ok(Row::new(
            "baseline (no fault)",
            &shape,
            &r,
            Some(r.corrected.value_at_quantile(0.99)),
        ))
    }

    /// `POST /config` on the admin socket every second, alternating two
    /// configs that differ in a route (so every swap changes something).
    fn config_swaps(&self, baseline: u64) -> anyhow::Result<Vec<Row>> {
        let up = crate::upstream::http("127.0.0.1:0".parse()?)?;
        let port = free_port()?;
        let a = self.config("swap", port, &[up], "");
        let b = a.replace("name = \"all\"", "name = \"all-v2\"");
        let _sc = self.sidecar("swap", &a)?;
        let admin = self.admin("swap");
        let run = Running::start(self.spec(Shape::KeepAlive, port));
        let (mut swaps, mut refused) = (0, 0);
        let end = run.measured_from + self.measure;
        thread::sleep(self.warmup / 2);
        while Instant::now() + Duration::from_secs(1) < end {
            thread::sleep(Duration::from_secs(1));
            let body = if swaps % 2 == 0 { &b } else { &a };
            let (status, _) = pilotfish::admin::client::request_with_body(
                &admin,
                "POST",
                "/config",
                body.as_bytes(),
            )?;
            swaps += 1;
            refused += u32::from(status != 200);
        }
        let r = run.finish()?;
        Ok(vec![Row::new(
            "config swap every 1 s (admin)",
            &Shape::KeepAlive,
            &r,
            Some(baseline),
        )
        .note(format!("{swaps} swaps, {refused} refused"))])
    }

    /// The config file rewritten and SIGHUP sent every second.
    fn sighup_reloads(&self, baseline: u64) -> anyhow::Result<Vec<Row>> {
        let up = crate::upstream::http("127.0.0.1:0".parse()?)?;
        let port = free_port()?;
        let a = self.config("hup", port, &[up], "");
        let b = a.replace("name = \"all\"", "name = \"all-v2\"");
        let sc = self.sidecar("hup", &a)?;
        let file = self.dir.join("hup.toml");
        let run = Running::start(self.spec(Shape::KeepAlive, port));
        let end = run.measured_from + self.measure;
        thread::sleep(self.warmup / 2);
        let mut reloads = 0;
        while Instant::now() + Duration::from_secs(1) < end {
            thread::sleep(Duration::from_secs(1));
            std::fs::write(&file, if reloads % 2 == 0 { &b } else { &a })?;
            signal(sc.pid(), "HUP")?;
            reloads += 1;
        }
        let r = run.finish()?;
        Ok(vec![Row::new(
            "SIGHUP reload every 1 s",
            &Shape::KeepAlive,
            &r,
            Some(baseline),
        )
        .note(format!("{reloads} reloads"))])
    }

    /// SIGTERM halfway through: in-flight requests must finish, each
    /// keep-alive connection is closed after its next response
    /// (`connection: close`), and the listeners close. (A second process
    /// cannot join the listeners' SO_REUSEPORT group to take over: the
    /// proxy refuses a port another process holds, since it would
    /// silently take part of the traffic; the handover is the upgrade
    /// below, or a systemd socket unit.) Connects refused once the
    /// listeners are closed are not requests sent: the row counts them
    /// in its note; anything else that failed (a reset, a request cut in
    /// flight) is in "failed otherwise".
    fn drain(&self, baseline: u64) -> anyhow::Result<Vec<Row>> {
        let up = crate::upstream::http("127.0.0.1:0".parse()?)?;
        let port = free_port()?;
        let sc = self.sidecar("drain", &self.config("drain", port, &[up], ""))?;
        let run = Running::start(self.spec(Shape::KeepAlive, port));
        run.wait_until(0.5, self.measure);
        let draining = Instant::now();
        drop(sc); // SIGTERM, then waits for the exit
        let drained_in = draining.elapsed();
        let r = run.finish()?;
        let refused = r.errors.get("connect").copied().unwrap_or(0);
        let mut row = Row::new(
            "drain (SIGTERM) halfway",
            &Shape::KeepAlive,
            &r,
            Some(baseline),
        );
        row.sent -= refused;
        row.other -= refused;
        row.other_kinds = r
            .errors
            .iter()
            .filter(|(k, _)| !k.starts_with("generated_") && **k != "connect")
            .map(|(k, v)| format!("{k}×{v}"))
            .collect::<Vec<_>>()
            .join(" ");
        Ok(vec![row.note(format!(
            "exited {:.0} ms after SIGTERM; then {refused} connects refused (nothing listens)",
            drained_in.as_secs_f64() * 1000.0
        ))])
    }

    /// SIGUSR2 mid-run: the successor takes every listening socket; each
    /// load shape gets its own run.
    fn upgrade(&self, base_keep: u64, base_new: u64) -> anyhow::Result<Vec<Row>> {
        let mut rows = Vec::new();
        for (shape, baseline) in [
            (Shape::KeepAlive, base_keep),
            (Shape::NewConnection, base_new),
        ] {
            let up = crate::upstream::http("127.0.0.1:0".parse()?)?;
            let port = free_port()?;
            let name = "upgrade";
            let config = self.config(name, port, &[up], "");
            let sc = self.sidecar(name, &config)?;
            let old = sc.pid();
            let run = Running::start(self.spec(shape, port));
            run.wait_until(0.4, self.measure);
            signal(old, "USR2")?;
            let r = run.finish()?;
            let successors: Vec<u32> = processes_with_arg(&self.dir.join(format!("{name}.toml")))
                .into_iter()
                .filter(|p| *p != old)
                .collect();
            drop(sc);
            for p in &successors {
                let _ = signal(*p, "TERM");
            }
            wait_gone(&successors, Duration::from_secs(10));
            rows.push(
                Row::new("in-place upgrade (SIGUSR2)", &shape, &r, Some(baseline)).note(
                    if successors.len() == 1 {
                        "successor took over".to_string()
                    } else {
                        format!("{} successor process(es) found", successors.len())
                    },
                ),
            );
        }
        Ok(rows)
    }

    /// Two upstream processes; one is SIGKILLed a third of the way in and
    /// started again on the same port two thirds in. Retries (connect
    /// failure, reset, 503) and outlier detection are on.
    fn upstream_restart(&self, baseline: u64) -> anyhow::Result<Vec<Row>> {
        let (pa, pb) = (free_port()?, free_port()?);
        let _a = UpstreamChild::start(pa)?;
        let mut b = UpstreamChild::start(pb)?;
        let port = free_port()?;
        let eps = [
            SocketAddr::from(([127, 0, 0, 1], pa)),
            SocketAddr::from(([127, 0, 0, 1], pb)),
        ];
        let _sc = self.sidecar("uprestart", &self.config("uprestart", port, &eps, ""))?;
        let run = Running::start(self.spec(Shape::KeepAlive, port));
        run.wait_until(1.0 / 3.0, self.measure);
        b.kill();
        run.wait_until(2.0 / 3.0, self.measure);
        b = UpstreamChild::start(pb)?;
        let r = run.finish()?;
        drop(b);
        let stats = pilotfish::admin::client::request(&self.admin("uprestart"), "GET", "/stats")
            .map(|(_, body)| body)
            .unwrap_or_default();
        let counter = |name: &str| -> u64 {
            serde_json::from_str::<serde_json::Value>(&stats)
                .ok()
                .and_then(|v| find_number(&v, name))
                .unwrap_or(0)
        };
        Ok(vec![Row::new(
            "upstream endpoint SIGKILLed, restarted",
            &Shape::KeepAlive,
            &r,
            Some(baseline),
        )
        .note(format!(
            "1 of 2 endpoints down for a third; proxy retried {}, ejected {}",
            counter("retries"),
            counter("ejections")
        ))])
    }

    /// 2,000 connections that send a request head a few bytes a second,
    /// beside the normal load; the head-read timeout (here 10 s) cuts them
    /// with 408 while the load goes on.
    fn slowloris(&self, baseline: u64) -> anyhow::Result<Vec<Row>> {
        let up = crate::upstream::http("127.0.0.1:0".parse()?)?;
        let port = free_port()?;
        let head_timeout = if self.quick { "2s" } else { "5s" };
        let config = self.config("slowloris", port, &[up], "").replace(
            "request_head_timeout = \"10s\"",
            &format!("request_head_timeout = \"{head_timeout}\""),
        );
        let _sc = self.sidecar("slowloris", &config)?;
        let target = SocketAddr::from(([127, 0, 0, 1], port));
        let mut slow: Vec<Option<TcpStream>> = Vec::with_capacity(SLOWLORIS);
        for _ in 0..SLOWLORIS {
            let s = TcpStream::connect(target)?;
            s.set_nonblocking(true)?;
            let _ = (&s).write_all(b"GET / HTTP/1.1\r\nhost: svc\r\n");
            slow.push(Some(s));
        }
        let run = Running::start(self.spec(Shape::KeepAlive, port));
        let end = run.measured_from + self.measure;
        let mut answered_408 = 0;
        while Instant::now() < end {
            thread::sleep(Duration::from_millis(500));
            for slot in slow.iter_mut() {
                let Some(s) = slot else { continue };
                let mut buf = [0u8; 256];
                match (&*s).read(&mut buf) {
                    Ok(0) => *slot = None,
                    Ok(n) => {
                        if buf[..n].starts_with(b"HTTP/1.1 408") {
                            answered_408 += 1;
                        }
                        *slot = None;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        let _ = (&*s).write_all(b"x");
                    }
                    Err(_) => *slot = None,
                }
            }
        }
        let r = run.finish()?;
        let open = slow.iter().filter(|s| s.is_some()).count();
        Ok(vec![Row::new(
            &format!("{SLOWLORIS} slowloris conns beside it"),
            &Shape::KeepAlive,
            &r,
            Some(baseline),
        )
        .note(format!(
            "head timeout {head_timeout}: {answered_408} cut with 408, {open} still open at the end"
        ))])
    }

    /// Idle keep-alive connections (one request each, then held) while the
    /// load runs: the proxy's RSS per idle connection.
    fn idle_connections(&self, baseline: u64) -> anyhow::Result<Vec<Row>> {
        let n = if self.quick { IDLE_QUICK } else { IDLE_FULL };
        let up = crate::upstream::http("127.0.0.1:0".parse()?)?;
        let port = free_port()?;
        let sc = self.sidecar("idle", &self.config("idle", port, &[up], ""))?;
        let target = SocketAddr::from(([127, 0, 0, 1], port));
        let before = rss_kib(sc.pid())?;
        let mut held = Vec::with_capacity(n);
        let mut buf = [0u8; 1024];
        for _ in 0..n {
            let mut s = TcpStream::connect(target)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"GET / HTTP/1.1\r\nhost: svc\r\n\r\n")?;
            let got = s.read(&mut buf)?;
            anyhow::ensure!(
                buf[..got].starts_with(b"HTTP/1.1 200"),
                "idle setup request failed"
            );
            held.push(s);
        }
        thread::sleep(Duration::from_millis(300));
        let after = rss_kib(sc.pid())?;
        let r = load::run(&self.spec(Shape::KeepAlive, port))?;
        drop(held);
        Ok(vec![Row::new(
            &format!("{n} idle keep-alive conns beside it"),
            &Shape::KeepAlive,
            &r,
            Some(baseline),
        )
        .note(format!(
            "RSS {before} -> {after} KiB: {:.2} KiB per idle connection",
            after.saturating_sub(before) as f64 / n as f64
        ))])
    }

    /// A header flood (requests with 150 headers: 431) and a body flood
    /// (1 MiB bodies as fast as they go, forwarded), each from
    /// [`FLOOD_CONNECTIONS`] closed-loop connections beside the load.
    fn floods(&self, baseline: u64) -> anyhow::Result<Vec<Row>> {
        let mut rows = Vec::new();
        let headers: Vec<String> = (0..150).map(|i| format!("x-flood-{i}: {i:0>40}")).collect();
        let floods = [
            (
                "header flood (150 headers: 431)",
                load::http_request("GET", "/", "svc", &headers, 0, false),
            ),
            (
                "body flood (1 MiB POSTs)",
                load::http_request("POST", "/", "svc", &[], 1 << 20, false),
            ),
        ];
        for (name, request) in floods {
            let up = crate::upstream::http("127.0.0.1:0".parse()?)?;
            let port = free_port()?;
            let _sc = self.sidecar("flood", &self.config("flood", port, &[up], ""))?;
            let flood_spec = load::Spec {
                rate: None,
                connections: FLOOD_CONNECTIONS,
                request,
                ..self.spec(Shape::KeepAlive, port)
            };
            let flood = Running::start(flood_spec);
            let r = load::run(&self.spec(Shape::KeepAlive, port))?;
            let f = flood.finish()?;
            rows.push(Row::new(
                &format!("{name} beside it"),
                &Shape::KeepAlive,
                &r,
                Some(baseline),
            ));
            let mut flood_row = Row::new(
                &format!("  the flood itself: {name}"),
                &Shape::KeepAlive,
                &f,
                None,
            );
            flood_row.load = format!("closed loop, {FLOOD_CONNECTIONS} conns");
            let per_second = flood_row.sent as f64 / f.elapsed.as_secs_f64().max(1e-9);
            rows.push(flood_row.note(format!("{per_second:.0} req/s sent")));
        }
        Ok(rows)
    }

    /// HTTP/2 abuse classes, one connection each in turn, beside the
    /// (HTTP/1.1) load on the same listener; the note says how each
    /// flooding connection ended.
    fn h2_floods(&self, baseline: u64) -> anyhow::Result<Vec<Row>> {
        let have_h2 = Command::new("python3")
            .args(["-c", "import h2"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !have_h2 {
            eprintln!("reliability: python3 with the h2 package not found; HTTP/2 floods skipped");
            return Ok(Vec::new());
        }
        let up = crate::upstream::http("127.0.0.1:0".parse()?)?;
        let port = free_port()?;
        let _sc = self.sidecar("h2flood", &self.config("h2flood", port, &[up], ""))?;
        let run = Running::start(self.spec(Shape::KeepAlive, port));
        let end = run.measured_from + self.measure;
        thread::sleep(self.warmup);
        let mut outcomes = Vec::new();
        let kinds = [
            "rapid_reset",
            "continuation",
            "hpack_bomb",
            "empty_data",
            "ping",
            "settings",
            "window_update",
        ];
        'rounds: loop {
            for kind in kinds {
                if Instant::now() >= end {
                    break 'rounds;
                }
                let out = Command::new("timeout")
                    .args([
                        "30",
                        "python3",
                        H2_RAW,
                        "flood",
                        &format!("127.0.0.1:{port}"),
                        kind,
                    ])
                    .output()?;
                let v: serde_json::Value =
                    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
                let ended = match (&v["closed"], &v["goaway"]) {
                    (serde_json::Value::Bool(true), serde_json::Value::String(g)) => g.clone(),
                    (serde_json::Value::Bool(true), _) => "closed".into(),
                    _ => "NOT closed".into(),
                };
                outcomes.push(format!("{kind}:{ended}"));
            }
        }
        let r = run.finish()?;
        outcomes.sort();
        outcomes.dedup();
        Ok(vec![Row::new(
            "h2 floods, one after another, beside it",
            &Shape::KeepAlive,
            &r,
            Some(baseline),
        )
        .note(outcomes.join(" "))])
    }
}

/// The slowloris and idle scenarios hold thousands of connections: the
/// soft descriptor limit (often 1024) is raised to the hard one, for this
/// process and the sidecars it starts (they inherit it).
fn raise_descriptor_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            eprintln!("reliability: cannot raise the descriptor limit: {e}");
        }
    }
}

/// The markdown table.
fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| scenario | load | sent | succeeded | failed, generated status | failed otherwise | p99 | p99 vs baseline | notes |\n|---|---|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in rows {
        let ratio = r.baseline_us.map_or("-".to_string(), |b| {
            format!("{:.2}x", r.p99_us as f64 / b.max(1) as f64)
        });
        let other = if r.other_kinds.is_empty() {
            r.other.to_string()
        } else {
            format!("{} ({})", r.other, r.other_kinds)
        };
        let p99 = if r.succeeded == 0 {
            "-".to_string()
        } else {
            format!("{:.2} ms", r.p99_us as f64 / 1000.0)
        };
        out += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.scenario, r.load, r.sent, r.succeeded, r.generated, other, p99, ratio, r.note
        );
    }
    out
}

/// A port the OS just gave out and took back: scenarios that need a fixed
/// port (an upgrade, a second process in one SO_REUSEPORT group) use it.
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn signal(pid: u32, sig: &str) -> anyhow::Result<()> {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()?
        .success();
    anyhow::ensure!(ok, "kill -{sig} {pid} failed");
    Ok(())
}

/// Processes whose command line has `arg` (the config path), so that an
/// upgraded successor, which is not our child, is found and stopped.
fn processes_with_arg(arg: &Path) -> Vec<u32> {
    let want = arg.as_os_str().as_encoded_bytes();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == want))
        })
        .collect()
}

fn wait_gone(pids: &[u32], within: Duration) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline
        && pids
            .iter()
            .any(|p| Path::new(&format!("/proc/{p}")).exists())
    {
        thread::sleep(Duration::from_millis(20));
    }
    for p in pids {
        let _ = Command::new("kill")
            .args(["-KILL", &p.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

/// The first number under `key` anywhere in a JSON document.
fn find_number(v: &serde_json::Value, key: &str) -> Option<u64> {
    match v {
        serde_json::Value::Object(m) => m
            .get(key)
            .and_then(|x| x.as_u64())
            .or_else(|| m.values().find_map(|x| find_number(x, key))),
        serde_json::Value::Array(a) => a.iter().find_map(|x| find_number(x, key)),
        _ => None,
    }
}

/// `pilotfish-bench upstream` as a child process, so that it can be
/// SIGKILLed like a crashing service.
struct UpstreamChild(Child);

impl UpstreamChild {
    fn start(port: u16) -> anyhow::Result<Self> {
        let child = Command::new(std::env::current_exe()?)
            .args(["upstream", "--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let me = UpstreamChild(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "upstream on {port} did not start"
            );
            thread::sleep(Duration::from_millis(10));
        }
        Ok(me)
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for UpstreamChild {
    fn drop(&mut self) {
        self.kill();
    }
}
