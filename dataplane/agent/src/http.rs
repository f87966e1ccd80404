//! The agent's loopback HTTP listener (default 127.0.0.1:7462): `GET /metrics` (Prometheus
//! text) and `GET /status` (JSON, read by `outrelay-agent status`).
//!
//! The data path only bumps atomics; a scrape copies them into the `metrics` recorder and
//! renders it. `/status` JSON:
//!
//! ```json
//! {"agent_uri": "outrelay://t/agent/…",
//!  "relays": [{"addr": "…", "connected": true, "transport": "quic" | "tls-tcp",
//!              "tunnel_addr": "192.0.2.7:443" | null,
//!              "leases": [{"name": "demo", "state": "granted", "hostname": "demo.example.com",
//!                          "tcp_addr": "example.com:20000" | null,
//!                          "reverse_addr": "192.0.2.7:7443" | null, "last_error": null,
//!                          "pool": {"open": 2, "idle": 2, "target": 2}}]}],
//!  "counters": {"sessions_opened": 0, …, "local_connect_failed": {"refused": 0, …}},
//!  "consumers": [{"service": "payments", "listen_addr": "127.0.0.1:18080"}],
//!  "mesh": {"consumer": {"streams": {"accepted": 0, "rejected_403": 0, …}, "active": 0,
//!                        "bytes_to_relay": 0, "bytes_to_local": 0},
//!           "provider": { …same… }, "registered": 0, "register_rejected": 0, "stream_ready": 0,
//!           "reopened": 0},
//!  "splice": {"pairs_active": 0, "pairs_total": 0, "bytes": 0}}
//! ```
//! Each relay entry (one per HA slot) also lists `"services": [{"service", "state",
//! "service_id", "last_error"}]`, `"name"` (the configured entry), `"relay_id"` (certificate
//! URI) and `"transport"`; `"candidates": [{"name", "addr", "relay_id", "state": "held" |
//! "standby" | "backoff" | "duplicate", "retry_in_ms", "last_error"}]` lists every candidate.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics::{counter, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use outrelay_io::EngineStats;
use serde_json::json;
use tokio::net::TcpListener;

use crate::stats::{
    Board, LeaseState, LocalFail, MeshResult, MeshRole, SessionFail, Stats, splice_totals,
};

/// Everything a request reads.
pub struct Sources {
    /// The agent's identity URI.
    pub agent_uri: String,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Status board.
    pub board: Arc<Board>,
    /// The relay candidates (read live).
    pub candidates: Arc<crate::candidates::Candidates>,
    /// The splice engines' last published stats.
    pub engines: Vec<Arc<Mutex<EngineStats>>>,
}

/// Installs the Prometheus recorder for this process.
///
/// # Errors
/// A recorder is already installed.
pub fn install() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    PrometheusBuilder::new().install_recorder()
}

/// Serves `/metrics` and `/status` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle, sources: Arc<Sources>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let (handle, sources) = (handle.clone(), sources.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (handle, sources) = (handle.clone(), sources.clone());
                async move { Ok::<_, Infallible>(respond(&req, &handle, &sources)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn respond(
    req: &Request<hyper::body::Incoming>,
    handle: &PrometheusHandle,
    sources: &Sources,
) -> Response<Full<Bytes>> {
    let (body, content_type) = match (req.method(), req.uri().path()) {
        (&hyper::Method::GET, "/metrics") => {
            update(sources);
            (handle.render(), "text/plain; version=0.0.4")
        }
        (&hyper::Method::GET, "/status") => (status_json(sources).to_string(), "application/json"),
        _ => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"not found\n")));
            *r.status_mut() = StatusCode::NOT_FOUND;
            return r;
        }
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// The `/status` document.
pub fn status_json(s: &Sources) -> serde_json::Value {
    let relays: Vec<serde_json::Value> = s
        .board
        .snapshot()
        .iter()
        .map(|r| {
            let leases: Vec<serde_json::Value> = r
                .leases
                .iter()
                .map(|l| {
                    let pool = l.pool.as_ref().map(|g| {
                        json!({
                            "open": g.open.load(Ordering::Relaxed),
                            "idle": g.idle.load(Ordering::Relaxed),
                            "target": g.target.load(Ordering::Relaxed),
                        })
                    });
                    json!({
                        "name": l.name,
                        "state": l.state,
                        "hostname": l.hostname,
                        "tcp_addr": l.tcp_addr,
                        "reverse_addr": l.reverse_addr,
                        "last_error": l.last_error,
                        "pool": pool,
                    })
                })
                .collect();
            json!({"addr": r.addr, "name": r.name, "relay_id": r.relay_id,
                   "transport": r.transport, "tunnel_addr": r.tunnel_addr,
                   "connected": r.connected, "leases": leases,
                   "services": r.services})
        })
        .collect();
    let st = &s.stats;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let local: serde_json::Map<String, serde_json::Value> = LocalFail::ALL
        .iter()
        .map(|r| (r.label().to_owned(), json!(st.local_failures(*r))))
        .collect();
    let failed: serde_json::Map<String, serde_json::Value> = SessionFail::ALL
        .iter()
        .map(|r| (r.label().to_owned(), json!(st.session_failures(*r))))
        .collect();
    let splice = splice_totals(&s.engines);
    let m = &st.mesh;
    let mesh_role = |role: MeshRole| {
        let results: serde_json::Map<String, serde_json::Value> = MeshResult::ALL
            .iter()
            .map(|r| (r.label().to_owned(), json!(m.streams(role, *r))))
            .collect();
        json!({
            "streams": results,
            "active": m.active(role),
            "bytes_to_relay": m.bytes(role, true),
            "bytes_to_local": m.bytes(role, false),
        })
    };
    json!({
        "agent_uri": s.agent_uri,
        "relays": relays,
        "candidates": s.candidates.statuses(),
        "counters": {
            "sessions_opened": load(&st.sessions_opened),
            "sessions_claimed_tls": load(&st.sessions_claimed_tls),
            "sessions_claimed_tcp": load(&st.sessions_claimed_tcp),
            "sessions_dead": load(&st.sessions_dead),
            "sessions_failed": failed,
            "splices": load(&st.splices),
            "local_connect_failed": local,
            "connect_attempts": load(&st.connect_attempts),
            "connect_failed": load(&st.connect_failed),
            "reconnects": load(&st.reconnects),
            "goaways": load(&st.goaways),
            "lease_errors": load(&st.lease_errors),
            "reverse_addr_refused": load(&st.reverse_addr_refused),
            "lease_reregistered": load(&st.lease_reregistered),
            "proxy_headers": load(&st.proxy_headers),
            "client_addr_missing": load(&st.client_addr_missing),
        },
        "consumers": s.board.consumers(),
        "mesh": {
            "consumer": mesh_role(MeshRole::Consumer),
            "provider": mesh_role(MeshRole::Provider),
            "registered": load(&m.registered),
            "register_rejected": load(&m.register_rejected),
            "stream_ready": load(&m.stream_ready),
            "reopened": load(&m.reopened),
            "resume": {
                "resumable": load(&m.resume.resumable),
                "resumed": load(&m.resume.resumed),
                "failed": load(&m.resume.failed),
                "lost": load(&m.resume.lost),
                "resuming": load(&m.resume.resuming),
                "ring_full": load(&m.resume.ring_full),
                "budget_full": load(&m.resume.budget_full),
                "ring_bytes": load(&m.resume.ring_bytes),
                "retransmitted_bytes": load(&m.resume.retransmitted_bytes),
                "checkpoints_sent": load(&m.resume.checkpoints_sent),
                "checkpoints_dropped": load(&m.resume.checkpoints_dropped),
                "checkpoints_received": load(&m.resume.checkpoints_received),
            },
        },
        "splice": {
            "pairs_active": splice.pairs_active,
            "pairs_total": splice.pairs_added,
            "bytes": splice.bytes,
        },
    })
}

/// Copies every counter into the recorder.
fn update(s: &Sources) {
    let st = &s.stats;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    counter!("outrelay_agent_reverse_sessions_opened_total").absolute(load(&st.sessions_opened));
    counter!("outrelay_agent_reverse_sessions_claimed_total", "marker" => "tls")
        .absolute(load(&st.sessions_claimed_tls));
    counter!("outrelay_agent_reverse_sessions_claimed_total", "marker" => "tcp")
        .absolute(load(&st.sessions_claimed_tcp));
    counter!("outrelay_agent_reverse_sessions_dead_total").absolute(load(&st.sessions_dead));
    counter!("outrelay_agent_reverse_addr_refused_total").absolute(load(&st.reverse_addr_refused));
    for r in SessionFail::ALL {
        counter!("outrelay_agent_reverse_sessions_failed_total", "reason" => r.label())
            .absolute(st.session_failures(r));
    }
    counter!("outrelay_agent_splices_total").absolute(load(&st.splices));
    counter!("outrelay_agent_proxy_headers_total").absolute(load(&st.proxy_headers));
    counter!("outrelay_agent_client_addr_missing_total").absolute(load(&st.client_addr_missing));
    for r in LocalFail::ALL {
        counter!("outrelay_agent_local_connect_failed_total", "reason" => r.label())
            .absolute(st.local_failures(r));
    }
    counter!("outrelay_agent_relay_connect_attempts_total").absolute(load(&st.connect_attempts));
    counter!("outrelay_agent_relay_connect_failed_total").absolute(load(&st.connect_failed));
    counter!("outrelay_agent_relay_reconnects_total").absolute(load(&st.reconnects));
    counter!("outrelay_agent_relay_goaways_total").absolute(load(&st.goaways));
    let f = &st.fallback;
    counter!("outrelay_agent_fallback_tunnels_total", "result" => "opened")
        .absolute(load(&f.tunnels_opened));
    counter!("outrelay_agent_fallback_tunnels_total", "result" => "failed")
        .absolute(load(&f.tunnels_failed));
    counter!("outrelay_agent_fallback_quic_returns_total").absolute(load(&f.quic_returns));
    counter!("outrelay_agent_fallback_packets_dropped_total", "reason" => "queue_full")
        .absolute(load(&f.queue_drops));
    counter!("outrelay_agent_fallback_packets_total", "direction" => "out")
        .absolute(load(&f.packets_out));
    counter!("outrelay_agent_fallback_packets_total", "direction" => "in")
        .absolute(load(&f.packets_in));
    counter!("outrelay_agent_lease_errors_total").absolute(load(&st.lease_errors));
    counter!("outrelay_agent_lease_reregistered_total").absolute(load(&st.lease_reregistered));
    let u = &st.udp;
    for r in crate::udp::UdpDrop::ALL {
        counter!("outrelay_agent_udp_drops_total", "reason" => r.label()).absolute(u.drops(r));
    }
    counter!("outrelay_agent_udp_datagrams_total", "direction" => "to_local")
        .absolute(load(&u.to_local));
    counter!("outrelay_agent_udp_datagrams_total", "direction" => "to_relay")
        .absolute(load(&u.to_relay));
    counter!("outrelay_agent_udp_flows_total").absolute(load(&u.flows_opened));
    counter!("outrelay_agent_udp_proxy_headers_total").absolute(load(&u.proxy_headers));
    counter!("outrelay_agent_udp_flows_expired_total").absolute(load(&u.flows_expired));

    let m = &st.mesh;
    for role in MeshRole::ALL {
        for r in MeshResult::ALL {
            counter!("outrelay_agent_mesh_streams_total", "role" => role.label(), "result" => r.label())
                .absolute(m.streams(role, r));
        }
        for (to_relay, direction) in [(true, "to_relay"), (false, "to_local")] {
            counter!("outrelay_agent_mesh_bytes_total", "role" => role.label(), "direction" => direction)
                .absolute(m.bytes(role, to_relay));
        }
        gauge!("outrelay_agent_mesh_streams_active", "role" => role.label())
            .set(m.active(role) as f64);
    }
    counter!("outrelay_agent_mesh_registrations_total", "result" => "acked")
        .absolute(load(&m.registered));
    counter!("outrelay_agent_mesh_registrations_total", "result" => "rejected")
        .absolute(load(&m.register_rejected));
    counter!("outrelay_agent_mesh_stream_ready_total").absolute(load(&m.stream_ready));
    counter!("outrelay_agent_mesh_reopened_total").absolute(load(&m.reopened));
    let r = &m.resume;
    for (result, c) in [
        ("resumed", &r.resumed),
        ("failed", &r.failed),
        ("lost", &r.lost),
    ] {
        counter!("outrelay_agent_resume_total", "result" => result).absolute(load(c));
    }
    counter!("outrelay_agent_resume_streams_total").absolute(load(&r.resumable));
    gauge!("outrelay_agent_resume_resuming").set(load(&r.resuming) as f64);
    for (reason, c) in [("ring_full", &r.ring_full), ("budget_full", &r.budget_full)] {
        counter!("outrelay_agent_resume_blocked_total", "reason" => reason).absolute(load(c));
    }
    gauge!("outrelay_agent_resume_ring_bytes").set(load(&r.ring_bytes) as f64);
    counter!("outrelay_agent_resume_retransmitted_bytes_total")
        .absolute(load(&r.retransmitted_bytes));
    for (result, c) in [
        ("sent", &r.checkpoints_sent),
        ("dropped", &r.checkpoints_dropped),
        ("received", &r.checkpoints_received),
    ] {
        counter!("outrelay_agent_resume_checkpoints_total", "result" => result).absolute(load(c));
    }

    let board = s.board.snapshot();
    gauge!("outrelay_agent_relays_connected")
        .set(board.iter().filter(|r| r.connected).count() as f64);
    gauge!("outrelay_agent_relays_held").set(board.iter().filter(|r| r.connected).count() as f64);
    let cands = s.candidates.statuses();
    for state in crate::candidates::CandidateState::ALL {
        let n = cands.iter().filter(|c| c.state == state).count();
        gauge!("outrelay_agent_relay_candidates", "state" => state.label()).set(n as f64);
    }
    counter!("outrelay_agent_relay_replacements_total").absolute(load(&st.relay_replacements));
    counter!("outrelay_agent_relay_candidates_dropped_total")
        .absolute(load(&st.relay_candidates_dropped));
    for state in LeaseState::ALL {
        let n = board
            .iter()
            .flat_map(|r| &r.leases)
            .filter(|l| l.state == state)
            .count();
        gauge!("outrelay_agent_leases", "state" => state.label()).set(n as f64);
    }
    let (mut open, mut idle) = (0usize, 0usize);
    for l in board.iter().flat_map(|r| &r.leases) {
        if let Some(g) = &l.pool {
            open += g.open.load(Ordering::Relaxed);
            idle += g.idle.load(Ordering::Relaxed);
        }
    }
    gauge!("outrelay_agent_reverse_sessions_open").set(open as f64);
    gauge!("outrelay_agent_reverse_sessions_idle").set(idle as f64);

    let total = splice_totals(&s.engines);
    gauge!("outrelay_agent_splice_pairs_active").set(total.pairs_active as f64);
    counter!("outrelay_agent_splice_pairs_total").absolute(total.pairs_added);
    counter!("outrelay_agent_splice_pairs_refused_total").absolute(total.pairs_refused);
    counter!("outrelay_agent_splice_bytes_total").absolute(total.bytes);
    counter!("outrelay_agent_splice_calls_total").absolute(total.splice_calls);
    counter!("outrelay_agent_pipe_waits_total").absolute(total.pipe_waits);
    gauge!("outrelay_agent_pipe_held_bytes").set(total.pipes.held_bytes as f64);
    let b = total.buffers;
    gauge!("outrelay_agent_splice_spill_held_bytes").set(b.spill_held_bytes as f64);
    gauge!("outrelay_agent_splice_copy_held_bytes").set(b.copy_held_bytes as f64);
    gauge!("outrelay_agent_splice_copy_active").set(b.copy_active as f64);
    counter!("outrelay_agent_splice_copy_fallbacks_total").absolute(b.copy_taken);
    counter!("outrelay_agent_splice_spills_total").absolute(total.spills);
    counter!("outrelay_agent_splice_spill_refusals_total").absolute(total.spill_refusals);
    for (reason, n) in outrelay_io::CLOSED_LABELS.into_iter().zip(total.closed) {
        counter!("outrelay_agent_splice_closed_total", "reason" => reason).absolute(n);
    }
}
