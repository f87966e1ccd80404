//! The OutRelay relay (`outrelay-relay`), built up issue by issue.
//!
//! | module | what |
//! |---|---|
//! | [`config`] | TOML → validated [`config::Settings`] (exit 64 on anything invalid) |
//! | [`control`] | the controller client: heartbeat, lease decisions and reports, revocations |
//! | [`quic`] | the agents' QUIC endpoint: mTLS, HELLO, lease frames, reverse-session keys |
//! | [`lease`] | the lease table, port allocators and the route table (pure) |
//! | [`state`] | the snapshot control publishes to the data path (one `ArcSwap`) |
//! | [`ingress`] | reverse sessions, SNI and TCP lease listeners, hand-off to the splice engine |
//! | [`udp`] | UDP lease ports: flows, batched socket I/O, QUIC datagrams to the agents |
//! | [`mesh`] | service streams: local providers, registry view, policy snapshot, audit |
//! | [`metrics`] | Prometheus `/metrics`, and the dashboard's `/` and `/status.json` on the same listener |
//! | [`dashboard`] | the dashboard page rendered from the admin `status` document (issue 21) |
//! | [`bandwidth`] | bandwidth limits per lease and tenant (issue 21) |
//! | [`admin`] | the local admin socket (`outrelay relay status`) |
//! | [`reload`] | SIGHUP: which keys apply live, one validated snapshot published part by part |
//! | [`steer`] | optional eBPF steering: CPU-local accept, the lease port range through one socket per worker |
//! | [`upgrade`] | hitless binary upgrade: sockets handed to a new process over a socketpair |
//!
//! Not built yet (and not pretended): `outrelay relay drain`, relay-to-relay stream
//! forwarding and stream resume.
#![forbid(unsafe_code)]

pub mod admin;
pub mod bandwidth;
pub mod config;
pub mod control;
pub mod dashboard;
pub mod forward;
pub mod identity;
pub mod ingress;
pub mod lease;
pub mod mesh;
pub mod metric_help;
pub mod metrics;
pub mod quic;
pub mod reload;
pub mod state;
pub mod steer;
pub mod udp;
pub mod upgrade;
pub mod worker;

/// Milliseconds since the Unix epoch (0 before it; saturates far in the future).
pub(crate) fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
