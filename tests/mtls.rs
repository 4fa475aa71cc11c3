//! Mutual TLS between two real sidecars (in-process proxies on real
//! sockets): HTTP and L4 end to end with the caller's identity at the
//! upstream, authorization by exact ID and prefix, the negative matrix over
//! sockets with its counters, rotation under load, and resumption that does
//! not survive a trust-bundle change.
#![allow(clippy::disallowed_methods)] // test threads may sleep

mod support;

use std::{
    io::{Read, Write},
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use pilotfish::{tls::counters::Side, Proxy};
use support::{
    http_client::{self, Conn},
    http_upstream::HttpUpstream,
    pki::{self, leaf, new_ca, tls_table, Leaf, TestCa, FRONTEND, ORDERS},
};

const OPS: &str = "spiffe://mesh.local/ns/prod/sa/ops";
const DEV: &str = "spiffe://mesh.local/ns/dev/sa/frontend";

/// The inbound sidecar (B, workload `orders`): an HTTP listener and an L4
/// listener terminating mTLS in front of the local app.
fn inbound(
    driver: &str,
    dir: &Path,
    app: std::net::SocketAddr,
    echo: std::net::SocketAddr,
) -> Proxy {
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
authorize = ["{FRONTEND}", "spiffe://mesh.local/ns/prod/*"]
[[listeners.routes]]
name = "admin"
path_prefix = "/admin"
cluster = "app"
authorize = ["{OPS}"]
[[listeners.routes]]
name = "metered"
path_prefix = "/metered"
cluster = "app"
rate_limit = {{ requests_per_second = 1, burst = 2, per_identity = true }}
[[listeners]]
name = "inbound-tcp"
bind = "127.0.0.1:0"
protocol = "tcp"
cluster = "echo"
tls = {{}}
authorize = ["spiffe://mesh.local/ns/prod/*"]
[[clusters]]
name = "app"
endpoints = ["{app}"]
[[clusters]]
name = "echo"
endpoints = ["{echo}"]
"#,
        tls = tls_table(dir)
    );
    Proxy::start(pilotfish::Config::parse("b.toml", &toml).unwrap()).unwrap()
}

/// The outbound sidecar (A, workload given by `dir`): plaintext from the
/// local app, mTLS to B, expecting B to be `orders`.
fn outbound(driver: &str, dir: &Path, b: &Proxy) -> Proxy {
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
[[listeners]]
name = "out-tcp"
bind = "127.0.0.1:0"
protocol = "tcp"
cluster = "orders-tcp"
[[clusters]]
name = "orders"
endpoints = ["{http}"]
tls = {{ server_identity = "{ORDERS}" }}
[[clusters]]
name = "orders-tcp"
endpoints = ["{tcp}"]
connect_attempts = 1
tls = {{ server_identity = "{ORDERS}" }}
"#,
        tls = tls_table(dir),
        http = b.listener_addr("inbound").unwrap(),
        tcp = b.listener_addr("inbound-tcp").unwrap(),
    );
    Proxy::start(pilotfish::Config::parse("a.toml", &toml).unwrap()).unwrap()
}

struct Mesh {
    ca: TestCa,
    dir: std::path::PathBuf,
    upstream: HttpUpstream,
    b: Proxy,
}

fn mesh(driver: &str, tag: &str) -> Mesh {
    let ca = new_ca("mesh CA");
    let dir = pki::temp_dir(tag);
    leaf(&ca, ORDERS, |_| {}).write(&dir.join("orders"), &ca.pem);
    let upstream = HttpUpstream::start();
    let b = inbound(
        driver,
        &dir.join("orders"),
        upstream.addr,
        support::echo_server(),
    );
    Mesh {
        ca,
        dir,
        upstream,
        b,
    }
}

impl Mesh {
    /// An outbound sidecar for workload `id`.
    fn sidecar(&self, driver: &str, id: &str, name: &str) -> Proxy {
        let d = self.dir.join(name);
        leaf(&self.ca, id, |_| {}).write(&d, &self.ca.pem);
        outbound(driver, &d, &self.b)
    }
}

fn tls_stats(p: &Proxy) -> pilotfish::tls::counters::TlsSnapshot {
    p.stats().total.tls
}

#[test]
fn http_and_l4_through_a_sidecar_pair_carry_the_callers_identity() {
    for driver in support::drivers() {
        let m = mesh(driver, "mtls-e2e");
        let a = m.sidecar(driver, FRONTEND, "frontend");
        let out = a.listener_addr("out").unwrap();
        // A forged identity header from the app is dropped; the verified
        // one arrives, once.
        let mut conn = Conn::open(out);
        for i in 0..5 {
            conn.send(
                format!(
                    "GET /echo/{i} HTTP/1.1\r\nHost: orders\r\nx-pilotfish-peer-identity: spiffe://mesh.local/ns/prod/sa/ops\r\n\r\n"
                )
                .as_bytes(),
            );
            let r = conn.read(false).expect("response");
            assert_eq!(r.status, 200, "{driver}: {}", r.text());
            let seen = r.text().to_ascii_lowercase();
            let ids: Vec<&str> = seen
                .lines()
                .filter(|l| l.starts_with("x-pilotfish-peer-identity:"))
                .collect();
            assert_eq!(
                ids,
                [format!("x-pilotfish-peer-identity: {FRONTEND}").as_str()],
                "{driver}: {seen}"
            );
            assert!(seen.contains("x-forwarded-proto: https"), "{seen}");
        }
        // A body over the same pooled mTLS connection: sent while the
        // response is watched for (the TLS stream split in two halves).
        let body = support::pattern(9, 300_000);
        conn.send(
            format!(
                "POST /echo HTTP/1.1\r\nHost: orders\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        conn.send(&body);
        let r = conn.read(false).expect("response");
        assert_eq!(r.status, 200, "{driver}");
        assert!(
            r.body.ends_with(&body),
            "{driver}: the body came back intact"
        );
        // L4: a megabyte each way through both sidecars, intact.
        let data = support::pattern(7, 1 << 20);
        let back = support::echo_round_trip(a.listener_addr("out-tcp").unwrap(), &data);
        assert_eq!(
            support::checksum(&back),
            support::checksum(&data),
            "{driver}"
        );

        let (ta, tb) = (tls_stats(&a), tls_stats(&m.b));
        println!("{driver}: A {ta:?}\n{driver}: B {tb:?}");
        // Six keep-alive requests (one with a body) reuse one pooled mTLS
        // connection; the L4 pair adds one more.
        assert_eq!(
            ta.handshakes_outbound + ta.handshakes_outbound_resumed,
            2,
            "{driver}"
        );
        assert_eq!(
            tb.handshakes_inbound + tb.handshakes_inbound_resumed,
            2,
            "{driver}"
        );
        assert_eq!(
            tb.decisions(FRONTEND, true),
            7,
            "{driver}: 6 requests + 1 connection"
        );
        assert_eq!(m.upstream.requests(), 6);
        // HTTP/1.1 in at A, HTTP/2 between the sidecars (ALPN on the
        // mTLS cluster), HTTP/1.1 out at B.
        let between = m.b.stats().total.http;
        assert!(between.h2_connections >= 1, "{driver}: {between:?}");
        assert!(between.h2_streams >= 5, "{driver}: {between:?}");
        a.shutdown();
        m.b.shutdown();
    }
}

#[test]
fn authorization_allows_and_denies_by_exact_id_and_prefix() {
    let driver = "epoll";
    let m = mesh(driver, "mtls-authz");
    let frontend = m.sidecar(driver, FRONTEND, "frontend");
    let ops = m.sidecar(driver, OPS, "ops");
    let dev = m.sidecar(driver, DEV, "dev");
    let get = |p: &Proxy, path: &str| http_client::get(p.listener_addr("out").unwrap(), path);

    // Listener: frontend exactly, or anything under ns/prod.
    assert_eq!(get(&frontend, "/echo").status, 200);
    assert_eq!(get(&ops, "/echo").status, 200, "prefix ns/prod/*");
    let r = get(&dev, "/echo");
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.header("x-pilotfish-error"), Some("forbidden"));
    assert!(
        r.text().contains(DEV),
        "the reason names the caller: {}",
        r.text()
    );
    // Route: /admin only for ops.
    let r = get(&frontend, "/admin/x");
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("route \"admin\""), "{}", r.text());
    assert_eq!(get(&ops, "/admin/x").status, 200);

    // L4: dev's connection is closed before any byte reaches the app.
    let mut s = support::connect(dev.listener_addr("out-tcp").unwrap());
    let _ = s.write_all(b"hello");
    let mut buf = [0u8; 8];
    assert!(
        matches!(s.read(&mut buf), Ok(0) | Err(_)),
        "denied L4 connection closes"
    );
    let back = support::echo_round_trip(ops.listener_addr("out-tcp").unwrap(), b"hello");
    assert_eq!(back, b"hello");

    let t = tls_stats(&m.b);
    println!("{:?}", t.authorization);
    assert_eq!(
        t.decisions(DEV, false),
        2,
        "one HTTP request, one L4 connection"
    );
    assert_eq!(t.decisions(FRONTEND, false), 1, "the /admin request");
    assert_eq!(t.decisions(OPS, true), 3);
    assert_eq!(t.decisions(FRONTEND, true), 1);
    assert_eq!(
        m.upstream.requests(),
        3,
        "denied requests never reach the app"
    );
    for p in [frontend, ops, dev, m.b] {
        p.shutdown();
    }
}

/// Each bad client certificate, presented to the inbound listener over a
/// real socket, fails the handshake and is counted under its reason.
#[test]
fn the_inbound_listener_rejects_bad_client_certificates_and_counts_why() {
    use rcgen::{
        BasicConstraints, ExtendedKeyUsagePurpose as Eku, IsCa, KeyUsagePurpose as Ku, SanType,
    };
    let m = mesh("epoll", "mtls-matrix");
    let addr = m.b.listener_addr("inbound").unwrap();
    let foreign = new_ca("another CA");
    let now = time::OffsetDateTime::now_utc();
    let cases: Vec<(&str, Option<Leaf>, &str)> = vec![
        (
            "no URI SAN",
            Some(leaf(&m.ca, FRONTEND, |p| {
                p.subject_alt_names =
                    vec![SanType::DnsName("frontend.mesh.local".try_into().unwrap())];
            })),
            "no_uri_san",
        ),
        (
            "two URI SANs",
            Some(leaf(&m.ca, FRONTEND, |p| {
                p.subject_alt_names
                    .push(SanType::URI("spiffe://mesh.local/x".try_into().unwrap()));
            })),
            "several_uri_sans",
        ),
        (
            "URI given as DNS SAN",
            Some(leaf(&m.ca, FRONTEND, |p| {
                p.subject_alt_names = vec![SanType::DnsName(FRONTEND.try_into().unwrap())];
            })),
            "no_uri_san",
        ),
        (
            "CA:true leaf",
            Some(leaf(&m.ca, FRONTEND, |p| {
                p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            })),
            "ca_leaf",
        ),
        (
            "keyCertSign",
            Some(leaf(&m.ca, FRONTEND, |p| {
                p.key_usages = vec![Ku::DigitalSignature, Ku::KeyCertSign];
            })),
            "signing_leaf",
        ),
        (
            "no clientAuth EKU",
            Some(leaf(&m.ca, FRONTEND, |p| {
                p.extended_key_usages = vec![Eku::ServerAuth];
            })),
            "wrong_extended_key_usage",
        ),
        (
            "expired",
            Some(leaf(&m.ca, FRONTEND, |p| {
                p.not_before = now - time::Duration::days(2);
                p.not_after = now - time::Duration::days(1);
            })),
            "expired",
        ),
        (
            "not yet valid",
            Some(leaf(&m.ca, FRONTEND, |p| {
                p.not_before = now + time::Duration::days(1);
                p.not_after = now + time::Duration::days(2);
            })),
            "not_yet_valid",
        ),
        (
            "foreign root",
            Some(leaf(&foreign, FRONTEND, |_| {})),
            "unknown_issuer",
        ),
        (
            "same CA, another trust domain",
            Some(leaf(
                &m.ca,
                "spiffe://other.domain/ns/prod/sa/frontend",
                |_| {},
            )),
            "untrusted_trust_domain",
        ),
        ("no client certificate", None, "no_client_certificate"),
    ];
    for (name, bad, reason) in &cases {
        let before = tls_stats(&m.b).failures(Side::Inbound, reason);
        let config = pki::client_config(&m.ca.pem, bad.as_ref(), ORDERS);
        let outcome = pki::tls_connect(addr, config).and_then(|mut s| {
            // TLS 1.3: the client learns of the rejection on its next read.
            let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
            let mut buf = [0u8; 64];
            match s.read(&mut buf) {
                Ok(n) if n > 0 => Ok(()),
                Ok(_) => Err("closed".to_string()),
                Err(e) => Err(e.to_string()),
            }
        });
        assert!(outcome.is_err(), "{name}: accepted");
        support::eventually(&format!("{name} counted as {reason}"), || {
            tls_stats(&m.b).failures(Side::Inbound, reason) == before + 1
        });
        println!(
            "{name}: rejected ({}), counted as {reason}",
            outcome.err().unwrap()
        );
    }
    // Wrong identity, outbound: A expects `orders`, the endpoint is
    // `payments` (a valid SVID of the same mesh).
    let pay = pki::temp_dir("mtls-payments");
    leaf(&m.ca, "spiffe://mesh.local/ns/prod/sa/payments", |_| {}).write(&pay, &m.ca.pem);
    let imposter = inbound("epoll", &pay, m.upstream.addr, support::echo_server());
    let a_dir = m.dir.join("frontend");
    leaf(&m.ca, FRONTEND, |_| {}).write(&a_dir, &m.ca.pem);
    let a = outbound("epoll", &a_dir, &imposter);
    let r = http_client::get(a.listener_addr("out").unwrap(), "/echo");
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("wrong_identity"), "{}", r.text());
    assert!(tls_stats(&a).failures(Side::Outbound, "wrong_identity") >= 1);
    assert_eq!(m.upstream.requests(), 0);
    for p in [a, imposter, m.b] {
        p.shutdown();
    }
}

/// Rotation under continuous load: keep-alive and new-connection traffic
/// through the pair never fails, a connection opened before the rotation
/// keeps working, and new handshakes present the new certificate soon
/// after the files change (the time is printed; the watcher checks every
/// 500 ms).
#[test]
fn rotation_under_load_drops_nothing_and_new_handshakes_see_the_new_serial() {
    let driver = "epoll";
    let m = mesh(driver, "mtls-rotate");
    let a = m.sidecar(driver, FRONTEND, "frontend");
    let out = a.listener_addr("out").unwrap();
    let inbound = m.b.listener_addr("inbound").unwrap();
    let client_leaf = leaf(&m.ca, FRONTEND, |_| {});
    let client = pki::client_config(&m.ca.pem, Some(&client_leaf), ORDERS);

    // A long-lived mTLS connection straight to B, opened before rotation.
    let mut long = pki::tls_connect(inbound, Arc::clone(&client)).unwrap();
    let old_serial = pki::server_serial(&long);

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut load = Vec::new();
    for close in [false, true] {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        load.push(thread::spawn(move || {
            let mut conn = Conn::open(out);
            while !stop.load(Ordering::SeqCst) {
                let hdr = if close { "connection: close\r\n" } else { "" };
                conn.send(format!("GET /echo HTTP/1.1\r\nHost: o\r\n{hdr}\r\n").as_bytes());
                match conn.read(false) {
                    Some(r) if r.status == 200 => ok.fetch_add(1, Ordering::SeqCst),
                    other => {
                        eprintln!("failed: {other:?}");
                        failed.fetch_add(1, Ordering::SeqCst)
                    }
                };
                if close {
                    conn = Conn::open(out);
                }
            }
        }));
    }
    thread::sleep(Duration::from_millis(300));
    let new_leaf = leaf(&m.ca, ORDERS, |_| {});
    let new_serial = new_leaf.serial();
    assert_ne!(new_serial, old_serial);
    let rotated = Instant::now();
    new_leaf.write(&m.dir.join("orders"), &m.ca.pem);
    let mut seen_after = None;
    while rotated.elapsed() < Duration::from_secs(10) {
        let s = pki::tls_connect(inbound, Arc::clone(&client)).unwrap();
        if pki::server_serial(&s) == new_serial {
            seen_after = Some(rotated.elapsed());
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let seen_after = seen_after.expect("new handshakes present the new certificate");
    println!("new serial seen by a new connection {seen_after:?} after the files changed");
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.join().unwrap();
    }
    // The long-lived connection still works on its old session.
    long.write_all(b"GET /echo HTTP/1.1\r\nHost: o\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = long.read_to_end(&mut answer);
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(pki::server_serial(&long), old_serial);

    let (ok, failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    println!("during rotation: {ok} requests ok, {failed} failed");
    assert!(ok > 0);
    assert_eq!(failed, 0);
    let status = m.b.controller().tls_status().unwrap();
    assert_eq!(status.serial, new_serial);
    // One reload, or two if the watcher looked between the renames.
    assert!(status.reloads >= 1);
    a.shutdown();
    m.b.shutdown();
}

/// Resumption works within one set of material and does not survive a
/// trust-bundle change.
#[test]
fn no_session_is_resumed_across_a_trust_bundle_change() {
    let m = mesh("epoll", "mtls-resume");
    let addr = m.b.listener_addr("inbound").unwrap();
    let client_leaf = leaf(&m.ca, FRONTEND, |_| {});
    let client = pki::client_config(&m.ca.pem, Some(&client_leaf), ORDERS);
    let request = |client: &Arc<rustls::ClientConfig>| {
        let mut s = pki::tls_connect(addr, Arc::clone(client)).unwrap();
        s.write_all(b"GET /echo HTTP/1.1\r\nHost: o\r\nconnection: close\r\n\r\n")
            .unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        assert!(answer.starts_with(b"HTTP/1.1 200"));
        s.conn.handshake_kind()
    };
    assert_eq!(request(&client), Some(rustls::HandshakeKind::Full));
    assert_eq!(request(&client), Some(rustls::HandshakeKind::Resumed));
    // A second CA joins the bundle: the material changes, and the client's
    // session (with its ticket) is no longer resumed.
    let extra = new_ca("next mesh CA");
    let d = m.dir.join("orders");
    let bundle = format!("{}{}", m.ca.pem, extra.pem);
    let tmp = d.join(".ca.tmp");
    std::fs::write(&tmp, bundle).unwrap();
    std::fs::rename(&tmp, d.join("ca.pem")).unwrap();
    support::eventually("the bundle is reloaded", || {
        m.b.controller()
            .tls_status()
            .is_some_and(|s| s.trust_anchors == 2)
    });
    assert_eq!(request(&client), Some(rustls::HandshakeKind::Full));
    let t = tls_stats(&m.b);
    assert_eq!(t.handshakes_inbound_resumed, 1);
    assert_eq!(t.handshakes_inbound, 2);
    m.b.shutdown();
}

/// Re-applying the same config after the certificate files changed (what
/// SIGHUP and `POST /config` do) rotates the material without a new config
/// generation: an open keep-alive connection is not asked to close.
#[test]
fn reapplying_the_same_config_rotates_tls_without_closing_connections() {
    let m = mesh("epoll", "mtls-reapply");
    let a = m.sidecar("epoll", FRONTEND, "frontend");
    let mut conn = Conn::open(a.listener_addr("out").unwrap());
    conn.send(b"GET /echo HTTP/1.1\r\nHost: o\r\n\r\n");
    assert_eq!(conn.read(false).unwrap().status, 200);

    let new_leaf = leaf(&m.ca, ORDERS, |_| {});
    new_leaf.write(&m.dir.join("orders"), &m.ca.pem);
    let config = (*m.b.config()).clone();
    let changes = m.b.controller().apply(config).unwrap();
    assert_eq!(changes.generation, 0, "no new generation");
    assert_eq!(
        changes.tls_serial.as_deref(),
        Some(new_leaf.serial().as_str())
    );
    assert!(
        changes.summary().contains("TLS material reloaded"),
        "{}",
        changes.summary()
    );

    // The sidecars' connection and the client's are both untouched.
    conn.send(b"GET /echo HTTP/1.1\r\nHost: o\r\n\r\n");
    let r = conn.read(false).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), None, "not asked to close");
    assert_eq!(
        tls_stats(&a).handshakes_outbound,
        1,
        "pooled mTLS connection kept"
    );
    // New handshakes present the new certificate.
    let client_leaf = leaf(&m.ca, FRONTEND, |_| {});
    let s = pki::tls_connect(
        m.b.listener_addr("inbound").unwrap(),
        pki::client_config(&m.ca.pem, Some(&client_leaf), ORDERS),
    )
    .unwrap();
    assert_eq!(pki::server_serial(&s), new_leaf.serial());
    // And /metrics tells the certificate and the handshakes.
    let reports = pilotfish::worker::collect_reports(&m.b.mailboxes());
    let status = m.b.controller().tls_status();
    let text = pilotfish::admin::prometheus::render(
        &reports,
        &[],
        &pilotfish::admin::prometheus::Extra {
            tls: status.as_ref(),
            ..Default::default()
        },
    );
    for needle in [
        "pilotfish_tls_handshakes_total{core=\"0\",side=\"inbound\",kind=\"full\"}",
        &format!("pilotfish_tls_certificate_expiry_seconds{{identity=\"{ORDERS}\",serial=\"{}\",source=\"files\"}}", new_leaf.serial()),
        &format!("pilotfish_authorization_total{{core=\"0\",listener=\"inbound\",identity=\"{FRONTEND}\",decision=\"allow\"}} 2"),
    ] {
        assert!(text.contains(needle), "/metrics lacks {needle}:\n{text}");
    }
    a.shutdown();
    m.b.shutdown();
}

/// An inbound-only sidecar from `dir`'s files with extra `[tls]` keys.
fn inbound_with(dir: &Path, tls_extra: &str, app: std::net::SocketAddr) -> Proxy {
    let toml = format!(
        "workers = 1\n{}{tls_extra}\n[[listeners]]\nname = \"inbound\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ncluster = \"app\"\ntls = {{}}\n[[clusters]]\nname = \"app\"\nendpoints = [\"{app}\"]\n",
        tls_table(dir)
    );
    Proxy::start(pilotfish::Config::parse("in.toml", &toml).unwrap()).unwrap()
}

/// A peer that connects and never speaks is dropped at the handshake
/// deadline and counted; TLS 1.2 is refused unless `min_version = "1.2"`.
#[test]
fn silent_peers_time_out_and_tls12_is_refused_by_default() {
    let ca = new_ca("mesh CA");
    let dir = pki::temp_dir("mtls-deadline");
    leaf(&ca, ORDERS, |_| {}).write(&dir, &ca.pem);
    let upstream = HttpUpstream::start();
    let p = inbound_with(&dir, "handshake_timeout = \"200ms\"", upstream.addr);
    let addr = p.listener_addr("inbound").unwrap();

    let mut silent = support::connect(addr);
    let started = Instant::now();
    let mut buf = [0u8; 16];
    assert!(
        matches!(silent.read(&mut buf), Ok(0) | Err(_)),
        "closed by the proxy"
    );
    println!("silent peer closed after {:?}", started.elapsed());
    support::eventually("timeout counted", || {
        tls_stats(&p).failures(Side::Inbound, "timeout") == 1
    });

    let client_leaf = leaf(&ca, FRONTEND, |_| {});
    let tls12_only = Arc::new(
        rustls::ClientConfig::builder_with_provider(pilotfish::tls::material::provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(
                pilotfish::tls::verify::ServerVerifier::new(
                    &vec![(
                        "mesh.local".to_string(),
                        Arc::new({
                            let mut r = rustls::RootCertStore::empty();
                            r.add(pki::Leaf::chain_of(&ca.pem).remove(0)).unwrap();
                            r
                        }),
                    )],
                    pki::id(ORDERS),
                    pilotfish::tls::material::provider(),
                ),
            ))
            .with_client_auth_cert(client_leaf.chain(), client_leaf.key())
            .unwrap(),
    );
    let refused = pki::tls_connect(addr, Arc::clone(&tls12_only));
    assert!(
        refused.is_err(),
        "TLS 1.2 accepted without min_version = \"1.2\""
    );
    support::eventually("incompatible_peer counted", || {
        tls_stats(&p).failures(Side::Inbound, "incompatible_peer") == 1
    });
    p.shutdown();

    let p = inbound_with(&dir, "min_version = \"1.2\"", upstream.addr);
    let s = pki::tls_connect(p.listener_addr("inbound").unwrap(), tls12_only);
    let s = s.expect("TLS 1.2 with min_version = \"1.2\"");
    assert_eq!(
        s.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    p.shutdown();
}

/// Files that change but do not load (a half-written set) keep the
/// material in use, and are counted; the next good set is taken.
#[test]
fn files_that_do_not_load_keep_the_material_in_use() {
    let m = mesh("epoll", "mtls-halfwritten");
    let addr = m.b.listener_addr("inbound").unwrap();
    let client_leaf = leaf(&m.ca, FRONTEND, |_| {});
    let client = pki::client_config(&m.ca.pem, Some(&client_leaf), ORDERS);
    let serial = m.b.controller().tls_status().unwrap().serial;
    let d = m.dir.join("orders");
    let tmp = d.join(".cert.tmp");
    std::fs::write(&tmp, "-----BEGIN CERTIFICATE-----\ntruncat").unwrap();
    std::fs::rename(&tmp, d.join("cert.pem")).unwrap();
    support::eventually("the failed reload is counted", || {
        m.b.controller().tls_status().unwrap().reload_failures == 1
    });
    let status = m.b.controller().tls_status().unwrap();
    assert_eq!(status.serial, serial, "old material kept");
    assert!(status.last_error.is_some());
    let s = pki::tls_connect(addr, Arc::clone(&client)).unwrap();
    assert_eq!(pki::server_serial(&s), serial, "handshakes still work");
    // Caught between renames: the next certificate with the old key.
    let next = leaf(&m.ca, ORDERS, |_| {});
    std::fs::write(&tmp, &next.cert_pem).unwrap();
    std::fs::rename(&tmp, d.join("cert.pem")).unwrap();
    support::eventually("the mismatched set is refused", || {
        m.b.controller().tls_status().unwrap().reload_failures == 2
    });
    let status = m.b.controller().tls_status().unwrap();
    assert_eq!(status.serial, serial, "old material kept");
    assert!(
        status
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("does not match"),
        "{status:?}"
    );
    let s = pki::tls_connect(addr, Arc::clone(&client)).unwrap();
    assert_eq!(pki::server_serial(&s), serial, "handshakes still work");

    next.write(&d, &m.ca.pem);
    support::eventually("the good set is taken", || {
        m.b.controller().tls_status().unwrap().serial == next.serial()
    });
    let s = pki::tls_connect(addr, client).unwrap();
    assert_eq!(pki::server_serial(&s), next.serial());
    m.b.shutdown();
}

/// Health checks of a TLS cluster go over mTLS: the right peer passes, a
/// peer with the wrong identity fails (a plaintext probe would pass both).
#[test]
fn health_checks_of_a_tls_cluster_use_mtls() {
    let m = mesh("epoll", "mtls-health");
    let a_dir = m.dir.join("frontend");
    leaf(&m.ca, FRONTEND, |_| {}).write(&a_dir, &m.ca.pem);
    let b = m.b.listener_addr("inbound").unwrap();
    let check =
        "[clusters.health_check]\npath = \"/echo\"\ninterval = \"50ms\"\ntimeout = \"1s\"\n";
    let toml = |identity: &str| {
        format!(
            "workers = 1\n{}[[listeners]]\nname = \"out\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ncluster = \"orders\"\n[[clusters]]\nname = \"orders\"\nendpoints = [\"{b}\"]\ntls = {{ server_identity = \"{identity}\" }}\n{check}",
            tls_table(&a_dir)
        )
    };
    let start = |identity: &str| {
        Proxy::start(pilotfish::Config::parse("a.toml", &toml(identity)).unwrap()).unwrap()
    };
    let good = start(ORDERS);
    support::eventually("checks pass over mTLS", || {
        good.stats().total.http.health_checks_ok >= 2
    });
    let t = tls_stats(&good);
    assert!(
        t.handshakes_outbound + t.handshakes_outbound_resumed >= 2,
        "{t:?}"
    );
    good.shutdown();
    let wrong = start("spiffe://mesh.local/ns/prod/sa/payments");
    support::eventually("checks fail on the wrong identity", || {
        wrong.stats().total.http.health_checks_failed >= 2
    });
    assert_eq!(wrong.stats().total.http.health_checks_ok, 0);
    assert!(tls_stats(&wrong).failures(Side::Outbound, "wrong_identity") >= 2);
    wrong.shutdown();
    m.b.shutdown();
}

/// Issue 11 item 3: a trust bundle vouches only for its own trust domain.
/// On a listener without an allow-list (where any verified caller gets in
/// and its identity reaches the app), a certificate from the mesh's own CA
/// that names another trust domain is refused; a federated domain's
/// callers are accepted only with its own bundle's certificates.
#[test]
fn a_bundle_vouches_only_for_its_trust_domain_and_federation_adds_one() {
    let ca = new_ca("mesh CA");
    let partner = new_ca("partner CA");
    let dir = pki::temp_dir("mtls-domains");
    let b_dir = dir.join("orders");
    leaf(&ca, ORDERS, |_| {}).write(&b_dir, &ca.pem);
    std::fs::write(dir.join("partner.pem"), &partner.pem).unwrap();
    let app = HttpUpstream::start();
    let toml = format!(
        r#"workers = 1
[runtime]
driver = "auto"
{tls}trust_domain = "mesh.local"
federates_with = {{ "partner.example" = "{partner}" }}
[[listeners]]
name = "open"
bind = "127.0.0.1:0"
protocol = "http"
cluster = "app"
tls = {{ require_client_cert = true }}
[[clusters]]
name = "app"
endpoints = ["{app}"]
"#,
        tls = tls_table(&b_dir),
        partner = dir.join("partner.pem").display(),
        app = app.addr,
    );
    let b = Proxy::start(pilotfish::Config::parse("b.toml", &toml).unwrap()).unwrap();
    let addr = b.listener_addr("open").unwrap();
    const PARTNER: &str = "spiffe://partner.example/ns/shop/sa/cart";
    // (case, issuing CA, identity, Ok(identity the app sees) or Err(reason))
    let cases: Vec<(&str, &TestCa, &str, Result<&str, &str>)> = vec![
        ("own domain, own CA", &ca, FRONTEND, Ok(FRONTEND)),
        (
            "own CA, foreign domain",
            &ca,
            "spiffe://other.domain/ns/prod/sa/frontend",
            Err("untrusted_trust_domain"),
        ),
        ("federated domain, its CA", &partner, PARTNER, Ok(PARTNER)),
        (
            "federated CA claiming the own domain",
            &partner,
            FRONTEND,
            Err("unknown_issuer"),
        ),
        (
            "own CA claiming the federated domain",
            &ca,
            PARTNER,
            Err("unknown_issuer"),
        ),
    ];
    for (name, issuer, id, want) in cases {
        let before = tls_stats(&b);
        let client_leaf = leaf(issuer, id, |_| {});
        let config = pki::client_config(&ca.pem, Some(&client_leaf), ORDERS);
        let answer = pki::tls_connect(addr, config).and_then(|mut s| {
            s.write_all(b"GET /echo HTTP/1.1\r\nHost: o\r\nConnection: close\r\n\r\n")
                .map_err(|e| e.to_string())?;
            let mut out = Vec::new();
            match s.read_to_end(&mut out) {
                Ok(_) if !out.is_empty() => Ok(String::from_utf8_lossy(&out).into_owned()),
                Ok(_) => Err("closed".into()),
                Err(e) if !out.is_empty() && e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    Ok(String::from_utf8_lossy(&out).into_owned())
                }
                Err(e) => Err(e.to_string()),
            }
        });
        match want {
            Ok(seen) => {
                let text = answer.unwrap_or_else(|e| panic!("{name}: refused: {e}"));
                assert!(text.starts_with("HTTP/1.1 200"), "{name}: {text}");
                assert!(
                    text.contains(&format!("x-pilotfish-peer-identity: {seen}\r\n")),
                    "{name}: {text}"
                );
            }
            Err(reason) => {
                assert!(answer.is_err(), "{name}: accepted: {answer:?}");
                support::eventually(&format!("{name} counted as {reason}"), || {
                    tls_stats(&b).failures(Side::Inbound, reason)
                        == before.failures(Side::Inbound, reason) + 1
                });
            }
        }
    }
    assert_eq!(
        app.requests(),
        2,
        "only the two accepted callers reached the app"
    );
    b.shutdown();
    // Outbound: a server identity in a domain without a bundle is a start
    // error, not a cluster that fails every handshake.
    let toml = format!(
        "{tls}[[listeners]]\nname = \"o\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ncluster = \"x\"\n[[clusters]]\nname = \"x\"\nendpoints = [\"127.0.0.1:1\"]\ntls = {{ server_identity = \"spiffe://elsewhere/sa/x\" }}\n",
        tls = tls_table(&b_dir)
    );
    let err = Proxy::start(pilotfish::Config::parse("a.toml", &toml).unwrap()).unwrap_err();
    assert!(
        err.to_string().contains("\"elsewhere\" has no bundle"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// The golden metrics of a sidecar, scraped through a real admin socket.
struct Scrape(prometheus_parse::Scrape, String);

impl Scrape {
    fn of(proxy: &Proxy, dir: &Path, query: &str) -> Scrape {
        use pilotfish::admin::client;
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let socket = dir.join(format!(
            "admin-{}.sock",
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _server = support::admin_server(proxy, Some(socket.clone()), None);
        let (status, text) = client::request(&socket, "GET", &format!("/metrics{query}")).unwrap();
        assert_eq!(status, 200, "{text}");
        let lines = text.lines().map(|l| Ok(l.to_string()));
        Scrape(
            prometheus_parse::Scrape::parse(lines).expect("valid exposition text"),
            text,
        )
    }

    /// The sum of `name`'s samples whose labels include all of `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .samples
            .iter()
            .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                prometheus_parse::Value::Histogram(ref h) => h.last().map_or(0.0, |b| b.count),
                _ => 0.0,
            })
            .sum()
    }
}

/// Issue 14: requests, responses and durations by caller and callee, each
/// request once, on both sides of an mTLS pair with two callers; TCP
/// connections and bytes by the same labels; the per-core view agrees.
#[test]
fn golden_metrics_count_each_request_by_caller_and_callee() {
    const BILLING: &str = "spiffe://mesh.local/ns/prod/sa/billing";
    for driver in support::drivers() {
        let m = mesh(driver, "golden");
        let frontend = m.sidecar(driver, FRONTEND, "frontend");
        let billing = m.sidecar(driver, BILLING, "billing");
        let get = |p: &Proxy, path: &str| {
            let mut c = Conn::open(p.listener_addr("out").unwrap());
            c.send(format!("GET {path} HTTP/1.1\r\nHost: orders\r\n\r\n").as_bytes());
            c.read(false).expect("response").status
        };
        for _ in 0..3 {
            assert_eq!(get(&frontend, "/x"), 200);
        }
        assert_eq!(get(&frontend, "/status/503"), 503);
        for _ in 0..2 {
            assert_eq!(get(&billing, "/y"), 200);
        }
        let data = support::pattern(3, 1000);
        let back = support::echo_round_trip(frontend.listener_addr("out-tcp").unwrap(), &data);
        assert_eq!(back, data);

        // Sidecar B, inbound: one series per caller identity.
        let inbound = |id: &'static str| {
            [
                ("direction", "inbound"),
                ("listener", "inbound"),
                ("route", ""),
                ("cluster", "app"),
                ("tls", "true"),
                ("peer_identity", id),
            ]
        };
        let b = Scrape::of(&m.b, &m.dir, "");
        assert_eq!(
            b.value("pilotfish_requests_total", &inbound(FRONTEND)),
            4.0,
            "{driver}"
        );
        assert_eq!(
            b.value("pilotfish_requests_total", &inbound(BILLING)),
            2.0,
            "{driver}"
        );
        // Every request is in exactly one series.
        assert_eq!(b.value("pilotfish_requests_total", &[]), 6.0, "{driver}");
        let with_code = |id, code| {
            let mut l = inbound(id).to_vec();
            l.push(("code", code));
            l
        };
        assert_eq!(
            b.value("pilotfish_responses_total", &with_code(FRONTEND, "200")),
            3.0
        );
        assert_eq!(
            b.value("pilotfish_responses_total", &with_code(FRONTEND, "503")),
            1.0
        );
        assert_eq!(
            b.value("pilotfish_responses_total", &with_code(BILLING, "200")),
            2.0
        );
        assert_eq!(
            b.value("pilotfish_request_duration_seconds", &inbound(BILLING)),
            2.0
        );

        // TCP by the same labels, once the relayed connection has closed.
        let tcp = [
            ("direction", "inbound"),
            ("listener", "inbound-tcp"),
            ("cluster", "echo"),
            ("peer_identity", FRONTEND),
        ];
        let deadline = Instant::now() + support::IO_DEADLINE;
        let b = loop {
            let b = Scrape::of(&m.b, &m.dir, "");
            if b.value("pilotfish_tcp_connections_total", &tcp) >= 1.0 {
                break b;
            }
            assert!(Instant::now() < deadline, "{driver}: no TCP series");
            thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(b.value("pilotfish_tcp_connections_total", &tcp), 1.0);
        assert_eq!(b.value("pilotfish_tcp_received_bytes_total", &tcp), 1000.0);
        assert_eq!(b.value("pilotfish_tcp_sent_bytes_total", &tcp), 1000.0);

        // Prometheus's own linter accepts the whole exposition (names,
        // base units, HELP and TYPE, histogram and summary shapes).
        promtool_check(&b.1);
        promtool_check(&Scrape::of(&frontend, &m.dir, "").1);

        // The per-core view sums to the same.
        let per_core = Scrape::of(&m.b, &m.dir, "?per_core=true");
        let mut core0 = inbound(FRONTEND).to_vec();
        core0.push(("core", "0"));
        assert_eq!(per_core.value("pilotfish_requests_total", &core0), 4.0);

        // Sidecar A (frontend), outbound: the peer is the server identity
        // the cluster verified.
        let a = Scrape::of(&frontend, &m.dir, "");
        let outbound = [
            ("direction", "outbound"),
            ("listener", "out"),
            ("cluster", "orders"),
            ("tls", "true"),
            ("peer_identity", ORDERS),
        ];
        assert_eq!(
            a.value("pilotfish_requests_total", &outbound),
            4.0,
            "{driver}"
        );
        let mut failed = outbound.to_vec();
        failed.push(("code", "503"));
        assert_eq!(a.value("pilotfish_responses_total", &failed), 1.0);
    }
}

/// A tap on sidecar B filtered by the caller's SPIFFE ID sees that
/// caller's requests only (they arrive over h2 between the sidecars),
/// with the identity, TLS and the endpoint that answered; and a tap on
/// sidecar A sees the server identity it verified as the peer.
#[test]
fn a_tap_filtered_by_caller_identity_sees_that_caller_only() {
    use std::io::{BufRead, BufReader, Write};
    const BILLING: &str = "spiffe://mesh.local/ns/prod/sa/billing";
    let m = mesh("io_uring", "tap-peer");
    let frontend = m.sidecar("io_uring", FRONTEND, "frontend");
    let billing = m.sidecar("io_uring", BILLING, "billing");
    let tap = |proxy: &Proxy, name: &str, query: &str| {
        let socket = m.dir.join(format!("tap-{name}.sock"));
        let server = support::admin_server(proxy, Some(socket.clone()), None);
        let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        s.set_read_timeout(Some(support::IO_DEADLINE)).unwrap();
        write!(s, "GET /tap{query} HTTP/1.1\r\nHost: admin\r\n\r\n").unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        while line != "\r\n" {
            line.clear();
            assert!(r.read_line(&mut line).unwrap() > 0);
        }
        (server, r)
    };
    let events = |mut r: BufReader<std::os::unix::net::UnixStream>| -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        let mut line = String::new();
        while r.read_line(&mut line).unwrap() > 0 {
            out.push(serde_json::from_str(&line).unwrap());
            line.clear();
        }
        out
    };
    let (_b_admin, on_b) = tap(&m.b, "b", &format!("?peer={BILLING}&count=2"));
    let (_a_admin, on_a) = tap(&frontend, "a", "?count=1");
    let get = |p: &Proxy, path: &str| {
        let mut c = Conn::open(p.listener_addr("out").unwrap());
        c.send(format!("GET {path} HTTP/1.1\r\nHost: orders\r\n\r\n").as_bytes());
        c.read(false).expect("response").status
    };
    assert_eq!(get(&frontend, "/from-frontend"), 200);
    assert_eq!(get(&billing, "/from-billing/1"), 200);
    assert_eq!(get(&frontend, "/from-frontend"), 200);
    assert_eq!(get(&billing, "/from-billing/2"), 200);

    let seen = events(on_b);
    let paths: Vec<&str> = seen.iter().map(|e| e["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["/from-billing/1", "/from-billing/2"]);
    for e in &seen {
        assert_eq!(e["peer"], BILLING, "{e}");
        assert_eq!(e["direction"], "inbound", "{e}");
        assert_eq!(e["tls"], true, "{e}");
        assert_eq!(e["version"], "HTTP/2.0", "sidecars speak h2: {e}");
        assert_eq!(e["endpoint"], m.upstream.addr.to_string(), "{e}");
        assert_eq!(e["status"], 200, "{e}");
    }
    let seen = events(on_a);
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0]["peer"], ORDERS, "{}", seen[0]);
    assert_eq!(seen[0]["direction"], "outbound");
    assert_eq!(seen[0]["version"], "HTTP/1.1");
}

/// A route limited per caller identity gives each caller its own bucket:
/// two callers each get the burst, then 429 (relayed through sidecar A).
#[test]
fn a_per_identity_rate_limit_gives_each_caller_its_own_bucket() {
    const BILLING: &str = "spiffe://mesh.local/ns/prod/sa/billing";
    for driver in support::drivers() {
        let m = mesh(driver, "ratelimit-identity");
        let frontend = m.sidecar(driver, FRONTEND, "frontend");
        let billing = m.sidecar(driver, BILLING, "billing");
        let statuses = |p: &Proxy| -> Vec<u16> {
            let mut c = Conn::open(p.listener_addr("out").unwrap());
            (0..3)
                .map(|_| {
                    c.send(b"GET /metered/x HTTP/1.1\r\nHost: orders\r\n\r\n");
                    let r = c.read(false).expect("response");
                    if r.status == 429 {
                        assert_eq!(r.header("x-pilotfish-error"), Some("rate_limited"));
                        assert!(r.header("retry-after").is_some());
                    }
                    r.status
                })
                .collect()
        };
        assert_eq!(statuses(&frontend), [200, 200, 429], "{driver}");
        assert_eq!(
            statuses(&billing),
            [200, 200, 429],
            "{driver}: its own bucket"
        );
    }
}

/// `promtool check metrics` (Debian's prometheus package) on a scrape; a
/// machine without it skips outside CI, fails under CI=true.
fn promtool_check(text: &str) {
    let spawned = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            assert!(std::env::var("CI").is_err(), "promtool: {e}");
            eprintln!("skipped promtool check: {e}");
            return;
        }
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A cluster's `tls.sni` is the name its ClientHello carries (a peer may
/// route on it); without one, the fixed name is sent. Read off the wire by
/// a bare TCP listener that answers nothing.
#[test]
fn a_clusters_sni_is_what_the_client_hello_carries() {
    use std::io::Read;
    let dir = support::temp_dir("mtls-sni");
    let ca = new_ca("mesh.local");
    leaf(&ca, FRONTEND, |_| {}).write(&dir, &ca.pem);
    for driver in support::drivers() {
        for (sni, want) in [
            (
                Some("outbound_.8080_._.orders.prod.svc.cluster.local"),
                "outbound_.8080_._.orders.prod.svc.cluster.local",
            ),
            (None, "pilotfish.mesh"),
        ] {
            let peer = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let key = sni.map_or(String::new(), |s| format!(", sni = \"{s}\""));
            let toml = format!(
                "workers = 1\n[runtime]\ndriver = \"{driver}\"\n{tls}[[listeners]]\nname = \"out\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ncluster = \"orders\"\n[[clusters]]\nname = \"orders\"\nendpoints = [\"{peer}\"]\nconnect_attempts = 1\ntls = {{ server_identity = \"{ORDERS}\"{key} }}\n",
                tls = tls_table(&dir),
                peer = peer.local_addr().unwrap(),
            );
            let proxy = Proxy::start(pilotfish::Config::parse("a.toml", &toml).unwrap()).unwrap();
            let out = proxy.listener_addr("out").unwrap();
            let client = thread::spawn(move || http_client::get(out, "/"));
            let (mut s, _) = peer.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut hello = Vec::new();
            let mut buf = [0u8; 4096];
            while !hello.windows(want.len()).any(|w| w == want.as_bytes()) && hello.len() < 16384 {
                match s.read(&mut buf) {
                    Ok(n) if n > 0 => hello.extend_from_slice(&buf[..n]),
                    _ => break,
                }
            }
            assert!(
                hello.windows(want.len()).any(|w| w == want.as_bytes()),
                "{driver}: the ClientHello names {want}"
            );
            drop(s);
            assert_eq!(client.join().unwrap().status, 503, "{driver}");
            proxy.shutdown();
        }
    }
}
