//! The systemd notify protocol (sd_notify(3)), spoken directly.
//!
//! When `NOTIFY_SOCKET` is set, state lines (`READY=1`, `STOPPING=1`,
//! `RELOADING=1` with `MONOTONIC_USEC=`, `STATUS=…`) are sent as datagrams to that Unix socket; a leading `@`
//! names an abstract socket. Without the variable every call is a no-op, so
//! the same binary runs by hand, under systemd, or in a container.

use std::{io, os::unix::net::UnixDatagram, path::PathBuf};

#[derive(Debug)]
pub struct Notifier {
    target: Option<Target>,
}

#[derive(Debug)]
enum Target {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET` from the environment.
    pub fn from_env() -> Self {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|v| {
            let bytes = std::os::unix::ffi::OsStrExt::as_bytes(v.as_os_str()).to_vec();
            match bytes.first() {
                None => None,
                Some(b'@') => Some(Target::Abstract(bytes[1..].to_vec())),
                Some(_) => Some(Target::Path(PathBuf::from(v))),
            }
        });
        Self { target }
    }

    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends one state message (newline-separated `KEY=VALUE` lines).
    pub fn notify(&self, state: &str) -> io::Result<()> {
        let Some(target) = &self.target else {
            return Ok(());
        };
        let socket = UnixDatagram::unbound()?;
        match target {
            Target::Path(path) => socket.send_to(state.as_bytes(), path)?,
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(state.as_bytes(), &addr)?
            }
        };
        Ok(())
    }

    /// Like [`Notifier::notify`], logging instead of failing: a lost status
    /// line must never stop the proxy.
    pub fn send(&self, state: &str) {
        if let Err(e) = self.notify(state) {
            tracing::warn!(error = %e, state, "systemd notify failed");
        }
    }
}

/// Descriptors per `FDSTORE=1` message: the kernel takes at most 253
/// (SCM_MAX_FD) in one SCM_RIGHTS message.
const FDS_PER_MESSAGE: usize = 250;

impl Notifier {
    /// Puts `fds` in systemd's file-descriptor store under `name`
    /// (`FDSTORE=1`, sd_pid_notify_with_fds(3)): after a crash or a
    /// restart, systemd passes them back (`LISTEN_FDS`), and the listening
    /// sockets among them keep their queues in between. A descriptor
    /// already stored (the same socket) is stored once.
    pub fn store_fds(&self, name: &str, fds: &[std::os::fd::BorrowedFd<'_>]) -> io::Result<()> {
        use rustix::net::{
            sendmsg_addr, SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix,
        };
        let Some(target) = &self.target else {
            return Ok(());
        };
        let addr = match target {
            Target::Path(path) => SocketAddrUnix::new(path.as_path())?,
            Target::Abstract(name) => SocketAddrUnix::new_abstract_name(name)?,
        };
        let socket = UnixDatagram::unbound()?;
        let state = format!("FDSTORE=1\nFDNAME={name}");
        for chunk in fds.chunks(FDS_PER_MESSAGE) {
            let mut space =
                vec![std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(chunk.len()))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            if !control.push(SendAncillaryMessage::ScmRights(chunk)) {
                return Err(io::Error::other("ancillary buffer too small"));
            }
            sendmsg_addr(
                &socket,
                &addr,
                &[io::IoSlice::new(state.as_bytes())],
                &mut control,
                SendFlags::empty(),
            )?;
        }
        Ok(())
    }
}

/// CLOCK_MONOTONIC in microseconds, as `MONOTONIC_USEC=` in a
/// `RELOADING=1` message wants it (systemd compares it with its own clock).
#[allow(unsafe_code)]
pub fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always
    // exists on Linux, so the call cannot fail on a valid pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_datagrams_to_the_socket_path() {
        let dir = std::env::temp_dir().join(format!("pf-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            target: Some(Target::Path(path.clone())),
        };
        n.notify("READY=1\nSTATUS=serving").unwrap();
        let mut buf = [0u8; 64];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=serving");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn monotonic_clock_moves_forward_like_instant() {
        let a = monotonic_usec();
        let t = std::time::Instant::now();
        while t.elapsed() < std::time::Duration::from_millis(2) {}
        let b = monotonic_usec();
        assert!(a > 0 && b >= a + 2_000, "{a} then {b}");
    }

    #[test]
    fn without_a_socket_it_is_a_no_op() {
        let n = Notifier { target: None };
        assert!(!n.enabled());
        n.notify("READY=1").unwrap();
    }
}
