//! Executing one request (Put, DeleteRange, Range, Txn) against a view of the store
//! plus an in-memory overlay of the request's own writes. Nothing touches the tables
//! here: the caller flushes the collected changes only if the whole request succeeded,
//! which is what makes a failed request change nothing.
use std::collections::BTreeMap;

use redb::ReadableTable;

use super::index::{Meta, View};
use super::range::{header, in_key_order, shape_range, Interval};
use super::KvError;
use crate::proto::etcdserverpb as pb;
use crate::proto::mvccpb::KeyValue;
use pb::compare::{CompareResult, CompareTarget, TargetUnion};
use pb::request_op::Request;
use pb::response_op::Response;

/// One key change made by a request, in sub-revision order.
#[derive(Clone, Debug)]
pub(crate) struct Change {
    pub tombstone: bool,
    /// For a tombstone: just the key and the delete's revision.
    pub kv: KeyValue,
    /// The lease of the key's live version this change replaces (0: none), as this
    /// request saw it: what the live table holds when the change is stored in order.
    pub prev_lease: i64,
}

impl Change {
    /// The lease the key is attached to after this change (0: none).
    pub(crate) fn new_lease(&self) -> i64 {
        if self.tombstone {
            0
        } else {
            self.kv.lease
        }
    }

    /// Whether storing this change moves the key between leases (`kv_lease_keys`).
    pub(crate) fn moves_lease(&self) -> bool {
        self.prev_lease != self.new_lease()
    }
}

/// Whether a lease exists, for checking the lease of a Put.
pub(crate) trait LeaseLookup {
    fn lease_exists(&self, id: i64) -> Result<bool, KvError>;
}

impl<T: ReadableTable<i64, i64>> LeaseLookup for T {
    fn lease_exists(&self, id: i64) -> Result<bool, KvError> {
        Ok(self.get(id)?.is_some())
    }
}

/// The lease table of a write transaction, opened only when a request names a lease.
pub(crate) struct TxnLeases<'txn>(pub &'txn redb::WriteTransaction);

impl LeaseLookup for TxnLeases<'_> {
    fn lease_exists(&self, id: i64) -> Result<bool, KvError> {
        self.0.open_table(super::tables::LEASES)?.lease_exists(id)
    }
}

/// The committed lease table, for a batch without a write transaction: only a batch
/// with one changes leases, so in the others the committed table is the batch's.
pub(crate) struct ReadLeases<'txn>(pub &'txn redb::ReadTransaction);

impl LeaseLookup for ReadLeases<'_> {
    fn lease_exists(&self, id: i64) -> Result<bool, KvError> {
        self.0.open_table(super::tables::LEASES)?.lease_exists(id)
    }
}

pub(crate) struct Exec<'t> {
    view: View<'t>,
    /// The lease table; None for read-only execution (which refuses every write).
    leases: Option<&'t dyn LeaseLookup>,
    /// Revision of the tables before this request.
    base_revision: i64,
    compact_revision: i64,
    /// False for `txn_read`: any write is refused.
    writable: bool,
    /// Keys this request has written: Some(new kv) or None (deleted).
    overlay: BTreeMap<Vec<u8>, Option<KeyValue>>,
    changes: Vec<Change>,
}

impl<'t> Exec<'t> {
    pub(crate) fn new(
        view: View<'t>,
        leases: Option<&'t dyn LeaseLookup>,
        base_revision: i64,
        compact_revision: i64,
        writable: bool,
    ) -> Self {
        Exec {
            view,
            leases,
            base_revision,
            compact_revision,
            writable,
            overlay: BTreeMap::new(),
            changes: Vec::new(),
        }
    }

    pub(crate) fn into_changes(self) -> Vec<Change> {
        self.changes
    }

    /// The revision as seen by this request so far: one more than the base once
    /// anything has been written (all writes of a request share one main revision).
    pub(crate) fn revision(&self) -> i64 {
        self.base_revision + i64::from(!self.changes.is_empty())
    }

    fn write_revision(&self) -> i64 {
        self.base_revision + 1
    }

    /// Run a top-level Txn. etcd decides every (nested) txn branch against the state
    /// before the txn, then executes the chosen path.
    pub(crate) fn txn_top(&mut self, txn: &pb::TxnRequest) -> Result<pb::TxnResponse, KvError> {
        let mut path = Vec::new();
        self.compare_path(txn, &mut path)?;
        let mut resp = self.txn(txn, &mut path.into_iter())?;
        resp.header = Some(header(self.revision()));
        Ok(resp)
    }

    fn op(
        &mut self,
        req: &Request,
        path: &mut std::vec::IntoIter<bool>,
    ) -> Result<Response, KvError> {
        Ok(match req {
            Request::RequestRange(r) => Response::ResponseRange(self.range(r)?),
            Request::RequestPut(r) => Response::ResponsePut(self.put(r)?),
            Request::RequestDeleteRange(r) => Response::ResponseDeleteRange(self.delete_range(r)?),
            Request::RequestTxn(r) => Response::ResponseTxn(self.txn(r, path)?),
        })
    }

    /// The current state of one key, including this request's writes.
    fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, KvError> {
        if let Some(state) = self.overlay.get(key) {
            return Ok(state.clone());
        }
        self.view.get(key)
    }

    /// The current keys in `interval`, including this request's writes, in key order.
    fn current(&self, interval: &Interval) -> Result<Vec<KeyValue>, KvError> {
        let stored = self.view.scan(interval, i64::MAX)?;
        if self.overlay.is_empty() {
            return Ok(stored);
        }
        let mut merged: BTreeMap<Vec<u8>, KeyValue> =
            stored.into_iter().map(|kv| (kv.key.clone(), kv)).collect();
        for (key, state) in self.overlay.iter().filter(|(k, _)| interval.contains(k)) {
            match state {
                Some(kv) => merged.insert(key.clone(), kv.clone()),
                None => merged.remove(key),
            };
        }
        Ok(merged.into_values().collect())
    }

    /// The keys in `interval` as of `rev` (≤ 0: current).
    fn read_at(&self, interval: &Interval, rev: i64) -> Result<(Vec<KeyValue>, i64), KvError> {
        let current = self.revision();
        match self.read_revision(rev)? {
            None => Ok((self.current(interval)?, current)),
            // Before this request: its writes are not visible there.
            Some(rev) => Ok((self.view.scan(interval, rev)?, current)),
        }
    }

    /// A read's revision: `None` for the current state (this request's writes
    /// included), else an older revision that is neither compacted nor in the future.
    fn read_revision(&self, rev: i64) -> Result<Option<i64>, KvError> {
        let current = self.revision();
        if rev <= 0 || rev == current {
            return Ok(None);
        }
        if rev > current {
            return Err(KvError::FutureRevision);
        }
        if rev < self.compact_revision {
            return Err(KvError::Compacted {
                compact_revision: self.compact_revision,
            });
        }
        Ok(Some(rev))
    }

    pub(crate) fn range(&self, req: &pb::RangeRequest) -> Result<pb::RangeResponse, KvError> {
        let interval = Interval::new(&req.key, &req.range_end);
        // Count-only and keys-only answers need no value: the key index has every
        // other field, so no record is read (unless this txn wrote, or the keys are
        // sorted by value).
        let by_value = req.sort_target == pb::range_request::SortTarget::Value as i32;
        // A limited range in key order reads only the records it returns (the count
        // still comes from the index).
        if self.overlay.is_empty() && req.limit > 0 && !req.count_only && in_key_order(req) {
            let rev = self.read_revision(req.revision)?.unwrap_or(i64::MAX);
            let limit = usize::try_from(req.limit).unwrap_or(usize::MAX);
            let (kvs, count) = self
                .view
                .scan_first(&interval, rev, limit, !req.keys_only)?;
            return Ok(pb::RangeResponse {
                header: Some(header(self.revision())),
                more: count > req.limit,
                kvs,
                count,
            });
        }
        if self.overlay.is_empty() && (req.count_only || (req.keys_only && !by_value)) {
            let rev = self.read_revision(req.revision)?.unwrap_or(i64::MAX);
            if req.count_only {
                return Ok(pb::RangeResponse {
                    header: Some(header(self.revision())),
                    kvs: Vec::new(),
                    more: false,
                    count: self.view.count(&interval, rev)?,
                });
            }
            let kvs = self.view.scan_keys(&interval, rev)?;
            return Ok(shape_range(kvs, req, self.revision()));
        }
        let (kvs, _) = self.read_at(&interval, req.revision)?;
        Ok(shape_range(kvs, req, self.revision()))
    }

    fn ensure_writable(&self) -> Result<(), KvError> {
        if self.writable {
            Ok(())
        } else {
            Err(KvError::WriteInReadOnlyTxn)
        }
    }

    fn record(&mut self, tombstone: bool, kv: KeyValue, prev_lease: i64) {
        let state = (!tombstone).then(|| kv.clone());
        self.overlay.insert(kv.key.clone(), state);
        self.changes.push(Change {
            tombstone,
            kv,
            prev_lease,
        });
    }

    /// What a put needs of the current version of `key`, including this request's
    /// writes, without reading the stored record.
    fn meta(&self, key: &[u8]) -> Result<Option<Meta>, KvError> {
        if let Some(state) = self.overlay.get(key) {
            return Ok(state.as_ref().map(Meta::of));
        }
        self.view.meta(key)
    }

    pub(crate) fn put(&mut self, req: &pb::PutRequest) -> Result<pb::PutResponse, KvError> {
        self.ensure_writable()?;
        // The whole previous record only when the request asks for it or keeps its
        // value; otherwise the key index has what a put needs.
        let (meta, prev) = if req.prev_kv || req.ignore_value {
            let prev = self.get(&req.key)?;
            (prev.as_ref().map(Meta::of), prev)
        } else {
            (self.meta(&req.key)?, None)
        };
        if meta.is_none() && (req.ignore_value || req.ignore_lease) {
            return Err(KvError::KeyNotFound);
        }
        let lease = match (&meta, req.ignore_lease) {
            (Some(p), true) => p.lease,
            _ => req.lease,
        };
        if lease != 0 && !req.ignore_lease {
            let exists = match self.leases {
                Some(leases) => leases.lease_exists(lease)?,
                None => false,
            };
            if !exists {
                return Err(KvError::LeaseNotFound);
            }
        }
        let rev = self.write_revision();
        let kv = KeyValue {
            key: req.key.clone(),
            create_revision: meta.map_or(rev, |p| p.create_revision),
            mod_revision: rev,
            version: meta.map_or(0, |p| p.version) + 1,
            value: match (&prev, req.ignore_value) {
                (Some(p), true) => p.value.clone(),
                _ => req.value.clone(),
            },
            lease,
        };
        let prev_lease = meta.map_or(0, |p| p.lease);
        self.record(false, kv, prev_lease);
        Ok(pb::PutResponse {
            header: Some(header(rev)),
            prev_kv: prev.filter(|_| req.prev_kv),
        })
    }

    pub(crate) fn delete_range(
        &mut self,
        req: &pb::DeleteRangeRequest,
    ) -> Result<pb::DeleteRangeResponse, KvError> {
        self.ensure_writable()?;
        let victims = self.current(&Interval::new(&req.key, &req.range_end))?;
        let rev = self.write_revision();
        for kv in &victims {
            let tombstone = KeyValue {
                key: kv.key.clone(),
                mod_revision: rev,
                ..Default::default()
            };
            self.record(true, tombstone, kv.lease);
        }
        Ok(pb::DeleteRangeResponse {
            header: Some(header(self.revision())),
            deleted: victims.len() as i64,
            prev_kvs: if req.prev_kv { victims } else { Vec::new() },
        })
    }

    /// Evaluate the compares of `txn` and of every nested txn on the chosen branches,
    /// in execution (pre-)order, against the current state.
    fn compare_path(&self, txn: &pb::TxnRequest, path: &mut Vec<bool>) -> Result<(), KvError> {
        let mut succeeded = true;
        for c in &txn.compare {
            if !self.compare_holds(c)? {
                succeeded = false;
                break;
            }
        }
        path.push(succeeded);
        for op in branch(txn, succeeded) {
            if let Some(Request::RequestTxn(nested)) = &op.request {
                self.compare_path(nested, path)?;
            }
        }
        Ok(())
    }

    fn compare_holds(&self, c: &pb::Compare) -> Result<bool, KvError> {
        let Ok(target) = CompareTarget::try_from(c.target) else {
            return Ok(false);
        };
        let kvs = self.current(&Interval::new(&c.key, &c.range_end))?;
        if kvs.is_empty() {
            // A missing key has no value to compare (etcd: always false); its
            // version, revisions and lease compare as 0.
            return Ok(
                target != CompareTarget::Value && compare_kv(c, target, &KeyValue::default())
            );
        }
        Ok(kvs.iter().all(|kv| compare_kv(c, target, kv)))
    }

    fn txn(
        &mut self,
        req: &pb::TxnRequest,
        path: &mut std::vec::IntoIter<bool>,
    ) -> Result<pb::TxnResponse, KvError> {
        // The path holds one decision per txn on the executed path, so it cannot run
        // out; failing the compare would still be deterministic if it did.
        let succeeded = path.next().unwrap_or(false);
        let mut responses = Vec::new();
        for op in branch(req, succeeded) {
            let Some(request) = &op.request else {
                // etcd rejects empty ops at the API; skipping keeps apply total.
                continue;
            };
            let response = self.op(request, path)?;
            responses.push(pb::ResponseOp {
                response: Some(response),
            });
        }
        Ok(pb::TxnResponse {
            header: Some(header(self.revision())),
            succeeded,
            responses,
        })
    }
}

fn branch(txn: &pb::TxnRequest, succeeded: bool) -> &[pb::RequestOp] {
    if succeeded {
        &txn.success
    } else {
        &txn.failure
    }
}

fn compare_kv(c: &pb::Compare, target: CompareTarget, kv: &KeyValue) -> bool {
    // An operand of another kind than the target compares as 0 / empty, as etcd's
    // protobuf getters do.
    let int = |actual: i64| {
        let operand = match (target, &c.target_union) {
            (CompareTarget::Version, Some(TargetUnion::Version(v)))
            | (CompareTarget::Create, Some(TargetUnion::CreateRevision(v)))
            | (CompareTarget::Mod, Some(TargetUnion::ModRevision(v)))
            | (CompareTarget::Lease, Some(TargetUnion::Lease(v))) => *v,
            _ => 0,
        };
        actual.cmp(&operand)
    };
    let ord = match target {
        CompareTarget::Version => int(kv.version),
        CompareTarget::Create => int(kv.create_revision),
        CompareTarget::Mod => int(kv.mod_revision),
        CompareTarget::Lease => int(kv.lease),
        CompareTarget::Value => match &c.target_union {
            Some(TargetUnion::Value(v)) => kv.value.as_slice().cmp(v.as_slice()),
            _ => kv.value.as_slice().cmp(&[]),
        },
    };
    match CompareResult::try_from(c.result) {
        Ok(CompareResult::Equal) => ord.is_eq(),
        Ok(CompareResult::NotEqual) => ord.is_ne(),
        Ok(CompareResult::Greater) => ord.is_gt(),
        Ok(CompareResult::Less) => ord.is_lt(),
        // etcd treats an unknown result as true.
        Err(_) => true,
    }
}
