//! The deterministic simulator's runs checked end to end: [`mesh_core::sim`] runs a
//! cluster for one seed; this adds the linearizability check of its client history and
//! sums runs over a range of seeds (used by `meshd-sim` and `tests/sim.rs`).

use mesh_core::sim::{self, OpInput, OpOutput, Plant, SimConfig};

use crate::linearizability::{self, Input, Op, Output, Verdict};

/// Steps the linearizability search may take per run before it calls a history
/// inconclusive.
const CHECK_BUDGET: u64 = 2_000_000;

/// One seed's outcome after every check.
#[derive(Debug, Default)]
pub struct Checked {
    pub seed: u64,
    pub faults: u64,
    pub ops: u64,
    pub trace_hash: u64,
    pub flips: u64,
    pub flips_detected: u64,
    pub removed: u64,
    pub promoted: u64,
    /// Locks acquired.
    pub locks: u64,
    /// Raft messages relayed by the mesh around a cut link.
    pub relayed: u64,
    /// Machines that died for good; voters autopilot removed, learners it added and
    /// promoted.
    pub machines_died: u64,
    pub autopilot: (u64, u64, u64),
    /// Every failed check, each a readable paragraph.
    pub failures: Vec<String>,
}

/// Runs `seed` with `members` members (and a planted bug, if any) and checks it.
pub fn run_seed(seed: u64, members: usize, plant: Option<Plant>) -> Checked {
    let mut cfg = SimConfig::new(seed);
    cfg.members = members;
    cfg.plant = plant;
    // A panic anywhere in meshd's code under simulation is a failure of this seed,
    // reported like any other (the other seeds still run).
    let report = match std::panic::catch_unwind(|| sim::run(cfg)) {
        Ok(r) => r,
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic".into());
            return Checked {
                seed,
                failures: vec![format!("panicked: {what}")],
                ..Default::default()
            };
        }
    };
    let mut failures = report.failures;
    let ops: Vec<Op> = report.history.iter().map(to_checker).collect();
    match linearizability::check(&ops, CHECK_BUDGET) {
        Verdict::Linearizable => {}
        Verdict::Violation(w) => failures.push(w.to_string()),
        Verdict::Inconclusive { key } => failures.push(format!(
            "the history of {key:?} is too concurrent to check within the budget"
        )),
    }
    Checked {
        seed,
        faults: report.faults,
        ops: report.ops,
        trace_hash: report.trace_hash,
        flips: report.flips,
        flips_detected: report.flips_detected,
        removed: report.removed,
        promoted: report.promoted,
        locks: report.locks,
        relayed: report.relayed,
        machines_died: report.machines_died,
        autopilot: (
            report.autopilot_removed,
            report.autopilot_added,
            report.autopilot_promoted,
        ),
        failures,
    }
}

fn to_checker(op: &sim::SimOp) -> Op {
    Op {
        client: op.client,
        key: op.key.clone(),
        input: match op.input {
            OpInput::Get => Input::Get,
            OpInput::Put(v) => Input::Put(v),
            OpInput::Cas { expect, new } => Input::Cas { expect, new },
        },
        output: match op.output {
            OpOutput::Get(v) => Output::Get(v),
            OpOutput::Put => Output::Put,
            OpOutput::Cas(b) => Output::Cas(b),
            OpOutput::Unknown => Output::Unknown,
        },
        invoke: op.invoke,
        ret: op.ret,
    }
}
