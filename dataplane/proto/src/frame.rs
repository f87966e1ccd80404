//! ORP framing: an 8-byte big-endian header, then a protobuf payload.
//!
//! ```text
//! bytes 0..2   word0 = version (3 bits, << 13) | reserved (2 bits, zero) | type (11 bits)
//! bytes 2..4   flags (u16; sent as 0, ignored on receive)
//! bytes 4..8   payload length (u32), at most MAX_FRAME_PAYLOAD_BYTES
//! bytes 8..    payload
//! ```
//!
//! [`decode`] is incremental and allocation-free: given the bytes received so far it returns a
//! [`RawFrame`] borrowing its payload plus the bytes used, or how many bytes it needs at least,
//! or a [`FrameError`]. [`Frame`] turns a raw frame into its typed message. Unlike the Go
//! project we refuse unsupported versions and non-zero reserved bits.

use prost::Message as _;

use crate::orp;

/// Size of the frame header in bytes.
pub const FRAME_HEADER_BYTES: usize = 8;
/// Largest frame payload, in bytes (16 MiB).
pub const MAX_FRAME_PAYLOAD_BYTES: u32 = 1 << 24;
/// Largest payload a receiver accepts for a stream's first frame (HELLO, OPEN_STREAM,
/// INCOMING_STREAM and the STREAM_ACCEPT / STREAM_REJECT answer), in bytes: every field of
/// these has a bound of at most 512 bytes, so 4 KiB is ample and a peer cannot make the
/// receiver buffer more before any check.
pub const MAX_FIRST_FRAME_PAYLOAD_BYTES: u32 = 4 * 1024;
/// Largest payload a receiver accepts for any other control-stream frame, in bytes.
pub const MAX_CONTROL_FRAME_PAYLOAD_BYTES: u32 = 64 * 1024;
/// The only ORP framing version this crate speaks.
pub const ORP_VERSION: u8 = 1;
/// The protocol string carried in HELLO and used as the QUIC ALPN.
pub const ORP_ALPN: &str = "orp/1";

const VERSION_SHIFT: u16 = 13;
const RESERVED_MASK: u16 = 0b11 << 11;
const TYPE_MASK: u16 = 0x07ff;

/// Why bytes could not be decoded as a frame. Each variant is a close reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The header names a version other than [`ORP_VERSION`].
    #[error("unsupported ORP version {0}")]
    UnsupportedVersion(u8),
    /// The two reserved header bits are not zero.
    #[error("reserved header bits set")]
    ReservedBits,
    /// The payload length exceeds [`MAX_FRAME_PAYLOAD_BYTES`].
    #[error("frame payload of {0} bytes exceeds the 16 MiB cap")]
    PayloadTooLarge(u64),
    /// The payload length exceeds the receiver's limit for this position ([`decode_limited`]).
    #[error("frame payload of {len} bytes exceeds the {limit}-byte limit here")]
    PayloadOverLimit {
        /// The declared payload length.
        len: u64,
        /// The receiver's limit.
        limit: u32,
    },
    /// The frame type code is not one this crate knows.
    #[error("unknown frame type {0:#05x}")]
    UnknownType(u16),
    /// A known frame type arrived where another was expected.
    #[error("unexpected frame type {got:#05x}")]
    UnexpectedType {
        /// The type code that arrived.
        got: u16,
    },
    /// The payload is not a valid protobuf encoding of the type's message.
    #[error("malformed {frame} payload: {reason}")]
    MalformedPayload {
        /// The frame type's name.
        frame: &'static str,
        /// The protobuf decoder's reason.
        reason: String,
    },
    /// Bytes follow where none are allowed (after a single-frame message, or in an empty frame).
    #[error("{0} trailing bytes")]
    TrailingBytes(usize),
}

/// The frame types of ORP (`orp.md`). The discriminant is the wire code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum FrameType {
    /// Agent hello on the control stream.
    Hello = 0x001,
    /// Relay answer to HELLO.
    HelloAck = 0x002,
    /// Register a service.
    Register = 0x003,
    /// Service registered.
    RegisterAck = 0x004,
    /// First frame of a consumer's stream.
    OpenStream = 0x010,
    /// First frame of a relay-initiated stream to a provider.
    IncomingStream = 0x011,
    /// Stream accepted; raw bytes follow.
    StreamAccept = 0x012,
    /// Stream (or registration) refused.
    StreamReject = 0x013,
    /// Keep-alive probe.
    Ping = 0x020,
    /// Keep-alive answer.
    Pong = 0x021,
    /// The sender is going away (drain/upgrade).
    GoAway = 0x0ff,
    /// Resume bookkeeping (not yet scheduled).
    StreamCheckpoint = 0x110,
    /// Resume request (not yet scheduled).
    StreamResume = 0x111,
    /// Ask the relay for the agent's address as the relay sees it.
    ObservedAddrQuery = 0x120,
    /// The agent's observed address.
    ObservedAddrResp = 0x121,
    /// P2P candidates of one stream, forwarded to the paired agent.
    CandidateOffer = 0x122,
    /// The paired agent's candidates, forwarded back.
    CandidateAnswer = 0x123,
    /// An agent moved a stream to a direct path (recorded).
    MigrateToP2P = 0x124,
    /// An agent moves a stream back to the relay.
    MigrateToRelay = 0x125,
    /// Relay-to-relay forwarded stream (not yet scheduled).
    ForwardStream = 0x140,
    /// Informational: a stream was joined.
    StreamReady = 0x152,
    /// Ask for a public lease.
    LeaseRegister = 0x200,
    /// Lease granted, renewed or released.
    LeaseGrant = 0x201,
    /// Renew a lease.
    LeaseRenew = 0x202,
    /// Release a lease.
    LeaseRelease = 0x203,
    /// A lease request failed.
    LeaseError = 0x204,
    /// Keyless signing request (not yet scheduled).
    KeylessSign = 0x210,
    /// Keyless signature (not yet scheduled).
    KeylessSignature = 0x211,
}

impl FrameType {
    /// Every frame type, in code order.
    pub const ALL: [FrameType; 28] = [
        FrameType::Hello,
        FrameType::HelloAck,
        FrameType::Register,
        FrameType::RegisterAck,
        FrameType::OpenStream,
        FrameType::IncomingStream,
        FrameType::StreamAccept,
        FrameType::StreamReject,
        FrameType::Ping,
        FrameType::Pong,
        FrameType::GoAway,
        FrameType::StreamCheckpoint,
        FrameType::StreamResume,
        FrameType::ObservedAddrQuery,
        FrameType::ObservedAddrResp,
        FrameType::CandidateOffer,
        FrameType::CandidateAnswer,
        FrameType::MigrateToP2P,
        FrameType::MigrateToRelay,
        FrameType::ForwardStream,
        FrameType::StreamReady,
        FrameType::LeaseRegister,
        FrameType::LeaseGrant,
        FrameType::LeaseRenew,
        FrameType::LeaseRelease,
        FrameType::LeaseError,
        FrameType::KeylessSign,
        FrameType::KeylessSignature,
    ];

    /// The wire code.
    pub fn code(self) -> u16 {
        self as u16
    }

    /// The frame type for a wire code, if known.
    pub fn from_code(code: u16) -> Option<FrameType> {
        FrameType::ALL.iter().copied().find(|t| t.code() == code)
    }

    /// The spec's name, for logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            FrameType::Hello => "HELLO",
            FrameType::HelloAck => "HELLO_ACK",
            FrameType::Register => "REGISTER",
            FrameType::RegisterAck => "REGISTER_ACK",
            FrameType::OpenStream => "OPEN_STREAM",
            FrameType::IncomingStream => "INCOMING_STREAM",
            FrameType::StreamAccept => "STREAM_ACCEPT",
            FrameType::StreamReject => "STREAM_REJECT",
            FrameType::Ping => "PING",
            FrameType::Pong => "PONG",
            FrameType::GoAway => "GOAWAY",
            FrameType::StreamCheckpoint => "STREAM_CHECKPOINT",
            FrameType::StreamResume => "STREAM_RESUME",
            FrameType::ObservedAddrQuery => "OBSERVED_ADDR_QUERY",
            FrameType::ObservedAddrResp => "OBSERVED_ADDR_RESP",
            FrameType::CandidateOffer => "CANDIDATE_OFFER",
            FrameType::CandidateAnswer => "CANDIDATE_ANSWER",
            FrameType::MigrateToP2P => "MIGRATE_TO_P2P",
            FrameType::MigrateToRelay => "MIGRATE_TO_RELAY",
            FrameType::ForwardStream => "FORWARD_STREAM",
            FrameType::StreamReady => "STREAM_READY",
            FrameType::LeaseRegister => "LEASE_REGISTER",
            FrameType::LeaseGrant => "LEASE_GRANT",
            FrameType::LeaseRenew => "LEASE_RENEW",
            FrameType::LeaseRelease => "LEASE_RELEASE",
            FrameType::LeaseError => "LEASE_ERROR",
            FrameType::KeylessSign => "KEYLESS_SIGN",
            FrameType::KeylessSignature => "KEYLESS_SIGNATURE",
        }
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Framing version (always [`ORP_VERSION`] once decoded).
    pub version: u8,
    /// The 11-bit type code (possibly unknown to this crate).
    pub type_code: u16,
    /// Flags: sent as 0, ignored on receive.
    pub flags: u16,
    /// Payload length in bytes.
    pub payload_len: u32,
}

/// A frame whose payload borrows from the receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawFrame<'a> {
    /// The header.
    pub header: FrameHeader,
    /// The payload bytes (`header.payload_len` of them).
    pub payload: &'a [u8],
}

/// The outcome of [`decode`] on the bytes received so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole frame, and how many bytes of the input it used.
    Frame {
        /// The frame.
        frame: RawFrame<'a>,
        /// Bytes consumed from the start of the input.
        used: usize,
    },
    /// The input is a valid prefix; at least this many bytes in total are needed.
    NeedMore {
        /// Total input length needed before the next call can make progress.
        at_least: usize,
    },
}

/// Decodes one frame from the start of `buf` without allocating.
///
/// # Errors
/// [`FrameError::UnsupportedVersion`], [`FrameError::ReservedBits`] or
/// [`FrameError::PayloadTooLarge`] as soon as the header shows them (before the payload
/// arrives), so a peer cannot make us buffer an oversized frame.
pub fn decode(buf: &[u8]) -> Result<Decoded<'_>, FrameError> {
    let Some(header) = buf.first_chunk::<FRAME_HEADER_BYTES>() else {
        return Ok(Decoded::NeedMore {
            at_least: FRAME_HEADER_BYTES,
        });
    };
    let header = decode_header(header)?;
    // payload_len <= 16 MiB was checked, so this cannot truncate on any supported target.
    let total = FRAME_HEADER_BYTES + usize::try_from(header.payload_len).unwrap_or(usize::MAX);
    match buf.get(FRAME_HEADER_BYTES..total) {
        Some(payload) => Ok(Decoded::Frame {
            frame: RawFrame { header, payload },
            used: total,
        }),
        None => Ok(Decoded::NeedMore { at_least: total }),
    }
}

/// [`decode`] with a receiver's own payload limit (at most [`MAX_FRAME_PAYLOAD_BYTES`]): a
/// header declaring more than `max_payload_bytes` is refused from the header alone, so the
/// caller never needs to buffer more than `FRAME_HEADER_BYTES + max_payload_bytes`.
///
/// # Errors
/// [`decode`]'s, and [`FrameError::PayloadOverLimit`].
pub fn decode_limited(buf: &[u8], max_payload_bytes: u32) -> Result<Decoded<'_>, FrameError> {
    if let Some(header) = buf.first_chunk::<FRAME_HEADER_BYTES>() {
        let header = decode_header(header)?;
        if header.payload_len > max_payload_bytes {
            return Err(FrameError::PayloadOverLimit {
                len: u64::from(header.payload_len),
                limit: max_payload_bytes,
            });
        }
    }
    decode(buf)
}

/// Decodes and checks an 8-byte header.
///
/// # Errors
/// As [`decode`].
pub fn decode_header(bytes: &[u8; FRAME_HEADER_BYTES]) -> Result<FrameHeader, FrameError> {
    let word0 = u16::from_be_bytes([bytes[0], bytes[1]]);
    let version = u8::try_from(word0 >> VERSION_SHIFT).unwrap_or(u8::MAX);
    if version != ORP_VERSION {
        return Err(FrameError::UnsupportedVersion(version));
    }
    if word0 & RESERVED_MASK != 0 {
        return Err(FrameError::ReservedBits);
    }
    let payload_len = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    if payload_len > MAX_FRAME_PAYLOAD_BYTES {
        return Err(FrameError::PayloadTooLarge(u64::from(payload_len)));
    }
    Ok(FrameHeader {
        version,
        type_code: word0 & TYPE_MASK,
        flags: u16::from_be_bytes([bytes[2], bytes[3]]),
        payload_len,
    })
}

/// Appends one frame (header with the given flags, then `payload`) to `out`.
///
/// # Errors
/// [`FrameError::PayloadTooLarge`] when `payload` exceeds [`MAX_FRAME_PAYLOAD_BYTES`].
pub fn encode_raw(
    frame_type: FrameType,
    flags: u16,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|len| *len <= MAX_FRAME_PAYLOAD_BYTES)
        .ok_or(FrameError::PayloadTooLarge(payload.len() as u64))?;
    let word0 = (u16::from(ORP_VERSION) << VERSION_SHIFT) | frame_type.code();
    out.reserve(FRAME_HEADER_BYTES + payload.len());
    out.extend_from_slice(&word0.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    Ok(())
}

/// A frame with its typed payload.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)] // each variant is the message of the same name in orp.proto
pub enum Frame {
    Hello(orp::Hello),
    HelloAck(orp::HelloAck),
    Register(orp::Register),
    RegisterAck(orp::RegisterAck),
    OpenStream(orp::OpenStream),
    IncomingStream(orp::IncomingStream),
    StreamAccept(orp::StreamAccept),
    StreamReject(orp::StreamReject),
    Ping,
    Pong,
    GoAway(orp::GoAway),
    StreamCheckpoint(orp::StreamCheckpoint),
    StreamResume(orp::StreamResume),
    ObservedAddrQuery(orp::ObservedAddrQuery),
    ObservedAddrResp(orp::ObservedAddrResp),
    CandidateOffer(orp::CandidateOffer),
    CandidateAnswer(orp::CandidateAnswer),
    MigrateToP2P(orp::MigrateToP2p),
    MigrateToRelay(orp::MigrateToRelay),
    ForwardStream(orp::IncomingStream),
    StreamReady(orp::StreamReady),
    LeaseRegister(orp::LeaseRegister),
    LeaseGrant(orp::LeaseGrant),
    LeaseRenew(orp::LeaseRenew),
    LeaseRelease(orp::LeaseRelease),
    LeaseError(orp::LeaseError),
    KeylessSign(orp::KeylessSign),
    KeylessSignature(orp::KeylessSignature),
}

macro_rules! frame_codec {
    ($($variant:ident => $msg:ty),* $(,)?) => {
        impl Frame {
            /// This frame's type.
            pub fn frame_type(&self) -> FrameType {
                match self {
                    Frame::Ping => FrameType::Ping,
                    Frame::Pong => FrameType::Pong,
                    $(Frame::$variant(_) => FrameType::$variant,)*
                }
            }

            /// Decodes a raw frame's payload into its typed message.
            ///
            /// # Errors
            /// [`FrameError::UnknownType`] for codes this crate does not know,
            /// [`FrameError::MalformedPayload`] for invalid protobuf, and
            /// [`FrameError::TrailingBytes`] for a PING or PONG with a payload.
            pub fn decode(raw: &RawFrame<'_>) -> Result<Frame, FrameError> {
                let frame_type = FrameType::from_code(raw.header.type_code)
                    .ok_or(FrameError::UnknownType(raw.header.type_code))?;
                let malformed = |e: prost::DecodeError| FrameError::MalformedPayload {
                    frame: frame_type.name(),
                    reason: e.to_string(),
                };
                match frame_type {
                    FrameType::Ping | FrameType::Pong => {
                        if !raw.payload.is_empty() {
                            return Err(FrameError::TrailingBytes(raw.payload.len()));
                        }
                        Ok(if frame_type == FrameType::Ping { Frame::Ping } else { Frame::Pong })
                    }
                    $(FrameType::$variant => {
                        <$msg>::decode(raw.payload).map(Frame::$variant).map_err(malformed)
                    })*
                }
            }

            /// Appends this frame (flags 0) to `out`.
            ///
            /// # Errors
            /// [`FrameError::PayloadTooLarge`] when the message encodes to more than
            /// [`MAX_FRAME_PAYLOAD_BYTES`].
            pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), FrameError> {
                let payload = match self {
                    Frame::Ping | Frame::Pong => Vec::new(),
                    $(Frame::$variant(m) => m.encode_to_vec(),)*
                };
                encode_raw(self.frame_type(), 0, &payload, out)
            }
        }
    };
}

frame_codec! {
    Hello => orp::Hello,
    HelloAck => orp::HelloAck,
    Register => orp::Register,
    RegisterAck => orp::RegisterAck,
    OpenStream => orp::OpenStream,
    IncomingStream => orp::IncomingStream,
    StreamAccept => orp::StreamAccept,
    StreamReject => orp::StreamReject,
    GoAway => orp::GoAway,
    StreamCheckpoint => orp::StreamCheckpoint,
    StreamResume => orp::StreamResume,
    ObservedAddrQuery => orp::ObservedAddrQuery,
    ObservedAddrResp => orp::ObservedAddrResp,
    CandidateOffer => orp::CandidateOffer,
    CandidateAnswer => orp::CandidateAnswer,
    MigrateToP2P => orp::MigrateToP2p,
    MigrateToRelay => orp::MigrateToRelay,
    ForwardStream => orp::IncomingStream,
    StreamReady => orp::StreamReady,
    LeaseRegister => orp::LeaseRegister,
    LeaseGrant => orp::LeaseGrant,
    LeaseRenew => orp::LeaseRenew,
    LeaseRelease => orp::LeaseRelease,
    LeaseError => orp::LeaseError,
    KeylessSign => orp::KeylessSign,
    KeylessSignature => orp::KeylessSignature,
}

impl Frame {
    /// Encodes this frame into a fresh buffer.
    ///
    /// # Errors
    /// As [`Frame::encode`].
    pub fn to_vec(&self) -> Result<Vec<u8>, FrameError> {
        let mut out = Vec::new();
        self.encode(&mut out)?;
        Ok(out)
    }

    /// Decodes exactly one frame that must fill `buf` entirely (for example the only frame a
    /// peer may send before waiting for an answer).
    ///
    /// # Errors
    /// The frame's decode error, [`FrameError::TrailingBytes`] when bytes follow the frame; a
    /// truncated frame is `Ok(None)`.
    pub fn decode_exact(buf: &[u8]) -> Result<Option<Frame>, FrameError> {
        match decode(buf)? {
            Decoded::NeedMore { .. } => Ok(None),
            Decoded::Frame { used, .. } if used != buf.len() => {
                Err(FrameError::TrailingBytes(buf.len() - used))
            }
            Decoded::Frame { frame, .. } => Frame::decode(&frame).map(Some),
        }
    }

    /// Decodes a raw frame that must be one of `expected` (the first frame of a stream, say).
    ///
    /// # Errors
    /// [`FrameError::UnexpectedType`] for any other known type, plus [`Frame::decode`]'s.
    pub fn decode_expecting(
        raw: &RawFrame<'_>,
        expected: &[FrameType],
    ) -> Result<Frame, FrameError> {
        let frame = Frame::decode(raw)?;
        if expected.contains(&frame.frame_type()) {
            Ok(frame)
        } else {
            Err(FrameError::UnexpectedType {
                got: raw.header.type_code,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The golden vector of orp.md.
    const GOLDEN: [u8; 10] = [0x20, 0x01, 0xAB, 0xCD, 0x00, 0x00, 0x00, 0x02, 0x68, 0x69];

    #[test]
    fn golden_vector_encodes_and_decodes() {
        let mut out = Vec::new();
        encode_raw(FrameType::Hello, 0xABCD, b"hi", &mut out).expect("encode");
        assert_eq!(out, GOLDEN);
        let Ok(Decoded::Frame { frame, used }) = decode(&GOLDEN) else {
            panic!("golden vector did not decode");
        };
        assert_eq!(used, GOLDEN.len());
        assert_eq!(
            frame.header,
            FrameHeader {
                version: 1,
                type_code: 0x001,
                flags: 0xABCD,
                payload_len: 2
            }
        );
        assert_eq!(frame.payload, b"hi");
    }

    #[test]
    fn every_prefix_needs_more() {
        for n in 0..GOLDEN.len() {
            let want = if n < FRAME_HEADER_BYTES {
                FRAME_HEADER_BYTES
            } else {
                GOLDEN.len()
            };
            assert_eq!(
                decode(&GOLDEN[..n]),
                Ok(Decoded::NeedMore { at_least: want }),
                "prefix {n}"
            );
        }
    }

    #[test]
    fn header_rules() {
        // Version 0 and 2.
        assert_eq!(
            decode(&[0x00, 0x01, 0, 0, 0, 0, 0, 0]),
            Err(FrameError::UnsupportedVersion(0))
        );
        assert_eq!(
            decode(&[0x40, 0x01, 0, 0, 0, 0, 0, 0]),
            Err(FrameError::UnsupportedVersion(2))
        );
        // Each reserved bit.
        assert_eq!(
            decode(&[0x28, 0x01, 0, 0, 0, 0, 0, 0]),
            Err(FrameError::ReservedBits)
        );
        assert_eq!(
            decode(&[0x30, 0x01, 0, 0, 0, 0, 0, 0]),
            Err(FrameError::ReservedBits)
        );
        // Exactly the cap is fine, one more is refused before any payload arrives.
        assert_eq!(
            decode(&[0x20, 0x01, 0, 0, 0x01, 0x00, 0x00, 0x00]),
            Ok(Decoded::NeedMore {
                at_least: FRAME_HEADER_BYTES + (1 << 24)
            })
        );
        assert_eq!(
            decode(&[0x20, 0x01, 0, 0, 0x01, 0x00, 0x00, 0x01]),
            Err(FrameError::PayloadTooLarge((1 << 24) + 1))
        );
        assert_eq!(
            decode(&[0x20, 0x01, 0, 0, 0xff, 0xff, 0xff, 0xff]),
            Err(FrameError::PayloadTooLarge(u64::from(u32::MAX)))
        );
    }

    #[test]
    fn a_receiver_limit_refuses_from_the_header() {
        // HELLO declaring 16 MiB: refused by an 8-byte prefix under a 4 KiB limit.
        let huge = [0x20, 0x01, 0, 0, 0x01, 0x00, 0x00, 0x00];
        assert_eq!(
            decode_limited(&huge, MAX_FIRST_FRAME_PAYLOAD_BYTES),
            Err(FrameError::PayloadOverLimit {
                len: 1 << 24,
                limit: MAX_FIRST_FRAME_PAYLOAD_BYTES
            })
        );
        // Exactly the limit is a valid prefix; a shorter prefix needs the header first.
        let at = [0x20, 0x01, 0, 0, 0, 0, 0x10, 0x00];
        assert_eq!(
            decode_limited(&at, MAX_FIRST_FRAME_PAYLOAD_BYTES),
            Ok(Decoded::NeedMore {
                at_least: FRAME_HEADER_BYTES + 4096
            })
        );
        assert_eq!(
            decode_limited(&huge[..7], 0),
            Ok(Decoded::NeedMore {
                at_least: FRAME_HEADER_BYTES
            })
        );
        assert_eq!(decode_limited(&GOLDEN, 2), decode(&GOLDEN));
        assert!(decode_limited(&GOLDEN, 1).is_err());
        // Header errors still come first.
        assert_eq!(
            decode_limited(&[0x00, 0x01, 0, 0, 0, 0, 0, 0], 0),
            Err(FrameError::UnsupportedVersion(0))
        );
    }

    #[test]
    fn typed_round_trip_and_errors() {
        let frame = Frame::LeaseRegister(orp::LeaseRegister {
            name: "demo".into(),
            tls: true,
            ttl_s: 30,
            request_id: 7,
            ..Default::default()
        });
        let bytes = frame.to_vec().expect("encode");
        assert_eq!(&bytes[..2], &[0x22, 0x00]);
        assert_eq!(Frame::decode_exact(&bytes), Ok(Some(frame.clone())));
        assert_eq!(Frame::decode_exact(&bytes[..bytes.len() - 1]), Ok(None));

        let mut trailing = bytes.clone();
        trailing.push(0);
        assert_eq!(
            Frame::decode_exact(&trailing),
            Err(FrameError::TrailingBytes(1))
        );

        let Ok(Decoded::Frame { frame: raw, .. }) = decode(&bytes) else {
            panic!("decode");
        };
        assert!(Frame::decode_expecting(&raw, &[FrameType::LeaseRegister]).is_ok());
        assert_eq!(
            Frame::decode_expecting(&raw, &[FrameType::OpenStream]),
            Err(FrameError::UnexpectedType { got: 0x200 })
        );

        let mut unknown = Vec::new();
        unknown.extend_from_slice(&[0x20, 0x05, 0, 0, 0, 0, 0, 0]);
        let Ok(Decoded::Frame { frame: raw, .. }) = decode(&unknown) else {
            panic!("decode");
        };
        assert_eq!(Frame::decode(&raw), Err(FrameError::UnknownType(0x005)));

        let ping_with_payload = [0x20, 0x20, 0, 0, 0, 0, 0, 1, 0];
        assert_eq!(
            Frame::decode_exact(&ping_with_payload),
            Err(FrameError::TrailingBytes(1))
        );

        // Field 1 (string) with a length running past the end of the payload.
        let bad = [0x20, 0x01, 0, 0, 0, 0, 0, 2, 0x0a, 0x05];
        assert!(matches!(
            Frame::decode_exact(&bad),
            Err(FrameError::MalformedPayload { frame: "HELLO", .. })
        ));
    }

    #[test]
    fn codes_are_unique_and_fit_eleven_bits() {
        for (i, t) in FrameType::ALL.iter().enumerate() {
            assert!(t.code() <= TYPE_MASK);
            assert_eq!(FrameType::from_code(t.code()), Some(*t));
            assert!(FrameType::ALL[..i].iter().all(|o| o.code() != t.code()));
        }
    }
}
