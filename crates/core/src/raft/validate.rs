//! Checks on every Raft message from a peer before raft-rs sees it.
//!
//! raft-rs trusts its peers: some malformed messages reach its `fatal!`s (an empty
//! proposal, a heartbeat committing past the log, an acknowledgement of entries the
//! leader never wrote, a snapshot whose configuration cannot be restored). A message
//! here is refused unless it is one a correct member could have sent, from a sender
//! the current configuration knows; refusals are counted by [`Refusal`].

use std::collections::HashSet;

use raft::prelude::{ConfState, EntryType, Message, MessageType};
use raft::{Raft, Storage};

use crate::proto::meshpb::SnapshotRef;

/// Why a peer's Raft message was dropped (the `reason` label of
/// `meshd_raft_peer_messages_refused_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// An unknown message or entry type, or a type only a member sends to itself.
    Malformed,
    /// Addressed to another member, or claiming to come from this one or from ID 0.
    Misaddressed,
    /// The mesh peer it came from is not the one its sender is published on, or the
    /// message names another sender than its envelope.
    ForgedSender,
    /// The sender is not in this member's configuration and the message is not one a
    /// leader or candidate of a newer configuration sends (proposals, reads and
    /// answers are only taken from members), or it was removed.
    NonMember,
    /// A term where there must be none, or none where there must be one.
    BadTerm,
    /// Indexes that do not fit this member's log (commit or acknowledgement beyond its
    /// end, entries that are not consecutive).
    BadIndex,
    /// A snapshot whose configuration cannot be restored, whose data does not name a
    /// received file, or whose file failed its checks.
    BadSnapshot,
}

impl Refusal {
    pub const ALL: [Refusal; 7] = [
        Refusal::Malformed,
        Refusal::Misaddressed,
        Refusal::ForgedSender,
        Refusal::NonMember,
        Refusal::BadTerm,
        Refusal::BadIndex,
        Refusal::BadSnapshot,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed",
            Refusal::Misaddressed => "misaddressed",
            Refusal::ForgedSender => "forged_sender",
            Refusal::NonMember => "non_member",
            Refusal::BadTerm => "bad_term",
            Refusal::BadIndex => "bad_index",
            Refusal::BadSnapshot => "bad_snapshot",
        }
    }
}

/// Counts a refused `kind` ("raft message", "snapshot chunk") from mesh peer `src` in
/// `status` and logs why.
pub(crate) fn refuse_from_peer(
    status: &super::NodeStatus,
    kind: &str,
    why: Refusal,
    src: crate::mesh::PeerName,
    what: &str,
) {
    status.metrics.count_refusal(why);
    tracing::warn!(
        peer = format_args!("{src:016x}"),
        reason = why.label(),
        "{kind} dropped: {what}"
    );
}

/// raft-rs panics on enum values it does not know (`get_msg_type`, `get_entry_type`).
pub fn well_formed(m: &Message) -> bool {
    MessageType::from_i32(m.msg_type).is_some()
        && m.entries
            .iter()
            .all(|e| EntryType::from_i32(e.entry_type).is_some())
}

/// Whether raft-rs can restore `cs` (its `confchange::restore` panics otherwise): some
/// voter, no ID twice in a list, no voter also a learner.
pub fn restorable(cs: &ConfState) -> bool {
    let set = |v: &[u64]| -> Option<HashSet<u64>> {
        let s: HashSet<u64> = v.iter().copied().collect();
        (s.len() == v.len() && !s.contains(&0)).then_some(s)
    };
    let (Some(voters), Some(learners), Some(outgoing), Some(next)) = (
        set(&cs.voters),
        set(&cs.learners),
        set(&cs.voters_outgoing),
        set(&cs.learners_next),
    ) else {
        return false;
    };
    !voters.is_empty()
        && voters.is_disjoint(&learners)
        && outgoing.is_disjoint(&learners)
        && next.is_disjoint(&voters)
        && next.is_subset(&outgoing)
}

/// Checks `m`, from a peer, against this member's Raft state; `removed` are member IDs
/// this member saw removed from the configuration.
pub fn check<S: Storage>(
    raft: &Raft<S>,
    removed: &HashSet<u64>,
    m: &Message,
) -> Result<(), Refusal> {
    use MessageType::*;
    if !well_formed(m) {
        return Err(Refusal::Malformed);
    }
    let kind = MessageType::from_i32(m.msg_type).ok_or(Refusal::Malformed)?;
    if matches!(
        kind,
        MsgHup | MsgBeat | MsgUnreachable | MsgSnapStatus | MsgCheckQuorum
    ) {
        return Err(Refusal::Malformed);
    }
    if m.to != raft.id || m.from == raft.id || m.from == 0 {
        return Err(Refusal::Misaddressed);
    }

    // Who may send what. raft-rs tracks the progress of every voter and learner of
    // the configuration (outgoing ones included): a lookup, no allocation per message.
    let uninitialized = raft.prs().iter().len() == 0;
    let from_leader_or_candidate = matches!(
        kind,
        MsgAppend | MsgHeartbeat | MsgSnapshot | MsgRequestVote | MsgRequestPreVote
    );
    if removed.contains(&m.from) {
        return Err(Refusal::NonMember);
    }
    if raft.prs().get(m.from).is_none() {
        // A member that has not applied the change adding the sender still hears from
        // a leader or candidate of the newer configuration, once it has lost touch with
        // the leader it knows (as check-quorum's lease does for votes), and then goes
        // on hearing from that leader (whose heartbeats renew the lease); a member
        // not yet initialized (joining) hears only from a leader.
        let in_lease = raft.leader_id != 0 && raft.election_elapsed < raft.election_timeout();
        let from_leader = matches!(kind, MsgAppend | MsgHeartbeat | MsgSnapshot);
        let allowed = if uninitialized {
            from_leader
        } else {
            (from_leader_or_candidate && !in_lease) || (from_leader && raft.leader_id == m.from)
        };
        if !allowed {
            return Err(Refusal::NonMember);
        }
    }

    // raft-rs sends proposals and read requests without a term and everything else
    // with one; a term of 0 makes raft-rs treat a message as local.
    let termless = matches!(kind, MsgPropose | MsgReadIndex);
    if termless != (m.term == 0) {
        return Err(Refusal::BadTerm);
    }

    // raft-rs ignores the content of a message from an older term (it only answers
    // with its own term), so only current and newer ones are checked further.
    if m.term != 0 && m.term < raft.term {
        return Ok(());
    }
    let log = &raft.raft_log;
    match kind {
        MsgPropose if m.entries.is_empty() => return Err(Refusal::Malformed),
        MsgHeartbeat if m.commit > log.last_index() => return Err(Refusal::BadIndex),
        MsgAppend => {
            let consecutive = m
                .entries
                .iter()
                .enumerate()
                .all(|(i, e)| Some(e.index) == m.index.checked_add(1 + i as u64));
            let terms_ok = m.log_term <= m.term
                && m.entries
                    .iter()
                    .try_fold(m.log_term, |prev, e| {
                        (e.term >= prev && e.term <= m.term).then_some(e.term)
                    })
                    .is_some();
            if !consecutive || !terms_ok {
                return Err(Refusal::BadIndex);
            }
            // Rejecting an append, raft-rs looks back from it for an entry of at most
            // `log_term`; a correct leader's `log_term` is never below the term of this
            // member's commit index, and looking below that point finds no term.
            if m.index >= log.committed && m.log_term < log.term(log.committed).unwrap_or(0) {
                return Err(Refusal::BadTerm);
            }
        }
        MsgAppendResponse if !m.reject && m.index > log.last_index() => {
            return Err(Refusal::BadIndex)
        }
        MsgSnapshot => {
            let Some(snap) = &m.snapshot else {
                return Err(Refusal::BadSnapshot);
            };
            let meta = snap.metadata.clone().unwrap_or_default();
            // The data names the file the snapshot stream wrote here.
            let decodes = <SnapshotRef as prost::Message>::decode(snap.data.as_slice())
                .is_ok_and(|r| !r.path.is_empty());
            if meta.index == 0
                || meta.term == 0
                || meta.term > m.term
                || !restorable(&meta.conf_state.unwrap_or_default())
                || !decodes
            {
                return Err(Refusal::BadSnapshot);
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::prelude::{Entry, Snapshot, SnapshotMetadata};
    use raft::storage::MemStorage;
    use raft::{Config, RawNode};

    /// Member 1 of voters {1, 2, 3} at term 2, holding entries 3..=5 of term 2 (the
    /// ones before compacted away), 3 committed.
    fn follower() -> RawNode<MemStorage> {
        let storage = MemStorage::new_with_conf_state(ConfState::from((vec![1, 2, 3], vec![])));
        let ents: Vec<Entry> = (1..=5)
            .map(|i| Entry {
                index: i,
                term: 2,
                ..Default::default()
            })
            .collect();
        {
            let mut w = storage.wl();
            w.append(&ents).unwrap();
            w.mut_hard_state().term = 2;
            w.mut_hard_state().commit = 3;
            w.compact(3).unwrap();
        }
        let cfg = Config {
            id: 1,
            ..Default::default()
        };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let node = RawNode::new(&cfg, storage, &logger).unwrap();
        assert_eq!(node.raft.raft_log.committed, 3);
        node
    }

    /// The same member after it won an election at term 3.
    fn leader() -> RawNode<MemStorage> {
        let mut node = follower();
        node.raft.become_candidate();
        node.raft.become_leader();
        node
    }

    fn msg(kind: MessageType, term: u64, f: impl FnOnce(&mut Message)) -> Message {
        let mut m = Message {
            msg_type: kind as i32,
            from: 2,
            to: 1,
            term,
            ..Default::default()
        };
        f(&mut m);
        m
    }

    fn check_on(node: &RawNode<MemStorage>, m: &Message) -> Result<(), Refusal> {
        check(&node.raft, &HashSet::new(), m)
    }

    /// Each message here would reach a `fatal!` (a panic) in raft-rs: the check
    /// refuses it; the same message stepped without the check panics.
    #[test]
    fn messages_that_would_panic_raft_rs_are_refused() {
        use MessageType::*;
        type Node = fn() -> RawNode<MemStorage>;
        let cases: Vec<(&str, Node, Message, Refusal)> = vec![
            (
                "empty proposal to a leader",
                leader,
                msg(MsgPropose, 0, |_| {}),
                Refusal::Malformed,
            ),
            (
                "heartbeat committing past the log",
                follower,
                msg(MsgHeartbeat, 2, |m| m.commit = 1000),
                Refusal::BadIndex,
            ),
            (
                "append whose log_term sends the rejection hint below the log",
                follower,
                msg(MsgAppend, 3, |m| {
                    m.index = 4;
                    m.log_term = 0;
                }),
                Refusal::BadTerm,
            ),
        ];
        for (what, node, m, want) in cases {
            assert_eq!(check_on(&node(), &m), Err(want), "{what}");
            let mut unchecked = node();
            let stepped =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| unchecked.step(m)));
            assert!(stepped.is_err(), "{what}: raft-rs did not panic unchecked");
        }
    }

    /// An acknowledgement of entries a leader never wrote would count toward a quorum
    /// for entries the follower may not hold.
    #[test]
    fn a_leader_refuses_acknowledgements_of_entries_it_never_wrote() {
        let node = leader();
        let last = node.raft.raft_log.last_index();
        let ack = |index| {
            msg(MessageType::MsgAppendResponse, node.raft.term, |m| {
                m.index = index
            })
        };
        assert_eq!(check_on(&node, &ack(last)), Ok(()));
        assert_eq!(check_on(&node, &ack(last + 100)), Err(Refusal::BadIndex));
        // A stale term is raft-rs's to ignore, whatever it carries.
        let stale = msg(MessageType::MsgHeartbeat, 1, |m| m.commit = 1000);
        assert_eq!(check_on(&node, &stale), Ok(()));
    }

    #[test]
    fn senders_are_checked_against_the_configuration() {
        use MessageType::*;
        let node = follower();
        let proposal = |from| {
            msg(MsgPropose, 0, |m| {
                m.from = from;
                m.entries = vec![Entry::default()];
            })
        };
        assert_eq!(check_on(&node, &proposal(3)), Ok(()));
        assert_eq!(check_on(&node, &proposal(9)), Err(Refusal::NonMember));
        assert_eq!(
            check(&node.raft, &HashSet::from([3]), &proposal(3)),
            Err(Refusal::NonMember),
            "a removed member"
        );
        // A leader of a configuration not applied here yet may append and campaign,
        // but not while this member still hears from the leader it knows.
        let append = msg(MsgAppend, 3, |m| {
            m.from = 9;
            m.index = 5;
            m.log_term = 2;
        });
        assert_eq!(check_on(&node, &append), Ok(()));
        let mut led = follower();
        led.step(msg(MsgHeartbeat, 2, |m| m.commit = 3)).unwrap();
        assert_eq!(led.raft.leader_id, 2);
        assert_eq!(check_on(&led, &append), Err(Refusal::NonMember));
        // Once it follows that newer leader, it keeps hearing from it: each heartbeat
        // renews the lease that would otherwise shut it out (found by the simulator:
        // a learner behind a conf change heard one message per election timeout).
        let mut follows_new = follower();
        follows_new.step(append.clone()).unwrap();
        assert_eq!(follows_new.raft.leader_id, 9);
        assert_eq!(check_on(&follows_new, &append), Ok(()));
        let vote = msg(MsgRequestVote, 4, |m| m.from = 9);
        assert_eq!(check_on(&follows_new, &vote), Err(Refusal::NonMember));
        let ack = msg(MsgAppendResponse, 3, |m| m.from = 9);
        assert_eq!(check_on(&node, &ack), Err(Refusal::NonMember));
        // Addressing and terms.
        let hb = |f: fn(&mut Message)| msg(MsgHeartbeat, 2, f);
        assert_eq!(check_on(&node, &hb(|_| {})), Ok(()));
        assert_eq!(
            check_on(&node, &hb(|m| m.to = 7)),
            Err(Refusal::Misaddressed)
        );
        assert_eq!(
            check_on(&node, &hb(|m| m.from = 1)),
            Err(Refusal::Misaddressed)
        );
        assert_eq!(check_on(&node, &hb(|m| m.term = 0)), Err(Refusal::BadTerm));
        assert_eq!(
            check_on(&node, &hb(|m| m.msg_type = MsgHup as i32)),
            Err(Refusal::Malformed)
        );
        assert_eq!(
            check_on(&node, &hb(|m| m.msg_type = 99)),
            Err(Refusal::Malformed)
        );
        let with_term = msg(MsgPropose, 2, |m| m.entries = vec![Entry::default()]);
        assert_eq!(check_on(&node, &with_term), Err(Refusal::BadTerm));
    }

    #[test]
    fn appends_must_be_consecutive_and_snapshots_restorable() {
        use MessageType::*;
        let node = follower();
        let entry = |index, term| Entry {
            index,
            term,
            ..Default::default()
        };
        let append = |ents: Vec<Entry>| {
            msg(MsgAppend, 2, |m| {
                m.index = 5;
                m.log_term = 2;
                m.entries = ents;
            })
        };
        assert_eq!(
            check_on(&node, &append(vec![entry(6, 2), entry(7, 2)])),
            Ok(())
        );
        for bad in [
            vec![entry(7, 2)],
            vec![entry(6, 2), entry(6, 2)],
            vec![entry(6, 3)],
            vec![entry(6, 1)],
        ] {
            assert!(check_on(&node, &append(bad.clone())).is_err(), "{bad:?}");
        }
        let data = prost::Message::encode_to_vec(&SnapshotRef {
            len: 1,
            sha256: vec![0; 32],
            path: "/data/snap/incoming-2-1.snap".into(),
        });
        let snapshot = |cs: ConfState, data: Vec<u8>| {
            msg(MsgSnapshot, 3, |m| {
                m.snapshot = Some(Snapshot {
                    data,
                    metadata: Some(SnapshotMetadata {
                        conf_state: Some(cs),
                        index: 10,
                        term: 3,
                    }),
                })
            })
        };
        let ok = ConfState::from((vec![1, 2, 3], vec![]));
        assert_eq!(check_on(&node, &snapshot(ok.clone(), data.clone())), Ok(()));
        for bad in [
            ConfState::from((vec![], vec![1])),
            ConfState::from((vec![1, 2], vec![2])),
            ConfState::from((vec![1, 1], vec![])),
        ] {
            assert_eq!(
                check_on(&node, &snapshot(bad.clone(), data.clone())),
                Err(Refusal::BadSnapshot),
                "{bad:?}"
            );
        }
        assert_eq!(
            check_on(&node, &snapshot(ok, vec![0xff; 9])),
            Err(Refusal::BadSnapshot),
            "undecodable data"
        );
    }
}
