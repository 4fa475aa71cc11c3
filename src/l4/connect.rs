//! Upstream connect: round robin, per-attempt timeout, bounded retries;
//! mTLS to the endpoint when the cluster has `tls` (a failed handshake is
//! a failed attempt: the next endpoint is tried).

use std::{net::SocketAddr, time::Duration};

use monoio::net::TcpStream;

use crate::{
    metrics::{self, histograms},
    tls::{per_worker::Alpn, stream::Stream},
    worker::Worker,
};

/// Connects to the next endpoint of `cluster`, trying further endpoints on
/// failure, at most `connect_attempts` times in all.
pub async fn connect(worker: &Worker, cluster: usize) -> Option<(Stream, SocketAddr)> {
    let config = &worker.config.clusters[cluster];
    if config.endpoints.is_empty() {
        // Scaled to zero, or its endpoints have not arrived (xDS): nothing
        // to try, and the caller closes the client's connection.
        metrics::add(&worker.counters.connect_failures, 1);
        tracing::debug!(cluster = %config.name, "no endpoints");
        return None;
    }
    for attempt in 1..=config.connect_attempts {
        let endpoint = config.endpoints[worker.clusters[cluster].next_round_robin()];
        let started = std::time::Instant::now();
        match attempt_one(worker, cluster, endpoint, config.connect_timeout).await {
            Ok(stream) => {
                histograms::record(
                    &worker.clusters[cluster].connect_histogram,
                    started.elapsed(),
                );
                return Some((stream, endpoint));
            }
            Err(failure) => {
                metrics::add(&worker.counters.connect_failures, 1);
                if matches!(failure, Failure::TimedOut) {
                    metrics::add(&worker.counters.connect_timeouts, 1);
                }
                tracing::debug!(cluster = %config.name, %endpoint, attempt, ?failure, "connect failed");
            }
        }
    }
    None
}

#[derive(Debug)]
enum Failure {
    TimedOut,
    #[allow(dead_code)] // read through Debug in the log line
    Io(std::io::Error),
    #[allow(dead_code)] // read through Debug in the log line
    Tls(String),
}

async fn attempt_one(
    worker: &Worker,
    cluster: usize,
    endpoint: SocketAddr,
    timeout: Duration,
) -> Result<Stream, Failure> {
    let tcp = match monoio::time::timeout(timeout, TcpStream::connect_addr(endpoint)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(Failure::Io(e)),
        Err(_) => return Err(Failure::TimedOut),
    };
    // Small writes are the proxied application's business, not ours to delay.
    let _ = tcp.set_nodelay(true);
    let Some(tls) = &worker.config.clusters[cluster].tls else {
        return Ok(Stream::Plain(tcp));
    };
    worker
        .tls
        .connect(&worker.counters.tls, tls, Alpn::None, tcp, timeout)
        .await
        .map(|(stream, _)| stream)
        .map_err(Failure::Tls)
}
