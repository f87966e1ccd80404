//! The reverse-session handshake and the marker bytes (`public-ingress.md`).
//!
//! An agent proves that a plain TCP reverse session belongs to the mTLS QUIC connection that
//! holds a lease, and the relay proves the same to the agent first, with a key only the two
//! ends of that connection know: the TLS exporter
//! `K = export(label = EXPORTER_LABEL, context = lease_id, 32 bytes)`. No bearer secret ever
//! crosses the wire, a recorded exchange cannot be replayed (each side picks a fresh nonce for
//! every session and both MACs bind both nonces), and the agent answers nothing and acts on no
//! marker until the relay's proof verified, so it is no MAC oracle for whoever it reached.
//!
//! Version 2 (what this crate's agent speaks):
//!
//! ```text
//! agent -> relay   "ORRS" 0x02 lease_id[16] nonce_a[16]                             (PREAMBLE_BYTES)
//! relay -> agent   nonce_r[16] HMAC-SHA256(K, "orrs-v2-relay" || lease_id || nonce_a || nonce_r)
//!                                                                                    (CHALLENGE_BYTES)
//! agent -> relay   HMAC-SHA256(K, "orrs-v2-agent" || lease_id || nonce_a || nonce_r) (MAC_BYTES)
//! relay -> agent   0x00 keep-alive ... then exactly one marker 0x01 (TCP) or 0x02 (TLS)
//! ```
//!
//! On a lease granted with `client_addr` (an OutRelay extension of LEASE_REGISTER/LEASE_GRANT)
//! the relay writes 0x03 (TCP) or 0x04 (TLS) instead, each followed by the public client's
//! address block ([`crate::client_addr`]) and then the client's bytes.
//!
//! Version 1 (one-way, refused by a relay unless configured to accept it during an upgrade):
//!
//! ```text
//! agent -> relay   "ORRS" 0x01 lease_id[16]                        (PREAMBLE_V1_BYTES)
//! relay -> agent   nonce[16]
//! agent -> relay   HMAC-SHA256(K, "orrs-v1" || nonce || lease_id)  (MAC_BYTES)
//! ```

use hmac::{KeyInit, Mac};
use sha2::Sha256;

/// The first four bytes of every reverse session.
pub const PREAMBLE_MAGIC: [u8; 4] = *b"ORRS";
/// The handshake version this crate's agent speaks: mutual.
pub const PREAMBLE_VERSION: u8 = 2;
/// The one-way handshake of older agents.
pub const PREAMBLE_VERSION_V1: u8 = 1;
/// Length of a lease id, in bytes.
pub const LEASE_ID_BYTES: usize = 16;
/// Length of either side's nonce, in bytes.
pub const NONCE_BYTES: usize = 16;
/// Length of a version 2 preamble: magic, version, lease id, the agent's nonce.
pub const PREAMBLE_BYTES: usize = PREAMBLE_MAGIC.len() + 1 + LEASE_ID_BYTES + NONCE_BYTES;
/// Length of a version 1 preamble: magic, version, lease id.
pub const PREAMBLE_V1_BYTES: usize = PREAMBLE_MAGIC.len() + 1 + LEASE_ID_BYTES;
/// Length of either side's MAC, in bytes.
pub const MAC_BYTES: usize = 32;
/// Length of the relay's version 2 answer: its nonce and its proof.
pub const CHALLENGE_BYTES: usize = NONCE_BYTES + MAC_BYTES;
/// TLS exporter label for the reverse-session key.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-outrelay-reverse-v1";
/// Length of the exporter key, in bytes.
pub const EXPORTER_KEY_BYTES: usize = 32;
/// Domain-separation prefix of the relay's version 2 proof.
pub const RELAY_PROOF_CONTEXT: &[u8] = b"orrs-v2-relay";
/// Domain-separation prefix of the agent's version 2 MAC.
pub const AGENT_MAC_CONTEXT: &[u8] = b"orrs-v2-agent";
/// Domain-separation prefix of the version 1 MAC.
pub const MAC_CONTEXT_V1: &[u8] = b"orrs-v1";
// The two version 2 labels have one length, and every field after them a fixed one: no input
// of one side's MAC is an input of the other's.
const _: () = assert!(RELAY_PROOF_CONTEXT.len() == AGENT_MAC_CONTEXT.len());

type HmacSha256 = hmac::Hmac<Sha256>;
/// The exporter key `K`.
pub type Key = [u8; EXPORTER_KEY_BYTES];
/// A nonce of either side.
pub type Nonce = [u8; NONCE_BYTES];

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
    /// [`Marker::Tcp`] followed by the client's address block (leases granted `client_addr`).
    TcpAddr = 0x03,
    /// [`Marker::Tls`] followed by the client's address block (leases granted `client_addr`).
    TlsAddr = 0x04,
}

impl Marker {
    /// The marker for a byte, if it is one.
    pub fn from_byte(b: u8) -> Option<Marker> {
        match b {
            0x00 => Some(Marker::KeepAlive),
            0x01 => Some(Marker::Tcp),
            0x02 => Some(Marker::Tls),
            0x03 => Some(Marker::TcpAddr),
            0x04 => Some(Marker::TlsAddr),
            _ => None,
        }
    }

    /// Whether an address block follows this marker.
    pub fn carries_client_addr(self) -> bool {
        matches!(self, Marker::TcpAddr | Marker::TlsAddr)
    }

    /// The marker for a claim: TLS passthrough or raw TCP, with or without the address block.
    pub fn claim(tls: bool, client_addr: bool) -> Marker {
        match (tls, client_addr) {
            (false, false) => Marker::Tcp,
            (true, false) => Marker::Tls,
            (false, true) => Marker::TcpAddr,
            (true, true) => Marker::TlsAddr,
        }
    }
}

/// Why a reverse handshake was refused. Each variant is a counted close reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReverseError {
    /// The session did not start with `ORRS`.
    #[error("reverse session does not start with ORRS")]
    BadMagic,
    /// The preamble names a version other than 1 or 2.
    #[error("unsupported reverse handshake version {0}")]
    UnsupportedVersion(u8),
    /// The agent's MAC did not verify.
    #[error("reverse session MAC does not verify")]
    BadMac,
    /// The relay's proof did not verify: the peer does not know `K`.
    #[error("the relay's reverse session proof does not verify")]
    BadRelayProof,
    /// A MAC or the relay's answer has the wrong length.
    #[error("reverse session message has {got} bytes, want {want}")]
    BadLength {
        /// Bytes received.
        got: usize,
        /// Bytes the message has.
        want: usize,
    },
}

/// A complete preamble.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preamble {
    /// Version 1: the relay answers a bare nonce (one-way; refused by default).
    V1 {
        /// The lease the session is for.
        lease_id: LeaseId,
    },
    /// Version 2: the relay proves `K` first.
    V2 {
        /// The lease the session is for.
        lease_id: LeaseId,
        /// The agent's fresh nonce, bound into both MACs.
        agent_nonce: Nonce,
    },
}

impl Preamble {
    /// The lease the session is for.
    pub fn lease_id(&self) -> LeaseId {
        match self {
            Preamble::V1 { lease_id } | Preamble::V2 { lease_id, .. } => *lease_id,
        }
    }
}

/// Encodes the agent's version 2 preamble.
pub fn encode_preamble(lease_id: &LeaseId, agent_nonce: &Nonce) -> [u8; PREAMBLE_BYTES] {
    let mut out = [0u8; PREAMBLE_BYTES];
    out[..4].copy_from_slice(&PREAMBLE_MAGIC);
    out[4] = PREAMBLE_VERSION;
    out[5..PREAMBLE_V1_BYTES].copy_from_slice(&lease_id.0);
    out[PREAMBLE_V1_BYTES..].copy_from_slice(agent_nonce);
    out
}

/// Encodes an old agent's version 1 preamble (tests and the compatibility path).
pub fn encode_preamble_v1(lease_id: &LeaseId) -> [u8; PREAMBLE_V1_BYTES] {
    let mut out = [0u8; PREAMBLE_V1_BYTES];
    out[..4].copy_from_slice(&PREAMBLE_MAGIC);
    out[4] = PREAMBLE_VERSION_V1;
    out[5..].copy_from_slice(&lease_id.0);
    out
}

/// How many bytes the preamble whose first bytes are `buf` has in all: a reader never reads
/// past it (the version byte decides; an unknown version is refused by [`decode_preamble`]).
pub fn preamble_len(buf: &[u8]) -> usize {
    match buf.get(4) {
        None => PREAMBLE_MAGIC.len() + 1,
        Some(&PREAMBLE_VERSION_V1) => PREAMBLE_V1_BYTES,
        Some(_) => PREAMBLE_BYTES,
    }
}

/// Decodes the preamble from the bytes received so far.
///
/// Returns `Ok(None)` while fewer than [`preamble_len`] bytes are present, but fails as soon
/// as a received byte is wrong (a port scanner or a TLS client is refused at byte one).
/// Bytes past the preamble are ignored.
///
/// # Errors
/// [`ReverseError::BadMagic`] or [`ReverseError::UnsupportedVersion`].
pub fn decode_preamble(buf: &[u8]) -> Result<Option<Preamble>, ReverseError> {
    let magic_seen = buf.len().min(PREAMBLE_MAGIC.len());
    if buf[..magic_seen] != PREAMBLE_MAGIC[..magic_seen] {
        return Err(ReverseError::BadMagic);
    }
    let Some(&version) = buf.get(4) else {
        return Ok(None);
    };
    let lease_id = || buf.get(5..PREAMBLE_V1_BYTES).and_then(LeaseId::from_slice);
    match version {
        PREAMBLE_VERSION_V1 => Ok(lease_id().map(|lease_id| Preamble::V1 { lease_id })),
        PREAMBLE_VERSION => Ok(lease_id().and_then(|lease_id| {
            let agent_nonce = buf
                .get(PREAMBLE_V1_BYTES..PREAMBLE_BYTES)?
                .try_into()
                .ok()?;
            Some(Preamble::V2 {
                lease_id,
                agent_nonce,
            })
        })),
        other => Err(ReverseError::UnsupportedVersion(other)),
    }
}

fn keyed(key: &Key) -> HmacSha256 {
    // HMAC accepts keys of any length; a 32-byte key cannot fail.
    <HmacSha256 as KeyInit>::new_from_slice(key).unwrap_or_else(|_| unreachable!())
}

fn v2_state(
    context: &[u8],
    key: &Key,
    lease_id: &LeaseId,
    agent_nonce: &Nonce,
    relay_nonce: &Nonce,
) -> HmacSha256 {
    let mut mac = keyed(key);
    mac.update(context);
    mac.update(&lease_id.0);
    mac.update(agent_nonce);
    mac.update(relay_nonce);
    mac
}

fn check(mac: HmacSha256, got: &[u8], wrong: ReverseError) -> Result<(), ReverseError> {
    if got.len() != MAC_BYTES {
        return Err(ReverseError::BadLength {
            got: got.len(),
            want: MAC_BYTES,
        });
    }
    // `verify_slice` compares in constant time.
    mac.verify_slice(got).map_err(|_| wrong)
}

/// The relay's version 2 answer: `nonce_r || HMAC-SHA256(K, "orrs-v2-relay" || lease_id ||
/// nonce_a || nonce_r)`.
pub fn encode_challenge(
    key: &Key,
    lease_id: &LeaseId,
    agent_nonce: &Nonce,
    relay_nonce: &Nonce,
) -> [u8; CHALLENGE_BYTES] {
    let proof: [u8; MAC_BYTES] =
        v2_state(RELAY_PROOF_CONTEXT, key, lease_id, agent_nonce, relay_nonce)
            .finalize()
            .into_bytes()
            .into();
    let mut out = [0u8; CHALLENGE_BYTES];
    out[..NONCE_BYTES].copy_from_slice(relay_nonce);
    out[NONCE_BYTES..].copy_from_slice(&proof);
    out
}

/// The agent checks the relay's answer in constant time; on success, the relay's nonce.
///
/// # Errors
/// [`ReverseError::BadLength`] or [`ReverseError::BadRelayProof`].
pub fn verify_challenge(
    key: &Key,
    lease_id: &LeaseId,
    agent_nonce: &Nonce,
    challenge: &[u8],
) -> Result<Nonce, ReverseError> {
    let (Some(nonce), Some(proof)) = (challenge.get(..NONCE_BYTES), challenge.get(NONCE_BYTES..))
    else {
        return Err(ReverseError::BadLength {
            got: challenge.len(),
            want: CHALLENGE_BYTES,
        });
    };
    let relay_nonce: Nonce = nonce.try_into().map_err(|_| ReverseError::BadRelayProof)?;
    let state = v2_state(
        RELAY_PROOF_CONTEXT,
        key,
        lease_id,
        agent_nonce,
        &relay_nonce,
    );
    check(state, proof, ReverseError::BadRelayProof)?;
    Ok(relay_nonce)
}

/// The agent's version 2 answer: `HMAC-SHA256(K, "orrs-v2-agent" || lease_id || nonce_a ||
/// nonce_r)`.
pub fn agent_mac(
    key: &Key,
    lease_id: &LeaseId,
    agent_nonce: &Nonce,
    relay_nonce: &Nonce,
) -> [u8; MAC_BYTES] {
    v2_state(AGENT_MAC_CONTEXT, key, lease_id, agent_nonce, relay_nonce)
        .finalize()
        .into_bytes()
        .into()
}

/// The relay checks the agent's version 2 MAC in constant time.
///
/// # Errors
/// [`ReverseError::BadLength`] or [`ReverseError::BadMac`].
pub fn verify_agent_mac(
    key: &Key,
    lease_id: &LeaseId,
    agent_nonce: &Nonce,
    relay_nonce: &Nonce,
    mac: &[u8],
) -> Result<(), ReverseError> {
    let state = v2_state(AGENT_MAC_CONTEXT, key, lease_id, agent_nonce, relay_nonce);
    check(state, mac, ReverseError::BadMac)
}

fn v1_state(key: &Key, nonce: &Nonce, lease_id: &LeaseId) -> HmacSha256 {
    let mut mac = keyed(key);
    mac.update(MAC_CONTEXT_V1);
    mac.update(nonce);
    mac.update(&lease_id.0);
    mac
}

/// An old agent's version 1 answer: `HMAC-SHA256(K, "orrs-v1" || nonce || lease_id)`.
pub fn compute_mac_v1(key: &Key, nonce: &Nonce, lease_id: &LeaseId) -> [u8; MAC_BYTES] {
    v1_state(key, nonce, lease_id)
        .finalize()
        .into_bytes()
        .into()
}

/// Checks a version 1 MAC in constant time (a relay that accepts version 1).
///
/// # Errors
/// [`ReverseError::BadLength`] or [`ReverseError::BadMac`].
pub fn verify_mac_v1(
    key: &Key,
    nonce: &Nonce,
    lease_id: &LeaseId,
    mac: &[u8],
) -> Result<(), ReverseError> {
    check(v1_state(key, nonce, lease_id), mac, ReverseError::BadMac)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: LeaseId = LeaseId([7; 16]);
    const KEY: Key = [1; 32];
    const NA: Nonce = [2; 16];
    const NR: Nonce = [3; 16];

    #[test]
    fn preamble_round_trip_and_prefixes() {
        let p = encode_preamble(&LEASE, &NA);
        assert_eq!(&p[..5], b"ORRS\x02");
        assert_eq!(p.len(), 37);
        let full = Preamble::V2 {
            lease_id: LEASE,
            agent_nonce: NA,
        };
        assert_eq!(decode_preamble(&p), Ok(Some(full)));
        assert_eq!(full.lease_id(), LEASE);
        for n in 0..PREAMBLE_BYTES {
            assert_eq!(decode_preamble(&p[..n]), Ok(None), "prefix {n}");
        }
        assert_eq!(preamble_len(&p[..4]), 5);
        assert_eq!(preamble_len(&p[..5]), PREAMBLE_BYTES);
        let v1 = encode_preamble_v1(&LEASE);
        assert_eq!(&v1[..5], b"ORRS\x01");
        assert_eq!(preamble_len(&v1[..5]), PREAMBLE_V1_BYTES);
        assert_eq!(
            decode_preamble(&v1),
            Ok(Some(Preamble::V1 { lease_id: LEASE }))
        );
        for n in 0..PREAMBLE_V1_BYTES {
            assert_eq!(decode_preamble(&v1[..n]), Ok(None), "v1 prefix {n}");
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
            decode_preamble(b"ORRS\x03"),
            Err(ReverseError::UnsupportedVersion(3))
        );
        assert_eq!(
            decode_preamble(b"ORRS\x00"),
            Err(ReverseError::UnsupportedVersion(0))
        );
    }

    #[test]
    fn the_agent_accepts_only_a_relay_that_knows_k() {
        let challenge = encode_challenge(&KEY, &LEASE, &NA, &NR);
        assert_eq!(&challenge[..16], &NR);
        assert_eq!(verify_challenge(&KEY, &LEASE, &NA, &challenge), Ok(NR));
        // Without K, or for another lease, or for another agent nonce (a replayed answer).
        let wrong_key = encode_challenge(&[9; 32], &LEASE, &NA, &NR);
        assert_eq!(
            verify_challenge(&KEY, &LEASE, &NA, &wrong_key),
            Err(ReverseError::BadRelayProof)
        );
        assert_eq!(
            verify_challenge(&KEY, &LeaseId([8; 16]), &NA, &challenge),
            Err(ReverseError::BadRelayProof)
        );
        assert_eq!(
            verify_challenge(&KEY, &LEASE, &[4; 16], &challenge),
            Err(ReverseError::BadRelayProof)
        );
        // The relay nonce is bound too: swapping it breaks the proof.
        let mut swapped = challenge;
        swapped[0] ^= 1;
        assert_eq!(
            verify_challenge(&KEY, &LEASE, &NA, &swapped),
            Err(ReverseError::BadRelayProof)
        );
        let mut flipped = challenge;
        flipped[CHALLENGE_BYTES - 1] ^= 1;
        assert_eq!(
            verify_challenge(&KEY, &LEASE, &NA, &flipped),
            Err(ReverseError::BadRelayProof)
        );
        assert_eq!(
            verify_challenge(&KEY, &LEASE, &NA, &challenge[..47]),
            Err(ReverseError::BadLength { got: 31, want: 32 })
        );
        assert_eq!(
            verify_challenge(&KEY, &LEASE, &NA, &challenge[..3]),
            Err(ReverseError::BadLength { got: 3, want: 48 })
        );
    }

    #[test]
    fn the_agent_mac_binds_key_lease_and_both_nonces() {
        let mac = agent_mac(&KEY, &LEASE, &NA, &NR);
        assert_eq!(verify_agent_mac(&KEY, &LEASE, &NA, &NR, &mac), Ok(()));
        for (key, lease, na, nr) in [
            ([9; 32], LEASE, NA, NR),
            (KEY, LeaseId([8; 16]), NA, NR),
            (KEY, LEASE, [4; 16], NR),
            (KEY, LEASE, NA, [4; 16]),
        ] {
            assert_eq!(
                verify_agent_mac(&key, &lease, &na, &nr, &mac),
                Err(ReverseError::BadMac)
            );
        }
        assert_eq!(
            verify_agent_mac(&KEY, &LEASE, &NA, &NR, &mac[..31]),
            Err(ReverseError::BadLength { got: 31, want: 32 })
        );
    }

    /// Domain separation: neither side's MAC is valid as the other's, so a reflected proof
    /// or a reflected answer verifies nowhere.
    #[test]
    fn relay_proof_and_agent_mac_never_stand_in_for_each_other() {
        let challenge = encode_challenge(&KEY, &LEASE, &NA, &NR);
        let mac = agent_mac(&KEY, &LEASE, &NA, &NR);
        assert_ne!(&challenge[16..], &mac[..]);
        assert_eq!(
            verify_agent_mac(&KEY, &LEASE, &NA, &NR, &challenge[16..]),
            Err(ReverseError::BadMac)
        );
        let mut reflected = [0u8; CHALLENGE_BYTES];
        reflected[..16].copy_from_slice(&NR);
        reflected[16..].copy_from_slice(&mac);
        assert_eq!(
            verify_challenge(&KEY, &LEASE, &NA, &reflected),
            Err(ReverseError::BadRelayProof)
        );
        // Nor is a version 1 MAC over the same nonce.
        let v1 = compute_mac_v1(&KEY, &NR, &LEASE);
        assert_eq!(
            verify_agent_mac(&KEY, &LEASE, &NA, &NR, &v1),
            Err(ReverseError::BadMac)
        );
    }

    #[test]
    fn v1_mac_binds_key_nonce_and_lease() {
        let mac = compute_mac_v1(&KEY, &NR, &LEASE);
        assert_eq!(verify_mac_v1(&KEY, &NR, &LEASE, &mac), Ok(()));
        assert_eq!(
            verify_mac_v1(&[9; 32], &NR, &LEASE, &mac),
            Err(ReverseError::BadMac)
        );
        assert_eq!(
            verify_mac_v1(&KEY, &[4; 16], &LEASE, &mac),
            Err(ReverseError::BadMac)
        );
        assert_eq!(
            verify_mac_v1(&KEY, &NR, &LeaseId([8; 16]), &mac),
            Err(ReverseError::BadMac)
        );
    }

    /// RFC 2104 HMAC with SHA-256, computed independently of the `hmac` crate.
    fn hmac_sha256(key: &Key, message: &[u8]) -> Vec<u8> {
        use sha2::Digest;
        let mut k = [0u8; 64];
        k[..32].copy_from_slice(key);
        let inner = Sha256::new()
            .chain_update(k.map(|b| b ^ 0x36))
            .chain_update(message)
            .finalize();
        Sha256::new()
            .chain_update(k.map(|b| b ^ 0x5c))
            .chain_update(inner)
            .finalize()
            .to_vec()
    }

    /// Pins every MAC to the documented input, so a change of order or label fails here.
    #[test]
    fn macs_match_the_documented_construction() {
        let key = [0x0bu8; 32];
        let na: Nonce = core::array::from_fn(|i| u8::try_from(i).unwrap_or(0));
        let nr: Nonce = core::array::from_fn(|i| u8::try_from(100 + i).unwrap_or(0));
        let lease = LeaseId([0xa5; 16]);
        let v2 = |label: &[u8]| {
            let mut m = label.to_vec();
            m.extend_from_slice(&lease.0);
            m.extend_from_slice(&na);
            m.extend_from_slice(&nr);
            hmac_sha256(&key, &m)
        };
        let challenge = encode_challenge(&key, &lease, &na, &nr);
        assert_eq!(&challenge[16..], v2(b"orrs-v2-relay").as_slice());
        assert_eq!(
            agent_mac(&key, &lease, &na, &nr).as_slice(),
            v2(b"orrs-v2-agent").as_slice()
        );
        let mut m = b"orrs-v1".to_vec();
        m.extend_from_slice(&nr);
        m.extend_from_slice(&lease.0);
        assert_eq!(
            compute_mac_v1(&key, &nr, &lease).as_slice(),
            hmac_sha256(&key, &m).as_slice()
        );
    }

    #[test]
    fn markers() {
        assert_eq!(Marker::from_byte(0), Some(Marker::KeepAlive));
        assert_eq!(Marker::from_byte(1), Some(Marker::Tcp));
        assert_eq!(Marker::from_byte(2), Some(Marker::Tls));
        assert_eq!(Marker::from_byte(3), Some(Marker::TcpAddr));
        assert_eq!(Marker::from_byte(4), Some(Marker::TlsAddr));
        assert_eq!(Marker::from_byte(5), None);
        assert_eq!(Marker::claim(true, true) as u8, 0x04);
        assert!(!Marker::Tls.carries_client_addr());
    }
}
