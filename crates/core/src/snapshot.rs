//! The snapshot file: what the Maintenance Snapshot RPC streams, `meshctl snapshot
//! save` writes, and restore reads.
//!
//! Format: the content, then 32 bytes: the SHA-256 of the content, as etcd ends its
//! snapshot stream. The content is the magic `MESHSNAP`, the length of the payload as
//! a little-endian u64, the payload (the protobuf encoding of one `meshpb.StoreSnapshot`,
//! the record a leader sends a lagging follower: history, revision counters, members,
//! alarms), and zero padding to a multiple of 512 bytes, because etcdctl only accepts a
//! stream whose length is a multiple of 512 plus the 32-byte checksum.

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
    /// Shorter than the trailer: not a snapshot at all.
    #[error("snapshot is truncated ({0} bytes)")]
    Truncated(usize),
    /// The trailer does not match the content: damaged or incomplete.
    #[error("snapshot checksum mismatch: expected {expected}, computed {computed}")]
    Checksum { expected: String, computed: String },
    /// The checksum matched but the content is not a meshd store snapshot.
    #[error("not a meshd snapshot: {0}")]
    Format(String),
    /// The checksum matched but the payload does not decode.
    #[error("snapshot content does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
}

/// The bytes of a snapshot file for `snap`, trailer included.
pub fn encode(snap: &StoreSnapshot) -> Vec<u8> {
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

/// Verifies and decodes a whole snapshot file.
pub fn decode(bytes: &[u8]) -> Result<StoreSnapshot, SnapshotError> {
    let content = verify(bytes)?;
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
            compact_revision: 3,
            ..Default::default()
        };
        let mut bytes = encode(&snap);
        assert_eq!(decode(&bytes).unwrap(), snap);
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
}
