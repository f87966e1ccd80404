//! Stream resume, the agent's half (orp.md "Resume"): a service stream that survives a relay
//! restart, a GOAWAY or a network change.
//!
//! A stream is resumable when both agents asked for `stream_resume` in their HELLO and the
//! relay said so (`IncomingStream.resume`, `StreamAccept.resume`); otherwise
//! [`crate::mesh::join`] carries it as before (Go agents, relays without resume).
//!
//! - **Ring.** Every chunk read from the local connection is kept (the same `Bytes` handed to
//!   quinn: no copy) until the peer acknowledges it. A ring holds at most `resume.ring_bytes`
//!   and all rings of the agent at most [`RING_BUDGET_BYTES`]: a full ring or budget stops
//!   reading the local connection (TCP backpressure), counted.
//! - **Checkpoints.** The receiving direction sends STREAM_CHECKPOINT{my_position = bytes sent,
//!   peer_ack_position = bytes received} on the relay connection's control stream every
//!   `resume.checkpoint_interval_ms` while bytes arrive, at every quarter ring, and at once on
//!   FIN. The relay forwards it to the peer, whose ring drops what it acknowledges. Checkpoints
//!   from the peer reach the stream through [`Registry::checkpoint`].
//! - **Resume.** When the relay stream fails (reset, connection lost), both directions stop at
//!   a byte boundary (no local write is ever cut in the middle), the stream waits for a relay
//!   connection (the control tasks reconnect with backoff and replay HELLO and REGISTER), opens
//!   a fresh stream with STREAM_RESUME{stream_id, positions, peer URI, service, method, role}
//!   and waits for the peer's STREAM_RESUME, which the relay sends once it has joined the two
//!   halves. The ring is retransmitted from the peer's acknowledged position; the peer does the
//!   same, so the local connection sees every byte once, in order. A position before the ring's
//!   tail means bytes are gone: the local connection is reset (the application's clear error),
//!   never fed a gap.
//! - **End.** A direction is done when its FIN went out AND the peer acknowledged every byte,
//!   so a relay that dies between our last byte and the peer's read still resumes it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use outrelay_proto::frame::Frame;
use outrelay_proto::orp;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::time::Instant;

use crate::config::ResumeConfig;
use crate::mesh::{
    FirstFrameError, Link, MeshCtx, QUIC_CHUNKS_PER_WRITE, STREAM_RESET_CODE, TCP_READ_BYTES,
    read_first_frame, write_chunks,
};
use crate::stats::{MeshRole, MeshStats, ResumeStats};

/// Bytes all rings of one agent may hold together; a sender past it waits (counted).
pub const RING_BUDGET_BYTES: usize = 1 << 30;
/// Stream reset code of the relay (`close_code::PEER_LOST`): the other agent's connection
/// ended, it may resume; every other code ends the stream for good.
pub const PEER_LOST_CODE: u32 = 17;
/// Pause between resume attempts (no relay connected, a refused or failed attempt).
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// STREAM_REJECT codes after which a resume is not tried again: the relay found it invalid
/// (400) or its policy denied it (403, except a relay still without its policy). Others (404
/// window expired or resume disabled, 409 the id still held by the old join or parked by
/// another pair, 429/503 caps) are retried until `resume.timeout_ms`.
const REJECT_INVALID: u32 = 400;
const REJECT_DENIED: u32 = 403;

fn count(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn as_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// What the control stream tells a resumable stream: the peer's acknowledged position.
#[derive(Debug, Default)]
pub struct Acks {
    peer_acked: AtomicU64,
    changed: Notify,
}

impl Acks {
    fn advance(&self, position: u64) {
        self.peer_acked.fetch_max(position, Ordering::Relaxed);
        self.changed.notify_one();
    }
}

/// The agent's resumable streams by stream id (touched once per stream and per received
/// checkpoint, never per byte), and the ring budget they share.
pub struct Registry {
    streams: Mutex<HashMap<u64, Arc<Acks>>>,
    budget: Semaphore,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            streams: Mutex::new(HashMap::new()),
            budget: Semaphore::new(RING_BUDGET_BYTES),
        }
    }
}

impl Registry {
    /// Registers stream `id`; `None` when the id is taken here already (the stream then runs
    /// without resume rather than mixing two streams' checkpoints).
    fn register(&self, id: u64) -> Option<Arc<Acks>> {
        let mut map = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
        if map.contains_key(&id) {
            return None;
        }
        let acks = Arc::new(Acks::default());
        map.insert(id, acks.clone());
        Some(acks)
    }

    fn unregister(&self, id: u64) {
        self.streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id);
    }

    /// A STREAM_CHECKPOINT from the peer (forwarded by the relay on the control stream).
    pub fn checkpoint(&self, c: &orp::StreamCheckpoint, stats: &ResumeStats) {
        count(&stats.checkpoints_received);
        let acks = self
            .streams
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&c.stream_id)
            .cloned();
        if let Some(acks) = acks {
            acks.advance(c.peer_ack_position);
        }
    }
}

/// The bytes sent and not yet acknowledged: `tail..head` in stream positions.
struct Ring<'a> {
    chunks: VecDeque<Bytes>,
    tail: u64,
    head: u64,
    cap_bytes: u64,
    budget: &'a Semaphore,
    held: &'a AtomicU64,
}

impl Ring<'_> {
    fn len(&self) -> u64 {
        self.head - self.tail
    }

    fn room(&self) -> usize {
        usize::try_from(self.cap_bytes.saturating_sub(self.len())).unwrap_or(usize::MAX)
    }

    /// Keeps `chunk` (its budget already taken).
    fn push(&mut self, chunk: Bytes) {
        self.head += as_u64(chunk.len());
        self.chunks.push_back(chunk);
    }

    /// Drops everything before `position` (clamped to `head`) and gives its budget back.
    fn ack(&mut self, position: u64) {
        let to = position.min(self.head);
        let freed = to.saturating_sub(self.tail);
        while self.tail < to {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            let len = as_u64(front.len());
            if self.tail + len <= to {
                self.tail += len;
                self.chunks.pop_front();
            } else {
                front.advance(usize::try_from(to - self.tail).unwrap_or(usize::MAX));
                self.tail = to;
            }
        }
        if freed > 0 {
            let n = usize::try_from(freed).unwrap_or(usize::MAX);
            self.budget.add_permits(n);
            self.held.fetch_sub(freed, Ordering::Relaxed);
        }
    }
}

impl Drop for Ring<'_> {
    fn drop(&mut self) {
        let left = self.len();
        self.budget
            .add_permits(usize::try_from(left).unwrap_or(usize::MAX));
        self.held.fetch_sub(left, Ordering::Relaxed);
    }
}

/// Why a resumable stream ended early.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    /// The local connection failed.
    #[error("local connection: {0}")]
    Local(std::io::Error),
    /// The relay ended the stream on purpose (policy cut, idle, the peer failed).
    #[error("ended by the relay: {0}")]
    Ended(String),
    /// No relay joined the stream again within `resume.timeout_ms`.
    #[error("not resumed within {0:?}")]
    Timeout(Duration),
    /// The relay refused the resume for good.
    #[error("relay refused the resume: {code} {reason}")]
    Refused {
        /// STREAM_REJECT code.
        code: u32,
        /// Its reason.
        reason: String,
    },
    /// The peer needs bytes this ring no longer holds (or claims positions that cannot be).
    #[error("stream lost: {0}")]
    Lost(String),
}

/// Who the stream is and what it was opened for (the STREAM_RESUME fields).
pub struct StreamInfo {
    /// The stream id the consumer chose.
    pub id: u64,
    /// This end.
    pub role: MeshRole,
    /// The other end's certificate URI.
    pub peer_uri: String,
    /// The service it was opened for.
    pub service: String,
    /// The method claimed.
    pub method: String,
}

/// One resumable stream's state across relay streams.
struct Stream<'a> {
    info: StreamInfo,
    cfg: &'a ResumeConfig,
    stats: &'a MeshStats,
    acks: Arc<Acks>,
    ring: Ring<'a>,
    /// Bytes received from the peer (and written, or being written, to the local side).
    received: u64,
    /// The local connection reached EOF (FIN owed to the peer after every retransmission).
    local_eof: bool,
    /// The peer's FIN arrived and the local write side is shut.
    peer_fin: bool,
    /// The relay stream carrying it now.
    link: Arc<Link>,
}

/// How one relay stream of a resumable stream ended.
enum Leg {
    /// Both directions ended and every byte sent is acknowledged.
    Done,
    /// The relay stream failed because a relay connection ended (ours: the connection error;
    /// the peer's: the relay's [`PEER_LOST_CODE`]): resume.
    Broken(String),
    /// The stream was ended on purpose (policy cut, idle timeout, the peer's local connection
    /// failed): reset the local connection, no resume.
    Ended(String),
    /// The local connection failed: reset everything.
    Local(std::io::Error),
}

impl Leg {
    fn read(e: quinn::ReadError) -> Leg {
        match e {
            quinn::ReadError::Reset(code) if code == PEER_LOST_CODE.into() => {
                Leg::Broken("the peer's relay connection ended".into())
            }
            quinn::ReadError::Reset(code) => Leg::Ended(format!("reset by the relay ({code})")),
            quinn::ReadError::ConnectionLost(e) => Leg::Broken(e.to_string()),
            other => Leg::Ended(other.to_string()),
        }
    }

    fn write(e: quinn::WriteError) -> Leg {
        match e {
            quinn::WriteError::Stopped(code) if code == PEER_LOST_CODE.into() => {
                Leg::Broken("the peer's relay connection ended".into())
            }
            quinn::WriteError::Stopped(code) => {
                Leg::Ended(format!("stopped by the relay ({code})"))
            }
            quinn::WriteError::ConnectionLost(e) => Leg::Broken(e.to_string()),
            other => Leg::Ended(other.to_string()),
        }
    }
}

/// Carries a resumable stream until it ends; resumes it as often as the relay breaks.
/// `early`: bytes from the relay that arrived behind the first frame.
#[allow(clippy::too_many_arguments)]
pub async fn join(
    ctx: &MeshCtx,
    link: Arc<Link>,
    info: StreamInfo,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    tcp: TcpStream,
    early: Bytes,
) {
    let stats = ctx.mesh_stats();
    let registry = ctx.resume_registry();
    let Some(acks) = registry.register(info.id) else {
        crate::mesh::join(send, recv, tcp, early, info.role, stats).await;
        return;
    };
    let cfg = &ctx.settings().resume;
    let id = info.id;
    let role = info.role;
    count(&stats.resume.resumable);
    stats.set_active(role, true);
    let mut s = Stream {
        info,
        cfg,
        stats,
        acks,
        ring: Ring {
            chunks: VecDeque::new(),
            tail: 0,
            head: 0,
            cap_bytes: as_u64(cfg.ring_bytes),
            budget: &registry.budget,
            held: &stats.resume.ring_bytes,
        },
        received: 0,
        local_eof: false,
        peer_fin: false,
        link,
    };
    let (mut tcp_r, mut tcp_w) = tcp.into_split();
    let mut early = early;
    let failed = loop {
        let leg = s
            .leg(&mut send, &mut recv, &mut tcp_r, &mut tcp_w, early)
            .await;
        match leg {
            Leg::Done => break None,
            Leg::Local(e) => break Some(ResumeError::Local(e)),
            Leg::Ended(why) => break Some(ResumeError::Ended(why)),
            Leg::Broken(why) => {
                let _ = send.reset(STREAM_RESET_CODE.into());
                let _ = recv.stop(STREAM_RESET_CODE.into());
                tracing::info!(stream_id = id, role = role.label(), reason = %why, "relay stream broken: resuming");
                stats.resume.resuming.fetch_add(1, Ordering::Relaxed);
                let resumed = s.resume(ctx).await;
                stats.resume.resuming.fetch_sub(1, Ordering::Relaxed);
                match resumed {
                    Ok((new_send, new_recv, rest)) => {
                        count(&stats.resume.resumed);
                        tracing::info!(
                            stream_id = id,
                            role = role.label(),
                            sent = s.ring.head,
                            received = s.received,
                            "stream resumed"
                        );
                        (send, recv, early) = (new_send, new_recv, rest);
                    }
                    Err(e) => break Some(e),
                }
            }
        }
    };
    registry.unregister(id);
    stats.set_active(role, false);
    if let Some(e) = failed {
        match &e {
            ResumeError::Lost(_) => count(&stats.resume.lost),
            ResumeError::Local(_) | ResumeError::Ended(_) => {}
            _ => count(&stats.resume.failed),
        }
        tracing::warn!(stream_id = id, role = role.label(), error = %e, "service stream failed: local connection reset");
        let _ = send.reset(STREAM_RESET_CODE.into());
        let _ = recv.stop(STREAM_RESET_CODE.into());
        // RST, not FIN: the application must not take a broken stream for a clean end.
        if let Ok(tcp) = tcp_r.reunite(tcp_w) {
            let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
        }
    }
}

impl Stream<'_> {
    /// Both directions over one relay stream, until done or broken. Neither direction is
    /// dropped in the middle of a local write: a failure raises `broken` and the other
    /// direction stops at its next wait.
    async fn leg(
        &mut self,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
        tcp_r: &mut OwnedReadHalf,
        tcp_w: &mut OwnedWriteHalf,
        early: Bytes,
    ) -> Leg {
        let (broken_tx, broken_rx) = watch::channel(false);
        let sent = AtomicU64::new(self.ring.head);
        let conn = self.link.conn.clone();
        let Stream {
            info,
            cfg,
            stats,
            acks,
            ring,
            received,
            local_eof,
            peer_fin,
            link,
        } = self;
        let up = Up {
            role: info.role,
            ring,
            acks,
            stats,
            local_eof,
            sent: &sent,
        }
        .run(send, tcp_r, broken_rx.clone(), &conn);
        let down = Down {
            id: info.id,
            role: info.role,
            cfg,
            stats,
            link,
            received,
            peer_fin,
            sent: &sent,
        }
        .run(recv, tcp_w, early, broken_rx);
        tokio::pin!(up, down);
        let (mut up_end, mut down_end) = (false, false);
        // The first failure; the other direction is then polled to its next wait, where it
        // sees `broken` and stops.
        let mut failed = None;
        while !(up_end && down_end) {
            let end = tokio::select! {
                end = &mut up, if !up_end => { up_end = true; end }
                end = &mut down, if !down_end => { down_end = true; end }
            };
            match end {
                Ok(()) => {}
                Err(Leg::Local(e)) => return Leg::Local(e),
                Err(leg) => {
                    if failed.is_none() {
                        let _ = broken_tx.send(true);
                        failed = Some(leg);
                    }
                }
            }
        }
        failed.unwrap_or(Leg::Done)
    }

    /// Waits for a relay, sends STREAM_RESUME, reads the peer's, retransmits the ring.
    async fn resume(
        &mut self,
        ctx: &MeshCtx,
    ) -> Result<(quinn::SendStream, quinn::RecvStream, Bytes), ResumeError> {
        let deadline = Instant::now() + self.cfg.timeout;
        loop {
            if Instant::now() >= deadline {
                return Err(ResumeError::Timeout(self.cfg.timeout));
            }
            // Another relay than the one this stream lost, while one is up.
            let Some(link) = ctx.link_except(Some(&self.link)) else {
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            };
            let attempt = tokio::time::timeout_at(deadline, self.attempt(&link)).await;
            match attempt {
                Err(_) => return Err(ResumeError::Timeout(self.cfg.timeout)),
                Ok(Ok(streams)) => {
                    self.link = link;
                    return Ok(streams);
                }
                Ok(Err(Attempt::Fatal(e))) => return Err(e),
                Ok(Err(Attempt::Retry(why))) => {
                    tracing::debug!(stream_id = self.info.id, reason = %why, "resume attempt failed: retrying");
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        }
    }

    async fn attempt(
        &mut self,
        link: &Link,
    ) -> Result<(quinn::SendStream, quinn::RecvStream, Bytes), Attempt> {
        let retry = |e: &dyn std::fmt::Display| Attempt::Retry(e.to_string());
        let (mut send, mut recv) = link.conn.open_bi().await.map_err(|e| retry(&e))?;
        let mine = Frame::StreamResume(orp::StreamResume {
            stream_id: self.info.id,
            my_position: self.ring.head,
            peer_ack_position: self.received,
            peer_agent_uri: self.info.peer_uri.clone(),
            target_service: self.info.service.clone(),
            method: self.info.method.clone(),
            consumer: self.info.role == MeshRole::Consumer,
        });
        let bytes = mine.to_vec().map_err(|e| retry(&e))?;
        send.write_all(&bytes).await.map_err(|e| retry(&e))?;
        let mut buf = BytesMut::new();
        let peer = match read_first_frame(&mut recv, &mut buf).await {
            Ok(Frame::StreamResume(p)) => p,
            Ok(Frame::StreamReject(r)) => {
                // A relay that restarted may refuse until its policy snapshot arrives.
                let waiting_for_policy = r.reason.contains("no policy snapshot");
                let temporary =
                    r.code != REJECT_INVALID && (r.code != REJECT_DENIED || waiting_for_policy);
                if temporary {
                    return Err(Attempt::Retry(format!("{} {}", r.code, r.reason)));
                }
                return Err(Attempt::Fatal(ResumeError::Refused {
                    code: r.code,
                    reason: r.reason,
                }));
            }
            Ok(other) => {
                return Err(Attempt::Retry(format!(
                    "relay answered {}",
                    other.frame_type().name()
                )));
            }
            Err(FirstFrameError::Frame(e)) => return Err(retry(&e)),
            Err(e) => return Err(retry(&e)),
        };
        if peer.stream_id != self.info.id || peer.peer_agent_uri != self.info.peer_uri {
            return Err(Attempt::Fatal(ResumeError::Lost(format!(
                "the relay joined stream {} of {} instead of {} of {}",
                peer.stream_id, peer.peer_agent_uri, self.info.id, self.info.peer_uri
            ))));
        }
        // What the peer received of ours must lie inside the ring; what it sent must cover
        // what we received (it retransmits from there).
        if peer.peer_ack_position < self.ring.tail || peer.peer_ack_position > self.ring.head {
            return Err(Attempt::Fatal(ResumeError::Lost(format!(
                "the peer received {} bytes but this ring holds {}..{}",
                peer.peer_ack_position, self.ring.tail, self.ring.head
            ))));
        }
        if peer.my_position < self.received {
            return Err(Attempt::Fatal(ResumeError::Lost(format!(
                "the peer sent {} bytes but {} were received here",
                peer.my_position, self.received
            ))));
        }
        self.acks.advance(peer.peer_ack_position);
        self.ring.ack(peer.peer_ack_position);
        let mut again: u64 = 0;
        for chunk in &self.ring.chunks {
            again += as_u64(chunk.len());
            send.write_chunk(chunk.clone())
                .await
                .map_err(|e| retry(&e))?;
        }
        self.stats
            .resume
            .retransmitted_bytes
            .fetch_add(again, Ordering::Relaxed);
        if self.local_eof {
            send.finish().map_err(|e| retry(&e))?;
        }
        Ok((send, recv, buf.freeze()))
    }
}

/// Why one resume attempt did not join.
enum Attempt {
    Retry(String),
    Fatal(ResumeError),
}

/// Local connection to relay stream, keeping every chunk in the ring.
struct Up<'s, 'r> {
    role: MeshRole,
    ring: &'s mut Ring<'r>,
    acks: &'s Acks,
    stats: &'s MeshStats,
    local_eof: &'s mut bool,
    sent: &'s AtomicU64,
}

/// Resolves when the leg is declared broken (never when the sender is gone).
async fn broken(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|b| *b).await.is_err() {
        std::future::pending::<()>().await;
    }
}

impl Up<'_, '_> {
    async fn run(
        self,
        send: &mut quinn::SendStream,
        tcp_r: &mut OwnedReadHalf,
        mut stop: watch::Receiver<bool>,
        conn: &quinn::Connection,
    ) -> Result<(), Leg> {
        let Up {
            role,
            ring,
            acks,
            stats,
            local_eof,
            sent,
        } = self;
        let mut buf = BytesMut::with_capacity(TCP_READ_BYTES);
        let mut full_counted = false;
        // Once the relay has every byte and the FIN, `stopped` resolves with nothing to say.
        let mut watch_stopped = true;
        loop {
            ring.ack(acks.peer_acked.load(Ordering::Relaxed));
            if *local_eof {
                if ring.len() == 0 {
                    return Ok(());
                }
                // FIN sent: wait for the peer's last acknowledgement.
                tokio::select! {
                    () = acks.changed.notified() => {}
                    () = broken(&mut stop) => return Err(Leg::Broken("other direction failed".into())),
                    e = conn.closed() => return Err(Leg::Broken(e.to_string())),
                    s = send.stopped(), if watch_stopped => match s {
                        Ok(None) => watch_stopped = false,
                        Ok(Some(code)) => return Err(Leg::write(quinn::WriteError::Stopped(code))),
                        Err(quinn::StoppedError::ConnectionLost(e)) => return Err(Leg::Broken(e.to_string())),
                        Err(e) => return Err(Leg::Ended(e.to_string())),
                    },
                }
                continue;
            }
            let room = ring.room();
            if room == 0 {
                if !full_counted {
                    count(&stats.resume.ring_full);
                    full_counted = true;
                }
                tokio::select! {
                    () = acks.changed.notified() => {}
                    () = broken(&mut stop) => return Err(Leg::Broken("other direction failed".into())),
                    e = conn.closed() => return Err(Leg::Broken(e.to_string())),
                }
                continue;
            }
            full_counted = false;
            if buf.capacity() - buf.len() < TCP_READ_BYTES / 8 {
                buf.reserve(TCP_READ_BYTES);
            }
            let want = room.min(buf.capacity() - buf.len()).max(1);
            let n = {
                let mut limited = (&mut buf).limit(want);
                tokio::select! {
                    r = tcp_r.read_buf(&mut limited) => r.map_err(Leg::Local)?,
                    () = broken(&mut stop) => return Err(Leg::Broken("other direction failed".into())),
                }
            };
            if n == 0 {
                *local_eof = true;
                if send.finish().is_err() {
                    // Already reset: the connection state says which kind of end it was.
                    return Err(conn.close_reason().map_or_else(
                        || Leg::Ended("stream closed under the writer".into()),
                        |e| Leg::Broken(e.to_string()),
                    ));
                }
                continue;
            }
            let chunk = buf.split().freeze();
            let permits = u32::try_from(n).unwrap_or(u32::MAX);
            match ring.budget.try_acquire_many(permits) {
                Ok(p) => p.forget(),
                Err(_) => {
                    count(&stats.resume.budget_full);
                    match ring.budget.acquire_many(permits).await {
                        Ok(p) => p.forget(),
                        Err(_) => {
                            return Err(Leg::Local(std::io::Error::other("ring budget closed")));
                        }
                    }
                }
            }
            ring.held.fetch_add(as_u64(n), Ordering::Relaxed);
            ring.push(chunk.clone());
            sent.store(ring.head, Ordering::Relaxed);
            stats.add_bytes(role, true, as_u64(n));
            tokio::select! {
                r = send.write_chunk(chunk) => r.map_err(Leg::write)?,
                () = broken(&mut stop) => return Err(Leg::Broken("other direction failed".into())),
            }
        }
    }
}

/// Relay stream to local connection, acknowledging what arrived.
struct Down<'s> {
    id: u64,
    role: MeshRole,
    cfg: &'s ResumeConfig,
    stats: &'s MeshStats,
    link: &'s Link,
    received: &'s mut u64,
    peer_fin: &'s mut bool,
    sent: &'s AtomicU64,
}

impl Down<'_> {
    async fn run(
        self,
        recv: &mut quinn::RecvStream,
        tcp_w: &mut OwnedWriteHalf,
        early: Bytes,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), Leg> {
        let quarter = as_u64(self.cfg.ring_bytes / 4).max(1);
        let mut acked = *self.received;
        let mut next_tick = Instant::now() + self.cfg.checkpoint_interval;
        if !early.is_empty() {
            tcp_w.write_all(&early).await.map_err(Leg::Local)?;
            *self.received += as_u64(early.len());
            self.stats.add_bytes(self.role, false, as_u64(early.len()));
        }
        let mut chunks: [Bytes; QUIC_CHUNKS_PER_WRITE] = Default::default();
        loop {
            let dirty = *self.received != acked;
            let read = tokio::select! {
                r = recv.read_chunks(&mut chunks) => r,
                () = broken(&mut stop) => return Err(Leg::Broken("other direction failed".into())),
                () = tokio::time::sleep_until(next_tick), if dirty => {
                    acked = self.checkpoint(acked);
                    next_tick = Instant::now() + self.cfg.checkpoint_interval;
                    continue;
                }
            };
            match read {
                Ok(Some(n)) => {
                    let got = chunks.get_mut(..n).unwrap_or_default();
                    let len = as_u64(got.iter().map(Bytes::len).sum());
                    *self.received += len;
                    write_chunks(tcp_w, got).await.map_err(Leg::Local)?;
                    self.stats.add_bytes(self.role, false, len);
                    let now = Instant::now();
                    if *self.received - acked >= quarter || now >= next_tick {
                        acked = self.checkpoint(acked);
                        next_tick = now + self.cfg.checkpoint_interval;
                    }
                }
                Ok(None) => {
                    if !*self.peer_fin {
                        tcp_w.shutdown().await.map_err(Leg::Local)?;
                        *self.peer_fin = true;
                    }
                    // At once: the peer ends its stream only when everything is acknowledged.
                    self.checkpoint(acked);
                    return Ok(());
                }
                Err(e) => return Err(Leg::read(e)),
            }
        }
    }

    /// Queues STREAM_CHECKPOINT on the control stream; returns the position acknowledged so
    /// far (unchanged when the queue was full: the next tick tries again).
    fn checkpoint(&self, acked: u64) -> u64 {
        let frame = Frame::StreamCheckpoint(orp::StreamCheckpoint {
            stream_id: self.id,
            my_position: self.sent.load(Ordering::Relaxed),
            peer_ack_position: *self.received,
        });
        if self.link.control.try_send(frame).is_ok() {
            count(&self.stats.resume.checkpoints_sent);
            *self.received
        } else {
            count(&self.stats.resume.checkpoints_dropped);
            acked
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use crate::config::ProvideSpec;
    use crate::mesh::tests::{encode, link, quic_pair, settings_with};
    use crate::mesh::{FIRST_FRAME_MAX_BYTES, serve_incoming};
    use crate::stats::Stats;
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    const PEER: &str = "outrelay://demo/agent/0f8fad5b-d9cb-469f-a165-70867728950e";
    const ID: u64 = 77;

    fn incoming() -> Frame {
        Frame::IncomingStream(orp::IncomingStream {
            target_service: "svc".into(),
            method: "m".into(),
            source_agent_uri: PEER.into(),
            stream_id: ID,
            resume: true,
        })
    }

    fn ack(ctx: &MeshCtx, position: u64) {
        ctx.checkpoint(&orp::StreamCheckpoint {
            stream_id: ID,
            my_position: 0,
            peer_ack_position: position,
        });
    }

    async fn read_exact(recv: &mut quinn::RecvStream, n: usize) -> Vec<u8> {
        let mut got = vec![0u8; n];
        recv.read_exact(&mut got).await.expect("read");
        got
    }

    /// The agent as a provider with `ring_bytes`, a local target the test drives, and the
    /// test playing the relay: (ctx, relay connection, control frames from the agent, the
    /// relay's stream, the target's connection).
    async fn provider(
        ring_bytes: usize,
    ) -> (
        Arc<MeshCtx>,
        quinn::Connection,
        mpsc::Receiver<Frame>,
        (quinn::SendStream, quinn::RecvStream),
        TcpStream,
        Vec<quinn::Endpoint>,
    ) {
        let target = TcpListener::bind("127.0.0.1:0").await.expect("target");
        let mut settings = settings_with(vec![ProvideSpec {
            service: "svc".into(),
            to: Some(target.local_addr().expect("addr").to_string()),
            methods: BTreeMap::new(),
            proxy_protocol: None,
        }]);
        settings.resume.ring_bytes = ring_bytes;
        settings.resume.timeout = Duration::from_secs(20);
        let ctx = Arc::new(MeshCtx::new(Arc::new(settings), Arc::new(Stats::default())));
        let (se, relay, ce, agent) = quic_pair().await;
        let (l, control) = link(agent.clone());
        let l = Arc::new(l);
        ctx.set_connection(0, Some(Link::new(agent, l.control.clone(), 0)));
        tokio::spawn(serve_incoming(l, ctx.clone()));
        let (mut send, mut recv) = relay.open_bi().await.expect("open");
        send.write_all(&encode(&incoming())).await.expect("write");
        let mut buf = BytesMut::new();
        let answer = read_first_frame(&mut recv, &mut buf).await.expect("answer");
        assert!(matches!(answer, Frame::StreamAccept(_)), "{answer:?}");
        let (local, _) = target.accept().await.expect("accept");
        (ctx, relay, control, (send, recv), local, vec![se, ce])
    }

    /// The STREAM_RESUME the agent sends on its fresh stream after a break.
    async fn agent_resume(
        relay: &quinn::Connection,
    ) -> (quinn::SendStream, quinn::RecvStream, orp::StreamResume) {
        let (send, mut recv) = relay.accept_bi().await.expect("resume stream");
        let mut buf = BytesMut::new();
        let f = read_first_frame(&mut recv, &mut buf).await.expect("frame");
        let Frame::StreamResume(r) = f else {
            panic!("{f:?}");
        };
        assert!(
            buf.is_empty(),
            "nothing behind STREAM_RESUME before the peer's"
        );
        (send, recv, r)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_broken_stream_resumes_without_losing_or_repeating_a_byte() {
        let (ctx, relay, mut control, (mut send, mut recv), mut local, _eps) =
            provider(1 << 20).await;
        send.write_all(b"aaaa").await.expect("write");
        let mut got = [0u8; 4];
        local.read_exact(&mut got).await.expect("local read");
        assert_eq!(&got, b"aaaa");
        local.write_all(b"bbbb").await.expect("local write");
        assert_eq!(read_exact(&mut recv, 4).await, b"bbbb");
        // The agent acknowledges what it received on the control stream.
        loop {
            match control.recv().await.expect("control") {
                Frame::StreamCheckpoint(c) if c.peer_ack_position == 4 => {
                    assert_eq!((c.stream_id, c.my_position), (ID, 4));
                    break;
                }
                Frame::StreamCheckpoint(_) => {}
                other => panic!("{other:?}"),
            }
        }
        // The peer acknowledged 2 of the agent's 4 bytes; then the relay stream breaks.
        ack(&ctx, 2);
        let _ = send.reset(PEER_LOST_CODE.into());
        let _ = recv.stop(PEER_LOST_CODE.into());
        let (mut send, mut recv, mine) = agent_resume(&relay).await;
        assert_eq!(
            (mine.stream_id, mine.my_position, mine.peer_ack_position),
            (ID, 4, 4)
        );
        assert_eq!(mine.peer_agent_uri, PEER);
        assert_eq!(
            (
                mine.target_service.as_str(),
                mine.method.as_str(),
                mine.consumer
            ),
            ("svc", "m", false)
        );
        // The peer: it sent 6 (the agent got 4, so "cc" follows), it received 2 of ours.
        let mut answer = encode(&Frame::StreamResume(orp::StreamResume {
            stream_id: ID,
            my_position: 6,
            peer_ack_position: 2,
            peer_agent_uri: PEER.into(),
            ..Default::default()
        }));
        answer.extend_from_slice(b"cc");
        send.write_all(&answer).await.expect("write");
        // The ring from position 2: "bb" again, once.
        assert_eq!(read_exact(&mut recv, 2).await, b"bb");
        let mut got = [0u8; 2];
        local.read_exact(&mut got).await.expect("local read");
        assert_eq!(&got, b"cc");
        local.write_all(b"dd").await.expect("local write");
        assert_eq!(read_exact(&mut recv, 2).await, b"dd");
        send.finish().expect("finish");
        let mut rest = Vec::new();
        local.read_to_end(&mut rest).await.expect("local eof");
        assert!(rest.is_empty(), "{rest:?}");
        local.shutdown().await.expect("shutdown");
        assert!(recv.read_to_end(1 << 20).await.expect("fin").is_empty());
        // The stream ends once the peer acknowledged everything (6 bytes).
        ack(&ctx, 6);
        let r = &ctx.mesh_stats().resume;
        for _ in 0..100 {
            if ctx.mesh_stats().active(MeshRole::Provider) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(ctx.mesh_stats().active(MeshRole::Provider), 0);
        assert_eq!(r.resumed.load(Ordering::Relaxed), 1);
        assert_eq!(r.retransmitted_bytes.load(Ordering::Relaxed), 2);
        assert_eq!(r.ring_bytes.load(Ordering::Relaxed), 0);
        assert_eq!(r.lost.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_position_before_the_ring_is_a_clear_error_never_a_gap() {
        let (ctx, relay, _control, (mut send, mut recv), mut local, _eps) = provider(1 << 20).await;
        local.write_all(b"0123456789").await.expect("local write");
        assert_eq!(read_exact(&mut recv, 10).await, b"0123456789");
        ack(&ctx, 6);
        // Give the ack to the ring (it trims before each read of the local connection).
        local.write_all(b"x").await.expect("local write");
        assert_eq!(read_exact(&mut recv, 1).await, b"x");
        let _ = send.reset(PEER_LOST_CODE.into());
        let (mut send, _recv, mine) = agent_resume(&relay).await;
        assert_eq!(mine.my_position, 11);
        // The peer claims it received only 3: bytes 3..6 are no longer in the ring.
        send.write_all(&encode(&Frame::StreamResume(orp::StreamResume {
            stream_id: ID,
            my_position: 0,
            peer_ack_position: 3,
            peer_agent_uri: PEER.into(),
            ..Default::default()
        })))
        .await
        .expect("write");
        let mut rest = Vec::new();
        let read = local.read_to_end(&mut rest).await;
        let err = read.expect_err("the application sees a reset, not an end");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
        assert!(rest.is_empty());
        assert_eq!(ctx.mesh_stats().resume.lost.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deliberate_reset_ends_the_stream_without_a_resume() {
        let (ctx, relay, _control, (mut send, mut recv), mut local, _eps) = provider(1 << 20).await;
        local.write_all(b"abc").await.expect("local write");
        assert_eq!(read_exact(&mut recv, 3).await, b"abc");
        // The relay's policy cut (close_code::POLICY_CUT): no STREAM_RESUME may follow.
        let _ = send.reset(10u32.into());
        let _ = recv.stop(10u32.into());
        let mut rest = Vec::new();
        let err = local.read_to_end(&mut rest).await.expect_err("reset");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
        let opened = tokio::time::timeout(Duration::from_millis(300), relay.accept_bi()).await;
        assert!(
            opened.is_err(),
            "a resume was tried after a deliberate reset"
        );
        let r = &ctx.mesh_stats().resume;
        assert_eq!(
            r.resumed.load(Ordering::Relaxed) + r.failed.load(Ordering::Relaxed),
            0
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_ring_stops_reading_until_the_peer_acknowledges() {
        const RING: usize = 64 * 1024;
        const TOTAL: usize = 1 << 20;
        let (ctx, _relay, _control, (_send, mut recv), mut local, _eps) = provider(RING).await;
        let writer = tokio::spawn(async move {
            let block = vec![7u8; 16 * 1024];
            for _ in 0..TOTAL / block.len() {
                local.write_all(&block).await.expect("local write");
            }
            local
        });
        assert_eq!(read_exact(&mut recv, RING).await.len(), RING);
        // Nothing past the ring until an acknowledgement (a bounded wait for bytes that must
        // not come: passes only if the ring really blocks).
        let mut one = [0u8; 1];
        let more = tokio::time::timeout(Duration::from_millis(300), recv.read(&mut one)).await;
        assert!(more.is_err(), "bytes past a full ring: {more:?}");
        let r = &ctx.mesh_stats().resume;
        assert!(r.ring_full.load(Ordering::Relaxed) >= 1);
        assert_eq!(r.ring_bytes.load(Ordering::Relaxed), RING as u64);
        // Acknowledge as it goes: everything arrives.
        let mut total = RING;
        let mut buf = vec![0u8; FIRST_FRAME_MAX_BYTES];
        while total < TOTAL {
            ack(&ctx, total as u64);
            let n = recv.read(&mut buf).await.expect("read").expect("open");
            total += n;
        }
        assert_eq!(total, TOTAL);
        drop(writer.await.expect("writer"));
    }
}
