//! The raw command line as clap sees it: flags and arguments exactly as typed, before
//! validation. `config.rs` turns these into the checked values the commands use.
use clap::{Args, Parser, Subcommand, ValueEnum};

pub const EXIT_CODES: &str = "\
Exit codes:
  0  success (also when stdout is closed early, e.g. `meshctl get --prefix a | head -1`)
  1  error (the server's error text is printed as `Error: ...` on stderr)
  2  usage error (unknown flag, missing argument, or a flag value that does not parse)
  3  compare failed (`cas`)
  4  key not found (`get --require`)";

/// meshctl: command-line client for meshd and any etcd v3 server.
#[derive(Debug, Parser)]
#[command(name = "meshctl", version, about, after_help = EXIT_CODES, args_override_self = true)]
pub struct Cli {
    /// gRPC endpoints, comma separated (`host:port` or `http://host:port`).
    #[arg(long, global = true, env = "MESHCTL_ENDPOINTS", value_delimiter = ',', default_value = "127.0.0.1:2379", action = clap::ArgAction::Set)]
    pub endpoints: Vec<String>,
    /// Output format.
    #[arg(short = 'w', long = "write-out", global = true, value_enum, default_value_t = OutputFormat::Simple)]
    pub write_out: OutputFormat,
    /// Timeout of one request (e.g. `5s`, `500ms`).
    #[arg(
        long,
        global = true,
        visible_alias = "command-timeout",
        default_value = "5s"
    )]
    pub timeout: String,
    /// Timeout for connecting to one endpoint.
    #[arg(long, global = true, default_value = "2s")]
    pub dial_timeout: String,
    // -- TLS (etcdctl's flag names) --
    /// CA (PEM) that signed the servers' certificates; endpoints then use TLS.
    #[arg(long = "cacert", global = true, env = "MESHCTL_CACERT")]
    pub tls_cacert: Option<std::path::PathBuf>,
    /// Client certificate (PEM), for servers with client-certificate auth.
    #[arg(long = "cert", global = true, env = "MESHCTL_CERT")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long = "key", global = true, env = "MESHCTL_KEY")]
    pub tls_key: Option<std::path::PathBuf>,
    // -- auth (etcdctl's flag names) --
    /// User name, or `name:password`, to authenticate as (asks for the password when
    /// it is not given and stdin is a terminal).
    #[arg(long = "user", global = true, env = "MESHCTL_USER")]
    pub auth_user: Option<String>,
    /// Password of --user (instead of `name:password`).
    #[arg(long = "password", global = true, env = "MESHCTL_PASSWORD")]
    pub auth_password: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Simple,
    Json,
    Table,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Get a key or a range of keys.
    Get(GetArgs),
    /// Put a key (value from the argument, or all of stdin when omitted).
    Put(PutArgs),
    /// Delete a key or a range of keys; prints the number deleted.
    Del(DelArgs),
    /// Run a transaction read from stdin in etcdctl's syntax (compares, blank line,
    /// success ops, blank line, failure ops).
    #[command(after_help = TXN_HELP)]
    Txn(TxnArgs),
    /// Atomic compare-and-swap for scripts; exits 3 when the compare fails.
    Cas(CasArgs),
    /// Watch a key or range and print events until interrupted.
    Watch(WatchArgs),
    /// Compact the history up to a revision.
    Compact(CompactArgs),
    /// Leases: grant, revoke, keep-alive, timetolive, list.
    #[command(subcommand)]
    Lease(LeaseCommand),
    /// Take a distributed lock; hold it while COMMAND runs, or print its key and hold
    /// it until interrupted.
    Lock(LockArgs),
    /// Campaign in an election and hold leadership until interrupted, or with
    /// --listen print every leader value.
    Elect(ElectArgs),
    /// Cluster membership.
    #[command(subcommand)]
    Member(MemberCommand),
    /// Endpoint status and health.
    #[command(subcommand)]
    Endpoint(EndpointCommand),
    /// The gossip mesh as the answering node sees it.
    #[command(subcommand)]
    Mesh(MeshCommand),
    /// Counters gossiped over the mesh: available on both sides of a partition,
    /// converging when it heals (not linearizable; use the KV store for that).
    #[command(subcommand)]
    Counter(CounterCommand),
    /// Save, inspect and restore snapshots of the store.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Transfer leadership to another member (hex member ID).
    MoveLeader {
        /// The member to become leader, as `member list` shows it (hex).
        target: String,
    },
    /// Defragment the database of each endpoint (gives free space back to the filesystem).
    Defrag {
        /// Use every member's client URLs instead of --endpoints.
        #[arg(long)]
        cluster: bool,
    },
    /// List or disarm alarms (NOSPACE, CORRUPT).
    #[command(subcommand)]
    Alarm(AlarmCommand),
    /// Measure put/get throughput and latency.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Users of the Auth service: add, get, list, delete, passwd, grant-role, revoke-role.
    #[command(subcommand)]
    User(UserCommand),
    /// Roles and their key-range permissions.
    #[command(subcommand)]
    Role(RoleCommand),
    /// Turn authentication on or off, or show whether it is on.
    #[command(subcommand)]
    Auth(AuthCommand),
    /// Print a shell completion script.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

pub const TXN_HELP: &str = "\
Syntax (one item per line):
  compares:  TARGET(\"key\") OP \"value\"   TARGET: version|ver, create|c, mod|m, value|val, lease
                                       OP: = != < >   (lease values are hex)
  <blank line>
  success:   put KEY VALUE [--lease ID] [--prev-kv] | get KEY [RANGE_END] [get flags] | del KEY [RANGE_END] [--prefix]
  <blank line>
  failure:   same as success
Quote keys or values containing spaces with double quotes.";

/// A key or a range of keys, as get, del and watch take them.
#[derive(Debug, Clone, Args)]
pub struct KeyRange {
    /// The key, or the start of the range.
    pub key: String,
    /// End of the half-open range [KEY, RANGE_END).
    pub range_end: Option<String>,
    /// Every key starting with KEY.
    #[arg(long)]
    pub prefix: bool,
    /// Every key >= KEY (byte order).
    #[arg(long)]
    pub from_key: bool,
}

#[derive(Debug, Clone, Args)]
pub struct GetArgs {
    #[command(flatten)]
    pub range: KeyRange,
    /// Read at this revision.
    #[arg(long, default_value_t = 0)]
    pub rev: i64,
    /// Maximum number of results.
    #[arg(long, default_value_t = 0)]
    pub limit: i64,
    /// Get only the keys.
    #[arg(long)]
    pub keys_only: bool,
    /// Print only values (simple format).
    #[arg(long)]
    pub print_value_only: bool,
    /// Linearizable (l) or serializable (s).
    #[arg(long, default_value = "l")]
    pub consistency: String,
    /// Sort target: KEY, VERSION, CREATE, MODIFY, VALUE.
    #[arg(long)]
    pub sort_by: Option<String>,
    /// Sort order: ASCEND or DESCEND.
    #[arg(long)]
    pub order: Option<String>,
    /// Print only the number of matching keys.
    #[arg(long)]
    pub count_only: bool,
    /// Exit 4 when no key matched.
    #[arg(long)]
    pub require: bool,
}

#[derive(Debug, Clone, Args)]
pub struct PutArgs {
    pub key: String,
    /// The value; all of stdin (byte for byte, trailing newline kept) when omitted.
    pub value: Option<String>,
    /// Print the previous key-value.
    #[arg(long)]
    pub prev_kv: bool,
    /// Attach the key to this lease (hex ID).
    #[arg(long)]
    pub lease: Option<String>,
    /// Keep the current value.
    #[arg(long)]
    pub ignore_value: bool,
    /// Keep the current lease.
    #[arg(long)]
    pub ignore_lease: bool,
}

#[derive(Debug, Clone, Args)]
pub struct DelArgs {
    #[command(flatten)]
    pub range: KeyRange,
    /// Print the deleted key-values.
    #[arg(long)]
    pub prev_kv: bool,
}

#[derive(Debug, Clone, Args)]
pub struct TxnArgs {
    /// Prompt for each section (default when stdin is a terminal).
    #[arg(short, long)]
    pub interactive: bool,
}

#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("expect").required(true).args(["expect_value", "expect_rev", "create"])))]
pub struct CasArgs {
    pub key: String,
    pub value: String,
    /// Swap only if the current value is exactly this.
    #[arg(long)]
    pub expect_value: Option<String>,
    /// Swap only if the key's mod revision is exactly this.
    #[arg(long)]
    pub expect_rev: Option<i64>,
    /// Swap only if the key does not exist.
    #[arg(long)]
    pub create: bool,
}

#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    pub range: KeyRange,
    /// Start from this revision (inclusive).
    #[arg(long, default_value_t = 0)]
    pub rev: i64,
    /// Print each event's previous key-value.
    #[arg(long)]
    pub prev_kv: bool,
    /// Command to run for every event (after `--`), with ETCD_WATCH_* and MESHCTL_WATCH_* set.
    #[arg(last = true)]
    pub exec: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct CompactArgs {
    pub revision: i64,
    /// Wait until the compaction is physically applied.
    #[arg(long)]
    pub physical: bool,
}

#[derive(Debug, Subcommand)]
pub enum LeaseCommand {
    /// Create a lease of TTL seconds.
    Grant { ttl: i64 },
    /// Revoke a lease (hex ID), deleting every key attached to it.
    Revoke { id: String },
    /// Keep a lease (hex ID) alive until interrupted or the lease is gone.
    KeepAlive {
        id: String,
        /// Refresh once and exit.
        #[arg(long)]
        once: bool,
    },
    /// Remaining and granted TTL of a lease (hex ID).
    Timetolive {
        id: String,
        /// Also list the keys attached to the lease.
        #[arg(long)]
        keys: bool,
    },
    /// List every lease.
    List,
}

#[derive(Debug, Clone, Args)]
pub struct LockArgs {
    /// The lock's name (its keys live under NAME/).
    pub name: String,
    /// TTL in seconds of the lease that holds the lock (kept alive while held).
    #[arg(long, default_value_t = 10)]
    pub ttl: i64,
    /// Command to run while holding the lock (after `--`), with ETCD_LOCK_KEY and
    /// ETCD_LOCK_REV set; meshctl exits with its status.
    #[arg(last = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct ElectArgs {
    /// The election's name (its keys live under NAME/).
    pub name: String,
    /// The value to proclaim once elected (required unless --listen).
    pub proposal: Option<String>,
    /// Observe the election: print every leader value, in order.
    #[arg(short, long)]
    pub listen: bool,
    /// TTL in seconds of the lease that holds the candidacy (kept alive).
    #[arg(long, default_value_t = 10)]
    pub ttl: i64,
}

#[derive(Debug, Subcommand)]
pub enum MemberCommand {
    /// List the members.
    List,
    /// Add a member; then start it with --peer pointing at any current member.
    Add {
        /// Name the new member will be started with.
        name: String,
        /// The new member's mesh address (host:port) as its peers will dial it.
        #[arg(long = "mesh-addr", alias = "peer-urls")]
        mesh_addr: String,
        /// Add it as a learner (non-voting) member.
        #[arg(long)]
        learner: bool,
    },
    /// Remove a member by ID (hex).
    Remove {
        #[arg(value_parser = parse_hex_id)]
        id: u64,
    },
    /// Promote a learner that has caught up to a voter.
    Promote {
        #[arg(value_parser = parse_hex_id)]
        id: u64,
    },
    /// Change a member's mesh address.
    Update {
        #[arg(value_parser = parse_hex_id)]
        id: u64,
        #[arg(long = "mesh-addr", alias = "peer-urls")]
        mesh_addr: String,
    },
}

/// A member ID as etcdctl prints it: hexadecimal.
pub fn parse_hex_id(s: &str) -> Result<u64, String> {
    u64::from_str_radix(s.trim_start_matches("0x"), 16)
        .map_err(|_| format!("'{s}' is not a hexadecimal member ID"))
}

#[derive(Debug, Subcommand)]
pub enum MeshCommand {
    /// Every known peer: name, nickname, UID, address, connections, reachable, next hop.
    Peers,
    /// This node's view: peers, routes, gossip channels, traffic.
    Status,
}

#[derive(Debug, Subcommand)]
pub enum CounterCommand {
    /// Add N (default 1, may be negative) and print the new value.
    Incr {
        name: String,
        #[arg(default_value_t = 1, allow_negative_numbers = true)]
        delta: i64,
    },
    /// Print the value alone.
    Get { name: String },
}

#[derive(Debug, Subcommand)]
pub enum EndpointCommand {
    /// Status of each endpoint.
    Status {
        /// Use every member's client URLs instead of --endpoints.
        #[arg(long)]
        cluster: bool,
    },
    /// Health of each endpoint (a linearizable read must commit); exit 1 if any is unhealthy.
    Health {
        /// Use every member's client URLs instead of --endpoints.
        #[arg(long)]
        cluster: bool,
    },
    /// HashKV of each endpoint: equal on healthy members for the same revision.
    Hashkv {
        /// Use every member's client URLs instead of --endpoints.
        #[arg(long)]
        cluster: bool,
        /// Hash the store as of this revision (0: the current one).
        #[arg(long, default_value_t = 0)]
        rev: i64,
    },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Stream a snapshot from one endpoint into FILE (checksum verified before the
    /// file appears).
    Save { file: std::path::PathBuf },
    /// Hash, revision, total keys and size of a snapshot file, computed as etcdctl does.
    Status { file: std::path::PathBuf },
    /// Create the data dir of a member of a NEW cluster from a snapshot file.
    Restore(RestoreArgs),
}

#[derive(Debug, Clone, Args)]
pub struct RestoreArgs {
    pub file: std::path::PathBuf,
    /// The data dir to create (must not exist or be empty).
    #[arg(long)]
    pub data_dir: std::path::PathBuf,
    /// This member's name (as meshd's --name).
    #[arg(long, default_value = "default")]
    pub name: String,
    /// Every member of the new cluster, `name=host:port,...` (as meshd's --initial-cluster).
    #[arg(long)]
    pub initial_cluster: Option<String>,
    /// Token of the new cluster (as meshd's --initial-cluster-token).
    #[arg(long, default_value = "meshd-cluster")]
    pub initial_cluster_token: String,
    /// This member's mesh address, without --initial-cluster (as meshd's --advertise-mesh).
    #[arg(long, visible_alias = "initial-advertise-peer-urls")]
    pub mesh_addr: Option<String>,
    /// Do not verify the SHA-256 trailer; also restores an etcd database file without
    /// one (an etcd data dir's member/snap/db), checked by its structure only.
    #[arg(long)]
    pub skip_hash_check: bool,
}

#[derive(Debug, Subcommand)]
pub enum AlarmCommand {
    /// List every active alarm.
    List,
    /// Disarm every active alarm.
    Disarm,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Benchmark puts (random keys, or --sequential-keys).
    Put(BenchArgs),
    /// Benchmark ranges of one key, linearizable or serializable (a missing key is still
    /// a successful read).
    #[command(alias = "range")]
    Get(BenchArgs),
    /// Benchmark puts each wrapped in a txn (etcd's txn-put).
    TxnPut(BenchArgs),
    /// Benchmark lease keep-alives: one lease and keep-alive stream per client.
    LeaseKeepalive(BenchArgs),
    /// Watch fan-out: --watchers watch one key while --total puts change it; reports
    /// events delivered per second and put-to-delivery latency.
    Watch(WatchBenchArgs),
    /// Availability: a put every --interval for --duration through all endpoints;
    /// reports the longest gap between two successful writes (run it across a leader
    /// kill to measure failover time).
    Availability(AvailabilityArgs),
}

#[derive(Debug, Clone, Args)]
pub struct WatchBenchArgs {
    /// Watch streams.
    #[arg(long, default_value_t = 1000)]
    pub watchers: usize,
    /// gRPC connections the watchers are spread over (connection i to endpoint i
    /// modulo the number of --endpoints).
    #[arg(long, default_value_t = 10)]
    pub conns: usize,
    /// Puts to the watched key (each is delivered to every watcher).
    #[arg(long, default_value_t = 1000)]
    pub total: u64,
    /// Concurrent writers.
    #[arg(long, default_value_t = 1)]
    pub writers: usize,
    /// Value size in bytes (at least 16: the put's send time travels in the value).
    #[arg(long, default_value_t = 32)]
    pub val_size: usize,
}

#[derive(Debug, Clone, Args)]
pub struct AvailabilityArgs {
    /// How long to keep writing, e.g. 10s.
    #[arg(long, default_value = "10s")]
    pub duration: String,
    /// Pause between writes, e.g. 10ms.
    #[arg(long, default_value = "10ms")]
    pub interval: String,
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Requests in flight at once.
    #[arg(long, default_value_t = 1)]
    pub clients: usize,
    /// gRPC connections (requests are spread over them). Connection i goes to
    /// endpoint i modulo the number of --endpoints, as in etcd's benchmark.
    #[arg(long, default_value_t = 1)]
    pub conns: usize,
    /// Total number of requests.
    #[arg(long, default_value_t = 10_000)]
    pub total: u64,
    /// Key size in bytes.
    #[arg(long, default_value_t = 8)]
    pub key_size: usize,
    /// Value size in bytes (put).
    #[arg(long, default_value_t = 8)]
    pub val_size: usize,
    /// Number of distinct keys.
    #[arg(long, default_value_t = 1)]
    pub key_space_size: u64,
    /// Use keys 0, 1, 2, ... (modulo the key space) instead of random ones.
    #[arg(long)]
    pub sequential_keys: bool,
    /// Consistency for get: l or s.
    #[arg(long, default_value = "l")]
    pub consistency: String,
    /// Requests per second across all clients (0: as fast as they go). Request n is
    /// due n/rate seconds after the start, and its latency counts from then, so time
    /// spent queued behind slow requests is measured, not hidden.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
}

// ---- auth commands (etcdctl 3.4's names and arguments) ----

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Add a user (`name` or `name:password`).
    Add {
        user: String,
        /// Ask for the password on the terminal; with false, read it from stdin.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        interactive: bool,
        /// The new user's password (instead of asking).
        #[arg(long)]
        new_user_password: Option<String>,
        /// A user that cannot authenticate with a password.
        #[arg(long)]
        no_password: bool,
    },
    /// Show a user's roles.
    Get {
        name: String,
        /// Also show the permissions of each role.
        #[arg(long)]
        detail: bool,
    },
    /// List the users.
    List,
    /// Delete a user.
    Delete { name: String },
    /// Change a user's password.
    Passwd {
        name: String,
        /// Ask for the password on the terminal; with false, read it from stdin.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        interactive: bool,
    },
    /// Grant a role to a user.
    GrantRole { user: String, role: String },
    /// Revoke a role from a user.
    RevokeRole { user: String, role: String },
}

#[derive(Debug, Subcommand)]
pub enum RoleCommand {
    /// Add a role.
    Add { name: String },
    /// Show a role's permissions.
    Get { name: String },
    /// List the roles.
    List,
    /// Delete a role.
    Delete { name: String },
    /// Grant a permission (read, write or readwrite) on a key or range.
    GrantPermission {
        name: String,
        /// read, write or readwrite.
        perm: String,
        key: String,
        range_end: Option<String>,
        /// The permission covers every key with the prefix `key`.
        #[arg(long)]
        prefix: bool,
        /// The permission covers every key from `key` on.
        #[arg(long)]
        from_key: bool,
    },
    /// Revoke a permission on a key or range.
    RevokePermission {
        name: String,
        key: String,
        range_end: Option<String>,
        #[arg(long)]
        prefix: bool,
        #[arg(long)]
        from_key: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuthCommand {
    /// Enable authentication (adds the root role to root when it lacks it, as etcdctl).
    Enable,
    /// Disable authentication.
    Disable,
    /// Show whether authentication is enabled and the auth revision.
    Status,
}
