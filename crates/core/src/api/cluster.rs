//! `etcdserverpb.Cluster`: the member list and membership changes.
//!
//! Add, remove and promote are Raft configuration changes that only the leader may
//! propose (it alone knows which members are started and caught up); a follower
//! forwards them to the leader's client URL, as etcd forwards them over its peer port.
//! Update changes peer URLs through an ordinary replicated request.

use std::time::{SystemTime, UNIX_EPOCH};

use tonic::{Request, Response, Status};

use super::{
    caller_token, client_url_of, forwarded, kv_status, propose_status, ApiContext, FORWARDED,
};
use crate::proto::etcdserverpb::{
    cluster_client::ClusterClient, cluster_server::Cluster, Member, MemberAddRequest,
    MemberAddResponse, MemberListRequest, MemberListResponse, MemberPromoteRequest,
    MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse, MemberUpdateRequest,
    MemberUpdateResponse, ResponseHeader,
};
use crate::proto::meshpb::{internal_request::Request as Internal, MemberRecord, MemberUpdate};
use crate::raft::{MemberChange, ProposeError};

pub struct ClusterApi {
    ctx: ApiContext,
}

impl ClusterApi {
    pub fn new(ctx: ApiContext) -> ClusterApi {
        ClusterApi { ctx }
    }

    fn members(&self) -> Result<Vec<Member>, Status> {
        Ok(self
            .ctx
            .kv
            .members()
            .map_err(kv_status)?
            .into_iter()
            .map(|m| member_pb(m, self.ctx.peer_scheme))
            .collect())
    }

    /// Applies a configuration change; returns the header and the new member list.
    async fn change(
        &self,
        change: MemberChange,
    ) -> Result<(Option<ResponseHeader>, Vec<Member>), Status> {
        let applied = self
            .ctx
            .node
            .change_members(change)
            .await
            .map_err(membership_status)?;
        Ok((self.ctx.header(applied.revision), self.members()?))
    }

    /// A client for the leader's API when this member is not the leader and the request
    /// was not already forwarded; `None` means: handle it here.
    async fn leader_client<T>(
        &self,
        req: &Request<T>,
    ) -> Result<Option<ClusterClient<tonic::transport::Channel>>, Status> {
        let status = &self.ctx.node.status;
        let leader = status.leader();
        if leader == status.member_id || req.metadata().contains_key(FORWARDED) {
            return Ok(None);
        }
        if leader == 0 {
            return Err(propose_status(ProposeError::NoLeader));
        }
        // A new leader publishes its client URL through Raft right after it starts;
        // give that a moment before giving up.
        let mut url = None;
        for _ in 0..50 {
            url = client_url_of(&self.ctx.kv, leader)?;
            if url.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let url = url.ok_or_else(|| {
            Status::unavailable("etcdserver: leader's client URL is not known yet")
        })?;
        let channel = self
            .ctx
            .dialer
            .endpoint(&url)?
            .connect_timeout(std::time::Duration::from_secs(3))
            .connect()
            .await
            .map_err(|e| Status::unavailable(format!("cannot reach the leader at {url}: {e}")))?;
        Ok(Some(ClusterClient::new(channel)))
    }
}

/// The same call, to the leader.
fn forwarded_call<T>(req: Request<T>) -> Request<T> {
    let token = caller_token(req.metadata());
    forwarded(req.into_inner(), token)
}

/// A member as etcd answers it: peer URLs with a scheme (members store `host:port`).
fn member_pb(m: MemberRecord, scheme: &str) -> Member {
    Member {
        id: m.id,
        name: m.name,
        peer_ur_ls: m
            .peer_urls
            .iter()
            .map(|u| crate::membership::peer_url(u, scheme))
            .collect(),
        client_ur_ls: m.client_urls,
        is_learner: m.is_learner,
    }
}

/// Peer URLs as members store them: `host:port`, an optional scheme accepted.
fn normalize_peer_urls(urls: &[String]) -> Result<Vec<String>, Status> {
    if urls.is_empty() {
        return Err(Status::invalid_argument(
            "etcdserver: member peer URLs are not provided",
        ));
    }
    urls.iter()
        .map(|u| {
            let hostport = crate::raft::peer_hostport(u);
            match hostport.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                    Ok(hostport.to_string())
                }
                _ => Err(Status::invalid_argument(format!(
                    "etcdserver: invalid peer URL {u:?}: expected host:port"
                ))),
            }
        })
        .collect()
}

/// A fresh member ID, as etcd derives one from the peer URLs, the cluster and the time.
fn new_member_id(cluster_id: u64, urls: &[String], taken: &[u64]) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut salt = 0u64;
    loop {
        let id = crate::storage::identity_stable_id(&[
            &cluster_id.to_be_bytes(),
            urls.join(",").as_bytes(),
            &now.to_be_bytes(),
            &salt.to_be_bytes(),
        ]);
        if id != 0 && !taken.contains(&id) {
            return id;
        }
        salt += 1;
    }
}

fn membership_status(e: ProposeError) -> Status {
    match e {
        ProposeError::Membership(why) if why.ends_with("not found") => Status::not_found(why),
        e @ (ProposeError::Membership(_)
        | ProposeError::NotLeader
        | ProposeError::NotEnoughStarted
        | ProposeError::LearnerNotReady) => Status::failed_precondition(e.to_string()),
        other => propose_status(other),
    }
}

#[tonic::async_trait]
impl Cluster for ClusterApi {
    async fn member_add(
        &self,
        req: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        self.ctx.require_admin(req.metadata())?;
        if let Some(mut leader) = self.leader_client(&req).await? {
            return leader.member_add(forwarded_call(req)).await;
        }
        let r = req.into_inner();
        let urls = normalize_peer_urls(&r.peer_ur_ls)?;
        let existing = self.ctx.kv.members().map_err(kv_status)?;
        if existing
            .iter()
            .any(|m| m.peer_urls.iter().any(|u| urls.contains(u)))
        {
            return Err(Status::failed_precondition(
                "etcdserver: Peer URLs already exists",
            ));
        }
        let taken: Vec<u64> = existing.iter().map(|m| m.id).collect();
        let member = MemberRecord {
            id: new_member_id(self.ctx.node.status.cluster_id, &urls, &taken),
            name: String::new(),
            peer_urls: urls,
            client_urls: vec![],
            is_learner: r.is_learner,
        };
        let (header, members) = self
            .change(MemberChange::Add {
                member: member.clone(),
                learner: r.is_learner,
            })
            .await?;
        Ok(Response::new(MemberAddResponse {
            header,
            member: Some(member_pb(member, self.ctx.peer_scheme)),
            members,
        }))
    }

    async fn member_remove(
        &self,
        req: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        self.ctx.require_admin(req.metadata())?;
        if let Some(mut leader) = self.leader_client(&req).await? {
            return leader.member_remove(forwarded_call(req)).await;
        }
        let (header, members) = self
            .change(MemberChange::Remove(req.into_inner().id))
            .await?;
        Ok(Response::new(MemberRemoveResponse { header, members }))
    }

    async fn member_update(
        &self,
        req: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        self.ctx.require_admin(req.metadata())?;
        let r = req.into_inner();
        let urls = normalize_peer_urls(&r.peer_ur_ls)?;
        let existing = self.ctx.kv.members().map_err(kv_status)?;
        if !existing.iter().any(|m| m.id == r.id) {
            return Err(Status::not_found("etcdserver: member not found"));
        }
        if existing
            .iter()
            .any(|m| m.id != r.id && m.peer_urls.iter().any(|u| urls.contains(u)))
        {
            return Err(Status::failed_precondition(
                "etcdserver: Peer URLs already exists",
            ));
        }
        let applied = self
            .ctx
            .node
            .propose(Internal::MemberUpdate(MemberUpdate {
                id: r.id,
                peer_urls: urls,
            }))
            .await
            .map_err(propose_status)?;
        Ok(Response::new(MemberUpdateResponse {
            header: self.ctx.header(applied.revision),
            members: self.members()?,
        }))
    }

    async fn member_list(
        &self,
        req: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        if req.into_inner().linearizable {
            self.ctx.linearize().await?;
        }
        Ok(Response::new(MemberListResponse {
            header: self.ctx.header(self.ctx.kv.current_revision()),
            members: self.members()?,
        }))
    }

    async fn member_promote(
        &self,
        req: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        self.ctx.require_admin(req.metadata())?;
        if let Some(mut leader) = self.leader_client(&req).await? {
            return leader.member_promote(forwarded_call(req)).await;
        }
        let (header, members) = self
            .change(MemberChange::Promote(req.into_inner().id))
            .await?;
        Ok(Response::new(MemberPromoteResponse { header, members }))
    }
}
