//! Talking to the controller, shared by the CLI, the relay and the agent.
//!
//! - [`connect`]: a tonic channel over the controller's Unix socket or over mutual TLS.

pub mod connect;

pub use connect::{Target, connect};
