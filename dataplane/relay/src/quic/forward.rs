//! Forwarded streams (issue 22): a consumer here whose provider is on another relay, and the
//! other relay's side of it.
//!
//! - **Relay A** (the consumer's), in [`open_remote`]: after its caller-side decision, takes a
//!   slot toward the peer relay ([`crate::forward::Peers`]), opens a stream on the pooled
//!   connection, sends FORWARD_STREAM{IncomingStream} and waits for the one answer; the
//!   consumer gets what it would get from a local provider, then the two streams are joined
//!   like local ones (recheck, idle timeout, bandwidth).
//! - **Relay B** (the provider's), in [`serve_relay`]: a connection whose certificate has role
//!   `relay` may only open streams starting with FORWARD_STREAM, and one checkpoint lane
//!   (anything else is a protocol error, counted). B takes the tenant from the strictly parsed
//!   `source_agent_uri`, runs the callee-side decision, resolves LOCAL providers only (a
//!   forwarded stream is never forwarded again), sends INCOMING_STREAM, relays the answer and
//!   joins.
//!
//! Both audit rows name the two relays in their reason ([`audit_prefix`]).
//!
//! **Resume across the hop.** A forwarded stream is resumable when the consumer asked for it
//! (A puts the consumer's capability in FORWARD_STREAM's `resume`), B and the provider agree
//! (B's STREAM_ACCEPT says what was agreed), and both relays have resume enabled; A tells the
//! consumer in its STREAM_ACCEPT. Go agents and agents without resume get `resume = false` as
//! before. The agents' STREAM_CHECKPOINTs cross the hop on **checkpoint lanes** ([`Lanes`]):
//! per relay connection, each relay opens (lazily) one unidirectional QUIC stream toward the
//! other and writes STREAM_CHECKPOINT frames on it (the far end of a forwarded pair has the
//! lane as its control queue, bounded by [`LANE_QUEUE_MAX`]; full: dropped and counted by the
//! signal counters). The receiving relay routes each by `stream_id` to the local end of the
//! joined pair whose far end is on that relay ([`crate::mesh::Mesh::joined_via`]); a
//! checkpoint for a stream it does not share with that relay, or for a full control queue, is
//! dropped and counted (`outrelay_relay_forward_checkpoints_total{result}`). When a relay of
//! the pair dies, the hop's ConnectionLost resets the surviving agent's half with PEER_LOST
//! (17) and both agents resume on the relay they (re)connect to, where the halves meet.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use outrelay_proto::fields::valid_method;
use outrelay_proto::frame::{Decoded, Frame, decode_limited};
use outrelay_proto::identity::Identity;
use outrelay_proto::orp;
use tokio::sync::mpsc;

use super::streams::{
    Answer, FirstFrame, Halves, Pair, Peer, StreamIdGuard, accept_consumer, callee_decision,
    first_frame, join_pair, local_peer, open_answered, reject, write_frame,
};
use super::{Ctx, close_code};
use crate::forward::{CheckpointOutcome, Peers, Refusal};
use crate::mesh::policy::Verdict;
use crate::mesh::{AuditRow, Mesh, MeshResult, PairEnd, Resolved, valid_service_name};

/// The audit reason prefix of a forwarded stream's decisions: `forward <from>-><to> `.
pub(super) fn audit_prefix(from_relay: &str, to_relay: &str) -> String {
    format!("forward {from_relay}->{to_relay} ")
}

/// Where the registry places the provider.
pub(super) struct Remote {
    pub(super) relay_id: String,
    pub(super) endpoint: String,
    pub(super) agent_uri: String,
}

/// The consumer's stream, past its caller-side decision.
pub(super) struct Opened<'a> {
    pub(super) consumer: &'a Peer,
    pub(super) send: quinn::SendStream,
    pub(super) recv: quinn::RecvStream,
    pub(super) consumer_rest: Bytes,
    pub(super) id: u64,
    pub(super) service: &'a str,
    pub(super) method: &'a str,
    pub(super) verdict: Verdict,
    pub(super) changes: tokio::sync::watch::Receiver<u64>,
}

/// Checkpoints queued toward one relay connection's lane; a full lane drops (counted as
/// `peer_queue_full` by the signal counters; the next checkpoint says it all again).
pub(super) const LANE_QUEUE_MAX: usize = 1024;
/// Unidirectional streams a relay connection may open toward this relay: its one lane.
pub(super) const LANE_STREAMS: u32 = 1;
/// Largest frame payload on a lane (a STREAM_CHECKPOINT is three varints, at most 33 bytes).
const LANE_FRAME_MAX_BYTES: u32 = 64;
/// Bytes read per call from a lane.
const LANE_READ_BYTES: usize = 4096;

/// The checkpoint lanes of this relay's relay connections (outbound pooled ones and inbound
/// ones), by connection. A std mutex, touched once per forwarded stream, never per byte.
#[derive(Default)]
pub(crate) struct Lanes {
    by_conn: Mutex<HashMap<usize, mpsc::Sender<Frame>>>,
}

impl Lanes {
    /// The lane toward the relay `peer` at the other end of `conn`: on first use, starts its
    /// writer (one unidirectional stream, opened with the first checkpoint) and the reader of
    /// the peer's lane. Weak: it lives as long as the connection.
    pub(super) fn lane(
        &self,
        conn: &quinn::Connection,
        peer: &Arc<str>,
        ctx: &Arc<Ctx>,
    ) -> mpsc::WeakSender<Frame> {
        let mut map = self.by_conn.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(tx) = map.get(&conn.stable_id()) {
            return tx.downgrade();
        }
        let (tx, rx) = mpsc::channel(LANE_QUEUE_MAX);
        let weak = tx.downgrade();
        map.insert(conn.stable_id(), tx);
        drop(map);
        tokio::spawn(write_lane(conn.clone(), rx, peer.clone(), ctx.clone()));
        tokio::spawn(read_lanes(conn.clone(), peer.clone(), ctx.clone()));
        weak
    }

    fn remove(&self, conn: &quinn::Connection) {
        self.by_conn
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&conn.stable_id());
    }
}

/// Writes the checkpoints queued for `peer` on one unidirectional stream of `conn`, until the
/// connection ends (the lane is forgotten then).
async fn write_lane(
    conn: quinn::Connection,
    mut rx: mpsc::Receiver<Frame>,
    peer: Arc<str>,
    ctx: Arc<Ctx>,
) {
    let mut send: Option<quinn::SendStream> = None;
    let mut bytes = Vec::new();
    loop {
        let frame = tokio::select! {
            f = rx.recv() => f,
            _ = conn.closed() => None,
        };
        let Some(frame) = frame else { break };
        // Only checkpoints reach a lane (candidates of forwarded streams are refused as
        // P2P-forbidden, STREAM_READY goes to local ends only).
        if !matches!(frame, Frame::StreamCheckpoint(_)) {
            continue;
        }
        let lane = match send.as_mut() {
            Some(s) => s,
            None => match conn.open_uni().await {
                Ok(s) => send.insert(s),
                Err(_) => break,
            },
        };
        bytes.clear();
        if frame.encode(&mut bytes).is_err() || lane.write_all(&bytes).await.is_err() {
            break;
        }
        if let Some(peers) = ctx.forward.get() {
            peers.stats.checkpoint(CheckpointOutcome::Sent, &peer);
        }
    }
    ctx.lanes.remove(&conn);
}

/// Accepts the peer's lane(s) on `conn` (at most [`LANE_STREAMS`] at once).
async fn read_lanes(conn: quinn::Connection, peer: Arc<str>, ctx: Arc<Ctx>) {
    while let Ok(recv) = conn.accept_uni().await {
        tokio::spawn(read_lane(recv, peer.clone(), ctx.clone()));
    }
}

/// Reads one lane of `peer`: STREAM_CHECKPOINT frames only (anything else, or a frame over
/// [`LANE_FRAME_MAX_BYTES`], is a protocol error: counted, the lane stopped).
async fn read_lane(mut recv: quinn::RecvStream, peer: Arc<str>, ctx: Arc<Ctx>) {
    let (Some(peers), Some(mesh)) = (ctx.forward.get(), ctx.mesh.get()) else {
        let _ = recv.stop(close_code::STREAM_UNSUPPORTED.into());
        return;
    };
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; LANE_READ_BYTES];
    loop {
        // `Some(Some(c))`: a checkpoint; `Some(None)`: anything else; `None`: read more.
        let decoded = match decode_limited(&buf, LANE_FRAME_MAX_BYTES) {
            Ok(Decoded::Frame { frame, used }) => match Frame::decode(&frame) {
                Ok(Frame::StreamCheckpoint(c)) => Some(Some((c, used))),
                _ => Some(None),
            },
            Ok(Decoded::NeedMore { .. }) => None,
            Err(_) => Some(None),
        };
        match decoded {
            Some(Some((c, used))) => {
                buf.advance(used);
                let outcome = deliver(mesh, &peer, c);
                peers.stats.checkpoint(outcome, &peer);
            }
            Some(None) => {
                peers.stats.refuse(Refusal::ProtocolError, &peer);
                mesh.stats.count(MeshResult::ProtocolError);
                tracing::debug!(peer = %peer, "checkpoint lane carried something else");
                let _ = recv.stop(close_code::PROTOCOL_ERROR.into());
                return;
            }
            None => match recv.read(&mut chunk).await {
                Ok(Some(n)) => buf.extend_from_slice(chunk.get(..n).unwrap_or_default()),
                Ok(None) | Err(_) => return,
            },
        }
    }
}

/// Puts a checkpoint from `peer` on the control queue of the local end of the joined pair
/// whose far end is on `peer`.
fn deliver(mesh: &Mesh, peer: &str, c: orp::StreamCheckpoint) -> CheckpointOutcome {
    let Some(pair) = mesh.joined_via(c.stream_id, peer) else {
        return CheckpointOutcome::NoPair;
    };
    let Some((_, local)) = pair.remote_end() else {
        return CheckpointOutcome::NoPair;
    };
    match local.control.upgrade() {
        Some(to) if to.try_send(Frame::StreamCheckpoint(c)).is_ok() => CheckpointOutcome::Delivered,
        _ => CheckpointOutcome::QueueFull,
    }
}

/// The STREAM_REJECT code of a peer relay as this relay's result (the consumer sees the code
/// the peer gave; anything unknown is 502).
fn result_of(code: u32) -> MeshResult {
    match code {
        400 => MeshResult::Invalid,
        403 => MeshResult::Denied,
        404 => MeshResult::NotFound,
        409 => MeshResult::Collision,
        429 => MeshResult::TenantLimit,
        503 => MeshResult::ProviderRejected,
        _ => MeshResult::Unreachable,
    }
}

/// Relay A: forwards the consumer's stream to the relay the registry names, answers the
/// consumer and joins the two streams.
pub(super) async fn open_remote(o: Opened<'_>, remote: Remote, mesh: &Mesh, ctx: &Arc<Ctx>) {
    let Opened {
        consumer,
        mut send,
        recv,
        consumer_rest,
        id,
        service,
        method,
        verdict,
        changes,
    } = o;
    let peer = remote.relay_id.as_str();
    let Some(peers) = ctx.forward.get() else {
        let why = format!("provider of {service} is on relay {peer}; forwarding is not served");
        return reject(send, recv, mesh, MeshResult::Unreachable, why).await;
    };
    // Bounds first: per peer, then in all (named refusals, counted by the pool).
    let _slot = match peers.stream_slot(peer, &consumer.tenant) {
        Ok(slot) => slot,
        Err(r) => {
            let why = format!("forwarding to relay {peer} refused: {r}");
            let result = match r {
                Refusal::PeerStreamsFull(_)
                | Refusal::TenantStreamsFull(_)
                | Refusal::StreamsFull(_) => MeshResult::TenantLimit,
                _ => MeshResult::Unreachable,
            };
            return reject(send, recv, mesh, result, why).await;
        }
    };
    let conn = match peers.connection(peer, &remote.endpoint).await {
        Ok(c) => c,
        Err(e) => {
            let why = format!("peer relay {peer} unreachable: {e}");
            return reject(send, recv, mesh, MeshResult::Unreachable, why).await;
        }
    };
    // Resume is asked for when the consumer keeps rings (and this relay offers resume, as
    // for a local open); the peer relay answers what it and the provider agreed.
    let asked = mesh.config().resume.enabled && consumer.resume && consumer.uri != remote.agent_uri;
    let forward = Frame::ForwardStream(orp::IncomingStream {
        target_service: service.to_owned(),
        method: method.to_owned(),
        source_agent_uri: consumer.uri.clone(),
        stream_id: id,
        resume: asked,
    });
    let deadline = Duration::from_millis(mesh.config().open_timeout_ms);
    let (mut p_send, mut p_recv, provider_rest, agreed) =
        match open_answered(&conn, &forward, deadline).await {
            Answer::Accepted(s, r, rest, agreed) => (s, r, rest, agreed),
            Answer::Rejected(code, reason) => {
                let why = format!("relay {peer}: {reason}");
                return reject(send, recv, mesh, result_of(code), why).await;
            }
            Answer::Failed(e) => {
                peers.stats.refuse(Refusal::ConnectFailed, peer);
                let why = format!("peer relay {peer} unreachable: {e}");
                return reject(send, recv, mesh, MeshResult::Unreachable, why).await;
            }
        };
    let resume = asked && agreed;
    let accepted = (&mut p_send, &mut p_recv);
    if !accept_consumer(
        consumer,
        &mut send,
        resume,
        &remote.agent_uri,
        accepted,
        mesh,
    )
    .await
    {
        return;
    }
    peers
        .stats
        .streams_out
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    metrics::counter!("outrelay_relay_forward_streams_total", "direction" => "out", "peer" => peer.to_owned())
        .increment(1);
    let pair = Pair {
        tenant: &consumer.tenant,
        service,
        method,
        id,
        consumer: PairEnd {
            uri: consumer.uri.clone(),
            control: consumer.control.clone(),
            relay: None,
        },
        // Its checkpoints go to the peer relay's lane; its own relay tells it the rest.
        provider: PairEnd {
            uri: remote.agent_uri.clone(),
            control: ctx.lanes.lane(&conn, &peer.into(), ctx),
            relay: Some(peer.into()),
        },
        ready_to: (true, false),
        // No direct path across relays.
        p2p_forbidden: true,
        rule_expires_unix_ms: verdict.rule_expires_unix_ms,
        changes,
    };
    let halves = Halves {
        c_send: send,
        c_recv: recv,
        p_send,
        p_recv,
    };
    join_pair(pair, halves, (consumer_rest, provider_rest), mesh, ctx).await;
}

/// Relay B: serves one connection from a peer relay (`peer_id`) until it ends. Its streams
/// are bounded by `forward.max_streams_per_peer` (QUIC stream credit).
pub(super) async fn serve_relay(conn: &quinn::Connection, peer_id: String, ctx: &Arc<Ctx>) {
    let (Some(peers), Some(mesh)) = (ctx.forward.get().cloned(), ctx.mesh.get().cloned()) else {
        conn.close(
            close_code::STREAM_UNSUPPORTED.into(),
            b"forwarding is not served",
        );
        return;
    };
    let Ok(_inbound) = peers.inbound() else {
        conn.close(
            close_code::TOO_MANY_CONNECTIONS.into(),
            b"too many relay connections",
        );
        return;
    };
    let per_peer = u64::try_from(peers.config().max_streams_per_peer).unwrap_or(u64::MAX);
    conn.set_max_concurrent_bi_streams(
        quinn::VarInt::from_u64(per_peer).unwrap_or(quinn::VarInt::MAX),
    );
    conn.set_max_concurrent_uni_streams(LANE_STREAMS.into());
    // The endpoint's window is an agent's: a relay connection gets the one sized so a
    // tenant's stalled streams hold at most half of it (`ForwardConfig`).
    let quic = ctx.config();
    let window = peers.config().connection_receive_window_bytes(
        quic.stream_receive_window_bytes,
        quic.connection_receive_window_bytes,
    );
    conn.set_receive_window(quinn::VarInt::from_u64(window).unwrap_or(quinn::VarInt::MAX));
    tracing::info!(peer = %peer_id, "peer relay connected");
    let peer_id: Arc<str> = peer_id.into();
    // The lanes (ours to the peer, the peer's to us) start with the connection.
    let lane = ctx.lanes.lane(conn, &peer_id, ctx);
    while let Ok((send, recv)) = conn.accept_bi().await {
        tokio::spawn(forwarded(
            peer_id.clone(),
            (send, recv),
            lane.clone(),
            peers.clone(),
            mesh.clone(),
            ctx.clone(),
        ));
    }
    tracing::info!(peer = %peer_id, "peer relay connection ended");
}

/// Refuses a stream of a relay connection that is not a valid FORWARD_STREAM: counted, reset.
fn protocol_error(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    peers: &Peers,
    mesh: &Mesh,
    peer: &str,
    why: &str,
) {
    peers.stats.refuse(Refusal::ProtocolError, peer);
    mesh.stats.count(MeshResult::ProtocolError);
    tracing::debug!(peer, why, "relay stream refused");
    let _ = send.reset(close_code::PROTOCOL_ERROR.into());
    let _ = recv.stop(close_code::PROTOCOL_ERROR.into());
}

/// Relay B: one FORWARD_STREAM from `peer`, to its end (`lane`: the connection's checkpoint
/// lane toward `peer`).
async fn forwarded(
    peer_id: Arc<str>,
    (mut send, mut recv): (quinn::SendStream, quinn::RecvStream),
    lane: mpsc::WeakSender<Frame>,
    peers: Arc<Peers>,
    mesh: Arc<Mesh>,
    ctx: Arc<Ctx>,
) {
    let peer = &*peer_id;
    let deadline = Duration::from_millis(mesh.config().open_timeout_ms);
    let (req, consumer_rest) = match first_frame(&mut recv, deadline).await {
        Ok((Frame::ForwardStream(req), rest)) => (req, rest),
        Ok((other, _)) => {
            let why = format!("{} instead of FORWARD_STREAM", other.frame_type().name());
            return protocol_error(send, recv, &peers, &mesh, peer, &why);
        }
        Err(FirstFrame::TooLarge { len, limit }) => {
            peers.stats.refuse(Refusal::ProtocolError, peer);
            let why = format!("FORWARD_STREAM of {len} bytes is over the {limit}-byte limit");
            return reject(send, recv, &mesh, MeshResult::FrameTooLarge, why).await;
        }
        Err(e) => return protocol_error(send, recv, &peers, &mesh, peer, &e.to_string()),
    };
    // The consumer's identity, strictly: its tenant is the stream's.
    let tenant = match Identity::parse(&req.source_agent_uri) {
        Ok(Identity::Agent { tenant, .. }) => tenant.as_str().to_owned(),
        _ => {
            return protocol_error(
                send,
                recv,
                &peers,
                &mesh,
                peer,
                "source_agent_uri is not an agent identity",
            );
        }
    };
    if !valid_service_name(&req.target_service) || !valid_method(&req.method) {
        let why = "target_service must be 1 to 253 and method at most 512 printable ASCII bytes";
        return reject(send, recv, &mesh, MeshResult::Invalid, why.to_owned()).await;
    }
    let Ok(_peer_tenant_slot) = peers.inbound_stream(peer, &tenant) else {
        let why = format!(
            "at most {} forwarded streams of one tenant from relay {peer}",
            peers.config().max_streams_per_peer_per_tenant
        );
        return reject(send, recv, &mesh, MeshResult::TenantLimit, why).await;
    };
    let Some(_tenant_slot) = mesh.tenant_stream(&tenant) else {
        ctx.stats.limit(super::Limit::TenantStreams);
        let why = format!(
            "at most {} live streams per tenant",
            mesh.config().max_streams_per_tenant
        );
        return reject(send, recv, &mesh, MeshResult::TenantLimit, why).await;
    };
    let id = req.stream_id;
    if id == 0 || !mesh.claim_stream_id(id) {
        let why = format!("stream id {id} is not allowed or already in use");
        return reject(send, recv, &mesh, MeshResult::Collision, why).await;
    }
    let _id = StreamIdGuard { mesh: &mesh, id };
    let (service, method, consumer) = (
        req.target_service.as_str(),
        req.method.as_str(),
        req.source_agent_uri.as_str(),
    );
    let changes = mesh.policy_changes();
    let Some(policy) = mesh.policy() else {
        let why = "no policy snapshot yet (closed world)".to_owned();
        return reject(send, recv, &mesh, MeshResult::Denied, why).await;
    };
    // LOCAL providers only: a forwarded stream is never forwarded again (no loops). The
    // chosen provider's live-stream count is held while the stream lives, as for local opens.
    let mut _provider_slot = None;
    let provider = match mesh.resolve(&tenant, service) {
        Resolved::Local(p) => {
            _provider_slot = Some(mesh.provider_stream(&tenant, service, &p));
            local_peer(&ctx, &tenant, &p)
        }
        Resolved::Remote { .. } | Resolved::NotFound => None,
    };
    let Some(provider) = provider else {
        let why = format!("service {service} not found on relay {}", mesh.relay_id());
        return reject(send, recv, &mesh, MeshResult::NotFound, why).await;
    };
    let row = AuditRow {
        tenant: &tenant,
        caller: consumer,
        target: service,
        method,
        stream_id: id,
    };
    let prefix = audit_prefix(peer, mesh.relay_id());
    let callee = match callee_decision(&mesh, &policy, &row, &provider.uri, &prefix) {
        Ok(callee) => callee,
        Err(why) => return reject(send, recv, &mesh, MeshResult::Denied, why).await,
    };
    // Resumable only when relay A asked (its consumer keeps rings), this relay offers resume
    // and the provider keeps rings too.
    let resume =
        req.resume && mesh.config().resume.enabled && provider.resume && consumer != provider.uri;
    let incoming = Frame::IncomingStream(orp::IncomingStream {
        target_service: service.to_owned(),
        method: method.to_owned(),
        source_agent_uri: consumer.to_owned(),
        stream_id: id,
        resume,
    });
    let (mut p_send, mut p_recv, provider_rest) =
        match open_answered(&provider.conn, &incoming, deadline).await {
            Answer::Accepted(s, r, rest, _) => (s, r, rest),
            Answer::Rejected(code, reason) => {
                let why = format!("provider rejected the stream: {code} {reason}");
                return reject(send, recv, &mesh, MeshResult::ProviderRejected, why).await;
            }
            Answer::Failed(e) => {
                let why = format!("provider unreachable: {e}");
                return reject(send, recv, &mesh, MeshResult::Unreachable, why).await;
            }
        };
    // Relay A always waits for one answer; it says whether the stream is resumable.
    let accept = Frame::StreamAccept(orp::StreamAccept {
        resume,
        peer_agent_uri: if resume {
            provider.uri.clone()
        } else {
            String::new()
        },
    });
    if write_frame(&mut send, &accept).await.is_err() {
        let _ = p_send.reset(close_code::PEER_FAILED.into());
        let _ = p_recv.stop(close_code::PEER_FAILED.into());
        mesh.stats.count(MeshResult::ProtocolError);
        return;
    }
    peers
        .stats
        .streams_in
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    metrics::counter!("outrelay_relay_forward_streams_total", "direction" => "in", "peer" => peer.to_owned())
        .increment(1);
    let pair = Pair {
        tenant: &tenant,
        service,
        method,
        id,
        // Its checkpoints go to relay A's lane; relay A tells it the rest.
        consumer: PairEnd {
            uri: consumer.to_owned(),
            control: lane,
            relay: Some(peer_id.clone()),
        },
        provider: PairEnd {
            uri: provider.uri.clone(),
            control: provider.control.clone(),
            relay: None,
        },
        ready_to: (false, true),
        p2p_forbidden: true,
        // Relay A watches its caller-side rule; this relay its own callee-side one.
        rule_expires_unix_ms: callee.rule_expires_unix_ms,
        changes,
    };
    let halves = Halves {
        c_send: send,
        c_recv: recv,
        p_send,
        p_recv,
    };
    join_pair(pair, halves, (consumer_rest, provider_rest), &mesh, &ctx).await;
}
