//! `member list`, `endpoint status` and `endpoint health`. Status and health ask
//! every endpoint separately (all at once), or every member with `--cluster`.
use std::io::Write;

use anyhow::{bail, Result};
use futures::future::join_all;
use mesh_core::client::Client;

use crate::cli::MemberCommand;
use crate::config::Global;
use crate::output::{self, Format, Health};

/// The members, then (when the endpoint is a meshd node) mesh peers that are not
/// members: nodes waiting to be added, or removed ones.
pub async fn member_list(client: &Client, out: &mut dyn Write, f: Format) -> Result<()> {
    let resp = client.member_list().await?;
    // etcd has no mesh: its member list is all there is.
    let mesh_only: Vec<_> = match client.mesh_peers().await {
        Ok(p) => p
            .peers
            .into_iter()
            .filter(|p| p.role == "mesh-only" && p.reachable)
            .collect(),
        Err(_) => Vec::new(),
    };
    output::member_list(out, f, &resp, &mesh_only)?;
    Ok(out.flush()?)
}

/// `member add | remove | promote | update`, printed as etcdctl 3.4 does.
pub async fn member_change(
    client: &Client,
    out: &mut dyn Write,
    f: Format,
    cmd: MemberCommand,
) -> Result<()> {
    match cmd {
        MemberCommand::List => return member_list(client, out, f).await,
        MemberCommand::Add {
            name,
            mesh_addr,
            learner,
        } => {
            let r = client.member_add(vec![mesh_addr.clone()], learner).await?;
            let id = r.member.as_ref().map_or(0, |m| m.id);
            output::member_added(out, f, &r, &name, &mesh_addr, id)?;
        }
        MemberCommand::Remove { id } => {
            let r = client.member_remove(id).await?;
            output::member_changed(out, f, &r.header, &r.members, id, "removed from")?;
        }
        MemberCommand::Promote { id } => {
            let r = client.member_promote(id).await?;
            output::member_changed(out, f, &r.header, &r.members, id, "promoted in")?;
        }
        MemberCommand::Update { id, mesh_addr } => {
            let r = client.member_update(id, vec![mesh_addr]).await?;
            output::member_changed(out, f, &r.header, &r.members, id, "updated in")?;
        }
    }
    Ok(out.flush()?)
}

/// The client to query: the configured endpoints, or with `cluster` every member's client URLs.
pub(super) async fn target(global: &Global, cluster: bool) -> Result<Client> {
    let client = Client::connect(global.client.clone())?;
    if !cluster {
        return Ok(client);
    }
    let members = client.member_list().await?;
    let mut config = global.client.clone();
    config.endpoints = members
        .members
        .iter()
        .flat_map(|m| m.client_ur_ls.clone())
        .collect();
    Ok(Client::connect(config)?)
}

/// Pairs each endpoint with its answer; reports the ones that failed (etcdctl's
/// "Failed to get the `<what>` of endpoint" line) and counts them.
pub(super) fn answered<T>(
    endpoints: Vec<String>,
    results: Vec<Result<T, mesh_core::client::ClientError>>,
    what: &str,
) -> (Vec<(String, T)>, usize) {
    let mut ok = Vec::new();
    let mut failed = 0;
    for (ep, r) in endpoints.into_iter().zip(results) {
        match r {
            Ok(v) => ok.push((ep, v)),
            Err(e) => {
                failed += 1;
                eprintln!("Failed to get the {what} of endpoint {ep} ({e})");
            }
        }
    }
    (ok, failed)
}

pub async fn status(global: &Global, out: &mut dyn Write, cluster: bool) -> Result<()> {
    let client = target(global, cluster).await?;
    let endpoints = client.endpoints();
    let results = join_all(endpoints.iter().map(|ep| client.status(ep))).await;
    let (ok, failed) = answered(endpoints, results, "status");
    output::endpoint_status(out, global.format, &ok)?;
    out.flush()?;
    if failed > 0 {
        bail!("{failed} endpoint(s) did not answer");
    }
    Ok(())
}

pub async fn health(global: &Global, out: &mut dyn Write, cluster: bool) -> Result<()> {
    let client = target(global, cluster).await?;
    let endpoints = client.endpoints();
    let results = join_all(endpoints.iter().map(|ep| client.health(ep))).await;
    let report: Vec<Health> = endpoints
        .into_iter()
        .zip(results)
        .map(|(endpoint, r)| match r {
            Ok(took) => Health {
                endpoint,
                health: true,
                took: output::go_duration(took),
                error: None,
            },
            Err(e) => Health {
                endpoint,
                health: false,
                took: String::new(),
                error: Some(e.to_string()),
            },
        })
        .collect();
    output::endpoint_health(out, global.format, &report)?;
    out.flush()?;
    if report.iter().any(|h| !h.health) {
        bail!("unhealthy cluster");
    }
    Ok(())
}
