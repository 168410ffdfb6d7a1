//! What a received frame does: delivery to a channel, relaying, topology and
//! heartbeats, after checking who may send it.

use super::*;
use crate::mesh::sync::Answer;

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
            let state = &mut *st;
            if let Some(c) = state.conns.get_mut(&from) {
                c.sync.received(&state.topology, &entries);
            }
            let changed = st.topology.merge(entries);
            if changed.is_empty() {
                return;
            }
            for (&peer, c) in st.conns.iter_mut() {
                if c.sync.queue_merged(&changed, peer == from, own) {
                    c.topology_notify.notify_one();
                }
            }
            drop(st);
            inner.bump_changes();
        }
        Body::Digest(d) => {
            let mut guard = inner.lock();
            let st = &mut *guard;
            let Some(c) = st.conns.get_mut(&from) else {
                return;
            };
            let (wake, answer) = if d.summary_only {
                (false, c.sync.on_summary(&st.topology, d.summary))
            } else {
                c.sync.on_digest(&st.topology, &d.items, d.reply)
            };
            if wake {
                c.topology_notify.notify_one();
            }
            let frame = match answer {
                Answer::Nothing => None,
                Answer::Digest => Some(crate::mesh::digest_frame(&st.topology, false)),
                Answer::DigestReply => Some(crate::mesh::digest_frame(&st.topology, true)),
            };
            if let Some(f) = frame {
                let _ = c.tx.try_send(f);
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
