//! The transparent sidecar's units under a real systemd: a minimal Debian
//! (debootstrap, cached under the target directory) booted with
//! systemd-nspawn in a network namespace of its own, the real binary and
//! the real unit files bound in read-only. Checks the order the README
//! promises: the rules are installed before the sidecar starts, the
//! sidecar runs as the fixed user whose uid the rules exclude, and on stop
//! the sidecar is gone before the rules are removed, leaving nothing.
//!
//! Needs root, debootstrap, systemd-nspawn (systemd-container) and
//! nsenter, and the first run fetches Debian packages (about a minute).
//! Outside CI a machine without them skips with a note; under CI=true it
//! fails instead.
#![allow(clippy::disallowed_methods)]

mod support;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

/// How long debootstrap may take (a cold package cache, a slow mirror).
const DEBOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(480);
/// How long the container's systemd may take to boot, and to power off.
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// Packages besides minbase: systemd as PID 1, and the nft the units run.
const PACKAGES: &str = "systemd,systemd-sysv,dbus,nftables";

fn capable() -> bool {
    let root = rustix::process::geteuid().is_root();
    let tools = ["debootstrap", "systemd-nspawn", "nsenter"]
        .iter()
        .all(|t| {
            Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
    if root && tools {
        return true;
    }
    let why = format!(
        "the systemd test needs root, debootstrap, systemd-nspawn and nsenter (root: {root}, tools: {tools})"
    );
    assert!(std::env::var("CI").is_err(), "{why}");
    eprintln!("skipped: {why}");
    false
}

/// Runs `cmd`, killing it after `limit`.
fn run_for(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
        thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().unwrap()
}

/// A minimal Debian with systemd, made once and reused (the container
/// runs it with a volatile overlay, so boots never change it). The tests
/// of this file run in parallel threads: the first makes it while the
/// others wait (two debootstraps into one directory break each other).
fn rootfs() -> PathBuf {
    static MADE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    MADE.get_or_init(make_rootfs).clone()
}

fn make_rootfs() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("nspawn-bookworm");
    if dir.join(".complete").exists() {
        return dir;
    }
    let partial = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&partial);
    let _ = std::fs::remove_dir_all(&dir);
    let out = run_for(
        Command::new("debootstrap").args([
            "--variant=minbase",
            &format!("--include={PACKAGES}"),
            "bookworm",
            partial.to_str().unwrap(),
            "http://deb.debian.org/debian",
        ]),
        DEBOOTSTRAP_TIMEOUT,
    );
    assert!(
        out.status.success(),
        "debootstrap failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(partial.join(".complete"), "").unwrap();
    std::fs::rename(&partial, &dir).unwrap();
    dir
}

/// A booted container; powered off (or killed) when dropped.
struct Container {
    nspawn: Child,
    init: u32,
}

impl Container {
    /// `private_network`: a network namespace of its own; else the
    /// host's, so the test reaches the container's listeners on loopback.
    fn boot(
        root: &Path,
        binds: &[(PathBuf, &str)],
        log: &Path,
        private_network: bool,
    ) -> Container {
        static BOOTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = BOOTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut cmd = Command::new("systemd-nspawn");
        cmd.args(["-D", root.to_str().unwrap()])
            .args([
                "--boot",
                "--register=no",
                "--keep-unit",
                "--volatile=overlay",
                "--console=pipe",
            ])
            .arg(format!("--machine=pf-units-{}-{n}", std::process::id()));
        if private_network {
            cmd.arg("--private-network");
        }
        for (host, inside) in binds {
            cmd.arg(format!("--bind-ro={}:{inside}", host.display()));
        }
        let log_file = std::fs::File::create(log).unwrap();
        let nspawn = cmd
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap();
        // The container's PID 1 is nspawn's child.
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let init = loop {
            let children =
                std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", nspawn.id()))
                    .unwrap_or_default();
            if let Some(pid) = children.split_whitespace().next() {
                break pid.parse().unwrap();
            }
            assert!(Instant::now() < deadline, "nspawn started no init");
            thread::sleep(Duration::from_millis(50));
        };
        let c = Container { nspawn, init };
        // Wait for boot to finish (degraded is fine: some units of a
        // minimal image fail in a container).
        loop {
            let state = c.run(&["systemctl", "is-system-running"]);
            let state = String::from_utf8_lossy(&state.stdout).trim().to_string();
            if state == "running" || state == "degraded" {
                return c;
            }
            assert!(
                Instant::now() < deadline,
                "container did not boot (state {state:?}): {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs a command inside the container.
    fn run(&self, args: &[&str]) -> Output {
        run_for(
            Command::new("nsenter")
                .args(["-t", &self.init.to_string(), "-a"])
                .args(args),
            BOOT_TIMEOUT,
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{args:?} in the container: {}{}\njournal:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.journal()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn journal(&self) -> String {
        let out = self.run(&[
            "journalctl",
            "--no-pager",
            "-u",
            "pilotfish-intercept.service",
            "-u",
            "pilotfish-transparent.service",
            "-u",
            "pilotfish.service",
            "-u",
            "pilotfish.socket",
        ]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// One property of a unit, as `systemctl show` gives it.
    fn prop(&self, unit: &str, name: &str) -> String {
        self.ok(&["systemctl", "show", "-p", name, "--value", unit])
            .trim()
            .to_string()
    }

    /// When PID 1 last logged a message starting with `verb` ("Stopping",
    /// "Stopped") about `unit`: the journal's monotonic µs.
    fn pid1_event(&self, unit: &str, verb: &str) -> u64 {
        let out = self.ok(&[
            "journalctl",
            "--no-pager",
            "-o",
            "json",
            "_PID=1",
            &format!("UNIT={unit}"),
        ]);
        out.lines()
            .rev()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["MESSAGE"].as_str().is_some_and(|m| m.starts_with(verb)))
            .find_map(|v| v["__MONOTONIC_TIMESTAMP"].as_str()?.parse().ok())
            .unwrap_or_else(|| panic!("no {verb:?} for {unit} in:\n{out}"))
    }

    fn monotonic(&self, unit: &str, name: &str) -> u64 {
        let v = self.prop(unit, name);
        v.parse()
            .unwrap_or_else(|_| panic!("{unit} {name} = {v:?}"))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("nsenter")
            .args(["-t", &self.init.to_string(), "-a", "systemctl", "poweroff"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + BOOT_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}

const SIDECAR: &str = "pilotfish-transparent.service";
const RULES: &str = "pilotfish-intercept.service";

#[test]
fn rules_are_installed_before_the_sidecar_and_removed_after_it() {
    if !capable() {
        return;
    }
    let root = rootfs();
    let dir = support::temp_dir("nspawn-units");
    // The sidecar's config: outbound and inbound interception on the
    // container's own loopback (it has a network namespace of its own).
    let etc = dir.join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(
        etc.join("pilotfish.toml"),
        r#"workers = 1
drain_timeout = "1s"
[admin]
socket = "/run/pilotfish/admin.sock"
[intercept]
outbound_listener = "outbound"
inbound_listener = "inbound"
proxy_uid = 1337
proxy_gid = 1337
inbound_mode = "permissive"
[[listeners]]
name = "outbound"
bind = "[::]:15001"
protocol = "auto"
[[listeners]]
name = "inbound"
bind = "[::]:15006"
protocol = "auto"
"#,
    )
    .unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let units = repo.join("systemd");
    let binds = [
        (
            PathBuf::from(env!("CARGO_BIN_EXE_pilotfish")),
            "/usr/local/bin/pilotfish",
        ),
        (
            units.join(SIDECAR),
            "/etc/systemd/system/pilotfish-transparent.service",
        ),
        (
            units.join(RULES),
            "/etc/systemd/system/pilotfish-intercept.service",
        ),
        (
            units.join("pilotfish.sysusers"),
            "/usr/lib/sysusers.d/pilotfish.conf",
        ),
        (etc.clone(), "/etc/pilotfish"),
    ];
    let c = Container::boot(&root, &binds, &dir.join("nspawn.log"), true);

    // The user the sysusers file declares exists with the fixed uid.
    let passwd = c.ok(&["getent", "passwd", "pilotfish"]);
    assert!(passwd.contains(":1337:1337:"), "{passwd}");
    // Nothing installed before the sidecar is started.
    assert!(!c
        .run(&["nft", "list", "table", "inet", "pilotfish"])
        .status
        .success());

    c.ok(&["systemctl", "daemon-reload"]);
    c.ok(&["systemctl", "start", SIDECAR]);
    assert_eq!(c.prop(RULES, "ActiveState"), "active");
    assert_eq!(c.prop(SIDECAR, "ActiveState"), "active");
    // Start order: the rules unit finished (it is a oneshot that is active
    // once ExecStart exited) before the sidecar's first process started.
    let rules_in = c.monotonic(RULES, "ActiveEnterTimestampMonotonic");
    let sidecar_started = c.monotonic(SIDECAR, "ExecMainStartTimestampMonotonic");
    assert!(
        rules_in > 0 && rules_in <= sidecar_started,
        "rules active at {rules_in}, sidecar started at {sidecar_started}"
    );
    // The rules are in and exclude the sidecar's uid; the sidecar runs as it.
    let table = c.ok(&["nft", "list", "table", "inet", "pilotfish"]);
    assert!(table.contains("skuid 1337"), "{table}");
    assert!(table.contains("redirect to :15001"), "{table}");
    assert!(table.contains("redirect to :15006"), "{table}");
    let pid = c.prop(SIDECAR, "MainPID");
    let status = c.ok(&["cat", &format!("/proc/{pid}/status")]);
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid_line.split_whitespace().skip(1).all(|u| u == "1337"),
        "{uid_line}"
    );
    // The sidecar is serving: it answers on its admin socket.
    let ready = c.ok(&[
        "/usr/local/bin/pilotfish",
        "admin",
        "--socket",
        "/run/pilotfish/admin.sock",
        "ready",
    ]);
    assert!(!ready.is_empty());

    // Stopping the sidecar stops the rules too (PartOf), after it.
    c.ok(&["systemctl", "stop", SIDECAR]);
    assert_eq!(c.prop(SIDECAR, "ActiveState"), "inactive");
    assert_eq!(c.prop(RULES, "ActiveState"), "inactive");
    // (Inactive units are unloaded, taking their timestamps along: the
    // order comes from PID 1's journal entries about each unit.)
    let sidecar_gone = c.pid1_event(SIDECAR, "Stopped");
    let rules_out = c.pid1_event(RULES, "Stopping");
    assert!(
        sidecar_gone <= rules_out,
        "sidecar stopped at {sidecar_gone}, rules removal began at {rules_out}:\n{}",
        c.journal()
    );
    // Nothing left behind.
    assert!(
        !c.run(&["nft", "list", "table", "inet", "pilotfish"])
            .status
            .success(),
        "the rules outlived the sidecar"
    );
    let ruleset = c.ok(&["nft", "list", "ruleset"]);
    assert!(!ruleset.contains("pilotfish"), "{ruleset}");
    drop(c);
}

const SERVICE: &str = "pilotfish.service";
const SOCKET: &str = "pilotfish.socket";

/// An HTTP/1.1 upstream on the host's loopback (the container shares the
/// host's network here) that answers 200 with the request head as the
/// body, so the test sees what the proxy forwarded; `GET /slow` waits
/// 2 s first (a request in flight across a stop).
fn head_echo_upstream() -> std::net::SocketAddr {
    use std::io::{Read, Write};
    support::serve(|mut s| {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head: Vec<u8> = buf.drain(..end + 4).collect();
                if head.starts_with(b"GET /slow") {
                    thread::sleep(Duration::from_secs(2));
                }
                let mut reply =
                    format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", head.len())
                        .into_bytes();
                reply.extend_from_slice(&head);
                if s.write_all(&reply).is_err() {
                    return;
                }
            }
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
}

/// One request on a new connection: Ok((status, body)) or why not.
fn get(port: u16, path: &str) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: svc\r\nconnection: close\r\n\r\n"
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| format!("read: {e}"))?;
    let status = out
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status in {out:?}"))?;
    Ok((status, out))
}

fn sidecar_config(port: u16, upstream: std::net::SocketAddr, version: &str) -> String {
    format!(
        r#"workers = 2
drain_timeout = "5s"
[admin]
socket = "/run/pilotfish/admin.sock"
[[listeners]]
name = "web"
bind = "127.0.0.1:{port}"
protocol = "http"
cluster = "up"
[[listeners.routes]]
name = "all"
path_prefix = "/"
cluster = "up"
request_headers = {{ set = {{ "x-config" = "{version}" }} }}
[[clusters]]
name = "up"
endpoints = ["{upstream}"]
"#
    )
}

/// Polls `check` until it holds, for at most `limit`.
fn wait_for(c: &Container, what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for: {what}\njournal:\n{}",
            c.journal()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// The shipped `pilotfish.service` and `pilotfish.socket` under a real
/// systemd, each operation the README documents: start (Type=notify, on
/// the socket unit's sockets), `systemctl reload` (the new config in
/// effect, same process), `systemctl restart` under load with no request
/// refused or failed (the socket unit keeps the listening sockets), a
/// crash (SIGKILL) restarted by `Restart=on-failure`, a wedged worker
/// restarted by the watchdog, and `systemctl stop` draining a request in
/// flight.
#[test]
fn sidecar_service_reloads_restarts_and_drains_under_systemd() {
    if !capable() {
        return;
    }
    let root = rootfs();
    let dir = support::temp_dir("nspawn-service");
    let upstream = head_echo_upstream();
    let port = support::closed_port().port();
    let etc = dir.join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    let config = etc.join("pilotfish.toml");
    std::fs::write(&config, sidecar_config(port, upstream, "v1")).unwrap();
    // Drop-ins: the socket unit listens on the test's port; the service's
    // directory gets the watchdog fault later.
    let socket_d = dir.join("socket.d");
    let service_d = dir.join("service.d");
    std::fs::create_dir_all(&socket_d).unwrap();
    std::fs::create_dir_all(&service_d).unwrap();
    std::fs::write(
        socket_d.join("port.conf"),
        format!("[Socket]\nListenStream=\nListenStream=127.0.0.1:{port}\n"),
    )
    .unwrap();
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
    let binds = [
        (
            PathBuf::from(env!("CARGO_BIN_EXE_pilotfish")),
            "/usr/local/bin/pilotfish",
        ),
        (units.join(SERVICE), "/etc/systemd/system/pilotfish.service"),
        (units.join(SOCKET), "/etc/systemd/system/pilotfish.socket"),
        (socket_d.clone(), "/etc/systemd/system/pilotfish.socket.d"),
        (service_d.clone(), "/etc/systemd/system/pilotfish.service.d"),
        (etc.clone(), "/etc/pilotfish"),
    ];
    let c = Container::boot(&root, &binds, &dir.join("nspawn.log"), false);
    c.ok(&["systemctl", "daemon-reload"]);

    // Start: the socket unit first, then the service on its sockets.
    c.ok(&["systemctl", "start", SOCKET]);
    c.ok(&["systemctl", "start", SERVICE]);
    assert_eq!(c.prop(SERVICE, "ActiveState"), "active");
    let (status, body) = get(port, "/").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("x-config: v1"), "{body}");
    let first = c.prop(SERVICE, "MainPID");
    let journal = c.journal();
    assert!(
        journal.contains("serving on inherited sockets"),
        "the service did not say it took the socket unit's sockets:\n{journal}"
    );

    // Reload: the edited file is checked and applied by the same process.
    std::fs::write(&config, sidecar_config(port, upstream, "v2")).unwrap();
    c.ok(&["systemctl", "reload", SERVICE]);
    let (status, body) = get(port, "/").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("x-config: v2"),
        "reload not in effect: {body}"
    );
    assert_eq!(
        c.prop(SERVICE, "MainPID"),
        first,
        "reload replaced the process"
    );

    // Restart under load: requests on new connections all along, none
    // refused or failed while one process stops and the next starts.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        thread::spawn(move || {
            let (mut ok, mut failed) = (0u64, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match get(port, "/") {
                    Ok((200, _)) => ok += 1,
                    Ok((s, body)) => failed.push(format!("status {s}: {body}")),
                    Err(e) => failed.push(e),
                }
            }
            (ok, failed)
        })
    };
    thread::sleep(Duration::from_millis(500));
    c.ok(&["systemctl", "restart", SERVICE]);
    let second = c.prop(SERVICE, "MainPID");
    assert_ne!(second, first, "restart kept the process");
    thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = load.join().unwrap();
    assert!(ok > 10, "only {ok} requests went through");
    assert!(
        failed.is_empty(),
        "{} of {} requests failed across the restart: {:?}",
        failed.len(),
        ok + failed.len() as u64,
        &failed[..failed.len().min(5)]
    );

    // A crash: SIGKILL; Restart=on-failure starts the next process.
    c.ok(&["systemctl", "kill", "-s", "SIGKILL", SERVICE]);
    wait_for(
        &c,
        "a restart after SIGKILL",
        Duration::from_secs(30),
        || {
            let pid = c.prop(SERVICE, "MainPID");
            c.prop(SERVICE, "ActiveState") == "active" && pid != second && pid != "0"
        },
    );
    let third = c.prop(SERVICE, "MainPID");
    assert_eq!(get(port, "/").unwrap().0, 200);

    // The watchdog: worker 0 wedges 1 s after it serves (the binary's
    // test seam) and WatchdogSec=2s; systemd must kill and restart it.
    std::fs::write(
        service_d.join("watchdog.conf"),
        "[Service]\nWatchdogSec=2s\nEnvironment=PILOTFISH_FAULT_WEDGE_WORKER=0:1000:600000\n",
    )
    .unwrap();
    c.ok(&["systemctl", "daemon-reload"]);
    c.ok(&["systemctl", "restart", SERVICE]);
    let wedged = c.prop(SERVICE, "MainPID");
    assert_ne!(wedged, third);
    wait_for(
        &c,
        "the watchdog to restart the wedged service",
        Duration::from_secs(30),
        || {
            let pid = c.prop(SERVICE, "MainPID");
            pid != wedged && pid != "0"
        },
    );
    let pid1 = c.ok(&[
        "journalctl",
        "--no-pager",
        "_PID=1",
        &format!("UNIT={SERVICE}"),
    ]);
    assert!(pid1.contains("Watchdog timeout"), "{pid1}");
    std::fs::remove_file(service_d.join("watchdog.conf")).unwrap();
    c.ok(&["systemctl", "daemon-reload"]);
    c.ok(&["systemctl", "restart", SERVICE]);
    assert_eq!(c.prop(SERVICE, "ActiveState"), "active");

    // Stop drains: a request in flight (the upstream takes 2 s) is
    // answered; the process exits 0.
    let slow = thread::spawn(move || get(port, "/slow"));
    thread::sleep(Duration::from_millis(500));
    c.ok(&["systemctl", "stop", SERVICE]);
    let (status, body) = slow.join().unwrap().unwrap();
    assert_eq!(status, 200, "the request in flight at stop: {body}");
    assert_eq!(c.prop(SERVICE, "ActiveState"), "inactive");
    assert_eq!(c.prop(SERVICE, "ExecMainStatus"), "0", "{}", c.journal());
    drop(c);
}
