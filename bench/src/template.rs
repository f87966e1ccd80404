//! `{{name}}` substitution for the peer config templates in `bench/templates/`.
//!
//! Deliberately strict: a placeholder without a value and a value without a placeholder are
//! both errors, so a typo in a template or in a target never yields a silently wrong config.

use anyhow::{Result, bail};

/// Replaces every `{{name}}` in `template` with its value from `vars`.
///
/// Errors on an unclosed `{{`, on a placeholder with no value, and on a value never used.
pub fn render(template: &str, vars: &[(&str, &str)]) -> Result<String> {
    let mut out = String::with_capacity(template.len());
    let mut used = vec![false; vars.len()];
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let Some(close) = after.find("}}") else {
            bail!("unclosed '{{{{' in template");
        };
        let name = after[..close].trim();
        let Some(i) = vars.iter().position(|(k, _)| *k == name) else {
            bail!("template placeholder {{{{{name}}}}} has no value");
        };
        used[i] = true;
        out.push_str(vars[i].1);
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    if let Some(i) = used.iter().position(|u| !u) {
        bail!("value {:?} is not used by the template", vars[i].0);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_replaced_and_single_braces_kept() {
        let t = "bind {{ front }}\nuse_backend b if { req.ssl_sni -i {{sni}} }\n";
        let got = render(
            t,
            &[("front", "127.0.0.1:1"), ("sni", "demo.outrelay.test")],
        )
        .expect("all placeholders have values");
        assert_eq!(
            got,
            "bind 127.0.0.1:1\nuse_backend b if { req.ssl_sni -i demo.outrelay.test }\n"
        );
    }

    #[test]
    fn a_placeholder_may_repeat() {
        assert_eq!(render("{{a}}-{{a}}", &[("a", "x")]).expect("valid"), "x-x");
    }

    #[test]
    fn missing_value_unused_value_and_unclosed_are_errors() {
        assert!(render("{{a}}", &[]).is_err());
        assert!(render("plain", &[("a", "x")]).is_err());
        assert!(render("{{a", &[("a", "x")]).is_err());
    }

    #[test]
    fn every_shipped_template_renders_with_its_target_values() {
        // The targets render these at run time; a broken template must fail here, not mid-run.
        for (name, text, vars) in crate::target::template_examples() {
            render(text, &vars).unwrap_or_else(|e| panic!("template {name}: {e}"));
        }
    }
}
