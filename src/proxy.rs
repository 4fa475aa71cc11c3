//! The running proxy as its owner sees it: start the workers, wait until
//! every one has bound every listener, then drain, stop, report, join.
//!
//! What must hold: [`Proxy::start`] returns only when every worker serves,
//! or returns an error after stopping the workers that did start; listener
//! ports asked as 0 are resolved once so that all workers share them.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use crossbeam_channel::Receiver;
use serde::Serialize;

use crate::{
    config::Config,
    control::Controller,
    metrics::Snapshot,
    worker::{self, listener, Command, WorkerHandle, WorkerReport},
};

/// How long start-up waits for every worker to bind. Binding is immediate;
/// a worker silent this long is stuck, and start-up fails rather than hangs.
const START_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("listener {listener:?} cannot bind {addr}: {source}")]
    Bind {
        listener: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start worker thread: {0}")]
    Spawn(std::io::Error),
    #[error("{0}")]
    Worker(String),
    #[error("workers did not start within {START_TIMEOUT:?}")]
    Timeout,
    #[error("TLS material: {0}")]
    Tls(#[from] crate::tls::material::MaterialError),
    #[error("{0}")]
    AccessLog(String),
}

/// Counters merged over all workers, plus each worker's own.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub total: Snapshot,
    pub workers: Vec<WorkerReport>,
}

#[derive(Debug)]
pub struct Proxy {
    control: Arc<Controller>,
    handles: Vec<WorkerHandle>,
    /// The access log writer; finished after the last worker exits.
    access_log: crate::access_log::Writer,
    /// The span exporter; finished after the last worker exits.
    spans: crate::trace::export::Exporter,
    exited: Receiver<()>,
    /// Dropped to stop the TLS file watcher.
    tls_watch: crossbeam_channel::Sender<()>,
    /// Dropped to stop the memory overload monitor.
    overload_watch: crossbeam_channel::Sender<()>,
}

impl Proxy {
    /// Starts every worker and returns once all of them serve.
    pub fn start(config: Config) -> Result<Proxy, StartError> {
        Self::start_with(config, crate::lifecycle::inherit::Inherited::none())
    }

    /// [`Proxy::start`], serving each listener whose address matches
    /// `inherited` sockets on those sockets (socket activation, an
    /// upgrade), shared out over the workers.
    pub fn start_with(
        config: Config,
        mut inherited: crate::lifecycle::inherit::Inherited,
    ) -> Result<Proxy, StartError> {
        let tls = Controller::load_tls(&config)?;
        crate::access_log::check_writable(&config).map_err(StartError::AccessLog)?;
        let config = Arc::new(config);
        // Resolve port 0 once; the reservations hold the ports until every
        // worker has bound its own socket to them.
        let mut reservations = Vec::new();
        let mut binds = Vec::with_capacity(config.listeners.len());
        // Per worker: the inherited sockets it serves on.
        let mut handed: Vec<Vec<(SocketAddr, std::net::TcpListener)>> =
            (0..config.workers).map(|_| Vec::new()).collect();
        for l in &config.listeners {
            let bind_error = |source| StartError::Bind {
                listener: l.name.clone(),
                addr: l.bind,
                source,
            };
            if inherited.count(l.bind) > 0 {
                // Socket j goes to worker j mod N: every inherited queue
                // is served, none closed. With fewer sockets than workers
                // (a socket unit lists the address once), the rest share
                // them (a duplicate descriptor, one accept queue) rather
                // than bind more into the SO_REUSEPORT group: a socket of
                // our own would not survive a restart (its queue is reset
                // when we exit), and systemd's sockets belong to another
                // user than a DynamicUser service, which the kernel does
                // not let join their group.
                let socks = inherited.take(l.bind);
                let n = socks.len();
                for j in n..config.workers {
                    let shared = socks[j % n].try_clone().map_err(bind_error)?;
                    handed[j].push((l.bind, shared));
                }
                for (j, sock) in socks.into_iter().enumerate() {
                    handed[j % config.workers].push((l.bind, sock));
                }
                tracing::info!(listener = %l.name, addr = %l.bind, "serving on inherited sockets");
                binds.push(l.bind);
                continue;
            }
            listener::ensure_free_within(l.bind, listener::START_FREE_WAIT).map_err(bind_error)?;
            let (addr, held) = listener::reserve(l.bind).map_err(bind_error)?;
            binds.push(addr);
            reservations.push(held);
        }
        inherited.close_rest();
        let binds = Arc::new(binds);
        let access_log = crate::access_log::Writer::start().map_err(StartError::Spawn)?;
        let spans = crate::trace::export::Exporter::start().map_err(StartError::Spawn)?;
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        let (started_tx, started_rx) = crossbeam_channel::bounded(config.workers);
        let (alive_tx, exited) = crossbeam_channel::bounded(0);
        let mut handles = Vec::with_capacity(config.workers);
        for (id, inherited) in handed.into_iter().enumerate() {
            let core = (!cores.is_empty()).then(|| cores[id % cores.len()]);
            let spawned = worker::spawn(
                id,
                core,
                worker::Setup {
                    config: Arc::clone(&config),
                    binds: Arc::clone(&binds),
                    access_log: access_log.sink(),
                    spans: spans.sink(),
                    tls: tls.clone(),
                    inherited,
                },
                started_tx.clone(),
                alive_tx.clone(),
            );
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    stop_all(handles);
                    return Err(StartError::Spawn(e));
                }
            }
        }
        drop((started_tx, alive_tx));
        let deadline = std::time::Instant::now() + START_TIMEOUT;
        for _ in 0..config.workers {
            let failure = match started_rx.recv_deadline(deadline) {
                Ok(worker::Started { result: Ok(_), .. }) => continue,
                Ok(worker::Started { result: Err(e), .. }) => StartError::Worker(e),
                Err(_) => StartError::Timeout,
            };
            stop_all(handles);
            return Err(failure);
        }
        drop(reservations);
        let mailboxes = handles.iter().map(|h| h.mailbox.clone()).collect();
        let control = Arc::new(Controller::new(
            config,
            binds,
            mailboxes,
            tls,
            access_log.control(),
            handles.iter().map(|h| h.lifeline.clone()).collect(),
            spans.stats(),
        ));
        let tls_watch = spawn_tls_watch(&control).map_err(StartError::Spawn)?;
        let (overload_watch, overload_stop) = crossbeam_channel::bounded::<()>(0);
        crate::lifecycle::overload::spawn(
            Arc::clone(&control),
            control.overload_status(),
            overload_stop,
        )
        .map_err(StartError::Spawn)?;
        Ok(Proxy {
            control,
            handles,
            access_log,
            spans,
            exited,
            tls_watch,
            overload_watch,
        })
    }

    /// The config new connections get (it changes with every swap).
    pub fn config(&self) -> Arc<Config> {
        self.control.config()
    }

    /// What swaps the config on every worker (shared with the admin server
    /// and the SIGHUP handler).
    pub fn controller(&self) -> Arc<Controller> {
        Arc::clone(&self.control)
    }

    pub fn worker_count(&self) -> usize {
        self.handles.len()
    }

    /// Every listener's name and the address it is bound to.
    pub fn listeners(&self) -> Vec<(String, SocketAddr)> {
        self.control.listeners()
    }

    /// The bound address of the listener called `name`.
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| a)
    }

    /// A receiver that disconnects once every worker thread has exited.
    pub fn exited(&self) -> Receiver<()> {
        self.exited.clone()
    }

    /// Every worker's lifeline (drain/stop down, heartbeat up).
    pub fn lifelines(&self) -> Vec<worker::Lifeline> {
        self.handles.iter().map(|h| h.lifeline.clone()).collect()
    }

    /// Every worker's mailbox (for the admin server's thread).
    pub fn mailboxes(&self) -> Vec<crate::worker::Mailbox> {
        self.handles.iter().map(|h| h.mailbox.clone()).collect()
    }

    /// Stops accepting on every worker; connections get the drain timeout.
    pub fn drain(&self) {
        self.control.drain_all();
    }

    /// A duplicate of every socket every worker accepts on, for an
    /// upgrade; an error unless every worker answered (a socket left out
    /// would have its queued connections reset when this process exits).
    pub fn listening_sockets(&self) -> Result<Vec<(SocketAddr, std::net::TcpListener)>, String> {
        let answers = worker::ask_all(&self.mailboxes(), Duration::from_secs(2), Command::Sockets);
        if answers.len() != self.handles.len() {
            return Err(format!(
                "{} of {} workers handed their sockets",
                answers.len(),
                self.handles.len()
            ));
        }
        Ok(answers.into_iter().flatten().collect())
    }

    /// Asks every worker for its counters and merges them.
    pub fn stats(&self) -> Stats {
        let workers = worker::collect_reports(&self.mailboxes());
        let mut total = Snapshot::default();
        for r in &workers {
            total.merge(&r.counters);
        }
        Stats { total, workers }
    }

    /// Every worker's histograms (emptied afterwards if `reset`).
    pub fn histograms(&self, reset: bool) -> Vec<worker::HistogramReport> {
        worker::collect_histograms(&self.mailboxes(), reset)
    }

    /// Waits for every worker thread to exit, then for the access log
    /// writer to write what they left.
    pub fn join(self) {
        drop(self.tls_watch);
        drop(self.overload_watch);
        for h in self.handles {
            if h.thread.join().is_err() {
                tracing::error!(worker = h.id, "worker thread panicked");
            }
        }
        self.access_log.finish();
        self.spans.finish();
    }

    /// Stops every worker now and waits for them. Through each worker's
    /// lifeline, not its mailbox: a full mailbox cannot lose the stop.
    pub fn shutdown(self) {
        for h in &self.handles {
            h.lifeline.stop();
        }
        self.join();
    }
}

/// Checks the TLS files every [`crate::control::TLS_WATCH_INTERVAL`] and
/// rotates the material when they change, until the sender is dropped.
/// While the config names no TLS files, it looks for them (a swap may add
/// them) only every [`TLS_IDLE_WATCH_INTERVAL`], so an idle plaintext
/// sidecar does not wake twice a second for nothing.
fn spawn_tls_watch(control: &Arc<Controller>) -> std::io::Result<crossbeam_channel::Sender<()>> {
    let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
    let control = Arc::clone(control);
    std::thread::Builder::new()
        .name("pilotfish-tls-watch".into())
        .spawn(move || {
            let watched = || {
                if control.config().tls.is_some() {
                    crate::control::TLS_WATCH_INTERVAL
                } else {
                    TLS_IDLE_WATCH_INTERVAL
                }
            };
            while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(watched())
            {
                // Errors are logged and counted by the controller.
                let _ = control.reload_tls_if_changed();
            }
        })?;
    Ok(stop)
}

/// See [`spawn_tls_watch`].
const TLS_IDLE_WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

fn stop_all(handles: Vec<WorkerHandle>) {
    for h in &handles {
        h.lifeline.stop();
    }
    for h in handles {
        let _ = h.thread.join();
    }
}
