//! The semaphore value in CoreOS locksmith's layout: where it lives (key per group),
//! how it is parsed and validated, and lock / unlock / set-max as pure functions on it.
//! No I/O here; `cas` applies these functions to the stored value atomically.
use serde::{Deserialize, Serialize};

/// Root of every locksmith key (CoreOS's prefix, so existing tooling finds the lock).
pub const KEY_PREFIX: &str = "coreos.com/updateengine/rebootlock";

/// The key holding the semaphore of `group`, or the default semaphore for `None`.
///
/// Groups are query-escaped like Go's `url.QueryEscape` (space becomes `+`), which is
/// what CoreOS locksmith does, so both tools agree on the key.
pub fn semaphore_key(group: Option<&str>) -> String {
    match group {
        None | Some("") => format!("{KEY_PREFIX}/semaphore"),
        Some(g) => format!("{KEY_PREFIX}/groups/{}/semaphore", query_escape(g)),
    }
}

/// Go's `url.QueryEscape`: unreserved bytes stay, space is `+`, the rest is `%XX`.
fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The stored semaphore. Field order is the serialization order: CoreOS writes
/// `{"semaphore":N,"max":M,"holders":[...]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Semaphore {
    /// Free slots: always `max - holders.len()`, negative after `set-max` went below
    /// the number of holders.
    pub semaphore: i64,
    /// How many holders may hold the lock at once; never negative.
    pub max: i64,
    /// Holder IDs, unique, kept sorted (CoreOS inserts in order and binary-searches).
    pub holders: Vec<String>,
}

/// The stored JSON as it may come: CoreOS writes `"holders":null` for a fresh semaphore.
#[derive(Deserialize)]
struct Stored {
    semaphore: Option<i64>,
    max: Option<i64>,
    holders: Option<Vec<String>>,
}

/// Why a stored value is not a usable semaphore. Never repaired automatically.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SemaphoreError {
    /// The value is not JSON of the expected shape (or not UTF-8).
    #[error("invalid semaphore JSON: {0}")]
    Json(String),
    /// A required field is absent or null.
    #[error("invalid semaphore: field {0:?} is missing")]
    MissingField(&'static str),
    /// `max` below zero.
    #[error("invalid semaphore: max is {0}, must be at least 0")]
    NegativeMax(i64),
    /// The free-slot count does not match `max - len(holders)`.
    #[error(
        "inconsistent semaphore: \"semaphore\" is {semaphore} but max {max} - {holders} holder(s) = {expected}"
    )]
    Inconsistent {
        semaphore: i64,
        max: i64,
        holders: usize,
        expected: i64,
    },
    /// The same holder ID appears twice.
    #[error("inconsistent semaphore: holder {0:?} is listed more than once")]
    DuplicateHolder(String),
    /// A holder ID is the empty string.
    #[error("inconsistent semaphore: a holder ID is empty")]
    EmptyHolder,
}

/// Why lock or unlock was refused on a valid semaphore.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    /// Every slot is taken (or `max` was lowered below the holder count).
    #[error("no free slot: semaphore is at {semaphore} of max {max}, held by {}", holders_text(.holders))]
    NoFreeSlot {
        semaphore: i64,
        max: i64,
        holders: Vec<String>,
    },
    /// Unlock by an ID that does not hold the lock.
    #[error("{id:?} does not hold the lock (holders: {})", holders_text(.holders))]
    NotHolder { id: String, holders: Vec<String> },
}

fn holders_text(holders: &[String]) -> String {
    if holders.is_empty() {
        "none".into()
    } else {
        holders.join(", ")
    }
}

/// What a successful lock did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockOutcome {
    /// The ID took a free slot.
    Acquired,
    /// The ID already held the lock; nothing changed.
    AlreadyHeld,
}

impl Semaphore {
    /// The semaphore created on first use: one slot, no holders.
    pub fn initial() -> Semaphore {
        Semaphore {
            semaphore: 1,
            max: 1,
            holders: Vec::new(),
        }
    }

    /// Parses and validates a stored value.
    pub fn parse(bytes: &[u8]) -> Result<Semaphore, SemaphoreError> {
        let stored: Stored =
            serde_json::from_slice(bytes).map_err(|e| SemaphoreError::Json(e.to_string()))?;
        let sem = Semaphore {
            semaphore: stored
                .semaphore
                .ok_or(SemaphoreError::MissingField("semaphore"))?,
            max: stored.max.ok_or(SemaphoreError::MissingField("max"))?,
            holders: stored.holders.unwrap_or_default(),
        };
        sem.validate()?;
        Ok(sem)
    }

    /// Checks the invariants every stored semaphore must keep.
    pub fn validate(&self) -> Result<(), SemaphoreError> {
        if self.max < 0 {
            return Err(SemaphoreError::NegativeMax(self.max));
        }
        let mut seen = std::collections::HashSet::new();
        for h in &self.holders {
            if h.is_empty() {
                return Err(SemaphoreError::EmptyHolder);
            }
            if !seen.insert(h.as_str()) {
                return Err(SemaphoreError::DuplicateHolder(h.clone()));
            }
        }
        let expected = self.max - self.holders.len() as i64;
        if self.semaphore != expected {
            return Err(SemaphoreError::Inconsistent {
                semaphore: self.semaphore,
                max: self.max,
                holders: self.holders.len(),
                expected,
            });
        }
        Ok(())
    }

    /// The stored form: compact JSON, fields in CoreOS's order.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a struct of integers and strings serializes")
    }

    /// Whether `id` holds the lock.
    pub fn is_holder(&self, id: &str) -> bool {
        self.holders.iter().any(|h| h == id)
    }

    /// Takes a slot for `id`; a current holder locking again changes nothing.
    pub fn lock(&mut self, id: &str) -> Result<LockOutcome, Refusal> {
        if self.is_holder(id) {
            return Ok(LockOutcome::AlreadyHeld);
        }
        if self.semaphore <= 0 {
            return Err(Refusal::NoFreeSlot {
                semaphore: self.semaphore,
                max: self.max,
                holders: self.holders.clone(),
            });
        }
        let at = self.holders.partition_point(|h| h.as_str() < id);
        self.holders.insert(at, id.to_string());
        self.semaphore -= 1;
        Ok(LockOutcome::Acquired)
    }

    /// Releases the slot of `id`.
    pub fn unlock(&mut self, id: &str) -> Result<(), Refusal> {
        let Some(at) = self.holders.iter().position(|h| h == id) else {
            return Err(Refusal::NotHolder {
                id: id.to_string(),
                holders: self.holders.clone(),
            });
        };
        self.holders.remove(at);
        self.semaphore += 1;
        Ok(())
    }

    /// Sets the limit, moving the free-slot count by the same amount (it goes negative
    /// when `max` drops below the holder count; new locks then wait).
    pub fn set_max(&mut self, max: i64) {
        self.semaphore += max - self.max;
        self.max = max;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn semaphore_reads_and_updates_coreos_json() {
        // Exactly as CoreOS locksmith stores it: a fresh semaphore has null holders.
        let fresh = br#"{"semaphore":1,"max":1,"holders":null}"#;
        let mut s = Semaphore::parse(fresh).unwrap();
        assert_eq!(s, Semaphore::initial());
        assert_eq!(s.lock("m1").unwrap(), LockOutcome::Acquired);
        assert_eq!(s.to_json(), r#"{"semaphore":0,"max":1,"holders":["m1"]}"#);

        // A hand-edited one with whitespace and two holders; we write it back compact
        // and keep holders sorted, as CoreOS does.
        let hand =
            b"{ \"semaphore\": 1, \"max\": 3,\n  \"holders\": [\"b-machine\", \"d-machine\"] }";
        let mut s = Semaphore::parse(hand).unwrap();
        s.lock("c-machine").unwrap();
        assert_eq!(
            s.to_json(),
            r#"{"semaphore":0,"max":3,"holders":["b-machine","c-machine","d-machine"]}"#
        );
        s.unlock("b-machine").unwrap();
        s.unlock("c-machine").unwrap();
        s.unlock("d-machine").unwrap();
        assert_eq!(s.to_json(), r#"{"semaphore":3,"max":3,"holders":[]}"#);
        // What we write parses back to the same value.
        assert_eq!(Semaphore::parse(s.to_json().as_bytes()).unwrap(), s);
    }

    #[test]
    fn semaphore_validation_errors_are_precise() {
        let err = |j: &str| Semaphore::parse(j.as_bytes()).unwrap_err();
        assert!(matches!(err("not json"), SemaphoreError::Json(_)));
        assert!(matches!(
            err(r#"{"semaphore":"1","max":1,"holders":[]}"#),
            SemaphoreError::Json(_)
        ));
        assert_eq!(
            err(r#"{"max":1,"holders":[]}"#),
            SemaphoreError::MissingField("semaphore")
        );
        assert_eq!(
            err(r#"{"semaphore":1,"holders":[]}"#),
            SemaphoreError::MissingField("max")
        );
        assert_eq!(
            err(r#"{"semaphore":-1,"max":-1,"holders":[]}"#),
            SemaphoreError::NegativeMax(-1)
        );
        let e = err(r#"{"semaphore":1,"max":2,"holders":["a","b"]}"#);
        assert_eq!(
            e,
            SemaphoreError::Inconsistent {
                semaphore: 1,
                max: 2,
                holders: 2,
                expected: 0
            }
        );
        assert_eq!(
            e.to_string(),
            "inconsistent semaphore: \"semaphore\" is 1 but max 2 - 2 holder(s) = 0"
        );
        assert_eq!(
            err(r#"{"semaphore":0,"max":2,"holders":["a","a"]}"#),
            SemaphoreError::DuplicateHolder("a".into())
        );
        assert_eq!(
            err(r#"{"semaphore":0,"max":1,"holders":[""]}"#),
            SemaphoreError::EmptyHolder
        );
    }

    #[test]
    fn semaphore_lock_is_idempotent_and_refuses_when_full() {
        let mut s = Semaphore::initial();
        assert_eq!(s.lock("a").unwrap(), LockOutcome::Acquired);
        let before = s.clone();
        assert_eq!(s.lock("a").unwrap(), LockOutcome::AlreadyHeld);
        assert_eq!(s, before);
        let refused = s.lock("b").unwrap_err();
        assert_eq!(
            refused,
            Refusal::NoFreeSlot {
                semaphore: 0,
                max: 1,
                holders: vec!["a".into()]
            }
        );
        assert_eq!(s, before, "a refused lock changes nothing");
    }

    #[test]
    fn semaphore_unlock_by_non_holder_is_refused() {
        let mut s = Semaphore::initial();
        s.lock("a").unwrap();
        let e = s.unlock("b").unwrap_err();
        assert!(matches!(e, Refusal::NotHolder { ref id, .. } if id == "b"));
        assert_eq!(e.to_string(), "\"b\" does not hold the lock (holders: a)");
        assert_eq!(s.holders, vec!["a".to_string()]);
        s.unlock("a").unwrap();
        assert!(s.unlock("a").is_err(), "a second unlock is refused");
        assert_eq!(s, Semaphore::initial());
    }

    #[test]
    fn semaphore_set_max_below_holder_count_goes_negative_and_blocks() {
        let mut s = Semaphore::initial();
        s.set_max(3);
        for id in ["a", "b", "c"] {
            s.lock(id).unwrap();
        }
        s.set_max(1);
        assert_eq!((s.semaphore, s.max), (-2, 1));
        s.validate().unwrap();
        assert!(matches!(s.lock("d"), Err(Refusal::NoFreeSlot { .. })));
        s.unlock("a").unwrap();
        s.unlock("b").unwrap();
        assert!(s.lock("d").is_err(), "still one holder at max 1");
        s.unlock("c").unwrap();
        assert_eq!(s.lock("d").unwrap(), LockOutcome::Acquired);
        s.set_max(0);
        assert_eq!(s.to_json(), r#"{"semaphore":-1,"max":0,"holders":["d"]}"#);
    }

    #[test]
    fn semaphore_keys_follow_coreos_layout() {
        assert_eq!(
            semaphore_key(None),
            "coreos.com/updateengine/rebootlock/semaphore"
        );
        assert_eq!(
            semaphore_key(Some("web servers/eu")),
            "coreos.com/updateengine/rebootlock/groups/web+servers%2Feu/semaphore"
        );
    }
}
