//! `rathole`: reverse tunnel, two hops like OutRelay (server = public hop, client = the inside
//! hop that dials out). Both processes count as the relay. No SNI routing: every visitor is
//! forwarded. With [`Routing::Udp`] the service is `type = "udp"` (datagrams carried over the
//! client's TCP data channel).

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, Result};

use super::{
    Availability, Launch, Routing, RunningTarget, Target, free_loopback_addr,
    free_loopback_udp_addr, wait_listening, wait_udp_bound,
};
use crate::peers::find_binary;
use crate::template::render;

const SERVER_TEMPLATE: &str = include_str!("../../templates/rathole-server.toml");
const CLIENT_TEMPLATE: &str = include_str!("../../templates/rathole-client.toml");
const TOKEN: &str = "outrelay-bench";

/// rathole server + client.
pub struct Rathole;

impl Target for Rathole {
    fn name(&self) -> &'static str {
        "rathole"
    }

    fn description(&self) -> &'static str {
        "rathole server + client over TCP (two hops, reverse tunnel); forwards every connection"
    }

    fn availability(&self) -> Availability {
        match find_binary("rathole") {
            Some(_) => Availability::Available,
            None => Availability::NotAvailable("rathole not installed".to_owned()),
        }
    }

    fn supports(&self, routing: Routing) -> bool {
        matches!(routing, Routing::Tcp | Routing::Sni(_) | Routing::Udp)
    }

    fn start(
        &self,
        backend: SocketAddr,
        routing: Routing,
        dir: &Path,
        launch: &Launch,
    ) -> Result<RunningTarget> {
        let binary = find_binary("rathole").context("rathole not installed")?;
        let control = free_loopback_addr()?.to_string();
        let udp = routing == Routing::Udp;
        let (front, service_type) = if udp {
            (free_loopback_udp_addr()?, "udp")
        } else {
            (free_loopback_addr()?, "tcp")
        };
        let (front_text, backend_text) = (front.to_string(), backend.to_string());
        let server = render(
            SERVER_TEMPLATE,
            &[
                ("control_addr", &control),
                ("token", TOKEN),
                ("front_addr", &front_text),
                ("service_type", service_type),
            ],
        )?;
        let client = render(
            CLIENT_TEMPLATE,
            &[
                ("control_addr", &control),
                ("token", TOKEN),
                ("backend_addr", &backend_text),
                ("service_type", service_type),
            ],
        )?;
        let server_path = dir.join("rathole-server.toml");
        let client_path = dir.join("rathole-client.toml");
        std::fs::write(&server_path, server).context("writing rathole server config")?;
        std::fs::write(&client_path, client).context("writing rathole client config")?;
        let mut processes = vec![
            launch.spawn(
                "rathole-server",
                &binary,
                &["-s".to_owned(), server_path.display().to_string()],
                dir,
            )?,
            launch.spawn(
                "rathole-client",
                &binary,
                &["-c".to_owned(), client_path.display().to_string()],
                dir,
            )?,
        ];
        // The server opens the service port only once the client's control channel is up, so
        // a listening (bound, for UDP) front port means the whole tunnel is ready.
        if udp {
            wait_udp_bound(&[front], &mut processes)?;
        } else {
            wait_listening(&[front], &mut processes)?;
        }
        Ok(RunningTarget::new(front, false, processes))
    }
}

#[cfg(test)]
pub fn template_examples() -> Vec<super::TemplateExample> {
    vec![
        (
            "rathole-server.toml",
            SERVER_TEMPLATE,
            vec![
                ("control_addr", "127.0.0.1:1"),
                ("token", "t"),
                ("front_addr", "127.0.0.1:2"),
                ("service_type", "udp"),
            ],
        ),
        (
            "rathole-client.toml",
            CLIENT_TEMPLATE,
            vec![
                ("control_addr", "127.0.0.1:1"),
                ("token", "t"),
                ("backend_addr", "127.0.0.1:3"),
                ("service_type", "tcp"),
            ],
        ),
    ]
}
