//! Issue 21, the controller's dashboard on its metrics listener, against the real binary with
//! real mTLS callers: `GET /status.json` carries relays, leases, services, policy and recent
//! audit rows equal to what the List RPCs answer, capped (and saying so); `GET /` is the HTML
//! page of it with names from the wire escaped; any write is 405; `/metrics` is unchanged.

mod common;

use common::{Controller, UUID_A};
use outrelay_api::pb::{
    self, lease_report_request::Kind, leases_client::LeasesClient, policy_client::PolicyClient,
    registry_client::RegistryClient, relays_client::RelaysClient,
};
use outrelay_controller::pki::LeafProfile;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RELAY: &str = "outrelay://eu-west/relay/r1";
const SCRIPT: &str = "<script>alert(1)</script>";

/// One HTTP/1.1 request (`Connection: close`): status code, header block (lower-cased), body.
async fn http(addr: &str, method: &str, path: &str) -> (u16, String, String) {
    let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
    c.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("request");
    let mut raw = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(20),
        c.read_to_string(&mut raw),
    )
    .await
    .expect("answer in time")
    .expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").expect("header block");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    (status, head.to_ascii_lowercase(), body.to_owned())
}

fn rule(method: &str) -> pb::PolicyRule {
    pb::PolicyRule {
        tenant: "acme".into(),
        caller_pattern: "outrelay://acme/agent/*".into(),
        target_pattern: "web".into(),
        method_pattern: method.into(),
        decision: pb::Decision::Allow as i32,
        ..Default::default()
    }
}

fn rows(v: &Value) -> &Vec<Value> {
    v["rows"].as_array().expect("rows")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_what_the_list_rpcs_answer_escaped_capped_and_read_only() {
    let dir = tempfile::tempdir().expect("tmp");
    let c = Controller::start(dir.path(), "");
    let addr = c.metrics.clone().expect("metrics listener");
    let admin = c.unix_channel().await;
    let relay = c
        .channel(Some(&c.cert(RELAY, LeafProfile::ClientServer)))
        .await;

    // A relay heartbeats, registers two providers (one named like markup) and a lease.
    RelaysClient::new(relay.clone())
        .upsert_relay(pb::UpsertRelayRequest {
            id: "r1".into(),
            region: "eu-west".into(),
            endpoint: "r1.example:7443".into(),
        })
        .await
        .expect("heartbeat");
    for service in ["web", SCRIPT] {
        RegistryClient::new(relay.clone())
            .register_service(pb::RegisterServiceRequest {
                tenant: "acme".into(),
                service_name: service.into(),
                agent_uri: format!("outrelay://acme/agent/{UUID_A}"),
                relay_id: "r1".into(),
                local_addr: "127.0.0.1:8080".into(),
            })
            .await
            .expect("register service");
    }
    LeasesClient::new(relay.clone())
        .report(pb::LeaseReportRequest {
            kind: Kind::Grant as i32,
            tenant: "acme".into(),
            name: "shop".into(),
            agent_uri: format!("outrelay://acme/agent/{UUID_A}"),
            lease_kind: "tls".into(),
            ttl_ms: 60_000,
        })
        .await
        .expect("lease grant");
    // More admin audit rows than the page shows: one per rule added.
    let mut policy = PolicyClient::new(admin.clone());
    for i in 0..55 {
        let method = if i == 0 {
            SCRIPT.to_owned()
        } else {
            format!("m{i}")
        };
        policy
            .add_policy(pb::AddPolicyRequest {
                rule: Some(rule(&method)),
            })
            .await
            .expect("add rule");
    }

    let (code, head, body) = http(&addr, "GET", "/status.json").await;
    assert_eq!(code, 200, "{head}\n{body}");
    assert!(head.contains("content-type: application/json"), "{head}");
    let snap: Value = serde_json::from_str(&body).expect("status.json parses");

    // Equal to what the List RPCs answer (stable fields).
    let relays = RelaysClient::new(admin.clone())
        .list_relays(pb::ListRelaysRequest {})
        .await
        .expect("list relays")
        .into_inner()
        .relays;
    let shown: Vec<(&str, bool)> = rows(&snap["relays"])
        .iter()
        .map(|r| (r["id"].as_str().unwrap_or(""), r["up"] == true))
        .collect();
    let listed: Vec<(&str, bool)> = relays.iter().map(|r| (r.id.as_str(), r.up)).collect();
    assert_eq!(shown, listed, "{snap}");
    let leases = LeasesClient::new(admin.clone())
        .list(pb::ListLeasesRequest::default())
        .await
        .expect("list leases")
        .into_inner()
        .leases;
    let shown: Vec<(&str, &str, &str)> = rows(&snap["leases"])
        .iter()
        .map(|l| {
            (
                l["id"].as_str().unwrap_or(""),
                l["name"].as_str().unwrap_or(""),
                l["state"].as_str().unwrap_or(""),
            )
        })
        .collect();
    let listed: Vec<(&str, &str, &str)> = leases
        .iter()
        .map(|l| (l.id.as_str(), l.name.as_str(), "approved"))
        .collect();
    assert_eq!(shown, listed, "{snap}");
    assert_eq!(leases.len(), 1);
    assert_eq!(rows(&snap["leases"])[0]["live"], true, "{snap}");
    let providers = RegistryClient::new(admin.clone())
        .list_services(pb::ListServicesRequest::default())
        .await
        .expect("list services")
        .into_inner()
        .providers;
    let mut shown: Vec<&str> = rows(&snap["services"])
        .iter()
        .map(|p| p["service_id"].as_str().unwrap_or(""))
        .collect();
    let mut listed: Vec<&str> = providers.iter().map(|p| p.service_id.as_str()).collect();
    shown.sort_unstable();
    listed.sort_unstable();
    assert_eq!(shown, listed, "{snap}");
    assert_eq!(listed.len(), 2);
    assert_eq!(snap["policy"]["total"], 55, "{}", snap["policy"]);
    assert_eq!(rows(&snap["policy"]).len(), 55);
    // Audit: capped at the most recent 50, newest first, and it says so.
    let audit = &snap["audit"];
    assert_eq!(rows(audit).len(), 50, "{audit}");
    assert_eq!(audit["truncated"], true, "{audit}");
    assert!(audit["total"].as_u64().unwrap_or(0) >= 55, "{audit}");
    let seqs: Vec<u64> = rows(audit)
        .iter()
        .map(|r| r["seq"].as_u64().unwrap_or(0))
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] > w[1]),
        "newest first: {seqs:?}"
    );

    // The page: HTML with the read-only headers, the names, escaped, and the cap said.
    let (code, head, page) = http(&addr, "GET", "/").await;
    assert_eq!(code, 200, "{head}");
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(
        head.contains("content-security-policy: default-src 'none'; style-src 'unsafe-inline'"),
        "{head}"
    );
    assert!(page.contains(r#"http-equiv="refresh""#), "{page}");
    for needle in [
        "r1.example:7443",
        "shop",
        "acme/web",
        "outrelay://acme/agent/*",
        "acme/&lt;script&gt;alert(1)&lt;/script&gt;",
        "Truncated: 50 of",
    ] {
        assert!(page.contains(needle), "the page shows {needle}: {page}");
    }
    assert!(!page.contains("<script"), "nothing unescaped: {page}");

    // Read-only; /metrics unchanged (HTTP/1.0 still answered); unknown paths 404.
    for (method, path) in [
        ("POST", "/"),
        ("PUT", "/status.json"),
        ("DELETE", "/metrics"),
    ] {
        let (code, head, _) = http(&addr, method, path).await;
        assert_eq!(code, 405, "{method} {path}: {head}");
        assert!(head.contains("allow: get"), "{head}");
    }
    assert_eq!(http(&addr, "GET", "/nope").await.0, 404);
    let metrics = c.metrics_text().await;
    assert!(
        metrics.contains("outrelay_controller_relay_heartbeats_total"),
        "{metrics}"
    );
}
