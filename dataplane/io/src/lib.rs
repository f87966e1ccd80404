//! OutRelay's zero-copy splice engine, shared by the relay and the agent.
//!
//! Joins pairs of connected sockets and moves their bytes through kernel pipes
//! (`splice(2)`), both ways, with half-close preserved, budgeted pipes and per-pair timeouts.
//! A stalled reader never pins a pipe for long (it gives it back after `stall_timeout`), and a
//! spent pipe budget falls back to a bounded user-space copy path instead of stopping flows.
//! One [`Engine`] per worker thread; readiness from io_uring ([`Backend::Uring`]) or epoll
//! ([`Backend::Epoll`], the fallback, forceable so the test suite runs on both).
//!
//! Unsafe policy: `unsafe` is denied everywhere except the io_uring module (`uring.rs`) and
//! `fdpass` (owning descriptors received with SCM_RIGHTS), where each block carries a
//! `// SAFETY:` comment.
#![deny(unsafe_code)]

pub mod buffer;
pub mod engine;
pub mod fdpass;
pub mod pipe;
pub mod poller;
pub mod rate;
mod uring;

pub use buffer::{BufferLimits, BufferStats};
pub use engine::{
    AddError, CLOSED_LABELS, CloseReason, Engine, EngineConfig, EngineHandle, EngineStats,
    Finished, Limits, USER_KEY_LIMIT,
};
pub use pipe::{PipeLimits, PipeStats};
pub use poller::{BACKEND_ENV, Backend, Interest};
pub use rate::Bucket;
