//! L4 (TCP) proxying: accepted client → chosen endpoint, bytes both ways.
//!
//! What must hold: the client is closed promptly when no endpoint accepts
//! within `connect_attempts × connect_timeout`; a FIN in one direction is
//! passed on while the other keeps flowing; an error in either direction
//! closes both; a pair with no bytes moving for `idle_timeout` is closed.

pub mod connect;
pub mod copy;

use std::{cell::Cell, net::SocketAddr, rc::Rc, time::Duration};

use monoio::net::TcpStream;

use crate::{
    config::ListenerKind,
    metrics,
    metrics::golden::LabelsRef,
    tls::{identity, stream::Stream},
    worker::{gate::Slot, Worker},
};

/// Serves one accepted client connection to completion.
///
/// `_slot` is held for the connection's lifetime: it is what bounds
/// connections per worker and what drain waits on.
pub async fn serve(
    worker: Rc<Worker>,
    listener_index: usize,
    client: TcpStream,
    peer: SocketAddr,
    conn_id: u64,
    _slot: Slot,
) {
    let _active = metrics::ActiveGuard::new(&worker.counters.connections_active);
    let accepted = std::time::Instant::now();
    let _duration = DurationGuard {
        worker: &worker,
        listener: listener_index,
        accepted,
    };
    let listener = &worker.config.listeners[listener_index];
    let ListenerKind::Tcp { cluster, copy } = listener.kind else {
        unreachable!("the accept loop sends only tcp listeners here");
    };
    let _ = client.set_nodelay(true);
    let client_tls = listener.tls.is_some();
    let (client, caller_id) = match &listener.tls {
        None => (Stream::Plain(client), None),
        Some(settings) => {
            let tls = &worker.counters.tls;
            let accepted = worker
                .tls
                .accept(tls, settings, false, client, &listener.name, conn_id)
                .await;
            let Some((stream, caller)) = accepted else {
                return;
            };
            if let Some(allow) = &listener.authorize {
                let id = caller.identity.as_ref();
                let allowed = id.is_some_and(|id| identity::allowed(allow, id));
                tls.decision(&listener.name, id.map(|i| i.as_str()), allowed);
                if !allowed {
                    tracing::info!(conn_id, %peer, listener = %listener.name, caller = ?id.map(|i| i.as_str()), "caller not authorized; closing");
                    return;
                }
            }
            (stream, caller.identity)
        }
    };
    let Some((upstream, endpoint)) = connect::connect(&worker, cluster).await else {
        metrics::add(&worker.counters.connections_unrouted, 1);
        tracing::debug!(conn_id, %peer, listener = %listener.name, "no endpoint accepted; closing client");
        return;
    };
    tracing::debug!(conn_id, %peer, %endpoint, "proxying");

    let tally = copy::Tally::default();
    let copied = copy::both_ways(&worker, copy, client, upstream, &tally);
    let outcome = monoio::select! {
        r = copied => Some(r),
        _ = idle(&tally.activity, listener.idle_timeout) => None,
    };
    worker.counters.golden.tcp(
        LabelsRef::of(
            &worker.config,
            listener_index,
            None,
            Some(cluster),
            client_tls,
            caller_id.as_ref().map(|i| i.as_str()),
        ),
        tally.up.get(),
        tally.down.get(),
    );
    match outcome {
        Some(Ok(())) => tracing::debug!(conn_id, "closed cleanly"),
        Some(Err(e)) => tracing::debug!(conn_id, error = %e, "closed on error"),
        None => {
            metrics::add(&worker.counters.idle_timeouts, 1);
            tracing::debug!(conn_id, "idle timeout");
        }
    }
}

/// Records the connection's duration when it ends, however it ends.
struct DurationGuard<'a> {
    worker: &'a Worker,
    listener: usize,
    accepted: std::time::Instant,
}

impl Drop for DurationGuard<'_> {
    fn drop(&mut self) {
        self.worker
            .histograms
            .listener(self.listener, self.accepted.elapsed());
    }
}

/// Completes when `activity` has not moved for a whole `timeout`.
///
/// Checking a counter once per period instead of re-arming a timer on every
/// read keeps the data path free of timer work; the price is precision: an
/// idle pair closes between one and two periods after its last byte.
pub async fn idle(activity: &Cell<u64>, timeout: Duration) {
    loop {
        let seen = activity.get();
        monoio::time::sleep(timeout).await;
        if activity.get() == seen {
            return;
        }
    }
}
