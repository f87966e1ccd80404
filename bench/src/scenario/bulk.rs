//! `bulk`: iperf3 through the target, 1 and 8 streams. Throughput is iperf3's receiver-side
//! figure; relay CPU is the utime + stime of the relay's process trees over the transfer.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value as Json;

use super::{Column, Measurement, Metrics, Scenario, Settings, Value};
use crate::peers::find_binary;
use crate::proc_stats::tree_cpu_seconds;
use crate::process::OwnedProcess;
use crate::target::{Routing, RunningTarget, free_loopback_addr, wait_listening};

/// Parallel stream counts measured, each a variant.
const STREAMS: [u32; 2] = [1, 8];
/// Time an iperf3 client gets beyond its transfer time before it is killed.
const CLIENT_SLACK_S: u64 = 30;
/// Attempts when the iperf3 server is still busy with the previous test.
const BUSY_RETRIES: u32 = 5;

/// The bulk scenario: owns the iperf3 server.
pub struct Bulk {
    iperf3: PathBuf,
    server_addr: SocketAddr,
    duration_s: u64,
    comparisons: Vec<Column>,
    _server: OwnedProcess,
}

impl Bulk {
    /// Starts `iperf3 -s` on a free loopback port.
    pub fn start(settings: &Settings, dir: &Path) -> Result<Self> {
        let iperf3 = find_binary("iperf3").context("iperf3 not installed (use --install-peers)")?;
        let server_addr = free_loopback_addr()?;
        let args = [
            "-s",
            "-B",
            "127.0.0.1",
            "-p",
            &server_addr.port().to_string(),
        ]
        .map(str::to_owned);
        let mut server = OwnedProcess::spawn("iperf3-server", &iperf3, &args, dir)?;
        wait_listening(&[server_addr], std::slice::from_mut(&mut server))?;
        Ok(Self {
            iperf3,
            server_addr,
            duration_s: settings.bulk_duration_s,
            comparisons: comparison_columns(settings),
            _server: server,
        })
    }

    fn one(&self, target: &RunningTarget, streams: u32, dir: &Path) -> Result<Metrics> {
        let roots = target.relay_roots();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let cpu_before_s = tree_cpu_seconds(&roots);
            let json = self.client(target.front, streams, dir, attempt)?;
            let cpu_s = tree_cpu_seconds(&roots) - cpu_before_s;
            match parse_iperf3(&json) {
                Ok(result) => {
                    let gbps = result.bits_per_second / 1e9;
                    let mut metrics = Metrics::from([("gbps".to_owned(), gbps)]);
                    if target.has_relay() {
                        metrics.insert("relay_cpu_s".to_owned(), cpu_s);
                        // Gbit/s per core busy = Gbit moved per CPU-second of the relay.
                        let cores = cpu_s / result.seconds;
                        if cores > 0.0 {
                            metrics.insert("gbps_per_relay_core".to_owned(), gbps / cores);
                        }
                    }
                    return Ok(metrics);
                }
                Err(e) if attempt < BUSY_RETRIES && format!("{e:#}").contains("busy") => {
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn client(&self, front: SocketAddr, streams: u32, dir: &Path, attempt: u32) -> Result<String> {
        let args = [
            "-c".to_owned(),
            front.ip().to_string(),
            "-p".to_owned(),
            front.port().to_string(),
            "-t".to_owned(),
            self.duration_s.to_string(),
            "-P".to_owned(),
            streams.to_string(),
            "-J".to_owned(),
        ];
        let name = format!("iperf3-client-{streams}-try{attempt}");
        let mut client = OwnedProcess::spawn(&name, &self.iperf3, &args, dir)?;
        // iperf3 -J exits non-zero on failure but still writes its error into the JSON.
        client.wait_timeout(Duration::from_secs(self.duration_s + CLIENT_SLACK_S))?;
        client.stdout()
    }
}

impl Scenario for Bulk {
    fn name(&self) -> &'static str {
        "bulk"
    }

    fn routing(&self) -> Routing {
        Routing::Tcp
    }

    fn backend_addr(&self) -> SocketAddr {
        self.server_addr
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
        ];
        columns.extend(self.comparisons.iter().cloned());
        columns
    }

    fn measure(&mut self, target: &mut RunningTarget, dir: &Path) -> Result<Vec<Measurement>> {
        STREAMS
            .iter()
            .map(|&streams| {
                let metrics = self.one(target, streams, dir)?;
                let variant = if streams == 1 {
                    "1 stream".to_owned()
                } else {
                    format!("{streams} streams")
                };
                Ok(Measurement { variant, metrics })
            })
            .collect()
    }

    fn notes(&self) -> Vec<String> {
        vec![format!(
            "iperf3 -t {} per measurement; Gbit/s is iperf3's receiver figure; relay CPU is \
             utime+stime of the relay's process trees (/proc/<pid>/stat) over the transfer; \
             per relay core = Gbit/s / (relay CPU s / transfer s)",
            self.duration_s
        )]
    }
}

/// The columns `bulk` and `bulk-sni` add when the run compares: Gbit/s and Gbit/s per relay
/// core × `outrelay-base` (outrelay rows; the same round, path and setup), and Gbit/s × the first relay
/// worker count (`--relay-workers` with more than one).
pub(super) fn comparison_columns(settings: &Settings) -> Vec<Column> {
    let mut columns = Vec::new();
    if settings.compare_base {
        columns.push(Column {
            header: "Gbit/s x base",
            decimals: 2,
            value: Value::RatioToBase("gbps"),
        });
        columns.push(Column {
            header: "per core x base",
            decimals: 2,
            value: Value::RatioToBase("gbps_per_relay_core"),
        });
    }
    if super::several_setups(settings) {
        columns.push(Column {
            header: if settings.relay_ebpf.is_empty() {
                "Gbit/s x first w"
            } else {
                "Gbit/s x first setup"
            },
            decimals: 2,
            value: Value::RatioToFirstSetup("gbps"),
        });
    }
    columns
}

/// The receiver-side summary of an iperf3 `-J` run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Iperf3Result {
    /// Throughput over all streams.
    pub bits_per_second: f64,
    /// Transfer time the figure covers.
    pub seconds: f64,
}

/// Reads `end.sum_received` from iperf3's JSON; an `error` field becomes an error.
pub fn parse_iperf3(json: &str) -> Result<Iperf3Result> {
    let doc: Json = serde_json::from_str(json).context("iperf3 output is not JSON")?;
    if let Some(error) = doc.get("error").and_then(Json::as_str) {
        bail!("iperf3: {error}");
    }
    let sum = doc
        .pointer("/end/sum_received")
        .context("iperf3 JSON has no end.sum_received")?;
    let number = |key: &str| {
        sum.get(key)
            .and_then(Json::as_f64)
            .with_context(|| format!("iperf3 end.sum_received.{key} missing"))
    };
    let result = Iperf3Result {
        bits_per_second: number("bits_per_second")?,
        seconds: number("seconds")?,
    };
    if result.seconds <= 0.0 {
        bail!("iperf3 reported a transfer of {} s", result.seconds);
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receiver_figures_are_read_from_the_end_summary() {
        let json = r#"{
            "start": {"connected": [], "test_start": {"num_streams": 8}},
            "intervals": [],
            "end": {
                "sum_sent": {"start": 0, "end": 10.0, "seconds": 10.0, "bytes": 26000000000,
                             "bits_per_second": 20800000000.0, "retransmits": 0},
                "sum_received": {"start": 0, "end": 10.04, "seconds": 10.04,
                                 "bytes": 25900000000, "bits_per_second": 20637450199.2},
                "cpu_utilization_percent": {"host_total": 80.1}
            }
        }"#;
        let r = parse_iperf3(json).expect("valid iperf3 JSON");
        assert_eq!(r.bits_per_second, 20_637_450_199.2);
        assert_eq!(r.seconds, 10.04);
    }

    #[test]
    fn iperf3_errors_and_garbage_are_errors() {
        let busy = r#"{"start": {}, "intervals": [], "end": {},
                       "error": "the server is busy running a test. try again later"}"#;
        let e = parse_iperf3(busy).expect_err("error field");
        assert!(format!("{e:#}").contains("busy"));
        assert!(parse_iperf3("iperf3: error - unable to connect").is_err());
        assert!(parse_iperf3(r#"{"end": {}}"#).is_err());
        assert!(
            parse_iperf3(r#"{"end": {"sum_received": {"seconds": 0, "bits_per_second": 1}}}"#)
                .is_err()
        );
    }
}
