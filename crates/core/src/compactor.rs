//! Auto-compaction, with etcd's two modes (`--auto-compaction-mode`):
//!
//! - `periodic`: keep `retention` of history. Every `min(retention, 1h)` the history is
//!   compacted to the revision of `retention` ago, which is sampled ten times as often.
//! - `revision`: keep the last `retention` revisions, checked every five minutes.
//!
//! Every member samples (revisions are the same on all of them), only the leader
//! proposes, so a new leader continues where the old one stopped. [`Periodic`] and
//! [`revision_target`] decide (pure, on the time and revision they are given); [`task`] runs
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
            AutoCompaction::Periodic(retention) => {
                (compact_interval(*retention) / 10).max(Duration::from_millis(100))
            }
            AutoCompaction::Revision(_) => REVISION_CHECK,
        }
    }
}

/// How often periodic mode compacts: the retention, at most hourly.
fn compact_interval(retention: Duration) -> Duration {
    retention.min(MAX_PERIODIC_INTERVAL)
}

/// Periodic mode's samples.
#[derive(Debug)]
pub struct Periodic {
    retention: Duration,
    /// `(time, revision)`, oldest first, spanning at most the retention.
    samples: VecDeque<(Duration, i64)>,
    /// When the last compaction was decided (the start before the first).
    last: Duration,
}

impl Periodic {
    pub fn new(retention: Duration) -> Periodic {
        Periodic {
            retention,
            samples: VecDeque::new(),
            last: Duration::ZERO,
        }
    }

    /// Records `revision` at `now`; once the samples reach back `retention` and a
    /// compaction interval has passed since the last one, the revision to compact to:
    /// the newest sample at least `retention` old.
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
        if now.saturating_sub(self.last) < compact_interval(self.retention) {
            return None;
        }
        let target = target?;
        self.last = now;
        Some(target)
    }
}

/// Revision mode: the revision to compact to, `retention` behind `current`.
pub fn revision_target(current: i64, retention: i64) -> Option<i64> {
    let target = current.checked_sub(retention)?;
    (target > 0).then_some(target)
}

/// Auto-compaction, as a task that runs until dropped. `revision_check` is how often
/// revision mode looks ([`REVISION_CHECK`], etcd's period, outside tests).
pub fn task(
    mode: AutoCompaction,
    revision_check: Duration,
    kv: Arc<KvStore>,
    node: NodeHandle,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let every = match mode {
        AutoCompaction::Periodic(_) => mode.interval(),
        AutoCompaction::Revision(_) => revision_check,
    };
    info!(?mode, ?every, "auto-compaction on");
    async move {
        let start = tokio::time::Instant::now();
        let mut periodic = match mode {
            AutoCompaction::Periodic(r) => Some(Periodic::new(r)),
            AutoCompaction::Revision(_) => None,
        };
        let mut tick = tokio::time::interval(every);
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn periodic_compacts_every_retention_to_the_revision_one_retention_ago() {
        let mut p = Periodic::new(10 * MIN);
        // Sampled every minute (a tenth of the retention), 100 revisions a minute.
        let mut out = Vec::new();
        for m in 0..=30u32 {
            out.push(p.sample(MIN * m, 1 + 100 * i64::from(m)));
        }
        let done: Vec<(usize, i64)> = out
            .iter()
            .enumerate()
            .filter_map(|(m, t)| t.map(|r| (m, r)))
            .collect();
        // At 10, 20 and 30 minutes, each to the revision of ten minutes before.
        assert_eq!(done, [(10, 1), (20, 1001), (30, 2001)]);
    }

    #[test]
    fn periodic_keeps_hourly_compactions_for_long_retentions() {
        let h = 60 * MIN;
        let mut p = Periodic::new(72 * h);
        let step = AutoCompaction::Periodic(72 * h).interval();
        assert_eq!(step, 6 * MIN, "a tenth of an hour");
        let mut done = Vec::new();
        let mut t = Duration::ZERO;
        while t <= 75 * h {
            if let Some(r) = p.sample(t, t.as_secs() as i64) {
                done.push((t, r));
            }
            t += step;
        }
        let times: Vec<u64> = done.iter().map(|(t, _)| t.as_secs() / 3600).collect();
        assert_eq!(times, [72, 73, 74, 75]);
        assert!(done
            .iter()
            .all(|(t, r)| t.as_secs() as i64 - r >= 72 * 3600));
        assert!(p.samples.len() <= 72 * 10 + 2, "{}", p.samples.len());
    }

    #[test]
    fn periodic_keeps_the_old_target_when_writes_stop() {
        let mut p = Periodic::new(10 * MIN);
        for m in 0..10u32 {
            p.sample(MIN * m, 50);
        }
        assert_eq!(p.sample(10 * MIN, 50), Some(50));
        assert!(p.samples.len() <= 12);
    }

    #[test]
    fn sampling_is_a_tenth_of_the_compaction_interval() {
        assert_eq!(
            AutoCompaction::Periodic(30 * MIN).interval(),
            Duration::from_secs(180)
        );
        assert_eq!(AutoCompaction::Periodic(72 * 60 * MIN).interval(), 6 * MIN);
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
