//! The `[xds]` table: where the control plane is and who this node is.
//!
//! What must hold: a config with only `workers` and `[xds]` is a complete
//! bootstrap (the listeners and clusters come from the management server);
//! `server` is `host:port`; `node_id` is not empty; every subscribed type
//! is one the client knows. Changing `[xds]` takes a restart: the stream's
//! identity is the node's.

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::{ConfigError, Validator};

/// What the ADS stream asks for. Endpoints come with clusters, routes with
/// listeners: subscribing to one without the other is allowed (a static
/// listener can route to dynamic clusters), but an EDS cluster without
/// `endpoints` never gets any. Secrets (SDS) are the workload certificate
/// and trust bundle, in place of `[tls]`'s files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResourceType {
    Listeners,
    Routes,
    Clusters,
    Endpoints,
    Secrets,
}

impl ResourceType {
    pub const ALL: [ResourceType; 4] = [
        ResourceType::Clusters,
        ResourceType::Endpoints,
        ResourceType::Listeners,
        ResourceType::Routes,
    ];
}

/// The SDS secret names Istio's agent serves: the workload's certificate,
/// and the mesh's trust bundle.
pub const CERTIFICATE_SECRET_DEFAULT: &str = "default";
pub const TRUST_BUNDLE_SECRET_DEFAULT: &str = "ROOTCA";

/// The control-plane bootstrap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Xds {
    /// The management server, `host:port` (plaintext gRPC: for a
    /// management server on the node or in development).
    pub server: String,
    /// This node's id, as the management server knows it (Istio:
    /// `sidecar~10.0.0.1~pod.namespace~namespace.svc.cluster.local`).
    pub node_id: String,
    /// The node's cluster (the service it fronts).
    pub cluster: String,
    /// The resource types subscribed to.
    pub resources: Vec<ResourceType>,
    /// The incremental (delta) protocol instead of state of the world:
    /// the server sends what changed, not every resource of a type.
    pub delta: bool,
    /// The SDS secret holding this workload's certificate and key, and
    /// the one holding the trust bundle (Istio's names by default).
    pub certificate_secret: String,
    pub trust_bundle_secret: String,
    /// Mutual TLS to the management server with the sidecar's own
    /// identity (`[tls]`); None: plaintext (a server on the node, or
    /// development).
    pub tls: Option<XdsTls>,
}

/// `[xds] tls`: the sidecar's certificate, key and trust bundle (from
/// `[tls]`, read again at every connect so rotation is picked up), and the
/// DNS name the management server's certificate must carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct XdsTls {
    pub server_name: String,
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub trust_bundle: std::path::PathBuf,
}

pub(super) mod raw {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Xds {
        pub server: Spanned<String>,
        pub node_id: Spanned<String>,
        pub cluster: Option<Spanned<String>>,
        pub resources: Option<Spanned<Vec<ResourceType>>>,
        pub delta: Option<bool>,
        pub certificate_secret: Option<Spanned<String>>,
        pub trust_bundle_secret: Option<Spanned<String>>,
        pub tls: Option<Spanned<Tls>>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Tls {
        pub server_name: Spanned<String>,
    }
}

impl Validator<'_> {
    pub(super) fn xds(
        &self,
        raw: Option<&Spanned<raw::Xds>>,
        files: Option<&super::tls::TlsFiles>,
    ) -> Result<Option<Xds>, ConfigError> {
        let Some(x) = raw.map(Spanned::get_ref) else {
            return Ok(None);
        };
        let server = x.server.get_ref();
        let port_ok = server.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !port_ok || server.contains("://") {
            return Err(self.error(
                &x.server,
                "xds.server".into(),
                format!("expected host:port of an ADS management server, found {server:?}"),
            ));
        }
        let printable = |s: &str| !s.is_empty() && !s.bytes().any(|b| b.is_ascii_control());
        if !printable(x.node_id.get_ref()) {
            return Err(self.error(
                &x.node_id,
                "xds.node_id".into(),
                "must be a non-empty string without control characters".into(),
            ));
        }
        let cluster = match &x.cluster {
            None => String::new(),
            Some(c) if c.get_ref().bytes().any(|b| b.is_ascii_control()) => {
                return Err(self.error(
                    c,
                    "xds.cluster".into(),
                    "must not contain control characters".into(),
                ))
            }
            Some(c) => c.get_ref().clone(),
        };
        // Secrets replace [tls]'s files, trust bundle included, so they are
        // taken only where there is a [tls] to replace and only from a
        // management server that proved who it is (`xds.tls`): in a pod
        // every process shares loopback, and whoever answered a plaintext
        // stream could make the sidecar trust a CA of its own.
        let secrets_ok = files.is_some() && x.tls.is_some();
        let resources = match &x.resources {
            None if secrets_ok => {
                let mut all = ResourceType::ALL.to_vec();
                all.push(ResourceType::Secrets);
                all
            }
            None => ResourceType::ALL.to_vec(),
            Some(r) if r.get_ref().is_empty() => {
                return Err(self.error(
                    r,
                    "xds.resources".into(),
                    "subscribes to nothing: leave it out for every type".into(),
                ))
            }
            Some(r) => {
                let mut v = r.get_ref().clone();
                v.sort();
                v.dedup();
                if v.contains(&ResourceType::Secrets) && files.is_none() {
                    return Err(self.error(
                        r,
                        "xds.resources".into(),
                        "\"secrets\" replace [tls]'s certificate and trust bundle: add a [tls] table (its files are the bootstrap material, used until the first push)".into(),
                    ));
                }
                if v.contains(&ResourceType::Secrets) && x.tls.is_none() {
                    return Err(self.error(
                        r,
                        "xds.resources".into(),
                        "\"secrets\" need an authenticated management server: set xds.tls (over plaintext, any process that can take the server's address could replace the trust bundle)".into(),
                    ));
                }
                v
            }
        };
        let secret_name = |raw: &Option<Spanned<String>>, key: &str, default: &str| match raw {
            None => Ok(default.to_string()),
            Some(n) if printable(n.get_ref()) => Ok(n.get_ref().clone()),
            Some(n) => Err(self.error(
                n,
                format!("xds.{key}"),
                "must be a non-empty string without control characters".into(),
            )),
        };
        let certificate_secret = secret_name(
            &x.certificate_secret,
            "certificate_secret",
            CERTIFICATE_SECRET_DEFAULT,
        )?;
        let trust_bundle_secret = secret_name(
            &x.trust_bundle_secret,
            "trust_bundle_secret",
            TRUST_BUNDLE_SECRET_DEFAULT,
        )?;
        if certificate_secret == trust_bundle_secret {
            return Err(self.error(
                x.trust_bundle_secret
                    .as_ref()
                    .or(x.certificate_secret.as_ref())
                    .unwrap_or(&x.server),
                "xds.trust_bundle_secret".into(),
                "names the same secret as xds.certificate_secret".into(),
            ));
        }
        let tls = match (&x.tls, files) {
            (None, _) => None,
            (Some(t), None) => {
                return Err(self.error(
                    t,
                    "xds.tls".into(),
                    "uses the sidecar's identity: add a [tls] table (cert, key, trust_bundle)"
                        .into(),
                ))
            }
            (Some(t), Some(f)) => {
                let name = t.get_ref().server_name.get_ref();
                if !crate::dns::valid_name(name) {
                    return Err(self.error(
                        &t.get_ref().server_name,
                        "xds.tls.server_name".into(),
                        format!("expected the DNS name in the management server's certificate, found {name:?}"),
                    ));
                }
                Some(XdsTls {
                    server_name: name.clone(),
                    cert: f.cert.clone(),
                    key: f.key.clone(),
                    trust_bundle: f.trust_bundle.clone(),
                })
            }
        };
        Ok(Some(Xds {
            tls,
            server: server.clone(),
            node_id: x.node_id.get_ref().clone(),
            cluster,
            resources,
            delta: x.delta.unwrap_or(false),
            certificate_secret,
            trust_bundle_secret,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const BOOT: &str = "workers = 1\n[xds]\nserver = \"127.0.0.1:15010\"\nnode_id = \"n\"\n";
    const TLS: &str = "[tls]\ncert = \"/c.pem\"\nkey = \"/k.pem\"\ntrust_bundle = \"/ca.pem\"\n";

    /// `tls = { server_name }` inside [xds].
    const XDS_TLS: &str = "tls = { server_name = \"istiod.mesh.local\" }\n";

    #[test]
    fn secrets_are_asked_for_where_there_is_a_tls_table_and_an_authenticated_server() {
        let plain = Config::parse("a.toml", BOOT).unwrap().xds.unwrap();
        assert_eq!(plain.resources, ResourceType::ALL);
        // [tls], but a plaintext stream: no secrets by default.
        let unauthenticated = Config::parse("a.toml", &format!("{BOOT}{TLS}"))
            .unwrap()
            .xds
            .unwrap();
        assert_eq!(unauthenticated.resources, ResourceType::ALL);
        let with_tls = Config::parse("a.toml", &format!("{BOOT}{XDS_TLS}{TLS}"))
            .unwrap()
            .xds
            .unwrap();
        assert!(with_tls.resources.contains(&ResourceType::Secrets));
        assert_eq!(
            (
                with_tls.certificate_secret.as_str(),
                with_tls.trust_bundle_secret.as_str()
            ),
            ("default", "ROOTCA")
        );
    }

    #[test]
    fn secrets_without_tls_or_with_one_name_for_both_are_refused() {
        let e = Config::parse("a.toml", &format!("{BOOT}resources = [\"secrets\"]\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("xds.resources") && e.contains("[tls]"), "{e}");
        let e = Config::parse("a.toml", &format!("{BOOT}resources = [\"secrets\"]\n{TLS}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("xds.resources") && e.contains("xds.tls"), "{e}");
        let e = Config::parse(
            "a.toml",
            &format!(
                "{BOOT}certificate_secret = \"x\"\ntrust_bundle_secret = \"x\"\n{XDS_TLS}{TLS}"
            ),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("xds.trust_bundle_secret"), "{e}");
        let e = Config::parse(
            "a.toml",
            &format!("{BOOT}certificate_secret = \"\"\n{XDS_TLS}{TLS}"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("xds.certificate_secret"), "{e}");
    }
}
