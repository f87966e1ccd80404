//! `idle-memory`: N relayed connections held open and idle. User-space memory is the PSS
//! growth of the relay's process trees (`/proc/<pid>/smaps_rollup`); kernel memory is the
//! growth of `Slab` in `/proc/meminfo`, system-wide (so it includes the client's and the
//! backend's sockets: compare with direct, which has only those).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::runtime::Handle;

use super::{Column, Measurement, Metrics, Scenario, Settings, Value};
use crate::backend::{self, Backend, Behaviour};
use crate::proc_stats::{slab_bytes, tree_pss_bytes};
use crate::target::{Routing, RunningTarget};

/// Time for a fresh target to finish starting before the "before" sample.
const SETTLE_BEFORE_MS: u64 = 500;
/// Time after the last connection before the "after" sample (deferred kernel frees).
const SETTLE_AFTER_MS: u64 = 1_000;

/// The idle-memory scenario: owns the echo backend.
pub struct IdleMemory {
    backend: Backend,
    connections: usize,
}

impl IdleMemory {
    /// Starts the echo backend.
    pub fn start(settings: &Settings, rt: &Handle) -> Result<Self> {
        Ok(Self {
            backend: backend::start(rt, Behaviour::Echo)?,
            connections: settings.idle_connections,
        })
    }
}

impl Scenario for IdleMemory {
    fn name(&self) -> &'static str {
        "idle-memory"
    }

    fn routing(&self) -> Routing {
        Routing::Tcp
    }

    fn backend_addr(&self) -> SocketAddr {
        self.backend.addr
    }

    fn columns(&self) -> Vec<Column> {
        vec![
            Column {
                header: "relay PSS B/conn",
                decimals: 0,
                value: Value::Metric("pss_bytes_per_conn"),
            },
            Column {
                header: "slab B/conn",
                decimals: 0,
                value: Value::Metric("slab_bytes_per_conn"),
            },
            Column {
                header: "slab over direct B/conn",
                decimals: 0,
                value: Value::AddedOverDirect("slab_bytes_per_conn"),
            },
        ]
    }

    fn measure(&mut self, target: &mut RunningTarget, _dir: &Path) -> Result<Vec<Measurement>> {
        std::thread::sleep(Duration::from_millis(SETTLE_BEFORE_MS));
        let roots = target.relay_roots();
        let pss_before = tree_pss_bytes(&roots);
        let slab_before = slab_bytes()?;
        let mut held = Vec::with_capacity(self.connections);
        for i in 0..self.connections {
            // One byte each way: the relay has set up both legs and touched its buffers.
            let mut stream = TcpStream::connect(target.front)
                .with_context(|| format!("connection {i}: connect"))?;
            stream
                .write_all(b"x")
                .with_context(|| format!("connection {i}: write"))?;
            let mut echo = [0_u8; 1];
            stream
                .read_exact(&mut echo)
                .with_context(|| format!("connection {i}: echo"))?;
            held.push(stream);
        }
        std::thread::sleep(Duration::from_millis(SETTLE_AFTER_MS));
        let pss_after = tree_pss_bytes(&roots);
        let slab_after = slab_bytes()?;
        drop(held);
        let n = self.connections as f64;
        let mut metrics = Metrics::from([(
            "slab_bytes_per_conn".to_owned(),
            (slab_after as f64 - slab_before as f64) / n,
        )]);
        if target.has_relay() {
            metrics.insert(
                "pss_bytes_per_conn".to_owned(),
                (pss_after as f64 - pss_before as f64) / n,
            );
        }
        Ok(vec![Measurement {
            variant: format!("{} idle", self.connections),
            metrics,
        }])
    }

    fn notes(&self) -> Vec<String> {
        vec![
            format!(
                "{} connections, each sent 1 B and got its echo, then held idle; per-connection \
                 figures are (after - before) / N, so one-time allocations are amortised over N",
                self.connections
            ),
            "slab is system-wide (/proc/meminfo Slab): anything else running moves it; \
             direct's figure is the client + backend sockets alone"
                .to_owned(),
        ]
    }
}
