//! meshd-sim: runs whole meshd clusters in the deterministic simulator, seed by seed.
//!
//!   meshd-sim --seeds 1..200                 # runs=N faults=N ops=N failures=N
//!   meshd-sim --duration 1h                  # seeds from 0 (or --seeds A..) for an hour
//!   meshd-sim --seed 17 --trace-hash         # the same trace hash twice: a replay
//!   meshd-sim --seeds 1..50 --plant double-apply   # a planted bug must be caught
//!   meshd-sim mesh --peers 1000 --seed 1     # rounds_to_converge=R bytes_per_peer_per_s=B
//!
//! Exit status: 0 when every run passed its checks, 1 when any failed (each failure is
//! printed with its seed, which replays it), 2 for a usage error.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use clap::Parser;
use mesh_core::sim::mesh::{self as mesh_sim, MeshSimConfig};
use mesh_core::sim::Plant;
use mesh_tests::sim::{run_seed, Checked};

#[derive(Parser)]
#[command(
    name = "meshd-sim",
    version,
    about = "Deterministic simulation of meshd clusters"
)]
struct Args {
    /// Seeds to run, as A..B (B excluded), or A.. with --duration.
    #[arg(long, value_parser = parse_range, conflicts_with = "seed")]
    seeds: Option<(u64, Option<u64>)>,
    /// Run seeds one after another for this long (90s, 10m, 1h), then stop.
    #[arg(long, value_parser = parse_duration, conflicts_with = "seed")]
    duration: Option<std::time::Duration>,
    /// Seeds run at once, each on its own thread (default: one per core).
    #[arg(long)]
    jobs: Option<std::num::NonZeroUsize>,
    /// One seed to run.
    #[arg(long)]
    seed: Option<u64>,
    /// Run the seed twice and print its trace hash each time (they must match).
    #[arg(long, requires = "seed")]
    trace_hash: bool,
    /// Voting members per cluster (3 to 7).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(3..=7))]
    members: u64,
    /// Plant a bug: ack-before-fsync, skip-read-index, double-apply,
    /// early-lease-expiry, no-dir-fsync.
    #[arg(long, value_parser = parse_plant)]
    plant: Option<Plant>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Simulate the gossip mesh alone: N peers on a sparse random graph, each running
    /// meshd's topology CRDT and its sync; prints the gossip rounds until every peer
    /// holds every peer's entry, and the steady-state bytes per peer per second.
    Mesh {
        /// Number of peers.
        #[arg(long, default_value_t = 1000)]
        peers: usize,
        /// Random other peers each peer connects to.
        #[arg(long, default_value_t = 3)]
        degree: usize,
        /// Seed of the graph and of every choice.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Give up after this many gossip rounds.
        #[arg(long, default_value_t = 100)]
        max_rounds: u64,
        /// After converging, split the mesh in two halves for this many rounds, heal
        /// it, and count the rounds until it converges again (0: no split).
        #[arg(long, default_value_t = 5)]
        partition_rounds: u64,
    },
}

/// Most memory a mesh run may plan to use (this machine has 24 GiB).
const MESH_MEMORY_LIMIT: u64 = 20 << 30;

fn mesh(
    peers: usize,
    degree: usize,
    seed: u64,
    max_rounds: u64,
    partition_rounds: u64,
) -> ExitCode {
    let mut cfg = MeshSimConfig::new(peers, seed);
    cfg.degree = degree.max(1);
    cfg.max_rounds = max_rounds;
    cfg.partition_rounds = partition_rounds;
    let need = cfg.estimated_bytes();
    if need > MESH_MEMORY_LIMIT {
        eprintln!(
            "meshd-sim: {peers} peers would need about {} GiB (every peer holds a \
             table slot per entry and per route; healing a split doubles that: see \
             --partition-rounds); the limit is {} GiB",
            need >> 30,
            MESH_MEMORY_LIMIT >> 30
        );
        return ExitCode::from(2);
    }
    let started = std::time::Instant::now();
    let r = mesh_sim::run(&cfg);
    match r.rounds_to_converge {
        Some(rounds) => {
            println!(
                "rounds_to_converge={rounds} bytes_per_peer_per_s={:.1}",
                r.bytes_per_peer_per_s
            );
            println!(
                "peers={peers} degree={} seed={seed} ms_to_converge={} \
                 bytes_per_peer_to_converge={:.0} frames_entries={} frames_summary={} \
                 frames_digest={} wall_s={:.1}",
                cfg.degree,
                r.ms_to_converge.unwrap_or(0),
                r.bytes_per_peer_to_converge,
                r.frames.0,
                r.frames.1,
                r.frames.2,
                started.elapsed().as_secs_f64()
            );
            if partition_rounds == 0 {
                return ExitCode::SUCCESS;
            }
            let recover = r
                .rounds_to_recover
                .map_or_else(|| "none".to_string(), |n| n.to_string());
            println!(
                "partition: cut_links={} halves_collected_each_other={} \
                 rounds_to_recover={recover} bytes_per_peer_to_recover={:.0}",
                r.cut_links, r.partition_collected, r.bytes_per_peer_to_recover
            );
            if r.rounds_to_recover.is_none() || !r.partition_collected {
                eprintln!("meshd-sim: the mesh did not recover from the partition");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        None => {
            println!("rounds_to_converge=none bytes_per_peer_per_s=0");
            eprintln!("meshd-sim: the mesh did not converge within {max_rounds} rounds");
            ExitCode::FAILURE
        }
    }
}

fn parse_range(s: &str) -> Result<(u64, Option<u64>), String> {
    let (a, b) = s.split_once("..").ok_or("expected A..B")?;
    let a: u64 = a.parse().map_err(|e| format!("{a}: {e}"))?;
    if b.is_empty() {
        return Ok((a, None));
    }
    let b: u64 = b.parse().map_err(|e| format!("{b}: {e}"))?;
    if b <= a {
        return Err(format!("empty range {s}"));
    }
    Ok((a, Some(b)))
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    mesh_tests::parse_duration(s).map_err(|e| e.to_string())
}

/// Sums over the seeds run.
#[derive(Default)]
struct Totals {
    runs: u64,
    faults: u64,
    ops: u64,
    failed: u64,
    flips: u64,
    detected: u64,
    removed: u64,
    promoted: u64,
    locks: u64,
    relayed: u64,
    died: u64,
    autopilot: (u64, u64, u64),
}

/// Runs seeds `from..to` (or from `from` until `until`) on `jobs` threads, and prints
/// each failure in seed order as the seeds before it are done.
fn run_seeds(
    from: u64,
    to: Option<u64>,
    until: Option<Instant>,
    jobs: usize,
    members: usize,
    plant: Option<Plant>,
) -> Totals {
    let next = AtomicU64::new(from);
    let (tx, rx) = mpsc::channel::<Checked>();
    let mut t = Totals::default();
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            let tx = tx.clone();
            let next = &next;
            scope.spawn(move || loop {
                if until.is_some_and(|u| Instant::now() >= u) {
                    break;
                }
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if to.is_some_and(|to| seed >= to) {
                    break;
                }
                if tx.send(run_seed(seed, members, plant)).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        let mut done: BTreeMap<u64, Checked> = BTreeMap::new();
        let mut print_from = from;
        let mut out = std::io::stdout().lock();
        for r in rx {
            done.insert(r.seed, r);
            while let Some(r) = done.remove(&print_from) {
                print_from += 1;
                t.runs += 1;
                t.faults += r.faults;
                t.ops += r.ops;
                t.flips += r.flips;
                t.detected += r.flips_detected;
                t.removed += r.removed;
                t.promoted += r.promoted;
                t.locks += r.locks;
                t.relayed += r.relayed;
                t.died += r.machines_died;
                t.autopilot.0 += r.autopilot.0;
                t.autopilot.1 += r.autopilot.1;
                t.autopilot.2 += r.autopilot.2;
                if !r.failures.is_empty() {
                    t.failed += 1;
                    let seed = r.seed;
                    // A closed stdout (a pager quit) only loses the report.
                    let _ = writeln!(out, "seed {seed} FAILED (replay: meshd-sim --seed {seed}):");
                    for line in r.failures.iter().flat_map(|f| f.lines()) {
                        let _ = writeln!(out, "  {line}");
                    }
                }
            }
        }
    });
    t
}

fn parse_plant(s: &str) -> Result<Plant, String> {
    Plant::parse(s).ok_or_else(|| {
        let names: Vec<_> = Plant::ALL.iter().map(|(n, _)| *n).collect();
        format!("unknown bug {s:?} (one of: {})", names.join(", "))
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::Mesh {
        peers,
        degree,
        seed,
        max_rounds,
        partition_rounds,
    }) = args.command
    {
        return mesh(peers, degree, seed, max_rounds, partition_rounds);
    }
    let members = args.members as usize;
    if args.trace_hash {
        let seed = args.seed.expect("clap requires --seed");
        let a = run_seed(seed, members, args.plant);
        println!("seed={seed} trace_hash={:016x}", a.trace_hash);
        let b = run_seed(seed, members, args.plant);
        println!("seed={seed} trace_hash={:016x}", b.trace_hash);
        return if a.trace_hash == b.trace_hash {
            ExitCode::SUCCESS
        } else {
            eprintln!("meshd-sim: the replay differs: the run is not deterministic");
            ExitCode::FAILURE
        };
    }
    let (from, to) = match (args.seeds, args.seed, args.duration) {
        (Some(r), _, _) => r,
        (None, Some(s), _) => (s, Some(s + 1)),
        (None, None, Some(_)) => (0, None),
        (None, None, None) => (0, Some(100)),
    };
    if to.is_none() && args.duration.is_none() {
        eprintln!("meshd-sim: an open range of seeds (A..) needs --duration");
        return ExitCode::from(2);
    }
    let jobs = args
        .jobs
        .or_else(|| std::thread::available_parallelism().ok())
        .map_or(1, |n| n.get());
    let started = Instant::now();
    let until = args.duration.map(|d| started + d);
    let t = run_seeds(from, to, until, jobs, members, args.plant);
    let secs = started.elapsed().as_secs_f64();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "bits_flipped={} refused_or_quarantined={} members_removed={} \
         members_added_and_promoted={} locks_acquired={} messages_relayed={} \
         seeds_per_hour={:.0} jobs={jobs}",
        t.flips,
        t.detected,
        t.removed,
        t.promoted,
        t.locks,
        t.relayed,
        t.runs as f64 * 3600.0 / secs.max(1e-9)
    );
    let _ = writeln!(
        out,
        "machines_died={} autopilot_removed={} autopilot_added={} autopilot_promoted={}",
        t.died, t.autopilot.0, t.autopilot.1, t.autopilot.2
    );
    let _ = writeln!(
        out,
        "runs={} faults={} ops={} failures={}",
        t.runs, t.faults, t.ops, t.failed
    );
    let failed = t.failed;
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
