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

    // Compaction (answered once this member has removed what it frees), then etcd's
    // error for a compacted revision.
    let j = ok(&one, &["get", "fruit/apple", "-w", "json"]).await;
    let v: serde_json::Value = serde_json::from_str(&j).unwrap();
    let rev = v["header"]["revision"].as_i64().unwrap();
    assert_eq!(
        ok(&one, &["compaction", "--physical", &rev.to_string()]).await,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_3_4_maintenance_commands() {
    use mesh_core::proto::etcdserverpb::{alarm_request::AlarmAction, AlarmRequest, AlarmType};

    let c = InProcessCluster::start(3, ClusterOpts::default()).await;
    let all = c.live_addrs();
    let leader = wait_for_leader(&all).await;
    let one = [c.addr(0)];
    for i in 0..20 {
        assert_eq!(ok(&all, &["put", &format!("m/{i}"), "v"]).await, "OK\n");
    }
    let v: serde_json::Value =
        serde_json::from_str(&ok(&one, &["get", "m/0", "-w", "json"]).await).unwrap();
    let rev = v["header"]["revision"].as_i64().unwrap();

    // Every member has applied `rev` once it answers a linearizable read; then HashKV
    // at that revision is the same everywhere.
    for a in &all {
        ok(&[*a], &["get", "m/19"]).await;
    }
    let hashes = ok(&all, &["endpoint", "hashkv", &format!("--rev={rev}")]).await;
    let lines: Vec<&str> = hashes.lines().collect();
    assert_eq!(lines.len(), 3, "{hashes}");
    let hash_of = |l: &str| l.rsplit_once(", ").unwrap().1.to_string();
    for (l, a) in lines.iter().zip(&all) {
        assert!(l.starts_with(&format!("{a}, ")), "{hashes}");
        assert_eq!(hash_of(l), hash_of(lines[0]), "{hashes}");
    }

    // Snapshot: etcdctl streams it and writes the file; its content is ours.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s.db");
    let file_s = file.to_str().unwrap();
    assert_eq!(
        ok(&one, &["snapshot", "save", file_s]).await,
        format!("Snapshot saved at {file_s}\n")
    );
    let bytes = std::fs::read(&file).unwrap();
    let snap = mesh_core::snapshot::decode(&bytes).unwrap();
    assert_eq!(snap.revision, rev);
    // etcdctl's own reading of the file is meshctl's, field by field.
    let status = mesh_core::snapshot::status(&bytes).unwrap();
    let theirs: serde_json::Value =
        serde_json::from_str(&ok(&one, &["snapshot", "status", file_s, "-w", "json"]).await)
            .unwrap();
    assert_eq!(theirs["hash"], status.hash, "{theirs}");
    assert_eq!(theirs["revision"], status.revision, "{theirs}");
    assert_eq!(theirs["totalKey"], status.total_key, "{theirs}");
    assert_eq!(theirs["totalSize"], status.total_size, "{theirs}");

    // Alarms: none, then one raised through the API blocks puts until disarmed.
    assert_eq!(ok(&one, &["alarm", "list"]).await, "");
    let mut client = etcd_client(c.addr(1)).await;
    let raise = AlarmRequest {
        action: AlarmAction::Activate as i32,
        member_id: 77,
        alarm: AlarmType::Nospace as i32,
    };
    let mc = mesh_core::client::Client::connect(mesh_core::client::ClientConfig {
        endpoints: vec![c.addr(1).to_string()],
        ..Default::default()
    })
    .unwrap();
    mc.alarm(raise).await.unwrap();
    assert_eq!(
        ok(&one, &["alarm", "list"]).await,
        "memberID:77 alarm:NOSPACE \n"
    );
    let (success, _, err) = etcdctl(&one, &["put", "m/x", "y"], "").await;
    assert!(!success);
    assert!(
        err.contains("etcdserver: mvcc: database space exceeded"),
        "{err}"
    );
    assert!(client.get("m/0", None).await.is_ok(), "reads still served");
    let status = ok(&one, &["endpoint", "status"]).await;
    assert!(status.contains("memberID:77 alarm:NOSPACE"), "{status}");
    assert_eq!(
        ok(&one, &["alarm", "disarm"]).await,
        "memberID:77 alarm:NOSPACE \n"
    );
    assert_eq!(ok(&one, &["alarm", "list"]).await, "");
    assert_eq!(ok(&one, &["put", "m/x", "y"]).await, "OK\n");

    // Defragment every member.
    let defrag = ok(&all, &["defrag"]).await;
    let expected: String = all
        .iter()
        .map(|a| format!("Finished defragmenting etcd member[{a}]\n"))
        .collect();
    assert_eq!(defrag, expected);

    // Move leadership to a follower.
    let target = (0..3)
        .map(|i| c.servers[i].as_ref().unwrap().node().status.member_id)
        .find(|id| *id != leader)
        .unwrap();
    assert_eq!(
        ok(&all, &["move-leader", &format!("{target:x}")]).await,
        format!("Leadership transferred from {leader:x} to {target:x}\n")
    );
    assert_eq!(wait_for_leader(&all).await, target);
}

/// Keys under `prefix`, oldest first, read through etcd-client.
async fn keys_under(addr: SocketAddr, prefix: &str) -> Vec<String> {
    let mut c = etcd_client(addr).await;
    let sort = (
        etcd_client::SortTarget::Create,
        etcd_client::SortOrder::Ascend,
    );
    let opts = etcd_client::GetOptions::new()
        .with_prefix()
        .with_keys_only()
        .with_sort(sort.0, sort.1);
    let r = c.get(prefix, Some(opts)).await.unwrap();
    r.kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect()
}

async fn wait_keys(addr: SocketAddr, prefix: &str, n: usize) -> Vec<String> {
    eventually(
        &format!("{n} keys under {prefix}"),
        Duration::from_secs(20),
        || async move {
            let keys = keys_under(addr, prefix).await;
            (keys.len() == n).then_some(keys)
        },
    )
    .await
}

/// The first stdout line of a spawned process. The rest of its output is read (and
/// dropped) in the background: closing the pipe would make its next write fail.
async fn first_line(child: &mut tokio::process::Child) -> String {
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("output in time")
        .unwrap()
        .expect("a line");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    first
}

fn signal(child: &tokio::process::Child, sig: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().unwrap().to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

/// `holder` takes the lock `shared` and prints its key; `waiter`, started after it,
/// must wait until the holder is stopped with `sig`, then run its command.
async fn lock_excludes(f: SocketAddr, mut holder: Command, mut waiter: Command, sig: &str) {
    let mut held = holder.spawn().unwrap();
    let key = first_line(&mut held).await;
    assert!(key.starts_with("shared/"), "{key}");
    let mut waiting = waiter.spawn().unwrap();
    let keys = wait_keys(f, "shared/", 2).await;
    assert_eq!(keys[0], key, "the holder's key is the oldest");
    assert!(
        waiting.try_wait().unwrap().is_none(),
        "{waiter:?} took a lock {holder:?} holds"
    );
    signal(&held, sig);
    let _ = held.wait().await;
    let out = tokio::time::timeout(Duration::from_secs(20), waiting.wait_with_output())
        .await
        .expect("the waiter gets the lock once the holder lets go")
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "took-it\n");
    wait_keys(f, "shared/", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_3_4_leases_and_locks() {
    let c = InProcessCluster::start(3, ClusterOpts::default()).await;
    let all = c.live_addrs();
    let leader = wait_for_leader(&all).await;
    // A follower: lease requests there take the replicated / forwarded paths.
    let f = c.addr((c.index_of(leader) + 1) % 3);
    let one = [f];

    let granted = ok(&one, &["lease", "grant", "60"]).await;
    let id = granted
        .strip_prefix("lease ")
        .and_then(|r| r.strip_suffix(" granted with TTL(60s)\n"))
        .unwrap_or_else(|| panic!("{granted:?}"))
        .to_string();
    assert_eq!(
        ok(&one, &["put", "--lease", &id, "leased", "v"]).await,
        "OK\n"
    );
    let ttl = ok(&one, &["lease", "timetolive", "--keys", &id]).await;
    assert!(
        ttl.starts_with(&format!("lease {id} granted with TTL(60s), remaining("))
            && ttl.ends_with("s), attached keys([leased])\n"),
        "{ttl}"
    );
    assert_eq!(
        ok(&one, &["lease", "keep-alive", "--once", &id]).await,
        format!("lease {id} keepalived with TTL(60)\n")
    );
    assert_eq!(
        ok(&all, &["lease", "list"]).await,
        format!("found 1 leases\n{id}\n")
    );
    assert_eq!(
        ok(&one, &["lease", "revoke", &id]).await,
        format!("lease {id} revoked\n")
    );
    assert_eq!(ok(&one, &["get", "leased"]).await, "");
    assert_eq!(
        ok(&one, &["lease", "timetolive", &id]).await,
        format!("lease {id} already expired\n")
    );
    let (success, _, err) = etcdctl(&one, &["put", "--lease", &id, "k", "v"], "").await;
    assert!(!success);
    assert!(
        err.contains("etcdserver: requested lease not found"),
        "{err}"
    );

    // etcdctl lock with a command: the command runs holding NAME/<lease hex>.
    let out = ok(
        &one,
        &["lock", "solo", "--", "sh", "-c", "echo $ETCD_LOCK_KEY"],
    )
    .await;
    assert!(
        out.starts_with("solo/") && out.len() > "solo/\n".len(),
        "{out}"
    );
    wait_keys(f, "solo/", 0).await;

    // A lock held by meshctl excludes etcdctl's, and the other way round.
    let meshctl = |args: &[&str]| {
        let mut cmd = Command::new(binary("meshctl"));
        cmd.arg(format!("--endpoints={}", c.addr(0)))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        cmd
    };
    let holder = meshctl(&["lock", "shared"]);
    let waiter = etcdctl_cmd(&one, &["lock", "shared", "--", "echo", "took-it"]);
    lock_excludes(f, holder, waiter, "TERM").await;
    let holder = etcdctl_cmd(&one, &["lock", "shared"]);
    let waiter = meshctl(&["lock", "shared", "--", "echo", "took-it"]);
    lock_excludes(f, holder, waiter, "INT").await;
}

/// meshctl against the same endpoints, for comparing its output with etcdctl's.
fn meshctl(endpoints: &[SocketAddr], args: &[&str]) -> (bool, String, String) {
    let eps = endpoints
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let out = std::process::Command::new(binary("meshctl"))
        .arg(format!("--endpoints={eps}"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_3_4_auth_commands() {
    let c = InProcessCluster::start(1, ClusterOpts::default()).await;
    let ep = [c.addr(0)];
    wait_for_leader(&ep).await;

    let (success, out, err) = etcdctl(
        &ep,
        &["user", "add", "root", "--interactive=false"],
        "rootpw\n",
    )
    .await;
    assert!(success, "{err}");
    assert_eq!(out, "User root created\n");
    assert_eq!(
        ok(&ep, &["user", "add", "alice:alicepw"]).await,
        "User alice created\n"
    );
    assert_eq!(
        ok(&ep, &["role", "add", "reader"]).await,
        "Role reader created\n"
    );
    for args in [
        &[
            "role",
            "grant-permission",
            "reader",
            "read",
            "--prefix",
            "pub/",
        ][..],
        &[
            "role",
            "grant-permission",
            "reader",
            "readwrite",
            "alice/todo",
        ],
        &["role", "grant-permission", "reader", "write", "a", "c"],
        &[
            "role",
            "grant-permission",
            "reader",
            "read",
            "--from-key",
            "x",
        ],
    ] {
        assert_eq!(ok(&ep, args).await, "Role reader updated\n");
    }
    let role = "Role reader\nKV Read:\n\talice/todo\n\t[pub/, pub0) (prefix pub/)\n\t[x, <open ended>\nKV Write:\n\t[a, c)\n\talice/todo\n";
    assert_eq!(ok(&ep, &["role", "get", "reader"]).await, role);
    assert_eq!(
        ok(&ep, &["user", "grant-role", "alice", "reader"]).await,
        "Role reader is granted to user alice\n"
    );
    assert_eq!(
        ok(&ep, &["user", "get", "alice"]).await,
        "User: alice\nRoles: reader\n"
    );
    assert_eq!(ok(&ep, &["user", "list"]).await, "alice\nroot\n");
    assert_eq!(ok(&ep, &["role", "list"]).await, "reader\n");
    // meshctl prints the same as etcdctl.
    for args in [
        &["role", "get", "reader"][..],
        &["user", "get", "alice"],
        &["user", "get", "alice", "--detail"],
        &["user", "list"],
        &["role", "list"],
    ] {
        let (success, mine, err) = meshctl(&ep, args);
        assert!(success, "meshctl {args:?}: {err}");
        assert_eq!(mine, ok(&ep, args).await, "meshctl {args:?}");
    }

    // etcdctl adds the root role to root on auth enable, as it does against etcd.
    assert_eq!(
        ok(&ep, &["auth", "enable"]).await,
        "Authentication Enabled\n"
    );
    let (success, _, err) = etcdctl(&ep, &["get", "pub/x"], "").await;
    assert!(!success);
    assert!(err.contains("etcdserver: user name is empty"), "{err}");
    assert_eq!(
        ok(&ep, &["--user=root:rootpw", "put", "pub/x", "1"]).await,
        "OK\n"
    );
    assert_eq!(
        ok(&ep, &["--user=alice:alicepw", "get", "pub/x"]).await,
        "pub/x\n1\n"
    );
    let (success, _, err) = etcdctl(&ep, &["--user=alice:alicepw", "put", "pub/x", "2"], "").await;
    assert!(!success);
    assert!(err.contains("etcdserver: permission denied"), "{err}");
    let (success, _, err) = etcdctl(&ep, &["--user=alice:wrong", "get", "pub/x"], "").await;
    assert!(!success);
    assert!(
        err.contains("etcdserver: authentication failed, invalid user ID or password"),
        "{err}"
    );
    let (success, _, err) = etcdctl(&ep, &["--user=alice:alicepw", "user", "list"], "").await;
    assert!(!success);
    assert!(err.contains("etcdserver: permission denied"), "{err}");
    let (success, out, err) = meshctl(&ep, &["--user=alice:alicepw", "get", "pub/x"]);
    assert!(success, "{err}");
    assert_eq!(out, "pub/x\n1\n");
    assert_eq!(
        ok(&ep, &["--user=root:rootpw", "user", "get", "root"]).await,
        "User: root\nRoles: root\n"
    );
    let (success, out, err) = meshctl(&ep, &["auth", "status"]);
    assert!(success, "{err}");
    assert!(
        out.starts_with("Authentication Status: true\nAuthRevision: "),
        "{out}"
    );

    let r = ["--user=root:rootpw"];
    let with_root = |args: &[&'static str]| [&r[..], args].concat();
    assert_eq!(
        ok(
            &ep,
            &with_root(&["role", "revoke-permission", "reader", "alice/todo"])
        )
        .await,
        "Permission of key alice/todo is revoked from role reader\n"
    );
    assert_eq!(
        ok(
            &ep,
            &with_root(&["role", "revoke-permission", "reader", "a", "c"])
        )
        .await,
        "Permission of range [a, c) is revoked from role reader\n"
    );
    let (success, _, err) = etcdctl(
        &ep,
        &with_root(&["role", "revoke-permission", "reader", "a", "c"]),
        "",
    )
    .await;
    assert!(!success);
    assert!(
        err.contains("etcdserver: permission is not granted to the role"),
        "{err}"
    );
    let (success, out, err) = etcdctl(
        &ep,
        &with_root(&["user", "passwd", "alice", "--interactive=false"]),
        "newpw\n",
    )
    .await;
    assert!(success, "{err}");
    assert_eq!(out, "Password updated\n");
    assert_eq!(
        ok(
            &ep,
            &["--user=alice:newpw", "get", "pub/x", "--print-value-only"]
        )
        .await,
        "1\n"
    );
    assert_eq!(
        ok(&ep, &with_root(&["user", "revoke-role", "alice", "reader"])).await,
        "Role reader is revoked from user alice\n"
    );
    assert_eq!(
        ok(&ep, &with_root(&["role", "delete", "reader"])).await,
        "Role reader deleted\n"
    );
    assert_eq!(
        ok(&ep, &with_root(&["user", "delete", "alice"])).await,
        "User alice deleted\n"
    );
    let (success, _, err) = etcdctl(&ep, &with_root(&["user", "delete", "root"]), "").await;
    assert!(!success);
    assert!(err.contains("etcdserver: invalid auth management"), "{err}");
    assert_eq!(
        ok(&ep, &with_root(&["auth", "disable"])).await,
        "Authentication Disabled\n"
    );
    assert_eq!(
        ok(&ep, &["get", "pub/x", "--print-value-only"]).await,
        "1\n"
    );
}
