//! The replicated state as a file, for Raft snapshots of any size: the protobuf
//! encoding of a `StoreSnapshot`, written element by element from one read transaction
//! and read back element by element, so neither the member that writes it nor the one
//! that restores it ever holds the whole state in memory.
//!
//! A message's protobuf encoding is the concatenation of its fields' encodings, so the
//! file decodes as one `StoreSnapshot` too (the tests check that).

use crate::storage::vfs::{SeqWriter, Vfs};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use prost::encoding::{decode_varint, encode_key, encode_varint, WireType};
use prost::Message;
use sha2::{Digest, Sha256};

use super::tables::{
    self, decode_record, encode_record, record_payload, Meta, Record, ALARMS, MEMBERS, META, REVS,
};
use super::{auth, ApplyBatch, IndexEffect, KvError, KvStore, StoreError};
use crate::bolt::{BoltError, TrailerWriter};
use crate::etcd_db::RecordRef;
use crate::proto::etcdserverpb as pb;
use crate::proto::meshpb::{AuthSnapshot, HistoryRecord, LeaseRecord, MemberRecord};

/// Field numbers of `meshpb.StoreSnapshot`.
const REVISION: u32 = 1;
const COMPACT_REVISION: u32 = 2;
const HISTORY: u32 = 3;
const MEMBER: u32 = 4;
const LEASE: u32 = 10;
const ALARM: u32 = 20;
const AUTH: u32 = 40;

/// Largest element read back: one history record holds at most a request's key and
/// value (a few MiB); anything larger is not a snapshot this build wrote.
pub const MAX_ELEMENT_BYTES: u64 = 64 << 20;

/// What [`write_snapshot`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotFile {
    /// The Raft index the state is at.
    pub applied_index: u64,
    pub len: u64,
    pub sha256: [u8; 32],
}

/// Counts and hashes what goes through it.
struct Sink<W: Write> {
    w: W,
    hash: Sha256,
    len: u64,
    buf: Vec<u8>,
}

impl<W: Write> Sink<W> {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.hash.update(bytes);
        self.len += bytes.len() as u64;
        self.w.write_all(bytes)
    }

    fn varint_field(&mut self, field: u32, v: u64) -> std::io::Result<()> {
        self.buf.clear();
        encode_key(field, WireType::Varint, &mut self.buf);
        encode_varint(v, &mut self.buf);
        let b = std::mem::take(&mut self.buf);
        let r = self.put(&b);
        self.buf = b;
        r
    }

    fn bytes_field(&mut self, field: u32, payload: &[u8]) -> std::io::Result<()> {
        self.buf.clear();
        encode_key(field, WireType::LengthDelimited, &mut self.buf);
        encode_varint(payload.len() as u64, &mut self.buf);
        let b = std::mem::take(&mut self.buf);
        let r = self.put(&b).and_then(|()| self.put(payload));
        self.buf = b;
        r
    }
}

fn io(e: std::io::Error) -> KvError {
    KvError::Store(StoreError::File(e))
}

impl KvStore {
    /// A read transaction holding everything applied so far (records waiting in memory
    /// are written first), and the Raft index it is at. Call on the applying thread;
    /// [`write_snapshot`] may then run on any thread.
    pub fn snapshot_txn(&self) -> Result<(u64, redb::ReadTransaction), KvError> {
        self.write_pending(false)?;
        let txn = self.db.begin_read()?;
        let meta = Meta::load(&txn.open_table(META)?)?;
        Ok((meta.applied_index, txn))
    }
}

impl KvStore {
    /// Streams the state, from one consistent read, as a snapshot file
    /// ([`crate::snapshot`]: etcd's backend database, then its SHA-256) to `out`,
    /// without holding the history in memory. `size` is told the file's length and
    /// the revision it holds before its first byte. Returns that revision.
    pub fn write_etcd_snapshot<W: Write>(
        &self,
        out: &mut W,
        size: impl FnOnce(&mut W, u64, i64) -> std::io::Result<()>,
    ) -> Result<i64, KvError> {
        let size = std::cell::RefCell::new(Some(size));
        let out = std::cell::RefCell::new(out);
        self.snapshot_read(|view, meta, txn| {
            // A read may start over (`Stale`), but not once bytes went out.
            if size.borrow().is_none() {
                return Err(KvError::Store(StoreError::Inconsistent(
                    "the store was compacted while the snapshot was being sent".into(),
                )));
            }
            let snap = super::snapshot_without_history(meta, txn)?;
            let mut read_error = None;
            let records = |put: &mut dyn FnMut(RecordRef<'_>) -> Result<(), BoltError>| {
                let mut put_error = None;
                let read = view.each_record(i64::MIN, i64::MAX, |(main, sub), raw| {
                    let (tombstone, kv) = record_payload(raw)?;
                    let record = RecordRef {
                        main,
                        sub,
                        tombstone,
                        kv,
                    };
                    match put(record) {
                        Ok(()) => Ok(true),
                        Err(e) => {
                            put_error = Some(e);
                            Ok(false)
                        }
                    }
                });
                if let Some(e) = put_error {
                    return Err(e);
                }
                read.map_err(|e| {
                    let what = BoltError::Invalid(format!("reading the history: {e}"));
                    read_error = Some(e);
                    what
                })
            };
            let mut out = out.borrow_mut();
            let told = |w: &mut TrailerWriter<&mut W>, len: u64| {
                let size = size.borrow_mut().take().expect("told once");
                let len = len + crate::snapshot::TRAILER_LEN as u64;
                size(w.get_mut(), len, meta.current_revision)
            };
            let written = crate::etcd_db::write_streaming(
                TrailerWriter::new(&mut **out),
                &snap,
                records,
                told,
            );
            match written {
                Ok(w) => {
                    w.finish().map_err(io)?;
                    Ok(meta.current_revision)
                }
                Err(e) => Err(read_error.unwrap_or_else(|| match e {
                    BoltError::Io(e) => io(e),
                    e => KvError::Store(StoreError::Inconsistent(format!("snapshot: {e}"))),
                })),
            }
        })
    }
}

/// Writes the state `txn` holds to `path` on `vfs` (created, fsync'ed) as a
/// `StoreSnapshot` encoding, one element at a time.
pub fn write_snapshot(
    vfs: &dyn Vfs,
    txn: &redb::ReadTransaction,
    path: &Path,
) -> Result<SnapshotFile, KvError> {
    let file = SeqWriter::new(vfs.create(path).map_err(io)?);
    let mut s = Sink {
        w: BufWriter::with_capacity(1 << 20, file),
        hash: Sha256::new(),
        len: 0,
        buf: Vec::new(),
    };
    let meta = Meta::load(&txn.open_table(META)?)?;
    s.varint_field(REVISION, meta.current_revision as u64)
        .map_err(io)?;
    s.varint_field(COMPACT_REVISION, meta.compact_revision as u64)
        .map_err(io)?;
    let mut element = Vec::new();
    for entry in txn.open_table(REVS)?.range::<(i64, i64)>(..)? {
        let (rev, raw) = entry?;
        let (main, sub) = rev.value();
        let Record { tombstone, kv } = decode_record(raw.value())?;
        element.clear();
        HistoryRecord {
            main,
            sub,
            tombstone,
            kv: Some(kv),
        }
        .encode(&mut element)
        .expect("a Vec grows to fit");
        s.bytes_field(HISTORY, &element).map_err(io)?;
    }
    for entry in txn.open_table(MEMBERS)?.range::<u64>(..)? {
        s.bytes_field(MEMBER, entry?.1.value()).map_err(io)?;
    }
    for entry in txn.open_table(tables::LEASES)?.range::<i64>(..)? {
        let (id, ttl) = entry?;
        let lease = LeaseRecord {
            id: id.value(),
            ttl: ttl.value(),
        };
        s.bytes_field(LEASE, &lease.encode_to_vec()).map_err(io)?;
    }
    for entry in txn.open_table(ALARMS)?.range::<(u64, i32)>(..)? {
        let (member_id, alarm) = entry?.0.value();
        let a = pb::AlarmMember { member_id, alarm };
        s.bytes_field(ALARM, &a.encode_to_vec()).map_err(io)?;
    }
    let auth = auth::load(&txn.open_table(auth::AUTH)?)?;
    s.bytes_field(AUTH, &auth.encode_to_vec()).map_err(io)?;
    let file = s.w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync().map_err(io)?;
    Ok(SnapshotFile {
        applied_index: meta.applied_index,
        len: s.len,
        sha256: s.hash.finalize().into(),
    })
}

/// One element of a snapshot file.
#[derive(Debug, Clone, PartialEq)]
pub enum Element {
    Revision(i64),
    CompactRevision(i64),
    History(HistoryRecord),
    Member(MemberRecord),
    Lease(LeaseRecord),
    Alarm(pb::AlarmMember),
    Auth(AuthSnapshot),
}

/// Reads a varint, or `None` at a clean end of the input.
fn read_varint(r: &mut impl Read) -> Result<Option<u64>, KvError> {
    let mut buf = [0u8; 10];
    for i in 0..10 {
        let mut b = [0u8; 1];
        match r.read(&mut b) {
            Ok(0) if i == 0 => return Ok(None),
            Ok(0) => {
                return Err(KvError::Store(StoreError::Inconsistent(
                    "snapshot file ends inside a varint".into(),
                )))
            }
            Ok(_) => {}
            Err(e) => return Err(io(e)),
        }
        buf[i] = b[0];
        if b[0] < 0x80 {
            let mut slice = &buf[..=i];
            return decode_varint(&mut slice).map(Some).map_err(KvError::from);
        }
    }
    Err(KvError::Store(StoreError::Inconsistent(
        "snapshot file holds an overlong varint".into(),
    )))
}

/// Reads the elements of a snapshot file (or any reader of one) in order, handing each
/// to `on`. Unknown fields are skipped; an element above [`MAX_ELEMENT_BYTES`] or a
/// truncated one is an error.
pub fn read_snapshot(
    r: impl Read,
    mut on: impl FnMut(Element) -> Result<(), KvError>,
) -> Result<(), KvError> {
    let mut r = BufReader::with_capacity(1 << 20, r);
    let bad =
        |what: &str| KvError::Store(StoreError::Inconsistent(format!("snapshot file: {what}")));
    let mut payload = Vec::new();
    while let Some(key) = read_varint(&mut r)? {
        let (field, wire) = ((key >> 3) as u32, key & 7);
        match wire {
            0 => {
                let v = read_varint(&mut r)?.ok_or_else(|| bad("ends inside a field"))?;
                match field {
                    REVISION => on(Element::Revision(v as i64))?,
                    COMPACT_REVISION => on(Element::CompactRevision(v as i64))?,
                    _ => {}
                }
            }
            2 => {
                let len = read_varint(&mut r)?.ok_or_else(|| bad("ends inside a field"))?;
                if len > MAX_ELEMENT_BYTES {
                    return Err(bad(&format!("element of {len} bytes")));
                }
                payload.resize(len as usize, 0);
                r.read_exact(&mut payload)
                    .map_err(|_| bad("ends inside an element"))?;
                let p = payload.as_slice();
                match field {
                    HISTORY => on(Element::History(HistoryRecord::decode(p)?))?,
                    MEMBER => on(Element::Member(MemberRecord::decode(p)?))?,
                    LEASE => on(Element::Lease(LeaseRecord::decode(p)?))?,
                    ALARM => on(Element::Alarm(pb::AlarmMember::decode(p)?))?,
                    AUTH => on(Element::Auth(AuthSnapshot::decode(p)?))?,
                    _ => {}
                }
            }
            1 => {
                let mut skip = [0u8; 8];
                r.read_exact(&mut skip)
                    .map_err(|_| bad("ends inside a field"))?;
            }
            5 => {
                let mut skip = [0u8; 4];
                r.read_exact(&mut skip)
                    .map_err(|_| bad("ends inside a field"))?;
            }
            other => return Err(bad(&format!("wire type {other}"))),
        }
    }
    Ok(())
}

impl ApplyBatch<'_> {
    /// Replaces every kv table's contents with a snapshot file's, element by element
    /// (the streaming twin of [`ApplyBatch::restore`]).
    pub fn restore_file(&mut self, path: &Path) -> Result<(), KvError> {
        self.store.clear_event_cache();
        let vfs = self.store.db.vfs().clone();
        let epoch = self.meta.index_epoch + 1;
        let txn = self.write_txn()?;
        let mut w = super::history::WriteTables::open(txn)?;
        w.revs.retain(|_, _| false)?;
        let mut leases = w.leases()?;
        let mut lease_keys = w.lease_keys()?;
        leases.retain(|_, _| false)?;
        lease_keys.retain(|_, _| false)?;
        let mut members = txn.open_table(MEMBERS)?;
        members.retain(|_, _| false)?;
        let mut alarms = txn.open_table(ALARMS)?;
        alarms.retain(|_, _| false)?;
        let mut index = super::index::KeyIndex::empty(epoch);
        let (mut revision, mut compact, mut auth) = (0, 0, AuthSnapshot::default());
        let file = vfs.open_read(path).map_err(io)?;
        read_snapshot(file, |el| {
            match el {
                Element::Revision(r) => revision = r,
                Element::CompactRevision(c) => compact = c,
                Element::History(r) => {
                    let kv = r.kv.unwrap_or_default();
                    w.revs
                        .insert((r.main, r.sub), encode_record(r.tombstone, &kv).as_slice())?;
                    let version = super::index::Version::new(r.main, r.sub, r.tombstone, &kv);
                    index.add(kv.key, version);
                }
                Element::Member(m) => {
                    members.insert(m.id, m.encode_to_vec().as_slice())?;
                }
                Element::Lease(l) => {
                    leases.insert(l.id, l.ttl)?;
                }
                Element::Alarm(a) => {
                    alarms.insert((a.member_id, a.alarm), ())?;
                }
                Element::Auth(a) => auth = a,
            }
            Ok(())
        })?;
        // A key is attached to a lease if its newest record is a put with one.
        for (lease, key) in index.live_leases() {
            lease_keys.insert((lease, key), ())?;
        }
        let nospace = super::nospace_active(&alarms)?;
        auth::store(&mut txn.open_table(auth::AUTH)?, &auth)?;
        drop((members, alarms, leases, lease_keys, w));
        self.nospace = nospace;
        self.meta.index_epoch = epoch;
        self.index_effects.push(IndexEffect::Replace(index));
        self.restored = true;
        self.auth_changed = true;
        self.token_effects.push(auth::TokenEffect::Clear);
        self.meta.current_revision = revision.max(tables::INITIAL_REVISION);
        self.meta.compact_revision = compact;
        Ok(())
    }
}
