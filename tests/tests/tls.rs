//! TLS on the client API, with certificates made at test time: the etcd-client crate,
//! meshctl and Debian's etcdctl 3.4 over TLS with client-certificate authentication;
//! plaintext clients and clients without a certificate are refused; members forward
//! to the leader over TLS, presenting their own certificate.

use std::net::SocketAddr;
use std::time::Duration;

use mesh_tests::*;

/// Waits until every member answers over TLS and all agree on a leader.
async fn tls_leader(certs: &TestCerts, addrs: &[SocketAddr]) -> u64 {
    eventually("a leader over TLS", Duration::from_secs(20), || async {
        let mut leaders = Vec::new();
        for a in addrs {
            let mut c = certs.etcd_client(*a, true).await;
            leaders.push(c.status().await.ok()?.leader());
        }
        (leaders[0] != 0 && leaders.iter().all(|l| *l == leaders[0])).then_some(leaders[0])
    })
    .await
}

fn meshctl(certs: &TestCerts, addr: SocketAddr, with_cert: bool, args: &[&str]) -> (bool, String) {
    let mut cmd = std::process::Command::new(binary("meshctl"));
    cmd.arg(format!("--endpoints={addr}"))
        .arg(format!("--cacert={}", certs.ca.display()))
        .arg("--dial-timeout=2s");
    if with_cert {
        cmd.arg(format!("--cert={}", certs.client_cert.display()))
            .arg(format!("--key={}", certs.client_key.display()));
    }
    let out = cmd.args(args).output().expect("run meshctl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn etcdctl(certs: &TestCerts, addr: SocketAddr, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints=https://{addr}"))
        .arg(format!("--cacert={}", certs.ca.display()))
        .arg(format!("--cert={}", certs.client_cert.display()))
        .arg(format!("--key={}", certs.client_key.display()))
        .arg("--command-timeout=10s")
        .args(args)
        .output()
        .expect("etcdctl is installed (apt-get install etcd-client)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_certificate_auth_with_three_members() {
    let certs = TestCerts::generate();
    let opts = ClusterOpts {
        client_tls: Some(certs.server_tls(true)),
        ..Default::default()
    };
    let cluster = InProcessCluster::start(3, opts).await;
    let addrs = cluster.live_addrs();
    let leader = tls_leader(&certs, &addrs).await;

    // Members advertise https client URLs.
    let mut c = certs.etcd_client(addrs[0], true).await;
    let members = c.member_list().await.unwrap();
    for m in members.members() {
        assert!(
            m.client_urls().iter().all(|u| u.starts_with("https://")),
            "{:?}",
            m.client_urls()
        );
    }

    // etcd-client with a client certificate.
    c.put("tls/a", "1", None).await.unwrap();
    let got = c.get("tls/a", None).await.unwrap();
    assert_eq!(got.kvs()[0].value(), b"1");

    // A follower forwards lease TimeToLive to the leader over TLS with its own cert.
    let follower = (0..3)
        .find(|&i| cluster.servers[i].as_ref().unwrap().node().status.member_id != leader)
        .unwrap();
    let mut f = certs.etcd_client(addrs[follower], true).await;
    let lease = f.lease_grant(60, None).await.unwrap().id();
    let ttl = f.lease_time_to_live(lease, None).await.unwrap();
    assert_eq!(ttl.id(), lease);
    assert!(ttl.ttl() > 0 && ttl.ttl() <= 60, "ttl {}", ttl.ttl());

    // Without a client certificate: refused.
    let mut no_cert = certs.etcd_client(addrs[0], false).await;
    assert!(no_cert.get("tls/a", None).await.is_err());
    // Plaintext: refused.
    let mut plain = etcd_client(addrs[0]).await;
    assert!(plain.get("tls/a", None).await.is_err());

    // meshctl with --cacert/--cert/--key; without --cert it is refused.
    let (okay, out) = meshctl(&certs, addrs[1], true, &["put", "tls/b", "2"]);
    assert!(okay, "{out}");
    assert_eq!(out, "OK\n");
    let (okay, out) = meshctl(&certs, addrs[2], true, &["get", "tls/b"]);
    assert!(okay, "{out}");
    assert_eq!(out, "tls/b\n2\n");
    let (okay, out) = meshctl(&certs, addrs[2], false, &["get", "tls/b"]);
    assert!(!okay, "{out}");

    // Debian's etcdctl 3.4.
    let (okay, out) = etcdctl(&certs, addrs[0], &["put", "tls/c", "3"]);
    assert!(okay, "{out}");
    assert_eq!(out, "OK\n");
    let (okay, out) = etcdctl(&certs, addrs[1], &["get", "tls/", "--prefix"]);
    assert!(okay, "{out}");
    assert_eq!(out, "tls/a\n1\ntls/b\n2\ntls/c\n3\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_tls_without_client_certificates() {
    let certs = TestCerts::generate();
    let opts = ClusterOpts {
        client_tls: Some(certs.server_tls(false)),
        ..Default::default()
    };
    let cluster = InProcessCluster::start(1, opts).await;
    let addr = cluster.addr(0);
    tls_leader(&certs, &[addr]).await;
    // No client certificate needed, but the server must be verified with the CA.
    let (okay, out) = meshctl(&certs, addr, false, &["put", "k", "v"]);
    assert!(okay, "{out}");
    let mut c = certs.etcd_client(addr, false).await;
    assert_eq!(c.get("k", None).await.unwrap().kvs()[0].value(), b"v");
    // A plaintext client is refused.
    let mut plain = etcd_client(addr).await;
    assert!(plain.get("k", None).await.is_err());
    let out = std::process::Command::new(binary("meshctl"))
        .arg(format!("--endpoints=http://{addr}"))
        .args(["get", "k"])
        .output()
        .unwrap();
    assert!(!out.status.success());

    // TLS and auth together: meshctl sets up root and enables auth; locksmith then
    // needs --user as well as --cacert.
    for args in [
        &["user", "add", "root:pw"][..],
        &["role", "add", "root"],
        &["user", "grant-role", "root", "root"],
        &["auth", "enable"],
    ] {
        let (okay, out) = meshctl(&certs, addr, false, args);
        assert!(okay, "{args:?}: {out}");
    }
    let locksmith = |extra: &[&str]| {
        let out = std::process::Command::new(binary("locksmith"))
            .arg(format!("--endpoints={addr}"))
            .arg(format!("--cacert={}", certs.ca.display()))
            .args(extra)
            .arg("status")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (okay, out, err) = locksmith(&["--user=root:pw"]);
    assert!(okay, "{err}");
    assert_eq!(out, "Available: 1\nMax: 1\n");
    let (okay, _, err) = locksmith(&[]);
    assert!(!okay);
    assert!(err.contains("etcdserver: user name is empty"), "{err}");
}

#[test]
fn meshd_refuses_half_a_tls_configuration() {
    let certs = TestCerts::generate();
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(binary("meshd"))
        .arg(format!("--data-dir={}", dir.path().join("d").display()))
        .arg(format!("--cert-file={}", certs.server_cert.display()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--cert-file and --key-file must be given together"),
        "{err}"
    );
    let out = std::process::Command::new(binary("meshd"))
        .arg(format!("--data-dir={}", dir.path().join("d").display()))
        .arg(format!("--cert-file={}", certs.server_cert.display()))
        .arg(format!(
            "--key-file={}",
            dir.path().join("missing.pem").display()
        ))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot read key file"), "{err}");
}

/// A node that is not a member yet serves its client port by forwarding to a member:
/// with TLS it terminates the client's TLS and dials the member with TLS, presenting
/// its own certificate under client-certificate auth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_member_proxy_forwards_over_tls() {
    let certs = TestCerts::generate();
    let tls = certs.meshd_flags(true);
    // The member keeps autopilot off, so the second node stays a non-member proxy.
    let c = ProcessCluster::start_with(2, ClusterOpts::default(), |i, mesh| {
        let mut flags = tls.clone();
        if i == 0 {
            flags.push(format!("--initial-cluster=p0={}", mesh[0]));
            flags.push("--autopilot=false".into());
        } else {
            flags.push(format!("--peer={}", mesh[0]));
        }
        flags
    });
    let addrs = c.addrs();
    tls_leader(&certs, &addrs[..1]).await;
    eventually(
        "a put through the proxy",
        Duration::from_secs(20),
        || async {
            let (okay, _) = meshctl(&certs, addrs[1], true, &["put", "via/proxy", "1"]);
            okay.then_some(())
        },
    )
    .await;
    let (okay, out) = meshctl(&certs, addrs[0], true, &["get", "via/proxy"]);
    assert!(okay, "{out}");
    assert_eq!(out, "via/proxy\n1\n");
    // The node is still not a member: it really was the proxy that answered.
    let (okay, out) = meshctl(&certs, addrs[0], true, &["member", "list"]);
    assert!(okay, "{out}");
    assert_eq!(out.matches(", started, ").count(), 1, "{out}");
    assert!(out.contains(", mesh-only, p1, "), "{out}");
    // Without a client certificate the proxy refuses the TLS handshake.
    let (okay, out) = meshctl(&certs, addrs[1], false, &["get", "via/proxy"]);
    assert!(!okay, "{out}");
    drop(c);
}
