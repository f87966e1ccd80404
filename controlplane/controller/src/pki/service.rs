//! The Pki service: enrollment tokens, Enroll, Renew, Revoke, CA bundle, WatchRevocations.
//!
//! Tokens are `ort1.<secret hex>.<CA SHA-256 hex>`; only SHA-256(secret) is stored.
//!
//! Enroll is idempotent (review M11): the token is marked used in the SAME durable transaction
//! that stores the issued certificate (with the SHA-256 of its public key) on the token's row,
//! so a crash or a failed commit leaves the token unspent, and a retry with the same token and
//! the same public key within the token's lifetime gets the stored certificate back,
//! byte-identical, without a second issue. Another key with a used token is refused. A CSR
//! that does not parse, or that names another identity, is refused without spending the token.
//!
//! Relay tokens take the DNS and IP SANs of the CSR (validated: [`crate::pki::relay_names`])
//! into the relay's leaf, so agents verify the relay by name (review M10); they are stored in
//! `relay_names` and every `Pki.Renew` of that relay issues the same names. Agent CSRs' names
//! are ignored.
//!
//! Enroll is reachable without a certificate, so it checks the token against the in-memory
//! mirror ([`App::tokens`]) before anything is queued to the writer: a malformed, unknown or
//! expired token, or a used one (answered from a read), costs no write (only a counted,
//! aggregated refusal). The durable transaction still re-checks, so the mirror only ever saves
//! work, it never grants anything. `Pki.Renew` is rate-limited per identity
//! (`pki.renew_burst`, `pki.renew_refill_ms`).

use std::sync::Arc;

use outrelay_api::pb::{self, pki_server, revocation_event};
use outrelay_proto::identity::{AgentUuid, Identity, Label, SYSTEM_TENANT};
use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tonic::{Request, Response, Status};

use crate::app::{App, Revocations, TokenMemo, now_unix_ms};
use crate::audit;
use crate::grpc::{Principal, invalid, store_status, tenant_arg};
use crate::pki::{LeafProfile, PkiError};
use crate::refusals::Refusal;
use crate::store::StoreError;
use crate::watch::WatchStream;

/// Token prefix (format version).
pub const TOKEN_PREFIX: &str = "ort1";
/// Random bytes in a token secret.
pub const TOKEN_SECRET_BYTES: usize = 32;

/// The Pki service.
#[derive(Clone)]
pub struct PkiService(pub Arc<App>);

/// Loads every revoked identity (start-up).
///
/// # Errors
/// SQLite errors.
pub fn load_revocations(conn: &Connection) -> Result<Revocations, StoreError> {
    let mut stmt = conn.prepare("SELECT uri, revoked_at_unix_ms FROM revocations")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    Ok(rows.collect::<Result<Revocations, _>>()?)
}

/// Loads every stored token's expiry and use (start-up; the table is bounded by retention).
///
/// # Errors
/// SQLite errors.
pub fn load_tokens(
    conn: &Connection,
) -> Result<std::collections::HashMap<String, TokenMemo>, StoreError> {
    let mut stmt =
        conn.prepare("SELECT hash, expires_unix_ms, used_at_unix_ms FROM enrollment_tokens")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            TokenMemo {
                expires_unix_ms: r.get(1)?,
                used: r.get::<_, Option<i64>>(2)?.is_some(),
            },
        ))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A stored token, as read when it is consumed.
struct TokenRow {
    tenant: String,
    role: String,
    agent_uuid: String,
    relay_region: String,
    relay_id: String,
}

/// The outcome of the enrollment transaction.
enum Enrolled {
    /// Issued now (token spent in the same transaction).
    Issued(Identity, crate::pki::Issued),
    /// The token was already spent on this public key: the stored certificate.
    Replayed(String),
    Unknown,
    AlreadyUsed,
    Expired,
    Revoked(Identity),
    Refused(PkiError),
    /// The stored token row does not make an identity (a bug or a damaged database).
    Damaged(&'static str),
}

fn token_hash(secret_hex: &str) -> String {
    hex::encode(Sha256::digest(secret_hex.as_bytes()))
}

/// The identity a stored token enrolls (a fresh uuid for an agent token bound to none).
fn token_identity(row: &TokenRow) -> Result<Identity, &'static str> {
    match row.role.as_str() {
        "relay" => match (Label::new(&row.relay_region), Label::new(&row.relay_id)) {
            (Some(region), Some(id)) => Ok(Identity::Relay { region, id }),
            _ => Err("stored relay token is malformed"),
        },
        _ => {
            let tenant = Label::new(&row.tenant).ok_or("stored token tenant is malformed")?;
            let uuid = if row.agent_uuid.is_empty() {
                AgentUuid::from_bytes(*uuid::Uuid::new_v4().as_bytes())
            } else {
                AgentUuid::new(&row.agent_uuid).ok_or("stored token uuid is malformed")?
            };
            Ok(Identity::Agent { tenant, uuid })
        }
    }
}

/// Records an issued serial (inside the caller's transaction).
fn record_issued(
    conn: &Connection,
    uri: &str,
    issued: &crate::pki::Issued,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO issued_certs (serial, uri, issued_at_unix_ms, not_after_unix_ms) \
         VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![
        issued.serial_hex,
        uri,
        now_unix_ms(),
        issued.not_after_unix_ms
    ])?;
    Ok(())
}

/// The answer for a certificate stored at enrollment (identity and expiry read back from it).
fn replayed_response(app: &App, cert_pem: String) -> Result<pb::CertificateResponse, Status> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| Status::internal(format!("stored certificate: {e}")))?;
    let identity = crate::pki::identity_of_cert(&der)
        .map_err(|e| Status::internal(format!("stored certificate: {e}")))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| Status::internal(format!("stored certificate: {e}")))?;
    let not_after_unix_ms = parsed.validity().not_after.timestamp().saturating_mul(1000);
    Ok(pb::CertificateResponse {
        cert_pem,
        ca_pem: app.ca.cert_pem().to_owned(),
        identity: identity.to_string(),
        not_after_unix_ms,
    })
}

fn cert_response(
    app: &App,
    identity: &Identity,
    issued: crate::pki::Issued,
) -> pb::CertificateResponse {
    pb::CertificateResponse {
        cert_pem: issued.cert_pem,
        ca_pem: app.ca.cert_pem().to_owned(),
        identity: identity.to_string(),
        not_after_unix_ms: issued.not_after_unix_ms,
    }
}

fn pki_status(e: PkiError) -> Status {
    match e {
        PkiError::BadCsr(m) => invalid("csr_pem", &m),
        e @ PkiError::BadName(_) => invalid("csr_pem", &e.to_string()),
        other => Status::internal(other.to_string()),
    }
}

impl PkiService {
    /// The used-token path without a write: the stored certificate when `spki` is the key it
    /// was issued for and the token has not expired.
    async fn replay(&self, hash: String, spki: String, now: i64) -> Result<Enrolled, Status> {
        self.0
            .store
            .read(move |conn| {
                let row = conn
                    .prepare_cached(
                        "SELECT expires_unix_ms, issued_spki_sha256, issued_cert_pem \
                         FROM enrollment_tokens WHERE hash = ?1",
                    )?
                    .query_row(params![hash], |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, Option<String>>(1)?,
                            r.get::<_, Option<String>>(2)?,
                        ))
                    })
                    .optional()?;
                Ok(match row {
                    None => Enrolled::Unknown,
                    Some((expires, Some(k), Some(pem))) if k == spki && expires > now => {
                        Enrolled::Replayed(pem)
                    }
                    Some(_) => Enrolled::AlreadyUsed,
                })
            })
            .await
            .map_err(store_status)
    }

    /// The authoritative check, the signature and the durable record in ONE transaction: the
    /// token is spent only together with the stored certificate (the mirror may be stale only
    /// in the direction of refusing less, never of granting more).
    async fn enroll_txn(
        &self,
        p: &Principal,
        hash: String,
        now: i64,
        csr_pem: String,
        csr: crate::pki::CsrInfo,
    ) -> Result<Enrolled, Status> {
        let app = self.0.clone();
        let caller = p.name();
        self.0
            .store
            .write(move |conn, ctx| {
                let row = conn
                    .prepare_cached(
                        "SELECT tenant, role, agent_uuid, relay_region, relay_id, expires_unix_ms, \
                         used_at_unix_ms, issued_spki_sha256, issued_cert_pem \
                         FROM enrollment_tokens WHERE hash = ?1",
                    )?
                    .query_row(params![hash], |r| {
                        Ok((
                            TokenRow {
                                tenant: r.get(0)?,
                                role: r.get(1)?,
                                agent_uuid: r.get(2)?,
                                relay_region: r.get(3)?,
                                relay_id: r.get(4)?,
                            },
                            r.get::<_, i64>(5)?,
                            r.get::<_, Option<i64>>(6)?,
                            r.get::<_, Option<String>>(7)?,
                            r.get::<_, Option<String>>(8)?,
                        ))
                    })
                    .optional()?;
                let Some((row, expires, used, spki, pem)) = row else {
                    return Ok(Enrolled::Unknown);
                };
                if expires <= now {
                    return Ok(Enrolled::Expired);
                }
                if used.is_some() {
                    return Ok(match (spki, pem) {
                        (Some(k), Some(pem)) if k == csr.spki_sha256 => Enrolled::Replayed(pem),
                        _ => Enrolled::AlreadyUsed,
                    });
                }
                let identity = match token_identity(&row) {
                    Ok(i) => i,
                    Err(why) => return Ok(Enrolled::Damaged(why)),
                };
                if app.is_revoked(&identity.to_string()) {
                    return Ok(Enrolled::Revoked(identity));
                }
                let (names, profile) = match identity {
                    Identity::Relay { .. } => (csr.names.clone(), LeafProfile::ClientServer),
                    _ => (Vec::new(), LeafProfile::Client),
                };
                let issued = match app.ca.issue_from_csr(
                    &csr_pem,
                    &identity,
                    &names,
                    profile,
                    app.settings.leaf_lifetime_s,
                    OffsetDateTime::now_utc(),
                ) {
                    Ok(i) => i,
                    // Nothing written: the token stays unspent.
                    Err(e) => return Ok(Enrolled::Refused(e)),
                };
                let uri = identity.to_string();
                conn.prepare_cached(
                    "UPDATE enrollment_tokens SET used_at_unix_ms = ?1, issued_spki_sha256 = ?2, \
                     issued_cert_pem = ?3 WHERE hash = ?4",
                )?
                .execute(params![now, csr.spki_sha256, issued.cert_pem, hash])?;
                record_issued(conn, &uri, &issued)?;
                if matches!(identity, Identity::Relay { .. }) {
                    conn.prepare_cached(
                        "INSERT OR REPLACE INTO relay_names (uri, names) VALUES (?1, ?2)",
                    )?
                    .execute(params![uri, names.join(" ")])?;
                }
                let tenant = identity
                    .tenant()
                    .map(Label::to_string)
                    .unwrap_or_else(|| SYSTEM_TENANT.to_owned());
                let ev = App::admin_event(
                    &tenant,
                    audit::kind::ENROLL,
                    &caller,
                    &uri,
                    "Pki.Enroll",
                    &format!("issued serial {}", issued.serial_hex),
                );
                audit::append(conn, &mut ctx.audit, &ev)?;
                Ok(Enrolled::Issued(identity, issued))
            })
            .await
            .map_err(store_status)
    }

    /// The names a relay enrolled with (empty for an unknown relay or an agent).
    async fn names_of(&self, identity: &Identity) -> Result<Vec<String>, Status> {
        if !matches!(identity, Identity::Relay { .. }) {
            return Ok(Vec::new());
        }
        let uri = identity.to_string();
        self.0
            .store
            .read(move |conn| {
                let names: Option<String> = conn
                    .prepare_cached("SELECT names FROM relay_names WHERE uri = ?1")?
                    .query_row(params![uri], |r| r.get(0))
                    .optional()?;
                Ok(names
                    .map(|n| n.split_whitespace().map(str::to_owned).collect())
                    .unwrap_or_default())
            })
            .await
            .map_err(store_status)
    }

    /// Signs, records the issued serial and audits; used by Renew (Enroll signs inside its
    /// transaction).
    async fn issue(
        &self,
        p: &Principal,
        method: &'static str,
        identity: &Identity,
        names: &[String],
        csr_pem: &str,
    ) -> Result<pb::CertificateResponse, Status> {
        let app = &self.0;
        let profile = match identity {
            Identity::Relay { .. } => LeafProfile::ClientServer,
            _ => LeafProfile::Client,
        };
        let issued = match app.ca.issue_from_csr(
            csr_pem,
            identity,
            names,
            profile,
            app.settings.leaf_lifetime_s,
            OffsetDateTime::now_utc(),
        ) {
            Ok(i) => i,
            Err(e @ PkiError::CsrIdentityMismatch { .. }) => {
                return Err(app.refuse_as(p, Refusal::CsrMismatch, method, &e.to_string()));
            }
            Err(e) => return Err(pki_status(e)),
        };
        let uri = identity.to_string();
        let tenant = identity
            .tenant()
            .map(Label::to_string)
            .unwrap_or_else(|| SYSTEM_TENANT.to_owned());
        let ev = App::admin_event(
            &tenant,
            audit::kind::ENROLL,
            &p.name(),
            &uri,
            method,
            &format!("issued serial {}", issued.serial_hex),
        );
        let record = issued.clone();
        app.store
            .write(move |conn, ctx| {
                record_issued(conn, &uri, &record)?;
                audit::append(conn, &mut ctx.audit, &ev)
            })
            .await
            .map_err(store_status)?;
        metrics::counter!("outrelay_controller_certificates_issued_total", "method" => method)
            .increment(1);
        Ok(cert_response(app, identity, issued))
    }
}

#[tonic::async_trait]
impl pki_server::Pki for PkiService {
    async fn create_enrollment_token(
        &self,
        req: Request<pb::CreateEnrollmentTokenRequest>,
    ) -> Result<Response<pb::CreateEnrollmentTokenResponse>, Status> {
        const M: &str = "Pki.CreateEnrollmentToken";
        let app = &self.0;
        let p = app.authenticate(&req, M)?;
        let r = req.into_inner();
        let role = pb::EnrollRole::try_from(r.role).unwrap_or(pb::EnrollRole::Unspecified);
        let (tenant, role_name, identity) = match role {
            pb::EnrollRole::Agent => {
                let tenant = tenant_arg("tenant", &r.tenant)?;
                app.require_admin_of(&p, M, tenant.as_str())?;
                let uuid =
                    if r.agent_uuid.is_empty() {
                        None
                    } else {
                        Some(AgentUuid::new(&r.agent_uuid).ok_or_else(|| {
                            invalid("agent_uuid", "not a canonical lowercase UUID")
                        })?)
                    };
                let identity = uuid.map(|uuid| Identity::Agent {
                    tenant: tenant.clone(),
                    uuid,
                });
                (tenant.to_string(), "agent", identity)
            }
            pb::EnrollRole::Relay => {
                if !(r.tenant.is_empty() || r.tenant == SYSTEM_TENANT) {
                    return Err(invalid(
                        "tenant",
                        "relay tokens belong to tenant `system` (leave it empty)",
                    ));
                }
                app.require_global_admin(&p, M)?;
                let region = Label::new(&r.relay_region)
                    .ok_or_else(|| invalid("relay_region", "required, a label"))?;
                let id = Label::new(&r.relay_id)
                    .ok_or_else(|| invalid("relay_id", "required, a label"))?;
                (
                    SYSTEM_TENANT.to_owned(),
                    "relay",
                    Some(Identity::Relay { region, id }),
                )
            }
            pb::EnrollRole::Unspecified => return Err(invalid("role", "must be AGENT or RELAY")),
        };
        let ttl_s = if r.ttl_seconds == 0 {
            app.settings.token_default_ttl_s
        } else {
            r.ttl_seconds
        };
        if ttl_s > app.settings.token_max_ttl_s {
            return Err(invalid(
                "ttl_seconds",
                &format!("at most {} seconds", app.settings.token_max_ttl_s),
            ));
        }
        let mut secret = [0u8; TOKEN_SECRET_BYTES];
        getrandom::fill(&mut secret).map_err(|e| Status::internal(format!("getrandom: {e}")))?;
        let secret_hex = hex::encode(secret);
        let fingerprint = app.ca.fingerprint_hex();
        let token = format!("{TOKEN_PREFIX}.{secret_hex}.{fingerprint}");
        let now = now_unix_ms();
        let expires =
            now.saturating_add(i64::try_from(ttl_s.saturating_mul(1000)).unwrap_or(i64::MAX));
        let hash = token_hash(&secret_hex);
        let (agent_uuid, relay_region, relay_id) = match &identity {
            Some(Identity::Agent { uuid, .. }) => (uuid.to_string(), String::new(), String::new()),
            Some(Identity::Relay { region, id }) => {
                (String::new(), region.to_string(), id.to_string())
            }
            _ => (String::new(), String::new(), String::new()),
        };
        let identity_str = identity
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default();
        let ev = App::admin_event(
            &tenant,
            audit::kind::ADMIN,
            &p.name(),
            &identity_str,
            M,
            &format!("{role_name} token, ttl {ttl_s}s"),
        );
        let t2 = tenant.clone();
        let h2 = hash.clone();
        app.store
            .write(move |conn, ctx| {
                conn.prepare_cached(
                    "INSERT INTO enrollment_tokens (hash, tenant, role, agent_uuid, relay_region, \
                     relay_id, created_at_unix_ms, expires_unix_ms, used_at_unix_ms) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, NULL)",
                )?
                .execute(params![
                    h2,
                    t2,
                    role_name,
                    agent_uuid,
                    relay_region,
                    relay_id,
                    now,
                    expires
                ])?;
                audit::append(conn, &mut ctx.audit, &ev)
            })
            .await
            .map_err(store_status)?;
        if let Ok(mut t) = app.tokens.lock() {
            t.insert(
                hash,
                TokenMemo {
                    expires_unix_ms: expires,
                    used: false,
                },
            );
        }
        Ok(Response::new(pb::CreateEnrollmentTokenResponse {
            token,
            expires_unix_ms: expires,
            ca_fingerprint_sha256: fingerprint,
            identity: identity_str,
        }))
    }

    async fn enroll(
        &self,
        req: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::CertificateResponse>, Status> {
        const M: &str = "Pki.Enroll";
        let app = &self.0;
        let p = app.authenticate(&req, M)?;
        let r = req.into_inner();
        let mut parts = r.token.split('.');
        let (Some(TOKEN_PREFIX), Some(secret_hex), Some(fp), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(app.refuse_as(
                &p,
                Refusal::TokenMalformed,
                M,
                "malformed enrollment token",
            ));
        };
        if fp != app.ca.fingerprint_hex() {
            return Err(app.refuse_as(
                &p,
                Refusal::TokenMalformed,
                M,
                "enrollment token was issued by another CA",
            ));
        }
        if r.csr_pem.is_empty() {
            return Err(invalid("csr_pem", "required"));
        }
        let hash = token_hash(secret_hex);
        let now = now_unix_ms();
        // Checked in memory first: a token that cannot succeed never reaches the writer (a
        // used one is answered from a read: the same key gets its certificate again). A CSR
        // that does not parse, or asks for bad names, is refused before the token is touched:
        // it spends nothing.
        let memo = app.tokens.lock().ok().and_then(|t| t.get(&hash).copied());
        let outcome = match memo {
            None => Enrolled::Unknown,
            Some(m) if m.expires_unix_ms <= now => Enrolled::Expired,
            Some(m) => {
                let csr = crate::pki::inspect_csr(&r.csr_pem).map_err(pki_status)?;
                if m.used {
                    self.replay(hash.clone(), csr.spki_sha256, now).await?
                } else {
                    self.enroll_txn(&p, hash.clone(), now, r.csr_pem, csr)
                        .await?
                }
            }
        };
        if matches!(
            outcome,
            Enrolled::Issued(..) | Enrolled::Replayed(_) | Enrolled::AlreadyUsed
        ) && let Ok(mut t) = app.tokens.lock()
            && let Some(m) = t.get_mut(&hash)
        {
            m.used = true;
        }
        match outcome {
            Enrolled::Issued(identity, issued) => {
                metrics::counter!("outrelay_controller_certificates_issued_total", "method" => M)
                    .increment(1);
                Ok(Response::new(cert_response(app, &identity, issued)))
            }
            Enrolled::Replayed(pem) => {
                metrics::counter!("outrelay_controller_enroll_replays_total").increment(1);
                Ok(Response::new(replayed_response(app, pem)?))
            }
            Enrolled::Unknown => {
                Err(app.refuse_as(&p, Refusal::TokenUnknown, M, "unknown enrollment token"))
            }
            Enrolled::AlreadyUsed => Err(app.refuse_as(
                &p,
                Refusal::TokenUsed,
                M,
                "enrollment token already used (by another key)",
            )),
            Enrolled::Expired => {
                Err(app.refuse_as(&p, Refusal::TokenExpired, M, "enrollment token expired"))
            }
            Enrolled::Revoked(identity) => {
                Err(app.refuse(&p, M, &format!("identity {identity} is revoked")))
            }
            Enrolled::Refused(e @ PkiError::CsrIdentityMismatch { .. }) => {
                Err(app.refuse_as(&p, Refusal::CsrMismatch, M, &e.to_string()))
            }
            Enrolled::Refused(e) => Err(pki_status(e)),
            Enrolled::Damaged(why) => Err(Status::internal(why)),
        }
    }

    async fn renew(
        &self,
        req: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::CertificateResponse>, Status> {
        const M: &str = "Pki.Renew";
        let app = &self.0;
        let p = app.authenticate(&req, M)?;
        let identity = match &p {
            Principal::Agent(id) => id.clone(),
            Principal::Relay { region, id, .. } => Identity::Relay {
                region: region.clone(),
                id: id.clone(),
            },
            _ => return Err(app.refuse(&p, M, "only agents and relays renew their certificates")),
        };
        let csr = req.into_inner().csr_pem;
        if csr.is_empty() {
            return Err(invalid("csr_pem", "required"));
        }
        if !app.take_renew_token(&identity.to_string(), std::time::Instant::now()) {
            let refused = app.refuse_as(
                &p,
                Refusal::RenewRateLimited,
                M,
                "renewing too often (pki.renew_burst / pki.renew_refill_ms)",
            );
            return Err(Status::resource_exhausted(refused.message().to_owned()));
        }
        let names = self.names_of(&identity).await?;
        let resp = self.issue(&p, M, &identity, &names, &csr).await?;
        Ok(Response::new(resp))
    }

    async fn revoke(
        &self,
        req: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        const M: &str = "Pki.Revoke";
        let app = &self.0;
        let p = app.authenticate(&req, M)?;
        let uri = req.into_inner().uri;
        let identity = Identity::parse(&uri).map_err(|e| invalid("uri", &e.to_string()))?;
        let tenant = match &identity {
            Identity::Agent { tenant, .. } => {
                app.require_admin_of(&p, M, tenant.as_str())?;
                tenant.to_string()
            }
            _ => {
                app.require_global_admin(&p, M)?;
                SYSTEM_TENANT.to_owned()
            }
        };
        let now = now_unix_ms();
        let ev = App::admin_event(&tenant, audit::kind::ADMIN, &p.name(), &uri, M, "revoked");
        let (u2, t2) = (uri.clone(), tenant.clone());
        let newly = app
            .store
            .write(move |conn, ctx| {
                let n = conn
                    .prepare_cached("INSERT OR IGNORE INTO revocations (uri, tenant, revoked_at_unix_ms) VALUES (?1, ?2, ?3)")?
                    .execute(params![u2, t2, now])?;
                if n > 0 {
                    audit::append(conn, &mut ctx.audit, &ev)?;
                }
                Ok(n > 0)
            })
            .await
            .map_err(store_status)?;
        if newly {
            metrics::counter!("outrelay_controller_revocations_total").increment(1);
            app.revocations.publish(|r| {
                r.insert(uri.clone(), now);
                vec![pb::RevocationEvent {
                    kind: revocation_event::Kind::Revoked as i32,
                    uri: uri.clone(),
                    revoked_at_unix_ms: now,
                }]
            });
        }
        Ok(Response::new(pb::RevokeResponse {
            newly_revoked: newly,
        }))
    }

    async fn ca_bundle(
        &self,
        req: Request<pb::CaBundleRequest>,
    ) -> Result<Response<pb::CaBundleResponse>, Status> {
        const M: &str = "Pki.CaBundle";
        let app = &self.0;
        let p = app.authenticate(&req, M)?;
        if matches!(p, Principal::Anonymous(_)) {
            return Err(app.refuse(&p, M, "requires a client certificate"));
        }
        Ok(Response::new(pb::CaBundleResponse {
            ca_pem: app.ca.cert_pem().to_owned(),
            ca_fingerprint_sha256: app.ca.fingerprint_hex(),
        }))
    }

    type WatchRevocationsStream = WatchStream<pb::RevocationEvent, pb::RevocationEvent>;

    async fn watch_revocations(
        &self,
        req: Request<pb::WatchRevocationsRequest>,
    ) -> Result<Response<Self::WatchRevocationsStream>, Status> {
        const M: &str = "Pki.WatchRevocations";
        let app = &self.0;
        let p = app.authenticate(&req, M)?;
        let expires = crate::grpc::cert_not_after(&req);
        if !matches!(p, Principal::Relay { .. }) {
            app.require_global_admin(&p, M)?;
        }
        let sub = app.revocations.subscribe(
            |r| {
                r.iter()
                    .map(|(uri, at)| pb::RevocationEvent {
                        kind: revocation_event::Kind::Revoked as i32,
                        uri: uri.clone(),
                        revoked_at_unix_ms: *at,
                    })
                    .collect()
            },
            |_| true,
        );
        let end = pb::RevocationEvent {
            kind: revocation_event::Kind::SnapshotEnd as i32,
            uri: String::new(),
            revoked_at_unix_ms: 0,
        };
        Ok(Response::new(
            sub.into_stream(end, |e| e)
                .until(app.watch_end(&p, expires)),
        ))
    }
}
