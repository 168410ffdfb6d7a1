//! The snapshot file: what the Maintenance Snapshot RPC streams, `meshctl snapshot
//! save` writes, and restore reads.
//!
//! Format, as etcd's: the content, then 32 bytes, the SHA-256 of the content. The
//! content is etcd's backend database, a bbolt file in etcd's bucket layout
//! ([`crate::etcd_db`]), so `etcdctl snapshot status` and `etcdutl snapshot restore`
//! take a meshd snapshot, and meshd restores a snapshot saved from etcd 3.4 or 3.5.
//!
//! Read also, as etcd's `--skip-hash-check` allows: an etcd database without the
//! trailer (the `member/snap/db` of an etcd data dir; bbolt's own consistency check
//! stands in for the digest). And the format of earlier meshd versions: the magic `MESHSNAP`, the payload length as a little-endian
//! u64, one protobuf `meshpb.StoreSnapshot`, zero padding to a multiple of 512, the
//! trailer.

use prost::Message;
use sha2::{Digest, Sha256};

use crate::proto::meshpb::StoreSnapshot;

/// Length of the SHA-256 trailer.
pub const TRAILER_LEN: usize = 32;
/// The content's first bytes.
pub const MAGIC: &[u8; 8] = b"MESHSNAP";
/// The content is padded to a multiple of this (etcdctl's check of a snapshot stream).
const ALIGN: usize = 512;

/// Why a snapshot file was refused.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A database without the trailer, read without `skip_hash_check`.
    #[error("snapshot missing hash but --skip-hash-check=false")]
    MissingHash,
    /// Shorter than the trailer: not a snapshot at all.
    #[error("snapshot is truncated ({0} bytes)")]
    Truncated(usize),
    /// The trailer does not match the content: damaged or incomplete.
    #[error("snapshot checksum mismatch: expected {expected}, computed {computed}")]
    Checksum { expected: String, computed: String },
    /// The checksum matched but the content is not a meshd store snapshot.
    #[error("not a meshd snapshot: {0}")]
    Format(String),
    /// The content is not a readable etcd database.
    #[error("not an etcd snapshot: {0}")]
    Etcd(#[from] crate::etcd_db::EtcdDbError),
    /// The database could not be written.
    #[error("writing the snapshot database: {0}")]
    Write(#[from] crate::bolt::BoltError),
    /// The checksum matched but the payload does not decode.
    #[error("snapshot content does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
}

/// The bytes of a snapshot file for `snap` (etcd's database and the trailer).
pub fn encode(snap: &StoreSnapshot) -> Result<Vec<u8>, SnapshotError> {
    let mut out = crate::etcd_db::write(snap)?;
    let digest = Sha256::digest(&out);
    out.extend_from_slice(&digest);
    Ok(out)
}

/// A snapshot file in the format of earlier meshd versions (tests of reading them).
pub fn encode_legacy(snap: &StoreSnapshot) -> Vec<u8> {
    let payload = snap.encode_to_vec();
    let mut out = Vec::with_capacity(16 + payload.len() + ALIGN + TRAILER_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    out.resize(out.len().div_ceil(ALIGN) * ALIGN, 0);
    let digest = Sha256::digest(&out);
    out.extend_from_slice(&digest);
    out
}

/// Checks the trailer of a whole snapshot file; returns the content before it.
pub fn verify(bytes: &[u8]) -> Result<&[u8], SnapshotError> {
    let mut v = Verifier::default();
    v.update(bytes);
    v.finish()?;
    Ok(&bytes[..bytes.len() - TRAILER_LEN])
}

/// Checks a snapshot's trailer as it streams in, without holding all of it: everything
/// but the last 32 bytes seen so far is hashed.
#[derive(Default)]
pub struct Verifier {
    hasher: Sha256,
    /// The last bytes seen: the trailer once the stream ends.
    tail: Vec<u8>,
    total: usize,
}

impl Verifier {
    pub fn update(&mut self, bytes: &[u8]) {
        self.total += bytes.len();
        self.tail.extend_from_slice(bytes);
        if self.tail.len() > TRAILER_LEN {
            let n = self.tail.len() - TRAILER_LEN;
            self.hasher.update(&self.tail[..n]);
            self.tail.drain(..n);
        }
    }

    /// Ok when the last 32 bytes are the SHA-256 of everything before them.
    pub fn finish(self) -> Result<(), SnapshotError> {
        if self.tail.len() < TRAILER_LEN {
            return Err(SnapshotError::Truncated(self.total));
        }
        let computed = self.hasher.finalize();
        if computed.as_slice() != self.tail.as_slice() {
            return Err(SnapshotError::Checksum {
                expected: hex(&self.tail),
                computed: hex(&computed),
            });
        }
        Ok(())
    }
}

/// Verifies and decodes a whole snapshot file: etcd's database and its trailer, or the
/// format of earlier meshd versions.
pub fn decode(bytes: &[u8]) -> Result<StoreSnapshot, SnapshotError> {
    decode_with(bytes, false)
}

/// [`decode`]; with `skip_hash_check`, as etcd's flag of that name, the trailer is not
/// verified (only removed when the length says there is one), so an etcd database
/// without one is read too.
pub fn decode_with(bytes: &[u8], skip_hash_check: bool) -> Result<StoreSnapshot, SnapshotError> {
    let has_trailer = crate::bolt::has_trailer_len(bytes.len() as u64);
    if !has_trailer && is_bolt(bytes) {
        if !skip_hash_check {
            return Err(SnapshotError::MissingHash);
        }
        return Ok(crate::etcd_db::read(std::io::Cursor::new(bytes))?);
    }
    let content = if skip_hash_check && has_trailer {
        &bytes[..bytes.len() - TRAILER_LEN]
    } else {
        verify(bytes)?
    };
    if is_bolt(content) {
        return Ok(crate::etcd_db::read(std::io::Cursor::new(content))?);
    }
    decode_legacy(content)
}

/// The content (trailer removed) of a file in the format of earlier meshd versions.
fn decode_legacy(content: &[u8]) -> Result<StoreSnapshot, SnapshotError> {
    let bad = |what: &str| SnapshotError::Format(what.to_string());
    let rest = content
        .strip_prefix(MAGIC.as_slice())
        .ok_or_else(|| bad("no MESHSNAP header"))?;
    let (len, rest) = rest
        .split_at_checked(8)
        .ok_or_else(|| bad("no payload length"))?;
    let len = u64::from_le_bytes(len.try_into().expect("8 bytes")) as usize;
    let payload = rest
        .get(..len)
        .ok_or_else(|| bad("payload longer than the file"))?;
    Ok(StoreSnapshot::decode(payload)?)
}

/// What `snapshot status` reports, computed as etcd computes it from the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// CRC-32C over every bucket's name, keys and values, in bucket and key order.
    pub hash: u32,
    /// The main revision of the last key in the `key` bucket.
    pub revision: i64,
    /// Entries in all buckets.
    pub total_key: u64,
    /// Size of the database (without the trailer).
    pub total_size: u64,
}

/// `snapshot status` of a snapshot file: its trailer is checked when it has one (a
/// bare etcd database is read as etcd reads it). A file of earlier meshd versions is
/// reported as the etcd database its content would be.
pub fn status(bytes: &[u8]) -> Result<Status, SnapshotError> {
    let has_trailer = crate::bolt::has_trailer_len(bytes.len() as u64);
    let content = if !has_trailer && is_bolt(bytes) {
        bytes
    } else {
        verify(bytes)?
    };
    if is_bolt(content) {
        return bolt_status(content);
    }
    // Verified above: decoded as it stands, not checked a second time.
    let db = crate::etcd_db::write(&decode_legacy(content)?)?;
    bolt_status(&db)
}

fn bolt_status(db: &[u8]) -> Result<Status, SnapshotError> {
    use crate::bolt::{Reader, Value};
    let mut rd = Reader::open(std::io::Cursor::new(db))?;
    // A damaged tree is refused before anything is counted, as etcd checks first.
    rd.check()?;
    let meta = *rd.meta();
    let mut status = Status {
        hash: 0,
        revision: 0,
        total_key: 0,
        total_size: meta.high_water * u64::from(meta.page_size),
    };
    let mut crc = crate::crc32c::Crc32c::default();
    let root = rd.root();
    let buckets: Vec<_> = rd
        .entries(&root)
        .filter_map(|e| match e {
            Ok(crate::bolt::Entry {
                key,
                value: Value::Bucket(b),
            }) => Some(Ok((key, b))),
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        })
        .collect::<Result<_, _>>()?;
    for (name, bucket) in buckets {
        crc.update(&name);
        let is_key = name == b"key";
        for e in rd.entries(&bucket) {
            let e = e?;
            crc.update(&e.key);
            if let Value::Data(v) = &e.value {
                crc.update(v);
            }
            if is_key {
                if let Some(main) = e.key.get(..8) {
                    status.revision = i64::from_be_bytes(main.try_into().expect("8 bytes"));
                }
            }
            status.total_key += 1;
        }
    }
    status.hash = crc.finish();
    Ok(status)
}

/// Whether `bytes` start like a bbolt file: page 0 is a meta page with bbolt's magic.
fn is_bolt(bytes: &[u8]) -> bool {
    // The page header is 16 bytes (id, flags, count, overflow); the meta's magic follows.
    bytes
        .get(16..20)
        .is_some_and(|m| u32::from_le_bytes(m.try_into().expect("4 bytes")) == crate::bolt::MAGIC)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_round_trips_and_rejects_damage() {
        let snap = StoreSnapshot {
            revision: 7,
            compact_revision: 7,
            auth: Some(Default::default()),
            ..Default::default()
        };
        let mut bytes = encode(&snap).unwrap();
        assert_eq!(decode(&bytes).unwrap(), snap);
        // The database alone (an etcd data dir's member/snap/db) reads only when asked.
        let db = &bytes[..bytes.len() - TRAILER_LEN];
        assert!(matches!(decode(db), Err(SnapshotError::MissingHash)));
        assert_eq!(decode_with(db, true).unwrap(), snap);
        // So does the format earlier meshd versions wrote.
        assert_eq!(decode(&encode_legacy(&snap)).unwrap(), snap);
        assert_eq!(bytes.len() % 512, TRAILER_LEN, "etcdctl's length check");
        bytes[0] ^= 1;
        assert!(matches!(
            decode(&bytes),
            Err(SnapshotError::Checksum { .. })
        ));
        assert!(matches!(
            decode(&bytes[..10]),
            Err(SnapshotError::Truncated(10))
        ));
        bytes[0] ^= 1;
        let mut v = Verifier::default();
        for chunk in bytes.chunks(3) {
            v.update(chunk);
        }
        v.finish().unwrap();
    }

    #[test]
    fn status_counts_every_bucket_and_reads_the_last_revision() {
        use crate::proto::meshpb::HistoryRecord;
        use crate::proto::mvccpb::KeyValue;
        let record = |main, key: &str| HistoryRecord {
            main,
            sub: 0,
            tombstone: false,
            kv: Some(KeyValue {
                key: key.into(),
                value: b"v".to_vec(),
                create_revision: main,
                mod_revision: main,
                version: 1,
                lease: 0,
            }),
        };
        let snap = StoreSnapshot {
            revision: 3,
            history: vec![record(2, "a"), record(3, "b")],
            auth: Some(Default::default()),
            ..Default::default()
        };
        let bytes = encode(&snap).unwrap();
        let s = status(&bytes).unwrap();
        assert_eq!(s.revision, 3);
        assert_eq!(s.total_size, (bytes.len() - TRAILER_LEN) as u64);
        let db = &bytes[..bytes.len() - TRAILER_LEN];
        assert_eq!(status(db).unwrap(), s, "a bare database reads the same");
        // The legacy format is reported as the database it converts to.
        assert_eq!(status(&encode_legacy(&snap)).unwrap(), s);
        // Two history records, plus what the other buckets hold.
        assert!(s.total_key > 2, "{s:?}");
        let mut bad = bytes.clone();
        bad[100] ^= 1;
        assert!(matches!(status(&bad), Err(SnapshotError::Checksum { .. })));
    }
}
