//! Records of applied revisions that redb does not hold yet, and the counters readers
//! see. A batch of plain key-value writes is applied to memory only: its records wait
//! here until the next batch that opens a redb write transaction writes them first (a
//! lease, member, alarm, auth or compaction change, and at the latest the driver's
//! durable commit of the keyspace). That takes a write transaction, its commit and a
//! B-tree insert per record off the Raft thread for most writes.
//!
//! The invariant readers rely on: redb holds every kept record of a main revision up
//! to `flushed`, and `rows` holds exactly the records above it. Rows leave only after
//! the commit that wrote them, so a row missing here is in any read transaction begun
//! after the miss.
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use redb::ReadableTable;

use super::history::RevsTable;
use super::tables::{decode_record, Meta, Record};
use super::{KvError, ReadRevs};

pub(crate) struct Pending {
    /// The counters as of the last published batch: what readers see.
    pub meta: Meta,
    /// Every kept record of a main revision at or below this is in redb.
    pub flushed: i64,
    /// The records above `flushed`, in revision order, encoded as in `kv_revs`.
    rows: Vec<((i64, i64), Vec<u8>)>,
}

impl Pending {
    /// The state of a store just read from redb: nothing pending.
    pub(crate) fn new(meta: Meta) -> Pending {
        Pending {
            meta,
            flushed: meta.current_revision,
            rows: Vec::new(),
        }
    }

    pub(crate) fn get(&self, rev: (i64, i64)) -> Option<&[u8]> {
        self.rows
            .binary_search_by_key(&rev, |(r, _)| *r)
            .ok()
            .map(|i| self.rows[i].1.as_slice())
    }

    /// The rows with a main revision in `lo..=hi`.
    pub(crate) fn rows_in(&self, lo: i64, hi: i64) -> &[((i64, i64), Vec<u8>)] {
        let start = self.rows.partition_point(|((main, _), _)| *main < lo);
        let end = self.rows.partition_point(|((main, _), _)| *main <= hi);
        &self.rows[start..end.max(start)]
    }

    pub(crate) fn rows(&self) -> &[((i64, i64), Vec<u8>)] {
        &self.rows
    }

    pub(crate) fn push(&mut self, rev: (i64, i64), record: Vec<u8>) {
        debug_assert!(rev.0 > self.flushed && self.rows.last().is_none_or(|(r, _)| *r < rev));
        self.rows.push((rev, record));
    }

    /// Forgets the rows above main revision `main` (a batch dropped without a commit).
    pub(crate) fn truncate_above(&mut self, main: i64) {
        let keep = self.rows.partition_point(|((m, _), _)| *m <= main);
        self.rows.truncate(keep);
    }

    /// redb now holds every record up to main revision `main`.
    pub(crate) fn flushed_through(&mut self, main: i64) {
        self.flushed = main;
        self.rows.clear();
    }
}

pub(crate) fn read(p: &RwLock<Pending>) -> RwLockReadGuard<'_, Pending> {
    p.read().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn write(p: &RwLock<Pending>) -> RwLockWriteGuard<'_, Pending> {
    p.write().unwrap_or_else(|e| e.into_inner())
}

/// Called on each record of a scan (revision, encoded record); false stops the scan.
pub(crate) type OnRecord<'f> = dyn FnMut((i64, i64), &[u8]) -> Result<bool, KvError> + 'f;

/// The `kv_revs` table a view reads: a batch's write transaction, or a read
/// transaction's snapshot.
#[derive(Clone, Copy)]
pub(crate) enum Revs<'t> {
    Write(&'t RevsTable<'t>),
    Read(&'t ReadRevs),
}

impl Revs<'_> {
    pub(crate) fn record(&self, rev: (i64, i64)) -> Result<Option<Record>, KvError> {
        match self {
            Revs::Write(t) => record_in(*t, rev),
            Revs::Read(t) => record_in(*t, rev),
        }
    }

    /// Calls `f` on every record with a main revision in `lo..=hi`, in revision order,
    /// until it returns false.
    pub(crate) fn each(&self, lo: i64, hi: i64, f: &mut OnRecord<'_>) -> Result<bool, KvError> {
        match self {
            Revs::Write(t) => each_in(*t, lo, hi, f),
            Revs::Read(t) => each_in(*t, lo, hi, f),
        }
    }
}

fn record_in<R>(table: &R, rev: (i64, i64)) -> Result<Option<Record>, KvError>
where
    R: ReadableTable<(i64, i64), &'static [u8]>,
{
    match table.get(rev)? {
        Some(raw) => Ok(Some(decode_record(raw.value())?)),
        None => Ok(None),
    }
}

fn each_in<R>(table: &R, lo: i64, hi: i64, f: &mut OnRecord<'_>) -> Result<bool, KvError>
where
    R: ReadableTable<(i64, i64), &'static [u8]>,
{
    for entry in table.range::<(i64, i64)>((lo, i64::MIN)..=(hi, i64::MAX))? {
        let (rev, raw) = entry?;
        if !f(rev.value(), raw.value())? {
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(rev: i64) -> Meta {
        Meta {
            current_revision: rev,
            compact_revision: 0,
            applied_index: 0,
            index_epoch: 0,
            removed_through: 0,
        }
    }

    #[test]
    fn rows_are_found_by_revision_and_leave_by_truncation_or_flush() {
        let mut p = Pending::new(meta(4));
        for rev in [(5, 0), (5, 1), (6, 0), (8, 0)] {
            p.push(rev, vec![rev.0 as u8, rev.1 as u8]);
        }
        assert_eq!(p.get((5, 1)), Some(&[5u8, 1][..]));
        assert_eq!(p.get((7, 0)), None);
        let mains =
            |rows: &[((i64, i64), Vec<u8>)]| rows.iter().map(|(r, _)| *r).collect::<Vec<_>>();
        assert_eq!(mains(p.rows_in(6, 9)), vec![(6, 0), (8, 0)]);
        assert_eq!(mains(p.rows_in(1, 5)), vec![(5, 0), (5, 1)]);
        assert!(p.rows_in(9, 20).is_empty());
        assert!(p.rows_in(7, 6).is_empty());
        p.truncate_above(5);
        assert_eq!(mains(p.rows()), vec![(5, 0), (5, 1)]);
        p.flushed_through(5);
        assert!(p.rows().is_empty());
        assert_eq!(p.flushed, 5);
    }
}
