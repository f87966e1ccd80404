//! The store: sole owner of the SQLite file.
//!
//! - One file in WAL mode with `synchronous=FULL`: a write is acknowledged only after its
//!   transaction's COMMIT returned, so it survives kill -9 and power loss.
//! - ONE writer thread owns the read-write connection and does group commit: it takes the first
//!   queued write, drains whatever else is queued (up to `max_batch`), runs each job inside its
//!   own SAVEPOINT of one transaction, COMMITs once, then acknowledges every job. One fsync pays
//!   for the whole batch, which is how durable writes reach thousands per second with many
//!   concurrent writers. A job that fails is rolled back to its savepoint alone.
//! - The write queue is bounded (`write_queue_max`); a full queue refuses the write with
//!   [`StoreError::Busy`] and counts it (`outrelay_controller_store_rejected_total`).
//! - Reads run on a small pool of read-only connections on the blocking thread pool.
//! - Schema versions live in `PRAGMA user_version`; migrations in [`schema`] are applied in
//!   order; a database newer than this binary is refused with [`StoreError::NewerSchema`].

mod schema;

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rusqlite::{Connection, OpenFlags};
use tokio::sync::oneshot;

use crate::audit::ChainHead;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite reported an error.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The disk (or the file system holding the database) is full; nothing of this write was
    /// committed.
    #[error("database or disk is full: write not committed")]
    DiskFull,
    /// The write queue is full; retry later.
    #[error("store write queue full ({0} writes queued)")]
    Busy(usize),
    /// The writer thread is gone (shutting down or crashed).
    #[error("store writer thread stopped")]
    WriterGone,
    /// The database was written by a newer binary.
    #[error(
        "database {path} has schema version {found}, newer than this binary supports ({supported}); refusing to open it (upgrade outrelay-controller or restore a backup)"
    )]
    NewerSchema {
        /// The database file.
        path: PathBuf,
        /// `PRAGMA user_version` found in the file.
        found: i64,
        /// The newest version this binary knows.
        supported: i64,
    },
    /// The batch transaction could not be committed (its writes are rolled back).
    #[error("commit failed: {0}")]
    CommitFailed(String),
    /// The audit chain stored in the database is inconsistent at open.
    #[error("audit chain: {0}")]
    Audit(String),
}

impl StoreError {
    /// Maps SQLITE_FULL (and the I/O error a full disk can surface as) to [`StoreError::DiskFull`].
    fn classify(e: rusqlite::Error) -> StoreError {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DiskFull) => StoreError::DiskFull,
            _ => StoreError::Sqlite(e),
        }
    }
}

/// Store tuning, all from the config file.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// The SQLite database file.
    pub path: PathBuf,
    /// Most writes waiting for the writer thread; more are refused with [`StoreError::Busy`].
    pub write_queue_max: usize,
    /// Most jobs committed in one transaction.
    pub max_batch: usize,
    /// Read-only connections kept open for reuse.
    pub read_pool_max: usize,
}

/// State the writer thread carries across jobs (rolled back with a failed job or batch).
#[derive(Debug, Clone)]
pub struct WriteCtx {
    /// The audit chain's head: last MAC and row count.
    pub audit: ChainHead,
}

type Completion = Box<dyn FnOnce(Result<(), StoreError>) + Send>;
/// A queued write: run with `Some` inside the batch transaction (returns whether the job
/// succeeded and how to acknowledge it), or with `None` when the batch could not start.
type Job = Box<dyn FnOnce(Option<(&Connection, &mut WriteCtx)>) -> (bool, Completion) + Send>;

/// Handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    jobs: SyncSender<Job>,
    write_queue_max: usize,
    path: PathBuf,
    readers: Mutex<Vec<Connection>>,
    read_pool_max: usize,
}

impl Store {
    /// Opens (creating if needed) the database, applies migrations, loads the audit chain head
    /// (MACs keyed by `audit_key`) and starts the writer thread.
    ///
    /// # Errors
    /// SQLite errors, [`StoreError::NewerSchema`], or an audit head that cannot be loaded.
    pub fn open(settings: &StoreSettings, audit_key: [u8; 32]) -> Result<Store, StoreError> {
        let conn = Connection::open(&settings.path).map_err(StoreError::classify)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Sqlite(rusqlite::Error::InvalidQuery));
        }
        conn.execute_batch("PRAGMA synchronous=FULL;")?;
        migrate(&conn, &settings.path)?;
        let audit = crate::audit::load_head(&conn, audit_key)?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(settings.write_queue_max);
        let max_batch = settings.max_batch.max(1);
        std::thread::Builder::new()
            .name("store-writer".to_owned())
            .spawn(move || writer_loop(conn, rx, WriteCtx { audit }, max_batch))
            .map_err(|_| StoreError::WriterGone)?;
        Ok(Store {
            inner: Arc::new(Inner {
                jobs: tx,
                write_queue_max: settings.write_queue_max,
                path: settings.path.clone(),
                readers: Mutex::new(Vec::new()),
                read_pool_max: settings.read_pool_max,
            }),
        })
    }

    /// Runs `f` in the writer thread inside the next group-commit transaction and returns its
    /// result once that transaction is durable. If `f` fails, only its own changes are rolled
    /// back; if the COMMIT fails (disk full), every job of the batch gets the error.
    ///
    /// # Errors
    /// `f`'s error, [`StoreError::Busy`] when the queue is full, the COMMIT's error, or
    /// [`StoreError::WriterGone`].
    pub async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &mut WriteCtx) -> Result<T, StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |env| {
            let result = match env {
                Some((conn, ctx)) => f(conn, ctx),
                None => Err(StoreError::CommitFailed(
                    "could not begin a transaction".to_owned(),
                )),
            };
            let ok = result.is_ok();
            let completion: Completion = Box::new(move |commit: Result<(), StoreError>| {
                let out = match (result, commit) {
                    (Err(e), _) | (Ok(_), Err(e)) => Err(e),
                    (Ok(v), Ok(())) => Ok(v),
                };
                // The caller may have gone away (cancelled RPC); the write stands regardless.
                let _ = tx.send(out);
            });
            (ok, completion)
        });
        match self.inner.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                metrics::counter!("outrelay_controller_store_rejected_total", "reason" => "queue_full")
                    .increment(1);
                return Err(StoreError::Busy(self.inner.write_queue_max));
            }
            Err(TrySendError::Disconnected(_)) => return Err(StoreError::WriterGone),
        }
        rx.await.map_err(|_| StoreError::WriterGone)?
    }

    /// Runs `f` on a read-only connection on the blocking pool. It sees every acknowledged
    /// write.
    ///
    /// # Errors
    /// `f`'s error or a failure to open a read-only connection.
    pub async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let conn = match inner.readers.lock().map(|mut v| v.pop()) {
                Ok(Some(c)) => c,
                _ => open_reader(&inner.path)?,
            };
            let out = f(&conn);
            if let Ok(mut pool) = inner.readers.lock()
                && pool.len() < inner.read_pool_max
            {
                pool.push(conn);
            }
            out
        })
        .await
        .map_err(|_| StoreError::WriterGone)?
    }

    /// Synchronous read for start-up (before the runtime serves anything).
    ///
    /// # Errors
    /// As [`Store::read`].
    pub fn read_blocking<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let conn = open_reader(&self.inner.path)?;
        f(&conn)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }
}

/// A copy of a batch-wide error for each job of the batch.
fn same_error(e: &StoreError) -> StoreError {
    match e {
        StoreError::DiskFull => StoreError::DiskFull,
        other => StoreError::CommitFailed(other.to_string()),
    }
}

fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

fn migrate(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let supported = i64::try_from(schema::MIGRATIONS.len()).unwrap_or(i64::MAX);
    if found > supported {
        return Err(StoreError::NewerSchema {
            path: path.to_owned(),
            found,
            supported,
        });
    }
    for (i, sql) in schema::MIGRATIONS.iter().enumerate() {
        let version = i64::try_from(i + 1).unwrap_or(i64::MAX);
        if version <= found {
            continue;
        }
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE; {sql}; PRAGMA user_version = {version}; COMMIT;"
        ))
        .map_err(StoreError::classify)?;
        tracing::info!(version, "applied schema migration");
    }
    Ok(())
}

fn writer_loop(conn: Connection, rx: Receiver<Job>, mut ctx: WriteCtx, max_batch: usize) {
    let mut batch: Vec<Job> = Vec::with_capacity(max_batch);
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let batch_len = batch.len();
        let before_batch = ctx.clone();
        let mut completions: Vec<Completion> = Vec::with_capacity(batch_len);
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            tracing::error!(error = %e, "store: BEGIN failed");
            metrics::counter!("outrelay_controller_store_commit_failures_total").increment(1);
            let err = StoreError::classify(e);
            for job in batch.drain(..) {
                let (_, completion) = job(None);
                completion(Err(same_error(&err)));
            }
            continue;
        }
        for job in batch.drain(..) {
            if conn.is_autocommit() {
                // SQLite rolled the whole transaction back (disk full, I/O error): run nothing
                // more in autocommit mode; the failed COMMIT below answers every job.
                let (_, completion) = job(None);
                completions.push(completion);
                continue;
            }
            let before_job = ctx.clone();
            let savepoint = conn.execute_batch("SAVEPOINT job");
            if let Err(e) = savepoint {
                let err = StoreError::classify(e);
                let (_, completion) = job(None);
                completions.push(Box::new(move |_| completion(Err(err))));
                continue;
            }
            let (ok, completion) = job(Some((&conn, &mut ctx)));
            metrics::counter!("outrelay_controller_store_jobs_total", "result" => if ok { "ok" } else { "failed" })
                .increment(1);
            let released = ok && conn.execute_batch("RELEASE job").is_ok();
            if !released {
                // Undo this job alone; the rest of the batch is unaffected.
                let _ = conn.execute_batch("ROLLBACK TO job; RELEASE job");
                ctx = before_job;
            }
            completions.push(completion);
        }
        let commit = conn.execute_batch("COMMIT").map_err(StoreError::classify);
        if let Err(e) = &commit {
            tracing::error!(error = %e, jobs = batch_len, "store: COMMIT failed; batch rolled back");
            metrics::counter!("outrelay_controller_store_commit_failures_total").increment(1);
            let _ = conn.execute_batch("ROLLBACK");
            ctx = before_batch;
        }
        metrics::histogram!("outrelay_controller_store_commit_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!("outrelay_controller_store_batch_jobs")
            .record(f64::from(u32::try_from(batch_len).unwrap_or(u32::MAX)));
        for c in completions {
            c(match &commit {
                Ok(()) => Ok(()),
                Err(e) => Err(same_error(e)),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &Path) -> StoreSettings {
        StoreSettings {
            path: dir.join("t.db"),
            write_queue_max: 1024,
            max_batch: 16,
            read_pool_max: 2,
        }
    }

    #[test]
    fn refuses_a_newer_database() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = settings(dir.path());
        let conn = Connection::open(&s.path).expect("open");
        conn.execute_batch("PRAGMA user_version = 99;")
            .expect("set version");
        drop(conn);
        match Store::open(&s, [7; 32]) {
            Err(e @ StoreError::NewerSchema { found: 99, .. }) => {
                assert!(e.to_string().contains("newer than this binary"), "{e}");
            }
            Err(other) => panic!("wrong error: {other}"),
            Ok(_) => panic!("a newer database must be refused"),
        }
    }

    /// Migration 4: rules stored with text p2p/relay modes (any text was accepted) load as
    /// Go's enums; an unknown P2P text becomes FORBIDDEN.
    #[test]
    fn text_policy_modes_migrate_to_go_enums() {
        use outrelay_api::pb::{P2pMode, RelayMode};
        let dir = tempfile::tempdir().expect("tmp");
        let s = settings(dir.path());
        let conn = Connection::open(&s.path).expect("open");
        for (i, sql) in schema::MIGRATIONS.iter().take(3).enumerate() {
            conn.execute_batch(&format!("{sql}; PRAGMA user_version = {};", i + 1))
                .expect("old schema");
        }
        for (id, p2p, relay) in [
            ("a", "", ""),
            ("b", "forbidden", "forward"),
            ("c", "P2P_REQUIRED", "splice"),
            ("d", "whatever", "whatever"),
        ] {
            conn.execute(
                "INSERT INTO policies (id, tenant, caller_pattern, target_pattern, method_pattern, \
                 decision, expires_unix_ms, created_at_unix_ms, p2p_mode, relay_mode) \
                 VALUES (?1, 't', '*', '*', '', 1, 0, 0, ?2, ?3)",
                rusqlite::params![id, p2p, relay],
            )
            .expect("old row");
        }
        drop(conn);
        let store = Store::open(&s, [7; 32]).expect("migrates");
        let rules = store.read_blocking(crate::policy::load_all).expect("load");
        let modes: Vec<(&str, i32, i32)> = rules
            .iter()
            .map(|r| (r.id.as_str(), r.p2p_mode, r.relay_mode))
            .collect();
        assert_eq!(
            modes,
            vec![
                ("a", P2pMode::P2pAllowed as i32, RelayMode::Splice as i32),
                ("b", P2pMode::P2pForbidden as i32, RelayMode::Forward as i32),
                ("c", P2pMode::P2pRequired as i32, RelayMode::Splice as i32),
                ("d", P2pMode::P2pForbidden as i32, RelayMode::Splice as i32),
            ]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn group_commit_acknowledges_each_job_and_isolates_failures() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::open(&settings(dir.path()), [7; 32]).expect("open");
        let mut tasks = Vec::new();
        for i in 0..200i64 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                store
                    .write(move |conn, _| {
                        if i % 50 == 7 {
                            // A failing job: its own insert is rolled back, the batch commits.
                            conn.execute("INSERT INTO revocations VALUES ('x', 't', ?1)", [i])?;
                            return Err(StoreError::CommitFailed("job refused".to_owned()));
                        }
                        conn.execute(
                            "INSERT INTO revocations VALUES (?1, 't', ?2)",
                            rusqlite::params![format!("u{i}"), i],
                        )?;
                        Ok(i)
                    })
                    .await
            }));
        }
        let mut ok = 0;
        for t in tasks {
            if t.await.expect("join").is_ok() {
                ok += 1;
            }
        }
        assert_eq!(ok, 196);
        let n: i64 = store
            .read(|c| Ok(c.query_row("SELECT COUNT(*) FROM revocations", [], |r| r.get(0))?))
            .await
            .expect("count");
        assert_eq!(
            n, 196,
            "failed jobs leave nothing behind; acknowledged ones are all there"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_full_write_queue_refuses_with_busy() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = StoreSettings {
            write_queue_max: 1,
            max_batch: 1,
            ..settings(dir.path())
        };
        let store = Store::open(&s, [7; 32]).expect("open");
        // Block the writer thread inside a job so the queue (1 slot) stays full.
        let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
        let blocker = tokio::spawn({
            let store = store.clone();
            async move {
                store
                    .write(move |_, _| {
                        let _ = hold_rx.recv();
                        Ok(())
                    })
                    .await
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let queued = tokio::spawn({
            let store = store.clone();
            async move { store.write(|_, _| Ok(())).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let refused = store.write(|_, _| Ok(())).await;
        assert!(matches!(refused, Err(StoreError::Busy(1))), "{refused:?}");
        hold_tx.send(()).expect("release");
        blocker.await.expect("join").expect("blocker committed");
        queued.await.expect("join").expect("queued write committed");
    }
}
