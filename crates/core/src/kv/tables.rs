//! The on-disk layout of the keyspace: redb table definitions, the encoding of
//! history records, and the meta counters (revisions, applied index) stored beside them.
use prost::Message;
use redb::{ReadableTable, TableDefinition};

use super::{KvError, StoreError};
use crate::proto::mvccpb::KeyValue;

/// Every kept version, in revision order: (main, sub) → tombstone flag byte + encoded
/// `KeyValue` (which carries the key). Writes append; the in-memory key index
/// (`super::index`) finds a key's versions.
pub(crate) const REVS: TableDefinition<(i64, i64), &[u8]> = TableDefinition::new("kv_revs");
/// The layout before `kv_revs`, converted on open: live keys (key → `KeyValue`),
/// versions by key ((key, main, sub) → record) and revision order ((main, sub) → key).
pub(crate) const LEGACY_LATEST: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv_latest");
pub(crate) const LEGACY_HISTORY: TableDefinition<(&[u8], i64, i64), &[u8]> =
    TableDefinition::new("kv_history");
pub(crate) const LEGACY_REVLOG: TableDefinition<(i64, i64), &[u8]> =
    TableDefinition::new("kv_revlog");
/// Counters that change atomically with the data: see the `META_*` keys.
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("kv_meta");
/// The replicated member table: id → encoded `meshpb::MemberRecord`.
pub(crate) const MEMBERS: TableDefinition<u64, &[u8]> = TableDefinition::new("kv_members");

/// Active alarms: (member ID, `etcdserverpb.AlarmType`) → nothing.
pub(crate) const ALARMS: TableDefinition<(u64, i32), ()> = TableDefinition::new("kv_alarms");
/// Granted leases: lease ID → granted TTL in seconds.
pub(crate) const LEASES: TableDefinition<i64, i64> = TableDefinition::new("kv_leases");
/// Live keys attached to a lease: (lease ID, key) → (). Kept in step with the live keys
/// by every write, so revoking a lease finds its keys without a scan.
pub(crate) const LEASE_KEYS: TableDefinition<(i64, &[u8]), ()> =
    TableDefinition::new("kv_lease_keys");

const META_CURRENT_REVISION: &str = "current_revision";
const META_COMPACT_REVISION: &str = "compact_revision";
const META_APPLIED_INDEX: &str = "applied_index";
const META_INDEX_EPOCH: &str = "index_epoch";
const META_REMOVED_THROUGH: &str = "compaction_removed_through";

/// etcd's first revision: an empty store is at revision 1.
pub(crate) const INITIAL_REVISION: i64 = 1;

/// The counters kept in `kv_meta`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Meta {
    pub current_revision: i64,
    pub compact_revision: i64,
    pub applied_index: u64,
    /// Counts the compactions and restores (see `super::index`).
    pub index_epoch: u64,
    /// The compact revision whose removals are finished: `kv_revs` holds no record a
    /// compaction at or below it frees (0: not known, as after a restore). Written with
    /// the job's last removal, so an open need not walk the index again.
    pub removed_through: i64,
}

/// The counters of an empty store (what `load` reads from an empty table).
impl Default for Meta {
    fn default() -> Self {
        Meta {
            current_revision: INITIAL_REVISION,
            compact_revision: 0,
            applied_index: 0,
            index_epoch: 0,
            removed_through: 0,
        }
    }
}

impl Meta {
    pub(crate) fn load<T: ReadableTable<&'static str, u64>>(table: &T) -> Result<Meta, KvError> {
        let get = |name: &str| -> Result<Option<u64>, KvError> {
            Ok(table.get(name)?.map(|guard| guard.value()))
        };
        // Revisions are never negative, so storing them as u64 loses nothing.
        let empty = Meta::default();
        Ok(Meta {
            current_revision: get(META_CURRENT_REVISION)?
                .map_or(empty.current_revision, |r| r as i64),
            compact_revision: get(META_COMPACT_REVISION)?
                .map_or(empty.compact_revision, |r| r as i64),
            applied_index: get(META_APPLIED_INDEX)?.unwrap_or(empty.applied_index),
            index_epoch: get(META_INDEX_EPOCH)?.unwrap_or(empty.index_epoch),
            removed_through: get(META_REMOVED_THROUGH)?.map_or(empty.removed_through, |r| r as i64),
        })
    }

    pub(crate) fn store(&self, table: &mut redb::Table<&'static str, u64>) -> Result<(), KvError> {
        table.insert(META_CURRENT_REVISION, self.current_revision.max(0) as u64)?;
        table.insert(META_COMPACT_REVISION, self.compact_revision.max(0) as u64)?;
        table.insert(META_APPLIED_INDEX, self.applied_index)?;
        table.insert(META_INDEX_EPOCH, self.index_epoch)?;
        table.insert(META_REMOVED_THROUGH, self.removed_through.max(0) as u64)?;
        Ok(())
    }
}

/// One decoded `kv_revs` value.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Record {
    pub tombstone: bool,
    pub kv: KeyValue,
}

const FLAG_PUT: u8 = 0;
const FLAG_TOMBSTONE: u8 = 1;

/// Every `kv_revs` value ends with the CRC-32 of what precedes it.
/// redb checksums its pages but verifies them only when it repairs a file (or on an
/// explicit integrity check), not on reads, so a byte flipped on disk after the member
/// opened its data dir would otherwise be served.
const CRC_LEN: usize = 4;

fn seal(mut buf: Vec<u8>) -> Vec<u8> {
    let crc = crc32fast::hash(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());
    buf
}

/// The payload of a sealed value, or `StoreError::Corrupt` naming the table.
fn unseal<'a>(table: &'static str, bytes: &'a [u8]) -> Result<&'a [u8], KvError> {
    let corrupt = |detail: String| KvError::Store(StoreError::Corrupt { table, detail });
    if bytes.len() < CRC_LEN {
        return Err(corrupt(format!(
            "record of {} bytes is too short",
            bytes.len()
        )));
    }
    let (payload, crc) = bytes.split_at(bytes.len() - CRC_LEN);
    let stored = u32::from_le_bytes(crc.try_into().expect("CRC_LEN bytes"));
    let computed = crc32fast::hash(payload);
    if stored != computed {
        return Err(corrupt(format!(
            "checksum mismatch (stored {stored:08x}, computed {computed:08x})"
        )));
    }
    Ok(payload)
}

pub(crate) fn encode_record(tombstone: bool, kv: &KeyValue) -> Vec<u8> {
    let mut buf = Vec::with_capacity(1 + kv.encoded_len() + CRC_LEN);
    buf.push(flag(tombstone));
    kv.encode(&mut buf)
        .expect("a Vec grows to fit, so encoding cannot run out of space");
    seal(buf)
}

/// The record [`encode_record`] makes of a `KeyValue` whose encoding is `kv`.
pub(crate) fn seal_record(tombstone: bool, kv: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(1 + kv.len() + CRC_LEN);
    buf.push(flag(tombstone));
    buf.extend_from_slice(kv);
    seal(buf)
}

fn flag(tombstone: bool) -> u8 {
    if tombstone {
        FLAG_TOMBSTONE
    } else {
        FLAG_PUT
    }
}

pub(crate) fn decode_record(bytes: &[u8]) -> Result<Record, KvError> {
    let (tombstone, kv) = record_payload(bytes)?;
    Ok(Record {
        tombstone,
        kv: KeyValue::decode(kv)?,
    })
}

/// A stored record, checked against its checksum but not decoded: whether it is a
/// deletion, and its `KeyValue` encoding.
pub(crate) fn record_payload(bytes: &[u8]) -> Result<(bool, &[u8]), KvError> {
    let bytes = unseal("kv_revs", bytes)?;
    let (flag, rest) = bytes
        .split_first()
        .ok_or_else(|| KvError::Store(StoreError::Inconsistent("empty kv_revs record".into())))?;
    Ok((*flag == FLAG_TOMBSTONE, rest))
}
