//! The snapshot file: what the Maintenance Snapshot RPC streams, `meshctl snapshot
//! save` writes, and restore reads.
//!
//! Format: the protobuf encoding of one `meshpb.StoreSnapshot` (the same record a
//! leader sends a lagging follower: every history record, revision counters, members,
//! alarms), followed by 32 bytes: the SHA-256 of everything before them, as etcd ends
//! its snapshot stream with the SHA-256 of the database.

use prost::Message;
use sha2::{Digest, Sha256};

use crate::proto::meshpb::StoreSnapshot;

/// Length of the SHA-256 trailer.
pub const TRAILER_LEN: usize = 32;

/// Why a snapshot file was refused.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Shorter than the trailer: not a snapshot at all.
    #[error("snapshot is truncated ({0} bytes)")]
    Truncated(usize),
    /// The trailer does not match the content: damaged or incomplete.
    #[error("snapshot checksum mismatch: expected {expected}, computed {computed}")]
    Checksum { expected: String, computed: String },
    /// The checksum matched but the content is not a store snapshot.
    #[error("snapshot content does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
}

/// The bytes of a snapshot file for `snap`, trailer included.
pub fn encode(snap: &StoreSnapshot) -> Vec<u8> {
    let mut out = snap.encode_to_vec();
    let digest = Sha256::digest(&out);
    out.extend_from_slice(&digest);
    out
}

/// Checks the trailer of a whole snapshot file; returns the content before it.
pub fn verify(bytes: &[u8]) -> Result<&[u8], SnapshotError> {
    if bytes.len() < TRAILER_LEN {
        return Err(SnapshotError::Truncated(bytes.len()));
    }
    let (content, trailer) = bytes.split_at(bytes.len() - TRAILER_LEN);
    let computed = Sha256::digest(content);
    if computed.as_slice() != trailer {
        return Err(SnapshotError::Checksum {
            expected: hex(trailer),
            computed: hex(&computed),
        });
    }
    Ok(content)
}

/// Verifies and decodes a whole snapshot file.
pub fn decode(bytes: &[u8]) -> Result<StoreSnapshot, SnapshotError> {
    Ok(StoreSnapshot::decode(verify(bytes)?)?)
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
        bytes[0] ^= 1;
        assert!(matches!(
            decode(&bytes),
            Err(SnapshotError::Checksum { .. })
        ));
        assert!(matches!(
            decode(&bytes[..10]),
            Err(SnapshotError::Truncated(10))
        ));
    }
}
