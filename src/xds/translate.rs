//! Envoy's resources (CDS, EDS, LDS, RDS) into Pilotfish's config tables,
//! and SDS secrets into TLS material.
//!
//! What must hold: each resource becomes tables in the config file's own
//! shape, so the one validator that checks files checks pushes too; every
//! field is either mapped, safely ignorable (a name for stats, a buffer
//! size Pilotfish bounds itself), or a reason to refuse the resource with
//! the field named ([`super::residue`]). A refusal is a NACK: the last good
//! config keeps serving.

// Control planes still send deprecated fields (`http2_protocol_options`,
// `exact_match`, `append`); each is read rather than refused.
#![allow(deprecated)]

use std::collections::BTreeMap;

use envoy_types::pb::{
    envoy::{
        config::{
            cluster::v3::{cluster, Cluster},
            core::v3::{address, socket_address, Address, HeaderValueOption},
            endpoint::v3::ClusterLoadAssignment,
            listener::v3::Listener,
            route::v3::{
                header_matcher, route, route_action, route_match, RetryPolicy, Route,
                RouteConfiguration, VirtualHost,
            },
        },
        extensions::{
            filters::network::{
                http_connection_manager::v3::{http_connection_manager, HttpConnectionManager},
                tcp_proxy::v3::{tcp_proxy, TcpProxy},
            },
            transport_sockets::tls::v3::{
                common_tls_context, secret, CommonTlsContext, DownstreamTlsContext, Secret,
                UpstreamTlsContext,
            },
            upstreams::http::v3::{http_protocol_options, HttpProtocolOptions},
        },
        r#type::matcher::v3::{string_matcher, StringMatcher},
    },
    google::protobuf::{Any, Duration},
};
use prost::Message;
use toml::{Table, Value};

use super::residue::first_set;

pub const HCM: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
pub const TCP_PROXY: &str =
    "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
pub const HTTP_OPTIONS: &str =
    "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
const HTTP_OPTIONS_KEY: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
const ROUTER: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
pub const UPSTREAM_TLS: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext";
pub const DOWNSTREAM_TLS: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
/// Plaintext, spelled as a transport socket.
const RAW_BUFFER: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer";

/// The SDS names the workload's material is known by (`[xds]`): a TLS
/// context must name these, since the workload's material is the only
/// material Pilotfish presents and verifies with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecretNames {
    pub certificate: String,
    pub trust_bundle: String,
}

impl SecretNames {
    pub fn of(x: &crate::config::xds::Xds) -> Self {
        Self {
            certificate: x.certificate_secret.clone(),
            trust_bundle: x.trust_bundle_secret.clone(),
        }
    }
}

/// Why a resource was refused: the field (a path from the resource's
/// root) and what about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub field: String,
    pub why: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.why)
    }
}

type Result<T> = std::result::Result<T, Refusal>;

fn refuse<T>(field: impl Into<String>, why: impl Into<String>) -> Result<T> {
    Err(Refusal {
        field: field.into(),
        why: why.into(),
    })
}

/// Refuses when any field is left in `residue` (what was not taken).
fn nothing_left<T: std::fmt::Debug + Default + PartialEq>(prefix: &str, residue: &T) -> Result<()> {
    match first_set(residue) {
        None => Ok(()),
        Some(field) => refuse(
            format!("{prefix}{field}"),
            "set, and Pilotfish cannot honour it (refused rather than ignored)",
        ),
    }
}

fn duration(d: &Duration) -> Value {
    let ms = d.seconds.max(0) as u128 * 1000 + (d.nanos.max(0) as u128).div_ceil(1_000_000);
    Value::String(format!("{ms}ms"))
}

/// A decoded `Any`, refusing a type other than `url`.
pub fn unpack<M: Message + Default>(any: &Any, url: &str, field: &str) -> Result<M> {
    if any.type_url != url {
        return refuse(field, format!("expected {url}, found {}", any.type_url));
    }
    M::decode(any.value.as_slice()).map_err(|e| Refusal {
        field: field.into(),
        why: format!("does not decode: {e}"),
    })
}

/// `IP:port` of a socket address; `name:port` too where `names` (a
/// STRICT_DNS cluster's endpoints, resolved by [`crate::dns`]).
fn socket(addr: Option<&Address>, field: &str, names: bool) -> Result<String> {
    let Some(Address {
        address: Some(address::Address::SocketAddress(s)),
    }) = addr
    else {
        return refuse(
            field,
            "must be a socket_address (pipes and internal addresses are not supported)",
        );
    };
    let port = match s.port_specifier {
        Some(socket_address::PortSpecifier::PortValue(p)) if p <= u32::from(u16::MAX) => p,
        _ => return refuse(format!("{field}.port_value"), "a numeric port is required"),
    };
    let mut rest = s.clone();
    rest.address.clear();
    rest.port_specifier = None;
    rest.ipv4_compat = false;
    nothing_left(&format!("{field}."), &rest)?;
    match s.address.parse::<std::net::IpAddr>() {
        Ok(ip) => Ok(std::net::SocketAddr::new(ip, port as u16).to_string()),
        Err(_) if names && crate::dns::valid_name(&s.address) => {
            Ok(format!("{}:{port}", s.address))
        }
        Err(_) => refuse(
            format!("{field}.address"),
            format!(
                "{:?} is not an IP address (host names are for STRICT_DNS clusters)",
                s.address
            ),
        ),
    }
}

/// A cluster, and the EDS resource name it waits for (None: static).
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterOut {
    pub table: Table,
    pub eds_name: Option<String>,
}

pub fn cluster(c: &Cluster, names: &SecretNames) -> Result<ClusterOut> {
    let mut t = Table::new();
    let mut rest = c.clone();
    if let Some(ts) = &c.transport_socket {
        if let Some(tls) = upstream_tls(ts, names)? {
            t.insert("tls".into(), Value::Table(tls));
        }
        rest.transport_socket = None;
    }
    t.insert("name".into(), Value::String(c.name.clone()));
    rest.name.clear();
    // Names for stats and hints that do not change where traffic goes.
    rest.alt_stat_name.clear();
    rest.metadata = None;
    rest.per_connection_buffer_limit_bytes = None;
    rest.common_lb_config = None;
    rest.track_cluster_stats = None;
    rest.ignore_health_on_host_removal = false;
    rest.dns_lookup_family = 0;
    if let Some(d) = &c.connect_timeout {
        t.insert("connect_timeout".into(), duration(d));
        rest.connect_timeout = None;
    }
    let kind = match &c.cluster_discovery_type {
        None => cluster::DiscoveryType::Static,
        Some(cluster::ClusterDiscoveryType::Type(k)) => {
            cluster::DiscoveryType::try_from(*k).unwrap_or(cluster::DiscoveryType::OriginalDst)
        }
        Some(cluster::ClusterDiscoveryType::ClusterType(_)) => {
            return refuse("cluster_type", "custom cluster types are not supported")
        }
    };
    rest.cluster_discovery_type = None;
    let eds_name = match kind {
        cluster::DiscoveryType::Static => {
            let endpoints = match &c.load_assignment {
                Some(la) => endpoints(la, "load_assignment.", false)?,
                None => Vec::new(),
            };
            t.insert("endpoints".into(), Value::Array(endpoints));
            rest.load_assignment = None;
            None
        }
        cluster::DiscoveryType::StrictDns => {
            // Every address of every name is an endpoint, re-resolved
            // every `[dns] refresh` (the cluster's own rate is not kept).
            let endpoints = match &c.load_assignment {
                Some(la) => endpoints(la, "load_assignment.", true)?,
                None => Vec::new(),
            };
            t.insert("endpoints".into(), Value::Array(endpoints));
            rest.load_assignment = None;
            rest.dns_refresh_rate = None;
            rest.respect_dns_ttl = false;
            None
        }
        cluster::DiscoveryType::Eds => {
            let eds = c.eds_cluster_config.clone().unwrap_or_default();
            // The config source is where EDS comes from; over ADS every
            // source is the one stream.
            let name = if eds.service_name.is_empty() {
                c.name.clone()
            } else {
                eds.service_name.clone()
            };
            rest.eds_cluster_config = None;
            // Filled in when the ClusterLoadAssignment arrives.
            t.insert("endpoints".into(), Value::Array(Vec::new()));
            Some(name)
        }
        other => {
            return refuse(
                "type",
                format!(
                    "{} clusters are not supported (STATIC, EDS and STRICT_DNS are)",
                    other.as_str_name()
                ),
            )
        }
    };
    let lb = match cluster::LbPolicy::try_from(c.lb_policy) {
        Ok(cluster::LbPolicy::RoundRobin) => "round_robin",
        Ok(cluster::LbPolicy::LeastRequest) => "least_request",
        Ok(other) => {
            return refuse(
                "lb_policy",
                format!(
                    "{} is not supported (ROUND_ROBIN and LEAST_REQUEST are)",
                    other.as_str_name()
                ),
            )
        }
        Err(_) => return refuse("lb_policy", format!("unknown value {}", c.lb_policy)),
    };
    t.insert("lb".into(), Value::String(lb.into()));
    rest.lb_policy = 0;
    // Slow start and choice counts: tuning of the policy chosen above.
    rest.lb_config = None;
    if let Some(cb) = &c.circuit_breakers {
        let mut b = Table::new();
        for (i, th) in cb.thresholds.iter().enumerate() {
            if th.priority != 0 {
                return refuse(
                    format!("circuit_breakers.thresholds[{i}].priority"),
                    "only DEFAULT priority is supported (Pilotfish has no priority routing)",
                );
            }
            let mut th_rest = *th;
            for (key, v) in [
                ("max_connections", th.max_connections),
                ("max_pending", th.max_pending_requests),
                ("max_requests", th.max_requests),
                ("max_retries", th.max_retries),
            ] {
                if let Some(v) = v {
                    b.insert(key.into(), Value::Integer(i64::from(v.value)));
                }
            }
            th_rest.max_connections = None;
            th_rest.max_pending_requests = None;
            th_rest.max_requests = None;
            th_rest.max_retries = None;
            th_rest.track_remaining = false;
            nothing_left(&format!("circuit_breakers.thresholds[{i}]."), &th_rest)?;
        }
        let mut cb_rest = cb.clone();
        cb_rest.thresholds.clear();
        nothing_left("circuit_breakers.", &cb_rest)?;
        rest.circuit_breakers = None;
        if !b.is_empty() {
            t.insert("circuit_breakers".into(), Value::Table(b));
        }
    }
    if let Some(o) = &c.outlier_detection {
        let mut ot = Table::new();
        let mut o_rest = o.clone();
        ot.insert(
            "consecutive_failures".into(),
            Value::Integer(i64::from(o.consecutive_5xx.map_or(5, |v| v.value))),
        );
        ot.insert(
            "base_ejection".into(),
            o.base_ejection_time
                .as_ref()
                .map_or(Value::String("30s".into()), duration),
        );
        ot.insert(
            "max_ejection".into(),
            o.max_ejection_time
                .as_ref()
                .map_or(Value::String("300s".into()), duration),
        );
        ot.insert(
            "max_ejected_percent".into(),
            Value::Integer(i64::from(o.max_ejection_percent.map_or(10, |v| v.value))),
        );
        o_rest.consecutive_5xx = None;
        o_rest.base_ejection_time = None;
        o_rest.max_ejection_time = None;
        o_rest.max_ejection_percent = None;
        // How often Envoy sweeps; Pilotfish ejects as failures happen.
        o_rest.interval = None;
        if o.enforcing_consecutive_5xx.is_some_and(|v| v.value == 100) {
            o_rest.enforcing_consecutive_5xx = None;
        }
        nothing_left("outlier_detection.", &o_rest)?;
        rest.outlier_detection = None;
        t.insert("outlier".into(), Value::Table(ot));
    }
    match c.health_checks.as_slice() {
        [] => {}
        [h] => {
            use envoy_types::pb::envoy::config::core::v3::health_check::HealthChecker;
            let Some(HealthChecker::HttpHealthCheck(http)) = &h.health_checker else {
                return refuse("health_checks[0]", "only HTTP health checks are supported");
            };
            let mut ht = Table::new();
            ht.insert("path".into(), Value::String(http.path.clone()));
            if let Some(d) = &h.interval {
                ht.insert("interval".into(), duration(d));
            }
            if let Some(d) = &h.timeout {
                ht.insert("timeout".into(), duration(d));
            }
            if let Some(v) = h.healthy_threshold {
                ht.insert(
                    "healthy_threshold".into(),
                    Value::Integer(i64::from(v.value)),
                );
            }
            if let Some(v) = h.unhealthy_threshold {
                ht.insert(
                    "unhealthy_threshold".into(),
                    Value::Integer(i64::from(v.value)),
                );
            }
            let mut h_rest = h.clone();
            h_rest.health_checker = None;
            h_rest.interval = None;
            h_rest.timeout = None;
            h_rest.healthy_threshold = None;
            h_rest.unhealthy_threshold = None;
            h_rest.interval_jitter = None;
            h_rest.no_traffic_interval = None;
            nothing_left("health_checks[0].", &h_rest)?;
            let mut http_rest = http.clone();
            http_rest.path.clear();
            http_rest.host.clear();
            nothing_left("health_checks[0].http_health_check.", &http_rest)?;
            rest.health_checks.clear();
            t.insert("health_check".into(), Value::Table(ht));
        }
        _ => return refuse("health_checks", "at most one health check is supported"),
    }
    // The upstream HTTP version.
    let mut protocol = None;
    if c.http2_protocol_options.is_some() {
        protocol = Some("h2");
        rest.http2_protocol_options = None;
    }
    if let Some(any) = c.typed_extension_protocol_options.get(HTTP_OPTIONS_KEY) {
        let field = format!("typed_extension_protocol_options[{HTTP_OPTIONS_KEY:?}]");
        let o: HttpProtocolOptions = unpack(any, HTTP_OPTIONS, &field)?;
        use http_protocol_options::{
            explicit_http_config::ProtocolConfig, UpstreamProtocolOptions,
        };
        protocol = Some(match &o.upstream_protocol_options {
            Some(UpstreamProtocolOptions::ExplicitHttpConfig(e)) => match e.protocol_config {
                Some(ProtocolConfig::Http2ProtocolOptions(_)) => "h2",
                Some(ProtocolConfig::HttpProtocolOptions(_)) => "http1",
                _ => {
                    return refuse(
                        format!("{field}.explicit_http_config"),
                        "only HTTP/1.1 and HTTP/2 are supported",
                    )
                }
            },
            Some(UpstreamProtocolOptions::AutoConfig(_)) => "auto",
            _ => {
                return refuse(
                    format!("{field}.upstream_protocol_options"),
                    "only explicit_http_config and auto_config are supported",
                )
            }
        });
        let mut o_rest = o.clone();
        o_rest.upstream_protocol_options = None;
        o_rest.common_http_protocol_options = None;
        nothing_left(&format!("{field}."), &o_rest)?;
    }
    if c.typed_extension_protocol_options
        .keys()
        .any(|k| k != HTTP_OPTIONS_KEY)
    {
        let other = c
            .typed_extension_protocol_options
            .keys()
            .find(|k| *k != HTTP_OPTIONS_KEY)
            .cloned()
            .unwrap_or_default();
        return refuse(
            format!("typed_extension_protocol_options[{other:?}]"),
            "not supported",
        );
    }
    rest.typed_extension_protocol_options.clear();
    if let Some(p) = protocol {
        t.insert("protocol".into(), Value::String(p.into()));
    }
    nothing_left("", &rest)?;
    Ok(ClusterOut { table: t, eds_name })
}

/// The endpoints of a ClusterLoadAssignment, as `IP:port` strings.
pub fn endpoints(la: &ClusterLoadAssignment, prefix: &str, names: bool) -> Result<Vec<Value>> {
    use envoy_types::pb::envoy::config::{core::v3::HealthStatus, endpoint::v3::lb_endpoint};
    let mut out = Vec::new();
    let mut weight = None;
    let mut locality_weight = None;
    for (i, locality) in la.endpoints.iter().enumerate() {
        let lf = format!("{prefix}endpoints[{i}]");
        if locality.priority != 0 {
            return refuse(
                format!("{lf}.priority"),
                "only priority 0 is supported (no priority failover)",
            );
        }
        // Locality weights share traffic between localities; equal ones
        // (or one locality, as gRPC's xDS client needs) change nothing.
        let lw = locality.load_balancing_weight.map_or(1, |w| w.value);
        if *locality_weight.get_or_insert(lw) != lw {
            return refuse(
                format!("{lf}.load_balancing_weight"),
                "unequal locality weights are not supported yet",
            );
        }
        for (j, lb) in locality.lb_endpoints.iter().enumerate() {
            let ef = format!("{lf}.lb_endpoints[{j}]");
            let w = lb.load_balancing_weight.map_or(1, |w| w.value);
            if *weight.get_or_insert(w) != w {
                return refuse(
                    format!("{ef}.load_balancing_weight"),
                    "unequal endpoint weights are not supported yet",
                );
            }
            let healthy = !matches!(
                HealthStatus::try_from(lb.health_status),
                Ok(HealthStatus::Unhealthy | HealthStatus::Draining | HealthStatus::Timeout)
            );
            let Some(lb_endpoint::HostIdentifier::Endpoint(e)) = &lb.host_identifier else {
                return refuse(
                    format!("{ef}.endpoint"),
                    "an endpoint is required (named endpoints are not supported)",
                );
            };
            let addr = socket(e.address.as_ref(), &format!("{ef}.endpoint.address"), names)?;
            let mut e_rest = e.clone();
            e_rest.address = None;
            e_rest.health_check_config = None;
            e_rest.hostname.clear();
            nothing_left(&format!("{ef}.endpoint."), &e_rest)?;
            if healthy {
                out.push(Value::String(addr));
            }
        }
    }
    if la
        .policy
        .as_ref()
        .is_some_and(|p| !p.drop_overloads.is_empty())
    {
        return refuse(format!("{prefix}policy.drop_overloads"), "not supported");
    }
    Ok(out)
}

/// A listener, and the RDS route config it waits for (None: inline or TCP).
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerOut {
    pub table: Table,
    pub rds_name: Option<String>,
}

pub fn listener(l: &Listener, names: &SecretNames) -> Result<ListenerOut> {
    let mut t = Table::new();
    t.insert("name".into(), Value::String(l.name.clone()));
    t.insert(
        "bind".into(),
        Value::String(socket(l.address.as_ref(), "address", false)?),
    );
    let mut rest = l.clone();
    rest.name.clear();
    rest.address = None;
    rest.stat_prefix.clear();
    rest.metadata = None;
    rest.per_connection_buffer_limit_bytes = None;
    rest.drain_type = 0;
    rest.continue_on_listener_filters_timeout = false;
    rest.listener_filters_timeout = None;
    // Protocol sniffers: Pilotfish detects TLS and HTTP/2 by itself.
    for (i, f) in l.listener_filters.iter().enumerate() {
        if !matches!(
            f.name.as_str(),
            "envoy.filters.listener.tls_inspector" | "envoy.filters.listener.http_inspector"
        ) {
            return refuse(
                format!("listener_filters[{i}]"),
                format!("{:?} is not supported", f.name),
            );
        }
    }
    rest.listener_filters.clear();
    match l.traffic_direction {
        0 => {}
        1 => drop(t.insert("direction".into(), Value::String("inbound".into()))),
        2 => drop(t.insert("direction".into(), Value::String("outbound".into()))),
        d => return refuse("traffic_direction", format!("unknown value {d}")),
    }
    rest.traffic_direction = 0;
    let chain = match (l.filter_chains.as_slice(), &l.default_filter_chain) {
        ([c], None) => c,
        ([], Some(c)) => c,
        _ => return refuse("filter_chains", "exactly one filter chain is supported"),
    };
    rest.filter_chains.clear();
    rest.default_filter_chain = None;
    let mut chain_rest = chain.clone();
    chain_rest.name.clear();
    chain_rest.metadata = None;
    chain_rest.filters.clear();
    if let Some(ts) = &chain.transport_socket {
        downstream_tls(ts, names, &mut t)?;
        chain_rest.transport_socket = None;
    }
    nothing_left("filter_chains[0].", &chain_rest)?;
    let [filter] = chain.filters.as_slice() else {
        return refuse(
            "filter_chains[0].filters",
            "exactly one network filter is supported",
        );
    };
    use envoy_types::pb::envoy::config::listener::v3::filter::ConfigType;
    let Some(ConfigType::TypedConfig(any)) = &filter.config_type else {
        return refuse("filter_chains[0].filters[0].typed_config", "required");
    };
    let ff = "filter_chains[0].filters[0].typed_config";
    let rds_name = match any.type_url.as_str() {
        HCM => {
            let h: HttpConnectionManager = unpack(any, HCM, ff)?;
            http_manager(&h, &mut t, &format!("{ff}."))?
        }
        TCP_PROXY => {
            let p: TcpProxy = unpack(any, TCP_PROXY, ff)?;
            t.insert("protocol".into(), Value::String("tcp".into()));
            let Some(tcp_proxy::ClusterSpecifier::Cluster(c)) = &p.cluster_specifier else {
                return refuse(
                    format!("{ff}.weighted_clusters"),
                    "only a single cluster is supported",
                );
            };
            t.insert("cluster".into(), Value::String(c.clone()));
            if let Some(d) = &p.idle_timeout {
                t.insert("idle_timeout".into(), duration(d));
            }
            let mut p_rest = p.clone();
            p_rest.stat_prefix.clear();
            p_rest.cluster_specifier = None;
            p_rest.idle_timeout = None;
            p_rest.access_log.clear();
            nothing_left(&format!("{ff}."), &p_rest)?;
            None
        }
        other => return refuse(ff, format!("network filter {other} is not supported")),
    };
    nothing_left("", &rest)?;
    Ok(ListenerOut { table: t, rds_name })
}

fn http_manager(h: &HttpConnectionManager, t: &mut Table, prefix: &str) -> Result<Option<String>> {
    t.insert("protocol".into(), Value::String("http".into()));
    let mut rest = h.clone();
    rest.stat_prefix.clear();
    // Pilotfish serves HTTP/1.1 and HTTP/2 on every HTTP listener.
    rest.codec_type = 0;
    rest.use_remote_address = None;
    rest.xff_num_trusted_hops = 0;
    rest.generate_request_id = None;
    rest.normalize_path = None;
    rest.access_log.clear();
    rest.server_name.clear();
    rest.stream_idle_timeout = None;
    rest.http2_protocol_options = None;
    rest.http_protocol_options = None;
    if let Some(d) = &h.request_timeout {
        t.insert("request_timeout".into(), duration(d));
        rest.request_timeout = None;
    }
    if let Some(o) = &h.common_http_protocol_options {
        if let Some(d) = &o.idle_timeout {
            t.insert("idle_timeout".into(), duration(d));
        }
        let mut o_rest = *o;
        o_rest.idle_timeout = None;
        o_rest.max_headers_count = None;
        nothing_left(&format!("{prefix}common_http_protocol_options."), &o_rest)?;
        rest.common_http_protocol_options = None;
    }
    if h.merge_slashes {
        t.insert("merge_slashes".into(), Value::Boolean(true));
        rest.merge_slashes = false;
    }
    for (i, f) in h.http_filters.iter().enumerate() {
        use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter::ConfigType;
        let is_router = f.name == "envoy.filters.http.router"
            || matches!(&f.config_type, Some(ConfigType::TypedConfig(a)) if a.type_url == ROUTER);
        if !is_router {
            return refuse(
                format!("{prefix}http_filters[{i}]"),
                format!(
                    "HTTP filter {:?} is not supported (only the router)",
                    f.name
                ),
            );
        }
    }
    rest.http_filters.clear();
    let rds = match &h.route_specifier {
        Some(http_connection_manager::RouteSpecifier::Rds(r)) => Some(r.route_config_name.clone()),
        Some(http_connection_manager::RouteSpecifier::RouteConfig(rc)) => {
            t.insert(
                "routes".into(),
                Value::Array(routes(rc, &format!("{prefix}route_config."))?),
            );
            None
        }
        _ => {
            return refuse(
                format!("{prefix}route_specifier"),
                "rds or route_config is required",
            )
        }
    };
    rest.route_specifier = None;
    nothing_left(prefix, &rest)?;
    Ok(rds)
}

/// A route configuration's routes, in the order Pilotfish matches them:
/// virtual hosts with exact domains first, then wildcard suffixes, then
/// `*` (Envoy picks the most specific domain; Pilotfish the first match).
pub fn routes(rc: &RouteConfiguration, prefix: &str) -> Result<Vec<Value>> {
    let mut rest = rc.clone();
    rest.name.clear();
    rest.virtual_hosts.clear();
    rest.validate_clusters = None;
    nothing_left(prefix, &rest)?;
    let mut ranked: Vec<(u8, String, usize)> = Vec::new();
    for (i, vh) in rc.virtual_hosts.iter().enumerate() {
        for d in &vh.domains {
            let rank = if d == "*" {
                2
            } else if d.starts_with("*.") {
                1
            } else if d.contains('*') {
                return refuse(
                    format!("{prefix}virtual_hosts[{i}].domains"),
                    format!("{d:?}: only exact, \"*.suffix\" and \"*\" domains are supported"),
                );
            } else {
                0
            };
            ranked.push((rank, d.clone(), i));
        }
    }
    ranked.sort_by_key(|(rank, _, i)| (*rank, *i));
    let mut out = Vec::new();
    for (_, domain, i) in ranked {
        let vh = &rc.virtual_hosts[i];
        let vf = format!("{prefix}virtual_hosts[{i}]");
        let edits = vhost_edits(vh, &vf)?;
        for (j, r) in vh.routes.iter().enumerate() {
            let mut t = one_route(r, &format!("{vf}.routes[{j}]"), &edits)?;
            if domain != "*" {
                // Pilotfish matches the authority without its port.
                let host = domain.rsplit_once(':').map_or(domain.as_str(), |(h, p)| {
                    if p.bytes().all(|b| b.is_ascii_digit()) {
                        h
                    } else {
                        domain.as_str()
                    }
                });
                t.insert("host".into(), Value::String(host.to_string()));
            }
            out.push(Value::Table(t));
        }
    }
    // Several domains of a vhost that differ only by port give the same
    // route twice; the first is the one that matches.
    out.dedup();
    Ok(out)
}

fn vhost_edits(vh: &VirtualHost, vf: &str) -> Result<Table> {
    let mut rest = vh.clone();
    rest.name.clear();
    rest.domains.clear();
    rest.routes.clear();
    let mut edits = Table::new();
    header_edits(
        &vh.request_headers_to_add,
        &vh.request_headers_to_remove,
        &mut edits,
        &format!("{vf}."),
    )?;
    rest.request_headers_to_add.clear();
    rest.request_headers_to_remove.clear();
    nothing_left(&format!("{vf}."), &rest)?;
    Ok(edits)
}

fn header_edits(
    add: &[HeaderValueOption],
    remove: &[String],
    into: &mut Table,
    prefix: &str,
) -> Result<()> {
    for (i, o) in add.iter().enumerate() {
        let Some(h) = &o.header else {
            return refuse(
                format!("{prefix}request_headers_to_add[{i}].header"),
                "required",
            );
        };
        // APPEND_IF_EXISTS_OR_ADD (0, Envoy's default) adds; OVERWRITE_IF_EXISTS_OR_ADD sets.
        let append = o.append.map_or(o.append_action == 0, |a| a.value);
        let key = match (append, o.append_action) {
            (true, _) => "add",
            (false, 0 | 2) => "set",
            (false, _) => {
                return refuse(
                    format!("{prefix}request_headers_to_add[{i}].append_action"),
                    "only APPEND_IF_EXISTS_OR_ADD and OVERWRITE_IF_EXISTS_OR_ADD are supported",
                )
            }
        };
        let table = into
            .entry(key)
            .or_insert_with(|| Value::Table(Table::new()))
            .as_table_mut()
            .expect("inserted as a table");
        table.insert(h.key.to_ascii_lowercase(), Value::String(h.value.clone()));
    }
    if !remove.is_empty() {
        into.insert(
            "remove".into(),
            Value::Array(
                remove
                    .iter()
                    .map(|r| Value::String(r.to_ascii_lowercase()))
                    .collect(),
            ),
        );
    }
    Ok(())
}

fn one_route(r: &Route, rf: &str, vhost_edits: &Table) -> Result<Table> {
    let mut t = Table::new();
    let mut rest = r.clone();
    if !r.name.is_empty() {
        t.insert("name".into(), Value::String(r.name.clone()));
    }
    rest.name.clear();
    rest.metadata = None;
    rest.decorator = None;
    let m = r.r#match.clone().unwrap_or_default();
    match &m.path_specifier {
        Some(route_match::PathSpecifier::Prefix(p)) if p.is_empty() || p == "/" => {}
        Some(route_match::PathSpecifier::Prefix(p)) => {
            drop(t.insert("path_prefix".into(), Value::String(p.clone())))
        }
        Some(route_match::PathSpecifier::Path(p)) => {
            drop(t.insert("path".into(), Value::String(p.clone())))
        }
        _ => {
            return refuse(
                format!("{rf}.match.path_specifier"),
                "only prefix and path matches are supported",
            )
        }
    }
    if m.case_sensitive.is_some_and(|c| !c.value) {
        return refuse(
            format!("{rf}.match.case_sensitive"),
            "case-insensitive paths are not supported",
        );
    }
    let mut headers = Table::new();
    for (i, h) in m.headers.iter().enumerate() {
        let hf = format!("{rf}.match.headers[{i}]");
        let value = match &h.header_match_specifier {
            Some(header_matcher::HeaderMatchSpecifier::ExactMatch(v)) => v.clone(),
            Some(header_matcher::HeaderMatchSpecifier::StringMatch(s))
                if !s.ignore_case
                    && matches!(
                        s.match_pattern,
                        Some(string_matcher::MatchPattern::Exact(_))
                    ) =>
            {
                match &s.match_pattern {
                    Some(string_matcher::MatchPattern::Exact(v)) => v.clone(),
                    _ => unreachable!("matched above"),
                }
            }
            _ => return refuse(hf, "only exact header matches are supported"),
        };
        if h.invert_match || h.treat_missing_header_as_empty {
            return refuse(hf, "inverted matches are not supported");
        }
        if h.name == ":method" {
            t.insert("method".into(), Value::String(value));
        } else {
            headers.insert(h.name.to_ascii_lowercase(), Value::String(value));
        }
    }
    if !headers.is_empty() {
        t.insert("headers".into(), Value::Table(headers));
    }
    let mut m_rest = m.clone();
    m_rest.path_specifier = None;
    m_rest.case_sensitive = None;
    m_rest.headers.clear();
    nothing_left(&format!("{rf}.match."), &m_rest)?;
    rest.r#match = None;
    let Some(route::Action::Route(a)) = &r.action else {
        return refuse(
            format!("{rf}.action"),
            "only route actions are supported (no redirect or direct response)",
        );
    };
    rest.action = None;
    let mut a_rest = a.clone();
    match &a.cluster_specifier {
        Some(route_action::ClusterSpecifier::Cluster(c)) => {
            drop(t.insert("cluster".into(), Value::String(c.clone())))
        }
        Some(route_action::ClusterSpecifier::WeightedClusters(w)) => {
            let mut list = Vec::new();
            for (i, cw) in w.clusters.iter().enumerate() {
                let mut cw_rest = cw.clone();
                cw_rest.name.clear();
                cw_rest.weight = None;
                nothing_left(
                    &format!("{rf}.route.weighted_clusters.clusters[{i}]."),
                    &cw_rest,
                )?;
                let mut e = Table::new();
                e.insert("cluster".into(), Value::String(cw.name.clone()));
                e.insert(
                    "weight".into(),
                    Value::Integer(i64::from(cw.weight.map_or(0, |v| v.value))),
                );
                list.push(Value::Table(e));
            }
            let mut w_rest = w.clone();
            w_rest.clusters.clear();
            w_rest.total_weight = None;
            nothing_left(&format!("{rf}.route.weighted_clusters."), &w_rest)?;
            t.insert("weighted".into(), Value::Array(list));
        }
        _ => {
            return refuse(
                format!("{rf}.route.cluster_specifier"),
                "cluster or weighted_clusters is required",
            )
        }
    }
    a_rest.cluster_specifier = None;
    if let Some(d) = &a.timeout {
        t.insert("timeout".into(), duration(d));
        a_rest.timeout = None;
    }
    if let Some(p) = &a.retry_policy {
        t.insert(
            "retry".into(),
            Value::Table(retry(p, &format!("{rf}.route.retry_policy"))?),
        );
        a_rest.retry_policy = None;
    }
    a_rest.cluster_not_found_response_code = 0;
    nothing_left(&format!("{rf}.route."), &a_rest)?;
    let mut edits = vhost_edits.clone();
    header_edits(
        &r.request_headers_to_add,
        &r.request_headers_to_remove,
        &mut edits,
        &format!("{rf}."),
    )?;
    rest.request_headers_to_add.clear();
    rest.request_headers_to_remove.clear();
    if !edits.is_empty() {
        t.insert("request_headers".into(), Value::Table(edits));
    }
    nothing_left(&format!("{rf}."), &rest)?;
    Ok(t)
}

fn retry(p: &RetryPolicy, field: &str) -> Result<Table> {
    let mut on: Vec<Value> = Vec::new();
    let mut push = |s: String| {
        let v = Value::String(s);
        if !on.contains(&v) {
            on.push(v);
        }
    };
    for cond in p
        .retry_on
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
    {
        match cond {
            "5xx" => (500..=599).for_each(|c: u16| push(c.to_string())),
            "gateway-error" => [502u16, 503, 504].iter().for_each(|c| push(c.to_string())),
            "connect-failure" => push("connect_failure".into()),
            "reset" | "refused-stream" => push("reset".into()),
            "retriable-status-codes" => {
                for c in &p.retriable_status_codes {
                    if !(500..=599).contains(c) {
                        return refuse(
                            format!("{field}.retriable_status_codes"),
                            format!("{c}: only 5xx statuses are retried"),
                        );
                    }
                    push(c.to_string());
                }
            }
            "cancelled" | "deadline-exceeded" | "resource-exhausted" | "unavailable" => {
                push(cond.replace('-', "_"))
            }
            other => {
                return refuse(
                    format!("{field}.retry_on"),
                    format!("{other:?} is not supported"),
                )
            }
        }
    }
    let mut t = Table::new();
    let retries = p.num_retries.map_or(1, |n| n.value);
    t.insert("attempts".into(), Value::Integer(i64::from(retries) + 1));
    t.insert("on".into(), Value::Array(on));
    let mut rest = p.clone();
    rest.retry_on.clear();
    rest.num_retries = None;
    rest.retriable_status_codes.clear();
    // Envoy's default back-off; Pilotfish's own is similar and bounded.
    rest.retry_back_off = None;
    rest.host_selection_retry_max_attempts = 0;
    rest.retry_host_predicate.clear();
    nothing_left(&format!("{field}."), &rest)?;
    Ok(t)
}

/// A table keyed by name, for sorting outputs stably.
/// A transport socket's typed config: Ok(None) for plaintext (raw buffer).
fn transport_socket<M: Message + Default>(
    ts: &envoy_types::pb::envoy::config::core::v3::TransportSocket,
    url: &str,
    field: &str,
) -> Result<Option<M>> {
    use envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType;
    let Some(ConfigType::TypedConfig(any)) = &ts.config_type else {
        return refuse(format!("{field}.typed_config"), "required");
    };
    if any.type_url == RAW_BUFFER {
        return Ok(None);
    }
    unpack(any, url, &format!("{field}.typed_config")).map(Some)
}

/// Checks that a TLS context presents the workload's certificate and
/// verifies peers with its trust bundle (the only material Pilotfish has),
/// and returns its peer SAN matchers, each with its field.
fn common_tls(
    c: &CommonTlsContext,
    names: &SecretNames,
    field: &str,
) -> Result<Vec<(String, StringMatcher)>> {
    use common_tls_context::ValidationContextType as V;
    let mut rest = c.clone();
    let cf = format!("{field}.tls_certificate_sds_secret_configs");
    match c.tls_certificate_sds_secret_configs.as_slice() {
        [s] if s.name == names.certificate => {}
        [s] => {
            return refuse(
                format!("{cf}[0].name"),
                format!(
                    "{:?} is not the workload's certificate (xds.certificate_secret is {:?})",
                    s.name, names.certificate
                ),
            )
        }
        [] => {
            return refuse(
                cf,
                format!(
                    "required: Pilotfish presents the workload's certificate, the secret {:?}",
                    names.certificate
                ),
            )
        }
        _ => return refuse(cf, "one certificate only (the workload's)"),
    }
    rest.tls_certificate_sds_secret_configs.clear();
    for (i, p) in c.alpn_protocols.iter().enumerate() {
        if !matches!(p.as_str(), "h2" | "http/1.1") {
            return refuse(
                format!("{field}.alpn_protocols[{i}]"),
                format!("{p:?}: Pilotfish offers h2 and http/1.1, as each protocol needs"),
            );
        }
    }
    rest.alpn_protocols.clear();
    if let Some(p) = &c.tls_params {
        // 0 is "auto", 3 TLS 1.2, 4 TLS 1.3. Pilotfish speaks TLS 1.3 (and
        // 1.2 where [tls] allows it): a range without 1.3 is not honoured.
        let (min, max) = (
            p.tls_minimum_protocol_version,
            p.tls_maximum_protocol_version,
        );
        if !(0..=4).contains(&min) || !matches!(max, 0 | 4) {
            return refuse(
                format!("{field}.tls_params"),
                "a protocol range without TLS 1.3 cannot be honoured",
            );
        }
        let mut p_rest = p.clone();
        p_rest.tls_minimum_protocol_version = 0;
        p_rest.tls_maximum_protocol_version = 0;
        nothing_left(&format!("{field}.tls_params."), &p_rest)?;
        rest.tls_params = None;
    }
    let vf = format!("{field}.combined_validation_context");
    let (bundle, context, context_field) = match &c.validation_context_type {
        Some(V::ValidationContextSdsSecretConfig(s)) => (Some(s), None, String::new()),
        Some(V::CombinedValidationContext(cv)) => {
            let mut cv_rest = cv.clone();
            cv_rest.default_validation_context = None;
            cv_rest.validation_context_sds_secret_config = None;
            nothing_left(&format!("{vf}."), &cv_rest)?;
            (
                cv.validation_context_sds_secret_config.as_ref(),
                cv.default_validation_context.as_ref(),
                format!("{vf}.default_validation_context"),
            )
        }
        Some(V::ValidationContext(_)) => {
            return refuse(
                format!("{field}.validation_context"),
                "inline trust anchors are not supported: name the trust bundle's secret",
            )
        }
        Some(_) => {
            return refuse(
                format!("{field}.validation_context_type"),
                "certificate providers are not supported",
            )
        }
        None => {
            return refuse(
                format!("{field}.validation_context_type"),
                "required: peers are verified with the workload's trust bundle",
            )
        }
    };
    match bundle {
        Some(s) if s.name == names.trust_bundle => {}
        Some(s) => {
            return refuse(
                format!("{field}.validation_context_sds_secret_config.name"),
                format!(
                    "{:?} is not the workload's trust bundle (xds.trust_bundle_secret is {:?})",
                    s.name, names.trust_bundle
                ),
            )
        }
        None => {
            return refuse(
                format!("{vf}.validation_context_sds_secret_config"),
                format!(
                "required: peers are verified with the workload's trust bundle, the secret {:?}",
                names.trust_bundle
            ),
            )
        }
    }
    rest.validation_context_type = None;
    nothing_left(&format!("{field}."), &rest)?;
    let mut sans = Vec::new();
    if let Some(v) = context {
        for (i, m) in v.match_typed_subject_alt_names.iter().enumerate() {
            let mf = format!("{context_field}.match_typed_subject_alt_names[{i}]");
            // 3: URI, where a SPIFFE ID lives.
            if m.san_type != 3 || !m.oid.is_empty() {
                return refuse(
                    format!("{mf}.san_type"),
                    "only URI SANs (SPIFFE IDs) are matched",
                );
            }
            let Some(matcher) = &m.matcher else {
                return refuse(format!("{mf}.matcher"), "required");
            };
            sans.push((format!("{mf}.matcher"), matcher.clone()));
        }
        for (i, m) in v.match_subject_alt_names.iter().enumerate() {
            let mf = format!("{context_field}.match_subject_alt_names[{i}]");
            sans.push((mf, m.clone()));
        }
        let mut v_rest = v.clone();
        v_rest.match_typed_subject_alt_names.clear();
        v_rest.match_subject_alt_names.clear();
        nothing_left(&format!("{context_field}."), &v_rest)?;
    }
    Ok(sans)
}

/// A cluster's UpstreamTlsContext as its `tls` table: the one SPIFFE ID
/// its endpoints must prove, and the SNI to send. None: plaintext.
fn upstream_tls(
    ts: &envoy_types::pb::envoy::config::core::v3::TransportSocket,
    names: &SecretNames,
) -> Result<Option<Table>> {
    let field = "transport_socket";
    let Some(u) = transport_socket::<UpstreamTlsContext>(ts, UPSTREAM_TLS, field)? else {
        return Ok(None);
    };
    let cf = format!("{field}.typed_config.common_tls_context");
    let Some(common) = &u.common_tls_context else {
        return refuse(cf, "required");
    };
    let sans = common_tls(common, names, &cf)?;
    let identity = match sans.as_slice() {
        [(f, m)] => match (&m.match_pattern, m.ignore_case) {
            (Some(string_matcher::MatchPattern::Exact(id)), false) => id.clone(),
            _ => {
                return refuse(
                    f.clone(),
                    "an exact, case-sensitive SPIFFE ID is required (a cluster proves one identity)",
                )
            }
        },
        [] => {
            return refuse(
                format!("{cf}.combined_validation_context.default_validation_context.match_typed_subject_alt_names"),
                "required: the SPIFFE ID the cluster's endpoints must prove",
            )
        }
        [_, (f, _), ..] => {
            return refuse(
                f.clone(),
                "one identity per cluster is supported",
            )
        }
    };
    let mut tls = Table::new();
    tls.insert("server_identity".into(), Value::String(identity));
    if !u.sni.is_empty() {
        tls.insert("sni".into(), Value::String(u.sni.clone()));
    }
    let mut rest = u.clone();
    rest.common_tls_context = None;
    rest.sni.clear();
    // A bound on remembered sessions: Pilotfish bounds its own cache.
    rest.max_session_keys = None;
    nothing_left(&format!("{field}.typed_config."), &rest)?;
    Ok(Some(tls))
}

/// A filter chain's DownstreamTlsContext as the listener's `tls` table
/// and `authorize` list (its SAN matchers: exact SPIFFE IDs, or prefixes
/// ending in `/`).
fn downstream_tls(
    ts: &envoy_types::pb::envoy::config::core::v3::TransportSocket,
    names: &SecretNames,
    t: &mut Table,
) -> Result<()> {
    let field = "filter_chains[0].transport_socket";
    let Some(d) = transport_socket::<DownstreamTlsContext>(ts, DOWNSTREAM_TLS, field)? else {
        return Ok(());
    };
    let cf = format!("{field}.typed_config.common_tls_context");
    let Some(common) = &d.common_tls_context else {
        return refuse(cf, "required");
    };
    let sans = common_tls(common, names, &cf)?;
    let require = d.require_client_certificate.is_some_and(|b| b.value);
    let mut authorize = Vec::new();
    for (f, m) in &sans {
        let pattern =
            match (&m.match_pattern, m.ignore_case) {
                (Some(string_matcher::MatchPattern::Exact(id)), false) => id.clone(),
                (Some(string_matcher::MatchPattern::Prefix(p)), false) if p.ends_with('/') => {
                    format!("{p}*")
                }
                _ => return refuse(
                    f.clone(),
                    "only exact SPIFFE IDs and prefixes ending in / are matched (case-sensitive)",
                ),
            };
        authorize.push(Value::String(pattern));
    }
    if !authorize.is_empty() && !require {
        return refuse(
            format!("{field}.typed_config.require_client_certificate"),
            "SAN matchers need a client certificate to match",
        );
    }
    let mut tls = Table::new();
    tls.insert("require_client_cert".into(), Value::Boolean(require));
    t.insert("tls".into(), Value::Table(tls));
    if !authorize.is_empty() {
        t.insert("authorize".into(), Value::Array(authorize));
    }
    let mut rest = d.clone();
    rest.common_tls_context = None;
    rest.require_client_certificate = None;
    nothing_left(&format!("{field}.typed_config."), &rest)?;
    Ok(())
}

/// What one SDS secret holds, in PEM.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretOut {
    /// A workload certificate chain (leaf first) and its private key.
    Certificate { chain: Vec<u8>, key: Vec<u8> },
    /// CA certificates (a trust bundle).
    TrustBundle(Vec<u8>),
}

impl std::fmt::Debug for SecretOut {
    // A private key is never printed, not even in a debug log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Certificate { chain, .. } => write!(f, "Certificate({} bytes)", chain.len()),
            Self::TrustBundle(b) => write!(f, "TrustBundle({} bytes)", b.len()),
        }
    }
}

/// An SDS secret: a TLS certificate with its key, or a validation
/// context's trusted CAs, inline. Bytes named by file or environment
/// variable are refused: the point of SDS is that the control plane
/// hands over the material, and a path it names need not exist here.
pub fn secret(sec: &Secret) -> Result<SecretOut> {
    use envoy_types::pb::envoy::config::core::v3::{data_source::Specifier, DataSource};
    fn inline(d: Option<&DataSource>, field: &str) -> Result<Vec<u8>> {
        let Some(d) = d else {
            return refuse(field, "required");
        };
        let pem = match &d.specifier {
            Some(Specifier::InlineBytes(b)) => b.clone(),
            Some(Specifier::InlineString(s)) => s.clone().into_bytes(),
            Some(Specifier::Filename(_)) => {
                return refuse(
                    format!("{field}.filename"),
                    "material named by path is not read; push it inline (inline_bytes or inline_string)",
                )
            }
            Some(Specifier::EnvironmentVariable(_)) => {
                return refuse(
                    format!("{field}.environment_variable"),
                    "material named by environment variable is not read; push it inline",
                )
            }
            None => return refuse(field, "empty"),
        };
        if d.watched_directory.is_some() {
            return refuse(
                format!("{field}.watched_directory"),
                "set, and only inline material is read",
            );
        }
        if pem.len() as u64 > crate::tls::material::PEM_BYTES_MAX {
            return refuse(
                field,
                format!(
                    "{} bytes; the limit is {}",
                    pem.len(),
                    crate::tls::material::PEM_BYTES_MAX
                ),
            );
        }
        Ok(pem)
    }
    match &sec.r#type {
        Some(secret::Type::TlsCertificate(c)) => {
            let chain = inline(
                c.certificate_chain.as_ref(),
                "tls_certificate.certificate_chain",
            )?;
            let key = inline(c.private_key.as_ref(), "tls_certificate.private_key")?;
            let mut rest = c.clone();
            rest.certificate_chain = None;
            rest.private_key = None;
            nothing_left("tls_certificate.", &rest)?;
            Ok(SecretOut::Certificate { chain, key })
        }
        Some(secret::Type::ValidationContext(v)) => {
            let bundle = inline(v.trusted_ca.as_ref(), "validation_context.trusted_ca")?;
            let mut rest = v.clone();
            rest.trusted_ca = None;
            nothing_left("validation_context.", &rest)?;
            Ok(SecretOut::TrustBundle(bundle))
        }
        Some(secret::Type::SessionTicketKeys(_)) => refuse(
            "session_ticket_keys",
            "not supported (each worker keeps its own resumption state)",
        ),
        Some(secret::Type::GenericSecret(_)) => refuse(
            "generic_secret",
            "not supported (only a TLS certificate or a trust bundle)",
        ),
        None => refuse("type", "the secret holds nothing"),
    }
}

pub fn by_name(list: impl IntoIterator<Item = Table>) -> BTreeMap<String, Table> {
    list.into_iter()
        .map(|t| {
            let name = t
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            (name, t)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::{
        config::{
            core::v3::{transport_socket, SocketAddress, TransportSocket},
            endpoint::v3::{lb_endpoint, Endpoint, LbEndpoint, LocalityLbEndpoints},
        },
        extensions::transport_sockets::tls::v3::{CertificateValidationContext, SdsSecretConfig},
    };

    fn at(host: &str, port: u32) -> Address {
        Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: host.into(),
                port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
                ..SocketAddress::default()
            })),
        }
    }

    fn assignment(host: &str) -> ClusterLoadAssignment {
        ClusterLoadAssignment {
            cluster_name: "orders".into(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(at(host, 8080)),
                        ..Endpoint::default()
                    })),
                    ..LbEndpoint::default()
                }],
                ..LocalityLbEndpoints::default()
            }],
            ..ClusterLoadAssignment::default()
        }
    }

    fn tls_socket(url: &str, m: &impl Message) -> TransportSocket {
        TransportSocket {
            name: "envoy.transport_sockets.tls".into(),
            config_type: Some(transport_socket::ConfigType::TypedConfig(Any {
                type_url: url.into(),
                value: m.encode_to_vec(),
            })),
        }
    }

    fn common(sans: Vec<StringMatcher>) -> CommonTlsContext {
        CommonTlsContext {
            tls_certificate_sds_secret_configs: vec![SdsSecretConfig {
                name: "default".into(),
                ..SdsSecretConfig::default()
            }],
            alpn_protocols: vec!["h2".into(), "http/1.1".into()],
            validation_context_type: Some(
                common_tls_context::ValidationContextType::CombinedValidationContext(
                    common_tls_context::CombinedCertificateValidationContext {
                        default_validation_context: Some(CertificateValidationContext {
                            match_subject_alt_names: sans,
                            ..CertificateValidationContext::default()
                        }),
                        validation_context_sds_secret_config: Some(SdsSecretConfig {
                            name: "ROOTCA".into(),
                            ..SdsSecretConfig::default()
                        }),
                        ..Default::default()
                    },
                ),
            ),
            ..CommonTlsContext::default()
        }
    }

    fn exact(s: &str) -> StringMatcher {
        StringMatcher {
            match_pattern: Some(string_matcher::MatchPattern::Exact(s.into())),
            ..StringMatcher::default()
        }
    }

    fn names() -> SecretNames {
        SecretNames {
            certificate: "default".into(),
            trust_bundle: "ROOTCA".into(),
        }
    }

    #[test]
    fn an_upstream_tls_context_becomes_the_clusters_expected_identity() {
        let orders = "spiffe://mesh.local/ns/prod/sa/orders";
        let mut u = UpstreamTlsContext {
            common_tls_context: Some(common(vec![exact(orders)])),
            sni: "outbound_.8080_._.orders.prod.svc.cluster.local".into(),
            ..UpstreamTlsContext::default()
        };
        let mut c = Cluster {
            name: "orders".into(),
            transport_socket: Some(tls_socket(UPSTREAM_TLS, &u)),
            ..Cluster::default()
        };
        let out = cluster(&c, &names()).unwrap();
        let tls = out.table["tls"].as_table().unwrap();
        assert_eq!(tls["server_identity"].as_str(), Some(orders));
        assert_eq!(tls["sni"].as_str(), Some(u.sni.as_str()));

        // Another secret than the workload's, two identities, a prefix, or
        // an ALPN Pilotfish does not speak: each refused by field.
        let other = SecretNames {
            certificate: "other".into(),
            ..names()
        };
        let e = cluster(&c, &other).unwrap_err();
        assert!(
            e.field
                .ends_with("tls_certificate_sds_secret_configs[0].name"),
            "{e}"
        );
        u.common_tls_context = Some(common(vec![exact(orders), exact(orders)]));
        c.transport_socket = Some(tls_socket(UPSTREAM_TLS, &u));
        let e = cluster(&c, &names()).unwrap_err();
        assert!(e.field.ends_with("match_subject_alt_names[1]"), "{e}");
        let mut prefix = exact("");
        prefix.match_pattern = Some(string_matcher::MatchPattern::Prefix(
            "spiffe://mesh.local/".into(),
        ));
        u.common_tls_context = Some(common(vec![prefix]));
        c.transport_socket = Some(tls_socket(UPSTREAM_TLS, &u));
        let e = cluster(&c, &names()).unwrap_err();
        assert!(e.field.ends_with("match_subject_alt_names[0]"), "{e}");
        let mut ctx = common(vec![exact(orders)]);
        ctx.alpn_protocols = vec!["istio-peer-exchange".into()];
        u.common_tls_context = Some(ctx);
        c.transport_socket = Some(tls_socket(UPSTREAM_TLS, &u));
        let e = cluster(&c, &names()).unwrap_err();
        assert!(e.field.ends_with("alpn_protocols[0]"), "{e}");
    }

    #[test]
    fn a_downstream_tls_context_becomes_the_listeners_tls_and_authorize() {
        use envoy_types::pb::{
            envoy::config::listener::v3::{filter, Filter, FilterChain},
            google::protobuf::BoolValue,
        };
        let mut prefix = exact("");
        prefix.match_pattern = Some(string_matcher::MatchPattern::Prefix(
            "spiffe://mesh.local/ns/prod/".into(),
        ));
        let d = DownstreamTlsContext {
            common_tls_context: Some(common(vec![
                exact("spiffe://mesh.local/ns/ops/sa/admin"),
                prefix,
            ])),
            require_client_certificate: Some(BoolValue { value: true }),
            ..DownstreamTlsContext::default()
        };
        let proxy = TcpProxy {
            stat_prefix: "in".into(),
            cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster("app".into())),
            ..TcpProxy::default()
        };
        let mut l = Listener {
            name: "inbound".into(),
            address: Some(at("127.0.0.1", 15006)),
            filter_chains: vec![FilterChain {
                filters: vec![Filter {
                    name: "envoy.filters.network.tcp_proxy".into(),
                    config_type: Some(filter::ConfigType::TypedConfig(Any {
                        type_url: TCP_PROXY.into(),
                        value: proxy.encode_to_vec(),
                    })),
                }],
                transport_socket: Some(tls_socket(DOWNSTREAM_TLS, &d)),
                ..FilterChain::default()
            }],
            ..Listener::default()
        };
        let out = listener(&l, &names()).unwrap();
        assert_eq!(
            out.table["tls"]["require_client_cert"].as_bool(),
            Some(true)
        );
        let authorize: Vec<_> = out.table["authorize"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(
            authorize,
            [
                "spiffe://mesh.local/ns/ops/sa/admin",
                "spiffe://mesh.local/ns/prod/*"
            ]
        );
        // Matchers without a client certificate to match are refused.
        let mut optional = d.clone();
        optional.require_client_certificate = None;
        l.filter_chains[0].transport_socket = Some(tls_socket(DOWNSTREAM_TLS, &optional));
        let e = listener(&l, &names()).unwrap_err();
        assert!(e.field.ends_with("require_client_certificate"), "{e}");
    }

    #[test]
    fn secrets_are_taken_inline_and_anything_else_is_refused_by_field() {
        use envoy_types::pb::envoy::{
            config::core::v3::{data_source::Specifier, DataSource},
            extensions::transport_sockets::tls::v3::{
                CertificateValidationContext, TlsCertificate,
            },
        };
        let inline = |s: &str| {
            Some(DataSource {
                specifier: Some(Specifier::InlineString(s.into())),
                ..DataSource::default()
            })
        };
        let mut cert = TlsCertificate {
            certificate_chain: inline("CHAIN"),
            private_key: inline("KEY"),
            ..TlsCertificate::default()
        };
        let sec = |t| Secret {
            name: "default".into(),
            r#type: Some(t),
        };
        assert_eq!(
            secret(&sec(secret::Type::TlsCertificate(cert.clone()))),
            Ok(SecretOut::Certificate {
                chain: b"CHAIN".to_vec(),
                key: b"KEY".to_vec()
            })
        );
        cert.password = inline("hunter2");
        assert_eq!(
            secret(&sec(secret::Type::TlsCertificate(cert.clone())))
                .unwrap_err()
                .field,
            "tls_certificate.password"
        );
        cert.password = None;
        cert.private_key = Some(DataSource {
            specifier: Some(Specifier::Filename("/etc/key.pem".into())),
            ..DataSource::default()
        });
        assert_eq!(
            secret(&sec(secret::Type::TlsCertificate(cert)))
                .unwrap_err()
                .field,
            "tls_certificate.private_key.filename"
        );
        let mut v = CertificateValidationContext {
            trusted_ca: inline("CA"),
            ..CertificateValidationContext::default()
        };
        assert_eq!(
            secret(&sec(secret::Type::ValidationContext(v.clone()))),
            Ok(SecretOut::TrustBundle(b"CA".to_vec()))
        );
        v.allow_expired_certificate = true;
        assert_eq!(
            secret(&sec(secret::Type::ValidationContext(v)))
                .unwrap_err()
                .field,
            "validation_context.allow_expired_certificate"
        );
    }

    #[test]
    fn host_names_only_in_strict_dns_clusters() {
        let mut c = Cluster {
            name: "orders".into(),
            cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
                cluster::DiscoveryType::StrictDns as i32,
            )),
            load_assignment: Some(assignment("orders.svc.local")),
            ..Cluster::default()
        };
        let out = cluster(&c, &SecretNames::default()).unwrap();
        assert_eq!(
            out.table["endpoints"],
            Value::Array(vec![Value::String("orders.svc.local:8080".into())])
        );
        c.cluster_discovery_type = None;
        let e = cluster(&c, &SecretNames::default()).unwrap_err();
        assert!(e.field.ends_with("endpoint.address.address"), "{e}");
        assert!(endpoints(&assignment("orders.svc.local"), "", false).is_err());
    }

    #[test]
    fn an_unknown_field_is_named() {
        let c = Cluster {
            name: "orders".into(),
            upstream_bind_config: Some(Default::default()),
            ..Cluster::default()
        };
        assert_eq!(
            cluster(&c, &SecretNames::default()).unwrap_err().field,
            "upstream_bind_config"
        );
    }
}
