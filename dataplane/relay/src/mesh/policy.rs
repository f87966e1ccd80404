//! The relay's policy snapshot: every tenant's rules (from `Policy.Watch`, or the static
//! `[[policy]]` rules of a standalone relay), evaluated with [`outrelay_api::policy::evaluate`],
//! with a bounded decision cache that lives inside the snapshot, so swapping the snapshot is the
//! cache flush the spec asks for on every policy event.
//!
//! Rules whose method pattern is exactly [`PROVIDE_METHOD`] are provide rules: they say which
//! identity may provide (REGISTER) which service ([`PolicySnapshot::provide`]) and never take
//! part in a stream decision, so granting a provider never lets anyone call anything.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use outrelay_api::pb::{Decision, PolicyRule};
use outrelay_api::policy::{evaluate, glob_match};

/// The reserved method of a provide rule: `caller` = the provider's identity URI (glob),
/// `target` = the service name (glob). Only rules with exactly this method pattern are provide
/// rules; a rule with an empty or `*` method is a stream rule only.
pub const PROVIDE_METHOD: &str = "@provide";

/// What the tenant's provide rules say about one identity registering one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProvideVerdict {
    /// A provide rule allows it: it may join the providers of a service another identity holds.
    Allowed {
        /// The deciding rule.
        rule_id: String,
    },
    /// A provide rule denies it.
    Denied {
        /// The deciding rule.
        rule_id: String,
    },
    /// No provide rule names this identity, but an allowing one names the service: only the
    /// identities such rules allow may provide it.
    NotAllowed,
    /// No provide rule concerns this service: the first identity to register it holds it.
    Unruled,
}

/// One decision and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// True when allowed.
    pub allow: bool,
    /// The deciding rule's id; `None`: no rule matched.
    pub rule_id: Option<String>,
    /// When the deciding rule expires (unix ms; 0 = never or no rule): a live stream allowed by
    /// it is checked again then.
    pub rule_expires_unix_ms: i64,
    /// The deciding rule says `P2P_FORBIDDEN` (no rule: P2P allowed, Go's default).
    pub p2p_forbidden: bool,
}

impl Verdict {
    /// `rule <id>` or `no matching rule` (the audit reason and the 403 text).
    pub fn reason(&self) -> String {
        match &self.rule_id {
            Some(id) => format!("rule {id}"),
            None => "no matching rule".to_owned(),
        }
    }
}

/// Key of one cached caller-side decision: (tenant, caller, target, method).
type CacheKey = (String, String, String, String);

/// All rules of every tenant, as one immutable value, plus its decision cache.
#[derive(Debug)]
pub struct PolicySnapshot {
    /// Stream rules.
    by_tenant: HashMap<String, Vec<PolicyRule>>,
    /// Provide rules (method pattern [`PROVIDE_METHOD`]).
    provide_by_tenant: HashMap<String, Vec<PolicyRule>>,
    /// Per tenant, the earliest future expiry among its rules (cache entries never outlive it).
    next_expiry_unix_ms: HashMap<String, i64>,
    cache: Mutex<HashMap<CacheKey, (Verdict, Instant)>>,
    cache_max: usize,
    cache_ttl: Duration,
}

impl PolicySnapshot {
    /// A snapshot of `rules` (any order) with a cache of at most `cache_max` decisions, each
    /// kept at most `cache_ttl`.
    pub fn new(rules: Vec<PolicyRule>, cache_max: usize, cache_ttl: Duration) -> PolicySnapshot {
        let mut by_tenant: HashMap<String, Vec<PolicyRule>> = HashMap::new();
        let mut provide_by_tenant: HashMap<String, Vec<PolicyRule>> = HashMap::new();
        for rule in rules {
            let map = if rule.method_pattern == PROVIDE_METHOD {
                &mut provide_by_tenant
            } else {
                &mut by_tenant
            };
            map.entry(rule.tenant.clone()).or_default().push(rule);
        }
        PolicySnapshot {
            by_tenant,
            provide_by_tenant,
            next_expiry_unix_ms: HashMap::new(),
            cache: Mutex::new(HashMap::new()),
            cache_max,
            cache_ttl,
        }
        .with_expiries()
    }

    fn with_expiries(mut self) -> PolicySnapshot {
        self.next_expiry_unix_ms = self
            .by_tenant
            .iter()
            .filter_map(|(t, rules)| {
                let min = rules
                    .iter()
                    .map(|r| r.expires_unix_ms)
                    .filter(|&e| e > 0)
                    .min()?;
                Some((t.clone(), min))
            })
            .collect();
        self
    }

    /// Every rule, in no particular order (the controller task edits a copy).
    pub fn rules(&self) -> impl Iterator<Item = &PolicyRule> {
        self.by_tenant
            .values()
            .flatten()
            .chain(self.provide_by_tenant.values().flatten())
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.rules().count()
    }

    /// True when there is no rule at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Evaluates without the cache (live streams re-checked after a change).
    pub fn evaluate(
        &self,
        tenant: &str,
        caller: &str,
        target: &str,
        method: &str,
        now_unix_ms: i64,
    ) -> Verdict {
        let rules = self.by_tenant.get(tenant).map_or(&[][..], Vec::as_slice);
        let v = evaluate(rules, tenant, caller, target, method, now_unix_ms);
        Verdict {
            allow: v.allow,
            rule_id: v.rule.map(|r| r.id.clone()),
            rule_expires_unix_ms: v.rule.map_or(0, |r| r.expires_unix_ms),
            p2p_forbidden: v
                .rule
                .is_some_and(|r| r.p2p_mode == outrelay_api::pb::P2pMode::P2pForbidden as i32),
        }
    }

    /// The caller-side decision (closed world), from the cache when it holds a fresh one.
    /// The cache is bounded: when full it is cleared (cheap, and a policy event clears it
    /// anyway).
    pub fn caller_side(
        &self,
        tenant: &str,
        caller: &str,
        target: &str,
        method: &str,
        now_unix_ms: i64,
    ) -> Verdict {
        if self.cache_max == 0 {
            return self.evaluate(tenant, caller, target, method, now_unix_ms);
        }
        let key = (
            tenant.to_owned(),
            caller.to_owned(),
            target.to_owned(),
            method.to_owned(),
        );
        let now = Instant::now();
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((v, until)) = cache.get(&key)
            && *until > now
        {
            return v.clone();
        }
        let v = self.evaluate(tenant, caller, target, method, now_unix_ms);
        // Never past the next expiry of one of the tenant's rules: it may change the answer.
        let mut ttl = self.cache_ttl;
        if let Some(&exp) = self.next_expiry_unix_ms.get(tenant) {
            let left = u64::try_from(exp.saturating_sub(now_unix_ms)).unwrap_or(0);
            ttl = ttl.min(Duration::from_millis(left));
        }
        if cache.len() >= self.cache_max {
            cache.clear();
        }
        cache.insert(key, (v.clone(), now + ttl));
        v
    }

    /// The callee-side decision: only an explicit matching DENY refuses.
    pub fn callee_side(
        &self,
        tenant: &str,
        provider: &str,
        consumer: &str,
        method: &str,
        now_unix_ms: i64,
    ) -> Verdict {
        let v = self.evaluate(tenant, provider, consumer, method, now_unix_ms);
        if v.rule_id.is_none() {
            return Verdict {
                allow: true,
                rule_id: None,
                rule_expires_unix_ms: 0,
                p2p_forbidden: false,
            };
        }
        v
    }

    /// May `provider` (an identity URI) provide `service` in `tenant`? The provide rules are
    /// evaluated like stream rules (exact target first, then DENY, then the oldest); with no
    /// rule for this identity, a service that some unexpired ALLOW provide rule targets is
    /// closed to it ([`ProvideVerdict::NotAllowed`]).
    pub fn provide(
        &self,
        tenant: &str,
        provider: &str,
        service: &str,
        now_unix_ms: i64,
    ) -> ProvideVerdict {
        let rules = self
            .provide_by_tenant
            .get(tenant)
            .map_or(&[][..], Vec::as_slice);
        let v = evaluate(
            rules,
            tenant,
            provider,
            service,
            PROVIDE_METHOD,
            now_unix_ms,
        );
        match v.rule {
            Some(r) if v.allow => ProvideVerdict::Allowed {
                rule_id: r.id.clone(),
            },
            Some(r) => ProvideVerdict::Denied {
                rule_id: r.id.clone(),
            },
            None if rules.iter().any(|r| {
                r.decision == Decision::Allow as i32
                    && (r.expires_unix_ms == 0 || r.expires_unix_ms > now_unix_ms)
                    && glob_match(&r.target_pattern, service)
            }) =>
            {
                ProvideVerdict::NotAllowed
            }
            None => ProvideVerdict::Unruled,
        }
    }

    /// Decisions held in the cache (tests).
    pub fn cached(&self) -> usize {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }
}

/// One `[[policy]]` rule of a standalone relay's config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticRule {
    /// The tenant.
    pub tenant: String,
    /// Glob on the caller.
    pub caller: String,
    /// Glob on the target.
    pub target: String,
    /// Glob on the method ("" = any).
    pub method: String,
    /// Allow or deny.
    pub allow: bool,
}

impl StaticRule {
    /// The rule as the evaluator sees it; `index` is its position in the file (its id and its
    /// age: earlier rules are older).
    pub fn to_rule(&self, index: usize) -> PolicyRule {
        PolicyRule {
            id: format!("static-{index}"),
            tenant: self.tenant.clone(),
            caller_pattern: self.caller.clone(),
            target_pattern: self.target.clone(),
            method_pattern: self.method.clone(),
            decision: if self.allow {
                Decision::Allow as i32
            } else {
                Decision::Deny as i32
            },
            expires_unix_ms: 0,
            created_at_unix_ms: i64::try_from(index).unwrap_or(i64::MAX),
            ..PolicyRule::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "outrelay://a/agent/00000000-0000-4000-8000-000000000001";
    const B: &str = "outrelay://a/agent/00000000-0000-4000-8000-000000000002";

    fn rule(id: &str, tenant: &str, caller: &str, target: &str, allow: bool) -> PolicyRule {
        PolicyRule {
            id: id.into(),
            tenant: tenant.into(),
            caller_pattern: caller.into(),
            target_pattern: target.into(),
            decision: if allow {
                Decision::Allow as i32
            } else {
                Decision::Deny as i32
            },
            ..PolicyRule::default()
        }
    }

    fn snap(rules: Vec<PolicyRule>) -> PolicySnapshot {
        PolicySnapshot::new(rules, 16, Duration::from_secs(5))
    }

    #[test]
    fn closed_world_and_exact_deny_beats_wildcard_allow() {
        let s = snap(vec![]);
        let v = s.caller_side("a", A, "pay", "", 0);
        assert!(!v.allow);
        assert_eq!(v.reason(), "no matching rule");
        let s = snap(vec![
            rule("allow-all", "a", "*", "*", true),
            rule("deny-pay", "a", A, "pay", false),
        ]);
        assert!(!s.caller_side("a", A, "pay", "", 0).allow);
        assert!(s.caller_side("a", B, "pay", "", 0).allow);
        assert!(s.caller_side("a", A, "other", "", 0).allow);
    }

    #[test]
    fn rules_never_match_another_tenant() {
        let s = snap(vec![rule("r", "a", "*", "*", true)]);
        assert!(
            !s.caller_side("b", "outrelay://b/agent/x", "pay", "", 0)
                .allow
        );
    }

    #[test]
    fn callee_side_refuses_only_on_an_explicit_deny() {
        let s = snap(vec![rule("allow", "a", "*", "pay", true)]);
        assert!(s.callee_side("a", B, A, "", 0).allow);
        let s = snap(vec![rule("deny-a", "a", B, A, false)]);
        let v = s.callee_side("a", B, A, "", 0);
        assert!(!v.allow);
        assert_eq!(v.reason(), "rule deny-a");
    }

    fn provide(id: &str, caller: &str, target: &str, allow: bool) -> PolicyRule {
        PolicyRule {
            method_pattern: PROVIDE_METHOD.into(),
            ..rule(id, "a", caller, target, allow)
        }
    }

    #[test]
    fn provide_rules_decide_who_provides_and_never_decide_a_stream() {
        // A stream allow-all (any method) says nothing about providing.
        let s = snap(vec![rule("all", "a", "*", "*", true)]);
        assert_eq!(s.provide("a", A, "pay", 0), ProvideVerdict::Unruled);
        let s = snap(vec![
            provide("p-a", A, "pay", true),
            provide("no-b", B, "other", false),
        ]);
        assert_eq!(
            s.provide("a", A, "pay", 0),
            ProvideVerdict::Allowed {
                rule_id: "p-a".into()
            }
        );
        // `pay` is pinned by an allowing rule: B may not provide it.
        assert_eq!(s.provide("a", B, "pay", 0), ProvideVerdict::NotAllowed);
        assert_eq!(
            s.provide("a", B, "other", 0),
            ProvideVerdict::Denied {
                rule_id: "no-b".into()
            }
        );
        // A deny alone pins nothing for the others.
        assert_eq!(s.provide("a", A, "other", 0), ProvideVerdict::Unruled);
        // Another tenant's services are not concerned.
        assert_eq!(s.provide("b", B, "pay", 0), ProvideVerdict::Unruled);
        // A provide rule never allows a stream, even one claiming the reserved method.
        assert!(!s.caller_side("a", A, "pay", PROVIDE_METHOD, 0).allow);
        assert!(s.callee_side("a", B, A, "", 0).allow);
        assert_eq!(s.len(), 2);
        // An expired allowing rule pins nothing.
        let mut r = provide("old", A, "pay", true);
        r.expires_unix_ms = 10;
        let s = snap(vec![r]);
        assert_eq!(s.provide("a", B, "pay", 10), ProvideVerdict::Unruled);
    }

    #[test]
    fn cached_decisions_never_outlive_a_rule_expiry() {
        let mut r = rule("short", "a", "*", "pay", true);
        r.expires_unix_ms = 1_000;
        let s = snap(vec![r]);
        assert!(s.caller_side("a", A, "pay", "", 999).allow);
        // The entry was cached for at most 1 ms; after expiry the answer changes.
        std::thread::sleep(Duration::from_millis(5));
        assert!(!s.caller_side("a", A, "pay", "", 1_000).allow);
    }

    #[test]
    fn the_cache_is_bounded() {
        let s = PolicySnapshot::new(
            vec![rule("r", "a", "*", "*", true)],
            4,
            Duration::from_secs(5),
        );
        for i in 0..10 {
            s.caller_side("a", A, &format!("svc{i}"), "", 0);
        }
        assert!(s.cached() <= 4);
    }

    #[test]
    fn static_rules_are_ordered_by_position() {
        let deny = StaticRule {
            tenant: "a".into(),
            caller: "*".into(),
            target: "*".into(),
            method: String::new(),
            allow: false,
        };
        let allow = StaticRule {
            allow: true,
            ..deny.clone()
        };
        let s = snap(vec![allow.to_rule(0), deny.to_rule(1)]);
        // Same class: DENY beats ALLOW regardless of age.
        assert!(!s.caller_side("a", A, "pay", "", 0).allow);
    }
}
