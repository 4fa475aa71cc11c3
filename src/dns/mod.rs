//! Endpoints named by host name: resolved off the data path, on a thread
//! of their own, and re-resolved every `[dns] refresh`.
//!
//! What must hold: no worker ever waits for DNS; every address a name
//! resolves to is an endpoint (as Envoy's strict DNS clusters do); a name
//! that fails to resolve keeps its last good answer (and is asked again
//! sooner), so a resolver outage never empties a cluster that had
//! endpoints; a change of addresses reaches the workers through the same
//! swap as a config change ([`crate::control::Controller::apply_resolved`]),
//! and a cluster whose addresses alone changed keeps the state of the
//! endpoints that stay. Names are resolved through the configured name
//! servers ([`stub`]), or the system's resolver when none is configured.

pub mod stub;

use std::{
    collections::BTreeMap,
    net::{SocketAddr, ToSocketAddrs},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use crate::config::{limits, Config, Dns};

/// What each `name:port` resolved to last.
pub type Resolved = BTreeMap<(String, u16), Vec<SocketAddr>>;

/// Whether `host` is a DNS name an endpoint may use: dotted labels of
/// letters, digits and hyphens, none empty or over 63 bytes, 253 in all,
/// and not all digits (that would be a malformed IP address).
pub fn valid_name(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    !host.is_empty()
        && host.len() <= 253
        && !host.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Every `name:port` the config's clusters name.
pub fn names(config: &Config) -> Vec<(String, u16)> {
    let mut out: Vec<(String, u16)> = config
        .clusters
        .iter()
        .flat_map(|c| c.hostnames.iter().cloned())
        .collect();
    out.sort();
    out.dedup();
    out.truncate(limits::DNS_NAMES_MAX);
    out
}

/// Resolves one name to its addresses with `port`.
pub fn resolve(dns: &Dns, host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    if dns.resolvers.is_empty() {
        return (host, port)
            .to_socket_addrs()
            .map(|a| {
                let mut v: Vec<SocketAddr> = a.collect();
                v.sort();
                v.dedup();
                v.truncate(stub::ANSWERS_MAX);
                v
            })
            .map_err(|e| e.to_string());
    }
    let mut last = String::from("no name server");
    for server in &dns.resolvers {
        let id = query_id();
        let ask = |qtype| stub::ask(*server, host, qtype, id, limits::DNS_QUERY_TIMEOUT);
        match (ask(stub::TYPE_A), ask(stub::TYPE_AAAA)) {
            (Err(stub::Error::NoSuchName), _) => return Err(format!("{host}: no such name")),
            (Ok(mut v4), Ok(v6)) => {
                v4.extend(v6);
                let mut v: Vec<SocketAddr> =
                    v4.into_iter().map(|ip| SocketAddr::new(ip, port)).collect();
                v.sort();
                v.dedup();
                if v.is_empty() {
                    return Err(format!("{host}: no address"));
                }
                return Ok(v);
            }
            (Ok(v4), Err(_)) if !v4.is_empty() => {
                return Ok(v4.into_iter().map(|ip| SocketAddr::new(ip, port)).collect())
            }
            (Err(e), _) | (_, Err(e)) => last = format!("{host} at {server}: {e}"),
        }
    }
    Err(last)
}

/// An unpredictable query id: any process in the pod can send datagrams
/// to the resolver's port (the socket is connected, so a forged answer
/// must also forge the source), and a guessable id would make a forged
/// answer easy. SipHash keyed from the OS's randomness (std's
/// `RandomState`) over a counter.
fn query_id() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(NEXT.fetch_add(1, Ordering::Relaxed));
    (h.finish() & 0xFFFF) as u16
}

/// One round: every name in `config`, each kept at its last good answer
/// when this attempt fails. Returns the answers and how many failed.
pub fn round(config: &Config, last: &Resolved) -> (Resolved, usize) {
    let mut out = Resolved::new();
    let mut failed = 0;
    for (host, port) in names(config) {
        match resolve(&config.dns, &host, port) {
            Ok(addrs) => {
                out.insert((host, port), addrs);
            }
            Err(e) => {
                failed += 1;
                tracing::warn!(name = %host, error = %e, "dns: resolution failed; the last good answer stays");
                if let Some(prev) = last.get(&(host.clone(), port)) {
                    out.insert((host, port), prev.clone());
                }
            }
        }
    }
    (out, failed)
}

/// Adds what the names resolved to to each cluster's endpoints.
pub fn fill(config: &mut Config, resolved: &Resolved) {
    for c in &mut config.clusters {
        for key in &c.hostnames {
            for addr in resolved.get(key).into_iter().flatten() {
                if c.endpoints.len() >= limits::ENDPOINTS_PER_CLUSTER_MAX {
                    break;
                }
                if !c.endpoints.contains(addr) {
                    c.endpoints.push(*addr);
                }
            }
        }
    }
}

/// Resolutions done, for `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    pub changes: AtomicU64,
}

/// The resolver thread; dropping it stops the thread.
#[derive(Debug)]
pub struct Resolver {
    stop: Option<crossbeam_channel::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Resolver {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts re-resolving the names of the running config (which a swap or
/// the control plane may change) every `[dns] refresh`.
pub fn spawn(controller: Arc<crate::control::Controller>) -> std::io::Result<Resolver> {
    let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
    let thread = std::thread::Builder::new()
        .name("pilotfish-dns".into())
        .spawn(move || {
            let counters = controller.dns_counters();
            loop {
                let config = controller.config();
                let started = Instant::now();
                let last = controller.resolved();
                let (now, failed) = round(&config, &last);
                let total = now.len() as u64 + failed as u64;
                counters
                    .ok
                    .fetch_add(total.saturating_sub(failed as u64), Ordering::Relaxed);
                counters.failed.fetch_add(failed as u64, Ordering::Relaxed);
                if now != last {
                    match controller.apply_resolved(now) {
                        Ok(changes) => {
                            counters.changes.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(changes = %changes.summary(), "dns: addresses changed");
                        }
                        Err(e) => tracing::error!(error = %e, "dns: new addresses refused"),
                    }
                }
                let every = config.dns.refresh;
                let wait = if failed > 0 { every / 4 } else { every };
                let wait = wait
                    .max(limits::DNS_REFRESH_MIN)
                    .saturating_sub(started.elapsed())
                    .max(Duration::from_millis(10));
                match stopped.recv_timeout(wait) {
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
                    _ => return,
                }
            }
        })?;
    Ok(Resolver {
        stop: Some(stop),
        thread: Some(thread),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for ok in [
            "orders",
            "orders.svc.cluster.local",
            "a-b.c",
            "x1.example.com.",
        ] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            "1.2.3",
            "-a.b",
            "a-.b",
            "a..b",
            "a_b",
            "a b",
            &"x".repeat(64),
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_failed_name_keeps_its_last_answer() {
        let config = Config::parse(
            "t.toml",
            "[admin]\nsocket = \"/tmp/x\"\n[dns]\nresolvers = [\"127.0.0.1:9\"]\nrefresh = \"1s\"\n[[clusters]]\nname = \"c\"\nendpoints = [\"orders.invalid:80\", \"10.0.0.9:80\"]\n",
        )
        .unwrap();
        assert_eq!(
            config.clusters[0].hostnames,
            [("orders.invalid".to_string(), 80)]
        );
        let mut last = Resolved::new();
        let kept: SocketAddr = "10.1.1.1:80".parse().unwrap();
        last.insert(("orders.invalid".into(), 80), vec![kept]);
        // Nothing listens on UDP port 9 here: the query is refused.
        let (now, failed) = round(&config, &last);
        assert_eq!(failed, 1);
        assert_eq!(now, last);
        let mut filled = config.clone();
        fill(&mut filled, &now);
        assert_eq!(
            filled.clusters[0].endpoints,
            ["10.0.0.9:80".parse().unwrap(), kept]
        );
    }
}
