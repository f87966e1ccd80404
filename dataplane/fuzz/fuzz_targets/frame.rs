//! ORP frames: the incremental decoder over a stream of frames, then the typed decode; a
//! decoded frame must re-encode to the same payload length class and decode again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outrelay_proto::frame::{self, Decoded, Frame};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Decoded::Frame { frame: raw, used }) = frame::decode(rest) {
        assert!(used >= frame::FRAME_HEADER_BYTES && used <= rest.len());
        if let Ok(typed) = Frame::decode(&raw) {
            let bytes = typed.to_vec().expect("a decoded frame re-encodes");
            let again = Frame::decode_exact(&bytes).expect("re-encoded frame decodes");
            assert_eq!(again, Some(typed));
        }
        rest = &rest[used..];
    }
});
