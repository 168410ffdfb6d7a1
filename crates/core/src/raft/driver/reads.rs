//! Linearizable reads: ReadIndex requests, their answers, and waiting until applied.

use super::*;

impl Driver {
    pub(super) fn issue_reads(&mut self) {
        if self.reads_new.is_empty() || !self.leader_known() {
            return;
        }
        self.read_seq = self.read_seq.wrapping_add(1);
        let ctx = self.read_seq;
        self.raw.read_index(ctx.to_be_bytes().to_vec());
        let waiters = std::mem::take(&mut self.reads_new);
        self.reads_inflight.insert(ctx, (waiters, self.ticks));
    }

    pub(super) fn on_read_state(&mut self, rs: ReadState) {
        let Ok(ctx) = <[u8; 8]>::try_from(rs.request_ctx.as_slice()) else {
            return;
        };
        if let Some((waiters, _)) = self.reads_inflight.remove(&u64::from_be_bytes(ctx)) {
            self.reads_ready.push((rs.index, waiters));
        }
    }

    pub(super) fn answer_reads(&mut self) {
        if self.reads_ready.is_empty() {
            return;
        }
        let applied = self.kv.applied_index();
        self.reads_ready.retain_mut(|(index, waiters)| {
            if *index > applied {
                return true;
            }
            for tx in waiters.drain(..) {
                let _ = tx.send(Ok(()));
            }
            false
        });
    }
}
