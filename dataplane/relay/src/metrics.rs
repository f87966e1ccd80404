//! Prometheus `/metrics` on its own loopback listener (default 127.0.0.1:7460), next to the
//! read-only dashboard (`/` and `/status.json`, issue 21; see [`serve_with`]).
//!
//! The data path only bumps plain atomics (ingress and QUIC counters) or publishes a stats
//! struct once a second (splice engines); a scrape copies them into the `metrics` recorder and
//! renders it. Nothing on the hot path touches the recorder. Served with hyper (HTTP/1.1) by
//! [`outrelay_lifecycle::dashboard::serve`].

use std::sync::Arc;
use std::sync::atomic::Ordering;

use http_body_util::Full;
use hyper::Response;
use hyper::body::Bytes;
use metrics::{counter, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use outrelay_io::{Backend, EngineStats};
use outrelay_lifecycle::dashboard::{self, Route};
use outrelay_proto::frame::FrameType;
use tokio::net::TcpListener;

use crate::ingress::Ingress;
use crate::ingress::stats::{CutReason, Drop};
use crate::lease::LeaseErrorCode;
use crate::mesh::{MeshResult, MeshStats};
use crate::quic::{Limit, QuicStats};
use crate::state::Shared;
use crate::udp::stats::{UdpDrop, UdpStats};

/// Everything a scrape reads.
pub struct Sources {
    /// Ingress counters.
    pub ingress: Arc<Ingress>,
    /// UDP lease counters.
    pub udp: Arc<UdpStats>,
    /// QUIC endpoint counters.
    pub quic: Arc<QuicStats>,
    /// Service-stream counters.
    pub mesh: Arc<MeshStats>,
    /// The mesh itself (live providers per service, for the status).
    pub services: Arc<crate::mesh::Mesh>,
    /// The engines' readiness backend.
    pub backend: Backend,
    /// The published snapshot (lease counts).
    pub shared: Arc<Shared>,
    /// The eBPF steering programs (any may be off).
    pub steering: Arc<crate::steer::Steering>,
    /// Drains the agent endpoint (`outrelay relay drain`) and says whether it is draining.
    pub drain: crate::quic::DrainHandle,
    /// The settings generation (SIGHUP reloads).
    pub config: Arc<crate::reload::ConfigGeneration>,
}

impl Sources {
    /// Every worker's engine stats as last published, summed.
    pub fn splice_totals(&self) -> EngineStats {
        let mut total = EngineStats::default();
        for w in self.ingress.worker_stats() {
            total.accumulate(&w.engine());
        }
        total
    }
}

/// Installs the Prometheus recorder for this process.
///
/// # Errors
/// A recorder is already installed.
pub fn install() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    PrometheusBuilder::new().install_recorder()
}

/// Serves `GET /metrics` (and the dashboard, without the upgrade's state) on `listener` until
/// the task is dropped. See [`serve_with`].
pub async fn serve(listener: TcpListener, handle: PrometheusHandle, sources: Arc<Sources>) {
    serve_with(listener, handle, sources, None).await;
}

/// Serves the metrics listener until the task is dropped: `GET /metrics` (Prometheus),
/// `GET /status.json` (the admin socket's `status` document, [`crate::admin::status_document`],
/// with `upgrader`'s state as `relay status` shows it) and `GET /` (the dashboard page rendered
/// from that document, [`crate::dashboard`]); any other method is 405, any other path 404.
pub async fn serve_with(
    listener: TcpListener,
    handle: PrometheusHandle,
    sources: Arc<Sources>,
    upgrader: Option<Arc<crate::upgrade::Upgrader>>,
) {
    outrelay_lifecycle::dashboard::serve(listener, move |route| {
        std::future::ready(respond(route, &handle, &sources, upgrader.as_deref()))
    })
    .await;
}

fn respond(
    route: Route,
    handle: &PrometheusHandle,
    sources: &Sources,
    upgrader: Option<&crate::upgrade::Upgrader>,
) -> Response<Full<Bytes>> {
    match route {
        Route::Metrics => {
            update(sources);
            dashboard::metrics(handle.render())
        }
        Route::Snapshot => dashboard::json(&crate::admin::status_document(sources, upgrader)),
        Route::Page => dashboard::page(crate::dashboard::render(&crate::admin::status_document(
            sources, upgrader,
        ))),
        other => dashboard::refusal(other),
    }
}

/// Copies every counter into the recorder.
fn update(s: &Sources) {
    let stats = &s.ingress.stats;
    for reason in Drop::ALL {
        counter!("outrelay_relay_ingress_drops_total", "reason" => reason.label())
            .absolute(stats.drops(reason));
    }
    counter!("outrelay_relay_ingress_spliced_total")
        .absolute(stats.spliced.load(Ordering::Relaxed));
    for reason in CutReason::ALL {
        counter!("outrelay_relay_pairs_cut_total", "reason" => reason.label())
            .absolute(stats.cuts(reason));
    }
    counter!("outrelay_relay_pair_cut_orders_lost_total")
        .absolute(stats.cut_orders_lost.load(Ordering::Relaxed));
    counter!("outrelay_relay_reverse_sessions_authenticated_total")
        .absolute(stats.sessions_authenticated.load(Ordering::Relaxed));
    counter!("outrelay_relay_ingress_root_host_total")
        .absolute(stats.root_host.load(Ordering::Relaxed));
    counter!("outrelay_relay_reverse_via_tls_port_total", "phase" => "handshake")
        .absolute(stats.reverse_via_tls_port.load(Ordering::Relaxed));
    counter!("outrelay_relay_reverse_via_tls_port_total", "phase" => "authenticated")
        .absolute(stats.sessions_via_tls_port.load(Ordering::Relaxed));
    counter!("outrelay_relay_fallback_via_reverse_port_total")
        .absolute(stats.fallback_via_reverse_port.load(Ordering::Relaxed));
    gauge!("outrelay_relay_ingress_pending_connections").set(s.ingress.pending_conns() as f64);
    gauge!("outrelay_relay_ingress_public_connections").set(s.ingress.public_conns() as f64);
    gauge!("outrelay_relay_ingress_public_conn_max").set(s.ingress.config().public_conn_max as f64);
    gauge!("outrelay_relay_ingress_root_connections").set(s.ingress.root_conns() as f64);
    gauge!("outrelay_relay_reverse_pending_handshakes").set(s.ingress.reverse_pending() as f64);

    let u = &s.udp;
    for reason in UdpDrop::ALL {
        counter!("outrelay_relay_udp_drops_total", "reason" => reason.label())
            .absolute(u.drops(reason));
    }
    for (direction, datagrams, bytes) in [
        ("to_agent", &u.to_agent_datagrams, &u.to_agent_bytes),
        ("to_client", &u.to_client_datagrams, &u.to_client_bytes),
    ] {
        counter!("outrelay_relay_udp_datagrams_total", "direction" => direction)
            .absolute(datagrams.load(Ordering::Relaxed));
        counter!("outrelay_relay_udp_bytes_total", "direction" => direction)
            .absolute(bytes.load(Ordering::Relaxed));
    }
    counter!("outrelay_relay_udp_flows_total").absolute(u.flows_created.load(Ordering::Relaxed));
    counter!("outrelay_relay_udp_flows_expired_total")
        .absolute(u.flows_expired.load(Ordering::Relaxed));
    counter!("outrelay_relay_udp_flows_evicted_total")
        .absolute(u.flows_evicted.load(Ordering::Relaxed));
    gauge!("outrelay_relay_udp_flows_active").set(u.flows_active.load(Ordering::Relaxed) as f64);
    gauge!("outrelay_relay_udp_ports_bound").set(u.ports_bound.load(Ordering::Relaxed) as f64);
    gauge!("outrelay_relay_udp_payload_max_bytes")
        .set(u.payload_max_bytes.load(Ordering::Relaxed) as f64);

    let m = &s.mesh;
    for r in MeshResult::ALL {
        counter!("outrelay_relay_mesh_streams_total", "result" => r.label()).absolute(m.result(r));
    }
    gauge!("outrelay_relay_mesh_streams_active")
        .set(m.streams_active.load(Ordering::Relaxed) as f64);
    counter!("outrelay_relay_mesh_bytes_total", "direction" => "to_provider")
        .absolute(m.bytes_to_provider.load(Ordering::Relaxed));
    counter!("outrelay_relay_mesh_bytes_total", "direction" => "to_consumer")
        .absolute(m.bytes_to_consumer.load(Ordering::Relaxed));
    counter!("outrelay_relay_mesh_streams_cut_total", "reason" => "policy")
        .absolute(m.cut_policy.load(Ordering::Relaxed));
    counter!("outrelay_relay_mesh_streams_cut_total", "reason" => "rule_expired")
        .absolute(m.cut_expired.load(Ordering::Relaxed));
    counter!("outrelay_relay_mesh_streams_failed_total")
        .absolute(m.streams_failed.load(Ordering::Relaxed));
    counter!("outrelay_relay_mesh_registrations_total", "result" => "ok")
        .absolute(m.registrations_ok.load(Ordering::Relaxed));
    counter!("outrelay_relay_mesh_registrations_total", "result" => "rejected")
        .absolute(m.registrations_rejected.load(Ordering::Relaxed));
    counter!("outrelay_relay_mesh_registrations_total", "result" => "taken")
        .absolute(m.registrations_taken.load(Ordering::Relaxed));
    counter!("outrelay_relay_mesh_registrations_total", "result" => "provide_denied")
        .absolute(m.registrations_provide_denied.load(Ordering::Relaxed));
    counter!("outrelay_relay_mesh_registrations_total", "result" => "providers_full")
        .absolute(m.registrations_providers_full.load(Ordering::Relaxed));
    counter!("outrelay_relay_mesh_policy_updates_total")
        .absolute(m.policy_updates.load(Ordering::Relaxed));
    counter!("outrelay_relay_mesh_audit_events_total")
        .absolute(m.audit_events.load(Ordering::Relaxed));
    counter!("outrelay_relay_mesh_audit_truncated_total")
        .absolute(m.audit_truncated.load(Ordering::Relaxed));
    counter!("outrelay_relay_mesh_ready_dropped_total")
        .absolute(m.ready_dropped.load(Ordering::Relaxed));
    counter!("outrelay_relay_mesh_provider_retries_total")
        .absolute(m.provider_retries.load(Ordering::Relaxed));
    counter!("outrelay_relay_mesh_ended_pairs_evicted_total")
        .absolute(m.ended_pairs_evicted.load(Ordering::Relaxed));
    let r = &m.resume;
    for o in crate::mesh::resume::ResumeOutcome::ALL {
        counter!("outrelay_relay_resume_total", "result" => o.label()).absolute(r.outcome(o));
    }
    gauge!("outrelay_relay_resume_parked").set(r.parked.load(Ordering::Relaxed) as f64);
    counter!("outrelay_relay_resume_bytes_retransmitted_total")
        .absolute(r.bytes_retransmitted.load(Ordering::Relaxed));
    let q = &s.quic;
    counter!("outrelay_relay_quic_connections_accepted_total")
        .absolute(q.connections_accepted.load(Ordering::Relaxed));
    gauge!("outrelay_relay_config_generation").set(s.config.generation() as f64);
    gauge!("outrelay_relay_config_applied_timestamp_seconds")
        .set(s.config.applied_at_unix_ms() as f64 / 1000.0);
    gauge!("outrelay_relay_draining").set(if s.drain.is_draining() { 1.0 } else { 0.0 });
    counter!("outrelay_relay_quic_handshakes_failed_total")
        .absolute(q.handshakes_failed.load(Ordering::Relaxed));
    for (reason, c) in [
        ("bad_chain", &q.refused_bad_chain),
        ("bad_role", &q.refused_bad_role),
        ("bad_identity", &q.refused_bad_identity),
        ("hello_mismatch", &q.refused_hello_mismatch),
        ("hello_timeout", &q.refused_hello_timeout),
        ("revoked", &q.refused_revoked),
        ("draining", &q.refused_draining),
        (
            "revocations_unavailable",
            &q.refused_revocations_unavailable,
        ),
        ("protocol_error", &q.protocol_errors),
        ("send_queue_overflow", &q.send_queue_overflows),
    ] {
        counter!("outrelay_relay_quic_refused_total", "reason" => reason)
            .absolute(c.load(Ordering::Relaxed));
    }
    for l in Limit::ALL {
        counter!("outrelay_relay_quic_limited_total", "reason" => l.label()).absolute(q.limited(l));
    }
    for t in FrameType::ALL {
        counter!("outrelay_relay_quic_frames_total", "type" => t.name()).absolute(q.frames(t));
    }
    for (reason, c) in [
        ("unknown_type", &q.frames_unknown),
        ("unexpected", &q.frames_ignored),
    ] {
        counter!("outrelay_relay_quic_frames_ignored_total", "reason" => reason)
            .absolute(c.load(Ordering::Relaxed));
    }
    for o in crate::quic::SignalOutcome::ALL {
        counter!("outrelay_relay_quic_p2p_signals_total", "result" => o.label())
            .absolute(q.signals(o));
    }
    for (to, c) in [
        ("p2p", &q.migrations_to_p2p),
        ("relay", &q.migrations_to_relay),
    ] {
        counter!("outrelay_relay_quic_migrations_total", "to" => to)
            .absolute(c.load(Ordering::Relaxed));
    }
    counter!("outrelay_relay_quic_observed_addr_answers_total")
        .absolute(q.observed_addr_answers.load(Ordering::Relaxed));
    let f = &q.fallback;
    counter!("outrelay_relay_fallback_tunnels_total")
        .absolute(f.tunnels_opened.load(Ordering::Relaxed));
    gauge!("outrelay_relay_fallback_tunnels").set(f.tunnels_live.load(Ordering::Relaxed) as f64);
    for (reason, c) in [
        ("tunnels_max", &f.refused_full),
        ("per_source_max", &f.refused_per_source),
        ("handshake", &f.refused_handshake),
        ("bad_frame", &f.bad_frames),
    ] {
        counter!("outrelay_relay_fallback_refused_total", "reason" => reason)
            .absolute(c.load(Ordering::Relaxed));
    }
    for (reason, c) in [
        ("queue_full", &f.queue_drops),
        ("no_tunnel", &f.no_tunnel_drops),
    ] {
        counter!("outrelay_relay_fallback_packets_dropped_total", "reason" => reason)
            .absolute(c.load(Ordering::Relaxed));
    }
    for (dir, c) in [("in", &f.packets_in), ("out", &f.packets_out)] {
        counter!("outrelay_relay_fallback_packets_total", "direction" => dir)
            .absolute(c.load(Ordering::Relaxed));
    }
    for code in LeaseErrorCode::ALL {
        counter!("outrelay_relay_lease_errors_total", "code" => code.as_str())
            .absolute(q.lease_errors(code));
    }

    let snapshot = s.shared.load();
    gauge!("outrelay_relay_routes").set(snapshot.routes.len() as f64);
    gauge!("outrelay_relay_leases_live").set(snapshot.reverse_keys.len() as f64);
    counter!("outrelay_relay_routes_published_total").absolute(snapshot.generation);

    let total = s.splice_totals();
    gauge!("outrelay_relay_splice_pairs_active").set(total.pairs_active as f64);
    counter!("outrelay_relay_splice_pairs_total").absolute(total.pairs_added);
    counter!("outrelay_relay_splice_pairs_refused_total").absolute(total.pairs_refused);
    counter!("outrelay_relay_splice_bytes_total").absolute(total.bytes);
    counter!("outrelay_relay_splice_calls_total").absolute(total.splice_calls);
    counter!("outrelay_relay_pipe_waits_total").absolute(total.pipe_waits);
    counter!("outrelay_relay_pipes_created_total").absolute(total.pipes.created);
    gauge!("outrelay_relay_pipe_held_bytes").set(total.pipes.held_bytes as f64);
    let b = total.buffers;
    gauge!("outrelay_relay_splice_spill_held_bytes").set(b.spill_held_bytes as f64);
    gauge!("outrelay_relay_splice_copy_held_bytes").set(b.copy_held_bytes as f64);
    gauge!("outrelay_relay_splice_copy_active").set(b.copy_active as f64);
    counter!("outrelay_relay_splice_copy_fallbacks_total").absolute(b.copy_taken);
    counter!("outrelay_relay_splice_spills_total").absolute(total.spills);
    counter!("outrelay_relay_splice_spill_refusals_total").absolute(total.spill_refusals);
    for (reason, n) in outrelay_io::CLOSED_LABELS.into_iter().zip(total.closed) {
        counter!("outrelay_relay_splice_closed_total", "reason" => reason).absolute(n);
    }
    gauge!("outrelay_relay_io_backend_info", "backend" => s.backend.name()).set(1.0);
    counter!("outrelay_relay_splice_throttles_total").absolute(total.throttles);
    // Bandwidth limits (issue 21): by scope and direction only; per lease in `relay status`.
    let throttled = s.shared.bandwidth.throttled_ns_total();
    for (scope, by_dir) in ["lease", "tenant"].into_iter().zip(throttled) {
        for (direction, ns) in ["to_service", "to_client"].into_iter().zip(by_dir) {
            counter!(
                "outrelay_relay_bandwidth_throttled_seconds_total",
                "scope" => scope,
                "direction" => direction
            )
            .absolute(ns / 1_000_000_000);
        }
    }

    for (i, w) in s.ingress.worker_stats().iter().enumerate() {
        let worker = i.to_string();
        for (kind, n) in [("public", &w.accepts[0]), ("reverse", &w.accepts[1])] {
            counter!("outrelay_relay_worker_accepts_total", "worker" => worker.clone(), "listener" => kind)
                .absolute(n.load(Ordering::Relaxed));
        }
        counter!("outrelay_relay_worker_claims_total", "worker" => worker.clone())
            .absolute(w.claims.load(Ordering::Relaxed));
        counter!("outrelay_relay_worker_cross_claims_total", "worker" => worker.clone())
            .absolute(w.cross_claims.load(Ordering::Relaxed));
        counter!("outrelay_relay_worker_handoffs_total", "worker" => worker.clone())
            .absolute(w.handoffs.load(Ordering::Relaxed));
        counter!("outrelay_relay_worker_inbox_full_total", "worker" => worker.clone())
            .absolute(w.inbox_full.load(Ordering::Relaxed));
        gauge!("outrelay_relay_worker_setup_connections", "worker" => worker.clone())
            .set(w.conns.load(Ordering::Relaxed) as f64);
        gauge!("outrelay_relay_worker_pairs_active", "worker" => worker)
            .set(w.engine().pairs_active as f64);
    }

    for (program, on) in s.steering.programs() {
        gauge!("outrelay_relay_ebpf_active", "program" => program).set(if on { 1.0 } else { 0.0 });
    }
    let c = s.steering.counters();
    for (group, outcomes) in ["public", "reverse"].into_iter().zip(c.reuseport) {
        for (outcome, n) in ["local", "no_worker", "busy"].into_iter().zip(outcomes) {
            counter!("outrelay_relay_ebpf_reuseport_total", "group" => group, "outcome" => outcome)
                .absolute(n);
        }
    }
    for (proto, outcomes) in ["tcp", "udp"].into_iter().zip(c.lookup) {
        for (outcome, n) in ["steered", "refused"].into_iter().zip(outcomes) {
            counter!("outrelay_relay_ebpf_lookup_total", "proto" => proto, "outcome" => outcome)
                .absolute(n);
        }
    }
    counter!("outrelay_relay_ebpf_map_errors_total").absolute(c.map_errors);
}
