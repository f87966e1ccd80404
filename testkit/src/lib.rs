//! Helpers shared by the test suites of several crates.
//!
//! [`claim_port_range`]: relays under test bind their lease ports only after a grant, so a bind
//! probe alone cannot keep two concurrent test processes (nextest runs each test in its own)
//! from picking the same range; one then routes the other's clients. A range is therefore
//! claimed with an exclusive `flock` on a per-range file that the claiming process holds until
//! it exits.
//!
//! [`notify::NotifyListener`]: a `NOTIFY_SOCKET` of the test's own, to check systemd
//! readiness and watchdog notifications without systemd.

pub mod netns;
pub mod notify;

use std::fs::File;
use std::path::PathBuf;
use std::sync::Mutex;

use nix::fcntl::{Flock, FlockArg};

/// First port of the range area (below the kernel's ephemeral range, 32768 by default).
const AREA_START: u16 = 20_000;
/// Ranges in the area.
const AREA_RANGES: u16 = 1_000;
/// Ports per range.
pub const RANGE_PORTS: u16 = 10;

/// Claims held by this process (released when it exits).
static HELD: Mutex<Vec<Flock<File>>> = Mutex::new(Vec::new());

/// A range of [`RANGE_PORTS`] TCP ports on 127.0.0.1 in 20000..30000 that no other test
/// process holds and whose ports all bind right now: `(first, last)`.
///
/// # Panics
/// When no range is free.
pub fn claim_port_range() -> (u16, u16) {
    let dir = std::env::temp_dir().join("outrelay-test-port-ranges");
    std::fs::create_dir_all(&dir).expect("create the port-range lock directory");
    let start = u16::try_from(std::process::id() % u32::from(AREA_RANGES)).expect("small");
    for k in 0..AREA_RANGES {
        let lo = AREA_START + ((start + k * 7) % AREA_RANGES) * RANGE_PORTS;
        let Some(lock) = try_lock(dir.join(lo.to_string())) else {
            continue;
        };
        let hi = lo + RANGE_PORTS - 1;
        if (lo..=hi).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            HELD.lock().unwrap_or_else(|p| p.into_inner()).push(lock);
            return (lo, hi);
        }
    }
    panic!("no free {RANGE_PORTS}-port range in {AREA_START}..30000");
}

/// `n` consecutive ranges of [`claim_port_range`] claimed together (`n` × [`RANGE_PORTS`]
/// ports): for a relay whose eBPF lookup program refuses every unleased port of its range, so
/// no other test may use any of them.
///
/// # Panics
/// When no such span is free.
pub fn claim_port_ranges(n: u16) -> (u16, u16) {
    assert!(
        (1..=AREA_RANGES / 4).contains(&n),
        "1..={} ranges",
        AREA_RANGES / 4
    );
    let dir = std::env::temp_dir().join("outrelay-test-port-ranges");
    std::fs::create_dir_all(&dir).expect("create the port-range lock directory");
    let spans = AREA_RANGES / n;
    let start = u16::try_from(std::process::id() % u32::from(spans)).expect("small");
    for k in 0..spans {
        let first = ((start + k) % spans) * n;
        let lo = AREA_START + first * RANGE_PORTS;
        let hi = lo + n * RANGE_PORTS - 1;
        let mut locks = Vec::with_capacity(usize::from(n));
        for r in 0..n {
            match try_lock(dir.join((lo + r * RANGE_PORTS).to_string())) {
                Some(lock) => locks.push(lock),
                None => break,
            }
        }
        if locks.len() == usize::from(n)
            && (lo..=hi).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        {
            HELD.lock().unwrap_or_else(|p| p.into_inner()).extend(locks);
            return (lo, hi);
        }
    }
    panic!("no free span of {n} ranges in {AREA_START}..30000");
}

fn try_lock(path: PathBuf) -> Option<Flock<File>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .ok()?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).ok()
}

/// Reads one HTTP/1.1 request head from `s`, answers `200` with `body` and closes: the local
/// HTTP(S) targets of the end-to-end tests (plain TCP, or inside a TLS server).
pub async fn answer_http<S>(mut s: S, body: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut req = Vec::new();
    let mut chunk = [0u8; 4096];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => req.extend_from_slice(&chunk[..n]),
        }
    }
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(response.as_bytes()).await;
    let _ = s.shutdown().await;
}
