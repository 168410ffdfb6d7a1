//! mesh-sim: runs N mesh peers in one process over loopback TCP on a sparse random
//! graph and reports how fast the topology converges, what steady-state gossip costs,
//! and how fast the mesh converges again after a partition heals.
use anyhow::{bail, Context};
use clap::Parser;
use mesh_core::mesh::{LinkFault, Mesh, MeshConfig};
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(about = "Measure mesh convergence and gossip cost with N in-process peers")]
struct Args {
    /// Number of peers.
    #[arg(long, default_value_t = 100)]
    peers: usize,
    /// Random other peers each peer is seeded with.
    #[arg(long, default_value_t = 3)]
    degree: usize,
    /// RNG seed of the graph (random if not given; always printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Anti-entropy interval in milliseconds.
    #[arg(long, default_value_t = 1000)]
    gossip_interval: u64,
    /// Heartbeat interval in milliseconds (a link is dead after 4 heartbeats).
    #[arg(long, default_value_t = 1000)]
    heartbeat: u64,
    /// Seconds to wait after convergence before measuring steady state.
    #[arg(long, default_value_t = 5)]
    settle_secs: u64,
    /// Seconds of steady state to measure traffic over.
    #[arg(long, default_value_t = 10)]
    steady_secs: u64,
    /// Give up on any phase after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
    /// Print progress while converging.
    #[arg(long)]
    verbose: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into()))
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

fn raise_fd_limit(needed: u64) -> anyhow::Result<()> {
    let (soft, hard) = rlimit::Resource::NOFILE.get()?;
    if soft < needed {
        let want = needed.min(hard);
        rlimit::Resource::NOFILE
            .set(want, hard)
            .context("raising RLIMIT_NOFILE")?;
        if want < needed {
            eprintln!("warning: RLIMIT_NOFILE hard limit {hard} below the {needed} wanted");
        }
    }
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<()> {
    let n = args.peers;
    if n < 2 || args.degree == 0 {
        bail!("need --peers >= 2 and --degree >= 1");
    }
    let seed = args.seed.unwrap_or_else(rand::random);
    let interval = Duration::from_millis(args.gossip_interval);
    let timeout = Duration::from_secs(args.timeout_secs);
    println!(
        "mesh-sim: peers={n} degree={} seed={seed} gossip_interval={}ms heartbeat={}ms",
        args.degree, args.gossip_interval, args.heartbeat
    );
    // Each link costs two descriptors in this process, plus one listener per peer.
    raise_fd_limit((n * (args.degree * 2 * 2 + 1) + 256) as u64)?;

    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut listeners = Vec::with_capacity(n);
    let mut addrs = Vec::with_capacity(n);
    for _ in 0..n {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        addrs.push(l.local_addr()?.to_string());
        listeners.push(l);
    }
    // Peer i seeds `degree` random others; peer i>0 always includes an earlier peer so
    // the graph is connected.
    let seeds: Vec<Vec<usize>> = (0..n)
        .map(|i| {
            let mut s: Vec<usize> = Vec::new();
            if i > 0 {
                s.push(rng.random_range(0..i));
            }
            while s.len() < args.degree.min(n - 1) {
                let j = rng.random_range(0..n);
                if j != i && !s.contains(&j) {
                    s.push(j);
                }
            }
            s
        })
        .collect();

    let start = Instant::now();
    let meshes: Vec<Arc<Mesh>> = listeners
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            let mut cfg = MeshConfig::new(i as u64 + 1, &format!("sim{i}"), &addrs[i]);
            cfg.seeds = seeds[i].iter().map(|&j| addrs[j].clone()).collect();
            cfg.target_degree = 0;
            cfg.gossip_interval = interval;
            cfg.heartbeat = Duration::from_millis(args.heartbeat);
            cfg.dead_after = cfg.heartbeat * 4;
            cfg.reconnect_max = Duration::from_secs(2);
            cfg.accept_per_sec = 1000;
            Mesh::start(cfg, l)
        })
        .collect();

    let everyone = vec![n; n];
    if let Err(e) = wait_known(
        &meshes,
        &everyone,
        timeout,
        args.verbose,
        "initial convergence",
    )
    .await
    {
        report_missing(&meshes);
        return Err(e);
    }
    let t = start.elapsed();
    println!(
        "converged: every peer knows all {n} in {:.2}s = {:.1} gossip rounds",
        t.as_secs_f64(),
        t.as_secs_f64() / interval.as_secs_f64()
    );
    wait_reachable(&meshes, timeout, "initial routes").await?;
    let t = start.elapsed();
    println!(
        "routes: every peer reaches all {n} in {:.2}s = {:.1} gossip rounds",
        t.as_secs_f64(),
        t.as_secs_f64() / interval.as_secs_f64()
    );

    let total = |ms: &[Arc<Mesh>]| {
        ms.iter().fold((0u64, 0u64), |(b, g), m| {
            let s = m.stats();
            (b + s.bytes_out, g + s.gossip_bytes_out)
        })
    };
    // Settle first: connections may still be replacing each other right after the
    // last peer learned the last entry.
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    let (b0, g0) = total(&meshes);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.steady_secs)).await;
    let (b1, g1) = total(&meshes);
    let secs = t0.elapsed().as_secs_f64();
    let conns: usize = meshes.iter().map(|m| m.stats().connections).sum();
    println!(
        "steady state over {secs:.1}s after {}s settling: {:.0} bytes/s sent per peer ({:.0} of it topology+gossip), {:.2} connections per peer",
        args.settle_secs,
        (b1 - b0) as f64 / n as f64 / secs,
        (g1 - g0) as f64 / n as f64 / secs,
        conns as f64 / n as f64
    );

    // Partition: the first half against the second, by faulting every crossing link.
    let half = n / 2;
    let side = |i: usize| i < half;
    let all_drop = LinkFault {
        drop_in: true,
        drop_out: true,
        delay: None,
    };
    let mut cut = 0;
    for (i, s) in seeds.iter().enumerate() {
        for &j in s {
            if side(i) != side(j) {
                meshes[i].set_link_fault(j as u64 + 1, all_drop);
                meshes[j].set_link_fault(i as u64 + 1, all_drop);
                cut += 1;
            }
        }
    }
    let t_cut = Instant::now();
    // A half need not be connected on its own: each peer must end up knowing exactly
    // the component it is in once the crossing links are gone.
    let component = components(n, &seeds, |i, j| side(i) == side(j));
    let size = |c: usize| component.iter().filter(|&&x| x == c).count();
    let sizes: Vec<usize> = (0..n).map(|i| size(component[i])).collect();
    wait(timeout, "partition", || {
        meshes
            .iter()
            .zip(&sizes)
            .all(|(m, &want)| m.stats().peers == want)
    })
    .await?;
    println!(
        "partition: {cut} links cut into {} components; every peer forgot the rest in {:.2}s",
        component
            .iter()
            .collect::<std::collections::HashSet<_>>()
            .len(),
        t_cut.elapsed().as_secs_f64()
    );

    let t_heal = Instant::now();
    for m in &meshes {
        m.clear_faults();
    }
    wait_known(
        &meshes,
        &everyone,
        timeout,
        args.verbose,
        "convergence after heal",
    )
    .await?;
    let t = t_heal.elapsed();
    println!(
        "heal: every peer knows all {n} again in {:.2}s = {:.1} gossip rounds",
        t.as_secs_f64(),
        t.as_secs_f64() / interval.as_secs_f64()
    );
    wait_reachable(&meshes, timeout, "routes after heal").await?;
    let t = t_heal.elapsed();
    println!(
        "heal: every peer reaches all {n} again in {:.2}s = {:.1} gossip rounds",
        t.as_secs_f64(),
        t.as_secs_f64() / interval.as_secs_f64()
    );
    for m in &meshes {
        m.shutdown().await;
    }
    Ok(())
}

/// After a timeout: which peers are missing from how many others' views, and how the
/// most-missed ones and their neighbours see them (to tell a lost update from a peer
/// whose links keep failing).
fn report_missing(meshes: &[Arc<Mesh>]) {
    let n = meshes.len() as u64;
    let mut missing: std::collections::HashMap<u64, usize> = Default::default();
    for m in meshes {
        let known: std::collections::HashSet<u64> = m.peers().iter().map(|p| p.name).collect();
        for j in (1..=n).filter(|j| !known.contains(j)) {
            *missing.entry(j).or_default() += 1;
        }
    }
    let mut by_count: Vec<(u64, usize)> = missing.into_iter().collect();
    by_count.sort_by_key(|&(name, count)| (std::cmp::Reverse(count), name));
    eprintln!(
        "missing (peer, from how many views): {:?}",
        &by_count[..by_count.len().min(15)]
    );
    for &(name, _) in by_count.iter().take(3) {
        let m = &meshes[name as usize - 1];
        let Some(me) = m.peers().into_iter().find(|p| p.is_self) else {
            continue;
        };
        let conns: Vec<u64> = me.connections.iter().map(|c| c.peer).collect();
        eprintln!(
            "  peer {name}: version {}, knows {}, connections {conns:?}",
            me.version,
            m.stats().peers
        );
        for &c in conns.iter().filter(|&&c| c != 0) {
            let view = meshes[c as usize - 1]
                .peers()
                .into_iter()
                .find(|p| p.name == name);
            eprintln!(
                "    neighbour {c} holds its version {:?}",
                view.map(|p| p.version)
            );
        }
    }
}

/// Connected-component label of every peer over the seed edges that `keep` keeps.
fn components(n: usize, seeds: &[Vec<usize>], keep: impl Fn(usize, usize) -> bool) -> Vec<usize> {
    let mut adj = vec![Vec::new(); n];
    for (i, s) in seeds.iter().enumerate() {
        for &j in s.iter().filter(|&&j| keep(i, j)) {
            adj[i].push(j);
            adj[j].push(i);
        }
    }
    let mut label = vec![usize::MAX; n];
    for root in 0..n {
        if label[root] != usize::MAX {
            continue;
        }
        label[root] = root;
        let mut stack = vec![root];
        while let Some(x) = stack.pop() {
            for &y in &adj[x] {
                if label[y] == usize::MAX {
                    label[y] = root;
                    stack.push(y);
                }
            }
        }
    }
    label
}

/// Waits until peer i knows exactly `want[i]` peers, printing progress if `verbose`.
async fn wait_known(
    meshes: &[Arc<Mesh>],
    want: &[usize],
    timeout: Duration,
    verbose: bool,
    what: &str,
) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut last_report = Instant::now();
    wait(timeout, what, || {
        let known: Vec<usize> = meshes.iter().map(|m| m.stats().peers).collect();
        if verbose && last_report.elapsed() > Duration::from_millis(250) {
            last_report = Instant::now();
            let off = known.iter().zip(want).filter(|(k, w)| k != w).count();
            let conns: usize = meshes.iter().map(|m| m.stats().connections).sum();
            eprintln!(
                "  {what} t={:.2}s: {off} peers not there yet, known min {} max {}, connections {conns}",
                start.elapsed().as_secs_f64(),
                known.iter().min().unwrap(),
                known.iter().max().unwrap()
            );
        }
        known == want
    })
    .await
}

/// Waits until every peer has a route to every other.
async fn wait_reachable(meshes: &[Arc<Mesh>], timeout: Duration, what: &str) -> anyhow::Result<()> {
    let n = meshes.len();
    wait(timeout, what, || {
        meshes.iter().all(|m| m.stats().reachable == n)
    })
    .await
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
async fn wait(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) -> anyhow::Result<()> {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > timeout {
            bail!("{what}: not reached within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
