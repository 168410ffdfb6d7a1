//! A whole member: opens the data dir, bootstraps or checks its identity, starts the
//! peer transport, the Raft driver and the gRPC API, and stops them in order.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tracing::{info, warn};

use crate::api::{self, ApiContext, Limits};
use crate::crdt::CounterGossiper;
use crate::kv::{ApplyBatch, KvError, KvStore};
use crate::lease::Lessor;
use crate::membership::autopilot::{Autopilot, AutopilotConfig};
use crate::membership::bootstrap::{self, Outcome};
use crate::membership::join::{JoinChannel, JOIN_CHANNEL};
use crate::membership::{self, refresh_routes, token_hash, LocalMeta};
use crate::mesh::{KeySource, Mesh, MeshConfig, MeshKey};
use crate::proto::etcdserverpb::{
    auth_server, cluster_server, kv_server, lease_server, maintenance_server, watch_server,
};
use crate::proto::meshpb::{fault_injection_server, mesh_server, node_meta::State, NodeMeta};
use crate::proto::meshpb::{internal_request::Request as Internal, MemberAttributes, MemberRecord};
use crate::proto::v3electionpb::election_server;
use crate::proto::v3lockpb::lock_server;
use crate::raft::mesh_transport::{MemberRoutes, MeshTransport, RAFT_CHANNEL};
use crate::raft::transport::Transport;
use crate::raft::RaftLog;
use crate::raft::{spawn_driver, DriverConfig, DriverError, NodeHandle, NodeStatus};
use crate::storage::{self, Identity, StorageError};

/// Mesh channel of the gossiped PN-counters (`meshctl counter`).
mod identity;
pub(crate) use identity::{voter, write_bootstrap};
mod restore;
mod start;

use identity::*;
pub use restore::{restore, Restored};
use start::*;

pub const COUNTER_CHANNEL: &str = "counters";

/// Everything a member needs to start. Built by meshd from flags and the YAML file.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub name: String,
    pub data_dir: PathBuf,
    pub listen_client: SocketAddr,
    /// Client URL published to the member list; default `http://<listen_client>`.
    pub advertise_client: Option<String>,
    pub listen_mesh: SocketAddr,
    /// Address peers dial to reach this member; default `<listen_mesh>`.
    pub advertise_mesh: Option<String>,
    /// HTTP `/metrics` and `/health`; `None` serves neither.
    pub listen_metrics: Option<SocketAddr>,
    /// `name=host:port` of every initial member; `None` means a single-node cluster of
    /// this member (or, with an existing data dir, whatever it already belongs to).
    pub initial_cluster: Option<Vec<(String, String)>>,
    pub initial_cluster_token: String,
    /// Mesh addresses to dial at start (`--peer`); the mesh finds everyone else.
    pub peers: Vec<String>,
    /// Form a new cluster once this many empty server nodes see each other.
    pub bootstrap_expect: Option<u32>,
    /// Mesh secret: a key from `meshd keygen` or a password (see [`MeshKey::from_secret`]).
    /// Every mesh connection is then authenticated and encrypted with the key.
    pub password: Option<Vec<u8>>,
    /// Allow a mesh listener on a non-loopback address without a mesh secret: anyone who
    /// reaches the port can join the cluster and read every key. Warned at every start.
    pub insecure_mesh: bool,
    /// Growth and healing of the voter set.
    pub autopilot: AutopilotConfig,
    /// Mesh heartbeat and anti-entropy interval (shorter in tests).
    pub mesh_heartbeat: Duration,
    pub mesh_gossip_interval: Duration,
    pub tick: Duration,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    pub snapshot_count: u64,
    pub catch_up_entries: u64,
    pub request_timeout: Duration,
    pub limits: Limits,
    /// Database file size above which this member raises a NOSPACE alarm (etcd's
    /// `--quota-backend-bytes`).
    pub quota_backend_bytes: u64,
    /// Bound of the database's page cache in this process (`--backend-cache-bytes`).
    pub backend_cache_bytes: usize,
    /// TLS on the client API (`--cert-file`, `--key-file`, ...); `None`: plaintext.
    pub client_tls: Option<crate::tls::ServerTls>,
    /// How long a simple auth token lives after its last use (`--auth-token-ttl`).
    pub auth_token_ttl: Duration,
    /// Free space the data dir's filesystem must keep: below it, client writes that add
    /// data are refused with NOSPACE (and accepted again once space returns).
    pub min_free_disk_bytes: u64,
    /// How often the leader compares every member's HashKV (etcd's corruption check);
    /// zero turns the check off.
    pub corrupt_check_interval: Duration,
    /// Auto-compaction (`--auto-compaction-mode`/`-retention`); off when `None`, as
    /// etcd's default.
    pub auto_compaction: Option<crate::compactor::AutoCompaction>,
    /// How often revision-mode auto-compaction looks (etcd's five minutes; shorter in
    /// tests).
    pub auto_compaction_revision_check: Duration,
    /// Serve the test-only `meshpb.FaultInjection` service (loopback callers only).
    /// Never on in production: it lets a local caller cut this member off.
    pub unsafe_fault_injection: bool,
}

/// Default period of the corruption check: each round reads every member's whole
/// history once.
pub const DEFAULT_CORRUPT_CHECK_INTERVAL: Duration = Duration::from_secs(300);

/// etcd's default space quota: 2 GiB.
pub const DEFAULT_QUOTA_BACKEND_BYTES: u64 = 2 * 1024 * 1024 * 1024;

/// Default free-space reserve of the data dir's filesystem: room for the Raft log
/// commits already in flight and for the database file to grow by a region.
pub const DEFAULT_MIN_FREE_DISK_BYTES: u64 = 64 * 1024 * 1024;

/// How often a member compares its database size with the quota.
const QUOTA_CHECK_INTERVAL: Duration = Duration::from_millis(250);

impl ServerConfig {
    /// The defaults of a single node named `name`: client API on 127.0.0.1:2379, peers on
    /// 127.0.0.1:6783, data in `./<name>.meshd`.
    pub fn new(name: &str) -> ServerConfig {
        ServerConfig {
            name: name.to_string(),
            data_dir: PathBuf::from(format!("{name}.meshd")),
            listen_client: "127.0.0.1:2379".parse().expect("valid"),
            advertise_client: None,
            listen_mesh: "127.0.0.1:6783".parse().expect("valid"),
            advertise_mesh: None,
            listen_metrics: None,
            initial_cluster: None,
            initial_cluster_token: "meshd-cluster".into(),
            peers: Vec::new(),
            bootstrap_expect: None,
            password: None,
            insecure_mesh: false,
            autopilot: AutopilotConfig::default(),
            mesh_heartbeat: Duration::from_secs(1),
            mesh_gossip_interval: Duration::from_secs(1),
            tick: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 1,
            snapshot_count: 10_000,
            catch_up_entries: 5_000,
            request_timeout: Duration::from_secs(7),
            limits: Limits::default(),
            quota_backend_bytes: DEFAULT_QUOTA_BACKEND_BYTES,
            backend_cache_bytes: crate::storage::DEFAULT_CACHE_BYTES,
            client_tls: None,
            auth_token_ttl: crate::kv::DEFAULT_TOKEN_TTL,
            min_free_disk_bytes: DEFAULT_MIN_FREE_DISK_BYTES,
            unsafe_fault_injection: false,
            corrupt_check_interval: DEFAULT_CORRUPT_CHECK_INTERVAL,
            auto_compaction: None,
            auto_compaction_revision_check: crate::compactor::REVISION_CHECK,
        }
    }
}

impl ServerConfig {
    /// Refuses an unauthenticated mesh listener that other hosts can reach: on a
    /// network, only holders of the mesh key may join (and so read every key). The
    /// error names the flags that fix it.
    pub fn check_mesh_security(&self) -> Result<(), ServerError> {
        if self.password.is_some() || self.insecure_mesh || self.listen_mesh.ip().is_loopback() {
            return Ok(());
        }
        Err(ServerError::Config(format!(
            "--listen-mesh {} is reachable from other hosts, but the mesh has no key: anyone \
             who reaches it could join the cluster and read every key. Create a key with \
             `meshd keygen > mesh.key` (mode 0600) and start every member with \
             --password-file mesh.key, or pass --insecure-mesh to run without one",
            self.listen_mesh
        )))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("state machine: {0}")]
    Kv(#[from] KvError),
    #[error(transparent)]
    Driver(#[from] DriverError),
    /// The configuration cannot describe a working member.
    #[error("configuration: {0}")]
    Config(String),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Listen {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("client API server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    /// This member was removed from the cluster; it never rejoins under its old ID.
    #[error("this member was removed from the cluster; remove its data dir to join again as a new member")]
    Removed,
    /// A snapshot file to restore from was refused.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
}

/// Parses `--initial-cluster`: `name=host:port` entries (a URL scheme is dropped),
/// comma separated. Shared by meshd and `meshctl snapshot restore`, so both derive the
/// same member IDs from the same text.
pub fn parse_initial_cluster(s: &str) -> Result<Vec<(String, String)>, ServerError> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || {
            ServerError::Config(format!(
                "--initial-cluster entry '{part}' is not name=host:port"
            ))
        };
        let (name, addr) = part.split_once('=').ok_or_else(bad)?;
        let (name, addr) = (name.trim(), addr.trim());
        let hostport = addr.split_once("://").map_or(addr, |(_, r)| r);
        if name.is_empty() || !hostport.contains(':') {
            return Err(bad());
        }
        out.push((name.to_string(), hostport.to_string()));
    }
    if out.is_empty() {
        return Err(ServerError::Config("--initial-cluster is empty".into()));
    }
    Ok(out)
}

/// Member ID of `name` in a cluster created with `token`, as every initial member
/// computes it.
pub fn member_id(token: &str, name: &str, peer_addr: &str) -> u64 {
    storage::identity_stable_id(&[token.as_bytes(), name.as_bytes(), peer_addr.as_bytes()])
}

/// Cluster ID derived from the token and the initial members.
pub fn cluster_id(token: &str, member_ids: &[u64]) -> u64 {
    let mut ids = member_ids.to_vec();
    ids.sort_unstable();
    let bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_be_bytes()).collect();
    storage::identity_stable_id(&[token.as_bytes(), &bytes])
}

/// A running member.
pub struct Server {
    client_addr: SocketAddr,
    mesh_addr: SocketAddr,
    node: NodeHandle,
    grpc_stop: Option<oneshot::Sender<()>>,
    /// Tells waiting requests the member is stopping.
    stopping: tokio::sync::watch::Sender<bool>,
    grpc: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    driver: Option<std::thread::JoinHandle<Result<(), DriverError>>>,
    background: Vec<tokio::task::JoinHandle<()>>,
    /// Turned true to end the background tasks.
    background_stop: tokio::sync::watch::Sender<bool>,
    mesh: Arc<Mesh>,
    kv: Arc<KvStore>,
    metrics_addr: Option<SocketAddr>,
}

impl Server {
    /// Opens the data dir, binds the listeners and starts serving, in named phases:
    /// check the configuration, open storage, bind the listeners, start the mesh,
    /// establish this member's identity (bootstrap, check, or discover and join), start
    /// Raft, serve the client API, spawn the background tasks.
    pub async fn start(cfg: ServerConfig) -> Result<Server, ServerError> {
        let checked = check_config(&cfg)?;
        let store = open_storage(&cfg)?;
        let listeners = bind_listeners(&cfg, checked.scheme).await?;
        let peer_name = storage::load_or_create_peer_name(&cfg.data_dir)?;
        let mesh = start_mesh(&cfg, peer_name, &listeners.advertise_mesh, listeners.mesh)?;
        let (identity, meta, client_listener) = establish_identity(
            &cfg,
            &checked,
            &store,
            &mesh,
            &listeners.advertise_mesh,
            &listeners.advertise_client,
            listeners.client,
            peer_name,
        )
        .await?;
        info!(
            name = %identity.name,
            member = format_args!("{:x}", identity.member_id),
            cluster = format_args!("{:x}", identity.cluster_id),
            peer = format_args!("{peer_name:016x}"),
            applied = store.kv.applied_index(),
            revision = store.kv.current_revision(),
            "member starting"
        );
        let raft = start_raft(&cfg, &identity, &store, &mesh.mesh)?;
        let (stopping, stopping_rx) = tokio::sync::watch::channel(false);
        let ctx = ApiContext {
            stopping: stopping_rx,
            node: raft.node.clone(),
            kv: store.kv.clone(),
            lessor: raft.lessor.clone(),
            limits: cfg.limits.clone(),
            db_path: cfg.data_dir.join(storage::DB_FILE),
            db: store.db.clone(),
            quota_backend_bytes: cfg.quota_backend_bytes,
            watchers: Default::default(),
            dialer: checked.dialer.clone(),
            disk_reserve: Arc::new(storage::DiskReserve::new(
                cfg.data_dir.clone(),
                cfg.min_free_disk_bytes,
            )),
            peer_scheme: if cfg.password.is_some() {
                "https"
            } else {
                "http"
            },
        };
        let api = serve_api(
            &cfg,
            &ctx,
            &identity,
            &mesh,
            client_listener,
            checked.client_tls.map(|(tls, _)| tls),
        );
        info!(
            client_addr = %listeners.client_addr,
            mesh_addr = %listeners.mesh_addr,
            "serving gRPC and HTTP"
        );
        let (background_stop, background_stop_rx) = tokio::sync::watch::channel(false);
        let mut background = Vec::new();
        let metrics_addr = listeners.metrics.as_ref().map(|(_, addr)| *addr);
        if let Some((listener, addr)) = listeners.metrics {
            info!(%addr, "serving /metrics and /health");
            background.push(tokio::spawn(crate::metrics::http::serve(
                listener,
                api.probes,
                stopping.subscribe(),
            )));
        }
        background.extend(spawn_background(
            &cfg,
            &identity,
            &store,
            mesh,
            meta,
            &raft,
            ctx,
            listeners.advertise_client,
            &background_stop_rx,
        ));
        Ok(Server {
            client_addr: listeners.client_addr,
            mesh_addr: listeners.mesh_addr,
            node: raft.node,
            grpc_stop: Some(api.stop),
            stopping,
            grpc: api.task,
            driver: Some(raft.driver),
            background,
            background_stop,
            mesh: raft.mesh,
            kv: store.kv.clone(),
            metrics_addr,
        })
    }

    /// Where the client API listens (useful with port 0).
    pub fn client_addr(&self) -> SocketAddr {
        self.client_addr
    }
    /// Where peers connect (useful with port 0).
    pub fn mesh_addr(&self) -> SocketAddr {
        self.mesh_addr
    }
    /// Where `/metrics` and `/health` are served, if anywhere.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }
    pub fn node(&self) -> &NodeHandle {
        &self.node
    }
    /// This node's mesh (peers, routes, and the fault controls tests use).
    /// The member's state machine (read-only uses: tests, diagnostics).
    pub fn kv(&self) -> &Arc<KvStore> {
        &self.kv
    }

    pub fn mesh(&self) -> &Arc<Mesh> {
        &self.mesh
    }

    /// Resolves when the Raft driver has stopped on its own (a fatal storage error).
    pub async fn driver_stopped(&self) {
        self.node.status.wait_stopped().await;
    }

    /// Graceful stop: hand leadership to a caught-up voter (so the cluster does not
    /// wait an election timeout for a new leader), stop accepting, let in-flight
    /// requests finish, stop the driver after its current Ready (everything
    /// acknowledged is already durable).
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        // Still serving while the leadership moves: requests arriving meanwhile are
        // forwarded to the new leader by Raft and answered here once applied.
        self.hand_off_leadership().await;
        self.stopping.send_replace(true);
        if let Some(stop) = self.grpc_stop.take() {
            let _ = stop.send(());
        }
        let grpc = std::mem::replace(&mut self.grpc, tokio::spawn(async { Ok(()) }));
        match tokio::time::timeout(Duration::from_secs(10), grpc).await {
            Ok(Ok(Err(e))) => warn!("client API server: {e}"),
            Err(_) => warn!("in-flight requests did not finish within 10s"),
            _ => {}
        }
        // The background loops end at their next await; each reports its end.
        self.background_stop.send_replace(true);
        for t in std::mem::take(&mut self.background) {
            let abort = t.abort_handle();
            match tokio::time::timeout(Duration::from_secs(5), t).await {
                Ok(_) => {}
                Err(_) => {
                    warn!("a background task did not stop within 5s");
                    abort.abort();
                }
            }
        }
        self.node.shutdown();
        let driver = self.driver.take();
        let joined = match driver {
            Some(d) => match tokio::task::spawn_blocking(move || d.join()).await {
                Ok(Ok(r)) => r,
                _ => {
                    warn!("raft driver thread panicked");
                    Ok(())
                }
            },
            None => Ok(()),
        };
        self.mesh.shutdown().await;
        joined?;
        info!("stopped");
        Ok(())
    }
}

impl Server {
    /// If this member leads, transfers leadership to the most caught-up voter the
    /// leader heard from recently, and waits (bounded by two election timeouts, as the
    /// driver gives up a transfer then) until that voter leads.
    async fn hand_off_leadership(&self) {
        let status = &self.node.status;
        let me = status.member_id;
        if status.leader() != me {
            return;
        }
        let Ok(progress) = self.node.progress().await else {
            return;
        };
        let mut others = progress
            .iter()
            .filter(|p| p.id != me && !p.learner)
            .peekable();
        if others.peek().is_none() {
            return; // a single-voter cluster: nobody to hand over to
        }
        let best = others.filter(|p| p.recent_active).max_by_key(|p| p.matched);
        let Some(best) = best else {
            warn!(
                term = status.term(),
                "stopping leader has no active voter to hand leadership to"
            );
            return;
        };
        info!(
            target = format_args!("{:x}", best.id),
            term = status.term(),
            behind = best.leader_last_index.saturating_sub(best.matched),
            "stopping leader hands leadership over"
        );
        match self.node.move_leader(best.id).await {
            Ok(()) => info!(
                leader = format_args!("{:x}", best.id),
                term = status.term(),
                "leadership handed over"
            ),
            Err(e) => warn!("leadership hand-over failed, stopping anyway: {e}"),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stopping.send_replace(true);
        self.grpc.abort();
        // Dropped without shutdown (a test, a failed start): nothing waits here.
        self.background_stop.send_replace(true);
        for t in &self.background {
            t.abort();
        }
        self.node.shutdown();
    }
}

/// Moments of a member's life a supervisor (systemd) is told about.
pub enum Lifecycle<'a> {
    /// The member is serving clients.
    Serving(&'a Server),
    /// The member begins its graceful stop.
    Stopping,
}

/// Runs a member until `shutdown` resolves, then stops it gracefully.
pub async fn run(
    cfg: ServerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServerError> {
    run_observed(cfg, shutdown, |_| {}).await
}

/// [`run`], telling `observe` when the member starts serving and when it stops.
pub async fn run_observed(
    cfg: ServerConfig,
    shutdown: impl std::future::Future<Output = ()>,
    mut observe: impl FnMut(Lifecycle<'_>),
) -> Result<(), ServerError> {
    tokio::pin!(shutdown);
    // Start may wait for peers (bootstrap-expect, joining): a stop request ends the wait.
    let server = tokio::select! {
        s = Server::start(cfg) => s?,
        _ = &mut shutdown => return Ok(()),
    };
    observe(Lifecycle::Serving(&server));
    tokio::select! {
        _ = shutdown => {
            observe(Lifecycle::Stopping);
            server.shutdown().await
        }
        _ = server.driver_stopped() => {
            observe(Lifecycle::Stopping);
            let removed = server.node.status.is_removed();
            let _ = server.shutdown().await;
            if removed {
                return Err(ServerError::Removed);
            }
            Err(ServerError::Config("the raft driver stopped; see the log above".into()))
        }
    }
}
