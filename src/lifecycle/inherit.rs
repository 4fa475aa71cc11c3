//! Listening sockets this process is handed instead of binding them:
//! by systemd (socket activation or its file-descriptor store:
//! `LISTEN_FDS` + `LISTEN_PID`, descriptors from 3) or by the Pilotfish
//! it replaces in an in-place upgrade (`PILOTFISH_LISTEN_FDS`, a
//! comma-separated list of descriptors; see [`super::upgrade`]).
//!
//! What must hold: a descriptor is taken only if it is a listening TCP
//! socket (anything else is left alone and logged); every taken socket is
//! marked close-on-exec and non-blocking, and the variables are removed
//! from the environment so no child inherits them. A listener whose
//! address matches inherited sockets serves on exactly those sockets (the
//! same accept queues, so no connection queued before the handover is
//! lost); the workers share them out, and with fewer sockets than
//! workers share them (see [`crate::Proxy::start_with`]), never binding
//! their own beside them.

use std::{
    net::{SocketAddr, TcpListener},
    os::fd::{FromRawFd, OwnedFd, RawFd},
};

/// The variable an upgrading Pilotfish passes its listening sockets in.
pub const LISTEN_FDS_VAR: &str = "PILOTFISH_LISTEN_FDS";

/// Descriptors looked at, at most: systemd's own limit on `LISTEN_FDS`
/// is far below this, and a bad value must not make us loop for long.
const FDS_MAX: usize = 4096;

/// Inherited listening sockets, by address.
#[derive(Debug, Default)]
pub struct Inherited {
    by_addr: Vec<(SocketAddr, Vec<TcpListener>)>,
}

impl Inherited {
    /// None inherited.
    pub fn none() -> Self {
        Self::default()
    }

    /// Takes what systemd or an upgrading Pilotfish passed, and removes
    /// the variables from the environment. Call once, early, before any
    /// thread is started (the environment is changed).
    pub fn from_env() -> Self {
        let mut fds: Vec<RawFd> = Vec::new();
        let ours = std::env::var("LISTEN_PID")
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            == Some(std::process::id());
        if ours {
            if let Some(n) = std::env::var("LISTEN_FDS")
                .ok()
                .and_then(|n| n.trim().parse::<usize>().ok())
            {
                fds.extend((0..n.min(FDS_MAX)).map(|i| 3 + i as RawFd));
            }
        }
        if let Ok(list) = std::env::var(LISTEN_FDS_VAR) {
            fds.extend(
                list.split(',')
                    .filter_map(|f| f.trim().parse::<RawFd>().ok())
                    .filter(|&f| f > 2)
                    .take(FDS_MAX),
            );
        }
        // Called at start-up, before any other thread uses the environment.
        for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", LISTEN_FDS_VAR] {
            std::env::remove_var(var);
        }
        fds.sort_unstable();
        fds.dedup();
        let mut inherited = Inherited::default();
        for fd in fds {
            match adopt(fd) {
                Ok((addr, l)) => inherited.add(addr, l),
                Err(why) => tracing::warn!(fd, %why, "inherited descriptor not used"),
            }
        }
        inherited
    }

    fn add(&mut self, addr: SocketAddr, l: TcpListener) {
        match self.by_addr.iter_mut().find(|(a, _)| *a == addr) {
            Some((_, v)) => v.push(l),
            None => self.by_addr.push((addr, vec![l])),
        }
    }

    /// How many sockets were inherited for `addr`.
    pub fn count(&self, addr: SocketAddr) -> usize {
        self.by_addr
            .iter()
            .find(|(a, _)| *a == addr)
            .map_or(0, |(_, v)| v.len())
    }

    /// Takes the sockets for `addr`.
    pub fn take(&mut self, addr: SocketAddr) -> Vec<TcpListener> {
        match self.by_addr.iter().position(|(a, _)| *a == addr) {
            Some(i) => self.by_addr.swap_remove(i).1,
            None => Vec::new(),
        }
    }

    /// What no listener took: closed, with a warning (the config no longer
    /// names that address).
    pub fn close_rest(self) {
        for (addr, v) in self.by_addr {
            tracing::warn!(%addr, sockets = v.len(), "inherited listening socket matches no listener; closed");
        }
    }
}

/// A descriptor as a listening TCP socket, close-on-exec, non-blocking.
#[allow(unsafe_code)]
fn adopt(fd: RawFd) -> Result<(SocketAddr, TcpListener), String> {
    // SAFETY: F_GETFD only reads the descriptor's flags; on a closed
    // descriptor it fails with EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err("not an open descriptor".into());
    }
    let mut listening: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: an int-sized out-parameter and its length, both ours.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&raw mut listening).cast(),
            &mut len,
        )
    };
    if r != 0 || listening != 1 {
        return Err("not a listening socket".into());
    }
    // SAFETY: the descriptor is open, a socket, and from here on owned by
    // this value alone (the variable that named it is removed).
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let sock = socket2::Socket::from(owned);
    if sock.r#type().map_err(|e| e.to_string())? != socket2::Type::STREAM {
        return Err("not a stream socket".into());
    }
    sock.set_cloexec(true).map_err(|e| e.to_string())?;
    sock.set_nonblocking(true).map_err(|e| e.to_string())?;
    let addr = sock
        .local_addr()
        .map_err(|e| e.to_string())?
        .as_socket()
        .ok_or("not an inet socket")?;
    Ok((addr, sock.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;

    #[test]
    fn adopts_listening_tcp_sockets_only() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let (got, _l) = adopt(l.into_raw_fd()).unwrap();
        assert_eq!(got, addr);
        // A bound socket that does not listen is not taken.
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        assert!(adopt(s.into_raw_fd()).unwrap_err().contains("listening"));
        assert!(adopt(987_654).unwrap_err().contains("open"));
    }
}
