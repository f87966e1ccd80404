//! TCP/443 fallback (issue 22): when QUIC cannot reach a relay (UDP blocked), the agent's QUIC
//! connection runs inside one mutual-TLS TCP connection to the relay's public TLS port (SNI =
//! the relay's root host, ALPN `orp/1`): ORP over QUIC over TLS/TCP. quinn sees an
//! [`AsyncUdpSocket`] whose datagrams are frames `[u16 length][QUIC packet]` on the TLS stream,
//! so leases, reverse sessions, services, resume and UDP datagrams work unchanged.
//!
//! [`dial`] is one connection attempt: QUIC first (`[fallback] mode = "auto"`), the tunnel when
//! QUIC does not connect within `quic_timeout`. The tunnel tries the relay's TCP addresses in
//! order ([`tcp_addrs`]: its public TLS port, then its reverse-session port, which also
//! accepts tunnels) and keeps the first that completes TLS; while on it, the connection's
//! reverse sessions dial that same address (the relay tells them apart by their first byte),
//! so a network that allows one TCP port to the relay is enough for every path. While on the tunnel, [`quic_returns`] retries
//! QUIC in the background (backoff) and completes when it connects, so the control loop moves
//! back through its reconnect/resume path.
//!
//! The tunnel's send queue is bounded in bytes: a packet that does not fit is DROPPED and
//! counted, so QUIC's congestion control sees loss and backs off instead of filling the TCP
//! buffer (QUIC over TCP: two encryptions and two congestion controllers; see ARCHITECTURE.md).

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::config::{FallbackConfig, FallbackMode};
use crate::control::RelayCtx;
use crate::stats::Transport;

pub use outrelay_proto::tunnel::{FRAME_HEADER_BYTES, frame_header};
/// The relay's public TLS port, where an unlisted relay's fallback goes.
pub const DEFAULT_TLS_PORT: u16 = 443;
/// Packets received from the tunnel waiting for the endpoint (backpressure on the TCP read).
const INBOUND_PACKETS_MAX: usize = 1024;
/// Most bytes the writer gathers into one TLS write.
const WRITE_BATCH_BYTES: usize = 64 * 1024;

/// Fallback counters (`outrelay_agent_fallback_*`).
#[derive(Debug, Default)]
pub struct FallbackStats {
    /// Tunnels whose TLS handshake completed.
    pub tunnels_opened: AtomicU64,
    /// Tunnel attempts that failed (TCP connect, TLS, timeout).
    pub tunnels_failed: AtomicU64,
    /// Times a background QUIC attempt succeeded and the agent moved back to QUIC.
    pub quic_returns: AtomicU64,
    /// QUIC packets dropped: the tunnel's send queue was full.
    pub queue_drops: AtomicU64,
    /// QUIC packets sent into tunnels.
    pub packets_out: AtomicU64,
    /// QUIC packets received from tunnels.
    pub packets_in: AtomicU64,
}

/// Why a connection attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The QUIC endpoint could not be created.
    #[error("QUIC endpoint: {0}")]
    Endpoint(io::Error),
    /// The QUIC handshake or the control stream failed.
    #[error("connect: {0}")]
    Connect(String),
    /// The TCP fallback could not be set up.
    #[error("TCP fallback {addr}: {reason}")]
    Tunnel {
        /// The TCP address dialled.
        addr: String,
        /// Why.
        reason: String,
    },
}

/// A connection with its control stream opened.
pub(crate) struct Dialled {
    pub(crate) endpoint: quinn::Endpoint,
    pub(crate) conn: quinn::Connection,
    pub(crate) send: quinn::SendStream,
    pub(crate) recv: quinn::RecvStream,
    pub(crate) transport: Transport,
    /// The tunnel's TCP connection (TLS pumps): closed when this is dropped.
    pub(crate) tunnel: Option<Tunnel>,
    /// The relay TCP address the tunnel reached (`None` on QUIC).
    pub(crate) tunnel_addr: Option<SocketAddr>,
}

/// The tunnel's pump task; dropping it closes the TCP connection.
#[derive(Debug)]
pub(crate) struct Tunnel(tokio::task::JoinHandle<()>);

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The TCP addresses of relay `relay`'s fallback, in the order they are tried: `addrs[relay]`
/// (one address or a list), else its host with port 443 (the public TLS port), then with
/// port 7443 (the reverse-session port).
pub fn tcp_addrs(relay: &str, cfg: &FallbackConfig) -> Vec<String> {
    if let Some(a) = cfg.addrs.get(relay) {
        return a.clone();
    }
    let host = host_of(relay);
    vec![
        format!("{host}:{DEFAULT_TLS_PORT}"),
        format!("{host}:{}", crate::control::DEFAULT_REVERSE_PORT),
    ]
}

/// The longest the fallback may take to reach the point where the tunnel's QUIC handshake
/// starts, beyond what QUIC alone takes: `quic_timeout` (auto: QUIC is tried first) plus
/// `connect_timeout` for each TCP address; nothing with `mode = "off"`. The agent adds it to
/// `hello_timeout`, so the last address gets its full time.
pub fn setup_budget(relay: &str, cfg: &FallbackConfig) -> std::time::Duration {
    let tcp = cfg.connect_timeout * u32::try_from(tcp_addrs(relay, cfg).len()).unwrap_or(u32::MAX);
    match cfg.mode {
        FallbackMode::Off => std::time::Duration::ZERO,
        FallbackMode::Only => tcp,
        FallbackMode::Auto => cfg.quic_timeout + tcp,
    }
}

/// The tunnel's SNI: `[fallback] server_name`, else the relay address's host when it is a
/// name, else `default` (the top-level `server_name`).
pub fn sni(relay: &str, cfg: &FallbackConfig, default: &str) -> String {
    if let Some(s) = &cfg.server_name {
        return s.clone();
    }
    let host = host_of(relay).trim_start_matches('[').trim_end_matches(']');
    if host.parse::<std::net::IpAddr>().is_ok() {
        default.to_owned()
    } else {
        host.to_owned()
    }
}

fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(h, _)| h)
}

/// One connection attempt to relay `addr` (resolved to `remote` for QUIC), per
/// `[fallback] mode`.
///
/// # Errors
/// [`DialError`]: of the tunnel when QUIC failed first (auto), else of QUIC.
pub(crate) async fn dial(
    addr: &str,
    remote: SocketAddr,
    ctx: &RelayCtx,
) -> Result<Dialled, DialError> {
    let cfg = &ctx.settings.fallback;
    match cfg.mode {
        FallbackMode::Off => quic(remote, ctx).await,
        FallbackMode::Only => tunnel(addr, ctx).await,
        FallbackMode::Auto => {
            let error = match tokio::time::timeout(cfg.quic_timeout, quic(remote, ctx)).await {
                Ok(Ok(d)) => return Ok(d),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no QUIC handshake within {:?}", cfg.quic_timeout),
            };
            tracing::warn!(relay = %addr, %error, tcp = ?tcp_addrs(addr, cfg), "QUIC cannot connect: trying the TCP fallback");
            tunnel(addr, ctx).await
        }
    }
}

/// Completes when a QUIC handshake to `remote` succeeds (tried with backoff), while the
/// connection is on the tunnel in auto mode; never otherwise.
pub(crate) async fn quic_returns(transport: Transport, remote: SocketAddr, ctx: &RelayCtx) {
    let cfg = &ctx.settings.fallback;
    if transport != Transport::TlsTcp || cfg.mode != FallbackMode::Auto {
        return std::future::pending().await;
    }
    let mut delay = cfg.quic_retry_initial;
    loop {
        tokio::time::sleep(delay).await;
        if let Ok(Ok(d)) = tokio::time::timeout(cfg.quic_timeout, quic(remote, ctx)).await {
            d.conn.close(0u32.into(), b"probe");
            ctx.stats
                .fallback
                .quic_returns
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        delay = (delay * 2).min(cfg.quic_retry_max);
    }
}

async fn quic(remote: SocketAddr, ctx: &RelayCtx) -> Result<Dialled, DialError> {
    let bind: SocketAddr = if remote.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let endpoint = crate::control::client_endpoint(bind).map_err(DialError::Endpoint)?;
    handshake(endpoint, remote, ctx, Transport::Quic).await
}

async fn handshake(
    endpoint: quinn::Endpoint,
    remote: SocketAddr,
    ctx: &RelayCtx,
    transport: Transport,
) -> Result<Dialled, DialError> {
    let conn = endpoint
        .connect_with(ctx.client.clone(), remote, &ctx.settings.server_name)
        .map_err(|e| DialError::Connect(e.to_string()))?
        .await
        .map_err(|e| DialError::Connect(e.to_string()))?;
    let (send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| DialError::Connect(format!("control stream: {e}")))?;
    Ok(Dialled {
        endpoint,
        conn,
        send,
        recv,
        transport,
        tunnel: None,
        tunnel_addr: None,
    })
}

/// TCP, TLS (SNI = root host, ALPN `orp/1`, the agent's certificate) to the first of the
/// relay's fallback addresses that answers (each within `connect_timeout`), then QUIC inside.
async fn tunnel(addr: &str, ctx: &RelayCtx) -> Result<Dialled, DialError> {
    let cfg = &ctx.settings.fallback;
    let targets = tcp_addrs(addr, cfg);
    let fail_at = |target: &str, reason: String| {
        ctx.stats
            .fallback
            .tunnels_failed
            .fetch_add(1, Ordering::Relaxed);
        DialError::Tunnel {
            addr: target.to_owned(),
            reason,
        }
    };
    let name = rustls::pki_types::ServerName::try_from(sni(addr, cfg, &ctx.settings.server_name))
        .map_err(|e| fail_at(&targets.join(","), format!("server name: {e}")))?;
    let connector = tokio_rustls::TlsConnector::from(ctx.fallback_tls.clone());
    let mut errors = Vec::with_capacity(targets.len());
    let mut opened = None;
    for target in &targets {
        let attempt = tokio::time::timeout(cfg.connect_timeout, async {
            let tcp = TcpStream::connect(target.as_str())
                .await
                .map_err(|e| format!("tcp: {e}"))?;
            let _ = tcp.set_nodelay(true);
            let local = tcp.local_addr().map_err(|e| e.to_string())?;
            let peer = tcp.peer_addr().map_err(|e| e.to_string())?;
            let tls = connector
                .connect(name.clone(), tcp)
                .await
                .map_err(|e| format!("tls: {e}"))?;
            Ok::<_, String>((tls, local, peer))
        })
        .await;
        let error = match attempt {
            Ok(Ok(t)) => {
                opened = Some(t);
                break;
            }
            Ok(Err(e)) => e,
            Err(_) => format!("no TLS within {:?}", cfg.connect_timeout),
        };
        tracing::debug!(relay = %addr, tcp = %target, %error, "TCP fallback address failed");
        ctx.stats
            .fallback
            .tunnels_failed
            .fetch_add(1, Ordering::Relaxed);
        errors.push(format!("{target}: {error}"));
    }
    let Some((tls, local, peer)) = opened else {
        return Err(DialError::Tunnel {
            addr: targets.join(","),
            reason: errors.join("; "),
        });
    };
    let target = peer.to_string();
    let fail = |reason: String| fail_at(&target, reason);
    ctx.stats
        .fallback
        .tunnels_opened
        .fetch_add(1, Ordering::Relaxed);
    let stats = ctx.stats.fallback.clone();
    let (socket, out_rx, in_tx) = TunnelSocket::new(local, peer, cfg.queue_bytes, stats.clone());
    let queued = socket.queued_bytes.clone();
    let (rd, wr) = tokio::io::split(tls);
    // Ends with the stream; dropping `in_tx` then makes the endpoint's receive fail, which
    // closes the connection at once.
    let pumps = Tunnel(tokio::spawn(async move {
        tokio::select! {
            () = pump_in(rd, &in_tx, &stats) => {}
            () = pump_out(wr, out_rx, &queued) => {}
        }
    }));
    let runtime = quinn::default_runtime()
        .ok_or_else(|| fail("no async runtime for the QUIC endpoint".to_owned()))?;
    let endpoint = quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        None,
        Arc::new(socket),
        runtime,
    )
    .map_err(|e| fail(e.to_string()))?;
    tracing::info!(relay = %addr, tcp = %peer, "TCP fallback tunnel open");
    let mut dialled = handshake(endpoint, peer, ctx, Transport::TlsTcp).await?;
    dialled.tunnel = Some(pumps);
    dialled.tunnel_addr = Some(peer);
    Ok(dialled)
}

/// quinn's socket on a tunnel: every datagram goes to the one relay, as a frame.
#[derive(Debug)]
pub struct TunnelSocket {
    local: SocketAddr,
    peer: SocketAddr,
    out: mpsc::Sender<Bytes>,
    queued_bytes: Arc<AtomicUsize>,
    queue_bytes_max: usize,
    /// Only the endpoint's driver polls it (uncontended).
    inbound: Mutex<mpsc::Receiver<Bytes>>,
    stats: Arc<FallbackStats>,
}

impl TunnelSocket {
    /// A socket for a tunnel from `local` to `peer` (the TCP addresses) with a send queue of
    /// `queue_bytes`; the receiver the writer drains and the sender the reader fills.
    pub fn new(
        local: SocketAddr,
        peer: SocketAddr,
        queue_bytes: usize,
        stats: Arc<FallbackStats>,
    ) -> (TunnelSocket, mpsc::Receiver<Bytes>, mpsc::Sender<Bytes>) {
        let (out, out_rx) = mpsc::channel((queue_bytes / 64).max(16));
        let (in_tx, inbound) = mpsc::channel(INBOUND_PACKETS_MAX);
        (
            TunnelSocket {
                local,
                peer,
                out,
                queued_bytes: Arc::new(AtomicUsize::new(0)),
                queue_bytes_max: queue_bytes,
                inbound: Mutex::new(inbound),
                stats,
            },
            out_rx,
            in_tx,
        )
    }
}

/// A poller that is always ready: a full tunnel queue drops instead of waiting.
#[derive(Debug)]
struct Ready;

impl UdpPoller for Ready {
    fn poll_writable(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncUdpSocket for TunnelSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Ready)
    }

    fn try_send(&self, t: &Transmit<'_>) -> io::Result<()> {
        let segment = t.segment_size.unwrap_or(t.contents.len()).max(1);
        for packet in t.contents.chunks(segment) {
            let queued = self.queued_bytes.load(Ordering::Relaxed);
            if queued + packet.len() > self.queue_bytes_max {
                self.stats.queue_drops.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            self.queued_bytes.fetch_add(packet.len(), Ordering::Relaxed);
            if self.out.try_send(Bytes::copy_from_slice(packet)).is_err() {
                self.queued_bytes.fetch_sub(packet.len(), Ordering::Relaxed);
                self.stats.queue_drops.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            self.stats.packets_out.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut rx = self
            .inbound
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            match rx.poll_recv(cx) {
                Poll::Ready(Some(packet)) => {
                    let len = packet.len().min(bufs[n].len());
                    bufs[n][..len].copy_from_slice(&packet[..len]);
                    meta[n] = RecvMeta {
                        addr: self.peer,
                        len,
                        stride: len,
                        ecn: None,
                        dst_ip: None,
                    };
                    n += 1;
                }
                Poll::Ready(None) if n == 0 => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "TCP fallback tunnel closed",
                    )));
                }
                Poll::Ready(None) | Poll::Pending => break,
            }
        }
        if n == 0 {
            Poll::Pending
        } else {
            Poll::Ready(Ok(n))
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    fn may_fragment(&self) -> bool {
        false
    }
}

/// Reads frames from `rd` into `to` until the stream ends or a frame is malformed.
pub async fn pump_in<R: AsyncRead + Unpin>(
    mut rd: R,
    to: &mpsc::Sender<Bytes>,
    stats: &FallbackStats,
) {
    loop {
        let Ok(len) = rd.read_u16().await else { return };
        if len == 0 {
            return;
        }
        let mut packet = BytesMut::zeroed(usize::from(len));
        if rd.read_exact(&mut packet).await.is_err() {
            return;
        }
        stats.packets_in.fetch_add(1, Ordering::Relaxed);
        if to.send(packet.freeze()).await.is_err() {
            return;
        }
    }
}

/// Writes queued packets to `wr` as frames (batched up to 64 KiB a write) until the queue or
/// the stream ends.
pub async fn pump_out<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut queue: mpsc::Receiver<Bytes>,
    queued_bytes: &AtomicUsize,
) {
    let mut batch = BytesMut::with_capacity(WRITE_BATCH_BYTES + 2 * FRAME_HEADER_BYTES);
    while let Some(first) = queue.recv().await {
        let mut next = Some(first);
        while let Some(packet) = next.take() {
            queued_bytes.fetch_sub(packet.len(), Ordering::Relaxed);
            if let Some(h) = frame_header(packet.len()) {
                batch.extend_from_slice(&h);
                batch.extend_from_slice(&packet);
            }
            if batch.len() < WRITE_BATCH_BYTES {
                next = queue.try_recv().ok();
            }
        }
        if wr.write_all(&batch).await.is_err() || wr.flush().await.is_err() {
            return;
        }
        batch.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn addresses_and_names_default_from_the_relay_address() {
        let mut cfg = FallbackConfig::default();
        assert_eq!(
            tcp_addrs("relay.example.com:4433", &cfg),
            ["relay.example.com:443", "relay.example.com:7443"]
        );
        assert_eq!(tcp_addrs("[::1]:4433", &cfg), ["[::1]:443", "[::1]:7443"]);
        assert_eq!(
            sni("relay.example.com:7443", &cfg, "localhost"),
            "relay.example.com"
        );
        assert_eq!(sni("10.0.0.1:7443", &cfg, "localhost"), "localhost");
        assert_eq!(sni("[::1]:7443", &cfg, "localhost"), "localhost");
        cfg.addrs = BTreeMap::from([(
            "10.0.0.1:7443".into(),
            vec!["10.0.0.1:8443".into(), "10.0.0.1:9443".into()],
        )]);
        cfg.server_name = Some("relay.test".into());
        assert_eq!(
            tcp_addrs("10.0.0.1:7443", &cfg),
            ["10.0.0.1:8443", "10.0.0.1:9443"]
        );
        assert_eq!(sni("10.0.0.1:7443", &cfg, "localhost"), "relay.test");
    }

    #[test]
    fn the_setup_budget_covers_quic_and_every_tcp_address() {
        let mut cfg = FallbackConfig::default();
        // auto: 3 s of QUIC, then 443 and 7443 at 5 s each.
        assert_eq!(
            setup_budget("relay.example.com:4433", &cfg),
            std::time::Duration::from_secs(13)
        );
        cfg.mode = FallbackMode::Only;
        assert_eq!(
            setup_budget("relay.example.com:4433", &cfg),
            std::time::Duration::from_secs(10)
        );
        cfg.mode = FallbackMode::Off;
        assert_eq!(
            setup_budget("relay.example.com:4433", &cfg),
            std::time::Duration::ZERO
        );
    }

    fn transmit(contents: &[u8], segment: Option<usize>) -> Transmit<'_> {
        Transmit {
            destination: "127.0.0.1:1".parse().expect("addr"),
            ecn: None,
            contents,
            segment_size: segment,
            src_ip: None,
        }
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_and_frames_round_trip() {
        let stats = Arc::new(FallbackStats::default());
        let local = "127.0.0.1:2".parse().expect("addr");
        let peer = "127.0.0.1:443".parse().expect("addr");
        let (socket, out_rx, in_tx) = TunnelSocket::new(local, peer, 65_536, stats.clone());
        let data = vec![9u8; 60_000];
        socket
            .try_send(&transmit(&data, Some(30_000)))
            .expect("send");
        assert_eq!(stats.packets_out.load(Ordering::Relaxed), 2);
        // 60000 queued: 10000 more does not fit in 65536; dropped and counted, not an error.
        socket
            .try_send(&transmit(&data[..10_000], None))
            .expect("drop is not an error");
        assert_eq!(stats.queue_drops.load(Ordering::Relaxed), 1);
        // The writer frames what was queued; a reader gets the same packets back.
        let (a, b) = tokio::io::duplex(1 << 20);
        let queued = socket.queued_bytes.clone();
        let writer = tokio::spawn(async move { pump_out(a, out_rx, &queued).await });
        let (to, mut got) = mpsc::channel(8);
        let reader = tokio::spawn({
            let stats = stats.clone();
            async move { pump_in(b, &to, &stats).await }
        });
        for _ in 0..2 {
            let p = got.recv().await.expect("packet");
            assert_eq!(p.len(), 30_000);
        }
        assert_eq!(socket.queued_bytes.load(Ordering::Relaxed), 0);
        drop(socket);
        writer.await.expect("writer ends with the queue");
        reader.await.expect("reader ends with the stream");
        drop(in_tx);
    }

    #[tokio::test]
    async fn received_packets_come_from_the_relay_and_a_closed_tunnel_fails_the_socket() {
        let stats = Arc::new(FallbackStats::default());
        let local = "127.0.0.1:2".parse().expect("addr");
        let peer: SocketAddr = "127.0.0.1:443".parse().expect("addr");
        let (socket, _out_rx, in_tx) = TunnelSocket::new(local, peer, 65_536, stats);
        in_tx.send(Bytes::from_static(b"hello")).await.expect("in");
        drop(in_tx);
        let mut buf = [0u8; 64];
        let mut bufs = [IoSliceMut::new(&mut buf)];
        let mut meta = [RecvMeta::default()];
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        match socket.poll_recv(&mut cx, &mut bufs, &mut meta) {
            Poll::Ready(Ok(1)) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!((meta[0].addr, meta[0].len), (peer, 5));
        assert!(matches!(
            socket.poll_recv(&mut cx, &mut bufs, &mut meta),
            Poll::Ready(Err(_))
        ));
    }
}
