//! `lease grant | revoke | keep-alive [--once] | timetolive [--keys] | list`, with IDs
//! in hex as etcdctl prints and parses them.
use std::io::Write;
use std::time::{Duration, Instant};

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
/// refreshes a single time (a missing lease is then an error, as in etcdctl). A
/// failed stream (a member stopped, an election) is reopened, as clientv3 does, until
/// a whole TTL has passed without a refresh.
async fn keep_alive(
    client: &Client,
    out: &mut dyn Write,
    f: Format,
    id: i64,
    once: bool,
) -> Result<()> {
    let mut stream = Some(client.lease_keep_alive(id).await?);
    if once {
        let r = stream.as_mut().expect("opened").keep_alive().await?;
        if r.ttl <= 0 {
            bail!("etcdserver: requested lease not found");
        }
        print::keep_alive(out, f, &r)?;
        return Ok(());
    }
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    let mut ttl = Duration::from_secs(60);
    let mut last_ok = Instant::now();
    loop {
        let r = match stream.as_mut() {
            Some(s) => tokio::select! {
                _ = &mut interrupted => return Ok(()),
                r = s.keep_alive() => r,
            },
            None => match client.lease_keep_alive(id).await {
                Ok(s) => {
                    stream = Some(s);
                    continue;
                }
                Err(e) => Err(e),
            },
        };
        let pause = match r {
            Ok(r) if r.ttl <= 0 => {
                print::keep_alive_ended(out, f, id)?;
                return Ok(());
            }
            Ok(r) => {
                print::keep_alive(out, f, &r)?;
                out.flush()?;
                ttl = Duration::from_secs(r.ttl as u64);
                last_ok = Instant::now();
                (ttl / 3).max(Duration::from_millis(100))
            }
            Err(e) if last_ok.elapsed() < ttl => {
                tracing::warn!("keep-alive of lease {id:016x} failed, retrying: {e}");
                stream = None;
                Duration::from_millis(200)
            }
            Err(e) => return Err(e.into()),
        };
        tokio::select! {
            _ = &mut interrupted => return Ok(()),
            _ = tokio::time::sleep(pause) => {}
        }
    }
}
