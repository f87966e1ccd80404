//! TCP/443 fallback for agents whose network drops UDP (issue 22): the agent's QUIC packets
//! travel inside one mutual-TLS TCP connection (ALPN `orp/1`) to the public TLS port, so ORP
//! is carried as ORP over QUIC over TLS/TCP and every ORP path stays the one QUIC
//! implementation.
//!
//! ```text
//! public TLS port ── SNI == root host and ALPN orp/1 ──▶ FallbackAcceptor::serve
//!     TLS (relay identity, agent client cert) ─ frames [u16 len][QUIC packet] ─┐
//!                                                                              ▼
//! quinn::Endpoint ◀── RelaySocket: real UDP (quinn's own socket: GSO/GRO) + tunnel packets
//!                      from synthetic peers (100::/64, RFC 6666 discard-only: never real)
//! ```
//!
//! Bounds: tunnels at once and per source IP (the TCP peer's), the TLS handshake deadline, and
//! each tunnel's send queue in bytes: a packet that does not fit is DROPPED and counted, so
//! QUIC sees loss and backs off instead of piling packets into the TCP buffer. The root host's
//! connection cap does not apply: a tunnel lives as long as its agent's connection.

use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

pub use outrelay_proto::tunnel::{FALLBACK_ALPN, FRAME_HEADER_BYTES, frame_header};
/// Default bound of tunnels at once.
pub const DEFAULT_MAX_TUNNELS: usize = 1024;
/// Default bound of tunnels per source IP.
pub const DEFAULT_PER_SOURCE_MAX: usize = 16;
/// Default bound of one tunnel's send queue (bytes of QUIC packets waiting for TCP).
pub const DEFAULT_QUEUE_BYTES: usize = 1024 * 1024;
/// Default deadline for the tunnel's TLS handshake.
pub const DEFAULT_HANDSHAKE_MS: u64 = 5_000;
/// Packets from all tunnels waiting for the endpoint (backpressure on the TCP readers).
const INBOUND_PACKETS_MAX: usize = 4096;
/// Most bytes a tunnel writer gathers into one TLS write.
const WRITE_BATCH_BYTES: usize = 64 * 1024;
/// The synthetic peers' /64 (`100::/64`, discard-only: no real packet comes from it).
const SYNTHETIC_PREFIX: u128 = 0x0100_u128 << 112;

/// The synthetic peer address of tunnel `id`.
pub fn synthetic_addr(id: u64) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V6(Ipv6Addr::from(SYNTHETIC_PREFIX | u128::from(id))),
        443,
    )
}

/// Whether `addr` is a tunnel's synthetic peer (never a real UDP peer).
pub fn is_synthetic(addr: &SocketAddr) -> bool {
    match addr {
        SocketAddr::V6(a) => u128::from(*a.ip()) >> 64 == SYNTHETIC_PREFIX >> 64,
        SocketAddr::V4(_) => false,
    }
}

/// Bounds of the fallback (`[quic]` keys `fallback_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FallbackLimits {
    /// Tunnels at once (`fallback_max_tunnels`).
    pub max_tunnels: usize,
    /// Tunnels per source IP (`fallback_per_source_max`).
    pub per_source_max: usize,
    /// One tunnel's send queue in bytes (`fallback_queue_bytes`).
    pub queue_bytes: usize,
    /// TLS handshake deadline (`fallback_handshake_ms`).
    pub handshake_ms: u64,
}

impl Default for FallbackLimits {
    fn default() -> Self {
        FallbackLimits {
            max_tunnels: DEFAULT_MAX_TUNNELS,
            per_source_max: DEFAULT_PER_SOURCE_MAX,
            queue_bytes: DEFAULT_QUEUE_BYTES,
            handshake_ms: DEFAULT_HANDSHAKE_MS,
        }
    }
}

/// Fallback counters (`outrelay_relay_fallback_*`).
#[derive(Debug, Default)]
pub struct FallbackStats {
    /// Tunnels whose TLS handshake completed.
    pub tunnels_opened: AtomicU64,
    /// Tunnels open now.
    pub tunnels_live: AtomicU64,
    /// Refused: `fallback_max_tunnels` reached.
    pub refused_full: AtomicU64,
    /// Refused: the source IP holds `fallback_per_source_max`.
    pub refused_per_source: AtomicU64,
    /// Refused: TLS handshake failed or missed its deadline (bad or no client certificate too).
    pub refused_handshake: AtomicU64,
    /// Tunnels ended on a malformed frame (length 0).
    pub bad_frames: AtomicU64,
    /// QUIC packets dropped: the tunnel's send queue was full.
    pub queue_drops: AtomicU64,
    /// QUIC packets for a tunnel that is gone.
    pub no_tunnel_drops: AtomicU64,
    /// QUIC packets received through tunnels.
    pub packets_in: AtomicU64,
    /// QUIC packets sent into tunnels.
    pub packets_out: AtomicU64,
}

/// One tunnel's bounded send queue.
#[derive(Debug)]
struct TunnelTx {
    /// The tunnel's TCP peer.
    peer: SocketAddr,
    queue: mpsc::Sender<Bytes>,
    queued_bytes: Arc<AtomicUsize>,
}

/// The live tunnels, keyed by synthetic peer address, and the packets they received.
#[derive(Debug)]
pub struct Tunnels {
    /// Read on every packet to a synthetic peer (lock-free); replaced at open and close.
    routes: ArcSwap<HashMap<SocketAddr, Arc<TunnelTx>>>,
    /// Tunnels per source IP; touched only at open and close.
    sources: Mutex<HashMap<IpAddr, usize>>,
    inbound_tx: mpsc::Sender<(SocketAddr, Bytes)>,
    /// Only the endpoint's driver polls it (uncontended).
    inbound_rx: Mutex<mpsc::Receiver<(SocketAddr, Bytes)>>,
    next_id: AtomicU64,
    limits: ArcSwap<FallbackLimits>,
    stats: Arc<FallbackStats>,
}

/// A place in the tunnel bounds, given back when dropped.
#[derive(Debug)]
pub struct TunnelSlot {
    tunnels: Arc<Tunnels>,
    source: IpAddr,
}

impl Drop for TunnelSlot {
    fn drop(&mut self) {
        let mut sources = self
            .tunnels
            .sources
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = sources.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                sources.remove(&self.source);
            }
        }
        self.tunnels
            .stats
            .tunnels_live
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl Tunnels {
    /// An empty table with `limits`.
    pub fn new(limits: FallbackLimits, stats: Arc<FallbackStats>) -> Arc<Tunnels> {
        let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_PACKETS_MAX);
        Arc::new(Tunnels {
            routes: ArcSwap::from_pointee(HashMap::new()),
            sources: Mutex::new(HashMap::new()),
            inbound_tx,
            inbound_rx: Mutex::new(inbound_rx),
            next_id: AtomicU64::new(1),
            limits: ArcSwap::from_pointee(limits),
            stats,
        })
    }

    /// Replaces the bounds (reload): tunnels already open stay.
    pub fn set_limits(&self, limits: FallbackLimits) {
        self.limits.store(Arc::new(limits));
    }

    /// The counters.
    pub fn stats(&self) -> &FallbackStats {
        &self.stats
    }

    /// A place for a tunnel from `source`, or `None` (counted) when a bound is reached.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Option<TunnelSlot> {
        let limits = self.limits.load();
        let mut sources = self
            .sources
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let total: usize = sources.values().sum();
        if total >= limits.max_tunnels {
            self.stats.refused_full.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let n = sources.entry(source).or_insert(0);
        if *n >= limits.per_source_max {
            self.stats
                .refused_per_source
                .fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *n += 1;
        self.stats.tunnels_live.fetch_add(1, Ordering::Relaxed);
        Some(TunnelSlot {
            tunnels: self.clone(),
            source,
        })
    }

    /// Registers a tunnel: its synthetic peer, its send queue's receiver and byte count.
    fn open(&self, peer: SocketAddr) -> (SocketAddr, mpsc::Receiver<Bytes>, Arc<AtomicUsize>) {
        let limits = self.limits.load();
        let addr = synthetic_addr(self.next_id.fetch_add(1, Ordering::Relaxed));
        // The byte bound is the real one; the packet bound only has to be above it.
        let (tx, rx) = mpsc::channel((limits.queue_bytes / 64).max(16));
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let entry = Arc::new(TunnelTx {
            peer,
            queue: tx,
            queued_bytes: queued_bytes.clone(),
        });
        self.routes.rcu(|routes| {
            let mut routes = HashMap::clone(routes);
            routes.insert(addr, entry.clone());
            routes
        });
        (addr, rx, queued_bytes)
    }

    fn close(&self, addr: SocketAddr) {
        self.routes.rcu(|routes| {
            let mut routes = HashMap::clone(routes);
            routes.remove(&addr);
            routes
        });
    }

    /// The real address behind `addr`: a live tunnel's TCP peer for its synthetic address,
    /// else `addr` itself.
    pub fn real_peer(&self, addr: SocketAddr) -> SocketAddr {
        if !is_synthetic(&addr) {
            return addr;
        }
        self.routes.load().get(&addr).map_or(addr, |t| t.peer)
    }

    /// Queues `t`'s packets (split at its segment size) for the tunnel of its destination;
    /// what does not fit in the queue's byte bound is dropped and counted.
    pub fn send(&self, t: &Transmit<'_>) {
        let routes = self.routes.load();
        let Some(tunnel) = routes.get(&t.destination) else {
            self.stats.no_tunnel_drops.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let max = self.limits.load().queue_bytes;
        let segment = t.segment_size.unwrap_or(t.contents.len()).max(1);
        for packet in t.contents.chunks(segment) {
            let queued = tunnel.queued_bytes.load(Ordering::Relaxed);
            if queued + packet.len() > max {
                self.stats.queue_drops.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            tunnel
                .queued_bytes
                .fetch_add(packet.len(), Ordering::Relaxed);
            if tunnel
                .queue
                .try_send(Bytes::copy_from_slice(packet))
                .is_err()
            {
                tunnel
                    .queued_bytes
                    .fetch_sub(packet.len(), Ordering::Relaxed);
                self.stats.queue_drops.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            self.stats.packets_out.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Moves up to `max` received tunnel packets into `bufs` / `meta`; how many.
    fn poll_inbound(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
        max: usize,
    ) -> usize {
        let mut rx = self
            .inbound_rx
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut n = 0;
        while n < max.min(bufs.len()).min(meta.len()) {
            match rx.poll_recv(cx) {
                Poll::Ready(Some((addr, packet))) => {
                    let len = packet.len().min(bufs[n].len());
                    bufs[n][..len].copy_from_slice(&packet[..len]);
                    meta[n] = RecvMeta {
                        addr,
                        len,
                        stride: len,
                        ecn: None,
                        dst_ip: None,
                    };
                    n += 1;
                }
                Poll::Ready(None) | Poll::Pending => break,
            }
        }
        n
    }
}

/// The QUIC endpoint's socket: the real UDP socket (quinn's, with GSO/GRO) plus the tunnels.
#[derive(Debug)]
pub struct RelaySocket {
    inner: Arc<dyn AsyncUdpSocket>,
    tunnels: Arc<Tunnels>,
}

impl RelaySocket {
    /// Wraps `inner` (from [`quinn::Runtime::wrap_udp_socket`]).
    pub fn new(inner: Arc<dyn AsyncUdpSocket>, tunnels: Arc<Tunnels>) -> RelaySocket {
        RelaySocket { inner, tunnels }
    }
}

impl AsyncUdpSocket for RelaySocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        // Tunnel sends never wait (a full queue drops): only the real socket has readiness.
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        if is_synthetic(&transmit.destination) {
            self.tunnels.send(transmit);
            return Ok(());
        }
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        // At most half a batch from the tunnels, so neither side starves the other.
        let n = self
            .tunnels
            .poll_inbound(cx, bufs, meta, bufs.len().div_ceil(2));
        if n >= bufs.len() {
            return Poll::Ready(Ok(n));
        }
        match self.inner.poll_recv(cx, &mut bufs[n..], &mut meta[n..]) {
            Poll::Ready(Ok(m)) => Poll::Ready(Ok(n + m)),
            Poll::Ready(Err(_)) | Poll::Pending if n > 0 => Poll::Ready(Ok(n)),
            other => other,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// A stream that first yields `head` (the ClientHello the SNI listener already read), then
/// `inner`'s bytes; writes go to `inner`.
#[derive(Debug)]
pub struct Replay<S> {
    head: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Replay<S> {
    /// `head`, then `inner`.
    pub fn new(head: Vec<u8>, inner: S) -> Replay<S> {
        Replay { head, at: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.head.len() {
            let n = (self.head.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.head[at..at + n]);
            self.at += n;
            if self.at == self.head.len() {
                self.head = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Reads frames from `rd` and hands each packet to the endpoint as from `addr`, until the
/// stream ends or a frame is malformed.
pub async fn pump_in<R: AsyncRead + Unpin>(
    mut rd: R,
    addr: SocketAddr,
    to: &mpsc::Sender<(SocketAddr, Bytes)>,
    stats: &FallbackStats,
) {
    loop {
        let Ok(len) = rd.read_u16().await else { return };
        if len == 0 {
            stats.bad_frames.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut packet = BytesMut::zeroed(usize::from(len));
        if rd.read_exact(&mut packet).await.is_err() {
            return;
        }
        stats.packets_in.fetch_add(1, Ordering::Relaxed);
        if to.send((addr, packet.freeze())).await.is_err() {
            return;
        }
    }
}

/// Writes the queued packets to `wr` as frames (batched up to 64 KiB a write) until the queue
/// or the stream ends.
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

/// Terminates fallback tunnels: TLS with the relay identity (ALPN `orp/1`, an agent client
/// certificate required, the QUIC endpoint's verifier), then packets both ways.
#[derive(Clone)]
pub struct FallbackAcceptor {
    tls: tokio_rustls::TlsAcceptor,
    tunnels: Arc<Tunnels>,
}

impl std::fmt::Debug for FallbackAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FallbackAcceptor").finish_non_exhaustive()
    }
}

impl FallbackAcceptor {
    pub(crate) fn new(tls: Arc<rustls::ServerConfig>, tunnels: Arc<Tunnels>) -> FallbackAcceptor {
        FallbackAcceptor {
            tls: tokio_rustls::TlsAcceptor::from(tls),
            tunnels,
        }
    }

    /// The tunnel table (counters, bounds).
    pub fn tunnels(&self) -> &Arc<Tunnels> {
        &self.tunnels
    }

    /// Serves one tunnel whose ClientHello (`replay`) was already read from `tcp`, until
    /// either side ends it.
    pub async fn serve(&self, tcp: TcpStream, replay: Vec<u8>) {
        let Ok(peer) = tcp.peer_addr() else { return };
        let Some(_slot) = self.tunnels.admit(peer.ip().to_canonical()) else {
            return;
        };
        let _ = tcp.set_nodelay(true);
        let deadline = Duration::from_millis(self.tunnels.limits.load().handshake_ms);
        let stats = &self.tunnels.stats;
        let tls =
            match tokio::time::timeout(deadline, self.tls.accept(Replay::new(replay, tcp))).await {
                Ok(Ok(tls)) if tls.get_ref().1.alpn_protocol() == Some(FALLBACK_ALPN) => tls,
                _ => {
                    stats.refused_handshake.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
        stats.tunnels_opened.fetch_add(1, Ordering::Relaxed);
        let (addr, queue, queued_bytes) = self.tunnels.open(peer);
        tracing::info!(%peer, synthetic = %addr, "fallback tunnel open");
        let (rd, wr) = tokio::io::split(tls);
        tokio::select! {
            () = pump_in(rd, addr, &self.tunnels.inbound_tx, stats) => {}
            () = pump_out(wr, queue, &queued_bytes) => {}
        }
        self.tunnels.close(addr);
        tracing::info!(%peer, synthetic = %addr, "fallback tunnel closed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_addresses_never_collide_with_real_peers() {
        let a = synthetic_addr(1);
        let b = synthetic_addr(2);
        assert_ne!(a, b);
        assert!(is_synthetic(&a) && is_synthetic(&b));
        assert!(is_synthetic(&synthetic_addr(u64::MAX)));
        for real in [
            "127.0.0.1:443",
            "[::1]:443",
            "[::ffff:10.0.0.1]:443",
            "[2001:db8::1]:443",
            "[100:0:0:1::1]:443",
        ] {
            let real: SocketAddr = real.parse().expect("addr");
            assert!(!is_synthetic(&real), "{real}");
        }
        assert_eq!(a.to_string(), "[100::1]:443");
    }

    fn transmit(to: SocketAddr, contents: &[u8], segment: Option<usize>) -> Transmit<'_> {
        Transmit {
            destination: to,
            ecn: None,
            contents,
            segment_size: segment,
            src_ip: None,
        }
    }

    #[tokio::test]
    async fn full_queue_drops_and_counts_and_segments_split() {
        let stats = Arc::new(FallbackStats::default());
        let limits = FallbackLimits {
            queue_bytes: 3000,
            ..FallbackLimits::default()
        };
        let tunnels = Tunnels::new(limits, stats.clone());
        let peer: SocketAddr = "192.0.2.7:40000".parse().expect("addr");
        let (addr, mut rx, queued) = tunnels.open(peer);
        assert_eq!(tunnels.real_peer(addr), peer);
        assert_eq!(tunnels.real_peer(peer), peer);
        // Two GSO segments of 1200 and a tail of 100: three packets, 2500 bytes.
        let data = vec![7u8; 2500];
        tunnels.send(&transmit(addr, &data, Some(1200)));
        assert_eq!(queued.load(Ordering::Relaxed), 2500);
        assert_eq!(stats.packets_out.load(Ordering::Relaxed), 3);
        // 1200 more does not fit in 3000: dropped, counted.
        tunnels.send(&transmit(addr, &data[..1200], None));
        assert_eq!(stats.queue_drops.load(Ordering::Relaxed), 1);
        // Unknown synthetic peer: dropped, counted.
        tunnels.send(&transmit(synthetic_addr(999), &data[..10], None));
        assert_eq!(stats.no_tunnel_drops.load(Ordering::Relaxed), 1);
        let lens: Vec<usize> = std::iter::from_fn(|| rx.try_recv().ok().map(|p| p.len())).collect();
        assert_eq!(lens, vec![1200, 1200, 100]);
        tunnels.close(addr);
        tunnels.send(&transmit(addr, &data[..10], None));
        assert_eq!(stats.no_tunnel_drops.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn admission_bounds_total_and_per_source() {
        let stats = Arc::new(FallbackStats::default());
        let limits = FallbackLimits {
            max_tunnels: 3,
            per_source_max: 2,
            ..FallbackLimits::default()
        };
        let tunnels = Tunnels::new(limits, stats.clone());
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let s1 = tunnels.admit(a).expect("first");
        let _s2 = tunnels.admit(a).expect("second");
        assert!(tunnels.admit(a).is_none());
        assert_eq!(stats.refused_per_source.load(Ordering::Relaxed), 1);
        let _s3 = tunnels.admit(b).expect("other source");
        assert!(tunnels.admit(b).is_none());
        assert_eq!(stats.refused_full.load(Ordering::Relaxed), 1);
        drop(s1);
        let _s4 = tunnels.admit(b).expect("room again");
        assert_eq!(stats.tunnels_live.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn frames_round_trip_through_the_pumps() {
        let stats = Arc::new(FallbackStats::default());
        let (a, b) = tokio::io::duplex(1 << 16);
        let (tx, rx) = mpsc::channel(8);
        let queued = AtomicUsize::new(3);
        tx.send(Bytes::from_static(b"abc")).await.expect("queue");
        drop(tx);
        pump_out(a, rx, &queued).await;
        let (to, mut got) = mpsc::channel(8);
        let from = synthetic_addr(5);
        pump_in(b, from, &to, &stats).await;
        let (addr, packet) = got.recv().await.expect("packet");
        assert_eq!((addr, &packet[..]), (from, &b"abc"[..]));
        assert_eq!(queued.load(Ordering::Relaxed), 0);
        // A zero-length frame ends the tunnel, counted.
        let (mut c, d) = tokio::io::duplex(64);
        c.write_all(&[0, 0]).await.expect("write");
        pump_in(d, from, &to, &stats).await;
        assert_eq!(stats.bad_frames.load(Ordering::Relaxed), 1);
    }
}
