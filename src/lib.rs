//! Pilotfish: a thread-per-core service-mesh sidecar proxy on io_uring.
//!
//! The module tree mirrors the architecture:
//! - [`config`]: TOML → validated, immutable [`config::Config`]; every limit.
//! - [`worker`]: one pinned thread per core with its own runtime, listeners,
//!   buffers and counters; a mailbox for control.
//! - [`l4`]: TCP proxying: connect with retries, two-way copy, idle timeout.
//! - [`balance`]: endpoint pickers, pure and per worker.
//! - [`metrics`]: per-worker counters and their merged snapshots.
//! - [`proxy`]: starting, draining and stopping the set of workers.
//! - [`control`]: live config swaps, two-phase across every worker.
//! - [`admin`]: the admin socket (stats, metrics, histograms, control).
//! - [`access_log`]: per-core buffered request lines, written off-core.
//! - [`tls`]: SPIFFE identities, SVID verification, TLS material, dev CA.
//! - [`intercept`]: transparent interception: redirect rules, original
//!   destinations, protocol detection, inbound and outbound roles.
//! - [`lifecycle`]: signals, systemd notify, the process's exit.

pub mod access_log;
pub mod admin;
pub mod balance;
pub mod config;
pub mod control;
pub mod dns;
pub mod http;
pub mod http1;
pub mod http2;
pub mod intercept;
pub mod l4;
pub mod lifecycle;
pub mod metrics;
pub mod proxy;
pub mod route;
pub mod tls;
pub mod trace;
pub mod upstream;
pub mod worker;
pub mod xds;

pub use config::Config;
pub use proxy::Proxy;
