//! Compiles `bpf/*.bpf.c` into `$OUT_DIR/*.bpf.o` with clang (`-O2 -g -target bpf`) when the `bpf`
//! feature is on; the loader embeds the objects with `include_bytes_aligned!`. Without the
//! feature nothing is compiled and no clang is needed.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The programs, by file stem; the loader includes `$OUT_DIR/<stem>.bpf.o` for each.
const PROGRAMS: [&str; 2] = ["reuseport", "lookup"];

const INSTALL_HINT: &str = "install clang and libbpf's headers with `apt-get install clang libbpf-dev`, \
     or build without eBPF steering with `--no-default-features` \
     (outrelay-relay: without its `ebpf` feature)";

fn main() {
    println!("cargo:rerun-if-changed=bpf");
    println!("cargo:rerun-if-env-changed=CLANG");
    println!("cargo:rerun-if-env-changed=BPF_INCLUDE");
    if std::env::var_os("CARGO_FEATURE_BPF").is_none() {
        return;
    }
    let manifest_dir = PathBuf::from(env("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env("OUT_DIR"));
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());
    let helpers = Path::new("/usr/include/bpf/bpf_helpers.h");
    if std::env::var_os("BPF_INCLUDE").is_none() && !helpers.exists() {
        panic!(
            "outrelay-ebpf: {} is missing (libbpf headers); {INSTALL_HINT}",
            helpers.display()
        );
    }
    for stem in PROGRAMS {
        let source = manifest_dir.join("bpf").join(format!("{stem}.bpf.c"));
        println!("cargo:rerun-if-changed={}", source.display());
        let object = out_dir.join(format!("{stem}.bpf.o"));
        let mut command = Command::new(&clang);
        command.args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"]);
        if let Some(extra) = std::env::var_os("BPF_INCLUDE") {
            command.arg("-I").arg(extra);
        }
        command
            .arg("-I")
            .arg(format!("/usr/include/{}", multiarch()))
            .arg("-c")
            .arg(&source)
            .arg("-o")
            .arg(&object);
        let status = match command.status() {
            Ok(status) => status,
            Err(e) => panic!("outrelay-ebpf: cannot run `{clang}` ({e}); {INSTALL_HINT}"),
        };
        if !status.success() {
            panic!(
                "outrelay-ebpf: `{clang}` failed on {} ({status})",
                source.display()
            );
        }
    }
}

/// The Debian multiarch directory holding `asm/types.h` (`gcc -print-multiarch`, else derived
/// from the target arch).
fn multiarch() -> String {
    if let Ok(out) = Command::new("gcc").arg("-print-multiarch").output()
        && out.status.success()
    {
        let triple = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !triple.is_empty() {
            return triple;
        }
    }
    format!("{}-linux-gnu", env("CARGO_CFG_TARGET_ARCH"))
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("cargo sets {name}"))
}
