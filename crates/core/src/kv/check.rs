//! Request-shape validation with etcd's rules and error texts, pure functions the API
//! layer runs before proposing: empty keys, ignore_value/ignore_lease misuse, sort
//! options, and a Txn's operation count and duplicate keys.
use std::collections::HashSet;

use super::range::Interval;
use super::KvError;
use crate::proto::etcdserverpb as pb;
use pb::range_request::{SortOrder, SortTarget};
use pb::request_op::Request;

pub fn validate_range(req: &pb::RangeRequest) -> Result<(), KvError> {
    if req.key.is_empty() {
        return Err(KvError::EmptyKey);
    }
    if SortOrder::try_from(req.sort_order).is_err()
        || SortTarget::try_from(req.sort_target).is_err()
    {
        return Err(KvError::InvalidSortOption);
    }
    Ok(())
}

pub fn validate_put(req: &pb::PutRequest) -> Result<(), KvError> {
    if req.key.is_empty() {
        return Err(KvError::EmptyKey);
    }
    if req.ignore_value && !req.value.is_empty() {
        return Err(KvError::ValueProvided);
    }
    if req.ignore_lease && req.lease != 0 {
        return Err(KvError::LeaseProvided);
    }
    Ok(())
}

pub fn validate_delete_range(req: &pb::DeleteRangeRequest) -> Result<(), KvError> {
    if req.key.is_empty() {
        return Err(KvError::EmptyKey);
    }
    Ok(())
}

/// etcd's `checkTxnRequest` followed by `checkIntervals` on both branches.
///
/// The op budget shrinks with nesting: a nested txn may use what its parent's
/// largest part (compares, success or failure) left of `max_ops`.
pub fn check_txn(req: &pb::TxnRequest, max_ops: usize) -> Result<(), KvError> {
    check_shape(req, max_ops)?;
    check_duplicates(&req.success)?;
    check_duplicates(&req.failure)?;
    Ok(())
}

fn check_shape(req: &pb::TxnRequest, max_ops: usize) -> Result<(), KvError> {
    let ops = req
        .compare
        .len()
        .max(req.success.len())
        .max(req.failure.len());
    if ops > max_ops {
        return Err(KvError::TooManyOps);
    }
    if req.compare.iter().any(|c| c.key.is_empty()) {
        return Err(KvError::EmptyKey);
    }
    for op in req.success.iter().chain(&req.failure) {
        match &op.request {
            Some(Request::RequestRange(r)) => validate_range(r)?,
            Some(Request::RequestPut(r)) => validate_put(r)?,
            Some(Request::RequestDeleteRange(r)) => validate_delete_range(r)?,
            Some(Request::RequestTxn(r)) => check_shape(r, max_ops - ops)?,
            // etcd answers an empty op this way.
            None => return Err(KvError::KeyNotFound),
        }
    }
    Ok(())
}

/// The keys put and the intervals deleted by one branch, nested txns included.
#[derive(Default)]
struct Writes {
    puts: HashSet<Vec<u8>>,
    deletes: Vec<Interval>,
}

impl Writes {
    fn deleted(&self, key: &[u8]) -> bool {
        self.deletes.iter().any(|d| d.contains(key))
    }

    /// Add a put, refusing a key already put or deleted in this branch.
    fn put(&mut self, key: &[u8]) -> Result<(), KvError> {
        if self.puts.contains(key) || self.deleted(key) {
            return Err(KvError::DuplicateKey);
        }
        self.puts.insert(key.to_vec());
        Ok(())
    }
}

/// etcd's `checkIntervals`: within one branch no key may be put twice, or put and
/// deleted; deleting a range twice is fine, and the two branches of a nested txn may
/// put the same key because only one of them runs.
fn check_duplicates(ops: &[pb::RequestOp]) -> Result<Writes, KvError> {
    let mut writes = Writes::default();
    for op in ops {
        if let Some(Request::RequestDeleteRange(d)) = &op.request {
            writes.deletes.push(Interval::new(&d.key, &d.range_end));
        }
    }
    for op in ops {
        let Some(Request::RequestTxn(nested)) = &op.request else {
            continue;
        };
        let then = check_duplicates(&nested.success)?;
        let otherwise = check_duplicates(&nested.failure)?;
        for key in &then.puts {
            writes.put(key)?;
        }
        for key in &otherwise.puts {
            if !then.puts.contains(key) {
                writes.put(key)?;
            } else if writes.deleted(key) {
                return Err(KvError::DuplicateKey);
            }
        }
        writes.deletes.extend(then.deletes);
        writes.deletes.extend(otherwise.deletes);
    }
    for op in ops {
        if let Some(Request::RequestPut(p)) = &op.request {
            writes.put(&p.key)?;
        }
    }
    Ok(writes)
}

/// Whether a Txn can write on any branch (if not, it can be served as a local read).
pub fn is_read_only(req: &pb::TxnRequest) -> bool {
    req.success
        .iter()
        .chain(&req.failure)
        .all(|op| match &op.request {
            Some(Request::RequestPut(_)) | Some(Request::RequestDeleteRange(_)) => false,
            Some(Request::RequestTxn(nested)) => is_read_only(nested),
            Some(Request::RequestRange(_)) | None => true,
        })
}
