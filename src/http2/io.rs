//! A bridge from monoio's completion-based streams to the poll-based
//! `AsyncRead`/`AsyncWrite` that the upstream `h2` crate drives.
//!
//! Why our own bridge and not monoio's `poll-io`: poll-io sockets are
//! served through an epoll descriptor that the io_uring driver arms only
//! when the worker parks (../shared/NOTES.md), and it covers plain TCP
//! only, while the proxy's streams may be TLS (monoio-rustls). This bridge
//! works for any splittable rent-based stream, on either driver, by
//! running one read and one write operation at a time, each owning its
//! half of the stream and its buffer.
//!
//! What must hold (h2 depends on it; monoio-compat's wrapper broke it):
//! - `poll_write` either takes bytes into the bridge's own buffer and says
//!   so at once (`Ready(n)`), or takes none (`Pending`). Bytes it accepted
//!   are written in the order they were accepted, even when h2 sends other
//!   frames before it flushes: a write in flight never holds bytes that a
//!   later `poll_write` call could reorder.
//! - `poll_flush` completes only when every accepted byte was written.
//! - Reads and writes proceed independently: a read waiting for the peer
//!   never blocks a write (h2 must send SETTINGS and WINDOW_UPDATEs while
//!   it waits for frames).
//! - Memory is bounded: [`READ_BUFFER_BYTES`] for reads, and at most
//!   [`WRITE_BUFFER_BYTES`] accepted and not yet written, plus the buffer
//!   of the write in flight.

use std::{
    future::Future,
    io,
    pin::Pin,
    task::{ready, Context, Poll},
};

use monoio::{
    buf::IoBufMut,
    io::{
        AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, OwnedReadHalf, OwnedWriteHalf, Split,
        Splitable,
    },
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes read from the stream per operation: one h2 frame of the default
/// size (16 KiB) plus its header, so a full DATA frame takes one read.
pub const READ_BUFFER_BYTES: usize = 16 * 1024 + 9;
/// Bytes accepted from h2 and not yet handed to a write: past this,
/// `poll_write` waits for the write in flight (back-pressure to h2, and
/// through its flow control to the peer).
pub const WRITE_BUFFER_BYTES: usize = 64 * 1024;

type Op<H> = Pin<Box<dyn Future<Output = (H, io::Result<usize>, Vec<u8>)>>>;

enum ReadState<S> {
    /// No read in flight: the half, and the buffer of the last read with
    /// `data[pos..]` not yet handed to h2.
    Idle {
        half: OwnedReadHalf<S>,
        data: Vec<u8>,
        pos: usize,
    },
    Reading(Op<OwnedReadHalf<S>>),
    /// A read failed or the stream ended: nothing more comes.
    Done,
}

enum WriteState<S: AsyncWriteRent> {
    Idle(OwnedWriteHalf<S>),
    /// `write_all` of a buffer taken from `pending`; gives the buffer back.
    Writing(Op<OwnedWriteHalf<S>>),
    ShuttingDown(Pin<Box<dyn Future<Output = io::Result<()>>>>),
    Failed,
}

/// A rent-based stream as `AsyncRead + AsyncWrite` for h2.
pub struct PollIo<S: AsyncWriteRent> {
    read: ReadState<S>,
    write: WriteState<S>,
    /// Accepted bytes not yet handed to a write.
    pending: Vec<u8>,
    /// The buffer the last write gave back, reused for the next one.
    spare: Vec<u8>,
}

impl<S> PollIo<S>
where
    S: AsyncReadRent + AsyncWriteRent + Split + 'static,
{
    /// Wraps `stream`; `already_read` is what was read from it before (an
    /// HTTP/2 preface read while detecting the protocol, bytes that came
    /// with a TLS handshake): h2 reads it first.
    pub fn new(stream: S, already_read: Vec<u8>) -> Self {
        let (r, w) = stream.into_split();
        let mut data = already_read;
        data.reserve(READ_BUFFER_BYTES.saturating_sub(data.len()));
        Self {
            read: ReadState::Idle {
                half: r,
                data,
                pos: 0,
            },
            write: WriteState::Idle(w),
            pending: Vec::with_capacity(WRITE_BUFFER_BYTES),
            spare: Vec::with_capacity(WRITE_BUFFER_BYTES),
        }
    }

    /// Drives the write in flight, if any; when it is done and bytes are
    /// pending, starts the next. Ready once nothing is in flight.
    fn poll_write_side(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match &mut self.write {
                WriteState::Writing(op) => {
                    let (half, result, mut buf) = ready!(op.as_mut().poll(cx));
                    buf.clear();
                    self.spare = buf;
                    match result {
                        Ok(_) => self.write = WriteState::Idle(half),
                        Err(e) => {
                            self.write = WriteState::Failed;
                            return Poll::Ready(Err(e));
                        }
                    }
                }
                WriteState::Idle(_) if self.pending.is_empty() => return Poll::Ready(Ok(())),
                WriteState::Idle(_) => {
                    let WriteState::Idle(mut half) =
                        std::mem::replace(&mut self.write, WriteState::Failed)
                    else {
                        unreachable!("matched Idle above");
                    };
                    let buf = std::mem::replace(&mut self.pending, std::mem::take(&mut self.spare));
                    self.write = WriteState::Writing(Box::pin(async move {
                        let (result, buf) = half.write_all(buf).await;
                        (half, result, buf)
                    }));
                }
                WriteState::ShuttingDown(_) | WriteState::Failed => {
                    return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()))
                }
            }
        }
    }
}

impl<S> AsyncRead for PollIo<S>
where
    S: AsyncReadRent + AsyncWriteRent + Split + 'static,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            match &mut self.read {
                ReadState::Idle { data, pos, .. } if *pos < data.len() => {
                    let n = (data.len() - *pos).min(out.remaining());
                    out.put_slice(&data[*pos..*pos + n]);
                    *pos += n;
                    return Poll::Ready(Ok(()));
                }
                ReadState::Idle { .. } => {
                    let ReadState::Idle {
                        mut half, mut data, ..
                    } = std::mem::replace(&mut self.read, ReadState::Done)
                    else {
                        unreachable!("matched Idle above");
                    };
                    data.clear();
                    self.read = ReadState::Reading(Box::pin(async move {
                        let (result, slice) = half.read(data.slice_mut(0..READ_BUFFER_BYTES)).await;
                        (half, result, slice.into_inner())
                    }));
                }
                ReadState::Reading(op) => {
                    let (half, result, data) = ready!(op.as_mut().poll(cx));
                    match result {
                        Ok(0) => {
                            self.read = ReadState::Done;
                            return Poll::Ready(Ok(()));
                        }
                        Ok(_) => self.read = ReadState::Idle { half, data, pos: 0 },
                        Err(e) => {
                            self.read = ReadState::Done;
                            return Poll::Ready(Err(e));
                        }
                    }
                }
                // EOF (or an error already reported): reads return nothing.
                ReadState::Done => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl<S> AsyncWrite for PollIo<S>
where
    S: AsyncReadRent + AsyncWriteRent + Split + 'static,
{
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.pending.len() >= WRITE_BUFFER_BYTES {
            // Full: make room by finishing the write in flight and starting
            // one with what is pending.
            if let Poll::Ready(Err(e)) = self.poll_write_side(cx) {
                return Poll::Ready(Err(e));
            }
            if self.pending.len() >= WRITE_BUFFER_BYTES {
                // The write in flight wakes us when it is done.
                return Poll::Pending;
            }
        }
        let n = bytes.len().min(WRITE_BUFFER_BYTES - self.pending.len());
        self.pending.extend_from_slice(&bytes[..n]);
        // Start writing now rather than at the next flush (h2 flushes, but
        // an early start overlaps the write with h2's work); a write in
        // flight keeps its bytes, and these wait their turn.
        if let Poll::Ready(Err(e)) = self.poll_write_side(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Ready only when nothing is pending and nothing is in flight.
        loop {
            ready!(self.poll_write_side(cx))?;
            if self.pending.is_empty() {
                return Poll::Ready(Ok(()));
            }
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !matches!(self.write, WriteState::ShuttingDown(_)) {
            ready!(self.as_mut().poll_flush(cx))?;
            let WriteState::Idle(mut half) = std::mem::replace(&mut self.write, WriteState::Failed)
            else {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            };
            self.write = WriteState::ShuttingDown(Box::pin(async move { half.shutdown().await }));
        }
        let WriteState::ShuttingDown(op) = &mut self.write else {
            unreachable!("set just above");
        };
        let result = ready!(op.as_mut().poll(cx));
        self.write = WriteState::Failed;
        // The peer closed first: there is nothing left to shut down.
        Poll::Ready(match result {
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            other => other,
        })
    }
}
