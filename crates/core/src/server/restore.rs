//! `snapshot restore`: a new member's data dir from a snapshot file.

use super::*;

/// What [`restore`] created.
#[derive(Debug, Clone)]
pub struct Restored {
    pub member_id: u64,
    pub cluster_id: u64,
    /// The store revision the snapshot was taken at.
    pub revision: i64,
}

/// Creates the data dir of a member of a NEW cluster from a snapshot file (etcd's
/// `snapshot restore`): the keyspace and its history come from the snapshot; member
/// and cluster IDs, the member table and the voters are those `Server::start` computes
/// for the same name, `--initial-cluster`, token and mesh address, so every member of
/// the new cluster restored from the same file starts as one cluster. The source's
/// alarms are dropped (they name the old cluster's members). Refuses a non-empty data
/// dir and a snapshot whose checksum does not match (or is missing, unless
/// `skip_hash_check`, etcd's `--skip-hash-check`).
pub fn restore(
    cfg: &ServerConfig,
    snapshot_file: &[u8],
    skip_hash_check: bool,
) -> Result<Restored, ServerError> {
    let mut snap = crate::snapshot::decode_with(snapshot_file, skip_hash_check)?;
    let dir = &cfg.data_dir;
    let not_empty = std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some());
    if not_empty {
        return Err(ServerError::Config(format!(
            "data dir {} exists and is not empty",
            dir.display()
        )));
    }
    let advertise_mesh = cfg
        .advertise_mesh
        .clone()
        .unwrap_or_else(|| advertised(cfg.listen_mesh));
    let (identity, members) = initial_identity(cfg, &advertise_mesh)?;
    let db = storage::open_database(dir)?;
    let kv = Arc::new(KvStore::open(db.clone())?);
    let log = RaftLog::load(&db, kv.clone())?;
    snap.members = members.clone();
    snap.alarms.clear();
    let mut batch = kv.begin()?;
    batch.restore(&snap)?;
    write_bootstrap(&mut batch, &log, &identity, &members)?;
    batch.commit(true)?;
    log.sync()?;
    info!(
        dir = %dir.display(),
        revision = snap.revision,
        member = format_args!("{:x}", identity.member_id),
        "restored a snapshot into a new member data dir"
    );
    Ok(Restored {
        member_id: identity.member_id,
        cluster_id: identity.cluster_id,
        revision: snap.revision,
    })
}
