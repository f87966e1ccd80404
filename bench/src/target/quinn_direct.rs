//! `quinn-direct`: P6's baseline, a plain quinn client → server transfer of one stream over
//! loopback, no relay (see [`crate::quic_peer`] for what "plain" means). Both ends are
//! processes of this binary (`quinn-server`, `quinn-client`); the client writes from the
//! moment it starts, so the target carries its own load and the scenario only reads the
//! server's byte count ([`RunningTarget::delivered`]). Both processes count as "the relay":
//! a relay decrypts like the server and encrypts like the client, so their sum is what one
//! relayed stream's relay CPU is compared with. Only the `mesh` scenario runs it.
//!
//! `quinn-direct-paced` is the same pair with the client pacing its writes at the rate the
//! mesh scenario measured through OutRelay before the rounds ([`Routing::Mesh`]'s
//! `pace_mbps`): QUIC's CPU per byte grows as the rate falls (fewer packets per GSO batch and
//! per wake-up, more timer and ACK work per byte), so this is the comparison at equal rate.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, Result, bail};

use super::{Availability, Launch, Routing, RunningTarget, Target, wait_ready};

/// How long the server gets to write its ready file.
const READY_TIMEOUT_MS: u64 = 10_000;

/// The plain quinn baseline; `paced`: at the rate measured through OutRelay.
pub struct QuinnDirect {
    /// Whether the client paces at [`Routing::Mesh`]'s `pace_mbps`.
    pub paced: bool,
}

impl Target for QuinnDirect {
    fn name(&self) -> &'static str {
        if self.paced {
            "quinn-direct-paced"
        } else {
            "quinn-direct"
        }
    }

    fn description(&self) -> &'static str {
        if self.paced {
            "quinn-direct with the client paced at OutRelay's measured mesh rate (mesh only)"
        } else {
            "plain quinn client -> server, one stream from memory, no relay (P6 baseline; mesh only)"
        }
    }

    fn availability(&self) -> Availability {
        match std::env::current_exe() {
            Ok(_) => Availability::Available,
            Err(e) => Availability::NotAvailable(format!("own executable not found: {e}")),
        }
    }

    fn supports(&self, routing: Routing) -> bool {
        matches!(routing, Routing::Mesh { .. })
    }

    fn start(
        &self,
        _backend: SocketAddr,
        routing: Routing,
        dir: &Path,
        launch: &Launch,
    ) -> Result<RunningTarget> {
        let Routing::Mesh { pace_mbps } = routing else {
            bail!("quinn-direct only runs the mesh scenario");
        };
        if self.paced && pace_mbps == 0 {
            bail!("no pacing rate: outrelay's mesh rate was not measured before the rounds");
        }
        let rate_gbps = if self.paced {
            f64::from(pace_mbps) / 1000.0
        } else {
            0.0
        };
        let exe = std::env::current_exe().context("own executable")?;
        let ready = dir.join("quinn-server.ready");
        let mut processes = vec![launch.spawn(
            "quinn-server",
            &exe,
            &[
                "quinn-server".to_owned(),
                "--ready-file".to_owned(),
                ready.display().to_string(),
            ],
            dir,
        )?];
        let info = wait_ready(&ready, &mut processes, READY_TIMEOUT_MS)?;
        let field = |key: &str| {
            info[key]
                .as_str()
                .map(str::to_owned)
                .with_context(|| format!("quinn-server ready file: {key}"))
        };
        let quic: SocketAddr = field("quic")?.parse().context("quinn-server quic")?;
        let stats: SocketAddr = field("stats")?.parse().context("quinn-server stats")?;
        processes.push(launch.spawn(
            "quinn-client",
            &exe,
            &[
                "quinn-client".to_owned(),
                "--connect".to_owned(),
                quic.to_string(),
                "--cert".to_owned(),
                field("cert")?,
                "--rate-gbps".to_owned(),
                rate_gbps.to_string(),
            ],
            dir,
        )?);
        let mut running = RunningTarget::new(quic, false, processes);
        running.delivered = Some(stats);
        Ok(running)
    }
}
