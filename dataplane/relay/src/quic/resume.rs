//! Resumed streams, relay side (`orp.md`, "Resume"): an application stream whose first frame
//! is STREAM_RESUME is one half of a stream whose agent lost its relay connection (this relay
//! restarted or was killed, GOAWAY, a network change). The first half of a pair is PARKED here
//! for up to `[resume] park_timeout_ms`; its peer's half JOINS it when
//!
//! - both name the same stream id,
//! - each half's certificate URI (of the connection it came on, never a field) is the other
//!   half's `peer_agent_uri`, so knowing a stream id is not enough,
//! - exactly one half is the consumer, and both are of the same tenant and name the same
//!   `target_service` and `method`.
//!
//! Then the policy is evaluated again exactly as for an open (caller side, callee side, both
//! audited with `resume ` in front of the reason), each half gets the OTHER half's
//! STREAM_RESUME (with `peer_agent_uri` = the other half's own URI), and the pair is joined
//! ONCE with the open path's join: policy changes still cut it, the idle timeout applies, the
//! stream id and one tenant stream slot are held while it lives.
//!
//! Refusals (STREAM_REJECT on that stream, then FIN; each counted in
//! [`crate::mesh::resume::ResumeStats`]): 409 when the id is parked by another pair (the
//! parked half stays parked: a third agent cannot knock it out), 404 when the window ends or
//! resume is disabled, 403 without `target_service` (closed world) or on a policy deny, 400 for
//! invalid fields, 503 over `max_parked` / `max_parked_per_agent` (429 over the tenant's stream
//! cap: a parked half holds one of its tenant's slots). The same agent resuming the same id
//! again while parked (it reconnected once more) replaces its parked half; a parked half whose
//! connection has ended gives way to its peer's half (counted `expired`). A parked half
//! reserves its stream id when it is free, so an OPEN_STREAM with it meanwhile gets 409; when a
//! stream joined before still holds the id (its connection's end not noticed yet), the join is
//! refused with 409 on both halves.
//!
//! The park table is a std mutex touched once per STREAM_RESUME, never across an await and
//! never per byte.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use outrelay_proto::fields::valid_method;
use outrelay_proto::frame::Frame;
use outrelay_proto::identity::Identity;
use outrelay_proto::orp;
use tokio::sync::oneshot;

use super::stats::Limit;
use super::streams::{
    Halves, Idle, Peer, Recheck, callee_decision, caller_decision, join, write_frame,
};
use super::{Ctx, close_code};
use crate::mesh::resume::{ResumeOutcome, ResumeStats};
use crate::mesh::{AuditRow, JoinedPair, Mesh, PairEnd, valid_service_name};

/// STREAM_REJECT code: the id is parked by another pair, or in use by a live stream.
const REJECT_MISMATCH: u32 = 409;
/// STREAM_REJECT code: no peer in the window, or resume disabled.
const REJECT_NOT_FOUND: u32 = 404;
/// STREAM_REJECT code: the policy denies the stream now (or the half gave no service).
const REJECT_DENIED: u32 = 403;
/// STREAM_REJECT code: an invalid field.
const REJECT_INVALID: u32 = 400;
/// STREAM_REJECT code: too many parked halves (relay-wide or of this agent).
const REJECT_FULL: u32 = 503;
/// STREAM_REJECT code: the tenant's live-stream slots are spent (as for an open).
const REJECT_TENANT_FULL: u32 = 429;

/// One half of a resumed stream: the agent it came from, its STREAM_RESUME and the stream.
struct Half {
    agent: Arc<Peer>,
    req: orp::StreamResume,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

/// A stream id reserved in the mesh (OPEN_STREAM with it gets 409), given back on drop.
struct HeldId {
    mesh: Arc<Mesh>,
    id: u64,
}

impl HeldId {
    /// Reserves `id`; `None` when a live stream (or another parked pair) holds it.
    fn claim(mesh: &Arc<Mesh>, id: u64) -> Option<HeldId> {
        mesh.claim_stream_id(id).then(|| HeldId {
            mesh: mesh.clone(),
            id,
        })
    }
}

impl Drop for HeldId {
    fn drop(&mut self) {
        self.mesh.release_stream_id(self.id);
    }
}

/// A half waiting for its peer.
struct Parked {
    half: Half,
    /// The stream id, reserved while parked when it was free (a stream joined before a restart
    /// of THIS relay's connection may still hold it until its connection's end is noticed): an
    /// agent that knows the id cannot block the join by opening a stream with it meanwhile.
    held: Option<HeldId>,
    /// Which parking this is (a replaced or taken half's timer must not remove its successor).
    token: u64,
    /// Tells the parked half's task that the half was taken (joined or replaced): it gives its
    /// tenant slot back and ends. Dropping it says the same.
    taken: oneshot::Sender<()>,
}

/// The parked halves, by stream id, with a count per agent URI (`max_parked_per_agent`).
#[derive(Default)]
pub(crate) struct ParkTable {
    by_id: HashMap<u64, Parked>,
    per_agent: HashMap<String, usize>,
    next_token: u64,
}

impl ParkTable {
    fn insert(
        &mut self,
        id: u64,
        half: Half,
        held: Option<HeldId>,
        taken: oneshot::Sender<()>,
    ) -> u64 {
        self.next_token += 1;
        let token = self.next_token;
        *self.per_agent.entry(half.agent.uri.clone()).or_insert(0) += 1;
        let parked = Parked {
            half,
            held,
            token,
            taken,
        };
        if let Some(old) = self.by_id.insert(id, parked) {
            // Callers remove first; keep the counts right whatever happens.
            self.forget(&old.half.agent.uri);
        }
        token
    }

    fn remove(&mut self, id: u64) -> Option<Parked> {
        let p = self.by_id.remove(&id)?;
        self.forget(&p.half.agent.uri);
        Some(p)
    }

    /// Removes the half parked under `id` only if it is still the parking `token`.
    fn remove_if(&mut self, id: u64, token: u64) -> Option<Parked> {
        if self.by_id.get(&id).is_some_and(|p| p.token == token) {
            self.remove(id)
        } else {
            None
        }
    }

    fn forget(&mut self, uri: &str) {
        if let Some(n) = self.per_agent.get_mut(uri) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_agent.remove(uri);
            }
        }
    }

    fn parked_by(&self, uri: &str) -> usize {
        self.per_agent.get(uri).copied().unwrap_or(0)
    }

    fn len(&self) -> usize {
        self.by_id.len()
    }
}

/// What the table said about a new half.
enum Arrival {
    /// Parked as `token`, replacing `old` (counted as its outcome) if any: the same agent's
    /// older half (`Replaced`), or the peer's half whose connection has ended (`Expired`).
    Parked {
        token: u64,
        old: Option<(Parked, ResumeOutcome)>,
    },
    /// Its peer was parked: join them.
    Pair(Parked, Half),
    /// The id is parked by another pair.
    Mismatch(Half),
    /// Over a parking cap (the reason names it).
    Full(Half, String),
}

/// Serves one STREAM_RESUME that arrived as the first frame of a stream from `agent`.
pub(super) async fn resume(
    agent: Arc<Peer>,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    req: orp::StreamResume,
    rest: Bytes,
    mesh: Arc<Mesh>,
    ctx: Arc<Ctx>,
) {
    let stats = &mesh.stats.resume;
    let config = mesh.config().resume.clone();
    let config = &config;
    let half = Half {
        agent,
        req,
        send,
        recv,
    };
    if !config.enabled {
        let why = "stream resume is disabled on this relay";
        return refuse(half, stats, ResumeOutcome::Disabled, REJECT_NOT_FOUND, why).await;
    }
    if half.req.target_service.is_empty() {
        // The Go agent's STREAM_RESUME names no service: the relay could not evaluate the
        // policy again, and a stream it cannot check is not joined (closed world).
        let why = "resume needs target_service: the relay evaluates policy again (closed world)";
        return refuse(
            half,
            stats,
            ResumeOutcome::RefusedPolicy,
            REJECT_DENIED,
            why,
        )
        .await;
    }
    if let Err(why) = check_fields(&half.agent, &half.req) {
        return refuse(
            half,
            stats,
            ResumeOutcome::RefusedInvalid,
            REJECT_INVALID,
            why,
        )
        .await;
    }
    if !rest.is_empty() {
        // The agent cannot know where to retransmit from before it has the peer's positions.
        let why = "no bytes may follow STREAM_RESUME before the peer's STREAM_RESUME";
        return refuse(
            half,
            stats,
            ResumeOutcome::RefusedInvalid,
            REJECT_INVALID,
            why,
        )
        .await;
    }
    // A parked half holds one of its tenant's stream slots (so the tenant cap bounds them too);
    // once joined, the joining half's slot is the stream's.
    let Some(_slot) = mesh.tenant_stream(&half.agent.tenant) else {
        ctx.stats.limit(Limit::TenantStreams);
        let why = format!(
            "at most {} live streams per tenant",
            mesh.config().max_streams_per_tenant
        );
        return refuse(
            half,
            stats,
            ResumeOutcome::RefusedFull,
            REJECT_TENANT_FULL,
            &why,
        )
        .await;
    };
    let id = half.req.stream_id;
    // Still joined here (its agent reconnected before this relay noticed the old connection
    // end): the old join ends now, so the other end sees a reset and resumes too.
    if let Some(pair) = mesh.joined_pair(id, &half.agent.uri)
        && pair.peer_of(&half.agent.uri).uri == half.req.peer_agent_uri
    {
        pair.superseded.notify_one();
    }
    let (taken_tx, taken_rx) = oneshot::channel();
    // A parked half dies with its connection (GOAWAY, drain): it leaves the table then, not
    // at the end of the window, so a draining relay empties and the id is free again.
    let conn = half.agent.conn.clone();
    let arrival = {
        let mut table = ctx
            .parked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let arrival = match table.by_id.get(&id) {
            None if table.len() >= config.max_parked => {
                let why = format!("at most {} parked streams on this relay", config.max_parked);
                Arrival::Full(half, why)
            }
            None if table.parked_by(&half.agent.uri) >= config.max_parked_per_agent => {
                let why = format!(
                    "at most {} parked streams per agent",
                    config.max_parked_per_agent
                );
                Arrival::Full(half, why)
            }
            None => Arrival::Parked {
                token: table.insert(id, half, HeldId::claim(&mesh, id), taken_tx),
                old: None,
            },
            Some(p) if p.half.agent.uri == half.agent.uri => {
                // It reconnected once more while parked: the newer half wins.
                let old = table.remove(id).map(|mut old| {
                    let held = old.held.take();
                    (old, held)
                });
                let (old, held) = match old {
                    Some((old, held)) => (Some((old, ResumeOutcome::Replaced)), held),
                    None => (None, None),
                };
                let held = held.or_else(|| HeldId::claim(&mesh, id));
                Arrival::Parked {
                    token: table.insert(id, half, held, taken_tx),
                    old,
                }
            }
            Some(p) if pairs_with(&p.half, &half) && p.half.agent.conn.close_reason().is_some() => {
                // The right peer, but the parked half's connection is gone: that half can
                // never carry the stream (its agent resumes again, and finds this one).
                let mut stale = table.remove(id);
                let held = stale
                    .as_mut()
                    .and_then(|s| s.held.take())
                    .or_else(|| HeldId::claim(&mesh, id));
                Arrival::Parked {
                    token: table.insert(id, half, held, taken_tx),
                    old: stale.map(|s| (s, ResumeOutcome::Expired)),
                }
            }
            Some(p) if pairs_with(&p.half, &half) => match table.remove(id) {
                // `half` joins `parked`: this task drives the pair.
                Some(parked) => Arrival::Pair(parked, half),
                None => Arrival::Mismatch(half),
            },
            Some(_) => Arrival::Mismatch(half),
        };
        stats.parked.store(table.len() as u64, Ordering::Relaxed);
        arrival
    };
    match arrival {
        Arrival::Pair(parked, half) => join_pair(parked, half, _slot, &mesh, &ctx).await,
        Arrival::Full(half, why) => {
            ctx.stats.limit(Limit::ResumeParked);
            refuse(half, stats, ResumeOutcome::RefusedFull, REJECT_FULL, &why).await;
        }
        Arrival::Mismatch(half) => {
            // The parked half stays parked: its right peer can still join it.
            let why = format!("stream id {id} is parked for another pair");
            refuse(
                half,
                stats,
                ResumeOutcome::RefusedMismatch,
                REJECT_MISMATCH,
                &why,
            )
            .await;
        }
        Arrival::Parked { token, old } => {
            if let Some((old, outcome)) = old {
                stats.count(outcome);
                let Parked {
                    mut half, taken, ..
                } = old;
                let code = close_code::PEER_FAILED.into();
                let _ = half.send.reset(code);
                let _ = half.recv.stop(code);
                let _ = taken.send(());
            }
            let window = Duration::from_millis(config.park_timeout_ms);
            let gone = tokio::select! {
                taken = tokio::time::timeout(window, taken_rx) => {
                    if taken.is_ok() {
                        // Taken: joined (the joining half's task holds the stream now) or
                        // replaced.
                        return;
                    }
                    false
                }
                _ = conn.closed() => true,
            };
            let expired = {
                let mut table = ctx
                    .parked
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let mine = table.remove_if(id, token);
                stats.parked.store(table.len() as u64, Ordering::Relaxed);
                mine
            };
            if let Some(parked) = expired {
                if gone {
                    // Nobody to answer: the half's connection ended while it waited.
                    stats.count(ResumeOutcome::Expired);
                    drop(parked);
                    return;
                }
                let why = format!(
                    "resume window of {} ms expired without the peer",
                    config.park_timeout_ms
                );
                refuse(
                    parked.half,
                    stats,
                    ResumeOutcome::Expired,
                    REJECT_NOT_FOUND,
                    &why,
                )
                .await;
            }
        }
    }
}

/// Bounds and identities before anything is parked, evaluated or logged (the reason never
/// echoes a value).
fn check_fields(agent: &Peer, req: &orp::StreamResume) -> Result<(), &'static str> {
    if req.stream_id == 0 {
        return Err("stream id 0 is not allowed");
    }
    if !valid_service_name(&req.target_service) || !valid_method(&req.method) {
        return Err("target_service must be 1 to 253 and method at most 512 printable ASCII bytes");
    }
    let peer_is_agent_of_tenant = matches!(
        Identity::parse(&req.peer_agent_uri),
        Ok(Identity::Agent { tenant, .. }) if tenant.as_str() == agent.tenant
    );
    if !peer_is_agent_of_tenant || req.peer_agent_uri == agent.uri {
        return Err("peer_agent_uri must be the URI of another agent of this tenant");
    }
    Ok(())
}

/// Whether `new` is the peer half of `parked`.
fn pairs_with(parked: &Half, new: &Half) -> bool {
    parked.agent.tenant == new.agent.tenant
        && parked.req.peer_agent_uri == new.agent.uri
        && new.req.peer_agent_uri == parked.agent.uri
        && parked.req.consumer != new.req.consumer
        && parked.req.target_service == new.req.target_service
        && parked.req.method == new.req.method
}

/// What `half` sends the other half: its own STREAM_RESUME, naming itself by its certificate.
fn echo_of(half: &Half) -> Frame {
    Frame::StreamResume(orp::StreamResume {
        stream_id: half.req.stream_id,
        my_position: half.req.my_position,
        peer_ack_position: half.req.peer_ack_position,
        peer_agent_uri: half.agent.uri.clone(),
        target_service: half.req.target_service.clone(),
        method: half.req.method.clone(),
        consumer: half.req.consumer,
    })
}

/// Two matching halves: the id, the policy again, the echoes, then one join.
async fn join_pair(
    parked: Parked,
    new: Half,
    _slot: crate::mesh::TenantStream<'_>,
    mesh: &Arc<Mesh>,
    ctx: &Ctx,
) {
    let stats = &mesh.stats.resume;
    let Parked {
        half: old,
        held,
        taken,
        ..
    } = parked;
    // The parked half's task ends: this task (and its tenant slot) carries the stream now.
    let _ = taken.send(());
    let (mut c, mut p) = if old.req.consumer {
        (old, new)
    } else {
        (new, old)
    };
    let id = c.req.stream_id;
    let Some(_id) = held.or_else(|| HeldId::claim(mesh, id)) else {
        // The old stream still holds the id here (its connection's end is not noticed yet).
        let why = format!("stream id {id} is in use by a live stream");
        return refuse_both(
            c,
            p,
            stats,
            ResumeOutcome::RefusedMismatch,
            REJECT_MISMATCH,
            &why,
        )
        .await;
    };
    let tenant = c.agent.tenant.clone();
    let service = c.req.target_service.clone();
    let method = c.req.method.clone();

    // Caller side, then callee side, exactly as an open (subscribed before the policy is read).
    let changes = mesh.policy_changes();
    let caller_row = AuditRow {
        tenant: &tenant,
        caller: &c.agent.uri,
        target: &service,
        method: &method,
        stream_id: id,
    };
    let decided = caller_decision(mesh, &caller_row, "resume ").and_then(|(policy, verdict)| {
        callee_decision(mesh, &policy, &caller_row, &p.agent.uri, "resume ")
            .map(|callee| (verdict, callee))
    });
    let (verdict, callee) = match decided {
        Ok(both) => both,
        Err(why) => {
            let (outcome, code) = (ResumeOutcome::RefusedPolicy, REJECT_DENIED);
            return refuse_both(c, p, stats, outcome, code, &why).await;
        }
    };

    // Each half gets the other's positions; from here each retransmits what the other lacks.
    let (to_c, to_p) = (echo_of(&p), echo_of(&c));
    let deadline = Duration::from_millis(mesh.config().open_timeout_ms);
    let wrote = tokio::time::timeout(deadline, async {
        let (a, b) = tokio::join!(
            write_frame(&mut c.send, &to_c),
            write_frame(&mut p.send, &to_p)
        );
        a.and(b)
    })
    .await
    .unwrap_or_else(|_| Err("timed out".to_owned()));
    if let Err(e) = wrote {
        tracing::debug!(stream_id = id, error = %e, "resumed halves could not be told");
        // The half still there resumes again (its peer will too, once reconnected).
        let code = close_code::PEER_LOST.into();
        for h in [&mut c, &mut p] {
            let _ = h.send.reset(code);
            let _ = h.recv.stop(code);
        }
        mesh.stats.streams_failed.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let retransmitted = p
        .req
        .my_position
        .saturating_sub(c.req.peer_ack_position)
        .saturating_add(c.req.my_position.saturating_sub(p.req.peer_ack_position));
    stats
        .bytes_retransmitted
        .fetch_add(retransmitted, Ordering::Relaxed);
    stats.count(ResumeOutcome::Resumed);
    let superseded = Arc::new(tokio::sync::Notify::new());
    mesh.stream_joined(
        id,
        JoinedPair {
            consumer: PairEnd {
                uri: c.agent.uri.clone(),
                control: c.agent.control.clone(),
                relay: None,
            },
            provider: PairEnd {
                uri: p.agent.uri.clone(),
                control: p.agent.control.clone(),
                relay: None,
            },
            p2p_forbidden: verdict.p2p_forbidden || callee.p2p_forbidden,
            superseded: superseded.clone(),
        },
    );
    tracing::debug!(stream_id = id, consumer = %c.agent.uri, provider = %p.agent.uri, service, "stream resumed");
    let (consumer_uri, provider_uri) = (c.agent.uri.clone(), p.agent.uri.clone());
    let halves = Halves {
        c_send: c.send,
        c_recv: c.recv,
        p_send: p.send,
        p_recv: p.recv,
    };
    let check = Recheck {
        mesh,
        tenant: &tenant,
        consumer: &consumer_uri,
        provider: &provider_uri,
        service: &service,
        method: &method,
        rule_expires_unix_ms: verdict.rule_expires_unix_ms,
        changes,
    };
    let idle = Idle {
        timeout: Duration::from_millis(mesh.config().stream_idle_timeout_ms),
        stats: &ctx.stats,
    };
    // The provider tenant's bandwidth limit, as for an open (issue 21).
    let limit = ctx.bandwidth.tenant(&tenant);
    join(
        halves,
        (Bytes::new(), Bytes::new()),
        check,
        idle,
        &superseded,
        &limit,
    )
    .await;
}

/// STREAM_REJECT on `half`, then FIN; counted as `outcome`.
async fn refuse(
    mut half: Half,
    stats: &ResumeStats,
    outcome: ResumeOutcome,
    code: u32,
    reason: &str,
) {
    stats.count(outcome);
    reject_half(&mut half, code, reason).await;
}

/// The same refusal to both halves of a pair, counted once.
async fn refuse_both(
    mut a: Half,
    mut b: Half,
    stats: &ResumeStats,
    outcome: ResumeOutcome,
    code: u32,
    reason: &str,
) {
    stats.count(outcome);
    tokio::join!(
        reject_half(&mut a, code, reason),
        reject_half(&mut b, code, reason)
    );
}

async fn reject_half(half: &mut Half, code: u32, reason: &str) {
    tracing::debug!(
        code,
        reason,
        stream_id = half.req.stream_id,
        "stream resume refused"
    );
    let frame = Frame::StreamReject(orp::StreamReject {
        code,
        reason: reason.to_owned(),
        request_id: 0,
    });
    if write_frame(&mut half.send, &frame).await.is_ok() {
        let _ = half.send.finish();
    }
    let _ = half.recv.stop(close_code::NO_ERROR.into());
}
