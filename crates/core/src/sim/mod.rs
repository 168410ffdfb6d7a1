//! Deterministic simulation: a whole cluster in one thread, on a simulated clock,
//! network and disk, with faults chosen by a seeded generator, so that a run is a pure
//! function of its seed and any failure replays exactly.
//!
//! What runs is meshd's own code: the Raft driver (`raft::Driver`, stepped turn by
//! turn instead of on its thread), the write-ahead log, the redb keyspace and snapshot
//! files (on [`disk::SimDisk`] instead of files), the state machine, its apply path
//! and the lessor. Only the edges are replaced: the clock, the transport (messages go
//! through a queue with per-link delay, loss, duplication and cuts) and the disk.
//!
//! A run has a fault phase (power cuts with torn writes, between steps or in the
//! middle of a member's disk operations, process kills and pauses,
//! EIO on fsync, full disks, bits flipped at rest, partitions, one-way and partial
//! connectivity, slow, lossy and duplicating links, clock drift, a member replaced
//! under load), then a heal phase in which every member is up and every link whole,
//! and ends with checks that the caller completes: the client history (returned for
//! the linearizability checker), a final read of every key, applied indexes and
//! HashKV equal on every member, each member's watch history (ordered, replaying to
//! its keyspace, the same when resumed from any revision), leases (kept alive or not)
//! never expiring before their TTL, and liveness (a write acknowledged after healing).
//!
//! Every member also runs the mesh's topology CRDT and routes (`routing`): around a
//! cut link, Raft messages travel hop by hop along the relays' own routes. The log is
//! compacted every 20, 100 or 1,000 entries (by seed), so members back from a stop
//! catch up by snapshot: the file travels with its message, as the mesh streams it.
//! A member is replaced as an operator would: removed, a fresh member added as a
//! learner, promoted once caught up.
//!
//! Three lock clients take one lock with etcd's recipe as meshd's Lock service runs
//! it (`lock`), and no two may hold it at once.
//!
//! The gossip mesh has its own simulation ([`mesh`]): up to 10,000 peers running the
//! topology CRDT and its sync, without Raft.

mod autopilot;
pub mod disk;
mod lock;
pub mod mesh;
mod routing;

use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use raft::prelude::Message;
use tokio::sync::oneshot;

use crate::kv::{Applied, AppliedKind, KvStore};
use crate::lease::Lessor;
use crate::proto::etcdserverpb as pb;
use crate::proto::meshpb::internal_request::Request;
use crate::proto::meshpb::SnapshotRef;
use crate::raft::transport::Transport;
use crate::raft::{
    Driver, DriverConfig, DriverMsg, DriverParts, MemberChange, NodeStatus, ProposeError, RaftLog,
    Seeds,
};
use crate::storage::{self, vfs::Vfs, Db};
use disk::{DiskPlants, SimDisk};

/// A bug planted on purpose, to show the checks catch it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plant {
    /// The Raft log's fdatasync is skipped: appends are acknowledged before they are
    /// durable.
    AckBeforeFsync,
    /// Linearizable reads are served from local state without a ReadIndex round.
    SkipReadIndex,
    /// After a restart, entries already applied are applied again.
    DoubleApply,
    /// Directory fsyncs are skipped: created and renamed files may vanish in a crash.
    NoDirFsync,
    /// The lessor's clock runs at twice the rate: leases expire at half their TTL.
    EarlyLeaseExpiry,
}

impl Plant {
    pub const ALL: [(&'static str, Plant); 5] = [
        ("ack-before-fsync", Plant::AckBeforeFsync),
        ("skip-read-index", Plant::SkipReadIndex),
        ("double-apply", Plant::DoubleApply),
        ("early-lease-expiry", Plant::EarlyLeaseExpiry),
        ("no-dir-fsync", Plant::NoDirFsync),
    ];

    pub fn parse(s: &str) -> Option<Plant> {
        Plant::ALL.iter().find(|(n, _)| *n == s).map(|(_, p)| *p)
    }
}

/// What one run does.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    /// Voting members (3 to 7).
    pub members: usize,
    /// Concurrent clients.
    pub clients: usize,
    /// Keys the clients share (each a register for the checker).
    pub keys: usize,
    /// Simulated milliseconds with faults, then without.
    pub fault_ms: u64,
    pub heal_ms: u64,
    pub plant: Option<Plant>,
}

impl SimConfig {
    pub fn new(seed: u64) -> SimConfig {
        SimConfig {
            seed,
            members: 3,
            clients: 4,
            keys: 3,
            fault_ms: 8_000,
            heal_ms: 6_000,
            plant: None,
        }
    }
}

/// What a client asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpInput {
    Get,
    Put(u64),
    Cas { expect: u64, new: u64 },
}

/// What a client was told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpOutput {
    Get(Option<u64>),
    Put,
    Cas(bool),
    /// No answer: maybe applied, maybe not.
    Unknown,
}

/// One operation of the client history; times in simulated nanoseconds.
#[derive(Clone, Debug)]
pub struct SimOp {
    pub client: usize,
    pub key: String,
    pub input: OpInput,
    pub output: OpOutput,
    pub invoke: u64,
    pub ret: Option<u64>,
}

/// The outcome of one run.
#[derive(Debug, Default)]
pub struct Report {
    pub seed: u64,
    /// Faults injected.
    pub faults: u64,
    /// Client operations completed (answered or timed out).
    pub ops: u64,
    /// The client history, for the linearizability checker.
    pub history: Vec<SimOp>,
    /// Checks that failed in the run itself.
    pub failures: Vec<String>,
    /// Hash of every event of the run, in order.
    pub trace_hash: u64,
    /// Bits flipped at rest, and how many of those members then refused to start or
    /// quarantined themselves (the rest hit bytes nothing reads, or were repaired).
    pub flips: u64,
    pub flips_detected: u64,
    /// Members removed, and new members added and promoted to voter.
    pub removed: u64,
    pub promoted: u64,
    /// Locks acquired (and released, or lost with their lease).
    pub locks: u64,
    /// Raft messages delivered through mesh relays around a cut link.
    pub relayed: u64,
    /// Machines that died for good, and what autopilot did about it: voters removed,
    /// learners added, learners promoted.
    pub machines_died: u64,
    pub autopilot_removed: u64,
    pub autopilot_added: u64,
    pub autopilot_promoted: u64,
}

/// SplitMix64: small, fast, and the same on every platform and version.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x6a09_e667_f3bc_c909)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// True with probability `per_mille` / 1000.
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

/// FNV-1a over the run's events.
struct Trace(u64);

impl Trace {
    fn add(&mut self, words: &[u64]) {
        for w in words {
            for b in w.to_le_bytes() {
                self.0 ^= u64::from(b);
                self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
            }
        }
    }
}

/// Milliseconds of one Raft tick, and the election and heartbeat in ticks.
const TICK_MS: u64 = 10;
const ELECTION_TICKS: usize = 10;
const HEARTBEAT_TICKS: usize = 1;
/// A client gives up on an answer after this long.
const OP_TIMEOUT_MS: u64 = 2_000;
/// The last part of a run, where nothing is proposed and the members converge.
const SETTLE_MS: u64 = 500;
const CLUSTER_ID: u64 = 0x51_3d;

/// The transport a simulated member's driver sends through: messages wait here until
/// the world takes them.
#[derive(Default)]
struct Outbox {
    msgs: Mutex<Vec<Message>>,
}

impl Transport for Outbox {
    fn send(&self, msgs: Vec<Message>) {
        self.msgs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(msgs);
    }
    fn set_peers(&self, _peers: Vec<(u64, String)>) {}
}

/// A running member.
struct Node {
    driver: Driver,
    outbox: Arc<Outbox>,
    kv: Arc<KvStore>,
    status: Arc<NodeStatus>,
    lessor: Arc<Lessor>,
    _db: Arc<Db>,
}

struct Member {
    id: u64,
    disk: SimDisk,
    node: Option<Node>,
    /// When a stopped member starts again.
    restart_at: Option<u64>,
    /// Clock rate error in parts per thousand and phase of its ticks.
    drift: i64,
    phase: u64,
    next_tick: u64,
    /// Not scheduled until then (a paused process: messages wait for it).
    paused_until: u64,
    /// A bit of its disk was flipped at rest: refusing to start, or quarantining
    /// itself, is then the right answer.
    flipped: bool,
    /// Removed from the cluster (or never added): no longer run or checked.
    retired: bool,
    /// Its machine died for good: never started again.
    dead: bool,
    /// An empty server node in the mesh, waiting for autopilot to add it.
    spare: bool,
}

impl Member {
    /// A machine at slot `i` with an empty disk (its data dir created), not running
    /// and not a member yet.
    fn fresh(i: usize, plants: DiskPlants, rng: &mut Rng) -> Member {
        let disk = SimDisk::new();
        disk.create_dir_all(&data_dir(i)).expect("a fresh disk");
        disk.sync_dir(std::path::Path::new("/"))
            .expect("a fresh disk");
        disk.set_plants(plants);
        Member {
            id: i as u64 + 1,
            disk,
            node: None,
            restart_at: None,
            drift: rng.below(11) as i64 - 5,
            phase: rng.below(TICK_MS),
            next_tick: 0,
            paused_until: 0,
            flipped: false,
            retired: true,
            dead: false,
            spare: false,
        }
    }
}

enum Waiting {
    Write(Answer),
    Read(oneshot::Receiver<Result<(), ProposeError>>),
}

struct InFlight {
    key: String,
    input: OpInput,
    invoke: u64,
    member: usize,
    waiting: Waiting,
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct InTransit {
    at: std::cmp::Reverse<(u64, u64)>,
    to: usize,
    from: usize,
    /// The members relaying it when the direct link is cut, in order (the mesh's
    /// routes around the cut).
    relays: Vec<usize>,
    bytes: Vec<u8>,
    /// A snapshot's file travels with its message (the mesh streams it beside the
    /// message): its name and bytes, read from the sender's disk when sent.
    file: Option<(String, Vec<u8>)>,
}

/// The simulated world: members, network, clients, faults.
pub struct World {
    cfg: SimConfig,
    rng: Rng,
    now: u64,
    clock_ms: Arc<AtomicU64>,
    base: Instant,
    members: Vec<Member>,
    net: BinaryHeap<InTransit>,
    net_seq: u64,
    /// Directed links that deliver nothing.
    cut: BTreeSet<(usize, usize)>,
    /// Extra delay on links to or from a member (a slow link).
    slow: BTreeMap<usize, u64>,
    loss_per_mille: u64,
    dup_per_mille: u64,
    clients: Vec<Option<InFlight>>,
    next_value: u64,
    report: Report,
    trace: Trace,
    /// Values acknowledged as written, per key, for the final check.
    acked: BTreeMap<String, BTreeSet<u64>>,
    /// No new client operations (the end of a run).
    quiet: bool,
    /// The end of a run: nothing proposes, only Raft runs ([`SETTLE_MS`]).
    settling: bool,
    /// The membership change in progress (one at a time).
    reconfig: Reconfig,
    /// Members whose removal was proposed.
    removal_asked: BTreeSet<usize>,
    /// When each full disk gets its space back.
    full_until: Vec<(u64, usize)>,
    /// Snapshot deliveries to report to their senders: (sender, receiver's ID, ok).
    snapshot_reports: Vec<(usize, u64, bool)>,
    /// Log compaction settings of this run (small, so snapshots are sent).
    snapshot_count: u64,
    log_max_bytes: u64,
    /// The lease client's progress.
    lease: LeaseStage,
    /// A keep-alive in flight, and its lease.
    keepalive: Option<(i64, KeepAlive)>,
    /// For each lease, when the TTL last started again for certain: the send time of
    /// a keep-alive answered while the lease could not yet have expired.
    renewed: BTreeMap<i64, u64>,
    next_lease: i64,
    /// The lock clients, and every hold of the lock so far.
    lockers: Vec<lock::LockClient>,
    holds: Vec<lock::Hold>,
    /// Every member's mesh topology and routes.
    routes: routing::MeshRoutes,
    /// The leader's autopilot.
    autopilot: autopilot::Autopilot,
}

/// Replacing a member under load: remove a voter, add a new member as a learner, and
/// promote it once it has caught up (as an operator, or autopilot, would).
enum Reconfig {
    Idle,
    Removing(usize, Waiter),
    Adding(usize, Waiter),
    Promoting(usize, Waiter, u64),
}

/// The answer a proposal's caller waits for.
type Answer = oneshot::Receiver<Result<Applied, ProposeError>>;

type Waiter = (Answer, u64);

/// The lease client: grants a lease, attaches a key to it, and reads the key
/// (linearizably) until the lease expires, which must not be before its TTL.
enum LeaseStage {
    Idle,
    Granting {
        rx: Answer,
        id: i64,
        invoke: u64,
    },
    Putting {
        rx: Answer,
        id: i64,
        ttl_ms: u64,
        granted_at: u64,
    },
    Reading {
        id: i64,
        ttl_ms: u64,
        granted_at: u64,
        read: Option<(oneshot::Receiver<Result<(), ProposeError>>, usize)>,
    },
}

/// Until when a lease whose TTL surely runs from `from` cannot have expired: clocks
/// may run 5 per mille fast, so 1 % of the TTL is allowed.
fn lease_deadline(from: u64, ttl_ms: u64) -> u64 {
    from + ttl_ms * 99 / 100
}

/// A keep-alive in flight: when it was sent, and its answer.
type KeepAlive = (u64, Answer);

/// What became of a keep-alive by `now`, for a lease that cannot have expired before
/// `deadline`.
enum KeepAliveOutcome {
    Waiting(KeepAlive),
    /// Answered before the lease could have expired: its TTL surely runs again from
    /// this send time (an answer after it could follow a revocation already under
    /// way).
    Renewed(u64),
    /// Refused, unanswered in time, or answered too late to count.
    Gone,
}

fn poll_keepalive_answer(now: u64, (sent, mut rx): KeepAlive, deadline: u64) -> KeepAliveOutcome {
    match rx.try_recv() {
        Err(oneshot::error::TryRecvError::Empty) if now < sent + OP_TIMEOUT_MS => {
            KeepAliveOutcome::Waiting((sent, rx))
        }
        Ok(Ok(Applied {
            kind: AppliedKind::LeaseKeepAlive { .. },
            ..
        })) if now < deadline => KeepAliveOutcome::Renewed(sent),
        _ => KeepAliveOutcome::Gone,
    }
}

fn lease_key(id: i64) -> String {
    format!("lease-{id}")
}

fn key_name(k: usize) -> String {
    format!("k{k}")
}

/// The member table's record of member `id` (its name and peer URL are the
/// simulator's own).
fn member_record(id: u64) -> crate::proto::meshpb::MemberRecord {
    crate::server::voter(id, &format!("m{id}"), &format!("sim:{id}"))
}

fn data_dir(i: usize) -> PathBuf {
    PathBuf::from(format!("/m{}", i + 1))
}

impl World {
    pub fn new(cfg: SimConfig) -> World {
        let mut rng = Rng::new(cfg.seed);
        // The log is compacted after this many applied entries: small enough that a
        // member back from a long stop needs a snapshot.
        let snapshot_count = [20, 100, 1_000][rng.below(3) as usize];
        // Or after this many bytes of entries: some seeds compact by size first. Drawn
        // from a stream of its own, so the seeds' other choices stay what they were
        // (the regression seeds depend on them).
        let log_max_bytes = [1 << 30, 32 << 10][Rng::new(!cfg.seed).below(2) as usize];
        let plants = DiskPlants {
            skip_log_fsync: cfg.plant == Some(Plant::AckBeforeFsync),
            skip_dir_fsync: cfg.plant == Some(Plant::NoDirFsync),
        };
        let members = (0..cfg.members)
            .map(|i| {
                let mut m = Member::fresh(i, plants, &mut rng);
                m.restart_at = Some(0);
                m.retired = false;
                m
            })
            .collect();
        World {
            clients: (0..cfg.clients).map(|_| None).collect(),
            rng,
            now: 0,
            clock_ms: Arc::new(AtomicU64::new(0)),
            base: Instant::now(),
            members,
            net: BinaryHeap::new(),
            net_seq: 0,
            cut: BTreeSet::new(),
            slow: BTreeMap::new(),
            loss_per_mille: 0,
            dup_per_mille: 0,
            next_value: 1,
            report: Report {
                seed: cfg.seed,
                ..Default::default()
            },
            trace: Trace(0xcbf2_9ce4_8422_2325),
            acked: BTreeMap::new(),
            quiet: false,
            settling: false,
            reconfig: Reconfig::Idle,
            removal_asked: BTreeSet::new(),
            full_until: Vec::new(),
            snapshot_reports: Vec::new(),
            snapshot_count,
            log_max_bytes,
            lease: LeaseStage::Idle,
            keepalive: None,
            renewed: BTreeMap::new(),
            next_lease: 0x1000,
            lockers: (0..3).map(|_| lock::LockClient::default()).collect(),
            holds: Vec::new(),
            routes: routing::MeshRoutes::default(),
            autopilot: autopilot::Autopilot::new(cfg.members),
            cfg,
        }
    }

    fn fail(&mut self, what: String) {
        self.trace.add(&[0xfa11]);
        self.report
            .failures
            .push(format!("t={}ms: {what}", self.now));
    }

    /// The clock every member's code reads: simulated milliseconds (member `i`'s runs
    /// at its own rate).
    fn clock_for(&self, drift: i64) -> crate::Clock {
        let ms = self.clock_ms.clone();
        let base = self.base;
        Arc::new(move || {
            let now = ms.load(Ordering::Relaxed) as i64;
            base + Duration::from_millis((now + now * drift / 1000).max(0) as u64)
        })
    }

    fn start(&mut self, i: usize) {
        let m = &self.members[i];
        let vfs: Arc<dyn Vfs> = Arc::new(m.disk.clone());
        let (id, drift) = (m.id, m.drift);
        let clock = self.clock_for(drift);
        let plant = self.cfg.plant;
        let snapshot_count = self.snapshot_count;
        let log_max_bytes = self.log_max_bytes;
        let (clock_ms, base) = (self.clock_ms.clone(), self.base);
        // raft-rs draws the election timeout from its own random source; each member
        // gets a fixed one drawn from the seed instead.
        let election = ELECTION_TICKS + self.rng.below(ELECTION_TICKS as u64) as usize;
        let n = self.cfg.members;
        let seeds = Seeds {
            clock: clock.clone(),
            first_id: self.rng.next_u64(),
            read_seq: self.rng.next_u64(),
            replay_applied: plant == Some(Plant::DoubleApply),
        };
        let opened = (|| -> Result<Node, String> {
            let dir = data_dir(i);
            let db = storage::open_database_on(vfs, &dir, storage::DEFAULT_CACHE_BYTES)
                .map_err(|e| e.to_string())?;
            let kv = Arc::new(KvStore::open_for_raft(db.clone()).map_err(|e| e.to_string())?);
            let log = RaftLog::load(&db, kv.clone()).map_err(|e| e.to_string())?;
            log.build_snapshots_inline();
            let fresh = storage::Identity::load(&db)
                .map_err(|e| e.to_string())?
                .is_none();
            let identity = storage::Identity {
                name: format!("m{id}"),
                member_id: id,
                cluster_id: CLUSTER_ID,
                cluster_token: "sim".into(),
            };
            if fresh && i >= n {
                // Added to a running cluster: an identity only; the leader sends the
                // rest as a snapshot.
                let mut batch = kv.begin().map_err(|e| e.to_string())?;
                batch
                    .side()
                    .map_err(|e| e.to_string())?
                    .put_identity(&identity)
                    .map_err(|e| e.to_string())?;
                batch.commit(true).map_err(|e| e.to_string())?;
            } else if fresh {
                let members: Vec<_> = (1..=n as u64).map(member_record).collect();
                let mut batch = kv.begin().map_err(|e| e.to_string())?;
                crate::server::write_bootstrap(&mut batch, &log, &identity, &members)
                    .map_err(|e| e.to_string())?;
                batch.commit(true).map_err(|e| e.to_string())?;
                log.sync().map_err(|e| e.to_string())?;
            }
            let status = Arc::new(NodeStatus::new(id, CLUSTER_ID));
            let lessor_clock = if plant == Some(Plant::EarlyLeaseExpiry) {
                let (ms, base) = (clock_ms.clone(), base);
                Arc::new(move || base + Duration::from_millis(2 * ms.load(Ordering::Relaxed)))
            } else {
                clock
            };
            let lessor = Lessor::with_clock(
                Lessor::min_ttl_for(Duration::from_millis(TICK_MS), ELECTION_TICKS),
                Duration::from_millis(TICK_MS * ELECTION_TICKS as u64),
                lessor_clock,
            );
            crate::lease::load(&lessor, &kv).map_err(|e| e.to_string())?;
            let outbox = Arc::new(Outbox::default());
            let cfg = DriverConfig {
                member_id: id,
                member_name: format!("m{id}"),
                tick: Duration::from_millis(TICK_MS),
                election_ticks: ELECTION_TICKS,
                heartbeat_ticks: HEARTBEAT_TICKS,
                snapshot_count,
                catch_up_entries: 10,
                log_max_bytes,
                max_size_per_msg: 1 << 20,
                max_inflight_msgs: 256,
                snapshot_dir: storage::snapshot_dir(&dir),
                corrupt_at_start: kv.corrupt_at_open(),
                fixed_election_ticks: Some(election),
            };
            let parts = DriverParts {
                cfg,
                log,
                kv: kv.clone(),
                db: db.clone(),
                transport: outbox.clone(),
                status: status.clone(),
                lessor: lessor.clone(),
            };
            let driver = Driver::new(parts, &seeds).map_err(|e| e.to_string())?;
            Ok(Node {
                driver,
                outbox,
                kv,
                status,
                lessor,
                _db: db,
            })
        })();
        self.trace.add(&[0x57a7, i as u64, opened.is_ok() as u64]);
        match opened {
            Ok(node) => {
                let m = &mut self.members[i];
                m.node = Some(node);
                m.restart_at = None;
                // It opened cleanly: whatever a flipped bit hit, every check applies to
                // it again.
                m.flipped = false;
                m.next_tick = self.now + m.phase;
                // A new mesh incarnation, publishing it is a member.
                self.mesh_start(i);
            }
            // An I/O error (an armed EIO, a full disk): the service manager starts the
            // member again a little later.
            Err(e) if e.contains("(os error ") => {
                self.members[i].restart_at = Some(self.now + 100);
            }
            Err(e) if self.members[i].flipped && e.contains("corrupt") => {
                self.trace.add(&[0xf11b, i as u64]);
                self.report.flips_detected += 1;
                self.members[i].restart_at = None;
            }
            Err(e) => {
                self.fail(format!("m{} does not start from its data dir: {e}", i + 1));
                self.members[i].restart_at = None;
            }
        }
    }

    /// Stops member `i`: a process kill (the page cache survives) or a power cut (only
    /// what was synced survives; the last write may be torn).
    fn stop(&mut self, i: usize, power_cut: bool, restart_in: u64) {
        let Some(node) = self.members[i].node.take() else {
            return;
        };
        drop(node);
        self.mesh_stop(i);
        if power_cut {
            let r = self.rng.next_u64();
            self.members[i].disk.crash(|len| {
                if r.is_multiple_of(3) {
                    0
                } else {
                    (r >> 8) as usize % (len + 1)
                }
            });
        }
        self.members[i].restart_at = Some(self.now + restart_in);
        self.trace.add(&[0xdead, i as u64, power_cut as u64]);
    }

    fn up(&self) -> Vec<usize> {
        (0..self.members.len())
            .filter(|&i| self.members[i].node.is_some() && !self.members[i].retired)
            .collect()
    }

    fn send(&mut self, from: usize, msgs: Vec<Message>) {
        for m in msgs {
            let Some(to) = (m.to as usize)
                .checked_sub(1)
                .filter(|&t| t < self.members.len())
            else {
                continue;
            };
            let is_snapshot = m.msg_type == raft::prelude::MessageType::MsgSnapshot as i32;
            let path = self.mesh_route(from, to);
            let lost = self.rng.chance(self.loss_per_mille);
            let Some(relays) = path.filter(|_| !lost) else {
                if is_snapshot {
                    self.snapshot_reports.push((from, m.to, false));
                }
                continue;
            };
            let file = if is_snapshot {
                match self.snapshot_file(from, &m) {
                    Some(f) => Some(f),
                    None => {
                        self.fail(format!(
                            "m{} sent a snapshot whose file it cannot read",
                            from + 1
                        ));
                        continue;
                    }
                }
            } else {
                None
            };
            let bytes = prost011::Message::encode_to_vec(&m);
            let copies = if self.rng.chance(self.dup_per_mille) {
                2
            } else {
                1
            };
            for _ in 0..copies {
                let slow = self.slow.get(&from).copied().unwrap_or(0)
                    + self.slow.get(&to).copied().unwrap_or(0);
                let hops = relays.len() as u64 + 1;
                let at = self.now + hops * (1 + self.rng.below(3)) + slow;
                self.net_seq += 1;
                self.net.push(InTransit {
                    at: std::cmp::Reverse((at, self.net_seq)),
                    to,
                    from,
                    relays: relays.clone(),
                    bytes: bytes.clone(),
                    file: file.clone(),
                });
            }
        }
    }

    /// The snapshot file a MsgSnapshot from member `from` names: its file name and
    /// bytes, read from the sender's disk.
    fn snapshot_file(&self, from: usize, m: &Message) -> Option<(String, Vec<u8>)> {
        let snap = m.snapshot.as_ref()?;
        let r: SnapshotRef = prost::Message::decode(snap.data.as_slice()).ok()?;
        let path = PathBuf::from(&r.path);
        let name = path.file_name()?.to_string_lossy().into_owned();
        let bytes = self.members[from].disk.read(&path).ok()?;
        Some((name, bytes))
    }

    /// Puts a snapshot's file in the receiver's snapshot dir (not fsync'ed) and points
    /// the message at it (what the mesh's snapshot stream does on arrival).
    fn receive_snapshot_file(
        &mut self,
        to: usize,
        name: &str,
        bytes: &[u8],
        msg: &mut Message,
    ) -> std::io::Result<()> {
        let disk = &self.members[to].disk;
        let dir = storage::snapshot_dir(&data_dir(to));
        let path = dir.join(name);
        let f = disk.create(&path)?;
        f.write_all_at(bytes, 0)?;
        if let Some(snap) = msg.snapshot.as_mut() {
            let mut r: SnapshotRef =
                prost::Message::decode(snap.data.as_slice()).map_err(std::io::Error::other)?;
            r.path = path.to_string_lossy().into_owned();
            snap.data = prost::Message::encode_to_vec(&r);
        }
        Ok(())
    }

    /// One simulated millisecond.
    fn step(&mut self) {
        self.clock_ms.store(self.now, Ordering::Relaxed);
        for i in 0..self.members.len() {
            if self.members[i].restart_at.is_some_and(|t| t <= self.now) {
                self.start(i);
            }
        }
        self.mesh_step();
        // Deliveries due now.
        let mut inbox: Vec<Vec<Message>> = vec![Vec::new(); self.members.len()];
        while self.net.peek().is_some_and(|m| m.at.0 .0 <= self.now) {
            let m = self.net.pop().expect("peeked");
            // A cut made while the message was in flight loses it too.
            let hops: Vec<usize> = std::iter::once(m.from)
                .chain(m.relays.iter().copied())
                .chain(std::iter::once(m.to))
                .collect();
            let path_cut = hops.windows(2).any(|w| self.cut.contains(&(w[0], w[1])))
                || m.relays.iter().any(|&k| !self.routes.running(k));
            if path_cut || self.members[m.to].node.is_none() {
                if m.file.is_some() {
                    self.snapshot_reports
                        .push((m.from, self.members[m.to].id, false));
                }
                continue;
            }
            let paused = m
                .relays
                .iter()
                .chain(std::iter::once(&m.to))
                .map(|&k| self.members[k].paused_until)
                .max()
                .unwrap_or(0);
            if paused > self.now {
                // Waits in a socket buffer until the paused process (a relay or the
                // receiver) runs again.
                let at = paused;
                self.net.push(InTransit {
                    at: std::cmp::Reverse((at, m.at.0 .1)),
                    ..m
                });
                continue;
            }
            match <Message as prost011::Message>::decode(m.bytes.as_slice()) {
                Ok(mut msg) => {
                    if let Some((name, bytes)) = &m.file {
                        match self.receive_snapshot_file(m.to, name, bytes, &mut msg) {
                            Ok(()) => {
                                self.snapshot_reports
                                    .push((m.from, self.members[m.to].id, true))
                            }
                            Err(e) => {
                                // The receiver's disk refused it (full, EIO): lost.
                                self.trace.add(&[0x5ea1, m.to as u64]);
                                let _ = e;
                                self.snapshot_reports
                                    .push((m.from, self.members[m.to].id, false));
                                continue;
                            }
                        }
                    }
                    self.trace.add(&[
                        m.from as u64,
                        m.to as u64,
                        msg.msg_type as u64,
                        msg.term,
                        msg.index,
                        m.relays.len() as u64,
                    ]);
                    if !m.relays.is_empty() {
                        self.report.relayed += 1;
                    }
                    inbox[m.to].push(msg);
                }
                Err(e) => self.fail(format!("a message did not decode: {e}")),
            }
        }
        for (from, to_id, ok) in std::mem::take(&mut self.snapshot_reports) {
            if let Some(node) = self.members[from].node.as_mut() {
                let _ = node.driver.handle(DriverMsg::SnapshotStatus(to_id, ok));
            }
        }
        for (i, msgs) in inbox.into_iter().enumerate() {
            let tick = {
                let m = &mut self.members[i];
                if m.node.is_none() || m.paused_until > self.now {
                    continue;
                }
                let local = self.now as i64 + self.now as i64 * m.drift / 1000;
                let due = local as u64 >= m.next_tick;
                if due {
                    m.next_tick += TICK_MS;
                }
                due
            };
            let node = self.members[i].node.as_mut().expect("up");
            let mut result = Ok(true);
            for msg in msgs {
                result = node.driver.handle(DriverMsg::Raft(Box::new(msg)));
                if !matches!(result, Ok(true)) {
                    break;
                }
            }
            if matches!(result, Ok(true)) {
                result = node.driver.turn(tick);
            }
            let out =
                std::mem::take(&mut *node.outbox.msgs.lock().unwrap_or_else(|p| p.into_inner()));
            match result {
                Ok(true) => self.send(i, out),
                Ok(false) => {
                    // Only a member whose removal was asked for may leave; what it
                    // sent on its way out still goes.
                    if !self.removal_asked.contains(&i) {
                        self.fail(format!("m{} stopped on its own", i + 1));
                    }
                    self.send(i, out);
                    self.retire(i);
                }
                Err(e) => {
                    // A failed write: the member restarts from what its disk holds
                    // (meshd's own recovery reopens the database the same way).
                    self.trace.add(&[0xe770, i as u64]);
                    let why = e.to_string();
                    if !why.contains("Input/output error") && !why.contains("no space") {
                        self.fail(format!("m{} driver failed: {why}", i + 1));
                    }
                    self.stop(i, false, 50);
                }
            }
        }
        // Members whose power went during this step die with it.
        for i in 0..self.members.len() {
            if self.members[i].disk.was_cut() && !self.members[i].retired {
                let back = 100 + self.rng.below(1_000);
                if self.members[i].node.is_some() {
                    self.stop(i, true, back);
                } else {
                    let r = self.rng.next_u64();
                    self.members[i].disk.crash(|len| (r as usize) % (len + 1));
                    self.members[i].restart_at = Some(self.now + back);
                }
            }
        }
        let now = self.now;
        let (lift, keep): (Vec<_>, Vec<_>) =
            self.full_until.drain(..).partition(|(t, _)| *t <= now);
        self.full_until = keep;
        for (_, i) in lift {
            self.members[i].disk.set_capacity(None);
        }
        if !self.settling {
            self.clients_step();
            if !self.quiet {
                self.lease_step();
            }
            self.locks_step();
            self.reconfig_step();
            self.autopilot_step();
            if self.now.is_multiple_of(50) {
                self.expire_leases();
            }
        }
        self.now += 1;
    }

    /// Each member's state, for a failure report.
    fn describe(&self) -> String {
        let mut out = Vec::new();
        for (i, m) in self.members.iter().enumerate() {
            let state = match &m.node {
                _ if m.retired => "retired".to_string(),
                None => "down".to_string(),
                Some(n) => {
                    let r = &n.driver.raft().raft;
                    let conf = r.prs().conf().to_conf_state();
                    format!(
                        "{:?} term {} applied {} voters {:?} learners {:?}",
                        r.state,
                        r.term,
                        n.kv.applied_index(),
                        conf.voters,
                        conf.learners
                    )
                }
            };
            let flipped = if m.flipped { " (bit flipped)" } else { "" };
            out.push(format!("m{}: {state}{flipped}", i + 1));
        }
        out.join("; ")
    }

    /// Whether a bit may be flipped on one more member: the voters whose disks were
    /// never touched must stay a quorum even if every flipped one stays down, and no
    /// membership change may be under way (a flip and a removal together could leave
    /// fewer voters than a quorum, which no system survives).
    fn may_flip(&self) -> bool {
        let Some(l) = self.leader() else {
            return false;
        };
        if !matches!(self.reconfig, Reconfig::Idle) {
            return false;
        }
        let node = self.members[l].node.as_ref().expect("up");
        let voters = node.driver.raft().raft.prs().conf().to_conf_state().voters;
        // A dead machine counts as a flipped one: it may never answer again.
        let flipped = voters
            .iter()
            .filter(|&&id| {
                self.members
                    .get(id as usize - 1)
                    .is_some_and(|m| m.flipped || m.dead)
            })
            .count();
        let intact = voters.len() - flipped;
        intact > voters.len() / 2 + 1
    }

    /// Takes member `i` out of the run for good (removed from the cluster).
    fn retire(&mut self, i: usize) {
        self.members[i].node = None;
        self.mesh_stop(i);
        self.members[i].restart_at = None;
        self.members[i].retired = true;
        self.trace.add(&[0x7e71, i as u64]);
    }

    fn change_on(&mut self, member: usize, change: MemberChange) -> Waiter {
        let (tx, rx) = oneshot::channel();
        if let Some(node) = self.members[member].node.as_mut() {
            let _ = node
                .driver
                .handle(DriverMsg::ChangeMembers { change, reply: tx });
        }
        (rx, self.now)
    }

    /// Moves the membership change along: each step waits for its answer, then the
    /// next is proposed to whoever leads then. A refused or lost step ends the change
    /// (a learner added but never promoted stays a learner, which Raft allows).
    fn reconfig_step(&mut self) {
        use oneshot::error::TryRecvError::Empty;
        let state = std::mem::replace(&mut self.reconfig, Reconfig::Idle);
        self.reconfig = match state {
            Reconfig::Idle => Reconfig::Idle,
            Reconfig::Removing(i, (mut rx, at)) => match rx.try_recv() {
                Err(Empty) if self.now < at + OP_TIMEOUT_MS => Reconfig::Removing(i, (rx, at)),
                Ok(Ok(_)) => {
                    self.retire(i);
                    self.report.removed += 1;
                    // A new member with a fresh disk takes the next slot.
                    let slot = self.new_slot();
                    match self.leader() {
                        Some(l) => {
                            let id = slot as u64 + 1;
                            let member = member_record(id);
                            let w = self.change_on(
                                l,
                                MemberChange::Add {
                                    member,
                                    learner: true,
                                },
                            );
                            Reconfig::Adding(slot, w)
                        }
                        _ => Reconfig::Idle,
                    }
                }
                // Refused (not enough started members, another change in progress) or
                // unknown: if it applied, the member sees itself removed and leaves.
                _ => Reconfig::Idle,
            },
            Reconfig::Adding(slot, (mut rx, at)) => match rx.try_recv() {
                Err(Empty) if self.now < at + OP_TIMEOUT_MS => Reconfig::Adding(slot, (rx, at)),
                Ok(Ok(_)) => {
                    self.members[slot].retired = false;
                    self.members[slot].restart_at = Some(self.now);
                    // Nothing asked yet: the first promotion goes out in 300 ms.
                    let (_, rx) = oneshot::channel::<Result<Applied, ProposeError>>();
                    Reconfig::Promoting(slot, (rx, self.now), self.now + 300)
                }
                _ => Reconfig::Idle,
            },
            Reconfig::Promoting(slot, (mut rx, at), next_try) => match rx.try_recv() {
                Ok(Ok(_)) => {
                    self.report.promoted += 1;
                    Reconfig::Idle
                }
                _ if self.now > at + 10_000 => Reconfig::Idle,
                Err(Empty) if self.now < next_try => Reconfig::Promoting(slot, (rx, at), next_try),
                // Not answered yet, refused (not caught up) or not sent: ask the
                // leader again.
                _ => match self.leader() {
                    Some(l) => {
                        let id = self.members[slot].id;
                        let (rx, _) = self.change_on(l, MemberChange::Promote(id));
                        Reconfig::Promoting(slot, (rx, at), self.now + 300)
                    }
                    None => Reconfig::Promoting(slot, (rx, at), self.now + 300),
                },
            },
        };
    }

    /// What meshd's expiry task does on every member: the leader revokes expired
    /// leases through Raft.
    fn expire_leases(&mut self) {
        for i in self.up() {
            let node = self.members[i].node.as_ref().expect("up");
            for id in crate::raft::lease_expiry::to_revoke(&node.lessor, &node.status) {
                self.trace.add(&[0x1ea5e, id as u64]);
                let request = Request::LeaseRevoke(pb::LeaseRevokeRequest { id });
                // Nobody waits for the answer, as the expiry task does not.
                drop(self.propose_on(i, request));
            }
        }
    }

    /// A linearizable read's first half on `member`: its ReadIndex (answered at once
    /// when the skip-read-index bug is planted).
    fn read_index(&mut self, member: usize) -> oneshot::Receiver<Result<(), ProposeError>> {
        let (tx, rx) = oneshot::channel();
        if self.cfg.plant == Some(Plant::SkipReadIndex) {
            let _ = tx.send(Ok(()));
        } else if let Some(node) = self.members[member].node.as_mut() {
            let _ = node.driver.handle(DriverMsg::ReadIndex { reply: tx });
        }
        rx
    }

    fn propose_on(&mut self, member: usize, request: Request) -> Answer {
        let (tx, rx) = oneshot::channel();
        if let Some(node) = self.members[member].node.as_mut() {
            let _ = node.driver.handle(DriverMsg::Propose {
                request,
                auth: None,
                reply: tx,
            });
        }
        rx
    }

    fn random_up(&mut self) -> Option<usize> {
        let up = self.up();
        (!up.is_empty()).then(|| up[self.rng.below(up.len() as u64) as usize])
    }

    fn lease_step(&mut self) {
        use oneshot::error::TryRecvError::Empty;
        let stage = std::mem::replace(&mut self.lease, LeaseStage::Idle);
        self.lease = match stage {
            LeaseStage::Idle => match self.random_up() {
                Some(m) if self.rng.chance(20) => {
                    self.next_lease += 1;
                    let id = self.next_lease;
                    let ttl = 1 + self.rng.below(3) as i64;
                    let request = Request::LeaseGrant(pb::LeaseGrantRequest { id, ttl });
                    let rx = self.propose_on(m, request);
                    LeaseStage::Granting {
                        rx,
                        id,
                        invoke: self.now,
                    }
                }
                _ => LeaseStage::Idle,
            },
            LeaseStage::Granting { mut rx, id, invoke } => match rx.try_recv() {
                Err(Empty) if self.now < invoke + OP_TIMEOUT_MS => {
                    LeaseStage::Granting { rx, id, invoke }
                }
                Ok(Ok(Applied {
                    kind: AppliedKind::LeaseGrant { ttl, .. },
                    ..
                })) => match self.random_up() {
                    Some(m) => {
                        let request = Request::Put(pb::PutRequest {
                            key: lease_key(id).into_bytes(),
                            value: b"1".to_vec(),
                            lease: id,
                            ..Default::default()
                        });
                        LeaseStage::Putting {
                            rx: self.propose_on(m, request),
                            id,
                            ttl_ms: ttl as u64 * 1000,
                            granted_at: invoke,
                        }
                    }
                    None => LeaseStage::Idle,
                },
                _ => LeaseStage::Idle,
            },
            LeaseStage::Putting {
                mut rx,
                id,
                ttl_ms,
                granted_at,
            } => match rx.try_recv() {
                Err(Empty) if self.now < granted_at + ttl_ms => LeaseStage::Putting {
                    rx,
                    id,
                    ttl_ms,
                    granted_at,
                },
                Ok(Ok(_)) => LeaseStage::Reading {
                    id,
                    ttl_ms,
                    granted_at,
                    read: None,
                },
                _ => LeaseStage::Idle,
            },
            LeaseStage::Reading {
                id,
                ttl_ms,
                granted_at,
                read,
            } => self.lease_read(id, ttl_ms, granted_at, read),
        };
    }

    /// Takes the answer to a keep-alive: one answered in time renewed the lease.
    fn poll_keepalive(&mut self, granted_at: u64, ttl_ms: u64) {
        let Some((id, ka)) = self.keepalive.take() else {
            return;
        };
        match poll_keepalive_answer(self.now, ka, lease_deadline(granted_at, ttl_ms)) {
            KeepAliveOutcome::Waiting(ka) => self.keepalive = Some((id, ka)),
            KeepAliveOutcome::Renewed(sent) => {
                self.trace.add(&[0x4ee9, id as u64, sent]);
                self.renewed.insert(id, sent);
            }
            KeepAliveOutcome::Gone => {}
        }
    }

    fn lease_read(
        &mut self,
        id: i64,
        ttl_ms: u64,
        granted_at: u64,
        read: Option<(oneshot::Receiver<Result<(), ProposeError>>, usize)>,
    ) -> LeaseStage {
        use oneshot::error::TryRecvError::Empty;
        // The TTL runs from the grant, or from the last keep-alive that surely renewed.
        let granted_at = self.renewed.get(&id).copied().unwrap_or(0).max(granted_at);
        self.poll_keepalive(granted_at, ttl_ms);
        let give_up = granted_at + ttl_ms + 5_000;
        let keep = |read| LeaseStage::Reading {
            id,
            ttl_ms,
            granted_at,
            read,
        };
        match read {
            None if self.now >= give_up => LeaseStage::Idle,
            None if self.keepalive.is_none() && self.rng.chance(2) => {
                if let Some(m) = self.random_up() {
                    let request = Request::LeaseKeepAlive(pb::LeaseKeepAliveRequest { id });
                    let rx = self.propose_on(m, request);
                    self.keepalive = Some((id, (self.now, rx)));
                }
                keep(None)
            }
            None => match self.random_up() {
                Some(m) if self.rng.chance(50) => keep(Some((self.read_index(m), m))),
                _ => keep(None),
            },
            Some((mut rx, m)) => match rx.try_recv() {
                Err(Empty) => keep(Some((rx, m))),
                Ok(Ok(())) => {
                    let gone = self.members[m]
                        .node
                        .as_ref()
                        .and_then(|n| {
                            n.kv.range(&pb::RangeRequest {
                                key: lease_key(id).into_bytes(),
                                ..Default::default()
                            })
                            .ok()
                        })
                        .map(|r| r.kvs.is_empty());
                    match gone {
                        Some(true) if self.now < lease_deadline(granted_at, ttl_ms) => {
                            self.fail(format!(
                                "lease {id:x} (TTL {} s, granted at {granted_at} ms) expired \
                                 early: its key was gone at {} ms",
                                ttl_ms / 1000,
                                self.now
                            ));
                            LeaseStage::Idle
                        }
                        Some(true) => LeaseStage::Idle,
                        _ => keep(None),
                    }
                }
                _ => keep(None),
            },
        }
    }

    fn leader(&self) -> Option<usize> {
        self.up().into_iter().find(|&i| {
            let s = &self.members[i].node.as_ref().expect("up").status;
            s.leader() == self.members[i].id
        })
    }

    fn clients_step(&mut self) {
        for c in 0..self.clients.len() {
            self.poll_client(c);
            if !self.quiet && self.clients[c].is_none() && self.rng.chance(100) {
                self.invoke(c);
            }
        }
    }

    fn invoke(&mut self, c: usize) {
        let up = self.up();
        if up.is_empty() {
            return;
        }
        let member = up[self.rng.below(up.len() as u64) as usize];
        let key = key_name(self.rng.below(self.cfg.keys as u64) as usize);
        let input = match self.rng.below(10) {
            0..=3 => OpInput::Get,
            4..=7 => {
                self.next_value += 1;
                OpInput::Put(self.next_value)
            }
            _ => {
                self.next_value += 1;
                let expect = self.rng.below(self.next_value) + 1;
                OpInput::Cas {
                    expect,
                    new: self.next_value,
                }
            }
        };
        let waiting = match input {
            OpInput::Get => Waiting::Read(self.read_index(member)),
            OpInput::Put(v) => {
                let req = Request::Put(pb::PutRequest {
                    key: key.clone().into_bytes(),
                    value: v.to_string().into_bytes(),
                    ..Default::default()
                });
                Waiting::Write(self.propose_on(member, req))
            }
            OpInput::Cas { expect, new } => {
                let req = Request::Txn(pb::TxnRequest {
                    compare: vec![pb::Compare {
                        result: pb::compare::CompareResult::Equal as i32,
                        target: pb::compare::CompareTarget::Value as i32,
                        key: key.clone().into_bytes(),
                        target_union: Some(pb::compare::TargetUnion::Value(
                            expect.to_string().into_bytes(),
                        )),
                        ..Default::default()
                    }],
                    success: vec![pb::RequestOp {
                        request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                            key: key.clone().into_bytes(),
                            value: new.to_string().into_bytes(),
                            ..Default::default()
                        })),
                    }],
                    failure: vec![],
                });
                Waiting::Write(self.propose_on(member, req))
            }
        };
        self.trace.add(&[0x1b, c as u64, member as u64]);
        self.clients[c] = Some(InFlight {
            key,
            input,
            invoke: self.now,
            member,
            waiting,
        });
    }

    fn read_value(&self, member: usize, key: &str) -> Result<Option<u64>, String> {
        let node = self.members[member]
            .node
            .as_ref()
            .ok_or_else(|| "member down".to_string())?;
        let resp = node
            .kv
            .range(&pb::RangeRequest {
                key: key.as_bytes().to_vec(),
                ..Default::default()
            })
            .map_err(|e| e.to_string())?;
        match resp.kvs.first() {
            None => Ok(None),
            Some(kv) => std::str::from_utf8(&kv.value)
                .ok()
                .and_then(|v| v.parse().ok())
                .map(Some)
                .ok_or_else(|| format!("{key} holds a value no client wrote: {:?}", kv.value)),
        }
    }

    fn poll_client(&mut self, c: usize) {
        let Some(op) = self.clients[c].as_mut() else {
            return;
        };
        let timed_out = self.now >= op.invoke + OP_TIMEOUT_MS;
        enum Done {
            Not,
            Out(OpOutput),
            /// A read that failed: it had no effect and is left out of the history.
            Dropped,
        }
        let done = match &mut op.waiting {
            Waiting::Write(rx) => match rx.try_recv() {
                Ok(Ok(applied)) => match (op.input, applied.kind) {
                    (OpInput::Put(_), _) => Done::Out(OpOutput::Put),
                    (OpInput::Cas { .. }, AppliedKind::Txn(t)) => {
                        Done::Out(OpOutput::Cas(t.succeeded))
                    }
                    _ => Done::Out(OpOutput::Unknown),
                },
                Ok(Err(_)) | Err(oneshot::error::TryRecvError::Closed) => {
                    Done::Out(OpOutput::Unknown)
                }
                Err(oneshot::error::TryRecvError::Empty) if timed_out => {
                    Done::Out(OpOutput::Unknown)
                }
                Err(oneshot::error::TryRecvError::Empty) => Done::Not,
            },
            Waiting::Read(rx) => match rx.try_recv() {
                Ok(Ok(())) => Done::Out(OpOutput::Get(None)),
                Ok(Err(_)) | Err(oneshot::error::TryRecvError::Closed) => Done::Dropped,
                Err(oneshot::error::TryRecvError::Empty) if timed_out => Done::Dropped,
                Err(oneshot::error::TryRecvError::Empty) => Done::Not,
            },
        };
        let op = match done {
            Done::Not => return,
            _ => self.clients[c].take().expect("in flight"),
        };
        let output = match done {
            // The member went down after confirming the read and before answering it:
            // the client sees a lost connection, and the read had no effect.
            Done::Out(OpOutput::Get(_)) if self.members[op.member].node.is_none() => {
                self.trace.add(&[0x2b, c as u64, 0]);
                return;
            }
            Done::Out(OpOutput::Get(_)) => match self.read_value(op.member, &op.key) {
                Ok(v) => OpOutput::Get(v),
                Err(e) => {
                    self.fail(e);
                    return;
                }
            },
            Done::Out(o) => o,
            _ => {
                self.trace.add(&[0x2b, c as u64, 0]);
                return;
            }
        };
        let unknown = output == OpOutput::Unknown;
        if let (OpInput::Put(v), OpOutput::Put) = (op.input, output) {
            self.acked.entry(op.key.clone()).or_default().insert(v);
        }
        self.trace.add(&[0x2b, c as u64, 1, op_word(output)]);
        self.report.ops += 1;
        self.report.history.push(SimOp {
            client: c,
            key: op.key,
            input: op.input,
            output,
            invoke: op.invoke * 1_000_000,
            ret: (!unknown).then_some(self.now * 1_000_000),
        });
    }

    /// One fault, chosen by the seed.
    fn inject_fault(&mut self) {
        let n = self.members.len();
        let active: Vec<usize> = (0..n).filter(|&j| !self.members[j].retired).collect();
        let i = active[self.rng.below(active.len() as u64) as usize];
        self.report.faults += 1;
        let kind = self.rng.below(14);
        self.trace.add(&[0xfa, kind, i as u64]);
        match kind {
            // Power cut, back after a while.
            0 | 1 => {
                let back = 100 + self.rng.below(1_500);
                self.stop(i, true, back);
            }
            // Process kill (page cache kept).
            2 => {
                let back = 50 + self.rng.below(800);
                self.stop(i, false, back);
            }
            // The leader's next fsync fails.
            3 => {
                let target = self.leader().unwrap_or(i);
                self.members[target].disk.fail_next_syncs(1);
            }
            // Isolate one member both ways.
            4 => {
                self.cut.clear();
                for j in 0..n {
                    if j != i {
                        self.cut.insert((i, j));
                        self.cut.insert((j, i));
                    }
                }
            }
            // Partial connectivity: one pair cannot talk, everyone else can.
            5 => {
                let j = (i + 1 + self.rng.below(n as u64 - 1) as usize) % n;
                self.cut.clear();
                self.cut.insert((i, j));
                self.cut.insert((j, i));
            }
            // A one-way cut: i hears the others, they do not hear i.
            6 => {
                self.cut.clear();
                for j in 0..n {
                    if j != i {
                        self.cut.insert((i, j));
                    }
                }
            }
            // A slow, lossy, duplicating network.
            7 => {
                self.slow.insert(i, 20 + self.rng.below(200));
                self.loss_per_mille = self.rng.below(100);
                self.dup_per_mille = self.rng.below(50);
            }
            // A member's machine dies for good and an empty node joins the mesh:
            // autopilot must replace it. One at a time, and only while the intact
            // voters keep a quorum without it.
            8 if matches!(self.reconfig, Reconfig::Idle)
                && !self.members[i].retired
                && self.may_flip()
                && !self
                    .members
                    .iter()
                    .any(|m| (m.dead || m.spare || m.flipped) && !m.retired) =>
            {
                self.report.machines_died += 1;
                self.machine_dies(i);
            }
            // A pause (a stalled process, a long GC-like stop).
            9 => {
                self.members[i].paused_until = self.now + 100 + self.rng.below(1_500);
            }
            // A full disk for a while: writes fail until space is back.
            10 => {
                let used = self.members[i].disk.used();
                self.members[i]
                    .disk
                    .set_capacity(Some(used + self.rng.below(64 * 1024)));
                self.full_until
                    .push((self.now + 200 + self.rng.below(1_000), i));
            }
            // A bit flipped at rest in one of a stopped member's files: at most a
            // minority of members, so the rest keep a quorum.
            11 if self.may_flip() => {
                let back = 100 + self.rng.below(500);
                self.stop(i, false, back);
                let files = self.members[i].disk.files();
                let pick = self.rng.below(files.len() as u64) as usize;
                if let Some((path, len)) = files.get(pick).filter(|(_, len)| *len > 0) {
                    let bit = self.rng.below(*len as u64 * 8);
                    self.members[i]
                        .disk
                        .flip_bit(std::path::Path::new(path), bit);
                    self.members[i].flipped = true;
                    self.report.flips += 1;
                }
            }
            // Replace a member: remove it, add a new one, promote it.
            12 if matches!(self.reconfig, Reconfig::Idle)
                && !self.members[i].retired
                && !self.members[i].dead
                && !self.members.iter().any(|m| m.flipped && !m.retired) =>
            {
                if let Some(l) = self.leader() {
                    let id = self.members[i].id;
                    let w = self.change_on(l, MemberChange::Remove(id));
                    self.removal_asked.insert(i);
                    self.reconfig = Reconfig::Removing(i, w);
                }
            }
            // A power cut in the middle of what the member is doing: after a few
            // more disk operations (between a write and its fsync, a rename and its
            // directory's fsync).
            13 => {
                let ops = self.rng.below(12);
                self.members[i].disk.cut_after(ops);
            }
            // Heal the network.
            _ => self.heal_network(),
        }
    }

    fn heal_network(&mut self) {
        self.cut.clear();
        self.slow.clear();
        self.loss_per_mille = 0;
        self.dup_per_mille = 0;
    }

    /// Runs the whole schedule and the end-of-run checks.
    pub fn run(mut self) -> Report {
        let mut next_fault = 500;
        while self.now < self.cfg.fault_ms {
            if self.now >= next_fault {
                self.inject_fault();
                next_fault = self.now + 200 + self.rng.below(1_000);
            }
            self.step();
        }
        // Heal: every link whole, every disk working, every member up.
        self.heal_network();
        for i in 0..self.members.len() {
            self.members[i].disk.fail_next_syncs(0);
            self.members[i].disk.set_capacity(None);
            self.members[i].paused_until = 0;
            if self.members[i].node.is_none() && self.members[i].restart_at.is_none() {
                // Failed to start earlier: already reported.
                continue;
            }
            if self.members[i].node.is_none() {
                self.members[i].restart_at = Some(self.now);
            }
        }
        let heal_start = self.now;
        let mut acked_after_heal = false;
        let ops_before = self.report.history.len();
        while self.now < heal_start + self.cfg.heal_ms {
            self.step();
            acked_after_heal |= self.report.history[ops_before..]
                .iter()
                .any(|op| matches!(op.output, OpOutput::Put | OpOutput::Cas(_)));
        }
        if !acked_after_heal {
            self.fail(format!(
                "liveness: no write was acknowledged within {} ms after healing",
                self.cfg.heal_ms
            ));
        }
        // Let the clients finish, then the members converge. Idle lock clients keep
        // their leases alive, so proposals go on; the members settle with nothing
        // proposed for some heartbeats (a follower learns of the last commit from
        // the next one).
        let end = self.now + OP_TIMEOUT_MS + 2_000;
        self.quiet = true;
        while self.now < end {
            self.step();
        }
        self.settling = true;
        let end = self.now + SETTLE_MS;
        while self.now < end {
            self.step();
        }
        self.final_checks();
        self.report.trace_hash = self.trace.0;
        self.report
    }

    /// After the run: every member applied the same index and holds the same keyspace
    /// (HashKV), every acknowledged write's key is readable, and every key's value is
    /// one a client wrote.
    fn final_checks(&mut self) {
        // A member with a flipped bit may have refused to start or quarantined itself;
        // any other member must be up and serving.
        let mut up = Vec::new();
        // A member removed while its answer was lost never hears of it (meshd's
        // members refuse a removed member's messages): it is out of the cluster, as
        // the leader's configuration says.
        let members_now: Option<Vec<u64>> = self.leader().map(|l| {
            let node = self.members[l].node.as_ref().expect("up");
            let cs = node.driver.raft().raft.prs().conf().to_conf_state();
            cs.voters.into_iter().chain(cs.learners).collect()
        });
        for i in 0..self.members.len() {
            let m = &self.members[i];
            if m.retired || members_now.as_ref().is_some_and(|ids| !ids.contains(&m.id)) {
                continue;
            }
            if m.dead {
                // Still a member: autopilot must have removed it within its timeout
                // (and a few seconds to act) unless it died too late for that.
                if let Some(late) = self.autopilot.overdue(i, self.now) {
                    self.fail(format!(
                        "autopilot did not remove m{}, dead for {late} ms",
                        i + 1
                    ));
                }
                continue;
            }
            let corrupt = m.node.as_ref().map(|n| n.status.is_corrupt());
            match (corrupt, m.flipped) {
                (Some(false), _) => up.push(i),
                (Some(true), true) => self.report.flips_detected += 1,
                (None, true) => {}
                (Some(true), false) => self.fail(format!(
                    "m{} quarantined itself with no corruption injected",
                    i + 1
                )),
                (None, false) => self.fail(format!("m{} is down at the end", i + 1)),
            }
        }
        let mut seen: Option<(usize, u64, i64, u32)> = None;
        for &i in &up {
            let node = self.members[i].node.as_ref().expect("up");
            let applied = node.kv.applied_index();
            let rev = node.kv.current_revision();
            let hash = match node.kv.hash_kv(rev) {
                Ok((h, _, _)) => h,
                Err(e) => {
                    self.fail(format!("m{}: HashKV failed: {e}", i + 1));
                    continue;
                }
            };
            self.trace.add(&[applied, rev as u64, u64::from(hash)]);
            match seen {
                None => seen = Some((i, applied, rev, hash)),
                Some((j, a, r, h)) => {
                    if a == applied && (r, h) != (rev, hash) {
                        self.fail(format!(
                            "replicas diverged at applied index {a}: m{} has revision {r} \
                             hash {h:08x}, m{} has revision {rev} hash {hash:08x}",
                            j + 1,
                            i + 1
                        ));
                    } else if a != applied {
                        let state = self.describe();
                        self.fail(format!(
                            "replicas did not converge: m{} applied {a}, m{} applied \
                             {applied}: {state}",
                            j + 1,
                            i + 1
                        ));
                    }
                }
            }
        }
        for &i in &up {
            if let Err(e) = self.check_watch_history(i) {
                self.fail(format!("m{}: watch history: {e}", i + 1));
            }
        }
        // A final linearizable read of every key through the leader is part of the
        // history: it must see the last write.
        if let Some(l) = self.leader() {
            for k in 0..self.cfg.keys {
                let key = key_name(k);
                match self.read_value(l, &key) {
                    Ok(v) => self.report.history.push(SimOp {
                        client: usize::MAX,
                        key,
                        input: OpInput::Get,
                        output: OpOutput::Get(v),
                        invoke: self.now * 1_000_000,
                        ret: Some(self.now * 1_000_000 + 1),
                    }),
                    Err(e) => self.fail(e),
                }
            }
        } else {
            let members = self.describe();
            self.fail(format!("no leader at the end: {members}"));
        }
    }
}

impl World {
    /// What a watch from revision 1 would replay on member `i`: events in revision
    /// order with no (revision, key) twice, replaying to exactly what a range reads
    /// now, and the same from any later start revision (a resumed watch).
    fn check_watch_history(&mut self, i: usize) -> Result<(), String> {
        let node = self.members[i].node.as_ref().ok_or("member down")?;
        let kv = node.kv.clone();
        let cur = kv.current_revision();
        let all = kv
            .events(1, cur, b"\0", b"\0", false, 0)
            .map_err(|e| e.to_string())?;
        let mut last = (0i64, Vec::new());
        let mut state: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        for e in &all {
            let k = e.kv.as_ref().ok_or("an event without a key")?;
            let at = (k.mod_revision, k.key.clone());
            if at <= last && !(at.0 == last.0 && at.1 > last.1) {
                return Err(format!(
                    "event at revision {} for {:?} follows revision {} for {:?}",
                    at.0,
                    String::from_utf8_lossy(&at.1),
                    last.0,
                    String::from_utf8_lossy(&last.1)
                ));
            }
            last = at;
            if e.r#type == crate::proto::mvccpb::event::EventType::Delete as i32 {
                state.remove(&k.key);
            } else {
                state.insert(k.key.clone(), k.value.clone());
            }
        }
        let now = kv
            .range(&pb::RangeRequest {
                key: b"\0".to_vec(),
                range_end: b"\0".to_vec(),
                ..Default::default()
            })
            .map_err(|e| e.to_string())?;
        let read: BTreeMap<Vec<u8>, Vec<u8>> =
            now.kvs.into_iter().map(|k| (k.key, k.value)).collect();
        if read != state {
            return Err(format!(
                "replaying {} events gives {} keys, a range reads {}",
                all.len(),
                state.len(),
                read.len()
            ));
        }
        for _ in 0..3 {
            let from = 1 + self.rng.below(cur.max(1) as u64) as i64;
            let resumed = kv
                .events(from, cur, b"\0", b"\0", false, 0)
                .map_err(|e| e.to_string())?;
            let expect: Vec<_> = all
                .iter()
                .filter(|e| e.kv.as_ref().is_some_and(|k| k.mod_revision >= from))
                .cloned()
                .collect();
            if resumed != expect {
                return Err(format!(
                    "resumed from revision {from}: {} events, where the full history has {}",
                    resumed.len(),
                    expect.len()
                ));
            }
        }
        self.trace.add(&[all.len() as u64]);
        Ok(())
    }
}

fn op_word(o: OpOutput) -> u64 {
    match o {
        OpOutput::Get(None) => 1,
        OpOutput::Get(Some(v)) => 2 + (v << 8),
        OpOutput::Put => 3,
        OpOutput::Cas(b) => 4 + u64::from(b),
        OpOutput::Unknown => 7,
    }
}

/// Runs one seed.
pub fn run(cfg: SimConfig) -> Report {
    World::new(cfg).run()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A world of seed `seed` without clients or faults, stepped until a leader is
    /// elected (at most 5 simulated seconds).
    fn quiet_world_until_a_leader(seed: u64) -> World {
        let mut cfg = SimConfig::new(seed);
        cfg.clients = 0;
        let mut w = World::new(cfg);
        w.quiet = true;
        while w.leader().is_none() && w.now < 5_000 {
            w.step();
        }
        w
    }

    /// A leader asked to remove itself while writes keep coming: the Ready that
    /// applies its removal also persists new entries, and raft-rs panicked looking up
    /// the leader's own progress (found by seeds 36, 40 and 99 of `meshd-sim`).
    #[test]
    fn a_leader_removing_itself_under_load_steps_down_and_the_rest_go_on() {
        let mut w = quiet_world_until_a_leader(1);
        // Followers count as started once the leader has heard from them lately.
        for _ in 0..1_000 {
            w.step();
        }
        let l = w.leader().expect("a leader within 5 s");
        let id = w.members[l].id;
        w.removal_asked.insert(l);
        let put = |v: u64| {
            Request::Put(pb::PutRequest {
                key: b"k".to_vec(),
                value: v.to_string().into_bytes(),
                ..Default::default()
            })
        };
        let mut waiting = Vec::new();
        for v in 0..20 {
            waiting.push(w.propose_on(l, put(v)));
        }
        let (mut removal, _) = w.change_on(l, MemberChange::Remove(id));
        for v in 20..200 {
            waiting.push(w.propose_on(l, put(v)));
            w.step();
            if w.members[l].retired {
                break;
            }
        }
        let answer = removal.try_recv();
        assert!(
            matches!(answer, Ok(Ok(_))),
            "the removal applied: {answer:?}"
        );
        assert!(w.members[l].retired, "the removed leader left");
        let deadline = w.now + 5_000;
        while w.leader().is_none() && w.now < deadline {
            w.step();
        }
        let next = w.leader().expect("the other two elect a leader");
        assert_ne!(next, l);
        assert!(w.report.failures.is_empty(), "{:?}", w.report.failures);
    }

    /// While the leader hands leadership over, raft-rs refuses proposals, and one a
    /// follower forwarded then was lost: its client waited for its timeout. The
    /// leader now holds such proposals until the transfer ends.
    #[test]
    fn a_write_forwarded_during_a_leader_transfer_is_not_lost() {
        let mut w = quiet_world_until_a_leader(3);
        let l = w.leader().expect("a leader within 5 s");
        let (f, t) = match l {
            0 => (1, 2),
            1 => (0, 2),
            _ => (0, 1),
        };
        // The transfer target hears nothing, so the transfer lasts until raft-rs
        // gives it up, an election timeout later.
        for j in [l, f] {
            w.cut.insert((t, j));
            w.cut.insert((j, t));
        }
        let (tx, mut transfer) = oneshot::channel();
        let target = w.members[t].id;
        w.members[l]
            .node
            .as_mut()
            .expect("the leader runs")
            .driver
            .handle(DriverMsg::TransferLeader { target, reply: tx })
            .expect("the driver takes the transfer");
        let transferring = |w: &World| {
            w.members[l]
                .node
                .as_ref()
                .is_some_and(|n| n.driver.raft().raft.lead_transferee.is_some())
        };
        w.step();
        assert!(transferring(&w), "the transfer is under way");
        let put = |v: &[u8]| {
            Request::Put(pb::PutRequest {
                key: b"k".to_vec(),
                value: v.to_vec(),
                ..Default::default()
            })
        };
        // One write through the follower, forwarded to the leader; one on the leader,
        // which parks it rather than answer "no leader".
        let mut forwarded = w.propose_on(f, put(b"f"));
        let mut own = w.propose_on(l, put(b"l"));
        w.step();
        assert!(
            transferring(&w),
            "the transfer is still under way as the writes arrive"
        );
        let deadline = w.now + 5_000;
        let (mut a, mut b) = (None, None);
        while a.is_none() || b.is_none() {
            a = a.or_else(|| forwarded.try_recv().ok());
            b = b.or_else(|| own.try_recv().ok());
            assert!(w.now < deadline, "a write was never answered: {a:?} {b:?}");
            w.step();
        }
        assert!(
            matches!(a, Some(Ok(_))),
            "the forwarded write applied: {a:?}"
        );
        assert!(
            matches!(b, Some(Ok(_))),
            "the leader's write applied: {b:?}"
        );
        assert!(
            matches!(transfer.try_recv(), Ok(Err(_)) | Err(_)),
            "the transfer to a cut-off member did not succeed"
        );
        assert!(w.report.failures.is_empty(), "{:?}", w.report.failures);
    }

    #[test]
    fn a_run_is_a_function_of_its_seed() {
        let mut cfg = SimConfig::new(7);
        cfg.fault_ms = 2_000;
        cfg.heal_ms = 2_000;
        let a = run(cfg.clone());
        let b = run(cfg);
        assert_eq!(a.trace_hash, b.trace_hash);
        assert_eq!(a.history.len(), b.history.len());
        assert!(a.ops > 0, "{a:?}");
    }
}
