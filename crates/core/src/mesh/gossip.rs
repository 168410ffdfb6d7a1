//! Gossip channels (weave mesh's model): the `GossipData` / `Gossiper` traits a user
//! implements, and the `GossipChannel` handle through which they send unicasts and
//! broadcasts. Delivery and anti-entropy live in `mod.rs` and `conn/`.
use super::{Inner, MeshError, PeerName};
use std::sync::{Arc, Weak};

/// Error a gossiper returns for bytes it cannot use; the mesh logs it and drops the message.
pub type GossipError = Box<dyn std::error::Error + Send + Sync>;

/// A piece of state that can be gossiped: encoded into one or more byte strings (each
/// sent as its own message, so large states can be split) and merged into another value
/// of the same type. `merge` must be commutative, associative and idempotent, so that
/// any order and repetition of deliveries converge to the same state.
pub trait GossipData: Send + Sync {
    /// The value as messages; each one must be decodable on its own by the receiving
    /// [`Gossiper`].
    fn encode(&self) -> Vec<Vec<u8>>;
    /// Folds `other` into `self`.
    fn merge(&mut self, other: &Self)
    where
        Self: Sized;
}

/// The receiving side of a channel. Every method is called from a mesh tokio task, with
/// no mesh lock held: it must not block for long (hand heavy work to your own task or
/// thread) and must not wait on another mesh call's completion.
pub trait Gossiper: Send + Sync {
    /// A message sent to us with [`GossipChannel::send_unicast`] by `src`.
    fn on_unicast(&self, src: PeerName, msg: &[u8]) -> Result<(), GossipError>;
    /// A broadcast originated by `src`. Merge it and return what was new to us; only
    /// that (if anything) is relayed further down the broadcast tree. A channel that
    /// only carries unicast keeps the default (nothing to merge).
    fn on_broadcast(
        &self,
        _src: PeerName,
        _update: &[u8],
    ) -> Result<Option<Box<dyn GossipData>>, GossipError> {
        Ok(None)
    }
    /// Our complete state, sent to random neighbours periodically and to every new
    /// connection (`None` when there is nothing to say).
    fn gossip(&self) -> Option<Box<dyn GossipData>> {
        None
    }
    /// A neighbour's complete state (or a part of it). Merge it and return what was new.
    fn on_gossip(&self, _update: &[u8]) -> Result<Option<Box<dyn GossipData>>, GossipError> {
        Ok(None)
    }
}

/// A named channel registered with [`super::Mesh::register`].
pub struct GossipChannel {
    pub(super) name: String,
    pub(super) gossiper: Arc<dyn Gossiper>,
    pub(super) mesh: Weak<Inner>,
}

impl GossipChannel {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends `msg` (at most `max_frame` bytes) to `dst`, across as many hops as the
    /// route takes; delivered there to this channel's [`Gossiper::on_unicast`]. Never
    /// blocks: it fails with [`MeshError::Unreachable`] when there is no route and
    /// [`MeshError::QueueFull`] when the next hop's queue is full. Delivery is best
    /// effort (a connection may die with the message in flight).
    pub fn send_unicast(&self, dst: PeerName, msg: Vec<u8>) -> Result<(), MeshError> {
        let mesh = self.mesh.upgrade().ok_or(MeshError::Shutdown)?;
        mesh.send_unicast(&self.name, dst, msg, false)
    }

    /// Like [`Self::send_unicast`], but written from the calling thread when the
    /// connection is idle, instead of handed to the connection's task: for small
    /// messages someone waits on. Frames handed over together go out in one write, so
    /// a stream of messages costs less CPU the other way.
    pub fn send_unicast_now(&self, dst: PeerName, msg: Vec<u8>) -> Result<(), MeshError> {
        let mesh = self.mesh.upgrade().ok_or(MeshError::Shutdown)?;
        mesh.send_unicast(&self.name, dst, msg, true)
    }

    /// Sends every part of `update.encode()` to every reachable peer along the broadcast
    /// spanning tree rooted at us; each peer merges it with [`Gossiper::on_broadcast`]
    /// and relays only what was new to it. Best effort: periodic anti-entropy
    /// ([`Gossiper::gossip`]) repairs what a broadcast misses.
    pub fn broadcast(&self, update: Box<dyn GossipData>) {
        if let Some(mesh) = self.mesh.upgrade() {
            let own = mesh.cfg.name;
            for part in update.encode() {
                mesh.relay_broadcast(&self.name, own, part, None, super::MAX_TTL);
            }
        }
    }
}
