//! Applying committed entries and snapshots: each request goes to the state machine
//! (`ApplyBatch::apply_request`), whose effect the driver carries out; conf changes
//! are checked against the member table and applied to raft-rs here.

use super::*;

impl Driver {
    pub(super) fn apply(&mut self, entries: Vec<Entry>) -> Result<(), DriverError> {
        if entries.is_empty() {
            return Ok(());
        }
        if self.corrupt {
            // Nothing is applied; only watch for our own alarm to stop proposing it.
            let ours = corrupt_alarm(self.cfg.member_id);
            self.corrupt_alarm_committed |= entries.iter().any(|e| {
                <InternalRequest as prost::Message>::decode(e.data.as_slice())
                    .is_ok_and(|r| r.request == Some(Request::Alarm(ours)))
            });
            return Ok(());
        }
        let apply_started = Instant::now();
        let kv = self.kv.clone();
        let mut batch = kv.begin()?;
        let mut replies: Vec<(u64, Result<Applied, ProposeError>)> = Vec::new();
        let mut peers_changed = false;
        let mut member_added = false;
        for e in entries {
            self.unsynced_bytes += e.data.len();
            let mut ours = None;
            // Entries were checked on receipt (`validate::well_formed`); a stored one
            // with an unknown type means a damaged log: stop rather than guess.
            let kind = EntryType::from_i32(e.entry_type).ok_or_else(|| {
                DriverError::BadSnapshot(format!(
                    "log entry {} has unknown type {}",
                    e.index, e.entry_type
                ))
            })?;
            match kind {
                EntryType::EntryNormal if e.data.is_empty() => {
                    // A new leader's empty entry: nothing to apply.
                }
                EntryType::EntryNormal => {
                    match <InternalRequest as prost::Message>::decode(e.data.as_slice()) {
                        Ok(req) => {
                            let outcome =
                                batch.apply_request(req.auth_info.as_ref(), req.request)?;
                            peers_changed |= self.carry_out(outcome.effect);
                            if req.proposer == self.cfg.member_id {
                                ours = Some(req.id);
                                replies.push((req.id, outcome.result.map_err(ProposeError::Kv)));
                            }
                        }
                        // Every member fails the same way on the same bytes, so skipping
                        // keeps replicas identical.
                        Err(err) => error!(index = e.index, "skipping undecodable entry: {err}"),
                    }
                }
                EntryType::EntryConfChange => {
                    let cc = ConfChange::decode(e.data.as_slice())
                        .map_err(|x| DriverError::BadSnapshot(format!("conf change: {x}")))?;
                    let ctx: ConfChangeContext =
                        prost::Message::decode(cc.context.as_slice()).unwrap_or_default();
                    let outcome = self.apply_conf_change(&mut batch, &cc, &ctx)?;
                    member_added |= outcome.is_ok()
                        && !ctx.promote
                        && matches!(
                            raft::prelude::ConfChangeType::from_i32(cc.change_type),
                            Some(
                                raft::prelude::ConfChangeType::AddNode
                                    | raft::prelude::ConfChangeType::AddLearnerNode
                            )
                        );
                    if ctx.proposer == self.cfg.member_id && ctx.id != 0 {
                        ours = Some(ctx.id);
                        let applied = outcome.map(|()| Applied {
                            revision: batch.revision(),
                            kind: AppliedKind::Membership,
                        });
                        replies.push((ctx.id, applied));
                    }
                    peers_changed = true;
                }
                EntryType::EntryConfChangeV2 => {
                    // meshd proposes single changes only; raft-rs would only write a V2
                    // entry to leave a joint configuration, which meshd never enters.
                    let cc = ConfChangeV2::decode(e.data.as_slice())
                        .map_err(|x| DriverError::BadSnapshot(format!("conf change: {x}")))?;
                    let cs = self.raw.apply_conf_change(&cc)?;
                    self.log.set_conf_state(&batch.side()?, &cs)?;
                    peers_changed = true;
                }
            }
            if let Some(id) = self.by_index.remove(&e.index) {
                if ours != Some(id) {
                    // Our proposal's slot holds another entry: a new leader replaced it.
                    replies.push((id, Err(ProposeError::LeaderChanged)));
                }
            }
            batch.set_applied_index(e.index);
        }
        // Not fsync'ed: the log is the durable record, and state + applied index change
        // atomically, so a crash only means re-applying from the log. A batch of plain
        // writes is only published (its records wait in memory for the next commit).
        let commit_started = Instant::now();
        let committed = batch.commit(false)?;
        let metrics = &self.status.metrics;
        if committed {
            metrics.backend_commit.observe(commit_started.elapsed());
        }
        metrics.apply.observe(apply_started.elapsed());
        // A member just added starts empty, and with the log compacted it needs a
        // snapshot: the leader starts building the file now, while that member starts
        // and joins, not when raft-rs first asks for it. Built after the commit, so
        // the file is at an index that already holds the new configuration.
        if member_added && self.raw.raft.state == StateRole::Leader && self.log.first_index() > 1 {
            let _ = raft::Storage::snapshot(&self.log, 0, 0);
        }
        for (id, result) in replies {
            if let Some(tx) = self.pending.remove(&id) {
                let _ = tx.send(result);
            }
        }
        if peers_changed {
            self.refresh_peers();
        }
        Ok(())
    }

    /// Carries out what an applied request asks of the world outside the state
    /// machine; true when the peer set must be refreshed after the commit.
    fn carry_out(&self, effect: Effect) -> bool {
        match effect {
            Effect::None => false,
            Effect::LeaseGranted { id, ttl } => {
                self.lessor.granted(id, ttl);
                false
            }
            Effect::LeaseRevoked(id) => {
                self.lessor.revoked(id);
                false
            }
            Effect::LeaseRenewed(id) => {
                self.lessor.renew(id);
                false
            }
            Effect::MembersChanged => true,
        }
    }

    pub(super) fn install_snapshot(&mut self, snap: &Snapshot) -> Result<(), DriverError> {
        let meta = snap.metadata.clone().unwrap_or_default();
        let file: SnapshotRef = prost::Message::decode(snap.data.as_slice())
            .map_err(|e| DriverError::BadSnapshot(e.to_string()))?;
        let path = std::path::PathBuf::from(&file.path);
        if path.parent() != Some(self.cfg.snapshot_dir.as_path()) {
            return Err(DriverError::BadSnapshot(format!(
                "snapshot file {} is not in {}",
                path.display(),
                self.cfg.snapshot_dir.display()
            )));
        }
        info!(
            index = meta.index,
            term = meta.term,
            bytes = file.len,
            "installing snapshot from the leader"
        );
        let started = std::time::Instant::now();
        let kv = self.kv.clone();
        let mut batch = kv.begin()?;
        batch.restore_file(&path, &file.sha256)?;
        let restored = started.elapsed();
        batch.set_applied_index(meta.index);
        self.log.apply_snapshot(&batch.side()?, &meta)?;
        batch.commit(true)?;
        info!(
            index = meta.index,
            read_ms = restored.as_millis() as u64,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "snapshot installed"
        );
        self.durable_applied = meta.index;
        // Only now that the state machine is durable at the snapshot may the log
        // forget what came before it.
        self.log.sync()?;
        let _ = self.db.vfs().remove_file(&path);
        crate::lease::load(&self.lessor, &self.kv)?;
        self.refresh_peers();
        Ok(())
    }

    /// Applies a configuration change entry if it is consistent with the member table
    /// (the same decision on every member); an inconsistent one changes nothing and its
    /// proposer gets the reason.
    pub(super) fn apply_conf_change(
        &mut self,
        batch: &mut ApplyBatch<'_>,
        cc: &ConfChange,
        ctx: &ConfChangeContext,
    ) -> Result<Result<(), ProposeError>, DriverError> {
        use raft::prelude::ConfChangeType;
        let existing = batch.member(cc.node_id)?;
        let kind = ConfChangeType::from_i32(cc.change_type);
        let refusal = match (kind, &existing) {
            (Some(ConfChangeType::AddNode), Some(m)) if ctx.promote && !m.is_learner => {
                Some("etcdserver: can only promote a learner member")
            }
            (Some(ConfChangeType::AddNode), None) if ctx.promote => {
                Some("etcdserver: member not found")
            }
            (Some(ConfChangeType::AddNode | ConfChangeType::AddLearnerNode), Some(_))
                if !ctx.promote =>
            {
                Some("etcdserver: member ID already exist")
            }
            (Some(ConfChangeType::RemoveNode), None) => Some("etcdserver: member not found"),
            (None, _) => Some("etcdserver: unknown configuration change"),
            _ => None,
        };
        if let Some(why) = refusal {
            warn!(
                node = format_args!("{:x}", cc.node_id),
                "membership change refused: {why}"
            );
            return Ok(Err(ProposeError::Membership(why)));
        }
        let cs = self.raw.apply_conf_change(cc)?;
        self.log.set_conf_state(&batch.side()?, &cs)?;
        let r = match kind {
            Some(ConfChangeType::RemoveNode) => batch.remove_member(cc.node_id),
            _ => {
                let mut m = existing
                    .or_else(|| ctx.member.clone())
                    .unwrap_or(MemberRecord {
                        id: cc.node_id,
                        ..Default::default()
                    });
                m.id = cc.node_id;
                m.is_learner = kind == Some(ConfChangeType::AddLearnerNode);
                batch.put_member(&m)
            }
        };
        r?;
        info!(
            node = format_args!("{:x}", cc.node_id),
            term = self.raw.raft.term,
            change = ?kind,
            voters = ?cs.voters,
            learners = ?cs.learners,
            "membership changed"
        );
        if kind == Some(ConfChangeType::RemoveNode) {
            self.removed.insert(cc.node_id);
            self.heard_at.remove(&cc.node_id);
        } else {
            self.removed.remove(&cc.node_id);
        }
        if kind == Some(ConfChangeType::RemoveNode) && cc.node_id == self.cfg.member_id {
            self.status
                .removed
                .store(true, std::sync::atomic::Ordering::Release);
            // A leader that removed itself steps down now: raft-rs would otherwise
            // look up its own progress, which the change just deleted, when this
            // Ready's appends are marked persisted, and panic. The entry is committed,
            // so the next leader keeps it.
            if self.raw.raft.state == StateRole::Leader {
                let term = self.raw.raft.term;
                self.raw.raft.become_follower(term, raft::INVALID_ID);
            }
        }
        Ok(Ok(()))
    }
}

/// The request that raises the CORRUPT alarm for `member`.
pub(super) fn corrupt_alarm(member: u64) -> crate::proto::etcdserverpb::AlarmRequest {
    use crate::proto::etcdserverpb::{alarm_request::AlarmAction, AlarmRequest, AlarmType};
    AlarmRequest {
        action: AlarmAction::Activate as i32,
        member_id: member,
        alarm: AlarmType::Corrupt as i32,
    }
}
