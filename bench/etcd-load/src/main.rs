//! `etcd-load put`: the put workload of `meshctl bench put`, written only against the
//! `etcd-client` crate (which knows nothing of meshd), so that two independent
//! clients measure the same servers. Connection `i` goes to endpoint `i mod n` and
//! client `c` uses connection `c mod conns`, as `meshctl bench` and etcd's own
//! benchmark do. Prints meshctl's JSON report fields (`throughput_rps`,
//! `latency_ms.{p50,p99,max}`, `errors`, `first_error`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use rand::Rng;

#[derive(Parser)]
#[command(name = "etcd-load", about = "Put load over the etcd-client crate")]
struct Cli {
    /// Endpoints (host:port), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:2379")]
    endpoints: Vec<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Puts of random keys in a key space.
    Put {
        #[arg(long, default_value_t = 1)]
        clients: usize,
        #[arg(long, default_value_t = 1)]
        conns: usize,
        #[arg(long, default_value_t = 10_000)]
        total: u64,
        #[arg(long, default_value_t = 256)]
        val_size: usize,
        #[arg(long, default_value_t = 100_000)]
        key_space_size: u64,
        /// Digits of a key (zero-padded index), as meshctl bench's default.
        #[arg(long, default_value_t = 8)]
        key_size: usize,
    },
}

struct Tally {
    latencies_us: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let Command::Put {
        clients,
        conns,
        total,
        val_size,
        key_space_size,
        key_size,
    } = cli.command;
    let conns = conns.max(1);
    let mut connections = Vec::with_capacity(conns);
    for i in 0..conns {
        let ep = &cli.endpoints[i % cli.endpoints.len()];
        let opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5));
        let c = etcd_client::Client::connect([ep.as_str()], Some(opts))
            .await
            .with_context(|| format!("connecting to {ep}"))?;
        connections.push(c);
    }
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::with_capacity(clients);
    for c in 0..clients {
        let mut kv = connections[c % conns].kv_client();
        let next = next.clone();
        workers.push(tokio::spawn(async move {
            let value = vec![b'v'; val_size];
            let mut t = Tally {
                latencies_us: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("bounds"),
                errors: 0,
                first_error: None,
            };
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    return t;
                }
                let k = rand::rng().random_range(0..key_space_size);
                let key = format!("{k:0key_size$}");
                let sent = Instant::now();
                match kv.put(key, value.clone(), None).await {
                    Ok(_) => t
                        .latencies_us
                        .saturating_record(sent.elapsed().as_micros().max(1) as u64),
                    Err(e) => {
                        t.errors += 1;
                        t.first_error.get_or_insert_with(|| e.to_string());
                    }
                }
            }
        }));
    }
    let mut all = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("bounds");
    let (mut errors, mut first_error) = (0, None);
    for w in workers {
        let t = w.await?;
        all.add(&t.latencies_us)?;
        errors += t.errors;
        first_error = first_error.or(t.first_error);
    }
    let secs = started.elapsed().as_secs_f64().max(f64::EPSILON);
    let ms = |us: u64| us as f64 / 1000.0;
    let report = serde_json::json!({
        "operation": "put",
        "client": "etcd-client",
        "clients": clients,
        "conns": conns,
        "total": total,
        "succeeded": all.len(),
        "errors": errors,
        "first_error": first_error,
        "elapsed_secs": secs,
        "throughput_rps": all.len() as f64 / secs,
        "latency_ms": {
            "mean": all.mean() / 1000.0,
            "p50": ms(all.value_at_quantile(0.5)),
            "p90": ms(all.value_at_quantile(0.9)),
            "p99": ms(all.value_at_quantile(0.99)),
            "p99_9": ms(all.value_at_quantile(0.999)),
            "max": ms(all.max()),
        },
    });
    println!("{report}");
    Ok(())
}
