//! Builds a worker's monoio runtime: io_uring when the kernel lets us, the
//! epoll driver otherwise, and says which one runs.
//!
//! What must hold: `auto` never fails because io_uring is missing (seccomp,
//! `kernel.io_uring_disabled`, old kernels): it falls back to epoll and logs
//! why. `MONOIO_FORCE_LEGACY_DRIVER=1` forces epoll (monoio's own switch).

use std::{fmt, future::Future, io};

use monoio::{IoUringDriver, LegacyDriver, RuntimeBuilder};
use serde::Serialize;

use crate::config::{DriverChoice, UringSetup};

/// io_uring submission queue entries per worker. Each in-flight socket op
/// takes one; 4096 covers a busy worker's accept, reads and writes in one
/// batch without monoio having to flush early.
const URING_ENTRIES: u32 = 4096;

/// The driver a worker actually runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Driver {
    IoUring,
    Epoll,
}

impl fmt::Display for Driver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Driver::IoUring => "io_uring",
            Driver::Epoll => "epoll",
        })
    }
}

/// Whether io_uring with every op we use works here (and is not disabled by
/// `MONOIO_FORCE_LEGACY_DRIVER`).
pub fn io_uring_available() -> bool {
    monoio::utils::detect_uring()
}

/// Runs `main` to completion on a runtime of the chosen driver.
///
/// `main` gets the driver that was picked, so the worker can report it.
pub fn block_on<F, Fut>(choice: DriverChoice, setup: UringSetup, main: F) -> io::Result<Fut::Output>
where
    F: FnOnce(Driver) -> Fut,
    Fut: Future,
{
    match choice {
        DriverChoice::Epoll => run_epoll(main),
        DriverChoice::IoUring => run_uring(setup, main).map_err(|(_, e)| e),
        DriverChoice::Auto if !monoio::utils::detect_uring() => {
            tracing::debug!("io_uring unavailable or MONOIO_FORCE_LEGACY_DRIVER set: using epoll");
            run_epoll(main)
        }
        DriverChoice::Auto => match run_uring(setup, main) {
            Ok(out) => Ok(out),
            Err((main, e)) => {
                tracing::warn!(error = %e, "io_uring runtime failed to start; falling back to epoll");
                run_epoll(main)
            }
        },
    }
}

fn run_epoll<F, Fut>(main: F) -> io::Result<Fut::Output>
where
    F: FnOnce(Driver) -> Fut,
    Fut: Future,
{
    let mut rt = RuntimeBuilder::<LegacyDriver>::new()
        .enable_timer()
        .build()?;
    Ok(rt.block_on(main(Driver::Epoll)))
}

/// On failure to build, hands `main` back so the caller can fall back.
fn run_uring<F, Fut>(setup: UringSetup, main: F) -> Result<Fut::Output, (F, io::Error)>
where
    F: FnOnce(Driver) -> Fut,
    Fut: Future,
{
    // The flags change how completions reach us; measured in NOTES.md and
    // by `pilotfish-bench compare`. Fall back to default flags on kernels
    // without them.
    let mut flags = io_uring::IoUring::builder();
    match setup {
        UringSetup::CoopTaskrun => {
            flags.setup_coop_taskrun();
        }
        UringSetup::DeferTaskrun => {
            flags.setup_single_issuer().setup_defer_taskrun();
        }
        UringSetup::Default => {}
    }
    let built = RuntimeBuilder::<IoUringDriver>::new()
        .enable_timer()
        .with_entries(URING_ENTRIES)
        .uring_builder(flags)
        .build()
        .or_else(|_| {
            RuntimeBuilder::<IoUringDriver>::new()
                .enable_timer()
                .with_entries(URING_ENTRIES)
                .build()
        });
    match built {
        Ok(mut rt) => Ok(rt.block_on(main(Driver::IoUring))),
        Err(e) => Err((main, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoll_is_chosen_when_asked() {
        assert_eq!(
            block_on(
                DriverChoice::Epoll,
                UringSetup::Default,
                |d| async move { d }
            )
            .unwrap(),
            Driver::Epoll
        );
    }

    #[test]
    fn io_uring_runs_where_the_kernel_allows_it() {
        if !monoio::utils::detect_uring() {
            eprintln!("io_uring not available here; nothing to check");
            return;
        }
        let d = block_on(
            DriverChoice::IoUring,
            UringSetup::CoopTaskrun,
            |d| async move { d },
        )
        .unwrap();
        assert_eq!(d, Driver::IoUring);
    }
}
