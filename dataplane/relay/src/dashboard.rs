//! The relay's dashboard page (`GET /` on the metrics listener, issue 21), rendered from the
//! admin socket's `status` document ([`crate::admin::status_document`]), the very document
//! `GET /status.json` serves: the page can show nothing the JSON does not have.
//!
//! Fields the page does not know by name still show: a lease entry's other keys (the
//! `bandwidth` object, say) in its details column, other top-level keys (`bandwidth_tenants`)
//! in the last section. Layout, headers and escaping: [`outrelay_lifecycle::dashboard`].

use maud::{Markup, html};
use outrelay_lifecycle::dashboard::{any, key_values, layout, section, table, text};
use serde_json::{Value, json};

/// Top-level keys of the status document that have a section of their own.
const KNOWN: &[&str] = &[
    "drain",
    "config",
    "io_backend",
    "workers",
    "worker_stats",
    "ebpf",
    "snapshot_generation",
    "leases",
    "drops",
    "sessions_authenticated",
    "public_connections_spliced",
    "quic",
    "resume",
    "splice",
    "upgrade",
];

/// Lease columns, in order (every other key of an entry goes to its details column).
const LEASE_COLUMNS: &[&str] = &[
    "name",
    "hostname",
    "tenant",
    "tcp_port",
    "udp_port",
    "tls",
    "wildcard",
    "idle_sessions",
    "live_connections",
    "bytes",
];
const LEASE_LABELS: &[&str] = &[
    "name",
    "hostname",
    "tenant",
    "TCP port",
    "UDP port",
    "TLS",
    "wildcard",
    "idle sessions",
    "live connections",
    "bytes",
];

/// The page of one status document.
pub fn render(status: &Value) -> Markup {
    let n = text;
    let mut summary = vec![
        format!(
            "io backend {}, {} workers, route snapshot generation {}, config generation {}",
            n(&status["io_backend"]),
            n(&status["workers"]),
            n(&status["snapshot_generation"]),
            n(&status["config"]["generation"]),
        ),
        format!(
            "{} public connections spliced; {} pairs active, {} bytes spliced, {} pipe bytes held; \
             {} reverse sessions authenticated",
            n(&status["public_connections_spliced"]),
            n(&status["splice"]["pairs_active"]),
            n(&status["splice"]["bytes"]),
            n(&status["splice"]["pipe_held_bytes"]),
            n(&status["sessions_authenticated"]),
        ),
    ];
    if status["drain"]["draining"].as_bool() == Some(true) {
        summary.push(format!(
            "DRAINING: {} agents, {} leases, {} pairs, {} streams left",
            n(&status["drain"]["agents"]),
            n(&status["drain"]["leases"]),
            n(&status["drain"]["pairs"]),
            n(&status["drain"]["streams"]),
        ));
    }
    if let Some(state) = status["upgrade"]["state"].as_str()
        && state != "serving"
    {
        summary.push(format!(
            "UPGRADE: {state} (new pid {})",
            n(&status["upgrade"]["new_pid"])
        ));
    }
    let leases: Vec<Value> = status["leases"]
        .as_array()
        .map(|l| l.iter().map(with_name).collect())
        .unwrap_or_default();
    let agents = json!({
        "agents connected": status["drain"]["agents"],
        "QUIC connections accepted": status["quic"]["connections_accepted"],
        "QUIC handshakes failed": status["quic"]["handshakes_failed"],
        "leases": leases.len(),
    });
    let other: Vec<(&String, &Value)> = outrelay_lifecycle::dashboard::extra_fields(status, KNOWN);
    let body = html! {
        (section(&format!("Leases ({})", leases.len()), Some("Live leases of every tenant; \
            the details column holds each entry's other fields."),
            table(&leases, LEASE_COLUMNS, LEASE_LABELS, "no lease")))
        (section("Drops by reason", Some("Reasons not listed are at 0."),
            key_values(&status["drops"], true, "no drop counted")))
        (section("Workers", None, any(&status["worker_stats"])))
        (section("Agents and QUIC", None, key_values(&agents, false, "none")))
        (section("Service stream resume", None, key_values(&status["resume"], false, "none")))
        (section("eBPF steering", None, key_values(&status["ebpf"], false, "none")))
        (section("Drain and upgrade", None, html! {
            (key_values(&status["drain"], false, "none"))
            @if status.get("upgrade").is_some() {
                (key_values(&status["upgrade"], false, "none"))
            }
        }))
        @for (key, value) in &other {
            (section(key, None, any(value)))
        }
    };
    layout("OutRelay relay", &summary, body)
}

/// A lease entry with `name`: its hostname's first label (`<name>.<root_host>`).
fn with_name(entry: &Value) -> Value {
    let mut entry = entry.clone();
    if let Some(host) = entry["hostname"].as_str() {
        let name = host.split('.').next().unwrap_or(host).to_owned();
        entry["name"] = Value::String(name);
    }
    entry
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_with_unknown_fields_and_unknown_sections_show() {
        let status = json!({
            "io_backend": "uring",
            "workers": 2,
            "drain": {"draining": false, "agents": 1},
            "leases": [{
                "lease_id": "00ff",
                "tenant": "acme",
                "hostname": "<b>x</b>.example.com",
                "tcp_port": 20001,
                "idle_sessions": 3,
                "live_connections": 1,
                "bandwidth": {"to_client_bytes_per_s": 1000},
            }],
            "drops": {"no_route": 2, "pending_limit": 0},
            "bandwidth_tenants": [{"tenant": "acme", "to_service_bytes_per_s": 5}],
        });
        let html = render(&status).into_string();
        assert!(html.contains("&lt;b&gt;x&lt;/b&gt;.example.com"), "{html}");
        assert!(!html.contains("<b>x</b>"), "{html}");
        assert!(
            html.contains("bandwidth=to_client_bytes_per_s=1000"),
            "{html}"
        );
        assert!(html.contains("lease_id=00ff"), "{html}");
        assert!(html.contains("<h2>bandwidth_tenants</h2>"), "{html}");
        assert!(html.contains("no_route"), "{html}");
        assert!(!html.contains("pending_limit"), "{html}");
        assert!(html.contains("20001"), "{html}");
    }
}
