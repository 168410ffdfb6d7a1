//! `v3electionpb.Election`: etcd's server-side election, with the key layout of
//! etcd's `concurrency.Election` (see `concurrency`): the oldest key under `<name>/`
//! is the leader and its value is the leader's proclamation.

use std::pin::Pin;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::concurrency::{
    contender_key, create_or_get, created_at, oldest, prefix, require_contenders, still_held, txn,
    wait_older_deleted, ReleaseOnDrop,
};
use super::{kv_status, require_key, ApiContext};
use crate::client::prefix_range_end;
use crate::kv::KvError;
use crate::proto::etcdserverpb::{self as pb, request_op::Request as Op};
use crate::proto::v3electionpb::{
    election_server::Election, CampaignRequest, CampaignResponse, LeaderKey, LeaderRequest,
    LeaderResponse, ProclaimRequest, ProclaimResponse, ResignRequest, ResignResponse,
};

/// etcd's texts (`concurrency.ErrElectionNotLeader`, `ErrElectionNoLeader`,
/// v3election's `ErrMissingLeaderKey`), returned with etcd's code (Unknown).
const NOT_LEADER: &str = "election: not leader";
const NO_LEADER: &str = "election: no leader";
const MISSING_LEADER_KEY: &str = "\"leader\" field must be provided";

pub struct ElectionApi {
    ctx: ApiContext,
}

impl ElectionApi {
    pub fn new(ctx: ApiContext) -> ElectionApi {
        ElectionApi { ctx }
    }
}

type ObserveStream = Pin<Box<dyn Stream<Item = Result<LeaderResponse, Status>> + Send>>;

fn leader_key(l: Option<LeaderKey>) -> Result<LeaderKey, Status> {
    l.ok_or_else(|| Status::unknown(MISSING_LEADER_KEY))
}

/// Replaces the leader's value if `l` still leads (its key has its create revision).
async fn proclaim(ctx: &ApiContext, l: &LeaderKey, value: &[u8]) -> Result<i64, Status> {
    let put = pb::PutRequest {
        key: l.key.clone(),
        value: value.to_vec(),
        lease: l.lease,
        ..Default::default()
    };
    let (resp, rev) = txn(
        ctx,
        pb::TxnRequest {
            compare: vec![created_at(&l.key, l.rev)],
            success: vec![pb::RequestOp {
                request: Some(Op::RequestPut(put)),
            }],
            failure: vec![],
        },
    )
    .await?;
    if !resp.succeeded {
        return Err(Status::unknown(NOT_LEADER));
    }
    Ok(rev)
}

#[tonic::async_trait]
impl Election for ElectionApi {
    async fn campaign(
        &self,
        req: Request<CampaignRequest>,
    ) -> Result<Response<CampaignResponse>, Status> {
        let (md, _, r) = req.into_parts();
        require_key(&r.name)?;
        require_contenders(&self.ctx, &md, &r.name, true)?;
        let key = contender_key(&r.name, r.lease);
        let (kv, created, _) = create_or_get(&self.ctx, &key, &r.value, r.lease).await?;
        let leader = LeaderKey {
            name: r.name.clone(),
            key: key.clone(),
            rev: kv.create_revision,
            lease: r.lease,
        };
        let guard = ReleaseOnDrop::new(&self.ctx, key);
        // Campaigning again with the same lease keeps the place in line and only
        // updates the value, as etcd's Campaign does.
        if !created && kv.value != r.value {
            proclaim(&self.ctx, &leader, &r.value).await?;
        }
        let rev = wait_older_deleted(&self.ctx, &r.name, leader.rev).await?;
        still_held(&self.ctx, &leader.key, leader.rev)?;
        guard.disarm();
        Ok(Response::new(CampaignResponse {
            header: self.ctx.header(rev),
            leader: Some(leader),
        }))
    }

    async fn proclaim(
        &self,
        req: Request<ProclaimRequest>,
    ) -> Result<Response<ProclaimResponse>, Status> {
        let (md, _, r) = req.into_parts();
        let leader = leader_key(r.leader)?;
        require_contenders(&self.ctx, &md, &leader.name, true)?;
        let rev = proclaim(&self.ctx, &leader, &r.value).await?;
        Ok(Response::new(ProclaimResponse {
            header: self.ctx.header(rev),
        }))
    }

    async fn leader(
        &self,
        req: Request<LeaderRequest>,
    ) -> Result<Response<LeaderResponse>, Status> {
        let (md, _, r) = req.into_parts();
        require_key(&r.name)?;
        require_contenders(&self.ctx, &md, &r.name, false)?;
        self.ctx.linearize().await?;
        let rev = self.ctx.kv.current_revision();
        let kv = oldest(&self.ctx, &r.name, 0)
            .map_err(kv_status)?
            .ok_or_else(|| Status::unknown(NO_LEADER))?;
        Ok(Response::new(LeaderResponse {
            header: self.ctx.header(rev),
            kv: Some(kv),
        }))
    }

    type ObserveStream = ObserveStream;

    async fn observe(
        &self,
        req: Request<LeaderRequest>,
    ) -> Result<Response<ObserveStream>, Status> {
        let (md, _, r) = req.into_parts();
        require_key(&r.name)?;
        require_contenders(&self.ctx, &md, &r.name, false)?;
        self.ctx.linearize().await?;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(observe(self.ctx.clone(), r.name, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn resign(
        &self,
        req: Request<ResignRequest>,
    ) -> Result<Response<ResignResponse>, Status> {
        let (md, _, r) = req.into_parts();
        let leader = leader_key(r.leader)?;
        require_contenders(&self.ctx, &md, &leader.name, true)?;
        let del = pb::DeleteRangeRequest {
            key: leader.key.clone(),
            ..Default::default()
        };
        let (_, rev) = txn(
            &self.ctx,
            pb::TxnRequest {
                compare: vec![created_at(&leader.key, leader.rev)],
                success: vec![pb::RequestOp {
                    request: Some(Op::RequestDeleteRange(del)),
                }],
                failure: vec![],
            },
        )
        .await?;
        Ok(Response::new(ResignResponse {
            header: self.ctx.header(rev),
        }))
    }
}

/// One Observe stream: what was last sent, and where to send.
struct Observer {
    ctx: ApiContext,
    name: Vec<u8>,
    tx: mpsc::Sender<Result<LeaderResponse, Status>>,
    /// (key, mod revision) of the leader value last sent.
    last: Option<(Vec<u8>, i64)>,
}

impl Observer {
    /// Sends the leader as of `rev` if it differs from the last one sent. False when
    /// the stream is over (client gone, or an error was sent).
    async fn offer(&mut self, rev: i64) -> bool {
        let leader = match oldest(&self.ctx, &self.name, rev) {
            // History compacted meanwhile: the present is the best answer left.
            Err(KvError::Compacted { .. }) => oldest(&self.ctx, &self.name, 0),
            other => other,
        };
        let kv = match leader {
            Ok(Some(kv)) => kv,
            Ok(None) => return true,
            Err(e) => {
                let _ = self.tx.send(Err(kv_status(e))).await;
                return false;
            }
        };
        let id = (kv.key.clone(), kv.mod_revision);
        if self.last.as_ref() == Some(&id) {
            return true;
        }
        self.last = Some(id);
        let msg = LeaderResponse {
            header: self.ctx.header(rev),
            kv: Some(kv),
        };
        self.tx.send(Ok(msg)).await.is_ok()
    }
}

/// Streams the leader's key-value every time it changes (new leader or new value), in
/// revision order: for every revision that touched `<name>/`, the leader as of that
/// revision is compared with the last one sent.
async fn observe(ctx: ApiContext, name: Vec<u8>, tx: mpsc::Sender<Result<LeaderResponse, Status>>) {
    let p = prefix(&name);
    let end = prefix_range_end(&p);
    let mut revisions = ctx.kv.subscribe();
    let mut seen = ctx.kv.current_revision();
    let mut observer = Observer {
        ctx: ctx.clone(),
        name,
        tx: tx.clone(),
        last: None,
    };
    if !observer.offer(seen).await {
        return;
    }
    loop {
        tokio::select! {
            changed = revisions.changed() => if changed.is_err() { return },
            _ = tx.closed() => return,
            _ = ctx.stopped() => return,
        }
        let now = *revisions.borrow_and_update();
        if now <= seen {
            continue;
        }
        let events = match ctx.kv.events(seen + 1, now, &p, &end, false, 0) {
            Ok(ev) => ev,
            Err(e) => {
                let _ = tx.send(Err(kv_status(e))).await;
                return;
            }
        };
        let mut revs: Vec<i64> = events
            .iter()
            .filter_map(|e| e.kv.as_ref().map(|kv| kv.mod_revision))
            .collect();
        revs.dedup();
        for rev in revs {
            if !observer.offer(rev).await {
                return;
            }
        }
        seen = now;
    }
}
