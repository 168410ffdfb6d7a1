//! What a compaction frees, removed after the compaction itself.
//!
//! Applying a compaction moves the compact revision: from that commit on, reads below
//! it are refused. The versions it supersedes (of each key's versions at or before it,
//! all but the newest, and that one too if it is a deletion) then leave the key index
//! and `kv_revs` a bounded step at a time ([`KvStore::compact_step`], called by the
//! Raft driver between apply batches), as etcd's scheduled compaction removes in
//! batches: removing them in the apply held every member's Raft thread at once, and
//! every write behind it waited.
//!
//! A job walks the index in key order
//! ([`KeyIndex::compact_some`](index::KeyIndex::compact_some), [`STEP_KEYS`] keys a
//! step), collecting the revisions of the records it takes out; each time the walk
//! passes the last key, ends, or has collected [`DRAIN_RECORDS`], it removes them all
//! in revision order ([`STEP_RECORDS`] a step, each step its own commit) before it
//! walks on. Revision order keeps each commit's deletions close together in
//! `kv_revs` (deletions spread over the table would rewrite a page each), and removes
//! a key's versions oldest first: whichever prefix of commits survives a crash, a
//! deletion is never gone while an older version of its key is still stored.
//!
//! A compaction applied during a walk does not send it back to the first key: the
//! walk goes on from where it is at the new revision, to the last key, then from the
//! first key to where the new revision began (the keys behind it were walked at the
//! older one). So every key is walked within one pass of the index after each
//! compaction, however often compactions come.
//!
//! A job's progress is not stored, only its end: the commit of its last removal (or a
//! commit of its own, when it found nothing to remove) records the compact revision it
//! finished (`removed_through` in `kv_meta`). An open whose compact revision is not
//! recorded as finished, and every snapshot install (the file may hold records its
//! member had not removed), starts a job over the whole index at the compact revision:
//! the index is then rebuilt from `kv_revs`, which still holds what an unfinished job
//! had not removed, and the walk lists it again. Until they are gone, such records are
//! invisible: a read at or above the compact revision never chooses them, and the
//! hashes skip them ([`View::kept`](super::index::View::kept)), so members agree
//! whatever their progress.

use std::sync::{Arc, Mutex, MutexGuard};

use super::history::WriteTables;
use super::index;
use super::{KvError, KvStore};

/// Keys of the index one step of a job walks.
pub(crate) const STEP_KEYS: usize = 2048;
/// Records one step of a job removes from `kv_revs`.
pub(crate) const STEP_RECORDS: usize = 4096;
/// Revisions a walk collects at most before it stops to remove them (16 MiB).
pub(crate) const DRAIN_RECORDS: usize = 1 << 20;

/// The removals left of the compactions applied so far.
#[derive(Debug, Default)]
pub(crate) struct Job {
    /// The compact revision the walk compacts the index to (0: none yet).
    rev: i64,
    /// Where the walk of the index is.
    walk: Walk,
    /// Revisions of records taken out of the index and still in `kv_revs`, sorted once
    /// their removal begins (`draining`); `dead[..removed]` are gone.
    dead: Vec<(i64, i64)>,
    removed: usize,
    /// Whether `dead` is being removed; the walk waits until it is all gone. The
    /// commit that removes the last of it after the walk ended records the job's end.
    draining: bool,
}

/// A walk of the index in key order; each position resumes after the key named
/// (from the first key if `None`).
#[derive(Debug, Default)]
enum Walk {
    #[default]
    Idle,
    /// On toward the last key; there the walk ends, or, if it began after `then_to`,
    /// goes on from the first key to that one.
    ToLast {
        after: Option<Arc<[u8]>>,
        then_to: Option<Arc<[u8]>>,
    },
    /// From the first key on to `to`, where it began (past the last key already).
    ToBegan {
        after: Option<Arc<[u8]>>,
        to: Arc<[u8]>,
    },
}

impl Job {
    /// A walk to `rev`: from the first key if none is under way, or on from where the
    /// walk is, around to there again (a later compaction supersedes more of the keys
    /// already walked).
    pub(crate) fn start(&mut self, rev: i64) {
        if rev <= 0 {
            return;
        }
        self.rev = self.rev.max(rev);
        let at = match std::mem::take(&mut self.walk) {
            Walk::Idle => None,
            Walk::ToLast { after, .. } | Walk::ToBegan { after, .. } => after,
        };
        self.walk = Walk::ToLast {
            after: at.clone(),
            then_to: at,
        };
    }

    /// A job for a store whose records and index were replaced (an open, a snapshot):
    /// what was listed before is no longer what `kv_revs` holds. Nothing is left to do
    /// if the store records the compact revision `rev` as finished (`removed_through`).
    pub(crate) fn restart(&mut self, rev: i64, removed_through: i64) {
        *self = Job::default();
        if rev > 0 && removed_through >= rev {
            self.rev = rev;
        } else {
            self.start(rev);
        }
    }

    pub(super) fn walking(&self) -> bool {
        !matches!(self.walk, Walk::Idle)
    }

    fn pending(&self) -> bool {
        self.walking() || self.draining
    }

    /// The compact revision whose removals are done, if nothing is pending.
    fn finished(&self) -> Option<i64> {
        (!self.pending() && self.rev > 0).then_some(self.rev)
    }

    /// Where the next step of the walk begins (after this key; `None`: the first).
    fn position(&self) -> Option<Arc<[u8]>> {
        match &self.walk {
            Walk::Idle => None,
            Walk::ToLast { after, .. } | Walk::ToBegan { after, .. } => after.clone(),
        }
    }

    /// Moves the walk on past `last`, the last key its step walked (`None`: it passed
    /// the last key of the index).
    fn walked(&mut self, last: Option<Arc<[u8]>>) {
        self.walk = match (std::mem::take(&mut self.walk), last) {
            (Walk::Idle, _) => Walk::Idle,
            (Walk::ToLast { then_to: None, .. }, None) => Walk::Idle,
            (
                Walk::ToLast {
                    then_to: Some(to), ..
                },
                None,
            ) => Walk::ToBegan { after: None, to },
            (Walk::ToLast { then_to, .. }, Some(key)) => Walk::ToLast {
                after: Some(key),
                then_to,
            },
            (Walk::ToBegan { .. }, None) => Walk::Idle,
            (Walk::ToBegan { to, .. }, Some(key)) if key >= to => Walk::Idle,
            (Walk::ToBegan { to, .. }, Some(key)) => Walk::ToBegan {
                after: Some(key),
                to,
            },
        };
    }
}

pub(crate) fn lock(job: &Mutex<Job>) -> MutexGuard<'_, Job> {
    job.lock().unwrap_or_else(|p| p.into_inner())
}

impl KvStore {
    /// Whether a compaction's removals are not finished.
    pub fn compaction_pending(&self) -> bool {
        lock(&self.compaction).pending()
    }

    /// One bounded step of the removals compactions left (a walk of `STEP_KEYS` keys
    /// of the index, or a commit removing `STEP_RECORDS` records); true while more
    /// remain. Call on the thread that applies, between apply batches.
    pub fn compact_step(&self) -> Result<bool, KvError> {
        let chunk = {
            let mut job = lock(&self.compaction);
            let job = &mut *job;
            if job.draining {
                let end = (job.removed + STEP_RECORDS).min(job.dead.len());
                let last = end == job.dead.len() && !job.walking();
                Some((job.rev, job.dead[job.removed..end].to_vec(), last))
            } else if job.walking() {
                let after = job.position();
                let last = index::write(&self.index).compact_some(
                    job.rev,
                    after.as_deref(),
                    STEP_KEYS,
                    &mut job.dead,
                );
                let passed_the_end = last.is_none();
                job.walked(last);
                if passed_the_end || !job.walking() || job.dead.len() >= DRAIN_RECORDS {
                    job.dead.sort_unstable();
                    job.draining = true;
                }
                None
            } else {
                None
            }
        };
        if let Some((rev, revs, last)) = chunk {
            let mut batch = self.begin()?;
            let txn = batch.write_txn()?;
            if !revs.is_empty() {
                WriteTables::open(txn)?.compact(&revs)?;
            }
            if last {
                // In the same commit as the last removal (alone if the walk collected
                // nothing): after a crash, either both are there or the job runs again.
                batch.meta.removed_through = rev;
            }
            batch.commit(false)?;
            let mut job = lock(&self.compaction);
            // Advanced only if it is still the job this step removed records for (a
            // reload or a restore replaces it).
            if job.dead.get(job.removed) == revs.first() {
                job.removed += revs.len();
            }
            if job.removed == job.dead.len() {
                job.dead = Vec::new();
                job.removed = 0;
                job.draining = false;
            }
        }
        let job = lock(&self.compaction);
        self.publish_compacted(&job);
        Ok(job.pending())
    }

    /// Tells those waiting for a physical compaction when `job` has nothing left.
    pub(super) fn publish_compacted(&self, job: &Job) {
        if let Some(rev) = job.finished() {
            self.physically_compacted.send_if_modified(|done| {
                let moved = *done < rev;
                *done = (*done).max(rev);
                moved
            });
        }
    }

    /// Waits until every record compaction at `rev` frees is gone from this member's
    /// `kv_revs` (etcd's `physical` compaction), or until `stop` resolves (the member
    /// stopping: its removals would not go on); true if they are gone.
    pub async fn physically_compacted(
        &self,
        rev: i64,
        stop: impl std::future::Future<Output = ()>,
    ) -> bool {
        let mut rx = self.physically_compacted.subscribe();
        tokio::select! {
            biased;
            done = rx.wait_for(|done| *done >= rev) => done.is_ok(),
            () = stop => false,
        }
    }
}
