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
    mesh: Arc<Mesh>,
    metrics_addr: Option<SocketAddr>,
}

impl Server {
    /// Opens the data dir, binds the listeners and starts serving.
    pub async fn start(cfg: ServerConfig) -> Result<Server, ServerError> {
        cfg.check_mesh_security()?;
        // Bad TLS files fail the start, before anything is opened.
        let tls_err = |e: crate::tls::TlsError| ServerError::Config(e.to_string());
        let client_tls = cfg
            .client_tls
            .as_ref()
            .map(|t| t.client_port_config().map(|c| (c, t)))
            .transpose()
            .map_err(tls_err)?;
        let dialer = crate::tls::MemberDialer::new(cfg.client_tls.as_ref()).map_err(tls_err)?;
        let scheme = if client_tls.is_some() {
            "https"
        } else {
            "http"
        };
        let db = storage::open_database(&cfg.data_dir)?;
        let kv = Arc::new(KvStore::open_for_raft(db.clone())?);
        kv.set_token_ttl(cfg.auth_token_ttl);
        let log = RaftLog::load(&db, kv.clone())?;

        let (mesh_listener, mesh_addr) = bind("mesh", cfg.listen_mesh).await?;
        let (mut client_listener, client_addr) = bind("client", cfg.listen_client).await?;
        let metrics_listener = match cfg.listen_metrics {
            Some(addr) => Some(bind("metrics", addr).await?),
            None => None,
        };
        let advertise_mesh = cfg
            .advertise_mesh
            .clone()
            .unwrap_or_else(|| advertised(mesh_addr));
        let advertise_client = cfg
            .advertise_client
            .clone()
            .unwrap_or_else(|| format!("{scheme}://{}", advertised(client_addr)));

        let peer_name = storage::load_or_create_peer_name(&cfg.data_dir)?;
        let mut mesh_cfg = MeshConfig::new(peer_name, &cfg.name, &advertise_mesh);
        mesh_cfg.seeds = cfg.peers.clone();
        if let Some(initial) = &cfg.initial_cluster {
            mesh_cfg.seeds.extend(
                initial
                    .iter()
                    .filter(|(n, _)| *n != cfg.name)
                    .map(|(_, a)| a.clone()),
            );
        }
        mesh_cfg.key = cfg.password.as_ref().map(|secret| {
            let (key, source) = MeshKey::from_secret(secret, &cfg.initial_cluster_token);
            match source {
                KeySource::Generated => tracing::info!("mesh: encrypted with a generated key"),
                KeySource::Password => tracing::info!(
                    "mesh: encrypted with a key stretched from a password (Argon2id); \
                     `meshd keygen` makes a random key"
                ),
            }
            key
        });
        if mesh_cfg.key.is_none() && cfg.insecure_mesh {
            tracing::warn!(
                listen = %mesh_addr,
                "mesh: --insecure-mesh: the mesh is neither authenticated nor encrypted; \
                 anyone who reaches {mesh_addr} can join the cluster and read every key"
            );
        }
        mesh_cfg.heartbeat = cfg.mesh_heartbeat;
        mesh_cfg.dead_after = cfg.mesh_heartbeat * 4;
        mesh_cfg.gossip_interval = cfg.mesh_gossip_interval;
        let mesh = Mesh::start(mesh_cfg, mesh_listener);
        let join = Arc::new(JoinChannel::register(&mesh));
        let counters = CounterGossiper::register(&mesh, COUNTER_CHANNEL);

        let stored = Identity::load(&db)?;
        let meta = LocalMeta::new(
            mesh.clone(),
            NodeMeta {
                name: cfg.name.clone(),
                member_id: stored.as_ref().map_or(peer_name, |i| i.member_id),
                cluster_id: stored.as_ref().map_or(0, |i| i.cluster_id),
                client_url: advertise_client.clone(),
                server: true,
                state: State::Empty as i32,
                bootstrap_expect: cfg.bootstrap_expect.unwrap_or(0),
                bootstrap_proposal: vec![],
                mesh_addr: advertise_mesh.clone(),
                leader: false,
                token_hash: token_hash(&cfg.initial_cluster_token),
            },
        );
        let discover = stored.is_none()
            && cfg.initial_cluster.is_none()
            && (cfg.bootstrap_expect.is_some() || !cfg.peers.is_empty());
        let identity = if discover {
            // Until it is a member, the node forwards client requests to one.
            let std_listener = client_listener
                .into_std()
                .map_err(listen_err(client_addr))?;
            let proxy_listener = std_listener
                .try_clone()
                .and_then(TcpListener::from_std)
                .map_err(listen_err(client_addr))?;
            let (stop_proxy, proxy_stopped) = tokio::sync::watch::channel(false);
            let pick_mesh = mesh.clone();
            let token = token_hash(&cfg.initial_cluster_token);
            let proxy_tls = client_tls
                .as_ref()
                .map(|(_, t)| t.rustls_server_config())
                .transpose()
                .map_err(tls_err)?;
            tokio::spawn(api::proxy::serve(
                proxy_listener,
                Arc::new(move || membership::member_client_url(&pick_mesh, token)),
                proxy_tls,
                dialer.clone(),
                proxy_stopped,
            ));
            let identity = self::discover(&cfg, &mesh, &meta, &join, &kv, &log, peer_name).await;
            let _ = stop_proxy.send(true);
            client_listener =
                TcpListener::from_std(std_listener).map_err(listen_err(client_addr))?;
            identity?
        } else {
            bootstrap_or_check(&cfg, stored, &kv, &log, &advertise_mesh)?
        };
        meta.update(|m| {
            m.member_id = identity.member_id;
            m.cluster_id = identity.cluster_id;
            m.state = State::Member as i32;
        });
        info!(
            name = %identity.name,
            member = format_args!("{:x}", identity.member_id),
            cluster = format_args!("{:x}", identity.cluster_id),
            peer = format_args!("{peer_name:016x}"),
            applied = kv.applied_index(),
            revision = kv.current_revision(),
            "member starting"
        );

        let lessor = Lessor::new(
            Lessor::min_ttl_for(cfg.tick, cfg.election_ticks),
            cfg.tick * cfg.election_ticks as u32,
        );
        crate::lease::load(&lessor, &kv)?;

        let (tx, rx) = std_mpsc::channel();
        let status = Arc::new(NodeStatus::new(identity.member_id, identity.cluster_id));
        if let Some(why) = kv.corrupt_at_open() {
            // Serves no data from the first request on; the driver raises the alarm.
            status.mark_corrupt(&why);
        }
        let routes = Arc::new(MemberRoutes::default());
        refresh_routes(&mesh, identity.cluster_id, &routes);
        let transport = MeshTransport::start(
            mesh.clone(),
            status.clone(),
            routes.clone(),
            tx.clone(),
            storage::snapshot_dir(&cfg.data_dir),
        );
        let driver = spawn_driver(
            DriverConfig {
                member_id: identity.member_id,
                member_name: cfg.name.clone(),
                tick: cfg.tick,
                election_ticks: cfg.election_ticks,
                heartbeat_ticks: cfg.heartbeat_ticks,
                snapshot_count: cfg.snapshot_count,
                catch_up_entries: cfg.catch_up_entries,
                max_size_per_msg: 1024 * 1024,
                max_inflight_msgs: 256,
                snapshot_dir: storage::snapshot_dir(&cfg.data_dir),
                corrupt_at_start: kv.corrupt_at_open(),
            },
            log.clone(),
            kv.clone(),
            db.clone(),
            transport.clone() as Arc<dyn Transport>,
            rx,
            status.clone(),
            lessor.clone(),
        )?;
        let node = NodeHandle::new(tx, status, log, cfg.request_timeout);

        let (stopping, stopping_rx) = tokio::sync::watch::channel(false);
        let ctx = ApiContext {
            stopping: stopping_rx,
            node: node.clone(),
            kv: kv.clone(),
            lessor: lessor.clone(),
            limits: cfg.limits.clone(),
            db_path: cfg.data_dir.join(storage::DB_FILE),
            db: db.clone(),
            quota_backend_bytes: cfg.quota_backend_bytes,
            watchers: Default::default(),
            dialer,
            disk_low: Default::default(),
            min_free_disk_bytes: cfg.min_free_disk_bytes,
            peer_scheme: if cfg.password.is_some() {
                "https"
            } else {
                "http"
            },
        };
        let max_msg = cfg.limits.max_request_bytes + api::GRPC_OVERHEAD_BYTES;
        let (grpc_stop, stop_rx) = oneshot::channel::<()>();
        let grpc_metrics = crate::metrics::grpc::GrpcMetrics::default();
        let mut grpc_routes = tonic::service::RoutesBuilder::default();
        grpc_routes
            .add_service(
                kv_server::KvServer::new(api::KvApi::new(ctx.clone()))
                    .max_decoding_message_size(max_msg)
                    .max_encoding_message_size(api::MAX_RESPONSE_BYTES),
            )
            .add_service(
                watch_server::WatchServer::new(api::WatchApi::new(ctx.clone()))
                    .max_decoding_message_size(max_msg)
                    .max_encoding_message_size(api::MAX_RESPONSE_BYTES),
            )
            .add_service(cluster_server::ClusterServer::new(api::ClusterApi::new(
                ctx.clone(),
            )))
            .add_service(maintenance_server::MaintenanceServer::new(
                api::MaintenanceApi::new(ctx.clone()),
            ))
            .add_service(mesh_server::MeshServer::new(api::MeshApi {
                mesh: mesh.clone(),
                counters,
                kv: kv.clone(),
                channels: vec![
                    RAFT_CHANNEL.to_string(),
                    crate::raft::snapshot_stream::SNAPSHOT_CHANNEL.to_string(),
                    JOIN_CHANNEL.to_string(),
                    COUNTER_CHANNEL.to_string(),
                    crate::corruption::HASHKV_CHANNEL.to_string(),
                ],
                cluster_id: identity.cluster_id,
            }))
            .add_service(lease_server::LeaseServer::new(api::LeaseApi::new(
                ctx.clone(),
            )))
            .add_service(lock_server::LockServer::new(api::LockApi::new(ctx.clone())))
            .add_service(election_server::ElectionServer::new(api::ElectionApi::new(
                ctx.clone(),
            )))
            .add_service(auth_server::AuthServer::new(api::AuthApi::new(ctx.clone())));
        if cfg.unsafe_fault_injection {
            warn!("serving the test-only fault injection service (--unsafe-fault-injection)");
            grpc_routes.add_service(fault_injection_server::FaultInjectionServer::new(
                api::FaultInjectionApi {
                    mesh: mesh.clone(),
                    node: node.clone(),
                    kv: kv.clone(),
                },
            ));
        }
        // Every gRPC call, from a gRPC client or through the JSON gateway, passes the
        // same layers: metrics, auth token catch-up, the corruption gate.
        let layered = {
            use tower_layer::Layer;
            let svc = grpc_routes.routes().prepare();
            let svc = api::CorruptGate { node: node.clone() }.layer(svc);
            let svc = api::TokenCatchUp {
                kv: kv.clone(),
                node: node.clone(),
            }
            .layer(svc);
            grpc_metrics.clone().layer(svc)
        };
        let probes = crate::metrics::http::Sources {
            node: node.clone(),
            kv: kv.clone(),
            db: db.clone(),
            mesh: mesh.clone(),
            grpc: grpc_metrics.clone(),
            watchers: ctx.watchers.clone(),
        };
        let port = api::http::ClientPort::new(
            api::gateway::Grpc::new(layered),
            cfg.limits.max_request_bytes,
            probes.clone(),
        );
        // Dead or silent clients are found by HTTP/2 pings and TCP keepalive.
        let router = tonic::transport::Server::builder()
            .accept_http1(true)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_routes(api::http::routes(port));
        // Small request/response pairs must not wait for Nagle and delayed ACKs.
        let tcp = tonic::transport::server::TcpIncoming::from(client_listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(Duration::from_secs(60)));
        let shutdown = async {
            let _ = stop_rx.await;
        };
        let grpc = match client_tls {
            Some((tls, _)) => tokio::spawn(
                router.serve_with_incoming_shutdown(api::http::tls_incoming(tcp, tls), shutdown),
            ),
            None => tokio::spawn(router.serve_with_incoming_shutdown(tcp, shutdown)),
        };
        info!(%client_addr, %mesh_addr, "serving gRPC and HTTP");
        let mut metrics_addr = None;
        let mut background = Vec::new();
        if let Some((listener, addr)) = metrics_listener {
            metrics_addr = Some(addr);
            info!(%addr, "serving /metrics and /health");
            background.push(tokio::spawn(crate::metrics::http::serve(
                listener,
                probes,
                stopping.subscribe(),
            )));
        }

        let publish = tokio::spawn(publish_attributes(
            node.clone(),
            kv.clone(),
            identity.member_id,
            cfg.name.clone(),
            advertise_client,
        ));
        let corruption_check = crate::corruption::spawn(
            &mesh,
            kv.clone(),
            node.clone(),
            routes.clone(),
            cfg.corrupt_check_interval,
        );
        let watch_mesh = tokio::spawn(follow_mesh(
            mesh.clone(),
            meta,
            routes,
            node.clone(),
            join.clone(),
        ));
        let autopilot = tokio::spawn(
            Autopilot {
                cfg: cfg.autopilot.clone(),
                mesh: mesh.clone(),
                node: node.clone(),
                kv: kv.clone(),
                join,
                token: cfg.initial_cluster_token.clone(),
            }
            .run(),
        );
        let expiry = tokio::spawn(crate::raft::lease_expiry::run(
            lessor,
            node.clone(),
            cfg.tick.max(Duration::from_millis(20)),
        ));
        if let Some(mode) = cfg.auto_compaction {
            background.push(crate::compactor::spawn(
                mode,
                cfg.auto_compaction_revision_check,
                kv.clone(),
                node.clone(),
            ));
        }
        Ok(Server {
            client_addr,
            mesh_addr,
            node,
            grpc_stop: Some(grpc_stop),
            stopping,
            grpc,
            driver: Some(driver),
            background: background
                .into_iter()
                .chain([
                    publish,
                    watch_mesh,
                    autopilot,
                    tokio::spawn(watch_quota(ctx)),
                    expiry,
                    corruption_check,
                ])
                .collect(),
            mesh,
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
    pub fn mesh(&self) -> &Arc<Mesh> {
        &self.mesh
    }

    /// Resolves when the Raft driver has stopped on its own (a fatal storage error).
    pub async fn driver_stopped(&self) {
        while self.node.status.is_running() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
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
        for t in &self.background {
            t.abort();
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

/// Binds a listener and reports the address it got (port 0 picks one).
async fn bind(
    what: &'static str,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr), ServerError> {
    let err = |source| ServerError::Listen { what, addr, source };
    let listener = TcpListener::bind(addr).await.map_err(err)?;
    let local = listener.local_addr().map_err(err)?;
    Ok((listener, local))
}

fn listen_err(addr: SocketAddr) -> impl Fn(std::io::Error) -> ServerError {
    move |source| ServerError::Listen {
        what: "client",
        addr,
        source,
    }
}

/// An address others can dial: a wildcard listen address is advertised as loopback.
fn advertised(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        format!("127.0.0.1:{}", addr.port())
    } else {
        addr.to_string()
    }
}

/// The identity of this member and the initial member list, as every initial member
/// computes them from `--initial-cluster` and `--initial-cluster-token` (or, without
/// `--initial-cluster`, a single-member cluster of this member at `advertise_mesh`).
fn initial_identity(
    cfg: &ServerConfig,
    advertise_mesh: &str,
) -> Result<(Identity, Vec<MemberRecord>), ServerError> {
    let token = &cfg.initial_cluster_token;
    let initial: Vec<(String, String)> = match &cfg.initial_cluster {
        Some(list) => list.clone(),
        None => vec![(cfg.name.clone(), advertise_mesh.to_string())],
    };
    let mut seen = std::collections::HashSet::new();
    for (name, _) in &initial {
        if !seen.insert(name) {
            return Err(ServerError::Config(format!(
                "--initial-cluster names '{name}' twice"
            )));
        }
    }
    let Some((_, my_addr)) = initial.iter().find(|(n, _)| *n == cfg.name) else {
        return Err(ServerError::Config(format!(
            "--initial-cluster does not include this member's name '{}'",
            cfg.name
        )));
    };
    let members: Vec<MemberRecord> = initial
        .iter()
        .map(|(name, addr)| voter(member_id(token, name, addr), name, addr))
        .collect();
    let identity = new_identity(cfg, member_id(token, &cfg.name, my_addr), &members);
    Ok((identity, members))
}

fn voter(id: u64, name: &str, mesh_addr: &str) -> MemberRecord {
    MemberRecord {
        id,
        name: name.to_string(),
        peer_urls: vec![mesh_addr.to_string()],
        client_urls: vec![],
        is_learner: false,
    }
}

/// The identity of member `me` of a new cluster whose initial voters are `members`.
fn new_identity(cfg: &ServerConfig, me: u64, members: &[MemberRecord]) -> Identity {
    let token = &cfg.initial_cluster_token;
    let ids: Vec<u64> = members.iter().map(|m| m.id).collect();
    Identity {
        name: cfg.name.clone(),
        member_id: me,
        cluster_id: cluster_id(token, &ids),
        cluster_token: token.clone(),
    }
}

/// Creates the member on a fresh data dir from `--initial-cluster` (or as a single
/// node), or checks that the identity `stored` in an existing one belongs to this
/// member and cluster.
fn bootstrap_or_check(
    cfg: &ServerConfig,
    stored: Option<Identity>,
    kv: &KvStore,
    log: &RaftLog,
    advertise_mesh: &str,
) -> Result<Identity, ServerError> {
    let (expected, members) = initial_identity(cfg, advertise_mesh)?;
    if let Some(stored) = stored {
        if cfg.initial_cluster.is_some() {
            stored.check(&cfg.data_dir, &expected)?;
        } else if stored.name != cfg.name {
            return Err(StorageError::WrongOwner {
                path: cfg.data_dir.clone(),
                found: format!("member '{}'", stored.name),
                expected: format!("member '{}'", cfg.name),
            }
            .into());
        }
        return Ok(stored);
    }
    create_member(cfg, kv, log, &expected, &members)?;
    Ok(expected)
}

/// An empty node without `--initial-cluster`: forms a new cluster with its peers
/// (`--bootstrap-expect`) or waits until the leader adds it.
async fn discover(
    cfg: &ServerConfig,
    mesh: &Mesh,
    meta: &LocalMeta,
    join: &JoinChannel,
    kv: &KvStore,
    log: &RaftLog,
    peer_name: u64,
) -> Result<Identity, ServerError> {
    let outcome = match cfg.bootstrap_expect {
        Some(n) => bootstrap::await_agreement(mesh, meta, n).await,
        None => Outcome::Join,
    };
    match outcome {
        Outcome::Form(found) => {
            let members: Vec<MemberRecord> = found
                .iter()
                .map(|(id, name, addr)| voter(*id, name, addr))
                .collect();
            let identity = new_identity(cfg, peer_name, &members);
            create_member(cfg, kv, log, &identity, &members)?;
            Ok(identity)
        }
        Outcome::Join => {
            info!("waiting for the cluster leader to add this node");
            let w = join.await_welcome(&cfg.initial_cluster_token).await;
            join_member(cfg, kv, log, w.member_id, w.cluster_id)
        }
    }
}

/// Refuses to initialise a data dir that holds data without an identity.
fn check_empty(cfg: &ServerConfig, kv: &KvStore, log: &RaftLog) -> Result<(), ServerError> {
    if kv.applied_index() != 0 || log.last_index() != 0 {
        return Err(StorageError::Corrupt {
            path: cfg.data_dir.clone(),
            detail: "it holds data but no member identity".into(),
        }
        .into());
    }
    Ok(())
}

/// Records a new member in `batch`: its identity, the initial voters and member table.
///
/// The initial configuration is a snapshot at index 1, term 1 (as raft-rs's examples
/// bootstrap): a member added later has an empty log, needs index 1, and so receives a
/// snapshot that carries the whole configuration and state.
fn write_bootstrap(
    batch: &mut ApplyBatch<'_>,
    log: &RaftLog,
    identity: &Identity,
    members: &[MemberRecord],
) -> Result<(), ServerError> {
    identity.store(batch.write_txn()?)?;
    let meta = raft::prelude::SnapshotMetadata {
        index: 1,
        term: 1,
        conf_state: Some(raft::prelude::ConfState {
            voters: members.iter().map(|m| m.id).collect(),
            ..Default::default()
        }),
    };
    log.apply_snapshot(batch.write_txn()?, &meta)?;
    batch.set_applied_index(1);
    for m in members {
        batch.put_member(m)?;
    }
    Ok(())
}

/// Initialises a fresh data dir as a member of a new cluster.
fn create_member(
    cfg: &ServerConfig,
    kv: &KvStore,
    log: &RaftLog,
    identity: &Identity,
    members: &[MemberRecord],
) -> Result<(), ServerError> {
    check_empty(cfg, kv, log)?;
    let mut batch = kv.begin()?;
    write_bootstrap(&mut batch, log, identity, members)?;
    batch.commit(true)?;
    log.sync()?;
    info!(members = members.len(), "bootstrapped a new cluster member");
    Ok(())
}

/// Initialises a fresh data dir as a member the leader just added: no configuration
/// yet, it arrives with the leader's snapshot.
fn join_member(
    cfg: &ServerConfig,
    kv: &KvStore,
    log: &RaftLog,
    member_id: u64,
    cluster_id: u64,
) -> Result<Identity, ServerError> {
    check_empty(cfg, kv, log)?;
    let identity = Identity {
        name: cfg.name.clone(),
        member_id,
        cluster_id,
        cluster_token: cfg.initial_cluster_token.clone(),
    };
    let mut batch = kv.begin()?;
    identity.store(batch.write_txn()?)?;
    batch.commit(true)?;
    Ok(identity)
}

/// What [`restore`] created.
#[derive(Debug, Clone)]
pub struct Restored {
    pub member_id: u64,
    pub cluster_id: u64,
    /// The store revision the snapshot was taken at.
    pub revision: i64,
}

/// Creates the data dir of a member of a NEW cluster from a snapshot file (etcd's
/// `snapshot restore`): the keyspace and its history come from the snapshot; member
/// and cluster IDs, the member table and the voters are those `Server::start` computes
/// for the same name, `--initial-cluster`, token and mesh address, so every member of
/// the new cluster restored from the same file starts as one cluster. The source's
/// alarms are dropped (they name the old cluster's members). Refuses a non-empty data
/// dir and a snapshot whose checksum does not match (or is missing, unless
/// `skip_hash_check`, etcd's `--skip-hash-check`).
pub fn restore(
    cfg: &ServerConfig,
    snapshot_file: &[u8],
    skip_hash_check: bool,
) -> Result<Restored, ServerError> {
    let mut snap = crate::snapshot::decode_with(snapshot_file, skip_hash_check)?;
    let dir = &cfg.data_dir;
    let not_empty = std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some());
    if not_empty {
        return Err(ServerError::Config(format!(
            "data dir {} exists and is not empty",
            dir.display()
        )));
    }
    let advertise_mesh = cfg
        .advertise_mesh
        .clone()
        .unwrap_or_else(|| advertised(cfg.listen_mesh));
    let (identity, members) = initial_identity(cfg, &advertise_mesh)?;
    let db = storage::open_database(dir)?;
    let kv = Arc::new(KvStore::open(db.clone())?);
    let log = RaftLog::load(&db, kv.clone())?;
    snap.members = members.clone();
    snap.alarms.clear();
    let mut batch = kv.begin()?;
    batch.restore(&snap)?;
    write_bootstrap(&mut batch, &log, &identity, &members)?;
    batch.commit(true)?;
    log.sync()?;
    info!(
        dir = %dir.display(),
        revision = snap.revision,
        member = format_args!("{:x}", identity.member_id),
        "restored a snapshot into a new member data dir"
    );
    Ok(Restored {
        member_id: identity.member_id,
        cluster_id: identity.cluster_id,
        revision: snap.revision,
    })
}

/// Raises a NOSPACE alarm for this member through Raft whenever its database file
/// exceeds the quota and none is active for it (as an etcd member does when a write
/// finds its backend over quota). Disarming while still over quota raises it again.
async fn watch_quota(ctx: ApiContext) {
    use crate::proto::etcdserverpb::{alarm_request::AlarmAction, AlarmRequest, AlarmType};
    let me = ctx.node.status.member_id;
    let mut every = tokio::time::interval(QUOTA_CHECK_INTERVAL);
    loop {
        every.tick().await;
        let raised = ctx.kv.alarms().is_ok_and(|alarms| {
            alarms
                .iter()
                .any(|a| a.member_id == me && a.alarm == AlarmType::Nospace as i32)
        });
        // The size is read after the alarms, so a defragment + disarm in between
        // cannot be mistaken for a database still over quota.
        let size = ctx.db.file_size();
        if raised || size <= ctx.quota_backend_bytes {
            continue;
        }
        warn!(
            size,
            quota = ctx.quota_backend_bytes,
            "database exceeds the space quota: raising a NOSPACE alarm"
        );
        let req = Internal::Alarm(AlarmRequest {
            action: AlarmAction::Activate as i32,
            member_id: me,
            alarm: AlarmType::Nospace as i32,
        });
        if let Err(e) = ctx.node.propose(req).await {
            warn!("cannot raise the NOSPACE alarm yet: {e}");
        }
    }
}

/// Keeps routes and this node's published metadata in step with the mesh and the
/// Raft state, and stops the driver when the leader says this member was removed.
async fn follow_mesh(
    mesh: Arc<Mesh>,
    meta: Arc<LocalMeta>,
    routes: Arc<MemberRoutes>,
    node: NodeHandle,
    join: Arc<JoinChannel>,
) {
    let status = node.status.clone();
    let mut changes = mesh.changes();
    let mut removal = Box::pin(join.await_removal_notice(status.cluster_id));
    loop {
        refresh_routes(&mesh, status.cluster_id, &routes);
        let removed = status.is_removed();
        meta.update(|m| {
            m.leader = status.leader() == status.member_id;
            if removed {
                m.state = State::Removed as i32;
            }
        });
        tokio::select! {
            _ = changes.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            src = &mut removal => {
                join.clear();
                removal = Box::pin(join.await_removal_notice(status.cluster_id));
                let conf = node.log.conf_state();
                if crate::membership::is_published_leader(&mesh, status.cluster_id, &conf, src) {
                    warn!("the leader reports that this member was removed from the cluster");
                    status.mark_removed();
                    node.shutdown();
                } else {
                    status.metrics.count_refusal(crate::raft::validate::Refusal::NonMember);
                    warn!(
                        peer = %crate::mesh::peer_name_string(src),
                        "removal notice refused: the sender is not this cluster's leader"
                    );
                }
            }
        }
    }
}

/// Publishes this member's name and client URL through Raft once a leader exists, as
/// etcd members do at start, so the member list shows where to reach everyone.
async fn publish_attributes(
    node: NodeHandle,
    kv: Arc<KvStore>,
    id: u64,
    name: String,
    client_url: String,
) {
    loop {
        let current = kv
            .members()
            .ok()
            .and_then(|ms| ms.into_iter().find(|m| m.id == id));
        match current {
            Some(m) if m.name == name && m.client_urls == [client_url.clone()] => return,
            None if kv.applied_index() > 0 => return, // not a member (any more)
            _ => {}
        }
        let req = Internal::MemberAttributes(MemberAttributes {
            id,
            name: name.clone(),
            client_urls: vec![client_url.clone()],
        });
        if node.propose(req).await.is_ok() {
            continue;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
