//! `etcdserverpb.Lease`: grant, revoke, keep-alive, time-to-live, list.
//!
//! Grants and revokes go through Raft. A keep-alive is answered by the leader's lessor
//! from memory: a follower passes its clients' keep-alives to the leader over one
//! keep-alive stream to the leader's client URL per client stream (as etcd forwards
//! them to the leader), and only when the leader cannot be reached replicates them
//! through Raft, so the leader refreshes the lease when it applies the entry.
//! Time-to-live is the leader's to answer: a follower forwards the question too.

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::{kv_status, propose_status, unexpected, ApiContext};
use crate::kv::{KvError, MAX_LEASE_TTL};
use crate::proto::authpb::permission::Type as PermType;
use crate::proto::etcdserverpb::{
    lease_client::LeaseClient, lease_server::Lease, LeaseGrantRequest, LeaseGrantResponse,
    LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseLeasesRequest, LeaseLeasesResponse,
    LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus, LeaseTimeToLiveRequest,
    LeaseTimeToLiveResponse,
};
use crate::proto::meshpb::internal_request::Request as Internal;
use crate::raft::{Applied, AppliedKind, ProposeError};

/// Marks a request forwarded by a follower, so it is never forwarded twice.
/// Keep-alive responses buffered per stream.
const STREAM_BUFFER: usize = 64;

pub struct LeaseApi {
    ctx: ApiContext,
}

impl LeaseApi {
    pub fn new(ctx: ApiContext) -> LeaseApi {
        LeaseApi { ctx }
    }
}

type KeepAliveStream = Pin<Box<dyn Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Lease for LeaseApi {
    async fn lease_grant(
        &self,
        req: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        self.ctx.require_user(req.metadata())?;
        let r = req.into_inner();
        if r.ttl > MAX_LEASE_TTL {
            return Err(kv_status(KvError::LeaseTtlTooLarge));
        }
        let ttl = self.ctx.lessor.granted_ttl(r.ttl);
        let me = self.ctx.node.status.member_id;
        // A server-chosen ID that happens to be taken is replaced, as etcd does.
        let mut attempts = 0;
        loop {
            let id = match r.id {
                0 => self.ctx.lessor.next_lease_id(me),
                id => id,
            };
            let grant = Internal::LeaseGrant(LeaseGrantRequest { ttl, id });
            match self.ctx.node.propose(grant).await {
                Ok(applied) => match applied.kind {
                    AppliedKind::LeaseGrant { id, ttl } => {
                        return Ok(Response::new(LeaseGrantResponse {
                            header: self.ctx.header(applied.revision),
                            id,
                            ttl,
                            error: String::new(),
                        }))
                    }
                    other => return Err(unexpected(other)),
                },
                Err(ProposeError::Kv(KvError::LeaseExists)) if r.id == 0 && attempts < 8 => {
                    attempts += 1;
                }
                Err(e) => return Err(propose_status(e)),
            }
        }
    }

    async fn lease_revoke(
        &self,
        req: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        // Revoking deletes the lease's keys: the caller must be able to write each.
        if let super::Caller::User(u) = self.ctx.require_user(req.metadata())? {
            let auth = self.ctx.kv.auth();
            for key in self
                .ctx
                .kv
                .lease_keys(req.get_ref().id)
                .map_err(kv_status)?
            {
                auth.check_range(&u, &key, &[], crate::proto::authpb::permission::Type::Write)
                    .map_err(kv_status)?;
            }
        }
        let r = req.into_inner();
        let applied = self
            .ctx
            .node
            .propose(Internal::LeaseRevoke(r))
            .await
            .map_err(propose_status)?;
        match applied.kind {
            AppliedKind::LeaseRevoke(mut resp) => {
                self.ctx.stamp(&mut resp.header, applied.revision);
                Ok(Response::new(resp))
            }
            other => Err(unexpected(other)),
        }
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<KeepAliveStream>, Status> {
        self.ctx.require_user(req.metadata())?;
        let forwarded = req.metadata().contains_key(super::FORWARDED);
        let token = super::caller_token(req.metadata());
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let ctx = self.ctx.clone();
        tokio::spawn(async move {
            // A stream forwarded to us is never forwarded again.
            let mut upstream = (!forwarded).then(|| Upstream { token, open: None });
            loop {
                let msg = tokio::select! {
                    msg = inbound.next() => msg,
                    _ = ctx.stopped() => return,
                };
                let Some(Ok(msg)) = msg else { return };
                let resp = keep_alive(&ctx, msg.id, upstream.as_mut()).await;
                let stop = resp.is_err();
                if tx.send(resp).await.is_err() || stop {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let caller = self.ctx.require_user(req.metadata())?;
        let forwarded = req.metadata().contains_key(super::FORWARDED);
        let token = super::caller_token(req.metadata());
        let r = req.into_inner();
        let status = &self.ctx.node.status;
        if status.leader() != status.member_id {
            if forwarded {
                return Err(Status::unavailable("etcdserver: not leader"));
            }
            // The leader checks the caller's rights on the keys with the same token.
            return forward_time_to_live(&self.ctx, r, token)
                .await
                .map(Response::new);
        }
        let (id, with_keys) = (r.id, r.keys);
        // A follower may have answered the grant before the leader applied it.
        self.ctx.node.catch_up().await.map_err(propose_status)?;
        let Some(granted) = self.ctx.kv.lease(id).map_err(kv_status)? else {
            // etcd answers an unknown (or already expired and revoked) lease this way.
            return Ok(Response::new(LeaseTimeToLiveResponse {
                header: self.ctx.header(self.ctx.kv.current_revision()),
                id,
                ttl: -1,
                ..Default::default()
            }));
        };
        let ttl = self.ctx.lessor.remaining(id).unwrap_or(granted);
        let keys = if with_keys {
            let keys = self.ctx.kv.lease_keys(id).map_err(kv_status)?;
            // As etcd since CVE-2023-32082: key names only for a caller who may read
            // every one of them.
            if let super::auth::Caller::User(u) = &caller {
                let auth = self.ctx.kv.auth();
                for k in &keys {
                    auth.check_range(u, k, &[], PermType::Read)
                        .map_err(kv_status)?;
                }
            }
            keys
        } else {
            Vec::new()
        };
        Ok(Response::new(LeaseTimeToLiveResponse {
            header: self.ctx.header(self.ctx.kv.current_revision()),
            id,
            ttl,
            granted_ttl: granted,
            keys,
        }))
    }

    async fn lease_leases(
        &self,
        req: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        self.ctx.require_user(req.metadata())?;
        self.ctx.linearize().await?;
        let leases = self
            .ctx
            .kv
            .leases()
            .map_err(kv_status)?
            .into_iter()
            .map(|l| LeaseStatus { id: l.id })
            .collect();
        Ok(Response::new(LeaseLeasesResponse {
            header: self.ctx.header(self.ctx.kv.current_revision()),
            leases,
        }))
    }
}

/// A follower's keep-alive stream to the leader, opened on first use and again when
/// the leader changes or the stream fails.
struct Upstream {
    token: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    open: Option<OpenUpstream>,
}

struct OpenUpstream {
    leader: u64,
    requests: mpsc::Sender<LeaseKeepAliveRequest>,
    responses: Streaming<LeaseKeepAliveResponse>,
}

impl Upstream {
    /// The leader's answer (its TTL), or None when the leader cannot answer now.
    async fn keep_alive(&mut self, ctx: &ApiContext, id: i64) -> Option<i64> {
        let leader = ctx.node.status.leader();
        if leader == 0 {
            return None;
        }
        if self.open.as_ref().is_some_and(|o| o.leader != leader) {
            self.open = None;
        }
        let wait = ctx
            .lessor
            .election_timeout()
            .max(Duration::from_millis(100))
            * 2;
        let token = self.token.clone();
        let open = &mut self.open;
        let answer = async {
            match open {
                Some(o) => o.requests.send(LeaseKeepAliveRequest { id }).await.ok()?,
                None => *open = Some(connect(ctx, leader, id, token).await?),
            }
            let o = open.as_mut()?;
            o.responses.message().await.ok().flatten()
        };
        match tokio::time::timeout(wait, answer).await {
            Ok(Some(resp)) => Some(resp.ttl),
            _ => {
                self.open = None;
                None
            }
        }
    }
}

/// Opens a keep-alive stream to `leader` carrying `first` as its first request (sent
/// before waiting for the call: etcd sends its response headers only with the first
/// response).
async fn connect(
    ctx: &ApiContext,
    leader: u64,
    first: i64,
    token: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
) -> Option<OpenUpstream> {
    let channel = leader_endpoint(ctx, leader).ok()?.connect().await.ok()?;
    let (requests, rx) = mpsc::channel(1);
    requests
        .send(LeaseKeepAliveRequest { id: first })
        .await
        .ok()?;
    let mut client = LeaseClient::new(channel);
    let responses = client
        .lease_keep_alive(super::forwarded(ReceiverStream::new(rx), token))
        .await
        .ok()?
        .into_inner();
    Some(OpenUpstream {
        leader,
        requests,
        responses,
    })
}

/// One keep-alive: TTL 0 when the lease does not exist (etcd's answer on the stream).
async fn keep_alive(
    ctx: &ApiContext,
    id: i64,
    upstream: Option<&mut Upstream>,
) -> Result<LeaseKeepAliveResponse, Status> {
    let status = &ctx.node.status;
    let forwarded = match upstream {
        Some(up) if status.leader() != status.member_id => up.keep_alive(ctx, id).await,
        _ => None,
    };
    let ttl = if let Some(ttl) = forwarded {
        ttl
    } else if status.leader() == status.member_id {
        // A follower may have answered the grant before the leader applied it.
        ctx.node.catch_up().await.map_err(propose_status)?;
        match ctx.lessor.renew(id) {
            Some(ttl) if ctx.kv.lease(id).map_err(kv_status)?.is_some() => ttl,
            _ => 0,
        }
    } else {
        match replicate_keep_alive(ctx, id).await {
            Ok(applied) => match applied.kind {
                AppliedKind::LeaseKeepAlive { ttl } => ttl,
                other => return Err(unexpected(other)),
            },
            Err(ProposeError::Kv(KvError::LeaseNotFound)) => 0,
            Err(e) => return Err(propose_status(e)),
        }
    };
    Ok(LeaseKeepAliveResponse {
        header: ctx.header(ctx.kv.current_revision()),
        id,
        ttl,
    })
}

/// Replicates a keep-alive from a follower. A proposal forwarded to a leader that has
/// just failed is lost without an answer; a keep-alive is idempotent, so it is sent
/// again after each election timeout rather than after the whole request timeout,
/// which may well exceed the lease's TTL.
async fn replicate_keep_alive(ctx: &ApiContext, id: i64) -> Result<Applied, ProposeError> {
    let attempt = ctx
        .lessor
        .election_timeout()
        .max(Duration::from_millis(100))
        * 2;
    let mut last = ProposeError::Timeout;
    for _ in 0..10 {
        let req = Internal::LeaseKeepAlive(LeaseKeepAliveRequest { id });
        match tokio::time::timeout(attempt, ctx.node.propose(req)).await {
            Ok(Ok(applied)) => return Ok(applied),
            Ok(Err(e @ ProposeError::Kv(_))) | Ok(Err(e @ ProposeError::Stopped)) => return Err(e),
            Ok(Err(e)) => last = e,
            Err(_) => last = ProposeError::Timeout,
        }
    }
    Err(last)
}

/// Connect (and, for unary calls, request) timeout towards the leader.
const LEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The client endpoint `leader` published, with a connect timeout.
fn leader_endpoint(ctx: &ApiContext, leader: u64) -> Result<tonic::transport::Endpoint, Status> {
    let no_leader = || Status::unavailable("etcdserver: no leader");
    if leader == 0 {
        return Err(no_leader());
    }
    let url = super::client_url_of(&ctx.kv, leader)?.ok_or_else(no_leader)?;
    Ok(ctx.dialer.endpoint(&url)?.connect_timeout(LEADER_TIMEOUT))
}

/// Asks the leader, through its published client URL.
async fn forward_time_to_live(
    ctx: &ApiContext,
    r: LeaseTimeToLiveRequest,
    token: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
) -> Result<LeaseTimeToLiveResponse, Status> {
    let channel = leader_endpoint(ctx, ctx.node.status.leader())?
        .timeout(LEADER_TIMEOUT)
        .connect()
        .await
        .map_err(|e| Status::unavailable(format!("cannot reach the leader: {e}")))?;
    let mut resp = LeaseClient::new(channel)
        .lease_time_to_live(super::forwarded(r, token))
        .await?
        .into_inner();
    // The header names the member that answered the client.
    let rev = resp.header.as_ref().map_or(0, |h| h.revision);
    resp.header = ctx.header(rev);
    Ok(resp)
}
