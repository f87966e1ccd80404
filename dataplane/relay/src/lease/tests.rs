//! Unit tests for every lease rule and error code, and a property test against a brute-force
//! reference model.

use std::time::{Duration, Instant};

use outrelay_proto::hostname::HostName;
use outrelay_proto::identity::{AgentUuid, Identity, Label};
use outrelay_proto::orp;
use outrelay_proto::reverse::LeaseId;

use super::*;

const ROOT: &str = "portal.example.com";
const MIN: u16 = 20_000;

fn config() -> LeaseConfig {
    LeaseConfig {
        root_host: ROOT.to_owned(),
        tcp: PortLeaseConfig::on(),
        udp: PortLeaseConfig::on(),
        ..LeaseConfig::default()
    }
}

fn agent(tenant: &str, n: u8) -> Identity {
    Identity::Agent {
        tenant: Label::new(tenant).expect("valid tenant label"),
        uuid: AgentUuid::from_bytes([n; 16]),
    }
}

/// A deterministic id source: 1, 2, 3, ... in the first byte pair.
fn counter() -> impl FnMut() -> [u8; 16] {
    let mut n: u16 = 0;
    move || {
        n += 1;
        let mut id = [0u8; 16];
        id[..2].copy_from_slice(&n.to_be_bytes());
        id
    }
}

fn tls(name: &str) -> orp::LeaseRegister {
    orp::LeaseRegister {
        name: name.to_owned(),
        tls: true,
        request_id: 7,
        ..orp::LeaseRegister::default()
    }
}

fn tcp(name: &str) -> orp::LeaseRegister {
    orp::LeaseRegister {
        name: name.to_owned(),
        tcp: true,
        ..orp::LeaseRegister::default()
    }
}

fn udp(name: &str) -> orp::LeaseRegister {
    orp::LeaseRegister {
        name: name.to_owned(),
        udp: true,
        ..orp::LeaseRegister::default()
    }
}

fn host(s: &str) -> HostName {
    HostName::parse(s.as_bytes()).expect("valid test host name")
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

struct Fixture {
    table: LeaseTable,
    ids: Box<dyn FnMut() -> [u8; 16]>,
    t0: Instant,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture::with(config())
    }

    fn with(config: LeaseConfig) -> Fixture {
        Fixture {
            table: LeaseTable::new(config).expect("valid config"),
            ids: Box::new(counter()),
            t0: Instant::now(),
        }
    }

    fn at(&self, d: Duration) -> Instant {
        self.t0 + d
    }

    fn reg(
        &mut self,
        conn: u64,
        who: &Identity,
        req: &orp::LeaseRegister,
        d: Duration,
    ) -> Result<Grant, Refusal> {
        let now = self.at(d);
        self.table.register(
            ConnId(conn),
            who,
            req,
            &ControllerDecision::Approved,
            &mut self.ids,
            now,
        )
    }

    fn ok(&mut self, conn: u64, who: &Identity, req: &orp::LeaseRegister, d: Duration) -> Grant {
        self.reg(conn, who, req, d).expect("registration succeeds")
    }

    fn code(
        &mut self,
        conn: u64,
        who: &Identity,
        req: &orp::LeaseRegister,
        d: Duration,
    ) -> LeaseErrorCode {
        self.reg(conn, who, req, d)
            .expect_err("registration is refused")
            .code
    }
}

#[test]
fn every_error_code_has_its_wire_string_and_status() {
    let expected = [
        ("invalid_request", 400),
        ("unauthorized", 403),
        ("lease_not_found", 404),
        ("lease_rejected", 403),
        ("hostname_conflict", 409),
        ("transport_mismatch", 409),
        ("feature_unavailable", 503),
        ("tcp_port_disabled", 403),
        ("tcp_port_capacity_exceeded", 503),
        ("tcp_port_exhausted", 503),
        ("udp_disabled", 403),
        ("udp_capacity_exceeded", 503),
        ("udp_port_exhausted", 503),
        ("internal", 500),
        ("draining", 503),
    ];
    for (code, (wire, status)) in LeaseErrorCode::ALL.iter().zip(expected) {
        assert_eq!(code.as_str(), wire);
        assert_eq!(code.status(), status, "{wire}");
        assert_eq!(code.to_string(), wire);
    }
    assert_eq!(
        LeaseErrorCode::HostnameConflict.as_str(),
        "hostname_conflict"
    );
    assert_eq!(LeaseErrorCode::HostnameConflict.status(), 409);
}

#[test]
fn tls_lease_routes_its_hostname_by_sni() {
    let mut f = Fixture::new();
    let g = f.ok(1, &agent("acme", 1), &tls("Demo"), secs(0));
    assert_eq!(
        g.hostname.as_str(),
        "demo.portal.example.com",
        "name lowercased"
    );
    assert_eq!(g.ttl_s, DEFAULT_TTL_S);
    assert_eq!(g.expires_at, f.at(secs(30)));
    assert_eq!((g.tcp_port, g.udp_port, g.udp_slot), (None, None, 0));
    let routes = f.table.routes();
    let hit = routes
        .lookup_sni(&host("DEMO.portal.example.com"))
        .expect("route for the lease hostname");
    assert_eq!((hit.lease_id, hit.conn), (g.lease_id, ConnId(1)));
    assert_eq!(hit.tenant, "acme");
    assert!(
        routes
            .lookup_sni(&host("other.portal.example.com"))
            .is_none()
    );
    assert!(
        routes.lookup_sni(&host(ROOT)).is_none(),
        "the root host is never a lease route"
    );
    assert_eq!(routes.len(), 1);
}

#[test]
fn bad_names_are_invalid_request() {
    let mut f = Fixture::new();
    let a = agent("acme", 1);
    let long = "a".repeat(64);
    for bad in ["", "a.b", "-a", "a-", "a_b", "ä", long.as_str(), "*"] {
        assert_eq!(
            f.code(1, &a, &tls(bad), secs(0)),
            LeaseErrorCode::InvalidRequest,
            "{bad:?}"
        );
    }
    // A valid label whose hostname would exceed 253 bytes.
    let long_root = format!("{0}.{0}.{0}.{1}", "r".repeat(63), "r".repeat(20));
    let mut f = Fixture::with(LeaseConfig {
        root_host: long_root,
        ..config()
    });
    assert_eq!(
        f.code(1, &a, &tls(&"n".repeat(63)), secs(0)),
        LeaseErrorCode::InvalidRequest
    );
    assert!(f.table.is_empty());
}

#[test]
fn only_agents_hold_leases() {
    let mut f = Fixture::new();
    let admin = Identity::parse("outrelay://acme/admin/bob").expect("valid admin URI");
    let relay = Identity::parse("outrelay://eu/relay/r1").expect("valid relay URI");
    assert_eq!(
        f.code(1, &admin, &tls("a"), secs(0)),
        LeaseErrorCode::Unauthorized
    );
    assert_eq!(
        f.code(1, &relay, &tls("a"), secs(0)),
        LeaseErrorCode::Unauthorized
    );
}

#[test]
fn controller_decisions_map_to_codes_and_messages() {
    let mut f = Fixture::new();
    let a = agent("acme", 1);
    let now = f.at(secs(0));
    let mut ids = counter();
    let cases = [
        (
            ControllerDecision::PendingApproval,
            LeaseErrorCode::LeaseRejected,
            "pending_approval",
        ),
        (
            ControllerDecision::Rejected("not routable".to_owned()),
            LeaseErrorCode::LeaseRejected,
            "not routable",
        ),
        (
            ControllerDecision::QuotaExceeded,
            LeaseErrorCode::LeaseRejected,
            "quota_exceeded",
        ),
        (
            ControllerDecision::Banned,
            LeaseErrorCode::Unauthorized,
            "banned",
        ),
    ];
    for (decision, code, message) in cases {
        let err = f
            .table
            .register(ConnId(1), &a, &tls("demo"), &decision, &mut ids, now)
            .expect_err("controller refused");
        assert_eq!((err.code, err.message.as_ref()), (code, message));
    }
    assert!(f.table.is_empty());
    assert_eq!(f.table.generation(), 0);
}

#[test]
fn transport_mismatch_cases() {
    let mut f = Fixture::new();
    let a = agent("acme", 1);
    let none = orp::LeaseRegister {
        name: "demo".to_owned(),
        ..orp::LeaseRegister::default()
    };
    let reverse = orp::LeaseRegister {
        reverse_tls: true,
        ..tls("demo")
    };
    let wildcard_tcp = orp::LeaseRegister {
        wildcard: true,
        ..tcp("demo")
    };
    for req in [none, reverse, wildcard_tcp] {
        assert_eq!(
            f.code(1, &a, &req, secs(0)),
            LeaseErrorCode::TransportMismatch,
            "{req:?}"
        );
    }
}

#[test]
fn same_identity_replaces_its_lease_on_any_connection() {
    let mut f = Fixture::new();
    let a = agent("acme", 1);
    let req = orp::LeaseRegister {
        tcp: true,
        udp: true,
        ..tls("demo")
    };
    let first = f.ok(1, &a, &req, secs(0));
    let second = f.ok(2, &a, &req, secs(1));
    assert_ne!(first.lease_id, second.lease_id);
    assert_eq!(
        (second.tcp_port, second.udp_port),
        (first.tcp_port, first.udp_port),
        "the replacement keeps its ports"
    );
    assert_eq!(f.table.len(), 1);
    let routes = f.table.routes();
    let hit = routes
        .lookup_sni(&host("demo.portal.example.com"))
        .expect("routed");
    assert_eq!((hit.lease_id, hit.conn), (second.lease_id, ConnId(2)));
    let err = f
        .table
        .renew(ConnId(1), &first.lease_id.0, 0, f.t0 + secs(2))
        .expect_err("old lease is gone");
    assert_eq!(err.code, LeaseErrorCode::LeaseNotFound);
}

#[test]
fn other_identity_gets_hostname_conflict() {
    let mut f = Fixture::new();
    f.ok(1, &agent("acme", 1), &tls("demo"), secs(0));
    let err = f
        .reg(2, &agent("acme", 2), &tls("demo"), secs(1))
        .expect_err("same tenant, other agent");
    assert_eq!(
        (err.code, err.message.as_ref()),
        (LeaseErrorCode::HostnameConflict, NAME_TAKEN)
    );
    assert_eq!(
        f.code(3, &agent("evil", 1), &tcp("DEMO"), secs(1)),
        LeaseErrorCode::HostnameConflict,
        "other tenant, any exposure"
    );
}

#[test]
fn released_hostname_stays_reserved_to_its_agent_for_five_minutes() {
    let mut f = Fixture::new();
    let g = f.ok(1, &agent("acme", 1), &tls("demo"), secs(0));
    f.table
        .release(ConnId(1), &g.lease_id.0, f.t0 + secs(10))
        .expect("release on the granting connection");
    assert!(f.table.routes().is_empty(), "released lease stops routing");
    assert_eq!(
        f.code(2, &agent("evil", 1), &tls("demo"), secs(10 + 299)),
        LeaseErrorCode::HostnameConflict
    );
    // Same tenant, another agent: refused by name (review M12), nothing changes.
    let err = f
        .reg(3, &agent("acme", 2), &tls("demo"), secs(20))
        .expect_err("reserved to agent 1");
    assert_eq!(
        (err.code, err.message.as_ref()),
        (LeaseErrorCode::HostnameConflict, NAME_TAKEN)
    );
    // The agent that held it takes it back, on a new connection.
    f.ok(3, &agent("acme", 1), &tls("demo"), secs(20));
    let g = f.table.leases().next().expect("one lease").id;
    f.table
        .release(ConnId(3), &g.0, f.t0 + secs(30))
        .expect("release");
    // Five minutes after that release the other tenant may have it.
    assert_eq!(
        f.code(2, &agent("evil", 1), &tls("demo"), secs(30 + 299)),
        LeaseErrorCode::HostnameConflict
    );
    f.ok(2, &agent("evil", 1), &tls("demo"), secs(30 + 300));
}

#[test]
fn expired_hostname_is_reserved_from_its_expiry() {
    let mut f = Fixture::new();
    f.ok(1, &agent("acme", 1), &tls("demo"), secs(0));
    // Expired at 30 s, noticed by a late sweep at 100 s: reserved until 330 s.
    let ended = f.table.sweep(f.t0 + secs(100));
    assert_eq!(ended.len(), 1);
    assert_eq!(
        f.code(2, &agent("evil", 1), &tls("demo"), secs(329)),
        LeaseErrorCode::HostnameConflict
    );
    f.ok(2, &agent("evil", 1), &tls("demo"), secs(330));
}

#[test]
fn ports_are_lowest_free_first_and_sticky_for_five_minutes() {
    // Long TTLs so that only releases (never expiry) free ports in this test.
    let mut f = Fixture::with(LeaseConfig {
        ttl_cap_s: 3_600,
        ..config()
    });
    let (a, b, c) = (agent("acme", 1), agent("acme", 2), agent("beta", 1));
    let tcp = |name: &str| orp::LeaseRegister {
        ttl_s: 3_600,
        ..tcp(name)
    };
    let ga = f.ok(1, &a, &tcp("a"), secs(0));
    let gb = f.ok(2, &b, &tcp("b"), secs(0));
    assert_eq!((ga.tcp_port, gb.tcp_port), (Some(MIN), Some(MIN + 1)));
    f.table
        .release(ConnId(1), &ga.lease_id.0, f.t0 + secs(1))
        .expect("release");
    // MIN is reserved to (agent 1 of acme, a): a newcomer gets the next free port.
    let gc = f.ok(3, &c, &tcp("c"), secs(2));
    assert_eq!(gc.tcp_port, Some(MIN + 2));
    // Another agent of acme may not have the name (nor its port) within 5 minutes.
    assert_eq!(
        f.code(4, &agent("acme", 9), &tcp("a"), secs(200)),
        LeaseErrorCode::HostnameConflict
    );
    // The agent that held it comes back within 5 minutes, on a new connection: sticky.
    let ga2 = f.ok(4, &a, &tcp("a"), secs(200));
    assert_eq!(ga2.tcp_port, Some(MIN));
    // Released again; after 5 minutes the port is free for anyone, lowest first.
    f.table
        .release(ConnId(4), &ga2.lease_id.0, f.t0 + secs(201))
        .expect("release");
    let gd = f.ok(5, &c, &tcp("d"), secs(201 + 299));
    assert_eq!(gd.tcp_port, Some(MIN + 3), "still reserved at 4:59");
    let ge = f.ok(6, &c, &tcp("e"), secs(201 + 300));
    assert_eq!(ge.tcp_port, Some(MIN), "free again at 5:00");
    // And (acme, a) now gets the lowest free port, not its old one.
    let ga3 = f.ok(7, &a, &tcp("a"), secs(600));
    assert_eq!(ga3.tcp_port, Some(MIN + 4));
}

#[test]
fn tcp_and_udp_have_separate_allocators_and_udp_slots() {
    let mut f = Fixture::new();
    let a = agent("acme", 1);
    let both = orp::LeaseRegister {
        tcp: true,
        udp: true,
        ..tls("a")
    };
    let g = f.ok(1, &a, &both, secs(0));
    assert_eq!(
        (g.tcp_port, g.udp_port, g.udp_slot),
        (Some(MIN), Some(MIN), 1)
    );
    let g2 = f.ok(1, &a, &udp("b"), secs(0));
    assert_eq!((g2.udp_port, g2.udp_slot), (Some(MIN + 1), 2));
    let g3 = f.ok(2, &a, &udp("c"), secs(0));
    assert_eq!(g3.udp_slot, 1, "slots are per connection");
    f.table
        .release(ConnId(1), &g.lease_id.0, f.t0 + secs(1))
        .expect("release");
    let g4 = f.ok(1, &a, &udp("d"), secs(1));
    assert_eq!(g4.udp_slot, 1, "a freed slot is reused");
    let routes = f.table.routes();
    assert_eq!(
        routes.lookup_udp(MIN + 1).map(|r| r.lease_id),
        Some(g2.lease_id)
    );
    assert_eq!(routes.lookup_tcp(MIN), None, "tcp lease released");
}

#[test]
fn lease_frames_for_another_connections_lease_are_lease_not_found() {
    let mut f = Fixture::new();
    let g = f.ok(1, &agent("acme", 1), &tls("demo"), secs(0));
    let now = f.t0 + secs(1);
    let elsewhere = f
        .table
        .renew(ConnId(2), &g.lease_id.0, 0, now)
        .expect_err("other connection");
    let unknown = f
        .table
        .renew(ConnId(2), &[0xee; 16], 0, now)
        .expect_err("unknown id");
    assert_eq!(elsewhere.code, LeaseErrorCode::LeaseNotFound);
    assert_eq!(elsewhere, unknown, "no hint that it exists elsewhere");
    let release = f
        .table
        .release(ConnId(2), &g.lease_id.0, now)
        .expect_err("other connection");
    assert_eq!(release, unknown);
    let short = f
        .table
        .release(ConnId(1), &g.lease_id.0[..15], now)
        .expect_err("malformed id");
    assert_eq!(short.code, LeaseErrorCode::LeaseNotFound);
    assert!(f.table.get_on_conn(ConnId(2), &g.lease_id, now).is_none());
    assert!(f.table.get_on_conn(ConnId(1), &g.lease_id, now).is_some());
    assert_eq!(f.table.len(), 1, "still live");
}

#[test]
fn expiry_stops_routing_and_renew_extends() {
    let mut f = Fixture::new();
    let g = f.ok(1, &agent("acme", 1), &tls("demo"), secs(0));
    assert!(f.table.sweep(f.t0 + secs(29)).is_empty());
    let r = f
        .table
        .renew(ConnId(1), &g.lease_id.0, 0, f.t0 + secs(20))
        .expect("renew");
    assert_eq!(r.expires_at, f.at(secs(50)));
    assert!(
        f.table
            .sweep(f.t0 + Duration::from_millis(49_999))
            .is_empty()
    );
    assert!(!f.table.routes().is_empty());
    let gen_before = f.table.generation();
    let ended = f.table.sweep(f.t0 + secs(50));
    assert_eq!(ended.iter().map(|l| l.id).collect::<Vec<_>>(), [g.lease_id]);
    assert!(f.table.routes().is_empty());
    assert_ne!(
        f.table.generation(),
        gen_before,
        "routes must be republished"
    );
    let err = f
        .table
        .renew(ConnId(1), &g.lease_id.0, 0, f.t0 + secs(51))
        .expect_err("expired");
    assert_eq!(err.code, LeaseErrorCode::LeaseNotFound);
}

#[test]
fn expiry_is_seen_by_operations_before_the_sweep() {
    let mut f = Fixture::new();
    let g = f.ok(1, &agent("acme", 1), &tls("demo"), secs(0));
    let err = f
        .table
        .renew(ConnId(1), &g.lease_id.0, 0, f.t0 + secs(30))
        .expect_err("expired at 30 s exactly");
    assert_eq!(err.code, LeaseErrorCode::LeaseNotFound);
    let ended = f.table.sweep(f.t0 + secs(31));
    assert_eq!(ended.len(), 1, "the sweep still reports it");
}

/// A reload's TTLs apply to the next grant and renewal; the lease already granted keeps its
/// expiry; the root host and the port range stay.
#[test]
fn reload_applies_ttls_to_new_grants_only() {
    let mut f = Fixture::new();
    let a = agent("acme", 1);
    let before = f.ok(1, &a, &tls("a"), secs(0));
    assert_eq!(before.ttl_s, DEFAULT_TTL_S);
    f.table.reload(&LeaseConfig {
        root_host: "other.example.com".to_owned(),
        ttl_default_s: 5,
        ttl_cap_s: 10,
        min_port: 1,
        max_port: 2,
        ..config()
    });
    let after = f.ok(1, &a, &tls("b"), secs(0));
    assert_eq!((after.ttl_s, after.expires_at), (5, f.at(secs(5))));
    let long = orp::LeaseRegister {
        ttl_s: 3_600,
        ..tls("c")
    };
    assert_eq!(f.ok(1, &a, &long, secs(0)).ttl_s, 10, "the new cap");
    assert_eq!(
        f.table.sweep(f.at(secs(6))).len(),
        1,
        "only the lease granted after the reload ended at 5 s"
    );
    assert_eq!(f.table.config().root_host, ROOT);
    assert_eq!(f.table.config().min_port, MIN);
}

#[test]
fn ttl_default_and_cap() {
    let mut f = Fixture::new();
    let a = agent("acme", 1);
    let long = orp::LeaseRegister {
        ttl_s: 100_000,
        ..tls("a")
    };
    assert_eq!(f.ok(1, &a, &long, secs(0)).ttl_s, DEFAULT_TTL_CAP_S);
    let short = orp::LeaseRegister {
        ttl_s: 7,
        ..tls("b")
    };
    let g = f.ok(1, &a, &short, secs(0));
    assert_eq!((g.ttl_s, g.expires_at), (7, f.at(secs(7))));
    let r = f
        .table
        .renew(ConnId(1), &g.lease_id.0, u32::MAX, f.t0 + secs(1))
        .expect("renew");
    assert_eq!(r.ttl_s, DEFAULT_TTL_CAP_S);
    let r = f
        .table
        .renew(ConnId(1), &g.lease_id.0, 0, f.t0 + secs(2))
        .expect("renew");
    assert_eq!((r.ttl_s, r.expires_at), (DEFAULT_TTL_S, f.at(secs(32))));
}

#[test]
fn wildcard_routes_one_level_only() {
    let mut f = Fixture::new();
    let a = agent("acme", 1);
    let wild = orp::LeaseRegister {
        wildcard: true,
        ..tls("demo")
    };
    let g = f.ok(1, &a, &wild, secs(0));
    let plain = f.ok(1, &a, &tls("plain"), secs(0));
    let routes = f.table.routes();
    let id = |h: &str| routes.lookup_sni(&host(h)).map(|r| r.lease_id);
    assert_eq!(id("demo.portal.example.com"), Some(g.lease_id));
    assert_eq!(id("x.demo.portal.example.com"), Some(g.lease_id));
    assert_eq!(id("y.x.demo.portal.example.com"), None);
    assert_eq!(id("plain.portal.example.com"), Some(plain.lease_id));
    assert_eq!(id("x.plain.portal.example.com"), None, "no wildcard asked");
    assert_eq!(id(ROOT), None);
    assert_eq!(id("x.portal.example.com"), None, "no default route");
}

#[test]
fn a_wildcard_never_captures_a_sibling_lease() {
    // Exact-before-wildcard cannot collide for one root (a wildcard child has one more label
    // than any lease hostname), so what matters is that a wildcard stays under its parent.
    let mut f = Fixture::with(LeaseConfig {
        root_host: "example.com".to_owned(),
        ..config()
    });
    let a = agent("acme", 1);
    let wild = orp::LeaseRegister {
        wildcard: true,
        ..tls("x")
    };
    let gx = f.ok(1, &a, &wild, secs(0));
    let gy = f.ok(1, &a, &tls("y"), secs(0));
    let routes = f.table.routes();
    let id = |h: &str| routes.lookup_sni(&host(h)).map(|r| r.lease_id);
    assert_eq!(id("a.x.example.com"), Some(gx.lease_id));
    assert_eq!(id("y.example.com"), Some(gy.lease_id));
    assert_eq!(id("a.y.example.com"), None);
    assert_eq!(id("example.com"), None);
    assert_eq!(routes.wildcard_parents().count(), 1);
    assert_eq!(routes.hostnames().count(), 2);
}

#[test]
fn connection_closed_drops_only_its_routes() {
    let mut f = Fixture::new();
    let a = agent("acme", 1);
    let both = orp::LeaseRegister {
        tcp: true,
        udp: true,
        ..tls("a")
    };
    let g1 = f.ok(1, &a, &both, secs(0));
    let g2 = f.ok(2, &a, &tls("b"), secs(0));
    let gen_before = f.table.generation();
    let closed = f.table.connection_closed(ConnId(1), f.t0 + secs(1));
    assert_eq!(
        closed.iter().map(|l| l.id).collect::<Vec<_>>(),
        [g1.lease_id]
    );
    assert_ne!(f.table.generation(), gen_before);
    let routes = f.table.routes();
    assert!(routes.lookup_sni(&host("a.portal.example.com")).is_none());
    assert!(routes.lookup_tcp(MIN).is_none() && routes.lookup_udp(MIN).is_none());
    assert_eq!(
        routes
            .lookup_sni(&host("b.portal.example.com"))
            .map(|r| r.lease_id),
        Some(g2.lease_id)
    );
    // Reconnect within 5 minutes: same hostname and ports.
    let again = f.ok(3, &a, &both, secs(60));
    assert_eq!((again.tcp_port, again.udp_port), (g1.tcp_port, g1.udp_port));
    assert_eq!(again.hostname, g1.hostname);
    assert!(
        f.table
            .connection_closed(ConnId(99), f.t0 + secs(61))
            .is_empty()
    );
}

#[test]
fn feature_unavailable_when_off_in_config_or_range_invalid() {
    let a = agent("acme", 1);
    let off = PortLeaseConfig {
        feature_enabled: false,
        ..config().tcp
    };
    let mut f = Fixture::with(LeaseConfig {
        tcp: off,
        udp: off,
        ..config()
    });
    assert_eq!(
        f.code(1, &a, &tcp("a"), secs(0)),
        LeaseErrorCode::FeatureUnavailable
    );
    assert_eq!(
        f.code(1, &a, &udp("a"), secs(0)),
        LeaseErrorCode::FeatureUnavailable
    );
    f.ok(1, &a, &tls("a"), secs(0));
    for (min_port, max_port) in [(MIN + 1, MIN), (0, 10)] {
        let mut f = Fixture::with(LeaseConfig {
            min_port,
            max_port,
            ..config()
        });
        assert_eq!(
            f.code(1, &a, &tcp("a"), secs(0)),
            LeaseErrorCode::FeatureUnavailable
        );
        assert_eq!(
            f.code(1, &a, &udp("a"), secs(0)),
            LeaseErrorCode::FeatureUnavailable
        );
    }
}

#[test]
fn admin_disabled_gates() {
    let mut f = Fixture::new();
    let a = agent("acme", 1);
    let off = AdminGate {
        enabled: false,
        max_leases: None,
    };
    f.table.set_admin_gate(PortTransport::Tcp, off);
    assert_eq!(
        f.code(1, &a, &tcp("a"), secs(0)),
        LeaseErrorCode::TcpPortDisabled
    );
    f.ok(1, &a, &udp("a"), secs(0));
    f.table.set_admin_gate(PortTransport::Udp, off);
    assert_eq!(
        f.code(1, &a, &udp("b"), secs(0)),
        LeaseErrorCode::UdpDisabled
    );
}

#[test]
fn capacity_exceeded_counts_other_leases_only() {
    let mut f = Fixture::new();
    let a = agent("acme", 1);
    let one = AdminGate {
        enabled: true,
        max_leases: Some(1),
    };
    f.table.set_admin_gate(PortTransport::Tcp, one);
    f.table.set_admin_gate(PortTransport::Udp, one);
    f.ok(1, &a, &tcp("a"), secs(0));
    assert_eq!(
        f.code(1, &a, &tcp("b"), secs(0)),
        LeaseErrorCode::TcpPortCapacityExceeded
    );
    f.ok(2, &a, &tcp("a"), secs(1));
    f.ok(1, &a, &udp("u"), secs(0));
    assert_eq!(
        f.code(1, &a, &udp("v"), secs(0)),
        LeaseErrorCode::UdpCapacityExceeded
    );
}

#[test]
fn exhausted_ports_including_reserved_ones() {
    let mut f = Fixture::with(LeaseConfig {
        min_port: MIN,
        max_port: MIN + 1,
        ..config()
    });
    let a = agent("acme", 1);
    let b = agent("beta", 1);
    let g = f.ok(1, &a, &tcp("a"), secs(0));
    f.ok(1, &a, &tcp("b"), secs(0));
    assert_eq!(
        f.code(2, &b, &tcp("c"), secs(0)),
        LeaseErrorCode::TcpPortExhausted
    );
    f.ok(1, &a, &udp("u1"), secs(0));
    f.ok(1, &a, &udp("u2"), secs(0));
    assert_eq!(
        f.code(2, &b, &udp("c"), secs(0)),
        LeaseErrorCode::UdpPortExhausted
    );
    f.table
        .release(ConnId(1), &g.lease_id.0, f.t0 + secs(1))
        .expect("release");
    assert_eq!(
        f.code(2, &b, &tcp("c"), secs(2)),
        LeaseErrorCode::TcpPortExhausted,
        "the released port is reserved to (acme, a)"
    );
    assert_eq!(f.ok(2, &b, &tcp("c"), secs(301)).tcp_port, Some(MIN));
}

#[test]
fn a_refused_registration_changes_nothing() {
    let mut f = Fixture::new();
    let a = agent("acme", 1);
    f.table.set_admin_gate(
        PortTransport::Udp,
        AdminGate {
            enabled: false,
            max_leases: None,
        },
    );
    let both = orp::LeaseRegister {
        tcp: true,
        udp: true,
        ..tls("a")
    };
    assert_eq!(f.code(1, &a, &both, secs(0)), LeaseErrorCode::UdpDisabled);
    assert!(f.table.is_empty() && f.table.routes().is_empty());
    assert_eq!(f.table.generation(), 0);
    // The TCP port planned for the refused lease was not taken; another tenant may use "a".
    assert_eq!(
        f.ok(2, &agent("beta", 1), &tcp("a"), secs(0)).tcp_port,
        Some(MIN)
    );
}

#[test]
fn colliding_lease_ids_end_in_internal() {
    let mut f = Fixture::new();
    f.ids = Box::new(|| [7u8; 16]);
    let a = agent("acme", 1);
    assert_eq!(f.ok(1, &a, &tls("a"), secs(0)).lease_id, LeaseId([7; 16]));
    assert_eq!(f.code(1, &a, &tls("b"), secs(0)), LeaseErrorCode::Internal);
    assert_eq!(f.table.len(), 1);
}

#[test]
fn frames_are_built_from_grants_and_refusals() {
    let mut f = Fixture::new();
    let a = agent("acme", 1);
    let req = orp::LeaseRegister {
        tcp: true,
        udp: true,
        ..tls("demo")
    };
    let g = f.ok(1, &a, &req, secs(0));
    let addrs = GrantAddrs {
        public_host: ROOT,
        reverse_addr: "relay.example.com:7443",
    };
    let frame = g.to_frame(42, addrs, f.at(secs(0)), 1_000_000);
    assert_eq!(
        frame,
        orp::LeaseGrant {
            request_id: 42,
            lease_id: g.lease_id.0.to_vec(),
            hostname: "demo.portal.example.com".to_owned(),
            tcp_addr: "portal.example.com:20000".to_owned(),
            udp_addr: "portal.example.com:20000".to_owned(),
            reverse_addr: "relay.example.com:7443".to_owned(),
            expires_unix_ms: 1_030_000,
            udp_slot: 1,
            client_addr: false,
        }
    );
    let rel = release_frame(43, g.lease_id);
    assert_eq!((rel.request_id, rel.expires_unix_ms), (43, 0));
    assert_eq!(rel.lease_id, g.lease_id.0.to_vec());
    let err = f
        .reg(2, &agent("evil", 1), &tls("demo"), secs(0))
        .expect_err("conflict")
        .to_frame(44);
    assert_eq!(
        (err.request_id, err.code.as_str()),
        (44, "hostname_conflict")
    );
    assert!(!err.message.contains("acme"), "never names the holder");
}

#[test]
fn config_validation_and_root_host() {
    assert_eq!(LeaseConfig::default().validate(), Ok(()));
    let d = LeaseConfig::default();
    assert_eq!(
        (
            d.ttl_default_s,
            d.ttl_cap_s,
            d.reservation_ms,
            d.janitor_interval_ms
        ),
        (30, 300, 300_000, 5_000)
    );
    assert_eq!(
        root_host_from_url("https://Portal.Example.com:8443/admin"),
        Ok("portal.example.com".to_owned())
    );
    assert_eq!(
        root_host_from_url("portal.example.com"),
        Ok("portal.example.com".to_owned())
    );
    assert!(matches!(
        root_host_from_url("https:///x"),
        Err(ConfigError::BadPublicUrl(_))
    ));
    assert!(matches!(
        LeaseTable::new(LeaseConfig {
            root_host: "bad host".to_owned(),
            ..config()
        }),
        Err(ConfigError::BadRootHost(_))
    ));
    let short = LeaseConfig {
        reservation_ms: 99,
        ..config()
    };
    assert!(matches!(
        short.validate(),
        Err(ConfigError::DurationTooShort {
            field: "reservation_ms",
            ..
        })
    ));
    let ttl = LeaseConfig {
        ttl_default_s: 301,
        ..config()
    };
    assert!(matches!(ttl.validate(), Err(ConfigError::BadTtl { .. })));
    assert_eq!(config().check_ephemeral_overlap(32_768, 60_999), Ok(()));
    assert!(matches!(
        config().check_ephemeral_overlap(20_500, 60_999),
        Err(ConfigError::EphemeralOverlap { .. })
    ));
}

mod model {
    //! A brute-force reference model (vectors and linear scans) and a property test that
    //! drives it and the table with the same random operations.

    use super::*;
    use proptest::prelude::*;

    const RESERVATION_MS: u64 = 60_000;
    const TTL_CAP_S: u32 = 100;
    const PORTS: std::ops::RangeInclusive<u16> = MIN..=MIN + 2;
    const NAMES: [&str; 3] = ["a", "b", "c"];

    #[derive(Debug, Clone)]
    enum Op {
        Register {
            conn: u64,
            tenant: u8,
            agent: u8,
            name: usize,
            tls: bool,
            tcp: bool,
            udp: bool,
            wildcard: bool,
            ttl_s: u32,
        },
        Renew {
            conn: u64,
            pick: usize,
            ttl_s: u32,
        },
        Release {
            conn: u64,
            pick: usize,
        },
        Close {
            conn: u64,
        },
        Advance {
            ms: u64,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        let ttl = prop::sample::select(vec![0u32, 1, 10, 45, 1_000]);
        prop_oneof![
            4 => (0..3u64, 0..2u8, 0..2u8, 0..3usize, any::<bool>(), any::<bool>(), any::<bool>(),
                  prop::bool::weighted(0.2), ttl.clone())
                .prop_map(|(conn, tenant, agent, name, tls, tcp, udp, wildcard, ttl_s)| {
                    Op::Register { conn, tenant, agent, name, tls, tcp, udp, wildcard, ttl_s }
                }),
            2 => (0..3u64, 0..16usize, ttl).prop_map(|(conn, pick, ttl_s)| Op::Renew { conn, pick, ttl_s }),
            1 => (0..3u64, 0..16usize).prop_map(|(conn, pick)| Op::Release { conn, pick }),
            1 => (0..3u64).prop_map(|conn| Op::Close { conn }),
            // Whole seconds too, so that time lands exactly on expiries (TTLs are in seconds).
            1 => (0..40_000u64).prop_map(|ms| Op::Advance { ms }),
            1 => (0..40u64).prop_map(|s| Op::Advance { ms: s * 1000 }),
        ]
    }

    #[derive(Debug, Clone)]
    struct MLease {
        id: LeaseId,
        conn: u64,
        tenant: u8,
        agent: u8,
        name: usize,
        tcp: Option<u16>,
        udp: Option<u16>,
        expires_ms: u64,
    }

    /// (port, (tenant, agent), name, until_ms)
    type PortRes = Vec<(u16, (u8, u8), usize, u64)>;

    #[derive(Debug, Default)]
    struct Model {
        now_ms: u64,
        leases: Vec<MLease>,
        /// (name, (tenant, agent), until_ms)
        names: Vec<(usize, (u8, u8), u64)>,
        tcp: PortRes,
        udp: PortRes,
        ended: Vec<LeaseId>,
        seen_ids: Vec<LeaseId>,
    }

    fn ttl_of(ttl_s: u32) -> u32 {
        if ttl_s == 0 {
            DEFAULT_TTL_S
        } else {
            ttl_s.min(TTL_CAP_S)
        }
    }

    fn pick_port(res: &PortRes, live: &[Option<u16>], who: (u8, u8), name: usize) -> Option<u16> {
        if let Some(r) = res.iter().find(|r| r.1 == who && r.2 == name) {
            return Some(r.0);
        }
        PORTS
            .into_iter()
            .find(|p| !live.contains(&Some(*p)) && !res.iter().any(|r| r.0 == *p))
    }

    impl Model {
        fn remove(&mut self, idx: usize, at_ms: u64) -> MLease {
            let l = self.leases.remove(idx);
            let until = at_ms + RESERVATION_MS;
            self.names.retain(|r| r.0 != l.name);
            let who = (l.tenant, l.agent);
            self.names.push((l.name, who, until));
            for (port, res) in [(l.tcp, &mut self.tcp), (l.udp, &mut self.udp)] {
                if let Some(p) = port {
                    res.retain(|r| !(r.1 == who && r.2 == l.name));
                    res.push((p, who, l.name, until));
                }
            }
            l
        }

        fn expire(&mut self) {
            while let Some(idx) = self.leases.iter().position(|l| l.expires_ms <= self.now_ms) {
                let at = self.leases[idx].expires_ms;
                let l = self.remove(idx, at);
                self.ended.push(l.id);
            }
            let now = self.now_ms;
            self.names.retain(|r| now < r.2);
            self.tcp.retain(|r| now < r.3);
            self.udp.retain(|r| now < r.3);
        }

        fn owned(&self, conn: u64, id: &LeaseId) -> Option<usize> {
            self.leases
                .iter()
                .position(|l| l.id == *id && l.conn == conn)
        }
    }

    fn check(table: &LeaseTable, model: &Model) {
        // Same live leases.
        assert_eq!(table.len(), model.leases.len());
        for m in &model.leases {
            let l = table.get(&m.id).expect("model lease is live in the table");
            assert_eq!((l.conn.0, l.tcp_port, l.udp_port), (m.conn, m.tcp, m.udp));
            assert_eq!(l.name.as_str(), NAMES[m.name]);
        }
        // No two live leases share a hostname or a port; ports in range.
        let leases: Vec<&Lease> = table.leases().collect();
        for (i, x) in leases.iter().enumerate() {
            for y in &leases[i + 1..] {
                assert_ne!(x.hostname, y.hostname);
                assert!(x.tcp_port.is_none() || x.tcp_port != y.tcp_port);
                assert!(x.udp_port.is_none() || x.udp_port != y.udp_port);
            }
            for p in x.tcp_port.iter().chain(&x.udp_port) {
                assert!(PORTS.contains(p));
            }
        }
        // Every route belongs to a live lease, and matches it.
        let routes = table.routes();
        let live = |id: &LeaseId| table.get(id).expect("route to a live lease");
        for (h, r) in routes.hostnames() {
            let l = live(&r.lease_id);
            assert!(l.tls && l.hostname.as_str() == h && l.conn == r.conn);
        }
        for (h, r) in routes.wildcard_parents() {
            let l = live(&r.lease_id);
            assert!(l.wildcard && l.hostname.as_str() == h);
        }
        for (p, r) in routes.tcp_ports() {
            assert_eq!(live(&r.lease_id).tcp_port, Some(p));
        }
        for (p, r) in routes.udp_ports() {
            assert_eq!(live(&r.lease_id).udp_port, Some(p));
        }
        let tls = leases.iter().filter(|l| l.tls).count();
        assert_eq!(routes.hostnames().count(), tls);
        table.tcp.check_invariants();
        table.udp.check_invariants();
    }

    fn run(ops: Vec<Op>) {
        let mut table = LeaseTable::new(LeaseConfig {
            root_host: ROOT.to_owned(),
            ttl_cap_s: TTL_CAP_S,
            reservation_ms: RESERVATION_MS,
            min_port: *PORTS.start(),
            max_port: *PORTS.end(),
            tcp: PortLeaseConfig::on(),
            udp: PortLeaseConfig::on(),
            ..LeaseConfig::default()
        })
        .expect("valid config");
        let mut ids = counter();
        let mut model = Model::default();
        let t0 = Instant::now();
        for op in ops {
            let now = t0 + Duration::from_millis(model.now_ms);
            match op {
                Op::Register {
                    conn,
                    tenant,
                    agent: ag,
                    name,
                    tls,
                    tcp,
                    udp,
                    wildcard,
                    ttl_s,
                } => {
                    let who = super::agent(["t0", "t1"][usize::from(tenant)], ag);
                    let req = orp::LeaseRegister {
                        name: NAMES[name].to_owned(),
                        tls,
                        tcp,
                        udp,
                        wildcard,
                        ttl_s,
                        ..orp::LeaseRegister::default()
                    };
                    let got = table.register(
                        ConnId(conn),
                        &who,
                        &req,
                        &ControllerDecision::Approved,
                        &mut ids,
                        now,
                    );
                    model.expire();
                    let expected = model_register(&mut model, conn, tenant, ag, name, &req);
                    match (got, expected) {
                        (Ok(g), Ok((tcp_port, udp_port))) => {
                            assert_eq!((g.tcp_port, g.udp_port), (tcp_port, udp_port));
                            model.leases.push(MLease {
                                id: g.lease_id,
                                conn,
                                tenant,
                                agent: ag,
                                name,
                                tcp: tcp_port,
                                udp: udp_port,
                                expires_ms: model.now_ms + u64::from(ttl_of(ttl_s)) * 1000,
                            });
                            model.seen_ids.push(g.lease_id);
                        }
                        (Err(e), Err(code)) => assert_eq!(e.code, code),
                        (got, expected) => panic!("table {got:?} model {expected:?}"),
                    }
                }
                Op::Renew { conn, pick, ttl_s } => {
                    let id = pick_id(&model, pick);
                    let got = table.renew(ConnId(conn), &id.0, ttl_s, now);
                    model.expire();
                    match model.owned(conn, &id) {
                        Some(i) => {
                            let g = got.expect("model says renewable");
                            let expires = model.now_ms + u64::from(ttl_of(ttl_s)) * 1000;
                            model.leases[i].expires_ms = expires;
                            assert_eq!(g.expires_at, t0 + Duration::from_millis(expires));
                        }
                        None => assert_eq!(
                            got.expect_err("model says not found").code,
                            LeaseErrorCode::LeaseNotFound
                        ),
                    }
                }
                Op::Release { conn, pick } => {
                    let id = pick_id(&model, pick);
                    let got = table.release(ConnId(conn), &id.0, now);
                    model.expire();
                    match model.owned(conn, &id) {
                        Some(i) => {
                            let now_ms = model.now_ms;
                            model.remove(i, now_ms);
                            assert_eq!(got.expect("model says releasable").id, id);
                        }
                        None => assert_eq!(
                            got.expect_err("model says not found").code,
                            LeaseErrorCode::LeaseNotFound
                        ),
                    }
                }
                Op::Close { conn } => {
                    let mut got: Vec<LeaseId> = table
                        .connection_closed(ConnId(conn), now)
                        .iter()
                        .map(|l| l.id)
                        .collect();
                    model.expire();
                    let mut expected = Vec::new();
                    while let Some(i) = model.leases.iter().position(|l| l.conn == conn) {
                        let now_ms = model.now_ms;
                        expected.push(model.remove(i, now_ms).id);
                    }
                    got.sort();
                    expected.sort();
                    assert_eq!(got, expected);
                }
                Op::Advance { ms } => {
                    model.now_ms += ms;
                    let mut got: Vec<LeaseId> = table
                        .sweep(t0 + Duration::from_millis(model.now_ms))
                        .iter()
                        .map(|l| l.id)
                        .collect();
                    model.expire();
                    let mut expected = std::mem::take(&mut model.ended);
                    got.sort();
                    expected.sort();
                    assert_eq!(got, expected, "swept leases");
                }
            }
            check(&table, &model);
        }
    }

    fn pick_id(model: &Model, pick: usize) -> LeaseId {
        model
            .seen_ids
            .get(pick)
            .copied()
            .unwrap_or(LeaseId([0xff; 16]))
    }

    /// The model's answer to a registration: the ports, or the code. On success it removes a
    /// replaced lease and consumes reservations (the caller pushes the new lease).
    fn model_register(
        m: &mut Model,
        conn: u64,
        tenant: u8,
        agent: u8,
        name: usize,
        req: &orp::LeaseRegister,
    ) -> Result<(Option<u16>, Option<u16>), LeaseErrorCode> {
        let _ = conn;
        if !(req.tls || req.tcp || req.udp) || (req.wildcard && !req.tls) {
            return Err(LeaseErrorCode::TransportMismatch);
        }
        let holder = m.leases.iter().position(|l| l.name == name);
        if let Some(i) = holder
            && (m.leases[i].tenant, m.leases[i].agent) != (tenant, agent)
        {
            return Err(LeaseErrorCode::HostnameConflict);
        }
        // Reserved to another agent identity (of any tenant).
        if m.names
            .iter()
            .any(|r| r.0 == name && r.1 != (tenant, agent))
        {
            return Err(LeaseErrorCode::HostnameConflict);
        }
        let old = holder.map(|i| m.leases[i].clone());
        let live_tcp: Vec<Option<u16>> = m.leases.iter().map(|l| l.tcp).collect();
        let live_udp: Vec<Option<u16>> = m.leases.iter().map(|l| l.udp).collect();
        let tcp = if req.tcp {
            match old.as_ref().and_then(|o| o.tcp) {
                Some(p) => Some(p),
                None => Some(
                    pick_port(&m.tcp, &live_tcp, (tenant, agent), name)
                        .ok_or(LeaseErrorCode::TcpPortExhausted)?,
                ),
            }
        } else {
            None
        };
        let udp = if req.udp {
            match old.as_ref().and_then(|o| o.udp) {
                Some(p) => Some(p),
                None => Some(
                    pick_port(&m.udp, &live_udp, (tenant, agent), name)
                        .ok_or(LeaseErrorCode::UdpPortExhausted)?,
                ),
            }
        } else {
            None
        };
        if let Some(i) = holder {
            let now_ms = m.now_ms;
            m.remove(i, now_ms);
        }
        m.names.retain(|r| r.0 != name);
        if let Some(p) = tcp {
            m.tcp.retain(|r| r.0 != p);
        }
        if let Some(p) = udp {
            m.udp.retain(|r| r.0 != p);
        }
        Ok((tcp, udp))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
        #[test]
        fn table_matches_reference_model(ops in prop::collection::vec(op(), 1..80)) {
            run(ops);
        }
    }
}

#[test]
fn an_agent_holds_at_most_max_leases_per_agent_across_its_connections() {
    let mut f = Fixture::with(LeaseConfig {
        max_leases_per_agent: 2,
        ..config()
    });
    let (a, b) = (agent("acme", 1), agent("acme", 2));
    f.ok(1, &a, &tls("one"), secs(0));
    f.ok(2, &a, &tls("two"), secs(0));
    // A third name, on either connection: refused with the fixed message, nothing changes.
    let before = f.table.generation();
    let err = f
        .reg(1, &a, &tls("three"), secs(1))
        .expect_err("over the cap");
    assert_eq!(
        (err.code, err.message.as_ref()),
        (LeaseErrorCode::LeaseRejected, AGENT_LEASE_LIMIT)
    );
    assert_eq!(f.table.generation(), before, "a refusal publishes nothing");
    // Re-registering one of its own names replaces it and is not a new lease.
    f.ok(1, &a, &tls("one"), secs(1));
    // Another agent of the same tenant has its own budget.
    f.ok(3, &b, &tls("three"), secs(1));
    // Releasing frees a slot.
    let two = f
        .table
        .leases()
        .find(|l| l.name.as_str() == "two")
        .map(|l| (l.conn, l.id));
    let (conn, id) = two.expect("two is live");
    f.table
        .release(conn, &id.0, f.at(secs(2)))
        .expect("release");
    f.ok(2, &a, &tls("four"), secs(2));
}

#[test]
fn operations_skip_the_expiry_scan_until_the_next_deadline_and_still_expire_on_time() {
    let mut f = Fixture::new();
    let a = agent("acme", 1);
    f.ok(
        1,
        &a,
        &orp::LeaseRegister {
            ttl_s: 60,
            ..tls("long")
        },
        secs(0),
    );
    let short = f.ok(
        1,
        &a,
        &orp::LeaseRegister {
            ttl_s: 10,
            ..tls("short")
        },
        secs(0),
    );
    // A renewal that SHORTENS the TTL brings the deadline forward.
    f.table
        .renew(ConnId(1), &short.lease_id.0, 1, f.at(secs(5)))
        .expect("renew");
    assert!(
        f.table
            .renew(ConnId(1), &[9; 16], 0, f.at(secs(5)))
            .is_err()
    );
    let ended = f.table.sweep(f.at(secs(6)));
    assert_eq!(ended.len(), 1, "the shortened lease expired at 6 s");
    assert_eq!(ended[0].name.as_str(), "short");
    assert_eq!(f.table.sweep(f.at(secs(59))).len(), 0);
    assert_eq!(f.table.sweep(f.at(secs(60))).len(), 1);
}

/// Issue 20: a new process that inherits the old one's leases reserves each name and port to
/// the agent that held it: that agent gets the same name and ports back, another agent of
/// the same tenant or of another tenant gets neither, until the reservation period ends.
#[test]
fn inherited_leases_come_back_to_their_own_agent_with_the_same_ports() {
    let (a, b, c) = (agent("acme", 1), agent("acme", 2), agent("beta", 1));
    let mut old = Fixture::new();
    // Gaps in the ports, so that "same port" differs from "lowest free port".
    let filler = old.ok(9, &c, &tcp("filler"), secs(0));
    let web = old.ok(
        1,
        &a,
        &orp::LeaseRegister {
            tcp: true,
            ..tls("web")
        },
        secs(0),
    );
    let game = old.ok(
        2,
        &b,
        &orp::LeaseRegister {
            udp: true,
            ..tcp("game")
        },
        secs(0),
    );
    old.ok(3, &c, &tls("blog"), secs(0));
    old.table
        .release(ConnId(9), &filler.lease_id.0, old.at(secs(1)))
        .expect("release");
    let list = old.table.inherited_leases();
    assert_eq!(list.len(), 3, "{list:?}");
    let web_entry = list.iter().find(|l| l.name == "web").expect("web");
    assert_eq!(web_entry.tenant, "acme");
    assert_eq!(web_entry.agent_uri, a.to_string());
    assert_eq!(
        web_entry.hostname.as_deref(),
        Some("web.portal.example.com")
    );
    assert_eq!(web_entry.tcp_port, web.tcp_port);
    let game_entry = list.iter().find(|l| l.name == "game").expect("game");
    assert_eq!(
        game_entry.hostname, None,
        "a lease without tls serves no SNI name"
    );
    assert_eq!(
        (game_entry.tcp_port, game_entry.udp_port),
        (game.tcp_port, game.udp_port)
    );
    // The hand-over carries it as JSON with exactly these field names.
    let json = serde_json::to_string(web_entry).expect("json");
    for field in [
        "tenant",
        "agent_uri",
        "name",
        "hostname",
        "tcp_port",
        "udp_port",
    ] {
        assert!(json.contains(&format!("\"{field}\":")), "{field} in {json}");
    }
    let back: InheritedLease = serde_json::from_str(&json).expect("parse");
    assert_eq!(&back, web_entry);

    let mut new = Fixture::new();
    let done = new.table.inherit(&list, new.at(secs(0)));
    assert_eq!((done.names, done.ports, done.skipped), (3, 3, 0));
    new.table.tcp.check_invariants();
    new.table.udp.check_invariants();
    assert!(new.table.is_empty(), "reservations route nothing");
    // Another agent of the same tenant, another tenant: neither name is theirs.
    let d = agent("acme", 9);
    for (who, name) in [
        (&d, "web"),
        (&c, "web"),
        (&d, "game"),
        (&c, "game"),
        (&a, "blog"),
    ] {
        assert_eq!(
            new.code(10, who, &tcp(name), secs(1)),
            LeaseErrorCode::HostnameConflict,
            "{name} for {who}"
        );
    }
    // A newcomer's port is none of the inherited ones.
    let other = new.ok(
        11,
        &d,
        &orp::LeaseRegister {
            udp: true,
            ..tcp("other")
        },
        secs(1),
    );
    assert_ne!(other.tcp_port, web.tcp_port);
    assert_ne!(other.tcp_port, game.tcp_port);
    assert_ne!(other.udp_port, game.udp_port);
    // Each agent comes back (on a new connection) and gets its own name and ports, equal.
    let web2 = new.ok(
        12,
        &a,
        &orp::LeaseRegister {
            tcp: true,
            ..tls("web")
        },
        secs(2),
    );
    assert_eq!(web2.hostname, web.hostname);
    assert_eq!(web2.tcp_port, web.tcp_port);
    let game2 = new.ok(
        13,
        &b,
        &orp::LeaseRegister {
            udp: true,
            ..tcp("game")
        },
        secs(2),
    );
    assert_eq!(
        (game2.tcp_port, game2.udp_port),
        (game.tcp_port, game.udp_port)
    );
    assert_eq!(
        new.ok(14, &c, &tls("blog"), secs(2)).hostname,
        host("blog.portal.example.com")
    );
    new.table.tcp.check_invariants();
    new.table.udp.check_invariants();
    // Inheriting again changes nothing that is live now.
    let again = new.table.inherit(&list, new.at(secs(3)));
    assert_eq!((again.names, again.skipped), (0, 3));
    assert_eq!(new.table.len(), 4);
}

#[test]
fn inherited_reservations_end_after_the_reservation_period_and_bad_entries_are_skipped() {
    let a = agent("acme", 1);
    let mut f = Fixture::new();
    let list = vec![
        InheritedLease {
            tenant: "acme".into(),
            agent_uri: a.to_string(),
            name: "web".into(),
            hostname: Some("web.portal.example.com".into()),
            tcp_port: Some(MIN + 5),
            udp_port: None,
        },
        // The URI's tenant is not the entry's: skipped whole.
        InheritedLease {
            tenant: "beta".into(),
            agent_uri: a.to_string(),
            name: "evil".into(),
            hostname: None,
            tcp_port: Some(MIN + 6),
            udp_port: None,
        },
        // A port outside this relay's range: the name is reserved, the port skipped.
        InheritedLease {
            tenant: "acme".into(),
            agent_uri: a.to_string(),
            name: "far".into(),
            hostname: None,
            tcp_port: Some(1),
            udp_port: None,
        },
    ];
    let done = f.table.inherit(&list, f.at(secs(0)));
    assert_eq!((done.names, done.ports, done.skipped), (2, 1, 2));
    f.table.tcp.check_invariants();
    let other = agent("acme", 2);
    assert_eq!(
        f.code(1, &other, &tcp("web"), secs(299)),
        LeaseErrorCode::HostnameConflict
    );
    // "evil" was not reserved; its port neither.
    let evil = f.ok(2, &other, &tcp("evil"), secs(1));
    assert_eq!(evil.tcp_port, Some(MIN));
    // After 5 minutes the name and port are anyone's.
    let g = f.ok(3, &other, &tcp("web"), secs(300));
    assert_eq!(g.hostname, host("web.portal.example.com"));
    f.table.tcp.check_invariants();
}

#[test]
fn expectations_end_at_their_deadline_or_when_the_lease_is_routed() {
    let t0 = Instant::now();
    let lease = |name: &str, tcp: Option<u16>, udp: Option<u16>| InheritedLease {
        tenant: "acme".into(),
        agent_uri: agent("acme", 1).to_string(),
        name: name.into(),
        hostname: Some(format!("{name}.{ROOT}")),
        tcp_port: tcp,
        udp_port: udp,
    };
    let e = Expected::default().with(
        &[
            lease("web", Some(MIN), None),
            lease("game", None, Some(MIN + 1)),
        ],
        t0 + secs(2),
    );
    assert!(!e.is_empty());
    assert!(e.host(&host("web.portal.example.com"), t0 + secs(1)));
    assert!(
        !e.host(&host("web.portal.example.com"), t0 + secs(2)),
        "ends at the deadline"
    );
    assert!(
        !e.host(&host("x.web.portal.example.com"), t0),
        "exact names only"
    );
    assert!(e.tcp(MIN, t0) && !e.tcp(MIN + 1, t0));
    assert!(e.udp(MIN + 1, t0) && !e.udp(MIN, t0));
    assert_eq!(e.next_end(), Some(t0 + secs(2)));
    // A later call extends an entry, never shortens it.
    let e2 = e.with(&[lease("web", None, None)], t0 + secs(1));
    assert!(e2.host(&host("web.portal.example.com"), t0 + secs(1)));
    let e3 = e.with(&[lease("web", None, None)], t0 + secs(5));
    assert!(e3.host(&host("web.portal.example.com"), t0 + secs(4)));

    let mut f = Fixture::new();
    assert!(
        e.pruned(&f.table.routes(), t0).is_none(),
        "nothing routed, nothing ended"
    );
    let wanted = WantedPorts::of(&f.table.routes(), &e, t0);
    assert_eq!(wanted.tcp.into_iter().collect::<Vec<_>>(), vec![MIN]);
    assert_eq!(wanted.udp.into_iter().collect::<Vec<_>>(), vec![MIN + 1]);
    let ended = WantedPorts::of(&f.table.routes(), &e, t0 + secs(2));
    assert_eq!(
        ended,
        WantedPorts::default(),
        "expected ports end with the expectation"
    );
    // The web lease appears (tls + its port): its name and port are no longer expected.
    let g = f.ok(
        1,
        &agent("acme", 1),
        &orp::LeaseRegister {
            tcp: true,
            ..tls("web")
        },
        secs(0),
    );
    assert_eq!(g.tcp_port, Some(MIN));
    let p = e.pruned(&f.table.routes(), t0).expect("changed");
    assert!(!p.host(&host("web.portal.example.com"), t0));
    assert!(!p.tcp(MIN, t0));
    assert!(p.host(&host("game.portal.example.com"), t0) && p.udp(MIN + 1, t0));
    let wanted = WantedPorts::of(&f.table.routes(), &p, t0);
    assert_eq!(
        wanted.tcp.into_iter().collect::<Vec<_>>(),
        vec![MIN],
        "routed now"
    );
    assert!(
        p.pruned(&f.table.routes(), t0 + secs(2))
            .expect("ended")
            .is_empty()
    );
}
