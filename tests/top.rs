//! `pilotfish admin top` driven in a real terminal (tmux): against a
//! running sidecar with traffic, it shows the route with its rate,
//! success rate and percentiles, refreshes, and exits cleanly (status 0,
//! terminal restored) on `q` and on Ctrl-C.
//!
//! Needs tmux; outside CI a machine without it skips, under CI=true that
//! is a failure.
#![allow(clippy::disallowed_methods)] // test threads may sleep

mod support;

use std::{
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use support::{http_client::Conn, http_upstream::HttpUpstream, *};

fn have_tmux() -> bool {
    let found = Command::new("sh")
        .args(["-c", "command -v tmux"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(std::env::var("CI").is_err(), "tmux is needed under CI");
        eprintln!("skipped: no tmux");
    }
    found
}

fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux").args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until the pane shows text for which `ok` holds; the last screen.
fn wait_for(session: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + IO_DEADLINE;
    loop {
        let screen = tmux(&["capture-pane", "-p", "-t", session]);
        if ok(&screen) {
            return screen;
        }
        assert!(
            Instant::now() < deadline,
            "{what}; the pane shows:\n{screen}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn top_shows_the_busiest_route_and_quits_on_q_and_ctrl_c() {
    if !have_tmux() {
        return;
    }
    let up = HttpUpstream::start();
    let dir = temp_dir("top");
    let socket = dir.join("admin.sock");
    let toml = format!(
        r#"workers = 1
[admin]
socket = "{}"
[[listeners]]
name = "app-out"
bind = "127.0.0.1:0"
protocol = "http"
cluster = "app"
[[listeners.routes]]
name = "checkout"
path_prefix = "/api"
cluster = "app"
[[clusters]]
name = "app"
endpoints = ["{}"]
"#,
        socket.display(),
        up.addr
    );
    let mut proxy = ChildProxy::spawn(&toml);
    let addr = proxy.wait_ready();

    // Traffic for the whole test: one in ten requests fails (503).
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let mut c = Conn::open(addr);
            let mut i = 0u64;
            let started = Instant::now();
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) {
                let path = if i % 10 == 9 {
                    "/api/status/503"
                } else {
                    "/api/x"
                };
                c.send(format!("GET {path} HTTP/1.1\r\nHost: app\r\n\r\n").as_bytes());
                c.read(false).expect("response");
                i += 1;
                thread::sleep(Duration::from_millis(2));
            }
        })
    };

    for (key, name) in [("q", "q"), ("C-c", "ctrl-c")] {
        let session = format!("pf-top-{}-{name}", std::process::id());
        let status = dir.join(format!("status-{name}"));
        let cmd = format!(
            "{} admin --socket {} top --interval 300ms; echo $? > {}",
            env!("CARGO_BIN_EXE_pilotfish"),
            socket.display(),
            status.display()
        );
        tmux(&[
            "new-session",
            "-d",
            "-s",
            &session,
            "-x",
            "200",
            "-y",
            "30",
            &cmd,
        ]);
        let screen = wait_for(&session, "top showed no row for the route", |s| {
            s.lines().any(|l| l.contains("checkout") && l.contains('%'))
        });
        let row = screen.lines().find(|l| l.contains("checkout")).unwrap();
        let cols: Vec<&str> = row.split_whitespace().collect();
        // direction listener route cluster peer rps success p50 p99
        assert_eq!(
            &cols[..4],
            ["outbound", "app-out", "checkout", "app"],
            "{row}"
        );
        let rps: f64 = cols[5].parse().unwrap_or_else(|_| panic!("rps in {row}"));
        assert!(rps > 10.0, "{row}");
        let success: f64 = cols[6].trim_end_matches('%').parse().unwrap();
        assert!(success > 70.0 && success < 100.0, "one in ten fails: {row}");
        assert!(screen.contains("P99"), "{screen}");
        tmux(&["send-keys", "-t", &session, key]);
        let deadline = Instant::now() + IO_DEADLINE;
        while !status.exists() {
            assert!(Instant::now() < deadline, "top did not exit on {name}");
            thread::sleep(Duration::from_millis(50));
        }
        thread::sleep(Duration::from_millis(100));
        assert_eq!(
            std::fs::read_to_string(&status).unwrap().trim(),
            "0",
            "top's exit status on {name}"
        );
        let _ = tmux(&["kill-session", "-t", &session]);
    }
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    proxy.signal(15);
    let _ = proxy.child.wait();
}
