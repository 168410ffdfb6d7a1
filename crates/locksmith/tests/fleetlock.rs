//! `locksmith fleetlock` end to end: the FleetLock protocol driven with curl (as an
//! operator or Zincati would send it) against a server over a real meshd cluster; many
//! clients through two servers never exceeding `max` while the cluster's leader is
//! killed; and `locksmith daemon --strategy fleetlock` over HTTPS with a bearer token.
mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use locksmith::fleetlock::client::{ClientError, FleetLockClient};
use locksmith::fleetlock::ClientParams;
use mesh_tests::eventually;

/// A running `locksmith fleetlock` (killed when dropped) and where it listens.
struct FleetLockServer {
    _child: tokio::process::Child,
    addr: SocketAddr,
}

/// Starts `locksmith fleetlock` against `endpoints` with `args`; waits until
/// `/-/healthy` answers 200.
async fn start(endpoints: &[SocketAddr], args: &[&str]) -> FleetLockServer {
    let addr = mesh_tests::free_addr();
    let child = command(endpoints)
        .args(["fleetlock", &format!("--listen={addr}")])
        .args(args)
        .spawn()
        .expect("spawn locksmith fleetlock");
    if !args.iter().any(|a| a.starts_with("--cert-file")) {
        eventually(
            "the FleetLock server is healthy",
            Duration::from_secs(20),
            || async { (mesh_tests::http_get(addr, "/-/healthy").await?.0 == 200).then_some(()) },
        )
        .await;
    }
    FleetLockServer {
        _child: child,
        addr,
    }
}

/// A malformed request and its answer: method, path, protocol header, body, status,
/// error kind.
type Refused<'a> = (&'a str, &'a str, Option<&'a str>, &'a str, u16, &'a str);

fn body(id: &str, group: &str) -> String {
    format!(r#"{{"client_params":{{"id":"{id}","group":"{group}"}}}}"#)
}

/// `curl -X METHOD` with the protocol header (unless `header` is None) and `data`;
/// returns the status code and the body.
async fn curl(
    addr: SocketAddr,
    method: &str,
    path: &str,
    header: Option<&str>,
    data: &str,
) -> (u16, String) {
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(["-sS", "-X", method, "-w", "\n%{http_code}"]);
    if let Some(h) = header {
        cmd.args(["-H", &format!("fleet-lock-protocol: {h}")]);
    }
    cmd.args(["--data-binary", data, &format!("http://{addr}{path}")]);
    let out = cmd
        .output()
        .await
        .expect("curl (installed by scripts/test)");
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (answer, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), answer.to_string())
}

async fn lock(addr: SocketAddr, id: &str, group: &str) -> (u16, String) {
    curl(
        addr,
        "POST",
        "/v1/pre-reboot",
        Some("true"),
        &body(id, group),
    )
    .await
}

async fn unlock(addr: SocketAddr, id: &str, group: &str) -> (u16, String) {
    curl(
        addr,
        "POST",
        "/v1/steady-state",
        Some("true"),
        &body(id, group),
    )
    .await
}

fn kind(answer: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(answer).unwrap_or_else(|e| panic!("not a JSON error ({e}): {answer}"));
    assert!(
        v["value"].as_str().is_some_and(|s| !s.is_empty()),
        "a non-empty value: {answer}"
    );
    v["kind"].as_str().expect("a kind").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleetlock_protocol_over_http_on_the_shared_semaphore() {
    let c = cluster(1).await;
    let a = c.addrs();
    let s = start(&a, &["--groups=default=2,workers"]).await;
    let at = s.addr;

    // RecursiveLock: a holder locking again succeeds; others up to max.
    assert_eq!(lock(at, "a", "default").await.0, 200);
    assert_eq!(lock(at, "a", "default").await.0, 200);
    assert_eq!(lock(at, "b", "default").await.0, 200);
    let (code, answer) = lock(at, "c", "default").await;
    assert_eq!(
        (code, kind(&answer).as_str()),
        (409, "failed_lock_semaphore_full")
    );
    // The same semaphore as locksmith's: `default` is the default group.
    let st = locksmith(&a, &["status"]).await;
    assert_eq!(stdout(&st), "Available: 0\nMax: 2\n\nMACHINE ID\na\nb\n");

    // UnlockIfHeld: a non-holder's unlock succeeds and changes nothing.
    assert_eq!(unlock(at, "c", "default").await.0, 200);
    assert_eq!(holders(&a).await, ["a", "b"]);
    assert_eq!(unlock(at, "a", "default").await.0, 200);
    assert_eq!(unlock(at, "a", "default").await.0, 200, "not held any more");
    assert_eq!(holders(&a).await, ["b"]);
    assert_eq!(lock(at, "c", "default").await.0, 200);

    // Another group is locksmith's group of that name, with its own max (1).
    assert_eq!(lock(at, "w1", "workers").await.0, 200);
    assert_eq!(lock(at, "w2", "workers").await.0, 409);
    let st = locksmith(&a, &["--group", "workers", "status", "-w", "json"]).await;
    assert_eq!(
        stdout(&st),
        "{\"semaphore\":0,\"max\":1,\"holders\":[\"w1\"]}\n"
    );

    // Malformed requests: each refused with its kind; nothing changes.
    let d = body("d", "default");
    let refused: [Refused; 9] = [
        (
            "POST",
            "/v1/pre-reboot",
            None,
            &d,
            400,
            "missing_fleet_lock_protocol_header",
        ),
        (
            "POST",
            "/v1/pre-reboot",
            Some("false"),
            &d,
            400,
            "missing_fleet_lock_protocol_header",
        ),
        (
            "POST",
            "/v1/pre-reboot",
            Some("true"),
            r#"{"client_params":{}}"#,
            400,
            "invalid_body",
        ),
        (
            "POST",
            "/v1/pre-reboot",
            Some("true"),
            "not json",
            400,
            "invalid_body",
        ),
        (
            "POST",
            "/v1/pre-reboot",
            Some("true"),
            &body("", "default"),
            400,
            "invalid_body",
        ),
        (
            "POST",
            "/v1/pre-reboot",
            Some("true"),
            &body("d", "web servers"),
            400,
            "invalid_group",
        ),
        (
            "POST",
            "/v1/steady-state",
            Some("true"),
            &body("d", "other"),
            400,
            "unknown_group",
        ),
        (
            "GET",
            "/v1/pre-reboot",
            Some("true"),
            "",
            405,
            "method_not_allowed",
        ),
        ("POST", "/v1/reboot", Some("true"), &d, 404, "not_found"),
    ];
    for (method, path, header, data, want_code, want_kind) in refused {
        let (code, answer) = curl(at, method, path, header, data).await;
        assert_eq!(
            (code, kind(&answer).as_str()),
            (want_code, want_kind),
            "{answer}"
        );
    }
    assert_eq!(holders(&a).await, ["b", "c"]);

    // Health and metrics.
    assert_eq!(mesh_tests::http_get(at, "/-/healthy").await.unwrap().0, 200);
    let (code, metrics) = mesh_tests::http_get(at, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    for line in [
        r#"locksmith_fleetlock_requests_total{endpoint="pre-reboot",outcome="ok"} 5"#,
        r#"locksmith_fleetlock_requests_total{endpoint="pre-reboot",outcome="failed_lock_semaphore_full"} 2"#,
        r#"locksmith_fleetlock_requests_total{endpoint="steady-state",outcome="ok"} 3"#,
        r#"locksmith_fleetlock_requests_total{endpoint="steady-state",outcome="unknown_group"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleetlock_clients_never_exceed_max_while_the_leader_is_killed() {
    const CLIENTS: usize = 8;
    const CYCLES: usize = 3;
    const MAX: usize = 2;
    let mut c = cluster(3).await;
    let a = c.addrs();
    // Two servers, each reaching the cluster through a different member first.
    let mut rotated = a.clone();
    rotated.rotate_left(1);
    let servers = [
        start(&a, &[&format!("--groups=default={MAX}")]).await,
        start(&rotated, &[]).await,
    ];
    let inside = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for n in 0..CLIENTS {
        let url = format!("http://{}", servers[n % 2].addr);
        let (inside, most, done) = (inside.clone(), most.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let client = FleetLockClient::new(&url, None, None, Duration::from_secs(10)).unwrap();
            let me = ClientParams {
                id: format!("node-{n}"),
                group: "default".into(),
            };
            for _ in 0..CYCLES {
                while let Err(e) = client.pre_reboot(&me).await {
                    if let ClientError::Refused { status, kind, .. } = &e {
                        assert!(
                            *status == 409 && kind == "failed_lock_semaphore_full"
                                || *status == 503,
                            "{e}"
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
                while client.steady_state(&me).await.is_err() {
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }

    // A quarter of the way through, kill the leader; restart it once others lead.
    eventually("clients make progress", Duration::from_secs(60), || async {
        (done.load(Ordering::SeqCst) >= CLIENTS * CYCLES / 4).then_some(())
    })
    .await;
    let (idx, leader) = kill_leader(&mut c).await;
    assert!(
        tasks.iter().any(|t| !t.is_finished()),
        "the leader was killed while clients were still cycling"
    );
    restart_after_failover(&mut c, idx, leader).await;

    for (n, t) in tasks.into_iter().enumerate() {
        tokio::time::timeout(Duration::from_secs(180), t)
            .await
            .unwrap_or_else(|_| panic!("client {n} did not finish"))
            .unwrap();
    }
    assert_eq!(done.load(Ordering::SeqCst), CLIENTS * CYCLES);
    let most = most.load(Ordering::SeqCst);
    assert!(
        most <= MAX,
        "{most} clients held a slot at once (max {MAX})"
    );
    assert!(most >= 1);
    let st = locksmith(&a, &["status"]).await;
    assert_eq!(stdout(&st), format!("Available: {MAX}\nMax: {MAX}\n"));
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_reboots_through_a_fleetlock_server_over_https_with_a_token() {
    let c = cluster(1).await;
    let a = c.addrs();
    let certs = mesh_tests::TestCerts::generate();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    write(&token, "s3cret-token\n");
    let s = start(
        &a,
        &[
            &format!("--cert-file={}", certs.server_cert.display()),
            &format!("--key-file={}", certs.server_key.display()),
            &format!("--token-file={}", token.display()),
        ],
    )
    .await;
    let url = format!("https://localhost:{}", s.addr.port());
    let me = ClientParams {
        id: "probe".into(),
        group: "default".into(),
    };
    // Without the token, or with another: refused as unauthorized.
    let client = eventually(
        "the HTTPS server answers",
        Duration::from_secs(20),
        || async {
            let c =
                FleetLockClient::new(&url, Some(&certs.ca), None, Duration::from_secs(5)).unwrap();
            match c.steady_state(&me).await {
                Err(ClientError::Refused { status, .. }) => Some((c, status)),
                _ => None,
            }
        },
    )
    .await;
    assert_eq!(client.1, 401);
    let wrong = FleetLockClient::new(
        &url,
        Some(&certs.ca),
        Some("guess".into()),
        Duration::from_secs(5),
    )
    .unwrap();
    assert!(matches!(
        wrong.pre_reboot(&me).await,
        Err(ClientError::Refused { status: 401, ref kind, .. }) if kind == "unauthorized"
    ));
    // A server certificate the client does not trust: no answer at all.
    let untrusted = FleetLockClient::new(
        &url,
        None,
        Some("s3cret-token".into()),
        Duration::from_secs(5),
    )
    .unwrap();
    assert!(matches!(
        untrusted.pre_reboot(&me).await,
        Err(ClientError::Unreachable { .. })
    ));

    // The daemon, with no cluster access of its own: the slot from before its reboot
    // is released at start, and a needed reboot takes the slot first.
    put_raw(&a, KEY, r#"{"semaphore":0,"max":1,"holders":["dnode"]}"#).await;
    let need = dir.path().join("need-reboot");
    let marker = dir.path().join("rebooted");
    let log = dir.path().join("daemon.log");
    let daemon = || {
        let mut cmd = command(&["127.0.0.1:9".parse().unwrap()]);
        cmd.args([
            "--id",
            "dnode",
            "daemon",
            "--strategy=fleetlock",
            &format!("--fleetlock-url={url}"),
            &format!("--fleetlock-cacert={}", certs.ca.display()),
            &format!("--fleetlock-token-file={}", token.display()),
            "--poll-interval=100ms",
            &format!("--need-reboot-file={}", need.display()),
            &format!("--reboot-command=touch {}", marker.display()),
        ])
        .env("LOCKSMITH_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap());
        cmd.spawn().unwrap()
    };
    let mut d = daemon();
    eventually(
        "the daemon releases its old slot",
        Duration::from_secs(20),
        || async { holders(&a).await.is_empty().then_some(()) },
    )
    .await;
    // Another machine takes the only slot; the daemon must wait for it.
    assert!(locksmith(&a, &["lock", "other"]).await.status.success());
    write(&need, "");
    eventually(
        "the daemon is refused a slot",
        Duration::from_secs(20),
        || async {
            std::fs::read_to_string(&log)
                .ok()?
                .contains("failed_lock_semaphore_full")
                .then_some(())
        },
    )
    .await;
    assert!(
        !marker.exists(),
        "no reboot while another machine holds the slot"
    );
    assert!(locksmith(&a, &["unlock", "other"]).await.status.success());
    eventually(
        "the daemon takes the slot and reboots",
        Duration::from_secs(30),
        || async { marker.exists().then_some(()) },
    )
    .await;
    assert_eq!(holders(&a).await, ["dnode"], "held across the reboot");
    assert!(terminate(&mut d).await.success());
    drop(s);
}
