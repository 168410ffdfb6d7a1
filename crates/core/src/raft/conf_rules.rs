//! The rules a membership change must pass before the leader proposes it, as a pure
//! function of what the leader knows ([`ChangeView`]): the driver reads the view from
//! raft-rs and the mesh, and these rules are tested on views made by hand.
//!
//! - Only the leader proposes, one change at a time.
//! - A learner may always be added.
//! - A voter may be added only if a quorum of the enlarged voter set has started
//!   (heard from within an election timeout and reachable now); as etcd, a single
//!   member may add a second.
//! - Only a learner is promoted, and only once its log has 90 % of the leader's.
//! - A voter is removed only if the voters left keep a started quorum.

use std::collections::{HashMap, HashSet};

use super::{MemberChange, ProposeError};

/// What the leader knows when it checks a change.
#[derive(Clone, Debug, Default)]
pub struct ChangeView {
    pub is_leader: bool,
    pub change_pending: bool,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// Members heard from within an election timeout and reachable now (the leader
    /// always counts).
    pub started: HashSet<u64>,
    pub leader_last_index: u64,
    /// Each member's matched log index.
    pub matched: HashMap<u64, u64>,
}

/// Least progress, as a share of the leader's log, a learner needs to be promoted.
const PROMOTE_AT: f64 = 0.9;

fn quorum(n: usize) -> usize {
    n / 2 + 1
}

/// `Ok` when `change` may be proposed now.
pub fn check(view: &ChangeView, change: &MemberChange) -> Result<(), ProposeError> {
    if !view.is_leader {
        return Err(ProposeError::NotLeader);
    }
    if view.change_pending {
        return Err(ProposeError::ChangeInProgress);
    }
    let started = |id: &u64| view.started.contains(id);
    match change {
        MemberChange::Add { learner: true, .. } => Ok(()),
        MemberChange::Add { .. } => {
            let up = view.voters.iter().filter(|id| started(id)).count();
            let alone = up == 1 && view.voters.len() == 1;
            if up < quorum(view.voters.len() + 1) && !alone {
                return Err(ProposeError::NotEnoughStarted);
            }
            Ok(())
        }
        MemberChange::Promote(id) => {
            if !view.learners.contains(id) {
                return Err(ProposeError::Membership(
                    "etcdserver: can only promote a learner member",
                ));
            }
            let matched = view.matched.get(id).copied().unwrap_or(0);
            if (matched as f64) < (view.leader_last_index as f64) * PROMOTE_AT {
                return Err(ProposeError::LearnerNotReady);
            }
            Ok(())
        }
        MemberChange::Remove(id) => {
            if !view.voters.contains(id) {
                return Ok(());
            }
            let rest: Vec<u64> = view.voters.iter().copied().filter(|v| v != id).collect();
            let up = rest.iter().filter(|v| started(v)).count();
            if rest.is_empty() || up < quorum(rest.len()) {
                return Err(ProposeError::NotEnoughStarted);
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::meshpb::MemberRecord;

    fn view(voters: &[u64], started: &[u64]) -> ChangeView {
        ChangeView {
            is_leader: true,
            voters: voters.to_vec(),
            started: started.iter().copied().collect(),
            ..Default::default()
        }
    }

    fn add(learner: bool) -> MemberChange {
        MemberChange::Add {
            member: MemberRecord {
                id: 9,
                ..Default::default()
            },
            learner,
        }
    }

    #[test]
    fn only_a_leader_proposes_and_one_change_at_a_time() {
        let mut v = view(&[1, 2, 3], &[1, 2, 3]);
        v.is_leader = false;
        assert!(matches!(
            check(&v, &add(true)),
            Err(ProposeError::NotLeader)
        ));
        let mut v = view(&[1, 2, 3], &[1, 2, 3]);
        v.change_pending = true;
        assert!(matches!(
            check(&v, &add(true)),
            Err(ProposeError::ChangeInProgress)
        ));
    }

    #[test]
    fn a_voter_is_added_only_with_a_started_quorum_of_the_new_set() {
        // Three voters, two started: the new set of four needs three.
        let v = view(&[1, 2, 3], &[1, 2]);
        assert!(matches!(
            check(&v, &add(false)),
            Err(ProposeError::NotEnoughStarted)
        ));
        assert!(check(&v, &add(true)).is_ok(), "a learner needs nothing");
        assert!(check(&view(&[1, 2, 3], &[1, 2, 3]), &add(false)).is_ok());
        // A single member may add a second, as etcd allows.
        assert!(check(&view(&[1], &[1]), &add(false)).is_ok());
    }

    #[test]
    fn only_a_caught_up_learner_is_promoted() {
        let mut v = view(&[1, 2, 3], &[1, 2, 3]);
        v.learners = vec![4];
        v.leader_last_index = 1000;
        v.matched.insert(4, 899);
        assert!(matches!(
            check(&v, &MemberChange::Promote(4)),
            Err(ProposeError::LearnerNotReady)
        ));
        v.matched.insert(4, 900);
        assert!(check(&v, &MemberChange::Promote(4)).is_ok());
        assert!(matches!(
            check(&v, &MemberChange::Promote(2)),
            Err(ProposeError::Membership(_))
        ));
    }

    #[test]
    fn a_voter_is_removed_only_if_the_rest_keep_a_started_quorum() {
        // Removing 3 leaves 1 and 2; only 1 started: no quorum of two.
        let v = view(&[1, 2, 3], &[1]);
        assert!(matches!(
            check(&v, &MemberChange::Remove(3)),
            Err(ProposeError::NotEnoughStarted)
        ));
        assert!(check(&view(&[1, 2, 3], &[1, 2]), &MemberChange::Remove(3)).is_ok());
        // The last voter cannot go; a non-voter always can.
        assert!(matches!(
            check(&view(&[1], &[1]), &MemberChange::Remove(1)),
            Err(ProposeError::NotEnoughStarted)
        ));
        assert!(check(&view(&[1], &[1]), &MemberChange::Remove(7)).is_ok());
    }
}
