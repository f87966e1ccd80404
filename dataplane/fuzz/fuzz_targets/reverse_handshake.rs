//! The reverse-session messages: never panic; a decoded preamble (version 1 or 2) re-encodes to
//! the same bytes; the relay's answer and the agent's MAC verify only when they are the right
//! bytes, and neither side's MAC verifies as the other's.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outrelay_proto::reverse::{self, LeaseId, Preamble};

fuzz_target!(|data: &[u8]| {
    match reverse::decode_preamble(data) {
        Ok(Some(Preamble::V2 {
            lease_id,
            agent_nonce,
        })) => assert_eq!(
            &reverse::encode_preamble(&lease_id, &agent_nonce)[..],
            &data[..reverse::PREAMBLE_BYTES]
        ),
        Ok(Some(Preamble::V1 { lease_id })) => assert_eq!(
            &reverse::encode_preamble_v1(&lease_id)[..],
            &data[..reverse::PREAMBLE_V1_BYTES]
        ),
        Ok(None) => assert!(data.len() < reverse::preamble_len(data)),
        Err(_) => {}
    }
    let key = [0x42u8; 32];
    let agent_nonce = [0x24u8; 16];
    let lease = LeaseId([7; 16]);
    // The relay's answer: only the one it computes for its own nonce verifies.
    let verdict = reverse::verify_challenge(&key, &lease, &agent_nonce, data);
    if let Ok(relay_nonce) = verdict {
        assert_eq!(
            &reverse::encode_challenge(&key, &lease, &agent_nonce, &relay_nonce)[..],
            data
        );
    }
    let relay_nonce = [0x99u8; 16];
    let good = reverse::agent_mac(&key, &lease, &agent_nonce, &relay_nonce);
    let verdict = reverse::verify_agent_mac(&key, &lease, &agent_nonce, &relay_nonce, data);
    assert_eq!(verdict.is_ok(), data == good);
    let good_v1 = reverse::compute_mac_v1(&key, &relay_nonce, &lease);
    let verdict = reverse::verify_mac_v1(&key, &relay_nonce, &lease, data);
    assert_eq!(verdict.is_ok(), data == good_v1);
});
