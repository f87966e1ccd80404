//! The header of a UDP datagram carried in a QUIC DATAGRAM frame (`public-ingress.md`):
//! `uvarint udp_slot`, `uvarint flow_id`, then the payload.
//!
//! `uvarint` is minimal unsigned LEB128 as Go's `binary.PutUvarint` writes it, at most 10
//! bytes. We refuse non-minimal encodings on decode (Go's reader accepts them): one datagram
//! then has exactly one spelling, so a header cannot be smuggled past a check in two shapes.

/// Longest uvarint, in bytes.
pub const MAX_UVARINT_BYTES: usize = 10;
/// Longest datagram header (slot and flow id), in bytes.
pub const MAX_DATAGRAM_HEADER_BYTES: usize = 2 * MAX_UVARINT_BYTES;

/// Why a datagram header was refused. Each variant is a counted drop reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DatagramError {
    /// The datagram ends inside a uvarint.
    #[error("datagram header truncated")]
    Truncated,
    /// A uvarint is longer than 10 bytes or overflows 64 bits.
    #[error("datagram header uvarint overflows 64 bits")]
    Overflow,
    /// A uvarint has a redundant trailing zero group.
    #[error("datagram header uvarint is not minimal")]
    NonMinimal,
    /// The slot does not fit the 32-bit `udp_slot` of LEASE_GRANT.
    #[error("datagram udp_slot {0} does not fit 32 bits")]
    SlotOutOfRange(u64),
}

/// The routing header of one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DatagramHeader {
    /// The lease's slot on this QUIC connection (from LEASE_GRANT).
    pub udp_slot: u32,
    /// The flow (one public client address) within the lease, counting up from 1.
    pub flow_id: u64,
}

impl DatagramHeader {
    /// Writes the header into `out` and returns its length. `out` must hold at least
    /// [`MAX_DATAGRAM_HEADER_BYTES`] bytes or the header's exact length.
    ///
    /// # Panics
    /// If `out` is shorter than the encoded header: a caller bug, never network input.
    pub fn encode(&self, out: &mut [u8]) -> usize {
        let n = encode_uvarint(u64::from(self.udp_slot), out);
        n + encode_uvarint(self.flow_id, &mut out[n..])
    }

    /// The encoded length of this header.
    pub fn encoded_len(&self) -> usize {
        uvarint_len(u64::from(self.udp_slot)) + uvarint_len(self.flow_id)
    }

    /// Splits a datagram into its header and payload.
    ///
    /// # Errors
    /// A [`DatagramError`] naming the first rule broken.
    pub fn decode(datagram: &[u8]) -> Result<(DatagramHeader, &[u8]), DatagramError> {
        let (slot, n) = decode_uvarint(datagram)?;
        let (flow_id, m) = decode_uvarint(&datagram[n..])?;
        let udp_slot = u32::try_from(slot).map_err(|_| DatagramError::SlotOutOfRange(slot))?;
        Ok((DatagramHeader { udp_slot, flow_id }, &datagram[n + m..]))
    }
}

/// Writes `v` as minimal LEB128 into `out`, returning the bytes written.
///
/// # Panics
/// If `out` is shorter than [`uvarint_len`]`(v)`.
#[allow(
    clippy::cast_possible_truncation,
    reason = "each cast keeps the low 7 bits, which is the encoding"
)]
pub fn encode_uvarint(mut v: u64, out: &mut [u8]) -> usize {
    let mut i = 0;
    while v >= 0x80 {
        out[i] = (v & 0x7f) as u8 | 0x80;
        v >>= 7;
        i += 1;
    }
    out[i] = v as u8;
    i + 1
}

/// The number of bytes [`encode_uvarint`] writes for `v`.
pub fn uvarint_len(v: u64) -> usize {
    let bits = 64 - (v | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// Reads a minimal LEB128 value from the start of `buf`, returning it and the bytes used.
///
/// # Errors
/// [`DatagramError::Truncated`], [`DatagramError::Overflow`] or [`DatagramError::NonMinimal`].
pub fn decode_uvarint(buf: &[u8]) -> Result<(u64, usize), DatagramError> {
    let mut value: u64 = 0;
    for (i, &byte) in buf.iter().take(MAX_UVARINT_BYTES).enumerate() {
        let group = u64::from(byte & 0x7f);
        // The tenth byte carries bit 63 only.
        if i == MAX_UVARINT_BYTES - 1 && byte > 1 {
            return Err(DatagramError::Overflow);
        }
        value |= group << (7 * i);
        if byte & 0x80 == 0 {
            if byte == 0 && i > 0 {
                return Err(DatagramError::NonMinimal);
            }
            return Ok((value, i + 1));
        }
    }
    if buf.len() >= MAX_UVARINT_BYTES {
        Err(DatagramError::Overflow)
    } else {
        Err(DatagramError::Truncated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_encodings_match_go_put_uvarint() {
        let cases: &[(u64, &[u8])] = &[
            (0, &[0x00]),
            (1, &[0x01]),
            (127, &[0x7f]),
            (128, &[0x80, 0x01]),
            (300, &[0xac, 0x02]),
            (16_384, &[0x80, 0x80, 0x01]),
            (
                u64::MAX,
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            ),
        ];
        for (v, want) in cases {
            let mut out = [0u8; MAX_UVARINT_BYTES];
            let n = encode_uvarint(*v, &mut out);
            assert_eq!(&out[..n], *want, "{v}");
            assert_eq!(uvarint_len(*v), n);
            assert_eq!(decode_uvarint(want), Ok((*v, n)));
        }
    }

    #[test]
    fn rejections() {
        assert_eq!(decode_uvarint(&[]), Err(DatagramError::Truncated));
        assert_eq!(decode_uvarint(&[0x80]), Err(DatagramError::Truncated));
        assert_eq!(
            decode_uvarint(&[0x80, 0x00]),
            Err(DatagramError::NonMinimal)
        );
        assert_eq!(
            decode_uvarint(&[0x81, 0x80, 0x00]),
            Err(DatagramError::NonMinimal)
        );
        assert_eq!(
            decode_uvarint(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02]),
            Err(DatagramError::Overflow)
        );
        assert_eq!(decode_uvarint(&[0x80; 11]), Err(DatagramError::Overflow));
        let mut slot = [0u8; 16];
        let n = encode_uvarint(u64::from(u32::MAX) + 1, &mut slot);
        slot[n] = 1;
        assert_eq!(
            DatagramHeader::decode(&slot[..=n]),
            Err(DatagramError::SlotOutOfRange(u64::from(u32::MAX) + 1))
        );
        assert_eq!(
            DatagramHeader::decode(&[0x01]),
            Err(DatagramError::Truncated)
        );
    }

    #[test]
    fn header_round_trip_keeps_payload_whole() {
        let h = DatagramHeader {
            udp_slot: 3,
            flow_id: 1_000_000,
        };
        let mut buf = vec![0u8; MAX_DATAGRAM_HEADER_BYTES];
        let n = h.encode(&mut buf);
        assert_eq!(n, h.encoded_len());
        buf.truncate(n);
        buf.extend_from_slice(b"payload\0");
        assert_eq!(DatagramHeader::decode(&buf), Ok((h, &b"payload\0"[..])));
    }
}
