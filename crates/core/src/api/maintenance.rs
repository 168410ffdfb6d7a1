//! `etcdserverpb.Maintenance`: Status (the rest comes with its issue).

use tonic::{Request, Response, Status};

use super::{ApiContext, ETCD_API_VERSION};
use crate::proto::etcdserverpb::{maintenance_server::Maintenance, StatusRequest, StatusResponse};

pub struct MaintenanceApi {
    ctx: ApiContext,
}

impl MaintenanceApi {
    pub fn new(ctx: ApiContext) -> MaintenanceApi {
        MaintenanceApi { ctx }
    }
}

#[tonic::async_trait]
impl Maintenance for MaintenanceApi {
    async fn status(
        &self,
        _req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let s = &self.ctx.node.status;
        let db_size = std::fs::metadata(&self.ctx.db_path).map_or(0, |m| m.len() as i64);
        let mut errors = Vec::new();
        if !s.is_running() {
            errors.push("raft driver stopped".to_string());
        } else if s.leader() == 0 {
            errors.push("etcdserver: no leader".to_string());
        }
        Ok(Response::new(StatusResponse {
            header: self.ctx.header(self.ctx.kv.current_revision()),
            version: ETCD_API_VERSION.into(),
            db_size,
            leader: s.leader(),
            raft_index: s.commit_index(),
            raft_term: s.term(),
            raft_applied_index: s.applied_index(),
            errors,
            db_size_in_use: db_size,
            is_learner: s.is_learner(),
        }))
    }
}
