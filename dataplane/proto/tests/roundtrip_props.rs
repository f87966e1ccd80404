//! Encode/decode round trips for every codec, under arbitrary values and arbitrary
//! segmentation of the byte stream.

use outrelay_proto::client_addr::{ClientAddr, ClientAddrError, MAX_BLOCK_BYTES};
use outrelay_proto::frame::{self, Decoded, Frame, FrameType};
use outrelay_proto::identity::{AgentUuid, Identity};
use outrelay_proto::orp;
use outrelay_proto::reverse::{self, LeaseId};
use outrelay_proto::udp::{self, DatagramHeader, MAX_DATAGRAM_HEADER_BYTES};
use proptest::prelude::*;

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (".{0,20}", ".{0,80}", prop::collection::vec(".{0,10}", 0..4)).prop_map(
            |(v, uri, caps)| {
                Frame::Hello(orp::Hello {
                    protocol_version: v,
                    agent_uri: uri,
                    capabilities: caps,
                })
            }
        ),
        (".{0,30}", ".{0,30}", any::<u64>()).prop_map(|(t, m, id)| {
            Frame::OpenStream(orp::OpenStream {
                target_service: t,
                method: m,
                stream_id: id,
            })
        }),
        (any::<u32>(), ".{0,40}", any::<u64>()).prop_map(|(code, reason, request_id)| {
            Frame::StreamReject(orp::StreamReject {
                code,
                reason,
                request_id,
            })
        }),
        Just(Frame::Ping),
        Just(Frame::Pong),
        Just(Frame::StreamAccept(orp::StreamAccept::default())),
        (".{0,63}", any::<[bool; 6]>(), any::<u32>(), any::<u64>()).prop_map(
            |(name, b, ttl_s, request_id)| {
                Frame::LeaseRegister(orp::LeaseRegister {
                    name,
                    tls: b[0],
                    tcp: b[1],
                    udp: b[2],
                    ttl_s,
                    reverse_tls: b[3],
                    request_id,
                    wildcard: b[4],
                    client_addr: b[5],
                })
            }
        ),
        (
            any::<u64>(),
            prop::collection::vec(any::<u8>(), 0..20),
            ".{0,40}",
            any::<i64>(),
            any::<u32>()
        )
            .prop_map(
                |(request_id, lease_id, hostname, expires_unix_ms, udp_slot)| {
                    Frame::LeaseGrant(orp::LeaseGrant {
                        request_id,
                        lease_id,
                        hostname,
                        tcp_addr: "203.0.113.1:20001".into(),
                        udp_addr: String::new(),
                        reverse_addr: "relay.example:7443".into(),
                        expires_unix_ms,
                        udp_slot,
                        client_addr: udp_slot % 2 == 1,
                    })
                }
            ),
        (".{0,30}", ".{0,30}", ".{0,60}", any::<u64>()).prop_map(|(t, m, s, id)| {
            Frame::ForwardStream(orp::IncomingStream {
                target_service: t,
                method: m,
                source_agent_uri: s,
                stream_id: id,
                ..Default::default()
            })
        }),
        (".{0,30}", any::<u32>()).prop_map(|(reason, ms)| {
            Frame::GoAway(orp::GoAway {
                reason,
                reconnect_after_ms: ms,
            })
        }),
    ]
}

proptest! {
    #[test]
    fn frames_round_trip_through_any_segmentation(
        frames in prop::collection::vec(frame(), 1..8),
        cuts in prop::collection::vec(1usize..64, 1..8),
    ) {
        let mut stream = Vec::new();
        for f in &frames {
            f.encode(&mut stream).expect("encode");
        }
        // Deliver the stream in pieces; decode whenever a frame is complete.
        let mut buffer = Vec::new();
        let mut decoded = Vec::new();
        let mut rest = &stream[..];
        let mut sizes = cuts.iter().cycle();
        while !rest.is_empty() {
            let n = (*sizes.next().expect("cycle")).min(rest.len());
            buffer.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            while let Decoded::Frame { frame: raw, used } = frame::decode(&buffer).expect("valid stream") {
                decoded.push(Frame::decode(&raw).expect("typed decode"));
                buffer.drain(..used);
            }
        }
        prop_assert!(buffer.is_empty());
        prop_assert_eq!(decoded, frames);
    }

    #[test]
    fn raw_frames_keep_type_flags_and_payload(
        ty in prop::sample::select(FrameType::ALL.to_vec()),
        flags in any::<u16>(),
        payload in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut out = Vec::new();
        frame::encode_raw(ty, flags, &payload, &mut out).expect("encode");
        let Decoded::Frame { frame: raw, used } = frame::decode(&out).expect("decode") else {
            panic!("complete frame reported incomplete");
        };
        prop_assert_eq!(used, out.len());
        prop_assert_eq!(raw.header.type_code, ty.code());
        prop_assert_eq!(raw.header.flags, flags);
        prop_assert_eq!(raw.payload, &payload[..]);
    }

    #[test]
    fn uvarints_round_trip(v in any::<u64>()) {
        let mut buf = [0u8; 10];
        let n = udp::encode_uvarint(v, &mut buf);
        prop_assert_eq!(udp::decode_uvarint(&buf[..n]), Ok((v, n)));
        // Every strict prefix is truncated, never a different value.
        for k in 0..n {
            prop_assert_eq!(udp::decode_uvarint(&buf[..k]), Err(udp::DatagramError::Truncated));
        }
    }

    #[test]
    fn datagram_headers_round_trip(slot in any::<u32>(), flow in any::<u64>(), payload in prop::collection::vec(any::<u8>(), 0..100)) {
        let h = DatagramHeader { udp_slot: slot, flow_id: flow };
        let mut buf = vec![0u8; MAX_DATAGRAM_HEADER_BYTES];
        let n = h.encode(&mut buf);
        buf.truncate(n);
        buf.extend_from_slice(&payload);
        prop_assert_eq!(DatagramHeader::decode(&buf), Ok((h, &payload[..])));
    }

    #[test]
    fn preambles_round_trip(id in any::<[u8; 16]>(), key in any::<[u8; 32]>(), na in any::<[u8; 16]>(), nr in any::<[u8; 16]>()) {
        let lease = LeaseId(id);
        prop_assert_eq!(
            reverse::decode_preamble(&reverse::encode_preamble(&lease, &na)),
            Ok(Some(reverse::Preamble::V2 { lease_id: lease, agent_nonce: na }))
        );
        let challenge = reverse::encode_challenge(&key, &lease, &na, &nr);
        prop_assert_eq!(reverse::verify_challenge(&key, &lease, &na, &challenge), Ok(nr));
        let mac = reverse::agent_mac(&key, &lease, &na, &nr);
        prop_assert_eq!(reverse::verify_agent_mac(&key, &lease, &na, &nr, &mac), Ok(()));
        let v1 = reverse::compute_mac_v1(&key, &nr, &lease);
        prop_assert_eq!(reverse::verify_mac_v1(&key, &nr, &lease, &v1), Ok(()));
    }

    #[test]
    fn identities_print_and_parse_back(
        tenant in "[a-z0-9][a-z0-9-]{0,62}",
        id in "[a-z0-9][a-z0-9-]{0,62}",
        uuid in any::<[u8; 16]>(),
        role in 0u8..3,
    ) {
        let uri = match role {
            0 => format!("outrelay://{tenant}/agent/{}", AgentUuid::from_bytes(uuid)),
            1 => format!("outrelay://{tenant}/relay/{id}"),
            _ => format!("outrelay://{tenant}/admin/{id}"),
        };
        match Identity::parse(&uri) {
            Ok(parsed) => prop_assert_eq!(parsed.to_string(), uri),
            Err(e) => prop_assert!(role == 0 && tenant == "system", "{uri}: {e}"),
        }
    }

    #[test]
    fn client_addr_blocks_round_trip_in_any_pieces(
        v6 in any::<bool>(),
        s4 in any::<[u8; 4]>(), d4 in any::<[u8; 4]>(),
        s6 in any::<[u8; 16]>(), d6 in any::<[u8; 16]>(),
        sp in any::<u16>(), dp in any::<u16>(),
        cut in 0usize..=MAX_BLOCK_BYTES,
        payload in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
        let (src, dst) = if v6 {
            (IpAddr::V6(Ipv6Addr::from(s6)), IpAddr::V6(Ipv6Addr::from(d6)))
        } else {
            (IpAddr::V4(Ipv4Addr::from(s4)), IpAddr::V4(Ipv4Addr::from(d4)))
        };
        let addr = ClientAddr::new(SocketAddr::new(src, sp), SocketAddr::new(dst, dp));
        let (block, n) = addr.to_bytes();
        prop_assert_eq!(n, addr.encoded_len());
        // A stream reader that got `cut` bytes so far waits or has the whole block.
        let got = ClientAddr::decode_partial(&block[..cut.min(n)]);
        if cut < n {
            prop_assert_eq!(got, Ok(None));
        } else {
            prop_assert_eq!(got, Ok(Some((addr, n))));
        }
        // A datagram: the block, then the payload untouched.
        let mut datagram = block[..n].to_vec();
        datagram.extend_from_slice(&payload);
        let (back, rest) = ClientAddr::decode(&datagram).expect("decodes");
        prop_assert_eq!(back, addr);
        prop_assert_eq!(rest, &payload[..]);
        // Decoding then re-encoding gives the same bytes: one spelling.
        let (again, m) = back.to_bytes();
        prop_assert_eq!(&again[..m], &block[..n]);
    }

    #[test]
    fn client_addr_garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..48)) {
        match ClientAddr::decode(&bytes) {
            Ok((addr, rest)) => {
                let (again, m) = addr.to_bytes();
                prop_assert_eq!(&again[..m], &bytes[..bytes.len() - rest.len()]);
            }
            Err(ClientAddrError::BadFamily(f)) => prop_assert!(f != 4 && f != 6),
            Err(ClientAddrError::Truncated) => prop_assert!(bytes.len() < MAX_BLOCK_BYTES),
        }
    }
}
