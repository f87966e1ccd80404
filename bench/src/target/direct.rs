//! `direct`: no relay; clients connect straight to the backend. The physical ceiling every
//! other target is compared with.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Result;

use super::{Availability, Launch, Routing, RunningTarget, Target};

/// The direct loopback path.
pub struct Direct;

impl Target for Direct {
    fn name(&self) -> &'static str {
        "direct"
    }

    fn description(&self) -> &'static str {
        "no relay: client straight to the backend over loopback (the ceiling)"
    }

    fn availability(&self) -> Availability {
        Availability::Available
    }

    fn supports(&self, routing: Routing) -> bool {
        // The abuse scenario attacks the relay's own listeners: there is nothing direct.
        !matches!(
            routing,
            Routing::Abuse { .. }
                | Routing::Leases { .. }
                | Routing::Upgrade { .. }
                | Routing::Failover
        )
    }

    fn start(
        &self,
        backend: SocketAddr,
        _routing: Routing,
        _dir: &Path,
        _launch: &Launch,
    ) -> Result<RunningTarget> {
        Ok(RunningTarget::without_processes(backend))
    }
}
