//! A pilotfish sidecar as a child process, started the way systemd starts
//! it: with `NOTIFY_SOCKET`, so we learn when it is ready and which
//! addresses its listeners got. Stopped on drop the way systemd stops it
//! (SIGTERM, so it drains and removes its admin socket), killed if it does
//! not exit in time: no run leaves a process or a socket file behind.

use std::{
    net::SocketAddr,
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context};

/// How long a sidecar may take to report READY=1.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a sidecar gets to exit after SIGTERM before it is killed. The
/// demo's sidecars drain in 1 s.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Sidecar {
    pub name: String,
    child: Child,
    pub listeners: Vec<(String, SocketAddr)>,
}

impl Sidecar {
    /// Starts `pilotfish run --config FILE` and waits for READY=1.
    pub fn start(binary: &Path, name: &str, dir: &Path, config_toml: &str) -> anyhow::Result<Self> {
        Self::start_with(binary, name, dir, config_toml, &[])
    }

    /// As [`Sidecar::start`], with the binary run by `wrapper` (e.g. `ip
    /// netns exec POD setpriv --reuid=1337 ...`, each of which execs the
    /// next, so the child's pid is pilotfish's). The notify socket is
    /// opened to other users for a wrapper that drops privileges.
    pub fn start_with(
        binary: &Path,
        name: &str,
        dir: &Path,
        config_toml: &str,
        wrapper: &[String],
    ) -> anyhow::Result<Self> {
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, config_toml)?;
        let notify_path = dir.join(format!("{name}.notify"));
        let _ = std::fs::remove_file(&notify_path);
        let notify = UnixDatagram::bind(&notify_path)?;
        notify.set_read_timeout(Some(READY_TIMEOUT))?;
        if !wrapper.is_empty() {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&notify_path, std::fs::Permissions::from_mode(0o666))?;
        }
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(binary);
                c
            }
            None => Command::new(binary),
        };
        let child = command
            .args(["run", "--config"])
            .arg(&config)
            .env("NOTIFY_SOCKET", &notify_path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut sidecar = Sidecar {
            name: name.into(),
            child,
            listeners: Vec::new(),
        };
        let mut buf = [0u8; 4096];
        loop {
            let n = notify
                .recv(&mut buf)
                .with_context(|| format!("{name}: no READY=1 within {READY_TIMEOUT:?}"))?;
            let msg = String::from_utf8_lossy(&buf[..n]);
            if msg.lines().any(|l| l == "READY=1") {
                sidecar.listeners = parse_status(&msg);
                break;
            }
            if let Some(status) = sidecar.child.try_wait()? {
                bail!("{name} exited with {status} before it was ready");
            }
        }
        let _ = std::fs::remove_file(&notify_path);
        Ok(sidecar)
    }

    pub fn listener(&self, name: &str) -> anyhow::Result<SocketAddr> {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .with_context(|| format!("{}: no listener {name:?}", self.name))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        // std has no kill(2) with a signal; the `kill` command is everywhere.
        let termed = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let deadline = std::time::Instant::now() + STOP_TIMEOUT;
        while termed && std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            // Not a worker thread: polling the child with a short sleep is fine.
            #[allow(clippy::disallowed_methods)]
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `STATUS=serving on N worker(s): a=127.0.0.1:1 b=127.0.0.1:2`.
fn parse_status(msg: &str) -> Vec<(String, SocketAddr)> {
    msg.lines()
        .find_map(|l| l.strip_prefix("STATUS="))
        .and_then(|s| s.split_once(": "))
        .map(|(_, list)| {
            list.split_whitespace()
                .filter_map(|pair| {
                    let (name, addr) = pair.split_once('=')?;
                    Some((name.to_string(), addr.parse().ok()?))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The pilotfish binary: given, or next to this executable, built first
/// when we run under cargo so the demo works from a fresh clone.
pub fn locate_binary(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p);
    }
    let me = std::env::current_exe()?;
    let dir = me.parent().context("executable has no directory")?;
    let release = dir.ends_with("release");
    if let Ok(cargo) = std::env::var("CARGO") {
        eprintln!(
            "building the pilotfish binary ({}) ...",
            if release { "release" } else { "debug" }
        );
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "-p", "pilotfish", "--bin", "pilotfish"]);
        // The workspace this harness was built from, so that the demo also
        // works when run from another directory (`cargo run
        // --manifest-path ...`).
        cmd.arg("--manifest-path")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml"));
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status()?;
        anyhow::ensure!(status.success(), "building pilotfish failed");
    }
    let path = dir.join("pilotfish");
    anyhow::ensure!(
        path.exists(),
        "{} not found: run `cargo build --release` or pass --pilotfish PATH",
        path.display()
    );
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_line_gives_listener_addresses() {
        let got = parse_status("READY=1\nSTATUS=serving on 2 worker(s): a=127.0.0.1:1 b=[::1]:2");
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].1, "[::1]:2".parse().unwrap());
    }
}
