//! Application streams (`orp.md`, "Open a stream"): every bidirectional stream an agent opens
//! after its control stream carries one OPEN_STREAM; the relay checks policy, finds the
//! provider, opens a stream to it with INCOMING_STREAM, answers the consumer (STREAM_REJECT, or
//! STREAM_ACCEPT when its HELLO asked for `stream_accept`: a Go agent copies the stream raw into
//! its application, so it gets no accept frame, as from the Go relay) and then joins the two
//! streams.
//!
//! The join moves quinn's receive chunks (`Bytes`, no copy) from one stream to the other, up
//! to [`CHUNKS_PER_MOVE`] at a time, one batch in flight per direction, so the memory per stream is bounded by the QUIC flow-control
//! windows. A FIN on one side becomes a FIN on the other (each direction ends on its own); a
//! reset or a lost connection on one side resets the other. While joined, the stream watches
//! the policy generation and its allowing rule's expiry: when the caller-side decision turns to
//! deny, or a callee-side deny appears, both halves are reset with
//! [`close_code::POLICY_CUT`] at once (well within the spec's 1 s).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use outrelay_proto::fields::valid_method;
use outrelay_proto::frame::{
    Decoded, Frame, FrameError, MAX_FIRST_FRAME_PAYLOAD_BYTES, decode_limited,
};
use outrelay_proto::orp;
use tokio::sync::mpsc;

use super::stats::{Limit, bump};
use super::{Ctx, close_code};
use crate::mesh::policy::{PolicySnapshot, Verdict};
use crate::mesh::{AuditRow, Mesh, MeshResult, Resolved, valid_service_name};
use crate::unix_ms;

/// Received chunks (about one packet each) moved per read/write pair: one wake-up and one
/// connection-lock round per batch instead of per packet.
const CHUNKS_PER_MOVE: usize = 32;
/// Bytes read per call while waiting for a stream's first frame.
const FIRST_FRAME_READ_BYTES: usize = 4096;
/// Local providers one open tries before it answers 502: a provider whose connection died
/// unnoticed (no QUIC close yet) fails one attempt, not the stream.
const MAX_PROVIDER_ATTEMPTS: usize = 3;

/// The agent on one side of a stream.
#[derive(Clone)]
pub(crate) struct Peer {
    pub(crate) tenant: String,
    pub(crate) uri: String,
    pub(crate) conn: quinn::Connection,
    /// Weak (see [`super::AgentConn::control`]).
    pub(crate) control: mpsc::WeakSender<Frame>,
    /// Its HELLO asked for STREAM_ACCEPT on its consumer streams ([`super::FEATURE_STREAM_ACCEPT`]).
    pub(crate) explicit_accept: bool,
    /// Its HELLO asked for [`super::FEATURE_STREAM_RESUME`] and the relay accepted it.
    pub(crate) resume: bool,
}

/// Accepts the consumer's application streams until its connection ends; each gets a task.
///
/// New streams are paced by a token bucket per connection (`quic.stream_opens_per_s`): an
/// agent opening faster waits in QUIC's stream credit (`max_concurrent_streams`) instead of
/// costing the relay a policy check, an audit row and a controller write per stream (review
/// M13, the `audit-flood` bench attack). Paced, never refused: nothing is lost.
pub(crate) async fn accept(consumer: Arc<Peer>, mesh: Arc<Mesh>, ctx: Arc<Ctx>) {
    let mut bucket = {
        let config = ctx.config();
        super::conn::Bucket::new(config.stream_opens_per_s, config.stream_opens_burst)
    };
    while let Ok((send, recv)) = consumer.conn.accept_bi().await {
        if let Some(wait) = bucket.take(tokio::time::Instant::now()) {
            ctx.stats.limit(super::stats::Limit::StreamOpenRate);
            tokio::time::sleep(wait).await;
        }
        tokio::spawn(open(
            consumer.clone(),
            send,
            recv,
            mesh.clone(),
            ctx.clone(),
        ));
    }
}

/// Why a stream's first frame did not arrive.
#[derive(Debug, thiserror::Error)]
pub(super) enum FirstFrame {
    #[error("timed out")]
    Timeout,
    #[error("stream closed: {0}")]
    Closed(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("first frame declares {len} bytes, over the {limit}-byte limit")]
    TooLarge { len: u64, limit: u32 },
}

/// Reads exactly one frame from the start of a stream; returns it and any bytes that came
/// after it (raw payload, forwarded as is). A header declaring more than
/// [`MAX_FIRST_FRAME_PAYLOAD_BYTES`] is refused before its payload is read, so at most one
/// header, the limit and one read chunk are ever buffered.
pub(super) async fn first_frame(
    recv: &mut quinn::RecvStream,
    deadline: Duration,
) -> Result<(Frame, Bytes), FirstFrame> {
    tokio::time::timeout(deadline, async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; FIRST_FRAME_READ_BYTES];
        loop {
            let decoded =
                decode_limited(&buf, MAX_FIRST_FRAME_PAYLOAD_BYTES).map_err(|e| match e {
                    FrameError::PayloadOverLimit { len, limit } => {
                        FirstFrame::TooLarge { len, limit }
                    }
                    e => FirstFrame::Protocol(e.to_string()),
                })?;
            match decoded {
                Decoded::Frame { frame, used } => {
                    let decoded =
                        Frame::decode(&frame).map_err(|e| FirstFrame::Protocol(e.to_string()))?;
                    let rest = Bytes::copy_from_slice(buf.get(used..).unwrap_or_default());
                    return Ok((decoded, rest));
                }
                Decoded::NeedMore { .. } => {}
            }
            match recv.read(&mut chunk).await {
                Ok(Some(n)) => buf.extend_from_slice(chunk.get(..n).unwrap_or_default()),
                Ok(None) => return Err(FirstFrame::Closed("stream ended before its frame".into())),
                Err(e) => return Err(FirstFrame::Closed(e.to_string())),
            }
        }
    })
    .await
    .unwrap_or(Err(FirstFrame::Timeout))
}

pub(super) async fn write_frame(send: &mut quinn::SendStream, frame: &Frame) -> Result<(), String> {
    let mut bytes = Vec::new();
    frame.encode(&mut bytes).map_err(|e| e.to_string())?;
    send.write_all(&bytes).await.map_err(|e| e.to_string())
}

/// Answers the consumer with STREAM_REJECT and closes its stream.
pub(super) async fn reject(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    mesh: &Mesh,
    result: MeshResult,
    reason: String,
) {
    mesh.stats.count(result);
    tracing::debug!(code = result.code(), %reason, "stream rejected");
    let frame = Frame::StreamReject(orp::StreamReject {
        code: result.code(),
        reason,
        request_id: 0,
    });
    if write_frame(&mut send, &frame).await.is_ok() {
        let _ = send.finish();
    }
    let _ = recv.stop(close_code::NO_ERROR.into());
}

/// One OPEN_STREAM from `consumer`, to its end.
async fn open(
    consumer: Arc<Peer>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    mesh: Arc<Mesh>,
    ctx: Arc<Ctx>,
) {
    let deadline = Duration::from_millis(mesh.config().open_timeout_ms);
    let (req, consumer_rest) = match first_frame(&mut recv, deadline).await {
        Ok((Frame::OpenStream(req), rest)) => (req, rest),
        Ok((Frame::StreamResume(req), rest)) => {
            return super::resume::resume(consumer, send, recv, req, rest, mesh, ctx).await;
        }
        Ok((Frame::MigrateToRelay(m), _)) => {
            // A Go agent moving a stream back from a direct path: recorded and refused. The Go
            // agent follows it with raw bytes at positions only the direct path knew; joining
            // that needs P2P, which this relay does not offer (STREAM_RESUME is the way back).
            bump(&ctx.stats.migrations_to_relay);
            tracing::info!(agent = %consumer.uri, stream_id = m.stream_id, reason = %m.reason, "agent asked to move a stream back to the relay");
            let why = "streams cannot move back to this relay from a direct path (no P2P); resume them with STREAM_RESUME".to_owned();
            return reject(send, recv, &mesh, MeshResult::NotFound, why).await;
        }
        Ok((other, _)) => {
            mesh.stats.count(MeshResult::ProtocolError);
            tracing::debug!(
                frame = other.frame_type().name(),
                "application stream did not start with OPEN_STREAM"
            );
            let _ = send.reset(close_code::PROTOCOL_ERROR.into());
            let _ = recv.stop(close_code::PROTOCOL_ERROR.into());
            return;
        }
        Err(FirstFrame::TooLarge { len, limit }) => {
            // Refused from the header: nothing of the payload was buffered (review H3).
            ctx.stats.limit(Limit::FirstFrameTooLarge);
            let why = format!("OPEN_STREAM of {len} bytes is over the {limit}-byte limit");
            reject(send, recv, &mesh, MeshResult::FrameTooLarge, why).await;
            return;
        }
        Err(e) => {
            mesh.stats.count(MeshResult::ProtocolError);
            tracing::debug!(error = %e, "no OPEN_STREAM");
            let _ = send.reset(close_code::PROTOCOL_ERROR.into());
            let _ = recv.stop(close_code::PROTOCOL_ERROR.into());
            return;
        }
    };
    // Bounds first: nothing below (policy, decision cache, audit, logs, the provider) sees an
    // unbounded name (review H3). The reason never echoes the value.
    if !valid_service_name(&req.target_service) || !valid_method(&req.method) {
        let why = "target_service must be 1 to 253 and method at most 512 printable ASCII bytes";
        return reject(send, recv, &mesh, MeshResult::Invalid, why.to_owned()).await;
    }
    let Some(_tenant_slot) = mesh.tenant_stream(&consumer.tenant) else {
        ctx.stats.limit(Limit::TenantStreams);
        let why = format!(
            "at most {} live streams per tenant",
            mesh.config().max_streams_per_tenant
        );
        return reject(send, recv, &mesh, MeshResult::TenantLimit, why).await;
    };
    let id = req.stream_id;
    if id == 0 || !mesh.claim_stream_id(id) {
        let why = if id == 0 {
            "stream id 0 is not allowed".to_owned()
        } else {
            format!("stream id {id} is already in use")
        };
        return reject(send, recv, &mesh, MeshResult::Collision, why).await;
    }
    let _id = StreamIdGuard { mesh: &mesh, id };
    let tenant = consumer.tenant.as_str();
    let (service, method) = (req.target_service.as_str(), req.method.as_str());

    // 2. Caller side: the closed-world gate.
    // Subscribed BEFORE the policy is read: a change after this decision, even one that lands
    // before the join starts watching, makes the joined stream check itself again.
    let changes = mesh.policy_changes();
    let row = AuditRow {
        tenant,
        caller: &consumer.uri,
        target: service,
        method,
        stream_id: id,
    };
    // The provider is looked up first (a local table, nothing is taken) so that the audit row
    // of a forwarded stream names both relays; a denied caller still learns nothing of it.
    let resolved = mesh.resolve(tenant, service);
    let prefix = match &resolved {
        Resolved::Remote { relay_id, .. } => {
            super::forward::audit_prefix(mesh.relay_id(), relay_id)
        }
        _ => String::new(),
    };
    let (policy, verdict) = match caller_decision(&mesh, &row, &prefix) {
        Ok(decided) => decided,
        Err(why) => return reject(send, recv, &mesh, MeshResult::Denied, why).await,
    };

    // 3-6. The provider, in the caller's tenant only, and its one answer. A local provider
    // that does not answer (its connection died before the relay noticed) passes the stream
    // to the next one: at most MAX_PROVIDER_ATTEMPTS, all within the one open deadline.
    let open_until = tokio::time::Instant::now() + deadline;
    let mut resolved = resolved;
    let mut tried: Vec<crate::lease::ConnId> = Vec::new();
    let mut unreachable: Option<String> = None;
    let (provider, callee, resume, mut p_send, mut p_recv, provider_rest, _provider_slot) = loop {
        // The chosen local provider's live-stream count (the next choice's load) while this
        // lives.
        let (provider, provider_slot) = match resolved {
            Resolved::Local(p) => {
                tried.push(p.conn);
                let slot = mesh.provider_stream(tenant, service, &p);
                // A local provider whose connection ended meanwhile is as good as none.
                (local_peer(&ctx, tenant, &p), Some(slot))
            }
            Resolved::Remote {
                relay_id,
                endpoint,
                agent_uri,
            } => {
                let remote = super::forward::Remote {
                    relay_id,
                    endpoint,
                    agent_uri,
                };
                let opened = super::forward::Opened {
                    consumer: &consumer,
                    send,
                    recv,
                    consumer_rest,
                    id,
                    service,
                    method,
                    verdict,
                    changes,
                };
                return super::forward::open_remote(opened, remote, &mesh, &ctx).await;
            }
            Resolved::NotFound => (None, None),
        };
        let Some(provider) = provider else {
            if tried.len() < MAX_PROVIDER_ATTEMPTS && provider_slot.is_some() {
                resolved = mesh.resolve_skipping(tenant, service, &tried);
                continue;
            }
            return match unreachable {
                Some(why) => reject(send, recv, &mesh, MeshResult::Unreachable, why).await,
                None => {
                    let why = format!("service {service} not found");
                    reject(send, recv, &mesh, MeshResult::NotFound, why).await
                }
            };
        };

        // 4. Callee side: only an explicit deny refuses.
        let callee = match callee_decision(&mesh, &policy, &row, &provider.uri, "") {
            Ok(callee) => callee,
            Err(why) => return reject(send, recv, &mesh, MeshResult::Denied, why).await,
        };

        // 5-6. INCOMING_STREAM to the provider, and its one answer. Both agents keep rings
        // only when both asked for resume (and the relay offers it). Not for a pair of one
        // agent with itself: its checkpoints could not tell the ends apart.
        let resume = mesh.config().resume.enabled
            && consumer.resume
            && provider.resume
            && consumer.uri != provider.uri;
        let incoming = Frame::IncomingStream(orp::IncomingStream {
            target_service: service.to_owned(),
            method: method.to_owned(),
            source_agent_uri: consumer.uri.clone(),
            stream_id: id,
            resume,
        });
        // Half of what is left while another local provider could take the stream, all of
        // it for the last one (a provider answers after dialing its target, up to seconds).
        let mut left = open_until.saturating_duration_since(tokio::time::Instant::now());
        if tried.len() < MAX_PROVIDER_ATTEMPTS
            && mesh.local_providers_left(tenant, service, &tried) > 0
        {
            left /= 2;
        }
        match open_answered(&provider.conn, &incoming, left).await {
            Answer::Accepted(s, r, rest, _) => {
                break (provider, callee, resume, s, r, rest, provider_slot);
            }
            Answer::Rejected(code, reason) => {
                let why = format!("provider rejected the stream: {code} {reason}");
                return reject(send, recv, &mesh, MeshResult::ProviderRejected, why).await;
            }
            Answer::Failed(e) => {
                let why = format!("provider unreachable: {e}");
                if tried.len() >= MAX_PROVIDER_ATTEMPTS || tokio::time::Instant::now() >= open_until
                {
                    return reject(send, recv, &mesh, MeshResult::Unreachable, why).await;
                }
                tracing::debug!(stream_id = id, service, error = %e, "provider did not answer: trying the next one");
                bump(&mesh.stats.provider_retries);
                unreachable = Some(why);
                resolved = mesh.resolve_skipping(tenant, service, &tried);
            }
        }
    };

    // 7. Accept (for agents that asked), tell both control streams, join.
    let accepted = (&mut p_send, &mut p_recv);
    if !accept_consumer(&consumer, &mut send, resume, &provider.uri, accepted, &mesh).await {
        return;
    }
    let pair = Pair {
        tenant,
        service,
        method,
        id,
        consumer: crate::mesh::PairEnd {
            uri: consumer.uri.clone(),
            control: consumer.control.clone(),
            relay: None,
        },
        provider: crate::mesh::PairEnd {
            uri: provider.uri.clone(),
            control: provider.control.clone(),
            relay: None,
        },
        ready_to: (true, true),
        p2p_forbidden: verdict.p2p_forbidden || callee.p2p_forbidden,
        rule_expires_unix_ms: verdict.rule_expires_unix_ms,
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

/// Sends STREAM_ACCEPT to a consumer that asked for it, naming the provider when the stream
/// is resumable. `false`: the consumer's stream broke; the provider's half is reset and the
/// open counted as a protocol error.
pub(super) async fn accept_consumer(
    consumer: &Peer,
    send: &mut quinn::SendStream,
    resume: bool,
    provider_uri: &str,
    (p_send, p_recv): (&mut quinn::SendStream, &mut quinn::RecvStream),
    mesh: &Mesh,
) -> bool {
    if !consumer.explicit_accept {
        return true;
    }
    let accept = Frame::StreamAccept(orp::StreamAccept {
        resume,
        peer_agent_uri: if resume {
            provider_uri.to_owned()
        } else {
            String::new()
        },
    });
    if write_frame(send, &accept).await.is_ok() {
        return true;
    }
    let _ = p_send.reset(close_code::PEER_FAILED.into());
    let _ = p_recv.stop(close_code::PEER_FAILED.into());
    mesh.stats.count(MeshResult::ProtocolError);
    false
}

/// An accepted stream about to be joined: its names and its two ends.
pub(super) struct Pair<'a> {
    pub(super) tenant: &'a str,
    pub(super) service: &'a str,
    pub(super) method: &'a str,
    pub(super) id: u64,
    pub(super) consumer: crate::mesh::PairEnd,
    pub(super) provider: crate::mesh::PairEnd,
    /// Which ends (consumer, provider) are connected here and get STREAM_READY (the end of
    /// a forwarded stream on another relay gets it from that relay).
    pub(super) ready_to: (bool, bool),
    pub(super) p2p_forbidden: bool,
    pub(super) rule_expires_unix_ms: i64,
    /// Policy swaps since the decision was taken.
    pub(super) changes: tokio::sync::watch::Receiver<u64>,
}

/// Counts the stream accepted, tells the local ends' control streams (STREAM_READY), records
/// the pair and joins the halves until the stream ends.
pub(super) async fn join_pair(
    pair: Pair<'_>,
    halves: Halves,
    rests: (Bytes, Bytes),
    mesh: &Mesh,
    ctx: &Ctx,
) {
    let id = pair.id;
    mesh.stats.count(MeshResult::Accepted);
    for (local, to, peer_uri) in [
        (pair.ready_to.0, &pair.consumer.control, &pair.provider.uri),
        (pair.ready_to.1, &pair.provider.control, &pair.consumer.uri),
    ] {
        if !local {
            continue;
        }
        let ready = Frame::StreamReady(orp::StreamReady {
            stream_id: id,
            peer_agent_uri: peer_uri.clone(),
        });
        if to.upgrade().is_none_or(|to| to.try_send(ready).is_err()) {
            bump(&mesh.stats.ready_dropped);
        }
    }
    let superseded = Arc::new(tokio::sync::Notify::new());
    let (consumer, provider) = (pair.consumer.uri.clone(), pair.provider.uri.clone());
    mesh.stream_joined(
        id,
        crate::mesh::JoinedPair {
            consumer: pair.consumer,
            provider: pair.provider,
            p2p_forbidden: pair.p2p_forbidden,
            superseded: superseded.clone(),
        },
    );
    tracing::debug!(stream_id = id, %consumer, %provider, service = pair.service, "stream joined");
    let check = Recheck {
        mesh,
        tenant: pair.tenant,
        consumer: &consumer,
        provider: &provider,
        service: pair.service,
        method: pair.method,
        rule_expires_unix_ms: pair.rule_expires_unix_ms,
        changes: pair.changes,
    };
    let idle = Idle {
        timeout: Duration::from_millis(mesh.config().stream_idle_timeout_ms),
        stats: &ctx.stats,
    };
    // Held to the provider tenant's bandwidth limit (issue 21; the caller's tenant: a
    // provider is resolved in it only). Leases' limits do not apply to service streams.
    let limit = ctx.bandwidth.tenant(pair.tenant);
    if join(halves, rests, check, idle, &superseded, &limit).await {
        mesh.stream_ended(id);
    }
}

/// The provider `p` (registered in `tenant`) as a stream end; `None` when its connection
/// ended meanwhile.
pub(super) fn local_peer(ctx: &Ctx, tenant: &str, p: &crate::mesh::LocalProvider) -> Option<Peer> {
    ctx.agents().get(&p.conn).map(|a| Peer {
        tenant: tenant.to_owned(),
        uri: a.uri.clone(),
        conn: a.conn.clone(),
        control: a.control.clone(),
        explicit_accept: false,
        resume: a.resume,
    })
}

/// How a stream opened with [`open_answered`] was answered.
pub(super) enum Answer {
    /// STREAM_ACCEPT: the stream's halves, whatever came after the frame, and the accept's
    /// `resume` (what a peer relay agreed for a forwarded stream).
    Accepted(quinn::SendStream, quinn::RecvStream, Bytes, bool),
    /// STREAM_REJECT: its code and reason (the stream is finished).
    Rejected(u32, String),
    /// No stream, no answer in time, or another frame (the stream is reset).
    Failed(String),
}

/// Opens a stream on `conn`, writes `first` (INCOMING_STREAM to a provider, FORWARD_STREAM to
/// a peer relay) and reads its one answer, each within `deadline`.
pub(super) async fn open_answered(
    conn: &quinn::Connection,
    first: &Frame,
    deadline: Duration,
) -> Answer {
    let opened = tokio::time::timeout(deadline, async {
        let (mut p_send, p_recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        write_frame(&mut p_send, first).await?;
        Ok::<_, String>((p_send, p_recv))
    })
    .await
    .unwrap_or_else(|_| Err("timed out opening a stream".to_owned()));
    let (mut p_send, mut p_recv) = match opened {
        Ok(s) => s,
        Err(e) => return Answer::Failed(e),
    };
    match first_frame(&mut p_recv, deadline).await {
        Ok((Frame::StreamAccept(a), rest)) => Answer::Accepted(p_send, p_recv, rest, a.resume),
        Ok((Frame::StreamReject(r), _)) => {
            let _ = p_send.finish();
            Answer::Rejected(r.code, r.reason)
        }
        Ok((other, _)) => {
            let _ = p_send.reset(close_code::PROTOCOL_ERROR.into());
            let _ = p_recv.stop(close_code::PROTOCOL_ERROR.into());
            Answer::Failed(format!("answered {}", other.frame_type().name()))
        }
        Err(e) => {
            let _ = p_send.reset(close_code::OPEN_TIMEOUT.into());
            Answer::Failed(format!("no answer: {e}"))
        }
    }
}

/// The caller-side decision of a stream (the closed-world gate), audited with `prefix` in
/// front of the reason (`""` for an open, `"resume "` for a resume). `Err`: the
/// STREAM_REJECT 403 reason (no policy snapshot yet, or denied).
pub(super) fn caller_decision(
    mesh: &Mesh,
    row: &AuditRow<'_>,
    prefix: &str,
) -> Result<(Arc<PolicySnapshot>, Verdict), String> {
    let Some(policy) = mesh.policy() else {
        let why = format!("{prefix}caller-side: no policy snapshot yet");
        mesh.audit(row, false, why);
        return Err("no policy snapshot yet (closed world)".to_owned());
    };
    let verdict = policy.caller_side(row.tenant, row.caller, row.target, row.method, unix_ms());
    let why = format!("{prefix}caller-side: {}", verdict.reason());
    mesh.audit(row, verdict.allow, why);
    if !verdict.allow {
        return Err(format!("denied: {}", verdict.reason()));
    }
    Ok((policy, verdict))
}

/// The callee-side decision for the stream of `caller_row` (consumer → service) served by
/// `provider`: only an explicit deny refuses. Audited as the provider calling the consumer,
/// with `prefix`. `Err`: the STREAM_REJECT 403 reason.
pub(super) fn callee_decision(
    mesh: &Mesh,
    policy: &PolicySnapshot,
    caller_row: &AuditRow<'_>,
    provider: &str,
    prefix: &str,
) -> Result<Verdict, String> {
    let (consumer, method) = (caller_row.caller, caller_row.method);
    let callee = policy.callee_side(caller_row.tenant, provider, consumer, method, unix_ms());
    let row = AuditRow {
        tenant: caller_row.tenant,
        caller: provider,
        target: consumer,
        method,
        stream_id: caller_row.stream_id,
    };
    mesh.audit(
        &row,
        callee.allow,
        format!("{prefix}callee-side: {}", callee.reason()),
    );
    if !callee.allow {
        return Err(format!(
            "denied by the provider's policy: {}",
            callee.reason()
        ));
    }
    Ok(callee)
}

/// The joined stream's idle timeout (M2): a stream that moves no byte either way for
/// `timeout` gives its slots back (both halves reset with [`close_code::STREAM_IDLE`]).
pub(super) struct Idle<'a> {
    pub(super) timeout: Duration,
    pub(super) stats: &'a super::QuicStats,
}

/// Milliseconds since `start`, for the activity stamp (saturating).
fn ms_since(start: tokio::time::Instant) -> u64 {
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Resolves once no byte has moved for `timeout` (the pipes stamp `last` per batch).
async fn idle_for(start: tokio::time::Instant, last: &AtomicU64, timeout: Duration) {
    let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    loop {
        let quiet = ms_since(start).saturating_sub(last.load(Ordering::Relaxed));
        if quiet >= timeout_ms {
            return;
        }
        tokio::time::sleep(Duration::from_millis(timeout_ms - quiet)).await;
    }
}

/// Gives the stream id back when the stream ends, on every path.
pub(super) struct StreamIdGuard<'a> {
    pub(super) mesh: &'a Mesh,
    pub(super) id: u64,
}

impl Drop for StreamIdGuard<'_> {
    fn drop(&mut self) {
        self.mesh.release_stream_id(self.id);
    }
}

pub(super) struct Halves {
    pub(super) c_send: quinn::SendStream,
    pub(super) c_recv: quinn::RecvStream,
    pub(super) p_send: quinn::SendStream,
    pub(super) p_recv: quinn::RecvStream,
}

/// What a joined stream needs to check itself again after a policy change.
pub(super) struct Recheck<'a> {
    pub(super) mesh: &'a Mesh,
    pub(super) tenant: &'a str,
    pub(super) consumer: &'a str,
    pub(super) provider: &'a str,
    pub(super) service: &'a str,
    pub(super) method: &'a str,
    pub(super) rule_expires_unix_ms: i64,
    /// Policy swaps since the decision was taken (subscribed before the policy was read).
    pub(super) changes: tokio::sync::watch::Receiver<u64>,
}

/// Why a joined stream was cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    Policy,
    Expired,
    Idle,
    /// One of its agents resumed the stream on a new connection.
    Superseded,
}

impl Recheck<'_> {
    /// Resolves when the stream is no longer allowed.
    async fn until_denied(&mut self) -> Cut {
        loop {
            let expiry = self.expiry_sleep();
            let expired = tokio::select! {
                changed = self.changes.changed() => {
                    if changed.is_err() {
                        // The mesh is gone (relay stopping): never cut for that.
                        std::future::pending::<()>().await;
                    }
                    false
                }
                () = expiry => true,
            };
            let Some(policy) = self.mesh.policy() else {
                continue;
            };
            let now = unix_ms();
            let caller =
                policy.evaluate(self.tenant, self.consumer, self.service, self.method, now);
            let callee =
                policy.callee_side(self.tenant, self.provider, self.consumer, self.method, now);
            if !caller.allow || !callee.allow {
                return if expired { Cut::Expired } else { Cut::Policy };
            }
            self.rule_expires_unix_ms = caller.rule_expires_unix_ms;
        }
    }

    /// Sleeps until the allowing rule expires (forever when it never does).
    fn expiry_sleep(&self) -> impl Future<Output = ()> + use<> {
        let exp = self.rule_expires_unix_ms;
        async move {
            if exp <= 0 {
                return std::future::pending().await;
            }
            let left = u64::try_from(exp.saturating_sub(unix_ms())).unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(left)).await;
        }
    }
}

/// Joins the two streams until both directions end, the policy cuts them, they idle out, or
/// `superseded` is notified (a resume of this stream on a new connection); true when both
/// directions ended cleanly.
pub(super) async fn join(
    mut h: Halves,
    (consumer_rest, provider_rest): (Bytes, Bytes),
    mut check: Recheck<'_>,
    idle: Idle<'_>,
    superseded: &tokio::sync::Notify,
    limit: &crate::bandwidth::Buckets,
) -> bool {
    let mesh = check.mesh;
    let stats = &mesh.stats;
    stats.streams_active.fetch_add(1, Ordering::Relaxed);
    let start = tokio::time::Instant::now();
    let last = AtomicU64::new(0);
    let cut = {
        let up = pipe(
            &mut h.c_recv,
            &mut h.p_send,
            consumer_rest,
            &stats.bytes_to_provider,
            (start, &last),
            &limit.to_service,
        );
        let down = pipe(
            &mut h.p_recv,
            &mut h.c_send,
            provider_rest,
            &stats.bytes_to_consumer,
            (start, &last),
            &limit.to_client,
        );
        // Both directions to their end; the first one that FAILS ends the stream (a reset on
        // one side must not leave the other direction, and the tenant's stream slot, waiting
        // for a peer that may never write).
        let both = async {
            tokio::pin!(up, down);
            let (mut up_done, mut down_done) = (false, false);
            while !(up_done && down_done) {
                let ended = tokio::select! {
                    ended = &mut up, if !up_done => { up_done = true; ended }
                    ended = &mut down, if !down_done => { down_done = true; ended }
                };
                ended?;
            }
            Ok(())
        };
        tokio::select! {
            ended = both => {
                if let Err(code) = ended {
                    bump(&stats.streams_failed);
                    end_failed(h, stats, code);
                    return false;
                }
                None
            }
            cut = check.until_denied() => Some(cut),
            () = idle_for(start, &last, idle.timeout) => Some(Cut::Idle),
            () = superseded.notified() => Some(Cut::Superseded),
        }
    };
    if cut == Some(Cut::Superseded) {
        // As a lost peer: the other end sees the reset and resumes in turn.
        bump(&stats.streams_failed);
        let code = close_code::PEER_LOST.into();
        let _ = h.c_send.reset(code);
        let _ = h.p_send.reset(code);
        let _ = h.c_recv.stop(code);
        let _ = h.p_recv.stop(code);
    } else if cut == Some(Cut::Idle) {
        // Counted before the resets go out: whoever sees the reset also sees the count.
        idle.stats.limit(Limit::StreamIdle);
        let code = close_code::STREAM_IDLE.into();
        let _ = h.c_send.reset(code);
        let _ = h.p_send.reset(code);
        let _ = h.c_recv.stop(code);
        let _ = h.p_recv.stop(code);
    } else if let Some(cut) = cut {
        let (counter, reason) = match cut {
            Cut::Policy | Cut::Idle | Cut::Superseded => {
                (&stats.cut_policy, "stream cut: policy changed")
            }
            Cut::Expired => (&stats.cut_expired, "stream cut: allowing rule expired"),
        };
        // Counted before the resets go out, as above.
        bump(counter);
        let code = close_code::POLICY_CUT.into();
        let _ = h.c_send.reset(code);
        let _ = h.p_send.reset(code);
        let _ = h.c_recv.stop(code);
        let _ = h.p_recv.stop(code);
        tracing::info!(
            consumer = check.consumer,
            provider = check.provider,
            service = check.service,
            reason,
            "live stream cut"
        );
    }
    stats.streams_active.fetch_sub(1, Ordering::Relaxed);
    cut.is_none()
}

/// One direction failed: reset and stop whatever is left of both halves with `code` (the
/// failing side's own code, [`close_code::PEER_LOST`] when its connection ended).
fn end_failed(mut h: Halves, stats: &crate::mesh::MeshStats, code: quinn::VarInt) {
    let _ = h.c_send.reset(code);
    let _ = h.p_send.reset(code);
    let _ = h.c_recv.stop(code);
    let _ = h.p_recv.stop(code);
    stats.streams_active.fetch_sub(1, Ordering::Relaxed);
}

/// The code that tells the other half why a write failed: the stopper's own code, or
/// [`close_code::PEER_LOST`] when that agent's connection ended (it may resume).
fn write_failure(e: &quinn::WriteError) -> quinn::VarInt {
    match e {
        quinn::WriteError::Stopped(code) => *code,
        quinn::WriteError::ConnectionLost(_) => close_code::PEER_LOST.into(),
        _ => close_code::PEER_FAILED.into(),
    }
}

/// As [`write_failure`], for a read.
fn read_failure(e: &quinn::ReadError) -> quinn::VarInt {
    match e {
        quinn::ReadError::Reset(code) => *code,
        quinn::ReadError::ConnectionLost(_) => close_code::PEER_LOST.into(),
        _ => close_code::PEER_FAILED.into(),
    }
}

/// Moves one direction: `rest` first, then every chunk, then FIN. A reset or a lost
/// connection on the reading side resets the writing side (and the reverse: a writer the peer
/// stopped stops the reader). `Err`: the direction failed, with the code the other half gets.
async fn pipe(
    from: &mut quinn::RecvStream,
    to: &mut quinn::SendStream,
    rest: Bytes,
    bytes: &AtomicU64,
    (start, last): (tokio::time::Instant, &AtomicU64),
    limit: &outrelay_io::Bucket,
) -> Result<(), quinn::VarInt> {
    if !rest.is_empty() {
        bytes.fetch_add(rest.len() as u64, Ordering::Relaxed);
        if let Err(e) = to.write_chunk(rest).await {
            let code = write_failure(&e);
            let _ = from.stop(code);
            return Err(code);
        }
    }
    let mut chunks: [Bytes; CHUNKS_PER_MOVE] = Default::default();
    loop {
        match from.read_chunks(&mut chunks).await {
            Ok(Some(n)) => {
                let mut left = chunks.get_mut(..n).unwrap_or_default();
                let len: usize = left.iter().map(Bytes::len).sum();
                throttle(limit, len).await;
                bytes.fetch_add(len as u64, Ordering::Relaxed);
                last.store(ms_since(start), Ordering::Relaxed);
                while !left.is_empty() {
                    match to.write_chunks(left).await {
                        // Fully written chunks are emptied; a partial one keeps its suffix.
                        Ok(w) => {
                            left = left.get_mut(w.chunks..).unwrap_or_default();
                            last.store(ms_since(start), Ordering::Relaxed);
                        }
                        Err(e) => {
                            let code = write_failure(&e);
                            let _ = from.stop(code);
                            return Err(code);
                        }
                    }
                }
            }
            Ok(None) => {
                let _ = to.finish();
                return Ok(());
            }
            Err(e) => {
                let code = read_failure(&e);
                let _ = to.reset(code);
                return Err(code);
            }
        }
    }
}

/// Charges `len` bytes already read to `limit` and waits until they conform. Never drops; the
/// wait is counted as the bucket's throttled time. Unlimited (rate 0): one load, no wait.
async fn throttle(limit: &outrelay_io::Bucket, len: usize) {
    if limit.rate_bytes_per_s() == 0 {
        return;
    }
    let now_ns = outrelay_io::rate::clock_ns(std::time::Instant::now());
    // Reserved in the bucket: streams waiting on one tenant take turns.
    let wait_ns = limit.reserve(len as u64, now_ns);
    if wait_ns > 0 {
        tokio::time::sleep(Duration::from_nanos(wait_ns)).await;
        limit.add_throttled_ns(wait_ns);
    }
}
