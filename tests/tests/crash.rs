//! Spawned `meshd` processes: durability across kill -9, clean stop, data-dir ownership.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use mesh_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_every_member_loses_no_acknowledged_write() {
    let mut c = ProcessCluster::start(3, ClusterOpts::default());
    let addrs = c.addrs();
    wait_for_leader(&addrs).await;

    // N acknowledged writes, spread over all members.
    const N: usize = 60;
    let mut acked = BTreeMap::new();
    for i in 0..N {
        let mut cl = etcd_client(addrs[i % 3]).await;
        let r = cl
            .put(format!("durable/{i:03}"), format!("v{i}"), None)
            .await
            .unwrap_or_else(|e| panic!("put {i}: {e}\n{}", c.log(i % 3)));
        acked.insert(format!("durable/{i:03}"), r.header().unwrap().revision());
    }
    for p in &mut c.procs {
        p.kill9();
    }
    for i in 0..3 {
        c.restart(i);
    }
    wait_for_leader(&addrs).await;
    for (i, addr) in addrs.iter().enumerate() {
        let mut cl = etcd_client(*addr).await;
        let r = cl
            .get(
                "durable/",
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await
            .unwrap_or_else(|e| panic!("get from member {i}: {e}\n{}", c.log(i)));
        let got: BTreeMap<String, i64> = r
            .kvs()
            .iter()
            .map(|kv| (kv.key_str().unwrap().to_string(), kv.mod_revision()))
            .collect();
        assert_eq!(got, acked, "member {i} after kill -9 of all");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly_and_data_dir_refuses_another_member() {
    let mut c = ProcessCluster::start(1, ClusterOpts::default());
    let addrs = c.addrs();
    wait_for_leader(&addrs).await;
    put_retrying(&addrs, "k", "v").await;
    let status = c.procs[0].terminate().expect("was running");
    assert!(
        status.success(),
        "SIGTERM exits 0, got {status:?}\n{}",
        c.log(0)
    );

    let dir = c.dir.path().join("p0");
    // The same data dir under another name, or for another cluster, is refused.
    let err = refused(&dir, &["--name=intruder"]);
    assert!(err.contains("belongs to member 'p0'"), "{err}");
    let other = format!("--initial-cluster=p0={}", free_addr());
    let err = refused(
        &dir,
        &["--name=p0", "--initial-cluster-token=other", &other],
    );
    assert!(err.contains("belongs to cluster"), "{err}");

    // A corrupt database is refused, not served.
    let db = dir.join("meshd.redb");
    let mut bytes = std::fs::read(&db).unwrap();
    for b in bytes.iter_mut().take(4096) {
        *b = 0xA5;
    }
    std::fs::write(&db, &bytes).unwrap();
    let err = refused(&dir, &["--name=p0"]);
    assert!(err.contains("corrupt"), "{err}");
}

/// Runs meshd on `data_dir` expecting it to refuse to start; returns its stderr.
fn refused(data_dir: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new(binary("meshd"))
        .args(args)
        .arg(format!("--data-dir={}", data_dir.display()))
        .arg(format!("--listen-client={}", free_addr()))
        .arg(format!("--listen-mesh={}", free_addr()))
        .arg("--listen-metrics=127.0.0.1:0")
        .output()
        .expect("run meshd");
    assert!(
        !out.status.success(),
        "meshd {args:?} should refuse to start"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Torn writes in the Raft log: a member killed with -9 right after acknowledged
/// writes (its keyspace not yet committed durably, so a restart replays the log), and
/// copies of its data dir whose last log record is cut short at offsets across it or
/// zero-filled. Each copy restarts and serves every write before that record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_log_tail_restarts_with_every_earlier_write() {
    const N: usize = 20;
    let mut c = ProcessCluster::start(1, ClusterOpts::default());
    let addrs = c.addrs();
    wait_for_leader(&addrs).await;
    for i in 0..N {
        put_retrying(&addrs, &format!("torn/{i:02}"), "v").await;
    }
    c.procs[0].kill9();
    let data = c.dir.path().join("p0");
    let pristine = c.dir.path().join("p0.pristine");
    std::fs::create_dir(&pristine).unwrap();
    copy_dir(&data, &pristine);
    let seg = |dir: &std::path::Path| dir.join("wal").join("0000000000000001.wal");
    let on_disk = std::fs::read(seg(&pristine)).unwrap();
    // Records follow the 8-byte magic: length (u32 LE), two checksums, payload. Zeros
    // follow the last record (the log keeps them ahead of its end).
    let mut last = 8;
    let mut at = 8;
    while at + 4 <= on_disk.len() {
        let len = u32::from_le_bytes(on_disk[at..at + 4].try_into().unwrap()) as usize;
        if len == 0 {
            break;
        }
        last = at;
        at += 12 + len;
    }
    assert!(
        at <= on_disk.len() && on_disk[at..].iter().all(|&b| b == 0),
        "the segment's records end with a whole record, and zeros follow"
    );
    let whole = on_disk[..at].to_vec();
    let mut reported = 0;
    for (cut, zeros) in [
        (last, false),
        (last + 1, false),
        (last + 7, true),
        (last + 12, false),
        (whole.len() - 1, true),
    ] {
        std::fs::remove_dir_all(&data).unwrap();
        std::fs::create_dir(&data).unwrap();
        copy_dir(&pristine, &data);
        let mut bytes = whole[..cut].to_vec();
        if zeros {
            bytes.resize(whole.len(), 0);
        }
        std::fs::write(seg(&data), &bytes).unwrap();
        c.restart(0);
        wait_for_leader(&addrs).await;
        let mut cl = etcd_client(addrs[0]).await;
        let r = cl
            .get("torn/", Some(etcd_client::GetOptions::new().with_prefix()))
            .await
            .unwrap_or_else(|e| panic!("cut at {cut}: {e}\n{}", c.log(0)));
        let got: Vec<String> = r
            .kvs()
            .iter()
            .map(|kv| kv.key_str().unwrap().to_string())
            .collect();
        let want: Vec<String> = (0..N - 1).map(|i| format!("torn/{i:02}")).collect();
        assert!(
            got.len() >= N - 1 && got[..N - 1] == want[..],
            "cut at {cut} (zeros {zeros}): {got:?}\n{}",
            c.log(0)
        );
        // A cut at the record's start leaves whole records only; any other is reported.
        let reports = c.log(0).matches("an incomplete record at the end").count();
        reported += usize::from(cut > last || zeros);
        assert_eq!(reports, reported, "cut at {cut}:\n{}", c.log(0));
        c.procs[0].kill9();
    }
}

/// A restarted member applies again the entries its previous run proposed (those after
/// its keyspace's last durable commit) while new requests already wait on it: each new
/// write must be answered with its own result, never with that of an old entry that
/// carries the same proposal ID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_member_answers_new_writes_with_their_own_results() {
    const BURST: usize = 30;
    let mut c = ProcessCluster::start(3, ClusterOpts::default());
    let addrs = c.addrs();
    let leader = wait_for_leader(&addrs).await;
    let mut li = 0;
    for (i, a) in addrs.iter().enumerate() {
        if status(*a)
            .await
            .and_then(|s| s.header().map(|h| h.member_id()))
            == Some(leader)
        {
            li = i;
        }
    }
    // A burst through the leader (the first proposal IDs of its run), then kill -9:
    // the last of them are committed but not yet applied durably on it.
    let burst = |tag: &'static str| {
        let addr = addrs[li];
        async move {
            let mut tasks = Vec::new();
            for i in 0..BURST {
                tasks.push(tokio::spawn(async move {
                    let mut cl = etcd_client(addr).await;
                    let key = format!("{tag}/{i:02}");
                    cl.put(key.clone(), tag, None)
                        .await
                        .ok()
                        .map(|r| (key, r.header().unwrap().revision()))
                }));
            }
            let mut done = Vec::new();
            for t in tasks {
                if let Some(r) = t.await.unwrap() {
                    done.push(r);
                }
            }
            done
        }
    };
    let old = burst("old").await;
    assert_eq!(old.len(), BURST, "{}", c.log(li));
    c.procs[li].kill9();
    c.restart(li);
    // New writes through it as soon as it listens, while it catches up with the others.
    while tokio::net::TcpStream::connect(addrs[li]).await.is_err() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let new = burst("new").await;
    assert!(
        !new.is_empty(),
        "no write through the restarted member succeeded"
    );
    wait_for_leader(&addrs).await;
    let mut cl = etcd_client(addrs[(li + 1) % 3]).await;
    for (key, revision) in old.iter().chain(new.iter()) {
        let r = cl.get(key.as_str(), None).await.expect("linearizable get");
        let kv = &r.kvs()[0];
        assert_eq!(
            kv.mod_revision(),
            *revision,
            "{key} was acknowledged at revision {revision} but written at {}\n{}",
            kv.mod_revision(),
            c.log(li)
        );
    }
}
