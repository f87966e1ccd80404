//! The identity on disk: `key.pem` (mode 0600), `cert.pem` and `ca.pem` in a daemon's state
//! directory.
//!
//! Each file is replaced atomically (write a temporary file created with its final mode, fsync,
//! rename over the old one, fsync the directory), so a crash leaves either the old or the new
//! version of each file. The three renames are not one transaction: a crash between them can
//! pair a new key with an old certificate, which [`IdentityStore::load`] detects
//! ([`StoreError::KeyMismatch`]) instead of failing later in a handshake. The key is renamed
//! last so the common crash leaves a consistent OLD identity.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use outrelay_proto::identity::Identity;
use zeroize::Zeroizing;

use crate::cert::{self, CertError, Issued};
use crate::connect::Target;

/// The private key file.
pub const KEY_FILE: &str = "key.pem";
/// The leaf certificate file.
pub const CERT_FILE: &str = "cert.pem";
/// The CA certificate file.
pub const CA_FILE: &str = "ca.pem";
/// Mode of `key.pem`.
pub const KEY_MODE: u32 = 0o600;
/// Mode of `cert.pem` and `ca.pem`.
pub const PUBLIC_MODE: u32 = 0o644;
/// Mode of a state directory this module creates.
pub const DIR_MODE: u32 = 0o700;

/// Why the store could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No per-user data directory could be found (no `$HOME`).
    #[error("no data directory for this user: {0}")]
    NoHome(String),
    /// Nothing enrolled yet in this directory.
    #[error("no identity in {dir} (missing {file}): enroll first")]
    NotEnrolled {
        /// The state directory.
        dir: PathBuf,
        /// The first missing file.
        file: &'static str,
    },
    /// A file or directory operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The key file can be read or written by others; it is not used.
    #[error(
        "{path} has mode {mode:o}: a private key must not be accessible to group or others (chmod 600 {path})"
    )]
    KeyPermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A stored certificate does not parse.
    #[error("{path}: {source}")]
    Cert {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: CertError,
    },
    /// The key does not parse.
    #[error("{path}: not a PEM private key")]
    Key {
        /// The key file.
        path: PathBuf,
    },
    /// `key.pem` is not the key of `cert.pem` (e.g. a crash in the middle of a save).
    #[error("{dir}: key.pem does not match cert.pem; enroll again")]
    KeyMismatch {
        /// The state directory.
        dir: PathBuf,
    },
}

/// An identity read back from disk.
#[derive(Clone)]
pub struct Stored {
    /// `cert.pem`'s text.
    pub cert_pem: String,
    /// `key.pem`'s text (wiped on drop).
    pub key_pem: Zeroizing<String>,
    /// `ca.pem`'s text.
    pub ca_pem: String,
    /// The identity in the certificate.
    pub identity: Identity,
}

impl std::fmt::Debug for Stored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stored")
            .field("identity", &self.identity.to_string())
            .finish_non_exhaustive()
    }
}

/// A state directory holding one identity.
#[derive(Debug, Clone)]
pub struct IdentityStore {
    dir: PathBuf,
}

/// The state directory of daemon `daemon` (`agent`, `relay`): `/var/lib/outrelay-<daemon>`
/// when running as root, else `<per-user data dir>/outrelay-<daemon>` (`$XDG_DATA_HOME` or
/// `~/.local/share`).
///
/// # Errors
/// [`StoreError::NoHome`] when not root and no home directory is known.
pub fn default_dir(daemon: &str) -> Result<PathBuf, StoreError> {
    default_dir_for(daemon, nix::unistd::geteuid().is_root())
}

/// [`default_dir`] with the root decision made by the caller (tests).
///
/// # Errors
/// [`StoreError::NoHome`].
pub fn default_dir_for(daemon: &str, root: bool) -> Result<PathBuf, StoreError> {
    let name = format!("outrelay-{daemon}");
    if root {
        return Ok(Path::new("/var/lib").join(name));
    }
    use etcetera::BaseStrategy as _;
    let base = etcetera::choose_base_strategy().map_err(|e| StoreError::NoHome(e.to_string()))?;
    Ok(base.data_dir().join(name))
}

impl IdentityStore {
    /// A store over `dir` (created on the first [`save`](Self::save)).
    pub fn new(dir: impl Into<PathBuf>) -> IdentityStore {
        IdentityStore { dir: dir.into() }
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `<dir>/key.pem`
    pub fn key_path(&self) -> PathBuf {
        self.dir.join(KEY_FILE)
    }

    /// `<dir>/cert.pem`
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join(CERT_FILE)
    }

    /// `<dir>/ca.pem`
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join(CA_FILE)
    }

    /// A [`Target`] for `controller_url` using this store's files (for [`crate::connect()`]
    /// and [`crate::renew::renew`]).
    pub fn target(&self, controller_url: &str) -> Target {
        Target {
            url: controller_url.to_owned(),
            cert: Some(self.cert_path()),
            key: Some(self.key_path()),
            ca: Some(self.ca_path()),
        }
    }

    /// True when all three files exist (says nothing about their validity).
    pub fn exists(&self) -> bool {
        [KEY_FILE, CERT_FILE, CA_FILE]
            .iter()
            .all(|f| self.dir.join(f).exists())
    }

    /// Writes `issued` atomically (see the module docs). Creates the directory (mode 0700)
    /// when missing; the key file is created with mode 0600, never widened then narrowed.
    ///
    /// # Errors
    /// [`StoreError::Io`].
    pub fn save(&self, issued: &Issued) -> Result<(), StoreError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(&self.dir)
            .map_err(|source| self.io(&self.dir, source))?;
        // Written in this order, renamed key last (module docs).
        let files: [(&str, &[u8], u32); 3] = [
            (CA_FILE, issued.ca_pem.as_bytes(), PUBLIC_MODE),
            (CERT_FILE, issued.cert_pem.as_bytes(), PUBLIC_MODE),
            (KEY_FILE, issued.key_pem.as_bytes(), KEY_MODE),
        ];
        let mut staged = Vec::with_capacity(files.len());
        for (name, bytes, mode) in files {
            let tmp = self.dir.join(format!(".{name}.tmp-{}", std::process::id()));
            if let Err(e) = write_new(&tmp, bytes, mode) {
                for (t, _) in &staged {
                    let _ = std::fs::remove_file(t);
                }
                let _ = std::fs::remove_file(&tmp);
                return Err(self.io(&tmp, e));
            }
            staged.push((tmp, self.dir.join(name)));
        }
        for (tmp, dest) in &staged {
            std::fs::rename(tmp, dest).map_err(|e| self.io(dest, e))?;
        }
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| self.io(&self.dir, e))
    }

    /// Reads the identity back. Refuses a key file accessible to group or others, and a key
    /// that does not match the certificate.
    ///
    /// # Errors
    /// [`StoreError::NotEnrolled`] when a file is missing; else the first problem found.
    pub fn load(&self) -> Result<Stored, StoreError> {
        let key_path = self.key_path();
        let key_pem = {
            let f = self.open(&key_path, KEY_FILE)?;
            // Checked on the open file, not the path, so the file read is the file checked.
            let mode = f
                .metadata()
                .map_err(|e| self.io(&key_path, e))?
                .permissions()
                .mode()
                & 0o777;
            if mode & 0o077 != 0 {
                return Err(StoreError::KeyPermissions {
                    path: key_path,
                    mode,
                });
            }
            let mut s = Zeroizing::new(String::new());
            std::io::Read::read_to_string(&mut &f, &mut s).map_err(|e| self.io(&key_path, e))?;
            s
        };
        let cert_path = self.cert_path();
        let cert_pem = read_string(self.open(&cert_path, CERT_FILE)?, &cert_path)?;
        let ca_path = self.ca_path();
        let ca_pem = read_string(self.open(&ca_path, CA_FILE)?, &ca_path)?;
        let cert_err = |path: &Path| {
            let path = path.to_owned();
            move |source| StoreError::Cert { path, source }
        };
        cert::first_der(&ca_pem).map_err(cert_err(&ca_path))?;
        let der = cert::first_der(&cert_pem).map_err(cert_err(&cert_path))?;
        let info = cert::inspect(&der).map_err(cert_err(&cert_path))?;
        let identity = info
            .identity
            .map_err(|e| cert_err(&cert_path)(CertError::Identity(e)))?;
        let key = rcgen::KeyPair::from_pem(&key_pem).map_err(|_| StoreError::Key {
            path: key_path.clone(),
        })?;
        if key.public_key_raw() != info.public_key.as_slice() {
            return Err(StoreError::KeyMismatch {
                dir: self.dir.clone(),
            });
        }
        Ok(Stored {
            cert_pem,
            key_pem,
            ca_pem,
            identity,
        })
    }

    fn open(&self, path: &Path, file: &'static str) -> Result<std::fs::File, StoreError> {
        std::fs::File::open(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                StoreError::NotEnrolled {
                    dir: self.dir.clone(),
                    file,
                }
            } else {
                self.io(path, source)
            }
        })
    }

    fn io(&self, path: &Path, source: std::io::Error) -> StoreError {
        StoreError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// Creates `path` (must not exist) with `mode` from the first byte, writes, fsyncs.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    // A stale temporary from a crashed save would make create_new fail forever.
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    // The umask may have narrowed the mode; it can never widen it, so 0600 stays 0600.
    f.write_all(bytes)?;
    f.sync_all()
}

fn read_string(f: std::fs::File, path: &Path) -> Result<String, StoreError> {
    let mut s = String::new();
    std::io::Read::read_to_string(&mut &f, &mut s).map_err(|source| StoreError::Io {
        path: path.to_owned(),
        source,
    })?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn issued() -> Issued {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        p.subject_alt_names.push(rcgen::SanType::URI(
            "outrelay://acme/agent/0f8fad5b-d9cb-469f-a165-70867728950e"
                .try_into()
                .expect("ia5"),
        ));
        let cert = p.self_signed(&key).expect("cert").pem();
        Issued {
            cert_pem: cert.clone(),
            key_pem: Zeroizing::new(key.serialize_pem()),
            ca_pem: cert,
            identity: Identity::parse("outrelay://acme/agent/0f8fad5b-d9cb-469f-a165-70867728950e")
                .expect("id"),
            not_after: SystemTime::now(),
        }
    }

    #[test]
    fn saves_with_modes_loads_and_refuses_an_open_key() {
        let tmp = tempfile::tempdir().expect("tmp");
        let store = IdentityStore::new(tmp.path().join("state"));
        assert!(matches!(
            store.load(),
            Err(StoreError::NotEnrolled { file: KEY_FILE, .. })
        ));
        let a = issued();
        store.save(&a).expect("save");
        let mode = |p: PathBuf| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(store.key_path()), 0o600);
        assert_eq!(mode(store.dir().to_owned()), 0o700);
        assert_eq!(mode(store.cert_path()) & 0o022, 0);
        let got = store.load().expect("load");
        assert_eq!(got.identity, a.identity);
        assert_eq!(got.cert_pem, a.cert_pem);
        assert_eq!(*got.key_pem, *a.key_pem);
        // Saving again replaces, and leaves no temporaries behind.
        let b = issued();
        store.save(&b).expect("save again");
        assert_eq!(store.load().expect("load").cert_pem, b.cert_pem);
        let names: Vec<_> = std::fs::read_dir(store.dir())
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");

        std::fs::set_permissions(store.key_path(), std::fs::Permissions::from_mode(0o640))
            .expect("chmod");
        let e = store.load().expect_err("open key");
        assert!(
            matches!(e, StoreError::KeyPermissions { mode: 0o640, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(store.key_path(), std::fs::Permissions::from_mode(0o600))
            .expect("chmod");

        // A key from another save paired with this certificate.
        std::fs::write(store.cert_path(), &a.cert_pem).expect("write");
        assert!(matches!(store.load(), Err(StoreError::KeyMismatch { .. })));
    }

    #[test]
    fn default_dirs() {
        assert_eq!(
            default_dir_for("agent", true).expect("root"),
            PathBuf::from("/var/lib/outrelay-agent")
        );
        if let Ok(p) = default_dir_for("relay", false) {
            assert!(p.ends_with("outrelay-relay"), "{}", p.display());
            assert!(p.is_absolute());
        }
    }
}
