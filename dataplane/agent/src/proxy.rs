//! PROXY protocol headers to local services (`proxy_protocol = "v1" | "v2"`), built with the
//! `ppp` crate: the agent never spells the encoding itself.
//!
//! - Reverse sessions of a lease granted `client_addr`: the public client's source and the relay
//!   address it dialled (v2 PROXY, STREAM; v1 `PROXY TCP4|TCP6 ...`). Without the addresses (a
//!   relay that does not grant `client_addr`): v2 LOCAL, v1 `PROXY UNKNOWN`, counted
//!   `client_addr_missing`.
//! - UDP datagrams (v2 only): a PROXY, DGRAM header before each payload.
//! - Service streams: the addresses are the relay's business, so v2 LOCAL carrying the
//!   consumer's identity URI as TLV [`TLV_CONSUMER_URI`] and the service as
//!   `PP2_TYPE_AUTHORITY` (address family AF_INET with zero addresses, which a LOCAL receiver
//!   ignores, so that TLV parsers find the TLVs); v1 can carry no TLV: `PROXY UNKNOWN`.

use outrelay_proto::client_addr::ClientAddr;
use ppp::v2::{Addresses, Builder, Command, Protocol, Type, Version};

use crate::config::ProxyProtocol;

/// TLV type of the consumer's identity URI on service streams (in the PP2 custom range
/// 0xE0-0xEF).
pub const TLV_CONSUMER_URI: u8 = 0xE0;

/// Longest TLV value `ppp` can frame with the rest of a header (the v2 length is 16 bits).
const TLV_VALUE_MAX_BYTES: usize = 4096;

/// The header for a stream to a local TCP or TLS service. `None`: the relay passed no address.
pub fn stream_header(version: ProxyProtocol, client: Option<&ClientAddr>) -> Vec<u8> {
    match version {
        ProxyProtocol::V1 => {
            let addrs = client.map_or(ppp::v1::Addresses::Unknown, |c| {
                ppp::v1::Addresses::from((c.source, c.destination))
            });
            addrs.to_string().into_bytes()
        }
        ProxyProtocol::V2 => v2(client, Protocol::Stream, &[]),
    }
}

/// The v2 DGRAM header before one datagram's payload to a local UDP service.
pub fn datagram_header(client: Option<&ClientAddr>) -> Vec<u8> {
    v2(client, Protocol::Datagram, &[])
}

/// The header for a service stream's local target: LOCAL, with the consumer's URI (TLV 0xE0)
/// and the service name (`PP2_TYPE_AUTHORITY`) in v2.
pub fn service_header(version: ProxyProtocol, consumer_uri: &str, service: &str) -> Vec<u8> {
    match version {
        ProxyProtocol::V1 => ppp::v1::Addresses::Unknown.to_string().into_bytes(),
        ProxyProtocol::V2 => {
            let mut tlvs: Vec<(u8, &[u8])> = Vec::with_capacity(2);
            if consumer_uri.len() <= TLV_VALUE_MAX_BYTES {
                tlvs.push((TLV_CONSUMER_URI, consumer_uri.as_bytes()));
            }
            if service.len() <= TLV_VALUE_MAX_BYTES {
                tlvs.push((Type::Authority.into(), service.as_bytes()));
            }
            v2(None, Protocol::Stream, &tlvs)
        }
    }
}

fn v2(client: Option<&ClientAddr>, protocol: Protocol, tlvs: &[(u8, &[u8])]) -> Vec<u8> {
    let builder = match client {
        Some(c) => Builder::with_addresses(
            Version::Two | Command::Proxy,
            protocol,
            Addresses::from((c.source, c.destination)),
        ),
        // LOCAL with TLVs: zero IPv4 addresses (a LOCAL receiver ignores them) rather than
        // AF_UNSPEC, because parsers such as `ppp` read an AF_UNSPEC payload as all address
        // bytes and would not find the TLVs.
        None if !tlvs.is_empty() => Builder::with_addresses(
            Version::Two | Command::Local,
            protocol,
            Addresses::from(ppp::v2::IPv4::new([0, 0, 0, 0], [0, 0, 0, 0], 0, 0)),
        ),
        None => Builder::with_addresses(
            Version::Two | Command::Local,
            Protocol::Unspecified,
            Addresses::Unspecified,
        ),
    };
    let mut builder = Ok(builder);
    for (kind, value) in tlvs {
        builder = builder.and_then(|b| b.write_tlv(*kind, value));
    }
    // The builder fails only past 64 KiB, which the bounded TLVs above cannot reach; the
    // fallback is still a valid header (LOCAL, no TLV).
    builder.and_then(Builder::build).unwrap_or_else(|_| {
        let mut h = ppp::v2::PROTOCOL_PREFIX.to_vec();
        h.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        h
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ppp::v2::Header;

    fn sa(s: &str) -> std::net::SocketAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn headers_parse_back_with_ppp() {
        let c = ClientAddr::new(sa("203.0.113.7:40123"), sa("198.51.100.1:443"));
        assert_eq!(
            stream_header(ProxyProtocol::V1, Some(&c)),
            b"PROXY TCP4 203.0.113.7 198.51.100.1 40123 443\r\n"
        );
        assert_eq!(stream_header(ProxyProtocol::V1, None), b"PROXY UNKNOWN\r\n");
        let bytes = stream_header(ProxyProtocol::V2, Some(&c));
        let h = Header::try_from(&bytes[..]).expect("v2 parses");
        assert_eq!(h.command, Command::Proxy);
        assert_eq!(h.protocol, Protocol::Stream);
        assert_eq!(h.addresses, Addresses::from((c.source, c.destination)));
        let bytes = datagram_header(Some(&c));
        let h = Header::try_from(&bytes[..]).expect("dgram parses");
        assert_eq!(h.protocol, Protocol::Datagram);
        let bytes = stream_header(ProxyProtocol::V2, None);
        let h = Header::try_from(&bytes[..]).expect("local parses");
        assert_eq!(h.command, Command::Local);
        let uri = "outrelay://acme/agent/0f8fad5b-d9cb-469f-a165-70867728950e";
        let bytes = service_header(ProxyProtocol::V2, uri, "db");
        let h = Header::try_from(&bytes[..]).expect("service header parses");
        let tlvs: Vec<_> = h.tlvs().map(|t| t.expect("tlv")).collect();
        assert_eq!(tlvs[0].kind, TLV_CONSUMER_URI);
        assert_eq!(&tlvs[0].value[..], uri.as_bytes());
        assert_eq!(tlvs[1].kind, 0x02);
        assert_eq!(&tlvs[1].value[..], b"db");
    }
}
