//! The topology CRDT and the routes derived from it (sans-IO): every peer's own entry,
//! merged by (version, uid); shortest-path next hops for unicast and per-source spanning
//! trees for broadcast, both on the symmetric graph; garbage collection of unreachable peers.
use super::PeerName;
use crate::proto::meshpb::{MeshDigestItem, MeshPeerConnection, MeshPeerEntry};
use bytes::Bytes;
use prost::Message;
use std::cell::{Cell, Ref, RefCell};
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Maps and sets keyed by peer name. The default SipHash dominated route computation
/// at 1000 peers; a name is 64 bits, so one round of a strong mixer is a good hash.
pub(super) type NameMap<V> = HashMap<PeerName, V, BuildHasherDefault<NameHasher>>;
pub(super) type NameSet = HashSet<PeerName, BuildHasherDefault<NameHasher>>;

#[derive(Default)]
pub(super) struct NameHasher(u64);

impl Hasher for NameHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = mix(self.0 ^ n);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

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
    /// The peer's established connections, sorted by peer name. A connection's address
    /// is not gossiped: it is the other peer's own `address`.
    pub connections: Vec<EntryConnection>,
    pub meta: Vec<u8>,
    /// The entry as a `MeshPeerEntry`, encoded once per version (an entry is sent to
    /// several neighbours, and a frame of entries is these bytes concatenated).
    encoded: Bytes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryConnection {
    pub peer: PeerName,
    pub outbound: bool,
}

impl Entry {
    pub fn new(name: PeerName, nickname: String, uid: u64, address: String) -> Entry {
        let mut e = Entry {
            name,
            nickname,
            uid,
            version: 1,
            address,
            connections: Vec::new(),
            meta: Vec::new(),
            encoded: Bytes::new(),
        };
        e.seal();
        e
    }

    fn lists(&self, peer: PeerName) -> bool {
        self.connections
            .binary_search_by_key(&peer, |c| c.peer)
            .is_ok()
    }

    /// Recomputes the encoding after a change of the fields.
    fn seal(&mut self) {
        self.encoded = Bytes::from(self.to_pb().encode_to_vec());
    }

    /// The `MeshPeerEntry` encoding of this entry.
    pub fn encoded(&self) -> &Bytes {
        &self.encoded
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
                    address: String::new(),
                    outbound: c.outbound,
                })
                .collect(),
            meta: self.meta.clone(),
        }
    }

    /// Decodes an entry a neighbour sent, keeping its bytes as its encoding. Connection
    /// addresses, if a sender includes them, are dropped: every peer's address comes
    /// from its own entry.
    pub fn decode(bytes: Bytes) -> Result<Entry, prost::DecodeError> {
        let pb = MeshPeerEntry::decode(bytes.clone())?;
        let mut connections: Vec<EntryConnection> = pb
            .connections
            .into_iter()
            .map(|c| EntryConnection {
                peer: c.peer,
                outbound: c.outbound,
            })
            .collect();
        connections.sort_by_key(|c| c.peer);
        connections.dedup_by_key(|c| c.peer);
        Ok(Entry {
            name: pb.name,
            nickname: pb.nickname,
            uid: pb.uid,
            version: pb.version,
            address: pb.address,
            connections,
            meta: pb.meta,
            encoded: bytes,
        })
    }
}

/// A topology entry as it arrived: the fields that order it, and its bytes (decoded
/// only if it is news).
#[derive(Debug, Clone)]
pub struct Received {
    pub name: PeerName,
    pub uid: u64,
    pub version: u64,
    pub bytes: Bytes,
    /// The entry already decoded from these bytes, if the caller has it (the mesh
    /// simulator hands every receiver the sender's copy, so that thousands of peers
    /// share one decoded entry each).
    pub decoded: Option<Arc<Entry>>,
}

impl Received {
    pub fn parse(bytes: Bytes) -> Result<Received, super::WireError> {
        let h = super::wire::decode_entry_header(&bytes)?;
        Ok(Received {
            name: h.name,
            uid: h.uid,
            version: h.version,
            bytes,
            decoded: None,
        })
    }

    /// An entry as received, decoded already: the fields are the entry's own.
    pub fn decoded(e: Arc<Entry>) -> Received {
        Received {
            name: e.name,
            uid: e.uid,
            version: e.version,
            bytes: e.encoded.clone(),
            decoded: Some(e),
        }
    }
}

/// An entry as held: shared (entries are immutable once sealed), with the point in
/// this topology's history at which it last changed.
#[derive(Debug, Clone)]
struct Slot {
    entry: Arc<Entry>,
    /// The topology's change counter when this entry last changed and was queued for
    /// every neighbour ([`Topology::seq`]); 0 for an entry held back from forwarding.
    changed: u64,
}

/// Most peers a topology holds: an entry for a new name beyond it is refused.
pub const MAX_PEERS: usize = 16_384;
/// Largest encoded entry accepted (name, address, connections, metadata).
pub const MAX_ENTRY_BYTES: usize = 64 * 1024;
/// Most connections one entry may list.
pub const MAX_ENTRY_CONNECTIONS: usize = 1024;

/// Everything a peer knows about the mesh, and the routes computed from it.
pub struct Topology {
    own: PeerName,
    entries: NameMap<Slot>,
    /// Counts changes that are forwarded (published or merged entries); see
    /// [`Slot::changed`].
    seq: u64,
    /// The clock the lazy route rebuilds are timed by.
    clock: crate::Clock,
    /// Routes computed on first use after a change (a burst of merges costs one BFS).
    routes: RefCell<Option<Routes>>,
    /// The routes no longer match the entries (kept for [`Topology::routes_lazy`]).
    routes_stale: Cell<bool>,
    /// When the routes were last computed, and how long that took.
    routes_at: Cell<(Instant, Duration)>,
    /// Our own entry changed since it was last published (its version and encoding
    /// are those of the last publication; see [`Topology::publish_own`]).
    own_dirty: bool,
    lazy_min: Duration,
    /// [`Topology::summary`], computed on first use after a change.
    summary: Cell<Option<u64>>,
    /// Consecutive GC ticks a peer has been unreachable.
    unreachable_ticks: NameMap<u32>,
    /// Received entries refused for breaking a cap ([`MAX_PEERS`], [`MAX_ENTRY_BYTES`],
    /// [`MAX_ENTRY_CONNECTIONS`]).
    pub refused: u64,
    /// (version, uid) of collected peers. A copy of such an entry still circulating
    /// (a zombie) is not forwarded until it is reachable; otherwise peers that
    /// collected it late would keep handing it back to those that collected it.
    collected: NameMap<(u64, u64)>,
    /// Collected entries received again but not reachable yet: kept, not forwarded.
    held: NameSet,
}

/// What the entries imply; rebuilt from scratch after any change. Edges are the
/// symmetric ones (both ends list each other), read from the entries themselves.
#[derive(Debug)]
struct Routes {
    /// dst → (next hop, hop count) for every reachable peer but ourselves.
    next_hops: NameMap<(PeerName, u32)>,
    /// src → our children in the broadcast tree rooted at src; filled lazily.
    broadcast_children: RefCell<NameMap<Vec<PeerName>>>,
}

impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topology")
            .field("own", &self.own)
            .field("entries", &self.entries.len())
            .field("seq", &self.seq)
            .field("refused", &self.refused)
            .finish_non_exhaustive()
    }
}

impl Topology {
    /// `lazy_min`: the least time between two rebuilds of routes for forwarding and
    /// gossip, on `clock` (see [`Topology::routes_lazy`]).
    pub fn new(own: Entry, lazy_min: Duration, clock: crate::Clock) -> Self {
        let name = own.name;
        let now = clock();
        Topology {
            own: name,
            entries: NameMap::from_iter([(
                name,
                Slot {
                    entry: Arc::new(own),
                    changed: 1,
                },
            )]),
            seq: 1,
            clock,
            routes: RefCell::new(None),
            routes_stale: Cell::new(false),
            routes_at: Cell::new((now, Duration::ZERO)),
            own_dirty: false,
            lazy_min,
            summary: Cell::new(None),
            unreachable_ticks: NameMap::default(),
            refused: 0,
            collected: NameMap::default(),
            held: NameSet::default(),
        }
    }

    #[cfg(test)]
    pub(super) fn new_for_test(own: Entry) -> Self {
        Topology::new(own, Duration::ZERO, crate::system_clock())
    }

    #[cfg(test)]
    pub fn own(&self) -> &Entry {
        &self.entries[&self.own].entry
    }

    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values().map(|s| &*s.entry)
    }

    pub fn get(&self, name: PeerName) -> Option<&Entry> {
        self.entries.get(&name).map(|s| &*s.entry)
    }

    /// The entry held for `name`, shared.
    pub fn get_shared(&self, name: PeerName) -> Option<Arc<Entry>> {
        self.entries.get(&name).map(|s| s.entry.clone())
    }

    /// The change counter: raised by every change that is forwarded to neighbours.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The entry for `name` and the change counter when it last changed here.
    pub(super) fn get_with_change(&self, name: PeerName) -> Option<(&Entry, u64)> {
        self.entries.get(&name).map(|s| (&*s.entry, s.changed))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// (name, uid, version) of every entry, for anti-entropy.
    pub fn digest(&self) -> Vec<MeshDigestItem> {
        self.entries()
            .map(|e| MeshDigestItem {
                name: e.name,
                uid: e.uid,
                version: e.version,
            })
            .collect()
    }

    /// An order-independent hash of every (name, uid, version) held: two peers holding
    /// the same entries have the same summary, so a converged pair exchanges 8 bytes per
    /// anti-entropy round instead of a digest that grows with the mesh.
    pub fn summary(&self) -> u64 {
        if let Some(s) = self.summary.get() {
            return s;
        }
        let s = self.entries().fold(0u64, |acc, e| {
            acc.wrapping_add(mix(mix(mix(e.name) ^ e.uid) ^ e.version))
        });
        self.summary.set(Some(s));
        s
    }

    /// Compares a neighbour's digest with ours: the names whose entry we should send it
    /// (ours is newer or it lacks it; never an unreachable one, which is garbage here),
    /// and whether it holds something newer than we do.
    pub fn diff(&self, digest: &[MeshDigestItem]) -> (Vec<PeerName>, bool) {
        let theirs: NameMap<(u64, u64)> = digest
            .iter()
            .map(|d| (d.name, (d.version, d.uid)))
            .collect();
        let routes = self.routes_lazy();
        let send: Vec<PeerName> = self
            .entries()
            .filter(|e| theirs.get(&e.name).is_none_or(|&t| (e.version, e.uid) > t))
            .filter(|e| e.name == self.own || routes.next_hops.contains_key(&e.name))
            .map(|e| e.name)
            .collect();
        drop(routes);
        let they_have_news = digest.iter().any(|d| match self.get(d.name) {
            Some(e) => (d.version, d.uid) > (e.version, e.uid),
            None => self.collected.get(&d.name) != Some(&(d.version, d.uid)),
        });
        (send, they_have_news)
    }

    /// Changes our own entry. Routes here follow at once; other peers see the change
    /// once it is published ([`Topology::publish_own`]), so a burst of changes (a peer
    /// connecting to several others) travels as one version.
    pub fn update_own(&mut self, f: impl FnOnce(&mut Entry)) {
        let own = Arc::make_mut(&mut self.entries.get_mut(&self.own).expect("own entry").entry);
        f(own);
        own.connections.sort_by_key(|c| c.peer);
        self.own_dirty = true;
        self.recompute();
    }

    /// Gives our changed entry a new version; false when there is nothing to publish.
    pub fn publish_own(&mut self) -> bool {
        if !self.own_dirty {
            return false;
        }
        self.seq += 1;
        let slot = self.entries.get_mut(&self.own).expect("own entry");
        slot.changed = self.seq;
        let own = Arc::make_mut(&mut slot.entry);
        own.version += 1;
        own.seal();
        self.own_dirty = false;
        self.summary.set(None);
        true
    }

    /// Merges received entries. Returns the names whose entry changed here (to be
    /// forwarded to other neighbours); our own name is in it when a stale entry of ours
    /// (for example from before a restart) forced a version bump. A collected entry
    /// coming back is kept but held back from forwarding until it is reachable.
    /// Counts a refused entry; logs the first and then every power of two.
    fn refuse(&mut self, name: PeerName, why: &str) {
        self.refused += 1;
        if self.refused.is_power_of_two() {
            tracing::warn!(
                peer = %super::peer_name_string(name),
                refused = self.refused,
                "mesh: topology entry refused: {why}"
            );
        }
    }

    pub fn merge(&mut self, received: Vec<Received>) -> Vec<PeerName> {
        let mut changed = Vec::new();
        let mut inserted = false;
        // Every change of this merge counts as one step of the change counter.
        let seq = self.seq + 1;
        for r in received {
            if r.name == self.own {
                // A copy of ours we did not publish (from an earlier incarnation, or a
                // forgery): outdate it at once.
                let slot = self.entries.get_mut(&self.own).expect("own entry");
                if r.bytes != slot.entry.encoded && r.version >= slot.entry.version {
                    slot.changed = seq;
                    let own = Arc::make_mut(&mut slot.entry);
                    own.version = r.version + 1;
                    own.seal();
                    self.own_dirty = false;
                    self.summary.set(None);
                    changed.push(self.own);
                }
                continue;
            }
            // The CRDT order: higher version wins, and on a tie the higher uid (so two
            // incarnations of one name settle the same way everywhere).
            if let Some(cur) = self.get(r.name) {
                if (r.version, r.uid) <= (cur.version, cur.uid) {
                    continue;
                }
            }
            let new_name = !self.entries.contains_key(&r.name);
            if r.bytes.len() > MAX_ENTRY_BYTES || (new_name && self.entries.len() >= MAX_PEERS) {
                self.refuse(r.name, "over the size or peer-count cap");
                continue;
            }
            let e = match r.decoded {
                Some(e) => e,
                None => match Entry::decode(r.bytes) {
                    Ok(e) => Arc::new(e),
                    Err(err) => {
                        tracing::debug!("mesh: undecodable topology entry dropped: {err}");
                        continue;
                    }
                },
            };
            if e.connections.len() > MAX_ENTRY_CONNECTIONS {
                self.refuse(e.name, "too many connections");
                continue;
            }
            let held = self.collected.get(&e.name) == Some(&(e.version, e.uid));
            if held {
                self.held.insert(e.name);
            } else {
                self.held.remove(&e.name);
                changed.push(e.name);
            }
            let slot = Slot {
                changed: if held { 0 } else { seq },
                entry: e,
            };
            self.entries.insert(slot.entry.name, slot);
            inserted = true;
        }
        if inserted {
            self.recompute();
        }
        let released: Vec<PeerName> = self
            .held
            .iter()
            .copied()
            .filter(|&n| self.is_reachable(n))
            .collect();
        for n in released {
            self.held.remove(&n);
            if let Some(slot) = self.entries.get_mut(&n) {
                slot.changed = seq;
            }
            changed.push(n);
        }
        for n in &changed {
            self.collected.remove(n);
        }
        if !changed.is_empty() {
            self.seq = seq;
        }
        changed
    }

    /// Marks the routes stale and drops the summary; the next query rebuilds them.
    fn recompute(&mut self) {
        self.routes_stale.set(true);
        self.summary.set(None);
    }

    /// The routes, rebuilt if stale: BFS from us over symmetric edges, neighbours in
    /// name order so every peer breaks ties the same way.
    fn routes(&self) -> Ref<'_, Routes> {
        if self.routes_stale.get() || self.routes.borrow().is_none() {
            self.rebuild_routes();
        }
        Ref::map(self.routes.borrow(), |r| r.as_ref().expect("just computed"))
    }

    /// The routes, possibly a little stale: rebuilt only once the last rebuild is
    /// `lazy_min` and 20 times its own cost ago. Computing routes costs O(peers), and in
    /// a large mesh converging nearly every frame changes something; forwarding, GC and
    /// gossip thus spend a bounded share of their time on routes, while reports
    /// ([`Topology::routes`]) still rebuild at once.
    fn routes_lazy(&self) -> Ref<'_, Routes> {
        let (at, cost) = self.routes_at.get();
        let since = (self.clock)().saturating_duration_since(at);
        if self.routes.borrow().is_none()
            || (self.routes_stale.get() && since >= (cost * 20).max(self.lazy_min))
        {
            self.rebuild_routes();
        }
        Ref::map(self.routes.borrow(), |r| r.as_ref().expect("just computed"))
    }

    fn rebuild_routes(&self) {
        let started = (self.clock)();
        let routes = self.compute_routes();
        *self.routes.borrow_mut() = Some(routes);
        self.routes_stale.set(false);
        let cost = (self.clock)().saturating_duration_since(started);
        self.routes_at.set((started, cost));
    }

    /// The peers `name` has a symmetric edge with (both list the other), in name
    /// order (connections are sorted).
    fn neighbours(&self, name: PeerName) -> impl Iterator<Item = PeerName> + '_ {
        self.get(name).into_iter().flat_map(move |e| {
            e.connections
                .iter()
                .filter(move |c| self.get(c.peer).is_some_and(|o| o.lists(name)))
                .map(|c| c.peer)
        })
    }

    /// BFS over the symmetric edges from `root`: node → (label, hops), where a node's
    /// label is `label(parent, parent's label, node)` and the root's is itself. The
    /// table is sized once: routes are rebuilt often while a large mesh converges.
    fn bfs(
        &self,
        root: PeerName,
        label: impl Fn(PeerName, PeerName, PeerName) -> PeerName,
    ) -> NameMap<(PeerName, u32)> {
        let mut seen = NameMap::with_capacity_and_hasher(self.entries.len(), Default::default());
        seen.insert(root, (root, 0));
        let mut queue = VecDeque::from([root]);
        while let Some(n) = queue.pop_front() {
            let (l, hops) = seen[&n];
            for m in self.neighbours(n) {
                if let std::collections::hash_map::Entry::Vacant(v) = seen.entry(m) {
                    v.insert((label(n, l, m), hops + 1));
                    queue.push_back(m);
                }
            }
        }
        seen
    }

    /// BFS from us, labelling each destination with its first hop: its parent's, or
    /// itself next to us.
    fn compute_routes(&self) -> Routes {
        let own = self.own;
        let mut next_hops = self.bfs(
            own,
            |parent, first, node| {
                if parent == own {
                    node
                } else {
                    first
                }
            },
        );
        next_hops.remove(&own);
        Routes {
            next_hops,
            broadcast_children: RefCell::new(NameMap::default()),
        }
    }

    /// The next hop and hop count towards `dst`, from possibly slightly stale routes
    /// (see [`Topology::routes_lazy`]): for forwarding, not for reporting.
    pub fn route(&self, dst: PeerName) -> Option<(PeerName, u32)> {
        self.routes_lazy().next_hops.get(&dst).copied()
    }

    /// [`Topology::route`] from exact routes.
    pub fn route_exact(&self, dst: PeerName) -> Option<(PeerName, u32)> {
        self.routes().next_hops.get(&dst).copied()
    }

    pub fn is_reachable(&self, name: PeerName) -> bool {
        name == self.own || self.routes().next_hops.contains_key(&name)
    }

    /// How many peers are reachable (ourselves included), from possibly stale routes.
    pub fn reachable_count(&self) -> usize {
        self.routes_lazy().next_hops.len() + 1
    }

    /// Our children in the spanning tree rooted at `src` (BFS from src, ties broken by
    /// name): the neighbours a broadcast from `src` must be relayed to.
    pub fn broadcast_children(&self, src: PeerName) -> Vec<PeerName> {
        let routes = self.routes_lazy();
        if let Some(c) = routes.broadcast_children.borrow().get(&src) {
            return c.clone();
        }
        let parents = self.bfs(src, |parent, _, _| parent);
        let own = self.own;
        let children: Vec<PeerName> = self
            .neighbours(own)
            .filter(|c| parents.get(c).map(|&(p, _)| p) == Some(own))
            .collect();
        routes
            .broadcast_children
            .borrow_mut()
            .insert(src, children.clone());
        children
    }

    /// One GC tick: drops peers that were unreachable at this tick and the previous one
    /// (a grace of one tick lets an entry wait for its neighbour's entry that makes its
    /// edge symmetric). Returns the dropped names.
    pub fn gc_tick(&mut self) -> Vec<PeerName> {
        // Possibly stale routes: they lag by far less than the grace of a tick.
        let routes = self.routes_lazy();
        let unreachable: Vec<PeerName> = self
            .entries
            .keys()
            .copied()
            .filter(|&n| n != self.own && !routes.next_hops.contains_key(&n))
            .collect();
        drop(routes);
        self.unreachable_ticks
            .retain(|n, _| unreachable.contains(n));
        let mut removed = Vec::new();
        for n in unreachable {
            let ticks = self.unreachable_ticks.entry(n).or_insert(0);
            *ticks += 1;
            if *ticks >= 2 {
                self.held.remove(&n);
                if let Some(slot) = self.entries.remove(&n) {
                    self.collected
                        .insert(n, (slot.entry.version, slot.entry.uid));
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

/// SplitMix64's finalizer: a fixed (process-independent) 64-bit mixing function.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(entries: Vec<Entry>) -> Vec<Received> {
        entries
            .into_iter()
            .map(|e| Received::parse(e.encoded.clone()).unwrap())
            .collect()
    }

    fn entry(name: PeerName, version: u64, conns: &[PeerName]) -> Entry {
        let mut e = Entry::new(name, format!("p{name}"), name * 10, String::new());
        e.version = version;
        e.connections = conns
            .iter()
            .map(|&p| EntryConnection {
                peer: p,
                outbound: false,
            })
            .collect();
        e.seal();
        e
    }

    #[test]
    fn only_symmetric_edges_route() {
        let mut t = Topology::new_for_test(entry(1, 1, &[2]));
        t.merge(raw(vec![entry(2, 1, &[1, 3]), entry(3, 1, &[])]));
        assert_eq!(t.route_exact(2), Some((2, 1)));
        assert_eq!(t.route_exact(3), None, "3 does not list 2");
        t.merge(raw(vec![entry(3, 2, &[2])]));
        assert_eq!(t.route_exact(3), Some((2, 2)));
        assert_eq!(t.broadcast_children(1), vec![2]);
        assert_eq!(t.broadcast_children(3), Vec::<PeerName>::new());
    }

    #[test]
    fn merge_keeps_higher_version_and_bumps_own_on_stale_self() {
        let mut t = Topology::new_for_test(entry(1, 1, &[]));
        assert_eq!(t.merge(raw(vec![entry(2, 5, &[])])), vec![2]);
        assert!(t.merge(raw(vec![entry(2, 4, &[1])])).is_empty());
        assert_eq!(t.get(2).unwrap().version, 5);
        let mut old_self = entry(1, 9, &[]);
        old_self.uid = 99;
        assert_eq!(t.merge(raw(vec![old_self])), vec![1]);
        assert_eq!(t.own().version, 10);
    }

    #[test]
    fn summary_depends_on_the_entries_held_not_their_order() {
        let mut a = Topology::new_for_test(entry(1, 1, &[2]));
        let mut b = Topology::new_for_test(entry(2, 1, &[1]));
        assert_ne!(a.summary(), b.summary());
        a.merge(raw(vec![entry(2, 1, &[1]), entry(3, 4, &[])]));
        b.merge(raw(vec![entry(3, 4, &[]), entry(1, 1, &[2])]));
        assert_eq!(a.summary(), b.summary());
        b.merge(raw(vec![entry(3, 5, &[])]));
        assert_ne!(a.summary(), b.summary());
        a.merge(raw(vec![entry(3, 5, &[])]));
        assert_eq!(a.summary(), b.summary());
        // Our own stale entry coming back bumps our version: the summary follows.
        let before = a.summary();
        let mut stale = entry(1, 7, &[]);
        stale.uid = 5;
        stale.seal();
        a.merge(raw(vec![stale]));
        assert_ne!(a.summary(), before);
    }

    #[test]
    fn unreachable_peers_are_collected_after_grace() {
        let mut t = Topology::new_for_test(entry(1, 1, &[]));
        t.merge(raw(vec![entry(2, 1, &[])]));
        assert!(t.gc_tick().is_empty());
        assert_eq!(t.gc_tick(), vec![2]);
        assert!(t.get(2).is_none());
        // The same entry handed back while unreachable is kept but not forwarded...
        assert!(t.merge(raw(vec![entry(2, 1, &[3])])).is_empty());
        assert!(t.get(2).is_some() && !t.is_reachable(2));
        // ...until the entry that makes it reachable arrives.
        t.update_own(|e| {
            e.connections.push(EntryConnection {
                peer: 3,
                outbound: true,
            })
        });
        let mut changed = t.merge(raw(vec![entry(3, 1, &[1, 2])]));
        changed.sort();
        assert_eq!(changed, vec![2, 3]);
        assert!(t.is_reachable(2));
    }
}
