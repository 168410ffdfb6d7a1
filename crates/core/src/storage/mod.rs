//! The on-disk engine: one redb database per data dir.
//!
//! Owns opening the data dir (identity, corruption and ownership checks) and the
//! write-ahead log ([`wal`]) that holds the Raft log's entries and hard state; the MVCC
//! keyspace lives in the database, in tables the keyspace module owns. Raft's view of
//! both together is `crate::raft::RaftLog`. Every Ready's entries and hard state are made durable with
//! one append and fdatasync before anything that depends on them leaves the node; the
//! keyspace is committed durably now and then, and the log keeps every entry the
//! durable keyspace has not applied.

mod db;
mod identity;
pub mod vfs;
pub mod wal;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use db::Db;
pub use identity::{stable_id as identity_stable_id, Identity};

/// Where a member keeps snapshot files (built here, or received from the leader).
pub fn snapshot_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("snap")
}

/// Records kept beside the state machine, written in the state machine's own
/// transaction so that they commit atomically with it: the Raft log's snapshot point
/// and conf state (`crate::raft::RaftLog`) and the member identity. The keyspace's
/// apply batch hands one out; nothing outside the storage and keyspace modules sees
/// the database transaction itself.
pub struct SideTxn<'a> {
    txn: &'a redb::WriteTransaction,
}

/// The table of the Raft log's own records (snapshot point, conf state).
pub(crate) const RAFT_STATE: redb::TableDefinition<&str, &[u8]> =
    redb::TableDefinition::new("raft_state");

impl<'a> SideTxn<'a> {
    pub(crate) fn new(txn: &'a redb::WriteTransaction) -> SideTxn<'a> {
        SideTxn { txn }
    }

    /// Stores one of the Raft log's records under `key` in the `raft_state` table.
    pub fn put_raft_state(&self, key: &str, record: &[u8]) -> Result<(), StorageError> {
        let mut t = self.txn.open_table(RAFT_STATE).map_err(db_err)?;
        t.insert(key, record).map_err(db_err)?;
        Ok(())
    }

    /// Records the member identity (once, when the member is created).
    pub fn put_identity(&self, identity: &Identity) -> Result<(), StorageError> {
        identity.store(self.txn)
    }
}

/// File name of the database inside the data dir.
pub const DB_FILE: &str = "meshd.redb";

/// Errors of the storage layer. A member that cannot trust its disk must stop rather
/// than vote or answer: a failed read or write (`Db`, `Io`) takes the Raft driver out
/// of Raft until it has reopened the database from disk; the others are fatal.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The data dir could not be created or read.
    #[error("data dir {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The database file failed its integrity checks or could not be decoded.
    #[error("data dir {path} is corrupt: {detail} (restore it from a snapshot or remove the member and re-add it)")]
    Corrupt { path: PathBuf, detail: String },
    /// Another process holds the database.
    #[error("data dir {path} is in use by another meshd process")]
    InUse { path: PathBuf },
    /// The data dir was created for another member or cluster.
    #[error("data dir {path} belongs to {found}, but this node is configured as {expected}")]
    WrongOwner {
        path: PathBuf,
        found: String,
        expected: String,
    },
    /// A read or write of the database failed.
    #[error("storage: {0}")]
    Db(#[from] redb::Error),
    /// A stored record did not decode.
    #[error("storage: undecodable {what}: {detail}")]
    Decode { what: &'static str, detail: String },
}

impl StorageError {
    pub(crate) fn decode(what: &'static str, e: impl std::fmt::Display) -> Self {
        StorageError::Decode {
            what,
            detail: e.to_string(),
        }
    }
}

/// Converts any redb error type into ours.
pub(crate) fn db_err<E: Into<redb::Error>>(e: E) -> StorageError {
    StorageError::Db(e.into())
}

/// The database's page cache unless configured (`--backend-cache-bytes`). It is
/// memory of the process (the file's pages are in the kernel's page cache as well),
/// and most of what a member reads comes from its key index and recent pages.
pub const DEFAULT_CACHE_BYTES: usize = 256 << 20;

/// Opens (creating if needed) the database of a data dir.
pub fn open_database(dir: &Path) -> Result<Arc<Db>, StorageError> {
    open_database_on(vfs::real(), dir, DEFAULT_CACHE_BYTES)
}

/// Opens (creating if needed) the database of a data dir on `vfs`, with a page cache
/// of at most `cache_bytes`.
pub fn open_database_on(
    vfs: Arc<dyn vfs::Vfs>,
    dir: &Path,
    cache_bytes: usize,
) -> Result<Arc<Db>, StorageError> {
    let io = |source| StorageError::Io {
        path: dir.to_path_buf(),
        source,
    };
    if !vfs.exists(dir) {
        vfs.create_dir_all(dir).map_err(io)?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            vfs.sync_dir(parent).map_err(io)?;
        }
    }
    let path = dir.join(DB_FILE);
    let created = !vfs.exists(&path);
    let db = open_redb(&*vfs, &path, cache_bytes)?;
    if created {
        // A new file's name is durable only once its directory is synced.
        vfs.sync_dir(dir).map_err(io)?;
    }
    Ok(Arc::new(Db::on(vfs, db, path, cache_bytes)))
}

/// Opens (creating if needed) the database file and verifies it.
fn open_redb(
    vfs: &dyn vfs::Vfs,
    path: &Path,
    cache_bytes: usize,
) -> Result<redb::Database, StorageError> {
    let path = path.to_path_buf();
    // redb can panic on a damaged file (e.g. an index out of range while it walks the
    // allocator state): that is a corrupt data dir to report, not a crash.
    // A panic inside redb leaves none of our own state half-changed.
    let started = std::time::Instant::now();
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut db = vfs.open_redb(&path, cache_bytes)?;
        Ok((verify(&mut db), db))
    }));
    let result = match opened {
        Ok(r) => r,
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            return Err(StorageError::Corrupt {
                path,
                detail: format!("the database engine failed on it: {what}"),
            });
        }
    };
    match result {
        Ok((Ok(()), db)) => {
            tracing::info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "database opened and its page checksums verified"
            );
            Ok(db)
        }
        Ok((Err(detail), _)) => Err(StorageError::Corrupt { path, detail }),
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => Err(StorageError::InUse { path }),
        // A file shorter than its own header says is truncated, not unreadable.
        Err(redb::DatabaseError::Storage(redb::StorageError::Io(source)))
            if source.kind() == std::io::ErrorKind::UnexpectedEof =>
        {
            Err(StorageError::Corrupt {
                path,
                detail: format!("the file is truncated ({source})"),
            })
        }
        Err(redb::DatabaseError::Storage(redb::StorageError::Io(source)))
            if source.kind() != std::io::ErrorKind::InvalidData =>
        {
            Err(StorageError::Io { path, source })
        }
        Err(e) => Err(StorageError::Corrupt {
            path,
            detail: e.to_string(),
        }),
    }
}

/// Verifies every page checksum of the file before the member uses it: redb checks
/// them only when it repairs after an unclean shutdown, never on reads, so a byte
/// flipped at rest would otherwise be served. Costs one read of the file per start.
/// A file that fails is refused even when redb could roll it back to an older commit:
/// that commit may lack fsynced Raft state (a vote, acknowledged entries), and a
/// member that forgets those can break Raft's safety.
fn verify(db: &mut redb::Database) -> Result<(), String> {
    match db.check_integrity() {
        Ok(true) => Ok(()),
        Ok(false) => Err(
            "page checksums do not match (redb rolled the file back to an older \
                          commit, which may have lost fsynced Raft state)"
                .to_string(),
        ),
        Err(e) => Err(format!("integrity check failed: {e}")),
    }
}

/// The free-space reserve of the data dir's filesystem (`--min-free-disk-bytes`),
/// checked before each write that adds data. An answer of the filesystem (one
/// `statvfs`) is reused for at most [`DiskReserve::RECHECK`], and only while the
/// writes admitted since are estimated (from their request bytes) to use less than a
/// quarter of the room it left above the reserve; below the reserve every write asks
/// again (so space coming back is seen at once). A statvfs per write would be a
/// syscall on the put path for an answer that rarely changes. This is a guard, not a
/// guarantee: other members' replicated writes, snapshots, and a write whose effect
/// exceeds its request (a Put with `ignore_value`) are not counted, and the reserve is
/// what absorbs them.
pub struct DiskReserve {
    dir: PathBuf,
    min_free: u64,
    recheck: std::time::Duration,
    state: std::sync::Mutex<ReserveState>,
}

#[derive(Default)]
struct ReserveState {
    checked: Option<std::time::Instant>,
    /// Bytes free above the reserve at the last check.
    room: u64,
    /// Estimated bytes written for the writes admitted since.
    admitted: u64,
    low: bool,
}

/// What [`DiskReserve::admit`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskCheck {
    /// Less than the reserve is free: the write must be refused.
    pub low: bool,
    /// `low` differs from the previous check's answer (to log the change once).
    pub changed: bool,
}

impl DiskReserve {
    /// Longest time an answer is reused.
    pub const RECHECK: std::time::Duration = std::time::Duration::from_millis(100);

    /// Disk bytes a write of n request bytes is counted as using: the log's copy, the
    /// keyspace's, copied B-tree pages, and a page for small writes.
    fn cost(request_bytes: usize) -> u64 {
        (request_bytes as u64)
            .saturating_mul(4)
            .saturating_add(4096)
    }

    /// A reserve of `min_free` bytes (0: none) on the filesystem holding `dir`.
    pub fn new(dir: PathBuf, min_free: u64) -> DiskReserve {
        DiskReserve {
            dir,
            min_free,
            recheck: Self::RECHECK,
            state: Default::default(),
        }
    }

    /// Whether a write of `request_bytes` finds the reserve free.
    pub fn admit(&self, request_bytes: usize) -> DiskCheck {
        let none = DiskCheck {
            low: false,
            changed: false,
        };
        if self.min_free == 0 {
            return none;
        }
        let cost = Self::cost(request_bytes);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = st.checked.is_some_and(|t| t.elapsed() < self.recheck);
        if fresh && !st.low && st.admitted.saturating_add(cost) <= st.room / 4 {
            st.admitted += cost;
            return none;
        }
        // An unknown answer (the filesystem cannot say) refuses nothing, and is asked
        // again after RECHECK.
        let free = disk_free_bytes(&self.dir);
        let low = free.is_some_and(|f| f < self.min_free);
        let changed = low != st.low;
        *st = ReserveState {
            checked: Some(std::time::Instant::now()),
            room: free.map_or(u64::MAX, |f| f.saturating_sub(self.min_free)),
            admitted: if low { 0 } else { cost },
            low,
        };
        DiskCheck { low, changed }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn min_free(&self) -> u64 {
        self.min_free
    }
}

/// Bytes available to unprivileged writers on the filesystem holding `path`, or None
/// if the filesystem cannot say.
pub fn disk_free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `st` is written by statvfs
    // before it is read (only when it returns 0).
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    // The field types differ between platforms (u32 on some 32-bit targets).
    #[allow(clippy::unnecessary_cast)]
    let (avail, frsize) = (st.f_bavail as u64, st.f_frsize as u64);
    Some(avail.saturating_mul(frsize))
}

/// Writes `bytes` to a probe file in `dir`, fsyncs it and removes it: whether the
/// filesystem takes writes again (statvfs alone does not see quotas or reserved blocks).
pub fn probe_write(dir: &Path, bytes: usize) -> std::io::Result<()> {
    use std::io::Write;
    let path = dir.join(".write-probe");
    let written = std::fs::File::create(&path).and_then(|mut f| {
        f.write_all(&vec![0u8; bytes])?;
        f.sync_all()
    });
    let removed = std::fs::remove_file(&path);
    written?;
    removed
}

/// File in the data dir holding this node's mesh peer name (16 hex digits).
pub const PEER_NAME_FILE: &str = "mesh-peer-name";

/// The contents of a peer-name file: 16 hex digits, not zero.
pub fn parse_peer_name(text: &str) -> Option<u64> {
    u64::from_str_radix(text.trim(), 16)
        .ok()
        .filter(|n| *n != 0)
}

/// The node's stable mesh peer name: created once per data dir, random, never zero.
pub fn load_or_create_peer_name(dir: &Path) -> Result<u64, StorageError> {
    let path = dir.join(PEER_NAME_FILE);
    let io = |source| StorageError::Io {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => parse_peer_name(&text).ok_or_else(|| StorageError::Corrupt {
            path: path.clone(),
            detail: format!("not a mesh peer name: {:?}", text.trim()),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut name = 0u64;
            while name == 0 {
                name = rand::random();
            }
            let tmp = path.with_extension("tmp");
            {
                use std::io::Write;
                let mut f = std::fs::File::create(&tmp).map_err(io)?;
                writeln!(f, "{name:016x}").map_err(io)?;
                f.sync_all().map_err(io)?;
            }
            std::fs::rename(&tmp, &path).map_err(io)?;
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
            Ok(name)
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod reserve_tests {
    use super::*;

    #[test]
    fn a_reserve_refuses_below_it_and_says_when_that_changes() {
        let dir = tempfile::tempdir().unwrap();
        let none = DiskReserve::new(dir.path().into(), 0);
        assert!(!none.admit(100).low);
        let mut all = DiskReserve::new(dir.path().into(), u64::MAX);
        all.recheck = std::time::Duration::from_secs(3600);
        let first = all.admit(100);
        assert!(first.low && first.changed, "{first:?}");
        let asked = all.state.lock().unwrap().checked;
        // Below the reserve every write asks again, and the answer has not changed.
        let again = all.admit(100);
        assert!(again.low && !again.changed, "{again:?}");
        assert_ne!(all.state.lock().unwrap().checked, asked);
        let some = DiskReserve::new(dir.path().into(), 1);
        for _ in 0..3 {
            assert_eq!(
                some.admit(100),
                DiskCheck {
                    low: false,
                    changed: false
                }
            );
        }
    }

    #[test]
    fn the_filesystem_is_asked_again_once_a_quarter_of_the_room_may_be_used() {
        let dir = tempfile::tempdir().unwrap();
        let free = disk_free_bytes(dir.path()).unwrap();
        // Up to 1 GiB of room above the reserve (half the free space on a small
        // filesystem), and answers reused for an hour.
        let room = (free / 2).min(1 << 30);
        assert!(room > 64 << 10, "{free} bytes free");
        let mut r = DiskReserve::new(dir.path().into(), free - room);
        r.recheck = std::time::Duration::from_secs(3600);
        let asked = |r: &DiskReserve| r.state.lock().unwrap().checked;
        assert!(!r.admit(1).low);
        let first = asked(&r);
        assert!(!r.admit(1).low);
        assert_eq!(
            asked(&r),
            first,
            "a small write is admitted on the last answer"
        );
        // Counted as 512 MiB and more: past a quarter of the room, so it asks again.
        assert!(!r.admit(128 << 20).low);
        assert_ne!(asked(&r), first);
    }
}
