//! The `pilotfish` binary: parse the command line, hand over to the library.

use std::{path::PathBuf, process::ExitCode};

/// With `--features mimalloc`, mimalloc instead of glibc's malloc. monoio's
/// timer entries are cache-line padded (align 128), so every boxed future
/// holding a timeout is an over-aligned allocation, which glibc serves
/// through its slow `posix_memalign` path (~1,000 instructions each; two
/// per HTTP/2 request, none per HTTP/1.1 keep-alive request). Measured
/// (callgrind-per-request.sh, 1 worker): HTTP/2 in 51,066 -> 47,087
/// instructions per request, HTTP/1.1 16,994 -> 16,695; but idle RSS
/// (idle-rss.sh 5000) 10.1 -> 14.0 KiB per connection and 7.7 -> 15.8 MiB
/// at start. Memory per idle connection is the scarcer resource for a
/// sidecar, so glibc stays the default.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};
use pilotfish::{
    lifecycle::{self, notify::Notifier, Exit},
    Config, Proxy,
};

const EXAMPLES: &str = "\
Examples:
  pilotfish check --config config/l4.toml     validate a config, print a summary
  pilotfish run --config config/l4.toml       run the sidecar in the foreground
  pilotfish reload -c config/l4.toml --pid N  check the file, then SIGHUP process N
  RUST_LOG=debug pilotfish run -c my.toml     with per-connection logs
  pilotfish intercept install -c sidecar.toml redirect the namespace's TCP to it

Signals: SIGTERM/SIGINT drain (stop accepting, let connections finish up to
drain_timeout, exit 0); a second one exits at once. SIGHUP re-reads the
config file and swaps it on every worker or none (`pilotfish admin apply
FILE` does the same through the admin socket).
Under systemd (Type=notify) it sends READY=1 once every worker listens.";

#[derive(Debug, Parser)]
#[command(name = "pilotfish", version, about, after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy in the foreground.
    Run {
        /// The TOML config file.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate a config file and print a short summary; exit 1 on error.
    Check {
        /// The TOML config file.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Check FILE as `check` does, then ask the running proxy PID to reload
    /// it (SIGHUP); a file that fails the check changes nothing. For
    /// systemd's ExecReload, with no `kill` binary needed.
    Reload {
        /// The TOML config file the running proxy was started with.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// The running proxy's process id (systemd: $MAINPID).
        #[arg(long)]
        pid: i32,
    },
    /// A development certificate authority (NOT for production: use your
    /// PKI, e.g. SPIRE, cert-manager or step-ca, and give Pilotfish files).
    Ca {
        #[command(subcommand)]
        what: CaCommand,
    },
    /// Transparent interception: the redirect rules of this network
    /// namespace, from the config's [intercept] table (needs
    /// CAP_NET_ADMIN to change them).
    Intercept {
        #[command(subcommand)]
        what: InterceptCommand,
    },
    /// Ask a running proxy through its admin socket.
    Admin {
        /// The admin socket ([admin] socket in the config).
        #[arg(long, value_name = "PATH", default_value = "/run/pilotfish/admin.sock")]
        socket: PathBuf,
        #[command(subcommand)]
        what: AdminCommand,
    },
}

#[derive(Debug, Subcommand)]
enum InterceptCommand {
    /// Install the rules (replacing ours, atomically with nft).
    Install {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Default: nft where it exists, else iptables-restore.
        #[arg(long)]
        backend: Option<pilotfish::intercept::rules::Backend>,
        /// Print the rules instead of installing them.
        #[arg(long)]
        dry_run: bool,
    },
    /// Remove our rules; nothing installed is not an error.
    Remove {
        #[arg(long)]
        backend: Option<pilotfish::intercept::rules::Backend>,
    },
    /// Print the rules installed now; exit 1 when there are none.
    Show {
        #[arg(long)]
        backend: Option<pilotfish::intercept::rules::Backend>,
    },
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Create a CA in DIR (ca.pem, ca.key with mode 0600).
    Init { dir: PathBuf },
    /// Issue a workload certificate (X.509-SVID) into OUT (cert.pem,
    /// key.pem, ca.pem).
    Issue {
        /// The CA directory made by `pilotfish ca init`.
        #[arg(long, value_name = "DIR")]
        ca: PathBuf,
        /// The workload's identity, e.g. spiffe://mesh.local/ns/prod/sa/web.
        #[arg(long, value_name = "ID")]
        spiffe_id: String,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Validity, e.g. 24h or 30d.
        #[arg(long, default_value = "30d")]
        valid_for: String,
    },
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Exit 0 if every worker serves and the proxy is not draining.
    Ready,
    /// Counters per core and merged, as a table (--json for the raw JSON).
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// The Prometheus exposition.
    Metrics,
    /// Latency percentiles (µs) per listener, route and cluster.
    Histograms {
        #[arg(long)]
        listener: Option<String>,
        #[arg(long)]
        route: Option<String>,
        #[arg(long)]
        cluster: Option<String>,
        /// request_total, upstream_connect, upstream_first_byte, connection_duration
        #[arg(long)]
        metric: Option<String>,
        #[arg(long)]
        core: Option<usize>,
        /// Print HdrHistogram's percentile distribution (.hgrm) instead.
        #[arg(long)]
        hgrm: bool,
        /// Empty the histograms after reading (interval histograms).
        #[arg(long)]
        reset: bool,
    },
    /// The running config (JSON).
    Config,
    /// Endpoints per cluster and core: health, ejection, load (JSON).
    Clusters,
    /// Swap the running config for FILE on every worker (or none, saying why).
    Apply { file: PathBuf },
    /// Replace the log filter, e.g. `debug` or `info,pilotfish::http=debug`.
    LogLevel { filter: String },
    /// Stop accepting and drain, as SIGTERM does.
    Drain,
    /// The busiest routes and peers, refreshed in the terminal: request
    /// rate, success rate, p50 and p99 over the last interval (q or
    /// Ctrl-C to quit).
    Top {
        /// Refresh interval, e.g. 1s or 500ms.
        #[arg(long, default_value = "1s", value_parser = pilotfish::config::duration::parse)]
        interval: std::time::Duration,
        /// Rows shown at most.
        #[arg(long, default_value_t = 20)]
        rows: usize,
    },
    /// Live requests as they complete, one per line, filtered (every
    /// filter given must match). Ctrl-C to stop.
    Tap {
        #[arg(long)]
        listener: Option<String>,
        #[arg(long)]
        route: Option<String>,
        /// Host or host:port (case and a trailing dot do not matter).
        #[arg(long)]
        authority: Option<String>,
        #[arg(long)]
        path_prefix: Option<String>,
        #[arg(long)]
        method: Option<String>,
        /// A status class (5xx) or code (503).
        #[arg(long)]
        status: Option<String>,
        /// The peer's SPIFFE ID (the caller's, on inbound listeners).
        #[arg(long)]
        peer: Option<String>,
        /// Events per second at most (whole process); the rest are dropped
        /// and counted.
        #[arg(long)]
        rate: Option<u32>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
        /// Print the JSON lines as they come.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Reload { config, pid } => reload(&config, pid),
        Command::Run { config } => run(&config),
        Command::Admin { socket, what } => admin(&socket, what),
        Command::Ca { what } => ca(what),
        Command::Intercept { what } => intercept(what),
    }
}

fn intercept(what: InterceptCommand) -> ExitCode {
    use pilotfish::intercept::rules::{self, Backend, Plan};
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("error: {e}");
        ExitCode::FAILURE
    };
    let backend = |asked: Option<Backend>| rules::choose(asked);
    match what {
        InterceptCommand::Install {
            config,
            backend: asked,
            dry_run,
        } => {
            let loaded = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => return fail(&e),
            };
            let Some(plan) = Plan::from_config(&loaded) else {
                return fail(&format!("{}: no [intercept] table", config.display()));
            };
            let backend = match backend(asked) {
                Ok(b) => b,
                Err(e) => return fail(&e),
            };
            for w in plan.warnings() {
                eprintln!("warning: {w}");
            }
            if dry_run {
                match backend {
                    Backend::Nft => print!("{}", plan.nft_script()),
                    Backend::Iptables => {
                        print!("{}", plan.iptables_script(false));
                        print!("# ip6tables-restore\n{}", plan.iptables_script(true));
                    }
                }
                return ExitCode::SUCCESS;
            }
            match rules::install(&plan, backend) {
                Ok(()) => {
                    println!("intercept rules installed ({backend:?})");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        InterceptCommand::Remove { backend: asked } => {
            match backend(asked).and_then(rules::remove) {
                Ok(()) => {
                    println!("intercept rules removed");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        InterceptCommand::Show { backend: asked } => match backend(asked).and_then(rules::show) {
            Ok(Some(text)) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Ok(None) => {
                eprintln!("no pilotfish intercept rules are installed");
                ExitCode::FAILURE
            }
            Err(e) => fail(&e),
        },
    }
}

fn ca(what: CaCommand) -> ExitCode {
    use pilotfish::tls::{ca, identity::SpiffeId};
    eprintln!("note: {}", ca::NOT_FOR_PRODUCTION);
    let done = match what {
        CaCommand::Init { dir } => {
            ca::init(&dir).map(|p| format!("CA certificate: {}", p.display()))
        }
        CaCommand::Issue {
            ca: ca_dir,
            spiffe_id,
            out,
            valid_for,
        } => {
            let id = match SpiffeId::parse(&spiffe_id) {
                Ok(id) => id,
                Err(e) => {
                    eprintln!("error: --spiffe-id {spiffe_id:?}: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let valid = match humantime::parse_duration(&valid_for) {
                Ok(d) if d >= std::time::Duration::from_secs(60) && d <= ca::LEAF_VALIDITY_MAX => d,
                Ok(_) => {
                    eprintln!(
                        "error: --valid-for {valid_for:?}: between 1m and {:?}",
                        ca::LEAF_VALIDITY_MAX
                    );
                    return ExitCode::FAILURE;
                }
                Err(e) => {
                    eprintln!("error: --valid-for {valid_for:?}: {e}");
                    return ExitCode::FAILURE;
                }
            };
            ca::issue(&ca_dir, &id, &out, valid)
                .map(|p| format!("{id}: {} (key.pem, ca.pem beside it)", p.display()))
        }
    };
    match done {
        Ok(msg) => {
            println!("{msg}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn admin(socket: &std::path::Path, what: AdminCommand) -> ExitCode {
    use pilotfish::admin::client;
    if let AdminCommand::Top { interval, rows } = what {
        return match pilotfish::admin::top::run(socket, interval, rows) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let AdminCommand::Tap {
        listener,
        route,
        authority,
        path_prefix,
        method,
        status,
        peer,
        rate,
        count,
        json,
    } = what
    {
        let query = pilotfish::admin::tap::query_string(&[
            ("listener", listener),
            ("route", route),
            ("authority", authority),
            ("path_prefix", path_prefix),
            ("method", method),
            ("status", status),
            ("peer", peer),
            ("rate", rate.map(|r| r.to_string())),
            ("count", count.map(|c| c.to_string())),
        ]);
        if let Some(bad) = query
            .bytes()
            .find(|b| b.is_ascii_whitespace() || *b == b'#')
        {
            eprintln!("error: filters may not contain {:?}", bad as char);
            return ExitCode::FAILURE;
        }
        let mut out = std::io::stdout().lock();
        return match pilotfish::admin::tap::run(socket, &query, json, &mut out) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let mut body = Vec::new();
    if let AdminCommand::Apply { file } = &what {
        // Validate here first: the error then names the real file and line.
        if let Err(e) = Config::load(file) {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
        body = match std::fs::read(file) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("error: {}: {e}", file.display());
                return ExitCode::FAILURE;
            }
        };
    }
    let (method, path) = match &what {
        AdminCommand::Apply { .. } => ("POST", "/config".to_string()),
        AdminCommand::Ready => ("GET", "/ready".to_string()),
        AdminCommand::Stats { .. } => ("GET", "/stats".to_string()),
        AdminCommand::Metrics => ("GET", "/metrics".to_string()),
        AdminCommand::Config => ("GET", "/config".to_string()),
        AdminCommand::Clusters => ("GET", "/clusters".to_string()),
        AdminCommand::LogLevel { filter } => ("POST", format!("/log-level?filter={filter}")),
        AdminCommand::Drain => ("POST", "/drain".to_string()),
        AdminCommand::Top { .. } | AdminCommand::Tap { .. } => unreachable!("handled above"),
        AdminCommand::Histograms {
            listener,
            route,
            cluster,
            metric,
            core,
            hgrm,
            reset,
        } => {
            let mut q = vec![format!("format={}", if *hgrm { "hgrm" } else { "json" })];
            for (k, v) in [
                ("listener", listener),
                ("route", route),
                ("cluster", cluster),
                ("metric", metric),
            ] {
                if let Some(v) = v {
                    q.push(format!("{k}={v}"));
                }
            }
            if let Some(c) = core {
                q.push(format!("core={c}"));
            }
            if *reset {
                // Emptying them changes state: a POST.
                q.push("reset=true".into());
                ("POST", format!("/histograms?{}", q.join("&")))
            } else {
                ("GET", format!("/histograms?{}", q.join("&")))
            }
        }
    };
    let (status, body) = match client::request_with_body(socket, method, &path, &body) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: admin socket {}: {e}", socket.display());
            return ExitCode::FAILURE;
        }
    };
    let shown = match &what {
        AdminCommand::Stats { json: false } if status == 200 => client::stats_table(&body),
        AdminCommand::Histograms { hgrm: false, .. } if status == 200 => {
            client::histogram_table(&body)
        }
        _ => Ok(body),
    };
    match shown {
        // `print!` panics when stdout is closed (`pilotfish admin metrics |
        // head`); a closed pipe just ends the output.
        Ok(text) => {
            use std::io::Write;
            let _ = std::io::stdout().lock().write_all(text.as_bytes());
        }
        Err(e) => {
            eprintln!("error: unexpected admin answer: {e}");
            return ExitCode::FAILURE;
        }
    }
    if status == 200 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn reload(path: &std::path::Path, pid: i32) -> ExitCode {
    if check(path) != ExitCode::SUCCESS {
        eprintln!(
            "error: {}: not reloaded (the running config stays)",
            path.display()
        );
        return ExitCode::FAILURE;
    }
    let Some(target) = rustix::process::Pid::from_raw(pid).filter(|_| pid > 0) else {
        eprintln!("error: {pid} is not a process id");
        return ExitCode::FAILURE;
    };
    match rustix::process::kill_process(target, rustix::process::Signal::HUP) {
        Ok(()) => {
            println!("asked process {pid} to reload {}", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: cannot signal process {pid}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    // What start would find wrong outside the file, checked the same way
    // (as `nginx -t` opens its logs).
    let tls = match pilotfish::control::Controller::load_tls(&config) {
        Ok(tls) => tls,
        Err(e) => {
            eprintln!("error: {}: TLS material: {e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = pilotfish::access_log::check_writable(&config) {
        eprintln!("error: {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    if let Some(token) = &config.admin.token_file {
        if let Err(e) = pilotfish::admin::read_token(token) {
            eprintln!("error: {}: admin.token_file: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    print!("{}: ok\n{}", path.display(), config.summary());
    if config.listeners.is_empty() {
        eprintln!(
            "warning: {}: no listeners; only the admin endpoint serves until a config with listeners is applied",
            path.display()
        );
    }
    if let Some(t) = tls {
        let m = &t.material;
        println!(
            "tls: {} (serial {}, expires in {} s)",
            m.identity,
            m.serial,
            m.seconds_to_expiry()
        );
    }
    ExitCode::SUCCESS
}

fn run(path: &std::path::Path) -> ExitCode {
    // Before any thread starts: these read (and clear) the environment.
    let mut inherited = lifecycle::inherit::Inherited::from_env();
    let ready_fd = lifecycle::upgrade::take_ready_fd();
    let invocation = lifecycle::upgrade::Invocation::current();
    let log_handle = init_logging();
    let loaded = Config::read(path).and_then(|text| Ok((Config::parse(path, &text)?, text)));
    let (mut config, text) = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Endpoints named by host name: a first answer before serving (a
    // failed name starts empty and is asked again on the DNS thread).
    let resolved = pilotfish::dns::round(&config, &Default::default()).0;
    pilotfish::dns::fill(&mut config, &resolved);
    let notifier = Notifier::from_env();
    // The admin TCP listener, when a predecessor handed it over.
    let admin_tcp = config
        .admin
        .bind
        .and_then(|addr| inherited.take(addr).into_iter().next());
    let proxy = match Proxy::start_with(config, inherited) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "start-up failed");
            notifier.send(&format!("STATUS=start-up failed: {e}"));
            return ExitCode::FAILURE;
        }
    };
    proxy.controller().set_base(path, &text);
    proxy.controller().set_resolved(resolved);
    // Names are re-resolved while the process runs; with a control plane
    // too, whose clusters may name hosts later.
    let _dns = if proxy
        .config()
        .clusters
        .iter()
        .any(|c| !c.hostnames.is_empty())
        || proxy.config().xds.is_some()
    {
        match pilotfish::dns::spawn(proxy.controller()) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the DNS thread");
                proxy.shutdown();
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    // The control-plane client runs until this function returns (after the
    // drain): a draining proxy still takes endpoint updates.
    let _xds_client = match proxy.config().xds.clone() {
        None => None,
        Some(xds) => match start_xds(xds, proxy.controller()) {
            Ok(client) => Some(client),
            Err(e) => {
                tracing::error!(error = %e, "cannot start the control-plane client");
                proxy.shutdown();
                return ExitCode::FAILURE;
            }
        },
    };
    let draining = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let admin_config = proxy.config().admin.clone();
    let admin = match (&admin_config.socket, admin_config.bind) {
        (None, None) => None,
        (socket, tcp) => {
            let state = pilotfish::admin::State {
                control: proxy.controller(),
                draining: std::sync::Arc::clone(&draining),
                set_log_filter: Some(Box::new(move |f: &str| {
                    let filter =
                        tracing_subscriber::EnvFilter::try_new(f).map_err(|e| e.to_string())?;
                    log_handle.reload(filter).map_err(|e| e.to_string())
                })),
            };
            let tcp_token = match admin_config.token_file.as_deref() {
                None => None,
                Some(path) => match pilotfish::admin::read_token(path) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        tracing::error!(error = %e, "admin.token_file");
                        proxy.shutdown();
                        return ExitCode::FAILURE;
                    }
                },
            };
            let listen = pilotfish::admin::Listen {
                socket: socket.clone(),
                tcp,
                tcp_token,
            };
            match pilotfish::admin::Server::start_with(&listen, state, admin_tcp) {
                Ok(server) => Some(server),
                Err(e) => {
                    tracing::error!(?listen, error = %e, "cannot start the admin server");
                    proxy.shutdown();
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    // Every listener serves (and the admin server): a predecessor that
    // started this process may now drain.
    lifecycle::upgrade::report_ready(ready_fd);
    let upgrades = lifecycle::Upgrades {
        invocation,
        extra: admin
            .as_ref()
            .and_then(pilotfish::admin::Server::tcp_listener)
            .into_iter()
            .collect(),
        successor: ready_fd.is_some(),
    };
    let ran = lifecycle::run_until_stopped(
        proxy,
        Some(path.to_path_buf()),
        &notifier,
        &draining,
        &upgrades,
    );
    match ran {
        Ok(Exit::Drained) => {
            tracing::info!("drained; exiting");
            ExitCode::SUCCESS
        }
        Ok(Exit::Upgraded) => {
            // The admin socket's path and its TCP listener are the new
            // process's now: leave them as they are (no unlink, no
            // shutdown of the shared listening socket).
            std::mem::forget(admin);
            tracing::info!("upgraded and drained; exiting");
            ExitCode::SUCCESS
        }
        Ok(Exit::Forced) => ExitCode::from(1),
        Ok(Exit::WorkersGone) => {
            tracing::error!("every worker exited unasked");
            ExitCode::FAILURE
        }
        Err(e) => {
            tracing::error!(error = %e, "lifecycle failed");
            ExitCode::FAILURE
        }
    }
}

/// The xDS client's thread; it lives as long as the process.
#[cfg(feature = "xds")]
fn start_xds(
    xds: pilotfish::config::xds::Xds,
    controller: std::sync::Arc<pilotfish::control::Controller>,
) -> std::io::Result<pilotfish::xds::ads::Client> {
    pilotfish::xds::ads::spawn(xds, controller)
}

#[cfg(not(feature = "xds"))]
fn start_xds(
    _: pilotfish::config::xds::Xds,
    _: std::sync::Arc<pilotfish::control::Controller>,
) -> std::io::Result<std::convert::Infallible> {
    Err(std::io::Error::other(
        "this build has no xDS client (built without the `xds` feature)",
    ))
}

type LogHandle =
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

/// Logs to stderr, filtered by RUST_LOG (default info); the returned handle
/// swaps the filter at run time (`POST /log-level`).
fn init_logging() -> LogHandle {
    use tracing_subscriber::{layer::SubscriberExt, util::SubscriberInitExt};
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let format = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    tracing_subscriber::registry()
        .with(filter)
        .with(format)
        .init();
    handle
}
