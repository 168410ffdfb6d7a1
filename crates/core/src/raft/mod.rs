//! The Raft layer: a driver thread around raft-rs's `RawNode` and the handle the API
//! uses to reach it.
//!
//! Owns the Ready loop (persist, send, apply), proposal batching and routing of results
//! back to callers, ReadIndex for linearizable reads, snapshots and log compaction. It
//! calls [`crate::storage`] for the log and [`crate::kv`] to apply; peers are reached
//! through a [`transport::Transport`].

pub mod conf_rules;
mod driver;
pub mod lease_expiry;
mod log_store;
pub mod logging;
pub mod mesh_transport;
pub mod snapshot_stream;
pub mod transport;
pub mod validate;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::Duration;

use raft::prelude::Message;
use tokio::sync::oneshot;

pub use driver::{spawn_driver, DriverConfig, DriverError, LOG_MAX_BYTES};
pub(crate) use driver::{Driver, DriverParts, Seeds};

use crate::kv::KvError;
/// The state machine's result of one replicated request, as proposers receive it.
pub use crate::kv::{Applied, AppliedKind};
use crate::metrics::Histogram;
use crate::proto::meshpb::internal_request::Request;
use crate::proto::meshpb::{MemberRecord, RequestAuth};
pub use log_store::RaftLog;

/// The `host:port` of a peer URL, which may carry a scheme and a trailing slash (as
/// etcd's do); the transport dials `host:port`, and members store it so.
pub fn peer_hostport(url: &str) -> &str {
    url.split_once("://")
        .map_or(url, |(_, rest)| rest)
        .trim_end_matches('/')
}

/// What the driver thread is told.
pub enum DriverMsg {
    /// Replicate a request; the reply comes when this member applies it.
    Propose {
        request: Request,
        /// The user and auth revision a client write was checked with.
        auth: Option<RequestAuth>,
        reply: oneshot::Sender<Result<Applied, ProposeError>>,
    },
    /// Confirm leadership and wait until the local state has caught up with the
    /// leader's commit index at that moment.
    ReadIndex {
        reply: oneshot::Sender<Result<(), ProposeError>>,
    },
    /// Wait until this member applied every entry it knows to be committed, with no
    /// network round (etcd's waitAppliedIndex): a leader answering from state kept
    /// outside the log (its lessor) then reflects every write a follower may already
    /// have acknowledged.
    CatchUp {
        reply: oneshot::Sender<Result<(), ProposeError>>,
    },
    /// Change the voter/learner set (leader only; one change at a time).
    ChangeMembers {
        change: MemberChange,
        reply: oneshot::Sender<Result<Applied, ProposeError>>,
    },
    /// The leader's view of every member's replication progress (empty on a follower).
    Progress {
        reply: oneshot::Sender<Result<Vec<PeerProgress>, ProposeError>>,
    },
    /// A message from a peer.
    Raft(Box<Message>),
    /// A peer could not be reached.
    Unreachable(u64),
    /// A snapshot sent to a peer was delivered (true) or lost (false).
    SnapshotStatus(u64, bool),
    /// Hand leadership to `target` (a voter); the reply comes once this member sees
    /// `target` as leader, or the transfer failed or timed out.
    TransferLeader {
        target: u64,
        reply: oneshot::Sender<Result<(), ProposeError>>,
    },
    /// Rewrite the database file without its free pages, between two Readies (a short
    /// stop-the-world pause: the driver is the only writer). Replies the file size
    /// before and after.
    Defragment {
        reply: oneshot::Sender<Result<(u64, u64), ProposeError>>,
    },
    /// Stop after the current Ready.
    Shutdown,
    /// Panic (test-only fault injection).
    InjectedPanic,
    /// Alter the stored record of a revision (test-only fault injection).
    InjectCorruption {
        revision: i64,
        reply: oneshot::Sender<Result<(), ProposeError>>,
    },
    /// The state machine was found corrupt outside the driver (serving a read,
    /// hashing): stop applying and raise the CORRUPT alarm.
    Corrupt(String),
}
/// Replication progress of one member, as the leader sees it.
#[derive(Clone, Debug)]
pub struct PeerProgress {
    pub id: u64,
    pub learner: bool,
    /// Highest log index known to be replicated on the member.
    pub matched: u64,
    /// The leader heard from it within the last election timeout.
    pub recent_active: bool,
    /// The leader's last log index when this was taken.
    pub leader_last_index: u64,
}

/// A Raft configuration change, as the Cluster API asks for it.
#[derive(Clone, Debug)]
pub enum MemberChange {
    /// Add a member (its record carries the ID and peer URLs) as a voter or learner.
    Add { member: MemberRecord, learner: bool },
    /// Make a caught-up learner a voter.
    Promote(u64),
    /// Remove a member (voter or learner).
    Remove(u64),
}

/// Why a proposal, read or driver request did not complete. `NoLeader`, `Timeout*`,
/// `LeaderChanged` and `Stopped` are retryable: the request may be sent again (for
/// `Timeout*`, a write may or may not have been applied). The others are answers.
#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    /// No leader is known (an election is in progress or quorum is lost).
    #[error("etcdserver: no leader")]
    NoLeader,
    /// The request did not complete in time.
    #[error("etcdserver: request timed out")]
    Timeout,
    /// The request did not complete in time and the leader changed meanwhile.
    #[error("etcdserver: request timed out, possibly due to previous leader failure")]
    TimeoutLeaderFail,
    /// The entry was overwritten by a new leader: it was not applied.
    #[error("etcdserver: leader changed")]
    LeaderChanged,
    /// MoveLeader to a member that is not a voter.
    #[error("etcdserver: bad leader transferee")]
    BadLeaderTransferee,
    /// The target did not become leader in time.
    #[error("etcdserver: request timed out, leader transfer took too long")]
    LeaderTransferTimeout,
    /// Defragmenting failed (the database is unchanged and still in use).
    #[error("etcdserver: defragment failed: {0}")]
    Defragment(String),
    /// The member is shutting down.
    #[error("etcdserver: server stopped")]
    Stopped,
    /// Only the leader can do this (MoveLeader, membership changes).
    #[error("etcdserver: not leader")]
    NotLeader,
    /// A membership change would leave fewer started voters than a quorum.
    #[error("etcdserver: re-configuration failed due to not enough started members")]
    NotEnoughStarted,
    /// A previous membership change has not been applied yet.
    #[error("etcdserver: unhealthy cluster")]
    ChangeInProgress,
    /// The learner has not caught up with the leader.
    #[error("etcdserver: can only promote a learner member which is in sync with leader")]
    LearnerNotReady,
    /// The change contradicts the current membership (checked where it applies).
    #[error("{0}")]
    Membership(&'static str),
    /// The state machine refused the request (deterministically, on every member).
    #[error(transparent)]
    Kv(#[from] KvError),
}

/// Raft facts the API reports in headers and Status, published by the driver.
#[derive(Default)]
pub struct NodeStatus {
    pub member_id: u64,
    pub cluster_id: u64,
    leader: AtomicU64,
    term: AtomicU64,
    commit: AtomicU64,
    applied: AtomicU64,
    leader_changes: AtomicU64,
    is_learner: AtomicBool,
    removed: AtomicBool,
    stopped: AtomicBool,
    /// Woken when the driver thread exits.
    stopped_notify: tokio::sync::Notify,
    /// A write to the database failed and the driver is out of Raft until it has
    /// reopened the database from disk.
    storage_failed: AtomicBool,
    /// Why this member's state machine is corrupt, once it found out (a record failed
    /// its checksum while applying or hashing); it then applies and serves nothing.
    corrupt: std::sync::Mutex<Option<String>>,
    corrupt_flag: AtomicBool,
    /// A CORRUPT alarm naming this member is active in the cluster.
    corrupt_alarm: AtomicBool,
    /// Turns of the driver's loop (at least one per tick while it runs): the systemd
    /// watchdog is fed only while this moves.
    driver_turns: AtomicU64,
    /// Instruments the driver and handle update, read by `/metrics`.
    pub metrics: RaftMetrics,
}

/// Counters and latencies of the Raft layer (see [`crate::metrics`]).
#[derive(Default)]
pub struct RaftMetrics {
    /// Each durable commit of a Ready's entries and hard state (the WAL fsync).
    pub log_commit: Histogram,
    /// Each commit of applied entries to the keyspace (the backend commit).
    pub backend_commit: Histogram,
    /// Applying one batch of committed entries, commit included.
    pub apply: Histogram,
    /// Proposals that did not apply: no leader, leader changed, timed out, stopped.
    pub proposals_failed: AtomicU64,
    /// Proposals from this member waiting to be applied.
    pub proposals_pending: AtomicU64,
    /// Raft messages from peers dropped before raft-rs saw them, by
    /// [`validate::Refusal`] (in the order of [`validate::Refusal::ALL`]).
    pub peer_messages_refused: [AtomicU64; validate::Refusal::ALL.len()],
}

impl RaftMetrics {
    pub fn count_refusal(&self, r: validate::Refusal) {
        if let Some(i) = validate::Refusal::ALL.iter().position(|x| *x == r) {
            self.peer_messages_refused[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl NodeStatus {
    pub fn new(member_id: u64, cluster_id: u64) -> NodeStatus {
        NodeStatus {
            member_id,
            cluster_id,
            ..Default::default()
        }
    }
    pub fn leader(&self) -> u64 {
        self.leader.load(Ordering::Acquire)
    }
    pub fn term(&self) -> u64 {
        self.term.load(Ordering::Acquire)
    }
    pub fn commit_index(&self) -> u64 {
        self.commit.load(Ordering::Acquire)
    }
    pub fn applied_index(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }
    pub fn leader_changes(&self) -> u64 {
        self.leader_changes.load(Ordering::Acquire)
    }
    pub fn is_learner(&self) -> bool {
        self.is_learner.load(Ordering::Acquire)
    }
    /// Records that this member was removed (told by the leader after the fact).
    pub fn mark_removed(&self) {
        self.removed.store(true, Ordering::Release);
    }
    /// True once this member applied its own removal from the cluster.
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }
    /// True while the member is out of Raft after a failed write (a full disk),
    /// waiting to reopen its database: writes are refused, serializable reads served.
    pub fn storage_failed(&self) -> bool {
        self.storage_failed.load(Ordering::Acquire)
    }
    /// Records that this member's state machine is corrupt (the first reason stays).
    pub fn mark_corrupt(&self, why: &str) {
        let mut c = self.corrupt.lock().unwrap_or_else(|p| p.into_inner());
        if c.is_none() {
            *c = Some(why.to_string());
        }
        self.corrupt_flag.store(true, Ordering::Release);
    }
    /// Sets whether an active CORRUPT alarm names this member.
    pub fn set_corrupt_alarm(&self, active: bool) {
        self.corrupt_alarm.store(active, Ordering::Release);
    }
    /// True when this member must not serve data: it found its state machine corrupt,
    /// or the cluster raised a CORRUPT alarm naming it.
    pub fn is_corrupt(&self) -> bool {
        self.corrupt_flag.load(Ordering::Acquire) || self.corrupt_alarm.load(Ordering::Acquire)
    }
    /// Why this member is corrupt, when it is.
    pub fn corruption(&self) -> Option<String> {
        let local = self
            .corrupt
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        local.or_else(|| {
            self.corrupt_alarm
                .load(Ordering::Acquire)
                .then(|| "a CORRUPT alarm names this member".to_string())
        })
    }
    /// Records one turn of the driver's loop.
    pub fn driver_turned(&self) {
        self.driver_turns.fetch_add(1, Ordering::Relaxed);
    }
    /// How many turns the driver's loop has made (see [`NodeStatus::driver_turned`]).
    pub fn driver_turns(&self) -> u64 {
        self.driver_turns.load(Ordering::Relaxed)
    }
    /// False once the driver thread has exited (shutdown or a fatal storage error).
    pub fn is_running(&self) -> bool {
        !self.stopped.load(Ordering::Acquire)
    }
    /// Called by the driver thread as it exits.
    pub(crate) fn mark_stopped(&self) {
        self.stopped.store(true, Ordering::Release);
        self.stopped_notify.notify_waiters();
    }
    /// Resolves once the driver thread has exited.
    pub async fn wait_stopped(&self) {
        loop {
            let notified = self.stopped_notify.notified();
            tokio::pin!(notified);
            // Registered before the check, so an exit in between still wakes us.
            notified.as_mut().enable();
            if !self.is_running() {
                return;
            }
            notified.await;
        }
    }
}

/// How the API reaches the driver. Cheap to clone.
#[derive(Clone)]
pub struct NodeHandle {
    tx: std_mpsc::Sender<DriverMsg>,
    pub status: Arc<NodeStatus>,
    pub log: RaftLog,
    request_timeout: Duration,
}

impl NodeHandle {
    pub fn new(
        tx: std_mpsc::Sender<DriverMsg>,
        status: Arc<NodeStatus>,
        log: RaftLog,
        request_timeout: Duration,
    ) -> NodeHandle {
        NodeHandle {
            tx,
            status,
            log,
            request_timeout,
        }
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, ProposeError>>) -> DriverMsg,
    ) -> Result<T, ProposeError> {
        let before = self.status.leader_changes();
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).map_err(|_| ProposeError::Stopped)?;
        match tokio::time::timeout(self.request_timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(ProposeError::Stopped),
            Err(_) if self.status.leader_changes() != before => {
                Err(ProposeError::TimeoutLeaderFail)
            }
            Err(_) if self.status.leader() == 0 => Err(ProposeError::NoLeader),
            Err(_) => Err(ProposeError::Timeout),
        }
    }

    /// Replicates `request` and returns what applying it produced on this member.
    pub async fn propose(&self, request: Request) -> Result<Applied, ProposeError> {
        self.propose_as(request, None).await
    }

    /// [`NodeHandle::propose`] for a client write checked for a user: every member
    /// checks the user's permission again when applying it (see [`RequestAuth`]).
    pub async fn propose_as(
        &self,
        request: Request,
        auth: Option<RequestAuth>,
    ) -> Result<Applied, ProposeError> {
        let r = self
            .call(|reply| DriverMsg::Propose {
                request,
                auth,
                reply,
            })
            .await;
        if matches!(&r, Err(e) if !matches!(e, ProposeError::Kv(_))) {
            self.status
                .metrics
                .proposals_failed
                .fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Changes the voter/learner set; answered once this member applied the change.
    pub async fn change_members(&self, change: MemberChange) -> Result<Applied, ProposeError> {
        self.call(|reply| DriverMsg::ChangeMembers { change, reply })
            .await
    }

    /// The leader's view of replication progress (empty when not the leader).
    pub async fn progress(&self) -> Result<Vec<PeerProgress>, ProposeError> {
        self.call(|reply| DriverMsg::Progress { reply }).await
    }

    /// Returns once this member's state reflects every write acknowledged before the
    /// call (ReadIndex): a read served after it is linearizable.
    pub async fn read_index(&self) -> Result<(), ProposeError> {
        self.call(|reply| DriverMsg::ReadIndex { reply }).await
    }

    /// Returns once this member applied every entry it knew to be committed at the
    /// call (see [`DriverMsg::CatchUp`]).
    pub async fn catch_up(&self) -> Result<(), ProposeError> {
        self.call(|reply| DriverMsg::CatchUp { reply }).await
    }

    /// Transfers leadership to `target`; only the leader may (etcd's MoveLeader).
    pub async fn move_leader(&self, target: u64) -> Result<(), ProposeError> {
        self.call(|reply| DriverMsg::TransferLeader { target, reply })
            .await
    }

    /// Compacts the database file; returns its size before and after.
    pub async fn defragment(&self) -> Result<(u64, u64), ProposeError> {
        self.call(|reply| DriverMsg::Defragment { reply }).await
    }

    /// Reports that this member's state machine is corrupt: it stops serving data at
    /// once, and the driver stops applying and raises the CORRUPT alarm.
    pub fn report_corrupt(&self, why: &str) {
        if !self.status.is_corrupt() {
            self.status.mark_corrupt(why);
            let _ = self.tx.send(DriverMsg::Corrupt(why.to_string()));
        }
    }

    /// Alters the stored record of `revision` from the driver thread (the test-only
    /// fault of `meshpb.FaultInjection`).
    pub async fn inject_corruption(&self, revision: i64) -> Result<(), ProposeError> {
        self.call(|reply| DriverMsg::InjectCorruption { revision, reply })
            .await
    }

    /// Makes the driver thread panic (the test-only fault of `meshpb.FaultInjection`).
    pub fn inject_panic(&self) {
        let _ = self.tx.send(DriverMsg::InjectedPanic);
    }

    /// Asks the driver to stop.
    pub fn shutdown(&self) {
        let _ = self.tx.send(DriverMsg::Shutdown);
    }
}
