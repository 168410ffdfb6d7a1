//! mesh-core: everything a meshd node is made of.
pub mod api;
pub mod client;
pub mod kv;
pub mod raft;
pub mod server;
pub mod storage;

/// Generated wire types: the etcd v3 API (`etcdserverpb`, `mvccpb`) and meshd's own
/// records (`meshpb`).
pub mod proto {
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
    pub mod meshpb {
        tonic::include_proto!("meshpb");
    }
}
