//! Hostile and bad input: every gRPC request type fed oversized, empty, malformed and
//! boundary values (property-based). Each answer is a result or an error with a clear
//! message; the member keeps serving; and a refused request changes nothing stored.

use std::time::Duration;

use mesh_core::proto::etcdserverpb as pb;
use mesh_core::proto::{v3electionpb as el, v3lockpb as lk};
use mesh_tests::{put_retrying, wait_for_leader, ClusterOpts, InProcessCluster};
use proptest::prelude::*;
use tonic::transport::Channel;

/// Keys and range ends at the edges: empty, NUL, 0xff runs, over etcd's limits.
fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(Vec::new()),
        Just(vec![0u8]),
        Just(vec![0xffu8; 3]),
        Just(b"sentinel/a".to_vec()),
        prop::collection::vec(any::<u8>(), 0..40),
        (0usize..3).prop_map(|i| vec![b'k'; [1024 * 1024 + 1, 2 * 1024 * 1024, 64 * 1024][i]]),
    ]
}

fn number() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(0i64),
        Just(-1),
        Just(i64::MIN),
        Just(i64::MAX),
        Just(1),
        any::<i64>()
    ]
}

fn enum_value() -> impl Strategy<Value = i32> {
    prop_oneof![0i32..6, Just(-1), Just(i32::MAX), any::<i32>()]
}

fn compare() -> impl Strategy<Value = pb::Compare> {
    (enum_value(), enum_value(), bytes(), bytes(), number()).prop_map(
        |(result, target, key, range_end, n)| pb::Compare {
            result,
            target,
            key,
            range_end,
            target_union: Some(match target.rem_euclid(5) {
                0 => pb::compare::TargetUnion::Version(n),
                1 => pb::compare::TargetUnion::CreateRevision(n),
                2 => pb::compare::TargetUnion::ModRevision(n),
                3 => pb::compare::TargetUnion::Value(n.to_be_bytes().to_vec()),
                _ => pb::compare::TargetUnion::Lease(n),
            }),
        },
    )
}

fn request_op() -> impl Strategy<Value = pb::RequestOp> {
    (0u8..3, bytes(), bytes(), number()).prop_map(|(kind, key, range_end, n)| pb::RequestOp {
        request: Some(match kind {
            0 => pb::request_op::Request::RequestRange(pb::RangeRequest {
                key,
                range_end,
                limit: n,
                ..Default::default()
            }),
            1 => pb::request_op::Request::RequestPut(pb::PutRequest {
                key,
                value: range_end,
                lease: n,
                ..Default::default()
            }),
            _ => pb::request_op::Request::RequestDeleteRange(pb::DeleteRangeRequest {
                key,
                range_end,
                ..Default::default()
            }),
        }),
    })
}

/// One hostile request of any type the member serves.
#[derive(Debug, Clone)]
enum Hostile {
    Range(pb::RangeRequest),
    Put(pb::PutRequest),
    Delete(pb::DeleteRangeRequest),
    Txn(pb::TxnRequest),
    Compact(pb::CompactionRequest),
    Watch(pb::WatchCreateRequest),
    LeaseGrant(pb::LeaseGrantRequest),
    LeaseRevoke(pb::LeaseRevokeRequest),
    LeaseTtl(pb::LeaseTimeToLiveRequest),
    LeaseKeepAlive(pb::LeaseKeepAliveRequest),
    Lock(lk::LockRequest),
    Unlock(lk::UnlockRequest),
    Leader(el::LeaderRequest),
    Proclaim(el::ProclaimRequest),
    Resign(el::ResignRequest),
    MemberRemove(pb::MemberRemoveRequest),
    MemberPromote(pb::MemberPromoteRequest),
    MemberUpdate(pb::MemberUpdateRequest),
    MemberAddMalformed(pb::MemberAddRequest),
    Alarm(pb::AlarmRequest),
    HashKv(pb::HashKvRequest),
    MoveLeader(pb::MoveLeaderRequest),
}

fn hostile() -> impl Strategy<Value = Hostile> {
    let leader_key = || {
        (bytes(), bytes(), number(), number()).prop_map(|(name, key, rev, lease)| el::LeaderKey {
            name,
            key,
            rev,
            lease,
        })
    };
    prop_oneof![
        (
            bytes(),
            bytes(),
            number(),
            number(),
            enum_value(),
            enum_value(),
            any::<bool>()
        )
            .prop_map(
                |(key, range_end, limit, revision, so, st, s)| Hostile::Range(pb::RangeRequest {
                    key,
                    range_end,
                    limit,
                    revision,
                    sort_order: so,
                    sort_target: st,
                    serializable: s,
                    min_mod_revision: limit,
                    max_create_revision: revision,
                    ..Default::default()
                })
            ),
        (bytes(), bytes(), number(), any::<bool>(), any::<bool>()).prop_map(
            |(key, value, lease, iv, il)| Hostile::Put(pb::PutRequest {
                key,
                value,
                lease,
                ignore_value: iv,
                ignore_lease: il,
                prev_kv: true,
            })
        ),
        (bytes(), bytes()).prop_map(|(key, range_end)| Hostile::Delete(pb::DeleteRangeRequest {
            key,
            range_end,
            prev_kv: true
        })),
        (
            prop::collection::vec(compare(), 0..4),
            prop::collection::vec(request_op(), 0..150),
            prop::collection::vec(request_op(), 0..3)
        )
            .prop_map(|(compare, success, failure)| Hostile::Txn(pb::TxnRequest {
                compare,
                success,
                failure
            })),
        (number(), any::<bool>()).prop_map(|(revision, physical)| Hostile::Compact(
            pb::CompactionRequest { revision, physical }
        )),
        (
            bytes(),
            bytes(),
            number(),
            prop::collection::vec(enum_value(), 0..3),
            number()
        )
            .prop_map(
                |(key, range_end, start_revision, filters, watch_id)| Hostile::Watch(
                    pb::WatchCreateRequest {
                        key,
                        range_end,
                        start_revision,
                        filters,
                        watch_id,
                        progress_notify: true,
                        prev_kv: true,
                        fragment: true,
                    }
                )
            ),
        (number(), number())
            .prop_map(|(ttl, id)| Hostile::LeaseGrant(pb::LeaseGrantRequest { ttl, id })),
        number().prop_map(|id| Hostile::LeaseRevoke(pb::LeaseRevokeRequest { id })),
        (number(), any::<bool>())
            .prop_map(|(id, keys)| Hostile::LeaseTtl(pb::LeaseTimeToLiveRequest { id, keys })),
        number().prop_map(|id| Hostile::LeaseKeepAlive(pb::LeaseKeepAliveRequest { id })),
        (bytes(), number())
            .prop_map(|(name, lease)| Hostile::Lock(lk::LockRequest { name, lease })),
        bytes().prop_map(|key| Hostile::Unlock(lk::UnlockRequest { key })),
        bytes().prop_map(|name| Hostile::Leader(el::LeaderRequest { name })),
        (prop::option::of(leader_key()), bytes()).prop_map(|(leader, value)| {
            Hostile::Proclaim(el::ProclaimRequest { leader, value })
        }),
        prop::option::of(leader_key())
            .prop_map(|leader| Hostile::Resign(el::ResignRequest { leader })),
        any::<u64>().prop_map(|id| Hostile::MemberRemove(pb::MemberRemoveRequest { id })),
        any::<u64>().prop_map(|id| Hostile::MemberPromote(pb::MemberPromoteRequest { id })),
        (
            any::<u64>(),
            prop::collection::vec("[a-z:/0-9]{0,12}", 0..3)
        )
            .prop_map(
                |(id, peer_ur_ls)| Hostile::MemberUpdate(pb::MemberUpdateRequest {
                    id,
                    peer_ur_ls
                })
            ),
        // Only malformed addresses: a well-formed one would really add a member.
        prop::collection::vec("[a-z/]{0,12}", 0..3).prop_map(|peer_ur_ls| {
            Hostile::MemberAddMalformed(pb::MemberAddRequest {
                peer_ur_ls,
                is_learner: false,
            })
        }),
        (enum_value(), any::<u64>(), enum_value()).prop_map(|(action, member_id, alarm)| {
            // Never a valid ACTIVATE of NOSPACE: that would (rightly) stop writes.
            let alarm = if action == 1 && alarm == 1 { 7 } else { alarm };
            Hostile::Alarm(pb::AlarmRequest {
                action,
                member_id,
                alarm,
            })
        }),
        number().prop_map(|revision| Hostile::HashKv(pb::HashKvRequest { revision })),
        any::<u64>().prop_map(|target_id| Hostile::MoveLeader(pb::MoveLeaderRequest { target_id })),
    ]
}

/// Sends one request; Ok(true) if the member accepted it (or is still working on it),
/// Ok(false) if it refused it with a clear error.
async fn send(ch: &Channel, h: Hostile) -> Result<bool, String> {
    use pb::{
        cluster_client::ClusterClient, kv_client::KvClient, lease_client::LeaseClient,
        maintenance_client::MaintenanceClient, watch_client::WatchClient,
    };
    let ch = ch.clone();
    let call = async move {
        let r: Result<(), tonic::Status> = match h {
            Hostile::Range(r) => KvClient::new(ch).range(r).await.map(drop),
            Hostile::Put(r) => KvClient::new(ch).put(r).await.map(drop),
            Hostile::Delete(r) => KvClient::new(ch).delete_range(r).await.map(drop),
            Hostile::Txn(r) => KvClient::new(ch).txn(r).await.map(drop),
            Hostile::Compact(r) => KvClient::new(ch).compact(r).await.map(drop),
            Hostile::Watch(create) => {
                let req = pb::WatchRequest {
                    request_union: Some(pb::watch_request::RequestUnion::CreateRequest(create)),
                };
                match WatchClient::new(ch).watch(tokio_stream_once(req)).await {
                    Ok(resp) => {
                        let mut s = resp.into_inner();
                        match tokio::time::timeout(Duration::from_secs(2), s.message()).await {
                            Ok(Ok(Some(_))) | Err(_) => Ok(()),
                            Ok(Ok(None)) => Ok(()),
                            Ok(Err(e)) => Err(e),
                        }
                    }
                    Err(e) => Err(e),
                }
            }
            Hostile::LeaseGrant(r) => LeaseClient::new(ch).lease_grant(r).await.map(drop),
            Hostile::LeaseRevoke(r) => LeaseClient::new(ch).lease_revoke(r).await.map(drop),
            Hostile::LeaseTtl(r) => LeaseClient::new(ch).lease_time_to_live(r).await.map(drop),
            Hostile::LeaseKeepAlive(r) => {
                match LeaseClient::new(ch)
                    .lease_keep_alive(tokio_stream_once(r))
                    .await
                {
                    Ok(resp) => resp.into_inner().message().await.map(drop),
                    Err(e) => Err(e),
                }
            }
            Hostile::Lock(r) => lk::lock_client::LockClient::new(ch).lock(r).await.map(drop),
            Hostile::Unlock(r) => lk::lock_client::LockClient::new(ch)
                .unlock(r)
                .await
                .map(drop),
            Hostile::Leader(r) => el::election_client::ElectionClient::new(ch)
                .leader(r)
                .await
                .map(drop),
            Hostile::Proclaim(r) => el::election_client::ElectionClient::new(ch)
                .proclaim(r)
                .await
                .map(drop),
            Hostile::Resign(r) => el::election_client::ElectionClient::new(ch)
                .resign(r)
                .await
                .map(drop),
            Hostile::MemberRemove(r) => ClusterClient::new(ch).member_remove(r).await.map(drop),
            Hostile::MemberPromote(r) => ClusterClient::new(ch).member_promote(r).await.map(drop),
            Hostile::MemberUpdate(r) => ClusterClient::new(ch).member_update(r).await.map(drop),
            Hostile::MemberAddMalformed(r) => ClusterClient::new(ch).member_add(r).await.map(drop),
            Hostile::Alarm(r) => MaintenanceClient::new(ch).alarm(r).await.map(drop),
            Hostile::HashKv(r) => MaintenanceClient::new(ch).hash_kv(r).await.map(drop),
            Hostile::MoveLeader(r) => MaintenanceClient::new(ch).move_leader(r).await.map(drop),
        };
        r
    };
    match tokio::time::timeout(Duration::from_secs(5), call).await {
        // Still waiting (a Lock or Campaign behind another holder): it may have written
        // its key, as a real contender does.
        Err(_) => Ok(true),
        Ok(Ok(())) => Ok(true),
        Ok(Err(s)) if s.message().trim().is_empty() => {
            Err(format!("an error without a message: {s:?}"))
        }
        Ok(Err(_)) => Ok(false),
    }
}

/// A client stream of one message that stays open (a closed request stream would end
/// the call before the server answers).
fn tokio_stream_once<T: Send + 'static>(item: T) -> impl tonic::IntoStreamingRequest<Message = T> {
    use tokio_stream::StreamExt;
    tokio_stream::once(item).chain(tokio_stream::pending())
}

/// The revision and every sentinel key with its value and mod revision.
async fn stored(ch: &Channel) -> (i64, Vec<(Vec<u8>, Vec<u8>, i64)>) {
    let r = pb::kv_client::KvClient::new(ch.clone())
        .range(pb::RangeRequest {
            key: b"sentinel/".to_vec(),
            range_end: b"sentinel0".to_vec(),
            ..Default::default()
        })
        .await
        .expect("the member keeps serving reads")
        .into_inner();
    let kvs = r
        .kvs
        .into_iter()
        .map(|kv| (kv.key, kv.value, kv.mod_revision))
        .collect();
    (r.header.expect("header").revision, kvs)
}

/// Revokes every lease, so none expires (and deletes keys) during the next case.
async fn revoke_all_leases(ch: &Channel) {
    let mut leases = pb::lease_client::LeaseClient::new(ch.clone());
    let list = leases
        .lease_leases(pb::LeaseLeasesRequest {})
        .await
        .expect("the member lists leases")
        .into_inner();
    for l in list.leases {
        // Already gone (expired meanwhile) is fine.
        let _ = leases
            .lease_revoke(pb::LeaseRevokeRequest { id: l.id })
            .await;
    }
}

static PANICKED: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

#[test]
fn every_request_type_survives_hostile_values_and_refusals_change_nothing() {
    // The member runs in this process: a panic in any of its tasks (which would only
    // end one stream or connection) must fail the test too.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICKED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(|| info.to_string());
        default_hook(info);
    }));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (cluster, ch) = rt.block_on(async {
        let c = InProcessCluster::start(1, ClusterOpts::default()).await;
        wait_for_leader(&c.live_addrs()).await;
        for k in ["a", "b", "c"] {
            put_retrying(&c.live_addrs(), &format!("sentinel/{k}"), "keep").await;
        }
        let ch = Channel::from_shared(format!("http://{}", c.addr(0)))
            .unwrap()
            .connect()
            .await
            .unwrap();
        (c, ch)
    });
    let cases: u32 = std::env::var("HOSTILE_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let accepted_count = std::sync::atomic::AtomicU32::new(0);
    let refused_count = std::sync::atomic::AtomicU32::new(0);
    runner
        .run(&hostile(), |h| {
            rt.block_on(async {
                // A lease an earlier case granted (and attached a key to) would expire
                // at some point and move the revision in the middle of a later case.
                revoke_all_leases(&ch).await;
                let before = stored(&ch).await;
                let accepted = send(&ch, h.clone())
                    .await
                    .map_err(|e| TestCaseError::fail(format!("{h:?}: {e}")))?;
                let after = stored(&ch).await;
                if let Some(p) = PANICKED.lock().unwrap_or_else(|p| p.into_inner()).clone() {
                    return Err(TestCaseError::fail(format!(
                        "{h:?} made the member panic: {p}"
                    )));
                }
                let count = if accepted {
                    &accepted_count
                } else {
                    &refused_count
                };
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if !accepted {
                    prop_assert_eq!(
                        &before,
                        &after,
                        "a refused request changed what is stored: {:?}",
                        h
                    );
                } else if after.1.len() < 3 || after.1.iter().any(|kv| kv.1 != b"keep") {
                    // An accepted hostile write hit the sentinels (a valid delete of
                    // everything, say): put them back for the next case.
                    for k in ["a", "b", "c"] {
                        put_retrying(&cluster.live_addrs(), &format!("sentinel/{k}"), "keep").await;
                    }
                }
                Ok(())
            })
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let (acc, refused) = (accepted_count.into_inner(), refused_count.into_inner());
    println!("{acc} hostile requests accepted, {refused} refused");
    assert!(
        refused > acc / 4,
        "the generator produces mostly invalid requests"
    );
    // Still serving writes at the end.
    rt.block_on(put_retrying(&cluster.live_addrs(), "after-hostile", "ok"));
}
