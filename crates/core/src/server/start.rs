//! The phases of [`Server::start`](super::Server::start), each a function, and the
//! member's background loops.

use super::*;

// ---- The phases of `Server::start` ----------------------------------------------------

/// What the configuration gives before anything is opened. Bad TLS files fail here.
pub(super) struct Checked<'a> {
    /// The client port's TLS configuration, and the settings it came from.
    pub(super) client_tls: Option<(
        Arc<tokio_rustls::rustls::ServerConfig>,
        &'a crate::tls::ServerTls,
    )>,
    pub(super) dialer: crate::tls::MemberDialer,
    /// The scheme of this member's client URL.
    pub(super) scheme: &'static str,
}

pub(super) fn tls_err(e: crate::tls::TlsError) -> ServerError {
    ServerError::Config(e.to_string())
}

pub(super) fn check_config(cfg: &ServerConfig) -> Result<Checked<'_>, ServerError> {
    cfg.check_mesh_security()?;
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
    Ok(Checked {
        client_tls,
        dialer,
        scheme,
    })
}

/// The data dir opened: the database, the keyspace over it, the Raft log.
pub(super) struct Store {
    pub(super) db: Arc<storage::Db>,
    pub(super) kv: Arc<KvStore>,
    pub(super) log: RaftLog,
}

pub(super) fn open_storage(cfg: &ServerConfig) -> Result<Store, ServerError> {
    let db =
        storage::open_database_on(storage::vfs::real(), &cfg.data_dir, cfg.backend_cache_bytes)?;
    let kv = Arc::new(KvStore::open_for_raft(db.clone())?);
    kv.set_token_ttl(cfg.auth_token_ttl);
    let log = RaftLog::load(&db, kv.clone())?;
    Ok(Store { db, kv, log })
}

/// The listeners, bound before anything is served, and the addresses to publish.
pub(super) struct Listeners {
    pub(super) mesh: TcpListener,
    pub(super) mesh_addr: SocketAddr,
    pub(super) client: TcpListener,
    pub(super) client_addr: SocketAddr,
    pub(super) metrics: Option<(TcpListener, SocketAddr)>,
    pub(super) advertise_mesh: String,
    pub(super) advertise_client: String,
}

pub(super) async fn bind_listeners(
    cfg: &ServerConfig,
    scheme: &str,
) -> Result<Listeners, ServerError> {
    let (mesh, mesh_addr) = bind("mesh", cfg.listen_mesh).await?;
    let (client, client_addr) = bind("client", cfg.listen_client).await?;
    let metrics = match cfg.listen_metrics {
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
    Ok(Listeners {
        mesh,
        mesh_addr,
        client,
        client_addr,
        metrics,
        advertise_mesh,
        advertise_client,
    })
}

/// The mesh and the channels registered on it before anything else uses it.
pub(super) struct MeshParts {
    pub(super) mesh: Arc<Mesh>,
    pub(super) join: Arc<JoinChannel>,
    pub(super) counters: Arc<CounterGossiper>,
}

pub(super) fn start_mesh(
    cfg: &ServerConfig,
    peer_name: u64,
    advertise_mesh: &str,
    listener: TcpListener,
) -> Result<MeshParts, ServerError> {
    let mut mesh_cfg = MeshConfig::new(peer_name, &cfg.name, advertise_mesh);
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
        let listen = listener.local_addr().map_err(listen_err(cfg.listen_mesh))?;
        tracing::warn!(
            %listen,
            "mesh: --insecure-mesh: the mesh is neither authenticated nor encrypted; \
             anyone who reaches {listen} can join the cluster and read every key"
        );
    }
    mesh_cfg.heartbeat = cfg.mesh_heartbeat;
    mesh_cfg.dead_after = cfg.mesh_heartbeat * 4;
    mesh_cfg.gossip_interval = cfg.mesh_gossip_interval;
    let mesh = Mesh::start(mesh_cfg, listener);
    let join = Arc::new(JoinChannel::register(&mesh));
    let counters = CounterGossiper::register(&mesh, COUNTER_CHANNEL);
    Ok(MeshParts {
        mesh,
        join,
        counters,
    })
}

/// Who this member is: from its data dir, a new cluster's bootstrap, or (an empty node
/// with `--peer` or `--bootstrap-expect`) discovery over the mesh, during which client
/// requests are forwarded to a member. Publishes the result in the mesh metadata and
/// hands back the client listener.
#[allow(clippy::too_many_arguments)]
pub(super) async fn establish_identity(
    cfg: &ServerConfig,
    checked: &Checked<'_>,
    store: &Store,
    mesh: &MeshParts,
    advertise_mesh: &str,
    advertise_client: &str,
    mut client_listener: TcpListener,
    peer_name: u64,
) -> Result<(Identity, Arc<LocalMeta>, TcpListener), ServerError> {
    let stored = Identity::load(&store.db)?;
    let meta = LocalMeta::new(
        mesh.mesh.clone(),
        NodeMeta {
            name: cfg.name.clone(),
            member_id: stored.as_ref().map_or(peer_name, |i| i.member_id),
            cluster_id: stored.as_ref().map_or(0, |i| i.cluster_id),
            client_url: advertise_client.to_string(),
            server: true,
            state: State::Empty as i32,
            bootstrap_expect: cfg.bootstrap_expect.unwrap_or(0),
            bootstrap_proposal: vec![],
            mesh_addr: advertise_mesh.to_string(),
            leader: false,
            token_hash: token_hash(&cfg.initial_cluster_token),
        },
    );
    let discover = stored.is_none()
        && cfg.initial_cluster.is_none()
        && (cfg.bootstrap_expect.is_some() || !cfg.peers.is_empty());
    let identity = if discover {
        // Until it is a member, the node forwards client requests to one.
        let client_addr = client_listener
            .local_addr()
            .map_err(listen_err(cfg.listen_client))?;
        let std_listener = client_listener
            .into_std()
            .map_err(listen_err(client_addr))?;
        let proxy_listener = std_listener
            .try_clone()
            .and_then(TcpListener::from_std)
            .map_err(listen_err(client_addr))?;
        let (stop_proxy, proxy_stopped) = tokio::sync::watch::channel(false);
        let pick_mesh = mesh.mesh.clone();
        let token = token_hash(&cfg.initial_cluster_token);
        let proxy_tls = checked
            .client_tls
            .as_ref()
            .map(|(_, t)| t.rustls_server_config())
            .transpose()
            .map_err(tls_err)?;
        tokio::spawn(api::proxy::serve(
            proxy_listener,
            Arc::new(move || membership::member_client_url(&pick_mesh, token)),
            proxy_tls,
            checked.dialer.clone(),
            proxy_stopped,
        ));
        let identity = self::discover(
            cfg, &mesh.mesh, &meta, &mesh.join, &store.kv, &store.log, peer_name,
        )
        .await;
        let _ = stop_proxy.send(true);
        client_listener = TcpListener::from_std(std_listener).map_err(listen_err(client_addr))?;
        identity?
    } else {
        bootstrap_or_check(cfg, stored, &store.kv, &store.log, advertise_mesh)?
    };
    meta.update(|m| {
        m.member_id = identity.member_id;
        m.cluster_id = identity.cluster_id;
        m.state = State::Member as i32;
    });
    Ok((identity, meta, client_listener))
}

/// Raft running: the driver thread, its transport over the mesh, the lessor.
pub(super) struct RaftParts {
    pub(super) node: NodeHandle,
    pub(super) driver: std::thread::JoinHandle<Result<(), DriverError>>,
    pub(super) lessor: Arc<Lessor>,
    pub(super) routes: Arc<MemberRoutes>,
    pub(super) mesh: Arc<Mesh>,
}

pub(super) fn start_raft(
    cfg: &ServerConfig,
    identity: &Identity,
    store: &Store,
    mesh: &Arc<Mesh>,
) -> Result<RaftParts, ServerError> {
    let kv = &store.kv;
    let lessor = Lessor::new(
        Lessor::min_ttl_for(cfg.tick, cfg.election_ticks),
        cfg.tick * cfg.election_ticks as u32,
    );
    crate::lease::load(&lessor, kv)?;
    let (tx, rx) = std_mpsc::channel();
    let status = Arc::new(NodeStatus::new(identity.member_id, identity.cluster_id));
    if let Some(why) = kv.corrupt_at_open() {
        // Serves no data from the first request on; the driver raises the alarm.
        status.mark_corrupt(&why);
    }
    let routes = Arc::new(MemberRoutes::default());
    refresh_routes(mesh, identity.cluster_id, &routes);
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
            log_max_bytes: crate::raft::LOG_MAX_BYTES,
            max_size_per_msg: 1024 * 1024,
            max_inflight_msgs: 256,
            snapshot_dir: storage::snapshot_dir(&cfg.data_dir),
            corrupt_at_start: kv.corrupt_at_open(),
            fixed_election_ticks: None,
        },
        store.log.clone(),
        kv.clone(),
        store.db.clone(),
        transport as Arc<dyn Transport>,
        rx,
        status.clone(),
        lessor.clone(),
    )?;
    Ok(RaftParts {
        node: NodeHandle::new(tx, status, store.log.clone(), cfg.request_timeout),
        driver,
        lessor,
        routes,
        mesh: mesh.clone(),
    })
}

/// The client port being served, and how to stop it.
pub(super) struct ApiParts {
    pub(super) task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
    pub(super) stop: oneshot::Sender<()>,
    /// What the operator pages read (also served by `--listen-metrics`).
    pub(super) probes: crate::metrics::http::Sources,
}

/// Serves gRPC and HTTP on the client listener (see [`api::http`]).
pub(super) fn serve_api(
    cfg: &ServerConfig,
    ctx: &ApiContext,
    identity: &Identity,
    mesh: &MeshParts,
    client_listener: TcpListener,
    client_tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
) -> ApiParts {
    let node = &ctx.node;
    let kv = &ctx.kv;
    let max_msg = cfg.limits.max_request_bytes + api::GRPC_OVERHEAD_BYTES;
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
            mesh: mesh.mesh.clone(),
            counters: mesh.counters.clone(),
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
                mesh: mesh.mesh.clone(),
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
        db: ctx.db.clone(),
        mesh: mesh.mesh.clone(),
        grpc: grpc_metrics,
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
    let (stop, stop_rx) = oneshot::channel::<()>();
    let shutdown = async {
        let _ = stop_rx.await;
    };
    let task = match client_tls {
        Some(tls) => tokio::spawn(
            router.serve_with_incoming_shutdown(api::http::tls_incoming(tcp, tls), shutdown),
        ),
        None => tokio::spawn(router.serve_with_incoming_shutdown(tcp, shutdown)),
    };
    ApiParts { task, stop, probes }
}

/// The member's loops: publishing its client URL, following the mesh, autopilot, the
/// quota watch, lease expiry, the corruption check and auto-compaction. Each runs
/// until `stop` turns true, and its handle reports its end.
#[allow(clippy::too_many_arguments)]
pub(super) fn spawn_background(
    cfg: &ServerConfig,
    identity: &Identity,
    store: &Store,
    mesh: MeshParts,
    meta: Arc<LocalMeta>,
    raft: &RaftParts,
    ctx: ApiContext,
    advertise_client: String,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let node = &raft.node;
    let kv = &store.kv;
    let mut tasks = vec![
        spawn_until(
            stop,
            publish_attributes(
                node.clone(),
                kv.clone(),
                identity.member_id,
                cfg.name.clone(),
                advertise_client,
            ),
        ),
        spawn_until(
            stop,
            follow_mesh(
                mesh.mesh.clone(),
                meta,
                raft.routes.clone(),
                node.clone(),
                mesh.join.clone(),
            ),
        ),
        spawn_until(
            stop,
            Autopilot {
                cfg: cfg.autopilot.clone(),
                mesh: mesh.mesh.clone(),
                node: node.clone(),
                kv: kv.clone(),
                join: mesh.join,
                token: cfg.initial_cluster_token.clone(),
                clock: crate::system_clock(),
            }
            .run(),
        ),
        spawn_until(stop, watch_quota(ctx)),
        spawn_until(
            stop,
            crate::raft::lease_expiry::run(
                raft.lessor.clone(),
                node.clone(),
                cfg.tick.max(Duration::from_millis(20)),
            ),
        ),
        spawn_until(
            stop,
            crate::corruption::task(
                &mesh.mesh,
                kv.clone(),
                node.clone(),
                raft.routes.clone(),
                cfg.corrupt_check_interval,
            ),
        ),
    ];
    if let Some(mode) = cfg.auto_compaction {
        tasks.push(spawn_until(
            stop,
            crate::compactor::task(
                mode,
                cfg.auto_compaction_revision_check,
                kv.clone(),
                node.clone(),
            ),
        ));
    }
    tasks
}

/// Runs `task` until it ends or `stop` turns true (then it ends at its next await).
pub(super) fn spawn_until<F>(
    stop: &tokio::sync::watch::Receiver<bool>,
    task: F,
) -> tokio::task::JoinHandle<()>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let mut stop = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = task => {}
            _ = stop.wait_for(|s| *s) => {}
        }
    })
}

/// Binds a listener and reports the address it got (port 0 picks one).
pub(super) async fn bind(
    what: &'static str,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr), ServerError> {
    let err = |source| ServerError::Listen { what, addr, source };
    let listener = TcpListener::bind(addr).await.map_err(err)?;
    let local = listener.local_addr().map_err(err)?;
    Ok((listener, local))
}

pub(super) fn listen_err(addr: SocketAddr) -> impl Fn(std::io::Error) -> ServerError {
    move |source| ServerError::Listen {
        what: "client",
        addr,
        source,
    }
}

/// An address others can dial: a wildcard listen address is advertised as loopback.
pub(super) fn advertised(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        format!("127.0.0.1:{}", addr.port())
    } else {
        addr.to_string()
    }
}

/// Raises a NOSPACE alarm for this member through Raft whenever its database file
/// exceeds the quota and none is active for it (as an etcd member does when a write
/// finds its backend over quota). Disarming while still over quota raises it again.
pub(super) async fn watch_quota(ctx: ApiContext) {
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
pub(super) async fn follow_mesh(
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
pub(super) async fn publish_attributes(
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
