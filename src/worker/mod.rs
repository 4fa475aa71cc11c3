//! One pinned thread per core, each with its own runtime, listeners,
//! balancers, buffers and counters.
//!
//! What must hold: nothing on the data path is shared between workers; a
//! worker's state lives in `Rc`/`Cell` on its own thread. Other threads talk
//! to a worker only through its mailbox (a bounded crossbeam channel and a
//! bell that wakes the worker to read it: [`mailbox`]), so the event loop
//! never blocks on it and an idle worker does not wake at all.
//!
//! Config generations: a [`Worker`] value is one config generation. Each
//! connection holds the generation it was accepted under and finishes on
//! it, except an HTTP/1.1 keep-alive connection whose listener the new
//! generation keeps unchanged: that one moves on between requests
//! ([`Worker::carried`]), so pushes that change only clusters close no
//! connection. The accept loops (one per listening socket, not per
//! generation) hand new connections to the current one. A swap is two-phase
//! ([`Command::Prepare`] binds the new sockets and builds the generation,
//! [`Command::Commit`] installs it), so either every worker switches or none
//! does. Listening sockets whose address stays in the config are kept, so
//! a swap refuses no connection. Clusters whose config did not change keep
//! their state (pools, ejections, health) across generations; so do the
//! endpoints that stay in a cluster whose endpoint list alone changed.

pub mod buffers;
pub mod gate;
pub mod isolate;
pub mod listener;
pub mod mailbox;
pub mod runtime;

use std::{
    cell::{Cell, RefCell},
    net::SocketAddr,
    rc::Rc,
    sync::Arc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use serde::Serialize;

use crate::{
    access_log,
    balance::Rng,
    config::{
        limits::{ACCEPT_ERROR_BACKOFF, MAILBOX_IDLE_WAKE, MAILBOX_POLL_INTERVAL},
        Config, ListenerKind,
    },
    http, l4,
    lifecycle::overload,
    metrics::{
        self,
        histograms::{self, Histograms, Key},
        Counters, Snapshot,
    },
    upstream::{health, ClusterState},
};
use buffers::BufferPool;
use gate::{Slots, Trigger};
use mailbox::Bell;
pub use mailbox::Mailbox;
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
    /// Phase one of a config swap: bind the listeners this worker does not
    /// have yet and build the generation, then answer. Nothing serves on it
    /// until [`Command::Commit`].
    Prepare {
        generation: u64,
        config: Arc<Config>,
        /// The resolved address of every listener, in config order.
        binds: Arc<Vec<SocketAddr>>,
        /// The TLS material the config's `[tls]` names, installed at commit.
        tls: Option<Arc<crate::tls::material::Workload>>,
        reply: Sender<Prepared>,
    },
    /// Phase two: serve new connections on the prepared generation, then
    /// answer with the worker id.
    Commit {
        generation: u64,
        reply: Sender<usize>,
    },
    /// Drop the prepared generation and the sockets it bound.
    Abort { generation: u64 },
    /// Use this TLS material for every handshake from now on (rotation),
    /// then answer with the worker id.
    Tls {
        workload: Option<Arc<crate::tls::material::Workload>>,
        reply: Sender<usize>,
    },
    /// Attach a live tap: matching requests go to `events` as they end;
    /// answer with the worker id once attached.
    Tap {
        spec: Arc<crate::metrics::tap::Spec>,
        events: Sender<crate::metrics::tap::Event>,
        reply: Sender<usize>,
    },
    /// Detach tap `id`.
    Untap(u64),
    /// The process's memory overload stage changed (see
    /// [`crate::lifecycle::overload`]).
    Overload(u8),
    /// Send a duplicate of every socket this worker accepts on (an
    /// in-place upgrade hands them to the new process).
    Sockets(Sender<Vec<(SocketAddr, std::net::TcpListener)>>),
}

/// A worker's answer to [`Command::Prepare`].
#[derive(Debug)]
pub struct Prepared {
    pub worker: usize,
    pub result: Result<(), String>,
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
    /// The config generation new connections get.
    pub generation: u64,
    /// The memory overload stage this worker acts on: it lags the
    /// process-wide `overload.stage` until the worker has read the message
    /// that told it (reports answer in mailbox order, so a report showing
    /// a stage means later connections on this worker see it).
    pub overload_stage: u8,
    pub counters: Snapshot,
    /// The golden metrics (served by /metrics, summed over cores).
    #[serde(skip)]
    pub golden: crate::metrics::golden::Snapshot,
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
    pub mailbox: Mailbox,
    /// Drain and stop, outside the mailbox: see [`Lifeline`].
    pub lifeline: Lifeline,
    pub thread: JoinHandle<()>,
}

/// The link between a worker and its owner outside the mailbox, read and
/// written only on the control path (the mailbox loop, woken by the
/// mailbox's bell), never on the data path:
/// - down: drain or stop, which nothing can refuse (a message could be
///   refused by a full mailbox, and the owner would then wait forever in
///   `join`); both ring the bell;
/// - up: a heartbeat, bumped on every wake of the mailbox loop, that the
///   systemd watchdog reads to know the worker's event loop is making
///   progress ([`Lifeline::ping`] wakes it for that).
#[derive(Debug, Clone)]
pub struct Lifeline {
    exit: Arc<std::sync::atomic::AtomicU8>,
    beats: Arc<std::sync::atomic::AtomicU64>,
    bell: Arc<Bell>,
}

impl Lifeline {
    const RUN: u8 = 0;
    const DRAIN: u8 = 1;
    const STOP: u8 = 2;

    fn new(bell: Arc<Bell>) -> Self {
        Self {
            exit: Arc::default(),
            beats: Arc::default(),
            bell,
        }
    }

    pub fn drain(&self) {
        self.exit
            .fetch_max(Self::DRAIN, std::sync::atomic::Ordering::SeqCst);
        self.bell.ring();
    }

    pub fn stop(&self) {
        self.exit
            .fetch_max(Self::STOP, std::sync::atomic::Ordering::SeqCst);
        self.bell.ring();
    }

    /// Wakes the worker's mailbox loop, which beats when it runs: the
    /// watchdog pings, then checks that the beats moved.
    pub fn ping(&self) {
        self.bell.ring();
    }

    /// Whether the worker was asked to drain or stop.
    pub fn leaving(&self) -> bool {
        self.exit.load(std::sync::atomic::Ordering::SeqCst) != Self::RUN
    }

    /// Wakes of the worker's mailbox loop so far.
    pub fn beats(&self) -> u64 {
        self.beats.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn beat(&self) {
        self.beats
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The command the flag asks for, if any.
    fn asked(&self) -> Option<Command> {
        match self.exit.load(std::sync::atomic::Ordering::SeqCst) {
            Self::RUN => None,
            Self::DRAIN => Some(Command::Drain),
            _ => Some(Command::Stop),
        }
    }
}

/// One config generation of a worker: what its connections see. Shared by
/// their tasks through `Rc`; the parts that outlive a generation (counters,
/// buffers, connection slots, histograms, the drain trigger) are shared
/// with the next one.
#[derive(Debug)]
pub struct Worker {
    pub id: usize,
    pub core: Option<usize>,
    pub driver: Driver,
    /// Which config generation this is (0 at start, +1 per swap).
    pub generation: u64,
    pub config: Arc<Config>,
    /// The bound address of every listener, in config order.
    pub binds: Arc<Vec<SocketAddr>>,
    pub counters: Rc<Counters>,
    pub buffers: Rc<BufferPool>,
    /// Head buffers lent per write (HTTP).
    pub heads: Rc<buffers::HeadBuffers>,
    pub slots: Rc<Slots>,
    /// Fires once when the process drains: stop accepting, close idle
    /// keep-alive connections.
    pub draining: Trigger,
    /// Fires when this generation stops taking new connections: a newer one
    /// was committed, or the process drains. Its keep-alive connections
    /// close after their current response; its upkeep tasks stop.
    pub retired: Trigger,
    /// HTTP view of every cluster, indexed like `config.clusters`.
    pub clusters: Vec<Rc<ClusterState>>,
    /// This worker's random numbers (balancing, splits, request ids).
    pub rng: Rc<Rng>,
    /// This generation's view of the worker's latency histograms.
    pub histograms: Histograms,
    /// This worker's access log buffers.
    pub access_log: Rc<access_log::Buffers>,
    /// The TLS configs new handshakes use (replaced on rotation).
    pub tls: Rc<crate::tls::per_worker::WorkerTls>,
    /// Live taps attached through the admin socket (they outlive config
    /// generations: they filter by name).
    pub taps: Rc<crate::metrics::tap::Taps>,
    /// Spans of sampled requests not yet handed to the exporter.
    pub spans: Rc<crate::trace::export::Buffers>,
    /// This generation's rate-limit buckets (a swap starts them full).
    pub limits: Rc<crate::http::ratelimit::Limits>,
    /// HTTP/1.1-to-HTTP/1.1 exchanges go through the shared pipeline
    /// instead of the direct byte path: a test and diagnostic seam
    /// ([`HTTP1_VIA_PIPELINE_ENV`]), read once at start.
    pub http1_via_pipeline: bool,
    store: Rc<histograms::Store>,
    next_conn_id: Rc<Cell<u64>>,
    /// The worker's current generation, for connections of a retired one
    /// to move on to ([`Worker::carried`]). Weak: a generation must not
    /// keep later ones alive (a long-lived connection would pin them all).
    latest: std::cell::OnceCell<std::rc::Weak<RefCell<Rc<Worker>>>>,
}

/// Set (to anything) in the environment, it sends HTTP/1.1-to-HTTP/1.1
/// exchanges through the version-independent pipeline, as HTTP/2 ones
/// go. CI runs the HTTP/1.1 suites that way too, so both paths keep the
/// same behaviour; the direct path stays the default because it costs
/// less (see `http::pipeline`).
pub const HTTP1_VIA_PIPELINE_ENV: &str = "PILOTFISH_HTTP1_VIA_PIPELINE";

impl Worker {
    fn first(
        id: usize,
        core: Option<usize>,
        driver: Driver,
        config: Arc<Config>,
        binds: Arc<Vec<SocketAddr>>,
        (access_log, spans): (
            Sender<access_log::Batch>,
            Sender<crate::trace::export::Batch>,
        ),
        tls: Option<Arc<crate::tls::material::Workload>>,
    ) -> Self {
        let now = Instant::now();
        let store = Rc::new(histograms::Store::default());
        let clusters = config
            .clusters
            .iter()
            .map(|c| Rc::new(ClusterState::new(c, id, config.workers, now, &store)))
            .collect();
        Self {
            id,
            core,
            driver,
            generation: 0,
            clusters,
            rng: Rc::new(Rng::from_time(id as u64)),
            histograms: Histograms::new(&store, &config),
            access_log: Rc::new(access_log::Buffers::new(access_log)),
            tls: Rc::new(crate::tls::per_worker::WorkerTls::new(tls)),
            taps: Rc::default(),
            spans: Rc::new(crate::trace::export::Buffers::new(spans)),
            limits: Rc::new(crate::http::ratelimit::Limits::new(&config, now)),
            store,
            slots: Slots::new(config.max_connections_per_worker),
            binds,
            config,
            counters: Rc::default(),
            buffers: Rc::default(),
            heads: Rc::default(),
            draining: Trigger::default(),
            retired: Trigger::default(),
            next_conn_id: Rc::new(Cell::new(0)),
            http1_via_pipeline: std::env::var_os(HTTP1_VIA_PIPELINE_ENV).is_some(),
            latest: std::cell::OnceCell::new(),
        }
    }

    /// The generation after this one: shares what outlives generations and
    /// keeps the state of every cluster whose config did not change, and of
    /// every endpoint that stays in a cluster whose endpoints alone changed.
    fn next(&self, generation: u64, config: Arc<Config>, binds: Arc<Vec<SocketAddr>>) -> Self {
        let now = Instant::now();
        // By name: with a control plane's thousand clusters, a pairwise
        // search was most of a swap's cost on each worker.
        let by_name: std::collections::HashMap<&str, &Rc<ClusterState>> =
            self.clusters.iter().map(|c| (c.name.as_str(), c)).collect();
        let clusters = config
            .clusters
            .iter()
            .map(|c| {
                let old = by_name.get(c.name.as_str());
                old.filter(|old| old.source == *c)
                    .map(|old| Rc::clone(old))
                    .or_else(|| {
                        let carried = old?.carry(c, self.id, config.workers, now, &self.store)?;
                        Some(Rc::new(carried))
                    })
                    .unwrap_or_else(|| {
                        Rc::new(ClusterState::new(
                            c,
                            self.id,
                            config.workers,
                            now,
                            &self.store,
                        ))
                    })
            })
            .collect();
        Self {
            id: self.id,
            core: self.core,
            driver: self.driver,
            generation,
            clusters,
            rng: Rc::clone(&self.rng),
            histograms: Histograms::new(&self.store, &config),
            access_log: Rc::clone(&self.access_log),
            tls: Rc::clone(&self.tls),
            taps: Rc::clone(&self.taps),
            spans: Rc::clone(&self.spans),
            limits: Rc::new(crate::http::ratelimit::Limits::new(&config, now)),
            store: Rc::clone(&self.store),
            slots: Rc::clone(&self.slots),
            binds,
            config,
            counters: Rc::clone(&self.counters),
            buffers: Rc::clone(&self.buffers),
            heads: Rc::clone(&self.heads),
            draining: self.draining.clone(),
            retired: Trigger::default(),
            next_conn_id: Rc::clone(&self.next_conn_id),
            http1_via_pipeline: self.http1_via_pipeline,
            latest: self.latest.clone(),
        }
    }

    /// Whether a response may keep its client connection alive, as far as
    /// the worker is concerned: not when this generation retired (a swap,
    /// a drain), nor near the connection cap or in a memory overload stage
    /// (those two counted).
    pub fn keep_alive_ok(&self) -> bool {
        if self.retired.is_fired() && !self.carries_every_listener() {
            return false;
        }
        if self.slots.crowded() || self.slots.pressure() >= overload::STAGE_KEEP_ALIVE_OFF {
            metrics::add(&self.counters.overload_keep_alive_off, 1);
            return false;
        }
        true
    }

    /// The current generation, when this one is retired and the process
    /// is not draining.
    fn successor(&self) -> Option<Rc<Worker>> {
        if !self.retired.is_fired() || self.draining.is_fired() {
            return None;
        }
        let cell = self.latest.get()?.upgrade()?;
        let current = Rc::clone(&cell.borrow());
        (current.generation != self.generation).then_some(current)
    }

    /// Where `listener` of this generation is in `other`: the same bound
    /// socket, and the same config but for how its address was written
    /// (`127.0.0.1:0` then the port it got).
    fn same_listener(&self, listener: usize, other: &Worker) -> Option<usize> {
        let (l, addr) = (
            self.config.listeners.get(listener)?,
            self.binds.get(listener)?,
        );
        other
            .config
            .listeners
            .iter()
            .zip(other.binds.iter())
            .position(|(n, a)| {
                a == addr
                    && n.name == l.name
                    && crate::config::Listener {
                        bind: l.bind,
                        ..n.clone()
                    } == *l
            })
    }

    /// Whether every listener of this retired generation lives on unchanged
    /// in the current one: then its keep-alive connections go on there
    /// ([`Worker::carried`]) and are not asked to close. A swap that
    /// changes only clusters (an EDS push) then closes no connection.
    fn carries_every_listener(&self) -> bool {
        let Some(current) = self.successor() else {
            return false;
        };
        (0..self.config.listeners.len()).all(|i| self.same_listener(i, &current).is_some())
    }

    /// Where a keep-alive connection on `listener` of this retired
    /// generation goes on between requests: the current generation and the
    /// listener's index there, if it is unchanged there.
    pub fn carried(&self, listener: usize) -> Option<(Rc<Worker>, usize)> {
        let current = self.successor()?;
        let index = self.same_listener(listener, &current)?;
        Some((current, index))
    }

    /// Under memory overload stage 2 and above, new requests are refused
    /// (503 `overload`): Some(why).
    pub fn refuse_for_memory(&self) -> Option<&'static str> {
        (self.slots.pressure() >= overload::STAGE_REFUSE_REQUESTS)
            .then_some("the proxy is near its memory ceiling ([overload] memory_max_mib)")
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
            generation: self.generation,
            overload_stage: self.slots.pressure(),
            counters,
            golden: self.counters.golden.snapshot(),
        }
    }
}

/// Starts worker `id` on its own thread, pinned to `core` when given.
pub fn spawn(
    id: usize,
    core: Option<core_affinity::CoreId>,
    setup: Setup,
    started: Sender<Started>,
    alive: Sender<()>,
) -> std::io::Result<WorkerHandle> {
    let (bell, wake) = Bell::pair()?;
    let bell = Arc::new(bell);
    let (mailbox, inbox) = Mailbox::new(Arc::clone(&bell));
    let lifeline = Lifeline::new(bell);
    let line = lifeline.clone();
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
            let choice = setup.config.driver;
            let uring_setup = setup.config.uring_setup;
            let ran = runtime::block_on(choice, uring_setup, |driver| {
                worker_main(
                    id,
                    core,
                    driver,
                    setup,
                    (inbox, wake, line),
                    started.clone(),
                )
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
        lifeline,
        thread,
    })
}

/// What a worker starts from.
#[derive(Debug)]
pub struct Setup {
    pub config: Arc<Config>,
    /// The concrete address of every listener, in config order.
    pub binds: Arc<Vec<SocketAddr>>,
    /// Where the worker's access log batches go.
    pub access_log: Sender<access_log::Batch>,
    /// Where the worker's spans go.
    pub spans: Sender<crate::trace::export::Batch>,
    /// Listening sockets handed to this worker (socket activation, an
    /// upgrade): it serves on these instead of binding their addresses.
    pub inherited: Vec<(SocketAddr, std::net::TcpListener)>,
    /// The TLS material, when the config has `[tls]`.
    pub tls: Option<Arc<crate::tls::material::Workload>>,
}

async fn worker_main(
    id: usize,
    core: Option<usize>,
    driver: Driver,
    setup: Setup,
    (inbox, wake, lifeline): (Receiver<Command>, std::os::unix::net::UnixStream, Lifeline),
    started: Sender<Started>,
) {
    let Setup {
        config,
        binds,
        access_log,
        spans,
        tls,
        mut inherited,
    } = setup;
    let mut sockets = Vec::with_capacity(binds.len());
    for (l, addr) in config.listeners.iter().zip(binds.iter()) {
        let mine: Vec<std::net::TcpListener> = {
            let (mine, rest) = inherited.into_iter().partition(|(a, _)| a == addr);
            inherited = rest;
            mine.into_iter().map(|(_, s)| s).collect()
        };
        if !mine.is_empty() {
            sockets.extend(mine.into_iter().map(|s| (*addr, s)));
            continue;
        }
        match listener::bind(*addr) {
            Ok(sock) => sockets.push((*addr, sock)),
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
    let worker = Rc::new(Worker::first(
        id,
        core,
        driver,
        config,
        binds,
        (access_log, spans),
        tls,
    ));
    spawn_upstream_upkeep(&worker);
    spawn_access_log_flusher(&worker);
    let current = Rc::new(RefCell::new(Rc::clone(&worker)));
    let _ = worker.latest.set(Rc::downgrade(&current));
    drop(worker);
    let mut control = Control {
        current,
        listening: Vec::with_capacity(sockets.len()),
        pending: None,
    };
    for (addr, sock) in sockets {
        control.listen(addr, sock);
    }
    let _ = started.send(Started {
        worker: id,
        result: Ok(driver),
    });
    drop(started);
    serve_mailbox(&mut control, &inbox, wake, &lifeline).await;
    let worker = control.worker();
    worker.access_log.flush(&worker.counters);
    worker.spans.flush(&worker.counters);
}

/// Hands partly filled access log buffers to the writer every
/// [`access_log::FLUSH_INTERVAL`] (spans every
/// [`crate::trace::export::FLUSH_INTERVAL`]), for the worker's whole life;
/// after a flush that found nothing, [`access_log::FLUSH_IDLE_INTERVAL`]
/// until the next one, so that an idle worker sleeps.
fn spawn_access_log_flusher(worker: &Rc<Worker>) {
    let idle = access_log::FLUSH_IDLE_INTERVAL;
    let (buffers, counters) = (Rc::clone(&worker.access_log), Rc::clone(&worker.counters));
    monoio::spawn(async move {
        let mut wait = idle;
        loop {
            monoio::time::sleep(wait).await;
            // Lines came since the last flush: more are likely.
            wait = if buffers.is_empty() {
                idle
            } else {
                access_log::FLUSH_INTERVAL
            };
            buffers.flush(&counters);
        }
    });
    let (spans, counters) = (Rc::clone(&worker.spans), Rc::clone(&worker.counters));
    monoio::spawn(async move {
        let mut wait = idle;
        loop {
            monoio::time::sleep(wait).await;
            wait = if spans.is_empty() {
                idle
            } else {
                crate::trace::export::FLUSH_INTERVAL
            };
            spans.flush(&counters);
        }
    });
}

/// The current generation, as the accept loops see it.
type Current = Rc<RefCell<Rc<Worker>>>;

/// What the mailbox loop keeps to steer the worker: the current
/// generation, the listening sockets, a prepared generation.
struct Control {
    current: Current,
    /// One accept loop per listening socket, stopped by its trigger, and
    /// a duplicate of the socket (dropped with the loop, and at drain so
    /// that a draining process refuses new connections).
    listening: Vec<(SocketAddr, Trigger, Option<std::net::TcpListener>)>,
    pending: Option<Pending>,
}

/// A prepared, not yet committed, generation.
struct Pending {
    generation: u64,
    worker: Worker,
    /// Sockets bound for listeners new in this generation.
    sockets: Vec<(SocketAddr, std::net::TcpListener)>,
    tls: Option<Arc<crate::tls::material::Workload>>,
}

impl Control {
    fn worker(&self) -> Rc<Worker> {
        Rc::clone(&self.current.borrow())
    }

    /// Starts an accept loop on `sock`. A duplicate of the socket is
    /// kept while it serves, for an upgrade to hand over
    /// ([`Command::Sockets`]).
    fn listen(&mut self, addr: SocketAddr, sock: std::net::TcpListener) {
        let dup = match sock.try_clone() {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::warn!(%addr, error = %e, "cannot keep a copy of a listening socket; an upgrade will bind it anew");
                None
            }
        };
        let sock = match monoio::net::TcpListener::from_std(sock) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(%addr, error = %e, "cannot serve a listening socket");
                return;
            }
        };
        let stop = Trigger::default();
        monoio::spawn(accept_loop(
            Rc::clone(&self.current),
            addr,
            sock,
            stop.clone(),
        ));
        self.listening.push((addr, stop, dup));
    }

    /// Phase one: bind what is new, build the generation, keep it pending.
    fn prepare(
        &mut self,
        generation: u64,
        config: Arc<Config>,
        binds: Arc<Vec<SocketAddr>>,
        tls: Option<Arc<crate::tls::material::Workload>>,
    ) -> Result<(), String> {
        self.pending = None;
        let current = self.worker();
        if fault::prepare_fails_on(current.id, &config) {
            return Err(format!(
                "worker {}: injected prepare failure (test seam)",
                current.id
            ));
        }
        let mut sockets: Vec<(SocketAddr, std::net::TcpListener)> = Vec::new();
        for (l, addr) in config.listeners.iter().zip(binds.iter()) {
            let held = self.listening.iter().any(|(a, _, _)| a == addr)
                || sockets.iter().any(|(a, _)| a == addr);
            if held {
                continue;
            }
            let sock = listener::bind(*addr).map_err(|e| {
                format!(
                    "worker {}: listener {:?} cannot bind {addr}: {e}",
                    current.id, l.name
                )
            })?;
            sockets.push((*addr, sock));
        }
        let worker = current.next(generation, config, binds);
        self.pending = Some(Pending {
            generation,
            worker,
            sockets,
            tls,
        });
        Ok(())
    }

    /// Phase two: new connections get the prepared generation; listeners it
    /// no longer names stop; the old generation retires.
    fn commit(&mut self, generation: u64) {
        let Some(pending) = self.pending.take_if(|p| p.generation == generation) else {
            tracing::error!(
                generation,
                "commit for a generation that is not prepared; ignored"
            );
            return;
        };
        let new = Rc::new(pending.worker);
        new.tls.install(pending.tls);
        new.slots.set_max(new.config.max_connections_per_worker);
        let old = self.current.replace(Rc::clone(&new));
        self.listening.retain(|(addr, stop, _)| {
            let kept = new.binds.contains(addr);
            if !kept {
                stop.fire();
            }
            kept
        });
        for (addr, sock) in pending.sockets {
            self.listen(addr, sock);
        }
        spawn_upstream_upkeep(&new);
        old.retired.fire();
        drop(old);
        // Histograms of names the new config dropped go once no older
        // generation's connection records into them (checked every swap).
        new.store.prune();
        tracing::info!(
            worker = new.id,
            generation,
            listening = self.listening.len(),
            "config generation committed"
        );
    }

    fn abort(&mut self, generation: u64) {
        if self
            .pending
            .take_if(|p| p.generation == generation)
            .is_some()
        {
            tracing::info!(generation, "prepared config generation dropped");
        }
    }
}

/// Serves the mailbox until the worker should exit: sleeps until the bell
/// rings (or [`MAILBOX_IDLE_WAKE`] passes), then empties it; while
/// draining, also looks every [`MAILBOX_POLL_INTERVAL`] whether the
/// connections are done.
async fn serve_mailbox(
    control: &mut Control,
    inbox: &Receiver<Command>,
    wake: std::os::unix::net::UnixStream,
    lifeline: &Lifeline,
) {
    let mut drain_deadline: Option<Instant> = None;
    let started = Instant::now();
    let mut buf = Vec::new();
    let uring = control.worker().driver == Driver::IoUring;
    let mut wake = match monoio::net::UnixStream::from_std(wake) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "mailbox bell unusable: polling the mailbox instead");
            None
        }
    };
    loop {
        let wait = if drain_deadline.is_some() {
            MAILBOX_POLL_INTERVAL
        } else {
            MAILBOX_IDLE_WAKE
        };
        mailbox::wait_for_bell(&mut wake, &mut buf, wait, uring).await;
        lifeline.beat();
        fault::wedge_if_due(control.worker().id, started);
        // The lifeline first: it is how a stop gets through a full mailbox.
        let mut asked = lifeline.asked();
        loop {
            let worker = control.worker();
            let next = match asked.take() {
                Some(command) => Ok(command),
                None => inbox.try_recv(),
            };
            match next {
                Ok(Command::Drain) => {
                    if drain_deadline.is_none() {
                        drain_deadline = Some(Instant::now() + worker.config.drain_timeout);
                        worker.draining.fire();
                        worker.retired.fire();
                        control.pending = None;
                        // Once its accept loops end, a draining process
                        // refuses new connections (no copy keeps a queue).
                        for (_, _, dup) in &mut control.listening {
                            *dup = None;
                        }
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
                    let histograms = worker.store.snapshot();
                    if reset {
                        worker.store.reset();
                    }
                    let _ = reply.try_send(HistogramReport {
                        worker: worker.id,
                        histograms,
                    });
                }
                Ok(Command::Prepare {
                    generation,
                    config,
                    binds,
                    tls,
                    reply,
                }) => {
                    let result = if worker.draining.is_fired() {
                        Err(format!("worker {}: draining", worker.id))
                    } else {
                        control.prepare(generation, config, binds, tls)
                    };
                    let _ = reply.try_send(Prepared {
                        worker: worker.id,
                        result,
                    });
                }
                Ok(Command::Commit { generation, reply }) => {
                    if !worker.draining.is_fired() {
                        control.commit(generation);
                    }
                    let _ = reply.try_send(worker.id);
                }
                Ok(Command::Abort { generation }) => control.abort(generation),
                Ok(Command::Tls { workload, reply }) => {
                    worker.tls.install(workload);
                    let _ = reply.try_send(worker.id);
                }
                Ok(Command::Tap {
                    spec,
                    events,
                    reply,
                }) => {
                    worker.taps.attach(spec, events);
                    let _ = reply.try_send(worker.id);
                }
                Ok(Command::Untap(id)) => worker.taps.detach(id),
                Ok(Command::Overload(stage)) => worker.slots.set_pressure(stage),
                Ok(Command::Sockets(reply)) => {
                    let dups = control
                        .listening
                        .iter()
                        .filter_map(|(addr, _, dup)| Some((*addr, dup.as_ref()?.try_clone().ok()?)))
                        .collect();
                    let _ = reply.try_send(dups);
                }
                Ok(Command::Stop) | Err(TryRecvError::Disconnected) => {
                    worker.draining.fire();
                    worker.retired.fire();
                    return;
                }
                Err(TryRecvError::Empty) => break,
            }
        }
        if let Some(deadline) = drain_deadline {
            let worker = control.worker();
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
/// both stop when the generation retires (the next one starts its own,
/// on the cluster states it kept).
fn spawn_upstream_upkeep(worker: &Rc<Worker>) {
    for cluster in &worker.clusters {
        if let Some(check) = cluster.config.health_check.clone() {
            let cluster = Rc::clone(cluster);
            let counters = Rc::clone(&worker.counters);
            let tls = Rc::clone(&worker.tls);
            let stop = worker.retired.clone();
            monoio::spawn(health::run(cluster, check, counters, tls, stop));
        }
    }
    let w = Rc::clone(worker);
    monoio::spawn(async move {
        loop {
            monoio::select! {
                _ = monoio::time::sleep(POOL_SWEEP_INTERVAL) => {}
                _ = w.retired.wait() => return,
            }
            let now = Instant::now();
            for c in &w.clusters {
                c.expire_idle(now);
            }
        }
    });
}

/// How long a new connection waits for the slot of the idle connection
/// it evicted: that one closes as soon as its task runs (same thread), so
/// this is a bound, not an expected wait.
const EVICTION_WAIT: Duration = Duration::from_millis(100);

/// Refusals being written at once (each a task of at most
/// [`REFUSAL_LINGER`]); past this, refused connections are closed without
/// a word, so a flood at the cap costs no more than a bounded set of tasks.
const REFUSALS_IN_FLIGHT_MAX: usize = 64;

/// How long a refused HTTP client gets to read the 503 (we read and
/// discard what it sent meanwhile, so the close does not reset the 503).
const REFUSAL_LINGER: Duration = Duration::from_millis(500);

/// Accepts on one listening socket until it is stopped (its address left
/// the config) or the worker drains; each connection goes to the
/// generation current when it was accepted.
///
/// At the connection cap a new connection is never left unanswered in
/// the backlog: the longest-idle keep-alive connection is closed to admit
/// it; if none is idle, it is refused at once (HTTP: 503 `overload`,
/// otherwise closed), and counted either way.
async fn accept_loop(
    current: Current,
    addr: SocketAddr,
    sock: monoio::net::TcpListener,
    stop: Trigger,
) {
    let (slots, draining, nonblocking) = {
        let w = current.borrow();
        (
            Rc::clone(&w.slots),
            w.draining.clone(),
            w.driver == Driver::Epoll,
        )
    };
    let refusing = Rc::new(Cell::new(0usize));
    loop {
        if slots.pressure() >= overload::STAGE_STOP_ACCEPT {
            // Memory overload, last stage: leave new connections in the
            // kernel's backlog until the pressure eases (counted).
            metrics::add(&current.borrow().counters.overload_accept_paused, 1);
            monoio::select! {
                _ = slots.accepting() => {},
                _ = draining.wait() => return,
                _ = stop.wait() => return,
            }
            continue;
        }
        // With a memory ceiling, a waiting accept gives way as soon as
        // the last stage is reached (the accept is a readiness poll:
        // dropping it takes no connection); without one, no waiter is
        // registered on the accept path.
        let ceiling = current.borrow().config.overload.memory_max_mib.is_some();
        // Biased, the drain and the stop first: the accept takes a
        // connection as soon as it is polled, and one taken after the drain
        // fired could outlive its worker (the mailbox loop ends the worker
        // once no connection is active) and be reset unserved. Left in the
        // queue, it goes to the successor of an upgrade, or is refused.
        let accepted = monoio::select! {
            biased;
            _ = draining.wait() => return,
            _ = stop.wait() => return,
            _ = slots.overloaded(), if ceiling => continue,
            accepted = listener::accept(&sock, nonblocking) => accepted,
        };
        let worker = Rc::clone(&current.borrow());
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                metrics::add(&worker.counters.accept_errors, 1);
                tracing::warn!(worker = worker.id, error = %e, "accept failed; backing off");
                monoio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                continue;
            }
        };
        metrics::add(&worker.counters.connections_accepted, 1);
        let Some(listener_index) = worker.binds.iter().position(|a| *a == addr) else {
            // Accepted between a commit that dropped this address
            // and this loop seeing its stop: no listener owns it.
            continue;
        };
        let listener = &worker.config.listeners[listener_index];
        let slot = match slots.try_acquire() {
            Some(slot) => Some(slot),
            None if slots.evict_oldest_idle() => {
                metrics::add(&worker.counters.connections_evicted_idle, 1);
                monoio::time::timeout(EVICTION_WAIT, slots.acquire())
                    .await
                    .ok()
            }
            None => None,
        };
        let Some(slot) = slot else {
            metrics::add(&worker.counters.connections_refused_overload, 1);
            tracing::debug!(worker = worker.id, %peer, listener = %listener.name, "at the connection cap: refused");
            let plain_http = matches!(listener.kind, ListenerKind::Http(_))
                && listener.tls.is_none()
                && listener.direction.is_none();
            if plain_http && refusing.get() < REFUSALS_IN_FLIGHT_MAX {
                refusing.set(refusing.get() + 1);
                let (counters, buffers) = (Rc::clone(&worker.counters), Rc::clone(&worker.buffers));
                let refusing = Rc::clone(&refusing);
                monoio::spawn(async move {
                    refuse_overloaded(stream, &counters, &buffers).await;
                    refusing.set(refusing.get() - 1);
                });
            }
            continue;
        };
        let conn_id = worker.next_conn_id();
        let counters = Rc::clone(&worker.counters);
        let w = Rc::clone(&worker);
        if listener.direction.is_some() {
            let conn = crate::intercept::serve(w, listener_index, stream, peer, conn_id, slot);
            isolate::spawn_connection(counters, conn_id, conn);
            continue;
        }
        match listener.kind {
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
}

/// Answers a plaintext HTTP connection refused at the cap with a 503
/// `overload`, then reads and drops what the client sent for a moment, so
/// that closing does not turn into a reset that destroys the answer.
async fn refuse_overloaded(
    mut stream: monoio::net::TcpStream,
    counters: &metrics::Counters,
    buffers: &BufferPool,
) {
    use monoio::io::AsyncWriteRentExt;
    let reason = metrics::ErrorReason::Overload;
    let detail = "this proxy is at its connection limit; retry later";
    counters.generated(reason, detail);
    counters.http.response(reason.status());
    let mut out = Vec::with_capacity(256);
    http::respond::generated(reason, detail, true, &mut out);
    let written = monoio::time::timeout(REFUSAL_LINGER, stream.write_all(out)).await;
    if !matches!(written, Ok((Ok(_), _))) {
        return;
    }
    let buf = http::inbound::linger(
        &mut stream,
        buffers.take(),
        REFUSAL_LINGER,
        http::LINGER_BYTES_MAX,
    )
    .await;
    buffers.give(buf);
}

/// A test seam: make one worker's [`Command::Prepare`] fail for configs
/// with a given listener name, so tests can check that a swap one worker
/// cannot make switches no worker. Read once per prepare (admin-rate), never
/// on the data path; the listener name keeps concurrent tests apart.
#[doc(hidden)]
pub mod fault {
    use std::sync::OnceLock;

    // The admin path only; the data path never takes this lock.
    #[allow(clippy::disallowed_types)]
    type Lock<T> = std::sync::Mutex<T>;

    static FAIL_PREPARE: OnceLock<Lock<Vec<(usize, String)>>> = OnceLock::new();

    /// From now on, worker `id`'s prepare fails for any config that has a
    /// listener called `listener`.
    pub fn fail_prepare_on(id: usize, listener: &str) {
        let list = FAIL_PREPARE.get_or_init(Lock::default);
        if let Ok(mut list) = list.lock() {
            list.push((id, listener.to_string()));
        }
    }

    /// `PILOTFISH_FAULT_WEDGE_WORKER=ID:AFTER_MS:FOR_MS`: worker ID blocks
    /// its thread for FOR_MS, once, AFTER_MS after it started serving (a
    /// wedged event loop, for the watchdog's test through the real
    /// binary). Read once; absent or malformed, nothing happens.
    pub const WEDGE_ENV: &str = "PILOTFISH_FAULT_WEDGE_WORKER";

    pub(super) fn wedge_if_due(id: usize, started: std::time::Instant) {
        static PLAN: OnceLock<Option<(usize, u64, u64)>> = OnceLock::new();
        let plan = PLAN.get_or_init(|| {
            let v = std::env::var(WEDGE_ENV).ok()?;
            let mut parts = v.split(':').map(str::parse::<u64>);
            let (Some(Ok(w)), Some(Ok(after)), Some(Ok(dur))) =
                (parts.next(), parts.next(), parts.next())
            else {
                return None;
            };
            Some((usize::try_from(w).ok()?, after, dur))
        });
        let Some((worker, after, dur)) = *plan else {
            return;
        };
        thread_local! {
            static DONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
        }
        if worker != id || DONE.get() || started.elapsed().as_millis() < u128::from(after) {
            return;
        }
        DONE.set(true);
        tracing::warn!(
            worker = id,
            ms = dur,
            "test fault: wedging this worker's thread"
        );
        // The point of the seam: a worker whose event loop does not run.
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(std::time::Duration::from_millis(dur));
    }

    pub(super) fn prepare_fails_on(id: usize, config: &crate::config::Config) -> bool {
        let Some(list) = FAIL_PREPARE.get() else {
            return false;
        };
        list.lock().is_ok_and(|list| {
            list.iter()
                .any(|(w, name)| *w == id && config.listeners.iter().any(|l| l.name == *name))
        })
    }
}

/// How long [`collect_reports`] waits for a worker's answer. A message
/// wakes a worker at once; a second means it is wedged.
pub const REPORT_TIMEOUT: Duration = Duration::from_secs(1);

/// Asks every worker for a report; workers that do not answer in time are
/// left out (and named in the log).
pub fn collect_reports(mailboxes: &[Mailbox]) -> Vec<WorkerReport> {
    let mut reports = ask_all(mailboxes, REPORT_TIMEOUT, Command::Snapshot);
    reports.sort_by_key(|r| r.worker);
    reports
}

/// Sends each worker the command `ask` builds around a reply channel and
/// gathers the answers that arrive within [`REPORT_TIMEOUT`].
pub(crate) fn ask_all<T>(
    mailboxes: &[Mailbox],
    timeout: Duration,
    ask: impl Fn(Sender<T>) -> Command,
) -> Vec<T> {
    let (tx, rx) = crossbeam_channel::bounded(mailboxes.len().max(1));
    let deadline = Instant::now() + timeout;
    // A full mailbox gets until the deadline too: a wedged worker is left
    // out (and named in the log), it does not hold the caller forever.
    let asked = mailboxes
        .iter()
        .filter(|m| m.send_deadline(ask(tx.clone()), deadline).is_ok())
        .count();
    drop(tx);
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
pub fn collect_clusters(mailboxes: &[Mailbox]) -> Vec<ClustersReport> {
    let mut reports = ask_all(mailboxes, REPORT_TIMEOUT, Command::Clusters);
    reports.sort_by_key(|r| r.worker);
    reports
}

/// Asks every worker for its histograms (and to reset them if `reset`).
pub fn collect_histograms(mailboxes: &[Mailbox], reset: bool) -> Vec<HistogramReport> {
    let mut reports = ask_all(mailboxes, REPORT_TIMEOUT, |reply| Command::Histograms {
        reset,
        reply,
    });
    reports.sort_by_key(|r| r.worker);
    reports
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection waiting in the queue when the worker starts draining
    /// stays in the queue: the accept loop sees the drain before it takes
    /// anything, on both drivers. (Taken, it could outlive its worker and
    /// be reset unserved: seen as a client error during an upgrade.) Both
    /// are ready at the loop's first poll; an unbiased choice between
    /// them takes the connection about every other round.
    #[test]
    fn a_draining_accept_loop_leaves_a_queued_connection_in_the_queue() {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
            .block_on(drain_with_a_queued_connection(Driver::Epoll));
        // Where io_uring is refused (seccomp), the epoll run above stands.
        if let Ok(mut rt) = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .build()
        {
            rt.block_on(drain_with_a_queued_connection(Driver::IoUring));
        }
    }

    async fn drain_with_a_queued_connection(driver: Driver) {
        const ROUNDS: usize = 24;
        for round in 0..ROUNDS {
            let std_listener = listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let addr = std_listener.local_addr().unwrap();
            let queue = std_listener.try_clone().unwrap();
            let text = format!(
                "[[listeners]]\nname = \"l\"\nbind = \"{addr}\"\nprotocol = \"http\"\ncluster = \"c\"\n[[clusters]]\nname = \"c\"\nendpoints = [\"127.0.0.1:9\"]\n"
            );
            let config = Arc::new(crate::config::Config::parse("t.toml", &text).unwrap());
            let (log, _log_rx) = crossbeam_channel::bounded(1);
            let (spans, _spans_rx) = crossbeam_channel::bounded(1);
            let worker = Worker::first(
                0,
                None,
                driver,
                config,
                Arc::new(vec![addr]),
                (log, spans),
                None,
            );
            // The client's handshake completes in the kernel: queued.
            let _client = std::net::TcpStream::connect(addr).unwrap();
            worker.draining.fire();
            let current = Rc::new(RefCell::new(Rc::new(worker)));
            let sock = monoio::net::TcpListener::from_std(std_listener).unwrap();
            accept_loop(current, addr, sock, Trigger::default()).await;
            let left = queue.accept();
            assert!(
                left.is_ok(),
                "{driver}, round {round}: the draining loop took the queued connection ({:?})",
                left.err()
            );
        }
    }
}
