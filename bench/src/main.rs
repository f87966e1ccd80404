//! `outrelay-bench`: runs named scenarios against OutRelay and its peers (HAProxy, nginx,
//! rathole, socat, direct loopback) and reports ratios from ONE run, targets interleaved per
//! round, medians with min-max over rounds.
//!
//! Not a test suite: it asserts nothing about figures. Shared machines are noisy; only the
//! ratios between targets measured side by side mean anything.
//!
//! Layout: `target/` starts and stops what traffic goes through; `scenario/` owns a backend
//! and drives load through a started target; `report` renders; `proc_stats` reads CPU and
//! memory from /proc; `process` owns child processes and cleans up on every way out.

#![forbid(unsafe_code)]

mod attack;
mod backend;
mod client_hello;
mod lease_driver;
mod peers;
mod pinning;
mod proc_stats;
mod process;
mod prom;
mod quic_peer;
mod report;
mod scenario;
mod stats;
mod target;
mod template;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::pinning::{CpuList, Pinning};
use crate::scenario::{RoutePath, ScenarioName, Settings};
use crate::target::{AgentResume, Availability, Launch, RelayBandwidth, RelayEbpf};

/// Default round count: the minimum for a median with a spread.
const DEFAULT_ROUNDS: u32 = 3;

#[derive(Parser)]
#[command(
    version,
    about = "Benchmark OutRelay against its peers; ratios from one run"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one scenario against the targets; Markdown on stdout, progress on stderr.
    Run(Box<RunArgs>),
    /// List scenarios, and targets with their availability on this machine.
    List,
    /// The `quinn-direct` target's server (started by the harness).
    #[command(hide = true)]
    QuinnServer(quic_peer::ServerArgs),
    /// The `quinn-direct` target's client (started by the harness).
    #[command(hide = true)]
    QuinnClient(quic_peer::ClientArgs),
}

#[derive(Args)]
struct RunArgs {
    /// The scenario.
    scenario: ScenarioName,
    /// Comma-separated targets, in report order (default for mesh:
    /// quinn-direct,quinn-direct-paced,outrelay; for the others:
    /// direct,haproxy,haproxy-chain,nginx,rathole,socat,outrelay).
    #[arg(long, value_delimiter = ',')]
    targets: Option<Vec<String>>,
    /// Rounds over all targets (default 3, failover 1; 1 with --quick).
    #[arg(long)]
    rounds: Option<u32>,
    /// Short smoke run: 1 round, short durations, few connections.
    #[arg(long)]
    quick: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Install missing peers first (apt-get; cargo install rathole).
    #[arg(long)]
    install_peers: bool,
    /// Seconds per measurement for bulk, bulk-sni and mesh (default 10, quick 2), connrate
    /// (default 5, quick 1), each UDP phase (default 5, quick 1) and each abuse window
    /// (default 4, quick 1).
    #[arg(long)]
    duration_s: Option<u64>,
    /// Concurrent connections of the connrate client.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Round trips per latency measurement (default 20000, quick 2000).
    #[arg(long)]
    round_trips: Option<usize>,
    /// Idle connections per idle-memory measurement (default 1000, quick 100).
    #[arg(long)]
    connections: Option<usize>,
    /// ClientHello file for connrate (default: the proto crate's captured OpenSSL hello).
    #[arg(long)]
    client_hello: Option<PathBuf>,
    /// Comma-separated attacks of the abuse scenario (default: all of stalled-readers,
    /// root-host,slowloris,oversized-frames,audit-flood,controller-flood).
    #[arg(long, value_delimiter = ',')]
    attacks: Option<Vec<String>>,
    /// Connections per second per path of the upgrade scenario's open-loop load (default:
    /// half of the maximum a short connrate run of the same target measures first).
    #[arg(long)]
    rate: Option<u64>,
    /// Paths connrate and upgrade measure, each a row per target that routes on SNI: sni (routed on the
    /// ClientHello) and tcp (forwarded; outrelay: its TCP port lease).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [RoutePath::Sni, RoutePath::Tcp])]
    paths: Vec<RoutePath>,
    /// Comma-separated relay worker counts (e.g. 1,2): outrelay and outrelay-base run once per
    /// count in every round, as setups w=N (relay `workers = N`). Default: the relay's default.
    #[arg(long, value_delimiter = ',')]
    relay_workers: Vec<usize>,
    /// Comma-separated relay eBPF setups (issue 17): outrelay and outrelay-base run once per
    /// value in every round (after each worker count), as setups ebpf=V with the relay's
    /// `[ebpf]`: off (`mode = "off"`), reuseport, lookup or all (`mode = "on"` with that
    /// program or both). Default: no `[ebpf]` section (the relay's own default).
    #[arg(long, value_enum, value_delimiter = ',')]
    relay_ebpf: Vec<RelayEbpf>,
    /// Comma-separated agent stream resume setups (issue 19): outrelay and outrelay-base run
    /// once per value in every round (after each worker count and eBPF setup), as setups
    /// resume=V with every agent's `[resume] enabled = true` (on) or `false` (off); the first
    /// is the reference of the "x first setup" columns. Default: no `[resume]` section (the
    /// agent's own default).
    #[arg(long, value_enum, value_delimiter = ',')]
    agent_resume: Vec<AgentResume>,
    /// Comma-separated relay bandwidth setups (issue 21): outrelay and outrelay-base run once
    /// per value in every round (innermost), as setups bw=V with the relay's `[bandwidth]`
    /// lease and tenant defaults, both directions, set to V: off (every limit 0) or a rate
    /// like 200mbit, 10gbit, 1tbit (decimal bits per second). Default: no `[bandwidth]`
    /// section (the relay's own default, no limit).
    #[arg(long, value_delimiter = ',', value_parser = RelayBandwidth::parse)]
    relay_bandwidth: Vec<RelayBandwidth>,
    /// Ports in the leases scenario's lease range, each granted to a TCP lease (default
    /// 10000, quick 200). A setup whose listeners would not fit the relay's open-file limit
    /// stops at the largest count that fits and says so.
    #[arg(long)]
    lease_ports: Option<u16>,
    /// Leases the leases scenario asks for one at a time, timing grant to routable port
    /// (default 200, quick 20).
    #[arg(long)]
    grants: Option<usize>,
    /// Relay kills of the failover scenario per round (default 10, quick 2).
    #[arg(long)]
    kills: Option<u32>,
    /// CPUs (taskset list, e.g. 0 or 0-3) every process a target starts runs on
    /// (`taskset -c`); adds conn/s per target core to connrate.
    #[arg(long)]
    pin_targets: Option<CpuList>,
    /// CPUs the harness itself runs on (load generators, in-process backends, iperf3),
    /// pinned with sched_setaffinity at start.
    #[arg(long)]
    pin_load: Option<CpuList>,
}

impl RunArgs {
    fn settings(&self, names: &[String], pinning: &Pinning) -> Settings {
        let pick = |explicit: Option<u64>, normal: u64, quick: u64| {
            explicit.unwrap_or(if self.quick { quick } else { normal })
        };
        Settings {
            rounds: self
                .rounds
                .unwrap_or(if self.quick || self.scenario == ScenarioName::Failover {
                    1
                } else {
                    DEFAULT_ROUNDS
                })
                .max(1),
            bulk_duration_s: pick(self.duration_s, 10, 2),
            connrate_duration_s: pick(self.duration_s, 5, 1),
            udp_duration_s: pick(self.duration_s, 5, 1),
            connrate_concurrency: self.concurrency.max(1),
            latency_round_trips: self
                .round_trips
                .unwrap_or(if self.quick { 2_000 } else { 20_000 })
                .max(1),
            idle_connections: self
                .connections
                .unwrap_or(if self.quick { 100 } else { 1_000 })
                .max(1),
            client_hello: self.client_hello.clone(),
            quick: self.quick,
            attacks: self.attacks.clone().unwrap_or_default(),
            // Unattacked and attacked windows of abuse (--duration-s sets both).
            abuse_window_s: pick(self.duration_s, 4, 1),
            abuse_ramp_s: if self.quick { 1 } else { 2 },
            connrate_paths: self.paths.clone(),
            relay_workers: self.relay_workers.clone(),
            relay_ebpf: self.relay_ebpf.clone(),
            agent_resume: self.agent_resume.clone(),
            relay_bandwidth: self.relay_bandwidth.clone(),
            lease_ports: self
                .lease_ports
                .unwrap_or(if self.quick { 200 } else { 10_000 })
                .max(1),
            lease_grants: self
                .grants
                .unwrap_or(if self.quick { 20 } else { 200 })
                .max(1),
            pin_target_cores: pinning.target_cores(),
            compare_base: names.iter().any(|n| n == scenario::BASE_TARGET),
            upgrade_rate_per_s: self.rate,
            // The timeline: 3 s of load, the upgrade, 5 s after it ended.
            upgrade_before_s: if self.quick { 1 } else { 3 },
            upgrade_after_s: if self.quick { 2 } else { 5 },
            failover_kills: self.kills.unwrap_or(if self.quick { 2 } else { 10 }).max(1),
            launch: Launch {
                pin: pinning.taskset.clone().zip(pinning.launch_cpus.clone()),
                ..Launch::default()
            },
        }
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    process::install_signal_cleanup()?;
    match cli.command {
        Cmd::List => {
            list();
            Ok(())
        }
        Cmd::Run(args) => run(&args),
        Cmd::QuinnServer(args) => quic_peer::server(&args),
        Cmd::QuinnClient(args) => quic_peer::client(&args),
    }
}

fn list() {
    println!("scenarios:");
    for s in ScenarioName::all() {
        println!("  {:<12} {}", s.as_str(), s.description());
    }
    println!("targets:");
    for t in target::all() {
        let availability = match t.availability() {
            Availability::Available => "available".to_owned(),
            Availability::NotAvailable(reason) => format!("not available ({reason})"),
        };
        println!(
            "  {:<14} {:<40} {}",
            t.name(),
            availability,
            t.description()
        );
    }
}

fn run(args: &RunArgs) -> Result<()> {
    // Before any thread starts (tokio, the signal thread's siblings): they inherit it.
    let pinning = Pinning::apply(args.pin_targets.clone(), args.pin_load.clone())?;
    if args.relay_workers.contains(&0) {
        anyhow::bail!("--relay-workers: counts start at 1 (leave it out for the default)");
    }
    if args.paths.is_empty() {
        anyhow::bail!("--paths: name at least one of sni, tcp");
    }
    let names = args.targets.clone().unwrap_or_else(|| {
        args.scenario
            .default_targets()
            .iter()
            .map(|&t| t.to_owned())
            .collect()
    });
    let targets = target::by_names(&names)?;
    if args.install_peers {
        peers::install_missing(targets.iter().any(|t| t.name() == "rathole"))?;
    }
    let settings = args.settings(&names, &pinning);
    let env = report::Environment::collect(peers::versions(), pinning.describe());

    let work = tempfile::Builder::new()
        .prefix("outrelay-bench-")
        .tempdir()
        .context("creating the run's temp dir")?;
    process::remove_on_signal(work.path());
    // The runtime drives the in-repo backends and load generators; declared before the
    // scenario so it outlives the backends running on it.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting tokio")?;
    let mut scenario = scenario::build(args.scenario, &settings, rt.handle(), work.path())?;
    let result = scenario::run(scenario.as_mut(), &targets, &settings, work.path());
    drop(scenario);

    print!("{}", report::render_markdown(&env, &result));
    if let Some(path) = &args.json {
        let json = report::to_json(&env, &result)?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
