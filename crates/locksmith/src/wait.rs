//! Waiting for a free slot: try to lock; when refused, watch the key from the revision
//! that refused and retry as soon as it changes, or after an exponential backoff (the
//! safety net when the watch is lost), until an optional deadline. A spinner shows the
//! holders while waiting when stderr is a terminal.
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use mesh_core::client::WatchOptions;

use crate::cas::{LockClient, LockError, Versioned};
use crate::semaphore::{LockOutcome, Refusal};

/// How to wait for a slot.
#[derive(Debug, Clone)]
pub struct WaitOptions {
    /// First pause between attempts when no change is seen.
    pub backoff_min: Duration,
    /// The pause doubles up to this.
    pub backoff_max: Duration,
    /// Give up (exit code 3) after this long; `None` waits forever.
    pub timeout: Option<Duration>,
    /// Show a spinner on stderr (only honored when stderr is a terminal).
    pub spinner: bool,
}

/// Takes a slot for `id`, waiting as long as `opts` allow.
pub async fn lock_waiting(
    lc: &LockClient,
    id: &str,
    opts: &WaitOptions,
) -> Result<(LockOutcome, Versioned), LockError> {
    let started = Instant::now();
    let deadline = opts.timeout.map(|t| started + t);
    let spinner = Spinner::new(opts.spinner);
    let mut backoff = opts.backoff_min;
    loop {
        let (refusal, mod_revision) = match lc.lock(id).await {
            Ok(done) => return Ok(done),
            Err(LockError::Refused {
                refusal: refusal @ Refusal::NoFreeSlot { .. },
                mod_revision,
            }) => (refusal, mod_revision),
            Err(e) => return Err(e),
        };
        spinner.show(lc.key(), &refusal);
        let mut pause = backoff;
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(LockError::WaitTimeout {
                    waited: humantime::format_duration(round_ms(started.elapsed())).to_string(),
                    last: refusal,
                });
            }
            pause = pause.min(left);
        }
        tracing::info!(%refusal, ?pause, "no free slot, waiting for a change");
        let changed = wait_for_change(lc, mod_revision, pause).await;
        tracing::debug!(changed, "retrying the lock");
        backoff = (backoff * 2).min(opts.backoff_max);
    }
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

/// Returns `true` as soon as the key changes after `mod_revision`, `false` when `limit`
/// passes first. A watch that cannot be opened or breaks just leaves the timer.
async fn wait_for_change(lc: &LockClient, mod_revision: i64, limit: Duration) -> bool {
    let watch = async {
        let opts = WatchOptions {
            key: lc.key().as_bytes().to_vec(),
            start_revision: mod_revision + 1,
            ..Default::default()
        };
        let mut watcher = match lc.client().watch(opts).await {
            Ok(w) => w,
            // Compacted past our revision: it certainly changed since.
            Err(e) if e.is_compacted() => return true,
            Err(e) => {
                tracing::debug!(error = %e, "cannot watch the semaphore; backing off instead");
                return std::future::pending().await;
            }
        };
        loop {
            match watcher.message().await {
                Ok(Some(resp)) if !resp.events.is_empty() => return true,
                Ok(Some(_)) => continue,
                Err(e) if e.is_compacted() => return true,
                Ok(None) | Err(_) => return std::future::pending().await,
            }
        }
    };
    tokio::time::timeout(limit, watch).await.unwrap_or(false)
}

/// An indicatif spinner on stderr, or nothing when stderr is not a terminal.
struct Spinner(Option<indicatif::ProgressBar>);

impl Spinner {
    fn new(wanted: bool) -> Spinner {
        if !wanted || !std::io::stderr().is_terminal() {
            return Spinner(None);
        }
        let bar = indicatif::ProgressBar::new_spinner();
        bar.enable_steady_tick(Duration::from_millis(120));
        Spinner(Some(bar))
    }

    fn show(&self, key: &str, refusal: &Refusal) {
        if let (Some(bar), Refusal::NoFreeSlot { max, holders, .. }) = (&self.0, refusal) {
            bar.set_message(format!(
                "waiting for a free slot of {key} (max {max}); held by: {}",
                holders.join(", ")
            ));
        }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}
