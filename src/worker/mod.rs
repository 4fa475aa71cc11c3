//! One pinned thread per core, each with its own runtime, listeners,
//! balancers, buffers and counters.
//!
//! What must hold: nothing on the data path is shared between workers; a
//! worker's state lives in `Rc`/`Cell` on its own thread. Other threads talk
//! to a worker only through its mailbox (a bounded crossbeam channel, polled
//! every [`MAILBOX_POLL_INTERVAL`] so the event loop never blocks on it).

pub mod buffers;
pub mod gate;
pub mod isolate;
pub mod listener;
pub mod runtime;

use std::{
    cell::Cell,
    net::SocketAddr,
    rc::Rc,
    sync::Arc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use serde::Serialize;

use crate::{
    balance::Rng,
    config::{
        limits::{ACCEPT_ERROR_BACKOFF, MAILBOX_CAPACITY, MAILBOX_POLL_INTERVAL},
        Config, ListenerKind,
    },
    http, l4,
    metrics::{
        self,
        histograms::{Histograms, Key},
        Counters, Snapshot,
    },
    upstream::{health, ClusterState},
};
use buffers::BufferPool;
use gate::{Slots, Trigger};
pub use runtime::Driver;

/// What other threads may ask of a worker.
#[derive(Debug)]
pub enum Command {
    /// Stop accepting; let connections finish until the drain timeout.
    Drain,
    /// Exit now, closing every connection.
    Stop,
    /// Send a copy of this worker's counters.
    Snapshot(Sender<WorkerReport>),
    /// Send this worker's view of every cluster.
    Clusters(Sender<ClustersReport>),
    /// Send a copy of this worker's histograms; empty them if `reset`.
    Histograms {
        reset: bool,
        reply: Sender<HistogramReport>,
    },
}

/// A worker's answer to [`Command::Clusters`].
#[derive(Debug, Clone, Serialize)]
pub struct ClustersReport {
    pub worker: usize,
    pub clusters: Vec<crate::upstream::ClusterReport>,
}

/// A worker's answer to [`Command::Histograms`].
#[derive(Debug, Clone)]
pub struct HistogramReport {
    pub worker: usize,
    pub histograms: Vec<(Key, crate::metrics::histograms::Sparse)>,
}

/// A worker's answer to [`Command::Snapshot`].
#[derive(Debug, Clone, Serialize)]
pub struct WorkerReport {
    pub worker: usize,
    pub core: Option<usize>,
    pub driver: Driver,
    pub draining: bool,
    pub counters: Snapshot,
}

/// Sent once by each worker thread when its listeners are bound (or not).
#[derive(Debug)]
pub struct Started {
    pub worker: usize,
    pub result: Result<Driver, String>,
}

/// The owning thread's side of a worker.
#[derive(Debug)]
pub struct WorkerHandle {
    pub id: usize,
    pub mailbox: Sender<Command>,
    pub thread: JoinHandle<()>,
}

/// Everything one worker owns. Shared by its tasks through `Rc`.
#[derive(Debug)]
pub struct Worker {
    pub id: usize,
    pub core: Option<usize>,
    pub driver: Driver,
    pub config: Arc<Config>,
    pub counters: Rc<Counters>,
    pub buffers: BufferPool,
    pub slots: Rc<Slots>,
    pub draining: Trigger,
    /// HTTP view of every cluster, indexed like `config.clusters`.
    pub clusters: Vec<Rc<ClusterState>>,
    /// This worker's random numbers (balancing, splits, request ids).
    pub rng: Rng,
    /// This worker's latency histograms.
    pub histograms: Histograms,
    next_conn_id: Cell<u64>,
}

impl Worker {
    fn new(id: usize, core: Option<usize>, driver: Driver, config: Arc<Config>) -> Self {
        let now = Instant::now();
        let clusters = config
            .clusters
            .iter()
            .enumerate()
            .map(|(i, c)| Rc::new(ClusterState::new(i, c, id, now)))
            .collect();
        Self {
            id,
            core,
            driver,
            clusters,
            rng: Rng::from_time(id as u64),
            histograms: Histograms::new(&config),
            slots: Slots::new(config.max_connections_per_worker),
            config,
            counters: Rc::default(),
            buffers: BufferPool::default(),
            draining: Trigger::default(),
            next_conn_id: Cell::new(0),
        }
    }

    /// A connection id unique within the process: worker id in the top bits.
    fn next_conn_id(&self) -> u64 {
        let n = self.next_conn_id.get();
        self.next_conn_id.set(n + 1);
        ((self.id as u64) << 48) | (n & ((1 << 48) - 1))
    }

    fn report(&self) -> WorkerReport {
        let counters = self.counters.snapshot();
        WorkerReport {
            worker: self.id,
            core: self.core,
            driver: self.driver,
            draining: self.draining.is_fired(),
            counters,
        }
    }
}

/// Starts worker `id` on its own thread, pinned to `core` when given.
///
/// `binds` holds the concrete address of every listener, in config order.
pub fn spawn(
    id: usize,
    core: Option<core_affinity::CoreId>,
    config: Arc<Config>,
    binds: Arc<Vec<SocketAddr>>,
    started: Sender<Started>,
    alive: Sender<()>,
) -> std::io::Result<WorkerHandle> {
    let (mailbox, inbox) = crossbeam_channel::bounded(MAILBOX_CAPACITY);
    let thread = std::thread::Builder::new()
        .name(format!("pilotfish-w{id}"))
        .spawn(move || {
            let pinned = core.filter(|c| core_affinity::set_for_current(*c));
            if core.is_some() && pinned.is_none() {
                tracing::warn!(
                    worker = id,
                    "could not pin worker to its core; running unpinned"
                );
            }
            let core = pinned.map(|c| c.id);
            let choice = config.driver;
            let setup = config.uring_setup;
            let ran = runtime::block_on(choice, setup, |driver| {
                worker_main(id, core, driver, config, binds, inbox, started.clone())
            });
            if let Err(e) = ran {
                let _ = started.send(Started {
                    worker: id,
                    result: Err(format!(
                        "worker {id}: cannot start a {choice:?} runtime: {e}"
                    )),
                });
            }
            // Dropped last: when every worker's `alive` is gone, the owner's
            // receiver disconnects and it knows all workers have exited.
            drop(alive);
        })?;
    Ok(WorkerHandle {
        id,
        mailbox,
        thread,
    })
}

async fn worker_main(
    id: usize,
    core: Option<usize>,
    driver: Driver,
    config: Arc<Config>,
    binds: Arc<Vec<SocketAddr>>,
    inbox: Receiver<Command>,
    started: Sender<Started>,
) {
    let mut listeners = Vec::with_capacity(binds.len());
    for (l, addr) in config.listeners.iter().zip(binds.iter()) {
        match listener::bind(*addr) {
            Ok(sock) => listeners.push(sock),
            Err(e) => {
                let result = Err(format!(
                    "worker {id}: listener {:?} cannot bind {addr}: {e}",
                    l.name
                ));
                let _ = started.send(Started { worker: id, result });
                return;
            }
        }
    }
    tracing::info!(worker = id, core, %driver, "worker serving");
    let worker = Rc::new(Worker::new(id, core, driver, config));
    for (index, sock) in listeners.into_iter().enumerate() {
        monoio::spawn(accept_loop(Rc::clone(&worker), index, sock));
    }
    spawn_upstream_upkeep(&worker);
    let _ = started.send(Started {
        worker: id,
        result: Ok(driver),
    });
    drop(started);
    serve_mailbox(&worker, &inbox).await;
}

/// Polls the mailbox until the worker should exit.
async fn serve_mailbox(worker: &Worker, inbox: &Receiver<Command>) {
    let mut drain_deadline: Option<Instant> = None;
    loop {
        monoio::time::sleep(MAILBOX_POLL_INTERVAL).await;
        loop {
            match inbox.try_recv() {
                Ok(Command::Drain) => {
                    if drain_deadline.is_none() {
                        drain_deadline = Some(Instant::now() + worker.config.drain_timeout);
                        worker.draining.fire();
                        tracing::info!(
                            worker = worker.id,
                            active = worker.slots.used(),
                            "draining"
                        );
                    }
                }
                Ok(Command::Snapshot(reply)) => {
                    let _ = reply.try_send(worker.report());
                }
                Ok(Command::Clusters(reply)) => {
                    let now = Instant::now();
                    let _ = reply.try_send(ClustersReport {
                        worker: worker.id,
                        clusters: worker.clusters.iter().map(|c| c.report(now)).collect(),
                    });
                }
                Ok(Command::Histograms { reset, reply }) => {
                    let histograms = worker.histograms.snapshot();
                    if reset {
                        worker.histograms.reset();
                    }
                    let _ = reply.try_send(HistogramReport {
                        worker: worker.id,
                        histograms,
                    });
                }
                Ok(Command::Stop) | Err(TryRecvError::Disconnected) => {
                    worker.draining.fire();
                    return;
                }
                Err(TryRecvError::Empty) => break,
            }
        }
        if let Some(deadline) = drain_deadline {
            let active = worker.slots.used();
            if active == 0 {
                tracing::info!(worker = worker.id, "drained");
                return;
            }
            if Instant::now() >= deadline {
                metrics::add(&worker.counters.drain_cut, active as u64);
                tracing::warn!(
                    worker = worker.id,
                    active,
                    "drain timeout: closing remaining connections"
                );
                return;
            }
        }
    }
}

/// How often a worker drops expired idle upstream connections.
const POOL_SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Health checks for clusters that ask for them, and the pool sweeper;
/// both stop when the worker drains.
fn spawn_upstream_upkeep(worker: &Rc<Worker>) {
    for cluster in &worker.clusters {
        if let Some(check) = cluster.config.health_check.clone() {
            let cluster = Rc::clone(cluster);
            let counters = Rc::clone(&worker.counters);
            let stop = worker.draining.clone();
            monoio::spawn(health::run(cluster, check, counters, stop));
        }
    }
    let w = Rc::clone(worker);
    monoio::spawn(async move {
        loop {
            monoio::select! {
                _ = monoio::time::sleep(POOL_SWEEP_INTERVAL) => {}
                _ = w.draining.wait() => return,
            }
            let now = Instant::now();
            for c in &w.clusters {
                c.expire_idle(now);
            }
        }
    });
}

/// Accepts on one listener until the worker drains.
async fn accept_loop(worker: Rc<Worker>, listener_index: usize, sock: monoio::net::TcpListener) {
    loop {
        let slot = monoio::select! {
            slot = worker.slots.acquire() => slot,
            _ = worker.draining.wait() => return,
        };
        let accepted = monoio::select! {
            accepted = sock.accept() => accepted,
            _ = worker.draining.wait() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                metrics::add(&worker.counters.connections_accepted, 1);
                let conn_id = worker.next_conn_id();
                let counters = Rc::clone(&worker.counters);
                let w = Rc::clone(&worker);
                match worker.config.listeners[listener_index].kind {
                    ListenerKind::Tcp { .. } => {
                        let conn = l4::serve(w, listener_index, stream, peer, conn_id, slot);
                        isolate::spawn_connection(counters, conn_id, conn);
                    }
                    ListenerKind::Http(_) => {
                        let conn = http::serve(w, listener_index, stream, peer, conn_id, slot);
                        isolate::spawn_connection(counters, conn_id, conn);
                    }
                }
            }
            Err(e) => {
                metrics::add(&worker.counters.accept_errors, 1);
                tracing::warn!(worker = worker.id, error = %e, "accept failed; backing off");
                drop(slot);
                monoio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }
}

/// How long [`collect_reports`] waits for a worker's answer. A worker polls
/// its mailbox every 10 ms; a second means it is wedged.
pub const REPORT_TIMEOUT: Duration = Duration::from_secs(1);

/// Asks every worker for a report; workers that do not answer in time are
/// left out (and named in the log).
pub fn collect_reports(mailboxes: &[Sender<Command>]) -> Vec<WorkerReport> {
    let mut reports = ask_all(mailboxes, Command::Snapshot);
    reports.sort_by_key(|r| r.worker);
    reports
}

/// Sends each worker the command `ask` builds around a reply channel and
/// gathers the answers that arrive within [`REPORT_TIMEOUT`].
fn ask_all<T>(mailboxes: &[Sender<Command>], ask: impl Fn(Sender<T>) -> Command) -> Vec<T> {
    let (tx, rx) = crossbeam_channel::bounded(mailboxes.len().max(1));
    let asked = mailboxes
        .iter()
        .filter(|m| m.try_send(ask(tx.clone())).is_ok())
        .count();
    drop(tx);
    let deadline = Instant::now() + REPORT_TIMEOUT;
    let mut answers = Vec::with_capacity(asked);
    while answers.len() < asked {
        match rx.recv_deadline(deadline) {
            Ok(r) => answers.push(r),
            Err(_) => {
                tracing::warn!(
                    asked,
                    answered = answers.len(),
                    "some workers did not answer in time"
                );
                break;
            }
        }
    }
    answers
}

/// Asks every worker for its view of the clusters.
pub fn collect_clusters(mailboxes: &[Sender<Command>]) -> Vec<ClustersReport> {
    let mut reports = ask_all(mailboxes, Command::Clusters);
    reports.sort_by_key(|r| r.worker);
    reports
}

/// Asks every worker for its histograms (and to reset them if `reset`).
pub fn collect_histograms(mailboxes: &[Sender<Command>], reset: bool) -> Vec<HistogramReport> {
    let mut reports = ask_all(mailboxes, |reply| Command::Histograms { reset, reply });
    reports.sort_by_key(|r| r.worker);
    reports
}
