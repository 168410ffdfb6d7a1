//! The typed etcd-v3 client that meshctl and locksmith use: one lazily dialed gRPC
//! channel per endpoint, request timeouts, and failover to the next endpoint when one
//! is unreachable (writes only when the request provably was not sent).
//!
//! Layout: `mod.rs` the [`Client`] and its failover loop; `error.rs` [`ClientError`];
//! `watch.rs` the [`Watcher`] stream; `keys.rs` range helpers (prefix / from-key ends);
//! `lease.rs` leases and keep-alives; `concurrency.rs` Lock and Election; `auth.rs`
//! users, roles and auth enable (with `--user`, every request carries a token).
mod auth;
mod concurrency;
mod error;
mod keys;
mod lease;
mod watch;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::{InterceptedService, Interceptor};
use tonic::transport::Channel;

use crate::proto::etcdserverpb as pb;
use pb::cluster_client::ClusterClient;
use pb::kv_client::KvClient;

/// Largest response the client decodes. etcd's clients accept up to 2 GiB
/// (`MaxCallRecvMsgSize` is `math.MaxInt32`), so a range over a large keyspace works as
/// it does with etcdctl; the server chosen by the caller is what sends it.
pub const MAX_RESPONSE_BYTES: usize = i32::MAX as usize;

/// A KV client that takes responses up to [`MAX_RESPONSE_BYTES`].
fn kv_client(ch: Conn) -> KvClient<Conn> {
    KvClient::new(ch).max_decoding_message_size(MAX_RESPONSE_BYTES)
}
use pb::maintenance_client::MaintenanceClient;

use crate::proto::meshpb;
use meshpb::mesh_client::MeshClient;

pub use error::{is_go_away_refusal, ClientError};
pub use keys::{from_key_range_end, prefix_range_end};
pub use lease::{keep_lease_alive, KeepAlive};
pub use watch::{WatchOptions, Watcher};

/// How to reach the cluster.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `host:port` or `http://host:port`, tried in order, failing over on unreachability.
    pub endpoints: Vec<String>,
    /// How long to wait for a TCP/HTTP2 connection to one endpoint.
    pub dial_timeout: Duration,
    /// How long one request to one endpoint may take.
    pub request_timeout: Duration,
    /// TLS (`--cacert`, `--cert`, `--key`).
    pub tls: ClientTls,
    /// User name and password (`--user`): the client authenticates on first use and
    /// sends the token with every request, authenticating again when it expires.
    pub credentials: Option<(String, String)>,
}

/// Client-side TLS files. Endpoints written `https://` always use TLS; with a CA file,
/// every endpoint does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// CA that signed the servers' certificates (`--cacert`); without it, the system roots.
    pub ca_file: Option<std::path::PathBuf>,
    /// Client certificate (`--cert`), for servers with client-certificate auth.
    pub cert_file: Option<std::path::PathBuf>,
    /// Its private key (`--key`).
    pub key_file: Option<std::path::PathBuf>,
}

impl ClientTls {
    /// Whether endpoints without a scheme use TLS.
    fn implied(&self) -> bool {
        self.ca_file.is_some()
    }

    /// tonic's configuration from the files.
    fn config(&self) -> Result<tonic::transport::ClientTlsConfig, ClientError> {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let read = |what: &str, p: &std::path::Path| {
            std::fs::read(p).map_err(|e| {
                ClientError::Config(format!("cannot read {what} {}: {e}", p.display()))
            })
        };
        let mut cfg = ClientTlsConfig::new();
        cfg = match &self.ca_file {
            Some(ca) => cfg.ca_certificate(Certificate::from_pem(read("CA file", ca)?)),
            None => cfg.with_native_roots(),
        };
        match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => {
                cfg = cfg.identity(Identity::from_pem(
                    read("certificate file", cert)?,
                    read("key file", key)?,
                ))
            }
            (None, None) => {}
            _ => {
                return Err(ClientError::Config(
                    "--cert and --key must be given together".into(),
                ))
            }
        }
        Ok(cfg)
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            endpoints: vec!["127.0.0.1:2379".into()],
            dial_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            tls: ClientTls::default(),
            credentials: None,
        }
    }
}

/// One configured endpoint and its cached channel.
#[derive(Debug)]
struct Endpoint {
    /// As the user wrote it (used in messages and `endpoint status`).
    name: String,
    /// `http://host:port` or `https://host:port`.
    uri: String,
    /// Set for `https://` endpoints.
    tls: Option<tonic::transport::ClientTlsConfig>,
    /// The connected channel; dropped after a transport error so the next use redials.
    channel: Mutex<Option<Channel>>,
}

/// A client for the etcd v3 API (served by meshd and by etcd alike). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    endpoints: Vec<Endpoint>,
    /// Index of the endpoint that answered last; requests start there.
    current: AtomicUsize,
    dial_timeout: Duration,
    request_timeout: Duration,
    credentials: Option<(String, String)>,
    /// The auth token, shared by every endpoint (tokens are valid cluster-wide).
    token: Arc<Mutex<Option<MetadataValue<Ascii>>>>,
}

/// A connection to one endpoint that adds the auth token (if any) to every request.
pub type Conn = InterceptedService<Channel, TokenInjector>;

/// Adds the `token` metadata etcd servers read the caller from.
#[derive(Debug, Clone)]
pub struct TokenInjector(Arc<Mutex<Option<MetadataValue<Ascii>>>>);

impl Interceptor for TokenInjector {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = self.0.lock().expect("token lock").clone() {
            req.metadata_mut().insert("token", t);
        }
        Ok(req)
    }
}

/// etcd's answer to an unknown or expired token: authenticate again and resend.
const INVALID_TOKEN: &str = "etcdserver: invalid auth token";

/// Whether a request may be resent to another endpoint after an ambiguous failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Reads: resend on any retryable error.
    Idempotent,
    /// Writes: resend only when the request provably never left (connect failure).
    OnlyIfNotSent,
}

/// Normalizes `host:port` / `http(s)://host:port` into a URI tonic accepts; a bare
/// `host:port` gets `https://` when `tls` is implied.
fn endpoint_uri(ep: &str, tls: bool) -> Result<String, ClientError> {
    let ep = ep.trim();
    if ep.is_empty() {
        return Err(ClientError::Config("empty endpoint".into()));
    }
    let uri = if ep.starts_with("https://") {
        ep.to_string()
    } else if let Some(rest) = ep.strip_prefix("http://") {
        if tls {
            format!("https://{rest}")
        } else {
            ep.to_string()
        }
    } else if tls {
        format!("https://{ep}")
    } else {
        format!("http://{ep}")
    };
    uri.parse::<tonic::transport::Uri>()
        .map_err(|e| ClientError::Config(format!("{ep}: {e}")))?;
    Ok(uri)
}

impl Client {
    /// Validates the endpoints; connections are dialed on first use, so this does no I/O.
    pub fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        if config.endpoints.is_empty() {
            return Err(ClientError::Config("no endpoints".into()));
        }
        let endpoints = config
            .endpoints
            .iter()
            .map(|name| {
                let uri = endpoint_uri(name, config.tls.implied())?;
                let tls = if uri.starts_with("https://") {
                    Some(config.tls.config()?)
                } else {
                    None
                };
                Ok(Endpoint {
                    name: name.trim().to_string(),
                    uri,
                    tls,
                    channel: Mutex::new(None),
                })
            })
            .collect::<Result<Vec<_>, ClientError>>()?;
        Ok(Client {
            inner: Arc::new(Inner {
                endpoints,
                current: AtomicUsize::new(0),
                dial_timeout: config.dial_timeout,
                request_timeout: config.request_timeout,
                credentials: config.credentials.clone(),
                token: Arc::default(),
            }),
        })
    }

    /// The configured endpoints, as written.
    pub fn endpoints(&self) -> Vec<String> {
        self.inner
            .endpoints
            .iter()
            .map(|e| e.name.clone())
            .collect()
    }

    /// The connection to endpoint `idx`, dialing it (and authenticating) if needed.
    async fn channel(&self, idx: usize) -> Result<Conn, ClientError> {
        let raw = self.raw_channel(idx).await?;
        self.authenticate(idx, &raw).await?;
        Ok(InterceptedService::new(
            raw,
            TokenInjector(self.inner.token.clone()),
        ))
    }

    /// Gets a token with the configured credentials unless one is held already.
    async fn authenticate(&self, idx: usize, raw: &Channel) -> Result<(), ClientError> {
        let Some((name, password)) = &self.inner.credentials else {
            return Ok(());
        };
        if self.inner.token.lock().expect("token lock").is_some() {
            return Ok(());
        }
        let endpoint = &self.inner.endpoints[idx].name;
        let req = pb::AuthenticateRequest {
            name: name.clone(),
            password: password.clone(),
        };
        let resp = tokio::time::timeout(
            self.inner.request_timeout,
            pb::auth_client::AuthClient::new(raw.clone()).authenticate(req),
        )
        .await
        .map_err(|_| ClientError::Timeout {
            endpoint: endpoint.clone(),
            timeout: self.inner.request_timeout,
        })?
        .map_err(|s| ClientError::from_status(&s, endpoint))?;
        let token = MetadataValue::try_from(resp.into_inner().token)
            .map_err(|e| ClientError::Config(format!("server sent an unusable token: {e}")))?;
        *self.inner.token.lock().expect("token lock") = Some(token);
        Ok(())
    }

    /// The plain channel to endpoint `idx`, dialing it if needed.
    async fn raw_channel(&self, idx: usize) -> Result<Channel, ClientError> {
        let ep = &self.inner.endpoints[idx];
        if let Some(ch) = ep.channel.lock().expect("channel lock").clone() {
            return Ok(ch);
        }
        let connect_err = |reason: String| ClientError::Connect {
            endpoint: ep.name.clone(),
            reason,
        };
        let mut builder = tonic::transport::Endpoint::from_shared(ep.uri.clone())
            .map_err(|e| ClientError::Config(format!("{}: {e}", ep.name)))?
            .connect_timeout(self.inner.dial_timeout)
            .tcp_nodelay(true);
        if let Some(tls) = &ep.tls {
            builder = builder
                .tls_config(tls.clone())
                .map_err(|e| ClientError::Config(format!("{}: {e}", ep.name)))?;
        }
        let ch = match tokio::time::timeout(self.inner.dial_timeout, builder.connect()).await {
            Ok(Ok(ch)) => ch,
            Ok(Err(e)) => return Err(connect_err(error::error_chain(&e))),
            Err(_) => {
                return Err(connect_err(format!(
                    "dial timeout after {:?}",
                    self.inner.dial_timeout
                )))
            }
        };
        *ep.channel.lock().expect("channel lock") = Some(ch.clone());
        Ok(ch)
    }

    /// The first endpoint (starting with the last good one) that can be dialed.
    async fn first_channel(&self) -> Result<(usize, Conn), ClientError> {
        let n = self.inner.endpoints.len();
        let start = self.inner.current.load(Ordering::Relaxed);
        let mut last = None;
        for i in 0..n {
            let idx = (start + i) % n;
            match self.channel(idx).await {
                Ok(ch) => return Ok((idx, ch)),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one endpoint"))
    }

    /// Runs `call` against the endpoints in turn, starting with the last good one.
    async fn with_failover<T, F, Fut>(&self, retry: Retry, call: F) -> Result<T, ClientError>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let n = self.inner.endpoints.len();
        let start = self.inner.current.load(Ordering::Relaxed);
        let mut last = None;
        for i in 0..n {
            let idx = (start + i) % n;
            match self.call_one(idx, &call).await {
                Ok(v) => {
                    self.inner.current.store(idx, Ordering::Relaxed);
                    return Ok(v);
                }
                Err(e) => {
                    let may_resend =
                        e.was_not_sent() || (retry == Retry::Idempotent && e.is_retryable());
                    tracing::debug!(endpoint = %self.inner.endpoints[idx].name, error = %e, may_resend, "request failed");
                    if !may_resend {
                        return Err(e);
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.expect("at least one endpoint"))
    }

    /// One attempt against endpoint `idx`, with the request timeout.
    async fn call_one<T, F, Fut>(&self, idx: usize, call: &F) -> Result<T, ClientError>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let ep = &self.inner.endpoints[idx];
        let ch = self.channel(idx).await?;
        let mut result = tokio::time::timeout(self.inner.request_timeout, call(ch)).await;
        if matches!(&result, Ok(Err(s)) if s.message() == INVALID_TOKEN)
            && self.inner.credentials.is_some()
        {
            // The token expired (or the member restarted): the request was refused
            // before it did anything, so it is safe to resend with a new token.
            *self.inner.token.lock().expect("token lock") = None;
            let ch = self.channel(idx).await?;
            result = tokio::time::timeout(self.inner.request_timeout, call(ch)).await;
        }
        match result {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => {
                // A status with a source came from our transport, not the server:
                // drop the channel so the next request redials.
                if std::error::Error::source(&status).is_some() {
                    *ep.channel.lock().expect("channel lock") = None;
                    if error::is_connect_refusal(&status) {
                        return Err(ClientError::Connect {
                            endpoint: ep.name.clone(),
                            reason: status.message().to_string(),
                        });
                    }
                    if error::is_go_away_refusal(&status) {
                        return Err(ClientError::Refused {
                            endpoint: ep.name.clone(),
                            reason: error::error_chain(&status),
                        });
                    }
                    // The connection broke mid-request (e.g. the member was killed):
                    // tonic reports that as Unknown "transport error". It is an
                    // unavailable endpoint, retryable, with the request's fate unknown.
                    if status.code() == tonic::Code::Unknown {
                        return Err(ClientError::Rpc {
                            code: tonic::Code::Unavailable,
                            message: format!(
                                "{}: {}",
                                status.message(),
                                error::error_chain(&status)
                            ),
                            endpoint: ep.name.clone(),
                        });
                    }
                }
                Err(ClientError::from_status(&status, &ep.name))
            }
            Err(_) => Err(ClientError::Timeout {
                endpoint: ep.name.clone(),
                timeout: self.inner.request_timeout,
            }),
        }
    }

    /// Reads keys (`Range`). Retried on other endpoints on unavailability.
    pub async fn range(&self, req: pb::RangeRequest) -> Result<pb::RangeResponse, ClientError> {
        self.with_failover(Retry::Idempotent, |ch| {
            let req = req.clone();
            async move { kv_client(ch).range(req).await }
        })
        .await
    }

    /// Linearizable read of a single key; `None` when it does not exist.
    pub async fn get(
        &self,
        key: impl Into<Vec<u8>>,
    ) -> Result<Option<crate::proto::mvccpb::KeyValue>, ClientError> {
        let resp = self
            .range(pb::RangeRequest {
                key: key.into(),
                ..Default::default()
            })
            .await?;
        Ok(resp.kvs.into_iter().next())
    }

    /// Writes one key (`Put`).
    pub async fn put(&self, req: pb::PutRequest) -> Result<pb::PutResponse, ClientError> {
        self.with_failover(Retry::OnlyIfNotSent, |ch| {
            let req = req.clone();
            async move { KvClient::new(ch).put(req).await }
        })
        .await
    }

    /// Deletes a key or range (`DeleteRange`).
    pub async fn delete_range(
        &self,
        req: pb::DeleteRangeRequest,
    ) -> Result<pb::DeleteRangeResponse, ClientError> {
        self.with_failover(Retry::OnlyIfNotSent, |ch| {
            let req = req.clone();
            async move { KvClient::new(ch).delete_range(req).await }
        })
        .await
    }

    /// Runs a transaction. Treated as a write unless it contains only reads.
    pub async fn txn(&self, req: pb::TxnRequest) -> Result<pb::TxnResponse, ClientError> {
        let read_only = req
            .success
            .iter()
            .chain(&req.failure)
            .all(|op| matches!(op.request, Some(pb::request_op::Request::RequestRange(_))));
        let retry = if read_only {
            Retry::Idempotent
        } else {
            Retry::OnlyIfNotSent
        };
        self.with_failover(retry, |ch| {
            let req = req.clone();
            async move { kv_client(ch).txn(req).await }
        })
        .await
    }

    /// Compacts the history up to `revision`; `physical` waits until it is on disk.
    pub async fn compact(
        &self,
        revision: i64,
        physical: bool,
    ) -> Result<pb::CompactionResponse, ClientError> {
        let req = pb::CompactionRequest { revision, physical };
        // Not resent after an ambiguous failure: compacting the same revision again
        // fails with "required revision has been compacted".
        self.with_failover(Retry::OnlyIfNotSent, |ch| async move {
            KvClient::new(ch).compact(req).await
        })
        .await
    }

    /// Lists the cluster's members.
    pub async fn member_list(&self) -> Result<pb::MemberListResponse, ClientError> {
        self.with_failover(Retry::Idempotent, |ch| async move {
            ClusterClient::new(ch)
                .member_list(pb::MemberListRequest {
                    linearizable: false,
                })
                .await
        })
        .await
    }

    /// Adds a member (its mesh address as the peer URL), optionally as a learner.
    pub async fn member_add(
        &self,
        peer_urls: Vec<String>,
        is_learner: bool,
    ) -> Result<pb::MemberAddResponse, ClientError> {
        self.with_failover(Retry::OnlyIfNotSent, |ch| {
            let req = pb::MemberAddRequest {
                peer_ur_ls: peer_urls.clone(),
                is_learner,
            };
            async move { ClusterClient::new(ch).member_add(req).await }
        })
        .await
    }

    pub async fn member_remove(&self, id: u64) -> Result<pb::MemberRemoveResponse, ClientError> {
        self.with_failover(Retry::OnlyIfNotSent, |ch| async move {
            ClusterClient::new(ch)
                .member_remove(pb::MemberRemoveRequest { id })
                .await
        })
        .await
    }

    pub async fn member_promote(&self, id: u64) -> Result<pb::MemberPromoteResponse, ClientError> {
        self.with_failover(Retry::OnlyIfNotSent, |ch| async move {
            ClusterClient::new(ch)
                .member_promote(pb::MemberPromoteRequest { id })
                .await
        })
        .await
    }

    pub async fn member_update(
        &self,
        id: u64,
        peer_urls: Vec<String>,
    ) -> Result<pb::MemberUpdateResponse, ClientError> {
        self.with_failover(Retry::OnlyIfNotSent, |ch| {
            let req = pb::MemberUpdateRequest {
                id,
                peer_ur_ls: peer_urls.clone(),
            };
            async move { ClusterClient::new(ch).member_update(req).await }
        })
        .await
    }

    /// Every mesh peer the answering node knows of.
    pub async fn mesh_peers(&self) -> Result<meshpb::MeshPeersResponse, ClientError> {
        self.with_failover(Retry::Idempotent, |ch| async move {
            MeshClient::new(ch).peers(meshpb::MeshPeersRequest {}).await
        })
        .await
    }

    /// The answering node's view of the mesh.
    pub async fn mesh_status(&self) -> Result<meshpb::MeshStatusResponse, ClientError> {
        self.with_failover(Retry::Idempotent, |ch| async move {
            MeshClient::new(ch)
                .status(meshpb::MeshStatusRequest {})
                .await
        })
        .await
    }

    /// Adds `delta` to the gossiped counter `name`; returns the answering node's value.
    pub async fn counter_incr(&self, name: &str, delta: i64) -> Result<i64, ClientError> {
        let r = self
            .with_failover(Retry::OnlyIfNotSent, |ch| {
                let req = meshpb::CounterIncrRequest {
                    name: name.to_string(),
                    delta,
                };
                async move { MeshClient::new(ch).counter_incr(req).await }
            })
            .await?;
        Ok(r.value)
    }

    /// The answering node's value of the gossiped counter `name`.
    pub async fn counter_get(&self, name: &str) -> Result<i64, ClientError> {
        let r = self
            .with_failover(Retry::Idempotent, |ch| {
                let req = meshpb::CounterGetRequest {
                    name: name.to_string(),
                };
                async move { MeshClient::new(ch).counter_get(req).await }
            })
            .await?;
        Ok(r.value)
    }

    /// Index of a configured endpoint by name, or an error.
    fn endpoint_index(&self, endpoint: &str) -> Result<usize, ClientError> {
        self.inner
            .endpoints
            .iter()
            .position(|e| e.name == endpoint)
            .ok_or_else(|| ClientError::Config(format!("{endpoint} is not a configured endpoint")))
    }

    /// The status of one configured endpoint (no failover: the point is to ask that one).
    pub async fn status(&self, endpoint: &str) -> Result<pb::StatusResponse, ClientError> {
        let idx = self.endpoint_index(endpoint)?;
        self.call_one(idx, &|ch| async move {
            MaintenanceClient::new(ch)
                .status(pb::StatusRequest {})
                .await
        })
        .await
    }

    /// HashKV of one configured endpoint at `revision` (0 = its current revision).
    pub async fn hash_kv(
        &self,
        endpoint: &str,
        revision: i64,
    ) -> Result<pb::HashKvResponse, ClientError> {
        let idx = self.endpoint_index(endpoint)?;
        self.call_one(idx, &|ch| async move {
            MaintenanceClient::new(ch)
                .hash_kv(pb::HashKvRequest { revision })
                .await
        })
        .await
    }

    /// Hash of the whole store of one configured endpoint.
    pub async fn hash(&self, endpoint: &str) -> Result<pb::HashResponse, ClientError> {
        let idx = self.endpoint_index(endpoint)?;
        self.call_one(idx, &|ch| async move {
            MaintenanceClient::new(ch).hash(pb::HashRequest {}).await
        })
        .await
    }

    /// Defragments one configured endpoint's database.
    pub async fn defragment(&self, endpoint: &str) -> Result<pb::DefragmentResponse, ClientError> {
        let idx = self.endpoint_index(endpoint)?;
        self.call_one(idx, &|ch| async move {
            MaintenanceClient::new(ch)
                .defragment(pb::DefragmentRequest {})
                .await
        })
        .await
    }

    /// Asks `endpoint` (which must be the leader) to hand leadership to `target`.
    pub async fn move_leader(
        &self,
        endpoint: &str,
        target: u64,
    ) -> Result<pb::MoveLeaderResponse, ClientError> {
        let idx = self.endpoint_index(endpoint)?;
        self.call_one(idx, &|ch| async move {
            MaintenanceClient::new(ch)
                .move_leader(pb::MoveLeaderRequest { target_id: target })
                .await
        })
        .await
    }

    /// Lists (GET), raises (ACTIVATE) or clears (DEACTIVATE) alarms.
    pub async fn alarm(&self, req: pb::AlarmRequest) -> Result<pb::AlarmResponse, ClientError> {
        let retry = if req.action == pb::alarm_request::AlarmAction::Get as i32 {
            Retry::Idempotent
        } else {
            // Raising or clearing the same alarm twice is harmless, but keep the rule
            // for requests that go through Raft.
            Retry::OnlyIfNotSent
        };
        self.with_failover(retry, |ch| async move {
            MaintenanceClient::new(ch).alarm(req).await
        })
        .await
    }

    /// Opens a Snapshot stream on the first endpoint that answers. The request timeout
    /// covers opening it, not reading it.
    pub async fn snapshot(&self) -> Result<tonic::Streaming<pb::SnapshotResponse>, ClientError> {
        self.with_failover(Retry::Idempotent, |ch| async move {
            MaintenanceClient::new(ch)
                .snapshot(pb::SnapshotRequest {})
                .await
        })
        .await
    }

    /// Health of one configured endpoint, the way etcdctl checks it: a linearizable
    /// read of the key `health` must commit. Returns how long it took.
    pub async fn health(&self, endpoint: &str) -> Result<Duration, ClientError> {
        let idx = self.endpoint_index(endpoint)?;
        let started = Instant::now();
        let req = pb::RangeRequest {
            key: b"health".to_vec(),
            ..Default::default()
        };
        match self
            .call_one(idx, &|ch| {
                let req = req.clone();
                async move { kv_client(ch).range(req).await }
            })
            .await
        {
            Ok(_) => Ok(started.elapsed()),
            // A permission error still proves the cluster committed the read.
            Err(ClientError::Rpc {
                code: tonic::Code::PermissionDenied,
                ..
            }) => Ok(started.elapsed()),
            Err(e) => Err(e),
        }
    }

    /// Opens a watch stream with one watcher, on the first reachable endpoint.
    pub async fn watch(&self, opts: WatchOptions) -> Result<Watcher, ClientError> {
        let n = self.inner.endpoints.len();
        let start = self.inner.current.load(Ordering::Relaxed);
        let mut last = None;
        for i in 0..n {
            let idx = (start + i) % n;
            match watch::open(self, idx, &opts).await {
                Ok(w) => return Ok(w),
                Err(e) if e.is_retryable() => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("at least one endpoint"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_endpoint_forms() {
        assert_eq!(
            endpoint_uri("127.0.0.1:2379", false).unwrap(),
            "http://127.0.0.1:2379"
        );
        assert_eq!(endpoint_uri("http://h:1", false).unwrap(), "http://h:1");
        assert_eq!(endpoint_uri("https://h:1", false).unwrap(), "https://h:1");
        // A CA file makes every endpoint a TLS one.
        assert_eq!(endpoint_uri("h:1", true).unwrap(), "https://h:1");
        assert_eq!(endpoint_uri("http://h:1", true).unwrap(), "https://h:1");
        assert!(endpoint_uri("", false).is_err());
        assert!(Client::connect(ClientConfig {
            endpoints: vec![],
            ..Default::default()
        })
        .is_err());
    }

    #[tokio::test]
    async fn client_fails_over_from_refused_endpoint_and_reports_connect_errors() {
        // Nothing listens on these ports (bound then dropped), so both refuse.
        let a = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let b = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let client = Client::connect(ClientConfig {
            endpoints: vec![a.to_string(), b.to_string()],
            dial_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
            ..Default::default()
        })
        .unwrap();
        let err = client
            .put(pb::PutRequest {
                key: b"k".to_vec(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(err.was_not_sent(), "{err:?}");
        assert!(
            err.to_string().contains(&b.to_string()),
            "last endpoint tried reported: {err}"
        );
    }

    /// An HTTP/2 server that answers every connection with its SETTINGS and a GOAWAY
    /// naming stream 0 as the last it processed (so it processed none), then reads
    /// and discards until the client hangs up. Returns its address and a count of
    /// the connections it took.
    async fn go_away_server() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    // Frame header: length (3 bytes), type, flags, stream id (4 bytes).
                    let settings = [0, 0, 0, 0x4, 0, 0, 0, 0, 0];
                    let go_away = [
                        0, 0, 8, 0x7, 0, 0, 0, 0, 0, // GOAWAY on stream 0, 8 bytes:
                        0, 0, 0, 0, // last stream id 0,
                        0, 0, 0, 0, // NO_ERROR.
                    ];
                    let _ = sock.write_all(&settings).await;
                    let _ = sock.write_all(&go_away).await;
                    let mut buf = [0u8; 4096];
                    while matches!(sock.read(&mut buf).await, Ok(n) if n > 0) {}
                });
            }
        });
        (addr, accepted)
    }

    #[tokio::test]
    async fn a_request_refused_by_go_away_is_unsent_and_fails_over() {
        let (closing, accepted) = go_away_server().await;
        let put = pb::PutRequest {
            key: b"k".to_vec(),
            ..Default::default()
        };
        let config = |endpoints: Vec<String>| ClientConfig {
            endpoints,
            dial_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            ..Default::default()
        };
        let alone = Client::connect(config(vec![closing.to_string()])).unwrap();
        let err = alone.put(put.clone()).await.unwrap_err();
        assert!(
            matches!(err, ClientError::Refused { .. }),
            "a GOAWAY before the request is a refusal: {err:?}"
        );
        assert!(err.was_not_sent() && err.is_retryable(), "{err:?}");

        // A write refused that way goes on to the next endpoint (which refuses the
        // connection, so the error names it).
        let refusing = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let before = accepted.load(Ordering::SeqCst);
        let both =
            Client::connect(config(vec![closing.to_string(), refusing.to_string()])).unwrap();
        let err = both.put(put).await.unwrap_err();
        assert!(
            accepted.load(Ordering::SeqCst) > before,
            "the closing endpoint was tried"
        );
        assert!(
            err.to_string().contains(&refusing.to_string()),
            "failed over to the next endpoint: {err}"
        );
    }
}
