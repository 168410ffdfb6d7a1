//! A member whose disk fills up: writes fail, the reason is logged, the member stays
//! up for reads with its data intact. The data dir lives on a small tmpfs, so the test
//! needs root (it is skipped, saying why, otherwise).
//!
//! Known gap (ignored test below): the Raft driver stops on the failed commit and does
//! not resume when space returns; only a restart brings writes back. Retrying in place
//! is not safe as things stand (see the chaos report in the issue).

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

/// A single member with its data dir on an 8 MiB tmpfs (3 MiB of it taken by a
/// filler file), filled with writes until one fails; returns the failed write's error.
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

async fn fill_up() -> Option<Full> {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    let fs = match Tmpfs::mount(&mnt, "8m") {
        Ok(fs) => fs,
        Err(e) => {
            eprintln!("SKIPPED: cannot mount a small tmpfs (needs root): {e}");
            return None;
        }
    };
    // Space to give back later.
    let filler = mnt.join("filler");
    std::fs::write(&filler, vec![0u8; 3 << 20]).unwrap();
    let addr = free_addr();
    let mut p = Process {
        name: "p0".into(),
        client: addr,
        args: vec![
            "--name=p0".into(),
            format!("--data-dir={}", mnt.join("p0").display()),
            format!("--listen-client={addr}"),
            format!("--listen-mesh={}", free_addr()),
            "--tick=25ms".into(),
            "--election-ticks=12".into(),
            "--heartbeat-ticks=2".into(),
        ],
        child: None,
        log: dir.path().join("p0.log"),
    };
    p.spawn();
    wait_for_leader(&[addr]).await;
    let mut c = etcd_client(addr).await;
    c.put("first", "kept", None).await.expect("first put");
    let value = vec![b'x'; 64 * 1024];
    for i in 0..400 {
        if let Err(error) = c.put(format!("fill/{i:03}"), value.clone(), None).await {
            return Some(Full {
                dir,
                _fs: fs,
                filler,
                p,
                client: c,
                error,
            });
        }
    }
    panic!("8 MiB never filled up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_refuses_writes_logs_why_and_keeps_serving_reads() {
    let Some(mut f) = fill_up().await else { return };
    let err = f.error.to_string();
    eprintln!("write on a full disk: {err}");
    assert!(err.contains("etcdserver: server stopped"), "{err}");
    let log = f.log();
    assert!(
        log.contains("No space left on device"),
        "the log does not say why writes stopped:\n{log}"
    );
    // Later writes are refused at once, not left hanging.
    let again = f
        .client
        .put("more", "x", None)
        .await
        .unwrap_err()
        .to_string();
    assert!(again.contains("etcdserver: server stopped"), "{again}");
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
                etcd_client::GetOptions::new()
                    .with_prefix()
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
#[ignore = "known gap: the Raft driver stops on a failed commit and needs a restart"]
async fn disk_full_writes_recover_when_space_returns() {
    let Some(f) = fill_up().await else { return };
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
}
