//! `--bootstrap-expect N`: empty server nodes wait until N of them see each other, then
//! every one of them forms the same initial configuration.
//!
//! Each empty node proposes the N lowest member IDs among the empty server nodes it
//! sees (with the same N and cluster token) and publishes that proposal. It keeps its
//! proposal unless a node in it disappears or stops being a candidate, and it forms the
//! cluster only when every node of the proposal publishes the very same proposal. Two
//! different sets can therefore never both be formed by a node in both, and starting
//! N nodes in any order gives one cluster.

use std::time::Duration;

use tracing::info;

use super::{nodes, LocalMeta, Node};
use crate::mesh::Mesh;
use crate::proto::meshpb::node_meta::State;

/// How the wait ended.
pub enum Outcome {
    /// Form a new cluster of these members: (member ID, name, mesh address).
    Form(Vec<(u64, String, String)>),
    /// A cluster with our token already exists (or formed without us): join it.
    Join,
}

fn is_candidate(n: &Node, expect: u32, token_hash: u64, proposal: &[u64]) -> bool {
    if !n.meta.server || n.meta.token_hash != token_hash || n.meta.bootstrap_expect != expect {
        return false;
    }
    match n.state() {
        State::Empty => true,
        // Already formed the cluster we propose: still counts as agreeing.
        State::Member => !proposal.is_empty() && n.meta.bootstrap_proposal == proposal,
        State::Removed => false,
    }
}

/// Waits for agreement. `meta` is this node's published metadata (state EMPTY).
pub async fn await_agreement(mesh: &Mesh, meta: &LocalMeta, expect: u32) -> Outcome {
    let me = meta.get();
    let mut changes = mesh.changes();
    let mut last_report = 0usize;
    loop {
        let seen = nodes(mesh);
        // Members that formed a set including this node: adopt it (this node was slow
        // to see their agreement).
        let mut proposal = meta.get().bootstrap_proposal;
        if let Some(formed) = seen.iter().find(|n| {
            n.state() == State::Member
                && n.meta.token_hash == me.token_hash
                && n.meta.bootstrap_proposal.contains(&me.member_id)
        }) {
            proposal = formed.meta.bootstrap_proposal.clone();
        }
        // A cluster with our token that is not one we are forming: join it.
        if seen.iter().any(|n| {
            n.state() == State::Member
                && n.meta.token_hash == me.token_hash
                && n.meta.bootstrap_proposal != proposal
        }) {
            info!("a cluster with this token already exists; joining it");
            return Outcome::Join;
        }
        let candidates: Vec<&Node> = seen
            .iter()
            .filter(|n| is_candidate(n, expect, me.token_hash, &proposal))
            .collect();
        if candidates.len() != last_report {
            last_report = candidates.len();
            info!(
                seen = candidates.len(),
                expect, "waiting for server peers to bootstrap the cluster"
            );
        }
        let still_valid = !proposal.is_empty()
            && proposal
                .iter()
                .all(|id| candidates.iter().any(|n| n.meta.member_id == *id));
        let proposal = if still_valid {
            proposal
        } else if candidates.len() >= expect as usize {
            let mut ids: Vec<u64> = candidates.iter().map(|n| n.meta.member_id).collect();
            ids.sort_unstable();
            ids.truncate(expect as usize);
            ids
        } else {
            Vec::new()
        };
        meta.update(|m| m.bootstrap_proposal = proposal.clone());
        if !proposal.is_empty() {
            let agreed = proposal.iter().all(|id| {
                candidates
                    .iter()
                    .any(|n| n.meta.member_id == *id && n.meta.bootstrap_proposal == proposal)
            });
            if agreed {
                if proposal.contains(&me.member_id) {
                    let members = proposal
                        .iter()
                        .filter_map(|id| candidates.iter().find(|n| n.meta.member_id == *id))
                        .map(|n| {
                            (
                                n.meta.member_id,
                                n.meta.name.clone(),
                                n.meta.mesh_addr.clone(),
                            )
                        })
                        .collect();
                    return Outcome::Form(members);
                }
                info!("the initial voters agreed without this node; joining the cluster");
                return Outcome::Join;
            }
        }
        // Wake on a topology or metadata change, and at least every second.
        let _ = tokio::time::timeout(Duration::from_secs(1), changes.changed()).await;
    }
}
