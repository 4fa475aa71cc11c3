//! Certificates made in the test (rcgen): a CA, SVID leaves with any
//! defect a test asks for, files on disk, and a blocking rustls client for
//! talking to the proxy's TLS listeners over real sockets.

use std::{
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::Arc,
};

use pilotfish::tls::{identity::SpiffeId, material, verify::ServerVerifier};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose as Eku, IsCa, Issuer,
    KeyPair, KeyUsagePurpose as Ku, SanType,
};
use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    ClientConfig, ClientConnection, RootCertStore, StreamOwned,
};

use super::IO_DEADLINE;

pub const FRONTEND: &str = "spiffe://mesh.local/ns/prod/sa/frontend";
pub const ORDERS: &str = "spiffe://mesh.local/ns/prod/sa/orders";

pub struct TestCa {
    pub issuer: Issuer<'static, KeyPair>,
    pub pem: String,
}

pub fn new_ca(name: &str) -> TestCa {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![Ku::KeyCertSign, Ku::CrlSign];
    let cert = p.self_signed(&key).unwrap();
    TestCa {
        pem: cert.pem(),
        issuer: Issuer::new(p, key),
    }
}

pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Leaf {
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        Self::chain_of(&self.cert_pem)
    }

    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).unwrap()
    }

    /// The certificates in a PEM text.
    pub fn chain_of(pem: &str) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// The leaf's serial number, hex (as the proxy reports it).
    pub fn serial(&self) -> String {
        serial_of(&self.chain()[0])
    }

    /// Writes cert.pem, key.pem and ca.pem (= `bundle`) into `dir`,
    /// replacing each file by rename, as a certificate agent does.
    pub fn write(&self, dir: &Path, bundle: &str) {
        std::fs::create_dir_all(dir).unwrap();
        for (name, text) in [
            ("cert.pem", self.cert_pem.as_str()),
            ("key.pem", self.key_pem.as_str()),
            ("ca.pem", bundle),
        ] {
            let tmp = dir.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, dir.join(name)).unwrap();
        }
    }
}

pub fn serial_of(der: &[u8]) -> String {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    cert.raw_serial_as_string().replace(':', "")
}

/// A valid SVID for `id`, changed by `edit` first.
pub fn leaf(ca: &TestCa, id: &str, edit: impl FnOnce(&mut CertificateParams)) -> Leaf {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![Ku::DigitalSignature];
    p.extended_key_usages = vec![Eku::ServerAuth, Eku::ClientAuth];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::hours(1);
    edit(&mut p);
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    Leaf {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

pub fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

/// The `[tls]` table for files in `dir`.
pub fn tls_table(dir: &Path) -> String {
    format!(
        "[tls]\ncert = \"{0}/cert.pem\"\nkey = \"{0}/key.pem\"\ntrust_bundle = \"{0}/ca.pem\"\n",
        dir.display()
    )
}

pub fn temp_dir(tag: &str) -> PathBuf {
    super::temp_dir(tag)
}

/// A TLS client config presenting `leaf` (or no certificate), verifying
/// the server as `expected` against `bundle`, with its own session cache.
pub fn client_config(bundle: &str, leaf: Option<&Leaf>, expected: &str) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(bundle.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    client_config_with_roots(Arc::new(roots), leaf, expected)
}

/// [`client_config`] with the trust anchors given as a store.
pub fn client_config_with_roots(
    roots: Arc<RootCertStore>,
    leaf: Option<&Leaf>,
    expected: &str,
) -> Arc<ClientConfig> {
    let provider = material::provider();
    let expected = id(expected);
    let domains = vec![(expected.trust_domain().to_string(), roots)];
    let verifier = ServerVerifier::new(&domains, expected, Arc::clone(&provider));
    let b = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    Arc::new(match leaf {
        Some(l) => b.with_client_auth_cert(l.chain(), l.key()).unwrap(),
        None => b.with_no_client_auth(),
    })
}

pub type TlsConn = StreamOwned<ClientConnection, TcpStream>;

/// Connects and completes the handshake; Err(reason text) if it fails.
/// A TLS 1.3 server rejects a client certificate after the client thinks
/// the handshake is done, so this also reads once (with a short wait) to
/// surface that rejection as an error.
pub fn tls_connect(addr: SocketAddr, config: Arc<ClientConfig>) -> Result<TlsConn, String> {
    let tcp = TcpStream::connect_timeout(&addr, IO_DEADLINE).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(IO_DEADLINE)).unwrap();
    let conn = ClientConnection::new(config, material::sni()).map_err(|e| e.to_string())?;
    let mut s = StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).map_err(|e| e.to_string())?;
    }
    Ok(s)
}

/// The serial of the certificate the server presented.
pub fn server_serial(s: &TlsConn) -> String {
    serial_of(&s.conn.peer_certificates().unwrap()[0])
}
