//! Debian's etcdctl 3.4 against a three-member meshd cluster: every command's output is
//! checked, not just its exit status. The README's test command installs etcdctl.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use mesh_tests::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

fn etcdctl_cmd(endpoints: &[SocketAddr], args: &[&str]) -> Command {
    let which = std::process::Command::new("sh")
        .arg("-c")
        .arg("command -v etcdctl")
        .output()
        .unwrap();
    assert!(
        which.status.success(),
        "etcdctl is not installed: run the README's test command (scripts/test), or apt-get install etcd-client"
    );
    let eps = endpoints
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mut c = Command::new("etcdctl");
    c.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={eps}"))
        .arg("--command-timeout=10s")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

/// Runs etcdctl, feeding `stdin`; returns (success, stdout, stderr).
async fn etcdctl(endpoints: &[SocketAddr], args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut child = etcdctl_cmd(endpoints, args).spawn().expect("spawn etcdctl");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).await.unwrap();
    drop(input);
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("etcdctl finished in time")
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn ok(endpoints: &[SocketAddr], args: &[&str]) -> String {
    let (success, out, err) = etcdctl(endpoints, args, "").await;
    assert!(success, "etcdctl {args:?} failed: {err}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_3_4_drives_meshd() {
    let c = InProcessCluster::start(3, ClusterOpts::default()).await;
    let all = c.live_addrs();
    wait_for_leader(&all).await;
    let one = [c.addr(1)];

    // A watch on one member (started from revision 1, so it cannot miss anything
    // however long etcdctl takes to start) while writing through the others.
    let mut watch = etcdctl_cmd(&[c.addr(2)], &["watch", "fruit", "--prefix", "--rev=1"])
        .spawn()
        .unwrap();
    let mut watch_out = BufReader::new(watch.stdout.take().unwrap()).lines();
    assert_eq!(ok(&all, &["put", "fruit/apple", "red"]).await, "OK\n");
    assert_eq!(ok(&one, &["put", "fruit/banana", "yellow"]).await, "OK\n");
    assert_eq!(
        ok(&one, &["get", "fruit/apple"]).await,
        "fruit/apple\nred\n"
    );
    assert_eq!(
        ok(&one, &["get", "fruit/apple", "--print-value-only"]).await,
        "red\n"
    );
    assert_eq!(
        ok(&one, &["get", "fruit/", "--prefix", "--keys-only"]).await,
        "fruit/apple\n\nfruit/banana\n\n"
    );
    assert_eq!(
        ok(
            &one,
            &[
                "get",
                "fruit/",
                "--prefix",
                "--consistency=s",
                "--limit=1",
                "--print-value-only"
            ]
        )
        .await,
        "red\n"
    );
    let json = ok(&one, &["get", "fruit/apple", "-w", "json"]).await;
    assert!(
        json.contains("\"count\":1") && json.contains("\"kvs\":[{"),
        "{json}"
    );

    // Txn from stdin, both branches.
    let txn =
        "value(\"fruit/apple\") = \"red\"\n\nput fruit/apple green\n\nput fruit/apple never\n\n";
    let (success, out, err) = etcdctl(&one, &["txn"], txn).await;
    assert!(success, "{err}");
    assert_eq!(out, "SUCCESS\n\nOK\n");
    let (success, out, _) = etcdctl(&one, &["txn"], txn).await;
    assert!(success);
    assert_eq!(out, "FAILURE\n\nOK\n");
    assert_eq!(
        ok(&one, &["get", "fruit/apple", "--print-value-only"]).await,
        "never\n"
    );

    assert_eq!(ok(&one, &["del", "fruit/banana"]).await, "1\n");
    assert_eq!(ok(&one, &["del", "fruit/nothing"]).await, "0\n");

    // The watcher saw everything, in order.
    let mut lines = Vec::new();
    while lines.len() < 14 {
        let l = tokio::time::timeout(Duration::from_secs(10), watch_out.next_line())
            .await
            .expect("watch output in time")
            .unwrap()
            .expect("watch still running");
        lines.push(l);
    }
    assert_eq!(
        lines,
        [
            "PUT",
            "fruit/apple",
            "red",
            "PUT",
            "fruit/banana",
            "yellow",
            "PUT",
            "fruit/apple",
            "green",
            "PUT",
            "fruit/apple",
            "never",
            "DELETE",
            "fruit/banana"
        ]
    );
    let _ = watch.kill().await;

    // Cluster views.
    let members = ok(&one, &["member", "list"]).await;
    for name in ["m0", "m1", "m2"] {
        assert!(
            members.contains(&format!(", started, {name}, ")),
            "{members}"
        );
    }
    assert_eq!(members.lines().count(), 3, "{members}");
    let status = ok(&all, &["endpoint", "status"]).await;
    assert_eq!(status.lines().count(), 3, "{status}");
    assert_eq!(
        status.matches(", true, false, ").count(),
        1,
        "exactly one leader: {status}"
    );
    assert!(status.contains("3.5.0"), "{status}");
    let health = etcdctl(&all, &["endpoint", "health"], "").await;
    assert!(health.0, "{}", health.2);
    assert_eq!(
        health.1.matches("is healthy").count() + health.2.matches("is healthy").count(),
        3,
        "{health:?}"
    );

    // Compaction, then etcd's error for a compacted revision.
    let j = ok(&one, &["get", "fruit/apple", "-w", "json"]).await;
    let v: serde_json::Value = serde_json::from_str(&j).unwrap();
    let rev = v["header"]["revision"].as_i64().unwrap();
    assert_eq!(
        ok(&one, &["compaction", &rev.to_string()]).await,
        format!("compacted revision {rev}\n")
    );
    let (success, _, err) = etcdctl(
        &one,
        &["get", "fruit/apple", &format!("--rev={}", rev - 2)],
        "",
    )
    .await;
    assert!(!success);
    assert!(
        err.contains("required revision has been compacted"),
        "{err}"
    );
}
