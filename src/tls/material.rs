//! A workload's TLS material from PEM files (or parts of it a control
//! plane pushed over SDS, [`Pushed`]): its certificate chain (leaf first),
//! its private key, and the trust bundle; and the rustls configs built
//! from them.
//!
//! What must hold: material is loaded whole or not at all (a rotation that
//! finds a half-written file keeps the old material); the leaf itself must
//! be a valid SVID; the files are bounded in size; configs offer TLS 1.3
//! (1.2 only when asked) and keep resumption state in a bounded cache that
//! is new with every set of material, so no session outlives a trust-bundle
//! change.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::{
    crypto::CryptoProvider,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName},
    server::ServerSessionMemoryCache,
    ClientConfig, RootCertStore, ServerConfig,
};

use super::{
    identity::SpiffeId,
    svid::{self, Purpose},
    verify::{ClientVerifier, ServerVerifier},
};

/// PEM files larger than this are refused (a chain of a few certificates
/// is a few KiB; a bundle of hundreds of roots still fits).
pub const PEM_BYTES_MAX: u64 = 1024 * 1024;
/// TLS sessions remembered per server config for resumption.
pub const SESSION_CACHE_MAX: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum MaterialError {
    /// A file, or a part a control plane pushed (named as such).
    #[error("{from}: {what}")]
    File { from: String, what: String },
    #[error("the workload certificate is not a usable SVID: {0}")]
    Leaf(svid::SvidError),
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("{0}")]
    Domain(String),
}

fn file_error(from: &dyn std::fmt::Display, what: impl Into<String>) -> MaterialError {
    MaterialError::File {
        from: from.to_string(),
        what: what.into(),
    }
}

/// A PEM file of CA certificates as a root store; at least one must parse.
fn read_bundle(path: &Path) -> Result<RootCertStore, MaterialError> {
    parse_bundle(&read_bounded(path)?, &path.display())
}

/// PEM CA certificates as a root store; at least one must parse.
fn parse_bundle(pem: &[u8], from: &dyn std::fmt::Display) -> Result<RootCertStore, MaterialError> {
    let anchors: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(from, format!("not PEM certificates: {e}")))?;
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(anchors);
    if added == 0 {
        return Err(file_error(from, "no usable CA certificate"));
    }
    Ok(roots)
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, MaterialError> {
    let from = &path.display();
    let meta = std::fs::metadata(path).map_err(|e| file_error(from, e.to_string()))?;
    if meta.len() > PEM_BYTES_MAX {
        return Err(file_error(
            from,
            format!("{} bytes; the limit is {PEM_BYTES_MAX}", meta.len()),
        ));
    }
    std::fs::read(path).map_err(|e| file_error(from, e.to_string()))
}

/// One workload's certificate, key and trust bundle.
#[derive(Debug, Clone)]
pub struct Material {
    pub chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    pub roots: Arc<RootCertStore>,
    /// The bundle of each trust domain whose identities are accepted: the
    /// leaf's own domain (with `roots`) first, then federated ones.
    pub domains: Arc<super::verify::TrustDomains>,
    /// The leaf's SPIFFE ID.
    pub identity: SpiffeId,
    /// The leaf's expiry.
    pub not_after: SystemTime,
    /// The leaf's serial number, hex.
    pub serial: String,
    /// How long a session may be resumed (zero: never).
    pub session_lifetime: Duration,
}

impl Material {
    /// Reads and checks the three files.
    pub fn load(cert: &Path, key: &Path, trust_bundle: &Path) -> Result<Self, MaterialError> {
        let certificate = Part {
            pem: read_bounded(cert)?,
            from: cert.display().to_string(),
        };
        let key = Part {
            pem: read_bounded(key)?,
            from: key.display().to_string(),
        };
        let bundle = Part {
            pem: read_bounded(trust_bundle)?,
            from: trust_bundle.display().to_string(),
        };
        Self::parse(&certificate, &key, &bundle)
    }

    /// Checks a certificate chain, its key and a trust bundle, in PEM.
    pub fn parse(certificate: &Part, key: &Part, bundle: &Part) -> Result<Self, MaterialError> {
        let (cert, key_from) = (&certificate.from, &key.from);
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&certificate.pem)
            .collect::<Result<_, _>>()
            .map_err(|e| file_error(cert, format!("not PEM certificates: {e}")))?;
        if chain.is_empty() {
            return Err(file_error(cert, "no certificate in it"));
        }
        let key_der = PrivateKeyDer::from_pem_slice(&key.pem)
            .map_err(|e| file_error(key_from, format!("no PEM private key: {e}")))?;
        let roots = Arc::new(parse_bundle(&bundle.pem, &bundle.from)?);
        // The key must be the leaf's: a set caught halfway through a
        // rotation (new certificate, old key) would load here and then
        // fail every handshake.
        rustls::sign::CertifiedKey::from_der(chain.clone(), key_der.clone_key(), &provider())
            .map_err(|e| {
                file_error(
                    key_from,
                    format!("does not match the certificate in {cert}: {e}"),
                )
            })?;
        // The leaf must be an SVID we could present in either role.
        let identity = svid::check_leaf(&chain[0], Purpose::Server)
            .and_then(|id| svid::check_leaf(&chain[0], Purpose::Client).map(|_| id))
            .map_err(MaterialError::Leaf)?;
        let (not_after, serial) = leaf_facts(&chain[0]);
        let domains = vec![(identity.trust_domain().to_string(), Arc::clone(&roots))];
        Ok(Self {
            chain,
            key: Arc::new(key_der),
            roots,
            domains: Arc::new(domains),
            identity,
            not_after,
            serial,
            session_lifetime: crate::config::tls::SESSION_LIFETIME_DEFAULT,
        })
    }

    /// Reads the files a config's `[tls]` names, with its settings.
    pub fn from_files(files: &crate::config::tls::TlsFiles) -> Result<Self, MaterialError> {
        Self::from_parts(files, None)
    }

    /// The material `[tls]` names, with the parts a control plane pushed
    /// in place of those files, and `[tls]`'s settings.
    pub fn from_parts(
        files: &crate::config::tls::TlsFiles,
        pushed: Option<&Pushed>,
    ) -> Result<Self, MaterialError> {
        let file = |p: &Path| -> Result<Part, MaterialError> {
            Ok(Part {
                pem: read_bounded(p)?,
                from: p.display().to_string(),
            })
        };
        let pushed = pushed.cloned().unwrap_or_default();
        let (certificate, key) = match pushed.certificate {
            Some((c, k)) => (c, k),
            None => (file(&files.cert)?, file(&files.key)?),
        };
        let bundle = match pushed.trust_bundle {
            Some(b) => b,
            None => file(&files.trust_bundle)?,
        };
        let mut m = Self::parse(&certificate, &key, &bundle)?;
        m.session_lifetime = files.session_lifetime;
        let own = m.identity.trust_domain().to_string();
        if let Some(want) = files.trust_domain.as_deref().filter(|d| *d != own) {
            return Err(file_error(
                &certificate.from,
                format!(
                    "the certificate is {} but tls.trust_domain is {want:?}",
                    m.identity
                ),
            ));
        }
        let mut domains = (*m.domains).clone();
        for (domain, bundle) in &files.federation {
            if *domain == own {
                return Err(file_error(
                    &bundle.display(),
                    format!("{domain:?} is this workload's own trust domain; its bundle is tls.trust_bundle"),
                ));
            }
            domains.push((domain.clone(), Arc::new(read_bundle(bundle)?)));
        }
        m.domains = Arc::new(domains);
        Ok(m)
    }

    /// Seconds until the leaf expires (negative once expired).
    pub fn seconds_to_expiry(&self) -> i64 {
        match self.not_after.duration_since(SystemTime::now()) {
            Ok(d) => d.as_secs() as i64,
            Err(e) => -(e.duration().as_secs() as i64),
        }
    }

    fn versions(tls12: bool) -> &'static [&'static rustls::SupportedProtocolVersion] {
        static TLS13_ONLY: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
        if tls12 {
            rustls::ALL_VERSIONS
        } else {
            &TLS13_ONLY
        }
    }

    /// For an inbound listener: present our SVID, verify client SVIDs.
    pub fn server_config(
        &self,
        provider: &Arc<CryptoProvider>,
        require_client_cert: bool,
        tls12: bool,
        alpn: &[&[u8]],
    ) -> Result<Arc<ServerConfig>, MaterialError> {
        let verifier =
            ClientVerifier::new(&self.domains, Arc::clone(provider), require_client_cert)?;
        let mut config = ServerConfig::builder_with_provider(Arc::clone(provider))
            .with_protocol_versions(Self::versions(tls12))?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        if self.session_lifetime.is_zero() {
            config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
            config.send_tls13_tickets = 0;
        } else {
            config.session_storage = Arc::new(BoundedSessions {
                inner: ServerSessionMemoryCache::new(SESSION_CACHE_MAX),
                lifetime: self.session_lifetime,
            });
            // One ticket per handshake: a sidecar resumes one connection at
            // a time per session, and stateful tickets cost cache entries.
            config.send_tls13_tickets = 1;
        }
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }

    /// For an outbound cluster: present our SVID, accept only a server
    /// with the `expected` identity.
    pub fn client_config(
        &self,
        provider: &Arc<CryptoProvider>,
        expected: SpiffeId,
        tls12: bool,
        alpn: &[&[u8]],
    ) -> Result<Arc<ClientConfig>, MaterialError> {
        let verifier = ServerVerifier::new(&self.domains, expected, Arc::clone(provider));
        let mut config = ClientConfig::builder_with_provider(Arc::clone(provider))
            .with_protocol_versions(Self::versions(tls12))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        if self.session_lifetime.is_zero() {
            config.resumption = rustls::client::Resumption::disabled();
        } else {
            config.resumption = rustls::client::Resumption::in_memory_sessions(SESSION_CACHE_MAX);
        }
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }
}

/// rustls's server session cache with a time bound: each value is stored
/// behind the second it was made, and one older than `lifetime` is not
/// resumed (rustls itself keeps stateful sessions until they are evicted).
#[derive(Debug)]
struct BoundedSessions {
    inner: Arc<ServerSessionMemoryCache>,
    lifetime: Duration,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl BoundedSessions {
    fn fresh(&self, stored: Vec<u8>) -> Option<Vec<u8>> {
        let (stamp, value) = stored.split_first_chunk::<8>()?;
        let age = unix_now().saturating_sub(u64::from_be_bytes(*stamp));
        (age < self.lifetime.as_secs().max(1)).then(|| value.to_vec())
    }
}

impl rustls::server::StoresServerSessions for BoundedSessions {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        let mut stored = Vec::with_capacity(8 + value.len());
        stored.extend_from_slice(&unix_now().to_be_bytes());
        stored.extend_from_slice(&value);
        self.inner.put(key, stored)
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.fresh(self.inner.get(key)?)
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.fresh(self.inner.take(key)?)
    }

    fn can_cache(&self) -> bool {
        true
    }
}

/// The name a client puts in SNI unless the cluster names one: sidecars
/// are addressed by SPIFFE ID, not DNS name, and the verifier ignores it,
/// so any fixed valid name will do.
pub fn sni() -> ServerName<'static> {
    ServerName::try_from("pilotfish.mesh").expect("a valid DNS name")
}

/// The leaf's notAfter and serial (both only for display).
fn leaf_facts(der: &[u8]) -> (SystemTime, String) {
    use x509_parser::prelude::*;
    match X509Certificate::from_der(der) {
        Ok((_, cert)) => {
            let secs = cert.validity().not_after.timestamp();
            let not_after = if secs >= 0 {
                SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs as u64)
            } else {
                SystemTime::UNIX_EPOCH
            };
            (not_after, cert.raw_serial_as_string().replace(':', ""))
        }
        Err(_) => (SystemTime::UNIX_EPOCH, String::new()),
    }
}

/// The process's crypto provider (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// This workload's TLS as the config and the files give it: what workers
/// build their rustls configs from. A new one is made for every change of
/// the files or of `[tls]`.
#[derive(Debug)]
pub struct Workload {
    pub material: Material,
    pub files: crate::config::tls::TlsFiles,
    /// Whether a control plane pushed any of it (else all came from files).
    pub pushed: bool,
}

impl Workload {
    pub fn load(files: &crate::config::tls::TlsFiles) -> Result<Self, MaterialError> {
        Self::load_with(files, None)
    }

    /// [`Self::load`] with the parts a control plane pushed.
    pub fn load_with(
        files: &crate::config::tls::TlsFiles,
        pushed: Option<&Pushed>,
    ) -> Result<Self, MaterialError> {
        Ok(Self {
            material: Material::from_parts(files, pushed)?,
            files: files.clone(),
            pushed: pushed.is_some_and(|p| p.certificate.is_some() || p.trust_bundle.is_some()),
        })
    }
}

/// One part of the material in PEM, and where it came from (for errors).
#[derive(Clone, PartialEq, Eq)]
pub struct Part {
    pub pem: Vec<u8>,
    pub from: String,
}

impl std::fmt::Debug for Part {
    // A key's bytes are never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Part({}, {} bytes)", self.from, self.pem.len())
    }
}

/// Material a control plane pushed (SDS): the certificate chain with its
/// key, and the trust bundle. A part not pushed comes from `[tls]`'s files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pushed {
    pub certificate: Option<(Part, Part)>,
    pub trust_bundle: Option<Part>,
}

#[cfg(test)]
mod tests {
    use rustls::server::StoresServerSessions;

    use super::*;

    #[test]
    fn sessions_are_not_resumed_past_their_lifetime() {
        let cache = BoundedSessions {
            inner: ServerSessionMemoryCache::new(8),
            lifetime: Duration::from_secs(300),
        };
        assert!(cache.put(b"fresh".to_vec(), b"session".to_vec()));
        assert_eq!(cache.get(b"fresh").as_deref(), Some(&b"session"[..]));
        assert_eq!(cache.take(b"fresh").as_deref(), Some(&b"session"[..]));
        assert_eq!(cache.get(b"fresh"), None, "take removes it");
        // Stored 301 s ago (the stamp as `put` writes it).
        let mut old = (unix_now() - 301).to_be_bytes().to_vec();
        old.extend_from_slice(b"session");
        cache.inner.put(b"old".to_vec(), old);
        assert_eq!(cache.get(b"old"), None);
        assert_eq!(cache.take(b"old"), None);
        // A value too short to carry a stamp is not a session.
        cache.inner.put(b"short".to_vec(), vec![1, 2]);
        assert_eq!(cache.get(b"short"), None);
    }
}
