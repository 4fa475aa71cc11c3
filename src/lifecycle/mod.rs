//! The process's life: start, readiness, signals, drain, exit.
//!
//! What must hold: `READY=1` is sent only after every worker has bound every
//! listener; the first SIGTERM/SIGINT stops accepting everywhere
//! (`STOPPING=1`) and gives in-flight connections the drain timeout; a
//! second signal exits at once. SIGHUP re-reads the config file and swaps
//! it on every worker or none (see [`crate::control`]), announced as
//! `RELOADING=1` + `MONOTONIC_USEC=` and closed by `READY=1` whether or not
//! the new config was taken (systemd's `Type=notify-reload` protocol); a
//! refused reload keeps the old config, and says why in the log and in
//! `STATUS=`. Under `WatchdogSec=`, `WATCHDOG=1` is sent only while every
//! worker makes progress ([`watchdog`]). SIGUSR1 reopens the access log files (nginx's convention,
//! what logrotate setups send); SIGHUP does too. SIGUSR2 upgrades in place
//! ([`upgrade`]): a new process takes over every listening socket, and
//! this one drains and exits; if the new one fails, this one goes on.

pub mod inherit;
pub mod notify;
pub mod overload;
pub mod upgrade;
pub mod watchdog;

use crossbeam_channel::select;
use std::path::{Path, PathBuf};

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1, SIGUSR2};

use crate::proxy::Proxy;
use notify::Notifier;

/// How the process ended, for the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Drained (or drain timed out) after a signal: exit 0.
    Drained,
    /// A second signal cut the drain short.
    Forced,
    /// Every worker stopped without being asked (should not happen).
    WorkersGone,
    /// Drained after handing every listening socket to a new process
    /// (SIGUSR2): exit 0, leaving the admin socket to the new process.
    Upgraded,
}

/// Serves until signalled, then drains. Returns how it ended.
///
/// `config_path` is what SIGHUP re-reads (None: SIGHUP is logged and
/// ignored, for embedders without a file).
pub fn run_until_stopped(
    proxy: Proxy,
    config_path: Option<PathBuf>,
    notifier: &Notifier,
    draining: &std::sync::atomic::AtomicBool,
    upgrades: &Upgrades,
) -> anyhow::Result<Exit> {
    let (sig_tx, sig_rx) = crossbeam_channel::bounded(4);
    let (hup_tx, hup_rx) = crossbeam_channel::bounded(1);
    let (usr2_tx, usr2_rx) = crossbeam_channel::bounded(1);
    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP, SIGUSR1, SIGUSR2])?;
    let signal_handle = signals.handle();
    let logs = proxy.controller();
    std::thread::Builder::new()
        .name("pilotfish-signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if signal == SIGUSR1 {
                    tracing::info!("SIGUSR1: reopening the access log files");
                    logs.reopen_logs();
                    continue;
                }
                if signal == SIGUSR2 {
                    let _ = usr2_tx.try_send(());
                    continue;
                }
                if signal == SIGHUP {
                    // Reloads coalesce: one pending is as good as many.
                    let _ = hup_tx.try_send(());
                    continue;
                }
                if sig_tx.send(signal).is_err() {
                    break;
                }
            }
        })?;

    let workers = proxy.worker_count();
    let summary = proxy
        .listeners()
        .iter()
        .map(|(name, addr)| format!("{name}={addr}"))
        .collect::<Vec<_>>()
        .join(" ");
    tracing::info!(workers, listeners = %summary, "ready");
    if upgrades.successor {
        // The predecessor names this process MAINPID once told it serves.
        notifier.send(&format!(
            "STATUS=serving on {workers} worker(s) (upgraded): {summary}"
        ));
    } else {
        notifier.send(&format!(
            "READY=1\nSTATUS=serving on {workers} worker(s): {summary}"
        ));
    }
    store_listeners(&proxy, upgrades, notifier);
    // Dropped on return: stops the pings.
    let _watchdog = match watchdog::interval_from_env() {
        Some(every) => Some(watchdog::spawn(proxy.lifelines(), every)?),
        None => None,
    };

    let done = proxy.exited();
    let exit = loop {
        select! {
            recv(hup_rx) -> _ => {
                if draining.load(std::sync::atomic::Ordering::SeqCst) {
                    tracing::info!("SIGHUP while draining: ignored");
                    continue;
                }
                reload(&proxy, config_path.as_deref(), notifier);
                // New listeners' sockets join the store.
                store_listeners(&proxy, upgrades, notifier);
            }
            recv(usr2_rx) -> _ => {
                if draining.load(std::sync::atomic::Ordering::SeqCst) {
                    tracing::info!("SIGUSR2 while draining: ignored");
                    continue;
                }
                if let Some(pid) = upgrade(&proxy, upgrades, notifier) {
                    break drain_after_upgrade(&proxy, pid, draining, &sig_rx, &done);
                }
            }
            recv(sig_rx) -> sig => break stop(&proxy, sig.ok(), notifier, draining, &sig_rx, &done),
            // Drained through the admin socket (POST /drain), or gone unasked.
            recv(done) -> _ => {
                break if draining.load(std::sync::atomic::Ordering::SeqCst) {
                    Exit::Drained
                } else {
                    Exit::WorkersGone
                };
            }
        }
    };
    signal_handle.close();
    if exit != Exit::Forced {
        proxy.join();
    }
    Ok(exit)
}

/// What an in-place upgrade needs besides the proxy: how to start the
/// successor, and sockets outside the workers to hand over (the admin TCP
/// listener); and whether this process is itself a successor.
#[derive(Debug, Default)]
pub struct Upgrades {
    pub invocation: Option<upgrade::Invocation>,
    pub extra: Vec<(std::net::SocketAddr, std::net::TcpListener)>,
    pub successor: bool,
}

/// Under systemd, puts every listening socket in its file-descriptor store
/// (with `FileDescriptorStoreMax=` in the unit), so that a crash or a
/// restart keeps them and their queues: the next process gets them back
/// as `LISTEN_FDS` ([`inherit`]).
fn store_listeners(proxy: &Proxy, upgrades: &Upgrades, notifier: &Notifier) {
    use std::os::fd::AsFd;
    if !notifier.enabled() {
        return;
    }
    let sockets = match proxy.listening_sockets() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "listening sockets not stored with systemd");
            return;
        }
    };
    let fds: Vec<_> = sockets
        .iter()
        .map(|(_, s)| s.as_fd())
        .chain(upgrades.extra.iter().map(|(_, s)| s.as_fd()))
        .collect();
    if let Err(e) = notifier.store_fds("listeners", &fds) {
        // Without FileDescriptorStoreMax= systemd refuses; that is a choice.
        tracing::debug!(error = %e, "listening sockets not stored with systemd");
    }
}

/// SIGUSR2: starts the successor with every listening socket. Some(pid)
/// when it serves (this process should drain); None when it failed (this
/// process goes on, and says why).
fn upgrade(proxy: &Proxy, upgrades: &Upgrades, notifier: &Notifier) -> Option<u32> {
    let Some(invocation) = &upgrades.invocation else {
        tracing::error!("SIGUSR2: upgrade impossible: this process's binary path is unknown");
        return None;
    };
    tracing::info!(exe = %invocation.exe.display(), "SIGUSR2: upgrading in place");
    // The successor matches inherited sockets by the addresses its config
    // names: a port asked as 0 would be a different port there, and the
    // handed-over sockets (with their queues) would be closed.
    let config = proxy.config();
    let unmatched = config
        .listeners
        .iter()
        .map(|l| (l.name.as_str(), l.bind))
        .chain(config.admin.bind.map(|b| ("admin", b)))
        .find(|(_, addr)| addr.port() == 0);
    let sockets = match unmatched {
        Some((name, _)) => Err(format!(
            "listener {name:?} binds port 0, which the new process could not match; an upgrade needs fixed ports"
        )),
        None => proxy.listening_sockets(),
    };
    let sockets = sockets.and_then(|mut s| {
        for (addr, l) in &upgrades.extra {
            s.push((*addr, l.try_clone().map_err(|e| e.to_string())?));
        }
        Ok(s)
    });
    match sockets.and_then(|s| upgrade::hand_over(invocation, s)) {
        Ok(pid) => {
            tracing::info!(pid, "the new process serves; draining this one");
            notifier.send(&format!(
                "MAINPID={pid}\nSTATUS=upgraded: pid {pid} serves; the previous process drains"
            ));
            Some(pid)
        }
        Err(e) => {
            tracing::error!(error = %e, "upgrade failed; this process goes on serving");
            let first = e.lines().next().unwrap_or_default().to_string();
            notifier.send(&format!("STATUS=serving; upgrade failed: {first}"));
            None
        }
    }
}

/// After a successful upgrade: drain as on SIGTERM, but the service is
/// not stopping (no `STOPPING=1`).
fn drain_after_upgrade(
    proxy: &Proxy,
    successor: u32,
    draining: &std::sync::atomic::AtomicBool,
    sig_rx: &crossbeam_channel::Receiver<i32>,
    done: &crossbeam_channel::Receiver<()>,
) -> Exit {
    tracing::info!(
        successor,
        "draining after the upgrade; in-flight connections get {:?}",
        proxy.config().drain_timeout
    );
    draining.store(true, std::sync::atomic::Ordering::SeqCst);
    proxy.drain();
    select! {
        recv(sig_rx) -> _ => {
            tracing::warn!("signal during the upgrade drain: exiting without waiting");
            Exit::Forced
        }
        recv(done) -> _ => Exit::Upgraded,
    }
}

/// Re-reads the config file and swaps it on every worker or none.
fn reload(proxy: &Proxy, path: Option<&Path>, notifier: &Notifier) {
    notifier.send(&format!(
        "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading the config",
        notify::monotonic_usec()
    ));
    // Whatever the config does, log files are reopened (rotation).
    proxy.controller().reopen_logs();
    let Some(path) = path else {
        tracing::warn!("SIGHUP: no config file to re-read; ignored");
        notifier.send("READY=1\nSTATUS=reload ignored: no config file");
        return;
    };
    // The file is the base layer: a control plane's resources stay on top.
    let outcome = crate::Config::read(path)
        .map_err(crate::control::ApplyError::from)
        .and_then(|text| proxy.controller().apply_text(path, &text));
    let status = match outcome {
        Ok(changes) => {
            tracing::info!(file = %path.display(), changes = %changes.summary(), "reloaded on SIGHUP");
            format!("serving; reloaded {}", changes.summary())
        }
        Err(e) => {
            tracing::error!(file = %path.display(), error = %e, "reload refused; the running config stays");
            // STATUS is one line; the log has the whole error.
            let first = e.to_string().lines().next().unwrap_or_default().to_string();
            format!("serving the previous config; reload refused: {first}")
        }
    };
    notifier.send(&format!("READY=1\nSTATUS={status}"));
}

/// The first stop signal: drain, and wait for the drain or a second signal.
fn stop(
    proxy: &Proxy,
    sig: Option<i32>,
    notifier: &Notifier,
    draining: &std::sync::atomic::AtomicBool,
    sig_rx: &crossbeam_channel::Receiver<i32>,
    done: &crossbeam_channel::Receiver<()>,
) -> Exit {
    tracing::info!(signal = ?sig, "draining: no new connections; in-flight ones get {:?}", proxy.config().drain_timeout);
    notifier.send("STOPPING=1\nSTATUS=draining");
    draining.store(true, std::sync::atomic::Ordering::SeqCst);
    proxy.drain();
    select! {
        recv(sig_rx) -> _ => {
            tracing::warn!("second signal: exiting without waiting for the drain");
            Exit::Forced
        }
        recv(done) -> _ => Exit::Drained,
    }
}
