//! `abuse`: a legitimate client's connection rate while one attacker from the security review
//! (2026-12) hits the relay, against the same client unattacked, in the same round on the same
//! relay. OutRelay only: the attacks aim at its own listeners (public TLS, TCP lease ports,
//! QUIC, the controller's gRPC port).
//!
//! Per round the target is started once ([`Routing::Abuse`]: controller, relay attached to it,
//! one agent with the SNI lease `demo` and the TCP lease `bulk`); then for each attack in turn:
//! settle, measure the legitimate client for one window (unattacked), start the attack, let it
//! ramp up, measure the client again for one window while the attack runs (attacked), stop the
//! attack. The relay's RSS (`/proc/<pid>/status` `VmRSS`) is sampled every 50 ms from the
//! attack's start to its end; the peak and the growth over the pre-attack sample are reported.
//! The ratio attacked / unattacked is taken per round, then summarised over rounds.
//!
//! The legitimate client of attacks 1-5 is connrate's: connect to the public listener, a TLS
//! ClientHello for `demo.outrelay.test`, the backend's 1 KiB reply, close (RST), at
//! [`LEGIT_CONCURRENCY`]. The controller flood's legitimate client is the `outrelay` CLI doing
//! `policy add` over mTLS to the controller's gRPC port (a TLS handshake, an RPC and a durable
//! write per call), [`CLI_CONCURRENCY`] at a time; its "first byte" is the call's wall time and
//! its memory column is the controller's.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use hdrhistogram::Histogram;
use tokio::runtime::Handle;

use super::connrate::{self, Load};
use super::{Column, Measurement, Metrics, Scenario, Settings, Value};
use crate::attack::{self, QuicAgent, Stop};
use crate::backend::{self, Backend, Behaviour};
use crate::client_hello::{self, ClientHello};
use crate::proc_stats::rss_bytes;
use crate::prom::{metric_sum, scrape};
use crate::stats::{Summary, latency_histogram, quantile_us, record_ns};
use crate::target::{AbuseEnds, Routing, RunningTarget};

/// Concurrent connections of the legitimate client (attacks 1-5).
const LEGIT_CONCURRENCY: usize = 8;
/// Concurrent `outrelay` CLI calls of the controller flood's legitimate client.
const CLI_CONCURRENCY: usize = 4;
/// A CLI call taking longer than this is killed and counted as an error.
const CLI_TIMEOUT_MS: u64 = 10_000;
/// Pause before each attack's unattacked window (the previous attack's sockets close).
const SETTLE_MS: u64 = 500;
/// How often the relay's RSS is sampled during an attack.
const RSS_SAMPLE_MS: u64 = 50;
/// An attack that does not wind down this long after `stop` fails the measurement.
const ATTACK_STOP_TIMEOUT_MS: u64 = 15_000;
/// The throughput target: attacked conn/s at least this fraction of unattacked.
const TARGET_RATIO: f64 = 0.8;
/// The memory target: relay RSS growth during an attack at most this (the review's H3 bound:
/// the default 48 MiB pipe budget plus 16 MiB of connection state).
const RSS_GROWTH_BUDGET_MIB: f64 = 64.0;
const MIB: f64 = 1024.0 * 1024.0;
/// The relay's gauge of bytes held in splice pipes (kernel memory, outside RSS).
const PIPE_HELD_METRIC: &str = "outrelay_relay_pipe_held_bytes";

/// The attacks, in the order they run within a round (the controller and audit ones last: a
/// wedged audit pipeline or controller does not reset between attacks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Attack {
    /// H1: clients of the `bulk` lease that never read a large body.
    StalledReaders,
    /// H2: ClientHellos naming the root host, then silence.
    RootHost,
    /// H2: connections to the public listener that send nothing.
    Slowloris,
    /// H3: OPEN_STREAM headers claiming 16 MiB, then most of it.
    OversizedFrames,
    /// M13/H4: denied (audited) OPEN_STREAMs as fast as the relay answers.
    AuditFlood,
    /// H5: anonymous TCP connections and failed TLS handshakes at the controller.
    ControllerFlood,
}

impl Attack {
    /// Every attack, in run order.
    pub const ALL: [Attack; 6] = [
        Attack::StalledReaders,
        Attack::RootHost,
        Attack::Slowloris,
        Attack::OversizedFrames,
        Attack::AuditFlood,
        Attack::ControllerFlood,
    ];

    /// The name on the command line (`--attacks`) and the report's variant.
    pub fn name(self) -> &'static str {
        match self {
            Self::StalledReaders => "stalled-readers",
            Self::RootHost => "root-host",
            Self::Slowloris => "slowloris",
            Self::OversizedFrames => "oversized-frames",
            Self::AuditFlood => "audit-flood",
            Self::ControllerFlood => "controller-flood",
        }
    }

    fn finding(self) -> &'static str {
        match self {
            Self::StalledReaders => "H1",
            Self::RootHost | Self::Slowloris => "H2",
            Self::OversizedFrames => "H3",
            Self::AuditFlood => "H4/M13",
            Self::ControllerFlood => "H5",
        }
    }

    /// The attacks named in `names` (all of them when empty), in run order.
    ///
    /// # Errors
    /// An unknown name.
    pub fn parse_list(names: &[String]) -> Result<Vec<Attack>> {
        if names.is_empty() {
            return Ok(Self::ALL.to_vec());
        }
        let mut chosen = Vec::new();
        for n in names {
            let Some(a) = Self::ALL.iter().find(|a| a.name() == n) else {
                let known: Vec<&str> = Self::ALL.iter().map(|a| a.name()).collect();
                bail!("unknown attack {n:?}; known: {}", known.join(", "));
            };
            chosen.push(*a);
        }
        chosen.sort();
        chosen.dedup();
        Ok(chosen)
    }
}

/// Attack sizes (`--quick` uses smaller ones).
#[derive(Debug, Clone, Copy)]
struct Sizes {
    stalled_readers: usize,
    /// Connections held by the root-host flood and by slowloris, in percent of the relay's
    /// pending cap (more than fit in it).
    held_pct_of_pending_cap: usize,
    oversized_streams: usize,
    oversized_bytes_per_stream: usize,
    audit_opens_max: u64,
}

const FULL: Sizes = Sizes {
    stalled_readers: 80,
    held_pct_of_pending_cap: 150,
    oversized_streams: 64,
    oversized_bytes_per_stream: 4 * 1024 * 1024,
    audit_opens_max: 200_000,
};

const QUICK: Sizes = Sizes {
    stalled_readers: 30,
    held_pct_of_pending_cap: 30,
    oversized_streams: 8,
    oversized_bytes_per_stream: 1024 * 1024,
    audit_opens_max: 20_000,
};

/// The abuse scenario: owns the hello backend (the legitimate client's) and the flood backend
/// (behind the attacked `bulk` lease).
pub struct Abuse {
    rt: Handle,
    backend: Backend,
    flood: Backend,
    hello: ClientHello,
    window: Duration,
    ramp: Duration,
    sizes: Sizes,
    attacks: Vec<Attack>,
    /// Per attack, per round: (ratio, RSS growth MiB), for the verdict notes.
    outcomes: BTreeMap<Attack, Vec<(f64, f64)>>,
    /// Per attack, the counters that rose most during it in the last round.
    risers: BTreeMap<Attack, String>,
}

impl Abuse {
    /// Starts both backends and reads the ClientHello.
    ///
    /// # Errors
    /// An unknown attack name, a backend that cannot bind.
    pub fn start(settings: &Settings, rt: &Handle) -> Result<Self> {
        Ok(Self {
            rt: rt.clone(),
            backend: backend::start(rt, Behaviour::HelloReply)?,
            flood: backend::start(rt, Behaviour::Flood)?,
            hello: client_hello::load(settings.client_hello.as_deref())?,
            window: Duration::from_secs(settings.abuse_window_s.max(1)),
            ramp: Duration::from_secs(settings.abuse_ramp_s.max(1)),
            sizes: if settings.quick { QUICK } else { FULL },
            attacks: Attack::parse_list(&settings.attacks)?,
            outcomes: BTreeMap::new(),
            risers: BTreeMap::new(),
        })
    }

    /// One attack: unattacked window, attack + ramp, attacked window, stop.
    fn one(&mut self, attack: Attack, target: &mut RunningTarget) -> Result<Metrics> {
        let ends = target
            .abuse
            .clone()
            .context("the target did not start the abuse topology (outrelay only)")?;
        std::thread::sleep(Duration::from_millis(SETTLE_MS));
        let pid = match attack {
            Attack::ControllerFlood => ends.controller_pid,
            _ => ends.relay_pid,
        };
        let rss_before = rss_bytes(pid).context("reading the RSS of the measured process")?;
        let drops_before = parse_reason_counters(&scrape(ends.relay_metrics).unwrap_or_default());
        let unattacked = self.legit(attack, &ends)?;

        let stop: Stop = Arc::new(AtomicBool::new(false));
        let db_before = controller_db_bytes(&ends.pki);
        let task = self.spawn_attack(attack, &ends, Arc::clone(&stop))?;
        // Started after a spawn that can fail, so an error never leaves the sampler running.
        let sampler = RssSampler::start(pid);
        std::thread::sleep(self.ramp);
        let attacked = self.legit(attack, &ends);
        // Pipes are kernel memory (not in RSS): read what the relay holds while still attacked.
        let pipe_held = scrape(ends.relay_metrics)
            .ok()
            .and_then(|body| metric_sum(&body, PIPE_HELD_METRIC));
        stop.store(true, Ordering::Relaxed);
        let units = self.rt.block_on(async {
            tokio::time::timeout(Duration::from_millis(ATTACK_STOP_TIMEOUT_MS), task)
                .await
                .map_err(|_| anyhow!("the attack did not stop in time"))?
                .context("attack task panicked")?
        });
        let peak = sampler.stop();
        let db_growth = controller_db_bytes(&ends.pki) as f64 - db_before as f64;
        let attacked = attacked?;
        let units = units.with_context(|| format!("mounting {}", attack.name()))?;
        let drops_after = parse_reason_counters(&scrape(ends.relay_metrics).unwrap_or_default());
        target.ensure_running()?;

        let (refused, risers) = refusals(&drops_before, &drops_after);
        self.risers.insert(attack, risers);
        let ratio = attacked.per_s / unattacked.per_s;
        let growth_mib = (peak.max(rss_before) - rss_before) as f64 / MIB;
        self.outcomes
            .entry(attack)
            .or_default()
            .push((ratio, growth_mib));
        let meets = ratio >= TARGET_RATIO && growth_mib <= RSS_GROWTH_BUDGET_MIB;
        let mut metrics = Metrics::from([
            ("base_conn_per_s".to_owned(), unattacked.per_s),
            ("attacked_conn_per_s".to_owned(), attacked.per_s),
            ("ratio".to_owned(), ratio),
            ("base_p99_ms".to_owned(), unattacked.p99_ms),
            ("attacked_p99_ms".to_owned(), attacked.p99_ms),
            ("attacked_errors".to_owned(), attacked.errors as f64),
            ("peak_rss_mib".to_owned(), peak as f64 / MIB),
            ("rss_growth_mib".to_owned(), growth_mib),
            ("attack_units".to_owned(), units as f64),
            ("refusals".to_owned(), refused),
            ("meets_target".to_owned(), if meets { 1.0 } else { 0.0 }),
            ("db_growth_kib".to_owned(), db_growth / 1024.0),
        ]);
        if let Some(bytes) = pipe_held {
            metrics.insert("pipe_held_mib".to_owned(), bytes / MIB);
        }
        Ok(metrics)
    }

    /// The legitimate client for one window.
    fn legit(&self, attack: Attack, ends: &AbuseEnds) -> Result<Legit> {
        if attack == Attack::ControllerFlood {
            return cli_load(ends, self.window);
        }
        let hello: Arc<[u8]> = self.hello.bytes.clone().into();
        let load = self.rt.block_on(connrate::load(
            ends.public_tls,
            hello,
            LEGIT_CONCURRENCY,
            self.window,
        ))?;
        Ok(Legit::from_load(&load))
    }

    fn spawn_attack(
        &self,
        attack: Attack,
        ends: &AbuseEnds,
        stop: Stop,
    ) -> Result<tokio::task::JoinHandle<Result<u64>>> {
        let held = ends.pending_conn_max * self.sizes.held_pct_of_pending_cap / 100;
        let sizes = self.sizes;
        let ramp = self.ramp;
        let ends = ends.clone();
        Ok(match attack {
            Attack::StalledReaders => self.rt.spawn(attack::stalled_readers(
                ends.bulk_front,
                sizes.stalled_readers,
                stop,
            )),
            Attack::RootHost => {
                let hello: Arc<[u8]> = attack::rustls_client_hello(ends.root_host)?.into();
                self.rt.spawn(attack::hold_connections(
                    ends.public_tls,
                    held,
                    hello,
                    ramp,
                    stop,
                ))
            }
            Attack::Slowloris => self.rt.spawn(attack::hold_connections(
                ends.public_tls,
                held,
                Arc::from(Vec::new()),
                ramp,
                stop,
            )),
            Attack::OversizedFrames => self.rt.spawn(async move {
                let agent = attacker(&ends).await?;
                let sent_bytes = attack::oversized_first_frames(
                    &agent,
                    sizes.oversized_streams,
                    sizes.oversized_bytes_per_stream,
                    stop,
                )
                .await;
                agent.close();
                // MiB, like the sizes in the notes.
                sent_bytes.map(|b| b / (1024 * 1024))
            }),
            Attack::AuditFlood => self.rt.spawn(async move {
                let agent = attacker(&ends).await?;
                let answered = attack::audit_flood(&agent, sizes.audit_opens_max, stop).await;
                agent.close();
                answered
            }),
            Attack::ControllerFlood => self
                .rt
                .spawn(attack::controller_flood(ends.controller_grpc, stop)),
        })
    }
}

async fn attacker(ends: &AbuseEnds) -> Result<QuicAgent> {
    QuicAgent::connect(ends.relay_quic, &ends.pki, "agent-2", &ends.attacker_uri).await
}

impl Scenario for Abuse {
    fn name(&self) -> &'static str {
        "abuse"
    }

    fn routing(&self) -> Routing {
        Routing::Abuse {
            flood: self.flood.addr,
        }
    }

    fn backend_addr(&self) -> SocketAddr {
        self.backend.addr
    }

    fn columns(&self) -> Vec<Column> {
        let metric = |header, decimals, key| Column {
            header,
            decimals,
            value: Value::Metric(key),
        };
        vec![
            metric("unattacked conn/s", 0, "base_conn_per_s"),
            metric("attacked conn/s", 0, "attacked_conn_per_s"),
            metric("ratio", 2, "ratio"),
            metric("p99 first byte unattacked ms", 1, "base_p99_ms"),
            metric("p99 first byte attacked ms", 1, "attacked_p99_ms"),
            metric("errors attacked", 0, "attacked_errors"),
            metric("relay peak RSS MiB", 1, "peak_rss_mib"),
            metric("RSS growth MiB", 1, "rss_growth_mib"),
            metric("relay pipes held MiB", 1, "pipe_held_mib"),
            metric("controller DB+WAL growth KiB", 0, "db_growth_kib"),
            metric("attack size", 0, "attack_units"),
            metric("relay refusals", 0, "refusals"),
            metric("meets target (1 = yes)", 0, "meets_target"),
        ]
    }

    fn measure(&mut self, target: &mut RunningTarget, _dir: &Path) -> Result<Vec<Measurement>> {
        let mut out = Vec::new();
        for attack in self.attacks.clone() {
            eprintln!("    attack {} ({})", attack.name(), attack.finding());
            let metrics = self
                .one(attack, target)
                .with_context(|| format!("attack {}", attack.name()))?;
            out.push(Measurement {
                variant: attack.name().to_owned(),
                metrics,
            });
        }
        Ok(out)
    }

    fn notes(&self) -> Vec<String> {
        let s = self.sizes;
        let held = crate::target::ABUSE_PENDING_CONN_MAX * s.held_pct_of_pending_cap / 100;
        let mut notes = vec![
            format!(
                "per attack and round: {SETTLE_MS} ms settle, a {} s unattacked window, the \
                 attack started and given {} s to ramp up, a {} s attacked window (the attack \
                 still running), then the attack stopped; ratio = attacked / unattacked conn/s \
                 per round; legitimate client (attacks 1-5): connrate's connect + ClientHello \
                 for demo.outrelay.test + 1 KiB reply + close, {LEGIT_CONCURRENCY} concurrent, \
                 through the relay's public listener; first byte = connect start to the first \
                 reply byte",
                self.window.as_secs(),
                self.ramp.as_secs(),
                self.window.as_secs()
            ),
            format!(
                "topology (attackers connect from 127.0.0.2, legitimate clients from \
                 127.0.0.1): outrelay-controller (auto approval), outrelay-relay attached to it \
                 ([ingress] pending_conn_max = {}: the 10,000 default scaled down so a flood \
                 this box can hold reaches it; every other key at its default), agent-1 with \
                 the SNI lease demo (the legitimate path) and the TCP lease bulk (a backend \
                 writing zeros forever); QUIC attackers use the dev PKI's agent-2",
                crate::target::ABUSE_PENDING_CONN_MAX
            ),
            format!(
                "attack sizes (attack size column): stalled-readers {} clients of bulk with \
                 SO_RCVBUF 4 KiB that never read (connections); root-host {held} slots each \
                 sending a rustls ClientHello for the root host then silent, reconnecting when \
                 closed or refused, at most {} new connections/s in all (connections opened); \
                 slowloris {held} slots sending nothing, the same way; oversized-frames {} streams on one QUIC connection, each an OPEN_STREAM \
                 header claiming 16 MiB then {} MiB of it (MiB the relay accepted); audit-flood denied \
                 OPEN_STREAMs, {} in flight, at most {}/s and {} in all (streams answered); \
                 controller-flood {} idle anonymous TCP connections plus {} loops of connect, \
                 1 junk byte (failed TLS handshake), close, at most {}/s in all (connections \
                 made). Rates are capped because attacker, relay and client share the same \
                 cores; each cap is above what the review says its attack needs",
                s.stalled_readers,
                attack::HOLD_CONNECTS_PER_S,
                s.oversized_streams,
                s.oversized_bytes_per_stream / (1024 * 1024),
                attack::AUDIT_IN_FLIGHT,
                attack::AUDIT_OPENS_PER_S,
                s.audit_opens_max,
                attack::CONTROLLER_IDLE_HELD,
                attack::CONTROLLER_CHURNERS,
                attack::CONTROLLER_CONNECTS_PER_S,
            ),
            format!(
                "memory: VmRSS of the relay process (controller-flood: of the controller) \
                 sampled every {RSS_SAMPLE_MS} ms from the attack's start to its end; growth = \
                 peak - the sample before the unattacked window. relay pipes held: \
                 `outrelay_relay_pipe_held_bytes` (splice pipes are kernel memory, not in RSS) \
                 read at the end of the attacked window. controller DB+WAL growth: the size of \
                 controller.db plus its WAL from the attack's start to its end (durable rows \
                 the attack caused, approximately: the WAL is reused after a checkpoint; \
                 controller-flood's includes its legitimate client's policy rows). relay \
                 refusals: the rise of \
                 every drop/refused/rejected/failed `*_total` series with a `reason` label on \
                 the relay's /metrics over the attack (refusals by named reason)"
            ),
            format!(
                "controller-flood's legitimate client: `outrelay policy add` over mTLS (dev PKI \
                 admin) to the controller's gRPC port, {CLI_CONCURRENCY} at a time; conn/s = \
                 calls/s, first byte = the call's wall time (process start included)"
            ),
            format!(
                "target (issue 15): attacked >= {TARGET_RATIO} x unattacked and RSS growth <= \
                 {RSS_GROWTH_BUDGET_MIB} MiB; meets target = 1 when both hold in that round"
            ),
        ];
        let mut verdicts = String::from("verdict (medians over rounds):");
        for (attack, rounds) in &self.outcomes {
            let ratios: Vec<f64> = rounds.iter().map(|r| r.0).collect();
            let growth: Vec<f64> = rounds.iter().map(|r| r.1).collect();
            let (Some(r), Some(g)) = (Summary::of(&ratios), Summary::of(&growth)) else {
                let _ = write!(verdicts, " {} no figure;", attack.name());
                continue;
            };
            let verdict = match (r.median >= TARGET_RATIO, g.median <= RSS_GROWTH_BUDGET_MIB) {
                (true, true) => "meets",
                (false, true) => "MISSED (throughput)",
                (true, false) => "MISSED (memory)",
                (false, false) => "MISSED (throughput and memory)",
            };
            let _ = write!(
                verdicts,
                " {} ({}) {verdict}: ratio {:.2}, growth {:.1} MiB;",
                attack.name(),
                attack.finding(),
                r.median,
                g.median
            );
        }
        notes.push(verdicts.trim_end_matches(';').to_owned());
        for (attack, risers) in &self.risers {
            if !risers.is_empty() {
                notes.push(format!(
                    "{}: relay counters with a reason that rose (last round): {risers}",
                    attack.name()
                ));
            }
        }
        notes
    }
}

/// A legitimate client's figures for one window.
struct Legit {
    per_s: f64,
    p99_ms: f64,
    errors: u64,
}

impl Legit {
    fn from_load(load: &Load) -> Self {
        Self::new(
            load.completed,
            load.errors,
            &load.first_byte,
            load.elapsed.as_secs_f64(),
        )
    }

    fn new(completed: u64, errors: u64, hist: &Histogram<u64>, seconds: f64) -> Self {
        Self {
            per_s: completed as f64 / seconds.max(f64::MIN_POSITIVE),
            p99_ms: if completed == 0 {
                f64::NAN
            } else {
                quantile_us(hist, 0.99) / 1_000.0
            },
            errors,
        }
    }
}

/// One CLI worker's calls: succeeded, failed, wall times of the successes.
type CliPart = (u64, u64, Histogram<u64>);

/// `outrelay policy add` calls against the controller for `window`, [`CLI_CONCURRENCY`] at a
/// time, each on a blocking thread (a process each).
fn cli_load(ends: &AbuseEnds, window: Duration) -> Result<Legit> {
    let deadline = Instant::now() + window;
    let start = Instant::now();
    let counter = Arc::new(AtomicU64::new(0));
    let workers: Vec<JoinHandle<Result<CliPart>>> = (0..CLI_CONCURRENCY)
        .map(|_| {
            let ends = ends.clone();
            let counter = Arc::clone(&counter);
            std::thread::spawn(move || {
                let (mut ok, mut errors) = (0, 0);
                let mut hist = latency_histogram()?;
                while Instant::now() < deadline {
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    let t = Instant::now();
                    if cli_policy_add(&ends, n)? {
                        record_ns(&mut hist, t.elapsed());
                        ok += 1;
                    } else {
                        errors += 1;
                    }
                }
                Ok((ok, errors, hist))
            })
        })
        .collect();
    let (mut ok, mut errors) = (0, 0);
    let mut hist = latency_histogram()?;
    for w in workers {
        let (o, e, h) = w.join().map_err(|_| anyhow!("CLI worker panicked"))??;
        ok += o;
        errors += e;
        hist.add(&h).context("merging histograms")?;
    }
    Ok(Legit::new(ok, errors, &hist, start.elapsed().as_secs_f64()))
}

/// One `outrelay policy add` (rule number `n`); whether it succeeded in time. Errors only when
/// the CLI cannot be started at all.
fn cli_policy_add(ends: &AbuseEnds, n: u64) -> Result<bool> {
    let pki = &ends.pki;
    let mut child = Command::new(&ends.cli)
        .arg("--controller")
        .arg(format!("https://{}", ends.controller_grpc))
        .arg("--cert")
        .arg(pki.join("admin.pem"))
        .arg("--key")
        .arg(pki.join("admin-key.pem"))
        .arg("--ca")
        .arg(pki.join("ca.pem"))
        .args(["policy", "add", "--tenant", "bench", "--caller", "*"])
        .args(["--target", &format!("svc-{n}"), "--decision", "allow"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the outrelay CLI")?;
    let deadline = Instant::now() + Duration::from_millis(CLI_TIMEOUT_MS);
    loop {
        if let Some(status) = child.try_wait().context("polling the CLI")? {
            return Ok(status.success());
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Samples one process's RSS on a thread until stopped; [`RssSampler::stop`] gives the peak.
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<u64>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            loop {
                peak = peak.max(rss_bytes(pid).unwrap_or(0));
                if flag.load(Ordering::Relaxed) {
                    return peak;
                }
                std::thread::sleep(Duration::from_millis(RSS_SAMPLE_MS));
            }
        });
        Self { stop, thread }
    }

    /// The peak RSS in bytes (0 if the process was never readable).
    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
}

/// Bytes of the controller's SQLite database and its WAL in `state_dir` now (0 for a missing
/// file). Approximate growth only: SQLite reuses the WAL after a checkpoint.
fn controller_db_bytes(state_dir: &Path) -> u64 {
    ["controller.db", "controller.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(state_dir.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

/// Words in a counter's name that make it a refusal (`*_drops_total`, `*_refused_total`,
/// `*_rejected_total`, `*_failed_total`, `*_dropped_total`); close reasons are not refusals.
const REFUSAL_WORDS: [&str; 4] = ["drop", "refus", "reject", "fail"];

/// Every refusal counter (see [`REFUSAL_WORDS`]) with a `reason` label in a Prometheus text
/// body.
fn parse_reason_counters(body: &str) -> BTreeMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let name = series.split('{').next()?;
            let refusal = REFUSAL_WORDS.iter().any(|w| name.contains(w));
            (refusal && name.ends_with("_total") && series.contains("reason=\""))
                .then(|| Some((series.to_owned(), value.parse().ok()?)))?
        })
        .collect()
}

/// The total rise of the reason counters, and the three that rose most (`series +n`).
fn refusals(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> (f64, String) {
    let mut rises: Vec<(&str, f64)> = after
        .iter()
        .map(|(k, v)| (k.as_str(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d > 0.0)
        .collect();
    rises.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total = rises.iter().fold(0.0, |sum, r| sum + r.1);
    let top: Vec<String> = rises
        .iter()
        .take(3)
        .map(|(k, d)| format!("`{k}` +{d:.0}"))
        .collect();
    (total, top.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attack_lists_parse_in_run_order_and_refuse_unknown_names() {
        assert_eq!(Attack::parse_list(&[]).expect("all"), Attack::ALL.to_vec());
        let chosen = Attack::parse_list(&["slowloris".to_owned(), "stalled-readers".to_owned()])
            .expect("known");
        assert_eq!(chosen, [Attack::StalledReaders, Attack::Slowloris]);
        assert!(Attack::parse_list(&["nope".to_owned()]).is_err());
    }

    #[test]
    fn reason_counters_are_read_and_their_rises_summed() {
        let before = parse_reason_counters(
            "# HELP x\n\
             outrelay_relay_ingress_drops_total{reason=\"pending_full\"} 3\n\
             outrelay_relay_ingress_accepted_total 100\n\
             outrelay_relay_splice_closed_total{reason=\"error\"} 5\n\
             outrelay_relay_ingress_drops_total{reason=\"no_route\"} 1\n",
        );
        assert_eq!(before.len(), 2);
        let after = parse_reason_counters(
            "outrelay_relay_ingress_drops_total{reason=\"pending_full\"} 10\n\
             outrelay_relay_ingress_drops_total{reason=\"no_route\"} 1\n\
             outrelay_relay_quic_drops_total{reason=\"frame_too_large\"} 2\n",
        );
        let (total, top) = refusals(&before, &after);
        assert_eq!(total, 9.0);
        assert!(
            top.starts_with("`outrelay_relay_ingress_drops_total{reason=\"pending_full\"}` +7")
        );
        assert!(!top.contains("no_route"), "{top}");
    }
}
