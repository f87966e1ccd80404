//! Refusals (failed TLS handshakes, refused RPCs, refused connections): counted always, audited
//! aggregated.
//!
//! Every refusal increments `outrelay_controller_refusals_total{reason}`. Audit rows are written
//! at most once per (tenant, caller, method, reason) key per `audit.refusal_interval_ms`: the
//! first refusal of a key writes its row at once, later ones only count, and the count is
//! written as one row when the window is over (by the next refusal or by [`RefusalAudit::flush`]).
//! So an unauthenticated flood costs at most one durable row per source and reason per
//! interval, whatever its rate. The `warn!` log line is emitted with the row, never per event.
//! The key map is bounded (`audit.refusal_keys_max`); keys beyond it share one overflow key.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use outrelay_api::pb;
use outrelay_proto::identity::SYSTEM_TENANT;
use tokio::sync::mpsc;

use crate::app::now_unix_ms;
use crate::audit;

/// Longest tenant, caller, method or reason kept in a key or row, in bytes.
pub const MAX_KEY_FIELD_BYTES: usize = 256;

/// Why something was refused: the `reason` label of `outrelay_controller_refusals_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// A TLS handshake failed or timed out.
    TlsHandshake,
    /// A Unix-socket peer that is neither root nor in the admin group.
    UnixNotAdmin,
    /// A verified certificate without an acceptable identity.
    BadIdentity,
    /// A revoked identity.
    Revoked,
    /// An authenticated caller without the right role or tenant.
    NotAuthorized,
    /// An anonymous caller asking for anything but `Pki.Enroll`.
    Anonymous,
    /// An anonymous source beyond `grpc.anonymous_rpcs_per_source_per_s`.
    AnonymousRate,
    /// An enrollment token that is malformed or from another CA.
    TokenMalformed,
    /// An enrollment token the controller never issued (or pruned).
    TokenUnknown,
    /// An enrollment token already consumed.
    TokenUsed,
    /// An enrollment token past its expiry.
    TokenExpired,
    /// A CSR naming another identity.
    CsrMismatch,
    /// `Pki.Renew` beyond the identity's token bucket.
    RenewRateLimited,
    /// A TCP connection beyond `grpc.max_connections`.
    MaxConnections,
    /// A TCP connection beyond `grpc.max_connections_per_source`.
    SourceConnections,
    /// A TCP connection beyond `grpc.new_connections_per_source_per_s`.
    SourceRate,
    /// A TCP connection accepted on the reserve descriptor and closed (open-files limit).
    FdExhausted,
    /// An anonymous connection beyond `grpc.max_anonymous_connections`.
    AnonymousConnections,
    /// An anonymous connection closed by `grpc.anonymous_idle_timeout_ms`.
    AnonymousIdle,
    /// An anonymous connection closed by `grpc.anonymous_max_age_ms`.
    AnonymousMaxAge,
    /// A request message larger than `grpc.max_message_bytes`.
    MessageTooLarge,
    /// A service registration beyond `registry.max_services_per_agent`.
    ServicesPerAgent,
}

impl Refusal {
    /// Every reason, for HELP texts and tests.
    pub const ALL: [Refusal; 22] = [
        Refusal::TlsHandshake,
        Refusal::UnixNotAdmin,
        Refusal::BadIdentity,
        Refusal::Revoked,
        Refusal::NotAuthorized,
        Refusal::Anonymous,
        Refusal::AnonymousRate,
        Refusal::TokenMalformed,
        Refusal::TokenUnknown,
        Refusal::TokenUsed,
        Refusal::TokenExpired,
        Refusal::CsrMismatch,
        Refusal::RenewRateLimited,
        Refusal::MaxConnections,
        Refusal::SourceConnections,
        Refusal::SourceRate,
        Refusal::FdExhausted,
        Refusal::AnonymousConnections,
        Refusal::AnonymousIdle,
        Refusal::AnonymousMaxAge,
        Refusal::MessageTooLarge,
        Refusal::ServicesPerAgent,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::TlsHandshake => "tls_handshake",
            Refusal::UnixNotAdmin => "unix_not_admin",
            Refusal::BadIdentity => "bad_identity",
            Refusal::Revoked => "revoked",
            Refusal::NotAuthorized => "not_authorized",
            Refusal::Anonymous => "anonymous",
            Refusal::AnonymousRate => "anonymous_rate",
            Refusal::TokenMalformed => "token_malformed",
            Refusal::TokenUnknown => "token_unknown",
            Refusal::TokenUsed => "token_used",
            Refusal::TokenExpired => "token_expired",
            Refusal::CsrMismatch => "csr_mismatch",
            Refusal::RenewRateLimited => "renew_rate_limited",
            Refusal::MaxConnections => "max_connections",
            Refusal::SourceConnections => "source_connections",
            Refusal::SourceRate => "source_rate",
            Refusal::FdExhausted => "fd_exhausted",
            Refusal::AnonymousConnections => "anonymous_connections",
            Refusal::AnonymousIdle => "anonymous_idle",
            Refusal::AnonymousMaxAge => "anonymous_max_age",
            Refusal::MessageTooLarge => "message_too_large",
            Refusal::ServicesPerAgent => "services_per_agent",
        }
    }

    /// Counts one refusal (no audit row).
    pub fn count(self) {
        metrics::counter!("outrelay_controller_refusals_total", "reason" => self.as_str())
            .increment(1);
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    tenant: String,
    caller: String,
    method: String,
    reason: String,
}

#[derive(Debug)]
struct Window {
    /// When this key last wrote a row.
    last_row: Instant,
    /// Refusals since that row.
    pending: u64,
}

/// The aggregator. Cheap to call from any task; its lock is never held across I/O.
pub struct RefusalAudit {
    interval: Duration,
    keys_max: usize,
    windows: Mutex<HashMap<Key, Window>>,
    rows: mpsc::Sender<pb::AuditEvent>,
}

impl RefusalAudit {
    /// An aggregator writing at most one row per key per `interval`, tracking at most
    /// `keys_max` keys, handing rows to `rows` (a full queue drops and counts).
    pub fn new(
        interval: Duration,
        keys_max: usize,
        rows: mpsc::Sender<pb::AuditEvent>,
    ) -> RefusalAudit {
        RefusalAudit {
            interval,
            keys_max: keys_max.max(1),
            windows: Mutex::new(HashMap::new()),
            rows,
        }
    }

    /// Counts one refusal and writes (queues) a row when its key's window allows one.
    pub fn record(
        &self,
        now: Instant,
        why: Refusal,
        tenant: &str,
        caller: &str,
        method: &str,
        reason: &str,
    ) {
        why.count();
        let mut key = Key {
            tenant: clip(tenant),
            caller: clip(caller),
            method: clip(method),
            reason: clip(reason),
        };
        let row = {
            let Ok(mut w) = self.windows.lock() else {
                return;
            };
            if !w.contains_key(&key) && w.len() >= self.keys_max {
                metrics::counter!("outrelay_controller_refusal_audit_overflow_total").increment(1);
                key = Key {
                    tenant: SYSTEM_TENANT.to_owned(),
                    caller: "*".to_owned(),
                    method: "*".to_owned(),
                    reason: "refusals beyond audit.refusal_keys_max sources".to_owned(),
                };
            }
            match w.get_mut(&key) {
                None => {
                    w.insert(
                        key.clone(),
                        Window {
                            last_row: now,
                            pending: 0,
                        },
                    );
                    Some(1)
                }
                Some(win) => {
                    win.pending += 1;
                    if now.saturating_duration_since(win.last_row) >= self.interval {
                        let n = win.pending;
                        win.pending = 0;
                        win.last_row = now;
                        Some(n)
                    } else {
                        None
                    }
                }
            }
        };
        if let Some(n) = row {
            self.emit(&key, n);
        }
    }

    /// Writes the counts of windows that are over and forgets quiet keys. Called periodically.
    pub fn flush(&self, now: Instant) {
        let due: Vec<(Key, u64)> = {
            let Ok(mut w) = self.windows.lock() else {
                return;
            };
            let mut due = Vec::new();
            w.retain(|k, win| {
                if now.saturating_duration_since(win.last_row) < self.interval {
                    return true;
                }
                if win.pending == 0 {
                    return false;
                }
                due.push((k.clone(), win.pending));
                win.pending = 0;
                win.last_row = now;
                true
            });
            due
        };
        for (k, n) in due {
            self.emit(&k, n);
        }
    }

    /// Keys tracked now.
    pub fn keys(&self) -> usize {
        self.windows.lock().map(|w| w.len()).unwrap_or(0)
    }

    fn emit(&self, k: &Key, n: u64) {
        let reason = if n == 1 {
            k.reason.clone()
        } else {
            format!(
                "{} ({n} refusals in {} ms)",
                k.reason,
                self.interval.as_millis()
            )
        };
        tracing::warn!(caller = %k.caller, method = %k.method, reason = %reason, "refused");
        let ev = pb::AuditEvent {
            ts_unix_ms: now_unix_ms(),
            tenant: k.tenant.clone(),
            caller: k.caller.clone(),
            target: String::new(),
            method: k.method.clone(),
            decision: outrelay_api::pb::Decision::Deny as i32,
            reason,
            stream_id: String::new(),
            kind: audit::kind::AUTH.to_owned(),
            seq: 0,
        };
        metrics::counter!("outrelay_controller_refusal_audit_rows_total").increment(1);
        if self.rows.try_send(ev).is_err() {
            metrics::counter!("outrelay_controller_audit_dropped_total", "reason" => "security_queue_full")
                .increment(1);
        }
    }
}

/// `s` cut to [`MAX_KEY_FIELD_BYTES`] on a character boundary.
fn clip(s: &str) -> String {
    if s.len() <= MAX_KEY_FIELD_BYTES {
        return s.to_owned();
    }
    let mut end = MAX_KEY_FIELD_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agg(keys_max: usize) -> (RefusalAudit, mpsc::Receiver<pb::AuditEvent>) {
        let (tx, rx) = mpsc::channel(1024);
        (RefusalAudit::new(Duration::from_secs(60), keys_max, tx), rx)
    }

    fn drain(rx: &mut mpsc::Receiver<pb::AuditEvent>) -> Vec<pb::AuditEvent> {
        let mut v = Vec::new();
        while let Ok(ev) = rx.try_recv() {
            v.push(ev);
        }
        v
    }

    #[test]
    fn one_row_per_key_per_interval_carrying_the_count() {
        let (a, mut rx) = agg(16);
        let t0 = Instant::now();
        for i in 0..1000u64 {
            a.record(
                t0 + Duration::from_millis(i),
                Refusal::TokenUnknown,
                "system",
                "anonymous@10.0.0.1",
                "Pki.Enroll",
                "unknown enrollment token",
            );
        }
        let rows = drain(&mut rx);
        assert_eq!(
            rows.len(),
            1,
            "first refusal written at once, the rest counted"
        );
        a.flush(t0 + Duration::from_secs(30));
        assert!(drain(&mut rx).is_empty(), "window not over");
        a.flush(t0 + Duration::from_secs(61));
        let rows = drain(&mut rx);
        assert_eq!(rows.len(), 1);
        assert!(
            rows[0].reason.contains("999 refusals"),
            "{}",
            rows[0].reason
        );
        // Quiet for a whole window: forgotten.
        a.flush(t0 + Duration::from_secs(200));
        assert_eq!(a.keys(), 0);
    }

    #[test]
    fn distinct_reasons_and_sources_get_their_own_rows_up_to_the_key_cap() {
        let (a, mut rx) = agg(3);
        let t0 = Instant::now();
        for src in 0..10 {
            a.record(
                t0,
                Refusal::TlsHandshake,
                "system",
                &format!("tcp:10.0.0.{src}"),
                "tls.handshake",
                "bad",
            );
        }
        let rows = drain(&mut rx);
        assert_eq!(rows.len(), 4, "3 keys and the overflow key");
        assert_eq!(a.keys(), 4);
        assert!(rows[3].caller == "*");
    }

    #[test]
    fn every_reason_is_named_in_the_help_text() {
        for r in Refusal::ALL {
            assert!(
                crate::metrics::REFUSALS_HELP.contains(r.as_str()),
                "{} missing from the HELP text",
                r.as_str()
            );
        }
    }

    #[test]
    fn huge_fields_are_clipped() {
        let (a, mut rx) = agg(3);
        a.record(
            Instant::now(),
            Refusal::NotAuthorized,
            "t",
            &"é".repeat(10_000),
            "m",
            &"r".repeat(10_000),
        );
        let rows = drain(&mut rx);
        assert!(rows[0].caller.len() <= MAX_KEY_FIELD_BYTES);
        assert!(rows[0].reason.len() <= MAX_KEY_FIELD_BYTES);
    }
}
