//! The relay's local admin socket (`/run/outrelay/relay.sock` by default, mode 0660): lease and
//! tenant information lives here, never on the public side.
//!
//! Protocol: the client writes one command line (`status`, `drain`, `upgrade [timeout_s]`),
//! the relay answers one JSON document and closes. `upgrade` hands the sockets to a new
//! process (see [`crate::upgrade`]) and answers when it is ready or failed. `drain` starts
//! draining (see [`crate::quic::DrainHandle`]) and answers the drain progress; `status`
//! carries the same progress under `drain` (and `upgrade`: its state). Only root and members
//! of the `outrelay-admin` group (checked with SO_PEERCRED) are served; anyone else gets
//! `{"error": "permission denied"}`.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::ingress::stats::Drop;
use crate::metrics::Sources;

/// The group whose members (and root) may use the admin socket.
pub const ADMIN_GROUP: &str = "outrelay-admin";
/// Longest command line read, in bytes.
pub const MAX_COMMAND_BYTES: u64 = 1024;

/// Binds the admin socket at `path` (a stale socket file is replaced), mode 0660, group
/// `outrelay-admin` when that group exists.
///
/// # Errors
/// Bind, chmod or chown failures.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    if let Ok(Some(group)) = nix::unistd::Group::from_name(ADMIN_GROUP) {
        nix::unistd::chown(path, None, Some(group.gid)).map_err(std::io::Error::from)?;
    }
    Ok(listener)
}

/// Serves admin commands until the task is dropped.
pub async fn serve(listener: UnixListener, sources: Arc<Sources>) {
    serve_with(listener, sources, None).await;
}

/// [`serve`], with `upgrade [timeout_s]` served by `upgrader` (hitless upgrade, issue 20).
pub async fn serve_with(
    listener: UnixListener,
    sources: Arc<Sources>,
    upgrader: Option<Arc<crate::upgrade::Upgrader>>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let sources = sources.clone();
        let upgrader = upgrader.clone();
        tokio::spawn(async move { handle(stream, &sources, upgrader.as_deref()).await });
    }
}

/// `upgrade` or `upgrade <timeout_s>`: the upgrade's answer.
async fn upgrade(upgrader: Option<&crate::upgrade::Upgrader>, arg: Option<&str>) -> Value {
    let Some(upgrader) = upgrader else {
        return json!({"upgraded": false, "error": "upgrade is not available here"});
    };
    let timeout_s = match arg.map(str::parse::<u64>) {
        None => crate::upgrade::DEFAULT_TIMEOUT_S,
        Some(Ok(s)) if s > 0 => s,
        Some(_) => {
            return json!({"upgraded": false, "error": "upgrade [timeout_s]: a positive number of seconds"});
        }
    };
    upgrader.upgrade_answer(timeout_s).await
}

async fn handle(
    stream: UnixStream,
    sources: &Sources,
    upgrader: Option<&crate::upgrade::Upgrader>,
) {
    let allowed = stream.peer_cred().is_ok_and(|c| is_admin(c.uid(), c.gid()));
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_COMMAND_BYTES));
    let answer = if !allowed {
        json!({"error": "permission denied"})
    } else if reader.read_line(&mut line).await.is_err() {
        json!({"error": "unreadable command"})
    } else {
        let mut words = line.split_whitespace();
        match line.trim() {
            "status" => status_document(sources, upgrader),
            command if command.starts_with("upgrade") && words.next() == Some("upgrade") => {
                upgrade(upgrader, words.next()).await
            }
            "drain" => {
                let started = sources.drain.drain(crate::quic::DRAIN_RECONNECT_AFTER_MS);
                if started {
                    tracing::warn!(
                        "draining: GOAWAY to every agent, new connections and leases refused"
                    );
                }
                let mut answer = drain_progress(sources);
                answer["started_now"] = json!(started);
                answer
            }
            other => {
                json!({"error": format!("unknown command {other:?} (known: status, drain, upgrade)")})
            }
        }
    };
    let _ = write.write_all(format!("{answer}\n").as_bytes()).await;
    let _ = write.shutdown().await;
}

fn is_admin(uid: u32, gid: u32) -> bool {
    if uid == 0 {
        return true;
    }
    let Ok(Some(group)) = nix::unistd::Group::from_name(ADMIN_GROUP) else {
        return false;
    };
    if group.gid.as_raw() == gid {
        return true;
    }
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .is_some_and(|u| group.mem.contains(&u.name))
}

/// What a drain still waits for: agent connections, live leases, spliced pairs and service
/// streams (joined plus parked halves).
pub fn drain_progress(s: &Sources) -> Value {
    let snapshot = s.shared.load();
    let leases = snapshot.reverse_keys.len();
    let pairs = s.splice_totals().pairs_active;
    let streams = s.mesh.streams_active.load(Ordering::Relaxed)
        + s.mesh.resume.parked.load(Ordering::Relaxed);
    json!({
        "draining": s.drain.is_draining(),
        "agents": s.drain.agents(),
        "leases": leases,
        "pairs": pairs,
        "streams": streams,
    })
}

/// The `status` command's answer: [`status`], plus the upgrade's state (`upgrade`) where this
/// process can upgrade. The dashboard's `/status.json` serves the same document.
pub fn status_document(s: &Sources, upgrader: Option<&crate::upgrade::Upgrader>) -> Value {
    let mut answer = status(s);
    if let Some(u) = upgrader {
        answer["upgrade"] = u.status();
    }
    answer
}

/// The status document: workers, leases with their idle sessions, drops, QUIC and splice
/// counters.
pub fn status(s: &Sources) -> Value {
    let snapshot = s.shared.load();
    let mut leases: BTreeMap<String, Value> = BTreeMap::new();
    for (name, route) in snapshot.routes.hostnames() {
        lease_entry(&mut leases, s, route, name)["tls"] = json!(true);
    }
    for (_, route) in snapshot.routes.wildcard_parents() {
        lease_entry(&mut leases, s, route, &route.hostname)["wildcard"] = json!(true);
    }
    for (port, route) in snapshot.routes.tcp_ports() {
        lease_entry(&mut leases, s, route, &route.hostname)["tcp_port"] = json!(port);
    }
    for (port, route) in snapshot.routes.udp_ports() {
        lease_entry(&mut leases, s, route, &route.hostname)["udp_port"] = json!(port);
    }
    let drops: BTreeMap<&str, u64> = Drop::ALL
        .iter()
        .map(|d| (d.label(), s.ingress.stats.drops(*d)))
        .collect();
    let splice = s.splice_totals();
    let q = &s.quic;
    json!({
        "drain": drain_progress(s),
        "config": {
            "generation": s.config.generation(),
            "applied_at_unix_ms": s.config.applied_at_unix_ms(),
        },
        "io_backend": s.backend.name(),
        "workers": s.ingress.workers(),
        "worker_stats": s.ingress.worker_stats().iter().enumerate().map(|(i, w)| json!({
            "worker": i,
            "accepts_public": w.accepts[0].load(Ordering::Relaxed),
            "accepts_reverse": w.accepts[1].load(Ordering::Relaxed),
            "claims": w.claims.load(Ordering::Relaxed),
            "cross_worker_claims": w.cross_claims.load(Ordering::Relaxed),
            "handoffs": w.handoffs.load(Ordering::Relaxed),
            "setup_connections": w.conns.load(Ordering::Relaxed),
            "pairs_active": w.engine().pairs_active,
            "cpu": s.steering.worker_cpu(i),
        })).collect::<Vec<_>>(),
        "ebpf": ebpf_status(&s.steering),
        "snapshot_generation": snapshot.generation,
        "leases": leases.into_values().collect::<Vec<_>>(),
        "bandwidth_tenants": s.shared.bandwidth.tenant_counters().iter().map(|t| json!({
            "tenant": t.tenant,
            "to_service_bytes_per_s": t.limit.to_service_bytes_per_s,
            "to_client_bytes_per_s": t.limit.to_client_bytes_per_s,
            "throttled_ms": {"to_service": t.throttled_ms[0], "to_client": t.throttled_ms[1]},
        })).collect::<Vec<_>>(),
        "drops": drops,
        "sessions_authenticated": s.ingress.stats.sessions_authenticated.load(Ordering::Relaxed),
        "reverse_via_tls_port": {
            "handshakes": s.ingress.stats.reverse_via_tls_port.load(Ordering::Relaxed),
            "authenticated": s.ingress.stats.sessions_via_tls_port.load(Ordering::Relaxed),
        },
        "fallback_via_reverse_port": s.ingress.stats.fallback_via_reverse_port.load(Ordering::Relaxed),
        "public_connections_spliced": s.ingress.stats.spliced.load(Ordering::Relaxed),
        "quic": {
            "connections_accepted": q.connections_accepted.load(Ordering::Relaxed),
            "handshakes_failed": q.handshakes_failed.load(Ordering::Relaxed),
        },
        "resume": resume_status(&s.mesh, q),
        "services": services_status(&s.services),
        "splice": {
            "pairs_active": splice.pairs_active,
            "bytes": splice.bytes,
            "pipe_held_bytes": splice.pipes.held_bytes,
        },
    })
}

/// Services listed in the status at most (the rest are counted as `truncated`).
pub const STATUS_SERVICES_MAX: usize = 1000;

/// Live local providers per service (issue 22: several per service), at most
/// [`STATUS_SERVICES_MAX`] services.
fn services_status(mesh: &crate::mesh::Mesh) -> Value {
    let counts = mesh.provider_counts();
    let truncated = counts.len().saturating_sub(STATUS_SERVICES_MAX);
    json!({
        "providers": counts.iter().take(STATUS_SERVICES_MAX).map(|(tenant, service, n)| json!({
            "tenant": tenant,
            "service": service,
            "providers": n,
        })).collect::<Vec<_>>(),
        "truncated": truncated,
    })
}

/// Stream resume: outcomes, parked halves, retransmitted bytes, and the P2P signalling the
/// joined streams carry (STREAM_CHECKPOINT, candidates) with the migrations recorded.
fn resume_status(mesh: &crate::mesh::MeshStats, q: &crate::quic::QuicStats) -> Value {
    use crate::mesh::resume::ResumeOutcome;
    let r = &mesh.resume;
    let outcomes: BTreeMap<&str, u64> = ResumeOutcome::ALL
        .iter()
        .map(|o| (o.label(), r.outcome(*o)))
        .collect();
    let signals: BTreeMap<&str, u64> = crate::quic::SignalOutcome::ALL
        .iter()
        .map(|o| (o.label(), q.signals(*o)))
        .collect();
    json!({
        "results": outcomes,
        "parked": r.parked.load(Ordering::Relaxed),
        "bytes_retransmitted": r.bytes_retransmitted.load(Ordering::Relaxed),
        "p2p_signals": signals,
        "migrations": {
            "to_p2p": q.migrations_to_p2p.load(Ordering::Relaxed),
            "to_relay": q.migrations_to_relay.load(Ordering::Relaxed),
        },
    })
}

/// What eBPF steering runs and what it counted.
fn ebpf_status(steering: &crate::steer::Steering) -> Value {
    let c = steering.counters();
    let programs: BTreeMap<&str, bool> = steering.programs().into_iter().collect();
    json!({
        "mode": steering.mode().name(),
        "unavailable": steering.unavailable(),
        "programs": programs,
        "reuseport": {
            "public": {"local": c.reuseport[0][0], "no_worker": c.reuseport[0][1], "busy": c.reuseport[0][2]},
            "reverse": {"local": c.reuseport[1][0], "no_worker": c.reuseport[1][1], "busy": c.reuseport[1][2]},
        },
        "lookup": {
            "tcp": {"steered": c.lookup[0][0], "refused": c.lookup[0][1]},
            "udp": {"steered": c.lookup[1][0], "refused": c.lookup[1][1]},
            "map_errors": c.map_errors,
        },
    })
}

/// The status entry of a route's lease, created on first sight.
fn lease_entry<'a>(
    leases: &'a mut BTreeMap<String, Value>,
    s: &Sources,
    route: &crate::lease::RouteEntry,
    hostname: &str,
) -> &'a mut Value {
    let key = hex::encode(route.lease_id.0);
    leases.entry(key.clone()).or_insert_with(|| {
        json!({
            "lease_id": key,
            "tenant": route.tenant,
            "hostname": hostname,
            "tls": false,
            "wildcard": false,
            "tcp_port": null,
            "udp_port": null,
            "idle_sessions": s.ingress.idle_sessions(&route.lease_id),
            "bandwidth": s.shared.bandwidth.lease(&route.lease_id).map(|b| {
                let c = b.counters();
                json!({
                    "to_service_bytes_per_s": c.limit.to_service_bytes_per_s,
                    "to_client_bytes_per_s": c.limit.to_client_bytes_per_s,
                    "throttled_ms": {"to_service": c.throttled_ms[0], "to_client": c.throttled_ms[1]},
                    "udp_rate_limited_datagrams": c.udp_rate_limited,
                })
            }),
            // Bytes of its spliced pairs (read from the source) and admitted UDP datagrams.
            "bytes": s.shared.bandwidth.lease(&route.lease_id).map(|b| {
                let [to_service, to_client] = b.counters().bytes;
                json!({"to_service": to_service, "to_client": to_client})
            }),
            // Live public connections (spliced pairs and those being set up).
            "live_connections": s.ingress.lease_conns().count(&route.lease_id),
        })
    })
}
