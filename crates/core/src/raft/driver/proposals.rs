//! Proposals: IDs, the queue parked while no leader is known, and membership changes
//! with their safety rules.

use super::*;
use raft::prelude::Message;

/// A leader's own removal in progress: leadership is handed over first, then the
/// change is forwarded to the new leader, again every election timeout until it
/// applies (a new leader drops conf changes until it has applied its first entry) or
/// the caller stops waiting.
pub(crate) struct SelfRemoval {
    cc: ConfChange,
    id: u64,
    /// The caller, until the change is first forwarded; then it waits in `pending`.
    reply: Option<Reply<Applied>>,
    /// When leadership was last handed over.
    transferred: u64,
    /// When the change was last forwarded.
    forwarded: Option<u64>,
}

/// Bounds on [`HeldProposals`]: enough for every client write in flight during a
/// leadership hand-over; beyond them a forwarded proposal is dropped, as raft-rs would
/// have, and its proposer's caller hears of it by its timeout.
const HELD_MAX_MESSAGES: usize = 4096;
const HELD_MAX_BYTES: usize = 64 << 20;

/// Proposals forwarded by other members, held while this member can take none, in
/// arrival order, with the tick each arrived at.
#[derive(Default)]
pub(crate) struct HeldProposals {
    queue: std::collections::VecDeque<(u64, Box<Message>)>,
    bytes: usize,
}

fn proposal_bytes(m: &Message) -> usize {
    m.entries
        .iter()
        .map(|e| e.data.len() + e.context.len())
        .sum()
}

impl Driver {
    /// Whether a proposal stepped now would be taken: appended by a leader that is
    /// not handing leadership over, or forwarded by a follower that knows its leader.
    /// raft-rs drops a proposal otherwise, without telling its proposer.
    pub(super) fn takes_proposals(&self) -> bool {
        let r = &self.raw.raft;
        match r.state {
            StateRole::Leader => r.lead_transferee.is_none(),
            _ => r.leader_id != raft::INVALID_ID,
        }
    }

    /// Keeps a proposal another member forwarded while this member can take none:
    /// while it hands leadership over (raft-rs refuses proposals until the transfer
    /// ends), or between leaders. A member stopping gracefully hands leadership over,
    /// and the writes its followers forwarded meanwhile would otherwise be lost and
    /// their clients left to time out. Held within bounds, and for at most two
    /// election timeouts: raft-rs gives a transfer up after one, and an election
    /// needs about one more.
    pub(super) fn hold_forwarded(&mut self, msg: Box<Message>) {
        let bytes = proposal_bytes(&msg);
        let held = &mut self.held;
        if held.queue.len() >= HELD_MAX_MESSAGES || held.bytes + bytes > HELD_MAX_BYTES {
            warn!(
                from = format_args!("{:x}", msg.from),
                "dropping a forwarded proposal: too many held while no leader takes them"
            );
            return;
        }
        held.bytes += bytes;
        held.queue.push_back((self.ticks, msg));
    }

    /// Steps the held proposals once this member takes proposals again, dropping
    /// those held too long.
    pub(super) fn step_held(&mut self) {
        if self.held.queue.is_empty() {
            return;
        }
        let limit = 2 * self.cfg.election_ticks as u64;
        let now = self.ticks;
        while let Some((at, _)) = self.held.queue.front() {
            if now.saturating_sub(*at) <= limit {
                break;
            }
            let (_, msg) = self.held.queue.pop_front().expect("front exists");
            self.held.bytes -= proposal_bytes(&msg);
            warn!(
                from = format_args!("{:x}", msg.from),
                "dropping a forwarded proposal held for two election timeouts without a leader"
            );
        }
        if !self.takes_proposals() {
            return;
        }
        self.held.bytes = 0;
        for (_, msg) in std::mem::take(&mut self.held.queue) {
            if let Err(e) = self.raw.step(*msg) {
                warn!("dropping a held forwarded proposal: {e}");
            }
        }
    }

    pub(super) fn take_proposal_id(&mut self) -> u64 {
        let id = self.next_id;
        // 0 means "no caller waits" in a conf change context.
        self.next_id = match self.next_id.wrapping_add(1) {
            0 => 1,
            n => n,
        };
        id
    }

    pub(super) fn propose_parked(&mut self) {
        if self.parked.is_empty() || !self.takes_proposals() {
            return;
        }
        for (id, data) in std::mem::take(&mut self.parked) {
            match self.raw.propose(vec![], data) {
                Ok(()) => {
                    if self.raw.raft.state == StateRole::Leader {
                        self.by_index
                            .insert(self.raw.raft.raft_log.last_index(), id);
                    }
                }
                Err(e) => {
                    let err = match e {
                        raft::Error::ProposalDropped => ProposeError::NoLeader,
                        other => {
                            warn!("proposal refused: {other}");
                            ProposeError::NoLeader
                        }
                    };
                    if let Some(tx) = self.pending.remove(&id) {
                        let _ = tx.send(Err(err));
                    }
                }
            }
        }
    }

    /// Checks a membership change against the leader's view and proposes it.
    pub(super) fn change_members(&mut self, change: MemberChange, reply: Reply<Applied>) {
        use raft::prelude::ConfChangeType;
        if let Err(e) = self.check_change(&change) {
            let _ = reply.send(Err(e));
            return;
        }
        let (change_type, node_id, member, promote) = match change {
            MemberChange::Add { member, learner } => {
                let t = if learner {
                    ConfChangeType::AddLearnerNode
                } else {
                    ConfChangeType::AddNode
                };
                (t, member.id, Some(member), false)
            }
            MemberChange::Promote(id) => (ConfChangeType::AddNode, id, None, true),
            MemberChange::Remove(id) => (ConfChangeType::RemoveNode, id, None, false),
        };
        let id = self.take_proposal_id();
        let ctx = ConfChangeContext {
            proposer: self.cfg.member_id,
            id,
            member,
            promote,
        };
        let cc = ConfChange {
            change_type: change_type as i32,
            node_id,
            context: prost::Message::encode_to_vec(&ctx),
            ..Default::default()
        };
        if change_type == ConfChangeType::RemoveNode && node_id == self.cfg.member_id {
            // A leader that committed its own removal and left could leave the others
            // never learning that it committed: they would wait for its vote forever.
            // It hands leadership to the most caught-up voter first, and proposes the
            // change as a follower; the new leader commits it and tells the others.
            if self.self_removal.is_some() {
                let _ = reply.send(Err(ProposeError::ChangeInProgress));
                return;
            }
            if let Some(target) = self.best_transferee() {
                info!(
                    target = format_args!("{target:x}"),
                    "removing this member: transferring leadership first"
                );
                self.raw.transfer_leader(target);
                self.self_removal = Some(SelfRemoval {
                    cc,
                    id,
                    reply: Some(reply),
                    transferred: self.ticks,
                    forwarded: None,
                });
                return;
            }
        }
        match self.raw.propose_conf_change(vec![], cc) {
            Ok(()) => {
                self.pending.insert(id, reply);
                self.by_index
                    .insert(self.raw.raft.raft_log.last_index(), id);
            }
            Err(raft::Error::ProposalDropped) => {
                let _ = reply.send(Err(ProposeError::ChangeInProgress));
            }
            Err(e) => {
                warn!("membership change refused: {e}");
                let _ = reply.send(Err(ProposeError::ChangeInProgress));
            }
        }
    }

    /// Whether `change` may be proposed now ([`crate::raft::conf_rules`]), on the view
    /// raft-rs and the mesh give.
    pub(super) fn check_change(&self, change: &MemberChange) -> Result<(), ProposeError> {
        let r = &self.raw.raft;
        let me = self.cfg.member_id;
        let conf = r.prs().conf();
        let voters: Vec<u64> = conf.voters().ids().iter().collect();
        let learners: Vec<u64> = conf.learners().iter().copied().collect();
        // Started: heard from within an election timeout and reachable on the mesh now.
        let started = voters
            .iter()
            .chain(&learners)
            .copied()
            .filter(|id| {
                *id == me || (self.heard_recently(*id) && self.transport.is_reachable(*id))
            })
            .collect();
        let matched = r.prs().iter().map(|(id, p)| (*id, p.matched)).collect();
        let view = super::super::conf_rules::ChangeView {
            is_leader: r.state == StateRole::Leader,
            change_pending: r.has_pending_conf(),
            voters,
            learners,
            started,
            leader_last_index: r.raft_log.last_index(),
            matched,
        };
        super::super::conf_rules::check(&view, change)
    }

    /// Moves this member's own removal along: once another member leads, forwards the
    /// change to it (raft-rs does), again every election timeout until it applies or
    /// the caller stops waiting. Leader again (the transfer failed or leadership came
    /// back), it hands over again; if the first hand-over never completes, the caller
    /// hears so after two election timeouts.
    pub(super) fn continue_self_removal(&mut self) {
        let Some(mut sr) = self.self_removal.take() else {
            return;
        };
        let waiting = match &sr.reply {
            Some(r) => !r.is_closed(),
            None => self.pending.contains_key(&sr.id),
        };
        if !waiting {
            return;
        }
        let timeout = 2 * self.cfg.election_ticks as u64;
        let r = &self.raw.raft;
        if r.state == StateRole::Leader {
            if self.ticks.saturating_sub(sr.transferred) > timeout {
                if let Some(reply) = sr.reply.take() {
                    let _ = reply.send(Err(ProposeError::LeaderTransferTimeout));
                    return;
                }
                if let Some(target) = self.best_transferee() {
                    self.raw.transfer_leader(target);
                }
                sr.transferred = self.ticks;
            }
        } else if r.leader_id != raft::INVALID_ID
            && sr
                .forwarded
                .is_none_or(|t| self.ticks.saturating_sub(t) >= self.cfg.election_ticks as u64)
        {
            if let Err(e) = self.raw.propose_conf_change(vec![], sr.cc.clone()) {
                warn!("membership change refused: {e}");
                let reply = sr.reply.take().or_else(|| self.pending.remove(&sr.id));
                if let Some(reply) = reply {
                    let _ = reply.send(Err(ProposeError::ChangeInProgress));
                }
                return;
            }
            if let Some(reply) = sr.reply.take() {
                self.pending.insert(sr.id, reply);
            }
            sr.forwarded = Some(self.ticks);
        }
        self.self_removal = Some(sr);
    }

    /// Answers a removal of this member still in progress (the member leaves Raft
    /// after a failed write).
    pub(super) fn abandon_self_removal(&mut self) {
        if let Some(reply) = self.self_removal.take().and_then(|sr| sr.reply) {
            let _ = reply.send(Err(ProposeError::Stopped));
        }
    }
}
