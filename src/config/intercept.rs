//! The `[intercept]` table and cluster `destinations`: what transparent
//! interception captures, and which cluster an original destination picks.
//!
//! What must hold: the listeners [intercept] names exist, have `protocol =
//! "auto"` and a fixed port (the redirect rules point at it); the proxy's
//! uid is always given (its traffic must never be captured again, or every
//! connection loops); every list is bounded; a destination that parses as
//! neither an address, a CIDR, a port nor a host name is an error naming
//! its place in the file.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::{duration::HumanDuration, ConfigError, Validator};

/// Longest a connection on the outbound listener may take to send enough
/// bytes to tell its protocol. A client-first protocol sends at once; past
/// this the connection is treated as opaque TCP (a server-first protocol
/// on a port not declared opaque waits this long once per connection).
pub const DETECT_TIMEOUT_DEFAULT: Duration = Duration::from_secs(5);
/// Cap on each port and CIDR list: each entry is a rule element checked
/// per new connection by the kernel, and a list this long is a mistake.
pub const INTERCEPT_LIST_MAX: usize = 256;
/// Cap on `destinations` per cluster; matching is a linear scan per
/// intercepted connection (not per request), so this bounds its cost.
pub const DESTINATIONS_PER_CLUSTER_MAX: usize = 256;

/// The validated `[intercept]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Intercept {
    /// Index of the listener outbound connections are redirected to.
    pub outbound_listener: Option<usize>,
    /// Index of the listener inbound connections are redirected to.
    pub inbound_listener: Option<usize>,
    /// The proxy's uid: its own connections are never redirected.
    pub proxy_uid: u32,
    /// The proxy's gid, excluded too when given.
    pub proxy_gid: Option<u32>,
    /// Inbound ports that reach the app without the proxy (ssh, health).
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound ports never captured.
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destinations never captured.
    pub exclude_outbound_cidrs: Vec<Cidr>,
    /// When not empty, only these outbound destinations are captured.
    pub include_outbound_cidrs: Vec<Cidr>,
    /// What happens to an outbound connection no cluster's `destinations`
    /// match.
    pub outbound_policy: OutboundPolicy,
    /// Whether plaintext callers are let in on intercepted inbound ports.
    pub inbound_mode: InboundMode,
    /// Destination ports whose protocol is opaque TCP without detection
    /// (server-first protocols: the client waits for the server, so
    /// detection would wait out its timeout).
    pub opaque_ports: Vec<u16>,
    #[serde(with = "super::humantime_serde_compat")]
    pub detect_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutboundPolicy {
    /// Forward to where the app meant to go, as plain TCP (counted).
    Passthrough,
    /// Close the connection (counted).
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InboundMode {
    /// Only mTLS from mesh peers.
    Strict,
    /// mTLS from mesh peers, and plaintext from callers outside the mesh
    /// (counted and logged as plaintext; no identity, so any `authorize`
    /// list refuses them).
    Permissive,
}

/// Which side of the workload an intercept listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// The app's own connections out.
    Outbound,
    /// Connections from callers in.
    Inbound,
}

impl Direction {
    pub fn name(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// An IP network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Option<Cidr> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().ok()?, p.parse::<u8>().ok()?),
            None => {
                let a = text.parse::<IpAddr>().ok()?;
                (a, if a.is_ipv4() { 32 } else { 128 })
            }
        };
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= bits).then_some(Cidr { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// One entry of a cluster's `destinations`: `"10.0.0.7:8080"`,
/// `"10.0.0.0/8"`, `"10.0.0.0/8:80"`, `"[fd00::1]:80"`, `":8080"` (any
/// address), or a host name matched against a TLS ClientHello's SNI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Destination {
    Net {
        net: Option<Cidr>,
        port: Option<u16>,
    },
    Sni(String),
}

impl Destination {
    pub fn parse(text: &str) -> Option<Destination> {
        if let Some(port) = text.strip_prefix(':') {
            return Some(Destination::Net {
                net: None,
                port: Some(port.parse().ok().filter(|p| *p != 0)?),
            });
        }
        if let Ok(sa) = text.parse::<SocketAddr>() {
            let net = Cidr::parse(&sa.ip().to_string())?;
            return Some(Destination::Net {
                net: Some(net),
                port: Some(sa.port()).filter(|p| *p != 0),
            });
        }
        if let Some(net) = Cidr::parse(text.trim_start_matches('[').trim_end_matches(']')) {
            return Some(Destination::Net {
                net: Some(net),
                port: None,
            });
        }
        // "CIDR:port" (IPv4) and "[CIDR]:port" (IPv6).
        if let Some((net, port)) = text.rsplit_once(':') {
            let net = net.trim_start_matches('[').trim_end_matches(']');
            if let (Some(net), Ok(port)) = (Cidr::parse(net), port.parse::<u16>()) {
                return Some(Destination::Net {
                    net: Some(net),
                    port: Some(port),
                });
            }
        }
        let host = text.to_ascii_lowercase();
        let valid = !host.is_empty()
            && host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            && !host.bytes().all(|b| b.is_ascii_digit() || b == b'.');
        valid.then_some(Destination::Sni(host))
    }

    /// Whether a connection to `dst` (with this SNI, if TLS) is for this
    /// destination.
    pub fn matches(&self, dst: SocketAddr, sni: Option<&str>) -> bool {
        match self {
            Destination::Net { net, port } => {
                port.is_none_or(|p| p == dst.port()) && net.is_none_or(|n| n.contains(dst.ip()))
            }
            Destination::Sni(host) => sni.is_some_and(|s| s.eq_ignore_ascii_case(host)),
        }
    }
}

pub(super) mod raw {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Intercept {
        pub outbound_listener: Option<Spanned<String>>,
        pub inbound_listener: Option<Spanned<String>>,
        pub proxy_uid: Option<Spanned<u32>>,
        pub proxy_gid: Option<u32>,
        pub exclude_inbound_ports: Option<Spanned<Vec<u16>>>,
        pub exclude_outbound_ports: Option<Spanned<Vec<u16>>>,
        pub exclude_outbound_cidrs: Option<Spanned<Vec<Spanned<String>>>>,
        pub include_outbound_cidrs: Option<Spanned<Vec<Spanned<String>>>>,
        pub outbound_policy: Option<OutboundPolicy>,
        pub inbound_mode: Option<InboundMode>,
        pub opaque_ports: Option<Spanned<Vec<u16>>>,
        pub detect_timeout: Option<HumanDuration>,
    }
}

impl Validator<'_> {
    /// Validates `[intercept]` against the listeners already validated.
    pub(super) fn intercept(
        &self,
        raw: Option<&Spanned<raw::Intercept>>,
        listeners: &mut [super::Listener],
    ) -> Result<Option<Intercept>, ConfigError> {
        let Some(spanned) = raw else {
            if let Some(l) = listeners
                .iter()
                .find(|l| l.protocol == super::Protocol::Auto)
            {
                return Err(ConfigError::whole_file(
                    &self.file,
                    format!(
                        "listener {:?} has protocol \"auto\", which is for interception: name it in [intercept] as outbound_listener or inbound_listener",
                        l.name
                    ),
                ));
            }
            return Ok(None);
        };
        let r = spanned.get_ref();
        let Some(uid) = &r.proxy_uid else {
            return Err(self.error(
                spanned,
                "intercept.proxy_uid".into(),
                "needed: the proxy's own connections must be excluded from capture, or they loop back into it".into(),
            ));
        };
        let mut find = |name: &Option<Spanned<String>>, key: &str, direction: Direction| {
            let Some(name) = name else {
                return Ok(None);
            };
            let key = format!("intercept.{key}");
            let Some(i) = listeners.iter().position(|l| &l.name == name.get_ref()) else {
                return Err(self.error(
                    name,
                    key,
                    format!("no listener named {:?} is defined", name.get_ref()),
                ));
            };
            let l = &mut listeners[i];
            if l.protocol != super::Protocol::Auto {
                return Err(self.error(
                    name,
                    key,
                    format!(
                        "listener {:?} must have protocol = \"auto\" (it detects the protocol of each intercepted connection)",
                        l.name
                    ),
                ));
            }
            if l.bind.port() == 0 {
                return Err(self.error(
                    name,
                    key,
                    format!(
                        "listener {:?} needs a fixed port: the redirect rules point at it",
                        l.name
                    ),
                ));
            }
            if l.direction.is_some() {
                return Err(self.error(
                    name,
                    key,
                    "one listener cannot be both the outbound and the inbound listener".into(),
                ));
            }
            l.direction = Some(direction);
            l.traffic = direction;
            Ok(Some(i))
        };
        let outbound_listener = find(
            &r.outbound_listener,
            "outbound_listener",
            Direction::Outbound,
        )?;
        let inbound_listener = find(&r.inbound_listener, "inbound_listener", Direction::Inbound)?;
        if let Some(l) = listeners
            .iter()
            .find(|l| l.protocol == super::Protocol::Auto && l.direction.is_none())
        {
            return Err(ConfigError::whole_file(
                &self.file,
                format!(
                    "listener {:?} has protocol \"auto\" but [intercept] names it as neither outbound_listener nor inbound_listener",
                    l.name
                ),
            ));
        }
        let ports = |list: &Option<Spanned<Vec<u16>>>, key: &str| {
            let Some(list) = list else {
                return Ok(Vec::new());
            };
            if list.get_ref().len() > INTERCEPT_LIST_MAX || list.get_ref().contains(&0) {
                return Err(self.error(
                    list,
                    format!("intercept.{key}"),
                    format!("at most {INTERCEPT_LIST_MAX} ports, each from 1 to 65535"),
                ));
            }
            Ok(list.get_ref().clone())
        };
        let cidrs = |list: &Option<Spanned<Vec<Spanned<String>>>>, key: &str| {
            let Some(list) = list else {
                return Ok(Vec::new());
            };
            if list.get_ref().len() > INTERCEPT_LIST_MAX {
                return Err(self.error(
                    list,
                    format!("intercept.{key}"),
                    format!("at most {INTERCEPT_LIST_MAX} entries"),
                ));
            }
            list.get_ref()
                .iter()
                .enumerate()
                .map(|(j, c)| {
                    Cidr::parse(c.get_ref()).ok_or_else(|| {
                        self.error(
                            c,
                            format!("intercept.{key}[{j}]"),
                            format!(
                                "expected an address or CIDR such as 10.0.0.0/8, found {:?}",
                                c.get_ref()
                            ),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let inbound_mode = r.inbound_mode.unwrap_or(InboundMode::Strict);
        if let Some(i) = inbound_listener {
            if inbound_mode == InboundMode::Strict && listeners[i].tls.is_none() {
                return Err(ConfigError::whole_file(
                    &self.file,
                    format!(
                        "inbound listener {:?} has no `tls`: in inbound_mode \"strict\" it would accept nobody",
                        listeners[i].name
                    ),
                ));
            }
        }
        Ok(Some(Intercept {
            outbound_listener,
            inbound_listener,
            proxy_uid: *uid.get_ref(),
            proxy_gid: r.proxy_gid,
            exclude_inbound_ports: ports(&r.exclude_inbound_ports, "exclude_inbound_ports")?,
            exclude_outbound_ports: ports(&r.exclude_outbound_ports, "exclude_outbound_ports")?,
            exclude_outbound_cidrs: cidrs(&r.exclude_outbound_cidrs, "exclude_outbound_cidrs")?,
            include_outbound_cidrs: cidrs(&r.include_outbound_cidrs, "include_outbound_cidrs")?,
            outbound_policy: r.outbound_policy.unwrap_or(OutboundPolicy::Passthrough),
            inbound_mode,
            opaque_ports: ports(&r.opaque_ports, "opaque_ports")?,
            detect_timeout: r.detect_timeout.map_or(DETECT_TIMEOUT_DEFAULT, |d| d.0),
        }))
    }

    /// A cluster's `destinations` and `direction`.
    pub(super) fn destinations(
        &self,
        i: usize,
        list: Option<&Spanned<Vec<Spanned<String>>>>,
    ) -> Result<Vec<Destination>, ConfigError> {
        let Some(list) = list else {
            return Ok(Vec::new());
        };
        if list.get_ref().len() > DESTINATIONS_PER_CLUSTER_MAX {
            return Err(self.error(
                list,
                format!("clusters[{i}].destinations"),
                format!("at most {DESTINATIONS_PER_CLUSTER_MAX} entries"),
            ));
        }
        list.get_ref()
            .iter()
            .enumerate()
            .map(|(j, d)| {
                Destination::parse(d.get_ref()).ok_or_else(|| {
                    self.error(
                        d,
                        format!("clusters[{i}].destinations[{j}]"),
                        format!(
                            "expected \"IP:port\", \"CIDR\", \"CIDR:port\", \":port\" or a host name (TLS SNI), found {:?}",
                            d.get_ref()
                        ),
                    )
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Destination {
        Destination::parse(s).unwrap_or_else(|| panic!("{s} should parse"))
    }

    fn at(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn destinations_match_address_network_port_and_sni() {
        assert!(d("10.0.0.7:8080").matches(at("10.0.0.7:8080"), None));
        assert!(!d("10.0.0.7:8080").matches(at("10.0.0.7:8081"), None));
        assert!(d("10.0.0.0/8").matches(at("10.9.9.9:1"), None));
        assert!(!d("10.0.0.0/8").matches(at("11.0.0.1:1"), None));
        assert!(d("10.0.0.0/8:80").matches(at("10.1.2.3:80"), None));
        assert!(!d("10.0.0.0/8:80").matches(at("10.1.2.3:81"), None));
        assert!(d(":9000").matches(at("192.168.1.1:9000"), None));
        assert!(d("[fd00::/8]:80").matches(at("[fd00::5]:80"), None));
        assert!(d("fd00::1").matches(at("[fd00::1]:443"), None));
        // An IPv4-mapped peer address is the IPv4 address.
        assert!(d("10.0.0.0/8").matches(at("[::ffff:10.0.0.1]:80"), None));
        assert!(d("Payments.Svc").matches(at("1.2.3.4:443"), Some("payments.svc")));
        assert!(!d("payments.svc").matches(at("1.2.3.4:443"), None));
        assert!(d("0.0.0.0/0").matches(at("8.8.8.8:53"), None));
    }

    #[test]
    fn bad_destinations_are_refused() {
        for bad in [
            "",
            ":0",
            ":x",
            "10.0.0.0/33",
            "1.2.3.4/8:99999",
            "a b",
            "1.2.3",
        ] {
            assert!(
                Destination::parse(bad).is_none(),
                "{bad:?} should not parse"
            );
        }
    }
}
