//! Lock clients in the simulation. Each runs etcd's lock recipe the way meshd's Lock
//! service does (`api::concurrency`): a contender key under the lock's prefix,
//! attached to the client's lease and created by the same txn; a wait, on the
//! member's own state, until every older contender is gone; a check that the key is
//! still the one created. The client keeps its lease alive while it waits and holds.
//!
//! A client holds the lock from the moment its acquisition would be answered until
//! it sends its unlock, or until its lease may have expired: the TTL, less 1 % for
//! clock drift, from the send time of the last keep-alive answered in time. Some
//! clients die holding it: their key goes with their lease. The check: no two
//! clients' holds overlap in simulated time.

use tokio::sync::oneshot;

use super::{
    lease_deadline, poll_keepalive_answer, Answer, KeepAlive, KeepAliveOutcome, World,
    OP_TIMEOUT_MS,
};
use crate::api::concurrency::{
    contender_key, create_or_get_request, held_request, older_contender_request, still_created_at,
};
use crate::kv::{Applied, AppliedKind};
use crate::proto::etcdserverpb as pb;
use crate::proto::meshpb::internal_request::Request;

/// The lock every client contends for.
const LOCK: &[u8] = b"sim-lock";
/// A contender gives up waiting after this long (and deletes its key, as the Lock
/// service does for a caller that went away).
const WAIT_MS: u64 = 5_000;

/// One hold: the client, from and until when (simulated ms).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Hold {
    pub client: usize,
    pub from: u64,
    pub until: u64,
}

#[derive(Default)]
pub(super) struct LockClient {
    stage: Stage,
    /// The client's lease: its ID, TTL, and the time from which its TTL surely runs.
    lease: Option<(i64, u64, u64)>,
    keepalive: Option<KeepAlive>,
}

#[derive(Default)]
enum Stage {
    #[default]
    Idle,
    Granting {
        rx: Answer,
        invoke: u64,
    },
    Creating {
        rx: Answer,
        member: usize,
        key: Vec<u8>,
        invoke: u64,
    },
    Waiting {
        member: usize,
        key: Vec<u8>,
        rev: i64,
        since: u64,
        /// The member's revision at the last look (the service looks again when it
        /// changes).
        seen: i64,
    },
    Held {
        key: Vec<u8>,
        since: u64,
        release_at: u64,
    },
    /// The unlock sent: the next lock with this lease waits for its answer, or it
    /// could find its own key still there and be deleted behind it.
    Releasing {
        rx: Answer,
        invoke: u64,
    },
}

/// Whether two holds by different clients overlap.
pub(super) fn overlap(a: &Hold, b: &Hold) -> bool {
    a.client != b.client && a.from < b.until && b.from < a.until
}

impl LockClient {
    /// Until when the client may believe its lease alive.
    fn deadline(&self) -> Option<u64> {
        self.lease.map(|(_, ttl, from)| lease_deadline(from, ttl))
    }
}

impl World {
    /// One step of every lock client.
    pub(super) fn locks_step(&mut self) {
        for c in 0..self.lockers.len() {
            self.poll_lock_keepalive(c);
            let stage = std::mem::take(&mut self.lockers[c].stage);
            self.lockers[c].stage = self.lock_stage(c, stage);
        }
    }

    fn poll_lock_keepalive(&mut self, c: usize) {
        let l = &mut self.lockers[c];
        let Some(ka) = l.keepalive.take() else {
            return;
        };
        let deadline = l.deadline().unwrap_or(0);
        match poll_keepalive_answer(self.now, ka, deadline) {
            KeepAliveOutcome::Waiting(ka) => l.keepalive = Some(ka),
            KeepAliveOutcome::Renewed(sent) => {
                if let Some((_, _, from)) = l.lease.as_mut() {
                    *from = (*from).max(sent);
                }
                self.trace.add(&[0x10c4, c as u64, sent]);
            }
            KeepAliveOutcome::Gone => {}
        }
    }

    fn keep_lock_lease_alive(&mut self, c: usize) {
        let Some((id, _, _)) = self.lockers[c].lease else {
            return;
        };
        if self.lockers[c].keepalive.is_some() || !self.rng.chance(3) {
            return;
        }
        if let Some(m) = self.random_up() {
            let rx = self.propose_on(m, Request::LeaseKeepAlive(pb::LeaseKeepAliveRequest { id }));
            self.lockers[c].keepalive = Some((self.now, rx));
        }
    }

    /// The hold of client `c` ends at `until`: recorded, and checked against every
    /// other hold.
    fn end_hold(&mut self, c: usize, since: u64, until: u64) {
        let hold = Hold {
            client: c,
            from: since,
            until,
        };
        self.trace.add(&[0x10c5, c as u64, since, until]);
        if let Some(other) = self.holds.iter().find(|h| overlap(h, &hold)).copied() {
            self.fail(format!(
                "two lock holders at once: client {} from {} ms to {} ms, client {} from \
                 {} ms to {} ms",
                other.client, other.from, other.until, c, since, until
            ));
        }
        self.holds.push(hold);
        self.report.locks += 1;
    }

    /// Gives up the current lease: the client starts over with a new one.
    fn drop_lease(&mut self, c: usize) -> Stage {
        self.lockers[c].lease = None;
        self.lockers[c].keepalive = None;
        Stage::Idle
    }

    fn lock_stage(&mut self, c: usize, stage: Stage) -> Stage {
        use oneshot::error::TryRecvError::Empty;
        match stage {
            Stage::Idle => {
                if self.quiet || !self.rng.chance(10) {
                    return Stage::Idle;
                }
                let Some(m) = self.random_up() else {
                    return Stage::Idle;
                };
                match self.lockers[c].lease {
                    None => {
                        self.next_lease += 1;
                        let id = self.next_lease;
                        let ttl = 1 + self.rng.below(2) as i64;
                        let rx = self
                            .propose_on(m, Request::LeaseGrant(pb::LeaseGrantRequest { id, ttl }));
                        Stage::Granting {
                            rx,
                            invoke: self.now,
                        }
                    }
                    Some((id, _, _)) => self.create_contender(c, m, id),
                }
            }
            Stage::Granting { mut rx, invoke } => match rx.try_recv() {
                Err(Empty) if self.now < invoke + OP_TIMEOUT_MS => Stage::Granting { rx, invoke },
                Ok(Ok(Applied {
                    kind: AppliedKind::LeaseGrant { id, ttl },
                    ..
                })) => {
                    self.lockers[c].lease = Some((id, ttl as u64 * 1000, invoke));
                    Stage::Idle
                }
                _ => Stage::Idle,
            },
            Stage::Creating {
                mut rx,
                member,
                key,
                invoke,
            } => {
                self.keep_lock_lease_alive(c);
                match rx.try_recv() {
                    Err(Empty) if self.now < invoke + OP_TIMEOUT_MS => Stage::Creating {
                        rx,
                        member,
                        key,
                        invoke,
                    },
                    Ok(Ok(Applied {
                        kind: AppliedKind::Txn(resp),
                        revision,
                        ..
                    })) => {
                        // Created now, or an earlier attempt's key (as `create_or_get`).
                        let rev = if resp.succeeded {
                            Some(revision)
                        } else {
                            contender_revision(&resp)
                        };
                        match rev {
                            Some(rev) => Stage::Waiting {
                                member,
                                key,
                                rev,
                                since: self.now,
                                seen: 0,
                            },
                            None => Stage::Idle,
                        }
                    }
                    // Unknown outcome: the key may exist; the lease takes it away.
                    _ => self.drop_lease(c),
                }
            }
            Stage::Waiting {
                member,
                key,
                rev,
                since,
                seen,
            } => {
                self.keep_lock_lease_alive(c);
                if self.lockers[c].deadline().is_none_or(|d| self.now >= d) {
                    return self.drop_lease(c);
                }
                let Some(node) = self.members[member].node.as_ref() else {
                    // The member answering the Lock call went down: the call fails.
                    return self.drop_lease(c);
                };
                if self.now >= since + WAIT_MS {
                    let del = Request::DeleteRange(pb::DeleteRangeRequest {
                        key,
                        ..Default::default()
                    });
                    drop(self.propose_on(member, del));
                    return self.drop_lease(c);
                }
                let current = node.kv.current_revision();
                if current == seen {
                    return Stage::Waiting {
                        member,
                        key,
                        rev,
                        since,
                        seen,
                    };
                }
                let older = node.kv.range(&older_contender_request(LOCK, rev));
                match older {
                    Ok(r) if r.kvs.is_empty() => match node.kv.range(&held_request(&key)) {
                        Ok(r) if still_created_at(&r, rev) => {
                            self.trace.add(&[0x10c3, c as u64, rev as u64]);
                            let release_at = self.now + 50 + self.rng.below(800);
                            Stage::Held {
                                key,
                                since: self.now,
                                release_at,
                            }
                        }
                        // The lease expired while waiting (etcd's ErrSessionExpired).
                        _ => self.drop_lease(c),
                    },
                    Ok(_) => Stage::Waiting {
                        member,
                        key,
                        rev,
                        since,
                        seen: current,
                    },
                    Err(_) => self.drop_lease(c),
                }
            }
            Stage::Held {
                key,
                since,
                release_at,
            } => {
                self.keep_lock_lease_alive(c);
                let deadline = self.lockers[c].deadline().unwrap_or(since);
                if deadline <= self.now {
                    // Its lease may have expired: the lock may be someone else's.
                    self.end_hold(c, since, deadline);
                    return self.drop_lease(c);
                }
                if self.now < release_at && !self.quiet {
                    return Stage::Held {
                        key,
                        since,
                        release_at,
                    };
                }
                self.end_hold(c, since, self.now);
                if self.rng.chance(200) {
                    // The client dies holding the lock: its lease expires and takes
                    // the key with it.
                    return self.drop_lease(c);
                }
                let Some(m) = self.random_up() else {
                    return self.drop_lease(c);
                };
                let del = Request::DeleteRange(pb::DeleteRangeRequest {
                    key,
                    ..Default::default()
                });
                Stage::Releasing {
                    rx: self.propose_on(m, del),
                    invoke: self.now,
                }
            }
            Stage::Releasing { mut rx, invoke } => {
                self.keep_lock_lease_alive(c);
                match rx.try_recv() {
                    Err(Empty) if self.now < invoke + OP_TIMEOUT_MS => {
                        Stage::Releasing { rx, invoke }
                    }
                    Ok(Ok(_)) => Stage::Idle,
                    // Unknown: the key may still go; the next lock takes a new lease.
                    _ => self.drop_lease(c),
                }
            }
        }
    }

    fn create_contender(&mut self, c: usize, member: usize, lease: i64) -> Stage {
        let key = contender_key(LOCK, lease);
        let txn = create_or_get_request(&key, format!("client-{c}").as_bytes(), lease);
        Stage::Creating {
            rx: self.propose_on(member, Request::Txn(txn)),
            member,
            key,
            invoke: self.now,
        }
    }
}

/// The create revision of the contender key a failed create-or-get read.
fn contender_revision(resp: &pb::TxnResponse) -> Option<i64> {
    match resp.responses.first()?.response.as_ref()? {
        pb::response_op::Response::ResponseRange(r) => r.kvs.first().map(|kv| kv.create_revision),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_overlap_only_across_clients_and_only_when_they_intersect() {
        let a = Hold {
            client: 0,
            from: 10,
            until: 20,
        };
        let b = Hold {
            client: 1,
            from: 20,
            until: 30,
        };
        assert!(!overlap(&a, &b), "one ends as the other starts");
        assert!(overlap(&a, &Hold { from: 19, ..b }));
        assert!(
            !overlap(&a, &Hold { client: 0, ..a }),
            "a client with itself"
        );
    }
}
