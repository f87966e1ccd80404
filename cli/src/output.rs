//! Table and JSON output.

use clap::ValueEnum;
use outrelay_api::pb;
use serde_json::{Value, json};

/// `--output`
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Output {
    /// Aligned columns.
    Table,
    /// One JSON document.
    Json,
}

/// Prints `rows` under `headers`, or `json` as one document.
pub fn print_rows(out: Output, headers: &[&str], rows: Vec<Vec<String>>, json: Value) {
    match out {
        Output::Json => println!("{json}"),
        Output::Table => {
            let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
            for r in &rows {
                for (i, c) in r.iter().enumerate() {
                    if let Some(w) = widths.get_mut(i) {
                        *w = (*w).max(c.len());
                    }
                }
            }
            let line = |cells: Vec<&str>| {
                cells
                    .iter()
                    .zip(&widths)
                    .map(|(c, w)| format!("{c:<w$}"))
                    .collect::<Vec<_>>()
                    .join("  ")
                    .trim_end()
                    .to_owned()
            };
            println!(
                "{}",
                line(
                    headers
                        .iter()
                        .map(|h| h.to_uppercase())
                        .collect::<Vec<_>>()
                        .iter()
                        .map(String::as_str)
                        .collect()
                )
            );
            for r in &rows {
                println!("{}", line(r.iter().map(String::as_str).collect()));
            }
        }
    }
}

fn decision(d: i32) -> &'static str {
    match pb::Decision::try_from(d) {
        Ok(pb::Decision::Allow) => "allow",
        Ok(pb::Decision::Deny) => "deny",
        _ => "unspecified",
    }
}

/// Policy rules.
pub fn rules(out: Output, rules: &[pb::PolicyRule]) {
    let rows = rules
        .iter()
        .map(|r| {
            vec![
                r.id.clone(),
                r.caller_pattern.clone(),
                r.target_pattern.clone(),
                r.method_pattern.clone(),
                decision(r.decision).to_owned(),
                r.expires_unix_ms.to_string(),
            ]
        })
        .collect();
    let j = rules
        .iter()
        .map(|r| json!({"id": r.id, "tenant": r.tenant, "caller": r.caller_pattern, "target": r.target_pattern, "method": r.method_pattern, "decision": decision(r.decision), "expires_unix_ms": r.expires_unix_ms, "created_at_unix_ms": r.created_at_unix_ms}))
        .collect::<Vec<_>>();
    print_rows(
        out,
        &[
            "id",
            "caller",
            "target",
            "method",
            "decision",
            "expires_unix_ms",
        ],
        rows,
        Value::Array(j),
    );
}

/// Audit events.
pub fn audit_events(out: Output, events: &[pb::AuditEvent]) {
    let rows = events
        .iter()
        .map(|e| {
            vec![
                e.seq.to_string(),
                e.ts_unix_ms.to_string(),
                e.tenant.clone(),
                e.kind.clone(),
                e.caller.clone(),
                e.method.clone(),
                e.target.clone(),
                decision(e.decision).to_owned(),
                e.reason.clone(),
                e.stream_id.clone(),
            ]
        })
        .collect();
    let j = events
        .iter()
        .map(|e| json!({"seq": e.seq, "ts_unix_ms": e.ts_unix_ms, "tenant": e.tenant, "kind": e.kind, "caller": e.caller, "target": e.target, "method": e.method, "decision": decision(e.decision), "reason": e.reason, "stream_id": e.stream_id}))
        .collect::<Vec<_>>();
    print_rows(
        out,
        &[
            "seq",
            "ts_unix_ms",
            "tenant",
            "kind",
            "caller",
            "method",
            "target",
            "decision",
            "reason",
            "stream_id",
        ],
        rows,
        Value::Array(j),
    );
}

/// Registered providers, one row per (service, agent, relay): every provider of a service,
/// with whether its relay is up (`relays`: the controller's relay list).
pub fn providers(out: Output, ps: &[pb::Provider], relays: &[pb::RelayInfo]) {
    let up = |p: &pb::Provider| relays.iter().any(|r| r.id == p.relay_id && r.up);
    let rows = ps
        .iter()
        .map(|p| {
            vec![
                p.service_id.clone(),
                p.agent_uri.clone(),
                p.relay_id.clone(),
                p.relay_endpoint.clone(),
                p.local_addr.clone(),
                p.updated_at_unix_ms.to_string(),
                if up(p) { "up" } else { "down" }.to_owned(),
            ]
        })
        .collect();
    let j = ps
        .iter()
        .map(|p| json!({"service_id": p.service_id, "agent_uri": p.agent_uri, "relay_id": p.relay_id, "local_addr": p.local_addr, "updated_at_unix_ms": p.updated_at_unix_ms, "relay_endpoint": p.relay_endpoint, "relay_up": up(p)}))
        .collect::<Vec<_>>();
    print_rows(
        out,
        &[
            "service",
            "agent",
            "relay",
            "endpoint",
            "local_addr",
            "updated_at_unix_ms",
            "up",
        ],
        rows,
        Value::Array(j),
    );
}

/// Relays.
pub fn relays(out: Output, rs: &[pb::RelayInfo]) {
    let rows = rs
        .iter()
        .map(|r| {
            vec![
                r.id.clone(),
                r.region.clone(),
                r.endpoint.clone(),
                if r.up { "up" } else { "down" }.to_owned(),
                r.last_seen_unix_ms.to_string(),
            ]
        })
        .collect();
    let j = rs
        .iter()
        .map(|r| json!({"id": r.id, "region": r.region, "endpoint": r.endpoint, "up": r.up, "last_seen_unix_ms": r.last_seen_unix_ms}))
        .collect::<Vec<_>>();
    print_rows(
        out,
        &["id", "region", "endpoint", "state", "last_seen_unix_ms"],
        rows,
        Value::Array(j),
    );
}

fn lease_state(s: i32) -> &'static str {
    match pb::lease::State::try_from(s) {
        Ok(pb::lease::State::Pending) => "pending",
        Ok(pb::lease::State::Approved) => "approved",
        Ok(pb::lease::State::Denied) => "denied",
        Ok(pb::lease::State::Banned) => "banned",
        Ok(pb::lease::State::Released) => "released",
        _ => "unspecified",
    }
}

/// Leases.
pub fn leases(out: Output, ls: &[pb::Lease]) {
    let rows = ls
        .iter()
        .map(|l| {
            vec![
                l.id.clone(),
                l.tenant.clone(),
                l.name.clone(),
                l.lease_kind.clone(),
                lease_state(l.state).to_owned(),
                l.agent_uri.clone(),
                l.relay_id.clone(),
            ]
        })
        .collect();
    let j = ls
        .iter()
        .map(|l| json!({"id": l.id, "tenant": l.tenant, "name": l.name, "kind": l.lease_kind, "state": lease_state(l.state), "agent_uri": l.agent_uri, "relay_id": l.relay_id, "expires_unix_ms": l.expires_unix_ms}))
        .collect::<Vec<_>>();
    print_rows(
        out,
        &["id", "tenant", "name", "kind", "state", "agent", "relay"],
        rows,
        Value::Array(j),
    );
}

/// Bandwidth limit records (`*`: the whole tenant). JSON: one object per record with the rates
/// in bytes per second (0 = unlimited).
pub fn limits(out: Output, ls: &[pb::BandwidthLimit]) {
    let name = |l: &pb::BandwidthLimit| {
        if l.name.is_empty() {
            "*".to_owned()
        } else {
            l.name.clone()
        }
    };
    let rows = ls
        .iter()
        .map(|l| {
            vec![
                l.tenant.clone(),
                name(l),
                crate::rate::show(l.to_service_bytes_per_s),
                crate::rate::show(l.to_client_bytes_per_s),
            ]
        })
        .collect();
    let j = ls
        .iter()
        .map(|l| json!({"tenant": l.tenant, "name": l.name, "to_service_bytes_per_s": l.to_service_bytes_per_s, "to_client_bytes_per_s": l.to_client_bytes_per_s}))
        .collect::<Vec<_>>();
    print_rows(
        out,
        &["tenant", "name", "to_service", "to_client"],
        rows,
        Value::Array(j),
    );
}
