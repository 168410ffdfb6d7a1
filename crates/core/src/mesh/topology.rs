//! The topology CRDT and the routes derived from it (sans-IO): every peer's own entry,
//! merged by (version, uid); shortest-path next hops for unicast and per-source spanning
//! trees for broadcast, both on the symmetric graph; garbage collection of unreachable peers.
use super::PeerName;
use crate::proto::meshpb::{MeshPeerConnection, MeshPeerEntry};
use std::collections::{HashMap, VecDeque};

/// One peer's own description of itself, as gossiped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: PeerName,
    pub nickname: String,
    /// Random per process start: a restarted peer is a new incarnation.
    pub uid: u64,
    /// Bumped by the peer itself on every change of its connections or meta.
    pub version: u64,
    pub address: String,
    /// The peer's established connections, sorted by peer name.
    pub connections: Vec<EntryConnection>,
    pub meta: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryConnection {
    pub peer: PeerName,
    pub address: String,
    pub outbound: bool,
}

impl Entry {
    /// The CRDT order: higher version wins, and on a tie the higher uid (so two
    /// incarnations of one name settle the same way everywhere).
    fn newer_than(&self, other: &Entry) -> bool {
        (self.version, self.uid) > (other.version, other.uid)
    }

    fn lists(&self, peer: PeerName) -> bool {
        self.connections.iter().any(|c| c.peer == peer)
    }

    pub fn to_pb(&self) -> MeshPeerEntry {
        MeshPeerEntry {
            name: self.name,
            nickname: self.nickname.clone(),
            uid: self.uid,
            version: self.version,
            address: self.address.clone(),
            connections: self
                .connections
                .iter()
                .map(|c| MeshPeerConnection {
                    peer: c.peer,
                    address: c.address.clone(),
                    outbound: c.outbound,
                })
                .collect(),
            meta: self.meta.clone(),
        }
    }

    pub fn from_pb(pb: MeshPeerEntry) -> Entry {
        let mut connections: Vec<EntryConnection> = pb
            .connections
            .into_iter()
            .map(|c| EntryConnection {
                peer: c.peer,
                address: c.address,
                outbound: c.outbound,
            })
            .collect();
        connections.sort_by_key(|c| c.peer);
        connections.dedup_by_key(|c| c.peer);
        Entry {
            name: pb.name,
            nickname: pb.nickname,
            uid: pb.uid,
            version: pb.version,
            address: pb.address,
            connections,
            meta: pb.meta,
        }
    }
}

/// Everything a peer knows about the mesh, and the routes computed from it.
#[derive(Debug)]
pub struct Topology {
    own: PeerName,
    entries: HashMap<PeerName, Entry>,
    /// Symmetric adjacency (an edge counts only when both ends list it), sorted.
    adjacency: HashMap<PeerName, Vec<PeerName>>,
    /// dst → (next hop, hop count) for every reachable peer but ourselves.
    routes: HashMap<PeerName, (PeerName, u32)>,
    /// src → our children in the broadcast tree rooted at src; filled lazily.
    broadcast_children: HashMap<PeerName, Vec<PeerName>>,
    /// Consecutive GC ticks a peer has been unreachable.
    unreachable_ticks: HashMap<PeerName, u32>,
    /// (version, uid) of collected peers. A copy of such an entry still circulating
    /// (a zombie) is taken back only if it is reachable once merged; otherwise peers
    /// that collected it late would keep handing it back to those that collected it.
    collected: HashMap<PeerName, (u64, u64)>,
}

impl Topology {
    pub fn new(own: Entry) -> Self {
        let name = own.name;
        let mut t = Topology {
            own: name,
            entries: HashMap::from([(name, own)]),
            adjacency: HashMap::new(),
            routes: HashMap::new(),
            broadcast_children: HashMap::new(),
            unreachable_ticks: HashMap::new(),
            collected: HashMap::new(),
        };
        t.recompute();
        t
    }

    #[cfg(test)]
    pub fn own(&self) -> &Entry {
        &self.entries[&self.own]
    }

    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    pub fn get(&self, name: PeerName) -> Option<&Entry> {
        self.entries.get(&name)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Changes our own entry and bumps its version; routes are recomputed.
    pub fn update_own(&mut self, f: impl FnOnce(&mut Entry)) {
        let own = self.entries.get_mut(&self.own).expect("own entry");
        f(own);
        own.connections.sort_by_key(|c| c.peer);
        own.version += 1;
        self.recompute();
    }

    /// Merges received entries. Returns the names whose entry changed here (to be
    /// forwarded to other neighbours); our own name is in it when a stale entry of ours
    /// (for example from before a restart) forced a version bump.
    pub fn merge(&mut self, received: Vec<Entry>) -> Vec<PeerName> {
        let mut changed = Vec::new();
        let mut revived = Vec::new();
        for e in received {
            if e.name == self.own {
                let own = self.entries.get_mut(&self.own).expect("own entry");
                if e != *own && e.version >= own.version {
                    own.version = e.version + 1;
                    changed.push(self.own);
                }
                continue;
            }
            match self.entries.get(&e.name) {
                Some(cur) if !e.newer_than(cur) => {}
                _ => {
                    if self.collected.get(&e.name) == Some(&(e.version, e.uid)) {
                        revived.push(e.name);
                    }
                    changed.push(e.name);
                    self.entries.insert(e.name, e);
                }
            }
        }
        if !changed.is_empty() {
            self.recompute();
        }
        let zombies: Vec<PeerName> = revived
            .into_iter()
            .filter(|&n| !self.is_reachable(n))
            .collect();
        if !zombies.is_empty() {
            for n in &zombies {
                self.entries.remove(n);
            }
            changed.retain(|n| !zombies.contains(n));
            self.recompute();
        }
        for n in &changed {
            self.collected.remove(n);
        }
        changed
    }

    /// Rebuilds adjacency and routes (BFS from us, neighbours in name order so every
    /// peer breaks ties the same way).
    pub fn recompute(&mut self) {
        let mut adjacency: HashMap<PeerName, Vec<PeerName>> = HashMap::new();
        for e in self.entries.values() {
            let mut n: Vec<PeerName> = e
                .connections
                .iter()
                .filter(|c| self.entries.get(&c.peer).is_some_and(|o| o.lists(e.name)))
                .map(|c| c.peer)
                .collect();
            n.sort_unstable();
            adjacency.insert(e.name, n);
        }
        self.adjacency = adjacency;
        let parents = bfs(&self.adjacency, self.own);
        let mut routes = HashMap::new();
        for (&dst, &(_, hops)) in &parents {
            if dst == self.own {
                continue;
            }
            // Walk back to the peer one hop from us.
            let mut hop = dst;
            while let Some(&(p, _)) = parents.get(&hop) {
                if p == self.own {
                    break;
                }
                hop = p;
            }
            routes.insert(dst, (hop, hops));
        }
        self.routes = routes;
        self.broadcast_children.clear();
    }

    pub fn route(&self, dst: PeerName) -> Option<(PeerName, u32)> {
        self.routes.get(&dst).copied()
    }

    pub fn is_reachable(&self, name: PeerName) -> bool {
        name == self.own || self.routes.contains_key(&name)
    }

    pub fn reachable_count(&self) -> usize {
        self.routes.len() + 1
    }

    /// Our children in the spanning tree rooted at `src` (BFS from src, ties broken by
    /// name): the neighbours a broadcast from `src` must be relayed to.
    pub fn broadcast_children(&mut self, src: PeerName) -> Vec<PeerName> {
        if let Some(c) = self.broadcast_children.get(&src) {
            return c.clone();
        }
        let parents = bfs(&self.adjacency, src);
        let own = self.own;
        let children: Vec<PeerName> = self
            .adjacency
            .get(&own)
            .map(|n| {
                n.iter()
                    .copied()
                    .filter(|c| parents.get(c).map(|&(p, _)| p) == Some(own))
                    .collect()
            })
            .unwrap_or_default();
        self.broadcast_children.insert(src, children.clone());
        children
    }

    /// One GC tick: drops peers that were unreachable at this tick and the previous one
    /// (a grace of one tick lets an entry wait for its neighbour's entry that makes its
    /// edge symmetric). Returns the dropped names.
    pub fn gc_tick(&mut self) -> Vec<PeerName> {
        let unreachable: Vec<PeerName> = self
            .entries
            .keys()
            .copied()
            .filter(|&n| !self.is_reachable(n))
            .collect();
        self.unreachable_ticks
            .retain(|n, _| unreachable.contains(n));
        let mut removed = Vec::new();
        for n in unreachable {
            let ticks = self.unreachable_ticks.entry(n).or_insert(0);
            *ticks += 1;
            if *ticks >= 2 {
                if let Some(e) = self.entries.remove(&n) {
                    self.collected.insert(n, (e.version, e.uid));
                }
                self.unreachable_ticks.remove(&n);
                removed.push(n);
            }
        }
        if !removed.is_empty() {
            self.recompute();
        }
        removed
    }
}

/// BFS over `adjacency` from `root`: node → (parent, hops); the root maps to itself.
fn bfs(
    adjacency: &HashMap<PeerName, Vec<PeerName>>,
    root: PeerName,
) -> HashMap<PeerName, (PeerName, u32)> {
    let mut seen = HashMap::from([(root, (root, 0))]);
    let mut queue = VecDeque::from([root]);
    while let Some(n) = queue.pop_front() {
        let hops = seen[&n].1;
        for &m in adjacency.get(&n).into_iter().flatten() {
            if let std::collections::hash_map::Entry::Vacant(v) = seen.entry(m) {
                v.insert((n, hops + 1));
                queue.push_back(m);
            }
        }
    }
    seen
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: PeerName, version: u64, conns: &[PeerName]) -> Entry {
        Entry {
            name,
            nickname: format!("p{name}"),
            uid: name * 10,
            version,
            address: String::new(),
            connections: conns
                .iter()
                .map(|&p| EntryConnection {
                    peer: p,
                    address: String::new(),
                    outbound: false,
                })
                .collect(),
            meta: vec![],
        }
    }

    #[test]
    fn only_symmetric_edges_route() {
        let mut t = Topology::new(entry(1, 1, &[2]));
        t.merge(vec![entry(2, 1, &[1, 3]), entry(3, 1, &[])]);
        assert_eq!(t.route(2), Some((2, 1)));
        assert_eq!(t.route(3), None, "3 does not list 2");
        t.merge(vec![entry(3, 2, &[2])]);
        assert_eq!(t.route(3), Some((2, 2)));
        assert_eq!(t.broadcast_children(1), vec![2]);
        assert_eq!(t.broadcast_children(3), Vec::<PeerName>::new());
    }

    #[test]
    fn merge_keeps_higher_version_and_bumps_own_on_stale_self() {
        let mut t = Topology::new(entry(1, 1, &[]));
        assert_eq!(t.merge(vec![entry(2, 5, &[])]), vec![2]);
        assert!(t.merge(vec![entry(2, 4, &[1])]).is_empty());
        assert_eq!(t.get(2).unwrap().version, 5);
        let mut old_self = entry(1, 9, &[]);
        old_self.uid = 99;
        assert_eq!(t.merge(vec![old_self]), vec![1]);
        assert_eq!(t.own().version, 10);
    }

    #[test]
    fn unreachable_peers_are_collected_after_grace() {
        let mut t = Topology::new(entry(1, 1, &[]));
        t.merge(vec![entry(2, 1, &[])]);
        assert!(t.gc_tick().is_empty());
        assert_eq!(t.gc_tick(), vec![2]);
        assert!(t.get(2).is_none());
        // The same entry handed back while still unreachable stays collected...
        assert!(t.merge(vec![entry(2, 1, &[])]).is_empty());
        assert!(t.get(2).is_none());
        // ...but comes back once it is reachable.
        t.update_own(|e| {
            e.connections.push(EntryConnection {
                peer: 2,
                address: String::new(),
                outbound: true,
            })
        });
        assert_eq!(t.merge(vec![entry(2, 1, &[1])]), vec![2]);
        assert!(t.is_reachable(2));
    }
}
