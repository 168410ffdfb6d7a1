//! Growth and healing, run by the leader: welcome empty server nodes as learners,
//! promote a learner once it has been caught up and reachable for a stabilization
//! time (up to the target voter count), and remove a voter only after it has been
//! unreachable for the dead-voter timeout, never below a quorum of the target.
//!
//! It only ever proposes ordinary membership changes, one at a time, through the same
//! checks as the Cluster API; mesh reachability alone changes nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::join::JoinChannel;
use super::{nodes, token_hash, Node};
use crate::kv::KvStore;
use crate::mesh::Mesh;
use crate::proto::meshpb::{node_meta::State, JoinWelcome, MemberRecord};
use crate::raft::{MemberChange, NodeHandle, PeerProgress};

#[derive(Clone, Debug)]
pub struct AutopilotConfig {
    /// Add new server nodes as learners, promote and replace voters automatically.
    pub growth: bool,
    /// Voters to keep (3 or 5).
    pub voters: usize,
    pub dead_voter_timeout: Duration,
    pub stabilization: Duration,
    pub interval: Duration,
}

impl Default for AutopilotConfig {
    fn default() -> Self {
        AutopilotConfig {
            growth: true,
            voters: 3,
            dead_voter_timeout: Duration::from_secs(300),
            stabilization: Duration::from_secs(10),
            interval: Duration::from_secs(1),
        }
    }
}

pub struct Autopilot {
    pub cfg: AutopilotConfig,
    pub mesh: Arc<Mesh>,
    pub node: NodeHandle,
    pub kv: Arc<KvStore>,
    pub join: Arc<JoinChannel>,
    pub token: String,
}

fn quorum(n: usize) -> usize {
    n / 2 + 1
}

impl Autopilot {
    pub async fn run(self) {
        let mut ready_since: HashMap<u64, Instant> = HashMap::new();
        let mut dead_since: HashMap<u64, Instant> = HashMap::new();
        loop {
            tokio::time::sleep(self.cfg.interval).await;
            let st = &self.node.status;
            if st.leader() != st.member_id || !st.is_running() {
                ready_since.clear();
                dead_since.clear();
                continue;
            }
            let seen = nodes(&self.mesh);
            if self.welcome(&seen).await {
                continue;
            }
            if !self.cfg.growth {
                continue;
            }
            let Ok(progress) = self.node.progress().await else {
                continue;
            };
            if progress.is_empty() {
                continue;
            }
            if self.heal(&seen, &progress, &mut dead_since).await {
                continue;
            }
            self.promote(&seen, &progress, &mut ready_since).await;
        }
    }

    fn member_reachable(&self, seen: &[Node], id: u64) -> bool {
        let cluster = self.node.status.cluster_id;
        seen.iter().any(|n| {
            n.meta.member_id == id
                && n.meta.cluster_id == cluster
                && n.state() == State::Member
                && (n.peer.is_self || n.peer.reachable)
        })
    }

    /// Welcomes empty server nodes (adding them as learners when growth is on) and
    /// tells nodes still claiming a removed member ID that they were removed.
    /// Returns true if it proposed a change.
    async fn welcome(&self, seen: &[Node]) -> bool {
        let st = &self.node.status;
        let Ok(members) = self.kv.members() else {
            return false;
        };
        let token = token_hash(&self.token);
        for n in seen.iter().filter(|n| !n.peer.is_self) {
            match n.state() {
                State::Empty if n.meta.server && n.meta.token_hash == token => {
                    if let Some(m) = members
                        .iter()
                        .find(|m| m.peer_urls.contains(&n.meta.mesh_addr))
                    {
                        // Only a member that never started (added by MemberAdd) may be
                        // taken by an empty node: one that ran had a log and votes that
                        // an empty data dir no longer remembers.
                        if m.client_urls.is_empty() {
                            self.send_welcome(n, m.id);
                        } else {
                            warn!(
                                node = %n.meta.name,
                                member = format_args!("{:x}", m.id),
                                "an empty node has the mesh address of a started member; \
                                 remove that member before it can join"
                            );
                        }
                        continue;
                    }
                    if !self.cfg.growth {
                        continue;
                    }
                    let taken = |id: u64| id == 0 || members.iter().any(|m| m.id == id);
                    let mut id = n.meta.member_id;
                    while taken(id) {
                        id = rand::random();
                    }
                    let member = MemberRecord {
                        id,
                        name: n.meta.name.clone(),
                        peer_urls: vec![n.meta.mesh_addr.clone()],
                        client_urls: vec![n.meta.client_url.clone()],
                        is_learner: true,
                    };
                    info!(
                        node = %n.meta.name,
                        member = format_args!("{id:x}"),
                        "adding a new server node as a learner"
                    );
                    match self
                        .node
                        .change_members(MemberChange::Add {
                            member,
                            learner: true,
                        })
                        .await
                    {
                        Ok(_) => self.send_welcome(n, id),
                        Err(e) => warn!(node = %n.meta.name, "could not add learner: {e}"),
                    }
                    return true;
                }
                State::Member
                    if n.meta.cluster_id == st.cluster_id
                        && !members.iter().any(|m| m.id == n.meta.member_id) =>
                {
                    let notice = JoinWelcome {
                        cluster_id: st.cluster_id,
                        member_id: 0,
                        cluster_token: String::new(),
                    };
                    let _ = self.join.send(n.peer.name, &notice);
                }
                _ => {}
            }
        }
        false
    }

    fn send_welcome(&self, n: &Node, member_id: u64) {
        let w = JoinWelcome {
            cluster_id: self.node.status.cluster_id,
            member_id,
            cluster_token: self.token.clone(),
        };
        if let Err(e) = self.join.send(n.peer.name, &w) {
            warn!(node = %n.meta.name, "cannot send welcome: {e}");
        }
    }

    /// Removes one voter that has been unreachable for the dead-voter timeout, if the
    /// remaining voters are still a quorum of the target.
    async fn heal(
        &self,
        seen: &[Node],
        progress: &[PeerProgress],
        dead_since: &mut HashMap<u64, Instant>,
    ) -> bool {
        let me = self.node.status.member_id;
        let voters: Vec<&PeerProgress> = progress.iter().filter(|p| !p.learner).collect();
        dead_since.retain(|id, _| voters.iter().any(|p| p.id == *id));
        for p in &voters {
            if p.id == me || p.recent_active || self.member_reachable(seen, p.id) {
                dead_since.remove(&p.id);
                continue;
            }
            let since = *dead_since.entry(p.id).or_insert_with(Instant::now);
            if since.elapsed() < self.cfg.dead_voter_timeout
                || voters.len() - 1 < quorum(self.cfg.voters)
            {
                continue;
            }
            warn!(
                member = format_args!("{:x}", p.id),
                dead_for = ?since.elapsed(),
                "removing a voter unreachable for longer than the dead-voter timeout"
            );
            match self.node.change_members(MemberChange::Remove(p.id)).await {
                Ok(_) => {
                    dead_since.remove(&p.id);
                }
                Err(e) => warn!(member = format_args!("{:x}", p.id), "removal refused: {e}"),
            }
            return true;
        }
        false
    }

    /// Promotes one learner that has been caught up and reachable for the
    /// stabilization time, while there are fewer voters than the target.
    async fn promote(
        &self,
        seen: &[Node],
        progress: &[PeerProgress],
        ready_since: &mut HashMap<u64, Instant>,
    ) {
        let voters = progress.iter().filter(|p| !p.learner).count();
        let learners: Vec<&PeerProgress> = progress.iter().filter(|p| p.learner).collect();
        ready_since.retain(|id, _| learners.iter().any(|p| p.id == *id));
        for p in learners {
            let caught_up = (p.matched as f64) >= (p.leader_last_index as f64) * 0.9;
            if !(caught_up && p.recent_active && self.member_reachable(seen, p.id)) {
                ready_since.remove(&p.id);
                continue;
            }
            let since = *ready_since.entry(p.id).or_insert_with(Instant::now);
            if voters >= self.cfg.voters || since.elapsed() < self.cfg.stabilization {
                continue;
            }
            info!(
                member = format_args!("{:x}", p.id),
                "promoting a caught-up learner to voter"
            );
            if let Err(e) = self.node.change_members(MemberChange::Promote(p.id)).await {
                warn!(
                    member = format_args!("{:x}", p.id),
                    "promotion refused: {e}"
                );
            }
            return;
        }
    }
}
