//! Leader transfer: asked for by MoveLeader or a stopping leader, given up after two
//! election timeouts.

use super::*;

impl Driver {
    pub(super) fn transfer_leader(&mut self, target: u64, reply: Reply<()>) {
        let r = &self.raw.raft;
        let result = if r.state != StateRole::Leader {
            Err(ProposeError::NotLeader)
        } else if !r.prs().conf().voters().contains(target) {
            Err(ProposeError::BadLeaderTransferee)
        } else if target == self.cfg.member_id {
            Ok(())
        } else {
            info!(
                target = format_args!("{target:x}"),
                "transferring leadership"
            );
            self.raw.transfer_leader(target);
            self.transfers.push((target, reply, self.ticks));
            return;
        };
        let _ = reply.send(result);
    }

    /// Answers leader transfers that completed or gave up. raft-rs abandons a transfer
    /// after an election timeout; give it twice that.
    pub(super) fn check_transfers(&mut self) {
        if self.transfers.is_empty() {
            return;
        }
        let leader = self.raw.raft.leader_id;
        let limit = 2 * self.cfg.election_ticks as u64;
        let now = self.ticks;
        for (target, reply, started) in std::mem::take(&mut self.transfers) {
            if leader == target {
                let _ = reply.send(Ok(()));
            } else if now.saturating_sub(started) > limit || reply.is_closed() {
                let _ = reply.send(Err(ProposeError::LeaderTransferTimeout));
            } else {
                self.transfers.push((target, reply, started));
            }
        }
    }
}
