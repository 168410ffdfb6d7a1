//! How Raft messages reach peers: the small interface the driver sees. The gossip mesh
//! implements it ([`super::mesh_transport::MeshTransport`]); tests may implement it to
//! inject faults.

use raft::prelude::Message;

/// Delivers Raft messages to peers. Implementations never block the caller: a message
/// that cannot be queued is dropped and the peer reported unreachable to the driver.
pub trait Transport: Send + Sync + 'static {
    /// Queues messages for their `to` peers.
    fn send(&self, msgs: Vec<Message>);
    /// Sets the peers and their addresses (other members only).
    fn set_peers(&self, peers: Vec<(u64, String)>);
    /// Whether `member` can be reached right now (used with Raft's own activity
    /// tracking to decide whether a membership change is safe).
    fn is_reachable(&self, _member: u64) -> bool {
        true
    }
}
