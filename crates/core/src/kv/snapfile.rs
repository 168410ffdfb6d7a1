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

use super::tables::{self, record_payload, Meta, ALARMS, MEMBERS, META, REVS};
use super::{auth, ApplyBatch, IndexEffect, KvError, KvStore, StoreError};
use crate::bolt::{BoltError, TrailerWriter};
use crate::etcd_db::RecordRef;
use crate::proto::etcdserverpb as pb;
use crate::proto::meshpb::{AuthSnapshot, LeaseRecord, MemberRecord};

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
        self.element(field, &[], payload)
    }

    /// A length-delimited field whose payload is `head` then `tail`.
    fn element(&mut self, field: u32, head: &[u8], tail: &[u8]) -> std::io::Result<()> {
        self.buf.clear();
        encode_key(field, WireType::LengthDelimited, &mut self.buf);
        encode_varint((head.len() + tail.len()) as u64, &mut self.buf);
        let b = std::mem::take(&mut self.buf);
        let r = self
            .put(&b)
            .and_then(|()| self.put(head))
            .and_then(|()| self.put(tail));
        self.buf = b;
        r
    }
}

/// Field numbers of `meshpb.HistoryRecord`.
const H_MAIN: u32 = 1;
const H_SUB: u32 = 2;
const H_TOMBSTONE: u32 = 3;
const H_KV: u32 = 4;

/// Into `out`, a `HistoryRecord`'s encoding up to its `kv` field's bytes (`kv_len` of
/// them, a stored `KeyValue` encoding), as prost encodes it: a record is copied into
/// a snapshot file as it is stored, never decoded.
fn history_head(main: i64, sub: i64, tombstone: bool, kv_len: usize, out: &mut Vec<u8>) {
    out.clear();
    for (field, v) in [
        (H_MAIN, main as u64),
        (H_SUB, sub as u64),
        (H_TOMBSTONE, tombstone as u64),
    ] {
        if v != 0 {
            encode_key(field, WireType::Varint, out);
            encode_varint(v, out);
        }
    }
    encode_key(H_KV, WireType::LengthDelimited, out);
    encode_varint(kv_len as u64, out);
}

/// A `HistoryRecord` of a snapshot file, read in place: its `KeyValue` stays encoded,
/// checked as prost would decode it, with the fields the key index keeps read out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HistoryRef<'a> {
    pub main: i64,
    pub sub: i64,
    pub tombstone: bool,
    /// The `KeyValue` encoding (empty when the record has none).
    pub kv: &'a [u8],
    pub key: &'a [u8],
    pub(crate) meta: super::index::Meta,
}

impl<'a> HistoryRef<'a> {
    /// Reads a `HistoryRecord` encoding. What prost refuses is refused (a known
    /// field with another wire type, a truncated field), unknown fields are skipped,
    /// and a second `kv` field (which prost would merge into the first) is refused:
    /// no writer of snapshot files writes one.
    fn parse(mut p: &'a [u8]) -> Result<Self, KvError> {
        use prost::encoding::{decode_key, skip_field, DecodeContext};
        let (mut main, mut sub, mut tombstone, mut kv) = (0, 0, false, None);
        while !p.is_empty() {
            let (tag, wire) = decode_key(&mut p)?;
            match (tag, wire) {
                (H_MAIN, WireType::Varint) => main = decode_varint(&mut p)? as i64,
                (H_SUB, WireType::Varint) => sub = decode_varint(&mut p)? as i64,
                (H_TOMBSTONE, WireType::Varint) => tombstone = decode_varint(&mut p)? != 0,
                (H_KV, WireType::LengthDelimited) if kv.is_none() => {
                    let len = usize::try_from(decode_varint(&mut p)?)
                        .ok()
                        .filter(|len| *len <= p.len())
                        .ok_or_else(|| {
                            bad_file("a history record's key-value runs past its end")
                        })?;
                    let (this, rest) = p.split_at(len);
                    kv = Some(this);
                    p = rest;
                }
                (H_KV, WireType::LengthDelimited) => {
                    return Err(bad_file("a history record with two key-values"))
                }
                (H_MAIN..=H_KV, _) => {
                    return Err(bad_file(&format!(
                        "a history record's field {tag} has wire type {wire:?}"
                    )))
                }
                _ => skip_field(wire, tag, &mut p, DecodeContext::default())?,
            }
        }
        let kv = kv.unwrap_or_default();
        let (key, meta) = super::index::index_fields(kv)?;
        Ok(HistoryRef {
            main,
            sub,
            tombstone,
            kv,
            key,
            meta,
        })
    }
}

/// A snapshot file that is not what this build writes.
fn bad_file(what: &str) -> KvError {
    KvError::Store(StoreError::Inconsistent(format!("snapshot file: {what}")))
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
                let compact = meta.compact_revision;
                let read = view.each_record(i64::MIN, i64::MAX, |(main, sub), raw| {
                    let (tombstone, kv) = record_payload(raw)?;
                    // Not what the compaction has yet to remove (see `compaction`); the
                    // key is read only where `kept` needs it.
                    if main <= compact {
                        let (key, _) = super::index::index_fields(kv)?;
                        if !view.kept(key, (main, sub), compact)? {
                            return Ok(true);
                        }
                    }
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

/// Writes the state `txn` holds to `path` on `vfs` (created) as a `StoreSnapshot`
/// encoding, one element at a time.
///
/// The file is not fsync'ed, so building it never waits for the disk: it is a copy
/// for followers that lives only as long as this process (the snap directory is
/// emptied at start) and is read back through the page cache; a receiver checks the
/// bytes it receives against the SHA-256, and the install checks what it reads back.
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
    let mut head = Vec::new();
    for entry in txn.open_table(REVS)?.range::<(i64, i64)>(..)? {
        let (rev, raw) = entry?;
        let (main, sub) = rev.value();
        let (tombstone, kv) = record_payload(raw.value())?;
        history_head(main, sub, tombstone, kv.len(), &mut head);
        s.element(HISTORY, &head, kv).map_err(io)?;
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
    s.w.into_inner().map_err(|e| io(e.into_error()))?;
    Ok(SnapshotFile {
        applied_index: meta.applied_index,
        len: s.len,
        sha256: s.hash.finalize().into(),
    })
}

/// One element of a snapshot file.
#[derive(Debug, Clone, PartialEq)]
pub enum Element<'a> {
    Revision(i64),
    CompactRevision(i64),
    History(HistoryRef<'a>),
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
    mut on: impl FnMut(Element<'_>) -> Result<(), KvError>,
) -> Result<(), KvError> {
    let mut r = BufReader::with_capacity(1 << 20, r);
    let mut payload = Vec::new();
    while let Some(key) = read_varint(&mut r)? {
        let (field, wire) = ((key >> 3) as u32, key & 7);
        match wire {
            0 => {
                let v = read_varint(&mut r)?.ok_or_else(|| bad_file("ends inside a field"))?;
                match field {
                    REVISION => on(Element::Revision(v as i64))?,
                    COMPACT_REVISION => on(Element::CompactRevision(v as i64))?,
                    _ => {}
                }
            }
            2 => {
                let len = read_varint(&mut r)?.ok_or_else(|| bad_file("ends inside a field"))?;
                if len > MAX_ELEMENT_BYTES {
                    return Err(bad_file(&format!("element of {len} bytes")));
                }
                payload.resize(len as usize, 0);
                r.read_exact(&mut payload)
                    .map_err(|_| bad_file("ends inside an element"))?;
                let p = payload.as_slice();
                match field {
                    HISTORY => on(Element::History(HistoryRef::parse(p)?))?,
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
                    .map_err(|_| bad_file("ends inside a field"))?;
            }
            5 => {
                let mut skip = [0u8; 4];
                r.read_exact(&mut skip)
                    .map_err(|_| bad_file("ends inside a field"))?;
            }
            other => return Err(bad_file(&format!("wire type {other}"))),
        }
    }
    Ok(())
}

/// A reader that hashes what it reads.
struct Hashing<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

impl ApplyBatch<'_> {
    /// Replaces every kv table's contents with a snapshot file's, element by element
    /// (the streaming twin of [`ApplyBatch::restore`]). The bytes read must hash to
    /// `sha256`, the file's announced SHA-256: what the receiver checked is the bytes
    /// as they arrived, and the file is not fsync'ed, so what is read back here is
    /// checked again before anything is committed.
    pub fn restore_file(&mut self, path: &Path, sha256: &[u8]) -> Result<(), KvError> {
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
        let (mut revision, mut compact, mut auth) = (0, 0, AuthSnapshot::default());
        let mut file = Hashing {
            inner: vfs.open_read(path).map_err(io)?,
            hash: Sha256::new(),
        };
        // The records go into `kv_revs` on this thread while the index files their
        // versions on another. They must come in revision order, as written, for the
        // index to be the one their table gives.
        let mut last = None;
        let index = super::index::KeyIndex::build(epoch, 0, |filer| {
            read_snapshot(&mut file, |el| {
                match el {
                    Element::Revision(r) => revision = r,
                    Element::CompactRevision(c) => compact = c,
                    Element::History(h) => {
                        let rev = (h.main, h.sub);
                        if last.is_some_and(|last| last >= rev) {
                            return Err(bad_file(&format!(
                                "history record {rev:?} out of revision order"
                            )));
                        }
                        last = Some(rev);
                        w.revs
                            .insert(rev, tables::seal_record(h.tombstone, h.kv).as_slice())?;
                        let version =
                            super::index::Version::with_meta(h.main, h.sub, h.tombstone, h.meta);
                        filer.push(h.key, version);
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
            let read = std::mem::take(&mut file.hash).finalize();
            if read.as_slice() != sha256 {
                return Err(bad_file(
                    "its bytes on disk do not match its SHA-256 (not installed)",
                ));
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
        // The file may hold records its member had not yet removed.
        self.meta.removed_through = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::meshpb::HistoryRecord;
    use crate::proto::mvccpb::KeyValue;

    fn records() -> Vec<HistoryRecord> {
        let kv = |key: &[u8], value_len: usize, lease| KeyValue {
            key: key.to_vec(),
            create_revision: 3,
            mod_revision: 9,
            version: 2,
            value: vec![7; value_len],
            lease,
        };
        vec![
            HistoryRecord {
                main: 9,
                sub: 0,
                tombstone: false,
                kv: Some(kv(b"a", 300, 0)),
            },
            HistoryRecord {
                main: 1 << 40,
                sub: 3,
                tombstone: true,
                kv: Some(KeyValue {
                    key: b"gone".to_vec(),
                    mod_revision: 1 << 40,
                    ..Default::default()
                }),
            },
            HistoryRecord {
                main: 0,
                sub: 0,
                tombstone: false,
                kv: Some(KeyValue::default()),
            },
            HistoryRecord {
                main: 5,
                sub: 1,
                tombstone: false,
                kv: Some(kv(&[0xff; 200], 0, -4)),
            },
        ]
    }

    /// A stored record copied into a file is byte for byte prost's encoding of the
    /// decoded record, and reads back as what prost decodes.
    #[test]
    fn a_history_element_is_written_and_read_as_prost_does() {
        for r in records() {
            let kv = r.kv.clone().unwrap().encode_to_vec();
            let mut ours = Sink {
                w: Vec::new(),
                hash: Sha256::new(),
                len: 0,
                buf: Vec::new(),
            };
            let mut head = Vec::new();
            history_head(r.main, r.sub, r.tombstone, kv.len(), &mut head);
            ours.element(HISTORY, &head, &kv).unwrap();
            let mut prosts = Sink {
                w: Vec::new(),
                hash: Sha256::new(),
                len: 0,
                buf: Vec::new(),
            };
            prosts.bytes_field(HISTORY, &r.encode_to_vec()).unwrap();
            assert_eq!(ours.w, prosts.w, "{r:?}");

            let encoded = r.encode_to_vec();
            let h = HistoryRef::parse(&encoded).unwrap();
            let want = r.kv.clone().unwrap();
            assert_eq!((h.main, h.sub, h.tombstone), (r.main, r.sub, r.tombstone));
            assert_eq!(KeyValue::decode(h.kv).unwrap(), want);
            assert_eq!(h.key, want.key.as_slice());
            assert_eq!(h.meta, super::super::index::Meta::of(&want));
        }
        // No kv field at all: an empty `KeyValue`, as prost's default.
        let no_kv = HistoryRecord {
            main: 4,
            ..Default::default()
        }
        .encode_to_vec();
        let h = HistoryRef::parse(&no_kv).unwrap();
        assert_eq!((h.main, h.kv, h.key), (4, &[][..], &[][..]));
    }

    /// What prost refuses, and a second key-value, are refused; unknown fields are
    /// skipped.
    #[test]
    fn a_malformed_history_element_is_refused() {
        let good = records()[0].encode_to_vec();
        let mut unknown = good.clone();
        encode_key(15, WireType::Varint, &mut unknown);
        encode_varint(1, &mut unknown);
        assert_eq!(
            HistoryRef::parse(&unknown).unwrap(),
            HistoryRef::parse(&good).unwrap()
        );

        let mut twice = good.clone();
        twice.extend_from_slice(&good);
        let mut wrong_wire = Vec::new();
        encode_key(H_MAIN, WireType::LengthDelimited, &mut wrong_wire);
        encode_varint(0, &mut wrong_wire);
        let mut bad_kv = Vec::new();
        history_head(1, 0, false, 3, &mut bad_kv);
        // A key of 9 bytes in a 3-byte key-value.
        bad_kv.extend_from_slice(&[0x0a, 9, 1]);
        for bad in [&good[..good.len() - 1], &twice, &wrong_wire, &bad_kv] {
            assert!(HistoryRef::parse(bad).is_err(), "{bad:?}");
            assert!(HistoryRecord::decode(bad).is_err() || bad == twice.as_slice());
        }
    }
}
