//! The OutRelay relay (`outrelay-relay`), built up issue by issue. What exists so far is the
//! pure lease logic ([`lease`]); the workers, listeners, QUIC endpoint and the binary arrive
//! with the data-plane work and are not pretended here.
#![forbid(unsafe_code)]

pub mod lease;
