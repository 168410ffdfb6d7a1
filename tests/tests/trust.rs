//! The trust boundary, end to end: a member whose Raft driver panics ends (so its
//! service manager restarts it) and rejoins; a member whose stored record fails its
//! checksum (while applying, found by the periodic HashKV comparison, or on disk at
//! start) stops applying and serving, the cluster raises CORRUPT naming it, and the
//! others keep serving.

use std::time::Duration;

use mesh_core::proto::meshpb::{
    fault_injection_client::FaultInjectionClient, CorruptRecordRequest, PanicDriverRequest,
};
use mesh_tests::*;

/// A three-member process cluster on loopback with the test-only fault service and
/// the corruption check every `check` ("0s": off).
fn cluster_with_faults(check: &'static str) -> ProcessCluster {
    ProcessCluster::start_with(3, ClusterOpts::default(), move |_, mesh| {
        let initial = (0..mesh.len())
            .map(|i| format!("p{i}={}", mesh[i]))
            .collect::<Vec<_>>()
            .join(",");
        vec![
            format!("--initial-cluster={initial}"),
            "--unsafe-fault-injection".into(),
            format!("--corrupt-check-time={check}"),
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
    let mut c = cluster_with_faults("0s");
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

async fn faults(addr: std::net::SocketAddr) -> FaultInjectionClient<tonic::transport::Channel> {
    FaultInjectionClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

/// Waits until every member holds `key` = `value` in its own state.
async fn everywhere(addrs: &[std::net::SocketAddr], key: &str, value: &str) {
    for a in addrs {
        eventually(
            &format!("{key} on {a}"),
            Duration::from_secs(30),
            || async { (local_value(*a, key).await.as_deref() == Some(value)).then_some(()) },
        )
        .await;
    }
}

/// Member ID of the member at `addr`.
async fn member_id(addr: std::net::SocketAddr) -> u64 {
    eventually("status", Duration::from_secs(30), || status(addr))
        .await
        .header()
        .unwrap()
        .member_id()
}

/// Waits until the cluster (asked through `addr`) has a CORRUPT alarm naming `member`.
async fn corrupt_alarm_names(addr: std::net::SocketAddr, member: u64) {
    use etcd_client::{AlarmAction, AlarmType};
    eventually(
        "a CORRUPT alarm naming the member",
        Duration::from_secs(60),
        || async {
            let mut c = etcd_client(addr).await;
            let alarms = c
                .alarm(AlarmAction::Get, AlarmType::None, None)
                .await
                .ok()?;
            alarms
                .alarms()
                .iter()
                .any(|a| a.member_id() == member && a.alarm() == AlarmType::Corrupt)
                .then_some(())
        },
    )
    .await;
}

/// The corrupt member refuses every data read with etcd's corruption error.
async fn refuses_data(addr: std::net::SocketAddr, key: &str) {
    let mut c = etcd_client(addr).await;
    let opts = etcd_client::GetOptions::new().with_serializable();
    match c.get(key, Some(opts)).await {
        Err(etcd_client::Error::GRpcStatus(s)) => {
            assert_eq!(s.code(), tonic::Code::DataLoss, "{s:?}");
            assert_eq!(s.message(), "etcdserver: corrupt cluster");
        }
        other => panic!("the corrupt member served {key}: {other:?}"),
    }
}

/// A follower: its index, its member ID and the other members' addresses.
async fn pick_follower(addrs: &[std::net::SocketAddr]) -> (usize, u64, Vec<std::net::SocketAddr>) {
    let leader = wait_for_leader(addrs).await;
    let mut ids = Vec::new();
    for a in addrs {
        ids.push(member_id(*a).await);
    }
    let victim = ids.iter().position(|id| *id != leader).unwrap();
    let healthy = (0..addrs.len())
        .filter(|i| *i != victim)
        .map(|i| addrs[i])
        .collect();
    (victim, ids[victim], healthy)
}

/// Alters the stored record of `key` on a follower (see [`pick_follower`]).
async fn corrupt_a_follower(
    addrs: &[std::net::SocketAddr],
    key: &str,
) -> (usize, u64, Vec<std::net::SocketAddr>) {
    let picked = pick_follower(addrs).await;
    faults(addrs[picked.0])
        .await
        .corrupt_record(CorruptRecordRequest {
            key: key.as_bytes().to_vec(),
        })
        .await
        .unwrap();
    picked
}

/// The cluster (asked through a healthy member) names the victim in a CORRUPT alarm,
/// the victim refuses to serve `key`, and the healthy members keep serving writes.
async fn quarantined(
    addrs: &[std::net::SocketAddr],
    (victim, victim_id, healthy): &(usize, u64, Vec<std::net::SocketAddr>),
    key: &str,
) {
    corrupt_alarm_names(healthy[0], *victim_id).await;
    refuses_data(addrs[*victim], key).await;
    put_retrying(healthy, "after", "1").await;
    everywhere(healthy, "after", "1").await;
}

/// A follower whose record fails its checksum while it applies a write (the put asks
/// for the previous value) stops applying instead of skipping the entry, and raises
/// CORRUPT naming itself; it serves no data; the two others keep serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checksum_failure_while_applying_stops_that_member_and_raises_corrupt() {
    let c = cluster_with_faults("0s");
    let addrs = c.addrs();
    wait_for_leader(&addrs).await;
    put_retrying(&addrs, "k", "v1").await;
    everywhere(&addrs, "k", "v1").await;
    let picked = corrupt_a_follower(&addrs, "k").await;
    let (victim, _, healthy) = &picked;

    let mut client = etcd_client(healthy[0]).await;
    let put = client
        .put(
            "k",
            "v2",
            Some(etcd_client::PutOptions::new().with_prev_key()),
        )
        .await
        .unwrap();
    assert_eq!(put.prev_key().unwrap().value(), b"v1");
    quarantined(&addrs, &picked, "k").await;
    refuses_data(addrs[*victim], "anything").await;
    let st = status(addrs[*victim])
        .await
        .expect("Maintenance still answers");
    assert!(
        st.errors().iter().any(|e| e.contains("corrupt")),
        "{:?}",
        st.errors()
    );
    assert!(
        c.log(*victim).contains("stops applying"),
        "{}",
        c.log(*victim)
    );
}

/// A record altered on a follower that nobody reads is found by the leader's periodic
/// HashKV comparison: CORRUPT names the member, which then serves no data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_periodic_hash_check_finds_an_altered_record_nobody_read() {
    let c = cluster_with_faults("1s");
    let addrs = c.addrs();
    wait_for_leader(&addrs).await;
    put_retrying(&addrs, "quiet", "v").await;
    put_retrying(&addrs, "other", "w").await;
    everywhere(&addrs, "other", "w").await;
    let picked = corrupt_a_follower(&addrs, "quiet").await;
    quarantined(&addrs, &picked, "other").await;
}

/// A record altered on disk while a follower was down: the member starts anyway,
/// quarantined (it builds no key index from corrupt data and applies nothing), raises
/// CORRUPT naming itself and serves no data; the two others keep serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_corrupted_at_rest_quarantines_its_member_at_start() {
    let mut c = cluster_with_faults("0s");
    let addrs = c.addrs();
    wait_for_leader(&addrs).await;
    put_retrying(&addrs, "k", "v").await;
    everywhere(&addrs, "k", "v").await;
    let picked = pick_follower(&addrs).await;
    let victim = picked.0;
    assert!(c.procs[victim].terminate().unwrap().success());
    // The store's own test-only fault alters the record on disk, as a disk would.
    let dir = c.dir.path().join(&c.procs[victim].name);
    {
        let db = mesh_core::storage::open_database(&dir).unwrap();
        let kv = mesh_core::kv::KvStore::open(db).unwrap();
        let found = kv
            .range(&mesh_core::proto::etcdserverpb::RangeRequest {
                key: b"k".to_vec(),
                ..Default::default()
            })
            .unwrap();
        kv.inject_corruption(found.kvs[0].mod_revision).unwrap();
    }
    c.restart(victim);
    quarantined(&addrs, &picked, "k").await;
    assert!(
        c.log(victim).contains("stops applying"),
        "{}",
        c.log(victim)
    );
}
