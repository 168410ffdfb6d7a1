//! The fault-injection runner: a cluster of spawned `meshd` processes, concurrent
//! clients recording a history, watchers, and faults chosen from a printed seed.
//!
//! After the run the history is checked for linearizability ([`crate::linearizability`]),
//! the watchers' event streams against the complete revision log, and the members for
//! convergence (same HashKV at the same revision). Replay a run with its seed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, EventType, Txn, TxnOp, WatchOptions};
use mesh_core::proto::meshpb::{
    fault_injection_client::FaultInjectionClient, ClearFaultsRequest, SetLinkFaultRequest,
};

use crate::linearizability::{self, Input, Op, Output, Verdict};
use crate::{etcd_client, status, Cluster as _, ClusterOpts, Process, ProcessCluster};

/// What one run does.
#[derive(Clone, Debug)]
pub struct ChaosConfig {
    pub seed: u64,
    /// 3 or 5 members.
    pub members: usize,
    /// How long clients run while faults are injected.
    pub duration: Duration,
    pub clients: usize,
    /// Keys the clients share at a time (few, so operations contend).
    pub keys: usize,
    /// How long one generation of keys is used before the clients move to fresh keys.
    /// Short generations keep each key's history small (and its unknown outcomes few),
    /// so the checker, which works key by key, always reaches a verdict.
    pub key_generation: Duration,
    /// Whether "replace a member" is among the faults.
    pub replace: bool,
    /// Read serializably (local, possibly stale): not linearizable by design, so the
    /// checker must report violations. Checks the harness itself (`chaos --self-check`).
    pub serializable_reads: bool,
}

impl ChaosConfig {
    pub fn new(seed: u64, members: usize, duration: Duration) -> ChaosConfig {
        ChaosConfig {
            seed,
            members,
            duration,
            clients: 4,
            keys: 3,
            key_generation: Duration::from_secs(1),
            replace: true,
            serializable_reads: false,
        }
    }
}

/// What one run found.
#[derive(Debug, Default)]
pub struct RunReport {
    pub seed: u64,
    pub members: usize,
    pub faults: Vec<String>,
    /// Operations in the checked history, and how many of them had unknown outcomes.
    pub ops: usize,
    pub unknown: usize,
    pub watch_events: usize,
    pub violations: Vec<String>,
    /// The linearizability search ran out of budget on some key.
    pub inconclusive: bool,
}

impl std::fmt::Display for RunReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "chaos run CHAOS_SEED={} members={}: {} faults, {} ops checked ({} unknown), {} watch events, {} violations{}",
            self.seed,
            self.members,
            self.faults.len(),
            self.ops,
            self.unknown,
            self.watch_events,
            self.violations.len(),
            if self.inconclusive { " (linearizability inconclusive)" } else { "" }
        )?;
        for x in &self.faults {
            writeln!(f, "  fault: {x}")?;
        }
        for v in &self.violations {
            writeln!(f, "  VIOLATION: {v}")?;
        }
        Ok(())
    }
}

/// SplitMix64: tiny, seedable, and stable across versions (a seed must replay).
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

/// The seed from `CHAOS_SEED`, or `default`.
pub fn seed_from_env(default: u64) -> u64 {
    std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(default)
}

/// A revision's event as watchers see it: key and value (None for a delete).
type Event = (i64, String, Option<u64>);

/// Per-request client timeout: an operation without an answer by then is unknown.
const OP_TIMEOUT: Duration = Duration::from_secs(2);

struct Shared {
    t0: Instant,
    stop: AtomicBool,
    next_value: AtomicU64,
    history: Mutex<Vec<Op>>,
    /// Writes acknowledged to clients: revision → (key, value or None for a delete).
    acked: Mutex<BTreeMap<i64, (String, Option<u64>)>>,
    /// Client addresses by member slot (a replaced member gets a new one).
    addrs: Mutex<Vec<SocketAddr>>,
    violations: Mutex<Vec<String>>,
}

impl Shared {
    fn now(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }
    fn violation(&self, v: String) {
        eprintln!("chaos: VIOLATION: {v}");
        self.violations.lock().unwrap().push(v);
    }
}

fn key_name(generation: u64, i: usize) -> String {
    format!("chaos/g{generation:04}/k{i}")
}

async fn client_for(addrs: &[SocketAddr]) -> etcd_client::Client {
    let eps: Vec<String> = addrs.iter().map(|a| format!("http://{a}")).collect();
    let opts = etcd_client::ConnectOptions::new()
        .with_timeout(OP_TIMEOUT)
        .with_connect_timeout(Duration::from_secs(1));
    etcd_client::Client::connect(eps, Some(opts))
        .await
        .expect("etcd-client connects lazily")
}

/// One client: random operations on the shared keys, each recorded.
async fn run_client(sh: Arc<Shared>, id: usize, cfg: ChaosConfig, mut rng: Rng) {
    let keys = cfg.keys;
    let read_opts = cfg
        .serializable_reads
        .then(|| etcd_client::GetOptions::new().with_serializable());
    let addrs = sh.addrs.lock().unwrap().clone();
    let mut c = client_for(&addrs).await;
    let mut seen: BTreeMap<String, u64> = BTreeMap::new();
    let mut failures = 0;
    while !sh.stop.load(Ordering::Relaxed) {
        let generation =
            sh.t0.elapsed().as_millis() as u64 / cfg.key_generation.as_millis().max(1) as u64;
        let key = key_name(generation, rng.below(keys as u64) as usize);
        let input = match rng.below(10) {
            0..=3 => Input::Get,
            4..=6 => Input::Put(sh.next_value.fetch_add(1, Ordering::Relaxed)),
            7..=8 => Input::Cas {
                expect: seen.get(&key).copied().unwrap_or(0),
                new: sh.next_value.fetch_add(1, Ordering::Relaxed),
            },
            _ => Input::Delete,
        };
        let invoke = sh.now();
        let result = tokio::time::timeout(OP_TIMEOUT + Duration::from_millis(500), async {
            match input {
                Input::Get => c.get(key.as_str(), read_opts.clone()).await.map(|r| {
                    let v = r.kvs().first().map(|kv| parse_value(kv.value()));
                    (Output::Get(v), None)
                }),
                Input::Put(v) => c
                    .put(key.as_str(), v.to_string(), None)
                    .await
                    .map(|r| (Output::Put, Some((revision(r.header()), Some(v))))),
                Input::Cas { expect, new } => {
                    let txn = Txn::new()
                        .when([Compare::value(
                            key.as_str(),
                            CompareOp::Equal,
                            expect.to_string(),
                        )])
                        .and_then([TxnOp::put(key.as_str(), new.to_string(), None)]);
                    c.txn(txn).await.map(|r| {
                        let w = r.succeeded().then(|| (revision(r.header()), Some(new)));
                        (Output::Cas(r.succeeded()), w)
                    })
                }
                Input::Delete => c.delete(key.as_str(), None).await.map(|r| {
                    let w = (r.deleted() > 0).then(|| (revision(r.header()), None));
                    (Output::Delete(r.deleted() > 0), w)
                }),
            }
        })
        .await;
        let ret = sh.now();
        let (output, ret) = match result {
            Ok(Ok((out, write))) => {
                if let Output::Get(Some(v)) = out {
                    seen.insert(key.clone(), v);
                }
                if let Input::Put(v) | Input::Cas { new: v, .. } = input {
                    if matches!(out, Output::Put | Output::Cas(true)) {
                        seen.insert(key.clone(), v);
                    }
                }
                if let Some((rev, value)) = write {
                    sh.acked.lock().unwrap().insert(rev, (key.clone(), value));
                }
                failures = 0;
                (out, Some(ret))
            }
            // A failed read changed nothing: leave it out of the history.
            _ if input == Input::Get => {
                failures += 1;
                backoff(failures).await;
                continue;
            }
            // A write without an answer may have been applied (or may still be).
            _ => {
                failures += 1;
                backoff(failures).await;
                (Output::Unknown, None)
            }
        };
        sh.history.lock().unwrap().push(Op {
            client: id,
            key,
            input,
            output,
            invoke,
            ret,
        });
        if failures > 3 {
            // The endpoints may have changed (a member was replaced).
            let addrs = sh.addrs.lock().unwrap().clone();
            c = client_for(&addrs).await;
        }
        tokio::time::sleep(rng.millis(2, 15)).await;
    }
}

async fn backoff(failures: u32) {
    tokio::time::sleep(Duration::from_millis(50 * u64::from(failures.min(6)))).await;
}

fn revision(h: Option<&etcd_client::ResponseHeader>) -> i64 {
    h.map_or(0, |h| h.revision())
}

fn parse_value(v: &[u8]) -> u64 {
    // Only this runner writes these keys; anything else is itself a finding, and
    // u64::MAX never matches a written value, so the checker will flag it.
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(u64::MAX)
}

/// One watcher bound to member `slot`: watches the key prefix from revision 1 and,
/// whenever the stream breaks (e.g. the member is killed), resumes at last + 1.
/// Stops once it has seen revision `until` (set when the run ends). Returns every
/// event received; order and duplicates are checked as they come, gaps at the end.
async fn run_watcher(sh: Arc<Shared>, slot: usize, until: Arc<AtomicI64>) -> Vec<Event> {
    let mut events: Vec<Event> = Vec::new();
    let mut last = 0i64;
    while last < until.load(Ordering::Relaxed) {
        let addr = sh.addrs.lock().unwrap()[slot];
        let mut c = etcd_client(addr).await;
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(last + 1);
        let Ok(Ok(mut stream)) =
            tokio::time::timeout(Duration::from_secs(2), c.watch("chaos/", Some(opts))).await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        loop {
            let msg = tokio::select! {
                m = stream.message() => m,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    if last >= until.load(Ordering::Relaxed) { break } else { continue }
                }
            };
            let Ok(Some(resp)) = msg else { break };
            if resp.canceled() {
                sh.violation(format!(
                    "watcher on slot {slot} canceled at revision {}: {}",
                    last + 1,
                    resp.cancel_reason()
                ));
                break;
            }
            for e in resp.events() {
                let Some(kv) = e.kv() else { continue };
                let rev = kv.mod_revision();
                if rev <= last {
                    sh.violation(format!(
                        "watcher on slot {slot}: revision {rev} after {last} (out of order or duplicate)"
                    ));
                }
                last = last.max(rev);
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                let value = match e.event_type() {
                    EventType::Put => Some(parse_value(kv.value())),
                    EventType::Delete => None,
                };
                events.push((rev, key, value));
            }
        }
    }
    events
}

/// The faults a run picks from.
#[derive(Clone, Copy, Debug)]
enum Fault {
    KillFollower,
    KillLeader,
    KillQuorum,
    KillAll,
    Pause,
    Isolate,
    OneWay,
    Delay,
    Replace,
}

const FAULTS: &[Fault] = &[
    Fault::KillFollower,
    Fault::KillLeader,
    Fault::KillQuorum,
    Fault::KillAll,
    Fault::Pause,
    Fault::Isolate,
    Fault::OneWay,
    Fault::Delay,
    Fault::Replace,
];

/// The cluster side of a run: processes, their peer names, and what is broken now.
struct ChaosCluster {
    pc: ProcessCluster,
    opts_args: Vec<String>,
    peer_names: Vec<u64>,
    paused: Vec<usize>,
    killed: Vec<usize>,
    next_name: usize,
}

fn signal(p: &Process, sig: &str) {
    if let Some(c) = &p.child {
        let _ = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(c.id().to_string())
            .status();
    }
}

fn mesh_addr_of(p: &Process) -> String {
    p.args
        .iter()
        .find_map(|a| a.strip_prefix("--listen-mesh="))
        .expect("every process has --listen-mesh")
        .to_string()
}

impl ChaosCluster {
    fn n(&self) -> usize {
        self.pc.procs.len()
    }

    fn addr(&self, i: usize) -> SocketAddr {
        self.pc.procs[i].client
    }

    /// (slot of the leader, member ID of every slot) as the members report them.
    async fn roles(&self) -> Option<(usize, Vec<u64>)> {
        let mut ids = Vec::with_capacity(self.n());
        let mut leader = 0;
        for p in &self.pc.procs {
            let s = status(p.client).await?;
            ids.push(s.header()?.member_id());
            if s.leader() == 0 {
                return None;
            }
            leader = s.leader();
        }
        let slot = ids.iter().position(|id| *id == leader)?;
        Some((slot, ids))
    }

    async fn fault_client(
        &self,
        i: usize,
    ) -> Option<FaultInjectionClient<tonic::transport::Channel>> {
        FaultInjectionClient::connect(format!("http://{}", self.addr(i)))
            .await
            .ok()
    }

    async fn set_fault(
        &self,
        on: usize,
        peer: usize,
        drop_out: bool,
        drop_in: bool,
        delay_ms: u32,
    ) {
        if let Some(mut f) = self.fault_client(on).await {
            let req = SetLinkFaultRequest {
                peer: self.peer_names[peer],
                drop_out,
                drop_in,
                delay_ms,
            };
            if let Err(e) = f.set_link_fault(req).await {
                eprintln!("chaos: set_link_fault on slot {on}: {e}");
            }
        }
    }

    /// Applies `fault`; returns a description (or None if it did not apply now).
    async fn inject(&mut self, fault: Fault, rng: &mut Rng, sh: &Shared) -> Option<String> {
        let n = self.n();
        let (leader, ids) = self.roles().await?;
        let follower = (leader + 1 + rng.below(n as u64 - 1) as usize) % n;
        Some(match fault {
            Fault::KillFollower => {
                self.kill(follower).await;
                format!("SIGKILL follower slot {follower}")
            }
            Fault::KillLeader => {
                self.kill(leader).await;
                format!("SIGKILL leader slot {leader}")
            }
            Fault::KillQuorum => {
                let q = n / 2 + 1;
                let first = rng.below(n as u64) as usize;
                let slots: Vec<usize> = (0..q).map(|j| (first + j) % n).collect();
                for &s in &slots {
                    self.kill(s).await;
                }
                format!("SIGKILL quorum {slots:?}")
            }
            Fault::KillAll => {
                for s in 0..n {
                    self.kill(s).await;
                }
                "SIGKILL all".to_string()
            }
            Fault::Pause => {
                let s = if rng.below(2) == 0 { leader } else { follower };
                signal(&self.pc.procs[s], "STOP");
                self.paused.push(s);
                format!("SIGSTOP slot {s} (leader was {leader})")
            }
            Fault::Isolate => {
                let s = if rng.below(2) == 0 { leader } else { follower };
                self.partition(s).await;
                format!("partition: slot {s} isolated (leader was {leader})")
            }
            Fault::OneWay => {
                // The leader's frames to one follower are dropped; the follower's
                // still arrive (it may campaign and disrupt).
                self.set_fault(leader, follower, true, false, 0).await;
                format!("one-way drop: leader slot {leader} -> slot {follower}")
            }
            Fault::Delay => {
                let ms = 20 + rng.below(180) as u32;
                for o in (0..n).filter(|o| *o != leader) {
                    self.set_fault(leader, o, false, false, ms).await;
                    self.set_fault(o, leader, false, false, ms).await;
                }
                format!("delay {ms}ms on every link of leader slot {leader}")
            }
            Fault::Replace => self.replace(follower, ids[follower], leader, sh).await?,
        })
    }

    /// Removes the member in `slot` and starts a fresh node in its place that joins
    /// through `--peer` (autopilot adds it as a learner and promotes it).
    async fn replace(
        &mut self,
        slot: usize,
        id: u64,
        leader: usize,
        sh: &Shared,
    ) -> Option<String> {
        let mut c = etcd_client(self.addr(leader)).await;
        tokio::time::timeout(Duration::from_secs(5), c.member_remove(id))
            .await
            .ok()?
            .ok()?;
        self.pc.procs[slot].kill9();
        let name = format!("r{}", self.next_name);
        self.next_name += 1;
        let client = crate::free_addr();
        let mesh = crate::free_addr();
        let metrics = crate::free_addr();
        let seed = mesh_addr_of(&self.pc.procs[leader]);
        let mut args = vec![
            format!("--name={name}"),
            format!("--data-dir={}", self.pc.dir.path().join(&name).display()),
            format!("--listen-client={client}"),
            format!("--listen-mesh={mesh}"),
            format!("--listen-metrics={metrics}"),
            format!("--peer={seed}"),
        ];
        args.extend(self.opts_args.iter().cloned());
        let mut p = Process {
            log: self.pc.dir.path().join(format!("{name}.log")),
            name: name.clone(),
            client,
            metrics,
            args,
            child: None,
        };
        p.spawn();
        self.pc.procs[slot] = p;
        sh.addrs.lock().unwrap()[slot] = client;
        let name_of_new = crate::eventually(
            "the new member's peer name",
            Duration::from_secs(20),
            || crate::mesh_name(client),
        )
        .await;
        self.peer_names[slot] = name_of_new;
        Some(format!(
            "replace: member {id:x} (slot {slot}) removed, fresh node {name} joined via --peer"
        ))
    }

    /// Waits until every slot is a voter of one agreed leader (after healing).
    async fn wait_healthy(&self, deadline: Duration) -> bool {
        let end = Instant::now() + deadline;
        while Instant::now() < end {
            if let Some((_, ids)) = self.roles().await {
                let mut c = etcd_client(self.addr(0)).await;
                if let Ok(Ok(m)) =
                    tokio::time::timeout(Duration::from_secs(2), c.member_list()).await
                {
                    let voters: Vec<u64> = m
                        .members()
                        .iter()
                        .filter(|m| !m.is_learner())
                        .map(|m| m.id())
                        .collect();
                    if ids.iter().all(|id| voters.contains(id)) && voters.len() == self.n() {
                        return true;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }
}

impl crate::Cluster for ChaosCluster {
    fn size(&self) -> usize {
        self.pc.procs.len()
    }

    fn endpoint(&self, i: usize) -> SocketAddr {
        self.addr(i)
    }

    fn is_up(&self, i: usize) -> bool {
        self.pc.procs[i].child.is_some()
    }

    async fn stop(&mut self, i: usize) {
        crate::Cluster::stop(&mut self.pc, i).await
    }

    /// SIGKILL, remembered so that `heal` restarts it.
    async fn kill(&mut self, i: usize) {
        self.pc.procs[i].kill9();
        self.killed.push(i);
    }

    async fn restart(&mut self, i: usize) {
        self.pc.restart(i)
    }

    /// Undoes every fault: resumes paused members, restarts killed ones, clears links.
    async fn heal(&mut self) {
        for i in std::mem::take(&mut self.paused) {
            signal(&self.pc.procs[i], "CONT");
        }
        for i in std::mem::take(&mut self.killed) {
            self.pc.restart(i);
        }
        for i in 0..self.n() {
            if let Some(mut f) = self.fault_client(i).await {
                let _ = f.clear_faults(ClearFaultsRequest {}).await;
            }
        }
    }

    /// The names learned at start and after each replacement: a paused member
    /// could not be asked.
    async fn mesh_names(&self) -> Vec<u64> {
        self.peer_names.clone()
    }
}

/// Runs one seeded chaos run and checks everything it recorded.
pub async fn run(cfg: &ChaosConfig) -> RunReport {
    eprintln!(
        "chaos: run with CHAOS_SEED={} members={} duration={:?}",
        cfg.seed, cfg.members, cfg.duration
    );
    let mut rng = Rng::new(cfg.seed);
    let n = cfg.members;
    let opts = ClusterOpts::default();
    let opts_args = vec![
        "--unsafe-fault-injection".to_string(),
        format!("--voters={n}"),
        "--stabilization-time=500ms".to_string(),
        format!("--tick={}ms", opts.tick.as_millis()),
        format!("--election-ticks={}", opts.election_ticks),
        "--heartbeat-ticks=2".to_string(),
        "--mesh-heartbeat=100ms".to_string(),
        "--mesh-gossip-interval=100ms".to_string(),
    ];
    let extra = opts_args[..3].to_vec();
    let pc = ProcessCluster::start_with(n, opts, |_, mesh| {
        let initial = (0..mesh.len())
            .map(|i| format!("p{i}={}", mesh[i]))
            .collect::<Vec<_>>()
            .join(",");
        let mut f = vec![format!("--initial-cluster={initial}")];
        f.extend(extra.iter().cloned());
        f
    });
    let addrs = pc.addrs();
    // As `wait_for_leader`, but a cluster that never elects one shows its members' logs
    // (a member that could not bind its port, say).
    let elected = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Some(l) = crate::agreed_leader(&addrs, 0).await {
                return l;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    if elected.is_err() {
        let logs: Vec<String> = (0..n)
            .map(|i| format!("--- p{i}:\n{}", pc.log(i)))
            .collect();
        panic!(
            "CHAOS_SEED={}: no leader all members agree on after 30s\n{}",
            cfg.seed,
            logs.join("\n")
        );
    }
    let mut peer_names = Vec::new();
    for a in &addrs {
        peer_names.push(
            crate::eventually("peer name", Duration::from_secs(10), || {
                crate::mesh_name(*a)
            })
            .await,
        );
    }
    let mut cluster = ChaosCluster {
        pc,
        opts_args,
        peer_names,
        paused: Vec::new(),
        killed: Vec::new(),
        next_name: 0,
    };
    let sh = Arc::new(Shared {
        t0: Instant::now(),
        stop: AtomicBool::new(false),
        next_value: AtomicU64::new(1),
        history: Mutex::new(Vec::new()),
        acked: Mutex::new(BTreeMap::new()),
        addrs: Mutex::new(addrs),
        violations: Mutex::new(Vec::new()),
    });

    let clients: Vec<_> = (0..cfg.clients)
        .map(|i| {
            let r = Rng::new(rng.next_u64());
            tokio::spawn(run_client(sh.clone(), i, cfg.clone(), r))
        })
        .collect();
    let watch_until = Arc::new(AtomicI64::new(i64::MAX));
    let watchers: Vec<_> = (0..2.min(n))
        .map(|slot| tokio::spawn(run_watcher(sh.clone(), slot, watch_until.clone())))
        .collect();

    let mut report = RunReport {
        seed: cfg.seed,
        members: n,
        ..RunReport::default()
    };
    let end = Instant::now() + cfg.duration;
    while Instant::now() < end {
        tokio::time::sleep(rng.millis(300, 1000)).await;
        let choices: Vec<Fault> = FAULTS
            .iter()
            .copied()
            .filter(|f| cfg.replace || !matches!(f, Fault::Replace))
            .collect();
        let fault = choices[rng.below(choices.len() as u64) as usize];
        let at = sh.t0.elapsed().as_secs_f64();
        let Some(what) = cluster.inject(fault, &mut rng, &sh).await else {
            continue;
        };
        eprintln!("chaos: {at:.1}s {what}");
        tokio::time::sleep(rng.millis(500, 2500)).await;
        cluster.heal().await;
        report.faults.push(format!("{at:.1}s {what}"));
        if !cluster.wait_healthy(Duration::from_secs(30)).await {
            sh.violation(format!("no healthy cluster 30s after healing '{what}'"));
            break;
        }
    }
    sh.stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.await;
    }
    cluster.heal().await;
    let addrs = sh.addrs.lock().unwrap().clone();

    // Convergence: every member at the same revision with the same HashKV.
    let converged = converge(&addrs).await;
    let final_rev = match converged {
        Ok(rev) => rev,
        Err(e) => {
            sh.violation(e);
            0
        }
    };
    // A final linearizable read of every key joins the history: every acknowledged
    // write must show. One range read is one point in time for all keys.
    let mut c = client_for(&addrs).await;
    let invoke = sh.now();
    match c
        .get("chaos/", Some(etcd_client::GetOptions::new().with_prefix()))
        .await
    {
        Ok(r) => {
            let ret = sh.now();
            let values: BTreeMap<String, u64> = r
                .kvs()
                .iter()
                .map(|kv| {
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    (key, parse_value(kv.value()))
                })
                .collect();
            let mut history = sh.history.lock().unwrap();
            let keys: std::collections::BTreeSet<String> = history
                .iter()
                .map(|o| o.key.clone())
                .chain(values.keys().cloned())
                .collect();
            for key in keys {
                let v = values.get(&key).copied();
                history.push(Op {
                    client: usize::MAX,
                    key,
                    input: Input::Get,
                    output: Output::Get(v),
                    invoke,
                    ret: Some(ret),
                });
            }
        }
        Err(e) => sh.violation(format!("final read of the chaos keys: {e}")),
    }

    // Watchers: caught up to the final revision, then compared with the full log.
    let reference = full_log(addrs[0], final_rev).await;
    check_log(&reference, final_rev, &sh);
    watch_until.store(final_rev, Ordering::Relaxed);
    for (slot, w) in watchers.into_iter().enumerate() {
        let events = match tokio::time::timeout(Duration::from_secs(20), w).await {
            Ok(events) => events.unwrap_or_default(),
            Err(_) => {
                sh.violation(format!(
                    "watcher on slot {slot} did not reach revision {final_rev} within 20s"
                ));
                continue;
            }
        };
        report.watch_events += events.len();
        if events != reference {
            let first_diff = events
                .iter()
                .zip(&reference)
                .position(|(a, b)| a != b)
                .unwrap_or(events.len().min(reference.len()));
            sh.violation(format!(
                "watcher on slot {slot} saw {} events, the log has {}; first difference at #{first_diff}: saw {:?}, log {:?}",
                events.len(),
                reference.len(),
                events.get(first_diff),
                reference.get(first_diff)
            ));
        }
    }

    let history = sh.history.lock().unwrap().clone();
    report.ops = history.len();
    report.unknown = history.iter().filter(|o| o.ret.is_none()).count();
    match linearizability::check(&history, 20_000_000) {
        Verdict::Linearizable => {}
        Verdict::Violation(w) => sh.violation(format!("linearizability: {w}")),
        Verdict::Inconclusive { key } => {
            eprintln!("chaos: linearizability search on {key} ran out of budget");
            report.inconclusive = true;
        }
    }
    report.violations = sh.violations.lock().unwrap().clone();
    if !report.violations.is_empty() {
        eprintln!("chaos: logs kept in {}", cluster.pc.dir.path().display());
        let _ = cluster.pc.dir.keep();
    }
    report
}

/// Waits until all members report the same revision and HashKV there.
async fn converge(addrs: &[SocketAddr]) -> Result<i64, String> {
    let end = Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    while Instant::now() < end {
        let mut seen = Vec::new();
        for a in addrs {
            let mut c = etcd_client(*a).await;
            let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(2), c.status()).await else {
                break;
            };
            let rev = revision(s.header());
            let Ok(Ok(h)) = tokio::time::timeout(Duration::from_secs(2), c.hash_kv(rev)).await
            else {
                break;
            };
            seen.push((rev, h.hash()));
        }
        if seen.len() == addrs.len() && seen.iter().all(|s| *s == seen[0]) {
            return Ok(seen[0].0);
        }
        last = format!("{seen:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!(
        "members did not converge to one (revision, HashKV): {last}"
    ))
}

/// Every event on the chaos keys from revision 1 to `to`, read by a fresh watch.
async fn full_log(addr: SocketAddr, to: i64) -> Vec<Event> {
    let mut out = Vec::new();
    let mut c = etcd_client(addr).await;
    let opts = WatchOptions::new().with_prefix().with_start_revision(1);
    let Ok(mut stream) = c.watch("chaos/", Some(opts)).await else {
        return out;
    };
    let end = Instant::now() + Duration::from_secs(10);
    while out.last().is_none_or(|e: &Event| e.0 < to) && Instant::now() < end {
        let Ok(Ok(Some(resp))) =
            tokio::time::timeout(Duration::from_secs(2), stream.message()).await
        else {
            break;
        };
        for e in resp.events() {
            if let Some(kv) = e.kv() {
                let value = match e.event_type() {
                    EventType::Put => Some(parse_value(kv.value())),
                    EventType::Delete => None,
                };
                out.push((
                    kv.mod_revision(),
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    value,
                ));
            }
        }
    }
    out
}

/// The log has every revision 2..=to exactly once (only this runner writes, one key
/// per revision), and every acknowledged write at its revision.
fn check_log(log: &[Event], to: i64, sh: &Shared) {
    let revs: Vec<i64> = log.iter().map(|e| e.0).collect();
    let expected: Vec<i64> = (2..=to).collect();
    if revs != expected {
        let gap = expected.iter().find(|r| !revs.contains(r));
        sh.violation(format!(
            "the revision log to {to} is not contiguous: {} events, first missing {gap:?}",
            revs.len()
        ));
    }
    let by_rev: BTreeMap<i64, &Event> = log.iter().map(|e| (e.0, e)).collect();
    for (rev, (key, value)) in sh.acked.lock().unwrap().iter() {
        match by_rev.get(rev) {
            Some((_, k, v)) if k == key && v == value => {}
            other => sh.violation(format!(
                "acknowledged write at revision {rev} ({key} = {value:?}) is not in the log: {other:?}"
            )),
        }
    }
}
