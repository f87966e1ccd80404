//! `connrate`: new connections per second at a fixed concurrency. Each connection: connect,
//! send a TLS ClientHello naming `demo.outrelay.test`, read the backend's 1 KiB reply, close.
//! SNI-capable targets route on the name, so their SNI path is what is measured.
//!
//! With `--paths sni,tcp` (the default) every target that routes on SNI is measured twice per
//! round: `sni` (routed on the name; OutRelay: the public TLS listener) and `tcp` (forwarded
//! without looking; OutRelay: the agent's TCP port lease, HAProxy and nginx: their plain TCP
//! configs). Targets that forward every connection anyway (rathole, socat, direct) run once, as
//! `tcp`. The client is the same on both paths: the hello is sent either way.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::runtime::Handle;

use super::{Column, Measurement, Metrics, RoutePath, Scenario, Settings, Value};
use crate::backend::{self, Backend, Behaviour, REPLY_BYTES};
use crate::client_hello::{self, ClientHello, DEMO_SNI};
use crate::proc_stats::tree_cpu_seconds;
use crate::stats::{latency_histogram, quantile_us, record_ns};
use crate::target::{Routing, RunningTarget};

/// A connection taking longer than this counts as an error.
const CONNECTION_TIMEOUT_MS: u64 = 5_000;

/// The connrate scenario: owns the hello backend.
pub struct Connrate {
    rt: Handle,
    backend: Backend,
    hello: ClientHello,
    duration: Duration,
    concurrency: usize,
    paths: Vec<RoutePath>,
    /// Cores of `--pin-targets`: adds conn/s per target core.
    pin_target_cores: Option<usize>,
    /// `outrelay-base` runs too: adds the x base columns.
    compare_base: bool,
    /// More than one relay worker count: adds the x first w column.
    compare_setups: bool,
    /// eBPF setups (`--relay-ebpf`): the setup columns compare with the first setup (e.g.
    /// ebpf=off) and add p99 and CPU per connection.
    compare_ebpf: bool,
}

impl Connrate {
    /// Loads the ClientHello and starts the backend.
    pub fn start(settings: &Settings, rt: &Handle) -> Result<Self> {
        Ok(Self {
            rt: rt.clone(),
            backend: backend::start(rt, Behaviour::HelloReply)?,
            hello: client_hello::load(settings.client_hello.as_deref())?,
            duration: Duration::from_secs(settings.connrate_duration_s),
            concurrency: settings.connrate_concurrency,
            paths: settings.connrate_paths.clone(),
            pin_target_cores: settings.pin_target_cores,
            compare_base: settings.compare_base,
            compare_setups: super::several_setups(settings),
            compare_ebpf: !settings.relay_ebpf.is_empty(),
        })
    }
}

impl Scenario for Connrate {
    fn name(&self) -> &'static str {
        "connrate"
    }

    fn routing(&self) -> Routing {
        Routing::Sni(DEMO_SNI)
    }

    fn routings(&self) -> Vec<Routing> {
        self.paths
            .iter()
            .map(|p| match p {
                RoutePath::Sni => Routing::Sni(DEMO_SNI),
                RoutePath::Tcp => Routing::Tcp,
            })
            .collect()
    }

    fn backend_addr(&self) -> SocketAddr {
        self.backend.addr
    }

    fn columns(&self) -> Vec<Column> {
        let mut columns = vec![
            Column {
                header: "conn/s",
                decimals: 0,
                value: Value::Metric("conn_per_s"),
            },
            Column {
                header: "x direct",
                decimals: 2,
                value: Value::RatioToDirect("conn_per_s"),
            },
            // P3's two-hop peers, per round (same path where the peer measured it).
            Column {
                header: "x haproxy-chain",
                decimals: 2,
                value: Value::RatioToTarget("haproxy-chain", "conn_per_s"),
            },
            Column {
                header: "x rathole",
                decimals: 2,
                value: Value::RatioToTarget("rathole", "conn_per_s"),
            },
            Column {
                header: "first byte p50 µs",
                decimals: 0,
                value: Value::Metric("p50_us"),
            },
            Column {
                header: "first byte p99 µs",
                decimals: 0,
                value: Value::Metric("p99_us"),
            },
            Column {
                header: "relay CPU µs/conn",
                decimals: 1,
                value: Value::Metric("relay_cpu_us_per_conn"),
            },
            Column {
                header: "errors",
                decimals: 0,
                value: Value::Metric("errors"),
            },
            Column {
                header: "SNI-routed (1 = yes)",
                decimals: 0,
                value: Value::Metric("sni_routed"),
            },
        ];
        if self.pin_target_cores.is_some() {
            columns.push(Column {
                header: "conn/s per target core",
                decimals: 0,
                value: Value::Metric("conn_per_s_per_target_core"),
            });
        }
        if self.compare_base {
            columns.push(Column {
                header: "conn/s x base",
                decimals: 2,
                value: Value::RatioToBase("conn_per_s"),
            });
            columns.push(Column {
                header: "CPU/conn x base",
                decimals: 2,
                value: Value::RatioToBase("relay_cpu_us_per_conn"),
            });
        }
        if self.compare_setups && self.compare_ebpf {
            columns.extend([
                Column {
                    header: "conn/s x first setup",
                    decimals: 2,
                    value: Value::RatioToFirstSetup("conn_per_s"),
                },
                Column {
                    header: "p99 x first setup",
                    decimals: 2,
                    value: Value::RatioToFirstSetup("p99_us"),
                },
                Column {
                    header: "CPU/conn x first setup",
                    decimals: 2,
                    value: Value::RatioToFirstSetup("relay_cpu_us_per_conn"),
                },
            ]);
        } else if self.compare_setups {
            columns.push(Column {
                header: "conn/s x first w",
                decimals: 2,
                value: Value::RatioToFirstSetup("conn_per_s"),
            });
        }
        columns
    }

    fn measure(&mut self, target: &mut RunningTarget, _dir: &Path) -> Result<Vec<Measurement>> {
        let hello: Arc<[u8]> = self.hello.bytes.clone().into();
        let front = target.front;
        // One connection first: a routing mistake fails here with its reason, not as a rate.
        self.rt
            .block_on(one_connection(front, &hello))
            .context("first connection through the target")?;
        let roots = target.relay_roots();
        let cpu_before_s = tree_cpu_seconds(&roots);
        let load = self
            .rt
            .block_on(load(front, hello, self.concurrency, self.duration))?;
        let cpu_s = tree_cpu_seconds(&roots) - cpu_before_s;
        if load.completed == 0 {
            bail!(
                "no connection completed: {}",
                load.first_error.unwrap_or_default()
            );
        }
        let completed = load.completed as f64;
        let conn_per_s = completed / load.elapsed.as_secs_f64();
        let mut metrics = Metrics::from([
            ("conn_per_s".to_owned(), conn_per_s),
            ("p50_us".to_owned(), quantile_us(&load.first_byte, 0.50)),
            ("p99_us".to_owned(), quantile_us(&load.first_byte, 0.99)),
            ("errors".to_owned(), load.errors as f64),
        ]);
        if target.has_relay() {
            metrics.insert("relay_cpu_us_per_conn".to_owned(), cpu_s * 1e6 / completed);
            if let Some(cores) = self.pin_target_cores {
                metrics.insert(
                    "conn_per_s_per_target_core".to_owned(),
                    conn_per_s / cores as f64,
                );
            }
        }
        // Routing is a column, not part of the variant, so every target compares with direct.
        metrics.insert(
            "sni_routed".to_owned(),
            if target.sni_routed { 1.0 } else { 0.0 },
        );
        Ok(vec![Measurement {
            variant: format!("c={}", self.concurrency),
            metrics,
        }])
    }

    fn notes(&self) -> Vec<String> {
        let mut notes = vec![
            format!("ClientHello: {}", self.hello.source),
            format!(
                "{} s of load per measurement at {} concurrent connections; first byte = \
                 connect start to the first reply byte; the client closes with SO_LINGER 0 \
                 (RST) so its ephemeral ports never pile up in TIME_WAIT",
                self.duration.as_secs(),
                self.concurrency
            ),
            "SNI-routed: haproxy (req.ssl_sni; haproxy-chain routes on hop 1, hop 2 forwards), \
             nginx (ssl_preread); rathole and socat forward every connection"
                .to_owned(),
            "path sni: routed on the ClientHello (outrelay: public TLS listener, TLS lease); \
             path tcp: forwarded without looking (outrelay: the agent's TCP port lease; \
             haproxy, haproxy-chain, nginx: their plain TCP configs); targets that never route \
             (direct, rathole, socat) run once, as tcp; x haproxy-chain and x rathole compare \
             with the peer's same path in the same round, or its only one"
                .to_owned(),
        ];
        if self.paths.len() < 2 {
            notes.pop();
        }
        notes.push(
            "relay CPU µs/conn: utime + stime of every relay process tree (relay and agent for \
             outrelay; both hops for haproxy-chain and rathole) over the load, per completed \
             connection; conn/s per target core = conn/s / cores in --pin-targets"
                .to_owned(),
        );
        notes
    }
}

/// The outcome of one load run (also the abuse scenario's legitimate client).
pub(super) struct Load {
    pub(super) completed: u64,
    pub(super) errors: u64,
    pub(super) first_error: Option<String>,
    pub(super) first_byte: Histogram<u64>,
    pub(super) elapsed: Duration,
}

/// `concurrency` workers making connections to `front` until `duration` has passed.
pub(super) async fn load(
    front: SocketAddr,
    hello: Arc<[u8]>,
    concurrency: usize,
    duration: Duration,
) -> Result<Load> {
    let start = Instant::now();
    let deadline = start + duration;
    let workers: Vec<_> = (0..concurrency)
        .map(|_| tokio::spawn(worker(front, Arc::clone(&hello), deadline)))
        .collect();
    let mut total = Load {
        completed: 0,
        errors: 0,
        first_error: None,
        first_byte: latency_histogram()?,
        elapsed: Duration::ZERO,
    };
    for w in workers {
        let part = w.await.context("load worker panicked")??;
        total.completed += part.completed;
        total.errors += part.errors;
        total.first_error = total.first_error.or(part.first_error);
        total
            .first_byte
            .add(&part.first_byte)
            .context("merging histograms")?;
    }
    total.elapsed = start.elapsed();
    Ok(total)
}

async fn worker(front: SocketAddr, hello: Arc<[u8]>, deadline: Instant) -> Result<Load> {
    let mut part = Load {
        completed: 0,
        errors: 0,
        first_error: None,
        first_byte: latency_histogram()?,
        elapsed: Duration::ZERO,
    };
    let limit = Duration::from_millis(CONNECTION_TIMEOUT_MS);
    while Instant::now() < deadline {
        match tokio::time::timeout(limit, one_connection(front, &hello)).await {
            Ok(Ok(first_byte)) => {
                record_ns(&mut part.first_byte, first_byte);
                part.completed += 1;
            }
            Ok(Err(e)) => {
                part.errors += 1;
                part.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
            Err(_) => {
                part.errors += 1;
                part.first_error
                    .get_or_insert_with(|| format!("timed out after {limit:?}"));
            }
        }
    }
    Ok(part)
}

/// One connection; returns connect-start to first-reply-byte time.
pub(super) async fn one_connection(front: SocketAddr, hello: &[u8]) -> Result<Duration> {
    let start = Instant::now();
    let mut stream = TcpStream::connect(front).await.context("connect")?;
    stream.set_nodelay(true)?;
    // Close with RST: the client side never enters TIME_WAIT, so a long run cannot exhaust
    // the ephemeral port range.
    socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO))?;
    stream
        .write_all(hello)
        .await
        .context("sending ClientHello")?;
    let mut reply = [0_u8; REPLY_BYTES];
    let n = stream.read(&mut reply).await.context("reading reply")?;
    if n == 0 {
        bail!("closed before the reply (not routed?)");
    }
    let first_byte = start.elapsed();
    stream
        .read_exact(&mut reply[n..])
        .await
        .context("reading the rest of the reply")?;
    Ok(first_byte)
}
