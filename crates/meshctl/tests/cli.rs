//! End-to-end tests: the built `meshctl` binary against a real server process.
//!
//! The server is started by [`start_server`]: meshd by default, or etcd 3.4 with
//! `MESHCTL_TEST_SERVER=etcd` (the test script runs both, so meshctl's output is checked
//! against the real thing and meshd's answers against etcd's).
//! Ports come from binding port 0; data lives in a temp dir; the process is killed on drop.
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const MESHCTL: &str = env!("CARGO_BIN_EXE_meshctl");

/// A running server; killed when dropped.
struct Server {
    child: Child,
    /// `127.0.0.1:PORT` of the client API.
    endpoint: String,
    _data: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

use mesh_tests::free_port;

/// Starts a fresh single-member server and waits until it is healthy.
fn start_server() -> Server {
    match std::env::var("MESHCTL_TEST_SERVER").as_deref() {
        Ok("etcd") => start_etcd(),
        Ok("meshd") | Err(_) => start_meshd(),
        Ok(other) => panic!("MESHCTL_TEST_SERVER={other}: expected meshd or etcd"),
    }
}

fn start_meshd() -> Server {
    start_meshd_with(&[])
}

/// meshd with extra flags (always meshd: for features only meshd has, or its quota).
fn start_meshd_with(extra: &[&str]) -> Server {
    let meshd = Path::new(MESHCTL).with_file_name("meshd");
    assert!(
        meshd.exists(),
        "{} is missing: build the workspace binaries first (scripts/test does)",
        meshd.display()
    );
    let data = tempfile::tempdir().unwrap();
    let (client, mesh) = (free_port(), free_port());
    let log = std::fs::File::create(data.path().join("meshd.log")).unwrap();
    let child = Command::new(meshd)
        .arg("--name=test")
        .arg(format!("--data-dir={}", data.path().join("data").display()))
        .arg(format!("--listen-client=127.0.0.1:{client}"))
        .arg(format!("--listen-mesh=127.0.0.1:{mesh}"))
        .arg("--listen-metrics=127.0.0.1:0")
        .arg("--tick=20ms")
        .args(extra)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn meshd");
    wait_healthy(Server {
        child,
        endpoint: format!("127.0.0.1:{client}"),
        _data: data,
    })
}

fn start_etcd() -> Server {
    let found = Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    assert!(
        matches!(found, Ok(s) if s.success()),
        "`etcd` is not on PATH: these tests need a real etcd 3.4 server; install it with \
         `apt-get install etcd-server etcd-client`"
    );
    let data = tempfile::tempdir().unwrap();
    let (client, peer) = (free_port(), free_port());
    let client_url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let log = std::fs::File::create(data.path().join("etcd.log")).unwrap();
    let child = Command::new("etcd")
        .arg("--name=test")
        .arg(format!("--data-dir={}", data.path().join("data").display()))
        .arg(format!("--listen-client-urls={client_url}"))
        .arg(format!("--advertise-client-urls={client_url}"))
        .arg(format!("--listen-peer-urls={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .arg(format!("--initial-cluster=test={peer_url}"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn etcd");
    wait_healthy(Server {
        child,
        endpoint: format!("127.0.0.1:{client}"),
        _data: data,
    })
}

/// Waits until `endpoint health` passes, so tests start against a serving member.
fn wait_healthy(server: Server) -> Server {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = meshctl(&server, &["endpoint", "health", "--timeout", "1s"]);
        if out.status.success() {
            return server;
        }
        assert!(
            Instant::now() < deadline,
            "server never became healthy: {}",
            text(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn command(server: &Server, args: &[&str]) -> Command {
    let mut cmd = Command::new(MESHCTL);
    cmd.arg("--endpoints")
        .arg(&server.endpoint)
        .args(args)
        .env_remove("MESHCTL_ENDPOINTS");
    cmd
}

fn meshctl(server: &Server, args: &[&str]) -> Output {
    meshctl_stdin(server, args, "")
}

fn meshctl_stdin(server: &Server, args: &[&str], input: &str) -> Output {
    let mut child = command(server, args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Runs meshctl, asserts exit 0, returns stdout.
fn ok(server: &Server, args: &[&str]) -> String {
    let out = meshctl(server, args);
    assert!(
        out.status.success(),
        "meshctl {args:?} failed: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

#[test]
fn put_get_simple_and_json() {
    let s = start_server();
    assert_eq!(ok(&s, &["put", "foo", "bar"]), "OK\n");
    assert_eq!(ok(&s, &["get", "foo"]), "foo\nbar\n");
    assert_eq!(ok(&s, &["get", "foo", "--print-value-only"]), "bar\n");
    assert_eq!(
        ok(&s, &["put", "foo", "baz", "--prev-kv"]),
        "OK\nfoo\nbar\n"
    );
    let v = json(&ok(&s, &["get", "foo", "-w", "json"]));
    assert_eq!(v["kvs"][0]["key"], "Zm9v");
    assert_eq!(v["kvs"][0]["value"], "YmF6");
    assert_eq!(v["kvs"][0]["version"], 2);
    assert_eq!(v["count"], 1);
    assert!(v["header"]["revision"].as_i64().unwrap() >= 3);
    assert!(v["header"]["cluster_id"].as_u64().unwrap() > 0);
    // Value from stdin, byte for byte.
    let out = meshctl_stdin(&s, &["put", "fromstdin"], "line one\nline two\n");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        ok(&s, &["get", "fromstdin", "--print-value-only"]),
        "line one\nline two\n\n"
    );
    // Missing key: nothing printed, success, unless --require.
    assert_eq!(ok(&s, &["get", "missing"]), "");
    let out = meshctl(&s, &["get", "missing", "--require"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    assert_eq!(
        meshctl(&s, &["get", "foo", "--require"]).status.code(),
        Some(0)
    );
}

#[test]
fn prefix_ranges_and_delete() {
    let s = start_server();
    for (k, v) in [("a1", "1"), ("a2", "2"), ("b1", "3")] {
        ok(&s, &["put", k, v]);
    }
    assert_eq!(ok(&s, &["get", "a", "--prefix"]), "a1\n1\na2\n2\n");
    assert_eq!(
        ok(&s, &["get", "a", "--prefix", "--keys-only"]),
        "a1\n\na2\n\n"
    );
    assert_eq!(ok(&s, &["get", "a", "--prefix", "--count-only"]), "2\n");
    assert_eq!(
        ok(
            &s,
            &[
                "get",
                "a",
                "--prefix",
                "--sort-by",
                "KEY",
                "--order",
                "DESCEND",
                "--limit",
                "1"
            ]
        ),
        "a2\n2\n"
    );
    assert_eq!(
        ok(&s, &["get", "a2", "--from-key", "--keys-only"]),
        "a2\n\nb1\n\n"
    );
    assert_eq!(ok(&s, &["get", "a1", "b"]), "a1\n1\na2\n2\n");
    assert_eq!(
        ok(&s, &["del", "a", "--prefix", "--prev-kv"]),
        "2\na1\n1\na2\n2\n"
    );
    assert_eq!(ok(&s, &["get", "a", "--prefix"]), "");
    let v = json(&ok(&s, &["del", "b1", "-w", "json"]));
    assert_eq!(v["deleted"], 1);
    assert_eq!(ok(&s, &["del", "nothing"]), "0\n");
}

#[test]
fn txn_from_stdin() {
    let s = start_server();
    ok(&s, &["put", "k1", "v1"]);
    let input = "mod(\"k1\") > \"0\"\nvalue(\"k1\") = \"v1\"\n\nput k1 v2\nget k1\ndel k9\n\nput k1 fail\n\n";
    let out = meshctl_stdin(&s, &["txn"], input);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "SUCCESS\n\nOK\n\nk1\nv2\n\n0\n");
    // Same compare now fails: the failure branch runs.
    let out = meshctl_stdin(&s, &["txn"], input);
    assert_eq!(text(&out.stdout), "FAILURE\n\nOK\n");
    assert_eq!(ok(&s, &["get", "k1", "--print-value-only"]), "fail\n");
    // Interactive prompts, JSON output.
    let out = meshctl_stdin(
        &s,
        &["txn", "-i", "-w", "json"],
        "version(\"k1\") = \"0\"\n\n\nget k1\n\n",
    );
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with(
            "compares:\nsuccess requests (get, put, del):\nfailure requests (get, put, del):\n"
        ),
        "{stdout}"
    );
    let v = json(stdout.lines().last().unwrap());
    assert!(v.get("succeeded").is_none(), "{v}");
    assert_eq!(
        v["responses"][0]["Response"]["ResponseRange"]["kvs"][0]["value"],
        "ZmFpbA=="
    );
    // Syntax errors are reported, nothing is sent.
    let out = meshctl_stdin(&s, &["txn"], "value(\"k1\") == \"x\"\n\nput k1 bad\n\n");
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.starts_with("Error: malformed comparison: value(\"k1\") == \"x\""),
        "{err}"
    );
    assert_eq!(err.matches("Error:").count(), 1, "{err}");
    assert_eq!(ok(&s, &["get", "k1", "--print-value-only"]), "fail\n");
}

#[test]
fn cas_exit_codes() {
    let s = start_server();
    assert_eq!(ok(&s, &["cas", "lock", "me", "--create"]), "OK\n");
    let out = meshctl(&s, &["cas", "lock", "you", "--create"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("compare failed"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        meshctl(&s, &["cas", "lock", "x", "--expect-value", "nope"])
            .status
            .code(),
        Some(3)
    );
    assert_eq!(
        ok(&s, &["cas", "lock", "you", "--expect-value", "me"]),
        "OK\n"
    );
    let rev = json(&ok(&s, &["get", "lock", "-w", "json"]))["kvs"][0]["mod_revision"]
        .as_i64()
        .unwrap();
    assert_eq!(
        meshctl(
            &s,
            &["cas", "lock", "z", "--expect-rev", &(rev - 1).to_string()]
        )
        .status
        .code(),
        Some(3)
    );
    assert_eq!(
        ok(&s, &["cas", "lock", "z", "--expect-rev", &rev.to_string()]),
        "OK\n"
    );
    assert_eq!(ok(&s, &["get", "lock", "--print-value-only"]), "z\n");
    // Exactly one expectation is required: a usage error.
    assert_eq!(meshctl(&s, &["cas", "lock", "z"]).status.code(), Some(2));
}

#[test]
fn watch_runs_command_per_event_and_exits_0_on_sigint() {
    let s = start_server();
    let rev = json(&ok(&s, &["put", "w/a", "one", "-w", "json"]))["header"]["revision"]
        .as_i64()
        .unwrap();
    ok(&s, &["put", "w/b", "two words"]);
    ok(&s, &["del", "w/a"]);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("events");
    let script = format!(
        "printf '%s|%s|%s|%s|%s|%s\\n' \"$MESHCTL_WATCH_REVISION\" \"$ETCD_WATCH_EVENT_TYPE\" \"$ETCD_WATCH_KEY\" \
         \"$ETCD_WATCH_VALUE\" \"$MESHCTL_WATCH_KEY\" \"$MESHCTL_WATCH_VALUE\" >> {}; \
         test \"$ETCD_WATCH_REVISION\" -ge \"$MESHCTL_WATCH_REVISION\" || echo bad-etcd-revision >> {}",
        log.display(),
        log.display()
    );
    let mut child = command(
        &s,
        &[
            "watch",
            "w/",
            "--prefix",
            "--rev",
            &rev.to_string(),
            "--",
            "sh",
            "-c",
            &script,
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let lines = wait_for_lines(&log, 3);
    assert_eq!(
        lines,
        vec![
            format!("{rev}|\"PUT\"|\"w/a\"|\"one\"|w/a|one"),
            format!("{}|\"PUT\"|\"w/b\"|\"two words\"|w/b|two words", rev + 1),
            format!("{}|\"DELETE\"|\"w/a\"|\"\"|w/a|", rev + 2),
        ]
    );
    // Live events too.
    ok(&s, &["put", "w/c", "live"]);
    assert_eq!(
        wait_for_lines(&log, 4)[3],
        format!("{}|\"PUT\"|\"w/c\"|\"live\"|w/c|live", rev + 3)
    );
    let status = Command::new("kill")
        .arg("-INT")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "watch must exit 0 on SIGINT");
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    assert!(
        stdout.starts_with("PUT\nw/a\none\nPUT\nw/b\ntwo words\nDELETE\nw/a\n\nPUT\nw/c\nlive\n"),
        "{stdout}"
    );
}

fn wait_for_lines(path: &Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let lines: Vec<String> = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {n} watch events arrived: {lines:?}",
            lines.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn endpoint_status_health_and_member_list() {
    let s = start_server();
    let status = ok(&s, &["endpoint", "status"]);
    let fields: Vec<&str> = status.trim_end_matches('\n').split(", ").collect();
    assert_eq!(fields.len(), 10, "{status}");
    assert_eq!(fields[0], s.endpoint);
    assert_eq!(fields[4], "true", "single member is the leader: {status}");
    assert_eq!(fields[5], "false");
    let v = json(&ok(&s, &["endpoint", "status", "-w", "json"]));
    assert_eq!(v[0]["Endpoint"], s.endpoint.as_str());
    assert!(v[0]["Status"]["raftIndex"].as_u64().unwrap() > 0);
    assert!(ok(&s, &["endpoint", "status", "-w", "table"]).contains("| RAFT APPLIED INDEX |"));
    let health = ok(&s, &["endpoint", "health"]);
    assert!(
        health.starts_with(&format!(
            "{} is healthy: successfully committed proposal: took = ",
            s.endpoint
        )),
        "{health}"
    );
    let members = ok(&s, &["member", "list"]);
    // etcd's peer URLs carry a scheme; meshd's are the mesh address as configured.
    let peer = members.split(", ").nth(3).unwrap();
    assert!(
        peer.trim_start_matches("http://") == format!("127.0.0.1:{}", peer_port_of(&members)),
        "{members}"
    );
    assert!(
        members.contains(", started, test, ")
            && members.ends_with(&format!(", http://{}, false\n", s.endpoint)),
        "{members}"
    );
    let v = json(&ok(&s, &["member", "list", "-w", "json"]));
    assert_eq!(v["members"][0]["name"], "test");
    assert!(ok(&s, &["endpoint", "status", "--cluster"])
        .starts_with(&format!("http://{}, ", s.endpoint)));
    // An unreachable endpoint makes health fail with exit 1.
    let dead = format!("127.0.0.1:{}", free_port());
    let out = Command::new(MESHCTL)
        .args([
            "--endpoints",
            &format!("{},{dead}", s.endpoint),
            "endpoint",
            "health",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).contains(&format!("{dead} is unhealthy")),
        "{}",
        text(&out.stdout)
    );
}

fn peer_port_of(member_line: &str) -> String {
    member_line
        .split(", ")
        .nth(3)
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn failover_past_a_dead_first_endpoint() {
    let s = start_server();
    let dead = format!("127.0.0.1:{}", free_port());
    let both = format!("{dead},{}", s.endpoint);
    let run = |args: &[&str]| {
        Command::new(MESHCTL)
            .arg("--endpoints")
            .arg(&both)
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["put", "fo", "x"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&run(&["get", "fo"]).stdout), "fo\nx\n");
    let out = Command::new(MESHCTL)
        .env("MESHCTL_ENDPOINTS", &both)
        .args(["get", "fo"])
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout), "fo\nx\n");
    // All dead: exit 1, one error line.
    let out = Command::new(MESHCTL)
        .args(["--endpoints", &dead, "get", "fo"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.starts_with(&format!("Error: cannot connect to {dead}")),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn compacted_revision_error_text_and_compact() {
    let s = start_server();
    ok(&s, &["put", "c", "1"]);
    ok(&s, &["put", "c", "2"]);
    let rev = json(&ok(&s, &["put", "c", "3", "-w", "json"]))["header"]["revision"]
        .as_i64()
        .unwrap();
    assert_eq!(
        ok(&s, &["compact", &rev.to_string(), "--physical"]),
        format!("compacted revision {rev}\n")
    );
    let out = meshctl(&s, &["get", "c", "--rev", "2"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "Error: etcdserver: mvcc: required revision has been compacted\n"
    );
}

#[test]
fn bench_json_and_broken_pipe_is_success() {
    let s = start_server();
    let out = ok(
        &s,
        &[
            "bench",
            "put",
            "--total",
            "1500",
            "--clients",
            "4",
            "--conns",
            "2",
            "--key-space-size",
            "1500",
            "--sequential-keys",
            "--val-size",
            "100",
            "-w",
            "json",
        ],
    );
    let v = json(&out);
    assert_eq!(v["succeeded"], 1500, "{v}");
    assert_eq!(v["errors"], 0);
    assert!(v["throughput_rps"].as_f64().unwrap() > 0.0);
    assert!(v["latency_ms"]["p99"].as_f64().unwrap() >= v["latency_ms"]["p50"].as_f64().unwrap());
    let v = json(&ok(
        &s,
        &[
            "bench",
            "get",
            "--total",
            "200",
            "--consistency",
            "s",
            "-w",
            "json",
        ],
    ));
    assert_eq!(v["succeeded"], 200, "{v}");
    // With --rate, request n is not sent before n/rate seconds: 60 requests at 300/s
    // cannot finish in less than 59/300 s however fast the server is.
    let v = json(&ok(
        &s,
        &[
            "bench",
            "put",
            "--total",
            "60",
            "--clients",
            "8",
            "--rate",
            "300",
            "-w",
            "json",
        ],
    ));
    assert_eq!(v["succeeded"], 60, "{v}");
    assert_eq!(v["rate"], 300, "{v}");
    assert!(v["elapsed_secs"].as_f64().unwrap() >= 59.0 / 300.0, "{v}");
    // ~165 kB of output into a pipe closed after the first line.
    let mut child = command(&s, &["get", "", "--prefix"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 16];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut first)
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "");
}

/// `bench` hands its connections out round-robin over `--endpoints`, as etcd's
/// benchmark does: with two separate servers as the endpoints and two connections,
/// each server gets writes.
#[test]
fn bench_spreads_connections_over_the_endpoints() {
    let (a, b) = (start_server(), start_server());
    let out = Command::new(MESHCTL)
        .arg("--endpoints")
        .arg(format!("{},{}", a.endpoint, b.endpoint))
        .args([
            "bench",
            "put",
            "--total",
            "200",
            "--clients",
            "2",
            "--conns",
            "2",
            "-w",
            "json",
            "--key-space-size",
            "1000",
            "--sequential-keys",
        ])
        .env_remove("MESHCTL_ENDPOINTS")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(json(&text(&out.stdout))["succeeded"], 200);
    let count = |s: &Server| {
        let v = json(&ok(
            s,
            &["get", "", "--prefix", "--count-only", "-w", "json"],
        ));
        v["count"].as_i64().unwrap_or(0)
    };
    let (na, nb) = (count(&a), count(&b));
    assert!(na > 0 && nb > 0, "writes per server: {na} and {nb}");
    assert_eq!(na + nb, 200);
}

#[test]
fn help_documents_exit_codes() {
    let out = Command::new(MESHCTL).arg("--help").output().unwrap();
    let help = text(&out.stdout);
    for line in ["3  compare failed", "4  key not found", "2  usage error"] {
        assert!(help.contains(line), "{help}");
    }
    assert_eq!(
        Command::new(MESHCTL)
            .arg("frobnicate")
            .output()
            .unwrap()
            .status
            .code(),
        Some(2)
    );
    let out = Command::new(MESHCTL)
        .args(["--timeout", "5", "get", "k"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        "Error: --timeout: invalid duration \"5\": missing unit (e.g. 5s, 500ms)\n"
    );
    let out = Command::new(MESHCTL)
        .args(["completion", "bash"])
        .output()
        .unwrap();
    assert!(text(&out.stdout).contains("meshctl"));
}

fn testing_etcd() -> bool {
    std::env::var("MESHCTL_TEST_SERVER").as_deref() == Ok("etcd")
}

#[test]
fn snapshot_save_status_restore_and_start_the_restored_member() {
    let s = start_server();
    for i in 0..30 {
        ok(&s, &["put", &format!("snap/{i:02}"), &format!("v{i}")]);
    }
    ok(&s, &["del", "snap/2", "--prefix"]);
    let rev = json(&ok(&s, &["get", "snap/00", "-w", "json"]))["header"]["revision"]
        .as_i64()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("backup.snap");
    let file_s = file.to_str().unwrap();
    assert_eq!(
        ok(&s, &["snapshot", "save", file_s]),
        format!("Snapshot saved at {file_s}\n")
    );
    assert!(!dir.path().join("backup.snap.part").exists());
    let size = std::fs::metadata(&file).unwrap().len();
    assert_eq!(size % 512, 32, "content + sha256 trailer");
    // The source's HashKV at the snapshot's revision; the restored member's must equal
    // it, whether the source is meshd or etcd (the same algorithm).
    let source_hash = ok(&s, &["endpoint", "hashkv", &format!("--rev={rev}")]);
    let source_hash = source_hash
        .trim_end()
        .rsplit_once(", ")
        .unwrap()
        .1
        .to_string();

    // meshctl reads the file as etcdctl does, field by field.
    let status = json(&ok(&s, &["snapshot", "status", file_s, "-w", "json"]));
    let etcdctl = Command::new("etcdctl")
        .args(["snapshot", "status", file_s, "-w", "json"])
        .output()
        .expect("etcdctl (installed by scripts/test)");
    assert!(etcdctl.status.success(), "{}", text(&etcdctl.stderr));
    let theirs = json(&text(&etcdctl.stdout));
    for field in ["hash", "revision", "totalKey", "totalSize"] {
        assert_eq!(
            status[field], theirs[field],
            "{field}: {status} vs {theirs}"
        );
    }
    assert_eq!(status["revision"], rev);
    assert_eq!(
        status["totalSize"],
        size - 32,
        "the database without its trailer"
    );
    let simple = ok(&s, &["snapshot", "status", file_s]);
    assert!(
        simple.starts_with(&format!(
            "{:x}, {rev}, {}, ",
            status["hash"].as_u64().unwrap(),
            status["totalKey"]
        )),
        "{simple}"
    );
    // The table's columns are as wide as their widest cell (the hash is printed
    // without leading zeros, as etcdctl prints it).
    let table = ok(&s, &["snapshot", "status", file_s, "-w", "table"]);
    let cells = |line: &str| -> Vec<String> {
        line.split('|')
            .map(|c| c.trim().to_string())
            .filter(|c| !c.is_empty())
            .collect()
    };
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        cells(lines[1]),
        ["HASH", "REVISION", "TOTAL KEYS", "TOTAL SIZE"],
        "{table}"
    );
    let row = cells(lines[3]);
    assert_eq!(
        row[..3],
        [
            format!("{:x}", status["hash"].as_u64().unwrap()),
            rev.to_string(),
            status["totalKey"].to_string()
        ],
        "{table}"
    );

    // A damaged copy is refused by status and restore.
    let bad = dir.path().join("bad.snap");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[20] ^= 1;
    std::fs::write(&bad, &bytes).unwrap();
    let out = meshctl(&s, &["snapshot", "status", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("checksum mismatch"),
        "{}",
        text(&out.stderr)
    );

    // Restore into a new single-member cluster and start it.
    let (client, mesh) = (free_port(), free_port());
    let data = dir.path().join("restored");
    let initial = format!("--initial-cluster=r=127.0.0.1:{mesh}");
    let restore = |data: &Path, file: &str| {
        meshctl(
            &s,
            &[
                "snapshot",
                "restore",
                file,
                "--data-dir",
                data.to_str().unwrap(),
                "--name=r",
                &initial,
                "--initial-cluster-token=restored",
            ],
        )
    };
    let out = restore(&data, bad.to_str().unwrap());
    assert_eq!(out.status.code(), Some(1));
    assert!(!data.exists(), "nothing created from a bad snapshot");
    let out = restore(&data, file_s);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with(&format!(
            "Restored snapshot {file_s} (revision {rev}) into "
        )),
        "{}",
        text(&out.stdout)
    );
    let out = restore(&data, file_s);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("not empty"),
        "{}",
        text(&out.stderr)
    );

    let meshd = Path::new(MESHCTL).with_file_name("meshd");
    let log = std::fs::File::create(dir.path().join("restored.log")).unwrap();
    let child = Command::new(meshd)
        .arg("--name=r")
        .arg(format!("--data-dir={}", data.display()))
        .arg(format!("--listen-client=127.0.0.1:{client}"))
        .arg(format!("--listen-mesh=127.0.0.1:{mesh}"))
        .arg("--listen-metrics=127.0.0.1:0")
        .arg(&initial)
        .arg("--initial-cluster-token=restored")
        .arg("--tick=20ms")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn meshd");
    let r = wait_healthy(Server {
        child,
        endpoint: format!("127.0.0.1:{client}"),
        _data: tempfile::tempdir().unwrap(),
    });
    assert_eq!(ok(&r, &["get", "snap/07", "--print-value-only"]), "v7\n");
    assert_eq!(
        ok(&r, &["get", "snap/2", "--prefix", "--count-only"]),
        "0\n"
    );
    let hash = ok(&r, &["endpoint", "hashkv", &format!("--rev={rev}")]);
    assert_eq!(hash, format!("{}, {source_hash}\n", r.endpoint));
}

#[test]
fn hashkv_defrag_alarm_and_move_leader_texts() {
    let s = start_server();
    ok(&s, &["put", "a", "1"]);
    let hash = ok(&s, &["endpoint", "hashkv"]);
    let (ep, h) = hash.trim_end().rsplit_once(", ").unwrap();
    assert_eq!(ep, s.endpoint);
    assert!(h.parse::<u32>().is_ok(), "{hash}");
    let table = ok(&s, &["endpoint", "hashkv", "-w", "table"]);
    assert!(
        table.contains("ENDPOINT") && table.contains("HASH") && table.contains(&format!(" {h} ")),
        "{table}"
    );
    let j = json(&ok(&s, &["endpoint", "hashkv", "-w", "json"]));
    assert_eq!(j[0]["Endpoint"], s.endpoint);
    assert_eq!(j[0]["HashKV"]["hash"].to_string(), h);

    assert_eq!(
        ok(&s, &["defrag"]),
        format!("Finished defragmenting etcd member[{}]\n", s.endpoint)
    );
    assert_eq!(ok(&s, &["alarm", "list"]), "");
    assert_eq!(ok(&s, &["alarm", "disarm"]), "");

    let out = meshctl(&s, &["move-leader", "ffff"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("etcdserver: bad leader transferee"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(meshctl(&s, &["move-leader", "xyz"]).status.code(), Some(2));
}

/// meshd only (etcd's quota is a start flag of its own; the texts are checked above):
/// scripts/test skips `meshd_only_` tests when it runs this suite against etcd.
#[test]
fn meshd_only_nospace_alarm_end_to_end() {
    assert!(!testing_etcd(), "a meshd-only test run against etcd");
    // The database holds the Raft log too: keep it short so deleting data frees space.
    let s = start_meshd_with(&[
        "--quota-backend-bytes=4194304",
        "--snapshot-count=100",
        "--catch-up-entries=10",
    ]);
    let member = json(&ok(&s, &["endpoint", "status", "-w", "json"]))[0]["Status"]["header"]
        ["member_id"]
        .as_u64()
        .unwrap();
    let line = format!("memberID:{member} alarm:NOSPACE \n");
    // Fill the store until the member raises the alarm.
    let deadline = Instant::now() + Duration::from_secs(60);
    while ok(&s, &["alarm", "list"]) != line {
        assert!(Instant::now() < deadline, "no NOSPACE alarm");
        let _ = meshctl(
            &s,
            &[
                "bench",
                "put",
                "--total=200",
                "--val-size=16384",
                "--key-space-size=100000",
                "--sequential-keys",
                "--key-size=6",
            ],
        );
    }
    let out = meshctl(&s, &["put", "more", "data"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "Error: etcdserver: mvcc: database space exceeded\n"
    );
    assert!(ok(&s, &["get", "0", "--from-key", "--count-only"]).trim() != "0");

    ok(&s, &["del", "0", "--from-key"]);
    let rev = json(&ok(&s, &["get", "x", "-w", "json"]))["header"]["revision"]
        .as_i64()
        .unwrap();
    ok(&s, &["compact", &rev.to_string(), "--physical"]);
    ok(&s, &["defrag"]);
    assert_eq!(ok(&s, &["alarm", "disarm"]), line);
    assert_eq!(ok(&s, &["put", "more", "data"]), "OK\n");
    assert_eq!(
        ok(&s, &["alarm", "list"]),
        "",
        "{}",
        ok(&s, &["endpoint", "status"])
    );
}

#[test]
fn member_add_remove_and_safety_checks() {
    let s = start_server();
    let addr = format!("http://127.0.0.1:{}", free_port());
    let added = ok(
        &s,
        &["member", "add", "extra", "--mesh-addr", &addr, "--learner"],
    );
    let first = added.lines().next().unwrap();
    assert!(
        first.starts_with("Member ") && first.contains(" added to cluster "),
        "{added}"
    );
    assert!(added.contains("\n\nMESHD_NAME=\"extra\"\n"), "{added}");
    let id = first.split_whitespace().nth(1).unwrap().to_string();
    let list = ok(&s, &["member", "list"]);
    let row = list
        .lines()
        .find(|l| l.starts_with(&id))
        .expect("new member listed");
    assert!(row.contains("unstarted") && row.ends_with("true"), "{row}");
    // Promoting a learner that never started (it has not caught up) is refused.
    let out = meshctl(&s, &["member", "promote", &id]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr)
            .contains("can only promote a learner member which is in sync with leader"),
        "{}",
        text(&out.stderr)
    );
    let removed = ok(&s, &["member", "remove", &id]);
    // etcdctl pads IDs to 16 columns (`%16x`).
    let words: Vec<&str> = removed.split_whitespace().collect();
    assert_eq!(
        words[..5],
        ["Member", id.as_str(), "removed", "from", "cluster"],
        "{removed}"
    );
    let out = meshctl(&s, &["member", "remove", &id]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("member not found"),
        "{}",
        text(&out.stderr)
    );
}

/// meshd only (etcd has no mesh).
#[test]
fn meshd_only_mesh_peers_status_and_counters() {
    assert!(!testing_etcd(), "a meshd-only test run against etcd");
    let s = start_server();
    let peers = ok(&s, &["mesh", "peers"]);
    let me = peers.lines().next().unwrap();
    assert!(
        me.contains("*, test, ") && me.ends_with(", self, voter"),
        "{peers}"
    );
    let status = ok(&s, &["mesh", "status"]);
    assert!(
        status.contains("channels: raft, raft-snapshot, join, counters, hashkv"),
        "{status}"
    );
    assert!(status.contains("encryption: off"), "{status}");
    let j = json(&ok(&s, &["-w", "json", "mesh", "peers"]));
    assert_eq!(j["peers"][0]["role"], "voter");
    assert_eq!(ok(&s, &["counter", "incr", "jobs"]), "1\n");
    assert_eq!(ok(&s, &["counter", "incr", "jobs", "5"]), "6\n");
    assert_eq!(ok(&s, &["counter", "incr", "jobs", "-2"]), "4\n");
    assert_eq!(ok(&s, &["counter", "get", "jobs"]), "4\n");
    assert_eq!(ok(&s, &["counter", "get", "never"]), "0\n");
    let out = meshctl(&s, &["counter", "get", ""]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("counter name is empty"));
}

/// A long-running meshctl whose stdout lines are collected as they arrive.
struct Running {
    child: Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// Collects stdout into `lines`; `finish` waits for it, so every line printed before
    /// the exit is there (the child can exit before this thread has read its last line).
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    fn spawn(server: &Server, args: &[&str]) -> Running {
        let mut child = command(server, args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                sink.lock().unwrap().push(line);
            }
        });
        Running {
            child,
            lines,
            reader: Some(reader),
        }
    }

    /// Waits until at least `n` lines were printed; returns all of them.
    fn wait_lines(&self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let lines = self.lines.lock().unwrap().clone();
            if lines.len() >= n {
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {n} lines arrived: {lines:?}",
                lines.len()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Exit code after `sig`; stderr for messages.
    fn stop(mut self, sig: &str) -> (Option<i32>, String) {
        self.signal(sig);
        self.finish()
    }

    fn finish(&mut self) -> (Option<i32>, String) {
        let status = self.child.wait().unwrap();
        if let Some(reader) = self.reader.take() {
            // The pipe closes with the child, unless a command it ran still holds it:
            // wait a while for the last lines, not forever.
            let deadline = Instant::now() + Duration::from_secs(10);
            while !reader.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            e.read_to_string(&mut err).unwrap();
        }
        (status.code(), err)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `n` keys start with `prefix`; returns them, oldest first.
fn wait_keys(s: &Server, prefix: &str, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let args = [
        "get",
        prefix,
        "--prefix",
        "--keys-only",
        "--sort-by",
        "CREATE",
    ];
    loop {
        let keys: Vec<String> = ok(s, &args)
            .lines()
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        if keys.len() == n {
            return keys;
        }
        assert!(
            Instant::now() < deadline,
            "expected {n} keys under {prefix}, have {keys:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn lease_commands_print_like_etcdctl() {
    let s = start_server();
    let granted = ok(&s, &["lease", "grant", "60"]);
    let id = granted
        .strip_prefix("lease ")
        .and_then(|r| r.strip_suffix(" granted with TTL(60s)\n"))
        .unwrap_or_else(|| panic!("grant output: {granted:?}"))
        .to_string();
    assert_eq!(id.len(), 16, "IDs print as 16 hex digits: {id}");
    assert_eq!(ok(&s, &["put", "leased", "v", "--lease", &id]), "OK\n");
    let ttl = ok(&s, &["lease", "timetolive", &id, "--keys"]);
    let prefix = format!("lease {id} granted with TTL(60s), remaining(");
    assert!(
        ttl.starts_with(&prefix) && ttl.ends_with("s), attached keys([leased])\n"),
        "{ttl}"
    );
    assert_eq!(
        ok(&s, &["lease", "keep-alive", "--once", &id]),
        format!("lease {id} keepalived with TTL(60)\n")
    );
    let list = ok(&s, &["lease", "list"]);
    assert!(
        list.starts_with("found 1 leases\n") && list.contains(&format!("\n{id}\n")),
        "{list}"
    );
    let v = json(&ok(&s, &["lease", "grant", "30", "-w", "json"]));
    assert_eq!(v["TTL"], 30);
    assert!(v["ID"].as_i64().unwrap() > 0 && v["revision"].as_i64().unwrap() > 0);
    let v = json(&ok(
        &s,
        &["lease", "timetolive", &id, "--keys", "-w", "json"],
    ));
    assert_eq!(v["granted-ttl"], 60);
    assert_eq!(v["keys"][0], "bGVhc2Vk");

    // keep-alive without --once refreshes every third of the TTL and stops, with
    // etcdctl's line, once the lease is revoked.
    let short = ok(&s, &["lease", "grant", "3"]);
    let short = short.split(' ').nth(1).unwrap().to_string();
    let mut keeper = Running::spawn(&s, &["lease", "keep-alive", &short]);
    let refreshed = format!("lease {short} keepalived with TTL(3)");
    assert_eq!(keeper.wait_lines(2)[..2], [refreshed.clone(), refreshed]);
    ok(&s, &["lease", "revoke", &short]);
    let (code, err) = keeper.finish();
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        keeper.lines.lock().unwrap().last().unwrap(),
        &format!("lease {short} expired or revoked.")
    );
    assert_eq!(
        ok(&s, &["lease", "revoke", &id]),
        format!("lease {id} revoked\n")
    );
    assert_eq!(ok(&s, &["get", "leased"]), "");
    assert_eq!(
        ok(&s, &["lease", "timetolive", &id]),
        format!("lease {id} already expired\n")
    );
    for args in [
        vec!["lease", "keep-alive", "--once", id.as_str()],
        vec!["lease", "revoke", id.as_str()],
        vec!["put", "k", "v", "--lease", id.as_str()],
    ] {
        let out = meshctl(&s, &args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert_eq!(
            text(&out.stderr),
            "Error: etcdserver: requested lease not found\n",
            "{args:?}"
        );
    }
}

#[test]
fn lock_excludes_holds_and_passes_on_the_command_status() {
    let s = start_server();
    let dir = tempfile::tempdir().unwrap();
    let ran = dir.path().join("ran");

    // A holder without a command prints the key (and its empty value) and holds.
    let holder = Running::spawn(&s, &["lock", "L"]);
    let lines = holder.wait_lines(2);
    assert!(
        lines[0].starts_with("L/") && lines[1].is_empty(),
        "{lines:?}"
    );
    let script = format!(
        "echo \"$ETCD_LOCK_KEY $ETCD_LOCK_REV\" > {}; exit 7",
        ran.display()
    );
    let mut waiter = Running::spawn(&s, &["lock", "L", "--", "sh", "-c", &script]);
    // The waiter's key exists behind the holder's, yet its command has not run.
    let keys = wait_keys(&s, "L/", 2);
    assert_eq!(keys[0], lines[0]);
    assert!(!ran.exists(), "the command ran while the lock was held");

    let (code, err) = holder.stop("TERM");
    assert_eq!(code, Some(0), "{err}");
    let (code, err) = waiter.finish();
    assert_eq!(
        code,
        Some(7),
        "meshctl exits with the command's status: {err}"
    );
    let env = std::fs::read_to_string(&ran).unwrap();
    let (key, rev) = env.trim().split_once(' ').unwrap();
    assert_eq!(key, keys[1]);
    assert!(rev.parse::<i64>().unwrap() > 0);
    wait_keys(&s, "L/", 0);

    // SIGTERM reaches the command; the lock is released when it exits.
    let trapped = dir.path().join("trapped");
    let script = format!(
        "trap 'echo term >> {0}; exit 5' TERM; echo ready >> {0}; while :; do sleep 0.05; done",
        trapped.display()
    );
    let runner = Running::spawn(&s, &["lock", "L", "--", "sh", "-c", &script]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&trapped)
        .unwrap_or_default()
        .contains("ready")
    {
        assert!(Instant::now() < deadline, "the command never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, err) = runner.stop("TERM");
    assert_eq!(code, Some(5), "{err}");
    assert_eq!(std::fs::read_to_string(&trapped).unwrap(), "ready\nterm\n");
    wait_keys(&s, "L/", 0);
}

#[test]
fn elect_campaigns_hands_over_and_listen_prints_every_leader() {
    let s = start_server();
    let out = meshctl(&s, &["elect", "E"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));

    let listener = Running::spawn(&s, &["elect", "--listen", "E"]);
    let first = Running::spawn(&s, &["elect", "E", "p1"]);
    let won = first.wait_lines(2);
    assert!(won[0].starts_with("E/") && won[1] == "p1", "{won:?}");
    let second = Running::spawn(&s, &["elect", "E", "p2"]);
    let keys = wait_keys(&s, "E/", 2);
    assert_eq!(keys[0], won[0]);

    let (code, err) = first.stop("INT");
    assert_eq!(code, Some(0), "{err}");
    let won2 = second.wait_lines(2);
    assert_eq!(won2, vec![keys[1].clone(), "p2".to_string()]);
    assert_eq!(
        listener.wait_lines(4),
        vec![won[0].clone(), "p1".into(), keys[1].clone(), "p2".into()]
    );
    let (code, err) = second.stop("INT");
    assert_eq!(code, Some(0), "{err}");
    wait_keys(&s, "E/", 0);
    let (code, err) = listener.stop("INT");
    assert_eq!(code, Some(0), "{err}");
}

#[test]
fn bench_txn_put_lease_keepalive_watch_fanout_and_availability() {
    let s = start_server();
    let v = json(&ok(
        &s,
        &[
            "-w",
            "json",
            "bench",
            "txn-put",
            "--total",
            "200",
            "--clients",
            "4",
        ],
    ));
    assert_eq!(
        (v["operation"].as_str(), v["succeeded"].as_u64()),
        (Some("txn-put"), Some(200)),
        "{v}"
    );
    let v = json(&ok(
        &s,
        &[
            "-w",
            "json",
            "bench",
            "lease-keepalive",
            "--total",
            "300",
            "--clients",
            "3",
        ],
    ));
    assert_eq!(v["succeeded"], 300, "{v}");
    assert_eq!(v["errors"], 0, "{v}");
    // 50 watchers x 20 puts: every event delivered to every watcher.
    let v = json(&ok(
        &s,
        &[
            "-w",
            "json",
            "bench",
            "watch",
            "--watchers",
            "50",
            "--conns",
            "2",
            "--total",
            "20",
        ],
    ));
    assert_eq!(v["succeeded"], 1000, "{v}");
    assert!(v["latency_ms"]["max"].as_f64().unwrap() > 0.0, "{v}");
    let v = json(&ok(
        &s,
        &[
            "-w",
            "json",
            "bench",
            "availability",
            "--duration",
            "300ms",
            "--interval",
            "10ms",
        ],
    ));
    assert!(v["succeeded"].as_u64().unwrap() > 5, "{v}");
    assert_eq!(v["failed"], 0, "{v}");
    assert!(v["max_gap_ms"].as_f64().unwrap() > 0.0, "{v}");
}

/// A range answer larger than gRPC's default 4 MiB message limit arrives whole, as
/// with etcdctl (whose client takes up to 2 GiB).
#[test]
fn a_range_answer_over_four_mib_is_received() {
    let s = start_server();
    let value = "v".repeat(1_000_000);
    for i in 0..5 {
        let out = meshctl_stdin(&s, &["put", &format!("big/{i}")], &value);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let all = ok(&s, &["get", "big/", "--prefix", "--print-value-only"]);
    assert_eq!(
        all.len(),
        5 * (value.len() + 1),
        "five values, one per line"
    );
    let j = json(&ok(&s, &["get", "big/", "--prefix", "-w", "json"]));
    assert_eq!(j["count"], 5);
}
