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
use crate::kv::{KvError, KvStore};
use crate::lease::Lessor;
use crate::proto::etcdserverpb::{
    cluster_server, kv_server, lease_server, maintenance_server, watch_server,
};
use crate::proto::meshpb::{internal_request::Request as Internal, MemberAttributes, MemberRecord};
use crate::proto::v3electionpb::election_server;
use crate::proto::v3lockpb::lock_server;
use crate::raft::transport::{PeerIdentity, TcpTransport, Transport, DEFAULT_MAX_FRAME};
use crate::raft::{spawn_driver, DriverConfig, DriverError, NodeHandle, NodeStatus};
use crate::storage::{self, Identity, RaftLog, StorageError};

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
    /// `name=host:port` of every initial member; `None` means a single-node cluster of
    /// this member (or, with an existing data dir, whatever it already belongs to).
    pub initial_cluster: Option<Vec<(String, String)>>,
    pub initial_cluster_token: String,
    pub tick: Duration,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    pub snapshot_count: u64,
    pub catch_up_entries: u64,
    pub request_timeout: Duration,
    pub limits: Limits,
}

impl ServerConfig {
    /// The defaults of a single node named `name`: client API on 127.0.0.1:2379, peers on
    /// 0.0.0.0:6783, data in `./<name>.meshd`.
    pub fn new(name: &str) -> ServerConfig {
        ServerConfig {
            name: name.to_string(),
            data_dir: PathBuf::from(format!("{name}.meshd")),
            listen_client: "127.0.0.1:2379".parse().expect("valid"),
            advertise_client: None,
            listen_mesh: "0.0.0.0:6783".parse().expect("valid"),
            advertise_mesh: None,
            initial_cluster: None,
            initial_cluster_token: "meshd-cluster".into(),
            tick: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 1,
            snapshot_count: 10_000,
            catch_up_entries: 5_000,
            request_timeout: Duration::from_secs(7),
            limits: Limits::default(),
        }
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
    _transport: Arc<TcpTransport>,
}

impl Server {
    /// Opens the data dir, binds the listeners and starts serving.
    pub async fn start(cfg: ServerConfig) -> Result<Server, ServerError> {
        let db = storage::open_database(&cfg.data_dir)?;
        let kv = Arc::new(KvStore::open(db.clone())?);
        let log = RaftLog::load(&db, kv.clone())?;

        let (mesh_listener, mesh_addr) = bind("mesh", cfg.listen_mesh).await?;
        let (client_listener, client_addr) = bind("client", cfg.listen_client).await?;
        let advertise_mesh = cfg
            .advertise_mesh
            .clone()
            .unwrap_or_else(|| advertised(mesh_addr));
        let advertise_client = cfg
            .advertise_client
            .clone()
            .unwrap_or_else(|| format!("http://{}", advertised(client_addr)));

        let identity = bootstrap_or_check(&cfg, &db, &kv, &log, &advertise_mesh)?;
        info!(
            name = %identity.name,
            member = format_args!("{:x}", identity.member_id),
            cluster = format_args!("{:x}", identity.cluster_id),
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
        let transport = TcpTransport::start(
            PeerIdentity {
                member_id: identity.member_id,
                cluster_id: identity.cluster_id,
            },
            mesh_listener,
            tx.clone(),
            DEFAULT_MAX_FRAME,
        );
        let driver = spawn_driver(
            DriverConfig {
                member_id: identity.member_id,
                tick: cfg.tick,
                election_ticks: cfg.election_ticks,
                heartbeat_ticks: cfg.heartbeat_ticks,
                snapshot_count: cfg.snapshot_count,
                catch_up_entries: cfg.catch_up_entries,
                max_size_per_msg: 1024 * 1024,
                max_inflight_msgs: 256,
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
        };
        let max_msg = cfg.limits.max_request_bytes + api::GRPC_OVERHEAD_BYTES;
        let (grpc_stop, stop_rx) = oneshot::channel::<()>();
        let router = tonic::transport::Server::builder()
            .add_service(
                kv_server::KvServer::new(api::KvApi::new(ctx.clone()))
                    .max_decoding_message_size(max_msg)
                    .max_encoding_message_size(usize::MAX),
            )
            .add_service(
                watch_server::WatchServer::new(api::WatchApi::new(ctx.clone()))
                    .max_decoding_message_size(max_msg)
                    .max_encoding_message_size(usize::MAX),
            )
            .add_service(cluster_server::ClusterServer::new(api::ClusterApi::new(
                ctx.clone(),
            )))
            .add_service(maintenance_server::MaintenanceServer::new(
                api::MaintenanceApi::new(ctx.clone()),
            ))
            .add_service(lease_server::LeaseServer::new(api::LeaseApi::new(
                ctx.clone(),
            )))
            .add_service(lock_server::LockServer::new(api::LockApi::new(ctx.clone())))
            .add_service(election_server::ElectionServer::new(api::ElectionApi::new(
                ctx.clone(),
            )));
        // Small request/response pairs must not wait for Nagle and delayed ACKs.
        let incoming =
            tonic::transport::server::TcpIncoming::from(client_listener).with_nodelay(Some(true));
        let grpc = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
            let _ = stop_rx.await;
        }));
        info!(%client_addr, %mesh_addr, "serving");

        let publish = tokio::spawn(publish_attributes(
            node.clone(),
            kv.clone(),
            identity.member_id,
            cfg.name.clone(),
            advertise_client,
        ));
        let expiry = tokio::spawn(crate::lease::run_expiry(
            lessor,
            node.clone(),
            cfg.tick.max(Duration::from_millis(20)),
        ));
        Ok(Server {
            client_addr,
            mesh_addr,
            node,
            grpc_stop: Some(grpc_stop),
            stopping,
            grpc,
            driver: Some(driver),
            background: vec![publish, expiry],
            _transport: transport,
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
    pub fn node(&self) -> &NodeHandle {
        &self.node
    }

    /// Resolves when the Raft driver has stopped on its own (a fatal storage error).
    pub async fn driver_stopped(&self) {
        while self.node.status.is_running() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Graceful stop: stop accepting, let in-flight requests finish, stop the driver
    /// after its current Ready (everything acknowledged is already durable).
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
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
        self._transport.stop().await;
        joined?;
        info!("stopped");
        Ok(())
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

/// Runs a member until `shutdown` resolves, then stops it gracefully.
pub async fn run(
    cfg: ServerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServerError> {
    let server = Server::start(cfg).await?;
    tokio::select! {
        _ = shutdown => server.shutdown().await,
        _ = server.driver_stopped() => {
            let _ = server.shutdown().await;
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

/// An address others can dial: a wildcard listen address is advertised as loopback.
fn advertised(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        format!("127.0.0.1:{}", addr.port())
    } else {
        addr.to_string()
    }
}

/// Creates the member on a fresh data dir, or checks that an existing one belongs to
/// this member and cluster.
fn bootstrap_or_check(
    cfg: &ServerConfig,
    db: &redb::Database,
    kv: &KvStore,
    log: &RaftLog,
    advertise_mesh: &str,
) -> Result<Identity, ServerError> {
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
        .map(|(name, addr)| MemberRecord {
            id: member_id(token, name, addr),
            name: name.clone(),
            peer_urls: vec![addr.clone()],
            client_urls: vec![],
            is_learner: false,
        })
        .collect();
    let ids: Vec<u64> = members.iter().map(|m| m.id).collect();
    let expected = Identity {
        name: cfg.name.clone(),
        member_id: member_id(token, &cfg.name, my_addr),
        cluster_id: cluster_id(token, &ids),
        cluster_token: token.clone(),
    };

    if let Some(stored) = Identity::load(db)? {
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
    if kv.applied_index() != 0 || log.last_index() != 0 {
        return Err(StorageError::Corrupt {
            path: cfg.data_dir.clone(),
            detail: "it holds data but no member identity".into(),
        }
        .into());
    }
    let mut batch = kv.begin()?;
    expected.store(batch.write_txn())?;
    let conf = raft::prelude::ConfState {
        voters: ids.clone(),
        ..Default::default()
    };
    log.set_conf_state(batch.write_txn(), &conf)?;
    for m in &members {
        batch.put_member(m)?;
    }
    batch.commit(true)?;
    info!(members = initial.len(), "bootstrapped a new cluster member");
    Ok(expected)
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
