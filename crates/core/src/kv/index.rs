//! The key index: which revisions each key has, in memory, as etcd keeps it. The
//! records themselves live in `kv_revs`, keyed by revision, so a write appends to the
//! end of one B-tree instead of rewriting a random leaf of a key-ordered table.
//!
//! The index is rebuilt from `kv_revs` whenever the store is opened. It may run ahead
//! of the last commit (an apply batch adds its versions as it goes, and removes them
//! again if it is dropped), so readers only look at versions up to their snapshot's
//! revision. Compaction and snapshot restores change what older snapshots would need:
//! the index applies them only after the commit and bumps an epoch that is also
//! stored in `kv_meta`, and a reader whose snapshot has another epoch starts over.
use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use redb::ReadableTable;

use super::pending::{self, Pending, Revs};
use super::range::Interval;
use super::tables::{decode_record, record_payload, Meta as Counters, Record, META, REVS};
use super::{KvError, ReadRevs, StoreError};
use crate::proto::meshpb::HistoryRecord;
use crate::proto::mvccpb::KeyValue;
use crate::storage::Db;

/// One version of a key: where its record is in `kv_revs`, and the fields a put
/// derives from the version it replaces, so a put reads no record (as etcd's
/// `keyIndex` and lessor answer it from memory). Reading the previous record from
/// `kv_revs` was two fifths of a follower's apply (perf, 100-client put benchmark).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Version {
    pub main: i64,
    pub sub: i64,
    pub tombstone: bool,
    /// The put's key fields (all 0 for a tombstone).
    pub meta: Meta,
}

/// What a put needs to know of the live version it replaces.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Meta {
    pub create_revision: i64,
    pub version: i64,
    pub lease: i64,
}

impl Meta {
    pub(crate) fn of(kv: &KeyValue) -> Meta {
        Meta {
            create_revision: kv.create_revision,
            version: kv.version,
            lease: kv.lease,
        }
    }
}

/// The key and the fields the index keeps of a `KeyValue` encoding, read without
/// decoding (or copying) its value: the index is rebuilt from every record at each
/// start. Fields are taken as prost takes them (the last occurrence wins; unknown
/// fields are skipped).
pub(crate) fn index_fields(mut bytes: &[u8]) -> Result<(&[u8], Meta), KvError> {
    use prost::encoding::{decode_key, decode_varint, skip_field, DecodeContext, WireType};
    let mut key: &[u8] = &[];
    let mut meta = Meta::default();
    while !bytes.is_empty() {
        let (tag, wire) = decode_key(&mut bytes)?;
        match (tag, wire) {
            (1, WireType::LengthDelimited) => {
                let len = decode_varint(&mut bytes)?;
                let len = usize::try_from(len)
                    .ok()
                    .filter(|len| *len <= bytes.len())
                    .ok_or_else(|| {
                        KvError::Store(StoreError::Inconsistent(
                            "a stored key runs past the end of its record".into(),
                        ))
                    })?;
                (key, bytes) = bytes.split_at(len);
            }
            (2, WireType::Varint) => meta.create_revision = decode_varint(&mut bytes)? as i64,
            (4, WireType::Varint) => meta.version = decode_varint(&mut bytes)? as i64,
            (6, WireType::Varint) => meta.lease = decode_varint(&mut bytes)? as i64,
            (3, WireType::Varint) | (5, WireType::LengthDelimited) => {
                skip_field(wire, tag, &mut bytes, DecodeContext::default())?
            }
            // A field of `KeyValue` with another wire type: prost refuses it too.
            (1..=6, _) => {
                return Err(KvError::Store(StoreError::Inconsistent(format!(
                    "a stored record's field {tag} has wire type {wire:?}"
                ))))
            }
            _ => skip_field(wire, tag, &mut bytes, DecodeContext::default())?,
        }
    }
    Ok((key, meta))
}

impl Version {
    /// The version stored at `(main, sub)` for a record of `kv`.
    pub(crate) fn new(main: i64, sub: i64, tombstone: bool, kv: &KeyValue) -> Version {
        Version::with_meta(main, sub, tombstone, Meta::of(kv))
    }

    /// The version stored at `(main, sub)` for a record whose key fields are `meta`
    /// (ignored for a deletion, whose fields are all 0).
    pub(crate) fn with_meta(main: i64, sub: i64, tombstone: bool, meta: Meta) -> Version {
        Version {
            main,
            sub,
            tombstone,
            meta: if tombstone { Meta::default() } else { meta },
        }
    }

    fn rev(&self) -> (i64, i64) {
        (self.main, self.sub)
    }
}

/// Point lookups (every put, get and compare) go through a hash map; the ordered map
/// of the same keys serves ranges and changes only when a key comes, goes, or turns
/// from live to deleted and back. With a B-tree map alone, a follower spent an eighth
/// of its Raft thread comparing keys on the way down (perf, 100-client put benchmark).
///
/// The ordered map says, per key, whether its newest version is a put, so a count at
/// the newest revision walks the B-tree alone, with no hash lookup per key: the count
/// of a paged range is taken on every page.
#[derive(Default, Debug)]
pub(crate) struct KeyIndex {
    /// Every kept version of every key, oldest first.
    versions: HashMap<Arc<[u8]>, Vec<Version>>,
    /// The keys of `versions`, in order, each with whether its newest version is a
    /// put (not a tombstone).
    order: BTreeMap<Arc<[u8]>, bool>,
    /// No version in the index is newer than this main revision.
    head: i64,
    /// Bumped by each compaction and restore; see the module docs.
    pub epoch: u64,
}

impl KeyIndex {
    /// Reads every record of `kv_revs` (verifying each one's checksum).
    pub(crate) fn load<R>(revs: &R, epoch: u64) -> Result<KeyIndex, KvError>
    where
        R: ReadableTable<(i64, i64), &'static [u8]>,
    {
        let records = usize::try_from(revs.len()?).unwrap_or(usize::MAX);
        KeyIndex::build(epoch, records, |filer| {
            for entry in revs.range::<(i64, i64)>(..)? {
                let (rev, raw) = entry?;
                let (main, sub) = rev.value();
                let (tombstone, kv) = record_payload(raw.value())?;
                let (key, meta) = index_fields(kv)?;
                if !filer.push(key, Version::with_meta(main, sub, tombstone, meta)) {
                    break;
                }
            }
            Ok(())
        })
    }

    /// Builds the index of the versions `produce` hands to its [`Filer`], in
    /// revision order, about `records` of them (room is taken for that many keys).
    ///
    /// Two threads share the work: `produce` runs on this one (reading and checking
    /// records), a scoped one files the versions (hashing every key), batch by batch
    /// in the order given, so the result is the same as one thread's.
    pub(crate) fn build<E>(
        epoch: u64,
        records: usize,
        produce: impl FnOnce(&mut Filer) -> Result<(), E>,
    ) -> Result<KeyIndex, E> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Batch>(LOAD_QUEUE);
        std::thread::scope(|scope| {
            let filer = scope.spawn(move || file_versions(rx, records));
            let mut batches = Filer {
                batch: Vec::with_capacity(LOAD_BATCH),
                tx: Some(tx),
            };
            let produced = produce(&mut batches);
            batches.flush();
            drop(batches);
            let index = filer
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            produced?;
            Ok(KeyIndex { epoch, ..index })
        })
    }

    /// `(lease, key)` of every key whose newest version is a put with a lease.
    pub(crate) fn live_leases(&self) -> impl Iterator<Item = (i64, &[u8])> {
        self.versions.iter().filter_map(|(key, versions)| {
            let v = versions.last()?;
            (!v.tombstone && v.meta.lease != 0).then_some((v.meta.lease, &key[..]))
        })
    }

    /// The index of a snapshot's records (in any order).
    pub(crate) fn from_records(records: &[HistoryRecord], epoch: u64) -> KeyIndex {
        let mut ordered: Vec<&HistoryRecord> = records.iter().collect();
        ordered.sort_by_key(|r| (r.main, r.sub));
        let mut index = KeyIndex {
            epoch,
            ..KeyIndex::default()
        };
        for r in ordered {
            let kv = r.kv.clone().unwrap_or_default();
            let version = Version::new(r.main, r.sub, r.tombstone, &kv);
            index.add(kv.key, version);
        }
        index
    }

    /// Adds the newest version of `key`.
    pub(crate) fn add(&mut self, key: Vec<u8>, version: Version) {
        self.head = self.head.max(version.main);
        let put = !version.tombstone;
        if let Some(versions) = self.versions.get_mut(key.as_slice()) {
            debug_assert!(versions.last().is_none_or(|v| v.rev() < version.rev()));
            let was_put = newest_is_put(versions);
            versions.push(version);
            // The B-tree is searched only when the key turns live or deleted.
            if was_put != put {
                if let Some(flag) = self.order.get_mut(key.as_slice()) {
                    *flag = put;
                }
            }
            return;
        }
        let key: Arc<[u8]> = key.into();
        self.order.insert(key.clone(), put);
        self.versions.insert(key, vec![version]);
    }

    fn remove(&mut self, key: &[u8]) {
        self.versions.remove(key);
        self.order.remove(key);
    }

    /// Removes every version above revision `main` (an apply batch that was dropped
    /// without a commit). A walk of the whole index, on that rare path, instead of a
    /// record of the touched keys on every put.
    pub(crate) fn rollback(&mut self, main: i64) {
        let mut gone = Vec::new();
        let mut turned = Vec::new();
        for (key, versions) in self.versions.iter_mut() {
            let kept = versions.partition_point(|v| v.main <= main);
            if kept == versions.len() {
                continue;
            }
            versions.truncate(kept);
            if versions.is_empty() {
                gone.push(key.clone());
            } else {
                turned.push((key.clone(), newest_is_put(versions)));
            }
        }
        for key in gone {
            self.remove(&key);
        }
        for (key, put) in turned {
            self.order.insert(key, put);
        }
        self.head = self.head.min(main);
    }

    /// Compacts the next keys of a walk in key order (at most `max_keys`, those after
    /// `after`, or from the first): of each key's versions at or before `rev`, all but
    /// the newest go, and that one too if it is a tombstone. Their revisions are added
    /// to `dead` (their records are still in `kv_revs`). Returns the last key walked,
    /// or `None` once the walk has passed the last key.
    ///
    /// The walk may be spread over many calls with writes in between: a version
    /// written after the compaction is newer than `rev` and changes nothing here, and
    /// a key added behind the walk has nothing at or before `rev`. A key's newest
    /// version goes only with the key, so no live flag changes.
    pub(crate) fn compact_some(
        &mut self,
        rev: i64,
        after: Option<&[u8]>,
        max_keys: usize,
        dead: &mut Vec<(i64, i64)>,
    ) -> Option<Arc<[u8]>> {
        use std::ops::Bound::{Excluded, Unbounded};
        let from = after.map_or(Unbounded, Excluded);
        let keys: Vec<Arc<[u8]>> = self
            .order
            .range::<[u8], _>((from, Unbounded))
            .take(max_keys)
            .map(|(key, _)| key.clone())
            .collect();
        for key in &keys {
            let Some(versions) = self.versions.get_mut(key) else {
                continue;
            };
            let n = compacted_len(versions, rev);
            dead.extend(versions.drain(..n).map(|v| v.rev()));
            if versions.is_empty() {
                self.remove(key);
            }
        }
        if keys.len() < max_keys {
            return None;
        }
        keys.last().cloned()
    }

    /// The newest version of `key` at or before `rev`.
    fn at(&self, key: &[u8], rev: i64) -> Option<Version> {
        let versions = self.versions.get(key)?;
        let n = versions.partition_point(|v| v.main <= rev);
        n.checked_sub(1).map(|i| versions[i])
    }

    /// Each key in `interval` that is live at `rev` (its newest version at or before
    /// `rev` is not a tombstone), with that version, in key order.
    fn live_versions<'a>(
        &'a self,
        interval: &'a Interval,
        rev: i64,
    ) -> impl Iterator<Item = (&'a Arc<[u8]>, Version)> + 'a {
        self.live_among(self.keys_in(interval), rev)
    }

    /// Those of `keys` live at `rev`, with that version.
    fn live_among<'a, I>(
        &'a self,
        keys: I,
        rev: i64,
    ) -> impl Iterator<Item = (&'a Arc<[u8]>, Version)>
    where
        I: Iterator<Item = (&'a Arc<[u8]>, &'a bool)>,
    {
        keys.filter_map(move |(key, &put)| {
            // At the head a key whose newest version is a tombstone is not live.
            if !put && rev >= self.head {
                return None;
            }
            Some((key, self.live_at(key, rev)?))
        })
    }

    /// The keys in `interval` with their live flags, in key order.
    fn keys_in<'a>(
        &'a self,
        interval: &'a Interval,
    ) -> impl Iterator<Item = (&'a Arc<[u8]>, &'a bool)> + 'a {
        interval
            .bounds()
            .into_iter()
            .flat_map(|bounds| self.order.range::<[u8], _>(bounds))
    }

    /// `key`'s newest version at or before `rev`, unless it is a tombstone.
    fn live_at(&self, key: &[u8], rev: i64) -> Option<Version> {
        let versions = &self.versions[key];
        let at = versions.partition_point(|v| v.main <= rev);
        let v = versions[at.checked_sub(1)?];
        (!v.tombstone).then_some(v)
    }

    /// How many of `keys` are live at `rev`: at the head (no version newer than
    /// `rev`) from the ordered map's flags alone.
    fn count_in<'a>(
        &'a self,
        keys: impl Iterator<Item = (&'a Arc<[u8]>, &'a bool)>,
        rev: i64,
    ) -> i64 {
        if rev >= self.head {
            keys.filter(|(_, &put)| put).count() as i64
        } else {
            self.live_among(keys, rev).count() as i64
        }
    }

    /// The revision of each key's live version (see [`KeyIndex::live_versions`]).
    fn live(&self, interval: &Interval, rev: i64) -> Vec<(i64, i64)> {
        self.live_versions(interval, rev)
            .map(|(_, v)| v.rev())
            .collect()
    }

    /// How many keys in `interval` are live at `rev`.
    fn count_live(&self, interval: &Interval, rev: i64) -> i64 {
        self.count_in(self.keys_in(interval), rev)
    }

    /// The live keys in `interval` at `rev` with every field but the value, which
    /// the index holds without reading a record.
    fn live_keys(&self, interval: &Interval, rev: i64) -> Vec<KeyValue> {
        self.live_versions(interval, rev)
            .map(|(key, v)| key_only(key, v))
            .collect()
    }

    /// `f` of the first `limit` live keys in `interval` at `rev` and their versions,
    /// and how many keys are live there in all.
    fn live_first<T>(
        &self,
        interval: &Interval,
        rev: i64,
        limit: usize,
        f: impl Fn(&[u8], Version) -> T,
    ) -> (Vec<T>, i64) {
        let mut keys = self.keys_in(interval);
        let first: Vec<T> = self
            .live_among(keys.by_ref(), rev)
            .take(limit)
            .map(|(key, v)| f(key, v))
            .collect();
        let count = first.len() as i64 + self.count_in(keys, rev);
        (first, count)
    }

    /// The version of `key` just before `(main, sub)`.
    fn before(&self, key: &[u8], main: i64, sub: i64) -> Option<Version> {
        let versions = self.versions.get(key)?;
        let n = versions.partition_point(|v| v.rev() < (main, sub));
        n.checked_sub(1).map(|i| versions[i])
    }

    /// Every key and its versions, in key order.
    #[cfg(test)]
    pub(crate) fn dump(&self) -> Vec<(Vec<u8>, Vec<Version>)> {
        self.order
            .keys()
            .map(|k| (k.to_vec(), self.versions[k].clone()))
            .collect()
    }

    /// Number of keys with at least one kept version.
    pub(crate) fn len(&self) -> usize {
        debug_assert_eq!(self.versions.len(), self.order.len());
        self.versions.len()
    }
}

/// Builds an index (at epoch 0) from batches of versions in revision order.
fn file_versions(batches: Receiver<Batch>, records: usize) -> KeyIndex {
    use std::collections::hash_map::Entry;
    // Sized for one key per record up front: growing rehashes every key so far, and
    // each rehash reads the key's bytes from wherever they are in memory. Keys with
    // long histories leave room unused, given back below.
    let mut versions: HashMap<Arc<[u8]>, Vec<Version>> =
        HashMap::with_capacity(records.min(MAX_RESERVED_KEYS));
    let mut keys = Vec::with_capacity(records.min(MAX_RESERVED_KEYS));
    let mut deleted = Vec::new();
    let mut head = 0;
    for batch in batches {
        for (key, version) in batch {
            head = head.max(version.main);
            let entry = versions.entry(key);
            if version.tombstone {
                deleted.push(entry.key().clone());
            }
            match entry {
                Entry::Occupied(mut e) => e.get_mut().push(version),
                Entry::Vacant(e) => {
                    keys.push(e.key().clone());
                    e.insert(vec![version]);
                }
            }
        }
    }
    // Ordered once at the end: a sort of the keys and a bulk build of the map cost
    // less than an insertion per key. Every key is taken as live, then the keys that
    // saw a deletion are checked: a lookup per deletion, not per key.
    let mut order: BTreeMap<_, _> = keys.into_iter().map(|key| (key, true)).collect();
    for key in deleted {
        if let Some(flag) = order.get_mut(&key) {
            *flag = newest_is_put(&versions[&key]);
        }
    }
    if versions.len() < versions.capacity() / 4 {
        versions.shrink_to_fit();
    }
    KeyIndex {
        versions,
        order,
        head,
        epoch: 0,
    }
}

/// Versions on their way to the thread that files them.
type Batch = Vec<(Arc<[u8]>, Version)>;

/// Hands versions, in batches, to the thread that files them ([`KeyIndex::build`]).
pub(crate) struct Filer {
    batch: Batch,
    /// `None` once the filing thread is gone (its join says why).
    tx: Option<SyncSender<Batch>>,
}

impl Filer {
    /// Files `version` as the newest of `key`; false once the filing thread is gone,
    /// when there is no point in reading on.
    pub(crate) fn push(&mut self, key: &[u8], version: Version) -> bool {
        self.batch.push((Arc::from(key), version));
        if self.batch.len() == LOAD_BATCH {
            self.flush();
        }
        self.tx.is_some()
    }

    fn flush(&mut self) {
        let full = std::mem::replace(&mut self.batch, Vec::with_capacity(LOAD_BATCH));
        if let Some(tx) = &self.tx {
            if tx.send(full).is_err() {
                self.tx = None;
            }
        }
    }
}

/// Records per batch, and batches queued, between the two threads of a load.
const LOAD_BATCH: usize = 4096;
const LOAD_QUEUE: usize = 16;

/// At most this many keys' room is taken before loading an index (about 41 bytes
/// each): beyond it the map grows as it fills.
const MAX_RESERVED_KEYS: usize = 1 << 26;

/// Whether the newest of a key's versions is a put.
fn newest_is_put(versions: &[Version]) -> bool {
    versions.last().is_some_and(|v| !v.tombstone)
}

pub(crate) fn read(index: &RwLock<KeyIndex>) -> RwLockReadGuard<'_, KeyIndex> {
    index.read().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn write(index: &RwLock<KeyIndex>) -> RwLockWriteGuard<'_, KeyIndex> {
    index.write().unwrap_or_else(|p| p.into_inner())
}

fn compacted_len(versions: &[Version], rev: i64) -> usize {
    let n = versions.partition_point(|v| v.main <= rev);
    match n.checked_sub(1).map(|i| versions[i]) {
        Some(newest) if !newest.tombstone => n - 1,
        _ => n,
    }
}

/// What one read (or one apply batch) sees: the records of its transaction and the
/// ones still pending (`super::pending`), found through the key index.
#[derive(Clone, Copy)]
pub(crate) struct View<'t> {
    revs: Revs<'t>,
    /// Every record of a main revision up to this is in `revs`: `pending.flushed` when
    /// the transaction began, or `i64::MAX` for a batch's write transaction, which the
    /// pending records were written into.
    covers: i64,
    pending: &'t RwLock<Pending>,
    /// For a record flushed after this view's transaction began.
    db: &'t Db,
    index: &'t RwLock<KeyIndex>,
    /// The newest main revision visible: the snapshot's, or `i64::MAX` in a batch.
    visible: i64,
    /// The snapshot's index epoch; None in an apply batch, which is the only writer.
    epoch: Option<u64>,
}

/// What a view reads besides its own table.
#[derive(Clone, Copy)]
pub(crate) struct Shared<'t> {
    pub pending: &'t RwLock<Pending>,
    pub db: &'t Db,
    pub index: &'t RwLock<KeyIndex>,
}

impl<'t> View<'t> {
    /// A read at `revision`, whose transaction holds the records up to `covers`.
    pub(crate) fn snapshot(
        revs: Revs<'t>,
        covers: i64,
        shared: Shared<'t>,
        revision: i64,
        epoch: u64,
    ) -> Self {
        View {
            revs,
            covers,
            pending: shared.pending,
            db: shared.db,
            index: shared.index,
            visible: revision,
            epoch: Some(epoch),
        }
    }

    pub(crate) fn batch(revs: Revs<'t>, covers: i64, shared: Shared<'t>) -> Self {
        View {
            revs,
            covers,
            pending: shared.pending,
            db: shared.db,
            index: shared.index,
            visible: i64::MAX,
            epoch: None,
        }
    }

    /// Runs `f` on the index, or fails with `Stale` if the index no longer matches
    /// this view's snapshot.
    fn locate<T>(&self, f: impl FnOnce(&KeyIndex) -> T) -> Result<T, KvError> {
        let index = read(self.index);
        if self.epoch.is_some_and(|e| e != index.epoch) {
            return Err(KvError::Stale);
        }
        Ok(f(&index))
    }

    /// `kv_revs` as committed now, for records flushed after this view began; `Stale`
    /// if a compaction or restore was committed since.
    fn committed_now(&self) -> Result<ReadRevs, KvError> {
        let txn = self.db.begin_read()?;
        if let Some(epoch) = self.epoch {
            if Counters::load(&txn.open_table(META)?)?.index_epoch != epoch {
                return Err(KvError::Stale);
            }
        }
        Ok(txn.open_table(REVS)?)
    }

    fn fetch(&self, rev: (i64, i64)) -> Result<Record, KvError> {
        let found = if rev.0 <= self.covers {
            self.revs.record(rev)?
        } else {
            let pending = pending::read(self.pending).get(rev).map(decode_record);
            match pending {
                Some(record) => Some(record?),
                None => Revs::Read(&self.committed_now()?).record(rev)?,
            }
        };
        let (main, sub) = rev;
        found.ok_or_else(|| {
            KvError::Store(StoreError::Inconsistent(format!(
                "revision {main}.{sub} is in the key index but not in kv_revs"
            )))
        })
    }

    fn fetch_live(&self, revs: Vec<(i64, i64)>) -> Result<Vec<KeyValue>, KvError> {
        revs.into_iter().map(|r| Ok(self.fetch(r)?.kv)).collect()
    }

    /// Calls `f` on every record with a main revision in `lo..=hi` (at most this
    /// view's revision), in revision order, until it returns false.
    pub(crate) fn each_record(
        &self,
        lo: i64,
        hi: i64,
        mut f: impl FnMut((i64, i64), &[u8]) -> Result<bool, KvError>,
    ) -> Result<(), KvError> {
        let hi = hi.min(self.visible);
        if lo > hi {
            return Ok(());
        }
        // Taken first: a record not pending now was committed before the transaction
        // that may be opened below.
        let (boundary, tail) = {
            let p = pending::read(self.pending);
            let boundary = if self.covers == i64::MAX {
                i64::MAX
            } else {
                p.flushed
            };
            let tail = if boundary < hi {
                p.rows_in(lo.max(boundary + 1), hi).to_vec()
            } else {
                Vec::new()
            };
            (boundary, tail)
        };
        let upto = hi.min(boundary);
        if lo <= upto {
            let more = if upto <= self.covers {
                self.revs.each(lo, upto, &mut f)?
            } else {
                Revs::Read(&self.committed_now()?).each(lo, upto, &mut f)?
            };
            if !more {
                return Ok(());
            }
        }
        for (rev, bytes) in &tail {
            if !f(*rev, bytes)? {
                break;
            }
        }
        Ok(())
    }

    /// Whether `key`'s record at `rev` survives compaction at `compact`: it is newer,
    /// or it is the key's newest version at `compact` and a put.
    pub(crate) fn kept(&self, key: &[u8], rev: (i64, i64), compact: i64) -> Result<bool, KvError> {
        if rev.0 > compact {
            return Ok(true);
        }
        self.locate(|i| {
            i.at(key, compact)
                .is_some_and(|v| v.rev() == rev && !v.tombstone)
        })
    }

    /// The live version of `key`.
    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, KvError> {
        match self.locate(|i| i.at(key, self.visible))? {
            Some(v) if !v.tombstone => Ok(Some(self.fetch(v.rev())?.kv)),
            _ => Ok(None),
        }
    }

    /// The keys in `interval` live at `rev` (at most this view's revision), in key order.
    pub(crate) fn scan(&self, interval: &Interval, rev: i64) -> Result<Vec<KeyValue>, KvError> {
        let rev = rev.min(self.visible);
        let found = self.locate(|i| i.live(interval, rev))?;
        self.fetch_live(found)
    }

    /// How many keys in `interval` are live at `rev`, from the index alone.
    pub(crate) fn count(&self, interval: &Interval, rev: i64) -> Result<i64, KvError> {
        let rev = rev.min(self.visible);
        self.locate(|i| i.count_live(interval, rev))
    }

    /// [`View::scan`] without the values, from the index alone (no record is read).
    pub(crate) fn scan_keys(
        &self,
        interval: &Interval,
        rev: i64,
    ) -> Result<Vec<KeyValue>, KvError> {
        let rev = rev.min(self.visible);
        self.locate(|i| i.live_keys(interval, rev))
    }

    /// The first `limit` keys of [`View::scan`] (with their values, or without them and
    /// from the index alone), and how many keys it would have found: a limited range
    /// reads only the records it returns.
    pub(crate) fn scan_first(
        &self,
        interval: &Interval,
        rev: i64,
        limit: usize,
        values: bool,
    ) -> Result<(Vec<KeyValue>, i64), KvError> {
        let rev = rev.min(self.visible);
        if !values {
            return self.locate(|i| i.live_first(interval, rev, limit, key_only));
        }
        let (revs, count) = self.locate(|i| i.live_first(interval, rev, limit, |_, v| v.rev()))?;
        Ok((self.fetch_live(revs)?, count))
    }

    /// What a put needs of the live version of `key`, without reading its record.
    pub(crate) fn meta(&self, key: &[u8]) -> Result<Option<Meta>, KvError> {
        Ok(self
            .locate(|i| i.at(key, self.visible))?
            .filter(|v| !v.tombstone)
            .map(|v| v.meta))
    }

    /// The version of `key` just before `(main, sub)`, unless it is a tombstone.
    pub(crate) fn previous(
        &self,
        key: &[u8],
        main: i64,
        sub: i64,
    ) -> Result<Option<KeyValue>, KvError> {
        match self.locate(|i| i.before(key, main, sub))? {
            Some(v) if !v.tombstone => Ok(Some(self.fetch(v.rev())?.kv)),
            _ => Ok(None),
        }
    }
}

/// A key's fields at version `v` but its value, which only the record holds.
fn key_only(key: &[u8], v: Version) -> KeyValue {
    KeyValue {
        key: key.to_vec(),
        create_revision: v.meta.create_revision,
        mod_revision: v.main,
        version: v.meta.version,
        lease: v.meta.lease,
        value: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(main: i64, tombstone: bool) -> Version {
        let kv = KeyValue {
            create_revision: 1,
            version: main,
            ..Default::default()
        };
        Version::new(main, 0, tombstone, &kv)
    }

    #[test]
    fn compaction_keeps_the_newest_live_version_at_or_before_the_revision() {
        let mut index = KeyIndex::default();
        for (key, main, tomb) in [
            ("a", 2, false),
            ("b", 3, false),
            ("a", 4, false),
            ("b", 5, true),
            ("a", 7, false),
            ("c", 8, false),
        ] {
            index.add(key.into(), v(main, tomb));
        }
        // In two steps, with a version added in between: it stays.
        let mut dead = Vec::new();
        let after = index.compact_some(5, None, 1, &mut dead);
        assert_eq!(after.as_deref(), Some(&b"a"[..]));
        index.add(b"b".to_vec(), v(9, false));
        assert_eq!(index.compact_some(5, after.as_deref(), 10, &mut dead), None);
        dead.sort_unstable();
        assert_eq!(dead, vec![(2, 0), (3, 0), (5, 0)]);
        assert_eq!(index.at(b"b", 9), Some(v(9, false)));
        index.rollback(8);
        assert_eq!(
            index.len(),
            2,
            "b's only versions were a put and its delete"
        );
        assert_eq!(index.at(b"a", 5), Some(v(4, false)));
        assert_eq!(index.at(b"a", 9), Some(v(7, false)));
        assert_eq!(index.at(b"c", 7), None);
        assert_eq!(index.before(b"a", 7, 0), Some(v(4, false)));
        let all = Interval::new(b"\0", b"\0");
        assert_eq!(index.live(&all, 6), vec![(4, 0)]);
        assert_eq!(index.live(&all, 8), vec![(7, 0), (8, 0)]);
    }

    #[test]
    fn rollback_forgets_versions_above_the_revision() {
        let mut index = KeyIndex::default();
        index.add(b"a".to_vec(), v(2, false));
        index.add(b"a".to_vec(), v(3, false));
        index.add(b"b".to_vec(), v(3, false));
        index.rollback(2);
        assert_eq!(index.len(), 1);
        assert_eq!(index.at(b"a", i64::MAX), Some(v(2, false)));
    }

    /// Counts at the head come from the ordered map's flags; they agree with a count
    /// that looks up every key's versions, through puts, deletes, re-puts, rollbacks
    /// and compactions, and so do the limited scans.
    #[test]
    fn counts_from_the_live_flags_equal_counts_from_the_versions() {
        let mut index = KeyIndex::default();
        let mut seed = 7u64;
        let mut next = move |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        let slow = |index: &KeyIndex, interval: &Interval, rev: i64| -> i64 {
            index
                .order
                .keys()
                .filter(|k| interval.contains(k) && index.live_at(k, rev).is_some())
                .count() as i64
        };
        let intervals = [
            Interval::new(b"\0", b"\0"),
            Interval::new(b"k3", b"k7"),
            Interval::new(b"k5", b""),
            Interval::new(b"k2", b"\0"),
        ];
        let mut main = 1;
        for step in 0..2000 {
            main += 1;
            let key = format!("k{}", next(10)).into_bytes();
            index.add(key, v(main, next(3) == 0));
            if step % 97 == 0 {
                index.rollback(main - 1 - next(5) as i64);
            }
            if step % 131 == 0 {
                let (rev, mut after) = (main - next(20) as i64, None);
                while let Some(last) = index.compact_some(rev, after.as_deref(), 3, &mut vec![]) {
                    after = Some(last);
                }
            }
            for interval in &intervals {
                for rev in [i64::MAX, main, main - 1, main - 7] {
                    let want = slow(&index, interval, rev);
                    assert_eq!(
                        index.count_live(interval, rev),
                        want,
                        "step {step} rev {rev}"
                    );
                    for limit in [1, 3, 100] {
                        let (first, count) = index.live_first(interval, rev, limit, |_, v| v);
                        assert_eq!(count, want, "step {step} rev {rev} limit {limit}");
                        assert_eq!(first.len() as i64, want.min(limit as i64));
                        let all: Vec<_> =
                            index.live_versions(interval, rev).map(|(_, v)| v).collect();
                        assert_eq!(first, all[..first.len()]);
                    }
                }
            }
        }
    }

    /// The index's reader of a stored `KeyValue` agrees with prost's decoder on every
    /// field it keeps, and refuses what prost refuses.
    #[test]
    fn index_fields_read_what_prost_decodes() {
        use prost::Message;
        let cases = [
            KeyValue::default(),
            KeyValue {
                key: b"k".to_vec(),
                create_revision: 3,
                mod_revision: 9,
                version: 4,
                value: vec![1; 100_000],
                lease: -7,
            },
            KeyValue {
                key: vec![0xff; 300],
                lease: i64::MAX,
                ..Default::default()
            },
        ];
        for kv in cases {
            let mut bytes = kv.encode_to_vec();
            // An unknown field is skipped, as prost skips it.
            prost::encoding::encode_key(15, prost::encoding::WireType::Varint, &mut bytes);
            prost::encoding::encode_varint(5, &mut bytes);
            let decoded = KeyValue::decode(bytes.as_slice()).unwrap();
            let (key, meta) = index_fields(&bytes).unwrap();
            assert_eq!(key, decoded.key);
            assert_eq!(meta, Meta::of(&decoded));
            // Field 1 (the key) as a varint: a wire type prost refuses.
            let mut wrong = bytes.clone();
            prost::encoding::encode_key(1, prost::encoding::WireType::Varint, &mut wrong);
            prost::encoding::encode_varint(1, &mut wrong);
            assert!(KeyValue::decode(wrong.as_slice()).is_err());
            assert!(index_fields(&wrong).is_err());
            for cut in [1, bytes.len() / 2, bytes.len() - 1] {
                let partial = &bytes[..cut];
                assert_eq!(
                    index_fields(partial).is_ok(),
                    KeyValue::decode(partial).is_ok(),
                    "{kv:?} cut at {cut}"
                );
            }
        }
    }
}
