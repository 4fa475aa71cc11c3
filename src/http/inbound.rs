//! A connection's read side: one owned buffer, filled by the kernel,
//! parsed in place, and written out from the same memory.
//!
//! What must hold: bytes are consumed in order; unconsumed bytes (a
//! pipelined request, the start of a body) stay for the next reader; the
//! buffer never grows past the limit it is given; every read, and every
//! write from the buffer, is bounded in time, by one timer per buffer
//! that is reset for each operation rather than made anew ([`within`]).

use std::{future::Future, io, pin::Pin, task::Poll, time::Duration};

use monoio::{
    buf::{IoBuf, IoBufMut},
    io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, CancelableAsyncReadRent, Canceller},
    net::TcpStream,
};

#[derive(Debug)]
pub struct Inbound {
    buf: Vec<u8>,
    start: usize,
    /// The last read filled all the space it had: more is likely waiting
    /// (a streamed body), so a larger buffer would save reads.
    saturated: bool,
    /// Bounds this buffer's reads and writes (made at the first one; an
    /// operation at a time, since each takes `&mut self`).
    timer: Timer,
}

/// One timer, reused: see [`within`].
pub type Timer = Option<Pin<Box<monoio::time::Sleep>>>;

/// Runs `f` for at most `limit`, on `timer` (made on first use, then reset
/// for each operation). A timer reset to a later deadline keeps its place
/// in the wheel (monoio moves it only when the old deadline comes round),
/// so a busy connection pays about one wheel insert per idle period
/// instead of an insert and a removal per operation, and no timer entry
/// (128-byte aligned) is built into and copied with each operation's
/// future. Err(()) when the time ran out; `f` is then dropped, as
/// `monoio::time::timeout` would drop it.
pub async fn within<F: Future>(timer: &mut Timer, limit: Duration, f: F) -> Result<F::Output, ()> {
    let deadline = monoio::time::Instant::now() + limit;
    let sleep = match timer {
        Some(t) => {
            t.as_mut().reset(deadline);
            t
        }
        None => timer.insert(Box::pin(monoio::time::sleep_until(deadline))),
    };
    let mut f = std::pin::pin!(f);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = f.as_mut().poll(cx) {
            return Poll::Ready(Ok(v));
        }
        sleep.as_mut().poll(cx).map(|()| Err(()))
    })
    .await
}

/// The error a cancelled monoio operation ends with.
fn libc_ecanceled() -> i32 {
    rustix::io::Errno::CANCELED.raw_os_error()
}

/// Errors of a timed read or write.
pub fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "idle timeout")
}

impl Inbound {
    pub fn new(buf: Vec<u8>) -> Self {
        Self {
            buf,
            start: 0,
            saturated: false,
            timer: None,
        }
    }

    /// Whether the last read filled all the space it was given.
    pub fn saturated(&self) -> bool {
        self.saturated
    }

    /// Grows the buffer's capacity to `cap` (never shrinks it).
    pub fn reserve_to(&mut self, cap: usize) {
        if self.buf.capacity() < cap {
            self.buf.reserve_exact(cap - self.buf.len());
        }
    }

    /// Unconsumed bytes.
    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.buf.len()
    }

    pub fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.buf.len() - self.start);
        self.start += n;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
    }

    /// A buffer with a timer to reuse (see [`within`]).
    pub fn with_timer(buf: Vec<u8>, timer: Timer) -> Self {
        Self {
            timer,
            ..Self::new(buf)
        }
    }

    /// The buffer (empty) and the timer, for the worker's pool.
    pub fn into_parts(self) -> (Vec<u8>, Timer) {
        let timer = self.timer;
        let mut buf = self.buf;
        buf.clear();
        (buf, timer)
    }

    /// Gives the buffer back (for the worker's pool), empty.
    pub fn into_buffer(mut self) -> Vec<u8> {
        self.buf.clear();
        self.buf
    }

    /// Reads more bytes, growing the buffer up to `max` total if it is
    /// full. Returns the count read (0: EOF). Times out after `idle`.
    pub async fn fill<R: AsyncReadRent>(
        &mut self,
        r: &mut R,
        max: usize,
        idle: Duration,
    ) -> io::Result<usize> {
        self.make_room(max)?;
        let len = self.buf.len();
        let space = self.buf.capacity() - len;
        let buf = std::mem::take(&mut self.buf);
        let (read, slice) = within(&mut self.timer, idle, r.read(buf.slice_mut(len..)))
            .await
            .map_err(|()| timed_out())?;
        self.buf = slice.into_inner();
        self.saturated = matches!(read, Ok(n) if n == space);
        read
    }

    /// Makes room to read into, growing the buffer up to `max` in all.
    fn make_room(&mut self, max: usize) -> io::Result<()> {
        if self.start > 0 && self.buf.len() == self.buf.capacity() {
            // Move the unconsumed tail to the front: usually a few bytes
            // of a pipelined request.
            self.buf.drain(..self.start);
            self.start = 0;
        }
        if self.buf.len() == self.buf.capacity() {
            if self.buf.capacity() >= max {
                return Err(io::Error::other("buffer limit reached"));
            }
            let grow = self.buf.capacity().max(1024).min(max - self.buf.capacity());
            self.buf.reserve_exact(grow);
        }
        Ok(())
    }

    /// Like [`Inbound::fill`], but gives up once `park_after` passes with
    /// nothing read: Ok(None), and the buffer is gone (the caller parks).
    /// On io_uring (`canceller` given) the read is cancelled and then
    /// awaited, so bytes that arrived as it was cancelled are kept, never
    /// dropped (dropping an io_uring read in flight would lose them). On
    /// epoll a read happens only when its future is polled, so a dropped
    /// one took nothing, and it needs no canceller. The caller bounds the
    /// wait as a whole.
    pub async fn fill_or_park(
        &mut self,
        tcp: &mut TcpStream,
        max: usize,
        park_after: Duration,
        canceller: Option<&mut Canceller>,
    ) -> io::Result<Option<usize>> {
        self.make_room(max)?;
        let len = self.buf.len();
        let space = self.buf.capacity() - len;
        let buf = std::mem::take(&mut self.buf);
        let Some(canceller) = canceller else {
            let Ok((read, slice)) =
                within(&mut self.timer, park_after, tcp.read(buf.slice_mut(len..))).await
            else {
                return Ok(None);
            };
            self.buf = slice.into_inner();
            self.saturated = matches!(read, Ok(n) if n == space);
            return read.map(Some);
        };
        let read = tcp.cancelable_read(buf.slice_mut(len..), canceller.handle());
        let mut read = std::pin::pin!(read);
        let (read, slice) = match within(&mut self.timer, park_after, read.as_mut()).await {
            Ok(done) => done,
            Err(_) => {
                // A canceller serves once; the next burst makes a new one.
                std::mem::take(canceller).cancel();
                read.await
            }
        };
        self.buf = slice.into_inner();
        match read {
            Err(e) if e.raw_os_error() == Some(libc_ecanceled()) => Ok(None),
            read => {
                self.saturated = matches!(read, Ok(n) if n == space);
                read.map(Some)
            }
        }
    }

    /// Writes all of `out` to `w`, bounded by this buffer's timer: for a
    /// write on the stream this buffer reads, while no read of it is in
    /// flight (`&mut self` holds that), such as a request head sent
    /// before its response is read.
    pub async fn write_all_on_timer<W: AsyncWriteRent>(
        &mut self,
        w: &mut W,
        out: Vec<u8>,
        idle: Duration,
    ) -> (io::Result<()>, Vec<u8>) {
        write_all_within(&mut self.timer, w, out, idle).await
    }

    /// Writes the first `n` unconsumed bytes to `w` straight from this
    /// buffer (no copy), then consumes them.
    pub async fn write_to<W: AsyncWriteRent>(
        &mut self,
        w: &mut W,
        n: usize,
        idle: Duration,
    ) -> io::Result<()> {
        let (start, end) = (self.start, self.start + n);
        let buf = std::mem::take(&mut self.buf);
        let (written, slice) = within(&mut self.timer, idle, w.write_all(buf.slice(start..end)))
            .await
            .map_err(|()| timed_out())?;
        self.buf = slice.into_inner();
        written?;
        self.consume(n);
        Ok(())
    }
}

/// [`write_all_timed`] on a reused timer (see [`within`]).
pub async fn write_all_within<W: AsyncWriteRent>(
    timer: &mut Timer,
    w: &mut W,
    out: Vec<u8>,
    idle: Duration,
) -> (io::Result<()>, Vec<u8>) {
    match within(timer, idle, w.write_all(out)).await {
        Ok((r, buf)) => (r.map(|_| ()), buf),
        Err(()) => (Err(timed_out()), Vec::new()),
    }
}

/// Writes all of `out` with a timeout, handing the buffer back.
pub async fn write_all_timed<W: AsyncWriteRent>(
    w: &mut W,
    out: Vec<u8>,
    idle: Duration,
) -> (io::Result<()>, Vec<u8>) {
    match monoio::time::timeout(idle, w.write_all(out)).await {
        Ok((r, buf)) => (r.map(|_| ()), buf),
        Err(_) => (Err(timed_out()), Vec::new()),
    }
}

/// Lingering close (RFC 9112 §9.6): stops writing, then reads and
/// discards what the peer still sends, for at most `time` and `bytes_max`
/// bytes, so that closing with unread bytes does not reset the connection
/// and destroy the answer before the peer read it. Reads into `buf` (its
/// capacity) and gives it back (empty if the time ran out mid-read).
pub async fn linger<S: AsyncReadRent + AsyncWriteRent>(
    stream: &mut S,
    mut buf: Vec<u8>,
    time: Duration,
    bytes_max: usize,
) -> Vec<u8> {
    buf.clear();
    if buf.capacity() == 0 {
        buf.reserve(4096);
    }
    let discard = async {
        if stream.shutdown().await.is_err() {
            return buf;
        }
        let mut seen = 0;
        while seen < bytes_max {
            let (read, back) = stream.read(buf).await;
            buf = back;
            buf.clear();
            match read {
                Ok(n) if n > 0 => seen += n,
                _ => break,
            }
        }
        buf
    };
    monoio::time::timeout(time, discard)
        .await
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One timer serves operation after operation: a later deadline, an
    /// earlier one, after it fired, and after a pool's no-op poll.
    #[test]
    fn a_reused_timer_bounds_each_operation_afresh() {
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut timer: Timer = None;
            let pending = std::future::pending::<()>;
            assert_eq!(
                within(&mut timer, Duration::from_millis(20), async { 7 }).await,
                Ok(7)
            );
            assert!(timer.is_some(), "made at the first use");
            // Earlier than the deadline it had, and it fires.
            assert_eq!(
                within(&mut timer, Duration::from_millis(5), pending()).await,
                Err(())
            );
            // After firing: a later deadline, and what finishes first wins.
            let quick = monoio::time::sleep(Duration::from_millis(5));
            assert_eq!(
                within(&mut timer, Duration::from_secs(60), quick).await,
                Ok(())
            );
            let mut t = timer.take().unwrap();
            let _ = t
                .as_mut()
                .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()));
            timer = Some(t);
            assert_eq!(
                within(&mut timer, Duration::from_millis(5), pending()).await,
                Err(())
            );
        });
    }
}
