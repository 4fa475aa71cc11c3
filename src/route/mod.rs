//! Routing: which route a request takes, and which cluster it goes to.
//!
//! Protocol-independent: it looks at a method, a host, a path and header
//! values, wherever they came from (HTTP/1 today, HTTP/2 later). First
//! matching route wins; a listener's `cluster` catches the rest. Paths are
//! matched only after [`path::normalize`] made them canonical.

pub mod path;

use crate::{
    balance::Rng,
    config::http::{HostMatch, PathMatch, Route},
};

/// What routing may look at.
pub trait RequestView {
    fn method(&self) -> &[u8];
    /// The authority without port (absolute-form target, else Host).
    fn host(&self) -> Option<&[u8]>;
    /// The normalized path, without the query.
    fn path(&self) -> &[u8];
    fn header(&self, name: &str) -> Option<&[u8]>;
}

/// The index of the first route that matches `req`.
pub fn select(routes: &[Route], req: &impl RequestView) -> Option<usize> {
    routes.iter().position(|r| matches(r, req))
}

fn matches(route: &Route, req: &impl RequestView) -> bool {
    if let Some(m) = &route.method {
        if req.method() != m.as_bytes() {
            return false;
        }
    }
    if let Some(h) = &route.host {
        let Some(host) = req.host() else { return false };
        let ok = match h {
            HostMatch::Exact(e) => host.eq_ignore_ascii_case(e.as_bytes()),
            HostMatch::Suffix(s) => {
                host.len() > s.len()
                    && host[host.len() - s.len()..].eq_ignore_ascii_case(s.as_bytes())
            }
        };
        if !ok {
            return false;
        }
    }
    if let Some(p) = &route.path {
        let path = req.path();
        let ok = match p {
            PathMatch::Exact(e) => path == e.as_bytes(),
            PathMatch::Prefix(pre) => path.starts_with(pre.as_bytes()),
        };
        if !ok {
            return false;
        }
    }
    route
        .headers
        .iter()
        .all(|(name, value)| req.header(name) == Some(value.as_bytes()))
}

/// Picks a cluster from (cluster, weight) pairs in proportion to weight.
pub fn pick_weighted(clusters: &[(usize, u32)], rng: &Rng) -> usize {
    if let [(only, _)] = clusters {
        return *only;
    }
    let total: u64 = clusters.iter().map(|(_, w)| u64::from(*w)).sum();
    let mut ticket = rng.below(total);
    for (cluster, weight) in clusters {
        if ticket < u64::from(*weight) {
            return *cluster;
        }
        ticket -= u64::from(*weight);
    }
    clusters[clusters.len() - 1].0
}

/// The host that routing matches on: without the port, and without a
/// trailing dot (`Admin.Internal.` is the same name as `admin.internal`;
/// matching is case-insensitive). Without this, a fully-qualified spelling
/// of a host would miss the route written for it and fall to the
/// catch-all, while the upstream resolves it to the same name.
pub fn route_host(authority: &[u8]) -> &[u8] {
    let host = host_without_port(authority);
    host.strip_suffix(b".").unwrap_or(host)
}

/// Strips a port from an authority (`host:port`, `[v6]:port`).
pub fn host_without_port(authority: &[u8]) -> &[u8] {
    if authority.first() == Some(&b'[') {
        return authority
            .iter()
            .position(|&b| b == b']')
            .map_or(authority, |i| &authority[..=i]);
    }
    match authority.iter().rposition(|&b| b == b':') {
        Some(i) => &authority[..i],
        None => authority,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    struct Req<'a> {
        method: &'a str,
        host: &'a str,
        path: &'a str,
        headers: Vec<(&'a str, &'a str)>,
    }

    impl RequestView for Req<'_> {
        fn method(&self) -> &[u8] {
            self.method.as_bytes()
        }
        fn host(&self) -> Option<&[u8]> {
            Some(self.host.as_bytes())
        }
        fn path(&self) -> &[u8] {
            self.path.as_bytes()
        }
        fn header(&self, name: &str) -> Option<&[u8]> {
            self.headers
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.as_bytes())
        }
    }

    fn routes() -> Vec<Route> {
        let c = Config::load(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/config/http.toml"
        )))
        .unwrap();
        match &c.listeners[0].kind {
            crate::config::ListenerKind::Http(h) => h.routes.clone(),
            _ => unreachable!(),
        }
    }

    #[test]
    fn first_match_wins_on_host_path_method_and_headers() {
        let r = routes();
        let req = |method, host, path, headers| Req {
            method,
            host,
            path,
            headers,
        };
        assert_eq!(
            select(
                &r,
                &req("GET", "a.example.com", "/api/x", vec![("x-canary", "1")])
            ),
            Some(0)
        );
        assert_eq!(
            select(&r, &req("GET", "a.example.com", "/api/x", vec![])),
            Some(1),
            "header mismatch falls through"
        );
        assert_eq!(
            select(&r, &req("POST", "a.example.com", "/api/x", vec![])),
            None,
            "method mismatch"
        );
        assert_eq!(
            select(
                &r,
                &req("GET", "example.com", "/api/x", vec![("x-canary", "1")])
            ),
            Some(1),
            "*.example.com needs a subdomain"
        );
        assert_eq!(select(&r, &req("GET", "other", "/web", vec![])), None);
    }

    #[test]
    fn weighted_split_follows_weights() {
        let rng = Rng::seeded(11);
        let split = [(0usize, 90u32), (1, 10)];
        let ones = (0..10_000)
            .filter(|_| pick_weighted(&split, &rng) == 1)
            .count();
        assert!((800..1200).contains(&ones), "{ones}");
    }

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(host_without_port(b"a.b:80"), b"a.b");
        assert_eq!(host_without_port(b"[::1]:8080"), b"[::1]");
        assert_eq!(host_without_port(b"a"), b"a");
        assert_eq!(route_host(b"Admin.Internal.:8080"), b"Admin.Internal");
        assert_eq!(route_host(b"[::1]:80"), b"[::1]");
    }

    #[test]
    fn a_trailing_dot_does_not_escape_a_host_route() {
        let r = routes();
        for authority in ["a.example.com", "A.EXAMPLE.COM:443", "a.example.com."] {
            let req = Req {
                method: "GET",
                host: std::str::from_utf8(route_host(authority.as_bytes())).unwrap(),
                path: "/api/x",
                headers: vec![("x-canary", "1")],
            };
            assert_eq!(select(&r, &req), Some(0), "{authority}");
        }
    }
}
