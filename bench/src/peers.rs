//! Peer binaries: where they are, which versions, and installing the missing ones.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Packages `--install-peers` installs with apt-get.
pub const APT_PACKAGES: &[&str] = &["haproxy", "nginx", "libnginx-mod-stream", "socat", "iperf3"];

/// Where Debian's libnginx-mod-stream puts the dynamic stream module.
pub const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

/// The first executable `name` on `PATH`, then in `~/.cargo/bin` (where `cargo install` puts
/// rathole even when that is not on `PATH`).
pub fn find_binary(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/usr/bin", "/sbin"].map(PathBuf::from));
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

/// The version line of each peer tool that is installed, for the report header.
pub fn versions() -> Vec<(String, String)> {
    let probes: [(&str, &[&str]); 5] = [
        ("haproxy", &["-v"]),
        ("nginx", &["-v"]),
        ("rathole", &["--version"]),
        ("socat", &["-V"]),
        ("iperf3", &["--version"]),
    ];
    probes
        .iter()
        .map(|(name, args)| {
            let version = match find_binary(name) {
                None => "not installed".to_owned(),
                Some(path) => version_line(name, &path, args),
            };
            ((*name).to_owned(), version)
        })
        .collect()
}

/// Installs whichever of the apt packages and rathole are missing (`--install-peers`).
/// `need_rathole` avoids a minutes-long `cargo install` when rathole is not among the targets.
pub fn install_missing(need_rathole: bool) -> Result<()> {
    let apt_missing = ["haproxy", "nginx", "socat", "iperf3"]
        .iter()
        .any(|b| find_binary(b).is_none())
        || !Path::new(NGINX_STREAM_MODULE).exists();
    if apt_missing {
        let mut install = vec!["install", "-y"];
        install.extend_from_slice(APT_PACKAGES);
        eprintln!("installing peers: apt-get {}", install.join(" "));
        if run_status("apt-get", &install).is_err() {
            // A fresh machine may have no package lists yet.
            run_status("apt-get", &["update"])?;
            run_status("apt-get", &install)?;
        }
    }
    if need_rathole && find_binary("rathole").is_none() {
        // Without --locked: rathole's lock file pins crates that no longer build on current Rust.
        eprintln!("installing peers: cargo install rathole (compiles for a few minutes)");
        run_status("cargo", &["install", "rathole"])?;
    }
    Ok(())
}

fn run_status(program: &str, args: &[&str]) -> Result<()> {
    let status = Command::new(program)
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("{program} {} failed: {status}", args.join(" "));
    }
    Ok(())
}

fn version_line(name: &str, path: &Path, args: &[&str]) -> String {
    let Ok(out) = Command::new(path).args(args).output() else {
        return "unknown (failed to run)".to_owned();
    };
    // nginx prints its version on stderr, the others on stdout.
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if name == "rathole" {
        // `rathole --version` prints "rathole" and then build details, one per line.
        return text
            .lines()
            .find_map(|l| l.trim().strip_prefix("Build Version:"))
            .map_or_else(|| "unknown".to_owned(), |v| format!("rathole {}", v.trim()));
    }
    let wanted = |l: &&str| match name {
        "socat" => l.contains("socat version"),
        _ => !l.trim().is_empty(),
    };
    text.lines()
        .find(wanted)
        .map(|l| l.trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned())
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}
