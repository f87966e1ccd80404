//! `udp` (P7): 1200-byte datagrams through a UDP forward (OutRelay's UDP lease, rathole's
//! `type = "udp"` service, or straight to the sink). An in-process sink (the backend) counts
//! datagrams by sequence number; one sender thread on one socket (one flow) sends them.
//!
//! Per target, two phases after a warm-up that waits for the first datagram through:
//! - `saturate`: send as fast as one socket can for the phase time; the figure is datagrams the
//!   sink received per second (the target's maximum, as far as this sender can tell).
//! - `paced`: send at 80 % of OutRelay's maximum, measured once before the rounds
//!   ([`Scenario::prepare`]), the same absolute rate for every target; the figure is loss %.
//!
//! Datagram layout: phase (u32 LE), sequence (u64 LE), filler to 1200 bytes. Datagrams of an
//! earlier phase (late arrivals after a drain) are ignored by the sink.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{Column, Measurement, Metrics, Scenario, Settings, Value};
use crate::proc_stats::tree_cpu_seconds;
use crate::target::{Launch, Routing, RunningTarget, Target};

/// UDP payload per datagram (the P7 target's size).
const PAYLOAD_BYTES: usize = 1200;
/// Phase (u32) + sequence (u64) at the start of every payload.
const HEADER_BYTES: usize = 12;
/// The paced phase's rate in percent of OutRelay's maximum.
const PACED_PERCENT: u64 = 80;
/// Saturated phases whose median sets the paced rate.
const CALIBRATION_PHASES: usize = 3;
/// Time after a phase's last send before the sink's count is read.
const DRAIN_MS: u64 = 300;
/// How long the warm-up waits for a first datagram through the target.
const WARMUP_TIMEOUT_MS: u64 = 10_000;
/// Interval between warm-up datagrams.
const WARMUP_INTERVAL_MS: u64 = 10;
/// Pause after the first warm-up datagram arrived, so the path settles (QUIC path MTU probing).
const SETTLE_MS: u64 = 300;
/// Socket buffers asked for on the sender and the sink (the kernel caps them at its maxima).
const SOCKET_BUFFER_BYTES: usize = 8 << 20;
/// How long the sink's receive blocks before it checks for stop.
const SINK_POLL_MS: u64 = 50;
/// Sequence numbers the sink tracks per phase; beyond it datagrams count as out of range.
const MAX_TRACKED_SEQ: u64 = 1 << 28;
/// The paced sender sleeps this long when it is ahead of schedule.
const PACE_SLEEP_US: u64 = 100;
/// Sends between two clock reads of the saturating sender.
const CLOCK_EVERY_SENDS: u64 = 64;
/// A paced phase that cannot keep up stops after this multiple of its planned time.
const PACED_OVERRUN_FACTOR: u32 = 3;

/// The scenario: owns the sink thread.
pub struct Udp {
    sink: Sink,
    duration: Duration,
    next_phase: u32,
    paced_rate_per_s: Option<u64>,
    calibration: Option<String>,
}

impl Udp {
    /// Starts the sink on a free loopback UDP port.
    pub fn start(settings: &Settings) -> Result<Self> {
        Ok(Self {
            sink: Sink::start()?,
            duration: Duration::from_secs(settings.udp_duration_s.max(1)),
            next_phase: 1,
            paced_rate_per_s: None,
            calibration: None,
        })
    }

    fn phase(&mut self) -> u32 {
        let p = self.next_phase;
        self.next_phase += 1;
        p
    }

    /// Sends until the first datagram arrives at the sink, then lets the path settle.
    fn warm_up(&mut self, socket: &UdpSocket) -> Result<()> {
        let phase = self.phase();
        let deadline = Instant::now() + Duration::from_millis(WARMUP_TIMEOUT_MS);
        let mut buf = [0u8; PAYLOAD_BYTES];
        let mut seq = 0;
        while self.sink.count(phase).unique == 0 {
            if Instant::now() >= deadline {
                bail!(
                    "no {PAYLOAD_BYTES}-byte datagram came through within {WARMUP_TIMEOUT_MS} ms"
                );
            }
            encode(&mut buf, phase, seq);
            let _ = socket.send(&buf);
            seq += 1;
            std::thread::sleep(Duration::from_millis(WARMUP_INTERVAL_MS));
        }
        std::thread::sleep(Duration::from_millis(SETTLE_MS));
        Ok(())
    }

    /// One phase: `rate_per_s` None saturates. Returns the datagrams/s delivered and all metrics.
    fn send_phase(
        &mut self,
        socket: &UdpSocket,
        rate_per_s: Option<u64>,
        roots: &[u32],
    ) -> (u64, Metrics) {
        let phase = self.phase();
        let cpu_before_s = tree_cpu_seconds(roots);
        let sent = match rate_per_s {
            None => saturate(socket, phase, self.duration),
            Some(rate) => paced(socket, phase, rate, self.duration),
        };
        std::thread::sleep(Duration::from_millis(DRAIN_MS));
        let cpu_s = tree_cpu_seconds(roots) - cpu_before_s;
        let count = self.sink.count(phase);
        let delivered_per_s = per_second(count.unique, sent.elapsed);
        let mut m = Metrics::from([
            ("dgram_per_s".to_owned(), delivered_per_s as f64),
            ("gbps".to_owned(), payload_gbps(delivered_per_s)),
            (
                "offered_per_s".to_owned(),
                per_second(sent.datagrams, sent.elapsed) as f64,
            ),
            (
                "loss_pct".to_owned(),
                loss_pct(sent.datagrams, count.unique),
            ),
            ("send_errors".to_owned(), sent.errors as f64),
        ]);
        if !roots.is_empty() {
            m.insert("relay_cpu_s".to_owned(), cpu_s);
        }
        (delivered_per_s, m)
    }
}

impl Scenario for Udp {
    fn name(&self) -> &'static str {
        "udp"
    }

    fn routing(&self) -> Routing {
        Routing::Udp
    }

    fn backend_addr(&self) -> SocketAddr {
        self.sink.addr
    }

    fn columns(&self) -> Vec<Column> {
        vec![
            Column {
                header: "datagrams/s",
                decimals: 0,
                value: Value::Metric("dgram_per_s"),
            },
            Column {
                header: "Gbit/s (payload)",
                decimals: 2,
                value: Value::Metric("gbps"),
            },
            Column {
                header: "x direct",
                decimals: 2,
                value: Value::RatioToDirect("dgram_per_s"),
            },
            Column {
                header: "x rathole",
                decimals: 2,
                value: Value::RatioToTarget("rathole", "dgram_per_s"),
            },
            Column {
                header: "offered datagrams/s",
                decimals: 0,
                value: Value::Metric("offered_per_s"),
            },
            Column {
                header: "loss %",
                decimals: 3,
                value: Value::Metric("loss_pct"),
            },
            Column {
                header: "relay CPU s",
                decimals: 2,
                value: Value::Metric("relay_cpu_s"),
            },
        ]
    }

    fn prepare(&mut self, targets: &[&dyn Target], work: &Path, launch: &Launch) -> Result<()> {
        let Some(outrelay) = targets.iter().find(|t| t.name() == "outrelay") else {
            self.calibration =
                Some("outrelay not among the available targets: no paced phase".to_owned());
            return Ok(());
        };
        let dir = work.join("udp-calibration-outrelay");
        std::fs::create_dir_all(&dir).context("creating calibration dir")?;
        eprintln!("[udp] calibrating: outrelay's maximum");
        let mut running = outrelay.start(self.sink.addr, Routing::Udp, &dir, launch)?;
        let socket = sender(running.front)?;
        self.warm_up(&socket)?;
        // The median of three saturated phases: one phase on a shared machine can land far
        // from the rounds' medians, and the paced rate must be 80 % of a typical maximum.
        let mut maxima = Vec::with_capacity(CALIBRATION_PHASES);
        for _ in 0..CALIBRATION_PHASES {
            maxima.push(self.send_phase(&socket, None, &[]).0);
        }
        maxima.sort_unstable();
        let max = maxima[maxima.len() / 2];
        running.ensure_running()?;
        if max == 0 {
            bail!("outrelay delivered no datagrams while saturated");
        }
        let rate = paced_rate_per_s(max);
        eprintln!("[udp] outrelay max {max} datagrams/s; pacing at {rate}/s");
        self.paced_rate_per_s = Some(rate);
        self.calibration = Some(format!(
            "paced rate {rate} datagrams/s = {PACED_PERCENT} % of outrelay's maximum {max}/s, \
             median of {CALIBRATION_PHASES} saturated phases before the rounds (same rate for every \
             target)"
        ));
        Ok(())
    }

    fn measure(&mut self, target: &mut RunningTarget, _dir: &Path) -> Result<Vec<Measurement>> {
        let socket = sender(target.front)?;
        self.warm_up(&socket)?;
        let roots = target.relay_roots();
        let (_, mut saturate) = self.send_phase(&socket, None, &roots);
        // Loss while saturated measures the sender outrunning the target, not the target.
        saturate.remove("loss_pct");
        let mut out = vec![Measurement {
            variant: "saturate".to_owned(),
            metrics: saturate,
        }];
        if let Some(rate) = self.paced_rate_per_s {
            out.push(Measurement {
                variant: format!("paced {PACED_PERCENT} %"),
                metrics: self.send_phase(&socket, Some(rate), &roots).1,
            });
        }
        Ok(out)
    }

    fn notes(&self) -> Vec<String> {
        let mut notes = vec![format!(
            "{PAYLOAD_BYTES}-byte UDP payloads from one socket (one flow), {} s per phase, {DRAIN_MS} ms \
             drain; datagrams/s = distinct sequence numbers the sink received / send time; Gbit/s \
             counts payload only; loss % = 1 - received/sent in the paced phase; relay CPU is \
             utime+stime of the relay's process trees over the phase",
            self.duration.as_secs()
        )];
        notes.extend(self.calibration.clone());
        notes
    }
}

/// What a sender did in one phase.
#[derive(Debug, Clone, Copy)]
struct Sent {
    datagrams: u64,
    errors: u64,
    elapsed: Duration,
}

/// A sender socket connected to `front`, with a large send buffer.
fn sender(front: SocketAddr) -> Result<UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .context("creating sender socket")?;
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES);
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .context("binding the sender on 127.0.0.1:0")?;
    let socket: UdpSocket = socket.into();
    socket
        .connect(front)
        .with_context(|| format!("connecting the sender to {front}"))?;
    Ok(socket)
}

/// Sends as fast as the socket takes datagrams for `duration`.
fn saturate(socket: &UdpSocket, phase: u32, duration: Duration) -> Sent {
    let mut buf = [0u8; PAYLOAD_BYTES];
    let (mut seq, mut errors) = (0u64, 0u64);
    let start = Instant::now();
    loop {
        if seq.is_multiple_of(CLOCK_EVERY_SENDS) && start.elapsed() >= duration {
            break;
        }
        encode(&mut buf, phase, seq);
        // Errors (ENOBUFS, a refused ICMP from an earlier datagram) lose that datagram.
        if socket.send(&buf).is_err() {
            errors += 1;
        }
        seq += 1;
    }
    Sent {
        datagrams: seq,
        errors,
        elapsed: start.elapsed(),
    }
}

/// Sends `rate_per_s` × `duration` datagrams on schedule (see [`due_by`]).
fn paced(socket: &UdpSocket, phase: u32, rate_per_s: u64, duration: Duration) -> Sent {
    let mut buf = [0u8; PAYLOAD_BYTES];
    let total = due_by(rate_per_s, duration);
    let (mut seq, mut errors) = (0u64, 0u64);
    let start = Instant::now();
    while seq < total && start.elapsed() < duration * PACED_OVERRUN_FACTOR {
        let due = due_by(rate_per_s, start.elapsed()).min(total);
        if seq >= due {
            std::thread::sleep(Duration::from_micros(PACE_SLEEP_US));
            continue;
        }
        while seq < due {
            encode(&mut buf, phase, seq);
            if socket.send(&buf).is_err() {
                errors += 1;
            }
            seq += 1;
        }
    }
    Sent {
        datagrams: seq,
        errors,
        elapsed: start.elapsed(),
    }
}

/// Datagrams a sender at `rate_per_s` should have sent after `elapsed` (rounded down).
fn due_by(rate_per_s: u64, elapsed: Duration) -> u64 {
    u64::try_from(u128::from(rate_per_s) * elapsed.as_nanos() / NANOS_PER_S).unwrap_or(u64::MAX)
}

/// `count` events over `elapsed` as a whole number per second (rounded down).
fn per_second(count: u64, elapsed: Duration) -> u64 {
    u64::try_from(u128::from(count) * NANOS_PER_S / elapsed.as_nanos().max(1)).unwrap_or(u64::MAX)
}

const NANOS_PER_S: u128 = 1_000_000_000;

/// The paced phase's rate for a measured maximum.
fn paced_rate_per_s(max_per_s: u64) -> u64 {
    max_per_s / 100 * PACED_PERCENT + max_per_s % 100 * PACED_PERCENT / 100
}

/// Payload Gbit/s of `per_s` datagrams per second.
fn payload_gbps(per_s: u64) -> f64 {
    (per_s * (PAYLOAD_BYTES as u64) * 8) as f64 / 1e9
}

/// Percent of `sent` not received (0 when nothing was sent).
fn loss_pct(sent: u64, received: u64) -> f64 {
    if sent == 0 {
        return 0.0;
    }
    100.0 * sent.saturating_sub(received) as f64 / sent as f64
}

fn encode(buf: &mut [u8; PAYLOAD_BYTES], phase: u32, seq: u64) {
    buf[..4].copy_from_slice(&phase.to_le_bytes());
    buf[4..HEADER_BYTES].copy_from_slice(&seq.to_le_bytes());
}

/// Phase and sequence of a received payload; None for a short or wrong-sized one.
fn decode(payload: &[u8]) -> Option<(u32, u64)> {
    if payload.len() != PAYLOAD_BYTES {
        return None;
    }
    let phase = u32::from_le_bytes(payload[..4].try_into().ok()?);
    let seq = u64::from_le_bytes(payload[4..HEADER_BYTES].try_into().ok()?);
    Some((phase, seq))
}

/// Distinct sequence numbers seen, with duplicates and the malformed counted apart.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct SeqCounter {
    bits: Vec<u64>,
    unique: u64,
    duplicates: u64,
    out_of_range: u64,
}

impl SeqCounter {
    fn record(&mut self, seq: u64) {
        if seq >= MAX_TRACKED_SEQ {
            self.out_of_range += 1;
            return;
        }
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if word >= self.bits.len() {
            self.bits.resize((word + 1).next_power_of_two(), 0);
        }
        let mask = 1u64 << bit;
        if self.bits[word] & mask != 0 {
            self.duplicates += 1;
        } else {
            self.bits[word] |= mask;
            self.unique += 1;
        }
    }
}

/// The sink's counts for the phase it saw last.
#[derive(Debug, Default)]
struct Tally {
    phase: u32,
    counter: SeqCounter,
    malformed: u64,
}

impl Tally {
    fn record(&mut self, payload: &[u8]) {
        let Some((phase, seq)) = decode(payload) else {
            self.malformed += 1;
            return;
        };
        if phase < self.phase {
            return; // a late datagram of an earlier phase
        }
        if phase > self.phase {
            self.phase = phase;
            self.counter = SeqCounter::default();
        }
        self.counter.record(seq);
    }
}

/// What the sink counted for one phase.
#[derive(Debug, Clone, Copy, Default)]
struct Count {
    unique: u64,
}

/// The backend: a thread receiving on a loopback UDP socket into a [`Tally`].
struct Sink {
    addr: SocketAddr,
    tally: Arc<Mutex<Tally>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Sink {
    fn start() -> Result<Self> {
        let socket = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )
        .context("creating sink socket")?;
        let _ = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES);
        socket
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .context("binding the sink on 127.0.0.1:0")?;
        let socket: UdpSocket = socket.into();
        socket
            .set_read_timeout(Some(Duration::from_millis(SINK_POLL_MS)))
            .context("sink read timeout")?;
        let addr = socket.local_addr().context("sink address")?;
        let tally = Arc::new(Mutex::new(Tally::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (t, s) = (Arc::clone(&tally), Arc::clone(&stop));
        let thread = std::thread::Builder::new()
            .name("udp-sink".to_owned())
            .spawn(move || {
                let mut buf = vec![0u8; 65_536];
                while !s.load(Ordering::Relaxed) {
                    if let Ok(n) = socket.recv(&mut buf)
                        && let Ok(mut tally) = t.lock()
                    {
                        tally.record(&buf[..n]);
                    }
                }
            })
            .context("spawning the sink thread")?;
        Ok(Self {
            addr,
            tally,
            stop,
            thread: Some(thread),
        })
    }

    fn count(&self, phase: u32) -> Count {
        match self.tally.lock() {
            Ok(t) if t.phase == phase => Count {
                unique: t.counter.unique,
            },
            _ => Count::default(),
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacing_schedule_is_rate_times_elapsed_rounded_down() {
        assert_eq!(due_by(100_000, Duration::ZERO), 0);
        assert_eq!(due_by(100_000, Duration::from_micros(15)), 1);
        assert_eq!(due_by(100_000, Duration::from_millis(1)), 100);
        assert_eq!(due_by(250_000, Duration::from_secs(2)), 500_000);
        assert_eq!(paced_rate_per_s(500_000), 400_000);
        assert_eq!(paced_rate_per_s(123_456), 98_764);
        assert_eq!(per_second(300, Duration::from_millis(1500)), 200);
        assert_eq!(per_second(5, Duration::ZERO), 5_000_000_000);
    }

    #[test]
    fn throughput_and_loss_arithmetic() {
        // 100k datagrams/s of 1200 B = 0.96 Gbit/s of payload.
        assert!((payload_gbps(100_000) - 0.96).abs() < 1e-12);
        assert_eq!(loss_pct(1000, 1000), 0.0);
        assert_eq!(loss_pct(1000, 999), 0.1);
        assert_eq!(loss_pct(0, 0), 0.0);
        assert_eq!(loss_pct(10, 12), 0.0); // more received than sent cannot be negative loss
    }

    #[test]
    fn sequence_counter_counts_distinct_duplicates_and_range() {
        let mut c = SeqCounter::default();
        for seq in [0, 1, 63, 64, 1_000_000, 1, 0, MAX_TRACKED_SEQ] {
            c.record(seq);
        }
        assert_eq!((c.unique, c.duplicates, c.out_of_range), (5, 2, 1));
    }

    #[test]
    fn tally_resets_on_a_new_phase_and_ignores_late_ones() {
        let mut buf = [0u8; PAYLOAD_BYTES];
        let mut t = Tally::default();
        for (phase, seq) in [(1, 0), (1, 1), (2, 0), (1, 2), (2, 0), (2, 5)] {
            encode(&mut buf, phase, seq);
            t.record(&buf);
        }
        assert_eq!((t.phase, t.counter.unique, t.counter.duplicates), (2, 2, 1));
        t.record(&buf[..100]);
        assert_eq!(t.malformed, 1);
        encode(&mut buf, 7, 42);
        assert_eq!(decode(&buf), Some((7, 42)));
    }

    #[test]
    fn the_sink_counts_what_a_direct_sender_sends() {
        let sink = Sink::start().expect("sink starts");
        let socket = sender(sink.addr).expect("sender");
        let mut buf = [0u8; PAYLOAD_BYTES];
        for seq in 0..100 {
            encode(&mut buf, 3, seq);
            socket.send(&buf).expect("loopback send");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while sink.count(3).unique < 100 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(sink.count(3).unique, 100);
        assert_eq!(sink.count(2).unique, 0);
    }
}
