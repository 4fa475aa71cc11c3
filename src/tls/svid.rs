//! The X.509-SVID rules for a peer's leaf certificate, on top of the chain
//! verification rustls/webpki does (signatures, validity, trust bundle).
//!
//! What must hold (SPIFFE X509-SVID §4–5): the leaf carries exactly one URI
//! SAN, and it is a valid SPIFFE ID (other SAN types may be present; a
//! `spiffe://` string in a DNS SAN is not an identity); the leaf is not a
//! CA; it has the key usage extension with digitalSignature and without
//! keyCertSign or cRLSign; its extended key usage names the purpose it is
//! used for (clientAuth for a client, serverAuth for a server). Every
//! rejection says which rule failed, for logs and counters.

use x509_parser::{extensions::GeneralName, prelude::*};

use super::identity::{IdError, SpiffeId};

/// What the leaf is presented for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A client presenting to an inbound listener: needs clientAuth.
    Client,
    /// A server answering an outbound connection: needs serverAuth.
    Server,
}

/// Why a leaf is not an acceptable SVID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    #[error("the certificate does not parse as X.509")]
    Unparsable,
    #[error("the leaf has no URI SAN (a spiffe:// DNS SAN is not an identity)")]
    NoUriSan,
    #[error("the leaf has {0} URI SANs; an SVID has exactly one")]
    SeveralUriSans(usize),
    #[error("the URI SAN is not a SPIFFE ID: {0}")]
    NotSpiffe(IdError),
    #[error("the leaf is a CA certificate (basicConstraints CA:true)")]
    CaLeaf,
    #[error("the leaf has no key usage extension")]
    NoKeyUsage,
    #[error("the leaf's key usage lacks digitalSignature")]
    NoDigitalSignature,
    #[error("the leaf's key usage allows certificate or CRL signing")]
    SigningLeaf,
    #[error("the leaf's extended key usage lacks {0}")]
    WrongExtendedKeyUsage(&'static str),
    #[error("the leaf is {0}, not {1}")]
    WrongIdentity(String, String),
    /// The leaf names a trust domain with no bundle here: a bundle
    /// vouches only for its own trust domain's identities.
    #[error("the leaf's trust domain {0:?} is not trusted here (no bundle for it)")]
    UntrustedDomain(String),
}

impl SvidError {
    /// A short, stable name for counters and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            SvidError::Unparsable => "unparsable",
            SvidError::NoUriSan => "no_uri_san",
            SvidError::SeveralUriSans(_) => "several_uri_sans",
            SvidError::NotSpiffe(_) => "not_spiffe",
            SvidError::CaLeaf => "ca_leaf",
            SvidError::NoKeyUsage => "no_key_usage",
            SvidError::NoDigitalSignature => "no_digital_signature",
            SvidError::SigningLeaf => "signing_leaf",
            SvidError::WrongExtendedKeyUsage(_) => "wrong_extended_key_usage",
            SvidError::WrongIdentity(..) => "wrong_identity",
            SvidError::UntrustedDomain(_) => "untrusted_trust_domain",
        }
    }
}

/// Checks the leaf against the SVID rules and returns its SPIFFE ID.
pub fn check_leaf(der: &[u8], purpose: Purpose) -> Result<SpiffeId, SvidError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| SvidError::Unparsable)?;
    // A duplicate or malformed extension is an error here, not "absent".
    let basic = cert
        .basic_constraints()
        .map_err(|_| SvidError::Unparsable)?;
    if basic.is_some_and(|b| b.value.ca) {
        return Err(SvidError::CaLeaf);
    }
    let usage = cert
        .key_usage()
        .map_err(|_| SvidError::Unparsable)?
        .ok_or(SvidError::NoKeyUsage)?;
    if !usage.value.digital_signature() {
        return Err(SvidError::NoDigitalSignature);
    }
    if usage.value.key_cert_sign() || usage.value.crl_sign() {
        return Err(SvidError::SigningLeaf);
    }
    let (needed, name) = match purpose {
        Purpose::Client => (true, "clientAuth"),
        Purpose::Server => (false, "serverAuth"),
    };
    let eku = cert
        .extended_key_usage()
        .map_err(|_| SvidError::Unparsable)?
        .ok_or(SvidError::WrongExtendedKeyUsage(name))?;
    let has = if needed {
        eku.value.client_auth
    } else {
        eku.value.server_auth
    };
    if !has {
        return Err(SvidError::WrongExtendedKeyUsage(name));
    }
    let uris: Vec<&str> = cert
        .subject_alternative_name()
        .map_err(|_| SvidError::Unparsable)?
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match uris.as_slice() {
        [] => Err(SvidError::NoUriSan),
        [uri] => SpiffeId::parse(uri).map_err(SvidError::NotSpiffe),
        many => Err(SvidError::SeveralUriSans(many.len())),
    }
}

/// The SPIFFE ID of a leaf already verified as an SVID (for the role the
/// handshake checked): its one URI SAN. None if it has not exactly one.
pub fn uri_san(der: &[u8]) -> Option<SpiffeId> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    let first = uris.next()?;
    if uris.next().is_some() {
        return None;
    }
    SpiffeId::parse(first).ok()
}
