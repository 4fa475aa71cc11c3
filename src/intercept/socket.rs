//! Socket calls interception needs that monoio does not offer: the
//! original destination of a redirected connection, and a peek at its
//! first bytes that leaves them in the kernel for whoever serves it.
//!
//! What must hold: neither call blocks the worker (the peek is
//! MSG_DONTWAIT; readiness is awaited through the driver); the peek reads
//! at most the buffer it is given.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, BorrowedFd},
    time::{Duration, Instant},
};

use monoio::net::TcpStream;

use super::detect::{detect, Detected, DETECT_BYTES_MAX};
use crate::worker::buffers::BufferPool;

/// After a peek found an incomplete start, the next peek waits this long
/// at first, doubling up to [`PEEK_BACKOFF_MAX`]: readiness cannot tell
/// "more bytes" from "the bytes already seen", so this is a short poll.
/// A whole request line or ClientHello almost always arrives at once, so
/// this path is rare.
const PEEK_BACKOFF_MIN: Duration = Duration::from_millis(1);
const PEEK_BACKOFF_MAX: Duration = Duration::from_millis(50);

/// Runs `f` on a socket2 view of the stream's descriptor.
#[allow(unsafe_code)]
fn with_sock<T>(stream: &TcpStream, f: impl FnOnce(socket2::SockRef<'_>) -> T) -> T {
    // SAFETY: the descriptor is owned by `stream`, which is borrowed for
    // this whole function, so it stays open while `fd` is used.
    let fd = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    f(socket2::SockRef::from(&fd))
}

/// The destination the client dialled before the redirect rule changed
/// it (SO_ORIGINAL_DST, or IP6T_SO_ORIGINAL_DST for IPv6). A client seen
/// as an IPv4-mapped IPv6 address on a dual-stack listener was redirected
/// by an IPv4 rule, so it is asked the IPv4 way.
pub fn original_dst(stream: &TcpStream, peer: SocketAddr) -> io::Result<SocketAddr> {
    let v6 = match peer.ip() {
        IpAddr::V4(_) => false,
        IpAddr::V6(ip) => ip.to_ipv4_mapped().is_none(),
    };
    let addr = with_sock(stream, |s| {
        if v6 {
            s.original_dst_ipv6()
        } else {
            s.original_dst()
        }
    })?;
    addr.as_socket()
        .map(|a| SocketAddr::new(crate::config::intercept::canonical(a.ip()), a.port()))
        .ok_or_else(|| io::Error::other("original destination is not an IP address"))
}

/// Copies up to `buf.len()` bytes waiting on the socket without taking
/// them. Ok(0): the peer closed; WouldBlock: nothing waiting yet.
#[allow(unsafe_code)]
fn peek(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `[u8]` and `[MaybeUninit<u8>]` have the same layout, and
    // recv(2) only ever writes initialized bytes into the buffer, so the
    // bytes stay initialized.
    let uninit = unsafe { &mut *(buf as *mut [u8] as *mut [std::mem::MaybeUninit<u8>]) };
    with_sock(stream, |s| {
        s.recv_with_flags(uninit, libc::MSG_PEEK | libc::MSG_DONTWAIT)
    })
}

/// What detection came to, and whether it ran out of time.
pub struct Peeked {
    pub detected: Detected,
    pub timed_out: bool,
    /// The client closed before sending enough to tell.
    pub closed: bool,
}

/// Waits (at most `timeout`) for enough of the client's first bytes to
/// detect its protocol; the bytes stay queued on the socket. Out of time,
/// or at [`DETECT_BYTES_MAX`], the answer is what the bytes so far say,
/// with "need more" taken as opaque TCP.
///
/// The peek buffer is one of the worker's pooled copy buffers, lent for the
/// detection and given back, so detection allocates nothing per connection.
pub async fn detect_on(stream: &TcpStream, timeout: Duration, pool: &BufferPool) -> Peeked {
    let mut buf = pool.take();
    buf.clear();
    // Pooled buffers hold COPY_BUFFER_BYTES (64 KiB): no reallocation.
    buf.resize(DETECT_BYTES_MAX, 0);
    let peeked = detect_in(stream, timeout, &mut buf).await;
    pool.give(buf);
    peeked
}

const _: () = assert!(DETECT_BYTES_MAX <= crate::config::limits::COPY_BUFFER_BYTES);

async fn detect_in(stream: &TcpStream, timeout: Duration, buf: &mut [u8]) -> Peeked {
    let deadline = Instant::now() + timeout;
    let mut backoff = PEEK_BACKOFF_MIN;
    let mut seen = 0usize;
    let mut waited_readable = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if seen == 0 && !waited_readable {
            // Nothing yet: wait for readiness (no polling while idle).
            waited_readable = true;
            if left.is_zero()
                || monoio::time::timeout(left, stream.readable(false))
                    .await
                    .is_err()
            {
                return Peeked {
                    detected: Detected::Opaque,
                    timed_out: true,
                    closed: false,
                };
            }
        }
        match peek(stream, buf) {
            Ok(0) => {
                return Peeked {
                    detected: Detected::Opaque,
                    timed_out: false,
                    closed: true,
                }
            }
            Ok(n) => {
                seen = n;
                match detect(&buf[..n]) {
                    Detected::NeedMore => {}
                    detected => {
                        return Peeked {
                            detected,
                            timed_out: false,
                            closed: false,
                        }
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // A spurious wake-up: wait for readiness again.
                if seen == 0 {
                    waited_readable = false;
                    continue;
                }
            }
            Err(_) => {
                return Peeked {
                    detected: Detected::Opaque,
                    timed_out: false,
                    closed: true,
                }
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Peeked {
                detected: Detected::Opaque,
                timed_out: true,
                closed: false,
            };
        }
        monoio::time::sleep(backoff.min(left)).await;
        backoff = (backoff * 2).min(PEEK_BACKOFF_MAX);
    }
}

/// Waits (at most `timeout`) for the client's first byte and returns it
/// without taking it; None when none came in time or the client closed.
pub async fn first_byte(stream: &TcpStream, timeout: Duration) -> Option<u8> {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 1];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        monoio::time::timeout(left, stream.readable(false))
            .await
            .ok()?
            .ok()?;
        match peek(stream, &mut buf) {
            Ok(1) => return Some(buf[0]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            _ => return None,
        }
    }
}
