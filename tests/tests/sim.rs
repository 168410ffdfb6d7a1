//! The deterministic simulator as a test: whole clusters on a simulated clock, network
//! and disk (`mesh_core::sim`), each run a pure function of its seed. A failing seed is
//! printed and replays exactly with `meshd-sim --seed S`.

use mesh_core::sim::Plant;
use mesh_tests::sim::run_seed;

/// Seeds every `cargo test` runs (a run takes about 0.15 s in a release build, a few
/// seconds in a debug one); `meshd-sim --seeds A..B` runs thousands.
const SEEDS: std::ops::Range<u64> = 0..12;

/// Runs the seeds; returns every failure, and the locks acquired in all.
fn failures(
    seeds: std::ops::Range<u64>,
    members: usize,
    plant: Option<Plant>,
) -> (Vec<String>, u64) {
    let runs: Vec<_> = seeds.map(|seed| run_seed(seed, members, plant)).collect();
    let locks = runs.iter().map(|r| r.locks).sum();
    let failed = runs
        .into_iter()
        .filter(|r| !r.failures.is_empty())
        .map(|r| format!("seed {}:\n{}", r.seed, r.failures.join("\n")))
        .collect();
    (failed, locks)
}

#[test]
fn clusters_of_three_pass_every_check_under_faults() {
    let (failed, locks) = failures(SEEDS, 3, None);
    assert!(failed.is_empty(), "{}", failed.join("\n\n"));
    // The lock clients took the lock, so the one-holder check had holds to compare.
    assert!(locks >= SEEDS.end, "only {locks} locks acquired");
}

#[test]
fn clusters_of_five_pass_every_check_under_faults() {
    let (failed, _) = failures(100..104, 5, None);
    assert!(failed.is_empty(), "{}", failed.join("\n\n"));
}

#[test]
fn a_seed_replays_to_the_same_trace() {
    let a = run_seed(3, 3, None);
    let b = run_seed(3, 3, None);
    assert_eq!(a.trace_hash, b.trace_hash);
    assert_eq!(a.ops, b.ops);
    assert_ne!(run_seed(4, 3, None).trace_hash, a.trace_hash);
}

/// Each planted bug is caught by some seed of a small range that passes without it:
/// the checks can fail, and fail because of the bug.
#[test]
fn every_planted_bug_is_caught() {
    for (name, plant) in Plant::ALL {
        let caught = (0..40).find(|&seed| {
            !run_seed(seed, 3, Some(plant)).failures.is_empty()
                && run_seed(seed, 3, None).failures.is_empty()
        });
        assert!(
            caught.is_some(),
            "the planted bug {name} was not caught in 40 seeds"
        );
    }
}
