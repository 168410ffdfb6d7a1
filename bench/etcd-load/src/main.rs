//! A load generator written only against the `etcd-client` crate (which knows nothing
//! of meshd), so that a second, independent client measures the same servers:
//!
//! - `put`: meshctl bench's put workload. Connection `i` goes to endpoint `i mod n` and
//!   client `c` uses connection `c mod conns`, as `meshctl bench` and etcd's own
//!   benchmark do. Prints meshctl's JSON report fields (`throughput_rps`,
//!   `latency_ms.{p50,p99,max}`, `errors`, `first_error`).
//! - `lease-storm`: many leases attached to keys, a share of them expiring within the
//!   same second, while clients put: put latency before and during the expiry.
//! - `watch`: thousands of watchers spread over a set of keys while clients put: put
//!   latency, and every event's delivery, counted and timed.
//! - `range`: whole-keyspace reads of a loaded keyspace (count-only, keys-only, every
//!   value in pages) and one prefix range, each timed.
//! - `steady`: puts at a fixed rate for a long time, latency per time window, counted
//!   from each put's scheduled time so that a stall delays (and counts) the puts
//!   behind it.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use etcd_client::{Client, GetOptions, PutOptions};
use hdrhistogram::Histogram;
use rand::Rng;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(name = "etcd-load", about = "Load over the etcd-client crate")]
struct Cli {
    /// Endpoints (host:port), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:2379")]
    endpoints: Vec<String>,
    #[command(subcommand)]
    command: Command,
}

/// What the putting clients do, in every workload.
#[derive(clap::Args, Clone, Copy)]
struct Load {
    #[arg(long, default_value_t = 1)]
    clients: usize,
    #[arg(long, default_value_t = 1)]
    conns: usize,
    #[arg(long, default_value_t = 256)]
    val_size: usize,
    #[arg(long, default_value_t = 100_000)]
    key_space_size: u64,
    /// Digits of a key (zero-padded index), as meshctl bench's default.
    #[arg(long, default_value_t = 8)]
    key_size: usize,
    /// Put keys 0, 1, 2, ... in order (wrapping at the key space) instead of at random:
    /// loads a keyspace with each key written once.
    #[arg(long)]
    sequential_keys: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Puts of random keys in a key space.
    Put {
        #[command(flatten)]
        load: Load,
        #[arg(long, default_value_t = 10_000)]
        total: u64,
    },
    /// `leases` leases, each attached to a key; `expiring` of them are granted so that
    /// they expire within the same second, `storm_in` seconds after they are granted,
    /// while the clients put. The others live `--ttl` seconds and are revoked at the end.
    /// Reports put latency before the expiry and from it until every expired lease's
    /// key is gone, and how long that took.
    LeaseStorm(Storm),
    /// `watchers` watches, spread over `watch-streams` streams, on `keys` keys (each key
    /// watched `watchers / keys` times); then the clients put `total` times to random
    /// keys among them, each value carrying its send time. Reports put latency, events
    /// delivered against expected, and delivery latency (put sent to event received).
    Watch(Watchers),
    /// Times reads of a keyspace loaded with `put --sequential-keys`: a count-only and a
    /// keys-only range over every key, every key and value read in pages of about
    /// `--page-bytes`, and one range over the prefix shared by the first
    /// `--prefix-keys` keys (10k by default: `0000` with 8-digit keys).
    Range(Ranges),
    /// Puts at `--rate` a second for `--duration` seconds (open loop: put `n` is due at
    /// `n / rate` seconds), with latency percentiles per `--window` seconds. Latency runs
    /// from when a put was due, not from when a client got to send it.
    Steady(Steady),
}

#[derive(clap::Args)]
struct Ranges {
    /// Digits of a key, as the load used.
    #[arg(long, default_value_t = 8)]
    key_size: usize,
    /// Keys under the timed prefix: a power of ten below the key space.
    #[arg(long, default_value_t = 10_000)]
    prefix_keys: u64,
    /// About this many bytes of values per page of the full read.
    #[arg(long, default_value_t = 64 << 20)]
    page_bytes: u64,
}

#[derive(clap::Args)]
struct Steady {
    #[command(flatten)]
    load: Load,
    #[arg(long)]
    rate: u64,
    #[arg(long, default_value_t = 600)]
    duration: u64,
    #[arg(long, default_value_t = 60)]
    window: u64,
}

#[derive(clap::Args)]
struct Storm {
    #[command(flatten)]
    load: Load,
    #[arg(long, default_value_t = 100_000)]
    leases: u64,
    #[arg(long, default_value_t = 10_000)]
    expiring: u64,
    /// Seconds from granting the expiring leases to their expiry.
    #[arg(long, default_value_t = 20)]
    storm_in: u64,
    /// TTL of the leases that do not expire during the run.
    #[arg(long, default_value_t = 600)]
    ttl: i64,
    /// Most seconds to wait for the expired leases' keys to go.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
}

#[derive(clap::Args)]
struct Watchers {
    #[command(flatten)]
    load: Load,
    #[arg(long, default_value_t = 10_000)]
    watchers: u64,
    #[arg(long, default_value_t = 1_000)]
    keys: u64,
    #[arg(long, default_value_t = 100)]
    watch_streams: u64,
    #[arg(long, default_value_t = 20_000)]
    total: u64,
    /// Most seconds to wait for the last events after the last put.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("bounds")
}

/// Latency quantiles in milliseconds of a histogram of microseconds.
fn latency_json(h: &Histogram<u64>) -> Value {
    let ms = |us: u64| us as f64 / 1000.0;
    json!({
        "count": h.len(),
        "mean": h.mean() / 1000.0,
        "p50": ms(h.value_at_quantile(0.5)),
        "p90": ms(h.value_at_quantile(0.9)),
        "p99": ms(h.value_at_quantile(0.99)),
        "p99_9": ms(h.value_at_quantile(0.999)),
        "max": ms(h.max()),
    })
}

fn record(h: &mut Histogram<u64>, since: Instant) {
    h.saturating_record(since.elapsed().as_micros().max(1) as u64);
}

/// Key `k` of a workload: its prefix and the zero-padded index.
fn key_of(prefix: &str, k: u64, digits: usize) -> String {
    format!("{prefix}{k:0digits$}")
}

/// Longest a request of the load may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// `conns` connections, connection `i` to endpoint `i mod n`.
async fn connect(endpoints: &[String], conns: usize) -> Result<Vec<Client>> {
    connect_with(endpoints, conns, REQUEST_TIMEOUT).await
}

/// [`connect`] with requests allowed `timeout` each.
async fn connect_with(
    endpoints: &[String],
    conns: usize,
    timeout: Duration,
) -> Result<Vec<Client>> {
    let mut connections = Vec::with_capacity(conns.max(1));
    for i in 0..conns.max(1) {
        let ep = &endpoints[i % endpoints.len()];
        let opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(timeout);
        let c = Client::connect([ep.as_str()], Some(opts))
            .await
            .with_context(|| format!("connecting to {ep}"))?;
        connections.push(c);
    }
    Ok(connections)
}

/// What one putting client measured: latencies by phase, and errors.
struct Tally {
    phases: Vec<Histogram<u64>>,
    errors: u64,
    first_error: Option<String>,
}

impl Tally {
    fn new(phases: usize) -> Tally {
        Tally {
            phases: (0..phases).map(|_| histogram()).collect(),
            errors: 0,
            first_error: None,
        }
    }

    fn error(&mut self, e: impl ToString) {
        self.errors += 1;
        self.first_error.get_or_insert_with(|| e.to_string());
    }

    fn add(&mut self, other: Tally) -> Result<()> {
        for (a, b) in self.phases.iter_mut().zip(&other.phases) {
            a.add(b)?;
        }
        self.errors += other.errors;
        self.first_error = self.first_error.take().or(other.first_error);
        Ok(())
    }
}

/// How long the putting clients go on, and the phase each put is counted in.
#[derive(Clone)]
struct Pace {
    /// Puts handed out so far, and how many in all (`u64::MAX`: until `stop`).
    next: Arc<AtomicU64>,
    total: u64,
    stop: Arc<AtomicBool>,
    /// The current phase, of `phases`, each with its own latency histogram.
    phase: Arc<AtomicU8>,
    phases: usize,
}

impl Pace {
    fn new(total: u64, phases: usize) -> Pace {
        Pace {
            next: Arc::new(AtomicU64::new(0)),
            total,
            stop: Arc::new(AtomicBool::new(false)),
            phase: Arc::new(AtomicU8::new(0)),
            phases,
        }
    }
}

/// Starts `load.clients` clients putting random keys of `prefix`, each value starting
/// with its send time in µs since `t0`.
fn spawn_putters(
    connections: &[Client],
    load: Load,
    prefix: &'static str,
    key_space: u64,
    pace: &Pace,
    t0: Instant,
) -> Vec<tokio::task::JoinHandle<Tally>> {
    (0..load.clients)
        .map(|c| {
            let mut kv = connections[c % connections.len()].kv_client();
            let pace = pace.clone();
            let key_size = load.key_size;
            let val_size = load.val_size.max(8);
            tokio::spawn(async move {
                let phases = pace.phases;
                let mut t = Tally::new(phases);
                loop {
                    let n = pace.next.fetch_add(1, Ordering::Relaxed);
                    if n >= pace.total || pace.stop.load(Ordering::Relaxed) {
                        return t;
                    }
                    let k = if load.sequential_keys {
                        n % key_space.max(1)
                    } else {
                        rand::rng().random_range(0..key_space)
                    };
                    let key = key_of(prefix, k, key_size);
                    let sent = Instant::now();
                    let mut value = vec![b'v'; val_size];
                    let at = sent.duration_since(t0).as_micros() as u64;
                    value[..8].copy_from_slice(&at.to_be_bytes());
                    let phase = pace.phase.load(Ordering::Relaxed) as usize;
                    match kv.put(key, value, None).await {
                        Ok(_) => record(&mut t.phases[phase.min(phases - 1)], sent),
                        Err(e) => t.error(e),
                    }
                }
            })
        })
        .collect()
}

async fn collect(workers: Vec<tokio::task::JoinHandle<Tally>>, pace: &Pace) -> Result<Tally> {
    let mut all = Tally::new(pace.phases);
    for w in workers {
        all.add(w.await?)?;
    }
    Ok(all)
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let report = match cli.command {
        Command::Put { load, total } => put(&cli.endpoints, load, total).await?,
        Command::LeaseStorm(storm) => lease_storm(&cli.endpoints, &storm).await?,
        Command::Watch(w) => watch(&cli.endpoints, &w).await?,
        Command::Range(r) => ranges(&cli.endpoints, &r).await?,
        Command::Steady(st) => steady(&cli.endpoints, &st).await?,
    };
    println!("{report}");
    Ok(())
}

async fn put(endpoints: &[String], load: Load, total: u64) -> Result<Value> {
    let connections = connect(endpoints, load.conns).await?;
    let pace = Pace::new(total, 1);
    let t0 = Instant::now();
    let workers = spawn_putters(&connections, load, "", load.key_space_size, &pace, t0);
    let all = collect(workers, &pace).await?;
    let secs = t0.elapsed().as_secs_f64().max(f64::EPSILON);
    let h = &all.phases[0];
    Ok(json!({
        "operation": "put",
        "client": "etcd-client",
        "clients": load.clients,
        "conns": load.conns,
        "total": total,
        "succeeded": h.len(),
        "errors": all.errors,
        "first_error": all.first_error,
        "elapsed_secs": secs,
        "throughput_rps": h.len() as f64 / secs,
        "latency_ms": latency_json(h),
    }))
}

/// Runs `f(i)` for `i in 0..n` on `width` concurrent tasks over the connections.
async fn fan_out<F, Fut, T>(connections: &[Client], n: u64, width: usize, f: F) -> Result<Vec<T>>
where
    F: Fn(Client, u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<T>> + Send,
    T: Send + 'static,
{
    let next = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..width.max(1))
        .map(|w| {
            let client = connections[w % connections.len()].clone();
            let (next, f) = (next.clone(), f.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return Ok::<_, anyhow::Error>(out);
                    }
                    out.push(f(client.clone(), i).await?);
                }
            })
        })
        .collect();
    let mut all = Vec::with_capacity(n as usize);
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(all)
}

/// `call` again after etcd's "too many requests" (its apply lags its commits by more
/// than it accepts), as a client backing off would; any other error ends the run.
async fn backing_off<T, F, Fut>(mut call: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let mut wait = Duration::from_millis(10);
    loop {
        match call().await {
            Err(e) if e.to_string().contains("too many requests") => {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(1));
            }
            r => return Ok(r?),
        }
    }
}

/// Grants a lease of `ttl` seconds and puts `key` on it; the lease's id.
async fn lease_key(c: Client, ttl: i64, key: String) -> Result<i64> {
    let id = backing_off(|| {
        let mut c = c.clone();
        async move { c.lease_grant(ttl, None).await }
    })
    .await?
    .id();
    backing_off(|| {
        let (mut c, key) = (c.clone(), key.clone());
        async move {
            c.put(key, vec![b'l'; 64], Some(PutOptions::new().with_lease(id)))
                .await
        }
    })
    .await?;
    Ok(id)
}

async fn count_prefix(c: &mut Client, prefix: &str) -> Result<i64> {
    let r = c
        .get(
            prefix,
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await?;
    Ok(r.count())
}

async fn lease_storm(endpoints: &[String], storm: &Storm) -> Result<Value> {
    let &Storm {
        load,
        leases,
        expiring,
        storm_in,
        ttl,
        timeout,
    } = storm;
    let expiring = expiring.min(leases);
    let connections = connect(endpoints, load.conns).await?;
    let mut probe = connections[0].clone();
    if count_prefix(&mut probe, "storm/").await? > 0 {
        bail!("keys under storm/ exist already: a lease storm needs a clean keyspace");
    }
    let setup = Instant::now();
    // The leases that outlive the run first, then the expiring ones, each TTL rounded
    // up so that all expire within the same second after `storm_in`.
    let long = fan_out(&connections, leases - expiring, 100, move |c, i| {
        lease_key(c, ttl, format!("storm/long/{i:08}"))
    })
    .await?;
    let target = Instant::now() + Duration::from_secs(storm_in);
    fan_out(&connections, expiring, 100, move |c, i| {
        let left = target.saturating_duration_since(Instant::now());
        let ttl = left.as_secs_f64().ceil().max(1.0) as i64;
        lease_key(c, ttl, format!("storm/expiring/{i:08}"))
    })
    .await?;
    let setup_secs = setup.elapsed().as_secs_f64();
    if Instant::now() + Duration::from_secs(2) > target {
        bail!(
            "granting the expiring leases took {setup_secs:.1} s, too close to their expiry: \
             raise --storm-in"
        );
    }
    // Phases: 0 before the expiry, 1 from it until the expired keys are gone, 2 after.
    let pace = Pace::new(u64::MAX, 3);
    let t0 = Instant::now();
    let workers = spawn_putters(&connections, load, "load/", load.key_space_size, &pace, t0);
    tokio::time::sleep_until(target.into()).await;
    pace.phase.store(1, Ordering::Relaxed);
    let deadline = target + Duration::from_secs(timeout);
    let gone = loop {
        let left = count_prefix(&mut probe, "storm/expiring/").await?;
        if left == 0 {
            break Some(target.elapsed().as_secs_f64());
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    pace.phase.store(2, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(2)).await;
    pace.stop.store(true, Ordering::Relaxed);
    let all = collect(workers, &pace).await?;
    let puts_secs = t0.elapsed().as_secs_f64();
    // Leave nothing behind for the next workload.
    fan_out(&connections, long.len() as u64, 100, {
        let long = Arc::new(long);
        move |c, i| {
            let id = long[i as usize];
            async move {
                backing_off(|| {
                    let mut c = c.clone();
                    async move { c.lease_revoke(id).await }
                })
                .await?;
                Ok(())
            }
        }
    })
    .await?;
    let total: u64 = all.phases.iter().map(|h| h.len()).sum();
    let during = &all.phases[1];
    Ok(json!({
        "operation": "lease-storm",
        "client": "etcd-client",
        "clients": load.clients,
        "conns": load.conns,
        "leases": leases,
        "expiring": expiring,
        "setup_secs": setup_secs,
        "expired_keys_gone_after_secs": gone,
        "errors": all.errors,
        "first_error": all.first_error,
        "throughput_rps": total as f64 / puts_secs,
        "before_ms": latency_json(&all.phases[0]),
        "during_ms": latency_json(during),
        "after_ms": latency_json(&all.phases[2]),
        // The fields compare.sh prints: the puts during the storm.
        "latency_ms": latency_json(during),
    }))
}

async fn watch(endpoints: &[String], w: &Watchers) -> Result<Value> {
    let &Watchers {
        load,
        watchers,
        keys,
        watch_streams: streams,
        total,
        timeout,
    } = w;
    let keys = keys.max(1);
    if !watchers.is_multiple_of(keys) {
        bail!("--watchers must be a multiple of --keys, so that every key is watched as often");
    }
    let connections = connect(endpoints, load.conns).await?;
    let streams = streams.clamp(1, watchers.max(1));
    let key = |k: u64| key_of("watch/", k, load.key_size);
    // Every event's value starts with its put's send time, in µs since t0.
    let t0 = Instant::now();
    let delivered = Arc::new(AtomicU64::new(0));
    let created = Arc::new(AtomicU64::new(0));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut readers = Vec::new();
    for s in 0..streams {
        let mut wc = connections[s as usize % connections.len()].watch_client();
        let mine: Vec<u64> = (s..watchers).step_by(streams as usize).collect();
        let Some(&first) = mine.first() else {
            continue;
        };
        let mut stream = wc.watch(key(first % keys), None).await?;
        for &w in &mine[1..] {
            stream.watch(key(w % keys), None).await?;
        }
        let (delivered, created) = (delivered.clone(), created.clone());
        let mut stopped = stopped.clone();
        readers.push(tokio::spawn(async move {
            let _keep = wc;
            let mut h = histogram();
            let mut err = None;
            loop {
                let message = tokio::select! {
                    m = stream.message() => m,
                    _ = stopped.changed() => break,
                };
                match message {
                    Ok(Some(r)) => {
                        if r.created() {
                            created.fetch_add(1, Ordering::Relaxed);
                        }
                        if r.canceled() {
                            err = Some(format!("watch canceled: {}", r.cancel_reason()));
                            break;
                        }
                        let now = t0.elapsed().as_micros() as u64;
                        for e in r.events() {
                            if let Some(v) = e.kv().map(|kv| kv.value()).filter(|v| v.len() >= 8) {
                                let at = u64::from_be_bytes(v[..8].try_into().expect("8 bytes"));
                                h.saturating_record(now.saturating_sub(at).max(1));
                            }
                            delivered.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        err = Some(e.to_string());
                        break;
                    }
                }
            }
            (h, err)
        }));
    }
    let ready = Instant::now() + Duration::from_secs(timeout);
    while created.load(Ordering::Relaxed) < watchers {
        if Instant::now() > ready {
            bail!(
                "only {} of {watchers} watches were created",
                created.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pace = Pace::new(total, 1);
    let started = Instant::now();
    let workers = spawn_putters(&connections, load, "watch/", keys, &pace, t0);
    let puts = collect(workers, &pace).await?;
    let secs = started.elapsed().as_secs_f64().max(f64::EPSILON);
    let h = &puts.phases[0];
    // Every key is watched watchers/keys times: each put is as many events.
    let expected = h.len() * (watchers / keys);
    let deadline = Instant::now() + Duration::from_secs(timeout);
    while delivered.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = delivered.load(Ordering::Relaxed);
    let mut delivery = histogram();
    let mut watch_error = None;
    stop.send_replace(true);
    for r in readers {
        let (hr, err) = r.await?;
        delivery.add(&hr)?;
        watch_error = watch_error.or(err);
    }
    Ok(json!({
        "operation": "watch",
        "client": "etcd-client",
        "clients": load.clients,
        "conns": load.conns,
        "watchers": watchers,
        "keys": keys,
        "watch_streams": streams,
        "total": total,
        "succeeded": h.len(),
        "errors": puts.errors,
        "first_error": puts.first_error,
        "watch_error": watch_error,
        "elapsed_secs": secs,
        "throughput_rps": h.len() as f64 / secs,
        "latency_ms": latency_json(h),
        "events_expected": expected,
        "events_delivered": got,
        "delivery_ms": latency_json(&delivery),
    }))
}

/// Seconds `f` took, with its result.
async fn timed<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<(f64, T)> {
    let t = Instant::now();
    let v = f.await?;
    Ok((t.elapsed().as_secs_f64(), v))
}

async fn ranges(endpoints: &[String], r: &Ranges) -> Result<Value> {
    // A whole-keyspace read of millions of keys takes more than a load request may.
    let c = connect_with(endpoints, 1, Duration::from_secs(600))
        .await?
        .remove(0);
    // The same limit as etcd's own clients (math.MaxInt32).
    let mut kv = c.kv_client().max_decoding_message_size(i32::MAX as usize);
    let all = || GetOptions::new().with_from_key();
    let (count_secs, count) = timed(async {
        Ok(kv
            .get(vec![0u8], Some(all().with_count_only()))
            .await?
            .count())
    })
    .await?;
    let (keys_secs, keys) = timed(async {
        Ok(kv
            .get(vec![0u8], Some(all().with_keys_only()))
            .await?
            .kvs()
            .len())
    })
    .await?;
    // Every key and value, a page at a time, each page from the key after the last one.
    let (full_secs, (full_keys, full_bytes, pages)) = timed(async {
        let (mut n, mut bytes, mut pages) = (0u64, 0u64, 0u64);
        let mut from = vec![0u8];
        let mut page = 1_000i64;
        loop {
            let resp = kv.get(from.clone(), Some(all().with_limit(page))).await?;
            pages += 1;
            let kvs = resp.kvs();
            let got: u64 = kvs
                .iter()
                .map(|kv| (kv.key().len() + kv.value().len()) as u64)
                .sum();
            n += kvs.len() as u64;
            bytes += got;
            match kvs.last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok((n, bytes, pages)),
            }
            // Size the next page from what this one weighed.
            let per_key = (got / kvs.len().max(1) as u64).max(1);
            page = (r.page_bytes / per_key).clamp(1, 1_000_000) as i64;
        }
    })
    .await?;
    let digits = r.key_size;
    let shared = digits.saturating_sub(r.prefix_keys.max(1).ilog10() as usize);
    let prefix = key_of("", 0, digits)[..shared].to_string();
    let (prefix_secs, prefix_count) = timed(async {
        let resp = kv
            .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await?;
        Ok(resp.kvs().len())
    })
    .await?;
    Ok(json!({
        "operation": "range",
        "client": "etcd-client",
        "count": count,
        "count_only_secs": count_secs,
        "keys_only": keys,
        "keys_only_secs": keys_secs,
        "full_keys": full_keys,
        "full_bytes": full_bytes,
        "full_pages": pages,
        "full_secs": full_secs,
        "prefix": prefix,
        "prefix_keys": prefix_count,
        "prefix_secs": prefix_secs,
    }))
}

async fn steady(endpoints: &[String], st: &Steady) -> Result<Value> {
    let &Steady {
        load,
        rate,
        duration,
        window,
    } = st;
    if rate == 0 || window == 0 {
        bail!("--rate and --window must be positive");
    }
    let connections = connect(endpoints, load.conns).await?;
    let windows = duration.div_ceil(window) as usize;
    let total = rate * duration;
    let next = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now() + Duration::from_millis(100);
    let workers: Vec<_> = (0..load.clients)
        .map(|c| {
            let mut kv = connections[c % connections.len()].kv_client();
            let next = next.clone();
            tokio::spawn(async move {
                let mut t = Tally::new(windows);
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= total {
                        return t;
                    }
                    let due = t0 + Duration::from_secs_f64(n as f64 / rate as f64);
                    tokio::time::sleep_until(due.into()).await;
                    let k = rand::rng().random_range(0..load.key_space_size.max(1));
                    let w = ((n / rate) / window) as usize;
                    match kv
                        .put(
                            key_of("", k, load.key_size),
                            vec![b'v'; load.val_size],
                            None,
                        )
                        .await
                    {
                        Ok(_) => record(&mut t.phases[w.min(windows - 1)], due),
                        Err(e) => t.error(e),
                    }
                }
            })
        })
        .collect();
    let mut all = Tally::new(windows);
    for w in workers {
        all.add(w.await?)?;
    }
    let secs = t0.elapsed().as_secs_f64();
    let mut whole = histogram();
    for h in &all.phases {
        whole.add(h)?;
    }
    let per_window: Vec<Value> = all
        .phases
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let mut v = latency_json(h);
            v["from_secs"] = json!(i as u64 * window);
            v
        })
        .collect();
    Ok(json!({
        "operation": "steady",
        "client": "etcd-client",
        "clients": load.clients,
        "conns": load.conns,
        "rate": rate,
        "duration_secs": duration,
        "elapsed_secs": secs,
        "succeeded": whole.len(),
        "errors": all.errors,
        "first_error": all.first_error,
        "throughput_rps": whole.len() as f64 / secs,
        "latency_ms": latency_json(&whole),
        "windows": per_window,
    }))
}
