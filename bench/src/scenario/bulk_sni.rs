//! `bulk-sni`: bulk throughput through the SNI path (P2). Each stream connects, sends a TLS
//! ClientHello naming `demo.outrelay.test`, then writes opaque bytes as fast as it can; the
//! backend reads the hello and counts every byte after it. A passthrough relay never decrypts,
//! so after the hello the bytes it splices are opaque whether or not they are TLS records:
//! leaving TLS out of the ends measures the relay's path, not the ends' AES. Throughput is the
//! backend's received bytes over the timed window (after a warm-up).

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::runtime::Handle;

use super::{Column, Measurement, Metrics, Scenario, Settings, Value};
use crate::backend::{self, Backend, Behaviour};
use crate::client_hello::{self, DEMO_SNI};
use crate::proc_stats::tree_cpu_seconds;
use crate::target::{Routing, RunningTarget};

/// Parallel stream counts measured, each a variant.
const STREAMS: [usize; 2] = [1, 8];
/// Bytes per write.
const WRITE_BYTES: usize = 256 * 1024;
/// Time before the timed window (connections set up, pipes grown).
const WARM_UP_MS: u64 = 500;

/// The bulk-sni scenario: owns the hello-sink backend.
pub struct BulkSni {
    backend: Backend,
    hello: Vec<u8>,
    duration: Duration,
    comparisons: Vec<Column>,
}

impl BulkSni {
    /// Starts the backend; the ClientHello is built for [`DEMO_SNI`].
    pub fn start(settings: &Settings, rt: &Handle) -> Result<Self> {
        Ok(Self {
            backend: backend::start(rt, Behaviour::HelloSink)?,
            hello: client_hello::build(DEMO_SNI),
            duration: Duration::from_secs(settings.bulk_duration_s),
            comparisons: super::bulk::comparison_columns(settings),
        })
    }

    fn one(&self, target: &RunningTarget, streams: usize) -> Result<Metrics> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut senders = Vec::with_capacity(streams);
        for _ in 0..streams {
            let mut s = TcpStream::connect(target.front).context("connecting")?;
            s.write_all(&self.hello)
                .context("sending the ClientHello")?;
            let stop = Arc::clone(&stop);
            senders.push(std::thread::spawn(move || -> Result<()> {
                let chunk = vec![0x17_u8; WRITE_BYTES];
                while !stop.load(Ordering::Relaxed) {
                    s.write_all(&chunk).context("sending")?;
                }
                Ok(())
            }));
        }
        std::thread::sleep(Duration::from_millis(WARM_UP_MS));
        let roots = target.relay_roots();
        let (bytes_before, cpu_before_s, start) = (
            self.backend.sunk_bytes.load(Ordering::Relaxed),
            tree_cpu_seconds(&roots),
            Instant::now(),
        );
        std::thread::sleep(self.duration);
        let bytes = self.backend.sunk_bytes.load(Ordering::Relaxed) - bytes_before;
        let (seconds, cpu_s) = (
            start.elapsed().as_secs_f64(),
            tree_cpu_seconds(&roots) - cpu_before_s,
        );
        stop.store(true, Ordering::Relaxed);
        for sender in senders {
            sender
                .join()
                .map_err(|_| anyhow::anyhow!("sender panicked"))??;
        }
        anyhow::ensure!(bytes > 0, "no byte reached the backend");
        let gbps = bytes as f64 * 8.0 / seconds / 1e9;
        let mut metrics = Metrics::from([("gbps".to_owned(), gbps)]);
        if target.has_relay() && cpu_s > 0.0 {
            metrics.insert("relay_cpu_s".to_owned(), cpu_s);
            metrics.insert("gbps_per_relay_core".to_owned(), gbps / (cpu_s / seconds));
        }
        metrics.insert(
            "sni_routed".to_owned(),
            if target.sni_routed { 1.0 } else { 0.0 },
        );
        Ok(metrics)
    }
}

impl Scenario for BulkSni {
    fn name(&self) -> &'static str {
        "bulk-sni"
    }

    fn routing(&self) -> Routing {
        Routing::Sni(DEMO_SNI)
    }

    fn backend_addr(&self) -> SocketAddr {
        self.backend.addr
    }

    fn columns(&self) -> Vec<Column> {
        let mut columns = vec![
            Column {
                header: "Gbit/s",
                decimals: 1,
                value: Value::Metric("gbps"),
            },
            Column {
                header: "x direct",
                decimals: 2,
                value: Value::RatioToDirect("gbps"),
            },
            Column {
                header: "relay CPU s",
                decimals: 2,
                value: Value::Metric("relay_cpu_s"),
            },
            Column {
                header: "Gbit/s per relay core",
                decimals: 1,
                value: Value::Metric("gbps_per_relay_core"),
            },
            Column {
                header: "SNI-routed (1 = yes)",
                decimals: 0,
                value: Value::Metric("sni_routed"),
            },
        ];
        columns.extend(self.comparisons.iter().cloned());
        columns
    }

    fn measure(&mut self, target: &mut RunningTarget, _dir: &Path) -> Result<Vec<Measurement>> {
        STREAMS
            .iter()
            .map(|&streams| {
                let metrics = self
                    .one(target, streams)
                    .with_context(|| format!("{streams} streams"))?;
                target.ensure_running()?;
                Ok(Measurement {
                    variant: format!("{streams} stream{}", if streams == 1 { "" } else { "s" }),
                    metrics,
                })
            })
            .collect()
    }

    fn notes(&self) -> Vec<String> {
        vec![format!(
            "each stream: a {} B ClientHello for {DEMO_SNI}, then {WRITE_BYTES} B writes of \
             opaque bytes; Gbit/s = bytes the backend read after the hello in a {} s window \
             after {WARM_UP_MS} ms warm-up",
            self.hello.len(),
            self.duration.as_secs()
        )]
    }
}
