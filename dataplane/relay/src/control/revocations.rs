//! The revoked identities (`Pki.WatchRevocations`) and their snapshot file in the state
//! directory, so a relay restarted while the controller is down still knows them.
//!
//! The file is JSON (`{"version":1,"uris":[...]}`), written atomically: a temp file in the
//! same directory, fsync, rename, fsync of the directory. A missing file means "no snapshot";
//! an unreadable or malformed one is an error the caller logs (and agents stay refused until
//! the controller answers).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// File name of the snapshot inside `state_dir`.
pub const SNAPSHOT_FILE: &str = "revocations.json";
/// The snapshot format written and accepted.
const SNAPSHOT_VERSION: u32 = 1;

/// One complete list of revoked identity URIs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revocations {
    /// Revoked identity URIs, exactly as the controller sent them.
    pub uris: BTreeSet<String>,
}

#[derive(Serialize, Deserialize)]
struct File {
    version: u32,
    uris: Vec<String>,
}

/// Why the snapshot file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// An I/O error on `path`.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not a snapshot this relay wrote.
    #[error("{path}: not a revocation snapshot: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

impl Revocations {
    /// Whether `uri` is revoked.
    pub fn contains(&self, uri: &str) -> bool {
        self.uris.contains(uri)
    }

    /// Loads the snapshot from `state_dir`; `Ok(None)` when there is none.
    ///
    /// # Errors
    /// [`SnapshotError`] when the file exists but cannot be read or parsed.
    pub fn load(state_dir: &Path) -> Result<Option<Revocations>, SnapshotError> {
        let path = state_dir.join(SNAPSHOT_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(SnapshotError::Io { path, source }),
        };
        let file: File = serde_json::from_str(&text).map_err(|e| SnapshotError::Malformed {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        if file.version != SNAPSHOT_VERSION {
            return Err(SnapshotError::Malformed {
                path,
                reason: format!("version {} (expected {SNAPSHOT_VERSION})", file.version),
            });
        }
        Ok(Some(Revocations {
            uris: file.uris.into_iter().collect(),
        }))
    }

    /// Writes the snapshot to `state_dir` atomically (creating the directory, mode 0700).
    ///
    /// # Errors
    /// [`SnapshotError::Io`].
    pub fn store(&self, state_dir: &Path) -> Result<(), SnapshotError> {
        use std::os::unix::fs::DirBuilderExt;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| SnapshotError::Io { path, source }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(io(state_dir))?;
        let path = state_dir.join(SNAPSHOT_FILE);
        let tmp = state_dir.join(format!("{SNAPSHOT_FILE}.tmp"));
        let body = serde_json::to_vec(&File {
            version: SNAPSHOT_VERSION,
            uris: self.uris.iter().cloned().collect(),
        })
        .map_err(|e| SnapshotError::Malformed {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&body).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        std::fs::File::open(state_dir)
            .and_then(|d| d.sync_all())
            .map_err(io(state_dir))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_file_is_no_snapshot_and_a_stored_one_round_trips() {
        let dir = tempfile::tempdir().expect("tmp");
        let state = dir.path().join("state");
        assert_eq!(Revocations::load(&state).expect("load"), None);
        let r = Revocations {
            uris: ["outrelay://demo/agent/00000000-0000-4000-8000-000000000001".to_owned()]
                .into_iter()
                .collect(),
        };
        r.store(&state).expect("store");
        assert_eq!(Revocations::load(&state).expect("load"), Some(r.clone()));
        // Overwriting replaces it whole (no temp file left behind).
        Revocations::default().store(&state).expect("store");
        assert_eq!(
            Revocations::load(&state).expect("load"),
            Some(Revocations::default())
        );
        assert!(!state.join(format!("{SNAPSHOT_FILE}.tmp")).exists());
    }

    #[test]
    fn malformed_or_foreign_files_are_errors() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(
            dir.path().join(SNAPSHOT_FILE),
            b"{\"version\":2,\"uris\":[]}",
        )
        .expect("write");
        assert!(matches!(
            Revocations::load(dir.path()),
            Err(SnapshotError::Malformed { .. })
        ));
        std::fs::write(dir.path().join(SNAPSHOT_FILE), b"garbage").expect("write");
        assert!(Revocations::load(dir.path()).is_err());
    }
}
