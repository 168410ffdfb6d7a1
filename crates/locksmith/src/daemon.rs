//! `locksmith daemon`: at start, release the slot this machine still holds from before
//! its reboot; then wait for the need-reboot file, for the reboot window (if any), for
//! a free slot, and run the reboot command. SIGINT/SIGTERM end it cleanly (exit 0).
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

use crate::cas::{LockClient, LockError};
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

/// Runs until a signal arrives; errors only when the cluster or the reboot command fails.
pub async fn run(lc: &LockClient, s: &DaemonSettings) -> Result<()> {
    let mut signals = Signals::new()?;
    tokio::select! {
        r = serve(lc, s) => r,
        sig = signals.recv() => {
            tracing::info!(sig, "stopping");
            Ok(())
        }
    }
}

async fn serve(lc: &LockClient, s: &DaemonSettings) -> Result<()> {
    match lc.unlock(&s.id).await {
        Ok(v) => tracing::info!(
            id = %s.id, key = lc.key(), free = v.semaphore.semaphore,
            "released the lock held from before the reboot"
        ),
        Err(LockError::Refused {
            refusal: Refusal::NotHolder { .. },
            ..
        }) => tracing::info!(id = %s.id, "this machine holds no lock"),
        Err(e) => return Err(e.into()),
    }
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
        match lock_waiting(lc, &s.id, &wait).await {
            Ok(_) => {}
            Err(LockError::WaitTimeout { .. }) => {
                tracing::info!("the reboot window closed before a slot was free");
                continue;
            }
            Err(e) => return Err(e.into()),
        }
        if let Err(e) = run_reboot_command(&s.reboot_command).await {
            // Nobody will release the slot after a reboot that does not happen.
            lc.unlock(&s.id).await?;
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
