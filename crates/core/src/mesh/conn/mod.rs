//! One mesh connection from TCP connect/accept to close: the versioned handshake and
//! the Noise NNpsk0 key exchange with its confirmation when a key is set
//! ([`handshake`]), registration (one connection per peer pair, here), then the writer
//! and the reader ([`io`]) and what each received frame does ([`dispatch`]).

mod dispatch;
mod handshake;
mod io;

use super::topology::{EntryConnection, Received};
use super::wire::{self, WireError};
use super::{
    dial_finished, topology_frame, ConnHandle, Inner, MeshMessageKind, PeerName, QUEUE_FRAMES,
};
use crate::proto::meshpb::{
    mesh_frame, mesh_frame_in, MeshFrame, MeshFrameIn, MeshHandshake, MeshHeartbeat,
};
use bytes::Bytes;
use dispatch::*;
use handshake::*;
pub(super) use io::Outbox;
use io::*;
use prost::Message;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

#[derive(Debug, thiserror::Error)]
pub(in crate::mesh) enum HandshakeError {
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
pub(in crate::mesh) enum ConnError {
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
    let sync = super::sync::NeighbourSync::new(&st.topology);
    st.conns.insert(
        remote,
        ConnHandle {
            id,
            remote_uid: hello.uid,
            address: hello.address.clone(),
            outbound,
            tx,
            outbox,
            sync,
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
