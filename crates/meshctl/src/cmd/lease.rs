//! `lease grant | revoke | keep-alive [--once] | timetolive [--keys] | list`, with IDs
//! in hex as etcdctl prints and parses them.
use std::io::Write;

use anyhow::{bail, Result};
use mesh_core::client::Client;

use crate::cli::LeaseCommand;
use crate::config::parse_lease_id;
use crate::output::{lease as print, Format};

pub async fn run(client: &Client, out: &mut dyn Write, f: Format, c: LeaseCommand) -> Result<()> {
    match c {
        LeaseCommand::Grant { ttl } => {
            let r = client.lease_grant(ttl, 0).await?;
            print::grant(out, f, &r)?;
        }
        LeaseCommand::Revoke { id } => {
            let id = parse_lease_id(&id)?;
            let r = client.lease_revoke(id).await?;
            print::revoke(out, f, id, &r)?;
        }
        LeaseCommand::KeepAlive { id, once } => {
            keep_alive(client, out, f, parse_lease_id(&id)?, once).await?;
        }
        LeaseCommand::Timetolive { id, keys } => {
            let r = client
                .lease_time_to_live(parse_lease_id(&id)?, keys)
                .await?;
            print::time_to_live(out, f, &r, keys)?;
        }
        LeaseCommand::List => {
            let r = client.lease_leases().await?;
            print::list(out, f, &r)?;
        }
    }
    Ok(out.flush()?)
}

/// Refreshes every third of the TTL until the lease is gone or SIGINT; `once`
/// refreshes a single time (a missing lease is then an error, as in etcdctl).
async fn keep_alive(
    client: &Client,
    out: &mut dyn Write,
    f: Format,
    id: i64,
    once: bool,
) -> Result<()> {
    let mut stream = client.lease_keep_alive(id).await?;
    if once {
        let r = stream.keep_alive().await?;
        if r.ttl <= 0 {
            bail!("etcdserver: requested lease not found");
        }
        print::keep_alive(out, f, &r)?;
        return Ok(());
    }
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        let r = tokio::select! {
            _ = &mut interrupted => return Ok(()),
            r = stream.keep_alive() => r?,
        };
        if r.ttl <= 0 {
            print::keep_alive_ended(out, f, id)?;
            return Ok(());
        }
        print::keep_alive(out, f, &r)?;
        out.flush()?;
        let every = std::time::Duration::from_millis((r.ttl as u64 * 1000 / 3).max(100));
        tokio::select! {
            _ = &mut interrupted => return Ok(()),
            _ = tokio::time::sleep(every) => {}
        }
    }
}
