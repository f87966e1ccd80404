//! gRPC transport and per-RPC authorization.
//!
//! Callers are identified by the connection, never by request fields: the verified client
//! certificate's single URI SAN (parsed strictly by `outrelay_proto::identity`) on TCP, or
//! SO_PEERCRED on the Unix socket. [`App::authenticate`] turns the connection's [`Caller`] into
//! a [`Principal`] (refusing revoked identities), and each RPC then checks what that principal
//! may do with one of the `require_*` helpers. Every refusal is PERMISSION_DENIED, counted by
//! reason and audited aggregated ([`crate::refusals`]).

pub mod limits;
pub mod server;

use std::net::IpAddr;

use outrelay_proto::identity::{Identity, Label, SYSTEM_TENANT};
use tonic::Status;

use crate::app::App;
use crate::refusals::Refusal;
use crate::store::StoreError;

/// Who is on the other end of a connection, as established at accept time.
#[derive(Debug, Clone)]
pub enum Caller {
    /// A Unix-socket peer; `admin` when root or a member of the admin group.
    Unix {
        /// Peer uid (SO_PEERCRED).
        uid: u32,
        /// Root or a member of the admin group.
        admin: bool,
    },
    /// A TLS peer with a verified certificate and a valid identity URI, and the certificate's
    /// notAfter in Unix seconds (`None`: unreadable; TLS already checked it).
    Cert(Identity, Option<i64>),
    /// A TLS peer whose verified certificate carries no acceptable identity URI.
    BadCert(String),
    /// A TLS peer without a client certificate (may only call `Pki.Enroll`), with its address.
    Anonymous(Option<IpAddr>),
}

/// The notAfter (Unix seconds) of the certificate `req`'s connection was made with, if any:
/// a watch stream ends then (TLS checks it only at the handshake).
pub fn cert_not_after<T>(req: &tonic::Request<T>) -> Option<i64> {
    match req.extensions().get::<Caller>() {
        Some(Caller::Cert(_, not_after)) => *not_after,
        _ => None,
    }
}

/// An authenticated caller, after the revocation check.
#[derive(Debug, Clone)]
pub enum Principal {
    /// Root / admin group on the Unix socket, or `outrelay://system/admin/<name>`.
    GlobalAdmin(String),
    /// `outrelay://<tenant>/admin/<name>`.
    TenantAdmin {
        /// The administered tenant.
        tenant: Label,
        /// The full identity URI.
        uri: String,
    },
    /// `outrelay://<region>/relay/<id>`.
    Relay {
        /// Region from the certificate.
        region: Label,
        /// Relay id from the certificate.
        id: Label,
        /// The full identity URI.
        uri: String,
    },
    /// `outrelay://<tenant>/agent/<uuid>`.
    Agent(Identity),
    /// No client certificate; the peer's address when known.
    Anonymous(Option<IpAddr>),
}

impl Principal {
    /// How the caller is named in audit rows.
    pub fn name(&self) -> String {
        match self {
            Principal::GlobalAdmin(n) => n.clone(),
            Principal::TenantAdmin { uri, .. } | Principal::Relay { uri, .. } => uri.clone(),
            Principal::Agent(id) => id.to_string(),
            Principal::Anonymous(None) => "anonymous".to_owned(),
            Principal::Anonymous(Some(ip)) => format!("anonymous@{ip}"),
        }
    }

    /// The tenant audit rows about this caller belong to.
    fn audit_tenant(&self) -> String {
        match self {
            Principal::TenantAdmin { tenant, .. } => tenant.to_string(),
            Principal::Agent(id) => id.tenant().map(Label::to_string).unwrap_or_default(),
            _ => SYSTEM_TENANT.to_owned(),
        }
    }
}

impl App {
    /// Establishes who is calling `method` from the request's connection info. Revoked
    /// identities, certificates without a valid identity and non-admin Unix peers are refused
    /// (PERMISSION_DENIED, audited). `Anonymous` is returned for TLS peers without a client
    /// certificate; every RPC but `Pki.Enroll` then refuses it through its `require_*` check.
    ///
    /// # Errors
    /// PERMISSION_DENIED as above.
    pub fn authenticate<T>(
        &self,
        req: &tonic::Request<T>,
        method: &'static str,
    ) -> Result<Principal, Status> {
        let caller = req
            .extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or(Caller::Anonymous(None));
        match caller {
            Caller::Anonymous(Some(ip))
                if !self
                    .anonymous_rpcs
                    .take(limits::SourceKey::of(ip), std::time::Instant::now()) =>
            {
                let refused = self.refuse_named(
                    Refusal::AnonymousRate,
                    &format!("anonymous@{ip}"),
                    SYSTEM_TENANT,
                    method,
                    "too many calls without a certificate (grpc.anonymous_rpcs_per_source_per_s)",
                );
                Err(Status::resource_exhausted(refused.message().to_owned()))
            }
            Caller::Anonymous(ip) => Ok(Principal::Anonymous(ip)),
            Caller::Unix { uid, admin } => {
                let name = format!("unix:uid={uid}");
                if admin {
                    Ok(Principal::GlobalAdmin(name))
                } else {
                    Err(self.refuse_named(
                        Refusal::UnixNotAdmin,
                        &name,
                        SYSTEM_TENANT,
                        method,
                        "unix peer is neither root nor in the admin group",
                    ))
                }
            }
            Caller::BadCert(reason) => Err(self.refuse_named(
                Refusal::BadIdentity,
                "tls:bad-identity",
                SYSTEM_TENANT,
                method,
                &format!("certificate identity refused: {reason}"),
            )),
            Caller::Cert(identity, _) => {
                let uri = identity.to_string();
                if self.is_revoked(&uri) {
                    let tenant = identity
                        .tenant()
                        .map(Label::to_string)
                        .unwrap_or_else(|| SYSTEM_TENANT.to_owned());
                    return Err(self.refuse_named(
                        Refusal::Revoked,
                        &uri,
                        &tenant,
                        method,
                        "identity revoked",
                    ));
                }
                Ok(match identity {
                    Identity::Admin { tenant, .. } if tenant.as_str() == SYSTEM_TENANT => {
                        Principal::GlobalAdmin(uri)
                    }
                    Identity::Admin { tenant, .. } => Principal::TenantAdmin { tenant, uri },
                    Identity::Relay { region, id } => Principal::Relay { region, id, uri },
                    agent @ Identity::Agent { .. } => Principal::Agent(agent),
                })
            }
        }
    }

    /// Allows global admins and the admins of `tenant`.
    ///
    /// # Errors
    /// PERMISSION_DENIED (audited) for anyone else.
    pub fn require_admin_of(
        &self,
        p: &Principal,
        method: &'static str,
        tenant: &str,
    ) -> Result<(), Status> {
        match p {
            Principal::GlobalAdmin(_) => Ok(()),
            Principal::TenantAdmin { tenant: own, .. } if own.as_str() == tenant => Ok(()),
            Principal::TenantAdmin { .. } => Err(self.refuse(
                p,
                method,
                &format!("tenant admin may not touch tenant `{tenant}`"),
            )),
            _ => Err(self.refuse(p, method, "admin RPC requires an admin identity")),
        }
    }

    /// Allows global admins only.
    ///
    /// # Errors
    /// PERMISSION_DENIED (audited) for anyone else.
    pub fn require_global_admin(&self, p: &Principal, method: &'static str) -> Result<(), Status> {
        match p {
            Principal::GlobalAdmin(_) => Ok(()),
            _ => Err(self.refuse(p, method, "requires a global admin")),
        }
    }

    /// Allows any admin (global or tenant); returns the tenant a tenant admin is limited to.
    ///
    /// # Errors
    /// PERMISSION_DENIED (audited) for non-admins.
    pub fn require_any_admin(
        &self,
        p: &Principal,
        method: &'static str,
    ) -> Result<Option<Label>, Status> {
        match p {
            Principal::GlobalAdmin(_) => Ok(None),
            Principal::TenantAdmin { tenant, .. } => Ok(Some(tenant.clone())),
            _ => Err(self.refuse(p, method, "admin RPC requires an admin identity")),
        }
    }

    /// Allows relays only; returns (region, id) from the certificate.
    ///
    /// # Errors
    /// PERMISSION_DENIED (audited) for anyone else.
    pub fn require_relay(
        &self,
        p: &Principal,
        method: &'static str,
    ) -> Result<(Label, Label), Status> {
        match p {
            Principal::Relay { region, id, .. } => Ok((region.clone(), id.clone())),
            _ => Err(self.refuse(p, method, "requires a relay identity")),
        }
    }

    /// A refusal of `p` (reason `anonymous` or `not_authorized`): counts and audits it
    /// (aggregated; kind `auth`, decision `deny`) and returns PERMISSION_DENIED.
    pub fn refuse(&self, p: &Principal, method: &'static str, reason: &str) -> Status {
        let why = match p {
            Principal::Anonymous(_) => Refusal::Anonymous,
            _ => Refusal::NotAuthorized,
        };
        self.refuse_as(p, why, method, reason)
    }

    /// A refusal of `p` with a named reason, as [`App::refuse`].
    pub fn refuse_as(
        &self,
        p: &Principal,
        why: Refusal,
        method: &'static str,
        reason: &str,
    ) -> Status {
        self.refuse_named(why, &p.name(), &p.audit_tenant(), method, reason)
    }

    fn refuse_named(
        &self,
        why: Refusal,
        caller: &str,
        tenant: &str,
        method: &'static str,
        reason: &str,
    ) -> Status {
        metrics::counter!("outrelay_controller_rpc_refused_total", "method" => method).increment(1);
        // The log line goes with the (aggregated) audit row, never per event.
        self.audit_security(why, tenant, caller, method, reason);
        Status::permission_denied(format!("{method}: {reason}"))
    }
}

/// A store error as a gRPC status.
pub fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::Busy(_) => Status::unavailable(e.to_string()),
        StoreError::DiskFull => Status::resource_exhausted(e.to_string()),
        other => Status::internal(other.to_string()),
    }
}

/// INVALID_ARGUMENT naming `field`.
pub fn invalid(field: &str, reason: &str) -> Status {
    Status::invalid_argument(format!("{field}: {reason}"))
}

/// Validates a tenant name from a request (a label, not `system`).
///
/// # Errors
/// INVALID_ARGUMENT naming `field`.
pub fn tenant_arg(field: &str, tenant: &str) -> Result<Label, Status> {
    if tenant.is_empty() {
        return Err(invalid(field, "required"));
    }
    if tenant == SYSTEM_TENANT {
        return Err(invalid(field, "`system` is reserved"));
    }
    Label::new(tenant).ok_or_else(|| invalid(field, "must match ^[a-z0-9][a-z0-9-]{0,62}$"))
}
