//! Applying committed entries and snapshots: requests to the state machine (with
//! the apply-time permission check), conf changes, member attributes.

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
        let mut batch = kv.begin().map_err(DriverError::Apply)?;
        let mut replies: Vec<(u64, Result<Applied, ProposeError>)> = Vec::new();
        let mut peers_changed = false;
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
                            let result = apply_request(
                                &mut batch,
                                &self.lessor,
                                req.auth_info.as_ref(),
                                req.request,
                            )?;
                            if req.proposer == self.cfg.member_id {
                                ours = Some(req.id);
                                replies.push((req.id, result.map_err(ProposeError::Kv)));
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
                    self.log
                        .set_conf_state(batch.write_txn().map_err(DriverError::Apply)?, &cs)?;
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
        let committed = batch.commit(false).map_err(DriverError::Apply)?;
        let metrics = &self.status.metrics;
        if committed {
            metrics.backend_commit.observe(commit_started.elapsed());
        }
        metrics.apply.observe(apply_started.elapsed());
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
        let kv = self.kv.clone();
        let mut batch = kv.begin().map_err(DriverError::Apply)?;
        batch.restore_file(&path).map_err(DriverError::Apply)?;
        batch.set_applied_index(meta.index);
        self.log
            .apply_snapshot(batch.write_txn().map_err(DriverError::Apply)?, &meta)?;
        batch.commit(true).map_err(DriverError::Apply)?;
        self.durable_applied = meta.index;
        // Only now that the state machine is durable at the snapshot may the log
        // forget what came before it.
        self.log.sync()?;
        let _ = std::fs::remove_file(&path);
        crate::lease::load(&self.lessor, &self.kv).map_err(DriverError::Apply)?;
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
        let existing = batch.member(cc.node_id).map_err(DriverError::Apply)?;
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
        self.log
            .set_conf_state(batch.write_txn().map_err(DriverError::Apply)?, &cs)?;
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
        r.map_err(DriverError::Apply)?;
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

/// Peer URLs may carry a scheme (as etcd's do); the transport wants `host:port`.
pub(super) fn strip_scheme(url: &str) -> String {
    url.split_once("://")
        .map_or(url, |(_, rest)| rest)
        .trim_end_matches('/')
        .to_string()
}

/// Applies one replicated request. `Err` only for storage failures (fatal); refusals
/// by the state machine are the inner `Err`, a result like any other.
pub(super) fn apply_request(
    batch: &mut ApplyBatch<'_>,
    lessor: &Lessor,
    auth: Option<&RequestAuth>,
    request: Option<Request>,
) -> Result<Result<Applied, KvError>, DriverError> {
    let result = match permitted(batch, auth, &request) {
        Err(e) => Err(e),
        Ok(()) => execute(batch, lessor, request),
    };
    match result {
        Err(e @ (KvError::Storage(_) | KvError::Io(_))) => Err(DriverError::Apply(e)),
        // Refusing the request here would skip an entry the other members applied.
        Err(e @ KvError::Corrupt { .. }) => Err(DriverError::Corrupt(e.to_string())),
        Ok(kind) => Ok(Ok(Applied {
            revision: batch.revision(),
            kind,
        })),
        Err(e) => Ok(Err(e)),
    }
}

/// The apply-time permission check of a client write, as etcd makes it: with the
/// auth store as of this entry (the same on every member), refused unapplied if the
/// store changed since the proposer's check, or if the user may not do it now.
pub(super) fn permitted(
    batch: &mut ApplyBatch<'_>,
    auth: Option<&RequestAuth>,
    request: &Option<Request>,
) -> Result<(), KvError> {
    let Some(a) = auth else {
        return Ok(());
    };
    let state = batch.auth_now()?;
    if !state.enabled {
        return Ok(());
    }
    if a.auth_revision < state.revision {
        return Err(KvError::AuthOldRevision);
    }
    match request {
        Some(r) => state.check_request(&a.username, r),
        None => Ok(()),
    }
}

/// Executes one replicated request on the batch.
pub(super) fn execute(
    batch: &mut ApplyBatch<'_>,
    lessor: &Lessor,
    request: Option<Request>,
) -> Result<AppliedKind, KvError> {
    match request {
        Some(Request::Put(r)) => batch.put(&r).map(AppliedKind::Put),
        Some(Request::DeleteRange(r)) => batch.delete_range(&r).map(AppliedKind::DeleteRange),
        Some(Request::Txn(r)) => batch.txn(&r).map(AppliedKind::Txn),
        Some(Request::Compaction(r)) => batch.compact(r.revision).map(|()| AppliedKind::Compaction),
        Some(Request::MemberAttributes(a)) => {
            update_attributes(batch, a).map(|()| AppliedKind::MemberAttributes)
        }
        Some(Request::MemberUpdate(u)) => {
            update_peer_urls(batch, u).map(|()| AppliedKind::Membership)
        }
        Some(Request::Alarm(a)) => batch.alarm(&a).map(AppliedKind::Alarm),
        Some(Request::LeaseGrant(g)) => batch.lease_grant(g.id, g.ttl).map(|()| {
            lessor.granted(g.id, g.ttl);
            AppliedKind::LeaseGrant {
                id: g.id,
                ttl: g.ttl,
            }
        }),
        Some(Request::LeaseRevoke(r)) => batch.lease_revoke(r.id).map(|resp| {
            lessor.revoked(r.id);
            AppliedKind::LeaseRevoke(resp)
        }),
        Some(Request::LeaseKeepAlive(k)) => match batch.lease_ttl(k.id) {
            Ok(Some(ttl)) => {
                lessor.renew(k.id);
                Ok(AppliedKind::LeaseKeepAlive { ttl })
            }
            Ok(None) => Err(KvError::LeaseNotFound),
            Err(e) => Err(e),
        },
        Some(Request::Auth(change)) => batch.auth_change(change).map(|()| AppliedKind::Auth),
        None => Ok(AppliedKind::Nothing),
    }
}

pub(super) fn update_peer_urls(
    batch: &mut ApplyBatch<'_>,
    u: crate::proto::meshpb::MemberUpdate,
) -> Result<(), KvError> {
    // The API checked that the member exists; a removal in between makes this a no-op.
    let Some(mut m) = batch.member(u.id)? else {
        return Ok(());
    };
    m.peer_urls = u.peer_urls;
    batch.put_member(&m)
}

pub(super) fn update_attributes(
    batch: &mut ApplyBatch<'_>,
    a: crate::proto::meshpb::MemberAttributes,
) -> Result<(), KvError> {
    let Some(mut m) = batch.member(a.id)? else {
        // Attributes of a member that was removed meanwhile.
        return Ok(());
    };
    m.name = a.name;
    m.client_urls = a.client_urls;
    batch.put_member(&m)
}
