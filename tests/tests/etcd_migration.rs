//! Moving between etcd and meshd, with etcd's own tools on both sides:
//! - a snapshot saved from etcd 3.4.23 or 3.5.1 becomes a meshd member with one
//!   `meshctl snapshot restore`: same keys, revisions, compaction, leases, users;
//! - a snapshot saved from meshd passes `etcdctl snapshot status` (3.4 and 3.5) and
//!   `etcdutl snapshot status`, and `etcdutl snapshot restore` gives an etcd 3.5.1
//!   that serves the same keys and revisions;
//! - `etcdctl make-mirror` copies a live etcd into meshd.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions, PutOptions};
use mesh_tests::*;

/// What a reader sees of a keyspace: header revision and every key with its metadata.
async fn keyspace(c: &mut Client) -> (i64, Vec<(String, String, i64, i64, i64, i64)>) {
    let r = c
        .get("", Some(GetOptions::new().with_all_keys()))
        .await
        .unwrap();
    let kvs = r
        .kvs()
        .iter()
        .map(|kv| {
            (
                kv.key_str().unwrap().to_string(),
                kv.value_str().unwrap().to_string(),
                kv.create_revision(),
                kv.mod_revision(),
                kv.version(),
                kv.lease(),
            )
        })
        .collect();
    (r.header().unwrap().revision(), kvs)
}

/// Writes a small history: overwrites, a deletion, a compaction, a leased key, a user
/// with the root role, and turns auth on if `auth`. Returns the lease ID.
async fn populate(c: &mut Client, auth: bool) -> i64 {
    c.put("a", "1", None).await.unwrap();
    c.put("a", "2", None).await.unwrap();
    c.put("b", "x", None).await.unwrap();
    c.delete("b", None).await.unwrap();
    let lease = c.lease_grant(600, None).await.unwrap().id();
    c.put("leased", "v", Some(PutOptions::new().with_lease(lease)))
        .await
        .unwrap();
    c.compact(3, None).await.unwrap();
    c.put("c", "3", None).await.unwrap();
    c.user_add("root", "rootpw", None).await.unwrap();
    c.user_grant_role("root", "root").await.unwrap();
    if auth {
        c.auth_enable().await.unwrap();
    }
    lease
}

/// What [`populate`] left, as a restored member must serve it: the compaction at 3,
/// the history above it (`b` put at revision 4, deleted at 5), and `lease`, alone, with
/// its granted TTL.
async fn restored_as_populated(c: &mut Client, lease: i64) {
    let err = c
        .get("a", Some(GetOptions::new().with_revision(2)))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("compacted"), "{err}");
    let at = |rev| Some(GetOptions::new().with_revision(rev));
    let r = c.get("b", at(4)).await.unwrap();
    assert_eq!(r.kvs()[0].value_str().unwrap(), "x");
    assert!(c.get("b", at(5)).await.unwrap().kvs().is_empty());
    let r = c.get("a", at(3)).await.unwrap();
    assert_eq!(r.kvs()[0].value_str().unwrap(), "2");
    let ttl = c.lease_time_to_live(lease, None).await.unwrap();
    assert_eq!(ttl.granted_ttl(), 600);
    let leases = c.leases().await.unwrap();
    assert_eq!(
        leases.leases().iter().map(|l| l.id()).collect::<Vec<_>>(),
        [lease]
    );
}

async fn as_root(addr: SocketAddr) -> Client {
    Client::connect(
        [addr.to_string()],
        Some(ConnectOptions::new().with_user("root", "rootpw")),
    )
    .await
    .unwrap()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn etcdctl(bin: &Path, endpoint: SocketAddr) -> Command {
    let mut c = Command::new(bin);
    c.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .arg("--user=root:rootpw");
    c
}

/// A meshd process on a data dir `meshctl snapshot restore` made.
fn start_meshd(data_dir: &Path, dir: &Path) -> Process {
    let client = free_addr();
    let mut p = Process {
        name: "restored".into(),
        client,
        metrics: free_addr(),
        args: vec![
            "--name=restored".into(),
            format!("--data-dir={}", data_dir.display()),
            format!("--listen-client={client}"),
            format!("--listen-mesh={}", free_addr()),
            "--tick=25ms".into(),
        ],
        child: None,
        log: dir.join("meshd.log"),
    };
    p.spawn();
    p
}

async fn etcd_snapshot_restores_into_meshd(etcd_bin: PathBuf, etcdctl_bin: PathBuf) {
    let etcd = RealEtcd::start(&etcd_bin).await;
    let mut src = etcd_client(etcd.client).await;
    let lease = populate(&mut src, true).await;
    let mut src = as_root(etcd.client).await;
    let want = keyspace(&mut src).await;

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("etcd.db");
    run(etcdctl(&etcdctl_bin, etcd.client)
        .arg("snapshot")
        .arg("save")
        .arg(&file));
    drop(etcd);
    let data = dir.path().join("restored");
    run(Command::new(binary("meshctl"))
        .args(["snapshot", "restore", "--name=restored"])
        .arg(format!("--data-dir={}", data.display()))
        .arg(&file));
    let meshd = start_meshd(&data, dir.path());
    let addr = meshd.client;
    eventually(
        "restored meshd to serve",
        Duration::from_secs(30),
        || async { status(addr).await },
    )
    .await;
    // The user and its password (etcd's bcrypt hash) came along; so did auth.
    let mut c = as_root(addr).await;
    assert_eq!(keyspace(&mut c).await, want);
    restored_as_populated(&mut c, lease).await;
    let wrong = Client::connect(
        [addr.to_string()],
        Some(ConnectOptions::new().with_user("root", "wrong")),
    )
    .await;
    assert!(wrong.is_err(), "a wrong password is refused");
    // Writes go on from etcd's revision.
    let put = c.put("after", "restore", None).await.unwrap();
    assert_eq!(put.header().unwrap().revision(), want.0 + 1);
}

#[tokio::test]
async fn a_snapshot_from_etcd_3_4_becomes_a_meshd_member() {
    etcd_snapshot_restores_into_meshd("etcd".into(), "etcdctl".into()).await;
}

#[tokio::test]
async fn a_snapshot_from_etcd_3_5_becomes_a_meshd_member() {
    let d = etcd_351_dir();
    etcd_snapshot_restores_into_meshd(d.join("etcd"), d.join("etcdctl")).await;
}

// In-process meshd and blocking etcd tools: the tools must not stall the runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meshd_snapshot_is_an_etcd_snapshot() {
    let c = InProcessCluster::start(1, ClusterOpts::default()).await;
    let addr = c.addr(0);
    wait_for_leader(&[addr]).await;
    let mut client = etcd_client(addr).await;
    // Auth stays off: etcd cannot verify meshd's Argon2id password hashes.
    let lease = populate(&mut client, false).await;
    let want = keyspace(&mut client).await;

    let d = etcd_351_dir();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("meshd.db");
    run(Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={addr}"))
        .arg("snapshot")
        .arg("save")
        .arg(&file));
    // etcd's three readers agree on the revision.
    let status34 = run(Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["snapshot", "status", "-w", "json"])
        .arg(&file));
    let status35 = run(Command::new(d.join("etcdutl"))
        .args(["snapshot", "status", "-w", "json"])
        .arg(&file));
    for s in [&status34, &status35] {
        let v: serde_json::Value = serde_json::from_str(s.trim()).unwrap();
        assert_eq!(v["revision"], want.0, "{s}");
    }
    run(Command::new(d.join("etcdctl"))
        .args(["snapshot", "status"])
        .arg(&file));
    // meshctl saves the same format.
    let saved = dir.path().join("meshctl.db");
    run(Command::new(binary("meshctl"))
        .arg(format!("--endpoints={addr}"))
        .args(["snapshot", "save"])
        .arg(&saved));
    let status = run(Command::new(d.join("etcdutl"))
        .args(["snapshot", "status", "-w", "json"])
        .arg(&saved));
    let v: serde_json::Value = serde_json::from_str(status.trim()).unwrap();
    assert_eq!(v["revision"], want.0, "{status}");

    // etcdutl restores it; etcd 3.5.1 serves the same keyspace.
    let etcd_dir = tempfile::tempdir().unwrap();
    let peer = free_addr();
    run(Command::new(d.join("etcdutl"))
        .args(["snapshot", "restore", "--name=e"])
        .arg(format!(
            "--data-dir={}",
            etcd_dir.path().join("data").display()
        ))
        .arg(format!("--initial-cluster=e=http://{peer}"))
        .arg(format!("--initial-advertise-peer-urls=http://{peer}"))
        .arg(&file));
    let etcd = RealEtcd::start_in(&d.join("etcd"), etcd_dir, "e").await;
    let mut e = etcd_client(etcd.client).await;
    let users = e.user_list().await.unwrap();
    assert_eq!(users.users(), ["root"]);
    let (_, kvs) = keyspace(&mut e).await;
    assert_eq!(kvs, want.1, "{}", etcd.log());
    restored_as_populated(&mut e, lease).await;
}

#[tokio::test]
async fn make_mirror_copies_a_live_etcd_into_meshd() {
    let etcd = RealEtcd::start(Path::new("etcd")).await;
    let c = InProcessCluster::start(1, ClusterOpts::default()).await;
    let addr = c.addr(0);
    wait_for_leader(&[addr]).await;
    let mut src = etcd_client(etcd.client).await;
    src.put("before", "mirror", None).await.unwrap();
    let mut mirror = tokio::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", etcd.client))
        .arg("make-mirror")
        .arg(addr.to_string())
        .kill_on_drop(true)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    for i in 0..20 {
        src.put(format!("live/{i}"), i.to_string(), None)
            .await
            .unwrap();
    }
    src.delete("live/0", None).await.unwrap();
    let dst = etcd_client(addr).await;
    let got = eventually("the mirror to catch up", Duration::from_secs(30), || {
        let mut dst = dst.clone();
        async move {
            let r = dst
                .get("", Some(GetOptions::new().with_all_keys()))
                .await
                .ok()?;
            let keys: Vec<String> = r
                .kvs()
                .iter()
                .map(|kv| format!("{}={}", kv.key_str().unwrap(), kv.value_str().unwrap()))
                .collect();
            // 20 keys are there before the last put and the delete arrive too: wait
            // for the mirror's end state, which the assertions below then spell out.
            let done = keys.len() == 20
                && keys.iter().any(|k| k == "live/19=19")
                && !keys.iter().any(|k| k.starts_with("live/0="));
            done.then_some(keys)
        }
    })
    .await;
    assert!(got.contains(&"before=mirror".to_string()), "{got:?}");
    assert!(got.contains(&"live/19=19".to_string()), "{got:?}");
    assert!(!got.iter().any(|k| k.starts_with("live/0=")), "{got:?}");
    let _ = mirror.kill().await;
}
