//! `nginx`: the `stream` module as an L4 relay; with [`Routing::Sni`], `ssl_preread` routing.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, Result};

use super::{
    Availability, Launch, Routing, RunningTarget, Target, free_loopback_addr, wait_listening,
};
use crate::peers::{NGINX_STREAM_MODULE, find_binary};
use crate::template::render;

const TCP_TEMPLATE: &str = include_str!("../../templates/nginx-tcp.conf");
const SNI_TEMPLATE: &str = include_str!("../../templates/nginx-sni.conf");

/// nginx with the stream module.
pub struct Nginx;

impl Target for Nginx {
    fn name(&self) -> &'static str {
        "nginx"
    }

    fn description(&self) -> &'static str {
        "nginx stream proxy_pass; SNI routing with ssl_preread"
    }

    fn availability(&self) -> Availability {
        if find_binary("nginx").is_none() {
            return Availability::NotAvailable("nginx not installed".to_owned());
        }
        if !stream_built_in() && !Path::new(NGINX_STREAM_MODULE).exists() {
            return Availability::NotAvailable(
                "nginx stream module missing (libnginx-mod-stream)".to_owned(),
            );
        }
        Availability::Available
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
        let binary = find_binary("nginx").context("nginx not installed")?;
        let front = free_loopback_addr()?;
        let load_module = if stream_built_in() {
            String::new()
        } else {
            format!("load_module {NGINX_STREAM_MODULE};")
        };
        let dir_text = dir.display().to_string();
        let (front_text, backend_text) = (front.to_string(), backend.to_string());
        let mut vars = vec![
            ("load_module", load_module.as_str()),
            ("dir", dir_text.as_str()),
            ("front_addr", front_text.as_str()),
            ("backend_addr", backend_text.as_str()),
        ];
        let template = match routing {
            Routing::Tcp => TCP_TEMPLATE,
            Routing::Udp
            | Routing::Mesh { .. }
            | Routing::Abuse { .. }
            | Routing::Leases { .. }
            | Routing::Upgrade { .. }
            | Routing::Failover => {
                anyhow::bail!("the nginx target has no UDP or QUIC template")
            }
            Routing::Sni(name) => {
                vars.push(("sni_name", name));
                SNI_TEMPLATE
            }
        };
        let path = dir.join("nginx.conf");
        std::fs::write(&path, render(template, &vars)?).context("writing nginx config")?;
        // -e: the error log before the config is read (default is /var/log/nginx, not ours).
        let args = [
            "-e",
            &format!("{dir_text}/nginx-startup.log"),
            "-p",
            &dir_text,
            "-c",
            &path.display().to_string(),
        ]
        .map(str::to_owned);
        let mut processes = vec![launch.spawn("nginx", &binary, &args, dir)?];
        wait_listening(&[front], &mut processes)?;
        Ok(RunningTarget::new(
            front,
            matches!(routing, Routing::Sni(_)),
            processes,
        ))
    }
}

/// Whether this nginx has the stream module compiled in (then `load_module` must not appear).
fn stream_built_in() -> bool {
    let Some(binary) = find_binary("nginx") else {
        return false;
    };
    std::process::Command::new(binary)
        .arg("-V")
        .output()
        .map(|out| {
            let text = String::from_utf8_lossy(&out.stderr);
            text.split_whitespace().any(|flag| flag == "--with-stream")
        })
        .unwrap_or(false)
}

#[cfg(test)]
pub fn template_examples() -> Vec<super::TemplateExample> {
    let tcp = vec![
        ("load_module", ""),
        ("dir", "/tmp/x"),
        ("front_addr", "127.0.0.1:1"),
        ("backend_addr", "127.0.0.1:2"),
    ];
    let mut sni = tcp.clone();
    sni.push(("sni_name", "demo.outrelay.test"));
    vec![
        ("nginx-tcp.conf", TCP_TEMPLATE, tcp),
        ("nginx-sni.conf", SNI_TEMPLATE, sni),
    ]
}
