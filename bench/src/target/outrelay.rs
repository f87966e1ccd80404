//! `outrelay`: the relay and agent (two hops). Not built yet: reported as not available, never
//! faked. Wiring it in means writing its config from a template, starting relay + agent with
//! [`OwnedProcess`](crate::process::OwnedProcess) as `rathole.rs` does, and returning both.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Result, bail};

use super::{Availability, Routing, RunningTarget, Target};

/// OutRelay's relay and agent.
pub struct Outrelay;

impl Target for Outrelay {
    fn name(&self) -> &'static str {
        "outrelay"
    }

    fn description(&self) -> &'static str {
        "OutRelay relay + agent (two hops, reverse session)"
    }

    fn availability(&self) -> Availability {
        Availability::NotAvailable("relay not built yet".to_owned())
    }

    fn start(&self, _backend: SocketAddr, _routing: Routing, _dir: &Path) -> Result<RunningTarget> {
        bail!("outrelay: not available (relay not built yet)")
    }
}
