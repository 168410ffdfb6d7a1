//! Configuration in two layers: the raw flags (each also a `MESHD_*` environment
//! variable) and YAML file, then one validated [`ServerConfig`].
//! Precedence: flag > environment > file > default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use mesh_core::server::ServerConfig;
use serde::Deserialize;

/// A member of a meshd cluster: Raft-replicated, etcd-v3-compatible key-value store.
///
/// With no flags at all, runs a single-node cluster named `default` serving clients on
/// 127.0.0.1:2379, peers on 0.0.0.0:6783, data in ./default.meshd.
#[derive(Parser, Debug)]
#[command(name = "meshd", version, about, long_about = None)]
pub struct Args {
    /// YAML file with any of the settings below (keys as the long flag names).
    #[arg(long, env = "MESHD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Human-readable member name, unique in the cluster.
    #[arg(long, env = "MESHD_NAME")]
    pub name: Option<String>,
    /// Data directory (default ./<name>.meshd).
    #[arg(long, env = "MESHD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address for the client API (etcd v3 gRPC).
    #[arg(long, env = "MESHD_LISTEN_CLIENT")]
    pub listen_client: Option<SocketAddr>,
    /// Client URL published in the member list (default http://<listen-client>).
    #[arg(long, env = "MESHD_ADVERTISE_CLIENT")]
    pub advertise_client: Option<String>,
    /// Address for peer (mesh) connections.
    #[arg(long, env = "MESHD_LISTEN_MESH")]
    pub listen_mesh: Option<SocketAddr>,
    /// Address peers use to reach this member (default <listen-mesh>).
    #[arg(long, env = "MESHD_ADVERTISE_MESH")]
    pub advertise_mesh: Option<String>,
    /// Initial members, `name1=host:port,name2=host:port,...` (mesh addresses). Used
    /// when the data dir is new; checked against the data dir otherwise.
    #[arg(long, env = "MESHD_INITIAL_CLUSTER")]
    pub initial_cluster: Option<String>,
    /// Token that makes the IDs of this cluster differ from another cluster's with the
    /// same member names and addresses.
    #[arg(long, env = "MESHD_INITIAL_CLUSTER_TOKEN")]
    pub initial_cluster_token: Option<String>,
    /// Mesh address of a peer to join through (repeatable, or comma-separated in the
    /// environment); the mesh discovers every other peer from it.
    #[arg(long = "peer", env = "MESHD_PEER", value_delimiter = ',')]
    pub peers: Vec<String>,
    /// Form a new cluster once this many empty server nodes see each other on the mesh
    /// (instead of --initial-cluster). Give every initial node the same number.
    #[arg(long, env = "MESHD_BOOTSTRAP_EXPECT")]
    pub bootstrap_expect: Option<u32>,
    /// File holding the mesh password: every mesh connection is then mutually
    /// authenticated and encrypted. MESHD_PASSWORD gives the password itself.
    #[arg(long, env = "MESHD_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,
    /// Voters the leader keeps by adding and promoting learners (3 or 5).
    #[arg(long, env = "MESHD_VOTERS")]
    pub voters: Option<usize>,
    /// How long a voter must be unreachable before the leader replaces it, e.g. 5m.
    #[arg(long, env = "MESHD_DEAD_VOTER_TIMEOUT", value_parser = humantime::parse_duration)]
    pub dead_voter_timeout: Option<Duration>,
    /// How long a learner must stay caught up before it is promoted, e.g. 10s.
    #[arg(long, env = "MESHD_STABILIZATION_TIME", value_parser = humantime::parse_duration)]
    pub stabilization_time: Option<Duration>,
    /// Automatic growth and healing of the voter set: true or false.
    #[arg(long, env = "MESHD_AUTOPILOT")]
    pub autopilot: Option<bool>,
    /// Interval of mesh heartbeats; a connection silent for 4 of them is dead.
    #[arg(long, env = "MESHD_MESH_HEARTBEAT", value_parser = humantime::parse_duration)]
    pub mesh_heartbeat: Option<Duration>,
    /// Interval of mesh anti-entropy gossip to random neighbours.
    #[arg(long, env = "MESHD_MESH_GOSSIP_INTERVAL", value_parser = humantime::parse_duration)]
    pub mesh_gossip_interval: Option<Duration>,
    /// Length of one Raft tick, e.g. 100ms.
    #[arg(long, env = "MESHD_TICK", value_parser = humantime::parse_duration)]
    pub tick: Option<Duration>,
    /// Ticks without a leader before a follower campaigns.
    #[arg(long, env = "MESHD_ELECTION_TICKS")]
    pub election_ticks: Option<usize>,
    /// Ticks between leader heartbeats.
    #[arg(long, env = "MESHD_HEARTBEAT_TICKS")]
    pub heartbeat_ticks: Option<usize>,
    /// Applied entries kept in the Raft log before it is compacted.
    #[arg(long, env = "MESHD_SNAPSHOT_COUNT")]
    pub snapshot_count: Option<u64>,
    /// Entries kept behind the applied index when compacting, for slow followers.
    #[arg(long, env = "MESHD_CATCH_UP_ENTRIES")]
    pub catch_up_entries: Option<u64>,
    /// How long a client request may wait for Raft, e.g. 7s.
    #[arg(long, env = "MESHD_REQUEST_TIMEOUT", value_parser = humantime::parse_duration)]
    pub request_timeout: Option<Duration>,
    /// Largest client request accepted, in bytes (etcd's default 1.5 MiB).
    #[arg(long, env = "MESHD_MAX_REQUEST_BYTES")]
    pub max_request_bytes: Option<usize>,
    /// Most operations accepted in one txn (etcd's default 128).
    #[arg(long, env = "MESHD_MAX_TXN_OPS")]
    pub max_txn_ops: Option<usize>,
    /// Database size in bytes above which the member raises a NOSPACE alarm and
    /// refuses writes that add data (etcd's default 2 GiB; 0 means the default).
    #[arg(long, env = "MESHD_QUOTA_BACKEND_BYTES")]
    pub quota_backend_bytes: Option<u64>,
    /// Free bytes the data dir's filesystem must keep; below it, writes that add data
    /// are refused with NOSPACE until space returns (default 64 MiB).
    #[arg(long, env = "MESHD_MIN_FREE_DISK_BYTES")]
    pub min_free_disk_bytes: Option<u64>,
    /// FOR TESTS ONLY: serve meshpb.FaultInjection (cut, drop or delay mesh links) to
    /// loopback callers. Off by default; never enable it on a real member.
    #[arg(long, hide_short_help = true)]
    pub unsafe_fault_injection: bool,
    /// Log format: text or json. RUST_LOG selects what is logged.
    #[arg(long, env = "MESHD_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

/// The YAML file: the same settings, keys spelled as the long flags.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    name: Option<String>,
    data_dir: Option<PathBuf>,
    listen_client: Option<SocketAddr>,
    advertise_client: Option<String>,
    listen_mesh: Option<SocketAddr>,
    advertise_mesh: Option<String>,
    initial_cluster: Option<String>,
    initial_cluster_token: Option<String>,
    peer: Option<Vec<String>>,
    bootstrap_expect: Option<u32>,
    password_file: Option<PathBuf>,
    voters: Option<usize>,
    #[serde(default, with = "humantime_serde_opt")]
    dead_voter_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    stabilization_time: Option<Duration>,
    autopilot: Option<bool>,
    #[serde(default, with = "humantime_serde_opt")]
    mesh_heartbeat: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    mesh_gossip_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    tick: Option<Duration>,
    election_ticks: Option<usize>,
    heartbeat_ticks: Option<usize>,
    snapshot_count: Option<u64>,
    catch_up_entries: Option<u64>,
    #[serde(default, with = "humantime_serde_opt")]
    request_timeout: Option<Duration>,
    max_request_bytes: Option<usize>,
    max_txn_ops: Option<usize>,
    quota_backend_bytes: Option<u64>,
}

mod humantime_serde_opt {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| humantime::parse_duration(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// Parses `name1=host:port,name2=host:port`.
pub fn parse_initial_cluster(s: &str) -> Result<Vec<(String, String)>> {
    Ok(mesh_core::server::parse_initial_cluster(s)?)
}

/// Merges flags, environment, file and defaults into a validated server configuration.
pub fn resolve(args: Args) -> Result<ServerConfig> {
    let file = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config file {}", path.display()))?;
            serde_yaml_ng::from_str::<Option<FileConfig>>(&text)
                .with_context(|| format!("config file {}", path.display()))?
                .unwrap_or_default()
        }
        None => FileConfig::default(),
    };
    let name = args.name.or(file.name).unwrap_or_else(|| "default".into());
    if name.is_empty() {
        bail!("--name must not be empty");
    }
    let mut cfg = ServerConfig::new(&name);
    if let Some(d) = args.data_dir.or(file.data_dir) {
        cfg.data_dir = d;
    }
    if let Some(a) = args.listen_client.or(file.listen_client) {
        cfg.listen_client = a;
    }
    cfg.advertise_client = args.advertise_client.or(file.advertise_client);
    if let Some(a) = args.listen_mesh.or(file.listen_mesh) {
        cfg.listen_mesh = a;
    }
    cfg.advertise_mesh = args.advertise_mesh.or(file.advertise_mesh);
    cfg.initial_cluster = args
        .initial_cluster
        .or(file.initial_cluster)
        .map(|s| parse_initial_cluster(&s))
        .transpose()?;
    if let Some(t) = args.initial_cluster_token.or(file.initial_cluster_token) {
        cfg.initial_cluster_token = t;
    }
    cfg.peers = if args.peers.is_empty() {
        file.peer.unwrap_or_default()
    } else {
        args.peers
    };
    cfg.bootstrap_expect = args.bootstrap_expect.or(file.bootstrap_expect);
    if cfg.bootstrap_expect == Some(0) {
        bail!("--bootstrap-expect must be at least 1");
    }
    if cfg.bootstrap_expect.is_some() && cfg.initial_cluster.is_some() {
        bail!("--bootstrap-expect and --initial-cluster cannot be used together");
    }
    cfg.password = match (
        args.password_file.or(file.password_file),
        std::env::var("MESHD_PASSWORD"),
    ) {
        (Some(path), _) => {
            let text = std::fs::read(&path)
                .with_context(|| format!("cannot read password file {}", path.display()))?;
            let trimmed = text.trim_ascii_end().to_vec();
            if trimmed.is_empty() {
                bail!("password file {} is empty", path.display());
            }
            Some(trimmed)
        }
        (None, Ok(p)) if !p.is_empty() => Some(p.into_bytes()),
        _ => None,
    };
    if let Some(n) = args.voters.or(file.voters) {
        if !(1..=7).contains(&n) {
            bail!("--voters must be between 1 and 7 (3 or 5 recommended), not {n}");
        }
        cfg.autopilot.voters = n;
    }
    if let Some(t) = args.dead_voter_timeout.or(file.dead_voter_timeout) {
        cfg.autopilot.dead_voter_timeout = t;
    }
    if let Some(t) = args.stabilization_time.or(file.stabilization_time) {
        cfg.autopilot.stabilization = t;
    }
    if let Some(b) = args.autopilot.or(file.autopilot) {
        cfg.autopilot.growth = b;
    }
    if let Some(t) = args.mesh_heartbeat.or(file.mesh_heartbeat) {
        if t.is_zero() {
            bail!("--mesh-heartbeat must be positive");
        }
        cfg.mesh_heartbeat = t;
    }
    if let Some(t) = args.mesh_gossip_interval.or(file.mesh_gossip_interval) {
        if t.is_zero() {
            bail!("--mesh-gossip-interval must be positive");
        }
        cfg.mesh_gossip_interval = t;
    }
    if let Some(t) = args.tick.or(file.tick) {
        cfg.tick = t;
    }
    if let Some(n) = args.election_ticks.or(file.election_ticks) {
        cfg.election_ticks = n;
    }
    if let Some(n) = args.heartbeat_ticks.or(file.heartbeat_ticks) {
        cfg.heartbeat_ticks = n;
    }
    if let Some(n) = args.snapshot_count.or(file.snapshot_count) {
        cfg.snapshot_count = n;
    }
    if let Some(n) = args.catch_up_entries.or(file.catch_up_entries) {
        cfg.catch_up_entries = n;
    }
    if let Some(t) = args.request_timeout.or(file.request_timeout) {
        cfg.request_timeout = t;
    }
    if let Some(n) = args.max_request_bytes.or(file.max_request_bytes) {
        cfg.limits.max_request_bytes = n;
    }
    if let Some(n) = args.max_txn_ops.or(file.max_txn_ops) {
        cfg.limits.max_txn_ops = n;
    }
    match args.quota_backend_bytes.or(file.quota_backend_bytes) {
        // etcd treats 0 as "the default quota".
        Some(0) | None => {}
        Some(n) => cfg.quota_backend_bytes = n,
    }
    cfg.unsafe_fault_injection = args.unsafe_fault_injection;
    if let Some(n) = args.min_free_disk_bytes {
        cfg.min_free_disk_bytes = n;
    }
    if cfg.tick.is_zero() {
        bail!("--tick must be positive");
    }
    if cfg.heartbeat_ticks == 0 || cfg.election_ticks <= cfg.heartbeat_ticks {
        bail!(
            "--election-ticks ({}) must be greater than --heartbeat-ticks ({}), which must be at least 1",
            cfg.election_ticks,
            cfg.heartbeat_ticks
        );
    }
    if cfg.snapshot_count == 0 {
        bail!("--snapshot-count must be at least 1");
    }
    if !(1024..=1 << 30).contains(&cfg.limits.max_request_bytes) {
        bail!("--max-request-bytes must be between 1 KiB and 1 GiB");
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_cluster_parses_and_rejects() {
        let v = parse_initial_cluster("a=127.0.0.1:1,b=http://h:2").unwrap();
        assert_eq!(
            v,
            vec![
                ("a".into(), "127.0.0.1:1".into()),
                ("b".into(), "h:2".into())
            ]
        );
        assert!(parse_initial_cluster("a").is_err());
        assert!(parse_initial_cluster("=h:1").is_err());
        assert!(parse_initial_cluster("a=nohostport").is_err());
        assert!(parse_initial_cluster("").is_err());
    }

    #[test]
    fn flag_beats_file_and_unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("m.yaml");
        std::fs::write(&f, "name: fromfile\nsnapshot-count: 7\ntick: 20ms\n").unwrap();
        let args = Args::parse_from([
            "meshd",
            "--config",
            f.to_str().unwrap(),
            "--snapshot-count",
            "9",
        ]);
        let cfg = resolve(args).unwrap();
        assert_eq!(cfg.name, "fromfile");
        assert_eq!(cfg.snapshot_count, 9);
        assert_eq!(cfg.tick, Duration::from_millis(20));
        assert_eq!(
            cfg.quota_backend_bytes,
            mesh_core::server::DEFAULT_QUOTA_BACKEND_BYTES
        );

        std::fs::write(&f, "name: q\nquota-backend-bytes: 4096000\n").unwrap();
        let cfg = resolve(Args::parse_from(["meshd", "--config", f.to_str().unwrap()])).unwrap();
        assert_eq!(cfg.quota_backend_bytes, 4_096_000);
        let cfg = resolve(Args::parse_from([
            "meshd",
            "--config",
            f.to_str().unwrap(),
            "--quota-backend-bytes=5000000",
        ]))
        .unwrap();
        assert_eq!(cfg.quota_backend_bytes, 5_000_000);

        std::fs::write(&f, "name: x\nbogus-key: 1\n").unwrap();
        let err =
            resolve(Args::parse_from(["meshd", "--config", f.to_str().unwrap()])).unwrap_err();
        let text = format!("{err:#}");
        assert!(
            text.contains("bogus-key") && text.contains("line 2"),
            "{text}"
        );
    }
}
