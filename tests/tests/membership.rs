//! Membership over the mesh: Raft across hops, joining through `--peer`, member
//! add/remove/promote under write load, growth and healing, bootstrap-expect, and the
//! mesh password.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_core::mesh::LinkFault;
use mesh_tests::{
    etcd_client, eventually, put_retrying, status, wait_for_leader, wait_for_leader_other_than,
    ClusterOpts, InProcessCluster, ProcessCluster,
};

/// (id, name, is_learner) of every member, as `addr` reports them.
async fn members(addr: SocketAddr) -> Option<Vec<(u64, String, bool)>> {
    let mut c = etcd_client(addr).await;
    let r = tokio::time::timeout(Duration::from_secs(3), c.member_list())
        .await
        .ok()?
        .ok()?;
    let mut v: Vec<_> = r
        .members()
        .iter()
        .map(|m| (m.id(), m.name().to_string(), m.is_learner()))
        .collect();
    v.sort();
    Some(v)
}

/// Writes keys w0, w1, ... through any live member until stopped; counts the
/// acknowledged puts as they happen and returns their keys.
fn start_writer(
    addrs: Arc<Mutex<Vec<SocketAddr>>>,
) -> (
    Arc<AtomicBool>,
    Arc<AtomicUsize>,
    tokio::task::JoinHandle<Vec<String>>,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(AtomicUsize::new(0));
    let (stop2, acks2) = (stop.clone(), acks.clone());
    let task = tokio::spawn(async move {
        let mut acked = Vec::new();
        let mut i = 0;
        while !stop2.load(Ordering::Relaxed) {
            let key = format!("w{i}");
            let targets = addrs.lock().unwrap().clone();
            for a in targets {
                let mut c = etcd_client(a).await;
                if c.put(key.as_str(), "v", None).await.is_ok() {
                    acked.push(key.clone());
                    acks2.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
            i += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        acked
    });
    (stop, acks, task)
}

async fn assert_all_present(addr: SocketAddr, keys: &[String]) {
    let mut c = etcd_client(addr).await;
    let r = c
        .get("w", Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .expect("range");
    let have: std::collections::HashSet<String> = r
        .kvs()
        .iter()
        .map(|kv| kv.key_str().unwrap().to_string())
        .collect();
    for k in keys {
        assert!(
            have.contains(k),
            "acknowledged write {k} is missing on {addr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_replicates_and_elects_across_hops() {
    let mut c = InProcessCluster::start(3, ClusterOpts::default()).await;
    // A (0) and C (2) never talk directly: only through B (1).
    let a = c.servers[0].as_ref().unwrap().mesh().clone();
    let cc = c.servers[2].as_ref().unwrap().mesh().clone();
    let cut = LinkFault {
        drop_out: true,
        drop_in: true,
        delay: None,
    };
    a.set_link_fault(cc.name(), cut);
    cc.set_link_fault(a.name(), cut);
    eventually(
        "A routes to C through B",
        Duration::from_secs(20),
        || async {
            let p = a.peers().into_iter().find(|p| p.name == cc.name())?;
            (p.reachable && p.hops == Some(2)).then_some(())
        },
    )
    .await;

    for round in 0..3 {
        let leader = wait_for_leader(&c.live_addrs()).await;
        let key = format!("hop{round}");
        put_retrying(&[c.addr(0)], &key, "via-b").await;
        // A linearizable read on C sees A's write.
        let c_addr = c.addr(2);
        let got = eventually("C reads A's write", Duration::from_secs(10), || {
            let key = key.clone();
            async move { etcd_client(c_addr).await.get(key, None).await.ok() }
        })
        .await;
        assert_eq!(got.kvs()[0].value(), b"via-b");
        // A new election with the cut in place.
        let i = c.index_of(leader);
        c.stop(i).await;
        if i != 1 {
            // B and the other end elect a leader between themselves.
            wait_for_leader_other_than(&c.live_addrs(), leader).await;
        }
        c.restart(i).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_add_promote_remove_under_write_load_loses_nothing() {
    let mut opts = ClusterOpts::default();
    opts.autopilot.growth = false;
    let mut c = InProcessCluster::start(3, opts.clone()).await;
    wait_for_leader(&c.live_addrs()).await;
    let addrs = Arc::new(Mutex::new(c.live_addrs()));
    let (stop, acks, writer) = start_writer(addrs.clone());

    // Add a learner for a node that is not running yet, then start it through --peer.
    let mut cfg = opts.config("m3", c.dir.path());
    cfg.peers = vec![c.configs[0].listen_mesh.to_string()];
    let mut cl = etcd_client(c.addr(1)).await;
    let added = cl
        .member_add(
            [cfg.listen_mesh.to_string()],
            Some(etcd_client::MemberAddOptions::new().with_is_learner()),
        )
        .await
        .expect("member add (forwarded to the leader)");
    let new_id = added.member().unwrap().id();
    let i = c.add(cfg).await;
    assert_eq!(
        c.servers[i].as_ref().unwrap().node().status.member_id,
        new_id
    );
    addrs.lock().unwrap().push(c.addr(i));

    // Promotion is refused until the learner caught up, then succeeds.
    eventually("learner promoted", Duration::from_secs(30), || async {
        let mut cl = etcd_client(c.addr(0)).await;
        cl.member_promote(new_id).await.ok()
    })
    .await;
    eventually(
        "new voter listed with its name",
        Duration::from_secs(10),
        || async {
            let ms = members(c.addr(0)).await?;
            ms.iter()
                .any(|m| m.0 == new_id && m.1 == "m3" && !m.2)
                .then_some(())
        },
    )
    .await;

    // Remove an original voter (not the one we write through first).
    let victim = c.servers[2].as_ref().unwrap().node().status.member_id;
    eventually("member removed", Duration::from_secs(20), || async {
        let mut cl = etcd_client(c.addr(0)).await;
        cl.member_remove(victim).await.ok()
    })
    .await;
    addrs.lock().unwrap().retain(|a| *a != c.addr(2));
    // Writes go on in the new configuration before the writer stops.
    let before = acks.load(Ordering::Relaxed);
    eventually(
        "writes after the removal",
        Duration::from_secs(20),
        || async { (acks.load(Ordering::Relaxed) >= before + 20).then_some(()) },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let acked = writer.await.unwrap();
    assert!(!acked.is_empty(), "the writer made progress");
    for a in [c.addr(0), c.addr(1), c.addr(i)] {
        // Linearizable reads: every acknowledged write is on every remaining member.
        assert_all_present(a, &acked).await;
    }
    let ms = members(c.addr(1)).await.unwrap();
    assert_eq!(ms.len(), 3, "{ms:?}");
    assert!(!ms.iter().any(|m| m.0 == victim));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_are_checked() {
    let mut c = InProcessCluster::start(3, ClusterOpts::default()).await;
    wait_for_leader(&c.live_addrs()).await;
    let mut cl = etcd_client(c.addr(0)).await;
    let err = cl.member_remove(0x1234).await.unwrap_err().to_string();
    assert!(err.contains("etcdserver: member not found"), "{err}");
    let voter = c.servers[1].as_ref().unwrap().node().status.member_id;
    let err = cl.member_promote(voter).await.unwrap_err().to_string();
    assert!(err.contains("can only promote a learner member"), "{err}");
    let taken = c.configs[1].listen_mesh.to_string();
    let err = cl.member_add([taken], None).await.unwrap_err().to_string();
    assert!(
        err.contains("etcdserver: Peer URLs already exists"),
        "{err}"
    );
    let err = cl
        .member_add(["no-port"], None)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("invalid peer URL"), "{err}");
    // Updating a member's mesh address goes through Raft.
    let new_addr = mesh_tests::free_addr().to_string();
    cl.member_update(voter, [new_addr.clone()]).await.unwrap();
    let r = cl.member_list().await.unwrap();
    let m = r.members().iter().find(|m| m.id() == voter).unwrap();
    // Stored as host:port, answered as a URL, as etcd does.
    assert_eq!(m.peer_urls(), [format!("http://{new_addr}")]);

    // With one of three voters down, a fourth voter that has not started would leave
    // 2 of 4 started, not a quorum: refused with etcd's error.
    let down = c.index_of(voter);
    let leader = c.servers[0].as_ref().unwrap().node().status.leader();
    let down = if c.index_of(leader) == down {
        (down + 1) % 3
    } else {
        down
    };
    c.stop(down).await;
    let live = c.live_addrs();
    let leader_now = wait_for_leader(&live).await;
    let cl = etcd_client(c.addr(c.index_of(leader_now))).await;
    // The leader notices the stopped member after an election timeout.
    let fresh = mesh_tests::free_addr().to_string();
    let err = eventually("add refused", Duration::from_secs(10), || {
        let fresh = fresh.clone();
        let cl = cl.clone();
        async move {
            let mut cl = cl;
            match cl.member_add([fresh], None).await {
                Err(e) => Some(e.to_string()),
                Ok(_) => panic!("a fourth voter was added with only two started"),
            }
        }
    })
    .await;
    assert!(err.contains("not enough started members"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn growth_adds_a_learner_and_healing_replaces_a_dead_voter() {
    let mut opts = ClusterOpts::default();
    opts.autopilot.dead_voter_timeout = Duration::from_secs(4);
    let mut c = InProcessCluster::start(3, opts.clone()).await;
    wait_for_leader(&c.live_addrs()).await;
    let mut cfg = opts.config("m3", c.dir.path());
    cfg.peers = vec![c.configs[1].listen_mesh.to_string()];
    let spare = c.add(cfg).await;
    let spare_id = c.servers[spare].as_ref().unwrap().node().status.member_id;
    // Added as a learner, and not promoted: three voters is the target.
    eventually("spare is a learner", Duration::from_secs(20), || async {
        let ms = members(c.addr(0)).await?;
        ms.iter()
            .any(|m| m.0 == spare_id && m.1 == "m3" && m.2)
            .then_some(())
    })
    .await;

    // A learner serves clients: writes and linearizable reads go to the leader over
    // the mesh.
    put_retrying(&[c.addr(spare)], "via-learner", "yes").await;
    let got = etcd_client(c.addr(spare))
        .await
        .get("via-learner", None)
        .await
        .unwrap();
    assert_eq!(got.kvs()[0].value(), b"yes");

    // A voter down for less than the dead time, and back, stays a voter. (The
    // timer's rules are unit-tested in `autopilot::tests`; this is the whole path.)
    let victim = c.servers[2].as_ref().unwrap().node().status.member_id;
    c.stop(2).await;
    let leader = wait_for_leader(&[c.addr(0), c.addr(1), c.addr(spare)]).await;
    let node = c.servers[c.index_of(leader)]
        .as_ref()
        .unwrap()
        .node()
        .clone();
    let victim_progress = |node: mesh_core::raft::NodeHandle| async move {
        let all = node.progress().await.ok()?;
        all.into_iter().find(|p| p.id == victim)
    };
    eventually(
        "the leader sees the voter gone",
        Duration::from_secs(10),
        || async { (!victim_progress(node.clone()).await?.recent_active).then_some(()) },
    )
    .await;
    c.restart(2).await;
    eventually(
        "the voter back and caught up",
        Duration::from_secs(20),
        || async {
            let p = victim_progress(node.clone()).await?;
            (p.recent_active && p.matched >= p.leader_last_index).then_some(())
        },
    )
    .await;
    let ms = members(c.addr(0)).await.unwrap();
    assert!(ms.iter().any(|m| m.0 == victim && !m.2), "{ms:?}");
    assert!(ms.iter().any(|m| m.0 == spare_id && m.2), "{ms:?}");

    // Down for longer: removed and replaced by the caught-up learner.
    c.stop(2).await;
    let live = vec![c.addr(0), c.addr(1), c.addr(spare)];
    eventually("dead voter replaced", Duration::from_secs(40), || async {
        let ms = members(live[0]).await?;
        let ok = !ms.iter().any(|m| m.0 == victim)
            && ms.iter().any(|m| m.0 == spare_id && !m.2)
            && ms.len() == 3;
        ok.then_some(())
    })
    .await;
    put_retrying(&live, "after-heal", "ok").await;

    // The removed member never comes back under its old ID: it stops with an error.
    let err = match mesh_core::server::Server::start(c.configs[2].clone()).await {
        Ok(s) => {
            let removed = eventually("removal noticed", Duration::from_secs(20), || async {
                (!s.node().status.is_running()).then_some(s.node().status.is_removed())
            })
            .await;
            assert!(removed);
            "removed".to_string()
        }
        Err(e) => e.to_string(),
    };
    assert!(err.contains("removed"), "{err}");
    let ms = members(live[0]).await.unwrap();
    assert!(!ms.iter().any(|m| m.0 == victim), "{ms:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_mesh_password_is_refused_and_learns_nothing() {
    let opts = ClusterOpts {
        password: Some(b"right horse battery".to_vec()),
        ..Default::default()
    };
    let c = InProcessCluster::start(1, opts.clone()).await;
    wait_for_leader(&c.live_addrs()).await;
    put_retrying(&c.live_addrs(), "secret", "s3cr3t").await;

    let mut bad = opts.config("intruder", c.dir.path());
    bad.password = Some(b"wrong".to_vec());
    bad.peers = vec![c.configs[0].listen_mesh.to_string()];
    // The intruder waits to be welcomed; it never is.
    let attempt = tokio::spawn(mesh_core::server::Server::start(bad));
    let mesh = c.servers[0].as_ref().unwrap().mesh().clone();
    eventually("handshake refused", Duration::from_secs(10), || async {
        (mesh.stats().handshakes_refused > 0).then_some(())
    })
    .await;
    // It keeps trying and keeps being refused.
    let refused = mesh.stats().handshakes_refused;
    eventually("another refusal", Duration::from_secs(10), || async {
        (mesh.stats().handshakes_refused > refused).then_some(())
    })
    .await;
    assert!(!attempt.is_finished(), "the intruder was not admitted");
    attempt.abort();
    assert_eq!(members(c.addr(0)).await.unwrap().len(), 1);
    assert!(mesh
        .peers()
        .iter()
        .all(|p| p.is_self || p.nickname != "intruder"));
}

#[test]
fn bootstrap_expect_five_processes_form_one_cluster_every_time() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    for round in 0..3 {
        // Every node knows one seed; they start in any order, all at once.
        let c = ProcessCluster::start_with(5, ClusterOpts::default(), |i, mesh| {
            vec![
                "--bootstrap-expect=5".into(),
                format!("--peer={}", mesh[(i + 1) % mesh.len()]),
            ]
        });
        let addrs = c.addrs();
        let (leader, clusters) = rt.block_on(async {
            let leader = wait_for_leader(&addrs).await;
            let mut clusters = BTreeMap::new();
            for a in &addrs {
                let s = status(*a).await.expect("status");
                *clusters
                    .entry(s.header().unwrap().cluster_id())
                    .or_insert(0) += 1;
            }
            (leader, clusters)
        });
        assert_ne!(leader, 0);
        assert_eq!(
            clusters.len(),
            1,
            "round {round}: one cluster: {clusters:?}"
        );
        let ms = rt.block_on(members(addrs[0])).unwrap();
        assert_eq!(ms.len(), 5, "round {round}: {ms:?}");
        assert!(ms.iter().all(|m| !m.2), "five voters: {ms:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_waiting_to_be_added_forwards_clients_and_is_listed_as_mesh_only() {
    let mut opts = ClusterOpts::default();
    opts.autopilot.growth = false;
    let c = InProcessCluster::start(1, opts.clone()).await;
    wait_for_leader(&c.live_addrs()).await;
    let mut cfg = opts.config("waiting", c.dir.path());
    cfg.peers = vec![c.configs[0].listen_mesh.to_string()];
    let waiting_client = cfg.listen_client;
    let pending = tokio::spawn(mesh_core::server::Server::start(cfg));

    // Its client port answers by forwarding to the member.
    put_retrying(&[waiting_client], "through-proxy", "ok").await;
    let r = etcd_client(c.addr(0))
        .await
        .get("through-proxy", None)
        .await
        .unwrap();
    assert_eq!(r.kvs()[0].value(), b"ok");
    let s = status(waiting_client)
        .await
        .expect("status through the proxy");
    assert_eq!(
        s.header().unwrap().member_id(),
        c.servers[0].as_ref().unwrap().node().status.member_id
    );

    // The member's mesh API lists it as mesh-only.
    let mc =
        mesh_core::proto::meshpb::mesh_client::MeshClient::connect(format!("http://{}", c.addr(0)))
            .await
            .unwrap();
    let peers = eventually("waiting node visible", Duration::from_secs(10), || {
        let mut mc = mc.clone();
        async move {
            let p = mc
                .peers(mesh_core::proto::meshpb::MeshPeersRequest {})
                .await
                .ok()?
                .into_inner();
            p.peers
                .iter()
                .any(|p| p.nickname == "waiting" && p.role == "mesh-only")
                .then_some(p)
        }
    })
    .await;
    assert!(peers.peers.iter().any(|p| p.is_self && p.role == "voter"));
    assert!(!pending.is_finished());
    pending.abort();
}

/// A member added to a cluster whose log is compacted needs a snapshot: the leader
/// builds the file when the addition is applied, before the new node has started (it
/// never does here), not when raft-rs first asks for one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_builds_a_snapshot_when_a_member_is_added() {
    let mut opts = ClusterOpts {
        snapshot_count: 20,
        catch_up_entries: 5,
        ..Default::default()
    };
    opts.autopilot.growth = false;
    let c = InProcessCluster::start(3, opts.clone()).await;
    let leader = wait_for_leader(&c.live_addrs()).await;
    let li = c.index_of(leader);
    let mut cl = etcd_client(c.addr(li)).await;
    for i in 0..60 {
        cl.put(format!("k{i:02}"), "v", None).await.unwrap();
    }
    let built = |i: usize| -> Vec<String> {
        let dir = mesh_core::storage::snapshot_dir(&c.configs[i].data_dir);
        std::fs::read_dir(dir)
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".snap") && !n.starts_with("incoming"))
                    .collect()
            })
            .unwrap_or_default()
    };
    eventually(
        "the leader compacted its log",
        Duration::from_secs(20),
        || async { (c.servers[li].as_ref().unwrap().node().log.first_index() > 1).then_some(()) },
    )
    .await;
    assert!(built(li).is_empty(), "no follower needed a snapshot yet");
    let cfg = opts.config("m3", c.dir.path());
    cl.member_add(
        [cfg.listen_mesh.to_string()],
        Some(etcd_client::MemberAddOptions::new().with_is_learner()),
    )
    .await
    .expect("member add");
    eventually(
        "the leader built a snapshot file",
        Duration::from_secs(20),
        || async { (!built(li).is_empty()).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_larger_than_a_mesh_chunk_reaches_a_member_across_hops() {
    let opts = ClusterOpts {
        snapshot_count: 20,
        catch_up_entries: 5,
        ..Default::default()
    };
    let mut c = InProcessCluster::start(3, opts).await;
    let first_leader = wait_for_leader(&c.live_addrs()).await;
    let a_id = c.servers[0].as_ref().unwrap().node().status.member_id;
    // A (0) leads; C (2) is down while A writes and compacts its log.
    if first_leader != a_id {
        let li = c.index_of(first_leader);
        eventually("leadership moved to A", Duration::from_secs(20), || async {
            let node = c.servers[li].as_ref().unwrap().node().clone();
            node.move_leader(a_id).await.ok()
        })
        .await;
    }
    wait_for_leader(&c.live_addrs()).await;
    let c_name = c.servers[2].as_ref().unwrap().mesh().name();
    c.stop(2).await;
    let mut cl = etcd_client(c.addr(0)).await;
    // More than the snapshot stream's window: it only completes as C acknowledges.
    let big = "x".repeat(100_000);
    for i in 0..120 {
        cl.put(format!("big{i:03}"), big.clone(), None)
            .await
            .unwrap_or_else(|e| panic!("put {i}: {e}"));
    }
    let first = c.servers[0].as_ref().unwrap().node().log.first_index();
    assert!(first > 60, "A compacted its log (first index {first})");

    // A and C never talk directly: the 12 MB snapshot file streams through B.
    let cut = LinkFault {
        drop_out: true,
        drop_in: true,
        delay: None,
    };
    let a = c.servers[0].as_ref().unwrap().mesh().clone();
    a.set_link_fault(c_name, cut);
    c.restart(2).await;
    c.servers[2]
        .as_ref()
        .unwrap()
        .mesh()
        .set_link_fault(a.name(), cut);
    let c_addr = c.addr(2);
    eventually(
        "C catches up by snapshot",
        Duration::from_secs(40),
        || async {
            let mut cl = etcd_client(c_addr).await;
            let r = cl
                .get(
                    "big",
                    Some(
                        etcd_client::GetOptions::new()
                            .with_prefix()
                            .with_count_only()
                            .with_serializable(),
                    ),
                )
                .await
                .ok()?;
            (r.count() == 120).then_some(())
        },
    )
    .await;
    let via = a.peers().into_iter().find(|p| p.name == c_name).unwrap();
    assert_eq!(via.hops, Some(2), "C is reached through B: {via:?}");
    // A keeps the file it built (for the next follower that needs it); C removed the
    // one it received once installed.
    let files = |i: usize| -> Vec<String> {
        let dir = mesh_core::storage::snapshot_dir(&c.configs[i].data_dir);
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let built = files(0);
    assert!(
        built.len() == 1 && built[0].ends_with(".snap") && !built[0].starts_with("incoming"),
        "{built:?}"
    );
    eventually(
        "C removed the received file",
        Duration::from_secs(10),
        || async { files(2).is_empty().then_some(()) },
    )
    .await;
}
