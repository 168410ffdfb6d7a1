//! Raft over the gossip mesh: messages travel as unicast on the mesh's `raft` channel,
//! routed hop by hop, so two members without a direct connection still replicate.
//!
//! Members are addressed by Raft member ID; [`MemberRoutes`] maps them to mesh peer
//! names from what every node publishes in its mesh metadata. Messages larger than
//! one mesh frame (snapshots) are cut into chunks and reassembled at the receiver.

use std::collections::HashMap;
use std::sync::{mpsc as std_mpsc, Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use prost011::Message as _;
use raft::prelude::{Message, MessageType};
use tracing::{debug, warn};

use super::snapshot_stream::SnapshotStreams;
use super::transport::Transport;
use super::validate::Refusal;
use super::{DriverMsg, NodeStatus};
use crate::mesh::{GossipChannel, GossipError, Gossiper, Mesh, PeerName};
use crate::proto::meshpb::RaftEnvelope;

/// Name of the mesh channel that carries Raft traffic.
pub const RAFT_CHANNEL: &str = "raft";
/// Payload bytes per chunk: well below the mesh's frame limit.
pub const CHUNK_BYTES: usize = 1024 * 1024;
/// Largest reassembled message accepted (a snapshot of the whole store).
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024 * 1024;
/// Messages one sender may have in reassembly at once.
const MAX_PARTIAL_PER_SENDER: usize = 2;
/// A partly received message is dropped after this long (Raft resends).
const REASSEMBLY_TIMEOUT: Duration = Duration::from_secs(60);

/// Raft member ID → mesh peer name, for the members of one cluster.
#[derive(Default)]
pub struct MemberRoutes {
    map: RwLock<HashMap<u64, PeerName>>,
}

impl MemberRoutes {
    pub fn replace(&self, routes: HashMap<u64, PeerName>) {
        *self.map.write().unwrap_or_else(|p| p.into_inner()) = routes;
    }
    pub fn get(&self, member: u64) -> Option<PeerName> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&member)
            .copied()
    }
}

/// The [`Transport`] the driver uses when nodes talk over the mesh.
pub struct MeshTransport {
    member_id: u64,
    cluster_id: u64,
    mesh: Arc<Mesh>,
    channel: Arc<GossipChannel>,
    routes: Arc<MemberRoutes>,
    driver: std_mpsc::Sender<DriverMsg>,
    next_msg: Mutex<u64>,
    /// Snapshot messages go as streamed files, not inline.
    snapshots: Arc<SnapshotStreams>,
}

impl MeshTransport {
    /// Registers the `raft` channel; received messages for `member_id` of `cluster_id`
    /// go to the driver.
    pub fn start(
        mesh: Arc<Mesh>,
        status: Arc<NodeStatus>,
        routes: Arc<MemberRoutes>,
        driver: std_mpsc::Sender<DriverMsg>,
        snapshot_dir: std::path::PathBuf,
    ) -> Arc<MeshTransport> {
        let snapshots = SnapshotStreams::start(
            &mesh,
            status.clone(),
            routes.clone(),
            driver.clone(),
            snapshot_dir,
        );
        let (member_id, cluster_id) = (status.member_id, status.cluster_id);
        let receiver = Arc::new(RaftReceiver {
            member_id,
            cluster_id,
            routes: routes.clone(),
            status,
            driver: driver.clone(),
            partial: Mutex::new(HashMap::new()),
        });
        let channel = mesh.register(RAFT_CHANNEL, receiver);
        Arc::new(MeshTransport {
            member_id,
            cluster_id,
            mesh,
            channel,
            routes,
            driver,
            // Random start: chunks a receiver still holds from this member's previous
            // run must not be joined with a new message that reuses their number.
            next_msg: Mutex::new(rand::random()),
            snapshots,
        })
    }

    fn send_one(&self, m: Message) -> bool {
        let Some(peer) = self.routes.get(m.to) else {
            return false;
        };
        let data = m.encode_to_vec();
        let msg_id = {
            let mut n = self.next_msg.lock().unwrap_or_else(|p| p.into_inner());
            *n = n.wrapping_add(1);
            *n
        };
        let chunks: Vec<&[u8]> = if data.is_empty() {
            vec![&[][..]]
        } else {
            data.chunks(CHUNK_BYTES).collect()
        };
        let total = chunks.len() as u32;
        // The messages of a ReadIndex round trip are written at once: a linearizable
        // read waits on each of them, and handing it to the connection's task cost a
        // thread wake-up per hop. Appends and their answers go through the task, which
        // joins those queued together (written at once, they cost a quarter more CPU
        // per put at 100 clients).
        let now = matches!(
            MessageType::from_i32(m.msg_type),
            Some(
                MessageType::MsgHeartbeat
                    | MessageType::MsgHeartbeatResponse
                    | MessageType::MsgReadIndex
                    | MessageType::MsgReadIndexResp
            )
        );
        for (i, chunk) in chunks.into_iter().enumerate() {
            let env = RaftEnvelope {
                cluster_id: self.cluster_id,
                from: self.member_id,
                to: m.to,
                msg_id,
                chunk: i as u32,
                chunks: total,
                data: chunk.to_vec(),
            };
            let frame = prost::Message::encode_to_vec(&env);
            let sent = if now {
                self.channel.send_unicast_now(peer, frame)
            } else {
                self.channel.send_unicast(peer, frame)
            };
            if let Err(e) = sent {
                debug!(
                    to = format_args!("{:x}", m.to),
                    "raft message not sent: {e}"
                );
                return false;
            }
        }
        true
    }
}

impl Transport for MeshTransport {
    fn send(&self, msgs: Vec<Message>) {
        for m in msgs {
            let to = m.to;
            if m.msg_type == MessageType::MsgSnapshot as i32 {
                // Reports its outcome to the driver when the transfer ends.
                self.snapshots.send(m);
                continue;
            }
            if !self.send_one(m) {
                let _ = self.driver.send(DriverMsg::Unreachable(to));
            }
        }
    }

    fn is_reachable(&self, member: u64) -> bool {
        self.routes.get(member).is_some()
    }

    /// Dials members' mesh addresses that have no route yet; the mesh finds the rest.
    fn set_peers(&self, peers: Vec<(u64, String)>) {
        for (id, addr) in peers {
            if id != self.member_id && self.routes.get(id).is_none() {
                self.mesh.connect(&addr);
            }
        }
    }
}

/// Feeds `frames` (untrusted bytes, as received on the `raft` channel) to a receiver
/// of the cluster and member the first envelope names, so fuzzing reaches reassembly
/// and Raft message decoding. Returns how many messages reached the driver.
pub fn receive_untrusted(frames: &[&[u8]]) -> usize {
    let first: Option<RaftEnvelope> = frames.first().and_then(|f| prost::Message::decode(*f).ok());
    let (cluster_id, member_id, from) = first.map_or((0, 0, 0), |e| (e.cluster_id, e.to, e.from));
    let (tx, rx) = std_mpsc::channel();
    // The sender is published on peer 1, where the frames come from.
    let routes = MemberRoutes::default();
    routes.replace(HashMap::from([(from, 1)]));
    let receiver = RaftReceiver {
        member_id,
        cluster_id,
        routes: Arc::new(routes),
        status: Arc::new(NodeStatus::new(member_id, cluster_id)),
        driver: tx,
        partial: Mutex::new(HashMap::new()),
    };
    for f in frames {
        let _ = receiver.on_unicast(1, f);
    }
    drop(receiver);
    rx.into_iter().count()
}

struct Partial {
    started: Instant,
    chunks: Vec<Option<Vec<u8>>>,
    bytes: usize,
}

/// Receives the `raft` channel: checks the envelope, reassembles, hands to the driver.
struct RaftReceiver {
    member_id: u64,
    cluster_id: u64,
    /// Where each member is published on the mesh: a message must come from the peer
    /// its sender is published on.
    routes: Arc<MemberRoutes>,
    status: Arc<NodeStatus>,
    driver: std_mpsc::Sender<DriverMsg>,
    partial: Mutex<HashMap<(u64, u64), Partial>>,
}

impl RaftReceiver {
    fn refuse(&self, why: Refusal, src: PeerName, what: &str) {
        super::validate::refuse_from_peer(&self.status, "raft message", why, src, what);
    }

    fn deliver(&self, src: PeerName, sender: u64, data: &[u8]) {
        match Message::decode(data) {
            Ok(m) if !super::validate::well_formed(&m) => {
                self.refuse(Refusal::Malformed, src, "unknown message or entry type")
            }
            Ok(m) if m.msg_type == MessageType::MsgSnapshot as i32 => self.refuse(
                Refusal::Malformed,
                src,
                "a snapshot message outside a snapshot transfer",
            ),
            Ok(m) if m.from != sender => self.refuse(
                Refusal::ForgedSender,
                src,
                "the message names another sender than its envelope",
            ),
            Ok(m) if m.to == self.member_id => {
                let _ = self.driver.send(DriverMsg::Raft(Box::new(m)));
            }
            Ok(m) => debug!(to = m.to, "raft message for another member dropped"),
            Err(e) => self.refuse(Refusal::Malformed, src, &format!("undecodable: {e}")),
        }
    }
}

impl Gossiper for RaftReceiver {
    fn on_unicast(&self, src: PeerName, msg: &[u8]) -> Result<(), GossipError> {
        let env: RaftEnvelope = match prost::Message::decode(msg) {
            Ok(e) => e,
            Err(e) => {
                warn!(peer = format_args!("{src:016x}"), "bad raft envelope: {e}");
                return Ok(());
            }
        };
        if env.cluster_id != self.cluster_id || env.to != self.member_id {
            debug!(
                peer = format_args!("{src:016x}"),
                cluster = format_args!("{:x}", env.cluster_id),
                "raft message for another cluster or member dropped"
            );
            return Ok(());
        }
        if self.routes.get(env.from) != Some(src) {
            self.refuse(
                Refusal::ForgedSender,
                src,
                &format!(
                    "the mesh peer is not where member {:x} is published",
                    env.from
                ),
            );
            return Ok(());
        }
        if env.chunks <= 1 {
            self.deliver(src, env.from, &env.data);
            return Ok(());
        }
        if env.chunk >= env.chunks
            || env.data.len() > CHUNK_BYTES
            || (env.chunks as usize).saturating_mul(CHUNK_BYTES) > MAX_MESSAGE_BYTES
        {
            warn!(
                peer = format_args!("{src:016x}"),
                "bad raft chunk header dropped"
            );
            return Ok(());
        }
        let mut partial = self.partial.lock().unwrap_or_else(|p| p.into_inner());
        partial.retain(|_, p| p.started.elapsed() < REASSEMBLY_TIMEOUT);
        let key = (env.from, env.msg_id);
        if !partial.contains_key(&key) {
            // A sender has at most this many messages in reassembly: a new one replaces
            // its oldest (Raft sends it again if it still matters).
            let mine: Vec<((u64, u64), Instant)> = partial
                .iter()
                .filter(|(k, _)| k.0 == env.from)
                .map(|(k, p)| (*k, p.started))
                .collect();
            if mine.len() >= MAX_PARTIAL_PER_SENDER {
                if let Some((oldest, _)) = mine.iter().min_by_key(|(_, t)| *t) {
                    partial.remove(oldest);
                }
            }
        }
        let p = partial.entry(key).or_insert_with(|| Partial {
            started: Instant::now(),
            chunks: vec![None; env.chunks as usize],
            bytes: 0,
        });
        if p.chunks.len() != env.chunks as usize {
            partial.remove(&key);
            return Ok(());
        }
        let i = env.chunk as usize;
        if p.chunks[i].is_none() {
            p.bytes += env.data.len();
            p.chunks[i] = Some(env.data);
        }
        if p.chunks.iter().all(Option::is_some) {
            let p = partial.remove(&key).expect("present");
            let mut whole = Vec::with_capacity(p.bytes);
            for c in p.chunks.into_iter().flatten() {
                whole.extend_from_slice(&c);
            }
            drop(partial);
            self.deliver(src, env.from, &whole);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::prelude::Entry;

    fn envelope(m: &Message) -> Vec<u8> {
        prost::Message::encode_to_vec(&RaftEnvelope {
            cluster_id: 9,
            from: 1,
            to: 2,
            msg_id: 1,
            chunk: 0,
            chunks: 1,
            data: m.encode_to_vec(),
        })
    }

    /// An envelope from member 1 counts only from the mesh peer member 1 is published on.
    #[test]
    fn a_message_from_another_mesh_peer_than_its_sender_is_dropped() {
        let (tx, rx) = std_mpsc::channel();
        let routes = MemberRoutes::default();
        routes.replace(HashMap::from([(1, 0xaa)]));
        let receiver = RaftReceiver {
            member_id: 2,
            cluster_id: 9,
            routes: Arc::new(routes),
            status: Arc::new(NodeStatus::new(2, 9)),
            driver: tx,
            partial: Mutex::new(HashMap::new()),
        };
        let m = Message {
            from: 1,
            to: 2,
            msg_type: MessageType::MsgHeartbeat as i32,
            ..Default::default()
        };
        receiver.on_unicast(0xbb, &envelope(&m)).unwrap();
        assert!(rx.try_recv().is_err(), "delivered from the wrong peer");
        let forged = &receiver.status.metrics.peer_messages_refused;
        assert_eq!(
            forged
                .iter()
                .map(|n| n.load(std::sync::atomic::Ordering::Relaxed))
                .sum::<u64>(),
            1
        );
        receiver.on_unicast(0xaa, &envelope(&m)).unwrap();
        assert!(rx.try_recv().is_ok(), "not delivered from the right peer");
    }

    #[test]
    fn unknown_types_and_forged_senders_are_dropped() {
        let good = Message {
            from: 1,
            to: 2,
            msg_type: MessageType::MsgAppend as i32,
            entries: vec![Entry::default()],
            ..Default::default()
        };
        assert_eq!(receive_untrusted(&[&envelope(&good)]), 1);
        // A message naming another sender than its envelope.
        let forged = Message {
            from: 7,
            ..good.clone()
        };
        assert_eq!(receive_untrusted(&[&envelope(&forged)]), 0);
        let bad_entry = Message {
            entries: vec![Entry {
                entry_type: 42,
                ..Default::default()
            }],
            ..good.clone()
        };
        assert_eq!(receive_untrusted(&[&envelope(&bad_entry)]), 0);
        let bad_type = Message {
            msg_type: 99,
            ..good
        };
        assert_eq!(receive_untrusted(&[&envelope(&bad_type)]), 0);
    }
}
