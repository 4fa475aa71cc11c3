//! The control plane: listeners, routes, clusters, endpoints and the
//! workload's certificates (SDS) pushed over Envoy's aggregated discovery
//! service (ADS), beside the static TOML.
//!
//! Layout: [`ads`] owns the client (its thread, reconnects, the state of
//! the world protocol: versions and nonces, ACK and NACK), `delta` the
//! incremental protocol over the same state; [`translate`] turns Envoy's resources into the
//! config file's tables; [`residue`] names a field Pilotfish did not take.
//! [`Status`] is what the admin socket shows, and is compiled without the
//! `xds` feature too (it then stays "not configured").
//!
//! What must hold: the client runs on a thread of its own with its own
//! small tokio runtime and never on a data worker; every accepted push
//! goes through [`crate::control::Controller::apply_dynamic`] (validate,
//! prepare everywhere, commit everywhere or nowhere) and is ACKed only
//! after the commit (pushed certificates through
//! [`crate::control::Controller::push_tls`], ACKed once every worker has
//! them); a refused push is NACKed with the reason and the last
//! good config keeps serving; so does an unreachable control plane, for
//! as long as it stays unreachable.

#[cfg(feature = "xds")]
pub mod ads;
#[cfg(feature = "xds")]
mod delta;
#[cfg(feature = "xds")]
pub mod residue;
#[cfg(feature = "xds")]
pub mod translate;

use std::{collections::BTreeMap, time::Instant};

use serde::Serialize;

// The control thread and the admin thread only, never a worker.
#[allow(clippy::disallowed_types)]
type Lock<T> = std::sync::Mutex<T>;

/// The control-plane connection as the admin socket shows it.
#[derive(Debug, Default)]
pub struct Status {
    inner: Lock<Inner>,
}

#[derive(Debug, Default, Clone)]
struct Inner {
    server: Option<String>,
    connected: bool,
    connects: u64,
    last_error: Option<String>,
    last_update: Option<Instant>,
    types: BTreeMap<&'static str, TypeStatus>,
}

/// One resource type's state.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct TypeStatus {
    /// The version last accepted ("" before the first).
    pub version: String,
    /// Resources of this type in the running config.
    pub resources: usize,
    pub accepted: u64,
    pub rejected: u64,
    /// Why the last refused push was refused.
    pub last_rejection: Option<String>,
}

/// A copy of [`Status`] for the admin socket.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    pub configured: bool,
    pub server: Option<String>,
    pub connected: bool,
    /// Streams opened since start (1 after the first connect).
    pub connects: u64,
    pub last_error: Option<String>,
    /// Seconds since the last push was accepted (None: none yet).
    pub seconds_since_update: Option<f64>,
    pub types: BTreeMap<&'static str, TypeStatus>,
}

impl Status {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        f(&mut self.inner.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn configure(&self, server: &str) {
        self.with(|i| i.server = Some(server.to_string()));
    }

    pub fn connected(&self, up: bool, error: Option<String>) {
        self.with(|i| {
            if up && !i.connected {
                i.connects += 1;
            }
            i.connected = up;
            if error.is_some() {
                i.last_error = error;
            }
        });
    }

    pub fn accepted(&self, kind: &'static str, version: &str, resources: usize) {
        self.with(|i| {
            let t = i.types.entry(kind).or_default();
            t.version = version.to_string();
            t.resources = resources;
            t.accepted += 1;
            i.last_update = Some(Instant::now());
        });
    }

    pub fn rejected(&self, kind: &'static str, why: &str) {
        self.with(|i| {
            let t = i.types.entry(kind).or_default();
            t.rejected += 1;
            t.last_rejection = Some(why.to_string());
        });
    }

    pub fn report(&self) -> Report {
        self.with(|i| Report {
            configured: i.server.is_some(),
            server: i.server.clone(),
            connected: i.connected,
            connects: i.connects,
            last_error: i.last_error.clone(),
            seconds_since_update: i.last_update.map(|t| t.elapsed().as_secs_f64()),
            types: i.types.clone(),
        })
    }
}
