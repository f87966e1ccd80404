//! `outrelay`: the relay and the agent, two hops like rathole. A development PKI is written with
//! `outrelay dev-pki`; the relay runs with its default worker count and io backend; the agent
//! dials it over QUIC and keeps reverse sessions to it. With [`Routing::Tcp`] the front is the
//! agent's TCP port lease on the relay (client → relay → reverse session → agent → backend);
//! with [`Routing::Sni`] the front is the relay's public TLS listener and the lease routes the
//! ClientHello's server name to the backend (a TLS server); with [`Routing::Udp`] the front is
//! the agent's UDP lease port (datagrams ride QUIC datagrams between relay and agent). Both
//! processes count as the relay.
//! Build them with `cargo build --release -p outrelay-relay -p outrelay-agent -p outrelay-cli`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{
    Availability, Routing, RunningTarget, Target, free_loopback_addr, wait_listening,
    wait_udp_bound,
};
use crate::process::OwnedProcess;

/// The relay's public root host in the bench PKI.
const ROOT_HOST: &str = "outrelay.test";
/// TCP lease port range (below the kernel's ephemeral range, away from the tests' 20000-30000).
const LEASE_PORTS: (u16, u16) = (31_000, 31_099);
/// How long the relay and the agent get to write their ready files.
const READY_TIMEOUT_MS: u64 = 20_000;

/// OutRelay's relay and agent.
pub struct Outrelay;

fn binary(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/release")
        .join(name)
}

const BINARIES: [&str; 3] = ["outrelay-relay", "outrelay-agent", "outrelay"];

impl Target for Outrelay {
    fn name(&self) -> &'static str {
        "outrelay"
    }

    fn description(&self) -> &'static str {
        "OutRelay relay + agent (two hops over a reverse session, splice on both hops); routes by SNI"
    }

    fn availability(&self) -> Availability {
        match BINARIES.iter().find(|b| !binary(b).exists()) {
            None => Availability::Available,
            Some(missing) => Availability::NotAvailable(format!(
                "{missing} not built: cargo build --release -p outrelay-relay -p outrelay-agent -p outrelay-cli"
            )),
        }
    }

    fn supports_udp(&self) -> bool {
        true
    }

    fn start(&self, backend: SocketAddr, routing: Routing, dir: &Path) -> Result<RunningTarget> {
        let pki = dir.join("pki");
        let out = std::process::Command::new(binary("outrelay"))
            .args(["dev-pki", "--root-host", ROOT_HOST, "--out"])
            .arg(&pki)
            .output()
            .context("running outrelay dev-pki")?;
        if !out.status.success() {
            bail!("dev-pki: {}", String::from_utf8_lossy(&out.stderr));
        }
        let public_tls = free_loopback_addr()?;
        let relay_config = dir.join("relay.toml");
        std::fs::write(
            &relay_config,
            format!(
                "public_url = \"https://{ROOT_HOST}\"\n\
                 [tls]\ncert = \"{p}/relay.pem\"\nkey = \"{p}/relay-key.pem\"\nca = \"{p}/ca.pem\"\n\
                 [listen]\nquic = \"127.0.0.1:0\"\nreverse = \"127.0.0.1:0\"\npublic_tls = \"{public_tls}\"\n\
                 lease_bind_ip = \"127.0.0.1\"\nmetrics = \"\"\nadmin_socket = \"\"\n\
                 [leases]\nmin_port = {lo}\nmax_port = {hi}\ntcp = true\nudp = {udp}\n",
                p = pki.display(),
                lo = LEASE_PORTS.0,
                hi = LEASE_PORTS.1,
                udp = routing == Routing::Udp,
            ),
        )?;
        let relay_ready = dir.join("relay.ready");
        let mut processes = vec![OwnedProcess::spawn(
            "outrelay-relay",
            &binary("outrelay-relay"),
            &[
                "--log".to_owned(),
                "warn".to_owned(),
                "--config".to_owned(),
                relay_config.display().to_string(),
                "--ready-file".to_owned(),
                relay_ready.display().to_string(),
            ],
            dir,
        )?];
        let relay = wait_ready(&relay_ready, &mut processes)?;
        let quic = relay["quic"].as_str().context("relay ready file: quic")?;
        let (lease_line, sni_routed) = match routing {
            Routing::Tcp => (format!("tcp_to = \"{backend}\""), false),
            Routing::Sni(_) => (format!("tls_to = \"{backend}\""), true),
            Routing::Udp => (format!("udp_to = \"{backend}\""), false),
        };
        let name = match routing {
            Routing::Sni(server_name) => server_name
                .strip_suffix(&format!(".{ROOT_HOST}"))
                .with_context(|| format!("SNI {server_name} is not under {ROOT_HOST}"))?,
            Routing::Tcp | Routing::Udp => "bench",
        };
        let agent_config = dir.join("agent.toml");
        std::fs::write(
            &agent_config,
            format!(
                "relays = [\"{quic}\"]\nserver_name = \"localhost\"\n\
                 [identity]\ncert = \"{p}/agent-1.pem\"\nkey = \"{p}/agent-1-key.pem\"\nca = \"{p}/ca.pem\"\n\
                 [metrics]\nlisten = \"\"\n\
                 [[lease]]\nname = \"{name}\"\n{lease_line}\n",
                p = pki.display(),
            ),
        )?;
        let agent_ready = dir.join("agent.ready");
        processes.push(OwnedProcess::spawn(
            "outrelay-agent",
            &binary("outrelay-agent"),
            &[
                "run".to_owned(),
                "--config".to_owned(),
                agent_config.display().to_string(),
                "--ready-file".to_owned(),
                agent_ready.display().to_string(),
            ],
            dir,
        )?);
        let agent = wait_ready(&agent_ready, &mut processes)?;
        let front = match routing {
            Routing::Sni(_) => public_tls,
            // The grant names the relay's public host; the port listens on lease_bind_ip.
            Routing::Tcp => granted_port(&agent, "tcp_addr")?,
            Routing::Udp => granted_port(&agent, "udp_addr")?,
        };
        // The relay binds a granted lease port on its next route sync, just after the grant.
        if routing == Routing::Udp {
            wait_udp_bound(&[front], &mut processes)?;
        } else {
            wait_listening(&[front], &mut processes)?;
        }
        Ok(RunningTarget {
            front,
            sni_routed,
            processes,
        })
    }
}

/// `127.0.0.1:<port>` of the first lease's `key` (`tcp_addr`, `udp_addr`: "<root host>:<port>")
/// in the agent's ready file.
fn granted_port(agent: &serde_json::Value, key: &str) -> Result<SocketAddr> {
    let granted = agent["leases"][0][key]
        .as_str()
        .with_context(|| format!("agent ready file: leases[0].{key}"))?;
    let port = granted
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .with_context(|| format!("agent ready file: {key} {granted}"))?;
    Ok(SocketAddr::from(([127, 0, 0, 1], port)))
}

/// The JSON of a daemon's `--ready-file`, once written.
fn wait_ready(path: &Path, processes: &mut [OwnedProcess]) -> Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_millis(READY_TIMEOUT_MS);
    loop {
        for p in processes.iter_mut() {
            p.ensure_running()?;
        }
        if let Ok(text) = std::fs::read_to_string(path)
            && let Ok(v) = serde_json::from_str(&text)
        {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            let tails: Vec<String> = processes.iter().map(OwnedProcess::log_tail).collect();
            bail!(
                "{} not written after {READY_TIMEOUT_MS} ms; logs:\n{}",
                path.display(),
                tails.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
