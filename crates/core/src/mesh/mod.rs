//! The gossip mesh (weave mesh style): peers connected over TCP, a gossiped topology
//! with shortest-path unicast and spanning-tree broadcast across hops, and named gossip
//! channels of mergeable state. It knows who is reachable, never who votes.
//!
//! # Layout
//! - `mod.rs` (this file): [`MeshConfig`], [`Mesh`] (the public handle), shared state,
//!   sending, relaying and anti-entropy rounds.
//! - `tasks.rs`: the background loops: accept (rate limited), dial (backoff), gossip.
//! - `conn/`: one connection: `handshake.rs` (versions, Noise encryption), `io.rs`
//!   (writer and reader loops, heartbeats), `dispatch.rs` (what a received frame does).
//! - `wire.rs`: length prefix, handshake and frame decoders, Noise chunking (pure).
//! - `topology.rs`: the topology CRDT, routes and broadcast trees (sans-IO).
//! - `sync.rs`: topology sync with one neighbour: flooding and anti-entropy (sans-IO).
//! - `gossip.rs`: the [`GossipData`] / [`Gossiper`] traits and [`GossipChannel`].
//!
//! # Wire
//! Each side sends a length-prefixed `MeshHandshake` (protocol "meshd-mesh", version
//! range, name, nickname, uid, advertised address, whether it has a key). With a
//! key, a Noise `NNpsk0_25519_ChaChaPoly_BLAKE2s` exchange follows (PSK = the mesh key,
//! see [`MeshKey`]; the two handshake records as prologue, so identities are bound to
//! the key exchange though sent in clear), and the dialing side then sends a sealed
//! confirmation: the accepting side registers the connection only once it has
//! decrypted it, so a replayed first message never replaces a live connection. A peer
//! with another key, or with a key facing one without, is refused on both sides. Then `MeshFrame`s, each a
//! 4-byte big-endian length and the frame (sealed in ≤ 64 KiB Noise messages when
//! encrypted): heartbeats, topology deltas and digests, channel messages.
//!
//! # Registering your own channel
//! ```
//! use mesh_core::mesh::{GossipData, GossipError, Gossiper, Mesh, MeshConfig, PeerName};
//! use std::sync::{Arc, Mutex};
//!
//! /// A grow-only set of words.
//! #[derive(Default, Clone)]
//! struct Words(std::collections::BTreeSet<String>);
//! impl GossipData for Words {
//!     fn encode(&self) -> Vec<Vec<u8>> {
//!         self.0.iter().map(|w| w.as_bytes().to_vec()).collect()
//!     }
//!     fn merge(&mut self, other: &Self) {
//!         self.0.extend(other.0.iter().cloned())
//!     }
//! }
//! #[derive(Default)]
//! struct WordsGossiper(Mutex<Words>);
//! impl WordsGossiper {
//!     /// Merges one encoded word, returning it if it was new.
//!     fn add(&self, bytes: &[u8]) -> Result<Option<Box<dyn GossipData>>, GossipError> {
//!         let w = std::str::from_utf8(bytes)?.to_string();
//!         let new = self.0.lock().unwrap().0.insert(w.clone());
//!         Ok(new.then(|| Box::new(Words([w].into())) as Box<dyn GossipData>))
//!     }
//! }
//! impl Gossiper for WordsGossiper {
//!     fn on_unicast(&self, _src: PeerName, msg: &[u8]) -> Result<(), GossipError> {
//!         self.add(msg).map(|_| ())
//!     }
//!     fn on_broadcast(&self, _src: PeerName, u: &[u8]) -> Result<Option<Box<dyn GossipData>>, GossipError> {
//!         self.add(u)
//!     }
//!     fn gossip(&self) -> Option<Box<dyn GossipData>> {
//!         Some(Box::new(self.0.lock().unwrap().clone()))
//!     }
//!     fn on_gossip(&self, u: &[u8]) -> Result<Option<Box<dyn GossipData>>, GossipError> {
//!         self.add(u)
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! let addr = listener.local_addr().unwrap().to_string();
//! let mesh = Mesh::start(MeshConfig::new(1, "n1", &addr), listener);
//! let words = Arc::new(WordsGossiper::default());
//! let channel = mesh.register("words", words.clone());
//! words.add(b"hello").unwrap();
//! channel.broadcast(Box::new(Words(["hello".to_string()].into())));
//! mesh.shutdown().await;
//! # }
//! ```
mod conn;
mod gossip;
mod key;
pub(crate) mod sync;
mod tasks;
pub(crate) mod topology;
pub mod wire;

pub use gossip::{GossipChannel, GossipData, GossipError, Gossiper};
pub use key::{KeySource, MeshKey};
pub use wire::{decode_frame, decode_handshake, WireError};

use crate::proto::meshpb::{
    mesh_frame, MeshChannelMessage, MeshFrame, MeshMessageKind, MeshTopologyDigest,
};
use bytes::Bytes;
use prost::Message;
use rand::seq::SliceRandom;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tasks::{accept_loop, announce_loop, dial_finished, dial_loop, gossip_loop};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;
use topology::{Entry, Topology};

/// A peer's identity on the mesh (shown as 16 hex digits).
pub type PeerName = u64;

/// Formats a peer name the way logs and tools show it.
pub fn peer_name_string(name: PeerName) -> String {
    format!("{name:016x}")
}

/// How a mesh member behaves. [`MeshConfig::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    pub name: PeerName,
    pub nickname: String,
    /// host:port other peers dial to reach us.
    pub advertise: String,
    /// Addresses we keep connected to (retried with backoff for as long as we run).
    pub seeds: Vec<String>,
    /// With a key every connection is authenticated and encrypted (Noise NNpsk0);
    /// peers without the same key are refused.
    pub key: Option<MeshKey>,
    /// Dial peers learned from the topology until we have this many connections
    /// (0: only seeds and [`Mesh::connect`]).
    pub target_degree: usize,
    pub max_connections: usize,
    /// Largest frame payload (and largest unicast message).
    pub max_frame: usize,
    pub heartbeat: Duration,
    /// A connection without any frame for this long is closed.
    pub dead_after: Duration,
    /// Anti-entropy and GC period.
    pub gossip_interval: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Accepted TCP connections per second (token bucket, burst of the same size); the
    /// rest are closed at once.
    pub accept_per_sec: u32,
}

impl MeshConfig {
    pub fn new(name: PeerName, nickname: &str, advertise: &str) -> Self {
        MeshConfig {
            name,
            nickname: nickname.to_string(),
            advertise: advertise.to_string(),
            seeds: Vec::new(),
            key: None,
            target_degree: 4,
            max_connections: 100,
            max_frame: 8 << 20,
            heartbeat: Duration::from_secs(1),
            dead_after: Duration::from_secs(4),
            gossip_interval: Duration::from_secs(1),
            reconnect_min: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(30),
            accept_per_sec: 50,
        }
    }
}

/// What [`Mesh::peers`] reports about one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    pub name: PeerName,
    pub nickname: String,
    pub uid: u64,
    pub version: u64,
    pub address: String,
    pub connections: Vec<ConnectionInfo>,
    pub reachable: bool,
    pub next_hop: Option<PeerName>,
    pub hops: Option<u32>,
    pub meta: Vec<u8>,
    pub is_self: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionInfo {
    pub peer: PeerName,
    pub address: String,
    pub outbound: bool,
    /// False while our own connection is still in its handshake (peer 0 until known).
    pub established: bool,
}

/// Test-only fault on the direct connection to one peer. Dropping both directions is
/// a partition: heartbeats are dropped too, the connection dies, and new connections
/// with that peer are refused while the fault is set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkFault {
    pub drop_out: bool,
    pub drop_in: bool,
    pub delay: Option<Duration>,
}

/// Counters since start. `gossip_bytes_*` count topology and channel frames (not
/// heartbeats or handshakes); `bytes_*` count everything on the sockets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeshStats {
    /// Peers in the topology, ourselves included.
    pub peers: usize,
    /// Of those, the ones with a route (ourselves included; from routes at most a tenth
    /// of a gossip interval old).
    pub reachable: usize,
    pub connections: usize,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub gossip_bytes_in: u64,
    pub gossip_bytes_out: u64,
    pub frames_rejected: u64,
    pub handshakes_refused: u64,
    /// Unicasts for this node dropped because they claim to come from this node.
    pub unicasts_refused: u64,
    /// Topology entries refused for breaking a cap (peer count, entry size).
    pub topology_refused: u64,
}

/// Errors of the mesh API.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MeshError {
    /// No route to the peer (not known, or not reachable from here).
    #[error("mesh: peer {} unreachable", peer_name_string(*.0))]
    Unreachable(PeerName),
    /// The next hop's send queue is full; the message was dropped.
    #[error("mesh: send queue to {} full", peer_name_string(*.0))]
    QueueFull(PeerName),
    /// The message is larger than `max_frame`.
    #[error("mesh: message of {0} bytes exceeds max frame {1}")]
    TooLarge(usize, usize),
    /// The mesh was shut down.
    #[error("mesh: shut down")]
    Shutdown,
}

/// Frames queued per connection before sends fail with [`MeshError::QueueFull`].
const QUEUE_FRAMES: usize = 4096;
/// Hops a unicast or broadcast may take (guards against loops while routes converge).
const MAX_TTL: u32 = 255;

#[derive(Default)]
struct Counters {
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    gossip_bytes_in: AtomicU64,
    gossip_bytes_out: AtomicU64,
    frames_rejected: AtomicU64,
    handshakes_refused: AtomicU64,
    unicasts_refused: AtomicU64,
}

/// A registered, handshaken connection.
struct ConnHandle {
    id: u64,
    remote_uid: u64,
    address: String,
    outbound: bool,
    tx: mpsc::Sender<Bytes>,
    /// Where [`Inner::send_to`] writes frames directly.
    outbox: Arc<conn::Outbox>,
    /// What the neighbour holds of the topology and what it is owed (see `sync`).
    sync: sync::NeighbourSync,
    /// Wakes the writer to send what `sync` has queued.
    topology_notify: Arc<Notify>,
}

/// Per-address dial state (seeds, `connect()` targets, addresses from the topology).
struct DialState {
    next: Instant,
    backoff: Duration,
    in_flight: bool,
}

struct State {
    topology: Topology,
    conns: HashMap<PeerName, ConnHandle>,
    /// Connections in their handshake: id → (remote address, outbound).
    handshaking: HashMap<u64, (String, bool)>,
    channels: HashMap<String, Arc<GossipChannel>>,
    faults: HashMap<PeerName, LinkFault>,
    /// Addresses we keep connected to: seeds and `connect()` targets.
    direct: Vec<String>,
    dials: HashMap<String, DialState>,
    /// Addresses that turned out to be ourselves.
    self_addresses: HashSet<String>,
}

pub(crate) struct Inner {
    cfg: MeshConfig,
    uid: u64,
    psk: Option<[u8; 32]>,
    state: Mutex<State>,
    counters: Counters,
    changes: watch::Sender<u64>,
    shutdown: watch::Sender<bool>,
    tasks: Mutex<Option<JoinSet<()>>>,
    next_conn_id: AtomicU64,
    /// Our own entry changed: `announce_loop` publishes it.
    own_changed: Notify,
}

/// A running mesh member. Dropping it (or [`Mesh::shutdown`]) stops every task.
pub struct Mesh {
    inner: Arc<Inner>,
}

impl Mesh {
    /// Starts accepting on `listener`, dialing seeds, and gossiping. Must be called
    /// inside a tokio runtime.
    pub fn start(cfg: MeshConfig, listener: tokio::net::TcpListener) -> Arc<Mesh> {
        let uid: u64 = rand::random();
        let psk = cfg.key.as_ref().map(|k| *k.bytes());
        let own = Entry::new(cfg.name, cfg.nickname.clone(), uid, cfg.advertise.clone());
        let inner = Arc::new(Inner {
            uid,
            psk,
            state: Mutex::new(State {
                topology: Topology::new(own, cfg.gossip_interval / 10, crate::system_clock()),
                conns: HashMap::new(),
                handshaking: HashMap::new(),
                channels: HashMap::new(),
                faults: HashMap::new(),
                direct: cfg.seeds.clone(),
                dials: HashMap::new(),
                self_addresses: HashSet::from([cfg.advertise.clone()]),
            }),
            cfg,
            counters: Counters::default(),
            changes: watch::channel(0).0,
            shutdown: watch::channel(false).0,
            tasks: Mutex::new(Some(JoinSet::new())),
            next_conn_id: AtomicU64::new(1),
            own_changed: Notify::new(),
        });
        inner.spawn(accept_loop(inner.clone(), listener));
        inner.spawn(dial_loop(inner.clone()));
        inner.spawn(gossip_loop(inner.clone()));
        inner.spawn(announce_loop(inner.clone()));
        Arc::new(Mesh { inner })
    }

    pub fn name(&self) -> PeerName {
        self.inner.cfg.name
    }

    pub fn uid(&self) -> u64 {
        self.inner.uid
    }

    pub fn config(&self) -> &MeshConfig {
        &self.inner.cfg
    }

    /// Registers (or replaces) the gossiper of channel `channel`. Its state is sent to
    /// every neighbour at once, then with each anti-entropy round.
    pub fn register(&self, channel: &str, gossiper: Arc<dyn Gossiper>) -> Arc<GossipChannel> {
        let ch = Arc::new(GossipChannel {
            name: channel.to_string(),
            gossiper,
            mesh: Arc::downgrade(&self.inner),
        });
        let neighbours: Vec<PeerName> = {
            let mut st = self.inner.lock();
            st.channels.insert(channel.to_string(), ch.clone());
            st.conns.keys().copied().collect()
        };
        self.inner.send_channel_state(&ch, &neighbours);
        ch
    }

    /// Sets our opaque meta bytes (gossiped in our topology entry; bumps its version).
    pub fn set_meta(&self, meta: Vec<u8>) {
        let mut st = self.inner.lock();
        st.topology.update_own(|e| e.meta = meta);
        drop(st);
        self.inner.own_changed.notify_one();
        self.inner.bump_changes();
    }

    /// Every known peer, ourselves included.
    pub fn peers(&self) -> Vec<PeerInfo> {
        let st = self.inner.lock();
        let own = self.inner.cfg.name;
        let mut out = peer_infos(&st.topology, own);
        if let Some(me) = out.iter_mut().find(|p| p.name == own) {
            me.connections.extend(
                st.handshaking
                    .values()
                    .map(|(addr, outbound)| ConnectionInfo {
                        peer: 0,
                        address: addr.clone(),
                        outbound: *outbound,
                        established: false,
                    }),
            );
        }
        out
    }

    /// A receiver whose value bumps whenever topology, routes or meta change.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// Adds `addr` to the addresses we keep connected to, and dials it now.
    pub fn connect(&self, addr: &str) {
        let mut st = self.inner.lock();
        if !st.direct.iter().any(|a| a == addr) {
            st.direct.push(addr.to_string());
        }
        if let Some(d) = st.dials.get_mut(addr) {
            d.next = Instant::now();
            d.backoff = self.inner.cfg.reconnect_min;
        }
    }

    /// Sets a fault on the direct connection to `peer` (replacing any earlier one).
    pub fn set_link_fault(&self, peer: PeerName, fault: LinkFault) {
        let mut st = self.inner.lock();
        if fault == LinkFault::default() {
            st.faults.remove(&peer);
        } else {
            st.faults.insert(peer, fault);
        }
    }

    /// Clears every link fault; refused peers are redialed at once.
    pub fn clear_faults(&self) {
        let mut st = self.inner.lock();
        st.faults.clear();
        let now = Instant::now();
        let min = self.inner.cfg.reconnect_min;
        for d in st.dials.values_mut() {
            d.next = now;
            d.backoff = min;
        }
    }

    pub fn stats(&self) -> MeshStats {
        let c = &self.inner.counters;
        let st = self.inner.lock();
        MeshStats {
            peers: st.topology.len(),
            reachable: st.topology.reachable_count(),
            connections: st.conns.len(),
            bytes_in: c.bytes_in.load(Ordering::Relaxed),
            bytes_out: c.bytes_out.load(Ordering::Relaxed),
            gossip_bytes_in: c.gossip_bytes_in.load(Ordering::Relaxed),
            gossip_bytes_out: c.gossip_bytes_out.load(Ordering::Relaxed),
            frames_rejected: c.frames_rejected.load(Ordering::Relaxed),
            unicasts_refused: c.unicasts_refused.load(Ordering::Relaxed),
            handshakes_refused: c.handshakes_refused.load(Ordering::Relaxed),
            topology_refused: st.topology.refused,
        }
    }

    /// Closes the listener and every connection and stops all tasks.
    pub async fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
        let tasks = self.inner.tasks.lock().unwrap().take();
        if let Some(mut tasks) = tasks {
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        let mut st = self.inner.lock();
        st.conns.clear();
        st.handshaking.clear();
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.inner.shutdown.send_replace(true);
        // Dropping a JoinSet aborts its tasks.
        drop(self.inner.tasks.lock().unwrap().take());
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    fn spawn(&self, fut: impl std::future::Future<Output = ()> + Send + 'static) {
        if let Some(tasks) = self.tasks.lock().unwrap().as_mut() {
            tasks.spawn(fut);
        }
    }

    fn bump_changes(&self) {
        self.changes.send_modify(|v| *v += 1);
    }

    fn fault(&self, peer: PeerName) -> LinkFault {
        self.lock().faults.get(&peer).copied().unwrap_or_default()
    }

    /// Queues an encoded frame on the direct connection to `peer`.
    fn send_to(&self, peer: PeerName, frame: Bytes) -> Result<(), MeshError> {
        self.send_on(peer, frame, false)
    }

    /// Sends an encoded frame on the direct connection to `peer`. With `now`, the frame
    /// is written from this thread when the link has no fault set and nothing waits to
    /// be written; otherwise (and without `now`) it is queued for the connection's task,
    /// which joins the frames queued together into one write.
    fn send_on(&self, peer: PeerName, mut frame: Bytes, now: bool) -> Result<(), MeshError> {
        let (tx, outbox) = {
            let st = self.lock();
            let c = st.conns.get(&peer).ok_or(MeshError::Unreachable(peer))?;
            // The direct path only for a link without faults (the connection's task
            // applies them) and with nothing queued (which the frame would overtake).
            let direct =
                now && !st.faults.contains_key(&peer) && c.tx.capacity() == c.tx.max_capacity();
            (c.tx.clone(), direct.then(|| c.outbox.clone()))
        };
        if let Some(outbox) = outbox {
            let len = frame.len() as u64;
            match outbox.try_send_now(self, frame) {
                Ok(()) => {
                    // Counted as the connection's task counts what it takes from the queue.
                    self.counters
                        .gossip_bytes_out
                        .fetch_add(len, Ordering::Relaxed);
                    return Ok(());
                }
                Err(queued) => frame = queued,
            }
        }
        tx.try_send(frame).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => MeshError::QueueFull(peer),
            mpsc::error::TrySendError::Closed(_) => MeshError::Unreachable(peer),
        })
    }

    fn send_unicast(
        &self,
        channel: &str,
        dst: PeerName,
        msg: Vec<u8>,
        now: bool,
    ) -> Result<(), MeshError> {
        if msg.len() > self.cfg.max_frame {
            return Err(MeshError::TooLarge(msg.len(), self.cfg.max_frame));
        }
        if dst == self.cfg.name {
            let ch = self.lock().channels.get(channel).cloned();
            if let Some(ch) = ch {
                if let Err(e) = ch.gossiper.on_unicast(dst, &msg) {
                    tracing::debug!(channel, "mesh: unicast to self rejected: {e}");
                }
            }
            return Ok(());
        }
        let hop = self.lock().topology.route(dst).map(|r| r.0);
        let hop = hop.ok_or(MeshError::Unreachable(dst))?;
        let frame = channel_frame(
            channel,
            MeshMessageKind::Unicast,
            self.cfg.name,
            dst,
            MAX_TTL,
            msg,
        );
        self.send_on(hop, frame, now)
    }

    /// Sends `part` of a broadcast from `src` to our children in src's broadcast tree
    /// (never back to `from`, the neighbour it came from).
    fn relay_broadcast(
        &self,
        channel: &str,
        src: PeerName,
        part: Vec<u8>,
        from: Option<PeerName>,
        ttl: u32,
    ) {
        let children = self.lock().topology.broadcast_children(src);
        if children.is_empty() {
            return;
        }
        let frame = channel_frame(channel, MeshMessageKind::Broadcast, src, 0, ttl, part);
        for c in children.into_iter().filter(|c| Some(*c) != from) {
            if let Err(e) = self.send_to(c, frame.clone()) {
                tracing::debug!(channel, "mesh: broadcast relay dropped: {e}");
            }
        }
    }

    /// Sends channel `ch`'s complete state to each of `peers` (direct neighbours).
    fn send_channel_state(&self, ch: &GossipChannel, peers: &[PeerName]) {
        if peers.is_empty() {
            return;
        }
        let Some(data) = ch.gossiper.gossip() else {
            return;
        };
        for part in data.encode() {
            let frame = channel_frame(&ch.name, MeshMessageKind::Gossip, self.cfg.name, 0, 1, part);
            for &p in peers {
                if let Err(e) = self.send_to(p, frame.clone()) {
                    tracing::debug!(channel = ch.name, "mesh: gossip dropped: {e}");
                }
            }
        }
    }

    /// One anti-entropy round: topology GC, every channel's state to about 2·log2(n)
    /// random neighbours, and a topology summary to one neighbour (deltas travel on every
    /// change; the summary, and the digest exchange a mismatch starts, only repair what
    /// they missed).
    fn gossip_round(&self) {
        let (channels, targets) = {
            let mut st = self.lock();
            let removed = st.topology.gc_tick();
            if !removed.is_empty() {
                tracing::debug!(count = removed.len(), "mesh: collected unreachable peers");
                self.bump_changes();
            }
            let mut neighbours: Vec<PeerName> = st.conns.keys().copied().collect();
            neighbours.shuffle(&mut rand::rng());
            if let Some(&n) = neighbours.first() {
                let frame = summary_frame(&st);
                if let Some(c) = st.conns.get(&n) {
                    let _ = c.tx.try_send(frame);
                }
            }
            let n = st.topology.reachable_count().max(2) as f64;
            let fanout = (2.0 * n.log2()).ceil() as usize;
            neighbours.truncate(fanout.max(1));
            (
                st.channels.values().cloned().collect::<Vec<_>>(),
                neighbours,
            )
        };
        for ch in channels {
            self.send_channel_state(&ch, &targets);
        }
    }
}

/// Every peer a topology holds, as [`Mesh::peers`] reports it (`own` is this peer),
/// sorted by name.
pub fn peer_infos(topology: &Topology, own: PeerName) -> Vec<PeerInfo> {
    let mut out: Vec<PeerInfo> = topology
        .entries()
        .map(|e| {
            let route = topology.route_exact(e.name);
            let connections: Vec<ConnectionInfo> = e
                .connections
                .iter()
                .map(|c| ConnectionInfo {
                    peer: c.peer,
                    address: topology
                        .get(c.peer)
                        .map(|p| p.address.clone())
                        .unwrap_or_default(),
                    outbound: c.outbound,
                    established: true,
                })
                .collect();
            PeerInfo {
                name: e.name,
                nickname: e.nickname.clone(),
                uid: e.uid,
                version: e.version,
                address: e.address.clone(),
                connections,
                reachable: topology.is_reachable(e.name),
                next_hop: route.map(|r| r.0),
                hops: if e.name == own {
                    Some(0)
                } else {
                    route.map(|r| r.1)
                },
                meta: e.meta.clone(),
                is_self: e.name == own,
            }
        })
        .collect();
    out.sort_by_key(|p| p.name);
    out
}

/// Marks `names` for sending on every connection.
fn queue_topology(st: &mut State, names: &[PeerName]) {
    for c in st.conns.values_mut() {
        if c.sync.queue(names.iter().copied()) {
            c.topology_notify.notify_one();
        }
    }
}

fn channel_frame(
    channel: &str,
    kind: MeshMessageKind,
    src: PeerName,
    dst: PeerName,
    ttl: u32,
    payload: Vec<u8>,
) -> Bytes {
    Bytes::from(
        MeshFrame {
            body: Some(mesh_frame::Body::Channel(MeshChannelMessage {
                channel: channel.to_string(),
                kind: kind as i32,
                src,
                dst,
                ttl,
                payload,
            })),
        }
        .encode_to_vec(),
    )
}

/// A `MeshFrame` carrying the named entries we hold, from their stored encodings.
fn topology_frame(st: &State, names: impl IntoIterator<Item = PeerName>) -> Option<Bytes> {
    wire::topology_frame(
        names
            .into_iter()
            .filter_map(|n| st.topology.get(n))
            .map(|e| e.encoded().as_ref()),
    )
}

fn digest_frame(topology: &Topology, reply: bool) -> Bytes {
    encode_digest(MeshTopologyDigest {
        items: topology.digest(),
        reply,
        ..Default::default()
    })
}

/// A digest of just our summary: what a neighbour gets on connect and at random each
/// anti-entropy round.
fn summary_frame(st: &State) -> Bytes {
    encode_digest(MeshTopologyDigest {
        summary_only: true,
        summary: st.topology.summary(),
        ..Default::default()
    })
}

fn encode_digest(digest: MeshTopologyDigest) -> Bytes {
    Bytes::from(
        MeshFrame {
            body: Some(mesh_frame::Body::Digest(digest)),
        }
        .encode_to_vec(),
    )
}
