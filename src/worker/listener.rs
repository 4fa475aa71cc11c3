//! Binds a worker's own listening socket with SO_REUSEPORT.
//!
//! Every worker binds every listener itself; the kernel spreads incoming
//! connections across the workers' sockets, so accept needs no lock. A
//! listener configured with port 0 is resolved to one concrete port before
//! the workers start (see [`reserve`]), so all workers share that port.
//!
//! SO_REUSEPORT lets any socket of the same user join a port, including a
//! second Pilotfish started by mistake, which would then take part of the
//! traffic in silence. So before binding an address this process does not
//! hold yet, [`ensure_free`] checks that no one else does.

use std::{
    io,
    net::SocketAddr,
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, Socket, Type};

use crate::config::limits::LISTEN_BACKLOG;

fn socket_for(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.set_cloexec(true)?;
    Ok(socket)
}

/// How long start-up waits for an address that is in use to come free
/// before it gives up. A process that used io_uring and just exited can
/// hold its listening sockets a little past its exit: the kernel tears
/// the ring down in a worker thread after the process is reaped, and
/// only then drops the files that requests in flight (a readiness poll
/// on the listener) still referenced. A restart right after an exit (a
/// crash restart, a test) met that as "address in use".
pub const START_FREE_WAIT: Duration = Duration::from_secs(2);
/// How often the address is tried again meanwhile.
const FREE_POLL: Duration = Duration::from_millis(20);

/// [`ensure_free`], trying again for up to `wait` while the address is in
/// use. Blocks the calling thread: for start-up, not for workers.
pub fn ensure_free_within(addr: SocketAddr, wait: Duration) -> io::Result<()> {
    let deadline = Instant::now() + wait;
    loop {
        match ensure_free(addr) {
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                #[allow(clippy::disallowed_methods)] // not a worker thread
                std::thread::sleep(FREE_POLL);
            }
            done => return done,
        }
    }
}

/// Fails with `AddrInUse` if another socket (another process, or anything
/// else) is bound to `addr`. The probe binds without SO_REUSEPORT, so it
/// conflicts with every bound socket, SO_REUSEPORT ones included; it sets
/// SO_REUSEADDR, so connections of an earlier run in TIME_WAIT do not
/// count. A port-0 address is always free.
pub fn ensure_free(addr: SocketAddr) -> io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    probe.set_reuse_address(true)?;
    probe.set_cloexec(true)?;
    probe.bind(&addr.into()).map_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            io::Error::new(
                io::ErrorKind::AddrInUse,
                "address in use (held by another process; a second Pilotfish on one address would silently take part of its traffic)",
            )
        } else {
            e
        }
    })
}

/// Binds and listens on `addr` for one worker.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = socket_for(addr)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Accepts one connection, and is safe to cancel: the wait is a readiness
/// poll, which takes nothing from the queue, and the accept itself is a
/// non-blocking accept4(2) that either takes a connection or fails at
/// once. (An io_uring accept dropped when the loop stops may already have
/// taken a connection, which then is never served and is reset: seen as
/// client errors during an in-place upgrade, where the successor serves the
/// same queue.) Accepted sockets are close-on-exec; non-blocking when
/// `nonblocking` (the epoll driver needs it; io_uring, whose own accept
/// gives blocking sockets, runs splice and reads on them as such).
pub async fn accept(
    listener: &monoio::net::TcpListener,
    nonblocking: bool,
) -> io::Result<(monoio::net::TcpStream, SocketAddr)> {
    use std::os::fd::AsRawFd;
    loop {
        match accept4(listener.as_raw_fd(), nonblocking) {
            Ok((stream, peer)) => return Ok((monoio::net::TcpStream::from_std(stream)?, peer)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => listener.readable(false).await?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // A connection reset while queued: take the next one.
            Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
            Err(e) => return Err(e),
        }
    }
}

#[allow(unsafe_code)]
fn accept4(
    fd: std::os::fd::RawFd,
    nonblocking: bool,
) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut storage: libc::sockaddr_storage =
        // SAFETY: all-zero bytes are a valid sockaddr_storage.
        unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let flags = if nonblocking {
        libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC
    } else {
        libc::SOCK_CLOEXEC
    };
    // SAFETY: the address buffer and its length are ours and sized for any
    // address; the flags only set the new descriptor's modes.
    let conn = unsafe { libc::accept4(fd, (&raw mut storage).cast(), &mut len, flags) };
    if conn < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(conn) };
    // SAFETY: the kernel wrote a socket address of `len` bytes.
    let peer = unsafe { socket2::SockAddr::new(storage, len) }
        .as_socket()
        .ok_or_else(|| io::Error::other("accepted a non-inet connection"))?;
    Ok((std::net::TcpStream::from(owned), peer))
}

/// Resolves port 0 to a concrete port shared by every worker.
///
/// The returned socket is bound with SO_REUSEPORT but never listens, so it
/// holds the port without taking connections; keep it until every worker
/// has bound, then drop it.
pub fn reserve(addr: SocketAddr) -> io::Result<(SocketAddr, Socket)> {
    let socket = socket_for(addr)?;
    socket.bind(&addr.into())?;
    let local = socket
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("bound socket has no inet address"))?;
    Ok((local, socket))
}
