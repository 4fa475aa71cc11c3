//! Memory overload: the process's resident memory held against
//! `[overload] memory_max_mib`, sampled by one thread, and the stage it
//! implies sent to every worker as a message when it changes.
//!
//! The stages, in the order Envoy's overload manager takes its actions:
//!
//! | stage | from | what the workers do |
//! |---|---|---|
//! | 1 | [`KEEP_ALIVE_OFF_PERCENT`] | responses close their connections (`connection: close`; h2: GOAWAY after the stream) |
//! | 2 | [`REFUSE_REQUESTS_PERCENT`] | new requests get 503 `overload` (gRPC: UNAVAILABLE) |
//! | 3 | [`STOP_ACCEPT_PERCENT`] | accept loops pause; new connections wait in the kernel's backlog (bounded by `LISTEN_BACKLOG`) |
//!
//! Each stage includes the ones before it, and each is counted
//! (`overload_keep_alive_off`, `generated{reason="overload"}`,
//! `overload_accept_paused`); the current stage and the memory figures
//! are in `/stats` (`overload`) and on `/metrics`.
//!
//! The connection cap has its own stages, decided by each worker alone
//! (see [`crate::worker::gate::Slots`]): keep-alive off near the cap,
//! then idle connections evicted, then new connections answered 503.
//!
//! What must hold: the stage reaches workers only by message (no shared
//! state on the data path); a worker whose mailbox was full gets it at the
//! next sample (resent until taken); without `memory_max_mib` nothing is
//! sampled and the stage stays 0.

use std::{
    sync::{
        atomic::{AtomicU64, AtomicU8, Ordering},
        Arc,
    },
    time::Duration,
};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::control::Controller;

/// How often resident memory is read: fast enough to act within a burst
/// of allocation, and a read of /proc/self/statm costs microseconds.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(100);
/// How often the config is looked at for a ceiling while it sets none (a
/// swap may add one): an idle sidecar without one wakes once a second
/// for it, not ten times.
pub const IDLE_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// Share of `memory_max_mib` (percent) from which connections stop being
/// kept alive: freeing idle connections' memory is the cheapest action.
pub const KEEP_ALIVE_OFF_PERCENT: u64 = 80;
/// ... from which new requests are refused with 503 `overload`.
pub const REFUSE_REQUESTS_PERCENT: u64 = 90;
/// ... from which workers stop accepting.
pub const STOP_ACCEPT_PERCENT: u64 = 95;

/// The stages, as the workers see them.
pub const STAGE_KEEP_ALIVE_OFF: u8 = 1;
pub const STAGE_REFUSE_REQUESTS: u8 = 2;
pub const STAGE_STOP_ACCEPT: u8 = 3;

/// Test seam: a file holding the bytes in use, read instead of the real
/// resident size, so that a test can walk the stages in order without
/// allocating gigabytes. Documented, and read only when set.
pub const MEMORY_FILE_ENV: &str = "PILOTFISH_FAULT_MEMORY_FILE";

/// The stage for `used` bytes under a ceiling of `max` bytes.
pub fn stage(used: u64, max: u64) -> u8 {
    let percent = used.saturating_mul(100) / max.max(1);
    match percent {
        p if p >= STOP_ACCEPT_PERCENT => STAGE_STOP_ACCEPT,
        p if p >= REFUSE_REQUESTS_PERCENT => STAGE_REFUSE_REQUESTS,
        p if p >= KEEP_ALIVE_OFF_PERCENT => STAGE_KEEP_ALIVE_OFF,
        _ => 0,
    }
}

/// Resident memory of this process, in bytes (`/proc/self/statm`).
pub fn resident_bytes() -> std::io::Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("unexpected statm: {statm:?}")))?;
    Ok(pages * rustix::param::page_size() as u64)
}

/// Bytes in use: the test seam's file when set, else the resident size.
fn used_bytes(seam: Option<&std::path::Path>) -> std::io::Result<u64> {
    match seam {
        Some(path) => std::fs::read_to_string(path)?
            .trim()
            .parse()
            .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display()))),
        None => resident_bytes(),
    }
}

/// What the monitor last saw, for `/stats` and `/metrics`.
#[derive(Debug, Default)]
pub struct Status {
    stage: AtomicU8,
    used_bytes: AtomicU64,
    max_bytes: AtomicU64,
}

/// [`Status`] as served.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Report {
    pub stage: u8,
    /// 0 when no ceiling is configured (nothing sampled).
    pub memory_used_bytes: u64,
    pub memory_max_bytes: u64,
}

impl Status {
    pub fn report(&self) -> Report {
        Report {
            stage: self.stage.load(Ordering::Relaxed),
            memory_used_bytes: self.used_bytes.load(Ordering::Relaxed),
            memory_max_bytes: self.max_bytes.load(Ordering::Relaxed),
        }
    }
}

/// Samples until `stop` is dropped or sent to, telling the workers each
/// change of stage.
pub fn spawn(
    control: Arc<Controller>,
    status: Arc<Status>,
    stop: Receiver<()>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let seam = std::env::var_os(MEMORY_FILE_ENV).map(std::path::PathBuf::from);
    std::thread::Builder::new()
        .name("pilotfish-overload".into())
        .spawn(move || {
            // What each worker was last told (None: not yet, or its
            // mailbox was full).
            let mut told: Vec<Option<u8>> = vec![Some(0); control.mailboxes().len()];
            let mut logged = 0u8;
            // A failing read is logged when it starts failing, not at
            // every sample (ten lines a second).
            let mut failing = false;
            let mut wait = SAMPLE_INTERVAL;
            loop {
                match stop.recv_timeout(wait) {
                    Err(RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                let max = control
                    .config()
                    .overload
                    .memory_max_mib
                    .map(|mib| mib.saturating_mul(1024 * 1024));
                wait = if max.is_some() {
                    SAMPLE_INTERVAL
                } else {
                    IDLE_SAMPLE_INTERVAL
                };
                let (now, used) = match max {
                    None => (0, 0),
                    Some(max) => match used_bytes(seam.as_deref()) {
                        Ok(used) => {
                            if std::mem::take(&mut failing) {
                                tracing::info!("memory in use readable again");
                            }
                            (stage(used, max), used)
                        }
                        Err(e) => {
                            if !std::mem::replace(&mut failing, true) {
                                tracing::warn!(error = %e, "cannot read memory in use; overload stage unchanged until it can");
                            }
                            continue;
                        }
                    },
                };
                status.stage.store(now, Ordering::Relaxed);
                status.used_bytes.store(used, Ordering::Relaxed);
                status.max_bytes.store(max.unwrap_or(0), Ordering::Relaxed);
                if now != logged {
                    if now > logged {
                        tracing::warn!(stage = now, used, max, "memory overload stage raised");
                    } else {
                        tracing::info!(stage = now, used, max, "memory overload stage lowered");
                    }
                    logged = now;
                }
                control.tell_overload(now, &mut told);
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_follow_the_share_of_the_ceiling() {
        let max = 1000;
        assert_eq!(stage(0, max), 0);
        assert_eq!(stage(799, max), 0);
        assert_eq!(stage(800, max), STAGE_KEEP_ALIVE_OFF);
        assert_eq!(stage(899, max), STAGE_KEEP_ALIVE_OFF);
        assert_eq!(stage(900, max), STAGE_REFUSE_REQUESTS);
        assert_eq!(stage(950, max), STAGE_STOP_ACCEPT);
        assert_eq!(stage(u64::MAX, max), STAGE_STOP_ACCEPT);
        assert_eq!(
            stage(1, 0),
            STAGE_STOP_ACCEPT,
            "a zero ceiling never divides by zero"
        );
    }

    #[test]
    fn resident_size_is_read() {
        let rss = resident_bytes().unwrap();
        assert!(rss > 0);
        // The same figure /proc/self/status gives, within what the test
        // itself allocates in between.
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        let diff = (rss / 1024).abs_diff(kib);
        assert!(
            diff < kib / 2 + 1024,
            "statm {rss} bytes vs status {kib} KiB"
        );
    }
}
