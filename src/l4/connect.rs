//! Upstream connect: round robin, per-attempt timeout, bounded retries.

use std::{net::SocketAddr, time::Duration};

use monoio::net::TcpStream;

use crate::{
    metrics::{self, histograms},
    worker::Worker,
};

/// Connects to the next endpoint of `cluster`, trying further endpoints on
/// failure, at most `connect_attempts` times in all.
pub async fn connect(worker: &Worker, cluster: usize) -> Option<(TcpStream, SocketAddr)> {
    let config = &worker.config.clusters[cluster];
    for attempt in 1..=config.connect_attempts {
        let endpoint = config.endpoints[worker.clusters[cluster].next_round_robin()];
        let started = std::time::Instant::now();
        match attempt_one(endpoint, config.connect_timeout).await {
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
}

async fn attempt_one(endpoint: SocketAddr, timeout: Duration) -> Result<TcpStream, Failure> {
    match monoio::time::timeout(timeout, TcpStream::connect_addr(endpoint)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(Failure::Io(e)),
        Err(_) => Err(Failure::TimedOut),
    }
}
