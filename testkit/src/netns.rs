//! Network namespaces for tests that need a separate network (issue 22's TCP fallback): a
//! namespace joined to the caller's by a veth pair, commands run inside it with
//! `ip netns exec`, sockets bound inside it from a thread that entered it, and nftables rules
//! that drop UDP leaving it.
//!
//! Needs root, `ip` and `nft`: [`Netns::probe`] says why not, so a test can print `SKIP` loudly
//! instead of failing on a machine without them.

use std::net::Ipv4Addr;
use std::process::{Command, Output};

/// The nftables table the drop rules live in (inside the namespace).
const NFT_TABLE: &str = "outrelay_test";

/// A namespace with a veth pair: `host_ip` on the caller's side, `ns_ip` inside (a /24).
/// Deleted (with its veth) on drop.
#[derive(Debug)]
pub struct Netns {
    /// The namespace's name (`ip netns` name).
    pub name: String,
    /// The caller's end of the veth.
    pub host_if: String,
    /// The namespace's end of the veth.
    pub ns_if: String,
    /// The caller's address on the veth.
    pub host_ip: Ipv4Addr,
    /// The namespace's address on the veth.
    pub ns_ip: Ipv4Addr,
}

fn run(args: &[&str]) -> Result<Output, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Netns {
    /// Why namespaces cannot be used here (`None`: they can): not root, or `ip` / `nft`
    /// missing.
    pub fn probe() -> Option<String> {
        if !nix::unistd::Uid::effective().is_root() {
            return Some("not root".to_owned());
        }
        for (bin, arg) in [("ip", "-V"), ("nft", "--version")] {
            match Command::new(bin).arg(arg).output() {
                Ok(o) if o.status.success() => {}
                _ => return Some(format!("`{bin}` is missing")),
            }
        }
        None
    }

    /// Creates namespace `or<tag>` with veth `orh<tag>` (here, 10.201.`subnet`.1) and
    /// `orn<tag>` (inside, 10.201.`subnet`.2), both up, `lo` up inside. `tag` must be short
    /// (interface names are at most 15 bytes) and unique among concurrent tests.
    ///
    /// # Errors
    /// The failing command and its stderr.
    pub fn create(tag: &str, subnet: u8) -> Result<Netns, String> {
        let ns = Netns {
            name: format!("or{tag}"),
            host_if: format!("orh{tag}"),
            ns_if: format!("orn{tag}"),
            host_ip: Ipv4Addr::new(10, 201, subnet, 1),
            ns_ip: Ipv4Addr::new(10, 201, subnet, 2),
        };
        // Leftovers of a killed earlier run.
        let _ = run(&["ip", "netns", "del", &ns.name]);
        let _ = run(&["ip", "link", "del", &ns.host_if]);
        run(&["ip", "netns", "add", &ns.name])?;
        let host_cidr = format!("{}/24", ns.host_ip);
        let ns_cidr = format!("{}/24", ns.ns_ip);
        run(&[
            "ip",
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns.ns_if,
        ])?;
        run(&["ip", "link", "set", &ns.ns_if, "netns", &ns.name])?;
        run(&["ip", "addr", "add", &host_cidr, "dev", &ns.host_if])?;
        run(&["ip", "link", "set", &ns.host_if, "up"])?;
        ns.exec_ok(&["ip", "addr", "add", &ns_cidr, "dev", &ns.ns_if])?;
        ns.exec_ok(&["ip", "link", "set", &ns.ns_if, "up"])?;
        ns.exec_ok(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A command that runs `program` inside the namespace (`ip netns exec NAME program`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `args` inside the namespace and waits.
    ///
    /// # Errors
    /// The failing command and its stderr.
    pub fn exec_ok(&self, args: &[&str]) -> Result<Output, String> {
        let mut all = vec!["ip", "netns", "exec", self.name.as_str()];
        all.extend_from_slice(args);
        run(&all)
    }

    /// Drops every UDP datagram leaving the namespace through its veth (an nftables output
    /// rule inside it); loopback UDP inside still works.
    ///
    /// # Errors
    /// The failing command and its stderr.
    pub fn drop_udp(&self) -> Result<(), String> {
        let rules = format!(
            "table inet {NFT_TABLE} {{\n chain out {{\n  type filter hook output priority 0; policy accept;\n  oifname \"{}\" meta l4proto udp drop\n }}\n}}\n",
            self.ns_if
        );
        let path = std::env::temp_dir().join(format!("{}-nft.conf", self.name));
        std::fs::write(&path, rules).map_err(|e| format!("{}: {e}", path.display()))?;
        let path = path.display().to_string();
        self.exec_ok(&["nft", "-f", &path]).map(|_| ())
    }

    /// Lets only TCP to `ports` (any address) and replies to connections made into the
    /// namespace leave it through its veth; drops everything else leaving it (UDP, other TCP
    /// ports): a firewall that allows only, say, 443/tcp. Loopback inside still works.
    ///
    /// # Errors
    /// The failing command and its stderr.
    pub fn allow_only_tcp(&self, ports: &[u16]) -> Result<(), String> {
        let list = ports
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let rules = format!(
            "table inet {NFT_TABLE} {{\n chain out {{\n  type filter hook output priority 0; policy accept;\n  oifname \"{ifname}\" ct state established,related accept\n  oifname \"{ifname}\" tcp dport {{ {list} }} accept\n  oifname \"{ifname}\" drop\n }}\n}}\n",
            ifname = self.ns_if
        );
        let path = std::env::temp_dir().join(format!("{}-nft.conf", self.name));
        std::fs::write(&path, rules).map_err(|e| format!("{}: {e}", path.display()))?;
        let path = path.display().to_string();
        self.exec_ok(&["nft", "-f", &path]).map(|_| ())
    }

    /// Removes [`Netns::drop_udp`]'s (or [`Netns::allow_only_tcp`]'s) rules.
    ///
    /// # Errors
    /// The failing command and its stderr.
    pub fn allow_udp(&self) -> Result<(), String> {
        self.exec_ok(&["nft", "delete", "table", "inet", NFT_TABLE])
            .map(|_| ())
    }

    /// Runs `f` on a thread that entered the namespace: sockets it creates live there (and
    /// keep working from any thread after).
    ///
    /// # Errors
    /// The namespace could not be entered.
    pub fn within<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, String> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("setns {path}: {e}"))?;
            Ok(f())
        })
        .join()
        .map_err(|_| "the namespace thread panicked".to_owned())?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run(&["ip", "netns", "del", &self.name]);
        let _ = run(&["ip", "link", "del", &self.host_if]);
    }
}
