//! The redirect rules: what `pilotfish intercept install | remove | show`
//! writes into the sidecar's network namespace.
//!
//! nftables first: one table of its own (`inet pilotfish`, IPv4 and IPv6),
//! replaced in one `nft -f` transaction, so an install is atomic and
//! installing twice gives the same rules. Where `nft` is missing,
//! iptables-restore and ip6tables-restore with chains of their own
//! (`PILOTFISH_OUTPUT`, `PILOTFISH_PREROUTING`) jumped to from the nat
//! table's built-in chains.
//!
//! What must hold: the proxy's own uid (and gid) is never captured, nor is
//! loopback traffic (the proxy's forwarding to the local app, and the app
//! talking to itself), so nothing the proxy sends comes back to it; the
//! rules are generated from the validated config only (no text from the
//! file is pasted into them unparsed); remove leaves nothing behind.

use std::{
    fmt::Write as _,
    io::Write as _,
    process::{Command, Stdio},
};

use crate::config::{intercept::Cidr, Config};

/// The nftables table (family inet: both IP versions).
pub const NFT_TABLE: &str = "pilotfish";
/// iptables chains of our own in the nat table.
const IPT_OUTPUT: &str = "PILOTFISH_OUTPUT";
const IPT_PREROUTING: &str = "PILOTFISH_PREROUTING";

/// Which tool writes the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    Nft,
    Iptables,
}

/// What the rules are made from: the validated `[intercept]` table and
/// the ports of the listeners it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub outbound_port: Option<u16>,
    pub inbound_port: Option<u16>,
    /// Whether the listeners take IPv6 (bound to an IPv6 address; `[::]`
    /// is dual-stack). IPv6 is redirected only to a listener that can
    /// accept it, else it would be refused; [`Plan::warnings`] says so.
    pub outbound_v6: bool,
    pub inbound_v6: bool,
    pub uid: u32,
    pub gid: Option<u32>,
    pub exclude_inbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
    pub exclude_outbound: Vec<Cidr>,
    pub include_outbound: Vec<Cidr>,
}

impl Plan {
    /// None when the config has no `[intercept]` table.
    pub fn from_config(config: &Config) -> Option<Plan> {
        let i = config.intercept.as_ref()?;
        let port = |l: Option<usize>| l.map(|l| config.listeners[l].bind.port());
        let v6 = |l: Option<usize>| l.is_some_and(|l| config.listeners[l].bind.is_ipv6());
        Some(Plan {
            outbound_port: port(i.outbound_listener),
            inbound_port: port(i.inbound_listener),
            outbound_v6: v6(i.outbound_listener),
            inbound_v6: v6(i.inbound_listener),
            uid: i.proxy_uid,
            gid: i.proxy_gid,
            exclude_inbound_ports: i.exclude_inbound_ports.clone(),
            exclude_outbound_ports: i.exclude_outbound_ports.clone(),
            exclude_outbound: i.exclude_outbound_cidrs.clone(),
            include_outbound: i.include_outbound_cidrs.clone(),
        })
    }

    /// What the operator should know about these rules.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        if self.outbound_port.is_some() && !self.outbound_v6 {
            w.push("the outbound listener binds an IPv4 address: IPv6 outbound connections are not captured (bind it to [::1] or [::] to capture them)".to_string());
        }
        if self.inbound_port.is_some() && !self.inbound_v6 {
            w.push("the inbound listener binds an IPv4 address: IPv6 inbound connections are not captured (bind it to [::] to capture them)".to_string());
        }
        w
    }

    /// The nft script that replaces the table in one transaction: create
    /// it (a no-op if it exists), delete it, define it anew.
    pub fn nft_script(&self) -> String {
        let mut s = format!("table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n");
        let _ = writeln!(s, "table inet {NFT_TABLE} {{");
        if let Some(port) = self.outbound_port {
            s += "  chain output {\n    type nat hook output priority -100; policy accept;\n";
            s += "    meta l4proto != tcp return\n";
            let _ = writeln!(s, "    meta skuid {} return", self.uid);
            if let Some(gid) = self.gid {
                let _ = writeln!(s, "    meta skgid {gid} return");
            }
            s += "    oifname \"lo\" return\n";
            s += "    ip daddr 127.0.0.0/8 return\n    ip6 daddr ::1 return\n";
            if !self.exclude_outbound_ports.is_empty() {
                let _ = writeln!(
                    s,
                    "    tcp dport {} return",
                    nft_set(&self.exclude_outbound_ports)
                );
            }
            let (v4, v6) = split(&self.exclude_outbound);
            if !v4.is_empty() {
                let _ = writeln!(s, "    ip daddr {} return", nft_set(&v4));
            }
            if !v6.is_empty() {
                let _ = writeln!(s, "    ip6 daddr {} return", nft_set(&v6));
            }
            if !self.include_outbound.is_empty() {
                // Only the included networks are captured: of each family,
                // everything outside its list returns (all of a family with
                // no entries).
                let (v4, v6) = split(&self.include_outbound);
                if v4.is_empty() {
                    s += "    meta nfproto ipv4 return\n";
                } else {
                    let _ = writeln!(s, "    ip daddr != {} return", nft_set(&v4));
                }
                if v6.is_empty() {
                    s += "    meta nfproto ipv6 return\n";
                } else {
                    let _ = writeln!(s, "    ip6 daddr != {} return", nft_set(&v6));
                }
            }
            if !self.outbound_v6 {
                s += "    meta nfproto ipv6 return\n";
            }
            let _ = writeln!(s, "    meta l4proto tcp redirect to :{port}\n  }}");
        }
        if let Some(port) = self.inbound_port {
            s += "  chain prerouting {\n    type nat hook prerouting priority -100; policy accept;\n";
            s += "    meta l4proto != tcp return\n";
            s += "    iifname \"lo\" return\n";
            if !self.exclude_inbound_ports.is_empty() {
                let _ = writeln!(
                    s,
                    "    tcp dport {} return",
                    nft_set(&self.exclude_inbound_ports)
                );
            }
            let _ = writeln!(s, "    meta l4proto tcp redirect to :{port}\n  }}");
        }
        s += "}\n";
        s
    }

    /// iptables-restore input for one family (`v6`: for ip6tables-restore),
    /// applied with `--noflush`: our chains are declared (which empties
    /// them) and refilled; the jumps from the built-in chains are added by
    /// [`install`] only where missing.
    pub fn iptables_script(&self, v6: bool) -> String {
        let mut s = String::from("*nat\n");
        let _ = writeln!(s, ":{IPT_OUTPUT} - [0:0]\n:{IPT_PREROUTING} - [0:0]");
        if let Some(port) = self.outbound_port.filter(|_| !v6 || self.outbound_v6) {
            let c = IPT_OUTPUT;
            let _ = writeln!(
                s,
                "-A {c} -p tcp -m owner --uid-owner {} -j RETURN",
                self.uid
            );
            if let Some(gid) = self.gid {
                let _ = writeln!(s, "-A {c} -p tcp -m owner --gid-owner {gid} -j RETURN");
            }
            let _ = writeln!(s, "-A {c} -o lo -j RETURN");
            let loopback = if v6 { "::1/128" } else { "127.0.0.0/8" };
            let _ = writeln!(s, "-A {c} -d {loopback} -j RETURN");
            for p in &self.exclude_outbound_ports {
                let _ = writeln!(s, "-A {c} -p tcp --dport {p} -j RETURN");
            }
            let family = |n: &&Cidr| n.addr.is_ipv6() == v6;
            for n in self.exclude_outbound.iter().filter(family) {
                let _ = writeln!(s, "-A {c} -d {n} -j RETURN");
            }
            if !self.include_outbound.is_empty() {
                let included: Vec<_> = self.include_outbound.iter().filter(family).collect();
                for n in &included {
                    let _ = writeln!(s, "-A {c} -p tcp -d {n} -j REDIRECT --to-ports {port}");
                }
            } else {
                let _ = writeln!(s, "-A {c} -p tcp -j REDIRECT --to-ports {port}");
            }
        }
        if let Some(port) = self.inbound_port.filter(|_| !v6 || self.inbound_v6) {
            let c = IPT_PREROUTING;
            let _ = writeln!(s, "-A {c} -i lo -j RETURN");
            for p in &self.exclude_inbound_ports {
                let _ = writeln!(s, "-A {c} -p tcp --dport {p} -j RETURN");
            }
            let _ = writeln!(s, "-A {c} -p tcp -j REDIRECT --to-ports {port}");
        }
        s += "COMMIT\n";
        s
    }
}

fn nft_set<T: std::fmt::Display>(items: &[T]) -> String {
    let list: Vec<String> = items.iter().map(|i| i.to_string()).collect();
    format!("{{ {} }}", list.join(", "))
}

fn split(list: &[Cidr]) -> (Vec<Cidr>, Vec<Cidr>) {
    list.iter().partition(|c| c.addr.is_ipv4())
}

/// Errors of the rule commands, worded for the operator.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("changing redirect rules needs CAP_NET_ADMIN in this network namespace (run as root, or give the installing unit AmbientCapabilities=CAP_NET_ADMIN)")]
    NoCapability,
    #[error("neither nft (Debian package nftables) nor iptables-restore was found")]
    NoTool,
    #[error("{tool} failed: {detail}")]
    Tool { tool: String, detail: String },
}

/// Whether this process holds CAP_NET_ADMIN (bit 12 of CapEff).
pub fn has_net_admin() -> bool {
    const CAP_NET_ADMIN: u32 = 12;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))?
                .trim()
                .to_string();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
}

/// The backend to use: the one asked for, else nft where it exists.
pub fn choose(asked: Option<Backend>) -> Result<Backend, RulesError> {
    if let Some(b) = asked {
        return Ok(b);
    }
    if found("nft") {
        Ok(Backend::Nft)
    } else if found("iptables-restore") {
        Ok(Backend::Iptables)
    } else {
        Err(RulesError::NoTool)
    }
}

fn found(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Runs `tool args`, feeding `stdin`; its stdout on success.
fn run(tool: &str, args: &[&str], stdin: Option<&str>) -> Result<String, RulesError> {
    let fail = |detail: String| RulesError::Tool {
        tool: format!("{tool} {}", args.join(" ")),
        detail,
    };
    let mut child = Command::new(tool)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(e.to_string()))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|e| fail(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Installs (or replaces) the rules.
pub fn install(plan: &Plan, backend: Backend) -> Result<(), RulesError> {
    if !has_net_admin() {
        return Err(RulesError::NoCapability);
    }
    match backend {
        Backend::Nft => run("nft", &["-f", "-"], Some(&plan.nft_script())).map(drop),
        Backend::Iptables => {
            for (v6, restore, tables) in [
                (false, "iptables-restore", "iptables"),
                (true, "ip6tables-restore", "ip6tables"),
            ] {
                run(restore, &["--noflush"], Some(&plan.iptables_script(v6)))?;
                for (builtin, ours) in [("OUTPUT", IPT_OUTPUT), ("PREROUTING", IPT_PREROUTING)] {
                    let present =
                        run(tables, &["-t", "nat", "-C", builtin, "-j", ours], None).is_ok();
                    if !present {
                        run(tables, &["-t", "nat", "-A", builtin, "-j", ours], None)?;
                    }
                }
            }
            Ok(())
        }
    }
}

/// Removes the rules; nothing installed is not an error.
pub fn remove(backend: Backend) -> Result<(), RulesError> {
    if !has_net_admin() {
        return Err(RulesError::NoCapability);
    }
    match backend {
        Backend::Nft => {
            let script = format!("table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n");
            run("nft", &["-f", "-"], Some(&script)).map(drop)
        }
        Backend::Iptables => {
            for tables in ["iptables", "ip6tables"] {
                for (builtin, ours) in [("OUTPUT", IPT_OUTPUT), ("PREROUTING", IPT_PREROUTING)] {
                    while run(tables, &["-t", "nat", "-D", builtin, "-j", ours], None).is_ok() {}
                    let _ = run(tables, &["-t", "nat", "-F", ours], None);
                    let _ = run(tables, &["-t", "nat", "-X", ours], None);
                }
            }
            Ok(())
        }
    }
}

/// What is installed now, as the tool prints it; None when nothing is.
pub fn show(backend: Backend) -> Result<Option<String>, RulesError> {
    match backend {
        Backend::Nft => Ok(run("nft", &["list", "table", "inet", NFT_TABLE], None).ok()),
        Backend::Iptables => {
            let mut out = String::new();
            for tables in ["iptables", "ip6tables"] {
                for ours in [IPT_OUTPUT, IPT_PREROUTING] {
                    if let Ok(text) = run(tables, &["-t", "nat", "-S", ours], None) {
                        out += &text;
                    }
                }
            }
            Ok((!out.is_empty()).then_some(out))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        Plan {
            outbound_port: Some(15001),
            inbound_port: Some(15006),
            outbound_v6: true,
            inbound_v6: true,
            uid: 1337,
            gid: Some(1338),
            exclude_inbound_ports: vec![22, 15020],
            exclude_outbound_ports: vec![53],
            exclude_outbound: vec![Cidr::parse("169.254.0.0/16").unwrap()],
            include_outbound: vec![],
        }
    }

    #[test]
    fn nft_script_excludes_the_proxy_and_loopback_before_redirecting() {
        let s = plan().nft_script();
        assert!(s.starts_with("table inet pilotfish\ndelete table inet pilotfish\n"));
        let pos = |needle: &str| s.find(needle).unwrap_or_else(|| panic!("{needle} in {s}"));
        let redirect = pos("redirect to :15001");
        for before in [
            "meta skuid 1337 return",
            "meta skgid 1338 return",
            "oifname \"lo\" return",
            "ip daddr 127.0.0.0/8 return",
            "tcp dport { 53 } return",
            "ip daddr { 169.254.0.0/16 } return",
        ] {
            assert!(
                pos(before) < redirect,
                "{before} must come before the redirect"
            );
        }
        assert!(pos("tcp dport { 22, 15020 } return") < pos("redirect to :15006"));
    }

    #[test]
    fn include_lists_capture_only_their_networks() {
        let mut p = plan();
        p.include_outbound = vec![Cidr::parse("10.0.0.0/8").unwrap()];
        let s = p.nft_script();
        assert!(s.contains("ip daddr != { 10.0.0.0/8 } return"), "{s}");
        assert!(s.contains("meta nfproto ipv6 return"), "{s}");
        let ipt = p.iptables_script(false);
        assert!(
            ipt.contains("-A PILOTFISH_OUTPUT -p tcp -d 10.0.0.0/8 -j REDIRECT --to-ports 15001")
        );
        assert!(!ipt.contains("-A PILOTFISH_OUTPUT -p tcp -j REDIRECT"));
        p.include_outbound.clear();
        assert!(!p.nft_script().contains("nfproto"));
        p.outbound_v6 = false;
        assert!(p.nft_script().contains("meta nfproto ipv6 return"));
        assert!(!p
            .iptables_script(true)
            .contains("PILOTFISH_OUTPUT -p tcp -j REDIRECT"));
        assert_eq!(p.warnings().len(), 1);
    }

    #[test]
    fn iptables_script_per_family() {
        let v4 = plan().iptables_script(false);
        assert!(v4.contains("--uid-owner 1337 -j RETURN"));
        assert!(v4.contains("-d 169.254.0.0/16 -j RETURN"));
        assert!(v4.contains("-A PILOTFISH_PREROUTING -p tcp --dport 22 -j RETURN"));
        let v6 = plan().iptables_script(true);
        assert!(v6.contains("-d ::1/128 -j RETURN"));
        assert!(!v6.contains("169.254"));
    }
}
