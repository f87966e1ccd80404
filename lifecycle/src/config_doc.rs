//! `docs/config.md` checked against the daemons' raw config structs, so the reference cannot
//! drift: [`keys`] lists every key a raw struct accepts (walked through serde, so `Option`
//! fields, `[[arrays]]` of tables and `Option` tables are all found), [`doc_rows`] reads one
//! daemon's tables from the markdown, and [`check`] compares the two and each documented
//! default with the struct's own ([`default_matches`]). Used by each daemon's config tests;
//! nothing here runs in a daemon.
//!
//! The markdown contract: a `## ` heading naming the daemon (`outrelay-relay`) starts its
//! part; each `### ` heading names a section in backticks (`` `[leases]` ``, `` `[[lease]]` ``;
//! no backticks: the top level); each row is `` | `key` | type | default | limits | reload |
//! meaning | `` with the default either one TOML value in backticks or words (`required`,
//! `none`, ...) for a key without a plain default, and the reload cell one of
//! [`RELOAD_CELLS`].

use std::fmt::Write as _;

use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, Visitor};

/// One key a config file accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    /// Dotted path: `leases.min_port`; entries of `[[lease]]` are `lease.name`.
    pub path: String,
    /// TOML type as the docs write it: `string`, `integer`, `bool`, `float`, `table`,
    /// `array of strings`, ...
    pub ty: String,
    /// The struct gives it a default of its own: not an `Option`, not inside an `Option`
    /// table or an array of tables. Its documented default must be a TOML value and is
    /// always checked.
    pub plain: bool,
}

/// What the "reload" column may say: applied live, or needs a restart or (relay) an upgrade
/// (optionally with the file the key names re-read on SIGHUP, e.g. certificates).
pub const RELOAD_CELLS: [&str; 5] = [
    "live",
    "restart",
    "restart; file re-read",
    "upgrade",
    "upgrade; file re-read",
];

/// One row of docs/config.md.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Dotted path (section heading + key cell).
    pub path: String,
    /// The type cell.
    pub ty: String,
    /// The default cell as written.
    pub default: String,
    /// The reload cell.
    pub reload: String,
    /// 1-based line in the markdown.
    pub line: usize,
}

/// Every key `T` accepts, in declaration order.
///
/// # Errors
/// `T` uses a serde shape this walk does not know (enums, `deserialize_any`).
pub fn keys<T: DeserializeOwned>() -> Result<Vec<Key>, String> {
    let mut out = Vec::new();
    T::deserialize(Tracer {
        path: String::new(),
        out: &mut out,
        plain: true,
        in_seq: false,
    })
    .map_err(|e| e.to_string())?;
    Ok(out)
}

/// The rows of the part of `md` whose `## ` heading contains `daemon`.
pub fn doc_rows(md: &str, daemon: &str) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut inside = false;
    let mut section = String::new();
    for (i, line) in md.lines().enumerate() {
        if let Some(h) = line.strip_prefix("## ") {
            inside = h.contains(daemon);
            section.clear();
            continue;
        }
        if !inside {
            continue;
        }
        if let Some(h) = line.strip_prefix("### ") {
            section = h
                .split('`')
                .nth(1)
                .unwrap_or("")
                .trim_matches(['[', ']'])
                .to_owned();
            continue;
        }
        if !line.starts_with("| `") {
            continue;
        }
        let cells: Vec<&str> = line
            .trim()
            .trim_matches('|')
            .split('|')
            .map(str::trim)
            .collect();
        let key = cells.first().copied().unwrap_or("").trim_matches('`');
        let path = if section.is_empty() {
            key.to_owned()
        } else {
            format!("{section}.{key}")
        };
        rows.push(Row {
            path,
            ty: cells.get(1).copied().unwrap_or("").to_owned(),
            default: cells.get(2).copied().unwrap_or("").to_owned(),
            reload: cells.get(4).copied().unwrap_or("").to_owned(),
            line: i + 1,
        });
    }
    rows
}

/// The TOML value of a default cell: one value in backticks; `None` for words.
///
/// # Errors
/// The cell is in backticks but not one TOML value.
pub fn default_value(cell: &str) -> Result<Option<toml::Value>, String> {
    let Some(inner) = cell.strip_prefix('`').and_then(|c| c.strip_suffix('`')) else {
        return Ok(None);
    };
    if inner.contains('`') {
        return Ok(None);
    }
    let t: toml::Table =
        toml::from_str(&format!("v = {inner}")).map_err(|e| e.message().to_owned())?;
    Ok(t.get("v").cloned())
}

/// Every difference between the daemon's accepted `keys` and its part of `md`, one line each
/// saying what to do. `is_default(path, value)` says whether `value` is the struct's default
/// of `path` (`None`: this daemon cannot tell, allowed only for keys that are not
/// [`Key::plain`]). The reload cell must be one of [`RELOAD_CELLS`], `live` exactly for the
/// keys [`crate::applied_live`] names. Empty: the docs match.
pub fn check(
    md: &str,
    daemon: &str,
    keys: &[Key],
    is_default: impl Fn(&str, &toml::Value) -> Option<bool>,
) -> Vec<String> {
    check_with(md, daemon, keys, is_default, crate::key_reload)
}

/// [`check`] for a daemon whose keys `classify` sorts (the relay): the reload cell says
/// `live`, `restart…` or `upgrade…` as `classify` does.
pub fn check_with(
    md: &str,
    daemon: &str,
    keys: &[Key],
    is_default: impl Fn(&str, &toml::Value) -> Option<bool>,
    classify: fn(&str) -> crate::KeyReload,
) -> Vec<String> {
    let rows = doc_rows(md, daemon);
    let mut problems = Vec::new();
    let mut say = |s: String| problems.push(format!("docs/config.md ({daemon}): {s}"));
    if rows.is_empty() {
        say(format!(
            "no `## ` heading naming {daemon} with key tables: add its part"
        ));
    }
    for k in keys {
        if !rows.iter().any(|r| r.path == k.path) {
            let place = match k.path.rsplit_once('.') {
                Some((section, key)) => {
                    format!("a row `{key}` to the table of section `{section}`")
                }
                None => format!("a row `{}` to the top-level table", k.path),
            };
            say(format!(
                "`{}` ({}) is accepted by the config but not documented: add {place}",
                k.path, k.ty
            ));
        }
    }
    for (n, r) in rows.iter().enumerate() {
        let at = format!("line {}: `{}`", r.line, r.path);
        if rows[..n].iter().any(|o| o.path == r.path) {
            say(format!("{at} is documented twice: remove one row"));
        }
        let Some(k) = keys.iter().find(|k| k.path == r.path) else {
            say(format!(
                "{at} is documented but the config does not accept it: remove the row or fix \
                 the key's name or section"
            ));
            continue;
        };
        let (want, fits) = match classify(&r.path) {
            crate::KeyReload::Live => ("live", r.reload == "live"),
            crate::KeyReload::Restart => (
                "restart (or `restart; file re-read`)",
                r.reload.starts_with("restart"),
            ),
            crate::KeyReload::Upgrade => (
                "upgrade (or `upgrade; file re-read`)",
                r.reload.starts_with("upgrade"),
            ),
        };
        if !RELOAD_CELLS.contains(&r.reload.as_str()) || !fits {
            say(format!(
                "{at}: reload column says `{}`, but SIGHUP (Reloader::reload) makes it {want}: \
                 fix the column",
                r.reload
            ));
        }
        if r.ty != k.ty {
            say(format!(
                "{at}: type column says `{}`, the config reads `{}`: fix the type",
                r.ty, k.ty
            ));
        }
        match default_value(&r.default) {
            Err(e) => say(format!(
                "{at}: default `{}` is not one TOML value ({e}): write the value in backticks",
                r.default
            )),
            Ok(None) if k.plain => say(format!(
                "{at}: default `{}` must be the struct's default as one TOML value in backticks",
                r.default
            )),
            Ok(None) => {}
            Ok(Some(v)) => match is_default(&k.path, &v) {
                Some(true) => {}
                Some(false) => say(format!(
                    "{at}: documented default {v} is not the struct's default: fix the default \
                     column (or the code, if the docs are right)"
                )),
                None if k.plain => say(format!(
                    "{at}: the test cannot tell this key's default: make is_default know it"
                )),
                None => {}
            },
        }
    }
    problems
}

/// Whether setting `path = value` in `context` (a file whose parse is the defaults: `""`, or
/// the required keys of an array entry such as `[[lease]]\nname = "x"\n`) parses into the same
/// `T` (compared through `Debug`) as `context` alone. A value that does not parse is not the
/// default (`Some(false)`); `None` when `context` itself does not parse.
pub fn default_matches<T: DeserializeOwned + std::fmt::Debug>(
    path: &str,
    value: &toml::Value,
    context: &str,
) -> Option<bool> {
    let base: T = toml::from_str(context).ok()?;
    let set: T = match toml::from_str(&with_key(context, path, value)) {
        Ok(t) => t,
        Err(_) => return Some(false),
    };
    Some(format!("{base:?}") == format!("{set:?}"))
}

/// `context` (a TOML file, possibly `""`) with `path = value` added: a top-level key goes
/// first; with an empty `context` a section's key gets its `[section]` header; otherwise the
/// key goes last (`context` must end in the key's section, e.g. an array entry).
pub fn with_key(context: &str, path: &str, value: &toml::Value) -> String {
    let (section, leaf) = path.rsplit_once('.').unwrap_or(("", path));
    let mut line = String::new();
    let _ = writeln!(line, "{leaf} = {value}");
    if section.is_empty() {
        format!("{line}{context}")
    } else if context.is_empty() {
        format!("[{section}]\n{line}")
    } else {
        format!("{context}{line}")
    }
}

/// A serde deserializer that produces a value of every field it is asked for (zeros and empty
/// strings, one element per array) and records the key paths on the way.
struct Tracer<'a> {
    path: String,
    out: &'a mut Vec<Key>,
    plain: bool,
    in_seq: bool,
}

impl Tracer<'_> {
    fn record(&mut self, ty: &str) {
        let ty = if self.in_seq {
            format!("array of {ty}s")
        } else {
            ty.to_owned()
        };
        self.out.push(Key {
            path: self.path.clone(),
            ty,
            plain: self.plain,
        });
    }
}

type Error = de::value::Error;

macro_rules! leaf {
    ($($method:ident: $ty:literal => $visit:ident($v:expr)),* $(,)?) => {
        $(fn $method<V: Visitor<'de>>(mut self, visitor: V) -> Result<V::Value, Error> {
            self.record($ty);
            visitor.$visit($v)
        })*
    };
}

impl<'de> de::Deserializer<'de> for Tracer<'_> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Error> {
        Err(de::Error::custom(format!(
            "{}: a self-describing field: list its keys by hand",
            self.path
        )))
    }

    leaf! {
        deserialize_bool: "bool" => visit_bool(false),
        deserialize_i8: "integer" => visit_i64(0),
        deserialize_i16: "integer" => visit_i64(0),
        deserialize_i32: "integer" => visit_i64(0),
        deserialize_i64: "integer" => visit_i64(0),
        deserialize_u8: "integer" => visit_u64(0),
        deserialize_u16: "integer" => visit_u64(0),
        deserialize_u32: "integer" => visit_u64(0),
        deserialize_u64: "integer" => visit_u64(0),
        deserialize_f32: "float" => visit_f64(0.0),
        deserialize_f64: "float" => visit_f64(0.0),
        deserialize_char: "string" => visit_char('x'),
        deserialize_str: "string" => visit_str(""),
        deserialize_string: "string" => visit_str(""),
        deserialize_bytes: "string" => visit_str(""),
        deserialize_byte_buf: "string" => visit_str(""),
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_some(Tracer {
            plain: false,
            ..self
        })
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_seq(OneElement {
            tracer: Some(Tracer {
                plain: false,
                in_seq: true,
                ..self
            }),
        })
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _: usize, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: usize,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_seq(visitor)
    }

    /// A map with keys of the user's choosing (`methods = { charge = "..." }`): one key.
    fn deserialize_map<V: Visitor<'de>>(mut self, visitor: V) -> Result<V::Value, Error> {
        self.record("table");
        visitor.visit_map(de::value::MapDeserializer::<_, Error>::new(
            std::iter::empty::<(&str, &str)>(),
        ))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_map(Fields {
            fields,
            next: 0,
            prefix: self.path,
            out: self.out,
            plain: self.plain,
        })
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Error> {
        Err(de::Error::custom(format!(
            "{}: an enum field: list its keys by hand",
            self.path
        )))
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }
}

/// A struct's fields, each traced under its own path.
struct Fields<'a> {
    fields: &'static [&'static str],
    next: usize,
    prefix: String,
    out: &'a mut Vec<Key>,
    plain: bool,
}

impl<'de> de::MapAccess<'de> for Fields<'_> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        let Some(name) = self.fields.get(self.next) else {
            return Ok(None);
        };
        seed.deserialize((*name).into_deserializer()).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let name = self.fields.get(self.next).copied().unwrap_or("");
        self.next += 1;
        let path = if self.prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.prefix)
        };
        seed.deserialize(Tracer {
            path,
            out: &mut *self.out,
            plain: self.plain,
            in_seq: false,
        })
    }
}

/// An array with one traced element.
struct OneElement<'a> {
    tracer: Option<Tracer<'a>>,
}

impl<'de> de::SeqAccess<'de> for OneElement<'_> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        match self.tracer.take() {
            Some(t) => seed.deserialize(t).map(Some),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Raw {
        name: String,
        limits: Limits,
        peer: Option<Peer>,
        entry: Vec<Entry>,
        names: Vec<String>,
        lifecycle: crate::RawLifecycle,
    }

    impl Default for Raw {
        fn default() -> Self {
            Raw {
                name: "x".into(),
                limits: Limits::default(),
                peer: None,
                entry: Vec::new(),
                names: Vec::new(),
                lifecycle: crate::RawLifecycle::default(),
            }
        }
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Limits {
        conn_max: usize,
        on: bool,
    }

    impl Default for Limits {
        fn default() -> Self {
            Limits {
                conn_max: 8,
                on: true,
            }
        }
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)] // read through Debug only
    struct Peer {
        url: String,
        timeout_ms: Option<u64>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)] // read through Debug only
    struct Entry {
        id: String,
        #[serde(default)]
        methods: std::collections::BTreeMap<String, String>,
    }

    const DOC: &str = "\
# Config
## outrelay-test (`test.toml`)
### top level
| key | type | default | limits | reload | meaning |
|---|---|---|---|---|---|
| `name` | string | `\"x\"` | any | restart | a name |
| `names` | array of strings | `[]` | any | restart | names |
### `[limits]`
| key | type | default | limits | reload | meaning |
| `conn_max` | integer | `8` | >= 1 | restart | most |
| `on` | bool | `true` | | restart | on |
### `[peer]` (optional)
| `url` | string | required | https | restart | where |
| `timeout_ms` | integer | `5000` | >= 100 | restart | how long |
### `[[entry]]`
| `id` | string | required | | restart | id |
| `methods` | table | `{}` | | restart | per method |
### `[lifecycle]`
| `shutdown_grace_ms` | integer | `30000` | | live | grace |
## outrelay-other
| `stray` | string | `\"\"` | | restart | another daemon's key |
";

    fn is_default(path: &str, v: &toml::Value) -> Option<bool> {
        match path {
            "peer.timeout_ms" => Some(v.as_integer() == Some(5000)),
            p if p.starts_with("entry.") => default_matches::<Raw>(p, v, "[[entry]]\nid = \"a\"\n"),
            p if p.starts_with("peer.") => None,
            p => default_matches::<Raw>(p, v, ""),
        }
    }

    fn doc_without(path_line: &str) -> String {
        DOC.lines()
            .filter(|l| !l.starts_with(path_line))
            .map(|l| format!("{l}\n"))
            .collect()
    }

    #[test]
    fn keys_walk_options_arrays_and_maps() {
        let keys = keys::<Raw>().expect("walk");
        let got: Vec<(&str, &str, bool)> = keys
            .iter()
            .map(|k| (k.path.as_str(), k.ty.as_str(), k.plain))
            .collect();
        assert_eq!(
            got,
            [
                ("name", "string", true),
                ("limits.conn_max", "integer", true),
                ("limits.on", "bool", true),
                ("peer.url", "string", false),
                ("peer.timeout_ms", "integer", false),
                ("entry.id", "string", false),
                ("entry.methods", "table", false),
                ("names", "array of strings", false),
                ("lifecycle.shutdown_grace_ms", "integer", true),
            ]
        );
    }

    #[test]
    fn matching_doc_passes() {
        let keys = keys::<Raw>().expect("walk");
        let problems = check(DOC, "outrelay-test", &keys, is_default);
        assert!(problems.is_empty(), "{problems:#?}");
    }

    #[test]
    fn missing_key_fails_and_says_where_to_add_it() {
        let keys = keys::<Raw>().expect("walk");
        let problems = check(&doc_without("| `on`"), "outrelay-test", &keys, is_default);
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert!(problems[0].contains("`limits.on`"), "{}", problems[0]);
        assert!(
            problems[0].contains("add a row `on` to the table of section `limits`"),
            "{}",
            problems[0]
        );
        // An array entry's key and an optional table's key are found too.
        let problems = check(
            &doc_without("| `methods`"),
            "outrelay-test",
            &keys,
            is_default,
        );
        assert!(
            problems.iter().any(|p| p.contains("`entry.methods`")),
            "{problems:#?}"
        );
        let problems = check(
            &doc_without("| `timeout_ms`"),
            "outrelay-test",
            &keys,
            is_default,
        );
        assert!(
            problems.iter().any(|p| p.contains("`peer.timeout_ms`")),
            "{problems:#?}"
        );
    }

    #[test]
    fn extra_key_fails_and_says_to_remove_it() {
        let keys = keys::<Raw>().expect("walk");
        let doc = DOC.replace(
            "| `on` |",
            "| `conn_min` | integer | `1` | | restart | x |\n| `on` |",
        );
        let problems = check(&doc, "outrelay-test", &keys, is_default);
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert!(problems[0].contains("`limits.conn_min`"), "{}", problems[0]);
        assert!(
            problems[0].contains("does not accept it"),
            "{}",
            problems[0]
        );
    }

    #[test]
    fn wrong_default_type_reload_or_wording_fails() {
        let keys = keys::<Raw>().expect("walk");
        for (from, to, want) in [
            ("`8`", "`9`", "documented default 9"),
            ("`true`", "on", "must be the struct's default"),
            ("`5000`", "`500`", "documented default 500"),
            ("| `on` | bool", "| `on` | integer", "type column"),
            ("`\"x\"`", "`x y`", "not one TOML value"),
            ("`8` | >= 1 | restart", "`8` | >= 1 | live", "reload column"),
            ("| live |", "| restart |", "makes it live"),
            (
                "| `on` | bool | `true` | | restart",
                "| `on` | bool | `true` | | maybe",
                "reload column",
            ),
        ] {
            let problems = check(
                &DOC.replacen(from, to, 1),
                "outrelay-test",
                &keys,
                is_default,
            );
            assert_eq!(problems.len(), 1, "{from} -> {to}: {problems:#?}");
            assert!(
                problems[0].contains(want),
                "{from} -> {to}: {}",
                problems[0]
            );
        }
        let problems = check(
            &DOC.replace("outrelay-test", "nothing"),
            "outrelay-test",
            &keys,
            is_default,
        );
        assert!(problems[0].contains("no `## ` heading"), "{problems:#?}");
    }
}
