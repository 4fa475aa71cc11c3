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
            .map_err(|()| self.lost())?;
        self.buf = slice.into_inner();
        self.saturated = matches!(read, Ok(n) if n == space);
        read
    }

    /// The buffer went with an operation that timed out (dropped in
    /// flight): nothing unconsumed is left, and `start` must not point
    /// past the empty buffer that replaced it.
    fn lost(&mut self) -> io::Error {
        self.start = 0;
        self.saturated = false;
        timed_out()
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
            .map_err(|()| self.lost())?;
        self.buf = slice.into_inner();
        written?;
        self.consume(n);
        Ok(())
    }

    /// Writes `head` and then the first `n` unconsumed bytes of this
    /// buffer to `w` in one vectored write (a partial write continues
    /// where it stopped), bounded by `timer`, then consumes them; hands
    /// `head` back. The body goes from this buffer to the socket without
    /// being copied behind the head. On a timeout both buffers are gone
    /// (the connection is closed then).
    pub async fn write_after<W: AsyncWriteRent>(
        &mut self,
        timer: &mut Timer,
        w: &mut W,
        head: Vec<u8>,
        n: usize,
        idle: Duration,
    ) -> (io::Result<()>, Vec<u8>) {
        let body = (self.start, self.start + n);
        let mut parts = HeadAndBody::new(head, std::mem::take(&mut self.buf), body);
        let written = within(timer, idle, async {
            while parts.left() > 0 {
                let (r, back) = w.writev(parts).await;
                parts = back;
                match r {
                    Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), parts),
                    Ok(k) => parts.advance(k),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return (Err(e), parts),
                }
            }
            (Ok(()), parts)
        })
        .await;
        let Ok((r, parts)) = written else {
            return (Err(self.lost()), Vec::new());
        };
        let (head, buf) = parts.into_parts();
        self.buf = buf;
        if r.is_ok() {
            self.consume(n);
        }
        (r, head)
    }
}

/// A head and a range of another buffer, as the two parts of one
/// vectored write. The iovecs are boxed: the kernel may read them after
/// the value moved (into the operation's future, or into the driver when
/// a timed-out write is dropped in flight); a box keeps their address.
struct HeadAndBody {
    head: Vec<u8>,
    body: Vec<u8>,
    iov: Box<[libc::iovec; 2]>,
    /// The first iovec with bytes left (a partial write may finish one).
    first: usize,
}

impl HeadAndBody {
    fn new(head: Vec<u8>, body: Vec<u8>, (start, end): (usize, usize)) -> Self {
        // Callers pass a range of unconsumed bytes; clamped all the same,
        // so that no iovec can point outside its buffer.
        let end = end.min(body.len());
        let start = start.min(end);
        let iov = Box::new([
            libc::iovec {
                iov_base: head.as_ptr() as *mut libc::c_void,
                iov_len: head.len(),
            },
            libc::iovec {
                iov_base: body.as_ptr().wrapping_add(start) as *mut libc::c_void,
                iov_len: end - start,
            },
        ]);
        let mut parts = Self {
            head,
            body,
            iov,
            first: 0,
        };
        parts.advance(0);
        parts
    }

    /// Bytes not yet written.
    fn left(&self) -> usize {
        self.iov[self.first..].iter().map(|v| v.iov_len).sum()
    }

    /// Skips `n` written bytes (at most [`Self::left`]).
    fn advance(&mut self, mut n: usize) {
        while self.first < 2 {
            let v = &mut self.iov[self.first];
            let k = n.min(v.iov_len);
            // k <= iov_len: the base stays inside (or at the end of) its buffer.
            v.iov_base = v.iov_base.cast::<u8>().wrapping_add(k).cast();
            v.iov_len -= k;
            n -= k;
            if v.iov_len > 0 {
                break;
            }
            self.first += 1;
        }
        debug_assert_eq!(n, 0, "advanced past the end");
    }

    fn into_parts(self) -> (Vec<u8>, Vec<u8>) {
        (self.head, self.body)
    }
}

// SAFETY: the iovecs point into `head` and `body`, which this value owns
// and never touches while it lives, and sit in a box whose address does
// not change when the value moves; `first` is at most 2 (then none left).
#[allow(unsafe_code)]
unsafe impl monoio::buf::IoVecBuf for HeadAndBody {
    fn read_iovec_ptr(&self) -> *const libc::iovec {
        // first <= 2: at most one past the end of the array.
        self.iov.as_ptr().wrapping_add(self.first)
    }

    fn read_iovec_len(&self) -> usize {
        2 - self.first
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

    /// A read that times out takes the buffer with it; what is left is
    /// an empty buffer with nothing unconsumed, not an offset past its end;
    /// on both drivers (an io_uring read is dropped in flight, an epoll one
    /// never started).
    #[test]
    fn a_timed_out_read_leaves_a_consistent_empty_buffer() {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
            .block_on(timed_out_read());
        // Where io_uring is refused (seccomp), the epoll run above stands.
        if let Ok(mut rt) = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .build()
        {
            rt.block_on(timed_out_read());
        }
    }

    async fn timed_out_read() {
        {
            let listener = monoio::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut buf = Vec::with_capacity(64);
            buf.extend_from_slice(b"GET / HTTP/1.1\r\n\r\nGE");
            let mut inbound = Inbound::new(buf);
            inbound.consume(18);
            assert_eq!(inbound.data(), b"GE");
            let e = inbound
                .fill(&mut conn, 1024, Duration::from_millis(10))
                .await
                .unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::TimedOut);
            assert!(inbound.is_empty() && inbound.data().is_empty());
            drop(peer);
        }
    }

    /// Partial writes resume inside either part, and a part can end
    /// exactly where a write did.
    #[test]
    fn head_and_body_advance_across_both_parts() {
        let body = b"xxbodybytes".to_vec();
        let mut parts = HeadAndBody::new(b"head".to_vec(), body, (2, 11));
        assert_eq!(parts.left(), 13);
        parts.advance(3);
        assert_eq!((parts.first, parts.left()), (0, 10));
        parts.advance(1);
        assert_eq!((parts.first, parts.left()), (1, 9), "head done exactly");
        parts.advance(5);
        assert_eq!(parts.left(), 4);
        let next = parts.iov[1];
        let base = next.iov_base as *const u8;
        assert_eq!(
            base,
            parts.body.as_ptr().wrapping_add(7),
            "resumes mid-body"
        );
        parts.advance(4);
        assert_eq!((parts.first, parts.left()), (2, 0));
        // An empty head is skipped at once; a range is clamped to its buffer.
        let parts = HeadAndBody::new(Vec::new(), b"ab".to_vec(), (1, 9));
        assert_eq!((parts.first, parts.left()), (1, 1));
    }

    /// A head and a body larger than the socket's buffers reach the peer
    /// whole and in order, through many partial vectored writes, on both
    /// drivers; the body's bytes are consumed and what follows them stays.
    #[test]
    fn write_after_sends_the_head_then_the_body_uncopied() {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
            .block_on(write_after_through_a_socket());
        // Where io_uring is refused (seccomp), the epoll run above stands.
        if let Ok(mut rt) = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .build()
        {
            rt.block_on(write_after_through_a_socket());
        }
    }

    async fn write_after_through_a_socket() {
        const BODY: usize = 4 << 20;
        let listener = monoio::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // A plain thread (not a worker), so it may block and sleep.
        #[allow(clippy::disallowed_methods)]
        let reader = std::thread::spawn(move || {
            use std::io::Read;
            let mut peer = std::net::TcpStream::connect(addr).unwrap();
            let mut got = Vec::new();
            let mut chunk = vec![0; 7000];
            // Slow to read at first, so the writer's socket fills and its
            // vectored writes come back partial.
            std::thread::sleep(Duration::from_millis(50));
            while got.len() < 5 + BODY {
                let n = peer.read(&mut chunk).unwrap();
                assert!(n > 0, "closed after {} bytes", got.len());
                got.extend_from_slice(&chunk[..n]);
            }
            got
        });
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut buf: Vec<u8> = b"xyz".to_vec();
        buf.extend((0..BODY).map(|i| (i % 251) as u8));
        buf.extend_from_slice(b"next");
        let mut inbound = Inbound::new(buf);
        inbound.consume(3);
        let mut timer = None;
        let idle = Duration::from_secs(10);
        let (r, head) = inbound
            .write_after(&mut timer, &mut conn, b"HEAD!".to_vec(), BODY, idle)
            .await;
        r.unwrap();
        assert_eq!(head, b"HEAD!", "the head buffer comes back");
        assert_eq!(inbound.data(), b"next", "what follows the body stays");
        let got = reader.join().unwrap();
        assert_eq!(&got[..5], b"HEAD!");
        assert!(
            got[5..]
                .iter()
                .enumerate()
                .all(|(i, &b)| b == (i % 251) as u8),
            "the body arrives whole and in order"
        );
    }
}
