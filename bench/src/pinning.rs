//! CPU pinning of a run: which CPUs the targets' processes run on (`--pin-targets`, every
//! process started under `taskset -c`) and which the harness itself runs on (`--pin-load`:
//! the load generators and in-process backends, pinned with `sched_setaffinity` before any
//! thread starts, so every thread and child inherits it).
//!
//! A target's processes are started through `taskset`, which sets the affinity and then execs
//! the program: the pid the harness measures CPU on is the target's own.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{Context, Result, bail};
use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;

use crate::peers::find_binary;

/// A set of CPU numbers, as `taskset -c` takes it (`0`, `0-3`, `0,2,4-7`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuList {
    /// Sorted, without duplicates, never empty.
    cpus: Vec<usize>,
}

impl CpuList {
    /// How many CPUs the set holds (the divisor of the "per target core" figures).
    pub fn cores(&self) -> usize {
        self.cpus.len()
    }

    /// The CPUs this process may run on now.
    pub fn current() -> Result<Self> {
        let set = sched_getaffinity(Pid::from_raw(0)).context("sched_getaffinity")?;
        let cpus: Vec<usize> = (0..CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect();
        if cpus.is_empty() {
            bail!("sched_getaffinity returned an empty set");
        }
        Ok(Self { cpus })
    }
}

impl FromStr for CpuList {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> Result<Self> {
        let mut cpus = Vec::new();
        for part in text.split(',').map(str::trim) {
            let (lo, hi) = match part.split_once('-') {
                Some((lo, hi)) => (lo, hi),
                None => (part, part),
            };
            let parse = |s: &str| {
                s.parse::<usize>()
                    .with_context(|| format!("CPU list {text:?}: {s:?} is not a CPU number"))
            };
            let (lo, hi) = (parse(lo)?, parse(hi)?);
            if lo > hi {
                bail!("CPU list {text:?}: range {lo}-{hi} runs backwards");
            }
            if hi >= CpuSet::count() {
                bail!("CPU list {text:?}: CPU {hi} is beyond {}", CpuSet::count());
            }
            cpus.extend(lo..=hi);
        }
        cpus.sort_unstable();
        cpus.dedup();
        Ok(Self { cpus })
    }
}

impl fmt::Display for CpuList {
    /// Canonical `taskset -c` form: ascending, consecutive CPUs folded into ranges.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut i = 0;
        while i < self.cpus.len() {
            let start = self.cpus[i];
            let mut end = start;
            while i + 1 < self.cpus.len() && self.cpus[i + 1] == end + 1 {
                i += 1;
                end = self.cpus[i];
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if start == end {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
            i += 1;
        }
        Ok(())
    }
}

/// The run's pinning, resolved once at start.
#[derive(Debug, Clone, Default)]
pub struct Pinning {
    /// `--pin-targets`: the CPUs every target process runs on.
    pub targets: Option<CpuList>,
    /// `--pin-load`: the CPUs the harness (load generators, backends, iperf3) runs on.
    pub load: Option<CpuList>,
    /// The CPUs target processes are started on: `targets`, or with only `load` given the
    /// harness's CPUs from before it pinned itself (so targets do not inherit the load's set).
    pub launch_cpus: Option<CpuList>,
    /// `taskset`, found when `launch_cpus` is set.
    pub taskset: Option<PathBuf>,
}

impl Pinning {
    /// Resolves the flags and pins this process to `load` (call before any thread starts).
    pub fn apply(targets: Option<CpuList>, load: Option<CpuList>) -> Result<Self> {
        let before = CpuList::current()?;
        let launch_cpus = match (&targets, &load) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(_)) => Some(before),
            (None, None) => None,
        };
        let taskset = match launch_cpus {
            Some(_) => Some(
                find_binary("taskset")
                    .context("--pin-targets/--pin-load need taskset (util-linux)")?,
            ),
            None => None,
        };
        if let Some(cpus) = &load {
            let mut set = CpuSet::new();
            for &c in &cpus.cpus {
                set.set(c).context("CPU number out of range")?;
            }
            sched_setaffinity(Pid::from_raw(0), &set)
                .with_context(|| format!("sched_setaffinity to CPUs {cpus}"))?;
        }
        Ok(Self {
            targets,
            load,
            launch_cpus,
            taskset,
        })
    }

    /// Cores of the targets' CPU set when `--pin-targets` was given.
    pub fn target_cores(&self) -> Option<usize> {
        self.targets.as_ref().map(CpuList::cores)
    }

    /// One line for the report header.
    pub fn describe(&self) -> String {
        let targets = match &self.targets {
            Some(c) => format!("targets on CPUs {c} (taskset -c {c})"),
            None => "targets not pinned".to_owned(),
        };
        let load = match &self.load {
            Some(c) => format!("load generator and backends on CPUs {c} (sched_setaffinity)"),
            None => "load generator and backends not pinned".to_owned(),
        };
        match (&self.targets, &self.load) {
            (None, None) => "none".to_owned(),
            _ => format!("{targets}; {load}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_like_taskset_and_print_canonically() {
        let list: CpuList = "3,0-1,1".parse().expect("valid list");
        assert_eq!(list.cores(), 3);
        assert_eq!(list.to_string(), "0-1,3");
        assert_eq!("0".parse::<CpuList>().expect("one CPU").to_string(), "0");
        assert_eq!(
            "4-7,0,2".parse::<CpuList>().expect("valid").to_string(),
            "0,2,4-7"
        );
        for bad in ["", "a", "2-1", "1-", "0,,1", "99999"] {
            assert!(bad.parse::<CpuList>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn the_current_affinity_is_a_valid_list() {
        let now = CpuList::current().expect("sched_getaffinity");
        assert!(now.cores() >= 1);
        let again: CpuList = now.to_string().parse().expect("round trip");
        assert_eq!(again, now);
    }

    #[test]
    fn unpinned_runs_say_none_and_pinned_runs_name_both_sets() {
        assert_eq!(Pinning::default().describe(), "none");
        let p = Pinning {
            targets: Some("0".parse().expect("valid")),
            load: Some("1".parse().expect("valid")),
            ..Pinning::default()
        };
        assert_eq!(
            p.describe(),
            "targets on CPUs 0 (taskset -c 0); load generator and backends on CPUs 1 \
             (sched_setaffinity)"
        );
        assert_eq!(p.target_cores(), Some(1));
    }
}
