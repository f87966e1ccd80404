//! `# HELP` text for every metric the relay exports (promtool wants one per family).
//! Called once after the recorder is installed; a new metric gets its line here.

/// Registers the descriptions.
pub fn describe() {
    for (name, help) in [
        (
            "outrelay_relay_upgrades_total",
            "Hitless upgrades this process started, by result (ok: handed over; failed: serving on).",
        ),
        (
            "outrelay_relay_mesh_streams_total",
            "Service stream opens, by result (accepted or the reject code).",
        ),
        (
            "outrelay_relay_forward_streams_total",
            "Forwarded service streams accepted, by direction (out: to a peer relay; in: from one) and peer relay id.",
        ),
        (
            "outrelay_relay_forward_refused_total",
            "Forwarded streams and relay connections refused, by reason and peer relay id.",
        ),
        (
            "outrelay_relay_forward_streams_active",
            "Forwarded streams open now to each peer relay (peers in the pool).",
        ),
        (
            "outrelay_relay_forward_peers",
            "Peer relays in the forwarding pool (at most forward.max_peers).",
        ),
        (
            "outrelay_relay_forward_connects_total",
            "Connections established to a peer relay, by peer relay id.",
        ),
        (
            "outrelay_relay_mesh_bytes_total",
            "Bytes carried by joined service streams, by direction.",
        ),
        (
            "outrelay_relay_mesh_streams_cut_total",
            "Live service streams cut because the policy no longer allows them, by reason.",
        ),
        (
            "outrelay_relay_mesh_streams_failed_total",
            "Joined service streams that ended with a reset or a lost connection.",
        ),
        (
            "outrelay_relay_mesh_registrations_total",
            "REGISTER frames answered, by result.",
        ),
        (
            "outrelay_relay_mesh_policy_updates_total",
            "Policy snapshots installed (each flushes the decision cache).",
        ),
        (
            "outrelay_relay_mesh_audit_events_total",
            "Audit events produced for stream decisions.",
        ),
        (
            "outrelay_relay_mesh_audit_dropped_total",
            "Audit events dropped because the audit queue was full.",
        ),
        (
            "outrelay_relay_mesh_audit_sent_total",
            "Audit events the controller recorded.",
        ),
        (
            "outrelay_relay_mesh_deregistrations_dropped_total",
            "Agent deregistrations dropped because the registry queue was full.",
        ),
        (
            "outrelay_relay_mesh_policy_events_total",
            "Policy watch events received from the controller.",
        ),
        (
            "outrelay_relay_mesh_audit_failed_total",
            "Audit events the controller refused for good (dropped), or that ran out of retries, by reason.",
        ),
        (
            "outrelay_relay_mesh_audit_retries_total",
            "Audit.Record calls retried after a transient error.",
        ),
        (
            "outrelay_relay_mesh_audit_truncated_total",
            "Audit events with a field cut to its cap before they were queued.",
        ),
        (
            "outrelay_relay_mesh_ready_dropped_total",
            "STREAM_READY frames not sent because a control queue was full.",
        ),
        (
            "outrelay_relay_mesh_provider_retries_total",
            "Opens passed to another provider after one did not answer.",
        ),
        (
            "outrelay_relay_mesh_ended_pairs_evicted_total",
            "Cleanly ended streams forgotten before their last checkpoints' linger was over.",
        ),
    ] {
        metrics::describe_counter!(name, help);
    }
    metrics::describe_gauge!(
        "outrelay_relay_mesh_streams_active",
        "Service streams joined right now."
    );
    metrics::describe_counter!(
        "outrelay_relay_resume_total",
        "STREAM_RESUME halves by result (resumed and a policy refusal at the join count once per \
         pair; expired, replaced, refused_mismatch, refused_invalid, refused_full, disabled once \
         per half)."
    );
    metrics::describe_gauge!(
        "outrelay_relay_resume_parked",
        "Halves of resumed streams waiting for their peer right now."
    );
    metrics::describe_counter!(
        "outrelay_relay_resume_bytes_retransmitted_total",
        "Bytes the agents retransmit at resumed joins, from their positions (for each half, the \
         other's my_position minus its peer_ack_position)."
    );
    metrics::describe_gauge!(
        "outrelay_relay_cert_expiry_unix_seconds",
        "notAfter of the relay certificate new handshakes get (Unix seconds)."
    );
    metrics::describe_counter!(
        "outrelay_relay_cert_renewals_total",
        "Renewals of the relay's own certificate, by result (ok or error)."
    );
    metrics::describe_counter!(
        "outrelay_relay_cert_reloads_total",
        "SIGHUP reloads of the certificate files, by result (ok or refused)."
    );
    metrics::describe_counter!(
        "outrelay_relay_cert_swaps_total",
        "Relay certificate changes taken into use (renewal or SIGHUP)."
    );
    metrics::describe_gauge!(
        "outrelay_relay_controller_connected",
        "1 while the controller stream is up."
    );
    metrics::describe_counter!(
        "outrelay_relay_controller_decisions_total",
        "Lease decisions received from the controller."
    );
    metrics::describe_counter!(
        "outrelay_relay_controller_heartbeats_total",
        "Heartbeats sent to the controller, by result."
    );
    metrics::describe_counter!(
        "outrelay_relay_controller_leases_revoked_total",
        "Leases dropped because the controller revoked them."
    );
    metrics::describe_counter!(
        "outrelay_relay_controller_reports_dropped_total",
        "Lease reports dropped because the report queue was full."
    );
    metrics::describe_counter!(
        "outrelay_relay_controller_reports_total",
        "Lease reports sent to the controller."
    );
    metrics::describe_counter!(
        "outrelay_relay_controller_revocations_applied_total",
        "Identity revocations applied."
    );
    metrics::describe_counter!(
        "outrelay_relay_controller_revoked_connections_closed_total",
        "Agent connections closed because their identity was revoked."
    );
    metrics::describe_counter!(
        "outrelay_relay_ingress_drops_total",
        "Public connections and reverse sessions dropped, by reason."
    );
    metrics::describe_gauge!(
        "outrelay_relay_ingress_pending_connections",
        "Public connections in set-up."
    );
    metrics::describe_gauge!(
        "outrelay_relay_ingress_public_connections",
        "Public connections now, in set-up or admitted to a lease (what public_conn_max caps)."
    );
    metrics::describe_gauge!(
        "outrelay_relay_ingress_public_conn_max",
        "The descriptor budget of public connections (ingress.public_conn_max, from RLIMIT_NOFILE when 0)."
    );
    metrics::describe_gauge!(
        "outrelay_relay_ingress_root_connections",
        "Root-host connections now (the root host's own pool)."
    );
    metrics::describe_gauge!(
        "outrelay_relay_reverse_pending_handshakes",
        "Reverse-session handshakes in progress."
    );
    metrics::describe_counter!(
        "outrelay_relay_ingress_root_host_total",
        "Connections for the root host (served by the relay itself)."
    );
    metrics::describe_counter!(
        "outrelay_relay_ingress_spliced_total",
        "Public connections handed to a splice engine."
    );
    metrics::describe_counter!(
        "outrelay_relay_pairs_cut_total",
        "Live spliced pairs the relay closed because their lease was banned or denied, or its agent revoked, by reason."
    );
    metrics::describe_counter!(
        "outrelay_relay_pair_cut_orders_lost_total",
        "Cut orders a worker's full inbox refused for a second (those pairs run until they end)."
    );
    metrics::describe_counter!(
        "outrelay_relay_worker_accepts_total",
        "Connections a worker accepted, by worker and listener (public: TLS and TCP lease ports; reverse: agents' sessions)."
    );
    metrics::describe_counter!(
        "outrelay_relay_worker_claims_total",
        "Idle reverse sessions claimed by a worker's public connections."
    );
    metrics::describe_counter!(
        "outrelay_relay_worker_cross_claims_total",
        "Claims served with a session another worker handed over (its own had none idle)."
    );
    metrics::describe_counter!(
        "outrelay_relay_worker_handoffs_total",
        "Idle sessions a worker handed to another worker's waiting claim."
    );
    metrics::describe_counter!(
        "outrelay_relay_worker_inbox_full_total",
        "Messages to another worker refused because its bounded inbox was full."
    );
    metrics::describe_gauge!(
        "outrelay_relay_worker_setup_connections",
        "Connections a worker holds in set-up (hello, handshake, claim wait, marker)."
    );
    metrics::describe_gauge!(
        "outrelay_relay_worker_pairs_active",
        "Pairs a worker splices now."
    );
    metrics::describe_gauge!(
        "outrelay_relay_ebpf_active",
        "1 while the eBPF program runs (reuseport_public, reuseport_reverse: CPU-local accept; lookup: the lease port range through one socket per worker)."
    );
    metrics::describe_counter!(
        "outrelay_relay_ebpf_reuseport_total",
        "New connections of a reuseport group by the program's choice: local (the worker on the receiving CPU), no_worker or busy (the kernel's hash picked)."
    );
    metrics::describe_counter!(
        "outrelay_relay_ebpf_lookup_total",
        "Lease-port connections (tcp) and datagrams (udp) the lookup program steered to a worker's socket, or refused in the kernel (no live lease on that port)."
    );
    metrics::describe_counter!(
        "outrelay_relay_ebpf_map_errors_total",
        "Lease-port map updates the kernel refused (that port kept its old state)."
    );
    metrics::describe_gauge!(
        "outrelay_relay_io_backend_info",
        "The splice engines readiness backend (label backend)."
    );
    metrics::describe_counter!(
        "outrelay_relay_lease_errors_total",
        "Lease requests refused, by error code."
    );
    metrics::describe_gauge!(
        "outrelay_relay_leases_live",
        "Leases granted and not expired."
    );
    metrics::describe_gauge!(
        "outrelay_relay_pipe_held_bytes",
        "Pipe capacity held by the splice engines, in bytes."
    );
    metrics::describe_counter!(
        "outrelay_relay_pipe_waits_total",
        "Times a direction waited for a pipe (pipe and copy budgets both spent)."
    );
    metrics::describe_counter!(
        "outrelay_relay_pipes_created_total",
        "Pipes created by the splice engines."
    );
    metrics::describe_counter!(
        "outrelay_relay_quic_connections_accepted_total",
        "Agent QUIC connections accepted."
    );
    metrics::describe_counter!(
        "outrelay_relay_quic_frames_total",
        "ORP frames received from agents, by type."
    );
    metrics::describe_counter!(
        "outrelay_relay_quic_frames_ignored_total",
        "Control-stream frames skipped, by reason (unknown_type: a code this relay does not know; \
         unexpected: a known type an agent does not send there)."
    );
    metrics::describe_counter!(
        "outrelay_relay_quic_p2p_signals_total",
        "CANDIDATE_OFFER/ANSWER and STREAM_CHECKPOINT frames from agents, by result (forwarded to \
         the joined stream's other end, no_pair, p2p_forbidden, peer_queue_full)."
    );
    metrics::describe_counter!(
        "outrelay_relay_quic_migrations_total",
        "MIGRATE_TO_P2P and MIGRATE_TO_RELAY frames recorded, by direction."
    );
    metrics::describe_counter!(
        "outrelay_relay_fallback_tunnels_total",
        "Agent TCP/443 fallback tunnels opened (TLS with ALPN orp/1 on the public TLS port)."
    );
    metrics::describe_gauge!(
        "outrelay_relay_fallback_tunnels",
        "Agent TCP/443 fallback tunnels open now."
    );
    metrics::describe_counter!(
        "outrelay_relay_fallback_refused_total",
        "Fallback tunnels refused or ended, by reason (tunnels_max, per_source_max, handshake: \
         TLS failed or missed fallback_handshake_ms, bad_frame: a zero-length frame)."
    );
    metrics::describe_counter!(
        "outrelay_relay_fallback_packets_dropped_total",
        "QUIC packets for fallback tunnels dropped, by reason (queue_full: the tunnel's \
         fallback_queue_bytes was full, so QUIC sees loss; no_tunnel: the tunnel is gone)."
    );
    metrics::describe_counter!(
        "outrelay_relay_fallback_packets_total",
        "QUIC packets carried by fallback tunnels, by direction (in: from agents)."
    );
    metrics::describe_counter!(
        "outrelay_relay_quic_observed_addr_answers_total",
        "OBSERVED_ADDR_QUERY frames answered with the agent's observed address."
    );
    metrics::describe_counter!(
        "outrelay_relay_quic_handshakes_failed_total",
        "Agent QUIC handshakes that failed."
    );
    metrics::describe_gauge!(
        "outrelay_relay_config_generation",
        "Settings snapshots published: 1 at start, +1 per accepted SIGHUP reload."
    );
    metrics::describe_gauge!(
        "outrelay_relay_config_applied_timestamp_seconds",
        "When the settings generation in force was applied (Unix time)."
    );
    metrics::describe_gauge!(
        "outrelay_relay_draining",
        "1 once `outrelay relay drain` started (new agent connections and leases refused), else 0."
    );
    metrics::describe_counter!(
        "outrelay_relay_quic_refused_total",
        "Agent connections refused, by reason."
    );
    metrics::describe_counter!(
        "outrelay_relay_routes_published_total",
        "Route snapshots published (each lease change that alters routing publishes one)."
    );
    metrics::describe_counter!(
        "outrelay_relay_quic_limited_total",
        "Agent frames, streams and connections refused or slowed by a per-identity, \
         per-connection or per-tenant budget, by reason."
    );
    metrics::describe_counter!(
        "outrelay_relay_reverse_sessions_authenticated_total",
        "Reverse sessions that passed the handshake."
    );
    metrics::describe_counter!(
        "outrelay_relay_reverse_via_tls_port_total",
        "Reverse sessions that came through the public TLS port (first bytes ORRS, for agents \
         allowed only 443/tcp), by phase: handshake (started), authenticated."
    );
    metrics::describe_counter!(
        "outrelay_relay_fallback_via_reverse_port_total",
        "Agents' TCP fallback tunnels that came through the reverse-session port (a root-host \
         ClientHello offering orp/1 there)."
    );
    metrics::describe_gauge!(
        "outrelay_relay_routes",
        "Routes in the published snapshot, by kind."
    );
    metrics::describe_counter!(
        "outrelay_relay_splice_bytes_total",
        "Bytes moved by the splice engines, both directions."
    );
    metrics::describe_counter!(
        "outrelay_relay_splice_calls_total",
        "splice(2) calls made by the engines."
    );
    metrics::describe_counter!(
        "outrelay_relay_splice_closed_total",
        "Spliced pairs closed, by reason (write_stall: a destination took no byte for splice.write_stall_timeout_ms while bytes waited for it)."
    );
    metrics::describe_gauge!(
        "outrelay_relay_splice_spill_held_bytes",
        "Bytes of stalled directions held in user-space spill buffers (bounded by splice.spill_budget_bytes)."
    );
    metrics::describe_gauge!(
        "outrelay_relay_splice_copy_held_bytes",
        "Bytes of copy-path buffers in use (bounded by splice.copy_budget_bytes)."
    );
    metrics::describe_gauge!(
        "outrelay_relay_splice_copy_active",
        "Directions moving bytes on the copy path now (pipe budget spent)."
    );
    metrics::describe_counter!(
        "outrelay_relay_splice_copy_fallbacks_total",
        "Times a direction took the copy path because the pipe budget was spent."
    );
    metrics::describe_counter!(
        "outrelay_relay_splice_spills_total",
        "Stalled directions that gave their pipe back (bytes moved to a spill buffer)."
    );
    metrics::describe_counter!(
        "outrelay_relay_splice_spill_refusals_total",
        "Stalled directions that kept their pipe because the spill budget was spent."
    );
    metrics::describe_gauge!(
        "outrelay_relay_splice_pairs_active",
        "Pairs being spliced now."
    );
    metrics::describe_counter!(
        "outrelay_relay_splice_pairs_refused_total",
        "Pairs refused by a full splice engine."
    );
    metrics::describe_counter!(
        "outrelay_relay_splice_pairs_total",
        "Pairs added to the splice engines."
    );
    metrics::describe_counter!(
        "outrelay_relay_udp_bytes_total",
        "UDP lease payload bytes, by direction."
    );
    metrics::describe_counter!(
        "outrelay_relay_udp_datagrams_total",
        "UDP lease datagrams, by direction."
    );
    metrics::describe_counter!(
        "outrelay_relay_bandwidth_throttled_seconds_total",
        "Time transfers waited for bandwidth tokens (whole seconds), by scope (lease, tenant) and direction (to_service, to_client)."
    );
    metrics::describe_counter!(
        "outrelay_relay_splice_throttles_total",
        "Times a limited splice direction ran out of bandwidth tokens and waited."
    );
    metrics::describe_counter!(
        "outrelay_relay_udp_drops_total",
        "UDP lease datagrams dropped, by reason (rate_limited: over a bandwidth limit)."
    );
    metrics::describe_gauge!(
        "outrelay_relay_udp_flows_active",
        "UDP flows (client addresses) alive now."
    );
    metrics::describe_counter!(
        "outrelay_relay_udp_flows_expired_total",
        "UDP flows closed after their idle time."
    );
    metrics::describe_counter!("outrelay_relay_udp_flows_total", "UDP flows opened.");
    metrics::describe_counter!(
        "outrelay_relay_udp_flows_evicted_total",
        "UDP flows evicted from a full table for a new client (client silent for flow_evict_idle_ms)."
    );
    metrics::describe_gauge!(
        "outrelay_relay_udp_payload_max_bytes",
        "Largest UDP payload that fits a QUIC datagram now, in bytes."
    );
    metrics::describe_gauge!("outrelay_relay_udp_ports_bound", "UDP lease ports bound.");
}
