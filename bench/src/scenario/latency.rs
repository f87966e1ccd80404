//! `latency`: 64-byte ping-pong over one established connection through the target to an
//! echo backend. The client is a plain blocking socket on its own thread: the least scheduling
//! noise a client can add.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use tokio::runtime::Handle;

use super::{Column, Measurement, Metrics, Scenario, Settings, Value};
use crate::backend::{self, Backend, Behaviour};
use crate::stats::{latency_histogram, quantile_us, record_ns};
use crate::target::{Routing, RunningTarget};

/// Bytes per ping (and pong).
const MESSAGE_BYTES: usize = 64;

/// The latency scenario: owns the echo backend.
pub struct Latency {
    backend: Backend,
    round_trips: usize,
}

impl Latency {
    /// Starts the echo backend.
    pub fn start(settings: &Settings, rt: &Handle) -> Result<Self> {
        Ok(Self {
            backend: backend::start(rt, Behaviour::Echo)?,
            round_trips: settings.latency_round_trips,
        })
    }
}

impl Scenario for Latency {
    fn name(&self) -> &'static str {
        "latency"
    }

    fn routing(&self) -> Routing {
        Routing::Tcp
    }

    fn backend_addr(&self) -> SocketAddr {
        self.backend.addr
    }

    fn columns(&self) -> Vec<Column> {
        let mut columns = Vec::new();
        for (metric, label) in [("p50_us", "p50"), ("p99_us", "p99"), ("p999_us", "p99.9")] {
            columns.push(Column {
                header: match label {
                    "p50" => "p50 µs",
                    "p99" => "p99 µs",
                    _ => "p99.9 µs",
                },
                decimals: 1,
                value: Value::Metric(metric),
            });
        }
        for (metric, header) in [
            ("p50_us", "p50 added µs"),
            ("p99_us", "p99 added µs"),
            ("p999_us", "p99.9 added µs"),
        ] {
            columns.push(Column {
                header,
                decimals: 1,
                value: Value::AddedOverDirect(metric),
            });
        }
        columns
    }

    fn measure(&mut self, target: &mut RunningTarget, _dir: &Path) -> Result<Vec<Measurement>> {
        let mut stream = TcpStream::connect(target.front).context("connecting")?;
        stream.set_nodelay(true)?;
        let ping = [0x5a_u8; MESSAGE_BYTES];
        let mut pong = [0_u8; MESSAGE_BYTES];
        // Warm up: first connection set-up, caches, the relay's upstream connect.
        let warm_up = (self.round_trips / 10).max(10);
        let mut hist = latency_histogram()?;
        for i in 0..warm_up + self.round_trips {
            let start = Instant::now();
            stream.write_all(&ping).context("sending ping")?;
            stream.read_exact(&mut pong).context("reading pong")?;
            if i >= warm_up {
                record_ns(&mut hist, start.elapsed());
            }
        }
        anyhow::ensure!(pong == ping, "echo returned different bytes");
        let metrics = Metrics::from([
            ("p50_us".to_owned(), quantile_us(&hist, 0.50)),
            ("p99_us".to_owned(), quantile_us(&hist, 0.99)),
            ("p999_us".to_owned(), quantile_us(&hist, 0.999)),
        ]);
        Ok(vec![Measurement {
            variant: "64 B ping-pong".to_owned(),
            metrics,
        }])
    }

    fn notes(&self) -> Vec<String> {
        vec![format!(
            "{} timed round trips of {MESSAGE_BYTES} B per measurement (after {} warm-up); \
             added = target minus direct in the same round",
            self.round_trips,
            (self.round_trips / 10).max(10)
        )]
    }
}
