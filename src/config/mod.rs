//! The config: TOML text in, a validated, immutable [`Config`] out.
//!
//! What must hold: unknown keys are errors; every error names the file, the
//! line and the key; every limit has a default from [`limits`] and a hard
//! maximum; cross-field rules (a listener's cluster exists, names and binds
//! are unique, clusters have endpoints) are checked here so the rest of the
//! proxy never sees an inconsistent config.

pub mod compose;
pub mod duration;
pub mod error;
pub mod http;
pub mod intercept;
pub mod limits;
pub mod tls;
pub mod xds;

use std::{
    collections::HashSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use toml::Spanned;

pub use error::ConfigError;

use duration::HumanDuration;

/// A validated config. Cheap to clone; workers each hold one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Config {
    /// Number of data-plane worker threads, one per core.
    pub workers: usize,
    /// Which I/O driver the workers run.
    pub driver: DriverChoice,
    /// io_uring setup flags (ignored on epoll).
    pub uring_setup: UringSetup,
    /// Admin socket settings (served by the admin issue; accepted now).
    pub admin: Admin,
    /// Cap on concurrent client connections per worker.
    pub max_connections_per_worker: usize,
    /// Time in-flight connections get to finish after SIGTERM.
    #[serde(with = "humantime_serde_compat")]
    pub drain_timeout: Duration,
    /// This workload's TLS material, for listeners and clusters that use
    /// mTLS.
    pub tls: Option<tls::TlsFiles>,
    pub listeners: Vec<Listener>,
    pub clusters: Vec<Cluster>,
    /// Transparent interception (`[intercept]`): which listeners the
    /// redirect rules point at, and what they capture.
    pub intercept: Option<intercept::Intercept>,
    /// Distributed tracing (`[tracing]`): context propagation on every
    /// HTTP hop, and spans exported to an OTLP/HTTP collector.
    pub tracing: Option<Tracing>,
    /// `[overload]`: the memory ceiling the overload stages are measured
    /// against (see [`crate::lifecycle::overload`]).
    pub overload: Overload,
    /// The control plane, when listeners and clusters come over xDS too.
    pub xds: Option<xds::Xds>,
    /// How endpoints named by host name are resolved.
    pub dns: Dns,
}

/// The `[dns]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Dns {
    /// Name servers asked over UDP, in order; empty: the system's resolver
    /// (getaddrinfo, /etc/resolv.conf and /etc/hosts).
    pub resolvers: Vec<SocketAddr>,
    /// How often every name is resolved again (and how soon after a
    /// failure, a quarter of it).
    #[serde(with = "humantime_serde_compat")]
    pub refresh: Duration,
}

/// `[overload]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Overload {
    /// Resident memory (MiB) the process should stay under; None: no
    /// memory stages (the connection cap's still apply).
    pub memory_max_mib: Option<u64>,
}

/// `[tracing]`: where sampled spans go and how often a new trace is
/// sampled. Without it, trace headers pass through untouched.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tracing {
    /// The OTLP/HTTP collector, `host:port` (resolved by the exporter
    /// thread, never on a worker).
    pub collector: String,
    /// The collector's path for traces.
    pub path: String,
    /// Fraction of requests without a caller's decision that start a
    /// sampled trace (0.0 to 1.0).
    pub sample_rate: f64,
    /// `service.name` of the spans' resource.
    pub service_name: String,
    /// The header format of traces this proxy starts.
    pub inject: crate::trace::Format,
}

// `sample_rate` is validated into 0.0..=1.0, so never NaN.
impl Eq for Tracing {}

/// How io_uring rings are set up. The flags decide how completions reach
/// the worker, and with it much of the kernel cost per request
/// (../shared/NOTES.md); `pilotfish-bench compare --uring-setup` measures
/// each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UringSetup {
    /// IORING_SETUP_COOP_TASKRUN: completions run at the next kernel entry
    /// instead of by interrupting the worker.
    CoopTaskrun,
    /// IORING_SETUP_SINGLE_ISSUER | DEFER_TASKRUN: completions run only
    /// when the worker waits for them.
    DeferTaskrun,
    /// The kernel's defaults.
    Default,
}

/// Which I/O driver a worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DriverChoice {
    /// io_uring where the kernel allows it, else epoll. The environment
    /// variable `MONOIO_FORCE_LEGACY_DRIVER=1` forces epoll.
    Auto,
    /// io_uring or fail to start.
    IoUring,
    /// The epoll ("legacy") driver.
    Epoll,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Admin {
    /// The admin Unix socket (mode 0600; every endpoint).
    pub socket: Option<PathBuf>,
    /// An optional admin TCP address (e.g. for a node's Prometheus): it
    /// serves GET /live, /ready, /metrics, /histograms to anyone, and the
    /// rest only with the bearer token from `token_file`.
    pub bind: Option<SocketAddr>,
    /// A file (mode 0600) holding the bearer token that unlocks every
    /// admin endpoint on `bind`. None: the TCP listener stays read-only.
    pub token_file: Option<PathBuf>,
}

/// Where and how a listener logs its requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AccessLog {
    /// A file (opened for append), or `stdout`.
    pub path: PathBuf,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// NCSA Common Log Format.
    Common,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Listener {
    pub name: String,
    pub bind: SocketAddr,
    pub protocol: Protocol,
    /// L4: no byte either way for this long closes the pair. HTTP: a
    /// keep-alive connection waiting this long for its next request, or a
    /// body stalled this long, is closed.
    #[serde(with = "humantime_serde_compat")]
    pub idle_timeout: Duration,
    /// HTTP: one line per request, if set.
    pub access_log: Option<AccessLog>,
    /// Terminate mTLS from peer sidecars (inbound role).
    pub tls: Option<tls::ListenerTls>,
    /// Caller identities allowed in; None: any caller the handshake admits.
    pub authorize: Option<Vec<crate::tls::identity::Pattern>>,
    /// Set on the listeners `[intercept]` names (`protocol = "auto"`):
    /// connections arrive redirected, and their original destination
    /// decides where they go.
    pub direction: Option<intercept::Direction>,
    /// The `direction` label of this listener's golden metrics: the
    /// intercept role where it has one, else the listener's `direction`
    /// key, else inbound when it terminates TLS (mesh peers call it) and
    /// outbound otherwise (the local app calls it).
    pub traffic: intercept::Direction,
    pub kind: ListenerKind,
}

/// What a listener does with a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum ListenerKind {
    Tcp {
        /// Index into [`Config::clusters`].
        cluster: usize,
        copy: CopyMode,
    },
    Http(http::HttpListener),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    Tcp,
    Http,
    /// Intercepted connections: each is detected (TLS, HTTP/2, HTTP/1.x,
    /// else opaque TCP) and routed by its original destination.
    Auto,
}

/// How an L4 listener moves plaintext bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyMode {
    /// The path measured best (see `pilotfish-bench l4`): splice on both
    /// drivers.
    Auto,
    /// read into a pooled buffer, write that same buffer out.
    Buffered,
    /// splice(2) socket → pipe → socket on the worker thread, non-blocking,
    /// waiting for readiness when a call would block; no user-space copy.
    Splice,
    /// splice as io_uring operations (io_uring workers only; epoll workers
    /// take `splice`): the kernel hands socket splices to its io-wq
    /// threads. Kept for comparison; measured slower (bench/README.md).
    SpliceIoUring,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cluster {
    pub name: String,
    /// The addresses requests go to: those written as IP:port, then what
    /// `hostnames` resolved to ([`crate::dns`]).
    pub endpoints: Vec<SocketAddr>,
    /// Endpoints written as `name:port`, resolved off the data path and
    /// re-resolved periodically; every address of each is an endpoint.
    pub hostnames: Vec<(String, u16)>,
    #[serde(with = "humantime_serde_compat")]
    pub connect_timeout: Duration,
    pub connect_attempts: u32,
    /// Originate mTLS to the endpoints (outbound role).
    pub tls: Option<tls::ClusterTls>,
    /// Used by HTTP listeners; L4 listeners use round robin and connect
    /// retries only.
    pub http: http::HttpCluster,
    /// Intercepted connections whose original destination matches one of
    /// these come to this cluster.
    pub destinations: Vec<intercept::Destination>,
    /// Which intercept listener's connections `destinations` are for.
    pub direction: intercept::Direction,
}

/// The file format. Kept separate from [`Config`] so that serde's view of
/// the text (with spans for error messages) never leaks into the proxy.
mod raw {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct File {
        pub workers: Option<Spanned<Workers>>,
        pub drain_timeout: Option<HumanDuration>,
        pub max_connections_per_worker: Option<Spanned<usize>>,
        #[serde(default)]
        pub runtime: Runtime,
        #[serde(default)]
        pub admin: Admin,
        pub tls: Option<Spanned<super::tls::raw::Files>>,
        #[serde(default)]
        pub listeners: Vec<Listener>,
        #[serde(default)]
        pub clusters: Vec<Cluster>,
        pub intercept: Option<Spanned<super::intercept::raw::Intercept>>,
        pub tracing: Option<Spanned<Tracing>>,
        #[serde(default)]
        pub overload: Overload,
        pub xds: Option<Spanned<super::xds::raw::Xds>>,
        #[serde(default)]
        pub dns: Dns,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Dns {
        pub resolvers: Option<Vec<Spanned<String>>>,
        pub refresh: Option<HumanDuration>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Overload {
        pub memory_max_mib: Option<Spanned<u64>>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Tracing {
        pub collector: Spanned<String>,
        pub path: Option<Spanned<String>>,
        pub sample_rate: Option<Spanned<f64>>,
        pub service_name: Option<Spanned<String>>,
        pub inject: Option<crate::trace::Format>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(untagged)]
    pub enum Workers {
        Count(usize),
        Named(String),
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Runtime {
        pub driver: Option<DriverChoice>,
        pub uring_setup: Option<UringSetup>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Admin {
        pub socket: Option<PathBuf>,
        pub bind: Option<Spanned<String>>,
        pub token_file: Option<Spanned<PathBuf>>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Listener {
        pub name: Spanned<String>,
        pub bind: Spanned<String>,
        pub protocol: Spanned<Protocol>,
        pub cluster: Option<Spanned<String>>,
        pub idle_timeout: Option<HumanDuration>,
        pub copy: Option<Spanned<CopyMode>>,
        /// Protocol "auto" only: read SO_ORIGINAL_DST on accept.
        pub original_dst: Option<Spanned<bool>>,
        // HTTP only.
        pub request_timeout: Option<HumanDuration>,
        pub head_bytes_max: Option<Spanned<usize>>,
        pub headers_max: Option<Spanned<usize>>,
        pub uri_bytes_max: Option<Spanned<usize>>,
        pub body_bytes_max: Option<Spanned<u64>>,
        pub access_log: Option<Spanned<AccessLog>>,
        pub tls: Option<Spanned<super::tls::raw::ListenerTls>>,
        pub authorize: Option<Spanned<Vec<Spanned<String>>>>,
        pub identity_header: Option<Spanned<String>>,
        pub merge_slashes: Option<bool>,
        pub escaped_slashes: Option<crate::route::path::SlashAction>,
        pub request_head_timeout: Option<HumanDuration>,
        pub rate_limit: Option<Spanned<super::http::raw::RateLimit>>,
        // HTTP/2 on this listener.
        pub h2_max_concurrent_streams: Option<Spanned<u32>>,
        pub h2_stream_window: Option<Spanned<u32>>,
        pub h2_connection_window: Option<Spanned<u32>>,
        #[serde(default)]
        pub routes: Vec<super::http::raw::Route>,
        /// The golden metrics' direction label (see [`super::Listener::traffic`]).
        pub direction: Option<Spanned<super::intercept::Direction>>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct AccessLog {
        /// A file path, or "stdout".
        pub path: String,
        pub format: Option<LogFormat>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Cluster {
        pub name: Spanned<String>,
        pub endpoints: Spanned<Vec<Spanned<String>>>,
        pub connect_timeout: Option<HumanDuration>,
        pub connect_attempts: Option<Spanned<u32>>,
        pub tls: Option<Spanned<super::tls::raw::ClusterTls>>,
        // HTTP only.
        pub protocol: Option<Spanned<String>>,
        pub h2_stream_window: Option<Spanned<u32>>,
        pub h2_connection_window: Option<Spanned<u32>>,
        pub lb: Option<Spanned<String>>,
        pub hash_header: Option<Spanned<String>>,
        pub max_idle_per_endpoint: Option<Spanned<usize>>,
        pub pool_idle_timeout: Option<HumanDuration>,
        pub retry_budget_percent: Option<Spanned<u32>>,
        pub circuit_breakers: Option<super::http::raw::Breakers>,
        pub outlier: Option<super::http::raw::Outlier>,
        pub health_check: Option<super::http::raw::HealthCheck>,
        // Interception.
        pub destinations: Option<Spanned<Vec<Spanned<String>>>>,
        pub direction: Option<super::intercept::Direction>,
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::parse(path, &Self::read(path)?)
    }

    /// Reads a config file's text, within the size limit.
    pub fn read(path: &Path) -> Result<String, ConfigError> {
        let meta = std::fs::metadata(path)
            .map_err(|e| ConfigError::whole_file(path, format!("cannot read: {e}")))?;
        if meta.len() > limits::CONFIG_FILE_BYTES_MAX {
            return Err(ConfigError::whole_file(
                path,
                format!(
                    "file is {} bytes; the limit is {} bytes",
                    meta.len(),
                    limits::CONFIG_FILE_BYTES_MAX
                ),
            ));
        }
        std::fs::read_to_string(path)
            .map_err(|e| ConfigError::whole_file(path, format!("cannot read: {e}")))
    }

    /// Parses and validates config text; `file` is used in error messages.
    pub fn parse(file: impl Into<PathBuf>, text: &str) -> Result<Config, ConfigError> {
        let file = file.into();
        let raw: raw::File = toml::from_str(text).map_err(|e| {
            ConfigError::at(&file, text, e.span(), None, e.message().trim().to_string())
        })?;
        Validator { file, text }.validate(raw)
    }

    /// Number of workers `"auto"` means here: the CPUs this process may use.
    pub fn available_cores() -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }

    /// A short human summary, printed by `pilotfish check`.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "workers: {} (driver {:?}), max {} connections per worker, drain {}\n",
            self.workers,
            self.driver,
            self.max_connections_per_worker,
            humantime::format_duration(self.drain_timeout)
        );
        for l in &self.listeners {
            match &l.kind {
                ListenerKind::Tcp { cluster, copy } => {
                    out += &format!(
                        "listener {:?}: {} tcp -> cluster {:?} (idle {}, copy {copy:?})\n",
                        l.name,
                        l.bind,
                        self.clusters[*cluster].name,
                        humantime::format_duration(l.idle_timeout),
                    );
                }
                ListenerKind::Http(_) if l.direction.is_some() => {
                    out += &format!(
                        "listener {:?}: {} intercept {:?}, protocol detected, cluster by original destination (idle {})\n",
                        l.name,
                        l.bind,
                        l.direction.unwrap_or(intercept::Direction::Outbound),
                        humantime::format_duration(l.idle_timeout),
                    );
                }
                ListenerKind::Http(h) => {
                    let fallback = h.default_cluster.map_or("404".to_string(), |c| {
                        format!("cluster {:?}", self.clusters[c].name)
                    });
                    out += &format!(
                        "listener {:?}: {} http, {} route(s), otherwise {fallback} (idle {})\n",
                        l.name,
                        l.bind,
                        h.routes.len(),
                        humantime::format_duration(l.idle_timeout),
                    );
                }
            }
        }
        for c in &self.clusters {
            out += &format!(
                "cluster {:?}: {} endpoint(s), connect timeout {}, {} attempt(s)\n",
                c.name,
                c.endpoints.len(),
                humantime::format_duration(c.connect_timeout),
                c.connect_attempts
            );
        }
        out
    }
}

/// Turns the file's view into a [`Config`], checking every cross-field rule.
/// (HTTP parts: see `http.rs`.)
struct Validator<'a> {
    file: PathBuf,
    text: &'a str,
}

impl Validator<'_> {
    fn error<T>(&self, spanned: &Spanned<T>, key: String, message: String) -> ConfigError {
        ConfigError::at(
            &self.file,
            self.text,
            Some(spanned.span()),
            Some(key),
            message,
        )
    }

    fn validate(&self, raw: raw::File) -> Result<Config, ConfigError> {
        let workers = self.workers(raw.workers.as_ref())?;
        let max_connections_per_worker = match &raw.max_connections_per_worker {
            None => limits::MAX_CONNECTIONS_PER_WORKER_DEFAULT,
            Some(n) if (1..=limits::MAX_CONNECTIONS_PER_WORKER_MAX).contains(n.get_ref()) => {
                *n.get_ref()
            }
            Some(n) => {
                return Err(self.error(
                    n,
                    "max_connections_per_worker".into(),
                    format!(
                        "must be between 1 and {}",
                        limits::MAX_CONNECTIONS_PER_WORKER_MAX
                    ),
                ))
            }
        };
        // An empty file parses (every key has a default) into a proxy that
        // serves nothing: almost surely a mistake (the wrong file, a bad
        // template). Without listeners a config is taken only where an
        // admin endpoint can swap a real one in later.
        if raw.listeners.is_empty()
            && raw.admin.socket.is_none()
            && raw.admin.bind.is_none()
            && raw.xds.is_none()
        {
            return Err(ConfigError::whole_file(
                &self.file,
                "no [[listeners]]: this config would serve nothing (add a listener, an [xds] management server, or an [admin] socket to apply one later)",
            ));
        }
        let tls = self.tls_files(raw.tls.as_ref())?;
        let clusters = self.clusters(&raw.clusters, tls.as_ref())?;
        let mut listeners = self.listeners(&raw.listeners, &raw.clusters, tls.as_ref())?;
        let intercept = self.intercept(raw.intercept.as_ref(), &mut listeners)?;
        // A listener's `direction` key may not contradict its intercept role.
        for (i, (l, r)) in listeners.iter().zip(&raw.listeners).enumerate() {
            if let (Some(role), Some(given)) = (l.direction, &r.direction) {
                if role != *given.get_ref() {
                    return Err(self.error(
                        given,
                        format!("listeners[{i}].direction"),
                        format!(
                            "listener {:?} is the {} intercept listener: its direction is {}",
                            l.name,
                            role.name(),
                            role.name()
                        ),
                    ));
                }
            }
        }
        let series = listeners.len()
            + 2 * clusters.len()
            + listeners
                .iter()
                .map(|l| match &l.kind {
                    ListenerKind::Http(h) => h.routes.len(),
                    ListenerKind::Tcp { .. } => 0,
                })
                .sum::<usize>();
        if series > limits::HISTOGRAM_SERIES_MAX {
            return Err(ConfigError::whole_file(
                &self.file,
                format!(
                    "{series} latency series (one per listener and route, two per cluster); the limit is {} (each costs memory on every worker)",
                    limits::HISTOGRAM_SERIES_MAX
                ),
            ));
        }
        let xds = self.xds(raw.xds.as_ref(), tls.as_ref())?;
        Ok(Config {
            workers,
            driver: raw.runtime.driver.unwrap_or(DriverChoice::Auto),
            uring_setup: raw.runtime.uring_setup.unwrap_or(UringSetup::CoopTaskrun),
            admin: Admin {
                socket: raw.admin.socket,
                bind: raw
                    .admin
                    .bind
                    .as_ref()
                    .map(|b| {
                        b.get_ref().parse::<SocketAddr>().map_err(|_| {
                            self.error(
                                b,
                                "admin.bind".to_string(),
                                format!("expected IP:port, found {:?}", b.get_ref()),
                            )
                        })
                    })
                    .transpose()?,
                token_file: match (&raw.admin.token_file, &raw.admin.bind) {
                    (Some(t), None) => {
                        return Err(self.error(
                            t,
                            "admin.token_file".into(),
                            "unlocks the admin TCP listener, so it needs admin.bind".into(),
                        ))
                    }
                    (t, _) => t.as_ref().map(|t| t.get_ref().clone()),
                },
            },
            overload: Overload {
                memory_max_mib: match &raw.overload.memory_max_mib {
                    Some(m) if *m.get_ref() == 0 => {
                        return Err(self.error(
                            m,
                            "overload.memory_max_mib".into(),
                            "must be at least 1 (leave it out for no memory stages)".into(),
                        ))
                    }
                    m => m.as_ref().map(|m| *m.get_ref()),
                },
            },
            max_connections_per_worker,
            drain_timeout: raw
                .drain_timeout
                .map_or(limits::DRAIN_TIMEOUT_DEFAULT, |d| d.0),
            tls,
            listeners,
            clusters,
            intercept,
            tracing: self.tracing(raw.tracing.as_ref())?,
            xds,
            dns: self.dns(&raw.dns)?,
        })
    }

    fn dns(&self, raw: &raw::Dns) -> Result<Dns, ConfigError> {
        let mut resolvers = Vec::new();
        for (i, r) in raw.resolvers.iter().flatten().enumerate() {
            let addr = r.get_ref().parse::<SocketAddr>().map_err(|_| {
                self.error(
                    r,
                    format!("dns.resolvers[{i}]"),
                    format!("expected IP:port of a name server, found {:?}", r.get_ref()),
                )
            })?;
            resolvers.push(addr);
        }
        if resolvers.len() > limits::DNS_RESOLVERS_MAX {
            return Err(ConfigError::whole_file(
                &self.file,
                format!(
                    "dns.resolvers: {} name servers; the limit is {}",
                    resolvers.len(),
                    limits::DNS_RESOLVERS_MAX
                ),
            ));
        }
        let refresh = raw.refresh.map_or(limits::DNS_REFRESH_DEFAULT, |d| d.0);
        if refresh < limits::DNS_REFRESH_MIN {
            return Err(ConfigError::whole_file(
                &self.file,
                format!(
                    "dns.refresh: {refresh:?} is below the floor of {:?} (each round asks every name server)",
                    limits::DNS_REFRESH_MIN
                ),
            ));
        }
        Ok(Dns { resolvers, refresh })
    }

    fn tracing(&self, raw: Option<&Spanned<raw::Tracing>>) -> Result<Option<Tracing>, ConfigError> {
        let Some(t) = raw.map(Spanned::get_ref) else {
            return Ok(None);
        };
        let collector = t.collector.get_ref();
        let port_ok = collector.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !port_ok {
            return Err(self.error(
                &t.collector,
                "tracing.collector".into(),
                format!("expected host:port of an OTLP/HTTP collector, found {collector:?}"),
            ));
        }
        let sample_rate = match &t.sample_rate {
            None => limits::TRACE_SAMPLE_RATE_DEFAULT,
            Some(r) if (0.0..=1.0).contains(r.get_ref()) => *r.get_ref(),
            Some(r) => {
                return Err(self.error(
                    r,
                    "tracing.sample_rate".into(),
                    "must be between 0.0 and 1.0".into(),
                ))
            }
        };
        let path = match &t.path {
            None => "/v1/traces".to_string(),
            Some(p)
                if p.get_ref().starts_with('/')
                    && !p
                        .get_ref()
                        .bytes()
                        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) =>
            {
                p.get_ref().clone()
            }
            Some(p) => {
                return Err(self.error(
                    p,
                    "tracing.path".into(),
                    "must start with / and hold no whitespace".into(),
                ))
            }
        };
        let service_name = match &t.service_name {
            None => "pilotfish".to_string(),
            Some(s) if !s.get_ref().is_empty() => s.get_ref().clone(),
            Some(s) => {
                return Err(self.error(s, "tracing.service_name".into(), "may not be empty".into()))
            }
        };
        Ok(Some(Tracing {
            collector: collector.clone(),
            path,
            sample_rate,
            service_name,
            inject: t.inject.unwrap_or(crate::trace::Format::W3c),
        }))
    }

    fn workers(&self, workers: Option<&Spanned<raw::Workers>>) -> Result<usize, ConfigError> {
        let Some(spanned) = workers else {
            return Ok(Config::available_cores());
        };
        let n = match spanned.get_ref() {
            raw::Workers::Named(name) if name == "auto" => Config::available_cores(),
            raw::Workers::Named(name) => {
                return Err(self.error(
                    spanned,
                    "workers".into(),
                    format!("expected a number or \"auto\", found {name:?}"),
                ))
            }
            raw::Workers::Count(n) => *n,
        };
        if !(1..=limits::WORKERS_MAX).contains(&n) {
            return Err(self.error(
                spanned,
                "workers".into(),
                format!("must be between 1 and {}", limits::WORKERS_MAX),
            ));
        }
        Ok(n)
    }

    fn clusters(
        &self,
        raw: &[raw::Cluster],
        files: Option<&tls::TlsFiles>,
    ) -> Result<Vec<Cluster>, ConfigError> {
        if raw.len() > limits::CLUSTERS_MAX {
            return Err(ConfigError::whole_file(
                &self.file,
                format!(
                    "{} clusters; the limit is {}",
                    raw.len(),
                    limits::CLUSTERS_MAX
                ),
            ));
        }
        let mut names = HashSet::new();
        let mut out = Vec::with_capacity(raw.len());
        for (i, c) in raw.iter().enumerate() {
            let key = |field: &str| format!("clusters[{i}].{field}");
            if c.name.get_ref().is_empty() {
                return Err(self.error(&c.name, key("name"), "must not be empty".into()));
            }
            if !names.insert(c.name.get_ref().as_str()) {
                return Err(self.error(
                    &c.name,
                    key("name"),
                    format!("duplicate cluster name {:?}", c.name.get_ref()),
                ));
            }
            let list = c.endpoints.get_ref();
            // Empty is allowed: such a cluster answers 503 (HTTP) or closes
            // (L4), as Envoy does for a cluster scaled to zero.
            if list.len() > limits::ENDPOINTS_PER_CLUSTER_MAX {
                return Err(self.error(
                    &c.endpoints,
                    key("endpoints"),
                    format!(
                        "needs at most {} endpoints, found {}",
                        limits::ENDPOINTS_PER_CLUSTER_MAX,
                        list.len()
                    ),
                ));
            }
            let mut endpoints = Vec::with_capacity(list.len());
            let mut hostnames = Vec::new();
            for (j, e) in list.iter().enumerate() {
                if let Ok(addr) = e.get_ref().parse::<SocketAddr>() {
                    endpoints.push(addr);
                    continue;
                }
                let named = e
                    .get_ref()
                    .rsplit_once(':')
                    .and_then(|(host, port)| {
                        let port = port.parse::<u16>().ok().filter(|p| *p > 0)?;
                        crate::dns::valid_name(host).then(|| (host.to_ascii_lowercase(), port))
                    })
                    .ok_or_else(|| {
                        self.error(
                            e,
                            format!("clusters[{i}].endpoints[{j}]"),
                            format!("expected IP:port or hostname:port, found {:?}", e.get_ref()),
                        )
                    })?;
                if !hostnames.contains(&named) {
                    hostnames.push(named);
                }
            }
            let connect_attempts = match &c.connect_attempts {
                None => limits::CONNECT_ATTEMPTS_DEFAULT,
                Some(n) if (1..=limits::CONNECT_ATTEMPTS_MAX).contains(n.get_ref()) => *n.get_ref(),
                Some(n) => {
                    return Err(self.error(
                        n,
                        key("connect_attempts"),
                        format!("must be between 1 and {}", limits::CONNECT_ATTEMPTS_MAX),
                    ))
                }
            };
            out.push(Cluster {
                name: c.name.get_ref().clone(),
                endpoints,
                hostnames,
                connect_timeout: c
                    .connect_timeout
                    .map_or(limits::CONNECT_TIMEOUT_DEFAULT, |d| d.0),
                connect_attempts,
                tls: self.cluster_tls(files, c.tls.as_ref(), key("tls"))?,
                http: self.http_cluster(i, c)?,
                destinations: self.destinations(i, c.destinations.as_ref())?,
                direction: c.direction.unwrap_or(intercept::Direction::Outbound),
            });
        }
        Ok(out)
    }

    fn listeners(
        &self,
        raw: &[raw::Listener],
        clusters: &[raw::Cluster],
        files: Option<&tls::TlsFiles>,
    ) -> Result<Vec<Listener>, ConfigError> {
        if raw.len() > limits::LISTENERS_MAX {
            return Err(ConfigError::whole_file(
                &self.file,
                format!(
                    "{} listeners; the limit is {}",
                    raw.len(),
                    limits::LISTENERS_MAX
                ),
            ));
        }
        let mut names = HashSet::new();
        let mut binds = HashSet::new();
        let mut out = Vec::with_capacity(raw.len());
        for (i, l) in raw.iter().enumerate() {
            let key = |field: &str| format!("listeners[{i}].{field}");
            if l.name.get_ref().is_empty() {
                return Err(self.error(&l.name, key("name"), "must not be empty".into()));
            }
            if !names.insert(l.name.get_ref().as_str()) {
                return Err(self.error(
                    &l.name,
                    key("name"),
                    format!("duplicate listener name {:?}", l.name.get_ref()),
                ));
            }
            let bind = l.bind.get_ref().parse::<SocketAddr>().map_err(|_| {
                self.error(
                    &l.bind,
                    key("bind"),
                    format!("expected IP:port, found {:?}", l.bind.get_ref()),
                )
            })?;
            // Port 0 asks the OS for a port; two such listeners never clash.
            if bind.port() != 0 && !binds.insert(bind) {
                return Err(self.error(
                    &l.bind,
                    key("bind"),
                    format!("duplicate bind address {bind}: another listener already uses it"),
                ));
            }
            let cluster = match &l.cluster {
                None => None,
                Some(name) => Some(
                    clusters
                        .iter()
                        .position(|c| c.name.get_ref() == name.get_ref())
                        .ok_or_else(|| {
                            self.error(
                                name,
                                key("cluster"),
                                format!("no cluster named {:?} is defined", name.get_ref()),
                            )
                        })?,
                ),
            };
            let tls = self.listener_tls(files, l.tls.as_ref(), key("tls"))?;
            let authorize = self.authorize(tls.as_ref(), l.authorize.as_ref(), key("authorize"))?;
            let kind = match l.protocol.get_ref() {
                Protocol::Tcp => {
                    let Some(cluster) = cluster else {
                        return Err(self.error(
                            &l.name,
                            key("cluster"),
                            "a tcp listener needs `cluster`: the cluster it forwards to".into(),
                        ));
                    };
                    self.no_http_keys(i, l)?;
                    ListenerKind::Tcp {
                        cluster,
                        copy: l.copy.as_ref().map_or(CopyMode::Auto, |c| *c.get_ref()),
                    }
                }
                Protocol::Http => {
                    if let Some(copy) = &l.copy {
                        return Err(self.error(
                            copy,
                            key("copy"),
                            "`copy` applies to tcp listeners only".into(),
                        ));
                    }
                    ListenerKind::Http(self.http_listener(i, l, cluster, clusters, tls.as_ref())?)
                }
                Protocol::Auto => {
                    if let Some(copy) = &l.copy {
                        return Err(self.error(
                            copy,
                            key("copy"),
                            "`copy` applies to tcp listeners only".into(),
                        ));
                    }
                    if let Some(c) = &l.cluster {
                        return Err(self.error(
                            c,
                            key("cluster"),
                            "an \"auto\" listener picks the cluster by each connection's original destination: list it in the cluster's `destinations` instead".into(),
                        ));
                    }
                    if !l.routes.is_empty() {
                        return Err(self.error(
                            &l.name,
                            key("routes"),
                            "routes on an \"auto\" listener are not supported: the original destination picks the cluster".into(),
                        ));
                    }
                    if let Some(o) = l.original_dst.as_ref().filter(|o| !*o.get_ref()) {
                        return Err(self.error(
                            o,
                            key("original_dst"),
                            "an \"auto\" listener routes by the original destination, so it must read it".into(),
                        ));
                    }
                    ListenerKind::Http(self.http_listener(i, l, None, clusters, tls.as_ref())?)
                }
            };
            if let (Some(o), false) = (&l.original_dst, *l.protocol.get_ref() == Protocol::Auto) {
                return Err(self.error(
                    o,
                    key("original_dst"),
                    "`original_dst` applies to protocol \"auto\" (intercept) listeners only".into(),
                ));
            }
            let access_log = match &l.access_log {
                None => None,
                Some(spanned) => {
                    let raw = spanned.get_ref();
                    if matches!(kind, ListenerKind::Tcp { .. }) {
                        return Err(self.error(
                            spanned,
                            key("access_log"),
                            "`access_log` applies to http listeners only".into(),
                        ));
                    }
                    if raw.path.trim().is_empty() {
                        return Err(self.error(
                            spanned,
                            key("access_log.path"),
                            "give a file path or \"stdout\"".into(),
                        ));
                    }
                    Some(AccessLog {
                        path: PathBuf::from(&raw.path),
                        format: raw.format.unwrap_or(LogFormat::Json),
                    })
                }
            };
            let traffic = match (&l.direction, &tls) {
                (Some(d), _) => *d.get_ref(),
                (None, Some(_)) => intercept::Direction::Inbound,
                (None, None) => intercept::Direction::Outbound,
            };
            out.push(Listener {
                traffic,
                name: l.name.get_ref().clone(),
                bind,
                protocol: *l.protocol.get_ref(),
                idle_timeout: l.idle_timeout.map_or(limits::IDLE_TIMEOUT_DEFAULT, |d| d.0),
                access_log,
                tls,
                authorize,
                direction: None,
                kind,
            });
        }
        Ok(out)
    }
}

/// Durations serialize as human strings, the same form they are read in.
pub(crate) mod humantime_serde_compat {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
workers = 2
[admin]
socket = "/run/pilotfish/admin.sock"
[[listeners]]
name = "app-out"
bind = "127.0.0.1:15001"
protocol = "tcp"
cluster = "backend"
[[clusters]]
name = "backend"
endpoints = ["127.0.0.1:8080", "127.0.0.1:8081"]
connect_timeout = "1s"
"#;

    #[test]
    fn the_issue_example_parses_with_defaults() {
        let c = Config::parse("good.toml", GOOD).unwrap();
        assert_eq!(c.workers, 2);
        assert!(matches!(
            c.listeners[0].kind,
            ListenerKind::Tcp { cluster: 0, .. }
        ));
        assert_eq!(c.clusters[0].endpoints.len(), 2);
        assert_eq!(c.listeners[0].idle_timeout, limits::IDLE_TIMEOUT_DEFAULT);
        assert_eq!(
            c.clusters[0].connect_attempts,
            limits::CONNECT_ATTEMPTS_DEFAULT
        );
        assert_eq!(c.drain_timeout, limits::DRAIN_TIMEOUT_DEFAULT);
    }

    #[test]
    fn a_listeners_metrics_direction_is_given_or_inferred() {
        let c = Config::parse("good.toml", GOOD).unwrap();
        // Plaintext, no `direction`: the local app's outbound listener.
        assert_eq!(c.listeners[0].traffic, intercept::Direction::Outbound);
        let toml = GOOD.replace(
            "protocol = \"tcp\"\ncluster = \"backend\"",
            "protocol = \"tcp\"\ncluster = \"backend\"\ndirection = \"inbound\"",
        );
        assert_ne!(toml, GOOD);
        let c = Config::parse("in.toml", &toml).unwrap();
        assert_eq!(c.listeners[0].traffic, intercept::Direction::Inbound);
        let bad = Config::parse("bad.toml", &toml.replace("\"inbound\"", "\"sideways\""));
        assert!(bad.unwrap_err().to_string().contains("direction"));
        // An intercept listener's role decides; a contradicting key is an error.
        let intercept = r#"
[intercept]
outbound_listener = "out"
proxy_uid = 1337
[[listeners]]
name = "out"
bind = "127.0.0.1:15001"
protocol = "auto"
direction = "inbound"
"#;
        let err = Config::parse("i.toml", intercept).unwrap_err().to_string();
        assert!(err.contains("i.toml") && err.contains("direction"), "{err}");
        assert!(err.contains("outbound intercept listener"), "{err}");
        let ok = Config::parse(
            "i.toml",
            &intercept.replace("direction = \"inbound\"", "direction = \"outbound\""),
        )
        .unwrap();
        assert_eq!(ok.listeners[0].traffic, intercept::Direction::Outbound);
    }

    #[test]
    fn workers_auto_means_available_cores() {
        let c = Config::parse("a.toml", &GOOD.replace("workers = 2", "workers = \"auto\""));
        assert_eq!(c.unwrap().workers, Config::available_cores());
    }

    /// Each bad variant must fail, and the message must name the key and line.
    #[test]
    fn bad_configs_name_file_line_and_key() {
        let cases = [
            ("workers = 2", "workers = 2\nbogus = 1", "bogus", 3),
            (
                "cluster = \"backend\"",
                "cluster = \"nope\"",
                "listeners[0].cluster",
                9,
            ),
            (
                "connect_timeout = \"1s\"",
                "connect_timeout = \"1 parsec\"",
                "connect_timeout",
                13,
            ),
            ("workers = 2", "workers = 0", "workers", 2),
            ("workers = 2", "workers = \"many\"", "workers", 2),
            (
                "\"127.0.0.1:8081\"]",
                "\"localhost\"]",
                "clusters[0].endpoints[1]",
                12,
            ),
            ("protocol = \"tcp\"", "protocol = \"udp\"", "protocol", 8),
        ];
        for (from, to, key, line) in cases {
            let text = GOOD.replace(from, to);
            assert_ne!(text, GOOD, "case {to:?} did not change the text");
            let err = Config::parse("bad.toml", &text).unwrap_err();
            let shown = err.to_string();
            assert!(
                shown.starts_with(&format!("bad.toml:{line}:")),
                "{to:?}: {shown}"
            );
            assert!(shown.contains(key), "{to:?}: {shown}");
        }
    }

    #[test]
    fn duplicate_names_and_binds_are_rejected() {
        let two = format!(
            "{GOOD}[[listeners]]\nname = \"app-out\"\nbind = \"127.0.0.1:15002\"\nprotocol = \"tcp\"\ncluster = \"backend\"\n"
        );
        let err = Config::parse("d.toml", &two).unwrap_err().to_string();
        assert!(
            err.contains("listeners[1].name") && err.contains("duplicate"),
            "{err}"
        );
        let same_bind = two.replace(
            "name = \"app-out\"\nbind = \"127.0.0.1:15002\"",
            "name = \"b\"\nbind = \"127.0.0.1:15001\"",
        );
        let err = Config::parse("d.toml", &same_bind).unwrap_err().to_string();
        assert!(
            err.contains("listeners[1].bind") && err.contains("duplicate bind"),
            "{err}"
        );
    }
}
