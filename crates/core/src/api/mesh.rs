//! `meshpb.Mesh`: this node's view of the gossip mesh (peers, routes, channels,
//! traffic) and the PN-counters gossiped over it, which keep counting on both sides of
//! a partition and converge when it heals. With auth enabled, every call needs a
//! valid token.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::kv_status;
use crate::crdt::CounterGossiper;
use crate::kv::KvStore;
use crate::membership::nodes;
use crate::mesh::{Mesh, PeerInfo};
use crate::proto::meshpb::{
    mesh_server, CounterGetRequest, CounterIncrRequest, CounterResponse, MeshPeer,
    MeshPeersRequest, MeshPeersResponse, MeshRoute, MeshStatusRequest, MeshStatusResponse,
};

/// Longest counter name accepted.
const MAX_COUNTER_NAME: usize = 256;

pub struct MeshApi {
    pub mesh: Arc<Mesh>,
    pub counters: Arc<CounterGossiper>,
    pub kv: Arc<KvStore>,
    pub channels: Vec<String>,
    pub cluster_id: u64,
}

impl MeshApi {
    fn peer_list(&self) -> Result<Vec<MeshPeer>, Status> {
        let members = self.kv.members().map_err(kv_status)?;
        let metas = nodes(&self.mesh);
        let peers = self.mesh.peers();
        Ok(peers
            .iter()
            .map(|p| {
                let meta = metas
                    .iter()
                    .find(|n| n.peer.name == p.name)
                    .map(|n| &n.meta);
                let member = meta
                    .filter(|m| m.cluster_id == self.cluster_id && m.member_id != 0)
                    .and_then(|m| members.iter().find(|r| r.id == m.member_id));
                let role = match member {
                    Some(r) if r.is_learner => "learner",
                    Some(_) => "voter",
                    None => "mesh-only",
                };
                peer_pb(
                    p,
                    member.map_or(0, |r| r.id),
                    role,
                    meta.map(|m| m.client_url.clone()),
                )
            })
            .collect())
    }
}

fn peer_pb(p: &PeerInfo, member_id: u64, role: &str, client_url: Option<String>) -> MeshPeer {
    MeshPeer {
        name: p.name,
        nickname: p.nickname.clone(),
        uid: p.uid,
        address: p.address.clone(),
        connections: p.connections.iter().filter(|c| c.established).count() as u32,
        reachable: p.is_self || p.reachable,
        next_hop: p.next_hop.unwrap_or(0),
        hops: p.hops.unwrap_or(0),
        is_self: p.is_self,
        member_id,
        role: role.into(),
        client_url: client_url.unwrap_or_default(),
    }
}

fn check_counter_name(name: &str) -> Result<(), Status> {
    if name.is_empty() {
        return Err(Status::invalid_argument("counter name is empty"));
    }
    if name.len() > MAX_COUNTER_NAME {
        return Err(Status::invalid_argument(format!(
            "counter name is longer than {MAX_COUNTER_NAME} bytes"
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl mesh_server::Mesh for MeshApi {
    async fn peers(
        &self,
        req: Request<MeshPeersRequest>,
    ) -> Result<Response<MeshPeersResponse>, Status> {
        super::auth::caller(&self.kv, req.metadata())?;
        Ok(Response::new(MeshPeersResponse {
            peers: self.peer_list()?,
        }))
    }

    async fn status(
        &self,
        req: Request<MeshStatusRequest>,
    ) -> Result<Response<MeshStatusResponse>, Status> {
        super::auth::caller(&self.kv, req.metadata())?;
        let peers = self.peer_list()?;
        let stats = self.mesh.stats();
        let routes = peers
            .iter()
            .filter(|p| !p.is_self && p.reachable)
            .map(|p| MeshRoute {
                destination: p.name,
                next_hop: p.next_hop,
                hops: p.hops,
            })
            .collect();
        Ok(Response::new(MeshStatusResponse {
            this: peers.iter().find(|p| p.is_self).cloned(),
            peers: peers.len().saturating_sub(1) as u32,
            reachable: peers.iter().filter(|p| !p.is_self && p.reachable).count() as u32,
            connections: stats.connections as u32,
            routes,
            channels: self.channels.clone(),
            bytes_in: stats.bytes_in,
            bytes_out: stats.bytes_out,
            gossip_bytes_in: stats.gossip_bytes_in,
            gossip_bytes_out: stats.gossip_bytes_out,
            encrypted: self.mesh.config().key.is_some(),
            frames_rejected: stats.frames_rejected,
            handshakes_refused: stats.handshakes_refused,
        }))
    }

    async fn counter_incr(
        &self,
        req: Request<CounterIncrRequest>,
    ) -> Result<Response<CounterResponse>, Status> {
        super::auth::caller(&self.kv, req.metadata())?;
        let r = req.into_inner();
        check_counter_name(&r.name)?;
        self.counters.incr(&r.name, r.delta);
        Ok(Response::new(CounterResponse {
            value: self.counters.get(&r.name),
            name: r.name,
        }))
    }

    async fn counter_get(
        &self,
        req: Request<CounterGetRequest>,
    ) -> Result<Response<CounterResponse>, Status> {
        super::auth::caller(&self.kv, req.metadata())?;
        let r = req.into_inner();
        check_counter_name(&r.name)?;
        Ok(Response::new(CounterResponse {
            value: self.counters.get(&r.name),
            name: r.name,
        }))
    }
}
