//! The mesh's background loops: accepting connections through a token bucket, dialing
//! seeds and learned peers with per-address exponential backoff, and the periodic
//! anti-entropy / GC round.
use super::{conn, queue_topology, DialState, Inner};
use rand::seq::SliceRandom;
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// A token bucket: `rate` tokens per second, at most `rate` stored.
struct TokenBucket {
    tokens: f64,
    rate: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u32) -> Self {
        TokenBucket {
            tokens: rate as f64,
            rate: rate as f64,
            last: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate.max(1.0));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

pub(super) async fn accept_loop(inner: Arc<Inner>, listener: tokio::net::TcpListener) {
    let mut bucket = TokenBucket::new(inner.cfg.accept_per_sec);
    loop {
        let (stream, addr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and similar: back off instead of spinning.
                tracing::warn!("mesh: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if !bucket.take() {
            inner
                .counters
                .handshakes_refused
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!("mesh: refused connection from {addr}: accept rate limit");
            continue;
        }
        inner.spawn(conn::run(inner.clone(), stream, addr.to_string(), None));
    }
}

/// Keeps seeds and `connect()` targets connected, and tops connections up to
/// `target_degree` from addresses learned through the topology, with per-address
/// exponential backoff.
pub(super) async fn dial_loop(inner: Arc<Inner>) {
    let period = inner
        .cfg
        .reconnect_min
        .min(inner.cfg.heartbeat)
        .max(Duration::from_millis(10));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for addr in dial_candidates(&inner) {
            inner.spawn(conn::dial(inner.clone(), addr));
        }
    }
}

fn dial_candidates(inner: &Inner) -> Vec<String> {
    let mut st = inner.lock();
    let now = Instant::now();
    let connected_addrs: HashSet<String> = st.conns.values().map(|c| c.address.clone()).collect();
    let busy = st.conns.len() + st.handshaking.len();
    let mut want: Vec<String> = st
        .direct
        .iter()
        .filter(|a| !connected_addrs.contains(*a) && !st.self_addresses.contains(*a))
        .cloned()
        .collect();
    if st.conns.len() < inner.cfg.target_degree {
        let mut learned: Vec<String> = st
            .topology
            .entries()
            .filter(|e| e.name != inner.cfg.name && !st.conns.contains_key(&e.name))
            .map(|e| e.address.clone())
            .filter(|a| !a.is_empty() && !st.self_addresses.contains(a) && !want.contains(a))
            .collect();
        learned.shuffle(&mut rand::rng());
        want.extend(
            learned
                .into_iter()
                .take(inner.cfg.target_degree - st.conns.len()),
        );
    }
    let room = inner.cfg.max_connections.saturating_sub(busy);
    let min = inner.cfg.reconnect_min;
    let mut out = Vec::new();
    for addr in want {
        if out.len() >= room {
            break;
        }
        let d = st.dials.entry(addr.clone()).or_insert(DialState {
            next: now,
            backoff: min,
            in_flight: false,
        });
        if !d.in_flight && d.next <= now {
            d.in_flight = true;
            out.push(addr);
        }
    }
    out
}

/// Records a dial's outcome: success resets the backoff, failure doubles it (with
/// jitter) up to `reconnect_max`.
pub(super) fn dial_finished(inner: &Inner, addr: &str, ok: bool) {
    let mut st = inner.lock();
    let (min, max) = (inner.cfg.reconnect_min, inner.cfg.reconnect_max);
    if let Some(d) = st.dials.get_mut(addr) {
        d.in_flight = false;
        if ok {
            d.backoff = min;
            d.next = Instant::now() + min;
        } else {
            let jitter = rand::random::<f64>() * 0.25 + 0.875;
            d.next = Instant::now() + d.backoff.mul_f64(jitter);
            d.backoff = (d.backoff * 2).min(max);
        }
    }
}

pub(super) async fn gossip_loop(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(inner.cfg.gossip_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        inner.gossip_round();
        if let Some(tasks) = inner.tasks.lock().unwrap().as_mut() {
            while tasks.try_join_next().is_some() {}
        }
    }
}

/// Publishes our own entry after it changed: at once after a quiet spell, then at most
/// once per half gossip interval, so the burst of connection changes a starting peer
/// goes through reaches the mesh as a few versions instead of one per connection (each
/// version travels to every peer).
pub(super) async fn announce_loop(inner: Arc<Inner>) {
    let spacing = (inner.cfg.gossip_interval / 2).max(Duration::from_millis(1));
    let mut last: Option<Instant> = None;
    loop {
        inner.own_changed.notified().await;
        if let Some(last) = last {
            tokio::time::sleep_until(last + spacing).await;
        }
        let published = {
            let mut st = inner.lock();
            let published = st.topology.publish_own();
            if published {
                queue_topology(&mut st, &[inner.cfg.name]);
            }
            published
        };
        if published {
            last = Some(Instant::now());
            inner.bump_changes();
        }
    }
}
