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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// Rounds the mesh is then split in two halves, before it heals (0: no split).
    pub partition_rounds: u64,
}

impl MeshSimConfig {
    pub fn new(peers: usize, seed: u64) -> MeshSimConfig {
        MeshSimConfig {
            peers,
            degree: 3,
            seed,
            max_rounds: 100,
            steady_rounds: 10,
            partition_rounds: 5,
        }
    }

    /// Memory the run needs, roughly: every peer holds a table slot per peer for its
    /// entries and one for its routes (the entries themselves are shared), and what
    /// its neighbours are known to hold beyond their windows; measured at 137 MB for
    /// 1,000 peers and 0.9 GB for 3,000, of degree 3, without the split.
    pub fn estimated_bytes(&self) -> u64 {
        let n = self.peers as u64;
        let neighbours = 2 * self.degree as u64;
        let converge = n * n * (80 + 5 * neighbours);
        // Healing a split floods half the mesh across every cut link at once, while
        // each peer still holds the stamps of the half it collected: 1.5 GB for
        // 3,000 peers, 18.9 GB for 10,000.
        if self.partition_rounds > 0 {
            converge * 5 / 3
        } else {
            converge
        }
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
    /// Links cut to split the mesh in two halves.
    pub cut_links: usize,
    /// Whether, split, every peer collected every entry of the other half.
    pub partition_collected: bool,
    /// Gossip rounds from healing the split until every peer held every peer's
    /// latest entry again, and the bytes each peer sent meanwhile.
    pub rounds_to_recover: Option<u64>,
    pub bytes_per_peer_to_recover: f64,
}

/// A full digest, shared by the frames that carry it.
type Digest = Arc<Vec<MeshDigestItem>>;

enum Frame {
    /// Entries as the sender holds them: their bytes are what is sent, and the
    /// receiver gets the sender's decoded copy (what decoding the bytes gives), so
    /// that every peer shares one copy of each entry.
    Entries(Vec<Arc<Entry>>),
    Summary(u64),
    /// A full digest; every neighbour a peer answers from the same topology state
    /// gets the same copy (a socket writer would encode it once per connection).
    Digest(Digest, bool),
}

impl Frame {
    /// Payload bytes on the wire (a 4-byte length per entry and frame).
    fn len(&self) -> u64 {
        match self {
            Frame::Entries(es) => es.iter().map(|e| e.encoded().len() as u64 + 4).sum::<u64>() + 4,
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
    /// The digest built this step, and the topology's (change counter, size) it was
    /// built at.
    digest: Option<((u64, usize), Digest)>,
}

impl Peer {
    /// The topology's full digest, built again only when the topology changed.
    fn digest(&mut self) -> Digest {
        let at = (self.topology.seq(), self.topology.len());
        match &self.digest {
            Some((built, d)) if *built == at => d.clone(),
            _ => {
                let d = Arc::new(self.topology.digest());
                self.digest = Some((at, d.clone()));
                d
            }
        }
    }
}

/// The simulated mesh: peers, frames in flight, and the counters.
struct Net {
    peers: Vec<Peer>,
    /// Frames sent in the last step, delivered in the next.
    queue: Vec<(usize, usize, Frame)>,
    rng: Rng,
    step: u64,
    now_ms: Arc<AtomicU64>,
    sent_bytes: u64,
    frames: (u64, u64, u64),
}

/// The mesh name of simulated peer (or member) `i`.
pub(super) fn name(i: usize) -> PeerName {
    i as PeerName + 1
}

/// Peer `i` now has connections to `neighbours`: its entry lists them and is
/// published as a new version.
pub(super) fn publish_connections(
    topology: &mut Topology,
    i: usize,
    neighbours: impl IntoIterator<Item = usize>,
) {
    topology.update_own(|e| {
        e.connections = neighbours
            .into_iter()
            .map(|j| EntryConnection {
                peer: name(j),
                outbound: j > i,
            })
            .collect();
    });
    topology.publish_own();
}

impl Net {
    /// One 10 ms step: what the last step sent arrives; peers whose round comes
    /// collect unreachable entries and send a summary to a random neighbour; every
    /// writer sends what its neighbour is owed.
    fn step(&mut self) {
        self.now_ms.store(self.step * 10, Ordering::Relaxed);
        let mut out: Vec<(usize, usize, Frame)> = Vec::new();
        for (from, to, frame) in std::mem::take(&mut self.queue) {
            deliver(&mut self.peers, from, to, frame, &mut out);
        }
        for (i, p) in self.peers.iter_mut().enumerate() {
            if (self.step + p.phase).is_multiple_of(STEPS_PER_ROUND) {
                p.topology.gc_tick();
                if !p.neighbours.is_empty() {
                    let j = p.neighbours[self.rng.below(p.neighbours.len() as u64) as usize];
                    out.push((i, j, Frame::Summary(p.topology.summary())));
                }
            }
        }
        for (i, p) in self.peers.iter_mut().enumerate() {
            for (&j, s) in p.sync.iter_mut() {
                send_due(s, &p.topology, i, j, &mut out);
            }
        }
        for (_, _, f) in &out {
            self.sent_bytes += f.len();
            match f {
                Frame::Entries(_) => self.frames.0 += 1,
                Frame::Summary(_) => self.frames.1 += 1,
                Frame::Digest(..) => self.frames.2 += 1,
            }
        }
        self.queue = out;
        self.step += 1;
        // A digest is shared within a step; the next step's changes outdate most.
        for p in &mut self.peers {
            p.digest = None;
        }
    }

    /// Every peer holds every peer's latest entry, and only summaries are in flight.
    fn converged(&self) -> bool {
        let n = self.peers.len();
        if !self
            .queue
            .iter()
            .all(|(_, _, f)| matches!(f, Frame::Summary(_)))
        {
            return false;
        }
        let s0 = self.peers[0].topology.summary();
        self.peers
            .iter()
            .all(|p| p.topology.len() == n && p.topology.summary() == s0)
    }

    /// Peer `i`'s connections changed: its entry is published again and owed to
    /// every neighbour (as the mesh's publishing task does).
    fn republish(&mut self, i: usize) {
        let p = &mut self.peers[i];
        publish_connections(&mut p.topology, i, p.neighbours.iter().copied());
        for s in p.sync.values_mut() {
            s.queue([name(i)]);
        }
    }

    /// A connection between `i` and `j` comes up: each side starts its sync state
    /// and sends its summary first, as a handshake ends.
    fn connect(&mut self, i: usize, j: usize) {
        for (a, b) in [(i, j), (j, i)] {
            let p = &mut self.peers[a];
            p.neighbours.push(b);
            p.neighbours.sort_unstable();
            let s = NeighbourSync::new(&p.topology);
            p.sync.insert(b, s);
            self.queue
                .push((a, b, Frame::Summary(p.topology.summary())));
        }
        self.republish(i);
        self.republish(j);
    }

    /// The connection between `i` and `j` goes down: its sync state goes, and what
    /// was in flight on it is lost.
    fn disconnect(&mut self, i: usize, j: usize) {
        for (a, b) in [(i, j), (j, i)] {
            let p = &mut self.peers[a];
            p.neighbours.retain(|&k| k != b);
            p.sync.remove(&b);
        }
        self.queue
            .retain(|&(f, t, _)| !((f, t) == (i, j) || (f, t) == (j, i)));
        self.republish(i);
        self.republish(j);
    }

    /// Steps until converged; the step it converged at, if within `max_steps`.
    fn run_until_converged(&mut self, max_steps: u64) -> Option<u64> {
        let start = self.step;
        while self.step < start + max_steps {
            self.step();
            if self.converged() {
                return Some(self.step - start);
            }
        }
        None
    }
}

/// Runs one mesh simulation: convergence from nothing, steady state, and, if asked,
/// recovery from a partition.
pub fn run(cfg: &MeshSimConfig) -> MeshReport {
    let n = cfg.peers.max(2);
    let mut rng = Rng::new(cfg.seed);
    // Simulated time for the routes' rebuild pacing (the mesh's own: at most one
    // rebuild per tenth of a gossip interval).
    let now_ms = Arc::new(AtomicU64::new(0));
    let base = Instant::now();
    let clock: crate::Clock = {
        let now_ms = now_ms.clone();
        Arc::new(move || base + Duration::from_millis(now_ms.load(Ordering::Relaxed)))
    };
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
    let peers: Vec<Peer> = (0..n)
        .map(|i| {
            let own = Entry::new(name(i), format!("p{i}"), rng.next_u64(), format!("sim:{i}"));
            let topology = Topology::new(own, Duration::from_millis(100), clock.clone());
            Peer {
                topology,
                neighbours: Vec::new(),
                sync: BTreeMap::new(),
                phase: rng.below(STEPS_PER_ROUND),
                digest: None,
            }
        })
        .collect();
    let mut net = Net {
        peers,
        queue: Vec::new(),
        rng,
        step: 0,
        now_ms,
        sent_bytes: 0,
        frames: (0, 0, 0),
    };
    // Every peer connects to its neighbours at once.
    for (i, l) in links.iter().enumerate() {
        let neighbours: Vec<usize> = l.iter().copied().collect();
        let p = &mut net.peers[i];
        for &j in &neighbours {
            p.sync.insert(j, NeighbourSync::new(&p.topology));
            net.queue.push((i, j, Frame::Summary(p.topology.summary())));
        }
        p.neighbours = neighbours;
        net.republish(i);
    }

    let mut report = MeshReport::default();
    let max_steps = cfg.max_rounds * STEPS_PER_ROUND;
    let Some(at) = net.run_until_converged(max_steps) else {
        report.frames = net.frames;
        return report;
    };
    report.ms_to_converge = Some(at * 10);
    report.rounds_to_converge = Some(at.div_ceil(STEPS_PER_ROUND));
    report.bytes_per_peer_to_converge = net.sent_bytes as f64 / n as f64;
    let steady_from = net.sent_bytes;
    for _ in 0..cfg.steady_rounds * STEPS_PER_ROUND {
        net.step();
    }
    report.bytes_per_peer_per_s =
        (net.sent_bytes - steady_from) as f64 / n as f64 / cfg.steady_rounds as f64;
    if cfg.partition_rounds > 0 {
        // Cut every link between the lower and the upper half of the peers, long
        // enough for each side to collect the other's entries; then heal.
        let cut: Vec<(usize, usize)> = (0..n)
            .flat_map(|i| links[i].iter().map(move |&j| (i, j)))
            .filter(|&(i, j)| i < j && (i < n / 2) != (j < n / 2))
            .collect();
        for &(i, j) in &cut {
            net.disconnect(i, j);
        }
        for _ in 0..cfg.partition_rounds * STEPS_PER_ROUND {
            net.step();
        }
        let lower = |name: PeerName| (name as usize) <= n / 2;
        report.partition_collected = net.peers.iter().enumerate().all(|(i, p)| {
            p.topology
                .entries()
                .all(|e| lower(e.name) == lower(name(i)))
        });
        let healed_from = net.sent_bytes;
        for &(i, j) in &cut {
            net.connect(i, j);
        }
        let back = net.run_until_converged(max_steps);
        report.rounds_to_recover = back.map(|s| s.div_ceil(STEPS_PER_ROUND));
        report.bytes_per_peer_to_recover = (net.sent_bytes - healed_from) as f64 / n as f64;
        report.cut_links = cut.len();
    }
    report.frames = net.frames;
    report
}

/// Peer `i`'s writer to neighbour `j` (its sync state `s`) takes its turn: what `j`
/// is owed is sent.
fn send_due(
    s: &mut NeighbourSync,
    topology: &Topology,
    i: usize,
    j: usize,
    out: &mut Vec<(usize, usize, Frame)>,
) {
    let due = s.take_due(topology);
    if !due.is_empty() {
        // Sized exactly: while a large mesh converges, these frames are most of
        // the memory in use.
        let mut entries = Vec::with_capacity(due.len());
        entries.extend(due.iter().filter_map(|&m| topology.get_shared(m)));
        out.push((i, j, Frame::Entries(entries)));
    }
}

/// What peer `to` does with a frame from `from`: the mesh's own handling. A frame
/// on a connection that has gone is lost with it.
fn deliver(
    peers: &mut [Peer],
    from: usize,
    to: usize,
    frame: Frame,
    out: &mut Vec<(usize, usize, Frame)>,
) {
    let p = &mut peers[to];
    if !p.sync.contains_key(&from) {
        return;
    }
    match frame {
        Frame::Entries(entries) => {
            let received: Vec<Received> = entries.into_iter().map(Received::decoded).collect();
            if let Some(s) = p.sync.get_mut(&from) {
                s.received(&p.topology, &received);
            }
            let changed = p.topology.merge(received);
            for (&j, s) in p.sync.iter_mut() {
                s.queue_merged(&changed, j == from, name(to));
            }
        }
        Frame::Summary(summary) => {
            let Some(s) = p.sync.get_mut(&from) else {
                return;
            };
            if s.on_summary(&p.topology, summary) == Answer::Digest {
                out.push((to, from, Frame::Digest(p.digest(), false)));
            }
        }
        Frame::Digest(items, is_reply) => {
            let Some(s) = p.sync.get_mut(&from) else {
                return;
            };
            let (_, answer) = s.on_digest(&p.topology, &items, is_reply);
            if answer == Answer::DigestReply {
                out.push((to, from, Frame::Digest(p.digest(), true)));
            }
            // The writer woken by the digest takes its turn at once: a digest leaves
            // what the neighbour lacks as exceptions until then, and thousands of
            // connections holding half the mesh each would outgrow the memory.
            if let Some(s) = p.sync.get_mut(&from) {
                send_due(s, &p.topology, to, from, out);
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
        // Split in two, each half forgets the other; healed, it converges again.
        assert!(r.cut_links > 0, "{r:?}");
        assert!(r.partition_collected, "{r:?}");
        assert!(r.rounds_to_recover.is_some_and(|n| n <= 3), "{r:?}");
    }
}
