//! Talking to the controller, shared by the CLI, the relay and the agent. Not a daemon: no
//! global state, no background tasks unless the caller spawns [`reload::renewal_loop`].
//!
//! - [`connect`]: a tonic channel over the controller's Unix socket or over mutual TLS.
//! - [`enroll`]: first contact with a single-use token, the controller pinned by the CA
//!   fingerprint in the token; the key is generated here and never leaves the process.
//! - [`renew`]: a fresh key and certificate for the same identity, and when to ask
//!   ([`renew::renew_at`], 70 % of the lifetime).
//! - [`store`]: the identity on disk (`key.pem` 0600, `cert.pem`, `ca.pem`), written atomically.
//! - [`reload`]: a rustls certificate resolver that takes a renewed certificate without dropping
//!   connections, and the renewal loop.
#![forbid(unsafe_code)]

pub mod cert;
pub mod connect;
pub mod enroll;
pub mod reload;
pub mod renew;
pub mod store;
mod tls;

pub use cert::{CertError, Issued, IssuedCheckError};
pub use connect::{Target, connect};
pub use enroll::{EnrollError, EnrollOptions, PinError, Token, TokenError, enroll};
pub use reload::{Reloadable, renewal_loop};
pub use renew::{RenewError, renew, renew_at};
pub use store::{IdentityStore, StoreError, Stored};
pub use tls::{ConnectFailure, DEFAULT_CONTROLLER_PORT, UrlError};
