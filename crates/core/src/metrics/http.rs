//! The HTTP endpoints for operators: `/metrics` (Prometheus text format), `/health`
//! (etcd's JSON body: 200 only when this member has a leader and applies entries),
//! `/livez`, `/readyz` and `/version`. The client port serves them; `--listen-metrics`
//! serves them on a port of their own.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::codegen::http::{self, StatusCode};
use tracing::debug;

use super::grpc::GrpcMetrics;
use super::{Exposition, Gauge};
use crate::kv::KvStore;
use crate::mesh::Mesh;
use crate::raft::NodeHandle;
use crate::storage::Db;

/// How long `/health` waits for a ReadIndex round (leader confirmed, entries applied).
const HEALTH_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// What the pages read.
#[derive(Clone)]
pub struct Sources {
    pub node: NodeHandle,
    pub kv: Arc<KvStore>,
    pub db: Arc<Db>,
    pub mesh: Arc<Mesh>,
    pub grpc: GrpcMetrics,
    /// Watchers open on this member.
    pub watchers: Gauge,
}

/// Serves `listener` until `stop` turns true.
/// A client must send its request headers within this long.
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// A connection is closed after this long, idle or not (scrapers reconnect).
const CONNECTION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(120);
/// Connections served at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 64;
/// Largest request head buffered.
const MAX_BUF_BYTES: usize = 64 * 1024;

pub async fn serve(listener: TcpListener, src: Sources, mut stop: watch::Receiver<bool>) {
    let open = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    debug!("metrics accept: {e}");
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let Ok(slot) = open.clone().try_acquire_owned() else {
            debug!("metrics: too many open connections, one refused");
            continue;
        };
        let src = src.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                let src = src.clone();
                async move { Ok::<_, Infallible>(probe(&src, req.method(), req.uri()).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_BUF_BYTES)
                .serve_connection(TokioIo::new(stream), svc);
            match tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
                Ok(Err(e)) => debug!("metrics connection: {e}"),
                Err(_) => debug!("metrics connection closed after {CONNECTION_LIFETIME:?}"),
                Ok(Ok(())) => {}
            }
            drop(slot);
        });
    }
}

/// Answers the operator endpoints, on the metrics port and on the client port:
/// `/metrics`, `/health` (etcd's JSON; `?serializable=true` skips the quorum round,
/// `?exclude=NOSPACE` ignores that alarm), `/livez` and `/readyz` (plain `ok`, 503 with
/// the failed check otherwise) and `/version`.
pub async fn probe(
    src: &Sources,
    method: &http::Method,
    uri: &http::Uri,
) -> http::Response<String> {
    let query = uri.query().unwrap_or("");
    let params: Vec<(&str, &str)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect();
    let serializable = params
        .iter()
        .any(|(k, v)| *k == "serializable" && *v == "true");
    let exclude: Vec<&str> = params
        .iter()
        .filter(|(k, _)| *k == "exclude")
        .map(|(_, v)| *v)
        .collect();
    let get = method == http::Method::GET || method == http::Method::HEAD;
    let (status, content_type, body) = match uri.path() {
        "/metrics" | "/health" | "/livez" | "/readyz" | "/version" if !get => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "Method Not Allowed\n".into(),
        ),
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics_page(src),
        ),
        "/health" => {
            let (ok, reason) = match health(src, serializable, &exclude).await {
                Ok(()) => (true, String::new()),
                Err(reason) => (false, reason),
            };
            let body = serde_json::json!({
                "health": if ok { "true" } else { "false" },
                "reason": reason,
            })
            .to_string();
            let status = if ok {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (status, "application/json", body)
        }
        "/livez" => match live(src) {
            Ok(()) => (StatusCode::OK, "text/plain; charset=utf-8", "ok".into()),
            Err(reason) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain; charset=utf-8",
                format!("[-]raft failed: {reason}\nlivez check failed"),
            ),
        },
        // Ready means serving reads with intact data: a NOSPACE alarm (writes refused
        // until an operator frees space) must not take every member out of service.
        "/readyz" => match health(
            src,
            serializable,
            &[exclude.as_slice(), &["NOSPACE"]].concat(),
        )
        .await
        {
            Ok(()) => (StatusCode::OK, "text/plain; charset=utf-8", "ok".into()),
            Err(reason) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain; charset=utf-8",
                format!("[-]read failed: {reason}\nreadyz check failed"),
            ),
        },
        "/version" => (
            StatusCode::OK,
            "application/json",
            serde_json::json!({
                "etcdserver": crate::ETCD_API_VERSION,
                "etcdcluster": crate::ETCD_CLUSTER_VERSION,
            })
            .to_string(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "404 page not found\n".into(),
        ),
    };
    let body = if method == http::Method::HEAD {
        String::new()
    } else {
        body
    };
    let mut resp = http::Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    resp
}

/// `Ok` while this member's Raft loop runs and its storage works: a restart would not
/// help otherwise-healthy members that only lack a quorum.
fn live(src: &Sources) -> Result<(), String> {
    let status = &src.node.status;
    if !status.is_running() {
        return Err("RAFT STOPPED".into());
    }
    if status.storage_failed() {
        return Err("STORAGE WRITE FAILED".into());
    }
    Ok(())
}

/// `Ok` when this member has a leader, no alarm is raised (but those in `exclude`),
/// and, unless `serializable`, a ReadIndex round completes (quorum reachable, entries
/// applied); otherwise the reason, in etcd's words where etcd has them.
pub async fn health(src: &Sources, serializable: bool, exclude: &[&str]) -> Result<(), String> {
    let status = &src.node.status;
    if !status.is_running() {
        return Err("RAFT STOPPED".into());
    }
    if status.storage_failed() {
        return Err("STORAGE WRITE FAILED: reopening the database".into());
    }
    if let Some(why) = status.corruption() {
        return Err(format!("CORRUPT: {why}"));
    }
    if let Ok(alarms) = src.kv.alarms() {
        for a in alarms {
            let name = crate::proto::etcdserverpb::AlarmType::try_from(a.alarm)
                .map_or("UNKNOWN", |t| t.as_str_name());
            if !exclude.contains(&name) {
                return Err(format!("ALARM {name}"));
            }
        }
    }
    if serializable {
        return Ok(());
    }
    if status.leader() == 0 {
        return Err("RAFT NO LEADER".into());
    }
    match tokio::time::timeout(HEALTH_READ_TIMEOUT, src.node.read_index()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("RAFT READ INDEX: {e}")),
        Err(_) => Err("RAFT READ INDEX: timed out".into()),
    }
}

/// The standard `process_*` series (as Prometheus' Go client exports them, which
/// tools such as `etcdctl check datascale` read), from `/proc/self` on Linux.
fn process_metrics(e: &mut Exposition) {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return;
    };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf only reads a system constant.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK) as f64,
            libc::sysconf(libc::_SC_PAGESIZE) as f64,
        )
    };
    // Indices are the stat(5) field numbers minus 3 (pid and comm come first).
    let (utime, stime, start, vsize, rss) = (num(11), num(12), num(19), num(20), num(21));
    if ticks > 0.0 {
        e.counter_f64(
            "process_cpu_seconds_total",
            "Total user and system CPU time spent in seconds.",
            (utime + stime) / ticks,
        );
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("btime "))
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
            .unwrap_or(0.0);
        e.gauge(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            boot + start / ticks,
        );
    }
    e.gauge(
        "process_resident_memory_bytes",
        "Resident memory size in bytes.",
        rss * page,
    );
    e.gauge(
        "process_virtual_memory_bytes",
        "Virtual memory size in bytes.",
        vsize,
    );
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        e.gauge(
            "process_open_fds",
            "Number of open file descriptors.",
            fds.count() as f64,
        );
    }
}

/// The Prometheus page.
pub fn metrics_page(src: &Sources) -> String {
    let s = &src.node.status;
    let m = &s.metrics;
    let mut e = Exposition::default();
    let leader = s.leader();
    e.gauge(
        "etcd_server_has_leader",
        "Whether or not a leader exists. 1 is existence, 0 is not.",
        f64::from(u8::from(leader != 0)),
    );
    e.gauge(
        "etcd_server_is_leader",
        "Whether or not this member is a leader. 1 if is, 0 otherwise.",
        f64::from(u8::from(leader != 0 && leader == s.member_id)),
    );
    e.counter(
        "etcd_server_leader_changes_seen_total",
        "The number of leader changes seen.",
        s.leader_changes(),
    );
    e.gauge("meshd_raft_term", "The current Raft term.", s.term() as f64);
    e.gauge(
        "etcd_server_proposals_committed_total",
        "The total number of consensus proposals committed.",
        s.commit_index() as f64,
    );
    e.gauge(
        "etcd_server_proposals_applied_total",
        "The total number of consensus proposals applied.",
        s.applied_index() as f64,
    );
    e.counter(
        "etcd_server_proposals_failed_total",
        "The total number of failed proposals seen.",
        m.proposals_failed.load(Ordering::Relaxed),
    );
    let refused: Vec<_> = crate::raft::validate::Refusal::ALL
        .iter()
        .zip(&m.peer_messages_refused)
        .map(|(r, n)| (vec![("reason", r.label())], n.load(Ordering::Relaxed)))
        .collect();
    e.labelled_counter(
        "meshd_raft_peer_messages_refused_total",
        "Raft messages from peers dropped before Raft saw them, by reason.",
        &refused,
    );
    e.gauge(
        "etcd_server_proposals_pending",
        "The current number of pending proposals to commit.",
        m.proposals_pending.load(Ordering::Relaxed) as f64,
    );
    e.histogram(
        "etcd_disk_wal_fsync_duration_seconds",
        "The latency distributions of the durable Raft log commit (fdatasync) of a Ready.",
        &m.log_commit,
    );
    e.histogram(
        "etcd_disk_backend_commit_duration_seconds",
        "The latency distributions of commits of applied entries to the keyspace.",
        &m.backend_commit,
    );
    e.histogram(
        "etcd_server_apply_duration_seconds",
        "The latency distributions of applying a batch of committed entries.",
        &m.apply,
    );
    let log = &src.node.log;
    e.gauge(
        "meshd_raft_log_entries",
        "Entries in the Raft log (not yet compacted into a snapshot).",
        (log.last_index() + 1).saturating_sub(log.first_index()) as f64,
    );
    let (segments, wal_bytes) = log.disk_usage();
    e.gauge(
        "meshd_wal_segments",
        "Segment files of the Raft write-ahead log.",
        segments as f64,
    );
    e.gauge(
        "meshd_wal_bytes",
        "Bytes of records in the Raft write-ahead log's segment files.",
        wal_bytes as f64,
    );
    e.gauge(
        "etcd_mvcc_db_total_size_in_bytes",
        "Total size of the underlying database physically allocated in bytes.",
        src.db.file_size() as f64,
    );
    e.gauge(
        "etcd_debugging_mvcc_watcher_total",
        "Total number of watchers.",
        src.watchers.load(Ordering::Relaxed) as f64,
    );
    let mesh = src.mesh.stats();
    e.gauge(
        "meshd_mesh_peers",
        "Peers this member knows in the mesh topology (itself included).",
        mesh.peers as f64,
    );
    e.gauge(
        "meshd_mesh_connections",
        "Established mesh connections of this member.",
        mesh.connections as f64,
    );
    e.counter(
        "meshd_mesh_received_bytes_total",
        "Bytes received on mesh connections.",
        mesh.bytes_in,
    );
    e.counter(
        "meshd_mesh_sent_bytes_total",
        "Bytes sent on mesh connections.",
        mesh.bytes_out,
    );
    e.counter(
        "meshd_mesh_gossip_received_bytes_total",
        "Gossip payload bytes received.",
        mesh.gossip_bytes_in,
    );
    e.counter(
        "meshd_mesh_gossip_sent_bytes_total",
        "Gossip payload bytes sent.",
        mesh.gossip_bytes_out,
    );
    e.counter(
        "meshd_mesh_handshakes_refused_total",
        "Mesh connections refused at the handshake (wrong password, version, identity).",
        mesh.handshakes_refused,
    );
    e.counter(
        "meshd_mesh_unicasts_refused_total",
        "Unicasts dropped because they claim to come from this node.",
        mesh.unicasts_refused,
    );
    e.counter(
        "meshd_mesh_topology_entries_refused_total",
        "Gossiped topology entries refused for breaking a cap (peer count, entry size, connections).",
        mesh.topology_refused,
    );
    process_metrics(&mut e);
    let handled = src.grpc.handled();
    let series: Vec<(Vec<(&str, &str)>, u64)> = handled
        .iter()
        .map(|((service, method, code), n)| {
            (
                vec![
                    ("grpc_code", *code),
                    ("grpc_method", method.as_str()),
                    ("grpc_service", service.as_str()),
                ],
                *n,
            )
        })
        .collect();
    e.labelled_counter(
        "grpc_server_handled_total",
        "Total number of RPCs completed on the server, regardless of success or failure.",
        &series,
    );
    e.finish()
}
