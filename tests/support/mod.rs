//! Test builders: real sockets on 127.0.0.1 with ports from the OS, the
//! proxy in-process or as the real binary. Every wait has a deadline, so a
//! broken proxy fails a test instead of hanging it.
#![allow(dead_code)]
// each test file uses a different subset
// Test threads are not workers: polling with a short sleep is fine here.
#![allow(clippy::disallowed_methods)]

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    thread,
    time::{Duration, Instant},
};

use pilotfish::{Config, Proxy};

pub mod http_client;
pub mod http_upstream;
pub mod pki;

/// Upper bound on any single blocking socket operation in tests.
pub const IO_DEADLINE: Duration = Duration::from_secs(20);

/// The drivers to run each test under: epoll always, io_uring where the
/// kernel allows it.
pub fn drivers() -> Vec<&'static str> {
    let mut d = vec!["epoll"];
    if monoio::utils::detect_uring() {
        d.push("io_uring");
    }
    d
}

/// An upstream that echoes every byte back and half-closes when the client does.
pub fn echo_server() -> SocketAddr {
    serve(|mut s| {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = s.shutdown(Shutdown::Write);
    })
}

/// Runs `handler` on its own thread for each accepted connection.
pub fn serve(handler: impl Fn(TcpStream) + Send + Sync + Clone + 'static) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            stream.set_read_timeout(Some(IO_DEADLINE)).unwrap();
            stream.set_write_timeout(Some(IO_DEADLINE)).unwrap();
            let h = handler.clone();
            thread::spawn(move || h(stream));
        }
    });
    addr
}

/// Reads up to and including the first blank line (a head, or a chunked
/// body with its trailer section) from a raw socket, a byte at a time so
/// nothing after it is taken; less if the peer closes first.
pub fn read_head_raw(s: &mut TcpStream) -> String {
    use std::io::Read;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(0) => break,
            Ok(_) => head.push(b[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// An address whose accept queue is full and never drained: connects to
/// it hang (the kernel drops further SYNs) until the caller's timeout.
/// Keep what it returns alive for as long as the address must stay so.
pub struct Blackhole {
    pub addr: SocketAddr,
    _listener: socket2::Socket,
    _fill: Vec<TcpStream>,
}

pub fn blackhole() -> Blackhole {
    let listener =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    listener.bind(&any.into()).unwrap();
    // Backlog 0 holds one connection; a few more make sure it is full.
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    let _fill = (0..4)
        .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok())
        .collect();
    Blackhole {
        addr,
        _listener: listener,
        _fill,
    }
}

/// A port on which nothing listens (bound once by the OS, then released).
pub fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Builds a one-listener TCP config as TOML text.
pub struct L4Config {
    pub workers: usize,
    pub driver: &'static str,
    pub endpoints: Vec<SocketAddr>,
    pub copy: &'static str,
    pub idle_timeout: &'static str,
    pub connect_timeout: &'static str,
    pub connect_attempts: u32,
    pub drain_timeout: &'static str,
    pub bind: String,
}

impl L4Config {
    pub fn new(driver: &'static str, endpoints: Vec<SocketAddr>) -> Self {
        Self {
            workers: 1,
            driver,
            endpoints,
            copy: "auto",
            idle_timeout: "5m",
            connect_timeout: "1s",
            connect_attempts: 3,
            drain_timeout: "30s",
            bind: "127.0.0.1:0".into(),
        }
    }

    pub fn toml(&self) -> String {
        let endpoints = self
            .endpoints
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            r#"workers = {workers}
drain_timeout = "{drain}"
[runtime]
driver = "{driver}"
[[listeners]]
name = "app-out"
bind = "{bind}"
protocol = "tcp"
cluster = "backend"
idle_timeout = "{idle}"
copy = "{copy}"
[[clusters]]
name = "backend"
endpoints = [{endpoints}]
connect_timeout = "{connect}"
connect_attempts = {attempts}
"#,
            workers = self.workers,
            drain = self.drain_timeout,
            driver = self.driver,
            bind = self.bind,
            idle = self.idle_timeout,
            copy = self.copy,
            connect = self.connect_timeout,
            attempts = self.connect_attempts,
        )
    }

    /// Starts the proxy in this process; returns it and its listener address.
    pub fn start(&self) -> (Proxy, SocketAddr) {
        let config = Config::parse("test.toml", &self.toml()).expect("test config is valid");
        let proxy = Proxy::start(config).expect("proxy starts");
        let addr = proxy.listener_addr("app-out").unwrap();
        (proxy, addr)
    }
}

/// Connects with deadlines set on every read and write.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, IO_DEADLINE).expect("connect to proxy");
    s.set_read_timeout(Some(IO_DEADLINE)).unwrap();
    s.set_write_timeout(Some(IO_DEADLINE)).unwrap();
    s
}

/// Deterministic pseudo-random bytes (xorshift), so failures replay.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// FNV-1a, enough to tell a reordered or corrupted stream from the original.
pub fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    })
}

/// Sends `data` and reads the echo back concurrently; returns what came back.
pub fn echo_round_trip(addr: SocketAddr, data: &[u8]) -> Vec<u8> {
    let mut s = connect(addr);
    let mut writer = s.try_clone().unwrap();
    let out = data.to_vec();
    let w = thread::spawn(move || {
        writer.write_all(&out).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut back = Vec::with_capacity(data.len());
    s.read_to_end(&mut back).expect("read echo");
    w.join().unwrap();
    back
}

/// Polls `check` until it is true or the deadline passes.
pub fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + IO_DEADLINE;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

/// A fresh directory for one test's files.
pub fn temp_dir(tag: &str) -> PathBuf {
    let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("pilotfish-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The real `pilotfish` binary, run as a child with a notify socket that the
/// test reads, as systemd would.
pub struct ChildProxy {
    pub child: Child,
    pub notify: UnixDatagram,
    pub dir: PathBuf,
    pub listener: Option<SocketAddr>,
}

impl ChildProxy {
    pub fn spawn(config_toml: &str) -> Self {
        Self::spawn_with_env(config_toml, &[])
    }

    /// [`ChildProxy::spawn`] with extra environment variables.
    pub fn spawn_with_env(config_toml: &str, env: &[(&str, &str)]) -> Self {
        let dir = temp_dir("child");
        let config = dir.join("pilotfish.toml");
        std::fs::write(&config, config_toml).unwrap();
        let notify_path = dir.join("notify.sock");
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        notify.set_read_timeout(Some(IO_DEADLINE)).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_pilotfish"))
            .args(["run", "--config"])
            .arg(&config)
            .env("NOTIFY_SOCKET", &notify_path)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn pilotfish");
        Self {
            child,
            notify,
            dir,
            listener: None,
        }
    }

    /// The next notify datagram.
    pub fn next_notify(&self) -> String {
        self.recv_notify().expect("notify message before deadline")
    }

    /// The next state datagram within the socket's read timeout; a signal
    /// that interrupts the wait (EINTR, seen in CI) is not a timeout.
    /// File-descriptor store messages (`FDSTORE=1`, with the listening
    /// sockets) are skipped (and the descriptors closed): tests/upgrade.rs
    /// reads those itself.
    pub fn recv_notify(&self) -> std::io::Result<String> {
        let mut buf = [0u8; 4096];
        loop {
            match self.notify.recv(&mut buf) {
                Ok(n) if buf[..n].starts_with(b"FDSTORE=1") => continue,
                Ok(n) => return Ok(String::from_utf8_lossy(&buf[..n]).into_owned()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits for READY=1 and reads the listener address from its STATUS line.
    pub fn wait_ready(&mut self) -> SocketAddr {
        loop {
            let msg = self.next_notify();
            if msg.lines().any(|l| l == "READY=1") {
                let addr = msg
                    .split("app-out=")
                    .nth(1)
                    .and_then(|rest| rest.split_whitespace().next())
                    .and_then(|a| a.parse().ok())
                    .expect("STATUS names the app-out address");
                self.listener = Some(addr);
                return addr;
            }
        }
    }

    pub fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.child.id()).unwrap();
        // std has no kill(2); the `kill` command is everywhere tests run.
        let ok = Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal} {pid}");
    }

    /// Waits for the child to exit, up to `limit`; None if it did not.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ChildProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `pilotfish check --config FILE`; returns (success, stdout, stderr).
pub fn check_config(path: &Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pilotfish"))
        .args(["check", "--config"])
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Starts an in-process proxy from TOML text; returns it and the address
/// of its listener called `listener`.
pub fn start_toml(toml: &str, listener: &str) -> (Proxy, SocketAddr) {
    let config = Config::parse("test.toml", toml).expect("test config is valid");
    let proxy = Proxy::start(config).expect("proxy starts");
    let addr = proxy.listener_addr(listener).unwrap();
    (proxy, addr)
}

/// An in-process proxy on `driver` whose HTTP listener `web` sends
/// everything to one cluster `app` of one endpoint.
pub fn start_to(driver: &str, endpoint: SocketAddr) -> (Proxy, SocketAddr) {
    let clusters = cluster("app", &[endpoint], "");
    start_toml(&http_config(driver, "cluster = \"app\"", &clusters), "web")
}

/// A one-listener HTTP config: `extra_listener` goes into the listener
/// table (routes, limits), `clusters` is the cluster tables.
pub fn http_config(driver: &str, listener_extra: &str, clusters: &str) -> String {
    format!(
        "workers = 1\n[runtime]\ndriver = \"{driver}\"\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\n{listener_extra}\n{clusters}"
    )
}

/// A `[[clusters]]` table.
pub fn cluster(name: &str, endpoints: &[SocketAddr], extra: &str) -> String {
    let list: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        "[[clusters]]\nname = \"{name}\"\nendpoints = [{}]\n{extra}\n",
        list.join(", ")
    )
}

/// Whether `tool` is installed. Outside CI a missing tool skips the test
/// that asked (it says so); under CI (CI=true) it fails it.
pub fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{tool} must be installed in CI"
        );
        eprintln!("{tool} not installed: skipping (install it to run this test)");
    }
    found
}

/// Whether python3 can import `module` (the Python peers: grpcio, h2).
/// Outside CI a missing one skips the test that asked; under CI it fails.
pub fn have_py(module: &str) -> bool {
    have_py_in(module, None)
}

/// [`have_py`] with `PYTHONPATH` set to `path` (peers installed with
/// `pip install --target`).
pub fn have_py_in(module: &str, path: Option<&str>) -> bool {
    let found = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .envs(path.map(|p| ("PYTHONPATH", p)))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "python3 module {module} must be installed in CI"
        );
        eprintln!("python3 {module} not installed: skipping (pip install it to run this test)");
    }
    found
}

/// An admin server for an in-process proxy: the Unix socket at `socket`
/// and, when given, a TCP listener.
pub fn admin_server(
    proxy: &pilotfish::Proxy,
    socket: Option<PathBuf>,
    tcp: Option<SocketAddr>,
) -> pilotfish::admin::Server {
    let state = pilotfish::admin::State {
        control: proxy.controller(),
        draining: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
        set_log_filter: None,
    };
    let listen = pilotfish::admin::Listen {
        socket,
        tcp,
        tcp_token: None,
    };
    pilotfish::admin::Server::start(&listen, state).unwrap()
}
