//! Policy rule evaluation: which rule decides whether `caller` may call `method` on `target`.
//!
//! Precedence is deterministic, so every relay reaches the same decision from the same
//! snapshot:
//! 1. only rules of the caller's tenant that are not expired (`expires_unix_ms == 0` or
//!    `> now`) and whose three patterns match are considered;
//! 2. rules whose target pattern has no `*` (exact-target) beat wildcard-target rules;
//! 3. within the same class DENY beats ALLOW;
//! 4. then the oldest rule wins (`created_at_unix_ms`, ties broken by the smaller id).
//!
//! No matching rule means DENY ("closed world"). Patterns are globs where `*` matches any run
//! of characters (including none); a pattern without `*` must equal the input; an empty method
//! pattern matches every method. Rules with a decision other than ALLOW or DENY never match
//! (the controller refuses to store them).

use crate::pb::{Decision, PolicyRule};

/// The outcome of [`evaluate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict<'a> {
    /// True when the deciding rule allows the call.
    pub allow: bool,
    /// The deciding rule, or `None` when no rule matched (closed world: deny).
    pub rule: Option<&'a PolicyRule>,
}

/// Decides one call against `rules` (any order; the evaluator never depends on it).
///
/// `now_unix_ms` is the current time, used only to skip expired rules.
pub fn evaluate<'a>(
    rules: &'a [PolicyRule],
    tenant: &str,
    caller: &str,
    target: &str,
    method: &str,
    now_unix_ms: i64,
) -> Verdict<'a> {
    let best = rules
        .iter()
        .filter(|r| rule_matches(r, tenant, caller, target, method, now_unix_ms))
        .min_by(|a, b| precedence_key(a).cmp(&precedence_key(b)));
    match best {
        Some(rule) => Verdict {
            allow: rule.decision == Decision::Allow as i32,
            rule: Some(rule),
        },
        None => Verdict {
            allow: false,
            rule: None,
        },
    }
}

/// True when `rule` applies to this call at `now_unix_ms` (tenant, expiry, decision and the
/// three patterns).
pub fn rule_matches(
    rule: &PolicyRule,
    tenant: &str,
    caller: &str,
    target: &str,
    method: &str,
    now_unix_ms: i64,
) -> bool {
    rule.tenant == tenant
        && (rule.decision == Decision::Allow as i32 || rule.decision == Decision::Deny as i32)
        && (rule.expires_unix_ms == 0 || rule.expires_unix_ms > now_unix_ms)
        && glob_match(&rule.caller_pattern, caller)
        && glob_match(&rule.target_pattern, target)
        && (rule.method_pattern.is_empty() || glob_match(&rule.method_pattern, method))
}

/// Matches `text` against `pattern`, where `*` matches any run of bytes and every other byte
/// matches itself. Linear-time in practice (greedy with one backtrack point), no allocation.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0usize, 0usize);
    // Position of the last `*` seen in the pattern and the text position it is matched up to.
    let mut backtrack: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            backtrack = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((star_pi, star_ti)) = backtrack {
            // Let the last `*` swallow one more byte and retry from just after it.
            pi = star_pi + 1;
            ti = star_ti + 1;
            backtrack = Some((star_pi, star_ti + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Smaller sorts first = wins: (wildcard target?, allow?, created, id).
fn precedence_key(rule: &PolicyRule) -> (bool, bool, i64, &str) {
    (
        rule.target_pattern.contains('*'),
        rule.decision != Decision::Deny as i32,
        rule.created_at_unix_ms,
        rule.id.as_str(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rule(id: &str, target: &str, decision: Decision, created: i64) -> PolicyRule {
        PolicyRule {
            id: id.to_owned(),
            tenant: "acme".to_owned(),
            caller_pattern: "*".to_owned(),
            target_pattern: target.to_owned(),
            method_pattern: String::new(),
            decision: decision as i32,
            expires_unix_ms: 0,
            created_at_unix_ms: created,
            p2p_mode: 0,
            relay_mode: 0,
        }
    }

    #[test]
    fn glob_examples() {
        assert!(glob_match("*", ""));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("db", "db"));
        assert!(!glob_match("db", "db2"));
        assert!(glob_match("db*", "db2"));
        assert!(glob_match("*.prod", "api.prod"));
        assert!(!glob_match("*.prod", "api.prod.x"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxbyy"));
        assert!(glob_match("a**c", "ac"));
        assert!(!glob_match("", "x"));
        assert!(glob_match("", ""));
    }

    #[test]
    fn closed_world_and_precedence() {
        let now = 1_000;
        assert!(!evaluate(&[], "acme", "c", "db", "m", now).allow);
        // Exact-target ALLOW beats an older wildcard DENY.
        let rules = [
            rule("w", "*", Decision::Deny, 1),
            rule("e", "db", Decision::Allow, 2),
        ];
        let v = evaluate(&rules, "acme", "c", "db", "m", now);
        assert!(v.allow);
        assert_eq!(v.rule.map(|r| r.id.as_str()), Some("e"));
        // Within one class DENY beats an older ALLOW.
        let rules = [
            rule("a", "db", Decision::Allow, 1),
            rule("d", "db", Decision::Deny, 5),
        ];
        assert!(!evaluate(&rules, "acme", "c", "db", "m", now).allow);
        // Same class and decision: the oldest wins.
        let rules = [
            rule("new", "db", Decision::Allow, 9),
            rule("old", "db", Decision::Allow, 3),
        ];
        let v = evaluate(&rules, "acme", "c", "db", "m", now);
        assert_eq!(v.rule.map(|r| r.id.as_str()), Some("old"));
        // Another tenant's rule never matches.
        assert!(!evaluate(&rules, "other", "c", "db", "m", now).allow);
        // Expired rules never match.
        let mut expired = rule("x", "db", Decision::Allow, 1);
        expired.expires_unix_ms = now;
        assert!(!evaluate(&[expired], "acme", "c", "db", "m", now).allow);
    }

    /// Obviously-correct reference: recursive glob, and the precedence spelled out as the
    /// spec words it, one step at a time.
    fn ref_glob(p: &[u8], t: &[u8]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some((b'*', rest)) => (0..=t.len()).any(|i| ref_glob(rest, &t[i..])),
            Some((c, rest)) => t.first() == Some(c) && ref_glob(rest, &t[1..]),
        }
    }

    fn ref_evaluate(
        rules: &[PolicyRule],
        tenant: &str,
        caller: &str,
        target: &str,
        method: &str,
        now: i64,
    ) -> Option<String> {
        let matching: Vec<&PolicyRule> = rules
            .iter()
            .filter(|r| r.tenant == tenant)
            .filter(|r| r.decision == 1 || r.decision == 2)
            .filter(|r| r.expires_unix_ms == 0 || r.expires_unix_ms > now)
            .filter(|r| ref_glob(r.caller_pattern.as_bytes(), caller.as_bytes()))
            .filter(|r| ref_glob(r.target_pattern.as_bytes(), target.as_bytes()))
            .filter(|r| {
                r.method_pattern.is_empty()
                    || ref_glob(r.method_pattern.as_bytes(), method.as_bytes())
            })
            .collect();
        for exact_class in [true, false] {
            let class: Vec<&&PolicyRule> = matching
                .iter()
                .filter(|r| r.target_pattern.contains('*') != exact_class)
                .collect();
            for decision in [2, 1] {
                let mut same: Vec<&&&PolicyRule> =
                    class.iter().filter(|r| r.decision == decision).collect();
                same.sort_by(|a, b| {
                    (a.created_at_unix_ms, &a.id).cmp(&(b.created_at_unix_ms, &b.id))
                });
                if let Some(first) = same.first() {
                    return Some(first.id.clone());
                }
            }
        }
        None
    }

    fn small_pattern() -> impl Strategy<Value = String> {
        proptest::string::string_regex("[ab*]{0,4}").expect("regex")
    }

    fn small_text() -> impl Strategy<Value = String> {
        proptest::string::string_regex("[ab]{0,4}").expect("regex")
    }

    fn arb_rule() -> impl Strategy<Value = PolicyRule> {
        (
            prop_oneof![Just("acme"), Just("other")],
            small_pattern(),
            small_pattern(),
            small_pattern(),
            0i32..4,
            prop_oneof![Just(0i64), 0i64..20],
            0i64..5,
        )
            .prop_map(
                |(tenant, caller, target, method, decision, expires, created)| PolicyRule {
                    id: String::new(),
                    tenant: tenant.to_owned(),
                    caller_pattern: caller,
                    target_pattern: target,
                    method_pattern: method,
                    decision,
                    expires_unix_ms: expires,
                    created_at_unix_ms: created,
                    p2p_mode: 0,
                    relay_mode: 0,
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn glob_agrees_with_reference(p in small_pattern(), t in small_text()) {
            prop_assert_eq!(glob_match(&p, &t), ref_glob(p.as_bytes(), t.as_bytes()));
        }

        #[test]
        fn evaluate_agrees_with_reference(
            mut rules in proptest::collection::vec(arb_rule(), 0..8),
            caller in small_text(),
            target in small_text(),
            method in small_text(),
            now in 0i64..20,
            reverse in any::<bool>(),
        ) {
            for (i, r) in rules.iter_mut().enumerate() {
                r.id = format!("r{i}");
            }
            if reverse {
                rules.reverse();
            }
            let got = evaluate(&rules, "acme", &caller, &target, &method, now);
            let want = ref_evaluate(&rules, "acme", &caller, &target, &method, now);
            prop_assert_eq!(got.rule.map(|r| r.id.clone()), want.clone());
            let want_allow = want
                .and_then(|id| rules.iter().find(|r| r.id == id))
                .is_some_and(|r| r.decision == Decision::Allow as i32);
            prop_assert_eq!(got.allow, want_allow);
        }
    }
}
