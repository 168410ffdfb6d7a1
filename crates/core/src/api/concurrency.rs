//! What Lock and Election share, with the key layout of etcd's client-side
//! `concurrency` package so etcd clients and meshd's services interoperate: a
//! contender owns `<name>/<lease ID in hex>`, and the contender whose key has the
//! smallest create revision holds the lock (or leads).

use tonic::Status;

use super::{kv_status, propose_status, unexpected, ApiContext};
use crate::client::prefix_range_end;
use crate::proto::etcdserverpb::{
    self as pb, compare::CompareResult, compare::CompareTarget, compare::TargetUnion,
    range_request::SortOrder, range_request::SortTarget, request_op::Request as Op,
    response_op::Response as OpResponse, RangeRequest,
};
use crate::proto::meshpb::internal_request::Request as Internal;
use crate::proto::mvccpb::KeyValue;
use crate::raft::AppliedKind;

/// `<name>/`: every contender's key starts with it.
pub(crate) fn prefix(name: &[u8]) -> Vec<u8> {
    let mut p = name.to_vec();
    p.push(b'/');
    p
}

/// What a Lock or Election call on `name` needs when auth is enabled: reading the
/// contenders under `<name>/` and, for `write`, creating or deleting one there (etcd's
/// services do both through the caller's own KV requests).
pub(crate) fn require_contenders(
    ctx: &ApiContext,
    md: &tonic::metadata::MetadataMap,
    name: &[u8],
    write: bool,
) -> Result<(), Status> {
    use crate::proto::authpb::permission::Type;
    let p = prefix(name);
    let end = prefix_range_end(&p);
    ctx.require_range(md, &p, &end, Type::Read)?;
    if write {
        ctx.require_range(md, &p, &end, Type::Write)?;
    }
    Ok(())
}

/// `<name>/<lease hex>`: the key a contender holding `lease` owns.
pub(crate) fn contender_key(name: &[u8], lease: i64) -> Vec<u8> {
    let mut k = prefix(name);
    k.extend_from_slice(format!("{lease:x}").as_bytes());
    k
}

/// A compare that holds while `key` was created at `rev` (0: does not exist).
pub(crate) fn created_at(key: &[u8], rev: i64) -> pb::Compare {
    pb::Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Create as i32,
        key: key.to_vec(),
        target_union: Some(TargetUnion::CreateRevision(rev)),
        range_end: Vec::new(),
    }
}

/// Replicates a txn; returns it with the revision after it applied.
pub(crate) async fn txn(
    ctx: &ApiContext,
    req: pb::TxnRequest,
) -> Result<(pb::TxnResponse, i64), Status> {
    let applied = ctx
        .node
        .propose(Internal::Txn(req))
        .await
        .map_err(propose_status)?;
    match applied.kind {
        AppliedKind::Txn(resp) => Ok((resp, applied.revision)),
        other => Err(unexpected(other)),
    }
}

/// The txn that creates `key` (with `lease`) if it does not exist, and reads it
/// otherwise: a contender's first step.
pub(crate) fn create_or_get_request(key: &[u8], value: &[u8], lease: i64) -> pb::TxnRequest {
    let put = pb::PutRequest {
        key: key.to_vec(),
        value: value.to_vec(),
        lease,
        ..Default::default()
    };
    let get = RangeRequest {
        key: key.to_vec(),
        ..Default::default()
    };
    pb::TxnRequest {
        compare: vec![created_at(key, 0)],
        success: vec![pb::RequestOp {
            request: Some(Op::RequestPut(put)),
        }],
        failure: vec![pb::RequestOp {
            request: Some(Op::RequestRange(get)),
        }],
    }
}

/// The newest key under `<name>/` created before `rev`, if any (keys only): the one a
/// contender created at `rev` waits for.
pub(crate) fn older_contender_request(name: &[u8], rev: i64) -> RangeRequest {
    let p = prefix(name);
    RangeRequest {
        range_end: prefix_range_end(&p),
        key: p,
        limit: 1,
        max_create_revision: rev - 1,
        sort_order: SortOrder::Descend as i32,
        sort_target: SortTarget::Create as i32,
        keys_only: true,
        ..Default::default()
    }
}

/// A read of a contender's own key (keys only).
pub(crate) fn held_request(key: &[u8]) -> RangeRequest {
    RangeRequest {
        key: key.to_vec(),
        keys_only: true,
        ..Default::default()
    }
}

/// Whether a read of a contender's key (keys only) shows it still the one created at
/// `rev`.
pub(crate) fn still_created_at(resp: &pb::RangeResponse, rev: i64) -> bool {
    resp.kvs.first().is_some_and(|kv| kv.create_revision == rev)
}

/// Creates `key` with `value` attached to `lease` unless it exists (etcd's
/// `If(CreateRevision(key) == 0).Then(Put).Else(Get)`). Returns the key as stored,
/// whether this call created it, and the revision after the txn.
pub(crate) async fn create_or_get(
    ctx: &ApiContext,
    key: &[u8],
    value: &[u8],
    lease: i64,
) -> Result<(KeyValue, bool, i64), Status> {
    let (resp, rev) = txn(ctx, create_or_get_request(key, value, lease)).await?;
    if resp.succeeded {
        let kv = KeyValue {
            key: key.to_vec(),
            create_revision: rev,
            mod_revision: rev,
            version: 1,
            value: value.to_vec(),
            lease,
        };
        return Ok((kv, true, rev));
    }
    let existing = match resp.responses.into_iter().next().and_then(|r| r.response) {
        Some(OpResponse::ResponseRange(r)) => r.kvs.into_iter().next(),
        _ => None,
    };
    // The key existed at the compare; it can only be missing here if deleted in the
    // same instant, which the txn's atomicity rules out.
    let kv = existing.ok_or_else(|| Status::internal("contender key vanished inside a txn"))?;
    Ok((kv, false, rev))
}

/// The oldest (first created) key under `<name>/` at `revision` (0: now), if any.
pub(crate) fn oldest(
    ctx: &ApiContext,
    name: &[u8],
    revision: i64,
) -> Result<Option<KeyValue>, crate::kv::KvError> {
    let p = prefix(name);
    let resp = ctx.kv.range(&RangeRequest {
        range_end: prefix_range_end(&p),
        key: p,
        limit: 1,
        revision,
        sort_order: SortOrder::Ascend as i32,
        sort_target: SortTarget::Create as i32,
        ..Default::default()
    })?;
    Ok(resp.kvs.into_iter().next())
}

/// Waits until no key under `<name>/` created before `rev` exists (etcd's
/// `waitDeletes`): the caller's key at `rev` is then the oldest. Returns the store
/// revision at that moment. Deletions are final, so this member's own (possibly
/// slightly behind) state can decide it.
pub(crate) async fn wait_older_deleted(
    ctx: &ApiContext,
    name: &[u8],
    rev: i64,
) -> Result<i64, Status> {
    let mut revisions = ctx.kv.subscribe();
    loop {
        // Any key created before ours; the newest of them is the one to wait for.
        let newer_first = older_contender_request(name, rev);
        let resp = ctx.kv.range(&newer_first).map_err(kv_status)?;
        if resp.kvs.is_empty() {
            return Ok(ctx.kv.current_revision());
        }
        let stopped = || Status::unavailable("etcdserver: server stopped");
        tokio::select! {
            changed = revisions.changed() => changed.map_err(|_| stopped())?,
            _ = ctx.stopped() => return Err(stopped()),
        }
    }
}

/// After waiting: the contender's key must still be the one created at `rev`. If its
/// lease expired meanwhile, the key is gone and so is the place in line (etcd's
/// `ErrSessionExpired`).
pub(crate) fn still_held(ctx: &ApiContext, key: &[u8], rev: i64) -> Result<(), Status> {
    let resp = ctx.kv.range(&held_request(key)).map_err(kv_status)?;
    if still_created_at(&resp, rev) {
        Ok(())
    } else {
        Err(Status::unknown(SESSION_EXPIRED))
    }
}

/// etcd's `concurrency.ErrSessionExpired`.
const SESSION_EXPIRED: &str = "session is expired";

/// Deletes a contender's key when dropped unless disarmed: a Lock or Campaign whose
/// caller went away must not leave a key that blocks everyone behind it.
pub(crate) struct ReleaseOnDrop {
    ctx: ApiContext,
    key: Option<Vec<u8>>,
}

impl ReleaseOnDrop {
    pub(crate) fn new(ctx: &ApiContext, key: Vec<u8>) -> ReleaseOnDrop {
        ReleaseOnDrop {
            ctx: ctx.clone(),
            key: Some(key),
        }
    }

    pub(crate) fn disarm(mut self) {
        self.key = None;
    }
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let node = self.ctx.node.clone();
        rt.spawn(async move {
            let del = Internal::DeleteRange(pb::DeleteRangeRequest {
                key,
                ..Default::default()
            });
            if let Err(e) = node.propose(del).await {
                tracing::warn!("releasing an abandoned contender key: {e}");
            }
        });
    }
}
