//! The UDP datagram header: decode never panics, and what decodes re-encodes to the same
//! prefix (minimal encodings only, so there is exactly one spelling).
#![no_main]

use libfuzzer_sys::fuzz_target;
use outrelay_proto::udp::{DatagramHeader, MAX_DATAGRAM_HEADER_BYTES};

fuzz_target!(|data: &[u8]| {
    if let Ok((header, payload)) = DatagramHeader::decode(data) {
        let mut buf = [0u8; MAX_DATAGRAM_HEADER_BYTES];
        let n = header.encode(&mut buf);
        assert_eq!(&buf[..n], &data[..n]);
        assert_eq!(n + payload.len(), data.len());
    }
});
