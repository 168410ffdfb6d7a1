//! `endpoint hashkv`, `move-leader`, `defrag` and `alarm list|disarm`, with etcdctl
//! 3.4's texts.
use std::io::Write;

use anyhow::{bail, Result};
use futures::future::join_all;
use mesh_core::client::Client;
use mesh_core::proto::etcdserverpb::{alarm_request::AlarmAction, AlarmRequest, AlarmResponse};

use super::cluster::{answered, target};
use super::Exit;
use crate::config::Global;
use crate::output::{self, Format};

pub async fn hashkv(global: &Global, out: &mut dyn Write, cluster: bool, rev: i64) -> Result<()> {
    let client = target(global, cluster).await?;
    let endpoints = client.endpoints();
    let results = join_all(endpoints.iter().map(|ep| client.hash_kv(ep, rev))).await;
    let (ok, failed) = answered(endpoints, results, "hash");
    output::maintenance::hashkv(out, global.format, &ok)?;
    out.flush()?;
    if failed > 0 {
        bail!("{failed} endpoint(s) did not answer");
    }
    Ok(())
}

/// Finds the leader among the endpoints (as etcdctl does) and asks it to hand over.
pub async fn move_leader(global: &Global, out: &mut dyn Write, target_hex: &str) -> Result<()> {
    let Ok(target_id) = u64::from_str_radix(target_hex.trim_start_matches("0x"), 16) else {
        return Err(Exit::Usage(format!("bad member ID {target_hex:?}: expected hex")).into());
    };
    let client = Client::connect(global.client.clone())?;
    let endpoints = client.endpoints();
    let mut leader = None;
    for ep in &endpoints {
        let s = client.status(ep).await?;
        if s.header.as_ref().is_some_and(|h| h.member_id == s.leader) {
            leader = Some((ep.clone(), s.leader));
            break;
        }
    }
    let Some((ep, leader_id)) = leader else {
        bail!("no leader endpoint given at {endpoints:?}");
    };
    let resp = client.move_leader(&ep, target_id).await?;
    output::maintenance::move_leader(out, global.format, leader_id, target_id, &resp)?;
    Ok(out.flush()?)
}

/// One endpoint after another, like etcdctl (defragmenting blocks the member).
pub async fn defrag(global: &Global, out: &mut dyn Write, cluster: bool) -> Result<()> {
    let client = target(global, cluster).await?;
    let mut failed = 0;
    for ep in client.endpoints() {
        match client.defragment(&ep).await {
            Ok(_) => writeln!(out, "Finished defragmenting etcd member[{ep}]")?,
            Err(e) => {
                failed += 1;
                eprintln!("Failed to defragment etcd member[{ep}] ({e})");
            }
        }
    }
    out.flush()?;
    if failed > 0 {
        bail!("{failed} endpoint(s) were not defragmented");
    }
    Ok(())
}

async fn list(client: &Client) -> Result<AlarmResponse> {
    Ok(client
        .alarm(AlarmRequest {
            action: AlarmAction::Get as i32,
            ..Default::default()
        })
        .await?)
}

pub async fn alarm_list(client: &Client, out: &mut dyn Write, f: Format) -> Result<()> {
    let resp = list(client).await?;
    output::maintenance::alarms(out, f, &resp)?;
    Ok(out.flush()?)
}

/// Clears every listed alarm; prints the ones that were cleared.
pub async fn alarm_disarm(client: &Client, out: &mut dyn Write, f: Format) -> Result<()> {
    let listed = list(client).await?;
    let mut done = AlarmResponse {
        header: listed.header,
        alarms: Vec::new(),
    };
    for a in listed.alarms {
        let r = client
            .alarm(AlarmRequest {
                action: AlarmAction::Deactivate as i32,
                member_id: a.member_id,
                alarm: a.alarm,
            })
            .await?;
        done.header = r.header;
        done.alarms.extend(r.alarms);
    }
    output::maintenance::alarms(out, f, &done)?;
    Ok(out.flush()?)
}
