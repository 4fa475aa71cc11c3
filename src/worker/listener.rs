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

use std::{io, net::SocketAddr};

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
pub fn bind(addr: SocketAddr) -> io::Result<monoio::net::TcpListener> {
    let socket = socket_for(addr)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    monoio::net::TcpListener::from_std(socket.into())
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
