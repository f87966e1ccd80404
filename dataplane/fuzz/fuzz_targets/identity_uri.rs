//! Identity URIs: parse never panics, and whatever parses prints back to the same string
//! (one canonical spelling per identity).
#![no_main]

use libfuzzer_sys::fuzz_target;
use outrelay_proto::identity::Identity;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = Identity::parse(s) {
        assert_eq!(id.to_string(), s);
    }
});
