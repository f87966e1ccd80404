//! OutRelay wire formats. No sockets, no clock, no tokio; decoders never panic on input.
//!
//! Everything a relay, an agent or a fuzzer needs to speak OutRelay's protocols byte for byte,
//! as pure functions over byte slices:
//!
//! | module | what |
//! |---|---|
//! | [`frame`] | ORP framing (8-byte header + protobuf payload), incremental decoder, encoder |
//! | [`fields`] | bounds on ORP string fields (service, method, REGISTER `local_addr`) |
//! | [`orp`] | the `outrelay.orp.v1` protobuf messages (generated, checked in) |
//! | [`client_addr`] | the public client's address block (PROXY protocol to the service) |
//! | [`client_hello`] | incremental TLS ClientHello parser: SNI, ALPN, ECH presence |
//! | [`hostname`] | host-name and lease-name normalisation shared by SNI and leases |
//! | [`reverse`] | reverse-session preamble, exporter-keyed MAC, marker bytes |
//! | [`tunnel`] | TCP/443 fallback tunnel framing (`[u16 len][QUIC packet]`) and its ALPN |
//! | [`udp`] | UDP datagram header (`uvarint udp_slot`, `uvarint flow_id`) |
//! | [`identity`] | strict parser for `outrelay://` identity URIs |
//!
//! The specification is `shared/spec/orp.md` and `shared/spec/public-ingress.md`;
//! `docs/protocol.md` points here.
#![forbid(unsafe_code)]

pub mod client_addr;
pub mod client_hello;
pub mod fields;
pub mod frame;
pub mod hostname;
pub mod identity;
pub mod reverse;
pub mod tunnel;
pub mod udp;

/// The `outrelay.orp.v1` protobuf messages, generated from `proto/orp.proto` by prost-build
/// (through protox, so no system `protoc` is needed). The generated file is checked in;
/// `tests/generated_code.rs` regenerates it and fails on any difference.
#[allow(missing_docs, clippy::all, reason = "generated code")]
pub mod orp {
    include!("gen/outrelay.orp.v1.rs");
}

pub use client_addr::{ClientAddr, ClientAddrError};
pub use client_hello::{ClientHello, ClientHelloParser, HelloError, Progress};
pub use frame::{Decoded, Frame, FrameError, FrameType, RawFrame};
pub use hostname::{HostName, LeaseName, NameError};
pub use identity::{Identity, IdentityError, Role};
pub use reverse::{LeaseId, Marker, ReverseError};
pub use udp::{DatagramError, DatagramHeader};
