//! The TCP/443 fallback tunnel's framing (issue 22, `docs/protocol.md` "TCP/443 fallback"):
//! inside one mutual-TLS TCP connection (ALPN [`FALLBACK_ALPN`]) each QUIC packet travels as
//! `[u16 big-endian length][packet]`; a length of 0 is never sent (it ends the tunnel).
//! The agent and the relay both frame with [`frame_header`].

/// The ALPN a fallback ClientHello offers (the same as QUIC's).
pub const FALLBACK_ALPN: &[u8] = crate::frame::ORP_ALPN.as_bytes();
/// Bytes of a tunnel frame's length prefix (big-endian u16).
pub const FRAME_HEADER_BYTES: usize = 2;

/// The frame header for a packet of `len` bytes; `None` for 0 or above 65535 (never framed).
pub fn frame_header(len: usize) -> Option<[u8; FRAME_HEADER_BYTES]> {
    match u16::try_from(len) {
        Ok(0) | Err(_) => None,
        Ok(n) => Some(n.to_be_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_header_is_big_endian_and_bounded() {
        assert_eq!(frame_header(1), Some([0, 1]));
        assert_eq!(frame_header(1200), Some([0x04, 0xb0]));
        assert_eq!(frame_header(65535), Some([0xff, 0xff]));
        assert_eq!(frame_header(0), None);
        assert_eq!(frame_header(65536), None);
    }
}
