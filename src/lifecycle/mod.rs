//! The process's life: start, readiness, signals, drain, exit.
//!
//! What must hold: `READY=1` is sent only after every worker has bound every
//! listener; the first SIGTERM/SIGINT stops accepting everywhere
//! (`STOPPING=1`) and gives in-flight connections the drain timeout; a
//! second signal exits at once.

pub mod notify;

use crossbeam_channel::select;
use signal_hook::consts::{SIGINT, SIGTERM};

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
}

/// Serves until signalled, then drains. Returns how it ended.
pub fn run_until_stopped(
    proxy: Proxy,
    notifier: &Notifier,
    draining: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<Exit> {
    let (sig_tx, sig_rx) = crossbeam_channel::bounded(4);
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
    let signal_handle = signals.handle();
    std::thread::Builder::new()
        .name("pilotfish-signals".into())
        .spawn(move || {
            for signal in signals.forever() {
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
    notifier.send(&format!(
        "READY=1\nSTATUS=serving on {workers} worker(s): {summary}"
    ));

    let done = proxy.exited();
    let exit = select! {
        recv(sig_rx) -> sig => {
            tracing::info!(signal = ?sig.ok(), "draining: no new connections; in-flight ones get {:?}", proxy.config().drain_timeout);
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
        // Drained through the admin socket (POST /drain), or gone unasked.
        recv(done) -> _ => {
            if draining.load(std::sync::atomic::Ordering::SeqCst) {
                Exit::Drained
            } else {
                Exit::WorkersGone
            }
        }
    };
    signal_handle.close();
    if exit != Exit::Forced {
        proxy.join();
    }
    Ok(exit)
}
