//! Unit tests of the state machine against a real redb file.
use std::sync::Arc;

use super::*;
use crate::proto::meshpb::{HistoryRecord, MemberRecord};
use crate::proto::mvccpb::{event::EventType, KeyValue};
use pb::compare::{CompareResult as R, CompareTarget as T, TargetUnion as U};
use pb::range_request::{SortOrder, SortTarget};
use pb::request_op::Request;
use pb::response_op::Response;

struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    kv: KvStore,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.redb");
    Fixture {
        kv: open_store(&path),
        path,
        _dir: dir,
    }
}

fn open_store(path: &std::path::Path) -> KvStore {
    let db = Arc::new(crate::storage::Db::new(
        redb::Database::create(path).unwrap(),
        path.to_path_buf(),
    ));
    KvStore::open(db).unwrap()
}

impl Fixture {
    /// Closes the store and opens it again from its file.
    fn reopen(self) -> Fixture {
        let Fixture { _dir, path, kv } = self;
        drop(kv);
        Fixture {
            kv: open_store(&path),
            path,
            _dir,
        }
    }
}

fn put_req(k: &str, v: &str) -> pb::PutRequest {
    pb::PutRequest {
        key: k.into(),
        value: v.into(),
        ..Default::default()
    }
}

fn del_req(k: &str, end: &str) -> pb::DeleteRangeRequest {
    pb::DeleteRangeRequest {
        key: k.into(),
        range_end: end.into(),
        prev_kv: true,
    }
}

fn range_req(k: &str, end: &str) -> pb::RangeRequest {
    pb::RangeRequest {
        key: k.into(),
        range_end: end.into(),
        ..Default::default()
    }
}

/// Apply one request in its own committed batch.
fn apply<T>(
    kv: &KvStore,
    f: impl FnOnce(&mut ApplyBatch<'_>) -> Result<T, KvError>,
) -> Result<T, KvError> {
    let mut batch = kv.begin()?;
    let out = f(&mut batch);
    batch.commit(false)?;
    out
}

/// Runs what compactions left to remove to its end, as the driver does a step a tick.
fn finish_compaction(kv: &KvStore) {
    while kv.compact_step().unwrap() {}
    assert!(!kv.compaction_pending());
}

/// The driver's durable commit: what was applied, pending records included, reaches redb.
fn flush(kv: &KvStore) {
    kv.write_pending(true).unwrap();
}

fn put(kv: &KvStore, k: &str, v: &str) -> pb::PutResponse {
    apply(kv, |b| b.put(&put_req(k, v))).unwrap()
}

fn del(kv: &KvStore, k: &str, end: &str) -> pb::DeleteRangeResponse {
    apply(kv, |b| b.delete_range(&del_req(k, end))).unwrap()
}

fn keys(resp: &pb::RangeResponse) -> Vec<String> {
    resp.kvs
        .iter()
        .map(|kv| String::from_utf8(kv.key.clone()).unwrap())
        .collect()
}

fn get(kv: &KvStore, k: &str) -> Option<KeyValue> {
    kv.range(&range_req(k, "")).unwrap().kvs.pop()
}

fn op(r: Request) -> pb::RequestOp {
    pb::RequestOp { request: Some(r) }
}

fn compare(key: &str, end: &str, target: T, result: R, operand: U) -> pb::Compare {
    pb::Compare {
        result: result as i32,
        target: target as i32,
        key: key.into(),
        range_end: end.into(),
        target_union: Some(operand),
    }
}

#[test]
fn revisions_and_versions() {
    let f = fixture();
    assert_eq!(f.kv.current_revision(), 1);
    assert_eq!(put(&f.kv, "a", "1").header.unwrap().revision, 2);
    let a = get(&f.kv, "a").unwrap();
    assert_eq!((a.create_revision, a.mod_revision, a.version), (2, 2, 1));

    apply(&f.kv, |b| b.lease_grant(7, 60)).unwrap(); // no revision
    let resp = apply(&f.kv, |b| {
        b.put(&pb::PutRequest {
            prev_kv: true,
            lease: 7,
            ..put_req("a", "2")
        })
    })
    .unwrap();
    assert_eq!(resp.prev_kv.unwrap().value, b"1");
    let a = get(&f.kv, "a").unwrap();
    assert_eq!(
        (a.create_revision, a.mod_revision, a.version, a.lease),
        (2, 3, 2, 7)
    );

    let resp = del(&f.kv, "a", "");
    assert_eq!(resp.deleted, 1);
    assert_eq!(resp.prev_kvs[0].value, b"2");
    assert_eq!(f.kv.current_revision(), 4);
    assert!(get(&f.kv, "a").is_none());

    // Deleting nothing does not create a revision.
    assert_eq!(del(&f.kv, "a", "").deleted, 0);
    assert_eq!(f.kv.current_revision(), 4);

    put(&f.kv, "a", "3");
    let a = get(&f.kv, "a").unwrap();
    assert_eq!((a.create_revision, a.mod_revision, a.version), (5, 5, 1));
    assert_eq!(f.kv.current_revision(), 5);
}

#[test]
fn ignore_value_and_lease() {
    let f = fixture();
    let missing = apply(&f.kv, |b| {
        b.put(&pb::PutRequest {
            ignore_value: true,
            ..put_req("a", "")
        })
    });
    assert!(matches!(missing, Err(KvError::KeyNotFound)));
    assert_eq!(f.kv.current_revision(), 1);

    apply(&f.kv, |b| b.lease_grant(9, 60)).unwrap();
    apply(&f.kv, |b| {
        b.put(&pb::PutRequest {
            lease: 9,
            ..put_req("a", "v")
        })
    })
    .unwrap();
    apply(&f.kv, |b| {
        b.put(&pb::PutRequest {
            ignore_value: true,
            ignore_lease: true,
            ..put_req("a", "")
        })
    })
    .unwrap();
    let a = get(&f.kv, "a").unwrap();
    assert_eq!((a.value.as_slice(), a.lease, a.version), (&b"v"[..], 9, 2));
}

fn seed(kv: &KvStore) {
    // Values chosen so that every sort target orders the keys differently.
    for (k, v) in [
        ("b", "3"),
        ("a", "2"),
        ("abc", "1"),
        ("ab", "5"),
        ("c", "4"),
    ] {
        put(kv, k, v);
    }
    put(kv, "a", "2"); // a: version 2, mod 7
}

#[test]
fn range_conventions() {
    let f = fixture();
    seed(&f.kv);
    let r = |k: &str, end: &str| keys(&f.kv.range(&range_req(k, end)).unwrap());
    assert_eq!(r("ab", ""), ["ab"]);
    assert!(r("zz", "").is_empty());
    assert_eq!(r("a", "b"), ["a", "ab", "abc"]);
    assert_eq!(r("ab", "\0"), ["ab", "abc", "b", "c"]);
    assert_eq!(r("\0", "\0"), ["a", "ab", "abc", "b", "c"]);
    assert!(r("b", "a").is_empty());

    let resp =
        f.kv.range(&pb::RangeRequest {
            limit: 2,
            ..range_req("a", "\0")
        })
        .unwrap();
    assert_eq!(
        (keys(&resp), resp.more, resp.count),
        (vec!["a".into(), "ab".into()], true, 5)
    );
    assert_eq!(resp.header.unwrap().revision, 7);

    let resp =
        f.kv.range(&pb::RangeRequest {
            limit: 5,
            ..range_req("a", "\0")
        })
        .unwrap();
    assert!(!resp.more);

    let resp =
        f.kv.range(&pb::RangeRequest {
            keys_only: true,
            ..range_req("a", "b")
        })
        .unwrap();
    assert!(resp
        .kvs
        .iter()
        .all(|kv| kv.value.is_empty() && kv.mod_revision > 0));

    let resp =
        f.kv.range(&pb::RangeRequest {
            count_only: true,
            ..range_req("a", "b")
        })
        .unwrap();
    assert!(resp.kvs.is_empty());
    assert_eq!((resp.count, resp.more), (3, false));
}

#[test]
fn range_sorting() {
    let f = fixture();
    seed(&f.kv);
    let sorted = |order: SortOrder, target: SortTarget, limit: i64| {
        keys(
            &f.kv
                .range(&pb::RangeRequest {
                    sort_order: order as i32,
                    sort_target: target as i32,
                    limit,
                    ..range_req("\0", "\0")
                })
                .unwrap(),
        )
    };
    use SortOrder::*;
    use SortTarget::*;
    // mod: b=2 abc=4 ab=5 c=6 a=7; create: b=2 a=3 abc=4 ab=5 c=6; version: a=2, rest 1.
    let cases: [(SortTarget, [&str; 5]); 5] = [
        (Key, ["a", "ab", "abc", "b", "c"]),
        (Version, ["ab", "abc", "b", "c", "a"]),
        (Create, ["b", "a", "abc", "ab", "c"]),
        (Mod, ["b", "abc", "ab", "c", "a"]),
        (Value, ["abc", "a", "b", "c", "ab"]),
    ];
    for (target, asc) in cases {
        assert_eq!(sorted(Ascend, target, 0), asc, "{target:?} ascending");
        if target != Version {
            let desc: Vec<&str> = asc.iter().rev().copied().collect();
            assert_eq!(sorted(Descend, target, 0), desc, "{target:?} descending");
        }
        // Sorting happens over all matches before the limit.
        assert_eq!(sorted(Ascend, target, 2), asc[..2], "{target:?} limited");
    }
    assert_eq!(sorted(Descend, Version, 1), ["a"]);
    // NONE order: by key for KEY, ascending for any other target.
    assert_eq!(sorted(None, Key, 0), ["a", "ab", "abc", "b", "c"]);
    assert_eq!(sorted(None, Mod, 0), ["b", "abc", "ab", "c", "a"]);
}

#[test]
fn range_revision_filters() {
    let f = fixture();
    seed(&f.kv);
    let filtered = |req: pb::RangeRequest| keys(&f.kv.range(&req).unwrap());
    let all = range_req("\0", "\0");
    assert_eq!(
        filtered(pb::RangeRequest {
            min_mod_revision: 5,
            max_mod_revision: 6,
            ..all.clone()
        }),
        ["ab", "c"]
    );
    assert_eq!(
        filtered(pb::RangeRequest {
            min_create_revision: 4,
            ..all.clone()
        }),
        ["ab", "abc", "c"]
    );
    let resp =
        f.kv.range(&pb::RangeRequest {
            max_create_revision: 3,
            ..all
        })
        .unwrap();
    // etcd counts the keys in the range, before the revision filters.
    assert_eq!((keys(&resp), resp.count), (vec!["a".into(), "b".into()], 5));
}

#[test]
fn reads_at_old_revisions() {
    let f = fixture();
    put(&f.kv, "a", "1"); // 2
    put(&f.kv, "b", "1"); // 3
    put(&f.kv, "a", "2"); // 4
    del(&f.kv, "b", ""); // 5
    let at = |rev: i64| {
        f.kv.range(&pb::RangeRequest {
            revision: rev,
            ..range_req("\0", "\0")
        })
    };
    assert!(at(1).unwrap().kvs.is_empty());
    let r3 = at(3).unwrap();
    assert_eq!(keys(&r3), ["a", "b"]);
    assert_eq!(r3.kvs[0].value, b"1");
    let r4 = at(4).unwrap();
    assert_eq!(
        (r4.kvs[0].value.as_slice(), r4.kvs[0].version),
        (&b"2"[..], 2)
    );
    assert_eq!(keys(&at(5).unwrap()), ["a"]);
    assert!(matches!(at(6), Err(KvError::FutureRevision)));
}

#[test]
fn compaction() {
    let f = fixture();
    put(&f.kv, "a", "1"); // 2
    put(&f.kv, "b", "1"); // 3
    put(&f.kv, "a", "2"); // 4
    del(&f.kv, "b", ""); // 5
    put(&f.kv, "a", "3"); // 6
    assert!(matches!(
        apply(&f.kv, |b| b.compact(7)),
        Err(KvError::FutureRevision)
    ));
    let before = f.kv.range(&range_req("\0", "\0")).unwrap();

    apply(&f.kv, |b| b.compact(5)).unwrap();
    assert_eq!((f.kv.compact_revision(), f.kv.current_revision()), (5, 6));
    assert!(matches!(
        apply(&f.kv, |b| b.compact(5)),
        Err(KvError::Compacted {
            compact_revision: 5
        })
    ));
    let at = |rev: i64| {
        f.kv.range(&pb::RangeRequest {
            revision: rev,
            ..range_req("\0", "\0")
        })
    };
    assert!(matches!(
        at(4),
        Err(KvError::Compacted {
            compact_revision: 5
        })
    ));
    let r5 = at(5).unwrap();
    assert_eq!(
        (keys(&r5), r5.kvs[0].value.clone()),
        (vec!["a".into()], b"2".to_vec())
    );
    assert_eq!(at(6).unwrap().kvs, before.kvs);
    assert_eq!(f.kv.range(&range_req("\0", "\0")).unwrap().kvs, before.kvs);

    // Only a@4 (latest ≤ 5) and a@6 remain; b's tombstone went with its history. The
    // records go after the compaction, and the hashes do not see them meanwhile.
    let hashes = (f.kv.hash().unwrap(), f.kv.hash_kv(0).unwrap());
    assert!(f.kv.compaction_pending());
    finish_compaction(&f.kv);
    assert_eq!((f.kv.hash().unwrap(), f.kv.hash_kv(0).unwrap()), hashes);
    let (_, snap) = f.kv.snapshot().unwrap();
    let kept: Vec<_> = snap.history.iter().map(|r| r.main).collect();
    assert_eq!(kept, [4, 6]);

    assert!(matches!(
        f.kv.events(4, 6, b"a", b"", false, 0),
        Err(KvError::Compacted {
            compact_revision: 5
        })
    ));
    let events = f.kv.events(5, 6, b"\0", b"\0", true, 0).unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].prev_kv.as_ref().unwrap().value, b"2");
    assert!(matches!(f.kv.hash_kv(4), Err(KvError::Compacted { .. })));
}

fn txn_succeeds(kv: &KvStore, compares: Vec<pb::Compare>) -> bool {
    kv.txn_read(&pb::TxnRequest {
        compare: compares,
        ..Default::default()
    })
    .unwrap()
    .succeeded
}

#[test]
fn txn_compares() {
    let f = fixture();
    put(&f.kv, "k", "m"); // 2
    apply(&f.kv, |b| b.lease_grant(5, 60)).unwrap();
    apply(&f.kv, |b| {
        b.put(&pb::PutRequest {
            lease: 5,
            ..put_req("k", "m")
        })
    })
    .unwrap(); // 3: k version 2, create 2, mod 3, lease 5, value "m"
    let cases: [(T, U, U, U); 5] = [
        (T::Version, U::Version(2), U::Version(1), U::Version(3)),
        (
            T::Create,
            U::CreateRevision(2),
            U::CreateRevision(1),
            U::CreateRevision(3),
        ),
        (
            T::Mod,
            U::ModRevision(3),
            U::ModRevision(2),
            U::ModRevision(4),
        ),
        (T::Lease, U::Lease(5), U::Lease(4), U::Lease(6)),
        (
            T::Value,
            U::Value(b"m".to_vec()),
            U::Value(b"a".to_vec()),
            U::Value(b"z".to_vec()),
        ),
    ];
    for (target, equal, smaller, bigger) in cases {
        let check = |result: R, operand: &U| {
            txn_succeeds(
                &f.kv,
                vec![compare("k", "", target, result, operand.clone())],
            )
        };
        assert!(check(R::Equal, &equal), "{target:?}");
        assert!(!check(R::Equal, &smaller), "{target:?}");
        assert!(check(R::NotEqual, &smaller), "{target:?}");
        assert!(!check(R::NotEqual, &equal), "{target:?}");
        assert!(check(R::Greater, &smaller), "{target:?}");
        assert!(!check(R::Greater, &equal), "{target:?}");
        assert!(check(R::Less, &bigger), "{target:?}");
        assert!(!check(R::Less, &equal), "{target:?}");
    }
    // A missing key compares as 0, except that a value compare always fails.
    let missing = |target, result, operand| {
        txn_succeeds(&f.kv, vec![compare("nope", "", target, result, operand)])
    };
    assert!(missing(T::Version, R::Equal, U::Version(0)));
    assert!(missing(T::Create, R::Equal, U::CreateRevision(0)));
    assert!(missing(T::Mod, R::Less, U::ModRevision(1)));
    assert!(missing(T::Lease, R::Equal, U::Lease(0)));
    assert!(!missing(T::Value, R::Equal, U::Value(Vec::new())));
    assert!(!missing(T::Value, R::NotEqual, U::Value(b"x".to_vec())));

    // A range compare must hold for every key in the range.
    put(&f.kv, "k2", "m"); // 4
    assert!(txn_succeeds(
        &f.kv,
        vec![compare(
            "k",
            "l",
            T::Value,
            R::Equal,
            U::Value(b"m".to_vec())
        )]
    ));
    assert!(!txn_succeeds(
        &f.kv,
        vec![compare("k", "l", T::Mod, R::Equal, U::ModRevision(4))]
    ));
    assert!(txn_succeeds(
        &f.kv,
        vec![compare("k", "l", T::Mod, R::Greater, U::ModRevision(2))]
    ));
    // All compares must hold.
    assert!(!txn_succeeds(
        &f.kv,
        vec![
            compare("k", "", T::Version, R::Equal, U::Version(2)),
            compare("k2", "", T::Version, R::Equal, U::Version(2)),
        ]
    ));
}

#[test]
fn txn_writes_share_a_revision_and_see_earlier_ops() {
    let f = fixture();
    put(&f.kv, "x", "0"); // 2
    let req = pb::TxnRequest {
        compare: vec![compare(
            "x",
            "",
            T::Value,
            R::Equal,
            U::Value(b"0".to_vec()),
        )],
        success: vec![
            op(Request::RequestPut(put_req("a", "1"))),
            op(Request::RequestRange(range_req("a", ""))),
            op(Request::RequestDeleteRange(del_req("x", ""))),
            op(Request::RequestTxn(pb::TxnRequest {
                compare: vec![compare("x", "", T::Version, R::Equal, U::Version(1))],
                success: vec![op(Request::RequestPut(put_req("n", "then")))],
                failure: vec![op(Request::RequestPut(put_req("n", "else")))],
            })),
            op(Request::RequestRange(range_req("\0", "\0"))),
        ],
        failure: vec![],
    };
    check_txn(&req, 128).unwrap();
    let resp = apply(&f.kv, |b| b.txn(&req)).unwrap();
    assert!(resp.succeeded);
    assert_eq!(resp.header.unwrap().revision, 3);
    assert_eq!(f.kv.current_revision(), 3);
    let responses: [Option<Response>; 5] = resp
        .responses
        .into_iter()
        .map(|r| r.response)
        .collect::<Vec<_>>()
        .try_into()
        .unwrap();
    let [_, Some(Response::ResponseRange(seen_a)), Some(Response::ResponseDeleteRange(d)), Some(Response::ResponseTxn(nested)), Some(Response::ResponseRange(all))] =
        responses
    else {
        panic!("unexpected response kinds");
    };
    assert_eq!(seen_a.kvs[0].value, b"1");
    assert_eq!(d.deleted, 1);
    // Nested compares are decided against the state before the txn, as in etcd.
    assert!(nested.succeeded);
    assert_eq!(keys(&all), ["a", "n"]);
    assert_eq!(all.kvs[1].value, b"then");
    let a = get(&f.kv, "a").unwrap();
    let n = get(&f.kv, "n").unwrap();
    assert_eq!((a.mod_revision, n.mod_revision), (3, 3));
    let events = f.kv.events(3, 3, b"\0", b"\0", false, 0).unwrap();
    let subs: Vec<_> = events
        .iter()
        .map(|e| (e.r#type, e.kv.as_ref().unwrap().key.clone()))
        .collect();
    assert_eq!(
        subs,
        [
            (EventType::Put as i32, b"a".to_vec()),
            (EventType::Delete as i32, b"x".to_vec()),
            (EventType::Put as i32, b"n".to_vec()),
        ]
    );

    // A txn that only reads does not create a revision.
    let read = pb::TxnRequest {
        success: vec![op(Request::RequestRange(range_req("a", "")))],
        ..Default::default()
    };
    let resp = apply(&f.kv, |b| b.txn(&read)).unwrap();
    assert_eq!(
        (resp.header.unwrap().revision, f.kv.current_revision()),
        (3, 3)
    );
    assert!(matches!(
        f.kv.txn_read(&req),
        Err(KvError::WriteInReadOnlyTxn)
    ));
}

#[test]
fn failed_request_changes_nothing() {
    let f = fixture();
    put(&f.kv, "x", "0"); // 2
    let hash = f.kv.hash_kv(0).unwrap();
    let bad = pb::TxnRequest {
        success: vec![
            op(Request::RequestPut(put_req("a", "1"))),
            op(Request::RequestDeleteRange(del_req("x", ""))),
            op(Request::RequestPut(pb::PutRequest {
                ignore_value: true,
                ..put_req("missing", "")
            })),
        ],
        ..Default::default()
    };
    let mut batch = f.kv.begin().unwrap();
    assert!(matches!(batch.txn(&bad), Err(KvError::KeyNotFound)));
    assert_eq!(batch.revision(), 2);
    // The batch stays usable for the next request.
    batch.put(&put_req("y", "1")).unwrap();
    assert_eq!(batch.revision(), 3);
    batch.commit(false).unwrap();
    assert!(get(&f.kv, "a").is_none());
    assert_eq!(get(&f.kv, "x").unwrap().value, b"0");
    assert_eq!(get(&f.kv, "y").unwrap().mod_revision, 3);
    assert_eq!(f.kv.hash_kv(2).unwrap(), hash);
}

#[test]
fn check_txn_rules() {
    let puts = |keys: &[&str]| -> Vec<pb::RequestOp> {
        keys.iter()
            .map(|k| op(Request::RequestPut(put_req(k, "v"))))
            .collect()
    };
    let txn = |success, failure| pb::TxnRequest {
        success,
        failure,
        ..Default::default()
    };
    let too_many = |r: Result<(), KvError>| matches!(r, Err(KvError::TooManyOps));
    let dup = |r: Result<(), KvError>| matches!(r, Err(KvError::DuplicateKey));

    assert!(check_txn(&txn(puts(&["a", "b"]), puts(&["a", "b"])), 2).is_ok());
    assert!(too_many(check_txn(&txn(puts(&["a", "b", "c"]), vec![]), 2)));
    assert!(too_many(check_txn(&txn(vec![], puts(&["a", "b", "c"])), 2)));
    // A nested txn gets what its parent left of the budget.
    let nested = |inner: &[&str]| {
        let mut ops = puts(&["a"]);
        ops.push(op(Request::RequestTxn(txn(puts(inner), vec![]))));
        txn(ops, vec![])
    };
    assert!(check_txn(&nested(&["b"]), 3).is_ok());
    assert!(too_many(check_txn(&nested(&["b", "c"]), 3)));

    assert!(dup(check_txn(&txn(puts(&["a", "a"]), vec![]), 8)));
    assert!(dup(check_txn(&nested(&["a"]), 8)));
    let mut put_and_delete = puts(&["ab"]);
    put_and_delete.push(op(Request::RequestDeleteRange(del_req("a", "b"))));
    assert!(dup(check_txn(&txn(put_and_delete, vec![]), 8)));
    // Two deletes of the same key, and the same key on both nested branches, are fine.
    let deletes = vec![
        op(Request::RequestDeleteRange(del_req("a", ""))),
        op(Request::RequestDeleteRange(del_req("a", "b"))),
    ];
    assert!(check_txn(&txn(deletes, vec![]), 8).is_ok());
    let both_branches = txn(
        vec![op(Request::RequestTxn(txn(puts(&["k"]), puts(&["k"]))))],
        vec![],
    );
    assert!(check_txn(&both_branches, 8).is_ok());
    // A nested put under an outer delete of the same key.
    let under_delete = txn(
        vec![
            op(Request::RequestDeleteRange(del_req("k", ""))),
            op(Request::RequestTxn(txn(vec![], puts(&["k"])))),
        ],
        vec![],
    );
    assert!(dup(check_txn(&under_delete, 8)));
    // Each branch is checked on its own.
    assert!(check_txn(&txn(puts(&["a"]), puts(&["a"])), 8).is_ok());
}

/// Revisions 2..=6: put a; a txn putting a and b; delete a; put a; put z.
fn write_event_history(kv: &KvStore) {
    put(kv, "a", "1"); // 2
    let two = pb::TxnRequest {
        success: vec![
            op(Request::RequestPut(put_req("a", "2"))),
            op(Request::RequestPut(put_req("b", "1"))),
        ],
        ..Default::default()
    };
    apply(kv, |b| b.txn(&two)).unwrap(); // 3
    del(kv, "a", ""); // 4
    put(kv, "a", "3"); // 5
    put(kv, "z", "1"); // 6
}

#[test]
fn events_replay() {
    let f = fixture();
    write_event_history(&f.kv);

    let all = f.kv.events(2, 6, b"a", b"b\0", true, 0).unwrap();
    let summary: Vec<_> = all
        .iter()
        .map(|e| {
            let kv = e.kv.as_ref().unwrap();
            (
                kv.key.clone(),
                kv.mod_revision,
                e.r#type,
                e.prev_kv.as_ref().map(|p| p.value.clone()),
            )
        })
        .collect();
    let put_ = EventType::Put as i32;
    assert_eq!(
        summary,
        [
            (b"a".to_vec(), 2, put_, None),
            (b"a".to_vec(), 3, put_, Some(b"1".to_vec())),
            (b"b".to_vec(), 3, put_, None),
            (
                b"a".to_vec(),
                4,
                EventType::Delete as i32,
                Some(b"2".to_vec())
            ),
            // The previous version is a tombstone: no prev_kv.
            (b"a".to_vec(), 5, put_, None),
        ]
    );
    let deleted = &all[3].kv.as_ref().unwrap();
    assert!(deleted.value.is_empty() && deleted.version == 0);

    // A limit never splits a revision.
    let limited = f.kv.events(2, 6, b"\0", b"\0", false, 2).unwrap();
    assert_eq!(limited.len(), 3);
    let limited = f.kv.events(4, 6, b"\0", b"\0", false, 1).unwrap();
    assert_eq!(limited.len(), 1);
    // Bounds are inclusive; no prev_kv unless asked.
    let one = f.kv.events(6, 6, b"z", b"", false, 0).unwrap();
    assert_eq!((one.len(), one[0].prev_kv.is_none()), (1, true));
    assert!(f
        .kv
        .events(7, 9, b"\0", b"\0", false, 0)
        .unwrap()
        .is_empty());
}

#[test]
fn snapshot_restore_round_trip() {
    let f = fixture();
    seed(&f.kv);
    del(&f.kv, "ab", "");
    apply(&f.kv, |b| b.compact(4)).unwrap();
    let member = MemberRecord {
        id: 7,
        name: "n7".into(),
        ..Default::default()
    };
    apply(&f.kv, |b| {
        b.put_member(&member)?;
        b.put_member(&MemberRecord {
            id: 8,
            ..Default::default()
        })?;
        b.remove_member(8)?;
        b.set_applied_index(42);
        Ok(())
    })
    .unwrap();
    let (index, snap) = f.kv.snapshot().unwrap();
    assert_eq!(index, 42);

    let g = fixture();
    put(&g.kv, "junk", "x");
    apply(&g.kv, |b| {
        b.restore(&snap)?;
        b.set_applied_index(index);
        Ok(())
    })
    .unwrap();
    assert_eq!(g.kv.applied_index(), 42);
    assert_eq!(
        (g.kv.current_revision(), g.kv.compact_revision()),
        (f.kv.current_revision(), 4)
    );
    for rev in [0, 4, 6, 8] {
        let req = pb::RangeRequest {
            revision: rev,
            ..range_req("\0", "\0")
        };
        assert_eq!(
            f.kv.range(&req).unwrap(),
            g.kv.range(&req).unwrap(),
            "rev {rev}"
        );
        assert_eq!(f.kv.hash_kv(rev).unwrap(), g.kv.hash_kv(rev).unwrap());
    }
    assert_eq!(
        f.kv.events(4, 9, b"\0", b"\0", true, 0).unwrap(),
        g.kv.events(4, 9, b"\0", b"\0", true, 0).unwrap()
    );
    assert_eq!(g.kv.members().unwrap(), vec![member]);
    assert_ne!(f.kv.hash_kv(7).unwrap().0, f.kv.hash_kv(8).unwrap().0);
}

#[test]
fn reopen_restores_counters() {
    let f = fixture();
    let mut revisions = f.kv.subscribe();
    put(&f.kv, "a", "1");
    let mut batch = f.kv.begin().unwrap();
    batch.put(&put_req("b", "1")).unwrap();
    batch.set_applied_index(9);
    batch.commit(true).unwrap();
    assert!(revisions.has_changed().unwrap());
    assert_eq!(*revisions.borrow_and_update(), 3);

    // An aborted batch changes nothing.
    let mut batch = f.kv.begin().unwrap();
    batch.put(&put_req("c", "1")).unwrap();
    drop(batch);
    assert!(!revisions.has_changed().unwrap());

    let f = f.reopen();
    assert_eq!(
        (
            f.kv.applied_index(),
            f.kv.current_revision(),
            f.kv.compact_revision()
        ),
        (9, 3, 0)
    );
    assert_eq!(
        keys(&f.kv.range(&range_req("\0", "\0")).unwrap()),
        ["a", "b"]
    );
}

/// Compactions in one batch are listed against the index before the commit and applied
/// to it after: the index must end as a reload from the tables builds it.
#[test]
fn compactions_in_one_batch_leave_the_index_a_reload_builds() {
    let f = fixture();
    for i in 0..4 {
        put(&f.kv, "a", &i.to_string());
        put(&f.kv, "b", &i.to_string());
    }
    del(&f.kv, "b", "");
    put(&f.kv, "c", "1");
    let rev = f.kv.current_revision();
    let mut batch = f.kv.begin().unwrap();
    batch.compact(rev - 6).unwrap();
    batch.put(&put_req("a", "x")).unwrap();
    batch.compact(rev - 1).unwrap();
    batch.put(&put_req("b", "again")).unwrap();
    batch.compact(rev + 1).unwrap();
    batch.put(&put_req("d", "1")).unwrap();
    batch.commit(true).unwrap();
    finish_compaction(&f.kv);
    let live = index::read(&f.kv.index).dump();

    let f = f.reopen();
    finish_compaction(&f.kv);
    let reloaded = index::read(&f.kv.index).dump();
    assert_eq!(live, reloaded);
    // a and b: their puts in the batch only (b was deleted before it); c and d.
    let counts: Vec<(String, usize)> = live
        .iter()
        .map(|(k, v)| (String::from_utf8(k.clone()).unwrap(), v.len()))
        .collect();
    assert_eq!(
        counts,
        [
            ("a".into(), 1),
            ("b".into(), 1),
            ("c".into(), 1),
            ("d".into(), 1)
        ]
    );
}

#[test]
fn store_is_shareable_across_tasks() {
    fn assert_send_sync<S: Send + Sync>() {}
    assert_send_sync::<KvStore>();
    assert_send_sync::<Arc<KvStore>>();
}

#[test]
fn members_table() {
    let f = fixture();
    assert!(f.kv.members().unwrap().is_empty());
    let m = |id| MemberRecord {
        id,
        peer_urls: vec![format!("http://10.0.0.{id}:2380")],
        ..Default::default()
    };
    apply(&f.kv, |b| {
        b.put_member(&m(2))?;
        b.put_member(&m(1))
    })
    .unwrap();
    assert_eq!(f.kv.members().unwrap(), [m(1), m(2)]);
    apply(&f.kv, |b| b.remove_member(1)).unwrap();
    assert_eq!(f.kv.members().unwrap(), [m(2)]);
    // Member changes are not key changes.
    assert_eq!(f.kv.current_revision(), 1);
}

fn alarm_req(action: pb::alarm_request::AlarmAction, member_id: u64) -> pb::AlarmRequest {
    pb::AlarmRequest {
        action: action as i32,
        member_id,
        alarm: pb::AlarmType::Nospace as i32,
    }
}

#[test]
fn nospace_alarm_refuses_only_writes_that_add_data_and_travels_in_snapshots() {
    use pb::alarm_request::AlarmAction;
    let f = fixture();
    put(&f.kv, "a", "1");
    let raised = apply(&f.kv, |b| b.alarm(&alarm_req(AlarmAction::Activate, 5))).unwrap();
    assert_eq!(raised.len(), 1);
    assert!(f.kv.nospace());
    assert_eq!(f.kv.alarms().unwrap(), raised);

    let err = apply(&f.kv, |b| b.put(&put_req("b", "2"))).unwrap_err();
    assert!(matches!(err, KvError::NoSpace));
    assert_eq!(err.to_string(), "etcdserver: mvcc: database space exceeded");
    let nested_put = pb::TxnRequest {
        failure: vec![pb::RequestOp {
            request: Some(Request::RequestTxn(pb::TxnRequest {
                success: vec![pb::RequestOp {
                    request: Some(Request::RequestPut(put_req("c", "3"))),
                }],
                ..Default::default()
            })),
        }],
        ..Default::default()
    };
    assert!(matches!(
        apply(&f.kv, |b| b.txn(&nested_put)),
        Err(KvError::NoSpace)
    ));
    let reads_only = pb::TxnRequest {
        success: vec![pb::RequestOp {
            request: Some(Request::RequestRange(range_req("a", ""))),
        }],
        ..Default::default()
    };
    apply(&f.kv, |b| b.txn(&reads_only)).unwrap();
    assert_eq!(del(&f.kv, "a", "").deleted, 1);
    let rev = f.kv.current_revision();
    apply(&f.kv, |b| b.compact(rev)).unwrap();

    // The alarm is part of the replicated state.
    let (_, snap) = f.kv.snapshot().unwrap();
    let g = fixture();
    apply(&g.kv, |b| b.restore(&snap)).unwrap();
    assert!(g.kv.nospace());
    assert_eq!(g.kv.alarms().unwrap(), raised);

    // Clearing an alarm that is not there changes nothing and reports nothing.
    assert!(
        apply(&f.kv, |b| b.alarm(&alarm_req(AlarmAction::Deactivate, 6)))
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        apply(&f.kv, |b| b.alarm(&alarm_req(AlarmAction::Deactivate, 5))).unwrap(),
        raised
    );
    assert!(!f.kv.nospace());
    put(&f.kv, "b", "2");
    let bad = pb::AlarmRequest {
        alarm: pb::AlarmType::None as i32,
        ..alarm_req(AlarmAction::Activate, 5)
    };
    assert!(matches!(
        apply(&f.kv, |b| b.alarm(&bad)),
        Err(KvError::InvalidAlarm)
    ));
}

#[test]
fn leases_attach_move_detach_and_revoke_in_one_revision() {
    let f = fixture();
    let leased = |k: &str, lease: i64| pb::PutRequest {
        lease,
        ..put_req(k, "v")
    };
    let missing = apply(&f.kv, |b| b.put(&leased("a", 1)));
    assert!(matches!(missing, Err(KvError::LeaseNotFound)));
    apply(&f.kv, |b| b.lease_grant(1, 10)).unwrap();
    apply(&f.kv, |b| b.lease_grant(2, 20)).unwrap();
    assert!(matches!(
        apply(&f.kv, |b| b.lease_grant(1, 5)),
        Err(KvError::LeaseExists)
    ));
    for k in ["a", "b", "c", "d"] {
        apply(&f.kv, |b| b.put(&leased(k, 1))).unwrap();
    }
    // Move c to lease 2, detach d by a plain put, delete b.
    apply(&f.kv, |b| b.put(&leased("c", 2))).unwrap();
    put(&f.kv, "d", "plain");
    del(&f.kv, "b", "");
    assert_eq!(f.kv.lease_keys(1).unwrap(), vec![b"a".to_vec()]);
    assert_eq!(f.kv.lease_keys(2).unwrap(), vec![b"c".to_vec()]);
    // ignore_lease keeps the attachment.
    apply(&f.kv, |b| {
        b.put(&pb::PutRequest {
            ignore_lease: true,
            ..put_req("c", "w")
        })
    })
    .unwrap();
    assert_eq!(f.kv.lease_keys(2).unwrap(), vec![b"c".to_vec()]);

    apply(&f.kv, |b| b.put(&leased("e", 1))).unwrap();
    let before = f.kv.current_revision();
    let resp = apply(&f.kv, |b| b.lease_revoke(1)).unwrap();
    assert_eq!(resp.header.unwrap().revision, before + 1);
    assert!(get(&f.kv, "a").is_none() && get(&f.kv, "e").is_none());
    let events =
        f.kv.events(before + 1, before + 1, b"a", b"z", false, 0)
            .unwrap();
    assert_eq!(events.len(), 2, "both keys deleted in one revision");
    assert!(f.kv.lease(1).unwrap().is_none());
    assert!(matches!(
        apply(&f.kv, |b| b.lease_revoke(1)),
        Err(KvError::LeaseNotFound)
    ));

    // A snapshot carries the leases and, through the keys, the attachments.
    let (_, snap) = f.kv.snapshot().unwrap();
    assert_eq!(snap.leases.len(), 1);
    let g = fixture();
    apply(&g.kv, |b| b.restore(&snap)).unwrap();
    assert_eq!(g.kv.lease(2).unwrap(), Some(20));
    assert_eq!(g.kv.lease_keys(2).unwrap(), vec![b"c".to_vec()]);
    apply(&g.kv, |b| b.lease_revoke(2)).unwrap();
    assert!(get(&g.kv, "c").is_none());
}

/// Rewrites one stored record behind the state machine's back with a valid redb
/// commit (so redb's own page checksums match): only our record checksum can tell.
fn tamper(f: &Fixture, rev: i64, at: impl Fn(usize) -> usize, bit: u8) {
    flush(&f.kv);
    let txn = f.kv.db.begin_write().unwrap();
    {
        let mut t = txn.open_table(tables::REVS).unwrap();
        let mut raw = t
            .get((rev, 0))
            .unwrap()
            .expect("record exists")
            .value()
            .to_vec();
        let i = at(raw.len());
        raw[i] ^= bit;
        t.insert((rev, 0), raw.as_slice()).unwrap();
    }
    txn.commit().unwrap();
}

#[test]
fn a_flipped_byte_in_a_live_record_is_reported_not_served() {
    let f = fixture();
    let rev = put(&f.kv, "a", "value-a").header.unwrap().revision;
    put(&f.kv, "b", "value-b");
    tamper(&f, rev, |len| len / 2, 0x01);
    let err =
        f.kv.range(&pb::RangeRequest {
            key: b"a".to_vec(),
            ..Default::default()
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            KvError::Store(StoreError::Corrupt {
                table: "kv_revs",
                ..
            })
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("checksum mismatch"), "{err}");
    let status = crate::api::kv_status(err);
    assert_eq!(status.code(), tonic::Code::DataLoss);
    assert_eq!(status.message(), "etcdserver: corrupt cluster");
    // Other keys are still served.
    assert!(get(&f.kv, "b").is_some());
    // Reopening reads every record into the key index: it refuses the data dir.
    let err = f.kv.reload().unwrap_err();
    assert!(
        matches!(err, KvError::Store(StoreError::Corrupt { .. })),
        "{err:?}"
    );
}

#[test]
fn a_flipped_byte_in_an_old_version_is_reported_not_served() {
    let f = fixture();
    let first = put(&f.kv, "a", "old").header.unwrap().revision;
    put(&f.kv, "a", "new");
    tamper(&f, first, |len| len - 1, 0x80);
    let err =
        f.kv.range(&pb::RangeRequest {
            key: b"a".to_vec(),
            revision: first,
            ..Default::default()
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            KvError::Store(StoreError::Corrupt {
                table: "kv_revs",
                ..
            })
        ),
        "{err:?}"
    );
    // The current version is still served.
    assert_eq!(get(&f.kv, "a").unwrap().value, b"new");
    // HashKV reads every record: it refuses too rather than hash corrupt data.
    assert!(matches!(
        f.kv.hash_kv(0),
        Err(KvError::Store(StoreError::Corrupt { .. }))
    ));
}

/// Watchers read recent revisions through a shared cache: it answers exactly as the
/// store does, for every key range, prev_kv and limit, and not at all for compacted
/// revisions.
#[test]
fn cached_events_answer_as_the_store() {
    let f = fixture();
    write_event_history(&f.kv);
    let ranges: [(&[u8], &[u8]); 5] = [
        (b"a", b"b\0"),
        (b"\0", b"\0"),
        (b"z", b""),
        (b"a", b""),
        (b"b", b"\0"),
    ];
    for (key, end) in ranges {
        for prev_kv in [false, true] {
            for limit in [0, 1, 2] {
                for (start, stop) in [(2, 6), (3, 5), (4, 4), (6, 9), (7, 9)] {
                    // Twice: the first call may fill the cache, the second reads it.
                    for _ in 0..2 {
                        let cached = f.kv.events(start, stop, key, end, prev_kv, limit).unwrap();
                        let stored =
                            f.kv.events_from_store(
                                start,
                                stop,
                                &Interval::new(key, end),
                                prev_kv,
                                limit,
                            )
                            .unwrap();
                        assert_eq!(
                            cached, stored,
                            "{key:?} {end:?} {prev_kv} {limit} {start}..={stop}"
                        );
                    }
                }
            }
        }
    }
    // A span asked for before its revisions exist is not kept for after.
    assert!(f
        .kv
        .events(7, 8, b"\0", b"\0", false, 0)
        .unwrap()
        .is_empty());
    put(&f.kv, "y", "1"); // 7
    assert_eq!(f.kv.events(7, 8, b"\0", b"\0", false, 0).unwrap().len(), 1);
    apply(&f.kv, |b| b.compact(5)).unwrap();
    assert!(matches!(
        f.kv.events(3, 4, b"\0", b"\0", false, 0),
        Err(KvError::Compacted { .. })
    ));
}

/// A data dir written before `kv_revs` (versions by key, live keys, revision order)
/// is converted on open and serves the same current and historical reads.
#[test]
fn a_legacy_layout_is_converted_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.redb");
    let kv = |key: &str, value: &str, create: i64, main: i64, version: i64| KeyValue {
        key: key.into(),
        value: value.into(),
        create_revision: create,
        mod_revision: main,
        version,
        lease: 0,
    };
    // a@2, b@3, a@4, b deleted @5.
    let versions = [
        (false, kv("a", "1", 2, 2, 1)),
        (false, kv("b", "x", 3, 3, 1)),
        (false, kv("a", "2", 2, 4, 2)),
        (true, kv("b", "", 0, 5, 0)),
    ];
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut history = txn.open_table(tables::LEGACY_HISTORY).unwrap();
            let mut revlog = txn.open_table(tables::LEGACY_REVLOG).unwrap();
            let mut latest = txn.open_table(tables::LEGACY_LATEST).unwrap();
            for (tombstone, kv) in &versions {
                let record = tables::encode_record(*tombstone, kv);
                history
                    .insert((kv.key.as_slice(), kv.mod_revision, 0), record.as_slice())
                    .unwrap();
                revlog
                    .insert((kv.mod_revision, 0), kv.key.as_slice())
                    .unwrap();
            }
            latest.insert(&b"a"[..], &b"unused"[..]).unwrap();
            let meta = Meta {
                current_revision: 5,
                compact_revision: 0,
                applied_index: 9,
                index_epoch: 0,
                removed_through: 0,
            };
            meta.store(&mut txn.open_table(META).unwrap()).unwrap();
        }
        txn.commit().unwrap();
    }
    let db = Arc::new(crate::storage::Db::new(
        redb::Database::open(&path).unwrap(),
        path.clone(),
    ));
    let store = KvStore::open(db.clone()).unwrap();
    assert_eq!(store.current_revision(), 5);
    assert_eq!(store.applied_index(), 9);
    let all = store.range(&range_req("\0", "\0")).unwrap();
    assert_eq!(all.kvs, vec![versions[2].1.clone()]);
    let at3 = store
        .range(&pb::RangeRequest {
            revision: 3,
            ..range_req("\0", "\0")
        })
        .unwrap();
    assert_eq!(at3.kvs, vec![versions[0].1.clone(), versions[1].1.clone()]);
    let names: Vec<String> = db
        .begin_read()
        .unwrap()
        .list_tables()
        .unwrap()
        .map(|t| t.name().to_string())
        .collect();
    assert!(
        !names
            .iter()
            .any(|n| n == "kv_history" || n == "kv_latest" || n == "kv_revlog"),
        "{names:?}"
    );
    // Opening again finds nothing left to convert.
    drop(store);
    let store = KvStore::open(db).unwrap();
    assert_eq!(store.range(&range_req("a", "")).unwrap().kvs[0].value, b"2");
}

/// A batch dropped without a commit takes its versions out of the key index again:
/// the entries are applied anew, at the same revisions, after it.
#[test]
fn a_dropped_batch_leaves_no_versions_in_the_index() {
    let f = fixture();
    put(&f.kv, "a", "1");
    {
        let mut batch = f.kv.begin().unwrap();
        batch.put(&put_req("a", "lost")).unwrap();
        batch.put(&put_req("b", "lost")).unwrap();
        // Within the batch its own writes are visible.
        batch
            .txn(&pb::TxnRequest {
                compare: vec![],
                success: vec![op(Request::RequestRange(range_req("b", "")))],
                failure: vec![],
            })
            .unwrap();
    }
    assert_eq!(get(&f.kv, "a").unwrap().value, b"1");
    assert!(get(&f.kv, "b").is_none());
    let again = put(&f.kv, "a", "2");
    let b = put(&f.kv, "b", "2");
    assert_eq!(
        again.header.unwrap().revision + 1,
        b.header.unwrap().revision
    );
    assert_eq!(get(&f.kv, "a").unwrap().version, 2);
    let events = f.kv.events(0, 100, b"\0", b"\0", true, 0).unwrap();
    assert_eq!(events.len(), 3);
    assert_eq!(events[1].prev_kv.as_ref().unwrap().value, b"1");
    // What a reopen sees is what the index had.
    flush(&f.kv);
    f.kv.reload().unwrap();
    assert_eq!(get(&f.kv, "a").unwrap().value, b"2");
    assert_eq!(f.kv.events(0, 100, b"\0", b"\0", true, 0).unwrap(), events);
}

/// Reads racing compactions and puts: a compaction removes versions that older
/// snapshots still need, so a read whose snapshot predates one starts over. Every
/// read must see every key, each at a value it really had at that revision.
#[test]
fn reads_racing_compactions_see_whole_consistent_states() {
    let f = Arc::new(fixture());
    const KEYS: usize = 20;
    for k in 0..KEYS {
        put(&f.kv, &format!("k{k:02}"), "0");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (f, stop) = (f.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut reads = 0;
            while !stop.load(Ordering::Relaxed) {
                let r = f.kv.range(&range_req("\0", "\0")).unwrap();
                assert_eq!(r.kvs.len(), KEYS, "a read lost keys");
                let rev = r.header.unwrap().revision;
                assert!(r.kvs.iter().all(|kv| kv.mod_revision <= rev));
                reads += 1;
            }
            reads
        })
    };
    // Each compaction leaves only the newest version of the key just written, so a
    // snapshot from before the put needs the one it removed.
    for round in 1..=100 {
        for k in 0..KEYS {
            put(&f.kv, &format!("k{k:02}"), &round.to_string());
            let rev = f.kv.current_revision();
            apply(&f.kv, |b| b.compact(rev)).unwrap();
        }
    }
    stop.store(true, Ordering::Relaxed);
    let reads = reader.join().expect("reader");
    assert!(reads > 0);
    let all = f.kv.range(&range_req("\0", "\0")).unwrap();
    assert!(all.kvs.iter().all(|kv| kv.value == b"100"));
}

// -- records applied to memory (`pending`) --

/// Plain writes wait in memory; redb gets them with the next batch that has a write
/// transaction, and a reader whose transaction began before that flush still finds
/// them although they have left `pending`.
#[test]
fn a_read_begun_before_a_flush_finds_the_records_it_moved() {
    let f = fixture();
    put(&f.kv, "a", "1");
    put(&f.kv, "b", "2");
    del(&f.kv, "a", "");
    let in_redb = |kv: &KvStore| {
        let txn = kv.db.begin_read().unwrap();
        let t = txn.open_table(tables::REVS).unwrap();
        use redb::ReadableTableMetadata;
        t.len().unwrap()
    };
    assert_eq!(in_redb(&f.kv), 0, "plain writes are not in redb yet");
    assert_eq!(pending::read(&f.kv.pending).rows().len(), 3);
    let events_before = f.kv.events(0, 100, b"\0", b"\0", true, 0).unwrap();

    let (value, events, hash) =
        f.kv.snapshot_read(|view, meta, _| {
            // The flush commits and empties `pending` while this read's
            // transaction still shows redb without the records.
            flush(&f.kv);
            assert!(pending::read(&f.kv.pending).rows().is_empty());
            let value = view.get(b"b")?.map(|kv| kv.value);
            let events =
                history::events(&view, (0, 100), &Interval::new(b"\0", b"\0"), true, 0, 0)?;
            let mut hasher = history::HashKv::default();
            hasher.records(&view, meta.current_revision, meta.compact_revision)?;
            Ok((value, events, hasher.finish()))
        })
        .unwrap();
    assert_eq!(value.as_deref(), Some(&b"2"[..]));
    assert_eq!(events, events_before);
    assert_eq!(in_redb(&f.kv), 3);
    assert_eq!(hash, f.kv.hash_kv(0).unwrap().0);
    // And after a reopen from the file, the same history.
    f.kv.reload().unwrap();
    assert_eq!(f.kv.events(0, 100, b"\0", b"\0", true, 0).unwrap(), events);
}

/// What a batch applies is not visible before it is published: not to point reads,
/// scans of the history, the hash or a snapshot, though its records are already
/// pending.
#[test]
fn an_unpublished_batch_is_invisible_to_readers() {
    let f = fixture();
    put(&f.kv, "a", "1");
    let hash = f.kv.hash_kv(0).unwrap();
    let (_, snap) = f.kv.snapshot().unwrap();
    let mut batch = f.kv.begin().unwrap();
    batch.put(&put_req("a", "2")).unwrap();
    batch.put(&put_req("b", "2")).unwrap();
    assert_eq!(pending::read(&f.kv.pending).rows().len(), 3);
    assert_eq!(get(&f.kv, "a").unwrap().value, b"1");
    assert!(get(&f.kv, "b").is_none());
    assert_eq!(
        f.kv.events(0, 100, b"\0", b"\0", false, 0).unwrap().len(),
        1
    );
    assert_eq!(f.kv.hash_kv(0).unwrap(), hash);
    assert_eq!(f.kv.snapshot().unwrap().1, snap);
    batch.commit(false).unwrap();
    assert_eq!(get(&f.kv, "b").unwrap().value, b"2");
    assert_eq!(
        f.kv.events(0, 100, b"\0", b"\0", false, 0).unwrap().len(),
        3
    );
}

/// A batch that starts with plain writes and then needs a write transaction (a lease)
/// writes the earlier ones into it first: nothing is lost, reordered or doubled, and
/// the lease attachments are in the table.
#[test]
fn a_batch_that_opens_its_transaction_midway_keeps_its_earlier_writes() {
    let f = fixture();
    put(&f.kv, "a", "1");
    let mut batch = f.kv.begin().unwrap();
    batch.put(&put_req("b", "1")).unwrap();
    batch.lease_grant(3, 60).unwrap();
    batch
        .put(&pb::PutRequest {
            key: b"c".to_vec(),
            value: b"1".to_vec(),
            lease: 3,
            ..Default::default()
        })
        .unwrap();
    batch.put(&put_req("d", "1")).unwrap();
    batch.commit(false).unwrap();
    assert!(pending::read(&f.kv.pending).rows().is_empty());
    assert_eq!(
        pending::read(&f.kv.pending).flushed,
        f.kv.current_revision()
    );
    assert_eq!(f.kv.lease_keys(3).unwrap(), vec![b"c".to_vec()]);
    let revs: Vec<i64> =
        f.kv.events(0, 100, b"\0", b"\0", false, 0)
            .unwrap()
            .iter()
            .map(|e| e.kv.as_ref().unwrap().mod_revision)
            .collect();
    assert_eq!(revs, vec![2, 3, 4, 5]);
    // Writes after it wait in memory again, on top of what redb holds.
    put(&f.kv, "e", "1");
    assert_eq!(pending::read(&f.kv.pending).rows().len(), 1);
    let all = f.kv.range(&range_req("\0", "\0")).unwrap();
    assert_eq!(keys(&all), vec!["a", "b", "c", "d", "e"]);
}

/// A snapshot written to a file element by element decodes as the same StoreSnapshot
/// the in-memory path builds, and restoring it element by element gives the same store
/// (keys at every revision, leases and their keys, members, alarms, auth, hashes).
/// The state both snapshot paths are checked on: the seed keys, a deletion, a lease
/// with a key attached, `bulk` more puts (over 1,000 keys), a compaction at revision
/// 4, a member, an alarm, and applied index 42.
fn snapshot_state(kv: &KvStore, bulk: usize) {
    seed(kv);
    del(kv, "ab", "");
    apply(kv, |b| b.lease_grant(5, 100)).unwrap();
    apply(kv, |b| {
        b.put(&pb::PutRequest {
            lease: 5,
            ..put_req("leased", "v")
        })
    })
    .unwrap();
    for i in 0..bulk {
        put(kv, &format!("bulk/{:05}", i % 1_000), &"x".repeat(300));
    }
    apply(kv, |b| b.compact(4)).unwrap();
    apply(kv, |b| {
        b.put_member(&MemberRecord {
            id: 7,
            name: "n7".into(),
            ..Default::default()
        })?;
        b.alarm(&pb::AlarmRequest {
            action: pb::alarm_request::AlarmAction::Activate as i32,
            member_id: 7,
            alarm: pb::AlarmType::Corrupt as i32,
        })?;
        b.set_applied_index(42);
        Ok(())
    })
    .unwrap();
}

#[test]
fn a_snapshot_file_restores_what_the_in_memory_snapshot_restores() {
    let f = fixture();
    snapshot_state(&f.kv, 0);
    let (_, in_memory) = f.kv.snapshot().unwrap();
    let (index, txn) = f.kv.snapshot_txn().unwrap();
    assert_eq!(index, 42);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snap");
    let written =
        super::snapfile::write_snapshot(&crate::storage::vfs::RealFs, &txn, &path).unwrap();
    drop(txn);
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(written.len, bytes.len() as u64);
    assert_eq!(written.applied_index, 42);
    use sha2::Digest;
    assert_eq!(
        written.sha256,
        <[u8; 32]>::from(sha2::Sha256::digest(&bytes))
    );
    assert_eq!(StoreSnapshot::decode(bytes.as_slice()).unwrap(), in_memory);

    let g = fixture();
    put(&g.kv, "junk", "x");
    apply(&g.kv, |b| {
        b.restore_file(&path, &written.sha256)?;
        b.set_applied_index(index);
        Ok(())
    })
    .unwrap();
    let h = fixture();
    apply(&h.kv, |b| b.restore(&in_memory)).unwrap();
    for rev in [0, 4, 6, 8] {
        let req = pb::RangeRequest {
            revision: rev,
            ..range_req("\0", "\0")
        };
        assert_eq!(
            g.kv.range(&req).unwrap(),
            f.kv.range(&req).unwrap(),
            "rev {rev}"
        );
    }
    assert_eq!(g.kv.hash().unwrap(), h.kv.hash().unwrap());
    assert_eq!(g.kv.hash_kv(0).unwrap(), f.kv.hash_kv(0).unwrap());
    assert_eq!(g.kv.lease_keys(5).unwrap(), vec![b"leased".to_vec()]);
    assert_eq!(g.kv.members().unwrap(), f.kv.members().unwrap());
    assert_eq!(g.kv.alarms().unwrap(), f.kv.alarms().unwrap());
    assert_eq!(g.kv.applied_index(), 42);
    // Restored twice over itself, the same.
    apply(&g.kv, |b| b.restore_file(&path, &written.sha256)).unwrap();
    assert_eq!(g.kv.hash().unwrap(), h.kv.hash().unwrap());

    // Bytes read back that are not the ones announced (the file is not fsync'ed, so a
    // failed writeback could change them) are refused, and nothing changes.
    let mut other = written.sha256;
    other[0] ^= 1;
    let err = apply(&g.kv, |b| b.restore_file(&path, &other)).unwrap_err();
    assert!(err.to_string().contains("SHA-256"), "{err}");
    assert_eq!(g.kv.hash().unwrap(), h.kv.hash().unwrap());

    // A file cut inside an element, or one with an oversized element, is refused (a
    // cut between elements is caught by the length and hash the sender announces).
    let cut = &bytes[..bytes.len() / 2];
    std::fs::write(&path, cut).unwrap();
    let k = fixture();
    let cut_sha = sha2::Sha256::digest(cut);
    assert!(apply(&k.kv, |b| b.restore_file(&path, &cut_sha)).is_err());
    let mut huge = Vec::new();
    prost::encoding::encode_key(3, prost::encoding::WireType::LengthDelimited, &mut huge);
    prost::encoding::encode_varint(super::snapfile::MAX_ELEMENT_BYTES + 1, &mut huge);
    assert!(super::snapfile::read_snapshot(huge.as_slice(), |_| Ok(())).is_err());

    // Records out of revision order (or twice) would file versions newest-first in
    // the index: refused, and the member keeps what it had.
    let record = |main| HistoryRecord {
        main,
        kv: Some(KeyValue {
            key: b"k".to_vec(),
            mod_revision: main,
            ..Default::default()
        }),
        ..Default::default()
    };
    for history in [vec![record(5), record(3)], vec![record(3), record(3)]] {
        let unordered = StoreSnapshot {
            revision: 5,
            history,
            ..Default::default()
        };
        let unordered = unordered.encode_to_vec();
        std::fs::write(&path, &unordered).unwrap();
        // As the driver does: a failed install drops its batch uncommitted.
        let mut batch = g.kv.begin().unwrap();
        let err = batch
            .restore_file(&path, &sha2::Sha256::digest(&unordered))
            .unwrap_err();
        drop(batch);
        assert!(err.to_string().contains("out of revision order"), "{err}");
        assert_eq!(g.kv.hash().unwrap(), h.kv.hash().unwrap());
    }
}

/// The snapshot the Maintenance API streams, written from one read as it goes, is
/// byte for byte the file built from the in-memory snapshot: history over many pages
/// (with deletions, a compaction and records still waiting in memory), leases,
/// members, alarms.
#[test]
fn a_streamed_etcd_snapshot_equals_the_one_built_in_memory() {
    let f = fixture();
    snapshot_state(&f.kv, 3_000);
    put(&f.kv, "late", "in memory");
    del(&f.kv, "late", "");
    assert!(!pending::read(&f.kv.pending).rows().is_empty());

    let (_, in_memory) = f.kv.snapshot().unwrap();
    let built = crate::snapshot::encode(&in_memory).unwrap();
    let mut streamed = Vec::new();
    let mut told = None;
    let revision =
        f.kv.write_etcd_snapshot(&mut streamed, |out: &mut Vec<u8>, len, rev| {
            assert!(out.is_empty(), "told before the first byte");
            told = Some((len, rev));
            Ok(())
        })
        .unwrap();
    assert_eq!(revision, in_memory.revision);
    assert_eq!(told, Some((built.len() as u64, in_memory.revision)));
    assert!(built.len() > 1 << 20, "the history spans many pages");
    assert!(streamed == built, "streamed and built snapshots differ");
    crate::snapshot::verify(&streamed).unwrap();
}

/// Count-only and keys-only ranges are answered from the key index; they must equal
/// the full read with the values dropped, at every revision, for every interval and
/// filter, and inside a txn that wrote (where the full read is used).
/// Count-only, keys-only and limited ranges (answered from the key index) agree
/// with the full read at every revision of `f`.
fn check_index_answers(f: &Fixture) {
    let last = f.kv.current_revision();
    let intervals = [
        ("a", ""),
        ("b", ""),
        ("a", "c"),
        ("\0", "\0"),
        ("c", "\0"),
        ("z", ""),
    ];
    for rev in 0..=last {
        for (k, end) in intervals {
            for filter in [0, 3] {
                let base = pb::RangeRequest {
                    revision: rev,
                    min_mod_revision: filter,
                    ..range_req(k, end)
                };
                let full = f.kv.range(&base).unwrap();
                let keys_only =
                    f.kv.range(&pb::RangeRequest {
                        keys_only: true,
                        ..base.clone()
                    })
                    .unwrap();
                let mut stripped = full.clone();
                stripped.kvs.iter_mut().for_each(|kv| kv.value.clear());
                assert_eq!(keys_only, stripped, "keys-only {k:?}..{end:?} at {rev}");
                let count_only =
                    f.kv.range(&pb::RangeRequest {
                        count_only: true,
                        ..base.clone()
                    })
                    .unwrap();
                assert_eq!(
                    count_only.count, full.count,
                    "count {k:?}..{end:?} at {rev}"
                );
                assert!(count_only.kvs.is_empty() && !count_only.more);
                assert_eq!(count_only.header, full.header);
                // A limited range is the full one cut short, with or without values.
                for limit in [1, 2, 10] {
                    for keys_only in [false, true] {
                        let got =
                            f.kv.range(&pb::RangeRequest {
                                limit,
                                keys_only,
                                ..base.clone()
                            })
                            .unwrap();
                        let mut want = if keys_only {
                            stripped.clone()
                        } else {
                            full.clone()
                        };
                        want.more = want.kvs.len() > limit as usize;
                        want.kvs.truncate(limit as usize);
                        assert_eq!(got, want, "limit {limit} {k:?}..{end:?} at {rev}");
                    }
                }
            }
        }
    }
}

#[test]
fn count_and_keys_only_from_the_index_equal_the_full_read() {
    let f = fixture();
    apply(&f.kv, |b| b.lease_grant(7, 100)).unwrap();
    put(&f.kv, "a", "1");
    put(&f.kv, "b", "1");
    apply(&f.kv, |b| {
        b.put(&pb::PutRequest {
            lease: 7,
            ..put_req("c", "1")
        })
    })
    .unwrap();
    put(&f.kv, "a", "2");
    del(&f.kv, "b", "");
    put(&f.kv, "d", "1");
    put(&f.kv, "b", "3");
    put(&f.kv, "e", "1");
    del(&f.kv, "e", "");
    check_index_answers(&f);
    // A reopened store's index is loaded from the records: the same answers.
    f.kv.write_pending(true).unwrap();
    let f = f.reopen();
    assert_eq!(f.kv.range(&range_req("\0", "\0")).unwrap().count, 4);
    check_index_answers(&f);
    let last = f.kv.current_revision();
    // A compacted or future revision is refused the same way.
    apply(&f.kv, |b| b.compact(3)).unwrap();
    let at = |revision| pb::RangeRequest {
        revision,
        count_only: true,
        ..range_req("a", "")
    };
    assert!(matches!(f.kv.range(&at(2)), Err(KvError::Compacted { .. })));
    assert!(matches!(
        f.kv.range(&at(last + 1)),
        Err(KvError::FutureRevision)
    ));
    // Inside a txn that wrote, its own writes count.
    let txn = pb::TxnRequest {
        success: vec![
            pb::RequestOp {
                request: Some(Request::RequestPut(put_req("e", "1"))),
            },
            pb::RequestOp {
                request: Some(Request::RequestRange(pb::RangeRequest {
                    count_only: true,
                    ..range_req("\0", "\0")
                })),
            },
        ],
        ..Default::default()
    };
    let resp = apply(&f.kv, |b| b.txn(&txn)).unwrap();
    let Some(Response::ResponseRange(r)) = &resp.responses[1].response else {
        panic!("{resp:?}");
    };
    assert_eq!(r.count, 5, "a, b, c, d and the txn's own e");
}

#[test]
fn events_from_the_cache_match_the_store_for_any_span() {
    let f = fixture();
    let base = f.kv.current_revision();
    for i in 0..200 {
        put(&f.kv, &format!("k{}", i % 7), &i.to_string());
    }
    let head = f.kv.current_revision();
    let from_store = |start: i64, end: i64, key: &[u8], range_end: &[u8], prev: bool, limit| {
        f.kv.events_from_store(start, end, &Interval::new(key, range_end), prev, limit)
            .unwrap()
    };
    // Watchers at the head read short spans: the window grows with them.
    let mut at = base + 1;
    while at <= head {
        let end = (at + 40).min(head);
        assert_eq!(
            f.kv.events(at, end, b"k3", b"", true, 0).unwrap(),
            from_store(at, end, b"k3", b"", true, 0)
        );
        at = end + 1;
    }
    let window = f.kv.recent_events.lock().unwrap().window;
    assert_eq!(window, Some((base + 1, head)));
    // A watcher far behind, within the window, is served from it: every key or one,
    // with or without previous values, and a limit that never splits a revision.
    for (start, key, range_end, prev, limit) in [
        (base + 1, &b"\0"[..], &b"\0"[..], true, 0),
        (base + 5, b"k", b"l", false, 0),
        (base + 20, b"k5", b"", true, 3),
        (base + 100, b"\0", b"\0", false, 1000),
    ] {
        assert_eq!(
            f.kv.events(start, head, key, range_end, prev, limit)
                .unwrap(),
            from_store(start, head, key, range_end, prev, limit),
            "from {start}"
        );
    }
    assert_eq!(f.kv.recent_events.lock().unwrap().window, window);
    // Older than the window: read from the store, the window left to the head.
    assert_eq!(
        f.kv.events(base, head, b"\0", b"\0", true, 0).unwrap(),
        from_store(base, head, b"\0", b"\0", true, 0)
    );
    assert_eq!(f.kv.recent_events.lock().unwrap().window, window);
}

/// Records in `kv_revs` (pending ones written first).
fn records_in_redb(kv: &KvStore) -> u64 {
    flush(kv);
    let txn = kv.db.begin_read().unwrap();
    use redb::ReadableTableMetadata;
    txn.open_table(tables::REVS).unwrap().len().unwrap()
}

/// A compaction's removals, spread over steps (several walk steps and several removal
/// commits here), never change what the member answers or hashes, whether it is
/// reopened or its state snapshotted halfway; two members at different points of the
/// job agree, and both end with the same records.
#[test]
fn compaction_removals_in_steps_change_no_answer_and_no_hash() {
    use super::compaction::{STEP_KEYS, STEP_RECORDS};
    let keys = STEP_KEYS + 1000;
    let write = |kv: &KvStore| {
        for round in 0..3 {
            apply(kv, |b| {
                for k in 0..keys {
                    if round == 2 && k % 7 == 0 {
                        b.delete_range(&pb::DeleteRangeRequest {
                            key: format!("k{k:05}").into_bytes(),
                            ..Default::default()
                        })?;
                    } else {
                        b.put(&put_req(&format!("k{k:05}"), &format!("{round}")))?;
                    }
                }
                Ok(())
            })
            .unwrap();
        }
    };
    let (done, halfway) = (fixture(), fixture());
    write(&done.kv);
    write(&halfway.kv);
    let compact = done.kv.current_revision() - 100;
    let later = |kv: &KvStore| {
        apply(kv, |b| b.compact(compact)).unwrap();
        put(kv, "k00003", "after");
    };
    later(&done.kv);
    later(&halfway.kv);
    finish_compaction(&done.kv);
    let rev = done.kv.current_revision();
    let answers = |kv: &KvStore| {
        let at = |r| {
            kv.range(&pb::RangeRequest {
                revision: r,
                ..range_req("\0", "\0")
            })
            .unwrap()
            .kvs
        };
        (
            kv.hash().unwrap(),
            kv.hash_kv(0).unwrap(),
            kv.hash_kv(compact).unwrap(),
            at(compact),
            at(rev),
            kv.events(compact, rev, b"\0", b"\0", true, 0).unwrap(),
        )
    };
    let want = answers(&done.kv);
    // Compared part by part: a difference names the part, not 15k records.
    type Answers = (
        u32,
        (u32, i64, i64),
        (u32, i64, i64),
        Vec<mvccpb::KeyValue>,
        Vec<mvccpb::KeyValue>,
        Vec<mvccpb::Event>,
    );
    fn same(got: &Answers, want: &Answers, when: &str) {
        assert_eq!(got.0, want.0, "{when}: hash");
        assert_eq!(got.1, want.1, "{when}: hash_kv now");
        assert_eq!(got.2, want.2, "{when}: hash_kv at the compaction");
        assert!(got.3 == want.3, "{when}: range at the compaction");
        assert!(got.4 == want.4, "{when}: range now");
        if got.5 != want.5 {
            let i = got.5.iter().zip(&want.5).position(|(a, b)| a != b);
            panic!("{when}: events since the compaction: {} vs {}, first difference {:?}: {:?} vs {:?}", got.5.len(), want.5.len(), i, i.map(|i| &got.5[i]), i.map(|i| &want.5[i]));
        }
    }
    let records = records_in_redb(&done.kv);
    assert_eq!(*done.kv.physically_compacted.borrow(), compact);

    // Halfway through the walk, then halfway through the removals.
    assert!(halfway.kv.compact_step().unwrap());
    same(&answers(&halfway.kv), &want, "halfway through the walk");
    while compaction::lock(&halfway.kv.compaction).walking() {
        halfway.kv.compact_step().unwrap();
    }
    assert!(
        halfway.kv.compact_step().unwrap(),
        "more than one removal step"
    );
    same(&answers(&halfway.kv), &want, "halfway through the removals");
    assert!(records_in_redb(&halfway.kv) > records);
    assert!(records_in_redb(&halfway.kv) < records + STEP_RECORDS as u64 * 2);
    assert_eq!(*halfway.kv.physically_compacted.borrow(), 0);
    // A physical compaction's wait ends when the member stops before the removals do;
    // once they are done it answers at once.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let stop = std::future::ready(());
    assert!(!rt.block_on(halfway.kv.physically_compacted(compact, stop)));
    let never = std::future::pending();
    assert!(rt.block_on(done.kv.physically_compacted(compact, never)));

    // Its state now, records not yet removed included (a Raft snapshot file copies
    // `kv_revs`), installed elsewhere.
    let (index, txn) = halfway.kv.snapshot_txn().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snap");
    let written =
        super::snapfile::write_snapshot(&crate::storage::vfs::RealFs, &txn, &path).unwrap();
    drop(txn);
    let installed = fixture();
    apply(&installed.kv, |b| {
        b.restore_file(&path, &written.sha256)?;
        b.set_applied_index(index);
        Ok(())
    })
    .unwrap();
    assert!(installed.kv.compaction_pending());
    assert!(records_in_redb(&installed.kv) > records);
    same(&answers(&installed.kv), &want, "installed");

    // Reopened, the walk starts over and finds what was left.
    let halfway = halfway.reopen();
    assert!(halfway.kv.compaction_pending());
    same(&answers(&halfway.kv), &want, "halfway");
    for f in [&halfway, &installed] {
        finish_compaction(&f.kv);
        same(&answers(&f.kv), &want, "finished");
        assert_eq!(records_in_redb(&f.kv), records);
        assert_eq!(*f.kv.physically_compacted.borrow(), compact);
    }

    // A finished job is recorded: reopened, nothing is walked again.
    for f in [done, halfway, installed] {
        let f = f.reopen();
        assert!(!f.kv.compaction_pending(), "a finished job runs again");
        assert_eq!(*f.kv.physically_compacted.borrow(), compact);
        same(&answers(&f.kv), &want, "reopened after the job");
        // A later compaction still starts a job, recorded in turn.
        apply(&f.kv, |b| b.compact(compact + 50)).unwrap();
        assert!(f.kv.compaction_pending());
        finish_compaction(&f.kv);
        // The driver's next durable commit makes the record durable too.
        flush(&f.kv);
        assert!(!f.reopen().kv.compaction_pending());
    }
}

/// Compactions that come faster than a walk passes the index do not hold its removals
/// back: the walk goes on from where it is, so within about one pass every record the
/// first compaction freed is gone, and the job ends once they stop.
#[test]
fn compactions_during_a_walk_do_not_send_it_back() {
    use super::compaction::STEP_KEYS;
    let keys = STEP_KEYS * 3;
    let f = fixture();
    for round in 0..2 {
        apply(&f.kv, |b| {
            for k in 0..keys {
                b.put(&put_req(&format!("k{k:05}"), &format!("{round}")))?;
            }
            Ok(())
        })
        .unwrap();
    }
    apply(&f.kv, |b| b.compact(f.kv.current_revision())).unwrap();
    // Puts to keys before and after all the others and a compaction after every step:
    // a walk sent back to the first key each time would never reach the last 2/3 of
    // them; one that did not come round again to the first key would leave versions
    // of "a" that the later compactions freed.
    let steps = 40;
    for i in 0..steps {
        assert!(f.kv.compact_step().unwrap());
        put(&f.kv, "a", &i.to_string());
        put(&f.kv, "zz", &i.to_string());
        apply(&f.kv, |b| b.compact(f.kv.current_revision())).unwrap();
    }
    // One record left of each k key; of a's and zz's, at most those put since they
    // were walked.
    let left = records_in_redb(&f.kv);
    assert!(
        left <= (keys + 2 * steps) as u64,
        "{left} records left of {keys} keys"
    );
    finish_compaction(&f.kv);
    assert_eq!(records_in_redb(&f.kv), keys as u64 + 2);
    assert_eq!(*f.kv.physically_compacted.borrow(), f.kv.compact_revision());
}
