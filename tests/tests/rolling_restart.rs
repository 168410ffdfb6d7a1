//! Graceful stop: a rolling restart of three `meshd` processes (SIGTERM, start again)
//! under a steady write load loses no request, and only a restarted leader causes an
//! election (its hand-over), one per restarted leader.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::GetOptions;
use mesh_tests::*;

/// True when the error says the request was not applied: connection refused, no
/// leader yet, not the leader, or a call the stopping member refused unprocessed
/// with its HTTP/2 GOAWAY (hyper reports a call it never got to send as canceled,
/// and one the server refused with the GOAWAY itself in the error's chain; a
/// graceful stop answers every call that reached a handler). The only errors the
/// writer retries, on the next endpoint.
fn retryable(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(s) if mesh_core::client::is_go_away_refusal(s) => true,
        etcd_client::Error::GRpcStatus(s) => match s.code() {
            tonic::Code::Unavailable => {
                s.message().contains("no leader")
                    || s.message().contains("not leader")
                    || s.message().contains("tcp connect error")
            }
            tonic::Code::Cancelled => s.message() == "operation was canceled",
            _ => false,
        },
        _ => false,
    }
}

struct Load {
    acked: AtomicU64,
    failures: Mutex<Vec<String>>,
    stop: AtomicBool,
}

/// Writes k0, k1, ... one after another; each put goes to the current endpoint and
/// moves to the next one only on a retryable error.
async fn writer(addrs: Vec<SocketAddr>, load: Arc<Load>) {
    let mut clients = Vec::new();
    for a in &addrs {
        clients.push(etcd_client(*a).await);
    }
    let mut at = 0;
    let mut n = 0u64;
    while !load.stop.load(Ordering::Acquire) {
        let key = format!("k{n}");
        let mut attempts = 0;
        loop {
            match clients[at].put(key.as_str(), "v", None).await {
                Ok(_) => break,
                Err(e) if retryable(&e) && attempts < 200 => {
                    attempts += 1;
                    at = (at + 1) % clients.len();
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => {
                    let at = addrs[at];
                    load.failures
                        .lock()
                        .unwrap()
                        .push(format!("{key} via {at}: {e}"));
                    break;
                }
            }
        }
        n += 1;
        load.acked.store(n, Ordering::Release);
    }
}

async fn term_and_leader(addrs: &[SocketAddr]) -> (u64, u64) {
    eventually(
        "a member answering Status",
        Duration::from_secs(20),
        || async {
            for a in addrs {
                if let Some(s) = status(*a).await {
                    if s.leader() != 0 {
                        return Some((s.raft_term(), s.leader()));
                    }
                }
            }
            None
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_under_load_loses_nothing_and_elects_once_per_leader() {
    let mut c = ProcessCluster::start(3, ClusterOpts::default());
    let addrs = c.addrs();
    wait_for_leader(&addrs).await;
    let (term_before, _) = term_and_leader(&addrs).await;

    let load = Arc::new(Load {
        acked: AtomicU64::new(0),
        failures: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
    });
    let w = tokio::spawn(writer(addrs.clone(), load.clone()));
    let progress = |load: &Arc<Load>, from: u64| {
        let load = load.clone();
        async move {
            eventually("writes progressing", Duration::from_secs(30), || async {
                (load.acked.load(Ordering::Acquire) >= from + 20).then_some(())
            })
            .await
        }
    };
    progress(&load, 0).await;

    let mut leaders_restarted = 0;
    for i in 0..3 {
        let others: Vec<SocketAddr> = (0..3).filter(|&j| j != i).map(|j| addrs[j]).collect();
        let me = status(addrs[i]).await.expect("member answers");
        let was_leader = me.leader() == me.header().expect("header").member_id();
        if was_leader {
            leaders_restarted += 1;
        }
        let exit = c.procs[i].terminate().expect("was running");
        assert!(exit.success(), "p{i} exit {exit:?}:\n{}", c.log(i));
        if was_leader {
            assert!(
                c.log(i).contains("leadership handed over"),
                "stopping leader p{i} did not hand over:\n{}",
                c.log(i)
            );
        }
        wait_for_leader(&others).await;
        let before = load.acked.load(Ordering::Acquire);
        progress(&load, before).await;
        c.restart(i);
        wait_for_leader(&addrs).await;
        let before = load.acked.load(Ordering::Acquire);
        progress(&load, before).await;
    }
    load.stop.store(true, Ordering::Release);
    w.await.expect("writer");

    let failures = load.failures.lock().unwrap().clone();
    if !failures.is_empty() {
        for (i, a) in addrs.iter().enumerate() {
            eprintln!("--- p{i} ({a}) log:\n{}", c.log(i));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failed requests, first: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    let acked = load.acked.load(Ordering::Acquire);
    let mut cl = etcd_client(addrs[0]).await;
    let r = cl
        .get("k", Some(GetOptions::new().with_prefix().with_count_only()))
        .await
        .expect("count");
    assert_eq!(r.count() as u64, acked, "every acknowledged put is stored");

    let (term_after, _) = term_and_leader(&addrs).await;
    assert!(leaders_restarted >= 1, "the first leader was restarted");
    assert!(
        term_after - term_before <= leaders_restarted,
        "terms {term_before} -> {term_after}: more than one election per restarted leader ({leaders_restarted})"
    );
}
