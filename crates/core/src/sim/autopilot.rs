//! meshd's autopilot inside a cluster run. The leader runs the autopilot's own
//! planner (`membership::autopilot::Planner`) every 100 ms over what it sees: the
//! nodes of its mesh view (each member publishes meshd's node metadata in its mesh
//! entry), the member table, and Raft's progress. Its actions are carried out as
//! meshd carries them out: one membership change at a time, a welcome after a
//! learner is added.
//!
//! The fault it answers: a member's machine dies for good and an empty server
//! node joins the mesh. Autopilot must remove the dead voter only after the
//! dead-voter timeout and never below a quorum, add the new node as a learner, and
//! promote it once caught up.

use std::time::Duration;

use tokio::sync::oneshot;

use super::{Answer, Member, World, OP_TIMEOUT_MS};
use crate::membership::autopilot::{Action, AutopilotConfig, Planner, View};
use crate::membership::{nodes_of, token_hash};
use crate::mesh::peer_infos;
use crate::proto::meshpb::{node_meta::State, NodeMeta};
use crate::raft::{DriverMsg, MemberChange};

/// How often the leader's autopilot looks, and its timers (short, for a run of
/// seconds; meshd's defaults are 1 s, 300 s and 10 s).
pub(super) fn config(voters: usize) -> AutopilotConfig {
    AutopilotConfig {
        growth: true,
        voters,
        dead_voter_timeout: DEAD_VOTER_TIMEOUT,
        stabilization: Duration::from_millis(300),
        interval: Duration::from_millis(100),
    }
}

/// The dead-voter timeout of a run.
const DEAD_VOTER_TIMEOUT: Duration = Duration::from_millis(4_000);

/// The cluster token every simulated node was given.
pub(super) const TOKEN: &str = "sim";

/// A membership change the autopilot asked for, waiting for its answer.
pub(super) struct InFlight {
    action: Action,
    rx: Answer,
    at: u64,
}

/// The autopilot's state across the run.
pub(super) struct Autopilot {
    planner: Planner,
    /// The member whose planner it is (its timers start over with a new leader).
    leader: Option<usize>,
    in_flight: Option<InFlight>,
    /// Machines that died, and when.
    deaths: Vec<(usize, u64)>,
}

impl Autopilot {
    pub(super) fn new(voters: usize) -> Autopilot {
        Autopilot {
            planner: Planner::new(config(voters)),
            leader: None,
            in_flight: None,
            deaths: Vec::new(),
        }
    }

    /// How long member `i` has been dead, if that is past the dead-voter timeout
    /// and four seconds to act on it.
    pub(super) fn overdue(&self, i: usize, now: u64) -> Option<u64> {
        let (_, at) = self.deaths.iter().find(|(m, _)| *m == i)?;
        let dead_for = now - at;
        (dead_for > DEAD_VOTER_TIMEOUT.as_millis() as u64 + 4_000).then_some(dead_for)
    }
}

impl World {
    /// The node metadata member `i` publishes in its mesh entry.
    pub(super) fn node_meta(&self, i: usize) -> NodeMeta {
        let m = &self.members[i];
        let member = m.node.is_some();
        NodeMeta {
            name: format!("m{}", i + 1),
            member_id: if member { m.id } else { i as u64 + 1 },
            cluster_id: if member { super::CLUSTER_ID } else { 0 },
            client_url: format!("http://sim:{}", i + 1),
            server: true,
            state: if member { State::Member } else { State::Empty } as i32,
            mesh_addr: format!("sim:{}", i + 1),
            token_hash: token_hash(TOKEN),
            ..Default::default()
        }
    }

    /// A member's machine dies for good, and a new empty server node joins the mesh
    /// in its place (at the next slot).
    pub(super) fn machine_dies(&mut self, i: usize) {
        self.stop(i, true, 0);
        self.members[i].restart_at = None;
        self.members[i].dead = true;
        self.autopilot.deaths.push((i, self.now));
        let slot = self.new_slot();
        self.members[slot].spare = true;
        self.mesh_start(slot);
        self.trace.add(&[0xdead_dead, i as u64, slot as u64]);
    }

    /// A fresh machine (empty disk) at the next slot, not running.
    pub(super) fn new_slot(&mut self) -> usize {
        let slot = self.members.len();
        let plants = self.members[0].disk.plants();
        let m = Member::fresh(slot, plants, &mut self.rng);
        self.members.push(m);
        slot
    }

    /// Every 100 ms: the leader's autopilot looks and acts.
    pub(super) fn autopilot_step(&mut self) {
        if !self.now.is_multiple_of(100) {
            return;
        }
        self.autopilot_answer();
        let leader = self.leader();
        if leader != self.autopilot.leader {
            self.autopilot.planner.not_leading();
            self.autopilot.leader = leader;
        }
        let Some(l) = leader else {
            return;
        };
        if self.autopilot.in_flight.is_some() || self.members[l].paused_until > self.now {
            return;
        }
        let Some(topology) = self.routes.topology(l) else {
            return;
        };
        let seen = nodes_of(peer_infos(topology, l as u64 + 1));
        let node = self.members[l].node.as_mut().expect("the leader runs");
        let Ok(members) = node.kv.members() else {
            return;
        };
        let (tx, mut rx) = oneshot::channel();
        let _ = node.driver.handle(DriverMsg::Progress { reply: tx });
        let Ok(Ok(progress)) = rx.try_recv() else {
            return;
        };
        let view = View {
            me: self.members[l].id,
            cluster_id: super::CLUSTER_ID,
            token_hash: token_hash(TOKEN),
            members: &members,
            seen: &seen,
            progress: &progress,
        };
        let now = self.base + Duration::from_millis(self.now);
        let first_free = self.members.len() as u64 + 1;
        let mut fresh = first_free;
        let actions = self.autopilot.planner.plan(now, &view, &mut || {
            fresh += 1;
            fresh
        });
        for action in actions {
            self.trace.add(&[0xa070, action_word(&action)]);
            self.carry_out(l, action);
        }
    }

    fn carry_out(&mut self, leader: usize, action: Action) {
        let change = match &action {
            Action::Welcome { peer, member_id } => {
                self.welcome(*peer as usize - 1, *member_id);
                return;
            }
            Action::NotifyRemoved { peer } => {
                // A running node told it was removed stops, as meshd's does.
                let i = *peer as usize - 1;
                if i < self.members.len() && !self.members[i].retired {
                    self.retire(i);
                }
                return;
            }
            Action::AddLearner { member, .. } => MemberChange::Add {
                member: member.clone(),
                learner: true,
            },
            Action::Remove(id) => {
                // A live member it removes leaves on its own when it learns of it.
                if let Some(i) = self.members.iter().position(|m| m.id == *id) {
                    self.removal_asked.insert(i);
                }
                MemberChange::Remove(*id)
            }
            Action::Promote(id) => MemberChange::Promote(*id),
        };
        let (rx, at) = self.change_on(leader, change);
        self.autopilot.in_flight = Some(InFlight { action, rx, at });
    }

    /// Slot `i` is told its member ID: an empty node starts as that member.
    fn welcome(&mut self, i: usize, member_id: u64) {
        let Some(m) = self.members.get_mut(i) else {
            return;
        };
        // Member IDs are slot numbers in the simulator; another would not route.
        if !m.spare || member_id != i as u64 + 1 {
            return;
        }
        m.spare = false;
        m.retired = false;
        m.restart_at = Some(self.now);
    }

    /// The answer to the change in flight, if it came.
    fn autopilot_answer(&mut self) {
        use oneshot::error::TryRecvError::Empty;
        let Some(mut f) = self.autopilot.in_flight.take() else {
            return;
        };
        match f.rx.try_recv() {
            Err(Empty) if self.now < f.at + OP_TIMEOUT_MS => {
                self.autopilot.in_flight = Some(f);
            }
            Ok(Ok(_)) => match f.action {
                Action::AddLearner { peer, member } => {
                    self.report.autopilot_added += 1;
                    self.welcome(peer as usize - 1, member.id);
                }
                Action::Remove(id) => {
                    self.autopilot.planner.removal_done(id);
                    self.report.autopilot_removed += 1;
                    if let Some(i) = self.members.iter().position(|m| m.id == id) {
                        self.retire(i);
                    }
                }
                Action::Promote(_) => self.report.autopilot_promoted += 1,
                _ => {}
            },
            // Refused or unknown: the planner looks again and decides anew.
            _ => {}
        }
    }
}

fn action_word(a: &Action) -> u64 {
    match a {
        Action::Welcome { member_id, .. } => 0x1000 | member_id,
        Action::NotifyRemoved { peer } => 0x2000 | peer,
        Action::AddLearner { member, .. } => 0x3000 | member.id,
        Action::Remove(id) => 0x4000 | id,
        Action::Promote(id) => 0x5000 | id,
    }
}
