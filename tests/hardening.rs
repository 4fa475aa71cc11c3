//! Regression tests for issue 11's defects that showed through the real
//! binary: each starts `pilotfish run` as a child process (or `pilotfish
//! check`) and talks to it over real sockets on 127.0.0.1.
// Test threads are not workers: a short sleep to let a signal land is fine.
#![allow(clippy::disallowed_methods)]

mod support;

use std::{
    net::{SocketAddr, TcpListener},
    os::unix::fs::PermissionsExt,
    time::Duration,
};

use support::{http_client::*, http_upstream::HttpUpstream, *};

/// A port the OS just gave out and took back, for a key that cannot take
/// port 0 (the admin TCP listener's address is not reported back).
fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn app_out(upstream: SocketAddr, extra_top: &str, listener_extra: &str) -> String {
    format!(
        "workers = 1\ndrain_timeout = \"2s\"\n{extra_top}\n[[listeners]]\nname = \"app-out\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ncluster = \"app\"\n{listener_extra}\n[[clusters]]\nname = \"app\"\nendpoints = [\"{upstream}\"]\n"
    )
}

fn ask(addr: SocketAddr, raw: &str) -> Response {
    let mut c = Conn::open(addr);
    c.send(raw.as_bytes());
    c.read(false).expect("an answer")
}

/// Item 4: through the binary, a loopback peer of the admin TCP listener
/// can neither drain the proxy nor read its config without the token;
/// with it, it can.
#[test]
fn admin_tcp_mutations_need_the_bearer_token() {
    let up = HttpUpstream::start();
    let dir = temp_dir("admin-tcp-bin");
    let token_file = dir.join("admin.token");
    std::fs::write(&token_file, "0123456789abcdef-token\n").unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let admin = free_port();
    let top = format!(
        "[admin]\nbind = \"{admin}\"\ntoken_file = \"{}\"",
        token_file.display()
    );
    let mut proxy = ChildProxy::spawn(&app_out(up.addr, &top, ""));
    let addr = proxy.wait_ready();
    eventually("admin listens", || {
        std::net::TcpStream::connect(admin).is_ok()
    });
    let metrics = ask(admin, "GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(metrics.status, 200);
    let denied = ask(
        admin,
        "POST /drain HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(denied.status, 401, "{}", denied.text());
    let config = ask(admin, "GET /config HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(config.status, 401);
    assert!(!config.text().contains(&up.addr.to_string()));
    assert_eq!(get(addr, "/echo").status, 200, "still serving");
    let drained = ask(
        admin,
        "POST /drain HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer 0123456789abcdef-token\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(drained.status, 200);
    assert!(proxy
        .wait_exit(Duration::from_secs(15))
        .is_some_and(|s| s.success()));

    // A token file others can read is refused at start.
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut proxy = ChildProxy::spawn(&app_out(up.addr, &top, ""));
    let status = proxy.wait_exit(Duration::from_secs(15)).expect("exits");
    assert!(!status.success());
    let _ = std::fs::remove_dir_all(dir);
}

fn lines_in(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

/// Item 6: logrotate's `mv` + SIGUSR1 (and SIGHUP) move the lines to the
/// new file; the process survives both; lines the writer cannot write are
/// counted; an unwritable path stops `check` and `run`.
#[test]
fn access_logs_reopen_on_sigusr1_and_sighup() {
    let up = HttpUpstream::start();
    let dir = temp_dir("logrotate");
    let log = dir.join("access.log");
    let socket = dir.join("admin.sock");
    let config = app_out(
        up.addr,
        &format!("[admin]\nsocket = \"{}\"", socket.display()),
        &format!("access_log = {{ path = \"{}\" }}", log.display()),
    );
    let mut proxy = ChildProxy::spawn(&config);
    let addr = proxy.wait_ready();
    assert_eq!(get(addr, "/echo").status, 200);
    eventually("first line", || lines_in(&log) == 1);

    for (signal, name) in [(10, "SIGUSR1"), (1, "SIGHUP")] {
        let rotated = dir.join(format!("access.log.{name}"));
        std::fs::rename(&log, &rotated).unwrap();
        proxy.signal(signal);
        if signal == 1 {
            // A reload says READY=1 when it is done.
            while !proxy.next_notify().contains("READY=1") {}
        } else {
            std::thread::sleep(Duration::from_millis(300));
        }
        assert!(
            proxy.child.try_wait().unwrap().is_none(),
            "{name} killed it"
        );
        assert_eq!(get(addr, "/echo").status, 200);
        eventually(&format!("a new file after {name}"), || lines_in(&log) == 1);
        assert_eq!(
            lines_in(&rotated),
            1,
            "{name}: nothing more in the moved file"
        );
    }

    // SIGUSR2 asks for an in-place upgrade, which a config with a port-0
    // listener cannot have (the new process could not match the sockets):
    // refused, and the process goes on.
    proxy.signal(12);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        proxy.child.try_wait().unwrap().is_none(),
        "SIGUSR2 killed it"
    );

    // The directory goes away: lines cannot be written, and are counted.
    let lost_dir = dir.join("logs");
    std::fs::create_dir(&lost_dir).unwrap();
    let config2 = config.replace(
        &log.display().to_string(),
        &lost_dir.join("a.log").display().to_string(),
    );
    std::fs::write(proxy.dir.join("pilotfish.toml"), &config2).unwrap();
    proxy.signal(1);
    while !proxy.next_notify().contains("READY=1") {}
    std::fs::remove_dir_all(&lost_dir).unwrap();
    proxy.signal(10);
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..3 {
        assert_eq!(get(addr, "/echo").status, 200);
    }
    eventually("lost lines counted", || {
        let (_, metrics) = pilotfish::admin::client::request(&socket, "GET", "/metrics").unwrap();
        metrics.contains("pilotfish_access_log_dropped_total{core=\"writer\"} 3")
    });
    proxy.signal(15);
    assert!(proxy.wait_exit(Duration::from_secs(15)).is_some());

    // An access log that cannot be opened is an error before serving.
    let bad = app_out(
        up.addr,
        "",
        "access_log = { path = \"/nonexistent-dir/x/access.log\" }",
    );
    let file = dir.join("bad.toml");
    std::fs::write(&file, &bad).unwrap();
    let (ok, _, err) = check_config(&file);
    assert!(
        !ok && err.contains("/nonexistent-dir/x/access.log"),
        "{err}"
    );
    let mut proxy = ChildProxy::spawn(&bad);
    let status = proxy.wait_exit(Duration::from_secs(15)).expect("exits");
    assert!(!status.success());
    let _ = std::fs::remove_dir_all(dir);
}

/// Item 13: an empty file is not a config that serves nothing.
#[test]
fn check_refuses_a_config_without_listeners() {
    let dir = temp_dir("empty-config");
    let empty = dir.join("empty.toml");
    std::fs::write(&empty, "").unwrap();
    let (ok, _, err) = check_config(&empty);
    assert!(!ok, "an empty file passed check");
    assert!(err.contains("no [[listeners]]"), "{err}");
    // With an admin socket (a config to be applied later) it is a warning.
    let admin_only = dir.join("admin.toml");
    std::fs::write(
        &admin_only,
        format!("[admin]\nsocket = \"{}\"\n", dir.join("a.sock").display()),
    )
    .unwrap();
    let (ok, _, err) = check_config(&admin_only);
    assert!(ok, "{err}");
    assert!(
        err.contains("warning") && err.contains("no listeners"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Item 7: a second Pilotfish on an address the first one serves refuses
/// to start ("address in use") instead of taking part of the traffic.
#[test]
fn a_second_instance_on_the_same_address_refuses_to_start() {
    let up = HttpUpstream::start();
    let bind = free_port();
    let config = app_out(up.addr, "", "").replace("127.0.0.1:0", &bind.to_string());
    let mut first = ChildProxy::spawn(&config);
    assert_eq!(first.wait_ready(), bind);
    let dir = temp_dir("second");
    let file = dir.join("second.toml");
    std::fs::write(&file, &config).unwrap();
    let mut second = std::process::Command::new(env!("CARGO_BIN_EXE_pilotfish"))
        .args(["run", "--config"])
        .arg(&file)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = second.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = second.kill();
            panic!("the second instance started on {bind}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(err.contains("address in use"), "{err}");
    // Every connection still reaches the first.
    for _ in 0..20 {
        assert_eq!(get(bind, "/echo").status, 200);
    }
    first.signal(15);
    assert!(first.wait_exit(Duration::from_secs(15)).is_some());
    let _ = std::fs::remove_dir_all(dir);
}

fn counter(socket: &std::path::Path, name: &str) -> u64 {
    let (_, stats) = pilotfish::admin::client::request(socket, "GET", "/stats").unwrap();
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    v["total"][name].as_u64().unwrap()
}

/// Item 5: at the connection cap, idle keep-alive connections make room
/// for new ones (longest idle first); with none idle, a new connection
/// gets an immediate 503 `overload` instead of waiting in the backlog.
#[test]
fn at_the_connection_cap_idle_connections_make_room_and_the_rest_is_refused() {
    let up = HttpUpstream::start();
    let dir = temp_dir("conn-cap");
    let socket = dir.join("admin.sock");
    let config = app_out(
        up.addr,
        &format!(
            "max_connections_per_worker = 2\n[admin]\nsocket = \"{}\"",
            socket.display()
        ),
        "",
    );
    let mut proxy = ChildProxy::spawn(&config);
    let addr = proxy.wait_ready();
    let keep = |c: &mut Conn| {
        c.send(b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(c.read(false).unwrap().status, 200);
    };
    // Two idle keep-alive connections fill the cap.
    let mut oldest = Conn::open(addr);
    keep(&mut oldest);
    let mut younger = Conn::open(addr);
    keep(&mut younger);
    // A third is served: the longest-idle one was closed for it.
    let mut third = Conn::open(addr);
    keep(&mut third);
    assert!(oldest.closed(), "the longest-idle connection was closed");
    keep(&mut younger);
    assert_eq!(counter(&socket, "connections_evicted_idle"), 1);

    // Now both slots are busy with requests in flight: no one to evict.
    // The count is taken before sending: a request may reach the upstream
    // before the next line runs.
    let before = up.requests();
    younger.send(b"GET /delay/3000 HTTP/1.1\r\nHost: a\r\n\r\n");
    third.send(b"GET /delay/3000 HTTP/1.1\r\nHost: a\r\n\r\n");
    eventually("both requests upstream", || up.requests() == before + 2);
    let refused = ask(addr, "GET /echo HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.header("x-pilotfish-error"), Some("overload"));
    assert_eq!(counter(&socket, "connections_refused_overload"), 1);
    // The busy ones finish undisturbed.
    assert_eq!(younger.read(false).unwrap().status, 200);
    assert_eq!(third.read(false).unwrap().status, 200);
    proxy.signal(15);
    assert!(proxy.wait_exit(Duration::from_secs(15)).is_some());
    let _ = std::fs::remove_dir_all(dir);
}

/// The first overload stage: near the connection cap (90% of it), HTTP/1.1
/// responses say `connection: close`, so clients turn over before anyone
/// is refused; below it, keep-alive is kept. Counted.
#[test]
fn near_the_connection_cap_responses_stop_keeping_connections_alive() {
    let up = HttpUpstream::start();
    let dir = temp_dir("keep-alive-off");
    let socket = dir.join("admin.sock");
    let config = app_out(
        up.addr,
        &format!(
            "max_connections_per_worker = 10\n[admin]\nsocket = \"{}\"",
            socket.display()
        ),
        "",
    );
    let mut proxy = ChildProxy::spawn(&config);
    let addr = proxy.wait_ready();
    let request = |c: &mut Conn| {
        c.send(b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n");
        let r = c.read(false).unwrap();
        assert_eq!(r.status, 200);
        r.header("connection").map(str::to_ascii_lowercase)
    };
    // 8 connections of 10: kept alive.
    let mut held: Vec<Conn> = (0..7).map(|_| Conn::open(addr)).collect();
    for c in &mut held {
        assert_eq!(request(c), None);
    }
    let mut active = Conn::open(addr);
    assert_eq!(request(&mut active), None, "8 of 10: kept");
    // A ninth: the next response closes its connection.
    let mut ninth = Conn::open(addr);
    assert_eq!(request(&mut ninth).as_deref(), Some("close"), "9 of 10");
    assert!(ninth.closed());
    assert_eq!(counter(&socket, "overload_keep_alive_off"), 1);
    // Back under the threshold: kept again.
    drop(held.pop());
    eventually("a slot comes free", || {
        let mut c = Conn::open(addr);
        request(&mut c).is_none()
    });
    proxy.signal(15);
    assert!(proxy.wait_exit(Duration::from_secs(15)).is_some());
    let _ = std::fs::remove_dir_all(dir);
}

/// A keep-alive connection quiet for longer than the park delay (100 ms)
/// gives back its read buffer and request state and waits for readiness
/// alone. Its next request is served as before: one that wakes it, a head
/// split across a park, two pipelined requests, and requests from many
/// connections timed around the moment they park (the read in flight is
/// cancelled and then awaited, so bytes that raced the cancel are kept).
/// Both drivers.
#[test]
fn quiet_keep_alive_connections_park_and_wake_without_losing_bytes() {
    let up = HttpUpstream::start();
    for driver in drivers() {
        let dir = temp_dir("park");
        let socket = dir.join("admin.sock");
        let config = app_out(
            up.addr,
            &format!(
                "[runtime]\ndriver = \"{driver}\"\n[admin]\nsocket = \"{}\"",
                socket.display()
            ),
            "",
        );
        let mut proxy = ChildProxy::spawn(&config);
        let addr = proxy.wait_ready();
        const GET: &[u8] = b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n";
        let answered = |c: &mut Conn| c.read(false).map(|r| r.status);
        let parked = |more_than: u64| {
            eventually(&format!("{driver}: a park"), || {
                counter(&socket, "connections_parked") > more_than
            })
        };
        let mut c = Conn::open(addr);
        c.send(GET);
        assert_eq!(answered(&mut c), Some(200), "{driver}");
        parked(0);
        c.send(GET);
        assert_eq!(answered(&mut c), Some(200), "{driver}: woken by a request");

        let before = counter(&socket, "connections_parked");
        parked(before);
        c.send(b"GET /echo HTTP/1.1\r\n");
        std::thread::sleep(Duration::from_millis(250));
        c.send(b"Host: a\r\n\r\n");
        assert_eq!(
            answered(&mut c),
            Some(200),
            "{driver}: head split by a park"
        );

        let before = counter(&socket, "connections_parked");
        parked(before);
        c.send(&[GET, GET].concat());
        assert_eq!(answered(&mut c), Some(200), "{driver}: first pipelined");
        assert_eq!(answered(&mut c), Some(200), "{driver}: second pipelined");

        // 40 connections, each sending its second request 90 to 110 ms
        // after its first was answered: around the park, on both sides.
        let waiters: Vec<_> = (0..40u64)
            .map(|i| {
                let mut c = Conn::open(addr);
                std::thread::spawn(move || {
                    c.send(GET);
                    let first = answered(&mut c);
                    std::thread::sleep(Duration::from_micros(90_000 + i * 500));
                    c.send(GET);
                    (first, answered(&mut c))
                })
            })
            .collect();
        for w in waiters {
            assert_eq!(w.join().unwrap(), (Some(200), Some(200)), "{driver}");
        }
        proxy.signal(15);
        assert!(proxy.wait_exit(Duration::from_secs(15)).is_some());
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// The memory overload stages, walked in order through the real binary
/// (the resident size read from a file: the documented test seam): below
/// 80% of `memory_max_mib` nothing changes; from 80% responses close their
/// connections; from 90% new requests get 503 `overload`; from 95% the
/// worker stops accepting, and a connection made then waits in the
/// backlog and is served once the pressure eases. Each stage is counted
/// and shown in /stats. Both drivers.
#[test]
fn memory_overload_stages_are_reached_in_order() {
    const MIB: u64 = 1024 * 1024;
    let up = HttpUpstream::start();
    for driver in drivers() {
        let dir = temp_dir("memory-overload");
        let socket = dir.join("admin.sock");
        let memory = dir.join("memory");
        let set_memory = |mib: u64| std::fs::write(&memory, (mib * MIB).to_string()).unwrap();
        set_memory(10);
        let config = app_out(
            up.addr,
            &format!(
                "[runtime]\ndriver = \"{driver}\"\n[overload]\nmemory_max_mib = 100\n[admin]\nsocket = \"{}\"",
                socket.display()
            ),
            "",
        );
        let mut proxy = ChildProxy::spawn_with_env(
            &config,
            &[(
                pilotfish::lifecycle::overload::MEMORY_FILE_ENV,
                memory.to_str().unwrap(),
            )],
        );
        let addr = proxy.wait_ready();
        let stats = || {
            let (_, body) = pilotfish::admin::client::request(&socket, "GET", "/stats").unwrap();
            serde_json::from_str::<serde_json::Value>(&body).unwrap()
        };
        // The process-wide stage, and every worker acting on it (a worker
        // learns the stage by message, after the sampler decided it).
        let stage_is = |want: u64| {
            eventually(&format!("{driver}: overload stage {want}"), || {
                let s = stats();
                s["overload"]["stage"].as_u64() == Some(want)
                    && s["workers"].as_array().is_some_and(|w| {
                        w.iter().all(|w| w["overload_stage"].as_u64() == Some(want))
                    })
            })
        };
        let request = |c: &mut Conn| {
            c.send(b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n");
            c.read(false).unwrap()
        };
        // 10% of the ceiling: kept alive.
        stage_is(0);
        let r = request(&mut Conn::open(addr));
        assert_eq!((r.status, r.header("connection")), (200, None), "{driver}");
        // 85%: served, but the connection closes.
        set_memory(85);
        stage_is(1);
        let r = request(&mut Conn::open(addr));
        assert_eq!(r.status, 200, "{driver}");
        assert_eq!(r.header("connection"), Some("close"), "{driver}");
        assert!(counter(&socket, "overload_keep_alive_off") >= 1, "{driver}");
        // 92%: refused with a reason.
        set_memory(92);
        stage_is(2);
        let r = request(&mut Conn::open(addr));
        assert_eq!(r.status, 503, "{driver}");
        assert_eq!(r.header("x-pilotfish-error"), Some("overload"), "{driver}");
        // 97%: the accept loop pauses (once the worker's mailbox is read).
        set_memory(97);
        stage_is(3);
        eventually("the accept loop pauses", || {
            counter(&socket, "overload_accept_paused") >= 1
        });
        let accepted = counter(&socket, "connections_accepted");
        let mut waiting = Conn::open(addr);
        waiting.send(b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n");
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            counter(&socket, "connections_accepted"),
            accepted,
            "{driver}: accepted at stage 3"
        );
        // The pressure eases: the waiting connection is accepted and served.
        set_memory(10);
        stage_is(0);
        let r = waiting.read(false).unwrap();
        assert_eq!(r.status, 200, "{driver}");
        assert_eq!(counter(&socket, "connections_accepted"), accepted + 1);
        proxy.signal(15);
        assert!(proxy.wait_exit(Duration::from_secs(15)).is_some());
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A client that trickles its request body (a byte every 300 ms: each
/// read is within the idle timeout) is cut once the body has been slower
/// than 1 KiB/s for the 10 s grace, instead of holding the connection and
/// an upstream one for as long as it likes.
#[test]
fn a_trickled_request_body_is_cut_at_the_minimum_rate() {
    use std::io::Write;
    let up = HttpUpstream::start();
    let (_proxy, addr) = start_toml(&app_out(up.addr, "", ""), "app-out");
    let mut c = Conn::open(addr);
    c.send(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n");
    let mut writer = c.writer.try_clone().unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trickler = {
        let done = std::sync::Arc::clone(&done);
        std::thread::spawn(move || {
            // 30 s of trickle at most: far past the grace.
            for _ in 0..100 {
                if writer.write_all(b"x").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(300));
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        })
    };
    // The proxy answers or closes while the client is still trickling.
    c.reader
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(40)))
        .unwrap();
    let started = std::time::Instant::now();
    let answer = c.read(false);
    assert!(
        !done.load(std::sync::atomic::Ordering::SeqCst),
        "the trickle ran its course: never cut"
    );
    // Not before the grace: a slow start is allowed.
    assert!(started.elapsed() >= Duration::from_secs(10), "cut early");
    if let Some(r) = answer {
        assert!(r.status >= 400, "{}", r.status);
    }
    trickler.join().unwrap();
}

/// Item 10: shutdown reaches a worker whose mailbox is full (it used to be
/// sent with `try_send`, lost, and then waited for in `join` forever).
#[test]
fn shutdown_gets_through_a_full_mailbox() {
    let up = HttpUpstream::start();
    let (proxy, addr) = start_toml(&app_out(up.addr, "", ""), "app-out");
    assert_eq!(get(addr, "/echo").status, 200);
    // Fill the worker's mailbox with harmless commands until it refuses.
    let mailbox = proxy.mailboxes().remove(0);
    let mut sent = 0;
    while mailbox
        .try_send(pilotfish::worker::Command::Abort { generation: 999 })
        .is_ok()
    {
        sent += 1;
        assert!(sent < 100_000, "the mailbox never filled");
    }
    let (done_tx, done) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        proxy.shutdown();
        let _ = done_tx.send(());
    });
    done.recv_timeout(IO_DEADLINE)
        .expect("shutdown returned with a full mailbox");
}

/// Item 2: an absolute-form request is routed by its target's authority
/// and forwarded in origin-form with that authority as Host; a Host that
/// names another authority is refused.
#[test]
fn absolute_form_requests_are_routed_by_their_authority() {
    let app = HttpUpstream::start();
    let guard = HttpUpstream::always(403);
    let config = app_out(
        app.addr,
        &format!("[[clusters]]\nname = \"guard\"\nendpoints = [\"{}\"]", guard.addr),
        "[[listeners.routes]]\nname = \"admin-host\"\nhost = \"admin.internal\"\ncluster = \"guard\"",
    );
    let mut proxy = ChildProxy::spawn(&config);
    let addr = proxy.wait_ready();
    // Routed by the target's authority, not a Host that differs only by a
    // default port spelled out.
    let r = ask(
        addr,
        "GET http://admin.internal/echo HTTP/1.1\r\nHost: admin.internal:80\r\n\r\n",
    );
    assert_eq!(r.status, 403, "{}", r.text());
    // A fully-qualified (trailing-dot) or upper-case spelling of the host
    // takes the same route.
    let r = ask(addr, "GET /echo HTTP/1.1\r\nHost: ADMIN.internal.\r\n\r\n");
    assert_eq!(r.status, 403, "{}", r.text());
    // A Host that disagrees is refused before any routing.
    let r = ask(
        addr,
        "GET http://admin.internal/echo HTTP/1.1\r\nHost: public.example\r\n\r\n",
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.header("x-pilotfish-error"), Some("bad_request"));
    assert!(r.text().contains("Host"), "{}", r.text());
    // Forwarded in origin-form, normalized, with the authority as Host.
    let r = ask(
        addr,
        "GET http://Public.Example:8080/a/../echo HTTP/1.1\r\nHost: public.example:8080\r\n\r\n",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = r.text();
    assert!(seen.starts_with("GET /echo HTTP/1.1\r\n"), "{seen}");
    assert!(
        seen.to_ascii_lowercase()
            .contains("\r\nhost: public.example:8080\r\n"),
        "{seen}"
    );
    assert_eq!(guard.requests(), 2);
    proxy.signal(15);
    assert!(proxy.wait_exit(Duration::from_secs(15)).is_some());
}
