//! The OutRelay relay (`outrelay-relay`), built up issue by issue. What exists so far: the pure
//! lease logic ([`lease`]), the snapshot the control side publishes to the data path
//! ([`state`]), and public ingress ([`ingress`]: reverse sessions, SNI and TCP lease listeners,
//! hand-off to the splice engine). The QUIC endpoint, the controller client, the admin socket,
//! metrics and the binary arrive with the rest of the data-plane work and are not pretended
//! here.
#![forbid(unsafe_code)]

pub mod config;
pub mod ingress;
pub mod lease;
pub mod metrics;
pub mod quic;
pub mod state;
