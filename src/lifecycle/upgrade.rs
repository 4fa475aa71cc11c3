//! In-place upgrade (SIGUSR2, nginx's convention): the running process
//! starts the binary at its own path again (a new build dropped there, or
//! the same one), hands it every listening socket, waits until it serves,
//! then drains and exits; no connection is refused or reset on the way.
//!
//! The handover: every worker's listening sockets (the admin TCP listener
//! too) are duplicated, made inheritable, and named in
//! [`super::inherit::LISTEN_FDS_VAR`]; the successor serves on exactly
//! those sockets, so connections already queued on them are accepted by
//! it (closing one socket of an SO_REUSEPORT group would reset the
//! connections queued on that socket; handing over every one avoids it).
//! The successor writes `ready` on a pipe ([`READY_FD_VAR`]) once it
//! serves; only then does this process tell systemd `MAINPID=<successor>`
//! and drain (without `STOPPING=1`: the service is not stopping).
//!
//! What must hold: if the successor fails to start, exits, or is not ready
//! within [`READY_TIMEOUT`], it is killed and this process goes on serving
//! as if nothing happened (and says why in the log and in `STATUS=`).

use std::{
    ffi::OsString,
    io::Read,
    net::{SocketAddr, TcpListener},
    os::fd::{AsRawFd, RawFd},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

/// The variable naming the pipe the successor reports readiness on.
pub const READY_FD_VAR: &str = "PILOTFISH_UPGRADE_READY_FD";
/// How long the successor gets to serve: start-up binds at once and loads
/// TLS material; longer means it is stuck.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How this process was started, to start its successor the same way:
/// the binary's path as given and the arguments, read at start-up (a new
/// binary may replace the file later; /proc/self/exe would then name the
/// old, deleted one).
#[derive(Debug, Clone)]
pub struct Invocation {
    pub exe: PathBuf,
    pub args: Vec<OsString>,
}

impl Invocation {
    pub fn current() -> Option<Self> {
        let mut args = std::env::args_os();
        let argv0 = PathBuf::from(args.next()?);
        // A bare name was found in PATH: resolve it now, as the shell did.
        let exe = if argv0.components().count() > 1 {
            std::fs::canonicalize(&argv0).unwrap_or(argv0)
        } else {
            std::env::current_exe().ok()?
        };
        Some(Invocation {
            exe,
            args: args.collect(),
        })
    }
}

#[allow(unsafe_code)]
fn set_inheritable(fd: RawFd, inheritable: bool) -> std::io::Result<()> {
    // SAFETY: F_GETFD/F_SETFD on a descriptor we own change only its
    // close-on-exec flag.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let flags = if inheritable {
            flags & !libc::FD_CLOEXEC
        } else {
            flags | libc::FD_CLOEXEC
        };
        if libc::fcntl(fd, libc::F_SETFD, flags) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Descriptors above stderr scanned when close_range(2) is unavailable
/// (Linux before 5.11).
const FDS_SCANNED_MAX: RawFd = 65_536;

/// Makes the child inherit the descriptors in `keep` and no other (above
/// stderr): connections this process accepted have no close-on-exec flag
/// (io_uring accepts without it), and one inherited by the successor
/// would stay open there, unanswered, after this process closed it.
#[allow(unsafe_code)]
fn only_these_inherited(command: &mut Command, keep: Vec<RawFd>) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and makes
    // only async-signal-safe system calls (close_range, fcntl); `keep` was
    // allocated before the fork and is only read.
    unsafe {
        command.pre_exec(move || {
            let all_cloexec = libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            ) == 0;
            if !all_cloexec {
                for fd in 3..FDS_SCANNED_MAX {
                    if !keep.contains(&fd) {
                        let flags = libc::fcntl(fd, libc::F_GETFD);
                        if flags >= 0 {
                            libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
                        }
                    }
                }
            }
            for &fd in &keep {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Starts the successor with `sockets` and waits until it serves. Ok:
/// its pid (this process should now drain); Err: why not (the successor,
/// if it started, was killed).
pub fn hand_over(
    invocation: &Invocation,
    sockets: Vec<(SocketAddr, TcpListener)>,
) -> Result<u32, String> {
    if sockets.is_empty() {
        return Err("no listening socket to hand over".into());
    }
    let (mut ready_rx, ready_tx) = std::io::pipe().map_err(|e| format!("pipe: {e}"))?;
    let mut fds = Vec::with_capacity(sockets.len());
    for (_, s) in &sockets {
        set_inheritable(s.as_raw_fd(), true).map_err(|e| format!("fcntl: {e}"))?;
        fds.push(s.as_raw_fd().to_string());
    }
    set_inheritable(ready_tx.as_raw_fd(), true).map_err(|e| format!("fcntl: {e}"))?;
    let mut keep: Vec<RawFd> = sockets.iter().map(|(_, s)| s.as_raw_fd()).collect();
    keep.push(ready_tx.as_raw_fd());
    let mut command = Command::new(&invocation.exe);
    only_these_inherited(&mut command, keep);
    let spawned = command
        .args(&invocation.args)
        .env(super::inherit::LISTEN_FDS_VAR, fds.join(","))
        .env(READY_FD_VAR, ready_tx.as_raw_fd().to_string())
        // The successor's watchdog pings are its own.
        .env_remove("WATCHDOG_PID")
        .stdin(Stdio::null())
        .spawn();
    // Our copies go: the successor holds the sockets and the pipe's write
    // end now (an EOF on the pipe means it exited).
    drop(sockets);
    drop(ready_tx);
    let mut child = spawned.map_err(|e| format!("starting {}: {e}", invocation.exe.display()))?;
    let pid = child.id();
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::Builder::new()
        .name("pilotfish-upgrade".into())
        .spawn(move || {
            let mut said = Vec::new();
            let _ = (&mut ready_rx).take(64).read_to_end(&mut said);
            let _ = tx.send(said);
        })
        .map_err(|e| format!("thread: {e}"))?;
    let failed = |child: &mut Child, why: String| {
        let _ = child.kill();
        let _ = child.wait();
        Err(why)
    };
    match rx.recv_timeout(READY_TIMEOUT) {
        Ok(said) if said.starts_with(b"ready") => Ok(pid),
        Ok(_) => {
            // The pipe closed without "ready": the successor exited, or
            // closed it and runs on unready; either way it goes (a plain
            // wait could block on the second).
            let _ = child.kill();
            let status = child
                .wait()
                .map_or_else(|e| e.to_string(), |s| s.to_string());
            Err(format!(
                "the new process (pid {pid}) exited before serving: {status}"
            ))
        }
        Err(_) => failed(
            &mut child,
            format!("the new process (pid {pid}) was not ready within {READY_TIMEOUT:?}"),
        ),
    }
}

/// In the successor: the pipe to report readiness on, taken from the
/// environment (and removed from it). None when not started by an
/// upgrade. Call at start-up, before any thread runs (the environment is
/// changed).
pub fn take_ready_fd() -> Option<RawFd> {
    let fd = std::env::var(READY_FD_VAR)
        .ok()
        .and_then(|f| f.parse::<RawFd>().ok())
        .filter(|&f| f > 2);
    std::env::remove_var(READY_FD_VAR);
    fd
}

/// In the successor: tells the process that started it that every
/// listener serves. `fd` is from [`take_ready_fd`].
#[allow(unsafe_code)]
pub fn report_ready(fd: Option<RawFd>) {
    let Some(fd) = fd else {
        return;
    };
    use std::os::fd::FromRawFd;
    // SAFETY: the descriptor was created for this process by its
    // predecessor and named once in READY_FD_VAR (taken and removed at
    // start-up); it is a pipe's write end, owned here from now on.
    let mut pipe = unsafe { std::fs::File::from_raw_fd(fd) };
    if let Err(e) = std::io::Write::write_all(&mut pipe, b"ready\n") {
        tracing::warn!(error = %e, "could not tell the previous process that this one serves");
    }
}
