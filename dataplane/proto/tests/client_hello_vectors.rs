//! ClientHellos captured from real clients (rustls with a post-quantum key share and ECH
//! GREASE, OpenSSL, curl, Chromium), fed whole, as every prefix, split at every offset, one
//! byte at a time, and re-framed into 2..N TLS records. Every way of delivering the same hello
//! must route identically (R1 of targets.md).

mod common;

use common::{Vector, reframe_even, strip_records, vectors};
use outrelay_proto::client_hello::{
    ClientHello, ClientHelloParser, DEFAULT_MAX_HELLO_BYTES, Progress, parse_client_hello,
};

fn assert_matches_manifest(v: &Vector, hello: &ClientHello, how: &str) {
    assert_eq!(
        hello.server_name.map(|n| n.to_string()),
        v.sni,
        "{} ({how}): sni",
        v.file
    );
    let alpn: Vec<Vec<u8>> = hello.alpn().map(<[u8]>::to_vec).collect();
    assert_eq!(alpn, v.alpn, "{} ({how}): alpn", v.file);
    assert_eq!(hello.ech_offered, v.ech, "{} ({how}): ech", v.file);
}

/// Feeds `chunks` in order; the hello must complete exactly on the last byte.
fn feed_chunks<'a>(chunks: impl IntoIterator<Item = &'a [u8]>, total: usize) -> ClientHello {
    let mut parser = ClientHelloParser::new(DEFAULT_MAX_HELLO_BYTES);
    let mut fed = 0;
    for chunk in chunks {
        fed += chunk.len();
        match parser.feed(chunk).expect("valid hello") {
            Progress::NeedMore => assert!(fed < total, "need more after all {total} bytes"),
            Progress::Done { hello, used } => {
                assert_eq!(fed, total, "done after {fed} of {total} bytes");
                assert_eq!(used, chunk.len());
                return hello;
            }
        }
    }
    panic!("hello never completed");
}

#[test]
fn manifest_describes_the_bytes() {
    for v in vectors() {
        let mut n = 0;
        let mut rest = &v.bytes[..];
        while !rest.is_empty() {
            rest = &rest[5 + usize::from(u16::from_be_bytes([rest[3], rest[4]]))..];
            n += 1;
        }
        assert_eq!(n, v.records, "{}: record count", v.file);
    }
    let pq = vectors()
        .into_iter()
        .find(|v| v.file == "rustls_pq.bin")
        .expect("pq vector");
    assert!(
        pq.bytes.len() > 1200,
        "the post-quantum hello spans more than one small segment"
    );
}

#[test]
fn whole() {
    for v in vectors() {
        let hello = parse_client_hello(&v.bytes, DEFAULT_MAX_HELLO_BYTES)
            .expect("valid")
            .expect("complete");
        assert_matches_manifest(&v, &hello, "whole");
    }
}

#[test]
fn every_prefix_needs_more() {
    for v in vectors() {
        for n in 0..v.bytes.len() {
            assert_eq!(
                parse_client_hello(&v.bytes[..n], DEFAULT_MAX_HELLO_BYTES),
                Ok(None),
                "{} prefix {n}",
                v.file
            );
        }
    }
}

#[test]
fn split_at_every_offset() {
    for v in vectors() {
        for cut in 1..v.bytes.len() {
            let (a, b) = v.bytes.split_at(cut);
            let hello = feed_chunks([a, b], v.bytes.len());
            assert_matches_manifest(&v, &hello, &format!("split at {cut}"));
        }
    }
}

#[test]
fn one_byte_at_a_time() {
    for v in vectors() {
        let hello = feed_chunks(v.bytes.chunks(1), v.bytes.len());
        assert_matches_manifest(&v, &hello, "byte by byte");
    }
}

#[test]
fn reframed_into_many_records() {
    for v in vectors() {
        let (hs, version) = strip_records(&v.bytes);
        for k in 2..=16 {
            let raw = reframe_even(&hs, version, k);
            let hello = parse_client_hello(&raw, DEFAULT_MAX_HELLO_BYTES)
                .expect("valid")
                .expect("complete");
            assert_matches_manifest(&v, &hello, &format!("{k} records"));
            let hello = feed_chunks(raw.chunks(1), raw.len());
            assert_matches_manifest(&v, &hello, &format!("{k} records, byte by byte"));
        }
        // The extreme: one handshake byte per record.
        let raw = reframe_even(&hs, version, hs.len());
        let hello = feed_chunks(raw.chunks(7), raw.len());
        assert_matches_manifest(&v, &hello, "one byte per record");
    }
}

#[test]
fn record_split_at_every_handshake_offset() {
    for v in vectors() {
        let (hs, version) = strip_records(&v.bytes);
        for cut in 1..hs.len() {
            let raw = common::reframe(&hs, version, &[cut]);
            let hello = parse_client_hello(&raw, DEFAULT_MAX_HELLO_BYTES)
                .expect("valid")
                .expect("complete");
            assert_matches_manifest(&v, &hello, &format!("record split at {cut}"));
        }
    }
}

#[test]
fn cap_refuses_large_hellos_and_admits_at_the_limit() {
    for v in vectors() {
        assert!(
            parse_client_hello(&v.bytes, v.bytes.len())
                .expect("at cap")
                .is_some()
        );
        assert!(
            parse_client_hello(&v.bytes, v.bytes.len() - 1).is_err(),
            "{}: one byte under the cap",
            v.file
        );
    }
}
