//! Issue 19: messages encoded as the Go OutRelay project encodes them (`Decision`, `P2PMode`
//! and `RelayMode` are enums there) decode on our controller and round-trip through it: a Go
//! relay's `Audit.Record` and a Go CLI's `Policy.AddPolicy`. The bytes are written by hand from
//! Go's `audit.proto`/`policy.proto` field numbers and wire types, not by our own encoder.

mod common;

use common::Controller;
use outrelay_api::pb::{self, audit_client::AuditClient, policy_client::PolicyClient};
use outrelay_controller::pki::LeafProfile;
use prost::Message;

/// A length-delimited field.
fn bytes_field(out: &mut Vec<u8>, field: u8, value: &[u8]) {
    out.push(field << 3 | 2);
    out.push(u8::try_from(value.len()).expect("short field"));
    out.extend_from_slice(value);
}

/// A varint field (values below 128).
fn small_varint_field(out: &mut Vec<u8>, field: u8, value: u8) {
    out.push(field << 3);
    out.push(value);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_go_relays_audit_record_and_a_go_policy_rule_decode_and_round_trip() {
    // RecordAuditRequest{1: AuditEvent{2 tenant, 3 caller, 4 target, 5 method,
    // 6 decision = DECISION_DENY (varint 2), 7 reason, 8 stream_id}}, as Go's protobuf writes it.
    let mut event = Vec::new();
    bytes_field(&mut event, 2, b"acme");
    bytes_field(
        &mut event,
        3,
        b"outrelay://acme/agent/00000000-0000-4000-8000-000000000001",
    );
    bytes_field(&mut event, 4, b"payments");
    bytes_field(&mut event, 5, b"POST /charge");
    small_varint_field(&mut event, 6, 2);
    bytes_field(&mut event, 7, b"denied: no matching rule");
    bytes_field(&mut event, 8, b"42");
    let mut request = Vec::new();
    bytes_field(&mut request, 1, &event);
    let decoded = pb::RecordRequest::decode(request.as_slice()).expect("Go's bytes decode");
    assert_eq!(
        decoded.encode_to_vec(),
        request,
        "our encoding is byte-identical"
    );

    let dir = tempfile::tempdir().expect("tmp");
    let c = Controller::start(dir.path(), "");
    let relay = c.cert("outrelay://eu/relay/r1", LeafProfile::ClientServer);
    let mut audit = AuditClient::new(c.channel(Some(&relay)).await);
    audit.record(decoded).await.expect("Record");
    let ops = c.cert("outrelay://system/admin/ops", LeafProfile::Client);
    let mut audit = AuditClient::new(c.channel(Some(&ops)).await);
    let mut rows = audit
        .query(pb::QueryRequest {
            tenant: "acme".into(),
            target: "payments".into(),
            ..Default::default()
        })
        .await
        .expect("Query")
        .into_inner();
    let row = rows.message().await.expect("row").expect("one row");
    assert_eq!(row.decision, pb::Decision::Deny as i32);
    assert_eq!(row.stream_id, "42");
    let verified = audit
        .verify(pb::VerifyRequest::default())
        .await
        .expect("Verify")
        .into_inner();
    assert_eq!(verified.first_bad_seq, 0, "{verified:?}");

    // AddPolicyRequest{1: PolicyRule{2 tenant, 3 caller, 4 target, 6 decision = ALLOW,
    // 9 p2p_mode = P2P_FORBIDDEN (varint 1), 10 relay_mode = RELAY_MODE_FORWARD (varint 1)}}.
    let mut rule = Vec::new();
    bytes_field(&mut rule, 2, b"acme");
    bytes_field(&mut rule, 3, b"outrelay://acme/agent/*");
    bytes_field(&mut rule, 4, b"payments");
    small_varint_field(&mut rule, 6, 1);
    small_varint_field(&mut rule, 9, 1);
    small_varint_field(&mut rule, 10, 1);
    let mut add = Vec::new();
    bytes_field(&mut add, 1, &rule);
    let add = pb::AddPolicyRequest::decode(add.as_slice()).expect("Go's bytes decode");
    let mut policy = PolicyClient::new(c.channel(Some(&ops)).await);
    let id = policy
        .add_policy(add)
        .await
        .expect("AddPolicy")
        .into_inner()
        .id;
    // After a restart (the modes come back from SQLite as the enums).
    let c = c.restart();
    let ops = c.cert("outrelay://system/admin/ops", LeafProfile::Client);
    let mut policy = PolicyClient::new(c.channel(Some(&ops)).await);
    let rules = policy
        .list_policies(pb::ListPoliciesRequest {
            tenant: "acme".into(),
        })
        .await
        .expect("List")
        .into_inner()
        .rules;
    let r = rules.iter().find(|r| r.id == id).expect("the rule");
    assert_eq!(
        (r.p2p_mode, r.relay_mode),
        (
            pb::P2pMode::P2pForbidden as i32,
            pb::RelayMode::Forward as i32
        )
    );
}
