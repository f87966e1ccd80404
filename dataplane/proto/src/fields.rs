//! Bounds on ORP string fields that reach a relay's memory, caches, matchers, logs, the
//! controller or the audit log (issue 15 rule 3): each validator is checked right after a frame
//! is decoded, BEFORE the value is used for anything, and a value that fails is refused with a
//! code, never stored or echoed.

/// Longest service name (the controller registry's limit).
pub const MAX_SERVICE_NAME_BYTES: usize = 253;
/// Longest method name (the same bound as policy patterns).
pub const MAX_METHOD_BYTES: usize = 512;
/// Longest REGISTER `local_addr` (`host:port`).
pub const MAX_LOCAL_ADDR_BYTES: usize = 255;

/// A service name: printable ASCII without spaces, 1 to [`MAX_SERVICE_NAME_BYTES`] bytes.
pub fn valid_service_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_SERVICE_NAME_BYTES
        && name.bytes().all(|c| c.is_ascii_graphic())
}

/// A method: empty (no method), or printable ASCII without spaces, at most
/// [`MAX_METHOD_BYTES`] bytes.
pub fn valid_method(method: &str) -> bool {
    method.len() <= MAX_METHOD_BYTES && method.bytes().all(|c| c.is_ascii_graphic())
}

/// REGISTER's `local_addr`: empty (the agent did not say), or `host:port` of at most
/// [`MAX_LOCAL_ADDR_BYTES`] bytes: host printable ASCII without `/` (a bracketed IPv6 literal
/// keeps its brackets), port 1 to 65535 in decimal. As loose as the agent's own check of its
/// targets (names are resolved at dial time), only bounded.
pub fn valid_local_addr(addr: &str) -> bool {
    if addr.is_empty() {
        return true;
    }
    if addr.len() > MAX_LOCAL_ADDR_BYTES {
        return false;
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return false;
    };
    let port_ok = (1..=5).contains(&port.len())
        && port.bytes().all(|c| c.is_ascii_digit())
        && port.parse::<u32>().is_ok_and(|p| (1..=65_535).contains(&p));
    let host_ok = !host.is_empty()
        && host.bytes().all(|c| c.is_ascii_graphic() && c != b'/')
        && host.starts_with('[') == host.ends_with(']');
    port_ok && host_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods() {
        assert!(valid_method(""));
        assert!(valid_method("charge"));
        assert!(valid_method("/pay.v1.Pay/Charge"));
        assert!(valid_method(&"m".repeat(MAX_METHOD_BYTES)));
        assert!(!valid_method(&"m".repeat(MAX_METHOD_BYTES + 1)));
        assert!(!valid_method("a b"));
        assert!(!valid_method("a\nb"));
        assert!(!valid_method("é"));
    }

    #[test]
    fn service_names() {
        assert!(valid_service_name("payments"));
        assert!(!valid_service_name(""));
        assert!(!valid_service_name(&"x".repeat(MAX_SERVICE_NAME_BYTES + 1)));
        assert!(!valid_service_name("a\u{0}b"));
    }

    #[test]
    fn local_addrs() {
        for ok in [
            "",
            "127.0.0.1:8080",
            "localhost:1",
            "svc.internal:65535",
            "[::1]:443",
            "[fe80::1%2]:443",
            "my_host-1:9",
            "host:080",
        ] {
            assert!(valid_local_addr(ok), "{ok}");
        }
        for bad in [
            "127.0.0.1",
            ":80",
            "host:",
            "host:0",
            "host:65536",
            "host:+80",
            "ho st:80",
            "a/b:80",
            "[::1:80",
            "host:8a",
            "hé:80",
        ] {
            assert!(!valid_local_addr(bad), "{bad}");
        }
        let long = format!("{}:80", "h".repeat(MAX_LOCAL_ADDR_BYTES));
        assert!(!valid_local_addr(&long));
        assert!(!valid_local_addr(&"x".repeat(4_000_000)));
    }
}
