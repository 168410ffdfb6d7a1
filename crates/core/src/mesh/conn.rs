//! One mesh connection from TCP connect/accept to close: the versioned handshake, the
//! Noise NNpsk0 key exchange and its confirmation when a key is set, registration (one connection per
//! peer pair), then the writer (queue, coalesced topology, heartbeats, faults) and the
//! reader (dead-peer timeout, frame limits, delivery and relaying).
use super::topology::{EntryConnection, Received};
use super::wire::{self, WireError};
use super::{
    dial_finished, queue_topology, topology_frame, ConnHandle, Inner, MeshMessageKind, PeerName,
    QUEUE_FRAMES,
};
use crate::proto::meshpb::{
    mesh_frame, mesh_frame_in, MeshFrame, MeshFrameIn, MeshHandshake, MeshHeartbeat,
};
use bytes::Bytes;
use prost::Message;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("authentication failed (wrong or missing mesh key)")]
    Auth,
    #[error("connected to ourselves")]
    SelfConnection,
    #[error("handshake timed out")]
    Timeout,
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("no frame for {0:?}: peer dead")]
    Dead(std::time::Duration),
}

/// Dials `addr` and runs the connection.
pub(super) async fn dial(inner: Arc<Inner>, addr: String) {
    let connect = tokio::time::timeout(inner.cfg.dead_after, TcpStream::connect(&addr)).await;
    match connect {
        Ok(Ok(stream)) => run(inner, stream, addr.clone(), Some(addr)).await,
        Ok(Err(e)) => {
            tracing::debug!("mesh: dial {addr} failed: {e}");
            dial_finished(&inner, &addr, false);
        }
        Err(_) => {
            tracing::debug!("mesh: dial {addr} timed out");
            dial_finished(&inner, &addr, false);
        }
    }
}

/// Runs one connection to its end. `dialed` is the address we dialed (outbound) or
/// `None` for an accepted connection.
pub(super) async fn run(
    inner: Arc<Inner>,
    mut stream: TcpStream,
    remote_addr: String,
    dialed: Option<String>,
) {
    let outbound = dialed.is_some();
    let id = inner.next_conn_id.fetch_add(1, Ordering::Relaxed);
    inner
        .lock()
        .handshaking
        .insert(id, (remote_addr.clone(), outbound));
    let _ = stream.set_nodelay(true);
    let result = tokio::time::timeout(
        inner.cfg.dead_after,
        handshake(&inner, &mut stream, outbound),
    )
    .await
    .unwrap_or(Err(HandshakeError::Timeout));
    inner.lock().handshaking.remove(&id);
    let direction = if outbound { "to" } else { "from" };
    let (hello, sealed) = match result {
        Ok(x) => x,
        Err(e) => {
            inner
                .counters
                .handshakes_refused
                .fetch_add(1, Ordering::Relaxed);
            match &e {
                HandshakeError::SelfConnection => {
                    if let Some(a) = &dialed {
                        inner.lock().self_addresses.insert(a.clone());
                    }
                }
                HandshakeError::Io(_) | HandshakeError::Timeout => {
                    tracing::debug!("mesh: handshake {direction} {remote_addr} failed: {e}")
                }
                // The text keeps the address for plain-text readers; the fields are
                // for JSON logs.
                _ => tracing::warn!(
                    %direction,
                    addr = %remote_addr,
                    "mesh: refused connection {direction} {remote_addr}: {e}"
                ),
            }
            if let Some(a) = &dialed {
                dial_finished(&inner, a, false);
            }
            return;
        }
    };
    let remote = hello.name;
    let (cipher, send_nonce, recv_nonce) = match sealed {
        Some(s) => (Some(Arc::new(s.cipher)), s.send_nonce, s.recv_nonce),
        None => (None, 0, 0),
    };
    let (rd, wr) = stream.into_split();
    let outbox = Arc::new(Outbox {
        wr,
        cipher,
        state: std::sync::Mutex::new(OutboxState {
            nonce: send_nonce,
            ..OutboxState::default()
        }),
        backlog: Notify::new(),
    });
    let (rx, notify) = match register(&inner, id, &hello, outbound, outbox.clone()) {
        Ok(x) => x,
        Err(why) => {
            tracing::debug!("mesh: dropped connection {direction} {remote_addr}: {why}");
            if let Some(a) = &dialed {
                dial_finished(&inner, a, false);
            }
            return;
        }
    };
    if let Some(a) = &dialed {
        dial_finished(&inner, a, true);
    }
    tracing::info!(
        %direction,
        peer = %super::peer_name_string(remote),
        nickname = %hello.nickname,
        addr = %remote_addr,
        "mesh: connected"
    );
    let channels: Vec<_> = inner.lock().channels.values().cloned().collect();
    for ch in channels {
        inner.send_channel_state(&ch, &[remote]);
    }
    let cipher = outbox.cipher.clone();
    let reason = tokio::select! {
        r = write_loop(&inner, remote, id, &outbox, rx, notify) => r,
        // Buffered: a burst of small frames (Raft appends and acks) costs one read.
        r = read_loop(&inner, remote, tokio::io::BufReader::with_capacity(READ_BUFFER, rd), cipher, recv_nonce) => r,
    };
    match reason {
        Ok(()) => tracing::debug!("mesh: connection {direction} {remote_addr} replaced or closed"),
        Err(ConnError::Io(e)) => {
            tracing::debug!("mesh: connection {direction} {remote_addr} closed: {e}")
        }
        Err(e @ ConnError::Dead(_)) => {
            tracing::info!("mesh: connection {direction} {remote_addr} closed: {e}")
        }
        Err(e) => {
            inner
                .counters
                .frames_rejected
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!("mesh: closing connection {direction} {remote_addr}: {e}");
        }
    }
    deregister(&inner, remote, id);
}

/// The Noise transport state of an encrypted connection, with the nonce each direction
/// continues from after the handshake's confirmation record.
struct Sealed {
    cipher: snow::StatelessTransportState,
    send_nonce: u64,
    recv_nonce: u64,
}

async fn handshake(
    inner: &Inner,
    stream: &mut TcpStream,
    outbound: bool,
) -> Result<(MeshHandshake, Option<Sealed>), HandshakeError> {
    let ours = MeshHandshake {
        protocol: wire::PROTOCOL.into(),
        min_version: wire::MIN_VERSION,
        max_version: wire::MAX_VERSION,
        name: inner.cfg.name,
        nickname: inner.cfg.nickname.clone(),
        uid: inner.uid,
        address: inner.cfg.advertise.clone(),
        encrypted: inner.psk.is_some(),
    }
    .encode_to_vec();
    write_record(inner, stream, &ours).await?;
    let theirs = read_record(inner, stream, wire::MAX_HANDSHAKE).await?;
    let hello = wire::decode_handshake(&theirs)?;
    if hello.encrypted != inner.psk.is_some() {
        return Err(HandshakeError::Auth);
    }
    if hello.name == inner.cfg.name {
        return Err(HandshakeError::SelfConnection);
    }
    let Some(psk) = &inner.psk else {
        return Ok((hello, None));
    };
    // Both handshake records are the prologue: altering either fails the key exchange.
    let (first, second) = if outbound {
        (&ours, &theirs)
    } else {
        (&theirs, &ours)
    };
    let mut prologue = wire::with_length_prefix(first);
    prologue.extend_from_slice(&wire::with_length_prefix(second));
    let params = wire::NOISE_PARAMS.parse().expect("valid noise params");
    let builder = snow::Builder::new(params)
        .psk(0, psk)
        .and_then(|b| b.prologue(&prologue))
        .map_err(|_| HandshakeError::Auth)?;
    let mut buf = [0u8; 256];
    let mut payload = [0u8; 256];
    let hs = if outbound {
        let mut hs = builder
            .build_initiator()
            .map_err(|_| HandshakeError::Auth)?;
        let n = hs
            .write_message(&[], &mut buf)
            .map_err(|_| HandshakeError::Auth)?;
        write_record(inner, stream, &buf[..n]).await?;
        let reply = read_record(inner, stream, buf.len())
            .await
            .map_err(|_| HandshakeError::Auth)?;
        hs.read_message(&reply, &mut payload)
            .map_err(|_| HandshakeError::Auth)?;
        hs
    } else {
        let mut hs = builder
            .build_responder()
            .map_err(|_| HandshakeError::Auth)?;
        let msg = read_record(inner, stream, buf.len())
            .await
            .map_err(|_| HandshakeError::Auth)?;
        hs.read_message(&msg, &mut payload)
            .map_err(|_| HandshakeError::Auth)?;
        let n = hs
            .write_message(&[], &mut buf)
            .map_err(|_| HandshakeError::Auth)?;
        write_record(inner, stream, &buf[..n]).await?;
        hs
    };
    let cipher = hs
        .into_stateless_transport_mode()
        .map_err(|_| HandshakeError::Auth)?;
    let mut nonce = 0;
    if outbound {
        let sealed = wire::seal(&cipher, &mut nonce, wire::CONFIRM)?;
        write_record(inner, stream, &sealed).await?;
        Ok((
            hello,
            Some(Sealed {
                cipher,
                send_nonce: nonce,
                recv_nonce: 0,
            }),
        ))
    } else {
        let record = read_record(inner, stream, wire::sealed_len(wire::CONFIRM.len()))
            .await
            .map_err(|_| HandshakeError::Auth)?;
        let plain = wire::open(&cipher, &mut nonce, &record).map_err(|_| HandshakeError::Auth)?;
        if plain != wire::CONFIRM {
            return Err(HandshakeError::Auth);
        }
        Ok((
            hello,
            Some(Sealed {
                cipher,
                send_nonce: 0,
                recv_nonce: nonce,
            }),
        ))
    }
}

async fn write_record(
    inner: &Inner,
    w: &mut (impl AsyncWrite + Unpin),
    payload: &[u8],
) -> std::io::Result<()> {
    w.write_all(&wire::with_length_prefix(payload)).await?;
    inner
        .counters
        .bytes_out
        .fetch_add(payload.len() as u64 + 4, Ordering::Relaxed);
    Ok(())
}

/// Reads one frame record: its first bytes must arrive by `deadline`, and after that
/// every read must make progress within `dead_after`, so a frame far larger than a
/// link moves in `dead_after` is not mistaken for a dead peer.
async fn read_frame_record(
    inner: &Inner,
    r: &mut (impl AsyncRead + Unpin),
    max: usize,
    deadline: Instant,
) -> Result<Vec<u8>, ConnError> {
    let dead = || ConnError::Dead(inner.cfg.dead_after);
    let eof = || ConnError::from(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
    let mut prefix = [0u8; 4];
    let mut got = 0;
    while got < prefix.len() {
        let n = match tokio::time::timeout_at(deadline, r.read(&mut prefix[got..])).await {
            Ok(n) => n?,
            // The deadline passed while we waited, or while this task waited for its
            // turn on a busy runtime: bytes already waiting mean the peer is alive.
            // (`read` is cancel safe: a timed-out read consumed nothing.)
            Err(_) => tokio::time::timeout(
                Duration::ZERO,
                tokio::task::unconstrained(r.read(&mut prefix[got..])),
            )
            .await
            .map_err(|_| dead())??,
        };
        if n == 0 {
            return Err(eof());
        }
        got += n;
    }
    let len = wire::parse_length(prefix, max)?;
    let mut buf = vec![0u8; len];
    let mut filled = 0;
    while filled < len {
        let n = tokio::time::timeout(inner.cfg.dead_after, r.read(&mut buf[filled..]))
            .await
            .map_err(|_| dead())??;
        if n == 0 {
            return Err(eof());
        }
        filled += n;
    }
    inner
        .counters
        .bytes_in
        .fetch_add(len as u64 + 4, Ordering::Relaxed);
    Ok(buf)
}

async fn read_record(
    inner: &Inner,
    r: &mut (impl AsyncRead + Unpin),
    max: usize,
) -> Result<Vec<u8>, ConnError> {
    let mut prefix = [0u8; 4];
    r.read_exact(&mut prefix).await?;
    let len = wire::parse_length(prefix, max)?;
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    inner
        .counters
        .bytes_in
        .fetch_add(len as u64 + 4, Ordering::Relaxed);
    Ok(buf)
}

impl From<ConnError> for HandshakeError {
    fn from(e: ConnError) -> Self {
        match e {
            ConnError::Io(e) => HandshakeError::Io(e),
            ConnError::Wire(e) => HandshakeError::Wire(e),
            ConnError::Dead(_) => HandshakeError::Timeout,
        }
    }
}

type Registered = (mpsc::Receiver<Bytes>, Arc<Notify>);

/// Admits a handshaken connection: at most one per peer pair (the one dialed by the
/// lower name wins, so both ends keep the same one; a new uid replaces a stale one),
/// within `max_connections`, and not while a partition fault is set.
fn register(
    inner: &Inner,
    id: u64,
    hello: &MeshHandshake,
    outbound: bool,
    outbox: Arc<Outbox>,
) -> Result<Registered, &'static str> {
    let own = inner.cfg.name;
    let remote = hello.name;
    let mut st = inner.lock();
    if st
        .faults
        .get(&remote)
        .is_some_and(|f| f.drop_in && f.drop_out)
    {
        return Err("link fault set");
    }
    let preferred = |outbound: bool| if own < remote { outbound } else { !outbound };
    if let Some(old) = st.conns.get(&remote) {
        let replace =
            old.remote_uid != hello.uid || (preferred(outbound) && !preferred(old.outbound));
        if !replace {
            return Err("duplicate connection");
        }
    } else if st.conns.len() >= inner.cfg.max_connections {
        return Err("max connections reached");
    }
    let (tx, rx) = mpsc::channel(QUEUE_FRAMES);
    // Our summary first: a neighbour holding the same entries answers nothing; one
    // that differs starts the digest exchange, so only missing entries cross.
    let _ = tx.try_send(super::summary_frame(&st));
    let notify = Arc::new(Notify::new());
    st.conns.insert(
        remote,
        ConnHandle {
            id,
            remote_uid: hello.uid,
            address: hello.address.clone(),
            outbound,
            tx,
            outbox,
            topology_pending: HashSet::new(),
            remote_knows: HashMap::new(),
            topology_notify: notify.clone(),
        },
    );
    st.topology.update_own(|e| {
        e.connections.retain(|c| c.peer != remote);
        e.connections.push(EntryConnection {
            peer: remote,
            outbound,
        });
    });
    drop(st);
    inner.own_changed.notify_one();
    inner.bump_changes();
    Ok((rx, notify))
}

fn deregister(inner: &Inner, remote: PeerName, id: u64) {
    let mut st = inner.lock();
    if st.conns.get(&remote).is_some_and(|c| c.id == id) {
        st.conns.remove(&remote);
        st.topology
            .update_own(|e| e.connections.retain(|c| c.peer != remote));
        drop(st);
        inner.own_changed.notify_one();
        inner.bump_changes();
    }
}

/// Sends queued frames, coalesced topology deltas and heartbeats until the connection is
/// deregistered or replaced (Ok) or the socket fails.
async fn write_loop(
    inner: &Inner,
    remote: PeerName,
    id: u64,
    outbox: &Outbox,
    mut rx: mpsc::Receiver<Bytes>,
    notify: Arc<Notify>,
) -> Result<(), ConnError> {
    let heartbeat = Bytes::from(
        MeshFrame {
            body: Some(mesh_frame::Body::Heartbeat(MeshHeartbeat {})),
        }
        .encode_to_vec(),
    );
    let mut beat = tokio::time::interval(inner.cfg.heartbeat);
    // Topology changes are sent at most once per batch period, so a burst of version
    // bumps (a peer connecting to several others) travels as one entry.
    let batch = (inner.cfg.gossip_interval / 10)
        .clamp(Duration::from_millis(1), Duration::from_millis(100));
    let mut last_topology = Instant::now() - batch;
    let mut topology_due: Option<Instant> = None;
    // Frames held back by a delay fault, in order, each with the time it may go: a
    // delay adds latency to every frame, it does not space them out.
    let mut delayed: VecDeque<(Instant, Bytes)> = VecDeque::new();
    loop {
        let due = topology_due.unwrap_or_else(Instant::now);
        let release = delayed.front().map(|(at, _)| *at);
        let (frame, is_gossip) = tokio::select! {
            biased;
            _ = tokio::time::sleep_until(release.unwrap_or_else(Instant::now)), if release.is_some() => {
                let now = Instant::now();
                let mut frames = Vec::new();
                while let Some((at, _)) = delayed.front() {
                    if *at > now {
                        break;
                    }
                    frames.push(delayed.pop_front().expect("checked").1);
                }
                outbox.push(inner, &frames)?;
                if delayed.is_empty() {
                    outbox.hold(false);
                }
                outbox.flush().await?;
                continue;
            }
            _ = notify.notified(), if topology_due.is_none() => {
                topology_due = Some((last_topology + batch).max(Instant::now()));
                continue;
            }
            _ = tokio::time::sleep_until(due), if topology_due.is_some() => {
                topology_due = None;
                last_topology = Instant::now();
                let mut st = inner.lock();
                let Some(c) = st.conns.get_mut(&remote).filter(|c| c.id == id) else {
                    return Ok(());
                };
                let names = std::mem::take(&mut c.topology_pending);
                let mut knows = std::mem::take(&mut c.remote_knows);
                // Skip what the neighbour already has (it sent it to us, or we did).
                let names: Vec<PeerName> = names
                    .into_iter()
                    .filter(|n| match st.topology.get(*n) {
                        Some(e) if knows.get(n).is_none_or(|&k| (e.version, e.uid) > k) => {
                            knows.insert(*n, (e.version, e.uid));
                            true
                        }
                        _ => false,
                    })
                    .collect();
                let frame = topology_frame(&st, names);
                if let Some(c) = st.conns.get_mut(&remote) {
                    c.remote_knows = knows;
                }
                match frame {
                    Some(f) => (f, true),
                    None => continue,
                }
            }
            m = rx.recv() => match m {
                Some(f) => (f, true),
                None => return Ok(()),
            },
            _ = beat.tick() => (heartbeat.clone(), false),
            // Frames written directly that the socket did not take at once.
            _ = outbox.backlog.notified() => {
                outbox.flush().await?;
                continue;
            }
        };
        let fault = inner.fault(remote);
        if fault.drop_out {
            continue;
        }
        if is_gossip {
            inner
                .counters
                .gossip_bytes_out
                .fetch_add(frame.len() as u64, Ordering::Relaxed);
        }
        if fault.delay.is_some() || !delayed.is_empty() {
            // Never before a frame queued earlier, even if the delay just shrank or
            // was cleared; nor does a direct write go first while frames are held.
            let at = Instant::now() + fault.delay.unwrap_or_default();
            let at = delayed.back().map_or(at, |(last, _)| at.max(*last));
            if delayed.is_empty() {
                outbox.hold(true);
            }
            delayed.push_back((at, frame));
            continue;
        }
        // Frames queued behind this one go out in the same write.
        let mut frames = vec![frame];
        let mut bytes = frames[0].len();
        while bytes < WRITE_BATCH {
            match rx.try_recv() {
                Ok(more) => {
                    inner
                        .counters
                        .gossip_bytes_out
                        .fetch_add(more.len() as u64, Ordering::Relaxed);
                    bytes += more.len();
                    frames.push(more);
                }
                Err(_) => break,
            }
        }
        outbox.push(inner, &frames)?;
        outbox.flush().await?;
    }
}

/// The sending side of a connection, shared by its task and by [`Inner::send_to`] on
/// any thread. Frames are sealed (nonces in write order) and written by whichever
/// thread pushes them, as far as the socket takes them at once; the connection task
/// writes the rest once the socket is writable again. A Raft message from the driver
/// thread so goes straight to the socket: handing each one to the connection task cost
/// a thread wake-up per hop, a fifth of a ReadIndex round trip on loopback.
pub(super) struct Outbox {
    wr: tokio::net::tcp::OwnedWriteHalf,
    cipher: Option<Arc<snow::StatelessTransportState>>,
    state: std::sync::Mutex<OutboxState>,
    /// Tells the connection task that bytes wait for the socket.
    backlog: Notify,
}

#[derive(Default)]
struct OutboxState {
    nonce: u64,
    /// Sealed records the socket has not taken yet.
    pending: Vec<u8>,
    /// The socket failed: the connection task ends the connection.
    failed: bool,
    /// The connection task holds frames back for a delay fault; a direct write would
    /// overtake them (the fault itself may already be cleared).
    held: bool,
}

impl Outbox {
    fn state(&self) -> std::sync::MutexGuard<'_, OutboxState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `frame` now if nothing is waiting for the socket (so it overtakes nothing);
    /// otherwise returns it, for the queue.
    pub(super) fn try_send_now(&self, inner: &Inner, frame: Bytes) -> Result<(), Bytes> {
        let mut st = self.state();
        if st.failed || st.held || !st.pending.is_empty() {
            return Err(frame);
        }
        if self.seal(inner, &mut st, &[frame]).is_err() {
            return Ok(());
        }
        self.write_some(&mut st);
        Ok(())
    }

    /// Whether the connection task holds delayed frames (see [`OutboxState::held`]).
    fn hold(&self, held: bool) {
        self.state().held = held;
    }

    /// Seals `frames` behind whatever waits, and writes what the socket takes.
    fn push(&self, inner: &Inner, frames: &[Bytes]) -> Result<(), ConnError> {
        let mut st = self.state();
        self.seal(inner, &mut st, frames)?;
        self.write_some(&mut st);
        Ok(())
    }

    fn seal(&self, inner: &Inner, st: &mut OutboxState, frames: &[Bytes]) -> Result<(), ConnError> {
        let OutboxState { nonce, pending, .. } = st;
        for f in frames {
            if let Err(e) = append_record(inner, &self.cipher, nonce, pending, f) {
                st.failed = true;
                self.backlog.notify_one();
                return Err(e);
            }
        }
        Ok(())
    }

    /// One non-blocking write of what is pending; wakes the connection task for the
    /// rest, or for a failed socket.
    fn write_some(&self, st: &mut OutboxState) {
        if st.failed || st.pending.is_empty() {
            return;
        }
        match self.wr.try_write(&st.pending) {
            Ok(n) => {
                st.pending.drain(..n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => st.failed = true,
        }
        if st.failed || st.held || !st.pending.is_empty() {
            self.backlog.notify_one();
        }
    }

    /// Writes everything pending, waiting for the socket as needed (the connection
    /// task only).
    async fn flush(&self) -> Result<(), ConnError> {
        loop {
            {
                let mut st = self.state();
                if st.failed {
                    return Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe).into());
                }
                if st.pending.is_empty() {
                    return Ok(());
                }
                match self.wr.try_write(&st.pending) {
                    Ok(n) => {
                        st.pending.drain(..n);
                        continue;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        st.failed = true;
                        return Err(e.into());
                    }
                }
            }
            self.wr.writable().await?;
        }
    }
}

/// Bytes read from a connection at once.
const READ_BUFFER: usize = 64 * 1024;
/// Queued frames are joined into one write up to about this many bytes.
const WRITE_BATCH: usize = 256 * 1024;

/// Appends `frame` to `out` as one record (sealed when the connection is encrypted).
fn append_record(
    inner: &Inner,
    cipher: &Option<Arc<snow::StatelessTransportState>>,
    nonce: &mut u64,
    out: &mut Vec<u8>,
    frame: &[u8],
) -> Result<(), ConnError> {
    let sealed;
    let payload = match cipher {
        Some(c) => {
            sealed = wire::seal(c, nonce, frame)?;
            &sealed[..]
        }
        None => frame,
    };
    wire::push_length_prefixed(out, payload);
    inner
        .counters
        .bytes_out
        .fetch_add(payload.len() as u64 + 4, Ordering::Relaxed);
    Ok(())
}

/// Reads, checks and handles frames until the socket fails, a frame is refused, or no
/// frame arrived for `dead_after`.
async fn read_loop(
    inner: &Inner,
    remote: PeerName,
    mut rd: impl AsyncRead + Unpin,
    cipher: Option<Arc<snow::StatelessTransportState>>,
    mut nonce: u64,
) -> Result<(), ConnError> {
    let plain_limit = inner.cfg.max_frame + wire::FRAME_OVERHEAD;
    let limit = if cipher.is_some() {
        wire::sealed_len(plain_limit)
    } else {
        plain_limit
    };
    let mut last_good = Instant::now();
    loop {
        let deadline = last_good + inner.cfg.dead_after;
        let record = read_frame_record(inner, &mut rd, limit, deadline).await?;
        let plain = match &cipher {
            Some(c) => wire::open(c, &mut nonce, &record)?,
            None => record,
        };
        if plain.len() > plain_limit {
            return Err(WireError::TooLarge {
                len: plain.len(),
                max: plain_limit,
            }
            .into());
        }
        let len = plain.len();
        let frame = wire::decode_frame_bytes(plain.into())?;
        if inner.fault(remote).drop_in {
            continue;
        }
        last_good = Instant::now();
        handle_frame(inner, remote, frame, len);
    }
}

/// Whether a unicast that arrived from neighbour `from` can have come from `src`. The
/// mesh authenticates only the neighbour: a relayed message's claimed source cannot be
/// checked here (the Raft transport binds senders to the peers they are published on),
/// and routes differ between peers while the topology converges, so a neighbour's
/// message may arrive relayed. A message claiming to come from this node is forged.
fn plausible_source(inner: &Inner, from: PeerName, src: PeerName) -> bool {
    src == from || src != inner.cfg.name
}

fn handle_frame(inner: &Inner, from: PeerName, frame: MeshFrameIn, len: usize) {
    use mesh_frame_in::Body;
    let own = inner.cfg.name;
    let body = match frame.body {
        Some(Body::Heartbeat(_)) | None => return,
        Some(b) => b,
    };
    inner
        .counters
        .gossip_bytes_in
        .fetch_add(len as u64, Ordering::Relaxed);
    match body {
        Body::Heartbeat(_) => {}
        Body::Topology(t) => {
            // Headers were checked by `decode_frame`.
            let entries: Vec<Received> = t
                .peers
                .into_iter()
                .filter_map(|p| Received::parse(p).ok())
                .collect();
            let mut st = inner.lock();
            if let Some(c) = st.conns.get_mut(&from) {
                for e in &entries {
                    c.learn_remote_knows(e.name, (e.version, e.uid));
                }
            }
            let changed = st.topology.merge(entries);
            if changed.is_empty() {
                return;
            }
            queue_topology(&mut st, &changed, Some(from));
            if changed.contains(&own) {
                if let Some(c) = st.conns.get_mut(&from) {
                    c.topology_pending.insert(own);
                    c.topology_notify.notify_one();
                }
            }
            drop(st);
            inner.bump_changes();
        }
        Body::Digest(d) if d.summary_only => {
            let mut st = inner.lock();
            let same = d.summary == st.topology.summary();
            let held: HashMap<PeerName, (u64, u64)> = if same {
                st.topology
                    .entries()
                    .map(|e| (e.name, (e.version, e.uid)))
                    .collect()
            } else {
                HashMap::new()
            };
            let full = (!same).then(|| super::digest_frame(&st, false));
            if let Some(c) = st.conns.get_mut(&from) {
                match full {
                    // It holds exactly what we hold.
                    None => c.remote_knows = held,
                    Some(f) => {
                        let _ = c.tx.try_send(f);
                    }
                }
            }
        }
        Body::Digest(d) => {
            let mut st = inner.lock();
            if let Some(c) = st.conns.get_mut(&from) {
                // The digest is exactly what it holds now.
                c.remote_knows = d
                    .items
                    .iter()
                    .map(|i| (i.name, (i.version, i.uid)))
                    .collect();
            }
            let (send, they_have_news) = st.topology.diff(&d.items);
            let reply = (they_have_news && !d.reply).then(|| super::digest_frame(&st, true));
            if let Some(c) = st.conns.get_mut(&from) {
                if !send.is_empty() {
                    c.topology_pending.extend(send);
                    c.topology_notify.notify_one();
                }
                if let Some(r) = reply {
                    let _ = c.tx.try_send(r);
                }
            }
        }
        Body::Channel(mut m) => {
            let kind = MeshMessageKind::try_from(m.kind).unwrap_or(MeshMessageKind::Gossip);
            let ch = inner.lock().channels.get(&m.channel).cloned();
            match kind {
                MeshMessageKind::Gossip => {
                    if let Some(ch) = ch {
                        if let Err(e) = ch.gossiper.on_gossip(&m.payload) {
                            tracing::debug!(channel = m.channel, "mesh: gossip rejected: {e}");
                        }
                    }
                }
                MeshMessageKind::Unicast
                    if m.dst == own && !plausible_source(inner, from, m.src) =>
                {
                    inner
                        .counters
                        .unicasts_refused
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        channel = m.channel,
                        via = %super::peer_name_string(from),
                        claimed = %super::peer_name_string(m.src),
                        "mesh: unicast refused: it claims to come from this node"
                    );
                }
                MeshMessageKind::Unicast if m.dst == own => match ch {
                    Some(ch) => {
                        if let Err(e) = ch.gossiper.on_unicast(m.src, &m.payload) {
                            tracing::debug!(channel = m.channel, "mesh: unicast rejected: {e}");
                        }
                    }
                    None => {
                        tracing::debug!(channel = m.channel, "mesh: unicast for unknown channel")
                    }
                },
                MeshMessageKind::Unicast => {
                    let hop = inner.lock().topology.route(m.dst).map(|r| r.0);
                    match hop {
                        Some(hop) if m.ttl > 1 => {
                            m.ttl -= 1;
                            let frame = MeshFrame {
                                body: Some(mesh_frame::Body::Channel(m)),
                            };
                            if let Err(e) = inner.send_to(hop, Bytes::from(frame.encode_to_vec())) {
                                tracing::debug!("mesh: unicast relay dropped: {e}");
                            }
                        }
                        _ => tracing::debug!("mesh: unicast to {} dropped: no route", m.dst),
                    }
                }
                MeshMessageKind::Broadcast => {
                    if m.src == own || m.ttl <= 1 {
                        return;
                    }
                    // Relay only what was new here; a channel we do not know is relayed
                    // as is so peers behind us still get it.
                    let parts = match ch {
                        Some(ch) => match ch.gossiper.on_broadcast(m.src, &m.payload) {
                            Ok(Some(delta)) => delta.encode(),
                            Ok(None) => Vec::new(),
                            Err(e) => {
                                tracing::debug!(
                                    channel = m.channel,
                                    "mesh: broadcast rejected: {e}"
                                );
                                Vec::new()
                            }
                        },
                        None => vec![m.payload],
                    };
                    for part in parts {
                        inner.relay_broadcast(&m.channel, m.src, part, Some(from), m.ttl - 1);
                    }
                }
            }
        }
    }
}
