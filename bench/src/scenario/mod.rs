//! Scenarios and the round runner.
//!
//! A scenario owns its backend (started once per run) and measures one started target at a
//! time. [`run`] interleaves the targets within each round (round 1: direct, haproxy, …;
//! round 2: …), restarting every target per round, so slow drift on a shared machine spreads
//! over all targets instead of biasing one. Ratios to direct are taken per round, then
//! summarised (median, min, max) over the rounds. A scenario may [`Scenario::prepare`] once
//! before the rounds (the UDP scenario measures OutRelay's maximum there, to pace every target
//! at the same fraction of it).
//!
//! Within a round a target may run more than once: once per setup (OutRelay only: relay
//! worker count `--relay-workers`, relay eBPF `--relay-ebpf`, agent stream resume
//! `--agent-resume`; the row's setup `w=N ebpf=V resume=R`) and, in a scenario that measures
//! several paths (`connrate`: `sni` and `tcp`), once per path it routes differently. Derived
//! values compare like with like: the reference sample has the same round and variant, and
//! the same path and setup where the reference target measured them.

mod abuse;
mod bulk;
mod bulk_sni;
mod connrate;
mod failover;
mod idle_memory;
mod latency;
mod leases;
mod mesh;
mod udp;
mod upgrade;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;
use tokio::runtime::Handle;

use crate::stats::Summary;
use crate::target::{
    AgentResume, Availability, Launch, RelayBandwidth, RelayEbpf, Routing, RunningTarget, Target,
};

/// Pause between two targets, so sockets in TIME_WAIT and exiting processes settle.
const BETWEEN_TARGETS_MS: u64 = 300;

/// The scenarios, as named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ScenarioName {
    /// iperf3 through the target, 1 and 8 streams: Gbit/s, relay CPU, Gbit/s per relay core.
    Bulk,
    /// Bulk through the SNI path: a ClientHello, then opaque bytes, 1 and 8 streams: Gbit/s.
    BulkSni,
    /// New connections per second: connect, TLS ClientHello, 1 KiB reply, close.
    Connrate,
    /// 64-byte ping-pong over one connection: latency added over direct.
    Latency,
    /// Many idle relayed connections: user-space (PSS) and kernel slab bytes per connection.
    IdleMemory,
    /// 1200-byte UDP datagrams through a UDP lease: maximum datagrams/s, loss at 80 % of
    /// OutRelay's maximum.
    Udp,
    /// One bulk stream over QUIC, consumer → relay → provider, against a plain quinn client →
    /// server transfer: Gbit/s, CPU seconds per Gbit, ratio to quinn-direct.
    Mesh,
    /// A legitimate client's conn/s and p99 first byte with and without each attack of the
    /// 2026-12 security review (stalled readers, root-host and slowloris floods, oversized
    /// first frames, audit flood, anonymous controller flood), and the relay's peak RSS.
    Abuse,
    /// A lease range served to TCP (and TCP+UDP) leases on every port (outrelay only): relay
    /// descriptors, RSS and sockets per lease, and time from grant to routable port.
    Leases,
    /// Open-loop connections (and OutRelay's UDP lease) while the target is upgraded (OutRelay)
    /// or reloaded (HAProxy): refused, failed, first-byte p99 bump, hand-over times, UDP lost.
    Upgrade,
    /// Time for new streams through an HA consumer to succeed after `kill -9` of its relay
    /// (controller, 2 relays, both agents on both; outrelay only), relay restarted per kill.
    Failover,
}

impl ScenarioName {
    /// The name on the command line and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bulk => "bulk",
            Self::BulkSni => "bulk-sni",
            Self::Connrate => "connrate",
            Self::Latency => "latency",
            Self::IdleMemory => "idle-memory",
            Self::Udp => "udp",
            Self::Mesh => "mesh",
            Self::Abuse => "abuse",
            Self::Leases => "leases",
            Self::Upgrade => "upgrade",
            Self::Failover => "failover",
        }
    }

    /// Every scenario, in documentation order.
    pub fn all() -> [Self; 11] {
        [
            Self::Bulk,
            Self::BulkSni,
            Self::Connrate,
            Self::Latency,
            Self::IdleMemory,
            Self::Udp,
            Self::Mesh,
            Self::Abuse,
            Self::Leases,
            Self::Upgrade,
            Self::Failover,
        ]
    }

    /// The targets run when `--targets` is not given.
    pub fn default_targets(self) -> &'static [&'static str] {
        match self {
            Self::Mesh => &["quinn-direct", "quinn-direct-paced", "outrelay"],
            Self::Abuse | Self::Leases | Self::Failover => &["outrelay"],
            Self::Upgrade => &["haproxy", "haproxy-classic", "outrelay"],
            _ => &[
                "direct",
                "haproxy",
                "haproxy-chain",
                "nginx",
                "rathole",
                "socat",
                "outrelay",
            ],
        }
    }

    /// One line on what it measures.
    pub fn description(self) -> &'static str {
        match self {
            Self::Bulk => "iperf3 1 and 8 streams: Gbit/s, x direct, relay CPU s, Gbit/s per core",
            Self::BulkSni => {
                "ClientHello then bulk bytes, 1 and 8 streams, SNI-routed: Gbit/s, x direct"
            }
            Self::Connrate => "connect + TLS ClientHello + 1 KiB reply + close: conn/s, p50/p99",
            Self::Latency => "64 B ping-pong on one connection: p50/p99/p99.9 added over direct",
            Self::IdleMemory => "N idle relayed connections: PSS and kernel slab bytes per conn",
            Self::Udp => "1200 B UDP datagrams: max datagrams/s, loss % at 80 % of outrelay's max",
            Self::Mesh => {
                "1 QUIC stream bulk, consumer -> relay -> provider: CPU s per Gbit, x quinn"
            }
            Self::Abuse => {
                "conn/s and p99 under each attack vs unattacked, relay peak RSS (outrelay only)"
            }
            Self::Leases => {
                "N-port lease range all leased: relay fds/RSS per lease, grant -> routable ms"
            }
            Self::Upgrade => {
                "open-loop conns during an upgrade/reload: refused, failed, p99 bump, UDP lost"
            }
            Self::Failover => {
                "kill -9 of an HA consumer's relay: ms to a new stream ok (median of N kills)"
            }
        }
    }
}

/// A path `connrate` measures (`--paths`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RoutePath {
    /// Routed on the ClientHello's server name (OutRelay: the public TLS listener).
    Sni,
    /// Forwarded without looking (OutRelay: the agent's TCP port lease).
    Tcp,
}

/// Knobs for one run, already resolved from `--quick` and the explicit flags.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// Rounds over all targets.
    pub rounds: u32,
    /// Transfer time per measurement of bulk, bulk-sni and mesh.
    pub bulk_duration_s: u64,
    /// Load time per connrate measurement.
    pub connrate_duration_s: u64,
    /// Concurrent connections of the connrate client.
    pub connrate_concurrency: usize,
    /// Round trips per latency measurement.
    pub latency_round_trips: usize,
    /// Idle connections per idle-memory measurement.
    pub idle_connections: usize,
    /// Send time per UDP measurement (saturation and paced phases each).
    pub udp_duration_s: u64,
    /// ClientHello file for connrate (default: the proto crate's captured OpenSSL hello).
    pub client_hello: Option<PathBuf>,
    /// `--quick` was given (scenarios with sizes of their own, abuse, shrink them).
    pub quick: bool,
    /// Attacks of the abuse scenario, by name (empty: all).
    pub attacks: Vec<String>,
    /// Each of the abuse scenario's two windows (unattacked, attacked).
    pub abuse_window_s: u64,
    /// Time an abuse attack runs before its attacked window starts.
    pub abuse_ramp_s: u64,
    /// Paths `connrate` measures, in report order.
    pub connrate_paths: Vec<RoutePath>,
    /// Relay worker counts OutRelay targets run with, each a setup `w=N` (empty: the relay's
    /// default, one setup).
    pub relay_workers: Vec<usize>,
    /// Relay eBPF setups OutRelay targets run with, each a setup `ebpf=V` after the worker
    /// count (empty: no `[ebpf]` section, one setup).
    pub relay_ebpf: Vec<RelayEbpf>,
    /// Agent stream resume setups OutRelay targets run with, each a setup `resume=V` after
    /// the eBPF setup (empty: no `[resume]` section, one setup).
    pub agent_resume: Vec<AgentResume>,
    /// Relay bandwidth setups OutRelay targets run with, each a setup `bw=V` after the resume
    /// setup (empty: no `[bandwidth]` section, one setup).
    pub relay_bandwidth: Vec<RelayBandwidth>,
    /// Ports in the leases scenario's range (each granted to a lease).
    pub lease_ports: u16,
    /// Leases the leases scenario times one at a time (grant to routable port).
    pub lease_grants: usize,
    /// Cores of `--pin-targets` (the divisor of the per-target-core figures), when given.
    pub pin_target_cores: Option<usize>,
    /// Whether `outrelay-base` is among the targets (the "x base" columns appear).
    pub compare_base: bool,
    /// The upgrade scenario's load in connections per second per path (`--rate`; `None`:
    /// half of the maximum a short connrate run of the same target measured).
    pub upgrade_rate_per_s: Option<u64>,
    /// The upgrade scenario's load before the upgrade.
    pub upgrade_before_s: u64,
    /// The upgrade scenario's load after the upgrade ended.
    pub upgrade_after_s: u64,
    /// Relay kills of the failover scenario per started target.
    pub failover_kills: u32,
    /// How targets' processes are launched (pinning); the runner sets the worker count.
    #[serde(skip)]
    pub launch: Launch,
}

#[cfg(test)]
impl Settings {
    /// The defaults of a full run, for tests.
    pub fn example() -> Self {
        Self {
            rounds: 3,
            bulk_duration_s: 10,
            connrate_duration_s: 5,
            udp_duration_s: 5,
            connrate_concurrency: 32,
            latency_round_trips: 20_000,
            idle_connections: 1_000,
            client_hello: None,
            quick: false,
            attacks: Vec::new(),
            abuse_window_s: 4,
            abuse_ramp_s: 2,
            connrate_paths: vec![RoutePath::Sni, RoutePath::Tcp],
            relay_workers: Vec::new(),
            relay_ebpf: Vec::new(),
            agent_resume: Vec::new(),
            relay_bandwidth: Vec::new(),
            lease_ports: 10_000,
            lease_grants: 200,
            pin_target_cores: None,
            compare_base: false,
            upgrade_rate_per_s: None,
            upgrade_before_s: 3,
            upgrade_after_s: 5,
            failover_kills: 10,
            launch: Launch::default(),
        }
    }
}

/// Metric values by key (`gbps`, `p50_us`, …), for one variant of one measurement.
pub type Metrics = BTreeMap<String, f64>;

/// What one scenario measured for one variant (e.g. "8 streams") of one target in one round.
#[derive(Debug, Clone)]
pub struct Measurement {
    /// The variant, e.g. `1 stream`.
    pub variant: String,
    /// Its metrics.
    pub metrics: Metrics,
}

/// Where a report column's value comes from.
#[derive(Debug, Clone, Copy, Serialize)]
pub enum Value {
    /// A measured metric.
    Metric(&'static str),
    /// The metric divided by direct's in the same round and variant.
    RatioToDirect(&'static str),
    /// The metric minus direct's in the same round and variant.
    AddedOverDirect(&'static str),
    /// The metric divided by the named target's in the same round and variant
    /// (`RatioToTarget("rathole", "dgram_per_s")`).
    RatioToTarget(&'static str, &'static str),
    /// The metric divided by the same target's first setup (the first `--relay-workers`
    /// count, `--relay-ebpf` and `--agent-resume` value) in the same round, variant and path.
    RatioToFirstSetup(&'static str),
    /// For `outrelay` and `outrelay-base` rows only: the metric divided by `outrelay-base`'s
    /// in the same round and variant (same path and setup where it has them).
    RatioToBase(&'static str),
}

/// The target [`Value::RatioToBase`] divides by.
pub const BASE_TARGET: &str = "outrelay-base";

impl Value {
    /// The key this value is stored under in a sample's metrics.
    pub fn key(self) -> String {
        match self {
            Self::Metric(m) => m.to_owned(),
            Self::RatioToDirect(m) => format!("{m}_ratio_to_direct"),
            Self::AddedOverDirect(m) => format!("{m}_added_over_direct"),
            Self::RatioToTarget(t, m) => format!("{m}_ratio_to_{t}"),
            Self::RatioToFirstSetup(m) => format!("{m}_ratio_to_first_setup"),
            Self::RatioToBase(m) => format!("{m}_ratio_to_base"),
        }
    }
}

/// One column of a scenario's report table.
#[derive(Debug, Clone, Serialize)]
pub struct Column {
    /// The table header, with units.
    pub header: &'static str,
    /// Decimals shown.
    pub decimals: usize,
    /// Where the value comes from.
    pub value: Value,
}

/// A benchmark scenario: its backend runs for the whole run; [`Scenario::measure`] runs the
/// load through one started target.
pub trait Scenario {
    /// The scenario's name.
    fn name(&self) -> &'static str;
    /// How targets should route (SNI for the TLS scenario, TCP otherwise).
    fn routing(&self) -> Routing;
    /// Every routing measured, each a path of its own when there are several (default: just
    /// [`Scenario::routing`]).
    fn routings(&self) -> Vec<Routing> {
        vec![self.routing()]
    }
    /// The backend targets forward to.
    fn backend_addr(&self) -> SocketAddr;
    /// Report columns, in order.
    fn columns(&self) -> Vec<Column>;
    /// Measures every variant through `target`; `dir` is scratch space for this measurement.
    fn measure(&mut self, target: &mut RunningTarget, dir: &Path) -> Result<Vec<Measurement>>;
    /// Lines for the report below the table (what was sent, caveats).
    fn notes(&self) -> Vec<String>;
    /// Runs once before the rounds with the available targets, launched with `launch`
    /// (default: nothing). An error is noted in the report; the rounds still run.
    fn prepare(&mut self, _targets: &[&dyn Target], _work: &Path, _launch: &Launch) -> Result<()> {
        Ok(())
    }
}

/// Starts the named scenario's backend.
pub fn build(
    name: ScenarioName,
    settings: &Settings,
    rt: &Handle,
    dir: &Path,
) -> Result<Box<dyn Scenario>> {
    Ok(match name {
        ScenarioName::Bulk => Box::new(bulk::Bulk::start(settings, dir)?),
        ScenarioName::BulkSni => Box::new(bulk_sni::BulkSni::start(settings, rt)?),
        ScenarioName::Connrate => Box::new(connrate::Connrate::start(settings, rt)?),
        ScenarioName::Latency => Box::new(latency::Latency::start(settings, rt)?),
        ScenarioName::IdleMemory => Box::new(idle_memory::IdleMemory::start(settings, rt)?),
        ScenarioName::Udp => Box::new(udp::Udp::start(settings)?),
        ScenarioName::Mesh => Box::new(mesh::Mesh::start(settings, rt)?),
        ScenarioName::Abuse => Box::new(abuse::Abuse::start(settings, rt)?),
        ScenarioName::Leases => Box::new(leases::Leases::start(settings, rt)),
        ScenarioName::Upgrade => Box::new(upgrade::Upgrade::start(settings, rt)?),
        ScenarioName::Failover => Box::new(failover::Failover::start(settings, rt)?),
    })
}

/// One variant of one target in one round, with derived values filled in.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Round number, from 1.
    pub round: u32,
    /// Target name.
    pub target: String,
    /// The target's setup, e.g. `w=2` (empty: the default).
    pub setup: String,
    /// The path, e.g. `sni` or `tcp` (empty: the scenario measures one).
    pub path: String,
    /// Variant, e.g. `8 streams`.
    pub variant: String,
    /// Measured and derived values by key.
    pub metrics: Metrics,
}

/// A table row: one target, setup, path and variant.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Target name.
    pub target: String,
    /// The target's setup (`w=2`; empty: the default).
    pub setup: String,
    /// The path (`sni`, `tcp`; empty: the scenario measures one).
    pub path: String,
    /// Variant (empty for a target that produced nothing).
    pub variant: String,
    /// Summaries by value key (see [`Value::key`]); missing when not applicable (`–`).
    pub cells: BTreeMap<String, Summary>,
    /// Set when the target was not measured at all: `not available (…)` or `failed: …`.
    pub status: Option<String>,
}

/// Everything a scenario run produced.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    /// Scenario name.
    pub scenario: String,
    /// Rounds run.
    pub rounds: u32,
    /// Settings used.
    pub settings: Settings,
    /// Report columns.
    pub columns: Vec<Column>,
    /// Summarised rows, targets in the order given, variants in measurement order.
    pub rows: Vec<Row>,
    /// Every sample, for re-analysis.
    pub samples: Vec<Sample>,
    /// Notes from the scenario and failures by round.
    pub notes: Vec<String>,
}

/// Runs `scenario` over `targets` for `settings.rounds` rounds, targets interleaved per round.
/// A target failing in one round is noted and measured again in the next.
pub fn run(
    scenario: &mut dyn Scenario,
    targets: &[Box<dyn Target>],
    settings: &Settings,
    work: &Path,
) -> ScenarioResult {
    let name = scenario.name();
    let mut unavailable = BTreeMap::new();
    let mut available = Vec::new();
    for t in targets {
        let routing = scenario.routing();
        let availability = if !t.supports(routing) {
            Availability::NotAvailable(routing.unsupported_reason().to_owned())
        } else {
            t.availability()
        };
        match availability {
            Availability::Available => available.push(t.as_ref()),
            Availability::NotAvailable(reason) => {
                eprintln!("{}: not available ({reason}); skipped", t.name());
                unavailable.insert(t.name(), reason);
            }
        }
    }
    let mut prepare_failure = None;
    if let Err(e) = scenario.prepare(&available, work, &settings.launch) {
        eprintln!("{name}: preparation failed: {e:#}");
        prepare_failure = Some(format!(
            "preparation failed: {}",
            first_line(&format!("{e:#}"))
        ));
    }
    let mut samples = Vec::new();
    let mut failures: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let routings = scenario.routings();
    for round in 1..=settings.rounds {
        for target in &available {
            for (setup, launch) in setups(*target, settings) {
                for (path, routing) in paths(&routings, *target) {
                    let label = [setup.as_str(), path]
                        .iter()
                        .filter(|l| !l.is_empty())
                        .copied()
                        .collect::<Vec<_>>()
                        .join(" ");
                    let suffix = if label.is_empty() {
                        String::new()
                    } else {
                        format!(" ({label})")
                    };
                    let dir = work.join(format!(
                        "{name}-round{round}-{}{}",
                        target.name(),
                        label.replace(' ', "-").replace('=', "")
                    ));
                    eprintln!(
                        "[{name} round {round}/{}] {}{suffix}",
                        settings.rounds,
                        target.name()
                    );
                    match measure_one(scenario, *target, routing, &launch, &dir) {
                        Ok(measurements) => {
                            for m in measurements {
                                eprintln!("    {}: {}", m.variant, brief(&m.metrics));
                                samples.push(Sample {
                                    round,
                                    target: target.name().to_owned(),
                                    setup: setup.clone(),
                                    path: path.to_owned(),
                                    variant: m.variant,
                                    metrics: m.metrics,
                                });
                            }
                        }
                        Err(e) => {
                            eprintln!("    failed: {e:#}");
                            failures
                                .entry(target.name())
                                .or_default()
                                .push(format!("round {round}{suffix}: {e:#}"));
                        }
                    }
                    std::thread::sleep(Duration::from_millis(BETWEEN_TARGETS_MS));
                }
            }
        }
    }
    let columns = comparable_columns(scenario.columns(), targets);
    let first_setup = setup_labels(settings)
        .into_iter()
        .next()
        .map_or_else(String::new, |(label, _)| label);
    derive(&mut samples, &columns, &first_setup);
    let rows = summarise(targets, &samples, &columns, &unavailable, &failures);
    let mut notes = scenario.notes();
    notes.extend(prepare_failure);
    for (target, errors) in &failures {
        for e in errors {
            notes.push(format!("{target} failed in {}", first_line(e)));
        }
    }
    ScenarioResult {
        scenario: name.to_owned(),
        rounds: settings.rounds,
        settings: settings.clone(),
        columns,
        rows,
        samples,
        notes,
    }
}

/// `columns` without those that divide by (or subtract) a target that is not in the run: they
/// could only ever show `–`.
fn comparable_columns(mut columns: Vec<Column>, targets: &[Box<dyn Target>]) -> Vec<Column> {
    let named = |name: &str| targets.iter().any(|t| t.name() == name);
    columns.retain(|c| match c.value {
        Value::RatioToDirect(_) | Value::AddedOverDirect(_) => named("direct"),
        Value::RatioToTarget(t, _) => named(t),
        Value::RatioToBase(_) => named(BASE_TARGET),
        Value::Metric(_) | Value::RatioToFirstSetup(_) => true,
    });
    columns
}

/// The setups `target` runs with in each round: for a target that takes them, one per
/// `--relay-workers` count, `--relay-ebpf`, `--agent-resume` and `--relay-bandwidth` value,
/// workers outermost, bandwidth innermost (`w=N ebpf=V resume=R bw=B`, each part left out when
/// not asked for), else the default (empty label).
fn setups(target: &dyn Target, settings: &Settings) -> Vec<(String, Launch)> {
    if !target.takes_relay_workers() {
        return vec![(String::new(), settings.launch.clone())];
    }
    setup_labels(settings)
}

/// Every setup of a target that takes relay workers, in run order: its label and
/// `settings.launch` with its worker count, eBPF setup and agent resume set (one unlabelled
/// default when no list was given).
fn setup_labels(settings: &Settings) -> Vec<(String, Launch)> {
    fn each<T: Copy>(values: &[T]) -> Vec<Option<T>> {
        if values.is_empty() {
            vec![None]
        } else {
            values.iter().copied().map(Some).collect()
        }
    }
    let mut all = Vec::new();
    for w in each(&settings.relay_workers) {
        for e in each(&settings.relay_ebpf) {
            for r in each(&settings.agent_resume) {
                for b in each(&settings.relay_bandwidth) {
                    let parts: Vec<String> = w
                        .map(|n| format!("w={n}"))
                        .into_iter()
                        .chain(e.map(|e| format!("ebpf={}", e.as_str())))
                        .chain(r.map(|r| format!("resume={}", r.as_str())))
                        .chain(b.map(|b| format!("bw={}", b.as_label())))
                        .collect();
                    let launch = Launch {
                        relay_workers: w,
                        relay_ebpf: e,
                        agent_resume: r,
                        relay_bandwidth: b,
                        ..settings.launch.clone()
                    };
                    all.push((parts.join(" "), launch));
                }
            }
        }
    }
    all
}

/// Whether a target that takes relay workers runs more than one setup per round (the
/// "x first setup" columns then mean something).
pub fn several_setups(settings: &Settings) -> bool {
    setup_labels(settings).len() > 1
}

/// The paths `target` runs, labelled: with one routing, that routing unlabelled; with several,
/// each by its [`Routing::path_label`], except that a target which does not route on SNI
/// runs its one path once (as `tcp` when the scenario measures TCP).
fn paths(routings: &[Routing], target: &dyn Target) -> Vec<(&'static str, Routing)> {
    if let [only] = routings {
        return vec![("", *only)];
    }
    let mut all: Vec<(&'static str, Routing)> =
        routings.iter().map(|r| (r.path_label(), *r)).collect();
    if !target.routes_sni() {
        let has_tcp = routings.contains(&Routing::Tcp);
        all.retain(|(_, r)| !(has_tcp && matches!(r, Routing::Sni(_))));
    }
    all
}

fn measure_one(
    scenario: &mut dyn Scenario,
    target: &dyn Target,
    routing: Routing,
    launch: &Launch,
    dir: &Path,
) -> Result<Vec<Measurement>> {
    std::fs::create_dir_all(dir).context("creating target dir")?;
    let mut running = target.start(scenario.backend_addr(), routing, dir, launch)?;
    let measurements = scenario.measure(&mut running, dir)?;
    // A relay that crashed under load must not report figures from before the crash.
    running.ensure_running()?;
    Ok(measurements)
}

/// Fills in the derived values (ratios to direct, another target or the first setup, added
/// over direct) of every sample, each against the reference target's sample of the same
/// round and variant: of those, the one with the same path and setup, else the same path,
/// else the same setup, else the first ([`reference_sample`]). `first_setup` is the setup
/// [`Value::RatioToFirstSetup`] divides by (`w=1` of `--relay-workers 1,2`).
pub fn derive(samples: &mut [Sample], columns: &[Column], first_setup: &str) {
    let reference = samples.to_vec();
    for s in samples.iter_mut() {
        for c in columns {
            let (target, metric, combine): (&str, &str, fn(f64, f64) -> f64) = match c.value {
                Value::Metric(_) => continue,
                Value::RatioToDirect(m) => ("direct", m, |x, d| x / d),
                Value::AddedOverDirect(m) => ("direct", m, |x, d| x - d),
                Value::RatioToTarget(t, m) => (t, m, |x, d| x / d),
                Value::RatioToFirstSetup(m) => (s.target.as_str(), m, |x, d| x / d),
                Value::RatioToBase(_) if s.target != "outrelay" && s.target != BASE_TARGET => {
                    continue;
                }
                Value::RatioToBase(m) => (BASE_TARGET, m, |x, d| x / d),
            };
            let d = if let Value::RatioToFirstSetup(_) = c.value {
                if s.setup.is_empty() {
                    continue;
                }
                reference.iter().find(|d| {
                    d.target == s.target
                        && d.round == s.round
                        && d.variant == s.variant
                        && d.path == s.path
                        && d.setup == first_setup
                })
            } else {
                reference_sample(&reference, target, s)
            };
            let Some(d) = d else {
                continue;
            };
            if let (Some(x), Some(dv)) = (s.metrics.get(metric), d.metrics.get(metric)) {
                let v = combine(*x, *dv);
                if v.is_finite() {
                    s.metrics.insert(c.value.key(), v);
                }
            }
        }
    }
}

/// The sample of `target` that `s` is compared with: same round and variant; of those the
/// best match on path (first) and setup (second).
fn reference_sample<'a>(reference: &'a [Sample], target: &str, s: &Sample) -> Option<&'a Sample> {
    let mut best: Option<(&Sample, (bool, bool))> = None;
    let candidates = reference
        .iter()
        .filter(|d| d.target == target && d.round == s.round && d.variant == s.variant);
    for d in candidates {
        let rank = (d.path == s.path, d.setup == s.setup);
        // Strictly better only: of equals the first measured wins.
        if best.is_none_or(|(_, b)| rank > b) {
            best = Some((d, rank));
        }
    }
    best.map(|(d, _)| d)
}

/// Rows in target order, setups, paths and variants in first-measured order, each cell
/// summarised over rounds.
pub fn summarise(
    targets: &[Box<dyn Target>],
    samples: &[Sample],
    columns: &[Column],
    unavailable: &BTreeMap<&str, String>,
    failures: &BTreeMap<&str, Vec<String>>,
) -> Vec<Row> {
    let mut rows = Vec::new();
    for t in targets {
        let name = t.name();
        if let Some(reason) = unavailable.get(name) {
            rows.push(status_row(name, format!("not available ({reason})")));
            continue;
        }
        let mine: Vec<&Sample> = samples.iter().filter(|s| s.target == name).collect();
        if mine.is_empty() {
            let why = failures
                .get(name)
                .and_then(|f| f.first())
                .map_or("no samples".to_owned(), |e| first_line(e));
            rows.push(status_row(name, format!("failed: {why}")));
            continue;
        }
        let mut keys: Vec<(&str, &str, &str)> = Vec::new();
        for s in &mine {
            let key = (s.setup.as_str(), s.path.as_str(), s.variant.as_str());
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        for (setup, path, variant) in keys {
            let mut cells = BTreeMap::new();
            for c in columns {
                let key = c.value.key();
                let values: Vec<f64> = mine
                    .iter()
                    .filter(|s| s.setup == setup && s.path == path && s.variant == variant)
                    .filter_map(|s| s.metrics.get(&key).copied())
                    .collect();
                if let Some(summary) = Summary::of(&values) {
                    cells.insert(key, summary);
                }
            }
            rows.push(Row {
                target: name.to_owned(),
                setup: setup.to_owned(),
                path: path.to_owned(),
                variant: variant.to_owned(),
                cells,
                status: None,
            });
        }
    }
    rows
}

fn status_row(target: &str, status: String) -> Row {
    Row {
        target: target.to_owned(),
        setup: String::new(),
        path: String::new(),
        variant: String::new(),
        cells: BTreeMap::new(),
        status: Some(status),
    }
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().to_owned()
}

fn brief(metrics: &Metrics) -> String {
    let parts: Vec<String> = metrics.iter().map(|(k, v)| format!("{k}={v:.2}")).collect();
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(round: u32, target: &str, variant: &str, metric: &str, value: f64) -> Sample {
        Sample {
            round,
            target: target.to_owned(),
            setup: String::new(),
            path: String::new(),
            variant: variant.to_owned(),
            metrics: BTreeMap::from([(metric.to_owned(), value)]),
        }
    }

    #[test]
    fn ratios_and_additions_are_taken_per_round_and_variant() {
        let columns = vec![
            Column {
                header: "x",
                decimals: 1,
                value: Value::Metric("gbps"),
            },
            Column {
                header: "r",
                decimals: 2,
                value: Value::RatioToDirect("gbps"),
            },
            Column {
                header: "a",
                decimals: 1,
                value: Value::AddedOverDirect("gbps"),
            },
        ];
        let mut samples = vec![
            sample(1, "direct", "1 stream", "gbps", 20.0),
            sample(1, "haproxy", "1 stream", "gbps", 15.0),
            sample(2, "direct", "1 stream", "gbps", 10.0),
            sample(2, "haproxy", "1 stream", "gbps", 9.0),
            sample(1, "haproxy", "8 streams", "gbps", 5.0), // no direct for this variant
        ];
        derive(&mut samples, &columns, "");
        let key = Value::RatioToDirect("gbps").key();
        assert_eq!(samples[1].metrics[&key], 0.75);
        assert_eq!(samples[3].metrics[&key], 0.9);
        assert_eq!(samples[0].metrics[&key], 1.0);
        assert_eq!(
            samples[1].metrics[&Value::AddedOverDirect("gbps").key()],
            -5.0
        );
        assert!(!samples[4].metrics.contains_key(&key));

        let targets = crate::target::by_names(&[
            "direct".to_owned(),
            "haproxy".to_owned(),
            "outrelay".to_owned(),
            "socat".to_owned(),
        ])
        .expect("known targets");
        let unavailable = BTreeMap::from([("outrelay", "relay not built yet".to_owned())]);
        let failures = BTreeMap::from([("socat", vec!["round 1: boom\ndetail".to_owned()])]);
        let rows = summarise(&targets, &samples, &columns, &unavailable, &failures);
        let shape: Vec<(&str, &str)> = rows
            .iter()
            .map(|r| (r.target.as_str(), r.variant.as_str()))
            .collect();
        assert_eq!(
            shape,
            [
                ("direct", "1 stream"),
                ("haproxy", "1 stream"),
                ("haproxy", "8 streams"),
                ("outrelay", ""),
                ("socat", "")
            ]
        );
        let ratio = rows[1].cells[&key];
        assert_eq!((ratio.median, ratio.min, ratio.max), (0.825, 0.75, 0.9));
        assert_eq!(
            rows[3].status.as_deref(),
            Some("not available (relay not built yet)")
        );
        assert_eq!(rows[4].status.as_deref(), Some("failed: round 1: boom"));
    }

    fn labelled(target: &str, setup: &str, path: &str, value: f64) -> Sample {
        Sample {
            setup: setup.to_owned(),
            path: path.to_owned(),
            ..sample(1, target, "c=32", "conn_per_s", value)
        }
    }

    #[test]
    fn comparisons_pick_the_same_path_and_setup_and_fall_back_to_the_only_one() {
        let columns = [
            Value::RatioToTarget("haproxy-chain", "conn_per_s"),
            Value::RatioToTarget("rathole", "conn_per_s"),
            Value::RatioToBase("conn_per_s"),
            Value::RatioToFirstSetup("conn_per_s"),
        ]
        .map(|value| Column {
            header: "x",
            decimals: 2,
            value,
        });
        let mut samples = vec![
            labelled("haproxy-chain", "", "sni", 100.0),
            labelled("haproxy-chain", "", "tcp", 200.0),
            labelled("rathole", "", "tcp", 50.0),
            labelled("outrelay", "w=1", "sni", 300.0),
            labelled("outrelay", "w=1", "tcp", 400.0),
            labelled("outrelay", "w=2", "sni", 600.0),
            labelled("outrelay", "w=2", "tcp", 1000.0),
            labelled("outrelay-base", "w=1", "sni", 150.0),
            labelled("outrelay-base", "w=1", "tcp", 100.0),
            labelled("outrelay-base", "w=2", "sni", 200.0),
            labelled("outrelay-base", "w=2", "tcp", 500.0),
        ];
        derive(&mut samples, &columns, "w=1");
        let get = |i: usize, c: usize| samples[i].metrics.get(&columns[c].value.key()).copied();
        // The peer's same path: sni with sni, tcp with tcp.
        assert_eq!(get(3, 0), Some(3.0));
        assert_eq!(get(4, 0), Some(2.0));
        // rathole measured tcp only: every path compares with it.
        assert_eq!(get(3, 1), Some(6.0));
        assert_eq!(get(6, 1), Some(20.0));
        // The base's same setup and path.
        assert_eq!(get(5, 2), Some(3.0));
        assert_eq!(get(6, 2), Some(2.0));
        assert_eq!(get(4, 2), Some(4.0));
        // The first worker count of the same target and path.
        assert_eq!(get(5, 3), Some(2.0));
        assert_eq!(get(6, 3), Some(2.5));
        assert_eq!(get(4, 3), Some(1.0));
        assert_eq!(get(10, 3), Some(5.0));
        // No setups, no x first w; x base on the outrelay targets only.
        assert_eq!(get(0, 3), None);
        assert_eq!(get(0, 2), None);
        assert_eq!(get(8, 2), Some(1.0));
        // The first setup is the first count asked for, not the first one measured.
        let mut reversed: Vec<Sample> = samples.iter().rev().cloned().collect();
        for s in &mut reversed {
            s.metrics.retain(|k, _| k == "conn_per_s");
        }
        derive(&mut reversed, &columns, "w=1");
        let key = columns[3].value.key();
        assert_eq!(reversed[4].metrics.get(&key), Some(&2.5));
        assert_eq!(reversed[6].metrics.get(&key), Some(&1.0));
    }

    /// A target for the runner's expansion tests: routes SNI or not, takes workers or not.
    struct Fake {
        sni: bool,
        workers: bool,
    }

    impl Target for Fake {
        fn name(&self) -> &'static str {
            "fake"
        }
        fn description(&self) -> &'static str {
            "test target"
        }
        fn availability(&self) -> Availability {
            Availability::Available
        }
        fn routes_sni(&self) -> bool {
            self.sni
        }
        fn takes_relay_workers(&self) -> bool {
            self.workers
        }
        fn start(
            &self,
            _backend: SocketAddr,
            _routing: Routing,
            _dir: &Path,
            _launch: &Launch,
        ) -> Result<RunningTarget> {
            anyhow::bail!("never started")
        }
    }

    #[test]
    fn columns_against_a_target_outside_the_run_are_left_out() {
        let column = |value| Column {
            header: "x",
            decimals: 0,
            value,
        };
        let all = vec![
            column(Value::Metric("conn_per_s")),
            column(Value::RatioToDirect("conn_per_s")),
            column(Value::AddedOverDirect("p50_us")),
            column(Value::RatioToTarget("rathole", "conn_per_s")),
            column(Value::RatioToTarget("haproxy-chain", "conn_per_s")),
            column(Value::RatioToBase("conn_per_s")),
            column(Value::RatioToFirstSetup("conn_per_s")),
        ];
        let targets = crate::target::by_names(&["outrelay".to_owned(), "rathole".to_owned()])
            .expect("known targets");
        let kept: Vec<String> = comparable_columns(all.clone(), &targets)
            .iter()
            .map(|c| c.value.key())
            .collect();
        assert_eq!(
            kept,
            [
                "conn_per_s",
                "conn_per_s_ratio_to_rathole",
                "conn_per_s_ratio_to_first_setup"
            ]
        );
        let everyone = crate::target::by_names(
            &[
                "direct",
                "rathole",
                "haproxy-chain",
                "outrelay",
                "outrelay-base",
            ]
            .map(str::to_owned),
        )
        .expect("known targets");
        assert_eq!(comparable_columns(all.clone(), &everyone).len(), all.len());
    }

    #[test]
    fn targets_that_route_sni_run_both_paths_and_the_others_one() {
        const SNI: Routing = Routing::Sni("demo.outrelay.test");
        let router = Fake {
            sni: true,
            workers: false,
        };
        let forwarder = Fake {
            sni: false,
            workers: false,
        };
        let both = [SNI, Routing::Tcp];
        assert_eq!(paths(&both, &router), [("sni", SNI), ("tcp", Routing::Tcp)]);
        assert_eq!(paths(&both, &forwarder), [("tcp", Routing::Tcp)]);
        // One routing: unlabelled, whoever the target.
        assert_eq!(paths(&[SNI], &forwarder), [("", SNI)]);
        assert_eq!(paths(&[Routing::Tcp], &router), [("", Routing::Tcp)]);
        // SNI only, several paths asked of a forwarder that has no TCP path: it still runs.
        assert_eq!(paths(&[SNI, SNI], &forwarder).len(), 2);
    }

    #[test]
    fn relay_worker_counts_become_setups_of_the_targets_that_take_them() {
        let mut settings = Settings::example();
        let relay = Fake {
            sni: true,
            workers: true,
        };
        let peer = Fake {
            sni: true,
            workers: false,
        };
        assert_eq!(
            setups(&relay, &settings),
            [(String::new(), Launch::default())]
        );
        settings.relay_workers = vec![1, 4];
        let got = setups(&relay, &settings);
        let labels: Vec<&str> = got.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(labels, ["w=1", "w=4"]);
        assert_eq!(got[1].1.relay_workers, Some(4));
        assert_eq!(
            setups(&peer, &settings),
            [(String::new(), Launch::default())]
        );
    }

    #[test]
    fn ebpf_setups_follow_each_worker_count_and_the_first_is_the_reference() {
        let mut settings = Settings::example();
        let relay = Fake {
            sni: true,
            workers: true,
        };
        settings.relay_ebpf = vec![RelayEbpf::Off, RelayEbpf::Reuseport];
        let got = setups(&relay, &settings);
        let labels: Vec<&str> = got.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(labels, ["ebpf=off", "ebpf=reuseport"]);
        assert_eq!(got[1].1.relay_ebpf, Some(RelayEbpf::Reuseport));
        assert_eq!(got[1].1.relay_workers, None);
        assert!(several_setups(&settings));
        settings.relay_workers = vec![1, 2];
        let got = setups(&relay, &settings);
        let labels: Vec<&str> = got.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(
            labels,
            [
                "w=1 ebpf=off",
                "w=1 ebpf=reuseport",
                "w=2 ebpf=off",
                "w=2 ebpf=reuseport"
            ]
        );
        assert_eq!(
            (got[3].1.relay_workers, got[3].1.relay_ebpf),
            (Some(2), Some(RelayEbpf::Reuseport))
        );
        // A peer runs once, unlabelled; one setup alone compares with nothing.
        let peer = Fake {
            sni: true,
            workers: false,
        };
        assert_eq!(setups(&peer, &settings).len(), 1);
        settings.relay_workers = vec![2];
        settings.relay_ebpf = vec![RelayEbpf::Lookup];
        assert!(!several_setups(&settings));
    }

    #[test]
    fn bandwidth_setups_come_after_resume_and_reach_the_launch() {
        let mut settings = Settings::example();
        settings.agent_resume = vec![AgentResume::Off];
        settings.relay_bandwidth = vec![
            RelayBandwidth { bits_per_s: 0 },
            RelayBandwidth {
                bits_per_s: 200_000_000,
            },
        ];
        let got = setup_labels(&settings);
        let labels: Vec<&str> = got.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(labels, ["resume=off bw=off", "resume=off bw=200mbit"]);
        assert_eq!(
            got[1].1.relay_bandwidth.map(|b| b.bits_per_s),
            Some(200_000_000)
        );
    }

    #[test]
    fn bandwidth_rates_parse_in_decimal_bits_and_print_back() {
        let p = |t: &str| RelayBandwidth::parse(t).map(|b| b.bits_per_s);
        assert_eq!(p("off"), Ok(0));
        assert_eq!(p("200mbit"), Ok(200_000_000));
        assert_eq!(p("1.5Gbit"), Ok(1_500_000_000));
        assert_eq!(p("10gbit"), Ok(10_000_000_000));
        assert!(p("10gb").is_err() && p("fast").is_err() && p("-1mbit").is_err());
        assert!(p("100tbit").is_err());
        let b = RelayBandwidth {
            bits_per_s: 8_000_000,
        };
        assert_eq!(b.as_label(), "8mbit");
        assert!(
            b.config_section()
                .contains("lease_to_client_bytes_per_s = 1000000\n")
        );
        assert!(
            b.config_section()
                .contains("tenant_to_service_bytes_per_s = 1000000\n")
        );
    }

    #[test]
    fn resume_setups_come_last_in_the_label_and_reach_the_launch() {
        let mut settings = Settings::example();
        let relay = Fake {
            sni: true,
            workers: true,
        };
        settings.agent_resume = vec![AgentResume::Off, AgentResume::On];
        let got = setups(&relay, &settings);
        let labels: Vec<&str> = got.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(labels, ["resume=off", "resume=on"]);
        assert_eq!(got[0].1.agent_resume, Some(AgentResume::Off));
        assert_eq!(got[1].1.agent_resume, Some(AgentResume::On));
        assert_eq!((got[1].1.relay_workers, got[1].1.relay_ebpf), (None, None));
        assert!(several_setups(&settings));
        // Combined with the relay's setups: workers outermost, resume innermost.
        settings.relay_workers = vec![1, 2];
        settings.relay_ebpf = vec![RelayEbpf::Off];
        let got = setups(&relay, &settings);
        let labels: Vec<&str> = got.iter().map(|(l, _)| l.as_str()).collect();
        assert_eq!(
            labels,
            [
                "w=1 ebpf=off resume=off",
                "w=1 ebpf=off resume=on",
                "w=2 ebpf=off resume=off",
                "w=2 ebpf=off resume=on"
            ]
        );
        assert_eq!(
            (
                got[2].1.relay_workers,
                got[2].1.relay_ebpf,
                got[2].1.agent_resume
            ),
            (Some(2), Some(RelayEbpf::Off), Some(AgentResume::Off))
        );
        // The first setup is the reference of the x first setup columns.
        let mut samples = vec![
            labelled("outrelay", "w=1 ebpf=off resume=off", "", 100.0),
            labelled("outrelay", "w=1 ebpf=off resume=on", "", 97.0),
        ];
        let column = Column {
            header: "x",
            decimals: 2,
            value: Value::RatioToFirstSetup("conn_per_s"),
        };
        derive(&mut samples, &[column], &setup_labels(&settings)[0].0);
        assert_eq!(samples[1].metrics["conn_per_s_ratio_to_first_setup"], 0.97);
        // A peer runs once, unlabelled, without a [resume] section.
        let peer = Fake {
            sni: true,
            workers: false,
        };
        assert_eq!(
            setups(&peer, &settings),
            [(String::new(), Launch::default())]
        );
        // One value alone is one setup: nothing to compare.
        settings.relay_workers.clear();
        settings.relay_ebpf.clear();
        settings.agent_resume = vec![AgentResume::On];
        assert!(!several_setups(&settings));
    }
}
