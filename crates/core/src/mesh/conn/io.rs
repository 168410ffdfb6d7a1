//! A connection's IO: the writer (the outbox queue, coalesced topology, heartbeats,
//! faults) and the reader (dead-peer timeout, frame limits).

use super::*;

/// Sends queued frames, coalesced topology deltas and heartbeats until the connection is
/// deregistered or replaced (Ok) or the socket fails.
pub(in crate::mesh) async fn write_loop(
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
                let mut guard = inner.lock();
                let st = &mut *guard;
                let Some(c) = st.conns.get_mut(&remote).filter(|c| c.id == id) else {
                    return Ok(());
                };
                let names = c.sync.take_due(&st.topology);
                match topology_frame(st, names) {
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
pub(in crate::mesh) struct Outbox {
    pub(in crate::mesh) wr: tokio::net::tcp::OwnedWriteHalf,
    pub(in crate::mesh) cipher: Option<Arc<snow::StatelessTransportState>>,
    pub(in crate::mesh) state: std::sync::Mutex<OutboxState>,
    /// Tells the connection task that bytes wait for the socket.
    pub(in crate::mesh) backlog: Notify,
}

#[derive(Default)]
pub(in crate::mesh) struct OutboxState {
    pub(in crate::mesh) nonce: u64,
    /// Sealed records the socket has not taken yet.
    pub(in crate::mesh) pending: Vec<u8>,
    /// The socket failed: the connection task ends the connection.
    pub(in crate::mesh) failed: bool,
    /// The connection task holds frames back for a delay fault; a direct write would
    /// overtake them (the fault itself may already be cleared).
    pub(in crate::mesh) held: bool,
}

impl Outbox {
    pub(in crate::mesh) fn state(&self) -> std::sync::MutexGuard<'_, OutboxState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `frame` now if nothing is waiting for the socket (so it overtakes nothing);
    /// otherwise returns it, for the queue.
    pub(in crate::mesh) fn try_send_now(&self, inner: &Inner, frame: Bytes) -> Result<(), Bytes> {
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
    pub(in crate::mesh) fn hold(&self, held: bool) {
        self.state().held = held;
    }

    /// Seals `frames` behind whatever waits, and writes what the socket takes.
    pub(in crate::mesh) fn push(&self, inner: &Inner, frames: &[Bytes]) -> Result<(), ConnError> {
        let mut st = self.state();
        self.seal(inner, &mut st, frames)?;
        self.write_some(&mut st);
        Ok(())
    }

    pub(in crate::mesh) fn seal(
        &self,
        inner: &Inner,
        st: &mut OutboxState,
        frames: &[Bytes],
    ) -> Result<(), ConnError> {
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
    pub(in crate::mesh) fn write_some(&self, st: &mut OutboxState) {
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
    pub(in crate::mesh) async fn flush(&self) -> Result<(), ConnError> {
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
pub(in crate::mesh) const READ_BUFFER: usize = 64 * 1024;

/// Queued frames are joined into one write up to about this many bytes.
pub(in crate::mesh) const WRITE_BATCH: usize = 256 * 1024;

/// Appends `frame` to `out` as one record (sealed when the connection is encrypted).
pub(in crate::mesh) fn append_record(
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
pub(in crate::mesh) async fn read_loop(
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
