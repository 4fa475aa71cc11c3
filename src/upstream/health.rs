//! Active HTTP health checks for one cluster, run by each worker.
//!
//! Every `interval`, each endpoint gets `GET path` on a fresh connection
//! (`Connection: close`); a 2xx within `timeout` is a pass, anything else a
//! failure. `healthy_threshold` passes in a row mark it healthy,
//! `unhealthy_threshold` failures in a row unhealthy. Each worker checks on
//! its own (shared-nothing: no verdicts cross cores), so a cluster sees
//! `workers` checks per interval. A cluster with `tls` is checked over
//! mTLS, as its requests are: a check that skipped the handshake would
//! call healthy an endpoint that no request can reach.

use std::{rc::Rc, time::Duration};

use monoio::{
    io::{AsyncReadRent, AsyncWriteRentExt},
    net::TcpStream,
};

use super::ClusterState;
use crate::{
    config::{http::HealthCheck, limits::HEALTH_CHECK_RESPONSE_BYTES_MAX},
    http1::{head::RequestKind, HeadLimits, ResponseParser},
    metrics::{self, Counters},
    tls::{per_worker::WorkerTls, stream::Stream},
    worker::gate::Trigger,
};

/// Checks `cluster`'s endpoints until `stop` fires.
pub async fn run(
    cluster: Rc<ClusterState>,
    check: HealthCheck,
    counters: Rc<Counters>,
    tls: Rc<WorkerTls>,
    stop: Trigger,
) {
    loop {
        for (i, e) in cluster.endpoints.iter().enumerate() {
            let passed = monoio::select! {
                r = probe(e.addr, &check.path, check.timeout, &cluster, &counters, &tls) => r,
                _ = stop.wait() => return,
            };
            metrics::add(
                if passed {
                    &counters.http.health_checks_ok
                } else {
                    &counters.http.health_checks_failed
                },
                1,
            );
            apply(&cluster, i, passed, &check);
        }
        monoio::select! {
            _ = monoio::time::sleep(check.interval) => {}
            _ = stop.wait() => return,
        }
    }
}

/// Folds one result into the endpoint's streak and verdict.
pub fn apply(cluster: &ClusterState, endpoint: usize, passed: bool, check: &HealthCheck) {
    let e = &cluster.endpoints[endpoint];
    let streak = e.check_streak.get();
    let streak = match (passed, streak >= 0) {
        (true, true) => streak.saturating_add(1),
        (true, false) => 1,
        (false, true) => -1,
        (false, false) => streak.saturating_sub(1),
    };
    e.check_streak.set(streak);
    if e.healthy.get() && -streak >= check.unhealthy_threshold as i32 {
        e.healthy.set(false);
        tracing::warn!(cluster = %cluster.name, endpoint = %e.addr, "endpoint unhealthy");
    } else if !e.healthy.get() && streak >= check.healthy_threshold as i32 {
        e.healthy.set(true);
        tracing::info!(cluster = %cluster.name, endpoint = %e.addr, "endpoint healthy again");
    }
}

async fn probe(
    addr: std::net::SocketAddr,
    path: &str,
    timeout: Duration,
    cluster: &ClusterState,
    counters: &Counters,
    tls: &WorkerTls,
) -> bool {
    let once = async {
        let tcp = TcpStream::connect_addr(addr).await.ok()?;
        let stream = match &cluster.source.tls {
            None => Stream::Plain(tcp),
            Some(settings) => {
                tls.connect(
                    &counters.tls,
                    settings,
                    crate::tls::per_worker::Alpn::Http1,
                    tcp,
                    timeout,
                )
                .await
                .ok()?
                .0
            }
        };
        probe_once(stream, addr, path).await
    };
    matches!(
        monoio::time::timeout(timeout, once).await,
        Ok(Some(status)) if (200..300).contains(&status)
    )
}

async fn probe_once(mut stream: Stream, addr: std::net::SocketAddr, path: &str) -> Option<u16> {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: pilotfish-health-check\r\nConnection: close\r\n\r\n"
    );
    let (written, _) = stream.write_all(request.into_bytes()).await;
    written.ok()?;
    let mut parser = ResponseParser::new(HeadLimits {
        head_bytes: HEALTH_CHECK_RESPONSE_BYTES_MAX,
        ..HeadLimits::default()
    });
    let mut buf = Vec::with_capacity(HEALTH_CHECK_RESPONSE_BYTES_MAX);
    loop {
        let len = buf.len();
        if len == buf.capacity() {
            return None;
        }
        let (read, slice) = stream
            .read(monoio::buf::IoBufMut::slice_mut(buf, len..))
            .await;
        buf = slice.into_inner();
        if read.ok()? == 0 {
            return None;
        }
        if let Some((head, _)) = parser.parse(&buf, RequestKind::Other).ok()? {
            return Some(head.status);
        }
    }
}
