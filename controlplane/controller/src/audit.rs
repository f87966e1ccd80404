//! The append-only, tamper-evident audit log.
//!
//! Every row stores `mac = HMAC-SHA256(key, prev_mac || encode(row))`, where `prev_mac` is the
//! previous row's MAC (32 zero bytes for the first row) and `encode` is a length-prefixed
//! encoding of every field including the row's sequence number. The key lives in a file in the
//! state directory (mode 0600), never in the database, so someone who can edit the database
//! but not read the key cannot forge a consistent chain. [`verify`] recomputes the chain and
//! reports the head MAC and row count; an operator records those elsewhere to also detect
//! truncation of the tail.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use hmac::{KeyInit, Mac};
use outrelay_api::pb::{AuditEvent, Decision};
use rusqlite::{Connection, params};
use sha2::Sha256;

use crate::store::StoreError;

type HmacSha256 = hmac::Hmac<Sha256>;

/// Length of the audit key and of each MAC, in bytes.
pub const AUDIT_MAC_BYTES: usize = 32;

/// How a decision is stored and chained: the text `allow` or `deny`. The wire carries Go's
/// `Decision` enum; the table and the MAC keep the text, as rows written before the enum have it.
pub fn decision_text(decision: i32) -> &'static str {
    match Decision::try_from(decision) {
        Ok(Decision::Allow) => "allow",
        Ok(Decision::Deny) => "deny",
        _ => "",
    }
}

/// The enum of a stored decision text (anything else is `UNSPECIFIED`).
pub fn decision_of_text(text: &str) -> Decision {
    match text {
        "allow" => Decision::Allow,
        "deny" => Decision::Deny,
        _ => Decision::Unspecified,
    }
}

/// Audit event kinds written by the controller itself.
pub mod kind {
    /// A data-path decision recorded by a relay.
    pub const STREAM: &str = "stream";
    /// An admin change (policy, revocation, lease decision, quota, token).
    pub const ADMIN: &str = "admin";
    /// An enrollment or renewal.
    pub const ENROLL: &str = "enroll";
    /// A refused call or TLS handshake.
    pub const AUTH: &str = "auth";
    /// A lease report.
    pub const LEASE: &str = "lease";
}

/// Why the audit key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum AuditKeyError {
    /// Reading or creating the key file failed.
    #[error("audit key file {path}: {source}")]
    Io {
        /// The key file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The key file does not hold exactly 32 bytes.
    #[error("audit key file {0} must hold exactly 32 bytes")]
    BadLength(String),
    /// The key file is readable by group or others.
    #[error("audit key file {0} is readable by group or others (want mode 0600)")]
    BadMode(String),
}

/// The chain's head as the writer thread tracks it.
#[derive(Debug, Clone)]
pub struct ChainHead {
    key: [u8; AUDIT_MAC_BYTES],
    /// MAC of the last row (zeros when empty).
    pub last_mac: [u8; AUDIT_MAC_BYTES],
    /// Number of rows (= seq of the last row).
    pub count: u64,
}

/// The result of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Rows checked.
    pub row_count: u64,
    /// MAC of the last row, hex.
    pub head_mac_hex: String,
    /// The first row whose MAC or sequence number is wrong, if any.
    pub first_bad_seq: Option<u64>,
}

/// Loads the key from `path`, creating a random one (mode 0600) when the file is missing.
///
/// # Errors
/// I/O errors, a wrong length, or a key file readable by group or others.
pub fn load_or_create_key(path: &Path) -> Result<[u8; AUDIT_MAC_BYTES], AuditKeyError> {
    let name = path.display().to_string();
    let io = |source| AuditKeyError::Io {
        path: name.clone(),
        source,
    };
    match std::fs::read(path) {
        Ok(bytes) => {
            let mode = std::fs::metadata(path).map_err(io)?.permissions().mode();
            if mode & 0o077 != 0 {
                return Err(AuditKeyError::BadMode(name));
            }
            <[u8; AUDIT_MAC_BYTES]>::try_from(bytes.as_slice())
                .map_err(|_| AuditKeyError::BadLength(name))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = [0u8; AUDIT_MAC_BYTES];
            getrandom::fill(&mut key)
                .map_err(|e| io(std::io::Error::other(format!("getrandom: {e}"))))?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io)?;
            f.write_all(&key).map_err(io)?;
            f.sync_all().map_err(io)?;
            Ok(key)
        }
        Err(e) => Err(io(e)),
    }
}

/// Reads the last row's MAC and the row count at open.
///
/// # Errors
/// SQLite errors, or a last row whose MAC is not 32 bytes.
pub fn load_head(conn: &Connection, key: [u8; AUDIT_MAC_BYTES]) -> Result<ChainHead, StoreError> {
    let last: Option<(i64, Vec<u8>)> = conn
        .query_row(
            "SELECT seq, mac FROM audit ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            other => Err(other),
        })?;
    let (count, last_mac) = match last {
        None => (0, [0u8; AUDIT_MAC_BYTES]),
        Some((seq, mac)) => (
            u64::try_from(seq).map_err(|_| StoreError::Audit(format!("negative seq {seq}")))?,
            <[u8; AUDIT_MAC_BYTES]>::try_from(mac.as_slice())
                .map_err(|_| StoreError::Audit(format!("row {seq}: MAC is not 32 bytes")))?,
        ),
    };
    Ok(ChainHead {
        key,
        last_mac,
        count,
    })
}

/// Appends `ev` to the chain inside the writer's transaction and returns its sequence number.
/// `ev.seq` is ignored; an empty `ev.kind` is stored as `stream`.
///
/// # Errors
/// SQLite errors (the caller's savepoint is then rolled back, and so is `head`).
pub fn append(conn: &Connection, head: &mut ChainHead, ev: &AuditEvent) -> Result<u64, StoreError> {
    let mut ev = ev.clone();
    if ev.kind.is_empty() {
        ev.kind = kind::STREAM.to_owned();
    }
    let seq = head.count + 1;
    ev.seq = seq;
    let mac = row_mac(&head.key, &head.last_mac, &ev);
    conn.prepare_cached(
        "INSERT INTO audit (seq, ts_unix_ms, tenant, kind, caller, target, method, decision, \
         reason, stream_id, mac) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?
    .execute(params![
        i64::try_from(seq).map_err(|_| StoreError::Audit("seq overflow".to_owned()))?,
        ev.ts_unix_ms,
        ev.tenant,
        ev.kind,
        ev.caller,
        ev.target,
        ev.method,
        decision_text(ev.decision),
        ev.reason,
        ev.stream_id,
        mac.as_slice(),
    ])?;
    head.count = seq;
    head.last_mac = mac;
    Ok(seq)
}

/// Recomputes the whole chain with `key`.
///
/// # Errors
/// SQLite errors only; a broken chain is reported in [`VerifyReport::first_bad_seq`].
pub fn verify(conn: &Connection, key: &[u8; AUDIT_MAC_BYTES]) -> Result<VerifyReport, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT seq, ts_unix_ms, tenant, kind, caller, target, method, decision, reason, \
         stream_id, mac FROM audit ORDER BY seq ASC",
    )?;
    let mut rows = stmt.query([])?;
    let mut prev = [0u8; AUDIT_MAC_BYTES];
    let mut count = 0u64;
    let mut first_bad = None;
    while let Some(r) = rows.next()? {
        let ev = row_to_event(r)?;
        let stored: Vec<u8> = r.get(10)?;
        count += 1;
        let expected = row_mac(key, &prev, &ev);
        if first_bad.is_none() && (ev.seq != count || stored.as_slice() != expected.as_slice()) {
            first_bad = Some(ev.seq);
        }
        // Continue the chain from the stored MAC so later rows are judged on their own.
        prev = <[u8; AUDIT_MAC_BYTES]>::try_from(stored.as_slice()).unwrap_or(expected);
    }
    Ok(VerifyReport {
        row_count: count,
        head_mac_hex: hex::encode(prev),
        first_bad_seq: first_bad,
    })
}

/// Filters for [`query`]; empty strings and zeros match everything.
#[derive(Debug, Clone, Default)]
pub struct QueryFilter {
    /// Only this tenant (`None`: every tenant, global admins only).
    pub tenant: Option<String>,
    /// Only this caller.
    pub caller: String,
    /// Only this target.
    pub target: String,
    /// Only rows at or after this time.
    pub since_unix_ms: i64,
    /// At most this many rows.
    pub limit: u32,
}

/// Rows matching `f`, newest first.
///
/// # Errors
/// SQLite errors.
pub fn query(conn: &Connection, f: &QueryFilter) -> Result<Vec<AuditEvent>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, ts_unix_ms, tenant, kind, caller, target, method, decision, reason, \
         stream_id FROM audit WHERE (?1 IS NULL OR tenant = ?1) AND (?2 = '' OR caller = ?2) \
         AND (?3 = '' OR target = ?3) AND ts_unix_ms >= ?4 ORDER BY seq DESC LIMIT ?5",
    )?;
    let rows = stmt.query_map(
        params![f.tenant, f.caller, f.target, f.since_unix_ms, f.limit],
        row_to_event,
    )?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

fn row_to_event(r: &rusqlite::Row<'_>) -> rusqlite::Result<AuditEvent> {
    let seq: i64 = r.get(0)?;
    let decision: String = r.get(7)?;
    Ok(AuditEvent {
        seq: u64::try_from(seq).unwrap_or(0),
        ts_unix_ms: r.get(1)?,
        tenant: r.get(2)?,
        kind: r.get(3)?,
        caller: r.get(4)?,
        target: r.get(5)?,
        method: r.get(6)?,
        decision: decision_of_text(&decision) as i32,
        reason: r.get(8)?,
        stream_id: r.get(9)?,
    })
}

fn row_mac(
    key: &[u8; AUDIT_MAC_BYTES],
    prev: &[u8; AUDIT_MAC_BYTES],
    ev: &AuditEvent,
) -> [u8; AUDIT_MAC_BYTES] {
    let mut mac = match <HmacSha256 as KeyInit>::new_from_slice(key) {
        Ok(m) => m,
        // HMAC accepts keys of any length.
        Err(_) => return [0u8; AUDIT_MAC_BYTES],
    };
    mac.update(prev);
    mac.update(&ev.seq.to_be_bytes());
    mac.update(&ev.ts_unix_ms.to_be_bytes());
    for field in [
        ev.tenant.as_str(),
        &ev.kind,
        &ev.caller,
        &ev.target,
        &ev.method,
        decision_text(ev.decision),
        &ev.reason,
        &ev.stream_id,
    ] {
        mac.update(&u64::try_from(field.len()).unwrap_or(u64::MAX).to_be_bytes());
        mac.update(field.as_bytes());
    }
    mac.finalize().into_bytes().into()
}

/// Sets a file's permissions to 0600 (used for key files created elsewhere).
///
/// # Errors
/// I/O errors.
pub fn restrict_to_owner(path: &Path) -> std::io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

/// The Audit service.
#[derive(Clone)]
pub struct AuditService(pub std::sync::Arc<crate::app::App>);

/// Kinds only the controller writes; relays may not record them.
const CONTROLLER_KINDS: [&str; 3] = [kind::ADMIN, kind::ENROLL, kind::AUTH];

/// Most rows one Query returns.
pub const MAX_QUERY_ROWS: u32 = 10_000;
/// Longest `caller`, `target`, `method`, `reason` or `stream_id` of a recorded
/// event, in bytes (a relay's row over it is refused INVALID_ARGUMENT, which relays treat as
/// permanent: the row is dropped and counted there, never retried).
pub const MAX_AUDIT_FIELD_BYTES: usize = 4096;
/// Longest `kind` of a recorded event, in bytes.
pub const MAX_AUDIT_KIND_BYTES: usize = 32;

/// Refuses an event with a field over its bound, naming the field.
fn bounded(ev: &AuditEvent) -> Result<(), tonic::Status> {
    if ev.kind.len() > MAX_AUDIT_KIND_BYTES {
        return Err(crate::grpc::invalid("event.kind", "at most 32 bytes"));
    }
    if decision_text(ev.decision).is_empty() {
        return Err(crate::grpc::invalid(
            "event.decision",
            "must be ALLOW or DENY",
        ));
    }
    for (name, v) in [
        ("event.caller", &ev.caller),
        ("event.target", &ev.target),
        ("event.method", &ev.method),
        ("event.reason", &ev.reason),
        ("event.stream_id", &ev.stream_id),
    ] {
        if v.len() > MAX_AUDIT_FIELD_BYTES {
            return Err(crate::grpc::invalid(name, "at most 4096 bytes"));
        }
    }
    Ok(())
}

#[tonic::async_trait]
impl outrelay_api::pb::audit_server::Audit for AuditService {
    async fn record(
        &self,
        req: tonic::Request<outrelay_api::pb::RecordRequest>,
    ) -> Result<tonic::Response<outrelay_api::pb::RecordResponse>, tonic::Status> {
        const M: &str = "Audit.Record";
        let app = &self.0;
        let p = app.authenticate(&req, M)?;
        app.require_relay(&p, M)?;
        let mut ev = req
            .into_inner()
            .event
            .ok_or_else(|| crate::grpc::invalid("event", "required"))?;
        bounded(&ev)?;
        if CONTROLLER_KINDS.contains(&ev.kind.as_str()) {
            return Err(crate::grpc::invalid(
                "event.kind",
                "reserved for the controller",
            ));
        }
        if !ev.tenant.is_empty() {
            crate::grpc::tenant_arg("event.tenant", &ev.tenant)?;
        }
        if ev.ts_unix_ms == 0 {
            ev.ts_unix_ms = crate::app::now_unix_ms();
        }
        app.store
            .write(move |conn, ctx| append(conn, &mut ctx.audit, &ev))
            .await
            .map_err(crate::grpc::store_status)?;
        metrics::counter!("outrelay_controller_audit_records_total").increment(1);
        Ok(tonic::Response::new(outrelay_api::pb::RecordResponse {}))
    }

    type QueryStream =
        tokio_stream::Iter<std::vec::IntoIter<Result<outrelay_api::pb::AuditEvent, tonic::Status>>>;

    async fn query(
        &self,
        req: tonic::Request<outrelay_api::pb::QueryRequest>,
    ) -> Result<tonic::Response<Self::QueryStream>, tonic::Status> {
        const M: &str = "Audit.Query";
        let app = &self.0;
        let p = app.authenticate(&req, M)?;
        let r = req.into_inner();
        let tenant = if r.tenant.is_empty() {
            app.require_global_admin(&p, M)?;
            None
        } else {
            app.require_admin_of(&p, M, &r.tenant)?;
            Some(r.tenant)
        };
        let filter = QueryFilter {
            tenant,
            caller: r.caller,
            target: r.target,
            since_unix_ms: r.since_unix_ms,
            limit: if r.limit == 0 {
                100
            } else {
                r.limit.min(MAX_QUERY_ROWS)
            },
        };
        let rows = app
            .store
            .read(move |conn| query(conn, &filter))
            .await
            .map_err(crate::grpc::store_status)?;
        Ok(tonic::Response::new(tokio_stream::iter(
            rows.into_iter().map(Ok).collect::<Vec<_>>(),
        )))
    }

    async fn verify(
        &self,
        req: tonic::Request<outrelay_api::pb::VerifyRequest>,
    ) -> Result<tonic::Response<outrelay_api::pb::VerifyResponse>, tonic::Status> {
        const M: &str = "Audit.Verify";
        let app = &self.0;
        let p = app.authenticate(&req, M)?;
        app.require_global_admin(&p, M)?;
        let key = app.audit_key;
        let report = app
            .store
            .read(move |conn| verify(conn, &key))
            .await
            .map_err(crate::grpc::store_status)?;
        Ok(tonic::Response::new(outrelay_api::pb::VerifyResponse {
            ok: report.first_bad_seq.is_none(),
            row_count: report.row_count,
            head_mac_hex: report.head_mac_hex,
            first_bad_seq: report.first_bad_seq.unwrap_or(0),
            error: report
                .first_bad_seq
                .map(|s| format!("audit row {s} does not verify (modified, inserted or reordered)"))
                .unwrap_or_default(),
        }))
    }
}
