//! The client address block after markers 0x03/0x04 and in client_addr datagrams: decode never
//! panics, what decodes re-encodes to the same bytes, and a stream reader fed the same bytes in
//! two pieces reaches the same answer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outrelay_proto::client_addr::ClientAddr;

fuzz_target!(|data: &[u8]| {
    match ClientAddr::decode(data) {
        Ok((addr, rest)) => {
            let n = data.len() - rest.len();
            let (again, m) = addr.to_bytes();
            assert_eq!(&again[..m], &data[..n]);
            for cut in 0..n {
                assert_eq!(ClientAddr::decode_partial(&data[..cut]), Ok(None));
            }
        }
        Err(e) => {
            let _ = e.reason();
            assert!(!matches!(ClientAddr::decode_partial(data), Ok(Some(_))));
        }
    }
});
