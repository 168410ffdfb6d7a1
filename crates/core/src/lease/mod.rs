//! The lessor: when leases expire. Owns the in-memory deadline of every lease on this
//! member; only while this member is the Raft leader are they acted on, by proposing a
//! `LeaseRevoke` through Raft for each expired lease (`crate::raft::lease_expiry`, so
//! this module does not depend on Raft).
//!
//! Every member keeps deadlines, refreshed when it applies a grant or a replicated
//! keep-alive, so a new leader starts from recent values; on promotion it still
//! extends every deadline to a full TTL plus an election timeout (etcd's `Promote`),
//! because keep-alives the old leader answered locally were never replicated.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::info;

use crate::kv::{KvError, KvStore};
use crate::proto::meshpb::LeaseRecord;

/// A lease as the lessor tracks it.
#[derive(Clone, Copy, Debug)]
struct Deadline {
    /// Granted TTL in seconds.
    ttl: i64,
    expires: Instant,
}

#[derive(Default)]
struct State {
    deadlines: HashMap<i64, Deadline>,
    /// Expired leases whose revoke was proposed, with when: proposed again only after
    /// `REVOKE_RETRY` (the proposal may have been lost in a leader change).
    revoking: HashMap<i64, Instant>,
    /// The term in which this member last became leader and extended the deadlines.
    leader_term: u64,
}

/// How long to wait before proposing the revoke of an expired lease again.
const REVOKE_RETRY: Duration = Duration::from_secs(3);

pub use crate::Clock;

/// Lease deadlines of one member. Shared by the Raft driver (apply), the Lease API
/// (keep-alives on the leader) and the expiry task. Every decision reads the time from
/// its [`Clock`], so the rules are tested without waiting.
pub struct Lessor {
    clock: Clock,
    state: Mutex<State>,
    /// Smallest TTL granted, in seconds: a lease must survive a leader election.
    min_ttl: i64,
    /// Added to every deadline on promotion: one election timeout.
    extend: Duration,
    /// Low 48 bits of the next server-chosen lease ID (see `next_lease_id`).
    id_suffix: AtomicU64,
}

impl Lessor {
    /// etcd's minimum TTL: ⌈(3 × election ticks / 2) × tick⌉ seconds, so a lease
    /// outlives the election that follows a leader failure.
    pub fn min_ttl_for(tick: Duration, election_ticks: usize) -> i64 {
        let min = tick * ((3 * election_ticks / 2) as u32);
        min.as_secs() as i64 + i64::from(min.subsec_nanos() > 0)
    }

    pub fn new(min_ttl: i64, extend: Duration) -> Arc<Lessor> {
        Lessor::with_clock(min_ttl, extend, crate::system_clock())
    }

    /// [`Lessor::new`] on `clock`.
    pub fn with_clock(min_ttl: i64, extend: Duration, clock: Clock) -> Arc<Lessor> {
        Arc::new(Lessor {
            clock,
            state: Mutex::new(State::default()),
            min_ttl: min_ttl.max(1),
            extend,
            id_suffix: AtomicU64::new(id_suffix_start()),
        })
    }

    /// A lease ID for a grant that left the choice to the server, unique across the
    /// cluster as etcd makes it: the member ID's low 16 bits, then a 48-bit counter
    /// that starts from the wall clock in milliseconds (shifted left by 8) so a
    /// restarted member does not reuse IDs. Always positive.
    pub fn next_lease_id(&self, member_id: u64) -> i64 {
        const LOW48: u64 = (1 << 48) - 1;
        let suffix = self
            .id_suffix
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(1)
            & LOW48;
        let id = ((member_id << 48) | suffix) & (i64::MAX as u64);
        if id == 0 {
            return self.next_lease_id(member_id);
        }
        id as i64
    }

    /// One election timeout: how long a lost proposal may go unnoticed.
    pub fn election_timeout(&self) -> Duration {
        self.extend
    }

    /// The TTL a grant of `requested` seconds gets.
    pub fn granted_ttl(&self, requested: i64) -> i64 {
        requested.max(self.min_ttl)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("lessor lock")
    }

    /// Forget every deadline and start each lease afresh (start-up, snapshot install).
    pub fn reset(&self, leases: &[LeaseRecord]) {
        let now = (self.clock)();
        let mut s = self.state();
        s.deadlines = leases
            .iter()
            .map(|l| (l.id, deadline(now, l.ttl, Duration::ZERO)))
            .collect();
        s.revoking.clear();
    }

    /// A grant was applied.
    pub fn granted(&self, id: i64, ttl: i64) {
        self.state()
            .deadlines
            .insert(id, deadline((self.clock)(), ttl, Duration::ZERO));
    }

    /// A revoke was applied.
    pub fn revoked(&self, id: i64) {
        let mut s = self.state();
        s.deadlines.remove(&id);
        s.revoking.remove(&id);
    }

    /// Restart the lease's TTL; returns it, or None if the lease is unknown or has
    /// already expired (its revoke is on the way).
    pub fn renew(&self, id: i64) -> Option<i64> {
        let now = (self.clock)();
        let mut s = self.state();
        let d = s.deadlines.get_mut(&id)?;
        if d.expires <= now {
            return None;
        }
        *d = deadline(now, d.ttl, Duration::ZERO);
        Some(d.ttl)
    }

    /// Seconds left before the lease expires (rounded up), or None if unknown.
    pub fn remaining(&self, id: i64) -> Option<i64> {
        let s = self.state();
        let d = s.deadlines.get(&id)?;
        let left = d.expires.saturating_duration_since((self.clock)());
        Some(left.as_secs() as i64 + i64::from(left.subsec_nanos() > 0))
    }

    /// This member is leader in `term`: the first time for a term, give every lease a
    /// full TTL plus an election timeout from now.
    pub(crate) fn promote(&self, term: u64) {
        let now = (self.clock)();
        let mut s = self.state();
        if s.leader_term == term {
            return;
        }
        s.leader_term = term;
        s.revoking.clear();
        for d in s.deadlines.values_mut() {
            *d = deadline(now, d.ttl, self.extend);
        }
        info!(term, leases = s.deadlines.len(), "lessor promoted");
    }

    pub(crate) fn demote(&self) {
        self.state().leader_term = 0;
    }

    /// Expired leases whose revoke is not already in flight; marks them in flight.
    pub(crate) fn take_expired(&self) -> Vec<i64> {
        let now = (self.clock)();
        let mut s = self.state();
        let State {
            deadlines,
            revoking,
            ..
        } = &mut *s;
        let mut out = Vec::new();
        for (id, d) in deadlines.iter() {
            if d.expires > now {
                continue;
            }
            match revoking.get(id) {
                Some(at) if now.duration_since(*at) < REVOKE_RETRY => {}
                _ => {
                    revoking.insert(*id, now);
                    out.push(*id);
                }
            }
        }
        out
    }
}

fn id_suffix_start() -> u64 {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    (ms << 8) & ((1 << 48) - 1)
}

fn deadline(now: Instant, ttl: i64, extra: Duration) -> Deadline {
    // A TTL from a restored file may be absurd: such a lease never expires rather than
    // overflowing the clock.
    let expires = now
        .checked_add(Duration::from_secs(ttl.max(0) as u64))
        .and_then(|t| t.checked_add(extra))
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600));
    Deadline { ttl, expires }
}

/// Loads the lessor from the replicated lease table.
pub fn load(lessor: &Lessor, kv: &KvStore) -> Result<(), KvError> {
    lessor.reset(&kv.leases()?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lessor on a clock the test moves.
    fn lessor_at(extend: Duration) -> (Arc<Lessor>, impl Fn(Duration)) {
        let now = Arc::new(Mutex::new(Instant::now()));
        let read = now.clone();
        let clock: Clock = Arc::new(move || *read.lock().unwrap());
        let l = Lessor::with_clock(1, extend, clock);
        let advance = move |d: Duration| *now.lock().unwrap() += d;
        (l, advance)
    }

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn a_lease_expires_at_its_ttl_and_not_before() {
        let (l, advance) = lessor_at(SEC);
        l.granted(7, 10);
        assert_eq!(l.remaining(7), Some(10));
        advance(9 * SEC + SEC / 2);
        assert_eq!(l.remaining(7), Some(1), "rounded up");
        assert!(l.take_expired().is_empty(), "never earlier than the TTL");
        advance(SEC / 2);
        assert_eq!(l.take_expired(), [7]);
        assert_eq!(l.renew(7), None, "an expired lease is not renewed");
    }

    #[test]
    fn a_keep_alive_restarts_the_ttl() {
        let (l, advance) = lessor_at(SEC);
        l.granted(7, 10);
        advance(8 * SEC);
        assert_eq!(l.renew(7), Some(10));
        advance(8 * SEC);
        assert!(l.take_expired().is_empty());
        advance(2 * SEC);
        assert_eq!(l.take_expired(), [7]);
    }

    #[test]
    fn a_revoke_is_proposed_again_only_after_the_retry_interval() {
        let (l, advance) = lessor_at(SEC);
        l.granted(7, 1);
        advance(SEC);
        assert_eq!(l.take_expired(), [7]);
        advance(REVOKE_RETRY - SEC / 10);
        assert!(l.take_expired().is_empty(), "its revoke is in flight");
        advance(SEC / 10);
        assert_eq!(l.take_expired(), [7], "the proposal may have been lost");
        l.revoked(7);
        advance(REVOKE_RETRY);
        assert!(l.take_expired().is_empty());
        assert_eq!(l.remaining(7), None);
    }

    #[test]
    fn promotion_gives_every_lease_a_full_ttl_plus_an_election_once_per_term() {
        let (l, advance) = lessor_at(2 * SEC);
        l.granted(7, 10);
        advance(9 * SEC);
        l.promote(3);
        // Keep-alives the old leader answered were never replicated: start afresh.
        advance(11 * SEC);
        assert!(l.take_expired().is_empty(), "10 s + one election timeout");
        l.promote(3);
        advance(SEC);
        assert_eq!(l.take_expired(), [7], "the same term does not extend again");
        l.demote();
        l.promote(4);
        assert!(
            l.take_expired().is_empty(),
            "a new term does, and clears revokes"
        );
    }

    #[test]
    fn reset_starts_every_lease_afresh() {
        let (l, advance) = lessor_at(SEC);
        l.granted(1, 5);
        advance(4 * SEC);
        l.reset(&[LeaseRecord { id: 1, ttl: 5 }, LeaseRecord { id: 2, ttl: 3 }]);
        advance(3 * SEC);
        assert_eq!(l.take_expired(), [2]);
        assert_eq!(l.remaining(1), Some(2));
    }

    #[test]
    fn min_ttl_is_rounded_up_to_whole_seconds() {
        // etcd's defaults: 100 ms ticks, 10 election ticks → 1.5 s → 2 s.
        assert_eq!(Lessor::min_ttl_for(Duration::from_millis(100), 10), 2);
        assert_eq!(Lessor::min_ttl_for(Duration::from_millis(25), 12), 1);
        assert_eq!(Lessor::min_ttl_for(Duration::from_secs(1), 10), 15);
    }

    #[test]
    fn server_chosen_ids_are_positive_unique_and_carry_the_member() {
        let l = Lessor::new(1, Duration::ZERO);
        let member = 0xabcd_1234_5678_9a7f_u64;
        let ids: Vec<i64> = (0..1000).map(|_| l.next_lease_id(member)).collect();
        assert!(ids.iter().all(|id| *id > 0));
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        // The member's low 16 bits on top, minus the sign bit.
        assert!(ids.iter().all(|id| (*id as u64) >> 48 == 0x9a7f & 0x7fff));
    }

    #[test]
    fn promotion_extends_and_expired_leases_are_taken_once() {
        let l = Lessor::new(1, Duration::from_secs(5));
        l.reset(&[
            LeaseRecord { id: 1, ttl: 0 },
            LeaseRecord { id: 2, ttl: 60 },
        ]);
        // Lease 1 has a zero TTL: already expired, so it cannot be renewed.
        assert_eq!(l.renew(1), None);
        assert_eq!(l.take_expired(), vec![1]);
        assert!(l.take_expired().is_empty(), "in flight: not proposed twice");
        l.promote(7);
        // Promotion gives lease 1 a fresh election timeout.
        assert!(l.take_expired().is_empty());
        assert_eq!(l.remaining(1), Some(5));
        assert_eq!(l.renew(2), Some(60));
        l.revoked(1);
        assert_eq!(l.remaining(1), None);
    }
}
