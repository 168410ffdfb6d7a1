//! Work on the MVCC history as a whole: applying a request's changes, compaction,
//! watch replay (`events`), the consistency hash, and snapshot export/import; every
//! write also keeps the lease → key attachments in step.
use std::collections::BTreeMap;

use redb::Table;

use super::exec::Change;
use super::index::View;
use super::range::Interval;
use super::tables::{decode_record, encode_record, Record};
use super::KvError;
use crate::proto::meshpb::{HistoryRecord, StoreSnapshot};
use crate::proto::mvccpb::{event::EventType, Event};

pub(crate) type RevsTable<'txn> = Table<'txn, (i64, i64), &'static [u8]>;
pub(crate) type LeaseTable<'txn> = Table<'txn, i64, i64>;
pub(crate) type LeaseKeysTable<'txn> = Table<'txn, (i64, &'static [u8]), ()>;

/// The keyspace tables of one write transaction. Only `kv_revs` is opened up front:
/// opening a redb table and storing its root back when it is dropped costs as much as
/// a small insert, and most writes never touch a lease.
pub(crate) struct WriteTables<'txn> {
    txn: &'txn redb::WriteTransaction,
    pub revs: RevsTable<'txn>,
}

impl<'txn> WriteTables<'txn> {
    pub(crate) fn open(txn: &'txn redb::WriteTransaction) -> Result<Self, KvError> {
        Ok(WriteTables {
            txn,
            revs: txn.open_table(super::tables::REVS)?,
        })
    }

    pub(crate) fn leases(&self) -> Result<LeaseTable<'txn>, KvError> {
        Ok(self.txn.open_table(super::tables::LEASES)?)
    }

    pub(crate) fn lease_keys(&self) -> Result<LeaseKeysTable<'txn>, KvError> {
        Ok(self.txn.open_table(super::tables::LEASE_KEYS)?)
    }

    /// Store the changes of one request at main revision `main`, subs 0, 1, 2, …, and
    /// keep the lease attachments in step (the key index is the caller's).
    pub(crate) fn apply(&mut self, main: i64, changes: &[Change]) -> Result<(), KvError> {
        let mut lease_keys = None;
        for (sub, change) in changes.iter().enumerate() {
            let kv = &change.kv;
            self.revs.insert(
                (main, sub as i64),
                encode_record(change.tombstone, kv).as_slice(),
            )?;
            let key = kv.key.as_slice();
            let old_lease = change.prev_lease;
            let new_lease = change.new_lease();
            if change.moves_lease() {
                let table = match &mut lease_keys {
                    Some(t) => t,
                    None => lease_keys.insert(self.lease_keys()?),
                };
                if old_lease != 0 {
                    table.remove((old_lease, key))?;
                }
                if new_lease != 0 {
                    table.insert((new_lease, key), ())?;
                }
            }
        }
        Ok(())
    }

    /// Remove the records a compaction drops (`KeyIndex::compacted`, in revision
    /// order). One pass over their span, which removes a leaf's entries together:
    /// removing each record on its own walked the tree from the root every time, and a
    /// minute of history (300k records) held the driver for over a second.
    pub(crate) fn compact(&mut self, dropped: &[(i64, i64)]) -> Result<(), KvError> {
        debug_assert!(dropped.is_sorted());
        let (Some(&first), Some(&last)) = (dropped.first(), dropped.last()) else {
            return Ok(());
        };
        // The span's records come in order: a cursor into `dropped` follows them.
        let mut next = 0;
        self.revs.retain_in(first..=last, |rev, _| {
            while dropped.get(next).is_some_and(|&d| d < rev) {
                next += 1;
            }
            dropped.get(next) != Some(&rev)
        })?;
        Ok(())
    }

    /// Replace the keyspace and the leases with a snapshot's.
    pub(crate) fn restore(&mut self, snap: &StoreSnapshot) -> Result<(), KvError> {
        self.revs.retain(|_, _| false)?;
        let mut leases = self.leases()?;
        let mut lease_keys = self.lease_keys()?;
        leases.retain(|_, _| false)?;
        lease_keys.retain(|_, _| false)?;
        for lease in &snap.leases {
            leases.insert(lease.id, lease.ttl)?;
        }
        for record in &snap.history {
            let kv = record.kv.clone().unwrap_or_default();
            self.revs.insert(
                (record.main, record.sub),
                encode_record(record.tombstone, &kv).as_slice(),
            )?;
        }
        // A key is live if its newest record is a put.
        for record in newest_per_key(&snap.history)
            .into_values()
            .filter(|r| !r.tombstone)
        {
            if let Some(kv) = record.kv.as_ref().filter(|kv| kv.lease != 0) {
                lease_keys.insert((kv.lease, kv.key.as_slice()), ())?;
            }
        }
        Ok(())
    }
}

/// Watch replay: see [`super::KvStore::events`].
///
/// At or below the compact revision `compact`, only what compaction keeps is an event
/// (a deletion there goes with its key's history), and it has no previous value: the
/// version before it is one compaction removes. Until its removals are done (see
/// `compaction`) the records are still there, and skipped.
pub(crate) fn events(
    view: &View<'_>,
    (start, end): (i64, i64),
    interval: &Interval,
    prev_kv: bool,
    limit: usize,
    compact: i64,
) -> Result<Vec<Event>, KvError> {
    let mut out = Vec::new();
    let mut last_main = None;
    view.each_record(start, end, |(main, sub), raw| {
        // Whole revisions only: stop at the first revision past the limit.
        if limit > 0 && out.len() >= limit && last_main != Some(main) {
            return Ok(false);
        }
        let record = decode_record(raw)?;
        if !interval.contains(&record.kv.key) {
            return Ok(true);
        }
        if !view.kept(&record.kv.key, (main, sub), compact)? {
            return Ok(true);
        }
        let prev_kv = if prev_kv && main > compact {
            view.previous(&record.kv.key, main, sub)?
        } else {
            None
        };
        out.push(Event {
            r#type: if record.tombstone {
                EventType::Delete
            } else {
                EventType::Put
            } as i32,
            kv: Some(record.kv),
            prev_kv,
        });
        last_main = Some(main);
        Ok(true)
    })?;
    Ok(out)
}

/// Each key's newest record, whatever order the records come in (snapshots list them
/// in revision order, or in key order if written before `kv_revs`).
pub(crate) fn newest_per_key(records: &[HistoryRecord]) -> BTreeMap<&[u8], &HistoryRecord> {
    let mut newest: BTreeMap<&[u8], &HistoryRecord> = BTreeMap::new();
    for record in records {
        let key = record.kv.as_ref().map_or(&[][..], |kv| kv.key.as_slice());
        let slot = newest.entry(key).or_insert(record);
        if (record.main, record.sub) > (slot.main, slot.sub) {
            *slot = record;
        }
    }
    newest
}

/// etcd's HashKV: CRC-32C over the bucket name `key`, then every kept history record
/// up to the revision, in revision order, as etcd's `key` bucket holds it (revision
/// key, then the `KeyValue`). The same data gives the same hash on meshd and etcd, so
/// `endpoint hashkv` compares the two across a migration.
pub(crate) struct HashKv(crate::crc32c::Crc32c);

impl Default for HashKv {
    fn default() -> Self {
        let mut c = crate::crc32c::Crc32c::default();
        c.update(b"key");
        HashKv(c)
    }
}

impl HashKv {
    pub(crate) fn record(
        &mut self,
        main: i64,
        sub: i64,
        tombstone: bool,
        kv: &crate::proto::mvccpb::KeyValue,
    ) {
        let (k, v) = crate::etcd_db::key_bucket_entry(main, sub, tombstone, kv);
        self.0.update(&k);
        self.0.update(&v);
    }

    /// Feeds every record with main ≤ `rev` that compaction at `compact` keeps, in
    /// revision order.
    pub(crate) fn records(
        &mut self,
        view: &View<'_>,
        rev: i64,
        compact: i64,
    ) -> Result<(), KvError> {
        kept_records(view, rev, compact, |main, sub, record| {
            self.record(main, sub, record.tombstone, &record.kv)
        })
    }

    pub(crate) fn finish(self) -> u32 {
        self.0.finish()
    }
}

/// Calls `f` on every stored record with main ≤ `rev`, in revision order, but those
/// compaction at `compact` removes and has not removed yet (see `compaction`): the
/// hashes are the same on every member whatever its progress.
fn kept_records(
    view: &View<'_>,
    rev: i64,
    compact: i64,
    mut f: impl FnMut(i64, i64, &Record),
) -> Result<(), KvError> {
    view.each_record(i64::MIN, rev, |(main, sub), raw| {
        let record = decode_record(raw)?;
        if view.kept(&record.kv.key, (main, sub), compact)? {
            f(main, sub, &record);
        }
        Ok(true)
    })
}

/// The checksum of the whole replicated state (the Hash RPC): crc32 over history
/// records fed in revision order, then the rest of the state.
#[derive(Default)]
pub(crate) struct KvHasher(crc32fast::Hasher);

impl KvHasher {
    pub(crate) fn record(
        &mut self,
        key: &[u8],
        main: i64,
        sub: i64,
        tombstone: bool,
        value: &[u8],
    ) {
        let h = &mut self.0;
        // Lengths make the concatenation unambiguous.
        h.update(&(key.len() as u64).to_le_bytes());
        h.update(key);
        h.update(&main.to_le_bytes());
        h.update(&sub.to_le_bytes());
        h.update(&[u8::from(tombstone)]);
        h.update(&(value.len() as u64).to_le_bytes());
        h.update(value);
    }

    /// Feeds every record with main ≤ `rev` that compaction at `compact` keeps, in
    /// revision order.
    pub(crate) fn records(
        &mut self,
        view: &View<'_>,
        rev: i64,
        compact: i64,
    ) -> Result<(), KvError> {
        kept_records(view, rev, compact, |main, sub, record| {
            self.record(
                &record.kv.key,
                main,
                sub,
                record.tombstone,
                &record.kv.value,
            )
        })
    }

    /// Feeds bytes that are not a history record (Hash covers the whole store).
    pub(crate) fn extra(&mut self, bytes: &[u8]) {
        self.0.update(&(bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }

    pub(crate) fn finish(self) -> u32 {
        self.0.finalize()
    }
}

/// Every record the view sees that compaction at `compact` keeps, in revision order,
/// for a snapshot.
pub(crate) fn export(view: &View<'_>, compact: i64) -> Result<Vec<HistoryRecord>, KvError> {
    let mut out = Vec::new();
    kept_records(view, i64::MAX, compact, |main, sub, record| {
        out.push(HistoryRecord {
            main,
            sub,
            tombstone: record.tombstone,
            kv: Some(record.kv.clone()),
        })
    })?;
    Ok(out)
}
