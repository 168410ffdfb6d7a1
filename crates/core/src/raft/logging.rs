//! raft-rs logs through `slog`; this drain turns each record into one tracing event
//! with target `raft`: the message, the member as a field (hex, as meshd prints member
//! IDs), the term and the peer concerned as fields when the record names them, and
//! any other values after the message. No source paths.

use std::fmt::{self, Write as _};

use slog::{Drain, Key, OwnedKVList, Record, Serializer, KV};

/// The drain a member's raft-rs logger writes to.
pub struct RaftLogDrain {
    member: String,
}

impl RaftLogDrain {
    pub fn new(member_id: u64) -> RaftLogDrain {
        RaftLogDrain {
            member: format!("{member_id:x}"),
        }
    }
}

/// The values of one record, sorted into fields and the rest.
#[derive(Default)]
struct Values {
    term: Option<u64>,
    peer: Option<String>,
    rest: String,
}

impl Serializer for Values {
    fn emit_arguments(&mut self, key: Key, val: &fmt::Arguments) -> slog::Result {
        let text = val.to_string();
        match key {
            // The member is known; raft-rs repeats it on every record.
            "raft_id" => {}
            "term" if self.term.is_none() => self.term = text.parse().ok(),
            "from" | "to" | "peer" if self.peer.is_none() => {
                self.peer = text.parse::<u64>().map(|p| format!("{p:x}")).ok();
                if self.peer.is_none() {
                    let _ = write!(self.rest, " {key}={text}");
                }
            }
            _ => {
                let _ = write!(self.rest, " {key}={text}");
            }
        }
        Ok(())
    }
}

impl Drain for RaftLogDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &Record, values: &OwnedKVList) -> Result<(), slog::Never> {
        // Format nothing for a level nobody logs (raft-rs writes debug records often).
        let enabled = match record.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::enabled!(target: "raft", tracing::Level::ERROR)
            }
            slog::Level::Warning => tracing::enabled!(target: "raft", tracing::Level::WARN),
            slog::Level::Info => tracing::enabled!(target: "raft", tracing::Level::INFO),
            slog::Level::Debug => tracing::enabled!(target: "raft", tracing::Level::DEBUG),
            slog::Level::Trace => tracing::enabled!(target: "raft", tracing::Level::TRACE),
        };
        if !enabled {
            return Ok(());
        }
        let mut v = Values::default();
        // The record's own values first: they are the most specific.
        let _ = record.kv().serialize(record, &mut v);
        let _ = values.serialize(record, &mut v);
        let member = self.member.as_str();
        let msg = record.msg();
        let rest = v.rest.as_str();
        macro_rules! emit {
            ($level:expr) => {
                tracing::event!(
                    target: "raft",
                    $level,
                    member = %member,
                    term = v.term,
                    peer = v.peer.as_deref().map(tracing::field::display),
                    "{msg}{rest}"
                )
            };
        }
        match record.level() {
            slog::Level::Critical | slog::Level::Error => emit!(tracing::Level::ERROR),
            slog::Level::Warning => emit!(tracing::Level::WARN),
            slog::Level::Info => emit!(tracing::Level::INFO),
            slog::Level::Debug => emit!(tracing::Level::DEBUG),
            slog::Level::Trace => emit!(tracing::Level::TRACE),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_become_fields_and_the_rest_follows_the_message() {
        let mut v = Values::default();
        let kv = slog::o!("raft_id" => 3u64, "term" => 7u64, "from" => 26u64, "index" => 12u64);
        let args = format_args!("x");
        let rec = slog::record!(slog::Level::Info, "", &args, slog::b!());
        kv.serialize(&rec, &mut v).unwrap();
        assert_eq!(v.term, Some(7));
        assert_eq!(v.peer.as_deref(), Some("1a"));
        assert_eq!(v.rest, " index=12");
    }
}
