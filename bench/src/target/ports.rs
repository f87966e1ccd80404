//! Lease port ranges shared by every bench and test process on the machine. The relay binds
//! lease ports with SO_REUSEPORT, so two relays given the same range (two bench runs in
//! parallel, as the smoke tests are) both bind a port and the kernel spreads one run's clients
//! over the other run's relay. Each process therefore claims its ranges with an advisory file
//! lock (`flock`, released by the kernel when the process ends, however it ends) before any
//! relay gets them: the scenarios' ranges through the test suites' own claims
//! ([`outrelay_testkit::claim_port_ranges`]), so a bench run and a test never share a port
//! either; the leases scenario's wide fixed range through a lock of its own.

use std::fs::{File, TryLockError};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use outrelay_testkit::{RANGE_PORTS, claim_port_ranges};

/// Claimed ranges of [`RANGE_PORTS`] ports for the scenarios' leases (100 ports).
const SCENARIO_RANGES: u16 = 10;
/// Claimed ranges for the abuse topology's leases, after the scenarios'.
const ABUSE_RANGES: u16 = 10;
/// How long a process waits for the leases scenario's range while another process holds it.
const LEASES_RANGE_WAIT_MS: u64 = 600_000;

/// This process's lease ranges, `(first, last)` inclusive.
#[derive(Debug, Clone, Copy)]
pub struct LeasePorts {
    /// For every scenario's TCP and UDP leases.
    pub scenario: (u16, u16),
    /// For the abuse topology, apart so an attack never lands on another topology's lease.
    pub abuse: (u16, u16),
}

/// This process's ranges, claimed on the first call.
static CLAIMED: OnceLock<LeasePorts> = OnceLock::new();
/// The lock on the leases scenario's fixed range, once this process holds it.
static LEASES_RANGE: OnceLock<File> = OnceLock::new();

/// This process's lease ranges, claimed (held until the process exits) on the first call.
///
/// # Panics
/// No span of free ranges is left (the claim's own panic).
pub fn lease_ports() -> LeasePorts {
    *CLAIMED.get_or_init(|| {
        let (first, last) = claim_port_ranges(SCENARIO_RANGES + ABUSE_RANGES);
        let split = first + SCENARIO_RANGES * RANGE_PORTS;
        LeasePorts {
            scenario: (first, split - 1),
            abuse: (split, last),
        }
    })
}

/// Waits until this process holds the leases scenario's range starting at `first`, which is
/// too wide for a block; another process holding it is waited for.
///
/// # Errors
/// The lock directory cannot be written, or the range stayed held for
/// [`LEASES_RANGE_WAIT_MS`].
pub fn hold_leases_range(first: u16) -> Result<()> {
    if LEASES_RANGE.get().is_some() {
        return Ok(());
    }
    let file = lock_file(&format!("leases-{first}"))?;
    let deadline = Instant::now() + Duration::from_millis(LEASES_RANGE_WAIT_MS);
    loop {
        match file.try_lock() {
            Ok(()) => break,
            Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(TryLockError::WouldBlock) => bail!(
                "the leases range from {first} stayed held by another bench process for \
                 {LEASES_RANGE_WAIT_MS} ms"
            ),
            Err(TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking the leases range {first}"));
            }
        }
    }
    let _ = LEASES_RANGE.set(file);
    Ok(())
}

/// Opens (creating) the lock file `name` in the machine-wide lock directory.
fn lock_file(name: &str) -> Result<File> {
    let dir = lock_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{name}.lock"));
    File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))
}

fn lock_dir() -> PathBuf {
    std::env::temp_dir().join("outrelay-bench-ports")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ranges_are_claimed_once_and_apart() {
        let ports = lease_ports();
        assert_eq!(lease_ports().scenario, ports.scenario, "claimed once");
        assert_eq!(ports.scenario.1 - ports.scenario.0 + 1, 100);
        assert_eq!(ports.abuse.0, ports.scenario.1 + 1);
        assert_eq!(ports.abuse.1 - ports.abuse.0 + 1, 100);
    }

    #[test]
    fn the_leases_range_is_held_once_and_conflicts_with_another_holder() {
        hold_leases_range(9_000).expect("held");
        hold_leases_range(9_000).expect("held again: already this process's");
        // The lock is per open file description: a second open of the file conflicts with
        // the first, as another process's would.
        let again = lock_file("leases-9000").expect("open");
        assert!(matches!(again.try_lock(), Err(TryLockError::WouldBlock)));
    }
}
