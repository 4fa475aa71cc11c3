//! Endpoints named by host name, resolved through a real name server the
//! test starts (dnsmasq from Debian's packages, answering from a hosts
//! file the test rewrites): a change of address moves traffic with no
//! failed request, and a name server that goes away leaves the last good
//! answer serving. `.ci/run` installs dnsmasq; outside CI a missing one
//! skips (it says so).

// Test threads are not workers: polling with a short sleep, and a lock
// for what the load thread saw, are fine here.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

mod support;

use std::{
    io::Write,
    net::{SocketAddr, TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use pilotfish::Proxy;
use support::http_client;

/// dnsmasq serving `hosts` on 127.0.0.1:port; killed on drop.
struct NameServer {
    child: Child,
    port: u16,
    hosts: PathBuf,
}

impl NameServer {
    fn start(dir: &Path) -> Option<Self> {
        if !support::have("dnsmasq") {
            return None;
        }
        let hosts = dir.join("hosts");
        std::fs::write(&hosts, "127.0.0.1 orders.test\n").unwrap();
        // A port free for UDP may be taken for TCP (dnsmasq wants both):
        // a few tries, each told apart by whether dnsmasq stays up.
        let mut why = String::new();
        for _ in 0..5 {
            match Self::try_start(dir, &hosts) {
                Ok(server) => return Some(server),
                Err(e) => why = e,
            }
        }
        panic!("dnsmasq did not start: {why}");
    }

    fn try_start(dir: &Path, hosts: &Path) -> Result<Self, String> {
        let port = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = dir.join(format!("dnsmasq-{port}.log"));
        let mut child = Command::new("dnsmasq")
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--user=root",
                "--pid-file=",
                "--cache-size=0",
                &format!("--port={port}"),
                &format!("--addn-hosts={}", hosts.display()),
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start dnsmasq");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let said = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!("port {port}: exited {status}: {said}"));
            }
            let answered = pilotfish::dns::stub::ask(
                addr,
                "orders.test",
                pilotfish::dns::stub::TYPE_A,
                1,
                Duration::from_millis(200),
            );
            if answered.is_ok() {
                return Ok(NameServer {
                    child,
                    port,
                    hosts: hosts.to_path_buf(),
                });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let said = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!("port {port}: no answer ({answered:?}): {said}"));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Points `orders.test` at `ip` (dnsmasq re-reads its hosts files on
    /// SIGHUP).
    fn point_at(&self, ip: &str) {
        std::fs::write(&self.hosts, format!("{ip} orders.test\n")).unwrap();
        let status = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for NameServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP/1.1 upstream on `ip:port` that answers every request with its
/// own address, keep-alive.
fn tagged_upstream(ip: &str, port: u16) -> Option<SocketAddr> {
    let listener = TcpListener::bind((ip, port)).ok()?;
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            thread::spawn(move || loop {
                let head = support::read_head_raw(&mut conn);
                if head.is_empty() {
                    return;
                }
                let body = addr.ip().to_string();
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                if conn.write_all(reply.as_bytes()).is_err() {
                    return;
                }
            });
        }
    });
    Some(addr)
}

#[test]
fn a_name_that_moves_moves_traffic_and_a_lost_name_server_keeps_the_last_answer() {
    let dir = support::temp_dir("dns");
    let Some(ns) = NameServer::start(&dir) else {
        return;
    };
    // The same port on two loopback addresses: the name decides which.
    let one = tagged_upstream("127.0.0.1", 0).unwrap();
    let Some(two) = tagged_upstream("127.0.0.2", one.port()) else {
        panic!("127.0.0.2:{} is taken; rerun", one.port());
    };
    let text = format!(
        r#"workers = 1
[dns]
resolvers = ["127.0.0.1:{ns}"]
refresh = "200ms"
[[listeners]]
name = "out"
bind = "127.0.0.1:0"
protocol = "http"
cluster = "orders"
[[clusters]]
name = "orders"
endpoints = ["orders.test:{port}"]
"#,
        ns = ns.port,
        port = one.port()
    );
    let mut config = pilotfish::Config::parse("dns.toml", &text).unwrap();
    assert_eq!(
        config.clusters[0].hostnames,
        [("orders.test".into(), one.port())]
    );
    // As `pilotfish run` does: a first answer before serving.
    let resolved = pilotfish::dns::round(&config, &Default::default()).0;
    pilotfish::dns::fill(&mut config, &resolved);
    assert_eq!(config.clusters[0].endpoints, [one]);
    let proxy = Proxy::start(config).unwrap();
    let controller = proxy.controller();
    controller.set_base(Path::new("dns.toml"), &text);
    controller.set_resolved(resolved);
    let _resolver = pilotfish::dns::spawn(controller.clone()).unwrap();
    let addr = proxy.listener_addr("out").unwrap();

    // Keep-alive load that reconnects when told to close; every answer's
    // body is the upstream that served it.
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let load = {
        let (stop, failed, seen) = (stop.clone(), failed.clone(), seen.clone());
        thread::spawn(move || {
            let mut conn = http_client::Conn::open(addr);
            while !stop.load(Ordering::SeqCst) {
                conn.send(b"GET /who HTTP/1.1\r\nHost: orders.test\r\n\r\n");
                match conn.read(false) {
                    Some(r) if r.status == 200 => {
                        seen.lock().unwrap().push(r.text());
                        if r.header("connection") == Some("close") {
                            conn = http_client::Conn::open(addr);
                        }
                    }
                    other => {
                        eprintln!("failed: {:?}", other.map(|r| (r.status, r.text())));
                        failed.fetch_add(1, Ordering::SeqCst);
                        conn = http_client::Conn::open(addr);
                    }
                }
                thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let last = |seen: &Mutex<Vec<String>>| seen.lock().unwrap().last().cloned();
    support::eventually("traffic to 127.0.0.1", || {
        last(&seen).as_deref() == Some("127.0.0.1")
    });
    ns.point_at("127.0.0.2");
    support::eventually("traffic to follow the name to 127.0.0.2", || {
        last(&seen).as_deref() == Some("127.0.0.2")
    });
    let moved_at = seen.lock().unwrap().len();

    // The name server goes away: the last answer stays, traffic goes on.
    let counters = controller.dns_counters();
    let failures_before = counters.failed.load(Ordering::Relaxed);
    drop(ns);
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        thread::sleep(Duration::from_millis(50));
    }
    assert!(
        counters.failed.load(Ordering::Relaxed) > failures_before,
        "resolution failed meanwhile"
    );
    stop.store(true, Ordering::SeqCst);
    load.join().unwrap();
    let seen = seen.lock().unwrap();
    assert!(
        seen[moved_at..].iter().all(|s| s == "127.0.0.2"),
        "after the move, only the new address (also with the name server gone)"
    );
    assert!(
        seen.len() > moved_at + 50,
        "the load ran on ({} answers)",
        seen.len()
    );
    assert_eq!(failed.load(Ordering::SeqCst), 0, "no request failed");
    assert_eq!(controller.config().clusters[0].endpoints, [two]);
    assert!(
        proxy.stats().total.connections_carried > 0,
        "the client's connection was kept"
    );
}
