//! Moving bytes both ways between two sockets, with half-close.
//!
//! Paths, chosen per listener:
//! - buffered: read into a pooled buffer, write that same buffer out. One
//!   user-space landing per chunk, no extra copy, buffers reused per core.
//! - splice: socket → pipe → socket with non-blocking splice(2) on the
//!   worker thread, no user-space copy. On epoll through monoio's splice;
//!   on io_uring by calling splice(2) directly and waiting for readiness
//!   (an io_uring poll) only when it would block.
//! - splice as io_uring operations (`splice_io_uring`): kept to compare;
//!   the kernel punts socket splices to its io-wq threads.
//!
//! `auto` (the default) is splice on both drivers, from `pilotfish-bench
//! l4` on these machines (2026-12-03, 512 MiB x 5 rounds): on io_uring,
//! splice on the worker moved 11.2 Gbit/s at 0.34 s of CPU per GiB,
//! against 11.8 Gbit/s at 0.52 s buffered and 9.4 Gbit/s at 0.46 s as
//! io_uring operations; epoll splice cost the same 0.34 s per GiB.
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
    match resolve(mode, worker.driver) {
        CopyMode::Splice if worker.driver == Driver::IoUring => {
            return splice_pair_on_worker(worker, client, upstream, tally).await;
        }
        CopyMode::Splice | CopyMode::SpliceIoUring => {}
        CopyMode::Buffered | CopyMode::Auto => {
            return buffered_pair(worker, client, upstream, tally).await;
        }
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
        (CopyMode::Auto, _) => CopyMode::Splice,
        // Splice as io_uring operations needs io_uring.
        (CopyMode::SpliceIoUring, Driver::Epoll) => CopyMode::Splice,
        (explicit, _) => explicit,
    }
}

/// Both directions with splice(2) called on the worker thread, on an
/// io_uring worker: non-blocking sockets and pipes, and a readiness wait
/// (an io_uring poll) only when a call would block. io_uring's own splice
/// operation on a socket is handed to kernel worker threads (io-wq),
/// which cost more CPU per GiB than copying through a buffer; a
/// non-blocking splice on the worker moves the same bytes in the calling
/// thread, as the epoll driver does.
async fn splice_pair_on_worker(
    worker: &Worker,
    client: TcpStream,
    upstream: TcpStream,
    tally: &Tally,
) -> io::Result<()> {
    for s in [&client, &upstream] {
        set_nonblocking(s)?;
    }
    let counters = &worker.counters;
    futures_util::future::try_join(
        splice_on_worker(
            &client,
            &upstream,
            [&counters.bytes_downstream_to_upstream, &tally.up],
            &tally.activity,
        ),
        splice_on_worker(
            &upstream,
            &client,
            [&counters.bytes_upstream_to_downstream, &tally.down],
            &tally.activity,
        ),
    )
    .await?;
    Ok(())
}

/// One direction of [`splice_pair_on_worker`]; shuts down `to`'s write
/// side on EOF.
async fn splice_on_worker(
    from: &TcpStream,
    to: &TcpStream,
    bytes: [&Cell<u64>; 2],
    activity: &Cell<u64>,
) -> io::Result<()> {
    use rustix::pipe::{pipe_with, splice, PipeFlags, SpliceFlags};
    let (pipe_r, pipe_w) = pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
    let flags = SpliceFlags::NONBLOCK | SpliceFlags::MOVE;
    loop {
        let n = loop {
            match splice(
                fd_of(from),
                None,
                &pipe_w,
                None,
                SPLICE_CHUNK_BYTES as usize,
                flags,
            ) {
                Ok(n) => break n,
                Err(rustix::io::Errno::AGAIN) => from.readable(false).await?,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        };
        if n == 0 {
            rustix::net::shutdown(fd_of(to), rustix::net::Shutdown::Write)?;
            return Ok(());
        }
        // Drain the pipe fully before the next fill, so it never holds more
        // than one chunk and the read side never blocks on a full pipe.
        let mut left = n;
        while left > 0 {
            match splice(&pipe_r, None, fd_of(to), None, left, flags) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(sent) => left -= sent,
                Err(rustix::io::Errno::AGAIN) => to.writable(false).await?,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        for b in bytes {
            metrics::add(b, n as u64);
        }
        activity.set(activity.get().wrapping_add(1));
    }
}

/// The descriptor of a socket, borrowed for as long as the socket.
#[allow(unsafe_code)]
fn fd_of(s: &TcpStream) -> std::os::fd::BorrowedFd<'_> {
    use std::os::fd::AsRawFd;
    // SAFETY: the socket owns its descriptor and outlives the borrow
    // (monoio's TcpStream has AsRawFd but not AsFd).
    unsafe { std::os::fd::BorrowedFd::borrow_raw(s.as_raw_fd()) }
}

/// Sets O_NONBLOCK on a socket (io_uring's accept and connect give
/// blocking ones), so that splice(2) on it returns EAGAIN instead of
/// blocking the worker.
fn set_nonblocking(s: &TcpStream) -> io::Result<()> {
    let fd = fd_of(s);
    let flags = rustix::fs::fcntl_getfl(fd)?;
    rustix::fs::fcntl_setfl(fd, flags | rustix::fs::OFlags::NONBLOCK)?;
    Ok(())
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
