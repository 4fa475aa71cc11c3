//! Zero-downtime restarts with real processes: an in-place upgrade
//! (SIGUSR2) under load with no connection error on the client, a failed
//! upgrade that leaves the old process serving, and socket activation
//! with `LISTEN_FDS`/`LISTEN_PID` passed the way systemd passes them.
#![allow(clippy::disallowed_methods)] // test threads may sleep

mod support;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use support::{http_upstream::HttpUpstream, *};

/// A port free now (the proxy binds it next; an upgrade needs a fixed
/// address to match inherited sockets by).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn config(driver: &str, port: u16, admin: &std::path::Path, app: SocketAddr) -> String {
    format!(
        r#"workers = 2
drain_timeout = "5s"
[runtime]
driver = "{driver}"
[admin]
socket = "{}"
[[listeners]]
name = "app-out"
bind = "127.0.0.1:{port}"
protocol = "http"
cluster = "app"
[[clusters]]
name = "app"
endpoints = ["{app}"]
"#,
        admin.display()
    )
}

/// One request on a new connection; whether a whole 200 came back.
fn one_request(addr: SocketAddr) -> Result<(), String> {
    let mut s =
        TcpStream::connect_timeout(&addr, IO_DEADLINE).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(IO_DEADLINE)).unwrap();
    s.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&out);
    if text.starts_with("HTTP/1.1 200") && text.ends_with("ok /x") {
        Ok(())
    } else {
        Err(format!("answer: {text:?}"))
    }
}

/// Keep-alive requests on one connection at a time: a connection the
/// server closes after a complete response (`connection: close`, as a
/// draining process answers) is replaced; anything else is an error.
fn keep_alive_requests(addr: SocketAddr, stop: &AtomicBool, ok: &AtomicU64, errors: &AtomicU64) {
    let mut conn: Option<support::http_client::Conn> = None;
    while !stop.load(Ordering::Relaxed) {
        let c = conn.get_or_insert_with(|| support::http_client::Conn::open(addr));
        c.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n");
        match c.read(false) {
            Some(r) if r.status == 200 => {
                ok.fetch_add(1, Ordering::Relaxed);
                if r.header("connection")
                    .is_some_and(|v| v.eq_ignore_ascii_case("close"))
                {
                    conn = None;
                }
            }
            other => {
                eprintln!("keep-alive error: {other:?}");
                errors.fetch_add(1, Ordering::Relaxed);
                conn = None;
            }
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// A process that is not our child (the successor), sent SIGTERM on drop
/// so that a failing test leaves nothing behind.
struct Terminate(u32);

impl Drop for Terminate {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.to_string()).status();
    }
}

/// Whether process `pid` is gone (or a zombie).
fn gone(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_or(true, |s| s.split_whitespace().nth(2) == Some("Z"))
}

#[test]
fn sigusr2_hands_every_socket_to_a_new_process_under_load_without_errors() {
    for driver in drivers() {
        let up = HttpUpstream::start();
        let dir = temp_dir(&format!("upgrade-{driver}"));
        let admin = dir.join("admin.sock");
        let port = free_port();
        let mut old = ChildProxy::spawn(&config(driver, port, &admin, up.addr));
        let addr = old.wait_ready();

        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let mut load = Vec::new();
        for _ in 0..3 {
            let (stop, ok, errors) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&errors));
            load.push(thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match one_request(addr) {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            eprintln!("new-connection error: {e}");
                            errors.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            }));
        }
        {
            let (stop, ok, errors) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&errors));
            load.push(thread::spawn(move || {
                keep_alive_requests(addr, &stop, &ok, &errors)
            }));
        }
        thread::sleep(Duration::from_millis(300));
        let before = ok.load(Ordering::Relaxed);
        old.signal(libc::SIGUSR2);
        // The old process names its successor to systemd.
        let successor: u32 = loop {
            let msg = old.next_notify();
            if let Some(pid) = msg.lines().find_map(|l| l.strip_prefix("MAINPID=")) {
                break pid.parse().unwrap();
            }
        };
        let _successor = Terminate(successor);
        let status = old
            .wait_exit(Duration::from_secs(15))
            .expect("the old process exits");
        assert!(status.success(), "{driver}: {status}");
        thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::SeqCst);
        for t in load {
            t.join().unwrap();
        }
        let after = ok.load(Ordering::Relaxed);
        // The successor serves, and has the admin socket.
        let (status, stats) = pilotfish::admin::client::request(&admin, "GET", "/stats").unwrap();
        let _ = Command::new("kill").arg(successor.to_string()).status();
        assert_eq!(status, 200);
        let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
        let accepted = stats["total"]["connections_accepted"].as_u64().unwrap();
        let deadline = Instant::now() + IO_DEADLINE;
        while !gone(successor) {
            assert!(
                Instant::now() < deadline,
                "the successor did not stop on SIGTERM"
            );
            thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(errors.load(Ordering::Relaxed), 0, "{driver}: client errors");
        assert!(
            before > 0 && after > before,
            "{driver}: {before} then {after}"
        );
        assert!(accepted > 0, "{driver}: the successor accepted nothing");
    }
}

#[test]
fn a_failed_upgrade_leaves_the_old_process_serving() {
    let up = HttpUpstream::start();
    let dir = temp_dir("upgrade-fails");
    let admin = dir.join("admin.sock");
    let port = free_port();
    let mut old = ChildProxy::spawn(&config("io_uring", port, &admin, up.addr));
    let addr = old.wait_ready();
    // The successor will read a broken config and exit.
    std::fs::write(old.dir.join("pilotfish.toml"), "workers = \"many\"\n").unwrap();
    old.signal(libc::SIGUSR2);
    let status = loop {
        let msg = old.next_notify();
        if let Some(s) = msg.lines().find_map(|l| l.strip_prefix("STATUS=")) {
            break s.to_string();
        }
    };
    assert!(status.contains("upgrade failed"), "{status}");
    assert!(
        old.child.try_wait().unwrap().is_none(),
        "the old process goes on"
    );
    one_request(addr).unwrap();
    let (code, _) = pilotfish::admin::client::request(&admin, "GET", "/live").unwrap();
    assert_eq!(code, 200);
}

/// Socket activation as systemd does it: one socket for two workers (they
/// share it), connections queued before the proxy started are served.
/// Both drivers.
#[test]
fn socket_activation_serves_on_the_sockets_systemd_passes() {
    let up = HttpUpstream::start();
    for driver in drivers() {
        socket_activation_on(driver, &up);
    }
}

fn socket_activation_on(driver: &str, up: &HttpUpstream) {
    let dir = temp_dir("socket-activation");
    // As a systemd socket unit with ReusePort=yes would make it.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_reuse_port(true).unwrap();
    sock.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    sock.listen(128).unwrap();
    sock.set_cloexec(false).unwrap();
    let addr = sock.local_addr().unwrap().as_socket().unwrap();
    let config_path = dir.join("pilotfish.toml");
    std::fs::write(
        &config_path,
        config(driver, addr.port(), &dir.join("admin.sock"), up.addr),
    )
    .unwrap();
    // systemd puts the sockets at descriptor 3 and names the pid in
    // LISTEN_PID; `exec` keeps the shell's pid for pilotfish.
    let script = format!(
        "exec 3<&{fd}; exec {fd}<&-; LISTEN_PID=$$ LISTEN_FDS=1 exec {bin} run --config {config}",
        fd = sock.as_raw_fd(),
        bin = env!("CARGO_BIN_EXE_pilotfish"),
        config = config_path.display()
    );
    // bash: dash takes only one-digit descriptors in redirections.
    let mut child = Command::new("bash")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    // Connections queued before the proxy even started are served.
    let early = thread::spawn(move || one_request(addr));
    let deadline = Instant::now() + IO_DEADLINE;
    let mut served = 0;
    while served < 20 {
        assert!(Instant::now() < deadline, "not served");
        match one_request(addr) {
            Ok(()) => served += 1,
            Err(e) => panic!("{driver}: {e}"),
        }
    }
    early
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{driver}: {e}"));
    let _ = child.kill();
    let _ = child.wait();
}

/// The next notify datagram and the descriptors passed with it.
fn recv_with_fds(notify: &std::os::unix::net::UnixDatagram) -> (String, Vec<std::os::fd::OwnedFd>) {
    use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    let mut data = [0u8; 4096];
    let mut space = vec![std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(253))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = recvmsg(
        notify,
        &mut [std::io::IoSliceMut::new(&mut data)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .expect("a notify datagram before the deadline");
    let mut fds = Vec::new();
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = msg {
            fds.extend(rights);
        }
    }
    (
        String::from_utf8_lossy(&data[..got.bytes]).into_owned(),
        fds,
    )
}

/// A crash, then systemd's restart with what the process put in the
/// file-descriptor store (`FDSTORE=1`, read here from a fake
/// NOTIFY_SOCKET): the restarted process serves on the same sockets, and
/// a connection made while no process ran is answered.
/// Both drivers.
#[test]
fn the_fd_store_keeps_the_listening_sockets_across_a_crash() {
    let up = HttpUpstream::start();
    for driver in drivers() {
        fd_store_round_trip(driver, &up);
    }
}

fn fd_store_round_trip(driver: &str, up: &HttpUpstream) {
    let dir = temp_dir("fdstore");
    let port = free_port();
    let config_text = config(driver, port, &dir.join("admin.sock"), up.addr);
    let mut first = ChildProxy::spawn(&config_text);
    let addr = first.wait_ready();
    let fds = loop {
        let (msg, fds) = recv_with_fds(&first.notify);
        if msg.contains("FDSTORE=1") {
            assert!(msg.contains("FDNAME=listeners"), "{msg}");
            break fds;
        }
    };
    // Two workers, one listening socket each.
    assert_eq!(fds.len(), 2);
    one_request(addr).unwrap();
    first.signal(libc::SIGKILL);
    first.wait_exit(IO_DEADLINE).expect("killed");
    // Nothing runs now; the stored sockets still listen, so this connect
    // completes and waits in a queue.
    let early = thread::spawn(move || one_request(addr));
    thread::sleep(Duration::from_millis(200));
    // Restart as systemd does: the stored descriptors from 3 on.
    let config_path = dir.join("pilotfish.toml");
    std::fs::write(&config_path, &config_text).unwrap();
    // Copies above 100 first, so that moving them to 3.. overwrites none.
    let high: Vec<std::os::fd::OwnedFd> = fds
        .iter()
        .map(|fd| rustix::io::fcntl_dupfd_cloexec(fd, 100).unwrap())
        .collect();
    let mut moves = String::new();
    for (i, fd) in high.iter().enumerate() {
        socket2::SockRef::from(fd).set_cloexec(false).unwrap();
        moves += &format!("exec {}<&{}; ", 3 + i, fd.as_raw_fd());
    }
    let script = format!(
        "{moves}LISTEN_PID=$$ LISTEN_FDS={n} exec {bin} run --config {config}",
        n = fds.len(),
        bin = env!("CARGO_BIN_EXE_pilotfish"),
        config = config_path.display()
    );
    let mut second = Command::new("bash")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    drop((fds, high));
    let answered = early.join().unwrap();
    for _ in 0..10 {
        one_request(addr).unwrap();
    }
    let _ = second.kill();
    let _ = second.wait();
    answered.expect("the connection made during the restart is answered");
}
