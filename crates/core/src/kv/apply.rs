//! What a replicated request does to the state machine, as etcd's apply layer: the
//! apply-time permission check, then the request's change to the batch. The outcome
//! is the proposer's answer and the one effect the Raft driver carries out beside it
//! (the lessor's deadlines, the transport's peer set), so the state machine decides
//! and the driver only acts.

use super::{pb, ApplyBatch, KvError};
use crate::proto::meshpb::{internal_request::Request, RequestAuth};

/// A replicated request's result on the state machine.
#[derive(Debug)]
pub struct Applied {
    /// Store revision right after this request applied.
    pub revision: i64,
    pub kind: AppliedKind,
}

#[derive(Debug)]
pub enum AppliedKind {
    Put(pb::PutResponse),
    DeleteRange(pb::DeleteRangeResponse),
    Txn(pb::TxnResponse),
    Compaction,
    MemberAttributes,
    /// A configuration change or member update applied.
    Membership,
    /// The alarms an AlarmRequest raised or cleared.
    Alarm(Vec<pb::AlarmMember>),
    /// A lease was granted with this ID and TTL.
    LeaseGrant {
        id: i64,
        ttl: i64,
    },
    LeaseRevoke(pb::LeaseRevokeResponse),
    /// A replicated keep-alive refreshed a lease whose granted TTL is `ttl`.
    LeaseKeepAlive {
        ttl: i64,
    },
    /// An auth store change (or a token) applied.
    Auth,
    Nothing,
}

/// What the Raft driver does outside the state machine once a request applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    None,
    /// A lease now exists: its deadline starts (on the leader, which expires it).
    LeaseGranted {
        id: i64,
        ttl: i64,
    },
    /// A lease is gone: forget its deadline.
    LeaseRevoked(i64),
    /// A lease was kept alive: its deadline starts over.
    LeaseRenewed(i64),
    /// The member table changed: the transport's peer addresses follow it.
    MembersChanged,
}

/// One request's outcome: the proposer's answer (a refusal is an answer like any
/// other, the same on every member) and the effect to carry out.
#[derive(Debug)]
pub struct Outcome {
    pub result: Result<Applied, KvError>,
    pub effect: Effect,
}

impl ApplyBatch<'_> {
    /// Applies one replicated request. `Err` only when the store failed (the disk, or
    /// a record that fails its checksum): the entry cannot be applied as the other
    /// members applied it, so the caller must stop applying.
    pub fn apply_request(
        &mut self,
        auth: Option<&RequestAuth>,
        request: Option<Request>,
    ) -> Result<Outcome, KvError> {
        let run = match self.permitted(auth, &request) {
            Err(e) => Err(e),
            Ok(()) => self.execute(request),
        };
        match run {
            Err(e) if e.is_fatal() => Err(e),
            Err(e) => Ok(Outcome {
                result: Err(e),
                effect: Effect::None,
            }),
            Ok((kind, effect)) => Ok(Outcome {
                result: Ok(Applied {
                    revision: self.revision(),
                    kind,
                }),
                effect,
            }),
        }
    }

    /// The apply-time permission check of a client write, as etcd makes it: with the
    /// auth store as of this entry (the same on every member), refused unapplied if
    /// the store changed since the proposer's check, or if the user may not do it now.
    fn permitted(
        &mut self,
        auth: Option<&RequestAuth>,
        request: &Option<Request>,
    ) -> Result<(), KvError> {
        let Some(a) = auth else {
            return Ok(());
        };
        let state = self.auth_now()?;
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

    fn execute(&mut self, request: Option<Request>) -> Result<(AppliedKind, Effect), KvError> {
        let plain = |kind| (kind, Effect::None);
        Ok(match request {
            Some(Request::Put(r)) => plain(AppliedKind::Put(self.put(&r)?)),
            Some(Request::DeleteRange(r)) => {
                plain(AppliedKind::DeleteRange(self.delete_range(&r)?))
            }
            Some(Request::Txn(r)) => plain(AppliedKind::Txn(self.txn(&r)?)),
            Some(Request::Compaction(r)) => {
                self.compact(r.revision)?;
                plain(AppliedKind::Compaction)
            }
            Some(Request::MemberAttributes(a)) => {
                self.update_member(a.id, |m| {
                    m.name = a.name;
                    m.client_urls = a.client_urls;
                })?;
                plain(AppliedKind::MemberAttributes)
            }
            Some(Request::MemberUpdate(u)) => {
                self.update_member(u.id, |m| m.peer_urls = u.peer_urls)?;
                (AppliedKind::Membership, Effect::MembersChanged)
            }
            Some(Request::Alarm(a)) => plain(AppliedKind::Alarm(self.alarm(&a)?)),
            Some(Request::LeaseGrant(g)) => {
                self.lease_grant(g.id, g.ttl)?;
                (
                    AppliedKind::LeaseGrant {
                        id: g.id,
                        ttl: g.ttl,
                    },
                    Effect::LeaseGranted {
                        id: g.id,
                        ttl: g.ttl,
                    },
                )
            }
            Some(Request::LeaseRevoke(r)) => (
                AppliedKind::LeaseRevoke(self.lease_revoke(r.id)?),
                Effect::LeaseRevoked(r.id),
            ),
            Some(Request::LeaseKeepAlive(k)) => match self.lease_ttl(k.id)? {
                Some(ttl) => (
                    AppliedKind::LeaseKeepAlive { ttl },
                    Effect::LeaseRenewed(k.id),
                ),
                None => return Err(KvError::LeaseNotFound),
            },
            Some(Request::Auth(change)) => {
                self.auth_change(change)?;
                plain(AppliedKind::Auth)
            }
            None => plain(AppliedKind::Nothing),
        })
    }

    /// Changes a member's record; a member removed meanwhile (the API checked that
    /// it existed) makes this a no-op.
    fn update_member(
        &mut self,
        id: u64,
        change: impl FnOnce(&mut crate::proto::meshpb::MemberRecord),
    ) -> Result<(), KvError> {
        let Some(mut m) = self.member(id)? else {
            return Ok(());
        };
        change(&mut m);
        self.put_member(&m)
    }
}
