//! The raw clap definitions: every flag also reads `LOCKSMITH_<FLAG>` from the
//! environment. Validation into settings happens in `commands`.
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  error (cluster unreachable, invalid semaphore value, ...)
  2  usage error
  3  no free slot (lock without --wait, or --timeout expired)
  4  not a holder (unlock by an ID that does not hold the lock)
`run` exits with the command's status (128+N if a signal N killed it; 127 if it was
not found, 126 if it could not be started).

Every flag can also be set as LOCKSMITH_<FLAG> in the environment, e.g.
LOCKSMITH_ENDPOINTS=10.0.0.1:2379,10.0.0.2:2379. The per-request --timeout (before the
subcommand) is LOCKSMITH_TIMEOUT; the wait limit --timeout of lock, run and reboot is
LOCKSMITH_WAIT_TIMEOUT.";

/// Cluster-wide reboot semaphore: at most `max` machines hold the reboot lock at once.
///
/// The semaphore lives in meshd (or any etcd v3 server) at
/// coreos.com/updateengine/rebootlock/semaphore, in CoreOS locksmith's JSON format.
#[derive(Debug, Parser)]
#[command(name = "locksmith", version, after_help = EXIT_CODES)]
pub struct Cli {
    /// Cluster endpoints (host:port), comma separated, tried in order.
    #[arg(
        long,
        env = "LOCKSMITH_ENDPOINTS",
        value_delimiter = ',',
        default_value = "127.0.0.1:2379",
        global = true
    )]
    pub endpoints: Vec<String>,

    /// CA (PEM) that signed the servers' certificates; endpoints then use TLS.
    #[arg(long = "cacert", env = "LOCKSMITH_CACERT", global = true)]
    pub tls_cacert: Option<std::path::PathBuf>,
    /// Client certificate (PEM), for servers with client-certificate auth.
    #[arg(long = "cert", env = "LOCKSMITH_CERT", global = true)]
    pub tls_cert: Option<std::path::PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long = "key", env = "LOCKSMITH_KEY", global = true)]
    pub tls_key: Option<std::path::PathBuf>,

    /// User to authenticate as when the cluster has auth enabled: `name:password`, or
    /// `name` with --password.
    #[arg(long = "user", env = "LOCKSMITH_USER", global = true)]
    pub auth_user: Option<String>,
    /// Password of --user.
    #[arg(long = "password", env = "LOCKSMITH_PASSWORD", global = true)]
    pub auth_password: Option<String>,

    /// Semaphore group: coreos.com/updateengine/rebootlock/groups/<group>/semaphore.
    #[arg(long, env = "LOCKSMITH_GROUP", global = true)]
    pub group: Option<String>,

    /// Holder ID (default: the contents of /etc/machine-id).
    #[arg(long, env = "LOCKSMITH_ID", global = true)]
    pub id: Option<String>,

    /// Timeout of each request to the cluster (give it before the subcommand).
    #[arg(long = "timeout", env = "LOCKSMITH_TIMEOUT", default_value = "5s", value_name = "DURATION",
          value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// How long to keep retrying when the cluster is unavailable (no leader, members down).
    #[arg(long, env = "LOCKSMITH_RETRY_FOR", default_value = "1m",
          value_parser = humantime::parse_duration, global = true)]
    pub retry_for: Duration,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show free slots, the limit and the holders.
    Status {
        /// Output format.
        #[arg(short = 'w', long = "write-out", env = "LOCKSMITH_WRITE_OUT",
              value_enum, default_value_t = Format::Simple)]
        write_out: Format,
    },
    /// Take a slot (a holder locking again succeeds).
    #[command(visible_alias = "acquire")]
    Lock {
        /// Holder ID (overrides --id).
        #[arg(value_name = "ID")]
        holder: Option<String>,
        /// Wait for a free slot instead of failing with exit code 3.
        #[arg(long, env = "LOCKSMITH_WAIT")]
        wait: bool,
        #[command(flatten)]
        limit: WaitArgs,
    },
    /// Release a slot (exit code 4 if the ID does not hold one).
    #[command(visible_alias = "release")]
    Unlock {
        /// Holder ID (overrides --id).
        #[arg(value_name = "ID")]
        holder: Option<String>,
    },
    /// Set the number of machines that may hold the lock at once.
    SetMax {
        /// The new limit; below the current holder count, new locks wait.
        #[arg(value_parser = clap::value_parser!(u32), allow_negative_numbers = true)]
        max: u32,
    },
    /// Take a slot (waiting), run CMD, release the slot when it exits.
    ///
    /// SIGINT and SIGTERM are passed on to CMD; the slot is released after it exits.
    Run {
        #[command(flatten)]
        limit: WaitArgs,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<OsString>,
    },
    /// Take a slot (waiting), then run the reboot command.
    Reboot {
        #[command(flatten)]
        limit: WaitArgs,
        #[command(flatten)]
        reboot: RebootArgs,
    },
    /// For systemd: release this machine's slot left from before its reboot, then
    /// reboot (inside the window, holding a slot) whenever a reboot is needed.
    Daemon {
        #[command(flatten)]
        backoff: BackoffArgs,
        #[command(flatten)]
        reboot: RebootArgs,
        #[command(flatten)]
        need: NeedRebootArgs,
        /// Start of the reboot window in local time: "Thu 23:00" (weekly) or "23:00" (daily).
        #[arg(long, env = "LOCKSMITH_WINDOW_START", requires = "window_length")]
        window_start: Option<String>,
        /// Length of the reboot window, e.g. 1h30m.
        #[arg(long, env = "LOCKSMITH_WINDOW_LENGTH", requires = "window_start",
              value_parser = humantime::parse_duration)]
        window_length: Option<Duration>,
        /// How often to check for the need-reboot file.
        #[arg(long, env = "LOCKSMITH_POLL_INTERVAL", default_value = "1s",
              value_parser = humantime::parse_duration)]
        poll_interval: Duration,
        /// Where the semaphore is: `cluster` (--endpoints) or `fleetlock` (a FleetLock
        /// server at --fleetlock-url, for machines without cluster access).
        #[arg(long, env = "LOCKSMITH_STRATEGY", value_enum, default_value_t = Strategy::Cluster)]
        strategy: Strategy,
        #[command(flatten)]
        fleetlock: FleetLockClientArgs,
    },
    /// Serve the FleetLock protocol (Zincati's reboot coordination) over the cluster's
    /// semaphores: POST /v1/pre-reboot and /v1/steady-state, GET /-/healthy, /metrics.
    ///
    /// A FleetLock group names a locksmith group (`default` is the default semaphore),
    /// so FleetLock clients and locksmith share the slots.
    Fleetlock {
        /// Address to serve on (ip:port).
        #[arg(long, env = "LOCKSMITH_LISTEN", default_value = "127.0.0.1:3333")]
        listen: std::net::SocketAddr,
        /// Groups served, comma separated, each `NAME` or `NAME=MAX` (MAX is set on the
        /// group's semaphore at start; without it the stored max stays). Requests for
        /// other groups are refused with `unknown_group`. Default: every valid group.
        #[arg(long, env = "LOCKSMITH_GROUPS", value_delimiter = ',', value_parser = parse_group_max)]
        groups: Vec<(String, Option<u32>)>,
        /// File with a bearer token: lock and unlock then need `Authorization: Bearer
        /// <token>`.
        #[arg(long, env = "LOCKSMITH_TOKEN_FILE")]
        token_file: Option<PathBuf>,
        /// Certificate (PEM) to serve HTTPS with; needs --key-file.
        #[arg(long, env = "LOCKSMITH_CERT_FILE", requires = "key_file")]
        cert_file: Option<PathBuf>,
        /// Private key (PEM) of --cert-file.
        #[arg(long, env = "LOCKSMITH_KEY_FILE", requires = "cert_file")]
        key_file: Option<PathBuf>,
    },
    /// Tell the daemon that this machine needs a reboot (creates the need-reboot file).
    SendNeedReboot {
        #[command(flatten)]
        need: NeedRebootArgs,
    },
}

/// Where the daemon's semaphore is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Strategy {
    /// The cluster at --endpoints.
    Cluster,
    /// A FleetLock server at --fleetlock-url.
    Fleetlock,
}

/// How the daemon reaches a FleetLock server.
#[derive(Debug, Args)]
pub struct FleetLockClientArgs {
    /// Base URL of the FleetLock server (with --strategy fleetlock), e.g.
    /// `https://fleetlock.example.com:3333`. The group is --group (default `default`).
    #[arg(long, env = "LOCKSMITH_FLEETLOCK_URL")]
    pub fleetlock_url: Option<String>,
    /// CA (PEM) for an https FleetLock URL (default: the system's roots).
    #[arg(long, env = "LOCKSMITH_FLEETLOCK_CACERT")]
    pub fleetlock_cacert: Option<PathBuf>,
    /// File with the bearer token the FleetLock server wants.
    #[arg(long, env = "LOCKSMITH_FLEETLOCK_TOKEN_FILE")]
    pub fleetlock_token_file: Option<PathBuf>,
}

/// `NAME` or `NAME=MAX`.
fn parse_group_max(s: &str) -> Result<(String, Option<u32>), String> {
    let (name, max) = match s.split_once('=') {
        Some((n, m)) => (
            n,
            Some(m.parse::<u32>().map_err(|e| format!("max {m:?}: {e}"))?),
        ),
        None => (s, None),
    };
    if !crate::fleetlock::valid_group(name) {
        return Err(format!("group {name:?} does not match ^[a-zA-Z0-9.-]+$"));
    }
    Ok((name.to_string(), max))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Simple,
    Json,
}

/// How long and how patiently to wait for a free slot.
#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Give up waiting after this long (exit code 3); default: wait forever.
    #[arg(long = "timeout", env = "LOCKSMITH_WAIT_TIMEOUT", value_name = "DURATION",
          value_parser = humantime::parse_duration)]
    pub wait_timeout: Option<Duration>,
    #[command(flatten)]
    pub backoff: BackoffArgs,
}

/// The retry pause when no change of the semaphore is seen.
#[derive(Debug, Args)]
pub struct BackoffArgs {
    /// First pause between attempts (doubles each time).
    #[arg(long, env = "LOCKSMITH_BACKOFF_MIN", default_value = "5s",
          value_parser = humantime::parse_duration)]
    pub backoff_min: Duration,
    /// Longest pause between attempts.
    #[arg(long, env = "LOCKSMITH_BACKOFF_MAX", default_value = "5m",
          value_parser = humantime::parse_duration)]
    pub backoff_max: Duration,
}

#[derive(Debug, Args)]
pub struct RebootArgs {
    /// Command that reboots the machine (run with `sh -c`).
    #[arg(
        long,
        env = "LOCKSMITH_REBOOT_COMMAND",
        default_value = "systemctl reboot"
    )]
    pub reboot_command: String,
}

#[derive(Debug, Args)]
pub struct NeedRebootArgs {
    /// The file whose existence means "this machine needs a reboot".
    #[arg(
        long,
        env = "LOCKSMITH_NEED_REBOOT_FILE",
        default_value = "/run/locksmith/need-reboot"
    )]
    pub need_reboot_file: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn cli_every_flag_has_a_locksmith_env_var() {
        fn check(cmd: &clap::Command, path: &str) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if arg.is_positional() || id == "help" || id == "version" {
                    continue;
                }
                let env = arg.get_env().and_then(|e| e.to_str());
                assert!(
                    env.is_some_and(|e| e.starts_with("LOCKSMITH_")),
                    "{path} --{id} has no LOCKSMITH_ environment variable"
                );
            }
            for sub in cmd.get_subcommands() {
                check(sub, &format!("{path} {}", sub.get_name()));
            }
        }
        check(&Cli::command(), "locksmith");
    }

    #[test]
    fn cli_request_timeout_and_wait_timeout_are_distinct() {
        let cli = Cli::try_parse_from([
            "locksmith",
            "--timeout",
            "2s",
            "lock",
            "--wait",
            "--timeout",
            "1m",
            "a",
        ])
        .unwrap();
        assert_eq!(cli.request_timeout, Duration::from_secs(2));
        match cli.command {
            Command::Lock {
                holder,
                wait,
                limit,
            } => {
                assert_eq!(holder.as_deref(), Some("a"));
                assert!(wait);
                assert_eq!(limit.wait_timeout, Some(Duration::from_secs(60)));
            }
            other => panic!("{other:?}"),
        }
        let run =
            Cli::try_parse_from(["locksmith", "run", "--id", "c1", "--", "sh", "-c", "x"]).unwrap();
        assert_eq!(run.id.as_deref(), Some("c1"));
        assert!(Cli::try_parse_from(["locksmith", "run", "sh"]).is_err());
    }
}
