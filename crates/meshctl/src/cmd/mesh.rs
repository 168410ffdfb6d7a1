//! `mesh peers` and `mesh status`: the gossip mesh as the answering node sees it.
use std::io::Write;

use anyhow::Result;
use mesh_core::client::Client;
use mesh_core::proto::meshpb::MeshPeer;
use serde_json::json;

use crate::output::{table, Format};

fn hex(n: u64) -> String {
    if n == 0 {
        "-".into()
    } else {
        format!("{n:016x}")
    }
}

fn peer_json(p: &MeshPeer) -> serde_json::Value {
    json!({
        "name": format!("{:016x}", p.name),
        "nickname": p.nickname,
        "uid": p.uid,
        "address": p.address,
        "connections": p.connections,
        "reachable": p.reachable,
        "next_hop": (p.next_hop != 0).then(|| format!("{:016x}", p.next_hop)),
        "hops": p.hops,
        "self": p.is_self,
        "member_id": (p.member_id != 0).then(|| format!("{:x}", p.member_id)),
        "role": p.role,
    })
}

fn peer_row(p: &MeshPeer) -> Vec<String> {
    vec![
        format!("{:016x}{}", p.name, if p.is_self { "*" } else { "" }),
        p.nickname.clone(),
        p.uid.to_string(),
        p.address.clone(),
        p.connections.to_string(),
        p.reachable.to_string(),
        if p.is_self {
            "self".into()
        } else {
            hex(p.next_hop)
        },
        p.role.clone(),
    ]
}

const PEER_HEADERS: [&str; 8] = [
    "NAME",
    "NICKNAME",
    "UID",
    "ADDRESS",
    "CONNECTIONS",
    "REACHABLE",
    "NEXT HOP",
    "ROLE",
];

pub async fn peers(client: &Client, out: &mut dyn Write, f: Format) -> Result<()> {
    let mut r = client.mesh_peers().await?;
    r.peers
        .sort_by(|a, b| (!a.is_self, &a.nickname).cmp(&(!b.is_self, &b.nickname)));
    match f {
        Format::Json => {
            let list: Vec<_> = r.peers.iter().map(peer_json).collect();
            writeln!(out, "{}", json!({ "peers": list }))?;
        }
        Format::Simple => {
            for p in &r.peers {
                writeln!(out, "{}", peer_row(p).join(", "))?;
            }
        }
        Format::Table => {
            let rows: Vec<Vec<String>> = r.peers.iter().map(peer_row).collect();
            out.write_all(table::render(&PEER_HEADERS, &rows).as_bytes())?;
        }
    }
    Ok(out.flush()?)
}

pub async fn status(client: &Client, out: &mut dyn Write, f: Format) -> Result<()> {
    let s = client.mesh_status().await?;
    let me = s.this.clone().unwrap_or_default();
    if matches!(f, Format::Json) {
        let routes: Vec<_> = s
            .routes
            .iter()
            .map(|r| {
                json!({
                    "destination": format!("{:016x}", r.destination),
                    "next_hop": format!("{:016x}", r.next_hop),
                    "hops": r.hops,
                })
            })
            .collect();
        let v = json!({
            "self": peer_json(&me),
            "peers": s.peers,
            "reachable": s.reachable,
            "connections": s.connections,
            "encrypted": s.encrypted,
            "channels": s.channels,
            "routes": routes,
            "bytes_in": s.bytes_in,
            "bytes_out": s.bytes_out,
            "gossip_bytes_in": s.gossip_bytes_in,
            "gossip_bytes_out": s.gossip_bytes_out,
            "frames_rejected": s.frames_rejected,
            "handshakes_refused": s.handshakes_refused,
        });
        writeln!(out, "{v}")?;
        return Ok(out.flush()?);
    }
    writeln!(
        out,
        "peer: {:016x} ({}) uid {} at {}, {}",
        me.name, me.nickname, me.uid, me.address, me.role
    )?;
    writeln!(
        out,
        "peers: {} known, {} reachable; connections: {}; encryption: {}",
        s.peers,
        s.reachable,
        s.connections,
        if s.encrypted { "on" } else { "off" }
    )?;
    writeln!(out, "channels: {}", s.channels.join(", "))?;
    writeln!(
        out,
        "traffic: {} bytes in, {} bytes out ({} / {} gossip); {} frames rejected, {} handshakes refused",
        s.bytes_in, s.bytes_out, s.gossip_bytes_in, s.gossip_bytes_out, s.frames_rejected, s.handshakes_refused
    )?;
    writeln!(out, "routes:")?;
    for r in &s.routes {
        writeln!(
            out,
            "  {:016x} via {:016x} ({} hop{})",
            r.destination,
            r.next_hop,
            r.hops,
            if r.hops == 1 { "" } else { "s" }
        )?;
    }
    Ok(out.flush()?)
}
