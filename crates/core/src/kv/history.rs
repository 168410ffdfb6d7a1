//! Work on the MVCC history as a whole: applying a request's changes, compaction,
//! watch replay (`events`), the consistency hash, and snapshot export/import; every
//! write also keeps the lease → key attachments in step.
use std::collections::{BTreeMap, BTreeSet};

use redb::{ReadableTable, Table};

use super::exec::Change;
use super::range::{HistoryKey, Interval};
use super::tables::{decode_record, encode_kv, encode_record, is_tombstone, Record};
use super::KvError;
use crate::proto::meshpb::{HistoryRecord, StoreSnapshot};
use crate::proto::mvccpb::{event::EventType, Event, KeyValue};

pub(crate) type LatestTable<'txn> = Table<'txn, &'static [u8], &'static [u8]>;
pub(crate) type HistoryTable<'txn> = Table<'txn, HistoryKey<'static>, &'static [u8]>;
pub(crate) type RevlogTable<'txn> = Table<'txn, (i64, i64), &'static [u8]>;
pub(crate) type LeaseTable<'txn> = Table<'txn, i64, i64>;
pub(crate) type LeaseKeysTable<'txn> = Table<'txn, (i64, &'static [u8]), ()>;

/// The keyspace tables of one write transaction.
pub(crate) struct WriteTables<'txn> {
    pub latest: LatestTable<'txn>,
    pub history: HistoryTable<'txn>,
    pub revlog: RevlogTable<'txn>,
    pub leases: LeaseTable<'txn>,
    pub lease_keys: LeaseKeysTable<'txn>,
}

impl<'txn> WriteTables<'txn> {
    pub(crate) fn open(txn: &'txn redb::WriteTransaction) -> Result<Self, KvError> {
        Ok(WriteTables {
            latest: txn.open_table(super::tables::LATEST)?,
            history: txn.open_table(super::tables::HISTORY)?,
            revlog: txn.open_table(super::tables::REVLOG)?,
            leases: txn.open_table(super::tables::LEASES)?,
            lease_keys: txn.open_table(super::tables::LEASE_KEYS)?,
        })
    }

    /// Write one history record and its revlog entry, and update the live key, whose
    /// live version had lease `old_lease` (0: none or no live version).
    fn put_record(
        &mut self,
        main: i64,
        sub: i64,
        tombstone: bool,
        kv: &KeyValue,
        old_lease: i64,
    ) -> Result<(), KvError> {
        let key = kv.key.as_slice();
        self.history
            .insert((key, main, sub), encode_record(tombstone, kv).as_slice())?;
        self.revlog.insert((main, sub), key)?;
        let new_lease = if tombstone { 0 } else { kv.lease };
        if old_lease != new_lease {
            if old_lease != 0 {
                self.lease_keys.remove((old_lease, key))?;
            }
            if new_lease != 0 {
                self.lease_keys.insert((new_lease, key), ())?;
            }
        }
        if tombstone {
            self.latest.remove(key)?;
        } else {
            self.latest.insert(key, encode_kv(kv).as_slice())?;
        }
        Ok(())
    }

    /// Store the changes of one request at main revision `main`, subs 0, 1, 2, …
    pub(crate) fn apply(&mut self, main: i64, changes: &[Change]) -> Result<(), KvError> {
        for (sub, change) in changes.iter().enumerate() {
            self.put_record(
                main,
                sub as i64,
                change.tombstone,
                &change.kv,
                change.prev_lease,
            )?;
        }
        Ok(())
    }

    /// Keep each key's latest version ≤ `rev` (unless it is a tombstone) and remove
    /// every older one; drop revlog entries below `rev`.
    pub(crate) fn compact(&mut self, rev: i64) -> Result<(), KvError> {
        // Keys with no revlog entry ≤ rev were last changed before the previous
        // compaction, which already reduced them to one kept version.
        let mut keys = BTreeSet::new();
        for entry in self.revlog.range::<(i64, i64)>(..=(rev, i64::MAX))? {
            keys.insert(entry?.1.value().to_vec());
        }
        for key in keys {
            let k = key.as_slice();
            let mut versions = Vec::new();
            for entry in self
                .history
                .range::<HistoryKey<'_>>((k, i64::MIN, i64::MIN)..=(k, rev, i64::MAX))?
            {
                let (hk, value) = entry?;
                let (_, main, sub) = hk.value();
                versions.push((main, sub, is_tombstone(value.value())));
            }
            let keep = match versions.last() {
                Some(&(main, sub, false)) => Some((main, sub)),
                _ => None,
            };
            for (main, sub, _) in versions {
                if Some((main, sub)) != keep {
                    self.history.remove((k, main, sub))?;
                }
            }
        }
        self.revlog
            .retain_in::<(i64, i64), _>(..(rev, i64::MIN), |_, _| false)?;
        Ok(())
    }

    /// Replace the keyspace and the leases with a snapshot's.
    pub(crate) fn restore(&mut self, snap: &StoreSnapshot) -> Result<(), KvError> {
        self.latest.retain(|_, _| false)?;
        self.history.retain(|_, _| false)?;
        self.revlog.retain(|_, _| false)?;
        self.leases.retain(|_, _| false)?;
        self.lease_keys.retain(|_, _| false)?;
        for lease in &snap.leases {
            self.leases.insert(lease.id, lease.ttl)?;
        }
        for record in &snap.history {
            let kv = record.kv.clone().unwrap_or_default();
            let key = kv.key.as_slice();
            self.history.insert(
                (key, record.main, record.sub),
                encode_record(record.tombstone, &kv).as_slice(),
            )?;
            // The source dropped revlog entries below its compact revision.
            if record.main >= snap.compact_revision {
                self.revlog.insert((record.main, record.sub), key)?;
            }
        }
        // A key is live if its newest record is a put.
        let mut newest: BTreeMap<&[u8], &HistoryRecord> = BTreeMap::new();
        for record in &snap.history {
            let key = record.kv.as_ref().map_or(&[][..], |kv| kv.key.as_slice());
            let slot = newest.entry(key).or_insert(record);
            if (record.main, record.sub) > (slot.main, slot.sub) {
                *slot = record;
            }
        }
        for record in newest.into_values().filter(|r| !r.tombstone) {
            if let Some(kv) = &record.kv {
                self.latest
                    .insert(kv.key.as_slice(), encode_kv(kv).as_slice())?;
                if kv.lease != 0 {
                    self.lease_keys.insert((kv.lease, kv.key.as_slice()), ())?;
                }
            }
        }
        Ok(())
    }
}

/// Watch replay: see [`super::KvStore::events`].
pub(crate) fn events<R, H>(
    revlog: &R,
    history: &H,
    (start, end): (i64, i64),
    interval: &Interval,
    prev_kv: bool,
    limit: usize,
) -> Result<Vec<Event>, KvError>
where
    R: ReadableTable<(i64, i64), &'static [u8]>,
    H: ReadableTable<HistoryKey<'static>, &'static [u8]>,
{
    let mut out = Vec::new();
    if end < start {
        return Ok(out);
    }
    let mut last_main = None;
    for entry in revlog.range::<(i64, i64)>((start, i64::MIN)..=(end, i64::MAX))? {
        let (rk, key) = entry?;
        let (main, sub) = rk.value();
        let key = key.value();
        // Whole revisions only: stop at the first revision past the limit.
        if limit > 0 && out.len() >= limit && last_main != Some(main) {
            break;
        }
        if !interval.contains(key) {
            continue;
        }
        let Some(raw) = history.get((key, main, sub))? else {
            continue;
        };
        let record = decode_record(raw.value())?;
        let prev_kv = if prev_kv {
            previous_version(history, key, main, sub)?
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
    }
    Ok(out)
}

/// The version of `key` just before (main, sub), if it exists and is not a tombstone.
fn previous_version<H>(
    history: &H,
    key: &[u8],
    main: i64,
    sub: i64,
) -> Result<Option<KeyValue>, KvError>
where
    H: ReadableTable<HistoryKey<'static>, &'static [u8]>,
{
    let before = history
        .range::<HistoryKey<'_>>((key, i64::MIN, i64::MIN)..(key, main, sub))?
        .next_back()
        .transpose()?;
    match before {
        Some((_, raw)) => {
            let Record { tombstone, kv } = decode_record(raw.value())?;
            Ok((!tombstone).then_some(kv))
        }
        None => Ok(None),
    }
}

/// crc32 over every history record with main ≤ `rev`, in key order.
pub(crate) fn hash<H>(history: &H, rev: i64) -> Result<u32, KvError>
where
    H: ReadableTable<HistoryKey<'static>, &'static [u8]>,
{
    let mut hasher = KvHasher::default();
    for entry in history.range::<HistoryKey<'_>>(..)? {
        let (hk, raw) = entry?;
        let (key, main, sub) = hk.value();
        if main > rev {
            continue;
        }
        let record = decode_record(raw.value())?;
        hasher.record(key, main, sub, record.tombstone, &record.kv.value);
    }
    Ok(hasher.finish())
}

/// The HashKV of a snapshot's history at its own revision: equal to what the source
/// member answered for HashKV at that revision (records come in the same key order).
pub(crate) fn hash_records(records: &[HistoryRecord], rev: i64) -> u32 {
    let mut hasher = KvHasher::default();
    for r in records.iter().filter(|r| r.main <= rev) {
        let kv = r.kv.clone().unwrap_or_default();
        hasher.record(&kv.key, r.main, r.sub, r.tombstone, &kv.value);
    }
    hasher.finish()
}

/// The HashKV checksum: crc32 over history records fed in key order.
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

    /// Feeds bytes that are not a history record (Hash covers the whole store).
    pub(crate) fn extra(&mut self, bytes: &[u8]) {
        self.0.update(&(bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }

    pub(crate) fn finish(self) -> u32 {
        self.0.finalize()
    }
}

/// Every history record, for a snapshot.
pub(crate) fn export<H>(history: &H) -> Result<Vec<HistoryRecord>, KvError>
where
    H: ReadableTable<HistoryKey<'static>, &'static [u8]>,
{
    let mut out = Vec::new();
    for entry in history.range::<HistoryKey<'_>>(..)? {
        let (hk, raw) = entry?;
        let (_, main, sub) = hk.value();
        let Record { tombstone, kv } = decode_record(raw.value())?;
        out.push(HistoryRecord {
            main,
            sub,
            tombstone,
            kv: Some(kv),
        });
    }
    Ok(out)
}
