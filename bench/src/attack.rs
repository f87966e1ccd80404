//! Attack load generators for the `abuse` scenario, one per finding of the 2026-12 security
//! review (H1 stalled readers, H2 root-host and slowloris floods, H3 oversized first frames,
//! M13/H4 audit flood, H5 anonymous controller flood). Loopback only. Every generator is bounded
//! in count (its size argument) and in time (it runs until `stop` is set, and every wait in it
//! has a timeout), and returns how many units it mounted (connections, streams, bytes) so the
//! report shows what the relay was up against.
//!
//! The QUIC attackers are an agent with a real certificate from the dev PKI (`agent-2`): mTLS,
//! ALPN `orp/1`, HELLO on the control stream, then ORP frames encoded with `outrelay-proto`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use outrelay_proto::frame::{
    Decoded, FRAME_HEADER_BYTES, Frame, FrameType, MAX_FRAME_PAYLOAD_BYTES, ORP_ALPN, decode,
    encode_raw,
};
use outrelay_proto::orp;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;

/// A flag the measurement sets when the attack must end.
pub type Stop = Arc<AtomicBool>;

/// Every attacker connects from this loopback address, the legitimate clients from 127.0.0.1:
/// per-source budgets (issue 15) must be able to tell the attacker from everyone else, as
/// they would on the internet. (All of 127.0.0.0/8 is loopback on Linux.)
pub const ATTACKER_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// SO_RCVBUF of a stalled reader (the review's recipe: small, so the relay's side fills fast).
const STALLED_RCVBUF_BYTES: u32 = 4096;
/// How often an idle attacker checks `stop`.
const POLL_MS: u64 = 50;
/// Bound on any single network wait of an attacker (connect, handshake, answer).
const STEP_TIMEOUT_MS: u64 = 5_000;
/// Bytes per write of the oversized-frame attacker.
const JUNK_CHUNK_BYTES: usize = 64 * 1024;
/// Streams the audit flood keeps in flight.
pub const AUDIT_IN_FLIGHT: usize = 32;
/// Anonymous connections the controller flood holds open and idle (next to its churners).
pub const CONTROLLER_IDLE_HELD: usize = 256;
/// Loops of connect, one junk byte (a failed TLS handshake), close.
pub const CONTROLLER_CHURNERS: usize = 32;

// Rates. Attacker, relay and legitimate client share the same cores here, so an unpaced loop
// measures the box more than the relay; each rate is well above what the review says is
// enough for its attack (root host: 10,000 slots / 30 s = 333/s; slowloris 2,000/s for the
// full-size cap; our cap is a tenth of it).

/// New connections per second of all slots of [`hold_connections`] together, at most.
pub const HOLD_CONNECTS_PER_S: u64 = 1_000;
/// Denied OPEN_STREAMs per second of the audit flood, at most.
pub const AUDIT_OPENS_PER_S: u64 = 5_000;
/// Anonymous connections per second of the controller flood's churners, at most.
pub const CONTROLLER_CONNECTS_PER_S: u64 = 2_000;

fn stopped(stop: &AtomicBool) -> bool {
    stop.load(Ordering::Relaxed)
}

/// A TCP socket bound to [`ATTACKER_SOURCE`] (any port).
fn attacker_socket() -> Result<TcpSocket> {
    let socket = TcpSocket::new_v4().context("socket")?;
    socket
        .bind(SocketAddr::from((ATTACKER_SOURCE, 0)))
        .context("binding the attacker's source address")?;
    Ok(socket)
}

/// Connects to `to` from [`ATTACKER_SOURCE`].
async fn connect_as_attacker(to: SocketAddr) -> Result<TcpStream> {
    Ok(attacker_socket()?.connect(to).await?)
}

/// Sleeps `d`, or less when `stop` is set meanwhile.
async fn pause(d: Duration, stop: &AtomicBool) {
    let end = tokio::time::Instant::now() + d;
    while !stopped(stop) && tokio::time::Instant::now() < end {
        let left = end - tokio::time::Instant::now();
        tokio::time::sleep(left.min(Duration::from_millis(POLL_MS))).await;
    }
}

/// A ticker that lets each of `tasks` loops go `per_s / tasks` times a second.
fn pacer(per_s: u64, tasks: usize) -> tokio::time::Interval {
    let period =
        Duration::from_nanos(1_000_000_000_u64.saturating_mul(tasks as u64) / per_s.max(1));
    let mut tick = tokio::time::interval(period.max(Duration::from_micros(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

async fn until_stopped(stop: &AtomicBool) {
    while !stopped(stop) {
        tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
    }
}

/// H1: `count` clients of the TCP lease at `front` (its backend writes a large body), each
/// with a small SO_RCVBUF, that never read. Held until `stop`; returns the connections made.
pub async fn stalled_readers(front: SocketAddr, count: usize, stop: Stop) -> Result<u64> {
    let mut held = Vec::with_capacity(count);
    for _ in 0..count {
        if stopped(&stop) {
            break;
        }
        let socket = attacker_socket()?;
        // Before connect: the window the kernel advertises is fixed by then.
        socket
            .set_recv_buffer_size(STALLED_RCVBUF_BYTES)
            .context("SO_RCVBUF")?;
        let step = Duration::from_millis(STEP_TIMEOUT_MS);
        // A refused or slow connect is the relay defending itself: count what got in.
        if let Ok(Ok(stream)) = tokio::time::timeout(step, socket.connect(front)).await {
            held.push(stream);
        }
    }
    let made = held.len() as u64;
    until_stopped(&stop).await;
    for stream in held {
        // RST: the relay sees the pair end at once instead of a FIN it would wait on.
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    }
    Ok(made)
}

/// H2 (root host, slowloris): `slots` connections to `front` from one source, each sending
/// `first` (a ClientHello naming the root host, or nothing) and then silent. A slot whose
/// connection the relay closes (or refuses) connects again after `slots` ms, so that all slots
/// together open at most [`HOLD_CONNECTS_PER_S`], until `stop`. Slots start spread over `ramp`.
/// Returns the connections opened.
pub async fn hold_connections(
    front: SocketAddr,
    slots: usize,
    first: Arc<[u8]>,
    ramp: Duration,
    stop: Stop,
) -> Result<u64> {
    let opened = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    let spacing = ramp / u32::try_from(slots.max(1)).unwrap_or(u32::MAX);
    let again = Duration::from_millis((slots as u64).saturating_mul(1_000) / HOLD_CONNECTS_PER_S)
        .max(Duration::from_millis(1));
    for i in 0..slots {
        let (first, stop, opened) = (Arc::clone(&first), Arc::clone(&stop), Arc::clone(&opened));
        let delay = spacing * u32::try_from(i).unwrap_or(u32::MAX);
        tasks.spawn(async move {
            tokio::time::sleep(delay).await;
            let mut first_try = true;
            while !stopped(&stop) {
                if !first_try {
                    pause(again, &stop).await;
                }
                first_try = false;
                let step = Duration::from_millis(STEP_TIMEOUT_MS);
                let Ok(Ok(mut stream)) =
                    tokio::time::timeout(step, connect_as_attacker(front)).await
                else {
                    continue;
                };
                opened.fetch_add(1, Ordering::Relaxed);
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                if !first.is_empty() && stream.write_all(&first).await.is_err() {
                    continue;
                }
                // Silent from here on; reading only notices when the relay gives up on us.
                let mut sink = [0_u8; 4096];
                loop {
                    tokio::select! {
                        r = stream.read(&mut sink) => match r {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {}
                        },
                        () = until_stopped(&stop) => break,
                    }
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok(opened.load(Ordering::Relaxed))
}

/// H5: anonymous peers of the controller's gRPC port: [`CONTROLLER_CHURNERS`] loops of
/// connect, one junk byte (a failed TLS handshake, which the controller audits), close, at
/// most [`CONTROLLER_CONNECTS_PER_S`] together; and
/// [`CONTROLLER_IDLE_HELD`] connections held open without a byte. Returns the connections made.
pub async fn controller_flood(grpc: SocketAddr, stop: Stop) -> Result<u64> {
    let made = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    {
        let (stop, made) = (Arc::clone(&stop), Arc::clone(&made));
        tasks.spawn(async move {
            let mut held = Vec::with_capacity(CONTROLLER_IDLE_HELD);
            for _ in 0..CONTROLLER_IDLE_HELD {
                if stopped(&stop) {
                    break;
                }
                let step = Duration::from_millis(STEP_TIMEOUT_MS);
                if let Ok(Ok(s)) = tokio::time::timeout(step, connect_as_attacker(grpc)).await {
                    made.fetch_add(1, Ordering::Relaxed);
                    held.push(s);
                }
            }
            until_stopped(&stop).await;
            drop(held);
        });
    }
    for _ in 0..CONTROLLER_CHURNERS {
        let (stop, made) = (Arc::clone(&stop), Arc::clone(&made));
        tasks.spawn(async move {
            let step = Duration::from_millis(STEP_TIMEOUT_MS);
            let mut tick = pacer(CONTROLLER_CONNECTS_PER_S, CONTROLLER_CHURNERS);
            while !stopped(&stop) {
                tick.tick().await;
                let Ok(Ok(mut s)) = tokio::time::timeout(step, connect_as_attacker(grpc)).await
                else {
                    continue;
                };
                made.fetch_add(1, Ordering::Relaxed);
                let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                if s.write_all(b"x").await.is_err() {
                    continue;
                }
                // Wait for the controller to give up on the handshake (bounded).
                let mut sink = [0_u8; 1024];
                let _ = tokio::time::timeout(step, async {
                    while let Ok(n) = s.read(&mut sink).await {
                        if n == 0 {
                            break;
                        }
                    }
                })
                .await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok(made.load(Ordering::Relaxed))
}

/// An agent on the relay's QUIC port with a dev-PKI certificate, past HELLO.
pub struct QuicAgent {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    // The control stream stays open for the connection's life (its end ends the connection).
    _control: (quinn::SendStream, quinn::RecvStream),
}

impl QuicAgent {
    /// Connects to `relay` as the agent whose certificate is `pki/<who>.pem` (identity `uri`),
    /// opens the control stream and says HELLO with the `streams` capability.
    ///
    /// # Errors
    /// Certificates, the handshake, or a HELLO that is not acknowledged.
    pub async fn connect(relay: SocketAddr, pki: &Path, who: &str, uri: &str) -> Result<Self> {
        let (endpoint, conn, send, recv) =
            connect_orp(ATTACKER_SOURCE, relay, pki, who, uri).await?;
        Ok(Self {
            _endpoint: endpoint,
            conn,
            _control: (send, recv),
        })
    }

    /// Closes the connection (every stream with it).
    pub fn close(&self) {
        self.conn.close(0_u32.into(), b"bench attack over");
    }
}

/// A QUIC connection from `source` to `relay` as the dev-PKI agent `pki/<who>.pem` (identity
/// `uri`): mTLS, ALPN `orp/1`, the control stream opened and HELLO (`streams` capability)
/// acknowledged. Returns the endpoint (keep it alive), the connection and the control stream.
///
/// # Errors
/// Certificates, the handshake, or a HELLO that is not acknowledged.
pub async fn connect_orp(
    source: Ipv4Addr,
    relay: SocketAddr,
    pki: &Path,
    who: &str,
    uri: &str,
) -> Result<(
    quinn::Endpoint,
    quinn::Connection,
    quinn::SendStream,
    quinn::RecvStream,
)> {
    let chain = CertificateDer::pem_file_iter(pki.join(format!("{who}.pem")))
        .context("agent certificate")?
        .collect::<Result<Vec<_>, _>>()
        .context("agent certificate")?;
    let key =
        PrivateKeyDer::from_pem_file(pki.join(format!("{who}-key.pem"))).context("agent key")?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(pki.join("ca.pem")).context("CA")? {
        roots.add(ca.context("CA")?).context("CA root")?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3")?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .context("client certificate")?;
    tls.alpn_protocols = vec![ORP_ALPN.as_bytes().to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).context("QUIC TLS")?;
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(1)));
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(transport));
    let mut endpoint =
        quinn::Endpoint::client(SocketAddr::from((source, 0))).context("endpoint")?;
    endpoint.set_default_client_config(client);
    let step = Duration::from_millis(STEP_TIMEOUT_MS);
    let conn = tokio::time::timeout(
        step,
        endpoint
            .connect(relay, "localhost")
            .context("QUIC connect")?,
    )
    .await
    .context("QUIC handshake timed out")?
    .context("QUIC handshake")?;
    let (mut send, mut recv) = conn.open_bi().await.context("control stream")?;
    let hello = Frame::Hello(orp::Hello {
        protocol_version: "orp/1".to_owned(),
        agent_uri: uri.to_owned(),
        capabilities: vec!["streams".to_owned()],
    });
    send.write_all(&hello.to_vec().context("encoding HELLO")?)
        .await
        .context("sending HELLO")?;
    let ack = tokio::time::timeout(step, read_frame(&mut recv))
        .await
        .context("HELLO_ACK timed out")??;
    if !matches!(ack, Frame::HelloAck(_)) {
        bail!("HELLO answered with {ack:?}");
    }
    Ok((endpoint, conn, send, recv))
}

/// Reads one whole frame from the start of `recv`.
async fn read_frame(recv: &mut quinn::RecvStream) -> Result<Frame> {
    let mut buf = Vec::new();
    let mut chunk = [0_u8; 4096];
    loop {
        if let Decoded::Frame { frame, .. } = decode(&buf).context("relay frame")? {
            return Frame::decode(&frame).context("relay frame payload");
        }
        match recv.read(&mut chunk).await.context("reading a frame")? {
            Some(n) => buf.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            None => bail!("stream ended before a whole frame"),
        }
    }
}

/// H3: `streams` streams on `agent`'s connection, each starting with an OPEN_STREAM header
/// that claims [`MAX_FRAME_PAYLOAD_BYTES`] and then `bytes_per_stream` junk bytes of that
/// payload (never the whole frame, so nothing can be decoded: the relay can only buffer or
/// refuse). Streams stay open until `stop`. Returns the bytes the relay accepted.
pub async fn oversized_first_frames(
    agent: &QuicAgent,
    streams: usize,
    bytes_per_stream: usize,
    stop: Stop,
) -> Result<u64> {
    let mut header = Vec::with_capacity(FRAME_HEADER_BYTES);
    encode_raw(FrameType::OpenStream, 0, &[], &mut header).context("header")?;
    // The length field is the last four header bytes: claim the largest payload ORP allows.
    header.truncate(FRAME_HEADER_BYTES - 4);
    header.extend_from_slice(&MAX_FRAME_PAYLOAD_BYTES.to_be_bytes());
    let header: Arc<[u8]> = header.into();
    let sent = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..streams {
        let Ok((mut send, recv)) = agent.conn.open_bi().await else {
            break;
        };
        let (header, sent, stop) = (Arc::clone(&header), Arc::clone(&sent), Arc::clone(&stop));
        tasks.spawn(async move {
            let junk = vec![0x61_u8; JUNK_CHUNK_BYTES];
            let step = Duration::from_millis(STEP_TIMEOUT_MS);
            if send.write_all(&header).await.is_err() {
                return;
            }
            let mut left = bytes_per_stream;
            while left > 0 && !stopped(&stop) {
                let n = left.min(JUNK_CHUNK_BYTES);
                match tokio::time::timeout(step, send.write_all(&junk[..n])).await {
                    Ok(Ok(())) => {
                        sent.fetch_add(n as u64, Ordering::Relaxed);
                        left -= n;
                    }
                    // Refused (reset, stopped) or not read (flow control held): done here.
                    Ok(Err(_)) | Err(_) => break,
                }
            }
            until_stopped(&stop).await;
            drop(recv);
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok(sent.load(Ordering::Relaxed))
}

/// M13/H4: OPEN_STREAMs that the closed-world policy denies (no rule names the service), each
/// one an audited decision, [`AUDIT_IN_FLIGHT`] at a time and at most [`AUDIT_OPENS_PER_S`],
/// at most `max_opens` in all, until `stop`.
/// Returns the streams answered (rejected or otherwise).
pub async fn audit_flood(agent: &QuicAgent, max_opens: u64, stop: Stop) -> Result<u64> {
    let answered = Arc::new(AtomicU64::new(0));
    let issued = Arc::new(AtomicU64::new(0));
    // Stream ids are chosen by the consumer; start from a per-run random-ish base so repeated
    // rounds against one relay never collide.
    let base = u64::from(std::process::id()) << 32
        | u64::from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos()),
        );
    let mut tasks = JoinSet::new();
    for _ in 0..AUDIT_IN_FLIGHT {
        let conn = agent.conn.clone();
        let (answered, issued, stop) = (
            Arc::clone(&answered),
            Arc::clone(&issued),
            Arc::clone(&stop),
        );
        tasks.spawn(async move {
            let step = Duration::from_millis(STEP_TIMEOUT_MS);
            let mut tick = pacer(AUDIT_OPENS_PER_S, AUDIT_IN_FLIGHT);
            while !stopped(&stop) {
                tick.tick().await;
                let n = issued.fetch_add(1, Ordering::Relaxed);
                if n >= max_opens {
                    break;
                }
                let open = Frame::OpenStream(orp::OpenStream {
                    target_service: "bench-audit-flood".to_owned(),
                    method: "flood".to_owned(),
                    stream_id: base.wrapping_add(n),
                });
                let Ok(bytes) = open.to_vec() else { break };
                let attempt = async {
                    let (mut send, mut recv) = conn.open_bi().await.ok()?;
                    send.write_all(&bytes).await.ok()?;
                    read_frame(&mut recv).await.ok()
                };
                match tokio::time::timeout(step, attempt).await {
                    Ok(Some(_)) => {
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    // The connection went away (closed by the relay): nothing more to send.
                    Ok(None) if conn.close_reason().is_some() => break,
                    Ok(None) | Err(_) => {}
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok(answered.load(Ordering::Relaxed))
}

/// A real TLS 1.3 ClientHello naming `server_name` (rustls, key share included), so a TLS
/// server that gets it answers and then waits for the client's Finished.
///
/// # Errors
/// An invalid name.
pub fn rustls_client_hello(server_name: &str) -> Result<Vec<u8>> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3")?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = ServerName::try_from(server_name.to_owned()).context("server name")?;
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).context("rustls")?;
    let mut hello = Vec::new();
    conn.write_tls(&mut hello)
        .context("writing the ClientHello")?;
    Ok(hello)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_host_hello_names_the_root_host() {
        let hello = rustls_client_hello("outrelay.test").expect("hello");
        assert_eq!(hello[0], 0x16, "a handshake record");
        let needle = b"outrelay.test";
        assert!(hello.windows(needle.len()).any(|w| w == needle));
    }

    #[test]
    fn the_oversized_header_claims_the_largest_payload() {
        let mut header = Vec::new();
        encode_raw(FrameType::OpenStream, 0, &[], &mut header).expect("header");
        header.truncate(FRAME_HEADER_BYTES - 4);
        header.extend_from_slice(&MAX_FRAME_PAYLOAD_BYTES.to_be_bytes());
        let bytes: [u8; FRAME_HEADER_BYTES] = header.try_into().expect("8 bytes");
        let h = outrelay_proto::frame::decode_header(&bytes).expect("a valid header");
        assert_eq!(h.payload_len, MAX_FRAME_PAYLOAD_BYTES);
        assert_eq!(h.type_code, FrameType::OpenStream.code());
    }
}
