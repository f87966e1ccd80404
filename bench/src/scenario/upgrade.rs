//! `upgrade` (issue 20): what clients see while the target is handed over to a new process.
//!
//! Per target and path (`sni`: routed on the ClientHello; `tcp`: OutRelay's TCP lease,
//! HAProxy's TCP frontend) and round: a short connrate run measures the maximum rate (unless
//! `--rate` gives one), then an open-loop load at half of it (connect, ClientHello, read the
//! backend's 1 KiB reply, close; one probe every 1/rate s whatever the earlier ones do) runs
//! for the warm-up window, the target is upgraded while the load goes on, and the load keeps
//! running until the settle window after the upgrade ended. Each probe is echoed (first-byte
//! latency), refused (ECONNREFUSED) or failed (reset, early close, wrong bytes, timeout).
//!
//! - `outrelay`: `outrelay-relay upgrade --admin-socket <the relay's>`; then the relay's admin
//!   socket (now the new process's) is polled with `status` until `drain.agents` counts the
//!   bench's agent. A UDP lease echoed through the agent gets a numbered datagram every
//!   millisecond for the whole load; the lost ones are counted.
//! - `haproxy`: master-worker (`-W -S`), `stats socket … expose-fd listeners`, reloaded with
//!   `kill -USR2 <master>` (the seamless reload); done when the master lists a new worker.
//! - `haproxy-classic`: `haproxy -sf <old pid>` without a listener hand-over; done when the old
//!   process has exited.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{Column, Measurement, Metrics, RoutePath, Scenario, Settings, Value};
use crate::backend::{self, Backend, Behaviour, REPLY_BYTE, REPLY_BYTES};
use crate::client_hello::{self, ClientHello, DEMO_SNI};
use crate::stats::{latency_histogram, quantile_us, record_ns};
use crate::target::{Routing, RunningTarget, UpgradeEnds};

/// A probe taking longer than this counts as failed.
const PROBE_TIMEOUT_MS: u64 = 5_000;
/// Probes in flight at most; a tick finding none free is skipped and counted apart (the load
/// generator, not the target, fell behind).
const IN_FLIGHT_MAX: usize = 2_000;
/// The "during" window: probes started this long after the upgrade began.
const DURING_MS: u64 = 1_000;
/// How long the connrate run that measures the maximum rate lasts.
const MAX_RATE_PROBE_MS: u64 = 1_500;
/// Concurrent connections of that connrate run.
const MAX_RATE_CONCURRENCY: usize = 32;
/// How long a hand-over may take before the round fails.
const HANDOVER_TIMEOUT_MS: u64 = 30_000;
/// Interval of the UDP lease's numbered datagrams.
const UDP_INTERVAL_US: u64 = 1_000;
/// Bytes of each UDP datagram (a sequence number, padded).
const UDP_PAYLOAD_BYTES: usize = 64;
/// How long the UDP path gets to echo a first datagram before the load starts.
const UDP_WARM_UP_MS: u64 = 5_000;
/// How long late UDP echoes are waited for after the last datagram.
const UDP_DRAIN_MS: u64 = 500;

/// The upgrade scenario: owns the hello backend and the UDP echo server.
pub struct Upgrade {
    rt: Handle,
    backend: Backend,
    udp_echo: UdpEcho,
    hello: ClientHello,
    paths: Vec<RoutePath>,
    /// `--rate`; `None`: half of the maximum measured per measurement.
    rate_per_s: Option<u64>,
    before: Duration,
    after: Duration,
}

impl Upgrade {
    /// Loads the ClientHello and starts the backends.
    pub fn start(settings: &Settings, rt: &Handle) -> Result<Self> {
        Ok(Self {
            rt: rt.clone(),
            backend: backend::start(rt, Behaviour::HelloReply)?,
            udp_echo: UdpEcho::start()?,
            hello: client_hello::load(settings.client_hello.as_deref())?,
            paths: settings.connrate_paths.clone(),
            rate_per_s: settings.upgrade_rate_per_s,
            before: Duration::from_secs(settings.upgrade_before_s),
            after: Duration::from_secs(settings.upgrade_after_s),
        })
    }

    fn routing_of(&self, path: RoutePath) -> Routing {
        Routing::Upgrade {
            sni: match path {
                RoutePath::Sni => Some(DEMO_SNI),
                RoutePath::Tcp => None,
            },
            udp_echo: self.udp_echo.addr,
        }
    }
}

impl Scenario for Upgrade {
    fn name(&self) -> &'static str {
        "upgrade"
    }

    fn routing(&self) -> Routing {
        self.routing_of(RoutePath::Sni)
    }

    fn routings(&self) -> Vec<Routing> {
        self.paths.iter().map(|p| self.routing_of(*p)).collect()
    }

    fn backend_addr(&self) -> SocketAddr {
        self.backend.addr
    }

    fn columns(&self) -> Vec<Column> {
        let column = |header, decimals, key| Column {
            header,
            decimals,
            value: Value::Metric(key),
        };
        vec![
            column("load conn/s", 0, "rate_per_s"),
            column("probes", 0, "probes"),
            column("refused", 0, "refused"),
            column("failed", 0, "failed"),
            column("client skipped", 0, "client_skipped"),
            column("p50 before µs", 0, "p50_before_us"),
            column("p99 before µs", 0, "p99_before_us"),
            column("p50 during µs", 0, "p50_during_us"),
            column("p99 during µs", 0, "p99_during_us"),
            column("p99 bump x", 2, "p99_bump"),
            column("upgrade ms", 0, "upgrade_ms"),
            column("agents moved ms", 0, "agents_moved_ms"),
            column("UDP sent", 0, "udp_sent"),
            column("UDP lost", 0, "udp_lost"),
        ]
    }

    fn measure(&mut self, target: &mut RunningTarget, _dir: &Path) -> Result<Vec<Measurement>> {
        let ends = target
            .upgrade
            .clone()
            .context("the target was not started for an upgrade")?;
        if let UpgradeEnds::Outrelay { relay_bin, .. } = &ends {
            ensure_upgrade_command(relay_bin)?;
        }
        let hello: Arc<[u8]> = self.hello.bytes.clone().into();
        let front = target.front;
        // One probe first: a routing mistake fails here with its reason, not as a count.
        match self.rt.block_on(probe(front, &hello)) {
            Outcome::Echoed(_) | Outcome::Skipped => {}
            Outcome::Refused => bail!("the first connection through the target was refused"),
            Outcome::Failed(why) => bail!("the first connection through the target failed: {why}"),
        }
        let rate_per_s = match self.rate_per_s {
            Some(r) => r.max(1),
            None => {
                let load = self.rt.block_on(super::connrate::load(
                    front,
                    Arc::clone(&hello),
                    MAX_RATE_CONCURRENCY,
                    Duration::from_millis(MAX_RATE_PROBE_MS),
                ))?;
                let elapsed_ms = u64::try_from(load.elapsed.as_millis())
                    .unwrap_or(u64::MAX)
                    .max(1);
                (load.completed * 1_000 / elapsed_ms / 2).max(1)
            }
        };
        let udp = match &ends {
            UpgradeEnds::Outrelay { udp_front, .. } => Some(UdpPing::start(*udp_front)?),
            _ => None,
        };

        let stop = Arc::new(AtomicBool::new(false));
        let load = self.rt.spawn(open_loop(
            front,
            Arc::clone(&hello),
            rate_per_s,
            Arc::clone(&stop),
        ));
        let load_start = Instant::now();
        std::thread::sleep(self.before);
        let upgrade_start = Instant::now();
        let handover = hand_over(target, &ends, upgrade_start);
        let upgrade_end = Instant::now();
        let settle_until = upgrade_end + self.after;
        let agents_moved = match (&handover, &ends) {
            (
                Ok(_),
                UpgradeEnds::Outrelay {
                    admin_socket,
                    agents,
                    ..
                },
            ) => Some(wait_agents(admin_socket, *agents, upgrade_start)),
            _ => None,
        };
        if let Some(left) = settle_until.checked_duration_since(Instant::now()) {
            std::thread::sleep(left);
        }
        stop.store(true, Ordering::Relaxed);
        let probes = self.rt.block_on(load).context("load task panicked")??;
        let udp = udp.map(UdpPing::finish).transpose()?;
        let handover = handover?;
        let agents_moved = agents_moved.transpose()?;

        let at_upgrade = upgrade_start - load_start;
        let during_until = at_upgrade + Duration::from_millis(DURING_MS);
        let before_from = at_upgrade.saturating_sub(self.before);
        let mut before = latency_histogram()?;
        let mut during = latency_histogram()?;
        let (mut refused, mut failed, mut skipped) = (0_u64, 0_u64, 0_u64);
        let mut reasons: Vec<String> = Vec::new();
        for (at, outcome) in &probes {
            match outcome {
                Outcome::Echoed(first) if *at >= before_from && *at < at_upgrade => {
                    record_ns(&mut before, *first);
                }
                Outcome::Echoed(first) if *at >= at_upgrade && *at < during_until => {
                    record_ns(&mut during, *first);
                }
                Outcome::Echoed(_) => {}
                Outcome::Refused => refused += 1,
                Outcome::Skipped => skipped += 1,
                Outcome::Failed(why) => {
                    failed += 1;
                    if reasons.len() < 3 {
                        reasons.push(format!("{why} at {at:?}"));
                    }
                }
            }
        }
        if !reasons.is_empty() {
            eprintln!(
                "    failed probes (upgrade at {at_upgrade:?}): {}",
                reasons.join("; ")
            );
        }
        if before.is_empty() || during.is_empty() {
            bail!("no probe echoed before or during the upgrade");
        }
        let p99_before = quantile_us(&before, 0.99);
        let p99_during = quantile_us(&during, 0.99);
        let mut metrics = Metrics::from([
            ("rate_per_s".to_owned(), rate_per_s as f64),
            ("probes".to_owned(), (probes.len() as u64 - skipped) as f64),
            ("client_skipped".to_owned(), skipped as f64),
            ("refused".to_owned(), refused as f64),
            ("failed".to_owned(), failed as f64),
            ("p50_before_us".to_owned(), quantile_us(&before, 0.50)),
            ("p99_before_us".to_owned(), p99_before),
            ("p50_during_us".to_owned(), quantile_us(&during, 0.50)),
            ("p99_during_us".to_owned(), p99_during),
            ("p99_bump".to_owned(), p99_during / p99_before.max(1.0)),
            (
                "upgrade_ms".to_owned(),
                (handover.done - upgrade_start).as_secs_f64() * 1e3,
            ),
        ]);
        if let Some(moved) = agents_moved {
            metrics.insert("agents_moved_ms".to_owned(), moved.as_secs_f64() * 1e3);
        }
        if let Some(u) = udp {
            metrics.insert("udp_sent".to_owned(), u.sent as f64);
            metrics.insert("udp_lost".to_owned(), (u.sent - u.echoed) as f64);
        }
        // OutRelay's new relay is not the harness's child: stop it with the round.
        drop(handover.new_relay);
        Ok(vec![Measurement {
            variant: "open loop".to_owned(),
            metrics,
        }])
    }

    fn notes(&self) -> Vec<String> {
        vec![
            format!("ClientHello: {}", self.hello.source),
            format!(
                "per round, target and path: {}; then open-loop load (connect, \
                 ClientHello, 1 KiB reply, close; RST close) for {} s, the upgrade, and load \
                 until {} s after it ended; refused = ECONNREFUSED, failed = reset, early \
                 close, wrong bytes or no reply within {PROBE_TIMEOUT_MS} ms; client skipped = \
                 ticks with {IN_FLIGHT_MAX} probes already in flight (the load generator fell \
                 behind: not made, not counted as probes)",
                match self.rate_per_s {
                    Some(r) => format!("--rate {r} conn/s"),
                    None => format!(
                        "half of the maximum of a connrate run ({MAX_RATE_CONCURRENCY} \
                         connections for {MAX_RATE_PROBE_MS} ms)"
                    ),
                },
                self.before.as_secs(),
                self.after.as_secs(),
            ),
            format!(
                "before = probes started in the {} s before the upgrade began, during = in \
                 the {DURING_MS} ms after; p99 bump = p99 during / p99 before",
                self.before.as_secs()
            ),
            "upgrade ms: outrelay: `outrelay-relay upgrade` until it exits; haproxy \
             (master-worker, expose-fd listeners): `kill -USR2 <master>` until the master \
             lists a new worker; haproxy-classic: `haproxy -sf <old>` started until the old \
             process exited"
                .to_owned(),
            format!(
                "agents moved ms (outrelay): from the upgrade's start until the relay's admin \
                 socket (the new process's) counts every agent in `status` drain.agents; UDP \
                 (outrelay): a {UDP_PAYLOAD_BYTES} B numbered datagram every \
                 {UDP_INTERVAL_US} µs through a UDP lease echoed by the agent's UDP target, \
                 for the whole load, lost = sent - echoed after a {UDP_DRAIN_MS} ms drain"
            ),
        ]
    }
}

/// Errors with the reason when `relay_bin` has no `upgrade` subcommand (a build before
/// issue 20's hand-over).
fn ensure_upgrade_command(relay_bin: &Path) -> Result<()> {
    let out = std::process::Command::new(relay_bin)
        .args(["upgrade", "--help"])
        .output()
        .with_context(|| format!("running {} upgrade --help", relay_bin.display()))?;
    if !out.status.success() {
        bail!(
            "{} has no `upgrade` command (a build without issue 20's hand-over)",
            relay_bin.display()
        );
    }
    Ok(())
}

/// What one probe saw.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// The whole reply came back; the time from connect start to its first byte.
    Echoed(Duration),
    /// The connect was refused (ECONNREFUSED).
    Refused,
    /// Reset, early close, wrong bytes or timeout.
    Failed(String),
    /// Not made: [`IN_FLIGHT_MAX`] probes were in flight (the client fell behind).
    Skipped,
}

/// One connection: connect, ClientHello, read the 1 KiB reply and check it, close with RST.
async fn probe(front: SocketAddr, hello: &[u8]) -> Outcome {
    let limit = Duration::from_millis(PROBE_TIMEOUT_MS);
    match tokio::time::timeout(limit, probe_inner(front, hello)).await {
        Ok(outcome) => outcome,
        Err(_) => Outcome::Failed(format!("no reply within {limit:?}")),
    }
}

async fn probe_inner(front: SocketAddr, hello: &[u8]) -> Outcome {
    let start = Instant::now();
    let mut stream = match TcpStream::connect(front).await {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Outcome::Refused,
        Err(e) => return Outcome::Failed(format!("connect: {e}")),
    };
    let _ = stream.set_nodelay(true);
    // RST on close: the client never piles up TIME_WAIT at these rates.
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    if let Err(e) = stream.write_all(hello).await {
        return Outcome::Failed(format!("write: {e}"));
    }
    let mut reply = [0_u8; REPLY_BYTES];
    let n = match stream.read(&mut reply).await {
        Ok(0) => return Outcome::Failed("closed before the reply".to_owned()),
        Ok(n) => n,
        Err(e) => return Outcome::Failed(format!("read: {e}")),
    };
    let first_byte = start.elapsed();
    if let Err(e) = stream.read_exact(&mut reply[n..]).await {
        return Outcome::Failed(format!("reading the rest of the reply: {e}"));
    }
    if reply.iter().any(|&b| b != REPLY_BYTE) {
        return Outcome::Failed("wrong bytes in the reply".to_owned());
    }
    Outcome::Echoed(first_byte)
}

/// Probes started at `rate_per_s` (open loop: on schedule, whatever earlier probes do) until
/// `stop`; each with its start offset from the load's start.
async fn open_loop(
    front: SocketAddr,
    hello: Arc<[u8]>,
    rate_per_s: u64,
    stop: Arc<AtomicBool>,
) -> Result<Vec<(Duration, Outcome)>> {
    let period = Duration::from_nanos(1_000_000_000 / rate_per_s.max(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let slots = Arc::new(Semaphore::new(IN_FLIGHT_MAX));
    let mut running = JoinSet::new();
    let mut results = Vec::new();
    let start = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let at = start.elapsed();
                match Arc::clone(&slots).try_acquire_owned() {
                    Ok(slot) => {
                        let hello = Arc::clone(&hello);
                        running.spawn(async move {
                            let outcome = probe(front, &hello).await;
                            drop(slot);
                            (at, outcome)
                        });
                    }
                    Err(_) => results.push((at, Outcome::Skipped)),
                }
            }
            Some(done) = running.join_next(), if !running.is_empty() => {
                results.push(done.context("probe panicked")?);
            }
        }
    }
    while let Some(done) = running.join_next().await {
        results.push(done.context("probe panicked")?);
    }
    results.sort_by_key(|(at, _)| *at);
    Ok(results)
}

/// A finished hand-over.
struct Handover {
    /// When the new process served (see the notes for each target).
    done: Instant,
    /// OutRelay's new relay, stopped when dropped.
    new_relay: Option<StopOnDrop>,
}

/// Hands `target` over to a new process as its kind does; `start` is when it began.
fn hand_over(target: &mut RunningTarget, ends: &UpgradeEnds, start: Instant) -> Result<Handover> {
    let deadline = start + Duration::from_millis(HANDOVER_TIMEOUT_MS);
    match ends {
        UpgradeEnds::Outrelay {
            relay_bin,
            admin_socket,
            relay_pid,
            ..
        } => {
            let out = std::process::Command::new(relay_bin)
                .arg("upgrade")
                .arg("--admin-socket")
                .arg(admin_socket)
                .output()
                .context("running outrelay-relay upgrade")?;
            let done = Instant::now();
            // The old relay exits by itself once its pairs end.
            target.retire(*relay_pid);
            if !out.status.success() {
                bail!(
                    "outrelay-relay upgrade failed ({}): {}{}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let answer: serde_json::Value =
                serde_json::from_slice(&out.stdout).with_context(|| {
                    format!("upgrade answer {}", String::from_utf8_lossy(&out.stdout))
                })?;
            let new_pid = answer["new_pid"]
                .as_i64()
                .and_then(|p| i32::try_from(p).ok())
                .with_context(|| format!("no new_pid in the upgrade answer {answer}"))?;
            if answer["upgraded"] != serde_json::Value::Bool(true) {
                bail!("the upgrade answer says it did not upgrade: {answer}");
            }
            Ok(Handover {
                done,
                new_relay: Some(StopOnDrop(new_pid)),
            })
        }
        UpgradeEnds::HaproxyMaster {
            master_socket,
            master_pid,
        } => {
            let old = loop {
                let workers = show_proc(master_socket).unwrap_or_default();
                if !workers.is_empty() {
                    break workers;
                }
                if Instant::now() >= deadline {
                    bail!("the HAProxy master lists no worker");
                }
                std::thread::sleep(Duration::from_millis(5));
            };
            kill(pid_of(*master_pid), Signal::SIGUSR2).context("kill -USR2 haproxy master")?;
            loop {
                // The master re-executes itself: its socket is briefly gone.
                let workers = show_proc(master_socket).unwrap_or_default();
                if !workers.is_empty() && workers.iter().all(|w| !old.contains(w)) {
                    return Ok(Handover {
                        done: Instant::now(),
                        new_relay: None,
                    });
                }
                if Instant::now() >= deadline {
                    bail!("no new HAProxy worker {HANDOVER_TIMEOUT_MS} ms after the reload");
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        UpgradeEnds::HaproxyClassic {
            binary,
            config,
            pid,
            launch,
            dir,
        } => {
            let args = [
                "-db".to_owned(),
                "-f".to_owned(),
                config.display().to_string(),
                "-sf".to_owned(),
                pid.to_string(),
            ];
            let new = launch.spawn("haproxy-reloaded", binary, &args, dir)?;
            target.adopt(new);
            target.retire(*pid);
            loop {
                if gone(*pid) {
                    return Ok(Handover {
                        done: Instant::now(),
                        new_relay: None,
                    });
                }
                if Instant::now() >= deadline {
                    bail!("the old HAProxy {pid} still runs {HANDOVER_TIMEOUT_MS} ms after -sf");
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

/// Polls the relay's admin socket (`status`) until `drain.agents` reaches `agents`; the time
/// from `start`.
fn wait_agents(admin_socket: &Path, agents: u64, start: Instant) -> Result<Duration> {
    let deadline = start + Duration::from_millis(HANDOVER_TIMEOUT_MS);
    let mut last: String;
    loop {
        match admin_command(admin_socket, "status") {
            Ok(status) => {
                if status["drain"]["agents"].as_u64() >= Some(agents) {
                    return Ok(start.elapsed());
                }
                last = status["drain"].to_string();
            }
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() >= deadline {
            bail!(
                "the new relay did not count {agents} agent(s) within {HANDOVER_TIMEOUT_MS} \
                 ms: {last}"
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One admin socket command: a line out, a JSON line back.
fn admin_command(socket: &Path, command: &str) -> Result<serde_json::Value> {
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(format!("{command}\n").as_bytes())?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    serde_json::from_str(answer.trim()).with_context(|| format!("admin answer {answer:?}"))
}

/// The current workers' pids from the HAProxy master CLI's `show proc`.
fn show_proc(master_socket: &Path) -> Result<Vec<u32>> {
    let mut stream = UnixStream::connect(master_socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(b"show proc\n")?;
    // The master CLI answers, then closes once our side has closed.
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(current_workers(&text))
}

/// The pids listed under `# workers` (not `# old workers`) in `show proc` output.
fn current_workers(show_proc: &str) -> Vec<u32> {
    let mut workers = Vec::new();
    let mut in_workers = false;
    for line in show_proc.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            in_workers = line.trim_start_matches('#').trim() == "workers";
            continue;
        }
        if in_workers {
            let mut words = line.split_whitespace();
            if let (Some(pid), Some("worker")) = (words.next(), words.next())
                && let Ok(pid) = pid.parse()
            {
                workers.push(pid);
            }
        }
    }
    workers
}

fn pid_of(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX))
}

/// Whether `pid` has exited (gone, or a zombie not reaped yet).
fn gone(pid: u32) -> bool {
    kill(pid_of(pid), None).is_err()
        || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                == Some("Z")
        })
}

/// OutRelay's new relay (not the harness's child): SIGTERM on drop, SIGKILL if it lingers.
struct StopOnDrop(i32);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let pid = Pid::from_raw(self.0);
        if kill(pid, Signal::SIGTERM).is_err() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if gone(self.0.unsigned_abs()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = kill(pid, Signal::SIGKILL);
    }
}

/// A UDP echo server on 127.0.0.1 (a thread), the target behind OutRelay's UDP lease.
struct UdpEcho {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UdpEcho {
    fn start() -> Result<Self> {
        let socket = UdpSocket::bind("127.0.0.1:0").context("binding the UDP echo")?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let addr = socket.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("udp-echo".into())
            .spawn(move || {
                let mut buf = [0_u8; 2048];
                while !flag.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = socket.recv_from(&mut buf) {
                        let _ = socket.send_to(&buf[..n], from);
                    }
                }
            })
            .context("starting the UDP echo thread")?;
        Ok(Self {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Numbered datagrams to a UDP lease every [`UDP_INTERVAL_US`], echoes counted once each.
struct UdpPing {
    stop: Arc<AtomicBool>,
    sender: std::thread::JoinHandle<u64>,
    receiver: std::thread::JoinHandle<HashSet<u64>>,
}

/// What the UDP ping counted.
struct UdpCount {
    sent: u64,
    echoed: u64,
}

impl UdpPing {
    /// Waits for a first echo through `front` (the path is up), then starts sending.
    fn start(front: SocketAddr) -> Result<Self> {
        let socket = UdpSocket::bind("127.0.0.1:0").context("binding the UDP ping")?;
        socket.connect(front).context("connecting the UDP ping")?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let deadline = Instant::now() + Duration::from_millis(UDP_WARM_UP_MS);
        let mut buf = [0_u8; UDP_PAYLOAD_BYTES];
        loop {
            buf[..8].copy_from_slice(&u64::MAX.to_be_bytes());
            let _ = socket.send(&buf);
            if socket.recv(&mut buf).is_ok() {
                break;
            }
            if Instant::now() >= deadline {
                bail!("no UDP echo through {front} within {UDP_WARM_UP_MS} ms");
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let send_socket = socket.try_clone()?;
        let flag = Arc::clone(&stop);
        let sender = std::thread::Builder::new()
            .name("udp-ping-send".into())
            .spawn(move || {
                let start = Instant::now();
                let mut seq = 0_u64;
                let mut buf = [0_u8; UDP_PAYLOAD_BYTES];
                while !flag.load(Ordering::Relaxed) {
                    buf[..8].copy_from_slice(&seq.to_be_bytes());
                    // A send error (ECONNREFUSED from an ICMP) is a lost datagram.
                    let _ = send_socket.send(&buf);
                    seq += 1;
                    let next = start + Duration::from_micros(UDP_INTERVAL_US * seq);
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
                seq
            })
            .context("starting the UDP sender")?;
        let flag = Arc::clone(&stop);
        let receiver = std::thread::Builder::new()
            .name("udp-ping-recv".into())
            .spawn(move || {
                let mut seen = HashSet::new();
                let mut buf = [0_u8; 2048];
                let mut stopped_at = None;
                loop {
                    if flag.load(Ordering::Relaxed) {
                        let at = *stopped_at.get_or_insert_with(Instant::now);
                        if at.elapsed() >= Duration::from_millis(UDP_DRAIN_MS) {
                            break;
                        }
                    }
                    if let Ok(n) = socket.recv(&mut buf)
                        && n >= 8
                    {
                        let mut seq = [0_u8; 8];
                        seq.copy_from_slice(&buf[..8]);
                        let seq = u64::from_be_bytes(seq);
                        if seq != u64::MAX {
                            seen.insert(seq);
                        }
                    }
                }
                seen
            })
            .context("starting the UDP receiver")?;
        Ok(Self {
            stop,
            sender,
            receiver,
        })
    }

    fn finish(self) -> Result<UdpCount> {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self
            .sender
            .join()
            .map_err(|_| anyhow::anyhow!("UDP sender panicked"))?;
        let seen = self
            .receiver
            .join()
            .map_err(|_| anyhow::anyhow!("UDP receiver panicked"))?;
        let echoed = seen.iter().filter(|&&s| s < sent).count() as u64;
        Ok(UdpCount { sent, echoed })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_proc_lists_the_current_workers_not_the_old_ones() {
        let text = "#<PID>          <type>          <reloads>       <uptime>        <version>\n\
                    2066            master          1 [failed: 0]   0d00h00m04s     2.6.12\n\
                    # workers\n\
                    2090            worker          0               0d00h00m01s     2.6.12\n\
                    # old workers\n\
                    2068            worker          [was: 1]        0d00h00m04s     2.6.12\n\
                    # programs\n";
        assert_eq!(current_workers(text), [2090]);
        assert!(current_workers("# workers\n").is_empty());
    }

    #[test]
    fn a_probe_tells_refused_from_failed_and_echoed() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        // Nothing listens on a port just released: refused.
        let free = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = free.local_addr().expect("addr");
        drop(free);
        assert_eq!(rt.block_on(probe(addr, b"hello")), Outcome::Refused);
        // A listener that closes at once: failed.
        let closer = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let closer_addr = closer.local_addr().expect("addr");
        rt.spawn(async move {
            while let Ok((s, _)) = closer.accept().await {
                drop(s);
            }
        });
        assert!(matches!(
            rt.block_on(probe(closer_addr, b"hello")),
            Outcome::Failed(_)
        ));
        // The hello backend: echoed.
        let backend = backend::start(rt.handle(), Behaviour::HelloReply).expect("backend");
        let hello = client_hello::load(None).expect("hello");
        assert!(matches!(
            rt.block_on(probe(backend.addr, &hello.bytes)),
            Outcome::Echoed(_)
        ));
    }
}
