//! Configuration in two layers: the raw flags (each also a `MESHD_*` environment
//! variable) and YAML file, then one validated [`ServerConfig`].
//! Precedence: flag > environment > file > default. Errors name where the offending
//! value came from: the flag, the variable, or the file, line and key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args as _, CommandFactory, FromArgMatches, Parser, Subcommand};
use mesh_core::server::ServerConfig;

const CLI_AFTER_HELP: &str = "\
Every flag is also an environment variable (--data-dir: MESHD_DATA_DIR) and a key of the \
YAML file given by --config (data-dir: ...). Precedence: flag > environment > file > \
default. `meshd config default` prints every key with its default; `meshd config check \
FILE` validates a file. MESHD_PASSWORD gives the mesh key or password itself.

Mesh security: a mesh listener on a non-loopback address needs a mesh key: `meshd keygen \
> mesh.key` once, then --password-file mesh.key on every member. --insecure-mesh runs \
without one (anyone who reaches the port can join and read every key).

SIGTERM or SIGINT stops meshd gracefully: a leader first hands leadership to the most \
caught-up voter, then in-flight requests finish. Under systemd (Type=notify) meshd \
sends READY=1 once serving, STOPPING=1 when stopping, and watchdog pings when \
WatchdogSec is set.

HTTP on --listen-metrics: /metrics (Prometheus) and /health (etcd's JSON body).

Exit codes: 0 stopped cleanly, 1 failed, 2 invalid configuration.

See also: meshctl(1), locksmith(1), dist/meshd.service, dist/meshd.yaml.";

/// meshd's command line: the server's flags, or a subcommand.
#[derive(Parser, Debug)]
#[command(
    name = "meshd",
    version,
    about = "A member of a meshd cluster: Raft-replicated, etcd-v3-compatible key-value store over a gossip mesh.",
    long_about = None,
    args_conflicts_with_subcommands = true,
    after_long_help = CLI_AFTER_HELP
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Without a subcommand, meshd runs the server with these flags.
    #[command(flatten)]
    pub run: Args,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the server (what meshd does without a subcommand).
    Run(Box<Args>),
    /// Check or print configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print a new random mesh key (256 bits, base64) for --password-file.
    Keygen,
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Check a configuration file: prints "FILE: ok" and exits 0, or the error and exits 1.
    Check {
        /// The YAML file to check.
        file: PathBuf,
    },
    /// Print a commented configuration file with every key at its default.
    Default,
}

/// The server's settings.
///
/// With no flags at all, runs a single-node cluster named `default` serving clients on
/// 127.0.0.1:2379, peers on 127.0.0.1:6783, data in ./default.meshd.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// YAML file with any of the settings below (keys as the long flag names).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Human-readable member name, unique in the cluster.
    #[arg(long)]
    pub name: Option<String>,
    /// Data directory (default ./<name>.meshd).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Address for the client API (etcd v3 gRPC).
    #[arg(long)]
    pub listen_client: Option<SocketAddr>,
    /// Client URL published in the member list (default http://<listen-client>).
    #[arg(long)]
    pub advertise_client: Option<String>,
    /// Address for peer (mesh) connections.
    #[arg(long)]
    pub listen_mesh: Option<SocketAddr>,
    /// Address peers use to reach this member (default <listen-mesh>).
    #[arg(long)]
    pub advertise_mesh: Option<String>,
    /// A separate address for HTTP /metrics (Prometheus), /health, /livez and /readyz
    /// (the client port serves them too); "off", the default, serves none.
    #[arg(long)]
    pub listen_metrics: Option<String>,
    /// Initial members, `name1=host:port,name2=host:port,...` (mesh addresses). Used
    /// when the data dir is new; checked against the data dir otherwise.
    #[arg(long)]
    pub initial_cluster: Option<String>,
    /// Token that makes the IDs of this cluster differ from another cluster's with the
    /// same member names and addresses.
    #[arg(long)]
    pub initial_cluster_token: Option<String>,
    /// Mesh address of a peer to join through (repeatable, or comma-separated in the
    /// environment); the mesh discovers every other peer from it.
    #[arg(long = "peer", value_delimiter = ',')]
    pub peers: Vec<String>,
    /// Form a new cluster once this many empty server nodes see each other on the mesh
    /// (instead of --initial-cluster). Give every initial node the same number.
    #[arg(long)]
    pub bootstrap_expect: Option<u32>,
    /// File holding the mesh key (`meshd keygen > mesh.key`) or a password: every mesh
    /// connection is then mutually authenticated and encrypted. MESHD_PASSWORD gives
    /// the key or password itself. Required when --listen-mesh is not a loopback address.
    #[arg(long)]
    pub password_file: Option<PathBuf>,
    /// UNSAFE on a network: allow --listen-mesh on a non-loopback address without a
    /// mesh key. Anyone who reaches the port can then join and read every key.
    #[arg(long)]
    pub insecure_mesh: bool,
    /// Voters the leader keeps by adding and promoting learners (3 or 5).
    #[arg(long)]
    pub voters: Option<usize>,
    /// How long a voter must be unreachable before the leader replaces it, e.g. 5m.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub dead_voter_timeout: Option<Duration>,
    /// How long a learner must stay caught up before it is promoted, e.g. 10s.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub stabilization_time: Option<Duration>,
    /// Automatic growth and healing of the voter set: true or false.
    #[arg(long)]
    pub autopilot: Option<bool>,
    /// Interval of mesh heartbeats; a connection silent for 4 of them is dead.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub mesh_heartbeat: Option<Duration>,
    /// Interval of mesh anti-entropy gossip to random neighbours.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub mesh_gossip_interval: Option<Duration>,
    /// Length of one Raft tick, e.g. 100ms.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub tick: Option<Duration>,
    /// Ticks without a leader before a follower campaigns.
    #[arg(long)]
    pub election_ticks: Option<usize>,
    /// Ticks between leader heartbeats.
    #[arg(long)]
    pub heartbeat_ticks: Option<usize>,
    /// Applied entries kept in the Raft log before it is compacted.
    #[arg(long)]
    pub snapshot_count: Option<u64>,
    /// Entries kept behind the applied index when compacting, for slow followers.
    #[arg(long)]
    pub catch_up_entries: Option<u64>,
    /// How long a client request may wait for Raft, e.g. 7s.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub request_timeout: Option<Duration>,
    /// Largest client request accepted, in bytes (etcd's default 1.5 MiB).
    #[arg(long)]
    pub max_request_bytes: Option<usize>,
    /// Most operations accepted in one txn (etcd's default 128).
    #[arg(long)]
    pub max_txn_ops: Option<usize>,
    /// Database size in bytes above which the member raises a NOSPACE alarm and
    /// refuses writes that add data (etcd's default 2 GiB; 0 means the default).
    #[arg(long)]
    pub quota_backend_bytes: Option<u64>,
    /// Most memory, in bytes, the database keeps of its file's pages (default 256 MiB;
    /// the kernel's page cache holds them too). Larger helps reads of a keyspace
    /// bigger than the kernel keeps cached.
    #[arg(long)]
    pub backend_cache_bytes: Option<usize>,
    /// Free bytes the data dir's filesystem must keep; below it, writes that add data
    /// are refused with NOSPACE until space returns (default 64 MiB).
    #[arg(long)]
    pub min_free_disk_bytes: Option<u64>,
    /// How often the leader compares every member's HashKV and raises a CORRUPT alarm
    /// naming a member whose data differs, e.g. 5m; 0s turns the check off.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub corrupt_check_time: Option<Duration>,
    /// How --auto-compaction-retention is read: "periodic" (keep that much time of
    /// history) or "revision" (keep that many revisions).
    #[arg(long, value_parser = ["periodic", "revision"])]
    pub auto_compaction_mode: Option<String>,
    /// History auto-compaction keeps: periodic mode takes a duration ("1h", "30m"; a
    /// bare number is hours, as etcd), revision mode a number of revisions. "0", the
    /// default, turns auto-compaction off.
    #[arg(long)]
    pub auto_compaction_retention: Option<String>,
    /// FOR TESTS ONLY: serve meshpb.FaultInjection (cut, drop or delay mesh links) to
    /// loopback callers. Off by default; never enable it on a real member.
    #[arg(long, hide_short_help = true)]
    pub unsafe_fault_injection: bool,
    /// Log format: text or json. RUST_LOG selects what is logged.
    #[arg(long, value_parser = ["text", "json"])]
    pub log_format: Option<String>,

    // -- client-API TLS (etcd's flag names) --
    /// Certificate (PEM) the client API is served with; TLS on the client API needs
    /// both --cert-file and --key-file.
    #[arg(long)]
    pub cert_file: Option<PathBuf>,
    /// Private key (PEM) of --cert-file.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// Refuse clients without a certificate signed by --trusted-ca-file.
    #[arg(long)]
    pub client_cert_auth: bool,
    /// CA (PEM) that signs client certificates; also trusted when forwarding to members.
    #[arg(long)]
    pub trusted_ca_file: Option<PathBuf>,

    // -- auth --
    /// Auth token type: only etcd's default, `simple`, is supported.
    #[arg(long)]
    pub auth_token: Option<String>,
    /// Seconds a simple token lives after its last use (etcd's default 300).
    #[arg(long)]
    pub auth_token_ttl: Option<u64>,
}

/// Parses `name1=host:port,name2=host:port`.
pub fn parse_initial_cluster(s: &str) -> Result<Vec<(String, String)>> {
    Ok(mesh_core::server::parse_initial_cluster(s)?)
}

/// The validated settings: the server's, and meshd's own.
#[derive(Debug)]
pub struct Resolved {
    pub server: ServerConfig,
    /// `text` or `json`.
    pub log_format: String,
}

/// meshd's documented default for `--listen-metrics`.
pub const DEFAULT_LISTEN_METRICS: &str = "off";

/// Where each setting came from, to name it in errors as the operator wrote it.
struct Origins<'a> {
    matches: &'a ArgMatches,
    file: Option<(&'a Path, &'a str)>,
}

impl Origins<'_> {
    /// `--key`, `MESHD_KEY (environment)`, `FILE:LINE: key` or `key (default)`.
    fn of(&self, key: &str) -> String {
        let id = if key == "peer" {
            "peers".to_string()
        } else {
            key.replace('-', "_")
        };
        match self.matches.value_source(&id) {
            Some(ValueSource::CommandLine) => format!("--{key}"),
            Some(ValueSource::EnvVariable) => format!("{} (environment)", env_name(key)),
            _ => match self.file.and_then(|(p, t)| Some((p, line_of_key(t, key)?))) {
                Some((path, line)) => format!("{}:{line}: {key}", path.display()),
                None => format!("{key} (default)"),
            },
        }
    }
}

/// The environment variable of a setting: `MESHD_` and the key in capitals.
pub fn env_name(key: &str) -> String {
    format!("MESHD_{}", key.replace('-', "_").to_uppercase())
}

/// The 1-based line where top-level `key:` is set in a YAML text.
fn line_of_key(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| key_of_line(l) == Some(key))
        .map(|i| i + 1)
}

/// The top-level key a YAML line sets, if it sets one.
fn key_of_line(line: &str) -> Option<&str> {
    let (key, _) = line.split_once(':')?;
    let trimmed = key.trim_end();
    (!line.starts_with([' ', '\t', '#', '-']) && !trimmed.is_empty()).then_some(trimmed)
}

/// The command line as meshd parses it: the derived flags, each also read from its
/// environment variable ([`env_name`]). Flags, variables, YAML keys, `config default`
/// and the man page all come from this one definition.
pub fn command() -> clap::Command {
    with_env(Cli::command()).mut_subcommand("run", with_env)
}

fn with_env(cmd: clap::Command) -> clap::Command {
    cmd.mut_args(|a| match a.get_long() {
        Some(long) if !FLAG_ONLY.contains(&long) => {
            let env = env_name(long);
            a.env(env)
        }
        _ => a,
    })
}

/// Settings given only as flags: never from the environment or a file.
const FLAG_ONLY: [&str; 1] = ["unsafe-fault-injection"];

/// The settings of the YAML file at `path`, parsed by the same definitions (and value
/// parsers) as the flags: each key is a long flag name, and its value is what the
/// flag would take. Returns them with the text (for line numbers in errors). Errors
/// say `FILE:LINE: key: problem`.
fn load_file(path: &Path) -> Result<(Args, ArgMatches, String)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    let at = |key: &str| match line_of_key(&text, key) {
        Some(line) => format!("{}:{line}: {key}", path.display()),
        None => format!("{}: {key}", path.display()),
    };
    let doc: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&text).map_err(|e| match e.location() {
            Some(l) => anyhow!("{}:{}: {e}", path.display(), l.line()),
            None => anyhow!("{}: {e}", path.display()),
        })?;
    let map = match doc {
        serde_yaml_ng::Value::Mapping(m) => m,
        serde_yaml_ng::Value::Null => Default::default(),
        _ => bail!("{}: expected a mapping of settings", path.display()),
    };
    // The file layer alone: no environment, no subcommands.
    let cmd = Args::augment_args(clap::Command::new("meshd")).no_binary_name(true);
    let mut argv: Vec<String> = Vec::new();
    for (key, value) in map {
        let serde_yaml_ng::Value::String(key) = key else {
            bail!(
                "{}: keys must be setting names, not {key:?}",
                path.display()
            );
        };
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()))
            .filter(|_| key != "config" && !FLAG_ONLY.contains(&key.as_str()));
        let Some(arg) = arg else {
            bail!("{}: unknown field", at(&key));
        };
        let scalar = |v: &serde_yaml_ng::Value| -> Result<String> {
            match v {
                serde_yaml_ng::Value::String(s) => Ok(s.clone()),
                serde_yaml_ng::Value::Number(n) => Ok(n.to_string()),
                serde_yaml_ng::Value::Bool(b) => Ok(b.to_string()),
                other => bail!(
                    "{}: invalid type: expected a value, found {other:?}",
                    at(&key)
                ),
            }
        };
        let values = match &value {
            serde_yaml_ng::Value::Null => continue,
            serde_yaml_ng::Value::Sequence(items) => {
                items.iter().map(scalar).collect::<Result<Vec<_>>>()?
            }
            v => vec![scalar(v)?],
        };
        let mut one = Vec::new();
        if matches!(arg.get_action(), clap::ArgAction::SetTrue) {
            match values.as_slice() {
                [v] if v == "true" => one.push(format!("--{key}")),
                [v] if v == "false" => {}
                _ => bail!("{}: invalid type: expected true or false", at(&key)),
            }
        } else {
            one.extend(values.iter().map(|v| format!("--{key}={v}")));
        }
        // Each key alone first, so that an error names its line.
        if let Err(e) = cmd.clone().try_get_matches_from(&one) {
            let msg = e.to_string();
            let first = msg.lines().next().unwrap_or_default();
            let first = first.trim_start_matches("error: ");
            // "invalid value 'x' for '--key <KEY>': why" names the flag; the file
            // names the key already.
            let problem = match first.split_once(" for '--") {
                Some((head, tail)) => match tail.split_once("':") {
                    Some((_, why)) => format!("{head}:{why}"),
                    None => first.to_string(),
                },
                None => first.to_string(),
            };
            bail!("{}: {problem}", at(&key));
        }
        argv.extend(one);
    }
    let matches = cmd.try_get_matches_from(&argv)?;
    Ok((Args::from_arg_matches(&matches)?, matches, text))
}

/// Checks a configuration file on its own, as `meshd config check` does (flags and
/// environment left out).
pub fn check_file(path: &Path) -> Result<Resolved> {
    // The environment must not decide whether a file is valid.
    let cmd = Args::augment_args(clap::Command::new("meshd"))
        .mut_args(|a| a.env(None::<&'static str>))
        .no_binary_name(true);
    let matches = cmd.try_get_matches_from([std::ffi::OsStr::new("--config"), path.as_os_str()])?;
    resolve(Args::from_arg_matches(&matches)?, &matches)
}

/// Merges flags, environment, file and defaults into validated settings. `matches`
/// are the ones `args` came from (they tell a flag from an environment variable).
/// Client-API TLS from the flags and the file: both files or neither; client
/// certificate authentication needs TLS and a trusted CA.
fn client_tls(args: &Args) -> Result<Option<mesh_core::tls::ServerTls>> {
    let cert = args.cert_file.clone();
    let key = args.key_file.clone();
    let client_cert_auth = args.client_cert_auth;
    let trusted_ca_file = args.trusted_ca_file.clone();
    let tls = match (cert, key) {
        (Some(cert_file), Some(key_file)) => mesh_core::tls::ServerTls {
            cert_file,
            key_file,
            client_cert_auth,
            trusted_ca_file,
        },
        (None, None) if client_cert_auth || trusted_ca_file.is_some() => {
            bail!("--client-cert-auth and --trusted-ca-file need --cert-file and --key-file")
        }
        (None, None) => return Ok(None),
        _ => bail!("--cert-file and --key-file must be given together"),
    };
    tls.check()?;
    Ok(Some(tls))
}

pub fn resolve(args: Args, matches: &ArgMatches) -> Result<Resolved> {
    let (args, text) = match &args.config {
        Some(path) => {
            let (mut merged, _, text) = load_file(path)?;
            // A flag or variable replaces the file's value. A switch the file turned
            // on stays on (the command line can only turn one on).
            let switches = (merged.insecure_mesh, merged.client_cert_auth);
            merged.update_from_arg_matches(matches)?;
            merged.insecure_mesh |= switches.0;
            merged.client_cert_auth |= switches.1;
            (merged, text)
        }
        None => (args, String::new()),
    };
    let o = Origins {
        matches,
        file: args.config.as_deref().map(|p| (p, text.as_str())),
    };
    let client_tls = client_tls(&args)?;
    let name = args.name.unwrap_or_else(|| "default".into());
    if name.is_empty() {
        bail!("{}: must not be empty", o.of("name"));
    }
    let mut cfg = ServerConfig::new(&name);
    if let Some(d) = args.data_dir {
        cfg.data_dir = d;
    }
    if let Some(a) = args.listen_client {
        cfg.listen_client = a;
    }
    cfg.advertise_client = args.advertise_client;
    if let Some(a) = args.listen_mesh {
        cfg.listen_mesh = a;
    }
    cfg.advertise_mesh = args.advertise_mesh;
    let metrics = args
        .listen_metrics
        .unwrap_or_else(|| DEFAULT_LISTEN_METRICS.into());
    cfg.listen_metrics = match metrics.as_str() {
        "off" | "" => None,
        addr => Some(addr.parse().map_err(|e| {
            anyhow!(
                "{}: '{addr}' is not an address (ip:port) or \"off\": {e}",
                o.of("listen-metrics")
            )
        })?),
    };
    cfg.initial_cluster = args
        .initial_cluster
        .map(|s| parse_initial_cluster(&s).with_context(|| o.of("initial-cluster")))
        .transpose()?;
    if let Some(t) = args.initial_cluster_token {
        cfg.initial_cluster_token = t;
    }
    cfg.peers = args.peers;
    cfg.bootstrap_expect = args.bootstrap_expect;
    if cfg.bootstrap_expect == Some(0) {
        bail!("{}: must be at least 1", o.of("bootstrap-expect"));
    }
    if cfg.bootstrap_expect.is_some() && cfg.initial_cluster.is_some() {
        bail!(
            "{} and {} cannot be used together",
            o.of("bootstrap-expect"),
            o.of("initial-cluster")
        );
    }
    cfg.password = match (args.password_file, std::env::var("MESHD_PASSWORD")) {
        (Some(path), _) => {
            let text = std::fs::read(&path).with_context(|| {
                format!(
                    "{}: cannot read password file {}",
                    o.of("password-file"),
                    path.display()
                )
            })?;
            let trimmed = text.trim_ascii_end().to_vec();
            if trimmed.is_empty() {
                bail!(
                    "{}: password file {} is empty",
                    o.of("password-file"),
                    path.display()
                );
            }
            Some(trimmed)
        }
        (None, Ok(p)) if !p.is_empty() => Some(p.into_bytes()),
        _ => None,
    };
    cfg.insecure_mesh = args.insecure_mesh;
    cfg.check_mesh_security()
        .map_err(|e| anyhow!("{}", e.to_string().trim_start_matches("configuration: ")))?;
    if let Some(n) = args.voters {
        if !(1..=7).contains(&n) {
            bail!(
                "{}: must be between 1 and 7 (3 or 5 recommended), not {n}",
                o.of("voters")
            );
        }
        cfg.autopilot.voters = n;
    }
    if let Some(t) = args.dead_voter_timeout {
        cfg.autopilot.dead_voter_timeout = t;
    }
    if let Some(t) = args.stabilization_time {
        cfg.autopilot.stabilization = t;
    }
    if let Some(b) = args.autopilot {
        cfg.autopilot.growth = b;
    }
    if let Some(t) = args.mesh_heartbeat {
        if t.is_zero() {
            bail!("{}: must be positive", o.of("mesh-heartbeat"));
        }
        cfg.mesh_heartbeat = t;
    }
    if let Some(t) = args.mesh_gossip_interval {
        if t.is_zero() {
            bail!("{}: must be positive", o.of("mesh-gossip-interval"));
        }
        cfg.mesh_gossip_interval = t;
    }
    if let Some(t) = args.tick {
        cfg.tick = t;
    }
    if let Some(n) = args.election_ticks {
        cfg.election_ticks = n;
    }
    if let Some(n) = args.heartbeat_ticks {
        cfg.heartbeat_ticks = n;
    }
    if let Some(n) = args.snapshot_count {
        cfg.snapshot_count = n;
    }
    if let Some(n) = args.catch_up_entries {
        cfg.catch_up_entries = n;
    }
    if let Some(t) = args.request_timeout {
        cfg.request_timeout = t;
    }
    if let Some(n) = args.max_request_bytes {
        cfg.limits.max_request_bytes = n;
    }
    if let Some(n) = args.max_txn_ops {
        cfg.limits.max_txn_ops = n;
    }
    match args.quota_backend_bytes {
        // etcd treats 0 as "the default quota".
        Some(0) | None => {}
        Some(n) => cfg.quota_backend_bytes = n,
    }
    if let Some(n) = args.backend_cache_bytes {
        cfg.backend_cache_bytes = n;
    }
    let log_format = args.log_format.unwrap_or_else(|| "text".into());
    if !["text", "json"].contains(&log_format.as_str()) {
        bail!(
            "{}: '{log_format}' is neither text nor json",
            o.of("log-format")
        );
    }
    cfg.client_tls = client_tls;
    match args.auth_token.as_deref() {
        None | Some("simple") => {}
        Some(other) => bail!(
            "{}: {other:?}: only \"simple\" tokens are supported",
            o.of("auth-token")
        ),
    }
    match args.auth_token_ttl {
        Some(0) => bail!("{}: must be at least 1 second", o.of("auth-token-ttl")),
        Some(secs) => cfg.auth_token_ttl = Duration::from_secs(secs),
        None => {}
    }
    cfg.unsafe_fault_injection = args.unsafe_fault_injection;
    if let Some(t) = args.corrupt_check_time {
        cfg.corrupt_check_interval = t;
    }
    let mode = args
        .auto_compaction_mode
        .unwrap_or_else(|| "periodic".into());
    let retention = args.auto_compaction_retention.unwrap_or_else(|| "0".into());
    cfg.auto_compaction = auto_compaction(&mode, &retention)
        .map_err(|e| anyhow!("{}: {e}", o.of("auto-compaction-retention")))?;
    if let Some(n) = args.min_free_disk_bytes {
        cfg.min_free_disk_bytes = n;
    }
    if cfg.tick.is_zero() {
        bail!("{}: must be positive", o.of("tick"));
    }
    if cfg.heartbeat_ticks == 0 || cfg.election_ticks <= cfg.heartbeat_ticks {
        bail!(
            "{} ({}) must be greater than {} ({}), which must be at least 1",
            o.of("election-ticks"),
            cfg.election_ticks,
            o.of("heartbeat-ticks"),
            cfg.heartbeat_ticks
        );
    }
    if cfg.snapshot_count == 0 {
        bail!("{}: must be at least 1", o.of("snapshot-count"));
    }
    if !(1024..=1 << 30).contains(&cfg.limits.max_request_bytes) {
        bail!(
            "{}: must be between 1 KiB and 1 GiB",
            o.of("max-request-bytes")
        );
    }
    let same_port = |a: SocketAddr, b: SocketAddr| {
        a.port() != 0
            && a.port() == b.port()
            && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
    };
    if same_port(cfg.listen_client, cfg.listen_mesh) {
        bail!(
            "{} and {} name the same address {}",
            o.of("listen-client"),
            o.of("listen-mesh"),
            cfg.listen_client
        );
    }
    if let Some(m) = cfg.listen_metrics {
        for (key, other) in [
            ("listen-client", cfg.listen_client),
            ("listen-mesh", cfg.listen_mesh),
        ] {
            if same_port(m, other) {
                bail!(
                    "{} and {} name the same address {m}",
                    o.of("listen-metrics"),
                    o.of(key)
                );
            }
        }
    }
    Ok(Resolved {
        server: cfg,
        log_format,
    })
}

/// The keys of the YAML file, as long flag names, with their help lines.
pub fn keys() -> Vec<(String, String)> {
    let cmd = Args::augment_args(clap::Command::new("meshd"));
    cmd.get_arguments()
        .filter_map(|a| {
            let key = a.get_long()?;
            (key != "config").then(|| {
                let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
                (key.to_string(), help)
            })
        })
        .collect()
}

/// etcd's reading of `--auto-compaction-retention`: in periodic mode a duration, or a
/// bare number of hours; in revision mode a number of revisions; zero is off.
fn auto_compaction(
    mode: &str,
    retention: &str,
) -> Result<Option<mesh_core::compactor::AutoCompaction>, String> {
    use mesh_core::compactor::AutoCompaction;
    let retention = retention.trim();
    match mode {
        "revision" => match retention.parse::<i64>() {
            Ok(0) => Ok(None),
            Ok(n) if n > 0 => Ok(Some(AutoCompaction::Revision(n))),
            _ => Err(format!(
                "'{retention}' is not a number of revisions (revision mode)"
            )),
        },
        "periodic" => {
            let d = match retention.parse::<u64>() {
                Ok(hours) => Duration::from_secs(hours.saturating_mul(3600)),
                Err(_) => humantime::parse_duration(retention).map_err(|e| {
                    format!("'{retention}' is not a duration or a number of hours: {e}")
                })?,
            };
            if d.is_zero() {
                Ok(None)
            } else if d < Duration::from_secs(1) {
                Err(format!("'{retention}' is shorter than a second"))
            } else {
                Ok(Some(AutoCompaction::Periodic(d)))
            }
        }
        other => Err(format!("unknown mode {other:?}")),
    }
}

/// The default of `key` as YAML, or `None` when it has no fixed default (it is
/// derived from other settings, or unset means "not used").
fn default_yaml(key: &str) -> Option<String> {
    let d = ServerConfig::new("default");
    let quoted = |s: String| serde_json::Value::String(s).to_string();
    let duration = |t: Duration| quoted(humantime::format_duration(t).to_string());
    Some(match key {
        "name" => quoted(d.name),
        "listen-client" => quoted(d.listen_client.to_string()),
        "listen-mesh" => quoted(d.listen_mesh.to_string()),
        "listen-metrics" => quoted(DEFAULT_LISTEN_METRICS.into()),
        "initial-cluster-token" => quoted(d.initial_cluster_token),
        "voters" => d.autopilot.voters.to_string(),
        "dead-voter-timeout" => duration(d.autopilot.dead_voter_timeout),
        "stabilization-time" => duration(d.autopilot.stabilization),
        "autopilot" => d.autopilot.growth.to_string(),
        "mesh-heartbeat" => duration(d.mesh_heartbeat),
        "mesh-gossip-interval" => duration(d.mesh_gossip_interval),
        "tick" => duration(d.tick),
        "election-ticks" => d.election_ticks.to_string(),
        "heartbeat-ticks" => d.heartbeat_ticks.to_string(),
        "snapshot-count" => d.snapshot_count.to_string(),
        "catch-up-entries" => d.catch_up_entries.to_string(),
        "request-timeout" => duration(d.request_timeout),
        "max-request-bytes" => d.limits.max_request_bytes.to_string(),
        "max-txn-ops" => d.limits.max_txn_ops.to_string(),
        "quota-backend-bytes" => d.quota_backend_bytes.to_string(),
        "backend-cache-bytes" => d.backend_cache_bytes.to_string(),
        "log-format" => quoted("text".into()),
        "client-cert-auth" => "false".into(),
        "insecure-mesh" => "false".into(),
        "min-free-disk-bytes" => d.min_free_disk_bytes.to_string(),
        "corrupt-check-time" => duration(d.corrupt_check_interval),
        "auto-compaction-mode" => quoted("periodic".into()),
        "auto-compaction-retention" => quoted("0".into()),
        "auth-token" => quoted("simple".into()),
        "auth-token-ttl" => d.auth_token_ttl.as_secs().to_string(),
        _ => return None,
    })
}

/// `meshd config default`: every key with its help line, at its default (keys without
/// a fixed default are commented out).
pub fn default_file() -> String {
    let mut out = String::from(
        "# meshd configuration (meshd --config FILE). Every key is also a flag (--KEY)\n\
         # and an environment variable (MESHD_KEY); precedence: flag > env > file > default.\n",
    );
    for (key, help) in keys() {
        out.push('\n');
        for line in help.lines() {
            out.push_str(&format!("# {line}\n"));
        }
        match default_yaml(&key) {
            Some(v) => out.push_str(&format!("{key}: {v}\n")),
            None => out.push_str(&format!("# {key}:\n")),
        }
    }
    out
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

    fn resolve_argv(argv: &[&str]) -> Result<ServerConfig> {
        let m = command().try_get_matches_from(argv)?;
        let cli = Cli::from_arg_matches(&m)?;
        Ok(resolve(cli.run, &m)?.server)
    }

    #[test]
    fn auto_compaction_reads_retention_as_etcd() {
        use mesh_core::compactor::AutoCompaction::{Periodic, Revision};
        let h = Duration::from_secs(3600);
        assert_eq!(auto_compaction("periodic", "0"), Ok(None));
        assert_eq!(auto_compaction("periodic", "1"), Ok(Some(Periodic(h))));
        assert_eq!(
            auto_compaction("periodic", "30m"),
            Ok(Some(Periodic(h / 2)))
        );
        assert_eq!(
            auto_compaction("revision", "1000"),
            Ok(Some(Revision(1000)))
        );
        assert_eq!(auto_compaction("revision", "0"), Ok(None));
        assert!(auto_compaction("revision", "1h").is_err());
        assert!(auto_compaction("periodic", "soon").is_err());
        assert!(auto_compaction("periodic", "10ms").is_err());
        let cfg = resolve_argv(&[
            "meshd",
            "--auto-compaction-mode=revision",
            "--auto-compaction-retention=500",
        ])
        .unwrap();
        assert_eq!(cfg.auto_compaction, Some(Revision(500)));
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.yaml");
        std::fs::write(&f, "auto-compaction-retention: 2\n").unwrap();
        let cfg = resolve_argv(&["meshd", "--config", f.to_str().unwrap()]).unwrap();
        assert_eq!(cfg.auto_compaction, Some(Periodic(2 * h)));
    }

    #[test]
    fn tls_and_auth_settings_from_file_and_flags() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("m.yaml");
        let resolve_file = |extra: &[&str]| {
            let mut args = vec!["meshd", "--config", f.to_str().unwrap()];
            args.extend_from_slice(extra);
            resolve_argv(&args).map_err(|e| format!("{e:#}"))
        };
        // The YAML keys reach the TLS loader, which names the file it cannot read.
        std::fs::write(
            &f,
            "cert-file: /nonexistent/server.pem\nkey-file: /nonexistent/key.pem\n",
        )
        .unwrap();
        let err = resolve_file(&[]).unwrap_err();
        assert!(
            err.contains("cannot read cert file /nonexistent/server.pem"),
            "{err}"
        );
        std::fs::write(&f, "key-file: k.pem\n").unwrap();
        let err = resolve_file(&[]).unwrap_err();
        assert!(
            err.contains("--cert-file and --key-file must be given together"),
            "{err}"
        );
        std::fs::write(&f, "client-cert-auth: true\n").unwrap();
        let err = resolve_file(&[]).unwrap_err();
        assert!(err.contains("need --cert-file and --key-file"), "{err}");

        std::fs::write(&f, "auth-token: simple\nauth-token-ttl: 30\n").unwrap();
        let cfg = resolve_file(&[]).unwrap();
        assert!(cfg.client_tls.is_none());
        assert_eq!(cfg.auth_token_ttl, Duration::from_secs(30));
        assert_eq!(
            resolve_file(&["--auth-token-ttl=7"])
                .unwrap()
                .auth_token_ttl,
            Duration::from_secs(7)
        );
        let err = resolve_file(&["--auth-token=jwt,pub-key=x"]).unwrap_err();
        assert!(
            err.contains("only \"simple\" tokens are supported"),
            "{err}"
        );
    }

    #[test]
    fn flag_beats_file_and_unknown_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("m.yaml");
        let fs = f.to_str().unwrap();
        std::fs::write(&f, "name: fromfile\nsnapshot-count: 7\ntick: 20ms\n").unwrap();
        let cfg = resolve_argv(&["meshd", "--config", fs, "--snapshot-count", "9"]).unwrap();
        assert_eq!(cfg.name, "fromfile");
        assert_eq!(cfg.snapshot_count, 9);
        assert_eq!(cfg.tick, Duration::from_millis(20));
        assert_eq!(
            cfg.quota_backend_bytes,
            mesh_core::server::DEFAULT_QUOTA_BACKEND_BYTES
        );
        assert_eq!(cfg.listen_metrics, None, "off unless asked for");
        assert_eq!(cfg.auto_compaction, None, "off unless asked for");

        std::fs::write(
            &f,
            "name: q\nquota-backend-bytes: 4096000\nlisten-metrics: off\n",
        )
        .unwrap();
        let cfg = resolve_argv(&["meshd", "--config", fs]).unwrap();
        assert_eq!(cfg.quota_backend_bytes, 4_096_000);
        assert_eq!(cfg.listen_metrics, None);
        let cfg =
            resolve_argv(&["meshd", "--config", fs, "--quota-backend-bytes=5000000"]).unwrap();
        assert_eq!(cfg.quota_backend_bytes, 5_000_000);
        assert_eq!(
            cfg.backend_cache_bytes,
            mesh_core::storage::DEFAULT_CACHE_BYTES
        );
        std::fs::write(&f, "name: c\nbackend-cache-bytes: 1073741824\n").unwrap();
        let cfg = resolve_argv(&["meshd", "--config", fs]).unwrap();
        assert_eq!(cfg.backend_cache_bytes, 1 << 30);

        std::fs::write(&f, "name: x\nbogus-key: 1\n").unwrap();
        let text = format!(
            "{:#}",
            resolve_argv(&["meshd", "--config", fs]).unwrap_err()
        );
        assert!(
            text.contains(&format!("{fs}:2: bogus-key: unknown field")),
            "{text}"
        );
    }

    #[test]
    fn lists_and_switches_from_the_file_meet_the_flags() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("m.yaml");
        let fs = f.to_str().unwrap();
        std::fs::write(
            &f,
            "peer: [10.0.0.1:6783, 10.0.0.2:6783]\ninsecure-mesh: true\nautopilot: false\n",
        )
        .unwrap();
        let cfg = resolve_argv(&["meshd", "--config", fs]).unwrap();
        assert_eq!(cfg.peers, ["10.0.0.1:6783", "10.0.0.2:6783"]);
        assert!(cfg.insecure_mesh, "a switch the file turns on");
        assert!(!cfg.autopilot.growth);
        let cfg = resolve_argv(&["meshd", "--config", fs, "--peer=10.0.0.9:6783"]).unwrap();
        assert_eq!(
            cfg.peers,
            ["10.0.0.9:6783"],
            "the flags' list replaces the file's"
        );
        assert!(cfg.insecure_mesh);
        let cfg = resolve_argv(&["meshd", "--config", fs, "--autopilot=true"]).unwrap();
        assert!(cfg.autopilot.growth);
    }

    #[test]
    fn every_setting_has_its_environment_variable() {
        let cmd = command();
        for a in cmd.get_arguments().filter(|a| a.get_long().is_some()) {
            let long = a.get_long().unwrap();
            let env = a.get_env().map(|e| e.to_string_lossy().into_owned());
            if FLAG_ONLY.contains(&long) || ["help", "version"].contains(&long) {
                assert_eq!(env, None, "{long}");
            } else {
                assert_eq!(env, Some(env_name(long)), "{long}");
            }
        }
    }

    #[test]
    fn type_errors_and_combinations_name_file_line_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("m.yaml");
        let fs = f.to_str().unwrap();
        let err = |yaml: &str, extra: &[&str]| {
            std::fs::write(&f, yaml).unwrap();
            let mut argv = vec!["meshd", "--config", fs];
            argv.extend_from_slice(extra);
            format!("{:#}", resolve_argv(&argv).unwrap_err())
        };
        let e = err("name: a\nsnapshot-count: lots\n", &[]);
        assert_eq!(
            e,
            format!("{fs}:2: snapshot-count: invalid value 'lots': invalid digit found in string")
        );
        let e = err("# c\npeer:\n  - 1.2.3.4:6783\n  - [x]\n", &[]);
        assert!(e.starts_with(&format!("{fs}:2: peer: invalid type")), "{e}");
        let e = err("insecure-mesh: maybe\n", &[]);
        assert!(
            e.starts_with(&format!("{fs}:1: insecure-mesh: invalid type")),
            "{e}"
        );
        let e = err("unsafe-fault-injection: true\n", &[]);
        assert_eq!(e, format!("{fs}:1: unsafe-fault-injection: unknown field"));
        let e = err("tick: soon\n", &[]);
        assert!(e.starts_with(&format!("{fs}:1: tick: ")), "{e}");
        let e = err(
            "name: a\nbootstrap-expect: 3\ninitial-cluster: a=h:1\n",
            &[],
        );
        assert_eq!(
            e,
            format!("{fs}:2: bootstrap-expect and {fs}:3: initial-cluster cannot be used together")
        );
        let e = err("election-ticks: 2\n", &["--heartbeat-ticks=2"]);
        assert!(
            e.starts_with(&format!(
                "{fs}:1: election-ticks (2) must be greater than --heartbeat-ticks (2)"
            )),
            "{e}"
        );
        let e = err("listen-metrics: 127.0.0.1:2379\n", &[]);
        assert_eq!(
            e,
            format!("{fs}:1: listen-metrics and listen-client (default) name the same address 127.0.0.1:2379")
        );
    }

    #[test]
    fn default_file_lists_every_key_and_checks_as_the_defaults() {
        let text = default_file();
        for (key, _) in keys() {
            assert!(
                text.contains(&format!("\n{key}: ")) || text.contains(&format!("\n# {key}:\n")),
                "{key} missing from:\n{text}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("default.yaml");
        std::fs::write(&f, &text).unwrap();
        let from_file = check_file(&f).unwrap();
        let from_nothing = resolve_argv(&["meshd"]).unwrap();
        assert_eq!(
            format!("{:?}", from_file.server),
            format!("{from_nothing:?}")
        );
    }
}
