//! Every decoder that reads bytes from the network or the disk, behind one entry point
//! each, so the cargo-fuzz targets (`fuzz/`) and the stable smoke test below drive the
//! real code paths: any input must give a value or an error, never a panic or a hang.

use crate::proto::meshpb::{self, HistoryRecord, InternalRequest, JoinWelcome, NodeMeta};

/// A decoder of untrusted bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoder {
    /// A mesh connection's handshake (network).
    MeshHandshake,
    /// A mesh frame (network).
    MeshFrame,
    /// Frames on the mesh's `raft` channel: envelope, chunk reassembly, Raft message.
    RaftChannel,
    /// A peer's published metadata (network, via topology gossip).
    NodeMeta,
    /// A welcome or removal notice on the `join` channel (network).
    JoinWelcome,
    /// A gossiped counter set (network).
    CounterSet,
    /// A snapshot file (`snapshot save` output, disk) and its summary.
    SnapshotFile,
    /// The payload of a Raft log entry (disk and network): request or conf change.
    RaftEntry,
    /// A stored MVCC history record (disk).
    HistoryRecord,
    /// The mesh peer-name file of a data dir (disk).
    PeerNameFile,
    /// A segment of the Raft write-ahead log (disk).
    WalSegment,
    /// An etcd backend database (a snapshot being restored, disk): bbolt pages and
    /// etcd's buckets.
    EtcdDatabase,
    /// A chunk of a Raft snapshot file on the `raft-snapshot` channel (network).
    SnapshotChunk,
    /// An answer on the corruption check's `hashkv` channel (network).
    HashCheck,
    /// A JSON request body on the client port's gateway (network).
    GatewayJson,
}

impl Decoder {
    pub const ALL: [Decoder; 15] = [
        Decoder::MeshHandshake,
        Decoder::MeshFrame,
        Decoder::RaftChannel,
        Decoder::NodeMeta,
        Decoder::JoinWelcome,
        Decoder::CounterSet,
        Decoder::SnapshotFile,
        Decoder::RaftEntry,
        Decoder::HistoryRecord,
        Decoder::PeerNameFile,
        Decoder::WalSegment,
        Decoder::EtcdDatabase,
        Decoder::SnapshotChunk,
        Decoder::HashCheck,
        Decoder::GatewayJson,
    ];

    /// Decodes `data`; returns whether it was accepted (for statistics only).
    pub fn run(self, data: &[u8]) -> bool {
        use prost::Message as _;
        match self {
            Decoder::MeshHandshake => crate::mesh::decode_handshake(data).is_ok(),
            Decoder::MeshFrame => match crate::mesh::decode_frame(data) {
                // Topology entries are decoded in full only when they are news.
                Ok(meshpb::MeshFrameIn {
                    body: Some(meshpb::mesh_frame_in::Body::Topology(t)),
                }) => t
                    .peers
                    .iter()
                    .all(|p| meshpb::MeshPeerEntry::decode(p.as_ref()).is_ok()),
                Ok(_) => true,
                Err(_) => false,
            },
            Decoder::RaftChannel => {
                // The input is several frames, each prefixed by a one-byte length.
                let mut frames = Vec::new();
                let mut rest = data;
                while let Some((&n, tail)) = rest.split_first() {
                    let n = (n as usize).min(tail.len());
                    frames.push(&tail[..n]);
                    rest = &tail[n..];
                }
                crate::raft::mesh_transport::receive_untrusted(&frames) > 0
            }
            Decoder::NodeMeta => NodeMeta::decode(data).is_ok(),
            Decoder::JoinWelcome => JoinWelcome::decode(data).is_ok(),
            Decoder::CounterSet => match crate::crdt::CounterSet::decode(data) {
                Ok(mut set) => {
                    let copy = set.clone();
                    set.merge_delta(&copy);
                    true
                }
                Err(_) => false,
            },
            Decoder::SnapshotFile => {
                let decoded = crate::snapshot::decode(data).is_ok();
                let _ = crate::snapshot::status(data);
                decoded
            }
            Decoder::RaftEntry => raft_entry(data),
            Decoder::HistoryRecord => HistoryRecord::decode(data).is_ok(),
            Decoder::PeerNameFile => std::str::from_utf8(data)
                .ok()
                .and_then(crate::storage::parse_peer_name)
                .is_some(),
            Decoder::WalSegment => crate::storage::wal::replay_untrusted(data),
            Decoder::EtcdDatabase => crate::etcd_db::read(std::io::Cursor::new(data)).is_ok(),
            Decoder::SnapshotChunk => meshpb::SnapshotChunk::decode(data).is_ok(),
            Decoder::HashCheck => meshpb::HashCheck::decode(data).is_ok(),
            Decoder::GatewayJson => {
                use crate::proto::etcdserverpb as pb;
                serde_json::from_slice::<pb::TxnRequest>(data).is_ok()
                    | serde_json::from_slice::<pb::WatchRequest>(data).is_ok()
            }
        }
    }
}

fn raft_entry(data: &[u8]) -> bool {
    use prost011::Message as _;
    use raft::prelude::{ConfChange, Entry, EntryType};
    let Ok(e) = Entry::decode(data) else {
        return false;
    };
    // A stored or received entry with an unknown type is refused before anything calls
    // raft-rs's panicking `get_entry_type`.
    match EntryType::from_i32(e.entry_type) {
        None => false,
        Some(EntryType::EntryNormal) => {
            let Ok(req) = <InternalRequest as prost::Message>::decode(e.data.as_slice()) else {
                return false;
            };
            if let Some(meshpb::internal_request::Request::Put(p)) = &req.request {
                let _ = crate::kv::validate_put(p);
            }
            true
        }
        Some(EntryType::EntryConfChange) => match ConfChange::decode(e.data.as_slice()) {
            Ok(cc) => {
                <meshpb::ConfChangeContext as prost::Message>::decode(cc.context.as_slice()).is_ok()
            }
            Err(_) => false,
        },
        Some(EntryType::EntryConfChangeV2) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Random and mutated inputs to every decoder: none may panic. (cargo-fuzz explores
    /// far more on demand: `scripts/fuzz.sh`.)
    #[test]
    fn decoders_survive_random_and_mutated_input() {
        let seed: u64 = rand::random();
        println!("seed {seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let valid: Vec<Vec<u8>> = vec![
            prost::Message::encode_to_vec(&NodeMeta {
                name: "n".into(),
                member_id: 7,
                ..Default::default()
            }),
            crate::snapshot::encode(&meshpb::StoreSnapshot::default())
                .expect("an empty store encodes"),
            prost::Message::encode_to_vec(&meshpb::RaftEnvelope {
                cluster_id: 1,
                to: 2,
                chunks: 2,
                data: vec![8, 1],
                ..Default::default()
            }),
            b"00000000000000ff\n".to_vec(),
            wal_segment(),
            crate::etcd_db::write(&meshpb::StoreSnapshot {
                revision: 3,
                history: vec![meshpb::HistoryRecord {
                    main: 2,
                    sub: 0,
                    tombstone: false,
                    kv: Some(crate::proto::mvccpb::KeyValue {
                        key: b"k".to_vec(),
                        mod_revision: 2,
                        ..Default::default()
                    }),
                }],
                leases: vec![meshpb::LeaseRecord { id: 1, ttl: 5 }],
                ..Default::default()
            })
            .expect("a small store encodes"),
            br#"{"compare":[{"key":"Zm9v","target":"VALUE","result":"EQUAL","value":"YmFy"}],"success":[{"request_put":{"key":"Zm9v","value":"YmF6","lease":"5"}}]}"#.to_vec(),
        ];
        for d in Decoder::ALL {
            for i in 0..3000 {
                let input: Vec<u8> = if i % 2 == 0 {
                    let len = rng.random_range(0..200);
                    (0..len).map(|_| rng.random()).collect()
                } else {
                    let mut v = valid[i % valid.len()].clone();
                    for _ in 0..rng.random_range(1..4) {
                        if v.is_empty() {
                            break;
                        }
                        let at = rng.random_range(0..v.len());
                        v[at] = rng.random();
                    }
                    v
                };
                let _ = d.run(&input);
            }
        }
    }

    /// A real log segment: a few entries and hard states.
    fn wal_segment() -> Vec<u8> {
        use crate::storage::wal::{Wal, WAL_DIR};
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _, _) = Wal::open(&crate::storage::vfs::real(), dir.path()).unwrap();
        for i in 1..=3u64 {
            wal.append(&[raft::prelude::Entry {
                index: i,
                term: 1,
                data: vec![1, 2, 3],
                ..Default::default()
            }]);
            wal.set_hard_state(&raft::prelude::HardState {
                term: 1,
                vote: 1,
                commit: i,
            });
            wal.sync().unwrap();
        }
        let seg = dir.path().join(WAL_DIR).join("0000000000000001.wal");
        let mut bytes = std::fs::read(seg).unwrap();
        // The records only, not the zeros kept after them (no record ends in a zero).
        bytes.truncate(bytes.len() - bytes.iter().rev().take_while(|&&b| b == 0).count());
        assert!(crate::storage::wal::replay_untrusted(&bytes));
        bytes
    }
}
