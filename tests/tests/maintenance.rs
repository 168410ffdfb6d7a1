//! The Maintenance service on real members: HashKV agreement, snapshot save and
//! restore into a new cluster, leader transfer, defragmentation, the NOSPACE alarm.

use std::net::SocketAddr;
use std::time::Duration;

use mesh_core::client::{Client, ClientConfig, ClientError};
use mesh_core::proto::etcdserverpb::{
    alarm_request::AlarmAction, AlarmMember, AlarmRequest, AlarmResponse, AlarmType,
    DeleteRangeRequest, PutRequest,
};
use mesh_core::server;
use mesh_tests::*;

fn client(addrs: &[SocketAddr]) -> Client {
    Client::connect(ClientConfig {
        endpoints: addrs.iter().map(|a| a.to_string()).collect(),
        dial_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(10),
        ..Default::default()
    })
    .unwrap()
}

async fn put(c: &Client, key: &str, value: &[u8]) -> Result<i64, ClientError> {
    let r = c
        .put(PutRequest {
            key: key.as_bytes().to_vec(),
            value: value.to_vec(),
            ..Default::default()
        })
        .await?;
    Ok(r.header.unwrap().revision)
}

async fn delete_prefix(c: &Client, prefix: &str) -> i64 {
    let r = c
        .delete_range(DeleteRangeRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: mesh_core::client::prefix_range_end(prefix.as_bytes()),
            ..Default::default()
        })
        .await
        .unwrap();
    r.header.unwrap().revision
}

/// The database file holds the Raft log too: keep little of it behind the applied
/// index, so that deleting data (and defragmenting) really frees the space.
fn short_log() -> ClusterOpts {
    ClusterOpts {
        snapshot_count: 100,
        catch_up_entries: 10,
        ..Default::default()
    }
}

async fn list_alarms(c: &Client) -> Result<AlarmResponse, ClientError> {
    c.alarm(AlarmRequest {
        action: AlarmAction::Get as i32,
        ..Default::default()
    })
    .await
}

/// HashKV of every member at `rev`, once all of them have applied it.
async fn hash_kv_everywhere(addrs: &[SocketAddr], rev: i64) -> Vec<u32> {
    let c = client(addrs);
    eventually(
        "every member answers HashKV",
        Duration::from_secs(20),
        || {
            let c = c.clone();
            async move {
                let mut out = Vec::new();
                for a in addrs {
                    out.push(c.hash_kv(&a.to_string(), rev).await.ok()?.hash);
                }
                Some(out)
            }
        },
    )
    .await
}

async fn source_data(c: &Client) -> i64 {
    for i in 0..50 {
        put(c, &format!("k/{i:02}"), format!("v{i}").as_bytes())
            .await
            .unwrap();
    }
    put(c, "k/00", b"again").await.unwrap();
    delete_prefix(c, "k/4").await;
    c.compact(10, true).await.unwrap();
    put(c, "last", b"one").await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashkv_agrees_on_all_members_and_hash_answers() {
    let cl = InProcessCluster::start(3, ClusterOpts::default()).await;
    let addrs = cl.live_addrs();
    wait_for_leader(&addrs).await;
    let c = client(&addrs);
    let rev = source_data(&c).await;

    let at_rev = hash_kv_everywhere(&addrs, rev).await;
    assert!(at_rev.iter().all(|h| *h == at_rev[0]), "{at_rev:?}");
    let earlier = hash_kv_everywhere(&addrs, rev - 1).await;
    assert!(earlier.iter().all(|h| *h == earlier[0]), "{earlier:?}");
    assert_ne!(at_rev[0], earlier[0], "the last put changes the hash");

    let r = c.hash_kv(&addrs[0].to_string(), 0).await.unwrap();
    assert_eq!((r.hash_revision, r.compact_revision), (rev, 10));
    let err = c.hash_kv(&addrs[0].to_string(), 5).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "etcdserver: mvcc: required revision has been compacted"
    );

    // Hash covers the whole store; with no writes in flight all members agree.
    let hashes = eventually("equal Hash on all members", Duration::from_secs(20), || {
        let c = c.clone();
        let addrs = addrs.clone();
        async move {
            let mut hs = Vec::new();
            for a in &addrs {
                hs.push(c.hash(&a.to_string()).await.ok()?.hash);
            }
            hs.iter().all(|h| *h == hs[0]).then_some(hs)
        }
    })
    .await;
    assert_ne!(hashes[0], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_restores_into_a_new_three_member_cluster() {
    let src = InProcessCluster::start(1, ClusterOpts::default()).await;
    wait_for_leader(&src.live_addrs()).await;
    let c = client(&src.live_addrs());
    let rev = source_data(&c).await;
    let source_hash = c.hash_kv(&src.addr(0).to_string(), rev).await.unwrap();

    let mut stream = c.snapshot().await.unwrap();
    let mut bytes = Vec::new();
    let mut last_remaining = u64::MAX;
    while let Some(msg) = stream.message().await.unwrap() {
        assert!(
            msg.remaining_bytes < last_remaining,
            "remaining counts down"
        );
        last_remaining = msg.remaining_bytes;
        bytes.extend_from_slice(&msg.blob);
    }
    assert_eq!(last_remaining, 0);

    // A damaged copy is refused and leaves nothing behind.
    let (dir, configs) = InProcessCluster::configure(3, ClusterOpts::default());
    let mut damaged = bytes.clone();
    damaged[3] ^= 0x40;
    let err = server::restore(&configs[0], &damaged, false).unwrap_err();
    assert!(err.to_string().contains("checksum mismatch"), "{err}");
    assert!(!configs[0].data_dir.exists());

    let mut ids = Vec::new();
    for cfg in &configs {
        let r = server::restore(cfg, &bytes, false).unwrap();
        assert_eq!(r.revision, rev);
        ids.push(r.member_id);
    }
    // Restoring over an existing data dir is refused.
    let err = server::restore(&configs[0], &bytes, false).unwrap_err();
    assert!(err.to_string().contains("not empty"), "{err}");

    let restored = InProcessCluster::start_configured(dir, configs).await;
    let addrs = restored.live_addrs();
    let leader = wait_for_leader(&addrs).await;
    assert!(ids.contains(&leader));
    let hashes = hash_kv_everywhere(&addrs, rev).await;
    assert!(
        hashes.iter().all(|h| *h == source_hash.hash),
        "restored {hashes:?}, source {}",
        source_hash.hash
    );
    let rc = client(&addrs);
    assert_eq!(rc.get("k/07").await.unwrap().unwrap().value, b"v7");
    assert_eq!(rc.get("k/00").await.unwrap().unwrap().value, b"again");
    assert!(rc.get("k/41").await.unwrap().is_none());
    let members = rc.member_list().await.unwrap().members;
    let mut got: Vec<u64> = members.iter().map(|m| m.id).collect();
    got.sort_unstable();
    ids.sort_unstable();
    assert_eq!(got, ids, "the new cluster's members, not the source's");
    // Writes continue from the snapshot's revision.
    assert_eq!(put(&rc, "after", b"restore").await.unwrap(), rev + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_leader_transfers_and_is_refused_on_followers() {
    let cl = InProcessCluster::start(3, ClusterOpts::default()).await;
    let addrs = cl.live_addrs();
    let leader = wait_for_leader(&addrs).await;
    let li = cl.index_of(leader);
    let fi = (li + 1) % 3;
    let target = cl.servers[fi].as_ref().unwrap().node().status.member_id;
    let c = client(&addrs);

    let err = c
        .move_leader(&cl.addr(fi).to_string(), leader)
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "etcdserver: not leader");
    let err = c
        .move_leader(&cl.addr(li).to_string(), 0xdead)
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "etcdserver: bad leader transferee");

    c.move_leader(&cl.addr(li).to_string(), target)
        .await
        .unwrap();
    assert_eq!(wait_for_leader(&addrs).await, target);
    put(&c, "after-move", b"ok").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defragment_shrinks_the_file_and_keeps_the_data() {
    let mut cl = InProcessCluster::start(1, short_log()).await;
    wait_for_leader(&cl.live_addrs()).await;
    let c = client(&cl.live_addrs());
    let ep = cl.addr(0).to_string();
    let value = vec![b'x'; 8 * 1024];
    for i in 0..1000 {
        put(&c, &format!("big/{i:04}"), &value).await.unwrap();
    }
    put(&c, "keep", b"me").await.unwrap();
    let rev = delete_prefix(&c, "big/").await;
    c.compact(rev, true).await.unwrap();
    let db_file = cl.configs[0].data_dir.join(mesh_core::storage::DB_FILE);
    let before = std::fs::metadata(&db_file).unwrap().len();
    let hash = c.hash_kv(&ep, 0).await.unwrap();

    c.defragment(&ep).await.unwrap();
    let after = std::fs::metadata(&db_file).unwrap().len();
    assert!(
        after * 2 < before,
        "defragment shrank the file from {before} to only {after}"
    );
    let status = c.status(&ep).await.unwrap();
    assert_eq!(status.db_size as u64, after);

    cl.stop(0).await;
    cl.restart(0).await;
    wait_for_leader(&cl.live_addrs()).await;
    let c = client(&cl.live_addrs());
    assert_eq!(c.get("keep").await.unwrap().unwrap().value, b"me");
    assert_eq!(c.hash_kv(&ep, 0).await.unwrap().hash, hash.hash);
    put(&c, "writable", b"yes").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nospace_alarm_refuses_puts_until_space_is_freed_and_disarmed() {
    let (dir, mut configs) = InProcessCluster::configure(1, short_log());
    configs[0].quota_backend_bytes = 4 * 1024 * 1024;
    let cl = InProcessCluster::start_configured(dir, configs).await;
    wait_for_leader(&cl.live_addrs()).await;
    let c = client(&cl.live_addrs());
    let ep = cl.addr(0).to_string();
    let me = cl.servers[0].as_ref().unwrap().node().status.member_id;
    let value = vec![b'q'; 16 * 1024];

    let mut i = 0;
    let err = eventually("a put refused for space", Duration::from_secs(60), || {
        i += 1;
        let (c, value, key) = (c.clone(), value.clone(), format!("fill/{i:05}"));
        async move { put(&c, &key, &value).await.err() }
    })
    .await;
    assert_eq!(err.to_string(), "etcdserver: mvcc: database space exceeded");
    assert_eq!(err.code(), Some(tonic::Code::ResourceExhausted));

    let nospace = AlarmMember {
        member_id: me,
        alarm: AlarmType::Nospace as i32,
    };
    let list = list_alarms(&c).await.unwrap();
    assert_eq!(list.alarms, [nospace]);
    let status = c.status(&ep).await.unwrap();
    assert!(
        status
            .errors
            .contains(&format!("memberID:{me} alarm:NOSPACE")),
        "{:?}",
        status.errors
    );
    // Reads still work; so do a txn that only reads.
    assert!(c.get("fill/00001").await.unwrap().is_some());

    // Free the space: delete, compact, defragment, then disarm.
    let rev = delete_prefix(&c, "fill/").await;
    c.compact(rev, true).await.unwrap();
    c.defragment(&ep).await.unwrap();
    let disarmed = c
        .alarm(AlarmRequest {
            action: AlarmAction::Deactivate as i32,
            member_id: me,
            alarm: AlarmType::Nospace as i32,
        })
        .await
        .unwrap();
    assert_eq!(disarmed.alarms, [nospace]);
    put(&c, "room", b"again").await.unwrap();
    let list = list_alarms(&c).await.unwrap();
    assert!(list.alarms.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alarms_replicate_and_survive_restart() {
    let mut cl = InProcessCluster::start(3, ClusterOpts::default()).await;
    let addrs = cl.live_addrs();
    wait_for_leader(&addrs).await;
    let c = client(&addrs);
    let raised = c
        .alarm(AlarmRequest {
            action: AlarmAction::Activate as i32,
            member_id: 77,
            alarm: AlarmType::Nospace as i32,
        })
        .await
        .unwrap();
    assert_eq!(raised.alarms.len(), 1);
    let err = put(&c, "x", b"y").await.unwrap_err();
    assert_eq!(err.to_string(), "etcdserver: mvcc: database space exceeded");

    cl.stop(2).await;
    cl.restart(2).await;
    let only2 = client(&[cl.addr(2)]);
    eventually("member 2 lists the alarm", Duration::from_secs(20), || {
        let c = only2.clone();
        async move {
            let r = list_alarms(&c).await.ok()?;
            (r.alarms.len() == 1 && r.alarms[0].member_id == 77).then_some(())
        }
    })
    .await;
    let err = c
        .alarm(AlarmRequest {
            action: AlarmAction::Activate as i32,
            member_id: 77,
            alarm: AlarmType::None as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument));
}

/// Auto-compaction in both modes on a real member: history older than the retention
/// becomes unreadable without anyone calling Compact, and newer history stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_compaction_keeps_only_the_retention() {
    use mesh_core::compactor::AutoCompaction;
    for mode in [
        AutoCompaction::Periodic(Duration::from_secs(1)),
        AutoCompaction::Revision(5),
    ] {
        let (dir, mut configs) = InProcessCluster::configure(1, ClusterOpts::default());
        configs[0].auto_compaction = Some(mode);
        configs[0].auto_compaction_revision_check = Duration::from_millis(200);
        let c = InProcessCluster::start_configured(dir, configs).await;
        let addr = c.addr(0);
        wait_for_leader(&[addr]).await;
        let mut client = etcd_client(addr).await;
        for i in 0..20 {
            client.put("k", i.to_string(), None).await.unwrap();
        }
        let first = 2;
        let compacted = eventually(
            &format!("{mode:?} to compact"),
            Duration::from_secs(30),
            || {
                let mut client = client.clone();
                async move {
                    // Keep writing, as a live cluster would, so the periodic window moves.
                    let now = client.put("k", "more", None).await.ok()?;
                    let err = client
                        .get(
                            "k",
                            Some(etcd_client::GetOptions::new().with_revision(first)),
                        )
                        .await
                        .err()?;
                    err.to_string()
                        .contains("compacted")
                        .then_some(now.header()?.revision())
                }
            },
        )
        .await;
        // The latest revision is readable; in revision mode, the last five are too.
        let r = client
            .get(
                "k",
                Some(etcd_client::GetOptions::new().with_revision(compacted)),
            )
            .await
            .unwrap();
        assert_eq!(r.kvs().len(), 1);
        if let AutoCompaction::Revision(keep) = mode {
            let status = client.status().await.unwrap();
            let rev = status.header().unwrap().revision();
            client
                .get(
                    "k",
                    Some(etcd_client::GetOptions::new().with_revision(rev - keep + 1)),
                )
                .await
                .expect("revisions within the retention stay readable");
        }
    }
}
