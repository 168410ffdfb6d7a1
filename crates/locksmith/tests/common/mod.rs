//! Shared by the end-to-end tests: spawned `meshd` members (through the mesh-tests
//! harness), the built `locksmith` binary, and raw access to the semaphore key with
//! the independent etcd-client crate.
#![allow(dead_code)] // each test file uses a different subset

use std::net::SocketAddr;
use std::process::{Output, Stdio};
use std::time::Duration;

use mesh_tests::{eventually, ClusterOpts, ProcessCluster};

pub const LOCKSMITH: &str = env!("CARGO_BIN_EXE_locksmith");
pub const KEY: &str = "coreos.com/updateengine/rebootlock/semaphore";

/// A cluster of `n` spawned meshd members with a leader.
pub async fn cluster(n: usize) -> ProcessCluster {
    let c = ProcessCluster::start(n, ClusterOpts::default());
    mesh_tests::wait_for_leader(&c.addrs()).await;
    c
}

pub fn endpoints(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// A `locksmith` command with the endpoints in the environment (so commands it runs
/// inherit them) and short backoffs; no other LOCKSMITH_ variable leaks in.
pub fn command(addrs: &[SocketAddr]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(LOCKSMITH);
    for (k, _) in std::env::vars() {
        if k.starts_with("LOCKSMITH_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("LOCKSMITH_ENDPOINTS", endpoints(addrs))
        .env("LOCKSMITH_BACKOFF_MIN", "100ms")
        .env("LOCKSMITH_BACKOFF_MAX", "1s")
        .env("LOCKSMITH_TIMEOUT", "2s")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Runs `locksmith ARGS` to completion.
pub async fn locksmith(addrs: &[SocketAddr], args: &[&str]) -> Output {
    let out = tokio::time::timeout(Duration::from_secs(60), command(addrs).args(args).output())
        .await
        .unwrap_or_else(|_| panic!("locksmith {args:?} did not finish within 60s"))
        .expect("spawn locksmith");
    eprintln!(
        "locksmith {args:?} -> {:?}\nstdout: {}stderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The raw stored value of `key`, if any (linearizable, retried across leader changes).
pub async fn raw(addrs: &[SocketAddr], key: &str) -> Option<String> {
    eventually(&format!("get {key}"), Duration::from_secs(30), || async {
        for a in addrs {
            let mut c = mesh_tests::etcd_client(*a).await;
            if let Ok(r) = c.get(key, None).await {
                return Some(
                    r.kvs()
                        .first()
                        .map(|kv| kv.value_str().expect("utf-8").to_string()),
                );
            }
        }
        None
    })
    .await
}

/// Writes `value` at `key` directly, as an operator (or CoreOS locksmith) would.
pub async fn put_raw(addrs: &[SocketAddr], key: &str, value: &str) {
    mesh_tests::put_retrying(addrs, key, value).await;
}

/// Holders as stored now (parsed with serde_json, independently of locksmith's parser).
pub async fn holders(addrs: &[SocketAddr]) -> Vec<String> {
    let v: serde_json::Value =
        serde_json::from_str(&raw(addrs, KEY).await.expect("semaphore exists")).unwrap();
    v["holders"]
        .as_array()
        .map(|a| a.iter().map(|h| h.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// Sends SIGTERM to a spawned locksmith and waits (with a deadline) for its exit.
pub async fn terminate(child: &mut tokio::process::Child) -> std::process::ExitStatus {
    let pid = child.id().expect("still running") as libc::pid_t;
    // SAFETY: kill(2) on our own child, which is not reaped yet (pid not reused).
    unsafe { libc::kill(pid, libc::SIGTERM) };
    tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("locksmith exits after SIGTERM")
        .expect("wait")
}

/// SIGKILLs the member that leads now; returns its slot and member ID.
pub async fn kill_leader(c: &mut ProcessCluster) -> (usize, u64) {
    let a = c.addrs();
    let leader = mesh_tests::wait_for_leader(&a).await;
    let idx = eventually("the leader's index", Duration::from_secs(10), || async {
        for (i, addr) in a.iter().enumerate() {
            if mesh_tests::status(*addr).await?.header()?.member_id() == leader {
                return Some(i);
            }
        }
        None
    })
    .await;
    c.procs[idx].kill9();
    (idx, leader)
}

/// Restarts the killed slot `idx` once the others agree on a leader other than `old`.
pub async fn restart_after_failover(c: &mut ProcessCluster, idx: usize, old: u64) {
    let a = c.addrs();
    let rest: Vec<SocketAddr> = a.iter().copied().filter(|x| *x != a[idx]).collect();
    mesh_tests::wait_for_leader_other_than(&rest, old).await;
    c.restart(idx);
}
