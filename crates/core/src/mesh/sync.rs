//! Topology sync with one neighbour (sans-IO, beside the CRDT in `topology.rs`): what
//! the neighbour is known to hold, what it is owed, and the answer each summary or
//! digest it sends calls for.
//!
//! Deltas flood on every change: an entry that changes is queued for every neighbour
//! and sent, coalesced, at the writer's next turn, unless the neighbour is known to
//! hold that version (it sent it, we sent it, or its digest listed it). Anti-entropy
//! repairs what flooding missed: a summary (one hash of every (name, version, uid))
//! goes to a random neighbour each round; a neighbour whose summary differs gets our
//! full digest, and the side that finds the other has news replies with its own, once.
//!
//! What the neighbour holds is kept compactly, as it must be for thousands of peers:
//! a window of the topology's change counter in which it holds our version of every
//! entry that changed (everything we flooded to it, or it sent us, since it last
//! matched us), plus the exceptions it is known to hold at other versions.

use std::collections::{HashMap, HashSet};

use super::topology::{Received, Topology};
use super::PeerName;
use crate::proto::meshpb::MeshDigestItem;

/// An entry's identity for sync: its (version, uid), ordered as the CRDT orders them.
type Stamp = (u64, u64);

/// The sync state of one connection.
#[derive(Debug)]
pub(crate) struct NeighbourSync {
    /// Entries to send at the writer's next turn.
    pending: HashSet<PeerName>,
    /// The neighbour holds our version (or a newer one) of every entry whose last
    /// change here ([`Topology::seq`]) is in `covered.0 < changed <= covered.1`.
    covered: (u64, u64),
    /// Entries the neighbour is known to hold at these stamps or newer, whatever
    /// `covered` says.
    knows: HashMap<PeerName, Stamp>,
    /// Names added to `knows` since the writer's last turn, to be pruned then.
    learned: Vec<PeerName>,
}

/// What to send the neighbour after it sent a summary or a digest.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    /// Nothing beyond what is now queued.
    Nothing,
    /// Our full digest (its summary differs from ours).
    Digest,
    /// Our full digest marked as a reply (it has news for us; it will not answer it).
    DigestReply,
}

impl NeighbourSync {
    /// A new connection: nothing is known of what the neighbour holds.
    pub(crate) fn new(topology: &Topology) -> NeighbourSync {
        NeighbourSync {
            pending: HashSet::new(),
            covered: (topology.seq(), topology.seq()),
            knows: HashMap::new(),
            learned: Vec::new(),
        }
    }

    /// Whether the window covers a change made at `changed`.
    fn covers(&self, changed: u64) -> bool {
        self.covered.0 < changed && changed <= self.covered.1
    }

    /// The stamp the neighbour is known to hold `name` at (or newer), if any.
    fn holds(&self, topology: &Topology, name: PeerName) -> Option<Stamp> {
        if let Some(&k) = self.knows.get(&name) {
            return Some(k);
        }
        let (e, changed) = topology.get_with_change(name)?;
        self.covers(changed).then_some((e.version, e.uid))
    }

    /// Whether the window alone says the neighbour holds our version of `name`.
    fn in_window(&self, topology: &Topology, name: PeerName) -> bool {
        topology
            .get_with_change(name)
            .is_some_and(|(_, changed)| self.covers(changed))
    }

    /// What the neighbour held at a known moment: exactly what we hold (`theirs`
    /// None: its summary matched ours), or what its digest listed.
    fn reset(&mut self, topology: &Topology, theirs: Option<&[MeshDigestItem]>) {
        self.covered = (0, topology.seq());
        self.knows.clear();
        self.learned.clear();
        let Some(items) = theirs else {
            return;
        };
        // Only what differs from ours is kept, for entries we hold: a stamp of one we
        // lack would only spare us sending it back should it reach us by another
        // neighbour, and after a partition heals that is half the mesh per connection.
        let mut listed = HashSet::with_capacity(items.len());
        for i in items {
            listed.insert(i.name);
            let stamp = (i.version, i.uid);
            if topology
                .get(i.name)
                .is_some_and(|e| (e.version, e.uid) != stamp)
            {
                self.knows.insert(i.name, stamp);
            }
        }
        for e in topology.entries() {
            if !listed.contains(&e.name) {
                self.knows.insert(e.name, (0, 0));
            }
        }
    }

    /// The neighbour sent us these entries (before they are merged into
    /// `topology`): it holds them. Only what the window will not say is kept: an
    /// entry queued for it (not to be echoed), or one older than ours.
    pub(crate) fn received(&mut self, topology: &Topology, entries: &[Received]) {
        for e in entries {
            let stamp = (e.version, e.uid);
            if self.pending.contains(&e.name)
                || topology
                    .get(e.name)
                    .is_some_and(|o| (o.version, o.uid) > stamp)
            {
                self.learn(e.name, stamp);
            }
        }
    }

    /// Queues entries to send. True if any are queued (the writer must be woken).
    pub(crate) fn queue(&mut self, names: impl IntoIterator<Item = PeerName>) -> bool {
        self.pending.extend(names);
        !self.pending.is_empty()
    }

    /// Entries `changed` by merging what neighbour `sender` sent are owed to this
    /// neighbour: all of them unless it is the sender, which holds them already, and
    /// for the sender only our own entry if the merge outdated a stale copy of it.
    /// True if any are queued (the writer must be woken).
    pub(crate) fn queue_merged(
        &mut self,
        changed: &[PeerName],
        is_sender: bool,
        own: PeerName,
    ) -> bool {
        if !is_sender {
            return self.queue(changed.iter().copied());
        }
        changed.contains(&own) && self.queue([own])
    }

    /// The neighbour's summary arrived. The same as ours: it holds exactly what we
    /// hold. Different: it gets our full digest.
    pub(crate) fn on_summary(&mut self, topology: &Topology, summary: u64) -> Answer {
        if summary != topology.summary() {
            return Answer::Digest;
        }
        self.reset(topology, None);
        Answer::Nothing
    }

    /// The neighbour's full digest arrived (`is_reply`: the answer to ours). It holds
    /// exactly what it lists; what it lacks is queued; if it has news for us and this
    /// is not already a reply, it gets our digest as one.
    pub(crate) fn on_digest(
        &mut self,
        topology: &Topology,
        items: &[MeshDigestItem],
        is_reply: bool,
    ) -> (bool, Answer) {
        self.reset(topology, Some(items));
        let (send, they_have_news) = topology.diff(items);
        let wake = !send.is_empty() && self.queue(send);
        let answer = if they_have_news && !is_reply {
            Answer::DigestReply
        } else {
            Answer::Nothing
        };
        (wake, answer)
    }

    /// The writer's turn: the queued entries the neighbour does not hold yet, now
    /// counted as held (they are about to be sent).
    ///
    /// Every change since the last turn was queued here, or came from this neighbour,
    /// so once the queue is sent the neighbour holds our version of everything that
    /// changed up to now: the window extends to the present, and what it now covers
    /// is dropped from the known stamps.
    pub(crate) fn take_due(&mut self, topology: &Topology) -> Vec<PeerName> {
        let mut due = Vec::new();
        let pending = std::mem::take(&mut self.pending);
        for &n in &pending {
            let Some(e) = topology.get(n) else {
                continue;
            };
            let stamp = (e.version, e.uid);
            if self.holds(topology, n).is_none_or(|k| stamp > k) {
                due.push(n);
            }
        }
        due.sort_unstable();
        self.covered.1 = topology.seq();
        for n in pending.into_iter().chain(std::mem::take(&mut self.learned)) {
            let Some(e) = topology.get(n) else {
                self.knows.remove(&n);
                continue;
            };
            let stamp = (e.version, e.uid);
            let known = if due.binary_search(&n).is_ok() {
                Some(stamp)
            } else {
                self.knows.get(&n).copied()
            };
            match known {
                Some(k) if k >= stamp && self.in_window(topology, n) => {
                    self.knows.remove(&n);
                }
                Some(k) => {
                    self.knows.insert(n, k);
                }
                None => {}
            }
        }
        // A burst of entries leaves a large table behind: give the memory back once
        // the window has absorbed most of it.
        if self.knows.len() * 4 < self.knows.capacity() {
            self.knows.shrink_to_fit();
        }
        due
    }

    fn learn(&mut self, name: PeerName, stamp: Stamp) {
        let k = self.knows.entry(name).or_insert(stamp);
        *k = (*k).max(stamp);
        self.learned.push(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::topology::{Entry, EntryConnection};

    /// Peer `name`'s entry at `version`, listing a connection to every other peer
    /// of these tests (1, 2, 3), so that all are reachable.
    fn entry(name: PeerName, version: u64) -> Entry {
        let mut e = Entry::new(name, format!("p{name}"), name * 10, String::new());
        e.connections = [1, 2, 3]
            .into_iter()
            .filter(|p| *p != name)
            .map(|peer| EntryConnection {
                peer,
                outbound: false,
            })
            .collect();
        let mut t = Topology::new_for_test(e);
        t.update_own(|_| {});
        t.publish_own();
        let mut e = t.own().clone();
        while e.version < version {
            e = bump(e);
        }
        assert_eq!(e.version, version.max(2));
        e
    }

    /// The same entry one version later (as its peer publishes it).
    fn bump(e: Entry) -> Entry {
        let mut t = Topology::new_for_test(e);
        t.update_own(|e| e.meta.push(1));
        t.publish_own();
        t.own().clone()
    }

    fn received(e: &Entry) -> Received {
        Received::parse(e.encoded().clone()).unwrap()
    }

    fn topology_with(own: PeerName, others: &[Entry]) -> Topology {
        let mut t = Topology::new_for_test(entry(own, 2));
        t.merge(others.iter().map(received).collect());
        t
    }

    #[test]
    fn what_the_neighbour_sent_is_not_sent_back() {
        let two = entry(2, 2);
        let mut t = topology_with(1, std::slice::from_ref(&two));
        let mut s = NeighbourSync::new(&t);
        s.queue([2]);
        s.received(&t, &[received(&two)]);
        assert!(s.queue([1, 2]));
        assert_eq!(s.take_due(&t), vec![1], "it holds 2 already");
        assert!(s.take_due(&t).is_empty(), "nothing twice");
        // A newer version of 2 is owed again.
        let changed = t.merge(vec![received(&bump(two))]);
        assert_eq!(changed, vec![2]);
        s.queue(changed);
        assert_eq!(s.take_due(&t), vec![2]);
    }

    #[test]
    fn what_a_merge_changed_is_owed_to_every_neighbour_but_its_sender() {
        let t = topology_with(1, &[]);
        let mut sender = NeighbourSync::new(&t);
        let mut other = NeighbourSync::new(&t);
        assert!(!sender.queue_merged(&[2, 3], true, 1));
        assert!(sender.pending.is_empty());
        assert!(other.queue_merged(&[2, 3], false, 1));
        assert_eq!(other.pending, HashSet::from([2, 3]));
        // The merge outdated a stale copy of our own entry: the sender needs ours.
        assert!(sender.queue_merged(&[1, 2], true, 1));
        assert_eq!(sender.pending, HashSet::from([1]));
    }

    #[test]
    fn an_equal_summary_means_it_holds_everything() {
        let t = topology_with(1, &[entry(2, 3), entry(3, 2)]);
        let mut s = NeighbourSync::new(&t);
        assert_eq!(s.on_summary(&t, t.summary()), Answer::Nothing);
        s.queue([1, 2, 3]);
        assert!(s.take_due(&t).is_empty());
        assert_eq!(s.on_summary(&t, t.summary() ^ 1), Answer::Digest);
    }

    #[test]
    fn a_digest_queues_what_it_lacks_and_asks_back_once_for_what_it_has() {
        let ours = topology_with(1, &[entry(2, 3)]);
        // The neighbour has 3 (news for us) and an older 2 (news for it).
        let theirs = topology_with(3, &[entry(2, 2), entry(1, 2)]);
        let mut s = NeighbourSync::new(&ours);
        let (wake, answer) = s.on_digest(&ours, &theirs.digest(), false);
        assert!(wake);
        assert_eq!(answer, Answer::DigestReply);
        assert_eq!(s.take_due(&ours), vec![2]);
        // Its reply to our reply would loop: a reply is never answered.
        let (_, answer) = s.on_digest(&ours, &theirs.digest(), true);
        assert_eq!(answer, Answer::Nothing);
    }

    #[test]
    fn what_was_flooded_counts_as_held_and_a_new_connection_knows_nothing() {
        let mut t = topology_with(1, &[entry(2, 2)]);
        // A connection made now: its neighbour may hold nothing yet.
        let mut s = NeighbourSync::new(&t);
        s.queue([1, 2]);
        assert_eq!(s.take_due(&t), vec![1, 2]);
        // 3 arrives from another neighbour and is flooded to this one.
        let changed = t.merge(vec![received(&entry(3, 2))]);
        s.queue(changed);
        assert_eq!(s.take_due(&t), vec![3]);
        // Queued again, nothing is owed; 3 is covered by the window, not a stamp.
        s.queue([1, 2, 3]);
        assert!(s.take_due(&t).is_empty());
        assert!(!s.knows.contains_key(&3), "{:?}", s.knows);
        // A second connection made now knows nothing of its neighbour.
        let mut s2 = NeighbourSync::new(&t);
        s2.queue([2, 3]);
        assert_eq!(s2.take_due(&t), vec![2, 3]);
        // Its matching summary says it holds everything, in the window alone.
        assert_eq!(s2.on_summary(&t, t.summary()), Answer::Nothing);
        assert!(s2.knows.is_empty());
        s2.queue([1, 2, 3]);
        assert!(s2.take_due(&t).is_empty());
    }
}
