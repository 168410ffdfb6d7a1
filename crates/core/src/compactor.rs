//! Auto-compaction, with etcd's two modes (`--auto-compaction-mode`):
//!
//! - `periodic`: keep `retention` of history. The revision is sampled every tenth of the
//!   retention (at most every hour); once the samples span the retention, each sample
//!   compacts to the revision sampled `retention` earlier.
//! - `revision`: keep the last `retention` revisions, checked every five minutes.
//!
//! Every member samples (revisions are the same on all of them), only the leader
//! proposes, so a new leader continues where the old one stopped. [`Periodic`] and
//! [`Revisions`] decide (pure, on the time and revision they are given); [`spawn`] runs
//! them on the clock and proposes the compactions.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::kv::{KvError, KvStore};
use crate::proto::etcdserverpb::CompactionRequest;
use crate::proto::meshpb::internal_request::Request as Internal;
use crate::raft::{NodeHandle, ProposeError};

/// How history is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AutoCompaction {
    /// Keep this much time of history.
    Periodic(Duration),
    /// Keep this many revisions.
    Revision(i64),
}

/// How often revision mode checks (etcd's interval).
pub const REVISION_CHECK: Duration = Duration::from_secs(5 * 60);
/// Longest interval between periodic samples.
const MAX_PERIODIC_INTERVAL: Duration = Duration::from_secs(60 * 60);

impl AutoCompaction {
    /// How often the mode samples the revision.
    pub fn interval(&self) -> Duration {
        match self {
            AutoCompaction::Periodic(retention) => (*retention / 10)
                .min(MAX_PERIODIC_INTERVAL)
                .max(Duration::from_millis(100)),
            AutoCompaction::Revision(_) => REVISION_CHECK,
        }
    }
}

/// Periodic mode's samples.
#[derive(Debug)]
pub struct Periodic {
    retention: Duration,
    /// `(time, revision)`, oldest first, spanning at most the retention.
    samples: VecDeque<(Duration, i64)>,
}

impl Periodic {
    pub fn new(retention: Duration) -> Periodic {
        Periodic {
            retention,
            samples: VecDeque::new(),
        }
    }

    /// Records `revision` at `now`; the revision to compact to once the samples reach
    /// back `retention`: the newest one at least that old.
    pub fn sample(&mut self, now: Duration, revision: i64) -> Option<i64> {
        self.samples.push_back((now, revision));
        let mut target = None;
        while let Some(&(t, rev)) = self.samples.front() {
            if now.saturating_sub(t) >= self.retention {
                target = Some(rev);
                self.samples.pop_front();
            } else {
                break;
            }
        }
        // The target stays as the oldest sample: the next compaction needs it.
        if let Some(rev) = target {
            self.samples
                .push_front((now.saturating_sub(self.retention), rev));
        }
        target
    }
}

/// Revision mode: the revision to compact to, `retention` behind `current`.
pub fn revision_target(current: i64, retention: i64) -> Option<i64> {
    let target = current.checked_sub(retention)?;
    (target > 0).then_some(target)
}

/// Runs auto-compaction until the task is aborted.
pub fn spawn(
    mode: AutoCompaction,
    kv: Arc<KvStore>,
    node: NodeHandle,
) -> tokio::task::JoinHandle<()> {
    info!(?mode, every = ?mode.interval(), "auto-compaction on");
    tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        let mut periodic = match mode {
            AutoCompaction::Periodic(r) => Some(Periodic::new(r)),
            AutoCompaction::Revision(_) => None,
        };
        let mut tick = tokio::time::interval(mode.interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let current = kv.current_revision();
            let target = match (&mut periodic, mode) {
                (Some(p), _) => p.sample(start.elapsed(), current),
                (None, AutoCompaction::Revision(keep)) => revision_target(current, keep),
                (None, AutoCompaction::Periodic(_)) => None,
            };
            let Some(target) = target else { continue };
            let leader = node.status.leader();
            if leader == 0 || leader != node.status.member_id {
                continue;
            }
            if target <= kv.compact_revision() {
                continue;
            }
            let req = Internal::Compaction(CompactionRequest {
                revision: target,
                physical: false,
            });
            match node.propose(req).await {
                Ok(_) => info!(revision = target, "auto-compacted history"),
                Err(ProposeError::Kv(KvError::Compacted { .. } | KvError::FutureRevision)) => {
                    debug!(revision = target, "auto-compaction: nothing to do")
                }
                Err(e) => warn!(revision = target, "auto-compaction failed: {e}"),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn periodic_compacts_to_the_revision_one_retention_ago() {
        let mut p = Periodic::new(10 * MIN);
        // Sampled every minute (a tenth of the retention), 100 revisions a minute.
        let mut out = Vec::new();
        for m in 0..=13u32 {
            out.push(p.sample(MIN * m, 1 + 100 * i64::from(m)));
        }
        assert!(out[..10].iter().all(Option::is_none), "{out:?}");
        assert_eq!(out[10], Some(1), "at 10 min: the revision of minute 0");
        assert_eq!(out[11], Some(101));
        assert_eq!(out[13], Some(301));
    }

    #[test]
    fn periodic_keeps_the_old_target_when_writes_stop() {
        let mut p = Periodic::new(10 * MIN);
        for m in 0..=10u32 {
            p.sample(MIN * m, 50);
        }
        assert_eq!(p.sample(11 * MIN, 50), Some(50));
        assert!(p.samples.len() <= 12);
    }

    #[test]
    fn periodic_interval_is_a_tenth_capped_at_an_hour() {
        assert_eq!(
            AutoCompaction::Periodic(30 * MIN).interval(),
            Duration::from_secs(180)
        );
        assert_eq!(AutoCompaction::Periodic(72 * 60 * MIN).interval(), 60 * MIN);
        assert_eq!(AutoCompaction::Revision(1000).interval(), REVISION_CHECK);
    }

    #[test]
    fn revision_mode_keeps_the_last_n_revisions() {
        assert_eq!(revision_target(1500, 1000), Some(500));
        assert_eq!(revision_target(1000, 1000), None);
        assert_eq!(revision_target(10, 1000), None);
        assert_eq!(revision_target(i64::MIN, 5), None);
    }
}
