//! A hostile mesh peer for tests: it speaks the mesh protocol itself (the handshake
//! record, the Noise exchange with or without the key and its confirmation, sealed
//! frames, heartbeats) and sends whatever a test asks: forged sources, Raft messages
//! from members it is not, malformed or oversized records.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mesh_core::mesh::{wire, MeshKey};
use mesh_core::proto::meshpb::{
    mesh_frame, MeshChannelMessage, MeshFrame, MeshHandshake, MeshHeartbeat, MeshMessageKind,
    MeshPeerEntry, MeshTopology, RaftEnvelope,
};
use prost::Message as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Mutex};

struct Writer {
    wr: OwnedWriteHalf,
    cipher: Option<Arc<snow::StatelessTransportState>>,
    nonce: u64,
}

impl Writer {
    async fn frame(&mut self, frame: &MeshFrame) -> std::io::Result<()> {
        let plain = frame.encode_to_vec();
        let record = match &self.cipher {
            Some(c) => wire::seal(c, &mut self.nonce, &plain)
                .map_err(|e| std::io::Error::other(e.to_string()))?,
            None => plain,
        };
        self.wr.write_all(&wire::with_length_prefix(&record)).await
    }
}

/// A connected hostile peer. It sends a heartbeat every 50 ms and keeps the channel
/// messages it receives for [`HostilePeer::received`], so the member keeps the
/// connection until it refuses something.
pub struct HostilePeer {
    /// The mesh name this peer claims.
    pub name: u64,
    /// The member's handshake record.
    pub remote: MeshHandshake,
    writer: Arc<Mutex<Writer>>,
    closed: Arc<AtomicBool>,
    received: Mutex<mpsc::UnboundedReceiver<MeshChannelMessage>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn read_record(s: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > 16 << 20 {
        return Err(std::io::Error::other("record too large"));
    }
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).await?;
    Ok(buf)
}

impl HostilePeer {
    /// Handshakes with the member at `addr` as mesh peer `name`, with `key` or without
    /// one. Fails when the member refuses the handshake.
    pub async fn connect(
        addr: &str,
        name: u64,
        key: Option<&MeshKey>,
    ) -> std::io::Result<HostilePeer> {
        let mut s = TcpStream::connect(addr).await?;
        let hello = MeshHandshake {
            protocol: wire::PROTOCOL.into(),
            min_version: wire::MIN_VERSION,
            max_version: wire::MAX_VERSION,
            name,
            nickname: "hostile".into(),
            uid: rand_u64(),
            address: String::new(),
            encrypted: key.is_some(),
        }
        .encode_to_vec();
        s.write_all(&wire::with_length_prefix(&hello)).await?;
        let theirs = read_record(&mut s).await?;
        let remote =
            wire::decode_handshake(&theirs).map_err(|e| std::io::Error::other(e.to_string()))?;
        let cipher = match key {
            None => None,
            Some(k) => {
                let mut prologue = wire::with_length_prefix(&hello);
                prologue.extend_from_slice(&wire::with_length_prefix(&theirs));
                let noise_err = |e: snow::Error| std::io::Error::other(e.to_string());
                let mut hs = snow::Builder::new(wire::NOISE_PARAMS.parse().map_err(noise_err)?)
                    .psk(0, k.bytes())
                    .and_then(|b| b.prologue(&prologue))
                    .and_then(|b| b.build_initiator())
                    .map_err(noise_err)?;
                let mut buf = [0u8; 256];
                let n = hs.write_message(&[], &mut buf).map_err(noise_err)?;
                s.write_all(&wire::with_length_prefix(&buf[..n])).await?;
                let reply = read_record(&mut s).await?;
                hs.read_message(&reply, &mut buf).map_err(noise_err)?;
                Some(Arc::new(
                    hs.into_stateless_transport_mode().map_err(noise_err)?,
                ))
            }
        };
        let (mut rd, wr) = s.into_split();
        let mut writer = Writer {
            wr,
            cipher,
            nonce: 0,
        };
        if let Some(c) = &writer.cipher {
            let confirm = wire::seal(c, &mut writer.nonce, wire::CONFIRM)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            writer
                .wr
                .write_all(&wire::with_length_prefix(&confirm))
                .await?;
        }
        let cipher = writer.cipher.clone();
        let writer = Arc::new(Mutex::new(writer));
        let closed = Arc::new(AtomicBool::new(false));
        let (received_tx, received) = mpsc::unbounded_channel();
        let reader = {
            let closed = closed.clone();
            tokio::spawn(async move {
                let mut nonce = 0;
                while let Ok(record) = read_record(&mut rd).await {
                    let plain = match &cipher {
                        Some(c) => match wire::open(c, &mut nonce, &record) {
                            Ok(p) => p,
                            Err(_) => break,
                        },
                        None => record,
                    };
                    if let Ok(MeshFrame {
                        body: Some(mesh_frame::Body::Channel(m)),
                    }) = MeshFrame::decode(plain.as_slice())
                    {
                        let _ = received_tx.send(m);
                    }
                }
                closed.store(true, Ordering::Release);
            })
        };
        let beat = {
            let (writer, closed) = (writer.clone(), closed.clone());
            tokio::spawn(async move {
                let hb = MeshFrame {
                    body: Some(mesh_frame::Body::Heartbeat(MeshHeartbeat {})),
                };
                loop {
                    if writer.lock().await.frame(&hb).await.is_err() {
                        closed.store(true, Ordering::Release);
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        Ok(HostilePeer {
            name,
            remote,
            writer,
            closed,
            received: Mutex::new(received),
            tasks: vec![reader, beat],
        })
    }

    /// Whether the member closed the connection.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// The payload of the next message the member sent this peer on `channel`
    /// (messages on other channels are dropped), if one comes within `within`.
    pub async fn received(&self, channel: &str, within: Duration) -> Option<Vec<u8>> {
        let mut rx = self.received.lock().await;
        tokio::time::timeout(within, async {
            loop {
                let m = rx.recv().await?;
                if m.channel == channel {
                    return Some(m.payload);
                }
            }
        })
        .await
        .ok()
        .flatten()
    }

    pub async fn send(&self, frame: MeshFrame) -> std::io::Result<()> {
        self.writer.lock().await.frame(&frame).await
    }

    /// A unicast on `channel` to the member, claiming to come from `src`.
    pub async fn unicast(&self, channel: &str, src: u64, payload: Vec<u8>) -> std::io::Result<()> {
        self.send(MeshFrame {
            body: Some(mesh_frame::Body::Channel(MeshChannelMessage {
                channel: channel.into(),
                kind: MeshMessageKind::Unicast as i32,
                src,
                dst: self.remote.name,
                ttl: 8,
                payload,
            })),
        })
        .await
    }

    /// A Raft message in its envelope, from member `from` of `cluster_id`, sent by
    /// this peer under its own mesh name.
    pub async fn raft(
        &self,
        cluster_id: u64,
        from: u64,
        to: u64,
        msg: &raft::prelude::Message,
    ) -> std::io::Result<()> {
        let env = RaftEnvelope {
            cluster_id,
            from,
            to,
            msg_id: rand_u64(),
            chunk: 0,
            chunks: 1,
            data: prost011::Message::encode_to_vec(msg),
        };
        self.unicast("raft", self.name, env.encode_to_vec()).await
    }

    /// Topology entries, as if gossiped.
    pub async fn topology(&self, peers: Vec<MeshPeerEntry>) -> std::io::Result<()> {
        self.send(MeshFrame {
            body: Some(mesh_frame::Body::Topology(MeshTopology { peers })),
        })
        .await
    }
}

impl Drop for HostilePeer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id() as u64);
    h.finish()
}
