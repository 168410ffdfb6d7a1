//! `lock` and `elect`: etcdctl's commands over the Lock and Election services. The
//! lease behind a lock or candidacy is kept alive while held and revoked on exit, so
//! whatever happens (exit, SIGINT, SIGTERM) the lock or leadership is released.
use std::io::Write;

use anyhow::{bail, Context, Result};
use mesh_core::client::{keep_lease_alive, Client};
use mesh_core::proto::etcdserverpb as pb;
use mesh_core::proto::mvccpb;
use tokio::signal::unix::{signal, SignalKind};

use super::Exit;
use crate::cli::{ElectArgs, LockArgs};
use crate::output::{self, Format, GetView};

/// Resolves on SIGINT or SIGTERM with the signal's number.
async fn interrupted() -> Result<i32> {
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    Ok(tokio::select! {
        _ = int.recv() => libc::SIGINT,
        _ = term.recv() => libc::SIGTERM,
    })
}

/// Prints one key-value the way etcdctl's `display.Get` does.
fn print_kv(
    out: &mut dyn Write,
    f: Format,
    header: Option<pb::ResponseHeader>,
    kv: mvccpb::KeyValue,
) -> Result<()> {
    let resp = pb::RangeResponse {
        header,
        kvs: vec![kv],
        more: false,
        count: 1,
    };
    output::get(out, f, &resp, GetView::default())?;
    Ok(out.flush()?)
}

pub async fn lock(client: &Client, out: &mut dyn Write, f: Format, a: &LockArgs) -> Result<()> {
    // Signal handlers first, so a signal that arrives while waiting is not fatal.
    let stop = interrupted();
    tokio::pin!(stop);
    let lease = client.lease_grant(a.ttl, 0).await?.id;
    let keeper = keep_lease_alive(client.clone(), lease, a.ttl);
    let outcome = tokio::select! {
        sig = &mut stop => { sig?; Ok(None) }
        r = client.lock(a.name.as_bytes(), lease) => r.map(Some),
    };
    let result = match outcome {
        Ok(Some(held)) => hold_lock(client, out, f, a, &held, keeper, stop).await,
        Ok(None) => Ok(()),
        Err(e) => Err(e.into()),
    };
    // Revoking the lease deletes the lock key too (the unlock in `hold_lock` is the
    // polite way; this covers interruptions and errors).
    let _ = client.lease_revoke(lease).await;
    result
}

async fn hold_lock(
    client: &Client,
    out: &mut dyn Write,
    f: Format,
    a: &LockArgs,
    held: &mesh_core::proto::v3lockpb::LockResponse,
    keeper: tokio::task::JoinHandle<()>,
    mut stop: std::pin::Pin<&mut impl std::future::Future<Output = Result<i32>>>,
) -> Result<()> {
    let rev = held.header.as_ref().map_or(0, |h| h.revision);
    if a.command.is_empty() {
        let kv = client
            .get(held.key.clone())
            .await?
            .context("lock lost on init")?;
        print_kv(out, f, held.header, kv)?;
        tokio::select! {
            sig = &mut stop => { sig?; }
            _ = keeper => bail!("lock lost: its lease expired"),
        }
        client.unlock(&held.key).await?;
        return Ok(());
    }
    let mut child = tokio::process::Command::new(&a.command[0])
        .args(&a.command[1..])
        .env(
            "ETCD_LOCK_KEY",
            String::from_utf8_lossy(&held.key).into_owned(),
        )
        .env("ETCD_LOCK_REV", rev.to_string())
        .spawn()
        .with_context(|| format!("cannot run {:?}", a.command[0]))?;
    let status = tokio::select! {
        status = child.wait() => status?,
        sig = &mut stop => {
            let sig = sig?;
            if let Some(pid) = child.id() {
                // SAFETY: kill(2) on our own child's pid; no memory is involved.
                unsafe { libc::kill(pid as libc::pid_t, sig) };
            }
            // Wait for the command to exit on its own terms.
            child.wait().await?
        }
    };
    keeper.abort();
    client.unlock(&held.key).await?;
    let code = match (
        status.code(),
        std::os::unix::process::ExitStatusExt::signal(&status),
    ) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        (None, None) => 1,
    };
    if code != 0 {
        return Err(Exit::Status(code.clamp(0, 255) as u8).into());
    }
    Ok(())
}

pub async fn elect(client: &Client, out: &mut dyn Write, f: Format, a: &ElectArgs) -> Result<()> {
    let stop = interrupted();
    tokio::pin!(stop);
    if a.listen {
        return observe(client, out, f, a, stop).await;
    }
    let Some(proposal) = &a.proposal else {
        return Err(Exit::Usage("elect takes NAME PROPOSAL (or --listen NAME)".into()).into());
    };
    let lease = client.lease_grant(a.ttl, 0).await?.id;
    let mut keeper = keep_lease_alive(client.clone(), lease, a.ttl);
    let result = async {
        let won = tokio::select! {
            sig = &mut stop => { sig?; return Ok(()) }
            r = client.campaign(a.name.as_bytes(), lease, proposal.as_bytes()) => r?,
        };
        let leader = won
            .leader
            .context("campaign answered without a leader key")?;
        let kv = client
            .get(leader.key.clone())
            .await?
            .context("elect: leadership lost on init")?;
        print_kv(out, f, won.header, kv)?;
        tokio::select! {
            sig = &mut stop => { sig?; }
            _ = &mut keeper => bail!("elect: session expired"),
        }
        client.resign(leader).await?;
        Ok(())
    }
    .await;
    keeper.abort();
    let _ = client.lease_revoke(lease).await;
    result
}

async fn observe(
    client: &Client,
    out: &mut dyn Write,
    f: Format,
    a: &ElectArgs,
    mut stop: std::pin::Pin<&mut impl std::future::Future<Output = Result<i32>>>,
) -> Result<()> {
    let mut stream = client.observe(a.name.as_bytes()).await?;
    loop {
        let msg = tokio::select! {
            sig = &mut stop => { sig?; return Ok(()) }
            m = stream.message() => m?,
        };
        let Some(r) = msg else {
            bail!("observe stream closed by the server");
        };
        if let Some(kv) = r.kv {
            print_kv(out, f, r.header, kv)?;
        }
    }
}
