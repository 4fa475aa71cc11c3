//! The ADS stream (state of the world): subscribe, apply, ACK or NACK,
//! reconnect.
//!
//! What must hold: one stream at a time to the management server; CDS and
//! LDS are wildcard subscriptions, EDS and RDS name exactly what the
//! accepted clusters and listeners wait for; a response is ACKed (its
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
    translate::{self, ClusterOut, ListenerOut, Refusal},
    Status,
};
use crate::{
    config::{
        compose::Dynamic,
        xds::{ResourceType, Xds},
    },
    control::Controller,
};

pub const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

/// The largest response decoded: 1,000 clusters of 10 endpoints are about
/// 1 MiB; past this a server is broken or hostile, and the stream fails.
const RESPONSE_BYTES_MAX: usize = 16 << 20;
/// Resources in one response (the config's own caps are lower per type).
const RESOURCES_PER_RESPONSE_MAX: usize = 10_000;
/// Requests waiting for the stream: at most one per type is ever useful.
const OUTBOUND_QUEUE: usize = 16;
/// Responses taken together when they arrived during a swap.
const COALESCE_MAX: usize = 64;
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

fn kind_name(type_url: &str) -> &'static str {
    match type_url {
        CDS => "clusters",
        EDS => "endpoints",
        LDS => "listeners",
        RDS => "routes",
        _ => "unknown",
    }
}

/// What one type's subscription has said and been told.
#[derive(Debug, Default, Clone)]
struct Sub {
    version: String,
    nonce: String,
    names: BTreeSet<String>,
}

/// Everything accepted so far, by resource name.
#[derive(Debug, Default, Clone)]
struct State {
    clusters: BTreeMap<String, ClusterOut>,
    endpoints: BTreeMap<String, Vec<Value>>,
    listeners: BTreeMap<String, ListenerOut>,
    routes: BTreeMap<String, Vec<Value>>,
    subs: BTreeMap<&'static str, Sub>,
}

impl State {
    /// The config layer this state makes. An EDS cluster whose endpoints
    /// have not arrived has none (it answers 503); a listener whose routes
    /// have not arrived is left out until they do (Envoy's warming).
    fn dynamic(&self) -> Dynamic {
        let clusters = self
            .clusters
            .values()
            .map(|c| {
                let mut t = c.table.clone();
                if let Some(eds) = &c.eds_name {
                    let list = self.endpoints.get(eds).cloned().unwrap_or_default();
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
                    t.insert("routes".into(), Value::Array(self.routes.get(rds)?.clone()));
                }
                Some(t)
            })
            .collect();
        Dynamic {
            listeners,
            clusters,
        }
    }

    fn wanted_eds(&self) -> BTreeSet<String> {
        self.clusters
            .values()
            .filter_map(|c| c.eds_name.clone())
            .collect()
    }

    fn wanted_rds(&self) -> BTreeSet<String> {
        self.listeners
            .values()
            .filter_map(|l| l.rds_name.clone())
            .collect()
    }
}

async fn run(config: Xds, controller: Arc<Controller>, status: Arc<Status>) {
    let mut state = State::default();
    let mut failures: u32 = 0;
    let mut rng = Jitter::seeded();
    loop {
        match session(&config, &controller, &status, &mut state).await {
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

/// One stream, until it ends. The bool: whether any response arrived (a
/// stream that worked resets the back-off).
async fn session(
    config: &Xds,
    controller: &Controller,
    status: &Status,
    state: &mut State,
) -> Result<bool, (bool, ())> {
    let fail = |got: bool, what: String| {
        tracing::warn!(server = %config.server, error = %what, "xds: stream failed");
        status.connected(false, Some(what));
        (got, ())
    };
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", config.server))
        .map_err(|e| fail(false, format!("bad server address: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| fail(false, format!("connect: {e}")))?;
    let mut client = AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(RESPONSE_BYTES_MAX);
    let (tx, rx) = tokio::sync::mpsc::channel(OUTBOUND_QUEUE);
    let node = Node {
        id: config.node_id.clone(),
        cluster: config.cluster.clone(),
        user_agent_name: "pilotfish".into(),
        user_agent_version_type: Some(
            envoy_types::pb::envoy::config::core::v3::node::UserAgentVersionType::UserAgentVersion(
                env!("CARGO_PKG_VERSION").into(),
            ),
        ),
        ..Node::default()
    };
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
        let first = match inbound.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return Err(fail(got_any, "the server closed the stream".into())),
            Err(e) => return Err(fail(got_any, format!("stream: {e}"))),
        };
        got_any = true;
        // Whatever else has arrived meanwhile: the newest of each type.
        let mut newest: BTreeMap<&'static str, DiscoveryResponse> = BTreeMap::new();
        let mut take = |r: DiscoveryResponse| {
            let key = match r.type_url.as_str() {
                CDS => CDS,
                EDS => EDS,
                LDS => LDS,
                RDS => RDS,
                _ => "",
            };
            newest.insert(key, r);
        };
        take(first);
        for _ in 0..COALESCE_MAX {
            match inbound.message().now_or_never() {
                Some(Ok(Some(r))) => take(r),
                Some(Ok(None)) | Some(Err(_)) | None => break,
            }
        }
        // Clusters before endpoints before listeners before routes: what a
        // later type names is then already there.
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

fn subscribed_url(config: &Xds, type_url: &str) -> bool {
    let t = match type_url {
        CDS => ResourceType::Clusters,
        EDS => ResourceType::Endpoints,
        LDS => ResourceType::Listeners,
        RDS => ResourceType::Routes,
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
    let outcome = take(type_url, &resp, &mut candidate).and_then(|()| {
        controller
            .apply_dynamic(candidate.dynamic())
            .map_err(|e| e.to_string())
    });
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
            let count = match type_url {
                CDS => state.clusters.len(),
                EDS => state.endpoints.len(),
                LDS => state.listeners.len(),
                _ => state.routes.len(),
            };
            status.accepted(kind, &resp.version_info, count);
            tracing::info!(kind, version = %resp.version_info, resources = count, "xds: push applied");
            let mut out = vec![request(node, type_url, &state.subs[type_url], None)];
            // Names the accepted clusters and listeners now wait for.
            for (url, wanted) in [(EDS, state.wanted_eds()), (RDS, state.wanted_rds())] {
                let sub = state.subs.entry(url).or_default();
                if sub.names != wanted {
                    sub.names = wanted;
                    if url == EDS {
                        state.endpoints.retain(|k, _| sub.names.contains(k));
                    } else {
                        state.routes.retain(|k, _| sub.names.contains(k));
                    }
                    out.push(request(node, url, sub, None));
                }
            }
            out
        }
    }
}

/// Folds a response into `state`, or says which resource and field it
/// refuses.
fn take(type_url: &str, resp: &DiscoveryResponse, state: &mut State) -> Result<(), String> {
    if resp.resources.len() > RESOURCES_PER_RESPONSE_MAX {
        return Err(format!(
            "{} resources in one response; the limit is {RESOURCES_PER_RESPONSE_MAX}",
            resp.resources.len()
        ));
    }
    fn decode<M: Message + Default>(
        any: &envoy_types::pb::google::protobuf::Any,
        url: &str,
        i: usize,
    ) -> Result<M, String> {
        translate::unpack(any, url, &format!("resources[{i}]")).map_err(|r| r.to_string())
    }
    let named = |what: &str, name: &str, r: Refusal| format!("{what} {name:?}: {r}");
    let mut seen = BTreeSet::new();
    let mut unique = |name: &str| {
        if seen.insert(name.to_string()) {
            Ok(())
        } else {
            Err(format!("resource {name:?} appears twice"))
        }
    };
    match type_url {
        CDS => {
            let mut out = BTreeMap::new();
            for (i, any) in resp.resources.iter().enumerate() {
                let c: Cluster = decode(any, CDS, i)?;
                unique(&c.name)?;
                let t = translate::cluster(&c).map_err(|r| named("Cluster", &c.name, r))?;
                out.insert(c.name.clone(), t);
            }
            state.clusters = out;
        }
        LDS => {
            let mut out = BTreeMap::new();
            for (i, any) in resp.resources.iter().enumerate() {
                let l: Listener = decode(any, LDS, i)?;
                unique(&l.name)?;
                let t = translate::listener(&l).map_err(|r| named("Listener", &l.name, r))?;
                out.insert(l.name.clone(), t);
            }
            state.listeners = out;
        }
        EDS => {
            for (i, any) in resp.resources.iter().enumerate() {
                let la: ClusterLoadAssignment = decode(any, EDS, i)?;
                unique(&la.cluster_name)?;
                let list = translate::endpoints(&la, "")
                    .map_err(|r| named("ClusterLoadAssignment", &la.cluster_name, r))?;
                state.endpoints.insert(la.cluster_name.clone(), list);
            }
        }
        RDS => {
            for (i, any) in resp.resources.iter().enumerate() {
                let rc: RouteConfiguration = decode(any, RDS, i)?;
                unique(&rc.name)?;
                let list = translate::routes(&rc, "")
                    .map_err(|r| named("RouteConfiguration", &rc.name, r))?;
                state.routes.insert(rc.name.clone(), list);
            }
        }
        _ => return Err(format!("type {type_url} is not supported")),
    }
    Ok(())
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
