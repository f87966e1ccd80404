//! OutRelay control-plane API shared by the controller, the relay and the CLI.
//!
//! - [`pb`]: the gRPC messages and tonic clients/servers of package `outrelay.control.v1`,
//!   generated from `proto/control.proto` and checked in under `src/gen/`
//!   (`tests/generated_code.rs` regenerates them with protox + tonic-prost-build, so no system
//!   `protoc` is needed, and fails on any difference).
//! - [`policy`]: the pure, deterministic policy rule evaluator the relay runs on its Watch
//!   snapshot.
//!
//! No sockets, no clock (time is an argument), no unsafe code.
#![forbid(unsafe_code)]

/// Generated protobuf messages and tonic services of `outrelay.control.v1`.
#[allow(missing_docs, clippy::all, reason = "generated code")]
pub mod pb {
    include!("gen/outrelay.control.v1.rs");
}

pub mod policy;

/// Longest caller, target or method pattern accepted in a policy rule, in bytes.
pub const MAX_PATTERN_BYTES: usize = 512;
