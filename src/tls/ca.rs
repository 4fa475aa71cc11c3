//! `pilotfish ca`: a local certificate authority for development and tests.
//!
//! NOT FOR PRODUCTION. Production certificates come from the operator's
//! PKI (SPIRE, cert-manager, step-ca, ...) as files; this exists so that a
//! mesh can be tried, demonstrated and tested on one machine. Keys are
//! written with mode 0600; the CA key never leaves its directory.
//!
//! Layout: `init DIR` writes `DIR/ca.pem` and `DIR/ca.key`; `issue` writes
//! `OUT/cert.pem` (the leaf), `OUT/key.pem` and `OUT/ca.pem` (the trust
//! bundle), ready for `[tls] cert/key/trust_bundle`.

use std::{
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

use super::identity::SpiffeId;

/// How long a development CA is valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// The longest validity `issue` gives (the CA's own).
pub const LEAF_VALIDITY_MAX: Duration = CA_VALIDITY;
/// Default validity of an issued workload certificate.
pub const LEAF_VALIDITY_DEFAULT: Duration = Duration::from_secs(30 * 24 * 3600);
/// Backdating, so that small clock differences between hosts do not make
/// a fresh certificate "not yet valid".
const BACKDATE: Duration = Duration::from_secs(300);

pub const NOT_FOR_PRODUCTION: &str =
    "development CA: for trying Pilotfish and for tests, not for production (use SPIRE, cert-manager or step-ca)";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{0} already exists; refusing to overwrite a CA")]
    Exists(PathBuf),
}

fn write(path: &Path, data: &[u8], mode: u32) -> Result<(), CaError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(|e| CaError::Io(path.to_path_buf(), e))?;
    f.write_all(data)
        .map_err(|e| CaError::Io(path.to_path_buf(), e))
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|e| CaError::Io(path.to_path_buf(), e))
}

fn validity(params: &mut CertificateParams, valid_for: Duration) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + valid_for;
}

fn random_serial() -> SerialNumber {
    // 16 random bytes from the OS, first bit clear (a positive INTEGER).
    let mut bytes = [0u8; 16];
    let _ = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes));
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

/// Creates a CA in `dir` (`ca.pem`, `ca.key`).
pub fn init(dir: &Path) -> Result<PathBuf, CaError> {
    std::fs::create_dir_all(dir).map_err(|e| CaError::Io(dir.to_path_buf(), e))?;
    let cert_path = dir.join("ca.pem");
    if cert_path.exists() {
        return Err(CaError::Exists(cert_path));
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "Pilotfish development");
    name.push(
        DnType::CommonName,
        "Pilotfish development mesh CA (not for production)",
    );
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.serial_number = Some(random_serial());
    validity(&mut params, CA_VALIDITY);
    let cert = params.self_signed(&key)?;
    write(&dir.join("ca.key"), key.serialize_pem().as_bytes(), 0o600)?;
    write(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(cert_path)
}

/// Issues a workload certificate for `id` from the CA in `ca_dir` into
/// `out` (`cert.pem`, `key.pem`, `ca.pem`).
pub fn issue(
    ca_dir: &Path,
    id: &SpiffeId,
    out: &Path,
    valid_for: Duration,
) -> Result<PathBuf, CaError> {
    let ca_pem = read(&ca_dir.join("ca.pem"))?;
    let ca_key = KeyPair::from_pem(&read(&ca_dir.join("ca.key"))?)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "Pilotfish development");
    name.push(DnType::CommonName, id.as_str());
    params.distinguished_name = name;
    params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.serial_number = Some(random_serial());
    validity(&mut params, valid_for);
    let cert = params.signed_by(&key, &issuer)?;
    std::fs::create_dir_all(out).map_err(|e| CaError::Io(out.to_path_buf(), e))?;
    write(&out.join("key.pem"), key.serialize_pem().as_bytes(), 0o600)?;
    write(&out.join("cert.pem"), cert.pem().as_bytes(), 0o644)?;
    write(&out.join("ca.pem"), ca_pem.as_bytes(), 0o644)?;
    Ok(out.join("cert.pem"))
}
