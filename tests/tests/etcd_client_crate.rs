//! The independent `etcd-client` crate against a three-member meshd cluster: if it works,
//! the API is really etcd-compatible. Also checks etcd's error codes and texts.

use std::time::Duration;

use etcd_client::{
    Compare, CompareOp, DeleteOptions, EventType, GetOptions, PutOptions, SortOrder, SortTarget,
    Txn, TxnOp, WatchFilterType, WatchOptions,
};
use mesh_tests::*;

fn grpc(e: etcd_client::Error) -> tonic::Status {
    match e {
        etcd_client::Error::GRpcStatus(s) => s,
        other => panic!("expected a gRPC status, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_client_crate_put_get_del_txn_watch() {
    let c = InProcessCluster::start(3, ClusterOpts::default()).await;
    wait_for_leader(&c.live_addrs()).await;
    let mut a = etcd_client(c.addr(0)).await;
    let mut b = etcd_client(c.addr(1)).await;

    // Watch from a follower, started before the writes.
    let mut w = b
        .watch(
            "app/",
            Some(WatchOptions::new().with_prefix().with_prev_key()),
        )
        .await
        .unwrap();

    let r1 = a.put("app/x", "1", None).await.unwrap();
    let rev1 = r1.header().unwrap().revision();
    let r2 = a
        .put("app/x", "2", Some(PutOptions::new().with_prev_key()))
        .await
        .unwrap();
    assert_eq!(r2.prev_key().unwrap().value(), b"1");
    a.put("app/y", "y", None).await.unwrap();

    let g = b.get("app/x", None).await.unwrap();
    let kv = &g.kvs()[0];
    assert_eq!(
        (
            kv.value(),
            kv.version(),
            kv.create_revision(),
            kv.mod_revision()
        ),
        (&b"2"[..], 2, rev1, rev1 + 1)
    );
    let old = b
        .get("app/x", Some(GetOptions::new().with_revision(rev1)))
        .await
        .unwrap();
    assert_eq!(old.kvs()[0].value(), b"1");
    let sorted = b
        .get(
            "app/",
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_sort(SortTarget::Key, SortOrder::Descend)
                    .with_limit(1),
            ),
        )
        .await
        .unwrap();
    assert_eq!(
        (sorted.kvs()[0].key(), sorted.count(), sorted.more()),
        (&b"app/y"[..], 2, true)
    );

    // Txn: compare-and-swap both ways.
    let t = Txn::new()
        .when([Compare::value("app/x", CompareOp::Equal, "2")])
        .and_then([TxnOp::put("app/x", "3", None), TxnOp::get("app/y", None)])
        .or_else([TxnOp::get("app/x", None)]);
    let tr = a.txn(t).await.unwrap();
    assert!(tr.succeeded());
    let t = Txn::new()
        .when([Compare::mod_revision("app/x", CompareOp::Less, rev1)])
        .and_then([TxnOp::put("app/x", "never", None)]);
    assert!(!a.txn(t).await.unwrap().succeeded());

    let d = a
        .delete(
            "app/",
            Some(DeleteOptions::new().with_prefix().with_prev_key()),
        )
        .await
        .unwrap();
    assert_eq!(d.deleted(), 2);
    assert_eq!(d.prev_kvs().len(), 2);

    // The follower's watcher saw every change, in order, exactly once.
    let mut seen = Vec::new();
    while seen.len() < 6 {
        let resp = tokio::time::timeout(Duration::from_secs(10), w.message())
            .await
            .expect("watch event in time")
            .unwrap()
            .unwrap();
        for e in resp.events() {
            let kv = e.kv().unwrap();
            seen.push((
                e.event_type(),
                kv.key_str().unwrap().to_string(),
                kv.value_str().unwrap().to_string(),
            ));
        }
    }
    assert_eq!(
        seen,
        vec![
            (EventType::Put, "app/x".into(), "1".into()),
            (EventType::Put, "app/x".into(), "2".into()),
            (EventType::Put, "app/y".into(), "y".into()),
            (EventType::Put, "app/x".into(), "3".into()),
            (EventType::Delete, "app/x".into(), "".into()),
            (EventType::Delete, "app/y".into(), "".into()),
        ]
    );

    // Watch replay from an old revision.
    let mut replay = a
        .watch("app/x", Some(WatchOptions::new().with_start_revision(rev1)))
        .await
        .unwrap();
    let mut values = Vec::new();
    while values.len() < 4 {
        let resp = tokio::time::timeout(Duration::from_secs(10), replay.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        values.extend(
            resp.events()
                .iter()
                .map(|e| e.kv().unwrap().value_str().unwrap().to_string()),
        );
    }
    assert_eq!(values, ["1", "2", "3", ""]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_errors_and_limits() {
    let c = InProcessCluster::start(1, ClusterOpts::default()).await;
    wait_for_leader(&c.live_addrs()).await;
    let mut a = etcd_client(c.addr(0)).await;
    for i in 0..5 {
        a.put("k", format!("{i}"), None).await.unwrap();
    }
    let rev = a.get("k", None).await.unwrap().header().unwrap().revision();
    a.compact(rev - 1, None).await.unwrap();
    let e = grpc(
        a.get("k", Some(GetOptions::new().with_revision(rev - 3)))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (e.code(), e.message()),
        (
            tonic::Code::OutOfRange,
            "etcdserver: mvcc: required revision has been compacted"
        )
    );
    let e = grpc(
        a.get("k", Some(GetOptions::new().with_revision(rev + 100)))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        e.message(),
        "etcdserver: mvcc: required revision is a future revision"
    );

    // Oversized request: etcd's text, and the member keeps serving.
    let e = grpc(
        a.put("big", vec![b'x'; 1600 * 1024], None)
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (e.code(), e.message()),
        (
            tonic::Code::InvalidArgument,
            "etcdserver: request is too large"
        )
    );
    let e = grpc(a.put("", "v", None).await.unwrap_err());
    assert_eq!(e.message(), "etcdserver: key is not provided");
    let ops: Vec<TxnOp> = (0..129)
        .map(|i| TxnOp::put(format!("t{i}"), "v", None))
        .collect();
    let e = grpc(a.txn(Txn::new().and_then(ops)).await.unwrap_err());
    assert_eq!(
        e.message(),
        "etcdserver: too many operations in txn request"
    );
    let e = grpc(
        a.txn(Txn::new().and_then([TxnOp::put("d", "1", None), TxnOp::put("d", "2", None)]))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        e.message(),
        "etcdserver: duplicate key given in txn request"
    );
    let e = grpc(
        a.put("missing", "", Some(PutOptions::new().with_ignore_value()))
            .await
            .unwrap_err(),
    );
    assert_eq!(e.message(), "etcdserver: key not found");

    // Nothing above changed the store.
    let g = a.get("k", None).await.unwrap();
    assert_eq!(
        (g.kvs()[0].value(), g.header().unwrap().revision()),
        (&b"4"[..], rev)
    );
}

async fn next(s: &mut etcd_client::WatchStream) -> etcd_client::WatchResponse {
    tokio::time::timeout(Duration::from_secs(5), s.message())
        .await
        .expect("a watch response within 5 s")
        .expect("watch stream")
        .expect("stream open")
}

/// Adds a watcher to the stream and returns the stream's next response (its created
/// response, or the refusal).
async fn create(
    s: &mut etcd_client::WatchStream,
    key: &str,
    opts: WatchOptions,
) -> etcd_client::WatchResponse {
    s.watch(key, Some(opts)).await.unwrap();
    next(s).await
}

/// One Watch stream carrying several watchers, as etcd clients multiplex them: explicit
/// and chosen IDs, a duplicate ID refused, history replayed after the created response,
/// a cancel that stops one watcher only, progress on request and on idle, and a watcher
/// started at a compacted revision canceled with the compact revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_watch_stream_carries_many_watchers() {
    let (dir, mut configs) = InProcessCluster::configure(1, ClusterOpts::default());
    configs[0].limits.progress_notify_interval = Duration::from_millis(300);
    let c = InProcessCluster::start_configured(dir, configs).await;
    wait_for_leader(&c.live_addrs()).await;
    let mut kv = etcd_client(c.addr(0)).await;

    let d_rev = kv
        .put("d", "old", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let mut s = kv.watch("a", None).await.unwrap();
    let r = next(&mut s).await;
    assert!(r.created() && !r.canceled());
    assert_eq!(r.watch_id(), 0);

    let r = create(&mut s, "b", WatchOptions::new().with_watch_id(7)).await;
    assert!(r.created());
    assert_eq!(r.watch_id(), 7);

    let r = create(&mut s, "c", WatchOptions::new().with_watch_id(7)).await;
    assert!(r.created() && r.canceled(), "{r:?}");
    assert_eq!(r.watch_id(), -1);
    assert_eq!(r.cancel_reason(), "etcdserver: duplicate watch ID");

    // History first, after the created response; the chosen ID follows the explicit 7.
    let r = create(&mut s, "d", WatchOptions::new().with_start_revision(d_rev)).await;
    assert!(r.created());
    assert_eq!(r.watch_id(), 8);
    let r = next(&mut s).await;
    assert_eq!(r.watch_id(), 8);
    assert_eq!(r.events()[0].kv().unwrap().value(), b"old");

    kv.put("a", "1", None).await.unwrap();
    kv.put("b", "1", None).await.unwrap();
    let (r1, r2) = (next(&mut s).await, next(&mut s).await);
    assert_eq!((r1.watch_id(), r2.watch_id()), (0, 7));
    assert_eq!(r1.events()[0].kv().unwrap().key(), b"a");

    s.cancel(0).await.unwrap();
    let r = next(&mut s).await;
    assert!(r.canceled());
    assert_eq!(r.watch_id(), 0);
    kv.put("a", "2", None).await.unwrap();
    let last = kv
        .put("b", "2", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let r = next(&mut s).await;
    assert_eq!(r.watch_id(), 7, "the canceled watcher sent {r:?}");
    assert_eq!(r.events()[0].kv().unwrap().value(), b"2");

    s.request_progress().await.unwrap();
    let r = next(&mut s).await;
    assert_eq!(r.watch_id(), -1);
    assert!(r.events().is_empty());
    assert_eq!(r.header().unwrap().revision(), last);

    // A progress-notify watcher on an idle key hears from the server on its own.
    let r = create(&mut s, "idle", WatchOptions::new().with_progress_notify()).await;
    assert!(r.created());
    let idle = r.watch_id();
    let r = next(&mut s).await;
    assert_eq!(r.watch_id(), idle);
    assert!(r.events().is_empty() && !r.canceled());

    kv.compact(last, None).await.unwrap();
    let created = create(&mut s, "a", WatchOptions::new().with_start_revision(d_rev)).await;
    assert!(created.created());
    let r = next(&mut s).await;
    assert_eq!(r.watch_id(), created.watch_id());
    assert!(r.canceled());
    assert_eq!(r.compact_revision(), last);
}

/// A Watch stream holds at most 10000 watchers; the next one is answered created and
/// canceled with the reason, and the stream's other watchers keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_stream_holds_at_most_ten_thousand_watchers() {
    let c = InProcessCluster::start(1, ClusterOpts::default()).await;
    wait_for_leader(&c.live_addrs()).await;
    let mut kv = etcd_client(c.addr(0)).await;
    let mut s = kv.watch("w0", None).await.unwrap();
    assert!(next(&mut s).await.created());
    for i in 1..10_000 {
        s.watch(format!("w{i}"), None).await.unwrap();
    }
    for _ in 1..10_000 {
        let r = next(&mut s).await;
        assert!(r.created() && !r.canceled(), "{r:?}");
    }
    let r = create(&mut s, "one-too-many", WatchOptions::new()).await;
    assert!(r.created() && r.canceled(), "{r:?}");
    assert!(r.cancel_reason().contains("too many watchers"), "{r:?}");
    kv.put("w0", "still watched", None).await.unwrap();
    let r = next(&mut s).await;
    assert_eq!(r.watch_id(), 0);
    assert_eq!(r.events()[0].kv().unwrap().value(), b"still watched");
}

/// Many watchers of one stream, caught up with each other and read for together, each
/// receive exactly the events they asked for, in revision order: same-key watchers with
/// different options (previous values, no-put and no-delete filters), a prefix and a
/// from-key watcher, one canceled halfway, and one replaying history while the others
/// receive live events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_of_one_stream_each_receive_exactly_their_events() {
    use std::collections::{HashMap, HashSet};
    // (key, revision, is a delete, carries a previous value)
    type Seen = (String, i64, bool, bool);
    let c = InProcessCluster::start(1, ClusterOpts::default()).await;
    wait_for_leader(&c.live_addrs()).await;
    let mut kv = etcd_client(c.addr(0)).await;
    let first = kv
        .put("g/0", "start", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();

    let mut s = kv.watch("g/0", None).await.unwrap();
    assert!(next(&mut s).await.created());
    let specs = [
        ("g/1", WatchOptions::new()),
        ("g/1", WatchOptions::new().with_prev_key()),
        (
            "g/1",
            WatchOptions::new().with_filters([WatchFilterType::NoPut]),
        ),
        (
            "g/1",
            WatchOptions::new().with_filters([WatchFilterType::NoDelete]),
        ),
        ("g/2", WatchOptions::new()),
        ("g/", WatchOptions::new().with_prefix()),
        ("g/2", WatchOptions::new().with_from_key()),
        ("g/3", WatchOptions::new()),
    ];
    let mut ids = vec![0];
    for (key, opts) in specs {
        let r = create(&mut s, key, opts).await;
        assert!(r.created() && !r.canceled(), "{r:?}");
        ids.push(r.watch_id());
    }

    // Puts and deletes over the watched keys (every fifth a delete); the watcher of
    // g/3 is canceled halfway.
    let mut ops: Vec<Seen> = Vec::new();
    let mut exists = HashSet::from(["g/0".to_string()]);
    for i in 0..60 {
        let key = format!("g/{}", i % 4);
        let del = i % 5 == 4;
        let header = if del {
            kv.delete(key.as_str(), None)
                .await
                .unwrap()
                .header()
                .cloned()
        } else {
            kv.put(key.as_str(), format!("v{i}"), None)
                .await
                .unwrap()
                .header()
                .cloned()
        };
        let had = if del {
            exists.remove(&key)
        } else {
            !exists.insert(key.clone())
        };
        if del && !had {
            continue; // deleting a missing key writes nothing
        }
        ops.push((key, header.unwrap().revision(), del, had));
        if i == 30 {
            s.cancel(ids[8]).await.unwrap();
        }
    }
    // A watcher replaying everything since the first put, created after the others
    // (its created response may follow events already on their way).
    let replay_opts = WatchOptions::new().with_prefix().with_start_revision(first);
    s.watch("g/", Some(replay_opts)).await.unwrap();
    let replay = std::cell::Cell::new(None);

    let pick = |keys: &dyn Fn(&str) -> bool, puts: bool, dels: bool| -> Vec<Seen> {
        ops.iter()
            .filter(|(k, _, del, _)| keys(k) && if *del { dels } else { puts })
            .map(|(k, rev, del, _)| (k.clone(), *rev, *del, false))
            .collect()
    };
    let g1 = |k: &str| k == "g/1";
    let mut want: HashMap<i64, Vec<Seen>> = HashMap::from([
        (ids[0], pick(&|k| k == "g/0", true, true)),
        (ids[1], pick(&g1, true, true)),
        (ids[3], pick(&g1, false, true)),
        (ids[4], pick(&g1, true, false)),
        (ids[5], pick(&|k| k == "g/2", true, true)),
        (ids[6], pick(&|k| k.starts_with("g/"), true, true)),
        (ids[7], pick(&|k| k >= "g/2", true, true)),
    ]);
    want.insert(
        ids[2],
        ops.iter().filter(|o| o.0 == "g/1").cloned().collect(),
    );
    let mut replayed = vec![("g/0".to_string(), first, false, false)];
    replayed.extend(pick(&|k| k.starts_with("g/"), true, true));

    let mut got: HashMap<i64, Vec<Seen>> = HashMap::new();
    let canceled_after = std::cell::Cell::new(None);
    let take = |r: etcd_client::WatchResponse, got: &mut HashMap<i64, Vec<Seen>>| {
        if r.created() {
            assert!(!r.canceled() && replay.get().is_none(), "{r:?}");
            replay.set(Some(r.watch_id()));
        } else if r.canceled() {
            assert_eq!(r.watch_id(), ids[8], "{r:?}");
            canceled_after.set(Some(got.get(&ids[8]).map_or(0, Vec::len)));
        }
        for e in r.events() {
            let kv = e.kv().unwrap();
            got.entry(r.watch_id()).or_default().push((
                String::from_utf8(kv.key().to_vec()).unwrap(),
                kv.mod_revision(),
                e.event_type() == EventType::Delete,
                e.prev_kv().is_some(),
            ));
        }
    };
    let behind = |got: &HashMap<i64, Vec<Seen>>, replay: Option<i64>| {
        want.iter()
            .any(|(id, w)| got.get(id).map_or(0, Vec::len) < w.len())
            || replay.is_none_or(|id| got.get(&id).map_or(0, Vec::len) < replayed.len())
    };
    while behind(&got, replay.get()) {
        take(next(&mut s).await, &mut got);
    }
    // Nothing more may come (a duplicate, or an event for the canceled watcher).
    while let Ok(r) = tokio::time::timeout(Duration::from_millis(300), s.message()).await {
        take(r.unwrap().unwrap(), &mut got);
    }
    want.insert(replay.get().expect("created"), replayed);
    for (id, w) in &want {
        assert_eq!(got.get(id).unwrap_or(&Vec::new()), w, "watcher {id}");
    }
    let g3 = pick(&|k| k == "g/3", true, true);
    let got3 = got.get(&ids[8]).cloned().unwrap_or_default();
    assert_eq!(got3[..], g3[..got3.len()], "the canceled watcher's events");
    assert_eq!(
        Some(got3.len()),
        canceled_after.get(),
        "nothing after the cancel"
    );
}
