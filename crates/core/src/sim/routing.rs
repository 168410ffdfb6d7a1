//! The mesh inside a cluster run. Each running member holds meshd's topology CRDT
//! and its routes (`mesh::topology::Topology`), with an entry listing the members
//! it has a working connection to (one that carries frames both ways). Entries
//! spread one hop per millisecond over working connections, merged by the mesh's
//! own rules, so a restarted member is a new incarnation that outdates its old
//! entry as it does in meshd. A Raft message whose direct link is cut travels hop
//! by hop along each relay's own routes, as the mesh forwards it.

use std::collections::BTreeSet;
use std::time::Duration;

use super::mesh::{name, publish_connections};
use super::World;
use crate::mesh::topology::{Entry, Received, Topology};

/// Most hops a forwarded message takes (the members of a run, at most seven).
const MAX_HOPS: usize = 8;

/// The cut links and which members' mesh processes run.
type NetState = (BTreeSet<(usize, usize)>, Vec<bool>);

/// Every member's view of the mesh.
#[derive(Default)]
pub(super) struct MeshRoutes {
    /// Each member's topology while it runs.
    topologies: Vec<Option<Topology>>,
    /// The connections each running member's entry lists.
    links: Vec<BTreeSet<usize>>,
    /// The cut links and running members the last step saw, and whether every
    /// topology was settled then (nothing to publish or carry): a step that finds
    /// both the same has nothing to do.
    seen: Option<NetState>,
    settled: bool,
}

impl MeshRoutes {
    /// Member `i`'s topology, while it runs.
    pub(super) fn topology(&self, i: usize) -> Option<&Topology> {
        self.topologies.get(i)?.as_ref()
    }

    /// Whether member `i`'s mesh process runs (it relays for others).
    pub(super) fn running(&self, i: usize) -> bool {
        self.topology(i).is_some()
    }
}

impl World {
    /// Member `i` started: a new mesh incarnation (a fresh uid), connected to no one
    /// until the next mesh step.
    pub(super) fn mesh_start(&mut self, i: usize) {
        let uid = self.rng.next_u64();
        let mut own = Entry::new(
            name(i),
            format!("m{}", i + 1),
            uid,
            format!("sim:{}", i + 1),
        );
        own.meta = prost::Message::encode_to_vec(&self.node_meta(i));
        // Routes rebuilt at most every 100 ms, as meshd's default gossip interval sets.
        let mut t = Topology::new(own, Duration::from_millis(100), self.clock_for(0));
        t.update_own(|_| {});
        t.publish_own();
        let r = &mut self.routes;
        if r.topologies.len() <= i {
            r.topologies.resize_with(i + 1, || None);
            r.links.resize_with(i + 1, BTreeSet::new);
        }
        r.topologies[i] = Some(t);
        r.links[i].clear();
    }

    /// Member `i` stopped: its connections go with it.
    pub(super) fn mesh_stop(&mut self, i: usize) {
        if let Some(t) = self.routes.topologies.get_mut(i) {
            *t = None;
        }
    }

    fn connected(&self, i: usize, j: usize) -> bool {
        i != j
            && self.routes.topologies.get(j).is_some_and(|t| t.is_some())
            && !self.cut.contains(&(i, j))
            && !self.cut.contains(&(j, i))
    }

    /// One millisecond of the mesh: members whose connections changed publish their
    /// entry again; every working connection carries the entries its far end lacks;
    /// once a second, unreachable entries are collected.
    pub(super) fn mesh_step(&mut self) {
        let n = self.routes.topologies.len();
        if self.now.is_multiple_of(1_000) {
            for t in self.routes.topologies.iter_mut().flatten() {
                t.gc_tick();
            }
            self.routes.settled = false;
        }
        let running: Vec<bool> = self.routes.topologies.iter().map(|t| t.is_some()).collect();
        let seen = Some((self.cut.clone(), running));
        if self.routes.settled && self.routes.seen == seen {
            return;
        }
        self.routes.seen = seen;
        for i in 0..n {
            if self.routes.topologies[i].is_none() {
                continue;
            }
            let links: BTreeSet<usize> = (0..n).filter(|&j| self.connected(i, j)).collect();
            if links == self.routes.links[i] {
                continue;
            }
            let t = self.routes.topologies[i].as_mut().expect("running");
            publish_connections(t, i, links.iter().copied());
            self.routes.links[i] = links;
        }
        // What each connection carries this step, from the state before it.
        let mut deliveries: Vec<(usize, Vec<Received>)> = Vec::new();
        for i in 0..n {
            let Some(ti) = self.routes.topologies[i].as_ref() else {
                continue;
            };
            for &j in &self.routes.links[i] {
                let Some(tj) = self.routes.topologies[j].as_ref() else {
                    continue;
                };
                if ti.summary() == tj.summary() {
                    continue;
                }
                let news: Vec<Received> = ti
                    .entries()
                    .filter(|e| {
                        tj.get(e.name)
                            .is_none_or(|o| (e.version, e.uid) > (o.version, o.uid))
                    })
                    .filter_map(|e| ti.get_shared(e.name))
                    .map(Received::decoded)
                    .collect();
                if !news.is_empty() {
                    deliveries.push((j, news));
                }
            }
        }
        self.routes.settled = deliveries.is_empty();
        for (j, news) in deliveries {
            if let Some(t) = self.routes.topologies[j].as_mut() {
                t.merge(news);
                // A stale entry of its own forced a new version: published at once.
                t.publish_own();
            }
        }
    }

    /// The relays a message from `from` to `to` takes: none over a working direct
    /// link, else the hops each relay's routes (possibly a little stale, as in
    /// meshd) choose; None if there is no route or it loops.
    pub(super) fn mesh_route(&self, from: usize, to: usize) -> Option<Vec<usize>> {
        if !self.cut.contains(&(from, to)) {
            return Some(Vec::new());
        }
        let mut relays = Vec::new();
        let mut at = from;
        for _ in 0..MAX_HOPS {
            let t = self.routes.topologies.get(at)?.as_ref()?;
            let (next, _) = t.route(name(to))?;
            let next = (next as usize).checked_sub(1)?;
            if next == to {
                return Some(relays);
            }
            if next == from || relays.contains(&next) {
                return None;
            }
            relays.push(next);
            at = next;
        }
        None
    }
}
