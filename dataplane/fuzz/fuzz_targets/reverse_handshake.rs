//! The reverse-session preamble and MAC check: never panics; a decoded preamble re-encodes to
//! the same bytes; only the right MAC verifies.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outrelay_proto::reverse::{self, LeaseId};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(lease_id)) = reverse::decode_preamble(data) {
        assert_eq!(
            &reverse::encode_preamble(&lease_id)[..],
            &data[..reverse::PREAMBLE_BYTES]
        );
    }
    let key = [0x42u8; 32];
    let nonce = [0x24u8; 16];
    let lease = LeaseId([7; 16]);
    let good = reverse::compute_mac(&key, &nonce, &lease);
    let verdict = reverse::verify_mac(&key, &nonce, &lease, data);
    assert_eq!(verdict.is_ok(), data == good);
});
