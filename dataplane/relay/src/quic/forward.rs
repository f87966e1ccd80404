//! Forwarded streams (issue 22): a consumer here whose provider is on another relay, and the
//! other relay's side of it.
//!
//! - **Relay A** (the consumer's), in [`open_remote`]: after its caller-side decision, takes a
//!   slot toward the peer relay ([`crate::forward::Peers`]), opens a stream on the pooled
//!   connection, sends FORWARD_STREAM{IncomingStream} and waits for the one answer; the
//!   consumer gets what it would get from a local provider, then the two streams are joined
//!   like local ones (recheck, idle timeout, bandwidth).
//! - **Relay B** (the provider's), in [`serve_relay`]: a connection whose certificate has role
//!   `relay` may only open streams starting with FORWARD_STREAM (anything else is a protocol
//!   error, counted). B takes the tenant from the strictly parsed `source_agent_uri`, runs the
//!   callee-side decision, resolves LOCAL providers only (a forwarded stream is never
//!   forwarded again), sends INCOMING_STREAM, relays the answer and joins.
//!
//! Both audit rows name the two relays in their reason ([`audit_prefix`]). Forwarded streams
//! are not resumable: INCOMING_STREAM and STREAM_ACCEPT say `resume = false`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use outrelay_proto::fields::valid_method;
use outrelay_proto::frame::Frame;
use outrelay_proto::identity::Identity;
use outrelay_proto::orp;
use tokio::sync::mpsc;

use super::streams::{
    Answer, FirstFrame, Halves, Pair, Peer, StreamIdGuard, callee_decision, first_frame, join_pair,
    local_peer, open_answered, reject, write_frame,
};
use super::{Ctx, close_code};
use crate::forward::{Peers, Refusal};
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

/// A control queue that is already closed: the end of a pair on another relay (signals to it
/// are dropped here; its own relay tells it).
fn no_control() -> mpsc::WeakSender<Frame> {
    mpsc::channel::<Frame>(1).0.downgrade()
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
pub(super) async fn open_remote(o: Opened<'_>, remote: Remote, mesh: &Mesh, ctx: &Ctx) {
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
    let _slot = match peers.stream_slot(peer) {
        Ok(slot) => slot,
        Err(r) => {
            let why = format!("forwarding to relay {peer} refused: {r}");
            let result = match r {
                Refusal::PeerStreamsFull(_) | Refusal::StreamsFull(_) => MeshResult::TenantLimit,
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
    let forward = Frame::ForwardStream(orp::IncomingStream {
        target_service: service.to_owned(),
        method: method.to_owned(),
        source_agent_uri: consumer.uri.clone(),
        stream_id: id,
        // Resume across the forwarded hop is not offered.
        resume: false,
    });
    let deadline = Duration::from_millis(mesh.config().open_timeout_ms);
    let (mut p_send, mut p_recv, provider_rest) =
        match open_answered(&conn, &forward, deadline).await {
            Answer::Accepted(s, r, rest) => (s, r, rest),
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
    if consumer.explicit_accept
        && write_frame(
            &mut send,
            &Frame::StreamAccept(orp::StreamAccept {
                resume: false,
                peer_agent_uri: String::new(),
            }),
        )
        .await
        .is_err()
    {
        let _ = p_send.reset(close_code::PEER_FAILED.into());
        let _ = p_recv.stop(close_code::PEER_FAILED.into());
        mesh.stats.count(MeshResult::ProtocolError);
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
        },
        provider: PairEnd {
            uri: remote.agent_uri.clone(),
            control: no_control(),
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
    tracing::info!(peer = %peer_id, "peer relay connected");
    let peer_id: Arc<str> = peer_id.into();
    while let Ok((send, recv)) = conn.accept_bi().await {
        tokio::spawn(forwarded(
            peer_id.clone(),
            send,
            recv,
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

/// Relay B: one FORWARD_STREAM from `peer`, to its end.
async fn forwarded(
    peer: Arc<str>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    peers: Arc<Peers>,
    mesh: Arc<Mesh>,
    ctx: Arc<Ctx>,
) {
    let peer = &*peer;
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
    if let Err(why) = callee_decision(&mesh, &policy, &row, &provider.uri, &prefix) {
        return reject(send, recv, &mesh, MeshResult::Denied, why).await;
    }
    let incoming = Frame::IncomingStream(orp::IncomingStream {
        target_service: service.to_owned(),
        method: method.to_owned(),
        source_agent_uri: consumer.to_owned(),
        stream_id: id,
        resume: false,
    });
    let (mut p_send, mut p_recv, provider_rest) =
        match open_answered(&provider.conn, &incoming, deadline).await {
            Answer::Accepted(s, r, rest) => (s, r, rest),
            Answer::Rejected(code, reason) => {
                let why = format!("provider rejected the stream: {code} {reason}");
                return reject(send, recv, &mesh, MeshResult::ProviderRejected, why).await;
            }
            Answer::Failed(e) => {
                let why = format!("provider unreachable: {e}");
                return reject(send, recv, &mesh, MeshResult::Unreachable, why).await;
            }
        };
    // Relay A always waits for one answer.
    let accept = Frame::StreamAccept(orp::StreamAccept {
        resume: false,
        peer_agent_uri: String::new(),
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
        consumer: PairEnd {
            uri: consumer.to_owned(),
            control: no_control(),
        },
        provider: PairEnd {
            uri: provider.uri.clone(),
            control: provider.control.clone(),
        },
        ready_to: (false, true),
        p2p_forbidden: true,
        rule_expires_unix_ms: 0,
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
