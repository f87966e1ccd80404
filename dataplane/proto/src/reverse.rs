//! The reverse-session handshake and the marker bytes (`public-ingress.md`).
//!
//! An agent proves that a plain TCP reverse session belongs to the mTLS QUIC connection that
//! holds a lease, with a key only the two ends of that connection know: the TLS exporter
//! `K = export(label = EXPORTER_LABEL, context = lease_id, 32 bytes)`. No bearer secret ever
//! crosses the wire, and a recorded exchange cannot be replayed because the relay picks a fresh
//! nonce for every session.
//!
//! ```text
//! agent -> relay   "ORRS" 0x01 lease_id[16]                       (PREAMBLE_BYTES)
//! relay -> agent   nonce[16]
//! agent -> relay   HMAC-SHA256(K, "orrs-v1" || nonce || lease_id)  (MAC_BYTES)
//! relay -> agent   0x00 keep-alive ... then exactly one marker 0x01 (TCP) or 0x02 (TLS)
//! ```

use hmac::{KeyInit, Mac};
use sha2::Sha256;

/// The first four bytes of every reverse session.
pub const PREAMBLE_MAGIC: [u8; 4] = *b"ORRS";
/// The handshake version this crate speaks.
pub const PREAMBLE_VERSION: u8 = 1;
/// Length of a lease id, in bytes.
pub const LEASE_ID_BYTES: usize = 16;
/// Length of the preamble: magic, version, lease id.
pub const PREAMBLE_BYTES: usize = PREAMBLE_MAGIC.len() + 1 + LEASE_ID_BYTES;
/// Length of the relay's nonce, in bytes.
pub const NONCE_BYTES: usize = 16;
/// Length of the agent's MAC, in bytes.
pub const MAC_BYTES: usize = 32;
/// TLS exporter label for the reverse-session key.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-outrelay-reverse-v1";
/// Length of the exporter key, in bytes.
pub const EXPORTER_KEY_BYTES: usize = 32;
/// Domain-separation prefix of the MAC input.
pub const MAC_CONTEXT: &[u8] = b"orrs-v1";

type HmacSha256 = hmac::Hmac<Sha256>;

/// A relay-chosen lease id: 16 random bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub [u8; LEASE_ID_BYTES]);

impl LeaseId {
    /// Reads a lease id from a protobuf `bytes` field.
    ///
    /// # Errors
    /// `None` unless `bytes` is exactly [`LEASE_ID_BYTES`] long.
    pub fn from_slice(bytes: &[u8]) -> Option<LeaseId> {
        bytes.try_into().ok().map(LeaseId)
    }
}

/// The byte the relay writes on an idle or claimed reverse session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Marker {
    /// Idle keep-alive (every 15 s by default); never interleaves with a claim.
    KeepAlive = 0x00,
    /// Claimed by a raw TCP port lease: the public client's bytes follow.
    Tcp = 0x01,
    /// Claimed by TLS passthrough: the client's TLS stream follows, starting with its ClientHello.
    Tls = 0x02,
}

impl Marker {
    /// The marker for a byte, if it is one.
    pub fn from_byte(b: u8) -> Option<Marker> {
        match b {
            0x00 => Some(Marker::KeepAlive),
            0x01 => Some(Marker::Tcp),
            0x02 => Some(Marker::Tls),
            _ => None,
        }
    }
}

/// Why a reverse handshake was refused. Each variant is a counted close reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReverseError {
    /// The session did not start with `ORRS`.
    #[error("reverse session does not start with ORRS")]
    BadMagic,
    /// The preamble names a version other than [`PREAMBLE_VERSION`].
    #[error("unsupported reverse handshake version {0}")]
    UnsupportedVersion(u8),
    /// The MAC did not verify.
    #[error("reverse session MAC does not verify")]
    BadMac,
    /// The MAC has the wrong length.
    #[error("reverse session MAC has {0} bytes, want 32")]
    BadMacLength(usize),
}

/// Encodes the agent's preamble.
pub fn encode_preamble(lease_id: &LeaseId) -> [u8; PREAMBLE_BYTES] {
    let mut out = [0u8; PREAMBLE_BYTES];
    out[..4].copy_from_slice(&PREAMBLE_MAGIC);
    out[4] = PREAMBLE_VERSION;
    out[5..].copy_from_slice(&lease_id.0);
    out
}

/// Decodes the preamble from the bytes received so far.
///
/// Returns `Ok(None)` while fewer than [`PREAMBLE_BYTES`] bytes are present, but fails as
/// soon as a received byte is wrong (a port scanner or a TLS client is refused at byte one).
///
/// # Errors
/// [`ReverseError::BadMagic`] or [`ReverseError::UnsupportedVersion`].
pub fn decode_preamble(buf: &[u8]) -> Result<Option<LeaseId>, ReverseError> {
    let magic_seen = buf.len().min(PREAMBLE_MAGIC.len());
    if buf[..magic_seen] != PREAMBLE_MAGIC[..magic_seen] {
        return Err(ReverseError::BadMagic);
    }
    if let Some(&version) = buf.get(4)
        && version != PREAMBLE_VERSION
    {
        return Err(ReverseError::UnsupportedVersion(version));
    }
    Ok(buf.get(5..PREAMBLE_BYTES).and_then(LeaseId::from_slice))
}

fn mac_state(
    key: &[u8; EXPORTER_KEY_BYTES],
    nonce: &[u8; NONCE_BYTES],
    lease_id: &LeaseId,
) -> HmacSha256 {
    // HMAC accepts keys of any length; a 32-byte key cannot fail.
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(MAC_CONTEXT);
    mac.update(nonce);
    mac.update(&lease_id.0);
    mac
}

/// The agent's answer: `HMAC-SHA256(K, "orrs-v1" || nonce || lease_id)`.
pub fn compute_mac(
    key: &[u8; EXPORTER_KEY_BYTES],
    nonce: &[u8; NONCE_BYTES],
    lease_id: &LeaseId,
) -> [u8; MAC_BYTES] {
    mac_state(key, nonce, lease_id)
        .finalize()
        .into_bytes()
        .into()
}

/// Checks the agent's MAC in constant time.
///
/// # Errors
/// [`ReverseError::BadMacLength`] or [`ReverseError::BadMac`].
pub fn verify_mac(
    key: &[u8; EXPORTER_KEY_BYTES],
    nonce: &[u8; NONCE_BYTES],
    lease_id: &LeaseId,
    mac: &[u8],
) -> Result<(), ReverseError> {
    if mac.len() != MAC_BYTES {
        return Err(ReverseError::BadMacLength(mac.len()));
    }
    mac_state(key, nonce, lease_id)
        .verify_slice(mac)
        .map_err(|_| ReverseError::BadMac)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: LeaseId = LeaseId([7; 16]);

    #[test]
    fn preamble_round_trip_and_prefixes() {
        let p = encode_preamble(&LEASE);
        assert_eq!(&p[..5], b"ORRS\x01");
        assert_eq!(decode_preamble(&p), Ok(Some(LEASE)));
        for n in 0..PREAMBLE_BYTES {
            assert_eq!(decode_preamble(&p[..n]), Ok(None), "prefix {n}");
        }
    }

    #[test]
    fn preamble_errors_fire_early() {
        assert_eq!(decode_preamble(b"G"), Err(ReverseError::BadMagic));
        assert_eq!(
            decode_preamble(b"\x16\x03\x01"),
            Err(ReverseError::BadMagic)
        );
        assert_eq!(decode_preamble(b"ORRX"), Err(ReverseError::BadMagic));
        assert_eq!(
            decode_preamble(b"ORRS\x02"),
            Err(ReverseError::UnsupportedVersion(2))
        );
        assert_eq!(
            decode_preamble(b"ORRS\x00"),
            Err(ReverseError::UnsupportedVersion(0))
        );
    }

    #[test]
    fn mac_binds_key_nonce_and_lease() {
        let key = [1u8; 32];
        let nonce = [2u8; 16];
        let mac = compute_mac(&key, &nonce, &LEASE);
        assert_eq!(verify_mac(&key, &nonce, &LEASE, &mac), Ok(()));
        assert_eq!(
            verify_mac(&[9; 32], &nonce, &LEASE, &mac),
            Err(ReverseError::BadMac)
        );
        assert_eq!(
            verify_mac(&key, &[3; 16], &LEASE, &mac),
            Err(ReverseError::BadMac)
        );
        assert_eq!(
            verify_mac(&key, &nonce, &LeaseId([8; 16]), &mac),
            Err(ReverseError::BadMac)
        );
        assert_eq!(
            verify_mac(&key, &nonce, &LEASE, &mac[..31]),
            Err(ReverseError::BadMacLength(31))
        );
        let mut flipped = mac;
        flipped[31] ^= 1;
        assert_eq!(
            verify_mac(&key, &nonce, &LEASE, &flipped),
            Err(ReverseError::BadMac)
        );
    }

    /// Pins the MAC construction to an independent computation: RFC 2104 HMAC with SHA-256
    /// over the documented input, so a change of input order or context fails here.
    #[test]
    fn mac_matches_the_documented_construction() {
        let key = [0x0bu8; 32];
        let nonce: [u8; 16] = core::array::from_fn(|i| u8::try_from(i).unwrap_or(0));
        let lease = LeaseId([0xa5; 16]);
        let mut message = Vec::new();
        message.extend_from_slice(b"orrs-v1");
        message.extend_from_slice(&nonce);
        message.extend_from_slice(&lease.0);
        // HMAC(K, m) = H((K ^ opad) || H((K ^ ipad) || m)) with the key zero-padded to 64 bytes.
        use sha2::Digest;
        let mut k = [0u8; 64];
        k[..32].copy_from_slice(&key);
        let inner = Sha256::new()
            .chain_update(k.map(|b| b ^ 0x36))
            .chain_update(&message)
            .finalize();
        let outer = Sha256::new()
            .chain_update(k.map(|b| b ^ 0x5c))
            .chain_update(inner)
            .finalize();
        assert_eq!(
            compute_mac(&key, &nonce, &lease).as_slice(),
            outer.as_slice()
        );
    }

    #[test]
    fn markers() {
        assert_eq!(Marker::from_byte(0), Some(Marker::KeepAlive));
        assert_eq!(Marker::from_byte(1), Some(Marker::Tcp));
        assert_eq!(Marker::from_byte(2), Some(Marker::Tls));
        assert_eq!(Marker::from_byte(3), None);
    }
}
