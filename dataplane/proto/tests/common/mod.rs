//! Helpers shared by the ClientHello tests: the captured vectors and TLS record re-framing.
#![allow(dead_code, reason = "each test binary uses a subset")]

use std::path::Path;

/// One captured ClientHello and what its MANIFEST line says about it.
pub struct Vector {
    pub file: String,
    pub bytes: Vec<u8>,
    pub sni: Option<String>,
    pub alpn: Vec<Vec<u8>>,
    pub ech: bool,
    pub records: usize,
}

/// Loads every vector listed in `testdata/client_hello/MANIFEST`.
pub fn vectors() -> Vec<Vector> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/client_hello");
    let manifest = std::fs::read_to_string(dir.join("MANIFEST")).expect("MANIFEST");
    let vectors: Vec<Vector> = manifest
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|line| {
            let mut fields = line.split_whitespace();
            let file = fields.next().expect("file name").to_owned();
            let mut v = Vector {
                bytes: std::fs::read(dir.join(&file)).expect("vector file"),
                file,
                sni: None,
                alpn: Vec::new(),
                ech: false,
                records: 0,
            };
            for field in fields {
                let (k, val) = field.split_once('=').expect("key=value");
                match (k, val) {
                    ("sni", "-") | ("alpn", "-") => {}
                    ("sni", s) => v.sni = Some(s.to_owned()),
                    ("alpn", a) => v.alpn = a.split(',').map(|p| p.as_bytes().to_vec()).collect(),
                    ("ech", e) => v.ech = e == "1",
                    ("records", r) => v.records = r.parse().expect("records"),
                    other => panic!("unknown manifest field {other:?}"),
                }
            }
            v
        })
        .collect();
    assert!(
        vectors.len() >= 6,
        "expected the captured vectors, found {}",
        vectors.len()
    );
    vectors
}

/// The handshake bytes carried by a sequence of TLS records, and the first record's version.
pub fn strip_records(mut raw: &[u8]) -> (Vec<u8>, [u8; 2]) {
    let version = [raw[1], raw[2]];
    let mut hs = Vec::new();
    while !raw.is_empty() {
        assert_eq!(raw[0], 0x16, "handshake record");
        let len = usize::from(u16::from_be_bytes([raw[3], raw[4]]));
        hs.extend_from_slice(&raw[5..5 + len]);
        raw = &raw[5 + len..];
    }
    (hs, version)
}

/// Re-frames handshake bytes into records whose payload sizes are `sizes` (the last record
/// takes the rest; zero sizes are skipped because empty handshake records are invalid).
pub fn reframe(hs: &[u8], version: [u8; 2], sizes: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = hs;
    let mut sizes = sizes.iter().copied().filter(|s| *s > 0);
    while !rest.is_empty() {
        let n = sizes
            .next()
            .unwrap_or(rest.len())
            .min(rest.len())
            .min(1 << 14);
        out.push(0x16);
        out.extend_from_slice(&version);
        out.extend_from_slice(&u16::try_from(n).expect("record size").to_be_bytes());
        out.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
    }
    out
}

/// Splits handshake bytes into `k` records of near-equal size.
pub fn reframe_even(hs: &[u8], version: [u8; 2], k: usize) -> Vec<u8> {
    let size = hs.len().div_ceil(k);
    reframe(hs, version, &vec![size; k])
}
