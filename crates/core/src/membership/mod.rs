//! Raft membership driven from the mesh, without ever letting reachability change the
//! voter set by itself: mesh membership (who is reachable) is not Raft membership (who
//! votes); only a committed configuration change alters the latter.
//!
//! Every node publishes a [`NodeMeta`] in its mesh metadata. From those: the routes
//! from Raft member IDs to mesh peers ([`refresh_routes`]), the `--bootstrap-expect`
//! agreement ([`bootstrap`]), the welcome that turns an empty node into a member
//! ([`join`]), and the leader's growth and healing loop ([`autopilot`]).

pub mod autopilot;
pub mod bootstrap;
pub mod join;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::mesh::{Mesh, PeerInfo, PeerName};
use crate::proto::meshpb::{node_meta::State, NodeMeta};
use crate::raft::mesh_transport::MemberRoutes;

/// Hash of a cluster token as published in metadata (the token itself stays local).
pub fn token_hash(token: &str) -> u64 {
    crate::storage::identity_stable_id(&[b"meshd-token", token.as_bytes()])
}

/// A mesh peer together with the metadata it publishes (if it is a meshd node).
#[derive(Clone, Debug)]
pub struct Node {
    pub peer: PeerInfo,
    pub meta: NodeMeta,
}

impl Node {
    pub fn state(&self) -> State {
        State::try_from(self.meta.state).unwrap_or(State::Empty)
    }
}

/// A node as `nodes` would list it, for unit tests of the decisions over nodes.
#[cfg(test)]
pub(crate) fn test_node(peer: PeerName, meta: NodeMeta, is_self: bool) -> Node {
    Node {
        peer: PeerInfo {
            name: peer,
            nickname: meta.name.clone(),
            uid: peer,
            version: 1,
            address: meta.mesh_addr.clone(),
            connections: Vec::new(),
            reachable: true,
            next_hop: None,
            hops: Some(1),
            meta: Vec::new(),
            is_self,
        },
        meta,
    }
}

/// Every reachable peer (and this node) that publishes meshd metadata.
pub fn nodes(mesh: &Mesh) -> Vec<Node> {
    nodes_of(mesh.peers())
}

/// The peers of a mesh view that are reachable (or this node) and publish meshd
/// metadata.
pub fn nodes_of(peers: Vec<crate::mesh::PeerInfo>) -> Vec<Node> {
    peers
        .into_iter()
        .filter(|p| p.is_self || p.reachable)
        .filter_map(|peer| {
            let meta: NodeMeta = prost::Message::decode(peer.meta.as_slice()).ok()?;
            (!meta.name.is_empty()).then_some(Node { peer, meta })
        })
        .collect()
}

/// This node's metadata, republished whenever it changes.
pub struct LocalMeta {
    mesh: Arc<Mesh>,
    meta: Mutex<NodeMeta>,
}

impl LocalMeta {
    pub fn new(mesh: Arc<Mesh>, meta: NodeMeta) -> Arc<LocalMeta> {
        mesh.set_meta(prost::Message::encode_to_vec(&meta));
        Arc::new(LocalMeta {
            mesh,
            meta: Mutex::new(meta),
        })
    }

    pub fn get(&self) -> NodeMeta {
        self.meta.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Applies `change` and republishes if anything changed.
    pub fn update(&self, change: impl FnOnce(&mut NodeMeta)) {
        let mut m = self.meta.lock().unwrap_or_else(|p| p.into_inner());
        let before = m.clone();
        change(&mut m);
        if *m != before {
            self.mesh.set_meta(prost::Message::encode_to_vec(&*m));
        }
    }
}

/// Rebuilds the member → peer routes of `cluster_id` from everyone's metadata.
pub fn refresh_routes(mesh: &Mesh, cluster_id: u64, routes: &MemberRoutes) {
    let map: HashMap<u64, PeerName> = nodes(mesh)
        .into_iter()
        .filter(|n| {
            n.meta.cluster_id == cluster_id && n.meta.member_id != 0 && n.state() == State::Member
        })
        .map(|n| (n.meta.member_id, n.peer.name))
        .collect();
    routes.replace(map);
}

/// Whether mesh peer `src` is the leader of `cluster_id` as far as this member can
/// tell: it publishes itself as that cluster's leader, under a member ID that is a
/// voter of `conf`. Only such a peer's removal notice is believed.
pub fn is_published_leader(
    mesh: &Mesh,
    cluster_id: u64,
    conf: &raft::prelude::ConfState,
    src: PeerName,
) -> bool {
    nodes(mesh).into_iter().any(|n| {
        n.peer.name == src
            && !n.peer.is_self
            && n.meta.cluster_id == cluster_id
            && n.meta.leader
            && n.state() == State::Member
            && conf.voters.contains(&n.meta.member_id)
    })
}

/// Client URL of a member of a cluster with this token, the leader when known: where a
/// node that is not a member forwards client requests.
pub fn member_client_url(mesh: &Mesh, token_hash: u64) -> Option<String> {
    let members: Vec<Node> = nodes(mesh)
        .into_iter()
        .filter(|n| {
            !n.peer.is_self
                && n.state() == State::Member
                && n.meta.token_hash == token_hash
                && !n.meta.client_url.is_empty()
        })
        .collect();
    members
        .iter()
        .find(|n| n.meta.leader)
        .or_else(|| members.first())
        .map(|n| n.meta.client_url.clone())
}
/// A member's peer URL as etcd answers it: members store `host:port`; `scheme` is
/// added unless the stored value already has one.
pub fn peer_url(stored: &str, scheme: &str) -> String {
    if stored.contains("://") {
        stored.to_string()
    } else {
        format!("{scheme}://{stored}")
    }
}
