//! `bench put|get`: a measurement program, not a test. `--clients` tasks keep one
//! request each in flight over `--conns` independent clients (gRPC connections),
//! recording per-request latency in an HDR histogram; prints throughput, latency
//! percentiles and errors (simple text or `-w json`).
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use mesh_core::client::{Client, ClientError};
use mesh_core::proto::etcdserverpb as pb;
use rand::Rng;
use serde::Serialize;

use crate::cli::{BenchArgs, BenchCommand};
use crate::config::{self, Global};
use crate::output::Format;

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Op {
    Put,
    Get,
}

/// The validated benchmark plan.
#[derive(Debug, Clone)]
struct Plan {
    op: Op,
    clients: usize,
    conns: usize,
    total: u64,
    key_size: usize,
    val_size: usize,
    key_space_size: u64,
    sequential_keys: bool,
    serializable: bool,
}

impl Plan {
    fn new(cmd: BenchCommand) -> Result<Plan> {
        let (op, a): (Op, BenchArgs) = match cmd {
            BenchCommand::Put(a) => (Op::Put, a),
            BenchCommand::Get(a) => (Op::Get, a),
        };
        if a.clients == 0
            || a.conns == 0
            || a.total == 0
            || a.key_space_size == 0
            || a.key_size == 0
        {
            bail!(
                "--clients, --conns, --total, --key-size and --key-space-size must be at least 1"
            );
        }
        Ok(Plan {
            op,
            clients: a.clients,
            conns: a.conns,
            total: a.total,
            key_size: a.key_size,
            val_size: a.val_size,
            key_space_size: a.key_space_size,
            sequential_keys: a.sequential_keys,
            serializable: config::parse_serializable(&a.consistency)?,
        })
    }

    /// The key of request number `n`: a zero-padded decimal index in the key space.
    fn key(&self, n: u64) -> Vec<u8> {
        let k = if self.sequential_keys {
            n % self.key_space_size
        } else {
            rand::rng().random_range(0..self.key_space_size)
        };
        format!("{k:0width$}", width = self.key_size).into_bytes()
    }
}

/// What one worker measured.
struct Tally {
    latencies_us: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

async fn one_request(
    client: &Client,
    plan: &Plan,
    n: u64,
    value: &[u8],
) -> Result<(), ClientError> {
    let key = plan.key(n);
    match plan.op {
        Op::Put => client
            .put(pb::PutRequest {
                key,
                value: value.to_vec(),
                ..Default::default()
            })
            .await
            .map(drop),
        Op::Get => client
            .range(pb::RangeRequest {
                key,
                serializable: plan.serializable,
                ..Default::default()
            })
            .await
            .map(drop),
    }
}

async fn worker(client: Client, plan: Arc<Plan>, next: Arc<AtomicU64>, bar: ProgressBar) -> Tally {
    let value = vec![b'v'; plan.val_size];
    let mut tally = Tally {
        latencies_us: histogram(),
        errors: 0,
        first_error: None,
    };
    loop {
        let n = next.fetch_add(1, Ordering::Relaxed);
        if n >= plan.total {
            return tally;
        }
        let started = Instant::now();
        match one_request(&client, &plan, n, &value).await {
            Ok(()) => tally
                .latencies_us
                .saturating_record(started.elapsed().as_micros().max(1) as u64),
            Err(e) => {
                tally.errors += 1;
                tally.first_error.get_or_insert_with(|| e.to_string());
            }
        }
        bar.inc(1);
    }
}

#[derive(Debug, Serialize)]
struct Report {
    operation: Op,
    clients: usize,
    conns: usize,
    total: u64,
    succeeded: u64,
    errors: u64,
    first_error: Option<String>,
    elapsed_secs: f64,
    /// Successful requests per second.
    throughput_rps: f64,
    latency_ms: Latency,
}

#[derive(Debug, Serialize)]
struct Latency {
    mean: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    p99_9: f64,
    max: f64,
}

fn report(
    plan: &Plan,
    h: &Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
    elapsed: Duration,
) -> Report {
    let ms = |us: u64| us as f64 / 1000.0;
    let secs = elapsed.as_secs_f64().max(f64::EPSILON);
    Report {
        operation: plan.op,
        clients: plan.clients,
        conns: plan.conns,
        total: plan.total,
        succeeded: h.len(),
        errors,
        first_error,
        elapsed_secs: secs,
        throughput_rps: h.len() as f64 / secs,
        latency_ms: Latency {
            mean: h.mean() / 1000.0,
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p99_9: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        },
    }
}

fn print_simple(out: &mut dyn Write, r: &Report) -> std::io::Result<()> {
    writeln!(out, "Summary:")?;
    writeln!(
        out,
        "  Operation:\t{}",
        if r.operation == Op::Put { "put" } else { "get" }
    )?;
    writeln!(
        out,
        "  Clients:\t{} over {} connection(s)",
        r.clients, r.conns
    )?;
    writeln!(out, "  Total:\t{:.4} secs", r.elapsed_secs)?;
    writeln!(
        out,
        "  Requests:\t{} ({} ok, {} errors)",
        r.total, r.succeeded, r.errors
    )?;
    writeln!(out, "  Throughput:\t{:.2} req/s", r.throughput_rps)?;
    if let Some(e) = &r.first_error {
        writeln!(out, "  First error:\t{e}")?;
    }
    writeln!(out)?;
    writeln!(out, "Latency (ms):")?;
    let l = &r.latency_ms;
    for (name, v) in [
        ("mean", l.mean),
        ("p50", l.p50),
        ("p90", l.p90),
        ("p99", l.p99),
        ("p99.9", l.p99_9),
        ("max", l.max),
    ] {
        writeln!(out, "  {name}:\t{v:.3}")?;
    }
    Ok(())
}

pub async fn run(global: &Global, out: &mut dyn Write, cmd: BenchCommand) -> Result<()> {
    let plan = Arc::new(Plan::new(cmd)?);
    let conns = (0..plan.conns)
        .map(|_| Client::connect(global.client.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let bar = ProgressBar::new(plan.total);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} [{elapsed_precise}] {per_sec}")
            .expect("valid progress template"),
    );
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..plan.clients)
        .map(|i| {
            tokio::spawn(worker(
                conns[i % conns.len()].clone(),
                plan.clone(),
                next.clone(),
                bar.clone(),
            ))
        })
        .collect();
    let mut all = histogram();
    let mut errors = 0;
    let mut first_error = None;
    for t in tasks {
        let tally = t.await.context("benchmark worker panicked")?;
        all.add(&tally.latencies_us).expect("same histogram bounds");
        errors += tally.errors;
        first_error = first_error.or(tally.first_error);
    }
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    let r = report(&plan, &all, errors, first_error, elapsed);
    match global.format {
        Format::Json => {
            serde_json::to_writer(&mut *out, &r)?;
            writeln!(out)?;
        }
        Format::Simple | Format::Table => print_simple(out, &r)?,
    }
    Ok(out.flush()?)
}
