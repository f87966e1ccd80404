//! `socat`: the naive copy relay, one forked process per connection. Its forked copies count
//! as the relay (live ones through the process tree, finished ones through the leader's
//! `cutime`/`cstime`). Configured on the command line; there is no config file.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, Result};

use super::{
    Availability, Launch, Routing, RunningTarget, Target, free_loopback_addr, wait_listening,
};
use crate::peers::find_binary;

/// socat's default listen backlog is 5, which would measure the backlog, not socat.
const LISTEN_BACKLOG: u32 = 4096;

/// socat TCP-LISTEN,fork → TCP.
pub struct Socat;

impl Target for Socat {
    fn name(&self) -> &'static str {
        "socat"
    }

    fn description(&self) -> &'static str {
        "socat TCP-LISTEN,fork to TCP (one process per connection); forwards every connection"
    }

    fn availability(&self) -> Availability {
        match find_binary("socat") {
            Some(_) => Availability::Available,
            None => Availability::NotAvailable("socat not installed".to_owned()),
        }
    }

    fn start(
        &self,
        backend: SocketAddr,
        _routing: Routing,
        dir: &Path,
        launch: &Launch,
    ) -> Result<RunningTarget> {
        let binary = find_binary("socat").context("socat not installed")?;
        let front = free_loopback_addr()?;
        let args = [
            format!(
                "TCP-LISTEN:{},bind={},reuseaddr,fork,nodelay,backlog={LISTEN_BACKLOG}",
                front.port(),
                front.ip()
            ),
            format!("TCP:{backend},nodelay"),
        ];
        let mut processes = vec![launch.spawn("socat", &binary, &args, dir)?];
        wait_listening(&[front], &mut processes)?;
        Ok(RunningTarget::new(front, false, processes))
    }
}
