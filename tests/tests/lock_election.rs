//! The Lock and Election services through the independent `etcd-client` crate on a
//! three-member cluster: lock holders never overlap, even across a leader failure,
//! and election observers see every leader change in order.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, LockOptions, ProclaimOptions, ResignOptions};
use mesh_tests::*;

/// What the contenders share: the live endpoints and the log of critical sections.
#[derive(Default)]
struct Shared {
    live: Vec<SocketAddr>,
    /// How many tasks are inside their critical section now.
    inside: usize,
    /// (task, round) in the order the critical sections ran.
    log: Vec<(usize, usize)>,
    overlaps: usize,
}

/// Takes the lock `rounds` times; retries on any error through another member.
async fn contender(shared: Arc<Mutex<Shared>>, task: usize, rounds: usize) {
    let mut attempt = 0;
    let mut round = 0;
    while round < rounds {
        attempt += 1;
        let addr = {
            let s = shared.lock().unwrap();
            s.live[(task + attempt) % s.live.len()]
        };
        let mut c = etcd_client(addr).await;
        let Ok(lease) = c.lease_grant(3, None).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        // A session, as etcd's clientv3 concurrency keeps one: the lease lives as long
        // as the contender does.
        let session = keep_alive(c.clone(), lease.id(), Duration::from_millis(500));
        let lock = c
            .lock("contended", Some(LockOptions::new().with_lease(lease.id())))
            .await;
        let Ok(lock) = lock else {
            // The key (if created) goes with the lease.
            session.abort();
            let _ = c.lease_revoke(lease.id()).await;
            continue;
        };
        {
            let mut s = shared.lock().unwrap();
            s.inside += 1;
            if s.inside > 1 {
                s.overlaps += 1;
            }
            s.log.push((task, round));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        shared.lock().unwrap().inside -= 1;
        round += 1;
        // If the unlock fails (member stopped), the revoke or else the lease's expiry
        // releases the lock.
        let _ = c.unlock(lock.key()).await;
        session.abort();
        let _ = c.lease_revoke(lease.id()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_holders_never_overlap_across_a_leader_failure() {
    const TASKS: usize = 8;
    const ROUNDS: usize = 3;
    let mut c = InProcessCluster::start(3, ClusterOpts::default()).await;
    let leader = wait_for_leader(&c.live_addrs()).await;
    let shared = Arc::new(Mutex::new(Shared {
        live: c.live_addrs(),
        ..Default::default()
    }));
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| tokio::spawn(contender(shared.clone(), t, ROUNDS)))
        .collect();

    // Kill the leader once a third of the work is done.
    eventually(
        "a third of the critical sections",
        Duration::from_secs(60),
        || {
            let done = shared.lock().unwrap().log.len();
            async move { (done >= TASKS * ROUNDS / 3).then_some(()) }
        },
    )
    .await;
    let li = c.index_of(leader);
    shared.lock().unwrap().live.retain(|a| *a != c.addr(li));
    c.stop(li).await;

    for t in tasks {
        tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .expect("every contender finishes")
            .unwrap();
    }
    let s = shared.lock().unwrap();
    assert_eq!(s.overlaps, 0, "two holders at once: {:?}", s.log);
    assert_eq!(s.log.len(), TASKS * ROUNDS);
}

/// A campaign that is expected to block until `Resign` of the ones before it.
fn campaign(
    mut c: Client,
    lease: i64,
    value: &'static str,
) -> tokio::task::JoinHandle<etcd_client::LeaderKey> {
    tokio::spawn(async move {
        let mut r = c.campaign("elect", value, lease).await.expect("campaign");
        r.take_leader().expect("leader key")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn election_observers_see_every_leader_change_in_order() {
    let c = InProcessCluster::start(3, ClusterOpts::default()).await;
    wait_for_leader(&c.live_addrs()).await;
    let mut a = etcd_client(c.addr(0)).await;
    let mut b = etcd_client(c.addr(1)).await;
    let mut obs = etcd_client(c.addr(2)).await;

    let e = obs.leader("elect").await.unwrap_err();
    assert!(e.to_string().contains("election: no leader"), "{e}");

    let la = a.lease_grant(30, None).await.unwrap().id();
    let lb = b.lease_grant(30, None).await.unwrap().id();
    let lc = obs.lease_grant(30, None).await.unwrap().id();
    let first = campaign(a.clone(), la, "a1").await.unwrap();
    assert_eq!(first.key(), format!("elect/{la:x}").as_bytes());

    let mut stream = obs.observe("elect").await.unwrap();
    // b then c line up behind a (b's key is created first).
    let second = campaign(b.clone(), lb, "b1");
    eventually("b's key", Duration::from_secs(10), || {
        let mut a = a.clone();
        async move {
            let r = a.get(format!("elect/{lb:x}"), None).await.ok()?;
            (!r.kvs().is_empty()).then_some(())
        }
    })
    .await;
    let third = campaign(obs.clone(), lc, "c1");

    a.proclaim(
        "a2",
        Some(ProclaimOptions::new().with_leader(first.clone())),
    )
    .await
    .unwrap();
    assert_eq!(
        b.leader("elect").await.unwrap().kv().unwrap().value(),
        b"a2"
    );
    a.resign(Some(ResignOptions::new().with_leader(first.clone())))
        .await
        .unwrap();
    let second = second.await.unwrap();
    // The resigned leader may not proclaim any more.
    let e = a
        .proclaim("a3", Some(ProclaimOptions::new().with_leader(first)))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("election: not leader"), "{e}");
    b.proclaim(
        "b2",
        Some(ProclaimOptions::new().with_leader(second.clone())),
    )
    .await
    .unwrap();
    b.resign(Some(ResignOptions::new().with_leader(second)))
        .await
        .unwrap();
    let third = third.await.unwrap();
    obs.proclaim("c2", Some(ProclaimOptions::new().with_leader(third)))
        .await
        .unwrap();

    let mut seen = Vec::new();
    while seen.len() < 6 {
        let r = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("observe in time")
            .unwrap()
            .expect("stream open");
        seen.push(String::from_utf8(r.kv().unwrap().value().to_vec()).unwrap());
    }
    assert_eq!(seen, ["a1", "a2", "b1", "b2", "c1", "c2"]);
}
