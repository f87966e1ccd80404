//! Writes real rustls ClientHello bytes (first flight only) into the directory
//! given as the first argument. No network: the hello is taken from write_tls.

use std::sync::Arc;

use rustls::client::{EchGreaseConfig, EchMode};
use rustls::crypto::aws_lc_rs;
use rustls::crypto::aws_lc_rs::hpke::ALL_SUPPORTED_SUITES;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore};

fn hello(config: ClientConfig, server: &str) -> Vec<u8> {
    let name = ServerName::try_from(server.to_string()).expect("server name");
    let mut conn = ClientConnection::new(Arc::new(config), name).expect("client connection");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("write_tls");
    }
    out
}

fn base(ech: Option<EchMode>) -> ClientConfig {
    let provider = Arc::new(aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider);
    let builder = match ech {
        Some(mode) => builder.with_ech(mode).expect("ech"),
        None => builder.with_safe_default_protocol_versions().expect("versions"),
    };
    let mut config = builder
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config
}

fn main() {
    let dir = std::env::args().nth(1).expect("usage: capture OUT_DIR");
    let write = |file: &str, bytes: Vec<u8>| {
        std::fs::write(format!("{dir}/{file}"), &bytes).expect("write");
        println!("{file}: {} bytes", bytes.len());
    };

    write("rustls_pq.bin", hello(base(None), "demo.outrelay.test"));

    let suite = ALL_SUPPORTED_SUITES[0];
    let (public_key, _) = suite.generate_key_pair().expect("hpke key pair");
    let grease = EchMode::Grease(EchGreaseConfig::new(suite, public_key));
    write("rustls_ech_grease.bin", hello(base(Some(grease)), "demo.outrelay.test"));

    write("rustls_no_sni.bin", hello(base(None), "127.0.0.1"));

    // max_fragment_size splits the same hello over several TLS records.
    let mut config = base(None);
    config.max_fragment_size = Some(512);
    write("rustls_fragmented.bin", hello(config, "demo.outrelay.test"));
}
