//! `etcdserverpb.KV`: Range, Put, DeleteRange, Txn, Compact.

use tonic::{Request, Response, Status};

use super::{kv_status, propose_status, require_key, unexpected, ApiContext};
use crate::kv::KvError;
use crate::proto::authpb::permission::Type as Perm;
use crate::proto::etcdserverpb::{
    self as pb, kv_server::Kv, request_op::Request as Op, CompactionRequest, CompactionResponse,
    DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse, RangeRequest, RangeResponse,
    TxnRequest, TxnResponse,
};
use crate::proto::meshpb::internal_request::Request as Internal;
use crate::proto::meshpb::RequestAuth;
use crate::raft::{Applied, AppliedKind, ProposeError};
use tonic::metadata::MetadataMap;

pub struct KvApi {
    ctx: ApiContext,
}

impl KvApi {
    pub fn new(ctx: ApiContext) -> KvApi {
        KvApi { ctx }
    }

    async fn propose(&self, req: Internal) -> Result<Applied, Status> {
        self.ctx.node.propose(req).await.map_err(propose_status)
    }

    /// Proposes a client write whose permission check gave `auth` (the user and auth
    /// revision it carries, `None` with auth disabled). If the auth store changed
    /// before the write applied, every member refused it unapplied: check again (this
    /// member has now applied the change) and propose again.
    async fn propose_write(
        &self,
        md: &MetadataMap,
        req: Internal,
        mut auth: Option<RequestAuth>,
    ) -> Result<Applied, Status> {
        let mut attempts = 0;
        while auth.is_some() && attempts < AUTH_RETRIES {
            match self.ctx.node.propose_as(req.clone(), auth).await {
                Err(ProposeError::Kv(KvError::AuthOldRevision)) => {
                    attempts += 1;
                    auth = self
                        .ctx
                        .require_write(md, |a, u| a.check_request(u, &req))?;
                }
                r => return r.map_err(propose_status),
            }
        }
        // Without auth nothing is refused for an old auth revision: no copy to keep.
        self.ctx
            .node
            .propose_as(req, auth)
            .await
            .map_err(propose_status)
    }
}

/// How often a write is checked and proposed again after the auth store changed under
/// it (each attempt sees at least the change that refused the one before).
const AUTH_RETRIES: usize = 8;

fn check_put(p: &PutRequest) -> Result<(), Status> {
    crate::kv::validate_put(p).map_err(kv_status)
}

/// Checks every operation of a txn (recursively) the way etcd does before proposing.
fn check_ops(ops: &[pb::RequestOp]) -> Result<(), Status> {
    for op in ops {
        match &op.request {
            Some(Op::RequestRange(r)) => require_key(&r.key)?,
            Some(Op::RequestPut(p)) => check_put(p)?,
            Some(Op::RequestDeleteRange(d)) => require_key(&d.key)?,
            Some(Op::RequestTxn(t)) => check_txn_shape(t)?,
            None => return Err(Status::invalid_argument("etcdserver: request op is empty")),
        }
    }
    Ok(())
}

fn check_txn_shape(t: &TxnRequest) -> Result<(), Status> {
    for c in &t.compare {
        require_key(&c.key)?;
        if c.target_union.is_none() {
            return Err(Status::invalid_argument(
                "etcdserver: compare has no target value",
            ));
        }
    }
    check_ops(&t.success)?;
    check_ops(&t.failure)
}

/// A read-only txn may be served locally without a quorum round only when every range
/// in it asked for a serializable read.
fn all_serializable(t: &TxnRequest) -> bool {
    t.success
        .iter()
        .chain(&t.failure)
        .all(|op| match &op.request {
            Some(Op::RequestRange(r)) => r.serializable,
            Some(Op::RequestTxn(n)) => all_serializable(n),
            _ => true,
        })
}

#[tonic::async_trait]
impl Kv for KvApi {
    async fn range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        let (md, _, r) = req.into_parts();
        self.ctx.check_size(&r)?;
        require_key(&r.key)?;
        self.ctx
            .require_range(&md, &r.key, &r.range_end, Perm::Read)?;
        if !r.serializable {
            self.ctx.linearize().await?;
        }
        let mut resp = self.ctx.kv.range(&r).map_err(kv_status)?;
        self.ctx.check_response_size(&resp)?;
        self.ctx
            .stamp(&mut resp.header, self.ctx.kv.current_revision());
        Ok(Response::new(resp))
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let (md, _, r) = req.into_parts();
        self.ctx.check_size(&r)?;
        check_put(&r)?;
        let auth = self.ctx.require_write(&md, |a, u| a.check_put(u, &r))?;
        self.ctx.check_disk_space(&r)?;
        let applied = self.propose_write(&md, Internal::Put(r), auth).await?;
        match applied.kind {
            AppliedKind::Put(mut resp) => {
                self.ctx.stamp(&mut resp.header, applied.revision);
                Ok(Response::new(resp))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn delete_range(
        &self,
        req: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let (md, _, r) = req.into_parts();
        self.ctx.check_size(&r)?;
        require_key(&r.key)?;
        let auth = self.ctx.require_write(&md, |a, u| a.check_delete(u, &r))?;
        let applied = self
            .propose_write(&md, Internal::DeleteRange(r), auth)
            .await?;
        match applied.kind {
            AppliedKind::DeleteRange(mut resp) => {
                self.ctx.stamp(&mut resp.header, applied.revision);
                Ok(Response::new(resp))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let (md, _, r) = req.into_parts();
        self.ctx.check_size(&r)?;
        check_txn_shape(&r)?;
        crate::kv::check_txn(&r, self.ctx.limits.max_txn_ops).map_err(kv_status)?;
        let auth = self.ctx.require_write(&md, |a, u| a.check_txn(u, &r))?;
        if crate::kv::is_read_only(&r) {
            if !all_serializable(&r) {
                self.ctx.linearize().await?;
            }
            let mut resp = self.ctx.kv.txn_read(&r).map_err(kv_status)?;
            self.ctx.check_response_size(&resp)?;
            self.ctx
                .stamp(&mut resp.header, self.ctx.kv.current_revision());
            return Ok(Response::new(resp));
        }
        self.ctx.check_disk_space(&r)?;
        let applied = self.propose_write(&md, Internal::Txn(r), auth).await?;
        match applied.kind {
            AppliedKind::Txn(mut resp) => {
                self.ctx.check_response_size(&resp)?;
                self.ctx.stamp(&mut resp.header, applied.revision);
                Ok(Response::new(resp))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn compact(
        &self,
        req: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        // etcd lets only root compact when auth is enabled.
        self.ctx.require_admin(req.metadata())?;
        let r = req.into_inner();
        let (revision, physical) = (r.revision, r.physical);
        let applied = self.propose(Internal::Compaction(r)).await?;
        if physical {
            // As etcd: the answer waits until this member's store no longer holds
            // what the compaction frees, unless the member stops first (its Raft
            // driver removes them; nothing would finish the wait).
            let stopping = async {
                tokio::select! {
                    () = self.ctx.node.status.wait_stopped() => {}
                    () = self.ctx.stopped() => {}
                }
            };
            if !self.ctx.kv.physically_compacted(revision, stopping).await {
                return Err(propose_status(ProposeError::Stopped));
            }
        }
        Ok(Response::new(CompactionResponse {
            header: self.ctx.header(applied.revision),
        }))
    }
}
