//! A systemd `NOTIFY_SOCKET` stand-in: systemd is not PID 1 on the test machines, so a test
//! binds a Unix datagram socket, points a daemon's `NOTIFY_SOCKET` at it and reads what the
//! daemon reports (`READY=1`, `WATCHDOG=1`, `STOPPING=1`, ...).

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// One line of one notification, with what was true when it arrived.
#[derive(Debug, Clone)]
pub struct Notice {
    /// The line, e.g. `READY=1`.
    pub line: String,
    /// When it arrived (compare with a file's mtime).
    pub wall: std::time::SystemTime,
    /// Whether the watched ready file existed when it arrived.
    pub ready_file_existed: bool,
}

/// A bound notify socket and the thread reading it.
pub struct NotifyListener {
    /// The socket's path: the daemon's `NOTIFY_SOCKET`.
    pub path: PathBuf,
    rx: mpsc::Receiver<Notice>,
    /// Every notice read so far.
    pub seen: Vec<Notice>,
}

impl NotifyListener {
    /// Binds `dir/notify.sock`; each notice records whether `ready_file` (if given) existed
    /// then.
    ///
    /// # Panics
    /// The socket cannot be bound.
    pub fn bind(dir: &Path, ready_file: Option<&Path>) -> NotifyListener {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        let ready_file = ready_file.map(Path::to_path_buf);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                let wall = std::time::SystemTime::now();
                let existed = ready_file.as_ref().is_some_and(|p| p.exists());
                for line in String::from_utf8_lossy(&buf[..n]).lines() {
                    let notice = Notice {
                        line: line.to_owned(),
                        wall,
                        ready_file_existed: existed,
                    };
                    if tx.send(notice).is_err() {
                        return;
                    }
                }
            }
        });
        NotifyListener {
            path,
            rx,
            seen: Vec::new(),
        }
    }

    /// Waits until `line` has been seen `count` times in all, up to `timeout`; returns the
    /// last such notice.
    pub fn wait_for(&mut self, line: &str, count: usize, timeout: Duration) -> Option<Notice> {
        let deadline = Instant::now() + timeout;
        loop {
            let matching: Vec<&Notice> = self.seen.iter().filter(|n| n.line == line).collect();
            if matching.len() >= count {
                return matching.last().map(|n| (*n).clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(n) => self.seen.push(n),
                Err(_) => return None,
            }
        }
    }
}
