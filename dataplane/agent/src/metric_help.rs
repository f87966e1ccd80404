//! `# HELP` text for every metric the agent exports (promtool wants one per family).
//! Called once after the recorder is installed; a new metric gets its line here.

/// Registers the descriptions.
pub fn describe() {
    metrics::describe_counter!(
        "outrelay_agent_lease_errors_total",
        "Lease requests the relay refused, by code."
    );
    metrics::describe_counter!(
        "outrelay_agent_lease_reregistered_total",
        "Leases registered again after a reconnect."
    );
    metrics::describe_gauge!("outrelay_agent_leases", "Leases by state.");
    metrics::describe_counter!(
        "outrelay_agent_reverse_addr_refused_total",
        "Grants whose reverse address is neither the dialled relay host nor in reverse_allow (no pool)."
    );
    metrics::describe_counter!(
        "outrelay_agent_proxy_headers_total",
        "PROXY protocol headers written to local services (sessions, datagrams, service streams)."
    );
    metrics::describe_counter!(
        "outrelay_agent_udp_proxy_headers_total",
        "Datagrams sent to local UDP services behind a PROXY protocol v2 DGRAM header."
    );
    metrics::describe_counter!(
        "outrelay_agent_client_addr_missing_total",
        "Claims and datagrams of proxy_protocol leases without the client's addresses (the relay did not grant client_addr): a LOCAL/UNKNOWN header was written."
    );
    metrics::describe_counter!(
        "outrelay_agent_local_connect_failed_total",
        "Connections to local targets that failed."
    );
    metrics::describe_counter!(
        "outrelay_agent_mesh_bytes_total",
        "Raw bytes of service streams, by role and direction (to_relay, to_local)."
    );
    metrics::describe_counter!(
        "outrelay_agent_mesh_registrations_total",
        "REGISTER answers for provided services, by result (acked, rejected)."
    );
    metrics::describe_counter!(
        "outrelay_agent_mesh_stream_ready_total",
        "STREAM_READY frames received on control streams."
    );
    metrics::describe_counter!(
        "outrelay_agent_mesh_reopened_total",
        "Consumer opens made again on another relay after the relay connection died under them."
    );
    metrics::describe_counter!(
        "outrelay_agent_resume_total",
        "Broken service streams by outcome: resumed, failed (not resumed in resume.timeout_ms or refused), lost (the peer needed bytes no longer in the ring: local connection reset)."
    );
    metrics::describe_counter!(
        "outrelay_agent_resume_streams_total",
        "Service streams joined with resume (both agents and the relay agreed)."
    );
    metrics::describe_gauge!(
        "outrelay_agent_resume_resuming",
        "Service streams waiting to resume now."
    );
    metrics::describe_counter!(
        "outrelay_agent_resume_blocked_total",
        "Times a sender stopped reading its local connection: ring_full (resume.ring_bytes unacknowledged) or budget_full (all rings together at their cap)."
    );
    metrics::describe_gauge!(
        "outrelay_agent_resume_ring_bytes",
        "Unacknowledged bytes held in resume rings now."
    );
    metrics::describe_counter!(
        "outrelay_agent_resume_retransmitted_bytes_total",
        "Bytes sent again from resume rings after a resume."
    );
    metrics::describe_counter!(
        "outrelay_agent_resume_checkpoints_total",
        "STREAM_CHECKPOINT frames: sent, dropped (control queue full), received."
    );
    metrics::describe_gauge!(
        "outrelay_agent_mesh_streams_active",
        "Service streams joined now, by role."
    );
    metrics::describe_counter!(
        "outrelay_agent_mesh_streams_total",
        "Service stream opens, by role (consumer, provider) and result."
    );
    metrics::describe_counter!(
        "outrelay_agent_relay_connect_attempts_total",
        "Connection attempts to relays."
    );
    metrics::describe_counter!(
        "outrelay_agent_relay_connect_failed_total",
        "Connection attempts to relays that failed."
    );
    metrics::describe_counter!(
        "outrelay_agent_fallback_tunnels_total",
        "TCP/443 fallback tunnels to relays (QUIC inside TLS on TCP), by result (opened, failed)."
    );
    metrics::describe_counter!(
        "outrelay_agent_fallback_quic_returns_total",
        "Times a background QUIC attempt succeeded and a relay connection left the TCP fallback."
    );
    metrics::describe_counter!(
        "outrelay_agent_fallback_packets_dropped_total",
        "QUIC packets dropped before the TCP fallback tunnel, by reason (queue_full: \
         fallback.queue_bytes was full, so QUIC sees loss and backs off)."
    );
    metrics::describe_counter!(
        "outrelay_agent_fallback_packets_total",
        "QUIC packets carried by TCP fallback tunnels, by direction."
    );
    metrics::describe_counter!(
        "outrelay_agent_relay_goaways_total",
        "GOAWAY frames received from relays."
    );
    metrics::describe_counter!(
        "outrelay_agent_relay_reconnects_total",
        "Reconnections to relays."
    );
    metrics::describe_gauge!("outrelay_agent_relays_connected", "Relays connected now.");
    metrics::describe_gauge!(
        "outrelay_agent_relays_held",
        "Distinct relays (by certificate identity) the agent holds a connection to now (at most ha_connections)."
    );
    metrics::describe_gauge!(
        "outrelay_agent_relay_candidates",
        "Relay candidates (resolved relay addresses), by state: held, standby, backoff, duplicate."
    );
    metrics::describe_counter!(
        "outrelay_agent_relay_replacements_total",
        "HA slots that connected to another relay than the one they lost."
    );
    metrics::describe_counter!(
        "outrelay_agent_relay_candidates_dropped_total",
        "Resolved relay addresses dropped because the candidate list was full (64)."
    );
    metrics::describe_counter!(
        "outrelay_agent_reverse_sessions_claimed_total",
        "Reverse sessions claimed by a public connection."
    );
    metrics::describe_counter!(
        "outrelay_agent_reverse_sessions_dead_total",
        "Idle reverse sessions found dead."
    );
    metrics::describe_counter!(
        "outrelay_agent_reverse_sessions_failed_total",
        "Reverse sessions that failed to open."
    );
    metrics::describe_gauge!(
        "outrelay_agent_reverse_sessions_idle",
        "Idle reverse sessions waiting for a claim."
    );
    metrics::describe_gauge!(
        "outrelay_agent_reverse_sessions_open",
        "Reverse sessions open."
    );
    metrics::describe_counter!(
        "outrelay_agent_reverse_sessions_opened_total",
        "Reverse sessions opened."
    );
    metrics::describe_counter!(
        "outrelay_agent_splice_bytes_total",
        "Bytes moved by the splice engines, both directions."
    );
    metrics::describe_counter!(
        "outrelay_agent_splice_calls_total",
        "splice(2) calls made by the engines."
    );
    metrics::describe_counter!(
        "outrelay_agent_splice_closed_total",
        "Spliced pairs closed, by reason (write_stall: a destination took no byte for splice.write_stall_timeout_ms while bytes waited for it)."
    );
    metrics::describe_counter!(
        "outrelay_agent_pipe_waits_total",
        "Times a direction waited for a pipe (pipe and copy budgets both spent)."
    );
    metrics::describe_gauge!(
        "outrelay_agent_pipe_held_bytes",
        "Pipe capacity held by the splice engines, in bytes (bounded by splice.pipe_budget_bytes)."
    );
    metrics::describe_gauge!(
        "outrelay_agent_splice_spill_held_bytes",
        "Bytes of stalled directions held in user-space spill buffers (bounded by splice.spill_budget_bytes)."
    );
    metrics::describe_gauge!(
        "outrelay_agent_splice_copy_held_bytes",
        "Bytes of copy-path buffers in use (bounded by splice.copy_budget_bytes)."
    );
    metrics::describe_gauge!(
        "outrelay_agent_splice_copy_active",
        "Directions moving bytes on the copy path now (pipe budget spent)."
    );
    metrics::describe_counter!(
        "outrelay_agent_splice_copy_fallbacks_total",
        "Times a direction took the copy path because the pipe budget was spent."
    );
    metrics::describe_counter!(
        "outrelay_agent_splice_spills_total",
        "Stalled directions that gave their pipe back (bytes moved to a spill buffer)."
    );
    metrics::describe_counter!(
        "outrelay_agent_splice_spill_refusals_total",
        "Stalled directions that kept their pipe because the spill budget was spent."
    );
    metrics::describe_gauge!(
        "outrelay_agent_splice_pairs_active",
        "Pairs being spliced now."
    );
    metrics::describe_counter!(
        "outrelay_agent_splice_pairs_refused_total",
        "Pairs refused by a full splice engine."
    );
    metrics::describe_counter!(
        "outrelay_agent_splice_pairs_total",
        "Pairs added to the splice engines."
    );
    metrics::describe_counter!(
        "outrelay_agent_splices_total",
        "Claimed sessions joined to a local target."
    );
    metrics::describe_counter!(
        "outrelay_agent_udp_datagrams_total",
        "UDP lease datagrams, by direction."
    );
    metrics::describe_counter!(
        "outrelay_agent_udp_drops_total",
        "UDP lease datagrams dropped, by reason."
    );
    metrics::describe_counter!(
        "outrelay_agent_udp_flows_expired_total",
        "UDP flows closed after their idle time."
    );
    metrics::describe_counter!("outrelay_agent_udp_flows_total", "UDP flows opened.");
}
