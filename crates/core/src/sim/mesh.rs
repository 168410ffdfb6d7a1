//! The gossip mesh under simulation: N peers, each with meshd's own topology CRDT
//! (`mesh::topology::Topology`) and per-neighbour sync state (`mesh::sync::NeighbourSync`),
//! exchanging frames over a simulated network in 10 ms steps, one gossip round (the
//! default 1 s anti-entropy interval) every 100 steps. Only the sockets are replaced:
//! what each peer sends and what it does with what it receives is the mesh's code.
//!
//! A frame sent in one step arrives in the next (a 10 ms hop). Bytes are counted as the
//! frames' payloads (entries as encoded, summaries, digests); heartbeats, Noise and TCP
//! framing are not counted.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;

use super::Rng;
use crate::mesh::sync::{Answer, NeighbourSync};
use crate::mesh::topology::{Entry, EntryConnection, Received, Topology};
use crate::mesh::PeerName;
use crate::proto::meshpb::MeshDigestItem;

/// Steps per gossip round (10 ms steps, a 1 s interval).
const STEPS_PER_ROUND: u64 = 100;

/// What one mesh run does.
#[derive(Clone, Debug)]
pub struct MeshSimConfig {
    pub peers: usize,
    /// Random other peers each peer connects to.
    pub degree: usize,
    pub seed: u64,
    /// Give up after this many rounds.
    pub max_rounds: u64,
    /// Rounds of steady state measured after convergence.
    pub steady_rounds: u64,
}

impl MeshSimConfig {
    pub fn new(peers: usize, seed: u64) -> MeshSimConfig {
        MeshSimConfig {
            peers,
            degree: 3,
            seed,
            max_rounds: 100,
            steady_rounds: 10,
        }
    }

    /// Memory the run needs, roughly: every peer holds every entry decoded, and per
    /// neighbour a stamp of it; measured at 1.1 GB for 1,000 peers of degree 3.
    pub fn estimated_bytes(&self) -> u64 {
        let n = self.peers as u64;
        let neighbours = 2 * self.degree as u64;
        n * n * (500 + 100 * neighbours)
    }
}

/// What a mesh run measured.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MeshReport {
    /// Gossip rounds until every peer held every peer's latest entry (None: not within
    /// `max_rounds`).
    pub rounds_to_converge: Option<u64>,
    /// The same in simulated milliseconds.
    pub ms_to_converge: Option<u64>,
    /// Payload bytes each peer sent per second in steady state.
    pub bytes_per_peer_per_s: f64,
    /// Payload bytes each peer sent, on average, until convergence.
    pub bytes_per_peer_to_converge: f64,
    /// Frames of each kind sent in all: entries, summaries, digests.
    pub frames: (u64, u64, u64),
}

enum Frame {
    Entries(Vec<Bytes>),
    Summary(u64),
    Digest(Vec<MeshDigestItem>, bool),
}

impl Frame {
    /// Payload bytes on the wire (a 4-byte length per entry and frame).
    fn len(&self) -> u64 {
        match self {
            Frame::Entries(es) => es.iter().map(|e| e.len() as u64 + 4).sum::<u64>() + 4,
            Frame::Summary(_) => 12,
            // name, version and uid, each a varint of up to 10 bytes, plus tags.
            Frame::Digest(items, _) => items.len() as u64 * 26 + 5,
        }
    }
}

struct Peer {
    topology: Topology,
    neighbours: Vec<usize>,
    sync: BTreeMap<usize, NeighbourSync>,
    /// Step of the peer's round at which it sends its summary.
    phase: u64,
}

/// Runs one mesh simulation.
pub fn run(cfg: &MeshSimConfig) -> MeshReport {
    let n = cfg.peers.max(2);
    let mut rng = Rng::new(cfg.seed);
    let name = |i: usize| -> PeerName { i as PeerName + 1 };
    // A sparse random graph: each peer connects to `degree` others; links are
    // symmetric, as TCP connections are.
    let mut links = vec![std::collections::BTreeSet::new(); n];
    for i in 0..n {
        for _ in 0..cfg.degree.min(n - 1) {
            let mut j = rng.below(n as u64) as usize;
            if j == i {
                j = (j + 1) % n;
            }
            links[i].insert(j);
            links[j].insert(i);
        }
    }
    let mut peers: Vec<Peer> = (0..n)
        .map(|i| {
            let own = Entry::new(name(i), format!("p{i}"), rng.next_u64(), format!("sim:{i}"));
            let mut topology = Topology::new(own, Duration::ZERO);
            let neighbours: Vec<usize> = links[i].iter().copied().collect();
            topology.update_own(|e| {
                e.connections = neighbours
                    .iter()
                    .map(|&j| EntryConnection {
                        peer: name(j),
                        outbound: j > i,
                    })
                    .collect();
            });
            topology.publish_own();
            let sync = neighbours
                .iter()
                .map(|&j| {
                    let mut s = NeighbourSync::default();
                    // A new connection is owed our entry.
                    s.queue([name(i)]);
                    (j, s)
                })
                .collect();
            Peer {
                topology,
                neighbours,
                sync,
                phase: rng.below(STEPS_PER_ROUND),
            }
        })
        .collect();

    let mut report = MeshReport::default();
    let mut queue: Vec<(usize, usize, Frame)> = Vec::new();
    // A summary to every neighbour on connecting.
    for (i, p) in peers.iter().enumerate() {
        for &j in &p.neighbours {
            queue.push((i, j, Frame::Summary(p.topology.summary())));
        }
    }
    let mut sent_bytes = 0u64;
    let mut converged_at: Option<u64> = None;
    let mut steady_from_bytes = 0u64;
    let end = cfg.max_rounds * STEPS_PER_ROUND;
    let mut step = 0u64;
    while step < end {
        // Deliver what the last step sent.
        let mut out: Vec<(usize, usize, Frame)> = Vec::new();
        for (from, to, frame) in std::mem::take(&mut queue) {
            deliver(&mut peers, from, to, frame, &mut out);
        }
        // Anti-entropy: each peer's summary to one random neighbour, once a round.
        for (i, p) in peers.iter().enumerate() {
            if (step + p.phase).is_multiple_of(STEPS_PER_ROUND) && !p.neighbours.is_empty() {
                let j = p.neighbours[rng.below(p.neighbours.len() as u64) as usize];
                out.push((i, j, Frame::Summary(p.topology.summary())));
            }
        }
        // Each writer's turn: the entries each neighbour is owed.
        for (i, p) in peers.iter_mut().enumerate() {
            for (&j, s) in p.sync.iter_mut() {
                let due = s.take_due(&p.topology);
                if !due.is_empty() {
                    let bytes = due
                        .iter()
                        .filter_map(|&m| p.topology.get(m).map(|e| e.encoded().clone()))
                        .collect();
                    out.push((i, j, Frame::Entries(bytes)));
                }
            }
        }
        for (_, _, f) in &out {
            sent_bytes += f.len();
            match f {
                Frame::Entries(_) => report.frames.0 += 1,
                Frame::Summary(_) => report.frames.1 += 1,
                Frame::Digest(..) => report.frames.2 += 1,
            }
        }
        queue = out;
        step += 1;
        if converged_at.is_none() && queue.iter().all(|(_, _, f)| matches!(f, Frame::Summary(_))) {
            let s0 = peers[0].topology.summary();
            if peers
                .iter()
                .all(|p| p.topology.len() == n && p.topology.summary() == s0)
            {
                converged_at = Some(step);
                report.bytes_per_peer_to_converge = sent_bytes as f64 / n as f64;
                steady_from_bytes = sent_bytes;
            }
        }
        if let Some(at) = converged_at {
            if step >= at + cfg.steady_rounds * STEPS_PER_ROUND {
                let secs = cfg.steady_rounds as f64;
                report.bytes_per_peer_per_s =
                    (sent_bytes - steady_from_bytes) as f64 / n as f64 / secs;
                break;
            }
        }
    }
    if let Some(at) = converged_at {
        report.ms_to_converge = Some(at * 10);
        report.rounds_to_converge = Some(at.div_ceil(STEPS_PER_ROUND));
    }
    report
}

/// What peer `to` does with a frame from `from`: the mesh's own handling.
fn deliver(
    peers: &mut [Peer],
    from: usize,
    to: usize,
    frame: Frame,
    out: &mut Vec<(usize, usize, Frame)>,
) {
    let p = &mut peers[to];
    match frame {
        Frame::Entries(bytes) => {
            let received: Vec<Received> = bytes
                .into_iter()
                .filter_map(|b| Received::parse(b).ok())
                .collect();
            if let Some(s) = p.sync.get_mut(&from) {
                s.received(&received);
            }
            let changed = p.topology.merge(received);
            if !changed.is_empty() {
                for s in p.sync.values_mut() {
                    s.queue(changed.iter().copied());
                }
            }
        }
        Frame::Summary(summary) => {
            let Some(s) = p.sync.get_mut(&from) else {
                return;
            };
            if s.on_summary(&p.topology, summary) == Answer::Digest {
                out.push((to, from, Frame::Digest(p.topology.digest(), false)));
            }
        }
        Frame::Digest(items, is_reply) => {
            let Some(s) = p.sync.get_mut(&from) else {
                return;
            };
            let (_, answer) = s.on_digest(&p.topology, &items, is_reply);
            if answer == Answer::DigestReply {
                out.push((to, from, Frame::Digest(p.topology.digest(), true)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_mesh_converges_and_then_only_summaries_flow() {
        let r = run(&MeshSimConfig::new(50, 1));
        let rounds = r.rounds_to_converge.expect("converges");
        assert!(rounds <= 2, "{r:?}");
        // In steady state each peer sends one 12-byte summary a round.
        assert!(
            r.bytes_per_peer_per_s > 0.0 && r.bytes_per_peer_per_s <= 13.0,
            "{r:?}"
        );
        assert_eq!(run(&MeshSimConfig::new(50, 1)), r, "a function of its seed");
    }
}
