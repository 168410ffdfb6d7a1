//! `v3lockpb.Lock`: etcd's server-side lock, built on the KV with the key layout of
//! etcd's `concurrency.Mutex` (see `concurrency`), so a lock taken here and one taken
//! by etcdctl or any clientv3 program exclude each other.

use tonic::{Request, Response, Status};

use super::concurrency::{
    contender_key, create_or_get, still_held, wait_older_deleted, ReleaseOnDrop,
};
use super::{propose_status, require_key, unexpected, ApiContext};
use crate::proto::etcdserverpb::DeleteRangeRequest;
use crate::proto::meshpb::internal_request::Request as Internal;
use crate::proto::v3lockpb::{
    lock_server::Lock, LockRequest, LockResponse, UnlockRequest, UnlockResponse,
};
use crate::raft::AppliedKind;

pub struct LockApi {
    ctx: ApiContext,
}

impl LockApi {
    pub fn new(ctx: ApiContext) -> LockApi {
        LockApi { ctx }
    }
}

#[tonic::async_trait]
impl Lock for LockApi {
    async fn lock(&self, req: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        let (md, _, r) = req.into_parts();
        require_key(&r.name)?;
        super::concurrency::require_contenders(&self.ctx, &md, &r.name, true)?;
        let key = contender_key(&r.name, r.lease);
        let (kv, _, _) = create_or_get(&self.ctx, &key, b"", r.lease).await?;
        // From here on, giving up (the client went away) must release the key.
        let guard = ReleaseOnDrop::new(&self.ctx, key.clone());
        let rev = wait_older_deleted(&self.ctx, &r.name, kv.create_revision).await?;
        still_held(&self.ctx, &key, kv.create_revision)?;
        guard.disarm();
        Ok(Response::new(LockResponse {
            header: self.ctx.header(rev),
            key,
        }))
    }

    async fn unlock(
        &self,
        req: Request<UnlockRequest>,
    ) -> Result<Response<UnlockResponse>, Status> {
        let (md, _, r) = req.into_parts();
        require_key(&r.key)?;
        self.ctx.require_range(
            &md,
            &r.key,
            &[],
            crate::proto::authpb::permission::Type::Write,
        )?;
        let del = Internal::DeleteRange(DeleteRangeRequest {
            key: r.key,
            ..Default::default()
        });
        let applied = self.ctx.node.propose(del).await.map_err(propose_status)?;
        match applied.kind {
            AppliedKind::DeleteRange(_) => Ok(Response::new(UnlockResponse {
                header: self.ctx.header(applied.revision),
            })),
            other => Err(unexpected(other)),
        }
    }
}
