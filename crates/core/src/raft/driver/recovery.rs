//! Recovery from a failed write (a full disk, an exhausted quota, an I/O error): the
//! member leaves Raft, answers every request at once, and once the data dir takes a
//! write again reopens the database and rebuilds the Raft node from what is on disk.
//!
//! A failed write or fsync is never retried on the same handle: after one, neither
//! redb's state nor the page cache under it can be trusted (fsyncgate). The database on
//! disk holds exactly the last durable commit, which is all this member ever promised
//! to anyone (append responses and votes leave only after their commit), so a RawNode
//! rebuilt from it is a member that merely restarted.

use std::sync::atomic::Ordering::Release;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::{new_raw_node, Driver, DriverError};
use crate::kv::{KvError, StoreError};
use crate::raft::{DriverMsg, ProposeError};
use crate::storage::StorageError;

/// First wait before reopening the database after a failed write.
pub(super) const REOPEN_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between two attempts while the disk stays full.
const REOPEN_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Bytes a probe must write and fsync in the data dir before the database is reopened:
/// room for a few Readies, so a disk with a few bytes free does not make the member
/// flap between reopening and failing again.
const PROBE_BYTES: usize = 1 << 20;

impl DriverError {
    /// A write to the database failed (the disk, not the data, is the problem): the
    /// member can recover by reopening the database once writes succeed again.
    /// Undecodable or corrupt data is not: reopening would find it again.
    pub(super) fn is_failed_write(&self) -> bool {
        match self {
            DriverError::Storage(StorageError::Io { .. })
            | DriverError::Apply(StoreError::Io(_)) => true,
            DriverError::Storage(StorageError::Db(e)) => matches!(
                e,
                redb::Error::Io(_) | redb::Error::PreviousIo | redb::Error::DatabaseClosed
            ),
            _ => false,
        }
    }
}

/// Why the database cannot be reopened yet.
enum NotYet {
    /// The data dir does not take a write (yet); try again later.
    Retry(String, RefuseAs),
    /// What is on disk cannot be used: the member must stop.
    Fatal(DriverError),
}

/// How requests are answered meanwhile.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RefuseAs {
    /// The disk or quota is full: writes get etcd's NOSPACE error, as with the reserve.
    NoSpace,
    /// Another failure: the member is stopped for now.
    Stopped,
}

impl Driver {
    /// Leaves Raft after `cause`, answers requests while the disk cannot be written, and
    /// reopens the database and a new RawNode from it once it can. Returns false when
    /// asked to stop meanwhile, `Err` when what is on disk cannot be used.
    pub(super) fn recover(
        &mut self,
        rx: &std_mpsc::Receiver<DriverMsg>,
        cause: DriverError,
    ) -> Result<bool, DriverError> {
        error!(
            "storage write failed: {cause}; this member leaves raft and refuses writes \
             until its database is reopened from disk"
        );
        self.status.storage_failed.store(true, Release);
        self.status.leader.store(raft::INVALID_ID, Release);
        self.abandon_waiting();
        let mut last_reason = String::new();
        // Attempt first, then wait: requests are answered with what the latest attempt
        // found (a full disk or another failure).
        loop {
            let refuse = match self.reopen() {
                Ok(()) => break,
                Err(NotYet::Fatal(e)) => return Err(e),
                Err(NotYet::Retry(reason, how)) => {
                    if reason != last_reason {
                        warn!("database not reopened yet, retrying: {reason}");
                        last_reason = reason;
                    }
                    how
                }
            };
            let next_attempt = Instant::now() + self.reopen_backoff;
            self.reopen_backoff = (self.reopen_backoff * 2).min(REOPEN_BACKOFF_MAX);
            loop {
                let wait = next_attempt.saturating_duration_since(Instant::now());
                self.status.driver_turned();
                match rx.recv_timeout(wait) {
                    Ok(m) => {
                        if !refuse_while_recovering(m, refuse) {
                            return Ok(false);
                        }
                    }
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => return Ok(false),
                    Err(std_mpsc::RecvTimeoutError::Timeout) => break,
                }
            }
        }
        self.status.storage_failed.store(false, Release);
        info!(
            applied = self.kv.applied_index(),
            last_index = self.log.last_index(),
            "database reopened from disk; raft resumes and writes are accepted again"
        );
        Ok(true)
    }

    /// Answers everything that waited on the old RawNode. A proposal's fate is unknown
    /// (the entry may have reached other members before the local commit failed), so it
    /// gets etcd's "server stopped", as when a member stops.
    fn abandon_waiting(&mut self) {
        for (_, tx) in self.pending.drain() {
            let _ = tx.send(Err(ProposeError::Stopped));
        }
        self.parked.clear();
        self.by_index.clear();
        self.abandon_self_removal();
        let reads = self
            .reads_new
            .drain(..)
            .chain(
                std::mem::take(&mut self.reads_inflight)
                    .into_values()
                    .flat_map(|(w, _)| w),
            )
            .chain(self.reads_ready.drain(..).flat_map(|(_, w)| w));
        for tx in reads {
            let _ = tx.send(Err(ProposeError::Stopped));
        }
        for (_, tx, _) in self.transfers.drain(..) {
            let _ = tx.send(Err(ProposeError::Stopped));
        }
    }

    /// Probes the data dir, reopens the database, and rebuilds the state machine's
    /// counters, the log mirror, the leases and the RawNode from it.
    fn reopen(&mut self) -> Result<(), NotYet> {
        let retry =
            |what: &str, e: &dyn std::fmt::Display, how| NotYet::Retry(format!("{what}: {e}"), how);
        let dir = self.db.dir();
        if let Err(e) = crate::storage::probe_write(&dir, PROBE_BYTES) {
            let how = if is_no_space(&e) {
                RefuseAs::NoSpace
            } else {
                RefuseAs::Stopped
            };
            return Err(retry(&format!("data dir {}", dir.display()), &e, how));
        }
        // A failure of the disk is retried; what the disk holds being unusable is not.
        let failed = |what: &str, e: DriverError| {
            if e.is_failed_write() {
                retry(what, &e, RefuseAs::Stopped)
            } else {
                NotYet::Fatal(e)
            }
        };
        match self.db.reopen() {
            Ok(()) => {}
            // The old handle's file lock may linger for a moment.
            Err(e @ StorageError::InUse { .. }) => {
                return Err(retry("reopening the database", &e, RefuseAs::Stopped))
            }
            Err(e) => return Err(failed("reopening the database", e.into())),
        }
        self.kv
            .reload()
            .map_err(|e| failed("reading the keyspace", DriverError::from(e)))?;
        self.log
            .reload(&self.db)
            .map_err(|e| failed("reading the raft log", e.into()))?;
        crate::lease::load(&self.lessor, &self.kv)
            .map_err(|e| failed("reading the leases", DriverError::from(e)))?;
        self.durable_applied = self.kv.applied_index();
        self.raw = new_raw_node(&self.cfg, self.log.clone(), self.kv.applied_index())
            .map_err(NotYet::Fatal)?;
        self.refresh_peers();
        Ok(())
    }
}

/// Answers a request that arrives while the member is out of Raft. Messages from peers
/// are dropped unread: nothing is acknowledged that this member did not persist.
/// Returns false when asked to stop.
fn refuse_while_recovering(m: DriverMsg, refuse: RefuseAs) -> bool {
    let write_refusal = || match refuse {
        RefuseAs::NoSpace => ProposeError::Kv(KvError::NoSpace),
        RefuseAs::Stopped => ProposeError::Stopped,
    };
    match m {
        DriverMsg::Propose { reply, .. } => {
            let _ = reply.send(Err(write_refusal()));
        }
        DriverMsg::ChangeMembers { reply, .. } => {
            let _ = reply.send(Err(write_refusal()));
        }
        DriverMsg::ReadIndex { reply } | DriverMsg::CatchUp { reply } => {
            let _ = reply.send(Err(ProposeError::Stopped));
        }
        DriverMsg::Progress { reply } => {
            let _ = reply.send(Ok(Vec::new()));
        }
        DriverMsg::TransferLeader { reply, .. } => {
            let _ = reply.send(Err(ProposeError::NotLeader));
        }
        DriverMsg::Defragment { reply } => {
            let _ = reply.send(Err(ProposeError::Defragment(
                "the database is closed after a failed write".into(),
            )));
        }
        // A corrupt state machine is reported again by whatever reads it after the
        // database is reopened.
        DriverMsg::Raft(_)
        | DriverMsg::Unreachable(_)
        | DriverMsg::SnapshotStatus(..)
        | DriverMsg::Corrupt(_) => {}
        DriverMsg::Shutdown => return false,
        DriverMsg::InjectedPanic => panic!("injected fault: the Raft driver panics"),
        DriverMsg::InjectCorruption { reply, .. } => {
            let _ = reply.send(Err(ProposeError::Stopped));
        }
    }
    true
}

fn is_no_space(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    ) || matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enospc() -> std::io::Error {
        std::io::Error::from_raw_os_error(libc::ENOSPC)
    }

    #[test]
    fn a_failed_disk_is_recovered_from_but_bad_data_is_not() {
        let io = DriverError::Storage(StorageError::Db(redb::Error::Io(enospc())));
        assert!(io.is_failed_write());
        assert!(DriverError::Storage(StorageError::Db(redb::Error::PreviousIo)).is_failed_write());
        let commit: KvError = redb::CommitError::Storage(redb::StorageError::Io(enospc())).into();
        assert!(
            matches!(commit, KvError::Store(StoreError::Io(_))),
            "{commit:?}"
        );
        assert!(DriverError::from(commit).is_failed_write());
        assert!(is_no_space(&enospc()));

        let corrupt = DriverError::Storage(StorageError::Db(redb::Error::Corrupted("x".into())));
        assert!(!corrupt.is_failed_write());
        let undecodable: KvError =
            <crate::proto::meshpb::NodeMeta as prost::Message>::decode(&[0xff][..])
                .unwrap_err()
                .into();
        assert!(
            matches!(undecodable, KvError::Store(StoreError::Decode(_))),
            "{undecodable:?}"
        );
        assert!(!DriverError::from(undecodable).is_failed_write());
        assert!(!DriverError::BadSnapshot("x".into()).is_failed_write());
    }
}
