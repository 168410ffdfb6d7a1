//! `etcdserverpb.Cluster`: the member list (membership changes come with their issue).

use tonic::{Request, Response, Status};

use super::{kv_status, ApiContext};
use crate::proto::etcdserverpb::{
    cluster_server::Cluster, Member, MemberListRequest, MemberListResponse,
};

pub struct ClusterApi {
    ctx: ApiContext,
}

impl ClusterApi {
    pub fn new(ctx: ApiContext) -> ClusterApi {
        ClusterApi { ctx }
    }
}

#[tonic::async_trait]
impl Cluster for ClusterApi {
    async fn member_list(
        &self,
        req: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        if req.into_inner().linearizable {
            self.ctx.linearize().await?;
        }
        let members = self
            .ctx
            .kv
            .members()
            .map_err(kv_status)?
            .into_iter()
            .map(|m| Member {
                id: m.id,
                name: m.name,
                peer_ur_ls: m.peer_urls,
                client_ur_ls: m.client_urls,
                is_learner: m.is_learner,
            })
            .collect();
        Ok(Response::new(MemberListResponse {
            header: self.ctx.header(self.ctx.kv.current_revision()),
            members,
        }))
    }
}
