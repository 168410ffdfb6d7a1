//! The client API: gRPC services wire-compatible with etcd v3.
//!
//! Turns requests into proposals (writes) or local reads (after a ReadIndex unless the
//! caller asked for a serializable read), validates sizes and shapes with etcd's limits
//! and error texts, and stamps every response header. Calls [`crate::raft`],
//! [`crate::kv`] and [`crate::lease`]; one file per service (`concurrency` holds what
//! Lock and Election share).

mod auth;
mod cluster;
pub(crate) mod concurrency;
mod election;
mod fault;
mod gate;
pub mod gateway;
pub mod http;
mod kv;
mod lease;
mod lock;
mod maintenance;
mod mesh;
pub mod proxy;
mod watch;

use std::sync::Arc;
use std::time::Duration;

use tonic::{Code, Status};

pub use auth::{AuthApi, Caller, TokenCatchUp};
pub use cluster::ClusterApi;
pub use election::ElectionApi;
pub use fault::FaultInjectionApi;
pub use gate::CorruptGate;
pub use kv::KvApi;
pub use lease::LeaseApi;
pub use lock::LockApi;
pub use maintenance::MaintenanceApi;
pub use mesh::MeshApi;
pub use watch::WatchApi;

use crate::kv::{KvError, KvStore, StoreError};
use crate::lease::Lessor;
use crate::proto::etcdserverpb::ResponseHeader;
use crate::raft::{NodeHandle, ProposeError};

/// etcd's default limit on one request (`--max-request-bytes`).
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1536 * 1024;
/// Largest response sent, as etcd's gRPC server (math.MaxInt32): a Range or Txn whose
/// answer would be larger is refused; ask for less with a limit or a smaller range.
pub const MAX_RESPONSE_BYTES: usize = i32::MAX as usize;
/// etcd's default limit on operations in one txn (`--max-txn-ops`).
pub const DEFAULT_MAX_TXN_OPS: usize = 128;
/// gRPC messages may exceed the request limit by this much before the transport
/// itself refuses them (as etcd allows), so the API can answer with etcd's own error.
pub const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;
pub use crate::{ETCD_API_VERSION, ETCD_CLUSTER_VERSION};

/// Limits applied to client requests.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_request_bytes: usize,
    pub max_txn_ops: usize,
    /// How often a watcher that asked for progress notifications gets one when idle.
    pub progress_notify_interval: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_txn_ops: DEFAULT_MAX_TXN_OPS,
            progress_notify_interval: Duration::from_secs(600),
        }
    }
}

/// What every service needs. Cheap to clone.
#[derive(Clone)]
pub struct ApiContext {
    pub node: NodeHandle,
    pub kv: Arc<KvStore>,
    pub lessor: Arc<Lessor>,
    pub limits: Limits,
    pub db_path: std::path::PathBuf,
    /// The database handle, for its file size (Status, the space quota).
    pub db: Arc<crate::storage::Db>,
    /// `--quota-backend-bytes`: above this file size the member raises NOSPACE.
    pub quota_backend_bytes: u64,
    /// `--min-free-disk-bytes` on the data dir's filesystem.
    pub disk_reserve: Arc<crate::storage::DiskReserve>,
    /// Becomes true when the member starts stopping: requests that wait indefinitely
    /// (Lock, Campaign, Observe, keep-alive streams) end so shutdown need not wait.
    pub stopping: tokio::sync::watch::Receiver<bool>,
    /// Watchers open on this member (`etcd_debugging_mvcc_watcher_total`).
    pub watchers: crate::metrics::Gauge,
    /// How to reach another member's client API (plain or TLS) when forwarding.
    pub dialer: crate::tls::MemberDialer,
    /// The scheme of peer URLs in answers: `https` when the mesh is encrypted with a
    /// key, `http` when it runs without one.
    pub peer_scheme: &'static str,
}

impl ApiContext {
    /// A response header at `revision`.
    pub fn header(&self, revision: i64) -> Option<ResponseHeader> {
        let s = &self.node.status;
        Some(ResponseHeader {
            cluster_id: s.cluster_id,
            member_id: s.member_id,
            revision,
            raft_term: s.term(),
        })
    }

    /// Fills in a header the state machine left empty or partial.
    pub fn stamp(&self, header: &mut Option<ResponseHeader>, revision: i64) {
        let rev = header.as_ref().map_or(0, |h| h.revision).max(revision);
        *header = self.header(rev);
    }

    /// Refuses a write that adds data while the disk is nearly full, with etcd's
    /// NOSPACE error; it succeeds again by itself once space returns.
    /// [`crate::storage::DiskReserve`] decides when the filesystem is asked again.
    /// The reserve keeps the disk from filling under the Raft log's own commits: a
    /// failed commit takes the member out of Raft until it has reopened its database
    /// (a failed fsync is never retried on the same handle).
    pub fn check_disk_space(&self, request: &impl prost::Message) -> Result<(), Status> {
        let reserve = &self.disk_reserve;
        let check = reserve.admit(request.encoded_len());
        if check.changed {
            let dir = reserve.dir().display();
            if check.low {
                tracing::warn!(%dir, reserve = reserve.min_free(), "disk nearly full: refusing writes that add data");
            } else {
                tracing::info!(%dir, "disk space is back: accepting writes again");
            }
        }
        if check.low {
            return Err(kv_status(KvError::NoSpace));
        }
        Ok(())
    }

    /// Resolves once the member is stopping.
    pub async fn stopped(&self) {
        let mut rx = self.stopping.clone();
        // An error means the server is gone: stopped as well.
        let _ = rx.wait_for(|stopping| *stopping).await;
    }

    /// Waits until a read served locally afterwards is linearizable.
    pub async fn linearize(&self) -> Result<(), Status> {
        self.node.read_index().await.map_err(propose_status)
    }

    /// Refuses a response larger than [`MAX_RESPONSE_BYTES`] with the error etcd's
    /// gRPC server gives (ResourceExhausted), rather than sending it.
    pub fn check_response_size(&self, msg: &impl prost::Message) -> Result<(), Status> {
        response_fits(msg.encoded_len(), MAX_RESPONSE_BYTES)
    }

    pub fn check_size(&self, msg: &impl prost::Message) -> Result<(), Status> {
        if msg.encoded_len() > self.limits.max_request_bytes {
            return Err(Status::invalid_argument(ERR_REQUEST_TOO_LARGE));
        }
        Ok(())
    }
}

/// A response of `len` bytes under a limit of `max`, or gRPC's refusal (etcd's text).
fn response_fits(len: usize, max: usize) -> Result<(), Status> {
    if len > max {
        return Err(Status::resource_exhausted(format!(
            "grpc: trying to send message larger than max ({len} vs. {max})"
        )));
    }
    Ok(())
}

#[cfg(test)]
#[test]
fn a_response_over_the_limit_gets_grpcs_text() {
    assert!(response_fits(10, 10).is_ok());
    let e = response_fits(11, 10).unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert_eq!(
        e.message(),
        "grpc: trying to send message larger than max (11 vs. 10)"
    );
}

/// etcd's answer to a request over `--max-request-bytes`.
pub const ERR_REQUEST_TOO_LARGE: &str = "etcdserver: request is too large";
/// etcd's text for a member that found its data corrupt (with code DataLoss).
pub const ERR_CORRUPT: &str = "etcdserver: corrupt cluster";

/// The gRPC status etcd returns for a state-machine refusal.
pub fn kv_status(e: KvError) -> Status {
    // Every variant named: a new one must be given its code here.
    let code = match &e {
        KvError::Compacted { .. } | KvError::FutureRevision => Code::OutOfRange,
        KvError::NoSpace => Code::ResourceExhausted,
        KvError::Store(StoreError::Corrupt { .. }) => {
            tracing::error!("{e}: refusing to serve it");
            return Status::data_loss(ERR_CORRUPT);
        }
        KvError::Store(
            StoreError::Io(_)
            | StoreError::Engine(_)
            | StoreError::Decode(_)
            | StoreError::File(_)
            | StoreError::Inconsistent(_),
        ) => Code::Internal,
        KvError::LeaseNotFound => Code::NotFound,
        KvError::LeaseExists => Code::FailedPrecondition,
        KvError::LeaseTtlTooLarge => Code::OutOfRange,
        KvError::RootUserNotExist
        | KvError::RootRoleNotExist
        | KvError::UserAlreadyExist
        | KvError::UserNotFound
        | KvError::RoleAlreadyExist
        | KvError::RoleNotFound
        | KvError::RoleNotGranted
        | KvError::PermissionNotGranted
        | KvError::AuthNotEnabled => Code::FailedPrecondition,
        KvError::PermissionDenied => Code::PermissionDenied,
        KvError::InvalidAuthToken => Code::Unauthenticated,
        KvError::KeyNotFound
        | KvError::EmptyKey
        | KvError::ValueProvided
        | KvError::LeaseProvided
        | KvError::InvalidSortOption
        | KvError::TooManyOps
        | KvError::DuplicateKey
        | KvError::InvalidAlarm
        | KvError::AuthOldRevision
        | KvError::UserEmpty
        | KvError::RoleEmpty
        | KvError::AuthFailed
        | KvError::PermissionNotGiven
        | KvError::InvalidAuthMgmt => Code::InvalidArgument,
        // Internal signals that callers handle before answering; one that escapes is
        // a bug in this server, not the client's mistake.
        KvError::WriteInReadOnlyTxn | KvError::Stale => Code::Internal,
    };
    Status::new(code, e.to_string())
}

/// The gRPC status etcd returns when a request could not go through Raft.
pub fn propose_status(e: ProposeError) -> Status {
    match e {
        ProposeError::Kv(k) => kv_status(k),
        ProposeError::BadLeaderTransferee => Status::failed_precondition(e.to_string()),
        ProposeError::Defragment(_) => Status::internal(e.to_string()),
        ProposeError::NoLeader
        | ProposeError::Timeout
        | ProposeError::TimeoutLeaderFail
        | ProposeError::LeaderChanged
        | ProposeError::LeaderTransferTimeout
        | ProposeError::Stopped
        | ProposeError::NotLeader
        | ProposeError::NotEnoughStarted
        | ProposeError::ChangeInProgress
        | ProposeError::LearnerNotReady
        | ProposeError::Membership(_) => Status::unavailable(e.to_string()),
    }
}

/// An apply result of the wrong kind for the request: a bug, reported as such.
pub(crate) fn unexpected(kind: crate::raft::AppliedKind) -> Status {
    Status::internal(format!("unexpected apply result {kind:?}"))
}

/// Set on a request a member forwards to the leader, so it is never forwarded twice.
pub(crate) const FORWARDED: &str = "meshd-forwarded";

/// `msg` as a request to the leader: marked forwarded, carrying the caller's auth token
/// (the leader checks the caller again: tokens are known to every member).
pub(crate) fn forwarded<T>(
    msg: T,
    token: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
) -> tonic::Request<T> {
    let mut out = tonic::Request::new(msg);
    out.metadata_mut()
        .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    if let Some(token) = token {
        out.metadata_mut().insert(auth::TOKEN_METADATA, token);
    }
    out
}

/// The caller's auth token, to forward with its request (as `token`, whichever header
/// the caller used: `token`, or `Authorization` from the JSON gateway).
pub(crate) fn caller_token(
    md: &tonic::metadata::MetadataMap,
) -> Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> {
    md.get(auth::TOKEN_METADATA)
        .or_else(|| md.get("authorization"))
        .cloned()
}

/// The client URL member `id` published (none until it has published its attributes).
pub(crate) fn client_url_of(kv: &KvStore, id: u64) -> Result<Option<String>, Status> {
    Ok(kv
        .members()
        .map_err(kv_status)?
        .into_iter()
        .find(|m| m.id == id)
        .and_then(|m| m.client_urls.into_iter().next()))
}

pub(crate) fn require_key(key: &[u8]) -> Result<(), Status> {
    if key.is_empty() {
        return Err(Status::invalid_argument("etcdserver: key is not provided"));
    }
    Ok(())
}
