//! `engine-uring` / `engine-epoll`: a single-hop TCP forwarder built on OutRelay's splice
//! engine (`dataplane/io/examples/forward.rs`), one worker thread. It is the engine alone (no
//! SNI, no reverse session, no second hop), measured so the engine's design (readiness +
//! inline splice, pipe sizing) can be compared with HAProxy's and nginx's single hop before the
//! relay exists. Build it with `cargo build --release -p outrelay-io --example forward`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::{
    Availability, Launch, Routing, RunningTarget, Target, free_loopback_addr, wait_listening,
};

/// The forwarder on one readiness backend.
pub struct Engine {
    /// `io_uring` or `epoll`.
    pub backend: &'static str,
}

fn binary() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/examples/forward")
}

impl Target for Engine {
    fn name(&self) -> &'static str {
        match self.backend {
            "io_uring" => "engine-uring",
            _ => "engine-epoll",
        }
    }

    fn description(&self) -> &'static str {
        "OutRelay's splice engine as a one-hop TCP forwarder (1 worker); forwards every connection"
    }

    fn availability(&self) -> Availability {
        if binary().exists() {
            Availability::Available
        } else {
            Availability::NotAvailable(
                "build it: cargo build --release -p outrelay-io --example forward".to_owned(),
            )
        }
    }

    fn start(
        &self,
        backend: SocketAddr,
        _routing: Routing,
        dir: &Path,
        launch: &Launch,
    ) -> Result<RunningTarget> {
        let front = free_loopback_addr()?;
        let args = [
            "--listen".to_owned(),
            front.to_string(),
            "--to".to_owned(),
            backend.to_string(),
            "--backend".to_owned(),
            self.backend.to_owned(),
        ];
        let mut processes = vec![
            launch
                .spawn(self.name(), &binary(), &args, dir)
                .context("starting the engine forwarder")?,
        ];
        wait_listening(&[front], &mut processes)?;
        Ok(RunningTarget::new(front, false, processes))
    }
}
