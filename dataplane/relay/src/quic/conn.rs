//! One agent connection: handshake, HELLO, then the control-stream loop.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use outrelay_proto::frame::{
    Decoded, Frame, FrameError, MAX_CONTROL_FRAME_PAYLOAD_BYTES, MAX_FIRST_FRAME_PAYLOAD_BYTES,
    decode_limited,
};
use outrelay_proto::identity::Identity;
use outrelay_proto::orp;
use outrelay_proto::reverse::{EXPORTER_KEY_BYTES, EXPORTER_LABEL};
use rustls::pki_types::CertificateDer;
use tokio::sync::{mpsc, watch};

use super::stats::{Limit, SignalOutcome, bump};
use super::{
    Admission, AgentConn, Ctx, IMPLEMENTED_FEATURES, LeaseEvent, LeaseEventKind, PROTOCOL_VERSION,
    close_code, lease_kind, streams,
};
use crate::lease::{ConnId, GrantAddrs, LeaseErrorCode, Refusal, release_frame};
use outrelay_proto::hostname::LeaseName;

/// Bytes read from the control stream per call.
const READ_CHUNK_BYTES: usize = 16 * 1024;
/// STREAM_REJECT code for REGISTER where service registration is not served (no mesh, or a
/// peer that is not an agent) and when the registry cannot be reached.
const REJECT_UNAVAILABLE: u32 = 503;
/// STREAM_REJECT code for a REGISTER with an invalid service name.
const REJECT_INVALID: u32 = 400;
/// STREAM_REJECT code for a REGISTER over the per-agent service bound.
const REJECT_TOO_MANY: u32 = 429;

/// Why a connection ended (the close code and reason sent to the agent).
struct End {
    code: u32,
    reason: String,
}

impl End {
    fn new(code: u32, reason: impl Into<String>) -> End {
        End {
            code,
            reason: reason.into(),
        }
    }
}

/// Drives one incoming connection to its end, then removes its leases.
pub(crate) async fn handle(incoming: quinn::Incoming, conn_id: ConnId, ctx: Arc<Ctx>) {
    let conn = match incoming.await {
        Ok(conn) => conn,
        Err(e) => {
            bump(&ctx.stats.handshakes_failed);
            tracing::debug!(error = %e, "agent handshake failed");
            return;
        }
    };
    bump(&ctx.stats.connections_accepted);
    if ctx.draining.load(Ordering::Acquire) {
        // Refused before anything is read: an agent sent away by the drain's GOAWAY must not
        // come straight back; it goes to its other relays.
        bump(&ctx.stats.refused_draining);
        conn.close(close_code::DRAINING.into(), super::DRAIN_REASON.as_bytes());
        return;
    }
    // TLS checks the certificate only at the handshake: the connection ends at its notAfter
    // (review M5).
    let expiry = cert_expiry(&conn);
    // A peer relay (forwarded streams only): no HELLO, no leases, no registry entry.
    if let Some((outrelay_proto::identity::Identity::Relay { id, .. }, uri)) = peer_identity(&conn)
    {
        let Some(_slot) = IdentitySlot::take(&ctx, &uri) else {
            ctx.stats.limit(Limit::IdentityConnections);
            conn.close(
                close_code::TOO_MANY_CONNECTIONS.into(),
                b"too many connections",
            );
            return;
        };
        tokio::select! {
            () = super::forward::serve_relay(&conn, id.as_str().to_owned(), &ctx) => {}
            () = expiry => conn.close(close_code::CERT_EXPIRED.into(), b"certificate expired"),
        }
        return;
    }
    let end = tokio::select! {
        served = serve(&conn, conn_id, &ctx) => match served {
            Ok(()) => End::new(close_code::NO_ERROR, "control stream ended"),
            Err(end) => end,
        },
        () = expiry => End::new(close_code::CERT_EXPIRED, "certificate expired"),
    };
    conn.close(end.code.into(), end.reason.as_bytes());
    ctx.agents().remove(&conn_id);
    if let Some(mesh) = ctx.mesh.get() {
        mesh.connection_closed(conn_id);
    }
    ctx.connection_closed(conn_id).await;
    tracing::debug!(conn = conn_id.0, reason = %end.reason, "agent connection ended");
}

/// Sleeps until the peer certificate's notAfter (forever when it cannot be read: the identity
/// check then ends the connection anyway).
async fn cert_expiry(conn: &quinn::Connection) {
    let not_after = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|certs| super::tls::cert_not_after_unix_s(certs.first()?));
    let Some(not_after) = not_after else {
        return std::future::pending().await;
    };
    let now_ms = crate::unix_ms();
    let left_ms = not_after.saturating_mul(1000).saturating_sub(now_ms).max(0);
    tokio::time::sleep(Duration::from_millis(u64::try_from(left_ms).unwrap_or(0))).await;
}

/// The peer's identity and its certificate's URI SAN exactly as written.
fn peer_identity(conn: &quinn::Connection) -> Option<(Identity, String)> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    super::cert_identity(certs.first()?).ok()
}

async fn serve(conn: &quinn::Connection, conn_id: ConnId, ctx: &Arc<Ctx>) -> Result<(), End> {
    let (identity, cert_uri) = peer_identity(conn)
        .ok_or_else(|| End::new(close_code::BAD_IDENTITY, "no peer identity"))?;
    // Per-identity connection budget, taken before anything else is read: a fleet of
    // connections under one certificate multiplies every per-connection budget.
    let Some(_slot) = IdentitySlot::take(ctx, &cert_uri) else {
        ctx.stats.limit(Limit::IdentityConnections);
        return Err(End::new(
            close_code::TOO_MANY_CONNECTIONS,
            format!(
                "at most {} connections per agent identity",
                ctx.config().max_connections_per_identity
            ),
        ));
    };

    // HELLO: the first bidirectional stream, within the deadline.
    let deadline = Duration::from_millis(ctx.config().hello_deadline_ms);
    let hello = tokio::time::timeout(deadline, async {
        let (send, recv) = conn
            .accept_bi()
            .await
            .map_err(|e| End::new(close_code::NO_ERROR, format!("connection lost: {e}")))?;
        let mut reader = FrameReader::new(recv, MAX_FIRST_FRAME_PAYLOAD_BYTES);
        let frame = reader.next(ctx).await?;
        reader.limit = MAX_CONTROL_FRAME_PAYLOAD_BYTES;
        Ok::<_, End>((send, reader, frame))
    })
    .await;
    let (send, mut reader, frame) = match hello {
        Ok(r) => r?,
        Err(_) => {
            bump(&ctx.stats.refused_hello_timeout);
            return Err(End::new(close_code::HELLO_TIMEOUT, "no HELLO in time"));
        }
    };
    let hello = match frame {
        Some(Frame::Hello(h)) => h,
        Some(other) => {
            bump(&ctx.stats.protocol_errors);
            return Err(End::new(
                close_code::PROTOCOL_ERROR,
                format!("expected HELLO, got {}", other.frame_type().name()),
            ));
        }
        None => {
            return Err(End::new(
                close_code::NO_ERROR,
                "control stream ended before HELLO",
            ));
        }
    };
    if hello.agent_uri != cert_uri || hello.protocol_version != PROTOCOL_VERSION {
        bump(&ctx.stats.refused_hello_mismatch);
        return Err(End::new(
            close_code::HELLO_MISMATCH,
            "HELLO does not match the certificate or protocol",
        ));
    }
    let (tx, rx) = mpsc::channel(ctx.config().control_send_queue_max);
    // Stream resume is offered only while the mesh's `[resume] enabled` says so.
    let resume_offered = ctx.mesh.get().is_some_and(|m| m.config().resume.enabled);
    let asked = |feature: &str| hello.capabilities.iter().any(|c| c == feature);
    let resume = resume_offered && asked(super::FEATURE_STREAM_RESUME);
    // Registered BEFORE the revocation check: a revocation that lands in between is either
    // seen by `admit` or finds this connection in the registry and closes it.
    ctx.agents().insert(
        conn_id,
        AgentConn {
            uri: cert_uri.clone(),
            conn: conn.clone(),
            control: tx.downgrade(),
            resume,
        },
    );
    match ctx.decider.admit(&identity) {
        Admission::Admit => {}
        Admission::Revoked => {
            bump(&ctx.stats.refused_revoked);
            return Err(End::new(close_code::REVOKED, "identity revoked"));
        }
        Admission::NotReady => {
            bump(&ctx.stats.refused_revocations_unavailable);
            return Err(End::new(
                close_code::REVOCATIONS_UNAVAILABLE,
                "relay has no revocation list yet; retry later",
            ));
        }
    }

    let drain = Duration::from_millis(ctx.config().drain_grace_ms);
    let writer = tokio::spawn(write_frames(send, rx, drain));
    let out = Out { tx, ctx };
    out.send(Frame::HelloAck(orp::HelloAck {
        session_id: random_hex(),
        server_time_unix_ms: crate::unix_ms(),
        accepted_features: hello
            .capabilities
            .iter()
            .filter(|c| IMPLEMENTED_FEATURES.contains(&c.as_str()))
            .filter(|c| resume_offered || c.as_str() != super::FEATURE_STREAM_RESUME)
            .cloned()
            .collect(),
    }))?;
    // Later bidirectional streams carry OPEN_STREAM: served by the mesh for agents, refused
    // otherwise (no mesh, or a relay peer: relay-to-relay forwarding is not built).
    let refuser = match (ctx.mesh.get(), &identity) {
        (Some(mesh), Identity::Agent { tenant, .. }) => {
            mesh.connection_opened(conn_id, tenant.as_str(), &cert_uri);
            let consumer = Arc::new(streams::Peer {
                tenant: tenant.as_str().to_owned(),
                uri: cert_uri.clone(),
                conn: conn.clone(),
                control: out.tx.downgrade(),
                explicit_accept: asked(super::FEATURE_STREAM_ACCEPT),
                resume,
            });
            tokio::spawn(streams::accept(consumer, mesh.clone(), ctx.clone()))
        }
        _ => tokio::spawn(refuse_streams(conn.clone(), ctx.clone())),
    };
    let _datagrams = ctx
        .udp
        .get()
        .cloned()
        .map(|udp| AbortOnDrop(tokio::spawn(read_datagrams(conn.clone(), conn_id, udp))));

    let mut shutdown = ctx.shutdown.clone();
    let mut drain = ctx.drain.subscribe();
    // A drain that started before this subscription (between the accept check and here).
    if drain.borrow().is_some() {
        drain.mark_changed();
    }
    let mut bucket = {
        let config = ctx.config();
        Bucket::new(config.lease_frames_per_s, config.lease_frames_burst)
    };
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    let result = loop {
        tokio::select! {
            frame = reader.next(ctx) => {
                match frame {
                    Ok(Some(frame)) => {
                        if costly(&frame)
                            && let Some(wait) = bucket.take(tokio::time::Instant::now())
                        {
                            // Paced, not refused: nothing is lost, the agent's own frames wait
                            // in its stream window, and the lease lock is taken at most at the
                            // configured rate by this connection.
                            ctx.stats.limit(Limit::LeaseFrameRate);
                            tokio::time::sleep(wait).await;
                        }
                        if let Err(end) = on_frame(frame, conn, conn_id, &identity, &out).await {
                            break Err(end);
                        }
                    }
                    Ok(None) => break Ok(()),
                    Err(end) => break Err(end),
                }
            }
            changed = goaway_changed(&mut shutdown, &mut drain) => match changed {
                Some((goaway, true)) => {
                    let _ = out.send(Frame::GoAway(goaway));
                    let deadline = tokio::time::Instant::now()
                        + Duration::from_millis(ctx.config().drain_grace_ms);
                    // Closing the queue makes the writer finish the stream and wait (up to the
                    // drain grace) for the agent's transport to acknowledge it.
                    drop(out);
                    let _ = writer.await;
                    // An acknowledged stream is not a read one: closing now can discard GOAWAY
                    // from the agent's receive buffer before its reader sees it. The agent closes
                    // the connection once it has acted on GOAWAY; wait for that, within the grace.
                    let _ = tokio::time::timeout_at(deadline, conn.closed()).await;
                    refuser.abort();
                    return Err(End::new(close_code::GOING_AWAY, "relay stopping"));
                }
                Some((goaway, false)) => {
                    // Draining: the connection keeps being served (frames in flight get their
                    // answers, new leases are refused) until the agent leaves, at most the
                    // drain grace.
                    if let Err(end) = out.send(Frame::GoAway(goaway)) {
                        break Err(end);
                    }
                    drain_deadline = Some(
                        tokio::time::Instant::now()
                            + Duration::from_millis(ctx.config().drain_grace_ms),
                    );
                }
                None => {}
            },
            () = sleep_until_some(drain_deadline) => {
                break Err(End::new(close_code::GOING_AWAY, super::DRAIN_REASON));
            }
        }
    };
    refuser.abort();
    writer.abort();
    if let Err(end) = &result
        && end.code == close_code::PROTOCOL_ERROR
    {
        // The control stream is the session: a protocol error on it ends both.
        reader.recv.stop(end.code.into()).ok();
    }
    result
}

/// Sleeps until `deadline`; forever without one.
async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Waits for a GOAWAY to send: the relay stopping (`true`) or draining (`false`). `None`: a
/// watch changed without one (the caller loops).
async fn goaway_changed(
    shutdown: &mut watch::Receiver<Option<orp::GoAway>>,
    drain: &mut watch::Receiver<Option<orp::GoAway>>,
) -> Option<(orp::GoAway, bool)> {
    tokio::select! {
        _ = shutdown.changed() => shutdown.borrow().clone().map(|g| (g, true)),
        _ = drain.changed() => drain.borrow().clone().map(|g| (g, false)),
    }
}

/// The connection's side of the bounded control-stream send queue.
struct Out<'a> {
    tx: mpsc::Sender<Frame>,
    ctx: &'a Ctx,
}

impl Out<'_> {
    fn send(&self, frame: Frame) -> Result<(), End> {
        match self.tx.try_send(frame) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                bump(&self.ctx.stats.send_queue_overflows);
                Err(End::new(
                    close_code::SEND_QUEUE_OVERFLOW,
                    "control send queue overflow",
                ))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(End::new(
                close_code::NO_ERROR,
                "control stream writer ended",
            )),
        }
    }

    fn lease_error(&self, request_id: u64, refusal: &Refusal) -> Result<(), End> {
        self.ctx.stats.count_lease_error(refusal.code);
        self.send(Frame::LeaseError(refusal.to_frame(request_id)))
    }
}

async fn on_frame(
    frame: Frame,
    conn: &quinn::Connection,
    conn_id: ConnId,
    identity: &Identity,
    out: &Out<'_>,
) -> Result<(), End> {
    let ctx = out.ctx;
    ctx.stats.count_frame(frame.frame_type());
    let config = ctx.config();
    let addrs = GrantAddrs {
        public_host: &config.public_host,
        reverse_addr: &config.reverse_addr,
    };
    match frame {
        Frame::Ping => out.send(Frame::Pong),
        Frame::Pong => Ok(()),
        Frame::LeaseRegister(req) if ctx.draining.load(Ordering::Acquire) => {
            // No new lease while draining; renewals of held ones go on until the agent leaves.
            out.lease_error(
                req.request_id,
                &Refusal {
                    code: LeaseErrorCode::Draining,
                    message: super::DRAIN_REASON.into(),
                },
            )
        }
        Frame::LeaseRegister(req) => {
            let decision = ctx.decider.decide(identity, &req);
            let mut ids = || {
                let mut id = [0u8; 16];
                // A failing OS RNG leaves zeros; the table then refuses a duplicate id with
                // `internal` after its retries rather than handing out a guessable one twice.
                if getrandom::fill(&mut id).is_err() {
                    tracing::error!("getrandom failed for a lease id");
                }
                id
            };
            let answer = {
                let mut control = ctx.control.lock().await;
                let now = Instant::now();
                match control
                    .table
                    .register(conn_id, identity, &req, &decision, &mut ids, now)
                {
                    Ok(grant) => {
                        let mut key = [0u8; EXPORTER_KEY_BYTES];
                        match conn.export_keying_material(
                            &mut key,
                            EXPORTER_LABEL,
                            &grant.lease_id.0,
                        ) {
                            Ok(()) => {
                                if let Some(lease) = control.table.get(&grant.lease_id) {
                                    ctx.decider
                                        .report(LeaseEvent::of(LeaseEventKind::Granted, lease));
                                }
                                control.keys.insert(grant.lease_id, key);
                                ctx.publish(&mut control);
                                Ok(grant.to_frame(req.request_id, addrs, now, crate::unix_ms()))
                            }
                            Err(_) => {
                                // Without K no reverse session could authenticate: undo.
                                let _ = control.table.release(conn_id, &grant.lease_id.0, now);
                                ctx.publish(&mut control);
                                Err(Refusal::from(LeaseErrorCode::Internal))
                            }
                        }
                    }
                    Err(refusal) => {
                        if refusal.message == crate::lease::AGENT_LEASE_LIMIT {
                            ctx.stats.limit(Limit::AgentLeases);
                        }
                        ctx.publish_if_changed(&mut control);
                        if decision == crate::lease::ControllerDecision::PendingApproval
                            && refusal.code == LeaseErrorCode::LeaseRejected
                        {
                            let ttl_s = control.table.effective_ttl_s(req.ttl_s);
                            report_request(ctx, identity, &req, ttl_s);
                        }
                        Err(refusal)
                    }
                }
            };
            match answer {
                Ok(grant) => out.send(Frame::LeaseGrant(grant)),
                Err(refusal) => out.lease_error(req.request_id, &refusal),
            }
        }
        Frame::LeaseRenew(req) => {
            let answer = {
                let mut control = ctx.control.lock().await;
                let now = Instant::now();
                let r = control.table.renew(conn_id, &req.lease_id, req.ttl_s, now);
                // A renewal changes no route: only leases that expired meanwhile (found by the
                // table's own expiry) republish. A refused renew publishes nothing (M1).
                ctx.publish_if_changed(&mut control);
                if let Ok(g) = &r
                    && let Some(lease) = control.table.get(&g.lease_id)
                {
                    ctx.decider
                        .report(LeaseEvent::of(LeaseEventKind::Renewed, lease));
                }
                r.map(|g| g.to_frame(req.request_id, addrs, now, crate::unix_ms()))
            };
            match answer {
                Ok(grant) => out.send(Frame::LeaseGrant(grant)),
                Err(refusal) => out.lease_error(req.request_id, &refusal),
            }
        }
        Frame::LeaseRelease(req) => {
            let answer = {
                let mut control = ctx.control.lock().await;
                let r = control
                    .table
                    .release(conn_id, &req.lease_id, Instant::now());
                ctx.publish_if_changed(&mut control);
                if let Ok(lease) = &r {
                    ctx.decider
                        .report(LeaseEvent::of(LeaseEventKind::Released, lease));
                }
                r.map(|lease| release_frame(req.request_id, lease.id))
            };
            match answer {
                Ok(grant) => out.send(Frame::LeaseGrant(grant)),
                Err(refusal) => out.lease_error(req.request_id, &refusal),
            }
        }
        Frame::Register(req) => register(req, conn, conn_id, identity, out),
        Frame::ObservedAddrQuery(q) => {
            // The agent's address as this relay sees it (Go agents use it as their
            // server-reflexive P2P candidate).
            // Through the TCP fallback: the tunnel's TCP peer, not its synthetic address.
            let addr = ctx.tunnels.real_peer(conn.remote_address());
            let ip = addr.ip().to_canonical();
            bump(&ctx.stats.observed_addr_answers);
            out.send(Frame::ObservedAddrResp(orp::ObservedAddrResp {
                request_id: q.request_id,
                ip: ip.to_string(),
                port: u32::from(addr.port()),
            }))
        }
        Frame::CandidateOffer(orp::CandidateOffer { stream_id, .. })
        | Frame::CandidateAnswer(orp::CandidateAnswer { stream_id, .. }) => {
            forward_signal(ctx, identity, stream_id, frame, true);
            Ok(())
        }
        Frame::StreamCheckpoint(orp::StreamCheckpoint { stream_id, .. }) => {
            forward_signal(ctx, identity, stream_id, frame, false);
            Ok(())
        }
        Frame::MigrateToP2P(m) => {
            bump(&ctx.stats.migrations_to_p2p);
            tracing::info!(agent = %identity, stream_id = m.stream_id, "agent moved a stream to a direct path");
            Ok(())
        }
        other => {
            // Known, but not something an agent sends on its control stream: counted and
            // skipped, as the Go relay does (docs/protocol.md, compatibility rules).
            bump(&ctx.stats.frames_ignored);
            tracing::debug!(
                agent = %identity,
                frame = other.frame_type().name(),
                "frame ignored on the control stream"
            );
            Ok(())
        }
    }
}

/// Forwards a P2P signal (`candidate`) or a STREAM_CHECKPOINT of `stream_id` from `from` to
/// the other end of that joined stream, as the Go relay does. Nothing is forwarded for a stream
/// `from` is not on, nor candidates when the policy forbids P2P; a full peer queue drops the
/// signal (each outcome counted).
fn forward_signal(ctx: &Ctx, from: &Identity, stream_id: u64, frame: Frame, candidate: bool) {
    let from = from.to_string();
    // A checkpoint may come after the join ended cleanly (the last one is sent on FIN).
    let pair = ctx.mesh.get().and_then(|m| {
        m.joined_pair(stream_id, &from).or_else(|| {
            (!candidate)
                .then(|| m.ended_pair(stream_id, &from))
                .flatten()
        })
    });
    let outcome = match pair {
        None => SignalOutcome::NoPair,
        Some(pair) if candidate && pair.p2p_forbidden => SignalOutcome::Forbidden,
        Some(pair) => match pair.peer_of(&from).control.upgrade() {
            Some(to) if to.try_send(frame).is_ok() => SignalOutcome::Forwarded,
            _ => SignalOutcome::PeerQueueFull,
        },
    };
    ctx.stats.count_signal(outcome);
}

/// REGISTER: checked here, then registered with the backend (the controller's registry) on a
/// task of its own, so a slow controller never stalls the control stream; the answer
/// (REGISTER_ACK, or STREAM_REJECT carrying the request id) goes through the control queue.
fn register(
    req: orp::Register,
    conn: &quinn::Connection,
    conn_id: ConnId,
    identity: &Identity,
    out: &Out<'_>,
) -> Result<(), End> {
    let ctx = out.ctx;
    let refuse = |code: u32, reason: String| {
        if let Some(mesh) = ctx.mesh.get() {
            bump(&mesh.stats.registrations_rejected);
        }
        out.send(Frame::StreamReject(orp::StreamReject {
            code,
            reason,
            request_id: req.request_id,
        }))
    };
    let (Some(mesh), Identity::Agent { tenant, .. }) = (ctx.mesh.get(), identity) else {
        return refuse(
            REJECT_UNAVAILABLE,
            "service registration is not available on this relay".to_owned(),
        );
    };
    if !crate::mesh::valid_service_name(&req.service_name) {
        return refuse(
            REJECT_INVALID,
            "service name must be 1 to 253 printable ASCII bytes".to_owned(),
        );
    }
    if !outrelay_proto::fields::valid_local_addr(&req.local_addr) {
        ctx.stats.limit(Limit::LocalAddr);
        return refuse(
            REJECT_INVALID,
            "local_addr must be empty or host:port, at most 255 bytes".to_owned(),
        );
    }
    // The cap counts registrations still waiting for the controller: checked and reserved in
    // one step, so pipelined REGISTERs cannot all pass the check (review H6).
    let Some(pending) = mesh.reserve_registration(conn_id) else {
        ctx.stats.limit(Limit::Services);
        return refuse(
            REJECT_TOO_MANY,
            format!(
                "at most {} services per agent connection",
                mesh.config().max_services_per_agent
            ),
        );
    };
    let reg = crate::mesh::Registration {
        tenant: tenant.as_str().to_owned(),
        service: req.service_name,
        agent_uri: identity.to_string(),
        local_addr: req.local_addr,
    };
    // Who may provide it (review M12): refused before the backend hears of it (counted by
    // the mesh), and checked again when it is recorded.
    if let Err(rejection) = mesh.check_provider(&reg) {
        return out.send(Frame::StreamReject(orp::StreamReject {
            code: rejection.code,
            reason: rejection.reason,
            request_id: req.request_id,
        }));
    }
    let (mesh, tx, conn, request_id) = (
        mesh.clone(),
        out.tx.downgrade(),
        conn.clone(),
        req.request_id,
    );
    let overflows = ctx.stats.clone();
    tokio::spawn(async move {
        let answer = match mesh.backend().register(reg.clone()).await {
            Ok(service_id) => {
                let recorded = mesh.register_local(conn_id, &reg);
                drop(pending);
                match recorded {
                    Ok(true) => {
                        bump(&mesh.stats.registrations_ok);
                        tracing::debug!(tenant = %reg.tenant, service = %reg.service, agent = %reg.agent_uri, "service registered");
                        Frame::RegisterAck(orp::RegisterAck {
                            service_id,
                            request_id,
                        })
                    }
                    Ok(false) => return, // the connection ended meanwhile
                    // Another identity won the race for the service (counted by the mesh).
                    Err(rejection) => Frame::StreamReject(orp::StreamReject {
                        code: rejection.code,
                        reason: rejection.reason,
                        request_id,
                    }),
                }
            }
            Err(rejection) => {
                bump(&mesh.stats.registrations_rejected);
                Frame::StreamReject(orp::StreamReject {
                    code: rejection.code,
                    reason: rejection.reason,
                    request_id,
                })
            }
        };
        let Some(tx) = tx.upgrade() else {
            return; // the connection is ending
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(answer) {
            bump(&overflows.send_queue_overflows);
            conn.close(
                close_code::SEND_QUEUE_OVERFLOW.into(),
                b"control send queue overflow",
            );
        }
    });
    Ok(())
}

/// A register refused with `pending_approval`: the controller creates its pending record from
/// this request (so an admin can approve it). The record lives for the TTL the lease would get
/// (`ttl_s`, never the request's 0), so it is still there when the admin looks.
fn report_request(ctx: &Ctx, identity: &Identity, req: &orp::LeaseRegister, ttl_s: u32) {
    let (Identity::Agent { tenant, .. }, Ok(name)) = (identity, LeaseName::parse(&req.name)) else {
        return;
    };
    ctx.decider.report(LeaseEvent {
        kind: LeaseEventKind::Requested,
        tenant: tenant.as_str().to_owned(),
        name: name.as_str().to_owned(),
        agent_uri: identity.to_string(),
        lease_kind: lease_kind(req.tls, req.tcp, req.udp),
        ttl_s,
    });
}

/// Incremental frame reader over the control stream.
///
/// A frame declaring more than `limit` payload bytes is refused from its header, so `buf`
/// never holds more than one header, `limit` bytes and one read chunk.
struct FrameReader {
    recv: quinn::RecvStream,
    buf: Vec<u8>,
    chunk: Vec<u8>,
    limit: u32,
}

impl FrameReader {
    fn new(recv: quinn::RecvStream, limit: u32) -> FrameReader {
        FrameReader {
            recv,
            buf: Vec::new(),
            chunk: vec![0; READ_CHUNK_BYTES],
            limit,
        }
    }

    /// The next frame; `None` when the agent finished the stream between frames.
    async fn next(&mut self, ctx: &Ctx) -> Result<Option<Frame>, End> {
        loop {
            let protocol = |e: FrameError| {
                if let FrameError::PayloadOverLimit { .. } = e {
                    ctx.stats.limit(Limit::ControlFrameTooLarge);
                    return End::new(close_code::FRAME_TOO_LARGE, e.to_string());
                }
                bump(&ctx.stats.protocol_errors);
                End::new(close_code::PROTOCOL_ERROR, e.to_string())
            };
            match decode_limited(&self.buf, self.limit).map_err(protocol)? {
                Decoded::Frame { frame, used } => {
                    let decoded = Frame::decode(&frame);
                    if let Err(FrameError::UnknownType(_)) = decoded {
                        // A type this relay does not know (a newer or a Go agent's): counted
                        // and skipped, never fatal (docs/protocol.md, compatibility rules).
                        bump(&ctx.stats.frames_unknown);
                        self.buf.drain(..used);
                        continue;
                    }
                    let decoded = decoded.map_err(protocol)?;
                    self.buf.drain(..used);
                    return Ok(Some(decoded));
                }
                Decoded::NeedMore { .. } => {}
            }
            match self.recv.read(&mut self.chunk).await {
                Ok(Some(n)) => self
                    .buf
                    .extend_from_slice(self.chunk.get(..n).unwrap_or_default()),
                Ok(None) if self.buf.is_empty() => return Ok(None),
                Ok(None) => {
                    bump(&ctx.stats.protocol_errors);
                    return Err(End::new(close_code::PROTOCOL_ERROR, "truncated frame"));
                }
                Err(e) => {
                    return Err(End::new(
                        close_code::NO_ERROR,
                        format!("control stream: {e}"),
                    ));
                }
            }
        }
    }
}

/// Frames that take the lease lock or queue a registry call: paced by the connection's
/// token bucket.
fn costly(frame: &Frame) -> bool {
    matches!(
        frame,
        Frame::LeaseRegister(_)
            | Frame::LeaseRenew(_)
            | Frame::LeaseRelease(_)
            | Frame::Register(_)
    )
}

/// A token bucket: `rate` tokens a second up to `burst`. [`Bucket::take`] takes one and says
/// how long to wait first when none was left (the debt is paid by that wait).
pub(super) struct Bucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: tokio::time::Instant,
}

impl Bucket {
    pub(super) fn new(rate: u32, burst: u32) -> Bucket {
        Bucket {
            tokens: f64::from(burst),
            rate: f64::from(rate.max(1)),
            burst: f64::from(burst.max(1)),
            last: tokio::time::Instant::now(),
        }
    }

    pub(super) fn take(&mut self, now: tokio::time::Instant) -> Option<Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            return None;
        }
        Duration::try_from_secs_f64(-self.tokens / self.rate).ok()
    }
}

/// One of an identity's connection slots, given back on drop.
struct IdentitySlot<'a> {
    ctx: &'a Ctx,
    uri: String,
}

impl<'a> IdentitySlot<'a> {
    fn take(ctx: &'a Ctx, uri: &str) -> Option<IdentitySlot<'a>> {
        let mut map = ctx.identities();
        let n = map.entry(uri.to_owned()).or_insert(0);
        if *n >= ctx.config().max_connections_per_identity {
            return None;
        }
        *n += 1;
        Some(IdentitySlot {
            ctx,
            uri: uri.to_owned(),
        })
    }
}

impl Drop for IdentitySlot<'_> {
    fn drop(&mut self) {
        let mut map = self.ctx.identities();
        if let Some(n) = map.get_mut(&self.uri) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.uri);
            }
        }
    }
}

/// Drains the queue into the control stream; when the queue closes, finishes the stream and
/// waits up to `drain` for the agent to acknowledge it.
async fn write_frames(mut send: quinn::SendStream, mut rx: mpsc::Receiver<Frame>, drain: Duration) {
    let mut bytes = Vec::new();
    while let Some(frame) = rx.recv().await {
        bytes.clear();
        if frame.encode(&mut bytes).is_err() || send.write_all(&bytes).await.is_err() {
            return;
        }
    }
    if send.finish().is_ok() {
        let _ = tokio::time::timeout(drain, send.stopped()).await;
    }
}

/// Refuses every bidirectional stream after the control stream (OPEN_STREAM is not served yet).
/// Aborts its task when dropped (the connection's serve ends on every path).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Hands every QUIC datagram of the connection to the UDP ingress until the connection ends.
async fn read_datagrams(
    conn: quinn::Connection,
    conn_id: ConnId,
    udp: Arc<crate::udp::UdpIngress>,
) {
    while let Ok(datagram) = conn.read_datagram().await {
        udp.from_agent(conn_id, datagram);
    }
}

async fn refuse_streams(conn: quinn::Connection, ctx: Arc<Ctx>) {
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        bump(&ctx.stats.streams_refused);
        let code = close_code::STREAM_UNSUPPORTED.into();
        let _ = send.reset(code);
        let _ = recv.stop(code);
    }
}

/// 16 random bytes as lowercase hex (the HELLO_ACK session id).
fn random_hex() -> String {
    let mut bytes = [0u8; 16];
    if getrandom::fill(&mut bytes).is_err() {
        tracing::error!("getrandom failed for a session id");
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
