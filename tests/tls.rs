//! SPIFFE mTLS building blocks with real rustls handshakes (in memory):
//! the negative matrix of the mTLS issue, each case rejected with its
//! reason; the development CA's output accepted; certificates made by the
//! `openssl` command line accepted or rejected as they should be.

use std::{path::Path, process::Command, sync::Arc, time::Duration};

use pilotfish::tls::{
    ca,
    identity::SpiffeId,
    material::{self, Material},
    svid::{self, Purpose},
    verify,
};
use rcgen::{
    BasicConstraints, ExtendedKeyUsagePurpose as Eku, IsCa, KeyUsagePurpose as Ku, SanType,
};
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};

mod support;
use support::{
    have,
    pki::{id, leaf, new_ca, Leaf, FRONTEND, ORDERS},
};

/// Writes a leaf and a bundle to files and loads them as Material.
fn material(dir: &Path, name: &str, leaf: &Leaf, bundle: &str) -> Material {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("cert.pem"), &leaf.cert_pem).unwrap();
    std::fs::write(d.join("key.pem"), &leaf.key_pem).unwrap();
    std::fs::write(d.join("ca.pem"), bundle).unwrap();
    Material::load(&d.join("cert.pem"), &d.join("key.pem"), &d.join("ca.pem")).unwrap()
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("pf-tls-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[derive(Debug)]
struct Outcome {
    client: Result<(), rustls::Error>,
    server: Result<(), rustls::Error>,
    /// The client's identity as the server verified it.
    peer: Option<SpiffeId>,
}

/// Runs a handshake between the two configs through memory buffers.
fn handshake(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> Outcome {
    let mut c = ClientConnection::new(client, material::sni()).unwrap();
    let mut s = ServerConnection::new(server).unwrap();
    let mut client_result = Ok(());
    let mut server_result = Ok(());
    for _ in 0..16 {
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            s.read_tls(&mut buf.as_slice()).unwrap();
            if let Err(e) = s.process_new_packets() {
                server_result = Err(e);
            }
        }
        let mut buf = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            c.read_tls(&mut buf.as_slice()).unwrap();
            if let Err(e) = c.process_new_packets() {
                client_result = Err(e);
            }
        }
        if client_result.is_err() || server_result.is_err() {
            break;
        }
        if !c.is_handshaking() && !s.is_handshaking() && !c.wants_write() && !s.wants_write() {
            break;
        }
    }
    let peer = s
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| svid::check_leaf(leaf, Purpose::Client).ok());
    Outcome {
        client: client_result,
        server: server_result,
        peer,
    }
}

/// An outbound client presenting `leaf` (however bad), verifying the server
/// as `expected`.
fn raw_client(bundle: &Material, leaf: Option<&Leaf>, expected: &str) -> Arc<ClientConfig> {
    support::pki::client_config_with_roots(Arc::clone(&bundle.roots), leaf, expected)
}

/// An inbound server presenting `leaf` (however bad), not asking for
/// client certificates.
fn raw_server(leaf: &Leaf) -> Arc<ServerConfig> {
    Arc::new(
        ServerConfig::builder_with_provider(material::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(leaf.chain(), leaf.key())
            .unwrap(),
    )
}

#[test]
fn mutual_tls_accepts_valid_svids_and_names_the_caller() {
    let dir = temp_dir("ok");
    let ca = new_ca("mesh CA");
    let client = material(&dir, "frontend", &leaf(&ca, FRONTEND, |_| {}), &ca.pem);
    let server = material(&dir, "orders", &leaf(&ca, ORDERS, |_| {}), &ca.pem);
    assert_eq!(client.identity.as_str(), FRONTEND);
    assert!(server.seconds_to_expiry() > 3000 && server.seconds_to_expiry() <= 3600);
    let p = material::provider();
    let out = handshake(
        client.client_config(&p, id(ORDERS), false, &[]).unwrap(),
        server.server_config(&p, true, false, &[]).unwrap(),
    );
    assert!(out.client.is_ok() && out.server.is_ok(), "{out:?}");
    assert_eq!(out.peer, Some(id(FRONTEND)));
}

/// The inbound half of the matrix: a listener requiring client SVIDs
/// rejects each bad client certificate, with the reason.
#[test]
fn inbound_rejects_bad_client_certificates_with_reasons() {
    let dir = temp_dir("inbound");
    let ca = new_ca("mesh CA");
    let foreign = new_ca("another CA");
    // A different CA that took the same name: found by name, its signature
    // does not verify.
    let impostor = new_ca("mesh CA");
    let server = material(&dir, "orders", &leaf(&ca, ORDERS, |_| {}), &ca.pem);
    let p = material::provider();
    let server_config = server.server_config(&p, true, false, &[]).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let cases: Vec<(&str, Option<Leaf>, &[&str])> = vec![
        (
            "no URI SAN",
            Some(leaf(&ca, FRONTEND, |p| {
                p.subject_alt_names =
                    vec![SanType::DnsName("frontend.mesh.local".try_into().unwrap())];
            })),
            &["no_uri_san"],
        ),
        (
            "two URI SANs",
            Some(leaf(&ca, FRONTEND, |p| {
                p.subject_alt_names.push(SanType::URI(
                    "spiffe://mesh.local/other".try_into().unwrap(),
                ));
            })),
            &["several_uri_sans"],
        ),
        (
            "URI given as DNS SAN",
            Some(leaf(&ca, FRONTEND, |p| {
                p.subject_alt_names = vec![SanType::DnsName(FRONTEND.try_into().unwrap())];
            })),
            &["no_uri_san"],
        ),
        (
            "CA:true leaf",
            Some(leaf(&ca, FRONTEND, |p| {
                p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            })),
            &["ca_leaf"],
        ),
        (
            "keyCertSign on the leaf",
            Some(leaf(&ca, FRONTEND, |p| {
                p.key_usages = vec![Ku::DigitalSignature, Ku::KeyCertSign];
            })),
            &["signing_leaf"],
        ),
        (
            "no digitalSignature",
            Some(leaf(&ca, FRONTEND, |p| {
                p.key_usages = vec![Ku::KeyAgreement];
            })),
            &["no_digital_signature"],
        ),
        (
            "no clientAuth EKU",
            Some(leaf(&ca, FRONTEND, |p| {
                p.extended_key_usages = vec![Eku::ServerAuth];
            })),
            &["wrong_extended_key_usage"],
        ),
        (
            "expired",
            Some(leaf(&ca, FRONTEND, |p| {
                p.not_before = now - time::Duration::days(2);
                p.not_after = now - time::Duration::days(1);
            })),
            &["expired"],
        ),
        (
            "not yet valid",
            Some(leaf(&ca, FRONTEND, |p| {
                p.not_before = now + time::Duration::days(1);
                p.not_after = now + time::Duration::days(2);
            })),
            &["not_yet_valid"],
        ),
        (
            "foreign root",
            Some(leaf(&foreign, FRONTEND, |_| {})),
            &["unknown_issuer"],
        ),
        (
            "foreign root with the mesh CA's name",
            Some(leaf(&impostor, FRONTEND, |_| {})),
            &["bad_signature"],
        ),
        ("no client certificate", None, &["no_client_certificate"]),
    ];
    for (name, bad, reasons) in cases {
        let out = handshake(
            raw_client(&server, bad.as_ref(), ORDERS),
            Arc::clone(&server_config),
        );
        let err = out.server.as_ref().expect_err(name);
        let why = verify::reason(err);
        println!("{name}: rejected, {why} ({err})");
        assert!(
            reasons.contains(&why),
            "{name}: {why} not in {reasons:?} ({err})"
        );
        assert_eq!(out.peer, None, "{name}");
    }
}

/// The outbound half: a client expecting `orders` rejects a server that is
/// someone else, or whose certificate is not a server SVID.
#[test]
fn outbound_rejects_the_wrong_server_with_reasons() {
    let dir = temp_dir("outbound");
    let ca = new_ca("mesh CA");
    let client = material(&dir, "frontend", &leaf(&ca, FRONTEND, |_| {}), &ca.pem);
    let p = material::provider();
    let client_config = client.client_config(&p, id(ORDERS), false, &[]).unwrap();
    let cases: Vec<(&str, Leaf, &str)> = vec![
        (
            "wrong identity",
            leaf(&ca, "spiffe://mesh.local/ns/prod/sa/payments", |_| {}),
            "wrong_identity",
        ),
        (
            "right ID as a DNS SAN",
            leaf(&ca, ORDERS, |p| {
                p.subject_alt_names =
                    vec![SanType::DnsName("orders.mesh.local".try_into().unwrap())];
            }),
            "no_uri_san",
        ),
        (
            "no serverAuth EKU",
            leaf(&ca, ORDERS, |p| {
                p.extended_key_usages = vec![Eku::ClientAuth];
            }),
            "wrong_extended_key_usage",
        ),
        (
            "foreign root",
            leaf(&new_ca("another CA"), ORDERS, |_| {}),
            "unknown_issuer",
        ),
        (
            "foreign root with the mesh CA's name",
            leaf(&new_ca("mesh CA"), ORDERS, |_| {}),
            "bad_signature",
        ),
    ];
    for (name, bad, reason) in cases {
        let out = handshake(Arc::clone(&client_config), raw_server(&bad));
        let err = out.client.as_ref().expect_err(name);
        println!("{name}: rejected, {} ({err})", verify::reason(err));
        assert_eq!(verify::reason(err), reason, "{name}: {err}");
    }
}

#[test]
fn the_development_ca_issues_usable_svids() {
    let dir = temp_dir("devca");
    ca::init(&dir.join("ca")).unwrap();
    assert!(ca::init(&dir.join("ca")).is_err(), "never overwrites a CA");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join("ca/ca.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    for (name, who) in [("a", FRONTEND), ("b", ORDERS)] {
        ca::issue(
            &dir.join("ca"),
            &id(who),
            &dir.join(name),
            Duration::from_secs(3600),
        )
        .unwrap();
    }
    let load = |n: &str| {
        let d = dir.join(n);
        Material::load(&d.join("cert.pem"), &d.join("key.pem"), &d.join("ca.pem")).unwrap()
    };
    let (a, b) = (load("a"), load("b"));
    let p = material::provider();
    let out = handshake(
        a.client_config(&p, id(ORDERS), false, &[]).unwrap(),
        b.server_config(&p, true, false, &[]).unwrap(),
    );
    assert!(out.client.is_ok() && out.server.is_ok(), "{out:?}");
    assert_eq!(out.peer, Some(id(FRONTEND)));
}

/// A CA and three leaves made by the `openssl` command line in `d`:
/// frontend and orders (SVIDs), dnsonly (the ID only as a DNS name).
fn openssl_pki(d: &Path) {
    openssl(
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "ca.key",
        ],
        d,
    );
    openssl(
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "ca.key",
            "-subj",
            "/CN=openssl CA",
            "-days",
            "2",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-out",
            "ca.pem",
        ],
        d,
    );
    let issue = |name: &str, san: &str| {
        openssl(
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                &format!("{name}.key"),
            ],
            d,
        );
        openssl(
            &[
                "req",
                "-new",
                "-key",
                &format!("{name}.key"),
                "-subj",
                &format!("/CN={name}"),
                "-out",
                &format!("{name}.csr"),
            ],
            d,
        );
        std::fs::write(
            d.join(format!("{name}.ext")),
            format!("subjectAltName={san}\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n"),
        )
        .unwrap();
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.pem"),
            ],
            d,
        );
        // openssl writes SEC1 EC keys; Material reads PKCS#8 and SEC1 alike.
    };
    issue("frontend", &format!("URI:{FRONTEND}"));
    issue("orders", &format!("URI:{ORDERS}"));
    issue("dnsonly", "DNS:frontend.mesh.local");
}

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Certificates from the `openssl` command line, not from rcgen: a proper
/// SVID is accepted; one with the ID only as a DNS SAN is refused.
#[test]
fn openssl_made_certificates_are_judged_the_same_way() {
    if !have("openssl") {
        return;
    }
    let dir = temp_dir("openssl");
    let d = dir.as_path();
    openssl_pki(d);
    let load = |n: &str| {
        Material::load(
            &d.join(format!("{n}.pem")),
            &d.join(format!("{n}.key")),
            &d.join("ca.pem"),
        )
    };
    let (a, b) = (load("frontend").unwrap(), load("orders").unwrap());
    let p = material::provider();
    let out = handshake(
        a.client_config(&p, id(ORDERS), false, &[]).unwrap(),
        b.server_config(&p, true, false, &[]).unwrap(),
    );
    assert!(out.client.is_ok() && out.server.is_ok(), "{out:?}");
    assert_eq!(out.peer, Some(id(FRONTEND)));
    let refused = load("dnsonly").expect_err("a DNS-only certificate is not an SVID");
    assert!(refused.to_string().contains("no URI SAN"), "{refused}");
}

/// `pilotfish ca init` and `pilotfish ca issue`, as a user runs them.
#[test]
fn the_ca_command_line_makes_loadable_material() {
    let dir = temp_dir("cli");
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_pilotfish"))
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(stderr.contains("not for production"), "{stderr}");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr,
        )
    };
    assert!(run(&["ca", "init", "ca"]).0);
    let (ok, stdout, _) = run(&[
        "ca",
        "issue",
        "--ca",
        "ca",
        "--spiffe-id",
        ORDERS,
        "--out",
        "orders",
        "--valid-for",
        "2h",
    ]);
    assert!(ok && stdout.contains(ORDERS), "{stdout}");
    let m = Material::load(
        &dir.join("orders/cert.pem"),
        &dir.join("orders/key.pem"),
        &dir.join("orders/ca.pem"),
    )
    .unwrap();
    assert_eq!(m.identity.as_str(), ORDERS);
    assert!(
        (7000..=7200).contains(&m.seconds_to_expiry()),
        "{}",
        m.seconds_to_expiry()
    );
    let (ok, _, stderr) = run(&[
        "ca",
        "issue",
        "--ca",
        "ca",
        "--spiffe-id",
        "https://not-spiffe",
        "--out",
        "x",
    ]);
    assert!(!ok && stderr.contains("spiffe://"), "{stderr}");
}

/// Real TLS peers outside the project, over sockets, with certificates
/// made by the `openssl` command line: `curl --cert` through an inbound
/// HTTP listener (accepted with its identity passed on, or refused with the
/// reason counted), and `openssl s_client` through an inbound L4 listener.
/// curl runs with `-k`: the proxy's certificate names a SPIFFE ID, not a
/// host name, which curl cannot check; the proxy's own client-certificate
/// check is what is tested here.
#[test]
fn curl_and_openssl_s_client_with_openssl_made_certificates() {
    use std::io::{BufRead, BufReader, Write};
    if !have("openssl") || !have("curl") {
        return;
    }
    let dir = temp_dir("openssl-peers");
    let d = dir.as_path();
    openssl_pki(d);
    let upstream = support::http_upstream::HttpUpstream::start();
    let toml = format!(
        r#"workers = 1
[tls]
cert = "{d}/orders.pem"
key = "{d}/orders.key"
trust_bundle = "{d}/ca.pem"
min_version = "1.2"
[[listeners]]
name = "inbound"
bind = "127.0.0.1:0"
protocol = "http"
cluster = "app"
tls = {{ require_client_cert = true }}
authorize = ["{FRONTEND}"]
[[listeners]]
name = "inbound-tcp"
bind = "127.0.0.1:0"
protocol = "tcp"
cluster = "echo"
tls = {{}}
[[clusters]]
name = "app"
endpoints = ["{app}"]
[[clusters]]
name = "echo"
endpoints = ["{echo}"]
"#,
        d = d.display(),
        app = upstream.addr,
        echo = support::echo_server(),
    );
    let (proxy, http) = support::start_toml(&toml, "inbound");
    let tcp = proxy.listener_addr("inbound-tcp").unwrap();
    let curl = |cert: Option<&str>, versions: &[&str]| {
        let mut c = Command::new("curl");
        c.args(["-sk", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}"]);
        c.args(versions);
        if let Some(n) = cert {
            c.args(["--cert", &format!("{n}.pem"), "--key", &format!("{n}.key")]);
        }
        c.arg(format!("https://127.0.0.1:{}/echo", http.port()));
        let out = c.current_dir(d).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    const TLS13: &[&str] = &["--tlsv1.3"];
    // TLS 1.2 exactly: the config's min_version = "1.2" allows it.
    const TLS12: &[&str] = &["--tlsv1.2", "--tls-max", "1.2"];
    for versions in [TLS13, TLS12] {
        let (code, out) = curl(Some("frontend"), versions);
        assert_eq!(code, Some(0), "{versions:?}: {out}");
        assert!(out.ends_with("\n200"), "{versions:?}: {out}");
        assert!(
            out.to_ascii_lowercase()
                .contains(&format!("x-pilotfish-peer-identity: {FRONTEND}")),
            "{versions:?}: {out}"
        );
    }
    let stats = || proxy.stats().total.tls;
    let (code, out) = curl(Some("dnsonly"), TLS13);
    assert!(
        !out.ends_with("\n200"),
        "a DNS-only certificate is refused: {code:?} {out}"
    );
    support::eventually("no_uri_san counted", || {
        stats().failures(pilotfish::tls::counters::Side::Inbound, "no_uri_san") == 1
    });
    let (code, out) = curl(None, TLS13);
    assert!(
        !out.ends_with("\n200"),
        "no certificate is refused: {code:?} {out}"
    );
    support::eventually("no_client_certificate counted", || {
        stats().failures(
            pilotfish::tls::counters::Side::Inbound,
            "no_client_certificate",
        ) == 1
    });
    assert_eq!(upstream.requests(), 2);

    // openssl s_client through the L4 listener: the echo comes back.
    let mut child = Command::new("openssl")
        .args(["s_client", "-quiet", "-connect", &tcp.to_string()])
        .args([
            "-cert",
            "frontend.pem",
            "-key",
            "frontend.key",
            "-CAfile",
            "ca.pem",
        ])
        .current_dir(d)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"ping from s_client\n").unwrap();
    stdin.flush().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let line = rx.recv_timeout(Duration::from_secs(20));
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(line.as_deref(), Ok("ping from s_client"));
    let t = stats();
    assert!(t.handshakes_inbound >= 3, "{t:?}");
    proxy.shutdown();
}
