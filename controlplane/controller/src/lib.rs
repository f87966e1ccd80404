//! The OutRelay controller: registry, policy, audit, PKI/enrollment and leases over gRPC
//! (mutual TLS on TCP, SO_PEERCRED on the local Unix socket), backed by one SQLite file owned by
//! [`store`].
//!
//! Threads: one tokio runtime for gRPC, watch fan-out and metrics; ONE store writer thread
//! (group commit); reads on tokio's blocking pool. No unsafe code.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod audit;
pub mod bandwidth;
pub mod config;
pub mod dashboard;
pub mod grpc;
pub mod leases;
pub mod metrics;
pub mod pki;
pub mod policy;
pub mod prune;
pub mod refusals;
pub mod registry;
pub mod run;
pub mod store;
pub mod watch;
