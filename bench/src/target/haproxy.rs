//! `haproxy` (one hop) and `haproxy-chain` (two hops: HAProxy in front of HAProxy, the fair
//! comparison for a two-hop relay + agent). `mode tcp` with `option splice-auto`; with
//! [`Routing::Sni`] the first hop routes on `req.ssl_sni` and the second forwards.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, Result};

use super::{
    Availability, Launch, Routing, RunningTarget, Target, free_loopback_addr, wait_listening,
};
use crate::peers::find_binary;
use crate::process::OwnedProcess;
use crate::template::render;

const TCP_TEMPLATE: &str = include_str!("../../templates/haproxy-tcp.cfg");
const SNI_TEMPLATE: &str = include_str!("../../templates/haproxy-sni.cfg");

/// HAProxy, chained `hops` times (1 or 2).
pub struct Haproxy {
    /// 1: `haproxy`; 2: `haproxy-chain`.
    pub hops: u8,
}

impl Target for Haproxy {
    fn name(&self) -> &'static str {
        if self.hops == 1 {
            "haproxy"
        } else {
            "haproxy-chain"
        }
    }

    fn description(&self) -> &'static str {
        if self.hops == 1 {
            "HAProxy mode tcp, option splice-auto; SNI routing with req.ssl_sni"
        } else {
            "HAProxy chained twice (two hops): hop 1 as `haproxy`, hop 2 plain TCP forward"
        }
    }

    fn availability(&self) -> Availability {
        match find_binary("haproxy") {
            Some(_) => Availability::Available,
            None => Availability::NotAvailable("haproxy not installed".to_owned()),
        }
    }

    fn routes_sni(&self) -> bool {
        true
    }

    fn start(
        &self,
        backend: SocketAddr,
        routing: Routing,
        dir: &Path,
        launch: &Launch,
    ) -> Result<RunningTarget> {
        let binary = find_binary("haproxy").context("haproxy not installed")?;
        let mut processes = Vec::new();
        let mut listening = Vec::new();
        // Start from the backend side: hop 2 (plain forward) first, then hop 1 in front of it.
        let mut next = backend;
        if self.hops == 2 {
            let front = free_loopback_addr()?;
            processes.push(spawn(
                launch,
                &binary,
                dir,
                "haproxy-hop2",
                front,
                next,
                Routing::Tcp,
            )?);
            listening.push(front);
            next = front;
        }
        let front = free_loopback_addr()?;
        processes.push(spawn(
            launch,
            &binary,
            dir,
            "haproxy-hop1",
            front,
            next,
            routing,
        )?);
        listening.push(front);
        wait_listening(&listening, &mut processes)?;
        Ok(RunningTarget::new(
            front,
            matches!(routing, Routing::Sni(_)),
            processes,
        ))
    }
}

fn spawn(
    launch: &Launch,
    binary: &Path,
    dir: &Path,
    name: &str,
    front: SocketAddr,
    backend: SocketAddr,
    routing: Routing,
) -> Result<OwnedProcess> {
    let (front, backend) = (front.to_string(), backend.to_string());
    let config = match routing {
        Routing::Tcp => render(
            TCP_TEMPLATE,
            &[("front_addr", &front), ("backend_addr", &backend)],
        )?,
        Routing::Udp | Routing::Mesh { .. } | Routing::Abuse { .. } | Routing::Leases { .. } => {
            anyhow::bail!("haproxy does not forward UDP or QUIC")
        }
        Routing::Sni(name) => render(
            SNI_TEMPLATE,
            &[
                ("front_addr", &front),
                ("backend_addr", &backend),
                ("sni_name", name),
            ],
        )?,
    };
    let path = dir.join(format!("{name}.cfg"));
    std::fs::write(&path, config).context("writing haproxy config")?;
    // -db: stay in the foreground so the harness owns the process.
    let args = [
        "-db".to_owned(),
        "-f".to_owned(),
        path.display().to_string(),
    ];
    launch.spawn(name, binary, &args, dir)
}

#[cfg(test)]
pub fn template_examples() -> Vec<super::TemplateExample> {
    let tcp = vec![
        ("front_addr", "127.0.0.1:1"),
        ("backend_addr", "127.0.0.1:2"),
    ];
    let mut sni = tcp.clone();
    sni.push(("sni_name", "demo.outrelay.test"));
    vec![
        ("haproxy-tcp.cfg", TCP_TEMPLATE, tcp),
        ("haproxy-sni.cfg", SNI_TEMPLATE, sni),
    ]
}
