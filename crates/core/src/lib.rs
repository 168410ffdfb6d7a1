//! mesh-core: everything a meshd member is made of.
//!
//! A Raft-replicated, durable MVCC key-value store whose client API is wire-compatible
//! with etcd v3. A write flows `api` → `raft` (proposal, Ready loop, one fdatasync per
//! Ready) → `kv` (apply, one revision per write) → watchers and the waiting caller.
//!
//! # Layout
//! - [`mesh`]: the gossip mesh: peers, encrypted connections, topology, routes, channels.
//! - [`crdt`]: convergent counters gossiped over mesh channels.
//! - [`storage`]: the redb database of a data dir, its identity, the write-ahead log.
//! - [`kv`]: the state machine: MVCC revisions, ranges, txns, compaction, events.
//! - [`lease`]: the lessor: lease deadlines, expiry decided by the leader.
//! - [`raft`]: the driver thread around raft-rs `RawNode`, raft-rs's `Storage` over the
//!   WAL and the keyspace, lease expiry on the leader, and Raft over mesh unicast.
//! - [`compactor`]: auto-compaction (etcd's periodic and revision modes).
//! - [`corruption`]: the periodic HashKV comparison and the CORRUPT alarm.
//! - [`membership`]: Raft membership driven from the mesh: routes, bootstrap-expect,
//!   joining, growth and healing (reachability never changes the voter set by itself).
//! - [`api`]: gRPC services (etcd's KV, Watch, Lease, Cluster, Maintenance, Auth, Lock,
//!   Election; `meshpb` Mesh), the client port's HTTP side and etcd's JSON gateway.
//! - [`metrics`]: Prometheus `/metrics`, `/health`, `/livez`, `/readyz`, `/version`, the
//!   gRPC request counter.
//! - [`server`]: one member wired together, with a graceful stop; snapshot restore.
//! - [`snapshot`]: the snapshot file: etcd's backend database ([`etcd_db`] over the
//!   bbolt format of [`bolt`]) and its SHA-256.
//! - [`tls`]: client-API TLS from etcd-style PEM file options.
//! - [`client`]: the typed client meshctl uses, with endpoint failover.
//! - [`untrusted`]: every decoder of network or disk bytes behind one entry point (fuzzing).
//! - [`proto`]: generated wire types.

/// Where time-based rules (lease and token expiry) read the time: the monotonic clock,
/// or a test's, so the rules are tested without waiting.
pub type Clock = std::sync::Arc<dyn Fn() -> std::time::Instant + Send + Sync>;

/// The monotonic clock.
pub fn system_clock() -> Clock {
    std::sync::Arc::new(std::time::Instant::now)
}

/// The etcd API version meshd speaks, reported by Status and `/version`.
pub const ETCD_API_VERSION: &str = "3.5.0";
/// The cluster version `/version` reports (etcd's major.minor.0).
pub const ETCD_CLUSTER_VERSION: &str = "3.5.0";

pub mod api;
pub mod bolt;
pub mod client;
pub mod codec;
pub mod compactor;
pub mod corruption;
pub mod crc32c;
pub mod crdt;
pub mod etcd_db;
pub mod kv;
pub mod lease;
pub mod membership;
pub mod mesh;
pub mod metrics;
pub mod raft;
pub mod server;
pub mod sim;
pub mod snapshot;
pub mod storage;
pub mod tls;
pub mod untrusted;

/// Generated wire types: the etcd v3 API (`etcdserverpb`, `mvccpb`) and meshd's own
/// records (`meshpb`), and etcd's lock and election services (`v3lockpb`,
/// `v3electionpb`).
pub mod proto {
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
        include!(concat!(env!("OUT_DIR"), "/mvccpb.serde.rs"));
    }
    pub mod authpb {
        tonic::include_proto!("authpb");
        include!(concat!(env!("OUT_DIR"), "/authpb.serde.rs"));
    }
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
        include!(concat!(env!("OUT_DIR"), "/etcdserverpb.serde.rs"));
    }
    pub mod meshpb {
        tonic::include_proto!("meshpb");
    }
    pub mod v3lockpb {
        tonic::include_proto!("v3lockpb");
        include!(concat!(env!("OUT_DIR"), "/v3lockpb.serde.rs"));
    }
    pub mod v3electionpb {
        tonic::include_proto!("v3electionpb");
        include!(concat!(env!("OUT_DIR"), "/v3electionpb.serde.rs"));
    }
}
