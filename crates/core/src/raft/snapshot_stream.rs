//! Raft snapshots over the mesh, of any size: the leader streams the snapshot file on
//! the `raft-snapshot` channel with at most [`WINDOW_BYTES`] unacknowledged, and the
//! member writes it to its data dir as it arrives (memory: one chunk), checks its
//! length, hash and contents, and only then hands the snapshot message to its driver.
//! The leader reports the outcome to raft-rs when the member confirms or refuses the
//! transfer (a chunk out of order is refused: one was lost), or when it stalls.
//!
//! A transfer that fails is resumed, not begun again: the member keeps what it wrote
//! of the file, and when the same sender starts a transfer of the same file (same
//! length and SHA-256: raft-rs asks for the snapshot again, and the leader reuses the
//! file it built) it answers the first chunk with the offset to go on from. The
//! whole file is still checked against its hash at the end. Within a transfer, a
//! sender that hears nothing for a second asks where the member's file ends (an empty
//! chunk) and goes on from there, so lost chunks or acknowledgements (a mesh
//! connection replaced or cut on the way) cost about a second, not a stall.

use std::collections::HashMap;
use std::io::{Read, Seek, Write};
use std::path::PathBuf;
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use prost011::Message as _;
use raft::prelude::{Message, MessageType};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::mesh_transport::MemberRoutes;
use super::validate::Refusal;
use super::{DriverMsg, NodeStatus};
use crate::mesh::{GossipChannel, GossipError, Gossiper, MeshError, PeerName};
use crate::proto::meshpb::{SnapshotChunk, SnapshotRef};

/// Name of the mesh channel that carries snapshot files.
pub const SNAPSHOT_CHANNEL: &str = "raft-snapshot";
/// Bytes of file per chunk.
pub const CHUNK_BYTES: usize = 1 << 20;
/// Bytes the leader sends ahead of the member's acknowledgements.
pub const WINDOW_BYTES: u64 = 8 << 20;
/// A transfer without progress for this long is given up (raft-rs then sends the
/// snapshot again, and the transfer resumes where the member's file ends).
const STALL: Duration = Duration::from_secs(10);
/// A transfer the member has not answered at all after this long is given up: it
/// acknowledges the first chunk at once, so the route is gone (a member just
/// restarted, or moved to another hop) and the next transfer takes the new one.
const FIRST_ANSWER: Duration = Duration::from_secs(5);
/// Without an acknowledgement for this long, the sender asks the member where its file
/// ends (an empty chunk), and goes on from there.
const PROBE: Duration = Duration::from_secs(1);
/// A partly received file from a sender that started nothing since is removed after
/// this long (one from the same sender is replaced or resumed at its next transfer).
const KEEP_PARTIAL: Duration = Duration::from_secs(600);

/// Both ends of snapshot transfers on one member.
pub struct SnapshotStreams {
    member_id: u64,
    cluster_id: u64,
    /// Where received files are written (`snap/` in the data dir).
    dir: PathBuf,
    routes: Arc<MemberRoutes>,
    status: Arc<NodeStatus>,
    driver: std_mpsc::Sender<DriverMsg>,
    channel: std::sync::OnceLock<Arc<GossipChannel>>,
    /// Outgoing transfers waiting for acknowledgements, by stream number.
    /// (The member it goes to, where its answers go.)
    outgoing: Mutex<HashMap<u64, (u64, mpsc::UnboundedSender<SnapshotChunk>)>>,
    /// The transfer being received from each sender (one per sender).
    incoming: Mutex<HashMap<u64, Incoming>>,
    /// Transfers whose file is complete and being checked, by sender: (stream, length).
    finishing: Mutex<HashMap<u64, (u64, u64)>>,
    rt: tokio::runtime::Handle,
}

struct Incoming {
    stream: u64,
    msg: Message,
    snap: SnapshotRef,
    path: PathBuf,
    file: std::fs::File,
    written: u64,
    hash: Sha256,
    last: Instant,
}

/// Receives the `raft-snapshot` channel.
struct Receiver(std::sync::Weak<SnapshotStreams>);

impl Gossiper for Receiver {
    fn on_unicast(&self, src: PeerName, msg: &[u8]) -> Result<(), GossipError> {
        if let Some(s) = self.0.upgrade() {
            s.on_chunk(src, msg);
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SnapshotStreams {
    /// Registers the channel. Must be called inside a tokio runtime.
    pub fn start(
        mesh: &crate::mesh::Mesh,
        status: Arc<NodeStatus>,
        routes: Arc<MemberRoutes>,
        driver: std_mpsc::Sender<DriverMsg>,
        dir: PathBuf,
    ) -> Arc<SnapshotStreams> {
        let s = Arc::new(SnapshotStreams {
            member_id: status.member_id,
            cluster_id: status.cluster_id,
            dir,
            routes,
            status,
            driver,
            channel: std::sync::OnceLock::new(),
            outgoing: Mutex::new(HashMap::new()),
            incoming: Mutex::new(HashMap::new()),
            finishing: Mutex::new(HashMap::new()),
            rt: tokio::runtime::Handle::current(),
        });
        let channel = mesh.register(SNAPSHOT_CHANNEL, Arc::new(Receiver(Arc::downgrade(&s))));
        let _ = s.channel.set(channel);
        s
    }

    fn send_to(&self, peer: PeerName, c: &SnapshotChunk) -> Result<(), MeshError> {
        match self.channel.get() {
            Some(ch) => ch.send_unicast(peer, prost::Message::encode_to_vec(c)),
            None => Err(MeshError::Shutdown),
        }
    }

    fn refuse(&self, why: Refusal, src: PeerName, what: &str) {
        super::validate::refuse_from_peer(&self.status, "snapshot chunk", why, src, what);
    }

    /// This member's acknowledgement of `offset` bytes of transfer `stream` from `to`
    /// (or, with an `error`, its refusal).
    fn ack(&self, to: u64, stream: u64, offset: u64, error: String) -> SnapshotChunk {
        SnapshotChunk {
            cluster_id: self.cluster_id,
            from: self.member_id,
            to,
            stream,
            offset,
            ack: true,
            error,
            ..Default::default()
        }
    }

    /// Streams the snapshot file named by `m`'s data to `m.to` (from the driver
    /// thread); the driver hears the outcome as a `SnapshotStatus`.
    pub fn send(self: &Arc<Self>, m: Message) {
        let to = m.to;
        let snap: Option<SnapshotRef> = m
            .snapshot
            .as_ref()
            .and_then(|s| prost::Message::decode(s.data.as_slice()).ok());
        let (Some(snap), Some(peer)) = (snap, self.routes.get(to)) else {
            let _ = self.driver.send(DriverMsg::SnapshotStatus(to, false));
            return;
        };
        let stream: u64 = rand::random();
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.outgoing).insert(stream, (to, tx));
        let this = self.clone();
        self.rt.spawn(async move {
            let ok = match this.stream_file(peer, stream, m, &snap, rx).await {
                Ok(()) => true,
                Err(e) => {
                    warn!(to = format_args!("{to:x}"), "snapshot transfer failed: {e}");
                    false
                }
            };
            lock(&this.outgoing).remove(&stream);
            let _ = this.driver.send(DriverMsg::SnapshotStatus(to, ok));
        });
    }

    async fn stream_file(
        &self,
        peer: PeerName,
        stream: u64,
        m: Message,
        snap: &SnapshotRef,
        mut acks: mpsc::UnboundedReceiver<SnapshotChunk>,
    ) -> Result<(), String> {
        let started = Instant::now();
        let to = m.to;
        let mut file = std::fs::File::open(&snap.path).map_err(|e| e.to_string())?;
        let header = |offset, data| SnapshotChunk {
            cluster_id: self.cluster_id,
            from: self.member_id,
            to,
            stream,
            offset,
            data,
            ..Default::default()
        };
        let mut first = header(0, Vec::new());
        first.message = m.encode_to_vec();
        first.resume = true;
        self.send_to(peer, &first).map_err(|e| e.to_string())?;
        // Chunks go from the start until the member's first answer says where its
        // file ends (a member that kept nothing, or predates resuming, says 0 or
        // nothing; one that did skips the chunks it already has).
        let (mut sent, mut acked, mut answered) = (0u64, 0u64, false);
        let mut progress = Instant::now();
        // Where the last probe asked from, while no chunk has gone since: an answer
        // below it means chunks after that were lost.
        let mut probed: Option<u64> = None;
        // Since when every byte is acknowledged, and how long the member's check of the
        // file may take (a minute, and a second for each 10 MiB).
        let mut checking: Option<Instant> = None;
        let check_limit = Duration::from_secs(60 + snap.len / (10 << 20));
        let mut buf = vec![0u8; CHUNK_BYTES];
        loop {
            while sent < snap.len && sent.saturating_sub(acked) < WINDOW_BYTES {
                let n = (snap.len - sent).min(CHUNK_BYTES as u64) as usize;
                file.read_exact(&mut buf[..n]).map_err(|e| e.to_string())?;
                let chunk = header(sent, buf[..n].to_vec());
                // A full queue to the next hop waits for room, not for a retry of the
                // whole transfer.
                loop {
                    match self.send_to(peer, &chunk) {
                        Ok(()) => break,
                        Err(MeshError::QueueFull(_)) => {
                            tokio::time::sleep(Duration::from_millis(5)).await
                        }
                        Err(e) => return Err(e.to_string()),
                    }
                }
                sent += n as u64;
                probed = None;
            }
            let limit = if answered { STALL } else { FIRST_ANSWER };
            if progress.elapsed() >= limit {
                return Err(match checking {
                    Some(_) if acked == snap.len => {
                        format!("the member's check of the file took over {check_limit:?}")
                    }
                    _ if answered => format!("no progress for {limit:?} at byte {acked}"),
                    _ => format!("no answer in {limit:?}"),
                });
            }
            let ack = match tokio::time::timeout(PROBE, acks.recv()).await {
                Ok(Some(a)) => a,
                Ok(None) => return Err("stopped".into()),
                Err(_) => {
                    // Chunks or acknowledgements may have been lost (a connection on
                    // the way replaced or cut): an empty chunk asks where the member's
                    // file ends, and the answer says where to go on from.
                    let _ = self.send_to(peer, &header(sent, Vec::new()));
                    probed = Some(sent);
                    continue;
                }
            };
            if !ack.error.is_empty() {
                return Err(format!("the member refused it: {}", ack.error));
            }
            // Forward: the member kept that much of an earlier transfer of this file.
            // Back: only an answer to a probe at `sent` (chunks since were lost); an
            // answer overtaken by later chunks says nothing about them.
            let forward = ack.offset > sent;
            let back = answered && ack.offset < sent && probed == Some(sent);
            if ack.resume && ack.offset < snap.len && (forward || back) {
                debug!(
                    to = format_args!("{to:x}"),
                    from = sent,
                    offset = ack.offset,
                    "snapshot transfer goes on where the member's file ends"
                );
                file.seek(std::io::SeekFrom::Start(ack.offset))
                    .map_err(|e| e.to_string())?;
                sent = ack.offset;
                acked = acked.min(sent);
                probed = None;
            }
            if ack.done {
                info!(
                    to = format_args!("{to:x}"),
                    bytes = snap.len,
                    took = ?started.elapsed(),
                    "snapshot delivered"
                );
                return Ok(());
            }
            let now_acked = acked.max(ack.offset.min(sent));
            // With every byte acknowledged the member checks the file (hash, parse:
            // long for a large one), and answers each probe meanwhile, for at
            // most `check_limit`.
            if now_acked == snap.len && checking.is_none() {
                checking = Some(Instant::now());
            }
            let checked_too_long = checking.is_some_and(|t| t.elapsed() >= check_limit);
            if (!answered || now_acked > acked || now_acked == snap.len) && !checked_too_long {
                progress = Instant::now();
            }
            answered = true;
            acked = now_acked;
        }
    }

    fn on_chunk(self: &Arc<Self>, src: PeerName, bytes: &[u8]) {
        let Ok(c) = <SnapshotChunk as prost::Message>::decode(bytes) else {
            self.refuse(Refusal::Malformed, src, "undecodable");
            return;
        };
        if c.cluster_id != self.cluster_id || c.to != self.member_id {
            return;
        }
        if self.routes.get(c.from) != Some(src) {
            self.refuse(
                Refusal::ForgedSender,
                src,
                "the mesh peer is not where its sender is published",
            );
            return;
        }
        if c.ack || c.done || !c.error.is_empty() {
            if let Some((_, tx)) = lock(&self.outgoing)
                .get(&c.stream)
                .filter(|(to, _)| *to == c.from)
            {
                let _ = tx.send(c);
            }
            return;
        }
        let reply = |offset: u64, error: String| self.ack(c.from, c.stream, offset, error);
        // Under `incoming`, which a completed file leaves in the same step as it joins
        // `finishing`: a transfer is in exactly one of them.
        let mut incoming = lock(&self.incoming);
        let finishing = lock(&self.finishing).get(&c.from).copied();
        if let Some((_, len)) = finishing.filter(|(stream, _)| *stream == c.stream) {
            drop(incoming);
            // Complete and being checked: a probe hears that every byte is here, and
            // chunks sent again meanwhile are not needed.
            if c.data.is_empty() && c.message.is_empty() {
                let _ = self.send_to(src, &reply(len, String::new()));
            }
            return;
        }
        if !c.message.is_empty() {
            drop(incoming);
            match self.begin(&c) {
                Ok(kept) => {
                    let mut ack = reply(kept, String::new());
                    ack.resume = kept > 0;
                    let _ = self.send_to(src, &ack);
                }
                Err(e) => {
                    self.refuse(Refusal::BadSnapshot, src, &e);
                    let _ = self.send_to(src, &reply(0, e));
                }
            }
            return;
        }
        let expected = incoming
            .get(&c.from)
            .filter(|inc| inc.stream == c.stream)
            .map(|inc| inc.written);
        if c.data.is_empty() {
            // The sender asks where the file ends: it goes on from there. A transfer
            // not under way (lost at its start, or just finished: its last answer
            // is on the way) is not answered.
            drop(incoming);
            if let Some(written) = expected {
                let mut ack = reply(written, String::new());
                ack.resume = true;
                let _ = self.send_to(src, &ack);
            }
            return;
        }
        let Some(written) = expected.filter(|w| c.offset <= *w) else {
            // A chunk lost before this one (its first, say, sent on a route that had
            // just gone): the sender gives up at once, rather than after a stall, and
            // raft-rs sends the snapshot again, resumed from what is written.
            let e = match expected {
                None => format!("no transfer {:x} under way", c.stream),
                Some(at) => format!("byte {} came where byte {at} was due", c.offset),
            };
            drop(incoming);
            debug!(
                from = format_args!("{:x}", c.from),
                "snapshot chunk out of order: {e}"
            );
            let _ = self.send_to(src, &reply(0, e));
            return;
        };
        // Bytes this member already has (sent before the sender heard where a resumed
        // transfer goes on) are skipped.
        let Some(data) = c
            .data
            .get((written - c.offset) as usize..)
            .filter(|d| !d.is_empty())
        else {
            return;
        };
        let Some(inc) = incoming.get_mut(&c.from) else {
            return;
        };
        if inc.written + data.len() as u64 > inc.snap.len {
            let e = "more bytes than announced".to_string();
            self.refuse(Refusal::BadSnapshot, src, &e);
            if let Some(inc) = incoming.remove(&c.from) {
                let _ = std::fs::remove_file(&inc.path);
            }
            let _ = self.send_to(src, &reply(0, e));
            return;
        }
        if let Err(e) = inc.file.write_all(data) {
            let e = format!("writing {}: {e}", inc.path.display());
            warn!("{e}");
            if let Some(inc) = incoming.remove(&c.from) {
                let _ = std::fs::remove_file(&inc.path);
            }
            let _ = self.send_to(src, &reply(0, e));
            return;
        }
        inc.hash.update(data);
        inc.written += data.len() as u64;
        inc.last = Instant::now();
        let _ = self.send_to(src, &reply(inc.written, String::new()));
        if inc.written < inc.snap.len {
            return;
        }
        let Some(inc) = incoming.remove(&c.from) else {
            return;
        };
        lock(&self.finishing).insert(c.from, (c.stream, inc.snap.len));
        drop(incoming);
        let this = self.clone();
        let (from, stream) = (c.from, c.stream);
        self.rt.spawn(async move {
            let path = inc.path.clone();
            let checked = tokio::task::spawn_blocking(move || finish(inc))
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
            let mut done = this.ack(from, stream, 0, String::new());
            match checked {
                Ok(msg) => {
                    done.done = true;
                    let _ = this.driver.send(DriverMsg::Raft(Box::new(msg)));
                }
                Err(e) => {
                    warn!(from = format_args!("{from:x}"), "snapshot refused: {e}");
                    this.status.metrics.count_refusal(Refusal::BadSnapshot);
                    let _ = std::fs::remove_file(&path);
                    done.error = e;
                }
            }
            let _ = this.send_to(src, &done);
            let mut finishing = lock(&this.finishing);
            if finishing.get(&from).is_some_and(|(s, _)| *s == stream) {
                finishing.remove(&from);
            }
        });
    }

    /// Starts receiving the transfer whose first chunk is `c`: one per sender, a new
    /// one replacing an older, or resuming it if it asks to and the file is the same.
    /// Returns the bytes of the file already written (where the sender goes on).
    fn begin(&self, c: &SnapshotChunk) -> Result<u64, String> {
        let msg = Message::decode(c.message.as_slice()).map_err(|e| e.to_string())?;
        if msg.msg_type != MessageType::MsgSnapshot as i32
            || msg.from != c.from
            || msg.to != self.member_id
        {
            return Err("the first chunk does not carry this sender's snapshot message".into());
        }
        let snap: SnapshotRef = msg
            .snapshot
            .as_ref()
            .and_then(|s| prost::Message::decode(s.data.as_slice()).ok())
            .ok_or("the snapshot message names no snapshot file")?;
        if snap.sha256.len() != 32 {
            return Err("the snapshot's hash is not a SHA-256".into());
        }
        let mut incoming = lock(&self.incoming);
        if let Some(inc) = incoming.get(&c.from).filter(|inc| inc.stream == c.stream) {
            // The same first chunk again: that transfer is under way (a new file at its
            // path would replace the one being written).
            return Ok(inc.written);
        }
        if let Some(inc) = incoming.get_mut(&c.from).filter(|inc| {
            c.resume
                && inc.written > 0
                && inc.snap.len == snap.len
                && inc.snap.sha256 == snap.sha256
        }) {
            debug!(
                from = format_args!("{:x}", c.from),
                bytes = snap.len,
                kept = inc.written,
                "resuming a snapshot transfer"
            );
            inc.stream = c.stream;
            inc.msg = msg;
            inc.last = Instant::now();
            return Ok(inc.written);
        }
        drop(incoming);
        // The file, and the database it is restored into (about as large), must fit.
        if let Some(free) = crate::storage::disk_free_bytes(&self.dir) {
            if snap.len.saturating_mul(2) > free {
                return Err(format!(
                    "a snapshot of {} bytes does not fit in the {free} bytes free",
                    snap.len
                ));
            }
        }
        let path = self
            .dir
            .join(format!("incoming-{:x}-{:x}.snap", c.from, c.stream));
        // Never over an existing file: one with this name is this transfer's, being
        // written, checked or installed.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let mut incoming = lock(&self.incoming);
        if let Some(old) = incoming.remove(&c.from) {
            let _ = std::fs::remove_file(&old.path);
        }
        // Transfers from other senders that stopped long ago go too.
        incoming.retain(|_, i| {
            let keep = i.last.elapsed() < KEEP_PARTIAL;
            if !keep {
                let _ = std::fs::remove_file(&i.path);
            }
            keep
        });
        debug!(
            from = format_args!("{:x}", c.from),
            bytes = snap.len,
            "receiving a snapshot"
        );
        incoming.insert(
            c.from,
            Incoming {
                stream: c.stream,
                msg,
                snap,
                path,
                file,
                written: 0,
                hash: Sha256::new(),
                last: Instant::now(),
            },
        );
        Ok(0)
    }
}

/// Checks a fully received file (hash, then every element decodes) and returns the
/// snapshot message for the driver, its data naming the local file.
///
/// The file is not fsync'ed, so the install need not wait for the disk: the driver
/// reads it back (through the page cache, checking its SHA-256 again) and makes the
/// state durable in its own commit, and a file not yet installed when the process
/// ends is gone anyway (the snap directory is emptied at start).
fn finish(inc: Incoming) -> Result<Message, String> {
    let Incoming {
        mut msg,
        mut snap,
        path,
        file,
        hash,
        ..
    } = inc;
    drop(file);
    if hash.finalize().as_slice() != snap.sha256.as_slice() {
        return Err("SHA-256 mismatch".into());
    }
    let reader = std::fs::File::open(&path).map_err(|e| e.to_string())?;
    crate::kv::snapfile::read_snapshot(reader, |_| Ok(())).map_err(|e| e.to_string())?;
    snap.path = path.to_string_lossy().into_owned();
    if let Some(s) = msg.snapshot.as_mut() {
        s.data = prost::Message::encode_to_vec(&snap);
    }
    Ok(msg)
}
