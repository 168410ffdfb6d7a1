//! A member whose disk fills up. With its free-space reserve (`--min-free-disk-bytes`)
//! writes are refused with etcd's NOSPACE error before the disk is full, reads go on,
//! and writes succeed again once space returns. Without a reserve the Raft log's own
//! commit fails: the member leaves Raft (the reason logged), refuses writes with
//! NOSPACE, keeps serving serializable reads with the data intact, and once space
//! returns reopens its database from disk and accepts writes again, without a restart.
//! The data dir lives on a small tmpfs, so the tests need root (skipped, saying why,
//! otherwise).

use std::process::Command;
use std::time::Duration;

use mesh_tests::*;

struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A single member with its data dir on a 24 MiB tmpfs (8 MiB of it taken by a
/// filler file) and a free-space reserve of `reserve` bytes, filled with 16 KiB writes
/// until one fails; returns the failed write's error.
struct Full {
    dir: tempfile::TempDir,
    _fs: Tmpfs,
    filler: std::path::PathBuf,
    p: Process,
    client: etcd_client::Client,
    error: etcd_client::Error,
}

impl Full {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("p0.log")).unwrap_or_default()
    }
}

async fn fill_up(reserve: u64) -> Full {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    let fs = Tmpfs::mount(&mnt, "24m")
        .unwrap_or_else(|e| panic!("a small tmpfs is needed (root, as CI runs): {e}"));
    // Space to give back later.
    let filler = mnt.join("filler");
    std::fs::write(&filler, vec![0u8; 8 << 20]).unwrap();
    let addr = free_addr();
    let metrics = free_addr();
    let mut p = Process {
        name: "p0".into(),
        client: addr,
        metrics,
        args: vec![
            "--name=p0".into(),
            format!("--data-dir={}", mnt.join("p0").display()),
            format!("--listen-client={addr}"),
            format!("--listen-mesh={}", free_addr()),
            format!("--listen-metrics={metrics}"),
            "--tick=25ms".into(),
            "--election-ticks=12".into(),
            "--heartbeat-ticks=2".into(),
            format!("--min-free-disk-bytes={reserve}"),
        ],
        child: None,
        log: dir.path().join("p0.log"),
    };
    p.spawn();
    wait_for_leader(&[addr]).await;
    let mut c = etcd_client(addr).await;
    c.put("first", "kept", None).await.expect("first put");
    let value = vec![b'x'; 16 * 1024];
    for i in 0..2000 {
        if let Err(error) = c.put(format!("fill/{i:03}"), value.clone(), None).await {
            return Full {
                dir,
                _fs: fs,
                filler,
                p,
                client: c,
                error,
            };
        }
    }
    panic!("24 MiB never filled up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_nearly_full_refuses_writes_keeps_reads_and_recovers() {
    // The reserve must cover what is written before the keyspace claims its pages (up
    // to a megabyte of entries, several times that in redb pages not yet reusable).
    let mut f = fill_up(6 << 20).await;
    let err = f.error.to_string();
    eprintln!("write on a nearly full disk: {err}");
    assert!(
        err.contains("etcdserver: mvcc: database space exceeded"),
        "{err}\n{}",
        f.log()
    );
    assert!(f.log().contains("disk nearly full"), "{}", f.log());
    // The reserve refused it before the disk itself did (a full disk also answers
    // NOSPACE, after a failed write that the log names).
    assert!(!f.log().contains("No space left on device"), "{}", f.log());
    // Reads, linearizable too (the Raft driver is fine), and the data is intact.
    let r = f
        .client
        .get("first", None)
        .await
        .unwrap_or_else(|e| panic!("read: {e}\n{}", f.log()));
    assert_eq!(r.kvs()[0].value(), b"kept");
    // Deletes free space and are allowed, as etcd allows them under NOSPACE.
    f.client
        .delete("fill/000", None)
        .await
        .expect("delete on a nearly full disk");
    // Space returns: writes succeed again, without a restart.
    std::fs::remove_file(&f.filler).unwrap();
    let c = f.client.clone();
    eventually(
        "a write after space returned",
        Duration::from_secs(20),
        || {
            let mut c = c.clone();
            async move { c.put("after", "space", None).await.ok() }
        },
    )
    .await;
    assert_eq!(
        f.client.get("after", None).await.unwrap().kvs()[0].value(),
        b"space"
    );
    assert!(f.log().contains("disk space is back"), "{}", f.log());
    assert!(
        f.p.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "meshd exited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_without_reserve_stops_writes_logs_why_and_keeps_serving_reads() {
    let mut f = fill_up(0).await;
    let err = f.error.to_string();
    eprintln!("write on a full disk: {err}");
    // The write in flight when the disk filled up fails as the member leaves Raft
    // (server stopped), or was applied and the failure came with the keyspace's next
    // durable commit: then this write is refused with NOSPACE.
    assert!(
        err.contains("etcdserver: server stopped")
            || err.contains("etcdserver: mvcc: database space exceeded"),
        "{err}"
    );
    let log = f.log();
    assert!(
        log.contains("No space left on device"),
        "the log does not say why writes stopped:\n{log}"
    );
    // Later writes are refused at once with NOSPACE, not left hanging.
    let again = f
        .client
        .put("more", "x", None)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        again.contains("etcdserver: mvcc: database space exceeded"),
        "{again}\n{}",
        f.log()
    );
    // Still up for serializable reads, with the data intact.
    let r = f
        .client
        .get(
            "first",
            Some(etcd_client::GetOptions::new().with_serializable()),
        )
        .await
        .unwrap_or_else(|e| panic!("read on a full disk: {e}\n{}", f.log()));
    assert_eq!(r.kvs()[0].value(), b"kept");
    let n = f
        .client
        .get(
            "fill/",
            Some(
                // Only the count: the values may exceed a response's 4 MiB.
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_count_only()
                    .with_serializable(),
            ),
        )
        .await
        .unwrap()
        .count();
    assert!(
        n > 0,
        "the writes acknowledged before the disk filled are gone"
    );
    assert!(
        f.p.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "meshd exited\n{}",
        f.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_writes_recover_when_space_returns() {
    let mut f = fill_up(0).await;
    let acknowledged = f
        .client
        .get(
            "fill/",
            Some(
                // Only the count: the values may exceed a response's 4 MiB.
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_count_only()
                    .with_serializable(),
            ),
        )
        .await
        .unwrap()
        .count();
    std::fs::remove_file(&f.filler).unwrap();
    let c = f.client.clone();
    eventually(
        "a write after space returned",
        Duration::from_secs(20),
        || {
            let mut c = c.clone();
            async move { c.put("after", "space", None).await.ok() }
        },
    )
    .await;
    let log = f.log();
    assert!(log.contains("database reopened from disk"), "{log}");
    // Linearizable reads see the old data and the new write: the state rebuilt from
    // disk lost nothing that was acknowledged.
    assert_eq!(
        f.client.get("after", None).await.unwrap().kvs()[0].value(),
        b"space"
    );
    assert_eq!(
        f.client.get("first", None).await.unwrap().kvs()[0].value(),
        b"kept"
    );
    let n = f
        .client
        .get(
            "fill/",
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_count_only(),
            ),
        )
        .await
        .unwrap()
        .count();
    assert!(
        n >= acknowledged,
        "{n} of {acknowledged} acknowledged writes left"
    );
    assert!(
        f.p.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "meshd exited\n{log}"
    );
}

/// A follower whose disk fills: the other two go on committing writes, the follower
/// leaves Raft without acknowledging what it could not persist, and once space
/// returns it reopens its database, catches up, and holds the same data as the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_with_a_full_disk_catches_up_when_space_returns() {
    let scratch = tempfile::tempdir().unwrap();
    let mnt = scratch.path().join("small");
    let _fs = Tmpfs::mount(&mnt, "8m")
        .unwrap_or_else(|e| panic!("a small tmpfs is needed (root, as CI runs): {e}"));
    let filler = mnt.join("filler");
    std::fs::write(&filler, vec![0u8; 3 << 20]).unwrap();
    let mut c = ProcessCluster::start(3, ClusterOpts::default());
    wait_for_leader(&c.addrs()).await;
    // Move p2's data dir onto the small filesystem (a symlink keeps its flags) and
    // restart it there, without a free-space reserve.
    c.procs[2].terminate();
    let data = c.dir.path().join("p2");
    let small = mnt.join("p2");
    std::fs::create_dir(&small).unwrap();
    copy_dir(&data, &small);
    std::fs::remove_dir_all(&data).unwrap();
    std::os::unix::fs::symlink(&small, &data).unwrap();
    c.procs[2].args.push("--min-free-disk-bytes=0".into());
    c.restart(2);
    let addrs = c.addrs();
    wait_for_leader(&addrs).await;
    // p2 must be a follower: if it leads, hand leadership to p0.
    let mut c0 = etcd_client(addrs[0]).await;
    let mut c2 = etcd_client(addrs[2]).await;
    let s2 = c2.status().await.unwrap();
    if s2.leader() == s2.header().unwrap().member_id() {
        let p0 = c0.status().await.unwrap().header().unwrap().member_id();
        c2.move_leader(p0).await.expect("move leader off p2");
    }
    let serializable = || Some(etcd_client::GetOptions::new().with_serializable());

    // Fill p2's disk through the leader's quorum.
    let value = vec![b'x'; 16 * 1024];
    let mut i = 0;
    while !c.log(2).contains("storage write failed") {
        assert!(i < 2000, "p2's disk never filled\n{}", c.log(2));
        let mut any = etcd_client(addrs[i % 2]).await;
        any.put(format!("fill/{i:04}"), value.clone(), None)
            .await
            .unwrap_or_else(|e| panic!("write with p2's disk full: {e}\n{}", c.log(0)));
        i += 1;
    }
    // The other two still commit writes, and p2 still serves serializable reads.
    c0.put("during", "full", None)
        .await
        .expect("write while a follower's disk is full");
    let r = c2
        .get("fill/0000", serializable())
        .await
        .expect("read on p2");
    assert_eq!(r.kvs()[0].value(), value.as_slice());

    std::fs::remove_file(&filler).unwrap();
    c0.put("after", "space", None).await.unwrap();
    let c2r = c2.clone();
    eventually(
        "p2 caught up after space returned",
        Duration::from_secs(30),
        || {
            let mut c2 = c2r.clone();
            async move {
                let r = c2.get("after", serializable()).await.ok()?;
                (r.kvs().first()?.value() == b"space").then_some(())
            }
        },
    )
    .await;
    assert!(
        c.log(2).contains("database reopened from disk"),
        "{}",
        c.log(2)
    );
    // Same data everywhere: every member's HashKV at the leader's revision agrees.
    let rev = c0
        .get("after", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let h0 = c0.hash_kv(rev).await.unwrap().hash();
    let h2 = eventually("p2's HashKV", Duration::from_secs(10), || {
        let mut c2 = c2r.clone();
        async move { c2.hash_kv(rev).await.ok().map(|h| h.hash()) }
    })
    .await;
    assert_eq!(h0, h2, "p2 differs from p0 at revision {rev}");
}
