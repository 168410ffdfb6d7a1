//! In-process three-member clusters: replication, leader failure, catch-up by snapshot.

use std::time::Duration;

use etcd_client::GetOptions;
use mesh_tests::*;

fn serializable() -> Option<GetOptions> {
    Some(GetOptions::new().with_serializable())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_through_any_member_are_read_from_all() {
    let c = InProcessCluster::start(3, ClusterOpts::default()).await;
    wait_for_leader(&c.live_addrs()).await;
    for i in 0..3 {
        let mut cl = etcd_client(c.addr(i)).await;
        cl.put(format!("k{i}"), format!("v{i}"), None)
            .await
            .unwrap_or_else(|e| panic!("put through member {i}: {e}"));
    }
    for j in 0..3 {
        let mut cl = etcd_client(c.addr(j)).await;
        // A linearizable read on any member sees every acknowledged write at once.
        for i in 0..3 {
            let r = cl.get(format!("k{i}"), None).await.expect("get");
            assert_eq!(
                r.kvs()[0].value(),
                format!("v{i}").as_bytes(),
                "member {j} key k{i}"
            );
        }
    }
    // And replication reaches every member's local state.
    for j in 0..3 {
        let addr = c.addr(j);
        eventually(
            "serializable reads on every member",
            Duration::from_secs(10),
            || async move {
                let mut cl = etcd_client(addr).await;
                let r = cl
                    .get(
                        "k",
                        Some(GetOptions::new().with_prefix().with_serializable()),
                    )
                    .await
                    .ok()?;
                (r.kvs().len() == 3).then_some(())
            },
        )
        .await;
    }
    // Revisions agree across members.
    let mut revs = Vec::new();
    for j in 0..3 {
        let mut cl = etcd_client(c.addr(j)).await;
        let r = cl.get("k2", None).await.unwrap();
        revs.push(r.kvs()[0].mod_revision());
    }
    assert!(revs.windows(2).all(|w| w[0] == w[1]), "{revs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_stopped_new_leader_elected_and_writes_continue() {
    let mut c = InProcessCluster::start(3, ClusterOpts::default()).await;
    let old = wait_for_leader(&c.live_addrs()).await;
    put_retrying(&c.live_addrs(), "before", "1").await;
    let li = c.index_of(old);
    c.stop(li).await;
    let new = wait_for_leader_other_than(&c.live_addrs(), old).await;
    assert_ne!(new, old, "a stopped member cannot stay leader");
    put_retrying(&c.live_addrs(), "after", "2").await;

    c.restart(li).await;
    let addr = c.addr(li);
    eventually(
        "restarted member catches up",
        Duration::from_secs(20),
        || async move {
            let mut cl = etcd_client(addr).await;
            let r = cl.get("after", serializable()).await.ok()?;
            (r.kvs().first()?.value() == b"2").then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_member_catches_up_by_snapshot_after_log_compaction() {
    let opts = ClusterOpts {
        snapshot_count: 20,
        catch_up_entries: 5,
        ..Default::default()
    };
    let mut c = InProcessCluster::start(3, opts).await;
    let leader = wait_for_leader(&c.live_addrs()).await;
    let li = c.index_of(leader);
    let fi = (li + 1) % 3;
    c.stop(fi).await;

    let live = c.live_addrs();
    let mut cl = etcd_client(c.addr(li)).await;
    for i in 0..120 {
        cl.put(format!("key{i:03}"), format!("value{i}"), None)
            .await
            .unwrap_or_else(|e| panic!("put {i}: {e}"));
    }
    let first = c.servers[li].as_ref().unwrap().node().log.first_index();
    assert!(first > 60, "leader compacted its log (first index {first})");

    c.restart(fi).await;
    let addr = c.addr(fi);
    let want = cl
        .get("key", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    eventually("snapshot catch-up", Duration::from_secs(30), || {
        let want = want.kvs().to_vec();
        async move {
            let mut f = etcd_client(addr).await;
            let got = f
                .get(
                    "key",
                    Some(GetOptions::new().with_prefix().with_serializable()),
                )
                .await
                .ok()?;
            let same = got.kvs().len() == want.len()
                && got.kvs().iter().zip(&want).all(|(a, b)| {
                    a.key() == b.key()
                        && a.value() == b.value()
                        && a.mod_revision() == b.mod_revision()
                });
            same.then_some(())
        }
    })
    .await;
    let f_first = c.servers[fi].as_ref().unwrap().node().log.first_index();
    assert!(
        f_first > 60,
        "follower's log starts after the installed snapshot ({f_first})"
    );
    drop(live);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_mesh_port_does_not_disturb_the_cluster() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let c = InProcessCluster::start(3, ClusterOpts::default()).await;
    wait_for_leader(&c.live_addrs()).await;
    let mesh = c.configs[0].listen_mesh;

    // Random bytes and an absurd frame length on the mesh port: each connection is
    // closed, nothing else happens.
    let mut junk = tokio::net::TcpStream::connect(mesh).await.unwrap();
    junk.write_all(&[0x13, 0x37, 0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3])
        .await
        .unwrap();
    let mut huge = tokio::net::TcpStream::connect(mesh).await.unwrap();
    huge.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    for s in [&mut junk, &mut huge] {
        let mut buf = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
        assert!(closed.is_ok(), "the member closes a bad peer connection");
    }

    put_retrying(&c.live_addrs(), "still", "serving").await;
    let mut cl = etcd_client(c.addr(0)).await;
    assert_eq!(
        cl.get("still", None).await.unwrap().kvs()[0].value(),
        b"serving"
    );
}

/// The leader's view of its voters (what the graceful stop's hand-over and autopilot
/// decide by) calls a healthy voter active at every moment, including right after a
/// check-quorum round, where raft-rs clears its own flag until the voter answers
/// again. A stopping leader that asked then found nobody to hand over to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_voter_stays_active_across_check_quorum_rounds() {
    let election_ticks = 21;
    let opts = ClusterOpts {
        election_ticks,
        ..ClusterOpts::default()
    };
    let tick = opts.tick;
    let (dir, mut configs) = InProcessCluster::configure(3, opts);
    // Heartbeats every 4 ticks against an election timeout of 21: each round of the
    // check falls 0-3 ticks before the next heartbeat, so the gap is there to see.
    for c in &mut configs {
        c.heartbeat_ticks = 4;
    }
    let c = InProcessCluster::start_configured(dir, configs).await;
    let mut leader = wait_for_leader(&c.live_addrs()).await;

    let rounds = 4;
    let end = std::time::Instant::now() + tick * (rounds * election_ticks) as u32;
    let mut samples = 0;
    while std::time::Instant::now() < end {
        let node = c.servers[c.index_of(leader)].as_ref().unwrap().node();
        let progress = node.progress().await.expect("progress");
        if progress.is_empty() {
            // Leadership moved (a stall of the host): sample the new leader.
            leader = wait_for_leader(&c.live_addrs()).await;
            continue;
        }
        samples += 1;
        let inactive: Vec<_> = progress.iter().filter(|p| !p.recent_active).collect();
        assert!(
            inactive.is_empty(),
            "sample {samples}: the leader calls healthy voters inactive: {inactive:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(
        samples > 100,
        "only {samples} samples of the leader's progress"
    );
}
