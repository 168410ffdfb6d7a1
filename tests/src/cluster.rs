//! One interface to a cluster under test, whatever runs its members: a scenario
//! written against [`Cluster`] runs on in-process members ([`InProcessCluster`]),
//! spawned `meshd` processes ([`ProcessCluster`]) and the chaos runner's cluster.
//!
//! Members are slots `0..size()`. Faults go through one API, the test-only
//! FaultInjection service (`--unsafe-fault-injection`, `ClusterOpts::fault_injection`),
//! whichever way the members run. Every wait is on observable state with a deadline.

use std::net::SocketAddr;
use std::time::Duration;

use mesh_core::proto::meshpb::{
    fault_injection_client::FaultInjectionClient, ClearFaultsRequest, SetLinkFaultRequest,
};

use crate::{eventually, mesh_name, status, InProcessCluster, ProcessCluster};

/// A cluster of members in slots `0..size()`.
// The trait is only used generically, by tests in this workspace: the futures'
// auto traits need not be named.
#[allow(async_fn_in_trait)]
pub trait Cluster {
    /// Number of slots (running or not).
    fn size(&self) -> usize;
    /// Client address of slot `i`.
    fn endpoint(&self, i: usize) -> SocketAddr;
    /// Whether slot `i` runs now.
    fn is_up(&self, i: usize) -> bool;
    /// Stops slot `i` through its graceful path.
    async fn stop(&mut self, i: usize);
    /// Stops slot `i` without its shutdown path (SIGKILL for a process; in one process,
    /// where there is no such thing, the same as `stop`).
    async fn kill(&mut self, i: usize);
    /// Starts a stopped slot again on its data dir.
    async fn restart(&mut self, i: usize);

    /// Client addresses of the running slots.
    fn endpoints(&self) -> Vec<SocketAddr> {
        (0..self.size())
            .filter(|i| self.is_up(*i))
            .map(|i| self.endpoint(i))
            .collect()
    }

    /// Cuts every mesh link between slot `i` and the others, both ways.
    async fn partition(&mut self, i: usize) {
        let names = self.mesh_names().await;
        for j in (0..self.size()).filter(|j| *j != i && self.is_up(*j)) {
            set_link_fault(self.endpoint(i), names[j], true).await;
            set_link_fault(self.endpoint(j), names[i], true).await;
        }
    }

    /// Clears every link fault on every running slot.
    async fn heal(&mut self) {
        for a in self.endpoints() {
            faults(a)
                .await
                .clear_faults(ClearFaultsRequest {})
                .await
                .expect("clear faults");
        }
    }

    /// The slot of the leader every running slot names now, if they agree.
    async fn leader(&self) -> Option<usize> {
        let mut leader = None;
        let mut slot_of_leader = None;
        for i in (0..self.size()).filter(|i| self.is_up(*i)) {
            let s = status(self.endpoint(i)).await?;
            if s.leader() == 0 || leader.is_some_and(|l| l != s.leader()) {
                return None;
            }
            leader = Some(s.leader());
            if s.header()?.member_id() == s.leader() {
                slot_of_leader = Some(i);
            }
        }
        slot_of_leader
    }

    /// Waits (up to `deadline`) for a leader every running slot agrees on.
    async fn wait_leader(&self, deadline: Duration) -> usize {
        eventually("an agreed leader", deadline, || self.leader()).await
    }

    /// Mesh peer name of every slot (0 for one that does not answer).
    async fn mesh_names(&self) -> Vec<u64> {
        let mut names = Vec::with_capacity(self.size());
        for i in 0..self.size() {
            names.push(if self.is_up(i) {
                eventually("a member's mesh name", Duration::from_secs(20), || {
                    mesh_name(self.endpoint(i))
                })
                .await
            } else {
                0
            });
        }
        names
    }
}

async fn faults(addr: SocketAddr) -> FaultInjectionClient<tonic::transport::Channel> {
    FaultInjectionClient::connect(format!("http://{addr}"))
        .await
        .expect("the member serves fault injection (ClusterOpts::fault_injection)")
}

/// Drops (or, with `cut` false, restores) frames between the member at `on` and
/// `peer`, both ways.
async fn set_link_fault(on: SocketAddr, peer: u64, cut: bool) {
    faults(on)
        .await
        .set_link_fault(SetLinkFaultRequest {
            peer,
            drop_out: cut,
            drop_in: cut,
            delay_ms: 0,
        })
        .await
        .expect("set link fault");
}

impl Cluster for InProcessCluster {
    fn size(&self) -> usize {
        self.configs.len()
    }

    fn endpoint(&self, i: usize) -> SocketAddr {
        self.addr(i)
    }

    fn is_up(&self, i: usize) -> bool {
        self.servers[i].is_some()
    }

    async fn stop(&mut self, i: usize) {
        InProcessCluster::stop(self, i).await
    }

    async fn kill(&mut self, i: usize) {
        InProcessCluster::stop(self, i).await
    }

    async fn restart(&mut self, i: usize) {
        InProcessCluster::restart(self, i).await
    }
}

impl Cluster for ProcessCluster {
    fn size(&self) -> usize {
        self.procs.len()
    }

    fn endpoint(&self, i: usize) -> SocketAddr {
        self.procs[i].client
    }

    fn is_up(&self, i: usize) -> bool {
        self.procs[i].child.is_some()
    }

    async fn stop(&mut self, i: usize) {
        let exit = self.procs[i].terminate();
        assert!(
            exit.is_some_and(|e| e.success()),
            "slot {i} stops cleanly on SIGTERM: {exit:?}\n{}",
            self.log(i)
        );
    }

    async fn kill(&mut self, i: usize) {
        self.procs[i].kill9();
    }

    async fn restart(&mut self, i: usize) {
        ProcessCluster::restart(self, i)
    }
}
