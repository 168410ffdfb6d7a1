//! End-to-end: the `locksmith` binary against a spawned single-member meshd. Covers
//! CoreOS's JSON format, exit codes, `run` releasing on failure and on SIGTERM, and the
//! daemon's release-at-start and need-reboot paths.
mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use mesh_tests::eventually;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locksmith_reads_and_writes_coreos_format_with_documented_exit_codes() {
    let c = cluster(1).await;
    let a = c.addrs();

    // First use creates max 1, in CoreOS's compact layout.
    let st = locksmith(&a, &["status"]).await;
    assert!(st.status.success());
    assert_eq!(stdout(&st), "Available: 1\nMax: 1\n");
    assert_eq!(
        raw(&a, KEY).await.unwrap(),
        r#"{"semaphore":1,"max":1,"holders":[]}"#
    );

    // A semaphore written by hand the way CoreOS locksmith writes it.
    put_raw(
        &a,
        KEY,
        r#"{"semaphore": 1, "max": 2, "holders": ["zeta"]}"#,
    )
    .await;
    let o = locksmith(&a, &["lock", "alpha"]).await;
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(
        raw(&a, KEY).await.unwrap(),
        r#"{"semaphore":0,"max":2,"holders":["alpha","zeta"]}"#
    );
    let st = locksmith(&a, &["status"]).await;
    assert_eq!(
        stdout(&st),
        "Available: 0\nMax: 2\n\nMACHINE ID\nalpha\nzeta\n"
    );
    let st = locksmith(&a, &["status", "-w", "json"]).await;
    assert_eq!(
        stdout(&st),
        "{\"semaphore\":0,\"max\":2,\"holders\":[\"alpha\",\"zeta\"]}\n"
    );

    // Full: exit 3 without waiting, and after a wait timeout.
    let o = locksmith(&a, &["lock", "--id", "beta"]).await;
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr(&o).contains("no free slot"), "{}", stderr(&o));
    let o = locksmith(&a, &["acquire", "beta", "--wait", "--timeout", "500ms"]).await;
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr(&o).contains("timed out after"), "{}", stderr(&o));
    // Locking again by a holder is an idempotent success.
    let o = locksmith(&a, &["lock", "alpha"]).await;
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains("already held"));
    // Unlock by a non-holder: exit 4, nothing written.
    let o = locksmith(&a, &["release", "beta"]).await;
    assert_eq!(o.status.code(), Some(4));
    assert!(stderr(&o).contains("\"beta\" does not hold the lock"));
    // Usage errors: exit 2.
    assert_eq!(
        locksmith(&a, &["lock", "x", "--timeout", "1s"])
            .await
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        locksmith(&a, &["set-max", "-1"]).await.status.code(),
        Some(2)
    );

    // set-max below the holder count: free slots go negative, locks wait.
    let o = locksmith(&a, &["set-max", "1"]).await;
    assert_eq!(stdout(&o), "Old-Max: 2\nMax: 1\n");
    assert_eq!(
        raw(&a, KEY).await.unwrap(),
        r#"{"semaphore":-1,"max":1,"holders":["alpha","zeta"]}"#
    );
    assert!(locksmith(&a, &["unlock", "zeta"]).await.status.success());
    assert_eq!(
        locksmith(&a, &["lock", "beta"]).await.status.code(),
        Some(3)
    );
    assert!(locksmith(&a, &["unlock", "alpha"]).await.status.success());
    assert!(locksmith(&a, &["lock", "beta"]).await.status.success());

    // An inconsistent value is reported and never rewritten.
    let bad = r#"{"semaphore":5,"max":2,"holders":[]}"#;
    put_raw(&a, KEY, bad).await;
    for args in [&["lock", "gamma"][..], &["unlock", "beta"], &["status"]] {
        let o = locksmith(&a, args).await;
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert!(
            stderr(&o).contains("inconsistent semaphore"),
            "{}",
            stderr(&o)
        );
    }
    put_raw(&a, KEY, "{not json").await;
    let o = locksmith(&a, &["lock", "gamma"]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("invalid semaphore JSON"),
        "{}",
        stderr(&o)
    );
    assert_eq!(raw(&a, KEY).await.unwrap(), "{not json");

    // Groups get their own key, query-escaped.
    assert!(locksmith(&a, &["--group", "web eu", "lock", "m1"])
        .await
        .status
        .success());
    assert_eq!(
        raw(
            &a,
            "coreos.com/updateengine/rebootlock/groups/web+eu/semaphore"
        )
        .await
        .unwrap(),
        r#"{"semaphore":0,"max":1,"holders":["m1"]}"#
    );
    let mut cmd = command(&a);
    cmd.env("LOCKSMITH_GROUP", "web eu")
        .args(["status", "-w", "json"]);
    let o = cmd.output().await.unwrap();
    assert_eq!(
        stdout(&o),
        "{\"semaphore\":0,\"max\":1,\"holders\":[\"m1\"]}\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locksmith_run_releases_when_the_command_fails_or_is_signalled() {
    let c = cluster(1).await;
    let a = c.addrs();
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("seen");

    // The command sees itself holding the lock, fails, and the lock is released.
    let script = format!("{LOCKSMITH} status -w json > {}; exit 7", seen.display());
    let o = locksmith(&a, &["run", "--id", "r1", "--", "sh", "-c", &script]).await;
    assert_eq!(o.status.code(), Some(7));
    assert_eq!(
        std::fs::read_to_string(&seen).unwrap(),
        "{\"semaphore\":0,\"max\":1,\"holders\":[\"r1\"]}\n"
    );
    assert!(holders(&a).await.is_empty());

    // A command that cannot be started: 127, lock released.
    let o = locksmith(&a, &["run", "--id", "r1", "--", "/nonexistent/cmd"]).await;
    assert_eq!(o.status.code(), Some(127));
    assert!(holders(&a).await.is_empty());

    // SIGTERM to locksmith: passed on to the command, lock released, exit 128+15.
    let started = dir.path().join("started");
    let script = format!("touch {} && exec sleep 30", started.display());
    let mut child = command(&a)
        .args(["run", "--id", "r2", "--", "sh", "-c", &script])
        .spawn()
        .unwrap();
    eventually(
        "the command runs holding the lock",
        Duration::from_secs(20),
        || async { (started.exists() && holders(&a).await == ["r2"]).then_some(()) },
    )
    .await;
    assert_eq!(terminate(&mut child).await.code(), Some(143));
    assert!(holders(&a).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locksmith_reboot_keeps_the_slot_unless_the_reboot_command_fails() {
    let c = cluster(1).await;
    let a = c.addrs();
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("rebooted");

    // A failing reboot command: error, and the slot is given back.
    let o = locksmith(&a, &["--id", "m1", "reboot", "--reboot-command", "exit 3"]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("reboot command \"exit 3\" failed"),
        "{}",
        stderr(&o)
    );
    assert!(holders(&a).await.is_empty());

    // Another machine holds the only slot: reboot waits (here: until its timeout).
    assert!(locksmith(&a, &["lock", "m2"]).await.status.success());
    let touch = format!("touch {}", marker.display());
    let o = locksmith(
        &a,
        &[
            "--id",
            "m1",
            "reboot",
            "--timeout",
            "300ms",
            "--reboot-command",
            &touch,
        ],
    )
    .await;
    assert_eq!(o.status.code(), Some(3));
    assert!(!marker.exists());

    // Once free, it takes the slot, reboots, and keeps the slot across the reboot.
    assert!(locksmith(&a, &["unlock", "m2"]).await.status.success());
    let mut cmd = command(&a);
    cmd.env("LOCKSMITH_ID", "m1")
        .env("LOCKSMITH_REBOOT_COMMAND", &touch);
    let o = tokio::time::timeout(Duration::from_secs(60), cmd.arg("reboot").output())
        .await
        .unwrap()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(marker.exists());
    assert_eq!(holders(&a).await, ["m1"]);
}

fn log_contains(path: &Path, needle: &str) -> bool {
    std::fs::read_to_string(path).is_ok_and(|s| s.contains(needle))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locksmith_daemon_releases_at_start_and_reboots_when_needed_inside_the_window() {
    let c = cluster(1).await;
    let a = c.addrs();
    let dir = tempfile::tempdir().unwrap();
    let need = dir.path().join("run/need-reboot");
    let marker = dir.path().join("rebooted");
    let log = dir.path().join("daemon.log");

    // This machine still holds a slot from before its reboot.
    put_raw(
        &a,
        KEY,
        r#"{"semaphore":0,"max":2,"holders":["dmachine","other"]}"#,
    )
    .await;

    // A daily window that is open now (started a minute ago, lasts two hours).
    let now = locksmith::window::LocalTime::now();
    let start = (now.secs_of_day / 60 + 24 * 60 - 1) % (24 * 60);
    let window_start = format!("{:02}:{:02}", start / 60, start % 60);
    let mut daemon = command(&a)
        .args([
            "--id",
            "dmachine",
            "daemon",
            "--poll-interval=100ms",
            &format!("--need-reboot-file={}", need.display()),
            &format!("--reboot-command=touch {}", marker.display()),
            &format!("--window-start={window_start}"),
            "--window-length=2h",
        ])
        .env("LOCKSMITH_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();

    eventually(
        "the daemon releases the old slot",
        Duration::from_secs(20),
        || async { (holders(&a).await == ["other"]).then_some(()) },
    )
    .await;

    // Now only one slot, held by another machine: the daemon must wait for it.
    assert!(locksmith(&a, &["set-max", "1"]).await.status.success());
    let need_arg = format!("--need-reboot-file={}", need.display());
    assert!(locksmith(&a, &["send-need-reboot", &need_arg])
        .await
        .status
        .success());
    assert!(need.exists());
    eventually(
        "the daemon waits for a free slot",
        Duration::from_secs(20),
        || async { log_contains(&log, "no free slot").then_some(()) },
    )
    .await;
    assert!(
        !marker.exists(),
        "no reboot while another machine holds the slot"
    );
    assert_eq!(holders(&a).await, ["other"]);

    assert!(locksmith(&a, &["unlock", "other"]).await.status.success());
    eventually(
        "the daemon takes the slot and reboots",
        Duration::from_secs(20),
        || async { marker.exists().then_some(()) },
    )
    .await;
    assert_eq!(
        holders(&a).await,
        ["dmachine"],
        "the slot is held across the reboot"
    );

    // SIGTERM stops it cleanly; the slot stays for the next start to release.
    let status = terminate(&mut daemon).await;
    assert!(status.success(), "{status:?}");
    assert_eq!(holders(&a).await, ["dmachine"]);

    // "After the reboot": the next start releases it.
    std::fs::remove_file(&need).unwrap();
    let mut daemon = command(&a)
        .args([
            "--id",
            "dmachine",
            "daemon",
            "--poll-interval=100ms",
            &need_arg,
        ])
        .spawn()
        .unwrap();
    eventually(
        "the restarted daemon releases the slot",
        Duration::from_secs(20),
        || async { holders(&a).await.is_empty().then_some(()) },
    )
    .await;
    daemon.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locksmith_lock_wait_wakes_on_a_change_not_on_its_backoff() {
    let c = cluster(1).await;
    let a = c.addrs();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("waiter.log");
    assert!(locksmith(&a, &["lock", "alpha"]).await.status.success());

    // A backoff of 10 minutes: only the watch can wake it within the deadline below.
    let mut waiter = command(&a)
        .args([
            "lock",
            "--wait",
            "--backoff-min=10m",
            "--backoff-max=10m",
            "beta",
        ])
        .env("LOCKSMITH_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    eventually("the waiter is waiting", Duration::from_secs(20), || async {
        log_contains(&log, "no free slot").then_some(())
    })
    .await;
    assert_eq!(holders(&a).await, ["alpha"]);

    assert!(locksmith(&a, &["unlock", "alpha"]).await.status.success());
    let status = tokio::time::timeout(Duration::from_secs(60), waiter.wait())
        .await
        .expect("the waiter wakes on the change long before its 10m backoff")
        .unwrap();
    assert!(status.success());
    assert_eq!(holders(&a).await, ["beta"]);
}
