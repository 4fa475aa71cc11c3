//! The real binary as a child process: systemd notify, signals, drain.

mod support;

use std::{
    io::{Read, Write},
    net::{Shutdown, TcpStream},
    thread,
    time::Duration,
};

use support::*;

const SIGINT: i32 = 2;
const SIGTERM: i32 = 15;

/// How long a child gets to exit after it has no reason to stay; a liveness
/// bound so a broken drain fails the test instead of hanging it.
const EXIT_DEADLINE: Duration = Duration::from_secs(15);

#[test]
fn notify_ready_after_listeners_accept_and_stopping_on_sigterm() {
    let upstream = echo_server();
    for driver in drivers() {
        let mut child = ChildProxy::spawn(&L4Config::new(driver, vec![upstream]).toml());
        let addr = child.wait_ready();
        // READY=1 promises the listener accepts: no retry loop here.
        let data = pattern(7, 4096);
        assert_eq!(echo_round_trip(addr, &data), data, "{driver}");
        child.signal(SIGTERM);
        let msg = child.next_notify();
        assert!(
            msg.lines().any(|l| l == "STOPPING=1"),
            "{driver}: got {msg:?}"
        );
        let status = child.wait_exit(EXIT_DEADLINE).expect("exits after drain");
        assert!(status.success(), "{driver}: {status:?}");
    }
}

#[test]
fn sigterm_lets_an_in_flight_transfer_finish_then_exits_zero() {
    let upstream = echo_server();
    let data = pattern(9, 4 * 1024 * 1024);
    for driver in drivers() {
        let mut child = ChildProxy::spawn(&L4Config::new(driver, vec![upstream]).toml());
        let addr = child.wait_ready();
        let mut conn = connect(addr);
        let mut reader = conn.try_clone().unwrap();
        let expected = data.len();
        let echoed = thread::spawn(move || {
            let mut back = Vec::with_capacity(expected);
            reader.read_to_end(&mut back).unwrap();
            back
        });
        let (first, second) = data.split_at(data.len() / 2);
        conn.write_all(first).unwrap();

        child.signal(SIGTERM);
        let msg = child.next_notify();
        assert!(msg.contains("STOPPING=1"), "{driver}: {msg:?}");
        // New connections are refused once draining...
        eventually("listener closed", || TcpStream::connect(addr).is_err());
        // ...while the in-flight one keeps going to its end.
        conn.write_all(second).unwrap();
        conn.shutdown(Shutdown::Write).unwrap();
        let back = echoed.join().unwrap();
        assert_eq!(back.len(), data.len(), "{driver}");
        assert_eq!(checksum(&back), checksum(&data), "{driver}");
        drop(conn);
        let status = child.wait_exit(EXIT_DEADLINE).expect("exits once drained");
        assert_eq!(status.code(), Some(0), "{driver}");
    }
}

#[test]
fn a_second_signal_exits_at_once() {
    let upstream = echo_server();
    let mut cfg = L4Config::new("epoll", vec![upstream]);
    cfg.drain_timeout = "10m";
    for second in [SIGTERM, SIGINT] {
        let mut child = ChildProxy::spawn(&cfg.toml());
        let addr = child.wait_ready();
        // An idle connection that would hold the drain open for 10 minutes.
        let mut held = connect(addr);
        held.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        held.read_exact(&mut b).unwrap();
        child.signal(SIGTERM);
        assert!(child.next_notify().contains("STOPPING=1"));
        assert!(
            child.wait_exit(Duration::from_millis(300)).is_none(),
            "the first signal drains; it must not exit while a connection is open"
        );
        child.signal(second);
        let status = child.wait_exit(EXIT_DEADLINE).expect("second signal exits");
        assert_eq!(status.code(), Some(1), "forced exit is reported as failure");
    }
}

#[test]
fn drain_timeout_cuts_remaining_connections_and_exits_zero() {
    let upstream = echo_server();
    let mut cfg = L4Config::new("epoll", vec![upstream]);
    cfg.drain_timeout = "300ms";
    let mut child = ChildProxy::spawn(&cfg.toml());
    let addr = child.wait_ready();
    let mut held = connect(addr);
    held.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    held.read_exact(&mut b).unwrap();
    child.signal(SIGTERM);
    let status = child
        .wait_exit(EXIT_DEADLINE)
        .expect("exits after the drain timeout");
    assert_eq!(status.code(), Some(0));
    assert!(
        matches!(held.read(&mut b), Ok(0) | Err(_)),
        "held connection was closed"
    );
}

#[test]
fn start_up_failure_exits_nonzero_without_ready() {
    // Two processes cannot share a port without SO_REUSEPORT from both; a
    // plain listener holds it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cfg = L4Config::new("epoll", vec![closed_port()]);
    cfg.bind = taken.local_addr().unwrap().to_string();
    let mut child = ChildProxy::spawn(&cfg.toml());
    let status = child.wait_exit(EXIT_DEADLINE).expect("exits");
    assert_eq!(status.code(), Some(1));
    let mut buf = [0u8; 256];
    child.notify.set_nonblocking(true).unwrap();
    while let Ok(n) = child.notify.recv(&mut buf) {
        let msg = String::from_utf8_lossy(&buf[..n]);
        assert!(!msg.contains("READY=1"), "never ready: {msg}");
    }
}

#[test]
fn sighup_reloads_the_file_with_reloading_then_ready() {
    const SIGHUP: i32 = 1;
    let first = echo_server();
    // The second upstream announces itself, so the switch is visible.
    let second = serve(|mut s| {
        let _ = s.write_all(b"second");
    });
    let mut cfg = L4Config::new("epoll", vec![first]);
    cfg.workers = 2;
    let mut child = ChildProxy::spawn(&cfg.toml());
    let addr = child.wait_ready();
    assert_eq!(echo_round_trip(addr, b"ping"), b"ping");

    // Same listener address (kept), new endpoint.
    cfg.bind = addr.to_string();
    cfg.endpoints = vec![second];
    let file = child.dir.join("pilotfish.toml");
    std::fs::write(&file, cfg.toml()).unwrap();
    child.signal(SIGHUP);
    let reloading = child.next_notify();
    assert!(
        reloading.lines().any(|l| l == "RELOADING=1"),
        "{reloading:?}"
    );
    let usec: u64 = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse().ok())
        .expect("MONOTONIC_USEC with RELOADING=1");
    assert!(usec > 0);
    let ready = child.next_notify();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(ready.contains("reloaded generation 1"), "{ready:?}");
    let mut s = connect(addr);
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"second", "new connections use the reloaded config");
    drop(s);

    // A broken file: the reload is refused, READY=1 still closes it, and
    // the running config stays.
    std::fs::write(&file, "workers = \"many\"\n").unwrap();
    child.signal(SIGHUP);
    assert!(child.next_notify().contains("RELOADING=1"));
    let ready = child.next_notify();
    assert!(
        ready.contains("READY=1") && ready.contains("reload refused"),
        "{ready:?}"
    );
    let mut s = connect(addr);
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"second");
    drop(s);

    child.signal(SIGTERM);
    assert!(child.next_notify().contains("STOPPING=1"));
    let status = child.wait_exit(EXIT_DEADLINE).expect("exits");
    assert!(status.success());
}

/// `pilotfish reload` (what the systemd units' ExecReload runs): a file
/// that fails the check is not signalled at all; a good one is checked,
/// then reloaded through SIGHUP with RELOADING=1 / READY=1. No `kill`
/// binary is needed (minimal Debian has none).
#[test]
fn pilotfish_reload_checks_then_signals() {
    let first = echo_server();
    let second = serve(|mut s| {
        let _ = s.write_all(b"second");
    });
    let mut cfg = L4Config::new("auto", vec![first]);
    let mut child = ChildProxy::spawn(&cfg.toml());
    let addr = child.wait_ready();
    let file = child.dir.join("pilotfish.toml");
    let reload = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_pilotfish"))
            .args(["reload", "--config"])
            .arg(&file)
            .args(["--pid", &child.child.id().to_string()])
            .output()
            .unwrap()
    };
    // Broken: refused by the check, and the proxy is not even asked.
    std::fs::write(&file, "workers = \"many\"\n").unwrap();
    let out = reload();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not reloaded"));
    child
        .notify
        .set_read_timeout(Some(std::time::Duration::from_millis(300)))
        .unwrap();
    // (The file-descriptor store message after READY=1 does not count.)
    assert!(child.recv_notify().is_err(), "no reload was started");
    child.notify.set_read_timeout(Some(IO_DEADLINE)).unwrap();

    cfg.bind = addr.to_string();
    cfg.endpoints = vec![second];
    std::fs::write(&file, cfg.toml()).unwrap();
    let out = reload();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(child.next_notify().contains("RELOADING=1"));
    assert!(child.next_notify().contains("READY=1"));
    let mut s = connect(addr);
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"second", "the reloaded config serves");
    drop(s);

    child.signal(SIGTERM);
    assert!(child.wait_exit(EXIT_DEADLINE).is_some_and(|s| s.success()));
}

/// The per-core watchdog through the real binary, with a fake
/// `NOTIFY_SOCKET` and `WATCHDOG_USEC` as systemd sets them: pings come
/// while every worker runs; when one worker's thread is wedged (the
/// documented test seam), they stop; when it runs again, they resume.
#[test]
fn watchdog_pings_stop_while_a_worker_is_wedged() {
    let mut cfg = L4Config::new("auto", vec![echo_server()]);
    cfg.workers = 2;
    let mut child = ChildProxy::spawn_with_env(
        &cfg.toml(),
        &[
            // Checked (and pinged) every 200 ms.
            ("WATCHDOG_USEC", "400000"),
            // Worker 1 blocks for 3 s, 1.5 s after it started.
            (pilotfish::worker::fault::WEDGE_ENV, "1:1500:3000"),
        ],
    );
    child.wait_ready();
    let deadline = std::time::Instant::now() + IO_DEADLINE;
    let next = |wait: Duration| -> Option<String> {
        child.notify.set_read_timeout(Some(wait)).unwrap();
        child.recv_notify().ok()
    };
    // Pings while both workers run.
    let mut pings = 0;
    while pings < 2 {
        assert!(std::time::Instant::now() < deadline, "no pings");
        if next(Duration::from_secs(1)).is_some_and(|m| m.contains("WATCHDOG=1")) {
            pings += 1;
        }
    }
    // Then a gap of a whole second (five check intervals): the wedge.
    loop {
        assert!(std::time::Instant::now() < deadline, "pings never stopped");
        if next(Duration::from_secs(1)).is_none() {
            break;
        }
    }
    // And pings again once the worker runs.
    loop {
        assert!(std::time::Instant::now() < deadline, "pings never resumed");
        if next(Duration::from_secs(1)).is_some_and(|m| m.contains("WATCHDOG=1")) {
            break;
        }
    }
    child.notify.set_read_timeout(Some(IO_DEADLINE)).unwrap();
    child.signal(SIGTERM);
    assert!(child.wait_exit(EXIT_DEADLINE).is_some_and(|s| s.success()));
}
