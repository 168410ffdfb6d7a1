//! The shared database handle: redb behind a lock that only defragmentation takes
//! exclusively, because `redb::Database::compact` needs `&mut Database`.

use std::path::PathBuf;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use super::{db_err, StorageError};

/// One data dir's redb database, shared by the state machine, the Raft log and the
/// driver. Transactions are begun under a shared lock that is released at once (redb
/// transactions do not borrow the database), so the lock never serialises readers.
pub struct Db {
    inner: RwLock<redb::Database>,
    /// The database file, for its size (Status, quota, defragment).
    path: PathBuf,
}

impl Db {
    pub fn new(db: redb::Database, path: PathBuf) -> Db {
        Db {
            inner: RwLock::new(db),
            path,
        }
    }

    /// Size of the database file in bytes (0 if it cannot be read).
    pub fn file_size(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }

    fn shared(&self) -> std::sync::RwLockReadGuard<'_, redb::Database> {
        // A panic while holding the lock leaves the database itself intact.
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn begin_read(&self) -> Result<redb::ReadTransaction, redb::TransactionError> {
        redb::ReadableDatabase::begin_read(&*self.shared())
    }

    pub fn begin_write(&self) -> Result<redb::WriteTransaction, redb::TransactionError> {
        self.shared().begin_write()
    }

    /// Rewrites the file without its free pages (etcd's defragment). Must be called by
    /// the database's only writer with no write transaction of its own open. New
    /// transactions wait while it runs; read transactions already open are waited for
    /// up to `wait`. Returns the file size before and after.
    pub fn compact(&self, wait: Duration) -> Result<(u64, u64), StorageError> {
        let before = self.file_size();
        let mut db = self.inner.write().unwrap_or_else(|p| p.into_inner());
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
        drop(db);
        Ok((before, self.file_size()))
    }
}
