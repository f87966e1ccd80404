//! Micro-benchmarks of the hot parsers: ORP frame decode and ClientHello parse (whole, and
//! one byte per call as a slowloris client would deliver it).
//! Run: `cargo bench --profile release -p outrelay-proto --bench parse`.

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use outrelay_proto::client_hello::{ClientHelloParser, DEFAULT_MAX_HELLO_BYTES, Progress};
use outrelay_proto::frame::{self, Decoded, Frame};
use outrelay_proto::orp;

fn hello(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/client_hello")
        .join(name);
    std::fs::read(path).expect("captured ClientHello")
}

fn parse_whole(bytes: &[u8]) -> bool {
    let mut p = ClientHelloParser::new(DEFAULT_MAX_HELLO_BYTES);
    matches!(p.feed(bytes), Ok(Progress::Done { .. }))
}

fn parse_bytewise(bytes: &[u8]) -> bool {
    let mut p = ClientHelloParser::new(DEFAULT_MAX_HELLO_BYTES);
    for b in bytes.chunks(1) {
        if let Ok(Progress::Done { .. }) = p.feed(b) {
            return true;
        }
    }
    false
}

fn client_hello(c: &mut Criterion) {
    let mut g = c.benchmark_group("client_hello");
    for name in ["openssl_tls13.bin", "chromium.bin", "rustls_pq.bin"] {
        let bytes = hello(name);
        assert!(parse_whole(&bytes) && parse_bytewise(&bytes));
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        g.bench_function(format!("whole/{name}"), |b| {
            b.iter(|| parse_whole(black_box(&bytes)))
        });
        g.bench_function(format!("bytewise/{name}"), |b| {
            b.iter(|| parse_bytewise(black_box(&bytes)))
        });
    }
    g.finish();
}

fn frames(c: &mut Criterion) {
    let open = Frame::OpenStream(orp::OpenStream {
        target_service: "payments".into(),
        method: "charge".into(),
        stream_id: 0x1234_5678_9abc_def0,
    })
    .to_vec()
    .expect("encode");
    let mut g = c.benchmark_group("frame");
    g.bench_function("decode_header/open_stream", |b| {
        b.iter(|| matches!(frame::decode(black_box(&open)), Ok(Decoded::Frame { .. })))
    });
    g.bench_function("decode_typed/open_stream", |b| {
        b.iter(|| {
            Frame::decode_exact(black_box(&open))
                .ok()
                .flatten()
                .is_some()
        })
    });
    g.finish();
}

criterion_group!(benches, client_hello, frames);
criterion_main!(benches);
