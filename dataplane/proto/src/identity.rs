//! Identity URIs carried as the single URI SAN of every OutRelay certificate.
//!
//! ```text
//! outrelay://<tenant>/agent/<uuid>     an agent of a tenant
//! outrelay://<region>/relay/<id>       a relay
//! outrelay://<tenant>/admin/<name>     a tenant admin; tenant `system` means a global admin
//! ```
//!
//! webpki does not check URI SANs, so this strict parser is the security boundary that decides
//! what a peer may do. It accepts exactly the grammar above and nothing else: no
//! percent-encoding, no `..`, no port, query, fragment or userinfo, no trailing slash, no
//! upper case, at most [`MAX_IDENTITY_URI_BYTES`] bytes. Every rejection has its own
//! [`IdentityError`] variant so a relay or controller can count it by reason.

use std::fmt;

/// Longest identity URI accepted, in bytes.
pub const MAX_IDENTITY_URI_BYTES: usize = 2048;
/// Longest tenant, region, relay id or admin name, in bytes.
pub const MAX_LABEL_BYTES: usize = 63;
/// The tenant name reserved for global administrators; no tenant may use it.
pub const SYSTEM_TENANT: &str = "system";

const SCHEME_PREFIX: &str = "outrelay://";

/// Why an identity URI was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The URI is longer than [`MAX_IDENTITY_URI_BYTES`].
    #[error("identity URI longer than {MAX_IDENTITY_URI_BYTES} bytes")]
    TooLong,
    /// The URI does not start with `outrelay://`.
    #[error("identity URI scheme is not outrelay://")]
    BadScheme,
    /// The path does not have exactly two segments after the authority.
    #[error("identity URI path must be /<role>/<id>")]
    BadPath,
    /// The role segment is not `agent`, `relay` or `admin`.
    #[error("identity URI role is not agent, relay or admin")]
    UnknownRole,
    /// The tenant or region is not `^[a-z0-9][a-z0-9-]{0,62}$` (this also refuses a port,
    /// userinfo, percent-encoding, upper case, a query or a fragment in the authority).
    #[error("identity URI tenant or region is not a valid label")]
    BadAuthority,
    /// The relay id or admin name is not a valid label.
    #[error("identity URI id is not a valid label")]
    BadId,
    /// The agent id is not a canonical lowercase UUID.
    #[error("identity URI agent id is not a canonical lowercase UUID")]
    BadUuid,
    /// An agent identity used the reserved tenant `system`.
    #[error("tenant `system` is reserved for global admins")]
    ReservedTenant,
    /// The certificate carries no URI SAN.
    #[error("certificate has no URI SAN")]
    NoUriSan,
    /// The certificate carries more than one URI SAN.
    #[error("certificate has more than one URI SAN")]
    MultipleUriSans,
}

/// The role an identity grants; decides what its holder may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// An agent next to a workload.
    Agent,
    /// A relay.
    Relay,
    /// An administrator (of one tenant, or global for tenant `system`).
    Admin,
}

impl Role {
    /// The path segment naming this role.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Relay => "relay",
            Role::Admin => "admin",
        }
    }
}

/// A validated label: `^[a-z0-9][a-z0-9-]{0,62}$` (tenant, region, relay id, admin name).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Label(String);

impl Label {
    /// Validates `s` as a label.
    ///
    /// # Errors
    /// Returns `None` when `s` is empty, longer than [`MAX_LABEL_BYTES`], starts with `-`, or
    /// holds anything but `a-z`, `0-9` and `-`.
    pub fn new(s: &str) -> Option<Label> {
        is_label(s).then(|| Label(s.to_owned()))
    }

    /// The label as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A canonical lowercase UUID (`8-4-4-4-12` hex digits), the id of an agent.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentUuid(String);

impl AgentUuid {
    /// Validates `s` as a canonical lowercase UUID.
    ///
    /// # Errors
    /// Returns `None` for any other spelling (upper case, braces, missing hyphens, `urn:`).
    pub fn new(s: &str) -> Option<AgentUuid> {
        is_canonical_uuid(s).then(|| AgentUuid(s.to_owned()))
    }

    /// Formats 16 bytes (for example a random UUIDv4) as a canonical UUID.
    pub fn from_bytes(bytes: [u8; 16]) -> AgentUuid {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(36);
        for (i, b) in bytes.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                s.push('-');
            }
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
        AgentUuid(s)
    }

    /// The UUID as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AgentUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A parsed, validated identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// `outrelay://<tenant>/agent/<uuid>`
    Agent {
        /// The agent's tenant (never `system`).
        tenant: Label,
        /// The agent's id.
        uuid: AgentUuid,
    },
    /// `outrelay://<region>/relay/<id>`
    Relay {
        /// The relay's region.
        region: Label,
        /// The relay's id.
        id: Label,
    },
    /// `outrelay://<tenant>/admin/<name>`; tenant `system` is a global admin.
    Admin {
        /// The tenant administered, or `system` for every tenant.
        tenant: Label,
        /// The admin's name.
        name: Label,
    },
}

impl Identity {
    /// Parses an identity URI strictly (see the module docs).
    ///
    /// # Errors
    /// The first rule the URI breaks, as an [`IdentityError`].
    pub fn parse(uri: &str) -> Result<Identity, IdentityError> {
        if uri.len() > MAX_IDENTITY_URI_BYTES {
            return Err(IdentityError::TooLong);
        }
        let rest = uri
            .strip_prefix(SCHEME_PREFIX)
            .ok_or(IdentityError::BadScheme)?;
        let mut parts = rest.split('/');
        let (Some(authority), Some(role), Some(id), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(IdentityError::BadPath);
        };
        let authority = Label::new(authority).ok_or(IdentityError::BadAuthority)?;
        match role {
            "agent" => {
                if authority.as_str() == SYSTEM_TENANT {
                    return Err(IdentityError::ReservedTenant);
                }
                let uuid = AgentUuid::new(id).ok_or(IdentityError::BadUuid)?;
                Ok(Identity::Agent {
                    tenant: authority,
                    uuid,
                })
            }
            "relay" => Ok(Identity::Relay {
                region: authority,
                id: Label::new(id).ok_or(IdentityError::BadId)?,
            }),
            "admin" => Ok(Identity::Admin {
                tenant: authority,
                name: Label::new(id).ok_or(IdentityError::BadId)?,
            }),
            _ => Err(IdentityError::UnknownRole),
        }
    }

    /// Picks the identity out of a certificate's URI SANs: there must be exactly one.
    ///
    /// # Errors
    /// [`IdentityError::NoUriSan`], [`IdentityError::MultipleUriSans`], or the parse error of
    /// the one URI.
    pub fn from_uri_sans<'a, I>(uris: I) -> Result<Identity, IdentityError>
    where
        I: IntoIterator<Item = &'a str>,
    {
        let mut uris = uris.into_iter();
        let first = uris.next().ok_or(IdentityError::NoUriSan)?;
        if uris.next().is_some() {
            return Err(IdentityError::MultipleUriSans);
        }
        Identity::parse(first)
    }

    /// The role this identity grants.
    pub fn role(&self) -> Role {
        match self {
            Identity::Agent { .. } => Role::Agent,
            Identity::Relay { .. } => Role::Relay,
            Identity::Admin { .. } => Role::Admin,
        }
    }

    /// The tenant an agent or admin belongs to; `None` for relays (they serve all tenants).
    pub fn tenant(&self) -> Option<&Label> {
        match self {
            Identity::Agent { tenant, .. } | Identity::Admin { tenant, .. } => Some(tenant),
            Identity::Relay { .. } => None,
        }
    }

    /// True for `outrelay://system/admin/<name>`.
    pub fn is_global_admin(&self) -> bool {
        matches!(self, Identity::Admin { tenant, .. } if tenant.as_str() == SYSTEM_TENANT)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Agent { tenant, uuid } => write!(f, "{SCHEME_PREFIX}{tenant}/agent/{uuid}"),
            Identity::Relay { region, id } => write!(f, "{SCHEME_PREFIX}{region}/relay/{id}"),
            Identity::Admin { tenant, name } => write!(f, "{SCHEME_PREFIX}{tenant}/admin/{name}"),
        }
    }
}

impl std::str::FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Identity::parse(s)
    }
}

/// `^[a-z0-9][a-z0-9-]{0,62}$`
pub fn is_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_LABEL_BYTES
        && b[0] != b'-'
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

fn is_canonical_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(c),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: &str = "0f8fad5b-d9cb-469f-a165-70867728950e";

    #[test]
    fn parses_each_role() {
        let agent = Identity::parse(&format!("outrelay://acme/agent/{UUID}")).expect("agent");
        assert_eq!(agent.role(), Role::Agent);
        assert_eq!(agent.tenant().map(Label::as_str), Some("acme"));
        assert_eq!(agent.to_string(), format!("outrelay://acme/agent/{UUID}"));

        let relay = Identity::parse("outrelay://eu-west-1/relay/r1").expect("relay");
        assert_eq!(relay.role(), Role::Relay);
        assert_eq!(relay.tenant(), None);

        let admin = Identity::parse("outrelay://system/admin/ops").expect("admin");
        assert!(admin.is_global_admin());
        let tenant_admin = Identity::parse("outrelay://acme/admin/alice").expect("admin");
        assert!(!tenant_admin.is_global_admin());
    }

    #[test]
    fn rejects_every_deviation_with_its_reason() {
        use IdentityError::*;
        let long = format!(
            "outrelay://acme/agent/{}",
            "a".repeat(MAX_IDENTITY_URI_BYTES)
        );
        let cases: &[(&str, IdentityError)] = &[
            ("https://acme/agent/x", BadScheme),
            ("OUTRELAY://acme/relay/r1", BadScheme),
            ("outrelay:/acme/relay/r1", BadScheme),
            ("outrelay://acme/relay", BadPath),
            ("outrelay://acme/relay/r1/", BadPath),
            ("outrelay://acme/relay/r1/extra", BadPath),
            ("outrelay://acme/relay/../r1", BadPath),
            ("outrelay://acme/owner/r1", UnknownRole),
            ("outrelay://Acme/relay/r1", BadAuthority),
            ("outrelay://acme:443/relay/r1", BadAuthority),
            ("outrelay://user@acme/relay/r1", BadAuthority),
            ("outrelay://ac%6De/relay/r1", BadAuthority),
            ("outrelay://-acme/relay/r1", BadAuthority),
            ("outrelay:///relay/r1", BadAuthority),
            ("outrelay://acme/relay/r1?x=1", BadId),
            ("outrelay://acme/relay/r1#frag", BadId),
            ("outrelay://acme/relay/..", BadId),
            ("outrelay://acme/admin/Alice", BadId),
            ("outrelay://acme/agent/not-a-uuid", BadUuid),
            (
                "outrelay://acme/agent/0F8FAD5B-D9CB-469F-A165-70867728950E",
                BadUuid,
            ),
            (
                "outrelay://acme/agent/{0f8fad5b-d9cb-469f-a165-70867728950e}",
                BadUuid,
            ),
            (
                "outrelay://system/agent/0f8fad5b-d9cb-469f-a165-70867728950e",
                ReservedTenant,
            ),
            (&long, TooLong),
        ];
        for (uri, want) in cases {
            assert_eq!(Identity::parse(uri), Err(*want), "{uri}");
        }
        let label64 = "a".repeat(64);
        assert_eq!(
            Identity::parse(&format!("outrelay://{label64}/relay/r1")),
            Err(BadAuthority)
        );
        let label63 = "a".repeat(63);
        assert!(Identity::parse(&format!("outrelay://{label63}/relay/{label63}")).is_ok());
    }

    #[test]
    fn exactly_one_uri_san() {
        assert_eq!(
            Identity::from_uri_sans(std::iter::empty()),
            Err(IdentityError::NoUriSan)
        );
        assert_eq!(
            Identity::from_uri_sans(["outrelay://a/relay/b", "outrelay://a/relay/c"]),
            Err(IdentityError::MultipleUriSans)
        );
        assert!(Identity::from_uri_sans(["outrelay://a/relay/b"]).is_ok());
    }

    #[test]
    fn uuid_from_bytes_is_canonical() {
        let u = AgentUuid::from_bytes([0xab; 16]);
        assert_eq!(u.as_str(), "abababab-abab-abab-abab-abababababab");
        assert!(AgentUuid::new(u.as_str()).is_some());
    }
}
