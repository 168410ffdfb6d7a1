//! A linearizability checker for single-key register histories (Wing & Gong's search
//! with Lowe's just-in-time linearization and a memo of (linearized set, state), as in
//! Porcupine). Keys are independent registers, so a history is checked key by key.
//!
//! An operation whose outcome is unknown (timeout, connection lost after sending) may
//! take effect at any moment after its invocation, or never: it gets no return event,
//! so the search may place it anywhere after its invocation (placing it after every
//! other operation is the same as "never").

use std::collections::{BTreeMap, HashSet};
use std::fmt;

/// What a client asked for. Values are numbers unique per write, so a read names the
/// write it observed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Input {
    Get,
    Put(u64),
    /// Compare the value with `expect`, and if equal put `new` (a txn).
    Cas {
        expect: u64,
        new: u64,
    },
    Delete,
}

/// What the client was told.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Output {
    /// The value read (None: no such key).
    Get(Option<u64>),
    Put,
    /// Whether the comparison held (and the put happened).
    Cas(bool),
    /// Whether a key was deleted.
    Delete(bool),
    /// No answer: possibly applied, possibly not.
    Unknown,
}

/// One operation of a history. Times are nanoseconds since the run started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    pub client: usize,
    pub key: String,
    pub input: Input,
    pub output: Output,
    pub invoke: u64,
    /// None when the outcome is unknown.
    pub ret: Option<u64>,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ret = self
            .ret
            .map_or("?".to_string(), |r| format!("{:.3}", r as f64 / 1e9));
        write!(
            f,
            "client {} [{:.3}s .. {}s] {} {:?} -> {:?}",
            self.client,
            self.invoke as f64 / 1e9,
            ret,
            self.key,
            self.input,
            self.output
        )
    }
}

/// The register model: applies `input` to `state`; None if `output` cannot be what
/// the client was told in that state.
fn step(state: Option<u64>, input: Input, output: Output) -> Option<Option<u64>> {
    let unknown = output == Output::Unknown;
    match input {
        Input::Get => (unknown || output == Output::Get(state)).then_some(state),
        Input::Put(v) => (unknown || output == Output::Put).then_some(Some(v)),
        Input::Cas { expect, new } => {
            let holds = state == Some(expect);
            if !unknown && output != Output::Cas(holds) {
                return None;
            }
            Some(if holds { Some(new) } else { state })
        }
        Input::Delete => (unknown || output == Output::Delete(state.is_some())).then_some(None),
    }
}

/// The result of checking one history.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// A key's history has no linearization; the witness says where it gets stuck.
    Violation(Witness),
    /// The search gave up after its step budget (too many concurrent unknowns).
    Inconclusive {
        key: String,
    },
}

/// Why a key's history is not linearizable: the longest prefix the search could
/// linearize, the operation that then had to be placed but fit nowhere, and the
/// operations concurrent with it.
#[derive(Debug, PartialEq, Eq)]
pub struct Witness {
    pub key: String,
    /// The longest partial linearization found (in order) and the state it ends in.
    pub linearized: Vec<Op>,
    pub state: Option<u64>,
    /// The operation that returned before it could be linearized.
    pub stuck: Op,
    /// Operations not in the prefix that overlap `stuck` (the candidates there were).
    pub concurrent: Vec<Op>,
}

impl fmt::Display for Witness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "key {:?} is not linearizable", self.key)?;
        let skip = self.linearized.len().saturating_sub(5);
        writeln!(
            f,
            "  last of the {} ops linearized (state after: {:?}):",
            self.linearized.len(),
            self.state
        )?;
        for op in &self.linearized[skip..] {
            writeln!(f, "    {op}")?;
        }
        writeln!(f, "  cannot linearize: {}", self.stuck)?;
        writeln!(f, "  concurrent with it:")?;
        for op in &self.concurrent {
            writeln!(f, "    {op}")?;
        }
        Ok(())
    }
}

/// Checks every key's history (operations of other keys are independent).
pub fn check(ops: &[Op], budget: u64) -> Verdict {
    let mut by_key: BTreeMap<&str, Vec<Op>> = BTreeMap::new();
    for op in ops {
        by_key.entry(&op.key).or_default().push(op.clone());
    }
    let mut inconclusive = None;
    for (key, ops) in by_key {
        match check_key(&ops, budget) {
            Verdict::Linearizable => {}
            v @ Verdict::Violation(_) => return v,
            Verdict::Inconclusive { .. } => inconclusive = Some(key.to_string()),
        }
    }
    match inconclusive {
        Some(key) => Verdict::Inconclusive { key },
        None => Verdict::Linearizable,
    }
}

#[derive(Clone, Copy)]
struct Event {
    op: usize,
    is_call: bool,
    /// For a call, the index of its return event (usize::MAX when unknown).
    partner: usize,
}

/// One key: the search over a doubly linked list of call and return events.
fn check_key(ops: &[Op], budget: u64) -> Verdict {
    let key = ops.first().map(|o| o.key.clone()).unwrap_or_default();
    // Events sorted by time; calls before returns at equal times (treat as concurrent).
    // An unknown outcome returns "at infinity": after every other event.
    let mut order: Vec<(u64, bool, usize)> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        order.push((op.invoke, false, i));
        order.push((op.ret.unwrap_or(u64::MAX), true, i));
    }
    order.sort();
    let mut ret_of = vec![0; ops.len()];
    for (i, &(_, is_ret, op)) in order.iter().enumerate() {
        if is_ret {
            ret_of[op] = i;
        }
    }
    let events: Vec<Event> = order
        .iter()
        .map(|&(_, is_ret, op)| Event {
            op,
            is_call: !is_ret,
            partner: ret_of[op],
        })
        .collect();
    // Doubly linked list over the events, with a head sentinel at index n. Removed
    // pairs keep their own links, so they are put back in reverse order (dancing links).
    let n = events.len();
    let head = n;
    const END: usize = usize::MAX;
    let mut next: Vec<usize> = (0..=n)
        .map(|i| if i + 1 < n { i + 1 } else { END })
        .collect();
    let mut prev: Vec<usize> = (0..=n).map(|i| if i == 0 { head } else { i - 1 }).collect();
    next[head] = if n > 0 { 0 } else { END };
    prev[head] = END;
    let unlink = |i: usize, next: &mut Vec<usize>, prev: &mut Vec<usize>| {
        let (p, nx) = (prev[i], next[i]);
        next[p] = nx;
        if nx != END {
            prev[nx] = p;
        }
    };
    let relink = |i: usize, next: &mut Vec<usize>, prev: &mut Vec<usize>| {
        let (p, nx) = (prev[i], next[i]);
        next[p] = i;
        if nx != END {
            prev[nx] = i;
        }
    };

    let mut linearized = vec![0u64; ops.len().div_ceil(64)];
    let mut cache: HashSet<(Vec<u64>, Option<u64>)> = HashSet::new();
    let mut state: Option<u64> = None;
    // (call event, state before it), in linearization order.
    let mut stack: Vec<(usize, Option<u64>)> = Vec::new();
    // The deepest point the search reached: (prefix, state, op it got stuck on).
    let mut best: Option<(Vec<usize>, Option<u64>, usize)> = None;
    let mut steps = 0u64;
    let mut entry = next[head];
    // The list always ends with a return event while it is not empty.
    while next[head] != END {
        steps += 1;
        if steps > budget {
            return Verdict::Inconclusive { key };
        }
        let e = events[entry];
        if e.is_call {
            let op = &ops[e.op];
            if let Some(after) = step(state, op.input, op.output) {
                let mut lin = linearized.clone();
                lin[e.op / 64] |= 1 << (e.op % 64);
                if cache.insert((lin.clone(), after)) {
                    stack.push((entry, state));
                    state = after;
                    linearized = lin;
                    unlink(entry, &mut next, &mut prev);
                    unlink(e.partner, &mut next, &mut prev);
                    entry = next[head];
                    continue;
                }
            }
            entry = next[entry];
        } else {
            // A return whose call is still in the list: that operation had to be
            // linearized by now, so undo the last choice.
            if best.as_ref().is_none_or(|b| stack.len() > b.0.len()) {
                let prefix = stack.iter().map(|&(c, _)| events[c].op).collect();
                best = Some((prefix, state, e.op));
            }
            let Some((call, before)) = stack.pop() else {
                return violation(ops, key, best.expect("set above"));
            };
            let ce = events[call];
            relink(ce.partner, &mut next, &mut prev);
            relink(call, &mut next, &mut prev);
            linearized[ce.op / 64] &= !(1 << (ce.op % 64));
            state = before;
            entry = next[call];
        }
    }
    Verdict::Linearizable
}

fn violation(
    ops: &[Op],
    key: String,
    (prefix, state, stuck): (Vec<usize>, Option<u64>, usize),
) -> Verdict {
    let stuck_op = ops[stuck].clone();
    let done: HashSet<usize> = prefix.iter().copied().collect();
    let end = stuck_op.ret.unwrap_or(u64::MAX);
    let concurrent = ops
        .iter()
        .enumerate()
        .filter(|(i, o)| {
            *i != stuck
                && !done.contains(i)
                && o.invoke <= end
                && o.ret.is_none_or(|r| r >= stuck_op.invoke)
        })
        .map(|(_, o)| o.clone())
        .collect();
    Verdict::Violation(Witness {
        key,
        linearized: prefix.iter().map(|&i| ops[i].clone()).collect(),
        state,
        stuck: stuck_op,
        concurrent,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(client: usize, input: Input, output: Output, invoke: u64, ret: Option<u64>) -> Op {
        Op {
            client,
            key: "k".into(),
            input,
            output,
            invoke,
            ret,
        }
    }

    const B: u64 = 1_000_000;

    #[test]
    fn sequential_history_is_linearizable() {
        let h = vec![
            op(0, Input::Get, Output::Get(None), 0, Some(B)),
            op(0, Input::Put(1), Output::Put, 2 * B, Some(3 * B)),
            op(1, Input::Get, Output::Get(Some(1)), 4 * B, Some(5 * B)),
            op(
                1,
                Input::Cas { expect: 1, new: 2 },
                Output::Cas(true),
                6 * B,
                Some(7 * B),
            ),
            op(
                0,
                Input::Cas { expect: 1, new: 3 },
                Output::Cas(false),
                8 * B,
                Some(9 * B),
            ),
            op(0, Input::Delete, Output::Delete(true), 10 * B, Some(11 * B)),
            op(
                1,
                Input::Delete,
                Output::Delete(false),
                12 * B,
                Some(13 * B),
            ),
        ];
        assert_eq!(check(&h, 1_000_000), Verdict::Linearizable);
    }

    #[test]
    fn concurrent_writes_may_be_read_in_either_order() {
        // Two overlapping puts; a later read sees the one that "lost" wall-clock order.
        let h = vec![
            op(0, Input::Put(1), Output::Put, 0, Some(10 * B)),
            op(1, Input::Put(2), Output::Put, B, Some(5 * B)),
            op(2, Input::Get, Output::Get(Some(1)), 11 * B, Some(12 * B)),
        ];
        assert_eq!(check(&h, 1_000_000), Verdict::Linearizable);
    }

    #[test]
    fn stale_read_is_a_violation_with_a_witness() {
        let h = vec![
            op(0, Input::Put(1), Output::Put, 0, Some(B)),
            op(0, Input::Put(2), Output::Put, 2 * B, Some(3 * B)),
            // Reads the overwritten value after the second put returned.
            op(1, Input::Get, Output::Get(Some(1)), 4 * B, Some(5 * B)),
        ];
        let Verdict::Violation(w) = check(&h, 1_000_000) else {
            panic!("stale read accepted");
        };
        assert_eq!(w.stuck, h[2]);
        assert_eq!(w.linearized, vec![h[0].clone(), h[1].clone()]);
        assert_eq!(w.state, Some(2));
        assert!(w.to_string().contains("cannot linearize"), "{w}");
    }

    #[test]
    fn lost_acknowledged_write_is_a_violation() {
        let h = vec![
            op(0, Input::Put(1), Output::Put, 0, Some(B)),
            op(1, Input::Get, Output::Get(None), 2 * B, Some(3 * B)),
        ];
        assert!(matches!(check(&h, 1_000_000), Verdict::Violation(_)));
    }

    #[test]
    fn two_successful_cas_from_the_same_value_is_a_violation() {
        let h = vec![
            op(0, Input::Put(1), Output::Put, 0, Some(B)),
            op(
                1,
                Input::Cas { expect: 1, new: 2 },
                Output::Cas(true),
                2 * B,
                Some(5 * B),
            ),
            op(
                2,
                Input::Cas { expect: 1, new: 3 },
                Output::Cas(true),
                3 * B,
                Some(6 * B),
            ),
        ];
        assert!(matches!(check(&h, 1_000_000), Verdict::Violation(_)));
    }

    #[test]
    fn unknown_write_may_apply_late_or_never() {
        // Applied long after its invocation (seen by a much later read)...
        let late = vec![
            op(0, Input::Put(1), Output::Put, 0, Some(B)),
            op(1, Input::Put(2), Output::Unknown, 2 * B, None),
            op(2, Input::Get, Output::Get(Some(1)), 3 * B, Some(4 * B)),
            op(2, Input::Get, Output::Get(Some(2)), 20 * B, Some(21 * B)),
        ];
        assert_eq!(check(&late, 1_000_000), Verdict::Linearizable);
        // ...or never.
        let never = vec![
            op(0, Input::Put(1), Output::Put, 0, Some(B)),
            op(1, Input::Delete, Output::Unknown, 2 * B, None),
            op(2, Input::Get, Output::Get(Some(1)), 30 * B, Some(31 * B)),
        ];
        assert_eq!(check(&never, 1_000_000), Verdict::Linearizable);
    }

    #[test]
    fn unknown_write_cannot_apply_before_its_invocation_or_twice() {
        // The read returned before the unknown put was even invoked.
        let early = vec![
            op(0, Input::Get, Output::Get(Some(7)), 0, Some(B)),
            op(1, Input::Put(7), Output::Unknown, 2 * B, None),
        ];
        assert!(matches!(check(&early, 1_000_000), Verdict::Violation(_)));
        // Value 1 reappears after being overwritten: one put cannot apply twice.
        let twice = vec![
            op(1, Input::Put(1), Output::Unknown, 0, None),
            op(0, Input::Get, Output::Get(Some(1)), B, Some(2 * B)),
            op(0, Input::Put(2), Output::Put, 3 * B, Some(4 * B)),
            op(0, Input::Get, Output::Get(Some(1)), 5 * B, Some(6 * B)),
        ];
        let Verdict::Violation(w) = check(&twice, 1_000_000) else {
            panic!("a write applied twice was accepted");
        };
        assert_eq!(w.stuck, twice[3]);
    }

    #[test]
    fn keys_are_checked_independently() {
        let mut a = op(0, Input::Put(1), Output::Put, 0, Some(B));
        a.key = "a".into();
        let mut b = op(1, Input::Get, Output::Get(Some(1)), 2 * B, Some(3 * B));
        b.key = "b".into();
        let Verdict::Violation(w) = check(&[a, b], 1_000_000) else {
            panic!("a value read from another key was accepted");
        };
        assert_eq!(w.key, "b");
    }

    #[test]
    fn budget_exhaustion_is_inconclusive_not_a_pass() {
        let mut h = vec![];
        for i in 0..40 {
            h.push(op(i, Input::Put(i as u64), Output::Unknown, i as u64, None));
        }
        h.push(op(99, Input::Get, Output::Get(Some(1000)), 100, Some(200)));
        assert!(matches!(check(&h, 1_000), Verdict::Inconclusive { .. }));
    }
}
