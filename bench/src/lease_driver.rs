//! The leases scenario's lease driver: one agent connection (the dev PKI's `agent-1`) that asks
//! the relay for leases with ORP LEASE_REGISTER frames on its control stream and reads the
//! LEASE_GRANTs, without serving them (no reverse sessions: a connection to a granted port is
//! accepted by the kernel and then waits for a session that never comes, which is all the
//! scenario needs to know the port routes). Requests can be pipelined: grants are matched by
//! request id.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use outrelay_proto::frame::{Decoded, Frame, decode};
use outrelay_proto::orp;

use crate::attack::connect_orp;

/// `agent-1.pem`'s identity in the dev PKI (`outrelay dev-pki`'s first agent UUID).
pub const AGENT_1_URI: &str = "outrelay://demo/agent/00000000-0000-4000-8000-000000000001";
/// Lease TTL asked for (the relay cuts it to its cap, 300 s by default): longer than any
/// measurement, so nothing needs renewing.
const TTL_S: u32 = 3_600;
/// Bound on the wait for one answer from the relay.
const ANSWER_TIMEOUT_MS: u64 = 10_000;

/// A granted lease's ports (`None`: not asked for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granted {
    /// The public TCP port.
    pub tcp_port: Option<u16>,
    /// The public UDP port.
    pub udp_port: Option<u16>,
}

/// An agent connection past HELLO that asks for leases.
pub struct LeaseDriver {
    _endpoint: quinn::Endpoint,
    _conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    /// Bytes read from the control stream and not decoded yet.
    buf: Vec<u8>,
    next_request_id: u64,
}

impl LeaseDriver {
    /// Connects to `relay` as `pki/agent-1.pem` from 127.0.0.1.
    ///
    /// # Errors
    /// [`connect_orp`]'s.
    pub async fn connect(relay: SocketAddr, pki: &Path) -> Result<Self> {
        let (endpoint, conn, send, recv) =
            connect_orp(Ipv4Addr::LOCALHOST, relay, pki, "agent-1", AGENT_1_URI).await?;
        Ok(Self {
            _endpoint: endpoint,
            _conn: conn,
            send,
            recv,
            buf: Vec::new(),
            next_request_id: 1,
        })
    }

    /// Sends LEASE_REGISTER for `name` (TCP, and UDP when `udp`); returns its request id.
    ///
    /// # Errors
    /// Encoding or the stream.
    pub async fn request(&mut self, name: &str, udp: bool) -> Result<u64> {
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        let frame = Frame::LeaseRegister(orp::LeaseRegister {
            name: name.to_owned(),
            tcp: true,
            udp,
            ttl_s: TTL_S,
            request_id,
            ..orp::LeaseRegister::default()
        });
        self.send
            .write_all(&frame.to_vec().context("encoding LEASE_REGISTER")?)
            .await
            .context("sending LEASE_REGISTER")?;
        Ok(request_id)
    }

    /// The next answer to a request: its id and the grant, or an error naming the relay's
    /// LEASE_ERROR. PINGs on the way are answered.
    ///
    /// # Errors
    /// A LEASE_ERROR, a frame that is no answer, the stream, or no answer within
    /// [`ANSWER_TIMEOUT_MS`].
    pub async fn answer(&mut self) -> Result<(u64, Granted)> {
        loop {
            let frame =
                tokio::time::timeout(Duration::from_millis(ANSWER_TIMEOUT_MS), self.next_frame())
                    .await
                    .context("no answer from the relay")??;
            match frame {
                Frame::LeaseGrant(g) => return Ok((g.request_id, grant_ports(&g)?)),
                Frame::LeaseError(e) => bail!(
                    "LEASE_ERROR for request {}: {} {}",
                    e.request_id,
                    e.code,
                    e.message
                ),
                Frame::Ping => {
                    let pong = Frame::Pong;
                    self.send
                        .write_all(&pong.to_vec().context("encoding PONG")?)
                        .await
                        .context("sending PONG")?;
                }
                other => bail!("unexpected frame from the relay: {other:?}"),
            }
        }
    }

    /// Asks for every name in `names` with at most `window` requests in flight; returns the
    /// grants in the order of `names`.
    ///
    /// # Errors
    /// The first failing request or answer.
    pub async fn register_all(
        &mut self,
        names: &[String],
        udp: bool,
        window: usize,
    ) -> Result<Vec<Granted>> {
        let mut by_id: HashMap<u64, usize> = HashMap::new();
        let mut grants: Vec<Option<Granted>> = vec![None; names.len()];
        let mut next = 0;
        let mut done = 0;
        while done < names.len() {
            while next < names.len() && by_id.len() < window.max(1) {
                let id = self.request(&names[next], udp).await?;
                by_id.insert(id, next);
                next += 1;
            }
            let (id, granted) = self.answer().await?;
            let Some(i) = by_id.remove(&id) else {
                bail!("a grant for request {id}, which is not in flight");
            };
            grants[i] = Some(granted);
            done += 1;
        }
        Ok(grants.into_iter().flatten().collect())
    }

    async fn next_frame(&mut self) -> Result<Frame> {
        let mut chunk = [0_u8; 16 * 1024];
        loop {
            if let Decoded::Frame { frame, used } = decode(&self.buf).context("relay frame")? {
                let decoded = Frame::decode(&frame).context("relay frame payload")?;
                self.buf.drain(..used);
                return Ok(decoded);
            }
            match self
                .recv
                .read(&mut chunk)
                .await
                .context("reading the control stream")?
            {
                Some(n) => self
                    .buf
                    .extend_from_slice(chunk.get(..n).unwrap_or_default()),
                None => bail!("the relay ended the control stream"),
            }
        }
    }
}

/// The ports of a grant: `tcp_addr` / `udp_addr` are `<host>:<port>` (empty: none).
fn grant_ports(g: &orp::LeaseGrant) -> Result<Granted> {
    let port = |addr: &str| -> Result<Option<u16>> {
        if addr.is_empty() {
            return Ok(None);
        }
        addr.rsplit_once(':')
            .and_then(|(_, p)| p.parse::<u16>().ok())
            .map(Some)
            .with_context(|| format!("grant address {addr:?} has no port"))
    };
    Ok(Granted {
        tcp_port: port(&g.tcp_addr)?,
        udp_port: port(&g.udp_addr)?,
    })
}

/// The scenario's lease names: `l00000`, `l00001`, … (valid host name labels, sorted as
/// numbered).
pub fn lease_name(i: usize) -> String {
    format!("l{i:05}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_addresses_give_their_ports_and_empty_means_none() {
        let g = orp::LeaseGrant {
            tcp_addr: "outrelay.test:10007".to_owned(),
            ..orp::LeaseGrant::default()
        };
        assert_eq!(
            grant_ports(&g).expect("valid"),
            Granted {
                tcp_port: Some(10_007),
                udp_port: None
            }
        );
        let bad = orp::LeaseGrant {
            udp_addr: "outrelay.test".to_owned(),
            ..orp::LeaseGrant::default()
        };
        assert!(grant_ports(&bad).is_err());
        assert_eq!(lease_name(42), "l00042");
    }
}
