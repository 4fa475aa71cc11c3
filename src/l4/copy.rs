//! Moving bytes both ways between two sockets, with half-close.
//!
//! Two paths, chosen per listener:
//! - buffered: read into a pooled buffer, write that same buffer out. One
//!   user-space landing per chunk, no extra copy, buffers reused per core.
//! - splice: socket → pipe → socket with splice(2), no user-space copy.
//!
//! `auto` (the default) picks per driver, from `pilotfish-bench l4` on these
//! machines: on epoll, splice moved bytes as fast as buffered for ~0.4x the
//! worker CPU per GiB; on io_uring, socket splice is punted to kernel
//! io-wq threads and was no faster nor cheaper than buffered, so buffered.
//!
//! What must hold: when one side sends FIN, the other side's write half is
//! shut down and the opposite direction keeps flowing until its own FIN; the
//! first error in either direction ends both.

use std::{cell::Cell, io};

use monoio::{
    io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Split, Splitable},
    net::TcpStream,
};

use crate::{
    config::{limits::SPLICE_CHUNK_BYTES, CopyMode},
    metrics,
    tls::stream::Stream,
    worker::{Driver, Worker},
};

/// One connection's copy progress: moves (for the idle timer) and bytes
/// each way (for its golden metrics), beside the worker's totals.
#[derive(Debug, Default)]
pub struct Tally {
    pub activity: Cell<u64>,
    /// Client → upstream.
    pub up: Cell<u64>,
    /// Upstream → client.
    pub down: Cell<u64>,
}

/// Copies client ↔ upstream until both directions saw FIN, or one failed.
/// A TLS side always copies through buffers: its bytes must pass through
/// rustls, so neither splice nor the plain path applies.
pub async fn both_ways(
    worker: &Worker,
    mode: CopyMode,
    client: Stream,
    upstream: Stream,
    tally: &Tally,
) -> io::Result<()> {
    match (client, upstream) {
        (Stream::Plain(c), Stream::Plain(u)) => plain(worker, mode, c, u, tally).await,
        (client, upstream) => buffered_pair(worker, client, upstream, tally).await,
    }
}

/// Both directions through pooled buffers, each until its FIN.
async fn buffered_pair<A, B>(
    worker: &Worker,
    client: A,
    upstream: B,
    tally: &Tally,
) -> io::Result<()>
where
    A: AsyncReadRent + AsyncWriteRent + Split,
    B: AsyncReadRent + AsyncWriteRent + Split,
{
    let (mut client_r, mut client_w) = client.into_split();
    let (mut upstream_r, mut upstream_w) = upstream.into_split();
    let counters = &worker.counters;
    let up = &counters.bytes_downstream_to_upstream;
    let down = &counters.bytes_upstream_to_downstream;
    futures_util::future::try_join(
        buffered(
            worker,
            &mut client_r,
            &mut upstream_w,
            [up, &tally.up],
            &tally.activity,
        ),
        buffered(
            worker,
            &mut upstream_r,
            &mut client_w,
            [down, &tally.down],
            &tally.activity,
        ),
    )
    .await?;
    Ok(())
}

/// Both sides plain TCP: buffered or splice, as `mode` resolves.
async fn plain(
    worker: &Worker,
    mode: CopyMode,
    client: TcpStream,
    upstream: TcpStream,
    tally: &Tally,
) -> io::Result<()> {
    if !matches!(resolve(mode, worker.driver), CopyMode::Splice) {
        return buffered_pair(worker, client, upstream, tally).await;
    }
    let (mut client_r, mut client_w) = client.into_split();
    let (mut upstream_r, mut upstream_w) = upstream.into_split();
    let counters = &worker.counters;
    futures_util::future::try_join(
        splice(
            &mut client_r,
            &mut upstream_w,
            [&counters.bytes_downstream_to_upstream, &tally.up],
            &tally.activity,
        ),
        splice(
            &mut upstream_r,
            &mut client_w,
            [&counters.bytes_upstream_to_downstream, &tally.down],
            &tally.activity,
        ),
    )
    .await?;
    Ok(())
}

/// The concrete path for `mode` on a worker running `driver`.
pub fn resolve(mode: CopyMode, driver: Driver) -> CopyMode {
    match (mode, driver) {
        (CopyMode::Auto, Driver::Epoll) => CopyMode::Splice,
        (CopyMode::Auto, Driver::IoUring) => CopyMode::Buffered,
        (explicit, _) => explicit,
    }
}

/// One direction through a pooled buffer; shuts down `to` on EOF.
async fn buffered<R, W>(
    worker: &Worker,
    from: &mut R,
    to: &mut W,
    bytes: [&Cell<u64>; 2],
    activity: &Cell<u64>,
) -> io::Result<()>
where
    R: AsyncReadRent,
    W: AsyncWriteRent,
{
    let mut buf = worker.buffers.take();
    let result = loop {
        let (read, b) = from.read(buf).await;
        buf = b;
        let n = match read {
            Ok(0) => break to.shutdown().await,
            Ok(n) => n,
            Err(e) => break Err(e),
        };
        let (written, b) = to.write_all(buf).await;
        buf = b;
        if let Err(e) = written {
            break Err(e);
        }
        buf.clear();
        for b in bytes {
            metrics::add(b, n as u64);
        }
        activity.set(activity.get().wrapping_add(1));
    };
    worker.buffers.give(buf);
    result
}

/// One direction through a pipe with splice(2); shuts down `to` on EOF.
async fn splice<R, W>(
    from: &mut R,
    to: &mut W,
    bytes: [&Cell<u64>; 2],
    activity: &Cell<u64>,
) -> io::Result<()>
where
    R: monoio::io::as_fd::AsReadFd,
    W: monoio::io::as_fd::AsWriteFd + AsyncWriteRent,
{
    use monoio::io::splice::{SpliceDestination, SpliceSource};
    let (mut pipe_r, mut pipe_w) = monoio::net::unix::new_pipe()?;
    loop {
        let n = from.splice_to_pipe(&mut pipe_w, SPLICE_CHUNK_BYTES).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        // Drain the pipe fully before the next fill, so it never holds more
        // than one chunk and the read side never blocks on a full pipe.
        let mut left = n;
        while left > 0 {
            let sent = to.splice_from_pipe(&mut pipe_r, left).await?;
            if sent == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            left -= sent;
        }
        for b in bytes {
            metrics::add(b, u64::from(n));
        }
        activity.set(activity.get().wrapping_add(1));
    }
}
