//! etcd's Auth service through the etcd-client crate on a three-member cluster: users,
//! roles and key-range permissions enforced with etcd's errors, the enable/disable
//! lifecycle, invalid and expired tokens, passwords stored hashed, and the auth store
//! surviving a restart and reaching a lagging member by snapshot.

use std::net::SocketAddr;
use std::time::Duration;

use etcd_client::{ConnectOptions, GetOptions, Permission};
use mesh_core::proto::meshpb::{
    fault_injection_client::FaultInjectionClient, ClearFaultsRequest, SetLinkFaultRequest,
};
use mesh_tests::*;
use tonic::Code;

/// Asserts that `r` failed with gRPC `code` and etcd's `message`.
fn assert_status<T: std::fmt::Debug>(r: Result<T, etcd_client::Error>, code: Code, message: &str) {
    match r {
        Err(etcd_client::Error::GRpcStatus(s)) => {
            assert_eq!((s.code(), s.message()), (code, message), "{s:?}");
        }
        other => panic!("expected {code:?} {message:?}, got {other:?}"),
    }
}

async fn as_user(addr: SocketAddr, name: &str, password: &str) -> etcd_client::Client {
    let opts = ConnectOptions::new()
        .with_timeout(Duration::from_secs(5))
        .with_connect_timeout(Duration::from_secs(2))
        .with_user(name, password);
    etcd_client::Client::connect([format!("http://{addr}")], Some(opts))
        .await
        .expect("authenticates")
}

/// root (with the root role), alice (read on `pub/`, readwrite on `alice/`), then
/// auth enable.
async fn set_up_auth(addr: SocketAddr) {
    let mut c = etcd_client(addr).await;
    c.user_add("root", "root-secret", None).await.unwrap();
    // Enabling needs the root role on root, with etcd's error before.
    assert_status(
        c.auth_enable().await,
        Code::FailedPrecondition,
        "etcdserver: root user does not have root role",
    );
    c.role_add("root").await.unwrap();
    c.user_grant_role("root", "root").await.unwrap();
    c.user_add("alice", "alice-secret", None).await.unwrap();
    c.role_add("reader").await.unwrap();
    c.role_grant_permission("reader", Permission::read("pub/").with_prefix())
        .await
        .unwrap();
    c.role_grant_permission("reader", Permission::read_write("alice/").with_prefix())
        .await
        .unwrap();
    c.user_grant_role("alice", "reader").await.unwrap();
    assert_status(
        c.user_add("alice", "x", None).await,
        Code::FailedPrecondition,
        "etcdserver: user name already exists",
    );
    c.put("pub/news", "hello", None).await.unwrap();
    c.put("secret/plan", "x", None).await.unwrap();
    c.auth_enable().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn permissions_tokens_lifecycle_and_persistence() {
    let (dir, mut configs) = InProcessCluster::configure(
        3,
        ClusterOpts {
            snapshot_count: 20,
            catch_up_entries: 5,
            ..Default::default()
        },
    );
    for c in &mut configs {
        c.auth_token_ttl = Duration::from_secs(2);
        // To hold a follower back while a token is issued (below).
        c.unsafe_fault_injection = true;
    }
    let mut cluster = InProcessCluster::start_configured(dir, configs).await;
    let leader = wait_for_leader(&cluster.live_addrs()).await;
    let li = cluster.index_of(leader);
    // One follower misses everything below and catches up by snapshot.
    let lagging = (li + 1) % 3;
    cluster.stop(lagging).await;
    let addr = cluster.addr(li);
    // Asked before auth is on (the mesh API then wants a token too).
    let follower = (li + 2) % 3;
    let follower_name = eventually("the follower's mesh name", Duration::from_secs(10), || {
        mesh_name(cluster.addr(follower))
    })
    .await;
    set_up_auth(addr).await;

    // Without a token: etcd's "user name is empty".
    let mut anon = etcd_client(addr).await;
    assert_status(
        anon.get("pub/news", None).await,
        Code::InvalidArgument,
        "etcdserver: user name is empty",
    );
    // A wrong password.
    let wrong = etcd_client::Client::connect(
        [format!("http://{addr}")],
        Some(ConnectOptions::new().with_user("alice", "nope")),
    )
    .await;
    assert_status(
        wrong.map(|_| ()),
        Code::InvalidArgument,
        "etcdserver: authentication failed, invalid user ID or password",
    );

    // alice reads pub/ but cannot write it, cannot read outside it, owns alice/.
    let mut alice = as_user(addr, "alice", "alice-secret").await;
    let got = alice
        .get("pub/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(got.kvs()[0].value(), b"hello");
    assert_status(
        alice.put("pub/news", "changed", None).await,
        Code::PermissionDenied,
        "etcdserver: permission denied",
    );
    assert_status(
        alice.get("secret/plan", None).await,
        Code::PermissionDenied,
        "etcdserver: permission denied",
    );
    assert_status(
        alice.get("", Some(GetOptions::new().with_all_keys())).await,
        Code::PermissionDenied,
        "etcdserver: permission denied",
    );
    alice.put("alice/todo", "1", None).await.unwrap();
    // Managing users is for root only.
    assert_status(
        alice.user_add("mallory", "m", None).await,
        Code::PermissionDenied,
        "etcdserver: permission denied",
    );
    // A watch on a range alice may not read is canceled with etcd's reason.
    let mut events = alice.watch("secret/", None).await.unwrap();
    let first = events.message().await.unwrap().unwrap();
    assert!(first.canceled(), "{first:?}");
    assert!(
        first
            .cancel_reason()
            .ends_with("etcdserver: permission denied"),
        "{first:?}"
    );

    // A token issued through the leader works at once on a follower that has not yet
    // applied the entry carrying it: the leader's messages to that follower are held
    // back 200 ms, and a member that does not know a token waits for ReadIndex before
    // it checks it. (In etcd, such a member refuses the token until it catches up.)
    let mut faults = FaultInjectionClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    faults
        .set_link_fault(SetLinkFaultRequest {
            peer: follower_name,
            delay_ms: 200,
            ..Default::default()
        })
        .await
        .unwrap();
    let token = {
        let c = etcd_client(addr).await;
        c.auth_client()
            .authenticate("alice".into(), "alice-secret".into())
            .await
            .unwrap()
            .token()
            .to_string()
    };
    let got = raw_get(cluster.addr(follower), Some(&token), b"pub/news").await;
    faults.clear_faults(ClearFaultsRequest {}).await.unwrap();
    assert_eq!(got, Ok(b"hello".to_vec()));
    // An unknown token, then the real one after it expired (TTL 2 s, unused).
    assert_eq!(
        raw_get(addr, Some("bogus.1"), b"pub/news").await,
        Err((
            Code::Unauthenticated,
            "etcdserver: invalid auth token".into()
        ))
    );
    // Any use would refresh it: wait until the member holds no live token.
    // (No handle on the member's store is kept: it restarts below.)
    let no_live_tokens = |c: &InProcessCluster| {
        let kv = c.servers[li].as_ref().expect("leader runs").kv();
        (kv.live_tokens() == 0).then_some(())
    };
    eventually("token expiry", Duration::from_secs(10), || async {
        no_live_tokens(&cluster)
    })
    .await;
    assert_eq!(
        raw_get(addr, Some(&token), b"pub/news").await,
        Err((
            Code::Unauthenticated,
            "etcdserver: invalid auth token".into(),
        ))
    );
    // meshd's own client authenticates again when its token expired.
    let mc = mesh_core::client::Client::connect(mesh_core::client::ClientConfig {
        endpoints: vec![addr.to_string()],
        credentials: Some(("alice".into(), "alice-secret".into())),
        ..Default::default()
    })
    .unwrap();
    assert!(mc.get("pub/news").await.unwrap().is_some());
    eventually("token expiry", Duration::from_secs(10), || async {
        no_live_tokens(&cluster)
    })
    .await;
    assert!(mc.get("pub/news").await.unwrap().is_some());
    // meshd's own Mesh service wants a token too.
    assert!(mc.mesh_peers().await.is_ok());
    let anon_mc = mesh_core::client::Client::connect(mesh_core::client::ClientConfig {
        endpoints: vec![addr.to_string()],
        ..Default::default()
    })
    .unwrap();
    let err = anon_mc.mesh_peers().await.unwrap_err();
    assert!(
        err.to_string().contains("etcdserver: user name is empty"),
        "{err}"
    );

    // Passwords are stored as Argon2id hashes, never in clear.
    let db = std::fs::read(
        cluster.configs[li]
            .data_dir
            .join(mesh_core::storage::DB_FILE),
    )
    .unwrap();
    let contains = |needle: &[u8]| db.windows(needle.len()).any(|w| w == needle);
    assert!(contains(b"$argon2id$"), "hashes are in the database");
    assert!(!contains(b"alice-secret") && !contains(b"root-secret"));

    // Enough writes to compact the log, then the lagging member catches up by snapshot
    // and enforces the same permissions.
    let mut root = as_user(addr, "root", "root-secret").await;
    for i in 0..60 {
        root.put(format!("fill/{i}"), "x", None).await.unwrap();
    }
    cluster.restart(lagging).await;
    let lag_addr = cluster.addr(lagging);
    eventually(
        "auth store by snapshot",
        Duration::from_secs(30),
        || async {
            let mut a = etcd_client::Client::connect(
                [format!("http://{lag_addr}")],
                Some(ConnectOptions::new().with_user("alice", "alice-secret")),
            )
            .await
            .ok()?;
            let r = a
                .get("pub/news", Some(GetOptions::new().with_serializable()))
                .await
                .ok()?;
            (r.kvs().len() == 1).then_some(())
        },
    )
    .await;
    let first = cluster.servers[lagging]
        .as_ref()
        .unwrap()
        .node()
        .log
        .first_index();
    assert!(
        first > 20,
        "the lagging member installed a snapshot (log starts at {first})"
    );
    let mut a = as_user(lag_addr, "alice", "alice-secret").await;
    assert_status(
        a.get("secret/plan", Some(GetOptions::new().with_serializable()))
            .await,
        Code::PermissionDenied,
        "etcdserver: permission denied",
    );

    // The auth store survives a restart (streams to the member closed first, so its
    // database is released).
    drop((events, alice, anon, root, mc));
    cluster.stop(li).await;
    cluster.restart(li).await;
    wait_for_leader_with_auth(&cluster).await;
    let mut a = as_user(cluster.addr(li), "alice", "alice-secret").await;
    assert!(a.put("pub/news", "x", None).await.is_err());
    assert_eq!(
        a.get("pub/news", None).await.unwrap().kvs()[0].value(),
        b"hello"
    );

    // Disable: everyone may do everything again; only root may disable.
    assert_status(
        a.auth_disable().await,
        Code::PermissionDenied,
        "etcdserver: permission denied",
    );
    let mut root = as_user(cluster.addr(li), "root", "root-secret").await;
    root.auth_disable().await.unwrap();
    let mut anon = etcd_client(cluster.addr(lagging)).await;
    eventually(
        "auth disabled everywhere",
        Duration::from_secs(10),
        || async { anon.clone().get("secret/plan", None).await.ok().map(|_| ()) },
    )
    .await;
    anon.put("pub/news", "free", None).await.unwrap();
}

/// Waits until all members agree on a leader (Status needs no token).
async fn wait_for_leader_with_auth(c: &InProcessCluster) {
    wait_for_leader(&c.live_addrs()).await;
}

/// A Range with a raw token, to see the server's answer to bad or expired tokens
/// without a client library that re-authenticates.
async fn raw_get(
    addr: SocketAddr,
    token: Option<&str>,
    key: &[u8],
) -> Result<Vec<u8>, (Code, String)> {
    use mesh_core::proto::etcdserverpb::{kv_client::KvClient, RangeRequest};
    let mut kv = KvClient::connect(format!("http://{addr}")).await.unwrap();
    let mut req = tonic::Request::new(RangeRequest {
        key: key.to_vec(),
        ..Default::default()
    });
    if let Some(t) = token {
        req.metadata_mut().insert("token", t.parse().unwrap());
    }
    match kv.range(req).await {
        Ok(r) => Ok(r
            .into_inner()
            .kvs
            .first()
            .map(|kv| kv.value.clone())
            .unwrap_or_default()),
        Err(s) => Err((s.code(), s.message().to_string())),
    }
}

fn for_member(id: u64) -> Option<etcd_client::AlarmOptions> {
    let mut o = etcd_client::AlarmOptions::new();
    o.with_member(id);
    Some(o)
}

/// A non-root user can neither raise nor clear alarms, nor list key names of a lease
/// it may not read (etcd's CVE-2023-32082 fix); failed logins for one user are
/// limited, and the limit does not touch other users.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_root_users_cannot_raise_alarms_read_lease_keys_or_guess_passwords() {
    use etcd_client::{AlarmAction, AlarmType, LeaseTimeToLiveOptions, PutOptions};
    let cluster = InProcessCluster::start(1, ClusterOpts::default()).await;
    let addr = cluster.addr(0);
    let me = wait_for_leader(&[addr]).await;
    set_up_auth(addr).await;
    let mut root = as_user(addr, "root", "root-secret").await;
    let mut alice = as_user(addr, "alice", "alice-secret").await;

    for action in [AlarmAction::Activate, AlarmAction::Deactivate] {
        assert_status(
            alice
                .alarm(action, AlarmType::Nospace, for_member(me))
                .await,
            Code::PermissionDenied,
            "etcdserver: permission denied",
        );
    }
    assert!(alice
        .alarm(AlarmAction::Get, AlarmType::None, None)
        .await
        .unwrap()
        .alarms()
        .is_empty());
    // Root may; the alarm then stops alice's writes too, until root clears it.
    root.alarm(AlarmAction::Activate, AlarmType::Nospace, for_member(me))
        .await
        .unwrap();
    root.alarm(AlarmAction::Deactivate, AlarmType::Nospace, for_member(me))
        .await
        .unwrap();

    let lease = root.lease_grant(600, None).await.unwrap().id();
    let opts = || Some(PutOptions::new().with_lease(lease));
    root.put("alice/mine", "1", opts()).await.unwrap();
    let with_keys = || Some(LeaseTimeToLiveOptions::new().with_keys());
    let keys = alice.lease_time_to_live(lease, with_keys()).await.unwrap();
    assert_eq!(keys.keys(), [b"alice/mine".to_vec()]);
    root.put("secret/other", "2", opts()).await.unwrap();
    assert_status(
        alice.lease_time_to_live(lease, with_keys()).await,
        Code::PermissionDenied,
        "etcdserver: permission denied",
    );
    // Without key names, the lease's TTL is anyone's to read.
    assert!(alice.lease_time_to_live(lease, None).await.unwrap().ttl() > 0);
    let root_keys = root.lease_time_to_live(lease, with_keys()).await.unwrap();
    assert_eq!(root_keys.keys().len(), 2);

    // Wrong passwords for alice: five are checked, then alice is refused unchecked.
    let login = |password: &'static str| async move {
        etcd_client::Client::connect(
            [format!("http://{addr}")],
            Some(ConnectOptions::new().with_user("alice", password)),
        )
        .await
        .map(|_| ())
    };
    for _ in 0..5 {
        assert_status(
            login("guess").await,
            Code::InvalidArgument,
            "etcdserver: authentication failed, invalid user ID or password",
        );
    }
    assert_status(
        login("alice-secret").await,
        Code::ResourceExhausted,
        "etcdserver: too many failed authentication attempts for this user; retry later",
    );
    // Another user is not affected.
    as_user(addr, "root", "root-secret").await;
}

/// Permissions are checked again when a write applies, with the auth store as of its
/// place in the log: a write a lagging member let through (its copy of the auth store
/// still granted it) is refused once the revocation before it applies, on every member.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_role_cannot_write_through_a_lagging_member() {
    let (dir, mut configs) = InProcessCluster::configure(3, ClusterOpts::default());
    for c in &mut configs {
        c.unsafe_fault_injection = true;
    }
    let cluster = InProcessCluster::start_configured(dir, configs).await;
    let addrs = cluster.live_addrs();
    let leader = wait_for_leader(&addrs).await;
    let li = cluster.index_of(leader);
    let lagging = (li + 1) % 3;
    let mut names = Vec::new();
    for a in &addrs {
        names.push(eventually("mesh name", Duration::from_secs(10), || mesh_name(*a)).await);
    }
    set_up_auth(addrs[li]).await;
    let mut alice = as_user(addrs[lagging], "alice", "alice-secret").await;
    alice.put("alice/before", "1", None).await.unwrap();

    // The lagging member hears nothing from the others (its own messages still go out).
    let mut faults = FaultInjectionClient::connect(format!("http://{}", addrs[lagging]))
        .await
        .unwrap();
    for (i, name) in names.iter().enumerate() {
        if i != lagging {
            faults
                .set_link_fault(SetLinkFaultRequest {
                    peer: *name,
                    drop_in: true,
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    }
    let mut root = as_user(addrs[li], "root", "root-secret").await;
    root.user_revoke_role("alice", "reader").await.unwrap();
    let after_revoke = status(addrs[li]).await.unwrap().raft_index();

    // alice writes through the lagging member, whose auth store still grants it.
    let write = tokio::spawn(async move { alice.put("alice/after", "2", None).await });
    eventually(
        "the write reaches the log",
        Duration::from_secs(10),
        || async { (status(addrs[li]).await?.raft_index() > after_revoke).then_some(()) },
    )
    .await;
    faults.clear_faults(ClearFaultsRequest {}).await.unwrap();
    assert_status(
        write.await.unwrap(),
        Code::PermissionDenied,
        "etcdserver: permission denied",
    );
    // No member applied it.
    for a in &addrs {
        let opts = GetOptions::new().with_serializable();
        let r = as_user(*a, "root", "root-secret").await;
        eventually("the member caught up", Duration::from_secs(10), || {
            let (mut r, opts) = (r.clone(), opts.clone());
            async move {
                let got = r.get("alice/before", Some(opts)).await.ok()?;
                (got.count() == 1).then_some(())
            }
        })
        .await;
        let got = r.clone().get("alice/after", Some(opts)).await.unwrap();
        assert_eq!(got.count(), 0, "member {a} applied the refused write");
    }
}
