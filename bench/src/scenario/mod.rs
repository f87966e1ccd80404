//! Scenarios and the round runner.
//!
//! A scenario owns its backend (started once per run) and measures one started target at a
//! time. [`run`] interleaves the targets within each round (round 1: direct, haproxy, …;
//! round 2: …), restarting every target per round, so slow drift on a shared machine spreads
//! over all targets instead of biasing one. Ratios to direct are taken per round, then
//! summarised (median, min, max) over the rounds. A scenario may [`Scenario::prepare`] once
//! before the rounds (the UDP scenario measures OutRelay's maximum there, to pace every target
//! at the same fraction of it).

mod abuse;
mod bulk;
mod bulk_sni;
mod connrate;
mod idle_memory;
mod latency;
mod mesh;
mod udp;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;
use tokio::runtime::Handle;

use crate::stats::Summary;
use crate::target::{Availability, Routing, RunningTarget, Target};

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
        }
    }

    /// Every scenario, in documentation order.
    pub fn all() -> [Self; 8] {
        [
            Self::Bulk,
            Self::BulkSni,
            Self::Connrate,
            Self::Latency,
            Self::IdleMemory,
            Self::Udp,
            Self::Mesh,
            Self::Abuse,
        ]
    }

    /// The targets run when `--targets` is not given.
    pub fn default_targets(self) -> &'static [&'static str] {
        match self {
            Self::Mesh => &["quinn-direct", "quinn-direct-paced", "outrelay"],
            Self::Abuse => &["outrelay"],
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
        }
    }
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
}

impl Value {
    /// The key this value is stored under in a sample's metrics.
    pub fn key(self) -> String {
        match self {
            Self::Metric(m) => m.to_owned(),
            Self::RatioToDirect(m) => format!("{m}_ratio_to_direct"),
            Self::AddedOverDirect(m) => format!("{m}_added_over_direct"),
            Self::RatioToTarget(t, m) => format!("{m}_ratio_to_{t}"),
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
    /// The backend targets forward to.
    fn backend_addr(&self) -> SocketAddr;
    /// Report columns, in order.
    fn columns(&self) -> Vec<Column>;
    /// Measures every variant through `target`; `dir` is scratch space for this measurement.
    fn measure(&mut self, target: &mut RunningTarget, dir: &Path) -> Result<Vec<Measurement>>;
    /// Lines for the report below the table (what was sent, caveats).
    fn notes(&self) -> Vec<String>;
    /// Runs once before the rounds with the available targets (default: nothing). An error is
    /// noted in the report; the rounds still run.
    fn prepare(&mut self, _targets: &[&dyn Target], _work: &Path) -> Result<()> {
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
    })
}

/// One variant of one target in one round, with derived values filled in.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Round number, from 1.
    pub round: u32,
    /// Target name.
    pub target: String,
    /// Variant, e.g. `8 streams`.
    pub variant: String,
    /// Measured and derived values by key.
    pub metrics: Metrics,
}

/// A table row: one target and variant.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Target name.
    pub target: String,
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
    if let Err(e) = scenario.prepare(&available, work) {
        eprintln!("{name}: preparation failed: {e:#}");
        prepare_failure = Some(format!(
            "preparation failed: {}",
            first_line(&format!("{e:#}"))
        ));
    }
    let mut samples = Vec::new();
    let mut failures: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for round in 1..=settings.rounds {
        for target in &available {
            let dir = work.join(format!("{name}-round{round}-{}", target.name()));
            eprintln!(
                "[{name} round {round}/{}] {}",
                settings.rounds,
                target.name()
            );
            match measure_one(scenario, *target, &dir) {
                Ok(measurements) => {
                    for m in measurements {
                        eprintln!("    {}: {}", m.variant, brief(&m.metrics));
                        samples.push(Sample {
                            round,
                            target: target.name().to_owned(),
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
                        .push(format!("round {round}: {e:#}"));
                }
            }
            std::thread::sleep(Duration::from_millis(BETWEEN_TARGETS_MS));
        }
    }
    let columns = scenario.columns();
    derive(&mut samples, &columns);
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

fn measure_one(
    scenario: &mut dyn Scenario,
    target: &dyn Target,
    dir: &Path,
) -> Result<Vec<Measurement>> {
    std::fs::create_dir_all(dir).context("creating target dir")?;
    let mut running = target.start(scenario.backend_addr(), scenario.routing(), dir)?;
    let measurements = scenario.measure(&mut running, dir)?;
    // A relay that crashed under load must not report figures from before the crash.
    running.ensure_running()?;
    Ok(measurements)
}

/// Fills in the derived values (ratios to direct or another target, added over direct) of
/// every sample, each against the reference target's sample of the same round and variant.
pub fn derive(samples: &mut [Sample], columns: &[Column]) {
    let reference = samples.to_vec();
    for s in samples.iter_mut() {
        for c in columns {
            let (target, metric, combine): (&str, &str, fn(f64, f64) -> f64) = match c.value {
                Value::Metric(_) => continue,
                Value::RatioToDirect(m) => ("direct", m, |x, d| x / d),
                Value::AddedOverDirect(m) => ("direct", m, |x, d| x - d),
                Value::RatioToTarget(t, m) => (t, m, |x, d| x / d),
            };
            let Some(d) = reference
                .iter()
                .find(|d| d.target == target && d.round == s.round && d.variant == s.variant)
            else {
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

/// Rows in target order, variants in first-measured order, each cell summarised over rounds.
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
        let mut variants: Vec<&str> = Vec::new();
        for s in &mine {
            if !variants.contains(&s.variant.as_str()) {
                variants.push(&s.variant);
            }
        }
        for v in variants {
            let mut cells = BTreeMap::new();
            for c in columns {
                let key = c.value.key();
                let values: Vec<f64> = mine
                    .iter()
                    .filter(|s| s.variant == v)
                    .filter_map(|s| s.metrics.get(&key).copied())
                    .collect();
                if let Some(summary) = Summary::of(&values) {
                    cells.insert(key, summary);
                }
            }
            rows.push(Row {
                target: name.to_owned(),
                variant: v.to_owned(),
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
        derive(&mut samples, &columns);
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
}
