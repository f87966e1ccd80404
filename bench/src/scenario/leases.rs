//! `leases` (issue 17): what a large lease port range costs the relay, and how soon a granted
//! port routes. OutRelay only ([`Routing::Leases`]: a relay alone, its range open to TCP
//! leases, and to UDP too on the `tcp+udp` path); the lease driver
//! ([`crate::lease_driver`]) is one agent connection that asks for the leases and serves none.
//!
//! Per start, two variants:
//!
//! - `grant -> routable`: `grants` leases asked for one at a time; after each LEASE_GRANT the
//!   harness connects to the granted TCP port in a loop (a refused connect is retried after
//!   [`RETRY_US`]) until the kernel accepts. Plain listeners are bound on the relay's lease
//!   sync tick (`lease_sync_interval_ms`), so the wait is up to one tick; with the sk_lookup
//!   program the port map is updated before the grant goes out.
//! - `all leases`: the rest of the range asked for, pipelined, in batches of [`BATCH`]; then
//!   the relay's open descriptors (`/proc/PID/fd`), RSS, the namespace's sockets
//!   (`/proc/net/sockstat`), the TCP listeners and UDP sockets on the range's ports
//!   (`/proc/net/tcp{,6}`, `/proc/net/udp{,6}`) and kernel slab growth (`/proc/meminfo`,
//!   system-wide: noisy), each also per lease against the relay before the first lease. Before
//!   each batch the relay's descriptors are checked against its open-file limit: a setup whose
//!   next batch would come within [`FD_MARGIN`] of it stops there (the row's lease count says
//!   where), and `fds at 10k` extrapolates its per-lease cost to 10,000 leases. A sample of
//!   the granted ports is connected to before the figures count: every one must route.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::runtime::Handle;

use super::{Column, Measurement, Metrics, Scenario, Settings, Value};
use crate::lease_driver::{Granted, LeaseDriver, lease_name};
use crate::proc_stats::{nofile_limit, open_fds, ports_in_range, rss_bytes, slab_bytes, sockstat};
use crate::target::{LeaseEnds, Routing, RunningTarget};

/// Leases asked for per batch of the `all leases` variant (the descriptor check runs between
/// batches).
const BATCH: usize = 500;
/// Requests in flight at once while a batch is asked for: half the relay's control send
/// queue (64 frames, not configurable), which closes a connection that lets it overflow.
const WINDOW: usize = 32;
/// Descriptors kept free below the relay's open-file limit (its `[ingress] fd_reserve`, 2048,
/// plus room for its agents and accepts).
const FD_MARGIN: u64 = 2_500;
/// Pause between two refused connects of the grant-to-routable loop.
const RETRY_US: u64 = 100;
/// How long a granted port may take to route before the measurement fails.
const ROUTE_TIMEOUT_MS: u64 = 5_000;
/// Granted ports connected to (spread over the range) before the `all leases` figures count.
const ROUTE_SAMPLE: usize = 16;
/// The lease count `fds at 10k` extrapolates to (the range).
const EXTRAPOLATE_TO: f64 = 10_000.0;
/// Wait for a fresh relay before the "before" sample.
const SETTLE_BEFORE_MS: u64 = 300;

/// The leases scenario.
pub struct Leases {
    rt: Handle,
    ports: u16,
    grants: usize,
}

impl Leases {
    /// Nothing to start: the relay is the whole topology.
    pub fn start(settings: &Settings, rt: &Handle) -> Self {
        Self {
            rt: rt.clone(),
            ports: settings.lease_ports,
            grants: settings.lease_grants.min(usize::from(settings.lease_ports)),
        }
    }
}

impl Scenario for Leases {
    fn name(&self) -> &'static str {
        "leases"
    }

    fn routing(&self) -> Routing {
        Routing::Leases {
            ports: self.ports,
            udp: false,
        }
    }

    fn routings(&self) -> Vec<Routing> {
        vec![
            self.routing(),
            Routing::Leases {
                ports: self.ports,
                udp: true,
            },
        ]
    }

    fn backend_addr(&self) -> SocketAddr {
        // No backend: nothing is ever relayed.
        SocketAddr::from(([127, 0, 0, 1], 9))
    }

    fn columns(&self) -> Vec<Column> {
        let metric = |header, decimals, key| Column {
            header,
            decimals,
            value: Value::Metric(key),
        };
        vec![
            metric("leases", 0, "leases"),
            metric("relay fds", 0, "fds"),
            metric("fds/lease", 2, "fds_per_lease"),
            metric("fds at 10k", 0, "fds_at_10k"),
            metric("relay RSS MiB", 1, "rss_mib"),
            metric("RSS B/lease", 0, "rss_bytes_per_lease"),
            metric("slab B/lease", 0, "slab_bytes_per_lease"),
            metric("sockets/lease", 2, "sockets_per_lease"),
            metric("TCP listeners", 0, "tcp_listeners"),
            metric("UDP sockets", 0, "udp_sockets"),
            metric("grants/s", 0, "grants_per_s"),
            metric("grant->route p50 ms", 2, "route_p50_ms"),
            metric("p99 ms", 2, "route_p99_ms"),
            metric("max ms", 2, "route_max_ms"),
            metric("routable at grant %", 0, "routable_at_grant_pct"),
        ]
    }

    fn measure(&mut self, target: &mut RunningTarget, _dir: &Path) -> Result<Vec<Measurement>> {
        let ends = target
            .leases
            .clone()
            .context("the leases scenario runs against outrelay's leases topology only")?;
        std::thread::sleep(Duration::from_millis(SETTLE_BEFORE_MS));
        let before = Sample::take(&ends)?;
        let limit = nofile_limit(ends.relay_pid)?;
        let mut driver = self
            .rt
            .block_on(LeaseDriver::connect(ends.relay_quic, &ends.pki))
            .context("lease driver")?;

        let mut granted = Vec::new();
        let timed = self.timed_grants(&mut driver, &ends, &mut granted)?;

        let total = usize::from(self.ports);
        let start = Instant::now();
        let mut stopped_at = None;
        while granted.len() < total {
            let fds = open_fds(ends.relay_pid)?;
            let per_lease = per(fds.saturating_sub(before.fds), granted.len());
            let next = BATCH.min(total - granted.len());
            #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
            let projected = fds as f64 + per_lease * next as f64;
            #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
            if projected + FD_MARGIN as f64 > limit as f64 {
                stopped_at = Some(granted.len());
                break;
            }
            let names: Vec<String> = (granted.len()..granted.len() + next)
                .map(lease_name)
                .collect();
            let batch = self
                .rt
                .block_on(driver.register_all(&names, ends.udp, WINDOW))
                .with_context(|| format!("asking for leases {}..", granted.len()))?;
            granted.extend(batch);
            // Plain listeners are bound on the relay's next sync tick: let it pass before the
            // descriptor check.
            std::thread::sleep(Duration::from_millis(ends.lease_sync_interval_ms * 2));
        }
        let bulk = granted.len() - timed.route_ms.len();
        #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        let grants_per_s = bulk as f64 / start.elapsed().as_secs_f64().max(1e-9);
        settle_fds(ends.relay_pid)?;
        // Sampled before the route check: its connections wait for a session the driver never
        // opens, and counted here they made fds/lease noise (the CI failure of 401cb9b's parent).
        let after = Sample::take(&ends)?;
        check_routable(&ends, &granted)?;
        if let Some(n) = stopped_at {
            eprintln!(
                "    stopped at {n} leases: the next {BATCH} would pass the relay's open-file \
                 limit {limit} less {FD_MARGIN}"
            );
        }
        Ok(vec![
            Measurement {
                variant: "grant -> routable".to_owned(),
                metrics: timed.metrics(),
            },
            Measurement {
                variant: "all leases".to_owned(),
                metrics: all_metrics(&before, &after, granted.len(), grants_per_s),
            },
        ])
    }

    fn notes(&self) -> Vec<String> {
        vec![
            format!(
                "Per start: {} leases asked for one at a time, each timed from LEASE_GRANT to \
                 the first accepted TCP connect to its port (refused connects retried every \
                 {RETRY_US} µs); then the range's other ports, pipelined ({WINDOW} in flight, \
                 batches of {BATCH}), up to {} leases in all.",
                self.grants, self.ports
            ),
            format!(
                "A setup stops short of the range when its next batch would come within \
                 {FD_MARGIN} descriptors of the relay's open-file limit; `fds at 10k` is the \
                 relay's fds before the first lease plus fds/lease x 10,000."
            ),
            "Per-lease figures are growth from the relay before its first lease; slab is \
             /proc/meminfo system-wide (noisy on a shared box); sockets/lease from \
             /proc/net/sockstat (this network namespace)."
                .to_owned(),
        ]
    }
}

/// What the relay holds at one moment.
struct Sample {
    fds: u64,
    rss_bytes: u64,
    slab_bytes: u64,
    sockets: u64,
    tcp_listeners: u64,
    udp_sockets: u64,
}

impl Sample {
    fn take(ends: &LeaseEnds) -> Result<Self> {
        let (lo, hi) = ends.ports;
        Ok(Self {
            fds: open_fds(ends.relay_pid)?,
            rss_bytes: rss_bytes(ends.relay_pid).context("the relay is gone")?,
            slab_bytes: slab_bytes()?,
            sockets: sockstat()?.sockets_used,
            tcp_listeners: ports_in_range("tcp", lo, hi)?,
            udp_sockets: ports_in_range("udp", lo, hi)?,
        })
    }
}

/// `x / n` (0 when `n` is 0).
#[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
fn per(x: u64, n: usize) -> f64 {
    if n == 0 { 0.0 } else { x as f64 / n as f64 }
}

/// The `all leases` variant's metrics from the samples before the first lease and after the
/// last.
#[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
fn all_metrics(before: &Sample, after: &Sample, leases: usize, grants_per_s: f64) -> Metrics {
    let fds_per_lease = per(after.fds.saturating_sub(before.fds), leases);
    let signed_per = |a: u64, b: u64| {
        if leases == 0 {
            0.0
        } else {
            (a as f64 - b as f64) / leases as f64
        }
    };
    Metrics::from([
        ("leases".to_owned(), leases as f64),
        ("fds".to_owned(), after.fds as f64),
        ("fds_per_lease".to_owned(), fds_per_lease),
        (
            "fds_at_10k".to_owned(),
            before.fds as f64 + fds_per_lease * EXTRAPOLATE_TO,
        ),
        (
            "rss_mib".to_owned(),
            after.rss_bytes as f64 / (1024.0 * 1024.0),
        ),
        (
            "rss_bytes_per_lease".to_owned(),
            signed_per(after.rss_bytes, before.rss_bytes),
        ),
        (
            "slab_bytes_per_lease".to_owned(),
            signed_per(after.slab_bytes, before.slab_bytes),
        ),
        (
            "sockets_per_lease".to_owned(),
            signed_per(after.sockets, before.sockets),
        ),
        ("tcp_listeners".to_owned(), after.tcp_listeners as f64),
        ("udp_sockets".to_owned(), after.udp_sockets as f64),
        ("grants_per_s".to_owned(), grants_per_s),
    ])
}

/// The grant-to-routable timings of one start.
struct Timed {
    route_ms: Vec<f64>,
    first_try: usize,
}

impl Timed {
    #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    fn metrics(&self) -> Metrics {
        let mut sorted = self.route_ms.clone();
        sorted.sort_by(f64::total_cmp);
        Metrics::from([
            ("route_p50_ms".to_owned(), quantile(&sorted, 0.5)),
            ("route_p99_ms".to_owned(), quantile(&sorted, 0.99)),
            (
                "route_max_ms".to_owned(),
                sorted.last().copied().unwrap_or_default(),
            ),
            (
                "routable_at_grant_pct".to_owned(),
                100.0 * self.first_try as f64 / sorted.len().max(1) as f64,
            ),
        ])
    }
}

/// The `q` quantile of ascending `sorted` (nearest rank; 0 when empty).
#[expect(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "a rank within the slice"
)]
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Leases {
    /// Asks for `self.grants` leases one at a time, timing each from its grant to the first
    /// accepted connect; pushes the grants onto `granted`.
    fn timed_grants(
        &self,
        driver: &mut LeaseDriver,
        ends: &LeaseEnds,
        granted: &mut Vec<Granted>,
    ) -> Result<Timed> {
        let mut timed = Timed {
            route_ms: Vec::with_capacity(self.grants),
            first_try: 0,
        };
        for i in 0..self.grants {
            let (_, grant) = self
                .rt
                .block_on(async {
                    driver.request(&lease_name(i), ends.udp).await?;
                    driver.answer().await
                })
                .with_context(|| format!("lease {i}"))?;
            let at_grant = Instant::now();
            let port = grant.tcp_port.context("a grant without a TCP port")?;
            let addr = SocketAddr::new(ends.bind_ip, port);
            let mut tries = 0_u32;
            loop {
                tries += 1;
                match connect_and_reset(addr) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        if at_grant.elapsed() > Duration::from_millis(ROUTE_TIMEOUT_MS) {
                            bail!("port {port} not routable {ROUTE_TIMEOUT_MS} ms after its grant");
                        }
                        std::thread::sleep(Duration::from_micros(RETRY_US));
                    }
                    Err(e) => return Err(e).with_context(|| format!("connecting to {addr}")),
                }
            }
            timed
                .route_ms
                .push(at_grant.elapsed().as_secs_f64() * 1000.0);
            if tries == 1 {
                timed.first_try += 1;
            }
            granted.push(grant);
        }
        Ok(timed)
    }
}

/// Connects to `addr` and closes with a reset (SO_LINGER 0), so the relay's side of the
/// connection (waiting for a reverse session that never comes) goes at once.
fn connect_and_reset(addr: SocketAddr) -> std::io::Result<()> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_millis(ROUTE_TIMEOUT_MS))?;
    socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO))?;
    Ok(())
}

/// Waits until the relay's descriptor count holds still for two sync ticks (its listeners
/// are bound), at most a few seconds.
fn settle_fds(pid: u32) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = open_fds(pid)?;
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let now = open_fds(pid)?;
        if now == last || Instant::now() > deadline {
            return Ok(());
        }
        last = now;
    }
}

/// Connects to [`ROUTE_SAMPLE`] granted TCP ports spread over `granted`: each must be
/// accepted, or the figures would describe a relay that does not serve its leases.
fn check_routable(ends: &LeaseEnds, granted: &[Granted]) -> Result<()> {
    let step = (granted.len() / ROUTE_SAMPLE).max(1);
    for g in granted.iter().step_by(step) {
        let port = g.tcp_port.context("a grant without a TCP port")?;
        let addr = SocketAddr::new(ends.bind_ip, port);
        connect_and_reset(addr).with_context(|| format!("granted port {port} does not route"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank_and_per_lease_is_growth() {
        let v: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 100.0);
        assert_eq!(quantile(&v, 0.99), 198.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
        assert_eq!(quantile(&[7.0], 0.99), 7.0);
        let before = Sample {
            fds: 40,
            rss_bytes: 10 << 20,
            slab_bytes: 1_000_000,
            sockets: 10,
            tcp_listeners: 0,
            udp_sockets: 0,
        };
        let after = Sample {
            fds: 40 + 2 * 1000,
            rss_bytes: (10 << 20) + 1000 * 512,
            slab_bytes: 900_000,
            sockets: 10 + 2000,
            tcp_listeners: 2000,
            udp_sockets: 0,
        };
        let m = all_metrics(&before, &after, 1000, 5000.0);
        assert_eq!(m["fds_per_lease"], 2.0);
        assert_eq!(m["fds_at_10k"], 40.0 + 20_000.0);
        assert_eq!(m["rss_bytes_per_lease"], 512.0);
        // Slab can shrink on a busy box: the sign is kept, not clamped.
        assert_eq!(m["slab_bytes_per_lease"], -100.0);
        assert_eq!(m["sockets_per_lease"], 2.0);
        let timed = Timed {
            route_ms: vec![3.0, 1.0, 2.0, 4.0],
            first_try: 1,
        };
        let t = timed.metrics();
        assert_eq!((t["route_p50_ms"], t["route_max_ms"]), (2.0, 4.0));
        assert_eq!(t["routable_at_grant_pct"], 25.0);
    }
}
