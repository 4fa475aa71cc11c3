//! The mTLS parts of the config: the workload's files (`[tls]`), a
//! listener's `tls` and `authorize`, a route's `authorize`, a cluster's
//! `tls` (the identity its endpoints must prove).
//!
//! What must hold: nothing asks for TLS unless `[tls]` names the files;
//! an allow-list is accepted only where a client certificate is required
//! (without one there is no identity to authorize, and an allow-list that
//! silently let everyone in would be worse than none); every SPIFFE ID and
//! pattern is checked here, with the key that holds it.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::{duration::HumanDuration, ConfigError, Validator};
use crate::tls::identity::{Pattern, SpiffeId};

/// A caller's identity goes to the local app in this header unless the
/// listener names another; any copy the client sent is removed first.
pub const IDENTITY_HEADER_DEFAULT: &str = "x-pilotfish-peer-identity";
/// A handshake not finished in this long is abandoned (a peer that opens a
/// connection and sends nothing must not hold a slot for the idle timeout).
pub const HANDSHAKE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// How long a TLS session may be resumed after its full handshake: the
/// OpenSSL and nginx default. Bounded so a stolen ticket is worth little,
/// and a rotated certificate is presented on every connection soon.
pub const SESSION_LIFETIME_DEFAULT: Duration = Duration::from_secs(300);
/// Resumption longer than a day is refused (rustls announces stateful
/// tickets as valid for a day; more would be a lie to the client).
pub const SESSION_LIFETIME_MAX: Duration = Duration::from_secs(24 * 3600);
/// Federated trust domains: each is a bundle to read and a verifier per
/// worker; a mesh federates with a handful.
pub const FEDERATED_DOMAINS_MAX: usize = 16;
/// Entries in one allow-list: checked per request, linearly.
pub const AUTHORIZE_PATTERNS_MAX: usize = 64;

/// `[tls]`: this workload's certificate, key and trust bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TlsFiles {
    /// The certificate chain, leaf first (PEM).
    pub cert: PathBuf,
    /// The leaf's private key (PEM).
    pub key: PathBuf,
    /// The CA certificates peers must chain to (PEM).
    pub trust_bundle: PathBuf,
    /// Whether TLS 1.2 is offered besides 1.3.
    pub tls12: bool,
    #[serde(with = "super::humantime_serde_compat")]
    pub handshake_timeout: Duration,
    /// Zero: no resumption.
    #[serde(with = "super::humantime_serde_compat")]
    pub session_lifetime: Duration,
    /// The trust domain `trust_bundle` vouches for; the certificate must
    /// be in it. None: the certificate's own (the usual case).
    pub trust_domain: Option<String>,
    /// Federated trust domains and their bundles: callers and servers
    /// from these domains are accepted when they chain to that bundle.
    pub federation: Vec<(String, PathBuf)>,
}

/// A listener's `tls`: terminate TLS from peer sidecars.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListenerTls {
    /// Refuse handshakes without a client certificate (default true: an
    /// inbound sidecar listener exists to know who calls).
    pub require_client_cert: bool,
}

/// A cluster's `tls`: originate mTLS to its endpoints, which must prove
/// this identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterTls {
    pub server_identity: SpiffeId,
    /// The name sent in SNI (None: a fixed one; the server's identity is
    /// what is verified either way). A control plane sets it where the
    /// peer routes on it (Istio's `outbound_.8080_._.orders...`).
    pub sni: Option<String>,
}

pub(super) mod raw {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Files {
        pub cert: PathBuf,
        pub key: PathBuf,
        pub trust_bundle: PathBuf,
        pub min_version: Option<Spanned<String>>,
        pub handshake_timeout: Option<HumanDuration>,
        pub session_lifetime: Option<Spanned<HumanDuration>>,
        pub trust_domain: Option<Spanned<String>>,
        pub federates_with: Option<Spanned<std::collections::BTreeMap<String, PathBuf>>>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct ListenerTls {
        pub require_client_cert: Option<bool>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct ClusterTls {
        pub server_identity: Spanned<String>,
        pub sni: Option<Spanned<String>>,
    }
}

impl Validator<'_> {
    pub(super) fn tls_files(
        &self,
        raw: Option<&Spanned<raw::Files>>,
    ) -> Result<Option<TlsFiles>, ConfigError> {
        let Some(spanned) = raw else {
            return Ok(None);
        };
        let f = spanned.get_ref();
        let tls12 = match &f.min_version {
            None => false,
            Some(v) if v.get_ref() == "1.3" => false,
            Some(v) if v.get_ref() == "1.2" => true,
            Some(v) => {
                return Err(self.error(
                    v,
                    "tls.min_version".into(),
                    format!("expected \"1.2\" or \"1.3\", found {:?}", v.get_ref()),
                ))
            }
        };
        let session_lifetime = match &f.session_lifetime {
            None => SESSION_LIFETIME_DEFAULT,
            Some(d) if d.get_ref().0 <= SESSION_LIFETIME_MAX => d.get_ref().0,
            Some(d) => {
                return Err(self.error(
                    d,
                    "tls.session_lifetime".into(),
                    format!(
                        "must be at most {}",
                        humantime::format_duration(SESSION_LIFETIME_MAX)
                    ),
                ))
            }
        };
        for (name, path) in [
            ("cert", &f.cert),
            ("key", &f.key),
            ("trust_bundle", &f.trust_bundle),
        ] {
            if path.as_os_str().is_empty() {
                return Err(self.error(
                    spanned,
                    format!("tls.{name}"),
                    "must name a PEM file".into(),
                ));
            }
        }
        let domain = |d: &str, at: &dyn Fn() -> ConfigError| {
            SpiffeId::parse(&format!("spiffe://{d}/x"))
                .ok()
                .filter(|id| id.trust_domain() == d)
                .map(|_| d.to_string())
                .ok_or_else(at)
        };
        let trust_domain = match &f.trust_domain {
            None => None,
            Some(d) => Some(domain(d.get_ref(), &|| {
                self.error(
                    d,
                    "tls.trust_domain".into(),
                    "not a valid trust domain name".into(),
                )
            })?),
        };
        let mut federation = Vec::new();
        if let Some(map) = &f.federates_with {
            if map.get_ref().len() > FEDERATED_DOMAINS_MAX {
                return Err(self.error(
                    map,
                    "tls.federates_with".into(),
                    format!("at most {FEDERATED_DOMAINS_MAX} trust domains"),
                ));
            }
            for (d, bundle) in map.get_ref() {
                let d = domain(d, &|| {
                    self.error(
                        map,
                        format!("tls.federates_with.{d}"),
                        "not a valid trust domain name".into(),
                    )
                })?;
                federation.push((d, bundle.clone()));
            }
        }
        Ok(Some(TlsFiles {
            trust_domain,
            federation,
            cert: f.cert.clone(),
            key: f.key.clone(),
            trust_bundle: f.trust_bundle.clone(),
            tls12,
            handshake_timeout: f
                .handshake_timeout
                .map_or(HANDSHAKE_TIMEOUT_DEFAULT, |d| d.0),
            session_lifetime,
        }))
    }

    fn needs_files<T>(
        &self,
        files: Option<&TlsFiles>,
        at: &Spanned<T>,
        key: String,
    ) -> Result<(), ConfigError> {
        if files.is_none() {
            return Err(self.error(
                at,
                key,
                "needs a [tls] section naming this workload's cert, key and trust_bundle".into(),
            ));
        }
        Ok(())
    }

    pub(super) fn listener_tls(
        &self,
        files: Option<&TlsFiles>,
        raw: Option<&Spanned<raw::ListenerTls>>,
        key: String,
    ) -> Result<Option<ListenerTls>, ConfigError> {
        let Some(spanned) = raw else {
            return Ok(None);
        };
        self.needs_files(files, spanned, key)?;
        Ok(Some(ListenerTls {
            require_client_cert: spanned.get_ref().require_client_cert.unwrap_or(true),
        }))
    }

    pub(super) fn cluster_tls(
        &self,
        files: Option<&TlsFiles>,
        raw: Option<&Spanned<raw::ClusterTls>>,
        key: String,
    ) -> Result<Option<ClusterTls>, ConfigError> {
        let Some(spanned) = raw else {
            return Ok(None);
        };
        self.needs_files(files, spanned, key.clone())?;
        let id = &spanned.get_ref().server_identity;
        let server_identity = SpiffeId::parse(id.get_ref())
            .map_err(|e| self.error(id, format!("{key}.server_identity"), e.to_string()))?;
        let sni = match &spanned.get_ref().sni {
            None => None,
            Some(s) => {
                rustls::pki_types::ServerName::try_from(s.get_ref().as_str())
                    .ok()
                    .filter(|n| matches!(n, rustls::pki_types::ServerName::DnsName(_)))
                    .ok_or_else(|| {
                        self.error(
                            s,
                            format!("{key}.sni"),
                            format!("{:?} is not a DNS name", s.get_ref()),
                        )
                    })?;
                Some(s.get_ref().clone())
            }
        };
        Ok(Some(ClusterTls {
            server_identity,
            sni,
        }))
    }

    /// An allow-list, where `tls` says a client certificate is required.
    pub(super) fn authorize(
        &self,
        tls: Option<&ListenerTls>,
        raw: Option<&Spanned<Vec<Spanned<String>>>>,
        key: String,
    ) -> Result<Option<Vec<Pattern>>, ConfigError> {
        let Some(list) = raw else {
            return Ok(None);
        };
        if !tls.is_some_and(|t| t.require_client_cert) {
            return Err(self.error(
                list,
                key,
                "needs the listener's `tls = { require_client_cert = true }`: without a \
                 client certificate there is no identity to authorize"
                    .into(),
            ));
        }
        if list.get_ref().len() > AUTHORIZE_PATTERNS_MAX {
            return Err(self.error(
                list,
                key,
                format!(
                    "{} entries; the limit is {AUTHORIZE_PATTERNS_MAX}",
                    list.get_ref().len()
                ),
            ));
        }
        list.get_ref()
            .iter()
            .enumerate()
            .map(|(i, p)| {
                Pattern::parse(p.get_ref()).map_err(|e| {
                    self.error(
                        p,
                        format!("{key}[{i}]"),
                        format!("{e} (an exact SPIFFE ID, or one ending in /*)"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    const FILES: &str = "[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\ntrust_bundle = \"ca.pem\"\n";

    fn listener(extra: &str) -> String {
        format!(
            "[[listeners]]\nname = \"in\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ncluster = \"c\"\n{extra}\n[[clusters]]\nname = \"c\"\nendpoints = [\"127.0.0.1:1\"]\n"
        )
    }

    fn error(text: &str) -> String {
        Config::parse("t.toml", text).unwrap_err().to_string()
    }

    #[test]
    fn tls_keys_are_checked_with_their_position() {
        let e = error(&listener("tls = { require_client_cert = true }"));
        assert!(e.starts_with("t.toml:6:"), "{e}");
        assert!(e.contains("listeners[0].tls") && e.contains("[tls]"), "{e}");

        let e = error(&format!(
            "{FILES}{}",
            listener("authorize = [\"spiffe://td/a\"]")
        ));
        assert!(
            e.contains("listeners[0].authorize") && e.contains("require_client_cert"),
            "{e}"
        );

        let e = error(&format!(
            "{FILES}{}",
            listener("tls = { require_client_cert = false }\nauthorize = [\"spiffe://td/a\"]")
        ));
        assert!(e.contains("require_client_cert"), "{e}");

        let e = error(&format!(
            "{FILES}{}",
            listener("tls = {}\nauthorize = [\"spiffe://td/a\", \"https://td/b\"]")
        ));
        assert!(e.contains("listeners[0].authorize[1]"), "{e}");

        let text = format!(
            "{FILES}{}tls = {{ server_identity = \"spiffe://td/ns/x/\" }}\n",
            listener("")
        );
        let e = error(&text);
        assert!(e.contains("clusters[0].tls.server_identity"), "{e}");

        let e = error(&format!("{FILES}min_version = \"1.1\"\n{}", listener("")));
        assert!(e.contains("tls.min_version"), "{e}");

        let ok = Config::parse(
            "t.toml",
            &format!(
                "{FILES}{}",
                listener("tls = {}\nauthorize = [\"spiffe://td/a\", \"spiffe://td/ns/*\"]")
            ),
        )
        .unwrap();
        let l = &ok.listeners[0];
        assert!(
            l.tls.as_ref().unwrap().require_client_cert,
            "required by default"
        );
        assert_eq!(l.authorize.as_ref().unwrap().len(), 2);
    }
}
