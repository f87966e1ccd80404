//! Host names as the relay routes them, and lease names as agents ask for them.
//!
//! Normalisation lives here so the SNI parser, the lease registry and the route table agree
//! byte for byte: ASCII lower case, one trailing dot stripped, letters, digits and hyphens
//! only (LDH), labels of 1 to 63 bytes with no hyphen at either end, at most 253 bytes.
//! IP literals are refused: a dotted quad, anything whose last label is all digits (which
//! also catches `127.1` and other `inet_aton` spellings), and IPv6 literals.

use std::fmt;

/// Longest host name, in bytes, after the trailing dot is stripped.
pub const MAX_HOSTNAME_BYTES: usize = 253;
/// Longest DNS label, in bytes.
pub const MAX_DNS_LABEL_BYTES: usize = 63;

/// Why a host name or lease name was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty (or just a dot).
    #[error("empty name")]
    Empty,
    /// The name is longer than 253 bytes (host name) or 63 bytes (lease name).
    #[error("name too long")]
    TooLong,
    /// A byte outside `a-z A-Z 0-9 - .` (lease names: outside `a-z A-Z 0-9 -`).
    #[error("invalid character in name")]
    InvalidCharacter,
    /// Two dots in a row, a leading dot, or two trailing dots.
    #[error("empty label in name")]
    EmptyLabel,
    /// A label longer than 63 bytes.
    #[error("label longer than 63 bytes")]
    LabelTooLong,
    /// A label starts or ends with `-`.
    #[error("label starts or ends with a hyphen")]
    HyphenAtLabelEdge,
    /// The name is an IP address literal.
    #[error("IP literal where a host name is required")]
    IpLiteral,
}

/// A normalised host name, stored inline (no allocation).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct HostName {
    buf: [u8; MAX_HOSTNAME_BYTES],
    len: u8,
}

impl HostName {
    /// Validates and normalises `raw` (as found in an SNI extension or a lease).
    ///
    /// # Errors
    /// The first [`NameError`] rule broken.
    pub fn parse(raw: &[u8]) -> Result<HostName, NameError> {
        let name = raw.strip_suffix(b".").unwrap_or(raw);
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        if name.contains(&b':') {
            return Err(if is_ipv6_literal(name) {
                NameError::IpLiteral
            } else {
                NameError::InvalidCharacter
            });
        }
        if name.len() > MAX_HOSTNAME_BYTES {
            return Err(NameError::TooLong);
        }
        let mut buf = [0u8; MAX_HOSTNAME_BYTES];
        for (dst, src) in buf.iter_mut().zip(name) {
            if !(src.is_ascii_alphanumeric() || *src == b'-' || *src == b'.') {
                return Err(NameError::InvalidCharacter);
            }
            *dst = src.to_ascii_lowercase();
        }
        let normalised = &buf[..name.len()];
        let mut last_label: &[u8] = &[];
        for label in normalised.split(|b| *b == b'.') {
            check_label(label)?;
            last_label = label;
        }
        if last_label.iter().all(u8::is_ascii_digit) {
            return Err(NameError::IpLiteral);
        }
        Ok(HostName {
            buf,
            len: u8::try_from(name.len()).map_err(|_| NameError::TooLong)?,
        })
    }

    /// The normalised name.
    pub fn as_str(&self) -> &str {
        // Only ASCII bytes were admitted by `parse`.
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }

    /// The normalised name's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }

    /// The name without its first label (`a.b.c` → `b.c`), the key a one-level wildcard
    /// lease `*.b.c` is stored under; `None` for a single-label name.
    pub fn parent(&self) -> Option<&str> {
        self.as_str().split_once('.').map(|(_, parent)| parent)
    }
}

impl fmt::Debug for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostName({:?})", self.as_str())
    }
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A normalised lease name: one DNS label of `[a-z0-9-]`, 1 to 63 bytes, no hyphen at either
/// end (`public-ingress.md`). The relay answers `invalid_request` for anything else.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseName(String);

impl LeaseName {
    /// Validates `raw` and lowercases it.
    ///
    /// # Errors
    /// The first [`NameError`] rule broken (a dot is [`NameError::InvalidCharacter`]).
    pub fn parse(raw: &str) -> Result<LeaseName, NameError> {
        if raw.is_empty() {
            return Err(NameError::Empty);
        }
        if raw.len() > MAX_DNS_LABEL_BYTES {
            return Err(NameError::TooLong);
        }
        if !raw.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(NameError::InvalidCharacter);
        }
        let name = raw.to_ascii_lowercase();
        check_label(name.as_bytes())?;
        Ok(LeaseName(name))
    }

    /// The normalised name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for LeaseName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn check_label(label: &[u8]) -> Result<(), NameError> {
    match label {
        [] => Err(NameError::EmptyLabel),
        l if l.len() > MAX_DNS_LABEL_BYTES => Err(NameError::LabelTooLong),
        [b'-', ..] | [.., b'-'] => Err(NameError::HyphenAtLabelEdge),
        _ => Ok(()),
    }
}

fn is_ipv6_literal(name: &[u8]) -> bool {
    let inner = name
        .strip_prefix(b"[")
        .and_then(|n| n.strip_suffix(b"]"))
        .unwrap_or(name);
    std::str::from_utf8(inner)
        .ok()
        .and_then(|s| s.parse::<std::net::Ipv6Addr>().ok())
        .is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises() {
        let n = HostName::parse(b"Demo.OutRelay.TEST.").expect("valid");
        assert_eq!(n.as_str(), "demo.outrelay.test");
        assert_eq!(n.parent(), Some("outrelay.test"));
        assert_eq!(HostName::parse(b"localhost").expect("valid").parent(), None);
        assert!(HostName::parse(b"xn--bcher-kva.example").is_ok());
        assert!(HostName::parse(b"1.example.com").is_ok());
        assert!(HostName::parse(b"example.c0m").is_ok());
    }

    #[test]
    fn refuses_each_rule() {
        use NameError::*;
        let long_label = format!("{}.com", "a".repeat(64));
        let long_name = format!("{}.com", vec!["a".repeat(63); 4].join("."));
        let cases: &[(&[u8], NameError)] = &[
            (b"", Empty),
            (b".", Empty),
            (b"a..b", EmptyLabel),
            (b".a.b", EmptyLabel),
            (b"a.b..", EmptyLabel),
            (b"a_b.com", InvalidCharacter),
            (b"a b.com", InvalidCharacter),
            (b"caf\xc3\xa9.com", InvalidCharacter),
            (b"a\0.com", InvalidCharacter),
            (b"*.example.com", InvalidCharacter),
            (b"-a.com", HyphenAtLabelEdge),
            (b"a-.com", HyphenAtLabelEdge),
            (long_label.as_bytes(), LabelTooLong),
            (long_name.as_bytes(), TooLong),
            (b"127.0.0.1", IpLiteral),
            (b"127.0.0.1.", IpLiteral),
            (b"127.1", IpLiteral),
            (b"0x7f.1", IpLiteral),
            (b"4294967295", IpLiteral),
            (b"::1", IpLiteral),
            (b"[2001:db8::1]", IpLiteral),
            (b"a:b", InvalidCharacter),
        ];
        for (raw, want) in cases {
            assert_eq!(
                HostName::parse(raw),
                Err(*want),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn lease_names() {
        assert_eq!(
            LeaseName::parse("Demo-1").expect("valid").as_str(),
            "demo-1"
        );
        assert_eq!(LeaseName::parse(""), Err(NameError::Empty));
        assert_eq!(LeaseName::parse("a.b"), Err(NameError::InvalidCharacter));
        assert_eq!(LeaseName::parse("-a"), Err(NameError::HyphenAtLabelEdge));
        assert_eq!(LeaseName::parse("a-"), Err(NameError::HyphenAtLabelEdge));
        assert_eq!(LeaseName::parse(&"a".repeat(64)), Err(NameError::TooLong));
        assert!(LeaseName::parse(&"a".repeat(63)).is_ok());
    }
}
