//! The mesh's `join` channel: the leader tells an empty node which member ID it has
//! been given (after adding it to the configuration), or tells a node still claiming a
//! removed member ID that it was removed (member ID 0).

use std::sync::Arc;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::mesh::{GossipChannel, GossipError, Gossiper, Mesh, MeshError, PeerName};
use crate::proto::meshpb::JoinWelcome;

pub const JOIN_CHANNEL: &str = "join";

/// Both ends of the `join` channel on one node.
pub struct JoinChannel {
    channel: Arc<GossipChannel>,
    received: watch::Receiver<Option<(PeerName, JoinWelcome)>>,
    sent: watch::Sender<Option<(PeerName, JoinWelcome)>>,
}

struct Receiver {
    tx: watch::Sender<Option<(PeerName, JoinWelcome)>>,
}

impl Gossiper for Receiver {
    fn on_unicast(&self, src: PeerName, msg: &[u8]) -> Result<(), GossipError> {
        match <JoinWelcome as prost::Message>::decode(msg) {
            Ok(w) => {
                let _ = self.tx.send(Some((src, w)));
            }
            Err(e) => warn!(peer = format_args!("{src:016x}"), "bad join message: {e}"),
        }
        Ok(())
    }
}

impl JoinChannel {
    pub fn register(mesh: &Mesh) -> JoinChannel {
        let (tx, received) = watch::channel(None);
        let channel = mesh.register(JOIN_CHANNEL, Arc::new(Receiver { tx: tx.clone() }));
        JoinChannel {
            channel,
            received,
            sent: tx,
        }
    }

    /// Sends a welcome (or, with member ID 0, a removal notice) to `peer`.
    pub fn send(&self, peer: PeerName, welcome: &JoinWelcome) -> Result<(), MeshError> {
        self.channel
            .send_unicast(peer, prost::Message::encode_to_vec(welcome))
    }

    /// Forgets the last message received, so the next wait looks at newer ones only.
    pub fn clear(&self) {
        self.sent.send_replace(None);
    }

    /// Waits for a welcome for a cluster with `token`.
    pub async fn await_welcome(&self, token: &str) -> JoinWelcome {
        let mut rx = self.received.clone();
        loop {
            if let Some((src, w)) = rx.borrow_and_update().clone() {
                if w.member_id != 0 && w.cluster_token == token {
                    info!(
                        from = format_args!("{src:016x}"),
                        member = format_args!("{:x}", w.member_id),
                        cluster = format_args!("{:x}", w.cluster_id),
                        "welcomed into the cluster"
                    );
                    return w;
                }
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Resolves with the sender of a notice that this node's member ID was removed
    /// from `cluster_id`; the caller checks that the sender is the leader.
    pub async fn await_removal_notice(&self, cluster_id: u64) -> PeerName {
        let mut rx = self.received.clone();
        loop {
            if let Some((src, w)) = rx.borrow_and_update().clone() {
                if w.member_id == 0 && w.cluster_id == cluster_id {
                    return src;
                }
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}
