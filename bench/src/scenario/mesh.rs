//! `mesh` (P6): one bulk stream over QUIC. Through `outrelay`, a TCP connection to the
//! consumer agent's listen address becomes one ORP stream consumer → relay → provider, and the
//! provider writes it into the in-process sink (the backend); a blocking thread writes 256 KiB
//! blocks into that connection as fast as it can. `quinn-direct` carries its own load: its
//! client writes one stream straight to its server, which counts the bytes. After a warm-up,
//! bytes delivered (sink or quinn server) and CPU (utime + stime from `/proc`) are sampled
//! around a timed window.
//!
//! The P6 figure is CPU seconds per Gbit moved: for `outrelay` the relay process alone (the
//! agents are the path's ends, reported apart); for `quinn-direct` the client and the server
//! together, since a relay decrypts what the consumer sends like a quinn server and encrypts it
//! again towards the provider like a quinn client. The ratio to `quinn-direct` is taken per
//! round.
//!
//! QUIC's CPU per byte depends on the rate (at a lower rate fewer packets share a GSO batch, a
//! wake-up, an ACK), and a relayed path runs slower than a direct one; so when
//! `quinn-direct-paced` is among the targets, OutRelay's rate is measured once before the
//! rounds ([`Scenario::prepare`]) and that pair writes at it: the comparison at equal rate.
//!
//! Issue 22's two mesh-only targets run in the same rounds: `mesh-forward` (the consumer on
//! relay 1, the provider on relay 2, a controller between them: the stream is forwarded; its
//! relay CPU is both relays' sum) and `fallback` (the `outrelay` mesh with both agents on the
//! TCP/443 fallback). Their rows divide by `outrelay`'s of the same round (Gbit/s and relay
//! CPU per Gbit "x outrelay"), and each measurement counts only if a counter on the
//! consumer's relay shows the stream took that path ([`crate::target::MeshCheck`]): relay 1's
//! forwarded streams, or the packets through fallback tunnels; `fallback` also reports the
//! relay's tunnel queue drops in the window (QUIC's loss signal on that path).
//!
//! With several OutRelay setups (`--agent-resume off,on`, issue 19: the agents' stream resume
//! against plain streams; or `--relay-workers`, `--relay-ebpf`), each outrelay row is one
//! setup and three columns divide by the first setup in the same round: Gbit/s, relay CPU per
//! Gbit and the agents' CPU per Gbit (resume's rings and checkpoints are the agents' work).

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use tokio::runtime::Handle;

use super::{Column, Measurement, Metrics, Scenario, Settings, Value};
use crate::backend::{self, Backend, Behaviour};
use crate::proc_stats::tree_cpu_seconds;
use crate::quic_peer;
use crate::target::{Launch, MeshVia, Routing, RunningTarget, Target};

/// Bytes per write of the TCP sender.
const WRITE_BYTES: usize = 256 * 1024;
/// Time before the timed window: QUIC's congestion window and the stream windows grow, the
/// relay opens the provider's stream.
const WARM_UP_MS: u64 = 1_000;
/// A write that blocks this long means the path stalled: the measurement fails.
const WRITE_TIMEOUT_S: u64 = 10;
/// The target P6's ratio is taken against.
const BASELINE: &str = "quinn-direct";
/// The same at OutRelay's rate.
const BASELINE_PACED: &str = "quinn-direct-paced";
/// The single-relay mesh the issue 22 targets are compared with.
const SINGLE_RELAY: &str = "outrelay";
/// The target whose rows have a tunnel drop count.
const FALLBACK: &str = "fallback";
/// The forwarded mesh.
const FORWARD: &str = "mesh-forward";
/// CPU s per Gbit of each relay of a target with several (relay 1 = the consumer's), by
/// position in its relay processes; the sum is `cpu_s_per_gbit`.
const PER_RELAY_KEYS: [&str; 2] = ["relay_1_cpu_s_per_gbit", "relay_2_cpu_s_per_gbit"];

/// The mesh scenario: owns the sink backend.
pub struct Mesh {
    backend: Backend,
    duration: Duration,
    /// OutRelay's rate from [`Scenario::prepare`], in Mbit/s (0: not measured).
    pace_mbps: u32,
    calibration: Option<String>,
    /// More than one OutRelay setup: adds the x first setup columns.
    compare_setups: bool,
    /// `fallback` is among the targets: adds its tunnel drop column.
    with_fallback: bool,
    /// `mesh-forward` is among the targets.
    with_forward: bool,
}

impl Mesh {
    /// Starts the sink backend.
    pub fn start(settings: &Settings, rt: &Handle) -> Result<Self> {
        Ok(Self {
            backend: backend::start(rt, Behaviour::Sink)?,
            duration: Duration::from_secs(settings.bulk_duration_s.max(1)),
            pace_mbps: 0,
            calibration: None,
            compare_setups: super::several_setups(settings),
            with_fallback: false,
            with_forward: false,
        })
    }

    /// Bytes delivered so far: by the target's own receiver, or to the sink.
    fn delivered(&self, target: &RunningTarget) -> Result<u64> {
        match target.delivered {
            Some(stats) => quic_peer::read_received(stats),
            None => Ok(self.backend.sunk_bytes.load(Ordering::Relaxed)),
        }
    }

    fn one(&self, target: &mut RunningTarget) -> Result<Metrics> {
        let check = target.mesh_check;
        let counters_before = check.map(|c| c.read()).transpose()?;
        let sender = match target.delivered {
            Some(_) => None,
            None => Some(Sender::start(target.front)?),
        };
        std::thread::sleep(Duration::from_millis(WARM_UP_MS));
        target.ensure_running()?;
        let (relay, helpers) = (target.relay_roots(), target.helper_roots());
        let bytes_before = self.delivered(target)?;
        // mesh-forward's relay 1 and relay 2 apart too (quinn-direct's two processes are a
        // client and a server, not relays).
        let forwarded = check.is_some_and(|c| c.via == MeshVia::Forward);
        let each = |roots: &[u32]| -> Vec<f64> {
            if forwarded {
                roots.iter().map(|r| tree_cpu_seconds(&[*r])).collect()
            } else {
                Vec::new()
            }
        };
        let (cpu_before_s, each_before_s, helpers_before_s, start) = (
            tree_cpu_seconds(&relay),
            each(&relay),
            tree_cpu_seconds(&helpers),
            Instant::now(),
        );
        std::thread::sleep(self.duration);
        let bytes = self.delivered(target)? - bytes_before;
        let (cpu_s, each_s, helpers_s, seconds) = (
            tree_cpu_seconds(&relay) - cpu_before_s,
            each(&relay),
            tree_cpu_seconds(&helpers) - helpers_before_s,
            start.elapsed().as_secs_f64(),
        );
        if let Some(sender) = sender {
            sender.stop()?;
        }
        ensure!(bytes > 0, "no byte was delivered in the timed window");
        let mut tunnel_drops = None;
        if let (Some(check), Some(before)) = (check, counters_before) {
            let after = check.read()?;
            check.verify(before, after)?;
            if check.via == MeshVia::Fallback {
                tunnel_drops = Some(after.tunnel_drops - before.tunnel_drops);
            }
        }
        let gbit = bytes as f64 * 8.0 / 1e9;
        let gbps = gbit / seconds;
        let mut metrics = Metrics::from([("gbps".to_owned(), gbps)]);
        if target.has_relay() && cpu_s > 0.0 {
            metrics.insert("cpu_s".to_owned(), cpu_s);
            metrics.insert("cpu_s_per_gbit".to_owned(), cpu_s / gbit);
            metrics.insert("gbps_per_core".to_owned(), gbps / (cpu_s / seconds));
        }
        if !helpers.is_empty() {
            metrics.insert("helpers_cpu_s_per_gbit".to_owned(), helpers_s / gbit);
        }
        if let Some(drops) = tunnel_drops {
            metrics.insert("tunnel_drops".to_owned(), drops);
        }
        for (i, (after, before)) in each_s.iter().zip(&each_before_s).enumerate() {
            if let Some(key) = PER_RELAY_KEYS.get(i) {
                metrics.insert((*key).to_owned(), (after - before) / gbit);
            }
        }
        Ok(metrics)
    }
}

/// One TCP connection written to as fast as a blocking thread can.
struct Sender {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<()>>,
}

impl Sender {
    fn start(front: SocketAddr) -> Result<Self> {
        let mut s = TcpStream::connect(front).with_context(|| format!("connecting to {front}"))?;
        s.set_write_timeout(Some(Duration::from_secs(WRITE_TIMEOUT_S)))
            .context("write timeout")?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || -> Result<()> {
            let block = vec![0x17_u8; WRITE_BYTES];
            while !flag.load(Ordering::Relaxed) {
                s.write_all(&block).context("sending")?;
            }
            Ok(())
        });
        Ok(Self { stop, thread })
    }

    /// Stops writing and closes; errors if a write failed before.
    fn stop(self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().map_err(|_| anyhow!("sender panicked"))?
    }
}

impl Scenario for Mesh {
    fn name(&self) -> &'static str {
        "mesh"
    }

    fn routing(&self) -> Routing {
        Routing::Mesh {
            pace_mbps: self.pace_mbps,
        }
    }

    fn prepare(&mut self, targets: &[&dyn Target], work: &Path, launch: &Launch) -> Result<()> {
        self.with_fallback = targets.iter().any(|t| t.name() == FALLBACK);
        self.with_forward = targets.iter().any(|t| t.name() == FORWARD);
        if !targets.iter().any(|t| t.name() == BASELINE_PACED) {
            return Ok(());
        }
        let Some(outrelay) = targets.iter().find(|t| t.name() == "outrelay") else {
            self.calibration = Some(format!(
                "outrelay not among the available targets: {BASELINE_PACED} has no rate"
            ));
            return Ok(());
        };
        let dir = work.join("mesh-calibration-outrelay");
        std::fs::create_dir_all(&dir).context("creating calibration dir")?;
        eprintln!("[mesh] measuring outrelay's rate for {BASELINE_PACED}");
        let mut running = outrelay.start(self.backend.addr, self.routing(), &dir, launch)?;
        let gbps = self.one(&mut running)?["gbps"];
        running.ensure_running()?;
        self.pace_mbps = mbps(gbps);
        ensure!(self.pace_mbps > 0, "outrelay moved {gbps} Gbit/s");
        eprintln!(
            "[mesh] outrelay {gbps:.2} Gbit/s; {BASELINE_PACED} at {} Mbit/s",
            self.pace_mbps
        );
        self.calibration = Some(format!(
            "{BASELINE_PACED} writes at {} Mbit/s: outrelay's rate in one {} s measurement \
             before the rounds",
            self.pace_mbps,
            self.duration.as_secs()
        ));
        Ok(())
    }

    fn backend_addr(&self) -> SocketAddr {
        self.backend.addr
    }

    fn columns(&self) -> Vec<Column> {
        let mut columns = vec![
            Column {
                header: "Gbit/s",
                decimals: 2,
                value: Value::Metric("gbps"),
            },
            Column {
                header: "Gbit/s x quinn-direct",
                decimals: 2,
                value: Value::RatioToTarget(BASELINE, "gbps"),
            },
            Column {
                header: "CPU s (relay; quinn: client+server)",
                decimals: 2,
                value: Value::Metric("cpu_s"),
            },
            Column {
                header: "CPU s per Gbit",
                decimals: 3,
                value: Value::Metric("cpu_s_per_gbit"),
            },
            Column {
                header: "CPU per Gbit x quinn-direct",
                decimals: 2,
                value: Value::RatioToTarget(BASELINE, "cpu_s_per_gbit"),
            },
            Column {
                header: "CPU per Gbit x quinn-direct-paced",
                decimals: 2,
                value: Value::RatioToTarget(BASELINE_PACED, "cpu_s_per_gbit"),
            },
            Column {
                header: "Gbit/s x outrelay",
                decimals: 2,
                value: Value::RatioToTarget(SINGLE_RELAY, "gbps"),
            },
            Column {
                header: "CPU per Gbit x outrelay",
                decimals: 2,
                value: Value::RatioToTarget(SINGLE_RELAY, "cpu_s_per_gbit"),
            },
            Column {
                header: "Gbit/s per core",
                decimals: 1,
                value: Value::Metric("gbps_per_core"),
            },
            Column {
                header: "agents CPU s per Gbit",
                decimals: 3,
                value: Value::Metric("helpers_cpu_s_per_gbit"),
            },
        ];
        if self.with_forward {
            columns.extend([
                Column {
                    header: "relay-1 CPU s per Gbit",
                    decimals: 3,
                    value: Value::Metric(PER_RELAY_KEYS[0]),
                },
                Column {
                    header: "relay-2 CPU s per Gbit",
                    decimals: 3,
                    value: Value::Metric(PER_RELAY_KEYS[1]),
                },
            ]);
        }
        if self.with_fallback {
            columns.push(Column {
                header: "relay tunnel drops",
                decimals: 0,
                value: Value::Metric("tunnel_drops"),
            });
        }
        if self.compare_setups {
            columns.extend([
                Column {
                    header: "Gbit/s x first setup",
                    decimals: 3,
                    value: Value::RatioToFirstSetup("gbps"),
                },
                Column {
                    header: "CPU per Gbit x first setup",
                    decimals: 3,
                    value: Value::RatioToFirstSetup("cpu_s_per_gbit"),
                },
                Column {
                    header: "agents CPU per Gbit x first setup",
                    decimals: 3,
                    value: Value::RatioToFirstSetup("helpers_cpu_s_per_gbit"),
                },
            ]);
        }
        columns
    }

    fn measure(&mut self, target: &mut RunningTarget, _dir: &Path) -> Result<Vec<Measurement>> {
        let metrics = self.one(target)?;
        target.ensure_running()?;
        Ok(vec![Measurement {
            variant: "1 stream".to_owned(),
            metrics,
        }])
    }

    fn notes(&self) -> Vec<String> {
        let mut notes = vec![format!(
            "one stream, {WARM_UP_MS} ms warm-up, then a {} s window; Gbit/s = bytes delivered \
             in the window (outrelay: at the sink behind the provider agent, fed by one TCP \
             connection to the consumer agent in {WRITE_BYTES} B writes; quinn-direct: at its \
             server, its client writing {WRITE_BYTES} B chunks from memory); CPU = utime+stime \
             over the window of the relay process (outrelay) or of the quinn client and server \
             together (quinn-direct); agents = consumer + provider, not counted as the relay",
            self.duration.as_secs()
        )];
        if self.with_forward || self.with_fallback {
            notes.push(
                "mesh-forward: controller + relay-1 + relay-2 (enrolled, [forward]); consumer on \
             relay-1, provider on relay-2; relay CPU = relay-1 + relay-2 (each also apart); every measurement \
             checked forwarded (relay-1's outrelay_relay_forward_streams_total rose). fallback: \
             the outrelay mesh with both agents on [fallback] mode = \"only\" (QUIC inside TLS \
             on TCP to the relay's public TLS port), checked by the relay's \
             outrelay_relay_fallback_packets_total; relay tunnel drops = the relay's \
             outrelay_relay_fallback_packets_dropped_total in the window. x outrelay = the \
             single-relay QUIC mesh of the same round"
                    .to_owned(),
            );
        }
        notes.extend(self.calibration.clone());
        notes
    }
}

/// Gbit/s as whole Mbit/s (0 for a negative or non-finite rate, saturated at `u32::MAX`).
fn mbps(gbps: f64) -> u32 {
    let m = (gbps * 1000.0).round();
    if m.is_finite() && m >= 1.0 {
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "finite, at least 1 and saturated by `as`"
        )]
        let m = m as u32;
        m
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_become_whole_mbit_per_second() {
        assert_eq!(mbps(0.6184), 618);
        assert_eq!(mbps(2.0), 2000);
        assert_eq!(mbps(0.0), 0);
        assert_eq!(mbps(-1.0), 0);
        assert_eq!(mbps(f64::NAN), 0);
        assert_eq!(mbps(1e12), u32::MAX);
    }
}
