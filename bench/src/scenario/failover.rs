//! `failover` (issue 22): the time for NEW streams to succeed after a relay dies. OutRelay
//! only ([`Routing::Failover`]): a controller, two relays enrolled with it, a provider of the
//! service to an echo backend and a consumer, both agents on both relays with
//! `ha_connections = 2`, short QUIC timeouts (the end-to-end test's: relay `[quic]
//! idle_timeout_ms = 2000`, agents `[connection] idle_timeout_ms = 3000`).
//!
//! Per kill (and, after each, a SIGTERM: GOAWAY and drain, reported as its own row), as `dataplane/agent/tests/ha.rs` `measure_new_streams_after_relay_death` does:
//! wait until both agents hold both relays with every service registered; one call through the
//! consumer succeeds; `kill -9` of relay 1 (the relay the consumer's new streams use: with no
//! stream running the least loaded relay is the first in config order); from the kill, calls
//! through the consumer's listen address until one succeeds (each a new TCP connection, so a
//! new ORP stream: 64 bytes written, the same 64 echoed back). That time is the figure. Relay 1
//! is then started again on the same QUIC port (same identity and controller state) and the
//! next kill waits until both agents hold it again (reported apart: rejoin). Each kill is one
//! sample; the row's median and min-max are over every kill of the run.
//!
//! A new call on a consumer connection the agent has not yet seen die waits for QUIC to notice
//! (the idle timeout, or the relay's stateless reset once it is back) or for the consumer's
//! open to be made again on the other relay; the figure is bounded by the QUIC idle timeout,
//! reported with it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use tokio::runtime::Handle;

use super::{Column, Measurement, Metrics, Scenario, Settings, Value};
use crate::backend::{self, Backend, Behaviour};
use crate::target::{
    FAILOVER_RELAY_SHUTDOWN_GRACE_MS, FailoverEnds, FailoverRelay, Routing, RunningTarget,
    restart_relay,
};

/// Bytes of one call (written, then read back from the echo backend).
const CALL_BYTES: usize = 64;
/// One call's connect, write and read timeout.
const CALL_TIMEOUT_MS: u64 = 10_000;
/// Pause between two failed calls.
const RETRY_PAUSE_MS: u64 = 20;
/// The bound on the time to a successful new call after a kill (the end-to-end test's).
const NEW_CALL_BOUND_MS: u64 = 15_000;
/// The bound on both agents holding both relays, and on the first call before a kill.
const SETTLE_BOUND_MS: u64 = 30_000;
/// Pause after the call before the kill, so its stream has ended on the agent too.
const BEFORE_KILL_MS: u64 = 200;
/// The relay killed: relay 1, the first in the agents' config.
const VICTIM: usize = 0;
/// How relay 1 stops.
#[derive(Debug, Clone, Copy)]
enum Stop {
    /// `kill -9`: the agents learn nothing until QUIC does.
    Kill9,
    /// SIGTERM: the relay sends GOAWAY to its agents and drains, then exits.
    Goaway,
}

impl Stop {
    fn variant(self) -> &'static str {
        match self {
            Self::Kill9 => "kill -9 of relay 1",
            Self::Goaway => "SIGTERM of relay 1 (GOAWAY, drain)",
        }
    }
}

/// The failover scenario: owns the echo backend.
pub struct Failover {
    backend: Backend,
    /// Kills per started target.
    kills: u32,
    /// The idle timeouts of the last measured topology (for the notes).
    timeouts: Option<(u64, u64, u64)>,
}

impl Failover {
    /// Starts the echo backend.
    pub fn start(settings: &Settings, rt: &Handle) -> Result<Self> {
        Ok(Self {
            backend: backend::start(rt, Behaviour::Echo)?,
            kills: settings.failover_kills.max(1),
            timeouts: None,
        })
    }
}

/// One call through the consumer: a new connection (a new stream), [`CALL_BYTES`] written,
/// the same bytes read back.
fn call(front: SocketAddr) -> Result<()> {
    let timeout = Duration::from_millis(CALL_TIMEOUT_MS);
    let mut s = TcpStream::connect_timeout(&front, timeout).context("connect")?;
    s.set_read_timeout(Some(timeout)).context("read timeout")?;
    s.set_write_timeout(Some(timeout))
        .context("write timeout")?;
    let sent: Vec<u8> = (0..=u8::MAX).cycle().take(CALL_BYTES).collect();
    s.write_all(&sent).context("write")?;
    let mut got = vec![0_u8; CALL_BYTES];
    s.read_exact(&mut got).context("read the echo")?;
    ensure!(got == sent, "the echo differs from what was sent");
    Ok(())
}

/// Calls until one succeeds; the time from `from`, or an error after `bound_ms`.
fn until_a_call_succeeds(front: SocketAddr, from: Instant, bound_ms: u64) -> Result<Duration> {
    loop {
        let e = match call(front) {
            Ok(()) => return Ok(from.elapsed()),
            Err(e) => e,
        };
        if from.elapsed() >= Duration::from_millis(bound_ms) {
            bail!("no call succeeded within {bound_ms} ms (last: {e:#})");
        }
        std::thread::sleep(Duration::from_millis(RETRY_PAUSE_MS));
    }
}

/// `GET /status` of an agent's metrics listener, as JSON.
fn agent_status(addr: SocketAddr) -> Result<serde_json::Value> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to the agent's /status on {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .context("read timeout")?;
    s.write_all(
        format!("GET /status HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .context("the /status request")?;
    let mut text = String::new();
    s.read_to_string(&mut text).context("the /status answer")?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).with_context(|| format!("/status JSON: {text}"))
}

/// The relays an agent's `/status` shows connected with every service registered.
fn relays_held(status: &serde_json::Value) -> usize {
    status["relays"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| {
            r["connected"] == true
                && r["services"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .all(|s| s["state"] == "registered")
        })
        .count()
}

/// Waits until both agents hold every relay; the time it took.
fn until_both_hold_all(ends: &FailoverEnds, target: &mut RunningTarget) -> Result<Duration> {
    let start = Instant::now();
    let want = ends.relays.len();
    loop {
        target.ensure_running()?;
        let consumer = relays_held(&agent_status(ends.consumer_status)?);
        let provider = relays_held(&agent_status(ends.provider_status)?);
        if consumer == want && provider == want {
            return Ok(start.elapsed());
        }
        if start.elapsed() >= Duration::from_millis(SETTLE_BOUND_MS) {
            bail!(
                "agents not on all {want} relays within {SETTLE_BOUND_MS} ms \
                 (consumer {consumer}, provider {provider})"
            );
        }
        std::thread::sleep(Duration::from_millis(RETRY_PAUSE_MS));
    }
}

/// The consumer's opens made again on another relay so far (`/status` mesh.reopened).
fn reopened(ends: &FailoverEnds) -> Result<f64> {
    Ok(agent_status(ends.consumer_status)?["mesh"]["reopened"]
        .as_f64()
        .unwrap_or(0.0))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Failover {
    /// One stop of relay 1 (`victim`) and its restart: a call succeeds, relay 1 stops, calls
    /// until one succeeds, relay 1 starts again, both agents hold it again.
    fn one(
        &self,
        target: &mut RunningTarget,
        ends: &FailoverEnds,
        victim: &FailoverRelay,
        stop: Stop,
    ) -> Result<Metrics> {
        let front = target.front;
        until_a_call_succeeds(front, Instant::now(), SETTLE_BOUND_MS)
            .context("the call before the stop")?;
        std::thread::sleep(Duration::from_millis(BEFORE_KILL_MS));
        let reopened_before = reopened(ends)?;
        match stop {
            Stop::Kill9 => target.kill9_relay(VICTIM)?,
            Stop::Goaway => target.terminate_relay(VICTIM)?,
        }
        let stopped = Instant::now();
        let new_stream = until_a_call_succeeds(front, stopped, NEW_CALL_BOUND_MS)
            .context("a new stream after the stop")?;
        let reopened_now = reopened(ends)? - reopened_before;
        if matches!(stop, Stop::Goaway) {
            // Drained: it exits within its shutdown grace (a margin for a loaded machine).
            target
                .wait_relay_exit(
                    VICTIM,
                    Duration::from_millis(FAILOVER_RELAY_SHUTDOWN_GRACE_MS + SETTLE_BOUND_MS),
                )
                .context("relay 1 did not exit after SIGTERM")?;
        }
        let restarting = Instant::now();
        let process = restart_relay(&ends.restart, victim).context("starting relay 1 again")?;
        let restart = restarting.elapsed();
        target.replace_relay(VICTIM, process)?;
        let rejoin = until_both_hold_all(ends, target).context("after relay 1 came back")?;
        eprintln!(
            "    {}: new stream after {:.0} ms, relay back after {:.0} ms, agents on both \
             after {:.0} ms more",
            stop.variant(),
            ms(new_stream),
            ms(restart),
            ms(rejoin)
        );
        #[expect(
            clippy::cast_precision_loss,
            reason = "a timeout in ms is far below 2^52"
        )]
        let idle = ends.quic_idle_timeout_ms as f64;
        Ok(Metrics::from([
            ("new_stream_ms".to_owned(), ms(new_stream)),
            ("restart_ms".to_owned(), ms(restart)),
            ("rejoin_ms".to_owned(), ms(rejoin)),
            ("reopened".to_owned(), reopened_now),
            ("quic_idle_timeout_ms".to_owned(), idle),
        ]))
    }
}

impl Scenario for Failover {
    fn name(&self) -> &'static str {
        "failover"
    }

    fn routing(&self) -> Routing {
        Routing::Failover
    }

    fn backend_addr(&self) -> SocketAddr {
        self.backend.addr
    }

    fn columns(&self) -> Vec<Column> {
        vec![
            Column {
                header: "new stream ok after the stop, ms",
                decimals: 0,
                value: Value::Metric("new_stream_ms"),
            },
            Column {
                header: "relay restart, ms",
                decimals: 0,
                value: Value::Metric("restart_ms"),
            },
            Column {
                header: "agents on both relays again, ms",
                decimals: 0,
                value: Value::Metric("rejoin_ms"),
            },
            Column {
                header: "consumer opens made again (per stop)",
                decimals: 0,
                value: Value::Metric("reopened"),
            },
            Column {
                header: "QUIC idle timeout, ms",
                decimals: 0,
                value: Value::Metric("quic_idle_timeout_ms"),
            },
        ]
    }

    fn measure(&mut self, target: &mut RunningTarget, _dir: &Path) -> Result<Vec<Measurement>> {
        let ends = target
            .failover
            .clone()
            .context("the target did not start the failover topology")?;
        self.timeouts = Some((
            ends.quic_idle_timeout_ms,
            ends.relay_idle_timeout_ms,
            ends.agent_idle_timeout_ms,
        ));
        let victim = ends.relays.get(VICTIM).context("no relay 1")?.clone();
        until_both_hold_all(&ends, target)?;
        let mut out = Vec::new();
        for kill in 1..=self.kills {
            for stop in [Stop::Kill9, Stop::Goaway] {
                let metrics = self
                    .one(target, &ends, &victim, stop)
                    .with_context(|| format!("{} {kill}/{}", stop.variant(), self.kills))?;
                out.push(Measurement {
                    variant: stop.variant().to_owned(),
                    metrics,
                });
            }
        }
        target.ensure_running()?;
        Ok(out)
    }

    fn notes(&self) -> Vec<String> {
        let mut notes = vec![format!(
            "controller + relay-1 + relay-2 (enrolled), provider and consumer agents on both \
             relays (ha_connections = 2), echo backend; {} kill(s) per start, each a kill -9 \
             of relay 1, then a SIGTERM of it (the relay sends GOAWAY to its agents and \
             drains; [lifecycle] shutdown_grace_ms = {FAILOVER_RELAY_SHUTDOWN_GRACE_MS}). Per \
             stop: both agents on both relays, one call ok, {BEFORE_KILL_MS} ms, relay 1 stops \
             (the relay the consumer's new streams use: the least loaded, first in config \
             order), then new calls (a new TCP connection to the consumer = a new stream; \
             {CALL_BYTES} B echoed) until one succeeds: \"new stream ok after the stop\" (bound \
             {NEW_CALL_BOUND_MS} ms). Relay 1 then starts again on the same QUIC port (after \
             it exited); \"agents on both relays again\" is from its ready file to both agents \
             holding it with their services registered. Median and min-max over every stop of \
             the row's kind",
            self.kills
        )];
        if let Some((quic, relay, agent)) = self.timeouts {
            notes.push(format!(
                "QUIC idle timeout {quic} ms (relay [quic] idle_timeout_ms = {relay}, agents \
                 [connection] idle_timeout_ms = {agent}; keep-alive 500 ms): after a kill -9 a \
                 new stream opened on the dead relay's connection waits until QUIC declares it \
                 dead, then the consumer opens it again on the other relay, so the kill -9 \
                 figure is bounded by (and here equals) the idle timeout; a GOAWAY tells the \
                 agents at once"
            ));
        }
        notes
    }
}
