//! Lease expiry on the leader: the glue between the lessor's deadlines
//! ([`crate::lease::Lessor`]) and Raft, which carries each revocation.

use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, warn};

use crate::kv::KvError;
use crate::lease::Lessor;
use crate::proto::etcdserverpb::LeaseRevokeRequest;
use crate::proto::meshpb::internal_request::Request as Internal;
use crate::raft::{NodeHandle, NodeStatus, ProposeError};

/// One pass of the expiry rule: on the leader, the expired leases whose revoke is
/// not already in flight, in ID order (marked in flight now); elsewhere none, and the
/// lessor is told it does not lead.
pub(crate) fn to_revoke(lessor: &Lessor, status: &NodeStatus) -> Vec<i64> {
    if status.leader() != status.member_id {
        lessor.demote();
        return Vec::new();
    }
    lessor.promote(status.term());
    let mut expired = lessor.take_expired();
    expired.sort_unstable();
    expired
}

/// The expiry task: every `interval`, while this member leads, revoke expired leases
/// through Raft. Runs until aborted.
pub async fn run(lessor: Arc<Lessor>, node: NodeHandle, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        for id in to_revoke(&lessor, &node.status) {
            debug!(lease = format_args!("{id:x}"), "lease expired");
            let node = node.clone();
            tokio::spawn(async move {
                let req = Internal::LeaseRevoke(LeaseRevokeRequest { id });
                match node.propose(req).await {
                    Ok(_) | Err(ProposeError::Kv(KvError::LeaseNotFound)) => {}
                    // Retried after REVOKE_RETRY while still leader.
                    Err(e) => warn!(
                        lease = format_args!("{id:x}"),
                        "revoking expired lease: {e}"
                    ),
                }
            });
        }
    }
}
