//! The systemd watchdog, per core: `WATCHDOG=1` is sent only while every
//! worker's event loop is making progress, so that a wedged core (a busy
//! loop, a blocking call, a deadlock) stops the pings and systemd restarts
//! the service (`WatchdogSec=` in the unit).
//!
//! Progress is each worker's heartbeat ([`crate::worker::Lifeline`]),
//! bumped by its mailbox loop each time it wakes: the check pings every
//! worker (rings its mailbox bell), and a worker that runs its event loop
//! at all wakes and bumps it within microseconds; one that does not by the
//! next check is wedged. The check runs on a thread of its own at half the
//! watchdog timeout, as sd_watchdog_enabled(3) suggests; a worker asked to
//! drain or stop is not waited for (its loop may have ended). Without
//! `WATCHDOG_USEC` (or with `WATCHDOG_PID` naming another process) nothing
//! runs, and an idle worker is not woken.

use std::time::Duration;

use crossbeam_channel::{RecvTimeoutError, Sender};

use super::notify::Notifier;
use crate::worker::Lifeline;

/// The shortest check interval: a live worker answers a ping within
/// microseconds, but a check must leave room for scheduling jitter on a
/// busy machine, so that it is not taken for a wedge.
const CHECK_INTERVAL_MIN: Duration = Duration::from_millis(50);

/// The interval at which to check and ping, from the environment systemd
/// sets: half of `WATCHDOG_USEC`, at least [`CHECK_INTERVAL_MIN`]. None
/// when no watchdog was asked for this process.
pub fn interval_from_env() -> Option<Duration> {
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    if usec == 0 {
        return None;
    }
    Some((Duration::from_micros(usec) / 2).max(CHECK_INTERVAL_MIN))
}

/// Starts the watchdog thread; it stops when the returned sender is
/// dropped.
pub fn spawn(lifelines: Vec<Lifeline>, every: Duration) -> std::io::Result<Sender<()>> {
    let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
    std::thread::Builder::new()
        .name("pilotfish-watchdog".into())
        .spawn(move || {
            let notifier = Notifier::from_env();
            let mut last: Vec<u64> = lifelines.iter().map(Lifeline::beats).collect();
            lifelines.iter().for_each(Lifeline::ping);
            let mut withholding = false;
            tracing::info!(every = ?every, "systemd watchdog: pinging while every worker makes progress");
            while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                let now: Vec<u64> = lifelines.iter().map(Lifeline::beats).collect();
                let stuck: Vec<usize> = lifelines
                    .iter()
                    .enumerate()
                    .filter(|(i, l)| now[*i] == last[*i] && !l.leaving())
                    .map(|(i, _)| i)
                    .collect();
                last = now;
                // Answered by the next check, by every live worker.
                lifelines.iter().for_each(Lifeline::ping);
                if stuck.is_empty() {
                    notifier.send("WATCHDOG=1");
                    if withholding {
                        tracing::warn!("every worker makes progress again: watchdog pings resume");
                        withholding = false;
                    }
                } else if !withholding {
                    tracing::error!(
                        workers = ?stuck,
                        "no progress for {every:?}: withholding WATCHDOG=1 (systemd restarts the service at WatchdogSec)"
                    );
                    withholding = true;
                }
            }
        })?;
    Ok(stop)
}
