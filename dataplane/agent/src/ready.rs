//! `--ready-file`: JSON written atomically (temp file + rename) once a relay is connected with
//! every lease granted, and rewritten whenever that content changes (a new grant, a port moved).
//! It is never removed while the agent runs: a disconnected relay keeps the last content.
//!
//! ```json
//! {"metrics": "127.0.0.1:7462" | null,
//!  "relay": "127.0.0.1:7443",
//!  "leases": [{"name": "demo", "hostname": "demo.example.com", "tcp_addr": "ip:port" | null,
//!              "udp_addr": "ip:port" | null}],
//!  "relays": [{"addr": "127.0.0.1:7443", "leases": [ …same shape… ],
//!              "services": [ …same shape… ]}],
//!  "services": [{"service": "payments", "service_id": "demo/payments"}],
//!  "consumers": [{"service": "payments", "listen_addr": "127.0.0.1:18080"}]}
//! ```
//! A relay is ready when connected with every lease granted and every provided service
//! registered (REGISTER_ACK). The agent is ready when it holds at least one relay and every
//! held (connected) relay is ready. `relay`, `leases` and `services` describe the first held
//! relay (HA slot order); `relays` lists every held relay (`addr` is the address dialled);
//! `consumers` are the bound listeners.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::json;

use crate::stats::{Board, ConsumerStatus, RelayStatus};

/// The ready document for the board's current state; `None` while no relay is ready.
pub fn document(
    relays: &[RelayStatus],
    consumers: &[ConsumerStatus],
    metrics: Option<SocketAddr>,
) -> Option<serde_json::Value> {
    let leases = |r: &RelayStatus| -> Vec<serde_json::Value> {
        r.leases
            .iter()
            .map(|l| {
                json!({"name": l.name, "hostname": l.hostname, "tcp_addr": l.tcp_addr,
                       "udp_addr": l.udp_addr})
            })
            .collect()
    };
    let services = |r: &RelayStatus| -> Vec<serde_json::Value> {
        r.services
            .iter()
            .map(|s| json!({"service": s.service, "service_id": s.service_id}))
            .collect()
    };
    let held: Vec<&RelayStatus> = relays.iter().filter(|r| r.connected).collect();
    if !held.iter().all(|r| r.ready()) {
        return None;
    }
    let ready = held;
    let first = ready.first()?;
    Some(json!({
        "metrics": metrics.map(|m| m.to_string()),
        "relay": first.addr,
        "leases": leases(first),
        "services": services(first),
        "consumers": consumers
            .iter()
            .map(|c| json!({"service": c.service, "listen_addr": c.listen_addr}))
            .collect::<Vec<_>>(),
        "relays": ready
            .iter()
            .map(|r| json!({"addr": r.addr, "leases": leases(r), "services": services(r)}))
            .collect::<Vec<_>>(),
    }))
}

/// Writes `value` to `path` atomically.
///
/// # Errors
/// The temp file could not be written or renamed.
pub fn write_atomic(path: &Path, value: &serde_json::Value) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, value.to_string())?;
    std::fs::rename(&tmp, path)
}

/// Rewrites `path` (if any) after every board change that changes the document; the first
/// ready document also sends systemd's `READY=1` (with or without a file).
pub async fn run(board: Arc<Board>, path: Option<PathBuf>, metrics: Option<SocketAddr>) {
    let mut last: Option<serde_json::Value> = None;
    let mut notified = false;
    loop {
        if let Some(doc) = document(&board.snapshot(), &board.consumers(), metrics)
            && last.as_ref() != Some(&doc)
        {
            let Some(path) = &path else {
                outrelay_lifecycle::notify_ready();
                return;
            };
            match write_atomic(path, &doc) {
                Ok(()) => {
                    tracing::info!(path = %path.display(), ready = %doc, "ready file written");
                    last = Some(doc);
                    if !notified {
                        outrelay_lifecycle::notify_ready();
                        notified = true;
                    }
                }
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "cannot write the ready file")
                }
            }
        }
        board.changed.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{LeaseState, LeaseStatus, ServiceState, ServiceStatus};

    fn relay(addr: &str, connected: bool, states: &[LeaseState]) -> RelayStatus {
        RelayStatus {
            addr: addr.to_owned(),
            name: addr.to_owned(),
            relay_id: String::new(),
            connected,
            transport: crate::stats::Transport::Quic,
            tunnel_addr: None,
            leases: states
                .iter()
                .enumerate()
                .map(|(i, s)| LeaseStatus {
                    name: format!("l{i}"),
                    state: *s,
                    hostname: format!("l{i}.example.com"),
                    tcp_addr: (i == 0).then(|| "example.com:20000".to_owned()),
                    reverse_addr: None,
                    udp_addr: None,
                    last_error: None,
                    pool: None,
                })
                .collect(),
            services: Vec::new(),
        }
    }

    #[test]
    fn no_document_until_a_relay_has_every_lease_granted() {
        use LeaseState::{Granted, Registering};
        assert_eq!(
            document(&[relay("a:1", false, &[Granted])], &[], None),
            None
        );
        assert_eq!(
            document(&[relay("a:1", true, &[Granted, Registering])], &[], None),
            None
        );
        // Every held relay must be ready (HA: the agent is ready on all of them).
        assert_eq!(
            document(
                &[
                    relay("a:1", true, &[Granted, Registering]),
                    relay("b:1", true, &[Granted, Granted]),
                ],
                &[],
                None
            ),
            None
        );
        let doc = document(
            &[
                relay("a:1", false, &[Granted, Registering]),
                relay("b:1", true, &[Granted, Granted]),
            ],
            &[],
            Some("127.0.0.1:7462".parse().expect("addr")),
        )
        .expect("relay b is ready");
        assert_eq!(doc["relay"], "b:1");
        assert_eq!(doc["metrics"], "127.0.0.1:7462");
        assert_eq!(doc["leases"][0]["tcp_addr"], "example.com:20000");
        assert!(doc["leases"][1]["tcp_addr"].is_null());
        assert_eq!(doc["relays"].as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn services_must_be_registered_and_consumers_are_listed() {
        let mut r = relay("a:1", true, &[]);
        r.services = vec![ServiceStatus {
            service: "payments".into(),
            state: ServiceState::Registering,
            service_id: String::new(),
            last_error: None,
        }];
        let consumers = [ConsumerStatus {
            service: "ledger".into(),
            listen_addr: "127.0.0.1:18080".into(),
        }];
        assert_eq!(document(&[r.clone()], &consumers, None), None);
        if let Some(s) = r.services.first_mut() {
            s.state = ServiceState::Registered;
            s.service_id = "demo/payments".into();
        }
        let doc = document(&[r], &consumers, None).expect("ready");
        assert_eq!(
            doc["services"],
            json!([{"service": "payments", "service_id": "demo/payments"}])
        );
        assert_eq!(
            doc["consumers"],
            json!([{"service": "ledger", "listen_addr": "127.0.0.1:18080"}])
        );
        assert_eq!(doc["leases"], json!([]));
    }

    #[test]
    fn write_is_atomic_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("ready.json");
        write_atomic(&path, &json!({"a": 1})).expect("write");
        write_atomic(&path, &json!({"a": 2})).expect("rewrite");
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text, r#"{"a":2}"#);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }
}
