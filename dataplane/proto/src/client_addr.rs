//! The public client's addresses, as the relay passes them to an agent that asked for them
//! (`LeaseRegister.client_addr`, echoed by `LeaseGrant.client_addr`): the agent turns them into
//! a PROXY protocol header for its local service (`docs/protocol.md`, "Client addresses").
//!
//! ```text
//! family u8 (4 or 6) | source IP (4 or 16) | source port u16 BE | destination IP | destination port u16 BE
//! ```
//!
//! 13 bytes for IPv4, 37 for IPv6. It follows the markers [`Marker::TcpAddr`] and
//! [`Marker::TlsAddr`](crate::reverse::Marker::TlsAddr) on a reverse session, and the
//! `(slot, flow)` header of a relay→agent datagram of a slot granted with `client_addr`. The
//! source is the public client's address as the relay accepted it, the destination the relay's
//! address the client dialled. An IPv4 client on a dual-stack socket (`::ffff:a.b.c.d`) is
//! written as family 4: one spelling per address.
//!
//! [`Marker::TcpAddr`]: crate::reverse::Marker::TcpAddr

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Family byte of an IPv4 block.
pub const FAMILY_V4: u8 = 4;
/// Family byte of an IPv6 block.
pub const FAMILY_V6: u8 = 6;
/// Length of an IPv4 block: family, two addresses, two ports.
pub const BLOCK_V4_BYTES: usize = 1 + 2 * (4 + 2);
/// Length of an IPv6 block.
pub const BLOCK_V6_BYTES: usize = 1 + 2 * (16 + 2);
/// The longest block: what a reader must be able to hold.
pub const MAX_BLOCK_BYTES: usize = BLOCK_V6_BYTES;

/// Why an address block was refused. Each variant is a counted close or drop reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClientAddrError {
    /// The family byte is neither 4 nor 6.
    #[error("client address block has family {0}, want 4 or 6")]
    BadFamily(u8),
    /// The bytes end inside the block (a datagram; a stream reader waits for more instead).
    #[error("client address block truncated")]
    Truncated,
}

impl ClientAddrError {
    /// The stable metric label of this error.
    pub fn reason(&self) -> &'static str {
        match self {
            ClientAddrError::BadFamily(_) => "client_addr_bad_family",
            ClientAddrError::Truncated => "client_addr_truncated",
        }
    }
}

/// The public client's source and the relay address it dialled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientAddr {
    /// The public client's address, as the relay accepted it.
    pub source: SocketAddr,
    /// The relay's address the client connected or sent to.
    pub destination: SocketAddr,
}

impl ClientAddr {
    /// A block for `source` and `destination`. IPv4-mapped IPv6 addresses become IPv4; when the
    /// two then differ in family the IPv4 one is mapped back, so the block has one family.
    pub fn new(source: SocketAddr, destination: SocketAddr) -> ClientAddr {
        let (source, destination) = (canonical(source), canonical(destination));
        match (source, destination) {
            (SocketAddr::V4(s), SocketAddr::V6(_)) => ClientAddr {
                source: SocketAddr::new(IpAddr::V6(s.ip().to_ipv6_mapped()), s.port()),
                destination,
            },
            (SocketAddr::V6(_), SocketAddr::V4(d)) => ClientAddr {
                source,
                destination: SocketAddr::new(IpAddr::V6(d.ip().to_ipv6_mapped()), d.port()),
            },
            _ => ClientAddr {
                source,
                destination,
            },
        }
    }

    /// The encoded length of this block.
    pub fn encoded_len(&self) -> usize {
        if self.source.is_ipv4() {
            BLOCK_V4_BYTES
        } else {
            BLOCK_V6_BYTES
        }
    }

    /// Writes the block into `out` and returns its length.
    ///
    /// # Panics
    /// If `out` is shorter than [`ClientAddr::encoded_len`]: a caller bug, never network input.
    pub fn encode(&self, out: &mut [u8]) -> usize {
        match (self.source, self.destination) {
            (SocketAddr::V4(s), SocketAddr::V4(d)) => {
                out[0] = FAMILY_V4;
                out[1..5].copy_from_slice(&s.ip().octets());
                out[5..7].copy_from_slice(&s.port().to_be_bytes());
                out[7..11].copy_from_slice(&d.ip().octets());
                out[11..13].copy_from_slice(&d.port().to_be_bytes());
                BLOCK_V4_BYTES
            }
            (s, d) => {
                out[0] = FAMILY_V6;
                out[1..17].copy_from_slice(&v6(s.ip()).octets());
                out[17..19].copy_from_slice(&s.port().to_be_bytes());
                out[19..35].copy_from_slice(&v6(d.ip()).octets());
                out[35..37].copy_from_slice(&d.port().to_be_bytes());
                BLOCK_V6_BYTES
            }
        }
    }

    /// The block as bytes (a fixed buffer and its length).
    pub fn to_bytes(&self) -> ([u8; MAX_BLOCK_BYTES], usize) {
        let mut out = [0u8; MAX_BLOCK_BYTES];
        let n = self.encode(&mut out);
        (out, n)
    }

    /// Decodes a block from the bytes received so far, returning it and its length.
    ///
    /// Streaming-safe: `Ok(None)` while the block is incomplete (a reader keeps what it has
    /// and calls again with more), an error as soon as the family byte is wrong. Bytes past
    /// the block are ignored.
    ///
    /// # Errors
    /// [`ClientAddrError::BadFamily`].
    pub fn decode_partial(buf: &[u8]) -> Result<Option<(ClientAddr, usize)>, ClientAddrError> {
        let Some(&family) = buf.first() else {
            return Ok(None);
        };
        let want = block_len(family)?;
        let Some(block) = buf.get(..want) else {
            return Ok(None);
        };
        let port = |at: usize| u16::from_be_bytes([block[at], block[at + 1]]);
        let addr = if family == FAMILY_V4 {
            let ip =
                |at: usize| Ipv4Addr::new(block[at], block[at + 1], block[at + 2], block[at + 3]);
            ClientAddr {
                source: SocketAddr::new(IpAddr::V4(ip(1)), port(5)),
                destination: SocketAddr::new(IpAddr::V4(ip(7)), port(11)),
            }
        } else {
            let ip = |at: usize| {
                let mut o = [0u8; 16];
                o.copy_from_slice(&block[at..at + 16]);
                Ipv6Addr::from(o)
            };
            ClientAddr {
                source: SocketAddr::new(IpAddr::V6(ip(1)), port(17)),
                destination: SocketAddr::new(IpAddr::V6(ip(19)), port(35)),
            }
        };
        Ok(Some((addr, want)))
    }

    /// Decodes a block at the start of a datagram payload and returns it and the rest.
    ///
    /// # Errors
    /// [`ClientAddrError::BadFamily`] or [`ClientAddrError::Truncated`].
    pub fn decode(buf: &[u8]) -> Result<(ClientAddr, &[u8]), ClientAddrError> {
        match ClientAddr::decode_partial(buf)? {
            Some((addr, n)) => Ok((addr, &buf[n..])),
            None => Err(ClientAddrError::Truncated),
        }
    }
}

/// The whole length of a block whose family byte is `family`.
///
/// # Errors
/// [`ClientAddrError::BadFamily`].
pub fn block_len(family: u8) -> Result<usize, ClientAddrError> {
    match family {
        FAMILY_V4 => Ok(BLOCK_V4_BYTES),
        FAMILY_V6 => Ok(BLOCK_V6_BYTES),
        other => Err(ClientAddrError::BadFamily(other)),
    }
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    #[test]
    fn ipv4_block_is_documented_bytes() {
        let a = ClientAddr::new(sa("203.0.113.7:40123"), sa("198.51.100.1:443"));
        let (buf, n) = a.to_bytes();
        assert_eq!(
            &buf[..n],
            &[4, 203, 0, 113, 7, 0x9c, 0xbb, 198, 51, 100, 1, 0x01, 0xbb]
        );
        assert_eq!(ClientAddr::decode(&buf[..n]), Ok((a, &[][..])));
    }

    #[test]
    fn mapped_addresses_have_one_spelling() {
        let a = ClientAddr::new(sa("[::ffff:10.0.0.1]:5"), sa("[::ffff:10.0.0.2]:6"));
        assert_eq!(a.source, sa("10.0.0.1:5"));
        assert_eq!(a.encoded_len(), BLOCK_V4_BYTES);
        let mixed = ClientAddr::new(sa("10.0.0.1:5"), sa("[2001:db8::1]:6"));
        assert_eq!(mixed.encoded_len(), BLOCK_V6_BYTES);
        let (buf, n) = mixed.to_bytes();
        assert_eq!(ClientAddr::decode(&buf[..n]).map(|(a, _)| a), Ok(mixed));
    }

    #[test]
    fn every_prefix_waits_and_bad_family_fails_at_byte_one() {
        let a = ClientAddr::new(sa("[2001:db8::7]:1"), sa("[2001:db8::1]:443"));
        let (buf, n) = a.to_bytes();
        for cut in 0..n {
            assert_eq!(ClientAddr::decode_partial(&buf[..cut]), Ok(None), "{cut}");
            if cut > 0 {
                assert_eq!(
                    ClientAddr::decode(&buf[..cut]),
                    Err(ClientAddrError::Truncated)
                );
            }
        }
        assert_eq!(ClientAddr::decode_partial(&buf[..n]), Ok(Some((a, n))));
        assert_eq!(
            ClientAddr::decode_partial(&[5]),
            Err(ClientAddrError::BadFamily(5))
        );
        assert_eq!(
            ClientAddrError::BadFamily(0).reason(),
            "client_addr_bad_family"
        );
    }
}
