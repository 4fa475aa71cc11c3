//! `pilotfish-bench`: the load harness, the test upstream, the mesh demo and
//! the side-by-side benchmarks. See bench/README.md.

mod compare;
mod demo;
mod l4;
mod pingpong;
mod plot;
mod sidecar;
mod upstream;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "pilotfish-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The mesh demo: upstream, two sidecars, load direct and through the mesh.
    Demo {
        /// A short run (a few seconds) for tests and CI.
        #[arg(long)]
        quick: bool,
        /// Where to write the report and the SVG plot.
        #[arg(long, value_name = "DIR", default_value = "target/demo")]
        out: PathBuf,
        /// The pilotfish binary (default: built next to this one).
        #[arg(long, value_name = "PATH")]
        pilotfish: Option<PathBuf>,
    },
    /// L4 throughput: direct vs through the proxy (buffered copy vs splice).
    L4 {
        /// MiB moved per measurement.
        #[arg(long, default_value_t = 512)]
        mib: usize,
        /// Measurements per mode, interleaved; the median is reported.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// HTTP/1.1 keep-alive: Pilotfish vs nginx and HAProxy, same run.
    Compare {
        /// One short round (CI).
        #[arg(long)]
        quick: bool,
        /// The pilotfish binary (default: built next to this one).
        #[arg(long, value_name = "PATH")]
        pilotfish: Option<PathBuf>,
        /// Pilotfish's [runtime] table, e.g. 'driver = "epoll"' or
        /// 'uring_setup = "defer_taskrun"' (default: its defaults).
        #[arg(long, default_value = "")]
        runtime: String,
    },
    /// A TCP echo upstream for tests and benchmarks.
    Upstream {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
    /// Closed-loop TCP request/response load against ADDR.
    Load {
        target: SocketAddr,
        #[arg(long, default_value_t = 16)]
        connections: usize,
        #[arg(long, default_value = "5s", value_parser = humantime_arg)]
        duration: Duration,
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
}

fn humantime_arg(s: &str) -> Result<Duration, String> {
    pilotfish::config::duration::parse(s)
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Demo {
            quick,
            out,
            pilotfish,
        } => demo::run(quick, &out, pilotfish),
        Command::L4 { mib, rounds } => l4::run(mib, rounds),
        Command::Compare {
            quick,
            pilotfish,
            runtime,
        } => compare::run(
            quick,
            pilotfish,
            &format!("[runtime]\n{}", runtime.replace(';', "\n")),
        ),
        Command::Upstream { listen } => {
            let addr = upstream::echo(listen)?;
            println!("echo upstream on {addr}; Ctrl-C to stop");
            loop {
                std::thread::park();
            }
        }
        Command::Load {
            target,
            connections,
            duration,
            size,
        } => {
            let stop = pingpong::stop_on_ctrl_c()?;
            let r = pingpong::run(target, connections, duration, size, &stop)?;
            print!("{}", pingpong::table(&[("target", &r)]));
            Ok(())
        }
    }
}
