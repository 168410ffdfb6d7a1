//! A hostile peer against a three-member cluster with a mesh key: it joins without the
//! key and with a wrong one, then, holding the key, forges its source and senders, poses
//! as a member and as the leader, sends Raft messages raft-rs would panic on, removal
//! notices, endless chunk streams, snapshot transfers that do not fit, do not match
//! their hash or arrive out of order, and oversized topology. Each attack is refused and
//! counted, no member process dies, and every member keeps applying and serving.

use std::net::SocketAddr;
use std::time::Duration;

use mesh_core::mesh::MeshKey;
use mesh_core::proto::meshpb::{
    node_meta::State, JoinWelcome, MeshPeerConnection, MeshPeerEntry, NodeMeta, RaftEnvelope,
    SnapshotChunk,
};
use mesh_tests::hostile_peer::HostilePeer;
use mesh_tests::*;
use prost::Message as _;
use raft::prelude::{Entry, Message, MessageType};

/// The value of counter `series` (name with labels, as exposed) on a member's
/// `/metrics`, 0 when absent.
async fn metric(metrics: SocketAddr, series: &str) -> u64 {
    let (_, body) = http_get(metrics, "/metrics").await.unwrap_or_default();
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

/// Waits until `series` on `metrics` exceeds `above`, repeating `attack` meanwhile.
async fn counted<F, Fut>(metrics: SocketAddr, series: &str, above: u64, mut attack: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    eventually(series, Duration::from_secs(30), || {
        let probe = attack();
        async move {
            probe.await;
            (metric(metrics, series).await > above).then_some(())
        }
    })
    .await;
}

fn rand_stream() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

fn refused(reason: &str) -> String {
    format!("meshd_raft_peer_messages_refused_total{{reason=\"{reason}\"}}")
}

fn raft_msg(
    kind: MessageType,
    from: u64,
    to: u64,
    term: u64,
    f: impl FnOnce(&mut Message),
) -> Message {
    let mut m = Message {
        msg_type: kind as i32,
        from,
        to,
        term,
        ..Default::default()
    };
    f(&mut m);
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_peer_is_refused_and_the_cluster_keeps_serving() {
    let keys = tempfile::tempdir().unwrap();
    let key = MeshKey::generate();
    let key_file = keys.path().join("mesh.key");
    std::fs::write(&key_file, format!("{}\n", key.to_base64())).unwrap();
    let key_flag = format!("--password-file={}", key_file.display());
    let mut c = ProcessCluster::start_with(3, ClusterOpts::default(), |_, mesh| {
        let initial = (0..mesh.len())
            .map(|i| format!("p{i}={}", mesh[i]))
            .collect::<Vec<_>>()
            .join(",");
        vec![format!("--initial-cluster={initial}"), key_flag.clone()]
    });
    let addrs = c.addrs();
    let leader = wait_for_leader(&addrs).await;
    put_retrying(&addrs, "before", "1").await;
    let mut ids = Vec::new();
    let mut names = Vec::new();
    for a in &addrs {
        let s = status(*a).await.unwrap();
        ids.push(s.header().unwrap().member_id());
        names.push(eventually("mesh name", Duration::from_secs(10), || mesh_name(*a)).await);
    }
    let cluster_id = status(addrs[0])
        .await
        .unwrap()
        .header()
        .unwrap()
        .cluster_id();
    let li = ids.iter().position(|id| *id == leader).unwrap();
    let t = (li + 1) % 3;
    let target = ids[t];
    let metrics = c.procs[t].metrics;
    let mesh_addr = c.procs[t]
        .args
        .iter()
        .find_map(|a| a.strip_prefix("--listen-mesh="))
        .unwrap()
        .to_string();

    // Joining without the key, or with another one: refused at the handshake.
    let before = metric(metrics, "meshd_mesh_handshakes_refused_total").await;
    if let Ok(p) = HostilePeer::connect(&mesh_addr, 0xdead_0001, None).await {
        eventually("keyless peer closed", Duration::from_secs(10), || async {
            p.is_closed().then_some(())
        })
        .await;
    }
    assert!(
        HostilePeer::connect(&mesh_addr, 0xdead_0002, Some(&MeshKey::generate()))
            .await
            .is_err()
    );
    counted(
        metrics,
        "meshd_mesh_handshakes_refused_total",
        before + 1,
        || async {},
    )
    .await;

    // Holding the key.
    let p = HostilePeer::connect(&mesh_addr, 0xbad0_0001, Some(&key))
        .await
        .unwrap();
    let term = status(addrs[t]).await.unwrap().raft_term();
    let heartbeat = |from| {
        raft_msg(MessageType::MsgHeartbeat, from, target, term, |m| {
            m.commit = 1 << 40
        })
    };

    // A unicast claiming to come from the target itself.
    let env = RaftEnvelope {
        cluster_id,
        from: leader,
        to: target,
        msg_id: 1,
        chunk: 0,
        chunks: 1,
        data: prost011::Message::encode_to_vec(&heartbeat(leader)),
    };
    counted(metrics, "meshd_mesh_unicasts_refused_total", 0, || async {
        p.unicast("raft", names[t], env.encode_to_vec())
            .await
            .unwrap();
    })
    .await;

    // Raft messages in the leader's name, sent under the peer's own name.
    counted(metrics, &refused("forged_sender"), 0, || async {
        p.raft(cluster_id, leader, target, &heartbeat(leader))
            .await
            .unwrap();
    })
    .await;

    // Posing as member X of the cluster, and as its leader, in the gossiped topology.
    let intruder = 0x7777_7777;
    let meta = NodeMeta {
        name: "intruder".into(),
        member_id: intruder,
        cluster_id,
        server: true,
        state: State::Member as i32,
        leader: true,
        ..Default::default()
    };
    p.topology(vec![MeshPeerEntry {
        name: p.name,
        nickname: "intruder".into(),
        uid: 1,
        version: 1_000_000,
        address: String::new(),
        connections: vec![MeshPeerConnection {
            peer: names[t],
            address: String::new(),
            outbound: true,
        }],
        meta: meta.encode_to_vec(),
    }])
    .await
    .unwrap();

    // A proposal from a non-member; a heartbeat committing far past the log, from a
    // "leader" the target does not know while it hears from its own.
    counted(metrics, &refused("non_member"), 0, || async {
        let propose = raft_msg(MessageType::MsgPropose, intruder, target, 0, |m| {
            m.entries = vec![Entry {
                data: b"not a request".to_vec(),
                ..Default::default()
            }];
        });
        p.raft(cluster_id, intruder, target, &propose)
            .await
            .unwrap();
        p.raft(cluster_id, intruder, target, &heartbeat(intruder))
            .await
            .unwrap();
    })
    .await;

    // Message and entry types raft-rs panics on.
    counted(metrics, &refused("malformed"), 0, || async {
        let unknown_type = raft_msg(MessageType::MsgHeartbeat, intruder, target, term, |m| {
            m.msg_type = 99
        });
        p.raft(cluster_id, intruder, target, &unknown_type)
            .await
            .unwrap();
        let unknown_entry = raft_msg(MessageType::MsgAppend, intruder, target, term, |m| {
            m.entries = vec![Entry {
                entry_type: 42,
                ..Default::default()
            }];
        });
        p.raft(cluster_id, intruder, target, &unknown_entry)
            .await
            .unwrap();
    })
    .await;

    // A removal notice from the self-proclaimed leader.
    let removals = metric(metrics, &refused("non_member")).await;
    let notice = JoinWelcome {
        cluster_id,
        member_id: 0,
        cluster_token: String::new(),
    };
    counted(metrics, &refused("non_member"), removals, || async {
        p.unicast("join", p.name, notice.encode_to_vec())
            .await
            .unwrap();
    })
    .await;

    // An endless stream of first chunks of huge messages.
    for i in 0..300u64 {
        let env = RaftEnvelope {
            cluster_id,
            from: intruder,
            to: target,
            msg_id: 10_000 + i,
            chunk: 0,
            chunks: 1000,
            data: vec![0xab; 64 * 1024],
        };
        p.unicast("raft", p.name, env.encode_to_vec())
            .await
            .unwrap();
    }

    // Snapshot transfers from the intruder: one announcing more than the disk holds,
    // one whose bytes do not match the hash it announced.
    let snapshot_msg = |len: u64| {
        let r = mesh_core::proto::meshpb::SnapshotRef {
            len,
            sha256: vec![7; 32],
            path: "/etc/passwd".into(),
        };
        raft_msg(MessageType::MsgSnapshot, intruder, target, term, |m| {
            m.snapshot = Some(raft::prelude::Snapshot {
                data: r.encode_to_vec(),
                metadata: None,
            });
        })
    };
    let chunk = |stream: u64, message: Vec<u8>, offset: u64, data: Vec<u8>| SnapshotChunk {
        cluster_id,
        from: intruder,
        to: target,
        stream,
        message,
        offset,
        data,
        ..Default::default()
    };
    let bad = metric(metrics, &refused("bad_snapshot")).await;
    let huge = prost011::Message::encode_to_vec(&snapshot_msg(u64::MAX / 4));
    counted(metrics, &refused("bad_snapshot"), bad, || async {
        p.unicast(
            "raft-snapshot",
            p.name,
            chunk(1, huge.clone(), 0, vec![]).encode_to_vec(),
        )
        .await
        .unwrap();
    })
    .await;
    let bad = metric(metrics, &refused("bad_snapshot")).await;
    let small = prost011::Message::encode_to_vec(&snapshot_msg(4));
    counted(metrics, &refused("bad_snapshot"), bad, || async {
        let stream = rand_stream();
        p.unicast(
            "raft-snapshot",
            p.name,
            chunk(stream, small.clone(), 0, vec![]).encode_to_vec(),
        )
        .await
        .unwrap();
        p.unicast(
            "raft-snapshot",
            p.name,
            chunk(stream, vec![], 0, vec![1, 2, 3, 4]).encode_to_vec(),
        )
        .await
        .unwrap();
    })
    .await;

    // A chunk of a transfer the member is not receiving, or one out of order, is
    // refused at once (a real sender then gives up and raft-rs sends the snapshot
    // again, instead of waiting for a stall); a first chunk is acknowledged at once.
    let answer = |stream: u64| {
        let p = &p;
        async move {
            loop {
                let bytes = p
                    .received("raft-snapshot", Duration::from_secs(10))
                    .await
                    .expect("the member answers the chunk");
                let c = SnapshotChunk::decode(bytes.as_slice()).unwrap();
                if c.stream == stream {
                    return c;
                }
            }
        }
    };
    let send_chunk = |c: SnapshotChunk| {
        let p = &p;
        async move {
            p.unicast("raft-snapshot", p.name, c.encode_to_vec())
                .await
                .unwrap()
        }
    };
    let stream = rand_stream();
    send_chunk(chunk(stream, vec![], 0, vec![1, 2])).await;
    let a = answer(stream).await;
    assert!(a.ack && a.error.contains("no transfer"), "{a:?}");
    let stream = rand_stream();
    send_chunk(chunk(stream, small.clone(), 0, vec![])).await;
    let a = answer(stream).await;
    assert!(a.ack && a.offset == 0 && a.error.is_empty(), "{a:?}");
    send_chunk(chunk(stream, vec![], 2, vec![3, 4])).await;
    let a = answer(stream).await;
    assert!(
        a.error.contains("byte 2 came where byte 0 was due"),
        "{a:?}"
    );
    // A transfer of the same file asking to resume goes on where the member's file
    // ends; bytes it already has are skipped, and the whole file is still checked.
    send_chunk(chunk(stream, vec![], 0, vec![1, 2])).await;
    let a = answer(stream).await;
    assert!(a.ack && a.offset == 2 && a.error.is_empty(), "{a:?}");
    // An empty chunk asks where the file ends; the same first chunk again changes
    // nothing.
    send_chunk(chunk(stream, vec![], 4, vec![])).await;
    let a = answer(stream).await;
    assert!(a.ack && a.resume && a.offset == 2, "{a:?}");
    send_chunk(chunk(stream, small.clone(), 0, vec![])).await;
    let a = answer(stream).await;
    assert!(a.ack && a.offset == 2 && a.error.is_empty(), "{a:?}");
    let resumed = rand_stream();
    let mut first = chunk(resumed, small.clone(), 0, vec![]);
    first.resume = true;
    send_chunk(first).await;
    let a = answer(resumed).await;
    assert!(a.ack && a.resume && a.offset == 2, "{a:?}");
    let bad = metric(metrics, &refused("bad_snapshot")).await;
    send_chunk(chunk(resumed, vec![], 0, vec![1, 2, 3, 4])).await;
    let a = answer(resumed).await;
    assert!(a.ack && a.offset == 4 && a.error.is_empty(), "{a:?}");
    let a = answer(resumed).await;
    assert!(a.error.contains("SHA-256 mismatch"), "{a:?}");
    assert_eq!(metric(metrics, &refused("bad_snapshot")).await, bad + 1);

    // An oversized topology entry.
    counted(
        metrics,
        "meshd_mesh_topology_entries_refused_total",
        0,
        || async {
            p.topology(vec![MeshPeerEntry {
                name: 0xbad0_0002,
                nickname: "huge".into(),
                uid: 2,
                version: 1,
                address: String::new(),
                connections: Vec::new(),
                meta: vec![0u8; 100 * 1024],
            }])
            .await
            .unwrap();
        },
    )
    .await;

    // Nothing died, and every member still applies and serves.
    for (i, proc) in c.procs.iter_mut().enumerate() {
        let exited = proc.child.as_mut().unwrap().try_wait().unwrap();
        assert!(exited.is_none(), "member {i} exited: {exited:?}");
    }
    put_retrying(&addrs, "after", "2").await;
    for a in &addrs {
        eventually(
            "the write applied everywhere",
            Duration::from_secs(30),
            || async {
                let mut cl = etcd_client(*a).await;
                let opts = etcd_client::GetOptions::new().with_serializable();
                let r = cl.get("after", Some(opts)).await.ok()?;
                (r.count() == 1).then_some(())
            },
        )
        .await;
    }
    assert_eq!(
        wait_for_leader(&addrs).await,
        leader,
        "the leader was deposed"
    );
    let log = c.log(t);
    for line in [
        "raft message dropped",
        "raft message from a peer refused",
        "removal notice refused",
        "refused connection",
    ] {
        assert!(
            log.contains(line),
            "no {line:?} in the target's log:\n{log}"
        );
    }
}
