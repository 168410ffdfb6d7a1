//! Scenarios written once against the `Cluster` trait and run on each kind of cluster:
//! members in this process and members as spawned `meshd` processes (the chaos runner
//! drives the same trait with its seeded faults).

use std::net::SocketAddr;
use std::time::Duration;

use mesh_tests::{
    etcd_client, eventually, put_retrying, Cluster, ClusterOpts, InProcessCluster, ProcessCluster,
};

const DEADLINE: Duration = Duration::from_secs(30);

/// A serializable read of `key` on the member at `addr` (its own applied state).
async fn local_value(addr: SocketAddr, key: &str) -> Option<Vec<u8>> {
    let mut c = etcd_client(addr).await;
    let opts = etcd_client::GetOptions::new().with_serializable();
    let r = c.get(key, Some(opts)).await.ok()?;
    Some(
        r.kvs()
            .first()
            .map(|kv| kv.value().to_vec())
            .unwrap_or_default(),
    )
}

async fn wait_local_value(addr: SocketAddr, key: &str, value: &str) {
    eventually(&format!("{key} applied on {addr}"), DEADLINE, || async {
        (local_value(addr, key).await? == value.as_bytes()).then_some(())
    })
    .await
}

/// The leader is killed and a member is cut off: writes go on through a quorum, and
/// each member catches up once it is back.
async fn leader_loss_and_a_partition<C: Cluster>(c: &mut C) {
    let old = c.wait_leader(DEADLINE).await;
    put_retrying(&c.endpoints(), "before", "1").await;

    c.kill(old).await;
    let new = c.wait_leader(DEADLINE).await;
    assert_ne!(new, old, "a running member leads");
    put_retrying(&c.endpoints(), "during", "2").await;
    c.restart(old).await;
    wait_local_value(c.endpoint(old), "during", "2").await;

    let leader = c.wait_leader(DEADLINE).await;
    let cut = (leader + 1) % c.size();
    c.partition(cut).await;
    let others: Vec<SocketAddr> = (0..c.size())
        .filter(|i| *i != cut)
        .map(|i| c.endpoint(i))
        .collect();
    put_retrying(&others, "cut-off", "3").await;
    assert_eq!(
        local_value(c.endpoint(cut), "cut-off").await,
        Some(Vec::new()),
        "the cut-off member cannot have the write"
    );
    c.heal().await;
    wait_local_value(c.endpoint(cut), "cut-off", "3").await;
}

fn opts() -> ClusterOpts {
    ClusterOpts {
        fault_injection: true,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_loss_and_a_partition_in_process() {
    let mut c = InProcessCluster::start(3, opts()).await;
    leader_loss_and_a_partition(&mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_loss_and_a_partition_as_processes() {
    let mut c = ProcessCluster::start(3, opts());
    leader_loss_and_a_partition(&mut c).await;
}
