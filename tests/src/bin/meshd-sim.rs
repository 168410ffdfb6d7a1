//! meshd-sim: runs whole meshd clusters in the deterministic simulator, seed by seed.
//!
//!   meshd-sim --seeds 1..200                 # runs=N faults=N ops=N failures=N
//!   meshd-sim --seed 17 --trace-hash         # the same trace hash twice: a replay
//!   meshd-sim --seeds 1..50 --plant double-apply   # a planted bug must be caught
//!   meshd-sim mesh --peers 1000 --seed 1     # rounds_to_converge=R bytes_per_peer_per_s=B
//!
//! Exit status: 0 when every run passed its checks, 1 when any failed (each failure is
//! printed with its seed, which replays it), 2 for a usage error.

use std::process::ExitCode;

use clap::Parser;
use mesh_core::sim::mesh::{self as mesh_sim, MeshSimConfig};
use mesh_core::sim::Plant;
use mesh_tests::sim::run_seed;

#[derive(Parser)]
#[command(
    name = "meshd-sim",
    version,
    about = "Deterministic simulation of meshd clusters"
)]
struct Args {
    /// Seeds to run, as A..B (B excluded).
    #[arg(long, value_parser = parse_range, conflicts_with = "seed")]
    seeds: Option<(u64, u64)>,
    /// One seed to run.
    #[arg(long)]
    seed: Option<u64>,
    /// Run the seed twice and print its trace hash each time (they must match).
    #[arg(long, requires = "seed")]
    trace_hash: bool,
    /// Voting members per cluster (3 to 7).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(3..=7))]
    members: u64,
    /// Plant a bug: ack-before-fsync, skip-read-index, double-apply, no-dir-fsync.
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
    },
}

/// Most memory a mesh run may plan to use (this machine has 24 GiB).
const MESH_MEMORY_LIMIT: u64 = 12 << 30;

fn mesh(peers: usize, degree: usize, seed: u64, max_rounds: u64) -> ExitCode {
    let mut cfg = MeshSimConfig::new(peers, seed);
    cfg.degree = degree.max(1);
    cfg.max_rounds = max_rounds;
    let need = cfg.estimated_bytes();
    if need > MESH_MEMORY_LIMIT {
        eprintln!(
            "meshd-sim: {peers} peers would need about {} GiB (every peer holds every \
             entry, and a stamp of it per neighbour); the limit is {} GiB",
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
            ExitCode::SUCCESS
        }
        None => {
            println!("rounds_to_converge=none bytes_per_peer_per_s=0");
            eprintln!("meshd-sim: the mesh did not converge within {max_rounds} rounds");
            ExitCode::FAILURE
        }
    }
}

fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s.split_once("..").ok_or("expected A..B")?;
    let a: u64 = a.parse().map_err(|e| format!("{a}: {e}"))?;
    let b: u64 = b.parse().map_err(|e| format!("{b}: {e}"))?;
    if b <= a {
        return Err(format!("empty range {s}"));
    }
    Ok((a, b))
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
    }) = args.command
    {
        return mesh(peers, degree, seed, max_rounds);
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
    let (from, to) = match (args.seeds, args.seed) {
        (Some(r), _) => r,
        (None, Some(s)) => (s, s + 1),
        (None, None) => (0, 100),
    };
    let (mut runs, mut faults, mut ops, mut failed) = (0u64, 0u64, 0u64, 0u64);
    let (mut flips, mut detected, mut removed, mut promoted) = (0u64, 0u64, 0u64, 0u64);
    for seed in from..to {
        let r = run_seed(seed, members, args.plant);
        runs += 1;
        faults += r.faults;
        ops += r.ops;
        flips += r.flips;
        detected += r.flips_detected;
        removed += r.removed;
        promoted += r.promoted;
        if !r.failures.is_empty() {
            failed += 1;
            println!("seed {seed} FAILED (replay: meshd-sim --seed {seed}):");
            for f in &r.failures {
                for line in f.lines() {
                    println!("  {line}");
                }
            }
        }
    }
    println!(
        "bits_flipped={flips} refused_or_quarantined={detected} \
         members_removed={removed} members_added_and_promoted={promoted}"
    );
    println!("runs={runs} faults={faults} ops={ops} failures={failed}");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
