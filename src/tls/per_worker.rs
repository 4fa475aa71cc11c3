//! One worker's TLS: the rustls configs built from the current workload
//! material, made on first use and replaced whole when the material
//! rotates.
//!
//! What must hold: each worker builds its own configs (and so its own
//! session caches): no lock is shared between cores, and a rotation
//! starts every cache afresh, so no session outlives the material (and the
//! trust bundle) it was made under. Handshakes already running finish on
//! the configs they started with; the next one uses the new material.

use std::{cell::RefCell, rc::Rc, sync::Arc, time::Duration};

use monoio::net::TcpStream;
use rustls::{crypto::CryptoProvider, ClientConfig, ServerConfig};

use super::{
    counters::{Side, TlsCounters},
    identity::SpiffeId,
    material::Workload,
    stream::{self, Peer, Stream},
};
use crate::config::tls::{ClusterTls, ListenerTls};

/// ALPN that HTTP listeners offer: both versions, h2 preferred (a
/// listener serves either on the same port).
const ALPN_HTTP_SERVER: &[&[u8]] = &[b"h2", b"http/1.1"];

/// What a TLS client offers in ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// Nothing (L4: the bytes are the application's).
    None,
    Http1,
    H2,
    /// `h2` then `http/1.1`: the server picks (cluster `protocol = "auto"`).
    Both,
}

impl Alpn {
    fn protocols(self) -> &'static [&'static [u8]] {
        match self {
            Alpn::None => &[],
            Alpn::Http1 => &[b"http/1.1"],
            Alpn::H2 => &[b"h2"],
            Alpn::Both => ALPN_HTTP_SERVER,
        }
    }
}

/// A worker's TLS state, shared by all its config generations.
#[derive(Debug)]
pub struct WorkerTls {
    provider: Arc<CryptoProvider>,
    current: RefCell<Option<Rc<Built>>>,
}

/// Built configs, found by a small key (a handful per worker).
type Cache<K, C> = RefCell<Vec<(K, Arc<C>)>>;

/// Configs built from one workload, per use.
#[derive(Debug)]
struct Built {
    workload: Arc<Workload>,
    /// Keyed by (require_client_cert, http).
    servers: Cache<(bool, bool), ServerConfig>,
    /// Keyed by (expected identity, ALPN offered).
    clients: Cache<(SpiffeId, Alpn), ClientConfig>,
}

/// What a handshake needs: the rustls config and the deadline.
pub struct Use<C> {
    pub config: Arc<C>,
    pub timeout: Duration,
}

impl WorkerTls {
    pub fn new(workload: Option<Arc<Workload>>) -> Self {
        let tls = Self {
            provider: super::material::provider(),
            current: RefCell::new(None),
        };
        tls.install(workload);
        tls
    }

    /// Uses `workload` for every handshake from now on.
    pub fn install(&self, workload: Option<Arc<Workload>>) {
        let built = workload.map(|workload| {
            Rc::new(Built {
                workload,
                servers: RefCell::default(),
                clients: RefCell::default(),
            })
        });
        *self.current.borrow_mut() = built;
    }

    fn built(&self) -> Result<Rc<Built>, String> {
        self.current
            .borrow()
            .clone()
            .ok_or_else(|| "no [tls] material is loaded".to_string())
    }

    /// The config for an inbound listener.
    pub fn server(
        &self,
        require_client_cert: bool,
        http: bool,
    ) -> Result<Use<ServerConfig>, String> {
        let built = self.built()?;
        let files = &built.workload.files;
        let config = cached(&built.servers, (require_client_cert, http), || {
            built.workload.material.server_config(
                &self.provider,
                require_client_cert,
                files.tls12,
                if http { ALPN_HTTP_SERVER } else { &[] },
            )
        })?;
        Ok(Use {
            config,
            timeout: files.handshake_timeout,
        })
    }

    /// The config for connecting to endpoints that must be `expected`.
    pub fn client(&self, expected: &SpiffeId, alpn: Alpn) -> Result<Use<ClientConfig>, String> {
        let built = self.built()?;
        let files = &built.workload.files;
        let config = cached(&built.clients, (expected.clone(), alpn), || {
            built.workload.material.client_config(
                &self.provider,
                expected.clone(),
                files.tls12,
                alpn.protocols(),
            )
        })?;
        Ok(Use {
            config,
            timeout: files.handshake_timeout,
        })
    }
}

/// The config under `key`, built by `build` the first time.
fn cached<K: PartialEq, C>(
    cache: &Cache<K, C>,
    key: K,
    build: impl FnOnce() -> Result<Arc<C>, super::material::MaterialError>,
) -> Result<Arc<C>, String> {
    if let Some((_, c)) = cache.borrow().iter().find(|(k, _)| *k == key) {
        return Ok(Arc::clone(c));
    }
    let config = build().map_err(|e| e.to_string())?;
    cache.borrow_mut().push((key, Arc::clone(&config)));
    Ok(config)
}

impl WorkerTls {
    /// Terminates TLS on an accepted connection for a listener with
    /// `tls`; counts the handshake or its failure (logged with the reason).
    /// None: the connection is done (the handshake failed).
    pub async fn accept(
        &self,
        counters: &TlsCounters,
        settings: &ListenerTls,
        http: bool,
        tcp: TcpStream,
        listener: &str,
        conn_id: u64,
    ) -> Option<(Stream, Peer)> {
        let server = match self.server(settings.require_client_cert, http) {
            Ok(s) => s,
            Err(e) => {
                counters.failure(Side::Inbound, "no_material");
                tracing::warn!(conn_id, listener, error = %e, "cannot terminate TLS");
                return None;
            }
        };
        match stream::accept(tcp, server.config, server.timeout).await {
            Ok((stream, peer)) => {
                counters.handshake(Side::Inbound, peer.resumed);
                Some((stream, peer))
            }
            Err(e) => {
                counters.failure(Side::Inbound, e.reason());
                // A refused certificate is worth an operator's eye; peers
                // that hang up or time out (scanners, probes) are counted
                // and logged at debug only, so they cannot flood the log.
                if matches!(e, stream::HandshakeError::Tls(_)) {
                    tracing::info!(conn_id, listener, reason = e.reason(), error = %e, "inbound TLS handshake refused");
                } else {
                    tracing::debug!(conn_id, listener, reason = e.reason(), error = %e, "inbound TLS handshake failed");
                }
                None
            }
        }
    }

    /// Originates TLS to an endpoint of a cluster with `tls`; counts the
    /// handshake or its failure. Ok((stream, whether the server chose h2)).
    pub async fn connect(
        &self,
        counters: &TlsCounters,
        settings: &ClusterTls,
        alpn: Alpn,
        tcp: TcpStream,
        timeout_cap: Duration,
    ) -> Result<(Stream, bool), String> {
        let client = self
            .client(&settings.server_identity, alpn)
            .inspect_err(|_| {
                counters.failure(Side::Outbound, "no_material");
            })?;
        // Checked by the config's validation, so the fallback never runs.
        let sni = settings
            .sni
            .as_deref()
            .and_then(|s| rustls::pki_types::ServerName::try_from(s.to_string()).ok())
            .unwrap_or_else(super::material::sni);
        match stream::connect(tcp, client.config, sni, client.timeout.min(timeout_cap)).await {
            Ok((stream, resumed, h2)) => {
                counters.handshake(Side::Outbound, resumed);
                Ok((stream, h2))
            }
            Err(e) => {
                counters.failure(Side::Outbound, e.reason());
                Err(format!(
                    "TLS handshake with {} failed ({}): {e}",
                    settings.server_identity,
                    e.reason()
                ))
            }
        }
    }
}
