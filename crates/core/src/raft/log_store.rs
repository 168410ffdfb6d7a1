//! The Raft log of this member: entries and hard state in the write-ahead log
//! ([`crate::storage::wal`], one append and fdatasync per Ready); conf state and the point of
//! the last installed snapshot in redb, committed with the state machine they belong
//! to. An in-memory mirror serves raft-rs's `Storage` reads.
//!
//! The driver thread is the only writer. Entries and hard states are buffered by
//! [`RaftLog::append`] and [`RaftLog::set_hard_state`] and made durable by
//! [`RaftLog::sync`]; after a failed write the driver reopens the database and calls
//! [`RaftLog::reload`], which forgets whatever was not durable.
//!
//! Data dirs written before the log moved out of redb (`raft_log` table, hard state in
//! `raft_state`) are converted on first open.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use prost011::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError as RaftStorageError};
use redb::TableDefinition;
use tracing::info;

use crate::kv::KvStore;
use crate::proto::meshpb::SnapshotRef;
use crate::storage::vfs::Vfs;
use crate::storage::wal::{Replayed, Wal};
use crate::storage::{db_err, snapshot_dir, Db, SideTxn, StorageError};

/// The log as kept in redb before the write-ahead log; read once to convert.
const LEGACY_LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
use crate::storage::RAFT_STATE as STATE;

const LEGACY_HARD_STATE: &str = "hard_state";
const CONF_STATE: &str = "conf_state";
/// Index and term of the last installed snapshot (the state machine restored to it).
const COMPACTED: &str = "compacted";

#[derive(Default)]
struct Core {
    hard_state: HardState,
    conf_state: ConfState,
    /// Index and term of the entry just before `entries[0]`.
    compacted_index: u64,
    compacted_term: u64,
    /// Entries `compacted_index + 1 ..= last_index`, contiguous.
    entries: VecDeque<Entry>,
    /// What `entries` hold in memory, by [`entry_bytes`].
    bytes: u64,
}

/// Memory an entry takes in the log: its payload and a fixed overhead.
fn entry_bytes(e: &Entry) -> u64 {
    (e.data.len() + e.context.len() + std::mem::size_of::<Entry>()) as u64
}

impl Core {
    fn first_index(&self) -> u64 {
        self.compacted_index + 1
    }
    fn last_index(&self) -> u64 {
        self.compacted_index + self.entries.len() as u64
    }
    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.compacted_index {
            return Ok(self.compacted_term);
        }
        if idx < self.compacted_index {
            return Err(raft::Error::Store(RaftStorageError::Compacted));
        }
        if idx > self.last_index() {
            return Err(raft::Error::Store(RaftStorageError::Unavailable));
        }
        Ok(self.entries[(idx - self.first_index()) as usize].term)
    }
}

/// The Raft log of this member. Cheap to clone; all clones share one mirror.
#[derive(Clone)]
pub struct RaftLog {
    core: Arc<RwLock<Core>>,
    wal: Arc<Mutex<Wal>>,
    kv: Arc<KvStore>,
    snapshots: Arc<Snapshots>,
}

/// The snapshot files this member builds for followers, in the data dir's `snap/`.
/// One is kept and offered for as long as the log still continues from it, so a
/// follower that needs a snapshot again does not make the leader build one again.
struct Snapshots {
    vfs: Arc<dyn Vfs>,
    dir: PathBuf,
    state: Mutex<SnapState>,
    /// Build on the caller's thread (the simulator, where nothing may run beside it).
    inline: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct SnapState {
    built: Option<(SnapshotMetadata, SnapshotRef)>,
    building: bool,
}

impl Snapshots {
    /// Opens `dir`, removing what an earlier run left there.
    fn open(vfs: &Arc<dyn Vfs>, dir: PathBuf) -> Result<Snapshots, StorageError> {
        let io = |source| StorageError::Io {
            path: dir.clone(),
            source,
        };
        if vfs.exists(&dir) {
            vfs.remove_dir_all(&dir).map_err(io)?;
        }
        vfs.create_dir_all(&dir).map_err(io)?;
        Ok(Snapshots {
            vfs: vfs.clone(),
            dir,
            state: Mutex::new(SnapState::default()),
            inline: Default::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SnapState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the state `txn` holds as the snapshot at `meta` (on its own thread).
    fn build(&self, txn: redb::ReadTransaction, meta: SnapshotMetadata) {
        let path = self.dir.join(format!("{:020}.snap", meta.index));
        let started = std::time::Instant::now();
        let written = crate::kv::snapfile::write_snapshot(&*self.vfs, &txn, &path);
        drop(txn);
        let mut st = self.lock();
        st.building = false;
        match written {
            Ok(file) => {
                info!(
                    index = meta.index,
                    bytes = file.len,
                    took = ?started.elapsed(),
                    "snapshot built for followers"
                );
                if let Some((_, old)) = st.built.take() {
                    if old.path != path.to_string_lossy() {
                        let _ = self.vfs.remove_file(std::path::Path::new(&old.path));
                    }
                }
                let r = SnapshotRef {
                    len: file.len,
                    sha256: file.sha256.to_vec(),
                    path: path.to_string_lossy().into_owned(),
                };
                st.built = Some((meta, r));
            }
            Err(e) => {
                tracing::warn!(index = meta.index, "building a snapshot failed: {e}");
                let _ = self.vfs.remove_file(&path);
            }
        }
    }
}

impl RaftLog {
    /// Builds snapshots for followers on the calling thread instead of one of their
    /// own (the simulator, which runs everything on one thread in a fixed order).
    pub fn build_snapshots_inline(&self) {
        self.snapshots
            .inline
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Loads the log of `db`'s data dir. A fresh data dir yields an empty log.
    pub fn load(db: &Db, kv: Arc<KvStore>) -> Result<RaftLog, StorageError> {
        let (wal, core) = read_core(db, &kv)?;
        let snapshots = Snapshots::open(db.vfs(), snapshot_dir(&db.dir()))?;
        Ok(RaftLog {
            core: Arc::new(RwLock::new(core)),
            wal: Arc::new(Mutex::new(wal)),
            kv,
            snapshots: Arc::new(snapshots),
        })
    }

    /// Replaces the in-memory mirror (seen by every clone) with what is durable on
    /// disk: after a failed write, the mirror and the log file may hold entries that
    /// were never made durable. Call after reopening the database and reloading the
    /// state machine (the commit index is checked against its applied index).
    pub fn reload(&self, db: &Db) -> Result<(), StorageError> {
        let mut wal = self.wal();
        wal.discard_unsynced()?;
        let (new_wal, core) = read_core(db, &self.kv)?;
        *wal = new_wal;
        *self.wl() = core;
        Ok(())
    }

    fn rl(&self) -> std::sync::RwLockReadGuard<'_, Core> {
        self.core.read().unwrap_or_else(|p| p.into_inner())
    }
    fn wl(&self) -> std::sync::RwLockWriteGuard<'_, Core> {
        self.core.write().unwrap_or_else(|p| p.into_inner())
    }
    fn wal(&self) -> std::sync::MutexGuard<'_, Wal> {
        self.wal.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn hard_state(&self) -> HardState {
        self.rl().hard_state.clone()
    }
    pub fn conf_state(&self) -> ConfState {
        self.rl().conf_state.clone()
    }
    pub fn first_index(&self) -> u64 {
        self.rl().first_index()
    }
    pub fn last_index(&self) -> u64 {
        self.rl().last_index()
    }

    /// Memory the entries take.
    pub fn held_bytes(&self) -> u64 {
        self.rl().bytes
    }

    /// The highest index at or below `upto` whose following entries up to `upto` take
    /// at most `budget` bytes: compacting to it keeps that much of the log's tail.
    pub fn index_keeping(&self, budget: u64, upto: u64) -> u64 {
        let core = self.rl();
        let upto = upto.min(core.last_index());
        let mut kept = 0;
        let mut at = upto;
        while at > core.compacted_index {
            let e = &core.entries[(at - core.first_index()) as usize];
            kept += entry_bytes(e);
            if kept > budget {
                return at;
            }
            at -= 1;
        }
        core.compacted_index
    }

    /// Appends entries, first discarding any conflicting suffix (entries at or after the
    /// first new index), as Raft requires when a new leader overwrites an uncommitted
    /// tail. Durable after [`RaftLog::sync`].
    pub fn append(&self, ents: &[Entry]) {
        let Some(first) = ents.first() else {
            return;
        };
        let mut core = self.wl();
        assert!(
            first.index > core.compacted_index,
            "append at {} overwrites compacted log (compacted to {})",
            first.index,
            core.compacted_index
        );
        assert!(
            first.index <= core.last_index() + 1,
            "append at {} leaves a gap after {}",
            first.index,
            core.last_index()
        );
        if first.index <= core.last_index() {
            let keep = (first.index - core.first_index()) as usize;
            let dropped: u64 = core.entries.range(keep..).map(entry_bytes).sum();
            core.bytes -= dropped;
            core.entries.truncate(keep);
        }
        core.bytes += ents.iter().map(entry_bytes).sum::<u64>();
        core.entries.extend(ents.iter().cloned());
        drop(core);
        self.wal().append(ents);
    }

    /// Records a hard state. Durable after [`RaftLog::sync`].
    pub fn set_hard_state(&self, hs: &HardState) {
        self.wal().set_hard_state(hs);
        self.wl().hard_state = hs.clone();
    }

    /// Makes what was appended durable: one write and one fdatasync.
    pub fn sync(&self) -> Result<(), StorageError> {
        self.wal().sync()
    }

    /// Records a commit index learned without a Ready hard state (light ready). Kept in
    /// memory; it reaches disk with the next hard state write, and a lower commit index
    /// after a crash is safe.
    pub fn set_commit(&self, commit: u64) {
        let mut core = self.wl();
        if commit > core.hard_state.commit {
            core.hard_state.commit = commit;
        }
    }

    /// Records the conf state in `txn` (with the state machine it belongs to).
    pub fn set_conf_state(&self, txn: &SideTxn<'_>, cs: &ConfState) -> Result<(), StorageError> {
        put_state(txn, CONF_STATE, cs)?;
        self.wl().conf_state = cs.clone();
        Ok(())
    }

    /// Replaces the whole log with an installed snapshot's point. The snapshot's point
    /// and conf state go into `txn`, which must commit durably with the restored state
    /// machine BEFORE [`RaftLog::sync`] makes the log's reset durable: a log reset to a
    /// point the state machine on disk has not reached could not be replayed.
    pub fn apply_snapshot(
        &self,
        txn: &SideTxn<'_>,
        meta: &SnapshotMetadata,
    ) -> Result<(), StorageError> {
        let point = SnapshotMetadata {
            index: meta.index,
            term: meta.term,
            ..Default::default()
        };
        put_state(txn, COMPACTED, &point)?;
        let cs = meta.conf_state.clone().unwrap_or_default();
        self.set_conf_state(txn, &cs)?;
        let mut hs = self.hard_state();
        hs.commit = hs.commit.max(meta.index);
        hs.term = hs.term.max(meta.term);
        {
            let mut wal = self.wal();
            wal.reset(meta.index, meta.term);
            wal.set_hard_state(&hs);
        }
        let mut core = self.wl();
        core.hard_state = hs;
        core.entries.clear();
        core.bytes = 0;
        core.compacted_index = meta.index;
        core.compacted_term = meta.term;
        Ok(())
    }

    /// Discards entries up to and including `index`, which the state machine on disk
    /// must have applied durably (they cannot be replayed after this).
    pub fn compact(&self, index: u64) -> Result<(), StorageError> {
        let mut core = self.wl();
        if index <= core.compacted_index {
            return Ok(());
        }
        assert!(index <= core.last_index(), "compact beyond the log");
        let term = core.term(index).expect("index is in the log");
        let gone = (index - core.compacted_index) as usize;
        let dropped: u64 = core.entries.range(..gone).map(entry_bytes).sum();
        core.bytes -= dropped;
        core.entries.drain(..gone);
        core.compacted_index = index;
        core.compacted_term = term;
        drop(core);
        self.wal().release(index)
    }

    /// Number of log segment files and their total size in bytes.
    pub fn disk_usage(&self) -> (usize, u64) {
        self.wal().disk_usage()
    }
}

/// Opens the write-ahead log and reads the conf state and snapshot point from `db`,
/// converting a log kept in redb by an older version.
fn read_core(db: &Db, kv: &KvStore) -> Result<(Wal, Core), StorageError> {
    let mut core = Core::default();
    let mut legacy_hs = None;
    let (mut snap_index, mut snap_term) = (0, 0);
    let rtx = db.begin_read().map_err(db_err)?;
    match rtx.open_table(STATE) {
        Ok(t) => {
            if let Some(v) = t.get(LEGACY_HARD_STATE).map_err(db_err)? {
                legacy_hs = Some(
                    HardState::decode(v.value())
                        .map_err(|e| StorageError::decode("hard state", e))?,
                );
            }
            if let Some(v) = t.get(CONF_STATE).map_err(db_err)? {
                core.conf_state = ConfState::decode(v.value())
                    .map_err(|e| StorageError::decode("conf state", e))?;
            }
            if let Some(v) = t.get(COMPACTED).map_err(db_err)? {
                let m = SnapshotMetadata::decode(v.value())
                    .map_err(|e| StorageError::decode("compaction point", e))?;
                (snap_index, snap_term) = (m.index, m.term);
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(db_err(e)),
    }
    let legacy_entries = match rtx.open_table(LEGACY_LOG) {
        Ok(t) => {
            let mut out = Vec::new();
            for item in t.range(snap_index + 1..).map_err(db_err)? {
                let (_, v) = item.map_err(db_err)?;
                out.push(
                    Entry::decode(v.value()).map_err(|e| StorageError::decode("log entry", e))?,
                );
            }
            Some(out)
        }
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(db_err(e)),
    };
    drop(rtx);

    let legacy = legacy_entries.is_some() || legacy_hs.is_some();
    let (mut wal, mut log, created) = Wal::open(db.vfs(), &db.dir())?;
    if created && legacy {
        // An older data dir: its log moves into the new write-ahead log.
        log = Replayed {
            base_index: snap_index,
            base_term: snap_term,
            entries: legacy_entries.unwrap_or_default().into(),
            hard_state: legacy_hs.unwrap_or_default(),
        };
        wal.rewrite(&log)?;
        info!(
            entries = log.entries.len(),
            "raft log moved from the database into the write-ahead log"
        );
    }
    if legacy {
        let txn = db.begin_write().map_err(db_err)?;
        txn.delete_table(LEGACY_LOG).map_err(db_err)?;
        txn.open_table(STATE)
            .map_err(db_err)?
            .remove(LEGACY_HARD_STATE)
            .map_err(db_err)?;
        txn.commit().map_err(db_err)?;
    }

    // A snapshot the state machine was restored to, whose log reset did not reach the
    // disk (a crash in between): the log continues after it only if it holds the
    // snapshot's entry (then, by Log Matching, everything before it too).
    if snap_index > log.base_index {
        let matches = snap_index <= log.base_index + log.entries.len() as u64
            && log.entries[(snap_index - log.base_index - 1) as usize].term == snap_term;
        if matches {
            log.entries.drain(..(snap_index - log.base_index) as usize);
        } else {
            log.entries.clear();
        }
        log.base_index = snap_index;
        log.base_term = snap_term;
        log.hard_state.term = log.hard_state.term.max(snap_term);
        log.hard_state.commit = log.hard_state.commit.max(snap_index);
        wal.rewrite(&log)?;
    }
    core.compacted_index = log.base_index;
    core.compacted_term = log.base_term;
    core.entries = log.entries;
    core.bytes = core.entries.iter().map(entry_bytes).sum();
    core.hard_state = log.hard_state;

    // Only the commit index may lag on disk (it is written lazily), and an applied
    // entry was committed: never report a commit index below what was applied.
    let applied = kv.applied_index();
    if applied > core.last_index() {
        return Err(StorageError::decode(
            "raft log",
            format!(
                "state machine applied index {applied} is beyond the last log entry {}",
                core.last_index()
            ),
        ));
    }
    if applied < core.compacted_index {
        return Err(StorageError::decode(
            "raft log",
            format!(
                "state machine applied index {applied} is before the start of the log {} (entries in between are gone)",
                core.first_index()
            ),
        ));
    }
    if core.hard_state.commit < applied {
        core.hard_state.commit = applied;
    }
    Ok((wal, core))
}

fn put_state(
    txn: &SideTxn<'_>,
    key: &str,
    record: &impl prost011::Message,
) -> Result<(), StorageError> {
    txn.put_raft_state(key, &record.encode_to_vec())
}

impl raft::Storage for RaftLog {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let core = self.rl();
        Ok(RaftState::new(
            core.hard_state.clone(),
            core.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let core = self.rl();
        if low <= core.compacted_index {
            return Err(raft::Error::Store(RaftStorageError::Compacted));
        }
        if high > core.last_index() + 1 {
            return Err(raft::Error::Store(RaftStorageError::Unavailable));
        }
        let max = max_size.into().unwrap_or(u64::MAX);
        let offset = core.first_index();
        let mut out = Vec::with_capacity((high - low) as usize);
        let mut size = 0u64;
        for i in low..high {
            let e = &core.entries[(i - offset) as usize];
            size += e.encoded_len() as u64;
            // Always return at least one entry, as raft-rs requires.
            if !out.is_empty() && size > max {
                break;
            }
            out.push(e.clone());
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.rl().term(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.rl().first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.rl().last_index())
    }

    /// A snapshot for a follower: the state machine as applied, in a file (see
    /// `Snapshots`); `Snapshot.data` is a [`SnapshotRef`] to it. Called on the driver
    /// thread, which is also the only thread that applies, so the read transaction
    /// taken here, its applied index and the conf state describe the same point. The
    /// file is written on a thread of its own; until it is, raft-rs hears "temporarily
    /// unavailable" and asks again later.
    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let unavailable = || raft::Error::Store(RaftStorageError::SnapshotTemporarilyUnavailable);
        let mut st = self.snapshots.lock();
        let (first, conf) = {
            let core = self.rl();
            (core.first_index(), core.conf_state.clone())
        };
        if let Some((meta, r)) = &st.built {
            // Reused while the log continues from it and the membership has not changed
            // since (a member added later is not in its configuration, and raft-rs
            // ignores a snapshot that does not name the member receiving it).
            if meta.index >= request_index
                && meta.index + 1 >= first
                && meta.conf_state.as_ref() == Some(&conf)
            {
                return Ok(Snapshot {
                    data: prost::Message::encode_to_vec(r),
                    metadata: Some(meta.clone()),
                });
            }
        }
        if st.building {
            return Err(unavailable());
        }
        let (applied, txn) = self
            .kv
            .snapshot_txn()
            .map_err(|e| raft::Error::Store(RaftStorageError::Other(Box::new(e))))?;
        if applied < request_index {
            return Err(unavailable());
        }
        let meta = {
            let core = self.rl();
            SnapshotMetadata {
                conf_state: Some(core.conf_state.clone()),
                index: applied,
                term: core.term(applied)?,
            }
        };
        st.building = true;
        drop(st);
        if self
            .snapshots
            .inline
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            let index = meta.index;
            self.snapshots.build(txn, meta);
            let st = self.snapshots.lock();
            return match &st.built {
                // Only the snapshot just built: if building failed, an older one may
                // not serve this request.
                Some((meta, r)) if meta.index == index => Ok(Snapshot {
                    data: prost::Message::encode_to_vec(r),
                    metadata: Some(meta.clone()),
                }),
                _ => Err(unavailable()),
            };
        }
        let snapshots = self.snapshots.clone();
        let spawned = std::thread::Builder::new()
            .name("snapshot".into())
            .spawn(move || snapshots.build(txn, meta));
        if let Err(e) = spawned {
            tracing::warn!("cannot start building a snapshot: {e}");
            self.snapshots.lock().building = false;
        }
        Err(unavailable())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64) -> Entry {
        Entry {
            index,
            term: 1,
            ..Default::default()
        }
    }

    /// A fresh data dir with its database and keyspace open.
    fn fresh() -> (tempfile::TempDir, Arc<crate::storage::Db>, Arc<KvStore>) {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::storage::open_database(dir.path()).unwrap();
        let kv = Arc::new(KvStore::open(db.clone()).unwrap());
        (dir, db, kv)
    }

    /// What the driver does after a failed write: the mirror ran ahead of the disk,
    /// and reopening plus reloading brings back exactly the durable state, writable.
    #[test]
    fn reload_after_reopen_forgets_what_was_never_made_durable() {
        let (_dir, db, kv) = fresh();
        let log = RaftLog::load(&db, kv.clone()).unwrap();
        log.append(&[entry(1), entry(2)]);
        let hs = HardState {
            term: 1,
            vote: 7,
            commit: 0,
        };
        log.set_hard_state(&hs);
        log.sync().unwrap();

        // A Ready that never became durable: entry 3 and a new vote reach the mirror only.
        log.append(&[entry(3)]);
        log.set_hard_state(&HardState {
            term: 2,
            vote: 9,
            commit: 0,
        });
        assert_eq!(log.last_index(), 3);

        db.reopen().unwrap();
        kv.reload().unwrap();
        log.reload(&db).unwrap();
        assert_eq!(log.last_index(), 2);
        assert_eq!(log.hard_state(), hs);
        log.append(&[entry(3)]);
        log.sync().unwrap();
        assert_eq!(log.last_index(), 3);
    }

    /// The log counts the memory its entries take through appends, overwrites,
    /// compaction and a reload, and names the compaction point that keeps a budget.
    #[test]
    fn the_log_counts_the_bytes_it_holds() {
        let (_dir, db, kv) = fresh();
        let log = RaftLog::load(&db, kv.clone()).unwrap();
        let big = |index: u64, len: usize| Entry {
            data: vec![7; len],
            ..entry(index)
        };
        let each = entry_bytes(&big(1, 1000));
        log.append(&(1..=10).map(|i| big(i, 1000)).collect::<Vec<_>>());
        assert_eq!(log.held_bytes(), 10 * each);
        // A new leader overwrites 9 and 10 with one entry.
        log.append(&[big(9, 1000)]);
        assert_eq!(log.held_bytes(), 9 * each);
        // Entries 7..=9 fit in three entries' bytes: compacting to 6 keeps them.
        assert_eq!(log.index_keeping(3 * each, 9), 6);
        assert_eq!(log.index_keeping(3 * each + 1, 9), 6);
        assert_eq!(log.index_keeping(100 * each, 9), 0);
        log.set_hard_state(&HardState {
            term: 1,
            vote: 0,
            commit: 9,
        });
        log.sync().unwrap();
        log.compact(6).unwrap();
        assert_eq!(log.held_bytes(), 3 * each);
        db.reopen().unwrap();
        kv.reload().unwrap();
        log.reload(&db).unwrap();
        // The log on disk may keep entries before the compaction point (segments go
        // whole); the count follows what was loaded.
        let held = log.last_index() - log.first_index() + 1;
        assert_eq!(log.held_bytes(), held * each);
    }

    /// A data dir whose log lives in redb tables (before the write-ahead log) opens
    /// with the same entries and hard state, and the old tables are gone.
    /// A follower's snapshot is built once, off the driver thread, and offered again
    /// while the log continues from it and the membership is the same; a file left by
    /// an earlier run is removed.
    #[test]
    fn a_snapshot_is_built_in_the_background_and_reused() {
        use raft::Storage;
        let (dir, db, kv) = fresh();
        let stale = snapshot_dir(dir.path()).join("00000000000000000001.snap");
        std::fs::create_dir_all(stale.parent().unwrap()).unwrap();
        std::fs::write(&stale, b"old").unwrap();
        let log = RaftLog::load(&db, kv.clone()).unwrap();
        assert!(!stale.exists());
        log.append(&[entry(1), entry(2)]);
        log.sync().unwrap();
        let mut batch = kv.begin().unwrap();
        batch
            .put(&crate::proto::etcdserverpb::PutRequest {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                ..Default::default()
            })
            .unwrap();
        batch.set_applied_index(2);
        batch.commit(false).unwrap();

        let unavailable = |r: raft::Result<Snapshot>| {
            matches!(
                r,
                Err(raft::Error::Store(
                    RaftStorageError::SnapshotTemporarilyUnavailable
                ))
            )
        };
        assert!(
            unavailable(log.snapshot(2, 9)),
            "the first request starts a build"
        );
        let start = std::time::Instant::now();
        let snap = loop {
            match log.snapshot(2, 9) {
                Ok(s) => break s,
                Err(e) => assert!(
                    unavailable(Err(e)) && start.elapsed() < std::time::Duration::from_secs(60),
                    "the build finishes"
                ),
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        let meta = snap.metadata.clone().unwrap();
        assert_eq!((meta.index, meta.term), (2, 1));
        let r: SnapshotRef = prost::Message::decode(snap.data.as_slice()).unwrap();
        assert_eq!(std::fs::metadata(&r.path).unwrap().len(), r.len);
        // Asked again (another follower, or a retry): the same file, not a new build.
        let again = log.snapshot(1, 8).unwrap();
        assert_eq!(again.data, snap.data);
        assert!(!log.snapshots.lock().building);
        // A request beyond what is applied waits for the state machine.
        assert!(unavailable(log.snapshot(3, 9)));
        // After a membership change the old file is not offered: it names the old
        // configuration (a new member would ignore it).
        let mut batch = kv.begin().unwrap();
        log.set_conf_state(
            &batch.side().unwrap(),
            &ConfState::from((vec![1, 9], vec![])),
        )
        .unwrap();
        batch.commit(true).unwrap();
        assert!(unavailable(log.snapshot(1, 9)), "a new build starts");
    }

    #[test]
    fn a_log_kept_in_redb_is_converted() {
        let (_dir, db, kv) = fresh();
        let hs = HardState {
            term: 3,
            vote: 2,
            commit: 4,
        };
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(LEGACY_LOG).unwrap();
            for i in 2..=5 {
                t.insert(i, entry(i).encode_to_vec().as_slice()).unwrap();
            }
        }
        let side = SideTxn::new(&txn);
        put_state(&side, LEGACY_HARD_STATE, &hs).unwrap();
        let point = SnapshotMetadata {
            index: 1,
            term: 1,
            ..Default::default()
        };
        put_state(&side, COMPACTED, &point).unwrap();
        txn.commit().unwrap();
        let mut batch = kv.begin().unwrap();
        batch.set_applied_index(1);
        batch.commit(true).unwrap();
        let log = RaftLog::load(&db, kv.clone()).unwrap();
        assert_eq!((log.first_index(), log.last_index()), (2, 5));
        assert_eq!(log.hard_state(), hs);
        let rtx = db.begin_read().unwrap();
        assert!(rtx.open_table(LEGACY_LOG).is_err());
        drop(rtx);
        drop(log);
        let log = RaftLog::load(&db, kv).unwrap();
        assert_eq!((log.first_index(), log.last_index()), (2, 5));
        assert_eq!(log.hard_state(), hs);
    }

    /// A snapshot whose state machine commit reached the disk but whose log reset did
    /// not: the log restarts at the snapshot.
    #[test]
    fn a_snapshot_without_its_log_reset_is_completed_on_open() {
        let (_dir, db, kv) = fresh();
        let log = RaftLog::load(&db, kv.clone()).unwrap();
        log.append(&[entry(1), entry(2)]);
        log.sync().unwrap();
        let meta = SnapshotMetadata {
            index: 9,
            term: 4,
            ..Default::default()
        };
        let mut batch = kv.begin().unwrap();
        batch.set_applied_index(9);
        log.apply_snapshot(&batch.side().unwrap(), &meta).unwrap();
        batch.commit(true).unwrap();
        // No log.sync(): the process dies here.
        drop(log);
        let log = RaftLog::load(&db, kv).unwrap();
        assert_eq!((log.first_index(), log.last_index()), (10, 9));
        assert_eq!(raft::Storage::term(&log, 9).unwrap(), 4);
    }
}
