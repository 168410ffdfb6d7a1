//! `locksmith daemon`: at start, release the slot this machine still holds from before
//! its reboot; then wait for the need-reboot file, for the reboot window (if any), for
//! a free slot, and run the reboot command. SIGINT/SIGTERM end it cleanly (exit 0).
//! The semaphore is on the cluster, or behind a FleetLock server ([`Backend`]).
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::cas::{LockClient, LockError};
use crate::fleetlock::client::FleetLockClient;
use crate::fleetlock::ClientParams;
use crate::process::{run_reboot_command, Signals};
use crate::semaphore::Refusal;
use crate::wait::{lock_waiting, WaitOptions};
use crate::window::{LocalTime, Window};

/// What the daemon was configured with.
#[derive(Debug, Clone)]
pub struct DaemonSettings {
    pub id: String,
    /// Backoff when no slot is free (its timeout is set per window).
    pub wait: WaitOptions,
    pub reboot_command: String,
    pub need_reboot_file: PathBuf,
    pub window: Option<Window>,
    pub poll_interval: Duration,
}

/// Longest single sleep while waiting for the window, so clock and time-zone changes
/// are noticed.
const WINDOW_RECHECK: Duration = Duration::from_secs(60);

/// Where the semaphore is.
pub enum Backend {
    /// On the cluster, changed by compare-and-swap.
    Cluster(LockClient),
    /// Behind a FleetLock server, as this client and group.
    FleetLock {
        client: FleetLockClient,
        params: ClientParams,
    },
}

/// Runs until a signal arrives; errors only when the cluster or the reboot command fails.
pub async fn run(backend: &Backend, s: &DaemonSettings) -> Result<()> {
    let mut signals = Signals::new()?;
    tokio::select! {
        r = serve(backend, s) => r,
        sig = signals.recv() => {
            tracing::info!(sig, "stopping");
            Ok(())
        }
    }
}

/// Releases the slot this machine may hold. Through FleetLock, failures are retried
/// with backoff until the server answers 200 (steady-state is UnlockIfHeld).
async fn release(backend: &Backend, s: &DaemonSettings) -> Result<()> {
    match backend {
        Backend::Cluster(lc) => match lc.unlock(&s.id).await {
            Ok(v) => tracing::info!(
                id = %s.id, key = lc.key(), free = v.semaphore.semaphore,
                "released the lock held from before the reboot"
            ),
            Err(LockError::Refused {
                refusal: Refusal::NotHolder { .. },
                ..
            }) => tracing::info!(id = %s.id, "this machine holds no lock"),
            Err(e) => return Err(e.into()),
        },
        Backend::FleetLock { client, params } => {
            let mut pause = s.wait.backoff_min;
            loop {
                match client.steady_state(params).await {
                    Ok(()) => {
                        tracing::info!(id = %s.id, group = %params.group, "steady-state: no reboot slot held");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(?pause, "steady-state not confirmed, retrying: {e}");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(s.wait.backoff_max);
                    }
                }
            }
        }
    }
    Ok(())
}

/// Takes a slot, waiting as `wait` allows; `Ok(false)` when its timeout ran out.
async fn acquire(backend: &Backend, s: &DaemonSettings, wait: &WaitOptions) -> Result<bool> {
    match backend {
        Backend::Cluster(lc) => match lock_waiting(lc, &s.id, wait).await {
            Ok(_) => Ok(true),
            Err(LockError::WaitTimeout { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        },
        Backend::FleetLock { client, params } => {
            let deadline = wait.timeout.map(|t| Instant::now() + t);
            let mut pause = wait.backoff_min;
            loop {
                match client.pre_reboot(params).await {
                    Ok(()) => {
                        tracing::info!(id = %s.id, group = %params.group, "pre-reboot: slot held");
                        return Ok(true);
                    }
                    Err(e) => tracing::info!(?pause, "pre-reboot refused, waiting: {e}"),
                }
                if let Some(d) = deadline {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(false);
                    }
                    pause = pause.min(left);
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(wait.backoff_max);
            }
        }
    }
}

async fn serve(backend: &Backend, s: &DaemonSettings) -> Result<()> {
    release(backend, s).await?;
    loop {
        while !s.need_reboot_file.exists() {
            tokio::time::sleep(s.poll_interval).await;
        }
        tracing::info!(file = %s.need_reboot_file.display(), "a reboot is needed");
        let wait = match &s.window {
            None => s.wait.clone(),
            Some(w) => {
                let left = wait_for_window(w).await;
                WaitOptions {
                    timeout: Some(left),
                    ..s.wait.clone()
                }
            }
        };
        if !acquire(backend, s, &wait).await? {
            tracing::info!("the reboot window closed before a slot was free");
            continue;
        }
        if let Err(e) = run_reboot_command(&s.reboot_command).await {
            // Nobody will release the slot after a reboot that does not happen.
            release(backend, s).await?;
            return Err(e);
        }
        tracing::info!("reboot command succeeded; holding the lock until the reboot");
        // The slot is released by the next daemon start after the reboot.
        std::future::pending::<()>().await;
    }
}

/// Sleeps until the window is open; returns how long it stays open from then.
async fn wait_for_window(w: &Window) -> Duration {
    loop {
        let now = LocalTime::now();
        if let Some(left) = w.remaining(now) {
            return left;
        }
        let until = w.until_open(now);
        tracing::info!(?until, "waiting for the reboot window");
        tokio::time::sleep(until.min(WINDOW_RECHECK)).await;
    }
}
