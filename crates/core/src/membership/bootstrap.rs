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
use crate::proto::meshpb::NodeMeta;

/// How the wait ended.
#[derive(Debug, PartialEq, Eq)]
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

/// What this node does after looking at the nodes it sees.
#[derive(Debug, PartialEq, Eq)]
pub struct Step {
    /// The proposal to publish (empty: none yet); `None` leaves it as it is.
    pub publish: Option<Vec<u64>>,
    /// How many candidates are visible, for the log.
    pub candidates: usize,
    /// `Some` when the wait is over; otherwise look again after the next change.
    pub outcome: Option<Outcome>,
}

/// The agreement rule, without IO: `me` is this node's published metadata (state
/// EMPTY, with its current proposal), `seen` every node the mesh shows (this one
/// included). The same inputs give the same step on every node.
pub fn decide(me: &NodeMeta, seen: &[Node], expect: u32) -> Step {
    // Members that formed a set including this node: adopt it (this node was slow
    // to see their agreement).
    let mut proposal = me.bootstrap_proposal.clone();
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
        return Step {
            publish: None,
            candidates: 0,
            outcome: Some(Outcome::Join),
        };
    }
    let candidates: Vec<&Node> = seen
        .iter()
        .filter(|n| is_candidate(n, expect, me.token_hash, &proposal))
        .collect();
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
    let agreed = !proposal.is_empty()
        && proposal.iter().all(|id| {
            candidates
                .iter()
                .any(|n| n.meta.member_id == *id && n.meta.bootstrap_proposal == proposal)
        });
    let outcome = if !agreed {
        None
    } else if !proposal.contains(&me.member_id) {
        Some(Outcome::Join)
    } else {
        Some(Outcome::Form(members_of(&proposal, &candidates)))
    };
    Step {
        publish: Some(proposal),
        candidates: candidates.len(),
        outcome,
    }
}

/// (member ID, name, mesh address) of each node of an agreed proposal.
fn members_of(proposal: &[u64], candidates: &[&Node]) -> Vec<(u64, String, String)> {
    proposal
        .iter()
        .filter_map(|id| candidates.iter().find(|n| n.meta.member_id == *id))
        .map(|n| {
            (
                n.meta.member_id,
                n.meta.name.clone(),
                n.meta.mesh_addr.clone(),
            )
        })
        .collect()
}

/// Waits for agreement. `meta` is this node's published metadata (state EMPTY); its
/// proposal is republished at every step, so the others see it.
pub async fn await_agreement(mesh: &Mesh, meta: &LocalMeta, expect: u32) -> Outcome {
    let mut changes = mesh.changes();
    let mut last_report = usize::MAX;
    loop {
        let step = decide(&meta.get(), &nodes(mesh), expect);
        if let Some(proposal) = step.publish {
            meta.update(|m| m.bootstrap_proposal = proposal);
        }
        match step.outcome {
            Some(outcome @ Outcome::Join) => {
                info!("a cluster with this token exists or formed without this node; joining it");
                return outcome;
            }
            Some(outcome @ Outcome::Form(_)) => return outcome,
            None if step.candidates != last_report => {
                last_report = step.candidates;
                info!(
                    seen = step.candidates,
                    expect, "waiting for server peers to bootstrap the cluster"
                );
            }
            None => {}
        }
        // Wake on a topology or metadata change, and at least every second.
        let _ = tokio::time::timeout(Duration::from_secs(1), changes.changed()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::test_node;

    const TOKEN: u64 = 77;

    fn empty(id: u64, proposal: &[u64]) -> NodeMeta {
        NodeMeta {
            name: format!("n{id}"),
            member_id: id,
            server: true,
            state: State::Empty as i32,
            bootstrap_expect: 3,
            bootstrap_proposal: proposal.to_vec(),
            mesh_addr: format!("10.0.0.{id}:6783"),
            token_hash: TOKEN,
            ..Default::default()
        }
    }

    /// The nodes as node `me` sees them (itself included).
    fn view(me: u64, metas: &[NodeMeta]) -> Vec<Node> {
        metas
            .iter()
            .map(|m| test_node(m.member_id, m.clone(), m.member_id == me))
            .collect()
    }

    fn step(me: &NodeMeta, all: &[NodeMeta]) -> Step {
        decide(me, &view(me.member_id, all), 3)
    }

    #[test]
    fn too_few_candidates_propose_nothing() {
        let all = [empty(5, &[]), empty(9, &[])];
        let s = step(&all[0], &all);
        assert_eq!(s.publish, Some(vec![]));
        assert_eq!((s.candidates, s.outcome), (2, None));
    }

    #[test]
    fn the_lowest_ids_are_proposed_then_formed_once_all_publish_them() {
        let all = [empty(9, &[]), empty(2, &[]), empty(5, &[]), empty(7, &[])];
        let s = step(&all[0], &all);
        assert_eq!(s.publish, Some(vec![2, 5, 7]));
        assert_eq!(s.outcome, None, "the others have not published it yet");
        let agreed: Vec<NodeMeta> = all.iter().map(|m| empty(m.member_id, &[2, 5, 7])).collect();
        let formed = step(&agreed[1], &agreed).outcome;
        let Some(Outcome::Form(members)) = formed else {
            panic!("{formed:?}");
        };
        let ids: Vec<u64> = members.iter().map(|m| m.0).collect();
        assert_eq!(ids, [2, 5, 7]);
        assert_eq!(members[0].2, "10.0.0.2:6783");
        // The fourth node, left out, joins the cluster they form.
        assert_eq!(step(&agreed[0], &agreed).outcome, Some(Outcome::Join));
    }

    #[test]
    fn a_proposal_is_kept_while_its_nodes_remain_and_dropped_when_one_leaves() {
        let mine = [empty(5, &[5, 7, 9]), empty(7, &[]), empty(9, &[])];
        // A lower ID appearing later does not change a valid proposal.
        let with_low: Vec<NodeMeta> = mine.iter().cloned().chain([empty(1, &[])]).collect();
        assert_eq!(step(&mine[0], &with_low).publish, Some(vec![5, 7, 9]));
        // Node 9 leaves: the proposal is rebuilt from who is left.
        let gone = [mine[0].clone(), mine[1].clone(), empty(1, &[])];
        assert_eq!(step(&gone[0], &gone).publish, Some(vec![1, 5, 7]));
    }

    #[test]
    fn other_tokens_other_sizes_and_clients_are_not_candidates() {
        let mut other_token = empty(2, &[]);
        other_token.token_hash = TOKEN + 1;
        let mut other_size = empty(3, &[]);
        other_size.bootstrap_expect = 5;
        let mut client = empty(4, &[]);
        client.server = false;
        let all = [
            empty(5, &[]),
            empty(6, &[]),
            other_token,
            other_size,
            client,
        ];
        let s = step(&all[0], &all);
        assert_eq!((s.publish, s.candidates), (Some(vec![]), 2));
    }

    #[test]
    fn an_existing_cluster_with_the_token_is_joined() {
        let mut member = empty(2, &[1, 2, 3]);
        member.state = State::Member as i32;
        let all = [empty(5, &[]), empty(6, &[]), empty(7, &[]), member];
        let s = step(&all[0], &all);
        assert_eq!((s.publish, s.outcome), (None, Some(Outcome::Join)));
    }

    #[test]
    fn a_slow_node_adopts_the_set_formed_with_it() {
        // 2 and 3 formed {1, 2, 3} and are members; 1 never saw their proposal.
        let formed = |id| {
            let mut m = empty(id, &[1, 2, 3]);
            m.state = State::Member as i32;
            m
        };
        let all = [empty(1, &[1, 2, 3]), formed(2), formed(3)];
        let Some(Outcome::Form(m)) = step(&all[0], &all).outcome else {
            panic!("node 1 must form the set it belongs to");
        };
        assert_eq!(m.len(), 3);
        // Before it has published the set itself, it publishes it and waits.
        let early = [empty(1, &[]), formed(2), formed(3)];
        let s = step(&early[0], &early);
        assert_eq!((s.publish, s.outcome), (Some(vec![1, 2, 3]), None));
    }
}
