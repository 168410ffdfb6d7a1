//! Leases through the independent `etcd-client` crate on a three-member cluster:
//! expiry deletes attached keys, keep-alives (to the leader and to followers) keep
//! them, a revoke deletes them in one revision, and a leader change neither expires
//! leases early nor makes them immortal.

use std::time::Duration;

use etcd_client::{Client, EventType, LeaseGrantOptions, LeaseTimeToLiveOptions, PutOptions};
use mesh_tests::*;

fn grpc(e: etcd_client::Error) -> tonic::Status {
    match e {
        etcd_client::Error::GRpcStatus(s) => s,
        other => panic!("expected a gRPC status, got {other:?}"),
    }
}

async fn grant(c: &mut Client, ttl: i64) -> i64 {
    c.lease_grant(ttl, None).await.expect("grant").id()
}

async fn put_leased(c: &mut Client, key: &str, lease: i64) {
    c.put(key, "v", Some(PutOptions::new().with_lease(lease)))
        .await
        .expect("put with lease");
}

async fn exists(c: &mut Client, key: &str) -> bool {
    !c.get(key, None).await.expect("get").kvs().is_empty()
}

async fn wait_gone(c: &mut Client, key: &str, within: Duration) {
    let key = key.to_string();
    eventually(&format!("{key} to be deleted"), within, || {
        let mut c = c.clone();
        let key = key.clone();
        async move { (!exists(&mut c, &key).await).then_some(()) }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_grant_keep_alive_expiry_revoke_and_errors() {
    let c = InProcessCluster::start(3, ClusterOpts::default()).await;
    let leader = wait_for_leader(&c.live_addrs()).await;
    let li = c.index_of(leader);
    let fi = (li + 1) % 3;
    let mut l = etcd_client(c.addr(li)).await;
    let mut f = etcd_client(c.addr(fi)).await;

    // etcd's errors and answers for bad or unknown leases.
    let e = grpc(
        f.put("k", "v", Some(PutOptions::new().with_lease(0x1234)))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (e.code(), e.message()),
        (
            tonic::Code::NotFound,
            "etcdserver: requested lease not found"
        )
    );
    let chosen = f
        .lease_grant(60, Some(LeaseGrantOptions::new().with_id(0x77)))
        .await
        .unwrap();
    assert_eq!((chosen.id(), chosen.ttl()), (0x77, 60));
    let e = grpc(
        f.lease_grant(60, Some(LeaseGrantOptions::new().with_id(0x77)))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (e.code(), e.message()),
        (
            tonic::Code::FailedPrecondition,
            "etcdserver: lease already exists"
        )
    );
    let e = grpc(f.lease_grant(9_000_000_001, None).await.unwrap_err());
    assert_eq!(
        (e.code(), e.message()),
        (tonic::Code::OutOfRange, "etcdserver: too large lease TTL")
    );
    let e = grpc(f.lease_revoke(0x4321).await.unwrap_err());
    assert_eq!(e.message(), "etcdserver: requested lease not found");
    let unknown = f.lease_time_to_live(0x4321, None).await.unwrap();
    assert_eq!((unknown.ttl(), unknown.granted_ttl()), (-1, 0));
    // Keep-alive of an unknown lease answers TTL 0, which etcd-client reports so.
    for client in [&mut l, &mut f] {
        let e = client.lease_keep_alive(0x4321).await.unwrap_err();
        assert!(
            matches!(&e, etcd_client::Error::LeaseKeepAliveError(m) if m == "lease not found"),
            "{e:?}"
        );
    }

    // A session's first keep-alive follows its grant at once, both through a follower
    // (etcdctl lock and elect do this): the leader must find the lease even when the
    // follower applied the grant first.
    for _ in 0..20 {
        let id = grant(&mut f, 60).await;
        let (mut keeper, mut stream) = f.lease_keep_alive(id).await.unwrap();
        keeper.keep_alive().await.unwrap();
        let first = stream
            .message()
            .await
            .unwrap()
            .expect("a keep-alive answer");
        assert_eq!(
            (first.id(), first.ttl()),
            (id, 60),
            "keep-alive right after grant"
        );
        let ttl = f.lease_time_to_live(id, None).await.unwrap();
        assert_eq!(ttl.granted_ttl(), 60, "time-to-live right after grant");
        f.lease_revoke(id).await.unwrap();
    }

    // Three leases granted together with the same TTL: one left alone, one kept alive
    // through a follower (replicated keep-alives), one through the leader.
    let idle = grant(&mut f, 2).await;
    let via_follower = grant(&mut f, 2).await;
    let via_leader = grant(&mut l, 2).await;
    assert!(idle != via_follower && via_follower != via_leader && idle > 0);
    put_leased(&mut f, "exp/idle", idle).await;
    put_leased(&mut f, "exp/follower", via_follower).await;
    put_leased(&mut l, "exp/leader", via_leader).await;
    let k1 = keep_alive(f.clone(), via_follower, Duration::from_millis(300));
    let k2 = keep_alive(l.clone(), via_leader, Duration::from_millis(300));
    wait_gone(&mut f, "exp/idle", Duration::from_secs(15)).await;
    // More than the TTL has passed: only keep-alives explain these keys.
    assert!(exists(&mut f, "exp/follower").await);
    assert!(exists(&mut f, "exp/leader").await);
    let gone = f.lease_time_to_live(idle, None).await.unwrap();
    assert_eq!(gone.ttl(), -1, "an expired lease is gone");

    // Time-to-live asked of a follower is the leader's answer.
    let ttl = f
        .lease_time_to_live(via_leader, Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await
        .unwrap();
    assert_eq!(ttl.granted_ttl(), 2);
    assert!((1..=2).contains(&ttl.ttl()), "remaining {}", ttl.ttl());
    assert_eq!(ttl.keys(), [b"exp/leader".to_vec()]);
    let mut listed: Vec<i64> = f
        .leases()
        .await
        .unwrap()
        .leases()
        .iter()
        .map(|s| s.id())
        .collect();
    listed.sort_unstable();
    let mut expected = vec![0x77, via_follower, via_leader];
    expected.sort_unstable();
    assert_eq!(listed, expected);

    // A revoke deletes every attached key in one revision.
    let doomed = grant(&mut l, 60).await;
    for k in ["rev/a", "rev/b", "rev/c"] {
        put_leased(&mut l, k, doomed).await;
    }
    // From the revision after the puts: the follower may not have applied them yet.
    let after_puts = l
        .get("rev/c", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision()
        + 1;
    let mut watch = f
        .watch(
            "rev/",
            Some(
                etcd_client::WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(after_puts),
            ),
        )
        .await
        .unwrap();
    let revoked = f.lease_revoke(doomed).await.unwrap();
    let rev = revoked.header().unwrap().revision();
    let mut deletes = Vec::new();
    while deletes.len() < 3 {
        let resp = tokio::time::timeout(Duration::from_secs(10), watch.message())
            .await
            .expect("delete events in time")
            .unwrap()
            .unwrap();
        for ev in resp.events() {
            assert_eq!(ev.event_type(), EventType::Delete);
            deletes.push(ev.kv().unwrap().mod_revision());
        }
    }
    assert_eq!(deletes, vec![rev; 3], "one revision for all keys");

    // Once the keep-alives stop, the leases expire too.
    k1.abort();
    k2.abort();
    wait_gone(&mut f, "exp/follower", Duration::from_secs(15)).await;
    wait_gone(&mut f, "exp/leader", Duration::from_secs(15)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expiry_across_a_leader_change() {
    let mut c = InProcessCluster::start(3, ClusterOpts::default()).await;
    let old = wait_for_leader(&c.live_addrs()).await;
    let li = c.index_of(old);
    let fi = (li + 1) % 3;
    let mut l = etcd_client(c.addr(li)).await;
    let mut f = etcd_client(c.addr(fi)).await;

    // `held` is kept alive by the leader alone: those keep-alives are answered from
    // the leader's memory and never replicated, so the followers' deadlines for it
    // go stale. `steady` is kept alive through a follower that survives.
    let held = grant(&mut l, 3).await;
    let control = grant(&mut l, 3).await;
    let steady = grant(&mut f, 3).await;
    put_leased(&mut l, "fo/held", held).await;
    put_leased(&mut l, "fo/control", control).await;
    put_leased(&mut f, "fo/steady", steady).await;
    let keeper_held = keep_alive(l.clone(), held, Duration::from_millis(300));
    let keeper_steady = keep_alive(f.clone(), steady, Duration::from_millis(300));
    // When `control` (same TTL, same moment) has expired, `held` has outlived its
    // first deadline on every follower.
    wait_gone(&mut f, "fo/control", Duration::from_secs(15)).await;
    assert!(exists(&mut f, "fo/held").await);

    c.stop(li).await;
    keeper_held.abort();
    let live = c.live_addrs();
    wait_for_leader_other_than(&live, old).await;

    // No early mass expiry: the new leader gives every lease a full TTL from its
    // promotion. A marker granted now with the minimum TTL expires first.
    let marker = grant(&mut f, 1).await;
    put_leased(&mut f, "fo/marker", marker).await;
    wait_gone(&mut f, "fo/marker", Duration::from_secs(15)).await;
    assert!(
        exists(&mut f, "fo/held").await,
        "a lease kept alive until the failover must not expire right after it"
    );
    // No immortal lease: with no keep-alives, it expires after the failover.
    wait_gone(&mut f, "fo/held", Duration::from_secs(20)).await;
    // Keep-alives sent to a surviving member kept working throughout.
    assert!(exists(&mut f, "fo/steady").await);
    keeper_steady.abort();
    wait_gone(&mut f, "fo/steady", Duration::from_secs(20)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_travel_in_snapshots_and_survive_restarts() {
    let opts = ClusterOpts {
        snapshot_count: 20,
        catch_up_entries: 5,
        ..Default::default()
    };
    let mut c = InProcessCluster::start(3, opts).await;
    let leader = wait_for_leader(&c.live_addrs()).await;
    let lagging = (c.index_of(leader) + 1) % 3;
    c.stop(lagging).await;
    let live = c.live_addrs();
    let mut a = etcd_client(live[0]).await;

    // While one member is down: a lease with keys, then enough writes that the log is
    // compacted past them and the member must catch up from a snapshot.
    let lease = grant(&mut a, 60).await;
    for k in ["snap/a", "snap/b", "snap/c"] {
        put_leased(&mut a, k, lease).await;
    }
    for i in 0..60 {
        a.put(format!("filler/{i}"), "x", None).await.unwrap();
    }
    c.restart(lagging).await;
    let mut b = etcd_client(c.addr(lagging)).await;
    let serializable = || {
        etcd_client::GetOptions::new()
            .with_prefix()
            .with_serializable()
    };
    eventually(
        "the restarted member to catch up",
        Duration::from_secs(30),
        || {
            let mut b = b.clone();
            async move {
                let r = b.get("filler/59", Some(serializable())).await.ok()?;
                (!r.kvs().is_empty()).then_some(())
            }
        },
    )
    .await;
    let listed: Vec<i64> = b
        .leases()
        .await
        .unwrap()
        .leases()
        .iter()
        .map(|l| l.id())
        .collect();
    assert_eq!(listed, vec![lease]);
    // Its copy of the key attachments came with the snapshot: applying the revoke
    // deletes the keys in its own replica too.
    b.lease_revoke(lease).await.unwrap();
    eventually(
        "the revoke applied on the restarted member",
        Duration::from_secs(10),
        || {
            let mut b = b.clone();
            async move {
                let r = b.get("snap/", Some(serializable())).await.ok()?;
                r.kvs().is_empty().then_some(())
            }
        },
    )
    .await;

    // Leases are durable: after a restart of every member, a long one is still there
    // with its keys and a short one still expires.
    let long = grant(&mut b, 60).await;
    let short = grant(&mut b, 2).await;
    put_leased(&mut b, "dur/long", long).await;
    put_leased(&mut b, "dur/short", short).await;
    for i in 0..3 {
        c.stop(i).await;
    }
    for i in 0..3 {
        c.restart(i).await;
    }
    wait_for_leader(&c.live_addrs()).await;
    let mut d = etcd_client(c.addr(0)).await;
    wait_gone(&mut d, "dur/short", Duration::from_secs(20)).await;
    let ttl = d
        .lease_time_to_live(long, Some(LeaseTimeToLiveOptions::new().with_keys()))
        .await
        .unwrap();
    assert_eq!(ttl.granted_ttl(), 60);
    assert_eq!(ttl.keys(), [b"dur/long".to_vec()]);
}
