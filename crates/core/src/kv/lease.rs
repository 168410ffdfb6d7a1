//! The replicated half of leases: which leases exist with what granted TTL, and which
//! live keys each one holds. Expiry deadlines are not here: they are the lessor's
//! (`crate::lease`), which proposes a revoke when one passes.
use redb::ReadableTable;

use super::history::WriteTables;
use super::tables::{LEASES, LEASE_KEYS};
use super::{ApplyBatch, KvError, KvStore};
use crate::proto::etcdserverpb as pb;
use crate::proto::meshpb::LeaseRecord;

/// etcd's largest lease TTL in seconds (`MaxLeaseTTL`).
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;

impl KvStore {
    /// Every lease with its granted TTL, in ID order.
    pub fn leases(&self) -> Result<Vec<LeaseRecord>, KvError> {
        let txn = self.db.begin_read()?;
        export(&txn.open_table(LEASES)?)
    }

    /// The granted TTL of lease `id`, if it exists.
    pub fn lease(&self, id: i64) -> Result<Option<i64>, KvError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(LEASES)?;
        let ttl = table.get(id)?.map(|g| g.value());
        Ok(ttl)
    }

    /// The live keys attached to lease `id`, in key order.
    pub fn lease_keys(&self, id: i64) -> Result<Vec<Vec<u8>>, KvError> {
        let txn = self.db.begin_read()?;
        attached_keys(&txn.open_table(LEASE_KEYS)?, id)
    }
}

impl ApplyBatch<'_> {
    /// Creates lease `id`; the caller has chosen the ID and bounded the TTL.
    pub fn lease_grant(&mut self, id: i64, ttl: i64) -> Result<(), KvError> {
        if ttl > MAX_LEASE_TTL {
            return Err(KvError::LeaseTtlTooLarge);
        }
        let mut leases = self.write_txn()?.open_table(LEASES)?;
        if leases.get(id)?.is_some() {
            return Err(KvError::LeaseExists);
        }
        leases.insert(id, ttl)?;
        Ok(())
    }

    /// Deletes lease `id` and, in one revision, every key attached to it. Returns the
    /// response header's revision.
    pub fn lease_revoke(&mut self, id: i64) -> Result<pb::LeaseRevokeResponse, KvError> {
        let keys = {
            let tables = WriteTables::open(self.write_txn()?)?;
            if tables.leases()?.get(id)?.is_none() {
                return Err(KvError::LeaseNotFound);
            }
            attached_keys(&tables.lease_keys()?, id)?
        };
        self.apply(|exec| {
            for key in keys {
                exec.delete_range(&pb::DeleteRangeRequest {
                    key,
                    ..Default::default()
                })?;
            }
            Ok(())
        })?;
        self.write_txn()?.open_table(LEASES)?.remove(id)?;
        Ok(pb::LeaseRevokeResponse {
            header: Some(super::range::header(self.meta.current_revision)),
        })
    }

    /// The granted TTL of lease `id` as of this batch.
    pub fn lease_ttl(&self, id: i64) -> Result<Option<i64>, KvError> {
        with_batch_table!(self, LEASES, |table| Ok(table.get(id)?.map(|g| g.value())))
    }
}

fn attached_keys<T>(table: &T, id: i64) -> Result<Vec<Vec<u8>>, KvError>
where
    T: ReadableTable<(i64, &'static [u8]), ()>,
{
    let mut keys = Vec::new();
    for entry in table.range::<(i64, &[u8])>((id, &[][..])..)? {
        let (k, _) = entry?;
        let (lease, key) = k.value();
        if lease != id {
            break;
        }
        keys.push(key.to_vec());
    }
    Ok(keys)
}

/// Every lease, for a snapshot.
pub(crate) fn export<T: ReadableTable<i64, i64>>(table: &T) -> Result<Vec<LeaseRecord>, KvError> {
    let mut out = Vec::new();
    for entry in table.range::<i64>(..)? {
        let (id, ttl) = entry?;
        out.push(LeaseRecord {
            id: id.value(),
            ttl: ttl.value(),
        });
    }
    Ok(out)
}
