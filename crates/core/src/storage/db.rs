//! The shared database handle: redb behind a lock that only defragmentation and a
//! reopen take exclusively (`redb::Database::compact` needs `&mut Database`; a reopen
//! replaces the handle after a failed write).

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use super::vfs::Vfs;
use super::{db_err, StorageError};

/// One data dir's redb database, shared by the state machine, the Raft log and the
/// driver. Transactions are begun under a shared lock that is released at once (redb
/// transactions do not borrow the database), so the lock never serialises readers.
pub struct Db {
    /// None only while a reopen is under way or after one failed (then every
    /// transaction fails with `DatabaseClosed` until a later reopen succeeds).
    inner: RwLock<Option<redb::Database>>,
    /// The database file, for its size (Status, quota, defragment).
    path: PathBuf,
    /// The filesystem the data dir is on.
    vfs: Arc<dyn Vfs>,
    /// The page cache's bound, for a reopen.
    cache_bytes: usize,
}

impl Db {
    pub fn new(db: redb::Database, path: PathBuf) -> Db {
        Db::on(super::vfs::real(), db, path, super::DEFAULT_CACHE_BYTES)
    }

    /// A database on `vfs` (the simulator's disk, or the real one), reopened with a
    /// page cache of `cache_bytes`.
    pub fn on(vfs: Arc<dyn Vfs>, db: redb::Database, path: PathBuf, cache_bytes: usize) -> Db {
        Db {
            inner: RwLock::new(Some(db)),
            path,
            vfs,
            cache_bytes,
        }
    }

    /// The filesystem of the data dir: the Raft log and snapshots live there too.
    pub fn vfs(&self) -> &Arc<dyn Vfs> {
        &self.vfs
    }

    /// Size of the database file in bytes (0 if it cannot be read).
    pub fn file_size(&self) -> u64 {
        self.vfs.file_len(&self.path).unwrap_or(0)
    }

    /// The data dir holding the database file.
    pub fn dir(&self) -> PathBuf {
        self.path
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .to_path_buf()
    }

    fn shared(&self) -> std::sync::RwLockReadGuard<'_, Option<redb::Database>> {
        // A panic while holding the lock leaves the database itself intact.
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn exclusive(&self) -> std::sync::RwLockWriteGuard<'_, Option<redb::Database>> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn begin_read(&self) -> Result<redb::ReadTransaction, redb::TransactionError> {
        match &*self.shared() {
            Some(db) => redb::ReadableDatabase::begin_read(db),
            None => Err(closed()),
        }
    }

    pub fn begin_write(&self) -> Result<redb::WriteTransaction, redb::TransactionError> {
        match &*self.shared() {
            Some(db) => db.begin_write(),
            None => Err(closed()),
        }
    }

    /// Closes the handle and opens the file again, so that the state in use is exactly
    /// the last durable commit on disk. After a failed write or fsync the old handle
    /// (and the page cache under it) cannot be trusted, and redb refuses further writes
    /// on it; a new handle starts from what the disk really holds. Must be called by
    /// the database's only writer with no write transaction of its own open. Read
    /// transactions still open on the old handle fail with `DatabaseClosed`; new ones
    /// wait until the new handle is in place. On failure the database stays closed
    /// until a later call succeeds.
    pub fn reopen(&self) -> Result<(), StorageError> {
        let mut db = self.exclusive();
        if let Some(old) = db.take() {
            // Errors here concern the failed handle being discarded.
            if let Err(e) = old.close() {
                tracing::warn!("closing the database after a failed write: {e}");
            }
        }
        self.vfs.drop_cache(&self.path);
        *db = Some(super::open_redb(&*self.vfs, &self.path, self.cache_bytes)?);
        Ok(())
    }

    /// Rewrites the file without its free pages (etcd's defragment). Must be called by
    /// the database's only writer with no write transaction of its own open. New
    /// transactions wait while it runs; read transactions already open are waited for
    /// up to `wait`. Returns the file size before and after.
    pub fn compact(&self, wait: Duration) -> Result<(u64, u64), StorageError> {
        let before = self.file_size();
        let mut guard = self.exclusive();
        let Some(db) = guard.as_mut() else {
            return Err(db_err(closed()));
        };
        let deadline = Instant::now() + wait;
        // redb compacts in passes; repeat until nothing more moves (bounded, in case
        // a pass keeps reporting progress).
        let mut passes = 0;
        while passes < 32 {
            match db.compact() {
                Ok(true) => passes += 1,
                Ok(false) => break,
                Err(redb::CompactionError::TransactionInProgress) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(db_err(e)),
            }
        }
        drop(guard);
        Ok((before, self.file_size()))
    }
}

fn closed() -> redb::TransactionError {
    redb::TransactionError::Storage(redb::StorageError::DatabaseClosed)
}
