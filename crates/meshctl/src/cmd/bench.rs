//! `bench put|get|txn-put|lease-keepalive|watch|availability`: measurement programs,
//! not tests. For request workloads `--clients` tasks keep one request each in flight
//! over `--conns` independent clients (gRPC connections), recording per-request latency
//! in an HDR histogram (with `--rate`, from each request's due time, which is what
//! "p99 at equal load" needs); prints throughput, latency percentiles and errors (simple text
//! or `-w json`). `watch` measures fan-out delivery, `availability` the longest write
//! gap (failover time).
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

use crate::cli::{AvailabilityArgs, BenchArgs, BenchCommand, WatchBenchArgs};
use crate::config::{self, Global};
use crate::output::Format;

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
enum Op {
    Put,
    Get,
    TxnPut,
    LeaseKeepalive,
    Watch,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Put => "put",
            Op::Get => "get",
            Op::TxnPut => "txn-put",
            Op::LeaseKeepalive => "lease-keepalive",
            Op::Watch => "watch",
        }
    }
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
    /// Requests per second across all clients; 0: no limit.
    rate: u64,
}

impl Plan {
    fn new(cmd: BenchCommand) -> Result<Plan> {
        let (op, a): (Op, BenchArgs) = match cmd {
            BenchCommand::Put(a) => (Op::Put, a),
            BenchCommand::Get(a) => (Op::Get, a),
            BenchCommand::TxnPut(a) => (Op::TxnPut, a),
            BenchCommand::LeaseKeepalive(a) => (Op::LeaseKeepalive, a),
            BenchCommand::Watch(_) | BenchCommand::Availability(_) => {
                unreachable!("not a request workload")
            }
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
            rate: a.rate,
        })
    }

    /// When request `n` is due, with a `--rate`.
    fn due(&self, started: Instant, n: u64) -> Option<Instant> {
        (self.rate > 0).then(|| started + Duration::from_secs_f64(n as f64 / self.rate as f64))
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

/// What a worker keeps between requests.
enum Session {
    Plain,
    /// `lease-keepalive`: this worker's lease and its keep-alive stream.
    KeepAlive(Box<mesh_core::client::KeepAlive>),
}

async fn session(client: &Client, plan: &Plan) -> Result<Session, ClientError> {
    Ok(match plan.op {
        Op::LeaseKeepalive => {
            let lease = client.lease_grant(60, 0).await?;
            Session::KeepAlive(Box::new(client.lease_keep_alive(lease.id).await?))
        }
        _ => Session::Plain,
    })
}

async fn one_request(
    client: &Client,
    session: &mut Session,
    plan: &Plan,
    n: u64,
    value: &[u8],
) -> Result<(), ClientError> {
    let put = || pb::PutRequest {
        key: plan.key(n),
        value: value.to_vec(),
        ..Default::default()
    };
    match (plan.op, session) {
        (Op::Put, _) => client.put(put()).await.map(drop),
        (Op::Get, _) => client
            .range(pb::RangeRequest {
                key: plan.key(n),
                serializable: plan.serializable,
                ..Default::default()
            })
            .await
            .map(drop),
        (Op::TxnPut, _) => client
            .txn(pb::TxnRequest {
                success: vec![pb::RequestOp {
                    request: Some(pb::request_op::Request::RequestPut(put())),
                }],
                ..Default::default()
            })
            .await
            .map(drop),
        (Op::LeaseKeepalive, Session::KeepAlive(k)) => k.keep_alive().await.map(drop),
        (Op::LeaseKeepalive | Op::Watch, _) => unreachable!("no keep-alive session"),
    }
}

async fn worker(
    client: Client,
    plan: Arc<Plan>,
    next: Arc<AtomicU64>,
    bar: ProgressBar,
    started: Instant,
) -> Tally {
    let value = vec![b'v'; plan.val_size];
    let mut tally = Tally {
        latencies_us: histogram(),
        errors: 0,
        first_error: None,
    };
    let mut session = match session(&client, &plan).await {
        Ok(s) => s,
        Err(e) => {
            tally.errors += 1;
            tally.first_error = Some(e.to_string());
            return tally;
        }
    };
    loop {
        let n = next.fetch_add(1, Ordering::Relaxed);
        if n >= plan.total {
            return tally;
        }
        let sent = match plan.due(started, n) {
            Some(due) => {
                tokio::time::sleep_until(due.into()).await;
                due
            }
            None => Instant::now(),
        };
        match one_request(&client, &mut session, &plan, n, &value).await {
            Ok(()) => tally
                .latencies_us
                .saturating_record(sent.elapsed().as_micros().max(1) as u64),
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
    /// The `--rate` asked for (requests per second; 0: no limit).
    rate: u64,
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
        rate: plan.rate,
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
    writeln!(out, "  Operation:\t{}", r.operation.name())?;
    writeln!(
        out,
        "  Clients:\t{} over {} connection(s)",
        r.clients, r.conns
    )?;
    if r.rate > 0 {
        writeln!(out, "  Rate:\t{} req/s asked", r.rate)?;
    }
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

/// `n` clients, each with its own gRPC connection. Connection i goes first to endpoint
/// i modulo the number of endpoints, as etcd's benchmark hands out its connections, so a
/// run loads every member the same way whichever of them leads; the others stay in its
/// list for failover.
fn connections(global: &Global, n: usize) -> Result<Vec<Client>> {
    (0..n)
        .map(|i| {
            let mut config = global.client.clone();
            let len = config.endpoints.len().max(1);
            config.endpoints.rotate_left(i % len);
            Ok(Client::connect(config)?)
        })
        .collect()
}

pub async fn run(global: &Global, out: &mut dyn Write, cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Watch(a) => return watch_fanout(global, out, a).await,
        BenchCommand::Availability(a) => return availability(global, out, a).await,
        _ => {}
    }
    let plan = Arc::new(Plan::new(cmd)?);
    let conns = connections(global, plan.conns)?;
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
                started,
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
    write_report(global, out, &r)
}

fn write_report(global: &Global, out: &mut dyn Write, r: &Report) -> Result<()> {
    match global.format {
        Format::Json => {
            serde_json::to_writer(&mut *out, r)?;
            writeln!(out)?;
        }
        Format::Simple | Format::Table => print_simple(out, r)?,
    }
    Ok(out.flush()?)
}

fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// `bench watch`: every put carries its send time; each watcher records how long each
/// event took to arrive. Throughput is events delivered per second, from the first put
/// to the last delivery.
async fn watch_fanout(global: &Global, out: &mut dyn Write, a: WatchBenchArgs) -> Result<()> {
    if a.watchers == 0 || a.conns == 0 || a.total == 0 || a.writers == 0 {
        bail!("--watchers, --conns, --total and --writers must be at least 1");
    }
    if a.val_size < 16 {
        bail!("--val-size must be at least 16 (the send time travels in the value)");
    }
    let conns = connections(global, a.conns)?;
    let key = format!("bench-watch-{}", rand::rng().random::<u32>()).into_bytes();
    let expected = a.total * a.watchers as u64;
    let bar = ProgressBar::new(expected);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} events [{elapsed_precise}] {per_sec}")
            .expect("valid progress template"),
    );
    let mut watchers = Vec::with_capacity(a.watchers);
    for i in 0..a.watchers {
        let opts = mesh_core::client::WatchOptions {
            key: key.clone(),
            ..Default::default()
        };
        watchers.push(conns[i % conns.len()].watch(opts).await?);
    }
    let total = a.total;
    let readers: Vec<_> = watchers
        .into_iter()
        .map(|mut w| {
            let bar = bar.clone();
            tokio::spawn(async move {
                // Latencies go into a plain list, joined into one histogram at the end: a
                // histogram per watcher is ~150 KiB, and a thousand of them made each
                // record a cache miss (a tenth of this program's CPU).
                let mut latencies = Vec::with_capacity(total as usize);
                while (latencies.len() as u64) < total {
                    match w.message().await {
                        Ok(Some(resp)) => {
                            let now = unix_micros();
                            for ev in &resp.events {
                                let v = ev.kv.as_ref().map(|kv| &kv.value[..]).unwrap_or_default();
                                let sent = std::str::from_utf8(&v[..16.min(v.len())])
                                    .ok()
                                    .and_then(|t| t.parse::<u64>().ok())
                                    .unwrap_or(0);
                                latencies.push(now.saturating_sub(sent).max(1));
                            }
                            bar.inc(resp.events.len() as u64);
                        }
                        _ => break,
                    }
                }
                (latencies, Instant::now())
            })
        })
        .collect();
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let writers: Vec<_> = (0..a.writers)
        .map(|i| {
            let client = conns[i % conns.len()].clone();
            let key = key.clone();
            let next = next.clone();
            let pad = a.val_size - 16;
            tokio::spawn(async move {
                let mut errors = 0u64;
                let mut first_error = None;
                while next.fetch_add(1, Ordering::Relaxed) < total {
                    let value = format!("{:016}{}", unix_micros(), "v".repeat(pad)).into_bytes();
                    let req = pb::PutRequest {
                        key: key.clone(),
                        value,
                        ..Default::default()
                    };
                    if let Err(e) = client.put(req).await {
                        errors += 1;
                        first_error.get_or_insert_with(|| e.to_string());
                    }
                }
                (errors, first_error)
            })
        })
        .collect();
    let mut errors = 0;
    let mut first_error = None;
    for w in writers {
        let (e, f) = w.await.context("writer panicked")?;
        errors += e;
        first_error = first_error.or(f);
    }
    let mut all = histogram();
    let mut last = started;
    let mut delivered = 0;
    for r in readers {
        // Puts that failed are never delivered: stop waiting once the writers are done
        // and the stream has been quiet for a while.
        let waited = tokio::time::timeout(Duration::from_secs(30), r).await;
        if let Ok(Ok((latencies, at))) = waited {
            for us in &latencies {
                all.saturating_record(*us);
            }
            delivered += latencies.len() as u64;
            last = last.max(at);
        }
    }
    bar.finish_and_clear();
    let elapsed = last.duration_since(started);
    let plan = Plan {
        op: Op::Watch,
        clients: a.watchers,
        conns: a.conns,
        total: expected,
        key_size: key.len(),
        val_size: a.val_size,
        key_space_size: 1,
        sequential_keys: false,
        serializable: false,
        rate: 0,
    };
    let mut r = report(&plan, &all, errors, first_error, elapsed);
    if delivered < expected && r.first_error.is_none() {
        r.first_error = Some(format!("{} of {expected} events delivered", delivered));
    }
    write_report(global, out, &r)
}

#[derive(Debug, Serialize)]
struct Availability {
    duration_secs: f64,
    succeeded: u64,
    failed: u64,
    /// Longest time between two successful writes (the failover time when a leader was
    /// killed during the run).
    max_gap_ms: f64,
    first_error: Option<String>,
}

/// `bench availability`: one write at a time, every `--interval`, through all
/// endpoints (failing over); the longest gap between two successes.
async fn availability(global: &Global, out: &mut dyn Write, a: AvailabilityArgs) -> Result<()> {
    let duration = config::parse_duration(&a.duration)?;
    let interval = config::parse_duration(&a.interval)?;
    let client = Client::connect(global.client.clone())?;
    let bar = ProgressBar::new(duration.as_millis() as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {elapsed_precise} writes: {msg}")
            .expect("valid progress template"),
    );
    let started = Instant::now();
    let mut last_ok = started;
    let mut max_gap = Duration::ZERO;
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut first_error = None;
    while started.elapsed() < duration {
        let req = pb::PutRequest {
            key: b"bench-availability".to_vec(),
            value: ok.to_string().into_bytes(),
            ..Default::default()
        };
        match client.put(req).await {
            Ok(_) => {
                let now = Instant::now();
                max_gap = max_gap.max(now - last_ok);
                last_ok = now;
                ok += 1;
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
        bar.set_position(started.elapsed().as_millis() as u64);
        bar.set_message(format!("{ok} ok, {failed} failed"));
        tokio::time::sleep(interval).await;
    }
    bar.finish_and_clear();
    let r = Availability {
        duration_secs: started.elapsed().as_secs_f64(),
        succeeded: ok,
        failed,
        max_gap_ms: max_gap.as_secs_f64() * 1000.0,
        first_error,
    };
    match global.format {
        Format::Json => {
            serde_json::to_writer(&mut *out, &r)?;
            writeln!(out)?;
        }
        Format::Simple | Format::Table => {
            writeln!(out, "Availability:")?;
            writeln!(out, "  Duration:\t{:.2} secs", r.duration_secs)?;
            writeln!(out, "  Writes:\t{} ok, {} failed", r.succeeded, r.failed)?;
            writeln!(out, "  Longest gap:\t{:.1} ms", r.max_gap_ms)?;
            if let Some(e) = &r.first_error {
                writeln!(out, "  First error:\t{e}")?;
            }
        }
    }
    Ok(out.flush()?)
}
