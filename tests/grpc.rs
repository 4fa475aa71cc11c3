//! gRPC end to end with real gRPC peers (Python grpcio, generic handlers):
//! a gRPC client → sidecar A (h2c in) → mTLS h2 → sidecar B → gRPC server,
//! both sidecars real in-process proxies on real sockets. Every RPC shape,
//! a 4 MiB message, deadlines, cancellation, error statuses, and the
//! proxy's own errors answered in gRPC. `.ci/run` installs grpcio; outside
//! CI a missing grpcio skips the test (it says so), under CI it fails.

mod support;

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
};

use pilotfish::Proxy;
use support::pki::{self, leaf, new_ca, tls_table, FRONTEND, ORDERS};

const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/grpc_peer.py");

/// The gRPC server, killed on drop.
struct Server(Child, u16);

impl Server {
    fn start() -> Self {
        let mut child = Command::new("python3")
            .args([PEER, "server"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the gRPC server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().parse().expect("the server prints its port");
        Server(child, port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sidecar_b(driver: &str, dir: &Path, app: u16) -> Proxy {
    let toml = format!(
        r#"workers = 1
[runtime]
driver = "{driver}"
{tls}
[[listeners]]
name = "inbound"
bind = "127.0.0.1:0"
protocol = "http"
cluster = "app"
tls = {{ require_client_cert = true }}
authorize = ["{FRONTEND}"]
[[clusters]]
name = "app"
protocol = "h2"
endpoints = ["127.0.0.1:{app}"]
"#,
        tls = tls_table(dir)
    );
    Proxy::start(pilotfish::Config::parse("b.toml", &toml).unwrap()).unwrap()
}

fn sidecar_a(driver: &str, dir: &Path, b: &Proxy) -> Proxy {
    let toml = format!(
        r#"workers = 1
[runtime]
driver = "{driver}"
{tls}
[[listeners]]
name = "out"
bind = "127.0.0.1:0"
protocol = "http"
cluster = "orders"
[[listeners.routes]]
name = "down"
path_prefix = "/t.Down/"
cluster = "down"
[[listeners.routes]]
name = "capped"
path = "/t.T/Deadline"
cluster = "orders"
timeout = "2s"
[[clusters]]
name = "orders"
endpoints = ["{b}"]
tls = {{ server_identity = "{ORDERS}" }}
[[clusters]]
name = "down"
protocol = "h2"
endpoints = ["{closed}"]
"#,
        tls = tls_table(dir),
        b = b.listener_addr("inbound").unwrap(),
        closed = support::closed_port(),
    );
    Proxy::start(pilotfish::Config::parse("a.toml", &toml).unwrap()).unwrap()
}

#[test]
fn grpc_through_an_mtls_sidecar_pair() {
    if !support::have_py("grpc") {
        return;
    }
    for driver in support::drivers() {
        let ca = new_ca("mesh CA");
        let dir = pki::temp_dir("grpc");
        leaf(&ca, ORDERS, |_| {}).write(&dir.join("orders"), &ca.pem);
        leaf(&ca, FRONTEND, |_| {}).write(&dir.join("frontend"), &ca.pem);
        let server = Server::start();
        let b = sidecar_b(driver, &dir.join("orders"), server.1);
        let a = sidecar_a(driver, &dir.join("frontend"), &b);
        let out = Command::new("timeout")
            .args(["120", "python3", PEER, "client"])
            .arg(a.listener_addr("out").unwrap().to_string())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{driver}: client failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(r["unary"], "ping", "{driver}: {r}");
        assert_eq!(
            r["server_stream"],
            serde_json::json!(["item-0", "item-1", "item-2", "item-3", "item-4"]),
            "{driver}"
        );
        assert_eq!(r["client_stream"], "10:55", "{driver}");
        assert_eq!(
            r["bidi"],
            serde_json::json!(["echo:a", "echo:b", "echo:c"]),
            "{driver}"
        );
        assert_eq!(
            r["big_ok"], true,
            "{driver}: 4 MiB echo, got {}",
            r["big_len"]
        );
        assert_eq!(r["deadline"][0], "DEADLINE_EXCEEDED", "{driver}: {r}");
        // The caller's 5 s deadline reached the server capped by the
        // route's 2 s timeout (gRPC rounds up by a few ms).
        let left = r["remaining"].as_f64().unwrap();
        assert!(
            left > 1.0 && left <= 2.1,
            "{driver}: server saw {left} s left"
        );
        assert_eq!(
            r["fail"],
            serde_json::json!(["NOT_FOUND", "nope"]),
            "{driver}"
        );
        assert_eq!(r["cancel_got"], 2, "{driver}");
        assert_eq!(
            r["server_saw_cancel"], "yes",
            "{driver}: the client's cancel reached the server through both sidecars"
        );
        // The proxy's own error, in gRPC: no endpoint answers.
        assert_eq!(r["no_upstream"][0], "UNAVAILABLE", "{driver}: {r}");
        assert!(
            r["no_upstream"][1].as_str().unwrap().contains("connect"),
            "{driver}: {r}"
        );
        assert_eq!(r["identity_header"], FRONTEND, "{driver}");
        assert_eq!(r["concurrent_ok"], 200, "{driver}");
        // h2 all the way: the client's and the sidecar pair's connections.
        let (sa, sb) = (a.stats().total.http, b.stats().total.http);
        assert!(sa.h2_connections >= 1, "{driver}: {sa:?}");
        assert!(sb.h2_connections >= 1, "{driver}: {sb:?}");
        assert!(sb.h2_streams >= 200, "{driver}: {sb:?}");
        // gRPC statuses counted where they reached the client: OK, the
        // server's NOT_FOUND (5), the proxy's own UNAVAILABLE (14).
        assert!(
            sa.grpc_responses[0] >= 200,
            "{driver}: {:?}",
            sa.grpc_responses
        );
        assert!(
            sa.grpc_responses[5] >= 1,
            "{driver}: {:?}",
            sa.grpc_responses
        );
        assert!(
            sa.grpc_responses[14] >= 1,
            "{driver}: {:?}",
            sa.grpc_responses
        );
        a.shutdown();
        b.shutdown();
    }
}
