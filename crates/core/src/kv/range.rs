//! Key intervals with etcd's `range_end` conventions, and shaping a Range result
//! (filters, sort, limit, keys/count only).
use std::cmp::Ordering;
use std::ops::Bound;

use crate::proto::etcdserverpb as pb;
use crate::proto::mvccpb::KeyValue;
use pb::range_request::{SortOrder, SortTarget};

/// The keys selected by a `(key, range_end)` pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Interval {
    /// `range_end` at or before `key`: selects nothing.
    Empty,
    /// Empty `range_end`: exactly `key`.
    Single(Vec<u8>),
    /// `range_end == "\0"`: every key ≥ the start.
    From(Vec<u8>),
    /// Half-open `[key, range_end)`.
    Between(Vec<u8>, Vec<u8>),
}

impl Interval {
    pub(crate) fn new(key: &[u8], range_end: &[u8]) -> Interval {
        match range_end {
            [] => Interval::Single(key.to_vec()),
            // `key == "\0"` too means "all keys", which includes the (invalid) empty key.
            [0] if key == [0] => Interval::From(Vec::new()),
            [0] => Interval::From(key.to_vec()),
            end if end <= key => Interval::Empty,
            end => Interval::Between(key.to_vec(), end.to_vec()),
        }
    }

    pub(crate) fn contains(&self, k: &[u8]) -> bool {
        match self {
            Interval::Empty => false,
            Interval::Single(key) => k == key.as_slice(),
            Interval::From(start) => k >= start.as_slice(),
            Interval::Between(start, end) => k >= start.as_slice() && k < end.as_slice(),
        }
    }

    /// Bounds on the key, or None if nothing can match.
    pub(crate) fn bounds(&self) -> Option<Bounds<&[u8]>> {
        match self {
            Interval::Empty => None,
            Interval::Single(key) => Some((Bound::Included(key), Bound::Included(key))),
            Interval::From(start) => Some((Bound::Included(start), Bound::Unbounded)),
            Interval::Between(start, end) => Some((Bound::Included(start), Bound::Excluded(end))),
        }
    }
}

/// A (lower, upper) pair as `BTreeMap::range` takes it.
pub(crate) type Bounds<K> = (Bound<K>, Bound<K>);

/// Apply a RangeRequest's filters, sort, limit and output options to the key-ordered
/// matches `kvs` read at revision `rev`.
///
/// As in etcd, `count` is the number of keys in the interval before the
/// min/max revision filters and the limit.
pub(crate) fn shape_range(
    mut kvs: Vec<KeyValue>,
    req: &pb::RangeRequest,
    rev: i64,
) -> pb::RangeResponse {
    let count = kvs.len() as i64;
    let within = |v: i64, min: i64, max: i64| (min == 0 || v >= min) && (max == 0 || v <= max);
    kvs.retain(|kv| {
        within(kv.mod_revision, req.min_mod_revision, req.max_mod_revision)
            && within(
                kv.create_revision,
                req.min_create_revision,
                req.max_create_revision,
            )
    });
    sort(&mut kvs, req);
    if req.count_only {
        kvs.clear();
    }
    let more = req.limit > 0 && kvs.len() as i64 > req.limit;
    if more {
        kvs.truncate(req.limit as usize);
    }
    if req.keys_only {
        kvs.iter_mut().for_each(|kv| kv.value.clear());
    }
    pb::RangeResponse {
        header: Some(header(rev)),
        kvs,
        more,
        count,
    }
}

/// Whether `req`'s answer is the first keys in key order: sorted by key ascending, or
/// not sorted, and filtered by no revision.
pub(crate) fn in_key_order(req: &pb::RangeRequest) -> bool {
    let target = SortTarget::try_from(req.sort_target).unwrap_or(SortTarget::Key);
    let order = SortOrder::try_from(req.sort_order).unwrap_or(SortOrder::None);
    target == SortTarget::Key
        && order != SortOrder::Descend
        && [
            req.min_mod_revision,
            req.max_mod_revision,
            req.min_create_revision,
            req.max_create_revision,
        ]
        .iter()
        .all(|&r| r == 0)
}

/// Sort ALL matches (before the limit), following etcd: a NONE order with a
/// non-KEY target means ascending; ascending by key is the scan order already.
fn sort(kvs: &mut [KeyValue], req: &pb::RangeRequest) {
    let target = SortTarget::try_from(req.sort_target).unwrap_or(SortTarget::Key);
    let order = match SortOrder::try_from(req.sort_order).unwrap_or(SortOrder::None) {
        SortOrder::None if target != SortTarget::Key => SortOrder::Ascend,
        order => order,
    };
    let by = |a: &KeyValue, b: &KeyValue| -> Ordering {
        match target {
            SortTarget::Key => a.key.cmp(&b.key),
            SortTarget::Version => a.version.cmp(&b.version),
            SortTarget::Create => a.create_revision.cmp(&b.create_revision),
            SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
            SortTarget::Value => a.value.cmp(&b.value),
        }
    };
    match order {
        SortOrder::None => {}
        SortOrder::Ascend => kvs.sort_by(by),
        SortOrder::Descend => kvs.sort_by(|a, b| by(b, a)),
    }
}

pub(crate) fn header(revision: i64) -> pb::ResponseHeader {
    pb::ResponseHeader {
        revision,
        ..Default::default()
    }
}
