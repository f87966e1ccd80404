//! `haproxy` (one hop) and `haproxy-chain` (two hops: HAProxy in front of HAProxy, the fair
//! comparison for a two-hop relay + agent). `mode tcp` with `option splice-auto`; with
//! [`Routing::Sni`] the first hop routes on `req.ssl_sni` and the second forwards.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, Result};

use super::{
    Availability, Launch, Routing, RunningTarget, Target, UpgradeEnds, free_loopback_addr,
    wait_listening,
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
    /// `haproxy-classic` (one hop, upgrade scenario only): reloaded the classic way, a new
    /// process with `-sf` and no listener hand-over.
    pub classic: bool,
}

/// The upgrade scenario's `global` lines for the seamless reload: the stats socket hands the
/// listeners to the new worker (`expose-fd listeners`).
fn seamless_global(dir: &Path) -> String {
    format!(
        "    stats socket {}/stats.sock mode 600 level admin expose-fd listeners\n",
        dir.display()
    )
}

impl Target for Haproxy {
    fn name(&self) -> &'static str {
        if self.classic {
            "haproxy-classic"
        } else if self.hops == 1 {
            "haproxy"
        } else {
            "haproxy-chain"
        }
    }

    fn description(&self) -> &'static str {
        if self.classic {
            "HAProxy as `haproxy`, reloaded the classic way (-sf, no expose-fd); upgrade only"
        } else if self.hops == 1 {
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

    fn supports(&self, routing: Routing) -> bool {
        match routing {
            Routing::Upgrade { .. } => self.hops == 1,
            Routing::Tcp | Routing::Sni(_) => !self.classic,
            _ => false,
        }
    }

    fn start(
        &self,
        backend: SocketAddr,
        routing: Routing,
        dir: &Path,
        launch: &Launch,
    ) -> Result<RunningTarget> {
        let binary = find_binary("haproxy").context("haproxy not installed")?;
        if let Routing::Upgrade { sni, .. } = routing {
            return self.start_upgradable(&binary, backend, sni, dir, launch);
        }
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

impl Haproxy {
    /// One hop for the upgrade scenario: master-worker with the listeners exposed to the new
    /// worker (`haproxy`), or a plain foreground process reloaded with `-sf`
    /// (`haproxy-classic`).
    fn start_upgradable(
        &self,
        binary: &Path,
        backend: SocketAddr,
        sni: Option<&'static str>,
        dir: &Path,
        launch: &Launch,
    ) -> Result<RunningTarget> {
        let front = free_loopback_addr()?;
        let routing = sni.map_or(Routing::Tcp, Routing::Sni);
        let mut config = render_config(front, backend, routing)?;
        if !self.classic {
            config = config.replacen("global\n", &format!("global\n{}", seamless_global(dir)), 1);
        }
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, config).context("writing haproxy config")?;
        let master_socket = dir.join("master.sock");
        let mut args = vec![
            "-db".to_owned(),
            "-f".to_owned(),
            path.display().to_string(),
        ];
        if !self.classic {
            args.extend([
                "-W".to_owned(),
                "-S".to_owned(),
                master_socket.display().to_string(),
            ]);
        }
        let mut processes = vec![launch.spawn("haproxy", binary, &args, dir)?];
        wait_listening(&[front], &mut processes)?;
        let pid = processes[0].pid();
        let mut running = RunningTarget::new(front, sni.is_some(), processes);
        running.upgrade = Some(if self.classic {
            UpgradeEnds::HaproxyClassic {
                binary: binary.to_owned(),
                config: path,
                pid,
                launch: launch.clone(),
                dir: dir.to_owned(),
            }
        } else {
            UpgradeEnds::HaproxyMaster {
                master_socket,
                master_pid: pid,
            }
        });
        Ok(running)
    }
}

/// The config of one hop from its template.
fn render_config(front: SocketAddr, backend: SocketAddr, routing: Routing) -> Result<String> {
    let (front, backend) = (front.to_string(), backend.to_string());
    match routing {
        Routing::Tcp => render(
            TCP_TEMPLATE,
            &[("front_addr", &front), ("backend_addr", &backend)],
        ),
        Routing::Sni(name) => render(
            SNI_TEMPLATE,
            &[
                ("front_addr", &front),
                ("backend_addr", &backend),
                ("sni_name", name),
            ],
        ),
        Routing::Udp
        | Routing::Mesh { .. }
        | Routing::Abuse { .. }
        | Routing::Leases { .. }
        | Routing::Upgrade { .. }
        | Routing::Failover => {
            anyhow::bail!("haproxy does not forward UDP or QUIC")
        }
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
    let config = render_config(front, backend, routing)?;
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
