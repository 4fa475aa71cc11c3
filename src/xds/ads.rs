//! The ADS stream (state of the world): subscribe, apply, ACK or NACK,
//! reconnect.
//!
//! What must hold: one stream at a time to the management server; CDS and
//! LDS are wildcard subscriptions, EDS and RDS name exactly what the
//! accepted clusters and listeners wait for, SDS the two secrets `[xds]`
//! names (the workload certificate and the trust bundle); a response is ACKed (its
//! version and nonce echoed) only after the config it makes is running on
//! every worker, and NACKed (the last accepted version, its nonce, and an
//! `error_detail` naming the resource and field) otherwise; state survives
//! a reconnect, and the first requests on a new stream carry the versions
//! already held, so a server may answer with nothing new. Responses of one
//! type that queue up while a swap runs are coalesced: only the newest is
//! applied (its predecessors are superseded, as SotW allows). Reconnects
//! back off exponentially with full jitter, and the last good config
//! serves for as long as the server stays away.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use envoy_types::pb::{
    envoy::{
        config::{
            cluster::v3::Cluster, core::v3::Node, endpoint::v3::ClusterLoadAssignment,
            listener::v3::Listener, route::v3::RouteConfiguration,
        },
        extensions::transport_sockets::tls::v3::Secret,
        service::discovery::v3::{
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
            DiscoveryRequest, DiscoveryResponse,
        },
    },
    google::rpc,
};
use futures_util::FutureExt;
use prost::Message;
use toml::Value;

use super::{
    translate::{self, ClusterOut, ListenerOut, Refusal, SecretNames, SecretOut},
    Status,
};
use crate::{
    config::{
        compose::Dynamic,
        xds::{ResourceType, Xds},
    },
    control::Controller,
    tls::material::{Part, Pushed},
};

pub const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const SDS: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// The largest response decoded: 1,000 clusters of 10 endpoints are about
/// 1 MiB; past this a server is broken or hostile, and the stream fails.
const RESPONSE_BYTES_MAX: usize = 16 << 20;
/// Resources in one response (the config's own caps are lower per type).
pub(super) const RESOURCES_PER_RESPONSE_MAX: usize = 10_000;
/// Requests waiting for the stream: at most one per type is ever useful.
pub(super) const OUTBOUND_QUEUE: usize = 16;
/// Responses taken together when they arrived during a swap.
pub(super) const COALESCE_MAX: usize = 64;
/// Reconnect back-off: the first wait, and the longest.
const BACKOFF_BASE: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Connecting to the management server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The running client; dropping it closes the stream and ends the thread.
#[derive(Debug)]
pub struct Client {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Client {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts the client on a thread of its own.
pub fn spawn(config: Xds, controller: Arc<Controller>) -> std::io::Result<Client> {
    let status = controller.xds_status();
    status.configure(&config.server);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("pilotfish-xds".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "xds: cannot start the control thread's runtime");
                    return;
                }
            };
            rt.block_on(async move {
                tokio::select! {
                    () = run(config, controller, Arc::clone(&status)) => {}
                    _ = stopped => status.connected(false, None),
                }
            });
        })?;
    Ok(Client {
        stop: Some(stop),
        thread: Some(thread),
    })
}

/// A type this client knows, as its constant.
pub(super) fn known(type_url: &str) -> Option<&'static str> {
    [CDS, EDS, LDS, RDS, SDS]
        .into_iter()
        .find(|u| *u == type_url)
}

pub(super) fn kind_name(type_url: &str) -> &'static str {
    match type_url {
        CDS => "clusters",
        EDS => "endpoints",
        LDS => "listeners",
        RDS => "routes",
        SDS => "secrets",
        _ => "unknown",
    }
}

/// What one type's subscription has said and been told.
#[derive(Debug, Default, Clone)]
pub(super) struct Sub {
    pub(super) version: String,
    pub(super) nonce: String,
    pub(super) names: BTreeSet<String>,
}

/// Everything accepted so far, by resource name. Translations are shared
/// (`Arc`): a candidate state is a copy of the accepted one with a few
/// entries replaced, and an entry that was not replaced is the same
/// allocation in both, so copying and comparing them is cheap.
#[derive(Debug, Default, Clone)]
pub(super) struct State {
    clusters: BTreeMap<String, Arc<ClusterOut>>,
    endpoints: BTreeMap<String, Arc<Vec<Value>>>,
    listeners: BTreeMap<String, Arc<ListenerOut>>,
    routes: BTreeMap<String, Arc<Vec<Value>>>,
    /// What each held resource's encoding hashed to, by type and name,
    /// and the reverse: a state-of-the-world response resends every
    /// resource, and one whose bytes did not change is neither decoded
    /// nor translated again. Keyed with this process's random SipHash key,
    /// so a server cannot make two resources collide on purpose.
    digests: Digests,
    secrets: BTreeMap<String, SecretOut>,
    /// The certificate's and the trust bundle's secret names (`[xds]`).
    pub(super) secret_names: SecretNames,
    pub(super) subs: BTreeMap<&'static str, Sub>,
    /// Delta only: each resource's version, by type and name (sent back
    /// as `initial_resource_versions` when a stream resumes).
    pub(super) versions: BTreeMap<&'static str, BTreeMap<String, String>>,
}

impl State {
    /// The config layer this state makes. An EDS cluster whose endpoints
    /// have not arrived has none (it answers 503); a listener whose routes
    /// have not arrived is left out until they do (Envoy's warming).
    pub(super) fn dynamic(&self) -> Dynamic {
        let clusters = self
            .clusters
            .values()
            .map(|c| {
                let mut t = c.table.clone();
                if let Some(eds) = &c.eds_name {
                    let list = self
                        .endpoints
                        .get(eds)
                        .map(|l| l.as_ref().clone())
                        .unwrap_or_default();
                    t.insert("endpoints".into(), Value::Array(list));
                }
                t
            })
            .collect();
        let listeners = self
            .listeners
            .values()
            .filter_map(|l| {
                let mut t = l.table.clone();
                if let Some(rds) = &l.rds_name {
                    let list = self.routes.get(rds)?.as_ref().clone();
                    t.insert("routes".into(), Value::Array(list));
                }
                Some(t)
            })
            .collect();
        Dynamic {
            listeners,
            clusters,
        }
    }

    /// Puts `self` (a candidate grown from `before`) into effect. When only
    /// endpoints changed (an EDS push: the usual churn), the running config
    /// is copied with those clusters' endpoints replaced, skipping the
    /// compose and parse of every resource; otherwise the whole layer is
    /// composed and validated.
    pub(super) fn put_into_effect(
        &mut self,
        before: &State,
        controller: &Controller,
    ) -> Result<(), String> {
        self.drop_unwanted();
        let config_same = same(&self.clusters, &before.clusters)
            && same(&self.listeners, &before.listeners)
            && same(&self.routes, &before.routes)
            && same(&self.endpoints, &before.endpoints);
        if self.secrets != before.secrets {
            // Before any config change it came with: a cluster pushed with
            // the identity of a new trust domain needs the new bundle.
            let pushed = self.pushed()?;
            let serial = controller.push_tls(pushed).map_err(|e| e.to_string())?;
            tracing::info!(%serial, "xds: pushed TLS material in use");
            if config_same {
                return Ok(());
            }
        }
        let only_endpoints = same(&self.clusters, &before.clusters)
            && same(&self.listeners, &before.listeners)
            && same(&self.routes, &before.routes);
        if only_endpoints {
            let mut changed = BTreeMap::new();
            for c in self.clusters.values() {
                let Some(eds) = &c.eds_name else { continue };
                let (new, old) = (self.endpoints.get(eds), before.endpoints.get(eds));
                let unchanged = match (new, old) {
                    (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
                    (a, b) => a.is_none() && b.is_none(),
                };
                if unchanged {
                    continue;
                }
                let parsed: Option<Vec<std::net::SocketAddr>> = new
                    .into_iter()
                    .flat_map(|l| l.iter())
                    .map(|v| v.as_str()?.parse().ok())
                    .collect();
                let name = c.table.get("name").and_then(Value::as_str);
                match (name, parsed) {
                    (Some(name), Some(list)) => {
                        changed.insert(name.to_string(), list);
                    }
                    _ => return self.put_whole(controller),
                }
            }
            return controller
                .apply_endpoints(self.dynamic(), &changed)
                .map(drop)
                .map_err(|e| e.to_string());
        }
        self.put_whole(controller)
    }

    /// The material the secrets held make, checked against the names
    /// `[xds]` gave them.
    fn pushed(&self) -> Result<Pushed, String> {
        let SecretNames {
            certificate: cert_name,
            trust_bundle: bundle_name,
        } = &self.secret_names;
        let part = |name: &str, field: &str, pem: &[u8]| Part {
            pem: pem.to_vec(),
            from: format!("Secret {name:?} {field}"),
        };
        let mut pushed = Pushed::default();
        match self.secrets.get(cert_name) {
            None => {}
            Some(SecretOut::Certificate { chain, key }) => {
                pushed.certificate = Some((
                    part(cert_name, "tls_certificate.certificate_chain", chain),
                    part(cert_name, "tls_certificate.private_key", key),
                ));
            }
            Some(SecretOut::TrustBundle(_)) => {
                return Err(format!(
                    "Secret {cert_name:?}: validation_context: xds.certificate_secret names this secret, so it must hold a tls_certificate"
                ))
            }
        }
        match self.secrets.get(bundle_name) {
            None => {}
            Some(SecretOut::TrustBundle(pem)) => {
                pushed.trust_bundle = Some(part(bundle_name, "validation_context.trusted_ca", pem));
            }
            Some(SecretOut::Certificate { .. }) => {
                return Err(format!(
                    "Secret {bundle_name:?}: tls_certificate: xds.trust_bundle_secret names this secret, so it must hold a validation_context"
                ))
            }
        }
        Ok(pushed)
    }

    fn put_whole(&self, controller: &Controller) -> Result<(), String> {
        controller
            .apply_dynamic(self.dynamic())
            .map(drop)
            .map_err(|e| e.to_string())
    }

    /// Drops endpoints and routes no accepted cluster or listener waits
    /// for (and their delta versions). A server may send names never
    /// asked for; kept, they would pile up without bound, since only the
    /// clusters and listeners are capped by the config's validation.
    pub(super) fn drop_unwanted(&mut self) {
        let (eds, rds) = (self.wanted_eds(), self.wanted_rds());
        self.endpoints.retain(|k, _| eds.contains(k));
        self.routes.retain(|k, _| rds.contains(k));
        let sds = self.wanted_sds();
        self.secrets.retain(|k, _| sds.contains(k));
        let mut digests = std::mem::take(&mut self.digests);
        digests
            .by_name
            .retain(|(url, name), _| self.holds(url, name));
        digests
            .by_digest
            .retain(|(url, _), name| self.holds(url, name));
        self.digests = digests;
        for (url, keep) in [(EDS, &eds), (RDS, &rds), (SDS, &sds)] {
            if let Some(v) = self.versions.get_mut(url) {
                v.retain(|k, _| keep.contains(k));
            }
        }
    }

    /// Whether a translated resource of this type and name is held (the
    /// types whose translations are kept by digest).
    fn holds(&self, url: &str, name: &str) -> bool {
        match url {
            CDS => self.clusters.contains_key(name),
            EDS => self.endpoints.contains_key(name),
            LDS => self.listeners.contains_key(name),
            RDS => self.routes.contains_key(name),
            _ => false,
        }
    }

    pub(super) fn wanted_eds(&self) -> BTreeSet<String> {
        self.clusters
            .values()
            .filter_map(|c| c.eds_name.clone())
            .collect()
    }

    pub(super) fn wanted_sds(&self) -> BTreeSet<String> {
        let n = &self.secret_names;
        [n.certificate.clone(), n.trust_bundle.clone()].into()
    }

    pub(super) fn wanted_rds(&self) -> BTreeSet<String> {
        self.listeners
            .values()
            .filter_map(|l| l.rds_name.clone())
            .collect()
    }
}

async fn run(config: Xds, controller: Arc<Controller>, status: Arc<Status>) {
    let mut state = State {
        secret_names: SecretNames::of(&config),
        ..State::default()
    };
    let mut failures: u32 = 0;
    let mut rng = Jitter::seeded();
    loop {
        let ran = if config.delta {
            super::delta::session(&config, &controller, &status, &mut state).await
        } else {
            session(&config, &controller, &status, &mut state).await
        };
        match ran {
            Ok(got_any) | Err((got_any, _)) if got_any => failures = 0,
            _ => {}
        }
        failures = failures.saturating_add(1);
        let cap = BACKOFF_BASE
            .saturating_mul(1u32 << failures.min(8))
            .min(BACKOFF_MAX);
        let wait = rng.below(cap);
        tracing::info!(server = %config.server, ?wait, "xds: reconnecting");
        tokio::time::sleep(wait).await;
    }
}

/// The next response and whatever else has arrived meanwhile (at most
/// [`COALESCE_MAX`] more), for the caller to take together.
pub(super) async fn next_batch<T>(
    inbound: &mut tonic::codec::Streaming<T>,
) -> Result<Vec<T>, String> {
    let first = match inbound.message().await {
        Ok(Some(r)) => r,
        Ok(None) => return Err("the server closed the stream".into()),
        Err(e) => return Err(format!("stream: {e}")),
    };
    let mut batch = vec![first];
    for _ in 0..COALESCE_MAX {
        match inbound.message().now_or_never() {
            Some(Ok(Some(r))) => batch.push(r),
            Some(Ok(None)) | Some(Err(_)) | None => break,
        }
    }
    Ok(batch)
}

/// A stream that failed: logged, shown, and whether it had worked.
pub(super) fn failed(config: &Xds, status: &Status, got: bool, what: String) -> (bool, ()) {
    tracing::warn!(server = %config.server, error = %what, "xds: stream failed");
    status.connected(false, Some(what));
    (got, ())
}

/// A client on a new connection to the management server.
pub(super) async fn connect(
    config: &Xds,
) -> Result<AggregatedDiscoveryServiceClient<tonic::transport::Channel>, String> {
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let mut endpoint =
        tonic::transport::Endpoint::from_shared(format!("{scheme}://{}", config.server))
            .map_err(|e| format!("bad server address: {e}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
    if let Some(tls) = &config.tls {
        // Read at every connect: a rotated certificate is used from the
        // next stream on.
        let read =
            |p: &std::path::Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
        let (cert, key, bundle) = (read(&tls.cert)?, read(&tls.key)?, read(&tls.trust_bundle)?);
        let tls_config = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(bundle))
            .identity(tonic::transport::Identity::from_pem(cert, key))
            .domain_name(tls.server_name.clone());
        endpoint = endpoint
            .tls_config(tls_config)
            .map_err(|e| format!("TLS: {e}"))?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    Ok(
        AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(RESPONSE_BYTES_MAX),
    )
}

/// Who this sidecar is, in every first request.
pub(super) fn node(config: &Xds) -> Node {
    Node {
        id: config.node_id.clone(),
        cluster: config.cluster.clone(),
        user_agent_name: "pilotfish".into(),
        user_agent_version_type: Some(
            envoy_types::pb::envoy::config::core::v3::node::UserAgentVersionType::UserAgentVersion(
                env!("CARGO_PKG_VERSION").into(),
            ),
        ),
        ..Node::default()
    }
}

/// One stream, until it ends. The bool: whether any response arrived (a
/// stream that worked resets the back-off).
async fn session(
    config: &Xds,
    controller: &Controller,
    status: &Status,
    state: &mut State,
) -> Result<bool, (bool, ())> {
    let fail = |got: bool, what: String| failed(config, status, got, what);
    let mut client = connect(config).await.map_err(|e| fail(false, e))?;
    let (tx, rx) = tokio::sync::mpsc::channel(OUTBOUND_QUEUE);
    let node = node(config);
    // The first requests: wildcards, and the names already waited for,
    // with the versions held (a reconnect resumes).
    let subscribed = |t: ResourceType| config.resources.contains(&t);
    let mut first = Vec::new();
    if subscribed(ResourceType::Clusters) {
        first.push((CDS, BTreeSet::new()));
    }
    if subscribed(ResourceType::Endpoints) && !state.wanted_eds().is_empty() {
        first.push((EDS, state.wanted_eds()));
    }
    if subscribed(ResourceType::Listeners) {
        first.push((LDS, BTreeSet::new()));
    }
    if subscribed(ResourceType::Routes) && !state.wanted_rds().is_empty() {
        first.push((RDS, state.wanted_rds()));
    }
    if subscribed(ResourceType::Secrets) {
        first.push((SDS, state.wanted_sds()));
    }
    for (type_url, names) in first {
        let sub = state.subs.entry(type_url).or_default();
        sub.nonce.clear();
        sub.names = names;
        let req = request(&node, type_url, sub, None);
        let _ = tx.send(req).await;
    }
    let mut inbound = client
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(|e| fail(false, format!("stream: {e}")))?
        .into_inner();
    status.connected(true, None);
    tracing::info!(server = %config.server, node = %config.node_id, "xds: stream open");
    let mut got_any = false;
    loop {
        let batch = next_batch(&mut inbound)
            .await
            .map_err(|e| fail(got_any, e))?;
        got_any = true;
        // Of what arrived together, the newest of each type.
        let mut newest: BTreeMap<&'static str, DiscoveryResponse> = BTreeMap::new();
        let mut take = |r: DiscoveryResponse| {
            newest.insert(known(&r.type_url).unwrap_or(""), r);
        };
        batch.into_iter().for_each(&mut take);
        // Clusters before endpoints before listeners before routes: what a
        // later type names is then already there. (Secrets sort last: a
        // cluster expecting a new trust domain's identity is refused until
        // the bundle arrives, then pushed again by a server that retries.)
        for (key, resp) in newest {
            if key.is_empty() {
                // A type never asked for: NACK so the server knows.
                let sub = Sub {
                    nonce: resp.nonce.clone(),
                    ..Sub::default()
                };
                let detail = format!("type {} was not subscribed to", resp.type_url);
                let mut req = request(&node, "", &sub, Some(detail));
                req.type_url = resp.type_url.clone();
                let _ = tx.send(req).await;
                continue;
            }
            for req in handle(key, resp, &node, controller, status, state) {
                if subscribed_url(config, req.type_url.as_str()) {
                    let _ = tx.send(req).await;
                }
            }
        }
    }
}

pub(super) fn subscribed_url(config: &Xds, type_url: &str) -> bool {
    let t = match type_url {
        CDS => ResourceType::Clusters,
        EDS => ResourceType::Endpoints,
        LDS => ResourceType::Listeners,
        RDS => ResourceType::Routes,
        SDS => ResourceType::Secrets,
        _ => return false,
    };
    config.resources.contains(&t)
}

fn request(node: &Node, type_url: &str, sub: &Sub, nack: Option<String>) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: sub.version.clone(),
        node: Some(node.clone()),
        resource_names: sub.names.iter().cloned().collect(),
        type_url: type_url.to_string(),
        response_nonce: sub.nonce.clone(),
        error_detail: nack.map(|message| rpc::Status {
            // INVALID_ARGUMENT
            code: 3,
            message,
            details: Vec::new(),
        }),
        ..DiscoveryRequest::default()
    }
}

/// Applies one response; returns the requests to send (the ACK or NACK,
/// and any change of EDS or RDS names it caused).
fn handle(
    type_url: &'static str,
    resp: DiscoveryResponse,
    node: &Node,
    controller: &Controller,
    status: &Status,
    state: &mut State,
) -> Vec<DiscoveryRequest> {
    let kind = kind_name(type_url);
    let mut candidate = state.clone();
    let outcome = take(type_url, &resp, &mut candidate)
        .and_then(|()| candidate.put_into_effect(state, controller));
    let sub = state.subs.entry(type_url).or_default();
    sub.nonce = resp.nonce.clone();
    match outcome {
        Err(why) => {
            tracing::warn!(kind, version = %resp.version_info, error = %why, "xds: push refused; the last good config keeps serving");
            status.rejected(kind, &why);
            let sub = sub.clone();
            vec![request(node, type_url, &sub, Some(why))]
        }
        Ok(_) => {
            let subs = std::mem::take(&mut state.subs);
            *state = candidate;
            state.subs = subs;
            let sub = state.subs.entry(type_url).or_default();
            sub.version = resp.version_info.clone();
            let count = state.count(type_url);
            status.accepted(kind, &resp.version_info, count);
            tracing::info!(kind, version = %resp.version_info, resources = count, "xds: push applied");
            let mut out = vec![request(node, type_url, &state.subs[type_url], None)];
            for (url, _, _) in state.resubscribe() {
                out.push(request(node, url, &state.subs[url], None));
            }
            out
        }
    }
}

/// Folds a state-of-the-world response into `state`, or says which
/// resource and field it refuses. CDS and LDS responses hold every
/// resource; EDS and RDS ones those named (others are left as they are).
fn take(type_url: &str, resp: &DiscoveryResponse, state: &mut State) -> Result<(), String> {
    if resp.resources.len() > RESOURCES_PER_RESPONSE_MAX {
        return Err(format!(
            "{} resources in one response; the limit is {RESOURCES_PER_RESPONSE_MAX}",
            resp.resources.len()
        ));
    }
    let mut seen = BTreeSet::new();
    for (i, any) in resp.resources.iter().enumerate() {
        let name = state.upsert(type_url, any, &format!("resources[{i}]"))?;
        if !seen.insert(name.clone()) {
            return Err(format!("resource {name:?} appears twice"));
        }
    }
    // CDS and LDS responses hold every resource: what is not in this one
    // is gone.
    match type_url {
        CDS => state.clusters.retain(|k, _| seen.contains(k)),
        LDS => state.listeners.retain(|k, _| seen.contains(k)),
        _ => {}
    }
    Ok(())
}

impl State {
    /// Translates one resource and puts it in by its name; returns the name.
    pub(super) fn upsert(
        &mut self,
        type_url: &str,
        any: &envoy_types::pb::google::protobuf::Any,
        field: &str,
    ) -> Result<String, String> {
        let named = |what: &str, name: &str, r: Refusal| format!("{what} {name:?}: {r}");
        let Some(url) = known(type_url) else {
            return Err(format!("type {type_url} is not supported"));
        };
        let digest = self.digests.of(url, &any.value);
        if let Some(name) = self.digests.by_digest.get(&(url, digest)) {
            if self.holds(url, name) {
                return Ok(name.clone());
            }
        }
        let name = self.translate(url, any, field, named)?;
        if url != SDS {
            self.digests.remember(url, &name, digest);
        }
        Ok(name)
    }

    fn translate(
        &mut self,
        type_url: &'static str,
        any: &envoy_types::pb::google::protobuf::Any,
        field: &str,
        named: impl Fn(&str, &str, Refusal) -> String,
    ) -> Result<String, String> {
        fn decode<M: Message + Default>(
            any: &envoy_types::pb::google::protobuf::Any,
            url: &str,
            field: &str,
        ) -> Result<M, String> {
            translate::unpack(any, url, field).map_err(|r| r.to_string())
        }
        Ok(match type_url {
            CDS => {
                let c: Cluster = decode(any, CDS, field)?;
                let t = translate::cluster(&c, &self.secret_names)
                    .map_err(|r| named("Cluster", &c.name, r))?;
                self.clusters.insert(c.name.clone(), Arc::new(t));
                c.name
            }
            LDS => {
                let l: Listener = decode(any, LDS, field)?;
                let t = translate::listener(&l, &self.secret_names)
                    .map_err(|r| named("Listener", &l.name, r))?;
                self.listeners.insert(l.name.clone(), Arc::new(t));
                l.name
            }
            EDS => {
                let la: ClusterLoadAssignment = decode(any, EDS, field)?;
                let list = translate::endpoints(&la, "", false)
                    .map_err(|r| named("ClusterLoadAssignment", &la.cluster_name, r))?;
                self.endpoints
                    .insert(la.cluster_name.clone(), Arc::new(list));
                la.cluster_name
            }
            RDS => {
                let rc: RouteConfiguration = decode(any, RDS, field)?;
                let list = translate::routes(&rc, "")
                    .map_err(|r| named("RouteConfiguration", &rc.name, r))?;
                self.routes.insert(rc.name.clone(), Arc::new(list));
                rc.name
            }
            SDS => {
                let sec: Secret = decode(any, SDS, field)?;
                let out = translate::secret(&sec).map_err(|r| named("Secret", &sec.name, r))?;
                self.secrets.insert(sec.name.clone(), out);
                sec.name
            }
            _ => return Err(format!("type {type_url} is not supported")),
        })
    }

    /// Takes a resource out by name (delta's `removed_resources`).
    pub(super) fn remove(&mut self, type_url: &str, name: &str) {
        match type_url {
            CDS => drop(self.clusters.remove(name)),
            LDS => drop(self.listeners.remove(name)),
            EDS => drop(self.endpoints.remove(name)),
            RDS => drop(self.routes.remove(name)),
            // A withdrawn secret stays in use until another replaces it:
            // falling back to the bootstrap files (or to nothing) would
            // trade a working identity for an older one.
            SDS => tracing::info!(
                secret = name,
                "xds: secret withdrawn; the material in use stays"
            ),
            _ => {}
        }
    }

    /// Takes in what `scratch` translated for `type_url` (and its versions),
    /// and removes `removed`.
    pub(super) fn absorb(&mut self, type_url: &'static str, scratch: State, removed: &[String]) {
        self.digests.by_name.extend(scratch.digests.by_name);
        self.digests.by_digest.extend(scratch.digests.by_digest);
        self.clusters.extend(scratch.clusters);
        self.endpoints.extend(scratch.endpoints);
        self.listeners.extend(scratch.listeners);
        self.routes.extend(scratch.routes);
        self.secrets.extend(scratch.secrets);
        for name in removed {
            self.remove(type_url, name);
        }
        if let Some(v) = scratch.versions.get(type_url) {
            self.versions.insert(type_url, v.clone());
        }
    }

    /// Resources of a type held now.
    pub(super) fn count(&self, type_url: &str) -> usize {
        match type_url {
            CDS => self.clusters.len(),
            EDS => self.endpoints.len(),
            LDS => self.listeners.len(),
            SDS => self.secrets.len(),
            _ => self.routes.len(),
        }
    }

    /// After an accepted push: the EDS and RDS names the accepted clusters
    /// and listeners now wait for, where they changed, as (type, names
    /// added, names removed); what is no longer waited for is dropped.
    pub(super) fn resubscribe(&mut self) -> Vec<(&'static str, Vec<String>, Vec<String>)> {
        let mut out = Vec::new();
        for (url, wanted) in [(EDS, self.wanted_eds()), (RDS, self.wanted_rds())] {
            let sub = self.subs.entry(url).or_default();
            if sub.names == wanted {
                continue;
            }
            let added = wanted.difference(&sub.names).cloned().collect();
            let removed: Vec<String> = sub.names.difference(&wanted).cloned().collect();
            sub.names = wanted;
            for name in &removed {
                self.remove(url, name);
                if let Some(v) = self.versions.get_mut(url) {
                    v.remove(name);
                }
            }
            out.push((url, added, removed));
        }
        out
    }
}

/// Whether two maps hold the same entries, comparing a shared translation
/// by address before by value.
fn same<V: PartialEq>(a: &BTreeMap<String, Arc<V>>, b: &BTreeMap<String, Arc<V>>) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((ka, va), (kb, vb))| ka == kb && (Arc::ptr_eq(va, vb) || va == vb))
}

/// Digests of held resources' encodings (see [`State`]).
#[derive(Debug, Default, Clone)]
struct Digests {
    by_name: std::collections::HashMap<(&'static str, String), u64>,
    by_digest: std::collections::HashMap<(&'static str, u64), String>,
}

impl Digests {
    /// One key for the process: states made apart (a delta's scratch)
    /// must agree on digests.
    fn of(&self, url: &'static str, bytes: &[u8]) -> u64 {
        use std::hash::BuildHasher;
        static KEY: std::sync::OnceLock<std::hash::RandomState> = std::sync::OnceLock::new();
        KEY.get_or_init(std::hash::RandomState::new)
            .hash_one((url, bytes))
    }

    /// Records `name`'s digest, forgetting the one it had.
    fn remember(&mut self, url: &'static str, name: &str, digest: u64) {
        if let Some(old) = self.by_name.insert((url, name.to_string()), digest) {
            if self.by_digest.get(&(url, old)).is_some_and(|n| n == name) {
                self.by_digest.remove(&(url, old));
            }
        }
        self.by_digest.insert((url, digest), name.to_string());
    }
}

/// xorshift64*, seeded from the clock: spreads reconnects of many sidecars.
struct Jitter(u64);

impl Jitter {
    fn seeded() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Self(nanos ^ u64::from(std::process::id()) << 32 | 1)
    }

    /// A duration in `[0, cap)`.
    fn below(&mut self, cap: Duration) -> Duration {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let r = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let ms = cap.as_millis().max(1) as u64;
        Duration::from_millis(r % ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state-of-the-world response resends everything: resources whose
    /// bytes are unchanged keep their translation (the same allocation),
    /// changed ones are translated again, and the digests follow.
    #[test]
    fn unchanged_resources_are_not_translated_again() {
        use envoy_types::pb::google::protobuf::Any;
        let cla = |name: &str, port: u32| {
            let la = ClusterLoadAssignment {
                cluster_name: name.into(),
                endpoints: vec![envoy_types::pb::envoy::config::endpoint::v3::LocalityLbEndpoints {
                    lb_endpoints: vec![envoy_types::pb::envoy::config::endpoint::v3::LbEndpoint {
                        host_identifier: Some(
                            envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier::Endpoint(
                                envoy_types::pb::envoy::config::endpoint::v3::Endpoint {
                                    address: Some(envoy_types::pb::envoy::config::core::v3::Address {
                                        address: Some(envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(
                                            envoy_types::pb::envoy::config::core::v3::SocketAddress {
                                                address: "10.0.0.1".into(),
                                                port_specifier: Some(envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(port)),
                                                ..Default::default()
                                            },
                                        )),
                                    }),
                                    ..Default::default()
                                },
                            ),
                        ),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            };
            Any {
                type_url: EDS.into(),
                value: la.encode_to_vec(),
            }
        };
        let mut s = State::default();
        s.upsert(EDS, &cla("a", 80), "r").unwrap();
        s.upsert(EDS, &cla("b", 80), "r").unwrap();
        let (a, b) = (Arc::clone(&s.endpoints["a"]), Arc::clone(&s.endpoints["b"]));
        s.upsert(EDS, &cla("a", 80), "r").unwrap();
        s.upsert(EDS, &cla("b", 81), "r").unwrap();
        assert!(Arc::ptr_eq(&a, &s.endpoints["a"]), "unchanged: kept");
        assert!(!Arc::ptr_eq(&b, &s.endpoints["b"]), "changed: translated");
        assert_eq!(s.endpoints["b"][0].as_str(), Some("10.0.0.1:81"));
        // Back to the first bytes: translated again (that digest was
        // forgotten when b changed), and correct.
        s.upsert(EDS, &cla("b", 80), "r").unwrap();
        assert_eq!(s.endpoints["b"][0].as_str(), Some("10.0.0.1:80"));
        assert_eq!(s.digests.by_name.len(), 2);
        assert_eq!(s.digests.by_digest.len(), 2);
    }

    #[test]
    fn endpoints_and_routes_nobody_waits_for_are_not_kept() {
        let mut s = State::default();
        let mut t = toml::Table::new();
        t.insert("name".into(), Value::String("orders".into()));
        s.clusters.insert(
            "orders".into(),
            Arc::new(ClusterOut {
                table: t,
                eds_name: Some("orders".into()),
            }),
        );
        for name in ["orders", "junk-1", "junk-2"] {
            s.endpoints.insert(name.into(), Arc::default());
            s.routes.insert(name.into(), Arc::default());
            s.versions
                .entry(EDS)
                .or_default()
                .insert(name.into(), "v".into());
        }
        s.drop_unwanted();
        assert_eq!(s.endpoints.keys().collect::<Vec<_>>(), ["orders"]);
        assert!(s.routes.is_empty(), "no listener waits for routes");
        assert_eq!(s.versions[EDS].keys().collect::<Vec<_>>(), ["orders"]);
    }
}
