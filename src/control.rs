//! Live config swaps on every worker: validate once, prepare everywhere,
//! then commit everywhere or nowhere.
//!
//! What must hold: a swap either switches every worker to the new config or
//! leaves every worker on the old one (a worker that cannot prepare, e.g.
//! cannot bind a new listener, aborts the swap for all); listeners whose
//! address stays keep their sockets, so no connection is refused during a
//! swap; connections accepted before the commit finish on the config they
//! started with (HTTP/1.1 keep-alive connections on a listener the swap
//! left unchanged go on with the new one between requests); [`Controller::apply`] returns only once every worker
//! serves new connections on the new config. Swaps are serialised: the
//! admin socket, the admin TCP listener and SIGHUP may race, and each waits
//! its turn.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::Serialize;

use crate::{
    config::{
        compose::{compose, Dynamic},
        tls::TlsFiles,
        Config, ConfigError,
    },
    tls::material::{MaterialError, Pushed, Workload},
    worker::{ask_all, listener, Command},
};

// The admin path only, never taken by a worker: swaps are rare, and
// serialising them is the point.
#[allow(clippy::disallowed_types)]
type Lock<T> = std::sync::Mutex<T>;

/// How long a swap waits for every worker to prepare and then to commit.
/// A message wakes a worker at once and binding is immediate; a worker
/// silent this long is wedged, and the swap is called off.
pub const SWAP_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a swap did not happen. Nothing changed on any worker.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{0}")]
    Invalid(#[from] ConfigError),
    #[error("these settings take effect only at start; restart to change them: {}", .0.join(", "))]
    NeedsRestart(Vec<&'static str>),
    #[error("listener {listener:?} cannot reserve {addr}: {source}")]
    Reserve {
        listener: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("no worker switched: {}", .0.join("; "))]
    Prepare(Vec<String>),
    #[error("the proxy is draining")]
    Draining,
    #[error("TLS material: {0}")]
    Tls(#[from] MaterialError),
    #[error("{0}")]
    AccessLog(String),
}

impl ApplyError {
    /// The admin socket's status for this error: the request's fault (400)
    /// or the proxy's state (409/503).
    pub fn status(&self) -> u16 {
        match self {
            ApplyError::Invalid(_)
            | ApplyError::NeedsRestart(_)
            | ApplyError::Tls(_)
            | ApplyError::AccessLog(_) => 400,
            ApplyError::Reserve { .. } | ApplyError::Prepare(_) => 409,
            ApplyError::Draining => 503,
        }
    }
}

/// What a swap changed, by name.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Changes {
    pub generation: u64,
    pub listeners_added: Vec<String>,
    pub listeners_removed: Vec<String>,
    pub listeners_changed: Vec<String>,
    pub clusters_added: Vec<String>,
    pub clusters_removed: Vec<String>,
    pub clusters_changed: Vec<String>,
    /// Top-level settings that changed (drain_timeout, ...).
    pub settings_changed: Vec<&'static str>,
    /// The serial of the certificate new handshakes present, when the TLS
    /// files were read again.
    pub tls_serial: Option<String>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.listeners_added.is_empty()
            && self.listeners_removed.is_empty()
            && self.listeners_changed.is_empty()
            && self.clusters_added.is_empty()
            && self.clusters_removed.is_empty()
            && self.clusters_changed.is_empty()
            && self.settings_changed.is_empty()
            && self.tls_serial.is_none()
    }

    /// One line for logs and the admin CLI.
    pub fn summary(&self) -> String {
        if self.is_empty() {
            return format!("generation {}: nothing changed", self.generation);
        }
        let mut parts = Vec::new();
        for (what, names) in [
            ("listeners added", &self.listeners_added),
            ("listeners removed", &self.listeners_removed),
            ("listeners changed", &self.listeners_changed),
            ("clusters added", &self.clusters_added),
            ("clusters removed", &self.clusters_removed),
            ("clusters changed", &self.clusters_changed),
        ] {
            if !names.is_empty() {
                parts.push(format!("{what}: {}", names.join(", ")));
            }
        }
        if !self.settings_changed.is_empty() {
            parts.push(format!("settings: {}", self.settings_changed.join(", ")));
        }
        if let Some(serial) = &self.tls_serial {
            parts.push(format!("TLS material reloaded (serial {serial})"));
        }
        format!("generation {}: {}", self.generation, parts.join("; "))
    }
}

#[derive(Debug)]
struct Running {
    config: Arc<Config>,
    binds: Arc<Vec<SocketAddr>>,
    generation: u64,
    tls: TlsRunning,
}

/// The TLS material every worker uses, and what the files looked like
/// when it was read.
#[derive(Debug, Default)]
struct TlsRunning {
    workload: Option<Arc<Workload>>,
    /// What a control plane pushed (SDS), in place of the files' parts;
    /// kept across swaps and file reloads until the next push.
    pushed: Option<Pushed>,
    /// The files' stamps at the last load attempt (successful or not: a
    /// half-written file is retried when it changes again, not every tick).
    stamps: Vec<Stamp>,
    reloads: u64,
    reload_failures: u64,
    last_error: Option<String>,
}

/// What tells a changed file: modification time, size and inode (a
/// Kubernetes secret volume swaps a symlink; metadata follows it).
type Stamp = Option<(std::time::SystemTime, u64, u64)>;

fn stamps(files: &TlsFiles) -> Vec<Stamp> {
    use std::os::unix::fs::MetadataExt;
    [&files.cert, &files.key, &files.trust_bundle]
        .into_iter()
        .chain(files.federation.iter().map(|(_, bundle)| bundle))
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len(), m.ino())))
        })
        .collect()
}

/// How often the TLS files' stamps are checked: new handshakes use new
/// material within this of the change (the message wakes the workers).
pub const TLS_WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// The TLS material in use, for `/stats` and `/metrics`.
#[derive(Debug, Clone, Serialize)]
pub struct TlsStatus {
    pub identity: String,
    pub serial: String,
    /// Unix seconds.
    pub not_after: u64,
    pub seconds_to_expiry: i64,
    pub trust_anchors: usize,
    /// "files", or "xds" when a control plane pushed any part of it.
    pub source: &'static str,
    /// Successful loads after the first.
    pub reloads: u64,
    pub reload_failures: u64,
    pub last_error: Option<String>,
}

/// The proxy's config as every worker runs it, and the way to change it.
#[derive(Debug)]
pub struct Controller {
    mailboxes: Vec<crate::worker::Mailbox>,
    running: Lock<Running>,
    /// The access log writer's reopen and lost-line count.
    logs: crate::access_log::Control,
    /// Every worker's drain/stop flag (see [`crate::worker::Lifeline`]).
    lifelines: Vec<crate::worker::Lifeline>,
    /// What the span exporter delivered and lost.
    spans: Arc<crate::trace::export::ExportStats>,
    /// The memory overload monitor's last sample.
    overload: Arc<crate::lifecycle::overload::Status>,
    /// The file below and the control plane's resources above; taken
    /// before `running` whenever both are.
    layers: Lock<Layers>,
    /// The control-plane client's state, for the admin socket.
    xds: Arc<crate::xds::Status>,
    dns: Arc<crate::dns::Counters>,
}

/// What the running config was composed from (see [`compose`]).
#[derive(Debug, Default)]
struct Layers {
    /// The file or `POST /config` body: its name for errors, and its text.
    base: Option<(PathBuf, String)>,
    dynamic: Dynamic,
    /// What endpoint host names resolved to ([`crate::dns`]).
    resolved: crate::dns::Resolved,
}

impl Controller {
    pub fn new(
        config: Arc<Config>,
        binds: Arc<Vec<SocketAddr>>,
        mailboxes: Vec<crate::worker::Mailbox>,
        tls: Option<Arc<Workload>>,
        logs: crate::access_log::Control,
        lifelines: Vec<crate::worker::Lifeline>,
        spans: Arc<crate::trace::export::ExportStats>,
    ) -> Self {
        let stamps = config.tls.as_ref().map(stamps).unwrap_or_default();
        Self {
            mailboxes,
            logs,
            lifelines,
            spans,
            overload: Arc::default(),
            layers: Lock::default(),
            xds: Arc::default(),
            dns: Arc::default(),
            running: Lock::new(Running {
                config,
                binds,
                generation: 0,
                tls: TlsRunning {
                    workload: tls,
                    stamps,
                    ..TlsRunning::default()
                },
            }),
        }
    }

    /// Loads the material `config` names, as the workers will use it.
    /// Tells every worker to drain, through its lifeline (a full mailbox
    /// cannot refuse it).
    pub fn drain_all(&self) {
        for l in &self.lifelines {
            l.drain();
        }
    }

    /// Closes the access log files, to be reopened by name (rotation).
    pub fn reopen_logs(&self) {
        self.logs.reopen();
    }

    /// Access log lines the writer could not write.
    pub fn access_log_lost(&self) -> u64 {
        self.logs.lost()
    }

    /// The memory overload stage and what it was decided from.
    pub fn overload(&self) -> crate::lifecycle::overload::Report {
        self.overload.report()
    }

    /// Where the overload monitor publishes its samples.
    pub fn overload_status(&self) -> Arc<crate::lifecycle::overload::Status> {
        Arc::clone(&self.overload)
    }

    /// Tells each worker the memory overload stage, unless `told` says it
    /// already knows; a full mailbox leaves it untold (None) for the next
    /// sample to retry.
    pub fn tell_overload(&self, stage: u8, told: &mut [Option<u8>]) {
        for (mailbox, told) in self.mailboxes.iter().zip(told.iter_mut()) {
            if *told == Some(stage) {
                continue;
            }
            *told = mailbox
                .try_send(Command::Overload(stage))
                .ok()
                .map(|()| stage);
        }
    }

    /// Spans exported, and spans the exporter could not deliver.
    pub fn span_export(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.spans.exported.load(Relaxed),
            self.spans.failed.load(Relaxed),
        )
    }

    /// Also checks that every cluster's `server_identity` is in a trust
    /// domain the material has a bundle for (else no server could ever
    /// be verified).
    pub fn load_tls(config: &Config) -> Result<Option<Arc<Workload>>, MaterialError> {
        Self::load_tls_with(config, None)
    }

    /// [`Self::load_tls`] with the parts a control plane pushed.
    fn load_tls_with(
        config: &Config,
        pushed: Option<&Pushed>,
    ) -> Result<Option<Arc<Workload>>, MaterialError> {
        let Some(files) = config.tls.as_ref() else {
            return Ok(None);
        };
        let workload = Workload::load_with(files, pushed)?;
        let domains = &workload.material.domains;
        for c in &config.clusters {
            let Some(tls) = &c.tls else { continue };
            let domain = tls.server_identity.trust_domain();
            if !domains.iter().any(|(d, _)| d == domain) {
                return Err(MaterialError::Domain(format!(
                    "cluster {:?} expects {}, but trust domain {domain:?} has no bundle here (the own domain is {:?}; add it to tls.federates_with)",
                    c.name, tls.server_identity, domains[0].0
                )));
            }
        }
        Ok(Some(Arc::new(workload)))
    }

    /// The material in use, if any.
    pub fn tls_status(&self) -> Option<TlsStatus> {
        let r = self.running();
        let w = r.tls.workload.as_ref()?;
        let m = &w.material;
        Some(TlsStatus {
            identity: m.identity.to_string(),
            serial: m.serial.clone(),
            not_after: m
                .not_after
                .duration_since(std::time::SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            seconds_to_expiry: m.seconds_to_expiry(),
            trust_anchors: m.roots.len(),
            source: if w.pushed { "xds" } else { "files" },
            reloads: r.tls.reloads,
            reload_failures: r.tls.reload_failures,
            last_error: r.tls.last_error.clone(),
        })
    }

    /// Reads the TLS files again and hands the material to every worker
    /// (the config itself is unchanged).
    fn rotate_tls(
        &self,
        running: &mut std::sync::MutexGuard<'_, Running>,
    ) -> Result<Changes, ApplyError> {
        let tls = Self::load_tls_with(&running.config, running.tls.pushed.as_ref())?;
        let stamps = running.config.tls.as_ref().map(stamps).unwrap_or_default();
        let serial = tls.as_ref().map(|w| w.material.serial.clone());
        self.install_tls(running, tls, stamps);
        let changes = Changes {
            generation: running.generation,
            tls_serial: serial,
            ..Changes::default()
        };
        tracing::info!(changes = %changes.summary(), "config unchanged; TLS material reloaded");
        Ok(changes)
    }

    /// Sends `tls` to every worker and records it as the material in use.
    fn install_tls(
        &self,
        running: &mut std::sync::MutexGuard<'_, Running>,
        tls: Option<Arc<Workload>>,
        stamps: Vec<Stamp>,
    ) {
        let answered = ask_all(&self.mailboxes, SWAP_TIMEOUT, |reply| Command::Tls {
            workload: tls.clone(),
            reply,
        });
        if answered.len() < self.mailboxes.len() {
            tracing::error!(
                answered = answered.len(),
                workers = self.mailboxes.len(),
                "not every worker confirmed the new TLS material in time"
            );
        }
        running.tls.stamps = stamps;
        running.tls.workload = tls;
        running.tls.reloads += 1;
        running.tls.last_error = None;
    }

    /// Reloads the TLS files if their stamps changed since the last
    /// attempt, and hands the new material to every worker. Ok(Some(serial))
    /// when new material is in use; a file that does not load keeps the
    /// old material (and is counted and logged).
    pub fn reload_tls_if_changed(&self) -> Result<Option<String>, MaterialError> {
        let mut running = self.running();
        let Some(files) = running.config.tls.clone() else {
            return Ok(None);
        };
        let now = stamps(&files);
        if now == running.tls.stamps {
            return Ok(None);
        }
        running.tls.stamps = now;
        let workload = match Workload::load_with(&files, running.tls.pushed.as_ref()) {
            Ok(w) => Arc::new(w),
            Err(e) => {
                running.tls.reload_failures += 1;
                running.tls.last_error = Some(e.to_string());
                tracing::warn!(error = %e, "TLS files changed but do not load; keeping the material in use");
                return Err(e);
            }
        };
        let serial = workload.material.serial.clone();
        tracing::info!(identity = %workload.material.identity, %serial, "TLS files changed; material reloaded");
        let stamps = running.tls.stamps.clone();
        self.install_tls(&mut running, Some(workload), stamps);
        Ok(Some(serial))
    }

    /// Puts material a control plane pushed (SDS) into use on every
    /// worker, in place of the files' parts; Ok(serial) once every worker
    /// has it. Material that does not load, or that leaves a cluster's
    /// expected identity without a bundle, changes nothing.
    pub fn push_tls(&self, pushed: Pushed) -> Result<String, MaterialError> {
        let mut running = self.running();
        let Some(workload) = Self::load_tls_with(&running.config, Some(&pushed))? else {
            return Err(MaterialError::Domain(
                "pushed TLS material needs [tls] in the config (its settings, and the bootstrap files)".into(),
            ));
        };
        // A control plane rotates this workload's certificate; it does not
        // make the sidecar someone else (that takes a new bootstrap).
        if let Some(current) = &running.tls.workload {
            let (now, new) = (&current.material.identity, &workload.material.identity);
            if now != new {
                return Err(MaterialError::Domain(format!(
                    "the pushed certificate is {new}, but this workload is {now}"
                )));
            }
        }
        let serial = workload.material.serial.clone();
        tracing::info!(identity = %workload.material.identity, %serial, "TLS material pushed by the control plane is in use");
        let stamps = running.config.tls.as_ref().map(stamps).unwrap_or_default();
        running.tls.pushed = Some(pushed);
        self.install_tls(&mut running, Some(workload), stamps);
        Ok(serial)
    }

    fn running(&self) -> std::sync::MutexGuard<'_, Running> {
        // A panic while holding the lock left a consistent Running (it is
        // replaced whole), so a poisoned lock is still usable.
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn mailboxes(&self) -> &[crate::worker::Mailbox] {
        &self.mailboxes
    }

    /// The config new connections get.
    pub fn config(&self) -> Arc<Config> {
        Arc::clone(&self.running().config)
    }

    /// Every listener's name and bound address.
    pub fn listeners(&self) -> Vec<(String, SocketAddr)> {
        let r = self.running();
        r.config
            .listeners
            .iter()
            .zip(r.binds.iter())
            .map(|(l, a)| (l.name.clone(), *a))
            .collect()
    }

    /// Records the text the running config was parsed from, so that a
    /// control plane's resources can be composed with it.
    pub fn set_base(&self, file: &Path, text: &str) {
        self.layers().base = Some((file.to_path_buf(), text.to_string()));
    }

    /// Swaps to the config in `text` (a file's or a `POST /config` body)
    /// with the control plane's resources, as they are, on top.
    pub fn apply_text(&self, file: &Path, text: &str) -> Result<Changes, ApplyError> {
        let mut layers = self.layers();
        let mut config = compose(file, text, &layers.dynamic)?;
        crate::dns::fill(&mut config, &layers.resolved);
        let changes = self.apply(config)?;
        layers.base = Some((file.to_path_buf(), text.to_string()));
        Ok(changes)
    }

    /// Swaps to the last file or body with `dynamic` on top (the control
    /// plane's whole state). An unchanged result changes nothing.
    pub fn apply_dynamic(&self, dynamic: Dynamic) -> Result<Changes, ApplyError> {
        let mut layers = self.layers();
        let Some((file, text)) = &layers.base else {
            return Err(ApplyError::Invalid(ConfigError::whole_file(
                "control plane",
                "no base config to compose with",
            )));
        };
        let mut config = compose(file, text, &dynamic)?;
        crate::dns::fill(&mut config, &layers.resolved);
        let changes = self.apply_if_changed(config)?;
        layers.dynamic = dynamic;
        Ok(changes)
    }

    /// The fast path for an endpoint push: the running config with the
    /// endpoints of the clusters in `endpoints` (by name) replaced; the
    /// control plane's layer becomes `dynamic` (which differs from the
    /// last one in those endpoints only). No compose, no parse: listeners,
    /// routes and the other clusters are as they run.
    pub fn apply_endpoints(
        &self,
        dynamic: Dynamic,
        endpoints: &std::collections::BTreeMap<String, Vec<SocketAddr>>,
    ) -> Result<Changes, ApplyError> {
        let mut layers = self.layers();
        let mut config = (*self.config()).clone();
        for c in &mut config.clusters {
            let Some(list) = endpoints.get(&c.name) else {
                continue;
            };
            if list.len() > crate::config::limits::ENDPOINTS_PER_CLUSTER_MAX {
                return Err(ApplyError::Invalid(ConfigError::whole_file(
                    "control plane",
                    format!(
                        "cluster {:?}: {} endpoints; the limit is {}",
                        c.name,
                        list.len(),
                        crate::config::limits::ENDPOINTS_PER_CLUSTER_MAX
                    ),
                )));
            }
            c.endpoints.clone_from(list);
        }
        crate::dns::fill(&mut config, &layers.resolved);
        let changes = self.apply_if_changed(config)?;
        layers.dynamic = dynamic;
        Ok(changes)
    }

    /// Swaps to the running layers with endpoint host names resolved as in
    /// `resolved` (the DNS thread's answers).
    pub fn apply_resolved(&self, resolved: crate::dns::Resolved) -> Result<Changes, ApplyError> {
        let mut layers = self.layers();
        let Some((file, text)) = &layers.base else {
            return Err(ApplyError::Invalid(ConfigError::whole_file(
                "dns",
                "no base config to compose with",
            )));
        };
        let mut config = compose(file, text, &layers.dynamic)?;
        crate::dns::fill(&mut config, &resolved);
        let changes = self.apply_if_changed(config)?;
        layers.resolved = resolved;
        Ok(changes)
    }

    /// What endpoint host names resolved to last.
    pub fn resolved(&self) -> crate::dns::Resolved {
        self.layers().resolved.clone()
    }

    /// Records answers already filled into the running config (at start).
    pub fn set_resolved(&self, resolved: crate::dns::Resolved) {
        self.layers().resolved = resolved;
    }

    pub fn dns_counters(&self) -> Arc<crate::dns::Counters> {
        Arc::clone(&self.dns)
    }

    fn apply_if_changed(&self, config: Config) -> Result<Changes, ApplyError> {
        if *self.config() == config {
            return Ok(Changes {
                generation: self.running().generation,
                ..Changes::default()
            });
        }
        self.apply(config)
    }

    /// The control-plane client's state.
    pub fn xds_status(&self) -> Arc<crate::xds::Status> {
        Arc::clone(&self.xds)
    }

    /// The control plane's resources in the running config.
    pub fn dynamic(&self) -> Dynamic {
        self.layers().dynamic.clone()
    }

    fn layers(&self) -> std::sync::MutexGuard<'_, Layers> {
        self.layers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Swaps every worker to `config`, or none. See the module header.
    pub fn apply(&self, config: Config) -> Result<Changes, ApplyError> {
        let mut running = self.running();
        let old = Arc::clone(&running.config);
        let restart = needs_restart(&old, &config);
        if !restart.is_empty() {
            return Err(ApplyError::NeedsRestart(restart));
        }
        crate::access_log::check_writable(&config).map_err(ApplyError::AccessLog)?;
        if *old == config && config.tls.is_some() {
            // Nothing but (maybe) the certificates: rotate them without a
            // new generation, so no open connection is asked to close.
            return self.rotate_tls(&mut running);
        }
        // Where each listener binds: a kept address keeps its sockets; a
        // port-0 listener that keeps its name and bind keeps its port.
        let mut reservations = Vec::new();
        let mut binds = Vec::with_capacity(config.listeners.len());
        for l in &config.listeners {
            let kept = old
                .listeners
                .iter()
                .zip(running.binds.iter())
                .find(|(o, _)| l.bind.port() == 0 && o.name == l.name && o.bind == l.bind)
                .map(|(_, a)| *a);
            let addr = match kept {
                Some(a) => a,
                None if l.bind.port() == 0 => {
                    let (addr, held) =
                        listener::reserve(l.bind).map_err(|source| ApplyError::Reserve {
                            listener: l.name.clone(),
                            addr: l.bind,
                            source,
                        })?;
                    reservations.push(held);
                    addr
                }
                None if running.binds.contains(&l.bind) => l.bind,
                None => {
                    // New to this process: nobody else may hold it either.
                    listener::ensure_free(l.bind).map_err(|source| ApplyError::Reserve {
                        listener: l.name.clone(),
                        addr: l.bind,
                        source,
                    })?;
                    l.bind
                }
            };
            binds.push(addr);
        }
        // Every swap reads the TLS files afresh: SIGHUP and POST /config
        // are also how an operator says "the certificates changed".
        let tls_stamps = config.tls.as_ref().map(stamps).unwrap_or_default();
        let pushed = running.tls.pushed.clone();
        let tls = Self::load_tls_with(&config, pushed.as_ref())?;
        let config = Arc::new(config);
        let binds = Arc::new(binds);
        let generation = running.generation + 1;

        let answers = ask_all(&self.mailboxes, SWAP_TIMEOUT, |reply| Command::Prepare {
            generation,
            config: Arc::clone(&config),
            binds: Arc::clone(&binds),
            tls: tls.clone(),
            reply,
        });
        let mut failures: Vec<String> = answers
            .iter()
            .filter_map(|p| p.result.as_ref().err().cloned())
            .collect();
        if answers.len() < self.mailboxes.len() {
            failures.push(format!(
                "{} of {} workers did not answer within {SWAP_TIMEOUT:?}",
                self.mailboxes.len() - answers.len(),
                self.mailboxes.len()
            ));
        }
        if !failures.is_empty() {
            for m in &self.mailboxes {
                let _ = m.send_timeout(Command::Abort { generation }, SWAP_TIMEOUT);
            }
            failures.sort();
            if failures.iter().all(|f| f.ends_with(": draining")) {
                return Err(ApplyError::Draining);
            }
            return Err(ApplyError::Prepare(failures));
        }
        let committed = ask_all(&self.mailboxes, SWAP_TIMEOUT, |reply| Command::Commit {
            generation,
            reply,
        });
        if committed.len() < self.mailboxes.len() {
            // Every worker prepared, so a commit cannot fail; one that has
            // not confirmed yet is slow, and will switch when it gets to it.
            tracing::error!(
                generation,
                confirmed = committed.len(),
                workers = self.mailboxes.len(),
                "not every worker confirmed the commit in time"
            );
        }
        drop(reservations);
        let mut changes = diff(&old, &config, generation);
        changes.tls_serial = tls.as_ref().map(|w| w.material.serial.clone());
        let reloads = running.tls.reloads + u64::from(tls.is_some());
        let reload_failures = running.tls.reload_failures;
        *running = Running {
            config,
            binds,
            generation,
            tls: TlsRunning {
                workload: tls,
                pushed,
                stamps: tls_stamps,
                reloads,
                reload_failures,
                last_error: None,
            },
        };
        tracing::info!(changes = %changes.summary(), "config swapped on every worker");
        Ok(changes)
    }
}

/// Settings a running process cannot change: the worker threads, their
/// runtimes, and the admin endpoints it answers this very request on.
fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    if old.workers != new.workers {
        out.push("workers");
    }
    if old.driver != new.driver {
        out.push("runtime.driver");
    }
    if old.uring_setup != new.uring_setup {
        out.push("runtime.uring_setup");
    }
    if old.admin != new.admin {
        out.push("admin");
    }
    if old.xds != new.xds {
        out.push("xds");
    }
    out
}

fn diff(old: &Config, new: &Config, generation: u64) -> Changes {
    fn by_name<'a, T: PartialEq>(
        old: &'a [T],
        new: &'a [T],
        name: impl Fn(&T) -> &str,
    ) -> (Vec<String>, Vec<String>, Vec<String>) {
        // By name through a map: a control plane's thousand clusters made
        // the pairwise search the largest cost of a swap.
        let index = |list: &'a [T]| {
            list.iter()
                .map(|x| (name(x), x))
                .collect::<std::collections::HashMap<&str, &T>>()
        };
        let (old_by, new_by) = (index(old), index(new));
        let added = new
            .iter()
            .filter(|x| !old_by.contains_key(name(x)))
            .map(|x| name(x).to_string())
            .collect();
        let removed = old
            .iter()
            .filter(|x| !new_by.contains_key(name(x)))
            .map(|x| name(x).to_string())
            .collect();
        let changed = new
            .iter()
            .filter(|x| old_by.get(name(x)).is_some_and(|o| *o != *x))
            .map(|x| name(x).to_string())
            .collect();
        (added, removed, changed)
    }
    let (listeners_added, listeners_removed, listeners_changed) =
        by_name(&old.listeners, &new.listeners, |l| &l.name);
    let (clusters_added, clusters_removed, clusters_changed) =
        by_name(&old.clusters, &new.clusters, |c| &c.name);
    let mut settings_changed = Vec::new();
    if old.drain_timeout != new.drain_timeout {
        settings_changed.push("drain_timeout");
    }
    if old.max_connections_per_worker != new.max_connections_per_worker {
        settings_changed.push("max_connections_per_worker");
    }
    if old.overload != new.overload {
        settings_changed.push("overload");
    }
    Changes {
        generation,
        listeners_added,
        listeners_removed,
        listeners_changed,
        clusters_added,
        clusters_removed,
        clusters_changed,
        settings_changed,
        tls_serial: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra_listener: &str, endpoint: u16) -> Config {
        Config::parse(
            "t.toml",
            &format!(
                "workers = 1\n[[listeners]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\ncluster = \"c\"\n{extra_listener}\n[[clusters]]\nname = \"c\"\nendpoints = [\"127.0.0.1:{endpoint}\"]\n"
            ),
        )
        .unwrap()
    }

    #[test]
    fn diff_names_what_changed() {
        let a = config("", 1);
        let b = config(
            "[[listeners]]\nname = \"m\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\ncluster = \"c\"",
            2,
        );
        let d = diff(&a, &b, 3);
        assert_eq!(d.listeners_added, ["m"]);
        assert!(d.listeners_removed.is_empty() && d.listeners_changed.is_empty());
        assert_eq!(d.clusters_changed, ["c"]);
        assert_eq!(
            d.summary(),
            "generation 3: listeners added: m; clusters changed: c"
        );
        assert!(diff(&a, &a, 4).is_empty());
    }

    #[test]
    fn runtime_settings_need_a_restart() {
        let a = config("", 1);
        let mut b = a.clone();
        b.workers = 2;
        b.admin.socket = Some("/tmp/x.sock".into());
        assert_eq!(needs_restart(&a, &b), ["workers", "admin"]);
    }
}
