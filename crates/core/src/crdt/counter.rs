//! Grow-only and positive-negative counters with one entry per peer, a set of named
//! PN-counters, and [`CounterGossiper`], a gossip channel holding named counters.
use crate::mesh::{GossipChannel, GossipData, GossipError, Gossiper, Mesh, PeerName};
use crate::proto::meshpb::{CrdtCounterEntry, CrdtCounterSet, CrdtNamedCounter};
use prost::Message;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

/// A grow-only counter: each peer only raises its own entry; the value is their sum and
/// merge takes the per-peer maximum.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GCounter {
    entries: BTreeMap<PeerName, u64>,
}

impl GCounter {
    pub fn incr(&mut self, peer: PeerName, by: u64) {
        if by == 0 {
            return;
        }
        let e = self.entries.entry(peer).or_insert(0);
        *e = e.saturating_add(by);
    }

    pub fn value(&self) -> u64 {
        self.entries
            .values()
            .fold(0u64, |a, b| a.saturating_add(*b))
    }

    /// Merges `other`, returning the entries that were new (raised) here.
    fn merge_delta(&mut self, other: &GCounter) -> GCounter {
        let mut delta = GCounter::default();
        // Zero entries are never stored, so equal values have equal representations.
        for (&peer, &v) in other.entries.iter().filter(|(_, &v)| v > 0) {
            let e = self.entries.entry(peer).or_insert(0);
            if v > *e {
                *e = v;
                delta.entries.insert(peer, v);
            }
        }
        delta
    }

    fn to_pb(&self) -> Vec<CrdtCounterEntry> {
        self.entries
            .iter()
            .map(|(&peer, &value)| CrdtCounterEntry { peer, value })
            .collect()
    }

    fn from_pb(entries: &[CrdtCounterEntry]) -> GCounter {
        let mut g = GCounter::default();
        for e in entries.iter().filter(|e| e.value > 0) {
            let v = g.entries.entry(e.peer).or_insert(0);
            *v = (*v).max(e.value);
        }
        g
    }
}

impl GossipData for GCounter {
    fn encode(&self) -> Vec<Vec<u8>> {
        let named = CrdtNamedCounter {
            name: String::new(),
            increments: self.to_pb(),
            decrements: vec![],
        };
        vec![CrdtCounterSet {
            counters: vec![named],
        }
        .encode_to_vec()]
    }

    fn merge(&mut self, other: &Self) {
        self.merge_delta(other);
    }
}

/// A counter that goes both ways: two G-counters, value = increments − decrements.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PNCounter {
    increments: GCounter,
    decrements: GCounter,
}

impl PNCounter {
    pub fn add(&mut self, peer: PeerName, delta: i64) {
        if delta >= 0 {
            self.increments.incr(peer, delta as u64);
        } else {
            self.decrements.incr(peer, delta.unsigned_abs());
        }
    }

    pub fn value(&self) -> i64 {
        (self.increments.value() as i128 - self.decrements.value() as i128)
            .clamp(i64::MIN as i128, i64::MAX as i128) as i64
    }

    fn merge_delta(&mut self, other: &PNCounter) -> Option<PNCounter> {
        let delta = PNCounter {
            increments: self.increments.merge_delta(&other.increments),
            decrements: self.decrements.merge_delta(&other.decrements),
        };
        (delta != PNCounter::default()).then_some(delta)
    }

    /// Only `peer`'s entries: what an increment by `peer` changed.
    fn own_part(&self, peer: PeerName) -> PNCounter {
        let pick = |g: &GCounter| GCounter {
            entries: g
                .entries
                .get(&peer)
                .map(|&v| (peer, v))
                .into_iter()
                .collect(),
        };
        PNCounter {
            increments: pick(&self.increments),
            decrements: pick(&self.decrements),
        }
    }
}

impl GossipData for PNCounter {
    fn encode(&self) -> Vec<Vec<u8>> {
        CounterSet {
            counters: BTreeMap::from([(String::new(), self.clone())]),
        }
        .encode()
    }

    fn merge(&mut self, other: &Self) {
        self.merge_delta(other);
    }
}

/// Named PN-counters; merged name by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CounterSet {
    pub counters: BTreeMap<String, PNCounter>,
}

/// Names per encoded message, so a large set travels as several frames.
const NAMES_PER_MESSAGE: usize = 1000;
/// Most counters a set holds, longest name, and most peers one counter holds entries
/// for: merging a peer's state never grows memory past them.
pub const MAX_COUNTERS: usize = 10_000;
pub const MAX_NAME_BYTES: usize = 256;
pub const MAX_PEERS_PER_COUNTER: usize = 1024;

impl CounterSet {
    pub fn decode(bytes: &[u8]) -> Result<CounterSet, prost::DecodeError> {
        let pb = CrdtCounterSet::decode(bytes)?;
        let mut set = CounterSet::default();
        for c in pb.counters {
            let counter = PNCounter {
                increments: GCounter::from_pb(&c.increments),
                decrements: GCounter::from_pb(&c.decrements),
            };
            set.counters.entry(c.name).or_default().merge(&counter);
        }
        Ok(set)
    }

    /// Merges `other`, returning what was new here (`None`: nothing). Counters past
    /// the caps (`MAX_COUNTERS`, `MAX_NAME_BYTES`, `MAX_PEERS_PER_COUNTER`) are
    /// left out.
    pub fn merge_delta(&mut self, other: &CounterSet) -> Option<CounterSet> {
        let mut delta = CounterSet::default();
        for (name, c) in &other.counters {
            let existing = self.counters.get(name);
            let room = existing.is_some() || self.counters.len() < MAX_COUNTERS;
            // Peers the merged counter would hold entries for.
            let union = |a: Option<&GCounter>, b: &GCounter| {
                a.map_or(0, |a| a.entries.len())
                    + b.entries
                        .keys()
                        .filter(|k| a.is_none_or(|a| !a.entries.contains_key(k)))
                        .count()
            };
            let peers = union(existing.map(|e| &e.increments), &c.increments)
                .max(union(existing.map(|e| &e.decrements), &c.decrements));
            if !room || name.len() > MAX_NAME_BYTES || peers > MAX_PEERS_PER_COUNTER {
                tracing::debug!(counter = %name.escape_debug(), "counter over a cap left out");
                continue;
            }
            if let Some(d) = self
                .counters
                .entry(name.clone())
                .or_default()
                .merge_delta(c)
            {
                delta.counters.insert(name.clone(), d);
            }
        }
        (!delta.counters.is_empty()).then_some(delta)
    }
}

impl GossipData for CounterSet {
    fn encode(&self) -> Vec<Vec<u8>> {
        let all: Vec<CrdtNamedCounter> = self
            .counters
            .iter()
            .map(|(name, c)| CrdtNamedCounter {
                name: name.clone(),
                increments: c.increments.to_pb(),
                decrements: c.decrements.to_pb(),
            })
            .collect();
        all.chunks(NAMES_PER_MESSAGE)
            .map(|chunk| {
                CrdtCounterSet {
                    counters: chunk.to_vec(),
                }
                .encode_to_vec()
            })
            .collect()
    }

    fn merge(&mut self, other: &Self) {
        self.merge_delta(other);
    }
}

/// A gossip channel of named PN-counters: [`CounterGossiper::incr`] here, and every
/// peer's [`CounterGossiper::get`] converges to the sum of all increments.
pub struct CounterGossiper {
    own: PeerName,
    set: Mutex<CounterSet>,
    channel: OnceLock<Arc<GossipChannel>>,
}

impl CounterGossiper {
    /// Creates the gossiper and registers it on `mesh` as `channel`.
    pub fn register(mesh: &Mesh, channel: &str) -> Arc<CounterGossiper> {
        let g = Arc::new(CounterGossiper {
            own: mesh.name(),
            set: Mutex::new(CounterSet::default()),
            channel: OnceLock::new(),
        });
        let ch = mesh.register(channel, g.clone());
        let _ = g.channel.set(ch);
        g
    }

    /// Adds `delta` (may be negative) to counter `name` and broadcasts the change.
    pub fn incr(&self, name: &str, delta: i64) {
        let update = {
            let mut set = self.set.lock().unwrap();
            let c = set.counters.entry(name.to_string()).or_default();
            c.add(self.own, delta);
            CounterSet {
                counters: BTreeMap::from([(name.to_string(), c.own_part(self.own))]),
            }
        };
        if let Some(ch) = self.channel.get() {
            ch.broadcast(Box::new(update));
        }
    }

    /// The current value of `name` as far as this peer knows (0 if unknown).
    pub fn get(&self, name: &str) -> i64 {
        self.set
            .lock()
            .unwrap()
            .counters
            .get(name)
            .map_or(0, PNCounter::value)
    }

    pub fn names(&self) -> Vec<String> {
        self.set.lock().unwrap().counters.keys().cloned().collect()
    }

    fn merge_bytes(&self, bytes: &[u8]) -> Result<Option<Box<dyn GossipData>>, GossipError> {
        let other = CounterSet::decode(bytes)?;
        let delta = self.set.lock().unwrap().merge_delta(&other);
        Ok(delta.map(|d| Box::new(d) as Box<dyn GossipData>))
    }
}

impl Gossiper for CounterGossiper {
    fn on_unicast(&self, _src: PeerName, msg: &[u8]) -> Result<(), GossipError> {
        self.merge_bytes(msg).map(|_| ())
    }

    fn on_broadcast(
        &self,
        _src: PeerName,
        update: &[u8],
    ) -> Result<Option<Box<dyn GossipData>>, GossipError> {
        self.merge_bytes(update)
    }

    fn gossip(&self) -> Option<Box<dyn GossipData>> {
        let set = self.set.lock().unwrap();
        (!set.counters.is_empty()).then(|| Box::new(set.clone()) as Box<dyn GossipData>)
    }

    fn on_gossip(&self, update: &[u8]) -> Result<Option<Box<dyn GossipData>>, GossipError> {
        self.merge_bytes(update)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn gcounter() -> impl Strategy<Value = GCounter> {
        prop::collection::btree_map(0u64..4, 1u64..1000, 0..4)
            .prop_map(|entries| GCounter { entries })
    }

    fn pncounter() -> impl Strategy<Value = PNCounter> {
        (gcounter(), gcounter()).prop_map(|(increments, decrements)| PNCounter {
            increments,
            decrements,
        })
    }

    #[test]
    fn merging_never_grows_past_the_caps() {
        let mut set = CounterSet::default();
        let many = CounterSet {
            counters: (0..MAX_COUNTERS + 10)
                .map(|i| {
                    let mut c = PNCounter::default();
                    c.add(1, 1);
                    (format!("c{i}"), c)
                })
                .collect(),
        };
        set.merge_delta(&many);
        assert_eq!(set.counters.len(), MAX_COUNTERS);
        let mut wide = PNCounter::default();
        for peer in 0..=MAX_PEERS_PER_COUNTER as u64 {
            wide.add(peer + 100, 1);
        }
        let long = "x".repeat(MAX_NAME_BYTES + 1);
        let mut small = CounterSet::default();
        small.merge_delta(&CounterSet {
            counters: BTreeMap::from([("wide".to_string(), wide), (long, PNCounter::default())]),
        });
        assert!(small.counters.is_empty());
    }

    fn merged<T: GossipData + Clone>(a: &T, b: &T) -> T {
        let mut x = a.clone();
        x.merge(b);
        x
    }

    proptest! {
        #[test]
        fn gcounter_merge_laws(a in gcounter(), b in gcounter(), c in gcounter()) {
            prop_assert_eq!(merged(&a, &b), merged(&b, &a));
            prop_assert_eq!(merged(&merged(&a, &b), &c), merged(&a, &merged(&b, &c)));
            prop_assert_eq!(merged(&a, &a), a.clone());
            prop_assert!(merged(&a, &b).value() >= a.value().max(b.value()));
        }

        #[test]
        fn pncounter_merge_laws(a in pncounter(), b in pncounter(), c in pncounter()) {
            prop_assert_eq!(merged(&a, &b), merged(&b, &a));
            prop_assert_eq!(merged(&merged(&a, &b), &c), merged(&a, &merged(&b, &c)));
            prop_assert_eq!(merged(&a, &a), a.clone());
        }

        #[test]
        fn counter_set_round_trips_and_delta_is_exactly_the_news(a in pncounter(), b in pncounter()) {
            let sa = CounterSet { counters: BTreeMap::from([("x".to_string(), a)]) };
            let sb = CounterSet { counters: BTreeMap::from([("x".to_string(), b)]) };
            let decoded = CounterSet::decode(&sb.encode()[0]).unwrap();
            prop_assert_eq!(&decoded, &sb);
            let mut here = sa.clone();
            let delta = here.merge_delta(&sb);
            prop_assert_eq!(&here, &merged(&sa, &sb));
            // Merging the delta into the old state gives the same result as the whole.
            let mut via_delta = sa.clone();
            if let Some(d) = delta { via_delta.merge(&d); }
            prop_assert_eq!(via_delta, here);
        }
    }

    #[test]
    fn pn_value_counts_both_ways() {
        let mut c = PNCounter::default();
        c.add(1, 5);
        c.add(2, -7);
        c.add(1, 1);
        assert_eq!(c.value(), -1);
        assert!(CounterSet::decode(b"\xff").is_err());
    }
}
