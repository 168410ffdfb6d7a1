//! The driver thread: owns the `RawNode`, turns client calls into proposals and reads,
//! and runs the Ready loop. This file holds the loop itself (messages, ticks, Ready,
//! the keyspace's commit policy, status); by concern, `proposals` (IDs, the parked
//! queue, membership changes), `reads` (ReadIndex), `transfer` (leader transfer),
//! `apply` (entries, snapshots, conf changes) and `recovery` (after a failed write).
//!
//! The thread is the only writer of the database: it appends the log, applies entries
//! and installs snapshots, so the state machine, its applied index and the conf state
//! always describe the same point when raft-rs asks for a snapshot.

use std::collections::{BTreeMap, HashMap};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::{Duration, Instant};

use prost011::Message as _;
use raft::prelude::{ConfChange, ConfChangeV2, Entry, EntryType, ReadState, Snapshot};
use raft::{RawNode, ReadOnlyOption, SnapshotStatus, StateRole};
use tokio::sync::oneshot;
use tracing::{error, info, warn};

mod apply;
mod proposals;
mod reads;
mod recovery;
mod transfer;

use apply::*;

use proposals::HeldProposals;
use recovery::REOPEN_BACKOFF_MIN;

use super::transport::Transport;
use super::RaftLog;
use super::{Applied, AppliedKind, DriverMsg, MemberChange, NodeStatus, ProposeError};
use crate::kv::{ApplyBatch, Effect, KvError, KvStore, StoreError};
use crate::lease::Lessor;
use crate::proto::meshpb::{
    internal_request::Request, ConfChangeContext, InternalRequest, MemberRecord, SnapshotRef,
};
use crate::storage::{Db, StorageError};

/// Raft timing and log-retention settings.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    pub member_id: u64,
    /// The member's name: every line the driver logs carries it (a `raft` span).
    pub member_name: String,
    /// Wall-clock length of one logical tick.
    pub tick: Duration,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// Compact the log once this many applied entries are held.
    pub snapshot_count: u64,
    /// Entries kept behind the applied index after compaction, so a slightly slow
    /// follower catches up from the log rather than by snapshot.
    pub catch_up_entries: u64,
    /// Memory the log's entries may take before it is compacted whatever
    /// `snapshot_count` says; it then keeps half of this in applied entries.
    pub log_max_bytes: u64,
    pub max_size_per_msg: u64,
    pub max_inflight_msgs: usize,
    /// Where snapshot files received from the leader are (the only place an installed
    /// snapshot may come from).
    pub snapshot_dir: std::path::PathBuf,
    /// The state machine was found corrupt when it was opened: the driver starts
    /// quarantined (see `Driver::quarantine`).
    pub corrupt_at_start: Option<String>,
    /// A fixed election timeout in ticks instead of raft-rs's random one in
    /// `[election_ticks, 2 × election_ticks)`: the simulator draws it per member from
    /// its seed, since raft-rs draws from a source no seed reaches.
    pub fixed_election_ticks: Option<usize>,
}

/// Why the driver stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The disk failed; the member must not continue.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The store failed while applying (the disk, or data that does not decode).
    #[error("applying committed entries failed: {0}")]
    Apply(StoreError),
    /// The state machine refused a write the driver made itself (a member record, a
    /// restore): the driver's own writes are valid by construction, so this is a bug.
    #[error("the state machine refused the driver's own write: {0}")]
    Refused(KvError),
    /// raft-rs refused the configuration or a step.
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    /// A snapshot from the leader did not decode.
    #[error("snapshot from the leader is undecodable: {0}")]
    BadSnapshot(String),
    /// A stored record failed its checksum while applying: this member's state machine
    /// is corrupt. It stops applying (never skips an entry the others applied).
    #[error("state machine corrupt: {0}")]
    Corrupt(String),
}

/// A failure of the state machine while applying: a corrupt record stops this
/// member's applying for good; any other failure of the store is the disk's.
impl From<KvError> for DriverError {
    fn from(e: KvError) -> DriverError {
        match e {
            KvError::Store(StoreError::Corrupt { table, detail }) => {
                DriverError::Corrupt(format!("{detail} in {table}"))
            }
            KvError::Store(store) => DriverError::Apply(store),
            refused => DriverError::Refused(refused),
        }
    }
}

/// How long defragmenting waits for read transactions already open to finish.
const DEFRAG_WAIT_FOR_READERS: Duration = Duration::from_secs(5);

type Reply<T> = oneshot::Sender<Result<T, ProposeError>>;

/// Starts the driver on its own thread.
// Each argument is a distinct piece the driver owns or shares; a wrapper struct would
// only rename them.
#[allow(clippy::too_many_arguments)]
pub fn spawn_driver(
    cfg: DriverConfig,
    log: RaftLog,
    kv: Arc<KvStore>,
    db: Arc<Db>,
    transport: Arc<dyn Transport>,
    rx: std_mpsc::Receiver<DriverMsg>,
    status: Arc<NodeStatus>,
    lessor: Arc<Lessor>,
) -> Result<std::thread::JoinHandle<Result<(), DriverError>>, DriverError> {
    let parts = DriverParts {
        cfg,
        log,
        kv,
        db,
        transport,
        status,
        lessor,
    };
    let mut d = Driver::new(parts, &Seeds::random())?;
    std::thread::Builder::new()
        .name("raft-driver".into())
        .spawn(move || {
            let span = tracing::info_span!(
                "raft",
                member = %d.cfg.member_name,
                id = format_args!("{:x}", d.cfg.member_id)
            );
            let _entered = span.enter();
            let r = d.run(rx);
            d.status.mark_stopped();
            if let Err(e) = &r {
                error!("raft driver stopped: {e}");
            }
            r
        })
        .map_err(|e| {
            DriverError::Storage(StorageError::Io {
                path: "raft-driver thread".into(),
                source: e,
            })
        })
}

/// What a driver is made of: its settings, the storage it owns and what it shares.
pub(crate) struct DriverParts {
    pub cfg: DriverConfig,
    pub log: RaftLog,
    pub kv: Arc<KvStore>,
    pub db: Arc<Db>,
    pub transport: Arc<dyn Transport>,
    pub status: Arc<NodeStatus>,
    pub lessor: Arc<Lessor>,
}

/// Where a driver's choices that must differ between runs come from: the clock, and
/// the first proposal ID and ReadIndex context. A member draws them at random and reads
/// the system clock; the simulator derives them from its seed and its own clock.
pub(crate) struct Seeds {
    pub clock: crate::Clock,
    pub first_id: u64,
    pub read_seq: u64,
    /// A planted bug for the simulator to catch: entries already applied are handed
    /// to the state machine again at start.
    pub replay_applied: bool,
}

impl Seeds {
    fn random() -> Seeds {
        Seeds {
            clock: crate::system_clock(),
            first_id: first_proposal_id(),
            // Random too: a ReadIndex answer meant for the previous run must not match.
            read_seq: rand::random(),
            replay_applied: false,
        }
    }
}

impl Driver {
    pub(crate) fn new(p: DriverParts, seeds: &Seeds) -> Result<Driver, DriverError> {
        let DriverParts {
            cfg,
            log,
            kv,
            db,
            transport,
            status,
            lessor,
        } = p;
        let mut applied = kv.applied_index();
        if seeds.replay_applied {
            applied = applied.saturating_sub(3).max(log.first_index() - 1);
        }
        let raw = new_raw_node(&cfg, log.clone(), applied)?;
        let durable_applied = kv.applied_index();
        let mut d = Driver {
            raw,
            log,
            kv,
            db,
            transport,
            status,
            lessor,
            cfg,
            next_id: seeds.first_id.max(1),
            pending: HashMap::new(),
            by_index: HashMap::new(),
            parked: Vec::new(),
            held: HeldProposals::default(),
            reads_new: Vec::new(),
            reads_inflight: BTreeMap::new(),
            reads_ready: Vec::new(),
            read_seq: seeds.read_seq,
            transfers: Vec::new(),
            self_removal: None,
            ticks: 0,
            heard_at: HashMap::new(),
            removed: Default::default(),
            corrupt: false,
            corrupt_alarm_committed: false,
            last_leader: 0,
            reopen_backoff: REOPEN_BACKOFF_MIN,
            durable_applied,
            kv_synced_at: (seeds.clock)(),
            clock: seeds.clock.clone(),
            unsynced_bytes: 0,
        };
        d.refresh_peers();
        Ok(d)
    }
}

/// Where this process's proposal IDs start: random, never 0 (see `Driver::next_id`).
fn first_proposal_id() -> u64 {
    rand::random::<u64>().max(1)
}

/// A RawNode over `log`, with the state machine at `applied`.
fn new_raw_node(
    cfg: &DriverConfig,
    log: RaftLog,
    applied: u64,
) -> Result<RawNode<RaftLog>, DriverError> {
    let raft_cfg = raft::Config {
        id: cfg.member_id,
        election_tick: cfg.election_ticks,
        heartbeat_tick: cfg.heartbeat_ticks,
        applied,
        max_size_per_msg: cfg.max_size_per_msg,
        max_inflight_msgs: cfg.max_inflight_msgs,
        // A partitioned member must not disrupt the majority (pre-vote), and a leader
        // that lost its quorum must step down (check-quorum).
        pre_vote: true,
        check_quorum: true,
        read_only_option: ReadOnlyOption::Safe,
        min_election_tick: cfg.fixed_election_ticks.unwrap_or(0),
        max_election_tick: cfg.fixed_election_ticks.map_or(0, |t| t + 1),
        ..Default::default()
    };
    raft_cfg.validate()?;
    let logger = slog::Logger::root(super::logging::RaftLogDrain::new(cfg.member_id), slog::o!());
    let conf = log.conf_state();
    let mut raw = RawNode::new(&raft_cfg, log, &logger)?;
    if conf.voters == [cfg.member_id] && conf.learners.is_empty() {
        // Alone: no one to wait for.
        raw.campaign()?;
    }
    Ok(raw)
}

pub(crate) struct Driver {
    raw: RawNode<RaftLog>,
    log: RaftLog,
    kv: Arc<KvStore>,
    db: Arc<Db>,
    transport: Arc<dyn Transport>,
    status: Arc<NodeStatus>,
    /// Told about every applied grant, revoke and keep-alive.
    lessor: Arc<Lessor>,
    cfg: DriverConfig,
    /// Sequence for this member's proposals. With the proposer ID in every entry, a
    /// reply goes to the caller whose entry applied. It starts at a random point: after a
    /// restart the member applies again the entries its previous run proposed (those
    /// after the keyspace's last durable commit), and a count from 1 would hand their
    /// results to new callers that got the same IDs.
    next_id: u64,
    pending: HashMap<u64, Reply<Applied>>,
    /// Log index of proposals made while leader, to detect a tail overwritten by a new
    /// leader (the proposal then definitely did not apply).
    by_index: HashMap<u64, u64>,
    /// Proposals waiting for a leader to be known.
    parked: Vec<(u64, Vec<u8>)>,
    /// Proposals other members forwarded while this one could not take them: see
    /// [`Driver::hold_forwarded`].
    held: HeldProposals,
    /// Reads not yet sent as a ReadIndex request; all of them share the next one.
    reads_new: Vec<Reply<()>>,
    /// ReadIndex requests in flight, by context, with the tick they were (re)issued.
    reads_inflight: BTreeMap<u64, (Vec<Reply<()>>, u64)>,
    /// Reads whose index is known, waiting for the apply to reach it.
    reads_ready: Vec<(u64, Vec<Reply<()>>)>,
    read_seq: u64,
    /// Leader transfers in progress: target, caller, tick started.
    transfers: Vec<(u64, Reply<()>, u64)>,
    /// This member's own removal, asked of it as leader: it hands leadership over
    /// first and proposes the change as a follower (see `proposals.rs`).
    self_removal: Option<proposals::SelfRemoval>,
    ticks: u64,
    /// The tick each peer's last Raft message arrived at. raft-rs's own
    /// `recent_active` is cleared at every check-quorum round, so right after one it
    /// calls every follower inactive; this is what [`Driver::progress`] reports.
    heard_at: HashMap<u64, u64>,
    /// Members this member saw removed from the configuration: their Raft messages
    /// are refused (as etcd's transport refuses removed members).
    removed: std::collections::HashSet<u64>,
    /// The state machine failed a checksum: nothing is applied any more.
    corrupt: bool,
    /// This member's CORRUPT alarm reached the log (committed).
    corrupt_alarm_committed: bool,
    last_leader: u64,
    /// Wait before the next attempt to reopen the database after a failed write;
    /// doubles while the disk stays full, back to the minimum after a durable commit.
    reopen_backoff: Duration,
    /// The applied index the keyspace on disk is known to hold (its last durable
    /// commit): the Raft log keeps every entry after it.
    durable_applied: u64,
    kv_synced_at: Instant,
    /// Time as the keyspace's commit policy sees it.
    clock: crate::Clock,
    /// Bytes of entries applied since the keyspace was last committed durably.
    unsynced_bytes: usize,
}

/// The keyspace is applied without fsync (the Raft log is the durable record) and
/// committed durably this often, or after this many bytes of entries, so a restart
/// replays little, the log can be compacted, and what the keyspace will need on disk
/// is claimed before the free-space reserve is spent. Each durable commit writes every
/// page dirtied since the last one, so committing more often costs throughput
/// (BENCHMARKS.md has the A/B).
const KV_SYNC_INTERVAL: Duration = Duration::from_secs(1);
const KV_SYNC_BYTES: usize = 1 << 20;
/// Memory the Raft log's entries may take before it is compacted whatever
/// `--snapshot-count` says (10,000 entries of 1.5 MiB would be 15 GiB).
pub const LOG_MAX_BYTES: u64 = 1 << 30;
/// Records of plain writes wait in memory (`kv::pending`) until this many, then go to
/// the keyspace in one commit, not fsync'ed. Left for the durable commit, a second's
/// records make that commit a stall that shows in the tail latency; small batches
/// spread the work (BENCHMARKS.md has the thresholds compared).
const KV_WRITE_RECORDS: usize = 128;

impl Driver {
    /// Serves until asked to stop. A failed write does not end it: the member leaves
    /// Raft, reopens the database from disk once it can write again, and resumes.
    fn run(&mut self, rx: std_mpsc::Receiver<DriverMsg>) -> Result<(), DriverError> {
        if let Some(why) = self.cfg.corrupt_at_start.clone() {
            self.quarantine(&why);
        }
        loop {
            match self.serve(&rx) {
                Err(e) if e.is_failed_write() => {
                    if !self.recover(&rx, e)? {
                        return Ok(());
                    }
                }
                Ok(()) => {
                    if self.corrupt {
                        return Ok(());
                    }
                    // Stopping: what was applied need not be replayed at the next start.
                    if let Err(e) = self.sync_kv() {
                        warn!("committing the keyspace at stop: {e}");
                    }
                    return Ok(());
                }
                Err(DriverError::Corrupt(why))
                | Err(DriverError::Apply(StoreError::Corrupt { detail: why, .. })) => {
                    self.quarantine(&why)
                }
                other => return other,
            }
        }
    }

    /// Stops applying for good (until an operator repairs the member): the log keeps
    /// being replicated and persisted here, but the corrupt state machine is neither
    /// written nor served, and the cluster is told with a CORRUPT alarm naming this
    /// member.
    fn quarantine(&mut self, why: &str) {
        error!("{why}: this member stops applying and serving; the others carry on");
        self.corrupt = true;
        self.status.mark_corrupt(why);
        self.raise_corrupt_alarm();
        // A leader that no longer applies would answer no reads: hand leadership to
        // the most caught-up other voter.
        if let Some(t) = self.best_transferee() {
            self.raw.transfer_leader(t);
        }
    }

    /// On a leader, the most caught-up other voter.
    fn best_transferee(&self) -> Option<u64> {
        let r = &self.raw.raft;
        if r.state != StateRole::Leader {
            return None;
        }
        let me = self.cfg.member_id;
        r.prs()
            .iter()
            .filter(|(id, _)| **id != me && r.prs().conf().voters().contains(**id))
            .max_by_key(|(id, p)| (p.matched, std::cmp::Reverse(**id)))
            .map(|(id, _)| *id)
    }

    /// Proposes the CORRUPT alarm for this member (again, until it is seen committed:
    /// a proposal made without a leader is dropped).
    fn raise_corrupt_alarm(&mut self) {
        if self.corrupt_alarm_committed || !self.leader_known() {
            return;
        }
        let data = prost::Message::encode_to_vec(&InternalRequest {
            proposer: self.cfg.member_id,
            id: 0,
            request: Some(Request::Alarm(corrupt_alarm(self.cfg.member_id))),
            auth_info: None,
        });
        if let Err(e) = self.raw.propose(vec![], data) {
            warn!("cannot raise the CORRUPT alarm yet: {e}");
        }
    }

    /// Commits the keyspace durably, so that everything applied so far survives a
    /// crash without the log.
    fn sync_kv(&mut self) -> Result<(), DriverError> {
        let applied = self.kv.applied_index();
        self.kv_synced_at = (self.clock)();
        self.unsynced_bytes = 0;
        if applied == self.durable_applied {
            return Ok(());
        }
        self.commit_kv(true)?;
        self.durable_applied = applied;
        Ok(())
    }

    /// Writes the records of plain writes, which wait in memory, into the keyspace
    /// (not fsync'ed) once there are enough of them: one commit for many records, and
    /// no large write when the durable commit comes.
    fn write_pending_kv(&mut self) -> Result<(), DriverError> {
        if self.kv.pending_records() < KV_WRITE_RECORDS {
            return Ok(());
        }
        self.commit_kv(false)
    }

    /// One commit of the keyspace with what is pending, counted as a backend commit.
    fn commit_kv(&self, durable: bool) -> Result<(), DriverError> {
        let started = Instant::now();
        self.kv.write_pending(durable)?;
        self.status
            .metrics
            .backend_commit
            .observe(started.elapsed());
        Ok(())
    }

    fn serve(&mut self, rx: &std_mpsc::Receiver<DriverMsg>) -> Result<(), DriverError> {
        let mut next_tick = Instant::now() + self.cfg.tick;
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(m) => {
                    if !self.handle(m)? {
                        return Ok(());
                    }
                    // Drain what else is queued: proposals arriving together are
                    // batched into one Ready, one fsync.
                    for _ in 0..4096 {
                        match rx.try_recv() {
                            Ok(m) => {
                                if !self.handle(m)? {
                                    return Ok(());
                                }
                            }
                            Err(_) => break,
                        }
                    }
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            }
            self.status.driver_turned();
            let now = Instant::now();
            let tick = now >= next_tick;
            if tick {
                next_tick += self.cfg.tick;
                if next_tick < now {
                    next_tick = now + self.cfg.tick;
                }
            }
            if !self.turn(tick)? {
                return Ok(());
            }
        }
    }

    /// The rest of one turn of the loop, after the messages that arrived: a tick (if
    /// one is due), parked proposals and reads, the Ready, the keyspace's commit policy
    /// and status. Returns false once this member is removed from the cluster.
    pub(crate) fn turn(&mut self, tick: bool) -> Result<bool, DriverError> {
        if tick {
            self.raw.tick();
            self.ticks += 1;
            self.on_tick();
        }
        self.step_held();
        self.propose_parked();
        self.issue_reads();
        self.on_ready()?;
        let since_sync = (self.clock)().saturating_duration_since(self.kv_synced_at);
        if self.unsynced_bytes >= KV_SYNC_BYTES || since_sync >= KV_SYNC_INTERVAL {
            self.sync_kv()?;
        } else {
            self.write_pending_kv()?;
        }
        // What compactions free goes one bounded step a tick, between apply batches.
        if tick && self.kv.compaction_pending() {
            self.kv.compact_step()?;
        }
        self.publish_status();
        if self.status.is_removed() {
            warn!("this member was removed from the cluster; its raft node stops");
            return Ok(false);
        }
        self.check_transfers();
        self.continue_self_removal();
        Ok(true)
    }

    /// The Raft node (the simulator reports its state).
    pub(crate) fn raft(&self) -> &RawNode<RaftLog> {
        &self.raw
    }

    /// Returns false when asked to stop.
    pub(crate) fn handle(&mut self, m: DriverMsg) -> Result<bool, DriverError> {
        match m {
            DriverMsg::Propose {
                request,
                auth,
                reply,
            } => {
                let id = self.take_proposal_id();
                let data = prost::Message::encode_to_vec(&InternalRequest {
                    proposer: self.cfg.member_id,
                    id,
                    request: Some(request),
                    auth_info: auth,
                });
                self.pending.insert(id, reply);
                self.parked.push((id, data));
            }
            DriverMsg::ReadIndex { reply } => self.reads_new.push(reply),
            DriverMsg::CatchUp { reply } => {
                let committed = self.raw.raft.raft_log.committed;
                if committed <= self.kv.applied_index() {
                    let _ = reply.send(Ok(()));
                } else {
                    self.reads_ready.push((committed, vec![reply]));
                }
            }
            DriverMsg::ChangeMembers { change, reply } => self.change_members(change, reply),
            DriverMsg::Progress { reply } => {
                let _ = reply.send(Ok(self.progress()));
            }
            DriverMsg::Raft(msg) => {
                if let Err(why) = super::validate::check(&self.raw.raft, &self.removed, &msg) {
                    self.status.metrics.count_refusal(why);
                    warn!(
                        from = format_args!("{:x}", msg.from),
                        kind = msg.msg_type,
                        term = msg.term,
                        reason = why.label(),
                        "raft message from a peer refused"
                    );
                    return Ok(true);
                }
                self.heard_at.insert(msg.from, self.ticks);
                if msg.msg_type == raft::prelude::MessageType::MsgPropose as i32
                    && !self.takes_proposals()
                {
                    self.hold_forwarded(msg);
                    return Ok(true);
                }
                if let Err(e) = self.raw.step(*msg) {
                    warn!("dropping raft message: {e}");
                }
            }
            DriverMsg::Unreachable(id) => self.raw.report_unreachable(id),
            DriverMsg::SnapshotStatus(id, ok) => {
                let s = if ok {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                };
                self.raw.report_snapshot(id, s);
            }
            DriverMsg::TransferLeader { target, reply } => self.transfer_leader(target, reply),
            DriverMsg::Defragment { reply } => {
                self.maybe_compact(true)?;
                // Every record compaction frees is gone first, so its space is returned.
                while self.kv.compact_step()? {}
                let result = self
                    .db
                    .compact(DEFRAG_WAIT_FOR_READERS)
                    .map_err(|e| ProposeError::Defragment(e.to_string()));
                if let Ok((before, after)) = &result {
                    info!(before, after, "database defragmented");
                }
                let _ = reply.send(result);
            }
            DriverMsg::Shutdown => return Ok(false),
            DriverMsg::InjectedPanic => panic!("injected fault: the Raft driver panics"),
            DriverMsg::InjectCorruption { revision, reply } => {
                warn!(revision, "fault injected: a stored record is altered");
                let _ = reply.send(
                    self.kv
                        .inject_corruption(revision)
                        .map_err(ProposeError::Kv),
                );
            }
            DriverMsg::Corrupt(why) if !self.corrupt => return Err(DriverError::Corrupt(why)),
            DriverMsg::Corrupt(_) => {}
        }
        Ok(true)
    }

    fn leader_known(&self) -> bool {
        self.raw.raft.leader_id != raft::INVALID_ID
    }

    fn on_tick(&mut self) {
        // Callers that gave up (timed out or went away) leave nothing behind.
        self.pending.retain(|_, tx| !tx.is_closed());
        let pending = &self.pending;
        self.parked.retain(|(id, _)| pending.contains_key(id));
        self.by_index.retain(|_, id| pending.contains_key(id));
        self.reads_new.retain(|tx| !tx.is_closed());
        self.reads_inflight.retain(|_, (w, _)| {
            w.retain(|tx| !tx.is_closed());
            !w.is_empty()
        });
        if self.corrupt && self.ticks.is_multiple_of(self.cfg.election_ticks as u64) {
            self.raise_corrupt_alarm();
        }
        // raft-rs drops a ReadIndex silently when there is no leader or the leader has
        // not yet committed in its term; ask again after an election timeout.
        if self.leader_known() {
            let retry_after = self.cfg.election_ticks as u64;
            let now = self.ticks;
            let mut again = Vec::new();
            for (ctx, (_, issued)) in self.reads_inflight.iter_mut() {
                if now.saturating_sub(*issued) >= retry_after {
                    *issued = now;
                    again.push(*ctx);
                }
            }
            for ctx in again {
                self.raw.read_index(ctx.to_be_bytes().to_vec());
            }
        }
    }

    /// One pass of the Ready loop.
    fn on_ready(&mut self) -> Result<(), DriverError> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut rd = self.raw.ready();

        // 1. Messages a leader may send before its own entries are durable (appends to
        //    followers run in parallel with the local fsync; Raft thesis 10.2.1). For a
        //    follower or candidate this list is empty: its messages come in step 5.
        if !rd.messages().is_empty() {
            self.transport.send(rd.take_messages());
        }

        // 2. A snapshot from the leader replaces the state machine and the log, in one
        //    durable commit.
        if !rd.snapshot().is_empty() {
            self.install_snapshot(rd.snapshot())?;
        }

        // 3. Reads whose ReadIndex is now known.
        for rs in rd.take_read_states() {
            self.on_read_state(rs);
        }

        // 4. Append new entries and the hard state to the write-ahead log: one write,
        //    one fdatasync. A Ready that only moves the commit index writes nothing:
        //    the commit index is kept in memory and reaches disk with the next hard
        //    state, and a lower commit index after a crash is safe (Raft re-learns it
        //    from the leader).
        if !rd.entries().is_empty() || rd.must_sync() {
            self.log.append(rd.entries());
            if let Some(hs) = rd.hs() {
                self.log.set_hard_state(hs);
            }
            let started = Instant::now();
            self.log.sync()?;
            self.status.metrics.log_commit.observe(started.elapsed());
            self.reopen_backoff = REOPEN_BACKOFF_MIN;
        } else if let Some(hs) = rd.hs() {
            self.log.set_commit(hs.commit);
        }

        // 5. Messages that may leave only once the above is durable: votes and append
        //    responses from followers and candidates.
        if !rd.persisted_messages().is_empty() {
            self.transport.send(rd.take_persisted_messages());
        }

        // 6. Apply committed entries (raft-rs only hands out entries that are both
        //    committed by a quorum and persisted here). After the append and its
        //    messages, not before: a follower's append response, and a leader's own
        //    fsync, then do not wait for the state machine.
        self.apply(rd.take_committed_entries())?;

        // 7. Advance; what became possible now that the Ready is persisted (a leader's
        //    own commit index moving, more entries to apply) comes as a light Ready.
        let mut light = self.raw.advance(rd);
        if let Some(commit) = light.commit_index() {
            self.log.set_commit(commit);
        }
        self.transport.send(light.take_messages());
        self.apply(light.take_committed_entries())?;
        self.raw.advance_apply();

        self.maybe_compact(false)?;
        self.answer_reads();
        Ok(())
    }

    /// Whether member `id` was heard from within an election timeout: raft-rs's own
    /// flag, or any message this driver received from it (raft-rs clears its flag at
    /// every quorum check, so alone it misses members that are answering).
    pub(super) fn heard_recently(&self, id: u64) -> bool {
        self.raw.raft.prs().get(id).is_some_and(|p| p.recent_active)
            || self
                .heard_at
                .get(&id)
                .is_some_and(|&at| self.ticks.saturating_sub(at) <= self.cfg.election_ticks as u64)
    }

    fn progress(&self) -> Vec<super::PeerProgress> {
        let r = &self.raw.raft;
        if r.state != StateRole::Leader {
            return Vec::new();
        }
        let last = r.raft_log.last_index();
        let learners = r.prs().conf().learners();
        r.prs()
            .iter()
            .map(|(id, p)| super::PeerProgress {
                id: *id,
                learner: learners.contains(id),
                matched: if *id == self.cfg.member_id {
                    last
                } else {
                    p.matched
                },
                recent_active: *id == self.cfg.member_id || self.heard_recently(*id),
                leader_last_index: last,
            })
            .collect()
    }

    /// Compacts the Raft log once it holds `snapshot_count` applied entries, or with
    /// `now` whenever anything is behind the catch-up window (before a defragment, so
    /// the space the log held is given back too).
    /// Large entries also bound it: past `log_max_bytes` in memory it keeps at most
    /// half of that in applied entries, whatever the counts say.
    fn maybe_compact(&mut self, now: bool) -> Result<(), DriverError> {
        let applied = self.kv.applied_index();
        let first = self.log.first_index();
        let full = self.log.held_bytes() > self.cfg.log_max_bytes;
        if applied < first || (!now && !full && applied - first < self.cfg.snapshot_count) {
            return Ok(());
        }
        let mut to = applied.saturating_sub(self.cfg.catch_up_entries);
        if full {
            to = to.max(self.log.index_keeping(self.cfg.log_max_bytes / 2, applied));
        }
        if to < first {
            return Ok(());
        }
        // Entries go only once the keyspace on disk holds their effect.
        if to > self.durable_applied {
            self.sync_kv()?;
        }
        self.log.compact(to)?;
        info!(compacted_to = to, applied, "raft log compacted");
        Ok(())
    }

    fn refresh_peers(&mut self) {
        match self.kv.members() {
            Ok(members) => self.transport.set_peers(
                members
                    .into_iter()
                    .filter_map(|m| {
                        m.peer_urls
                            .first()
                            .map(|u| (m.id, super::peer_hostport(u).to_string()))
                    })
                    .collect(),
            ),
            Err(e) => error!("cannot read the member table: {e}"),
        }
    }

    fn publish_status(&mut self) {
        use std::sync::atomic::Ordering::Release;
        let r = &self.raw.raft;
        let s = &self.status;
        if r.leader_id != self.last_leader {
            if r.leader_id != raft::INVALID_ID {
                info!(
                    leader = format_args!("{:x}", r.leader_id),
                    term = r.term,
                    is_me = r.leader_id == self.cfg.member_id,
                    "leader elected"
                );
            } else {
                info!(term = r.term, "no leader");
            }
            self.last_leader = r.leader_id;
            s.leader_changes.fetch_add(1, Release);
        }
        s.metrics
            .proposals_pending
            .store(self.pending.len() as u64, Release);
        s.leader.store(r.leader_id, Release);
        s.term.store(r.term, Release);
        s.commit.store(r.raft_log.committed, Release);
        s.applied.store(self.kv.applied_index(), Release);
        s.is_learner.store(
            r.prs().conf().learners().contains(&self.cfg.member_id),
            Release,
        );
    }
}
