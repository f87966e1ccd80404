//! Service-to-service streams (orp.md, "Open a stream"): the agent's two halves.
//!
//! - **Consumer.** Each `[[consume]]` listener is bound at start. Every accepted local TCP
//!   connection becomes one bidirectional QUIC stream on the held relay connection that is up
//!   with the fewest live consumer streams (ties: the earlier relay candidate in config order):
//!   OPEN_STREAM{service, method, random non-zero stream id}, then exactly one answer within
//!   `mesh.open_timeout_ms`: STREAM_ACCEPT (raw bytes both ways) or STREAM_REJECT (logged,
//!   counted as `rejected_<code>`, local connection closed).
//! - **Provider.** Every stream the relay opens on an agent's connection starts with
//!   INCOMING_STREAM{service, method}. The service's method target (else its default target)
//!   is dialled within `mesh.dial_timeout_ms`: STREAM_ACCEPT and raw bytes on success,
//!   STREAM_REJECT 404 when there is no handler, 502 when the dial fails.
//!
//! After the open handshake both halves [`join`] the QUIC stream and the TCP connection: each
//! direction ends on its own (QUIC FIN becomes `shutdown(SHUT_WR)`, TCP EOF becomes
//! `finish()`), an error on either side resets both. QUIC to TCP writes quinn's received chunks
//! as they are (no copy, up to 32 per `writev`); TCP to QUIC reads into [`TCP_READ_BYTES`] blocks handed to quinn
//! whole. Bytes that arrived behind the first frame are forwarded first, never lost.
//!
//! The relay connections reach the consumer path as one `ArcSwapOption` per relay, swapped by
//! the relay tasks when a connection comes up or goes away: no lock per local connection.

use std::collections::HashMap;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::{Buf, Bytes, BytesMut};
use outrelay_proto::frame::{Decoded, Frame, FrameError, decode};
use outrelay_proto::orp;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;

use crate::config::{ConsumeSpec, Settings};
use crate::stats::{MeshResult, MeshRole, MeshStats, Stats};

/// Largest first frame (OPEN_STREAM's answer, INCOMING_STREAM) accepted, in bytes: these
/// carry a few names, and a peer must not make us buffer 16 MiB before any check.
pub const FIRST_FRAME_MAX_BYTES: usize = 64 * 1024;
/// TCP to QUIC: bytes read from the local connection per block handed to quinn.
pub const TCP_READ_BYTES: usize = 128 * 1024;
/// QUIC to TCP: received chunks (about one packet each) gathered into one `writev`.
pub(crate) const QUIC_CHUNKS_PER_WRITE: usize = 32;
/// A block with less room than this left is replaced by a fresh [`TCP_READ_BYTES`] one.
const TCP_READ_MIN_BYTES: usize = 16 * 1024;
/// Local connections one consumer listener serves at once; more are closed (`overloaded`).
pub const CONSUMER_CONNS_MAX: usize = 1024;
/// QUIC application error code of a stream reset because the other side failed.
pub const STREAM_RESET_CODE: u32 = 1;
/// STREAM_REJECT code: no handler for the service or method.
pub const REJECT_NO_HANDLER: u32 = 404;
/// STREAM_REJECT code: the local target could not be dialled.
pub const REJECT_DIAL_FAILED: u32 = 502;
/// Pause after a failed local `accept` (out of file descriptors, say).
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// One live relay connection as the streams see it.
pub struct Link {
    /// The QUIC connection.
    pub conn: quinn::Connection,
    /// Its control stream's send queue (STREAM_CHECKPOINT).
    pub control: mpsc::Sender<Frame>,
    /// Preference on ties (lower first): the relay candidate's position in config order.
    pub rank: usize,
    /// Consumer streams opened on this link that are still running.
    pub consumer_streams: std::sync::atomic::AtomicUsize,
}

impl Link {
    /// A link on `conn` with control queue `control`, ranked `rank` among equally loaded ones.
    pub fn new(conn: quinn::Connection, control: mpsc::Sender<Frame>, rank: usize) -> Link {
        Link {
            conn,
            control,
            rank,
            consumer_streams: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}

/// Counts one consumer stream on a link while it lives.
pub(crate) struct LinkLoad(Arc<Link>);

impl LinkLoad {
    pub(crate) fn new(link: &Arc<Link>) -> LinkLoad {
        link.consumer_streams
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        LinkLoad(link.clone())
    }
}

impl Drop for LinkLoad {
    fn drop(&mut self) {
        self.0
            .consumer_streams
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What the consumer listeners and provider streams share.
pub struct MeshCtx {
    settings: Arc<Settings>,
    stats: Arc<Stats>,
    /// HA slot `i`'s live connection; `None` while it is down.
    relays: Vec<ArcSwapOption<Link>>,
    /// Service name to its index in `settings.provides`.
    providers: HashMap<String, usize>,
    /// Resumable streams and their shared ring budget.
    resume: crate::resume::Registry,
}

impl MeshCtx {
    /// A context with every relay disconnected.
    pub fn new(settings: Arc<Settings>, stats: Arc<Stats>) -> MeshCtx {
        let relays = (0..settings.ha_connections)
            .map(|_| ArcSwapOption::empty())
            .collect();
        let providers = settings
            .provides
            .iter()
            .enumerate()
            .map(|(i, p)| (p.service.clone(), i))
            .collect();
        MeshCtx {
            settings,
            stats,
            relays,
            providers,
            resume: crate::resume::Registry::default(),
        }
    }

    /// Publishes HA slot `index`'s connection (`None`: down) for consumers.
    pub fn set_connection(&self, index: usize, link: Option<Link>) {
        if let Some(slot) = self.relays.get(index) {
            slot.store(link.map(Arc::new));
        }
    }

    /// The relay connection that is up with the fewest live consumer streams opened on it
    /// (ties: the earlier candidate in config order), so new streams spread over every held
    /// relay.
    pub(crate) fn current_link(&self) -> Option<Arc<Link>> {
        self.link_except(None)
    }

    /// Like [`MeshCtx::current_link`], but not `avoid` (a link a stream just lost) while
    /// another connection is up.
    pub(crate) fn link_except(&self, avoid: Option<&Arc<Link>>) -> Option<Arc<Link>> {
        let load = |l: &Arc<Link>| {
            (
                l.consumer_streams
                    .load(std::sync::atomic::Ordering::Relaxed),
                l.rank,
            )
        };
        let mut best: Option<Arc<Link>> = None;
        let mut fallback = None;
        for slot in &self.relays {
            let Some(link) = slot.load_full().filter(|l| l.conn.close_reason().is_none()) else {
                continue;
            };
            if avoid.is_some_and(|a| Arc::ptr_eq(a, &link)) {
                fallback = Some(link);
                continue;
            }
            if best.as_ref().is_none_or(|b| load(&link) < load(b)) {
                best = Some(link);
            }
        }
        best.or(fallback)
    }

    pub(crate) fn settings(&self) -> &Settings {
        &self.settings
    }

    pub(crate) fn mesh_stats(&self) -> &MeshStats {
        &self.stats.mesh
    }

    pub(crate) fn resume_registry(&self) -> &crate::resume::Registry {
        &self.resume
    }

    /// A STREAM_CHECKPOINT from a peer, forwarded by the relay on a control stream.
    pub fn checkpoint(&self, c: &orp::StreamCheckpoint) {
        self.resume.checkpoint(c, &self.stats.mesh.resume);
    }

    /// The local target for `service` and `method`; `Err` is the STREAM_REJECT reason.
    pub fn target(&self, service: &str, method: &str) -> Result<&str, &'static str> {
        let spec = self
            .providers
            .get(service)
            .and_then(|i| self.settings.provides.get(*i))
            .ok_or("no handler for this service")?;
        spec.target(method).ok_or("no handler for this method")
    }

    /// The PROXY protocol version the provider of `service` writes to its targets.
    pub fn proxy_protocol(&self, service: &str) -> Option<crate::config::ProxyProtocol> {
        self.providers
            .get(service)
            .and_then(|i| self.settings.provides.get(*i))
            .and_then(|spec| spec.proxy_protocol)
    }

    fn mesh(&self) -> &MeshStats {
        &self.stats.mesh
    }
}

/// Why a stream's first frame did not arrive.
#[derive(Debug, thiserror::Error)]
pub enum FirstFrameError {
    /// The stream failed (reset, connection lost) or could not be opened or written.
    #[error("stream: {0}")]
    Stream(String),
    /// The peer finished the stream before a whole frame.
    #[error("stream finished before the first frame")]
    Finished,
    /// Malformed, oversized or unknown frame.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

impl FirstFrameError {
    fn result(&self) -> MeshResult {
        match self {
            FirstFrameError::Frame(_) => MeshResult::BadFrame,
            _ => MeshResult::StreamError,
        }
    }
}

/// Takes one whole frame off the front of `buf`; what follows it stays in `buf` (raw bytes
/// that arrived with the frame). `Ok(None)`: more bytes needed.
///
/// # Errors
/// The frame's decode error, or [`FrameError::PayloadTooLarge`] past
/// [`FIRST_FRAME_MAX_BYTES`].
pub fn take_frame(buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
    let (frame, used) = match decode(buf)? {
        Decoded::NeedMore { at_least } if at_least > FIRST_FRAME_MAX_BYTES => {
            return Err(FrameError::PayloadTooLarge(
                u64::try_from(at_least).unwrap_or(u64::MAX),
            ));
        }
        Decoded::NeedMore { .. } => return Ok(None),
        Decoded::Frame { frame, used } => (Frame::decode(&frame)?, used),
    };
    buf.advance(used);
    Ok(Some(frame))
}

/// Reads exactly one frame from `recv`; bytes behind it stay in `buf`.
///
/// # Errors
/// See [`FirstFrameError`]. No deadline: the caller bounds it.
pub async fn read_first_frame(
    recv: &mut quinn::RecvStream,
    buf: &mut BytesMut,
) -> Result<Frame, FirstFrameError> {
    loop {
        if let Some(f) = take_frame(buf)? {
            return Ok(f);
        }
        match recv.read_chunk(FIRST_FRAME_MAX_BYTES, true).await {
            Ok(Some(c)) => buf.extend_from_slice(&c.bytes),
            Ok(None) => return Err(FirstFrameError::Finished),
            Err(e) => return Err(FirstFrameError::Stream(e.to_string())),
        }
    }
}

async fn write_frame(send: &mut quinn::SendStream, frame: &Frame) -> Result<(), FirstFrameError> {
    let bytes = frame.to_vec()?;
    send.write_all(&bytes)
        .await
        .map_err(|e| FirstFrameError::Stream(e.to_string()))
}

/// Binds every consumer listener (before any relay is dialled, so the ready file can name
/// the bound addresses).
///
/// # Errors
/// The first listener that cannot be bound, with its address.
pub async fn bind_consumers(
    specs: &[ConsumeSpec],
) -> Result<Vec<(ConsumeSpec, TcpListener, SocketAddr)>, (SocketAddr, std::io::Error)> {
    let mut out = Vec::with_capacity(specs.len());
    for spec in specs {
        let listener = TcpListener::bind(spec.listen)
            .await
            .map_err(|e| (spec.listen, e))?;
        let bound = listener.local_addr().map_err(|e| (spec.listen, e))?;
        tracing::info!(service = %spec.service, listen = %bound, method = %spec.method, "consumer listening");
        out.push((spec.clone(), listener, bound));
    }
    Ok(out)
}

/// Serves one consumer listener until the task is aborted.
pub async fn consume(spec: ConsumeSpec, listener: TcpListener, ctx: Arc<MeshCtx>) {
    let spec = Arc::new(spec);
    let slots = Arc::new(Semaphore::new(CONSUMER_CONNS_MAX));
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(ACCEPT_RETRY).await;
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            ctx.mesh()
                .stream(MeshRole::Consumer, MeshResult::Overloaded);
            continue;
        };
        let (spec, ctx) = (spec.clone(), ctx.clone());
        tokio::spawn(async move {
            consume_one(tcp, &spec, &ctx).await;
            drop(permit);
        });
    }
}

/// Spawns [`consume`] for every bound listener.
pub fn spawn_consumers(
    bound: Vec<(ConsumeSpec, TcpListener, SocketAddr)>,
    ctx: &Arc<MeshCtx>,
) -> Vec<JoinHandle<()>> {
    bound
        .into_iter()
        .map(|(spec, listener, _)| tokio::spawn(consume(spec, listener, ctx.clone())))
        .collect()
}

/// A random non-zero stream id.
fn stream_id() -> u64 {
    loop {
        let mut b = [0u8; 8];
        if getrandom::fill(&mut b).is_err() {
            // No entropy source: still unique enough per process, never zero.
            return std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| u64::try_from(d.as_nanos()).unwrap_or(1) | 1);
        }
        let id = u64::from_le_bytes(b);
        if id != 0 {
            return id;
        }
    }
}

/// OPEN_STREAM on `link` and its first answer (with any bytes that came after it).
async fn open_on(
    link: &Link,
    spec: &ConsumeSpec,
    id: u64,
) -> Result<(quinn::SendStream, quinn::RecvStream, Frame, BytesMut), FirstFrameError> {
    let (mut send, mut recv) = link
        .conn
        .open_bi()
        .await
        .map_err(|e| FirstFrameError::Stream(e.to_string()))?;
    let frame = Frame::OpenStream(orp::OpenStream {
        target_service: spec.service.clone(),
        method: spec.method.clone(),
        stream_id: id,
    });
    write_frame(&mut send, &frame).await?;
    let mut buf = BytesMut::new();
    let answer = read_first_frame(&mut recv, &mut buf).await?;
    Ok((send, recv, answer, buf))
}

/// One local connection: open, wait for the answer, join or close. When the relay connection
/// dies under the open, the open is made once more on another held relay.
async fn consume_one(tcp: TcpStream, spec: &ConsumeSpec, ctx: &MeshCtx) {
    let stats = ctx.mesh();
    let Some(link) = ctx.current_link() else {
        stats.stream(MeshRole::Consumer, MeshResult::NoRelay);
        tracing::debug!(service = %spec.service, "no relay connected: local connection closed");
        return;
    };
    let mut link = link;
    let mut _load = LinkLoad::new(&link);
    let mut id = stream_id();
    let mut reopened = false;
    let (mut send, mut recv, answer, early) = loop {
        match tokio::time::timeout(ctx.settings.mesh.open_timeout, open_on(&link, spec, id)).await {
            Ok(Ok(done)) => break done,
            Ok(Err(e)) => {
                stats.stream(MeshRole::Consumer, e.result());
                tracing::info!(service = %spec.service, stream_id = id, error = %e, "stream open failed");
            }
            Err(_) => {
                stats.stream(MeshRole::Consumer, MeshResult::Timeout);
                tracing::info!(service = %spec.service, stream_id = id, "no answer to OPEN_STREAM in time");
            }
        }
        // The relay connection died under the open (nothing of the local connection has been
        // read yet): once more, with a new stream id, on another held relay.
        if reopened || link.conn.close_reason().is_none() {
            return;
        }
        match ctx.link_except(Some(&link)) {
            Some(other) if !Arc::ptr_eq(&other, &link) => {
                reopened = true;
                stats
                    .reopened
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                link = other;
                _load = LinkLoad::new(&link);
                id = stream_id();
                tracing::info!(service = %spec.service, stream_id = id, "relay lost under the open: opening on another relay");
            }
            _ => return,
        }
    };
    match answer {
        Frame::StreamAccept(a) => {
            stats.stream(MeshRole::Consumer, MeshResult::Accepted);
            tracing::debug!(service = %spec.service, stream_id = id, resume = a.resume, "stream accepted");
            if a.resume && ctx.settings.resume.enabled && !a.peer_agent_uri.is_empty() {
                let info = crate::resume::StreamInfo {
                    id,
                    role: MeshRole::Consumer,
                    peer_uri: a.peer_agent_uri,
                    service: spec.service.clone(),
                    method: spec.method.clone(),
                };
                crate::resume::join(ctx, link, info, send, recv, tcp, early.freeze()).await;
            } else {
                join(send, recv, tcp, early.freeze(), MeshRole::Consumer, stats).await;
            }
        }
        Frame::StreamReject(r) => {
            stats.stream(MeshRole::Consumer, MeshResult::rejected(r.code));
            tracing::info!(service = %spec.service, method = %spec.method, stream_id = id, code = r.code, reason = %r.reason, "stream rejected");
        }
        other => {
            stats.stream(MeshRole::Consumer, MeshResult::BadFrame);
            tracing::info!(service = %spec.service, stream_id = id, frame = other.frame_type().name(), "unexpected answer to OPEN_STREAM");
            let _ = send.reset(STREAM_RESET_CODE.into());
            let _ = recv.stop(STREAM_RESET_CODE.into());
        }
    }
}

/// Accepts the streams the relay opens on `conn` (one task each) until the connection ends.
/// quinn's stream limit of the connection bounds how many run at once.
pub async fn serve_incoming(link: Arc<Link>, ctx: Arc<MeshCtx>) {
    while let Ok((send, recv)) = link.conn.accept_bi().await {
        tokio::spawn(provide_one(send, recv, link.clone(), ctx.clone()));
    }
}

/// One relay-initiated stream: INCOMING_STREAM, dial, answer, join.
async fn provide_one(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    link: Arc<Link>,
    ctx: Arc<MeshCtx>,
) {
    let stats = ctx.mesh();
    let mut buf = BytesMut::new();
    let first = tokio::time::timeout(
        ctx.settings.mesh.open_timeout,
        read_first_frame(&mut recv, &mut buf),
    )
    .await;
    let incoming = match first {
        Ok(Ok(Frame::IncomingStream(i))) => i,
        Ok(Ok(other)) => {
            stats.stream(MeshRole::Provider, MeshResult::BadFrame);
            tracing::info!(
                frame = other.frame_type().name(),
                "relay stream did not start with INCOMING_STREAM"
            );
            let _ = send.reset(STREAM_RESET_CODE.into());
            let _ = recv.stop(STREAM_RESET_CODE.into());
            return;
        }
        Ok(Err(e)) => {
            stats.stream(MeshRole::Provider, e.result());
            tracing::info!(error = %e, "relay stream failed before INCOMING_STREAM");
            let _ = send.reset(STREAM_RESET_CODE.into());
            return;
        }
        Err(_) => {
            stats.stream(MeshRole::Provider, MeshResult::Timeout);
            let _ = send.reset(STREAM_RESET_CODE.into());
            let _ = recv.stop(STREAM_RESET_CODE.into());
            return;
        }
    };
    let (service, method, id) = (
        incoming.target_service.as_str(),
        incoming.method.as_str(),
        incoming.stream_id,
    );
    let target = match ctx.target(service, method) {
        Ok(t) => t,
        Err(reason) => {
            stats.stream(MeshRole::Provider, MeshResult::Rejected404);
            tracing::info!(%service, %method, stream_id = id, source = %incoming.source_agent_uri, reason, "incoming stream rejected");
            reject(send, recv, REJECT_NO_HANDLER, reason).await;
            return;
        }
    };
    let dialled = match tokio::time::timeout(
        ctx.settings.mesh.dial_timeout,
        TcpStream::connect(target),
    )
    .await
    {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("connect timed out".to_owned()),
    };
    // `proxy_protocol`: the header goes before the consumer's first byte, naming the
    // consumer's identity (TLV 0xE0) and the service (authority); no addresses (LOCAL).
    let dialled = match (dialled, ctx.proxy_protocol(service)) {
        (Ok(mut t), Some(version)) => {
            let header = crate::proxy::service_header(version, &incoming.source_agent_uri, service);
            match t.write_all(&header).await {
                Ok(()) => {
                    ctx.stats.proxy_headers.fetch_add(1, Ordering::Relaxed);
                    Ok(t)
                }
                Err(e) => Err(format!("PROXY header: {e}")),
            }
        }
        (d, _) => d,
    };
    let tcp = match dialled {
        Ok(t) => t,
        Err(e) => {
            stats.stream(MeshRole::Provider, MeshResult::Rejected502);
            tracing::warn!(%service, %method, stream_id = id, %target, error = %e, "local target dial failed");
            reject(
                send,
                recv,
                REJECT_DIAL_FAILED,
                &format!("local dial failed: {e}"),
            )
            .await;
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    if let Err(e) = write_frame(
        &mut send,
        &Frame::StreamAccept(orp::StreamAccept::default()),
    )
    .await
    {
        stats.stream(MeshRole::Provider, e.result());
        return;
    }
    stats.stream(MeshRole::Provider, MeshResult::Accepted);
    tracing::debug!(%service, %method, stream_id = id, %target, source = %incoming.source_agent_uri, resume = incoming.resume, "incoming stream joined");
    if incoming.resume && ctx.settings.resume.enabled {
        let info = crate::resume::StreamInfo {
            id,
            role: MeshRole::Provider,
            peer_uri: incoming.source_agent_uri.clone(),
            service: service.to_owned(),
            method: method.to_owned(),
        };
        crate::resume::join(&ctx, link, info, send, recv, tcp, buf.freeze()).await;
    } else {
        join(send, recv, tcp, buf.freeze(), MeshRole::Provider, stats).await;
    }
}

/// Answers STREAM_REJECT and finishes the stream.
async fn reject(mut send: quinn::SendStream, mut recv: quinn::RecvStream, code: u32, reason: &str) {
    let frame = Frame::StreamReject(orp::StreamReject {
        code,
        reason: reason.to_owned(),
        request_id: 0,
    });
    if write_frame(&mut send, &frame).await.is_ok() {
        let _ = send.finish();
    }
    let _ = recv.stop(0u32.into());
}

/// Writes every chunk (vectored, partial writes resumed); returns the bytes written.
pub(crate) async fn write_chunks<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    chunks: &mut [Bytes],
) -> std::io::Result<usize> {
    let total = chunks.iter().map(Bytes::len).sum();
    let mut left = chunks;
    loop {
        while left.first().is_some_and(Bytes::is_empty) {
            left = left.get_mut(1..).unwrap_or_default();
        }
        if left.is_empty() {
            return Ok(total);
        }
        let mut slices = [IoSlice::new(&[]); QUIC_CHUNKS_PER_WRITE];
        for (s, c) in slices.iter_mut().zip(left.iter()) {
            *s = IoSlice::new(c);
        }
        let used = left.len().min(QUIC_CHUNKS_PER_WRITE);
        let mut n = w
            .write_vectored(slices.get(..used).unwrap_or_default())
            .await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        for c in left.iter_mut() {
            let step = n.min(c.len());
            c.advance(step);
            n -= step;
            if n == 0 {
                break;
            }
        }
    }
}

/// Which side of a join failed.
#[derive(Debug, thiserror::Error)]
enum Broken {
    #[error("local connection: {0}")]
    Local(std::io::Error),
    #[error("relay stream: {0}")]
    Relay(String),
}

/// Copies raw bytes both ways until both directions ended (or one failed: then both sides
/// are reset). `early`: bytes from the relay that arrived behind the first frame.
pub async fn join(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    mut tcp: TcpStream,
    early: Bytes,
    role: MeshRole,
    stats: &MeshStats,
) {
    stats.set_active(role, true);
    let failed = {
        let (mut tcp_r, mut tcp_w) = tcp.split();
        let up = async {
            let mut buf = BytesMut::with_capacity(TCP_READ_BYTES);
            loop {
                if buf.capacity() < TCP_READ_MIN_BYTES {
                    buf.reserve(TCP_READ_BYTES);
                }
                let n = tcp_r.read_buf(&mut buf).await.map_err(Broken::Local)?;
                if n == 0 {
                    send.finish().map_err(|e| Broken::Relay(e.to_string()))?;
                    return Ok::<(), Broken>(());
                }
                stats.add_bytes(role, true, u64::try_from(n).unwrap_or(u64::MAX));
                send.write_chunk(buf.split().freeze())
                    .await
                    .map_err(|e| Broken::Relay(e.to_string()))?;
            }
        };
        let down = async {
            if !early.is_empty() {
                tcp_w.write_all(&early).await.map_err(Broken::Local)?;
                stats.add_bytes(role, false, u64::try_from(early.len()).unwrap_or(u64::MAX));
            }
            let mut chunks: [Bytes; QUIC_CHUNKS_PER_WRITE] = Default::default();
            loop {
                match recv.read_chunks(&mut chunks).await {
                    Ok(Some(n)) => {
                        let got = chunks.get_mut(..n).unwrap_or_default();
                        let len = write_chunks(&mut tcp_w, got).await.map_err(Broken::Local)?;
                        stats.add_bytes(role, false, u64::try_from(len).unwrap_or(u64::MAX));
                    }
                    Ok(None) => {
                        tcp_w.shutdown().await.map_err(Broken::Local)?;
                        return Ok::<(), Broken>(());
                    }
                    Err(e) => return Err(Broken::Relay(e.to_string())),
                }
            }
        };
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                r = &mut up, if !up_done => match r {
                    Ok(()) => up_done = true,
                    Err(e) => break Some(e),
                },
                r = &mut down, if !down_done => match r {
                    Ok(()) => down_done = true,
                    Err(e) => break Some(e),
                },
            }
            if up_done && down_done {
                break None;
            }
        }
    };
    stats.set_active(role, false);
    if let Some(e) = failed {
        tracing::debug!(role = role.label(), error = %e, "stream broken: resetting both sides");
        let _ = send.reset(STREAM_RESET_CODE.into());
        let _ = recv.stop(STREAM_RESET_CODE.into());
        // RST instead of FIN: the local peer must not take a cut stream for a clean end.
        let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use crate::config::ProvideSpec;

    #[test]
    fn first_frame_keeps_the_bytes_behind_it_for_every_split() {
        let frame = Frame::IncomingStream(orp::IncomingStream {
            target_service: "payments".into(),
            method: "charge".into(),
            source_agent_uri: "outrelay://demo/agent/0f8fad5b-d9cb-469f-a165-70867728950e".into(),
            stream_id: 42,
            ..Default::default()
        });
        let mut wire = frame.to_vec().expect("encode");
        let frame_len = wire.len();
        wire.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        for split in 0..=wire.len() {
            let mut buf = BytesMut::new();
            let mut got = None;
            for part in [&wire[..split], &wire[split..]] {
                buf.extend_from_slice(part);
                if got.is_none() {
                    got = take_frame(&mut buf).expect("valid");
                }
            }
            assert_eq!(got.as_ref(), Some(&frame), "split {split}");
            assert_eq!(&buf[..], &wire[frame_len..], "split {split}");
        }
        // Byte by byte: nothing until the last byte of the frame.
        let mut buf = BytesMut::new();
        for (i, b) in wire.iter().enumerate() {
            buf.extend_from_slice(&[*b]);
            if i + 1 < frame_len {
                assert_eq!(take_frame(&mut buf).expect("prefix"), None, "byte {i}");
            } else if i + 1 == frame_len {
                assert_eq!(take_frame(&mut buf).expect("frame"), Some(frame.clone()));
            }
        }
        assert_eq!(&buf[..], b"GET / HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn first_frame_refuses_oversized_and_garbage_headers() {
        // A valid header announcing 1 MiB: refused before the payload arrives.
        let mut big = BytesMut::from(&[0x20, 0x11, 0, 0, 0, 0x10, 0, 0][..]);
        assert!(matches!(
            take_frame(&mut big),
            Err(FrameError::PayloadTooLarge(_))
        ));
        let mut garbage = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
        assert!(take_frame(&mut garbage).is_err());
    }

    pub(crate) fn settings_with(provides: Vec<ProvideSpec>) -> Settings {
        let text = "relays = [\"127.0.0.1:7443\"]\n[identity]\ncert = \"a\"\nkey = \"b\"\nca = \"c\"\n\
                    [[consume]]\nservice = \"x\"\nlisten = \"127.0.0.1:0\"\n";
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, text).expect("write");
        let mut settings = Settings::load(&path).expect("valid");
        settings.provides = provides;
        settings
    }

    pub(crate) fn ctx_with(provides: Vec<ProvideSpec>) -> MeshCtx {
        MeshCtx::new(
            Arc::new(settings_with(provides)),
            Arc::new(Stats::default()),
        )
    }

    #[test]
    fn method_targets_then_default_else_404() {
        let ctx = ctx_with(vec![
            ProvideSpec {
                service: "payments".into(),
                to: Some("127.0.0.1:8080".into()),
                methods: BTreeMap::from([("charge".into(), "127.0.0.1:8081".into())]),
                proxy_protocol: None,
            },
            ProvideSpec {
                service: "ledger".into(),
                to: None,
                methods: BTreeMap::from([("read".into(), "127.0.0.1:9001".into())]),
                proxy_protocol: None,
            },
        ]);
        assert_eq!(ctx.target("payments", "charge"), Ok("127.0.0.1:8081"));
        assert_eq!(ctx.target("payments", ""), Ok("127.0.0.1:8080"));
        assert_eq!(ctx.target("payments", "refund"), Ok("127.0.0.1:8080"));
        assert_eq!(ctx.target("ledger", "read"), Ok("127.0.0.1:9001"));
        assert_eq!(
            ctx.target("ledger", "write"),
            Err("no handler for this method")
        );
        assert_eq!(ctx.target("ledger", ""), Err("no handler for this method"));
        assert_eq!(
            ctx.target("unknown", "read"),
            Err("no handler for this service")
        );
    }

    #[test]
    fn stream_ids_are_never_zero() {
        for _ in 0..1000 {
            assert_ne!(stream_id(), 0);
        }
    }

    /// A "relay" (server) and an "agent" (client) QUIC connection over loopback.
    pub(crate) async fn quic_pair() -> (
        quinn::Endpoint,
        quinn::Connection,
        quinn::Endpoint,
        quinn::Connection,
    ) {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let der: CertificateDer<'static> = cert.der().clone();
        let server_cfg = quinn::ServerConfig::with_single_cert(
            vec![der.clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .expect("server config");
        let server = quinn::Endpoint::server(server_cfg, "127.0.0.1:0".parse().expect("addr"))
            .expect("server endpoint");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).expect("root");
        let client_cfg =
            quinn::ClientConfig::with_root_certificates(Arc::new(roots)).expect("client config");
        let mut client =
            quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client");
        client.set_default_client_config(client_cfg);
        let addr = server.local_addr().expect("server addr");
        let connecting = client.connect(addr, "localhost").expect("connect");
        let (agent, relay) = tokio::join!(connecting, async {
            server.accept().await.expect("incoming").await
        });
        (
            server,
            relay.expect("relay side"),
            client,
            agent.expect("agent side"),
        )
    }

    /// A link on `conn` and the receiving end of its control queue.
    pub(crate) fn link(conn: quinn::Connection) -> (Link, mpsc::Receiver<Frame>) {
        let (control, rx) = mpsc::channel(64);
        (Link::new(conn, control, 0), rx)
    }

    pub(crate) fn encode(frame: &Frame) -> Vec<u8> {
        frame.to_vec().expect("encode")
    }

    /// Reads one frame and everything after it until FIN.
    async fn frame_and_rest(recv: &mut quinn::RecvStream) -> (Frame, Vec<u8>) {
        let mut buf = BytesMut::new();
        let f = read_first_frame(recv, &mut buf).await.expect("first frame");
        let rest = recv.read_to_end(1 << 30).await.expect("to end");
        let mut all = buf.to_vec();
        all.extend_from_slice(&rest);
        (f, all)
    }

    fn incoming(service: &str, method: &str) -> Frame {
        Frame::IncomingStream(orp::IncomingStream {
            target_service: service.into(),
            method: method.into(),
            source_agent_uri: "outrelay://demo/agent/0f8fad5b-d9cb-469f-a165-70867728950e".into(),
            stream_id: 7,
            ..Default::default()
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn provider_joins_with_half_close_and_rejects_404_and_502() {
        // Local target: reads to EOF first, then answers (so the answer proves half-close).
        let target = TcpListener::bind("127.0.0.1:0").await.expect("target");
        let target_addr = target.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = target.accept().await {
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    s.read_to_end(&mut got).await.expect("read");
                    s.write_all(format!("got {} bytes: ", got.len()).as_bytes())
                        .await
                        .expect("write");
                    s.write_all(&got).await.expect("echo");
                });
            }
        });
        let closed = TcpListener::bind("127.0.0.1:0").await.expect("closed");
        let closed_addr = closed.local_addr().expect("addr");
        drop(closed);
        let ctx = Arc::new(ctx_with(vec![ProvideSpec {
            service: "payments".into(),
            to: None,
            methods: BTreeMap::from([
                ("charge".into(), target_addr.to_string()),
                ("refund".into(), closed_addr.to_string()),
            ]),
            proxy_protocol: None,
        }]));
        let (_se, relay, _ce, agent) = quic_pair().await;
        tokio::spawn(serve_incoming(Arc::new(link(agent).0), ctx.clone()));

        // Joined: the first frame and raw bytes in ONE write, then FIN.
        let (mut send, mut recv) = relay.open_bi().await.expect("open");
        let mut first = encode(&incoming("payments", "charge"));
        first.extend_from_slice(b"early ");
        send.write_all(&first).await.expect("write");
        send.write_all(b"and late").await.expect("write");
        send.finish().expect("finish");
        let (answer, rest) = frame_and_rest(&mut recv).await;
        assert_eq!(answer, Frame::StreamAccept(orp::StreamAccept::default()));
        assert_eq!(rest, b"got 14 bytes: early and late");

        for (method, code) in [("refund", 502), ("other", 404)] {
            let (mut send, mut recv) = relay.open_bi().await.expect("open");
            send.write_all(&encode(&incoming("payments", method)))
                .await
                .expect("write");
            let (answer, rest) = frame_and_rest(&mut recv).await;
            let Frame::StreamReject(r) = answer else {
                panic!("{method}: {answer:?}");
            };
            assert_eq!(r.code, code, "{method}: {}", r.reason);
            assert!(rest.is_empty());
        }
        let (mut send, mut recv) = relay.open_bi().await.expect("open");
        send.write_all(&encode(&incoming("nobody", "")))
            .await
            .expect("write");
        let (answer, _) = frame_and_rest(&mut recv).await;
        assert!(matches!(answer, Frame::StreamReject(r) if r.code == 404));
        let m = &ctx.stats.mesh;
        assert_eq!(m.streams(MeshRole::Provider, MeshResult::Accepted), 1);
        assert_eq!(m.streams(MeshRole::Provider, MeshResult::Rejected404), 2);
        assert_eq!(m.streams(MeshRole::Provider, MeshResult::Rejected502), 1);
        assert_eq!(m.bytes(MeshRole::Provider, false), 14);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn consumer_opens_joins_and_closes_on_reject() {
        let ctx = Arc::new(ctx_with(Vec::new()));
        let spec = ConsumeSpec {
            service: "payments".into(),
            listen: "127.0.0.1:0".parse().expect("addr"),
            method: "charge".into(),
        };
        let mut bound = bind_consumers(std::slice::from_ref(&spec))
            .await
            .expect("bind");
        let local = bound.first().map(|b| b.2).expect("bound");
        // No relay yet: the local connection is closed and counted.
        let tasks = spawn_consumers(std::mem::take(&mut bound), &ctx);
        let mut c = TcpStream::connect(local).await.expect("connect");
        let mut got = Vec::new();
        let _ = c.read_to_end(&mut got).await;
        assert!(got.is_empty());
        assert_eq!(
            ctx.stats
                .mesh
                .streams(MeshRole::Consumer, MeshResult::NoRelay),
            1
        );

        let (_se, relay, _ce, agent) = quic_pair().await;
        ctx.set_connection(0, Some(link(agent).0));
        let relay_side = tokio::spawn({
            let relay = relay.clone();
            async move {
                // Accepted: OPEN_STREAM checked, STREAM_ACCEPT + raw bytes in one write.
                let (mut send, mut recv) = relay.accept_bi().await.expect("accept");
                let mut buf = BytesMut::new();
                let open = read_first_frame(&mut recv, &mut buf).await.expect("frame");
                let Frame::OpenStream(o) = open else {
                    panic!("{open:?}");
                };
                assert_eq!(
                    (o.target_service.as_str(), o.method.as_str()),
                    ("payments", "charge")
                );
                assert_ne!(o.stream_id, 0);
                let mut answer = encode(&Frame::StreamAccept(orp::StreamAccept::default()));
                answer.extend_from_slice(b"early ");
                send.write_all(&answer).await.expect("accept");
                let rest = recv.read_to_end(1 << 20).await.expect("to end");
                let mut all = buf.to_vec();
                all.extend_from_slice(&rest);
                assert_eq!(all, b"hello");
                // Half-close: the client's FIN arrived, its read side still works.
                send.write_all(b"world").await.expect("write");
                send.finish().expect("finish");
                // Rejected.
                let (mut send, mut recv) = relay.accept_bi().await.expect("accept");
                let mut buf = BytesMut::new();
                read_first_frame(&mut recv, &mut buf).await.expect("frame");
                let reject = Frame::StreamReject(orp::StreamReject {
                    code: 403,
                    reason: "caller-side: no matching rule".into(),
                    request_id: 0,
                });
                send.write_all(&encode(&reject)).await.expect("reject");
                send.finish().expect("finish");
                let _ = send.stopped().await;
            }
        });
        let mut c = TcpStream::connect(local).await.expect("connect");
        c.write_all(b"hello").await.expect("write");
        c.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"early world");

        let mut c = TcpStream::connect(local).await.expect("connect");
        let mut got = Vec::new();
        let _ = c.read_to_end(&mut got).await;
        assert!(got.is_empty());
        relay_side.await.expect("relay side");
        let m = &ctx.stats.mesh;
        assert_eq!(m.streams(MeshRole::Consumer, MeshResult::Accepted), 1);
        assert_eq!(m.streams(MeshRole::Consumer, MeshResult::Rejected403), 1);
        assert_eq!(m.bytes(MeshRole::Consumer, true), 5);
        assert_eq!(m.bytes(MeshRole::Consumer, false), 11);
        for t in tasks {
            t.abort();
        }
    }

    fn pattern(i: usize) -> u8 {
        u8::try_from(i % 251).unwrap_or_default()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn provider_moves_bulk_both_ways() {
        const BULK_BYTES: usize = 32 << 20;
        // Local target: echoes everything, half-closes after the client's FIN.
        let target = TcpListener::bind("127.0.0.1:0").await.expect("target");
        let target_addr = target.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut s, _) = target.accept().await.expect("accept");
            let (mut r, mut w) = s.split();
            tokio::io::copy(&mut r, &mut w).await.expect("echo");
            w.shutdown().await.expect("shutdown");
        });
        let ctx = Arc::new(ctx_with(vec![ProvideSpec {
            service: "bulk".into(),
            to: Some(target_addr.to_string()),
            methods: BTreeMap::new(),
            proxy_protocol: None,
        }]));
        let (_se, relay, _ce, agent) = quic_pair().await;
        tokio::spawn(serve_incoming(Arc::new(link(agent).0), ctx.clone()));
        let (mut send, mut recv) = relay.open_bi().await.expect("open");
        send.write_all(&encode(&incoming("bulk", "")))
            .await
            .expect("write");
        let started = std::time::Instant::now();
        let writer = tokio::spawn(async move {
            let block: Vec<u8> = (0..64 * 1024usize).map(pattern).collect();
            for _ in 0..BULK_BYTES / block.len() {
                send.write_all(&block).await.expect("write");
            }
            send.finish().expect("finish");
            let _ = send.stopped().await;
        });
        let (answer, echoed) = frame_and_rest(&mut recv).await;
        writer.await.expect("writer");
        let took = started.elapsed();
        assert_eq!(answer, Frame::StreamAccept(orp::StreamAccept::default()));
        assert_eq!(echoed.len(), BULK_BYTES);
        assert!(
            echoed
                .iter()
                .enumerate()
                .all(|(i, b)| *b == pattern(i % (64 * 1024)))
        );
        eprintln!(
            "{} MiB each way in {took:?} ({:.0} MiB/s each way)",
            BULK_BYTES >> 20,
            (BULK_BYTES >> 20) as f64 / took.as_secs_f64()
        );
    }
}
