//! Growth and healing, run by the leader: welcome empty server nodes as learners,
//! promote a learner once it has been caught up and reachable for a stabilization
//! time (up to the target voter count), and remove a member only after it has been
//! unreachable for the dead-voter timeout (a voter never below a quorum of the
//! target).
//!
//! It only ever proposes ordinary membership changes, one at a time, through the same
//! checks as the Cluster API; mesh reachability alone changes nothing.
//!
//! The decisions are [`Planner::plan`], a state machine over a [`View`] of what the
//! leader knows and the time it is given; [`Autopilot::run`] gathers the view, carries
//! out the actions and tells the planner how a removal went.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::join::JoinChannel;
use super::{nodes, token_hash, Node};
use crate::kv::KvStore;
use crate::mesh::Mesh;
use crate::mesh::PeerName;
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

/// What the leader knows when autopilot looks: the nodes the mesh shows (itself
/// included), the member table, and (with growth on) Raft's replication progress.
pub struct View<'a> {
    pub me: u64,
    pub cluster_id: u64,
    pub token_hash: u64,
    pub members: &'a [MemberRecord],
    pub seen: &'a [Node],
    pub progress: &'a [PeerProgress],
}

/// What autopilot does after a look, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Tell an empty node which member ID it is (added by MemberAdd or just now).
    Welcome { peer: PeerName, member_id: u64 },
    /// Tell a node still claiming a removed member ID that it was removed.
    NotifyRemoved { peer: PeerName },
    /// Add an empty server node as a learner, then welcome it as `member.id`.
    AddLearner {
        peer: PeerName,
        member: MemberRecord,
    },
    /// Remove a voter unreachable for the dead-voter timeout; report the result with
    /// [`Planner::removal_done`].
    Remove(u64),
    /// Promote a learner caught up and reachable for the stabilization time.
    Promote(u64),
}

/// Autopilot's decisions and the two timers they keep per member.
pub struct Planner {
    cfg: AutopilotConfig,
    ready_since: HashMap<u64, Instant>,
    dead_since: HashMap<u64, Instant>,
}

fn quorum(n: usize) -> usize {
    n / 2 + 1
}

impl Planner {
    pub fn new(cfg: AutopilotConfig) -> Planner {
        Planner {
            cfg,
            ready_since: HashMap::new(),
            dead_since: HashMap::new(),
        }
    }

    /// This member does not lead (or is not running): the timers start over.
    pub fn not_leading(&mut self) {
        self.ready_since.clear();
        self.dead_since.clear();
    }

    /// A removal went through: its timer is done.
    pub fn removal_done(&mut self, id: u64) {
        self.dead_since.remove(&id);
    }

    /// The actions to take now. At most one membership change (add, remove or
    /// promote), after any welcomes and removal notices. `fresh_id` draws a new
    /// member ID when an empty node's own one is taken.
    pub fn plan(
        &mut self,
        now: Instant,
        view: &View<'_>,
        fresh_id: &mut dyn FnMut() -> u64,
    ) -> Vec<Action> {
        let mut actions = self.welcome(view, fresh_id);
        if matches!(actions.last(), Some(Action::AddLearner { .. }))
            || !self.cfg.growth
            || view.progress.is_empty()
        {
            return actions;
        }
        if let Some(id) = self.heal(now, view) {
            actions.push(Action::Remove(id));
        } else if let Some(id) = self.promote(now, view) {
            actions.push(Action::Promote(id));
        }
        actions
    }

    fn welcome(&self, view: &View<'_>, fresh_id: &mut dyn FnMut() -> u64) -> Vec<Action> {
        let mut actions = Vec::new();
        for n in view.seen.iter().filter(|n| !n.peer.is_self) {
            match n.state() {
                State::Empty if n.meta.server && n.meta.token_hash == view.token_hash => {
                    if let Some(m) = view
                        .members
                        .iter()
                        .find(|m| m.peer_urls.contains(&n.meta.mesh_addr))
                    {
                        // Only a member that never started (added by MemberAdd) may be
                        // taken by an empty node: one that ran had a log and votes that
                        // an empty data dir no longer remembers.
                        if m.client_urls.is_empty() {
                            actions.push(Action::Welcome {
                                peer: n.peer.name,
                                member_id: m.id,
                            });
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
                    let taken = |id: u64| id == 0 || view.members.iter().any(|m| m.id == id);
                    let mut id = n.meta.member_id;
                    while taken(id) {
                        id = fresh_id();
                    }
                    actions.push(Action::AddLearner {
                        peer: n.peer.name,
                        member: MemberRecord {
                            id,
                            name: n.meta.name.clone(),
                            peer_urls: vec![n.meta.mesh_addr.clone()],
                            client_urls: vec![n.meta.client_url.clone()],
                            is_learner: true,
                        },
                    });
                    return actions;
                }
                State::Member
                    if n.meta.cluster_id == view.cluster_id
                        && !view.members.iter().any(|m| m.id == n.meta.member_id) =>
                {
                    actions.push(Action::NotifyRemoved { peer: n.peer.name });
                }
                _ => {}
            }
        }
        actions
    }

    /// One member unreachable for the dead-voter timeout: a voter if the remaining
    /// voters are still a quorum of the target, a learner always (it holds no vote,
    /// and a dead one would otherwise stay in the member table for good, as Consul's
    /// dead-server cleanup also removes non-voters).
    fn heal(&mut self, now: Instant, view: &View<'_>) -> Option<u64> {
        let voters = view.progress.iter().filter(|p| !p.learner).count();
        self.dead_since
            .retain(|id, _| view.progress.iter().any(|p| p.id == *id));
        for p in view.progress {
            if p.id == view.me || p.recent_active || reachable(view, p.id) {
                self.dead_since.remove(&p.id);
                continue;
            }
            let since = *self.dead_since.entry(p.id).or_insert(now);
            let dead_for = now.saturating_duration_since(since);
            if dead_for < self.cfg.dead_voter_timeout
                || (!p.learner && voters - 1 < quorum(self.cfg.voters))
            {
                continue;
            }
            let what = if p.learner { "a learner" } else { "a voter" };
            warn!(
                member = format_args!("{:x}", p.id),
                ?dead_for,
                "removing {what} unreachable for longer than the dead-voter timeout"
            );
            return Some(p.id);
        }
        None
    }

    /// One learner caught up and reachable for the stabilization time, while there
    /// are fewer voters than the target.
    fn promote(&mut self, now: Instant, view: &View<'_>) -> Option<u64> {
        let voters = view.progress.iter().filter(|p| !p.learner).count();
        let learners: Vec<&PeerProgress> = view.progress.iter().filter(|p| p.learner).collect();
        self.ready_since
            .retain(|id, _| learners.iter().any(|p| p.id == *id));
        for p in learners {
            let caught_up = (p.matched as f64) >= (p.leader_last_index as f64) * 0.9;
            if !(caught_up && p.recent_active && reachable(view, p.id)) {
                self.ready_since.remove(&p.id);
                continue;
            }
            let since = *self.ready_since.entry(p.id).or_insert(now);
            if voters >= self.cfg.voters
                || now.saturating_duration_since(since) < self.cfg.stabilization
            {
                continue;
            }
            info!(
                member = format_args!("{:x}", p.id),
                "promoting a caught-up learner to voter"
            );
            return Some(p.id);
        }
        None
    }
}

/// The member is a node of our cluster the mesh reaches (or this node).
fn reachable(view: &View<'_>, id: u64) -> bool {
    view.seen.iter().any(|n| {
        n.meta.member_id == id
            && n.meta.cluster_id == view.cluster_id
            && n.state() == State::Member
            && (n.peer.is_self || n.peer.reachable)
    })
}

pub struct Autopilot {
    pub cfg: AutopilotConfig,
    pub mesh: Arc<Mesh>,
    pub node: NodeHandle,
    pub kv: Arc<KvStore>,
    pub join: Arc<JoinChannel>,
    pub token: String,
    pub clock: crate::Clock,
}

impl Autopilot {
    pub async fn run(self) {
        let mut planner = Planner::new(self.cfg.clone());
        let token_hash = token_hash(&self.token);
        loop {
            tokio::time::sleep(self.cfg.interval).await;
            let st = &self.node.status;
            if st.leader() != st.member_id || !st.is_running() {
                planner.not_leading();
                continue;
            }
            let seen = nodes(&self.mesh);
            let Ok(members) = self.kv.members() else {
                continue;
            };
            let progress = if self.cfg.growth {
                self.node.progress().await.unwrap_or_default()
            } else {
                Vec::new()
            };
            let view = View {
                me: st.member_id,
                cluster_id: st.cluster_id,
                token_hash,
                members: &members,
                seen: &seen,
                progress: &progress,
            };
            for action in planner.plan((self.clock)(), &view, &mut rand::random::<u64>) {
                self.carry_out(action, &mut planner).await;
            }
        }
    }

    async fn carry_out(&self, action: Action, planner: &mut Planner) {
        match action {
            Action::Welcome { peer, member_id } => self.send_welcome(peer, member_id),
            Action::NotifyRemoved { peer } => {
                let notice = JoinWelcome {
                    cluster_id: self.node.status.cluster_id,
                    member_id: 0,
                    cluster_token: String::new(),
                };
                let _ = self.join.send(peer, &notice);
            }
            Action::AddLearner { peer, member } => {
                let (id, name) = (member.id, member.name.clone());
                info!(
                    node = %name,
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
                    Ok(_) => self.send_welcome(peer, id),
                    Err(e) => warn!(node = %name, "could not add learner: {e}"),
                }
            }
            Action::Remove(id) => match self.node.change_members(MemberChange::Remove(id)).await {
                Ok(_) => planner.removal_done(id),
                Err(e) => warn!(member = format_args!("{id:x}"), "removal refused: {e}"),
            },
            Action::Promote(id) => {
                if let Err(e) = self.node.change_members(MemberChange::Promote(id)).await {
                    warn!(member = format_args!("{id:x}"), "promotion refused: {e}");
                }
            }
        }
    }

    fn send_welcome(&self, peer: PeerName, member_id: u64) {
        let w = JoinWelcome {
            cluster_id: self.node.status.cluster_id,
            member_id,
            cluster_token: self.token.clone(),
        };
        if let Err(e) = self.join.send(peer, &w) {
            warn!(peer = format_args!("{peer:x}"), "cannot send welcome: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::test_node;
    use crate::proto::meshpb::NodeMeta;

    const CLUSTER: u64 = 0xc1;
    const TOKEN: u64 = 0x70;
    const ME: u64 = 1;

    /// The defaults (growth on, 3 voters, 300 s dead-voter timeout, 10 s
    /// stabilization), which the timings below are written against.
    fn cfg() -> AutopilotConfig {
        AutopilotConfig::default()
    }

    fn member_node(id: u64) -> Node {
        test_node(
            100 + id,
            NodeMeta {
                name: format!("m{id}"),
                member_id: id,
                cluster_id: CLUSTER,
                server: true,
                state: State::Member as i32,
                mesh_addr: format!("10.0.0.{id}:6783"),
                token_hash: TOKEN,
                ..Default::default()
            },
            id == ME,
        )
    }

    fn empty_node(id: u64) -> Node {
        test_node(
            100 + id,
            NodeMeta {
                name: format!("e{id}"),
                member_id: id,
                server: true,
                state: State::Empty as i32,
                mesh_addr: format!("10.0.0.{id}:6783"),
                client_url: format!("http://10.0.0.{id}:2379"),
                token_hash: TOKEN,
                ..Default::default()
            },
            false,
        )
    }

    fn record(id: u64, started: bool) -> MemberRecord {
        MemberRecord {
            id,
            name: format!("m{id}"),
            peer_urls: vec![format!("10.0.0.{id}:6783")],
            client_urls: if started {
                vec![format!("http://10.0.0.{id}:2379")]
            } else {
                Vec::new()
            },
            is_learner: false,
        }
    }

    fn progress(id: u64, learner: bool, matched: u64, active: bool) -> PeerProgress {
        PeerProgress {
            id,
            learner,
            matched,
            recent_active: active,
            leader_last_index: 100,
        }
    }

    fn plan(
        p: &mut Planner,
        now: Instant,
        seen: &[Node],
        members: &[MemberRecord],
        prog: &[PeerProgress],
    ) -> Vec<Action> {
        let view = View {
            me: ME,
            cluster_id: CLUSTER,
            token_hash: TOKEN,
            members,
            seen,
            progress: prog,
        };
        p.plan(now, &view, &mut || 0xabc)
    }

    #[test]
    fn an_empty_server_node_is_added_as_a_learner_one_per_look() {
        let mut p = Planner::new(cfg());
        let t = Instant::now();
        let mut elsewhere = record(3, true);
        elsewhere.peer_urls = vec!["10.0.1.3:6783".into()];
        let members = [record(1, true), elsewhere];
        // Node 3's ID is taken by a member elsewhere: it gets a fresh one.
        let seen = [member_node(1), empty_node(3), empty_node(4)];
        let prog = [progress(1, false, 100, true)];
        let actions = plan(&mut p, t, &seen, &members, &prog);
        let [Action::AddLearner { peer, member }] = actions.as_slice() else {
            panic!("{actions:?}");
        };
        assert_eq!((*peer, member.id, member.is_learner), (103, 0xabc, true));
        assert_eq!(member.client_urls, ["http://10.0.0.3:2379"]);
    }

    #[test]
    fn without_growth_only_welcomes_and_notices_are_sent() {
        let mut p = Planner::new(AutopilotConfig {
            growth: false,
            ..cfg()
        });
        // 5 was added by MemberAdd (never started), 6 is a started member whose data
        // dir was wiped, 7 is a member node that was removed.
        let members = [record(1, true), record(5, false), record(6, true)];
        let seen = [
            member_node(1),
            empty_node(5),
            empty_node(6),
            member_node(7),
            empty_node(8),
        ];
        let actions = plan(&mut p, Instant::now(), &seen, &members, &[]);
        assert_eq!(
            actions,
            [
                Action::Welcome {
                    peer: 105,
                    member_id: 5
                },
                Action::NotifyRemoved { peer: 107 },
            ]
        );
    }

    #[test]
    fn a_voter_is_removed_only_after_the_timeout_and_above_quorum() {
        let mut p = Planner::new(cfg());
        let t0 = Instant::now();
        let members: Vec<MemberRecord> = (1..=4).map(|i| record(i, true)).collect();
        let seen = [member_node(1), member_node(2), member_node(3)];
        let prog: Vec<PeerProgress> = (1..=4).map(|i| progress(i, false, 100, i != 4)).collect();
        assert!(plan(&mut p, t0, &seen, &members, &prog).is_empty());
        let almost = t0 + Duration::from_secs(299);
        assert!(plan(&mut p, almost, &seen, &members, &prog).is_empty());
        let late = t0 + Duration::from_secs(300);
        assert_eq!(
            plan(&mut p, late, &seen, &members, &prog),
            [Action::Remove(4)]
        );
        // Refused: asked again at the next look. Done: the timer is gone.
        assert_eq!(
            plan(&mut p, late, &seen, &members, &prog),
            [Action::Remove(4)]
        );
        p.removal_done(4);
        assert!(plan(&mut p, late, &seen, &members, &prog).is_empty());

        // Seen again through the mesh: the timer restarts.
        let mut p = Planner::new(cfg());
        plan(&mut p, t0, &seen, &members, &prog);
        let back = [
            member_node(1),
            member_node(2),
            member_node(3),
            member_node(4),
        ];
        plan(
            &mut p,
            t0 + Duration::from_secs(200),
            &back,
            &members,
            &prog,
        );
        assert!(plan(&mut p, late, &seen, &members, &prog).is_empty());

        // With two voters, removing one would leave less than a quorum of the target.
        let mut p = Planner::new(cfg());
        let two = [
            progress(1, false, 100, true),
            progress(4, false, 100, false),
        ];
        plan(&mut p, t0, &seen, &members, &two);
        let never = t0 + Duration::from_secs(3600);
        assert!(plan(&mut p, never, &seen, &members, &two).is_empty());

        // A dead learner is removed after the same timeout, whatever the voter count.
        let mut p = Planner::new(cfg());
        let learner_gone = [
            progress(1, false, 100, true),
            progress(2, false, 100, true),
            progress(4, true, 100, false),
        ];
        plan(&mut p, t0, &seen, &members, &learner_gone);
        assert!(plan(&mut p, almost, &seen, &members, &learner_gone).is_empty());
        assert_eq!(
            plan(&mut p, late, &seen, &members, &learner_gone),
            [Action::Remove(4)]
        );
    }

    #[test]
    fn a_learner_is_promoted_after_stabilizing_up_to_the_target() {
        let mut p = Planner::new(cfg());
        let t0 = Instant::now();
        let members: Vec<MemberRecord> = (1..=3).map(|i| record(i, true)).collect();
        let seen = [member_node(1), member_node(2), member_node(3)];
        let mut prog = vec![
            progress(1, false, 100, true),
            progress(2, false, 100, true),
            progress(3, true, 95, true),
        ];
        assert!(plan(&mut p, t0, &seen, &members, &prog).is_empty());
        let t10 = t0 + Duration::from_secs(10);
        assert_eq!(
            plan(&mut p, t10, &seen, &members, &prog),
            [Action::Promote(3)]
        );
        // Falling behind (under 90 % of the leader's log) restarts the wait.
        prog[2].matched = 80;
        assert!(plan(&mut p, t10, &seen, &members, &prog).is_empty());
        prog[2].matched = 100;
        assert!(plan(&mut p, t10, &seen, &members, &prog).is_empty());
        assert_eq!(
            plan(
                &mut p,
                t10 + Duration::from_secs(10),
                &seen,
                &members,
                &prog
            ),
            [Action::Promote(3)]
        );
        // Losing leadership forgets every timer.
        p.not_leading();
        assert!(plan(
            &mut p,
            t10 + Duration::from_secs(10),
            &seen,
            &members,
            &prog
        )
        .is_empty());
        // At the voter target, learners stay learners.
        let mut full = prog.clone();
        full.push(progress(4, false, 100, true));
        let mut p = Planner::new(cfg());
        plan(&mut p, t0, &seen, &members, &full);
        assert!(plan(&mut p, t0 + Duration::from_secs(60), &seen, &members, &full).is_empty());
    }
}
