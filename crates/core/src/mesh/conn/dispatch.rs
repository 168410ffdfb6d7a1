//! What a received frame does: delivery to a channel, relaying, topology and
//! heartbeats, after checking who may send it.

use super::*;

/// Whether a unicast that arrived from neighbour `from` can have come from `src`. The
/// mesh authenticates only the neighbour: a relayed message's claimed source cannot be
/// checked here (the Raft transport binds senders to the peers they are published on),
/// and routes differ between peers while the topology converges, so a neighbour's
/// message may arrive relayed. A message claiming to come from this node is forged.
pub(in crate::mesh) fn plausible_source(inner: &Inner, from: PeerName, src: PeerName) -> bool {
    src == from || src != inner.cfg.name
}

pub(in crate::mesh) fn handle_frame(inner: &Inner, from: PeerName, frame: MeshFrameIn, len: usize) {
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
            let full = (!same).then(|| crate::mesh::digest_frame(&st, false));
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
            let reply = (they_have_news && !d.reply).then(|| crate::mesh::digest_frame(&st, true));
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
                        via = %crate::mesh::peer_name_string(from),
                        claimed = %crate::mesh::peer_name_string(m.src),
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
