//! The trust boundary, end to end: a member whose Raft driver panics ends (so its
//! service manager restarts it) and rejoins; peers that lie about who they are, or
//! about the cluster's leader, change nothing.

use std::time::Duration;

use mesh_core::proto::meshpb::{fault_injection_client::FaultInjectionClient, PanicDriverRequest};
use mesh_tests::*;

/// A three-member process cluster on loopback with the test-only fault service.
fn cluster_with_faults() -> ProcessCluster {
    ProcessCluster::start_with(3, ClusterOpts::default(), |_, mesh| {
        let initial = (0..mesh.len())
            .map(|i| format!("p{i}={}", mesh[i]))
            .collect::<Vec<_>>()
            .join(",");
        vec![
            format!("--initial-cluster={initial}"),
            "--unsafe-fault-injection".into(),
        ]
    })
}

/// Serializable get of `key` on one member: its own state, no Raft round.
async fn local_value(addr: std::net::SocketAddr, key: &str) -> Option<String> {
    let mut c = etcd_client(addr).await;
    let opts = etcd_client::GetOptions::new().with_serializable();
    let r = c.get(key, Some(opts)).await.ok()?;
    r.kvs()
        .first()
        .map(|kv| kv.value_str().unwrap().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_raft_driver_ends_the_process_and_a_restart_rejoins() {
    let mut c = cluster_with_faults();
    let addrs = c.addrs();
    wait_for_leader(&addrs).await;
    put_retrying(&addrs, "before", "1").await;

    let mut faults = FaultInjectionClient::connect(format!("http://{}", addrs[1]))
        .await
        .unwrap();
    faults.panic_driver(PanicDriverRequest {}).await.unwrap();
    let status = eventually("the panicked member exits", Duration::from_secs(30), || {
        let exited = c.procs[1].child.as_mut().unwrap().try_wait().unwrap();
        async move { exited }
    })
    .await;
    assert!(!status.success(), "exit status {status:?}");
    let log = c.log(1);
    assert!(
        log.contains("injected fault: the Raft driver panics") && log.contains("aborting"),
        "{log}"
    );
    c.procs[1].child = None;

    // The others keep serving; the restarted member catches up with what it missed.
    let others = [addrs[0], addrs[2]];
    put_retrying(&others, "during", "2").await;
    c.restart(1);
    eventually(
        "the restarted member has the write it missed",
        Duration::from_secs(30),
        || local_value(addrs[1], "during"),
    )
    .await;
    assert_eq!(local_value(addrs[1], "before").await.as_deref(), Some("1"));
    wait_for_leader(&addrs).await;
}
