//! Commands run while holding a slot: `run` (lock, run CMD passing SIGINT/SIGTERM on
//! to it, unlock, exit with its status) and `reboot` (lock, run the reboot command;
//! the slot stays taken until the daemon releases it after the reboot).
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::cas::{LockClient, LockError};
use crate::semaphore::Refusal;
use crate::wait::{lock_waiting, WaitOptions};

/// SIGINT and SIGTERM, received instead of their default action (dying).
pub struct Signals {
    int: Signal,
    term: Signal,
}

impl Signals {
    pub fn new() -> Result<Signals> {
        Ok(Signals {
            int: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            term: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
        })
    }

    /// The next signal's number.
    pub async fn recv(&mut self) -> i32 {
        tokio::select! {
            _ = self.int.recv() => libc::SIGINT,
            _ = self.term.recv() => libc::SIGTERM,
        }
    }
}

/// The shell's convention for a status: the exit code, or 128 + the killing signal.
pub fn status_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(c), _) => c as u8,
        (None, Some(sig)) => (128 + sig) as u8,
        (None, None) => 1,
    }
}

/// Releases `id`'s slot, treating "not a holder" as done (an interrupted lock may or
/// may not have taken it).
async fn release_if_held(lc: &LockClient, id: &str) -> Result<(), LockError> {
    match lc.unlock(id).await {
        Ok(_)
        | Err(LockError::Refused {
            refusal: Refusal::NotHolder { .. },
            ..
        }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// `locksmith run`: returns the exit code to leave with.
pub async fn run_locked(
    lc: &LockClient,
    id: &str,
    wait: &WaitOptions,
    command: &[OsString],
) -> Result<u8> {
    let mut signals = Signals::new()?;
    tokio::select! {
        locked = lock_waiting(lc, id, wait) => { locked?; }
        sig = signals.recv() => {
            tracing::warn!(sig, "interrupted while waiting for the lock");
            release_if_held(lc, id).await?;
            return Ok((128 + sig) as u8);
        }
    }
    tracing::info!(id, key = lc.key(), "lock acquired, running the command");
    let status = run_forwarding(command, &mut signals).await;
    let released = release_if_held(lc, id)
        .await
        .with_context(|| format!("the command finished but the lock of {id} was NOT released"));
    let code = match status {
        Ok(status) => status_code(status),
        Err(spawn) => {
            eprintln!("Error: {spawn:#}");
            match spawn.downcast_ref::<std::io::Error>().map(|e| e.kind()) {
                Some(std::io::ErrorKind::NotFound) => 127,
                _ => 126,
            }
        }
    };
    released?;
    tracing::info!(id, code, "lock released");
    Ok(code)
}

/// Runs `command` to completion, passing SIGINT/SIGTERM on to it.
async fn run_forwarding(command: &[OsString], signals: &mut Signals) -> Result<ExitStatus> {
    let (program, args) = command.split_first().expect("clap requires a command");
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .spawn()
        .with_context(|| format!("cannot run {}", program.to_string_lossy()))?;
    let pid = child
        .id()
        .expect("a child that has not been waited on has a pid") as libc::pid_t;
    loop {
        tokio::select! {
            status = child.wait() => return Ok(status?),
            sig = signals.recv() => {
                tracing::info!(sig, pid, "passing the signal on to the command");
                // SAFETY: kill(2) on our own child's pid; it is not reaped before
                // `wait` returns, so the pid cannot have been reused.
                unsafe { libc::kill(pid, sig) };
            }
        }
    }
}

/// Runs the reboot command with `sh -c`; an error if it does not succeed.
pub async fn run_reboot_command(command: &str) -> Result<()> {
    tracing::info!(command, "running the reboot command");
    let status = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .status()
        .await
        .with_context(|| format!("cannot run the reboot command {command:?}"))?;
    anyhow::ensure!(
        status.success(),
        "the reboot command {command:?} failed ({status})"
    );
    Ok(())
}

/// `locksmith reboot`: take a slot (waiting) and reboot. If the reboot command fails
/// the slot is released again, since no reboot is going to release it.
pub async fn reboot(lc: &LockClient, id: &str, wait: &WaitOptions, command: &str) -> Result<()> {
    let mut signals = Signals::new()?;
    tokio::select! {
        locked = lock_waiting(lc, id, wait) => { locked?; }
        sig = signals.recv() => {
            release_if_held(lc, id).await?;
            anyhow::bail!("interrupted by signal {sig} while waiting for the lock");
        }
    }
    if let Err(e) = run_reboot_command(command).await {
        release_if_held(lc, id)
            .await
            .context("releasing the lock after the failed reboot command")?;
        return Err(e);
    }
    Ok(())
}
