//! Child processes the harness owns (peers, iperf3), and cleanup on every way out.
//!
//! Each child runs in its own process group so that stopping it also stops its workers
//! (nginx) and forked copies (socat). Groups are recorded in a process-wide list so that a
//! signal (Ctrl-C, SIGTERM, SIGHUP) kills them all before the harness exits; normal returns and
//! errors stop them through `Drop`.

use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// How long a stopped child gets to exit after SIGTERM before SIGKILL.
const STOP_GRACE_MS: u64 = 2_000;
/// How many bytes of a child's logs go into an error message.
const LOG_TAIL_BYTES: usize = 2_000;

/// Process groups alive now, killed by the signal handler. A global because a signal can arrive
/// anywhere; it holds plain ids only.
static LIVE_GROUPS: Mutex<Vec<i32>> = Mutex::new(Vec::new());
/// Directories removed by the signal handler (`std::process::exit` skips destructors).
static TEMP_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// A child process in its own process group, with stdout and stderr in log files; stopped
/// (group SIGTERM, then SIGKILL) on drop.
#[derive(Debug)]
pub struct OwnedProcess {
    name: String,
    child: Child,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    reaped: bool,
}

impl OwnedProcess {
    /// Starts `program args` in `dir`, logging to `dir/<name>.stdout` and `dir/<name>.stderr`.
    pub fn spawn(name: &str, program: &Path, args: &[String], dir: &Path) -> Result<Self> {
        let stdout_path = dir.join(format!("{name}.stdout"));
        let stderr_path = dir.join(format!("{name}.stderr"));
        let stdout = File::create(&stdout_path).context("creating stdout log")?;
        let stderr = File::create(&stderr_path).context("creating stderr log")?;
        let mut command = Command::new(program);
        command
            .args(args)
            .current_dir(dir)
            // A peer's Rust backtrace would bury its one-line error in the logs.
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0);
        // Hold the lock across spawn so a signal cannot slip between spawn and registration.
        let mut groups = LIVE_GROUPS.lock().unwrap_or_else(|p| p.into_inner());
        let child = command
            .spawn()
            .with_context(|| format!("starting {name} ({})", program.display()))?;
        groups.push(pid_i32(child.id()));
        drop(groups);
        Ok(Self {
            name: name.to_owned(),
            child,
            stdout_path,
            stderr_path,
            reaped: false,
        })
    }

    /// The child's process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Errors (with the end of its logs) if the child has already exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait().context("polling child")? {
            self.reaped = true;
            let tail = self.log_tail();
            let last = tail
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            bail!(
                "{} exited early ({status}): {}\n{tail}",
                self.name,
                last.trim()
            );
        }
        Ok(())
    }

    /// Waits for the child to exit, killing its group after `timeout`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().context("polling child")? {
                self.reaped = true;
                return Ok(status);
            }
            if Instant::now() >= deadline {
                self.kill_group(Signal::SIGKILL);
                bail!("{} did not finish within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the child wrote to stdout so far.
    pub fn stdout(&self) -> Result<String> {
        fs::read_to_string(&self.stdout_path).context("reading child stdout")
    }

    /// The last few lines of stdout and stderr, for error messages.
    pub fn log_tail(&self) -> String {
        let mut tail = String::new();
        for path in [&self.stdout_path, &self.stderr_path] {
            let text = fs::read_to_string(path).unwrap_or_default();
            let start = text.len().saturating_sub(LOG_TAIL_BYTES);
            let start = (start..text.len())
                .find(|&i| text.is_char_boundary(i))
                .unwrap_or(text.len());
            tail.push_str(&text[start..]);
        }
        tail
    }

    /// `kill -9` of the child's group, then reaps it (a relay that dies without a goodbye).
    pub fn kill9(&mut self) {
        self.kill_group(Signal::SIGKILL);
        if !self.reaped {
            let _ = self.child.wait();
            self.reaped = true;
        }
    }

    /// SIGTERM to the child's group (an orderly stop: OutRelay's relay sends GOAWAY and
    /// drains); [`Self::wait_timeout`] reaps it.
    pub fn terminate(&self) {
        self.kill_group(Signal::SIGTERM);
    }

    fn kill_group(&self, signal: Signal) {
        // ESRCH (already gone) is the expected outcome of a second signal.
        let _ = killpg(Pid::from_raw(pid_i32(self.child.id())), signal);
    }
}

impl Drop for OwnedProcess {
    fn drop(&mut self) {
        if !self.reaped {
            self.kill_group(Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_millis(STOP_GRACE_MS);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    self.reaped = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        // Workers or forked copies may outlive the leader: clear the whole group regardless.
        self.kill_group(Signal::SIGKILL);
        if !self.reaped {
            let _ = self.child.wait();
        }
        let pgid = pid_i32(self.child.id());
        LIVE_GROUPS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|&g| g != pgid);
    }
}

/// Registers a directory for removal when the harness is killed by a signal.
pub fn remove_on_signal(dir: &Path) {
    TEMP_DIRS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(dir.to_owned());
}

/// Starts a thread that, on SIGINT, SIGTERM or SIGHUP, kills every live child group, removes
/// the registered temp dirs and exits with 128 + the signal number.
pub fn install_signal_cleanup() -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals =
        signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]).context("signal setup")?;
    std::thread::Builder::new()
        .name("signal-cleanup".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                let groups = LIVE_GROUPS
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                for pgid in &groups {
                    let _ = killpg(Pid::from_raw(*pgid), Signal::SIGKILL);
                }
                for dir in TEMP_DIRS.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                    let _ = fs::remove_dir_all(dir);
                }
                eprintln!(
                    "outrelay-bench: signal {signal}: killed {} child process group(s), exiting",
                    groups.len()
                );
                std::process::exit(128 + signal);
            }
        })
        .context("starting signal thread")?;
    Ok(())
}

/// Process ids fit in i32 on Linux (`pid_max` ≤ 2^22).
fn pid_i32(pid: u32) -> i32 {
    i32::try_from(pid).unwrap_or(i32::MAX)
}
