//! The replicated state machine: MVCC revisions over redb tables.
//! (Interface contract; the implementation lands on the `kv` branch.)
use std::sync::Arc;

use crate::proto::etcdserverpb as pb;
use crate::proto::meshpb::{MemberRecord, StoreSnapshot};
use crate::proto::mvccpb;

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted { compact_revision: i64 },
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRevision,
    #[error("etcdserver: key not found")]
    KeyNotFound,
    #[error("storage: {0}")]
    Storage(String),
}

pub struct KvStore;
pub fn check_txn(_req: &pb::TxnRequest, _max_ops: usize) -> Result<(), KvError> { todo!() }
pub struct ApplyBatch<'a>(std::marker::PhantomData<&'a ()>);

impl KvStore {
    pub fn open(_db: Arc<redb::Database>) -> Result<KvStore, KvError> { todo!() }
    pub fn applied_index(&self) -> u64 { todo!() }
    pub fn current_revision(&self) -> i64 { todo!() }
    pub fn compact_revision(&self) -> i64 { todo!() }
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<i64> { todo!() }
    pub fn begin(&self) -> Result<ApplyBatch<'_>, KvError> { todo!() }
    pub fn range(&self, _req: &pb::RangeRequest) -> Result<pb::RangeResponse, KvError> { todo!() }
    pub fn txn_read(&self, _req: &pb::TxnRequest) -> Result<pb::TxnResponse, KvError> { todo!() }
    pub fn events(&self, _start: i64, _end: i64, _key: &[u8], _range_end: &[u8], _prev_kv: bool, _limit: usize) -> Result<Vec<mvccpb::Event>, KvError> { todo!() }
    pub fn members(&self) -> Result<Vec<MemberRecord>, KvError> { todo!() }
    pub fn snapshot(&self) -> Result<(u64, StoreSnapshot), KvError> { todo!() }
    pub fn hash_kv(&self, _rev: i64) -> Result<(u32, i64, i64), KvError> { todo!() }
}

impl<'a> ApplyBatch<'a> {
    pub fn write_txn(&self) -> &redb::WriteTransaction { todo!() }
    pub fn put(&mut self, _req: &pb::PutRequest) -> Result<pb::PutResponse, KvError> { todo!() }
    pub fn delete_range(&mut self, _req: &pb::DeleteRangeRequest) -> Result<pb::DeleteRangeResponse, KvError> { todo!() }
    pub fn txn(&mut self, _req: &pb::TxnRequest) -> Result<pb::TxnResponse, KvError> { todo!() }
    pub fn compact(&mut self, _rev: i64) -> Result<(), KvError> { todo!() }
    pub fn member(&self, _id: u64) -> Result<Option<MemberRecord>, KvError> { todo!() }
    pub fn put_member(&mut self, _m: &MemberRecord) -> Result<(), KvError> { todo!() }
    pub fn remove_member(&mut self, _id: u64) -> Result<(), KvError> { todo!() }
    pub fn restore(&mut self, _snap: &StoreSnapshot) -> Result<(), KvError> { todo!() }
    pub fn set_applied_index(&mut self, _index: u64) { todo!() }
    pub fn revision(&self) -> i64 { todo!() }
    pub fn commit(self, _durable: bool) -> Result<(), KvError> { todo!() }
}
