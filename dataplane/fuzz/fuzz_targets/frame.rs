//! ORP frames: the incremental decoder over a stream of frames, then the typed decode; a
//! decoded frame must re-encode to the same payload length class and decode again. The
//! receiver-limited decoder must agree with the plain one wherever the limit allows the frame,
//! and the field validators must not panic on any decoded string.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outrelay_proto::fields;
use outrelay_proto::frame::{self, Decoded, Frame};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Decoded::Frame { frame: raw, used }) = frame::decode(rest) {
        assert!(used >= frame::FRAME_HEADER_BYTES && used <= rest.len());
        let limited = frame::decode_limited(rest, frame::MAX_FIRST_FRAME_PAYLOAD_BYTES);
        if raw.header.payload_len <= frame::MAX_FIRST_FRAME_PAYLOAD_BYTES {
            assert_eq!(limited, Ok(Decoded::Frame { frame: raw, used }));
        } else {
            assert!(limited.is_err());
        }
        if let Ok(typed) = Frame::decode(&raw) {
            if let Frame::OpenStream(o) = &typed {
                let _ = fields::valid_method(&o.method);
                let _ = fields::valid_service_name(&o.target_service);
            }
            if let Frame::Register(r) = &typed {
                let _ = fields::valid_local_addr(&r.local_addr);
            }
            let bytes = typed.to_vec().expect("a decoded frame re-encodes");
            let again = Frame::decode_exact(&bytes).expect("re-encoded frame decodes");
            assert_eq!(again, Some(typed));
        }
        rest = &rest[used..];
    }
});
