//! The Raft log, hard state, conf state and compaction point, kept in redb tables with
//! an in-memory mirror that serves raft-rs's `Storage` reads.
//!
//! Mutations take the redb write transaction to put them in, so the driver decides
//! what commits together and with which durability; the mirror is updated at once
//! (the driver thread is the only writer; after a failed commit it reopens the
//! database and reloads the mirror with [`RaftLog::reload`]).

use std::collections::VecDeque;
use std::sync::{Arc, RwLock};

use prost011::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError as RaftStorageError};
use redb::TableDefinition;

use super::{db_err, StorageError};
use crate::kv::KvStore;

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_state");

const HARD_STATE: &str = "hard_state";
const CONF_STATE: &str = "conf_state";
/// Index and term of the last entry removed by compaction or replaced by a snapshot.
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
    kv: Arc<KvStore>,
}

impl RaftLog {
    /// Loads the log from `db`. A fresh database yields an empty log.
    pub fn load(db: &super::Db, kv: Arc<KvStore>) -> Result<RaftLog, StorageError> {
        let core = read_core(db, &kv)?;
        Ok(RaftLog {
            core: Arc::new(RwLock::new(core)),
            kv,
        })
    }

    /// Replaces the in-memory mirror (seen by every clone) with what `db` holds: after
    /// the database was reopened, the mirror may hold entries whose commit failed. Call
    /// after reloading the state machine (the commit index is checked against its
    /// applied index).
    pub fn reload(&self, db: &super::Db) -> Result<(), StorageError> {
        let core = read_core(db, &self.kv)?;
        *self.wl() = core;
        Ok(())
    }

    fn rl(&self) -> std::sync::RwLockReadGuard<'_, Core> {
        self.core.read().unwrap_or_else(|p| p.into_inner())
    }
    fn wl(&self) -> std::sync::RwLockWriteGuard<'_, Core> {
        self.core.write().unwrap_or_else(|p| p.into_inner())
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

    /// Appends entries, first discarding any conflicting suffix (entries at or after the
    /// first new index), as Raft requires when a new leader overwrites an uncommitted tail.
    pub fn append(&self, txn: &redb::WriteTransaction, ents: &[Entry]) -> Result<(), StorageError> {
        let Some(first) = ents.first() else {
            return Ok(());
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
        let mut t = txn.open_table(LOG).map_err(db_err)?;
        if first.index <= core.last_index() {
            t.retain_in(first.index.., |_, _| false).map_err(db_err)?;
            let keep = (first.index - core.first_index()) as usize;
            core.entries.truncate(keep);
        }
        let mut buf = Vec::new();
        for e in ents {
            buf.clear();
            e.encode(&mut buf).expect("vec has capacity");
            t.insert(e.index, buf.as_slice()).map_err(db_err)?;
            core.entries.push_back(e.clone());
        }
        Ok(())
    }

    pub fn set_hard_state(
        &self,
        txn: &redb::WriteTransaction,
        hs: &HardState,
    ) -> Result<(), StorageError> {
        put_state(txn, HARD_STATE, hs)?;
        self.wl().hard_state = hs.clone();
        Ok(())
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

    pub fn set_conf_state(
        &self,
        txn: &redb::WriteTransaction,
        cs: &ConfState,
    ) -> Result<(), StorageError> {
        put_state(txn, CONF_STATE, cs)?;
        self.wl().conf_state = cs.clone();
        Ok(())
    }

    fn set_compacted(
        txn: &redb::WriteTransaction,
        index: u64,
        term: u64,
    ) -> Result<(), StorageError> {
        let m = SnapshotMetadata {
            index,
            term,
            ..Default::default()
        };
        put_state(txn, COMPACTED, &m)?;
        Ok(())
    }

    /// Replaces the whole log with an installed snapshot's point.
    pub fn apply_snapshot(
        &self,
        txn: &redb::WriteTransaction,
        meta: &SnapshotMetadata,
    ) -> Result<(), StorageError> {
        {
            let mut t = txn.open_table(LOG).map_err(db_err)?;
            t.retain(|_, _| false).map_err(db_err)?;
        }
        Self::set_compacted(txn, meta.index, meta.term)?;
        let cs = meta.conf_state.clone().unwrap_or_default();
        self.set_conf_state(txn, &cs)?;
        let mut hs = self.hard_state();
        hs.commit = hs.commit.max(meta.index);
        hs.term = hs.term.max(meta.term);
        self.set_hard_state(txn, &hs)?;
        let mut core = self.wl();
        core.entries.clear();
        core.compacted_index = meta.index;
        core.compacted_term = meta.term;
        Ok(())
    }

    /// Discards entries up to and including `index` (which must be applied).
    pub fn compact(&self, txn: &redb::WriteTransaction, index: u64) -> Result<(), StorageError> {
        let mut core = self.wl();
        if index <= core.compacted_index {
            return Ok(());
        }
        assert!(index <= core.last_index(), "compact beyond the log");
        let term = core.term(index).expect("index is in the log");
        {
            let mut t = txn.open_table(LOG).map_err(db_err)?;
            t.retain_in(..=index, |_, _| false).map_err(db_err)?;
        }
        Self::set_compacted(txn, index, term)?;
        let drop = (index - core.compacted_index) as usize;
        core.entries.drain(..drop);
        core.compacted_index = index;
        core.compacted_term = term;
        Ok(())
    }
}

/// Writes one record of the `raft_state` table.
/// Reads the log, hard state, conf state and compaction point from `db`.
fn read_core(db: &super::Db, kv: &KvStore) -> Result<Core, StorageError> {
    let mut core = Core::default();
    let rtx = db.begin_read().map_err(db_err)?;
    match rtx.open_table(STATE) {
        Ok(t) => {
            if let Some(v) = t.get(HARD_STATE).map_err(db_err)? {
                core.hard_state = HardState::decode(v.value())
                    .map_err(|e| StorageError::decode("hard state", e))?;
            }
            if let Some(v) = t.get(CONF_STATE).map_err(db_err)? {
                core.conf_state = ConfState::decode(v.value())
                    .map_err(|e| StorageError::decode("conf state", e))?;
            }
            if let Some(v) = t.get(COMPACTED).map_err(db_err)? {
                let m = SnapshotMetadata::decode(v.value())
                    .map_err(|e| StorageError::decode("compaction point", e))?;
                core.compacted_index = m.index;
                core.compacted_term = m.term;
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(db_err(e)),
    }
    match rtx.open_table(LOG) {
        Ok(t) => {
            for item in t.range(core.compacted_index + 1..).map_err(db_err)? {
                let (k, v) = item.map_err(db_err)?;
                let e =
                    Entry::decode(v.value()).map_err(|e| StorageError::decode("log entry", e))?;
                if raft::prelude::EntryType::from_i32(e.entry_type).is_none() {
                    return Err(StorageError::decode(
                        "log entry",
                        format!("entry {} has unknown type {}", e.index, e.entry_type),
                    ));
                }
                let expect = core.last_index() + 1;
                if k.value() != expect || e.index != expect {
                    return Err(StorageError::decode(
                        "raft log",
                        format!("gap or mismatch at index {} (expected {expect})", k.value()),
                    ));
                }
                core.entries.push_back(e);
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(db_err(e)),
    }
    // Only the commit index may lag on disk (it is written lazily), and an applied
    // entry was committed: never report a commit index below what was applied.
    let applied = kv.applied_index();
    if core.hard_state.commit < applied {
        if applied > core.last_index() {
            return Err(StorageError::decode(
                "raft log",
                format!(
                    "state machine applied index {applied} is beyond the last log entry {}",
                    core.last_index()
                ),
            ));
        }
        core.hard_state.commit = applied;
    }
    Ok(core)
}

fn put_state(
    txn: &redb::WriteTransaction,
    key: &str,
    record: &impl prost011::Message,
) -> Result<(), StorageError> {
    let mut t = txn.open_table(STATE).map_err(db_err)?;
    t.insert(key, record.encode_to_vec().as_slice())
        .map_err(db_err)?;
    Ok(())
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

    /// Builds a snapshot of the state machine as applied right now. Called on the driver
    /// thread, which is also the only thread that applies, so the state, its applied
    /// index and the conf state all describe the same point.
    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let (applied, data) = self
            .kv
            .snapshot()
            .map_err(|e| raft::Error::Store(RaftStorageError::Other(Box::new(e))))?;
        if applied < request_index {
            return Err(raft::Error::Store(
                RaftStorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let core = self.rl();
        let term = core.term(applied)?;
        Ok(Snapshot {
            data: prost::Message::encode_to_vec(&data),
            metadata: Some(SnapshotMetadata {
                conf_state: Some(core.conf_state.clone()),
                index: applied,
                term,
            }),
        })
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

    /// What the driver does after a failed commit: the mirror ran ahead of the disk,
    /// and reopening plus reloading brings back exactly the durable state, writable.
    #[test]
    fn reload_after_reopen_forgets_what_was_never_committed() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::storage::open_database(dir.path()).unwrap();
        let kv = Arc::new(KvStore::open(db.clone()).unwrap());
        let log = RaftLog::load(&db, kv.clone()).unwrap();
        let txn = db.begin_write().unwrap();
        log.append(&txn, &[entry(1), entry(2)]).unwrap();
        let hs = HardState {
            term: 1,
            vote: 7,
            commit: 0,
        };
        log.set_hard_state(&txn, &hs).unwrap();
        txn.commit().unwrap();

        // A Ready whose commit never happens: entry 3 and a new vote reach the mirror only.
        let txn = db.begin_write().unwrap();
        log.append(&txn, &[entry(3)]).unwrap();
        log.set_hard_state(
            &txn,
            &HardState {
                term: 2,
                vote: 9,
                commit: 0,
            },
        )
        .unwrap();
        drop(txn);
        assert_eq!(log.last_index(), 3);

        db.reopen().unwrap();
        kv.reload().unwrap();
        log.reload(&db).unwrap();
        assert_eq!(log.last_index(), 2);
        assert_eq!(log.hard_state(), hs);
        let txn = db.begin_write().unwrap();
        log.append(&txn, &[entry(3)]).unwrap();
        txn.commit().unwrap();
        assert_eq!(log.last_index(), 3);
    }
}
