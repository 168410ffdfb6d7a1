//! How Raft messages reach peers. [`Transport`] is the small interface the driver sees;
//! [`TcpTransport`] is the direct-TCP implementation (one outbound connection per peer,
//! length-prefixed frames, a handshake that checks protocol and cluster identity). The
//! gossip mesh replaces this implementation, not the driver.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::Duration;

use prost011::Message as _;
use raft::prelude::{Message, MessageType};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::DriverMsg;
use crate::proto::meshpb::PeerHello;

/// Protocol name and version carried in every peer handshake.
pub const PEER_PROTOCOL: &str = "meshd-raft";
pub const PEER_PROTOCOL_VERSION: u32 = 1;
/// Largest frame accepted from a peer (snapshots travel as one frame).
pub const DEFAULT_MAX_FRAME: usize = 512 * 1024 * 1024;
/// Messages queued for one peer before new ones are dropped (Raft retransmits).
const PEER_QUEUE: usize = 4096;

/// Delivers Raft messages to peers. Implementations never block the caller: a message
/// that cannot be queued is dropped and the peer reported unreachable to the driver.
pub trait Transport: Send + Sync + 'static {
    /// Queues messages for their `to` peers.
    fn send(&self, msgs: Vec<Message>);
    /// Sets the peers and their addresses (other members only).
    fn set_peers(&self, peers: Vec<(u64, String)>);
}

/// Identity a node presents and expects on peer connections.
#[derive(Clone, Debug)]
pub struct PeerIdentity {
    pub member_id: u64,
    pub cluster_id: u64,
}

struct PeerSender {
    addr: String,
    queue: mpsc::Sender<Message>,
    task: tokio::task::JoinHandle<()>,
}

/// Direct TCP connections between members' mesh addresses.
pub struct TcpTransport {
    me: PeerIdentity,
    driver: std_mpsc::Sender<DriverMsg>,
    runtime: tokio::runtime::Handle,
    peers: Mutex<HashMap<u64, PeerSender>>,
    /// Dropping or signalling this stops the listener and every inbound connection.
    stop: tokio::sync::watch::Sender<bool>,
    accept: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl TcpTransport {
    /// Starts accepting peer connections on `listener` and returns the transport.
    pub fn start(
        me: PeerIdentity,
        listener: TcpListener,
        driver: std_mpsc::Sender<DriverMsg>,
        max_frame: usize,
    ) -> Arc<TcpTransport> {
        let runtime = tokio::runtime::Handle::current();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let accept = tokio::spawn(accept_loop(
            listener,
            me.clone(),
            driver.clone(),
            max_frame,
            stopped,
        ));
        Arc::new(TcpTransport {
            me,
            driver,
            runtime,
            peers: Mutex::new(HashMap::new()),
            stop,
            accept: Mutex::new(Some(accept)),
        })
    }

    /// Closes the listener (so the port can be bound again at once), every inbound
    /// connection and every outbound one.
    pub async fn stop(&self) {
        let _ = self.stop.send(true);
        for (_, p) in self.peers.lock().unwrap_or_else(|p| p.into_inner()).drain() {
            p.task.abort();
        }
        let accept = self.accept.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = accept {
            let _ = task.await;
        }
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for (_, p) in self.peers.lock().unwrap_or_else(|p| p.into_inner()).drain() {
            p.task.abort();
        }
    }
}

impl Transport for TcpTransport {
    fn send(&self, msgs: Vec<Message>) {
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        for m in msgs {
            let to = m.to;
            let is_snapshot = m.msg_type == MessageType::MsgSnapshot as i32;
            let queued = peers.get(&to).map(|p| p.queue.try_send(m).is_ok());
            if queued != Some(true) {
                let _ = self.driver.send(DriverMsg::Unreachable(to));
                if is_snapshot {
                    let _ = self.driver.send(DriverMsg::SnapshotStatus(to, false));
                }
            }
        }
    }

    fn set_peers(&self, list: Vec<(u64, String)>) {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let wanted: HashMap<u64, String> = list
            .into_iter()
            .filter(|(id, _)| *id != self.me.member_id)
            .collect();
        peers.retain(|id, p| {
            let keep = wanted.get(id) == Some(&p.addr);
            if !keep {
                p.task.abort();
            }
            keep
        });
        for (id, addr) in wanted {
            if peers.contains_key(&id) {
                continue;
            }
            let (tx, rx) = mpsc::channel(PEER_QUEUE);
            let task = self.runtime.spawn(peer_writer(
                self.me.clone(),
                id,
                addr.clone(),
                rx,
                self.driver.clone(),
            ));
            peers.insert(
                id,
                PeerSender {
                    addr,
                    queue: tx,
                    task,
                },
            );
        }
    }
}

/// Writes one length-prefixed frame.
pub async fn write_frame<W: AsyncWriteExt + Unpin>(
    w: &mut W,
    payload: &[u8],
) -> std::io::Result<()> {
    let len = u32::try_from(payload.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "frame too large"))?;
    w.write_all(&len.to_be_bytes()).await?;
    w.write_all(payload).await
}

/// Reads one length-prefixed frame, refusing frames larger than `max`.
pub async fn read_frame<R: AsyncReadExt + Unpin>(
    r: &mut R,
    max: usize,
) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the limit of {max}"),
        ));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    Ok(buf)
}

fn hello(me: &PeerIdentity) -> Vec<u8> {
    prost::Message::encode_to_vec(&PeerHello {
        protocol: PEER_PROTOCOL.into(),
        version: PEER_PROTOCOL_VERSION,
        cluster_id: me.cluster_id,
        member_id: me.member_id,
    })
}

/// Reads and checks the other side's hello. `expect_member` is set on outbound
/// connections, where we know whom we dialled.
async fn read_hello(
    stream: &mut TcpStream,
    me: &PeerIdentity,
    expect_member: Option<u64>,
) -> Result<PeerHello, String> {
    let frame = tokio::time::timeout(Duration::from_secs(5), read_frame(stream, 4096))
        .await
        .map_err(|_| "no handshake within 5s".to_string())?
        .map_err(|e| format!("handshake: {e}"))?;
    let h: PeerHello =
        prost::Message::decode(frame.as_slice()).map_err(|e| format!("bad handshake: {e}"))?;
    if h.protocol != PEER_PROTOCOL || h.version != PEER_PROTOCOL_VERSION {
        return Err(format!(
            "speaks protocol {:?} v{}, we speak {PEER_PROTOCOL} v{PEER_PROTOCOL_VERSION}",
            h.protocol, h.version
        ));
    }
    if h.cluster_id != me.cluster_id {
        return Err(format!(
            "belongs to cluster {:x}, we are cluster {:x}",
            h.cluster_id, me.cluster_id
        ));
    }
    if let Some(id) = expect_member {
        if h.member_id != id {
            return Err(format!(
                "is member {:x}, expected member {id:x}",
                h.member_id
            ));
        }
    }
    Ok(h)
}

async fn accept_loop(
    listener: TcpListener,
    me: PeerIdentity,
    driver: std_mpsc::Sender<DriverMsg>,
    max_frame: usize,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stopped.wait_for(|s| *s) => return,
        };
        match accepted {
            Ok((stream, addr)) => {
                let _ = stream.set_nodelay(true);
                let (me, driver, stopped) = (me.clone(), driver.clone(), stopped.clone());
                tokio::spawn(async move {
                    let mut stopped = stopped;
                    tokio::select! {
                        _ = serve_inbound(stream, addr, me, driver, max_frame) => {}
                        _ = stopped.wait_for(|s| *s) => {}
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "peer listener accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_inbound(
    mut stream: TcpStream,
    addr: SocketAddr,
    me: PeerIdentity,
    driver: std_mpsc::Sender<DriverMsg>,
    max_frame: usize,
) {
    let peer = match read_hello(&mut stream, &me, None).await {
        Ok(h) => h,
        Err(e) => {
            warn!(remote = %addr, "refusing peer connection: {e}");
            // Tell the other side who we are so it can log the mismatch too.
            let _ = write_frame(&mut stream, &hello(&me)).await;
            return;
        }
    };
    if write_frame(&mut stream, &hello(&me)).await.is_err() {
        return;
    }
    debug!(remote = %addr, peer = format_args!("{:x}", peer.member_id), "peer connected");
    loop {
        let frame = match read_frame(&mut stream, max_frame).await {
            Ok(f) => f,
            Err(e) => {
                if e.kind() != std::io::ErrorKind::UnexpectedEof {
                    warn!(remote = %addr, "closing peer connection: {e}");
                }
                return;
            }
        };
        let msg = match Message::decode(frame.as_slice()) {
            Ok(m) => m,
            Err(e) => {
                warn!(remote = %addr, "closing peer connection: undecodable raft message: {e}");
                return;
            }
        };
        if msg.to != me.member_id || msg.from != peer.member_id {
            warn!(remote = %addr, to = msg.to, from = msg.from, "dropping misaddressed raft message");
            continue;
        }
        if driver.send(DriverMsg::Raft(Box::new(msg))).is_err() {
            return;
        }
    }
}

async fn peer_writer(
    me: PeerIdentity,
    peer: u64,
    addr: String,
    mut rx: mpsc::Receiver<Message>,
    driver: std_mpsc::Sender<DriverMsg>,
) {
    let mut backoff = Duration::from_millis(50);
    let mut logged_down = false;
    loop {
        let connected = async {
            let mut s = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(&addr))
                .await
                .map_err(|_| "connect timed out".to_string())?
                .map_err(|e| format!("connect: {e}"))?;
            let _ = s.set_nodelay(true);
            write_frame(&mut s, &hello(&me))
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            read_hello(&mut s, &me, Some(peer)).await?;
            Ok::<_, String>(s)
        }
        .await;
        let stream = match connected {
            Ok(s) => s,
            Err(e) => {
                if !logged_down {
                    warn!(peer = format_args!("{peer:x}"), %addr, "peer unreachable: {e}");
                    logged_down = true;
                }
                let _ = driver.send(DriverMsg::Unreachable(peer));
                // Messages queued while down are stale; Raft resends what matters.
                while let Ok(m) = rx.try_recv() {
                    if m.msg_type == MessageType::MsgSnapshot as i32 {
                        let _ = driver.send(DriverMsg::SnapshotStatus(peer, false));
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        if logged_down {
            info!(peer = format_args!("{peer:x}"), %addr, "peer reachable again");
        }
        logged_down = false;
        backoff = Duration::from_millis(50);
        let mut w = BufWriter::with_capacity(256 * 1024, stream);
        let mut buf = Vec::new();
        'conn: loop {
            let Some(first) = rx.recv().await else { return };
            let mut batch = vec![first];
            while batch.len() < 256 {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            let snapshots = batch
                .iter()
                .filter(|m| m.msg_type == MessageType::MsgSnapshot as i32)
                .count();
            let mut written = Ok(());
            for m in &batch {
                buf.clear();
                m.encode(&mut buf).expect("vec has capacity");
                written = write_frame(&mut w, &buf).await;
                if written.is_err() {
                    break;
                }
            }
            if written.is_ok() {
                written = w.flush().await;
            }
            // Raft waits for a report on every snapshot it hands out.
            for _ in 0..snapshots {
                let _ = driver.send(DriverMsg::SnapshotStatus(peer, written.is_ok()));
            }
            if let Err(e) = written {
                warn!(peer = format_args!("{peer:x}"), "peer connection lost: {e}");
                break 'conn;
            }
        }
        let _ = driver.send(DriverMsg::Unreachable(peer));
    }
}
