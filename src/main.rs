//! The `pilotfish` binary: parse the command line, hand over to the library.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use pilotfish::{
    lifecycle::{self, notify::Notifier, Exit},
    Config, Proxy,
};

const EXAMPLES: &str = "\
Examples:
  pilotfish check --config config/l4.toml     validate a config, print a summary
  pilotfish run --config config/l4.toml       run the sidecar in the foreground
  RUST_LOG=debug pilotfish run -c my.toml     with per-connection logs

Signals: SIGTERM/SIGINT drain (stop accepting, let connections finish up to
drain_timeout, exit 0); a second one exits at once.
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Run { config } => run(&config),
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            print!("{}: ok\n{}", path.display(), config.summary());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(path: &std::path::Path) -> ExitCode {
    init_logging();
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let notifier = Notifier::from_env();
    let proxy = match Proxy::start(config) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "start-up failed");
            notifier.send(&format!("STATUS=start-up failed: {e}"));
            return ExitCode::FAILURE;
        }
    };
    match lifecycle::run_until_stopped(proxy, &notifier) {
        Ok(Exit::Drained) => {
            tracing::info!("drained; exiting");
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

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
