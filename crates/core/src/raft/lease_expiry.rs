//! Lease expiry on the leader: the glue between the lessor's deadlines
//! ([`crate::lease::Lessor`]) and Raft, which carries each revocation.

use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, warn};

use crate::kv::KvError;
use crate::lease::Lessor;
use crate::proto::etcdserverpb::LeaseRevokeRequest;
use crate::proto::meshpb::internal_request::Request as Internal;
use crate::raft::{NodeHandle, ProposeError};

/// The expiry task: every `interval`, while this member leads, revoke expired leases
/// through Raft. Runs until aborted.
pub async fn run(lessor: Arc<Lessor>, node: NodeHandle, interval: Duration) {
    let me = node.status.member_id;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        if node.status.leader() != me {
            lessor.demote();
            continue;
        }
        lessor.promote(node.status.term());
        for id in lessor.take_expired() {
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
