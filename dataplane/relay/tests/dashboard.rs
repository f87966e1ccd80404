//! Issue 21, the relay's dashboard on its metrics listener, against the real binary: `GET /`
//! is an HTML page listing the leases, `GET /status.json` is the admin socket's `status`
//! document, a name the relay refuses never reaches the page, any write is 405, `/metrics`
//! is unchanged.
#![allow(missing_docs, clippy::unwrap_used)]

mod common;

use outrelay_proto::frame::Frame;
use outrelay_proto::orp;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::*;

/// One HTTP/1.1 request (`Connection: close`): status code, header block (lower-cased), body.
async fn http(addr: &str, method: &str, path: &str) -> (u16, String, String) {
    let mut c = TcpStream::connect(addr).await.expect("connect metrics");
    c.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("request");
    let mut raw = String::new();
    tokio::time::timeout(WAIT, c.read_to_string(&mut raw))
        .await
        .expect("answer in time")
        .expect("read answer");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a header block");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    (status, head.to_ascii_lowercase(), body.to_owned())
}

/// What of a status document must be the same in two reads a moment apart: everything but the
/// counters that move on their own (idle sessions come and go with the agent's pool).
fn stable(status: &Value) -> Value {
    let mut leases: Vec<Value> = status["leases"].as_array().cloned().unwrap_or_default();
    for l in &mut leases {
        if let Some(m) = l.as_object_mut() {
            m.remove("idle_sessions");
            m.remove("live_connections");
        }
    }
    let mut keys: Vec<&String> = status.as_object().expect("an object").keys().collect();
    keys.sort();
    serde_json::json!({
        "keys": keys,
        "leases": leases,
        "io_backend": status["io_backend"],
        "workers": status["workers"],
        "snapshot_generation": status["snapshot_generation"],
        "config": status["config"],
        "drain": status["drain"]["draining"],
        "upgrade": status["upgrade"],
        "drops": status["drops"].as_object().map(|m| m.keys().cloned().collect::<Vec<_>>()),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_lists_the_leases_and_its_json_is_the_admin_status() {
    let ca = Ca::new();
    let (lo, hi) = free_port_range();
    let relay = start_relay(
        &ca,
        &format!("tcp = true\nmin_port = {lo}\nmax_port = {hi}\n"),
        None,
    )
    .await;
    let mut agent = Agent::connect(&relay, &ca).await;
    let demo = agent.register("demo", true, false).await;
    let shop = agent.register("shop", false, true).await;
    assert_eq!(demo.hostname, DEMO_HOST);
    let shop_port: u16 = shop
        .tcp_addr
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the TCP lease's port");
    // A name from the wire that would be markup: the relay refuses it, so it never shows.
    let refused = agent
        .call(Frame::LeaseRegister(orp::LeaseRegister {
            name: "<script>alert(1)</script>".to_owned(),
            tls: true,
            ttl_s: 300,
            request_id: 9,
            ..orp::LeaseRegister::default()
        }))
        .await;
    assert!(
        !matches!(refused, Frame::LeaseGrant(_)),
        "a markup name is refused: {refused:?}"
    );

    // The JSON snapshot is the admin socket's `status` document.
    let admin = relay.admin("status").await;
    let (code, head, body) = http(&relay.metrics, "GET", "/status.json").await;
    assert_eq!(code, 200, "{head}\n{body}");
    assert!(head.contains("content-type: application/json"), "{head}");
    let json: Value = serde_json::from_str(&body).expect("status.json parses");
    assert_eq!(stable(&json), stable(&admin), "status.json vs admin status");
    let leases = json["leases"].as_array().expect("leases");
    assert_eq!(leases.len(), 2, "{json}");
    let shop_entry = leases
        .iter()
        .find(|l| l["hostname"] == "shop.relay.outrelay.test")
        .expect("shop listed");
    assert_eq!(shop_entry["tcp_port"], shop_port, "{shop_entry}");
    assert_eq!(shop_entry["tenant"], "test", "{shop_entry}");
    assert!(shop_entry["live_connections"].is_u64(), "{shop_entry}");

    // The page: HTML, read-only headers, every lease with its port, nothing unescaped.
    let (code, head, page) = http(&relay.metrics, "GET", "/").await;
    assert_eq!(code, 200, "{head}");
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(
        head.contains("content-security-policy: default-src 'none'; style-src 'unsafe-inline'"),
        "{head}"
    );
    assert!(page.starts_with("<!DOCTYPE html>"), "{page}");
    assert!(page.contains(r#"http-equiv="refresh""#), "{page}");
    for needle in [
        DEMO_HOST,
        "shop.relay.outrelay.test",
        &shop_port.to_string(),
        "Drops by reason",
        "Workers",
    ] {
        assert!(page.contains(needle), "the page lists {needle}: {page}");
    }
    assert!(!page.contains("<script"), "no script on the page: {page}");

    // Read-only: any other method is 405; /metrics is unchanged; unknown paths 404.
    for (method, path) in [
        ("POST", "/"),
        ("PUT", "/status.json"),
        ("DELETE", "/metrics"),
    ] {
        let (code, head, _) = http(&relay.metrics, method, path).await;
        assert_eq!(code, 405, "{method} {path}: {head}");
        assert!(head.contains("allow: get"), "{head}");
    }
    let (code, _, _) = http(&relay.metrics, "GET", "/nope").await;
    assert_eq!(code, 404);
    let metrics = relay.scrape().await;
    assert!(
        metrics.contains("outrelay_relay_leases_live 2"),
        "{metrics}"
    );
}
