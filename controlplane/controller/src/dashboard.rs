//! The controller's dashboard (issue 21) on its metrics listener: `GET /status.json`, one JSON
//! snapshot of relays, leases (every tenant, with their states), services and providers,
//! policy rules and the most recent audit rows; `GET /` renders the same snapshot as HTML.
//!
//! Read-only: relays and providers come from the in-memory registry (soft state that is nowhere
//! else), leases, policy and audit from the store's read-only connections, never the writer
//! thread. Bounded: at most [`ROWS_MAX`] rows per table and [`AUDIT_ROWS_MAX`] audit rows; each
//! table says its total and whether it was cut (`truncated`), and the page says so.
//! A row has the fields of the matching `outrelay ... --output json` row, so the two compare.

use maud::{Markup, html};
use outrelay_api::pb;
use outrelay_lifecycle::dashboard::{any, layout, section, table, text};
use rusqlite::Connection;
use serde_json::{Value, json};

use crate::app::{App, now_unix_ms};
use crate::store::StoreError;

/// Most rows of each table (relays, leases, services, policy rules) in one snapshot.
pub const ROWS_MAX: usize = 500;
/// Audit rows in one snapshot: the most recent ones.
pub const AUDIT_ROWS_MAX: u32 = 50;

/// Builds the snapshot (`/status.json`).
///
/// # Errors
/// The store could not be read.
pub async fn snapshot(app: &App) -> Result<Value, StoreError> {
    let now = now_unix_ms();
    let (relays_total, relays, providers_total, providers) = app
        .registry
        .with_state(|s| s.dashboard_view(now, app.settings.relay_down_after_ms, ROWS_MAX));
    let stored = app.store.read(move |conn| read_tables(conn, now)).await?;
    let relays: Vec<Value> = relays
        .iter()
        .map(|r| json!({"id": r.id, "region": r.region, "endpoint": r.endpoint, "up": r.up, "last_seen_unix_ms": r.last_seen_unix_ms}))
        .collect();
    let services: Vec<Value> = providers
        .iter()
        .map(|(p, up)| json!({"service_id": p.service_id, "agent_uri": p.agent_uri, "relay_id": p.relay_id, "local_addr": p.local_addr, "updated_at_unix_ms": p.updated_at_unix_ms, "relay_endpoint": p.relay_endpoint, "relay_up": up}))
        .collect();
    Ok(json!({
        "generated_at_unix_ms": now,
        "relays": rows(relays_total, relays),
        "services": rows(providers_total, services),
        "leases": stored.leases,
        "lease_states": stored.lease_states,
        "policy": stored.policy,
        "audit": stored.audit,
    }))
}

/// The page of one snapshot.
pub fn render(snapshot: &Value) -> Markup {
    let states = match text(&snapshot["lease_states"]) {
        s if s.is_empty() || s == "-" => String::new(),
        s => format!(" ({s})"),
    };
    let summary = vec![format!(
        "{} relays, {} leases{states}, {} service providers, {} policy rules, {} audit rows stored",
        text(&snapshot["relays"]["total"]),
        text(&snapshot["leases"]["total"]),
        text(&snapshot["services"]["total"]),
        text(&snapshot["policy"]["total"]),
        text(&snapshot["audit"]["total"]),
    )];
    let other = outrelay_lifecycle::dashboard::extra_fields(snapshot, KNOWN);
    let body = html! {
        (part(snapshot, "relays", "Relays",
            &["id", "region", "endpoint", "up", "last_seen_unix_ms"], &[], "no relay"))
        (part(snapshot, "leases", "Leases (every tenant)",
            &["tenant", "name", "state", "live", "kind", "relay_id", "agent_uri", "expires_unix_ms",
              "id"],
            &[], "no lease"))
        (part(snapshot, "services", "Services and providers",
            &["service_id", "agent_uri", "relay_id", "relay_up", "local_addr", "updated_at_unix_ms"],
            &["service", "provider agent", "relay", "relay up", "local_addr", "updated_at_unix_ms"],
            "no service"))
        (part(snapshot, "policy", "Policy rules",
            &["tenant", "caller", "target", "method", "decision", "p2p_mode", "relay_mode",
              "expires_unix_ms", "id"], &[], "no rule"))
        (part(snapshot, "audit", "Recent audit rows (newest first)",
            &["seq", "ts_unix_ms", "tenant", "kind", "caller", "method", "target", "decision",
              "reason", "stream_id"], &[], "no audit row"))
        @for (key, value) in &other {
            (section(key, None, any(value)))
        }
    };
    layout("OutRelay controller", &summary, body)
}

/// Top-level keys of the snapshot that have a section of their own.
const KNOWN: &[&str] = &[
    "generated_at_unix_ms",
    "relays",
    "services",
    "leases",
    "lease_states",
    "policy",
    "audit",
];

/// One bounded table of the snapshot, with what the cap left out.
fn part(
    snapshot: &Value,
    key: &str,
    heading: &str,
    columns: &[&str],
    labels: &[&str],
    empty: &str,
) -> Markup {
    let t = &snapshot[key];
    let shown = t["rows"].as_array().map_or(&[][..], Vec::as_slice);
    let note = if t["truncated"].as_bool() == Some(true) {
        Some(format!(
            "Truncated: {} of {} shown (the first by key; the JSON carries the same rows).",
            shown.len(),
            text(&t["total"])
        ))
    } else {
        None
    };
    section(
        &format!("{heading} ({})", text(&t["total"])),
        note.as_deref(),
        table(shown, columns, labels, empty),
    )
}

/// `{"total", "truncated", "rows"}`.
fn rows(total: usize, rows: Vec<Value>) -> Value {
    json!({"total": total, "truncated": rows.len() < total, "rows": rows})
}

struct Stored {
    leases: Value,
    lease_states: Value,
    policy: Value,
    audit: Value,
}

fn read_tables(conn: &Connection, now: i64) -> Result<Stored, StoreError> {
    let limit = i64::try_from(ROWS_MAX).unwrap_or(i64::MAX);
    let count = |table: &str| -> Result<usize, StoreError> {
        let n: i64 = conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))?;
        Ok(usize::try_from(n).unwrap_or(0))
    };
    let mut stmt = conn.prepare(
        "SELECT id, tenant, name, agent_uri, relay_id, lease_kind, state, expires_unix_ms \
         FROM leases ORDER BY tenant, name LIMIT ?1",
    )?;
    let leases = stmt
        .query_map([limit], |r| {
            let state: i32 = r.get(6)?;
            let expires: i64 = r.get(7)?;
            Ok(json!({
                "id": r.get::<_, String>(0)?,
                "tenant": r.get::<_, String>(1)?,
                "name": r.get::<_, String>(2)?,
                "agent_uri": r.get::<_, String>(3)?,
                "relay_id": r.get::<_, String>(4)?,
                "kind": r.get::<_, String>(5)?,
                "state": lease_state(state),
                "live": is_live(state, expires, now),
                "expires_unix_ms": expires,
            }))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut stmt = conn.prepare("SELECT state, count(*) FROM leases GROUP BY state")?;
    let mut states = serde_json::Map::new();
    for row in stmt.query_map([], |r| Ok((r.get::<_, i32>(0)?, r.get::<_, i64>(1)?)))? {
        let (state, n) = row?;
        states.insert(lease_state(state).to_owned(), json!(n));
    }
    let mut stmt = conn.prepare(
        "SELECT id, tenant, caller_pattern, target_pattern, method_pattern, decision, \
         expires_unix_ms, created_at_unix_ms, p2p_mode, relay_mode FROM policies \
         ORDER BY seq LIMIT ?1",
    )?;
    let policy = stmt
        .query_map([limit], |r| {
            Ok(json!({
                "id": r.get::<_, String>(0)?,
                "tenant": r.get::<_, String>(1)?,
                "caller": r.get::<_, String>(2)?,
                "target": r.get::<_, String>(3)?,
                "method": r.get::<_, String>(4)?,
                "decision": crate::audit::decision_text(r.get(5)?),
                "expires_unix_ms": r.get::<_, i64>(6)?,
                "created_at_unix_ms": r.get::<_, i64>(7)?,
                "p2p_mode": pb::P2pMode::try_from(r.get::<_, i32>(8)?)
                    .map_or("unknown", |m| m.as_str_name()),
                "relay_mode": pb::RelayMode::try_from(r.get::<_, i32>(9)?)
                    .map_or("unknown", |m| m.as_str_name()),
            }))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let audit: Vec<Value> = crate::audit::query(
        conn,
        &crate::audit::QueryFilter {
            tenant: None,
            limit: AUDIT_ROWS_MAX,
            ..Default::default()
        },
    )?
    .iter()
    .map(|e| json!({"seq": e.seq, "ts_unix_ms": e.ts_unix_ms, "tenant": e.tenant, "kind": e.kind, "caller": e.caller, "target": e.target, "method": e.method, "decision": crate::audit::decision_text(e.decision), "reason": e.reason, "stream_id": e.stream_id}))
    .collect();
    Ok(Stored {
        leases: rows(count("leases")?, leases),
        lease_states: Value::Object(states),
        policy: rows(count("policies")?, policy),
        audit: rows(count("audit")?, audit),
    })
}

/// A lease state as `outrelay leases list` prints it.
fn lease_state(state: i32) -> &'static str {
    use pb::lease::State;
    match State::try_from(state) {
        Ok(State::Pending) => "pending",
        Ok(State::Approved) => "approved",
        Ok(State::Denied) => "denied",
        Ok(State::Banned) => "banned",
        Ok(State::Released) => "released",
        _ => "unspecified",
    }
}

/// Pending or approved and not expired: the record holds its name (a relay that stopped
/// renewing it leaves it to expire).
fn is_live(state: i32, expires_unix_ms: i64, now: i64) -> bool {
    use pb::lease::State;
    matches!(State::try_from(state), Ok(State::Pending | State::Approved)) && expires_unix_ms > now
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_tables_say_so_and_names_are_escaped() {
        let snapshot = json!({
            "relays": rows(3, vec![json!({"id": "r1", "up": true})]),
            "leases": rows(1, vec![json!({"tenant": "t", "name": "<img src=x>", "state": "approved"})]),
            "services": rows(0, vec![]),
            "policy": rows(0, vec![]),
            "audit": rows(0, vec![]),
            "lease_states": {"approved": 1},
        });
        let html = render(&snapshot).into_string();
        assert!(html.contains("Truncated: 1 of 3 shown"), "{html}");
        assert!(html.contains("&lt;img src=x&gt;"), "{html}");
        assert!(!html.contains("<img"), "{html}");
        assert!(html.contains("no service"), "{html}");
    }

    #[test]
    fn lease_states_read_as_the_cli_prints_them() {
        assert_eq!(lease_state(2), "approved");
        assert_eq!(lease_state(4), "banned");
        assert!(is_live(2, 10, 5));
        assert!(!is_live(2, 5, 5));
        assert!(!is_live(4, 10, 5));
    }
}
