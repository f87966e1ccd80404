//! `outrelay-controller`: parse flags and config (exit 64 with one line on any problem), then run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use outrelay_controller::config::{Overrides, Settings};

/// Exit code for an invalid configuration (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

/// OutRelay controller: registry, policy, audit, PKI and leases over gRPC.
#[derive(Debug, Parser)]
#[command(name = "outrelay-controller", version)]
struct Flags {
    /// Config file (TOML).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// State directory (database, CA, audit key); overrides `state_dir`.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// gRPC listen address; overrides `grpc.listen`.
    #[arg(long, value_name = "ADDR")]
    grpc_listen: Option<String>,
    /// Admin Unix socket ("" disables it); overrides `admin.socket_path`.
    #[arg(long, value_name = "PATH")]
    admin_socket: Option<PathBuf>,
    /// Metrics listen address ("" disables it); overrides `metrics.listen`.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// Write the bound addresses here as JSON once ready.
    #[arg(long, value_name = "PATH")]
    ready_file: Option<PathBuf>,
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, default_value = "info", env = "OUTRELAY_LOG")]
    log: String,
}

fn main() -> ExitCode {
    let flags = Flags::parse();
    let ov = Overrides {
        state_dir: flags.state_dir.clone(),
        grpc_listen: flags.grpc_listen.clone(),
        admin_socket: flags.admin_socket.clone(),
        metrics_listen: flags.metrics_listen.clone(),
    };
    let settings = match Settings::load(flags.config.as_deref(), &ov) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("outrelay-controller: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if flags.check_config {
        println!("outrelay-controller: configuration OK");
        return ExitCode::SUCCESS;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&flags.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let handle = match outrelay_controller::metrics::install() {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::warn!(error = %e, "metrics recorder not installed");
            None
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outrelay-controller: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let reload = outrelay_controller::run::Reload {
        path: flags.config.clone(),
        load: Box::new(move || {
            Settings::load(flags.config.as_deref(), &ov)
                .map(|s| s.shutdown_grace_ms)
                .map_err(|e| e.to_string())
        }),
    };
    match rt.block_on(outrelay_controller::run::run(
        settings,
        flags.ready_file.as_deref(),
        handle,
        reload,
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outrelay-controller: {e}");
            ExitCode::FAILURE
        }
    }
}
