//! `pilotfish-bench`: the load harness, the test upstream, the mesh demo and
//! the side-by-side benchmarks. See bench/README.md.

mod compare;
mod demo;
mod fault;
mod floor;
mod handshakes;
mod l4;
mod load;
mod otlp_sink;
mod pingpong;
mod plot;
mod reliability;
mod sidecar;
mod transparent;
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
        /// Where to write the report and the SVG plot (default: `demo/` in
        /// the cargo target directory this binary was built in, wherever
        /// the command is run from).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// The pilotfish binary (default: built next to this one).
        #[arg(long, value_name = "PATH")]
        pilotfish: Option<PathBuf>,
        /// Two pods as network namespaces with interception rules: the app
        /// dials the other pod's address and the sidecars take over
        /// (direct vs explicit-port vs transparent mesh). Needs root.
        #[arg(long, conflicts_with = "find_the_fault")]
        transparent: bool,
        /// Service B as two instances, one faulty (503s and slow answers);
        /// the report shows how golden metrics, a tap and traces point at it.
        #[arg(long)]
        find_the_fault: bool,
        /// Load connections (default 16, --quick 4); with --transparent
        /// only. 1 measures the unloaded round trip.
        #[arg(long, requires = "transparent")]
        connections: Option<usize>,
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
    /// Full mTLS handshakes per second per core: Pilotfish vs nginx and
    /// HAProxy terminating the same mutual TLS, same run.
    Handshakes {
        /// One short round (CI).
        #[arg(long)]
        quick: bool,
        /// The pilotfish binary (default: built next to this one).
        #[arg(long, value_name = "PATH")]
        pilotfish: Option<PathBuf>,
    },
    /// Pilotfish vs nginx and HAProxy over several scenarios, same run.
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
        /// Where the results (.md, .json, .svg) go.
        #[arg(long, value_name = "DIR", default_value = "bench/results")]
        out: PathBuf,
    },
    /// Staying up: config swaps, reloads, a drain, an in-place upgrade, an
    /// upstream restart, slowloris, idle connections and floods, each
    /// under load against the real binary; one table of what clients saw.
    Reliability {
        /// 3 s per scenario and 2,000 idle connections (CI).
        #[arg(long)]
        quick: bool,
        /// The pilotfish binary (default: built next to this one).
        #[arg(long, value_name = "PATH")]
        pilotfish: Option<PathBuf>,
        /// Where the report, configs and logs go (default: `reliability/`
        /// in the cargo target directory).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// An HTTP/1.1 (or, with --tcp, echo) upstream for tests and benchmarks.
    Upstream {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// A TCP echo server instead of HTTP.
        #[arg(long)]
        tcp: bool,
        #[command(flatten)]
        http: upstream::HttpOptions,
    },
    /// Load: open loop at --rate (coordinated omission corrected) or closed loop.
    Load(LoadArgs),
    /// The do-nothing forwarder `compare` measures as the floor: one
    /// upstream connection per client connection, bytes copied both ways,
    /// nothing parsed, on Pilotfish's runtime.
    Floor {
        /// LISTEN=UPSTREAM, both host:port (repeatable).
        #[arg(long = "route", value_parser = route_arg, required = true)]
        routes: Vec<(SocketAddr, SocketAddr)>,
    },
}

fn route_arg(s: &str) -> Result<(SocketAddr, SocketAddr), String> {
    let (l, u) = s.split_once('=').ok_or("expected LISTEN=UPSTREAM")?;
    Ok((
        l.parse().map_err(|e| format!("{l}: {e}"))?,
        u.parse().map_err(|e| format!("{u}: {e}"))?,
    ))
}

#[derive(Debug, clap::Args)]
struct LoadArgs {
    /// host:port to load.
    target: SocketAddr,
    /// http (keep-alive), http-close (a connection per request), tcp (echo).
    #[arg(long, value_enum, default_value = "http")]
    mode: load::Mode,
    /// Requests per second over all connections (open loop); leave out for
    /// a closed loop (as fast as responses come back).
    #[arg(long)]
    rate: Option<f64>,
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Load threads, each pinned to a core (default: the cores available).
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long, default_value = "10s", value_parser = humantime_arg)]
    duration: Duration,
    /// Run this long first without recording.
    #[arg(long, default_value = "1s", value_parser = humantime_arg)]
    warmup: Duration,
    #[arg(long, default_value = "GET")]
    method: String,
    #[arg(long, default_value = "/")]
    path: String,
    /// Extra request header, e.g. 'x-bench-delay: 5ms' (repeatable).
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    /// HTTP request body bytes; tcp: bytes per request.
    #[arg(long, default_value_t = 0)]
    body_size: usize,
    /// A request without a whole response within this counts as an error.
    #[arg(long, default_value = "10s", value_parser = humantime_arg)]
    timeout: Duration,
    /// Write HdrHistogram's percentile distribution (.hgrm) here.
    #[arg(long, value_name = "FILE")]
    hgrm: Option<PathBuf>,
    /// Write a JSON summary here.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
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
            find_the_fault: true,
            ..
        } => fault::run(quick, &out.unwrap_or_else(demo::default_out), pilotfish),
        Command::Demo {
            quick,
            out,
            pilotfish,
            transparent: false,
            ..
        } => demo::run(quick, &out.unwrap_or_else(demo::default_out), pilotfish),
        Command::Demo {
            quick,
            out,
            pilotfish,
            transparent: true,
            connections,
            ..
        } => transparent::run(
            quick,
            connections,
            &out.unwrap_or_else(transparent::default_out),
            pilotfish,
        ),
        Command::L4 { mib, rounds } => l4::run(mib, rounds),
        Command::Reliability {
            quick,
            pilotfish,
            out,
        } => reliability::run(&reliability::Options {
            quick,
            binary: pilotfish,
            out: out.unwrap_or_else(|| demo::default_out().with_file_name("reliability")),
        }),
        Command::Handshakes { quick, pilotfish } => handshakes::run(quick, pilotfish),
        Command::Compare {
            quick,
            pilotfish,
            runtime,
            out,
        } => compare::run(&compare::Options {
            quick,
            binary: pilotfish,
            runtime: format!("[runtime]\n{}", runtime.replace(';', "\n")),
            out,
        }),
        Command::Upstream { listen, tcp, http } => {
            let addr = if tcp {
                upstream::echo(listen)?
            } else {
                upstream::http_with(listen, http)?
            };
            let kind = if tcp { "TCP echo" } else { "HTTP/1.1" };
            println!("{kind} upstream on {addr}; Ctrl-C to stop");
            loop {
                std::thread::park();
            }
        }
        Command::Load(args) => run_load(args),
        Command::Floor { routes } => floor::run(routes),
    }
}

fn run_load(a: LoadArgs) -> anyhow::Result<()> {
    let request = match a.mode {
        load::Mode::Tcp => vec![b'x'; a.body_size.max(1)],
        mode => load::http_request(
            &a.method,
            &a.path,
            &a.target.to_string(),
            &a.headers,
            a.body_size,
            mode == load::Mode::HttpClose,
        ),
    };
    let threads = a
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let spec = load::Spec {
        target: a.target,
        mode: a.mode,
        rate: a.rate,
        connections: a.connections,
        threads,
        duration: a.duration,
        warmup: a.warmup,
        request,
        timeout: a.timeout,
    };
    println!(
        "{:?} load on {} with {} connection(s) on {} thread(s), {:?} after {:?} warm-up",
        a.mode, a.target, a.connections, threads, a.duration, a.warmup
    );
    let report = load::run(&spec)?;
    print!("{}", report.table());
    if let Some(path) = &a.hgrm {
        std::fs::write(
            path,
            pilotfish::metrics::histograms::hgrm(&report.corrected),
        )?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&report.json())?)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
