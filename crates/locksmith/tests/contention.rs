//! End-to-end safety under contention and failure: 20 `locksmith run` processes cycle
//! through a semaphore of max 2 on a 3-member meshd cluster whose leader is SIGKILLed
//! and restarted mid-way. Every stored revision of the key is then checked: never more
//! than 2 holders, always consistent; and every contender finished successfully.
mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use mesh_tests::eventually;

const CONTENDERS: usize = 20;
const CYCLES: usize = 2;
const MAX: usize = 2;

/// The key's value at revision `rev` (0 = now) with its mod and create revisions.
async fn version_at(addrs: &[SocketAddr], rev: i64) -> Option<(String, i64, i64)> {
    eventually("a versioned read", Duration::from_secs(30), || async {
        for a in addrs {
            let mut c = mesh_tests::etcd_client(*a).await;
            let opts = etcd_client::GetOptions::new().with_revision(rev);
            if let Ok(r) = c.get(KEY, Some(opts)).await {
                return Some(r.kvs().first().map(|kv| {
                    (
                        kv.value_str().unwrap().to_string(),
                        kv.mod_revision(),
                        kv.create_revision(),
                    )
                }));
            }
        }
        None
    })
    .await
}

async fn version_count(addrs: &[SocketAddr]) -> i64 {
    eventually("the key's version", Duration::from_secs(30), || async {
        for a in addrs {
            let mut c = mesh_tests::etcd_client(*a).await;
            if let Ok(r) = c.get(KEY, None).await {
                return Some(r.kvs().first().map_or(0, |kv| kv.version()));
            }
        }
        None
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locksmith_never_exceeds_max_holders_while_the_leader_is_killed() {
    let mut c = cluster(3).await;
    let a = c.addrs();
    let o = locksmith(&a, &["set-max", &MAX.to_string()]).await;
    assert!(o.status.success());

    let mut contenders = Vec::new();
    for n in 0..CONTENDERS {
        let a = a.clone();
        contenders.push(tokio::spawn(async move {
            for cycle in 0..CYCLES {
                let out = command(&a)
                    .args([
                        "run",
                        "--id",
                        &format!("c{n}"),
                        "--",
                        "sh",
                        "-c",
                        "sleep 0.1",
                    ])
                    .output()
                    .await
                    .expect("spawn locksmith");
                assert!(
                    out.status.success(),
                    "contender c{n} cycle {cycle}: {:?}\n{}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }));
    }

    // Mid-way (a quarter of the lock/unlock writes done), kill the leader.
    let total_writes = (CONTENDERS * CYCLES * 2) as i64;
    eventually(
        "contenders make progress",
        Duration::from_secs(60),
        || async { (version_count(&a).await >= total_writes / 4).then_some(()) },
    )
    .await;
    let (idx, leader) = kill_leader(&mut c).await;
    let running = contenders.iter().filter(|t| !t.is_finished()).count();
    assert!(
        running > 0,
        "the leader was killed while contenders were still cycling"
    );
    eprintln!("killed the leader (member {idx}) with {running} contenders still running");
    restart_after_failover(&mut c, idx, leader).await;

    for (n, t) in contenders.into_iter().enumerate() {
        tokio::time::timeout(Duration::from_secs(180), t)
            .await
            .unwrap_or_else(|_| panic!("contender c{n} did not finish"))
            .unwrap();
    }
    mesh_tests::wait_for_leader(&a).await;

    // Walk every stored version of the key, newest to oldest.
    let (mut value, mut mod_rev, create_rev) = version_at(&a, 0).await.expect("key exists");
    assert_eq!(value, r#"{"semaphore":2,"max":2,"holders":[]}"#);
    let mut versions = 0;
    let mut acquisitions = 0;
    let mut newer_holders: Vec<String> = Vec::new();
    loop {
        let v: serde_json::Value = serde_json::from_str(&value).unwrap();
        let holders: Vec<String> = v["holders"]
            .as_array()
            .map(|h| h.iter().map(|x| x.as_str().unwrap().to_string()).collect())
            .unwrap_or_default();
        let max = v["max"].as_i64().unwrap();
        assert!(holders.len() <= MAX, "revision {mod_rev}: {value}");
        assert_eq!(
            v["semaphore"].as_i64().unwrap(),
            max - holders.len() as i64,
            "revision {mod_rev}: {value}"
        );
        // Holders that appear in the next (newer) version were acquired in it.
        acquisitions += newer_holders
            .iter()
            .filter(|h| !holders.contains(h))
            .count();
        newer_holders = holders;
        versions += 1;
        if mod_rev == create_rev {
            break;
        }
        (value, mod_rev, _) = version_at(&a, mod_rev - 1).await.expect("older version");
    }
    acquisitions += newer_holders.len();
    assert_eq!(
        versions,
        version_count(&a).await,
        "every version was visited"
    );
    assert_eq!(
        acquisitions,
        CONTENDERS * CYCLES,
        "every run took the lock exactly once"
    );
}
