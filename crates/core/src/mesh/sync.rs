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

use std::collections::{HashMap, HashSet};

use super::topology::{Received, Topology};
use super::PeerName;
use crate::proto::meshpb::MeshDigestItem;

/// An entry's identity for sync: its (version, uid), ordered as the CRDT orders them.
type Stamp = (u64, u64);

/// The sync state of one connection.
#[derive(Debug, Default)]
pub(crate) struct NeighbourSync {
    /// Entries to send at the writer's next turn.
    pending: HashSet<PeerName>,
    /// Entries the neighbour is known to hold, at these stamps or newer.
    knows: HashMap<PeerName, Stamp>,
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
    /// The neighbour sent us these entries: it holds them.
    pub(crate) fn received(&mut self, entries: &[Received]) {
        for e in entries {
            self.learn(e.name, (e.version, e.uid));
        }
    }

    /// Queues entries to send. True if any are queued (the writer must be woken).
    pub(crate) fn queue(&mut self, names: impl IntoIterator<Item = PeerName>) -> bool {
        self.pending.extend(names);
        !self.pending.is_empty()
    }

    /// The neighbour's summary arrived. The same as ours: it holds exactly what we
    /// hold. Different: it gets our full digest.
    pub(crate) fn on_summary(&mut self, topology: &Topology, summary: u64) -> Answer {
        if summary != topology.summary() {
            return Answer::Digest;
        }
        self.knows = topology
            .entries()
            .map(|e| (e.name, (e.version, e.uid)))
            .collect();
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
        self.knows = items.iter().map(|i| (i.name, (i.version, i.uid))).collect();
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
    pub(crate) fn take_due(&mut self, topology: &Topology) -> Vec<PeerName> {
        let mut due = Vec::new();
        for n in std::mem::take(&mut self.pending) {
            let Some(e) = topology.get(n) else {
                continue;
            };
            let stamp = (e.version, e.uid);
            if self.knows.get(&n).is_none_or(|&k| stamp > k) {
                self.knows.insert(n, stamp);
                due.push(n);
            }
        }
        due.sort_unstable();
        due
    }

    fn learn(&mut self, name: PeerName, stamp: Stamp) {
        let k = self.knows.entry(name).or_insert(stamp);
        *k = (*k).max(stamp);
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
        let t = topology_with(1, std::slice::from_ref(&two));
        let mut s = NeighbourSync::default();
        s.received(&[received(&two)]);
        assert!(s.queue([1, 2]));
        assert_eq!(s.take_due(&t), vec![1], "it holds 2 already");
        assert!(s.take_due(&t).is_empty(), "nothing twice");
        // A newer version of 2 is owed again.
        let t = topology_with(1, &[bump(two)]);
        s.queue([2]);
        assert_eq!(s.take_due(&t), vec![2]);
    }

    #[test]
    fn an_equal_summary_means_it_holds_everything() {
        let t = topology_with(1, &[entry(2, 3), entry(3, 2)]);
        let mut s = NeighbourSync::default();
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
        let mut s = NeighbourSync::default();
        let (wake, answer) = s.on_digest(&ours, &theirs.digest(), false);
        assert!(wake);
        assert_eq!(answer, Answer::DigestReply);
        assert_eq!(s.take_due(&ours), vec![2]);
        // Its reply to our reply would loop: a reply is never answered.
        let (_, answer) = s.on_digest(&ours, &theirs.digest(), true);
        assert_eq!(answer, Answer::Nothing);
    }
}
