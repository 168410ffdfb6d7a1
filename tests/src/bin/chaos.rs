//! The long mode of the fault-injection runner: seeded chaos runs back to back for as
//! long as asked, then a summary (runs, faults injected, operations checked,
//! violations). Exits 1 if any run found a violation.
//!
//! cargo build --bins && target/debug/chaos --duration 10m [--run 30s] [--members 3|5|both] [--seed N]
//! `--self-check` reads serializably (stale by design) and succeeds only if the
//! checker reports violations.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use mesh_tests::chaos::{run, ChaosConfig};
use mesh_tests::parse_duration;

fn main() -> anyhow::Result<()> {
    let mut total = Duration::from_secs(300);
    let mut per_run = Duration::from_secs(30);
    let mut members = vec![3, 5];
    let mut self_check = false;
    let mut seed: u64 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--duration" => total = parse_duration(&val()?)?,
            "--run" => per_run = parse_duration(&val()?)?,
            // Serializable reads: the runs must report violations, or the harness is blind.
            "--self-check" => self_check = true,
            "--seed" => seed = val()?.parse().context("--seed is a number")?,
            "--members" => {
                members = match val()?.as_str() {
                    "3" => vec![3],
                    "5" => vec![5],
                    "both" => vec![3, 5],
                    m => bail!("--members is 3, 5 or both, not {m}"),
                }
            }
            "-h" | "--help" => {
                println!("chaos --duration 10m [--run 30s] [--members 3|5|both] [--seed N] [--self-check]");
                return Ok(());
            }
            _ => bail!("unknown argument {a} (see --help)"),
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let end = Instant::now() + total;
    let (mut runs, mut faults, mut ops, mut unknown, mut violations, mut inconclusive) =
        (0, 0, 0, 0, 0, 0);
    while Instant::now() < end {
        let mut cfg = ChaosConfig::new(seed + runs as u64, members[runs % members.len()], per_run);
        cfg.serializable_reads = self_check;
        let report = rt.block_on(run(&cfg));
        println!("{report}");
        runs += 1;
        faults += report.faults.len();
        ops += report.ops;
        unknown += report.unknown;
        violations += report.violations.len();
        inconclusive += usize::from(report.inconclusive);
    }
    println!(
        "chaos: {runs} runs, {faults} faults injected, {ops} operations checked ({unknown} unknown), {violations} violations, {inconclusive} inconclusive checks"
    );
    if self_check {
        if violations == 0 {
            println!("chaos --self-check: stale serializable reads went unnoticed");
            std::process::exit(1);
        }
        println!("chaos --self-check: the checker caught the stale reads, as it must");
        return Ok(());
    }
    if violations > 0 {
        std::process::exit(1);
    }
    Ok(())
}
