//! Who a data dir belongs to: member name, member ID, cluster ID and cluster token,
//! written once when the member is created and checked at every start.

use std::path::Path;

use redb::TableDefinition;

use super::{db_err, StorageError};

const IDENTITY: TableDefinition<&str, &str> = TableDefinition::new("meta_identity");

/// The identity recorded in a data dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub member_id: u64,
    pub cluster_id: u64,
    pub cluster_token: String,
}

impl Identity {
    /// Reads the stored identity; `None` for a data dir that was never initialised.
    pub fn load(db: &super::Db) -> Result<Option<Identity>, StorageError> {
        let rtx = db.begin_read().map_err(db_err)?;
        let table = match rtx.open_table(IDENTITY) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(db_err(e)),
        };
        let get = |k: &str| -> Result<Option<String>, StorageError> {
            Ok(table.get(k).map_err(db_err)?.map(|v| v.value().to_string()))
        };
        let (Some(name), Some(member), Some(cluster), Some(token)) = (
            get("name")?,
            get("member_id")?,
            get("cluster_id")?,
            get("cluster_token")?,
        ) else {
            return Ok(None);
        };
        let parse = |what: &'static str, s: &str| {
            u64::from_str_radix(s, 16).map_err(|e| StorageError::decode(what, e))
        };
        Ok(Some(Identity {
            name,
            member_id: parse("member id", &member)?,
            cluster_id: parse("cluster id", &cluster)?,
            cluster_token: token,
        }))
    }

    /// Records the identity inside `txn` (the transaction that bootstraps the member).
    pub(super) fn store(&self, txn: &redb::WriteTransaction) -> Result<(), StorageError> {
        let mut t = txn.open_table(IDENTITY).map_err(db_err)?;
        t.insert("name", self.name.as_str()).map_err(db_err)?;
        t.insert("member_id", format!("{:x}", self.member_id).as_str())
            .map_err(db_err)?;
        t.insert("cluster_id", format!("{:x}", self.cluster_id).as_str())
            .map_err(db_err)?;
        t.insert("cluster_token", self.cluster_token.as_str())
            .map_err(db_err)?;
        Ok(())
    }

    /// Refuses a data dir created for another member name or another cluster.
    pub fn check(&self, dir: &Path, expected: &Identity) -> Result<(), StorageError> {
        let wrong = |found: String, expected: String| StorageError::WrongOwner {
            path: dir.to_path_buf(),
            found,
            expected,
        };
        if self.name != expected.name {
            return Err(wrong(
                format!("member '{}'", self.name),
                format!("member '{}'", expected.name),
            ));
        }
        if self.cluster_token != expected.cluster_token || self.cluster_id != expected.cluster_id {
            return Err(wrong(
                format!(
                    "cluster {:x} (token '{}')",
                    self.cluster_id, self.cluster_token
                ),
                format!(
                    "cluster {:x} (token '{}', from --initial-cluster)",
                    expected.cluster_id, expected.cluster_token
                ),
            ));
        }
        Ok(())
    }
}

/// FNV-1a: a stable 64-bit hash for deriving member and cluster IDs that every member
/// computes identically from the same `--initial-cluster`.
pub fn stable_id(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.iter().chain(std::iter::once(&0xffu8)) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    // Raft reserves 0 for "no node".
    h.max(1)
}
