//! Who a member is: the IDs every initial member derives from the same flags, the
//! bootstrap of a new cluster or the check of an existing data dir, and discovery over
//! the mesh for a node that joins.

use super::*;

/// The identity of this member and the initial member list, as every initial member
/// computes them from `--initial-cluster` and `--initial-cluster-token` (or, without
/// `--initial-cluster`, a single-member cluster of this member at `advertise_mesh`).
pub(super) fn initial_identity(
    cfg: &ServerConfig,
    advertise_mesh: &str,
) -> Result<(Identity, Vec<MemberRecord>), ServerError> {
    let token = &cfg.initial_cluster_token;
    let initial: Vec<(String, String)> = match &cfg.initial_cluster {
        Some(list) => list.clone(),
        None => vec![(cfg.name.clone(), advertise_mesh.to_string())],
    };
    let mut seen = std::collections::HashSet::new();
    for (name, _) in &initial {
        if !seen.insert(name) {
            return Err(ServerError::Config(format!(
                "--initial-cluster names '{name}' twice"
            )));
        }
    }
    let Some((_, my_addr)) = initial.iter().find(|(n, _)| *n == cfg.name) else {
        return Err(ServerError::Config(format!(
            "--initial-cluster does not include this member's name '{}'",
            cfg.name
        )));
    };
    let members: Vec<MemberRecord> = initial
        .iter()
        .map(|(name, addr)| voter(member_id(token, name, addr), name, addr))
        .collect();
    let identity = new_identity(cfg, member_id(token, &cfg.name, my_addr), &members);
    Ok((identity, members))
}

pub(crate) fn voter(id: u64, name: &str, mesh_addr: &str) -> MemberRecord {
    MemberRecord {
        id,
        name: name.to_string(),
        peer_urls: vec![mesh_addr.to_string()],
        client_urls: vec![],
        is_learner: false,
    }
}

/// The identity of member `me` of a new cluster whose initial voters are `members`.
pub(super) fn new_identity(cfg: &ServerConfig, me: u64, members: &[MemberRecord]) -> Identity {
    let token = &cfg.initial_cluster_token;
    let ids: Vec<u64> = members.iter().map(|m| m.id).collect();
    Identity {
        name: cfg.name.clone(),
        member_id: me,
        cluster_id: cluster_id(token, &ids),
        cluster_token: token.clone(),
    }
}

/// Creates the member on a fresh data dir from `--initial-cluster` (or as a single
/// node), or checks that the identity `stored` in an existing one belongs to this
/// member and cluster.
pub(super) fn bootstrap_or_check(
    cfg: &ServerConfig,
    stored: Option<Identity>,
    kv: &KvStore,
    log: &RaftLog,
    advertise_mesh: &str,
) -> Result<Identity, ServerError> {
    let (expected, members) = initial_identity(cfg, advertise_mesh)?;
    if let Some(stored) = stored {
        if cfg.initial_cluster.is_some() {
            stored.check(&cfg.data_dir, &expected)?;
        } else if stored.name != cfg.name {
            return Err(StorageError::WrongOwner {
                path: cfg.data_dir.clone(),
                found: format!("member '{}'", stored.name),
                expected: format!("member '{}'", cfg.name),
            }
            .into());
        }
        return Ok(stored);
    }
    create_member(cfg, kv, log, &expected, &members)?;
    Ok(expected)
}

/// An empty node without `--initial-cluster`: forms a new cluster with its peers
/// (`--bootstrap-expect`) or waits until the leader adds it.
pub(super) async fn discover(
    cfg: &ServerConfig,
    mesh: &Mesh,
    meta: &LocalMeta,
    join: &JoinChannel,
    kv: &KvStore,
    log: &RaftLog,
    peer_name: u64,
) -> Result<Identity, ServerError> {
    let outcome = match cfg.bootstrap_expect {
        Some(n) => bootstrap::await_agreement(mesh, meta, n).await,
        None => Outcome::Join,
    };
    match outcome {
        Outcome::Form(found) => {
            let members: Vec<MemberRecord> = found
                .iter()
                .map(|(id, name, addr)| voter(*id, name, addr))
                .collect();
            let identity = new_identity(cfg, peer_name, &members);
            create_member(cfg, kv, log, &identity, &members)?;
            Ok(identity)
        }
        Outcome::Join => {
            info!("waiting for the cluster leader to add this node");
            let w = join.await_welcome(&cfg.initial_cluster_token).await;
            join_member(cfg, kv, log, w.member_id, w.cluster_id)
        }
    }
}

/// Refuses to initialise a data dir that holds data without an identity.
pub(super) fn check_empty(
    cfg: &ServerConfig,
    kv: &KvStore,
    log: &RaftLog,
) -> Result<(), ServerError> {
    if kv.applied_index() != 0 || log.last_index() != 0 {
        return Err(StorageError::Corrupt {
            path: cfg.data_dir.clone(),
            detail: "it holds data but no member identity".into(),
        }
        .into());
    }
    Ok(())
}

/// Records a new member in `batch`: its identity, the initial voters and member table.
///
/// The initial configuration is a snapshot at index 1, term 1 (as raft-rs's examples
/// bootstrap): a member added later has an empty log, needs index 1, and so receives a
/// snapshot that carries the whole configuration and state.
pub(crate) fn write_bootstrap(
    batch: &mut ApplyBatch<'_>,
    log: &RaftLog,
    identity: &Identity,
    members: &[MemberRecord],
) -> Result<(), ServerError> {
    batch.side()?.put_identity(identity)?;
    let meta = raft::prelude::SnapshotMetadata {
        index: 1,
        term: 1,
        conf_state: Some(raft::prelude::ConfState {
            voters: members.iter().map(|m| m.id).collect(),
            ..Default::default()
        }),
    };
    log.apply_snapshot(&batch.side()?, &meta)?;
    batch.set_applied_index(1);
    for m in members {
        batch.put_member(m)?;
    }
    Ok(())
}

/// Initialises a fresh data dir as a member of a new cluster.
pub(super) fn create_member(
    cfg: &ServerConfig,
    kv: &KvStore,
    log: &RaftLog,
    identity: &Identity,
    members: &[MemberRecord],
) -> Result<(), ServerError> {
    check_empty(cfg, kv, log)?;
    let mut batch = kv.begin()?;
    write_bootstrap(&mut batch, log, identity, members)?;
    batch.commit(true)?;
    log.sync()?;
    info!(members = members.len(), "bootstrapped a new cluster member");
    Ok(())
}

/// Initialises a fresh data dir as a member the leader just added: no configuration
/// yet, it arrives with the leader's snapshot.
pub(super) fn join_member(
    cfg: &ServerConfig,
    kv: &KvStore,
    log: &RaftLog,
    member_id: u64,
    cluster_id: u64,
) -> Result<Identity, ServerError> {
    check_empty(cfg, kv, log)?;
    let identity = Identity {
        name: cfg.name.clone(),
        member_id,
        cluster_id,
        cluster_token: cfg.initial_cluster_token.clone(),
    };
    let mut batch = kv.begin()?;
    batch.side()?.put_identity(&identity)?;
    batch.commit(true)?;
    Ok(identity)
}
