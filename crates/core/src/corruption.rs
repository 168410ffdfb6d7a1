//! The corruption check, as etcd's: the leader periodically asks every member for its
//! HashKV at one revision (over the mesh's `hashkv` channel) and raises a CORRUPT alarm
//! naming each member whose hash differs from the majority's, or whose records fail
//! their checksums. A member named by a CORRUPT alarm stops serving data
//! ([`crate::api::CorruptGate`]); unlike etcd, the healthy members keep serving.
//!
//! [`judge`] decides from the answers (pure); [`task`] runs the rounds and keeps
//! [`crate::raft::NodeStatus`] in step with the alarms.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::kv::{KvError, KvStore, StoreError};
use crate::mesh::{GossipChannel, GossipError, Gossiper, Mesh, PeerName};
use crate::proto::etcdserverpb::{alarm_request::AlarmAction, AlarmRequest, AlarmType};
use crate::proto::meshpb::internal_request::Request as Internal;
use crate::proto::meshpb::HashCheck;
use crate::raft::mesh_transport::MemberRoutes;
use crate::raft::NodeHandle;

/// Mesh channel of the corruption check.
pub const HASHKV_CHANNEL: &str = "hashkv";
/// How long the leader waits for the members' answers in one round.
const ANSWER_WAIT: Duration = Duration::from_secs(10);
/// How often a member looks whether a CORRUPT alarm names it.
const ALARM_POLL: Duration = Duration::from_secs(1);

/// What one round found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Members to raise CORRUPT for.
    pub corrupt: Vec<u64>,
    /// The asking member's own hash is the odd one out.
    pub self_corrupt: bool,
    /// Hashes differed but no hash had a majority: nobody can be blamed.
    pub undecided: bool,
}

/// Judges a round: `own` is the asker's `(member, hash, compact_revision)`; `answers`
/// are the members' replies for the same revision. Members that failed a checksum are
/// corrupt. Hashes are compared only between members with the same compact revision;
/// one that differs from a strict majority of those (the asker included) is corrupt.
pub fn judge(own: (u64, u32, i64), answers: &[HashCheck]) -> Verdict {
    let (me, own_hash, own_compact) = own;
    let mut v = Verdict::default();
    let mut hashes: Vec<(u64, u32)> = vec![(me, own_hash)];
    for a in answers {
        if a.corrupt {
            v.corrupt.push(a.member_id);
        } else if a.error.is_empty() && a.compact_revision == own_compact {
            hashes.push((a.member_id, a.hash));
        }
    }
    let mut counts: HashMap<u32, usize> = HashMap::new();
    for (_, h) in &hashes {
        *counts.entry(*h).or_default() += 1;
    }
    if counts.len() <= 1 {
        return v;
    }
    match counts.iter().find(|(_, n)| **n * 2 > hashes.len()) {
        Some((&majority, _)) => {
            for (m, h) in &hashes {
                if *h != majority {
                    if *m == me {
                        v.self_corrupt = true;
                    } else {
                        v.corrupt.push(*m);
                    }
                }
            }
        }
        None => v.undecided = true,
    }
    v.corrupt.sort_unstable();
    v.corrupt.dedup();
    v
}

/// What the check's loop owns. The mesh holds only a [`Receiver`] (a weak reference),
/// so a stopped member's store is not kept open by its mesh.
struct Shared {
    kv: Arc<KvStore>,
    node: NodeHandle,
    routes: Arc<MemberRoutes>,
    channel: OnceLock<Arc<GossipChannel>>,
    /// One hash at a time: it reads the whole history.
    hashing: Arc<AtomicBool>,
    /// The round waiting for answers, if any.
    round: Mutex<Option<(u64, mpsc::Sender<HashCheck>)>>,
}

/// Receives the `hashkv` channel: answers the leader's requests, hands answers to the
/// round in progress (while the check's loop runs).
struct Receiver(std::sync::Weak<Shared>);

impl Gossiper for Receiver {
    fn on_unicast(&self, src: PeerName, msg: &[u8]) -> Result<(), GossipError> {
        match self.0.upgrade() {
            Some(shared) => shared.on_unicast(src, msg),
            None => Ok(()),
        }
    }
}

impl Shared {
    fn on_unicast(&self, src: PeerName, msg: &[u8]) -> Result<(), GossipError> {
        let Ok(m) = <HashCheck as prost::Message>::decode(msg) else {
            warn!(peer = %crate::mesh::peer_name_string(src), "undecodable hash check dropped");
            return Ok(());
        };
        if m.reply {
            // An answer counts only from the peer its member is published on.
            if self.routes.get(m.member_id) != Some(src) {
                return Ok(());
            }
            let round = self.round.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((id, tx)) = round.as_ref() {
                if *id == m.round {
                    let _ = tx.try_send(m);
                }
            }
            return Ok(());
        }
        // Only the leader asks.
        let status = &self.node.status;
        if self.routes.get(status.leader()) != Some(src) {
            debug!(peer = %crate::mesh::peer_name_string(src), "hash check from a non-leader dropped");
            return Ok(());
        }
        let (Some(channel), Ok(rt)) = (
            self.channel.get().cloned(),
            tokio::runtime::Handle::try_current(),
        ) else {
            return Ok(());
        };
        if self.hashing.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let (kv, node, hashing) = (self.kv.clone(), self.node.clone(), self.hashing.clone());
        let member_id = status.member_id;
        rt.spawn(async move {
            let mut reply = HashCheck {
                round: m.round,
                revision: m.revision,
                reply: true,
                member_id,
                ..Default::default()
            };
            match hash_at(&kv, m.revision).await {
                Ok((hash, compact)) => {
                    reply.hash = hash;
                    reply.compact_revision = compact;
                }
                Err(e) => {
                    reply.corrupt = matches!(e, KvError::Store(StoreError::Corrupt { .. }));
                    if reply.corrupt {
                        node.report_corrupt(&e.to_string());
                    }
                    reply.error = e.to_string();
                }
            }
            hashing.store(false, Ordering::Release);
            let _ = channel.send_unicast(src, prost::Message::encode_to_vec(&reply));
        });
        Ok(())
    }
}

/// HashKV at `rev` and the compact revision, off the async threads.
async fn hash_at(kv: &Arc<KvStore>, rev: i64) -> Result<(u32, i64), KvError> {
    let kv = kv.clone();
    tokio::task::spawn_blocking(move || kv.hash_kv(rev))
        .await
        .map_err(|e| KvError::Store(StoreError::Inconsistent(format!("hash task: {e}"))))?
        .map(|(hash, compact, _)| (hash, compact))
}

/// Registers the `hashkv` channel and starts the loop: every `interval` (zero: never)
/// the leader runs a round; every member follows the CORRUPT alarms naming it.
pub fn task(
    mesh: &Mesh,
    kv: Arc<KvStore>,
    node: NodeHandle,
    routes: Arc<MemberRoutes>,
    interval: Duration,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let shared = Arc::new(Shared {
        kv,
        node,
        routes,
        channel: OnceLock::new(),
        hashing: Arc::new(AtomicBool::new(false)),
        round: Mutex::new(None),
    });
    let receiver = Arc::new(Receiver(Arc::downgrade(&shared)));
    let channel = mesh.register(HASHKV_CHANNEL, receiver);
    let _ = shared.channel.set(channel);
    run(shared, interval)
}

async fn run(r: Arc<Shared>, interval: Duration) {
    let status = r.node.status.clone();
    let me = status.member_id;
    let mut next_round = tokio::time::Instant::now() + interval;
    let mut round = rand::random::<u64>();
    loop {
        tokio::time::sleep(ALARM_POLL).await;
        if let Ok(alarms) = r.kv.alarms() {
            status.set_corrupt_alarm(
                alarms
                    .iter()
                    .any(|a| a.member_id == me && a.alarm == AlarmType::Corrupt as i32),
            );
        }
        if interval.is_zero() || tokio::time::Instant::now() < next_round {
            continue;
        }
        next_round = tokio::time::Instant::now() + interval;
        if status.leader() != me || status.is_corrupt() {
            continue;
        }
        round = round.wrapping_add(1);
        check_round(&r, round).await;
    }
}

/// One round, run by the leader.
async fn check_round(r: &Shared, round: u64) {
    let status = &r.node.status;
    let me = status.member_id;
    let rev = r.kv.current_revision();
    let (own_hash, own_compact) = match hash_at(&r.kv, rev).await {
        Ok(x) => x,
        Err(e @ KvError::Store(StoreError::Corrupt { .. })) => {
            r.node.report_corrupt(&e.to_string());
            return;
        }
        Err(e) => {
            debug!("corruption check skipped: {e}");
            return;
        }
    };
    let conf = r.node.log.conf_state();
    let members: HashSet<u64> = conf
        .voters
        .iter()
        .chain(&conf.learners)
        .copied()
        .filter(|m| *m != me)
        .collect();
    let Some(channel) = r.channel.get() else {
        return;
    };
    let (tx, mut rx) = mpsc::channel(members.len().max(1));
    *r.round.lock().unwrap_or_else(|p| p.into_inner()) = Some((round, tx));
    let ask = prost::Message::encode_to_vec(&HashCheck {
        round,
        revision: rev,
        ..Default::default()
    });
    for m in &members {
        if let Some(peer) = r.routes.get(*m) {
            let _ = channel.send_unicast(peer, ask.clone());
        }
    }
    let mut answers: HashMap<u64, HashCheck> = HashMap::new();
    let deadline = tokio::time::Instant::now() + ANSWER_WAIT;
    while answers.len() < members.len() {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(a)) if members.contains(&a.member_id) && a.revision == rev => {
                answers.insert(a.member_id, a);
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    *r.round.lock().unwrap_or_else(|p| p.into_inner()) = None;
    let answers: Vec<HashCheck> = answers.into_values().collect();
    let verdict = judge((me, own_hash, own_compact), &answers);
    if verdict.undecided {
        error!(
            revision = rev,
            "corruption check: members disagree on HashKV and no hash has a majority"
        );
    }
    if verdict.self_corrupt {
        r.node.report_corrupt(&format!(
            "HashKV at revision {rev} differs from the majority of members"
        ));
        return;
    }
    if verdict.corrupt.is_empty() {
        debug!(
            revision = rev,
            members = answers.len() + 1,
            "corruption check passed"
        );
        return;
    }
    let raised: HashSet<u64> =
        r.kv.alarms()
            .unwrap_or_default()
            .iter()
            .filter(|a| a.alarm == AlarmType::Corrupt as i32)
            .map(|a| a.member_id)
            .collect();
    for m in verdict.corrupt.into_iter().filter(|m| !raised.contains(m)) {
        error!(
            member = format_args!("{m:x}"),
            revision = rev,
            "corruption check: member's data differs from the majority's; raising CORRUPT"
        );
        let alarm = AlarmRequest {
            action: AlarmAction::Activate as i32,
            member_id: m,
            alarm: AlarmType::Corrupt as i32,
        };
        match r.node.propose(Internal::Alarm(alarm)).await {
            Ok(_) => info!(member = format_args!("{m:x}"), "CORRUPT alarm raised"),
            Err(e) => warn!("cannot raise the CORRUPT alarm: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(member_id: u64, hash: u32, compact: i64) -> HashCheck {
        HashCheck {
            reply: true,
            member_id,
            hash,
            compact_revision: compact,
            ..Default::default()
        }
    }

    #[test]
    fn the_member_that_differs_from_the_majority_is_named() {
        let same = judge((1, 7, 0), &[answer(2, 7, 0), answer(3, 7, 0)]);
        assert_eq!(same, Verdict::default());
        let v = judge((1, 7, 0), &[answer(2, 9, 0), answer(3, 7, 0)]);
        assert_eq!(v.corrupt, vec![2]);
        assert!(!v.self_corrupt);
        // The asker in the minority names itself.
        let v = judge((1, 5, 0), &[answer(2, 7, 0), answer(3, 7, 0)]);
        assert!(v.self_corrupt && v.corrupt.is_empty());
        // Two members that disagree: nobody can tell which one is wrong.
        let v = judge((1, 5, 0), &[answer(2, 7, 0)]);
        assert!(v.undecided && v.corrupt.is_empty() && !v.self_corrupt);
    }

    #[test]
    fn checksum_failures_count_and_other_compactions_do_not_compare() {
        let corrupt = HashCheck {
            corrupt: true,
            error: "data dir is corrupt".into(),
            ..answer(3, 0, 0)
        };
        let v = judge((1, 7, 0), &[answer(2, 7, 0), corrupt]);
        assert_eq!(v.corrupt, vec![3]);
        // A different compact revision, or no hash (not applied yet), is not compared.
        let behind = HashCheck {
            error: "etcdserver: mvcc: required revision is a future revision".into(),
            ..answer(3, 0, 0)
        };
        let v = judge((1, 7, 0), &[answer(2, 9, 5), behind]);
        assert_eq!(v, Verdict::default());
    }
}
