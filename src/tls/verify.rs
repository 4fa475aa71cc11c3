//! rustls certificate verifiers that speak SPIFFE: the chain is verified
//! by webpki against the trust bundle (signatures, validity, extended key
//! usage), then the leaf against the SVID rules ([`super::svid`]); a
//! server must also be the identity the cluster expects. DNS names play no
//! part: a sidecar's server name is its SPIFFE ID.
//!
//! Trust domains: a trust bundle vouches only for the identities of its
//! own trust domain (SPIFFE Trust Domain and Bundle §4). A peer's chain is
//! verified against the bundle of the trust domain its SPIFFE ID names,
//! never against another's, and an ID from a trust domain without a
//! bundle here is refused (`untrusted_trust_domain`). By default that is
//! one domain, the sidecar's own; federation adds (domain, bundle) pairs.
//!
//! What must hold: no certificate is accepted that fails any of these;
//! every rejection maps to a short reason ([`reason`]) for counters.

use std::sync::Arc;

use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        danger::{ClientCertVerified, ClientCertVerifier},
        ParsedCertificate, WebPkiClientVerifier,
    },
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};

use super::{
    identity::SpiffeId,
    svid::{self, Purpose, SvidError},
};

fn rejected(e: SvidError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
}

/// A short, stable reason for a handshake failure, for counters and logs.
pub fn reason(e: &rustls::Error) -> &'static str {
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::Other(other) => match other.0.downcast_ref::<SvidError>() {
                Some(svid) => svid.reason(),
                // webpki refuses a CA certificate as an end entity before
                // our SVID check sees it; its error type is not public
                // through rustls, so it is recognised by name.
                None if format!("{:?}", other.0) == "CaUsedAsEndEntity" => "ca_leaf",
                None => "invalid_certificate",
            },
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::UnknownIssuer => "unknown_issuer",
            CertificateError::BadSignature => "bad_signature",
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "wrong_extended_key_usage"
            }
            CertificateError::Revoked => "revoked",
            _ => "invalid_certificate",
        },
        rustls::Error::NoCertificatesPresented => "no_client_certificate",
        rustls::Error::AlertReceived(_) => "alert_received",
        rustls::Error::PeerIncompatible(_) => "incompatible_peer",
        rustls::Error::PeerMisbehaved(_) => "peer_misbehaved",
        _ => "handshake_failed",
    }
}

/// Trust bundles by trust domain; the sidecar's own domain first.
pub type TrustDomains = Vec<(String, Arc<RootCertStore>)>;

/// Verifies client certificates for an inbound listener.
#[derive(Debug)]
pub struct ClientVerifier {
    /// One webpki verifier per trust domain, own domain first.
    domains: Vec<(String, Arc<dyn ClientCertVerifier>)>,
    mandatory: bool,
}

impl ClientVerifier {
    pub fn new(
        domains: &TrustDomains,
        provider: Arc<CryptoProvider>,
        mandatory: bool,
    ) -> Result<Self, rustls::Error> {
        let mut built = Vec::with_capacity(domains.len());
        for (domain, roots) in domains {
            let builder = WebPkiClientVerifier::builder_with_provider(
                Arc::clone(roots),
                Arc::clone(&provider),
            );
            let builder = if mandatory {
                builder
            } else {
                builder.allow_unauthenticated()
            };
            let inner = builder
                .build()
                .map_err(|e| rustls::Error::General(format!("client verifier: {e}")))?;
            built.push((domain.clone(), inner));
        }
        if built.is_empty() {
            return Err(rustls::Error::General("no trust domain".into()));
        }
        Ok(Self {
            domains: built,
            mandatory,
        })
    }

    /// The verifier for the trust domain `end_entity` claims. A leaf
    /// without exactly one SPIFFE ID goes to the own domain's, so that
    /// chain errors come first and the SVID check names the SAN problem.
    fn for_leaf(&self, end_entity: &[u8]) -> Result<&Arc<dyn ClientCertVerifier>, rustls::Error> {
        let Some(id) = svid::uri_san(end_entity) else {
            return Ok(&self.domains[0].1);
        };
        self.domains
            .iter()
            .find(|(d, _)| d == id.trust_domain())
            .map(|(_, v)| v)
            .ok_or_else(|| rejected(SvidError::UntrustedDomain(id.trust_domain().to_string())))
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.domains[0].1.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.for_leaf(end_entity)?
            .verify_client_cert(end_entity, intermediates, now)?;
        svid::check_leaf(end_entity, Purpose::Client).map_err(rejected)?;
        Ok(ClientCertVerified::assertion())
    }

    // Signatures do not depend on the trust domain: any domain's verifier
    // checks them the same way.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.domains[0].1.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.domains[0].1.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.domains[0].1.supported_verify_schemes()
    }
}

/// Verifies the peer sidecar of an outbound connection: a chain to the
/// bundle of the expected identity's trust domain, SVID rules, and exactly
/// the identity the cluster expects.
#[derive(Debug)]
pub struct ServerVerifier {
    /// The expected identity's trust domain's bundle; None: no bundle
    /// here for it, so every server is refused.
    roots: Option<Arc<RootCertStore>>,
    expected: SpiffeId,
    provider: Arc<CryptoProvider>,
}

impl ServerVerifier {
    pub fn new(domains: &TrustDomains, expected: SpiffeId, provider: Arc<CryptoProvider>) -> Self {
        let roots = domains
            .iter()
            .find(|(d, _)| d == expected.trust_domain())
            .map(|(_, r)| Arc::clone(r));
        Self {
            roots,
            expected,
            provider,
        }
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(roots) = &self.roots else {
            return Err(rejected(SvidError::UntrustedDomain(
                self.expected.trust_domain().to_string(),
            )));
        };
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let id = svid::check_leaf(end_entity, Purpose::Server).map_err(rejected)?;
        if id != self.expected {
            return Err(rejected(SvidError::WrongIdentity(
                id.to_string(),
                self.expected.to_string(),
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
