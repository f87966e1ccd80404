//! The checked-in gRPC code must be exactly what tonic-prost-build generates from the .proto.
//! Run with `OUTRELAY_REGENERATE=1` to rewrite it after editing `proto/control.proto`.

use std::path::Path;

#[test]
fn generated_code_is_current() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fds = protox::compile([root.join("proto/control.proto")], [root.join("proto")])
        .expect("control.proto compiles");
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("control-gen");
    std::fs::create_dir_all(&out).expect("create out dir");
    tonic_prost_build::configure()
        .build_transport(false)
        .out_dir(&out)
        .compile_fds(fds)
        .expect("tonic-prost-build generates");
    let fresh =
        std::fs::read_to_string(out.join("outrelay.control.v1.rs")).expect("generated file");
    let checked_in_path = root.join("src/gen/outrelay.control.v1.rs");
    if std::env::var_os("OUTRELAY_REGENERATE").is_some() {
        std::fs::write(&checked_in_path, &fresh).expect("write generated code");
    }
    let checked_in = std::fs::read_to_string(&checked_in_path).unwrap_or_default();
    assert!(
        fresh == checked_in,
        "src/gen/outrelay.control.v1.rs is stale: run OUTRELAY_REGENERATE=1 cargo test --release -p outrelay-api --test generated_code"
    );
}
