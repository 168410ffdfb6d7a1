//! `/health` and `/metrics` of real members: etcd's health body, a Prometheus page
//! that parses, and counters that move with the work done.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use mesh_tests::*;

/// Parses a Prometheus text page: every sample line is `name{labels} value`, every
/// sample belongs to a family declared with `# TYPE`. Returns `series -> value`.
fn parse(page: &str) -> HashMap<String, f64> {
    let mut families = Vec::new();
    let mut samples = HashMap::new();
    for line in page.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let name = parts.next().expect("family name");
            let kind = parts.next().expect("family type");
            assert!(
                ["counter", "gauge", "histogram"].contains(&kind),
                "bad type: {line}"
            );
            families.push(name.to_string());
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample line");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("value in {line}"));
        let name = series.split('{').next().unwrap();
        if let Some(labels) = series.strip_prefix(name) {
            assert!(
                labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')),
                "labels in {line}"
            );
        }
        let family_ok = families.iter().any(|f| {
            name == f
                || ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| name.strip_suffix(s) == Some(f))
        });
        assert!(family_ok, "sample without # TYPE: {line}");
        assert!(
            samples.insert(series.to_string(), value).is_none(),
            "duplicate {line}"
        );
    }
    samples
}

async fn metrics(addr: SocketAddr) -> HashMap<String, f64> {
    let (code, body) = http_get(addr, "/metrics").await.expect("metrics answers");
    assert_eq!(code, 200, "{body}");
    parse(&body)
}

const PUT_OK: &str =
    "grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"Put\",grpc_service=\"etcdserverpb.KV\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_follow_the_cluster() {
    let opts = ClusterOpts {
        metrics: true,
        ..Default::default()
    };
    let mut c = InProcessCluster::start(3, opts).await;
    let leader = wait_for_leader(&c.live_addrs()).await;
    let li = c.index_of(leader);
    let m: Vec<SocketAddr> = c
        .configs
        .iter()
        .map(|cfg| cfg.listen_metrics.expect("harness serves metrics"))
        .collect();
    for a in &m {
        let (code, body) = http_get(*a, "/health").await.expect("health answers");
        assert_eq!(
            (code, body.as_str()),
            (200, r#"{"health":"true","reason":""}"#)
        );
    }
    assert_eq!(http_get(m[0], "/nope").await.map(|r| r.0), Some(404));

    let before = metrics(m[li]).await;
    assert_eq!(before["etcd_server_has_leader"], 1.0);
    assert_eq!(before["etcd_server_is_leader"], 1.0);
    assert_eq!(before["meshd_mesh_connections"], 2.0);
    assert!(before["meshd_mesh_peers"] >= 3.0);
    assert!(before["etcd_mvcc_db_total_size_in_bytes"] > 0.0);
    let mut client = etcd_client(c.addr(li)).await;
    for i in 0..10 {
        client.put(format!("k{i}"), "v", None).await.expect("put");
    }
    let refused = client.put("", "v", None).await.expect_err("empty key");
    assert!(
        refused.to_string().contains("key is not provided"),
        "{refused}"
    );
    let _watch = client.watch("k", None).await.expect("watch");
    let after = eventually("watcher counted", Duration::from_secs(10), || async {
        let m = metrics(m[li]).await;
        (m["etcd_debugging_mvcc_watcher_total"] >= 1.0).then_some(m)
    })
    .await;
    let grew = |name: &str, by: f64| {
        let b = before.get(name).copied().unwrap_or(0.0);
        let a = after[name];
        assert!(a >= b + by, "{name}: {b} -> {a}");
    };
    grew("etcd_server_proposals_committed_total", 10.0);
    grew("etcd_server_proposals_applied_total", 10.0);
    grew("etcd_disk_wal_fsync_duration_seconds_count", 10.0);
    grew("etcd_server_apply_duration_seconds_count", 10.0);
    grew("meshd_raft_log_entries", 10.0);
    grew("meshd_wal_bytes", 10.0 * 20.0);
    assert!(after["meshd_wal_segments"] >= 1.0);
    grew("meshd_mesh_sent_bytes_total", 1.0);
    grew(PUT_OK, 10.0);
    grew(&PUT_OK.replace("\"OK\"", "\"InvalidArgument\""), 1.0);
    assert_eq!(after["etcd_server_proposals_pending"], 0.0);
    // Plain writes reach the backend with its periodic commit (every second or
    // megabyte of entries), as etcd batches its backend commits, not one per put.
    let commits = "etcd_disk_backend_commit_duration_seconds_count";
    let before_commits = before.get(commits).copied().unwrap_or(0.0);
    eventually(
        "a backend commit after the puts",
        Duration::from_secs(10),
        || async { (metrics(m[li]).await[commits] > before_commits).then_some(()) },
    )
    .await;

    // Quorum lost: the survivor has no leader, and says so.
    let survivor = (li + 1) % 3;
    for i in 0..3 {
        if i != survivor {
            c.stop(i).await;
        }
    }
    let body = eventually("health turns 503", Duration::from_secs(20), || async {
        match http_get(m[survivor], "/health").await {
            Some((503, body)) => Some(body),
            _ => None,
        }
    })
    .await;
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["health"], "false", "{body}");
    let reason = v["reason"].as_str().expect("reason");
    assert!(reason.starts_with("RAFT "), "{body}");
    let m_after = metrics(m[survivor]).await;
    assert_eq!(m_after["etcd_server_has_leader"], 0.0);
}

#[test]
fn json_logs_name_the_member_and_term_of_an_election() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(binary("meshd"))
        .arg("--name=logger")
        .arg(format!("--data-dir={}", dir.path().join("d").display()))
        .arg(format!("--listen-client={}", free_addr()))
        .arg(format!("--listen-mesh={}", free_addr()))
        .arg("--listen-metrics=off")
        .arg("--tick=20ms")
        .arg("--log-format=json")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut elected = None;
    // The process exits (and the pipe closes) if it fails: the loop cannot hang.
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if v["fields"]["message"] == "leader elected" {
            elected = Some(v);
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let v = elected.expect("a leader elected line");
    assert_eq!(v["span"]["member"], "logger", "{v}");
    assert!(v["fields"]["term"].as_u64().is_some_and(|t| t >= 1), "{v}");
    assert_eq!(v["fields"]["is_me"], true, "{v}");
}

/// A client that connects to the metrics port and never sends its request headers is
/// disconnected (slowloris), and the port keeps answering others meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_http_client_is_disconnected() {
    use tokio::io::AsyncReadExt;
    let c = InProcessCluster::start(
        1,
        ClusterOpts {
            metrics: true,
            ..Default::default()
        },
    )
    .await;
    wait_for_leader(&c.live_addrs()).await;
    let addr = c.servers[0].as_ref().unwrap().metrics_addr().unwrap();
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (code, _) = http_get(addr, "/health").await.unwrap();
    assert_eq!(code, 200);
    let mut buf = [0u8; 512];
    let closed = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match silent.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the silent connection was kept open");
}
